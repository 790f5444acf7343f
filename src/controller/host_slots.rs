//! Isolation between hosts: a slow or dead host must not hold every reconcile slot. A
//! reconcile of a connection enters the slots of the hosts it may ask for a credential
//! (the token endpoint or issuer; for a cookie login, Tasklist itself); when one of them
//! already has `limit` reconciles in flight, it does not wait for a slot but is deferred,
//! leaving its reconcile slot to connections elsewhere. Probes have a lane of their own
//! (`probe_scheduler`): a dead Tasklist host does not defer the refreshes of connections
//! whose token endpoint answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::crd::TasklistConnection;

/// Reconciles in flight per host: three quarters of the controller's reconcile slots
/// (`--concurrency`, 0 for no limit), so that a dead host always leaves a quarter to the
/// others. A healthy host answers in milliseconds and rarely reaches it; many connections
/// on one healthy host refreshing together under load do, and then every slot the limit
/// takes away from them makes refreshes later (with half the slots, 200 connections with
/// 20 s tokens on a loaded machine saw expired tokens).
pub fn reconciles_per_host(concurrency: u16) -> usize {
    match usize::from(concurrency) {
        0 => usize::MAX,
        slots => (slots - slots / 4).max(1),
    }
}

/// How long a deferred reconcile waits, at least (jitter adds up to as much again).
pub const DEFERRAL: Duration = Duration::from_millis(500);

#[derive(Clone, Default)]
pub struct HostSlots {
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

/// Held while a reconcile runs; leaving frees its hosts' slots.
pub struct Entered {
    hosts: Vec<String>,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

impl HostSlots {
    /// Enters one slot of each of `hosts`, or none when any of them is full.
    pub fn try_enter(&self, hosts: Vec<String>, limit: usize) -> Option<Entered> {
        let mut in_flight = self.in_flight.lock().ok()?;
        if hosts.iter().any(|host| in_flight.get(host).is_some_and(|count| *count >= limit)) {
            return None;
        }
        for host in &hosts {
            *in_flight.entry(host.clone()).or_default() += 1;
        }
        Some(Entered {
            hosts,
            in_flight: self.in_flight.clone(),
        })
    }

    #[cfg(test)]
    fn hosts_tracked(&self) -> usize {
        self.in_flight.lock().map(|map| map.len()).unwrap_or_default()
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let Ok(mut in_flight) = self.in_flight.lock() else {
            return;
        };
        for host in &self.hosts {
            if let Some(count) = in_flight.get_mut(host) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    in_flight.remove(host);
                }
            }
        }
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
    let login_url = auth.cookie.as_ref().map(|_| connection.spec.url.as_str());
    let mut hosts: Vec<String> = oauth2_urls.chain(login_url).filter_map(origin).collect();
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

    #[test]
    fn a_host_gets_three_quarters_of_the_reconcile_slots() {
        assert_eq!(reconciles_per_host(32), 24);
        assert_eq!(reconciles_per_host(4), 3);
        assert_eq!(reconciles_per_host(1), 1);
        assert_eq!(reconciles_per_host(0), usize::MAX);
    }

    #[test]
    fn a_full_host_defers_the_next_reconcile_until_one_leaves() {
        let slots = HostSlots::default();
        let dead = || vec!["dead:80".to_owned()];
        let entered: Vec<Entered> = (0..3).map(|_| slots.try_enter(dead(), 3).expect("a free slot")).collect();
        assert!(slots.try_enter(dead(), 3).is_none());
        assert!(
            slots.try_enter(vec!["healthy:443".into()], 3).is_some(),
            "other hosts are not affected"
        );
        drop(entered.into_iter().next());
        assert!(slots.try_enter(dead(), 3).is_some());
    }

    #[test]
    fn a_connection_needs_a_slot_on_each_of_its_hosts() {
        let slots = HostSlots::default();
        let _busy = slots.try_enter(vec!["login:443".into()], 1).unwrap();
        assert!(slots.try_enter(vec!["login:443".into(), "tasklist:443".into()], 1).is_none());
        // Nothing was taken from tasklist:443 by the refused attempt.
        assert!(slots.try_enter(vec!["tasklist:443".into()], 1).is_some());
    }

    #[test]
    fn hosts_are_forgotten_when_nothing_is_in_flight() {
        let slots = HostSlots::default();
        for index in 0..100 {
            let _entered = slots.try_enter(vec![format!("host-{index}:443")], 8).unwrap();
        }
        assert_eq!(slots.hosts_tracked(), 0);
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
