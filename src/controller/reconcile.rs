//! One reconcile of one TasklistConnection, top to bottom:
//! check the derived Secret is ours, read what the credential is made from, keep the
//! stored credential or obtain a new one, probe Tasklist with it, tell the user in status,
//! and wake up again when the next thing is due.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::decide::{
    self, CachedDerivedSecret, CredentialDecision, DerivedSecretSource, DerivedSecretState, ForcedRefresh, Kept, LONGEST_SLEEP, LastProbe,
    PendingRetry, PendingWrite, StatusRecord, UnauthorizedReobtain, WriteRetryDecision,
};
use super::derived_record;
use super::host_slots;
use super::memory::{ConnectionKey, FailureRecord, ProbeRecord, WriteFailureRecord};
use super::probe_scheduler::{Due, ProbeKey, ProbeTurn};
use super::secret_values::ByVersion;
use super::{Context, Error, FIELD_MANAGER, SecretCaches};
use crate::camunda::probe::{Probe, ProbeOutcome};
use crate::camunda::{AuthFailure, HttpClient, TlsTrust, redact};
use crate::crd::{REFRESH_ANNOTATION, TasklistConnection, TasklistConnectionStatus};
use crate::credential::{Credential, NEVER, add};
use crate::derived_secret::{DATA_HASH, StoredCredential, Unusable, is_owned_by, update_patch};
use crate::events::{ConnectionEvent, transitions};
use crate::host_health::origin;
use crate::inputs::{
    InputProblem, Inputs, InputsSummary, LoginMaterial, allows_reference, read_inputs, referenced_keys, secret_opt_in_problem,
    secret_references, summarize,
};
use crate::logging::{ProbeLogLevel, human_signed_duration, probe_log_level};
use crate::metrics::{ConnectionLabels, CredentialRequestLabels, HowLabels, MethodLabels, ResultLabels, SourceLabels};
use crate::obtain::obtain_shared_credential;
use crate::reason::Reason;
use crate::status::{AUTHENTICATED, ConditionState, CredentialTimes, Observation, REACHABLE, READY, desired_status};

/// Retry interval while a Secret of the derived name belongs to someone else (a watch
/// also wakes the connection when that Secret changes).
const CONFLICT_RECHECK: Duration = Duration::from_secs(300);
/// Recheck interval of a connection the policy does not allow (its host may resolve elsewhere later).
const NOT_ALLOWED_RECHECK: Duration = Duration::from_secs(300);

pub async fn reconcile(connection: Arc<TasklistConnection>, ctx: Arc<Context>, caches: SecretCaches) -> Result<Action, Error> {
    let now = Timestamp::now();
    let this = Reconciling::new(&connection, &ctx, caches);
    ctx.memory.remember(&this.key);
    // Until the Secret watches have listed, everything is read from the API server.
    let synced = this.caches.synced().await;

    // 1. The derived Secret must be ours to write.
    let existing = this.derived_secret(synced).await?;
    if let Some(secret) = &existing
        && !is_owned_by(secret, &connection)
    {
        return this.report_secret_conflict(now).await;
    }
    if let Ok(mut checked) = this.checked_secret.lock() {
        checked.clone_from(&existing);
    }
    let stored = existing.as_ref().map(StoredCredential::from_secret);
    let secret_state = match &stored {
        None => DerivedSecretState::Absent,
        Some(Ok(_)) => DerivedSecretState::Usable,
        Some(Err(Unusable::EditedByHand)) => DerivedSecretState::EditedByHand,
        Some(Err(Unusable::Incomplete)) => DerivedSecretState::Incomplete,
    };
    let status_says_it_held_a_credential = connection
        .status
        .as_ref()
        .is_some_and(|s| s.last_refresh_time.is_some() && s.secret_name == Some(connection.secret_name()));
    let restoring = decide::is_restoring(secret_state, status_says_it_held_a_credential);
    if restoring {
        info!(
            secret = connection.secret_name(),
            "the derived Secret was deleted or edited; restoring it"
        );
    }
    let stored = stored.and_then(Result::ok);

    // The administrator's policy decides before anything is sent, or any Secret read.
    // A host name's answer is reused for a short while: a reconcile at rest looks nothing up.
    if let Err(message) = ctx.host_policy.check_connection_cached(&connection, &ctx.resolved_hosts).await {
        return this.report_not_allowed(stored.as_ref(), message, now).await;
    }
    // With --require-secret-opt-in, a referenced Secret is used only when it carries the
    // opt-in label: told from its metadata, before any value is read or anything sent.
    if ctx.require_secret_opt_in
        && let Some(problem) = this.secret_opt_in_problem(synced).await?
    {
        return this.report_input_problem(stored.as_ref(), problem, now).await;
    }

    // 2. What the credential is made from: the spec and the versions of the referenced
    //    Secrets, which the metadata watch knows. Their values are read only when a
    //    credential is obtained (or the CA bundle is new to this process).
    let inputs = match this.summarize_inputs(synced).await? {
        Ok(inputs) => inputs,
        Err(problem) => return this.report_input_problem(stored.as_ref(), problem, now).await,
    };
    let trust = match this.trust(&inputs).await? {
        Ok(trust) => trust,
        Err(problem) => return this.report_input_problem(stored.as_ref(), problem, now).await,
    };
    let http = match ctx.http_client(&this.key, &trust) {
        Ok(http) => http,
        Err(error) => {
            let authenticated = ConditionState::failing(Reason::of_http_client_error(&error), error.to_string());
            let reachable = ConditionState::unknown(Reason::NotProbed, "no usable TLS settings");
            this.write_status_if_changed(&this.observe(stored.as_ref(), None, authenticated, reachable), now)
                .await?;
            return Ok(Action::requeue(LONGEST_SLEEP));
        }
    };

    // After a restart, status tells what the previous process knew of a failure.
    this.restore_failure_from_status(&inputs, now);

    // 3. Keep the stored credential while it is good, obtain a new one when it is due.
    let mut fresh = this.ensure_fresh_credential(&inputs, &http, stored, false, restoring).await?;
    host_slots::leave_held();
    if let Some(problem) = fresh.input_problem.take() {
        return this.report_input_problem(fresh.credential.as_ref(), problem, now).await;
    }

    // 4. Ask Tasklist whether it accepts the credential. A 401 means the credential is
    //    missing, expired or revoked (a Tasklist restart forgets sessions; an identity
    //    provider revokes tokens): obtain a new one once, rate-limited, without waiting
    //    for the planned refresh.
    let (mut reachable, outcome) = this
        .probe_if_due(&http, fresh.credential.as_ref(), fresh.newly_issued, &inputs, &trust, now)
        .await;
    // Basic credentials are the user's own: obtaining them again would give the same header.
    let renewable = !inputs.basic;
    if let (Some(outcome), Some(probed)) = (&outcome, &fresh.credential)
        && renewable
        && decide::reobtain_after_unauthorized(
            unauthorized_status(outcome),
            probed.issued_at,
            fresh.newly_issued,
            ctx.memory.get(&this.key).unauthorized_reobtain,
            now,
        )
    {
        info!("Tasklist answered 401 Unauthorized: obtaining a new credential once");
        fresh = this.ensure_fresh_credential(&inputs, &http, fresh.credential, true, false).await?;
        if let Some(problem) = fresh.input_problem.take() {
            return this.report_input_problem(fresh.credential.as_ref(), problem, now).await;
        }
        let obtained_issued_at = fresh.newly_issued.then(|| fresh.credential.as_ref().map(|c| c.issued_at)).flatten();
        ctx.memory.update(&this.key, |memory| {
            memory.unauthorized_reobtain = Some(UnauthorizedReobtain {
                at: now,
                obtained_issued_at,
            })
        });
        if fresh.newly_issued {
            (reachable, _) = this
                .probe_if_due(&http, fresh.credential.as_ref(), true, &inputs, &trust, now)
                .await;
        }
    }
    if reachable.reason == Reason::ProbeSucceeded {
        ctx.memory.update(&this.key, |memory| {
            memory.unauthorized_reobtain = decide::after_probe(memory.unauthorized_reobtain, true)
        });
    }

    // 5. Tell the user, including a refreshBefore or sessionTimeout that cannot be honoured.
    let memory = ctx.memory.get(&this.key);
    let pending_retry = memory
        .failure
        .as_ref()
        .filter(|f| f.fingerprint == inputs.fingerprint)
        .map(|f| f.retry_at);
    let write_retry = memory
        .write_failure
        .as_ref()
        .filter(|f| f.fingerprint == inputs.fingerprint)
        .map(|f| f.retry_at);
    let next_refresh = decide::next_refresh(write_retry, pending_retry, fresh.credential.as_ref().map(|c| c.refresh_at), now);
    let mut authenticated = fresh.authenticated;
    let warning = this.refresh_warning(fresh.credential.as_ref(), &inputs);
    if authenticated.status == Some(true)
        && let Some(warning) = &warning
    {
        let previous = connection
            .status
            .as_ref()
            .and_then(|status| status.conditions.iter().find(|c| c.type_ == AUTHENTICATED))
            .map(|c| c.message.as_str());
        if decide::announce_refresh_warning(previous, memory.refresh_warning_announced, Some(warning)) {
            warn!("{warning}");
            ctx.events
                .publish(&connection, ConnectionEvent::RefreshBeforeTooLong { message: warning.clone() })
                .await;
            ctx.memory.update(&this.key, |memory| memory.refresh_warning_announced = true);
        }
        authenticated.message = format!("{}; {warning}", authenticated.message);
    }
    if warning.is_none() && memory.refresh_warning_announced {
        ctx.memory.update(&this.key, |memory| memory.refresh_warning_announced = false);
    }
    let observation = this.observe(fresh.credential.as_ref(), next_refresh, authenticated, reachable);
    this.write_status_if_changed(&observation, now).await?;

    // 6. Wake up when the next thing is due: the refresh (or retry), or the next probe.
    let next_probe = memory
        .last_probe
        .as_ref()
        .filter(|_| connection.spec.probe.enabled)
        .map(|probe| add(probe.at, inputs.probe_interval));
    // A deferred probe is due already: it is tried again soon, not once a second.
    let deferred_probe = this.probe_deferred_until.lock().ok().and_then(|deferred| *deferred);
    let next_probe = deferred_probe.or(next_probe);
    let forced_refresh = ctx.memory.get(&this.key).forced_refresh_wait;
    Ok(Action::requeue(decide::next_wake(
        Timestamp::now(),
        [next_refresh, next_probe, forced_refresh],
    )))
}

/// What every step of one reconcile works on.
struct Reconciling<'a> {
    connection: &'a TasklistConnection,
    ctx: &'a Context,
    key: ConnectionKey,
    secrets: Api<Secret>,
    caches: SecretCaches,
    /// The derived Secret as read when its owner was checked (None: it did not exist), then
    /// as last written: writes succeed only over exactly this.
    checked_secret: std::sync::Mutex<Option<Secret>>,
    /// Set when a due probe found no free probe slot: when to try again.
    probe_deferred_until: std::sync::Mutex<Option<Timestamp>>,
    /// The referenced Secrets' values, once read in this reconcile.
    values: std::sync::Mutex<Option<Inputs>>,
}

/// The credential to use after step 3, and what the Authenticated condition says.
struct FreshCredential {
    credential: Option<StoredCredential>,
    authenticated: ConditionState,
    newly_issued: bool,
    /// The values needed to obtain a credential could not be read (a missing key): the
    /// reconcile reports this instead of probing.
    input_problem: Option<InputProblem>,
}

impl<'a> Reconciling<'a> {
    fn new(connection: &'a TasklistConnection, ctx: &'a Context, caches: SecretCaches) -> Self {
        let key: ConnectionKey = (connection.namespace().unwrap_or_default(), connection.name_any());
        let secrets = Api::namespaced(ctx.client.clone(), &key.0);
        Reconciling {
            connection,
            ctx,
            key,
            secrets,
            caches,
            checked_secret: std::sync::Mutex::new(None),
            probe_deferred_until: std::sync::Mutex::new(None),
            values: std::sync::Mutex::new(None),
        }
    }

    /// The derived Secret: rebuilt from its compact record when the metadata watch shows
    /// the recorded version (`derived_record`), or from the API server when the record and
    /// the watch may be behind this process's own write or disagree
    /// ([`decide::derived_secret_source`], the record in the place of the labelled store).
    /// Someone else's Secret seen in the metadata store comes back with its metadata only,
    /// which is all the owner check needs.
    async fn derived_secret(&self, synced: bool) -> Result<Option<Secret>, Error> {
        let name = self.connection.secret_name();
        // The compact record of the Secret as this process last wrote or read it.
        let record = self.ctx.memory.derived.get(&self.key, &name);
        let any = self.caches.metadata(&self.key.0, &name);
        let any_secret = any.as_ref().map(|meta| Secret {
            metadata: meta.metadata.clone(),
            ..Secret::default()
        });
        let own_write = self
            .ctx
            .memory
            .get(&self.key)
            .own_write
            .filter(|write| write.secret == name)
            .and_then(|write| write.resource_version);
        let cached = CachedDerivedSecret {
            synced,
            labelled: record.as_ref().map(|record| record.resource_version.as_str()),
            any: any_secret.as_ref().map(|secret| {
                (
                    secret.metadata.resource_version.as_deref().unwrap_or_default(),
                    is_owned_by(secret, self.connection),
                )
            }),
            own_write: own_write.as_deref(),
        };
        match decide::derived_secret_source(cached) {
            DerivedSecretSource::Cache => Ok(match (&record, &any) {
                (Some(record), Some(meta)) => Some(derived_record::rebuilt(record, self.connection, &meta.metadata)),
                _ => any_secret,
            }),
            DerivedSecretSource::Get => {
                debug!(
                    secret = name,
                    "reading the derived Secret from the API server: the caches cannot tell"
                );
                let secret = self.secrets.get_opt(&name).await?;
                self.ctx.memory.derived.remember(&self.key, self.connection, secret.as_ref());
                Ok(secret)
            }
        }
    }

    /// The first referenced Secret that lacks the opt-in label (`--require-secret-opt-in`),
    /// from the metadata watch, or before it has listed from the API server (metadata only).
    async fn secret_opt_in_problem(&self, synced: bool) -> Result<Option<InputProblem>, Error> {
        let mut opted_in = std::collections::BTreeMap::new();
        for (_, name) in secret_references(self.connection) {
            let answer = if synced {
                self.caches
                    .metadata(&self.key.0, &name)
                    .map(|meta| allows_reference(meta.metadata.labels.as_ref()))
            } else {
                self.secrets
                    .get_metadata_opt(&name)
                    .await?
                    .map(|meta| allows_reference(meta.metadata.labels.as_ref()))
            };
            opted_in.insert(name, answer);
        }
        Ok(secret_opt_in_problem(self.connection, |name| opted_in.get(name).copied().flatten()))
    }

    /// The inputs as far as the spec and the Secret versions of the metadata watch tell,
    /// without reading any value; before the watch has listed, read in full.
    async fn summarize_inputs(&self, synced: bool) -> Result<Result<InputsSummary, InputProblem>, Error> {
        if synced {
            let namespace = &self.key.0;
            let version_of = |name: &str| {
                let meta = self.caches.metadata(namespace, name)?;
                Some((
                    meta.metadata.uid.clone().unwrap_or_default(),
                    meta.metadata.resource_version.clone().unwrap_or_default(),
                ))
            };
            return Ok(summarize(self.connection, version_of));
        }
        Ok(self.values().await?.map(|values| values.summary()))
    }

    /// The referenced Secrets' values, read at most once per reconcile, and from the API
    /// server only for a version no connection read before. Their fingerprint is of the
    /// versions actually read, which may be later than the metadata store's.
    async fn values(&self) -> Result<Result<Inputs, InputProblem>, Error> {
        if let Some(values) = self.values.lock().ok().and_then(|values| values.clone()) {
            return Ok(Ok(values));
        }
        let wanted = referenced_keys(self.connection);
        let source = ByVersion {
            api: &self.secrets,
            namespace: &self.key.0,
            caches: &self.caches,
            values: &self.ctx.secret_values,
            wanted: &wanted,
        };
        let read = read_inputs(self.connection, &source).await?;
        if let (Ok(values), Ok(mut kept)) = (&read, self.values.lock()) {
            *kept = Some(values.clone());
        }
        Ok(read)
    }

    /// Which certificates to trust. Only a `caSecretRef` needs a Secret's value, read
    /// when its version is new to this process.
    async fn trust(&self, inputs: &InputsSummary) -> Result<Result<TlsTrust, InputProblem>, Error> {
        if let Some(values) = self.values.lock().ok().and_then(|values| values.clone()) {
            return Ok(Ok(values.trust));
        }
        let Some(version) = &inputs.ca_version else {
            return Ok(Ok(TlsTrust {
                insecure_skip_verify: inputs.insecure_skip_verify,
                ..TlsTrust::default()
            }));
        };
        if let Some((known, trust)) = self.ctx.memory.get(&self.key).ca_trust
            && known == *version
        {
            return Ok(Ok(trust));
        }
        let values = match self.values().await? {
            Ok(values) => values,
            Err(problem) => return Ok(Err(problem)),
        };
        let trust = values.trust.clone();
        self.ctx
            .memory
            .update(&self.key, |memory| memory.ca_trust = Some((version.clone(), values.trust)));
        Ok(Ok(trust))
    }

    /// The inputs cannot be used (a missing Secret or key, a spec the operator cannot
    /// read): say so, keep the stored credential, probe nothing.
    async fn report_input_problem(
        &self,
        stored: Option<&StoredCredential>,
        problem: InputProblem,
        now: Timestamp,
    ) -> Result<Action, Error> {
        warn!(reason = problem.reason.as_str(), detail = %problem.message, "cannot obtain a credential");
        let authenticated = ConditionState::failing(problem.reason, problem.message);
        let reachable = self.last_probe_result(stored);
        self.write_status_if_changed(&self.observe(stored, None, authenticated, reachable), now)
            .await?;
        // A watch on the referenced Secret wakes the connection when it is fixed; a
        // refresh time already past cannot be acted on until then (waking for it would
        // be a loop once a second).
        let refresh_ahead = stored.map(|s| s.refresh_at).filter(|at| *at > now);
        Ok(Action::requeue(decide::next_wake(now, [refresh_ahead])))
    }

    /// Keeps `stored`, waits for a pending retry, or obtains and writes a new credential, as
    /// [`decide::credential_decision`] says. A failure leaves the Secret as it is (the last
    /// valid credential stays in place) and is retried with backoff.
    async fn ensure_fresh_credential(
        &self,
        inputs: &InputsSummary,
        http: &HttpClient,
        stored: Option<StoredCredential>,
        replace_now: bool,
        restoring: bool,
    ) -> Result<FreshCredential, Error> {
        let now = Timestamp::now();
        if let Some(record) = self.ctx.memory.get(&self.key).write_failure {
            let pending = PendingWrite {
                inputs: &record.fingerprint,
                refresh_at: record.credential.as_ref().map(|kept| kept.refresh_at),
                retry_at: record.retry_at,
            };
            match decide::write_retry_decision(pending, &inputs.fingerprint, now) {
                WriteRetryDecision::Wait { retry_at } => {
                    debug!(%retry_at, "waiting before writing the derived Secret again");
                    return Ok(FreshCredential {
                        credential: stored,
                        authenticated: ConditionState::failing(Reason::SecretWriteFailed, record.message),
                        newly_issued: false,
                        input_problem: None,
                    });
                }
                WriteRetryDecision::WriteKept => {
                    if let Some(kept) = record.credential {
                        info!(
                            consecutive = record.consecutive,
                            "writing the kept credential to the derived Secret again"
                        );
                        return self.store(inputs, http, kept, stored, restoring).await;
                    }
                }
                // The episode goes on (its count and Event) until a write succeeds, or
                // nothing needs writing any more; the kept credential is dropped.
                WriteRetryDecision::DecideAsUsual => self.ctx.memory.update(&self.key, |memory| {
                    if let Some(record) = memory.write_failure.as_mut() {
                        record.credential = None;
                    }
                }),
            }
        }
        let memory = self.ctx.memory.get(&self.key);
        let forced = decide::forced_refresh(
            self.connection.refresh_request(),
            memory.forced_refresh.as_ref().map(|(value, at)| (value.as_str(), *at)),
            stored.as_ref().is_some_and(|current| current.inputs == inputs.fingerprint),
            self.ctx.refresh_policy.forced_refresh_interval,
            now,
        );
        let forced_wait = match forced {
            // Whole seconds, as every time in status; rounded up, so that the wake-up is not early.
            ForcedRefresh::NotBefore(at) => stored
                .as_ref()
                .filter(|current| now < current.refresh_at)
                .map(|current| (current, crate::obtain::whole_seconds(add(at, Duration::from_millis(999))))),
            _ => None,
        };
        self.ctx
            .memory
            .update(&self.key, |memory| memory.forced_refresh_wait = forced_wait.map(|(_, at)| at));
        if let Some((current, at)) = forced_wait {
            debug!(%at, "a refresh forced with the annotation waits: at most one a minute");
            let message = format!(
                "{}; the refresh requested with the {REFRESH_ANNOTATION} annotation runs at {at} at the earliest (at most one a minute)",
                issued_message(current, inputs, http)
            );
            return Ok(FreshCredential {
                credential: stored.clone(),
                authenticated: ConditionState::ok(Reason::CredentialIssued, message),
                newly_issued: false,
                input_problem: None,
            });
        }
        if let (ForcedRefresh::Now, Some(value)) = (forced, self.connection.refresh_request()) {
            let value = value.to_owned();
            self.ctx
                .memory
                .update(&self.key, |memory| memory.forced_refresh = Some((value, now)));
        }
        let previous_failure = memory.failure.filter(|failure| failure.fingerprint == inputs.fingerprint);
        let kept = stored.as_ref().map(|current| Kept {
            inputs: &current.inputs,
            refresh_at: current.refresh_at,
        });
        let pending = previous_failure.as_ref().map(|failure| PendingRetry {
            inputs: &failure.fingerprint,
            retry_at: failure.retry_at,
        });
        match decide::credential_decision(kept, pending, &inputs.fingerprint, replace_now, now) {
            CredentialDecision::Keep => {
                self.ctx.memory.update(&self.key, |memory| memory.write_failure = None);
                let authenticated = stored.as_ref().map_or_else(
                    || ConditionState::unknown(Reason::NoCredential, "no credential"),
                    |current| ConditionState::ok(Reason::CredentialIssued, issued_message(current, inputs, http)),
                );
                Ok(FreshCredential {
                    credential: stored,
                    authenticated,
                    newly_issued: false,
                    input_problem: None,
                })
            }
            CredentialDecision::WaitForRetry { retry_at } => {
                debug!(%retry_at, "waiting before trying again");
                self.ctx.memory.update(&self.key, |memory| memory.write_failure = None);
                let authenticated = previous_failure.as_ref().map_or_else(
                    || ConditionState::unknown(Reason::NoCredential, "waiting to try again"),
                    |failure| failed_condition(&failure.failure),
                );
                Ok(FreshCredential {
                    credential: stored,
                    authenticated,
                    newly_issued: false,
                    input_problem: None,
                })
            }
            CredentialDecision::Obtain => self.obtain_and_store(inputs, http, stored, restoring, previous_failure).await,
        }
    }

    /// Obtains a new credential and writes it; on failure, records when to try again.
    async fn obtain_and_store(
        &self,
        summary: &InputsSummary,
        http: &HttpClient,
        stored: Option<StoredCredential>,
        restoring: bool,
        previous_failure: Option<FailureRecord>,
    ) -> Result<FreshCredential, Error> {
        let (ctx, key) = (self.ctx, &self.key);
        // The only read of the referenced Secrets' values: a credential is to be obtained.
        let inputs = match self.values().await? {
            Ok(inputs) => inputs,
            Err(problem) => {
                return Ok(FreshCredential {
                    credential: stored,
                    authenticated: ConditionState::failing(problem.reason, problem.message.clone()),
                    newly_issued: false,
                    input_problem: Some(problem),
                });
            }
        };
        let inputs = &inputs;
        let started = std::time::Instant::now();
        // Connections with the same client share one token; the one held now is never
        // handed back (its refresh is due, its inputs changed, or Tasklist refused it).
        let held = stored.as_ref().and_then(|current| match &current.credential {
            Credential::Bearer(token) => Some(token),
            Credential::Session(_) | Credential::Basic(_) => None,
        });
        // A deleted or edited derived Secret is restored with a new credential, as the
        // contract says, not with the cached one.
        let reuse = !restoring;
        let obtained = obtain_shared_credential(inputs, http, &ctx.refresh_policy, &ctx.token_cache, key.clone(), held, reuse).await;
        // The credential host's slots are for this request only, not for the writes after it.
        host_slots::leave_held();
        let result = obtained.result;
        match obtained.source.saved_label() {
            None => self.record_credential_request(inputs, &result, started.elapsed()),
            Some(source) => {
                ctx.metrics
                    .token_requests_saved
                    .get_or_create(&SourceLabels { source: source.into() })
                    .inc();
            }
        }
        match result {
            Ok(credential) => self.store(summary, http, credential, stored, restoring).await,
            Err(failure) => {
                let now = Timestamp::now();
                let consecutive = previous_failure.map_or(1, |previous| previous.consecutive.saturating_add(1));
                let kept_expires_at = stored.as_ref().map(|current| current.expires_at);
                let retry_at = decide::next_retry(now, consecutive, failure.kind, rand::random(), kept_expires_at);
                let delay = retry_at.duration_since(now);
                warn!(consecutive, retry_in = %human_signed_duration(delay), "could not obtain a credential: {}", failure.message);
                let authenticated = failed_condition(&failure);
                ctx.memory.update(key, |memory| {
                    memory.write_failure = None;
                    memory.failure = Some(FailureRecord {
                        fingerprint: inputs.fingerprint.clone(),
                        failure,
                        consecutive,
                        retry_at,
                    })
                });
                Ok(FreshCredential {
                    credential: stored,
                    authenticated,
                    newly_issued: false,
                    input_problem: None,
                })
            }
        }
    }

    /// Writes a credential just obtained (or kept from a failed write) to the derived Secret.
    /// A write the API server refuses is a state, not an error: the credential is kept in
    /// memory and only the write is retried, with backoff.
    async fn store(
        &self,
        inputs: &InputsSummary,
        http: &HttpClient,
        credential: StoredCredential,
        stored: Option<StoredCredential>,
        restoring: bool,
    ) -> Result<FreshCredential, Error> {
        let (ctx, key) = (self.ctx, &self.key);
        match self.write_credential(&credential).await {
            Ok(()) => {}
            Err(Error::Kube(error)) => return Ok(self.record_write_failure(credential, stored, &error).await),
            Err(other) => return Err(other),
        }
        let previous_write_failure = ctx.memory.get(key).write_failure;
        ctx.memory.update(key, |memory| {
            memory.failure = None;
            memory.write_failure = None;
        });
        if let Some(previous) = previous_write_failure {
            info!(
                failed_writes = previous.consecutive,
                "the derived Secret was written after failed writes"
            );
        }
        info!(expires_at = %credential.expires_at, refresh_at = %credential.refresh_at, "stored a new credential");
        let event = match (&stored, restoring) {
            (_, true) => ConnectionEvent::SecretRestored,
            (Some(_), false) => ConnectionEvent::CredentialRefreshed,
            (None, false) => ConnectionEvent::CredentialIssued,
        };
        if stored.is_some() {
            ctx.metrics
                .credential_refreshes
                .get_or_create(&MethodLabels {
                    method: self.method().into(),
                })
                .inc();
        }
        ctx.events.publish(self.connection, event).await;
        if inputs.insecure_skip_verify {
            ctx.events.publish(self.connection, ConnectionEvent::InsecureSkipVerify).await;
        }
        let authenticated = ConditionState::ok(Reason::CredentialIssued, issued_message(&credential, inputs, http));
        Ok(FreshCredential {
            credential: Some(credential),
            authenticated,
            newly_issued: true,
            input_problem: None,
        })
    }

    /// Keeps `credential` for the next try of the write, says why in the Authenticated
    /// condition, and publishes one Warning Event per episode.
    async fn record_write_failure(
        &self,
        credential: StoredCredential,
        stored: Option<StoredCredential>,
        error: &kube::Error,
    ) -> FreshCredential {
        let (ctx, key, connection) = (self.ctx, &self.key, self.connection);
        let now = Timestamp::now();
        let message = write_failure_message(&connection.secret_name(), error, &credential, &connection.spec.url);
        let previous = ctx.memory.get(key).write_failure;
        let consecutive = previous.as_ref().map_or(1, |p| p.consecutive.saturating_add(1));
        let retry_at = decide::next_write_retry(now, consecutive, rand::random());
        warn!(consecutive, retry_in = ?retry_at.duration_since(now), "{message}");
        let previous_reason = connection
            .status
            .as_ref()
            .and_then(|status| status.conditions.iter().find(|c| c.type_ == AUTHENTICATED))
            .map(|c| c.reason.as_str());
        let mut announced = previous.as_ref().is_some_and(|p| p.announced);
        if decide::announce_write_failure(previous_reason, announced) {
            ctx.events
                .publish(connection, ConnectionEvent::SecretWriteFailed { message: message.clone() })
                .await;
        }
        announced = true;
        ctx.memory.update(key, |memory| {
            // Obtaining worked: no backoff for the token endpoint or the login.
            memory.failure = None;
            memory.write_failure = Some(WriteFailureRecord {
                // The inputs the credential was made from.
                fingerprint: credential.inputs.clone(),
                credential: Some(credential),
                consecutive,
                retry_at,
                message: message.clone(),
                announced,
            });
        });
        FreshCredential {
            credential: stored,
            authenticated: ConditionState::failing(Reason::SecretWriteFailed, message),
            newly_issued: false,
            input_problem: None,
        }
    }

    /// On first sight of a connection after a start: remembers the failure to obtain a
    /// credential that status records, with its retry time (`nextRefreshTime`), so that a
    /// restart neither shortens the 30 s pause after a rejection nor a backoff in progress.
    fn restore_failure_from_status(&self, inputs: &InputsSummary, now: Timestamp) {
        let (ctx, key, connection) = (self.ctx, &self.key, self.connection);
        if ctx.memory.get(key).seen {
            return;
        }
        ctx.memory.update(key, |memory| memory.seen = true);
        let Some(status) = &connection.status else {
            return;
        };
        let authenticated = status.conditions.iter().find(|c| c.type_ == AUTHENTICATED);
        let record = StatusRecord {
            authenticated: authenticated.map(|c| (c.status.as_str(), c.reason.as_str())),
            next_refresh: status.next_refresh_time.as_deref().and_then(|time| time.parse().ok()),
            current_generation: status.observed_generation.is_some() && status.observed_generation == connection.metadata.generation,
        };
        let Some((restored, retry_at)) = decide::failure_from_status(record, now) else {
            return;
        };
        info!(%retry_at, "status says the last try failed: not trying again before its retry time");
        let message = authenticated.map(|c| c.message.clone()).unwrap_or_default();
        ctx.memory.update(key, |memory| {
            memory.failure.get_or_insert(FailureRecord {
                fingerprint: inputs.fingerprint.clone(),
                failure: AuthFailure { message, ..restored },
                consecutive: 1,
                retry_at,
            });
        });
    }

    /// The warning for a `refreshBefore` or `sessionTimeout` this credential cannot honour.
    fn refresh_warning(&self, credential: Option<&StoredCredential>, inputs: &InputsSummary) -> Option<String> {
        let credential = credential.filter(|c| c.expires_at != NEVER)?;
        decide::refresh_warning(
            credential.issued_at,
            credential.expires_at,
            inputs.refresh_before,
            inputs.session_timeout,
            &self.ctx.refresh_policy,
        )
    }

    /// Writes the derived Secret only over what was checked: a Secret that did not exist is
    /// created (and a Secret of that name that appeared meanwhile makes the create fail), and
    /// one we own is patched on condition that its resourceVersion is still the one read.
    /// Either way, a Secret someone else wrote in between is never overwritten.
    /// Memory learns of the write before it is sent, so that its watch event, which may
    /// arrive before the answer, does not wake the connection again.
    async fn write_credential(&self, credential: &StoredCredential) -> Result<(), Error> {
        let name = self.connection.secret_name();
        let desired = credential.to_secret(self.connection);
        let data_hash = desired.metadata.annotations.as_ref().and_then(|a| a.get(DATA_HASH)).cloned();
        self.ctx.memory.record_write_in_flight(&self.key, &name, data_hash);
        let checked = self.checked_secret.lock().ok().and_then(|checked| checked.clone());
        // A Secret rebuilt from its record is read whole first: the patch needs its keys.
        let checked = derived_record::whole_for_write(&self.secrets, checked).await?;
        let written = match &checked {
            None => {
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PostParams::default()
                };
                self.secrets.create(&params, &desired).await
            }
            Some(checked) => {
                let params = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                };
                let patch = update_patch(&desired, checked);
                self.secrets.patch(&name, &params, &Patch::Merge(patch)).await
            }
        };
        let version = written.as_ref().ok().and_then(|w| w.metadata.resource_version.clone());
        self.ctx.memory.record_own_write(&self.key, &name, version);
        let written = match written {
            Ok(written) => written,
            // 409: created or changed meanwhile; 404: deleted meanwhile.
            Err(kube::Error::Api(response)) if response.code == 409 || response.code == 404 => {
                warn!(
                    secret = name,
                    "the Secret was created or changed by someone else meanwhile; not overwriting it"
                );
                return Err(Error::SecretChangedMeanwhile(name));
            }
            Err(error) => return Err(error.into()),
        };
        self.ctx.memory.derived.remember(&self.key, self.connection, Some(&written));
        if let Ok(mut checked) = self.checked_secret.lock() {
            *checked = Some(written);
        }
        Ok(())
    }

    fn method(&self) -> &'static str {
        self.connection.spec.auth.method_name()
    }

    fn record_credential_request(&self, inputs: &Inputs, result: &Result<StoredCredential, AuthFailure>, took: Duration) {
        let metrics = &self.ctx.metrics;
        let outcome = match result {
            Ok(_) => "success",
            Err(failure) => Reason::of_auth_failure(failure).as_str(),
        };
        metrics
            .credential_requests
            .get_or_create(&CredentialRequestLabels {
                method: self.method().into(),
                result: outcome.into(),
            })
            .inc();
        match inputs.login {
            LoginMaterial::OAuth2 { .. } => metrics.token_request_duration.observe(took.as_secs_f64()),
            LoginMaterial::Cookie { .. } => metrics.login_duration.observe(took.as_secs_f64()),
            LoginMaterial::Basic { .. } => {}
        }
    }

    /// Probes when the probe is due (its interval has passed, or the credential changed) and
    /// returns the condition with the outcome; otherwise repeats what the last probe found,
    /// with no outcome. A credential issued in this reconcile is always checked anew (one
    /// issued in the same second as the last, an HTTP Basic Secret edited twice, has the
    /// same issue time): by a probe, or by another connection's answer for the same
    /// credential sent after it was issued.
    ///
    /// A due probe goes through the probe lane: it takes a fresh answer to the same request
    /// with the same credential (another connection's), or waits for that request in flight,
    /// or sends it; when no probe slot is free it does not wait but keeps the last result
    /// and asks for a wake-up soon (`probe_deferred_until`).
    async fn probe_if_due(
        &self,
        http: &HttpClient,
        credential: Option<&StoredCredential>,
        newly_issued: bool,
        inputs: &InputsSummary,
        trust: &TlsTrust,
        now: Timestamp,
    ) -> (ConditionState, Option<ProbeOutcome>) {
        let (connection, ctx, key) = (self.connection, self.ctx, &self.key);
        let spec = &connection.spec.probe;
        if !spec.enabled {
            return (ConditionState::ok(Reason::ProbeDisabled, "the probe is disabled"), None);
        }
        let Some(credential) = credential else {
            return (
                ConditionState::unknown(Reason::NoCredential, "there is no credential to probe Tasklist with yet"),
                None,
            );
        };
        let last_probe = ctx.memory.get(key).last_probe;
        if let Some(last) = &last_probe
            && !newly_issued
            && !decide::probe_due(
                Some(LastProbe {
                    at: last.at,
                    credential_issued_at: last.credential_issued_at,
                }),
                credential.issued_at,
                inputs.probe_interval,
                now,
            )
        {
            return (last.result.clone(), None);
        }
        let probe = Probe::new(&connection.spec.url, spec).with_timeout(ctx.probe_timeout());
        let probe_key = ProbeKey::new(&probe, credential.credential.as_probe_credential(), trust);
        let host = origin(&probe.url).unwrap_or_else(|| probe.url.clone());
        let send = || {
            let (probe, http, metrics) = (probe.clone(), http.clone(), ctx.metrics.clone());
            let credential = credential.credential.clone();
            async move {
                let started = std::time::Instant::now();
                let outcome = probe.run(&http, credential.as_probe_credential()).await;
                metrics
                    .probe_duration
                    .get_or_create(&ResultLabels {
                        result: Reason::of_probe(&outcome).as_str().into(),
                    })
                    .observe(started.elapsed().as_secs_f64());
                outcome
            }
        };
        // What status shows if the probe must wait for a slot: the last result, or after a
        // restart what status recorded for this credential.
        let shown_while_deferred = last_probe
            .as_ref()
            .map(|last| last.result.clone())
            .or_else(|| self.probe_result_in_status(credential.issued_at));
        let due = Due {
            credential_issued_at: credential.issued_at,
            interval: inputs.probe_interval,
            now,
            has_result: shown_while_deferred.is_some(),
        };
        let turn = ctx.probes.turn(probe_key, host, due, send);
        let shared = match turn {
            ProbeTurn::Reuse(shared) => {
                ctx.metrics.probes_shared.get_or_create(&HowLabels { how: "reused".into() }).inc();
                shared
            }
            ProbeTurn::Wait { result, joined } => {
                if joined {
                    ctx.metrics.probes_shared.get_or_create(&HowLabels { how: "joined".into() }).inc();
                }
                result.result().await
            }
            ProbeTurn::Deferred { retry_after } => {
                ctx.metrics.probes_deferred.inc();
                let retry_at = add(now, retry_after);
                debug!(%retry_at, "probe deferred: no probe slot is free");
                if let Ok(mut deferred) = self.probe_deferred_until.lock() {
                    *deferred = Some(retry_at);
                }
                let kept = shown_while_deferred.unwrap_or_else(|| {
                    ConditionState::unknown(
                        Reason::NotProbed,
                        "Tasklist was not probed yet: waiting for a free probe slot (too many probes to this host or in all)",
                    )
                });
                return (kept, None);
            }
        };
        let outcome = shared.outcome;
        let message = outcome.message(&probe.describe());
        let reason = Reason::of_probe(&outcome);
        let result = match &outcome {
            ProbeOutcome::Succeeded => ConditionState::ok(reason, message),
            _ => ConditionState::failing(reason, message),
        };
        let previous = last_probe.map(|last| last.result);
        let succeeded = |state: &ConditionState| (state.status == Some(true), state.reason.as_str());
        match probe_log_level(previous.as_ref().map(succeeded), succeeded(&result)) {
            ProbeLogLevel::Warn => warn!(reason = %result.reason, "probe failed: {}", result.message),
            ProbeLogLevel::Info => info!("probe succeeds again: {}", result.message),
            ProbeLogLevel::Debug => debug!(reason = %result.reason, "probe: {}", result.message),
        }
        // The answer's own time, also when it was another connection's: connections that
        // share answers stay due together, so that one request keeps serving them all.
        let record = ProbeRecord {
            at: shared.at,
            credential_issued_at: credential.issued_at,
            result: result.clone(),
        };
        ctx.memory.update(key, |memory| memory.last_probe = Some(record));
        (result, Some(outcome))
    }

    /// What status says the previous process's last probe found with the credential issued
    /// at `issued_at`.
    fn probe_result_in_status(&self, issued_at: Timestamp) -> Option<ConditionState> {
        let status = self.connection.status.as_ref()?;
        let reachable = status.conditions.iter().find(|c| c.type_ == REACHABLE);
        let recorded_issue = status.last_refresh_time.as_deref().and_then(|time| time.parse::<Timestamp>().ok());
        decide::probe_result_from_status(decide::RecordedProbe {
            condition: reachable.map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str())),
            same_credential: recorded_issue == Some(issued_at),
        })
    }

    /// What the last probe found, for reconciles that cannot probe.
    fn last_probe_result(&self, credential: Option<&StoredCredential>) -> ConditionState {
        match (self.ctx.memory.get(&self.key).last_probe, credential) {
            (Some(last), Some(credential)) if last.credential_issued_at == credential.issued_at => last.result,
            _ => ConditionState::unknown(Reason::NotProbed, "Tasklist was not probed: the credential's inputs are not usable"),
        }
    }

    async fn report_secret_conflict(&self, now: Timestamp) -> Result<Action, Error> {
        let connection = self.connection;
        let message = format!(
            "a Secret named {:?} exists and is not managed by this connection; delete it or choose another spec.secretName",
            connection.secret_name()
        );
        warn!("{message}");
        let not_attempted =
            |what: &str| ConditionState::unknown(Reason::SecretConflict, format!("{what} not attempted: the Secret name is taken"));
        let mut observation = self.observe(None, None, not_attempted("authentication"), not_attempted("probe"));
        observation.secret_conflict = Some(message.clone());
        let already_reported = connection.status.as_ref().is_some_and(|status| {
            status
                .conditions
                .iter()
                .any(|c| c.type_ == READY && c.reason == Reason::SecretConflict.as_str())
        });
        if !already_reported {
            self.ctx
                .events
                .publish(connection, ConnectionEvent::SecretConflict { message })
                .await;
        }
        self.write_status_if_changed(&observation, now).await?;
        Ok(Action::requeue(CONFLICT_RECHECK))
    }

    /// The policy forbids this connection: say why, send nothing. The stored credential
    /// stays in the Secret until it expires; it is no longer refreshed.
    async fn report_not_allowed(&self, stored: Option<&StoredCredential>, message: String, now: Timestamp) -> Result<Action, Error> {
        warn!(reason = %Reason::NotAllowed, "{message}");
        let authenticated = ConditionState::failing(Reason::NotAllowed, message);
        let reachable = ConditionState::unknown(
            Reason::NotProbed,
            "Tasklist was not probed: the operator's policy does not allow this connection",
        );
        self.write_status_if_changed(&self.observe(stored, None, authenticated, reachable), now)
            .await?;
        // A spec change wakes the connection at once; the recheck catches DNS changes.
        Ok(Action::requeue(NOT_ALLOWED_RECHECK))
    }

    fn observe(
        &self,
        credential: Option<&StoredCredential>,
        next_refresh: Option<Timestamp>,
        authenticated: ConditionState,
        reachable: ConditionState,
    ) -> Observation {
        let connection = self.connection;
        Observation {
            generation: connection.meta().generation,
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

    /// Writes status only when it differs from what is there: a reconcile that finds
    /// everything as it was writes nothing. Conditions that turn False are also announced
    /// as Events.
    async fn write_status_if_changed(&self, observation: &Observation, now: Timestamp) -> Result<(), Error> {
        let (connection, ctx) = (self.connection, self.ctx);
        let desired = desired_status(observation, connection.status.as_ref(), now);
        self.record_connection_metrics(&desired, observation);
        if connection.status.as_ref() == Some(&desired) {
            return Ok(());
        }
        for event in transitions(connection.status.as_ref(), observation) {
            ctx.events.publish(connection, event).await;
        }
        let api: Api<TasklistConnection> = Api::namespaced(ctx.client.clone(), &self.key.0);
        let patch = serde_json::json!({
            "apiVersion": TasklistConnection::api_version(&()),
            "kind": TasklistConnection::kind(&()),
            "status": desired,
        });
        api.patch_status(
            &connection.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
        Ok(())
    }

    fn record_connection_metrics(&self, status: &TasklistConnectionStatus, observation: &Observation) {
        let metrics = &self.ctx.metrics;
        let labels = ConnectionLabels {
            namespace: self.key.0.clone(),
            name: self.key.1.clone(),
        };
        let ready = status.conditions.iter().find(|c| c.type_ == READY);
        metrics
            .connection_ready
            .get_or_create(&labels)
            .set(i64::from(ready.is_some_and(|c| c.status == "True")));
        match observation.credential.filter(|times| times.expires_at != NEVER) {
            Some(times) => {
                metrics.credential_expiry.get_or_create(&labels).set(times.expires_at.as_second());
            }
            None => {
                metrics.credential_expiry.remove(&labels);
            }
        }
    }
}

/// The longest API server answer quoted in a condition message.
const MAX_QUOTED_ANSWER: usize = 400;

/// Why the derived Secret could not be written, in the API server's words, with every
/// value of the credential cut out (an admission policy's message may quote the object)
/// before the answer is shortened.
fn write_failure_message(secret: &str, error: &kube::Error, credential: &StoredCredential, url: &str) -> String {
    let answer = match error {
        kube::Error::Api(response) => format!("{} ({} {})", response.message, response.code, response.reason),
        other => other.to_string(),
    };
    let values: Vec<String> = credential
        .secret_data(url)
        .into_iter()
        .filter(|(key, _)| key != "expiresAt" && key != "url")
        .map(|(_, value)| value)
        .collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let answer: String = redact(&answer, &values).chars().take(MAX_QUOTED_ANSWER).collect();
    format!(
        "could not write the derived Secret {secret:?}: {answer}; the new credential is kept and only the write is retried, with backoff"
    )
}

fn failed_condition(failure: &AuthFailure) -> ConditionState {
    ConditionState::failing(Reason::of_auth_failure(failure), failure.message.clone())
}

fn issued_message(credential: &StoredCredential, inputs: &InputsSummary, http: &HttpClient) -> String {
    let kind = match (&inputs.token_endpoint, &credential.credential) {
        // No value read from a referenced Secret reaches status, not even the username:
        // whoever may read status may not be allowed to read that Secret.
        (_, Credential::Basic(_)) => {
            return format!("HTTP Basic credentials stored at {}; they do not expire", credential.issued_at);
        }
        (Some(endpoint), _) => format!("access token from {}", endpoint.location.describe(http)),
        (None, _) => "session".to_owned(),
    };
    format!("{kind} obtained at {}, valid until {}", credential.issued_at, credential.expires_at)
}

/// The HTTP status of a probe that Tasklist refused (401 or 403).
fn unauthorized_status(outcome: &ProbeOutcome) -> Option<u16> {
    match outcome {
        ProbeOutcome::Unauthorized { status } => Some(*status),
        _ => None,
    }
}
