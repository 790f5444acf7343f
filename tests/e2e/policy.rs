//! The administrator's policy and the operator's care with what is not its own: allowed
//! hosts, http and insecureSkipVerify refused with no request sent; the chart's
//! ValidatingAdmissionPolicy refusing the same at apply time; a derived Secret that someone
//! else creates meanwhile is never taken over.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use serde_json::{Value, json};
use tasklist_operator::crd::TasklistConnection;
use testsupport::standin::{EndpointMode, StandinOptions, StandinTasklist};

use crate::ScenarioFn;
use crate::scenario::{
    CLIENT_ID, Check, DEFAULT_CLIENT_SECRET, Scenario, World, connection, eventually, find_condition, parse_manifest, start_operator_with,
    wait_until,
};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        policy:
        hosts_outside_the_policy_get_not_allowed_and_no_request,
        the_admission_policy_refuses_what_the_operator_would,
        a_secret_created_while_the_token_is_requested_is_not_taken_over,
    ]
}

/// A TLS stand-in that knows the default client.
async fn tls_standin() -> anyhow::Result<StandinTasklist> {
    let standin = StandinTasklist::start_with(StandinOptions {
        tls: true,
        ..StandinOptions::default()
    })
    .await?;
    standin.add_client(CLIENT_ID, DEFAULT_CLIENT_SECRET);
    Ok(standin)
}

/// An oauth2 spec against `base` (e.g. `https://localhost:PORT`), reading Secret `client`.
fn spec_at(base: &str) -> Value {
    json!({
        "url": base,
        "auth": {"oauth2": {"tokenUrl": format!("{base}/oauth/token"), "clientSecretRef": {"name": "client"}}},
    })
}

/// With `--allowed-hosts=localhost,...`, `--allow-http=false` and `--allow-insecure-tls=false`:
/// a connection within the policy becomes Ready; one naming 127.0.0.1, one using http:// and
/// one with insecureSkipVerify each get `NotAllowed`, and the stand-ins they name (which
/// would have answered) receive no request at all.
async fn hosts_outside_the_policy_get_not_allowed_and_no_request(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("policy-hosts").await?;
    let kubeconfig = world.control_plane.kubeconfig();
    let operator = start_operator_with(
        kubeconfig,
        &namespace,
        &[
            "--allowed-hosts=localhost,*.camunda.io,10.0.0.0/8",
            "--allow-http=false",
            "--allow-insecure-tls=false",
        ],
        &[],
    )?;
    let mut s = Scenario::with_operator(&world, &namespace, kubeconfig, operator).await?;
    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    let allowed = tls_standin().await?;
    let refused_tls = tls_standin().await?;
    let refused_http = s.standin.clone();
    let allowed_ca = allowed.ca_pem().context("a TLS stand-in has a CA")?;
    let refused_ca = refused_tls.ca_pem().context("a TLS stand-in has a CA")?;
    s.apply_secret("allowed-ca", &[("ca.crt", &allowed_ca)]).await?;
    s.apply_secret("refused-ca", &[("ca.crt", &refused_ca)]).await?;
    let port = |standin: &StandinTasklist| standin.url().rsplit(':').next().unwrap_or_default().to_owned();

    let mut within = spec_at(&format!("https://localhost:{}", port(&allowed)));
    within["tls"] = json!({"caSecretRef": {"name": "allowed-ca"}});
    s.apply_connection("within", within).await?;
    // Would work (the stand-in's certificate covers 127.0.0.1), but 127.0.0.1 is not listed.
    let mut by_address = spec_at(&refused_tls.url());
    by_address["tls"] = json!({"caSecretRef": {"name": "refused-ca"}});
    s.apply_connection("by-address", by_address).await?;
    s.apply_connection("plain-http", spec_at(&format!("http://localhost:{}", port(&refused_http))))
        .await?;
    let mut insecure = spec_at(&format!("https://localhost:{}", port(&refused_tls)));
    insecure["tls"] = json!({"insecureSkipVerify": true});
    s.apply_connection("insecure", insecure).await?;

    s.wait_ready("within").await?;
    let expectations = [
        ("by-address", "the address 127.0.0.1 is not in the operator's allowed hosts"),
        ("plain-http", "uses http://, which this operator does not allow"),
        ("insecure", "tls.insecureSkipVerify is true, which this operator does not allow"),
    ];
    for (name, says) in expectations {
        let connection = s.wait_not_ready_because(name, "NotAllowed").await?;
        let authenticated = find_condition(&connection, "Authenticated").context("no Authenticated condition")?;
        ensure!(
            authenticated.status == "False" && authenticated.reason == "NotAllowed" && authenticated.message.contains(says),
            "{name}: Authenticated is {} {}: {:?}; expected it to say {says:?}",
            authenticated.status,
            authenticated.reason,
            authenticated.message
        );
        ensure!(
            s.derived_secret(&format!("{name}-tasklist-auth")).await?.is_none(),
            "{name}: a derived Secret was written"
        );
    }
    // Counted after all three were reported, and after `within` went through its whole flow.
    for (which, standin) in [("the TLS stand-in", &refused_tls), ("the http stand-in", &refused_http)] {
        let (tokens, api) = (standin.token_requests_arrived(), standin.api_requests().len());
        ensure!(
            tokens == 0 && api == 0,
            "{which} received {tokens} token and {api} API requests; a connection the policy refuses must send none"
        );
    }
    ensure!(
        allowed.token_requests_arrived() == 1,
        "the allowed connection should have obtained one token"
    );
    ensure!(
        s.operator
            .logs()
            .contains("policy: allowed hosts: localhost,*.camunda.io,10.0.0.0/8;"),
        "the operator does not log its policy at start"
    );
    s.assert_no_credential_leaked().await
}

async fn helm_template(world: &World, args: &[String]) -> anyhow::Result<String> {
    let chart = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/tasklist-operator");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&world.tools.helm)
            .arg("template")
            .args(args)
            .arg(chart)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("helm template took over 120 s")??;
    ensure!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The chart's ValidatingAdmissionPolicy, installed on the real kube-apiserver v1.34 with
/// the values an administrator would set: violating connections are refused at apply time
/// with a readable message, an allowed one is accepted, and a namespace the operator does
/// not watch is not affected. Every create is a server-side dry run: nothing is stored, so
/// no operator ever acts on these connections.
async fn the_admission_policy_refuses_what_the_operator_would(world: Arc<World>) -> anyhow::Result<()> {
    let client = world.client();
    let watched = world.control_plane.create_namespace("policy-vap").await?;
    let unwatched = world.control_plane.create_namespace("policy-vap-other").await?;
    let release = format!("r-{watched}");
    let manifest = helm_template(
        &world,
        &[
            release,
            "--set".into(),
            "policy.admissionPolicy.enabled=true".into(),
            // The host policy alone; admission.rs runs both.
            "--set".into(),
            "policy.secretReferences.admissionPolicy.enabled=false".into(),
            "--set".into(),
            "policy.allowedHosts={*.camunda.io,10.0.0.0/8,tasklist.example.com,169.254.0.0/16}".into(),
            "--set".into(),
            "policy.allowHttp=false".into(),
            "--set".into(),
            "policy.allowInsecureTls=false".into(),
            "--set".into(),
            format!("watchNamespaces={{{watched}}}"),
        ],
    )
    .await?;
    let objects = parse_manifest(&manifest)?;
    let of_kind = |kind: &str| objects.iter().filter(|o| o["kind"] == kind).cloned().collect::<Vec<_>>();
    let (policies, bindings) = (of_kind("ValidatingAdmissionPolicy"), of_kind("ValidatingAdmissionPolicyBinding"));
    ensure!(
        policies.len() == 1 && bindings.len() == 1,
        "expected one policy and one binding, got {} and {}",
        policies.len(),
        bindings.len()
    );
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(policies[0].clone())?;
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(bindings[0].clone())?;
    let policy_api: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let binding_api: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    let created_policy = policy_api
        .create(&PostParams::default(), &policy)
        .await
        .context("creating the policy")?;
    let created_binding = binding_api
        .create(&PostParams::default(), &binding)
        .await
        .context("creating the binding")?;
    let result = check_admission(&client, &watched, &unwatched).await;
    let _ = binding_api
        .delete(&created_binding.metadata.name.unwrap_or_default(), &DeleteParams::default())
        .await;
    let _ = policy_api
        .delete(&created_policy.metadata.name.unwrap_or_default(), &DeleteParams::default())
        .await;
    result
}

async fn check_admission(client: &kube::Client, watched: &str, unwatched: &str) -> anyhow::Result<()> {
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let in_watched: Api<TasklistConnection> = Api::namespaced(client.clone(), watched);
    let mut insecure = spec_at("https://x.camunda.io");
    insecure["tls"] = json!({"insecureSkipVerify": true});
    let violations = [
        (
            "elsewhere",
            json!({"url": "https://evil.example.com", "auth": {"oauth2": {"tokenUrl": "https://login.camunda.io/oauth/token", "clientSecretRef": {"name": "c"}}}}),
            "must name an allowed host (*.camunda.io,10.0.0.0/8,tasklist.example.com,169.254.0.0/16); not allowed: evil.example.com",
        ),
        (
            "by-address",
            spec_at("https://192.168.1.10"),
            "not allowed: 192.168.1.10, 192.168.1.10",
        ),
        (
            "metadata",
            // Listed, yet refused: link-local stays denied (cloud metadata).
            spec_at("https://169.254.169.254"),
            "must not name a link-local address",
        ),
        ("plain-http", spec_at("http://tasklist.example.com"), "must use https://"),
        ("insecure", insecure, "spec.tls.insecureSkipVerify must not be true"),
    ];
    // The API server loads a new policy within a second or so: wait until the first
    // violation is refused.
    let first_violation = connection("plain-http", spec_at("http://tasklist.example.com"))?;
    eventually("the ValidatingAdmissionPolicy taking effect", Duration::from_secs(30), || async {
        Ok(match in_watched.create(&dry_run, &first_violation).await {
            Ok(_) => Check::NotYet("a violation was still accepted".to_owned()),
            Err(_) => Check::Done(()),
        })
    })
    .await?;
    for (name, spec, says) in violations {
        match in_watched.create(&dry_run, &connection(name, spec)?).await {
            Ok(_) => bail!("{name}: the API server accepted a connection the policy forbids"),
            Err(kube::Error::Api(response)) => ensure!(
                response.message.contains(says) && response.code == 403,
                "{name}: refused with {} {:?}; expected a message containing {says:?}",
                response.code,
                response.message
            ),
            Err(other) => bail!("{name}: {other}"),
        }
    }
    for (name, base) in [
        ("saas", "https://bru-2.tasklist.camunda.io/abc"),
        ("named", "https://tasklist.example.com"),
        ("cluster", "https://10.1.2.3:8443"),
    ] {
        in_watched
            .create(&dry_run, &connection(name, spec_at(base))?)
            .await
            .with_context(|| format!("{name}: an allowed connection was refused"))?;
    }
    let in_unwatched: Api<TasklistConnection> = Api::namespaced(client.clone(), unwatched);
    in_unwatched
        .create(&dry_run, &connection("plain-http", spec_at("http://tasklist.example.com"))?)
        .await
        .context("the policy applies only to the namespaces the operator watches, yet refused one in another namespace")?;
    Ok(())
}

/// Create-if-absent: the derived Secret does not exist when the operator checks it; while
/// the token request is in flight (a slow token endpoint), someone creates a Secret of that
/// name. The operator's write must fail rather than overwrite it: the foreign Secret keeps
/// its data and gains no owner, and the connection reports `SecretConflict`.
async fn a_secret_created_while_the_token_is_requested_is_not_taken_over(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "policy-race").await?;
    // Slower than the check, faster than the operator's 3 s request timeout in tests.
    s.standin.set_token_endpoint(EndpointMode::Slow(Duration::from_millis(2000)));
    s.apply_connection("orders", s.saas_spec()).await?;
    wait_until("the operator's token request", Duration::from_secs(30), || {
        s.standin.token_requests_arrived() > 0
    })
    .await?;
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("orders-tasklist-auth".into()),
            ..ObjectMeta::default()
        },
        data: Some([("token".to_owned(), ByteString(b"someone-elses-token".to_vec()))].into()),
        ..Secret::default()
    };
    s.secrets()
        .create(&PostParams::default(), &foreign)
        .await
        .context("creating the foreign Secret")?;
    ensure!(
        s.standin.token_requests().is_empty(),
        "the token request was answered before the foreign Secret existed: the race was not provoked"
    );
    s.remember_secret_value("someone-elses-token");

    s.wait_not_ready_because("orders", "SecretConflict").await?;
    let after = s.secrets().get("orders-tasklist-auth").await?;
    let data = crate::scenario::secret_text(&after);
    ensure!(
        data.len() == 1 && data.get("token").map(String::as_str) == Some("someone-elses-token"),
        "the foreign Secret's data was changed: keys {:?}",
        data.keys().collect::<Vec<_>>()
    );
    ensure!(
        after.metadata.owner_references.as_ref().is_none_or(Vec::is_empty),
        "the foreign Secret gained an owner: {:?}",
        after.metadata.owner_references
    );
    let answered = s.standin.token_requests().len();
    ensure!(answered == 1, "{answered} token requests; expected only the one in flight");
    ensure!(
        s.operator.logs().contains("was created or changed by someone else meanwhile"),
        "the operator did not log why it did not write"
    );
    s.assert_no_credential_leaked().await
}
