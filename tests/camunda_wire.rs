//! The wire behaviour of the HTTP layer to Camunda (`tasklist_operator::camunda`) and of
//! `obtain_credential`, against the stand-in Tasklist and small servers written here for
//! what the stand-in does not do (redirects, slow or endless bodies, a probe that answers
//! 401 once). Each test asserts what a user would notice: which requests went out, the
//! kind of failure, its message, and that no credential ends up in a message.

use std::future::IntoFuture as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use jiff::Timestamp;
use tasklist_operator::camunda::login::{CookieLogin, LoginCredentials, Session};
use tasklist_operator::camunda::probe::{Probe, ProbeCredential, ProbeOutcome};
use tasklist_operator::camunda::token::{ClientCredentials, TokenEndpoint, TokenGrant};
use tasklist_operator::camunda::{AuthFailure, AuthFailureKind, HttpClient, HttpSettings, Sensitive, TlsTrust, join_url};
use tasklist_operator::crd::{ProbeMethod, ProbeSpec, RequestEncoding};
use tasklist_operator::credential::{Credential, jwt_expiry};
use tasklist_operator::derived_secret::StoredCredential;
use tasklist_operator::inputs::{Inputs, LoginMaterial};
use tasklist_operator::obtain::obtain_credential;
use tasklist_operator::reason::Reason;
use testsupport::standin::{
    AuthKind, CSRF_NAME, EndpointMode, LEGACY_CSRF_NAME, SESSION_COOKIE, StandinOptions, StandinTasklist, TasklistApis, TokenAnswer,
    TokenRequestEncoding, UNIFIED_SESSION_COOKIE, ZEEBE_AUDIENCE,
};

const CLIENT_ID: &str = "orders";
const CLIENT_SECRET: &str = "s3cr3t-client-value";
const USERNAME: &str = "demo-user";
const PASSWORD: &str = "p4ssw0rd-value";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn settings(timeout: Duration) -> HttpSettings {
    HttpSettings {
        timeout,
        ..HttpSettings::default()
    }
}

fn http() -> HttpClient {
    HttpClient::new(&settings(Duration::from_secs(5)), &TlsTrust::default()).expect("an HTTP client")
}

fn http_with_timeout(timeout: Duration) -> HttpClient {
    HttpClient::new(&settings(timeout), &TlsTrust::default()).expect("an HTTP client")
}

fn endpoint(url: &str, encoding: RequestEncoding, scope: Option<&str>) -> TokenEndpoint {
    TokenEndpoint::at(url, "tasklist.camunda.io", scope.map(str::to_owned), encoding)
}

fn client(secret: &str) -> ClientCredentials {
    ClientCredentials::with_secret_in_body(CLIENT_ID, Sensitive::new(secret))
}

fn login_credentials(password: &str) -> LoginCredentials {
    LoginCredentials {
        username: USERNAME.to_owned(),
        password: Sensitive::new(password),
    }
}

fn cookie_login(base_url: &str) -> CookieLogin {
    CookieLogin {
        login_url: join_url(base_url, "/api/login"),
    }
}

/// The automatic probe, remembering what it learns where `http` does.
fn default_probe(base_url: &str, http: &HttpClient) -> Probe {
    Probe::new(base_url, &ProbeSpec::default(), http.facts())
}

/// A stand-in with the OAuth2 client and the Tasklist user registered.
async fn standin_with(options: StandinOptions) -> StandinTasklist {
    let standin = StandinTasklist::start_with(options).await.expect("the stand-in starts");
    standin.add_client(CLIENT_ID, CLIENT_SECRET);
    standin.add_user(USERNAME, PASSWORD);
    standin
}

async fn standin() -> StandinTasklist {
    standin_with(StandinOptions::default()).await
}

async fn request_token(http: &HttpClient, endpoint: &TokenEndpoint, secret: &str) -> Result<TokenGrant, AuthFailure> {
    endpoint.request_token(http, &client(secret)).await
}

/// Fails unless `result` is a failure of `kind`; returns its message.
fn failure_of<T: std::fmt::Debug>(result: Result<T, AuthFailure>, kind: AuthFailureKind) -> String {
    match result {
        Ok(value) => panic!("expected a {kind:?} failure, got {value:?}"),
        Err(failure) => {
            assert_eq!(failure.kind, kind, "wrong kind of failure: {}", failure.message);
            failure.message
        }
    }
}

/// Requests a token from `token_url` (form body, [`CLIENT_SECRET`]) with `http`, expecting a
/// failure of `kind`; returns its message.
async fn token_failure(http: &HttpClient, token_url: &str, kind: AuthFailureKind) -> String {
    failure_of(
        request_token(http, &endpoint(token_url, RequestEncoding::Form, None), CLIENT_SECRET).await,
        kind,
    )
}

fn assert_no_credential(message: &str, credentials: &[&str]) {
    for credential in credentials {
        assert!(!message.contains(credential), "the message leaks a credential: {message}");
    }
}

/// A client timeout far above every bound below: a bound that only holds because the
/// client gave up would then fail.
const LONG_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a slow stand-in holds its answer: far beyond the short client timeouts and the
/// bounds, so that a client that waited for it would fail them.
const SERVER_DELAY: Duration = Duration::from_secs(30);
/// The bound for anything that must not wait for [`SERVER_DELAY`] or [`LONG_TIMEOUT`]:
/// ten times the short (1 s) client timeout, a third of the long one.
const QUICK: Duration = Duration::from_secs(10);

fn assert_quick(started: Instant, limit: Duration, what: &str) {
    let elapsed = started.elapsed();
    assert!(elapsed < limit, "{what} took {elapsed:?}, more than {limit:?}");
}

/// Serves `router` on an ephemeral port of 127.0.0.1 for the rest of the test; returns
/// `http://127.0.0.1:PORT`.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
    let address = listener.local_addr().expect("a local address");
    tokio::spawn(axum::serve(listener, router).into_future());
    format!("http://{address}")
}

fn token_json(token: &str, expires_in: u64) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"access_token":"{token}","expires_in":{expires_in},"token_type":"Bearer"}}"#),
    )
        .into_response()
}

/// A body that never ends: 64 KiB chunks as fast as the client takes them.
fn endless_body() -> Body {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    Body::from_stream(futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone())))
}

/// A body that starts at once and then trickles a byte every 200 ms, forever.
fn trickling_body() -> Body {
    let stream = futures::stream::unfold(0u32, |step| async move {
        if step > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let chunk = if step == 0 {
            Bytes::from_static(br#"{"access_token":""#)
        } else {
            Bytes::from_static(b"a")
        };
        Some((Ok::<_, std::io::Error>(chunk), step + 1))
    });
    Body::from_stream(stream)
}

fn oauth2_inputs(endpoint: TokenEndpoint, refresh_before: Option<Duration>) -> Inputs {
    Inputs {
        login: LoginMaterial::OAuth2 {
            endpoint,
            client: client(CLIENT_SECRET),
        },
        trust: TlsTrust::default(),
        refresh_before,
        probe_interval: Duration::from_secs(60),
        all_consumers_nudged: false,
        fingerprint: "camunda-wire-test".to_owned(),
    }
}

fn cookie_inputs(base_url: &str, session_timeout: Duration) -> Inputs {
    Inputs {
        login: LoginMaterial::Cookie {
            login: cookie_login(base_url),
            credentials: login_credentials(PASSWORD),
            session_timeout,
        },
        trust: TlsTrust::default(),
        refresh_before: None,
        probe_interval: Duration::from_secs(60),
        all_consumers_nudged: false,
        fingerprint: "camunda-wire-test".to_owned(),
    }
}

/// Seconds from issue to expiry and from issue to refresh.
fn lifetime_and_refresh(stored: &StoredCredential) -> (i64, i64) {
    (
        stored.expires_at.as_second() - stored.issued_at.as_second(),
        stored.refresh_at.as_second() - stored.issued_at.as_second(),
    )
}

/// The README's refresh window, with the default `--secret-volume-delay` of 120 s: planned
/// at 80 % of the lifetime (or `refresh_before` before expiry when earlier), at the latest
/// max(5 s, min(120 s, lifetime / 2)) before expiry, never before max(lifetime / 2, 5 s);
/// minus a jitter of up to 10 % of the lifetime, reflected upward from that floor. Bounds
/// are in whole seconds, as stored.
fn assert_refresh_in_window(stored: &StoredCredential, refresh_before: Option<u64>) {
    let (lifetime, refresh) = lifetime_and_refresh(stored);
    let lifetime_f = lifetime as f64;
    let floor = (lifetime_f / 2.0).max(5.0);
    let mut planned = 0.8 * lifetime_f;
    if let Some(before) = refresh_before {
        planned = planned.min(lifetime_f - before as f64);
    }
    let margin = (lifetime_f / 2.0).clamp(5.0, 120.0);
    let planned = planned.min(lifetime_f - margin).max(floor);
    let lowest = planned - 0.1 * lifetime_f;
    let (earliest, latest) = if lowest >= floor {
        (lowest, planned)
    } else {
        (floor, floor + (floor - lowest))
    };
    assert!(
        (refresh as f64) >= earliest.floor() && (refresh as f64) <= latest,
        "refresh {refresh}s after issue is outside [{earliest}, {latest}] for a {lifetime}s lifetime"
    );
    assert!(stored.refresh_at >= stored.issued_at && stored.refresh_at < stored.expires_at);
}

fn assert_issued_about_now(stored: &StoredCredential) {
    let drift = (Timestamp::now().as_second() - stored.issued_at.as_second()).abs();
    assert!(drift <= 5, "issued_at {} is not about now", stored.issued_at);
}

fn bearer(stored: &StoredCredential) -> &Sensitive {
    match &stored.credential {
        Credential::Bearer(token) => token,
        Credential::Session(_) | Credential::Basic(_) => panic!("a bearer token expected"),
    }
}

// ---------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn token_request_is_a_form_body_by_default_without_scope() {
    let standin = standin().await;
    let grant = request_token(
        &http(),
        &endpoint(&standin.token_url(), RequestEncoding::default(), None),
        CLIENT_SECRET,
    )
    .await
    .expect("a token");
    assert!(jwt_expiry(grant.access_token.expose()).is_some(), "the stand-in issues a JWT");
    assert_eq!(grant.expires_in, Some(300));

    let records = standin.token_requests();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].encoding, TokenRequestEncoding::Form);
    assert_eq!(records[0].client_id, CLIENT_ID);
    assert_eq!(records[0].audience, "tasklist.camunda.io");
    assert_eq!(records[0].scope, None, "no scope is sent when none is set");
    assert_eq!(records[0].status, 200);
}

#[tokio::test]
async fn token_request_is_json_with_request_encoding_json_and_sends_the_scope() {
    let standin = standin().await;
    standin.add_scope("tasklist:read");
    request_token(
        &http(),
        &endpoint(&standin.token_url(), RequestEncoding::Json, Some("tasklist:read")),
        CLIENT_SECRET,
    )
    .await
    .expect("a token");
    let records = standin.token_requests();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].encoding, TokenRequestEncoding::Json);
    assert_eq!(records[0].audience, "tasklist.camunda.io");
    assert_eq!(records[0].scope.as_deref(), Some("tasklist:read"));
    assert_eq!(records[0].status, 200);
}

#[tokio::test]
async fn an_empty_scope_is_not_sent() {
    let standin = standin().await;
    for encoding in [RequestEncoding::Form, RequestEncoding::Json] {
        request_token(&http(), &endpoint(&standin.token_url(), encoding, Some("")), CLIENT_SECRET)
            .await
            .expect("a token");
    }
    for record in standin.token_requests() {
        assert_eq!(record.scope, None, "{record:?}");
    }
}

#[tokio::test]
async fn keycloak_style_endpoint_works_with_form_and_rejects_json_with_invalid_request() {
    let standin = standin().await;
    standin.set_token_answer(TokenAnswer::Keycloak400ForJson);

    request_token(&http(), &endpoint(&standin.token_url(), RequestEncoding::Form, None), CLIENT_SECRET)
        .await
        .expect("a form body works against Keycloak");

    let result = request_token(&http(), &endpoint(&standin.token_url(), RequestEncoding::Json, None), CLIENT_SECRET).await;
    let message = failure_of(result, AuthFailureKind::Rejected);
    assert!(message.contains("invalid_request"), "{message}");
    assert!(message.contains("400"), "{message}");
    assert_no_credential(&message, &[CLIENT_SECRET]);
}

#[tokio::test]
async fn wrong_secret_is_rejected_with_invalid_client_and_without_the_secret() {
    let standin = standin().await;
    let wrong_secret = "wrong-secret-value";
    let result = request_token(&http(), &endpoint(&standin.token_url(), RequestEncoding::Form, None), wrong_secret).await;
    let message = failure_of(result, AuthFailureKind::Rejected);
    assert!(message.contains("invalid_client"), "{message}");
    assert!(message.contains("401"), "{message}");
    assert_no_credential(&message, &[wrong_secret, CLIENT_SECRET]);
    assert_eq!(standin.token_requests()[0].status, 401);
}

#[tokio::test]
async fn an_oauth_error_that_echoes_the_secret_is_redacted() {
    let router = Router::new().route(
        "/oauth/token",
        post(|| async {
            (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "application/json")],
                format!(r#"{{"error":"invalid_client","error_description":"secret {CLIENT_SECRET} is wrong"}}"#),
            )
        }),
    );
    let base = serve(router).await;
    let message = token_failure(&http(), &format!("{base}/oauth/token"), AuthFailureKind::Rejected).await;
    assert!(message.contains("invalid_client"), "{message}");
    assert_no_credential(&message, &[CLIENT_SECRET]);
}

#[tokio::test]
async fn token_endpoint_503_is_a_server_error() {
    let standin = standin().await;
    standin.set_token_endpoint(EndpointMode::Down);
    let message = token_failure(&http(), &standin.token_url(), AuthFailureKind::ServerError).await;
    assert!(message.contains("503"), "{message}");
    assert_no_credential(&message, &[CLIENT_SECRET]);
}

#[tokio::test]
async fn refused_connection_to_the_token_endpoint_is_a_server_error() {
    let standin = standin().await;
    standin.set_refusing_connections(true).await.expect("refusing");
    let started = Instant::now();
    let message = token_failure(&http_with_timeout(LONG_TIMEOUT), &standin.token_url(), AuthFailureKind::ServerError).await;
    assert!(message.contains("could not connect"), "{message}");
    assert_no_credential(&message, &[CLIENT_SECRET]);
    assert_quick(started, QUICK, "a refused connection");
}

#[tokio::test]
async fn slow_token_endpoint_times_out_as_a_server_error() {
    let standin = standin().await;
    standin.set_token_endpoint(EndpointMode::Slow(SERVER_DELAY));
    let started = Instant::now();
    let message = token_failure(
        &http_with_timeout(Duration::from_secs(1)),
        &standin.token_url(),
        AuthFailureKind::ServerError,
    )
    .await;
    assert!(message.contains("no answer within 1s"), "{message}");
    assert_quick(started, QUICK, "a timed-out token request");
}

#[tokio::test]
async fn a_body_that_trickles_in_times_out_as_a_server_error() {
    let router = Router::new().route(
        "/oauth/token",
        post(|| async { ([(header::CONTENT_TYPE, "application/json")], trickling_body()) }),
    );
    let base = serve(router).await;
    let started = Instant::now();
    let message = token_failure(
        &http_with_timeout(Duration::from_secs(1)),
        &format!("{base}/oauth/token"),
        AuthFailureKind::ServerError,
    )
    .await;
    assert!(message.contains("no answer within 1s"), "{message}");
    assert_quick(started, QUICK, "a token answer that trickles in");
}

#[tokio::test]
async fn html_page_with_200_is_a_server_error_that_says_so() {
    let standin = standin().await;
    standin.set_token_answer(TokenAnswer::Html200);
    let message = token_failure(&http(), &standin.token_url(), AuthFailureKind::ServerError).await;
    assert!(message.contains("not with JSON"), "{message}");
    assert_no_credential(&message, &[CLIENT_SECRET]);
}

#[tokio::test]
async fn json_without_access_token_is_a_server_error_that_says_so() {
    let standin = standin().await;
    standin.set_token_answer(TokenAnswer::JsonWithoutAccessToken);
    let message = token_failure(&http(), &standin.token_url(), AuthFailureKind::ServerError).await;
    assert!(message.contains("without an access_token"), "{message}");
    assert_no_credential(&message, &[CLIENT_SECRET]);
}

/// An answer that is not an OAuth2 token answer (here a bare token in plain text) must not
/// be quoted in the error message: it may hold the token.
#[tokio::test]
async fn an_unusable_token_answer_is_not_quoted_in_the_message() {
    const TOKEN: &str = "opaque-token-value-1234";
    // A bare token in plain text: not an OAuth2 answer, and the message must not quote it.
    let router = Router::new().route("/oauth/token", post(|| async { ([(header::CONTENT_TYPE, "text/plain")], TOKEN) }));
    let base = serve(router).await;
    let message = token_failure(&http(), &format!("{base}/oauth/token"), AuthFailureKind::ServerError).await;
    assert_no_credential(&message, &[TOKEN, CLIENT_SECRET]);
}

#[tokio::test]
async fn an_expires_in_of_the_wrong_type_counts_as_absent() {
    const TOKEN: &str = "opaque-token-value-5678";
    let router = Router::new().route(
        "/oauth/token",
        post(|| async {
            (
                [(header::CONTENT_TYPE, "application/json")],
                format!(r#"{{"access_token":"{TOKEN}","expires_in":true}}"#),
            )
        }),
    );
    let base = serve(router).await;
    let grant = request_token(
        &http(),
        &endpoint(&format!("{base}/oauth/token"), RequestEncoding::Form, None),
        CLIENT_SECRET,
    )
    .await
    .expect("the token is usable");
    assert_eq!(grant.access_token.expose(), TOKEN);
    assert_eq!(grant.expires_in, None);
}

#[tokio::test]
async fn huge_token_answer_is_refused_by_the_size_cap() {
    let standin = standin().await;
    standin.set_token_answer(TokenAnswer::Huge);
    let started = Instant::now();
    let message = token_failure(&http_with_timeout(LONG_TIMEOUT), &standin.token_url(), AuthFailureKind::ServerError).await;
    assert!(message.contains("larger than"), "{message}");
    assert_quick(started, QUICK, "a 10 MB token answer");
}

/// Without a Content-Length the cap applies while reading: an endless body stops at the cap.
#[tokio::test]
async fn endless_token_answer_stops_at_the_size_cap() {
    let router = Router::new().route(
        "/oauth/token",
        post(|| async { ([(header::CONTENT_TYPE, "application/json")], endless_body()) }),
    );
    let base = serve(router).await;
    let started = Instant::now();
    let message = token_failure(
        &http_with_timeout(LONG_TIMEOUT),
        &format!("{base}/oauth/token"),
        AuthFailureKind::ServerError,
    )
    .await;
    assert!(message.contains("larger than"), "{message}");
    assert_quick(started, QUICK, "an endless token answer");
}

// ---------------------------------------------------------------------------------------
// Lifetimes through obtain_credential
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn jwt_exp_wins_over_a_lying_expires_in() {
    let standin = standin().await;
    standin.set_token_lifetime(Duration::from_secs(600));
    standin.set_expires_in_override(Some(86_400));
    let inputs = oauth2_inputs(endpoint(&standin.token_url(), RequestEncoding::Form, None), None);
    let stored = obtain_credential(&inputs, &http()).await.expect("a credential");

    assert_issued_about_now(&stored);
    let exp = jwt_expiry(bearer(&stored).expose()).expect("a JWT with exp");
    assert_eq!(stored.expires_at, exp, "expiry comes from the JWT exp claim");
    let (lifetime, _) = lifetime_and_refresh(&stored);
    assert!(
        (599..=601).contains(&lifetime),
        "lifetime {lifetime}s, expected about 600s, not 86400s"
    );
    assert_refresh_in_window(&stored, None);
    assert_eq!(stored.inputs, "camunda-wire-test");
}

#[tokio::test]
async fn opaque_token_with_expires_in_lives_that_long() {
    let standin = standin().await;
    standin.set_token_answer(TokenAnswer::OpaqueWithExpiresIn);
    standin.set_token_lifetime(Duration::from_secs(120));
    let inputs = oauth2_inputs(endpoint(&standin.token_url(), RequestEncoding::Form, None), None);
    let stored = obtain_credential(&inputs, &http()).await.expect("a credential");

    assert!(jwt_expiry(bearer(&stored).expose()).is_none(), "an opaque token");
    assert_issued_about_now(&stored);
    assert_eq!(lifetime_and_refresh(&stored).0, 120);
    assert_refresh_in_window(&stored, None);
}

#[tokio::test]
async fn opaque_token_without_expires_in_lives_300_seconds() {
    let standin = standin().await;
    standin.set_token_answer(TokenAnswer::OpaqueWithoutExpiresIn);
    standin.set_token_lifetime(Duration::from_secs(1000));
    let inputs = oauth2_inputs(endpoint(&standin.token_url(), RequestEncoding::Form, None), None);
    let stored = obtain_credential(&inputs, &http()).await.expect("a credential");

    assert_issued_about_now(&stored);
    assert_eq!(lifetime_and_refresh(&stored).0, 300);
    assert_refresh_in_window(&stored, None);
}

#[tokio::test]
async fn refresh_time_stays_in_the_contract_window() {
    let standin = standin().await;
    standin.set_token_answer(TokenAnswer::OpaqueWithExpiresIn);
    let http = http();

    // 70-80 % of the lifetime, whatever the jitter.
    standin.set_token_lifetime(Duration::from_secs(1000));
    let inputs = oauth2_inputs(endpoint(&standin.token_url(), RequestEncoding::Form, None), None);
    for _ in 0..10 {
        let stored = obtain_credential(&inputs, &http).await.expect("a credential");
        assert_eq!(lifetime_and_refresh(&stored).0, 1000);
        assert_refresh_in_window(&stored, None);
        let refresh = lifetime_and_refresh(&stored).1;
        assert!((700..=800).contains(&refresh), "refresh {refresh}s into a 1000s lifetime");
    }

    // refreshBefore wins when it comes earlier than 80 %.
    let inputs = oauth2_inputs(
        endpoint(&standin.token_url(), RequestEncoding::Form, None),
        Some(Duration::from_secs(300)),
    );
    for _ in 0..5 {
        let stored = obtain_credential(&inputs, &http).await.expect("a credential");
        let refresh = lifetime_and_refresh(&stored).1;
        assert!(
            (600..=700).contains(&refresh),
            "refresh {refresh}s into 1000s with refreshBefore 300s"
        );
    }

    // A short lifetime: on the floor, half the lifetime, plus up to 10 % of it.
    standin.set_token_lifetime(Duration::from_secs(10));
    let inputs = oauth2_inputs(endpoint(&standin.token_url(), RequestEncoding::Form, None), None);
    for _ in 0..5 {
        let stored = obtain_credential(&inputs, &http).await.expect("a credential");
        let (lifetime, refresh) = lifetime_and_refresh(&stored);
        assert_eq!(lifetime, 10);
        assert!((5..=6).contains(&refresh), "refresh {refresh}s into a 10s lifetime");
        assert_refresh_in_window(&stored, None);
    }

    // refreshBefore longer than half the lifetime: not obeyed, the floor wins.
    standin.set_token_lifetime(Duration::from_secs(300));
    let inputs = oauth2_inputs(
        endpoint(&standin.token_url(), RequestEncoding::Form, None),
        Some(Duration::from_secs(600)),
    );
    for _ in 0..5 {
        let stored = obtain_credential(&inputs, &http).await.expect("a credential");
        let refresh = lifetime_and_refresh(&stored).1;
        assert!(
            (150..=180).contains(&refresh),
            "refresh {refresh}s into 300s with refreshBefore 600s"
        );
    }
}

#[tokio::test]
async fn cookie_session_lives_for_session_timeout() {
    let standin = standin().await;
    let inputs = cookie_inputs(&standin.url(), Duration::from_secs(1800));
    let stored = obtain_credential(&inputs, &http()).await.expect("a session");
    assert!(matches!(stored.credential, Credential::Session(_)));
    assert_issued_about_now(&stored);
    assert_eq!(lifetime_and_refresh(&stored).0, 1800);
    assert_refresh_in_window(&stored, None);
}

#[tokio::test]
async fn obtain_credential_passes_rejections_on() {
    let standin = standin().await;
    let mut inputs = oauth2_inputs(endpoint(&standin.token_url(), RequestEncoding::Form, None), None);
    inputs.login = LoginMaterial::OAuth2 {
        endpoint: endpoint(&standin.token_url(), RequestEncoding::Form, None),
        client: client("not-the-secret"),
    };
    let message = failure_of(obtain_credential(&inputs, &http()).await, AuthFailureKind::Rejected);
    assert!(message.contains("invalid_client"), "{message}");
    assert_no_credential(&message, &["not-the-secret"]);
}

/// A JWT whose `exp` has passed already cannot be handed to applications: most likely the
/// clocks disagree, which the failure says (and it is retried with backoff).
#[tokio::test]
async fn a_jwt_that_expired_already_names_a_clock_skew() {
    // {"alg":"none"} . {"exp":1000,"sub":"orders"} . signature
    const EXPIRED: &str = "eyJhbGciOiJub25lIn0.eyJleHAiOjEwMDAsInN1YiI6Im9yZGVycyJ9.c2ln";
    let router = Router::new().route("/oauth/token", post(|| async { token_json(EXPIRED, 300) }));
    let base = serve(router).await;
    let inputs = oauth2_inputs(endpoint(&format!("{base}/oauth/token"), RequestEncoding::Form, None), None);
    let message = failure_of(obtain_credential(&inputs, &http()).await, AuthFailureKind::ExpiredOnArrival);
    assert!(message.contains("expired already"), "{message}");
    assert!(message.contains("clocks"), "{message}");
    assert_no_credential(&message, &[EXPIRED]);
}

// ---------------------------------------------------------------------------------------
// Cookie login
// ---------------------------------------------------------------------------------------

fn cookie_value<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session
        .cookies
        .iter()
        .find(|(cookie, _)| cookie == name)
        .map(|(_, value)| value.expose())
}

#[tokio::test]
async fn cookie_login_with_csrf_keeps_session_and_csrf_token() {
    let standin = standin().await;
    let session = cookie_login(&standin.url())
        .log_in(&http(), &login_credentials(PASSWORD))
        .await
        .expect("logged in");

    let header = session.cookie_header();
    assert!(
        header.expose().contains(&format!("{SESSION_COOKIE}=")),
        "cookie header lacks the session"
    );
    assert!(
        header.expose().contains(&format!("{CSRF_NAME}=")),
        "cookie header lacks the CSRF cookie"
    );
    let csrf = session.csrf_token.as_ref().expect("a CSRF token");
    assert!(!csrf.is_empty());
    assert_eq!(cookie_value(&session, CSRF_NAME), Some(csrf.expose()), "header and cookie agree");

    let logins = standin.logins();
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].username, USERNAME);
    assert_eq!(logins[0].status, 204);
}

#[tokio::test]
async fn cookie_login_without_csrf() {
    let standin = standin_with(StandinOptions {
        csrf: false,
        ..StandinOptions::default()
    })
    .await;
    let session = cookie_login(&standin.url())
        .log_in(&http(), &login_credentials(PASSWORD))
        .await
        .expect("logged in");
    assert!(session.csrf_token.is_none());
    assert_eq!(session.cookies.len(), 1);
    assert!(cookie_value(&session, SESSION_COOKIE).is_some());

    let outcome = default_probe(&standin.url(), &http())
        .run(
            &http(),
            ProbeCredential::Session {
                cookie_header: session.cookie_header_ref(),
                csrf_token: None,
                csrf_header: session.csrf_header_name(),
            },
        )
        .await;
    assert_eq!(outcome, ProbeOutcome::Succeeded);
}

#[tokio::test]
async fn cookie_login_reads_the_legacy_csrf_name() {
    let standin = standin_with(StandinOptions {
        legacy_csrf_name: true,
        ..StandinOptions::default()
    })
    .await;
    let session = cookie_login(&standin.url())
        .log_in(&http(), &login_credentials(PASSWORD))
        .await
        .expect("logged in");
    let csrf = session.csrf_token.as_ref().expect("the CSRF token from TASKLIST-X-CSRF-TOKEN");
    assert_eq!(cookie_value(&session, LEGACY_CSRF_NAME), Some(csrf.expose()));
    assert!(session.cookie_header().expose().contains(&format!("{LEGACY_CSRF_NAME}=")));
}

/// A Tasklist with the older CSRF name expects the token in the `TASKLIST-X-CSRF-TOKEN`
/// header: a fresh session must pass the POST probe there too.
#[tokio::test]
async fn probe_with_a_legacy_csrf_session_succeeds() {
    let standin = standin_with(StandinOptions {
        legacy_csrf_name: true,
        ..StandinOptions::default()
    })
    .await;
    let session = cookie_login(&standin.url())
        .log_in(&http(), &login_credentials(PASSWORD))
        .await
        .expect("logged in");
    let outcome = default_probe(&standin.url(), &http())
        .run(
            &http(),
            ProbeCredential::Session {
                cookie_header: session.cookie_header_ref(),
                csrf_token: session.csrf_token.as_ref(),
                csrf_header: session.csrf_header_name(),
            },
        )
        .await;
    assert_eq!(outcome, ProbeOutcome::Succeeded, "{:?}", standin.api_requests());
}

#[tokio::test]
async fn cookie_login_with_a_bad_password_is_rejected() {
    let standin = standin().await;
    let wrong = "wrong-password-value";
    let result = cookie_login(&standin.url()).log_in(&http(), &login_credentials(wrong)).await;
    let message = failure_of(result, AuthFailureKind::Rejected);
    assert!(message.contains("401"), "{message}");
    assert_no_credential(&message, &[wrong, PASSWORD]);
}

#[tokio::test]
async fn cookie_login_when_tasklist_is_down_is_a_server_error() {
    let standin = standin().await;
    standin.set_login_endpoint(EndpointMode::Down);
    let result = cookie_login(&standin.url()).log_in(&http(), &login_credentials(PASSWORD)).await;
    let message = failure_of(result, AuthFailureKind::ServerError);
    assert!(message.contains("503"), "{message}");
}

fn login_at(base_url: &str, path: &str) -> CookieLogin {
    CookieLogin {
        login_url: join_url(base_url, path),
    }
}

/// The session as the probe sends it.
fn session_credential(session: &Session) -> ProbeCredential<'_> {
    ProbeCredential::Session {
        cookie_header: session.cookie_header_ref(),
        csrf_token: session.csrf_token.as_ref(),
        csrf_header: session.csrf_header_name(),
    }
}

/// (path, carried a CSRF header, status) of every login the stand-in saw.
fn login_trail(standin: &StandinTasklist) -> Vec<(&'static str, bool, u16)> {
    standin
        .logins()
        .into_iter()
        .map(|login| (login.path, login.csrf_header, login.status))
        .collect()
}

/// 8.6 and 8.7 (`/api/login`) and 8.8 (`/login`) take the login at once: one `POST`, no
/// `GET` for a CSRF token.
#[tokio::test]
async fn login_at_api_login_and_at_login_takes_one_post() {
    let standin = standin().await;
    for (path, cookie) in [("/api/login", SESSION_COOKIE), ("/login", UNIFIED_SESSION_COOKIE)] {
        let session = login_at(&standin.url(), path)
            .log_in(&http(), &login_credentials(PASSWORD))
            .await
            .expect("logged in");
        assert!(cookie_value(&session, cookie).is_some(), "{path}: no {cookie} cookie");
        let outcome = default_probe(&standin.url(), &http())
            .run(&http(), session_credential(&session))
            .await;
        assert_eq!(outcome, ProbeOutcome::Succeeded, "{path}");
    }
    assert_eq!(login_trail(&standin), [("/api/login", false, 204), ("/login", false, 204)]);
    assert_eq!(standin.login_csrf_fetches(), 0);
}

/// A login that demands a CSRF token: the refused `POST` leads to one `GET /login` and one
/// more `POST` with the token as header and cookie; the session then works.
#[tokio::test]
async fn a_login_demanding_a_csrf_token_gets_it_from_a_get_first() {
    let standin = standin_with(StandinOptions {
        login_requires_csrf: true,
        ..StandinOptions::default()
    })
    .await;
    // One client: what it learns (the URL demands the token) serves its next login.
    let http = http();
    let session = login_at(&standin.url(), "/login")
        .log_in(&http, &login_credentials(PASSWORD))
        .await
        .expect("logged in after the pre-fetch");
    assert_eq!(login_trail(&standin), [("/login", false, 403), ("/login", true, 204)]);
    assert_eq!(standin.login_csrf_fetches(), 1);
    assert!(cookie_value(&session, UNIFIED_SESSION_COOKIE).is_some());
    let outcome = default_probe(&standin.url(), &http).run(&http, session_credential(&session)).await;
    assert_eq!(outcome, ProbeOutcome::Succeeded, "{:?}", standin.api_requests());

    // The next login to that URL fetches the token first: no refused POST.
    login_at(&standin.url(), "/login")
        .log_in(&http, &login_credentials(PASSWORD))
        .await
        .expect("logged in again");
    assert_eq!(
        login_trail(&standin),
        [("/login", false, 403), ("/login", true, 204), ("/login", true, 204)]
    );
    assert_eq!(standin.login_csrf_fetches(), 2);
}

/// A wrong password against the strict login is still a rejection, reported from the
/// second try, without the password.
#[tokio::test]
async fn a_wrong_password_against_a_login_demanding_csrf_is_rejected() {
    let standin = standin_with(StandinOptions {
        login_requires_csrf: true,
        ..StandinOptions::default()
    })
    .await;
    let wrong = "wrong-password-value";
    let result = login_at(&standin.url(), "/login").log_in(&http(), &login_credentials(wrong)).await;
    let message = failure_of(result, AuthFailureKind::Rejected);
    assert!(message.contains("401"), "{message}");
    assert_no_credential(&message, &[wrong, PASSWORD]);
    assert_eq!(login_trail(&standin), [("/login", false, 403), ("/login", true, 401)]);
}

/// A server that has no token to hand out (`GET` answers 405): the first refusal stands,
/// after one `GET`.
#[tokio::test]
async fn a_wrong_password_against_a_lenient_login_reports_the_first_refusal() {
    let standin = standin().await;
    let wrong = "wrong-password-value";
    let result = login_at(&standin.url(), "/login").log_in(&http(), &login_credentials(wrong)).await;
    let message = failure_of(result, AuthFailureKind::Rejected);
    assert!(message.contains("401"), "{message}");
    assert_eq!(login_trail(&standin), [("/login", false, 401)]);
    assert_eq!(standin.login_csrf_fetches(), 1);
}

#[derive(Default)]
struct SeenLogin {
    query: Option<String>,
    content_type: Option<String>,
    body: String,
}

#[tokio::test]
async fn the_password_goes_in_a_form_body_not_the_query_string() {
    let seen = Arc::new(Mutex::new(SeenLogin::default()));
    let router = Router::new()
        .route(
            "/api/login",
            post(
                |State(seen): State<Arc<Mutex<SeenLogin>>>, uri: Uri, headers: HeaderMap, body: Bytes| async move {
                    *seen.lock().unwrap() = SeenLogin {
                        query: uri.query().map(str::to_owned),
                        content_type: headers
                            .get(header::CONTENT_TYPE)
                            .and_then(|value| value.to_str().ok())
                            .map(str::to_owned),
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    (
                        StatusCode::NO_CONTENT,
                        [(header::SET_COOKIE, "TASKLIST-SESSION=abc123; Path=/; HttpOnly")],
                    )
                },
            ),
        )
        .with_state(seen.clone());
    let base = serve(router).await;
    let session = cookie_login(&base)
        .log_in(&http(), &login_credentials(PASSWORD))
        .await
        .expect("logged in");
    assert_eq!(session.cookie_header().expose(), "TASKLIST-SESSION=abc123");

    let seen = seen.lock().unwrap();
    assert!(seen.query.as_deref().unwrap_or("").is_empty(), "query string: {:?}", seen.query);
    assert_eq!(seen.content_type.as_deref(), Some("application/x-www-form-urlencoded"));
    let fields: Vec<(String, String)> = form_pairs(&seen.body);
    assert!(fields.contains(&("username".to_owned(), USERNAME.to_owned())), "{fields:?}");
    assert!(
        fields.contains(&("password".to_owned(), PASSWORD.to_owned())),
        "form body lacks the password"
    );
}

/// `a=b&c=d` into pairs (the test crate has no form decoder; values here need no decoding).
fn form_pairs(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Probe
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn probe_with_an_accepted_bearer_token_succeeds() {
    let standin = standin().await;
    let http = http();
    let grant = request_token(&http, &endpoint(&standin.token_url(), RequestEncoding::Form, None), CLIENT_SECRET)
        .await
        .expect("a token");
    let probe = default_probe(&standin.url(), &http);
    assert_eq!(
        probe.run(&http, ProbeCredential::Bearer(&grant.access_token)).await,
        ProbeOutcome::Succeeded
    );

    let requests = standin.api_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/v1/tasks/search");
    assert_eq!(requests[0].auth, AuthKind::Bearer);
    assert_eq!(requests[0].status, 200);

    // A token the server does not know is Unauthorized{401}.
    let unknown = Sensitive::new("not-a-token-the-server-issued");
    assert_eq!(
        probe.run(&http, ProbeCredential::Bearer(&unknown)).await,
        ProbeOutcome::Unauthorized { status: 401 }
    );
}

/// (method, path, status) of every API request the stand-in saw.
fn api_trail(standin: &StandinTasklist) -> Vec<(String, String, u16)> {
    standin
        .api_requests()
        .into_iter()
        .map(|request| (request.method, request.path, request.status))
        .collect()
}

fn posted(path: &str, status: u16) -> (String, String, u16) {
    ("POST".to_owned(), path.to_owned(), status)
}

/// Camunda 8.10 (v2 only): the automatic probe's v1 request answers 404, the v2 request
/// proves the token, and the next probe of that Tasklist sends the v2 request only.
#[tokio::test]
async fn the_automatic_probe_falls_back_to_v2_and_remembers_it() {
    let standin = standin_with(StandinOptions {
        apis: TasklistApis::V2Only,
        ..StandinOptions::default()
    })
    .await;
    let http = http();
    let zeebe = TokenEndpoint::at(standin.token_url(), ZEEBE_AUDIENCE, None, RequestEncoding::Form);
    let grant = request_token(&http, &zeebe, CLIENT_SECRET).await.expect("a token");
    let probe = default_probe(&standin.url(), &http);
    assert!(probe.is_automatic());
    assert_eq!(
        probe.run(&http, ProbeCredential::Bearer(&grant.access_token)).await,
        ProbeOutcome::Succeeded
    );
    assert_eq!(
        probe.describe(),
        format!(
            "POST {}/v2/user-tasks/search (the Tasklist v2 API, found by the automatic probe)",
            standin.url()
        )
    );
    let again = default_probe(&standin.url(), &http);
    assert_eq!(
        again.run(&http, ProbeCredential::Bearer(&grant.access_token)).await,
        ProbeOutcome::Succeeded
    );
    assert_eq!(
        api_trail(&standin),
        [
            posted("/v1/tasks/search", 404),
            posted("/v2/user-tasks/search", 200),
            posted("/v2/user-tasks/search", 200)
        ]
    );

    // A token v2 refuses is reported from v2, not as v1's 404.
    let unknown = Sensitive::new("not-a-token-the-server-issued");
    assert_eq!(
        default_probe(&standin.url(), &http)
            .run(&http, ProbeCredential::Bearer(&unknown))
            .await,
        ProbeOutcome::Unauthorized { status: 401 }
    );
}

/// Camunda 8.6 and 8.7 (v1 only): one v1 request, never a v2 one; an unauthenticated
/// request is a 401, not a reason to try the other API.
#[tokio::test]
async fn the_automatic_probe_on_v1_only_sends_v1_only() {
    let standin = standin_with(StandinOptions {
        apis: TasklistApis::V1Only,
        ..StandinOptions::default()
    })
    .await;
    let http = http();
    let grant = request_token(&http, &endpoint(&standin.token_url(), RequestEncoding::Form, None), CLIENT_SECRET)
        .await
        .expect("a token");
    let probe = default_probe(&standin.url(), &http);
    assert_eq!(
        probe.run(&http, ProbeCredential::Bearer(&grant.access_token)).await,
        ProbeOutcome::Succeeded
    );
    assert!(
        probe.describe().contains("/v1/tasks/search (the Tasklist v1 API"),
        "{}",
        probe.describe()
    );
    let unknown = Sensitive::new("not-a-token-the-server-issued");
    assert_eq!(
        probe.run(&http, ProbeCredential::Bearer(&unknown)).await,
        ProbeOutcome::Unauthorized { status: 401 }
    );
    assert_eq!(
        api_trail(&standin),
        [posted("/v1/tasks/search", 200), posted("/v1/tasks/search", 401)]
    );
}

/// A server that has neither endpoint: the first 404 is reported, and nothing is learned.
#[tokio::test]
async fn the_automatic_probe_reports_404_when_neither_api_exists() {
    let hits = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .fallback(|State(hits): State<Arc<AtomicUsize>>| async move {
            hits.fetch_add(1, Ordering::SeqCst);
            StatusCode::NOT_FOUND
        })
        .with_state(hits.clone());
    let base = serve(router).await;
    let token = Sensitive::new("token");
    let probe = default_probe(&base, &http());
    assert_eq!(
        probe.run(&http(), ProbeCredential::Bearer(&token)).await,
        ProbeOutcome::Failed { status: 404 }
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2, "v1, then v2");
    assert!(probe.describe().contains("/v1/tasks/search"), "{}", probe.describe());
}

#[tokio::test]
async fn post_probe_with_session_sends_the_csrf_header() {
    let standin = standin().await;
    let http = http();
    let session = cookie_login(&standin.url())
        .log_in(&http, &login_credentials(PASSWORD))
        .await
        .expect("logged in");
    let probe = default_probe(&standin.url(), &http);
    let outcome = probe
        .run(
            &http,
            ProbeCredential::Session {
                cookie_header: session.cookie_header_ref(),
                csrf_token: session.csrf_token.as_ref(),
                csrf_header: session.csrf_header_name(),
            },
        )
        .await;
    assert_eq!(outcome, ProbeOutcome::Succeeded);
    let requests = standin.api_requests();
    assert_eq!(requests[0].auth, AuthKind::Cookie);
    assert_eq!(requests[0].status, 200);

    // Without the CSRF header the same session is refused with 403: the header above counted.
    let outcome = probe
        .run(
            &http,
            ProbeCredential::Session {
                cookie_header: session.cookie_header_ref(),
                csrf_token: None,
                csrf_header: session.csrf_header_name(),
            },
        )
        .await;
    assert_eq!(outcome, ProbeOutcome::Unauthorized { status: 403 });
}

#[tokio::test]
async fn get_probe_with_session_succeeds() {
    let standin = standin().await;
    let http = http();
    let session = cookie_login(&standin.url())
        .log_in(&http, &login_credentials(PASSWORD))
        .await
        .expect("logged in");
    let probe = Probe::new(
        &standin.url(),
        &ProbeSpec {
            method: ProbeMethod::Get,
            path: Some("/v2/topology".to_owned()),
            ..ProbeSpec::default()
        },
        http.facts(),
    );
    assert_eq!(probe.describe(), format!("GET {}/v2/topology", standin.url()));
    let outcome = probe
        .run(
            &http,
            ProbeCredential::Session {
                cookie_header: session.cookie_header_ref(),
                csrf_token: session.csrf_token.as_ref(),
                csrf_header: session.csrf_header_name(),
            },
        )
        .await;
    assert_eq!(outcome, ProbeOutcome::Succeeded);
    assert_eq!(standin.api_requests()[0].method, "GET");
}

#[tokio::test]
async fn probe_answered_401_once_then_200() {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route(
            "/v1/tasks/search",
            post(|State(calls): State<Arc<AtomicUsize>>, headers: HeaderMap| async move {
                let authorized = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()) == Some("Bearer tok-123");
                if !authorized {
                    return StatusCode::BAD_REQUEST;
                }
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::OK
                }
            }),
        )
        .with_state(calls.clone());
    let base = serve(router).await;
    let http = http();
    let token = Sensitive::new("tok-123");
    let probe = default_probe(&base, &http);
    assert_eq!(
        probe.run(&http, ProbeCredential::Bearer(&token)).await,
        ProbeOutcome::Unauthorized { status: 401 }
    );
    assert_eq!(probe.run(&http, ProbeCredential::Bearer(&token)).await, ProbeOutcome::Succeeded);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

async fn probe_against_status(status: StatusCode) -> ProbeOutcome {
    let router = Router::new().route("/v1/tasks/search", post(move || async move { status }));
    let base = serve(router).await;
    default_probe(&base, &http())
        .run(&http(), ProbeCredential::Bearer(&Sensitive::new("tok")))
        .await
}

#[tokio::test]
async fn probe_answered_403_is_unauthorized_403() {
    let outcome = probe_against_status(StatusCode::FORBIDDEN).await;
    assert_eq!(outcome, ProbeOutcome::Unauthorized { status: 403 });
    assert!(outcome.message("POST x").contains("403 Forbidden"));
}

#[tokio::test]
async fn probe_answered_500_is_failed() {
    let outcome = probe_against_status(StatusCode::INTERNAL_SERVER_ERROR).await;
    assert_eq!(outcome, ProbeOutcome::Failed { status: 500 });
    assert!(outcome.message("POST x").contains("500 Internal Server Error"));
}

#[tokio::test]
async fn probe_of_a_refused_connection_is_unreachable() {
    let standin = standin().await;
    standin.set_refusing_connections(true).await.expect("refusing");
    let token = Sensitive::new("tok-value-123");
    let outcome = default_probe(&standin.url(), &http())
        .run(&http(), ProbeCredential::Bearer(&token))
        .await;
    match outcome {
        ProbeOutcome::Unreachable { cause } => {
            assert!(cause.contains("could not connect"), "{cause}");
            assert_no_credential(&cause, &["tok-value-123"]);
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn probe_of_a_slow_tasklist_is_unreachable_after_the_timeout() {
    let standin = standin().await;
    standin.set_api(EndpointMode::Slow(SERVER_DELAY));
    let started = Instant::now();
    let outcome = default_probe(&standin.url(), &http_with_timeout(Duration::from_secs(1)))
        .run(
            &http_with_timeout(Duration::from_secs(1)),
            ProbeCredential::Bearer(&Sensitive::new("tok")),
        )
        .await;
    match outcome {
        ProbeOutcome::Unreachable { cause } => assert!(cause.contains("no answer within 1s"), "{cause}"),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert_quick(started, QUICK, "a timed-out probe");
}

#[tokio::test]
async fn probe_ignores_a_huge_body() {
    let router = Router::new().route(
        "/v1/tasks/search",
        post(|| async { ([(header::CONTENT_TYPE, "application/json")], endless_body()) }),
    );
    let base = serve(router).await;
    let started = Instant::now();
    let outcome = default_probe(&base, &http())
        .run(&http_with_timeout(LONG_TIMEOUT), ProbeCredential::Bearer(&Sensitive::new("tok")))
        .await;
    // Reading the endless body would end in the timeout (Unreachable), after 30 s.
    assert_eq!(outcome, ProbeOutcome::Succeeded);
    assert_quick(started, QUICK, "a probe with an endless body");
}

// ---------------------------------------------------------------------------------------
// HTTP client: redirects and TLS
// ---------------------------------------------------------------------------------------

/// Counts every request that reaches it and answers with a token.
async fn landing_server(hits: Arc<AtomicUsize>) -> String {
    let router = Router::new()
        .fallback(any(|State(hits): State<Arc<AtomicUsize>>| async move {
            hits.fetch_add(1, Ordering::SeqCst);
            token_json("leaked-token", 300)
        }))
        .with_state(hits);
    serve(router).await
}

fn redirect_to(location: String) -> Response {
    (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response()
}

#[tokio::test]
async fn a_redirect_to_another_port_is_not_followed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let elsewhere = landing_server(hits.clone()).await;
    let target = elsewhere.clone();
    let router = Router::new()
        .route(
            "/oauth/token",
            post(move || async move { redirect_to(format!("{target}/oauth/token")) }),
        )
        .route(
            "/v1/tasks/search",
            post(move || async move { redirect_to(format!("{elsewhere}/v1/tasks/search")) }),
        );
    let base = serve(router).await;
    let http = http();

    let message = token_failure(&http, &format!("{base}/oauth/token"), AuthFailureKind::ServerError).await;
    assert!(message.contains("307"), "{message}");

    let token = Sensitive::new("tok-value-123");
    let outcome = default_probe(&base, &http).run(&http, ProbeCredential::Bearer(&token)).await;
    assert_eq!(outcome, ProbeOutcome::Failed { status: 307 });

    let login = CookieLogin {
        login_url: format!("{base}/oauth/token"),
    };
    let result = login.log_in(&http, &login_credentials(PASSWORD)).await;
    failure_of(result, AuthFailureKind::ServerError);

    assert_eq!(hits.load(Ordering::SeqCst), 0, "a credential travelled to another server");
}

#[tokio::test]
async fn a_redirect_to_another_host_name_on_the_same_port_is_not_followed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let router = Router::new()
        .route(
            "/oauth/token",
            post(move || async move { redirect_to(format!("http://localhost:{port}/landing")) }),
        )
        .route(
            "/landing",
            any(|State(hits): State<Arc<AtomicUsize>>| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                token_json("leaked-token", 300)
            }),
        )
        .with_state(hits.clone());
    tokio::spawn(axum::serve(listener, router).into_future());

    let result = request_token(
        &http(),
        &endpoint(&format!("http://127.0.0.1:{port}/oauth/token"), RequestEncoding::Form, None),
        CLIENT_SECRET,
    )
    .await;
    failure_of(result, AuthFailureKind::ServerError);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect to localhost was followed");
}

#[tokio::test]
async fn a_same_origin_redirect_is_followed_with_the_credential() {
    let secrets_seen = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route("/old/oauth/token", post(|| async { redirect_to("/oauth/token".to_owned()) }))
        .route(
            "/oauth/token",
            post(|State(seen): State<Arc<AtomicUsize>>, body: Bytes| async move {
                let body = String::from_utf8_lossy(&body).into_owned();
                if body.contains(&format!("client_secret={CLIENT_SECRET}")) {
                    seen.fetch_add(1, Ordering::SeqCst);
                    token_json("tok-after-redirect", 120)
                } else {
                    StatusCode::BAD_REQUEST.into_response()
                }
            }),
        )
        .route(
            "/old/v1/tasks/search",
            post(|| async { redirect_to("/v1/tasks/search".to_owned()) }),
        )
        .route(
            "/v1/tasks/search",
            post(|headers: HeaderMap| async move {
                if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some("Bearer tok-after-redirect") {
                    StatusCode::OK
                } else {
                    StatusCode::UNAUTHORIZED
                }
            }),
        )
        .with_state(secrets_seen.clone());
    let base = serve(router).await;
    let http = http();

    let grant = request_token(
        &http,
        &endpoint(&format!("{base}/old/oauth/token"), RequestEncoding::Form, None),
        CLIENT_SECRET,
    )
    .await
    .expect("the redirect is followed");
    assert_eq!(grant.access_token.expose(), "tok-after-redirect");
    assert_eq!(grant.expires_in, Some(120));
    assert_eq!(secrets_seen.load(Ordering::SeqCst), 1);

    let outcome = default_probe(&format!("{base}/old"), &http)
        .run(&http, ProbeCredential::Bearer(&grant.access_token))
        .await;
    assert_eq!(outcome, ProbeOutcome::Succeeded);
}

async fn tls_standin() -> StandinTasklist {
    standin_with(StandinOptions {
        tls: true,
        ..StandinOptions::default()
    })
    .await
}

#[tokio::test]
async fn tls_without_trust_is_refused() {
    let standin = tls_standin().await;
    assert!(standin.token_url().starts_with("https://"));
    let message = token_failure(&http(), &standin.token_url(), AuthFailureKind::ServerError).await;
    assert!(message.to_lowercase().contains("certificate"), "{message}");
    assert!(standin.token_requests().is_empty(), "the request must not reach the server");
}

#[tokio::test]
async fn tls_with_the_ca_is_accepted() {
    let standin = tls_standin().await;
    let trust = TlsTrust {
        extra_roots_pem: standin.ca_pem(),
        ..TlsTrust::default()
    };
    let http = HttpClient::new(&HttpSettings::default(), &trust).expect("a client trusting the CA");
    let grant = request_token(&http, &endpoint(&standin.token_url(), RequestEncoding::Form, None), CLIENT_SECRET)
        .await
        .expect("a token over TLS");
    let outcome = default_probe(&standin.url(), &http)
        .run(&http, ProbeCredential::Bearer(&grant.access_token))
        .await;
    assert_eq!(outcome, ProbeOutcome::Succeeded);
}

/// A Tasklist and token endpoint that require a client certificate (mutual TLS): refused
/// during the handshake without one, before any request; token, login and probe work with it.
#[tokio::test]
async fn a_server_requiring_a_client_certificate_refuses_without_and_accepts_with_it() {
    let standin = standin_with(StandinOptions {
        tls: true,
        require_client_certificate: true,
        ..StandinOptions::default()
    })
    .await;
    let token_endpoint = endpoint(&standin.token_url(), RequestEncoding::Form, None);
    let without = HttpClient::new(
        &HttpSettings::default(),
        &TlsTrust {
            extra_roots_pem: standin.ca_pem(),
            ..TlsTrust::default()
        },
    )
    .expect("a client without a certificate");
    let message = failure_of(
        request_token(&without, &token_endpoint, CLIENT_SECRET).await,
        AuthFailureKind::ServerError,
    );
    assert!(
        testsupport::standin::refused_for_want_of_a_client_certificate(&message),
        "{message}"
    );
    assert!(standin.token_requests().is_empty(), "the request must not reach the server");

    let (certificate, key) = standin.client_identity_pem().expect("a client certificate");
    let identity = Sensitive::new(format!("{certificate}\n{key}\n"));
    let with = HttpClient::new(
        &HttpSettings::default(),
        &TlsTrust {
            extra_roots_pem: standin.ca_pem(),
            client_identity_pem: Some(identity),
            ..TlsTrust::default()
        },
    )
    .expect("a client with the certificate");
    let grant = request_token(&with, &token_endpoint, CLIENT_SECRET)
        .await
        .expect("a token over mutual TLS");
    let outcome = default_probe(&standin.url(), &with)
        .run(&with, ProbeCredential::Bearer(&grant.access_token))
        .await;
    assert_eq!(outcome, ProbeOutcome::Succeeded);
    cookie_login(&standin.url())
        .log_in(&with, &login_credentials(PASSWORD))
        .await
        .expect("a session over mutual TLS");
}

/// A client certificate Secret that is not a certificate and key: its own reason, and the
/// message quotes nothing of it.
#[test]
fn an_unusable_client_certificate_is_a_clear_error() {
    let key_material = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
    for pem in ["not PEM at all", key_material] {
        let trust = TlsTrust {
            client_identity_pem: Some(Sensitive::new(pem)),
            ..TlsTrust::default()
        };
        let error = HttpClient::new(&HttpSettings::default(), &trust).expect_err("an unusable client certificate");
        assert_eq!(Reason::of_http_client_error(&error).as_str(), "InvalidClientCertificate", "{error}");
        assert!(error.to_string().contains("clientCertificateSecretRef"), "{error}");
        assert_no_credential(&error.to_string(), &["MIGHAgEAMBMGByqGSM49"]);
    }
}

#[tokio::test]
async fn tls_with_insecure_skip_verify_is_accepted() {
    let standin = tls_standin().await;
    let trust = TlsTrust {
        insecure_skip_verify: true,
        ..TlsTrust::default()
    };
    let http = HttpClient::new(&HttpSettings::default(), &trust).expect("a client");
    request_token(&http, &endpoint(&standin.token_url(), RequestEncoding::Form, None), CLIENT_SECRET)
        .await
        .expect("a token over unverified TLS");
    let session = cookie_login(&standin.url())
        .log_in(&http, &login_credentials(PASSWORD))
        .await
        .expect("a session over unverified TLS");
    assert!(session.csrf_token.is_some());
}

#[tokio::test]
async fn an_invalid_ca_bundle_is_a_clear_error() {
    let cases = [
        ("not PEM at all", "no certificate"),
        (
            "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n",
            "not valid PEM",
        ),
    ];
    for (pem, expected) in cases {
        let trust = TlsTrust {
            extra_roots_pem: Some(pem.to_owned()),
            ..TlsTrust::default()
        };
        let error = HttpClient::new(&HttpSettings::default(), &trust).expect_err("an invalid CA bundle");
        assert_eq!(
            Reason::of_http_client_error(&error).as_str(),
            "InvalidCABundle",
            "for {pem:?}: {error}"
        );
        assert!(error.to_string().contains(expected), "for {pem:?}: {error}");

        // The same bundle given operator-wide is reported as the operator's.
        let settings = HttpSettings {
            ca_bundle_pem: Some(pem.to_owned()),
            ..HttpSettings::default()
        };
        let error = HttpClient::new(&settings, &TlsTrust::default()).expect_err("an invalid operator CA bundle");
        assert_eq!(
            Reason::of_http_client_error(&error).as_str(),
            "InvalidOperatorCABundle",
            "for {pem:?}: {error}"
        );
        assert!(
            error.to_string().contains("--ca-bundle") && error.to_string().contains(expected),
            "{error}"
        );
    }

    // Valid PEM whose content is not a certificate.
    let trust = TlsTrust {
        extra_roots_pem: Some("-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n".to_owned()),
        ..TlsTrust::default()
    };
    let error = HttpClient::new(&HttpSettings::default(), &trust).expect_err("a PEM block that is not a certificate");
    assert_eq!(Reason::of_http_client_error(&error).as_str(), "InvalidCABundle", "{error}");
    assert!(error.to_string().contains("certificate"), "{error}");
}

#[tokio::test]
async fn the_operator_wide_ca_bundle_is_trusted_for_every_connection() {
    let standin = tls_standin().await;
    // No caSecretRef on the connection: the operator's --ca-bundle alone makes TLS work.
    let settings = HttpSettings {
        ca_bundle_pem: standin.ca_pem(),
        ..HttpSettings::default()
    };
    let http = HttpClient::new(&settings, &TlsTrust::default()).expect("a client trusting the operator's CA");
    request_token(&http, &endpoint(&standin.token_url(), RequestEncoding::Form, None), CLIENT_SECRET)
        .await
        .expect("a token over TLS trusted through --ca-bundle");
    // Both bundles at once: the operator's and the connection's.
    let trust = TlsTrust {
        extra_roots_pem: standin.ca_pem(),
        ..TlsTrust::default()
    };
    let http = HttpClient::new(&settings, &trust).expect("a client with both bundles");
    request_token(&http, &endpoint(&standin.token_url(), RequestEncoding::Form, None), CLIENT_SECRET)
        .await
        .expect("a token with both bundles");
}

/// An unknown scope is refused with `invalid_scope` (Keycloak's answer): a rejection that
/// names the cause, not a server error.
#[tokio::test]
async fn an_unknown_scope_is_rejected_with_invalid_scope() {
    let standin = standin().await;
    let result = request_token(
        &http(),
        &endpoint(&standin.token_url(), RequestEncoding::Form, Some("no-such-scope")),
        CLIENT_SECRET,
    )
    .await;
    let message = failure_of(result, AuthFailureKind::Rejected);
    assert!(message.contains("invalid_scope"), "{message}");
    assert_no_credential(&message, &[CLIENT_SECRET]);
}
