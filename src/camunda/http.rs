use std::sync::Arc;
use std::time::Duration;

use reqwest::{StatusCode, header::HeaderMap, redirect};

use super::Sensitive;
use super::facts::ServerFacts;
use crate::host_health::{HostHealth, origin_of};
use crate::policy::{HostPolicy, PolicyResolver};

/// Limits that apply to every request to Camunda.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The whole exchange, from connecting to the last byte of the answer.
    pub timeout: Duration,
    /// Answers larger than this are not read (a token or a login answer is a few KiB).
    pub max_answer_bytes: usize,
    /// The administrator's host policy, applied again to every address a host name
    /// resolves to when connecting. None: any address.
    pub policy: Option<Arc<HostPolicy>>,
    /// PEM certificates every connection trusts on top of the public roots and its own
    /// `caSecretRef` (`--ca-bundle`, for clusters behind an intercepting proxy).
    pub ca_bundle_pem: Option<String>,
    /// How long each host takes to answer, as every client made with these settings sees it.
    pub health: Arc<HostHealth>,
    /// What every client made with these settings learnt about the servers.
    pub facts: Arc<ServerFacts>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            timeout: Duration::from_secs(10),
            max_answer_bytes: 1024 * 1024,
            policy: None,
            ca_bundle_pem: None,
            health: Arc::default(),
            facts: Arc::default(),
        }
    }
}

/// Which server certificates to accept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsTrust {
    /// PEM certificates trusted in addition to the public roots.
    pub extra_roots_pem: Option<String>,
    /// Accept any certificate (testing only).
    pub insecure_skip_verify: bool,
    /// A client certificate and its private key (PEM, `tls.crt` then `tls.key`) presented
    /// to servers that ask for one (mutual TLS).
    pub client_identity_pem: Option<Sensitive>,
}

/// An HTTP client set up for one trust configuration.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: reqwest::Client,
    settings: HttpSettings,
    /// A salted hash of the trust this client was made for: what it learnt (a discovered
    /// endpoint) is shared only with clients of the same trust.
    trust_key: [u8; 32],
}

/// An answer read in full, within the size cap.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Why no answer could be read.
#[derive(Debug)]
pub(crate) enum TransportError {
    Timeout(Duration),
    Connect(String),
    TooLarge(usize),
    Other(String),
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::Timeout(limit) => write!(f, "no answer within {}", crate::time::in_seconds(*limit)),
            TransportError::Connect(cause) => write!(f, "could not connect: {cause}"),
            TransportError::TooLarge(limit) => write!(f, "the answer is larger than {limit} bytes"),
            TransportError::Other(cause) => write!(f, "{cause}"),
        }
    }
}

/// Why no HTTP client could be set up, told apart so that each gets its own condition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpClientError {
    /// The connection's own CA bundle (`spec.tls.caSecretRef`) cannot be used.
    #[error("the CA bundle from spec.tls.caSecretRef {0}")]
    InvalidCaBundle(String),
    /// The operator-wide CA bundle (`--ca-bundle`) cannot be used.
    #[error("the operator's CA bundle (--ca-bundle) {0}")]
    InvalidOperatorCaBundle(String),
    /// The TLS backend could not be set up, whatever the bundles.
    #[error("cannot set up HTTP: {0}")]
    Setup(String),
    /// The client certificate (`spec.tls.clientCertificateSecretRef`) cannot be used.
    #[error("the client certificate from spec.tls.clientCertificateSecretRef {0}")]
    InvalidClientCertificate(String),
}

/// The certificates of a PEM bundle; the message says what is wrong with it.
fn certificates_of(pem: Option<&str>) -> Result<Vec<reqwest::Certificate>, String> {
    let Some(pem) = pem else { return Ok(Vec::new()) };
    let certificates = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|_| "is not valid PEM".to_string())?;
    if certificates.is_empty() {
        return Err("holds no certificate".into());
    }
    Ok(certificates)
}

impl HttpClient {
    pub fn new(settings: &HttpSettings, trust: &TlsTrust) -> Result<Self, HttpClientError> {
        let operator_roots = certificates_of(settings.ca_bundle_pem.as_deref()).map_err(HttpClientError::InvalidOperatorCaBundle)?;
        let connection_roots = certificates_of(trust.extra_roots_pem.as_deref()).map_err(HttpClientError::InvalidCaBundle)?;
        let identity = client_identity_of(trust.client_identity_pem.as_ref()).map_err(HttpClientError::InvalidClientCertificate)?;
        let build = |roots: &[&[reqwest::Certificate]]| build_client(settings, trust.insecure_skip_verify, roots, identity.as_ref());
        let inner = match build(&[&operator_roots, &connection_roots]) {
            Ok(inner) => inner,
            // A certificate the TLS backend refuses shows only here: find whose it is.
            Err(cause) if !connection_roots.is_empty() && build(&[&operator_roots]).is_ok() => {
                return Err(HttpClientError::InvalidCaBundle(format!(
                    "holds a certificate that cannot be used: {cause}"
                )));
            }
            Err(cause) if !operator_roots.is_empty() && build(&[]).is_ok() => {
                return Err(HttpClientError::InvalidOperatorCaBundle(format!(
                    "holds a certificate that cannot be used: {cause}"
                )));
            }
            Err(cause) => return Err(HttpClientError::Setup(cause)),
        };
        let mut trust_key = crate::key_hash::KeyHash::new();
        trust_key.trust(trust);
        Ok(HttpClient {
            inner,
            settings: settings.clone(),
            trust_key: trust_key.finish(),
        })
    }

    /// See [`HttpClient::trust_key`]'s field.
    pub(crate) fn trust_key(&self) -> [u8; 32] {
        self.trust_key
    }

    /// What the clients of the same settings learnt about the servers.
    pub fn facts(&self) -> &Arc<ServerFacts> {
        &self.settings.facts
    }

    /// The administrator's host policy this client enforces, if any.
    pub(crate) fn host_policy(&self) -> Option<&HostPolicy> {
        self.settings.policy.as_deref()
    }

    pub(crate) fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.inner.request(method, url)
    }

    /// Sends the request, timing how long its host takes to answer ([`HostHealth`]).
    async fn execute(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, TransportError> {
        let (_, request) = request.build_split();
        let request = request.map_err(|e| self.describe(&e))?;
        let waiting = origin_of(request.url()).map(|host| self.settings.health.sent(host, std::time::Instant::now()));
        let response = self.inner.execute(request).await;
        if let Some(waiting) = waiting {
            waiting.answered(std::time::Instant::now());
        }
        response.map_err(|e| self.describe(&e))
    }

    /// Sends the request and reads the answer, at most `max_answer_bytes` of it.
    pub(crate) async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, TransportError> {
        let mut response = self.execute(request).await?;
        let limit = self.settings.max_answer_bytes;
        if response.content_length().is_some_and(|length| length > limit as u64) {
            return Err(TransportError::TooLarge(limit));
        }
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.describe(&e))? {
            if body.len() + chunk.len() > limit {
                return Err(TransportError::TooLarge(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, headers, body })
    }

    /// Sends the request and returns only the status; the body is never read.
    pub(crate) async fn status_of(&self, request: reqwest::RequestBuilder) -> Result<reqwest::StatusCode, TransportError> {
        let response = self.execute(request).await?;
        Ok(response.status())
    }

    fn describe(&self, error: &reqwest::Error) -> TransportError {
        if error.is_timeout() {
            TransportError::Timeout(self.settings.timeout)
        } else if error.is_connect() {
            TransportError::Connect(root_cause(error))
        } else {
            TransportError::Other(root_cause(error))
        }
    }
}

/// The client certificate and key of a PEM bundle; the message says what is wrong with it
/// (and never quotes the key).
fn client_identity_of(pem: Option<&Sensitive>) -> Result<Option<reqwest::Identity>, String> {
    let Some(pem) = pem else { return Ok(None) };
    reqwest::Identity::from_pem(pem.expose().as_bytes())
        .map(Some)
        .map_err(|_| "is not a PEM certificate with its PKCS#8, PKCS#1 or SEC1 private key (tls.crt, tls.key)".to_owned())
}

fn build_client(
    settings: &HttpSettings,
    insecure_skip_verify: bool,
    roots: &[&[reqwest::Certificate]],
    identity: Option<&reqwest::Identity>,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .redirect(same_origin_redirects())
        // HTTP(S)_PROXY and ALL_PROXY are ignored: through a proxy, the resolver below would
        // check the proxy's address instead of the host a credential goes to. An
        // intercepting proxy is trusted with --ca-bundle instead.
        .no_proxy()
        .user_agent(concat!("tasklist-operator/", env!("CARGO_PKG_VERSION")));
    for certificate in roots.iter().flat_map(|bundle| bundle.iter()) {
        builder = builder.add_root_certificate(certificate.clone());
    }
    if insecure_skip_verify {
        builder = builder.danger_accept_invalid_certs(true);
    }
    if let Some(identity) = identity {
        builder = builder.identity(identity.clone());
    }
    if let Some(policy) = &settings.policy {
        builder = builder.dns_resolver(Arc::new(PolicyResolver::new(policy.clone())));
    }
    builder.build().map_err(|error| root_cause(&error))
}

/// Follows redirects only within the same scheme, host and port, so that a credential
/// sent in a header or body never travels to a server the user did not name.
fn same_origin_redirects() -> redirect::Policy {
    redirect::Policy::custom(|attempt| {
        let origin = attempt.previous().first().map(|url| {
            (
                url.scheme().to_owned(),
                url.host_str().map(str::to_owned),
                url.port_or_known_default(),
            )
        });
        let target = (
            attempt.url().scheme().to_owned(),
            attempt.url().host_str().map(str::to_owned),
            attempt.url().port_or_known_default(),
        );
        if attempt.previous().len() > 5 || origin.as_ref() != Some(&target) {
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
}

/// The innermost cause of an error ("Connection refused (os error 111)", "invalid peer
/// certificate: UnknownIssuer"): what a person needs, without the URL reqwest adds.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// A short, printable excerpt of an answer body for error messages: at most `max` chars,
/// one line, control characters dropped.
pub(crate) fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(max).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// `404 Not Found`, for messages.
pub(crate) fn describe_status(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}
