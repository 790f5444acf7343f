//! HTTP to Camunda: the OAuth2 token endpoint, Tasklist's cookie login and the probe.
//!
//! Nothing here knows about Kubernetes, so it is tested against plain local HTTP servers
//! and reused by the `check` command. Every answer is read with a timeout and a size cap,
//! and no message built here contains a credential.

pub mod assertion;
pub mod discovery;
mod http;
pub mod login;
pub mod probe;
mod sensitive;
pub mod token;

pub use http::{HttpClient, HttpSettings, TlsTrust};
pub use sensitive::Sensitive;

/// Why a credential could not be obtained, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthFailure {
    pub kind: AuthFailureKind,
    pub message: String,
    /// A condition reason more precise than the kind's (`DiscoveryFailed`,
    /// `ClientAssertionRejected`); the kind still decides how retries back off.
    pub specific_reason: Option<&'static str>,
}

/// The two kinds of failure the contract tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailureKind {
    /// The token endpoint or the login answered 4xx: retrying soon will not help.
    Rejected,
    /// 5xx, a timeout, a connection failure or an answer that could not be understood.
    ServerError,
}

impl AuthFailureKind {
    /// The Authenticated condition's reason for this kind of failure.
    pub fn condition_reason(self) -> &'static str {
        match self {
            AuthFailureKind::Rejected => "CredentialsRejected",
            AuthFailureKind::ServerError => "AuthServerError",
        }
    }
}

impl AuthFailure {
    pub(crate) fn rejected(message: impl Into<String>) -> Self {
        AuthFailure {
            kind: AuthFailureKind::Rejected,
            message: message.into(),
            specific_reason: None,
        }
    }
    pub(crate) fn server_error(message: impl Into<String>) -> Self {
        AuthFailure {
            kind: AuthFailureKind::ServerError,
            message: message.into(),
            specific_reason: None,
        }
    }
    pub(crate) fn with_reason(self, reason: &'static str) -> Self {
        AuthFailure {
            specific_reason: Some(reason),
            ..self
        }
    }

    /// The Authenticated condition's reason for this failure.
    pub fn condition_reason(&self) -> &'static str {
        self.specific_reason.unwrap_or(self.kind.condition_reason())
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
