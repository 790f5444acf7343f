//! The refresh rule against mistakes and hostile servers (issue 10): no hot loop whatever
//! `refreshBefore` says, one new token after a 401 and no loop when that one is refused
//! too, and no prefix of the client secret when the token endpoint echoes it. Each test
//! asserts counts over a window, not timings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use testsupport::standin::{EndpointMode, TokenAnswer};

use crate::ScenarioFn;
use crate::scenario::{Scenario, World, events_about, find_condition, occurrences, tail, wait_for_event, with_reason};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        refresh:
        refresh_before_longer_than_the_lifetime_is_reported_not_looped,
        a_401_gets_one_new_token_and_no_loop_when_that_is_refused_too,
        an_endpoint_echoing_the_secret_leaks_no_prefix_of_it,
    ]
}

const SECRET: &str = "orders-tasklist-auth";

/// How often Events with `reason` about connection `orders` happened: the sum of their
/// series counts.
async fn event_count(s: &Scenario, reason: &str) -> anyhow::Result<i32> {
    let events = events_about(s, "orders").await?;
    Ok(with_reason(&events, reason).into_iter().map(occurrences).sum())
}

/// Issue 10, finding 1: `refreshBefore: 10m` against 300 s tokens made 64 token requests,
/// Secret writes and Events in 40 s, while status said Ready with nothing to tell.
async fn refresh_before_longer_than_the_lifetime_is_reported_not_looped(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "hotloop").await?;
    // The stand-in's default: 300 s tokens, Keycloak's default lifetime.
    let mut spec = s.saas_spec();
    spec["refreshBefore"] = "10m".into();
    s.apply_connection("orders", spec).await?;
    let connection = s.wait_ready("orders").await?;
    let data = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&data);

    let window = Duration::from_secs(40);
    tokio::time::sleep(window).await;
    let requests = s.standin.token_requests().len();
    let refreshed = event_count(&s, "CredentialRefreshed").await?;
    let warnings = event_count(&s, "RefreshBeforeTooLong").await?;
    let authenticated = find_condition(&connection, "Authenticated").context("no Authenticated condition")?;
    eprintln!(
        "hot loop: {requests} token requests and {refreshed} CredentialRefreshed Events in the first {}s; \
         {warnings} RefreshBeforeTooLong Event(s); Authenticated says: {}",
        window.as_secs(),
        authenticated.message
    );
    ensure!(
        requests == 1,
        "{requests} token requests within {}s of a 300 s token (expected only the first)\n--- operator log (tail) ---\n{}",
        window.as_secs(),
        tail(&s.operator.logs(), 30)
    );
    ensure!(refreshed == 0, "{refreshed} CredentialRefreshed Events");
    ensure!(warnings == 1, "{warnings} RefreshBeforeTooLong Events, expected exactly one");
    ensure!(
        authenticated.message.contains("refreshBefore 600s cannot be honoured"),
        "the Authenticated condition does not say refreshBefore cannot be honoured: {}",
        authenticated.message
    );
    // The planned refresh is on the floor: half the lifetime after issue, or up to 10 % later.
    let status = connection.status.as_ref().context("no status")?;
    let issued: jiff::Timestamp = status.last_refresh_time.as_deref().context("no lastRefreshTime")?.parse()?;
    let next: jiff::Timestamp = status.next_refresh_time.as_deref().context("no nextRefreshTime")?.parse()?;
    let after = next.duration_since(issued).as_secs();
    ensure!(
        (149..=181).contains(&after),
        "the refresh is planned {after}s after issue, expected 150-180 s"
    );
    s.assert_no_credential_leaked().await
}

/// Issue 10, finding 3: after the token server revoked the tokens, the connection stayed
/// `ProbeUnauthorized` with no new token until its planned refresh.
async fn a_401_gets_one_new_token_and_no_loop_when_that_is_refused_too(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "unauth").await?;
    let mut spec = s.saas_spec();
    spec["probe"] = serde_json::json!({"interval": "10s"});
    s.apply_connection("orders", spec).await?;
    s.wait_ready("orders").await?;
    let first = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&first);
    ensure!(s.standin.token_requests().len() == 1, "more than one token request to become Ready");

    // 1. Tasklist refuses every token (this one and the next): one new token, then none,
    //    also after the 60 s rate limit has passed.
    s.standin.set_api(EndpointMode::Reject);
    s.wait_not_ready_because("orders", "ProbeUnauthorized").await?;
    let refused_at = Instant::now();
    let second = s
        .wait_for_secret(SECRET, "replaced after the 401", Duration::from_secs(5), |data| {
            data["token"] != first["token"]
        })
        .await?;
    s.remember_credential(&second);
    tokio::time::sleep(Duration::from_secs(70).saturating_sub(refused_at.elapsed())).await;
    let probes = s.standin.api_requests().iter().filter(|r| r.status == 401).count();
    let requests = s.standin.token_requests().len();
    eprintln!("401: {requests} token requests in all after {probes} probes answered 401 over 70 s");
    ensure!(
        requests == 2,
        "{requests} token requests: expected the first and one after the 401, then none while the new one is refused too\n\
         --- operator log (tail) ---\n{}",
        tail(&s.operator.logs(), 30)
    );
    ensure!(probes >= 5, "only {probes} probes answered 401 in 70 s with a 10 s interval");
    let connection = s.wait_not_ready_because("orders", "ProbeUnauthorized").await?;
    ensure!(
        find_condition(&connection, "Reachable").is_some_and(|c| c.reason == "ProbeUnauthorized" && c.status == "False"),
        "Reachable is not ProbeUnauthorized"
    );

    // 2. Tasklist accepts tokens again, then the token server revokes them all: the next
    //    probe gets 401, and exactly one new token brings the connection back.
    s.standin.set_api(EndpointMode::Normal);
    s.wait_ready("orders").await?;
    s.standin.revoke_tokens();
    let third = s
        .wait_for_secret(SECRET, "replaced after the revocation", Duration::from_secs(30), |data| {
            data["token"] != second["token"]
        })
        .await?;
    s.remember_credential(&third);
    s.wait_ready("orders").await?;
    ensure!(
        s.standin.call_api_with_secret(&third).await? == 200,
        "Tasklist refuses the token stored after the revocation"
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    let requests = s.standin.token_requests().len();
    ensure!(
        requests == 3,
        "{requests} token requests; expected 3 (first, after the 401, after the revocation)"
    );
    s.assert_no_credential_leaked().await
}

/// Issue 10, finding 4: with the secret echoed near the 200-character cut, its first 10
/// characters appeared in status, Events and the log.
async fn an_endpoint_echoing_the_secret_leaks_no_prefix_of_it(world: Arc<World>) -> anyhow::Result<()> {
    let secret = "Qz7Vk2Xw9Lp4Rt6YmN3b";
    let mut s = Scenario::start(&world, "echo").await?;
    s.add_saas_client(secret).await?;
    s.standin.set_token_answer(TokenAnswer::EchoSecretInError);
    s.apply_connection("orders", s.saas_spec()).await?;
    let connection = s.wait_not_ready_because("orders", "CredentialsRejected").await?;
    let authenticated = find_condition(&connection, "Authenticated").context("no Authenticated condition")?;
    ensure!(
        authenticated.message.contains("invalid_client: xxx"),
        "the condition does not carry the server's error: {}",
        authenticated.message
    );
    // Wait for the RefreshFailed Event, so that it is among the places scanned.
    wait_for_event(&s, "orders", "RefreshFailed", Duration::from_secs(30)).await?;
    // Every prefix of 5 characters or more, in every place a person reads.
    for length in 5..=secret.len() {
        s.remember_secret_value(&secret[..length]);
    }
    s.assert_no_credential_leaked().await
}
