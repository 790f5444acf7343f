//! The OAuth2 client-credentials grant against Camunda SaaS, Identity (Keycloak) or
//! another OIDC provider, with the client authenticated by a secret in the body, a secret
//! in an HTTP Basic header, or a signed client assertion.

use base64::Engine as _;
use reqwest::Method;
use serde::Deserialize;

use super::assertion::{ASSERTION_TYPE, AssertionClaims, AssertionKey};
use super::discovery;
use super::http::{HttpClient, TransportError, describe_status, excerpt};
use super::workload::{TokenClaims, WorkloadIdentity, refusal_hint};
use super::{AuthFailure, FailureDetail, Sensitive, redact};
use crate::crd::RequestEncoding;

/// Where and how to ask for a token.
#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    pub location: TokenLocation,
    /// Sent only when not empty (Microsoft Entra ID rejects an `audience` parameter).
    pub audience: String,
    pub scope: Option<String>,
    pub encoding: RequestEncoding,
}

/// The token endpoint as the spec names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    /// `tokenUrl`.
    Url(String),
    /// `issuerUrl`: the token endpoint comes from OIDC discovery.
    Issuer(String),
}

impl TokenLocation {
    /// "https://idp/token", or "the token endpoint of issuer https://idp (https://idp/token)"
    /// once discovered, for messages.
    pub fn describe(&self, http: &HttpClient) -> String {
        match self {
            TokenLocation::Url(url) => url.clone(),
            TokenLocation::Issuer(issuer) => match discovery::cached_token_endpoint(http, issuer) {
                Some(url) => format!("{url} (discovered from issuer {issuer})"),
                None => format!("the token endpoint of issuer {issuer}"),
            },
        }
    }
}

/// The client id, and how the client proves it is that client.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub proof: ClientProof,
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientProof {
    /// `client_id` and `client_secret` in the body (client_secret_post).
    SecretInBody(Sensitive),
    /// `Authorization: Basic` (client_secret_basic).
    SecretInBasicHeader(Sensitive),
    /// A signed JWT (private_key_jwt).
    PrivateKeyJwt(AssertionKey),
    /// A workload identity token (a Kubernetes ServiceAccount token) as client assertion,
    /// fetched for each request. The client id is sent only when not empty.
    WorkloadIdentity(std::sync::Arc<dyn WorkloadIdentity>),
}

impl ClientCredentials {
    /// A client that sends its secret in the body, as Camunda's clients do by default.
    pub fn with_secret_in_body(client_id: impl Into<String>, secret: Sensitive) -> Self {
        ClientCredentials {
            client_id: client_id.into(),
            proof: ClientProof::SecretInBody(secret),
        }
    }

    /// `client id "orders", client secret in the body`, for `check`.
    pub fn describe(&self) -> String {
        let how = match &self.proof {
            ClientProof::SecretInBody(_) => "client secret in the body".to_owned(),
            ClientProof::SecretInBasicHeader(_) => "client secret in an HTTP Basic header".to_owned(),
            ClientProof::PrivateKeyJwt(key) => format!("client assertion signed {}", key.describe()),
            ClientProof::WorkloadIdentity(identity) => format!("client assertion: {}", identity.describe()),
        };
        if self.client_id.is_empty() {
            return format!("no client id, {how}");
        }
        format!("client id {:?}, {how}", self.client_id)
    }
}

/// A token as the endpoint handed it out.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub access_token: Sensitive,
    /// Seconds, when the endpoint said; `expires_in` alone is not trusted for the lifetime
    /// when the token is a JWT with `exp` (SaaS may hand back a cached token).
    pub expires_in: Option<u64>,
}

/// RFC 6749's error answer.
#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
}

impl TokenEndpoint {
    /// A token endpoint at a fixed URL.
    pub fn at(url: impl Into<String>, audience: impl Into<String>, scope: Option<String>, encoding: RequestEncoding) -> Self {
        TokenEndpoint {
            location: TokenLocation::Url(url.into()),
            audience: audience.into(),
            scope,
            encoding,
        }
    }

    /// Asks for a token with the client-credentials grant. With an issuer, the token
    /// endpoint is discovered first; a failed request forgets it, so that the next try
    /// reads the discovery document again (the provider may have moved it).
    pub async fn request_token(&self, http: &HttpClient, client: &ClientCredentials) -> Result<TokenGrant, AuthFailure> {
        let url = self.resolve(http).await?;
        self.request_token_at(&url, http, client)
            .await
            .map_err(|failure| self.after_failed_request(http, &url, failure))
    }

    /// The URL token requests go to: `tokenUrl`, or the issuer's discovered token endpoint.
    pub async fn resolve(&self, http: &HttpClient) -> Result<String, AuthFailure> {
        match &self.location {
            TokenLocation::Url(url) => Ok(url.clone()),
            TokenLocation::Issuer(issuer) => discovery::token_endpoint(http, issuer).await,
        }
    }

    /// What a failed request at `url` (from [`Self::resolve`]) means for this endpoint: with
    /// an issuer, the discovered endpoint is forgotten and the message names the issuer.
    pub fn after_failed_request(&self, http: &HttpClient, url: &str, failure: AuthFailure) -> AuthFailure {
        match &self.location {
            TokenLocation::Url(_) => failure,
            TokenLocation::Issuer(issuer) => {
                discovery::forget(http, issuer);
                AuthFailure {
                    message: format!("{} (token endpoint {url}, discovered from issuer {issuer})", failure.message),
                    ..failure
                }
            }
        }
    }

    /// POSTs `grant_type=client_credentials` with the client's proof, the audience and scope
    /// to `url` (from [`Self::resolve`]).
    pub async fn request_token_at(&self, url: &str, http: &HttpClient, client: &ClientCredentials) -> Result<TokenGrant, AuthFailure> {
        let client_id = client.client_id.as_str();
        let mut fields = vec![("grant_type", "client_credentials")];
        let mut assertion_claims = None;
        let assertion = match &client.proof {
            ClientProof::PrivateKeyJwt(key) => {
                let claims = AssertionClaims::new(client_id, url, jiff::Timestamp::now().as_second());
                let signed = key.sign(&claims).map_err(AuthFailure::server_error)?;
                assertion_claims = Some((claims.iat, claims.exp));
                Some(signed)
            }
            // A new token for each request, dropped with this function's locals.
            ClientProof::WorkloadIdentity(identity) => Some(identity.token().await?),
            ClientProof::SecretInBody(_) | ClientProof::SecretInBasicHeader(_) => None,
        };
        match &client.proof {
            ClientProof::SecretInBody(secret) => {
                fields.push(("client_id", client_id));
                fields.push(("client_secret", secret.expose()));
            }
            ClientProof::SecretInBasicHeader(_) => {}
            ClientProof::PrivateKeyJwt(_) => {
                fields.push(("client_id", client_id));
                fields.push(("client_assertion_type", ASSERTION_TYPE));
                fields.push(("client_assertion", assertion.as_ref().map(|a| a.expose()).unwrap_or_default()));
            }
            ClientProof::WorkloadIdentity(_) => {
                if !client_id.is_empty() {
                    fields.push(("client_id", client_id));
                }
                fields.push(("client_assertion_type", ASSERTION_TYPE));
                fields.push(("client_assertion", assertion.as_ref().map(|a| a.expose()).unwrap_or_default()));
            }
        }
        if !self.audience.is_empty() {
            fields.push(("audience", self.audience.as_str()));
        }
        if let Some(scope) = self.scope.as_deref().filter(|scope| !scope.is_empty()) {
            fields.push(("scope", scope));
        }
        let mut request = http.request(Method::POST, url).header("accept", "application/json");
        if let ClientProof::SecretInBasicHeader(secret) = &client.proof {
            request = request.header("authorization", basic_authorization(client_id, secret.expose()).expose());
        }
        let request = match self.encoding {
            RequestEncoding::Form => request.form(&fields),
            RequestEncoding::Json => request.json(&fields.iter().copied().collect::<std::collections::BTreeMap<_, _>>()),
        };
        let answer = http.send(request).await.map_err(|error| unreachable_token_endpoint(&error))?;
        let status = answer.status;
        if status.is_success() {
            return parse_grant(&answer.body);
        }
        let detail = oauth_error_detail(&answer.body, client, assertion.as_ref().map(|a| a.expose()));
        if let (ClientProof::PrivateKeyJwt(key), Some((iat, exp))) = (&client.proof, assertion_claims)
            && status.is_client_error()
        {
            let failure = AuthFailure::rejected(format!(
                "the token endpoint rejected the client assertion ({}){detail}; {}",
                describe_status(status),
                assertion_hint(&detail, key, iat, exp)
            ));
            return Err(failure.with_detail(FailureDetail::ClientAssertionRejected));
        }
        if let (ClientProof::WorkloadIdentity(identity), Some(token)) = (&client.proof, &assertion)
            && status.is_client_error()
        {
            let failure = AuthFailure::rejected(format!(
                "the token endpoint refused {} as client assertion ({}){detail}; {}",
                identity.describe(),
                describe_status(status),
                refusal_hint(&detail, &TokenClaims::of(token.expose()))
            ));
            return Err(failure.with_detail(FailureDetail::ClientAssertionRejected));
        }
        if status.is_client_error() {
            Err(AuthFailure::rejected(format!(
                "the token endpoint rejected the request ({}){detail}",
                describe_status(status)
            )))
        } else {
            Err(AuthFailure::server_error(format!(
                "the token endpoint answered {}{detail}",
                describe_status(status)
            )))
        }
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`: RFC 6749 §2.3.1 form-encodes both
/// before joining them, so that a `:` in the client id cannot split it.
pub fn basic_authorization(client_id: &str, client_secret: &str) -> Sensitive {
    let joined = format!("{}:{}", form_urlencode(client_id), form_urlencode(client_secret));
    Sensitive::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(joined)))
}

/// application/x-www-form-urlencoded encoding of one value (RFC 6749 Appendix B).
fn form_urlencode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(char::from(byte)),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// What to check when a client assertion is refused, picked from the server's words
/// where they say enough (Keycloak, Entra and Okta say different things).
fn assertion_hint(detail: &str, key: &AssertionKey, iat: i64, exp: i64) -> String {
    let detail = detail.to_ascii_lowercase();
    let signed = format!(
        "the assertion was signed {}, valid from {} to {} by this machine's clock",
        key.describe(),
        crate::time::describe_unix_seconds(iat),
        crate::time::describe_unix_seconds(exp)
    );
    let cause = if ["expired", "not active", "nbf", "clock", "stale", "future", "too old"]
        .iter()
        .any(|word| detail.contains(word))
    {
        "the server considers it expired or not yet valid: its clock and this machine's differ"
    } else if ["kid", "public key", "key id", "no key", "unable to load"]
        .iter()
        .any(|word| detail.contains(word))
    {
        "the server has no public key for this key id: check keyId against the keys registered for the client"
    } else if detail.contains("signature") {
        "the signature does not match the public key the server has for the client: the private key is not the registered one"
    } else {
        "check that the server has this key's public key for the client, under this key id, and that the clocks agree"
    };
    format!("{cause} ({signed})")
}

fn parse_grant(body: &[u8]) -> Result<TokenGrant, AuthFailure> {
    // The body is never quoted: an answer that cannot be parsed may still hold a token.
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Err(AuthFailure::server_error(format!(
            "the token endpoint answered with success but not with JSON ({} bytes; expected an OAuth2 token answer with access_token)",
            body.len()
        )));
    };
    let token = answer
        .get("access_token")
        .and_then(|token| token.as_str())
        .map(str::trim)
        .filter(|token| !token.is_empty());
    let Some(token) = token else {
        return Err(AuthFailure::server_error(
            "the token endpoint answered with success but without an access_token",
        ));
    };
    Ok(TokenGrant {
        access_token: Sensitive::new(token),
        expires_in: answer.get("expires_in").and_then(seconds),
    })
}

/// `expires_in` as a number of seconds, also when a server sends it as a string; anything
/// else counts as absent.
fn seconds(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(number) => number
            .as_u64()
            .or_else(|| number.as_f64().filter(|n| n.is_finite() && *n >= 0.0).map(|n| n as u64)),
        serde_json::Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// ": invalid_client: Invalid client credentials", or "" when the body is not an OAuth2
/// error. Anything that repeats the client id or secret, in any encoding it was sent in, is
/// cut out before the text is shortened (shortening first could leave a prefix behind).
/// The server's error and description, with every value the request carried redacted
/// (the client secret, alone and as a Basic pair, the client id, and a client assertion
/// that a server might echo) before it is cut.
fn oauth_error_detail(body: &[u8], client: &ClientCredentials, assertion: Option<&str>) -> String {
    let Ok(error) = serde_json::from_slice::<OAuthError>(body) else {
        return String::new();
    };
    let text = match (error.error, error.error_description) {
        (Some(code), Some(description)) => format!("{code}: {description}"),
        (Some(code), None) => code,
        (None, Some(description)) => description,
        (None, None) => return String::new(),
    };
    let secret = match &client.proof {
        ClientProof::SecretInBody(secret) | ClientProof::SecretInBasicHeader(secret) => secret.expose(),
        ClientProof::PrivateKeyJwt(_) | ClientProof::WorkloadIdentity(_) => "",
    };
    let basic = format!("{}:{secret}", client.client_id);
    let text = redact(&text, &[secret, &basic, &client.client_id, assertion.unwrap_or_default()]);
    format!(": {}", excerpt(text.as_bytes(), 200))
}

fn unreachable_token_endpoint(error: &TransportError) -> AuthFailure {
    AuthFailure::server_error(format!("the token endpoint could not be used: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientCredentials {
        ClientCredentials::with_secret_in_body("orders", Sensitive::new("s3cr3t-value"))
    }

    #[test]
    fn basic_authorization_form_encodes_id_and_secret_before_base64() {
        // RFC 6749 §2.3.1 with Appendix B: "a b:c" becomes "a+b%3Ac".
        let header = basic_authorization("my client:1", "p@ss w/rd+");
        let encoded = header.expose().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "my+client%3A1:p%40ss+w%2Frd%2B");
        let plain = basic_authorization("orders", "s3cret-._*");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(plain.expose().strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(decoded, b"orders:s3cret-._*");
    }

    #[test]
    fn assertion_hints_follow_the_servers_words() {
        let key = AssertionKey::from_pem(include_str!("../../tests/fixtures/ec-p256-test-key.pem"), Some("k1".into())).unwrap();
        let hint = |detail: &str| assertion_hint(detail, &key, 0, 60);
        assert!(hint(": unauthorized_client: Token is not active").contains("clock"));
        assert!(hint(": invalid_client: Unable to load public key").contains("no public key for this key id"));
        assert!(hint(": unauthorized_client: Signature on JWT token failed validation").contains("not the registered one"));
        let general = hint("");
        assert!(
            general.contains("key id \"k1\"") && general.contains("1970-01-01T00:01:00Z"),
            "{general}"
        );
    }

    #[test]
    fn reads_a_grant_with_expires_in_as_number_or_string() {
        let grant = parse_grant(br#"{"access_token":"abc","expires_in":300,"token_type":"Bearer"}"#).unwrap();
        assert_eq!(grant.access_token.expose(), "abc");
        assert_eq!(grant.expires_in, Some(300));
        assert_eq!(
            parse_grant(br#"{"access_token":"abc","expires_in":"60"}"#).unwrap().expires_in,
            Some(60)
        );
        assert_eq!(parse_grant(br#"{"access_token":"abc"}"#).unwrap().expires_in, None);
    }

    #[test]
    fn a_page_or_json_without_a_token_is_a_server_error_that_names_no_token() {
        let html = parse_grant(b"<html><body>Login</body></html>").unwrap_err();
        assert_eq!(html.kind, super::super::AuthFailureKind::ServerError);
        assert!(html.message.contains("not with JSON"), "{}", html.message);
        let odd = parse_grant(br#"{"access_token":"secret-token-value","expires_in":true}"#).unwrap();
        assert_eq!(odd.expires_in, None);
        let bare = parse_grant(b"secret-token-value").unwrap_err();
        assert!(!bare.message.contains("secret-token-value"), "{}", bare.message);
        let empty = parse_grant(br#"{"token_type":"Bearer"}"#).unwrap_err();
        assert!(empty.message.contains("without an access_token"));
    }

    #[test]
    fn an_echoed_client_assertion_is_redacted() {
        let assertion = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJvcmRlcnMifQ.c2lnbmF0dXJl";
        let body = format!(r#"{{"error":"invalid_client","error_description":"bad assertion {assertion}"}}"#);
        let detail = oauth_error_detail(body.as_bytes(), &client(), Some(assertion));
        assert_eq!(detail, ": invalid_client: bad assertion <redacted>");
    }

    #[test]
    fn oauth_errors_are_reported_without_the_secret() {
        let detail = oauth_error_detail(
            br#"{"error":"invalid_client","error_description":"bad secret s3cr3t-value for orders"}"#,
            &client(),
            None,
        );
        assert_eq!(detail, ": invalid_client: bad secret <redacted> for <redacted>");
        assert_eq!(oauth_error_detail(b"<html>", &client(), None), "");
    }

    #[test]
    fn a_secret_straddling_the_200_character_cut_leaves_no_prefix() {
        let secret = Sensitive::new("s3cr3t-value");
        for offset in 185..200 {
            let description = format!("{}{} was wrong", "x".repeat(offset), secret.expose());
            let body = serde_json::json!({"error": "invalid_client", "error_description": description}).to_string();
            let detail = oauth_error_detail(body.as_bytes(), &client(), None);
            for prefix_length in 3..=secret.expose().len() {
                let prefix = &secret.expose()[..prefix_length];
                assert!(!detail.contains(prefix), "offset {offset}: {prefix:?} in {detail}");
            }
            let description = format!(
                "{}{}",
                "y".repeat(offset),
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("orders:{}", secret.expose()))
            );
            let body = serde_json::json!({"error_description": description}).to_string();
            let detail = oauth_error_detail(body.as_bytes(), &client(), None);
            assert!(!detail.contains("b3JkZXJz"), "offset {offset}: base64 prefix in {detail}");
        }
    }
}
