//! The stand-in's state, shared by the request handlers and the test's handle.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng as _;
use rand::distr::Alphanumeric;

use super::assertion::AssertionClients;
use super::bearer::{KnownTokens, TrustedJwks};
use super::oauth::TokenIssuer;
use super::{ApiRequestRecord, EndpointMode, LoginRecord, StandinOptions, TokenAnswer, TokenRequestRecord};

/// Audiences the API accepts besides the configured one: SaaS's and Self-Managed Identity's,
/// and the Application ID URI of Tasklist's app registration in Microsoft Entra ID, for
/// which an Entra-shaped endpoint issues tokens asked with `scope=api://tasklist/.default`.
const ALWAYS_ACCEPTED_AUDIENCES: [&str; 3] = ["tasklist.camunda.io", "tasklist-api", super::ENTRA_TASKLIST_RESOURCE];

/// Spring Session's default idle timeout, which Tasklist keeps (the real value is not
/// published; clients re-login on 401).
pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub(super) struct Shared {
    pub options: StandinOptions,
    pub base_url: String,
    pub issuer: TokenIssuer,
    pub accepted_audiences: Vec<String>,
    /// Held while the trusted JWKS are fetched (across an `.await`, hence tokio's).
    pub jwks_fetch: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

/// Everything that changes while the stand-in runs. The lock is never held across an
/// `.await`.
pub(super) struct State {
    /// client id -> client secret
    pub clients: HashMap<String, String>,
    /// Clients whose tokens are valid but lack the Tasklist permission: the API answers 403.
    pub clients_without_permission: HashSet<String>,
    /// Scopes the token endpoint knows; any other gets `400 invalid_scope`.
    pub known_scopes: HashSet<String>,
    /// username -> password
    pub users: HashMap<String, String>,
    /// username -> password, for HTTP Basic on the API (none: Basic is refused)
    pub basic_users: HashMap<String, String>,
    /// clients that authenticate with private_key_jwt
    pub assertion_clients: AssertionClients,
    pub discovery: EndpointMode,
    pub discovery_requests: usize,
    /// The `token_endpoint` the discovery document names; `None`: this stand-in's own.
    pub discovered_token_endpoint: Option<String>,
    pub token_endpoint: EndpointMode,
    pub login_endpoint: EndpointMode,
    pub api: EndpointMode,
    pub token_answer: TokenAnswer,
    pub token_lifetime: Duration,
    pub expires_in_override: Option<u64>,
    /// Idle timeout of sessions: a session unused this long is gone.
    pub session_timeout: Option<Duration>,
    /// session id (the cookie value) -> session
    pub sessions: HashMap<String, Session>,
    /// Logins that started a session so far.
    pub sessions_started: u64,
    /// session id -> its number (1 for the first login's session, ...), also after the
    /// session ended: how the records name a session cookie.
    pub session_numbers: HashMap<String, u64>,
    pub tokens: KnownTokens,
    pub jwks: TrustedJwks,
    pub token_requests: Vec<TokenRequestRecord>,
    /// Token requests received, counted on arrival (`token_requests` records them on answer).
    pub token_requests_arrived: usize,
    pub logins: Vec<LoginRecord>,
    /// `GET /login` requests.
    pub login_csrf_fetches: usize,
    /// CSRF tokens `GET /login` handed out and no login has used yet.
    pub login_csrf_tokens: HashSet<String>,
    pub api_requests: Vec<ApiRequestRecord>,
}

pub(super) struct Session {
    /// The cookie the session was handed out as (`TASKLIST-SESSION` or `camunda-session`);
    /// it is valid under that name only.
    pub cookie_name: &'static str,
    /// The CSRF token handed out at login, when CSRF protection is on.
    pub csrf_token: Option<String>,
    /// The session's last request (or its login): the idle timeout counts from here.
    pub last_used: Instant,
}

impl Shared {
    pub fn new(options: StandinOptions, base_url: String) -> anyhow::Result<Self> {
        let mut accepted_audiences: Vec<String> = ALWAYS_ACCEPTED_AUDIENCES.iter().map(|audience| audience.to_string()).collect();
        if !accepted_audiences.contains(&options.audience) {
            accepted_audiences.push(options.audience.clone());
        }
        Ok(Self {
            options,
            issuer: TokenIssuer::generate()?,
            base_url,
            accepted_audiences,
            jwks_fetch: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                clients: HashMap::new(),
                clients_without_permission: HashSet::new(),
                known_scopes: HashSet::new(),
                users: HashMap::new(),
                basic_users: HashMap::new(),
                assertion_clients: AssertionClients::default(),
                discovery: EndpointMode::Normal,
                discovered_token_endpoint: None,
                discovery_requests: 0,
                token_endpoint: EndpointMode::Normal,
                login_endpoint: EndpointMode::Normal,
                api: EndpointMode::Normal,
                token_answer: TokenAnswer::Jwt,
                token_lifetime: Duration::from_secs(300),
                expires_in_override: None,
                session_timeout: Some(DEFAULT_SESSION_IDLE_TIMEOUT),
                sessions: HashMap::new(),
                sessions_started: 0,
                session_numbers: HashMap::new(),
                tokens: KnownTokens::default(),
                jwks: TrustedJwks::default(),
                token_requests: Vec::new(),
                token_requests_arrived: 0,
                logins: Vec::new(),
                login_csrf_fetches: 0,
                login_csrf_tokens: HashSet::new(),
                api_requests: Vec::new(),
            }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide the real failure
        // behind poison errors in every later request.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Applies an endpoint's mode before its normal work: `Some(answer)` replaces the normal
/// answer, `None` lets the endpoint proceed (after any delay).
pub(super) async fn apply_mode(mode: EndpointMode, rejection: impl FnOnce() -> Response) -> Option<Response> {
    match mode {
        EndpointMode::Normal => None,
        EndpointMode::Slow(delay) => {
            tokio::time::sleep(delay).await;
            None
        }
        EndpointMode::Down => Some((StatusCode::SERVICE_UNAVAILABLE, "stand-in: service unavailable\n").into_response()),
        EndpointMode::Reject => Some(rejection()),
    }
}

pub(super) fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A random string for session ids, CSRF tokens and opaque access tokens.
pub(super) fn random_token(length: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(length).map(char::from).collect()
}

/// The cookies of a request as (name, value) pairs, from every `Cookie` header.
pub(super) fn request_cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
}

pub(super) fn request_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    request_cookies(headers).find_map(|(cookie, value)| (cookie == name).then_some(value))
}

pub(super) fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

pub(super) fn header_value(value: &str) -> HeaderValue {
    // Only ever built from our own ASCII tokens and fixed strings.
    HeaderValue::from_str(value).expect("stand-in header values are ASCII")
}
