//! What the HTTP clients learnt about the servers they talk to: the token endpoint an
//! issuer's discovery document named, which Tasklist API answered the automatic probe, and
//! which login URLs demand a CSRF token. One value, shared by every client made with the
//! same [`super::HttpSettings`] (the operator has one; `check` and each test their own),
//! instead of process-wide statics. It holds URLs and API versions only, never a credential.

use std::collections::HashMap;
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
/// At most this many Tasklist URLs and login URLs are remembered each; the one learnt
/// longest ago goes first (forgetting one costs its next probe or login one more request).
pub(crate) const MAX_URLS: usize = 4096;

/// The issuer, and the salted hash of the trust it was read under.
pub(crate) type DiscoveryKey = (String, [u8; 32]);

#[derive(Debug, Default)]
pub struct ServerFacts {
    /// Discovered token endpoints by issuer **and TLS trust**, shared by the connections
    /// that read the same issuer under the same trust: a connection that skips certificate
    /// checks (or trusts another CA) must not decide where another connection's secret goes.
    token_endpoints: Mutex<HashMap<DiscoveryKey, Discovered>>,
    /// The API that last answered the automatic probe, per base URL, and when.
    tasklist_apis: Mutex<HashMap<String, (TasklistApi, Instant)>>,
    /// Login URLs that took a login only with a pre-fetched CSRF token, and when.
    csrf_demanded: Mutex<HashMap<String, Instant>>,
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

/// Remembers what was learnt of `url`, making room within [`MAX_URLS`] for a new one.
fn remember_url<V>(learnt: &mut HashMap<String, V>, url: &str, value: V, learnt_at: impl Fn(&V) -> Instant) {
    if !learnt.contains_key(url) {
        prune(
            learnt,
            Capacity::entries(MAX_URLS, MAX_URLS - 1),
            |_, _| false,
            |_, value| Some(learnt_at(value)),
        );
    }
    learnt.insert(url.to_owned(), value);
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
            .map_or(TasklistApi::ALL[0], |(api, _)| *api)
    }

    pub(crate) fn remember_tasklist_api(&self, base_url: &str, api: TasklistApi) {
        let mut apis = lock(&self.tasklist_apis, "the Tasklist APIs that answered");
        remember_url(&mut apis, base_key(base_url), (api, Instant::now()), |(_, at)| *at);
    }

    /// Whether `login_url` took a login only with a pre-fetched CSRF token.
    pub(crate) fn demands_csrf(&self, login_url: &str) -> bool {
        lock(&self.csrf_demanded, "the login URLs that demand a CSRF token").contains_key(login_url)
    }

    pub(crate) fn remember_demands_csrf(&self, login_url: &str) {
        let mut demanded = lock(&self.csrf_demanded, "the login URLs that demand a CSRF token");
        remember_url(&mut demanded, login_url, Instant::now(), |at| *at);
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

    #[test]
    fn learnt_urls_stay_bounded_and_the_oldest_goes_first() {
        let facts = ServerFacts::default();
        for n in 0..MAX_URLS + 10 {
            facts.remember_demands_csrf(&format!("https://tasklist-{n}/login"));
            facts.remember_tasklist_api(&format!("https://tasklist-{n}"), TasklistApi::V2);
        }
        let kept = |facts: &ServerFacts| (lock(&facts.csrf_demanded, "test").len(), lock(&facts.tasklist_apis, "test").len());
        assert_eq!(kept(&facts), (MAX_URLS, MAX_URLS));
        assert!(facts.demands_csrf(&format!("https://tasklist-{}/login", MAX_URLS + 9)));
        assert_eq!(facts.tasklist_api(&format!("https://tasklist-{}", MAX_URLS + 9)), TasklistApi::V2);
    }
}
