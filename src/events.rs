//! Kubernetes Events (events.k8s.io/v1) on a TasklistConnection, for transitions only:
//! a failure that repeats is one Event whose series count grows, not a new Event per try.
//! They are sent by tasks of their own ([`EventPublisher`]), not on a reconcile's path.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Resource;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use tokio::sync::{Notify, mpsc};

use tracing::{debug, warn};

use crate::crd::{TasklistConnection, TasklistConnectionStatus};
use crate::machinery::lock::lock;
use crate::reason::Reason;
use crate::status::{AUTHENTICATED, Observation, REACHABLE};
use crate::time::add;

/// What happened to a connection that a person would want to see in `kubectl describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// A first credential was stored.
    CredentialIssued,
    /// A new credential replaced the stored one.
    CredentialRefreshed,
    /// The derived Secret was missing or edited and has been written again.
    SecretRestored,
    /// Authenticated turned False (or changed its reason).
    RefreshFailed { reason: Reason, message: String },
    /// Reachable turned False (or changed its reason).
    ProbeFailed { reason: Reason, message: String },
    /// A Secret of the derived name belongs to someone else.
    SecretConflict { message: String },
    /// Certificates are not verified for this connection.
    InsecureSkipVerify,
    /// `refreshBefore` (or `sessionTimeout`) cannot be honoured for this credential.
    RefreshBeforeTooLong { message: String },
    /// The API server refused writing the derived Secret (once per episode).
    SecretWriteFailed { message: String },
}

impl ConnectionEvent {
    fn to_event(&self) -> Event {
        let (type_, reason, action, note) = match self {
            ConnectionEvent::CredentialIssued => (
                EventType::Normal,
                "CredentialIssued",
                "ObtainCredential",
                "Stored a new credential in the Secret".to_owned(),
            ),
            ConnectionEvent::CredentialRefreshed => (
                EventType::Normal,
                "CredentialRefreshed",
                "ObtainCredential",
                "Replaced the credential in the Secret before it expired".to_owned(),
            ),
            ConnectionEvent::SecretRestored => (
                EventType::Normal,
                "SecretRestored",
                "WriteSecret",
                "The derived Secret was missing or edited; wrote it again".to_owned(),
            ),
            ConnectionEvent::RefreshFailed { reason, message } => (
                EventType::Warning,
                "RefreshFailed",
                "ObtainCredential",
                format!("{reason}: {message}"),
            ),
            ConnectionEvent::ProbeFailed { reason, message } => {
                (EventType::Warning, "ProbeFailed", "Probe", format!("{reason}: {message}"))
            }
            ConnectionEvent::SecretConflict { message } => (EventType::Warning, "SecretConflict", "WriteSecret", message.clone()),
            ConnectionEvent::InsecureSkipVerify => (
                EventType::Warning,
                "InsecureSkipVerify",
                "ObtainCredential",
                "tls.insecureSkipVerify is on: server certificates are not verified".to_owned(),
            ),
            ConnectionEvent::RefreshBeforeTooLong { message } => {
                (EventType::Warning, "RefreshBeforeTooLong", "ObtainCredential", message.clone())
            }
            ConnectionEvent::SecretWriteFailed { message } => (EventType::Warning, "SecretWriteFailed", "WriteSecret", message.clone()),
        };
        let note = fit_note(note);
        Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        }
    }
}

/// The API server refuses an Event whose note is longer than this many bytes.
const MAX_NOTE_BYTES: usize = 1024;

/// `note` cut to the API server's limit in bytes, on a character boundary (a message can
/// quote a server's answer in any script).
fn fit_note(mut note: String) -> String {
    if note.len() > MAX_NOTE_BYTES {
        let mut end = MAX_NOTE_BYTES;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}

/// The Warning Events a status change calls for: a condition of `observed` that is False,
/// and was not False with the same reason in `previous`.
pub fn transitions(previous: Option<&TasklistConnectionStatus>, observed: &Observation) -> Vec<ConnectionEvent> {
    let was = |type_: &str| {
        previous
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            .map(|c| (c.status.as_str(), c.reason.as_str()))
    };
    let mut events = Vec::new();
    for (type_, now) in [(AUTHENTICATED, &observed.authenticated), (REACHABLE, &observed.reachable)] {
        if now.status != Some(false) || was(type_) == Some(("False", now.reason.as_str())) {
            continue;
        }
        // Its own Event, once per episode, is published where the write failed: status may
        // not be writable either, and this one would repeat with every try.
        if now.reason == Reason::SecretWriteFailed {
            continue;
        }
        let (reason, message) = (now.reason, now.message.clone());
        events.push(if type_ == AUTHENTICATED {
            ConnectionEvent::RefreshFailed { reason, message }
        } else {
            ConnectionEvent::ProbeFailed { reason, message }
        });
    }
    events
}

/// Publishes the Events of every connection, off the reconcile's path: [`EventPublisher::publish`]
/// queues the Event and returns at once; a few tasks of their own send them, one after the
/// other per connection (a connection's Events keep their order), [`LANES`] at once in all.
/// A reconcile that writes the derived Secret and status no longer waits for a third write.
///
/// Repeats become a series, as kube's `Recorder` makes them (an Event with the same
/// regarding object, reason, action and type within [`SERIES_TTL`] is patched with a
/// higher count), but what is kept per Event is its name, count and time, not the whole
/// Event: after a burst of 10,000 new connections, kube's recorder held 10,000 Events for
/// six minutes (and went through all of them at every publish).
pub struct EventPublisher {
    sender: Arc<Sender>,
    lanes: OnceLock<Vec<mpsc::Sender<Queued>>>,
    /// Events queued and not yet sent (for [`EventPublisher::flush`]).
    queued: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

/// Tasks sending Events at once.
pub const LANES: usize = 8;
/// Events waiting per lane; beyond that (an API server that does not answer for long) an
/// Event is dropped and logged, never waited for.
const LANE_CAPACITY: usize = 4096;
/// How long a repeat of an Event counts into the earlier one's series (kube's recorder: 6 min).
pub const SERIES_TTL: Duration = Duration::from_secs(360);

struct Queued {
    reference: ObjectReference,
    event: Event,
}

/// What makes two Events one series: kube's `EventKey`, with the regarding object by uid
/// and resourceVersion (as kube compares whole references).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    namespace: String,
    uid: String,
    resource_version: String,
    name: String,
    reason: String,
    action: String,
    warning: bool,
}

#[derive(Debug, Clone)]
struct SeriesEntry {
    /// The Event object's name.
    event: String,
    count: i32,
    last: Timestamp,
}

struct Sender {
    client: kube::Client,
    reporter: Reporter,
    series: Mutex<Series>,
    /// Whether a failure to publish was already logged as a warning.
    warned: AtomicBool,
}

/// The series by the SHA-256 of their key, cut to 128 bits: an entry costs its Event's name
/// and a few numbers, whatever the length of names and reasons.
#[derive(Default)]
struct Series {
    entries: HashMap<[u8; 16], SeriesEntry>,
    pruned: Option<Timestamp>,
}

impl SeriesKey {
    fn digest(&self) -> [u8; 16] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for part in [
            &self.namespace,
            &self.uid,
            &self.resource_version,
            &self.name,
            &self.reason,
            &self.action,
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        hasher.update([u8::from(self.warning)]);
        let mut digest = [0; 16];
        digest.copy_from_slice(&hasher.finalize()[..16]);
        digest
    }
}

impl Series {
    /// The series `key` continues at `now`, if any; entries past their time go, now and then.
    fn continued(&mut self, key: &SeriesKey, now: Timestamp) -> Option<SeriesEntry> {
        let alive = |entry: &SeriesEntry| add(entry.last, SERIES_TTL) > now;
        if self.pruned.is_none_or(|at| add(at, PRUNE_EVERY) <= now) {
            self.entries.retain(|_, entry| alive(entry));
            self.pruned = Some(now);
        }
        self.entries.get(&key.digest()).filter(|entry| alive(entry)).cloned()
    }

    fn record(&mut self, key: &SeriesKey, entry: SeriesEntry) {
        self.entries.insert(key.digest(), entry);
    }
}

/// How often expired series entries are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

impl EventPublisher {
    pub fn new(client: kube::Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: "tasklist-operator".into(),
            instance,
        };
        EventPublisher {
            sender: Arc::new(Sender {
                client,
                reporter,
                series: Mutex::default(),
                warned: AtomicBool::new(false),
            }),
            lanes: OnceLock::new(),
            queued: Arc::default(),
            idle: Arc::default(),
        }
    }

    /// Queues an Event about `connection`; it is sent by a task of its own. A failure to
    /// publish is logged (as a warning the first time, so that missing RBAC for Events
    /// shows at the default log level), never fatal.
    pub async fn publish(&self, connection: &TasklistConnection, event: ConnectionEvent) {
        let reference = connection.object_ref(&());
        let lanes = self.lanes.get_or_init(|| self.start_lanes());
        let lane = lane_of(&reference, lanes.len());
        self.queued.fetch_add(1, Ordering::SeqCst);
        let queued = Queued {
            reference,
            event: event.to_event(),
        };
        if let Err(error) = lanes[lane].try_send(queued) {
            self.done();
            let why = match error {
                mpsc::error::TrySendError::Full(_) => "too many Events are waiting to be sent",
                mpsc::error::TrySendError::Closed(_) => "the Event sender stopped",
            };
            self.sender.failed(&format!("{why}; dropped one"));
        }
    }

    /// Waits until every queued Event was sent (or failed), at most `within`.
    pub async fn flush(&self, within: Duration) {
        let give_up = tokio::time::Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            if self.queued.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(give_up, idle).await.is_err() {
                return;
            }
        }
    }

    fn done(&self) {
        if self.queued.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    fn start_lanes(&self) -> Vec<mpsc::Sender<Queued>> {
        (0..LANES)
            .map(|_| {
                let (lane, mut queue) = mpsc::channel::<Queued>(LANE_CAPACITY);
                let (sender, queued, idle) = (self.sender.clone(), self.queued.clone(), self.idle.clone());
                tokio::spawn(async move {
                    while let Some(queued_event) = queue.recv().await {
                        sender.send(&queued_event).await;
                        if queued.fetch_sub(1, Ordering::SeqCst) == 1 {
                            idle.notify_waiters();
                        }
                    }
                });
                lane
            })
            .collect()
    }
}

/// The lane of a connection's Events: always the same one, so that they keep their order.
fn lane_of(reference: &ObjectReference, lanes: usize) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    (&reference.namespace, &reference.name).hash(&mut hasher);
    usize::try_from(hasher.finish() % lanes.max(1) as u64).unwrap_or(0)
}

impl Sender {
    fn failed(&self, error: &str) {
        if self.warned.swap(true, Ordering::Relaxed) {
            debug!("could not publish an Event: {error}");
        } else {
            warn!("could not publish an Event (further failures are logged at debug level): {error}");
        }
    }

    async fn send(&self, queued: &Queued) {
        let (reference, event) = (&queued.reference, &queued.event);
        let namespace = reference.namespace.clone().unwrap_or_else(|| "default".into());
        let key = SeriesKey {
            namespace: namespace.clone(),
            uid: reference.uid.clone().unwrap_or_default(),
            resource_version: reference.resource_version.clone().unwrap_or_default(),
            name: reference.name.clone().unwrap_or_default(),
            reason: event.reason.clone(),
            action: event.action.clone(),
            warning: event.type_ == EventType::Warning,
        };
        let now = Timestamp::now();
        let continued = lock(&self.series, "the Event series").continued(&key, now);
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let sent = match &continued {
            Some(entry) => {
                let patch = serde_json::json!({
                    "series": {"count": entry.count + 1, "lastObservedTime": MicroTime(now)},
                });
                api.patch(&entry.event, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| SeriesEntry {
                        event: entry.event.clone(),
                        count: entry.count + 1,
                        last: now,
                    })
            }
            None => {
                let created = self.event_object(event, reference, now);
                let name = created.metadata.name.clone().unwrap_or_default();
                api.create(&PostParams::default(), &created).await.map(|_| SeriesEntry {
                    event: name,
                    count: 1,
                    last: now,
                })
            }
        };
        match sent {
            Ok(entry) => {
                lock(&self.series, "the Event series").record(&key, entry);
            }
            Err(error) => self.failed(&error.to_string()),
        }
    }

    /// The Event object, as kube's recorder makes it.
    fn event_object(&self, event: &Event, reference: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = self.reporter.controller.clone();
        K8sEvent {
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference.clone()),
            note: event.note.clone(),
            metadata: ObjectMeta {
                namespace: reference.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    reference.name.as_ref().unwrap_or(&controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(self.reporter.instance.clone().unwrap_or(controller)),
            type_: Some(match event.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            related: event.secondary.clone(),
            ..K8sEvent::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(reason: &str) -> SeriesKey {
        SeriesKey {
            namespace: "apps".into(),
            uid: "u-1".into(),
            resource_version: "7".into(),
            name: "orders".into(),
            reason: reason.into(),
            action: "Probe".into(),
            warning: true,
        }
    }

    #[test]
    fn a_repeat_within_the_series_time_continues_the_series_and_old_entries_go() {
        let start = Timestamp::from_second(1_000_000).expect("a time");
        let mut series = Series::default();
        assert!(series.continued(&key("ProbeFailed"), start).is_none());
        let entry = SeriesEntry {
            event: "orders.1".into(),
            count: 1,
            last: start,
        };
        series.record(&key("ProbeFailed"), entry);
        let later = add(start, Duration::from_secs(60));
        assert_eq!(
            series.continued(&key("ProbeFailed"), later).map(|e| e.event),
            Some("orders.1".into())
        );
        assert!(
            series.continued(&key("RefreshFailed"), later).is_none(),
            "another reason, another series"
        );
        let expired = add(start, SERIES_TTL + Duration::from_secs(1));
        assert!(series.continued(&key("ProbeFailed"), expired).is_none());
        assert!(series.entries.is_empty(), "pruned");
    }

    #[test]
    fn a_connections_events_always_take_the_same_lane() {
        let reference = |name: &str| ObjectReference {
            namespace: Some("apps".into()),
            name: Some(name.into()),
            ..ObjectReference::default()
        };
        let lanes: std::collections::HashSet<usize> = (0..200).map(|n| lane_of(&reference(&format!("c{n}")), LANES)).collect();
        assert_eq!(lanes.len(), LANES, "connections spread over the lanes");
        assert_eq!(lane_of(&reference("orders"), LANES), lane_of(&reference("orders"), LANES));
    }

    #[test]
    fn a_note_fits_the_api_servers_limit_in_bytes_on_a_character_boundary() {
        assert_eq!(fit_note("a".repeat(2000)).len(), 1024);
        // 3 bytes per character: byte 1024 is inside one, 1023 ends one.
        let cut = fit_note("\u{20ac}".repeat(600));
        assert_eq!(cut.len(), 1023);
        assert!(cut.chars().all(|c| c == '\u{20ac}'));
        assert_eq!(fit_note("short".to_owned()), "short");
    }
    use crate::status::{ConditionState, desired_status};
    use jiff::Timestamp;

    fn observed(authenticated: ConditionState, reachable: ConditionState) -> Observation {
        Observation {
            generation: Some(1),
            secret_name: "s".into(),
            auth_method: "oauth2",
            credential: None,
            next_refresh: None,
            authenticated,
            reachable,
            secret_conflict: None,
        }
    }

    fn status(observation: &Observation) -> TasklistConnectionStatus {
        desired_status(observation, None, Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn a_new_failure_is_announced_once() {
        let healthy = observed(
            ConditionState::ok(Reason::CredentialIssued, ""),
            ConditionState::ok(Reason::ProbeSucceeded, ""),
        );
        let failing = observed(
            ConditionState::failing(Reason::AuthServerError, "503"),
            ConditionState::ok(Reason::ProbeSucceeded, ""),
        );
        assert_eq!(
            transitions(Some(&status(&healthy)), &failing),
            vec![ConnectionEvent::RefreshFailed {
                reason: Reason::AuthServerError,
                message: "503".into()
            }]
        );
        // Still failing for the same reason (only the message differs): nothing new.
        let again = observed(
            ConditionState::failing(Reason::AuthServerError, "timeout"),
            ConditionState::ok(Reason::ProbeSucceeded, ""),
        );
        assert!(transitions(Some(&status(&failing)), &again).is_empty());
        // Recovering is not a warning.
        assert!(transitions(Some(&status(&failing)), &healthy).is_empty());
    }

    #[test]
    fn probe_failures_are_announced_too() {
        let healthy = observed(
            ConditionState::ok(Reason::CredentialIssued, ""),
            ConditionState::ok(Reason::ProbeSucceeded, ""),
        );
        let unreachable = observed(
            ConditionState::ok(Reason::CredentialIssued, ""),
            ConditionState::failing(Reason::Unreachable, "refused"),
        );
        assert_eq!(
            transitions(Some(&status(&healthy)), &unreachable),
            vec![ConnectionEvent::ProbeFailed {
                reason: Reason::Unreachable,
                message: "refused".into()
            }]
        );
    }
}
