//! Every way a client authenticates, end to end: Keycloak 26's three client authenticators
//! (secret in the body, secret in an HTTP Basic header, signed JWT) with tokens for the
//! stand-in Tasklist, OIDC discovery against Keycloak's real `.well-known` document, HTTP
//! Basic to Tasklist, and the reasons a user sees when one of them is set up wrong.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use kube::api::PostParams;
use serde_json::json;
use testsupport::keycloak::{ClientAuthenticator, TASKLIST_AUDIENCE};
use testsupport::keys::{EC_KEY_PEM, OTHER_RSA_KEY_PEM, RSA_KEY_PEM, public_jwks};
use testsupport::standin::AuthKind;

use crate::ScenarioFn;
use crate::scenario::{Scenario, World, condition};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        auth_methods:
        keycloak_client_secret_in_body_via_discovery_and_in_a_basic_header,
        keycloak_private_key_jwt_and_wrong_keys,
        basic_auth_to_tasklist,
        invalid_auth_manifests_are_rejected,
    ]
}

/// The Authenticated condition's (status, reason, message).
fn authenticated(connection: &tasklist_operator::crd::TasklistConnection) -> Option<(String, String, String)> {
    crate::scenario::find_condition(connection, "Authenticated").map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn keycloak_client_secret_in_body_via_discovery_and_in_a_basic_header(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "kc-secret").await?;
    let keycloak = &world.keycloak;
    s.standin.trust_jwks(&keycloak.jwks_url());
    let client_id = format!("{}-secret", s.namespace);
    let secret = keycloak
        .add_client(&client_id, &ClientAuthenticator::Secret)
        .await?
        .context("Keycloak gave no secret")?;
    s.apply_secret("client", &[("client_id", &client_id), ("client_secret", &secret)])
        .await?;

    // client_secret_post, with the token endpoint from Keycloak's discovery document.
    s.apply_connection(
        "discovered",
        json!({
            "url": s.standin.url(),
            "secretName": "discovered-auth",
            "auth": {"oauth2": {"issuerUrl": keycloak.issuer(), "audience": TASKLIST_AUDIENCE, "clientSecretRef": {"name": "client"}}},
        }),
    )
    .await?;
    // client_secret_basic, at the token endpoint named directly.
    s.apply_connection(
        "basic-header",
        json!({
            "url": s.standin.url(),
            "secretName": "basic-header-auth",
            "auth": {"oauth2": {"tokenUrl": keycloak.token_url(), "audience": TASKLIST_AUDIENCE,
                                 "clientAuthentication": "Basic", "clientSecretRef": {"name": "client"}}},
        }),
    )
    .await?;
    let discovered = s.wait_ready("discovered").await?;
    let (_, _, message) = authenticated(&discovered).context("no Authenticated condition")?;
    ensure!(
        message.contains(&keycloak.token_url()) && message.contains(&format!("discovered from issuer {}", keycloak.issuer())),
        "the condition does not name the discovered endpoint: {message}"
    );
    s.wait_ready("basic-header").await?;
    for name in ["discovered-auth", "basic-header-auth"] {
        let data = s.derived_secret(name).await?.context("the derived Secret is missing")?;
        s.remember_credential(&data);
        ensure!(
            s.standin.call_api_with_secret(&data).await? == 200,
            "Tasklist does not accept Keycloak's token from {name}"
        );
    }

    // An issuer that does not answer discovery (Keycloak: 404 for an unknown realm).
    let missing_issuer = format!("{}/realms/no-such-realm", keycloak.base_url());
    s.apply_connection(
        "no-discovery",
        json!({
            "url": s.standin.url(),
            "secretName": "no-discovery-auth",
            "auth": {"oauth2": {"issuerUrl": missing_issuer, "audience": TASKLIST_AUDIENCE, "clientSecretRef": {"name": "client"}}},
        }),
    )
    .await?;
    let failing = s.wait_not_ready_because("no-discovery", "DiscoveryFailed").await?;
    let (_, _, message) = authenticated(&failing).context("no Authenticated condition")?;
    ensure!(
        message.contains(&format!("{missing_issuer}/.well-known/openid-configuration")) && message.contains("404"),
        "the reason does not say what failed: {message}"
    );
    s.assert_no_credential_leaked().await
}

async fn keycloak_private_key_jwt_and_wrong_keys(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "kc-jwt").await?;
    let keycloak = &world.keycloak;
    s.standin.trust_jwks(&keycloak.jwks_url());
    let rsa_client = format!("{}-rsa", s.namespace);
    let ec_client = format!("{}-ec", s.namespace);
    let rsa_jwks = public_jwks(RSA_KEY_PEM, Some("rsa-1"))?;
    keycloak
        .add_client(&rsa_client, &ClientAuthenticator::SignedJwt { jwks: rsa_jwks })
        .await?;
    let ec_jwks = public_jwks(EC_KEY_PEM, Some("ec-1"))?;
    keycloak
        .add_client(&ec_client, &ClientAuthenticator::SignedJwt { jwks: ec_jwks })
        .await?;
    s.apply_secret("rsa-client", &[("client_id", &rsa_client)]).await?;
    s.apply_secret("ec-client", &[("client_id", &ec_client)]).await?;
    s.apply_secret(
        "keys",
        &[("rsa.pem", RSA_KEY_PEM), ("ec.pem", EC_KEY_PEM), ("other.pem", OTHER_RSA_KEY_PEM)],
    )
    .await?;
    for pem in [RSA_KEY_PEM, EC_KEY_PEM, OTHER_RSA_KEY_PEM] {
        s.remember_private_key(pem);
    }
    let spec = |client: &str, key: &str, kid: &str, secret_name: &str| {
        json!({
            "url": s.standin.url(),
            "secretName": secret_name,
            "auth": {"oauth2": {
                "tokenUrl": keycloak.token_url(),
                "audience": TASKLIST_AUDIENCE,
                "clientAuthentication": "PrivateKeyJwt",
                "clientSecretRef": {"name": client},
                "clientAssertionKeyRef": {"name": "keys", "key": key, "keyId": kid},
            }},
        })
    };
    s.apply_connection("rsa", spec("rsa-client", "rsa.pem", "rsa-1", "rsa-auth"))
        .await?;
    s.apply_connection("ec", spec("ec-client", "ec.pem", "ec-1", "ec-auth")).await?;
    s.apply_connection("wrong-key", spec("rsa-client", "other.pem", "rsa-1", "wrong-key-auth"))
        .await?;
    s.apply_connection("wrong-kid", spec("rsa-client", "rsa.pem", "rsa-2", "wrong-kid-auth"))
        .await?;

    for (name, secret) in [("rsa", "rsa-auth"), ("ec", "ec-auth")] {
        s.wait_ready(name).await?;
        let data = s.derived_secret(secret).await?.context("the derived Secret is missing")?;
        s.remember_credential(&data);
        ensure!(
            s.standin.call_api_with_secret(&data).await? == 200,
            "Tasklist does not accept the token the {name} assertion got"
        );
    }
    // Keycloak's own words, and what the user should check.
    let expected = [
        (
            "wrong-key",
            "Signature on JWT token failed validation",
            "the private key is not the registered one",
        ),
        ("wrong-kid", "Unable to load public key", "no public key for this key id"),
    ];
    for (name, keycloak_says, hint) in expected {
        let failing = s.wait_not_ready_because(name, "ClientAssertionRejected").await?;
        let (_, _, message) = authenticated(&failing).context("no Authenticated condition")?;
        ensure!(
            message.contains("the token endpoint rejected the client assertion")
                && message.contains(keycloak_says)
                && message.contains(hint),
            "{name}: {message}"
        );
        ensure!(
            s.derived_secret(&format!("{name}-auth")).await?.is_none(),
            "{name} stored a credential"
        );
    }
    s.assert_no_credential_leaked().await
}

async fn basic_auth_to_tasklist(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "basic").await?;
    s.standin.accept_basic("demo", "first-password");
    s.apply_secret("login", &[("username", "demo"), ("password", "first-password")])
        .await?;
    s.apply_connection(
        "orders",
        json!({
            "url": s.standin.url(),
            "auth": {"basic": {"credentialsSecretRef": {"name": "login"}}},
            "probe": {"method": "GET", "path": "/v2/topology"},
        }),
    )
    .await?;
    let connection = s.wait_ready("orders").await?;
    let status = connection.status.clone().context("no status")?;
    ensure!(
        status.auth_method.as_deref() == Some("basic"),
        "authMethod {:?}",
        status.auth_method
    );
    ensure!(
        status.expires_at.is_none() && status.next_refresh_time.is_none(),
        "a Basic credential has no expiry nor refresh"
    );
    let data = s.derived_secret("orders-tasklist-auth").await?.context("no derived Secret")?;
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    ensure!(keys == ["authorization", "url"], "keys {keys:?}");
    s.remember_secret_value(&data["authorization"]);
    ensure!(data["authorization"].starts_with("Basic "));
    ensure!(s.standin.call_api_with_secret(&data).await? == 200);

    // A new password in the source Secret is in the derived Secret at once.
    s.standin.accept_basic("demo", "second-password");
    s.apply_secret("login", &[("username", "demo"), ("password", "second-password")])
        .await?;
    let old = data["authorization"].clone();
    let data = s
        .wait_for_secret("orders-tasklist-auth", "rewritten", Duration::from_secs(10), |d| {
            d.get("authorization").is_some_and(|value| *value != old)
        })
        .await?;
    s.remember_secret_value(&data["authorization"]);
    ensure!(s.standin.call_api_with_secret(&data).await? == 200);

    // Credentials Tasklist does not know.
    s.apply_secret("login", &[("username", "demo"), ("password", "not-the-password")])
        .await?;
    let refused = s.wait_not_ready_because("orders", "ProbeUnauthorized").await?;
    let (status, _) = condition(&refused, "Authenticated").context("no Authenticated")?;
    ensure!(status == "True", "reading the Secret worked; Tasklist refused it");
    let api = s.standin.api_requests();
    ensure!(api.iter().all(|r| r.auth == AuthKind::Basic), "every probe used Basic");
    ensure!(api.iter().any(|r| r.status == 401), "the refused probe is seen");
    s.assert_no_credential_leaked().await
}

async fn invalid_auth_manifests_are_rejected(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start(&world, "auth-invalid").await?;
    let client = json!({"name": "client"});
    let cases = [
        (
            json!({"basic": {"credentialsSecretRef": {"name": "login"}}, "cookie": {"credentialsSecretRef": {"name": "login"}}}),
            "exactly one of auth.oauth2, auth.cookie or auth.basic",
        ),
        (
            json!({"oauth2": {"tokenUrl": "https://l/t", "issuerUrl": "https://l", "clientSecretRef": client}}),
            "exactly one of auth.oauth2.tokenUrl or auth.oauth2.issuerUrl",
        ),
        (
            json!({"oauth2": {"clientSecretRef": client}}),
            "exactly one of auth.oauth2.tokenUrl or auth.oauth2.issuerUrl",
        ),
        (
            json!({"oauth2": {"issuerUrl": "https://l", "clientAuthentication": "PrivateKeyJwt", "clientSecretRef": client}}),
            "PrivateKeyJwt needs auth.oauth2.clientAssertionKeyRef",
        ),
        (
            json!({"oauth2": {"issuerUrl": "https://l", "clientAuthentication": "Magic", "clientSecretRef": client}}),
            "clientAuthentication",
        ),
        (
            json!({"oauth2": {"issuerUrl": "https://l", "clientAuthentication": "ServiceAccountToken"}}),
            "ServiceAccountToken goes with auth.oauth2.clientAssertion",
        ),
        (
            json!({"oauth2": {"issuerUrl": "https://l", "clientAuthentication": "ServiceAccountToken",
                              "clientAssertion": {"serviceAccountRef": {"name": "bot"}}, "clientSecretRef": client}}),
            "auth.oauth2.clientSecretRef is required, except with clientAuthentication ServiceAccountToken",
        ),
        (
            json!({"oauth2": {"issuerUrl": "https://l"}}),
            "auth.oauth2.clientSecretRef is required",
        ),
        (
            json!({"oauth2": {"issuerUrl": "https://l", "clientId": "orders", "clientSecretRef": client}}),
            "auth.oauth2.clientId is for clientAuthentication ServiceAccountToken",
        ),
        (
            json!({"oauth2": {"issuerUrl": "https://l", "clientAuthentication": "ServiceAccountToken",
                              "clientAssertion": {"serviceAccountRef": {"name": "Not_A_Name"}}}}),
            "must be a Kubernetes object name",
        ),
    ];
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        s.client.clone(),
        &s.namespace,
        &kube::api::ApiResource::erase::<tasklist_operator::crd::TasklistConnection>(&()),
    );
    for (index, (auth, expected)) in cases.into_iter().enumerate() {
        let object: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
            "metadata": {"name": format!("invalid-{index}")},
            "spec": {"url": "https://t.example", "auth": auth},
        }))?;
        let error = api
            .create(&PostParams::default(), &object)
            .await
            .err()
            .context(format!("case {index} was accepted"))?;
        ensure!(
            error.to_string().contains(expected),
            "case {index}: message {error} does not mention {expected:?}"
        );
    }
    // `audience: ""` (Entra) is accepted.
    let entra: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
        "metadata": {"name": "entra"},
        "spec": {"url": "https://t.example", "auth": {"oauth2": {
            "issuerUrl": "https://login.microsoftonline.com/tenant/v2.0", "audience": "", "scope": "api://app/.default",
            "clientSecretRef": client}}},
    }))?;
    api.create(&PostParams::default(), &entra)
        .await
        .context("audience \"\" was refused")?;

    // Every example's connection passes the API server's schema and rules.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let folder = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    // Read first: the YAML parser cannot be held across an await.
    let mut examples = Vec::new();
    for entry in std::fs::read_dir(&folder)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for document in serde_yaml::Deserializer::from_str(&std::fs::read_to_string(&path)?) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document)?;
            if value["kind"] == "TasklistConnection" {
                examples.push((path.clone(), serde_json::from_value::<kube::api::DynamicObject>(value)?));
            }
        }
    }
    ensure!(examples.len() >= 5, "only {} example connections found", examples.len());
    for (path, object) in examples {
        api.create(&dry_run, &object)
            .await
            .with_context(|| format!("the API server refuses {}", path.display()))?;
    }
    Ok(())
}
