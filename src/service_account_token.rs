//! ServiceAccount tokens as client assertions (`clientAuthentication: ServiceAccountToken`):
//! the operator asks the API server (TokenRequest, `create serviceaccounts/token`) for a
//! token of the ServiceAccount a connection names, for the audience the identity provider
//! expects and for the shortest lifetime the API server allows, once per token request.
//! The token goes into that one request and nowhere else.
//!
//! A token whose audience is one of the API server's own would be a key to the cluster in
//! the identity provider's hands: such a token is never requested. The API server's own
//! audiences are its `--api-audiences`, which default to its issuer; the operator learns
//! them from the issuer in the API server's discovery document and, in a Pod, from the
//! audiences of its own projected token (which the API server fills with its
//! `--api-audiences`), plus the usual in-cluster names.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

use crate::camunda::workload::{TokenClaims, WorkloadIdentity};
use crate::camunda::{AuthFailure, FailureDetail, Sensitive};

/// The shortest lifetime the API server grants (`expirationSeconds` below it is refused).
pub const TOKEN_LIFETIME_SECONDS: i64 = 600;
/// The audience Microsoft Entra ID expects in federated credentials.
pub const ENTRA_AUDIENCE: &str = "api://AzureADTokenExchange";
/// How long one call to the API server may take.
const API_TIMEOUT: Duration = Duration::from_secs(15);
/// The operator's own token in a Pod: its audiences are the API server's.
const OWN_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Names under which clusters commonly know their API server, refused whatever discovery
/// says (a cluster may accept more audiences than its issuer).
const WELL_KNOWN_API_AUDIENCES: [&str; 5] = [
    "https://kubernetes.default.svc.cluster.local",
    "https://kubernetes.default.svc",
    "https://kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes",
];

/// Requests ServiceAccount tokens in one namespace with the operator's own client.
#[derive(Clone)]
pub struct ServiceAccountTokens {
    client: kube::Client,
    namespace: String,
}

impl ServiceAccountTokens {
    pub fn new(client: kube::Client, namespace: impl Into<String>) -> Self {
        ServiceAccountTokens {
            client,
            namespace: namespace.into(),
        }
    }

    /// The tokens of ServiceAccount `name` for `audience`.
    pub fn of(&self, name: &str, audience: &str) -> Arc<dyn WorkloadIdentity> {
        Arc::new(ServiceAccountToken {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            name: name.to_owned(),
            audience: audience.to_owned(),
        })
    }
}

struct ServiceAccountToken {
    client: kube::Client,
    namespace: String,
    name: String,
    audience: String,
}

impl std::fmt::Debug for ServiceAccountToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl WorkloadIdentity for ServiceAccountToken {
    fn token(&self) -> BoxFuture<'_, Result<Sensitive, AuthFailure>> {
        self.request().boxed()
    }

    fn describe(&self) -> String {
        format!(
            "a token of ServiceAccount {:?} (namespace {:?}) for audience {:?}",
            self.name, self.namespace, self.audience
        )
    }

    fn identity(&self) -> String {
        format!("serviceaccount/{}/{}/{}", self.namespace, self.name, self.audience)
    }
}

impl ServiceAccountToken {
    async fn request(&self) -> Result<Sensitive, AuthFailure> {
        let own = api_server_audiences(&self.client).await?;
        if let Some(own) = api_server_audience(&self.audience, &own) {
            return Err(AuthFailure::rejected(format!(
                "auth.oauth2.clientAssertion.audience {:?} is the API server's own audience ({own:?}): a token for it would \
                 open the cluster to whoever receives it, so none is requested. Set the audience the identity provider \
                 expects (Keycloak: the realm URL; Microsoft Entra ID: {ENTRA_AUDIENCE})",
                self.audience
            ))
            .with_detail(FailureDetail::AudienceNotAllowed));
        }
        let accounts = Api::<ServiceAccount>::namespaced(self.client.clone(), &self.namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![self.audience.clone()],
                expiration_seconds: Some(TOKEN_LIFETIME_SECONDS),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let answer = tokio::time::timeout(
            API_TIMEOUT,
            accounts.create_token_request(&self.name, &PostParams::default(), &request),
        )
        .await;
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => return Err(self.failure(&error)),
            Err(_) => {
                return Err(AuthFailure::server_error(format!(
                    "the API server did not answer the request for {} within {API_TIMEOUT:?}",
                    self.describe()
                ))
                .with_detail(FailureDetail::TokenRequestFailed));
            }
        };
        match answer.status.map(|status| status.token).filter(|token| !token.is_empty()) {
            Some(token) => Ok(Sensitive::new(token)),
            None => Err(AuthFailure::server_error(format!(
                "the API server answered the request for {} without a token",
                self.describe()
            ))
            .with_detail(FailureDetail::TokenRequestFailed)),
        }
    }

    /// What a failed TokenRequest means, in the words of the API server.
    fn failure(&self, error: &kube::Error) -> AuthFailure {
        match error {
            kube::Error::Api(status) if status.code == 404 => AuthFailure::rejected(format!(
                "ServiceAccount {:?} not found in the connection's namespace {:?} (auth.oauth2.clientAssertion.serviceAccountRef): \
                 create it, or name the ServiceAccount the identity provider knows",
                self.name, self.namespace
            ))
            .with_detail(FailureDetail::ServiceAccountNotFound),
            kube::Error::Api(status) if status.code == 403 => AuthFailure::rejected(format!(
                "the API server refused to create {}: {}. The operator needs create on serviceaccounts/token in this \
                 namespace (the chart grants it in the namespaces it watches, watchNamespaces)",
                self.describe(),
                status.message
            ))
            .with_detail(FailureDetail::TokenRequestForbidden),
            kube::Error::Api(status) if (400..500).contains(&status.code) => AuthFailure::rejected(format!(
                "the API server refused the request for {} ({}): {}",
                self.describe(),
                status.code,
                status.message
            ))
            .with_detail(FailureDetail::TokenRequestFailed),
            other => AuthFailure::server_error(format!("the request for {} failed: {other}", self.describe()))
                .with_detail(FailureDetail::TokenRequestFailed),
        }
    }
}

/// The API server's own audiences, learned once per process (they change only with the
/// API server's flags). Unknown means no token: the check fails closed.
async fn api_server_audiences(client: &kube::Client) -> Result<BTreeSet<String>, AuthFailure> {
    static KNOWN: tokio::sync::OnceCell<BTreeSet<String>> = tokio::sync::OnceCell::const_new();
    KNOWN
        .get_or_try_init(|| async {
            let issuer = discovered_issuer(client).await?;
            let own_token = std::fs::read_to_string(OWN_TOKEN_FILE).ok();
            Ok(known_api_audiences(Some(&issuer), own_token.as_deref()))
        })
        .await
        .cloned()
}

/// The issuer in the API server's OpenID discovery document, which it serves to
/// `system:service-account-issuer-discovery` (bound to all ServiceAccounts by default).
async fn discovered_issuer(client: &kube::Client) -> Result<String, AuthFailure> {
    let failed = |why: String| {
        AuthFailure::server_error(format!(
            "cannot tell the API server's own audiences, so no ServiceAccount token is requested: GET \
             /.well-known/openid-configuration {why} (the operator needs the ClusterRole \
             system:service-account-issuer-discovery, bound to all ServiceAccounts by default)"
        ))
        .with_detail(FailureDetail::TokenRequestFailed)
    };
    let request = axum::http::Request::get("/.well-known/openid-configuration")
        .body(Vec::new())
        .map_err(|error| failed(error.to_string()))?;
    let text = tokio::time::timeout(API_TIMEOUT, client.request_text(request))
        .await
        .map_err(|_| failed(format!("did not answer within {API_TIMEOUT:?}")))?
        .map_err(|error| failed(format!("failed: {error}")))?;
    let document: serde_json::Value = serde_json::from_str(&text).map_err(|_| failed("did not answer JSON".into()))?;
    document
        .get("issuer")
        .and_then(|issuer| issuer.as_str())
        .filter(|issuer| !issuer.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| failed("answered without an issuer".into()))
}

/// The API server's audiences: its issuer, the audiences of a token it gave the operator
/// without asking for any (they are its `--api-audiences`), and the usual in-cluster names.
pub fn known_api_audiences(issuer: Option<&str>, own_token: Option<&str>) -> BTreeSet<String> {
    let own = own_token.map(|token| TokenClaims::of(token.trim()).audiences).unwrap_or_default();
    WELL_KNOWN_API_AUDIENCES
        .iter()
        .map(|name| (*name).to_owned())
        .chain(issuer.map(str::to_owned))
        .chain(own)
        .map(|audience| normalized(&audience))
        .collect()
}

/// The API server audience `audience` matches, compared without case and trailing `/`
/// (stricter than the API server, which compares exactly).
pub fn api_server_audience<'a>(audience: &str, own: &'a BTreeSet<String>) -> Option<&'a str> {
    own.get(&normalized(audience)).map(String::as_str)
}

fn normalized(audience: &str) -> String {
    audience.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// The audience a connection's token is requested for when `clientAssertion.audience` is
/// not set: Entra's fixed one for login.microsoftonline.com, else the issuer (Keycloak
/// checks for its realm URL), read from `issuerUrl` or from a Keycloak `tokenUrl`.
pub fn default_audience(token_url: Option<&str>, issuer_url: Option<&str>) -> Option<String> {
    let url = issuer_url.or(token_url)?;
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ':']).next())
        .unwrap_or_default();
    if host.eq_ignore_ascii_case("login.microsoftonline.com") {
        return Some(ENTRA_AUDIENCE.to_owned());
    }
    if let Some(issuer) = issuer_url {
        return Some(issuer.trim_end_matches('/').to_owned());
    }
    token_url?
        .trim_end_matches('/')
        .strip_suffix("/protocol/openid-connect/token")
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use std::sync::Mutex;

    /// Every request a scripted API server got: method, path and body.
    type Recorded = Arc<Mutex<Vec<(String, String, String)>>>;

    /// The issuer every scripted API server below gives (the audiences are learned once
    /// per process, so all of them must agree).
    const ISSUER: &str = "https://127.0.0.1:6443";

    /// A kube client whose API server answers discovery with [`ISSUER`] and a TokenRequest
    /// with `token_answer` (status, body); every request is recorded (method, path, body).
    fn scripted(token_answer: (StatusCode, serde_json::Value)) -> (kube::Client, Recorded) {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let (seen, token_answer) = (seen.clone(), token_answer.clone());
            async move {
                let (method, path) = (request.method().to_string(), request.uri().path().to_owned());
                let body = request.into_body().collect_bytes().await.map_err(|_| "unreadable body")?;
                seen.lock()
                    .unwrap()
                    .push((method, path.clone(), String::from_utf8_lossy(&body).into_owned()));
                let (status, body) = if path == "/.well-known/openid-configuration" {
                    (
                        StatusCode::OK,
                        serde_json::json!({"issuer": ISSUER, "jwks_uri": format!("{ISSUER}/openid/v1/jwks")}),
                    )
                } else {
                    token_answer
                };
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap();
                Ok::<_, &'static str>(response)
            }
        });
        (kube::Client::new(service, "team-a"), requests)
    }

    fn api_failure(code: u16, reason: &str, message: &str) -> (StatusCode, serde_json::Value) {
        let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message});
        (StatusCode::from_u16(code).unwrap(), body)
    }

    #[tokio::test]
    async fn a_token_is_requested_for_the_audience_and_600_seconds_each_time() {
        let answer = serde_json::json!({"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "spec": {"audiences": ["aud"]}, "status": {"token": "header.payload.signature", "expirationTimestamp": "2030-01-01T00:00:00Z"}});
        let (client, requests) = scripted((StatusCode::CREATED, answer));
        let tokens = ServiceAccountTokens::new(client, "team-a").of("orders-bot", "https://kc/realms/camunda-platform");
        assert_eq!(tokens.token().await.unwrap().expose(), "header.payload.signature");
        assert_eq!(tokens.token().await.unwrap().expose(), "header.payload.signature");
        let requests = requests.lock().unwrap().clone();
        let token_requests: Vec<_> = requests.iter().filter(|(_, path, _)| path.ends_with("/token")).collect();
        assert_eq!(token_requests.len(), 2, "a new token for each request: {requests:?}");
        let (method, path, body) = token_requests[0];
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("POST", "/api/v1/namespaces/team-a/serviceaccounts/orders-bot/token")
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["spec"]["audiences"], serde_json::json!(["https://kc/realms/camunda-platform"]));
        assert_eq!(body["spec"]["expirationSeconds"], 600);
        assert!(body["spec"]["boundObjectRef"].is_null());
    }

    #[tokio::test]
    async fn a_missing_account_and_a_refusal_have_their_reasons_and_the_api_servers_words() {
        let (client, _) = scripted(api_failure(404, "NotFound", "serviceaccounts \"ghost\" not found"));
        let failure = ServiceAccountTokens::new(client, "team-a")
            .of("ghost", "aud")
            .token()
            .await
            .unwrap_err();
        assert_eq!(failure.detail, Some(FailureDetail::ServiceAccountNotFound));
        assert!(
            failure.message.contains("ServiceAccount \"ghost\" not found"),
            "{}",
            failure.message
        );

        let refused = "serviceaccounts \"orders-bot\" is forbidden: User \"op\" cannot create resource \"serviceaccounts/token\"";
        let (client, _) = scripted(api_failure(403, "Forbidden", refused));
        let failure = ServiceAccountTokens::new(client, "team-a")
            .of("orders-bot", "aud")
            .token()
            .await
            .unwrap_err();
        assert_eq!(failure.detail, Some(FailureDetail::TokenRequestForbidden));
        assert_eq!(failure.kind, crate::camunda::AuthFailureKind::Rejected);
        assert!(failure.message.contains(refused), "{}", failure.message);

        let (client, _) = scripted(api_failure(500, "InternalError", "etcd is gone"));
        let failure = ServiceAccountTokens::new(client, "team-a")
            .of("orders-bot", "aud")
            .token()
            .await
            .unwrap_err();
        assert_eq!(failure.detail, Some(FailureDetail::TokenRequestFailed));
        assert_eq!(failure.kind, crate::camunda::AuthFailureKind::ServerError);
    }

    #[tokio::test]
    async fn no_token_is_requested_for_the_api_servers_own_audience() {
        let (client, requests) = scripted((StatusCode::CREATED, serde_json::json!({"status": {"token": "never"}})));
        for own in [ISSUER, "https://127.0.0.1:6443/", "https://kubernetes.default.svc"] {
            let failure = ServiceAccountTokens::new(client.clone(), "team-a")
                .of("orders-bot", own)
                .token()
                .await
                .unwrap_err();
            assert_eq!(failure.detail, Some(FailureDetail::AudienceNotAllowed), "{own}");
        }
        let requests = requests.lock().unwrap().clone();
        assert!(
            requests.iter().all(|(_, path, _)| !path.ends_with("/token")),
            "a TokenRequest was sent: {requests:?}"
        );
    }

    #[test]
    fn the_api_servers_audiences_are_refused_in_any_case_or_with_a_slash() {
        let known = known_api_audiences(Some("https://127.0.0.1:6443"), None);
        assert_eq!(
            api_server_audience("https://127.0.0.1:6443/", &known),
            Some("https://127.0.0.1:6443")
        );
        assert!(api_server_audience("HTTPS://Kubernetes.Default.Svc", &known).is_some());
        assert!(api_server_audience("kubernetes", &known).is_some());
        assert_eq!(api_server_audience("http://keycloak/realms/camunda-platform", &known), None);
        assert_eq!(api_server_audience(ENTRA_AUDIENCE, &known), None);
    }

    #[test]
    fn the_audiences_of_the_operators_own_token_are_the_api_servers() {
        let encode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        let token = format!(
            "{}.{}.sig",
            encode("{}"),
            encode(r#"{"aud":["https://oidc.example/cluster","vault"]}"#)
        );
        let known = known_api_audiences(None, Some(&format!("{token}\n")));
        assert!(api_server_audience("vault", &known).is_some());
        assert!(api_server_audience("https://oidc.example/cluster", &known).is_some());
    }

    #[test]
    fn default_audiences_are_entras_or_the_issuer() {
        assert_eq!(
            default_audience(None, Some("https://login.microsoftonline.com/tenant/v2.0")).as_deref(),
            Some(ENTRA_AUDIENCE)
        );
        assert_eq!(
            default_audience(Some("https://login.microsoftonline.com/tenant/oauth2/v2.0/token"), None).as_deref(),
            Some(ENTRA_AUDIENCE)
        );
        assert_eq!(
            default_audience(None, Some("https://kc.example/auth/realms/camunda-platform/")).as_deref(),
            Some("https://kc.example/auth/realms/camunda-platform")
        );
        assert_eq!(
            default_audience(
                Some("http://kc:18080/auth/realms/camunda-platform/protocol/openid-connect/token"),
                None
            )
            .as_deref(),
            Some("http://kc:18080/auth/realms/camunda-platform")
        );
        assert_eq!(default_audience(Some("https://idp.example/oauth/token"), None), None);
    }
}
