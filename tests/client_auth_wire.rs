//! The ways a client authenticates, on the wire against the stand-in (which checks them as
//! strictly as Keycloak and Entra do): client_secret_basic, private_key_jwt, OIDC discovery,
//! scope without audience, and HTTP Basic to Tasklist. The same flows against a real
//! Keycloak are in the end-to-end suite (tests/e2e/auth_methods.rs).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use tasklist_operator::camunda::assertion::AssertionKey;
use tasklist_operator::camunda::probe::{Probe, ProbeOutcome};
use tasklist_operator::camunda::token::{ClientCredentials, ClientProof, TokenEndpoint, TokenLocation};
use tasklist_operator::camunda::{AuthFailure, AuthFailureKind, HttpClient, HttpSettings, Sensitive, TlsTrust};
use tasklist_operator::crd::{ProbeSpec, RequestEncoding, TasklistConnection};
use tasklist_operator::credential::Credential;
use tasklist_operator::inputs::{Inputs, SecretSource, read_inputs};
use tasklist_operator::obtain::obtain_credential;
use tasklist_operator::reason::Reason;
use tasklist_operator::time::NEVER;
use testsupport::keys::{EC_KEY_PEM, OTHER_RSA_KEY_PEM, RSA_KEY_PEM, public_jwks};
use testsupport::standin::{EndpointMode, StandinOptions, StandinTasklist, TokenRequestEncoding};

const CLIENT_ID: &str = "orders";
const AUDIENCE: &str = "tasklist.camunda.io";

fn http() -> HttpClient {
    let settings = HttpSettings {
        timeout: Duration::from_secs(5),
        ..HttpSettings::default()
    };
    HttpClient::new(&settings, &TlsTrust::default()).expect("an HTTP client")
}

fn endpoint(location: TokenLocation) -> TokenEndpoint {
    TokenEndpoint {
        location,
        audience: AUDIENCE.to_owned(),
        scope: None,
        encoding: RequestEncoding::Form,
    }
}

fn assertion_client(pem: &str, kid: Option<&str>) -> ClientCredentials {
    ClientCredentials {
        client_id: CLIENT_ID.to_owned(),
        proof: ClientProof::PrivateKeyJwt(AssertionKey::from_pem(pem, kid.map(str::to_owned)).expect("a usable test key")),
    }
}

fn failure<T: std::fmt::Debug>(result: Result<T, AuthFailure>) -> AuthFailure {
    match result {
        Ok(value) => panic!("expected a failure, got {value:?}"),
        Err(failure) => failure,
    }
}

/// No private key line, and no signed JWT, in a message.
fn assert_no_key_material(message: &str) {
    for pem in [EC_KEY_PEM, RSA_KEY_PEM, OTHER_RSA_KEY_PEM] {
        for line in pem.lines().filter(|line| !line.starts_with("-----")) {
            assert!(!message.contains(line), "the message holds key material: {message}");
        }
    }
    assert!(!message.contains("eyJ"), "the message holds a JWT: {message}");
}

async fn standin_with_assertion_client(pem: &str, kid: Option<&str>) -> StandinTasklist {
    let standin = StandinTasklist::start().await.expect("the stand-in starts");
    standin
        .add_assertion_client(CLIENT_ID, &public_jwks(pem, kid).expect("a JWKS"))
        .expect("the stand-in takes the JWKS");
    standin
}

#[tokio::test]
async fn client_secret_basic_form_encodes_the_id_and_secret() {
    let standin = StandinTasklist::start().await.expect("the stand-in starts");
    // Characters that RFC 6749 §2.3.1's form encoding changes: a client that skipped it
    // would send a different secret.
    let (client_id, secret) = ("orders app", "p@ss w/rd+:%");
    standin.add_client(client_id, secret);
    let client = ClientCredentials {
        client_id: client_id.to_owned(),
        proof: ClientProof::SecretInBasicHeader(Sensitive::new(secret)),
    };
    let endpoint = endpoint(TokenLocation::Url(standin.token_url()));
    endpoint.request_token(&http(), &client).await.expect("a token");

    let wrong = ClientCredentials {
        client_id: client_id.to_owned(),
        proof: ClientProof::SecretInBasicHeader(Sensitive::new("p@ss w/rd")),
    };
    let rejected = failure(endpoint.request_token(&http(), &wrong).await);
    assert_eq!(rejected.kind, AuthFailureKind::Rejected);
    assert_eq!(Reason::of_auth_failure(&rejected).as_str(), "CredentialsRejected");
    assert!(!rejected.message.contains("p@ss"), "{}", rejected.message);

    let records = standin.token_requests();
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r.encoding == TokenRequestEncoding::Basic && r.client_id == client_id)
    );
    assert_eq!((records[0].status, records[1].status), (200, 401));
}

#[tokio::test]
async fn private_key_jwt_with_es256_and_a_kid_gets_a_token_with_a_fresh_assertion_each_time() {
    let standin = standin_with_assertion_client(EC_KEY_PEM, Some("orders-key-1")).await;
    let endpoint = endpoint(TokenLocation::Url(standin.token_url()));
    let client = assertion_client(EC_KEY_PEM, Some("orders-key-1"));
    // The stand-in refuses a replayed jti: two tokens prove two different assertions.
    for _ in 0..2 {
        endpoint.request_token(&http(), &client).await.expect("a token");
    }
    let records = standin.token_requests();
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r.encoding == TokenRequestEncoding::Assertion && r.status == 200)
    );
}

#[tokio::test]
async fn private_key_jwt_with_rs256_works_without_a_kid_when_one_key_is_registered() {
    let standin = standin_with_assertion_client(RSA_KEY_PEM, None).await;
    let endpoint = endpoint(TokenLocation::Url(standin.token_url()));
    endpoint
        .request_token(&http(), &assertion_client(RSA_KEY_PEM, None))
        .await
        .expect("a token");
}

#[tokio::test]
async fn a_wrong_key_is_reported_as_a_rejected_assertion_signed_with_another_key() {
    let standin = standin_with_assertion_client(RSA_KEY_PEM, Some("k1")).await;
    let endpoint = endpoint(TokenLocation::Url(standin.token_url()));
    let rejected = failure(
        endpoint
            .request_token(&http(), &assertion_client(OTHER_RSA_KEY_PEM, Some("k1")))
            .await,
    );
    assert_eq!(rejected.kind, AuthFailureKind::Rejected);
    assert_eq!(Reason::of_auth_failure(&rejected).as_str(), "ClientAssertionRejected");
    assert!(
        rejected.message.contains("Signature on JWT token failed validation")
            && rejected.message.contains("the private key is not the registered one"),
        "{}",
        rejected.message
    );
    assert_no_key_material(&rejected.message);
}

#[tokio::test]
async fn a_key_id_the_server_does_not_know_is_reported_as_such() {
    let standin = standin_with_assertion_client(EC_KEY_PEM, Some("k1")).await;
    let endpoint = endpoint(TokenLocation::Url(standin.token_url()));
    let rejected = failure(endpoint.request_token(&http(), &assertion_client(EC_KEY_PEM, Some("k2"))).await);
    assert_eq!(Reason::of_auth_failure(&rejected).as_str(), "ClientAssertionRejected");
    assert!(
        rejected.message.contains("no public key for this key id") && rejected.message.contains(r#"key id "k2""#),
        "{}",
        rejected.message
    );
    assert_no_key_material(&rejected.message);
}

#[tokio::test]
async fn an_assertion_expired_by_the_servers_clock_is_reported_as_clock_skew() {
    let standin = standin_with_assertion_client(EC_KEY_PEM, Some("k1")).await;
    // The assertion lives 60 s; a server 5 minutes ahead sees it expired.
    standin.set_assertion_clock_ahead(Duration::from_secs(300));
    let endpoint = endpoint(TokenLocation::Url(standin.token_url()));
    let rejected = failure(endpoint.request_token(&http(), &assertion_client(EC_KEY_PEM, Some("k1"))).await);
    assert_eq!(Reason::of_auth_failure(&rejected).as_str(), "ClientAssertionRejected");
    assert!(
        rejected.message.contains("Token is not active") && rejected.message.contains("clock"),
        "{}",
        rejected.message
    );
    standin.set_assertion_clock_ahead(Duration::ZERO);
    endpoint
        .request_token(&http(), &assertion_client(EC_KEY_PEM, Some("k1")))
        .await
        .expect("a token once the clocks agree");
}

#[tokio::test]
async fn the_discovered_token_endpoint_is_cached_and_read_again_after_a_failure() {
    let standin = StandinTasklist::start().await.expect("the stand-in starts");
    standin.add_client(CLIENT_ID, "s3cret");
    let endpoint = endpoint(TokenLocation::Issuer(standin.issuer()));
    let client = ClientCredentials::with_secret_in_body(CLIENT_ID, Sensitive::new("s3cret"));
    // One client: what it discovers serves its next requests.
    let http = http();
    endpoint.request_token(&http, &client).await.expect("a token");
    endpoint.request_token(&http, &client).await.expect("a token");
    assert_eq!(standin.discovery_requests(), 1, "the token endpoint is discovered once");
    assert!(endpoint.location.describe(&http).contains(&standin.token_url()));

    standin.set_token_endpoint(EndpointMode::Down);
    let down = failure(endpoint.request_token(&http, &client).await);
    assert_eq!(Reason::of_auth_failure(&down).as_str(), "AuthServerError");
    assert!(
        down.message.contains(&format!("discovered from issuer {}", standin.issuer())),
        "{}",
        down.message
    );
    standin.set_token_endpoint(EndpointMode::Normal);
    endpoint.request_token(&http, &client).await.expect("a token");
    assert_eq!(standin.discovery_requests(), 2, "a failed request forgets the discovered endpoint");
    assert_eq!(standin.token_requests().len(), 4);
}

#[tokio::test]
async fn an_issuer_without_discovery_is_reported_as_discovery_failed() {
    let standin = StandinTasklist::start().await.expect("the stand-in starts");
    standin.add_client(CLIENT_ID, "s3cret");
    let client = ClientCredentials::with_secret_in_body(CLIENT_ID, Sensitive::new("s3cret"));

    standin.set_discovery(EndpointMode::Reject);
    let issuer = format!("{}/no-such-realm", standin.issuer());
    let not_found = failure(
        endpoint(TokenLocation::Issuer(issuer.clone()))
            .request_token(&http(), &client)
            .await,
    );
    assert_eq!(Reason::of_auth_failure(&not_found).as_str(), "DiscoveryFailed");
    assert_eq!(not_found.kind, AuthFailureKind::Rejected);
    assert!(
        not_found.message.contains(&format!("{issuer}/.well-known/openid-configuration")) && not_found.message.contains("404"),
        "{}",
        not_found.message
    );

    standin.set_discovery(EndpointMode::Normal);
    standin.set_refusing_connections(true).await.expect("the stand-in stops listening");
    let refused = failure(
        endpoint(TokenLocation::Issuer(standin.issuer()))
            .request_token(&http(), &client)
            .await,
    );
    assert_eq!(Reason::of_auth_failure(&refused).as_str(), "DiscoveryFailed");
    assert_eq!(refused.kind, AuthFailureKind::ServerError);
    assert!(standin.token_requests().is_empty());
}

#[tokio::test]
async fn scope_without_audience_is_what_an_entra_style_endpoint_accepts() {
    let options = StandinOptions {
        audience: String::new(),
        ..StandinOptions::default()
    };
    let standin = StandinTasklist::start_with(options).await.expect("the stand-in starts");
    standin.add_client(CLIENT_ID, "s3cret");
    let client = ClientCredentials::with_secret_in_body(CLIENT_ID, Sensitive::new("s3cret"));
    let entra = TokenEndpoint {
        location: TokenLocation::Url(standin.token_url()),
        audience: String::new(),
        scope: Some("api://tasklist-app/.default".to_owned()),
        encoding: RequestEncoding::Form,
    };
    entra.request_token(&http(), &client).await.expect("a token");
    let with_audience = TokenEndpoint {
        audience: AUDIENCE.to_owned(),
        ..entra.clone()
    };
    let refused = failure(with_audience.request_token(&http(), &client).await);
    assert!(
        refused.message.contains("'audience' request parameter is not supported"),
        "{}",
        refused.message
    );
    let records = standin.token_requests();
    assert_eq!(records.len(), 2);
    assert_eq!((records[0].audience.as_str(), records[0].status), ("", 200));
    assert_eq!(records[0].scope.as_deref(), Some("api://tasklist-app/.default"));
    assert_eq!(records[1].status, 400);
}

/// Secrets handed to `read_inputs`, as the API server would.
struct Secrets(BTreeMap<String, Secret>);

impl SecretSource for Secrets {
    async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        Ok(self.0.get(name).cloned())
    }
}

fn secrets(list: &[(&str, &[(&str, &str)])]) -> Secrets {
    Secrets(
        list.iter()
            .map(|(name, data)| {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        uid: Some(format!("uid-{name}")),
                        resource_version: Some("1".into()),
                        ..ObjectMeta::default()
                    },
                    data: Some(
                        data.iter()
                            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                            .collect(),
                    ),
                    ..Secret::default()
                };
                (name.to_string(), secret)
            })
            .collect(),
    )
}

async fn inputs(spec: serde_json::Value, source: &Secrets) -> Inputs {
    let connection = TasklistConnection::new("orders", serde_json::from_value(spec).expect("a valid spec"));
    read_inputs(&connection, source)
        .await
        .expect("no API error")
        .expect("usable inputs")
}

#[tokio::test]
async fn basic_auth_stores_a_header_that_never_expires_and_tasklist_checks_it() {
    let standin = StandinTasklist::start().await.expect("the stand-in starts");
    standin.accept_basic("demo", "pa:ss wörd");
    let spec = serde_json::json!({
        "url": standin.url(),
        "auth": {"basic": {"credentialsSecretRef": {"name": "login"}}},
        "probe": {"method": "GET", "path": "/v2/topology"},
    });
    let good = secrets(&[("login", &[("username", "demo"), ("password", "pa:ss wörd")])]);
    let stored = obtain_credential(&inputs(spec.clone(), &good).await, &http())
        .await
        .expect("a credential");
    assert_eq!((stored.expires_at, stored.refresh_at), (NEVER, NEVER));
    let Credential::Basic(header) = &stored.credential else {
        panic!("an Authorization header expected")
    };
    assert!(header.expose().starts_with("Basic "));
    let probe = Probe::new(
        &standin.url(),
        &serde_json::from_value::<ProbeSpec>(spec["probe"].clone()).expect("a probe"),
        http().facts(),
    );
    assert_eq!(
        probe.run(&http(), stored.credential.as_probe_credential()).await,
        ProbeOutcome::Succeeded
    );
    // An application using the derived Secret gets in too.
    assert_eq!(
        standin
            .call_api_with_secret(&stored.secret_data(&standin.url()))
            .await
            .expect("a call"),
        200
    );

    let wrong = secrets(&[("login", &[("username", "demo"), ("password", "wrong")])]);
    let stored = obtain_credential(&inputs(spec, &wrong).await, &http()).await.expect("a credential");
    let outcome = probe.run(&http(), stored.credential.as_probe_credential()).await;
    assert_eq!(outcome, ProbeOutcome::Unauthorized { status: 401 });
    let api = standin.api_requests();
    assert_eq!(api.len(), 3);
    assert!(api.iter().all(|r| r.auth == testsupport::standin::AuthKind::Basic));
}

#[tokio::test]
async fn a_private_key_that_does_not_parse_is_an_input_problem_that_quotes_nothing() {
    let spec = serde_json::json!({
        "url": "http://127.0.0.1:1",
        "auth": {"oauth2": {
            "tokenUrl": "http://127.0.0.1:1/token",
            "clientAuthentication": "PrivateKeyJwt",
            "clientSecretRef": {"name": "client"},
            "clientAssertionKeyRef": {"name": "client", "key": "key.pem", "keyId": "k1"},
        }},
    });
    let connection = TasklistConnection::new("orders", serde_json::from_value(spec).expect("a valid spec"));
    let truncated = &RSA_KEY_PEM[..RSA_KEY_PEM.len() / 2];
    let source = secrets(&[("client", &[("client_id", CLIENT_ID), ("key.pem", truncated)])]);
    let problem = read_inputs(&connection, &source)
        .await
        .expect("no API error")
        .expect_err("an input problem");
    assert_eq!(problem.reason.as_str(), "InvalidClientKey");
    assert!(problem.message.contains(r#"Secret "client" key "key.pem""#), "{}", problem.message);
    assert_no_key_material(&problem.message);
}

#[tokio::test]
async fn a_private_key_jwt_connection_needs_no_client_secret() {
    let standin = standin_with_assertion_client(EC_KEY_PEM, Some("k1")).await;
    let spec = serde_json::json!({
        "url": standin.url(),
        "auth": {"oauth2": {
            "issuerUrl": standin.issuer(),
            "clientAuthentication": "PrivateKeyJwt",
            "clientSecretRef": {"name": "client"},
            "clientAssertionKeyRef": {"name": "client-key", "keyId": "k1"},
        }},
    });
    let source = secrets(&[
        ("client", &[("client_id", CLIENT_ID)]),
        ("client-key", &[("private_key.pem", EC_KEY_PEM)]),
    ]);
    let stored = obtain_credential(&inputs(spec, &source).await, &http()).await.expect("a token");
    assert!(matches!(stored.credential, Credential::Bearer(_)));
    assert!(stored.expires_at > stored.issued_at && stored.expires_at != NEVER);
}

#[tokio::test]
async fn entra_style_scope_certificate_thumbprint_and_discovery_work_together() {
    use testsupport::keys::{RSA_CERTIFICATE_PEM, RSA_CERTIFICATE_X5T, public_jwks_with_x5t};
    // Entra's ways: no audience parameter, a /.default scope, the key found by x5t.
    let options = StandinOptions {
        audience: String::new(),
        ..StandinOptions::default()
    };
    let standin = StandinTasklist::start_with(options).await.expect("the stand-in starts");
    let jwks = public_jwks_with_x5t(RSA_KEY_PEM, None, Some(RSA_CERTIFICATE_X5T)).expect("a JWKS");
    // A second key, so that "the only key" cannot stand in for finding it by x5t.
    let other = public_jwks(OTHER_RSA_KEY_PEM, Some("other")).expect("a JWKS");
    let mut both = jwks;
    both["keys"].as_array_mut().expect("keys").push(other["keys"][0].clone());
    standin.add_assertion_client(CLIENT_ID, &both).expect("the stand-in takes the JWKS");

    let spec = |certificate_key: Option<&str>| {
        let mut key_ref = serde_json::json!({"name": "client", "key": "private_key.pem"});
        if let Some(certificate_key) = certificate_key {
            key_ref["certificateKey"] = serde_json::json!(certificate_key);
        }
        serde_json::json!({
            "url": standin.url(),
            "auth": {"oauth2": {
                "issuerUrl": standin.issuer(),
                "audience": "",
                "scope": "api://tasklist-app/.default",
                "clientAuthentication": "PrivateKeyJwt",
                "clientSecretRef": {"name": "client"},
                "clientAssertionKeyRef": key_ref,
            }},
        })
    };
    let source = secrets(&[(
        "client",
        &[
            ("client_id", CLIENT_ID),
            ("private_key.pem", RSA_KEY_PEM),
            ("certificate.pem", RSA_CERTIFICATE_PEM),
        ],
    )]);
    let stored = obtain_credential(&inputs(spec(Some("certificate.pem")), &source).await, &http())
        .await
        .expect("a token");
    assert!(matches!(stored.credential, Credential::Bearer(_)));
    // Without the certificate the server cannot tell which key signed.
    let rejected = failure(obtain_credential(&inputs(spec(None), &source).await, &http()).await);
    assert_eq!(Reason::of_auth_failure(&rejected).as_str(), "ClientAssertionRejected");
    let records = standin.token_requests();
    assert_eq!(records.len(), 2);
    assert_eq!((records[0].audience.as_str(), records[0].status), ("", 200));
    assert_eq!(records[0].scope.as_deref(), Some("api://tasklist-app/.default"));
    assert_eq!(records[1].status, 401);
}

/// The token endpoint an issuer's discovery document names is checked against the
/// administrator's policy like the connection's own URLs, before anything is sent there:
/// an issuer must not be a way around `--allowed-hosts`. The endpoint is a literal IP
/// (127.0.0.2, loopback but outside the allowed 127.0.0.1/32), which no DNS resolver hook
/// would ever see; a listener there counts the connections it gets: none.
#[tokio::test]
async fn a_discovered_token_endpoint_outside_the_allowed_hosts_gets_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tasklist_operator::policy::{HostPolicy, PolicyArgs};

    let elsewhere = tokio::net::TcpListener::bind("127.0.0.2:0").await.expect("a listener on 127.0.0.2");
    let elsewhere_port = elsewhere.local_addr().expect("its address").port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while elsewhere.accept().await.is_ok() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });

    let issuer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener");
    let issuer = format!("http://{}", issuer_listener.local_addr().expect("its address"));
    let document = serde_json::json!({
        "issuer": issuer,
        "token_endpoint": format!("http://127.0.0.2:{elsewhere_port}/oauth/token"),
    });
    let app = axum::Router::new().route(
        "/.well-known/openid-configuration",
        axum::routing::get(move || async move { axum::Json(document) }),
    );
    tokio::spawn(async move { axum::serve(issuer_listener, app).await });

    let args = PolicyArgs {
        allowed_hosts: vec!["127.0.0.1/32".into()],
        allow_loopback: true,
        allow_http: true,
        ..PolicyArgs::default()
    };
    let policy = HostPolicy::from_args(&args).expect("a valid policy");
    let settings = HttpSettings {
        timeout: Duration::from_secs(5),
        policy: Some(Arc::new(policy)),
        ..HttpSettings::default()
    };
    let http = HttpClient::new(&settings, &TlsTrust::default()).expect("an HTTP client");
    let client = ClientCredentials::with_secret_in_body(CLIENT_ID, Sensitive::new("s3cret-elsewhere"));
    let refused = failure(endpoint(TokenLocation::Issuer(issuer)).request_token(&http, &client).await);
    assert_eq!(Reason::of_auth_failure(&refused).as_str(), "DiscoveryFailed", "{}", refused.message);
    assert_eq!(refused.kind, AuthFailureKind::Rejected);
    assert!(refused.message.contains("127.0.0.2"), "{}", refused.message);
    assert!(!refused.message.contains("s3cret-elsewhere"), "{}", refused.message);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the token endpoint outside the policy was contacted"
    );
}

/// What one connection's TLS trust discovered is never used under another's: a connection
/// that skips certificate checks (and so reads whatever answers at the issuer's address)
/// must not decide where another connection, which verifies, sends its secret. The issuer
/// answers its document once; the insecure client reads it; the verifying client must read
/// it again (and fail), not send its secret to the endpoint the insecure client was told.
#[tokio::test]
async fn a_discovered_endpoint_is_not_shared_between_trusts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let token_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener");
    let token_port = token_listener.local_addr().expect("its address").port();
    let token_connections = Arc::new(AtomicUsize::new(0));
    let counted = token_connections.clone();
    tokio::spawn(async move {
        while token_listener.accept().await.is_ok() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let issuer_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener");
    let issuer = format!("http://{}/trust-test", issuer_listener.local_addr().expect("its address"));
    let document = serde_json::json!({"issuer": issuer, "token_endpoint": format!("http://127.0.0.1:{token_port}/oauth/token")});
    let answered = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/trust-test/.well-known/openid-configuration",
        axum::routing::get(move || {
            let (answered, document) = (answered.clone(), document.clone());
            async move {
                if answered.fetch_add(1, Ordering::SeqCst) == 0 {
                    Ok(axum::Json(document))
                } else {
                    Err(axum::http::StatusCode::SERVICE_UNAVAILABLE)
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(issuer_listener, app).await });

    let settings = HttpSettings {
        timeout: Duration::from_secs(5),
        ..HttpSettings::default()
    };
    let insecure = HttpClient::new(
        &settings,
        &TlsTrust {
            insecure_skip_verify: true,
            ..TlsTrust::default()
        },
    )
    .expect("a client");
    let verifying = HttpClient::new(&settings, &TlsTrust::default()).expect("a client");
    let endpoint = endpoint(TokenLocation::Issuer(issuer));
    endpoint
        .resolve(&insecure)
        .await
        .expect("the insecure client discovers the endpoint");
    let client = ClientCredentials::with_secret_in_body(CLIENT_ID, Sensitive::new("s3cret-of-the-verifying-tenant"));
    let refused = failure(endpoint.request_token(&verifying, &client).await);
    assert_eq!(Reason::of_auth_failure(&refused).as_str(), "DiscoveryFailed", "{}", refused.message);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        token_connections.load(Ordering::SeqCst),
        0,
        "the verifying client used the endpoint discovered under another trust"
    );
}

/// A workload identity that hands out tokens it signs itself with the test EC key, as a
/// cluster's ServiceAccount issuer would: `iss` ISSUER, `sub` the given subject, `aud` the
/// given audience, valid for 10 minutes. Counts the tokens handed out.
#[derive(Debug)]
struct TestCluster {
    subject: String,
    audience: String,
    handed_out: std::sync::atomic::AtomicUsize,
}

const ISSUER: &str = "https://cluster.example";

impl tasklist_operator::camunda::workload::WorkloadIdentity for TestCluster {
    fn token(&self) -> futures::future::BoxFuture<'_, Result<Sensitive, AuthFailure>> {
        // Each token has its own id, as Kubernetes gives one (`jti`).
        let number = self.handed_out.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let claims = serde_json::json!({"iss": ISSUER, "sub": self.subject, "aud": [self.audience], "iat": now, "exp": now + 600, "jti": format!("token-{number}")});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("cluster-1".into());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(EC_KEY_PEM.as_bytes()).expect("the test key");
        let token = jsonwebtoken::encode(&header, &claims, &key).expect("a signed token");
        Box::pin(async move { Ok(Sensitive::new(token)) })
    }

    fn describe(&self) -> String {
        format!("a token of {} for audience {:?}", self.subject, self.audience)
    }

    fn identity(&self) -> String {
        format!("{}/{}", self.subject, self.audience)
    }
}

fn workload_client(client_id: &str, subject: &str, audience: &str) -> (ClientCredentials, std::sync::Arc<TestCluster>) {
    let cluster = std::sync::Arc::new(TestCluster {
        subject: subject.to_owned(),
        audience: audience.to_owned(),
        handed_out: std::sync::atomic::AtomicUsize::new(0),
    });
    let client = ClientCredentials {
        client_id: client_id.to_owned(),
        proof: ClientProof::WorkloadIdentity(cluster.clone()),
    };
    (client, cluster)
}

/// Entra's workload identity federation at the Entra-shaped stand-in: the workload's token
/// goes as `client_assertion` with `client_id` = the app id and no secret; a new token for
/// every request; another subject, audience or issuer is refused with Entra's code and a
/// hint naming the token's claims, and no message holds the token.
#[tokio::test]
async fn a_workload_token_is_the_client_assertion_at_an_entra_shaped_endpoint() {
    let options = StandinOptions {
        audience: String::new(),
        ..StandinOptions::default()
    };
    let standin = StandinTasklist::start_with(options).await.expect("the stand-in starts");
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(public_jwks(EC_KEY_PEM, Some("cluster-1")).expect("a JWKS")).expect("a JwkSet");
    let credential = |issuer: &str| testsupport::standin::FederatedCredential {
        issuer: issuer.to_owned(),
        subject: "system:serviceaccount:team-a:orders-bot".to_owned(),
        audience: "api://AzureADTokenExchange".to_owned(),
        jwks: jwks.clone(),
    };
    standin.add_federated_client("app-1", credential(ISSUER));
    standin.add_federated_client("app-2", credential("https://another-cluster.example"));
    let entra = TokenEndpoint {
        location: TokenLocation::Url(standin.token_url()),
        audience: String::new(),
        scope: Some("api://tasklist/.default".to_owned()),
        encoding: RequestEncoding::Form,
    };
    let (client, cluster) = workload_client("app-1", "system:serviceaccount:team-a:orders-bot", "api://AzureADTokenExchange");
    entra.request_token(&http(), &client).await.expect("a token");
    entra.request_token(&http(), &client).await.expect("a second token");
    assert_eq!(cluster.handed_out.load(std::sync::atomic::Ordering::SeqCst), 2);
    let received = standin.federated_assertions_received();
    assert_eq!(received.len(), 2);
    assert_ne!(received[0], received[1], "a workload token was sent twice");
    let request = &standin.token_requests()[0];
    assert_eq!(
        (request.client_id.as_str(), request.encoding),
        ("app-1", TokenRequestEncoding::Assertion)
    );

    let cases = [
        (
            "app-1",
            "system:serviceaccount:team-a:reports-bot",
            "api://AzureADTokenExchange",
            "AADSTS70021:",
            "no client is bound",
        ),
        (
            "app-1",
            "system:serviceaccount:team-a:orders-bot",
            "api://Other",
            "AADSTS700212",
            "expects another audience",
        ),
        (
            "app-2",
            "system:serviceaccount:team-a:orders-bot",
            "api://AzureADTokenExchange",
            "AADSTS700211",
            "does not trust the token's issuer",
        ),
    ];
    for (app, subject, audience, code, hint) in cases {
        let (client, _) = workload_client(app, subject, audience);
        let refused = failure(entra.request_token(&http(), &client).await);
        assert_eq!(
            Reason::of_auth_failure(&refused),
            Reason::ClientAssertionRejected,
            "{}",
            refused.message
        );
        assert!(
            refused.message.contains(code) && refused.message.contains(hint),
            "{}",
            refused.message
        );
        assert!(
            refused.message.contains(subject),
            "the hint names the token's subject: {}",
            refused.message
        );
        assert_no_key_material(&refused.message);
    }
}
