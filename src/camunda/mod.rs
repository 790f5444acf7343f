//! HTTP to Camunda: the OAuth2 token endpoint, Tasklist's cookie login and the probe.
//!
//! Nothing here knows about Kubernetes, so it is tested against plain local HTTP servers
//! and reused by the `check` command. Every answer is read with a timeout and a size cap,
//! and no message built here contains a credential.

pub mod assertion;
pub mod discovery;
pub mod facts;
mod http;
pub mod login;
pub mod probe;
mod sensitive;
pub mod tasklist_api;
pub mod token;
pub mod workload;

pub use http::{HttpClient, HttpClientError, HttpSettings, TlsTrust};
pub use sensitive::{REDACTED, Sensitive, redact};

/// Why a credential could not be obtained, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthFailure {
    pub kind: AuthFailureKind,
    pub message: String,
    /// What went wrong, more precisely than the kind says (discovery, a client assertion);
    /// the kind still decides how retries back off.
    pub detail: Option<FailureDetail>,
}

/// Failures that have a condition reason of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureDetail {
    /// The issuer's OpenID Connect discovery document could not be read.
    DiscoveryFailed,
    /// The token endpoint refused the signed client assertion (private_key_jwt), or the
    /// ServiceAccount token sent as one.
    ClientAssertionRejected,
    /// The ServiceAccount named for the client assertion does not exist.
    ServiceAccountNotFound,
    /// The API server refused the operator a token of that ServiceAccount (RBAC).
    TokenRequestForbidden,
    /// A ServiceAccount token could not be requested for another reason (the API server
    /// failed or could not be reached, or its own audiences could not be told).
    TokenRequestFailed,
    /// The audience asked for is one of the API server's own: no such token is requested.
    AudienceNotAllowed,
}

/// The kinds of failure the contract tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailureKind {
    /// The token endpoint or the login answered 4xx: retrying soon will not help.
    Rejected,
    /// 5xx, a timeout, a connection failure or an answer that could not be understood.
    ServerError,
    /// A token whose `exp` had passed when it arrived: most likely the clocks of this
    /// machine and the token server disagree.
    ExpiredOnArrival,
}

impl AuthFailure {
    pub(crate) fn rejected(message: impl Into<String>) -> Self {
        AuthFailure {
            kind: AuthFailureKind::Rejected,
            message: message.into(),
            detail: None,
        }
    }
    pub(crate) fn server_error(message: impl Into<String>) -> Self {
        AuthFailure {
            kind: AuthFailureKind::ServerError,
            message: message.into(),
            detail: None,
        }
    }
    pub(crate) fn with_detail(self, detail: FailureDetail) -> Self {
        AuthFailure {
            detail: Some(detail),
            ..self
        }
    }
}

/// Joins a base URL (which may carry a path prefix such as a SaaS cluster id) and an
/// absolute path from the spec.
pub fn join_url(base: &str, path: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::join_url;

    #[test]
    fn joins_base_with_a_path_prefix() {
        assert_eq!(
            join_url("https://x.io/abc123", "/v1/tasks/search"),
            "https://x.io/abc123/v1/tasks/search"
        );
        assert_eq!(join_url("https://x.io/", "/api/login"), "https://x.io/api/login");
    }
}
