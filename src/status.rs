//! The connection's status, computed from what a reconcile observed. Pure: the controller
//! writes it only when it differs from what is already there.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::TasklistConnectionStatus;
use crate::reason::Reason;
use crate::time::{NEVER, rfc3339, whole_seconds};

pub const AUTHENTICATED: &str = "Authenticated";
pub const REACHABLE: &str = "Reachable";
pub const READY: &str = "Ready";

/// One condition's state: `Some(true)` True, `Some(false)` False, `None` Unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionState {
    pub status: Option<bool>,
    pub reason: Reason,
    pub message: String,
}

impl ConditionState {
    pub fn ok(reason: Reason, message: impl Into<String>) -> Self {
        ConditionState {
            status: Some(true),
            reason,
            message: message.into(),
        }
    }
    pub fn failing(reason: Reason, message: impl Into<String>) -> Self {
        ConditionState {
            status: Some(false),
            reason,
            message: message.into(),
        }
    }
    pub fn unknown(reason: Reason, message: impl Into<String>) -> Self {
        ConditionState {
            status: None,
            reason,
            message: message.into(),
        }
    }
}

/// The times of the credential in the Secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialTimes {
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Everything the status says, as observed by one reconcile.
#[derive(Debug, Clone)]
pub struct Observation {
    pub generation: Option<i64>,
    pub secret_name: String,
    pub auth_method: &'static str,
    pub credential: Option<CredentialTimes>,
    pub next_refresh: Option<Timestamp>,
    pub authenticated: ConditionState,
    pub reachable: ConditionState,
    /// Set when a Secret of the derived name exists that the operator does not own.
    pub secret_conflict: Option<String>,
}

/// The Ready condition: True when Authenticated and Reachable are, otherwise False with
/// the first failing condition's reason (or SecretConflict).
pub fn readiness(observation: &Observation) -> ConditionState {
    if let Some(message) = &observation.secret_conflict {
        return ConditionState::failing(Reason::SecretConflict, message.clone());
    }
    for condition in [&observation.authenticated, &observation.reachable] {
        if condition.status != Some(true) {
            return ConditionState::failing(condition.reason, condition.message.clone());
        }
    }
    ConditionState::ok(Reason::Ready, "Tasklist accepts the credential in the Secret")
}

/// The status to write. `lastTransitionTime` is carried over from `previous` for every
/// condition whose status did not change.
pub fn desired_status(observation: &Observation, previous: Option<&TasklistConnectionStatus>, now: Timestamp) -> TasklistConnectionStatus {
    let ready = readiness(observation);
    let conditions = [
        (AUTHENTICATED, &observation.authenticated),
        (REACHABLE, &observation.reachable),
        (READY, &ready),
    ]
    .into_iter()
    .map(|(type_, state)| condition(type_, state, observation.generation, previous, now))
    .collect();
    TasklistConnectionStatus {
        observed_generation: observation.generation,
        secret_name: Some(observation.secret_name.clone()),
        auth_method: Some(observation.auth_method.to_owned()),
        // A credential that never expires (HTTP Basic) has no expiresAt.
        expires_at: observation
            .credential
            .map(|times| times.expires_at)
            .filter(|at| *at != NEVER)
            .map(rfc3339),
        last_refresh_time: observation.credential.map(|times| rfc3339(times.issued_at)),
        next_refresh_time: observation.next_refresh.filter(|at| *at != NEVER).map(rfc3339),
        conditions,
    }
}

fn condition(
    type_: &str,
    state: &ConditionState,
    generation: Option<i64>,
    previous: Option<&TasklistConnectionStatus>,
    now: Timestamp,
) -> Condition {
    let status = match state.status {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    };
    let last_transition_time = previous
        .and_then(|previous| previous.conditions.iter().find(|c| c.type_ == type_))
        .filter(|before| before.status == status)
        .map(|before| before.last_transition_time.clone())
        // Whole seconds, as metav1.Time serializes: keeps "unchanged" comparisons exact.
        .unwrap_or_else(|| Time(whole_seconds(now)));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: state.reason.as_str().to_owned(),
        message: state.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation() -> Observation {
        Observation {
            generation: Some(3),
            secret_name: "orders-tasklist-auth".into(),
            auth_method: "oauth2",
            credential: Some(CredentialTimes {
                issued_at: Timestamp::from_second(1_000).unwrap(),
                expires_at: Timestamp::from_second(1_300).unwrap(),
            }),
            next_refresh: Some(Timestamp::from_second(1_240).unwrap()),
            authenticated: ConditionState::ok(Reason::CredentialIssued, "issued"),
            reachable: ConditionState::ok(Reason::ProbeSucceeded, "probe ok"),
            secret_conflict: None,
        }
    }

    fn find<'a>(status: &'a TasklistConnectionStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn ready_when_authenticated_and_reachable() {
        let status = desired_status(&observation(), None, Timestamp::from_second(1_001).unwrap());
        let ready = find(&status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Ready"));
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(status.expires_at.as_deref(), Some("1970-01-01T00:21:40Z"));
        assert_eq!(status.last_refresh_time.as_deref(), Some("1970-01-01T00:16:40Z"));
        assert_eq!(status.next_refresh_time.as_deref(), Some("1970-01-01T00:20:40Z"));
        assert_eq!(status.auth_method.as_deref(), Some("oauth2"));
    }

    #[test]
    fn a_credential_that_never_expires_has_no_expiry_nor_refresh_in_status() {
        let never = NEVER;
        let observed = Observation {
            auth_method: "basic",
            credential: Some(CredentialTimes {
                issued_at: Timestamp::from_second(1_000).unwrap(),
                expires_at: never,
            }),
            next_refresh: Some(never),
            ..observation()
        };
        let status = desired_status(&observed, None, Timestamp::from_second(1_001).unwrap());
        assert_eq!((status.expires_at, status.next_refresh_time), (None, None));
        assert_eq!(status.last_refresh_time.as_deref(), Some("1970-01-01T00:16:40Z"));
        assert_eq!(status.auth_method.as_deref(), Some("basic"));
    }

    #[test]
    fn not_ready_with_the_first_failing_reason() {
        let mut observed = observation();
        observed.reachable = ConditionState::failing(Reason::Unreachable, "down");
        assert_eq!(readiness(&observed).reason, Reason::Unreachable);
        observed.authenticated = ConditionState::failing(Reason::SecretNotFound, "no secret");
        assert_eq!(readiness(&observed).reason, Reason::SecretNotFound);
        observed.secret_conflict = Some("not ours".into());
        assert_eq!(readiness(&observed), ConditionState::failing(Reason::SecretConflict, "not ours"));
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = desired_status(&observation(), None, Timestamp::from_second(1_001).unwrap());
        let mut observed = observation();
        observed.reachable = ConditionState::ok(Reason::ProbeSucceeded, "a different message");
        let second = desired_status(&observed, Some(&first), Timestamp::from_second(2_000).unwrap());
        assert_eq!(find(&second, READY).last_transition_time, find(&first, READY).last_transition_time);

        observed.reachable = ConditionState::failing(Reason::ProbeFailed, "500");
        let third = desired_status(&observed, Some(&second), Timestamp::from_second(3_000).unwrap());
        assert_eq!(
            find(&third, REACHABLE).last_transition_time.0,
            Timestamp::from_second(3_000).unwrap()
        );
        assert_eq!(
            find(&third, AUTHENTICATED).last_transition_time,
            find(&first, AUTHENTICATED).last_transition_time
        );
    }

    #[test]
    fn the_same_observation_gives_an_equal_status() {
        let now = Timestamp::from_second(1_001).unwrap();
        let first = desired_status(&observation(), None, now);
        let again = desired_status(&observation(), Some(&first), Timestamp::from_second(5_000).unwrap());
        assert_eq!(first, again);
    }
}
