//! A write of the derived Secret that the API server refuses, and a restart during a
//! backoff (issue 10, items 2 and 6): the credential obtained is kept and only the write is
//! retried; a restart does not shorten the pause after a rejection.
//!
//! The refusal comes from a ValidatingAdmissionPolicy (CEL, no webhook) on the real
//! kube-apiserver, as Kyverno, Gatekeeper or a quota would refuse it in a real cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use serde_json::json;

use crate::ScenarioFn;
use crate::scenario::{CLIENT_ID, Scenario, World, condition, find_condition, saas_spec_for, strip_ansi, tail};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        writes:
        a_denied_secret_write_keeps_the_credential_and_retries_only_the_write,
        a_restart_keeps_the_30s_pause_after_a_rejection,
    ]
}

const CLIENT_SECRET: &str = "orders-writes-secret-2";
const PASSWORD: &str = "demo-writes-password-2";
/// What the admission policy answers; the operator must quote it.
const POLICY_MESSAGE: &str = "e2e policy: derived Secrets are frozen here";
/// How long the write keeps failing before the policy is removed.
const DENIED_FOR: Duration = Duration::from_secs(40);

/// A policy denying every create and update of a Secret named `*-tasklist-auth` in
/// `namespace`, and its binding.
fn deny_derived_secrets(namespace: &str) -> anyhow::Result<(ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding)> {
    let name = format!("deny-derived-secrets-{namespace}");
    let policy = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["secrets"],
            }]},
            "validations": [{
                "expression": "!object.metadata.name.endsWith('-tasklist-auth')",
                "message": POLICY_MESSAGE,
            }],
        },
    }))?;
    let binding = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
        },
    }))?;
    Ok((policy, binding))
}

/// Installs the policy and waits until the API server enforces it.
async fn install_policy(s: &Scenario) -> anyhow::Result<()> {
    let (policy, binding) = deny_derived_secrets(&s.namespace)?;
    Api::<ValidatingAdmissionPolicy>::all(s.client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .context("creating the policy")?;
    Api::<ValidatingAdmissionPolicyBinding>::all(s.client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .context("creating the binding")?;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let probe = Secret {
        metadata: ObjectMeta {
            name: Some("probe-tasklist-auth".into()),
            ..ObjectMeta::default()
        },
        data: Some([("k".to_owned(), ByteString(b"v".to_vec()))].into()),
        ..Secret::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.secrets().create(&dry_run, &probe).await.is_ok() {
        if Instant::now() > deadline {
            bail!("the ValidatingAdmissionPolicy did not take effect within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

async fn remove_policy(s: &Scenario) {
    let name = format!("deny-derived-secrets-{}", s.namespace);
    let _ = Api::<ValidatingAdmissionPolicyBinding>::all(s.client.clone())
        .delete(&name, &DeleteParams::default())
        .await;
    let _ = Api::<ValidatingAdmissionPolicy>::all(s.client.clone())
        .delete(&name, &DeleteParams::default())
        .await;
}

/// The Events regarding `connection` with `reason`.
async fn events_with_reason(s: &Scenario, connection: &str, reason: &str) -> anyhow::Result<Vec<Event>> {
    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.namespace);
    Ok(events
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|event| {
            event.reason.as_deref() == Some(reason)
                && event
                    .regarding
                    .as_ref()
                    .is_some_and(|r| r.kind.as_deref() == Some("TasklistConnection") && r.name.as_deref() == Some(connection))
        })
        .collect())
}

/// How often an Event happened: its series count, else 1.
fn occurrences(event: &Event) -> i32 {
    event.series.as_ref().map_or(event.deprecated_count.unwrap_or(1), |s| s.count)
}

/// An oauth2 and a cookie connection while an admission policy denies writing their derived
/// Secrets for 40 s: one token request and one login in all (not one every 5 s), Ready=False
/// with reason SecretWriteFailed quoting the API server, one Warning Event each, a bounded
/// number of write attempts; once the policy is gone, the same token and session are written
/// within the backoff, with no new token request or login.
async fn a_denied_secret_write_keeps_the_credential_and_retries_only_the_write(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "writes-denied").await?;
    s.standin.add_client(CLIENT_ID, CLIENT_SECRET);
    s.standin.add_user("demo", PASSWORD);
    s.apply_secret("client", &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)])
        .await?;
    s.apply_secret("login", &[("username", "demo"), ("password", PASSWORD)]).await?;
    install_policy(&s).await?;
    let result = denied_then_allowed(&mut s).await;
    remove_policy(&s).await;
    result
}

async fn denied_then_allowed(s: &mut Scenario) -> anyhow::Result<()> {
    let started = Instant::now();
    s.apply_connection("orders", saas_spec_for(&s.standin, "client")).await?;
    s.apply_connection(
        "cookie",
        json!({"url": s.standin.url(), "auth": {"cookie": {"credentialsSecretRef": {"name": "login"}}}}),
    )
    .await?;
    for name in ["orders", "cookie"] {
        let connection = s.wait_not_ready_because(name, "SecretWriteFailed").await?;
        let authenticated = find_condition(&connection, "Authenticated").context("no Authenticated condition")?;
        eprintln!("write denied, {name}: {}: {}", authenticated.reason, authenticated.message);
        ensure!(
            authenticated.status == "False" && authenticated.reason == "SecretWriteFailed",
            "{name}: Authenticated is {} {}",
            authenticated.status,
            authenticated.reason
        );
        ensure!(
            authenticated.message.contains(POLICY_MESSAGE) && authenticated.message.contains("denied request"),
            "{name}: the message does not quote the API server: {:?}",
            authenticated.message
        );
    }
    if let Some(left) = DENIED_FOR.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }

    let (tokens, logins) = (s.standin.token_requests().len(), s.standin.logins().len());
    let logs = strip_ansi(&s.operator.logs());
    let write_tries = logs.lines().filter(|l| l.contains("could not write the derived Secret")).count();
    eprintln!(
        "write denied for {:.0}s: {tokens} token request(s), {logins} login(s), {write_tries} write tries in all",
        started.elapsed().as_secs_f64()
    );
    ensure!(tokens == 1, "expected 1 token request while the write failed, saw {tokens}");
    ensure!(logins == 1, "expected 1 login while the write failed, saw {logins}");
    // Backoff from 1 s doubling (±25 %): 5 to 7 tries per connection in 40 s, not one per second.
    ensure!(
        (2 * 4..=2 * 8).contains(&write_tries),
        "expected 8 to 16 write tries for two connections in 40 s, saw {write_tries}\n{}",
        tail(&logs, 30)
    );
    for name in ["orders", "cookie"] {
        ensure!(
            s.derived_secret(&format!("{name}-tasklist-auth")).await?.is_none(),
            "{name}: a derived Secret exists although every write was denied"
        );
        let warnings = events_with_reason(s, name, "SecretWriteFailed").await?;
        let counts: Vec<i32> = warnings.iter().map(occurrences).collect();
        eprintln!("write denied, {name}: SecretWriteFailed Events: {counts:?}");
        ensure!(counts == [1], "{name}: expected one SecretWriteFailed Event, once; saw {counts:?}");
        ensure!(
            warnings[0].type_.as_deref() == Some("Warning")
                && warnings[0].note.as_deref().is_some_and(|note| note.contains(POLICY_MESSAGE)),
            "{name}: the Event is {:?} {:?}",
            warnings[0].type_,
            warnings[0].note
        );
        let refresh_failed = events_with_reason(s, name, "RefreshFailed").await?;
        ensure!(
            refresh_failed.is_empty(),
            "{name}: {} RefreshFailed Event(s) besides SecretWriteFailed",
            refresh_failed.len()
        );
    }

    remove_policy(s).await;
    let removed = Instant::now();
    for (name, key) in [("orders", "token"), ("cookie", "cookie")] {
        let data = s
            .wait_for_secret(&format!("{name}-tasklist-auth"), "written", Duration::from_secs(150), |data| {
                data.contains_key(key)
            })
            .await?;
        eprintln!(
            "policy removed: {name}'s derived Secret written {:.1}s later",
            removed.elapsed().as_secs_f64()
        );
        s.remember_credential(&data);
        ensure!(
            s.standin.call_api_with_secret(&data).await? == 200,
            "{name}: the written credential is not accepted"
        );
    }
    for name in ["orders", "cookie"] {
        let connection = s.wait_ready(name).await?;
        ensure!(
            condition(&connection, "Authenticated").is_some_and(|(status, reason)| status == "True" && reason == "CredentialIssued"),
            "{name}: Authenticated is not CredentialIssued after the write"
        );
    }
    let (tokens, logins) = (s.standin.token_requests().len(), s.standin.logins().len());
    eprintln!("policy removed: {tokens} token request(s), {logins} login(s) in all");
    ensure!(
        tokens == 1,
        "a new token was requested instead of writing the kept one ({tokens} requests)"
    );
    ensure!(
        logins == 1,
        "a new session was opened instead of writing the kept one ({logins} logins)"
    );
    s.assert_no_credential_leaked().await
}

/// A rejected connection, and the operator killed and started again a few seconds after the
/// rejection: the restarted operator tries again no sooner than 30 s after the first try
/// (told by the stand-in's arrival times of the token requests).
async fn a_restart_keeps_the_30s_pause_after_a_rejection(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "writes-restart").await?;
    s.standin.add_client(CLIENT_ID, CLIENT_SECRET);
    s.apply_secret("wrong", &[("client_id", CLIENT_ID), ("client_secret", "a-wrong-secret-6")])
        .await?;
    s.apply_connection("rejected", saas_spec_for(&s.standin, "wrong")).await?;
    let connection = s.wait_not_ready_because("rejected", "CredentialsRejected").await?;
    let next = connection.status.as_ref().and_then(|status| status.next_refresh_time.clone());
    ensure!(next.is_some(), "status has no nextRefreshTime after a rejection");
    let first = s.standin.token_requests();
    ensure!(
        first.len() == 1,
        "expected one token request before the restart, saw {}",
        first.len()
    );
    let since_first = first[0].time.elapsed().unwrap_or_default();
    ensure!(
        since_first < Duration::from_secs(20),
        "the restart would come {since_first:?} after the first try: too late to tell"
    );

    s.restart_operator_after_crash()?;
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(60);
    while s.standin.token_requests().len() < 2 {
        if Instant::now() > deadline {
            bail!(
                "no second try within 60 s of the restart\n--- operator log (tail) ---\n{}",
                tail(&s.operator.logs(), 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Anything sent right after the second try would show here too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = s.standin.token_requests();
    let gap = requests[1].time.duration_since(requests[0].time).unwrap_or_default();
    eprintln!(
        "restart {:.1}s after a rejection (status said nextRefreshTime {}): next try {:.2}s after the first; {} tries in all",
        since_first.as_secs_f64(),
        next.unwrap_or_default(),
        gap.as_secs_f64(),
        requests.len()
    );
    ensure!(
        gap >= Duration::from_secs(30),
        "the restarted operator tried again {:.2}s after the rejection, within the 30 s pause",
        gap.as_secs_f64()
    );
    ensure!(requests.len() == 2, "expected 2 tries, saw {}", requests.len());
    s.assert_no_credential_leaked().await
}
