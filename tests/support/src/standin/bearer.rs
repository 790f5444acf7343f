//! Checking bearer tokens the way Tasklist does: signature (the stand-in's own key or a
//! trusted JWKS), expiry and audience; plus revocation, which real servers get from the
//! identity provider and the stand-in tracks itself.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::ZEEBE_AUDIENCE;
use super::state::Shared;

/// Signature algorithms Tasklist accepts for bearer JWTs (those jsonwebtoken's RustCrypto
/// backend supports; Tasklist also takes ES512).
const ACCEPTED_ALGORITHMS: [Algorithm; 5] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// How often at most the trusted JWKS are fetched again for a key id not seen yet.
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(1);

/// Every bearer token the stand-in has issued or accepted, so that revocation is exact
/// (JWT `iat` has only one-second resolution).
#[derive(Default)]
pub(super) struct KnownTokens {
    tokens: HashMap<String, KnownToken>,
    /// Unix second of the last revocation: trusted-JWKS tokens not seen before with an
    /// earlier `iat` count as revoked.
    revoked_before_second: Option<u64>,
}

struct KnownToken {
    revoked: bool,
    /// For opaque tokens, which carry no `exp`: when the stand-in stops accepting them.
    opaque_expires_at: Option<SystemTime>,
    /// For tokens this stand-in issued (SaaS-style): their audience.
    issued_for: Option<String>,
    /// False for tokens of a client without the Tasklist permission.
    permitted: bool,
}

/// What an accepted bearer token allows.
pub(super) struct Grant {
    /// The token's audiences (`aud`).
    pub audiences: Vec<String>,
    /// Issued by this stand-in's own (SaaS-style) token endpoint, not by a trusted JWKS.
    pub issued_here: bool,
    /// Whether its client has the Tasklist permission; without it the API answers 403.
    pub permitted: bool,
}

impl KnownTokens {
    /// Remembers a token the stand-in handed out for `audience`; `opaque_expires_at` for
    /// non-JWT tokens.
    pub fn issued(&mut self, token: &str, opaque_expires_at: Option<SystemTime>, audience: &str, permitted: bool) {
        self.tokens.insert(
            token.to_owned(),
            KnownToken {
                revoked: false,
                opaque_expires_at,
                issued_for: Some(audience.to_owned()),
                permitted,
            },
        );
    }

    pub fn revoke_all(&mut self, now: SystemTime) {
        for token in self.tokens.values_mut() {
            token.revoked = true;
        }
        self.revoked_before_second = Some(unix_seconds(now));
    }

    /// Records a JWT whose signature, expiry and audience were verified; `None` when it
    /// counts as revoked, else whether it was issued here and is permitted.
    fn accept_verified(&mut self, token: &str, issued_at: Option<u64>) -> Option<(bool, bool)> {
        if let Some(known) = self.tokens.get(token) {
            return (!known.revoked).then_some((known.issued_for.is_some(), known.permitted));
        }
        let revoked = match (self.revoked_before_second, issued_at) {
            (Some(cutoff), Some(issued_at)) => issued_at < cutoff,
            // Without `iat` there is no telling: a revocation covers it.
            (Some(_), None) => true,
            (None, _) => false,
        };
        self.tokens.insert(
            token.to_owned(),
            KnownToken {
                revoked,
                opaque_expires_at: None,
                issued_for: None,
                permitted: true,
            },
        );
        (!revoked).then_some((false, true))
    }
}

/// JWKS URLs whose keys the API trusts (Keycloak's), with the keys fetched so far.
#[derive(Default)]
pub(super) struct TrustedJwks {
    urls: Vec<String>,
    keys: Vec<(Option<String>, DecodingKey)>,
    last_fetch: Option<Instant>,
}

impl TrustedJwks {
    pub fn trust(&mut self, url: &str) {
        if !self.urls.iter().any(|trusted| trusted == url) {
            self.urls.push(url.to_owned());
        }
        // Fetch on the next token that needs a key, whenever the last fetch was.
        self.last_fetch = None;
    }

    /// Keys that may have signed a token with this key id (all of them when it has none).
    fn candidates(&self, key_id: Option<&str>) -> Vec<DecodingKey> {
        self.keys
            .iter()
            .filter(|(kid, _)| key_id.is_none() || kid.as_deref() == key_id)
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// Whether fetching again might find a key for this key id.
    fn worth_fetching(&self, key_id: Option<&str>) -> bool {
        !self.urls.is_empty()
            && self.candidates(key_id).is_empty()
            && self.last_fetch.is_none_or(|fetched| fetched.elapsed() >= JWKS_REFETCH_INTERVAL)
    }
}

/// What the API accepts this bearer token for; `None` when it is invalid (signature,
/// expiry, an audience of neither Tasklist nor the Orchestration API) or revoked.
pub(super) async fn bearer_grant(shared: &Shared, token: &str) -> Option<Grant> {
    {
        let state = shared.lock();
        if let Some(known) = state.tokens.tokens.get(token) {
            if known.revoked {
                return None;
            }
            if let Some(expires_at) = known.opaque_expires_at {
                return (SystemTime::now() < expires_at).then(|| Grant {
                    audiences: known.issued_for.iter().cloned().collect(),
                    issued_here: known.issued_for.is_some(),
                    permitted: known.permitted,
                });
            }
        }
    }

    let header = jsonwebtoken::decode_header(token).ok()?;
    if !ACCEPTED_ALGORITHMS.contains(&header.alg) {
        return None;
    }
    let key_id = header.kid.as_deref();
    let own_key = header.alg == Algorithm::ES256 && key_id.is_none_or(|key_id| key_id == shared.issuer.key_id);
    let mut keys = Vec::new();
    if own_key {
        keys.push(shared.issuer.decoding_key.clone());
    }
    if key_id != Some(shared.issuer.key_id.as_str()) {
        keys.extend(trusted_keys(shared, key_id).await);
    }

    let mut validation = Validation::new(header.alg);
    validation.leeway = 0;
    let mut audiences = shared.accepted_audiences.clone();
    audiences.push(ZEEBE_AUDIENCE.to_owned());
    validation.set_audience(&audiences);
    let claims = keys.iter().find_map(|key| {
        jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
            .ok()
            .map(|data| data.claims)
    })?;
    let issued_at = claims.get("iat").and_then(serde_json::Value::as_u64);
    let (issued_here, permitted) = shared.lock().tokens.accept_verified(token, issued_at)?;
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(audience)) => vec![audience.clone()],
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    Some(Grant {
        audiences,
        issued_here,
        permitted,
    })
}

/// Trusted-JWKS keys for this key id, fetching the JWKS when none is cached.
async fn trusted_keys(shared: &Shared, key_id: Option<&str>) -> Vec<DecodingKey> {
    // One fetch at a time: a request arriving during a fetch waits for its keys instead of
    // finding none (two connections probing at once both got 401 before).
    let _fetching = shared.jwks_fetch.lock().await;
    let urls = {
        let mut state = shared.lock();
        if !state.jwks.worth_fetching(key_id) {
            return state.jwks.candidates(key_id);
        }
        state.jwks.last_fetch = Some(Instant::now());
        state.jwks.urls.clone()
    };
    let mut keys = Vec::new();
    for url in &urls {
        match fetch_jwks(url).await {
            Ok(fetched) => keys.extend(fetched),
            // Visible in the output of a failing test; tokens from there will get 401.
            Err(error) => eprintln!("stand-in Tasklist: cannot fetch JWKS {url}: {error:#}"),
        }
    }
    let mut state = shared.lock();
    state.jwks.keys = keys;
    state.jwks.candidates(key_id)
}

/// The signing keys of a JWKS; keys of kinds jsonwebtoken cannot read are skipped.
async fn fetch_jwks(url: &str) -> anyhow::Result<Vec<(Option<String>, DecodingKey)>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        // Test-only: a Keycloak under test may serve HTTPS with a CA the stand-in does not
        // know, and the stand-in only needs its public keys.
        .danger_accept_invalid_certs(true)
        .build()?;
    let jwks: serde_json::Value = client.get(url).send().await?.error_for_status()?.json().await?;
    let keys = jwks.get("keys").and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
    Ok(keys
        .into_iter()
        // Keycloak also publishes encryption keys (`"use": "enc"`).
        .filter(|key| key.get("use").and_then(serde_json::Value::as_str) != Some("enc"))
        .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some((jwk.common.key_id, key))
        })
        .collect())
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}
