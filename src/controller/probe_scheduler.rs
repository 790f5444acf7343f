//! Probes off the refresh path (issue 12, item 3).
//!
//! - **Shared results.** Connections that send the same probe request (URL, method, body)
//!   with the same credential value and the same TLS trust get the same answer, so one
//!   request per probe interval serves them all. Results are kept under a [`ProbeKey`], a
//!   SHA-256 of those fields: the credential is never kept in clear. Cookie sessions differ
//!   per connection, so their keys never meet.
//! - **One request in flight per key.** Connections whose probe is due while the same
//!   request is in flight wait for its answer instead of sending their own.
//! - **A probe lane.** A probe slot is held by each probe request in flight and by each
//!   reconcile that waits for another's answer: at most `total` at once, and at most
//!   `per_host` for one Tasklist host. (A connection with no result to show yet waits for
//!   a request of the same key in flight without a slot, see [`probe_turn`].) A reconcile that finds no free slot does not wait:
//!   it keeps the last result and asks to be woken soon. So a slow or dead Tasklist holds at
//!   most `per_host` reconcile slots, and all probes together at most half of them: the
//!   rest stays free for refreshes.
//! - **Backoff for hosts that do not answer.** The wake-up after a deferral grows with how
//!   long the host has gone without answering while probes waited for it (a timeout is no
//!   answer), from 1 s up to 32 s and never beyond the probe interval: connections waiting
//!   for a dead Tasklist do not spin, and a busy but answering Tasklist (a burst of new
//!   connections) keeps them coming back within 1 to 2 s. Counting deferrals instead would
//!   back a healthy host off to 32 s after one burst of a few hundred deferrals.
//!
//! The decisions ([`probe_limits`], [`probe_timeout`], [`probe_turn`], [`deferral_delay`])
//! are pure functions;
//! [`ProbeScheduler`] keeps the shared state and carries them out.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;

use crate::camunda::TlsTrust;
use crate::camunda::probe::{Probe, ProbeCredential, ProbeOutcome};
use crate::crd::ProbeMethod;
use crate::key_hash::{KeyHash, hashed_key};
use crate::machinery::bounded::{Capacity, prune};
use crate::machinery::single_flight::{Answer, Flights};
use crate::machinery::slots::{Slot, Slots};
use crate::time::{add, since, sub};

/// Probe slots of the whole operator unless `--probe-concurrency` says otherwise.
pub const DEFAULT_PROBE_CONCURRENCY: u16 = 16;
/// Probe slots per Tasklist host unless `--probes-per-host` says otherwise.
pub const DEFAULT_PROBES_PER_HOST: u16 = 4;
/// A probe's timeout unless `--probe-timeout` says otherwise (and at most `--request-timeout`).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a deferred probe waits, at least (jitter adds up to as much again). A healthy
/// host frees a probe slot within milliseconds; a whole second (the earlier value) left the
/// connections deferred in a burst a second behind the others (issue 22: the last of 1,000
/// new connections became Ready 1 s after the rest).
pub const PROBE_DEFERRAL: Duration = Duration::from_millis(250);
/// The longest wait after a deferral (also never beyond the probe interval).
const LONGEST_DEFERRAL: Duration = Duration::from_secs(32);
/// Results older than this are dropped; a connection probed less often probes on its own.
const LONGEST_KEPT: Duration = Duration::from_secs(3600);
/// The result map is pruned once it holds this many entries, and then each time it has
/// doubled since the last pruning.
const FIRST_PRUNE_AT: usize = 1024;

hashed_key!(
    /// Which probe answers are interchangeable: a SHA-256 of the probe request (URL, method,
    /// and the body a POST sends), the credential value it carries, and the TLS trust. Its
    /// `Debug` shows nothing of it.
    ProbeKey
);

impl ProbeKey {
    pub fn new(probe: &Probe, credential: ProbeCredential<'_>, trust: &TlsTrust) -> Self {
        let mut hash = KeyHash::new();
        hash.field(probe.url.as_bytes());
        // The automatic probe may answer from another request than an explicit one to the
        // same URL would (see `camunda::probe`): their answers are not interchangeable.
        if probe.is_automatic() {
            hash.field(b"automatic");
        }
        match probe.method {
            ProbeMethod::Get => hash.field(b"GET"),
            ProbeMethod::Post => {
                hash.tagged(b"POST", probe.body.as_bytes());
            }
        }
        match credential {
            ProbeCredential::Bearer(token) => {
                hash.tagged(b"bearer", token.expose().as_bytes());
            }
            ProbeCredential::Authorization(value) => {
                hash.tagged(b"authorization", value.expose().as_bytes());
            }
            ProbeCredential::Session {
                cookie_header,
                csrf_token,
                csrf_header,
            } => {
                hash.tagged(b"session", cookie_header.expose().as_bytes());
                hash.field(csrf_header.as_bytes());
                match csrf_token {
                    Some(token) => {
                        hash.tagged(b"csrf", token.expose().as_bytes());
                    }
                    None => hash.field(b"no csrf"),
                }
            }
        }
        hash.trust(trust);
        ProbeKey(hash.finish())
    }
}

/// How many probe slots there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeLimits {
    pub total: usize,
    pub per_host: usize,
}

/// The probe slots: `--probe-concurrency` in all and `--probes-per-host` per host (0: no
/// limit), but never more than half the reconcile slots (`--concurrency`), so that probes
/// always leave half of them to refreshes; per host never more than in all.
pub fn probe_limits(probe_concurrency: u16, probes_per_host: u16, reconcile_concurrency: u16) -> ProbeLimits {
    let or_unlimited = |limit: u16| match limit {
        0 => usize::MAX,
        limit => usize::from(limit),
    };
    let half_the_reconciles = match reconcile_concurrency {
        0 => usize::MAX,
        slots => (usize::from(slots) / 2).max(1),
    };
    let total = or_unlimited(probe_concurrency).min(half_the_reconciles);
    ProbeLimits {
        total,
        per_host: or_unlimited(probes_per_host).min(total),
    }
}

/// A probe's timeout: `--probe-timeout`, else 5 s; never longer than `--request-timeout`.
pub fn probe_timeout(flag: Option<Duration>, request_timeout: Duration) -> Duration {
    flag.unwrap_or(DEFAULT_PROBE_TIMEOUT).min(request_timeout)
}

/// A probe answer, with when its request was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedResult {
    pub at: Timestamp,
    pub outcome: ProbeOutcome,
}

/// What a connection whose probe is due does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Take the latest answer for the same key: it was sent after the credential was issued
    /// and is newer than this connection's probe interval.
    Reuse,
    /// Wait for the same request in flight.
    Join,
    /// Wait for the same request in flight, holding no slot (see [`probe_turn`]).
    JoinWithoutSlot,
    /// Send the request.
    Send,
    /// No probe slot is free: keep the last result and try again soon.
    Defer,
}

/// Reuse a fresh answer, else wait for the same request in flight or send it when a probe
/// slot is free, else defer. An answer from before the credential was issued is not reused:
/// a Secret edited back to an earlier password is probed again. A connection with no
/// result to show yet (`has_result` false: new, or a new credential) waits for the same
/// request in flight even without a free slot: deferring would write "not probed" to its
/// status and then the answer, a second status write per new connection, while the
/// request it waits for is in flight anyway (and ends within the probe timeout).
pub fn probe_turn(
    latest_at: Option<Timestamp>,
    in_flight: bool,
    slot_free: bool,
    credential_issued_at: Timestamp,
    interval: Duration,
    now: Timestamp,
    has_result: bool,
) -> Turn {
    if let Some(at) = latest_at
        && at >= credential_issued_at
        && now < add(at, interval)
    {
        return Turn::Reuse;
    }
    match (slot_free, in_flight) {
        (false, true) if !has_result => Turn::JoinWithoutSlot,
        (false, _) => Turn::Defer,
        (true, true) => Turn::Join,
        (true, false) => Turn::Send,
    }
}

/// How long a deferred probe waits before it is tried again, when its host has gone
/// `without_answer` without answering since probes began to wait for it: that long, at
/// least [`PROBE_DEFERRAL`], at most [`LONGEST_DEFERRAL`] and never beyond the probe
/// `interval` (it would not be probed sooner than that anyway), plus up to as much again
/// (`jitter` in `[0, 1)`), so that deferred connections do not come back in step. Waits
/// therefore about double, round after round, while the host stays silent.
pub fn deferral_delay(without_answer: Duration, interval: Duration, jitter: f64) -> Duration {
    let base = without_answer
        .clamp(PROBE_DEFERRAL, LONGEST_DEFERRAL)
        .min(interval.max(PROBE_DEFERRAL));
    base.mul_f64(1.0 + jitter.clamp(0.0, 1.0))
}

/// The lane's state: a panic while it is locked leaves it a step behind, never half
/// changed, and its backoff and slot counts must not be lost (see [`crate::machinery::lock`]).
fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    crate::machinery::lock::lock(state, "the probe lane")
}

impl Default for State {
    fn default() -> Self {
        State {
            latest: HashMap::new(),
            flights: Flights::default(),
            slots: Slots::new("the probe slots"),
            waiting_since: HashMap::new(),
            prune_at: 0,
        }
    }
}

struct State {
    latest: HashMap<ProbeKey, SharedResult>,
    /// The probe requests in flight.
    flights: Flights<ProbeKey, SharedResult>,
    /// The probe slots, per host.
    slots: Slots<String>,
    /// Per host: the first deferral since it last answered.
    waiting_since: HashMap<String, Timestamp>,
    prune_at: usize,
}

/// The shared probe results, the requests in flight and the probe slots.
pub struct ProbeScheduler {
    limits: ProbeLimits,
    state: Arc<Mutex<State>>,
}

/// A connection whose probe is due, as [`probe_turn`] weighs it.
#[derive(Debug, Clone, Copy)]
pub struct Due {
    /// When the credential to probe was issued: older answers are not reused.
    pub credential_issued_at: Timestamp,
    /// The connection's probe interval.
    pub interval: Duration,
    pub now: Timestamp,
    /// Whether the connection has a probe result to show while it waits for a slot.
    pub has_result: bool,
}

/// What [`ProbeScheduler::turn`] gave this connection.
pub enum ProbeTurn {
    /// A fresh answer to the same request.
    Reuse(SharedResult),
    /// An answer to wait for: this connection's own request (`joined` false) or another's.
    Wait { result: Waiting, joined: bool },
    /// No free probe slot: try again after this long.
    Deferred { retry_after: Duration },
}

/// An answer on its way. Holds a probe slot until awaited or dropped (a joining reconcile's;
/// the request itself holds the sender's).
pub struct Waiting {
    result: Answer<SharedResult>,
    _slot: Option<Slot<String>>,
}

impl Waiting {
    pub async fn result(self) -> SharedResult {
        self.result.await
    }
}

impl ProbeScheduler {
    pub fn new(limits: ProbeLimits) -> Self {
        ProbeScheduler {
            limits,
            state: Arc::default(),
        }
    }

    /// Decides this connection's turn (see [`probe_turn`]) and carries it out. `send` makes
    /// the request; it runs as a task of its own, so that its answer is recorded and its
    /// slot given back even when the reconcile that started it is abandoned.
    pub fn turn<F>(&self, key: ProbeKey, host: String, due: Due, send: impl FnOnce() -> F) -> ProbeTurn
    where
        F: Future<Output = ProbeOutcome> + Send + 'static,
    {
        let Due {
            credential_issued_at,
            interval,
            now,
            has_result,
        } = due;
        let mut state = lock(&self.state);
        let slot_free = state
            .slots
            .with_counts(|taken| taken.held() < self.limits.total && taken.of(&host) < self.limits.per_host);
        let latest_at = state.latest.get(&key).map(|result| result.at);
        match probe_turn(
            latest_at,
            state.flights.is_in_flight(&key),
            slot_free,
            credential_issued_at,
            interval,
            now,
            has_result,
        ) {
            Turn::Defer => defer(&mut state, host, interval, now),
            Turn::Reuse => match state.latest.get(&key) {
                Some(result) => ProbeTurn::Reuse(result.clone()),
                None => defer(&mut state, host, interval, now),
            },
            turn @ (Turn::Join | Turn::JoinWithoutSlot) => match state.flights.join(&key) {
                Some(result) => {
                    let slot = (turn == Turn::Join).then(|| state.slots.take(vec![host]));
                    ProbeTurn::Wait {
                        result: Waiting { result, _slot: slot },
                        joined: true,
                    }
                }
                None => defer(&mut state, host, interval, now),
            },
            Turn::Send => {
                let slot = state.slots.take(vec![host.clone()]);
                let request = send();
                let shared_state = self.state.clone();
                // Records the answer before giving the slot back: the lock taken here waits
                // until `turn` has put the request in flight.
                let result = state.flights.start(
                    key,
                    move |id| async move {
                        let _slot = slot;
                        let result = SharedResult {
                            at: now,
                            outcome: request.await,
                        };
                        let mut state = lock(&shared_state);
                        state.flights.land(&key, id);
                        state.record(key, &host, result.clone());
                        result
                    },
                    move |why| SharedResult {
                        at: now,
                        outcome: ProbeOutcome::Unreachable {
                            cause: format!("the probe did not finish: {why}"),
                        },
                    },
                );
                ProbeTurn::Wait {
                    result: Waiting { result, _slot: None },
                    joined: false,
                }
            }
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize, usize) {
        let state = lock(&self.state);
        (
            state.latest.len(),
            state.flights.len(),
            state.slots.with_counts(|taken| taken.held()),
        )
    }
}

/// Notes a deferral on `host` and says when to try again.
fn defer(state: &mut State, host: String, interval: Duration, now: Timestamp) -> ProbeTurn {
    let waiting_since = *state.waiting_since.entry(host).or_insert(now);
    let without_answer = since(now, waiting_since);
    ProbeTurn::Deferred {
        retry_after: deferral_delay(without_answer, interval, rand::random()),
    }
}

/// [`State::record`] under the lock.
#[cfg(test)]
fn record(state: &Mutex<State>, key: ProbeKey, host: &str, result: SharedResult) {
    lock(state).record(key, host, result);
}

impl State {
    /// Keeps an answer as the latest of its key (an answer from the host ends its deferral
    /// backoff; a timeout or connection failure does not), and drops results too old to be
    /// reused by anyone once the map has grown (twice the size after the last pruning).
    fn record(&mut self, key: ProbeKey, host: &str, result: SharedResult) {
        let state = self;
        if !matches!(result.outcome, ProbeOutcome::Unreachable { .. }) {
            state.waiting_since.remove(host);
        }
        let newer = state.latest.get(&key).is_none_or(|kept| kept.at <= result.at);
        if newer {
            state.latest.insert(key, result.clone());
        }
        let oldest_kept = sub(result.at, LONGEST_KEPT);
        let capacity = Capacity::stale_only(state.prune_at.max(FIRST_PRUNE_AT));
        if prune(&mut state.latest, capacity, |_, kept| kept.at < oldest_kept, |_, _| None::<()>).is_some() {
            state.prune_at = state.latest.len() * 2;
            // Hosts nothing is probing any more.
            let State { waiting_since, slots, .. } = &mut *state;
            slots.with_counts(|taken| waiting_since.retain(|host, _| taken.of(host) > 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::camunda::Sensitive;
    use crate::crd::ProbeSpec;
    use futures::FutureExt as _;
    use futures::future::BoxFuture;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn probe(url: &str) -> Probe {
        Probe::new(url, &ProbeSpec::default(), &Default::default())
    }

    const MINUTE: Duration = Duration::from_secs(60);

    // --- the key ------------------------------------------------------------------------

    #[test]
    fn the_same_request_with_the_same_credential_has_the_same_key() {
        let basic = Sensitive::new("Basic ZGVtbzpodW50ZXIy");
        let trust = TlsTrust::default();
        let one = ProbeKey::new(&probe("https://tasklist:8080"), ProbeCredential::Authorization(&basic), &trust);
        let two = ProbeKey::new(&probe("https://tasklist:8080/"), ProbeCredential::Authorization(&basic), &trust);
        assert_eq!(one, two);
    }

    #[test]
    fn each_part_of_the_request_the_credential_and_the_trust_makes_another_key() {
        let token = Sensitive::new("eyJ.token.sig");
        let other_token = Sensitive::new("eyJ.token.sig2");
        let trust = TlsTrust::default();
        let key = |probe: &Probe, credential: ProbeCredential<'_>, trust: &TlsTrust| ProbeKey::new(probe, credential, trust);
        let base = key(&probe("https://tasklist"), ProbeCredential::Bearer(&token), &trust);
        let mut get = probe("https://tasklist");
        get.method = ProbeMethod::Get;
        let mut other_body = probe("https://tasklist");
        other_body.body = r#"{"pageSize":2}"#.into();
        let ca = TlsTrust {
            extra_roots_pem: Some("-----BEGIN CERTIFICATE-----".into()),
            ..TlsTrust::default()
        };
        let insecure = TlsTrust {
            insecure_skip_verify: true,
            ..TlsTrust::default()
        };
        // The same request, written out instead of automatic: the automatic probe may answer
        // from its other request.
        let explicit = Probe::new(
            "https://tasklist",
            &ProbeSpec {
                path: Some("/v1/tasks/search".into()),
                ..ProbeSpec::default()
            },
            &Default::default(),
        );
        assert_eq!(
            (explicit.url.as_str(), &explicit.body),
            (probe("https://tasklist").url.as_str(), &probe("https://tasklist").body)
        );
        let others = [
            key(&explicit, ProbeCredential::Bearer(&token), &trust),
            key(&probe("https://other-tasklist"), ProbeCredential::Bearer(&token), &trust),
            key(&get, ProbeCredential::Bearer(&token), &trust),
            key(&other_body, ProbeCredential::Bearer(&token), &trust),
            key(&probe("https://tasklist"), ProbeCredential::Bearer(&other_token), &trust),
            key(&probe("https://tasklist"), ProbeCredential::Authorization(&token), &trust),
            key(&probe("https://tasklist"), ProbeCredential::Bearer(&token), &ca),
            key(&probe("https://tasklist"), ProbeCredential::Bearer(&token), &insecure),
        ];
        for (index, other) in others.iter().enumerate() {
            assert_ne!(&base, other, "variant {index} has the same key");
        }
    }

    #[test]
    fn a_get_ignores_the_body_it_does_not_send() {
        let token = Sensitive::new("token");
        let trust = TlsTrust::default();
        let mut one = probe("https://tasklist");
        one.method = ProbeMethod::Get;
        let mut two = one.clone();
        two.body = "something else".into();
        assert_eq!(
            ProbeKey::new(&one, ProbeCredential::Bearer(&token), &trust),
            ProbeKey::new(&two, ProbeCredential::Bearer(&token), &trust)
        );
    }

    #[test]
    fn sessions_of_two_connections_never_share_a_key() {
        let (first, second) = (Sensitive::new("TASKLIST-SESSION=a1"), Sensitive::new("TASKLIST-SESSION=b2"));
        let csrf = Sensitive::new("csrf-1");
        let session = |cookie_header| ProbeCredential::Session {
            cookie_header,
            csrf_token: Some(&csrf),
            csrf_header: "X-CSRF-TOKEN",
        };
        let trust = TlsTrust::default();
        let target = probe("https://tasklist");
        assert_ne!(
            ProbeKey::new(&target, session(&first), &trust),
            ProbeKey::new(&target, session(&second), &trust)
        );
    }

    #[test]
    fn the_key_s_debug_shows_nothing_of_the_credential_or_its_hash() {
        let secret = "Basic c2VjcmV0LXBhc3N3b3Jk";
        let value = Sensitive::new(secret);
        let key = ProbeKey::new(
            &probe("https://tasklist"),
            ProbeCredential::Authorization(&value),
            &TlsTrust::default(),
        );
        let printed = format!("{key:?} {:?}", Some(key));
        assert!(!printed.contains(secret) && !printed.contains("c2VjcmV0"), "{printed}");
        assert!(!printed.contains(&hex::encode(key.0)[..8]), "{printed}");
        assert_eq!(printed, "ProbeKey(<hash>) Some(ProbeKey(<hash>))");
    }

    // --- limits and timeout ---------------------------------------------------------------

    #[test]
    fn probes_get_at_most_half_the_reconcile_slots() {
        assert_eq!(probe_limits(16, 4, 32), ProbeLimits { total: 16, per_host: 4 });
        assert_eq!(probe_limits(16, 4, 8), ProbeLimits { total: 4, per_host: 4 });
        assert_eq!(probe_limits(16, 4, 4), ProbeLimits { total: 2, per_host: 2 });
        assert_eq!(probe_limits(16, 4, 1), ProbeLimits { total: 1, per_host: 1 });
    }

    #[test]
    fn zero_means_no_limit() {
        assert_eq!(
            probe_limits(0, 4, 0),
            ProbeLimits {
                total: usize::MAX,
                per_host: 4
            }
        );
        assert_eq!(probe_limits(16, 0, 32), ProbeLimits { total: 16, per_host: 16 });
        assert_eq!(probe_limits(0, 0, 10), ProbeLimits { total: 5, per_host: 5 });
    }

    #[test]
    fn the_probe_timeout_is_5s_and_never_longer_than_the_request_timeout() {
        let seconds = Duration::from_secs;
        assert_eq!(probe_timeout(None, seconds(10)), seconds(5));
        assert_eq!(probe_timeout(None, seconds(3)), seconds(3));
        assert_eq!(probe_timeout(Some(seconds(2)), seconds(10)), seconds(2));
        assert_eq!(probe_timeout(Some(seconds(30)), seconds(10)), seconds(10));
    }

    // --- turns ---------------------------------------------------------------------------

    #[test]
    fn a_fresh_answer_for_the_same_key_is_reused() {
        assert_eq!(probe_turn(Some(at(100)), false, true, at(50), MINUTE, at(159), true), Turn::Reuse);
        // Also with no slot free, and with a request in flight: nothing is sent.
        assert_eq!(probe_turn(Some(at(100)), true, false, at(50), MINUTE, at(130), true), Turn::Reuse);
    }

    #[test]
    fn an_answer_as_old_as_the_interval_is_not_reused() {
        assert_eq!(probe_turn(Some(at(100)), false, true, at(50), MINUTE, at(160), true), Turn::Send);
    }

    #[test]
    fn an_answer_from_before_the_credential_was_issued_is_not_reused() {
        assert_eq!(probe_turn(Some(at(100)), false, true, at(101), MINUTE, at(102), true), Turn::Send);
        assert_eq!(probe_turn(Some(at(100)), false, true, at(100), MINUTE, at(102), true), Turn::Reuse);
    }

    #[test]
    fn without_a_free_slot_a_connection_with_nothing_to_show_waits_for_the_request_in_flight() {
        assert_eq!(probe_turn(None, true, false, at(50), MINUTE, at(100), false), Turn::JoinWithoutSlot);
        // With no request in flight there is nothing to wait for: deferred.
        assert_eq!(probe_turn(None, false, false, at(50), MINUTE, at(100), false), Turn::Defer);
    }

    #[test]
    fn a_request_in_flight_is_joined_when_a_slot_is_free() {
        assert_eq!(probe_turn(None, true, true, at(50), MINUTE, at(100), true), Turn::Join);
    }

    #[test]
    fn without_a_free_slot_the_probe_is_deferred_not_awaited() {
        assert_eq!(probe_turn(None, false, false, at(50), MINUTE, at(100), true), Turn::Defer);
        assert_eq!(probe_turn(None, true, false, at(50), MINUTE, at(100), true), Turn::Defer);
        assert_eq!(probe_turn(Some(at(10)), false, false, at(5), MINUTE, at(100), true), Turn::Defer);
    }

    #[test]
    fn a_deferred_probe_comes_back_in_a_quarter_to_half_a_second() {
        let millis = Duration::from_millis;
        assert_eq!(deferral_delay(Duration::ZERO, MINUTE, 0.0), millis(250));
        assert_eq!(deferral_delay(Duration::ZERO, MINUTE, 0.5), millis(375));
        assert_eq!(deferral_delay(millis(200), MINUTE, 7.0), millis(500));
    }

    #[test]
    fn deferrals_on_a_host_that_does_not_answer_back_off_up_to_the_interval() {
        let seconds = Duration::from_secs;
        // Each round comes back after as long as the host has been silent: about doubling.
        let delays: Vec<Duration> = [0, 1, 2, 4, 8, 16, 32, 64]
            .map(|silent| deferral_delay(seconds(silent), MINUTE, 0.0))
            .to_vec();
        assert_eq!(delays[0], Duration::from_millis(250));
        assert_eq!(delays[1..], [1, 2, 4, 8, 16, 32, 32].map(seconds));
        assert_eq!(deferral_delay(seconds(100), seconds(10), 0.0), seconds(10));
        assert_eq!(deferral_delay(seconds(100), seconds(10), 0.99), Duration::from_millis(19_900));
        // An interval under the shortest wait still waits that long.
        assert_eq!(
            deferral_delay(seconds(3), Duration::from_millis(200), 0.0),
            Duration::from_millis(250)
        );
    }

    // --- the scheduler ------------------------------------------------------------------

    /// A due probe of a connection that has a result to show, with a one-minute interval.
    fn due(credential_issued_at: Timestamp, now: Timestamp) -> Due {
        Due {
            credential_issued_at,
            interval: MINUTE,
            now,
            has_result: true,
        }
    }

    fn key(index: u8) -> ProbeKey {
        ProbeKey([index; 32])
    }

    /// A request that answers when `release` is sent (or dropped), counting how many started.
    fn controlled(
        sent: &Arc<std::sync::atomic::AtomicUsize>,
        release: &tokio::sync::watch::Receiver<bool>,
    ) -> impl FnOnce() -> BoxFuture<'static, ProbeOutcome> {
        let (sent, mut release) = (sent.clone(), release.clone());
        move || {
            sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let _ = release.wait_for(|released| *released).await;
                ProbeOutcome::Succeeded
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn concurrent_due_probes_of_one_key_share_one_request_and_later_ones_reuse_its_answer() {
        let scheduler = ProbeScheduler::new(ProbeLimits { total: 16, per_host: 4 });
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let now = at(1000);
        let mut waiting = Vec::new();
        for _ in 0..4 {
            match scheduler.turn(key(1), "tasklist:443".into(), due(at(900), now), controlled(&sent, &released)) {
                ProbeTurn::Wait { result, .. } => waiting.push(result),
                _ => panic!("expected to send or join"),
            }
        }
        // The 5th finds the host's 4 slots taken (one request, three joined): deferred.
        assert!(matches!(
            scheduler.turn(key(1), "tasklist:443".into(), due(at(900), now), controlled(&sent, &released)),
            ProbeTurn::Deferred { .. }
        ));
        release.send(true).expect("a receiver");
        for result in waiting {
            assert_eq!(result.result().await.outcome, ProbeOutcome::Succeeded);
        }
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 1, "one request for all of them");
        // 16 more connections due within the interval: no request, every one reuses it.
        for _ in 0..16 {
            let turn = scheduler.turn(key(1), "tasklist:443".into(), due(at(900), at(1030)), controlled(&sent, &released));
            assert!(matches!(turn, ProbeTurn::Reuse(SharedResult { at, .. }) if at == now));
        }
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(scheduler.counts(), (1, 0, 0), "one result kept, nothing in flight, every slot back");
    }

    #[tokio::test]
    async fn a_dead_host_holds_only_its_own_slots() {
        let scheduler = ProbeScheduler::new(ProbeLimits { total: 6, per_host: 4 });
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let mut waiting = Vec::new();
        let mut deferred = 0;
        // 20 connections with distinct credentials at a host that never answers, due 3 s
        // apart.
        for index in 0..20 {
            let now = at(10 + 3 * i64::from(index));
            match scheduler.turn(key(index), "dead:80".into(), due(at(0), now), controlled(&sent, &released)) {
                ProbeTurn::Wait { result, .. } => waiting.push(result),
                ProbeTurn::Deferred { retry_after } => {
                    deferred += 1;
                    // The first deferral comes back within 2 s; the 16th, 45 s after the
                    // first while nothing answered, waits 32 s or more.
                    if deferred == 1 {
                        assert!(retry_after <= Duration::from_secs(2), "{retry_after:?}");
                    }
                    if deferred == 16 {
                        assert!(retry_after >= Duration::from_secs(32), "{retry_after:?}");
                    }
                }
                ProbeTurn::Reuse(_) => panic!("nothing to reuse"),
            }
        }
        assert_eq!((waiting.len(), deferred), (4, 16));
        // Another host still gets the slots that are left, and no more.
        let healthy = (100..103)
            .map(|index| scheduler.turn(key(index), "healthy:443".into(), due(at(0), at(10)), controlled(&sent, &released)))
            .collect::<Vec<_>>();
        assert_eq!(healthy.iter().filter(|turn| matches!(turn, ProbeTurn::Wait { .. })).count(), 2);
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 6);
        drop(healthy);
        release.send(true).expect("a receiver");
        for result in waiting {
            result.result().await;
        }
        // The two healthy requests finish too (their tasks run on without a waiter).
        for _ in 0..100 {
            if scheduler.counts().2 == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(scheduler.counts(), (6, 0, 0));
    }

    #[tokio::test]
    async fn an_abandoned_request_still_records_its_answer_and_gives_its_slot_back() {
        let scheduler = ProbeScheduler::new(ProbeLimits { total: 1, per_host: 1 });
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let turn = scheduler.turn(key(7), "tasklist:443".into(), due(at(0), at(10)), controlled(&sent, &released));
        drop(turn);
        release.send(true).expect("a receiver");
        for _ in 0..100 {
            if scheduler.counts() == (1, 0, 0) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(scheduler.counts(), (1, 0, 0));
        assert!(matches!(
            scheduler.turn(key(7), "tasklist:443".into(), due(at(0), at(20)), controlled(&sent, &released)),
            ProbeTurn::Reuse(_)
        ));
    }

    #[test]
    fn old_results_are_dropped_once_the_map_has_grown() {
        let state = Mutex::new(State::default());
        for index in 0..(FIRST_PRUNE_AT - 1) as u32 {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&index.to_be_bytes());
            record(
                &state,
                ProbeKey(bytes),
                "tasklist:443",
                SharedResult {
                    at: at(0),
                    outcome: ProbeOutcome::Succeeded,
                },
            );
        }
        // Just under the threshold: nothing was pruned yet.
        assert_eq!(state.lock().unwrap().latest.len(), FIRST_PRUNE_AT - 1);
        // Two hours later, the next answer prunes every result older than an hour.
        record(
            &state,
            key(200),
            "tasklist:443",
            SharedResult {
                at: at(7200),
                outcome: ProbeOutcome::Succeeded,
            },
        );
        let state = state.lock().unwrap();
        assert_eq!(state.latest.len(), 1);
        assert_eq!(state.prune_at, 2);
    }
}
