//! The one vocabulary of reasons: condition reasons in status, the reasons Warning Events
//! carry in their note, and the `result`/`reason` labels of metrics. A typed enum, so that
//! a new reason is added in one place and every `match` on it is checked.

use std::fmt;

use crate::camunda::probe::ProbeOutcome;
use crate::camunda::{AuthFailure, AuthFailureKind, FailureDetail, HttpClientError};

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
    /// The operator-wide CA bundle (`--ca-bundle`) cannot be used.
    InvalidOperatorCABundle,
    /// The client certificate (`spec.tls.clientCertificateSecretRef`) cannot be used.
    InvalidClientCertificate,
    /// The TLS backend could not be set up, whatever the bundles.
    HttpSetupFailed,
    InvalidSpec,
    /// The issuer's discovery document could not be read (`issuerUrl`).
    DiscoveryFailed,
    /// The token endpoint refused the client assertion (`PrivateKeyJwt`).
    ClientAssertionRejected,
    /// The private key or certificate for client assertions cannot be used.
    InvalidClientKey,
    /// `ServiceAccountToken`: the ServiceAccount does not exist in the connection's namespace.
    ServiceAccountNotFound,
    /// `ServiceAccountToken`: the API server refused the operator a token of the
    /// ServiceAccount (RBAC on `serviceaccounts/token`).
    TokenRequestForbidden,
    /// `ServiceAccountToken`: the token could not be requested (the API server failed, or
    /// its own audiences could not be read).
    TokenRequestFailed,
    /// `ServiceAccountToken`: the audience is one of the API server's own; no token is requested.
    AudienceNotAllowed,
    /// The credentials in the referenced Secret cannot be used as they are (a Basic
    /// username with a colon).
    InvalidCredentials,
    /// The administrator's policy does not allow this connection's hosts or settings.
    NotAllowed,
    /// With `--require-secret-opt-in`: a referenced Secret does not carry the label that
    /// lets TasklistConnections use it.
    SecretNotOptedIn,
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
            Reason::InvalidOperatorCABundle => "InvalidOperatorCABundle",
            Reason::InvalidClientCertificate => "InvalidClientCertificate",
            Reason::HttpSetupFailed => "HttpSetupFailed",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::DiscoveryFailed => "DiscoveryFailed",
            Reason::ClientAssertionRejected => "ClientAssertionRejected",
            Reason::InvalidClientKey => "InvalidClientKey",
            Reason::ServiceAccountNotFound => "ServiceAccountNotFound",
            Reason::TokenRequestForbidden => "TokenRequestForbidden",
            Reason::TokenRequestFailed => "TokenRequestFailed",
            Reason::AudienceNotAllowed => "AudienceNotAllowed",
            Reason::InvalidCredentials => "InvalidCredentials",
            Reason::NotAllowed => "NotAllowed",
            Reason::SecretNotOptedIn => "SecretNotOptedIn",
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
    pub fn of_auth_failure(failure: &AuthFailure) -> Reason {
        match failure.detail {
            Some(FailureDetail::DiscoveryFailed) => return Reason::DiscoveryFailed,
            Some(FailureDetail::ClientAssertionRejected) => return Reason::ClientAssertionRejected,
            Some(FailureDetail::ServiceAccountNotFound) => return Reason::ServiceAccountNotFound,
            Some(FailureDetail::TokenRequestForbidden) => return Reason::TokenRequestForbidden,
            Some(FailureDetail::TokenRequestFailed) => return Reason::TokenRequestFailed,
            Some(FailureDetail::AudienceNotAllowed) => return Reason::AudienceNotAllowed,
            None => {}
        }
        match failure.kind {
            AuthFailureKind::Rejected => Reason::CredentialsRejected,
            AuthFailureKind::ServerError => Reason::AuthServerError,
            AuthFailureKind::ExpiredOnArrival => Reason::TokenExpiredOnArrival,
        }
    }

    /// The Authenticated condition's reason when no HTTP client could be set up.
    pub fn of_http_client_error(error: &HttpClientError) -> Reason {
        match error {
            HttpClientError::InvalidCaBundle(_) => Reason::InvalidCABundle,
            HttpClientError::InvalidOperatorCaBundle(_) => Reason::InvalidOperatorCABundle,
            HttpClientError::Setup(_) => Reason::HttpSetupFailed,
            HttpClientError::InvalidClientCertificate(_) => Reason::InvalidClientCertificate,
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
        let failure = |kind, detail| AuthFailure {
            kind,
            message: String::new(),
            detail,
        };
        let reason = |kind, detail| Reason::of_auth_failure(&failure(kind, detail)).as_str();
        assert_eq!(reason(AuthFailureKind::Rejected, None), "CredentialsRejected");
        assert_eq!(reason(AuthFailureKind::ServerError, None), "AuthServerError");
        assert_eq!(reason(AuthFailureKind::ExpiredOnArrival, None), "TokenExpiredOnArrival");
        assert_eq!(
            reason(AuthFailureKind::Rejected, Some(FailureDetail::ClientAssertionRejected)),
            "ClientAssertionRejected"
        );
        assert_eq!(
            reason(AuthFailureKind::ServerError, Some(FailureDetail::DiscoveryFailed)),
            "DiscoveryFailed"
        );
        assert_eq!(
            reason(AuthFailureKind::Rejected, Some(FailureDetail::ServiceAccountNotFound)),
            "ServiceAccountNotFound"
        );
        assert_eq!(
            reason(AuthFailureKind::Rejected, Some(FailureDetail::TokenRequestForbidden)),
            "TokenRequestForbidden"
        );
        assert_eq!(
            reason(AuthFailureKind::ServerError, Some(FailureDetail::TokenRequestFailed)),
            "TokenRequestFailed"
        );
        assert_eq!(
            reason(AuthFailureKind::Rejected, Some(FailureDetail::AudienceNotAllowed)),
            "AudienceNotAllowed"
        );
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
