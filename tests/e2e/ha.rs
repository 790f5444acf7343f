//! High availability: two operator processes with leader election against one control plane.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use tasklist_operator::crd::REFRESH_ANNOTATION;
use testsupport::operator::OperatorProcess;

use crate::ScenarioFn;
use crate::scenario::{Scenario, World, start_operator_with, tail, wait_until};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        ha:
        only_the_leader_reconciles_and_a_standby_takes_over,
    ]
}

fn start_replica(world: &World, namespace: &str, identity: &str) -> anyhow::Result<OperatorProcess> {
    let leader_election = [
        "--leader-election",
        "--leader-election-namespace",
        namespace,
        "--leader-election-identity",
        identity,
    ];
    start_operator_with(world.control_plane.kubeconfig(), namespace, &leader_election, &[])
}

async fn only_the_leader_reconciles_and_a_standby_takes_over(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("ha").await?;
    let first = start_replica(&world, &namespace, "replica-a")?;
    let mut s = Scenario::with_operator(&world, &namespace, world.control_plane.kubeconfig(), first).await?;
    s.add_saas_client("ha-secret-1").await?;

    // Let the first replica take the lease before the second starts: the order is then known.
    wait_until("replica-a acquiring the lease", Duration::from_secs(30), || {
        s.operator.logs().contains("acquired leadership")
    })
    .await
    .with_context(|| tail(&s.operator.logs(), 30))?;
    let mut second = start_replica(&world, &namespace, "replica-b")?;

    s.apply_connection("orders", s.saas_spec()).await?;
    let issued = s
        .wait_for_secret(SECRET, "holding a token", Duration::from_secs(30), |data| {
            data.contains_key("token")
        })
        .await
        .context("the leader did not issue a token")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        s.operator.logs().contains("stored a new credential"),
        "the leader did not reconcile"
    );
    ensure!(
        !second.logs().contains("stored a new credential"),
        "the standby reconciled too:\n{}",
        tail(&second.logs(), 30)
    );
    ensure!(
        s.standin.token_requests().len() == 1,
        "expected one token request, saw {}",
        s.standin.token_requests().len()
    );

    // The leader dies without releasing the lease; the standby takes over once it expires (15 s).
    s.operator.kill();
    let killed_at = Instant::now();
    s.annotate_connection("orders", REFRESH_ANNOTATION, "after-failover").await?;
    s.wait_for_secret(SECRET, "holding a new token", Duration::from_secs(60), |data| {
        data.get("token").is_some_and(|token| *token != issued["token"])
    })
    .await
    .with_context(|| format!("the standby did not take over:\n{}", tail(&second.logs(), 30)))?;
    eprintln!(
        "ha: the standby took over and refreshed {:.1} s after the leader was killed",
        killed_at.elapsed().as_secs_f64()
    );
    ensure!(
        second.logs().contains("acquired leadership"),
        "replica-b reconciled without the lease"
    );
    second.terminate(Duration::from_secs(5)).await?;
    // Both replicas' logs go through the leak check after the scenario.
    s.watch_logs_of(&second);
    Ok(())
}

const SECRET: &str = "orders-tasklist-auth";
