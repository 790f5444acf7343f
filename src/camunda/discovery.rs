//! OpenID Connect discovery: the token endpoint of an issuer, read from
//! `<issuer>/.well-known/openid-configuration` and kept until a token request fails.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;

use super::http::HttpClient;
use super::token::describe_status;
use super::{AuthFailure, FailureDetail};

/// Discovered token endpoints by issuer **and TLS trust**, shared by the connections that
/// read the same issuer under the same trust: a connection that skips certificate checks (or
/// trusts another CA) must not decide where another connection's secret goes.
static TOKEN_ENDPOINTS: LazyLock<Mutex<HashMap<DiscoveryKey, Discovered>>> = LazyLock::new(Default::default);

/// The issuer, and the salted hash of the trust it was read under.
type DiscoveryKey = (String, [u8; 32]);

/// A token endpoint and when its document was read.
#[derive(Debug, Clone)]
struct Discovered {
    endpoint: String,
    at: Instant,
}

/// A discovered endpoint is read again after this long (providers move them rarely; a
/// failed token request forgets it at once).
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// At most this many issuers are remembered; the oldest goes first.
const MAX_DISCOVERED: usize = 1024;

/// `<issuer>/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §4).
pub fn discovery_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

/// The token endpoint discovered for `issuer` under `http`'s trust earlier, if any.
pub fn cached_token_endpoint(http: &HttpClient, issuer: &str) -> Option<String> {
    lookup(&mut lock(), &key(http, issuer), Instant::now())
}

/// The token endpoints discovered for `issuer` under any trust: where its connections'
/// requests go, for counting them against that host's reconcile slots.
pub fn discovered_endpoints(issuer: &str) -> Vec<String> {
    let now = Instant::now();
    lock()
        .iter()
        .filter(|((known, _), found)| known == issuer && now.saturating_duration_since(found.at) < DISCOVERY_TTL)
        .map(|(_, found)| found.endpoint.clone())
        .collect()
}

/// Forgets what was discovered for `issuer` under `http`'s trust, so that the next request
/// reads the document again.
pub fn forget(http: &HttpClient, issuer: &str) {
    lock().remove(&key(http, issuer));
}

fn key(http: &HttpClient, issuer: &str) -> DiscoveryKey {
    (issuer.to_owned(), http.trust_key())
}

/// The endpoint under `key`, if it was read less than [`DISCOVERY_TTL`] before `now`.
fn lookup(cache: &mut HashMap<DiscoveryKey, Discovered>, key: &DiscoveryKey, now: Instant) -> Option<String> {
    let found = cache.get(key)?;
    if now.saturating_duration_since(found.at) >= DISCOVERY_TTL {
        cache.remove(key);
        return None;
    }
    Some(found.endpoint.clone())
}

/// Remembers `endpoint`, dropping expired entries, then the oldest, to stay within
/// [`MAX_DISCOVERED`].
fn remember(cache: &mut HashMap<DiscoveryKey, Discovered>, key: DiscoveryKey, endpoint: String, now: Instant) {
    if cache.len() >= MAX_DISCOVERED && !cache.contains_key(&key) {
        cache.retain(|_, found| now.saturating_duration_since(found.at) < DISCOVERY_TTL);
        while cache.len() >= MAX_DISCOVERED {
            let Some(oldest) = cache.iter().min_by_key(|(_, found)| found.at).map(|(key, _)| key.clone()) else {
                break;
            };
            cache.remove(&oldest);
        }
    }
    cache.insert(key, Discovered { endpoint, at: now });
}

/// The token endpoint of `issuer`: from the cache, or read from its discovery document.
pub async fn token_endpoint(http: &HttpClient, issuer: &str) -> Result<String, AuthFailure> {
    if let Some(endpoint) = cached_token_endpoint(http, issuer) {
        return Ok(endpoint);
    }
    let url = discovery_url(issuer);
    let failed = |detail: String| format!("OIDC discovery at {url} failed: {detail}");
    let request = http.request(Method::GET, &url).header("accept", "application/json");
    let answer = http
        .send(request)
        .await
        .map_err(|error| AuthFailure::server_error(failed(error.to_string())).with_detail(FailureDetail::DiscoveryFailed))?;
    if !answer.status.is_success() {
        let message = failed(format!("the issuer answered {}", describe_status(answer.status)));
        // A 4xx means the URL is wrong; trying again soon will not help.
        let failure = if answer.status.is_client_error() {
            AuthFailure::rejected(message)
        } else {
            AuthFailure::server_error(message)
        };
        return Err(failure.with_detail(FailureDetail::DiscoveryFailed));
    }
    let endpoint = token_endpoint_of(&answer.body, issuer)
        .map_err(|detail| AuthFailure::server_error(failed(detail)).with_detail(FailureDetail::DiscoveryFailed))?;
    // The issuer, not the user, chose this URL: the administrator's policy decides
    // whether the client's secret or assertion may go there.
    if let Some(policy) = http.host_policy() {
        policy
            .check_url_resolved("the token endpoint discovered from auth.oauth2.issuerUrl", &endpoint)
            .await
            .map_err(|why| AuthFailure::rejected(failed(why)).with_detail(FailureDetail::DiscoveryFailed))?;
    }
    remember(&mut lock(), key(http, issuer), endpoint.clone(), Instant::now());
    Ok(endpoint)
}

/// The `token_endpoint` of a discovery document. An https issuer must name an https
/// endpoint: the client's secret or assertion goes there.
fn token_endpoint_of(document: &[u8], issuer: &str) -> Result<String, String> {
    let Ok(document) = serde_json::from_slice::<serde_json::Value>(document) else {
        return Err("the answer is not a JSON discovery document".into());
    };
    let Some(endpoint) = document.get("token_endpoint").and_then(|value| value.as_str()) else {
        return Err("the discovery document has no token_endpoint".into());
    };
    let scheme_ok = if issuer.starts_with("https://") {
        endpoint.starts_with("https://")
    } else {
        endpoint.starts_with("https://") || endpoint.starts_with("http://")
    };
    if !scheme_ok || endpoint.len() > 2048 {
        return Err(format!(
            "the discovery document's token_endpoint is not an {} URL",
            if issuer.starts_with("https://") { "https" } else { "http(s)" }
        ));
    }
    Ok(endpoint.to_owned())
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<DiscoveryKey, Discovered>> {
    // The map holds no invariant a panic could break.
    TOKEN_ENDPOINTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_below_the_issuer_with_or_without_a_slash() {
        assert_eq!(
            discovery_url("https://login.example/tenant/v2.0/"),
            "https://login.example/tenant/v2.0/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("http://kc/auth/realms/camunda-platform"),
            "http://kc/auth/realms/camunda-platform/.well-known/openid-configuration"
        );
    }

    #[test]
    fn reads_the_token_endpoint() {
        let document = br#"{"issuer":"https://idp","token_endpoint":"https://idp/oauth2/v2.0/token","jwks_uri":"https://idp/keys"}"#;
        assert_eq!(token_endpoint_of(document, "https://idp").unwrap(), "https://idp/oauth2/v2.0/token");
    }

    #[test]
    fn refuses_documents_without_a_usable_endpoint() {
        assert!(token_endpoint_of(b"<html>", "https://idp").unwrap_err().contains("not a JSON"));
        assert!(
            token_endpoint_of(br#"{"issuer":"x"}"#, "https://idp")
                .unwrap_err()
                .contains("no token_endpoint")
        );
        let downgrade = br#"{"token_endpoint":"http://idp/token"}"#;
        assert!(token_endpoint_of(downgrade, "https://idp").unwrap_err().contains("https"));
        assert!(token_endpoint_of(downgrade, "http://idp").is_ok());
        assert!(token_endpoint_of(br#"{"token_endpoint":"ftp://idp/token"}"#, "http://idp").is_err());
    }

    fn client(insecure_skip_verify: bool) -> HttpClient {
        let trust = crate::camunda::TlsTrust {
            insecure_skip_verify,
            ..Default::default()
        };
        HttpClient::new(&crate::camunda::HttpSettings::default(), &trust).expect("a client")
    }

    #[test]
    fn the_cache_is_forgotten_on_request() {
        let http = client(false);
        remember(
            &mut lock(),
            key(&http, "https://cache-test"),
            "https://cache-test/token".into(),
            Instant::now(),
        );
        assert_eq!(
            cached_token_endpoint(&http, "https://cache-test").as_deref(),
            Some("https://cache-test/token")
        );
        forget(&http, "https://cache-test");
        assert_eq!(cached_token_endpoint(&http, "https://cache-test"), None);
    }

    #[test]
    fn what_one_trust_discovered_is_not_used_under_another() {
        let (verified, insecure) = (client(false), client(true));
        let issuer = "https://trust-test";
        remember(&mut lock(), key(&insecure, issuer), "https://attacker/token".into(), Instant::now());
        assert_eq!(cached_token_endpoint(&verified, issuer), None);
        assert_eq!(cached_token_endpoint(&insecure, issuer).as_deref(), Some("https://attacker/token"));
        forget(&insecure, issuer);
    }

    #[test]
    fn entries_expire_and_the_cache_stays_bounded() {
        let mut cache = HashMap::new();
        let start = Instant::now();
        let first: DiscoveryKey = ("https://idp-0".into(), [0; 32]);
        remember(&mut cache, first.clone(), "https://idp-0/token".into(), start);
        assert!(lookup(&mut cache, &first, start + DISCOVERY_TTL / 2).is_some());
        assert!(
            lookup(&mut cache, &first, start + DISCOVERY_TTL).is_none(),
            "read again after the TTL"
        );
        assert!(cache.is_empty(), "an expired entry is dropped when found");
        for n in 0..MAX_DISCOVERED + 10 {
            let at = start + Duration::from_millis(n as u64);
            remember(&mut cache, (format!("https://idp-{n}"), [0; 32]), "https://idp/token".into(), at);
        }
        assert_eq!(cache.len(), MAX_DISCOVERED);
        assert!(!cache.contains_key(&("https://idp-0".to_owned(), [0; 32])), "the oldest went first");
        assert!(cache.contains_key(&(format!("https://idp-{}", MAX_DISCOVERED + 9), [0; 32])));
    }
}
