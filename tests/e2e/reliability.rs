//! Faults, bad input, restarts and leaks (issue: keep credentials valid, lose nothing, leak nothing).
//!
//! Every scenario prints what it measured (`eprintln!`, shown with `-- --nocapture`);
//! `docs/reliability.md` lists the figures of a run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use futures::{StreamExt as _, TryStreamExt as _};
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tasklist_operator::crd::{REFRESH_ANNOTATION, TasklistConnection};
use testsupport::controlplane::ControlPlane;
use testsupport::standin::{EndpointMode, StandinTasklist, TokenAnswer, TokenRequestEncoding};

use crate::ScenarioFn;
use crate::scenario::{
    CLIENT_ID, DEFAULT_CLIENT_SECRET, Scenario, World, condition, find_condition, install_crd, planned_refresh_and_expiry, saas_spec_for,
    scrape, secret_text, start_operator_with, strip_ansi, tail, wait_until,
};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        reliability:
        token_endpoint_outages_keep_the_token_and_back_off,
        garbage_from_the_token_endpoint_is_reported_and_memory_stays_bounded,
        rejected_credentials_are_tried_at_most_every_30s,
        derived_secret_deleted_during_an_outage_returns_with_the_server,
        sigkill_keeps_cookie_sessions_and_condition_times,
        apiserver_outage_of_30s_is_survived_without_spinning,
        secrets_in_other_namespaces_are_never_read,
        nothing_leaks_with_trace_logging,
        sigterm_stops_within_5s_leaving_secret_and_status_consistent,
        two_hundred_connections_with_20s_tokens_never_hold_an_expired_one,
    ]
}

const SECRET: &str = "orders-tasklist-auth";
/// The secret [`Scenario::start_saas`] registers, for the stand-ins scenarios add.
const CLIENT_SECRET: &str = DEFAULT_CLIENT_SECRET;

fn derived_name(connection: &str) -> String {
    format!("{connection}-tasklist-auth")
}

/// Status, reason and message of a condition.
fn condition_detail(connection: &TasklistConnection, type_: &str) -> Option<(String, String, String)> {
    find_condition(connection, type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Each condition's type with its lastTransitionTime, as JSON text.
fn transition_times(connection: &TasklistConnection) -> BTreeMap<String, String> {
    connection
        .status
        .iter()
        .flat_map(|status| &status.conditions)
        .map(|c| {
            let time = serde_json::to_string(&c.last_transition_time).unwrap_or_default();
            (c.type_.clone(), time)
        })
        .collect()
}

fn is_ready(connection: &TasklistConnection) -> bool {
    condition(connection, "Ready").is_some_and(|(status, _)| status == "True")
}

/// The log lines in which the operator reports a failed try to obtain a credential for
/// `namespace/name` (one per try), with the time at the start of each line.
fn failed_tries(logs: &str, namespace: &str, name: &str) -> Vec<Option<Timestamp>> {
    let span = format!("connection={namespace}/{name}");
    logs.lines()
        .map(strip_ansi)
        .filter(|line| line.contains("could not obtain a credential") && names_connection(line, &span))
        .map(|line| line.split_whitespace().next().and_then(|first| first.parse().ok()))
        .collect()
}

/// Whether `line` carries the span field `connection=ns/name` for exactly this name.
fn names_connection(line: &str, span: &str) -> bool {
    line.match_indices(span).any(|(at, _)| {
        line[at + span.len()..]
            .chars()
            .next()
            .is_none_or(|next| !(next.is_ascii_alphanumeric() || next == '-' || next == '.'))
    })
}

/// Seconds between consecutive times, for printing.
fn gaps(times: &[f64]) -> Vec<String> {
    times.windows(2).map(|pair| format!("{:.1}", pair[1] - pair[0])).collect()
}

fn seconds_since(start: Timestamp, times: &[Option<Timestamp>]) -> Vec<f64> {
    times.iter().flatten().map(|t| t.duration_since(start).as_secs_f64()).collect()
}

fn system_seconds(time: SystemTime, since: SystemTime) -> f64 {
    match time.duration_since(since) {
        Ok(after) => after.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

/// VmRSS and VmHWM (peak RSS) of a process, in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses: state is field 3, utime 14, stime 15.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).context("unexpected /proc/pid/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<f64> { Ok(fields.get(index).context("short /proc/pid/stat")?.parse::<f64>()?) };
    Ok((ticks(11)? + ticks(12)?) / CLOCK_TICKS_PER_SECOND)
}

/// The unit of /proc/PID/stat times (USER_HZ, `sysconf(_SC_CLK_TCK)`): 100 on Linux.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

// ---------------------------------------------------------------------------------------
// 1. The token endpoint down (503), refusing connections, or slower than --request-timeout.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// `503 Service Unavailable`.
    Down,
    /// The port is closed: "connection refused" (the probe fails too: same server).
    Refused,
    /// Answers after 8 s, past the operator's 3 s request timeout.
    Slow,
}

impl Outage {
    fn connection(self) -> &'static str {
        match self {
            Outage::Down => "down",
            Outage::Refused => "refused",
            Outage::Slow => "slow",
        }
    }

    /// What the Authenticated message must say.
    fn expected_message(self) -> &'static str {
        match self {
            Outage::Down => "503",
            Outage::Refused => "could not connect",
            Outage::Slow => "no answer within 3s",
        }
    }

    async fn begin(self, standin: &StandinTasklist) -> anyhow::Result<()> {
        match self {
            Outage::Down => standin.set_token_endpoint(EndpointMode::Down),
            Outage::Refused => standin.set_refusing_connections(true).await?,
            Outage::Slow => standin.set_token_endpoint(EndpointMode::Slow(Duration::from_secs(8))),
        }
        Ok(())
    }

    async fn end(self, standin: &StandinTasklist) -> anyhow::Result<()> {
        match self {
            Outage::Down | Outage::Slow => standin.set_token_endpoint(EndpointMode::Normal),
            Outage::Refused => standin.set_refusing_connections(false).await?,
        }
        Ok(())
    }
}

const OUTAGE: Duration = Duration::from_secs(120);

/// Three connections, each with its own stand-in, go through a two-minute outage of one
/// kind at the same time.
async fn token_endpoint_outages_keep_the_token_and_back_off(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start_saas(&world, "outage").await?;
    let outages = [Outage::Down, Outage::Refused, Outage::Slow];
    let mut standins = BTreeMap::new();
    for outage in outages {
        let standin = if outage == Outage::Down {
            s.standin.clone()
        } else {
            StandinTasklist::start().await?
        };
        standin.add_client(CLIENT_ID, CLIENT_SECRET);
        s.apply_connection(outage.connection(), saas_spec_for(&standin, "client")).await?;
        standins.insert(outage.connection(), standin);
    }
    let mut valid = BTreeMap::new();
    for outage in outages {
        let name = outage.connection();
        s.wait_ready(name).await?;
        let data = s.derived_secret(&derived_name(name)).await?.context("no derived Secret")?;
        s.remember_credential(&data);
        valid.insert(name, data);
    }

    let outage_start = Timestamp::now();
    let started = Instant::now();
    let requests_before = standins["down"].token_requests().len();
    for outage in outages {
        outage.begin(&standins[outage.connection()]).await?;
        s.annotate_connection(outage.connection(), REFRESH_ANNOTATION, "during-the-outage")
            .await?;
    }
    for outage in outages {
        let name = outage.connection();
        let failing = s.wait_not_ready_because(name, "AuthServerError").await?;
        let (status, reason, message) = condition_detail(&failing, "Authenticated").context("no Authenticated condition")?;
        ensure!(
            status == "False" && reason == "AuthServerError",
            "{name}: Authenticated is {status}/{reason}"
        );
        ensure!(
            message.contains(outage.expected_message()),
            "{name}: message {message:?} does not say {:?}",
            outage.expected_message()
        );
        eprintln!("outage {name}: Authenticated=False AuthServerError: {message}");
    }

    // Hold the outage for two minutes; the valid tokens stay where they are and keep working.
    let mut checks = 0;
    while started.elapsed() < OUTAGE {
        for outage in outages {
            let name = outage.connection();
            let now = s.derived_secret(&derived_name(name)).await?;
            ensure!(
                now.as_ref() == Some(&valid[name]),
                "{name}: the valid token was removed or replaced during the outage"
            );
            if outage != Outage::Refused {
                ensure!(
                    standins[name].call_api_with_secret(&valid[name]).await? == 200,
                    "{name}: Tasklist no longer accepts the kept token"
                );
            }
        }
        checks += 1;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    eprintln!("outage: the Secrets held the valid tokens at {checks} checks over {OUTAGE:?}");

    let logs = s.operator.logs();
    let mut pending_retry = BTreeMap::new();
    for outage in outages {
        let name = outage.connection();
        let tries = seconds_since(outage_start, &failed_tries(&logs, &s.namespace, name));
        let in_window: Vec<f64> = tries.iter().copied().filter(|t| *t <= OUTAGE.as_secs_f64()).collect();
        eprintln!(
            "outage {name}: {} tries in {}s at {:?} s (gaps {:?} s)",
            in_window.len(),
            OUTAGE.as_secs(),
            in_window.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>(),
            gaps(&in_window)
        );
        ensure!(
            (5..=10).contains(&in_window.len()),
            "{name}: expected 5 to 10 tries in {OUTAGE:?} (1 s doubling, ±25 %), saw {}",
            in_window.len()
        );
        let connection = s.connections().get(name).await?;
        let next: Timestamp = connection
            .status
            .as_ref()
            .and_then(|status| status.next_refresh_time.as_deref())
            .context("no nextRefreshTime while failing")?
            .parse()?;
        pending_retry.insert(name, next);
    }
    let served: Vec<_> = standins["down"].token_requests()[requests_before..]
        .iter()
        .map(|r| r.status)
        .collect();
    eprintln!(
        "outage down: the stand-in counted {} token requests (statuses {served:?})",
        served.len()
    );

    // The servers return: each connection is Ready again at its next retry, within one step.
    for outage in outages {
        outage.end(&standins[outage.connection()]).await?;
    }
    let returned = Timestamp::now();
    let returned_at = Instant::now();
    let mut recovered = BTreeMap::new();
    while recovered.len() < outages.len() {
        for outage in outages {
            let name = outage.connection();
            if !recovered.contains_key(name) && s.connections().get(name).await.is_ok_and(|c| is_ready(&c)) {
                recovered.insert(name, returned_at.elapsed());
            }
        }
        ensure!(
            returned_at.elapsed() < Duration::from_secs(330),
            "not Ready again within 330 s of the servers' return: only {:?}",
            recovered.keys()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for outage in outages {
        let name = outage.connection();
        let step = pending_retry[name].duration_since(returned).as_secs_f64().max(0.0);
        let took = recovered[name].as_secs_f64();
        eprintln!("outage {name}: Ready {took:.1}s after the server returned (the pending retry was due in {step:.1}s)");
        ensure!(
            took <= step + 15.0,
            "{name}: Ready only {took:.1}s after the server returned, but the retry was due in {step:.1}s"
        );
        let data = s.derived_secret(&derived_name(name)).await?.context("no derived Secret")?;
        s.remember_credential(&data);
        ensure!(data["token"] != valid[name]["token"], "{name}: no new token after the outage");
        ensure!(
            standins[name].call_api_with_secret(&data).await? == 200,
            "{name}: the new token is not accepted"
        );
    }
    ensure!(s.operator.is_running(), "the operator exited");
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 2. The token endpoint answers garbage.
// ---------------------------------------------------------------------------------------

/// Peak RSS the operator may reach while it is sent 10 MB answers.
const MEMORY_LIMIT_KIB: u64 = 100 * 1024;

async fn garbage_from_the_token_endpoint_is_reported_and_memory_stays_bounded(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start_saas(&world, "garbage").await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let valid = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&valid);
    let pid = s.operator.pid();
    let (rss_before, _) = memory_kib(pid)?;

    let cases = [
        // "answered with success but not with JSON / not with an OAuth2 token"
        (TokenAnswer::Html200, "but not with"),
        (TokenAnswer::JsonWithoutAccessToken, "without an access_token"),
        (TokenAnswer::Huge, "larger than"),
    ];
    let mut huge_from = 0;
    for (index, (answer, expected)) in cases.into_iter().enumerate() {
        s.standin.set_token_answer(answer);
        if answer == TokenAnswer::Huge {
            huge_from = s.standin.token_requests().len();
        }
        // The Huge answer is sent several times (five refreshes asked for, plus the retries).
        let rounds = if answer == TokenAnswer::Huge { 5 } else { 1 };
        for round in 0..rounds {
            let requests = s.standin.token_requests().len();
            s.annotate_connection("orders", REFRESH_ANNOTATION, &format!("garbage-{index}-{round}"))
                .await?;
            wait_until("a token request", Duration::from_secs(30), || {
                s.standin.token_requests().len() > requests
            })
            .await?;
        }
        let failing = s
            .wait_for_connection("orders", &format!("failing on {answer:?}"), Duration::from_secs(30), |c| {
                condition_detail(c, "Authenticated")
                    .is_some_and(|(status, reason, message)| status == "False" && reason == "AuthServerError" && message.contains(expected))
            })
            .await?;
        ensure!(condition(&failing, "Ready") == Some(("False".into(), "AuthServerError".into())));
        let (_, _, message) = condition_detail(&failing, "Authenticated").unwrap_or_default();
        eprintln!("garbage {answer:?}: Ready=False AuthServerError: {message}");
        ensure!(s.operator.is_running(), "the operator exited after {answer:?}");
        ensure!(
            s.derived_secret(SECRET).await?.as_ref() == Some(&valid),
            "the valid token was replaced after {answer:?}"
        );
    }
    // Let the retries of the last Huge refresh come in too.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let garbage_answers = s.standin.token_requests().len() - 1;
    let huge_answers = garbage_answers + 1 - huge_from;
    let (rss_after, peak) = memory_kib(pid)?;
    eprintln!(
        "garbage: operator memory VmRSS {} KiB before, {} KiB after {garbage_answers} garbage answers ({huge_answers} of them 10 MB); \
         peak VmHWM {} KiB",
        rss_before, rss_after, peak
    );
    ensure!(
        peak < MEMORY_LIMIT_KIB,
        "the operator's peak RSS reached {peak} KiB (limit {MEMORY_LIMIT_KIB} KiB)"
    );
    ensure!(s.operator.is_running(), "the operator exited");

    // An opaque token without expires_in is valid for 300 s.
    s.standin.set_token_answer(TokenAnswer::OpaqueWithoutExpiresIn);
    s.annotate_connection("orders", REFRESH_ANNOTATION, "opaque").await?;
    let opaque = s
        .wait_for_secret(SECRET, "an opaque token", Duration::from_secs(30), |data| {
            data.get("token").is_some_and(|t| *t != valid["token"])
        })
        .await?;
    s.remember_credential(&opaque);
    ensure!(
        !opaque["token"].contains('.'),
        "the stand-in was to hand out a token that is not a JWT"
    );
    s.wait_ready("orders").await?;
    let left = opaque["expiresAt"].parse::<Timestamp>()?.duration_since(Timestamp::now()).as_secs();
    eprintln!("garbage OpaqueWithoutExpiresIn: Ready, expiresAt is {left} s away (expected about 300)");
    ensure!((280..=301).contains(&left), "expected about 300 s of lifetime, got {left} s");
    ensure!(
        s.standin.call_api_with_secret(&opaque).await? == 200,
        "the opaque token is not accepted"
    );
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 3. Credentials rejected: 401 invalid_client, and Keycloak's 400 for a JSON body.
// ---------------------------------------------------------------------------------------

async fn rejected_credentials_are_tried_at_most_every_30s(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "rejections").await?;
    s.standin.add_client(CLIENT_ID, CLIENT_SECRET);
    s.standin.set_token_answer(TokenAnswer::Keycloak400ForJson);
    s.apply_secret("wrong", &[("client_id", CLIENT_ID), ("client_secret", "a-wrong-secret-3")])
        .await?;
    s.apply_secret("right", &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)])
        .await?;
    // "unauthorized": form encoding, wrong secret: 401. "json": right secret, JSON body: 400.
    s.apply_connection("unauthorized", saas_spec_for(&s.standin, "wrong")).await?;
    let mut json_spec = saas_spec_for(&s.standin, "right");
    json_spec["auth"]["oauth2"]["requestEncoding"] = json!("Json");
    s.apply_connection("json", json_spec).await?;
    let started = SystemTime::now();

    for (name, expected) in [
        ("unauthorized", ["401", "invalid_client"]),
        ("json", ["400", "Missing form parameter: grant_type"]),
    ] {
        let connection = s.wait_not_ready_because(name, "CredentialsRejected").await?;
        let (status, reason, message) = condition_detail(&connection, "Authenticated").context("no Authenticated")?;
        ensure!(status == "False" && reason == "CredentialsRejected");
        ensure!(
            expected.iter().all(|part| message.contains(part)),
            "{name}: message {message:?} does not say {expected:?}"
        );
        eprintln!("rejected {name}: CredentialsRejected: {message}");
    }

    // Three tries each (the first, then two retries), however long the machine takes: the
    // claim is about the gaps between them, not about a window of wall-clock time.
    let tries_of = |encoding: TokenRequestEncoding| s.standin.token_requests().into_iter().filter(move |r| r.encoding == encoding);
    wait_until("three tries of each connection", Duration::from_secs(150), || {
        tries_of(TokenRequestEncoding::Form).count() >= 3 && tries_of(TokenRequestEncoding::Json).count() >= 3
    })
    .await?;
    for (name, encoding, status) in [
        ("unauthorized", TokenRequestEncoding::Form, 401),
        ("json", TokenRequestEncoding::Json, 400),
    ] {
        let times: Vec<f64> = tries_of(encoding)
            .take(3)
            .map(|r| {
                ensure!(r.status == status, "{name}: a try was answered {} instead of {status}", r.status);
                Ok(system_seconds(r.time, started))
            })
            .collect::<anyhow::Result<_>>()?;
        eprintln!(
            "rejected {name}: the first 3 tries at {:?} s, gaps {:?} s",
            times.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>(),
            gaps(&times)
        );
        ensure!(times.len() == 3, "{name}: {} tries", times.len());
        // At least 30 s apart (1 s of margin: the retry time may be kept in whole seconds),
        // and retried rather than given up: the next try comes about 30 s later.
        for gap in times.windows(2).map(|pair| pair[1] - pair[0]) {
            ensure!(gap >= 29.0, "{name}: tried again after only {gap:.1}s (at most one try per 30 s)");
            ensure!(gap <= 45.0, "{name}: the next try came only after {gap:.1}s (expected 30 s)");
        }
        ensure!(
            s.derived_secret(&derived_name(name)).await?.is_none(),
            "{name}: a Secret was written without a credential"
        );
    }

    // Fixing the input is acted on at once, whatever the pause after a rejection.
    let fixed = Instant::now();
    s.apply_secret("wrong", &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)])
        .await?;
    s.apply_connection("json", saas_spec_for(&s.standin, "right")).await?;
    s.wait_ready("unauthorized").await?;
    s.wait_ready("json").await?;
    eprintln!("rejected: both Ready {:.1}s after the fix", fixed.elapsed().as_secs_f64());
    ensure!(
        fixed.elapsed() < Duration::from_secs(10),
        "a fix took {:?} to be used",
        fixed.elapsed()
    );
    for name in ["unauthorized", "json"] {
        let data = s.derived_secret(&derived_name(name)).await?.context("no derived Secret")?;
        s.remember_credential(&data);
    }
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 5. (gap) The derived Secret deleted while the token endpoint is down.
// ---------------------------------------------------------------------------------------

async fn derived_secret_deleted_during_an_outage_returns_with_the_server(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "deleted-outage").await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let valid = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&valid);

    s.standin.set_token_endpoint(EndpointMode::Down);
    s.secrets().delete(SECRET, &DeleteParams::default()).await?;
    let connection = s.wait_not_ready_because("orders", "AuthServerError").await?;
    let expires = connection.status.as_ref().and_then(|st| st.expires_at.clone());
    eprintln!("deleted during outage: AuthServerError; status.expiresAt is now {expires:?}");
    // The credential it described is gone with the Secret: status must not claim one.
    ensure!(
        expires.is_none(),
        "status.expiresAt still says {expires:?} although the Secret holding that credential was deleted"
    );
    ensure!(
        s.derived_secret(SECRET).await?.is_none(),
        "a Secret was written without a credential"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    s.standin.set_token_endpoint(EndpointMode::Normal);
    let returned = Instant::now();
    let recreated = s
        .wait_for_secret(SECRET, "recreated", Duration::from_secs(60), |data| data.contains_key("token"))
        .await?;
    s.remember_credential(&recreated);
    s.wait_ready("orders").await?;
    eprintln!(
        "deleted during outage: Secret recreated and Ready {:.1}s after the server returned",
        returned.elapsed().as_secs_f64()
    );
    ensure!(
        s.standin.call_api_with_secret(&recreated).await? == 200,
        "the recreated token is not accepted"
    );
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 6. SIGKILL and start again: no new login or token while the stored one is fresh.
// ---------------------------------------------------------------------------------------

async fn sigkill_keeps_cookie_sessions_and_condition_times(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start_saas(&world, "sigkill").await?;
    s.standin.add_user("demo", "demo-password-6");
    s.apply_secret("login", &[("username", "demo"), ("password", "demo-password-6")])
        .await?;
    s.apply_connection(
        "cookie",
        json!({"url": s.standin.url(), "auth": {"cookie": {"credentialsSecretRef": {"name": "login"}}}}),
    )
    .await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    let mut before = BTreeMap::new();
    let mut data = BTreeMap::new();
    for name in ["cookie", "orders"] {
        before.insert(name, s.wait_ready(name).await?);
        let stored = s.derived_secret(&derived_name(name)).await?.context("no derived Secret")?;
        s.remember_credential(&stored);
        data.insert(name, stored);
    }
    ensure!(s.standin.logins().len() == 1, "expected one login");
    ensure!(s.standin.token_requests().len() == 1, "expected one token request");
    // A transition time that moved would show as a different second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let probes = s.standin.api_requests().len();

    let killed = Instant::now();
    s.restart_operator_after_crash()?;
    // Both connections are probed by the new process: that is how we know it has looked.
    wait_until("two probes by the restarted operator", Duration::from_secs(60), || {
        s.standin.api_requests().len() >= probes + 2
    })
    .await?;
    let looked = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in ["cookie", "orders"] {
        let after = s.wait_ready(name).await?;
        ensure!(
            transition_times(&before[name]) == transition_times(&after),
            "{name}: lastTransitionTime moved across the restart: {:?} -> {:?}",
            transition_times(&before[name]),
            transition_times(&after)
        );
        ensure!(
            s.derived_secret(&derived_name(name)).await?.as_ref() == Some(&data[name]),
            "{name}: the stored credential was replaced"
        );
        ensure!(
            s.standin.call_api_with_secret(&data[name]).await? == 200,
            "{name}: the stored credential is no longer accepted"
        );
    }
    let (logins, tokens) = (s.standin.logins().len(), s.standin.token_requests().len());
    eprintln!(
        "sigkill: restarted operator probed both after {:.1}s; logins 1 -> {logins}, token requests 1 -> {tokens}; \
         lastTransitionTime of all conditions unchanged",
        looked.as_secs_f64()
    );
    ensure!(logins == 1, "the restarted operator logged in again ({logins} logins)");
    ensure!(tokens == 1, "the restarted operator requested a new token ({tokens} requests)");
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 7. kube-apiserver stopped for 30 s and started again (a control plane of its own).
// ---------------------------------------------------------------------------------------

/// Runs `future` to completion on this thread. For testsupport's ControlPlane methods, whose
/// futures the compiler cannot prove `Send` (they hold async closures), which a scenario's
/// future must be. The scenario's own thread waits; other scenarios run on.
fn block_here<F: Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

async fn apiserver_outage_of_30s_is_survived_without_spinning(world: Arc<World>) -> anyhow::Result<()> {
    let mut plane = block_here(ControlPlane::start(&world.tools)).context("starting a second control plane")?;
    install_crd(&plane.client()).await?;
    let mut s = Scenario::start_on(&plane, "apiserver", &[]).await?;
    s.standin.add_client(CLIENT_ID, CLIENT_SECRET);
    s.apply_secret("client", &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)])
        .await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let first = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&first);

    let lines_before = s.operator.logs().lines().count();
    let stopped = Instant::now();
    block_here(plane.stop_apiserver())?;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed())).await;
    let logs = s.operator.logs();
    let during: Vec<&str> = logs.lines().skip(lines_before).collect();
    ensure!(
        s.operator.is_running(),
        "the operator exited during the outage:\n{}",
        tail(&logs, 40)
    );
    let restarting = Instant::now();
    block_here(plane.start_apiserver())?;
    let outage = stopped.elapsed();
    eprintln!(
        "apiserver: down for {:.1}s (started again in {:.1}s); {} operator log lines during the first 30 s",
        outage.as_secs_f64(),
        restarting.elapsed().as_secs_f64(),
        during.len()
    );
    for line in during.iter().take(8) {
        eprintln!("apiserver:   | {}", strip_ansi(line));
    }
    ensure!(
        during.len() < 300,
        "the operator logged {} lines in 30 s of outage: it spins",
        during.len()
    );
    ensure!(s.operator.is_running(), "the operator exited after the outage");

    // A change made after the restart is acted on.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match s
            .annotate_connection("orders", REFRESH_ANNOTATION, "after-the-apiserver-outage")
            .await
        {
            Ok(()) => break,
            Err(error) if attempts < 20 => {
                eprintln!("apiserver: annotating failed ({error:#}), again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error),
        }
    }
    let changed = Instant::now();
    // Waits longer than the bound, so that the figure is known even when it is missed.
    let refreshed = s
        .wait_for_secret(SECRET, "refreshed after the outage", Duration::from_secs(120), |data| {
            data.get("token").is_some_and(|t| *t != first["token"])
        })
        .await
        .map_err(|error| anyhow::anyhow!("{error:#}\n--- control plane (tail) ---\n{}", plane.logs_tail(30)))?;
    let acted = changed.elapsed();
    s.remember_credential(&refreshed);
    s.wait_ready("orders").await?;
    eprintln!(
        "apiserver: the refresh annotation set after the restart was acted on in {:.1}s",
        acted.as_secs_f64()
    );
    ensure!(
        acted <= Duration::from_secs(30),
        "the refresh annotation set after the API server returned was acted on only after {acted:?} (bound 30 s)\n\
         --- operator log (tail) ---\n{}",
        tail(&s.operator.logs(), 30)
    );
    ensure!(s.operator.is_running(), "the operator exited");
    s.assert_no_credential_leaked().await?;
    // The operator goes before its control plane.
    drop(s);
    drop(plane);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 10. A Secret in another namespace cannot be referenced, and is never read.
// ---------------------------------------------------------------------------------------

/// Every property name anywhere in a JSON schema, with its path.
fn property_paths(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in properties {
            let here = format!("{path}.{name}");
            out.push(here.clone());
            property_paths(sub, &here, out);
        }
    }
    if let Some(items) = schema.get("items") {
        property_paths(items, &format!("{path}[]"), out);
    }
}

async fn secrets_in_other_namespaces_are_never_read(world: Arc<World>) -> anyhow::Result<()> {
    // The schema has no namespace field in any Secret reference.
    let crds: Api<CustomResourceDefinition> = Api::all(world.client());
    let crd = crds.get(TasklistConnection::crd_name()).await?;
    let mut paths = Vec::new();
    for version in &crd.spec.versions {
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .context("no schema")?;
        property_paths(&serde_json::to_value(schema)?, "", &mut paths);
    }
    for reference in [
        ".spec.auth.oauth2.clientSecretRef",
        ".spec.auth.cookie.credentialsSecretRef",
        ".spec.tls.caSecretRef",
    ] {
        let fields: Vec<&str> = paths.iter().filter_map(|p| p.strip_prefix(reference)?.strip_prefix('.')).collect();
        eprintln!("other namespaces: {reference} has fields {fields:?}");
        ensure!(fields.contains(&"name"), "{reference} not found in the schema");
        ensure!(!fields.iter().any(|f| f.contains("amespace")), "{reference} has a namespace field");
    }
    let namespaced: Vec<&String> = paths.iter().filter(|p| p.to_lowercase().contains("namespace")).collect();
    ensure!(namespaced.is_empty(), "the schema has namespace fields: {namespaced:?}");

    // A Secret of the referenced name exists only in another namespace, which the operator
    // watches too (so it could see it, if it looked).
    let elsewhere = world.control_plane.create_namespace("elsewhere").await?;
    let namespace = world.control_plane.create_namespace("crossns").await?;
    let kubeconfig = world.control_plane.kubeconfig();
    let operator = start_operator_with(kubeconfig, &namespace, &["--namespace", &elsewhere], &[])?;
    let mut s = Scenario::with_operator(&world, &namespace, kubeconfig, operator).await?;
    s.standin.add_client(CLIENT_ID, CLIENT_SECRET);
    s.remember_secret_value(CLIENT_SECRET);
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("client".into()),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([
            ("client_id".to_owned(), CLIENT_ID.to_owned()),
            ("client_secret".to_owned(), CLIENT_SECRET.to_owned()),
        ])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(s.client.clone(), &elsewhere)
        .create(&PostParams::default(), &foreign)
        .await?;

    // A user who writes a namespace into the reference gets it refused or dropped.
    let mut spec = s.saas_spec();
    spec["auth"]["oauth2"]["clientSecretRef"]["namespace"] = json!(elsewhere);
    let manifest = json!({
        "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
        "metadata": {"name": "orders"}, "spec": spec,
    });
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        s.client.clone(),
        &s.namespace,
        &kube::api::ApiResource::erase::<TasklistConnection>(&()),
    );
    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..PatchParams::apply("e2e-test").force()
    };
    // The behaviour chosen: refused, naming the field (kubectl applies with strict field
    // validation too). Accepting the manifest and dropping the field would fail here.
    let error = raw
        .patch("orders", &strict, &Patch::Apply(&manifest))
        .await
        .err()
        .context("a clientSecretRef with a namespace was accepted")?;
    eprintln!("other namespaces: clientSecretRef.namespace refused: {error}");
    ensure!(
        error.to_string().contains(".spec.auth.oauth2.clientSecretRef.namespace"),
        "the refusal does not name the field: {error}"
    );
    ensure!(raw.get_opt("orders").await?.is_none(), "the refused connection exists anyway");
    s.apply_connection("orders", s.saas_spec()).await?;
    let connection = s.wait_not_ready_because("orders", "SecretNotFound").await?;
    let (_, _, message) = condition_detail(&connection, "Authenticated").unwrap_or_default();
    eprintln!("other namespaces: SecretNotFound: {message}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let connection = s.connections().get("orders").await?;
    ensure!(
        condition(&connection, "Ready") == Some(("False".into(), "SecretNotFound".into())),
        "the connection changed to {:?}",
        condition(&connection, "Ready")
    );
    ensure!(
        s.standin.token_requests().is_empty(),
        "a token was requested with the other namespace's Secret"
    );
    // Changing the other namespace's Secret changes nothing either.
    let touch = json!({"metadata": {"labels": {"touched": "yes"}}});
    Api::<Secret>::namespaced(s.client.clone(), &elsewhere)
        .patch("client", &PatchParams::default(), &Patch::Merge(touch))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        s.standin.token_requests().is_empty(),
        "a token was requested after the foreign Secret changed"
    );

    // Only a Secret in the connection's own namespace is used.
    s.apply_secret("client", &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)])
        .await?;
    s.wait_ready("orders").await?;
    let data = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&data);
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 11. Nothing leaks, with everything logged at trace level.
// ---------------------------------------------------------------------------------------

async fn nothing_leaks_with_trace_logging(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("trace").await?;
    let kubeconfig = world.control_plane.kubeconfig();
    let operator = start_operator_with(kubeconfig, &namespace, &[], &[("RUST_LOG", "trace")])?;
    let mut s = Scenario::with_operator(&world, &namespace, kubeconfig, operator).await?;
    s.standin.add_client(CLIENT_ID, "trace-client-secret-11");
    s.standin.add_user("demo", "trace-password-11");
    s.standin.set_token_answer(TokenAnswer::Keycloak400ForJson);
    s.apply_secret("client", &[("client_id", CLIENT_ID), ("client_secret", "trace-client-secret-11")])
        .await?;
    s.apply_secret(
        "wrong-client",
        &[("client_id", CLIENT_ID), ("client_secret", "trace-wrong-secret-11")],
    )
    .await?;
    s.apply_secret("login", &[("username", "demo"), ("password", "trace-password-11")])
        .await?;
    s.apply_secret("wrong-login", &[("username", "demo"), ("password", "trace-wrong-password-11")])
        .await?;
    let cookie_spec = |secret: &str| json!({"url": s.standin.url(), "auth": {"cookie": {"credentialsSecretRef": {"name": secret}}}, "probe": {"interval": "10s"}});
    let mut json_spec = saas_spec_for(&s.standin, "client");
    json_spec["auth"]["oauth2"]["requestEncoding"] = json!("Json");
    let connections = [
        ("oauth2", saas_spec_for(&s.standin, "client")),
        ("cookie", cookie_spec("login")),
        ("rejected", saas_spec_for(&s.standin, "wrong-client")),
        ("badlogin", cookie_spec("wrong-login")),
        ("json", json_spec),
    ];
    for (name, spec) in connections {
        s.apply_connection(name, spec).await?;
    }
    for name in ["oauth2", "cookie"] {
        s.wait_ready(name).await?;
        let data = s.derived_secret(&derived_name(name)).await?.context("no derived Secret")?;
        s.remember_credential(&data);
    }
    for name in ["rejected", "badlogin", "json"] {
        s.wait_not_ready_because(name, "CredentialsRejected").await?;
    }

    // An outage of the token endpoint and the login, then recovery.
    s.standin.set_token_endpoint(EndpointMode::Down);
    s.standin.set_login_endpoint(EndpointMode::Down);
    for name in ["oauth2", "cookie"] {
        s.annotate_connection(name, REFRESH_ANNOTATION, "outage").await?;
    }
    for name in ["oauth2", "cookie"] {
        s.wait_not_ready_because(name, "AuthServerError").await?;
    }
    s.standin.set_token_endpoint(EndpointMode::Normal);
    s.standin.set_login_endpoint(EndpointMode::Normal);
    for name in ["oauth2", "cookie"] {
        s.wait_for_connection(name, "Ready after the outage", Duration::from_secs(60), is_ready)
            .await?;
        let data = s.derived_secret(&derived_name(name)).await?.context("no derived Secret")?;
        s.remember_credential(&data);
    }
    // Sessions revoked: a new login, whose cookie and CSRF token are checked too.
    let before = s.derived_secret(&derived_name("cookie")).await?.context("no derived Secret")?;
    s.standin.revoke_sessions();
    let relogged = s
        .wait_for_secret(&derived_name("cookie"), "a new session", Duration::from_secs(30), |data| {
            data.get("cookie") != before.get("cookie")
        })
        .await?;
    s.remember_credential(&relogged);

    let logs = s.all_operator_logs();
    ensure!(logs.contains("TRACE"), "the operator did not log at trace level");
    // Beyond the plain values: as they would look base64-encoded (Secret data in request bodies).
    let encoded: Vec<String> = s
        .credential_values()
        .iter()
        .filter(|v| v.len() >= 4)
        .map(|v| base64::engine::general_purpose::STANDARD.encode(v))
        .collect();
    for value in &encoded {
        ensure!(
            !logs.contains(value.as_str()),
            "a base64-encoded credential ({} characters) appears in the operator log",
            value.len()
        );
    }
    eprintln!(
        "trace: scanned {} log lines ({} KiB, {} at TRACE), the statuses and the Events for {} credential values \
         (and {} base64 forms)",
        logs.lines().count(),
        logs.len() / 1024,
        logs.lines().filter(|l| strip_ansi(l).contains("TRACE")).count(),
        s.credential_values().len(),
        encoded.len()
    );
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 12. SIGTERM: stops within 5 s, Secret and status consistent.
// ---------------------------------------------------------------------------------------

async fn sigterm_stops_within_5s_leaving_secret_and_status_consistent(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start_saas(&world, "sigterm").await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let data = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&data);
    let before = s.connections().get("orders").await?.status;

    // Nothing in flight.
    let signalled = Instant::now();
    let exit = s
        .operator
        .terminate(Duration::from_secs(5))
        .await
        .context("the operator did not stop within 5 s of SIGTERM")?;
    let took = signalled.elapsed();
    ensure!(exit.success(), "the operator exited with {exit} after SIGTERM");
    ensure!(
        s.connections().get("orders").await?.status == before,
        "the status changed at shutdown"
    );
    ensure!(
        s.derived_secret(SECRET).await?.as_ref() == Some(&data),
        "the Secret changed at shutdown"
    );
    ensure!(
        s.standin.call_api_with_secret(&data).await? == 200,
        "the stored token is not accepted after shutdown"
    );
    eprintln!(
        "sigterm (idle): exited with {exit} in {:.2}s; status and Secret unchanged",
        took.as_secs_f64()
    );

    // A token request in flight (the token endpoint takes 2 s) when SIGTERM arrives.
    let probes = s.standin.api_requests().len();
    s.restart_operator_after_crash()?;
    wait_until("a probe by the new operator", Duration::from_secs(60), || {
        s.standin.api_requests().len() > probes
    })
    .await?;
    s.standin.set_token_endpoint(EndpointMode::Slow(Duration::from_secs(2)));
    let arrived = s.standin.token_requests_arrived();
    s.annotate_connection("orders", REFRESH_ANNOTATION, "sigterm").await?;
    // SIGTERM only once the refresh is known to be in flight: its request has arrived (and
    // is held for 2 s), so what follows is about a refresh in flight, not a race.
    wait_until("the refresh's token request", Duration::from_secs(30), || {
        s.standin.token_requests_arrived() > arrived
    })
    .await?;
    let signalled = Instant::now();
    let exit = s
        .operator
        .terminate(Duration::from_secs(5))
        .await
        .context("the operator did not stop within 5 s of SIGTERM with a token request in flight")?;
    let took = signalled.elapsed();
    ensure!(exit.success(), "the operator exited with {exit} after SIGTERM");
    s.standin.set_token_endpoint(EndpointMode::Normal);

    let after = s.derived_secret(SECRET).await?.context("no derived Secret after shutdown")?;
    s.remember_credential(&after);
    let connection = s.connections().get("orders").await?;
    let status = connection.status.as_ref().context("no status")?;
    ensure!(
        is_ready(&connection),
        "not Ready after shutdown: {:?}",
        condition(&connection, "Ready")
    );
    ensure!(
        status.expires_at.as_deref() == Some(after["expiresAt"].as_str()),
        "status.expiresAt {:?} differs from the Secret's {}",
        status.expires_at,
        after["expiresAt"]
    );
    ensure!(
        s.standin.call_api_with_secret(&after).await? == 200,
        "the token left in the Secret is not accepted"
    );
    ensure!(
        after["token"] != data["token"],
        "the refresh in flight at SIGTERM was abandoned: the Secret still holds the old token"
    );
    let answered = s.standin.token_requests();
    ensure!(
        answered.last().is_some_and(|r| r.status == 200),
        "the token request in flight was not answered 200: {:?}",
        answered.last().map(|r| r.status)
    );
    eprintln!(
        "sigterm (token request in flight): exited with {exit} in {:.2}s; the refresh in flight was completed \
         and stored; Secret and status agree (expiresAt {}), Ready",
        took.as_secs_f64(),
        after["expiresAt"]
    );
    ensure!(s.operator.logs().contains("stopping"), "the operator did not say it was stopping");
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// 13. 200 connections with 20 s tokens, watched for 3 minutes.
// ---------------------------------------------------------------------------------------

const CONNECTIONS: usize = 200;
const LIFETIME: Duration = Duration::from_secs(20);
const WATCH: Duration = Duration::from_secs(180);

async fn two_hundred_connections_with_20s_tokens_never_hold_an_expired_one(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start(&world, "scale").await?;
    s.standin.set_token_lifetime(LIFETIME);
    let client = |i: usize| (format!("app-{i:03}"), format!("app-{i:03}-client-secret"));
    for i in 0..CONNECTIONS {
        let (id, secret) = client(i);
        s.standin.add_client(&id, &secret);
        s.remember_secret_value(&secret);
    }

    let created = Instant::now();
    let scenario = &s;
    futures::stream::iter(0..CONNECTIONS)
        .map(|i| async move {
            let (id, secret) = client(i);
            let name = format!("app-{i:03}");
            let client_secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([
                    ("client_id".to_owned(), ByteString(id.into_bytes())),
                    ("client_secret".to_owned(), ByteString(secret.into_bytes())),
                ])),
                ..Secret::default()
            };
            scenario.secrets().create(&PostParams::default(), &client_secret).await?;
            scenario.apply_connection(&name, saas_spec_for(&scenario.standin, &name)).await
        })
        .buffer_unordered(20)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!(
        "scale: created {CONNECTIONS} Secrets and connections in {:.1}s",
        created.elapsed().as_secs_f64()
    );

    // Sample every second, with one list call, as long as the watch lasts.
    let watch_started = Instant::now();
    let cpu_before = cpu_seconds(s.operator.pid())?;
    let own_cpu_before = cpu_seconds(std::process::id())?;
    let metrics_url = s.metrics_url().await?;
    let http = reqwest::Client::new();
    let metrics_before = scrape(&http, &metrics_url).await?.sums();
    let derived = ListParams::default().labels("app.kubernetes.io/managed-by=tasklist-operator");
    let (mut samples, mut all_present_after) = (0, None);
    let (mut expired, mut expired_seen) = (Vec::new(), 0);
    let (mut least_left, mut slowest_list) = (f64::MAX, Duration::ZERO);
    let (mut least_margin, mut late_plans) = (f64::MAX, Vec::new());
    while watch_started.elapsed() < WATCH {
        let tick = Instant::now();
        let now = Timestamp::now();
        let list = s.secrets().list(&derived).await?;
        slowest_list = slowest_list.max(tick.elapsed());
        for secret in &list {
            let name = secret.metadata.name.clone().unwrap_or_default();
            let (planned, expires) = planned_refresh_and_expiry(secret)?;
            // The assertion: every stored token is planned to be replaced with 40 % of its
            // lifetime left (less 1 s for whole-second expiry). Whether it was, in time, is
            // what the request count and the lateness figures below measure.
            let margin = expires.duration_since(planned).as_secs_f64();
            least_margin = least_margin.min(margin);
            if margin < 0.4 * LIFETIME.as_secs_f64() - 1.0 && late_plans.len() < 5 {
                late_plans.push(format!(
                    "sample {samples}: {name} expires at {expires}, planned refresh at {planned}"
                ));
            }
            let left = expires.duration_since(now).as_secs_f64();
            if left <= 0.0 {
                expired_seen += 1;
                if expired.len() < 5 {
                    // Connection app-NNN has the client id app-NNN.
                    let client_id = name.trim_end_matches("-tasklist-auth");
                    let times: Vec<String> = s
                        .standin
                        .token_requests()
                        .iter()
                        .filter(|r| r.client_id == client_id)
                        .map(|r| Timestamp::try_from(r.time).map(|t| t.to_string()).unwrap_or_default())
                        .collect();
                    expired.push(format!(
                        "sample {samples} at {now}: {name} expired at {expires}; its token requests: {times:?}"
                    ));
                }
            }
            least_left = least_left.min(left);
        }
        if list.items.len() == CONNECTIONS && all_present_after.is_none() {
            all_present_after = Some(created.elapsed());
        }
        samples += 1;
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }
    let end = SystemTime::now();
    let cpu_used = cpu_seconds(s.operator.pid())? - cpu_before;
    let own_cpu_used = cpu_seconds(std::process::id())? - own_cpu_before;
    let metrics_after = scrape(&http, &metrics_url).await?.sums();
    let delta = |name: &str| metrics_after.get(name).copied().unwrap_or_default() - metrics_before.get(name).copied().unwrap_or_default();
    let mean_ms = |base: &str| 1000.0 * delta(&format!("{base}_sum")) / delta(&format!("{base}_count")).max(1.0);
    let all_present_after = all_present_after.context("never were all 200 derived Secrets there at once")?;

    // Token requests against the refresh rule: the first at creation, then one every 10-12 s
    // (a 20 s token is planned on the floor, half its lifetime, and the jitter of up to 10 %
    // of the lifetime is reflected upward from there), 11 s on average; the issue time is
    // stored in whole seconds (cut, half a second early on average), so 10.5 s between
    // requests. A renewal process with mean interval m counts on average t/m - 1/2 renewals
    // in t after its start (the intervals hardly vary).
    let requests: Vec<_> = s.standin.token_requests().into_iter().filter(|r| r.time <= end).collect();
    let failed = requests.iter().filter(|r| r.status != 200).count();
    let mut first: BTreeMap<String, SystemTime> = BTreeMap::new();
    for request in &requests {
        first.entry(request.client_id.clone()).or_insert(request.time);
    }
    ensure!(first.len() == CONNECTIONS, "only {} connections asked for a token", first.len());
    let expected_with = |mean: f64| -> f64 {
        first
            .values()
            .map(|start| 1.0 + (system_seconds(end, *start) / mean - 0.5).max(0.0))
            .sum()
    };
    let expected = expected_with(10.5);
    let actual = requests.len() as f64;
    let deviation = (actual - expected) / expected * 100.0;
    let spread = first.values().map(|t| system_seconds(*t, SystemTime::UNIX_EPOCH));
    let (earliest, latest) = spread.fold((f64::MAX, f64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
    eprintln!(
        "scale: all {CONNECTIONS} Secrets present {:.1}s after creation began; first tokens spread over {:.1}s",
        all_present_after.as_secs_f64(),
        latest - earliest
    );
    eprintln!(
        "scale: {samples} samples in {}s, {expired_seen} expired credentials seen; least lifetime left at a sample \
         {least_left:.1}s; slowest list {} ms",
        WATCH.as_secs(),
        slowest_list.as_millis()
    );
    eprintln!(
        "scale: token requests: {actual} actual vs {expected:.0} expected at a 10.5 s mean interval ({deviation:+.1} %; \
         {:.0} expected at 11 s, the mean before whole-second rounding); {failed} not answered 200",
        expected_with(11.0)
    );
    let mut intervals: Vec<f64> = Vec::new();
    let mut last: BTreeMap<&str, SystemTime> = BTreeMap::new();
    for request in &requests {
        if let Some(previous) = last.insert(&request.client_id, request.time) {
            intervals.push(system_seconds(request.time, previous));
        }
    }
    intervals.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        intervals
            .get(((intervals.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "scale: seconds between a connection's token requests: min {:.1}, median {:.1}, p99 {:.1}, max {:.1}; \
         operator CPU {cpu_used:.1}s in {}s (test process with the stand-in: {own_cpu_used:.1}s)",
        percentile(0.0),
        percentile(0.5),
        percentile(0.99),
        percentile(1.0),
        WATCH.as_secs()
    );
    // How late each refresh started: its token request against the refresh time the operator
    // planned when it stored the credential before (from its "stored a new credential" log line).
    let mut planned: BTreeMap<String, Vec<Timestamp>> = BTreeMap::new();
    for line in s.operator.logs().lines().map(strip_ansi) {
        if !line.contains("stored a new credential") {
            continue;
        }
        let field = |key: &str| {
            line.split_once(key)
                .and_then(|(_, rest)| rest.split([' ', '}', ':']).next().map(str::to_owned))
        };
        let connection = field(&format!("connection={}/", s.namespace));
        let refresh_at = line
            .split_once("refresh_at=")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|t| t.parse::<Timestamp>().ok());
        if let (Some(connection), Some(refresh_at)) = (connection, refresh_at) {
            planned.entry(connection).or_default().push(refresh_at);
        }
    }
    let mut lateness: Vec<f64> = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for request in &requests {
        let index = seen.entry(&request.client_id).or_insert(0);
        if *index > 0
            && let Some(plan) = planned.get(&request.client_id).and_then(|p| p.get(*index - 1))
            && let Ok(time) = Timestamp::try_from(request.time)
        {
            lateness.push(time.duration_since(*plan).as_secs_f64());
        }
        *index += 1;
    }
    lateness.sort_by(f64::total_cmp);
    let late_at = |p: f64| {
        lateness
            .get(((lateness.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "scale: refreshes started after their planned time by: median {:.2}s, p90 {:.2}s, p99 {:.2}s, max {:.2}s ({} refreshes)",
        late_at(0.5),
        late_at(0.9),
        late_at(0.99),
        late_at(1.0),
        lateness.len()
    );
    eprintln!(
        "scale: operator metrics over the watch: {} reconciles, mean {:.0} ms; token requests mean {:.0} ms; probes mean {:.0} ms",
        delta("tasklist_operator_reconciles_total"),
        mean_ms("tasklist_operator_reconcile_duration_seconds"),
        mean_ms("tasklist_operator_token_request_duration_seconds"),
        mean_ms("tasklist_operator_probe_duration_seconds"),
    );
    if expired_seen > 0 {
        // A measurement of the machine as much as of the operator; reported, not asserted.
        eprintln!("scale: expired credentials at samples, the first:\n{}", expired.join("\n"));
    }
    eprintln!("scale: least planned margin before expiry {least_margin:.1}s");
    ensure!(
        late_plans.is_empty(),
        "refreshes planned less than 40 % of the lifetime before expiry; the first:\n{}",
        late_plans.join("\n")
    );
    ensure!(failed == 0, "{failed} token requests failed while the servers were healthy");
    ensure!(
        deviation.abs() <= 10.0,
        "{actual} token requests, {expected:.0} expected: {deviation:+.1} % is more than 10 % off"
    );

    // Everything Ready at the end, and the tokens stored are accepted.
    let connections = s.connections().list(&ListParams::default()).await?;
    let not_ready: Vec<_> = connections
        .iter()
        .filter(|c| !is_ready(c))
        .map(|c| c.metadata.name.clone().unwrap_or_default())
        .collect();
    ensure!(not_ready.is_empty(), "not Ready at the end: {not_ready:?}");
    let mut tokens = BTreeSet::new();
    for secret in s.secrets().list(&derived).await? {
        let data = secret_text(&secret);
        s.remember_credential(&data);
        tokens.insert(data.get("token").cloned().unwrap_or_default());
    }
    ensure!(
        tokens.len() == CONNECTIONS,
        "{} distinct tokens for {CONNECTIONS} connections",
        tokens.len()
    );
    s.assert_no_credential_leaked().await
}
