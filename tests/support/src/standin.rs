//! A stand-in for Camunda's Tasklist and its OAuth2 token endpoint, for tests.
//!
//! Each test starts its own server on `127.0.0.1` with an ephemeral port. It behaves like
//! the real servers in the ways the operator depends on (see the wire facts in
//! `/work/shared/reference/camunda-wire-facts.md`):
//!
//! - `POST /oauth/token`: SaaS-style client credentials (form or JSON body, or HTTP Basic),
//!   answered with an ES256-signed JWT;
//! - `POST /api/login`, `POST /api/logout`: Tasklist's cookie login with CSRF protection;
//!   `POST /login` (8.8+), optionally demanding a CSRF token from `GET /login` first;
//! - `/v1/**` and `/v2/**`: the Tasklist API as a connectivity probe, which accepts only a
//!   valid bearer JWT or a live session cookie (plus the CSRF token on state-changing
//!   requests).
//!
//! Tests flip switches (an endpoint down, slow or rejecting; odd token answers; revoked
//! credentials; refused connections) and read back what the server saw.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use testsupport::standin::StandinTasklist;
//! let tasklist = StandinTasklist::start().await?;
//! tasklist.add_client("orders", "s3cret");
//! // point a TasklistConnection at tasklist.url() and tasklist.token_url() ...
//! # Ok(()) }
//! ```

mod assertion;
pub use assertion::FederatedCredential;
mod bearer;
mod listener;
mod oauth;
mod state;
mod tasklist;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::Router;
use axum::routing::{any, get, post};

use self::listener::Listener;
use self::state::Shared;

/// The name of Tasklist's session cookie.
pub const SESSION_COOKIE: &str = "TASKLIST-SESSION";
/// The session cookie of Camunda 8.8+ unified authentication (login at `POST /login`).
pub const UNIFIED_SESSION_COOKIE: &str = "camunda-session";
/// The audience SaaS requires for the Orchestration Cluster API (`/v2/**`).
pub const ZEEBE_AUDIENCE: &str = "zeebe.camunda.io";
/// The Application ID URI of Tasklist's app registration at an Entra-shaped endpoint
/// ([`StandinOptions::audience`] empty): its tokens are asked with `scope=api://tasklist/.default`.
pub const ENTRA_TASKLIST_RESOURCE: &str = "api://tasklist";
/// The CSRF header and cookie name of Tasklist 8.5 and later.
pub const CSRF_NAME: &str = "X-CSRF-TOKEN";
/// The CSRF header and cookie name of older Tasklist versions.
pub const LEGACY_CSRF_NAME: &str = "TASKLIST-X-CSRF-TOKEN";

/// How a stand-in is set up; fixed for its lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandinOptions {
    /// Serve HTTPS with a certificate for `127.0.0.1` and `localhost`, signed by a CA
    /// generated at start (see [`StandinTasklist::ca_pem`]).
    pub tls: bool,
    /// Tasklist's CSRF protection (`camunda.tasklist.csrfPreventionEnabled`); default on.
    pub csrf: bool,
    /// Use the older CSRF name `TASKLIST-X-CSRF-TOKEN` for both the header and the cookie.
    pub legacy_csrf_name: bool,
    /// The audience the token endpoint requires; default `tasklist.camunda.io`. Empty: the
    /// endpoint acts like Microsoft Entra ID (no `audience` parameter allowed; a `scope` of
    /// `<resource>/.default` names the token's audience).
    /// The API accepts tokens for it as well as for `tasklist.camunda.io` and `tasklist-api`.
    pub audience: String,
    /// With `tls`: require a client certificate signed by the stand-in's CA (mutual TLS, as
    /// some identity providers do); see [`StandinTasklist::client_identity_pem`].
    pub require_client_certificate: bool,
    /// The login at `POST /login` (Camunda 8.8+) demands a CSRF token handed out by a
    /// preceding `GET /login`, sent back as the `X-CSRF-TOKEN` header with the cookie of the
    /// same name (camunda-docs PR 10031); without it the login answers 403. Default off:
    /// `GET /login` then answers 405, as before. `POST /api/login` never demands one.
    pub login_requires_csrf: bool,
    /// Which Tasklist APIs are served (the others answer `404` to an authenticated request);
    /// default both.
    pub apis: TasklistApis,
    /// The address to listen on, and the host of [`StandinTasklist::url`]; default 127.0.0.1.
    /// The node tests use the node's address, which Pods reach.
    pub listen_address: std::net::Ipv4Addr,
}

impl Default for StandinOptions {
    fn default() -> Self {
        Self {
            tls: false,
            csrf: true,
            legacy_csrf_name: false,
            audience: "tasklist.camunda.io".to_owned(),
            login_requires_csrf: false,
            require_client_certificate: false,
            apis: TasklistApis::Both,
            listen_address: std::net::Ipv4Addr::LOCALHOST,
        }
    }
}

impl StandinOptions {
    /// The CSRF header and cookie name these options select.
    pub fn csrf_name(&self) -> &'static str {
        if self.legacy_csrf_name { LEGACY_CSRF_NAME } else { CSRF_NAME }
    }
}

/// Which Tasklist APIs a stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TasklistApis {
    /// `/v1/**` and `/v2/**` (Camunda 8.8 and 8.9).
    #[default]
    Both,
    /// `/v1/**` only (Camunda 8.6 and 8.7).
    V1Only,
    /// `/v2/**` only (Camunda 8.10, which removed v1). The whole cluster is the
    /// Orchestration Cluster: on SaaS, tokens need the `zeebe.camunda.io` audience on any
    /// path, so a v1 path answers `404` to them.
    V2Only,
}

impl TasklistApis {
    /// Whether a path of this API version is served.
    pub fn serves(self, path: &str) -> bool {
        match self {
            TasklistApis::Both => true,
            TasklistApis::V1Only => path.starts_with("/v1/"),
            TasklistApis::V2Only => path.starts_with("/v2/"),
        }
    }
}

/// How an endpoint behaves; each switch takes effect for the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointMode {
    /// Works as the real server does.
    #[default]
    Normal,
    /// `503 Service Unavailable` with a small body.
    Down,
    /// Waits this long, then answers normally.
    Slow(Duration),
    /// Rejects every request: the token endpoint with `401 invalid_client`, login and the
    /// API with `401`.
    Reject,
}

/// What a successful token request gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenAnswer {
    /// A signed JWT with `expires_in` (the default).
    #[default]
    Jwt,
    /// A random token that is not a JWT, with `expires_in`. The API accepts it for the
    /// token lifetime.
    OpaqueWithExpiresIn,
    /// A random token that is not a JWT, without `expires_in`. The API accepts it for the
    /// token lifetime.
    OpaqueWithoutExpiresIn,
    /// `200` with an HTML page (a proxy's or login page instead of the token endpoint).
    Html200,
    /// `200` with a JSON body that has no `access_token`.
    JsonWithoutAccessToken,
    /// `200` with a 10 MB body: valid JSON with a working token after 10 MB of padding, so
    /// only a client that limits the answer's size rejects it.
    Huge,
    /// A careless server: `401 invalid_client` whose `error_description` repeats the client
    /// secret it was sent, starting at character [`ECHO_SECRET_AT`] of
    /// `"<error>: <error_description>"`, so that it straddles a 200-character cut; then the
    /// HTTP Basic form (`base64(client_id:client_secret)`).
    EchoSecretInError,
    /// Keycloak's behaviour: a JSON body gets `400 {"error":"invalid_request",
    /// "error_description":"Missing form parameter: grant_type"}`; a form body works.
    Keycloak400ForJson,
}

/// Where [`TokenAnswer::EchoSecretInError`] puts the client secret in
/// `"<error>: <error_description>"`.
pub const ECHO_SECRET_AT: usize = 195;

/// How a token request carried its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRequestEncoding {
    /// `application/x-www-form-urlencoded` body with the client credentials in it.
    Form,
    /// `application/json` body with the client credentials in it.
    Json,
    /// Client credentials in an HTTP Basic `Authorization` header (body of either kind).
    Basic,
    /// A signed client assertion (private_key_jwt) in a form or JSON body.
    Assertion,
    /// A body of any other content type (answered with `400`).
    Other,
}

/// One request to `POST /oauth/token`. Never holds the client secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequestRecord {
    pub time: SystemTime,
    pub encoding: TokenRequestEncoding,
    /// Empty when the request had none.
    pub client_id: String,
    /// Empty when the request had none.
    pub audience: String,
    pub scope: Option<String>,
    pub status: u16,
}

/// One request to `POST /api/login` or `POST /login`. Never holds the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRecord {
    pub time: SystemTime,
    /// `/api/login` or `/login`.
    pub path: &'static str,
    /// Empty when the request had none.
    pub username: String,
    /// Whether it carried a CSRF header (valid or not).
    pub csrf_header: bool,
    pub status: u16,
}

/// The credential an API request presented (whether or not it was valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// An `Authorization: Bearer ...` header.
    Bearer,
    /// A `TASKLIST-SESSION` cookie (and no bearer token).
    Cookie,
    /// An `Authorization: Basic ...` header.
    Basic,
    /// Neither.
    None,
}

/// One request to `/v1/**` or `/v2/**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequestRecord {
    pub time: SystemTime,
    pub method: String,
    pub path: String,
    pub auth: AuthKind,
    pub status: u16,
    /// The `exp` of the bearer JWT the request carried (read without checking the
    /// signature), so that a refusal can be told apart: expired, or invalid for another reason.
    pub bearer_expires_at: Option<SystemTime>,
    /// Which credential the request carried, by a name that is not itself a secret: a
    /// bearer JWT's `jti`, a Basic username, or `session-N` for the N-th login's session
    /// cookie (whether or not it was valid). `None` without any, or for an opaque token.
    pub credential: Option<String>,
}

/// A running stand-in. Clones share one server, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct StandinTasklist {
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    ca_pem: Option<String>,
    /// With TLS: a client certificate the CA signed and its key (PEM).
    client_identity_pem: Option<String>,
    /// The HTTP client [`Self::call_api_with_secret`] uses, trusting `ca_pem`.
    app_client: reqwest::Client,
}

impl StandinTasklist {
    /// Starts a stand-in with the default options (plain HTTP, CSRF on).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(StandinOptions::default()).await
    }

    pub async fn start_with(options: StandinOptions) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpListener::bind((options.listen_address, 0))
            .await
            .with_context(|| format!("binding the stand-in Tasklist to {}", options.listen_address))?;
        let port = tcp.local_addr()?.port();
        let tls = if options.tls {
            Some(listener::generate_tls(options.require_client_certificate).context("generating TLS material for the stand-in")?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{}:{port}", options.listen_address);

        let shared = Arc::new(Shared::new(options, base_url)?);
        let router = Router::new()
            .route("/oauth/token", post(oauth::token))
            .route("/.well-known/openid-configuration", get(oauth::discovery))
            .route("/api/login", post(tasklist::login))
            .route("/api/logout", post(tasklist::logout))
            .route("/login", post(tasklist::unified_login).get(tasklist::login_csrf))
            .route("/v1/{*rest}", any(tasklist::api))
            .route("/v2/{*rest}", any(tasklist::api))
            .with_state(shared.clone());

        let mut app_client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            // A fresh connection per call, so refused connections show at once.
            .pool_max_idle_per_host(0);
        if let Some(tls) = &tls {
            app_client = app_client
                .add_root_certificate(reqwest::Certificate::from_pem(tls.ca_pem.as_bytes())?)
                .identity(reqwest::Identity::from_pem(tls.client_identity_pem.as_bytes())?);
        }
        let app_client = app_client.build()?;

        let ca_pem = tls.as_ref().map(|tls| tls.ca_pem.clone());
        let client_identity_pem = tls.as_ref().map(|tls| tls.client_identity_pem.clone());
        let listener = Listener::start(tcp, tls.map(|tls| tls.acceptor), router);
        Ok(Self {
            shared,
            listener: Arc::new(listener),
            ca_pem,
            client_identity_pem,
            app_client,
        })
    }

    /// The base URL of "Tasklist", e.g. `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// `{url}/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.shared.base_url)
    }

    /// With TLS: the PEM of the CA that signed the server certificate.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem.clone()
    }

    /// With TLS: a client certificate signed by the stand-in's CA and its private key, as
    /// (`tls.crt`, `tls.key`) PEM; a stand-in with `require_client_certificate` accepts it.
    pub fn client_identity_pem(&self) -> Option<(String, String)> {
        let pem = self.client_identity_pem.as_ref()?;
        let split = pem.find("-----BEGIN PRIVATE KEY-----")?;
        Some((pem[..split].to_owned(), pem[split..].to_owned()))
    }

    pub fn options(&self) -> &StandinOptions {
        &self.shared.options
    }

    /// Registers (or replaces) an OAuth2 client.
    pub fn add_client(&self, client_id: &str, client_secret: &str) {
        self.shared.lock().clients.insert(client_id.to_owned(), client_secret.to_owned());
    }

    /// Registers (or replaces) an OAuth2 client whose tokens are valid but lack the
    /// "Tasklist API" permission: the API answers them `403`.
    pub fn add_client_without_permission(&self, client_id: &str, client_secret: &str) {
        let mut state = self.shared.lock();
        state.clients.insert(client_id.to_owned(), client_secret.to_owned());
        state.clients_without_permission.insert(client_id.to_owned());
    }

    /// Lets the token endpoint grant `scope`; a request for any scope not added gets
    /// `400 invalid_scope`, as Keycloak answers.
    pub fn add_scope(&self, scope: &str) {
        self.shared.lock().known_scopes.insert(scope.to_owned());
    }

    /// Registers (or replaces) a Tasklist user for cookie login.
    pub fn add_user(&self, username: &str, password: &str) {
        self.shared.lock().users.insert(username.to_owned(), password.to_owned());
    }

    /// Accepts HTTP Basic with this username and password on the API (Camunda 8.8+ with
    /// Basic authentication). Without any, an `Authorization: Basic` header gets 401.
    pub fn accept_basic(&self, username: &str, password: &str) {
        self.shared.lock().basic_users.insert(username.to_owned(), password.to_owned());
    }

    /// Refuses HTTP Basic for this username from now on (a user deleted or renamed).
    pub fn forget_basic(&self, username: &str) {
        self.shared.lock().basic_users.remove(username);
    }

    /// Registers (or replaces) a client that authenticates with private_key_jwt, with the
    /// public keys (JWKS JSON) the server checks its assertions against.
    pub fn add_assertion_client(&self, client_id: &str, jwks: &serde_json::Value) -> anyhow::Result<()> {
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).context("the JWKS does not parse")?;
        self.shared.lock().assertion_clients.keys.insert(client_id.to_owned(), jwks);
        Ok(())
    }

    /// Registers (or replaces) application `app_id` with a federated identity credential, as
    /// Microsoft Entra ID's workload identity federation keeps one: a token request with
    /// `client_id=app_id` and a `client_assertion` signed by one of `jwks` (the issuer's
    /// keys), with exactly this issuer, subject and audience, gets a token.
    pub fn add_federated_client(&self, app_id: &str, credential: FederatedCredential) {
        self.shared.lock().assertion_clients.federated.insert(app_id.to_owned(), credential);
    }

    /// Every federated client assertion the token endpoint received, accepted or not.
    pub fn federated_assertions_received(&self) -> Vec<String> {
        self.shared.lock().assertion_clients.federated_received.clone()
    }

    /// Makes the token endpoint's clock run this far ahead when it checks assertions.
    pub fn set_assertion_clock_ahead(&self, ahead: Duration) {
        self.shared.lock().assertion_clients.clock_ahead = ahead;
    }

    /// `{url}`: the issuer whose discovery document names [`Self::token_url`].
    pub fn issuer(&self) -> String {
        self.shared.base_url.clone()
    }

    /// For `GET /.well-known/openid-configuration`; `Reject` answers 404.
    pub fn set_discovery(&self, mode: EndpointMode) {
        self.shared.lock().discovery = mode;
    }

    /// Makes the discovery document name `endpoint` as the token endpoint (an impostor of
    /// the issuer sending clients elsewhere).
    pub fn set_discovered_token_endpoint(&self, endpoint: &str) {
        self.shared.lock().discovered_token_endpoint = Some(endpoint.to_owned());
    }

    /// How many discovery documents were requested.
    pub fn discovery_requests(&self) -> usize {
        self.shared.lock().discovery_requests
    }

    /// Also accepts bearer JWTs signed by the keys of this JWKS (e.g. Keycloak's
    /// `.../protocol/openid-connect/certs`). Keys are fetched when a token needs them.
    pub fn trust_jwks(&self, jwks_url: &str) {
        self.shared.lock().jwks.trust(jwks_url);
    }

    pub fn set_token_endpoint(&self, mode: EndpointMode) {
        self.shared.lock().token_endpoint = mode;
    }

    pub fn set_login_endpoint(&self, mode: EndpointMode) {
        self.shared.lock().login_endpoint = mode;
    }

    /// For `/v1/**` and `/v2/**`.
    pub fn set_api(&self, mode: EndpointMode) {
        self.shared.lock().api = mode;
    }

    pub fn set_token_answer(&self, answer: TokenAnswer) {
        self.shared.lock().token_answer = answer;
    }

    /// The lifetime of issued tokens (JWT `exp` and `expires_in`); default 300 s.
    /// Rounded up to whole seconds.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().token_lifetime = lifetime;
    }

    /// Reports this `expires_in` instead of the token lifetime, while the JWT's `exp` stays
    /// at the lifetime (as SaaS does when it hands out a cached token).
    pub fn set_expires_in_override(&self, seconds: Option<u64>) {
        self.shared.lock().expires_in_override = seconds;
    }

    /// Sessions end after this long without a request (an idle timeout; default 30 min,
    /// Spring's); `None` keeps them until [`Self::revoke_sessions`] or logout. Applies to
    /// existing sessions too.
    pub fn set_session_timeout(&self, timeout: Option<Duration>) {
        self.shared.lock().session_timeout = timeout;
    }

    /// Forgets every session, as a Tasklist restart does.
    pub fn revoke_sessions(&self) {
        self.shared.lock().sessions.clear();
    }

    /// Rejects every bearer token issued before now: all tokens this stand-in issued or
    /// has seen, and trusted-JWKS tokens it has not seen whose `iat` is before the current
    /// second.
    pub fn revoke_tokens(&self) {
        self.shared.lock().tokens.revoke_all(SystemTime::now());
    }

    /// `true` closes the listener and drops open connections, so that connecting fails with
    /// "connection refused"; `false` listens again on the same port.
    pub async fn set_refusing_connections(&self, refusing: bool) -> anyhow::Result<()> {
        self.listener.set_refusing(refusing).await
    }

    pub fn token_requests(&self) -> Vec<TokenRequestRecord> {
        self.shared.lock().token_requests.clone()
    }

    /// Token requests received so far, including those not answered yet (e.g. while the
    /// endpoint is [`EndpointMode::Slow`]).
    pub fn token_requests_arrived(&self) -> usize {
        self.shared.lock().token_requests_arrived
    }

    pub fn logins(&self) -> Vec<LoginRecord> {
        self.shared.lock().logins.clone()
    }

    /// How many `GET /login` requests asked for a CSRF token (answered or not).
    pub fn login_csrf_fetches(&self) -> usize {
        self.shared.lock().login_csrf_fetches
    }

    pub fn api_requests(&self) -> Vec<ApiRequestRecord> {
        self.shared.lock().api_requests.clone()
    }

    /// Acts like an application Pod using the operator's derived Secret: sends its
    /// `authorization` as the `Authorization` header, or else its `cookie` as the `Cookie`
    /// header plus its `csrfToken` (when present) as the CSRF header, in a
    /// `POST {url}/v1/tasks/search` with `{"pageSize":1}`. Returns the status code.
    ///
    /// The CSRF header gets the name this stand-in expects (legacy or current), as an
    /// application written for that Tasklist version would send.
    pub async fn call_api_with_secret(&self, secret_data: &BTreeMap<String, String>) -> anyhow::Result<u16> {
        let mut request = self
            .app_client
            .post(format!("{}/v1/tasks/search", self.shared.base_url))
            .json(&serde_json::json!({ "pageSize": 1 }));
        if let Some(authorization) = secret_data.get("authorization") {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        } else if let Some(cookie) = secret_data.get("cookie") {
            request = request.header(reqwest::header::COOKIE, cookie);
            if let Some(csrf_token) = secret_data.get("csrfToken") {
                request = request.header(self.shared.options.csrf_name(), csrf_token);
            }
        }
        let response = request.send().await.context("calling the stand-in Tasklist API")?;
        Ok(response.status().as_u16())
    }
}

/// Whether `message` says a TLS server refused the connection for want of a client
/// certificate. With TLS 1.3 the server's `certificate_required` alert comes after the
/// client's handshake has finished: the client sees the alert, or, when its request was
/// already on its way, only that the server closed the connection (while it read, or while
/// it still wrote: a broken pipe).
pub fn refused_for_want_of_a_client_certificate(message: &str) -> bool {
    [
        "CertificateRequired",
        "channel closed",
        "connection closed",
        "connection reset",
        "broken pipe",
    ]
    .iter()
    .any(|sign| message.contains(sign))
}
