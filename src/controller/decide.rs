//! The decisions of one reconcile, as pure functions: facts in, a decision out. No
//! Kubernetes or HTTP here, so every rule of the README's "When credentials are refreshed"
//! has a unit test below named after it. The time arithmetic of the refresh rule itself
//! (when a credential is due) is in `crate::schedule`; `reconcile.rs` carries out what
//! these functions decide.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::camunda::AuthFailureKind;
use crate::credential::add;
use crate::schedule::{MIN_SESSION_TIMEOUT, RefreshPolicy, refresh_before_honoured, retry_delay};

/// Wake up at least this often, whatever is scheduled, so that nothing missed stays missed.
pub const LONGEST_SLEEP: Duration = Duration::from_secs(3600);
/// Never sleep less than this between reconciles of one connection.
pub const SHORTEST_SLEEP: Duration = Duration::from_secs(1);
/// A 401 to the probe gets a new credential at most this often per connection.
pub const REOBTAIN_AFTER_UNAUTHORIZED_EVERY: Duration = Duration::from_secs(60);
/// A server error is retried at the latest this long before the kept credential expires.
const LAST_TRY_BEFORE_EXPIRY: Duration = Duration::from_secs(5);
/// Condition messages and the `RefreshBeforeTooLong` Event share these words, so that a
/// condition already saying so is not announced again.
const NOT_HONOURED: &str = "cannot be honoured";

/// The credential stored in the derived Secret, as far as deciding goes.
#[derive(Debug, Clone, Copy)]
pub struct Kept<'a> {
    /// The fingerprint of the inputs it was made from.
    pub inputs: &'a str,
    pub refresh_at: Timestamp,
}

/// A failure to obtain a credential, remembered for backoff.
#[derive(Debug, Clone, Copy)]
pub struct PendingRetry<'a> {
    /// The fingerprint of the inputs that failed.
    pub inputs: &'a str,
    pub retry_at: Timestamp,
}

/// What to do about the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialDecision {
    /// The stored credential was made from these inputs and is not due: use it.
    Keep,
    /// A try for these inputs failed and its retry is not due: keep what is stored, try then.
    WaitForRetry { retry_at: Timestamp },
    /// Obtain a new credential now.
    Obtain,
}

/// Keep, wait for a retry, or obtain:
/// - keep the stored credential while it was made from the current inputs and its refresh
///   time has not come (unless `replace_now`, after a 401);
/// - otherwise wait while a retry for the same inputs is pending, whatever woke the
///   connection (a watch event does not shorten a backoff);
/// - otherwise obtain a new one.
pub fn credential_decision(
    stored: Option<Kept<'_>>,
    pending: Option<PendingRetry<'_>>,
    inputs: &str,
    replace_now: bool,
    now: Timestamp,
) -> CredentialDecision {
    if let Some(kept) = stored
        && !replace_now
        && kept.inputs == inputs
        && now < kept.refresh_at
    {
        return CredentialDecision::Keep;
    }
    match pending {
        Some(retry) if retry.inputs == inputs && now < retry.retry_at => CredentialDecision::WaitForRetry { retry_at: retry.retry_at },
        _ => CredentialDecision::Obtain,
    }
}

/// What the derived Secret looked like when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivedSecretState {
    Absent,
    /// Its data differs from what the operator wrote.
    EditedByHand,
    /// Keys or annotations are missing (not written by this operator version, or cut).
    Incomplete,
    Usable,
}

/// Whether writing a new credential restores a Secret someone deleted or edited: edited
/// by hand, or absent although status says it held a credential.
pub fn is_restoring(secret: DerivedSecretState, status_says_it_held_a_credential: bool) -> bool {
    match secret {
        DerivedSecretState::EditedByHand => true,
        DerivedSecretState::Absent => status_says_it_held_a_credential,
        DerivedSecretState::Incomplete | DerivedSecretState::Usable => false,
    }
}

/// When to try again after the `consecutive`-th failure in a row (see
/// [`retry_delay`]). A server that comes back should get a try before the kept credential
/// expires, so server errors retry at the latest 5 s before that expiry (when that is still
/// ahead); rejections keep their 30 s minimum, since the same credentials would be refused
/// again.
pub fn next_retry(now: Timestamp, consecutive: u32, kind: AuthFailureKind, jitter: f64, kept_expires_at: Option<Timestamp>) -> Timestamp {
    let retry_at = add(now, retry_delay(consecutive, kind, jitter));
    let last_moment = kept_expires_at.and_then(|expires| expires.checked_sub(SignedDuration::try_from(LAST_TRY_BEFORE_EXPIRY).ok()?).ok());
    match (kind, last_moment) {
        (AuthFailureKind::ServerError, Some(last_moment)) if last_moment > now => retry_at.min(last_moment),
        _ => retry_at,
    }
}

/// The last time a 401 from the probe made the operator obtain a new credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnauthorizedReobtain {
    pub at: Timestamp,
    /// The issue time of the credential obtained then; `None` when none was obtained (the
    /// try failed, or a retry was pending).
    pub obtained_issued_at: Option<Timestamp>,
}

/// Whether a probe that answered `status` with the credential issued at `probed_issued_at`
/// calls for a new credential now. Only a 401 does (it means missing, expired or revoked;
/// 403 is a permission that a new credential will not bring), and only:
/// - when the credential was not issued in this same reconcile (a 401 right after issue
///   would meet the next one too);
/// - when it is not the credential a previous 401 brought (refused too: no loop; the next
///   planned refresh or a change of inputs tries again);
/// - at most once per [`REOBTAIN_AFTER_UNAUTHORIZED_EVERY`].
pub fn reobtain_after_unauthorized(
    status: Option<u16>,
    probed_issued_at: Timestamp,
    issued_in_this_reconcile: bool,
    last: Option<UnauthorizedReobtain>,
    now: Timestamp,
) -> bool {
    if status != Some(401) || issued_in_this_reconcile {
        return false;
    }
    match last {
        None => true,
        Some(last) => last.obtained_issued_at != Some(probed_issued_at) && now >= add(last.at, REOBTAIN_AFTER_UNAUTHORIZED_EVERY),
    }
}

/// What to remember of the last 401 re-obtain after a probe: once Tasklist accepted a
/// credential, a later 401 (a revocation) is a new problem, no longer "refused too"; the
/// rate limit stays.
pub fn after_probe(last: Option<UnauthorizedReobtain>, accepted: bool) -> Option<UnauthorizedReobtain> {
    last.map(|last| UnauthorizedReobtain {
        at: last.at,
        obtained_issued_at: if accepted { None } else { last.obtained_issued_at },
    })
}

/// The last probe, as far as deciding goes.
#[derive(Debug, Clone, Copy)]
pub struct LastProbe {
    pub at: Timestamp,
    pub credential_issued_at: Timestamp,
}

/// A probe is due when there was none, the credential changed since, or the interval passed.
pub fn probe_due(last: Option<LastProbe>, credential_issued_at: Timestamp, interval: Duration, now: Timestamp) -> bool {
    match last {
        None => true,
        Some(last) => last.credential_issued_at != credential_issued_at || now >= add(last.at, interval),
    }
}

/// How long to sleep until the next thing is due (the refresh or retry, or the next probe):
/// at least [`SHORTEST_SLEEP`], at most [`LONGEST_SLEEP`].
pub fn next_wake(now: Timestamp, due: impl IntoIterator<Item = Option<Timestamp>>) -> Duration {
    match due.into_iter().flatten().min() {
        Some(at) => Duration::try_from(at.duration_since(now))
            .unwrap_or_default()
            .clamp(SHORTEST_SLEEP, LONGEST_SLEEP),
        None => LONGEST_SLEEP,
    }
}

/// A sentence for the Authenticated condition when the user's `refreshBefore` or
/// `sessionTimeout` cannot be honoured for this credential, or `None`.
pub fn refresh_warning(
    issued_at: Timestamp,
    expires_at: Timestamp,
    refresh_before: Option<Duration>,
    session_timeout: Option<Duration>,
    policy: &RefreshPolicy,
) -> Option<String> {
    let mut notes = Vec::new();
    if let Some(timeout) = session_timeout.filter(|timeout| *timeout < MIN_SESSION_TIMEOUT) {
        notes.push(format!(
            "sessionTimeout {}s {NOT_HONOURED}: sessions are trusted for at least {}s, so that logins do not repeat every few seconds",
            timeout.as_secs_f64(),
            MIN_SESSION_TIMEOUT.as_secs()
        ));
    }
    if let Some(before) = refresh_before
        && !refresh_before_honoured(issued_at, expires_at, refresh_before, policy)
    {
        let lifetime = expires_at.duration_since(issued_at).as_secs().max(0);
        notes.push(format!(
            "refreshBefore {}s {NOT_HONOURED}: the credential lives {lifetime}s, and a credential is never replaced before half its lifetime; it is replaced about {}s after issue instead",
            before.as_secs_f64(),
            lifetime / 2
        ));
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// Whether to publish the `RefreshBeforeTooLong` Warning Event: there is a warning, and
/// neither the Authenticated condition says so already nor this process announced it (the
/// status it wrote may not have reached the reconcile yet): one Event, not one per refresh.
pub fn announce_refresh_warning(previous_authenticated_message: Option<&str>, announced: bool, warning: Option<&str>) -> bool {
    warning.is_some() && !announced && !previous_authenticated_message.is_some_and(|message| message.contains(NOT_HONOURED))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::refresh_time;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn kept(refresh_at: i64) -> Option<Kept<'static>> {
        Some(Kept {
            inputs: "fp",
            refresh_at: at(refresh_at),
        })
    }

    fn pending(inputs: &'static str, retry_at: i64) -> Option<PendingRetry<'static>> {
        Some(PendingRetry {
            inputs,
            retry_at: at(retry_at),
        })
    }

    // --- keep, wait or obtain -------------------------------------------------------------

    #[test]
    fn a_stored_credential_is_kept_until_its_refresh_time() {
        assert_eq!(credential_decision(kept(100), None, "fp", false, at(99)), CredentialDecision::Keep);
        assert_eq!(
            credential_decision(kept(100), None, "fp", false, at(100)),
            CredentialDecision::Obtain
        );
    }

    #[test]
    fn changed_inputs_get_a_new_credential_at_once() {
        assert_eq!(
            credential_decision(kept(100), None, "new", false, at(10)),
            CredentialDecision::Obtain
        );
    }

    #[test]
    fn no_stored_credential_means_obtain() {
        assert_eq!(credential_decision(None, None, "fp", false, at(10)), CredentialDecision::Obtain);
    }

    #[test]
    fn a_pending_retry_is_not_tried_before_its_time_whatever_woke_the_connection() {
        assert_eq!(
            credential_decision(kept(100), pending("fp", 150), "fp", false, at(120)),
            CredentialDecision::WaitForRetry { retry_at: at(150) }
        );
        assert_eq!(
            credential_decision(None, pending("fp", 150), "fp", true, at(120)),
            CredentialDecision::WaitForRetry { retry_at: at(150) }
        );
        assert_eq!(
            credential_decision(kept(100), pending("fp", 150), "fp", false, at(150)),
            CredentialDecision::Obtain
        );
    }

    #[test]
    fn a_retry_pending_for_other_inputs_does_not_hold_back_new_inputs() {
        assert_eq!(
            credential_decision(kept(100), pending("old", 150), "fp", false, at(120)),
            CredentialDecision::Obtain
        );
    }

    #[test]
    fn a_401_replaces_a_credential_that_is_not_due() {
        assert_eq!(credential_decision(kept(100), None, "fp", true, at(10)), CredentialDecision::Obtain);
    }

    // --- restoring ------------------------------------------------------------------------

    #[test]
    fn a_deleted_or_edited_secret_is_restored() {
        assert!(is_restoring(DerivedSecretState::EditedByHand, false));
        assert!(is_restoring(DerivedSecretState::Absent, true));
        assert!(
            !is_restoring(DerivedSecretState::Absent, false),
            "a first credential restores nothing"
        );
        assert!(!is_restoring(DerivedSecretState::Usable, true));
        assert!(!is_restoring(DerivedSecretState::Incomplete, true));
    }

    // --- retries --------------------------------------------------------------------------

    #[test]
    fn server_errors_are_retried_before_the_kept_credential_expires() {
        // 9th failure: 256 s backoff, but the kept credential expires at 100 s.
        assert_eq!(next_retry(at(0), 9, AuthFailureKind::ServerError, 0.5, Some(at(100))), at(95));
        // Nothing kept: plain backoff.
        assert_eq!(next_retry(at(0), 9, AuthFailureKind::ServerError, 0.5, None), at(256));
    }

    #[test]
    fn a_retry_due_after_expiry_is_not_moved_into_the_past() {
        // The kept credential expired already (or expires within 5 s): plain backoff.
        assert_eq!(next_retry(at(200), 3, AuthFailureKind::ServerError, 0.5, Some(at(100))), at(204));
        assert_eq!(next_retry(at(97), 3, AuthFailureKind::ServerError, 0.5, Some(at(100))), at(101));
    }

    #[test]
    fn rejections_keep_their_30s_minimum_even_near_expiry() {
        assert_eq!(next_retry(at(0), 1, AuthFailureKind::Rejected, 0.0, Some(at(10))), at(30));
    }

    #[test]
    fn a_token_expired_on_arrival_backs_off() {
        assert_eq!(next_retry(at(0), 1, AuthFailureKind::ExpiredOnArrival, 0.5, None), at(1));
        assert_eq!(next_retry(at(0), 6, AuthFailureKind::ExpiredOnArrival, 0.5, None), at(32));
    }

    // --- 401 ------------------------------------------------------------------------------

    #[test]
    fn a_401_gets_one_new_credential() {
        assert!(reobtain_after_unauthorized(Some(401), at(0), false, None, at(50)));
    }

    #[test]
    fn a_403_gets_no_new_credential() {
        assert!(!reobtain_after_unauthorized(Some(403), at(0), false, None, at(50)));
        assert!(!reobtain_after_unauthorized(Some(200), at(0), false, None, at(50)));
        assert!(!reobtain_after_unauthorized(None, at(0), false, None, at(50)));
    }

    #[test]
    fn a_401_right_after_issue_gets_no_new_credential() {
        assert!(!reobtain_after_unauthorized(Some(401), at(50), true, None, at(50)));
    }

    #[test]
    fn a_new_credential_refused_too_is_not_replaced_again() {
        let last = UnauthorizedReobtain {
            at: at(100),
            obtained_issued_at: Some(at(100)),
        };
        assert!(!reobtain_after_unauthorized(Some(401), at(100), false, Some(last), at(1000)));
    }

    #[test]
    fn a_401_gets_a_new_credential_at_most_once_a_minute() {
        let last = UnauthorizedReobtain {
            at: at(100),
            obtained_issued_at: Some(at(100)),
        };
        // A later credential (a planned refresh) refused again: not before 60 s have passed.
        assert!(!reobtain_after_unauthorized(Some(401), at(130), false, Some(last), at(159)));
        assert!(reobtain_after_unauthorized(Some(401), at(130), false, Some(last), at(160)));
        // A try that obtained nothing (the token endpoint failed) may be repeated a minute later.
        let failed = UnauthorizedReobtain {
            at: at(100),
            obtained_issued_at: None,
        };
        assert!(!reobtain_after_unauthorized(Some(401), at(0), false, Some(failed), at(159)));
        assert!(reobtain_after_unauthorized(Some(401), at(0), false, Some(failed), at(160)));
    }

    #[test]
    fn a_credential_accepted_since_may_be_replaced_on_a_later_401() {
        let last = Some(UnauthorizedReobtain {
            at: at(100),
            obtained_issued_at: Some(at(100)),
        });
        assert_eq!(after_probe(last, false), last);
        let accepted = after_probe(last, true);
        assert!(!reobtain_after_unauthorized(Some(401), at(100), false, accepted, at(159)));
        assert!(reobtain_after_unauthorized(Some(401), at(100), false, accepted, at(160)));
        assert_eq!(after_probe(None, true), None);
    }

    // --- probe and wake-up ----------------------------------------------------------------

    #[test]
    fn a_probe_is_due_for_a_new_credential_or_after_its_interval() {
        let interval = Duration::from_secs(60);
        let last = Some(LastProbe {
            at: at(100),
            credential_issued_at: at(0),
        });
        assert!(probe_due(None, at(0), interval, at(100)));
        assert!(!probe_due(last, at(0), interval, at(159)));
        assert!(probe_due(last, at(0), interval, at(160)));
        assert!(probe_due(last, at(120), interval, at(121)));
    }

    #[test]
    fn wakes_for_the_earliest_due_thing_between_1s_and_an_hour() {
        let now = at(1_000);
        assert_eq!(next_wake(now, [Some(at(1_042)), Some(at(1_100))]), Duration::from_secs(42));
        assert_eq!(next_wake(now, [Some(at(900)), None]), SHORTEST_SLEEP);
        assert_eq!(next_wake(now, [None, None]), LONGEST_SLEEP);
        assert_eq!(next_wake(now, [Some(at(100_000))]), LONGEST_SLEEP);
    }

    // --- refreshBefore and sessionTimeout that cannot be honoured -------------------------

    #[test]
    fn refresh_before_longer_than_half_the_lifetime_is_reported() {
        let policy = RefreshPolicy::default();
        let warning = refresh_warning(at(0), at(300), Some(Duration::from_secs(600)), None, &policy).unwrap();
        assert!(warning.contains("refreshBefore 600s cannot be honoured"), "{warning}");
        assert!(warning.contains("150s after issue"), "{warning}");
        assert_eq!(refresh_warning(at(0), at(300), Some(Duration::from_secs(120)), None, &policy), None);
        assert_eq!(refresh_warning(at(0), at(300), None, None, &policy), None);
    }

    #[test]
    fn refresh_before_equal_to_the_lifetime_is_reported() {
        let policy = RefreshPolicy::default();
        assert!(refresh_warning(at(0), at(300), Some(Duration::from_secs(300)), None, &policy).is_some());
    }

    #[test]
    fn a_session_timeout_under_30s_is_reported() {
        let policy = RefreshPolicy::default();
        let warning = refresh_warning(at(0), at(30), None, Some(Duration::from_secs(3)), &policy).unwrap();
        assert!(warning.contains("sessionTimeout 3s cannot be honoured"), "{warning}");
        assert_eq!(
            refresh_warning(at(0), at(1800), None, Some(Duration::from_secs(1800)), &policy),
            None
        );
    }

    #[test]
    fn the_warning_is_announced_once() {
        let warning = Some("refreshBefore 600s cannot be honoured: ...");
        assert!(announce_refresh_warning(Some("access token obtained at ..."), false, warning));
        assert!(announce_refresh_warning(None, false, warning));
        assert!(!announce_refresh_warning(None, true, warning));
        assert!(!announce_refresh_warning(warning, false, warning));
        assert!(!announce_refresh_warning(None, false, None));
    }

    // --- the whole loop: no hot loop whatever the user writes -----------------------------

    /// Simulates a connection obtaining credentials back to back for `window`, each one
    /// replaced at its refresh time; returns how many were obtained.
    fn credentials_obtained(lifetime: i64, refresh_before: Option<u64>, window: i64) -> usize {
        let policy = RefreshPolicy::default();
        let (mut now, mut count) = (at(0), 0);
        while now < at(window) {
            count += 1;
            let refresh_at = refresh_time(
                now,
                add(now, Duration::from_secs(lifetime as u64)),
                refresh_before.map(Duration::from_secs),
                &policy,
                rand::random(),
            );
            assert_eq!(
                credential_decision(Some(Kept { inputs: "fp", refresh_at }), None, "fp", false, now),
                CredentialDecision::Keep
            );
            now = refresh_at;
        }
        count
    }

    #[test]
    fn at_most_two_credentials_per_lifetime_whatever_refresh_before_says() {
        // The hot loop of issue 10: refreshBefore 10m against 300 s tokens made 64 token
        // requests in 40 s. Now: the first, and none before 150 s.
        assert_eq!(credentials_obtained(300, Some(600), 40), 1);
        assert!(credentials_obtained(300, Some(600), 3_000) <= 20);
        // A 3 s session timeout (trusted for 30 s): one login in 40 s, then one per 15-18 s.
        assert!(credentials_obtained(30, None, 40) <= 3);
        // 1 s tokens: never more than one request per 5 s.
        assert!(credentials_obtained(1, None, 40) <= 8);
    }
}
