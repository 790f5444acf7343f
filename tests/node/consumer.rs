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
//! Defaults (for `make test`): 60 s tokens, `refreshBefore: 30s` (what the refresh rule gives
//! a 60 s token: half its lifetime), 5 refreshes. `make soak` runs a real Keycloak's 300 s
//! tokens with `refreshBefore: 120s`. Override with TLO_NODE_CONSUMER_KEYCLOAK (1: tokens
//! from Keycloak), TLO_NODE_CONSUMER_TOKEN_SECONDS, TLO_NODE_CONSUMER_REFRESH_BEFORE_SECONDS
//! and TLO_NODE_CONSUMER_CYCLES.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use testsupport::node::NODE_IP;

use testsupport::propagation::{Update, analyse};

use crate::world::{self, CONSUMER_IMAGE, CONSUMER_PROGRAM, World, pod_ready, wait_for};

/// The path the consumer calls; the operator's probe uses another, so the two never mix.
const CONSUMER_PATH: &str = "/v1/tasks/consumer/variables/search";
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
    world.install(release, &namespace, &[]).await?;
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
        world
            .create_oauth2_connection(
                &namespace,
                "orders",
                &standin.url(),
                oauth2,
                (started.client_id(), started.client_secret()),
                Some(&refresh_before),
            )
            .await?;
        keycloak = Some(started);
    } else {
        standin.set_token_lifetime(Duration::from_secs(token_seconds));
        world
            .create_connection(&namespace, "orders", &standin, Some(&refresh_before))
            .await?;
    }
    world.wait_connection_ready(&namespace, "orders", Duration::from_secs(60)).await?;

    // Record every new token the Secret receives, with the time the test saw it (polled
    // every 200 ms: the test's own delay is far below the kubelet's).
    let updates = SecretUpdates::start(world.clone(), namespace.clone(), "orders-tasklist-auth".into());
    let port = standin.url().rsplit(':').next().context("the stand-in URL has no port")?.to_owned();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "consumer"},
        "spec": {
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "consumer",
                "image": CONSUMER_IMAGE,
                "imagePullPolicy": "Never",
                "command": [CONSUMER_PROGRAM, "/var/run/tasklist/authorization", NODE_IP.to_string(), port],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tasklist", "mountPath": "/var/run/tasklist", "readOnly": true}],
            }],
            "volumes": [{"name": "tasklist", "secret": {"secretName": "orders-tasklist-auth"}}],
        },
    }))?;
    let pods = Api::<Pod>::namespaced(world.client(), &namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .context("creating the consumer Pod")?;
    wait_for("the consumer Pod running", Duration::from_secs(90), async || {
        Ok(pods.get_opt("consumer").await?.as_ref().is_some_and(pod_ready))
    })
    .await?;
    wait_for("the consumer's first call", Duration::from_secs(30), async || {
        Ok(consumer_calls(&standin).next().is_some())
    })
    .await?;
    let consumer_started = SystemTime::now();

    // Run until `cycles` new tokens reached the Secret after the consumer started, and the
    // consumer has used the last of them (or the kubelet's bound has passed).
    let deadline = Duration::from_secs(token_seconds * (cycles as u64 + 1)) + 2 * KUBELET_PROPAGATION_BOUND;
    wait_for(&format!("{cycles} refreshes reaching the consumer"), deadline, async || {
        let seen = updates.after(consumer_started);
        let Some(last) = seen.get(cycles.saturating_sub(1)) else {
            return Ok(false);
        };
        let used = consumer_calls(&standin).any(|call| call.bearer_expires_at.is_some_and(|expires_at| expires_at >= last.expires_at));
        Ok(used || last.seen_at.elapsed().unwrap_or_default() > KUBELET_PROPAGATION_BOUND)
    })
    .await?;
    let seen = updates.stop().await;

    let calls: Vec<_> = consumer_calls(&standin).collect();
    let figures = analyse(&calls, &seen, consumer_started, cycles);
    drop(keycloak);
    let issuer = if with_keycloak { "Keycloak" } else { "stand-in" };
    world.figure(format!(
        "consumer Pod, {token_seconds} s tokens from the {issuer}, refreshBefore {margin_seconds}s, {cycles} refreshes: {} calls, {} refused for an expired token, {} refused otherwise; propagation Secret -> file p50 {:.0} s, max {:.0} s (n={})",
        figures.calls,
        figures.expired_refusals,
        figures.other_refusals,
        figures.propagation_p50.as_secs_f64(),
        figures.propagation_max.as_secs_f64(),
        figures.propagations.len(),
    ));

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

fn consumer_calls(standin: &testsupport::standin::StandinTasklist) -> impl Iterator<Item = testsupport::standin::ApiRequestRecord> {
    standin.api_requests().into_iter().filter(|call| call.path == CONSUMER_PATH)
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
