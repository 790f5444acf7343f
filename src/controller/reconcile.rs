//! One reconcile of one TasklistConnection, top to bottom:
//! check the derived Secret is ours, read what the credential is made from, keep the
//! stored credential or obtain a new one, probe Tasklist with it, tell the user in status,
//! and wake up again when the next thing is due.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::memory::{ConnectionKey, FailureRecord, ProbeRecord};
use super::{Context, Error, FIELD_MANAGER};
use crate::camunda::probe::{Probe, ProbeOutcome};
use crate::camunda::{AuthFailure, AuthFailureKind, HttpClient};
use crate::crd::{TasklistConnection, TasklistConnectionStatus};
use crate::credential::{Credential, add};
use crate::derived_secret::{StoredCredential, Unusable, is_owned_by};
use crate::events::{ConnectionEvent, transitions};
use crate::inputs::{Inputs, LoginMaterial, read_inputs, referenced_secret_names};
use crate::metrics::{ConnectionLabels, CredentialRequestLabels, MethodLabels, ResultLabels};
use crate::obtain::obtain_credential;
use crate::schedule::retry_delay;
use crate::status::{ConditionState, CredentialTimes, Observation, READY, desired_status};

/// Wake up at least this often, whatever is scheduled, so that nothing missed stays missed.
const LONGEST_SLEEP: Duration = Duration::from_secs(3600);
/// Retry interval while a Secret of the derived name belongs to someone else (a watch
/// also wakes the connection when that Secret changes).
const CONFLICT_RECHECK: Duration = Duration::from_secs(300);

pub async fn reconcile(connection: Arc<TasklistConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = Timestamp::now();
    let this = Reconciling::new(&connection, &ctx);
    let mut wanted_secrets = referenced_secret_names(&connection);
    wanted_secrets.push(connection.secret_name());
    ctx.memory.record_secrets(&this.key, wanted_secrets);

    // 1. The derived Secret must be ours to write.
    let existing = this.secrets.get_opt(&connection.secret_name()).await?;
    if let Some(secret) = &existing
        && !is_owned_by(secret, &connection)
    {
        return this.report_secret_conflict(now).await;
    }
    let stored = existing.as_ref().map(StoredCredential::from_secret);
    let restoring = match &stored {
        Some(Err(Unusable::EditedByHand)) => true,
        // Status says this Secret held a credential: someone deleted it.
        None => connection
            .status
            .as_ref()
            .is_some_and(|s| s.last_refresh_time.is_some() && s.secret_name == Some(connection.secret_name())),
        _ => false,
    };
    if restoring {
        info!(
            secret = connection.secret_name(),
            "the derived Secret was deleted or edited; restoring it"
        );
    }
    let stored = stored.and_then(Result::ok);

    // 2. What the credential is made from.
    let inputs = match read_inputs(&connection, &this.secrets).await? {
        Ok(inputs) => inputs,
        Err(problem) => {
            warn!(reason = problem.reason, detail = %problem.message, "cannot obtain a credential");
            let authenticated = ConditionState::failing(problem.reason, problem.message);
            let reachable = this.last_probe_result(stored.as_ref());
            this.write_status_if_changed(&this.observe(stored.as_ref(), None, authenticated, reachable), now)
                .await?;
            // A watch on the referenced Secret wakes the connection when it is fixed.
            return Ok(Action::requeue(
                until(now, stored.as_ref().map(|s| s.refresh_at)).min(LONGEST_SLEEP),
            ));
        }
    };
    let http = match ctx.http_client(&inputs) {
        Ok(http) => http,
        Err(message) => {
            let authenticated = ConditionState::failing("InvalidCABundle", message);
            let reachable = ConditionState::unknown("NotProbed", "no usable TLS settings");
            this.write_status_if_changed(&this.observe(stored.as_ref(), None, authenticated, reachable), now)
                .await?;
            return Ok(Action::requeue(LONGEST_SLEEP));
        }
    };

    // 3. Keep the stored credential while it is good, obtain a new one when it is due.
    let mut fresh = this.ensure_fresh_credential(&inputs, &http, stored, false, restoring).await?;

    // 4. Ask Tasklist whether it accepts the credential. A cookie session the server has
    //    forgotten (a Tasklist restart) is re-established once, without waiting for expiry.
    let (mut reachable, outcome) = this
        .probe_if_due(&http, fresh.credential.as_ref(), fresh.newly_issued, &inputs, now)
        .await;
    if outcome == Some(ProbeOutcome::Unauthorized { status: 401 }) && is_session(fresh.credential.as_ref()) && !fresh.newly_issued {
        info!("Tasklist no longer accepts the session; logging in again");
        fresh = this.ensure_fresh_credential(&inputs, &http, fresh.credential, true, false).await?;
        if fresh.newly_issued {
            (reachable, _) = this.probe_if_due(&http, fresh.credential.as_ref(), true, &inputs, now).await;
        }
    }

    // 5. Tell the user.
    let memory = ctx.memory.get(&this.key);
    let pending_retry = memory
        .failure
        .as_ref()
        .filter(|f| f.fingerprint == inputs.fingerprint)
        .map(|f| f.retry_at);
    let next_refresh = pending_retry.or(fresh.credential.as_ref().map(|c| c.refresh_at));
    let observation = this.observe(fresh.credential.as_ref(), next_refresh, fresh.authenticated, reachable);
    this.write_status_if_changed(&observation, now).await?;

    // 6. Wake up when the next thing is due: the refresh (or retry), or the next probe.
    let next_probe = memory
        .last_probe
        .as_ref()
        .filter(|_| connection.spec.probe.enabled)
        .map(|probe| add(probe.at, inputs.probe_interval));
    let wake_at = [next_refresh, next_probe].into_iter().flatten().min();
    Ok(Action::requeue(until(Timestamp::now(), wake_at).min(LONGEST_SLEEP)))
}

/// What every step of one reconcile works on.
struct Reconciling<'a> {
    connection: &'a TasklistConnection,
    ctx: &'a Context,
    key: ConnectionKey,
    secrets: Api<Secret>,
}

/// The credential to use after step 3, and what the Authenticated condition says.
struct FreshCredential {
    credential: Option<StoredCredential>,
    authenticated: ConditionState,
    newly_issued: bool,
}

impl<'a> Reconciling<'a> {
    fn new(connection: &'a TasklistConnection, ctx: &'a Context) -> Self {
        let key: ConnectionKey = (connection.namespace().unwrap_or_default(), connection.name_any());
        let secrets = Api::namespaced(ctx.client.clone(), &key.0);
        Reconciling {
            connection,
            ctx,
            key,
            secrets,
        }
    }

    /// Keeps `stored` when it was made from the same inputs and its refresh time has not come;
    /// otherwise obtains a new credential and writes it. A failure leaves the Secret as it is
    /// (the last valid credential stays in place) and is retried with backoff; a retry for the
    /// same inputs is not attempted before its time, whatever woke the connection.
    async fn ensure_fresh_credential(
        &self,
        inputs: &Inputs,
        http: &HttpClient,
        stored: Option<StoredCredential>,
        replace_now: bool,
        restoring: bool,
    ) -> Result<FreshCredential, Error> {
        let (ctx, key) = (self.ctx, &self.key);
        let now = Timestamp::now();
        if let Some(current) = &stored
            && !replace_now
            && current.inputs == inputs.fingerprint
            && now < current.refresh_at
        {
            let authenticated = ConditionState::ok("CredentialIssued", issued_message(current, inputs));
            return Ok(FreshCredential {
                credential: stored,
                authenticated,
                newly_issued: false,
            });
        }

        let previous_failure = ctx
            .memory
            .get(key)
            .failure
            .filter(|failure| failure.fingerprint == inputs.fingerprint);
        if let Some(failure) = &previous_failure
            && now < failure.retry_at
        {
            debug!(retry_at = %failure.retry_at, "waiting before trying again");
            return Ok(FreshCredential {
                credential: stored,
                authenticated: failed_condition(&failure.failure),
                newly_issued: false,
            });
        }

        let started = std::time::Instant::now();
        let result = obtain_credential(inputs, http).await;
        self.record_credential_request(inputs, &result, started.elapsed());
        match result {
            Ok(credential) => {
                self.write_credential(&credential).await?;
                ctx.memory.update(key, |memory| memory.failure = None);
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
                if inputs.trust.insecure_skip_verify {
                    ctx.events.publish(self.connection, ConnectionEvent::InsecureSkipVerify).await;
                }
                let authenticated = ConditionState::ok("CredentialIssued", issued_message(&credential, inputs));
                Ok(FreshCredential {
                    credential: Some(credential),
                    authenticated,
                    newly_issued: true,
                })
            }
            Err(failure) => {
                let consecutive = previous_failure.map_or(1, |previous| previous.consecutive.saturating_add(1));
                let mut retry_at = add(now, retry_delay(consecutive, failure.kind, rand::random()));
                // A server that comes back should get a try before the kept credential expires.
                // Rejections keep their 30 s minimum: the same credentials would be refused again.
                if failure.kind == AuthFailureKind::ServerError
                    && let Some(current) = &stored
                {
                    let last_moment = current.expires_at - jiff::SignedDuration::from_secs(5);
                    if last_moment > now {
                        retry_at = retry_at.min(last_moment);
                    }
                }
                let delay = retry_at.duration_since(now);
                warn!(consecutive, retry_in = ?delay, "could not obtain a credential: {}", failure.message);
                let authenticated = failed_condition(&failure);
                ctx.memory.update(key, |memory| {
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
                })
            }
        }
    }

    /// Applies the derived Secret. The resourceVersion it was read at is not needed: the
    /// field manager owns every field it writes, and ownership was checked just before.
    async fn write_credential(&self, credential: &StoredCredential) -> Result<(), Error> {
        let secret = credential.to_secret(self.connection);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let written = self
            .secrets
            .patch(&self.connection.secret_name(), &params, &Patch::Apply(&secret))
            .await?;
        self.ctx
            .memory
            .record_own_write(&self.key.0, &self.connection.secret_name(), written.metadata.resource_version);
        Ok(())
    }

    fn method(&self) -> &'static str {
        self.connection.spec.auth.method_name()
    }

    fn record_credential_request(&self, inputs: &Inputs, result: &Result<StoredCredential, AuthFailure>, took: Duration) {
        let metrics = &self.ctx.metrics;
        let outcome = match result {
            Ok(_) => "success",
            Err(failure) => failed_condition(failure).reason,
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
    /// with no outcome. A credential issued in this reconcile is always probed: one issued
    /// in the same second as the last (an HTTP Basic Secret edited twice) has the same
    /// issue time.
    async fn probe_if_due(
        &self,
        http: &HttpClient,
        credential: Option<&StoredCredential>,
        newly_issued: bool,
        inputs: &Inputs,
        now: Timestamp,
    ) -> (ConditionState, Option<ProbeOutcome>) {
        let (connection, ctx, key) = (self.connection, self.ctx, &self.key);
        let spec = &connection.spec.probe;
        if !spec.enabled {
            return (ConditionState::ok("ProbeDisabled", "the probe is disabled"), None);
        }
        let Some(credential) = credential else {
            return (
                ConditionState::unknown("NoCredential", "there is no credential to probe Tasklist with yet"),
                None,
            );
        };
        if let Some(last) = ctx.memory.get(key).last_probe
            && !newly_issued
            && last.credential_issued_at == credential.issued_at
            && now < add(last.at, inputs.probe_interval)
        {
            return (last.result, None);
        }
        let probe = Probe::new(&connection.spec.url, spec);
        let started = std::time::Instant::now();
        let outcome = probe.run(http, credential.credential.as_probe_credential()).await;
        let took = started.elapsed().as_secs_f64();
        let message = outcome.message(&probe.describe());
        let result = match &outcome {
            ProbeOutcome::Succeeded => ConditionState::ok("ProbeSucceeded", message),
            ProbeOutcome::Unauthorized { .. } => ConditionState::failing("ProbeUnauthorized", message),
            ProbeOutcome::Failed { .. } => ConditionState::failing("ProbeFailed", message),
            ProbeOutcome::Unreachable { .. } => ConditionState::failing("Unreachable", message),
        };
        ctx.metrics
            .probe_duration
            .get_or_create(&ResultLabels {
                result: result.reason.into(),
            })
            .observe(took);
        if result.status != Some(true) {
            warn!(reason = result.reason, "probe failed: {}", result.message);
        }
        let record = ProbeRecord {
            at: now,
            credential_issued_at: credential.issued_at,
            result: result.clone(),
        };
        ctx.memory.update(key, |memory| memory.last_probe = Some(record));
        (result, Some(outcome))
    }

    /// What the last probe found, for reconciles that cannot probe.
    fn last_probe_result(&self, credential: Option<&StoredCredential>) -> ConditionState {
        match (self.ctx.memory.get(&self.key).last_probe, credential) {
            (Some(last), Some(credential)) if last.credential_issued_at == credential.issued_at => last.result,
            _ => ConditionState::unknown("NotProbed", "Tasklist was not probed: the credential's inputs are not usable"),
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
            |what: &str| ConditionState::unknown("SecretConflict", format!("{what} not attempted: the Secret name is taken"));
        let mut observation = self.observe(None, None, not_attempted("authentication"), not_attempted("probe"));
        observation.secret_conflict = Some(message.clone());
        let already_reported = connection
            .status
            .as_ref()
            .is_some_and(|status| status.conditions.iter().any(|c| c.type_ == READY && c.reason == "SecretConflict"));
        if !already_reported {
            self.ctx
                .events
                .publish(connection, ConnectionEvent::SecretConflict { message })
                .await;
        }
        self.write_status_if_changed(&observation, now).await?;
        Ok(Action::requeue(CONFLICT_RECHECK))
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
        for event in transitions(connection.status.as_ref(), &desired) {
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
        match observation.credential.filter(|times| times.expires_at != crate::credential::NEVER) {
            Some(times) => {
                metrics.credential_expiry.get_or_create(&labels).set(times.expires_at.as_second());
            }
            None => {
                metrics.credential_expiry.remove(&labels);
            }
        }
    }
}

fn failed_condition(failure: &AuthFailure) -> ConditionState {
    ConditionState::failing(failure.condition_reason(), failure.message.clone())
}

fn issued_message(credential: &StoredCredential, inputs: &Inputs) -> String {
    let kind = match &inputs.login {
        LoginMaterial::OAuth2 { endpoint, .. } => format!("access token from {}", endpoint.location.describe()),
        LoginMaterial::Cookie { .. } => "session".to_owned(),
        LoginMaterial::Basic { username, .. } => {
            return format!(
                "HTTP Basic credentials of user {username:?} stored at {}; they do not expire",
                credential.issued_at
            );
        }
    };
    format!("{kind} obtained at {}, valid until {}", credential.issued_at, credential.expires_at)
}

fn is_session(credential: Option<&StoredCredential>) -> bool {
    matches!(credential.map(|c| &c.credential), Some(Credential::Session(_)))
}

/// How long from `now` until `at`; at least one second, and `LONGEST_SLEEP` when nothing is due.
fn until(now: Timestamp, at: Option<Timestamp>) -> Duration {
    match at {
        Some(at) => Duration::try_from(at.duration_since(now))
            .unwrap_or_default()
            .max(Duration::from_secs(1)),
        None => LONGEST_SLEEP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    #[test]
    fn sleeps_at_least_a_second_and_at_most_an_hour_when_idle() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(until(now, Some(Timestamp::from_second(900).unwrap())), Duration::from_secs(1));
        assert_eq!(until(now, Some(now + SignedDuration::from_secs(42))), Duration::from_secs(42));
        assert_eq!(until(now, None), LONGEST_SLEEP);
    }
}
