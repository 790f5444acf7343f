//! The nudge (issue 21, docs/nudge.md): after each write of a derived Secret, the operator
//! started with `--nudge-pods` changes the annotation `tasklist.camunda.community/credential-version`
//! on each running Pod that opted in with the label `tasklist.camunda.community/nudge: "true"`
//! and mounts that Secret, and on no other Pod. The control plane runs no kubelet: the
//! scenario sets the Pods' phase through the status subresource, as a kubelet would.
//!
//! And the chart's admission policy: the operator's ServiceAccount may change that one
//! annotation on a Pod and nothing else (impersonated against the real API server).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tasklist_operator::nudge::{CREDENTIAL_VERSION_ANNOTATION, NUDGE_LABEL};

use crate::ScenarioFn;
use crate::admission::{TAKES_EFFECT, acting_as, grant, install_admission_policies, refusal};
use crate::scenario::{Check, Scenario, World, eventually, scrape, start_operator_with};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        nudge:
        basic_and_cookie_writes_nudge_the_running_labelled_pods_that_mount_the_secret_once_each,
        the_operators_service_account_may_change_only_the_credential_version_annotation,
    ]
}

/// A Pod of `namespace` named `name`, with the opt-in label when `labelled`, mounting `volumes`.
fn pod(name: &str, labelled: bool, volumes: Value) -> anyhow::Result<Pod> {
    let labels = if labelled {
        json!({NUDGE_LABEL: "true", "app": name})
    } else {
        json!({"app": name})
    };
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": {"team": "orders"}},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "app.test/app:1", "volumeMounts": [{"name": "auth", "mountPath": "/var/run/tasklist"}]}],
            "volumes": volumes,
        },
    }))?)
}

fn secret_volume(secret: &str) -> Value {
    json!([{"name": "auth", "secret": {"secretName": secret}}])
}

/// Creates `pod`, and with `running` sets its phase to Running as a kubelet would.
async fn create_pod(pods: &Api<Pod>, pod: Pod, running: bool) -> anyhow::Result<()> {
    let name = pod.name_any();
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating Pod {name}"))?;
    if running {
        let status = json!({"status": {"phase": "Running"}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .with_context(|| format!("setting Pod {name} Running"))?;
    }
    Ok(())
}

async fn credential_version(pods: &Api<Pod>, name: &str) -> anyhow::Result<Option<String>> {
    Ok(pods.get(name).await?.annotations().get(CREDENTIAL_VERSION_ANNOTATION).cloned())
}

async fn secret_version(s: &Scenario, name: &str) -> anyhow::Result<String> {
    s.secrets()
        .get(name)
        .await?
        .metadata
        .resource_version
        .context("a Secret without resourceVersion")
}

/// Waits until each of `pods` carries the annotation with `version`.
async fn wait_nudged(pods: &Api<Pod>, names: &[&str], version: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{names:?} nudged to version {version}"),
        Duration::from_secs(20),
        || async {
            for name in names {
                let seen = credential_version(pods, name).await?;
                if seen.as_deref() != Some(version) {
                    return Ok(Check::NotYet(format!("{name} has {seen:?}")));
                }
            }
            Ok(Check::Done(()))
        },
    )
    .await
}

/// Two connections, Basic and cookie, each with its Pods. After a write of either derived
/// Secret (a new password, a new login), the running labelled Pods that mount it (a
/// `secret` volume, a `projected` one) carry that Secret's resourceVersion in the
/// annotation; exactly one patch per Pod per write (`pod_nudges_total`). Untouched: an
/// unlabelled Pod, a labelled Pod still Pending, a labelled Running Pod that mounts another
/// Secret, and every other label, annotation and the spec of the nudged Pods.
async fn basic_and_cookie_writes_nudge_the_running_labelled_pods_that_mount_the_secret_once_each(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("nudge").await?;
    let kubeconfig = world.control_plane.kubeconfig();
    let operator = start_operator_with(kubeconfig, &namespace, &["--nudge-pods"], &[])?;
    let mut s = Scenario::with_operator(&world, &namespace, kubeconfig, operator).await?;
    let pods: Api<Pod> = Api::namespaced(world.client(), &namespace);
    let (basic_secret, cookie_secret) = ("basic-tasklist-auth", "cookie-tasklist-auth");
    create_pod(&pods, pod("basic-app", true, secret_volume(basic_secret))?, true).await?;
    let projected = json!([{"name": "auth", "projected": {"sources": [{"secret": {"name": basic_secret}}]}}]);
    create_pod(&pods, pod("basic-projected", true, projected)?, true).await?;
    create_pod(&pods, pod("unlabelled", false, secret_volume(basic_secret))?, true).await?;
    create_pod(&pods, pod("pending", true, secret_volume(basic_secret))?, false).await?;
    create_pod(&pods, pod("other-secret", true, secret_volume("someone-elses"))?, true).await?;
    create_pod(&pods, pod("cookie-app", true, secret_volume(cookie_secret))?, true).await?;

    s.standin.accept_basic("demo", "basic-password-1");
    s.apply_secret("basic-login", &[("username", "demo"), ("password", "basic-password-1")])
        .await?;
    s.standin.add_user("demo", "cookie-password-1");
    s.apply_secret("cookie-login", &[("username", "demo"), ("password", "cookie-password-1")])
        .await?;
    s.apply_connection(
        "basic",
        json!({"url": s.standin.url(), "auth": {"basic": {"credentialsSecretRef": {"name": "basic-login"}}}}),
    )
    .await?;
    s.apply_connection(
        "cookie",
        json!({"url": s.standin.url(), "auth": {"cookie": {"credentialsSecretRef": {"name": "cookie-login"}}}}),
    )
    .await?;
    s.wait_ready("basic").await?;
    s.wait_ready("cookie").await?;
    // The first writes may come before the Pod watch has listed: what counts is the next.
    let metrics = s.metrics_url().await?;
    let http = reqwest::Client::new();
    let patched = async || -> anyhow::Result<f64> {
        Ok(scrape(&http, &metrics)
            .await?
            .count("tasklist_operator_pod_nudges_total", &[("result", "patched")]))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = patched().await?;

    // A new Basic password: one write, two Pods nudged.
    s.standin.accept_basic("demo", "basic-password-2");
    s.apply_secret("basic-login", &[("username", "demo"), ("password", "basic-password-2")])
        .await?;
    let old = s.derived_secret(basic_secret).await?.context("no Basic Secret")?["authorization"].clone();
    s.wait_for_secret(basic_secret, "the new password", Duration::from_secs(20), |data| {
        data.get("authorization").is_some_and(|value| *value != old)
    })
    .await?;
    let basic_version = secret_version(&s, basic_secret).await?;
    wait_nudged(&pods, &["basic-app", "basic-projected"], &basic_version).await?;

    // A new cookie password: a new login, one write, one Pod nudged.
    s.standin.add_user("demo", "cookie-password-2");
    let old = s.derived_secret(cookie_secret).await?.context("no cookie Secret")?["cookie"].clone();
    s.apply_secret("cookie-login", &[("username", "demo"), ("password", "cookie-password-2")])
        .await?;
    s.wait_for_secret(cookie_secret, "a new session", Duration::from_secs(20), |data| {
        data.get("cookie").is_some_and(|value| *value != old)
    })
    .await?;
    let cookie_version = secret_version(&s, cookie_secret).await?;
    wait_nudged(&pods, &["cookie-app"], &cookie_version).await?;
    // The Basic Pods still show the Basic Secret's version: a write nudges its own Pods only.
    wait_nudged(&pods, &["basic-app", "basic-projected"], &basic_version).await?;

    // Exactly one patch per consuming Pod per write: 2 + 1.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nudges = patched().await? - before;
    ensure!(
        nudges == 3.0,
        "expected 3 Pod patches for 2 writes (2 + 1 consuming Pods), counted {nudges}"
    );
    for name in ["unlabelled", "pending", "other-secret"] {
        let seen = credential_version(&pods, name).await?;
        ensure!(
            seen.is_none(),
            "Pod {name} was nudged ({seen:?}) although it is not a running labelled consumer"
        );
    }
    // Nothing else changed on the nudged Pods.
    for name in ["basic-app", "cookie-app"] {
        let nudged = pods.get(name).await?;
        let mut annotations = nudged.annotations().clone();
        annotations.remove(CREDENTIAL_VERSION_ANNOTATION);
        ensure!(
            annotations == [("team".to_owned(), "orders".to_owned())].into(),
            "{name}: annotations {annotations:?}"
        );
        ensure!(nudged.labels().len() == 2, "{name}: labels {:?}", nudged.labels());
        let image = nudged
            .spec
            .as_ref()
            .and_then(|spec| spec.containers.first())
            .and_then(|c| c.image.clone());
        ensure!(image.as_deref() == Some("app.test/app:1"), "{name}: image {image:?}");
    }
    // The annotation names a version, never the credential.
    let logs = s.all_operator_logs();
    ensure!(!logs.contains("could not nudge"), "a nudge failed:\n{logs}");
    s.assert_no_credential_leaked().await
}

/// The chart with `nudge.enabled=true`: its admission policy, on the real API server, lets
/// the operator's ServiceAccount (impersonated, granted `patch pods` by a Role as the chart
/// does) change the credential-version annotation, and nothing else: not a container image,
/// not a label, not another annotation (changed, added or removed), not the owners. Someone
/// else with the same permission is not checked by it.
async fn the_operators_service_account_may_change_only_the_credential_version_annotation(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("nudge-policy").await?;
    let service_account = "tlo-nudger";
    // `helm template` renders into namespace `default`.
    let operator = format!("system:serviceaccount:default:{service_account}");
    let pod_rules = json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch", "update"]}]);
    grant(&world, &namespace, "operator-pods", &operator, pod_rules.clone()).await?;
    grant(&world, &namespace, "someone-pods", "someone-else", pod_rules).await?;
    let pods: Api<Pod> = Api::namespaced(world.client(), &namespace);
    create_pod(&pods, pod("app", true, secret_volume("orders-tasklist-auth"))?, true).await?;
    let installed = install_admission_policies(
        &world,
        &namespace,
        &["nudge.enabled=true", &format!("serviceAccount.name={service_account}")],
    )
    .await?;
    ensure!(
        installed.policies.iter().any(|name| name.contains("-nudge.")),
        "the chart rendered no nudge policy: {:?}",
        installed.policies
    );
    let outcome = check_policy(&world, &pods, &namespace, &operator).await;
    installed.remove().await;
    outcome
}

async fn check_policy(world: &World, admin: &Api<Pod>, namespace: &str, operator: &str) -> anyhow::Result<()> {
    let as_operator: Api<Pod> = Api::namespaced(acting_as(world, operator).await?, namespace);
    let merge = |patch: Value| Patch::Merge(patch);
    let params = PatchParams::default();
    let image = json!({"spec": {"containers": [{"name": "app", "image": "evil.test/miner:1"}]}});
    // The policy takes a moment to load: tried as a dry run until refused, so that an image
    // change accepted before that does not stay.
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let message = eventually("the nudge policy refusing an image change", TAKES_EFFECT, || async {
        // Strategic: the container list is merged by name, so only the image changes.
        Ok(match as_operator.patch("app", &dry_run, &Patch::Strategic(image.clone())).await {
            Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains("credential-version") => {
                Check::Done(status.message)
            }
            Ok(_) => Check::NotYet("the API server accepted the image change".to_owned()),
            Err(other) => Check::NotYet(format!("refused otherwise: {other}")),
        })
    })
    .await?;
    ensure!(message.contains("not its spec"), "{message}");
    let message = refusal("an image change", as_operator.patch("app", &params, &Patch::Strategic(image)).await)?;
    ensure!(message.contains("not its spec"), "{message}");
    let refusals = [
        ("a label", json!({"metadata": {"labels": {"app": "changed"}}}), "not its labels"),
        ("a new label", json!({"metadata": {"labels": {"extra": "x"}}}), "not its labels"),
        (
            "the opt-in label removed",
            json!({"metadata": {"labels": {NUDGE_LABEL: null}}}),
            "not its labels",
        ),
        (
            "another annotation",
            json!({"metadata": {"annotations": {"team": "billing"}}}),
            "no other annotation",
        ),
        (
            "a new annotation",
            json!({"metadata": {"annotations": {"extra": "x"}}}),
            "no other annotation",
        ),
        (
            "an annotation removed",
            json!({"metadata": {"annotations": {"team": null}}}),
            "no other annotation",
        ),
        (
            "an owner",
            json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "6f1d6c1e-0000-4000-8000-000000000000"}]}}),
            "not its owners",
        ),
        (
            "the annotation and a label at once",
            json!({"metadata": {"labels": {"app": "changed"}, "annotations": {CREDENTIAL_VERSION_ANNOTATION: "1"}}}),
            "not its labels",
        ),
    ];
    for (what, patch, says) in refusals {
        let message = refusal(what, as_operator.patch("app", &params, &merge(patch)).await)?;
        ensure!(message.contains(says), "{what}: refused with {message:?}, expected {says:?}");
    }
    let unchanged = admin.get("app").await?;
    ensure!(
        unchanged.labels().get("app").map(String::as_str) == Some("app"),
        "a label changed: {:?}",
        unchanged.labels()
    );
    let image = unchanged
        .spec
        .as_ref()
        .and_then(|spec| spec.containers.first())
        .and_then(|c| c.image.clone());
    ensure!(image.as_deref() == Some("app.test/app:1"), "the image changed: {image:?}");

    // The nudge itself, as the operator sends it: accepted, twice (a new version each time).
    for version in ["4711", "4712"] {
        as_operator
            .patch_metadata(
                "app",
                &params,
                &merge(json!({"metadata": {"annotations": {CREDENTIAL_VERSION_ANNOTATION: version}}})),
            )
            .await
            .with_context(|| format!("the operator's nudge to {version} was refused"))?;
        let seen = admin.get("app").await?.annotations().get(CREDENTIAL_VERSION_ANNOTATION).cloned();
        ensure!(seen.as_deref() == Some(version), "the annotation is {seen:?}");
    }
    // Someone else with the same permission is not the operator: not checked.
    let as_someone: Api<Pod> = Api::namespaced(acting_as(world, "someone-else").await?, namespace);
    as_someone
        .patch("app", &params, &merge(json!({"metadata": {"labels": {"app": "relabelled"}}})))
        .await
        .context("the policy checked another user's Pod write")?;
    Ok(())
}
