//! Isolation between hosts and between namespaces: slow or dead hosts must not hold every
//! reconcile slot. A reconcile of a connection enters the slots of the hosts it may ask for
//! a credential (the token endpoint, an issuer and the token endpoint it names; for a
//! cookie login, Tasklist itself); when a limit is reached, it does not wait for a slot but
//! is deferred, leaving its reconcile slot to connections elsewhere.
//!
//! A host is **proven** for ten minutes after a reconcile through it took less than
//! [`SLOW_AFTER`], **slow** while one has been in flight that long and for a minute after
//! one took that long, and **unproven** otherwise (never seen, or not for a while). Limits,
//! as shares of the controller's reconcile slots (`--concurrency`, 32 by default):
//! - a proven host: three quarters (24);
//! - an unproven host: [`PROBATION`] reconciles until one of them answers quickly; the next
//!   ones wait for that (at most [`SLOW_AFTER`]) instead of being deferred, so that a burst
//!   of new connections on a healthy new host is not slowed down;
//! - all slow hosts together: a quarter (8), whatever their number or namespaces;
//! - per namespace, through hosts not proven: half (16), so that one tenant's burst of
//!   connections to hosts that never answer leaves the other half to everyone else.
//!
//! Probes have a lane of their own (`probe_scheduler`): a dead Tasklist host does not defer
//! the refreshes of connections whose token endpoint answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::crd::TasklistConnection;

/// A reconcile through a host that takes this long makes the host slow.
pub const SLOW_AFTER: Duration = Duration::from_secs(2);
/// How long a host stays slow after a reconcile through it took [`SLOW_AFTER`] or longer.
const SLOW_FOR: Duration = Duration::from_secs(60);
/// How long a host stays proven after a reconcile through it was quick.
const PROVEN_FOR: Duration = Duration::from_secs(600);
/// Reconciles in flight through an unproven host.
pub const PROBATION: usize = 2;
/// Above this many hosts known, those with nothing in flight and nothing to remember are
/// dropped (a tenant naming ever new hosts cannot grow the map).
const PRUNE_ABOVE: usize = 1024;

/// The limits of the module docs, from the controller's reconcile slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    pub per_host: usize,
    pub per_namespace_unproven: usize,
    pub slow_hosts: usize,
}

/// The limits for `concurrency` reconcile slots (0: no limit). A healthy host answers in
/// milliseconds and rarely reaches its three quarters; many connections on one healthy host
/// refreshing together under load do, and then every slot the limit takes away from them
/// makes refreshes later (with half the slots, 200 connections with 20 s tokens on a loaded
/// machine saw expired tokens).
pub fn slot_limits(concurrency: u16) -> SlotLimits {
    match usize::from(concurrency) {
        0 => SlotLimits {
            per_host: usize::MAX,
            per_namespace_unproven: usize::MAX,
            slow_hosts: usize::MAX,
        },
        slots => SlotLimits {
            per_host: (slots - slots / 4).max(1),
            per_namespace_unproven: (slots / 2).max(1),
            slow_hosts: (slots / 4).max(1),
        },
    }
}

/// How long a deferred reconcile waits, at least (jitter adds up to as much again).
pub const DEFERRAL: Duration = Duration::from_millis(500);

/// Which limit refused a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Full {
    /// A proven host has its three quarters in flight.
    Host(String),
    /// An unproven host has its [`PROBATION`] reconciles in flight, none of them slow yet:
    /// worth waiting a moment for.
    Probation(String),
    /// All slow hosts together have their quarter.
    SlowHosts,
    /// This namespace has its half in flight through hosts not proven.
    Namespace,
}

#[derive(Clone, Default)]
pub struct HostSlots {
    state: Arc<Mutex<SlotState>>,
    /// Woken whenever a reconcile leaves, for those waiting on a host on probation.
    left: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct SlotState {
    hosts: HashMap<String, HostState>,
    /// Reconciles in flight through hosts not proven, per namespace.
    namespaces: HashMap<String, usize>,
    next_id: u64,
}

#[derive(Default)]
struct HostState {
    /// When each reconcile in flight through this host entered, by entry id.
    in_flight: HashMap<u64, Instant>,
    slow_until: Option<Instant>,
    proven_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Proven,
    Unproven,
    Slow,
}

impl HostState {
    fn standing(&self, now: Instant) -> Standing {
        let hanging = self
            .in_flight
            .values()
            .any(|entered| now.saturating_duration_since(*entered) >= SLOW_AFTER);
        if hanging || self.slow_until.is_some_and(|until| now < until) {
            Standing::Slow
        } else if self.proven_until.is_some_and(|until| now < until) {
            Standing::Proven
        } else {
            Standing::Unproven
        }
    }

    fn forgettable(&self, now: Instant) -> bool {
        self.in_flight.is_empty() && self.slow_until.is_none_or(|until| until <= now) && self.proven_until.is_none_or(|until| until <= now)
    }
}

impl SlotState {
    fn standing(&self, host: &str, now: Instant) -> Standing {
        self.hosts.get(host).map_or(Standing::Unproven, |state| state.standing(now))
    }

    fn in_flight(&self, host: &str) -> usize {
        self.hosts.get(host).map_or(0, |state| state.in_flight.len())
    }

    fn slow_in_flight(&self, now: Instant) -> usize {
        self.hosts
            .values()
            .filter(|host| host.standing(now) == Standing::Slow)
            .map(|host| host.in_flight.len())
            .sum()
    }

    /// Whether a reconcile through `hosts` may enter now; if so, whether it counts against
    /// its namespace's share (some host not proven).
    fn admit(&self, namespace: &str, hosts: &[String], limits: SlotLimits, now: Instant) -> Result<bool, Full> {
        let mut unproven = false;
        for host in hosts {
            let in_flight = self.in_flight(host);
            match self.standing(host, now) {
                Standing::Proven if in_flight >= limits.per_host => return Err(Full::Host(host.clone())),
                Standing::Proven => {}
                Standing::Unproven if in_flight >= PROBATION.min(limits.per_host) => return Err(Full::Probation(host.clone())),
                Standing::Unproven => unproven = true,
                Standing::Slow if self.slow_in_flight(now) >= limits.slow_hosts || in_flight >= limits.per_host => {
                    return Err(Full::SlowHosts);
                }
                Standing::Slow => unproven = true,
            }
        }
        if unproven
            && self
                .namespaces
                .get(namespace)
                .is_some_and(|count| *count >= limits.per_namespace_unproven)
        {
            return Err(Full::Namespace);
        }
        Ok(unproven)
    }

    fn leave(&mut self, entry: &Entered, now: Instant) {
        for host in &entry.hosts {
            let Some(state) = self.hosts.get_mut(host) else { continue };
            if let Some(entered) = state.in_flight.remove(&entry.id) {
                if now.saturating_duration_since(entered) < SLOW_AFTER {
                    state.proven_until = Some(now + PROVEN_FOR);
                    state.slow_until = None;
                } else {
                    state.slow_until = Some(now + SLOW_FOR);
                    state.proven_until = None;
                }
            }
            if state.forgettable(now) {
                self.hosts.remove(host);
            }
        }
        if entry.counted_in_namespace
            && let Some(count) = self.namespaces.get_mut(&entry.namespace)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.namespaces.remove(&entry.namespace);
            }
        }
    }
}

/// Held while a reconcile runs; leaving frees its slots and tells how long it took.
pub struct Entered {
    id: u64,
    namespace: String,
    hosts: Vec<String>,
    counted_in_namespace: bool,
    slots: HostSlots,
}

/// Each change is made in full under the lock, so a panic elsewhere leaves whole counts:
/// go on with them.
fn lock(state: &Mutex<SlotState>) -> std::sync::MutexGuard<'_, SlotState> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HostSlots {
    /// Enters one slot of `namespace` and of each of `hosts`. A host on probation is waited
    /// for (until a reconcile through it answers, at most [`SLOW_AFTER`]); any other full
    /// limit is returned at once.
    pub async fn enter(&self, namespace: &str, hosts: Vec<String>, limits: SlotLimits) -> Result<Entered, Full> {
        let give_up = tokio::time::Instant::now() + SLOW_AFTER;
        loop {
            let left = self.left.notified();
            match self.try_enter_at(namespace, hosts.clone(), limits, Instant::now()) {
                Err(Full::Probation(_)) if tokio::time::Instant::now() < give_up => {
                    let _ = tokio::time::timeout_at(give_up, left).await;
                }
                other => return other,
            }
        }
    }

    fn try_enter_at(&self, namespace: &str, hosts: Vec<String>, limits: SlotLimits, now: Instant) -> Result<Entered, Full> {
        let mut state = lock(&self.state);
        if state.hosts.len() > PRUNE_ABOVE {
            state.hosts.retain(|_, host| !host.forgettable(now));
        }
        let counted_in_namespace = state.admit(namespace, &hosts, limits, now)?;
        let id = state.next_id;
        state.next_id += 1;
        for host in &hosts {
            state.hosts.entry(host.clone()).or_default().in_flight.insert(id, now);
        }
        if counted_in_namespace {
            *state.namespaces.entry(namespace.to_owned()).or_default() += 1;
        }
        Ok(Entered {
            id,
            namespace: namespace.to_owned(),
            hosts,
            counted_in_namespace,
            slots: self.clone(),
        })
    }

    #[cfg(test)]
    fn hosts_tracked(&self) -> usize {
        lock(&self.state).hosts.len()
    }
}

impl Entered {
    fn leave_at(&self, now: Instant) {
        lock(&self.slots.state).leave(self, now);
        self.slots.left.notify_waiters();
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.leave_at(Instant::now());
    }
}

/// `host:port` of a URL, or `None` when it cannot be parsed.
pub fn origin(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    Some(format!("{}:{}", url.host_str()?, url.port_or_known_default()?))
}

/// The distinct hosts (`host:port`) a connection may ask for a credential: the token
/// endpoint and the issuer (OAuth2), or Tasklist itself (a cookie login). HTTP Basic asks
/// nobody. Probes are not counted here: they have their own lane. A URL that cannot be
/// parsed adds nothing: the reconcile reports it without sending anything.
pub fn credential_hosts(connection: &TasklistConnection) -> Vec<String> {
    let auth = &connection.spec.auth;
    let oauth2_urls = auth
        .oauth2
        .iter()
        .flat_map(|oauth2| [oauth2.token_url.as_deref(), oauth2.issuer_url.as_deref()])
        .flatten();
    // The token endpoint an issuer's discovery document named, once known: the client's
    // requests go there, not to the issuer.
    let discovered = auth
        .oauth2
        .iter()
        .filter_map(|oauth2| oauth2.issuer_url.as_deref())
        .flat_map(crate::camunda::discovery::discovered_endpoints);
    let login_url = auth.cookie.as_ref().map(|_| connection.spec.url.as_str());
    let mut hosts: Vec<String> = oauth2_urls
        .chain(login_url)
        .filter_map(origin)
        .chain(discovered.filter_map(|url| origin(&url)))
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// The longest a reconcile may take: two requests per credential attempt (token or login,
/// then the probe), twice when a session is re-established, plus time for the Kubernetes
/// API calls. A reconcile that takes longer is abandoned and retried.
pub fn reconcile_deadline(request_timeout: Duration) -> Duration {
    request_timeout * 4 + Duration::from_secs(30)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SlotLimits = SlotLimits {
        per_host: 3,
        per_namespace_unproven: 100,
        slow_hosts: 100,
    };

    /// Leaves at `now` (dropping it afterwards leaves nothing more: it is gone from the state).
    fn leave(entered: Entered, now: Instant) {
        entered.leave_at(now);
        std::mem::forget(entered);
    }

    /// A host proven at `now` by one quick reconcile.
    fn prove(slots: &HostSlots, host: &str, now: Instant) {
        leave(slots.try_enter_at("x", vec![host.into()], LIMITS, now).expect("a first entry"), now);
    }

    #[test]
    fn shares_of_the_reconcile_slots() {
        assert_eq!(
            slot_limits(32),
            SlotLimits {
                per_host: 24,
                per_namespace_unproven: 16,
                slow_hosts: 8
            }
        );
        assert_eq!(slot_limits(4).per_host, 3);
        assert_eq!(slot_limits(1).slow_hosts, 1);
        assert_eq!(slot_limits(0).per_namespace_unproven, usize::MAX);
    }

    #[test]
    fn a_full_proven_host_defers_the_next_reconcile_until_one_leaves() {
        let slots = HostSlots::default();
        let now = Instant::now();
        prove(&slots, "busy:80", now);
        let busy = || vec!["busy:80".to_owned()];
        let entered: Vec<Entered> = (0..3)
            .map(|_| slots.try_enter_at("a", busy(), LIMITS, now).expect("a free slot"))
            .collect();
        assert_eq!(
            slots.try_enter_at("a", busy(), LIMITS, now).err(),
            Some(Full::Host("busy:80".into()))
        );
        assert!(
            slots.try_enter_at("a", vec!["other:443".into()], LIMITS, now).is_ok(),
            "other hosts are not affected"
        );
        leave(entered.into_iter().next().unwrap(), now);
        assert!(slots.try_enter_at("a", busy(), LIMITS, now).is_ok());
    }

    #[test]
    fn an_unproven_host_gets_two_reconciles_until_one_answers_quickly() {
        let slots = HostSlots::default();
        let now = Instant::now();
        let new = || vec!["new:443".to_owned()];
        let first: Vec<Entered> = (0..PROBATION)
            .map(|_| slots.try_enter_at("a", new(), LIMITS, now).unwrap())
            .collect();
        assert_eq!(
            slots.try_enter_at("a", new(), LIMITS, now).err(),
            Some(Full::Probation("new:443".into()))
        );
        // One answered in milliseconds: the host is proven and takes its full share.
        leave(first.into_iter().next().unwrap(), now + Duration::from_millis(5));
        let more: Vec<_> = (0..2)
            .map(|_| slots.try_enter_at("a", new(), LIMITS, now + Duration::from_millis(5)))
            .collect();
        assert!(more.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn a_reconcile_waits_for_a_host_on_probation_instead_of_being_deferred() {
        let slots = HostSlots::default();
        let first: Vec<Entered> = (0..PROBATION)
            .map(|_| slots.try_enter_at("a", vec!["new:443".into()], LIMITS, Instant::now()).unwrap())
            .collect();
        let waiting = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.enter("a", vec!["new:443".into()], LIMITS).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(()), "entered once the host answered");
    }

    #[test]
    fn slow_hosts_share_one_cap_whatever_their_number() {
        let slots = HostSlots::default();
        let limits = SlotLimits { slow_hosts: 2, ..LIMITS };
        let start = Instant::now();
        // Eight dead hosts, never seen: two reconciles each enter...
        let burst: Vec<Entered> = (0..8)
            .flat_map(|n| (0..PROBATION).map(move |_| format!("dead-{n}:443")))
            .map(|host| slots.try_enter_at("tenant-a", vec![host], limits, start).unwrap())
            .collect();
        // ...and once they have hung for SLOW_AFTER, no new reconcile enters any of them.
        let later = start + SLOW_AFTER;
        for n in 0..8 {
            let refused = slots.try_enter_at("tenant-c", vec![format!("dead-{n}:443")], limits, later);
            assert_eq!(refused.err(), Some(Full::SlowHosts), "dead-{n}");
        }
        // A host that answers is not slow: it still enters.
        assert!(slots.try_enter_at("tenant-b", vec!["healthy:443".into()], limits, later).is_ok());
        // Timed out: the hosts stay slow for a while, with room for two reconciles in all.
        let timed_out = start + Duration::from_secs(10);
        for entered in burst {
            leave(entered, timed_out);
        }
        let retries: Vec<_> = (0..8)
            .map(|n| slots.try_enter_at("tenant-a", vec![format!("dead-{n}:443")], limits, timed_out))
            .collect();
        assert_eq!(retries.iter().filter(|entered| entered.is_ok()).count(), 2);
        // A quick answer makes a slow host proven again.
        for entered in retries.into_iter().flatten() {
            leave(entered, timed_out + Duration::from_millis(5));
        }
        assert_eq!(lock(&slots.state).standing("dead-0:443", timed_out), Standing::Proven);
    }

    #[test]
    fn a_namespace_gets_half_the_slots_through_hosts_not_proven() {
        let slots = HostSlots::default();
        let limits = SlotLimits {
            per_namespace_unproven: 3,
            ..LIMITS
        };
        let now = Instant::now();
        let _dead: Vec<Entered> = (0..3)
            .map(|n| slots.try_enter_at("tenant-a", vec![format!("dead-{n}:443")], limits, now).unwrap())
            .collect();
        assert_eq!(
            slots.try_enter_at("tenant-a", vec!["dead-9:443".into()], limits, now).err(),
            Some(Full::Namespace)
        );
        assert!(
            slots.try_enter_at("tenant-b", vec!["dead-9:443".into()], limits, now).is_ok(),
            "another namespace"
        );
        prove(&slots, "healthy:443", now);
        assert!(
            slots.try_enter_at("tenant-a", vec!["healthy:443".into()], limits, now).is_ok(),
            "a proven host is not counted against the namespace"
        );
        assert!(
            slots.try_enter_at("tenant-a", vec![], limits, now).is_ok(),
            "nor is a connection that asks no host"
        );
    }

    #[test]
    fn a_connection_needs_a_slot_on_each_of_its_hosts() {
        let slots = HostSlots::default();
        let now = Instant::now();
        let one = SlotLimits { per_host: 1, ..LIMITS };
        prove(&slots, "login:443", now);
        let _busy = slots.try_enter_at("a", vec!["login:443".into()], one, now).unwrap();
        assert!(
            slots
                .try_enter_at("a", vec!["login:443".into(), "tasklist:443".into()], one, now)
                .is_err()
        );
        // Nothing was taken from tasklist:443 by the refused attempt.
        assert!(slots.try_enter_at("a", vec!["tasklist:443".into()], one, now).is_ok());
    }

    #[test]
    fn hosts_and_namespaces_are_forgotten_when_nothing_is_known_of_them() {
        let slots = HostSlots::default();
        let start = Instant::now();
        for index in 0..100 {
            let entered = slots
                .try_enter_at(&format!("ns-{index}"), vec![format!("host-{index}:443")], LIMITS, start)
                .unwrap();
            leave(entered, start);
        }
        assert!(lock(&slots.state).namespaces.is_empty());
        assert_eq!(slots.hosts_tracked(), 100, "proven for a while");
        for index in 100..=PRUNE_ABOVE {
            leave(
                slots.try_enter_at("ns", vec![format!("host-{index}:443")], LIMITS, start).unwrap(),
                start,
            );
        }
        let entered = slots
            .try_enter_at("ns", vec!["new:443".into()], LIMITS, start + PROVEN_FOR)
            .unwrap();
        assert_eq!(slots.hosts_tracked(), 1, "only the one in flight is left");
        drop(entered);
    }

    fn connection(url: &str, auth: serde_json::Value) -> TasklistConnection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1",
            "kind": "TasklistConnection",
            "metadata": {"name": "orders"},
            "spec": {"url": url, "auth": auth},
        }))
        .unwrap()
    }

    #[test]
    fn an_oauth2_connection_asks_only_its_token_host_for_credentials() {
        // A dead Tasklist (bru-2) does not take slots its refreshes need.
        let oauth2 = connection(
            "https://bru-2.tasklist.camunda.io/abc",
            serde_json::json!({"oauth2": {"tokenUrl": "https://login.cloud.camunda.io/oauth/token", "clientSecretRef": {"name": "c"}}}),
        );
        assert_eq!(credential_hosts(&oauth2), vec!["login.cloud.camunda.io:443"]);
        let issuer = connection(
            "http://tasklist:8080",
            serde_json::json!({"oauth2": {"issuerUrl": "https://keycloak:8443/realms/camunda", "clientSecretRef": {"name": "c"}}}),
        );
        assert_eq!(credential_hosts(&issuer), vec!["keycloak:8443"]);
    }

    #[test]
    fn a_cookie_login_asks_tasklist_and_basic_asks_nobody() {
        let cookie = connection(
            "http://tasklist:8080",
            serde_json::json!({"cookie": {"credentialsSecretRef": {"name": "login"}}}),
        );
        assert_eq!(credential_hosts(&cookie), vec!["tasklist:8080"]);
        let basic = connection(
            "http://tasklist:8080",
            serde_json::json!({"basic": {"credentialsSecretRef": {"name": "login"}}}),
        );
        assert!(credential_hosts(&basic).is_empty());
    }

    #[test]
    fn an_origin_has_the_scheme_s_default_port() {
        assert_eq!(origin("https://tasklist/v1/tasks/search").as_deref(), Some("tasklist:443"));
        assert_eq!(origin("http://127.0.0.1:8080/x").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(origin("not a url"), None);
    }

    #[test]
    fn the_deadline_covers_four_requests() {
        assert_eq!(reconcile_deadline(Duration::from_secs(10)), Duration::from_secs(70));
    }
}
