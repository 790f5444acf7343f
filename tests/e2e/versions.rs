//! Camunda 8.6 to 8.10 as the operator meets them: the session login at `/api/login` (8.6,
//! 8.7), at `/login` (8.8+), and at `/login` demanding a CSRF token from a `GET` first; the
//! default (automatic) probe on a Tasklist with the v1 API only (8.6, 8.7) and with the v2
//! API only (8.10); a token endpoint and Tasklist that require a client certificate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use serde_json::json;
use testsupport::standin::{SESSION_COOKIE, StandinOptions, StandinTasklist, TasklistApis, UNIFIED_SESSION_COOKIE, ZEEBE_AUDIENCE};

use crate::ScenarioFn;
use crate::scenario::{Scenario, World, find_condition, wait_until};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        versions:
        session_login_at_api_login_as_in_8_6_and_8_7,
        session_login_at_login_as_in_8_8,
        session_login_with_a_csrf_pre_fetch,
        default_probe_on_a_v1_only_tasklist,
        default_probe_falls_back_to_v2_on_a_v2_only_tasklist,
        mutual_tls_is_refused_without_the_client_certificate_and_ready_with_it,
    ]
}

const SECRET: &str = "orders-tasklist-auth";

/// A cookie connection logging in at `login_path` of `standin` (which the scenario gets in
/// place of its default one); returns the (path, carried a CSRF header, status) of every
/// login the stand-in saw once the connection is Ready and the stored session works.
async fn session_login_reaches_ready(
    world: &World,
    prefix: &str,
    options: StandinOptions,
    login_path: &str,
    session_cookie: &str,
) -> anyhow::Result<(Scenario, Vec<(&'static str, bool, u16)>)> {
    let mut s = Scenario::start(world, prefix).await?;
    s.standin = StandinTasklist::start_with(options).await?;
    s.standin.add_user("demo", "demo-password-1");
    s.apply_secret("login", &[("username", "demo"), ("password", "demo-password-1")])
        .await?;
    s.apply_connection(
        "orders",
        json!({
            "url": s.standin.url(),
            "auth": {"cookie": {"credentialsSecretRef": {"name": "login"}, "loginPath": login_path}},
            "probe": {"interval": "10s"},
        }),
    )
    .await?;
    s.wait_ready("orders").await?;
    let data = s.derived_secret(SECRET).await?.context("the derived Secret is missing")?;
    s.remember_credential(&data);
    ensure!(
        data["cookie"].contains(&format!("{session_cookie}=")),
        "the cookie key lacks {session_cookie}"
    );
    ensure!(data.contains_key("csrfToken"), "no csrfToken key");
    ensure!(
        s.standin.call_api_with_secret(&data).await? == 200,
        "Tasklist does not accept the stored session"
    );
    let trail = s
        .standin
        .logins()
        .into_iter()
        .map(|login| (login.path, login.csrf_header, login.status))
        .collect();
    Ok((s, trail))
}

async fn session_login_at_api_login_as_in_8_6_and_8_7(world: Arc<World>) -> anyhow::Result<()> {
    let (s, trail) = session_login_reaches_ready(&world, "login86", StandinOptions::default(), "/api/login", SESSION_COOKIE).await?;
    ensure!(trail == [("/api/login", false, 204)], "logins: {trail:?}");
    ensure!(s.standin.login_csrf_fetches() == 0, "a GET for a token nobody asked for");
    Ok(())
}

async fn session_login_at_login_as_in_8_8(world: Arc<World>) -> anyhow::Result<()> {
    let (s, trail) = session_login_reaches_ready(&world, "login88", StandinOptions::default(), "/login", UNIFIED_SESSION_COOKIE).await?;
    ensure!(trail == [("/login", false, 204)], "logins: {trail:?}");
    ensure!(s.standin.login_csrf_fetches() == 0, "a GET for a token nobody asked for");
    Ok(())
}

async fn session_login_with_a_csrf_pre_fetch(world: Arc<World>) -> anyhow::Result<()> {
    let strict = StandinOptions {
        login_requires_csrf: true,
        ..StandinOptions::default()
    };
    let (s, trail) = session_login_reaches_ready(&world, "logincsrf", strict, "/login", UNIFIED_SESSION_COOKIE).await?;
    ensure!(
        trail == [("/login", false, 403), ("/login", true, 204)],
        "expected a refused login, then one with the pre-fetched token: {trail:?}"
    );
    ensure!(
        s.standin.login_csrf_fetches() == 1,
        "{} GETs for a token",
        s.standin.login_csrf_fetches()
    );

    // Tasklist forgets the session: the re-login fetches the token first, with no refused POST.
    let first = s.derived_secret(SECRET).await?.context("the derived Secret is missing")?;
    s.standin.revoke_sessions();
    let second = s
        .wait_for_secret(SECRET, "a new session", Duration::from_secs(25), |data| {
            data.get("cookie") != first.get("cookie")
        })
        .await?;
    s.remember_credential(&second);
    ensure!(
        s.standin.call_api_with_secret(&second).await? == 200,
        "the new session is not accepted"
    );
    let trail: Vec<_> = s
        .standin
        .logins()
        .into_iter()
        .map(|login| (login.path, login.csrf_header, login.status))
        .collect();
    ensure!(
        trail == [("/login", false, 403), ("/login", true, 204), ("/login", true, 204)],
        "expected the re-login with the token at once: {trail:?}"
    );
    Ok(())
}

/// A SaaS-style connection with the default probe against a stand-in serving `apis`, with
/// tokens for `audience`, probed every 10 s; returns once it is Ready, with the Reachable
/// message.
async fn default_probe_reaches_ready(
    world: &World,
    prefix: &str,
    apis: TasklistApis,
    audience: &str,
) -> anyhow::Result<(Scenario, String)> {
    let mut s = Scenario::start(world, prefix).await?;
    s.standin = StandinTasklist::start_with(StandinOptions {
        apis,
        ..StandinOptions::default()
    })
    .await?;
    s.add_saas_client("orders-secret-1").await?;
    let mut spec = s.saas_spec();
    spec["auth"]["oauth2"]["audience"] = json!(audience);
    spec["probe"] = json!({"interval": "10s"});
    s.apply_connection("orders", spec).await?;
    let connection = s.wait_ready("orders").await?;
    let reachable = find_condition(&connection, "Reachable").context("no Reachable condition")?;
    ensure!(
        reachable.status == "True",
        "Reachable is {}: {}",
        reachable.status,
        reachable.message
    );
    let message = reachable.message.clone();
    let data = s.derived_secret(SECRET).await?.context("the derived Secret is missing")?;
    s.remember_credential(&data);
    Ok((s, message))
}

/// (path, status) of the stand-in's API requests.
fn api_trail(s: &Scenario) -> Vec<(String, u16)> {
    s.standin
        .api_requests()
        .into_iter()
        .map(|request| (request.path, request.status))
        .collect()
}

async fn default_probe_on_a_v1_only_tasklist(world: Arc<World>) -> anyhow::Result<()> {
    let (s, message) = default_probe_reaches_ready(&world, "probev1", TasklistApis::V1Only, "tasklist.camunda.io").await?;
    ensure!(
        message.contains("/v1/tasks/search (the Tasklist v1 API, found by the automatic probe) succeeded"),
        "Reachable says: {message}"
    );
    // A second probe, 10 s later: still v1 only.
    wait_until("a second probe", Duration::from_secs(30), || s.standin.api_requests().len() >= 2).await?;
    let trail = api_trail(&s);
    ensure!(
        trail.iter().all(|(path, status)| path == "/v1/tasks/search" && *status == 200),
        "requests: {trail:?}"
    );
    Ok(())
}

async fn default_probe_falls_back_to_v2_on_a_v2_only_tasklist(world: Arc<World>) -> anyhow::Result<()> {
    let (s, message) = default_probe_reaches_ready(&world, "probev2", TasklistApis::V2Only, ZEEBE_AUDIENCE).await?;
    ensure!(
        message.contains("/v2/user-tasks/search (the Tasklist v2 API, found by the automatic probe) succeeded"),
        "Reachable says: {message}"
    );
    // The next probes remember v2: v1 was asked once, at the first probe.
    wait_until("two more probes", Duration::from_secs(40), || s.standin.api_requests().len() >= 4).await?;
    let trail = api_trail(&s);
    let v1: Vec<_> = trail.iter().filter(|(path, _)| path.starts_with("/v1/")).collect();
    ensure!(
        v1 == [&("/v1/tasks/search".to_owned(), 404)],
        "v1 requests: {v1:?} (all: {trail:?})"
    );
    ensure!(
        trail[1..]
            .iter()
            .all(|(path, status)| path == "/v2/user-tasks/search" && *status == 200),
        "requests: {trail:?}"
    );
    Ok(())
}

async fn mutual_tls_is_refused_without_the_client_certificate_and_ready_with_it(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "mtls").await?;
    s.standin = StandinTasklist::start_with(StandinOptions {
        tls: true,
        require_client_certificate: true,
        ..StandinOptions::default()
    })
    .await?;
    s.add_saas_client("orders-secret-1").await?;
    let ca = s.standin.ca_pem().context("the stand-in has a CA")?;
    s.apply_secret("tasklist-ca", &[("ca.crt", &ca)]).await?;
    let mut spec = s.saas_spec();
    spec["tls"] = json!({"caSecretRef": {"name": "tasklist-ca"}});
    s.apply_connection("orders", spec.clone()).await?;
    let refused = s
        .wait_for_connection("orders", "refused for want of a client certificate", Duration::from_secs(30), |c| {
            find_condition(c, "Authenticated")
                .is_some_and(|a| a.status == "False" && testsupport::standin::refused_for_want_of_a_client_certificate(&a.message))
        })
        .await?;
    let authenticated = find_condition(&refused, "Authenticated").context("no Authenticated condition")?;
    ensure!(authenticated.reason == "AuthServerError", "reason {}", authenticated.reason);
    ensure!(
        s.standin.token_requests().is_empty(),
        "a token request got through without a certificate"
    );

    // The user adds a kubernetes.io/tls Secret and references it.
    let (certificate, key) = s.standin.client_identity_pem().context("the stand-in has a client certificate")?;
    s.remember_private_key(&key);
    let tls_secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "operator-client-tls"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": certificate, "tls.key": key},
    }))?;
    s.secrets().create(&PostParams::default(), &tls_secret).await?;
    spec["tls"]["clientCertificateSecretRef"] = json!({"name": "operator-client-tls"});
    s.apply_connection("orders", spec).await?;
    let connection = s.wait_ready("orders").await?;
    let reachable = find_condition(&connection, "Reachable").context("no Reachable condition")?;
    ensure!(reachable.status == "True", "Reachable: {}", reachable.message);
    let data = s.derived_secret(SECRET).await?.context("the derived Secret is missing")?;
    s.remember_credential(&data);
    ensure!(
        s.standin.token_requests().iter().any(|request| request.status == 200),
        "no token was issued over mutual TLS"
    );
    Ok(())
}
