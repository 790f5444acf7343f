//! Isolation between hosts and between namespaces: slow or dead hosts must not hold every
//! reconcile slot. A reconcile about to obtain a credential enters the slots of the hosts
//! it may ask (the token endpoint, an issuer and the token endpoint it names; for a cookie
//! login, Tasklist itself) and leaves them once it has the credential; when a limit is
//! reached, it does not wait for a slot but is deferred, leaving its reconcile slot to
//! connections elsewhere. The Kubernetes API reads and writes around it hold no host slot:
//! under a cold start's load they are the slow part.
//!
//! Whether a host is proven, unproven or slow is what the HTTP client saw of its answers
//! ([`crate::host_health`]). Limits, as shares of the controller's reconcile slots
//! (`--concurrency`, 32 by default):
//! - a proven host: three quarters (24);
//! - an unproven host: [`PROBATION`] reconciles until one of its requests answers quickly;
//!   the next ones wait for that (at most [`SLOW_AFTER`]) instead of being deferred, so that
//!   a burst of new connections on a healthy new host is not slowed down;
//! - all slow hosts together: a quarter (8), whatever their number or namespaces;
//! - per namespace, through hosts not proven: half (16), so that one tenant's burst of
//!   connections to hosts that never answer leaves the other half to everyone else.
//!
//! Probes have a lane of their own (`probe_scheduler`): a dead Tasklist host does not defer
//! the refreshes of connections whose token endpoint answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::camunda::facts::ServerFacts;
use crate::crd::TasklistConnection;
pub use crate::host_health::SLOW_AFTER;
use crate::host_health::{HostHealth, Standing, origin};
use crate::machinery::slots::{Counts, Slot, Slots};

/// Reconciles in flight through an unproven host.
pub const PROBATION: usize = 2;

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
    /// An unproven host has its [`PROBATION`] reconciles in flight: worth waiting a moment.
    Probation(String),
    /// All slow hosts together have their quarter.
    SlowHosts,
    /// This namespace has its half in flight through hosts not proven.
    Namespace,
}

#[derive(Clone)]
pub struct HostSlots {
    health: Arc<HostHealth>,
    slots: Slots<SlotKey>,
}

/// What a reconcile takes a slot of: each host it may ask, and its namespace when one of
/// them is not proven.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SlotKey {
    Host(String),
    Namespace(String),
}

/// Whether a reconcile through `hosts` (with their standings) may enter, given what is in
/// flight (`counts`, of which `slow_in_flight` through slow hosts); `Ok(true)` when it
/// counts against its namespace (a host is not proven).
fn admit(
    counts: &Counts<SlotKey>,
    namespace: &str,
    hosts: &[(String, Standing)],
    limits: SlotLimits,
    slow_in_flight: usize,
) -> Result<bool, Full> {
    let mut unproven = false;
    for (host, standing) in hosts {
        let in_flight = counts.of(&SlotKey::Host(host.clone()));
        match standing {
            Standing::Proven if in_flight >= limits.per_host => return Err(Full::Host(host.clone())),
            Standing::Proven => {}
            Standing::Unproven if in_flight >= PROBATION.min(limits.per_host) => return Err(Full::Probation(host.clone())),
            Standing::Slow if slow_in_flight >= limits.slow_hosts || in_flight >= limits.per_host => return Err(Full::SlowHosts),
            Standing::Unproven | Standing::Slow => unproven = true,
        }
    }
    if unproven && counts.of(&SlotKey::Namespace(namespace.to_owned())) >= limits.per_namespace_unproven {
        return Err(Full::Namespace);
    }
    Ok(unproven)
}

/// Held while a reconcile obtains a credential; leaving frees its slots.
pub struct Entered {
    _slots: Slot<SlotKey>,
}

impl HostSlots {
    /// Slots judged by what `health` saw of each host.
    pub fn new(health: Arc<HostHealth>) -> Self {
        HostSlots {
            health,
            slots: Slots::new("the host slots"),
        }
    }

    /// Enters one slot of `namespace` and of each of `hosts`. A host on probation is waited
    /// for (until a reconcile through it leaves, at most [`SLOW_AFTER`]); any other full
    /// limit is returned at once.
    pub async fn enter(&self, namespace: &str, hosts: Vec<String>, limits: SlotLimits) -> Result<Entered, Full> {
        let give_up = tokio::time::Instant::now() + SLOW_AFTER;
        loop {
            let left = self.slots.released();
            match self.try_enter_at(namespace, hosts.clone(), limits, Instant::now()) {
                Err(Full::Probation(_)) if tokio::time::Instant::now() < give_up => {
                    let _ = tokio::time::timeout_at(give_up, left).await;
                }
                other => return other,
            }
        }
    }

    fn try_enter_at(&self, namespace: &str, hosts: Vec<String>, limits: SlotLimits, now: Instant) -> Result<Entered, Full> {
        let standings: Vec<(String, Standing)> = hosts.iter().map(|host| (host.clone(), self.health.standing(host, now))).collect();
        let slots = self.slots.try_take(|counts| {
            let slow_in_flight = counts
                .iter()
                .filter(|(key, _)| matches!(key, SlotKey::Host(host) if self.health.standing(host, now) == Standing::Slow))
                .map(|(_, count)| count)
                .sum();
            let counted_in_namespace = admit(counts, namespace, &standings, limits, slow_in_flight)?;
            let namespace = counted_in_namespace.then(|| SlotKey::Namespace(namespace.to_owned()));
            Ok(hosts.into_iter().map(SlotKey::Host).chain(namespace).collect())
        })?;
        Ok(Entered { _slots: slots })
    }

    /// Takes every slot `host` allows a reconcile from `namespace` now (for tests).
    #[cfg(test)]
    pub(super) fn take_every_slot(&self, namespace: &str, host: &str, limits: SlotLimits) -> Vec<Entered> {
        std::iter::from_fn(|| self.try_enter_at(namespace, vec![host.to_owned()], limits, Instant::now()).ok()).collect()
    }

    /// How many hosts and namespaces have reconciles in flight.
    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        self.slots.with_counts(|counts| {
            let hosts = counts.iter().filter(|(key, _)| matches!(key, SlotKey::Host(_))).count();
            (hosts, counts.keys() - hosts)
        })
    }
}

/// The distinct hosts (`host:port`) a connection may ask for a credential: the token
/// endpoint and the issuer (OAuth2), or Tasklist itself (a cookie login). HTTP Basic asks
/// nobody. Probes are not counted here: they have their own lane. A URL that cannot be
/// parsed adds nothing: the reconcile reports it without sending anything.
pub fn credential_hosts(connection: &TasklistConnection, facts: &ServerFacts) -> Vec<String> {
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
        .flat_map(|issuer| facts.token_endpoints_of(issuer));
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

    use crate::host_health::tests::answer;

    const LIMITS: SlotLimits = SlotLimits {
        per_host: 3,
        per_namespace_unproven: 100,
        slow_hosts: 100,
    };

    fn slots() -> (HostSlots, Arc<HostHealth>) {
        let health = Arc::new(HostHealth::default());
        (HostSlots::new(health.clone()), health)
    }

    const QUICK: Duration = Duration::from_millis(20);
    const TIMED_OUT: Duration = Duration::from_secs(10);

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
        let (slots, health) = slots();
        let now = Instant::now();
        answer(&health, "busy:80", now, QUICK);
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
        drop(entered.into_iter().next());
        assert!(slots.try_enter_at("a", busy(), LIMITS, now).is_ok());
    }

    #[test]
    fn an_unproven_host_gets_two_reconciles_until_one_answers_quickly() {
        let (slots, health) = slots();
        let now = Instant::now();
        let new = || vec!["new:443".to_owned()];
        let _first: Vec<Entered> = (0..PROBATION)
            .map(|_| slots.try_enter_at("a", new(), LIMITS, now).unwrap())
            .collect();
        assert_eq!(
            slots.try_enter_at("a", new(), LIMITS, now).err(),
            Some(Full::Probation("new:443".into()))
        );
        answer(&health, "new:443", now, QUICK);
        assert!(slots.try_enter_at("a", new(), LIMITS, now).is_ok(), "proven: its full share");
    }

    #[tokio::test]
    async fn a_reconcile_waits_for_a_host_on_probation_instead_of_being_deferred() {
        let (slots, _) = slots();
        let first: Vec<Entered> = (0..PROBATION)
            .map(|_| slots.try_enter_at("a", vec!["new:443".into()], LIMITS, Instant::now()).unwrap())
            .collect();
        let waiting = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.enter("a", vec!["new:443".into()], LIMITS).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(()), "entered once a slot was left");
    }

    #[test]
    fn slow_hosts_share_one_cap_whatever_their_number() {
        let (slots, health) = slots();
        let limits = SlotLimits { slow_hosts: 2, ..LIMITS };
        let start = Instant::now();
        // Eight dead hosts, never seen: two reconciles each enter, each waiting on a request.
        let mut requests = Vec::new();
        let burst: Vec<Entered> = (0..8)
            .flat_map(|n| (0..PROBATION).map(move |_| format!("dead-{n}:443")))
            .map(|host| {
                requests.push(health.sent(host.clone(), start));
                slots.try_enter_at("tenant-a", vec![host], limits, start).unwrap()
            })
            .collect();
        // Once the requests have hung for SLOW_AFTER, no new reconcile enters any of them.
        let later = start + SLOW_AFTER;
        for n in 0..8 {
            let refused = slots.try_enter_at("tenant-c", vec![format!("dead-{n}:443")], limits, later);
            assert_eq!(refused.err(), Some(Full::SlowHosts), "dead-{n}");
        }
        // A host that answers is not slow: it still enters.
        answer(&health, "healthy:443", later, QUICK);
        assert!(slots.try_enter_at("tenant-b", vec!["healthy:443".into()], limits, later).is_ok());
        // Timed out: the hosts stay slow for a while, with room for two reconciles in all.
        let timed_out = start + TIMED_OUT;
        for request in requests {
            request.answered(timed_out);
        }
        drop(burst);
        let retries: Vec<_> = (0..8)
            .map(|n| slots.try_enter_at("tenant-a", vec![format!("dead-{n}:443")], limits, timed_out))
            .collect();
        assert_eq!(retries.iter().filter(|entered| entered.is_ok()).count(), 2);
    }

    #[test]
    fn a_namespace_gets_half_the_slots_through_hosts_not_proven() {
        let (slots, health) = slots();
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
        answer(&health, "healthy:443", now, QUICK);
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
        let (slots, health) = slots();
        let now = Instant::now();
        let one = SlotLimits { per_host: 1, ..LIMITS };
        answer(&health, "login:443", now, QUICK);
        answer(&health, "tasklist:443", now, QUICK);
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
    fn hosts_and_namespaces_are_forgotten_when_nothing_is_in_flight() {
        let (slots, _) = slots();
        for index in 0..100 {
            let _entered = slots
                .try_enter_at(&format!("ns-{index}"), vec![format!("host-{index}:443")], LIMITS, Instant::now())
                .unwrap();
        }
        assert_eq!(slots.tracked(), (0, 0));
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
        assert_eq!(
            credential_hosts(&oauth2, &ServerFacts::default()),
            vec!["login.cloud.camunda.io:443"]
        );
        let issuer = connection(
            "http://tasklist:8080",
            serde_json::json!({"oauth2": {"issuerUrl": "https://keycloak:8443/realms/camunda", "clientSecretRef": {"name": "c"}}}),
        );
        assert_eq!(credential_hosts(&issuer, &ServerFacts::default()), vec!["keycloak:8443"]);
        // Once discovered, the token endpoint the issuer named counts too.
        let facts = ServerFacts::default();
        facts.remember_token_endpoint(
            ("https://keycloak:8443/realms/camunda".into(), [0; 32]),
            "https://idp-tokens:9443/token".into(),
            Instant::now(),
        );
        assert_eq!(credential_hosts(&issuer, &facts), vec!["idp-tokens:9443", "keycloak:8443"]);
    }

    #[test]
    fn a_cookie_login_asks_tasklist_and_basic_asks_nobody() {
        let cookie = connection(
            "http://tasklist:8080",
            serde_json::json!({"cookie": {"credentialsSecretRef": {"name": "login"}}}),
        );
        assert_eq!(credential_hosts(&cookie, &ServerFacts::default()), vec!["tasklist:8080"]);
        let basic = connection(
            "http://tasklist:8080",
            serde_json::json!({"basic": {"credentialsSecretRef": {"name": "login"}}}),
        );
        assert!(credential_hosts(&basic, &ServerFacts::default()).is_empty());
    }

    #[test]
    fn the_deadline_covers_four_requests() {
        assert_eq!(reconcile_deadline(Duration::from_secs(10)), Duration::from_secs(70));
    }
}
