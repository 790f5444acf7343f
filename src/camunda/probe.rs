//! The request that checks whether Tasklist accepts a credential.
//!
//! Without an explicit `spec.probe.path` the probe is automatic, so that one default works
//! on Camunda 8.6 to 8.10: it sends the v1 request (`POST /v1/tasks/search`, served up to
//! 8.9) and, where that endpoint does not exist (8.10 removed the v1 API), the v2 request
//! (`POST /v2/user-tasks/search`, 8.8+). Both need authentication, so an answer proves the
//! credential; unauthenticated endpoints (`GET /v2/license`) are never used. Which API
//! answered is remembered per base URL (in the HTTP clients' [`super::facts`]), so that a v2-only
//! Tasklist costs the extra request once.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;

use super::facts::ServerFacts;
use super::http::{HttpClient, describe_status};
pub use super::tasklist_api::TasklistApi;
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

/// Whether an answer says the endpoint does not exist on this Tasklist (so the other API
/// is worth a try), rather than anything about the credential.
fn endpoint_missing(outcome: &ProbeOutcome) -> bool {
    matches!(outcome, ProbeOutcome::Failed { status: 404 | 405 })
}

/// Which API to remember after an automatic probe sent `tried` (in order) and got `outcome`
/// from the last: the last one, unless it too said it does not exist.
fn api_that_answered(tried: &[TasklistApi], outcome: &ProbeOutcome) -> Option<TasklistApi> {
    match outcome {
        ProbeOutcome::Unreachable { .. } => None,
        outcome if endpoint_missing(outcome) => None,
        _ => tried.last().copied(),
    }
}

/// The configured probe request against one Tasklist.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The (first) request: the explicit one, or the automatic probe's remembered API.
    pub url: String,
    pub method: ProbeMethod,
    pub body: String,
    /// How long the whole probe may take; `None`: the HTTP client's request timeout.
    pub timeout: Option<Duration>,
    /// For the automatic probe: the base URL, the API it tries first, and where the API
    /// that answered is remembered.
    automatic: Option<Automatic>,
}

#[derive(Debug, Clone)]
struct Automatic {
    base_url: String,
    first: TasklistApi,
    facts: Arc<ServerFacts>,
}

impl Probe {
    /// The probe `spec` asks for; the automatic probe starts with the API that answered last
    /// for `base_url`, as `facts` remember it (those of the HTTP client it is sent with).
    pub fn new(base_url: &str, spec: &ProbeSpec, facts: &Arc<ServerFacts>) -> Self {
        match &spec.path {
            Some(path) => Probe {
                url: join_url(base_url, path),
                method: spec.method,
                body: spec.body.clone(),
                timeout: None,
                automatic: None,
            },
            None => Probe::automatic(base_url, facts.tasklist_api(base_url), facts.clone()),
        }
    }

    fn automatic(base_url: &str, first: TasklistApi, facts: Arc<ServerFacts>) -> Self {
        let (method, path, body) = first.request();
        Probe {
            url: join_url(base_url, path),
            method,
            body: body.to_owned(),
            timeout: None,
            automatic: Some(Automatic {
                base_url: base_url.to_owned(),
                first,
                facts,
            }),
        }
    }

    /// Whether this is the automatic probe, which may send a second request.
    pub fn is_automatic(&self) -> bool {
        self.automatic.is_some()
    }

    /// The same probe, given up after `timeout` (a probe is a small query: a Tasklist that
    /// takes longer is as good as unreachable, and a shorter wait frees its probe slot sooner).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// "POST https://…/v1/tasks/search", for messages. For the automatic probe, the request
    /// of the API that answered last for this base URL, named as such.
    pub fn describe(&self) -> String {
        match &self.automatic {
            None => describe_request(self.method, &self.url),
            Some(Automatic { base_url, facts, .. }) => {
                let api = facts.tasklist_api(base_url);
                let (method, path, _) = api.request();
                let version = match api {
                    TasklistApi::V1 => "v1",
                    TasklistApi::V2 => "v2",
                };
                format!(
                    "{} (the Tasklist {version} API, found by the automatic probe)",
                    describe_request(method, &join_url(base_url, path))
                )
            }
        }
    }

    pub async fn run(&self, http: &HttpClient, credential: ProbeCredential<'_>) -> ProbeOutcome {
        let Some(Automatic { base_url, first, facts }) = &self.automatic else {
            return self.run_once(http, credential).await;
        };
        let mut tried = vec![*first];
        let mut outcome = self.run_once(http, credential).await;
        if endpoint_missing(&outcome) {
            let second = Probe {
                timeout: self.timeout,
                ..Probe::automatic(base_url, first.other(), facts.clone())
            };
            let second_outcome = second.run_once(http, credential).await;
            if !endpoint_missing(&second_outcome) {
                tried.push(first.other());
                outcome = second_outcome;
            }
        }
        if let Some(api) = api_that_answered(&tried, &outcome) {
            facts.remember_tasklist_api(base_url, api);
        }
        outcome
    }

    async fn run_once(&self, http: &HttpClient, credential: ProbeCredential<'_>) -> ProbeOutcome {
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
                        cause: format!("no answer within {}", crate::time::in_seconds(limit)),
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

fn describe_request(method: ProbeMethod, url: &str) -> String {
    let method = match method {
        ProbeMethod::Get => "GET",
        ProbeMethod::Post => "POST",
    };
    format!("{method} {url}")
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
        let probe = Probe::new(&url, &ProbeSpec::default(), http.facts()).with_timeout(Duration::from_millis(200));
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

    #[test]
    fn only_a_missing_endpoint_sends_the_other_request() {
        assert!(endpoint_missing(&ProbeOutcome::Failed { status: 404 }));
        assert!(endpoint_missing(&ProbeOutcome::Failed { status: 405 }));
        assert!(!endpoint_missing(&ProbeOutcome::Failed { status: 500 }));
        assert!(!endpoint_missing(&ProbeOutcome::Unauthorized { status: 401 }));
        assert!(!endpoint_missing(&ProbeOutcome::Succeeded));
        assert!(!endpoint_missing(&ProbeOutcome::Unreachable { cause: "x".into() }));
    }

    #[test]
    fn the_api_that_answered_is_remembered_even_when_it_refused_the_credential() {
        let (v1, v2) = (TasklistApi::V1, TasklistApi::V2);
        assert_eq!(api_that_answered(&[v1], &ProbeOutcome::Succeeded), Some(v1));
        assert_eq!(api_that_answered(&[v1, v2], &ProbeOutcome::Succeeded), Some(v2));
        // 401 from v2 still says v2 exists.
        assert_eq!(api_that_answered(&[v1, v2], &ProbeOutcome::Unauthorized { status: 401 }), Some(v2));
        // Neither exists, or no answer: nothing learned.
        assert_eq!(api_that_answered(&[v1], &ProbeOutcome::Failed { status: 404 }), None);
        assert_eq!(api_that_answered(&[v1], &ProbeOutcome::Unreachable { cause: "x".into() }), None);
    }

    #[test]
    fn an_explicit_path_wins_and_no_path_is_automatic_from_v1() {
        let facts = Arc::new(ServerFacts::default());
        let explicit = Probe::new(
            "https://explicit.example",
            &ProbeSpec {
                path: Some("/v2/topology".into()),
                method: ProbeMethod::Get,
                ..ProbeSpec::default()
            },
            &facts,
        );
        assert!(!explicit.is_automatic());
        assert_eq!(explicit.describe(), "GET https://explicit.example/v2/topology");

        let automatic = Probe::new("https://automatic.example/", &ProbeSpec::default(), &facts);
        assert!(automatic.is_automatic());
        assert_eq!(automatic.url, "https://automatic.example/v1/tasks/search");
        assert_eq!(
            automatic.describe(),
            "POST https://automatic.example/v1/tasks/search (the Tasklist v1 API, found by the automatic probe)"
        );
        facts.remember_tasklist_api("https://automatic.example", TasklistApi::V2);
        let next = Probe::new("https://automatic.example/", &ProbeSpec::default(), &facts);
        assert_eq!(next.url, "https://automatic.example/v2/user-tasks/search");
        assert_eq!(next.body, r#"{"page":{"limit":1}}"#);
        assert!(automatic.describe().contains("/v2/user-tasks/search (the Tasklist v2 API"));
    }
}
