//! High availability: two operator processes with leader election against one control plane.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use serde_json::json;
use tasklist_operator::crd::{REFRESH_ANNOTATION, TasklistConnection};
use testsupport::operator::OperatorProcess;
use testsupport::standin::StandinTasklist;

use crate::ScenarioFn;
use crate::scenario::{World, secret_text, start_operator_with, tail};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    vec![("ha::only_the_leader_reconciles_and_a_standby_takes_over", |w| {
        Box::pin(only_the_leader_reconciles_and_a_standby_takes_over(w))
    })]
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
    let client = world.client();
    let namespace = world.control_plane.create_namespace("ha").await?;
    let standin = StandinTasklist::start().await?;
    standin.add_client("orders", "ha-secret-1");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let connections: Api<TasklistConnection> = Api::namespaced(client.clone(), &namespace);
    let credentials = Secret {
        metadata: ObjectMeta {
            name: Some("client".into()),
            ..ObjectMeta::default()
        },
        data: Some(
            [("client_id", "orders"), ("client_secret", "ha-secret-1")]
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    };
    secrets
        .patch("client", &PatchParams::apply("e2e-test"), &Patch::Apply(&credentials))
        .await?;

    let mut first = start_replica(&world, &namespace, "replica-a")?;
    // Let the first replica take the lease before the second starts: the order is then known.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !first.logs().contains("acquired leadership") {
        ensure!(
            Instant::now() < deadline,
            "replica-a never acquired the lease:\n{}",
            tail(&first.logs(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut second = start_replica(&world, &namespace, "replica-b")?;

    let manifest = json!({
        "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
        "metadata": {"name": "orders"},
        "spec": {"url": standin.url(), "auth": {"oauth2": {"tokenUrl": standin.token_url(), "clientSecretRef": {"name": "client"}}}},
    });
    connections
        .patch("orders", &PatchParams::apply("e2e-test"), &Patch::Apply(manifest))
        .await?;
    let token = wait_for_new_token(&secrets, None, Duration::from_secs(30))
        .await
        .context("the leader did not issue a token")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(first.logs().contains("stored a new credential"), "the leader did not reconcile");
    ensure!(
        !second.logs().contains("stored a new credential"),
        "the standby reconciled too:\n{}",
        tail(&second.logs(), 30)
    );
    ensure!(
        standin.token_requests().len() == 1,
        "expected one token request, saw {}",
        standin.token_requests().len()
    );

    // The leader dies without releasing the lease; the standby takes over once it expires (15 s).
    first.kill();
    let killed_at = Instant::now();
    let patch = json!({"metadata": {"annotations": {REFRESH_ANNOTATION: "after-failover"}}});
    connections.patch("orders", &PatchParams::default(), &Patch::Merge(patch)).await?;
    wait_for_new_token(&secrets, Some(&token), Duration::from_secs(60))
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
    Ok(())
}

async fn wait_for_new_token(secrets: &Api<Secret>, previous: Option<&str>, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(secret) = secrets.get_opt("orders-tasklist-auth").await? {
            let data = secret_text(&secret);
            if let Some(token) = data.get("token").filter(|token| Some(token.as_str()) != previous) {
                return Ok(token.clone());
            }
        }
        ensure!(Instant::now() < deadline, "no new token within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
