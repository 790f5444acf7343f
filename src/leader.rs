//! Leader election on a `coordination.k8s.io/v1` Lease, so that only one of several operator
//! pods reconciles at a time while the others stand by.
//!
//! Follows client-go's `leaderelection` package:
//! - A candidate takes the Lease when it does not exist, when nobody holds it, when it is its
//!   own already (a restarted container keeps its pod name), or when the holder has not renewed
//!   it for `leaseDurationSeconds`.
//! - Expiry is measured on the candidate's own monotonic clock, from the moment it first saw the
//!   Lease's current version, never by comparing `renewTime` with the local wall clock: clocks
//!   of different nodes may disagree by more than a lease duration, and then a standby would
//!   cut in on a holder that is renewing just fine.
//! - Every write replaces the object read, with its resourceVersion: when two candidates race,
//!   the API server accepts one update and answers 409 Conflict to the other.
//! - The holder gives up when it has not renewed within `renew_deadline`, which is shorter than
//!   the lease duration: it stops before any standby can consider the Lease expired.
//!
//! Only the verbs get, create and update are used: those are what the Helm chart grants.

use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::machinery::lock::lock;

/// client-go's default: how long a Lease stays valid after its last renewal.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// client-go's default: how long the holder keeps trying to renew before it gives up.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// client-go's default: the pause between two attempts to acquire or renew.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Which Lease to compete for, under which name, and how fast.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub lease_name: String,
    /// Unique per candidate; the pod name in a Deployment.
    pub identity: String,
    /// Written into the Lease: how long standbys wait after the last renewal before taking over.
    pub lease_duration: Duration,
    /// The holder gives up leadership when no renewal succeeded for this long.
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire (standbys) or renew (the holder).
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Settings with client-go's default durations (15 s, 10 s, 2 s).
    pub fn new(namespace: impl Into<String>, lease_name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseSettings {
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// Checks the durations the way client-go does. Two leaders at once become possible when
    /// the renew deadline is not shorter than the lease duration; and a holder whose renew
    /// deadline is not longer than the retry period gets a single try before it gives up.
    pub fn validate(&self) -> Result<(), String> {
        if self.identity.is_empty() {
            return Err("the leader election identity must not be empty".into());
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(format!(
                "the lease duration ({:?}) must be longer than the renew deadline ({:?})",
                self.lease_duration, self.renew_deadline
            ));
        }
        if self.renew_deadline <= self.retry_period {
            return Err(format!(
                "the renew deadline ({:?}) must be longer than the retry period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        if self.retry_period.is_zero() {
            return Err("the retry period must be longer than zero".into());
        }
        Ok(())
    }
}

/// Competes for one Lease. See the module docs.
pub struct LeaderElector {
    leases: Api<Lease>,
    settings: LeaseSettings,
    /// When the last successful write of the Lease as its holder was sent; `None` while this
    /// process does not hold the Lease. The start of the request, not its end, is what counts:
    /// standbys start their wait no earlier than that.
    last_write: Mutex<Option<Instant>>,
}

/// The version of someone else's Lease that a standby saw, and since when.
struct Observation {
    resource_version: Option<String>,
    holder: String,
    since: Instant,
}

/// How an attempt to renew ended, when the API server answered.
enum Renewal {
    Renewed,
    /// Someone else holds the Lease now, or nobody, or it is gone: the text says which.
    Lost(String),
}

impl LeaderElector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        LeaderElector {
            leases: Api::namespaced(client, &settings.namespace),
            settings,
            last_write: Mutex::new(None),
        }
    }

    /// Waits until this process holds the lease: takes it when it is free, expired, or already
    /// ours. API failures are logged and retried every retry period, never returned: a standby
    /// has nothing better to do than wait. Race it against the shutdown signal, or a standby
    /// ignores SIGTERM.
    pub async fn acquire(&self) {
        let mut observed = None;
        loop {
            // A request that hangs must not keep the standby from trying again.
            match timeout(self.settings.renew_deadline, self.try_acquire(&mut observed)).await {
                Ok(Ok(true)) => return,
                Ok(Ok(false)) => {}
                Ok(Err(error)) => warn!(lease = %self.lease_path(), "cannot acquire the leader election lease, retrying: {error}"),
                Err(_) => warn!(lease = %self.lease_path(), "acquiring the leader election lease timed out, retrying"),
            }
            sleep(self.settings.retry_period).await;
        }
    }

    /// Keeps renewing every retry period; resolves when leadership is lost: no renewal succeeded
    /// within the renew deadline, or the lease has another holder (or none, or was deleted). The
    /// caller must then stop reconciling at once (it has lease duration minus renew deadline
    /// before a standby may take over) and exit.
    ///
    /// Call it right after `acquire` and keep it running as long as this process acts as the
    /// leader: the first renewal is sent at once. Resolves at once when called without holding
    /// the lease (before `acquire`, after `release`, after an earlier `hold` resolved).
    pub async fn hold(&self) {
        loop {
            let Some(last_write) = self.last_write() else {
                info!(identity = %self.settings.identity, lease = %self.lease_path(), "not the leader: the lease is not held");
                return;
            };
            // Measured from the last successful write, not from this attempt: then the holder
            // gives up before a standby, which waits the longer lease duration, can take over.
            let deadline = last_write + self.settings.renew_deadline;
            match timeout_at(deadline, self.try_renew()).await {
                Ok(Ok(Renewal::Renewed)) => {
                    debug!(identity = %self.settings.identity, lease = %self.lease_path(), "renewed the leader election lease");
                }
                Ok(Ok(Renewal::Lost(why))) => {
                    self.forget_write();
                    info!(identity = %self.settings.identity, lease = %self.lease_path(), "lost leadership: {why}");
                    return;
                }
                Ok(Err(error)) => {
                    warn!(lease = %self.lease_path(), "cannot renew the leader election lease, retrying: {error}");
                }
                Err(_) => {
                    self.forget_write();
                    info!(
                        identity = %self.settings.identity,
                        lease = %self.lease_path(),
                        "lost leadership: the lease was not renewed within {:?}",
                        self.settings.renew_deadline
                    );
                    return;
                }
            }
            sleep(self.settings.retry_period).await;
        }
    }

    /// Gives the lease up, for a graceful shutdown: clears holderIdentity (and sets a lease of
    /// one second) so that a standby takes over at its next try instead of waiting for expiry.
    /// Call it after reconciling stopped and after `hold` was dropped.
    ///
    /// Does nothing when someone else holds the lease. One attempt, bounded by the renew
    /// deadline: if it fails, standbys take over once the lease expires.
    pub async fn release(&self) {
        // First, so that a `hold` still running stops counting on the lease.
        self.forget_write();
        match timeout(self.settings.renew_deadline, self.try_release()).await {
            Ok(Ok(true)) => info!(identity = %self.settings.identity, lease = %self.lease_path(), "released leadership"),
            Ok(Ok(false)) => debug!(lease = %self.lease_path(), "not releasing the lease: it is not ours"),
            Ok(Err(error)) => {
                warn!(lease = %self.lease_path(), "cannot release the leader election lease, others take over when it expires: {error}")
            }
            Err(_) => warn!(lease = %self.lease_path(), "releasing the leader election lease timed out, others take over when it expires"),
        }
    }

    /// One look at the lease; takes it if it may. `Ok(true)` when this process holds it now.
    async fn try_acquire(&self, observed: &mut Option<Observation>) -> Result<bool, kube::Error> {
        let attempt_started = Instant::now();
        let Some(lease) = self.leases.get_opt(&self.settings.lease_name).await? else {
            let created = self.leases.create(&PostParams::default(), &self.new_lease()).await;
            return match created {
                Ok(_) => {
                    self.acquired(attempt_started, None);
                    Ok(true)
                }
                // Another candidate created it first (AlreadyExists): look again next time.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };

        let spec = lease.spec.clone().unwrap_or_default();
        let previous_holder = holder(&spec);
        if let Some(other) = previous_holder.filter(|holder| *holder != self.settings.identity) {
            let version_seen_since = self.observe(observed, &lease, other);
            if version_seen_since.elapsed() < lease_duration_of(&spec, self.settings.lease_duration) {
                return Ok(false);
            }
        }

        let previous_holder = previous_holder.map(str::to_owned);
        let taken = self.taken_over(lease);
        match self.leases.replace(&self.settings.lease_name, &PostParams::default(), &taken).await {
            Ok(_) => {
                self.acquired(attempt_started, previous_holder);
                Ok(true)
            }
            // Someone else wrote the lease since we read it, most likely another candidate taking it.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Records which version of `other`'s lease a standby sees, and returns since when it has
    /// seen that version. Logs when the holder changes, so a standby's log tells whom it waits for.
    fn observe(&self, observed: &mut Option<Observation>, lease: &Lease, other: &str) -> Instant {
        let resource_version = &lease.metadata.resource_version;
        match observed {
            Some(seen) if seen.resource_version == *resource_version => seen.since,
            _ => {
                if observed.as_ref().is_none_or(|seen| seen.holder != other) {
                    info!(identity = %self.settings.identity, lease = %self.lease_path(), holder = other, "waiting for leadership: the lease is held by another");
                }
                let since = Instant::now();
                *observed = Some(Observation {
                    resource_version: resource_version.clone(),
                    holder: other.to_owned(),
                    since,
                });
                since
            }
        }
    }

    fn acquired(&self, attempt_started: Instant, previous_holder: Option<String>) {
        *lock(&self.last_write, "the time of the last lease write") = Some(attempt_started);
        info!(
            identity = %self.settings.identity,
            lease = %self.lease_path(),
            previous_holder = previous_holder.as_deref().unwrap_or("<none>"),
            "acquired leadership"
        );
    }

    /// One renewal. `Err` only for API failures, which are worth retrying until the deadline.
    async fn try_renew(&self) -> Result<Renewal, kube::Error> {
        let attempt_started = Instant::now();
        let Some(mut lease) = self.leases.get_opt(&self.settings.lease_name).await? else {
            return Ok(Renewal::Lost("the lease was deleted".into()));
        };
        let spec = lease.spec.get_or_insert_default();
        match holder(spec) {
            Some(holder) if holder == self.settings.identity => {}
            Some(other) => {
                return Ok(Renewal::Lost(format!("the lease is held by {other}")));
            }
            None => {
                return Ok(Renewal::Lost("the lease was released".into()));
            }
        }
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(whole_seconds(self.settings.lease_duration));
        // A 409 Conflict is returned as an error: the next attempt reads the lease again and
        // finds out whether someone else took it.
        self.leases
            .replace(&self.settings.lease_name, &PostParams::default(), &lease)
            .await?;
        *lock(&self.last_write, "the time of the last lease write") = Some(attempt_started);
        Ok(Renewal::Renewed)
    }

    /// Clears the holder if it is us. `Ok(true)` when the lease was released.
    async fn try_release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.leases.get_opt(&self.settings.lease_name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_default();
        if holder(spec) != Some(self.settings.identity.as_str()) {
            return Ok(false);
        }
        // As client-go does: no holder for the candidates that check it, and a lease of one
        // second from now for those that only look at the times.
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        self.leases
            .replace(&self.settings.lease_name, &PostParams::default(), &lease)
            .await?;
        Ok(true)
    }

    /// A fresh lease, held by us.
    fn new_lease(&self) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.lease_name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.settings.identity.clone()),
                lease_duration_seconds: Some(whole_seconds(self.settings.lease_duration)),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        }
    }

    /// `lease` as read, now held by us. Its metadata (resourceVersion) stays, so the update
    /// fails if anyone wrote the lease in between.
    fn taken_over(&self, mut lease: Lease) -> Lease {
        let now = MicroTime(Timestamp::now());
        let spec = lease.spec.get_or_insert_default();
        let already_ours = holder(spec) == Some(self.settings.identity.as_str());
        if !already_ours {
            spec.holder_identity = Some(self.settings.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.lease_duration_seconds = Some(whole_seconds(self.settings.lease_duration));
        spec.renew_time = Some(now);
        lease
    }

    fn last_write(&self) -> Option<Instant> {
        *lock(&self.last_write, "the time of the last lease write")
    }

    fn forget_write(&self) {
        *lock(&self.last_write, "the time of the last lease write") = None;
    }

    /// `namespace/name`, for log lines.
    fn lease_path(&self) -> String {
        format!("{}/{}", self.settings.namespace, self.settings.lease_name)
    }
}

/// The holder, if any: an empty holderIdentity (as older clients write on release) means none.
fn holder(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref().filter(|holder| !holder.is_empty())
}

/// The lease duration the holder wrote, or ours when it wrote none that makes sense.
fn lease_duration_of(spec: &LeaseSpec, fallback: Duration) -> Duration {
    spec.lease_duration_seconds
        .and_then(|seconds| u64::try_from(seconds).ok())
        .filter(|seconds| *seconds > 0)
        .map_or(fallback, Duration::from_secs)
}

/// `duration` in whole seconds for leaseDurationSeconds: rounded up (a lease must not look
/// shorter to others than it is to us), at least 1.
fn whole_seconds(duration: Duration) -> i32 {
    i32::try_from(crate::time::seconds_rounded_up(duration).max(1)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_seconds_round_up_and_are_at_least_one() {
        assert_eq!(whole_seconds(Duration::from_secs(15)), 15);
        assert_eq!(whole_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_secs(u64::MAX)), i32::MAX);
    }

    #[test]
    fn lease_duration_falls_back_when_missing_or_not_positive() {
        let fallback = Duration::from_secs(15);
        let with = |seconds| LeaseSpec {
            lease_duration_seconds: seconds,
            ..LeaseSpec::default()
        };
        assert_eq!(lease_duration_of(&with(Some(3)), fallback), Duration::from_secs(3));
        assert_eq!(lease_duration_of(&with(None), fallback), fallback);
        assert_eq!(lease_duration_of(&with(Some(0)), fallback), fallback);
        assert_eq!(lease_duration_of(&with(Some(-5)), fallback), fallback);
    }

    #[test]
    fn empty_holder_is_no_holder() {
        let with = |holder: Option<&str>| LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            ..LeaseSpec::default()
        };
        assert_eq!(holder(&with(Some("pod-a"))), Some("pod-a"));
        assert_eq!(holder(&with(Some(""))), None);
        assert_eq!(holder(&with(None)), None);
    }

    #[test]
    fn validate_rejects_durations_that_allow_two_leaders() {
        let mut settings = LeaseSettings::new("ns", "lease", "pod-a");
        assert_eq!(settings.validate(), Ok(()));
        settings.renew_deadline = settings.lease_duration;
        assert!(settings.validate().is_err());
        settings = LeaseSettings::new("ns", "lease", "pod-a");
        settings.retry_period = settings.renew_deadline;
        assert!(settings.validate().is_err());
        assert!(LeaseSettings::new("ns", "lease", "").validate().is_err());
    }
}
