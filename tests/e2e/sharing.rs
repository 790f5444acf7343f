//! One token per client (issue 12, item 2): connections that would send the same token
//! request share one request and the token it brought. Each scenario counts the requests
//! the stand-in's token endpoint received.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use testsupport::standin::StandinTasklist;

use crate::ScenarioFn;
use crate::scenario::{CLIENT_ID, Scenario, World, planned_refresh_and_expiry, saas_spec_for, tail, wait_for_scrape};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        sharing:
        twenty_connections_of_one_client_send_one_token_request,
        rotating_the_shared_client_secret_costs_one_request_for_every_connection,
        a_revoked_shared_token_is_replaced_once_for_every_connection,
    ]
}

const CONNECTIONS: usize = 20;
const CREDENTIAL_REQUESTS: &str = "tasklist_operator_credential_requests_total";
const TOKEN_REQUESTS_SAVED: &str = "tasklist_operator_token_requests_saved_total";

fn name(index: usize) -> String {
    format!("app-{index:02}")
}

fn secret_name(connection: &str) -> String {
    format!("{connection}-tasklist-auth")
}

/// Applies `count` connections named `app-00`... (from `first`) reading client Secret
/// `client_secret_ref`, then waits until every one is Ready.
async fn connect_all(
    s: &Scenario,
    first: usize,
    count: usize,
    client_secret_ref: &str,
    spec_extra: &serde_json::Value,
) -> anyhow::Result<()> {
    for index in first..first + count {
        let mut spec = saas_spec_for(&s.standin, client_secret_ref);
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
            spec.extend(extra.clone());
        }
        s.apply_connection(&name(index), spec).await?;
    }
    for index in first..first + count {
        s.wait_ready(&name(index)).await?;
    }
    Ok(())
}

/// The token in each connection's derived Secret.
async fn tokens(s: &Scenario, range: std::ops::Range<usize>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut tokens = BTreeMap::new();
    for index in range {
        let data = s
            .derived_secret(&secret_name(&name(index)))
            .await?
            .with_context(|| format!("no derived Secret for {}", name(index)))?;
        tokens.insert(name(index), data.get("token").cloned().context("no token key")?);
    }
    Ok(tokens)
}

fn token_requests_by_client(standin: &StandinTasklist) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in standin.token_requests() {
        *counts.entry(request.client_id).or_default() += 1;
    }
    counts
}

/// 20 connections reading one client Secret become Ready with one token request, and each
/// plans its own refresh from the token's real issue time; three connections of another
/// client get a token of their own.
async fn twenty_connections_of_one_client_send_one_token_request(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start_saas(&world, "share").await?;
    s.standin.add_client("billing", "billing-secret-1");
    s.apply_secret("billing", &[("client_id", "billing"), ("client_secret", "billing-secret-1")])
        .await?;
    connect_all(&s, 0, CONNECTIONS, "client", &serde_json::json!({})).await?;
    connect_all(&s, CONNECTIONS, 3, "billing", &serde_json::json!({})).await?;

    let requests = token_requests_by_client(&s.standin);
    eprintln!("token requests by client for {CONNECTIONS} + 3 connections: {requests:?}");
    ensure!(
        requests == BTreeMap::from([(CLIENT_ID.to_owned(), 1), ("billing".to_owned(), 1)]),
        "token requests by client: {requests:?}; expected one per client\n--- operator log (tail) ---\n{}",
        tail(&s.operator.logs(), 30)
    );
    let orders = tokens(&s, 0..CONNECTIONS).await?;
    let billing = tokens(&s, CONNECTIONS..CONNECTIONS + 3).await?;
    let distinct_orders: BTreeSet<&String> = orders.values().collect();
    let distinct_billing: BTreeSet<&String> = billing.values().collect();
    ensure!(
        distinct_orders.len() == 1,
        "{} different tokens for one client",
        distinct_orders.len()
    );
    ensure!(
        distinct_billing.len() == 1,
        "{} different tokens for billing",
        distinct_billing.len()
    );
    ensure!(distinct_orders != distinct_billing, "two clients got the same token");
    for (_, token) in orders.iter().take(1).chain(billing.iter().take(1)) {
        ensure!(
            s.standin
                .call_api_with_secret(&BTreeMap::from([("authorization".to_owned(), format!("Bearer {token}"))]))
                .await?
                == 200,
            "Tasklist refuses the shared token"
        );
    }

    // The same issue time and expiry everywhere (the token's own), a refresh time of each
    // connection's own: 300 s tokens are refreshed 150-180 s after issue.
    let mut issued = BTreeSet::new();
    let mut planned = BTreeSet::new();
    for index in 0..CONNECTIONS {
        let secret = s.secrets().get(&secret_name(&name(index))).await?;
        let issued_at: jiff::Timestamp = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(tasklist_operator::derived_secret::ISSUED_AT))
            .context("no issued-at annotation")?
            .parse()?;
        let (refresh, expiry) = planned_refresh_and_expiry(&secret)?;
        let after = refresh.duration_since(issued_at).as_secs_f64();
        ensure!(
            (150.0..=180.0).contains(&after),
            "{} plans its refresh {after}s after issue",
            name(index)
        );
        ensure!(expiry.duration_since(issued_at).as_secs() == 300, "expiry is not issue + 300 s");
        issued.insert(issued_at);
        planned.insert(refresh);
    }
    ensure!(issued.len() == 1, "{} different issue times for one token", issued.len());
    eprintln!("{} different planned refresh times for {CONNECTIONS} connections", planned.len());
    ensure!(planned.len() > 1, "every connection plans the same refresh time: no jitter");

    // Metrics: real requests only in credential_requests; the rest counted as saved.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let url = s.metrics_url().await?;
    let saved_total = (CONNECTIONS + 3 - 2) as f64;
    let scraped = wait_for_scrape(&http, &url, "the saved token requests", Duration::from_secs(30), |m| {
        m.sums().get(TOKEN_REQUESTS_SAVED).copied() == Some(saved_total)
    })
    .await?;
    ensure!(
        scraped.get(CREDENTIAL_REQUESTS, &[("method", "oauth2"), ("result", "success")]) == Some(2.0),
        "credential_requests{{oauth2,success}} is {:?}, expected 2",
        scraped.get(CREDENTIAL_REQUESTS, &[("method", "oauth2"), ("result", "success")])
    );
    s.assert_no_credential_leaked().await
}

/// Rotating the client Secret that 20 connections share: every connection gets a new
/// token, with one more token request in all, and none with the old secret.
async fn rotating_the_shared_client_secret_costs_one_request_for_every_connection(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start_saas(&world, "rotate-shared").await?;
    connect_all(&s, 0, CONNECTIONS, "client", &serde_json::json!({})).await?;
    let before = tokens(&s, 0..CONNECTIONS).await?;
    let requests_before = s.standin.token_requests().len();
    ensure!(requests_before == 1, "{requests_before} token requests before the rotation");

    s.add_saas_client("orders-secret-2").await?;
    for index in 0..CONNECTIONS {
        let old = before[&name(index)].clone();
        s.wait_for_secret(&secret_name(&name(index)), "a new token", Duration::from_secs(30), |data| {
            data.get("token").is_some_and(|token| *token != old)
        })
        .await?;
    }
    for index in 0..CONNECTIONS {
        s.wait_ready(&name(index)).await?;
    }
    let after = tokens(&s, 0..CONNECTIONS).await?;
    let distinct: BTreeSet<&String> = after.values().collect();
    let requests = s.standin.token_requests();
    eprintln!(
        "rotation: {} token requests in all ({requests_before} before), {} different tokens after",
        requests.len(),
        distinct.len()
    );
    ensure!(
        requests.len() == requests_before + 1,
        "{} token requests after rotating the shared secret, expected {}\n--- operator log (tail) ---\n{}",
        requests.len(),
        requests_before + 1,
        tail(&s.operator.logs(), 30)
    );
    ensure!(
        requests.iter().all(|r| r.status == 200),
        "a token request was refused: {requests:?}"
    );
    ensure!(distinct.len() == 1, "{} different tokens after the rotation", distinct.len());
    s.assert_no_credential_leaked().await
}

/// The token server revokes the token 10 connections share: the first probe that gets a
/// 401 brings one new token, and every other connection that gets a 401 takes that one
/// instead of the revoked token or a request of its own.
async fn a_revoked_shared_token_is_replaced_once_for_every_connection(world: Arc<World>) -> anyhow::Result<()> {
    let count = 10;
    let s = Scenario::start_saas(&world, "revoke-shared").await?;
    connect_all(&s, 0, count, "client", &serde_json::json!({"probe": {"interval": "10s"}})).await?;
    let before = tokens(&s, 0..count).await?;
    ensure!(s.standin.token_requests().len() == 1, "more than one token request to become Ready");

    s.standin.revoke_tokens();
    for index in 0..count {
        let old = before[&name(index)].clone();
        s.wait_for_secret(
            &secret_name(&name(index)),
            "a token issued after the revocation",
            Duration::from_secs(40),
            |data| data.get("token").is_some_and(|token| *token != old),
        )
        .await?;
    }
    for index in 0..count {
        s.wait_ready(&name(index)).await?;
    }
    // Another probe interval for a late second request to show.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = tokens(&s, 0..count).await?;
    let distinct: BTreeSet<&String> = after.values().collect();
    let requests = s.standin.token_requests().len();
    let refused = s.standin.api_requests().iter().filter(|r| r.status == 401).count();
    eprintln!(
        "revocation: {requests} token requests in all, {refused} probes answered 401, {} different tokens after",
        distinct.len()
    );
    ensure!(
        requests == 2,
        "{requests} token requests; expected the first and one after the revocation\n--- operator log (tail) ---\n{}",
        tail(&s.operator.logs(), 30)
    );
    ensure!(distinct.len() == 1, "{} different tokens after the revocation", distinct.len());
    // The connections share the token, so they also share its probe (one request per
    // interval and credential): one 401 is enough for all of them to leave the token.
    ensure!(refused >= 1, "no probe answered 401: the revoked token was never probed");
    ensure!(
        refused < count,
        "{refused} probes answered 401 for {count} connections sharing one token: the probe was not shared"
    );
    s.assert_no_credential_leaked().await
}
