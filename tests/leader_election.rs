//! Leader election against a real API server: one holder at a time, takeover after the holder
//! stops renewing, immediate takeover after a release, and a holder that notices losing the lease.
//! Needs the `TLO_*` variables (see `hack/tools.sh`); fails without them.
//!
//! Timing: assertions are about the order of events and generous upper bounds, with a few
//! lower bounds far below the expected values, because the test machine may be busy.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::PostParams;
use tasklist_operator::leader::{LeaderElector, LeaseSettings};
use testsupport::controlplane::ControlPlane;
use testsupport::tools::Tools;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// Short durations, so that expiry happens within seconds.
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY_PERIOD: Duration = Duration::from_millis(500);
/// Bound on anything expected to happen within a few retry periods; generous for a busy machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_on_a_real_control_plane() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("tasklist_operator::leader=debug")
        .with_test_writer()
        .try_init();
    let tools = Tools::from_env()?;
    let mut control_plane = ControlPlane::start(&tools).await?;
    let namespace = control_plane.create_namespace("lease").await?;
    // Each scenario competes for its own lease, so that none depends on what an earlier one left.
    only_one_holder_while_it_renews(&control_plane, &namespace)
        .await
        .context("scenario: only one holder while it renews")?;
    standby_takes_over_when_the_holder_stops_renewing(&control_plane, &namespace)
        .await
        .context("scenario: a standby takes over when the holder stops renewing")?;
    standby_takes_over_at_once_after_release(&control_plane, &namespace)
        .await
        .context("scenario: a standby takes over at once after a release")?;
    holder_notices_when_someone_else_takes_the_lease(&control_plane, &namespace)
        .await
        .context("scenario: the holder notices when someone else takes the lease")?;
    restarted_holder_takes_its_own_lease_at_once(&control_plane, &namespace)
        .await
        .context("scenario: a restarted holder takes its own lease at once")?;
    // Last: it stops the API server.
    holder_gives_up_when_it_cannot_renew(&mut control_plane, &namespace)
        .await
        .context("scenario: the holder gives up when it cannot renew")?;
    Ok(())
}

/// A acquires and keeps renewing; B waits well past the lease duration without getting it,
/// which it would if A's renewals did not reach the API server.
async fn only_one_holder_while_it_renews(control_plane: &ControlPlane, namespace: &str) -> anyhow::Result<()> {
    let lease_name = "exclusive";
    let a = elector(control_plane, namespace, lease_name, "a", LEASE_DURATION);
    let b = elector(control_plane, namespace, lease_name, "b", LEASE_DURATION);
    timeout(PATIENCE, a.acquire()).await.context("A did not acquire a free lease")?;
    let a_holding = spawn_hold(a);

    let waited = LEASE_DURATION * 2;
    ensure!(
        timeout(waited, b.acquire()).await.is_err(),
        "B acquired the lease while A held and renewed it"
    );
    ensure!(!a_holding.is_finished(), "A lost leadership although nobody else held the lease");
    let spec = lease_spec(control_plane, namespace, lease_name).await?;
    ensure!(
        spec.holder_identity.as_deref() == Some("a"),
        "holder is {:?}, not A",
        spec.holder_identity
    );
    a_holding.abort();
    Ok(())
}

/// A stops renewing (its `hold` is aborted, as when the process freezes or dies); B, already
/// waiting, takes over about one lease duration later, and counts a transition.
async fn standby_takes_over_when_the_holder_stops_renewing(control_plane: &ControlPlane, namespace: &str) -> anyhow::Result<()> {
    let lease_name = "takeover";
    let a = elector(control_plane, namespace, lease_name, "a", LEASE_DURATION);
    let b = elector(control_plane, namespace, lease_name, "b", LEASE_DURATION);
    timeout(PATIENCE, a.acquire()).await.context("A did not acquire a free lease")?;
    let a_holding = spawn_hold(a);
    let b_acquiring = spawn_acquire(b);

    // B has been looking for a while: it must still be waiting.
    sleep(RETRY_PERIOD * 3).await;
    ensure!(!b_acquiring.is_finished(), "B acquired the lease while A renewed it");

    a_holding.abort();
    let a_stopped = Instant::now();
    timeout(PATIENCE, b_acquiring)
        .await
        .context("B did not take over after A stopped renewing")??;
    let took = a_stopped.elapsed();
    // B waits for expiry: nearly a lease duration after A's last renewal, which was at most
    // one retry period (plus a request) before the abort.
    ensure!(
        took >= Duration::from_secs(1),
        "B took over {took:?} after A stopped: it did not wait for the lease to expire"
    );
    ensure!(
        took <= LEASE_DURATION * 4,
        "B took {took:?} to take over, far more than one lease duration ({LEASE_DURATION:?})"
    );

    let spec = lease_spec(control_plane, namespace, lease_name).await?;
    ensure!(
        spec.holder_identity.as_deref() == Some("b"),
        "holder is {:?}, not B",
        spec.holder_identity
    );
    ensure!(
        spec.lease_transitions == Some(1),
        "leaseTransitions is {:?}, expected 1 (A to B)",
        spec.lease_transitions
    );
    Ok(())
}

/// A releases on shutdown; B, already waiting, takes over within a few retry periods, far
/// sooner than the (here long) lease duration.
async fn standby_takes_over_at_once_after_release(control_plane: &ControlPlane, namespace: &str) -> anyhow::Result<()> {
    let lease_name = "release";
    let long_lease = Duration::from_secs(60);
    let a = elector(control_plane, namespace, lease_name, "a", long_lease);
    let b = elector(control_plane, namespace, lease_name, "b", long_lease);
    timeout(PATIENCE, a.acquire()).await.context("A did not acquire a free lease")?;
    let b_acquiring = spawn_acquire(b);
    sleep(RETRY_PERIOD * 3).await;
    ensure!(!b_acquiring.is_finished(), "B acquired the lease while A held it");

    let released = Instant::now();
    a.release().await;
    timeout(long_lease / 2, b_acquiring)
        .await
        .context("B did not take over within half the lease duration after A released it")??;
    eprintln!("B took over {:?} after A began to release", released.elapsed());

    let spec = lease_spec(control_plane, namespace, lease_name).await?;
    ensure!(
        spec.holder_identity.as_deref() == Some("b"),
        "holder is {:?}, not B",
        spec.holder_identity
    );
    // A no longer holds the lease: its `hold` must say so at once.
    timeout(PATIENCE, a.hold())
        .await
        .context("A's hold() did not resolve after A released the lease")?;
    Ok(())
}

/// Someone overwrites the lease while A holds it: A's `hold` resolves, and A's `release`
/// afterwards leaves the new holder alone.
async fn holder_notices_when_someone_else_takes_the_lease(control_plane: &ControlPlane, namespace: &str) -> anyhow::Result<()> {
    let lease_name = "intrusion";
    let a = std::sync::Arc::new(elector(control_plane, namespace, lease_name, "a", LEASE_DURATION));
    timeout(PATIENCE, a.acquire()).await.context("A did not acquire a free lease")?;
    let a_holding = {
        let a = a.clone();
        tokio::spawn(async move { a.hold().await })
    };
    sleep(RETRY_PERIOD * 3).await;
    ensure!(!a_holding.is_finished(), "A lost leadership before anyone else touched the lease");

    let leases: Api<Lease> = Api::namespaced(control_plane.client(), namespace);
    let mut lease = leases.get(lease_name).await?;
    let spec = lease.spec.get_or_insert_default();
    spec.holder_identity = Some("intruder".into());
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    // The update may race with one of A's renewals; then read again and retry.
    let mut attempts = 0;
    while let Err(error) = leases.replace(lease_name, &PostParams::default(), &lease).await {
        attempts += 1;
        if attempts >= 10 {
            bail!("cannot overwrite the lease: {error}");
        }
        lease = leases.get(lease_name).await?;
        let spec = lease.spec.get_or_insert_default();
        spec.holder_identity = Some("intruder".into());
        spec.renew_time = Some(MicroTime(Timestamp::now()));
    }

    timeout(PATIENCE, a_holding)
        .await
        .context("A's hold() did not resolve after the lease was taken")??;
    a.release().await;
    let spec = lease_spec(control_plane, namespace, lease_name).await?;
    ensure!(
        spec.holder_identity.as_deref() == Some("intruder"),
        "A overwrote the lease taken from it: holder is {:?}",
        spec.holder_identity
    );
    Ok(())
}

/// A restarted container keeps its pod name: the same identity takes its own unexpired lease
/// without waiting for it to expire.
async fn restarted_holder_takes_its_own_lease_at_once(control_plane: &ControlPlane, namespace: &str) -> anyhow::Result<()> {
    let lease_name = "restart";
    let long_lease = Duration::from_secs(60);
    let before_restart = elector(control_plane, namespace, lease_name, "a", long_lease);
    timeout(PATIENCE, before_restart.acquire())
        .await
        .context("A did not acquire a free lease")?;
    drop(before_restart);
    let after_restart = elector(control_plane, namespace, lease_name, "a", long_lease);
    timeout(long_lease / 2, after_restart.acquire())
        .await
        .context("the restarted A waited for its own lease to expire")?;
    let spec = lease_spec(control_plane, namespace, lease_name).await?;
    ensure!(
        spec.lease_transitions == Some(0),
        "taking one's own lease again counted as a transition: {:?}",
        spec.lease_transitions
    );
    Ok(())
}

fn elector(control_plane: &ControlPlane, namespace: &str, lease_name: &str, identity: &str, lease_duration: Duration) -> LeaderElector {
    let settings = LeaseSettings {
        lease_duration,
        renew_deadline: RENEW_DEADLINE,
        retry_period: RETRY_PERIOD,
        ..LeaseSettings::new(namespace, lease_name, identity)
    };
    // A client of its own, as a separate process would have.
    LeaderElector::new(control_plane.client(), settings)
}

fn spawn_hold(elector: LeaderElector) -> JoinHandle<()> {
    tokio::spawn(async move { elector.hold().await })
}

fn spawn_acquire(elector: LeaderElector) -> JoinHandle<()> {
    tokio::spawn(async move { elector.acquire().await })
}

async fn lease_spec(
    control_plane: &ControlPlane,
    namespace: &str,
    lease_name: &str,
) -> anyhow::Result<k8s_openapi::api::coordination::v1::LeaseSpec> {
    let lease = Api::<Lease>::namespaced(control_plane.client(), namespace)
        .get(lease_name)
        .await
        .with_context(|| format!("cannot read lease {namespace}/{lease_name}"))?;
    lease.spec.context("the lease has no spec")
}

/// The API server goes away while A holds the lease: A's `hold` resolves once no renewal
/// succeeded within the renew deadline, before a standby could take the lease over.
///
/// Measured against A's last successful renewal as the API server stored it (the Lease's
/// `renewTime`, read back after the restart): A must give up within the renew deadline
/// plus one retry period of it, which is shorter than the lease duration. Giving up only
/// after the lease expired would let a standby lead while A still does (split brain).
async fn holder_gives_up_when_it_cannot_renew(control_plane: &mut ControlPlane, namespace: &str) -> anyhow::Result<()> {
    let lease_name = "outage";
    let a = elector(control_plane, namespace, lease_name, "a", LEASE_DURATION);
    timeout(PATIENCE, a.acquire()).await.context("A did not acquire a free lease")?;
    let a_holding = tokio::spawn(async move {
        a.hold().await;
        Timestamp::now()
    });
    sleep(RETRY_PERIOD * 3).await;
    ensure!(!a_holding.is_finished(), "A lost leadership while the API server was up");

    control_plane.stop_apiserver().await?;
    let gave_up_at = timeout(PATIENCE, a_holding)
        .await
        .context("A's hold() did not resolve while the API server was down")??;
    control_plane.start_apiserver().await?;
    let last_renewal = lease_spec(control_plane, namespace, lease_name)
        .await?
        .renew_time
        .context("the lease has no renewTime")?
        .0;
    let held_on = gave_up_at.duration_since(last_renewal).unsigned_abs();
    let bound = RENEW_DEADLINE + RETRY_PERIOD;
    ensure!(
        bound < LEASE_DURATION,
        "the test's settings allow no bound: renew deadline + retry period must be shorter than the lease"
    );
    ensure!(
        gave_up_at > last_renewal && held_on <= bound,
        "A gave up {held_on:?} after its last renewal ({last_renewal} -> {gave_up_at}); the bound is the renew \
         deadline plus the retry period, {bound:?} (a standby may take over after {LEASE_DURATION:?})"
    );
    println!("leader election: A gave up {held_on:?} after its last renewal (bound {bound:?})");
    Ok(())
}
