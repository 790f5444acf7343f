//! `spec.secretTemplate`: the derived Secret's labels, annotations and extra keys, as
//! consumers expect them, rewritten together at every rotation; and the CRD's refusal of
//! keys and labels that would hide or replace the operator's own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use kube::ResourceExt;
use kube::api::PostParams;
use serde_json::json;
use tasklist_operator::crd::REFRESH_ANNOTATION;

use crate::ScenarioFn;
use crate::scenario::{Scenario, World, secret_text};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        secret_template:
        labels_annotations_and_extra_keys_are_written_and_rotated_together,
        colliding_keys_and_the_operators_label_are_refused,
    ]
}

const SECRET: &str = "orders-tasklist-auth";

async fn labels_annotations_and_extra_keys_are_written_and_rotated_together(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "template").await?;
    let mut spec = s.saas_spec();
    spec["secretTemplate"] = json!({
        "labels": {"team": "orders"},
        "annotations": {"reloader.stakater.com/match": "true"},
        "keys": {"CAMUNDA_OAUTH_TOKEN": "token", "CAMUNDA_REST_ADDRESS": "url"},
    });
    s.apply_connection("orders", spec.clone()).await?;
    s.wait_ready("orders").await?;
    let secret = s.secrets().get(SECRET).await?;
    let first = secret_text(&secret);
    s.remember_credential(&first);
    ensure!(
        secret.labels().get("team").map(String::as_str) == Some("orders"),
        "labels: {:?}",
        secret.labels()
    );
    ensure!(
        secret.labels().get("app.kubernetes.io/managed-by").map(String::as_str) == Some("tasklist-operator"),
        "the operator's label is gone: {:?}",
        secret.labels()
    );
    ensure!(
        secret.annotations().get("reloader.stakater.com/match").map(String::as_str) == Some("true"),
        "annotations: {:?}",
        secret.annotations().keys()
    );
    ensure!(
        secret.owner_references().iter().any(|owner| owner.controller == Some(true)),
        "no controller owner"
    );
    ensure!(
        first.get("CAMUNDA_OAUTH_TOKEN") == first.get("token"),
        "CAMUNDA_OAUTH_TOKEN is not the token"
    );
    ensure!(
        first.get("CAMUNDA_REST_ADDRESS") == Some(&s.standin.url()),
        "CAMUNDA_REST_ADDRESS is not the url"
    );
    ensure!(
        s.standin
            .call_api_with_secret(&BTreeMap::from([(
                "authorization".to_owned(),
                format!("Bearer {}", first["CAMUNDA_OAUTH_TOKEN"])
            )]))
            .await?
            == 200,
        "Tasklist does not accept CAMUNDA_OAUTH_TOKEN"
    );

    // A rotation rewrites the extra key with the token, in the same write.
    s.annotate_connection("orders", REFRESH_ANNOTATION, "2026-12-04T23:00:00Z").await?;
    let rotated = s
        .wait_for_secret(SECRET, "a refreshed token", Duration::from_secs(10), |data| {
            data.get("token") != first.get("token")
        })
        .await?;
    s.remember_credential(&rotated);
    ensure!(
        rotated.get("CAMUNDA_OAUTH_TOKEN") == rotated.get("token"),
        "after the rotation CAMUNDA_OAUTH_TOKEN is not the new token"
    );

    // An edit of the template is applied: a label replaced, the annotation dropped, a key
    // renamed; what the template no longer has goes.
    spec["secretTemplate"]["labels"] = json!({"tier": "backend"});
    spec["secretTemplate"]
        .as_object_mut()
        .context("secretTemplate is an object")?
        .remove("annotations");
    spec["secretTemplate"]["keys"] = json!({"CAMUNDA_OAUTH_TOKEN": "token", "TASKLIST_URL": "url"});
    s.apply_connection("orders", spec).await?;
    let edited = s
        .wait_for_secret(SECRET, "the edited template", Duration::from_secs(10), |data| {
            data.contains_key("TASKLIST_URL")
        })
        .await?;
    s.remember_credential(&edited);
    ensure!(
        !edited.contains_key("CAMUNDA_REST_ADDRESS"),
        "the removed key stayed: {:?}",
        edited.keys()
    );
    ensure!(edited.get("CAMUNDA_OAUTH_TOKEN") == edited.get("token"));
    let secret = s.secrets().get(SECRET).await?;
    ensure!(
        secret.labels().get("tier").map(String::as_str) == Some("backend"),
        "labels: {:?}",
        secret.labels()
    );
    ensure!(
        !secret.labels().contains_key("team"),
        "the dropped label stayed: {:?}",
        secret.labels()
    );
    ensure!(
        !secret.annotations().contains_key("reloader.stakater.com/match"),
        "the dropped annotation stayed: {:?}",
        secret.annotations().keys()
    );
    ensure!(
        secret.labels().get("app.kubernetes.io/managed-by").map(String::as_str) == Some("tasklist-operator"),
        "the operator's label is gone"
    );
    s.wait_ready("orders").await?;
    Ok(())
}

async fn colliding_keys_and_the_operators_label_are_refused(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start(&world, "template-invalid").await?;
    let base = json!({"url": "https://t.example", "auth": {"oauth2": {"tokenUrl": "https://l/t", "clientSecretRef": {"name": "c"}}}});
    let cases = [
        (
            json!({"keys": {"token": "authorization"}}),
            "spec.secretTemplate.keys: Forbidden: a key in secretTemplate.keys cannot be named like a key the operator writes (token, authorization, expiresAt, url, cookie, csrfToken)",
        ),
        (
            json!({"keys": {"CAMUNDA_OAUTH_TOKEN": "accessToken"}}),
            "each value in secretTemplate.keys names the key whose value it copies, one of token, authorization",
        ),
        (
            json!({"labels": {"app.kubernetes.io/managed-by": "me"}}),
            "spec.secretTemplate.labels: Forbidden: secretTemplate.labels cannot set app.kubernetes.io/managed-by",
        ),
        (
            json!({"annotations": {"tasklist.camunda.community/inputs": "x"}}),
            "secretTemplate.annotations cannot set annotations starting with tasklist.camunda.community/",
        ),
    ];
    for (index, (template, expected)) in cases.into_iter().enumerate() {
        let mut spec = base.clone();
        spec["secretTemplate"] = template;
        let connection: tasklist_operator::crd::TasklistConnection = serde_json::from_value(json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
            "metadata": {"name": format!("invalid-{index}")}, "spec": spec,
        }))?;
        let error = s
            .connections()
            .create(&PostParams::default(), &connection)
            .await
            .err()
            .context(format!("case {index} was accepted"))?;
        ensure!(
            error.to_string().contains(expected),
            "case {index}: message {error} does not mention {expected:?}"
        );
    }
    Ok(())
}
