use std::sync::Arc;
use std::time::Duration;

use reqwest::{StatusCode, header::HeaderMap, redirect};

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
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            timeout: Duration::from_secs(10),
            max_answer_bytes: 1024 * 1024,
            policy: None,
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
}

/// An HTTP client set up for one trust configuration.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: reqwest::Client,
    settings: HttpSettings,
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
            TransportError::Timeout(limit) => write!(f, "no answer within {}s", limit.as_secs_f64()),
            TransportError::Connect(cause) => write!(f, "could not connect: {cause}"),
            TransportError::TooLarge(limit) => write!(f, "the answer is larger than {limit} bytes"),
            TransportError::Other(cause) => write!(f, "{cause}"),
        }
    }
}

impl HttpClient {
    pub fn new(settings: &HttpSettings, trust: &TlsTrust) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(same_origin_redirects())
            .user_agent(concat!("tasklist-operator/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &trust.extra_roots_pem {
            let certificates =
                reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|_| "the CA bundle is not valid PEM".to_string())?;
            if certificates.is_empty() {
                return Err("the CA bundle holds no certificate".into());
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if trust.insecure_skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(policy) = &settings.policy {
            builder = builder.dns_resolver(Arc::new(PolicyResolver::new(policy.clone())));
        }
        let inner = builder
            .build()
            .map_err(|error| format!("cannot set up HTTP: {}", root_cause(&error)))?;
        Ok(HttpClient {
            inner,
            settings: settings.clone(),
        })
    }

    pub(crate) fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.inner.request(method, url)
    }

    /// Sends the request and reads the answer, at most `max_answer_bytes` of it.
    pub(crate) async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, TransportError> {
        let mut response = request.send().await.map_err(|e| self.describe(&e))?;
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
        let response = request.send().await.map_err(|e| self.describe(&e))?;
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
