//! The scenarios of the node tests (issue 9): install, what the application sees, high
//! availability, upgrade and uninstall, restart inside the Pod.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures::future::LocalBoxFuture;

use crate::consumer;
use crate::world::{self, World, pod_ready, restarts, wait_for};

pub type ScenarioFn = fn(Arc<World>) -> LocalBoxFuture<'static, anyhow::Result<()>>;

pub fn all() -> Vec<(&'static str, ScenarioFn)> {
    vec![
        // The longest first, so that the others run while it measures.
        ("node::consumer_pod_reads_the_mounted_secret_through_refreshes", |w| {
            Box::pin(consumer::reads_the_mounted_secret_through_refreshes(w))
        }),
        ("node::install_in_a_restricted_namespace_then_restart_inside_the_pod", |w| {
            Box::pin(install_then_restart(w))
        }),
        ("node::ha_leader_pod_deleted_the_standby_takes_over", |w| {
            Box::pin(ha_leader_pod_deleted(w))
        }),
        ("node::upgrade_rolls_without_losing_ready_and_uninstall_keeps_the_crd", |w| {
            Box::pin(upgrade_then_uninstall(w))
        }),
        ("node::a_wrong_pull_secret_shows_err_image_pull_and_the_notes_say_why", |w| {
            Box::pin(wrong_pull_secret(w))
        }),
    ]
}

/// Scenarios 1 and 5: the README's install commands, run as written (the chart from the
/// registry, the image pulled `Always` with a pull secret), into a namespace that enforces
/// the restricted Pod Security Standard, watching only it; the Pod is admitted, Running and
/// Ready (the kubelet runs the chart's probes), reconciles a connection to Ready, and the
/// chart's `kubectl logs` hint shows its log. Then the container's process is killed: the
/// kubelet restarts it, and the restarted operator reuses the stored credential.
async fn install_then_restart(world: Arc<World>) -> anyhow::Result<()> {
    // The README's namespace and release.
    let namespace = "tasklist-operator".to_owned();
    let release = "tasklist-operator";
    world.restricted_namespace_named(&namespace).await?;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))?;
    let commands = testsupport::readme::shell_commands_after(&readme, world::README_INSTALL_MARKER)?;
    ensure!(
        commands.last().is_some_and(|last| last.starts_with("helm install ")),
        "the README's install commands do not end with `helm install`: {commands:?}"
    );
    let started = Instant::now();
    let mut notes = String::new();
    for (index, command) in commands.iter().enumerate() {
        // The other scenarios' connections are not this operator's business; the stand-ins on
        // the node's bridge speak plain http, which the operator refuses by default; and the
        // test waits for the Deployment as a user would watch it.
        let command = if index + 1 == commands.len() {
            format!("{command} --set 'watchNamespaces={{{namespace}}}' --set policy.allowHttp=true --wait --timeout 120s")
        } else {
            command.clone()
        };
        notes = world.readme_command(&command).await?;
    }
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
        "README's pull secret + helm install oci:// --wait to a Ready operator Pod: {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let image_id = pod
        .status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .and_then(|statuses| statuses.first())
        .map(|status| status.image_id.clone())
        .unwrap_or_default();
    ensure!(
        image_id.ends_with(&world.published.image_digest),
        "the operator container runs {image_id}, not the pushed image {}",
        world.published.image_digest
    );
    for pulled in world.pull_events(&namespace).await? {
        world.figure(format!("kubelet: {pulled}"));
    }

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
    world.node().kill_container_process(&container_id)?;
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

/// Scenario 3: with `replicaCount: 2`, the leader Pod is deleted with `--grace-period=0`; the
/// other Pod takes over, refreshes on time, and no credential expires meanwhile.
async fn ha_leader_pod_deleted(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.restricted_namespace("node-ha").await?;
    let release = "tlo-ha";
    world.install(release, &namespace, &["--set", "replicaCount=2"]).await?;
    let standin = world::node_standin().await?;
    // Short tokens, so that a refresh falls due soon after the failover.
    standin.set_token_lifetime(Duration::from_secs(40));
    world.create_connection(&namespace, "orders", &standin, None).await?;
    world.wait_connection_ready(&namespace, "orders", Duration::from_secs(60)).await?;

    let leases = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(world.client(), &namespace);
    let lease_name = format!("{release}-tasklist-operator");
    let holder = async || -> anyhow::Result<Option<String>> {
        let lease = leases.get_opt(&lease_name).await?;
        Ok(lease.and_then(|lease| lease.spec).and_then(|spec| spec.holder_identity))
    };
    let leader = holder().await?.context("no Lease holder although the connection is Ready")?;

    // Every half second until the end: does the derived Secret hold an unexpired token?
    let sampler = ExpirySampler::start(world.clone(), namespace.clone(), "orders-tasklist-auth".into());
    let deleted_at = std::time::SystemTime::now();
    let started = Instant::now();
    let (deleted, output) = world
        .kubectl(&["delete", "pod", &leader, "--namespace", &namespace, "--grace-period=0", "--force"])
        .await?;
    ensure!(deleted, "kubectl delete pod {leader} failed:\n{output}");
    wait_for("the standby taking the Lease", Duration::from_secs(60), async || {
        Ok(holder().await?.is_some_and(|holder| holder != leader))
    })
    .await?;
    let takeover = started.elapsed();
    wait_for("the next token request after the failover", Duration::from_secs(90), async || {
        Ok(standin.token_requests().iter().any(|request| request.time > deleted_at))
    })
    .await?;
    let next_refresh = started.elapsed();
    world.wait_connection_ready(&namespace, "orders", Duration::from_secs(30)).await?;
    let (samples, expired) = sampler.stop().await;
    world.figure(format!(
        "HA (2 replicas, 40 s tokens): leader Pod deleted with --grace-period=0; standby holds the Lease after {:.1} s, next refresh after {:.1} s; {expired} of {samples} Secret samples held an expired token",
        takeover.as_secs_f64(),
        next_refresh.as_secs_f64()
    ));
    ensure!(samples > 10, "only {samples} Secret samples were taken");
    ensure!(
        expired == 0,
        "{expired} of {samples} samples of the derived Secret held an expired token"
    );
    Ok(())
}

/// Scenario 4: `helm upgrade` that changes a value rolls the Deployment without the
/// connection ever leaving Ready; `helm uninstall` removes everything but the CRD.
async fn upgrade_then_uninstall(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.restricted_namespace("node-upgrade").await?;
    let release = "tlo-upgrade";
    world.install(release, &namespace, &[]).await?;
    let standin = world::node_standin().await?;
    world.create_connection(&namespace, "orders", &standin, None).await?;
    world.wait_connection_ready(&namespace, "orders", Duration::from_secs(60)).await?;
    let old_pods: Vec<String> = world
        .release_pods(&namespace, release)
        .await?
        .into_iter()
        .filter_map(|pod| pod.metadata.name)
        .collect();

    let ready_sampler = ReadySampler::start(world.clone(), namespace.clone(), "orders".into());
    let chart = world.chart_reference();
    let ca_file = world.published.ca_file.display().to_string();
    world
        .helm(&[
            "upgrade",
            release,
            &chart,
            "--version",
            &world.published.chart_version,
            "--ca-file",
            &ca_file,
            "--namespace",
            &namespace,
            "--reuse-values",
            "--set",
            "logLevel=debug",
            "--wait",
            "--timeout",
            "180s",
        ])
        .await?;
    let pods = world.release_pods(&namespace, release).await?;
    let new_pods: Vec<_> = pods
        .iter()
        .filter(|pod| pod.metadata.name.as_ref().is_some_and(|name| !old_pods.contains(name)))
        .collect();
    ensure!(
        new_pods.len() == 1 && pod_ready(new_pods[0]),
        "after the upgrade, expected one new Ready Pod, found {} new of {}",
        new_pods.len(),
        pods.len()
    );
    let rust_log = new_pods[0]
        .spec
        .as_ref()
        .and_then(|spec| spec.containers.first())
        .and_then(|container| container.env.as_ref())
        .and_then(|env| env.iter().find(|var| var.name == "RUST_LOG"))
        .and_then(|var| var.value.clone());
    ensure!(
        rust_log.as_deref() == Some("debug"),
        "the new Pod has RUST_LOG={rust_log:?}, not the upgraded value"
    );
    // Let the new operator reconcile (it probes on start) while the sampler keeps watching.
    let requests_before = standin.api_requests().len();
    wait_for("the upgraded operator probing Tasklist", Duration::from_secs(60), async || {
        Ok(standin.api_requests().len() > requests_before)
    })
    .await?;
    let (samples, not_ready) = ready_sampler.stop().await;
    ensure!(samples > 5, "only {samples} samples of the connection were taken");
    ensure!(
        not_ready == 0,
        "the connection was not Ready in {not_ready} of {samples} samples during the upgrade"
    );

    world.helm(&["uninstall", release, "--namespace", &namespace, "--wait"]).await?;
    let selector = format!("app.kubernetes.io/instance={release}");
    let (listed, left) = world
        .kubectl(&[
            "get",
            "deployments,replicasets,services,serviceaccounts,roles,rolebindings,configmaps,secrets",
            "--namespace",
            &namespace,
            "--selector",
            &selector,
            "--output",
            "name",
        ])
        .await?;
    ensure!(listed, "kubectl get failed:\n{left}");
    ensure!(
        left.trim().is_empty() || left.contains("No resources found"),
        "helm uninstall left:\n{left}"
    );
    wait_for("the operator Pods to go", Duration::from_secs(60), async || {
        Ok(world.release_pods(&namespace, release).await?.is_empty())
    })
    .await?;
    let crds =
        kube::Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(world.client());
    ensure!(
        crds.get_opt("tasklistconnections.tasklist.camunda.community").await?.is_some(),
        "helm uninstall removed the CRD"
    );
    Ok(())
}

/// A pull secret with a wrong password: the registry refuses the kubelet's pull, the Pod
/// waits in `ErrImagePull` or `ImagePullBackOff`, and the command the chart's notes give for
/// that case shows the registry's 401 in the kubelet's Events.
async fn wrong_pull_secret(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.restricted_namespace("node-pull").await?;
    let release = "tlo-pull";
    world.create_pull_secret(&namespace, "not-the-registry-password").await?;
    let notes = world.install_without_waiting(release, &namespace, &[]).await?;

    let mut waiting = None;
    wait_for("the operator Pod to wait for its image", Duration::from_secs(90), async || {
        let pods = world.release_pods(&namespace, release).await?;
        waiting = pods
            .iter()
            .filter_map(|pod| {
                pod.status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()?
                    .state
                    .as_ref()?
                    .waiting
                    .clone()
            })
            .find(|waiting| matches!(waiting.reason.as_deref(), Some("ErrImagePull" | "ImagePullBackOff")));
        Ok(waiting.is_some())
    })
    .await?;
    let reason = waiting.and_then(|waiting| waiting.reason).unwrap_or_default();
    world.figure(format!("wrong pull secret: the operator Pod waits in {reason}"));

    // The hint the notes give for a Pod stuck pulling, run as printed.
    ensure!(
        notes.contains("ErrImagePull or ImagePullBackOff") && notes.contains("401 Unauthorized"),
        "the chart's notes do not explain a failing image pull:\n{notes}"
    );
    let hint = notes
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("kubectl") && line.contains(" describe pods "))
        .with_context(|| format!("the chart's notes have no `kubectl ... describe pods` hint:\n{notes}"))?;
    let args: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let (success, described) = world.kubectl(&args).await?;
    ensure!(success, "`{hint}` failed:\n{described}");
    ensure!(
        described.contains("401 Unauthorized") && described.contains(&world.published.registry),
        "`{hint}` does not show the registry's refusal:\n{described}"
    );
    world.helm(&["uninstall", release, "--namespace", &namespace]).await?;
    Ok(())
}

/// Samples the derived Secret every 500 ms in the background: how many samples, and in how
/// many the stored token had expired.
struct ExpirySampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(usize, usize)>,
}

impl ExpirySampler {
    fn start(world: Arc<World>, namespace: String, secret: String) -> ExpirySampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut samples, mut expired) = (0, 0);
            while stopped.try_recv().is_err() {
                if let Ok(Some(data)) = world.derived_secret(&namespace, &secret).await
                    && let Some(expires_at) = data.get("expiresAt").and_then(|value| value.parse::<jiff::Timestamp>().ok())
                {
                    samples += 1;
                    if expires_at <= jiff::Timestamp::now() {
                        expired += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (samples, expired)
        });
        ExpirySampler { stop, task }
    }

    async fn stop(self) -> (usize, usize) {
        let _ = self.stop.send(());
        self.task.await.unwrap_or((0, usize::MAX))
    }
}

/// Samples a connection's Ready condition every 500 ms: how many samples, how many not Ready.
struct ReadySampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(usize, usize)>,
}

impl ReadySampler {
    fn start(world: Arc<World>, namespace: String, name: String) -> ReadySampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut samples, mut not_ready) = (0, 0);
            while stopped.try_recv().is_err() {
                if let Ok(ready) = world.connection_ready(&namespace, &name).await {
                    samples += 1;
                    if !ready {
                        not_ready += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (samples, not_ready)
        });
        ReadySampler { stop, task }
    }

    async fn stop(self) -> (usize, usize) {
        let _ = self.stop.send(());
        self.task.await.unwrap_or((0, usize::MAX))
    }
}
