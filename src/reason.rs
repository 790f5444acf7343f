//! The one vocabulary of reasons: condition reasons in status, the reasons Warning Events
//! carry in their note, and the `result`/`reason` labels of metrics. A typed enum, so that
//! a new reason is added in one place and every `match` on it is checked.

use std::fmt;

use crate::camunda::AuthFailureKind;
use crate::camunda::probe::ProbeOutcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // Authenticated
    CredentialIssued,
    SecretNotFound,
    SecretKeyMissing,
    CredentialsRejected,
    AuthServerError,
    /// The token endpoint issued a token whose `exp` had passed already (clock skew).
    TokenExpiredOnArrival,
    InvalidCABundle,
    InvalidSpec,
    /// The administrator's policy does not allow this connection's hosts or settings.
    NotAllowed,
    /// A credential was obtained, but the API server refused writing it to the derived Secret.
    SecretWriteFailed,
    // Reachable
    ProbeSucceeded,
    ProbeDisabled,
    ProbeUnauthorized,
    ProbeFailed,
    Unreachable,
    NoCredential,
    NotProbed,
    // Ready
    Ready,
    SecretConflict,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CredentialIssued => "CredentialIssued",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::CredentialsRejected => "CredentialsRejected",
            Reason::AuthServerError => "AuthServerError",
            Reason::TokenExpiredOnArrival => "TokenExpiredOnArrival",
            Reason::InvalidCABundle => "InvalidCABundle",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::NotAllowed => "NotAllowed",
            Reason::SecretWriteFailed => "SecretWriteFailed",
            Reason::ProbeSucceeded => "ProbeSucceeded",
            Reason::ProbeDisabled => "ProbeDisabled",
            Reason::ProbeUnauthorized => "ProbeUnauthorized",
            Reason::ProbeFailed => "ProbeFailed",
            Reason::Unreachable => "Unreachable",
            Reason::NoCredential => "NoCredential",
            Reason::NotProbed => "NotProbed",
            Reason::Ready => "Ready",
            Reason::SecretConflict => "SecretConflict",
        }
    }

    /// The Authenticated condition's reason for a failure to obtain a credential.
    pub fn of_auth_failure(kind: AuthFailureKind) -> Reason {
        match kind {
            AuthFailureKind::Rejected => Reason::CredentialsRejected,
            AuthFailureKind::ServerError => Reason::AuthServerError,
            AuthFailureKind::ExpiredOnArrival => Reason::TokenExpiredOnArrival,
        }
    }

    /// The Reachable condition's reason for what the probe found.
    pub fn of_probe(outcome: &ProbeOutcome) -> Reason {
        match outcome {
            ProbeOutcome::Succeeded => Reason::ProbeSucceeded,
            ProbeOutcome::Unauthorized { .. } => Reason::ProbeUnauthorized,
            ProbeOutcome::Failed { .. } => Reason::ProbeFailed,
            ProbeOutcome::Unreachable { .. } => Reason::Unreachable,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_and_probe_outcome_has_its_contract_reason() {
        assert_eq!(Reason::of_auth_failure(AuthFailureKind::Rejected).as_str(), "CredentialsRejected");
        assert_eq!(Reason::of_auth_failure(AuthFailureKind::ServerError).as_str(), "AuthServerError");
        assert_eq!(
            Reason::of_probe(&ProbeOutcome::Unauthorized { status: 403 }).as_str(),
            "ProbeUnauthorized"
        );
        assert_eq!(Reason::of_probe(&ProbeOutcome::Failed { status: 500 }).as_str(), "ProbeFailed");
        assert_eq!(
            Reason::of_probe(&ProbeOutcome::Unreachable { cause: "x".into() }).as_str(),
            "Unreachable"
        );
        assert_eq!(Reason::Ready.to_string(), "Ready");
    }
}
