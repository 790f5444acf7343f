//! Who may reference a Secret. A TasklistConnection makes the operator read the Secrets it
//! names and send their values, so its author must be allowed to read them:
//! - the chart's ValidatingAdmissionPolicy (on by default) asks the API server's authorizer
//!   whether the requesting user may `get` each referenced Secret, on the real
//!   kube-apiserver, with requesters impersonated by the admin client;
//! - the chart's host policy (opt-in) takes connections of every auth method, `issuerUrl`
//!   included, next to it;
//! - for clusters without admission policies, `--require-secret-opt-in` uses only Secrets
//!   labelled `tasklist.camunda.community/allow-reference: "true"`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tasklist_operator::crd::{REFRESH_ANNOTATION, TasklistConnection};

use crate::ScenarioFn;
use crate::chart::helm_ok;
use crate::scenario::{
    Check, DEFAULT_CLIENT_SECRET, Scenario, World, connection, eventually, find_condition, parse_manifest, start_operator_with,
};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        admission:
        a_requester_who_may_not_read_a_secret_cannot_reference_it,
        a_requester_who_may_not_create_tokens_cannot_name_a_service_account,
        every_auth_method_passes_both_admission_policies,
        without_the_opt_in_label_a_secret_is_not_used,
    ]
}

/// How long a new policy, binding or RoleBinding may take to take effect.
pub(crate) const TAKES_EFFECT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// helpers

/// The admission policies and bindings the chart renders with `values` (scoped to
/// `namespace` through watchNamespaces), created on the API server; [`Installed::remove`]
/// deletes them again.
pub(crate) struct Installed {
    client: Client,
    pub(crate) policies: Vec<String>,
    bindings: Vec<String>,
}

pub(crate) async fn install_admission_policies(world: &World, namespace: &str, values: &[&str]) -> anyhow::Result<Installed> {
    let chart = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/tasklist-operator");
    let release = format!("r-{namespace}");
    let scope = format!("watchNamespaces={{{namespace}}}");
    let mut args = vec![
        "template",
        release.as_str(),
        chart.to_str().context("the chart path is not UTF-8")?,
        "--set",
        scope.as_str(),
    ];
    for value in values {
        args.extend(["--set", value]);
    }
    let objects = parse_manifest(&helm_ok(world, &args).await?)?;
    let client = world.client();
    let mut installed = Installed {
        client: client.clone(),
        policies: Vec::new(),
        bindings: Vec::new(),
    };
    for object in objects.iter().filter(|o| o["kind"] == "ValidatingAdmissionPolicy") {
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(object.clone())?;
        let created = Api::<ValidatingAdmissionPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy)
            .await
            .with_context(|| format!("the API server refuses the chart's policy {}", policy.name_any()))?;
        installed.policies.push(created.name_any());
    }
    for object in objects.iter().filter(|o| o["kind"] == "ValidatingAdmissionPolicyBinding") {
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(object.clone())?;
        let created = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .with_context(|| format!("the API server refuses the chart's binding {}", binding.name_any()))?;
        installed.bindings.push(created.name_any());
    }
    Ok(installed)
}

impl Installed {
    pub(crate) async fn remove(self) {
        for name in &self.bindings {
            let _ = Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone())
                .delete(name, &DeleteParams::default())
                .await;
        }
        for name in &self.policies {
            let _ = Api::<ValidatingAdmissionPolicy>::all(self.client.clone())
                .delete(name, &DeleteParams::default())
                .await;
        }
    }
}

/// A client that acts as `user` (the admin client with `Impersonate-User`), as
/// `kubectl --as=<user>` does.
pub(crate) async fn acting_as(world: &World, user: &str) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(world.control_plane.kubeconfig())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = Some(user.to_owned());
    Ok(Client::try_from(config)?)
}

/// Grants `user` the `rules` in `namespace` (a Role and a RoleBinding named `name`).
pub(crate) async fn grant(world: &World, namespace: &str, name: &str, user: &str, rules: Value) -> anyhow::Result<()> {
    let role: Role = serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules}))?;
    Api::<Role>::namespaced(world.client(), namespace)
        .create(&PostParams::default(), &role)
        .await
        .with_context(|| format!("creating Role {name}"))?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
    }))?;
    Api::<RoleBinding>::namespaced(world.client(), namespace)
        .create(&PostParams::default(), &binding)
        .await
        .with_context(|| format!("creating RoleBinding {name}"))?;
    Ok(())
}

/// Creating, reading, changing and deleting TasklistConnections; nothing about Secrets.
fn connection_editor_rules() -> Value {
    json!([{
        "apiGroups": ["tasklist.camunda.community"],
        "resources": ["tasklistconnections"],
        "verbs": ["create", "get", "list", "update", "patch", "delete"],
    }])
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

/// The API server's refusal of `outcome`: a 403 with its message; anything else fails.
pub(crate) fn refusal<T>(what: &str, outcome: Result<T, kube::Error>) -> anyhow::Result<String> {
    match outcome {
        Ok(_) => bail!("{what}: the API server accepted it"),
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(status.message),
        Err(other) => bail!("{what}: failed otherwise than with a 403: {other}"),
    }
}

/// Waits until a dry-run create of `probe` by `api`'s user is refused with a message
/// containing `says` (a new policy takes a moment to load); the message.
async fn wait_until_refused(what: &str, api: &Api<TasklistConnection>, probe: &TasklistConnection, says: &str) -> anyhow::Result<String> {
    eventually(what, TAKES_EFFECT, || async {
        Ok(match api.create(&dry_run(), probe).await {
            Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains(says) => Check::Done(status.message),
            Ok(_) => Check::NotYet("the API server still accepts it".to_owned()),
            Err(other) => Check::NotYet(format!("refused otherwise: {other}")),
        })
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 1. the authorizer at admission

/// A requester (`ci-bot`) who may create TasklistConnections in a namespace but not read
/// its Secrets: a connection naming Secret `db-creds` is refused with the API server's
/// message naming that Secret and the missing permission. Granted `get` on that one
/// Secret, the same request is accepted; editing the connection to name `other-creds`
/// (which ci-bot still may not read) is refused. Someone who may edit connections but read
/// no Secret (`on-call`) may annotate one (the spec stays as it was) but not change its
/// spec, which could redirect the Secret's value. The operator's status writes are a
/// subresource the policy does not match: a user who may patch only status does so.
async fn a_requester_who_may_not_read_a_secret_cannot_reference_it(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("admission-refs").await?;
    let secrets: Api<Secret> = Api::namespaced(world.client(), &namespace);
    for name in ["db-creds", "other-creds"] {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": {"username": "reader", "password": "not-for-ci-bot"},
        }))?;
        secrets.create(&PostParams::default(), &secret).await?;
    }
    grant(&world, &namespace, "ci-bot-connections", "ci-bot", connection_editor_rules()).await?;
    grant(&world, &namespace, "on-call-connections", "on-call", connection_editor_rules()).await?;
    grant(
        &world,
        &namespace,
        "status-writer",
        "status-writer",
        json!([{"apiGroups": ["tasklist.camunda.community"], "resources": ["tasklistconnections/status"], "verbs": ["get", "patch"]}]),
    )
    .await?;
    // The chart's defaults: the Secret-reference policy is on, the host policy off.
    let installed = install_admission_policies(&world, &namespace, &[]).await?;
    let outcome = check_references(&world, &namespace).await;
    installed.remove().await;
    outcome
}

async fn check_references(world: &World, namespace: &str) -> anyhow::Result<()> {
    let as_ci_bot: Api<TasklistConnection> = Api::namespaced(acting_as(world, "ci-bot").await?, namespace);
    let basic = |secret: &str| {
        connection(
            "orders",
            json!({"url": "https://tasklist.example.com", "auth": {"basic": {"credentialsSecretRef": {"name": secret}}}}),
        )
    };
    let expected = format!(
        r#"user "ci-bot" may not get Secret "db-creds" in namespace "{namespace}" (needed by spec.auth.basic.credentialsSecretRef)"#
    );
    wait_until_refused(
        "the Secret-reference policy refusing ci-bot's connection",
        &as_ci_bot,
        &basic("db-creds")?,
        &expected,
    )
    .await?;
    // The real request, not a dry run.
    let message = refusal(
        "ci-bot creating a connection naming db-creds",
        as_ci_bot.create(&PostParams::default(), &basic("db-creds")?).await,
    )?;
    eprintln!("admission: ci-bot creating a connection that names db-creds: API server says: {message}");
    ensure!(message.contains(&expected), "the refusal does not name the Secret: {message}");
    ensure!(
        Api::<TasklistConnection>::namespaced(world.client(), namespace)
            .get_opt("orders")
            .await?
            .is_none(),
        "the refused connection exists"
    );

    // With `get` on db-creds (and nothing else), the same request is accepted.
    grant(
        world,
        namespace,
        "ci-bot-db-creds",
        "ci-bot",
        json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["db-creds"], "verbs": ["get"]}]),
    )
    .await?;
    eventually(
        "ci-bot's connection accepted once ci-bot may get db-creds",
        TAKES_EFFECT,
        || async {
            Ok(match as_ci_bot.create(&PostParams::default(), &basic("db-creds")?).await {
                Ok(_) => Check::Done(()),
                Err(error) => Check::NotYet(error.to_string()),
            })
        },
    )
    .await?;

    // Editing it to name a Secret ci-bot may not read is refused; the stored one is unchanged.
    let to_other = json!({"spec": {"auth": {"basic": {"credentialsSecretRef": {"name": "other-creds"}}}}});
    let message = refusal(
        "ci-bot editing the connection to name other-creds",
        as_ci_bot.patch("orders", &PatchParams::default(), &Patch::Merge(&to_other)).await,
    )?;
    eprintln!("admission: ci-bot editing the connection to name other-creds: API server says: {message}");
    ensure!(
        message.contains(&format!(
            r#"user "ci-bot" may not get Secret "other-creds" in namespace "{namespace}" (needed by spec.auth.basic.credentialsSecretRef)"#
        )),
        "the refusal does not name other-creds: {message}"
    );
    let stored = as_ci_bot.get("orders").await?;
    ensure!(
        stored.spec.auth.basic.as_ref().map(|b| b.credentials_secret_ref.name.as_str()) == Some("db-creds"),
        "the refused edit changed the connection"
    );

    // on-call may edit connections but read no Secret: metadata yes, spec no.
    let as_on_call: Api<TasklistConnection> = Api::namespaced(acting_as(world, "on-call").await?, namespace);
    let annotate = json!({"metadata": {"annotations": {REFRESH_ANNOTATION: "now"}}});
    as_on_call
        .patch("orders", &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .context("on-call annotating the connection (its spec unchanged) was refused")?;
    let redirect = json!({"spec": {"url": "https://tasklist.elsewhere.example.com"}});
    let message = refusal(
        "on-call changing the connection's url",
        as_on_call.patch("orders", &PatchParams::default(), &Patch::Merge(&redirect)).await,
    )?;
    eprintln!("admission: on-call changing the url of a connection that names db-creds: API server says: {message}");
    ensure!(
        message.contains(r#"user "on-call" may not get Secret "db-creds""#),
        "on-call's url change was refused, but not for db-creds: {message}"
    );

    // Status is not matched: a user who may patch only status (as the operator does) can.
    let as_status_writer: Api<TasklistConnection> = Api::namespaced(acting_as(world, "status-writer").await?, namespace);
    let status = json!({"status": {"observedGeneration": 1}});
    as_status_writer
        .patch_status("orders", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("a status patch by a user who may read no Secret was refused: the policy must not match status")?;
    Ok(())
}

/// `clientAuthentication: ServiceAccountToken` makes the operator request tokens of the
/// ServiceAccount a connection names: its author must be allowed to `create`
/// `serviceaccounts/token` for it. `ci-bot` may create connections but no tokens: refused,
/// with the API server's message naming the ServiceAccount; granted `create` on
/// `serviceaccounts/token` for `orders-bot` only, the connection naming `orders-bot` is
/// accepted and one naming `reports-bot` still refused.
async fn a_requester_who_may_not_create_tokens_cannot_name_a_service_account(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("admission-sa").await?;
    grant(&world, &namespace, "ci-bot-connections", "ci-bot", connection_editor_rules()).await?;
    let installed = install_admission_policies(&world, &namespace, &[]).await?;
    let outcome = check_service_account_tokens(&world, &namespace).await;
    installed.remove().await;
    outcome
}

async fn check_service_account_tokens(world: &World, namespace: &str) -> anyhow::Result<()> {
    let as_ci_bot: Api<TasklistConnection> = Api::namespaced(acting_as(world, "ci-bot").await?, namespace);
    let secretless = |account: &str| {
        connection(
            "orders",
            json!({"url": "https://tasklist.example.com", "auth": {"oauth2": {
                "tokenUrl": "https://keycloak.example.com/auth/realms/camunda-platform/protocol/openid-connect/token",
                "audience": "tasklist-api",
                "clientAuthentication": "ServiceAccountToken",
                "clientAssertion": {"serviceAccountRef": {"name": account}},
            }}}),
        )
    };
    let expected = format!(
        r#"user "ci-bot" may not create tokens of ServiceAccount "orders-bot" in namespace "{namespace}" (create serviceaccounts/token, needed by spec.auth.oauth2.clientAssertion.serviceAccountRef)"#
    );
    wait_until_refused(
        "the admission policy refusing ci-bot's secretless connection",
        &as_ci_bot,
        &secretless("orders-bot")?,
        &expected,
    )
    .await?;
    let message = refusal(
        "ci-bot creating a connection naming ServiceAccount orders-bot",
        as_ci_bot.create(&PostParams::default(), &secretless("orders-bot")?).await,
    )?;
    eprintln!("admission: ci-bot creating a connection that names ServiceAccount orders-bot: API server says: {message}");
    ensure!(
        message.contains(&expected),
        "the refusal does not name the ServiceAccount: {message}"
    );

    grant(
        world,
        namespace,
        "ci-bot-orders-bot-tokens",
        "ci-bot",
        json!([{"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["orders-bot"], "verbs": ["create"]}]),
    )
    .await?;
    eventually(
        "ci-bot's connection accepted once ci-bot may create tokens of orders-bot",
        TAKES_EFFECT,
        || async {
            Ok(match as_ci_bot.create(&dry_run(), &secretless("orders-bot")?).await {
                Ok(_) => Check::Done(()),
                Err(error) => Check::NotYet(error.to_string()),
            })
        },
    )
    .await?;
    let message = refusal(
        "ci-bot naming ServiceAccount reports-bot",
        as_ci_bot.create(&dry_run(), &secretless("reports-bot")?).await,
    )?;
    ensure!(
        message.contains(r#"may not create tokens of ServiceAccount "reports-bot""#),
        "{message}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. both policies, every auth method

/// A Secret a connection names and the field that names it.
type Reference = (&'static str, &'static str);

/// One connection per auth method (name, spec, references in the order the policy checks
/// them), every Secret reference of the CRD among them.
fn every_auth_method() -> Vec<(&'static str, Value, Vec<Reference>)> {
    vec![
        (
            "oauth2-token-url",
            json!({"url": "https://orders.tasklist.camunda.io/abc",
                   "auth": {"oauth2": {"tokenUrl": "https://login.cloud.camunda.io/oauth/token", "clientSecretRef": {"name": "client"}}}}),
            vec![("client", "spec.auth.oauth2.clientSecretRef")],
        ),
        (
            "oauth2-issuer-url",
            json!({"url": "https://tasklist.example.com",
                   "auth": {"oauth2": {"issuerUrl": "https://idp.example.com/realms/camunda", "clientSecretRef": {"name": "client"}}}}),
            vec![("client", "spec.auth.oauth2.clientSecretRef")],
        ),
        (
            "private-key-jwt",
            json!({"url": "https://tasklist.example.com",
                   "auth": {"oauth2": {"issuerUrl": "https://idp.example.com/tenant/v2.0", "audience": "", "scope": "api://tasklist/.default",
                                       "clientAuthentication": "PrivateKeyJwt", "clientSecretRef": {"name": "client"},
                                       "clientAssertionKeyRef": {"name": "keys", "keyId": "k1"}}},
                   "tls": {"caSecretRef": {"name": "ca"}}}),
            vec![
                ("client", "spec.auth.oauth2.clientSecretRef"),
                ("keys", "spec.auth.oauth2.clientAssertionKeyRef"),
                ("ca", "spec.tls.caSecretRef"),
            ],
        ),
        (
            "basic",
            json!({"url": "https://tasklist.example.com", "auth": {"basic": {"credentialsSecretRef": {"name": "login"}}}}),
            vec![("login", "spec.auth.basic.credentialsSecretRef")],
        ),
        (
            "cookie",
            json!({"url": "https://tasklist.example.com", "auth": {"cookie": {"credentialsSecretRef": {"name": "login"}}}}),
            vec![("login", "spec.auth.cookie.credentialsSecretRef")],
        ),
    ]
}

/// Both of the chart's policies on, with an administrator's host policy: a connection of
/// every auth method (oauth2 with tokenUrl, with issuerUrl, private_key_jwt with a CA
/// bundle, basic, cookie) passes both when its author may read its Secrets; an issuer on a
/// host outside the policy, or over http, is refused by the host policy; and a requester
/// who may read no Secret is refused each of them, every referenced Secret named with its
/// field. Dry runs: nothing is stored.
async fn every_auth_method_passes_both_admission_policies(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("admission-both").await?;
    grant(
        &world,
        &namespace,
        "dev",
        "dev",
        json!([
            {"apiGroups": ["tasklist.camunda.community"], "resources": ["tasklistconnections"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        ]),
    )
    .await?;
    grant(&world, &namespace, "stranger", "stranger", connection_editor_rules()).await?;
    let installed = install_admission_policies(
        &world,
        &namespace,
        &[
            "policy.admissionPolicy.enabled=true",
            "policy.allowedHosts={*.camunda.io,idp.example.com,tasklist.example.com}",
            "policy.allowHttp=false",
            "policy.allowInsecureTls=false",
        ],
    )
    .await?;
    let outcome = check_both(&world, &namespace, installed.policies.len()).await;
    installed.remove().await;
    outcome
}

async fn check_both(world: &World, namespace: &str, policies: usize) -> anyhow::Result<()> {
    let as_dev: Api<TasklistConnection> = Api::namespaced(acting_as(world, "dev").await?, namespace);
    let as_stranger: Api<TasklistConnection> = Api::namespaced(acting_as(world, "stranger").await?, namespace);
    // Both policies loaded: each refuses its first violation.
    let plain_http = connection(
        "plain-http",
        json!({"url": "https://tasklist.example.com", "auth": {"oauth2": {"issuerUrl": "http://idp.example.com/realms/camunda", "clientSecretRef": {"name": "client"}}}}),
    )?;
    let message = wait_until_refused("the host policy refusing an http issuer", &as_dev, &plain_http, "must use https://").await?;
    eprintln!("admission: dev creating a connection with an http:// issuerUrl: API server says: {message}");
    let (name, spec, _) = every_auth_method().swap_remove(0);
    wait_until_refused(
        "the Secret-reference policy refusing the stranger",
        &as_stranger,
        &connection(name, spec)?,
        "may not get Secret",
    )
    .await?;

    for (name, spec, references) in every_auth_method() {
        let object = connection(name, spec)?;
        as_dev
            .create(&dry_run(), &object)
            .await
            .with_context(|| format!("{name}: a connection within the policy, by a user who may read its Secrets, was refused"))?;
        // The API server reports the first failed validation: the first reference.
        let message = refusal(&format!("{name} by the stranger"), as_stranger.create(&dry_run(), &object).await)?;
        eprintln!("admission: the stranger creating {name}: API server says: {message}");
        let (secret, field) = references[0];
        let says = format!(r#"user "stranger" may not get Secret "{secret}" in namespace "{namespace}" (needed by {field})"#);
        ensure!(message.contains(&says), "{name}: the refusal does not say {says:?}: {message}");
    }

    // Every reference counts: granted one Secret after another, the stranger is refused
    // for the next one until it may read all three of private_key_jwt's.
    let (name, spec, references) = every_auth_method().swap_remove(2);
    let object = connection(name, spec)?;
    for (granted, (secret, _)) in references.iter().enumerate() {
        grant(
            world,
            namespace,
            &format!("stranger-{secret}"),
            "stranger",
            json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get"]}]),
        )
        .await?;
        let next = references.get(granted + 1);
        eventually(
            &format!("{name}: the stranger, granted {secret}, refused for {next:?}"),
            TAKES_EFFECT,
            || async {
                let outcome = as_stranger.create(&dry_run(), &object).await;
                Ok(match (next, outcome) {
                    (None, Ok(_)) => Check::Done(()),
                    (Some((secret, field)), Err(kube::Error::Api(status)))
                        if status.code == 403
                            && status
                                .message
                                .contains(&format!(r#"Secret "{secret}" in namespace "{namespace}" (needed by {field})"#)) =>
                    {
                        eprintln!("admission: the stranger creating {name}: API server says: {}", status.message);
                        Check::Done(())
                    }
                    (_, outcome) => Check::NotYet(format!("{:?}", outcome.map(|_| "accepted"))),
                })
            },
        )
        .await?;
    }

    let elsewhere = connection(
        "elsewhere",
        json!({"url": "https://tasklist.example.com", "auth": {"oauth2": {"issuerUrl": "https://evil.example.com/realms/camunda", "clientSecretRef": {"name": "client"}}}}),
    )?;
    let message = refusal("an issuer outside the allowed hosts", as_dev.create(&dry_run(), &elsewhere).await)?;
    eprintln!("admission: dev creating a connection whose issuerUrl is not allowed: API server says: {message}");
    ensure!(
        message.contains("must name an allowed host") && message.contains("not allowed: evil.example.com"),
        "the issuer's host is not the one refused: {message}"
    );
    ensure!(
        policies == 2,
        "the chart rendered {policies} admission policies; expected the host policy and the Secret-reference policy"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. the operator-side opt-in

/// `--require-secret-opt-in`: a connection whose Secret lacks the label
/// `tasklist.camunda.community/allow-reference: "true"` reports `SecretNotOptedIn`, naming
/// the Secret, and the stand-in receives no request at all; once the label is added, the
/// connection becomes Ready with one token request.
async fn without_the_opt_in_label_a_secret_is_not_used(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("admission-opt-in").await?;
    let kubeconfig = world.control_plane.kubeconfig();
    let operator = start_operator_with(kubeconfig, &namespace, &["--require-secret-opt-in"], &[])?;
    let mut s = Scenario::with_operator(&world, &namespace, kubeconfig, operator).await?;
    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    s.apply_secret("login", &[("username", "demo"), ("password", "demo-password")])
        .await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.apply_connection(
        "login",
        json!({"url": s.standin.url(), "auth": {"basic": {"credentialsSecretRef": {"name": "login"}}}}),
    )
    .await?;

    for (name, secret, field) in [
        ("orders", "client", "spec.auth.oauth2.clientSecretRef"),
        ("login", "login", "spec.auth.basic.credentialsSecretRef"),
    ] {
        let connection = s.wait_not_ready_because(name, "SecretNotOptedIn").await?;
        let authenticated = find_condition(&connection, "Authenticated").context("no Authenticated condition")?;
        let says = format!(r#"Secret "{secret}" ({field}) does not carry the label tasklist.camunda.community/allow-reference: "true""#);
        ensure!(
            authenticated.status == "False" && authenticated.reason == "SecretNotOptedIn" && authenticated.message.contains(&says),
            "{name}: Authenticated is {} {}: {:?}; expected it to say {says:?}",
            authenticated.status,
            authenticated.reason,
            authenticated.message
        );
        eprintln!("admission: {name} without the opt-in label: {}", authenticated.message);
        ensure!(
            s.derived_secret(&format!("{name}-tasklist-auth")).await?.is_none(),
            "{name}: a derived Secret was written"
        );
    }
    let (tokens, api) = (s.standin.token_requests_arrived(), s.standin.api_requests().len());
    ensure!(
        tokens == 0 && api == 0,
        "the stand-in received {tokens} token and {api} API requests from connections whose Secrets did not opt in"
    );

    // Opting the client's Secret in wakes its connection (the metadata watch sees the label).
    let label = json!({"metadata": {"labels": {"tasklist.camunda.community/allow-reference": "true"}}});
    s.secrets().patch("client", &PatchParams::default(), &Patch::Merge(&label)).await?;
    s.wait_ready("orders").await?;
    ensure!(
        s.standin.token_requests_arrived() == 1,
        "the opted-in connection should have obtained one token, not {}",
        s.standin.token_requests_arrived()
    );
    let login = s.connections().get("login").await?;
    ensure!(
        find_condition(&login, "Ready").is_some_and(|ready| ready.reason == "SecretNotOptedIn"),
        "the connection whose Secret did not opt in changed: {:?}",
        login.status
    );
    s.assert_no_credential_leaked().await
}
