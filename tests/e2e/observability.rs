//! What the operator shows: metrics, Events, logs, kubectl.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tasklist_operator::crd::{REFRESH_ANNOTATION, TasklistConnection};
use testsupport::standin::EndpointMode;

use crate::ScenarioFn;
use crate::scenario::{
    Check, DEFAULT_CLIENT_SECRET, Scenario, Scrape, World, describe, describe_all, events_about, eventually, scrape, start_operator_with,
    strip_ansi, tail, wait_for_event, wait_for_scrape, wait_for_series, wait_until, with_reason,
};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        observability:
        metrics_change_when_a_credential_is_refreshed_and_when_the_standin_fails,
        events_are_published_for_transitions_and_aggregated_during_a_failure_loop,
        json_logs_are_structured_and_name_the_connection,
        kubectl_explain_reads_well,
        health_endpoints_answer,
        text_logs_name_the_connection_once_and_warn_on_changes_only,
    ]
}

const SECRET: &str = "orders-tasklist-auth";
const CONNECTION_READY: &str = "tasklist_operator_connection_ready";
const CREDENTIAL_EXPIRY: &str = "tasklist_operator_credential_expiry_timestamp_seconds";
const CREDENTIAL_REQUESTS: &str = "tasklist_operator_credential_requests_total";
const CREDENTIAL_REFRESHES: &str = "tasklist_operator_credential_refreshes_total";
const TOKEN_REQUEST_DURATION: &str = "tasklist_operator_token_request_duration_seconds";
const PROBE_DURATION: &str = "tasklist_operator_probe_duration_seconds";

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?)
}

fn unix_seconds(rfc3339: &str) -> anyhow::Result<i64> {
    Ok(rfc3339
        .parse::<Timestamp>()
        .with_context(|| format!("{rfc3339:?} is not RFC 3339"))?
        .as_second())
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

/// Prometheus naming conventions: one prefix, snake case, counters end in `_total`,
/// durations and timestamps are in seconds, every family has HELP and TYPE.
fn check_naming_conventions(scraped: &Scrape) -> anyhow::Result<()> {
    let mut types = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in scraped.text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["#", "TYPE", name, type_] => {
                types.insert(name.to_string(), type_.to_string());
            }
            ["#", "HELP", name, ..] => {
                helped.insert(name.to_string());
            }
            _ => {}
        }
    }
    ensure!(!types.is_empty(), "no # TYPE lines in /metrics");
    ensure!(
        scraped.text.trim_end().ends_with("# EOF"),
        "the OpenMetrics answer does not end with # EOF"
    );
    for (family, type_) in &types {
        ensure!(
            family.starts_with("tasklist_operator_"),
            "{family} lacks the tasklist_operator_ prefix"
        );
        ensure!(
            family.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{family} is not snake case"
        );
        ensure!(helped.contains(family), "{family} has no # HELP");
        if family.contains("duration") || family.contains("timestamp") {
            ensure!(family.ends_with("_seconds"), "{family} is a time but not in _seconds");
        }
        if type_ == "counter" {
            ensure!(
                !family.ends_with("_total"),
                "counter family {family} repeats _total in its TYPE line"
            );
        }
        ensure!(
            ["counter", "gauge", "histogram"].contains(&type_.as_str()),
            "{family} has unexpected type {type_}"
        );
    }
    for sample in &scraped.samples {
        // Its family: the longest family name the sample's name starts with.
        let (family, type_) = types
            .iter()
            .filter(|(family, _)| sample.name.starts_with(family.as_str()))
            .max_by_key(|(family, _)| family.len())
            .with_context(|| format!("sample {} has no # TYPE", sample.name))?;
        let suffix = &sample.name[family.len()..];
        let allowed: &[&str] = match type_.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[""],
        };
        ensure!(
            allowed.contains(&suffix),
            "{} is a sample of {type_} {family} with a wrong suffix (counters end in _total)",
            sample.name
        );
        if suffix == "_bucket" {
            ensure!(sample.labels.contains_key("le"), "{} has no le label", sample.name);
        }
    }
    Ok(())
}

/// Label values stay bounded and harmless: no URL, no token, no secret.
fn check_label_hygiene(scraped: &Scrape, forbidden: &[String]) -> anyhow::Result<()> {
    // `index` and `count` are shard_info's: small numbers.
    let allowed_keys = ["namespace", "name", "method", "result", "reason", "le", "index", "count"];
    for sample in &scraped.samples {
        for (key, value) in &sample.labels {
            ensure!(
                allowed_keys.contains(&key.as_str()),
                "{} has an unexpected label {key}={value:?}",
                sample.name
            );
            ensure!(
                !value.contains("://") && !value.contains("127.0.0.1") && value.len() <= 253,
                "{} has a label value that looks like a URL or is long: {key}={value:?}",
                sample.name
            );
        }
    }
    for secret in forbidden.iter().filter(|value| value.len() >= 4) {
        ensure!(
            !scraped.text.contains(secret.as_str()),
            "/metrics contains a forbidden value ({} characters)",
            secret.len()
        );
    }
    Ok(())
}

async fn metrics_change_when_a_credential_is_refreshed_and_when_the_standin_fails(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "metrics").await?;
    let http = http_client()?;
    let url = s.metrics_url().await?;
    let namespace = s.namespace.clone();
    let connection = [("namespace", namespace.as_str()), ("name", "orders")];
    let success = [("method", "oauth2"), ("result", "success")];
    let server_error = [("method", "oauth2"), ("result", "AuthServerError")];
    let oauth2 = [("method", "oauth2")];

    // Before any connection: the families are there, with no per-connection series.
    let empty = scrape(&http, &url).await?;
    check_naming_conventions(&empty)?;
    ensure!(empty.get(CONNECTION_READY, &connection).is_none());

    // Ready: one successful token request, the expiry of the stored token, one probe.
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let first = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&first);
    let first_expiry = unix_seconds(&first["expiresAt"])?;
    let ready = wait_for_scrape(&http, &url, "the connection Ready", Duration::from_secs(30), |m| {
        m.get(CONNECTION_READY, &connection) == Some(1.0)
    })
    .await?;
    ensure!(
        ready.get(CREDENTIAL_EXPIRY, &connection) == Some(first_expiry as f64),
        "expiry gauge {:?}, the Secret's expiresAt is {first_expiry}",
        ready.get(CREDENTIAL_EXPIRY, &connection)
    );
    ensure!(
        ready.get(CREDENTIAL_REQUESTS, &success) == Some(1.0),
        "requests_total{{success}} is {:?}",
        ready.get(CREDENTIAL_REQUESTS, &success)
    );
    ensure!(
        ready.count(CREDENTIAL_REFRESHES, &oauth2) == 0.0,
        "a first credential counted as a refresh"
    );
    let token_count = format!("{TOKEN_REQUEST_DURATION}_count");
    ensure!(
        ready.get(&token_count, &[]) == Some(1.0),
        "token request histogram count {:?}",
        ready.get(&token_count, &[])
    );
    ensure!(ready.get(&format!("{TOKEN_REQUEST_DURATION}_bucket"), &[("le", "+Inf")]) == Some(1.0));
    ensure!(ready.has(&format!("{TOKEN_REQUEST_DURATION}_sum")));
    let probes = ready.count(&format!("{PROBE_DURATION}_count"), &[("result", "ProbeSucceeded")]);
    ensure!(probes >= 1.0, "no probe in the probe duration histogram");
    ensure!(ready.get(&format!("{PROBE_DURATION}_bucket"), &[("result", "ProbeSucceeded"), ("le", "+Inf")]) == Some(probes));
    ensure!(ready.count("tasklist_operator_reconciles_total", &[]) >= 1.0);
    ensure!(ready.has("tasklist_operator_reconcile_duration_seconds_count"));

    // A refresh by annotation: a second success, one refresh, and the expiry moves
    // (the stand-in now issues 600 s tokens instead of 300 s).
    s.standin.set_token_lifetime(Duration::from_secs(600));
    s.annotate_connection("orders", REFRESH_ANNOTATION, "metrics-1").await?;
    let second = s
        .wait_for_secret(SECRET, "refreshed", Duration::from_secs(15), |data| {
            data.get("token") != first.get("token")
        })
        .await?;
    s.remember_credential(&second);
    let second_expiry = unix_seconds(&second["expiresAt"])?;
    ensure!(second_expiry >= first_expiry + 250, "the new token does not live longer");
    let refreshed = wait_for_scrape(&http, &url, "the refresh", Duration::from_secs(30), |m| {
        m.count(CREDENTIAL_REQUESTS, &success) == 2.0 && m.get(CREDENTIAL_EXPIRY, &connection) == Some(second_expiry as f64)
    })
    .await?;
    ensure!(
        refreshed.get(CREDENTIAL_REFRESHES, &oauth2) == Some(1.0),
        "refreshes_total is {:?}",
        refreshed.get(CREDENTIAL_REFRESHES, &oauth2)
    );
    ensure!(refreshed.get(&token_count, &[]) == Some(2.0));
    ensure!(refreshed.get(CONNECTION_READY, &connection) == Some(1.0));

    // The token endpoint fails: a failure counted by reason, not Ready, and the expiry of the
    // token that is kept stays.
    s.standin.set_token_endpoint(EndpointMode::Down);
    s.annotate_connection("orders", REFRESH_ANNOTATION, "metrics-2").await?;
    s.wait_not_ready_because("orders", "AuthServerError").await?;
    let failing = wait_for_scrape(&http, &url, "the failure", Duration::from_secs(30), |m| {
        m.count(CREDENTIAL_REQUESTS, &server_error) > 0.0 && m.get(CONNECTION_READY, &connection) == Some(0.0)
    })
    .await?;
    ensure!(
        failing.count(CREDENTIAL_REQUESTS, &success) == 2.0,
        "a failure counted as a success"
    );
    ensure!(
        failing.count(CREDENTIAL_REFRESHES, &oauth2) == 1.0,
        "a failure counted as a refresh"
    );
    ensure!(
        failing.get(CREDENTIAL_EXPIRY, &connection) == Some(second_expiry as f64),
        "the expiry gauge no longer shows the kept token's expiry: {:?}",
        failing.get(CREDENTIAL_EXPIRY, &connection)
    );
    ensure!(failing.count(&token_count, &[]) >= 3.0);

    // Names and labels.
    check_naming_conventions(&failing)?;
    let forbidden = [
        s.standin.url(),
        s.standin.token_url(),
        "orders-secret-1".to_owned(),
        first["token"].clone(),
        second["token"].clone(),
    ];
    check_label_hygiene(&failing, &forbidden)?;
    println!("--- /metrics excerpt ({namespace}) ---\n{}\n---", failing.excerpt(&namespace));
    s.assert_no_credential_leaked().await?;

    // A deleted connection leaves no series behind.
    s.connections().delete("orders", &DeleteParams::default()).await?;
    wait_for_scrape(&http, &url, "no series of the deleted connection", Duration::from_secs(30), |m| {
        m.get(CONNECTION_READY, &connection).is_none() && m.get(CREDENTIAL_EXPIRY, &connection).is_none()
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

/// Exactly one Event object with `reason` about `connection`, of `type_`, whose note
/// contains `note`; returns it.
async fn the_one_event(s: &Scenario, connection: &str, reason: &str, type_: &str, note: &str) -> anyhow::Result<Event> {
    let events = events_about(s, connection).await?;
    let matching = with_reason(&events, reason);
    ensure!(
        matching.len() == 1,
        "expected one {reason} Event object about {connection}, found {}:\n{}",
        matching.len(),
        describe_all(&events)
    );
    let event = matching[0].clone();
    ensure!(
        event.type_.as_deref() == Some(type_),
        "{reason} is not of type {type_}: {}",
        describe(&event)
    );
    ensure!(
        event.note.as_deref().is_some_and(|n| n.contains(note)),
        "the note of {reason} does not mention {note:?}: {}",
        describe(&event)
    );
    ensure!(
        event.reporting_controller.as_deref() == Some("tasklist-operator"),
        "{reason} is reported by {:?}",
        event.reporting_controller
    );
    ensure!(event.action.as_deref().is_some_and(|a| !a.is_empty()), "{reason} has no action");
    Ok(event)
}

async fn events_are_published_for_transitions_and_aggregated_during_a_failure_loop(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "events").await?;
    let mut spec = s.saas_spec();
    spec["probe"] = json!({"interval": "10s"});
    s.apply_connection("orders", spec).await?;
    s.wait_ready("orders").await?;
    let first = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&first);
    let long = Duration::from_secs(15);

    // A first credential.
    wait_for_event(&s, "orders", "CredentialIssued", long).await?;
    the_one_event(&s, "orders", "CredentialIssued", "Normal", "credential").await?;

    // A refresh by annotation.
    s.annotate_connection("orders", REFRESH_ANNOTATION, "events-1").await?;
    wait_for_event(&s, "orders", "CredentialRefreshed", long).await?;
    the_one_event(&s, "orders", "CredentialRefreshed", "Normal", "credential").await?;
    let refreshed = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&refreshed);

    // The token endpoint fails; the operator retries with backoff (1, 2, 4, 8 s) and the user
    // asks again in between. One Warning, not one per try.
    s.standin.set_token_endpoint(EndpointMode::Down);
    let tries_before = s.standin.token_requests().len();
    s.annotate_connection("orders", REFRESH_ANNOTATION, "events-2").await?;
    s.wait_not_ready_because("orders", "AuthServerError").await?;
    wait_for_event(&s, "orders", "RefreshFailed", long).await?;
    let loop_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    s.annotate_connection("orders", REFRESH_ANNOTATION, "events-3").await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let failed_tries = s.standin.token_requests()[tries_before..]
        .iter()
        .filter(|request| request.status == 503)
        .count();
    ensure!(
        failed_tries >= 4,
        "expected at least 4 failed token requests in {:?} of failure loop, saw {failed_tries}",
        loop_started.elapsed()
    );
    let failed = the_one_event(&s, "orders", "RefreshFailed", "Warning", "AuthServerError").await?;
    println!(
        "{failed_tries} failed token requests in the failure loop gave one Event: {}",
        describe(&failed)
    );
    ensure!(
        s.derived_secret(SECRET).await?.as_ref() == Some(&refreshed),
        "the kept token was replaced during the outage"
    );

    // The endpoint comes back; the next retry (at most ~20 s away) succeeds.
    s.standin.set_token_endpoint(EndpointMode::Normal);
    s.wait_for_connection("orders", "Ready again", Duration::from_secs(60), |c| {
        crate::scenario::condition(c, "Ready").is_some_and(|(status, _)| status == "True")
    })
    .await?;
    let recovered = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&recovered);
    // The recovery's refresh repeats the earlier one: the same Event object, counted twice.
    let refreshed_again = wait_for_series(&s, "orders", "CredentialRefreshed", 2, long).await?;
    ensure!(
        with_reason(&events_about(&s, "orders").await?, "CredentialRefreshed").len() == 1,
        "a repeated refresh created a second Event object"
    );
    println!("after recovery: {}", describe(&refreshed_again));

    // A second outage repeats the Warning: still one object, now a series of two.
    s.standin.set_token_endpoint(EndpointMode::Down);
    s.annotate_connection("orders", REFRESH_ANNOTATION, "events-4").await?;
    s.wait_not_ready_because("orders", "AuthServerError").await?;
    let failed_again = wait_for_series(&s, "orders", "RefreshFailed", 2, long).await?;
    the_one_event(&s, "orders", "RefreshFailed", "Warning", "AuthServerError").await?;
    println!("after a second outage: {}", describe(&failed_again));
    s.standin.set_token_endpoint(EndpointMode::Normal);
    s.wait_for_connection("orders", "Ready again", Duration::from_secs(60), |c| {
        crate::scenario::condition(c, "Ready").is_some_and(|(status, _)| status == "True")
    })
    .await?;
    let recovered = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&recovered);

    // The probe fails (Tasklist answers 503) for several probe intervals: one Warning.
    s.standin.set_api(EndpointMode::Down);
    s.wait_not_ready_because("orders", "ProbeFailed").await?;
    wait_for_event(&s, "orders", "ProbeFailed", long).await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    the_one_event(&s, "orders", "ProbeFailed", "Warning", "ProbeFailed").await?;
    s.standin.set_api(EndpointMode::Normal);
    s.wait_ready("orders").await?;

    // Someone deletes the derived Secret: it is written again, and that is said.
    s.secrets().delete(SECRET, &DeleteParams::default()).await?;
    let restored = s
        .wait_for_secret(SECRET, "restored", long, |data| data.contains_key("token"))
        .await?;
    s.remember_credential(&restored);
    wait_for_event(&s, "orders", "SecretRestored", long).await?;
    the_one_event(&s, "orders", "SecretRestored", "Normal", "Secret").await?;

    // A second connection whose Secret name is taken: one Warning, also after the foreign
    // Secret changes and wakes the connection again.
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("billing-tasklist-auth".into()),
            ..ObjectMeta::default()
        },
        string_data: Some([("note".to_string(), "someone else's".to_string())].into()),
        ..Secret::default()
    };
    s.secrets().create(&PostParams::default(), &foreign).await?;
    s.apply_connection("billing", s.saas_spec()).await?;
    s.wait_not_ready_because("billing", "SecretConflict").await?;
    wait_for_event(&s, "billing", "SecretConflict", long).await?;
    let touch = json!({"metadata": {"labels": {"touched": "yes"}}});
    s.secrets()
        .patch("billing-tasklist-auth", &PatchParams::default(), &Patch::Merge(touch))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    the_one_event(&s, "billing", "SecretConflict", "Warning", "billing-tasklist-auth").await?;

    // Every transition above gave exactly one Event object.
    let events = events_about(&s, "orders").await?;
    for reason in [
        "CredentialIssued",
        "CredentialRefreshed",
        "RefreshFailed",
        "ProbeFailed",
        "SecretRestored",
    ] {
        ensure!(!with_reason(&events, reason).is_empty(), "no {reason} Event");
    }
    ensure!(
        with_reason(&events, "RefreshFailed").len() == 1,
        "more than one RefreshFailed object:\n{}",
        describe_all(&events)
    );
    let mut all = events;
    all.extend(events_about(&s, "billing").await?);
    println!(
        "--- Events in {} (type, reason, count, regarding, note) ---\n{}\n---",
        s.namespace,
        describe_all(&all)
    );
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

/// Every non-empty line of `logs` as a JSON object; an error names the first line that is not.
fn json_lines(logs: &str) -> anyhow::Result<Vec<serde_json::Map<String, Value>>> {
    let mut lines = Vec::new();
    for (number, line) in logs.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        ensure!(!line.contains('\u{1b}'), "line {} holds ANSI escapes: {line:?}", number + 1);
        let object = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => object,
            _ => bail!("line {} is not a JSON object: {line:?}", number + 1),
        };
        // serde_json keeps the last of two equal keys, as most log pipelines do: a field
        // named like one of the formatter's own keys silently replaces it.
        let keys = serde_json::from_str::<ObjectKeys>(line)?.0;
        let mut seen = BTreeSet::new();
        for key in &keys {
            ensure!(
                seen.insert(key),
                "line {} has the key {key:?} twice, so a JSON reader keeps only the last one: {line}",
                number + 1
            );
        }
        lines.push(object);
    }
    Ok(lines)
}

/// The top-level keys of a JSON object, in order and with repeats.
struct ObjectKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for ObjectKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ObjectKeys;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ObjectKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(ObjectKeys(keys))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

fn text<'a>(line: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    line.get(key).and_then(Value::as_str)
}

/// The `connection` a log line was logged in: a field of its own, or of its current span or
/// of any span it is in.
fn connection_of(line: &serde_json::Map<String, Value>) -> Option<String> {
    if let Some(connection) = text(line, "connection") {
        return Some(connection.to_owned());
    }
    let fields = line.get("fields").and_then(Value::as_object);
    if let Some(connection) = fields.and_then(|f| f.get("connection")).and_then(Value::as_str) {
        return Some(connection.to_owned());
    }
    let spans = line
        .get("span")
        .into_iter()
        .chain(line.get("spans").and_then(Value::as_array).into_iter().flatten());
    spans
        .filter_map(|span| span.get("connection").and_then(Value::as_str))
        .map(str::to_owned)
        .next()
}

fn message_of(line: &serde_json::Map<String, Value>) -> Option<&str> {
    text(line, "message").or_else(|| line.get("fields").and_then(|f| f.get("message")).and_then(Value::as_str))
}

/// A line has a timestamp, a level, a target and a message or fields.
fn check_structure(line: &serde_json::Map<String, Value>) -> anyhow::Result<()> {
    let shown = Value::Object(line.clone());
    ensure!(
        text(line, "level").is_some_and(|l| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&l)),
        "no level in {shown}"
    );
    ensure!(
        text(line, "timestamp").is_some_and(|t| t.parse::<Timestamp>().is_ok()),
        "no RFC 3339 timestamp in {shown}"
    );
    ensure!(text(line, "target").is_some(), "no target in {shown}");
    ensure!(
        message_of(line).is_some() || line.get("fields").is_some_and(Value::is_object),
        "no message or fields in {shown}"
    );
    Ok(())
}

async fn wait_for_log(s: &Scenario, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    wait_until(&format!("the operator logging {what}"), timeout, || check(&s.operator.logs()))
        .await
        .with_context(|| format!("--- operator log (tail) ---\n{}", tail(&s.operator.logs(), 30)))
}

async fn json_logs_are_structured_and_name_the_connection(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("jsonlogs").await?;
    let kubeconfig = world.control_plane.kubeconfig().to_path_buf();
    let operator = start_operator_with(&kubeconfig, &namespace, &["--log-format", "json"], &[])?;
    let mut s = Scenario::with_operator(&world, &namespace, &kubeconfig, operator).await?;
    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let data = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&data);
    // A connection whose client Secret is missing: a warning inside its reconcile.
    let mut broken = s.saas_spec();
    broken["auth"]["oauth2"]["clientSecretRef"]["name"] = json!("missing");
    s.apply_connection("broken", broken).await?;
    s.wait_not_ready_because("broken", "SecretNotFound").await?;
    wait_for_log(&s, "the missing Secret", Duration::from_secs(15), |logs| {
        logs.contains("cannot obtain a credential")
    })
    .await?;

    let logs = s.operator.logs();
    let lines = json_lines(&logs)?;
    ensure!(lines.len() >= 4, "only {} log lines:\n{logs}", lines.len());
    println!("--- JSON log of {namespace} ---\n{logs}---");
    for line in &lines {
        check_structure(line)?;
    }
    let serving = lines
        .iter()
        .find(|l| message_of(l).is_some_and(|m| m.contains("serving /metrics")))
        .context("no 'serving /metrics' line")?;
    ensure!(
        text(serving, "address").is_some_and(|a| a.starts_with("127.0.0.1:")),
        "the serving line has no address field: {}",
        Value::Object(serving.clone())
    );
    let orders = format!("{namespace}/orders");
    let ours = [orders.clone(), format!("{namespace}/broken")];
    let reconcile_lines: Vec<_> = lines
        .iter()
        .filter(|l| text(l, "target").is_some_and(|t| t.starts_with("tasklist_operator::controller::reconcile")))
        .collect();
    ensure!(!reconcile_lines.is_empty(), "no line from the reconcile");
    for line in &reconcile_lines {
        let connection = connection_of(line);
        ensure!(
            connection.as_ref().is_some_and(|c| ours.contains(c)),
            "a reconcile line does not name the connection: {}",
            Value::Object((*line).clone())
        );
    }
    let stored = reconcile_lines
        .iter()
        .find(|l| message_of(l).is_some_and(|m| m.contains("stored a new credential")))
        .context("no 'stored a new credential' line")?;
    ensure!(
        connection_of(stored).as_deref() == Some(orders.as_str()),
        "'stored a new credential' names {:?}",
        connection_of(stored)
    );
    let warning = lines
        .iter()
        .find(|l| {
            text(l, "level") == Some("WARN")
                && (message_of(l).is_some_and(|m| m.contains("cannot obtain a credential")) || text(l, "reason") == Some("SecretNotFound"))
        })
        .context("no warning about the missing Secret")?;
    ensure!(
        connection_of(warning).as_deref() == Some(format!("{namespace}/broken").as_str()),
        "the warning names {:?}",
        connection_of(warning)
    );
    println!("--- a JSON log line ---\n{}\n---", Value::Object((*stored).clone()));

    // RUST_LOG=warn: only warnings and errors.
    let quiet = start_operator_with(&kubeconfig, &namespace, &["--log-format", "json"], &[("RUST_LOG", "warn")])?;
    s.replace_operator(quiet).await?;
    wait_for_log(&s, "the missing Secret after the restart", Duration::from_secs(30), |logs| {
        logs.contains("cannot obtain a credential")
    })
    .await?;
    let quiet_lines = json_lines(&s.operator.logs())?;
    for line in &quiet_lines {
        check_structure(line)?;
        ensure!(
            matches!(text(line, "level"), Some("WARN" | "ERROR")),
            "RUST_LOG=warn let through {}",
            Value::Object(line.clone())
        );
    }
    s.assert_no_credential_leaked().await
}

// ---------------------------------------------------------------------------------------
// kubectl explain and get
// ---------------------------------------------------------------------------------------

/// Paths of properties below `schema` (spec or status) without a description.
fn undescribed(path: &str, schema: &Value, missing: &mut Vec<String>) {
    if schema
        .get("description")
        .and_then(Value::as_str)
        .is_none_or(|d| d.trim().is_empty())
    {
        missing.push(path.to_owned());
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            undescribed(&format!("{path}.{name}"), property, missing);
        }
    }
    if let Some(items) = schema.get("items") {
        undescribed(&format!("{path}[]"), items, missing);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        undescribed(&format!("{path}{{}}"), values, missing);
    }
}

/// The kubectl to run: `TLO_KUBECTL` (hack/tools.sh builds it from the control plane's
/// module and version). Missing, it fails the scenario: a check that cannot run is not passed.
fn kubectl_binary() -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::var_os("TLO_KUBECTL")
        .filter(|path| !path.is_empty())
        .map(std::path::PathBuf::from)
        .context("TLO_KUBECTL is not set: run `eval \"$(hack/tools.sh)\"` (it builds kubectl) before the e2e tests")?;
    ensure!(path.is_file(), "TLO_KUBECTL={} is not a file: run hack/tools.sh", path.display());
    Ok(path)
}

async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let output = tokio::process::Command::new(kubectl_binary()?)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .await
        .context("running kubectl")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

async fn kubectl_explain_reads_well(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "explain").await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;

    // What the API server serves.
    let crds: Api<CustomResourceDefinition> = Api::all(s.client.clone());
    let crd = crds.get(TasklistConnection::crd_name()).await?;
    ensure!(crd.spec.names.short_names.iter().flatten().any(|n| n == "tlc"), "no short name tlc");
    let version = crd
        .spec
        .versions
        .iter()
        .find(|v| v.served && v.storage)
        .context("no served storage version")?;
    let schema = serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .context("no schema")?,
    )?;
    let mut missing = Vec::new();
    for part in ["spec", "status"] {
        let part_schema = schema
            .pointer(&format!("/properties/{part}"))
            .with_context(|| format!("no {part} in the schema"))?;
        undescribed(part, part_schema, &mut missing);
    }
    ensure!(missing.is_empty(), "fields without a description: {missing:?}");
    let oauth2 = schema
        .pointer("/properties/spec/properties/auth/properties/oauth2/description")
        .and_then(Value::as_str)
        .unwrap_or_default();
    ensure!(oauth2.contains("OAuth2"), "spec.auth.oauth2's description: {oauth2:?}");
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    ensure!(
        columns == ["Ready", "Auth", "Expires", "Reason", "Age"],
        "printer columns are {columns:?}"
    );

    kubectl_binary()?;
    let kubeconfig = world.control_plane.kubeconfig();
    // The OpenAPI document can lag behind the CRD by a few seconds.
    let explained = eventually("kubectl explain describing spec.auth.oauth2", Duration::from_secs(60), || async {
        let (ok, out) = kubectl(kubeconfig, &["explain", "tasklistconnection.spec.auth.oauth2"]).await?;
        Ok(if ok && out.contains("tokenUrl") {
            Check::Done(out)
        } else {
            Check::NotYet(format!("it said:\n{out}"))
        })
    })
    .await?;
    println!("--- kubectl explain tasklistconnection.spec.auth.oauth2 ---\n{explained}---");
    for expected in [
        "DESCRIPTION",
        "OAuth2 client credentials",
        "FIELDS",
        "tokenUrl",
        "clientSecretRef",
        "audience",
    ] {
        ensure!(explained.contains(expected), "kubectl explain lacks {expected:?}:\n{explained}");
    }
    let (ok, got) = kubectl(kubeconfig, &["get", "tlc", "-n", &s.namespace]).await?;
    ensure!(ok, "kubectl get tlc failed:\n{got}");
    println!("--- kubectl get tlc -n {} ---\n{got}---", s.namespace);
    let mut rows = got.lines();
    let header: Vec<&str> = rows.next().unwrap_or_default().split_whitespace().collect();
    ensure!(
        header == ["NAME", "READY", "AUTH", "EXPIRES", "REASON", "AGE"],
        "kubectl get tlc header: {header:?}"
    );
    let row: Vec<&str> = rows
        .find(|row| row.starts_with("orders"))
        .context("no row for orders")?
        .split_whitespace()
        .collect();
    ensure!(
        row.len() == 6 && row[1] == "True" && row[2] == "oauth2" && row[3].parse::<Timestamp>().is_ok(),
        "kubectl get tlc row: {row:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------

async fn health_endpoints_answer(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start(&world, "health").await?;
    let http = http_client()?;
    let base = s.operator_url().await?;

    let healthz = http.get(format!("{base}/healthz")).send().await?;
    ensure!(healthz.status() == 200, "/healthz answered {}", healthz.status());
    eventually("/readyz answering 200", Duration::from_secs(30), || async {
        let readyz = http.get(format!("{base}/readyz")).send().await?;
        Ok(if readyz.status() == 200 {
            Check::Done(())
        } else {
            Check::NotYet(format!(
                "it answers {}\n--- operator log (tail) ---\n{}",
                readyz.status(),
                tail(&strip_ansi(&s.operator.logs()), 30)
            ))
        })
    })
    .await?;
    let metrics = scrape(&http, &format!("{base}/metrics")).await?;
    ensure!(
        metrics.has("tasklist_operator_reconciles_total"),
        "/metrics lacks the reconcile counter"
    );
    let unknown = http.get(format!("{base}/nothing-here")).send().await?;
    ensure!(unknown.status() == 404, "an unknown path answered {}", unknown.status());
    // Health does not depend on any connection, and it stays up while the operator works.
    let healthz = http.get(format!("{base}/healthz")).send().await?;
    ensure!(healthz.status() == 200);
    Ok(())
}

/// Text logs as `kubectl logs` shows them: the connection named once per line (not again
/// by kube-runtime's span), one WARN when the probe starts failing rather than one per
/// probe, and durations written like `962ms` or `5m`.
async fn text_logs_name_the_connection_once_and_warn_on_changes_only(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "textlogs").await?;
    let mut spec = s.saas_spec();
    spec["probe"] = json!({"interval": "10s"});
    s.apply_connection("orders", spec).await?;
    s.wait_ready("orders").await?;
    let data = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    s.remember_credential(&data);

    // Tasklist refuses the token for three probes, then accepts it again.
    s.standin.set_api(EndpointMode::Reject);
    s.wait_not_ready_because("orders", "ProbeUnauthorized").await?;
    let refused_from = s.standin.api_requests().len();
    let deadline = Instant::now() + Duration::from_secs(40);
    while s.standin.api_requests().len() < refused_from + 2 {
        ensure!(
            Instant::now() < deadline,
            "the operator stopped probing while Tasklist refused the token"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let refused_probes = s.standin.api_requests().len() - refused_from + 1;
    s.standin.set_api(EndpointMode::Normal);
    s.wait_ready("orders").await?;

    // A failing token endpoint: the retry delay is logged.
    s.standin.set_token_endpoint(EndpointMode::Down);
    s.annotate_connection("orders", REFRESH_ANNOTATION, "textlogs-1").await?;
    s.wait_not_ready_because("orders", "AuthServerError").await?;
    wait_for_log(&s, "the failed token request", Duration::from_secs(15), |logs| {
        logs.contains("could not obtain a credential")
    })
    .await?;
    s.standin.set_token_endpoint(EndpointMode::Normal);

    let logs = strip_ansi(&s.operator.logs());
    println!("--- text log of {} ---\n{logs}---", s.namespace);
    let connection = format!("{}/orders", s.namespace);
    let probe_warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains(" WARN ") && line.contains("probe failed"))
        .collect();
    ensure!(
        probe_warnings.len() == 1,
        "{refused_probes} refused probes gave {} WARN lines, want 1 (on the change only):\n{}",
        probe_warnings.len(),
        probe_warnings.join("\n")
    );
    ensure!(
        logs.lines().filter(|line| line.contains("probe succeeds again")).count() == 1,
        "no single INFO line when the probe succeeded again"
    );
    for line in logs.lines().filter(|line| line.contains(&s.namespace)) {
        ensure!(
            !line.contains("reconciling object") && !line.contains("object.ref"),
            "kube-runtime's span names the connection again: {line}"
        );
        ensure!(
            line.matches(&s.namespace).count() == 1,
            "a line names the connection more than once: {line}"
        );
    }
    let reconcile_lines: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("tasklist_operator::controller::reconcile"))
        .collect();
    ensure!(!reconcile_lines.is_empty(), "no line from the reconcile");
    for line in &reconcile_lines {
        ensure!(
            line.contains(&format!("connection={connection}")),
            "a reconcile line does not name its connection: {line}"
        );
    }
    let retry = logs
        .lines()
        .find(|line| line.contains("could not obtain a credential"))
        .context("no line about the failed token request")?;
    let retry_in = retry
        .split_whitespace()
        .find_map(|word| word.strip_prefix("retry_in="))
        .with_context(|| format!("no retry_in on {retry}"))?;
    ensure!(
        !retry_in.is_empty()
            && retry_in
                .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.')
            && ["ms", "s", "m", "h"].iter().any(|unit| retry_in.ends_with(unit)),
        "retry_in is not written like 962ms or 5m: {retry_in:?}"
    );
    let nanoseconds = logs.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.')).any(|word| {
        word.strip_suffix("ns")
            .is_some_and(|number| !number.is_empty() && number.chars().all(|c| c.is_ascii_digit()))
    });
    ensure!(!logs.contains('µ') && !nanoseconds, "a duration is printed with µs or ns:\n{logs}");
    s.assert_no_credential_leaked().await
}
