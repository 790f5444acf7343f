//! Probes off the refresh path (issue 12, item 3): connections that share a credential and
//! a Tasklist share one probe per interval, and a Tasklist that accepts connections and
//! never answers does not make the refreshes of other connections late. Both assert counts
//! (requests, expired credentials seen), not timings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::ensure;
use jiff::Timestamp;
use kube::api::ListParams;
use serde_json::json;
use testsupport::standin::AuthKind;

use crate::ScenarioFn;
use crate::isolation::{DeadHost, with_30s_request_timeout};
use crate::scenario::{Scenario, World, condition, planned_refresh_and_expiry, scrape, tail, wait_until};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        probes:
        twenty_connections_sharing_one_basic_credential_send_one_probe_per_interval,
        a_dead_tasklist_does_not_make_refreshes_elsewhere_late,
    ]
}

fn is_ready(connection: &tasklist_operator::crd::TasklistConnection) -> bool {
    condition(connection, "Ready").is_some_and(|(status, _)| status == "True")
}

/// Waits until every connection of the namespace named in `names` is Ready.
async fn wait_all_ready(s: &Scenario, names: &[String], timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let list = s.connections().list(&ListParams::default()).await?;
        let ready = list
            .iter()
            .filter(|c| c.metadata.name.as_ref().is_some_and(|name| names.contains(name)) && is_ready(c))
            .count();
        if ready == names.len() {
            return Ok(());
        }
        ensure!(
            started.elapsed() < timeout,
            "only {ready} of {} connections Ready after {}s\n--- operator log (tail) ---\n{}",
            names.len(),
            timeout.as_secs(),
            tail(&s.operator.logs(), 30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

const CONNECTIONS: usize = 20;
const INTERVAL: Duration = Duration::from_secs(10);
const WINDOW: Duration = Duration::from_secs(45);

/// 20 connections read one Basic credential and probe one Tasklist with the same request
/// every 10 s. Over 45 s, Tasklist sees about one probe per interval (4 or 5), not one per
/// connection and interval (about 90); each of them stays Ready.
async fn twenty_connections_sharing_one_basic_credential_send_one_probe_per_interval(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "probedup").await?;
    s.standin.accept_basic("demo", "shared-password");
    s.apply_secret("login", &[("username", "demo"), ("password", "shared-password")])
        .await?;
    let names: Vec<String> = (0..CONNECTIONS).map(|index| format!("app-{index:02}")).collect();
    for name in &names {
        let spec = json!({
            "url": s.standin.url(),
            "auth": {"basic": {"credentialsSecretRef": {"name": "login"}}},
            "probe": {"interval": format!("{}s", INTERVAL.as_secs())},
        });
        s.apply_connection(name, spec).await?;
    }
    wait_all_ready(&s, &names, Duration::from_secs(60)).await?;
    // Let the connections made in different seconds settle on one shared answer.
    tokio::time::sleep(INTERVAL + Duration::from_secs(2)).await;

    let before = s.standin.api_requests().len();
    let window_start = SystemTime::now();
    tokio::time::sleep(WINDOW).await;
    let requests: Vec<_> = s
        .standin
        .api_requests()
        .into_iter()
        .skip(before)
        .filter(|r| r.time >= window_start)
        .collect();
    let intervals = WINDOW.as_secs_f64() / INTERVAL.as_secs_f64();
    let mut gaps: Vec<f64> = requests
        .windows(2)
        .map(|pair| pair[1].time.duration_since(pair[0].time).unwrap_or_default().as_secs_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    eprintln!(
        "probe dedup: {} probes of {CONNECTIONS} connections sharing one credential in {}s ({intervals:.1} intervals of {}s); \
         seconds between probes: {gaps:.1?}",
        requests.len(),
        WINDOW.as_secs(),
        INTERVAL.as_secs()
    );
    ensure!(
        requests.iter().all(|r| r.auth == AuthKind::Basic && r.status == 200),
        "every probe carries the shared Basic credential and is accepted"
    );
    // One per interval, rounded up, plus one for a window that starts just before a probe.
    let most = intervals.ceil() as usize + 1;
    ensure!(
        requests.len() <= most,
        "{} probes in {}s for {CONNECTIONS} connections sharing one credential: expected at most {most} (one per {}s interval), \
         not one per connection\n--- operator log (tail) ---\n{}",
        requests.len(),
        WINDOW.as_secs(),
        INTERVAL.as_secs(),
        tail(&s.operator.logs(), 30)
    );
    ensure!(
        requests.len() >= intervals.floor() as usize - 1,
        "only {} probes in {}s: the connections stopped probing",
        requests.len(),
        WINDOW.as_secs()
    );
    let list = s.connections().list(&ListParams::default()).await?;
    let not_ready: Vec<_> = list
        .iter()
        .filter(|c| !is_ready(c))
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    ensure!(not_ready.is_empty(), "not Ready at the end: {not_ready:?}");
    let metrics = scrape(&reqwest::Client::new(), &s.metrics_url().await?).await?;
    let reused = metrics.get("tasklist_operator_probes_shared_total", &[("how", "reused")]);
    eprintln!("probe dedup: tasklist_operator_probes_shared_total{{how=\"reused\"}} = {reused:?}");
    ensure!(
        reused.is_some_and(|count| count >= (CONNECTIONS - 1) as f64),
        "the operator counts no reused probe answers ({reused:?})"
    );
    s.assert_no_credential_leaked().await
}

const DEAD: usize = 40;
const HEALTHY: usize = 10;
const LIFETIME: Duration = Duration::from_secs(20);
const WATCH: Duration = Duration::from_secs(60);
const PROBES_PER_HOST: usize = 4;

/// 40 connections get their tokens from a healthy token endpoint (the stand-in) but point
/// `url` at a Tasklist that accepts and never answers; the request timeout is 30 s. 10
/// connections live entirely on the stand-in, with 20 s tokens (a refresh every 10-12 s).
/// Over a minute, the healthy connections obtain every planned token (at least 4 each), no
/// healthy Secret is ever seen expired, and the dead Tasklist never has more than the
/// per-host probe limit (4) of probes open. Before the probe lane, the dead connections'
/// probes held 24 of the stand-in host's reconcile slots for 30 s each, and the healthy
/// refreshes waited behind them.
async fn a_dead_tasklist_does_not_make_refreshes_elsewhere_late(world: Arc<World>) -> anyhow::Result<()> {
    let env = [("RUST_LOG".to_owned(), "info".to_owned())];
    let mut s = with_30s_request_timeout(&world, "deadprobe", &env).await?;
    s.standin.set_token_lifetime(LIFETIME);
    let (dead, dead_url) = DeadHost::start().await?;

    s.standin.add_client("dead", "dead-client-secret");
    s.apply_secret("dead", &[("client_id", "dead"), ("client_secret", "dead-client-secret")])
        .await?;
    for index in 0..DEAD {
        let spec = json!({
            "url": dead_url,
            "auth": {"oauth2": {"tokenUrl": s.standin.token_url(), "clientSecretRef": {"name": "dead"}}},
            "probe": {"interval": "10s"},
        });
        s.apply_connection(&format!("dead-{index:02}"), spec).await?;
    }
    wait_until(
        &format!("{PROBES_PER_HOST} probes reaching the dead Tasklist"),
        Duration::from_secs(30),
        || dead.accepted.load(Ordering::SeqCst) >= PROBES_PER_HOST,
    )
    .await?;

    let healthy: Vec<String> = (0..HEALTHY).map(|index| format!("healthy-{index:02}")).collect();
    for name in &healthy {
        let secret = format!("{name}-client-secret");
        s.standin.add_client(name, &secret);
        s.apply_secret(name, &[("client_id", name), ("client_secret", &secret)]).await?;
        let spec = json!({
            "url": s.standin.url(),
            "auth": {"oauth2": {"tokenUrl": s.standin.token_url(), "clientSecretRef": {"name": name}}},
            "probe": {"interval": "10s"},
        });
        s.apply_connection(name, spec).await?;
    }
    wait_all_ready(&s, &healthy, Duration::from_secs(30)).await?;

    // Sample the healthy connections' Secrets every second for a minute.
    let watch_start = SystemTime::now();
    let started = Instant::now();
    let (mut samples, mut expired) = (0, Vec::new());
    let derived = ListParams::default().labels("app.kubernetes.io/managed-by=tasklist-operator");
    while started.elapsed() < WATCH {
        let tick = Instant::now();
        let now = Timestamp::now();
        for secret in s.secrets().list(&derived).await? {
            let name = secret.metadata.name.clone().unwrap_or_default();
            if !name.starts_with("healthy-") {
                continue;
            }
            let (_, expires) = planned_refresh_and_expiry(&secret)?;
            if expires <= now && expired.len() < 10 {
                expired.push(format!("{name} expired at {expires}, seen at {now}"));
            }
        }
        samples += 1;
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }
    let mut per_client: BTreeMap<String, usize> = healthy.iter().map(|name| (name.clone(), 0)).collect();
    let mut failed = 0;
    for request in s.standin.token_requests().iter().filter(|r| r.time >= watch_start) {
        if let Some(count) = per_client.get_mut(&request.client_id) {
            *count += 1;
            failed += usize::from(request.status != 200);
        }
    }
    let (accepted, most_open) = (dead.accepted.load(Ordering::SeqCst), dead.most_open.load(Ordering::SeqCst));
    let fewest = per_client.values().copied().min().unwrap_or_default();
    eprintln!(
        "dead tasklist: {samples} samples in {}s, {} expired healthy credentials seen; healthy token requests per \
         connection {:?}; the dead Tasklist accepted {accepted} probes, at most {most_open} open at once",
        WATCH.as_secs(),
        expired.len(),
        per_client.values().collect::<Vec<_>>()
    );
    // 20 s tokens are replaced every 10-12 s: at least 4 whole refreshes fit in a minute.
    let planned = (WATCH.as_secs() / 12 - 1) as usize;
    ensure!(
        expired.is_empty(),
        "healthy connections held expired credentials:\n{}\n--- operator log (tail) ---\n{}",
        expired.join("\n"),
        tail(&s.operator.logs(), 30)
    );
    ensure!(
        fewest >= planned,
        "a healthy connection obtained only {fewest} tokens in {}s, {planned} were planned: {per_client:?}",
        WATCH.as_secs()
    );
    ensure!(failed == 0, "{failed} healthy token requests failed");
    ensure!(
        most_open <= PROBES_PER_HOST,
        "the dead Tasklist had {most_open} probes open at once; at most {PROBES_PER_HOST} (--probes-per-host) should be"
    );
    let list = s.connections().list(&ListParams::default()).await?;
    let healthy_not_ready: Vec<_> = list
        .iter()
        .filter(|c| c.metadata.name.as_ref().is_some_and(|name| name.starts_with("healthy-")) && !is_ready(c))
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    ensure!(healthy_not_ready.is_empty(), "healthy connections not Ready: {healthy_not_ready:?}");
    // The dead connections say why; no credential of theirs was lost either.
    let unreachable = list
        .iter()
        .filter(|c| condition(c, "Reachable").is_some_and(|(_, reason)| reason == "Unreachable"))
        .count();
    eprintln!("dead tasklist: {unreachable} of {DEAD} dead connections report Unreachable");
    ensure!(unreachable > 0, "no dead connection reports Unreachable");
    s.assert_no_credential_leaked().await
}
