//! Kubernetes Events (events.k8s.io/v1) on a TasklistConnection, for transitions only:
//! a failure that repeats is one Event whose series count grows, not a new Event per try.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, warn};

use crate::crd::{TasklistConnection, TasklistConnectionStatus};
use crate::reason::Reason;
use crate::status::{AUTHENTICATED, Observation, REACHABLE};

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

pub struct EventPublisher {
    recorder: Recorder,
    /// Whether a failure to publish was already logged as a warning.
    warned: AtomicBool,
}

impl EventPublisher {
    pub fn new(client: kube::Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: "tasklist-operator".into(),
            instance,
        };
        EventPublisher {
            recorder: Recorder::new(client, reporter),
            warned: AtomicBool::new(false),
        }
    }

    /// Publishes an Event; a failure to publish is logged (as a warning the first time, so
    /// that missing RBAC for Events shows at the default log level), never fatal.
    pub async fn publish(&self, connection: &TasklistConnection, event: ConnectionEvent) {
        let reference = connection.object_ref(&());
        if let Err(error) = self.recorder.publish(&event.to_event(), &reference).await {
            if self.warned.swap(true, Ordering::Relaxed) {
                debug!("could not publish an Event: {error}");
            } else {
                warn!("could not publish an Event (further failures are logged at debug level): {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
