//! One reconcile of one TasklistConnection, in four steps a person would name:
//! **gather** the facts (reads only: the derived Secret, the policy's verdict, the inputs,
//! the trust, what earlier reconciles decided), **plan** what to do from them (pure:
//! `plan.rs`), **apply** the plan (obtain and write a credential, probe Tasklist, and once
//! more after a 401), **report** (the one status write, Events, metrics, memory) and say
//! when to wake up.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::decide::{self, CachedDerivedSecret, DerivedSecretSource, DerivedSecretState, ProbeStep};
use super::derived_record;
use super::host_slots::{credential_hosts, slot_limits};
use super::memory::{ConnectionKey, connection_key};
use super::plan::{self, CredentialResult, CredentialStep, Facts, Fresh, Gate, Plan, ProbeResult, Probed, Report, Usable};
use super::probe_scheduler::{Due, ProbeKey, ProbeTurn};
use super::secret_values::ByVersion;
use super::{Context, Error, FIELD_MANAGER, SecretCaches};
use crate::camunda::probe::Probe;
use crate::camunda::{AuthFailure, HttpClient, TlsTrust, redact};
use crate::crd::{TasklistConnection, TasklistConnectionStatus};
use crate::derived_secret::{DATA_HASH, StoredCredential, Unusable, is_owned_by, update_patch};
use crate::events::transitions;
use crate::host_health::origin;
use crate::inputs::{
    InputProblem, Inputs, InputsSummary, LoginMaterial, allows_reference, read_inputs, referenced_keys, secret_opt_in_problem,
    secret_references, summarize,
};
use crate::logging::{ProbeLogLevel, human_signed_duration};
use crate::machinery::lock::lock;
use crate::metrics::{ConnectionLabels, CredentialRequestLabels, HowLabels, MethodLabels, ResultLabels, SourceLabels};
use crate::obtain::obtain_shared_credential;
use crate::reason::Reason;
use crate::status::{Observation, READY, desired_status};
use crate::time::NEVER;

pub async fn reconcile(connection: Arc<TasklistConnection>, ctx: Arc<Context>, caches: SecretCaches) -> Result<Action, Error> {
    let this = Reconciling::new(&connection, &ctx, caches);
    let facts = this.gather(Timestamp::now()).await?;
    let report = match plan::plan(&facts) {
        Plan::Go(go) => this.apply(&facts, go).await?,
        Plan::Stop(stop) => {
            log_stop(&stop);
            plan::conclude_stop(&facts, facts.memory.clone(), stop)
        }
    };
    this.report(report, facts.now).await
}

/// What every step of one reconcile works on.
struct Reconciling<'a> {
    connection: &'a Arc<TasklistConnection>,
    ctx: &'a Context,
    key: ConnectionKey,
    secrets: Api<Secret>,
    caches: SecretCaches,
    /// The derived Secret as read when its owner was checked (None: it did not exist), then
    /// as last written: writes succeed only over exactly this.
    checked_secret: std::sync::Mutex<Option<Secret>>,
    /// The referenced Secrets' values, once read in this reconcile.
    values: std::sync::Mutex<Option<Inputs>>,
}

impl<'a> Reconciling<'a> {
    fn new(connection: &'a Arc<TasklistConnection>, ctx: &'a Context, caches: SecretCaches) -> Self {
        let key = connection_key(connection.namespace().unwrap_or_default(), connection.name_any());
        let secrets = Api::namespaced(ctx.client.clone(), &key.0);
        Reconciling {
            connection,
            ctx,
            key,
            secrets,
            caches,
            checked_secret: std::sync::Mutex::new(None),
            values: std::sync::Mutex::new(None),
        }
    }

    // ---- gather -------------------------------------------------------------------------

    /// The facts, read in the order the plan checks them: the derived Secret must be ours;
    /// the administrator's policy decides before anything is sent or any Secret read; then
    /// the opt-in labels (`--require-secret-opt-in`), the inputs (the spec and the versions
    /// of the referenced Secrets, which the metadata watch knows: values are read only to
    /// obtain, or for a CA bundle new to this process), the trust and an HTTP client.
    async fn gather(&self, now: Timestamp) -> Result<Facts, Error> {
        let ctx = self.ctx;
        ctx.shared.memory.remember(&self.key);
        // Until the Secret watches have listed, everything is read from the API server.
        let synced = self.caches.synced().await;
        let existing = self.derived_secret(synced).await?;
        let ours = existing.as_ref().is_none_or(|secret| is_owned_by(secret, self.connection));
        let stored = existing.as_ref().filter(|_| ours).map(StoredCredential::from_secret);
        let secret = match &stored {
            None => DerivedSecretState::Absent,
            Some(Ok(_)) => DerivedSecretState::Usable,
            Some(Err(Unusable::EditedByHand)) => DerivedSecretState::EditedByHand,
            Some(Err(Unusable::Incomplete)) => DerivedSecretState::Incomplete,
        };
        lock(&self.checked_secret, "the derived Secret as checked").clone_from(&existing);
        let gate = if ours { self.gate(synced).await? } else { Gate::Conflict };
        let facts = Facts {
            now,
            connection: self.connection.clone(),
            secret,
            stored: stored.and_then(Result::ok),
            gate,
            memory: ctx.shared.memory.decided(&self.key),
            refresh_policy: ctx.settings.refresh,
            jitter: rand::random(),
        };
        Ok(facts)
    }

    /// Whether anything may be obtained and probed, and with what.
    async fn gate(&self, synced: bool) -> Result<Gate, Error> {
        let ctx = self.ctx;
        // A host name's answer is reused for a short while: a reconcile at rest looks nothing up.
        if let Err(message) = ctx
            .shared
            .host_policy
            .check_connection_cached(self.connection, &ctx.shared.resolved_hosts)
            .await
        {
            return Ok(Gate::NotAllowed(message));
        }
        if ctx.settings.require_secret_opt_in
            && let Some(problem) = self.secret_opt_in_problem(synced).await?
        {
            return Ok(Gate::Input(problem));
        }
        let inputs = match self.summarize_inputs(synced).await? {
            Ok(inputs) => inputs,
            Err(problem) => return Ok(Gate::Input(problem)),
        };
        let trust = match self.trust(&inputs).await? {
            Ok(trust) => trust,
            Err(problem) => return Ok(Gate::Input(problem)),
        };
        let http = match ctx.http_client(&self.key, &trust) {
            Ok(http) => http,
            Err(error) => {
                let (reason, message) = (Reason::of_http_client_error(&error), error.to_string());
                return Ok(Gate::NoHttpClient { reason, message });
            }
        };
        Ok(Gate::Open(Box::new(Usable {
            token_source: token_source(&inputs, &http),
            inputs,
            trust,
            http,
        })))
    }

    /// The derived Secret: rebuilt from its compact record when the metadata watch shows
    /// the recorded version (`derived_record`), or from the API server when the record and
    /// the watch may be behind this process's own write or disagree
    /// ([`decide::derived_secret_source`], the record in the place of the labelled store).
    /// Someone else's Secret seen in the Secret index comes back with its metadata only,
    /// which is all the owner check needs.
    async fn derived_secret(&self, synced: bool) -> Result<Option<Secret>, Error> {
        let name = self.connection.secret_name();
        // The compact record of the Secret as this process last wrote or read it.
        let record = self.ctx.shared.derived.get(&self.key, &name);
        let any = self.caches.metadata(&self.key.0, &name);
        let any_secret = any.as_ref().map(|summary| Secret {
            metadata: summary.to_metadata(&self.key.0, &name),
            ..Secret::default()
        });
        let own_write = self
            .ctx
            .shared
            .memory
            .own_write(&self.key)
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
            DerivedSecretSource::Cache => Ok(match (&record, &any_secret) {
                (Some(record), Some(any)) => Some(derived_record::rebuilt(record, self.connection, &any.metadata)),
                _ => any_secret,
            }),
            DerivedSecretSource::Get => {
                debug!(
                    secret = name,
                    "reading the derived Secret from the API server: the caches cannot tell"
                );
                let secret = self.secrets.get_opt(&name).await?;
                self.ctx.shared.derived.remember(&self.key, self.connection, secret.as_ref());
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
                self.caches.metadata(&self.key.0, &name).map(|summary| summary.opted_in())
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
                let summary = self.caches.metadata(namespace, name)?;
                Some((summary.uid().to_owned(), summary.resource_version().to_owned()))
            };
            return Ok(summarize(self.connection, version_of));
        }
        Ok(self.values().await?.map(|values| values.summary()))
    }

    /// The referenced Secrets' values, read at most once per reconcile, and from the API
    /// server only for a version no connection read before. Their fingerprint is of the
    /// versions actually read, which may be later than the Secret index's.
    async fn values(&self) -> Result<Result<Inputs, InputProblem>, Error> {
        if let Some(values) = lock(&self.values, "the values read").clone() {
            return Ok(Ok(values));
        }
        let wanted = referenced_keys(self.connection);
        let source = ByVersion {
            api: &self.secrets,
            namespace: &self.key.0,
            caches: &self.caches,
            values: &self.ctx.shared.secret_values,
            wanted: &wanted,
        };
        let read = read_inputs(self.connection, &source).await?;
        if let Ok(values) = &read {
            *lock(&self.values, "the values read") = Some(values.clone());
        }
        Ok(read)
    }

    /// Which certificates to trust. Only a `caSecretRef` needs a Secret's value, read
    /// when its version is new to this process.
    async fn trust(&self, inputs: &InputsSummary) -> Result<Result<TlsTrust, InputProblem>, Error> {
        if let Some(values) = lock(&self.values, "the values read").clone() {
            return Ok(Ok(values.trust));
        }
        let Some(version) = &inputs.ca_version else {
            return Ok(Ok(TlsTrust {
                insecure_skip_verify: inputs.insecure_skip_verify,
                ..TlsTrust::default()
            }));
        };
        if let Some((known, trust)) = self.ctx.shared.memory.get(&self.key).ca_trust.map(|cached| *cached)
            && known == *version
        {
            return Ok(Ok(trust));
        }
        let values = match self.values().await? {
            Ok(values) => values,
            Err(problem) => return Ok(Err(problem)),
        };
        let trust = values.trust.clone();
        self.ctx.shared.memory.update(&self.key, |memory| {
            memory.ca_trust = Some(Box::new((version.clone(), values.trust)))
        });
        Ok(Ok(trust))
    }

    // ---- apply --------------------------------------------------------------------------

    /// Carries out the plan: the credential step, then the probe, then (after a 401) a
    /// second credential step and probe as [`plan::plan_after_probe`] says; settles each
    /// outcome and returns what to report.
    async fn apply(&self, facts: &Facts, go: plan::Go) -> Result<Report, Error> {
        let mut usable = go.usable;
        if go.restoring {
            info!(
                secret = self.connection.secret_name(),
                "the derived Secret was deleted or edited; restoring it"
            );
        }
        let result = self.take_credential_step(go.credential, facts.stored.as_ref(), &usable).await?;
        // Obtaining may have discovered the token endpoint: messages name it from now on.
        usable.token_source = token_source(&usable.inputs, &usable.http);
        let mut fresh = plan::settle_credential(
            facts,
            &usable,
            facts.stored.clone(),
            go.restoring,
            go.memory,
            result,
            Timestamp::now(),
        );
        self.log_credential(facts, &fresh);
        if let Some(stop) = fresh.stop.take() {
            return Ok(plan::conclude_stop(facts, fresh.memory, stop));
        }
        let mut probed = self.probe(facts, &usable, &mut fresh).await;
        if let Some((step, memory)) = plan::plan_after_probe(facts, &usable, &fresh, &probed) {
            info!("Tasklist answered 401 Unauthorized: obtaining a new credential once");
            let result = self.take_credential_step(step, fresh.credential.as_ref(), &usable).await?;
            let mut again = plan::settle_credential(facts, &usable, fresh.credential.clone(), false, memory, result, Timestamp::now());
            self.log_credential(facts, &again);
            if let Some(stop) = again.stop.take() {
                return Ok(plan::conclude_stop(facts, again.memory, stop));
            }
            again.events.splice(0..0, fresh.events);
            again.refreshes += fresh.refreshes;
            plan::remember_reobtain(facts, &mut again);
            fresh = again;
            if fresh.newly_issued {
                probed = self.probe(facts, &usable, &mut fresh).await;
            }
        }
        Ok(plan::conclude(facts, &usable, fresh, probed, Timestamp::now()))
    }

    /// Keeps, writes again, or obtains and writes, as the step says. A failure leaves the
    /// Secret as it is (the last valid credential stays in place).
    async fn take_credential_step(
        &self,
        step: CredentialStep,
        held: Option<&StoredCredential>,
        usable: &Usable,
    ) -> Result<CredentialResult, Error> {
        let credential = match step {
            CredentialStep::Use { authenticated } => return Ok(CredentialResult::Used { authenticated }),
            CredentialStep::WriteKept(kept) => {
                info!("writing the kept credential to the derived Secret again");
                kept
            }
            CredentialStep::Obtain { reuse_shared } => match self.obtain(held, reuse_shared, usable).await? {
                Ok(credential) => credential,
                Err(result) => return Ok(result),
            },
        };
        self.write(credential).await
    }

    /// Obtains a new credential; connections with the same client share one token, and the
    /// one held now is never handed back (its refresh is due, its inputs changed, or
    /// Tasklist refused it). The only read of the referenced Secrets' values.
    async fn obtain(
        &self,
        held: Option<&StoredCredential>,
        reuse_shared: bool,
        usable: &Usable,
    ) -> Result<Result<StoredCredential, CredentialResult>, Error> {
        let ctx = self.ctx;
        let inputs = match self.values().await? {
            Ok(inputs) => inputs,
            Err(problem) => return Ok(Err(CredentialResult::InputProblem(problem))),
        };
        // Held while the credential is obtained (a token from the cache leaves it at once),
        // not while the Kubernetes API is read or written: those hold no host's slot.
        let _slots = ctx
            .shared
            .host_slots
            .enter(
                &self.key.0,
                credential_hosts(self.connection, &ctx.settings.http.facts),
                slot_limits(ctx.settings.concurrency),
            )
            .await
            .map_err(Error::Deferred)?;
        let started = std::time::Instant::now();
        let held_token = held.and_then(|current| match &current.credential {
            crate::credential::Credential::Bearer(token) => Some(token),
            crate::credential::Credential::Session(_) | crate::credential::Credential::Basic(_) => None,
        });
        let obtained = obtain_shared_credential(
            &inputs,
            &usable.http,
            &self.ctx.settings.refresh,
            &ctx.shared.token_cache,
            self.key.clone(),
            held_token,
            reuse_shared,
        )
        .await;
        match obtained.source.saved_label() {
            None => self.record_credential_request(&inputs, &obtained.result, started.elapsed()),
            Some(source) => {
                ctx.metrics
                    .token_requests_saved
                    .get_or_create(&SourceLabels { source: source.into() })
                    .inc();
            }
        }
        Ok(obtained.result.map_err(CredentialResult::ObtainFailed))
    }

    /// Writes a credential to the derived Secret. A write the API server refuses is a
    /// state, not an error: the credential is kept and only the write is retried.
    async fn write(&self, credential: StoredCredential) -> Result<CredentialResult, Error> {
        match self.write_credential(&credential).await {
            Ok(()) => Ok(CredentialResult::Written(credential)),
            Err(Error::Kube(error)) => {
                let message = write_failure_message(&self.connection.secret_name(), &error, &credential, &self.connection.spec.url);
                Ok(CredentialResult::WriteFailed { credential, message })
            }
            Err(other) => Err(other),
        }
    }

    /// Logs what the credential step came to.
    fn log_credential(&self, facts: &Facts, fresh: &Fresh) {
        let memory = &fresh.memory;
        if let (Some(record), Some(retry_at)) = (&memory.write_failure, fresh.retry_at) {
            let retry_in = retry_at.duration_since(facts.now);
            warn!(consecutive = record.consecutive, retry_in = %human_signed_duration(retry_in), "{}", record.message);
        } else if let (Some(failure), Some(retry_at)) = (&memory.failure, fresh.retry_at) {
            let retry_in = retry_at.duration_since(facts.now);
            warn!(consecutive = failure.consecutive, retry_in = %human_signed_duration(retry_in), "could not obtain a credential: {}", failure.failure.message);
        } else if let (true, Some(credential)) = (fresh.newly_issued, &fresh.credential) {
            if let Some(previous) = &facts.memory.write_failure {
                info!(
                    failed_writes = previous.consecutive,
                    "the derived Secret was written after failed writes"
                );
            }
            info!(expires_at = %credential.expires_at, refresh_at = %credential.refresh_at, "stored a new credential");
        }
        if let Some(stop) = &fresh.stop {
            warn!(reason = %stop.authenticated.reason, detail = %stop.authenticated.message, "cannot obtain a credential");
        }
    }

    /// Probes as [`plan::probe_step`] says, through the probe lane: a fresh answer to the
    /// same request with the same credential (another connection's), or that request in
    /// flight, or a new one; with no probe slot free it does not wait but keeps the last
    /// result and asks for a wake-up soon.
    async fn probe(&self, facts: &Facts, usable: &Usable, fresh: &mut Fresh) -> Probed {
        let step = plan::probe_step(facts, usable, fresh);
        let result = match (&step, &fresh.credential) {
            (ProbeStep::Send { shown_while_waiting }, Some(credential)) => {
                Some(self.send_probe(facts, usable, credential, shown_while_waiting.is_some()).await)
            }
            _ => None,
        };
        let probed = plan::settle_probe(fresh, step, result);
        self.log_probe(&probed);
        probed
    }

    async fn send_probe(&self, facts: &Facts, usable: &Usable, credential: &StoredCredential, has_result: bool) -> ProbeResult {
        let ctx = self.ctx;
        let probe =
            Probe::new(&self.connection.spec.url, &self.connection.spec.probe, usable.http.facts()).with_timeout(ctx.probe_timeout());
        let probe_key = ProbeKey::new(&probe, credential.credential.as_probe_credential(), &usable.trust);
        let host = origin(&probe.url).unwrap_or_else(|| probe.url.clone());
        let send = || {
            let (probe, http, metrics) = (probe.clone(), usable.http.clone(), ctx.metrics.clone());
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
        let due = Due {
            credential_issued_at: credential.issued_at,
            interval: usable.inputs.probe_interval,
            now: facts.now,
            has_result,
        };
        let shared = match ctx.shared.probes.turn(probe_key, host, due, send) {
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
                debug!(?retry_after, "probe deferred: no probe slot is free");
                return ProbeResult::Deferred { retry_after };
            }
        };
        ProbeResult::Answered {
            message: shared.outcome.message(&probe.describe()),
            outcome: shared.outcome,
            at: shared.at,
        }
    }

    fn log_probe(&self, probed: &Probed) {
        let result = &probed.reachable;
        match probed.log {
            Some(ProbeLogLevel::Warn) => warn!(reason = %result.reason, "probe failed: {}", result.message),
            Some(ProbeLogLevel::Info) => info!("probe succeeds again: {}", result.message),
            Some(ProbeLogLevel::Debug) => debug!(reason = %result.reason, "probe: {}", result.message),
            None => {}
        }
    }

    // ---- report -------------------------------------------------------------------------

    /// Remembers what was decided, announces the Events, writes status when it changed
    /// (the only status write), records metrics, and says when to wake up.
    async fn report(&self, report: Report, now: Timestamp) -> Result<Action, Error> {
        let ctx = self.ctx;
        ctx.shared.memory.commit(&self.key, report.memory);
        if let Some(warning) = &report.announced_warning {
            warn!("{warning}");
        }
        if report.refreshes > 0 {
            ctx.metrics
                .credential_refreshes
                .get_or_create(&MethodLabels {
                    method: self.method().into(),
                })
                .inc_by(u64::from(report.refreshes));
        }
        for event in report.events {
            ctx.events.publish(self.connection, event).await;
        }
        self.write_status_if_changed(&report.observation, now).await?;
        Ok(Action::requeue(report.wake))
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
        self.ctx.shared.memory.record_write_in_flight(&self.key, &name, data_hash);
        let checked = lock(&self.checked_secret, "the derived Secret as checked").clone();
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
        self.ctx.shared.memory.record_own_write(&self.key, &name, version);
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
        self.ctx
            .shared
            .derived
            .remember_write(&self.key, self.connection, &written, credential);
        // The consuming Pods that opted in re-read the Secret now.
        let version = written.metadata.resource_version.as_deref().unwrap_or_default();
        self.ctx.nudger.after_write(&self.key.0, &name, version);
        *lock(&self.checked_secret, "the derived Secret as checked") = Some(written);
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

/// Where tokens come from, in words: the token endpoint as configured, or as discovered
/// from the issuer once it was.
fn token_source(inputs: &InputsSummary, http: &HttpClient) -> Option<String> {
    inputs.token_endpoint.as_ref().map(|endpoint| endpoint.location.describe(http))
}

/// A reconcile that stops says why in the log too.
fn log_stop(stop: &plan::Stop) {
    match &stop.secret_conflict {
        Some(message) => warn!("{message}"),
        None => warn!(reason = %stop.authenticated.reason, detail = %stop.authenticated.message, "cannot obtain a credential"),
    }
}
