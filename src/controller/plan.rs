//! What one reconcile does, decided from the facts it gathered: pure functions, facts in, a
//! plan out, and the outcome of each effect settled into what is remembered and shown. No
//! Kubernetes client or HTTP here: the rules (`decide`) are composed into one decision per
//! step, and every rule of the README's "When credentials are refreshed" is exercised
//! through [`plan`] in the table-driven tests below.
//!
//! The reconcile (`reconcile.rs`) runs: `gather` → [`plan`] → apply (obtain and write as
//! the plan says, [`settle_credential`], probe as [`probe_step`] says, [`settle_probe`],
//! and once more after a 401 as [`plan_after_probe`] says) → [`conclude`] → report.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

use super::decide::{
    self, CredentialDecision, DerivedSecretState, ForcedRefresh, Kept, LONGEST_SLEEP, PendingRetry, PendingWrite, ProbeStep, RecordedProbe,
    StatusRecord, WriteRetryDecision,
};
use super::memory::{Decided, FailureRecord, ProbeRecord, UnauthorizedReobtain, WriteFailureRecord};
use crate::camunda::probe::ProbeOutcome;
use crate::camunda::{AuthFailure, HttpClient, TlsTrust};
use crate::crd::{REFRESH_ANNOTATION, TasklistConnection};
use crate::credential::Credential;
use crate::derived_secret::StoredCredential;
use crate::events::ConnectionEvent;
use crate::inputs::{InputProblem, InputsSummary};
use crate::logging::{ProbeLogLevel, probe_log_level};
use crate::reason::Reason;
use crate::schedule::RefreshPolicy;
use crate::status::{AUTHENTICATED, ConditionState, CredentialTimes, Observation, REACHABLE, READY};
use crate::time::{NEVER, add, whole_seconds};

/// Retry interval while a Secret of the derived name belongs to someone else (a watch
/// also wakes the connection when that Secret changes).
const CONFLICT_RECHECK: Duration = Duration::from_secs(300);
/// Recheck interval of a connection the policy does not allow (its host may resolve elsewhere later).
const NOT_ALLOWED_RECHECK: Duration = Duration::from_secs(300);

/// Everything a reconcile decides from, read before anything is decided.
#[derive(Debug, Clone)]
pub struct Facts {
    /// When the facts were gathered: the one time the plan is made at.
    pub now: Timestamp,
    /// The connection as the watch delivered it: spec, metadata and the status last written.
    pub connection: Arc<TasklistConnection>,
    /// What the derived Secret holds.
    pub secret: DerivedSecretState,
    /// The credential stored in it, when usable.
    pub stored: Option<StoredCredential>,
    /// Whether anything may be obtained and probed, and if so from what.
    pub gate: Gate,
    /// What earlier reconciles decided.
    pub memory: Decided,
    pub refresh_policy: RefreshPolicy,
    /// A random number in [0, 1) for the jitter of backoffs.
    pub jitter: f64,
}

/// Whether the connection can be acted on, or why not (checked in this order).
#[derive(Debug, Clone)]
pub enum Gate {
    /// A Secret of the derived name exists that this connection does not own.
    Conflict,
    /// The operator's policy refuses the connection's hosts.
    NotAllowed(String),
    /// The inputs cannot be used: a missing Secret or key, a spec the operator cannot read.
    Input(InputProblem),
    /// No HTTP client can be made with the connection's TLS settings.
    NoHttpClient {
        reason: Reason,
        message: String,
    },
    Open(Box<Usable>),
}

/// The inputs of a connection that can be acted on.
#[derive(Debug, Clone)]
pub struct Usable {
    pub inputs: InputsSummary,
    /// Where tokens come from, in words (the token endpoint as configured or discovered).
    pub token_source: Option<String>,
    /// Which certificates to trust, and the HTTP client made for that trust: what the
    /// effects use; the plan reads neither.
    pub trust: TlsTrust,
    pub http: HttpClient,
}

/// What a reconcile is to do.
// One plan per reconcile, never stored: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Plan {
    /// Nothing is obtained or probed: status says why, and when to look again.
    Stop(Stop),
    /// Act on the credential with these inputs.
    Go(Go),
}

#[derive(Debug, Clone)]
pub struct Stop {
    pub authenticated: ConditionState,
    pub reachable: ConditionState,
    /// The credential status shows (the stored one, kept until it expires).
    pub credential: Option<StoredCredential>,
    pub secret_conflict: Option<String>,
    /// Announced before status is written (once: not when status says so already).
    pub event: Option<ConnectionEvent>,
    pub wake: Duration,
}

#[derive(Debug, Clone)]
pub struct Go {
    /// A new credential replaces a Secret someone deleted or edited.
    pub restoring: bool,
    pub credential: CredentialStep,
    /// What is remembered once the step is taken (before its outcome is known).
    pub memory: Decided,
    pub usable: Usable,
}

/// What to do about the credential.
#[derive(Debug, Clone, PartialEq)]
pub enum CredentialStep {
    /// Keep the stored credential (it is good, or a retry or a forced refresh waits);
    /// the Authenticated condition says this.
    Use { authenticated: ConditionState },
    /// Write again the credential a refused write carried; obtain nothing.
    WriteKept(StoredCredential),
    /// Obtain a new credential and write it. `reuse_shared`: a token another connection of
    /// the same client holds may be taken (not when restoring a deleted or edited Secret).
    Obtain { reuse_shared: bool },
}

/// What carrying out a [`CredentialStep`] came to.
#[derive(Debug, Clone)]
pub enum CredentialResult {
    /// Nothing was done ([`CredentialStep::Use`]).
    Used {
        authenticated: ConditionState,
    },
    /// A credential was obtained (or kept from a refused write) and written.
    Written(StoredCredential),
    /// The API server refused the write; the credential is kept for the next try.
    WriteFailed {
        credential: StoredCredential,
        message: String,
    },
    ObtainFailed(AuthFailure),
    /// The referenced Secrets' values could not be read (a missing key).
    InputProblem(InputProblem),
}

/// The credential in hand after the credential step, and what follows from it.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub credential: Option<StoredCredential>,
    pub authenticated: ConditionState,
    pub newly_issued: bool,
    /// Events to publish, in order.
    pub events: Vec<ConnectionEvent>,
    /// How many times a stored credential was replaced (the refresh metric).
    pub refreshes: u32,
    /// Set when obtaining failed: when it is tried again.
    pub retry_at: Option<Timestamp>,
    /// The reconcile stops here: the values could not be read.
    pub stop: Option<Stop>,
    pub memory: Decided,
}

/// The plan for `facts`: stop and say why, or what to do about the credential.
pub fn plan(facts: &Facts) -> Plan {
    let connection = &facts.connection;
    let usable = match &facts.gate {
        Gate::Conflict => return Plan::Stop(conflict(connection)),
        Gate::NotAllowed(message) => {
            return Plan::Stop(Stop {
                authenticated: ConditionState::failing(Reason::NotAllowed, message.clone()),
                reachable: ConditionState::unknown(
                    Reason::NotProbed,
                    "Tasklist was not probed: the operator's policy does not allow this connection",
                ),
                credential: facts.stored.clone(),
                secret_conflict: None,
                event: None,
                // A spec change wakes the connection at once; the recheck catches DNS changes.
                wake: NOT_ALLOWED_RECHECK,
            });
        }
        Gate::Input(problem) => return Plan::Stop(input_stop(facts, &facts.memory, facts.stored.clone(), problem.clone())),
        Gate::NoHttpClient { reason, message } => {
            return Plan::Stop(Stop {
                authenticated: ConditionState::failing(*reason, message.clone()),
                reachable: ConditionState::unknown(Reason::NotProbed, "no usable TLS settings"),
                credential: facts.stored.clone(),
                secret_conflict: None,
                event: None,
                wake: LONGEST_SLEEP,
            });
        }
        Gate::Open(usable) => usable,
    };
    let status = connection.status.as_ref();
    let status_says_it_held_a_credential =
        status.is_some_and(|s| s.last_refresh_time.is_some() && s.secret_name == Some(connection.secret_name()));
    let restoring = decide::is_restoring(facts.secret, status_says_it_held_a_credential);
    let memory = with_failure_from_status(facts, usable, facts.memory.clone());
    let (credential, memory) = credential_step(facts, usable, facts.stored.as_ref(), memory, false, restoring);
    Plan::Go(Go {
        restoring,
        credential,
        memory,
        usable: usable.as_ref().clone(),
    })
}

/// The Secret of the derived name is someone else's: nothing is attempted.
fn conflict(connection: &TasklistConnection) -> Stop {
    let message = format!(
        "a Secret named {:?} exists and is not managed by this connection; delete it or choose another spec.secretName",
        connection.secret_name()
    );
    let not_attempted =
        |what: &str| ConditionState::unknown(Reason::SecretConflict, format!("{what} not attempted: the Secret name is taken"));
    let already_reported = condition(connection, READY).is_some_and(|(_, reason, _)| reason == Reason::SecretConflict.as_str());
    Stop {
        authenticated: not_attempted("authentication"),
        reachable: not_attempted("probe"),
        credential: None,
        event: (!already_reported).then(|| ConnectionEvent::SecretConflict { message: message.clone() }),
        secret_conflict: Some(message),
        wake: CONFLICT_RECHECK,
    }
}

/// The inputs cannot be used: say so, keep the stored credential, probe nothing. A watch
/// on the referenced Secret wakes the connection when it is fixed; a refresh time already
/// past cannot be acted on until then (waking for it would be a loop once a second).
fn input_stop(facts: &Facts, memory: &Decided, credential: Option<StoredCredential>, problem: InputProblem) -> Stop {
    let reachable = match (&memory.last_probe, &credential) {
        (Some(last), Some(credential)) if last.credential_issued_at == credential.issued_at => last.result.clone(),
        _ => ConditionState::unknown(Reason::NotProbed, "Tasklist was not probed: the credential's inputs are not usable"),
    };
    let refresh_ahead = credential.as_ref().map(|c| c.refresh_at).filter(|at| *at > facts.now);
    Stop {
        authenticated: ConditionState::failing(problem.reason, problem.message),
        reachable,
        credential,
        secret_conflict: None,
        event: None,
        wake: decide::next_wake(facts.now, [refresh_ahead]),
    }
}

/// On first sight of a connection after a start: the failure to obtain a credential that
/// status records, with its retry time (`nextRefreshTime`), so that a restart neither
/// shortens the 30 s pause after a rejection nor a backoff in progress.
fn with_failure_from_status(facts: &Facts, usable: &Usable, mut memory: Decided) -> Decided {
    if memory.seen {
        return memory;
    }
    memory.seen = true;
    let connection = &facts.connection;
    let Some(status) = &connection.status else {
        return memory;
    };
    let authenticated = condition(connection, AUTHENTICATED);
    let record = StatusRecord {
        authenticated: authenticated.map(|(status, reason, _)| (status, reason)),
        next_refresh: status.next_refresh_time.as_deref().and_then(|time| time.parse().ok()),
        current_generation: status.observed_generation.is_some() && status.observed_generation == connection.metadata.generation,
    };
    if let Some((restored, retry_at)) = decide::failure_from_status(record, facts.now) {
        let message = authenticated.map(|(_, _, message)| message.to_owned()).unwrap_or_default();
        memory.failure.get_or_insert_with(|| {
            Box::new(FailureRecord {
                fingerprint: usable.inputs.fingerprint.clone(),
                failure: AuthFailure { message, ..restored },
                consecutive: 1,
                retry_at,
            })
        });
    }
    memory
}

/// Keep `stored`, wait for a pending retry, or obtain a new credential:
/// - after a refused write, only the write is retried ([`decide::write_retry_decision`]);
/// - a refresh forced with the annotation runs at most once per interval ([`decide::forced_refresh`]);
/// - otherwise [`decide::credential_decision`] (`replace_now` after a 401).
fn credential_step(
    facts: &Facts,
    usable: &Usable,
    stored: Option<&StoredCredential>,
    mut memory: Decided,
    replace_now: bool,
    restoring: bool,
) -> (CredentialStep, Decided) {
    let (now, inputs) = (facts.now, &usable.inputs);
    if let Some(record) = &memory.write_failure {
        let pending = PendingWrite {
            inputs: &record.fingerprint,
            refresh_at: record.credential.as_ref().map(|kept| kept.refresh_at),
            retry_at: record.retry_at,
        };
        match decide::write_retry_decision(pending, &inputs.fingerprint, now) {
            WriteRetryDecision::Wait { .. } => {
                let authenticated = ConditionState::failing(Reason::SecretWriteFailed, record.message.clone());
                return (CredentialStep::Use { authenticated }, memory);
            }
            WriteRetryDecision::WriteKept => {
                if let Some(kept) = record.credential.clone() {
                    return (CredentialStep::WriteKept(kept), memory);
                }
            }
            // The episode goes on (its count and Event) until a write succeeds, or
            // nothing needs writing any more; the kept credential is dropped.
            WriteRetryDecision::DecideAsUsual => {
                if let Some(record) = memory.write_failure.as_mut() {
                    record.credential = None;
                }
            }
        }
    }
    let forced = decide::forced_refresh(
        facts.connection.refresh_request(),
        memory.forced_refresh.as_ref().map(|(value, at)| (value.as_str(), *at)),
        stored.is_some_and(|current| current.inputs == inputs.fingerprint),
        facts.refresh_policy.forced_refresh_interval,
        now,
    );
    let forced_wait = match forced {
        // Whole seconds, as every time in status; rounded up, so that the wake-up is not early.
        ForcedRefresh::NotBefore(at) => stored
            .filter(|current| now < current.refresh_at)
            .map(|current| (current, whole_seconds(add(at, Duration::from_millis(999))))),
        _ => None,
    };
    memory.forced_refresh_wait = forced_wait.map(|(_, at)| at);
    if let Some((current, at)) = forced_wait {
        let message = format!(
            "{}; the refresh requested with the {REFRESH_ANNOTATION} annotation runs at {at} at the earliest (at most one a minute)",
            issued_message(current, usable)
        );
        let authenticated = ConditionState::ok(Reason::CredentialIssued, message);
        return (CredentialStep::Use { authenticated }, memory);
    }
    if let (ForcedRefresh::Now, Some(value)) = (forced, facts.connection.refresh_request()) {
        memory.forced_refresh = Some((value.to_owned(), now));
    }
    let previous_failure = memory.failure.as_ref().filter(|failure| failure.fingerprint == inputs.fingerprint);
    let kept = stored.map(|current| Kept {
        inputs: &current.inputs,
        refresh_at: current.refresh_at,
    });
    let pending = previous_failure.map(|failure| PendingRetry {
        inputs: &failure.fingerprint,
        retry_at: failure.retry_at,
    });
    let step = match decide::credential_decision(kept, pending, &inputs.fingerprint, replace_now, now) {
        CredentialDecision::Keep => {
            let authenticated = stored.map_or_else(
                || ConditionState::unknown(Reason::NoCredential, "no credential"),
                |current| ConditionState::ok(Reason::CredentialIssued, issued_message(current, usable)),
            );
            memory.write_failure = None;
            CredentialStep::Use { authenticated }
        }
        CredentialDecision::WaitForRetry { .. } => {
            let authenticated = previous_failure.map_or_else(
                || ConditionState::unknown(Reason::NoCredential, "waiting to try again"),
                |failure| failed_condition(&failure.failure),
            );
            memory.write_failure = None;
            CredentialStep::Use { authenticated }
        }
        CredentialDecision::Obtain => CredentialStep::Obtain { reuse_shared: !restoring },
    };
    (step, memory)
}

/// What the credential step came to, and what is remembered of it. `stored` is the
/// credential held before the step; `at` is when the step finished.
pub fn settle_credential(
    facts: &Facts,
    usable: &Usable,
    stored: Option<StoredCredential>,
    restoring: bool,
    mut memory: Decided,
    result: CredentialResult,
    at: Timestamp,
) -> Fresh {
    let mut fresh = Fresh {
        credential: stored,
        authenticated: ConditionState::unknown(Reason::NoCredential, "no credential"),
        newly_issued: false,
        events: Vec::new(),
        refreshes: 0,
        retry_at: None,
        stop: None,
        memory: Decided::default(),
    };
    match result {
        CredentialResult::Used { authenticated } => fresh.authenticated = authenticated,
        CredentialResult::Written(credential) => {
            memory.failure = None;
            memory.write_failure = None;
            fresh.events.push(match (&fresh.credential, restoring) {
                (_, true) => ConnectionEvent::SecretRestored,
                (Some(_), false) => ConnectionEvent::CredentialRefreshed,
                (None, false) => ConnectionEvent::CredentialIssued,
            });
            if usable.inputs.insecure_skip_verify {
                fresh.events.push(ConnectionEvent::InsecureSkipVerify);
            }
            fresh.refreshes = u32::from(fresh.credential.is_some());
            fresh.authenticated = ConditionState::ok(Reason::CredentialIssued, issued_message(&credential, usable));
            fresh.credential = Some(credential);
            fresh.newly_issued = true;
        }
        CredentialResult::WriteFailed { credential, message } => {
            let previous = memory.write_failure.as_ref();
            let consecutive = previous.map_or(1, |p| p.consecutive.saturating_add(1));
            let announced = previous.is_some_and(|p| p.announced);
            let previous_reason = condition(&facts.connection, AUTHENTICATED).map(|(_, reason, _)| reason);
            if decide::announce_write_failure(previous_reason, announced) {
                fresh.events.push(ConnectionEvent::SecretWriteFailed { message: message.clone() });
            }
            let retry_at = decide::next_write_retry(at, consecutive, facts.jitter);
            // Obtaining worked: no backoff for the token endpoint or the login.
            memory.failure = None;
            memory.write_failure = Some(Box::new(WriteFailureRecord {
                // The inputs the credential was made from.
                fingerprint: credential.inputs.clone(),
                credential: Some(credential),
                consecutive,
                retry_at,
                message: message.clone(),
                announced: true,
            }));
            fresh.retry_at = Some(retry_at);
            fresh.authenticated = ConditionState::failing(Reason::SecretWriteFailed, message);
        }
        CredentialResult::ObtainFailed(failure) => {
            let previous = memory.failure.as_ref().filter(|f| f.fingerprint == usable.inputs.fingerprint);
            let consecutive = previous.map_or(1, |previous| previous.consecutive.saturating_add(1));
            let kept_expires_at = fresh.credential.as_ref().map(|current| current.expires_at);
            let retry_at = decide::next_retry(at, consecutive, failure.kind, facts.jitter, kept_expires_at);
            fresh.authenticated = failed_condition(&failure);
            memory.write_failure = None;
            memory.failure = Some(Box::new(FailureRecord {
                fingerprint: usable.inputs.fingerprint.clone(),
                failure,
                consecutive,
                retry_at,
            }));
            fresh.retry_at = Some(retry_at);
        }
        CredentialResult::InputProblem(problem) => {
            fresh.authenticated = ConditionState::failing(problem.reason, problem.message.clone());
            fresh.stop = Some(input_stop(facts, &memory, fresh.credential.clone(), problem));
        }
    }
    fresh.memory = memory;
    fresh
}

/// What to do about the probe, with the credential in hand ([`decide::probe_step`]).
pub fn probe_step(facts: &Facts, usable: &Usable, fresh: &Fresh) -> ProbeStep {
    if !facts.connection.spec.probe.enabled {
        return ProbeStep::Show(ConditionState::ok(Reason::ProbeDisabled, "the probe is disabled"));
    }
    let Some(credential) = &fresh.credential else {
        return ProbeStep::Show(ConditionState::unknown(
            Reason::NoCredential,
            "there is no credential to probe Tasklist with yet",
        ));
    };
    let recorded_issue = facts
        .connection
        .status
        .as_ref()
        .and_then(|status| status.last_refresh_time.as_deref());
    let recorded = RecordedProbe {
        condition: condition(&facts.connection, REACHABLE),
        same_credential: recorded_issue.and_then(|time| time.parse::<Timestamp>().ok()) == Some(credential.issued_at),
    };
    decide::probe_step(
        fresh.memory.last_probe.as_ref(),
        recorded,
        credential.issued_at,
        fresh.newly_issued,
        usable.inputs.probe_interval,
        facts.now,
    )
}

/// What a probe that was sent came to.
#[derive(Debug, Clone)]
pub enum ProbeResult {
    /// Tasklist answered (or did not) at `at`, perhaps to another connection's request for
    /// the same credential. `message` is the outcome in words.
    Answered {
        outcome: ProbeOutcome,
        message: String,
        at: Timestamp,
    },
    /// No probe slot was free: try again after this long.
    Deferred { retry_after: Duration },
}

/// The Reachable condition after a probe step, and what is remembered of it.
#[derive(Debug, Clone)]
pub struct Probed {
    pub reachable: ConditionState,
    /// The probe's outcome, when a probe answered in this reconcile.
    pub outcome: Option<ProbeOutcome>,
    /// A deferred probe is due already: it is tried again this much later, not once a second.
    pub deferred_for: Option<Duration>,
    /// How loudly to log the answer (a change is louder than a repeat); none without one.
    pub log: Option<ProbeLogLevel>,
}

pub fn settle_probe(fresh: &mut Fresh, step: ProbeStep, result: Option<ProbeResult>) -> Probed {
    let mut probed = Probed {
        reachable: ConditionState::unknown(Reason::NotProbed, "Tasklist was not probed"),
        outcome: None,
        deferred_for: None,
        log: None,
    };
    let shown_while_waiting = match step {
        ProbeStep::Show(shown) => {
            probed.reachable = shown;
            return probed;
        }
        ProbeStep::Send { shown_while_waiting } => shown_while_waiting,
    };
    let (Some(result), Some(credential)) = (result, &fresh.credential) else {
        return probed;
    };
    match result {
        ProbeResult::Deferred { retry_after } => {
            probed.deferred_for = Some(retry_after);
            probed.reachable = shown_while_waiting.unwrap_or_else(|| {
                ConditionState::unknown(
                    Reason::NotProbed,
                    "Tasklist was not probed yet: waiting for a free probe slot (too many probes to this host or in all)",
                )
            });
        }
        ProbeResult::Answered { outcome, message, at } => {
            let reason = Reason::of_probe(&outcome);
            probed.reachable = match &outcome {
                ProbeOutcome::Succeeded => ConditionState::ok(reason, message),
                _ => ConditionState::failing(reason, message),
            };
            let previous = fresh.memory.last_probe.as_ref().map(|last| &last.result);
            let succeeded = |state: &ConditionState| (state.status == Some(true), state.reason.as_str());
            probed.log = Some(probe_log_level(previous.map(succeeded), succeeded(&probed.reachable)));
            // The answer's own time, also when it was another connection's: connections that
            // share answers stay due together, so that one request keeps serving them all.
            fresh.memory.last_probe = Some(ProbeRecord {
                at,
                credential_issued_at: credential.issued_at,
                result: probed.reachable.clone(),
            });
            probed.outcome = Some(outcome);
        }
    }
    probed
}

/// Whether a probe's 401 calls for a new credential now, and how to get it: a 401 means
/// the credential is missing, expired or revoked (a Tasklist restart forgets sessions; an
/// identity provider revokes tokens), so one new credential is obtained, rate-limited,
/// without waiting for the planned refresh ([`decide::reobtain_after_unauthorized`]).
/// Basic credentials are the user's own: obtaining them again would give the same header.
pub fn plan_after_probe(facts: &Facts, usable: &Usable, fresh: &Fresh, probed: &Probed) -> Option<(CredentialStep, Decided)> {
    let probed_credential = fresh.credential.as_ref()?;
    let status = match probed.outcome.as_ref()? {
        ProbeOutcome::Unauthorized { status } => Some(*status),
        _ => None,
    };
    let renewable = !usable.inputs.basic;
    let reobtain = renewable
        && decide::reobtain_after_unauthorized(
            status,
            probed_credential.issued_at,
            fresh.newly_issued,
            fresh.memory.unauthorized_reobtain,
            facts.now,
        );
    reobtain.then(|| credential_step(facts, usable, fresh.credential.as_ref(), fresh.memory.clone(), true, false))
}

/// Remembers the re-obtain after a 401, with the credential it brought (if any).
pub fn remember_reobtain(facts: &Facts, fresh: &mut Fresh) {
    let obtained_issued_at = fresh.newly_issued.then(|| fresh.credential.as_ref().map(|c| c.issued_at)).flatten();
    fresh.memory.unauthorized_reobtain = Some(UnauthorizedReobtain {
        at: facts.now,
        obtained_issued_at,
    });
}

/// What the report writes: memory, status, Events, and when to wake up.
#[derive(Debug, Clone)]
pub struct Report {
    pub memory: Decided,
    pub observation: Observation,
    /// Events to publish before status is written, in order.
    pub events: Vec<ConnectionEvent>,
    /// A `refreshBefore` or `sessionTimeout` that cannot be honoured, announced now.
    pub announced_warning: Option<String>,
    pub refreshes: u32,
    pub wake: Duration,
}

/// The report of a reconcile that went through: status from the credential and the probe,
/// a `refreshBefore` or `sessionTimeout` that cannot be honoured, the next wake-up (the
/// refresh or retry, or the next probe, or a forced refresh's turn), measured from
/// `finished` (when the effects were done).
pub fn conclude(facts: &Facts, usable: &Usable, mut fresh: Fresh, probed: Probed, finished: Timestamp) -> Report {
    let inputs = &usable.inputs;
    let mut memory = fresh.memory;
    if probed.reachable.reason == Reason::ProbeSucceeded {
        memory.unauthorized_reobtain = decide::after_probe(memory.unauthorized_reobtain, true);
    }
    let same_inputs = |fingerprint: &str| fingerprint == inputs.fingerprint;
    let pending_retry = memory.failure.as_ref().filter(|f| same_inputs(&f.fingerprint)).map(|f| f.retry_at);
    let write_retry = memory
        .write_failure
        .as_ref()
        .filter(|f| same_inputs(&f.fingerprint))
        .map(|f| f.retry_at);
    let next_refresh = decide::next_refresh(
        write_retry,
        pending_retry,
        fresh.credential.as_ref().map(|c| c.refresh_at),
        facts.now,
    );
    let warning = fresh.credential.as_ref().filter(|c| c.expires_at != NEVER).and_then(|credential| {
        decide::refresh_warning(
            credential.issued_at,
            credential.expires_at,
            inputs.refresh_before,
            inputs.session_timeout,
            &facts.refresh_policy.for_connection(inputs.all_consumers_nudged),
        )
    });
    let mut announced_warning = None;
    if fresh.authenticated.status == Some(true)
        && let Some(warning) = &warning
    {
        let previous = condition(&facts.connection, AUTHENTICATED).map(|(_, _, message)| message);
        if decide::announce_refresh_warning(previous, memory.refresh_warning_announced, Some(warning)) {
            fresh
                .events
                .push(ConnectionEvent::RefreshBeforeTooLong { message: warning.clone() });
            announced_warning = Some(warning.clone());
            memory.refresh_warning_announced = true;
        }
        fresh.authenticated.message = format!("{}; {warning}", fresh.authenticated.message);
    }
    if warning.is_none() {
        memory.refresh_warning_announced = false;
    }
    let next_probe = memory
        .last_probe
        .as_ref()
        .filter(|_| facts.connection.spec.probe.enabled)
        .map(|probe| add(probe.at, inputs.probe_interval));
    let next_probe = probed.deferred_for.map(|wait| add(facts.now, wait)).or(next_probe);
    let wake = decide::next_wake(finished, [next_refresh, next_probe, memory.forced_refresh_wait]);
    Report {
        observation: observe(
            facts,
            fresh.credential.as_ref(),
            next_refresh,
            fresh.authenticated,
            probed.reachable,
        ),
        memory,
        events: fresh.events,
        announced_warning,
        refreshes: fresh.refreshes,
        wake,
    }
}

/// The report of a reconcile that stopped.
pub fn conclude_stop(facts: &Facts, memory: Decided, stop: Stop) -> Report {
    let mut observation = observe(facts, stop.credential.as_ref(), None, stop.authenticated, stop.reachable);
    observation.secret_conflict = stop.secret_conflict;
    Report {
        memory,
        observation,
        events: stop.event.into_iter().collect(),
        announced_warning: None,
        refreshes: 0,
        wake: stop.wake,
    }
}

fn observe(
    facts: &Facts,
    credential: Option<&StoredCredential>,
    next_refresh: Option<Timestamp>,
    authenticated: ConditionState,
    reachable: ConditionState,
) -> Observation {
    let connection = &facts.connection;
    Observation {
        generation: connection.metadata.generation,
        secret_name: connection.secret_name(),
        auth_method: connection.spec.auth.method_name(),
        credential: credential.map(|c| CredentialTimes {
            issued_at: c.issued_at,
            expires_at: c.expires_at,
        }),
        next_refresh,
        authenticated,
        reachable,
        secret_conflict: None,
    }
}

/// A condition of the connection's status: its status, reason and message.
fn condition<'c>(connection: &'c TasklistConnection, type_: &str) -> Option<(&'c str, &'c str, &'c str)> {
    let status = connection.status.as_ref()?;
    let found = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((found.status.as_str(), found.reason.as_str(), found.message.as_str()))
}

fn failed_condition(failure: &AuthFailure) -> ConditionState {
    ConditionState::failing(Reason::of_auth_failure(failure), failure.message.clone())
}

fn issued_message(credential: &StoredCredential, usable: &Usable) -> String {
    let kind = match (&usable.token_source, &credential.credential) {
        // No value read from a referenced Secret reaches status, not even the username:
        // whoever may read status may not be allowed to read that Secret.
        (_, Credential::Basic(_)) => {
            return format!("HTTP Basic credentials stored at {}; they do not expire", credential.issued_at);
        }
        (Some(source), _) => format!("access token from {source}"),
        (None, _) => "session".to_owned(),
    };
    format!("{kind} obtained at {}, valid until {}", credential.issued_at, credential.expires_at)
}

#[cfg(test)]
mod tests {
    //! Facts in, plan out: one row per rule of docs/refresh.md that the plan decides.

    use super::*;
    use crate::camunda::{AuthFailureKind, HttpSettings, Sensitive};
    use crate::crd::TasklistConnectionStatus;

    const FINGERPRINT: &str = "inputs-1";

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("a valid time")
    }

    fn connection(annotation: Option<&str>, status: Option<serde_json::Value>) -> Arc<TasklistConnection> {
        let mut object = serde_json::json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
            "metadata": {"name": "orders", "namespace": "team-a", "generation": 1},
            "spec": {"url": "https://tasklist.example", "auth": {"oauth2": {
                "tokenUrl": "https://login.example/oauth/token", "clientSecretRef": {"name": "client"}}}},
        });
        if let Some(value) = annotation {
            object["metadata"]["annotations"] = serde_json::json!({ REFRESH_ANNOTATION: value });
        }
        if let Some(status) = status {
            object["status"] = status;
        }
        Arc::new(serde_json::from_value(object).expect("a valid connection"))
    }

    /// Issued at 1000 s, refresh due at 1240 s, expires at 1300 s.
    fn stored(inputs: &str) -> StoredCredential {
        StoredCredential {
            credential: Credential::Bearer(Sensitive::new("eyJ.token.sig")),
            issued_at: at(1_000),
            expires_at: at(1_300),
            refresh_at: at(1_240),
            inputs: inputs.into(),
        }
    }

    fn usable(basic: bool) -> Usable {
        let trust = TlsTrust::default();
        Usable {
            inputs: InputsSummary {
                fingerprint: FINGERPRINT.into(),
                refresh_before: None,
                probe_interval: Duration::from_secs(60),
                all_consumers_nudged: false,
                session_timeout: None,
                token_endpoint: None,
                basic,
                insecure_skip_verify: false,
                ca_version: None,
            },
            token_source: Some("https://login.example/oauth/token".into()),
            http: HttpClient::new(&HttpSettings::default(), &trust).expect("a client"),
            trust,
        }
    }

    /// A connection at rest at `now`: its Secret holds a good credential from the current inputs.
    fn facts(now: i64) -> Facts {
        Facts {
            now: at(now),
            connection: connection(None, None),
            secret: DerivedSecretState::Usable,
            stored: Some(stored(FINGERPRINT)),
            gate: Gate::Open(Box::new(usable(false))),
            memory: Decided {
                seen: true,
                ..Decided::default()
            },
            refresh_policy: RefreshPolicy::default(),
            jitter: 0.5,
        }
    }

    fn failure(kind: AuthFailureKind, retry_at: i64, fingerprint: &str) -> FailureRecord {
        FailureRecord {
            fingerprint: fingerprint.into(),
            failure: AuthFailure {
                kind,
                message: "the token endpoint refused the client".into(),
                detail: None,
            },
            consecutive: 1,
            retry_at: at(retry_at),
        }
    }

    fn write_failure(retry_at: i64, kept: Option<StoredCredential>) -> WriteFailureRecord {
        WriteFailureRecord {
            fingerprint: FINGERPRINT.into(),
            credential: kept,
            consecutive: 1,
            retry_at: at(retry_at),
            message: "could not write the derived Secret".into(),
            announced: true,
        }
    }

    /// What a plan comes to, in a word a table can hold.
    fn summary(plan: &Plan) -> String {
        match plan {
            Plan::Stop(stop) => format!("stop {} {}s", stop.authenticated.reason, stop.wake.as_secs()),
            Plan::Go(go) => match &go.credential {
                CredentialStep::Use { authenticated } => format!("use {}", authenticated.reason),
                CredentialStep::WriteKept(_) => "write kept".into(),
                CredentialStep::Obtain { reuse_shared: true } => "obtain".into(),
                CredentialStep::Obtain { reuse_shared: false } => "obtain, restoring".into(),
            },
        }
    }

    fn memory_of(plan: &Plan) -> Decided {
        match plan {
            Plan::Go(go) => go.memory.clone(),
            Plan::Stop(_) => panic!("the plan stops"),
        }
    }

    /// How a row changes the facts of a connection at rest.
    type Change = Box<dyn Fn(&mut Facts)>;

    #[test]
    fn the_plan_follows_each_rule() {
        let held_status = serde_json::json!({"secretName": "orders-tasklist-auth", "lastRefreshTime": "1970-01-01T00:16:40Z"});
        let rejected_status = serde_json::json!({
            "observedGeneration": 1, "nextRefreshTime": "1970-01-01T00:20:00Z",
            "conditions": [{"type": "Authenticated", "status": "False", "reason": "CredentialsRejected", "message": "refused",
                            "lastTransitionTime": "1970-01-01T00:16:40Z"}],
        });
        let cases: Vec<(&str, Change, &str)> = vec![
            ("a good credential is kept", Box::new(|_| {}), "use CredentialIssued"),
            ("a due credential is replaced", Box::new(|f| f.now = at(1_240)), "obtain"),
            (
                "changed inputs are acted on at once",
                Box::new(|f| f.stored = Some(stored("inputs-0"))),
                "obtain",
            ),
            (
                "a first credential is obtained",
                Box::new(|f| (f.stored, f.secret) = (None, DerivedSecretState::Absent)),
                "obtain",
            ),
            (
                "a deleted Secret is restored with a new credential, not a shared one",
                Box::new(move |f| {
                    (f.stored, f.secret) = (None, DerivedSecretState::Absent);
                    f.connection = connection(None, Some(held_status.clone()));
                }),
                "obtain, restoring",
            ),
            (
                "a hand-edited Secret is restored",
                Box::new(|f| (f.stored, f.secret) = (None, DerivedSecretState::EditedByHand)),
                "obtain, restoring",
            ),
            (
                "a pending retry is not shortened by a wake-up",
                Box::new(|f| {
                    f.now = at(1_250);
                    f.memory.failure = Some(Box::new(failure(AuthFailureKind::Rejected, 1_280, FINGERPRINT)));
                }),
                "use CredentialsRejected",
            ),
            (
                "a due retry obtains",
                Box::new(|f| {
                    f.now = at(1_280);
                    f.memory.failure = Some(Box::new(failure(AuthFailureKind::ServerError, 1_280, FINGERPRINT)));
                }),
                "obtain",
            ),
            (
                "a retry pending for other inputs does not hold back new ones",
                Box::new(|f| {
                    f.stored = None;
                    f.memory.failure = Some(Box::new(failure(AuthFailureKind::Rejected, 1_280, "inputs-0")));
                }),
                "obtain",
            ),
            (
                "a restart honours the retry time status records",
                Box::new(move |f| {
                    (f.stored, f.memory.seen) = (None, false);
                    f.connection = connection(None, Some(rejected_status.clone()));
                }),
                "use CredentialsRejected",
            ),
            (
                "a failed write waits for its retry",
                Box::new(|f| f.memory.write_failure = Some(Box::new(write_failure(1_150, Some(stored(FINGERPRINT)))))),
                "use SecretWriteFailed",
            ),
            (
                "a failed write is retried with the kept credential",
                Box::new(|f| {
                    f.now = at(1_100);
                    f.memory.write_failure = Some(Box::new(write_failure(1_100, Some(stored(FINGERPRINT)))));
                }),
                "write kept",
            ),
            (
                "a kept credential whose refresh came is dropped for a new one",
                Box::new(|f| {
                    f.now = at(1_250);
                    f.memory.write_failure = Some(Box::new(write_failure(1_100, Some(stored(FINGERPRINT)))));
                }),
                "obtain",
            ),
            (
                "the refresh annotation obtains at once",
                // The annotation is one of the inputs: the stored credential predates it.
                Box::new(|f| (f.connection, f.stored) = (connection(Some("1"), None), Some(stored("inputs-0")))),
                "obtain",
            ),
            (
                "the refresh annotation waits for its interval",
                Box::new(|f| {
                    (f.connection, f.stored) = (connection(Some("2"), None), Some(stored("inputs-0")));
                    f.memory.forced_refresh = Some(("1".into(), at(1_050)));
                }),
                "use CredentialIssued",
            ),
            (
                "a Secret of the name that is someone else's stops everything",
                Box::new(|f| f.gate = Gate::Conflict),
                "stop SecretConflict 300s",
            ),
            (
                "the policy stops a connection before anything is sent",
                Box::new(|f| f.gate = Gate::NotAllowed("loopback".into())),
                "stop NotAllowed 300s",
            ),
            (
                "a missing Secret waits for its watch, and the refresh time ahead",
                Box::new(|f| f.gate = Gate::Input(InputProblem::secret_not_found("client"))),
                "stop SecretNotFound 140s",
            ),
            (
                "a missing Secret past the refresh time waits for its watch only",
                Box::new(|f| {
                    f.now = at(1_250);
                    f.gate = Gate::Input(InputProblem::secret_not_found("client"));
                }),
                "stop SecretNotFound 3600s",
            ),
        ];
        for (rule, change, expected) in cases {
            let mut facts = facts(1_100);
            change(&mut facts);
            assert_eq!(summary(&plan(&facts)), expected, "{rule}");
        }
    }

    #[test]
    fn the_plan_remembers_what_it_acted_on() {
        let mut forced = facts(1_100);
        (forced.connection, forced.stored) = (connection(Some("1"), None), Some(stored("inputs-0")));
        assert_eq!(memory_of(&plan(&forced)).forced_refresh, Some(("1".to_owned(), at(1_100))));

        let mut waiting = facts(1_100);
        (waiting.connection, waiting.stored) = (connection(Some("2"), None), Some(stored("inputs-0")));
        waiting.memory.forced_refresh = Some(("1".into(), at(1_050)));
        let Plan::Go(go) = plan(&waiting) else { panic!("goes") };
        assert_eq!(go.memory.forced_refresh_wait, Some(at(1_110)));
        let CredentialStep::Use { authenticated } = go.credential else {
            panic!("keeps")
        };
        assert!(
            authenticated.message.contains("runs at 1970-01-01T00:18:30Z at the earliest"),
            "{}",
            authenticated.message
        );

        let mut dropped = facts(1_250);
        dropped.memory.write_failure = Some(Box::new(write_failure(1_100, Some(stored(FINGERPRINT)))));
        let kept = memory_of(&plan(&dropped)).write_failure.expect("the episode goes on");
        assert!(kept.credential.is_none(), "the kept credential is dropped");

        let mut restarted = facts(1_100);
        restarted.memory.seen = false;
        restarted.connection = connection(
            None,
            Some(serde_json::json!({
                "observedGeneration": 1, "nextRefreshTime": "1970-01-01T00:20:00Z",
                "conditions": [{"type": "Authenticated", "status": "False", "reason": "AuthServerError", "message": "503",
                                "lastTransitionTime": "1970-01-01T00:16:40Z"}],
            })),
        );
        let memory = memory_of(&plan(&restarted));
        assert!(memory.seen);
        assert_eq!(memory.failure.map(|f| f.retry_at), Some(at(1_201)));
    }

    fn fresh(facts: &Facts, result: CredentialResult, finished: i64) -> Fresh {
        let Plan::Go(go) = plan(facts) else { panic!("goes") };
        settle_credential(
            facts,
            &go.usable,
            facts.stored.clone(),
            go.restoring,
            go.memory,
            result,
            at(finished),
        )
    }

    #[test]
    fn each_outcome_is_settled_as_the_rules_say() {
        let due = facts(1_240);
        // Obtained and written: a refresh, announced.
        let written = fresh(&due, CredentialResult::Written(stored(FINGERPRINT)), 1_241);
        assert!(written.newly_issued);
        assert_eq!(written.events, [ConnectionEvent::CredentialRefreshed]);
        assert_eq!(written.refreshes, 1);
        // A server error backs off, at the latest 5 s before the kept credential expires.
        let server_error = AuthFailure {
            kind: AuthFailureKind::ServerError,
            message: "503".into(),
            detail: None,
        };
        let mut retried = facts(1_290);
        retried.memory.failure = Some(Box::new(FailureRecord {
            consecutive: 8,
            ..failure(AuthFailureKind::ServerError, 1_290, FINGERPRINT)
        }));
        let failed = fresh(&retried, CredentialResult::ObtainFailed(server_error), 1_290);
        assert_eq!(failed.retry_at, Some(at(1_295)));
        assert_eq!(failed.memory.failure.map(|f| f.consecutive), Some(9));
        assert_eq!(failed.credential, retried.stored, "the last valid credential stays");
        // A refused write: announced once per episode, only the write retried.
        let refused = |facts: &Facts| {
            let result = CredentialResult::WriteFailed {
                credential: stored(FINGERPRINT),
                message: "denied".into(),
            };
            fresh(facts, result, 1_241)
        };
        let first = refused(&due);
        assert_eq!(first.events, [ConnectionEvent::SecretWriteFailed { message: "denied".into() }]);
        assert_eq!(first.authenticated.reason, Reason::SecretWriteFailed);
        let mut again = facts(1_240);
        again.memory.write_failure = first.memory.write_failure.clone();
        again.memory.write_failure.as_mut().expect("recorded").retry_at = at(1_240);
        again.stored = None;
        let second = refused(&again);
        assert!(second.events.is_empty(), "one Event per episode");
        assert_eq!(second.memory.write_failure.map(|w| w.consecutive), Some(2));
    }

    #[test]
    fn a_401_obtains_once_and_not_for_basic_nor_403_nor_a_new_credential() {
        let facts = facts(1_100);
        let usable = usable(false);
        let kept = fresh(
            &facts,
            CredentialResult::Used {
                authenticated: ConditionState::ok(Reason::CredentialIssued, ""),
            },
            1_100,
        );
        let probed = |status| Probed {
            reachable: ConditionState::failing(Reason::ProbeUnauthorized, "401"),
            outcome: Some(ProbeOutcome::Unauthorized { status }),
            deferred_for: None,
            log: None,
        };
        let step = |usable: &Usable, fresh: &Fresh, status| plan_after_probe(&facts, usable, fresh, &probed(status)).map(|(step, _)| step);
        assert_eq!(step(&usable, &kept, 401), Some(CredentialStep::Obtain { reuse_shared: true }));
        assert_eq!(step(&usable, &kept, 403), None, "a 403 is a permission, not a credential");
        assert_eq!(step(&self::usable(true), &kept, 401), None, "Basic credentials are the user's own");
        let new = fresh(&facts, CredentialResult::Written(stored(FINGERPRINT)), 1_100);
        assert_eq!(step(&usable, &new, 401), None, "not for a credential of this reconcile");
        let mut recent = kept.clone();
        recent.memory.unauthorized_reobtain = Some(UnauthorizedReobtain {
            at: at(1_070),
            obtained_issued_at: None,
        });
        assert_eq!(step(&usable, &recent, 401), None, "at most once a minute");
    }

    #[test]
    fn the_report_wakes_for_the_first_thing_due() {
        let facts = facts(1_100);
        let Plan::Go(go) = plan(&facts) else { panic!("goes") };
        let mut kept = fresh(
            &facts,
            CredentialResult::Used {
                authenticated: ConditionState::ok(Reason::CredentialIssued, ""),
            },
            1_100,
        );
        let step = probe_step(&facts, &go.usable, &kept);
        assert!(matches!(step, ProbeStep::Send { shown_while_waiting: None }), "never probed: due");
        let answered = ProbeResult::Answered {
            outcome: ProbeOutcome::Succeeded,
            message: "GET ok".into(),
            at: at(1_100),
        };
        let probed = settle_probe(&mut kept, step, Some(answered));
        assert_eq!(probed.reachable.reason, Reason::ProbeSucceeded);
        // The probe is due again at 1160 s, before the refresh at 1240 s.
        let report = conclude(&facts, &go.usable, kept.clone(), probed, at(1_100));
        assert_eq!(report.wake, Duration::from_secs(60));
        assert_eq!(report.observation.next_refresh, Some(at(1_240)));
        // A probe that waits for a slot is tried again soon.
        let deferred = settle_probe(
            &mut kept,
            ProbeStep::Send { shown_while_waiting: None },
            Some(ProbeResult::Deferred {
                retry_after: Duration::from_secs(2),
            }),
        );
        assert_eq!(deferred.reachable.reason, Reason::NotProbed);
        assert_eq!(conclude(&facts, &go.usable, kept, deferred, at(1_100)).wake, Duration::from_secs(2));
    }

    #[test]
    fn a_status_that_says_conflict_already_is_not_announced_again() {
        let mut facts = facts(1_100);
        facts.gate = Gate::Conflict;
        let Plan::Stop(first) = plan(&facts) else { panic!("stops") };
        assert!(first.event.is_some());
        facts.connection = connection(
            None,
            Some(
                serde_json::json!({"conditions": [{"type": "Ready", "status": "False", "reason": "SecretConflict",
                                                      "message": "taken", "lastTransitionTime": "1970-01-01T00:16:40Z"}]}),
            ),
        );
        let Plan::Stop(again) = plan(&facts) else { panic!("stops") };
        assert!(again.event.is_none());
        let _: Option<TasklistConnectionStatus> = facts.connection.status.clone();
    }
}
