//! Client assertions the client does not sign itself: a workload identity token issued by
//! the platform (a Kubernetes ServiceAccount token), sent as `client_assertion` (RFC 7523
//! §2.2). Keycloak's federated client authentication and Microsoft Entra ID's workload
//! identity federation both accept it in place of a client secret.
//!
//! Nothing here knows where the token comes from: the Kubernetes side implements
//! [`WorkloadIdentity`] (see `crate::service_account_token`), so that the token request is
//! tested against plain HTTP servers like the other client authentications.

use std::fmt;

use base64::Engine as _;
use futures::future::BoxFuture;

use super::{AuthFailure, Sensitive};

/// Where a workload identity token comes from. A new token is asked for each token
/// request and dropped after it: it is never kept.
pub trait WorkloadIdentity: Send + Sync + fmt::Debug {
    /// A fresh token, or why there is none, in words a person can act on.
    fn token(&self) -> BoxFuture<'_, Result<Sensitive, AuthFailure>>;
    /// `a token of ServiceAccount "orders" (namespace "team-a") for audience "..."`, for
    /// messages and `check`.
    fn describe(&self) -> String;
    /// What identifies the tokens it gives (account and audience; never a token): two
    /// connections with the same identity send the same token request.
    fn identity(&self) -> String;
}

/// The claims of a token that say who issued it, for whom and to whom: what an identity
/// provider matches against its federation settings. Not verified: for messages only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenClaims {
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub audiences: Vec<String>,
}

impl TokenClaims {
    /// The claims of a JWT's payload, when it is one.
    pub fn of(token: &str) -> TokenClaims {
        let payload = token
            .split('.')
            .nth(1)
            .and_then(|payload| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(payload.trim_end_matches('='))
                    .ok()
            })
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .unwrap_or_default();
        let text = |name: &str| payload.get(name).and_then(|value| value.as_str()).map(str::to_owned);
        let audiences = match payload.get("aud") {
            Some(serde_json::Value::String(audience)) => vec![audience.clone()],
            Some(serde_json::Value::Array(audiences)) => audiences.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
            _ => Vec::new(),
        };
        TokenClaims {
            issuer: text("iss"),
            subject: text("sub"),
            audiences,
        }
    }

    /// `issuer "https://...", subject "system:serviceaccount:team-a:orders", audience "..."`
    pub fn describe(&self) -> String {
        let unknown = || "?".to_owned();
        format!(
            "issuer {:?}, subject {:?}, audience {:?}",
            self.issuer.clone().unwrap_or_else(unknown),
            self.subject.clone().unwrap_or_else(unknown),
            self.audiences.join(" ")
        )
    }
}

/// What to check when the identity provider refuses the token, picked from its words
/// where they say enough (Entra names the claim it found no match for; Keycloak says
/// little and logs the rest).
pub fn refusal_hint(detail: &str, claims: &TokenClaims) -> String {
    let detail = detail.to_ascii_lowercase();
    let says = |word: &str| detail.contains(word);
    // Entra's codes first: AADSTS70021 (no record for the subject) also names the issuer.
    let issuer = says("aadsts700211") || (says("issuer") && !says("aadsts70021:"));
    let audience = says("aadsts700212") || (says("audience") && !says("aadsts70021:"));
    let cause = if issuer {
        "the provider does not trust the token's issuer: register the cluster's issuer (Keycloak: a Kubernetes identity provider with this issuer, able to read its JWKS; Entra: the federated credential's issuer)"
    } else if audience {
        "the provider expects another audience: set auth.oauth2.clientAssertion.audience to the one it expects"
    } else if says("aadsts70021:") || says("subject") || says("not found") {
        "no client is bound to the token's subject: bind the client to this ServiceAccount (Keycloak: the client's federated subject; Entra: the federated credential's subject), or name the ServiceAccount it is bound to"
    } else if ["expired", "not active", "valid time range", "too old", "lifespan"]
        .iter()
        .any(|word| says(word))
    {
        "the provider considers the token expired or too long-lived: check the clocks and the provider's longest accepted assertion lifetime (10 minutes are requested)"
    } else {
        "check that the provider trusts the cluster's issuer, binds a client to this subject and expects this audience"
    };
    format!("{cause} (the token's {})", claims.describe())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        format!("{}.{}.c2ln", encode(br#"{"alg":"ES256"}"#), encode(claims.to_string().as_bytes()))
    }

    #[test]
    fn claims_are_read_with_one_or_many_audiences_and_nothing_from_a_non_jwt() {
        let token = jwt(serde_json::json!({"iss": "https://k8s", "sub": "system:serviceaccount:a:b", "aud": ["x", "y"]}));
        let claims = TokenClaims::of(&token);
        assert_eq!(claims.issuer.as_deref(), Some("https://k8s"));
        assert_eq!(claims.subject.as_deref(), Some("system:serviceaccount:a:b"));
        assert_eq!(claims.audiences, vec!["x", "y"]);
        assert_eq!(TokenClaims::of(&jwt(serde_json::json!({"aud": "z"}))).audiences, vec!["z"]);
        assert_eq!(TokenClaims::of("not-a-jwt"), TokenClaims::default());
    }

    #[test]
    fn refusal_hints_follow_the_providers_words() {
        let claims = TokenClaims {
            issuer: Some("https://k8s".into()),
            subject: Some("system:serviceaccount:a:b".into()),
            audiences: vec!["api://AzureADTokenExchange".into()],
        };
        let hint = |detail: &str| refusal_hint(detail, &claims);
        assert!(
            hint(": invalid_client: AADSTS700211: No matching federated identity record found for presented assertion issuer")
                .contains("does not trust the token's issuer")
        );
        assert!(
            hint(": invalid_client: AADSTS700212: No matching federated identity record found for presented assertion audience")
                .contains("expects another audience")
        );
        let subject = hint(
            ": invalid_client: AADSTS70021: No matching federated identity record found for presented assertion. Assertion Issuer: 'https://k8s'. Assertion Subject: 'x'.",
        );
        assert!(subject.contains("no client is bound"), "{subject}");
        let general = hint(": unauthorized_client: Invalid client or Invalid client credentials");
        assert!(
            general.contains("trusts the cluster's issuer") && general.contains("subject \"system:serviceaccount:a:b\""),
            "{general}"
        );
    }
}
