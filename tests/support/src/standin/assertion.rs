//! `private_key_jwt` at the stand-in's token endpoint (RFC 7523 §3, OpenID Connect Core
//! §9), checked as strictly as Keycloak does: a registered key found by `kid`, a valid
//! RS256/ES256 signature, `iss` = `sub` = the client id, `aud` = the token endpoint, an
//! `exp` in the future by the server's clock, and a `jti` never seen before. The error
//! descriptions are Keycloak's.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The `client_assertion_type` of RFC 7523.
pub(super) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Clients that authenticate with signed assertions, and what the server remembers.
#[derive(Default)]
pub(super) struct AssertionClients {
    /// client id -> the public keys registered for it
    pub keys: std::collections::HashMap<String, JwkSet>,
    /// How far the server's clock is ahead of the machine's (a skewed server).
    pub clock_ahead: Duration,
    /// Every `jti` accepted so far: a replayed assertion is refused.
    pub seen_ids: HashSet<String>,
    /// Application (client) id -> its federated identity credential (Entra's workload
    /// identity federation): the client authenticates with a token another issuer signed.
    pub federated: std::collections::HashMap<String, FederatedCredential>,
    /// Every federated assertion received, accepted or not: the leak check looks for them.
    pub federated_received: Vec<String>,
}

/// A federated identity credential on an app registration, as Microsoft Entra ID keeps it:
/// the issuer it trusts (with that issuer's keys), the one subject and the audience.
pub struct FederatedCredential {
    pub issuer: String,
    pub subject: String,
    pub audience: String,
    /// The issuer's public keys (Entra reads them from the issuer's discovery document).
    pub jwks: JwkSet,
}

#[derive(Deserialize)]
struct FederatedClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<serde_json::Value>,
    exp: Option<u64>,
    iat: Option<u64>,
}

/// Checks a federated `assertion` for application `client_id` as Entra does: a known
/// application with a federated credential, issuer, a signature by one of the issuer's
/// keys, audience, subject, then time. `Err` holds Entra's error_description.
pub(super) fn verify_federated(clients: &mut AssertionClients, client_id: &str, assertion: &str) -> Result<(), String> {
    clients.federated_received.push(assertion.to_owned());
    let Some(credential) = clients.federated.get(client_id) else {
        return Err(format!(
            "AADSTS700016: Application with identifier '{client_id}' was not found in the directory."
        ));
    };
    let unverified = || -> Option<FederatedClaims> {
        let payload = assertion.split('.').nth(1)?;
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let claims = unverified().ok_or("AADSTS50027: JWT token is invalid or malformed.")?;
    let issuer = claims.iss.unwrap_or_default();
    if issuer != credential.issuer {
        return Err(format!(
            "AADSTS700211: No matching federated identity record found for presented assertion issuer '{issuer}'."
        ));
    }
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| "AADSTS50027: JWT token is invalid or malformed.")?;
    let jwk = header
        .kid
        .as_deref()
        .and_then(|kid| credential.jwks.find(kid))
        .ok_or("AADSTS50013: Assertion failed signature validation. [Reason - The key was not found.]")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "AADSTS50013: Assertion failed signature validation.")?;
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.required_spec_claims = HashSet::new();
    validation.validate_aud = false;
    jsonwebtoken::decode::<FederatedClaims>(assertion, &key, &validation)
        .map_err(|_| "AADSTS50013: Assertion failed signature validation.")?;
    let audiences: Vec<&str> = match &claims.aud {
        Some(serde_json::Value::String(aud)) => vec![aud.as_str()],
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(|aud| aud.as_str()).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&credential.audience.as_str()) {
        return Err(format!(
            "AADSTS700212: No matching federated identity record found for presented assertion audience '{}'.",
            audiences.join(" ")
        ));
    }
    let subject = claims.sub.unwrap_or_default();
    if subject != credential.subject {
        return Err(format!(
            "AADSTS70021: No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. \
             Assertion Subject: '{subject}'. Assertion Audience: '{}'.",
            audiences.join(" ")
        ));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (Some(exp), Some(iat)) = (claims.exp, claims.iat) else {
        return Err("AADSTS700024: Client assertion is not within its valid time range.".into());
    };
    if exp <= now || iat > now + 300 {
        return Err("AADSTS700024: Client assertion is not within its valid time range.".into());
    }
    Ok(())
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<serde_json::Value>,
    exp: Option<u64>,
    jti: Option<String>,
}

/// Checks `assertion` from `client_id` for `token_url`; `Err` holds Keycloak's
/// error_description.
pub(super) fn verify(clients: &mut AssertionClients, client_id: &str, assertion: &str, token_url: &str) -> Result<(), &'static str> {
    let Some(keys) = clients.keys.get(client_id) else {
        return Err("Invalid client or Invalid client credentials");
    };
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| "Client authentication with signed JWT failed: Failed to parse JWT")?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Err("Client authentication with signed JWT failed: Invalid algorithm");
    }
    let jwk: &Jwk = match (&header.kid, &header.x5t) {
        (Some(kid), _) => keys.find(kid),
        // Entra ID finds the key by its certificate's SHA-1 thumbprint.
        (None, Some(x5t)) => keys
            .keys
            .iter()
            .find(|jwk| jwk.common.x509_sha1_fingerprint.as_deref() == Some(x5t.as_str())),
        // Without either, Keycloak uses the single registered key.
        (None, None) if keys.keys.len() == 1 => keys.keys.first(),
        (None, None) => None,
    }
    .ok_or("Unable to load public key")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "Unable to load public key")?;
    let mut validation = Validation::new(header.alg);
    // Expiry is checked below against the server's own (possibly skewed) clock.
    validation.validate_exp = false;
    validation.required_spec_claims = HashSet::new();
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Claims>(assertion, &key, &validation)
        .map_err(|_| "Client authentication with signed JWT failed: Signature on JWT token failed validation")?
        .claims;
    if claims.iss.as_deref() != Some(client_id) || claims.sub.as_deref() != Some(client_id) {
        return Err("Client authentication with signed JWT failed: Issuer mismatch");
    }
    let audience_ok = match &claims.aud {
        Some(serde_json::Value::String(aud)) => aud == token_url,
        Some(serde_json::Value::Array(list)) => list.iter().any(|aud| aud.as_str() == Some(token_url)),
        _ => false,
    };
    if !audience_ok {
        return Err("Client authentication with signed JWT failed: Invalid token audience");
    }
    let server_now = (SystemTime::now() + clients.clock_ahead)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if claims.exp.is_none_or(|exp| exp <= server_now) {
        return Err("Client authentication with signed JWT failed: Token is not active");
    }
    let Some(jti) = claims.jti.filter(|jti| !jti.is_empty()) else {
        return Err("Client authentication with signed JWT failed: Missing ID on the token");
    };
    if !clients.seen_ids.insert(jti) {
        return Err("Client authentication with signed JWT failed: Token reuse detected");
    }
    Ok(())
}
