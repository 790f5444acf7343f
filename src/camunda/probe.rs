//! The request that checks whether Tasklist accepts a credential.

use std::time::Duration;

use reqwest::Method;

use super::http::HttpClient;
use super::token::describe_status;
use super::{Sensitive, join_url};
use crate::crd::{ProbeMethod, ProbeSpec};

/// What a request to Tasklist carries to prove who it is.
#[derive(Debug, Clone, Copy)]
pub enum ProbeCredential<'a> {
    Bearer(&'a Sensitive),
    /// A complete `Authorization` header value (HTTP Basic).
    Authorization(&'a Sensitive),
    Session {
        cookie_header: &'a Sensitive,
        csrf_token: Option<&'a Sensitive>,
        /// The header name the server expects the CSRF token under.
        csrf_header: &'static str,
    },
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Succeeded,
    /// 401 or 403: Tasklist does not accept the credential (or, for 403, lacks permission).
    Unauthorized {
        status: u16,
    },
    /// Any other non-2xx answer.
    Failed {
        status: u16,
    },
    /// Timeout or connection failure.
    Unreachable {
        cause: String,
    },
}

impl ProbeOutcome {
    /// A sentence for the Reachable condition.
    pub fn message(&self, request: &str) -> String {
        match self {
            ProbeOutcome::Succeeded => format!("{request} succeeded"),
            ProbeOutcome::Unauthorized { status: 401 } => {
                format!("{request} answered 401 Unauthorized: Tasklist does not accept the credential")
            }
            ProbeOutcome::Unauthorized { status } => format!(
                "{request} answered {}: the credential is accepted but not allowed (does the client have the Tasklist API permission?)",
                describe_status(reqwest::StatusCode::from_u16(*status).unwrap_or(reqwest::StatusCode::FORBIDDEN))
            ),
            ProbeOutcome::Failed { status } => format!(
                "{request} answered {}",
                reqwest::StatusCode::from_u16(*status)
                    .map(describe_status)
                    .unwrap_or_else(|_| status.to_string())
            ),
            ProbeOutcome::Unreachable { cause } => format!("{request} failed: {cause}"),
        }
    }
}

/// The configured probe request against one Tasklist.
#[derive(Debug, Clone)]
pub struct Probe {
    pub url: String,
    pub method: ProbeMethod,
    pub body: String,
    /// How long the whole probe may take; `None`: the HTTP client's request timeout.
    pub timeout: Option<Duration>,
}

impl Probe {
    pub fn new(base_url: &str, spec: &ProbeSpec) -> Self {
        Probe {
            url: join_url(base_url, &spec.path),
            method: spec.method,
            body: spec.body.clone(),
            timeout: None,
        }
    }

    /// The same probe, given up after `timeout` (a probe is a small query: a Tasklist that
    /// takes longer is as good as unreachable, and a shorter wait frees its probe slot sooner).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// "POST https://…/v1/tasks/search", for messages.
    pub fn describe(&self) -> String {
        let method = match self.method {
            ProbeMethod::Get => "GET",
            ProbeMethod::Post => "POST",
        };
        format!("{method} {}", self.url)
    }

    pub async fn run(&self, http: &HttpClient, credential: ProbeCredential<'_>) -> ProbeOutcome {
        let request = match self.method {
            ProbeMethod::Get => http.request(Method::GET, &self.url),
            ProbeMethod::Post => http
                .request(Method::POST, &self.url)
                .header("content-type", "application/json")
                .body(self.body.clone()),
        };
        let request = match credential {
            ProbeCredential::Bearer(token) => request.bearer_auth(token.expose()),
            ProbeCredential::Authorization(value) => {
                let mut value = reqwest::header::HeaderValue::from_str(value.expose())
                    .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static(""));
                value.set_sensitive(true);
                request.header(reqwest::header::AUTHORIZATION, value)
            }
            ProbeCredential::Session {
                cookie_header,
                csrf_token,
                csrf_header,
            } => {
                let request = request.header("cookie", cookie_header.expose());
                match csrf_token {
                    Some(token) => request.header(csrf_header, token.expose()),
                    None => request,
                }
            }
        };
        let answer = http.status_of(request.header("accept", "application/json"));
        let answer = match self.timeout {
            Some(limit) => match tokio::time::timeout(limit, answer).await {
                Ok(answer) => answer,
                Err(_) => {
                    return ProbeOutcome::Unreachable {
                        cause: format!("no answer within {}s", limit.as_secs_f64()),
                    };
                }
            },
            None => answer.await,
        };
        match answer {
            Ok(status) if status.is_success() => ProbeOutcome::Succeeded,
            Ok(status) if matches!(status.as_u16(), 401 | 403) => ProbeOutcome::Unauthorized { status: status.as_u16() },
            Ok(status) => ProbeOutcome::Failed { status: status.as_u16() },
            Err(error) => ProbeOutcome::Unreachable { cause: error.to_string() },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::camunda::{HttpSettings, Sensitive, TlsTrust};

    /// A listener that accepts and never answers: the probe gives up after its own timeout,
    /// not the client's request timeout, and says so.
    #[tokio::test]
    async fn a_probe_gives_up_after_its_own_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback listener");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let settings = HttpSettings {
            timeout: Duration::from_secs(600),
            ..HttpSettings::default()
        };
        let http = HttpClient::new(&settings, &TlsTrust::default()).expect("a client");
        let probe = Probe::new(&url, &ProbeSpec::default()).with_timeout(Duration::from_millis(200));
        let token = Sensitive::new("token");
        let outcome = tokio::time::timeout(Duration::from_secs(60), probe.run(&http, ProbeCredential::Bearer(&token)))
            .await
            .expect("the probe's own timeout ends it, long before the request timeout");
        assert_eq!(
            outcome,
            ProbeOutcome::Unreachable {
                cause: "no answer within 0.2s".into()
            }
        );
    }
}
