//! Scenario 2: what an application Pod sees. A consumer Pod mounts the derived Secret as a
//! volume and, every second, calls the stand-in Tasklist with the credential it reads from
//! the file, while the operator refreshes the credential several times.
//!
//! The stand-in records every call with the `exp` of the token it carried, and the test
//! records when each new token reached the Secret. From those come the figures: calls
//! refused because the file still held an expired token, and the delay from a Secret update
//! to the first call made with the new token or a later one (the kubelet's propagation delay,
//! to within the consumer's one-second period; when refreshes come faster than the kubelet
//! syncs, the file skips tokens).
//!
//! The kubelet refreshes Secret volumes when it syncs the Pod: every `syncFrequency` (1 min,
//! left at its default here) plus up to 50 % jitter. A token that is replaced less than that
//! before it expires can therefore reach the file too late.
//!
//! In the same run a second consumer Pod opts in to the nudge (issue 21, docs/nudge.md): it
//! carries the label `tasklist.camunda.community/nudge: "true"` and mounts the Secret of a
//! second connection, annotated `tasklist.camunda.community/all-consumers-nudged: "true"` and
//! without `refreshBefore`, so that the refresh rule leaves only `--nudged-secret-volume-delay`
//! (15 s) before expiry. The operator (chart value `nudge.enabled=true`) changes one
//! annotation on that Pod after each write, the kubelet syncs the Pod at once, and the file
//! follows within seconds: none of its calls may be refused for an expired token.
//!
//! Defaults (for `make test`): 60 s tokens, `refreshBefore: 30s` (what the refresh rule gives
//! a 60 s token: half its lifetime), 5 refreshes. `make soak` runs a real Keycloak's 300 s
//! tokens with `refreshBefore: 120s`. Override with TLO_NODE_CONSUMER_KEYCLOAK (1: tokens
//! from Keycloak), TLO_NODE_CONSUMER_TOKEN_SECONDS, TLO_NODE_CONSUMER_REFRESH_BEFORE_SECONDS
//! and TLO_NODE_CONSUMER_CYCLES.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tasklist_operator::crd::TasklistConnection;
use tasklist_operator::nudge::{ALL_CONSUMERS_NUDGED_ANNOTATION, CREDENTIAL_VERSION_ANNOTATION, NUDGE_LABEL};
use testsupport::node::NODE_IP;

use testsupport::propagation::{Update, analyse};

use crate::world::{self, CONSUMER_IMAGE, CONSUMER_PROGRAM, World, pod_ready, wait_for};

/// The path the consumer calls; the operator's probe uses another, so the two never mix.
const CONSUMER_PATH: &str = "/v1/tasks/consumer/variables/search";
/// The nudged consumer's connection, its derived Secret, and the task id of its calls.
const NUDGED_CONNECTION: &str = "nudged";
const NUDGED_SECRET: &str = "nudged-tasklist-auth";
const NUDGED_TASK: &str = "nudged";
const NUDGED_PATH: &str = "/v1/tasks/nudged/variables/search";
/// The bar: the nudged consumer makes at least this many calls, none refused.
const MIN_NUDGED_CALLS: usize = 150;
/// The longest the kubelet should take to refresh a Secret volume: syncFrequency (60 s) plus
/// its 50 % jitter, plus a few seconds for the write and the consumer's period.
const KUBELET_PROPAGATION_BOUND: Duration = Duration::from_secs(95);

fn setting(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value.parse().with_context(|| format!("{name}={value} is not a number")),
        Err(_) => Ok(default),
    }
}

pub async fn reads_the_mounted_secret_through_refreshes(world: Arc<World>) -> anyhow::Result<()> {
    // With TLO_NODE_CONSUMER_KEYCLOAK=1 the tokens come from a real Keycloak (its default
    // lifetime, 300 s) instead of the stand-in's token endpoint.
    let with_keycloak = std::env::var("TLO_NODE_CONSUMER_KEYCLOAK").is_ok_and(|value| value == "1");
    let token_seconds = setting("TLO_NODE_CONSUMER_TOKEN_SECONDS", if with_keycloak { 300 } else { 60 })?;
    let margin_seconds = setting("TLO_NODE_CONSUMER_REFRESH_BEFORE_SECONDS", token_seconds / 2)?;
    let cycles = setting("TLO_NODE_CONSUMER_CYCLES", 5)? as usize;

    let namespace = world.restricted_namespace("node-consumer").await?;
    let release = "tlo-consumer";
    world.install(release, &namespace, &["--set", "nudge.enabled=true"]).await?;
    let standin = world::node_standin().await?;
    let refresh_before = format!("{margin_seconds}s");
    // Kept until the end of the scenario: the operator refreshes from it.
    let mut keycloak = None;
    if with_keycloak {
        let started = testsupport::keycloak::Keycloak::start_on(&world.tools, std::net::Ipv4Addr::UNSPECIFIED)
            .await
            .context("starting Keycloak on the node's address")?;
        if token_seconds != 300 {
            started.set_access_token_lifespan(u32::try_from(token_seconds)?).await?;
        }
        standin.trust_jwks(&started.jwks_url());
        let oauth2 = serde_json::json!({"tokenUrl": started.token_url_at(NODE_IP), "audience": "tasklist-api", "clientSecretRef": {"name": "client"}});
        for (name, refresh_before) in [("orders", Some(refresh_before.as_str())), (NUDGED_CONNECTION, None)] {
            let client = (started.client_id(), started.client_secret());
            world
                .create_oauth2_connection(&namespace, name, &standin.url(), oauth2.clone(), client, refresh_before)
                .await?;
        }
        keycloak = Some(started);
    } else {
        standin.set_token_lifetime(Duration::from_secs(token_seconds));
        world
            .create_connection(&namespace, "orders", &standin, Some(&refresh_before))
            .await?;
        world.create_connection(&namespace, NUDGED_CONNECTION, &standin, None).await?;
    }
    // Every Pod that mounts this connection's Secret is nudged: the short margin applies.
    let connections = Api::<TasklistConnection>::namespaced(world.client(), &namespace);
    let all_nudged = serde_json::json!({"metadata": {"annotations": {ALL_CONSUMERS_NUDGED_ANNOTATION: "true"}}});
    connections
        .patch(NUDGED_CONNECTION, &PatchParams::default(), &Patch::Merge(all_nudged))
        .await
        .context("annotating the nudged connection")?;
    world.wait_connection_ready(&namespace, "orders", Duration::from_secs(60)).await?;
    world
        .wait_connection_ready(&namespace, NUDGED_CONNECTION, Duration::from_secs(60))
        .await?;

    // Record every new token the Secrets receive, with the time the test saw it (polled
    // every 200 ms: the test's own delay is far below the kubelet's).
    let updates = SecretUpdates::start(world.clone(), namespace.clone(), "orders-tasklist-auth".into());
    let nudged_updates = SecretUpdates::start(world.clone(), namespace.clone(), NUDGED_SECRET.into());
    let port = standin.url().rsplit(':').next().context("the stand-in URL has no port")?.to_owned();
    let pods = Api::<Pod>::namespaced(world.client(), &namespace);
    pods.create(
        &PostParams::default(),
        &consumer_pod("consumer", "orders-tasklist-auth", "consumer", &port, false)?,
    )
    .await
    .context("creating the consumer Pod")?;
    pods.create(
        &PostParams::default(),
        &consumer_pod("consumer-nudged", NUDGED_SECRET, NUDGED_TASK, &port, true)?,
    )
    .await
    .context("creating the nudged consumer Pod")?;
    for name in ["consumer", "consumer-nudged"] {
        wait_for(&format!("the Pod {name} running"), Duration::from_secs(90), async || {
            Ok(pods.get_opt(name).await?.as_ref().is_some_and(pod_ready))
        })
        .await?;
    }
    wait_for("the consumers' first calls", Duration::from_secs(30), async || {
        Ok(calls_to(&standin, CONSUMER_PATH).next().is_some() && calls_to(&standin, NUDGED_PATH).next().is_some())
    })
    .await?;
    let consumer_started = SystemTime::now();
    let versions = AnnotationChanges::start(world.clone(), namespace.clone(), "consumer-nudged".into());

    // Run until `cycles` new tokens reached each Secret after the consumers started, and each
    // consumer has used the last of them (or the kubelet's bound has passed); and the nudged
    // consumer made its 150 calls.
    let deadline = Duration::from_secs(token_seconds * (cycles as u64 + 1)) + 2 * KUBELET_PROPAGATION_BOUND;
    let caught_up = |updates: &SecretUpdates, path: &str| {
        let seen = updates.after(consumer_started);
        let Some(last) = seen.get(cycles.saturating_sub(1)) else {
            return false;
        };
        let used = calls_to(&standin, path).any(|call| call.bearer_expires_at.is_some_and(|expires_at| expires_at >= last.expires_at));
        used || last.seen_at.elapsed().unwrap_or_default() > KUBELET_PROPAGATION_BOUND
    };
    wait_for(&format!("{cycles} refreshes reaching both consumers"), deadline, async || {
        Ok(caught_up(&updates, CONSUMER_PATH)
            && caught_up(&nudged_updates, NUDGED_PATH)
            && calls_to(&standin, NUDGED_PATH).count() >= MIN_NUDGED_CALLS)
    })
    .await?;
    let seen = updates.stop().await;
    let nudged_seen = nudged_updates.stop().await;
    let version_changes = versions.stop().await;

    let calls: Vec<_> = calls_to(&standin, CONSUMER_PATH).collect();
    let figures = analyse(&calls, &seen, consumer_started, cycles);
    let nudged_calls: Vec<_> = calls_to(&standin, NUDGED_PATH).collect();
    let nudged = analyse(&nudged_calls, &nudged_seen, consumer_started, cycles);
    drop(keycloak);
    let issuer = if with_keycloak { "Keycloak" } else { "stand-in" };
    world.figure(format!(
        "consumer Pod, {token_seconds} s tokens from the {issuer}, refreshBefore {margin_seconds}s, {cycles} refreshes: {} calls, {} refused for an expired token, {} refused otherwise; propagation Secret -> file p50 {:.1} s, p99 {:.1} s, max {:.1} s (n={})",
        figures.calls,
        figures.expired_refusals,
        figures.other_refusals,
        figures.propagation_p50.as_secs_f64(),
        figures.propagation_p99.as_secs_f64(),
        figures.propagation_max.as_secs_f64(),
        figures.propagations.len(),
    ));
    // Writes of the nudged Secret while its consumer ran, and the annotation changes seen on
    // the Pod meanwhile (polled every 200 ms): one patch per write.
    let nudged_writes = nudged_seen.iter().filter(|update| update.seen_at >= consumer_started).count();
    world.figure(format!(
        "nudged consumer Pod, same run, {token_seconds} s tokens, margin --nudged-secret-volume-delay (all consumers nudged), {cycles} refreshes: {} calls, {} refused for an expired token, {} refused otherwise; propagation Secret -> file p50 {:.1} s, p99 {:.1} s, max {:.1} s (n={}); Pod patches: {version_changes} for {nudged_writes} writes of its Secret (1 Pod)",
        nudged.calls,
        nudged.expired_refusals,
        nudged.other_refusals,
        nudged.propagation_p50.as_secs_f64(),
        nudged.propagation_p99.as_secs_f64(),
        nudged.propagation_max.as_secs_f64(),
        nudged.propagations.len(),
    ));

    // The nudged consumer: the bar.
    ensure!(
        nudged.calls >= MIN_NUDGED_CALLS,
        "the nudged consumer made only {} calls",
        nudged.calls
    );
    ensure!(
        nudged.expired_refusals == 0 && nudged.other_refusals == 0,
        "the nudged consumer had {} calls refused for an expired token and {} otherwise",
        nudged.expired_refusals,
        nudged.other_refusals
    );
    ensure!(nudged.unseen.is_empty(), "the nudged file never caught up with {:?}", nudged.unseen);
    ensure!(
        version_changes >= cycles && version_changes <= nudged_writes,
        "{version_changes} changes of the Pod's credential-version annotation for {nudged_writes} writes of its Secret: expected one per write"
    );
    let unnudged = pods.get("consumer").await?;
    ensure!(
        !unnudged.annotations().contains_key(CREDENTIAL_VERSION_ANNOTATION),
        "the consumer without the label was nudged"
    );

    // The consumer without the nudge: the kubelet's own sync.
    ensure!(figures.calls > 10, "the consumer made only {} calls", figures.calls);
    ensure!(
        figures.other_refusals == 0,
        "{} calls were refused although the token was not expired",
        figures.other_refusals
    );
    ensure!(
        figures.unseen.is_empty(),
        "the mounted file never caught up with these Secret updates (tokens expiring at {:?})",
        figures.unseen
    );
    ensure!(
        figures.propagation_max <= KUBELET_PROPAGATION_BOUND,
        "the kubelet took {:?} to update the file, more than its sync period and jitter allow",
        figures.propagation_max
    );
    // An expired token in the file can only come from a propagation longer than the margin.
    let margin = Duration::from_secs(margin_seconds);
    ensure!(
        figures.expired_refusals == 0 || figures.propagation_max > margin.saturating_sub(Duration::from_secs(token_seconds / 10 + 2)),
        "{} calls used an expired token although every new token reached the file within {:?} (margin {margin:?})",
        figures.expired_refusals,
        figures.propagation_max
    );
    // With a margin above the kubelet's bound, an application must never see an expired token.
    if margin >= KUBELET_PROPAGATION_BOUND {
        ensure!(
            figures.expired_refusals == 0,
            "{} calls used an expired token although the margin ({margin:?}) exceeds the kubelet's bound",
            figures.expired_refusals
        );
    }
    Ok(())
}

/// A consumer Pod reading `secret` from a mounted volume and calling task `task`; with
/// `nudged`, it opts in to the nudge with the label.
fn consumer_pod(name: &str, secret: &str, task: &str, port: &str, nudged: bool) -> anyhow::Result<Pod> {
    let labels = if nudged {
        serde_json::json!({NUDGE_LABEL: "true"})
    } else {
        serde_json::json!({})
    };
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "consumer",
                "image": CONSUMER_IMAGE,
                "imagePullPolicy": "Never",
                "command": [CONSUMER_PROGRAM, "/var/run/tasklist/authorization", NODE_IP.to_string(), port, task],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tasklist", "mountPath": "/var/run/tasklist", "readOnly": true}],
            }],
            "volumes": [{"name": "tasklist", "secret": {"secretName": secret}}],
        },
    }))?)
}

/// Polls a Pod every 200 ms and counts the changes of its credential-version annotation.
struct AnnotationChanges {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<usize>,
}

impl AnnotationChanges {
    fn start(world: Arc<World>, namespace: String, pod: String) -> AnnotationChanges {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let pods = Api::<Pod>::namespaced(world.client(), &namespace);
            let mut last: Option<Option<String>> = None;
            let mut changes = 0;
            while stopped.try_recv().is_err() {
                if let Ok(pod) = pods.get(&pod).await {
                    let version = pod.annotations().get(CREDENTIAL_VERSION_ANNOTATION).cloned();
                    if last.as_ref().is_some_and(|last| *last != version) {
                        changes += 1;
                    }
                    last = Some(version);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            changes
        });
        AnnotationChanges { stop, task }
    }

    async fn stop(self) -> usize {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

fn calls_to(standin: &testsupport::standin::StandinTasklist, path: &str) -> impl Iterator<Item = testsupport::standin::ApiRequestRecord> {
    standin.api_requests().into_iter().filter(move |call| call.path == path)
}

/// Polls the derived Secret every 200 ms and records each new `expiresAt`.
struct SecretUpdates {
    seen: Arc<std::sync::Mutex<Vec<Update>>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl SecretUpdates {
    fn start(world: Arc<World>, namespace: String, secret: String) -> SecretUpdates {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<Update>::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let recorder = seen.clone();
        let task = tokio::spawn(async move {
            let mut last: Option<SystemTime> = None;
            while stopped.try_recv().is_err() {
                if let Ok(Some(data)) = world.derived_secret(&namespace, &secret).await
                    && let Some(expires_at) = data.get("expiresAt").and_then(|value| parse_time(value))
                    && last != Some(expires_at)
                {
                    last = Some(expires_at);
                    if let Ok(mut seen) = recorder.lock() {
                        seen.push(Update {
                            seen_at: SystemTime::now(),
                            expires_at,
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        SecretUpdates { seen, stop, task }
    }

    /// The updates seen after `time`, oldest first.
    fn after(&self, time: SystemTime) -> Vec<Update> {
        self.seen
            .lock()
            .map(|seen| seen.iter().filter(|update| update.seen_at >= time).copied().collect())
            .unwrap_or_default()
    }

    async fn stop(self) -> Vec<Update> {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.seen.lock().map(|seen| seen.clone()).unwrap_or_default()
    }
}

fn parse_time(value: &str) -> Option<SystemTime> {
    let timestamp: jiff::Timestamp = value.parse().ok()?;
    let seconds = u64::try_from(timestamp.as_second()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(seconds))
}
