//! Tests of the stand-in Tasklist, driven over HTTP the way the operator and applications
//! use it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE};
use serde_json::{Value, json};
use testsupport::standin::{AuthKind, EndpointMode, StandinOptions, StandinTasklist, TasklistApis, TokenAnswer, TokenRequestEncoding};

const CLIENT_ID: &str = "orders-app";
const CLIENT_SECRET: &str = "very-secret-value";
const USERNAME: &str = "demo";
const PASSWORD: &str = "demo-password";

async fn standin() -> StandinTasklist {
    standin_with(StandinOptions::default()).await
}

async fn standin_with(options: StandinOptions) -> StandinTasklist {
    let standin = StandinTasklist::start_with(options).await.unwrap();
    standin.add_client(CLIENT_ID, CLIENT_SECRET);
    standin.add_user(USERNAME, PASSWORD);
    standin
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

fn credentials_form() -> [(&'static str, &'static str); 4] {
    [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("audience", "tasklist.camunda.io"),
    ]
}

async fn request_token_form(standin: &StandinTasklist) -> reqwest::Response {
    client().post(standin.token_url()).form(&credentials_form()).send().await.unwrap()
}

async fn fetch_token(standin: &StandinTasklist) -> String {
    let response = request_token_form(standin).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The claims of a JWT, read without verifying it (as a client reads `exp`).
fn jwt_claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts: {token}");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

async fn search_with_bearer(standin: &StandinTasklist, token: &str) -> StatusCode {
    client()
        .post(format!("{}/v1/tasks/search", standin.url()))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .json(&json!({ "pageSize": 1 }))
        .send()
        .await
        .unwrap()
        .status()
}

/// A logged-in session: the `Cookie` header value and the CSRF token from the header.
struct Login {
    cookie: String,
    csrf_token: Option<String>,
}

async fn login(standin: &StandinTasklist) -> Login {
    let response = client()
        .post(format!("{}/api/login", standin.url()))
        .form(&[("username", USERNAME), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let cookie = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|value| {
            let value = value.to_str().unwrap();
            value.split(';').next().unwrap().to_owned()
        })
        .collect::<Vec<_>>()
        .join("; ");
    let csrf_token = response
        .headers()
        .get(standin.options().csrf_name())
        .map(|value| value.to_str().unwrap().to_owned());
    Login { cookie, csrf_token }
}

async fn search_with_cookie(standin: &StandinTasklist, cookie: &str, csrf_header: Option<(&str, &str)>) -> reqwest::Response {
    let mut request = client()
        .post(format!("{}/v1/tasks/search", standin.url()))
        .header(COOKIE, cookie)
        .json(&json!({ "pageSize": 1 }));
    if let Some((name, value)) = csrf_header {
        request = request.header(name, value);
    }
    request.send().await.unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn token_request_as_form_json_and_basic() {
    let standin = standin().await;

    let response = request_token_form(&standin).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    let claims = jwt_claims(body["access_token"].as_str().unwrap());
    assert_eq!(claims["iss"], standin.url());
    assert_eq!(claims["aud"], "tasklist.camunda.io");
    assert_eq!(claims["sub"], CLIENT_ID);
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 300);
    assert!(claims["jti"].is_string());

    let response = client()
        .post(standin.token_url())
        .json(&json!({
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "audience": "tasklist.camunda.io",
            "scope": "tasks",
        }))
        .send()
        .await
        .unwrap();
    // Only scopes the server knows are granted (Keycloak's `invalid_scope`).
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_scope");
    standin.add_scope("tasks");
    let response = client()
        .post(standin.token_url())
        .json(&json!({
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "audience": "tasklist.camunda.io",
            "scope": "tasks",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["scope"], "tasks");

    let response = client()
        .post(standin.token_url())
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials"), ("audience", "tasklist.camunda.io")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let records = standin.token_requests();
    let encodings: Vec<_> = records.iter().map(|record| record.encoding).collect();
    assert_eq!(
        encodings,
        [
            TokenRequestEncoding::Form,
            TokenRequestEncoding::Json,
            TokenRequestEncoding::Json,
            TokenRequestEncoding::Basic
        ]
    );
    assert!(
        records
            .iter()
            .all(|record| record.client_id == CLIENT_ID && record.audience == "tasklist.camunda.io")
    );
    let statuses: Vec<u16> = records.iter().map(|record| record.status).collect();
    assert_eq!(
        statuses,
        [200, 400, 200, 200],
        "the unknown scope is refused, then granted once added"
    );
    assert_eq!(records[0].scope, None);
    assert_eq!(records[2].scope.as_deref(), Some("tasks"));
}

#[tokio::test]
async fn token_request_errors() {
    let standin = standin().await;
    let post_form = |form: Vec<(&'static str, &'static str)>| client().post(standin.token_url()).form(&form).send();

    let response = post_form(vec![
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", "wrong-secret"),
        ("audience", "tasklist.camunda.io"),
    ])
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body = response.text().await.unwrap();
    assert!(!body.contains("wrong-secret"), "secret echoed: {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "invalid_client");

    let response = post_form(vec![
        ("grant_type", "client_credentials"),
        ("client_id", "unknown"),
        ("client_secret", CLIENT_SECRET),
        ("audience", "tasklist.camunda.io"),
    ])
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let response = post_form(vec![
        ("grant_type", "password"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("audience", "tasklist.camunda.io"),
    ])
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unsupported_grant_type");

    let response = post_form(vec![
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("audience", "operate.camunda.io"),
    ])
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let statuses: Vec<u16> = standin.token_requests().iter().map(|record| record.status).collect();
    assert_eq!(statuses, [401, 401, 400, 400]);
}

#[tokio::test]
async fn api_accepts_issued_tokens_and_rejects_others() {
    let standin = standin().await;
    let token = fetch_token(&standin).await;

    let response = client()
        .post(format!("{}/v1/tasks/search", standin.url()))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .json(&json!({ "pageSize": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), json!([]));

    // On SaaS the v2 (Orchestration) API wants the audience zeebe.camunda.io.
    let topology = |token: String| client().get(format!("{}/v2/topology", standin.url())).bearer_auth(token).send();
    assert_eq!(topology(token.clone()).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let mut zeebe_form = credentials_form();
    zeebe_form[3] = ("audience", "zeebe.camunda.io");
    let response = client().post(standin.token_url()).form(&zeebe_form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let zeebe_token = response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    let response = topology(zeebe_token.clone()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({}));
    // ... and v1 a Tasklist audience.
    assert_eq!(search_with_bearer(&standin, &zeebe_token).await, StatusCode::UNAUTHORIZED);

    assert_eq!(search_with_bearer(&standin, "garbage").await, StatusCode::UNAUTHORIZED);
    // Same header and claims, someone else's signature.
    let (signed, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode([7u8; 64]));
    assert_eq!(search_with_bearer(&standin, &forged).await, StatusCode::UNAUTHORIZED);
    let response = client()
        .post(format!("{}/v1/tasks/search", standin.url()))
        .json(&json!({ "pageSize": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let records: Vec<_> = standin
        .api_requests()
        .into_iter()
        .map(|record| (record.method, record.path, record.auth, record.status))
        .collect();
    let search = "/v1/tasks/search".to_owned();
    assert_eq!(
        records,
        [
            ("POST".to_owned(), search.clone(), AuthKind::Bearer, 200),
            ("GET".to_owned(), "/v2/topology".to_owned(), AuthKind::Bearer, 401),
            ("GET".to_owned(), "/v2/topology".to_owned(), AuthKind::Bearer, 200),
            ("POST".to_owned(), search.clone(), AuthKind::Bearer, 401),
            ("POST".to_owned(), search.clone(), AuthKind::Bearer, 401),
            ("POST".to_owned(), search.clone(), AuthKind::Bearer, 401),
            ("POST".to_owned(), search, AuthKind::None, 401),
        ]
    );
}

#[tokio::test]
async fn revoked_and_expired_tokens_get_401() {
    let standin = standin().await;
    let token = fetch_token(&standin).await;
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::OK);

    standin.revoke_tokens();
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::UNAUTHORIZED);
    let fresh = fetch_token(&standin).await;
    assert_eq!(search_with_bearer(&standin, &fresh).await, StatusCode::OK);

    // `exp` = `iat`: expired as soon as the next second starts.
    standin.set_token_lifetime(Duration::ZERO);
    let expiring = fetch_token(&standin).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(search_with_bearer(&standin, &expiring).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn token_answers_and_expires_in_override() {
    let standin = standin().await;

    standin.set_token_lifetime(Duration::from_secs(600));
    standin.set_expires_in_override(Some(42));
    let body: Value = request_token_form(&standin).await.json().await.unwrap();
    assert_eq!(body["expires_in"], 42);
    let claims = jwt_claims(body["access_token"].as_str().unwrap());
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 600);
    standin.set_expires_in_override(None);

    standin.set_token_answer(TokenAnswer::OpaqueWithExpiresIn);
    let body: Value = request_token_form(&standin).await.json().await.unwrap();
    let opaque = body["access_token"].as_str().unwrap();
    assert!(!opaque.contains('.'));
    assert_eq!(body["expires_in"], 600);
    assert_eq!(search_with_bearer(&standin, opaque).await, StatusCode::OK);

    standin.set_token_answer(TokenAnswer::OpaqueWithoutExpiresIn);
    let body: Value = request_token_form(&standin).await.json().await.unwrap();
    assert!(body["access_token"].is_string());
    assert!(body.get("expires_in").is_none());

    standin.set_token_answer(TokenAnswer::Html200);
    let response = request_token_form(&standin).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));

    standin.set_token_answer(TokenAnswer::JsonWithoutAccessToken);
    let body: Value = request_token_form(&standin).await.json().await.unwrap();
    assert!(body.get("access_token").is_none());

    standin.set_token_answer(TokenAnswer::Huge);
    let response = request_token_form(&standin).await;
    // Chunked, without a Content-Length: only a client that counts what it reads refuses it.
    assert!(response.headers().get(reqwest::header::CONTENT_LENGTH).is_none());
    assert_eq!(response.headers()[reqwest::header::TRANSFER_ENCODING], "chunked");
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).expect("valid JSON");
    assert!(body["padding"].as_str().unwrap().len() >= 10 * 1024 * 1024);
    assert!(body["access_token"].is_string());

    standin.set_token_answer(TokenAnswer::Keycloak400ForJson);
    let response = client()
        .post(standin.token_url())
        .json(&json!({
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "audience": "tasklist.camunda.io",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(body["error_description"], "Missing form parameter: grant_type");
    assert_eq!(request_token_form(&standin).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn cookie_login_with_csrf() {
    let standin = standin().await;
    let session = login(&standin).await;
    let csrf_token = session.csrf_token.clone().expect("CSRF token header");
    assert!(session.cookie.contains("TASKLIST-SESSION="));
    assert!(session.cookie.contains(&format!("X-CSRF-TOKEN={csrf_token}")));

    let response = search_with_cookie(&standin, &session.cookie, None).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "Access denied due to invalid CSRF token.");
    let wrong = search_with_cookie(&standin, &session.cookie, Some(("X-CSRF-TOKEN", "not-the-token"))).await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let right = search_with_cookie(&standin, &session.cookie, Some(("X-CSRF-TOKEN", &csrf_token))).await;
    assert_eq!(right.status(), StatusCode::OK);

    // Reading needs no CSRF token.
    let response = client()
        .get(format!("{}/v2/topology", standin.url()))
        .header(COOKIE, &session.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The query string works as well, as in Tasklist's documentation.
    let response = client()
        .post(format!("{}/api/login?username={USERNAME}&password={PASSWORD}", standin.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let response = client()
        .post(format!("{}/api/login", standin.url()))
        .form(&[("username", USERNAME), ("password", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert!(body["message"].is_string());

    let logins: Vec<_> = standin
        .logins()
        .into_iter()
        .map(|record| (record.username, record.status))
        .collect();
    assert_eq!(
        logins,
        [(USERNAME.to_owned(), 204), (USERNAME.to_owned(), 204), (USERNAME.to_owned(), 401)]
    );
    assert!(standin.api_requests().iter().all(|record| record.auth == AuthKind::Cookie));
}

#[tokio::test]
async fn cookie_login_without_csrf_and_with_legacy_name() {
    let standin = standin_with(StandinOptions {
        csrf: false,
        ..StandinOptions::default()
    })
    .await;
    let session = login(&standin).await;
    assert_eq!(session.csrf_token, None);
    assert!(!session.cookie.contains("CSRF"));
    let response = search_with_cookie(&standin, &session.cookie, None).await;
    assert_eq!(response.status(), StatusCode::OK);

    let legacy = standin_with(StandinOptions {
        legacy_csrf_name: true,
        ..StandinOptions::default()
    })
    .await;
    let session = login(&legacy).await;
    let csrf_token = session.csrf_token.expect("legacy CSRF header");
    assert!(session.cookie.contains(&format!("TASKLIST-X-CSRF-TOKEN={csrf_token}")));
    let response = search_with_cookie(&legacy, &session.cookie, Some(("TASKLIST-X-CSRF-TOKEN", &csrf_token))).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn sessions_end_on_revocation_logout_and_timeout() {
    let standin = standin().await;
    let session = login(&standin).await;
    let csrf = session.csrf_token.clone().unwrap();
    let csrf_header = Some(("X-CSRF-TOKEN", csrf.as_str()));
    assert_eq!(
        search_with_cookie(&standin, &session.cookie, csrf_header).await.status(),
        StatusCode::OK
    );
    standin.revoke_sessions();
    assert_eq!(
        search_with_cookie(&standin, &session.cookie, csrf_header).await.status(),
        StatusCode::UNAUTHORIZED
    );

    let session = login(&standin).await;
    let response = client()
        .post(format!("{}/api/logout", standin.url()))
        .header(COOKIE, &session.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let csrf = session.csrf_token.clone().unwrap();
    assert_eq!(
        search_with_cookie(&standin, &session.cookie, Some(("X-CSRF-TOKEN", &csrf)))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );

    // An idle timeout: each request keeps the session alive, a pause longer than the
    // timeout ends it.
    standin.set_session_timeout(Some(Duration::from_millis(600)));
    let session = login(&standin).await;
    let csrf = session.csrf_token.clone().unwrap();
    let csrf_header = Some(("X-CSRF-TOKEN", csrf.as_str()));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            search_with_cookie(&standin, &session.cookie, csrf_header).await.status(),
            StatusCode::OK,
            "a session in use must not time out"
        );
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        search_with_cookie(&standin, &session.cookie, csrf_header).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn endpoint_modes() {
    let standin = standin().await;
    let token = fetch_token(&standin).await;

    standin.set_token_endpoint(EndpointMode::Down);
    standin.set_login_endpoint(EndpointMode::Down);
    standin.set_api(EndpointMode::Down);
    assert_eq!(request_token_form(&standin).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    let response = client()
        .post(format!("{}/api/login", standin.url()))
        .form(&[("username", USERNAME), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::SERVICE_UNAVAILABLE);

    standin.set_token_endpoint(EndpointMode::Reject);
    standin.set_api(EndpointMode::Reject);
    let response = request_token_form(&standin).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::UNAUTHORIZED);

    standin.set_api(EndpointMode::Slow(Duration::from_millis(300)));
    let started = std::time::Instant::now();
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));

    standin.set_api(EndpointMode::Normal);
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::OK);
}

#[tokio::test]
async fn call_api_with_secret_like_an_application() {
    let standin = standin().await;
    let token = fetch_token(&standin).await;
    let bearer_secret = BTreeMap::from([
        ("token".to_owned(), token.clone()),
        ("authorization".to_owned(), format!("Bearer {token}")),
        ("url".to_owned(), standin.url()),
    ]);
    assert_eq!(standin.call_api_with_secret(&bearer_secret).await.unwrap(), 200);

    let session = login(&standin).await;
    let cookie_secret = BTreeMap::from([
        ("cookie".to_owned(), session.cookie.clone()),
        ("csrfToken".to_owned(), session.csrf_token.clone().unwrap()),
        ("url".to_owned(), standin.url()),
    ]);
    assert_eq!(standin.call_api_with_secret(&cookie_secret).await.unwrap(), 200);
    let without_csrf = BTreeMap::from([("cookie".to_owned(), session.cookie)]);
    assert_eq!(standin.call_api_with_secret(&without_csrf).await.unwrap(), 403);

    standin.revoke_tokens();
    standin.revoke_sessions();
    assert_eq!(standin.call_api_with_secret(&bearer_secret).await.unwrap(), 401);
    assert_eq!(standin.call_api_with_secret(&cookie_secret).await.unwrap(), 401);
    assert_eq!(standin.call_api_with_secret(&BTreeMap::new()).await.unwrap(), 401);
}

#[tokio::test]
async fn tls_with_generated_ca() {
    let standin = standin_with(StandinOptions {
        tls: true,
        ..StandinOptions::default()
    })
    .await;
    assert!(standin.url().starts_with("https://127.0.0.1:"));
    let ca_pem = standin.ca_pem().expect("a CA with TLS");

    let untrusting = client().post(standin.token_url()).send().await;
    assert!(untrusting.is_err(), "the CA is not a public one");

    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let localhost_token_url = standin.token_url().replace("127.0.0.1", "localhost");
    let response = trusting.post(localhost_token_url).form(&credentials_form()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let token = body["access_token"].as_str().unwrap();
    let secret = BTreeMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
    assert_eq!(standin.call_api_with_secret(&secret).await.unwrap(), 200);
    assert!(StandinTasklist::start().await.unwrap().ca_pem().is_none());
}

#[tokio::test]
async fn refusing_connections_and_reopening() {
    let standin = standin().await;
    let token = fetch_token(&standin).await;
    let secret = BTreeMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);

    // A client holding a kept-alive connection must notice too, not only new connects.
    let pooled = client();
    let search = |client: &reqwest::Client| {
        client
            .post(format!("{}/v1/tasks/search", standin.url()))
            .bearer_auth(&token)
            .json(&json!({ "pageSize": 1 }))
            .send()
    };
    assert_eq!(search(&pooled).await.unwrap().status(), StatusCode::OK);

    standin.set_refusing_connections(true).await.unwrap();
    assert!(search(&pooled).await.is_err());
    let error = client()
        .post(standin.token_url())
        .form(&credentials_form())
        .send()
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error:?}");
    assert!(standin.call_api_with_secret(&secret).await.is_err());

    standin.set_refusing_connections(false).await.unwrap();
    assert_eq!(standin.call_api_with_secret(&secret).await.unwrap(), 200);
    assert_eq!(search(&pooled).await.unwrap().status(), StatusCode::OK);
}

/// Tokens from an identity provider (Keycloak) are accepted when its JWKS is trusted, and
/// revocation covers them too.
#[tokio::test]
async fn trusted_jwks_tokens() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    let standin = standin().await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // Uncompressed SEC1 point: 0x04, x, y.
    let point = key.public_key_raw();
    let jwks = json!({ "keys": [
        { "kid": "rsa-enc", "kty": "RSA", "use": "enc", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB" },
        {
            "kid": "idp-key", "kty": "EC", "use": "sig", "alg": "ES256", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        },
    ]});
    let jwks_server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_url = format!(
        "http://{}/realms/camunda-platform/protocol/openid-connect/certs",
        jwks_server.local_addr().unwrap()
    );
    let app = axum::Router::new().route(
        "/realms/camunda-platform/protocol/openid-connect/certs",
        axum::routing::get(move || async move { axum::Json(jwks) }),
    );
    tokio::spawn(async move { axum::serve(jwks_server, app).await });

    let encoding_key = EncodingKey::from_ec_der(&key.serialize_der());
    let idp_token = |jti: &str| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("idp-key".to_owned());
        let now = unix_now();
        let claims = json!({
            "iss": "http://keycloak/realms/camunda-platform",
            "aud": ["tasklist-api", "zeebe-api"],
            "sub": "service-account",
            "iat": now,
            "exp": now + 300,
            "jti": jti,
        });
        jsonwebtoken::encode(&header, &claims, &encoding_key).unwrap()
    };

    let token = idp_token("first");
    assert_eq!(
        search_with_bearer(&standin, &token).await,
        StatusCode::UNAUTHORIZED,
        "not trusted yet"
    );
    standin.trust_jwks(&jwks_url);
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::OK);

    standin.revoke_tokens();
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::UNAUTHORIZED);
    // Issued in the same second as the revocation, but after it.
    assert_eq!(search_with_bearer(&standin, &idp_token("second")).await, StatusCode::OK);
}

#[tokio::test]
async fn server_stops_when_the_last_handle_is_dropped() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<StandinTasklist>();

    let standin = standin().await;
    let token_url = standin.token_url();
    let clone = standin.clone();
    drop(standin);
    assert_eq!(request_token_form(&clone).await.status(), StatusCode::OK);
    drop(clone);

    // The accept loop is cancelled asynchronously; give it a moment.
    for _ in 0..50 {
        match client().post(&token_url).form(&credentials_form()).send().await {
            Err(error) if error.is_connect() => return,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("the stand-in still accepts connections after its last handle was dropped");
}

#[tokio::test]
async fn each_endpoint_answers_only_its_own_method() {
    let standin = standin().await;
    let token = fetch_token(&standin).await;
    let call = |method: reqwest::Method, path: &str| {
        client()
            .request(method, format!("{}{path}", standin.url()))
            .bearer_auth(&token)
            .json(&json!({ "pageSize": 1 }))
            .send()
    };
    let get_search = call(reqwest::Method::GET, "/v1/tasks/search").await.unwrap();
    assert_eq!(get_search.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get_search.headers()[reqwest::header::ALLOW], "POST");
    let put_search = call(reqwest::Method::PUT, "/v1/tasks/search").await.unwrap();
    assert_eq!(put_search.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        call(reqwest::Method::POST, "/v1/no-such-endpoint").await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(reqwest::Method::POST, "/v1/tasks/search").await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_valid_token_without_the_tasklist_permission_gets_403() {
    let standin = standin().await;
    standin.add_client_without_permission("no-permission", "no-permission-secret");
    let response = client()
        .post(standin.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "no-permission"),
            ("client_secret", "no-permission-secret"),
            ("audience", "tasklist.camunda.io"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "the token is issued");
    let token = response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn unified_login_sets_camunda_session() {
    let standin = standin().await;
    let response = client()
        .post(format!("{}/login", standin.url()))
        .form(&[("username", USERNAME), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let cookies: Vec<String> = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|value| value.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect();
    let session = cookies
        .iter()
        .find(|cookie| cookie.starts_with("camunda-session="))
        .expect("a camunda-session cookie")
        .clone();
    assert!(!cookies.iter().any(|cookie| cookie.starts_with("TASKLIST-SESSION=")));
    let csrf = response.headers()["X-CSRF-TOKEN"].to_str().unwrap().to_owned();
    let cookie = cookies.join("; ");
    let ok = search_with_cookie(&standin, &cookie, Some(("X-CSRF-TOKEN", &csrf))).await;
    assert_eq!(ok.status(), StatusCode::OK);
    // The session is valid under its own cookie name only.
    let renamed = cookie.replace("camunda-session=", "TASKLIST-SESSION=");
    assert!(renamed != cookie && session.starts_with("camunda-session="));
    let refused = search_with_cookie(&standin, &renamed, Some(("X-CSRF-TOKEN", &csrf))).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn records_name_each_credential_without_revealing_it() {
    let standin = standin().await;
    let token = fetch_token(&standin).await;
    assert_eq!(search_with_bearer(&standin, &token).await, StatusCode::OK);
    let first = login(&standin).await;
    let second = login(&standin).await;
    assert_eq!(
        search_with_cookie(
            &standin,
            &second.cookie,
            Some(("X-CSRF-TOKEN", second.csrf_token.as_deref().unwrap()))
        )
        .await
        .status(),
        StatusCode::OK
    );
    // A session logged out keeps its name in the records.
    client()
        .post(format!("{}/api/logout", standin.url()))
        .header(COOKIE, &first.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        search_with_cookie(
            &standin,
            &first.cookie,
            Some(("X-CSRF-TOKEN", first.csrf_token.as_deref().unwrap()))
        )
        .await
        .status(),
        StatusCode::UNAUTHORIZED
    );
    standin.accept_basic("ann", "pw");
    assert_eq!(search_with_basic(&standin, "ann", "pw").await, StatusCode::OK);
    standin.forget_basic("ann");
    assert_eq!(search_with_basic(&standin, "ann", "pw").await, StatusCode::UNAUTHORIZED);

    let named: Vec<(Option<String>, u16)> = standin
        .api_requests()
        .into_iter()
        .map(|request| (request.credential, request.status))
        .collect();
    let jti = jwt_claims(&token)["jti"].as_str().unwrap().to_owned();
    let name = |text: &str| Some(text.to_owned());
    assert_eq!(
        named,
        [
            (Some(jti), 200),
            (name("session-2"), 200),
            (name("session-1"), 401),
            (name("ann"), 200),
            (name("ann"), 401)
        ]
    );
}

#[tokio::test]
async fn the_v2_user_task_search_answers_an_empty_page() {
    let standin = standin().await;
    let mut zeebe_form = credentials_form();
    zeebe_form[3] = ("audience", "zeebe.camunda.io");
    let response = client().post(standin.token_url()).form(&zeebe_form).send().await.unwrap();
    let token = response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    let response = user_task_search(&standin, reqwest::Method::POST, Some(&token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.json::<Value>().await.unwrap();
    assert_eq!(body["items"], json!([]));
    assert_eq!(body["page"]["totalItems"], 0);
    assert_eq!(
        user_task_search(&standin, reqwest::Method::POST, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        user_task_search(&standin, reqwest::Method::GET, Some(&token)).await.status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
}

async fn search_with_basic(standin: &StandinTasklist, username: &str, password: &str) -> StatusCode {
    client()
        .post(format!("{}/v1/tasks/search", standin.url()))
        .basic_auth(username, Some(password))
        .json(&json!({ "pageSize": 1 }))
        .send()
        .await
        .unwrap()
        .status()
}

async fn user_task_search(standin: &StandinTasklist, method: reqwest::Method, token: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .request(method, format!("{}/v2/user-tasks/search", standin.url()))
        .json(&json!({}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// The stricter login (camunda-docs PR 10031): `POST /login` only with the token of a
/// preceding `GET /login` as header and cookie, once; `/api/login` is unchanged.
#[tokio::test]
async fn strict_login_demands_the_csrf_token_of_a_preceding_get() {
    let standin = standin_with(StandinOptions {
        login_requires_csrf: true,
        ..StandinOptions::default()
    })
    .await;
    let post_login = |csrf: Option<(String, String)>| {
        let mut request = client()
            .post(format!("{}/login", standin.url()))
            .form(&[("username", USERNAME), ("password", PASSWORD)]);
        if let Some((header, cookie)) = csrf {
            request = request
                .header("X-CSRF-TOKEN", header)
                .header(COOKIE, format!("X-CSRF-TOKEN={cookie}"));
        }
        request.send()
    };
    assert_eq!(post_login(None).await.unwrap().status(), StatusCode::FORBIDDEN);

    let fetched = client().get(format!("{}/login", standin.url())).send().await.unwrap();
    assert_eq!(fetched.status(), StatusCode::OK);
    let token = fetched.headers()["X-CSRF-TOKEN"].to_str().unwrap().to_owned();
    let cookie = fetched.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(cookie.starts_with(&format!("X-CSRF-TOKEN={token};")), "{cookie}");

    let wrong = post_login(Some(("not-the-token".into(), "not-the-token".into()))).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let header_only = post_login(Some((token.clone(), "other".into()))).await.unwrap();
    assert_eq!(header_only.status(), StatusCode::FORBIDDEN);
    let right = post_login(Some((token.clone(), token.clone()))).await.unwrap();
    assert_eq!(right.status(), StatusCode::NO_CONTENT);
    let again = post_login(Some((token.clone(), token.clone()))).await.unwrap();
    assert_eq!(again.status(), StatusCode::FORBIDDEN, "a token serves one login");

    let old_path = client()
        .post(format!("{}/api/login", standin.url()))
        .form(&[("username", USERNAME), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(old_path.status(), StatusCode::NO_CONTENT, "/api/login needs no token");
    assert_eq!(standin.login_csrf_fetches(), 1);
    let logins: Vec<_> = standin.logins().into_iter().map(|r| (r.path, r.csrf_header, r.status)).collect();
    assert_eq!(
        logins,
        [
            ("/login", false, 403),
            ("/login", true, 403),
            ("/login", true, 403),
            ("/login", true, 204),
            ("/login", true, 403),
            ("/api/login", false, 204)
        ]
    );

    // Without the strict mode `GET /login` is not served.
    let lenient = standin_with(StandinOptions::default()).await;
    let get = client().get(format!("{}/login", lenient.url())).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
}

/// A v1-only stand-in (8.6, 8.7) answers `404` on `/v2/**`; a v2-only one (8.10) on
/// `/v1/**`, to tokens for the Orchestration Cluster (`zeebe.camunda.io`); an
/// unauthenticated request still gets `401` first.
#[tokio::test]
async fn v1_only_and_v2_only_stand_ins_answer_404_for_the_other_api() {
    let token_for = |standin: &StandinTasklist, audience: &'static str| {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("audience", audience),
        ];
        let request = client().post(standin.token_url()).form(&form).send();
        async move {
            request.await.unwrap().json::<Value>().await.unwrap()["access_token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let call = |standin: &StandinTasklist, path: &str, token: Option<&str>| {
        let mut request = client().post(format!("{}{path}", standin.url())).json(&json!({}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status() }
    };

    let v1_only = standin_with(StandinOptions {
        apis: TasklistApis::V1Only,
        ..StandinOptions::default()
    })
    .await;
    let tasklist_token = token_for(&v1_only, "tasklist.camunda.io").await;
    assert_eq!(call(&v1_only, "/v1/tasks/search", Some(&tasklist_token)).await, StatusCode::OK);
    let zeebe_token = token_for(&v1_only, "zeebe.camunda.io").await;
    assert_eq!(
        call(&v1_only, "/v2/user-tasks/search", Some(&zeebe_token)).await,
        StatusCode::NOT_FOUND
    );

    let v2_only = standin_with(StandinOptions {
        apis: TasklistApis::V2Only,
        ..StandinOptions::default()
    })
    .await;
    let zeebe_token = token_for(&v2_only, "zeebe.camunda.io").await;
    assert_eq!(call(&v2_only, "/v2/user-tasks/search", Some(&zeebe_token)).await, StatusCode::OK);
    assert_eq!(call(&v2_only, "/v1/tasks/search", Some(&zeebe_token)).await, StatusCode::NOT_FOUND);
    assert_eq!(call(&v2_only, "/v1/tasks/search", None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&v2_only, "/v2/user-tasks/search", None).await, StatusCode::UNAUTHORIZED);
}
