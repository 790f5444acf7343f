//! The scenarios of the node tests (issue 9): install, what the application sees, high
//! availability, upgrade and uninstall, restart inside the Pod.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures::future::LocalBoxFuture;

use crate::world::{self, World, pod_ready, restarts, wait_for};

pub type ScenarioFn = fn(Arc<World>) -> LocalBoxFuture<'static, anyhow::Result<()>>;

pub fn all() -> Vec<(&'static str, ScenarioFn)> {
    vec![("node::install_in_a_restricted_namespace_then_restart_inside_the_pod", |w| {
        Box::pin(install_then_restart(w))
    })]
}

/// Scenarios 1 and 5: `helm install` with the offline image into a namespace that enforces
/// the restricted Pod Security Standard; the Pod is admitted, Running and Ready (the kubelet
/// runs the chart's probes), reconciles a connection to Ready, and the chart's `kubectl
/// logs` hint shows its log. Then the container's process is killed: the kubelet restarts
/// it, and the restarted operator reuses the stored credential.
async fn install_then_restart(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.restricted_namespace("node-install").await?;
    let release = "tlo-install";
    let started = Instant::now();
    let notes = world.install(release, &namespace, &[]).await?;
    let pods = world.release_pods(&namespace, release).await?;
    ensure!(pods.len() == 1, "expected one operator Pod, found {}", pods.len());
    let pod = &pods[0];
    let pod_name = pod.metadata.name.clone().context("a Pod without a name")?;
    ensure!(
        pod_ready(pod),
        "helm --wait returned, but Pod {pod_name} is not Running and Ready: {:?}",
        pod.status
    );
    world.figure(format!(
        "helm install --wait to a Ready operator Pod: {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    let standin = world::node_standin().await?;
    world.create_connection(&namespace, "orders", &standin, None).await?;
    world.wait_connection_ready(&namespace, "orders", Duration::from_secs(60)).await?;

    // The hint the chart's notes end with, run as printed.
    let hint = notes
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("kubectl") && line.contains(" logs "))
        .with_context(|| format!("the chart's notes have no `kubectl ... logs` hint:\n{notes}"))?;
    let args: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let (success, logs) = world.kubectl(&args).await?;
    ensure!(success, "`{hint}` failed:\n{logs}");
    ensure!(
        logs.contains(&format!("{namespace}/orders")),
        "`{hint}` does not show the operator's log about the connection:\n{logs}"
    );
    ensure!(!logs.contains(world::CLIENT_SECRET), "the operator's log holds the client secret");

    // Scenario 5: kill the container's process from outside, as an OOM kill would.
    let token_requests_before = standin.token_requests().len();
    let container_id = pod
        .status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .and_then(|statuses| statuses.first())
        .and_then(|status| status.container_id.as_deref())
        .and_then(|id| id.strip_prefix("containerd://"))
        .context("the operator container has no containerd id")?
        .to_owned();
    world.node.kill_container_process(&container_id)?;
    let killed_at = Instant::now();
    wait_for(
        "the kubelet restarting the operator container",
        Duration::from_secs(120),
        async || {
            let pods = world.release_pods(&namespace, release).await?;
            Ok(pods.iter().any(|pod| restarts(pod) == 1 && pod_ready(pod)))
        },
    )
    .await?;
    world.figure(format!(
        "operator process killed inside its Pod: restarted and Ready again after {:.1} s",
        killed_at.elapsed().as_secs_f64()
    ));
    // The restarted operator has reconciled (the probe ran again) without a new token.
    let probes_before = standin.api_requests().len();
    wait_for("the restarted operator probing Tasklist", Duration::from_secs(60), async || {
        Ok(standin.api_requests().len() > probes_before)
    })
    .await?;
    world.wait_connection_ready(&namespace, "orders", Duration::from_secs(10)).await?;
    ensure!(
        standin.token_requests().len() == token_requests_before,
        "the restarted operator requested {} new token(s) instead of reusing the stored one",
        standin.token_requests().len() - token_requests_before
    );
    Ok(())
}
