//! What the HTTP clients learnt about the servers they talk to: the token endpoint an
//! issuer's discovery document named, which Tasklist API answered the automatic probe, and
//! which login URLs demand a CSRF token. One value, shared by every client made with the
//! same [`super::HttpSettings`] (the operator has one; `check` and each test their own),
//! instead of process-wide statics. It holds URLs and API versions only, never a credential.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::tasklist_api::TasklistApi;
use crate::machinery::bounded::{Capacity, prune};
use crate::machinery::lock::lock;

/// A discovered endpoint is read again after this long (providers move them rarely; a
/// failed token request forgets it at once).
pub(crate) const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// At most this many issuers are remembered; the oldest goes first.
pub(crate) const MAX_DISCOVERED: usize = 1024;

/// The issuer, and the salted hash of the trust it was read under.
pub(crate) type DiscoveryKey = (String, [u8; 32]);

#[derive(Debug, Default)]
pub struct ServerFacts {
    /// Discovered token endpoints by issuer **and TLS trust**, shared by the connections
    /// that read the same issuer under the same trust: a connection that skips certificate
    /// checks (or trusts another CA) must not decide where another connection's secret goes.
    token_endpoints: Mutex<HashMap<DiscoveryKey, Discovered>>,
    /// The API that last answered the automatic probe, per base URL.
    tasklist_apis: Mutex<HashMap<String, TasklistApi>>,
    /// Login URLs that took a login only with a pre-fetched CSRF token.
    csrf_demanded: Mutex<HashSet<String>>,
}

/// A token endpoint and when its document was read.
#[derive(Debug, Clone)]
struct Discovered {
    endpoint: String,
    at: Instant,
}

impl Discovered {
    fn fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.at) < DISCOVERY_TTL
    }
}

fn base_key(base_url: &str) -> &str {
    base_url.trim_end_matches('/')
}

impl ServerFacts {
    /// The endpoint discovered under `key`, if it was read less than [`DISCOVERY_TTL`]
    /// before `now` (an older one is dropped).
    pub(crate) fn token_endpoint(&self, key: &DiscoveryKey, now: Instant) -> Option<String> {
        let mut endpoints = lock(&self.token_endpoints, "the discovered token endpoints");
        let found = endpoints.get(key)?;
        if !found.fresh(now) {
            endpoints.remove(key);
            return None;
        }
        Some(found.endpoint.clone())
    }

    /// Remembers `endpoint`, dropping expired entries, then the oldest, to stay within
    /// [`MAX_DISCOVERED`].
    pub(crate) fn remember_token_endpoint(&self, key: DiscoveryKey, endpoint: String, now: Instant) {
        let mut endpoints = lock(&self.token_endpoints, "the discovered token endpoints");
        if !endpoints.contains_key(&key) {
            // Room for one more.
            prune(
                &mut endpoints,
                Capacity::entries(MAX_DISCOVERED, MAX_DISCOVERED - 1),
                |_, found| !found.fresh(now),
                |_, found| Some(found.at),
            );
        }
        endpoints.insert(key, Discovered { endpoint, at: now });
    }

    /// Forgets the endpoint discovered under `key`.
    pub(crate) fn forget_token_endpoint(&self, key: &DiscoveryKey) {
        lock(&self.token_endpoints, "the discovered token endpoints").remove(key);
    }

    /// The token endpoints discovered for `issuer` under any trust: where its connections'
    /// requests go, for counting them against that host's reconcile slots.
    pub fn token_endpoints_of(&self, issuer: &str) -> Vec<String> {
        let now = Instant::now();
        lock(&self.token_endpoints, "the discovered token endpoints")
            .iter()
            .filter(|((known, _), found)| known == issuer && found.fresh(now))
            .map(|(_, found)| found.endpoint.clone())
            .collect()
    }

    /// The API the automatic probe of `base_url` tries first: the one that answered last.
    pub(crate) fn tasklist_api(&self, base_url: &str) -> TasklistApi {
        lock(&self.tasklist_apis, "the Tasklist APIs that answered")
            .get(base_key(base_url))
            .copied()
            .unwrap_or(TasklistApi::ALL[0])
    }

    pub(crate) fn remember_tasklist_api(&self, base_url: &str, api: TasklistApi) {
        lock(&self.tasklist_apis, "the Tasklist APIs that answered").insert(base_key(base_url).to_owned(), api);
    }

    /// Whether `login_url` took a login only with a pre-fetched CSRF token.
    pub(crate) fn demands_csrf(&self, login_url: &str) -> bool {
        lock(&self.csrf_demanded, "the login URLs that demand a CSRF token").contains(login_url)
    }

    pub(crate) fn remember_demands_csrf(&self, login_url: &str) {
        lock(&self.csrf_demanded, "the login URLs that demand a CSRF token").insert(login_url.to_owned());
    }

    #[cfg(test)]
    fn token_endpoints_kept(&self) -> usize {
        lock(&self.token_endpoints, "the discovered token endpoints").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_cache_stays_bounded() {
        let facts = ServerFacts::default();
        let start = Instant::now();
        let first: DiscoveryKey = ("https://idp-0".into(), [0; 32]);
        facts.remember_token_endpoint(first.clone(), "https://idp-0/token".into(), start);
        assert!(facts.token_endpoint(&first, start + DISCOVERY_TTL / 2).is_some());
        assert!(
            facts.token_endpoint(&first, start + DISCOVERY_TTL).is_none(),
            "read again after the TTL"
        );
        assert_eq!(facts.token_endpoints_kept(), 0, "an expired entry is dropped when found");
        for n in 0..MAX_DISCOVERED + 10 {
            let at = start + Duration::from_millis(n as u64);
            facts.remember_token_endpoint((format!("https://idp-{n}"), [0; 32]), "https://idp/token".into(), at);
        }
        assert_eq!(facts.token_endpoints_kept(), MAX_DISCOVERED);
        let late = start + Duration::from_millis(MAX_DISCOVERED as u64 + 10);
        assert!(
            facts.token_endpoint(&("https://idp-0".to_owned(), [0; 32]), late).is_none(),
            "the oldest went first"
        );
        assert!(
            facts
                .token_endpoint(&(format!("https://idp-{}", MAX_DISCOVERED + 9), [0; 32]), late)
                .is_some()
        );
    }

    #[test]
    fn two_values_learn_apart() {
        let (one, two) = (ServerFacts::default(), ServerFacts::default());
        one.remember_tasklist_api("https://tasklist/", TasklistApi::V2);
        one.remember_demands_csrf("https://tasklist/api/login");
        assert_eq!(one.tasklist_api("https://tasklist"), TasklistApi::V2);
        assert!(one.demands_csrf("https://tasklist/api/login"));
        assert_eq!(two.tasklist_api("https://tasklist"), TasklistApi::V1, "nothing is process-wide");
        assert!(!two.demands_csrf("https://tasklist/api/login"));
    }
}
