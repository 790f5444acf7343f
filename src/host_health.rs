//! How each host (`host:port`) has been answering the operator's requests, as the HTTP
//! client sees them: the one thing that tells a slow or dead host from a healthy one, for
//! the reconcile slots (`controller::host_slots`). Only the time to an answer counts, not
//! what the answer says, nor the Kubernetes API calls of a reconcile.
//!
//! A host is **proven** for ten minutes after a request answered (or failed, e.g. refused)
//! within [`SLOW_AFTER`]; **slow** while a request has been waiting that long and for a
//! minute after one took that long (or timed out); **unproven** otherwise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::machinery::bounded::{Capacity, prune};

/// A request waiting this long makes its host slow.
pub const SLOW_AFTER: Duration = Duration::from_secs(2);
/// How long a host stays slow after a request took [`SLOW_AFTER`] or longer.
const SLOW_FOR: Duration = Duration::from_secs(60);
/// How long a host stays proven after a quick answer.
const PROVEN_FOR: Duration = Duration::from_secs(600);
/// Above this many hosts known, those with nothing to remember are dropped.
const PRUNE_ABOVE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Proven,
    Unproven,
    Slow,
}

#[derive(Debug, Default)]
pub struct HostHealth {
    hosts: Mutex<HashMap<String, Health>>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Health {
    /// When each request waiting for an answer was sent, by request id.
    waiting: HashMap<u64, Instant>,
    slow_until: Option<Instant>,
    proven_until: Option<Instant>,
}

impl Health {
    fn standing(&self, now: Instant) -> Standing {
        let hanging = self.waiting.values().any(|sent| now.saturating_duration_since(*sent) >= SLOW_AFTER);
        if hanging || self.slow_until.is_some_and(|until| now < until) {
            Standing::Slow
        } else if self.proven_until.is_some_and(|until| now < until) {
            Standing::Proven
        } else {
            Standing::Unproven
        }
    }

    fn forgettable(&self, now: Instant) -> bool {
        self.waiting.is_empty() && self.slow_until.is_none_or(|until| until <= now) && self.proven_until.is_none_or(|until| until <= now)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    crate::machinery::lock::lock(mutex, "the host health")
}

impl HostHealth {
    pub fn standing(&self, host: &str, now: Instant) -> Standing {
        lock(&self.hosts)
            .get(host)
            .map_or(Standing::Unproven, |health| health.standing(now))
    }

    /// Times one request to `host` from `now`; [`Waiting::answered`] (or dropping it) ends it.
    pub fn sent(self: &Arc<Self>, host: String, now: Instant) -> Waiting {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut hosts = lock(&self.hosts);
        prune(
            &mut hosts,
            Capacity::stale_only(PRUNE_ABOVE + 1),
            |_, health| health.forgettable(now),
            |_, _| None::<()>,
        );
        hosts.entry(host.clone()).or_default().waiting.insert(id, now);
        Waiting {
            health: self.clone(),
            host,
            id,
            done: false,
        }
    }

    fn ended(&self, host: &str, id: u64, now: Instant) {
        let mut hosts = lock(&self.hosts);
        let Some(health) = hosts.get_mut(host) else { return };
        if let Some(sent) = health.waiting.remove(&id) {
            if now.saturating_duration_since(sent) < SLOW_AFTER {
                health.proven_until = Some(now + PROVEN_FOR);
                health.slow_until = None;
            } else {
                health.slow_until = Some(now + SLOW_FOR);
                health.proven_until = None;
            }
        }
        if health.forgettable(now) {
            hosts.remove(host);
        }
    }

    #[cfg(test)]
    fn hosts_known(&self) -> usize {
        lock(&self.hosts).len()
    }
}

/// A request waiting for its answer. Dropped unanswered (cancelled, timed out), it counts
/// by how long it waited.
pub struct Waiting {
    health: Arc<HostHealth>,
    host: String,
    id: u64,
    done: bool,
}

impl Waiting {
    pub fn answered(mut self, now: Instant) {
        self.done = true;
        self.health.ended(&self.host, self.id, now);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.done {
            self.health.ended(&self.host, self.id, Instant::now());
        }
    }
}

/// `host:port` of a URL, or `None` when it cannot be parsed.
pub fn origin(url: &str) -> Option<String> {
    reqwest::Url::parse(url).ok().as_ref().and_then(origin_of)
}

/// `host:port` of a parsed URL.
pub fn origin_of(url: &reqwest::Url) -> Option<String> {
    Some(format!("{}:{}", url.host_str()?, url.port_or_known_default()?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Makes `host` proven (a quick answer at `now`) or slow (one that took 10 s).
    pub(crate) fn answer(health: &Arc<HostHealth>, host: &str, now: Instant, took: Duration) {
        health.sent(host.into(), now).answered(now + took);
    }

    #[test]
    fn a_host_is_unproven_then_proven_by_a_quick_answer_and_slow_after_a_long_one() {
        let health = Arc::new(HostHealth::default());
        let now = Instant::now();
        assert_eq!(health.standing("idp:443", now), Standing::Unproven);
        answer(&health, "idp:443", now, Duration::from_millis(30));
        assert_eq!(health.standing("idp:443", now), Standing::Proven);
        answer(&health, "idp:443", now, Duration::from_secs(10));
        assert_eq!(health.standing("idp:443", now + Duration::from_secs(10)), Standing::Slow);
        assert_eq!(
            health.standing("idp:443", now + Duration::from_secs(10) + SLOW_FOR),
            Standing::Unproven,
            "a slow host is given another chance after a minute"
        );
    }

    #[test]
    fn a_request_waiting_too_long_makes_its_host_slow_at_once() {
        let health = Arc::new(HostHealth::default());
        let now = Instant::now();
        answer(&health, "dead:80", now, Duration::from_millis(5));
        let waiting = health.sent("dead:80".into(), now);
        assert_eq!(health.standing("dead:80", now + Duration::from_secs(1)), Standing::Proven);
        assert_eq!(health.standing("dead:80", now + SLOW_AFTER), Standing::Slow);
        drop(waiting);
    }

    #[test]
    fn hosts_with_nothing_to_remember_are_dropped() {
        let health = Arc::new(HostHealth::default());
        let start = Instant::now();
        for index in 0..=PRUNE_ABOVE {
            answer(&health, &format!("h{index}:443"), start, Duration::ZERO);
        }
        let later = health.sent("new:443".into(), start + PROVEN_FOR);
        assert_eq!(health.hosts_known(), 1, "only the one waiting is left");
        drop(later);
    }

    #[test]
    fn an_origin_has_the_scheme_s_default_port() {
        assert_eq!(origin("https://tasklist/v1/tasks/search").as_deref(), Some("tasklist:443"));
        assert_eq!(origin("http://127.0.0.1:8080/x").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(origin("not a url"), None);
    }
}
