//! No client secret at all (`clientAuthentication: ServiceAccountToken`): the operator
//! requests a token of the connection's ServiceAccount from the real API server for each
//! token request and sends it as the client assertion.
//! - Keycloak 26.7's federated client authentication: a Kubernetes identity provider whose
//!   issuer is the test API server's `--service-account-issuer` (Keycloak reads its
//!   discovery document and JWKS over HTTPS, trusting the control plane's CA; anonymous
//!   requests may read them through `system:service-account-issuer-discovery`), and a
//!   client authenticated by "Signed JWT - Federated" bound to one ServiceAccount's subject.
//! - Microsoft Entra ID's workload identity federation, in the stand-in's Entra shape: an
//!   app registration with a federated credential (issuer, subject, audience
//!   `api://AzureADTokenExchange`), checked against the API server's JWKS.
//!
//! Each failure a person can act on is shown: a missing ServiceAccount, a TokenRequest
//! refused by RBAC, the API server's own audience, and assertions the provider refuses
//! (another ServiceAccount, a wrong audience, an untrusted issuer).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use testsupport::keycloak::{ClientAuthenticator, TASKLIST_AUDIENCE};
use testsupport::standin::{ENTRA_TASKLIST_RESOURCE, FederatedCredential, StandinOptions, StandinTasklist};

use crate::ScenarioFn;
use crate::scenario::{Scenario, World, find_condition, start_operator_with};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        secretless:
        keycloak_federated_client_with_a_service_account_token,
        entra_shaped_federated_credential_and_rbac,
    ]
}

/// The alias of the Kubernetes identity provider in Keycloak's realm.
const IDENTITY_PROVIDER: &str = "test-cluster";
/// The audience Microsoft Entra ID's federated credentials expect.
const ENTRA_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The ServiceAccount the identity providers know, and one they do not.
const ACCOUNT: &str = "orders-bot";
const OTHER_ACCOUNT: &str = "reports-bot";
/// A ServiceAccount whose client Keycloak knows, but whose issuer it stops trusting.
const UNTRUSTED_ACCOUNT: &str = "audit-bot";

/// Keycloak trusts the test cluster's ServiceAccount issuer: anonymous requests may read
/// the API server's discovery document and JWKS, and the realm has a Kubernetes identity
/// provider for the issuer. Once per test process (Keycloak refuses a second provider for
/// the same issuer).
async fn trust_the_cluster(world: &World) -> anyhow::Result<()> {
    static TRUSTED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    TRUSTED
        .get_or_try_init(|| async {
            let binding: ClusterRoleBinding = serde_json::from_value(json!({
                "metadata": {"name": "e2e-service-account-issuer-discovery-anonymous"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:service-account-issuer-discovery"},
                "subjects": [{"kind": "Group", "name": "system:unauthenticated", "apiGroup": "rbac.authorization.k8s.io"}],
            }))?;
            Api::<ClusterRoleBinding>::all(world.client())
                .create(&PostParams::default(), &binding)
                .await
                .context("binding system:service-account-issuer-discovery to system:unauthenticated")?;
            world
                .keycloak
                .add_kubernetes_identity_provider(IDENTITY_PROVIDER, &world.control_plane.service_account_issuer())
                .await
        })
        .await
        .map(|_| ())
}

async fn create_service_accounts(s: &Scenario, names: &[&str]) -> anyhow::Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(s.client.clone(), &s.namespace);
    for name in names {
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        accounts.create(&PostParams::default(), &account).await?;
    }
    Ok(())
}

fn subject(namespace: &str, account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{account}")
}

/// The Authenticated condition's message.
fn authenticated_message(connection: &tasklist_operator::crd::TasklistConnection) -> String {
    find_condition(connection, "Authenticated")
        .map(|condition| condition.message.clone())
        .unwrap_or_default()
}

/// The claims of a JWT's payload (not verified: the stand-in verified it).
fn claims(token: &str) -> anyhow::Result<Value> {
    let payload = token.split('.').nth(1).context("not a JWT")?;
    Ok(serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?,
    )?)
}

/// The namespace holds no Secret but the derived ones (`derived`): nothing secret was
/// needed, and no ServiceAccount token was stored.
async fn only_derived_secrets(s: &Scenario, derived: &[&str]) -> anyhow::Result<()> {
    let names: Vec<String> = s
        .secrets()
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter_map(|secret| secret.metadata.name)
        .collect();
    ensure!(
        names.iter().all(|name| derived.contains(&name.as_str())),
        "Secrets besides the derived ones: {names:?}"
    );
    Ok(())
}

/// Keycloak with a "Signed JWT - Federated" client bound to ServiceAccount orders-bot: a
/// connection without any Secret becomes Ready with a token Keycloak issued to that client
/// (with and without `clientId`, which Keycloak does not need), refreshes it, and the
/// stand-in Tasklist accepts it. Then each failure: another ServiceAccount (the subject
/// changed: Keycloak refuses), a ServiceAccount that does not exist, an audience Keycloak
/// does not expect, and the API server's own audience (no token is requested).
async fn keycloak_federated_client_with_a_service_account_token(world: Arc<World>) -> anyhow::Result<()> {
    trust_the_cluster(&world).await?;
    let s = Scenario::start(&world, "kc-sa").await?;
    let keycloak = &world.keycloak;
    s.standin.trust_jwks(&keycloak.jwks_url());
    create_service_accounts(&s, &[ACCOUNT, OTHER_ACCOUNT]).await?;
    let client_id = format!("{}-federated", s.namespace);
    let federated = ClientAuthenticator::Federated {
        identity_provider: IDENTITY_PROVIDER.to_owned(),
        subject: subject(&s.namespace, ACCOUNT),
    };
    keycloak.add_client(&client_id, &federated).await?;
    // Short-lived tokens, so that a refresh is seen within the scenario.
    keycloak
        .set_client_attributes(&client_id, json!({"access.token.lifespan": "20"}))
        .await?;

    let spec = |secret_name: &str, assertion: Value, client_id: Option<&str>| {
        let mut oauth2 = json!({
            "tokenUrl": keycloak.token_url(),
            "audience": TASKLIST_AUDIENCE,
            "clientAuthentication": "ServiceAccountToken",
            "clientAssertion": assertion,
        });
        if let Some(client_id) = client_id {
            oauth2["clientId"] = json!(client_id);
        }
        json!({"url": s.standin.url(), "secretName": secret_name, "auth": {"oauth2": oauth2}})
    };
    let account = |name: &str| json!({"serviceAccountRef": {"name": name}});
    s.apply_connection("orders", spec("orders-auth", account(ACCOUNT), Some(&client_id)))
        .await?;
    s.apply_connection("no-client-id", spec("no-client-id-auth", account(ACCOUNT), None))
        .await?;
    for (name, secret) in [("orders", "orders-auth"), ("no-client-id", "no-client-id-auth")] {
        s.wait_ready(name).await?;
        let data = s.derived_secret(secret).await?.context("the derived Secret is missing")?;
        let token = data.get("token").context("no token in the derived Secret")?;
        let issued = claims(token)?;
        ensure!(
            issued["azp"] == json!(client_id) && issued["iss"] == json!(keycloak.issuer()),
            "{name}: the token was not issued by Keycloak to {client_id}: azp {}, iss {}",
            issued["azp"],
            issued["iss"]
        );
        ensure!(
            s.standin.call_api_with_secret(&data).await? == 200,
            "Tasklist does not accept Keycloak's token from {name}"
        );
    }
    only_derived_secrets(&s, &["orders-auth", "no-client-id-auth"]).await?;

    // Refreshed before it expires (20 s), with a new ServiceAccount token.
    let first = s.derived_secret("orders-auth").await?.context("the derived Secret is missing")?;
    let refreshed = s
        .wait_for_secret("orders-auth", "refreshed", Duration::from_secs(60), |data| {
            data.get("token") != first.get("token")
        })
        .await?;
    ensure!(
        s.standin.call_api_with_secret(&refreshed).await? == 200,
        "Tasklist does not accept the refreshed token"
    );

    // The subject changed: Keycloak knows no client for reports-bot.
    s.apply_connection("other-account", spec("other-account-auth", account(OTHER_ACCOUNT), None))
        .await?;
    let refused = s.wait_not_ready_because("other-account", "ClientAssertionRejected").await?;
    let message = authenticated_message(&refused);
    eprintln!("secretless: another ServiceAccount at Keycloak: {message}");
    ensure!(
        message.contains("the token endpoint refused a token of ServiceAccount \"reports-bot\"")
            && message.contains(&subject(&s.namespace, OTHER_ACCOUNT)),
        "the refusal does not name the ServiceAccount and the token's subject: {message}"
    );
    // The same, with the client id of the client bound to orders-bot: refused too.
    s.apply_connection(
        "other-account-with-id",
        spec("other-account-with-id-auth", account(OTHER_ACCOUNT), Some(&client_id)),
    )
    .await?;
    s.wait_not_ready_because("other-account-with-id", "ClientAssertionRejected").await?;

    // A ServiceAccount that does not exist.
    s.apply_connection("ghost", spec("ghost-auth", account("ghost"), None)).await?;
    let missing = s.wait_not_ready_because("ghost", "ServiceAccountNotFound").await?;
    let message = authenticated_message(&missing);
    eprintln!("secretless: a missing ServiceAccount: {message}");
    ensure!(
        message.contains("ServiceAccount \"ghost\" not found"),
        "the reason does not name the ServiceAccount: {message}"
    );

    // An audience Keycloak does not expect.
    let wrong_audience = json!({"serviceAccountRef": {"name": ACCOUNT}, "audience": "https://elsewhere.example/realms/other"});
    s.apply_connection("wrong-audience", spec("wrong-audience-auth", wrong_audience, None))
        .await?;
    let refused = s.wait_not_ready_because("wrong-audience", "ClientAssertionRejected").await?;
    eprintln!("secretless: a wrong audience at Keycloak: {}", authenticated_message(&refused));

    // The API server's own audience: no token is requested at all.
    let own = json!({"serviceAccountRef": {"name": ACCOUNT}, "audience": world.control_plane.service_account_issuer()});
    s.apply_connection("api-server-audience", spec("api-server-audience-auth", own, None))
        .await?;
    let refused = s.wait_not_ready_because("api-server-audience", "AudienceNotAllowed").await?;
    let message = authenticated_message(&refused);
    eprintln!("secretless: the API server's own audience: {message}");
    ensure!(message.contains("the API server's own audience"), "{message}");

    // An issuer Keycloak does not trust: its identity provider now names another cluster.
    // Last, and put back at once: it refuses every connection of this scenario meanwhile.
    // A client and ServiceAccount of its own, so that no token another connection shares
    // (the token cache) answers for it.
    let issuer = world.control_plane.service_account_issuer();
    create_service_accounts(&s, &[UNTRUSTED_ACCOUNT]).await?;
    let untrusted_client = format!("{}-untrusted", s.namespace);
    let federated = ClientAuthenticator::Federated {
        identity_provider: IDENTITY_PROVIDER.to_owned(),
        subject: subject(&s.namespace, UNTRUSTED_ACCOUNT),
    };
    keycloak.add_client(&untrusted_client, &federated).await?;
    keycloak
        .set_identity_provider_issuer(IDENTITY_PROVIDER, "https://another-cluster.example")
        .await?;
    s.apply_connection(
        "untrusted-issuer",
        spec("untrusted-issuer-auth", account(UNTRUSTED_ACCOUNT), Some(&untrusted_client)),
    )
    .await?;
    let refused = s.wait_not_ready_because("untrusted-issuer", "ClientAssertionRejected").await;
    let stored = s.derived_secret("untrusted-issuer-auth").await;
    keycloak.set_identity_provider_issuer(IDENTITY_PROVIDER, &issuer).await?;
    ensure!(stored?.is_none(), "untrusted-issuer stored a credential");
    let message = authenticated_message(&refused?);
    eprintln!("secretless: an untrusted issuer at Keycloak: {message}");
    ensure!(
        message.contains(&format!("issuer \"{issuer}\"")),
        "the refusal does not name the token's issuer: {message}"
    );
    // The issuer was the only thing wrong: trusted again, the same connection gets its token
    // (after the 30 s pause a rejection earns).
    s.wait_for_connection(
        "untrusted-issuer",
        "Ready once the issuer is trusted again",
        Duration::from_secs(120),
        |c| crate::scenario::condition(c, "Ready").is_some_and(|(status, _)| status == "True"),
    )
    .await?;

    for name in [
        "other-account",
        "other-account-with-id",
        "ghost",
        "wrong-audience",
        "api-server-audience",
    ] {
        ensure!(
            s.derived_secret(&format!("{name}-auth")).await?.is_none(),
            "{name} stored a credential"
        );
    }
    s.assert_no_credential_leaked().await
}

/// The stand-in in Microsoft Entra ID's shape (no `audience` parameter; the resource in
/// `scope`), with an app registration whose federated credential trusts the test cluster's
/// issuer, ServiceAccount orders-bot and audience `api://AzureADTokenExchange`, checked
/// against the API server's JWKS: the connection becomes Ready with `client_id` = the app
/// id and `scope=api://tasklist/.default`, and every assertion the stand-in received is a
/// ServiceAccount token of 10 minutes that appears nowhere else. Refused: an app whose
/// credential trusts another issuer, another subject, another audience. Then the operator
/// runs as a ServiceAccount with the chart's rules but without `serviceaccounts/token`:
/// TokenRequestForbidden with the API server's words, Ready once the rule is granted.
async fn entra_shaped_federated_credential_and_rbac(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "entra-sa").await?;
    s.standin = StandinTasklist::start_with(StandinOptions {
        audience: String::new(),
        ..StandinOptions::default()
    })
    .await?;
    create_service_accounts(&s, &[ACCOUNT, OTHER_ACCOUNT]).await?;
    let request = axum::http::Request::get("/openid/v1/jwks").body(Vec::new())?;
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&world.client().request_text(request).await?)?;
    let issuer = world.control_plane.service_account_issuer();
    let credential = |issuer: &str, subject: String| FederatedCredential {
        issuer: issuer.to_owned(),
        subject,
        audience: ENTRA_AUDIENCE.to_owned(),
        jwks: jwks.clone(),
    };
    let app = "3f1c2a9e-0000-4000-8000-00000000a001";
    let untrusting_app = "3f1c2a9e-0000-4000-8000-00000000a002";
    s.standin
        .add_federated_client(app, credential(&issuer, subject(&s.namespace, ACCOUNT)));
    s.standin.add_federated_client(
        untrusting_app,
        credential("https://another-cluster.example", subject(&s.namespace, ACCOUNT)),
    );
    let spec = |secret_name: &str, app: &str, account: &str, audience: &str| {
        json!({
            "url": s.standin.url(),
            "secretName": secret_name,
            "auth": {"oauth2": {
                "tokenUrl": s.standin.token_url(),
                "audience": "",
                "scope": format!("{ENTRA_TASKLIST_RESOURCE}/.default"),
                "clientAuthentication": "ServiceAccountToken",
                "clientId": app,
                "clientAssertion": {"serviceAccountRef": {"name": account}, "audience": audience},
            }},
        })
    };
    s.apply_connection("orders", spec("orders-auth", app, ACCOUNT, ENTRA_AUDIENCE))
        .await?;
    s.wait_ready("orders").await?;
    let data = s.derived_secret("orders-auth").await?.context("the derived Secret is missing")?;
    ensure!(
        s.standin.call_api_with_secret(&data).await? == 200,
        "Tasklist does not accept the token"
    );
    let request = s
        .standin
        .token_requests()
        .into_iter()
        .find(|request| request.status == 200)
        .context("no token request succeeded")?;
    ensure!(
        request.client_id == app && request.scope.as_deref() == Some("api://tasklist/.default"),
        "the token request had client id {:?} and scope {:?}",
        request.client_id,
        request.scope
    );
    only_derived_secrets(&s, &["orders-auth"]).await?;

    // Refused: an issuer the app does not trust, another subject, another audience.
    let refusals = [
        (
            "untrusted-issuer",
            untrusting_app,
            ACCOUNT,
            ENTRA_AUDIENCE,
            "AADSTS700211",
            "does not trust the token's issuer",
        ),
        (
            "other-subject",
            app,
            OTHER_ACCOUNT,
            ENTRA_AUDIENCE,
            "AADSTS70021:",
            "no client is bound to the token's subject",
        ),
        (
            "other-audience",
            app,
            ACCOUNT,
            "api://SomethingElse",
            "AADSTS700212",
            "expects another audience",
        ),
    ];
    for (name, app, account, audience, _, _) in refusals {
        s.apply_connection(name, spec(&format!("{name}-auth"), app, account, audience))
            .await?;
    }
    for (name, _, _, _, code, hint) in refusals {
        let refused = s.wait_not_ready_because(name, "ClientAssertionRejected").await?;
        let message = authenticated_message(&refused);
        eprintln!("secretless: {name} at the Entra-shaped endpoint: {message}");
        ensure!(message.contains(code) && message.contains(hint), "{name}: {message}");
    }

    // Every assertion received was a 10-minute ServiceAccount token of this namespace, for
    // the audience asked; none may appear in status, Events or logs (the leak check).
    let received = s.standin.federated_assertions_received();
    ensure!(received.len() >= 4, "the stand-in received {} assertions", received.len());
    for assertion in &received {
        s.remember_secret_value(assertion);
        let claims = claims(assertion)?;
        let lifetime = claims["exp"].as_i64().unwrap_or_default() - claims["iat"].as_i64().unwrap_or_default();
        ensure!(lifetime == 600, "a ServiceAccount token of {lifetime} s");
        ensure!(claims["iss"] == json!(issuer), "issuer {}", claims["iss"]);
        ensure!(
            claims["sub"]
                .as_str()
                .is_some_and(|sub| sub.starts_with(&format!("system:serviceaccount:{}:", s.namespace))),
            "subject {}",
            claims["sub"]
        );
    }
    ensure!(
        received.iter().collect::<std::collections::BTreeSet<_>>().len() == received.len(),
        "an assertion was sent twice"
    );

    let rbac_spec = spec("rbac-auth", app, ACCOUNT, ENTRA_AUDIENCE);
    rbac_refused_then_granted(&world, &mut s, rbac_spec).await?;
    s.assert_no_credential_leaked().await
}

/// The operator as a ServiceAccount with the chart's namespaced rules but without
/// `serviceaccounts/token`: a connection is not Ready with TokenRequestForbidden and the
/// API server's words; granted the chart's rule, it becomes Ready.
async fn rbac_refused_then_granted(world: &World, s: &mut Scenario, spec: Value) -> anyhow::Result<()> {
    let chart_rules = json!([
        {"apiGroups": ["tasklist.camunda.community"], "resources": ["tasklistconnections"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["tasklist.camunda.community"], "resources": ["tasklistconnections/status"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]);
    let operator_account = "tasklist-operator";
    bind_role(s, "operator", operator_account, chart_rules).await?;
    let kubeconfig = world
        .control_plane
        .service_account_kubeconfig(&s.namespace, operator_account)
        .await?;
    s.replace_operator(start_operator_with(&kubeconfig, &s.namespace, &[], &[])?)
        .await?;
    s.apply_connection("rbac", spec.clone()).await?;
    let refused = s.wait_not_ready_because("rbac", "TokenRequestForbidden").await?;
    let message = authenticated_message(&refused);
    eprintln!("secretless: the operator without serviceaccounts/token: {message}");
    ensure!(
        message.contains("cannot create resource \"serviceaccounts/token\"") && message.contains(ACCOUNT),
        "the reason does not quote the API server: {message}"
    );
    // `check` with a kubeconfig whose user may not create the token: no credential.
    let manifest = tempfile::NamedTempFile::new()?;
    let connection = json!({
        "apiVersion": "tasklist.camunda.community/v1alpha1",
        "kind": "TasklistConnection",
        "metadata": {"name": "checked", "namespace": s.namespace},
        "spec": spec,
    });
    std::fs::write(manifest.path(), serde_json::to_string(&connection)?)?;
    let (code, output) = check(manifest.path(), &kubeconfig).await?;
    eprintln!("secretless: check without serviceaccounts/token:\n{output}");
    ensure!(
        code == 1 && output.contains("TokenRequestForbidden"),
        "check exited {code}:\n{output}"
    );
    bind_role(
        s,
        "operator-tokens",
        operator_account,
        json!([{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]),
    )
    .await?;
    s.wait_for_connection("rbac", "Ready once the operator may create tokens", Duration::from_secs(120), |c| {
        crate::scenario::condition(c, "Ready").is_some_and(|(status, _)| status == "True")
    })
    .await?;
    let data: BTreeMap<String, String> = s.derived_secret("rbac-auth").await?.context("the derived Secret is missing")?;
    ensure!(s.standin.call_api_with_secret(&data).await? == 200);

    // And `check` with it, now that its user may.
    let (code, output) = check(manifest.path(), &kubeconfig).await?;
    eprintln!("secretless: check with serviceaccounts/token:\n{output}");
    ensure!(
        code == 0 && output.contains("client assertion: a token of ServiceAccount \"orders-bot\""),
        "check exited {code}:\n{output}"
    );
    ensure!(!crate::scenario::contains_jwt(&output), "check printed a token:\n{output}");
    Ok(())
}

/// Runs `tasklist-operator check -f manifest` with `KUBECONFIG=kubeconfig`: exit code and output.
async fn check(manifest: &std::path::Path, kubeconfig: &std::path::Path) -> anyhow::Result<(i32, String)> {
    let (manifest, kubeconfig) = (manifest.to_owned(), kubeconfig.to_owned());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::scenario::operator_binary())
            .arg("check")
            .args(testsupport::operator::LOCAL_TEST_POLICY)
            .arg("-f")
            .arg(&manifest)
            .env("KUBECONFIG", &kubeconfig)
            .output()
    })
    .await??;
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    Ok((output.status.code().unwrap_or(-1), text))
}

/// A Role with `rules` in the scenario's namespace, bound to ServiceAccount `account` there.
async fn bind_role(s: &Scenario, name: &str, account: &str, rules: Value) -> anyhow::Result<()> {
    let role: Role = serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules}))?;
    Api::<Role>::namespaced(s.client.clone(), &s.namespace)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": s.namespace}],
    }))?;
    Api::<RoleBinding>::namespaced(s.client.clone(), &s.namespace)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}
