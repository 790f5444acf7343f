//! What a monitoring stack makes of the operator: `/metrics` read by Prometheus's own
//! scrape parsers in both formats it negotiates, and the chart's alerting rules checked
//! and unit-tested by promtool. Needs `TLO_SCRAPECHECK`, `TLO_PROMTOOL` and `TLO_HELM`
//! (`eval "$(hack/tools.sh)"`); a missing one fails the test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde::Deserialize;
use tasklist_operator::metrics::{
    ConnectionLabels, CredentialRequestLabels, MethodLabels, Metrics, ReasonLabels, ResultLabels, SourceLabels,
};
use tasklist_operator::serve::{Health, serve};

fn tool(var: &str) -> PathBuf {
    match std::env::var_os(var).filter(|value| !value.is_empty()) {
        Some(path) if Path::new(&path).is_file() => PathBuf::from(path),
        Some(path) => panic!(
            "{var}={} is not a file; run `eval \"$(hack/tools.sh)\"`",
            Path::new(&path).display()
        ),
        None => panic!("{var} is not set; run `eval \"$(hack/tools.sh)\"` before `cargo test`"),
    }
}

#[derive(Debug, Deserialize)]
struct ScrapeReport {
    #[serde(rename = "contentType")]
    content_type: String,
    parser: String,
    families: Vec<Family>,
}

#[derive(Debug, Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    samples: Option<Vec<Sample>>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl ScrapeReport {
    fn family(&self, name: &str) -> &Family {
        self.families
            .iter()
            .find(|family| family.name == name)
            .unwrap_or_else(|| panic!("no family {name} in {:#?}", self.families))
    }
}

impl Family {
    fn samples(&self) -> &[Sample] {
        self.samples.as_deref().unwrap_or_default()
    }
}

/// Scrapes `url` with scrapecheck (Prometheus's parsers) sending `accept`, if given.
fn scrape(url: &str, accept: Option<&str>) -> ScrapeReport {
    let mut command = Command::new(tool("TLO_SCRAPECHECK"));
    if let Some(accept) = accept {
        command.args(["-accept", accept]);
    }
    let output = command.arg(url).output().expect("run scrapecheck");
    assert!(
        output.status.success(),
        "Prometheus's parsers reject /metrics (Accept {accept:?}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("scrapecheck prints JSON")
}

/// A registry with a series in every family (a family without series is not exported).
fn metrics_with_a_series_in_every_family() -> Metrics {
    let metrics = Metrics::default().with_shard_info(1, 2);
    let orders = ConnectionLabels {
        namespace: "team-a".into(),
        name: "orders".into(),
    };
    metrics.connection_ready.get_or_create(&orders).set(1);
    metrics.credential_expiry.get_or_create(&orders).set(1_900_000_000);
    for _ in 0..3 {
        metrics.reconciles.inc();
    }
    metrics
        .credential_requests
        .get_or_create(&CredentialRequestLabels {
            method: "oauth2".into(),
            result: "CredentialsRejected".into(),
        })
        .inc();
    metrics
        .credential_refreshes
        .get_or_create(&MethodLabels { method: "cookie".into() })
        .inc();
    metrics
        .reconcile_errors
        .get_or_create(&ReasonLabels {
            reason: "KubernetesApi".into(),
        })
        .inc();
    metrics
        .token_requests_saved
        .get_or_create(&SourceLabels { source: "cache".into() })
        .inc();
    metrics.token_request_duration.observe(0.2);
    metrics.login_duration.observe(0.3);
    metrics.reconcile_duration.observe(0.01);
    metrics
        .probe_duration
        .get_or_create(&ResultLabels {
            result: "ProbeSucceeded".into(),
        })
        .observe(0.05);
    metrics
}

/// Serves a registry with a series in every family on a free loopback port.
async fn serve_some_metrics() -> String {
    let metrics = Arc::new(metrics_with_a_series_in_every_family());
    let port = testsupport::tools::free_loopback_port().expect("a free port");
    let address = format!("127.0.0.1:{port}").parse().expect("an address");
    tokio::spawn(serve(address, Arc::new(Health::default()), metrics, std::future::pending()));
    let url = format!("http://127.0.0.1:{port}/metrics");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return url;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the metrics port {port} did not open");
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_reads_the_same_metrics_in_both_formats() {
    let url = serve_some_metrics().await;
    let url_for_blocking = url.clone();
    let (openmetrics, text, plain) = tokio::task::spawn_blocking(move || {
        (
            // What Prometheus 3 sends by default.
            scrape(&url_for_blocking, None),
            // A scraper that reads only the text format (Prometheus with
            // scrape_protocols: [PrometheusText0.0.4], many agents and tools).
            scrape(&url_for_blocking, Some("text/plain;version=0.0.4;q=1,*/*;q=0.1")),
            // No preference at all.
            scrape(&url_for_blocking, Some("*/*")),
        )
    })
    .await
    .expect("scrapes");

    assert!(
        openmetrics.content_type.starts_with("application/openmetrics-text; version=1.0.0") && openmetrics.parser == "openmetrics",
        "{openmetrics:?}"
    );
    for report in [&text, &plain] {
        assert!(
            report.content_type.starts_with("text/plain; version=0.0.4") && report.parser == "text",
            "{report:?}"
        );
    }

    // OpenMetrics: a counter family has no _total; its samples do.
    let reconciles = openmetrics.family("tasklist_operator_reconciles");
    assert_eq!(reconciles.kind, "counter");
    assert_eq!(
        reconciles.samples(),
        &[Sample {
            name: "tasklist_operator_reconciles_total".into(),
            labels: BTreeMap::new(),
            value: 3.0
        }]
    );
    // The text format: the counter family is named with _total and holds its sample, and
    // nothing is untyped (the symptom of OpenMetrics served as text).
    let reconciles = text.family("tasklist_operator_reconciles_total");
    assert_eq!(reconciles.kind, "counter");
    assert_eq!(reconciles.samples().len(), 1);
    assert_eq!(reconciles.samples()[0].value, 3.0);
    for family in &text.families {
        assert!(
            ["counter", "gauge", "histogram"].contains(&family.kind.as_str()),
            "{} is {} in the text format",
            family.name,
            family.kind
        );
    }

    // Every OpenMetrics family is in the text format with the same type and the same
    // counter and gauge samples (histogram buckets are compared by their count and sum).
    for family in &openmetrics.families {
        let text_name = if family.kind == "counter" {
            format!("{}_total", family.name)
        } else {
            family.name.clone()
        };
        let in_text = text.family(&text_name);
        assert_eq!(in_text.kind, family.kind, "{}", family.name);
        let comparable = |samples: &[Sample]| -> Vec<(String, BTreeMap<String, String>, u64)> {
            let mut list: Vec<_> = samples
                .iter()
                .filter(|s| !s.name.ends_with("_bucket") && !s.name.ends_with("_created"))
                .map(|s| (s.name.clone(), s.labels.clone(), s.value.to_bits()))
                .collect();
            list.sort();
            list
        };
        assert_eq!(comparable(family.samples()), comparable(in_text.samples()), "{}", family.name);
    }
    let expiry = text.family("tasklist_operator_credential_expiry_timestamp_seconds");
    assert_eq!(expiry.kind, "gauge");
    assert_eq!(expiry.samples()[0].value, 1_900_000_000.0);
    assert_eq!(
        expiry.samples()[0].labels,
        BTreeMap::from([("namespace".into(), "team-a".into()), ("name".into(), "orders".into())])
    );
}

// ---------------------------------------------------------------------------------------
// The chart's alerts and dashboard

/// `helm template` of the chart with `--set` values; the one object of `kind`.
fn render_one(kind: &str, set: &[&str]) -> serde_json::Value {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/tasklist-operator");
    let mut command = Command::new(tool("TLO_HELM"));
    command.args(["template", "tlo"]).arg(chart).args(["--namespace", "tlo-system"]);
    for value in set {
        command.args(["--set", value]);
    }
    let output = command.output().expect("run helm");
    assert!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    let mut found: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|document| serde_json::Value::deserialize(document).expect("YAML"))
        .filter(|object| object["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found.remove(0)
}

fn promtool(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(tool("TLO_PROMTOOL"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{said}");
    said
}

/// Every metric name in a PromQL expression that belongs to the operator.
fn operator_metrics_in(expression: &str) -> Vec<String> {
    expression
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("tasklist_operator_"))
        .map(str::to_owned)
        .collect()
}

/// The sample names the operator exports (the text format names counters with `_total`).
fn exported_names() -> Vec<String> {
    let text = metrics_with_a_series_in_every_family().encode(tasklist_operator::metrics::ExpositionFormat::Text);
    let mut names = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("a TYPE line");
            names.push(name.to_owned());
            if kind == "histogram" {
                names.extend(["_bucket", "_sum", "_count"].map(|suffix| format!("{name}{suffix}")));
            }
        }
    }
    names
}

#[test]
fn promtool_checks_the_alerts_and_fires_them_on_recorded_series() {
    let rule = render_one("PrometheusRule", &["prometheusRule.enabled=true"]);
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&rule["spec"]).expect("YAML")).expect("write rules.yaml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/monitoring/alerts_test.yaml"),
        dir.path().join("alerts_test.yaml"),
    )
    .expect("copy the rule tests");
    let checked = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 4 rules found"), "{checked}");
    // Each alert fires at the minute tests/monitoring/alerts_test.yaml says, and no earlier.
    promtool(dir.path(), &["test", "rules", "alerts_test.yaml"]);

    let exported = exported_names();
    for rule in rule["spec"]["groups"][0]["rules"].as_array().expect("rules") {
        let expression = rule["expr"].as_str().expect("an expression");
        for name in operator_metrics_in(expression) {
            assert!(
                exported.contains(&name),
                "alert {} uses {name}, which the operator does not export",
                rule["alert"]
            );
        }
    }
}

#[test]
fn promtool_fires_the_shard_alert_for_a_shard_without_a_scraped_replica() {
    let rule = render_one("PrometheusRule", &["prometheusRule.enabled=true", "sharding.shards=2"]);
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&rule["spec"]).expect("YAML")).expect("write rules.yaml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/monitoring/shard_alerts_test.yaml"),
        dir.path().join("shard_alerts_test.yaml"),
    )
    .expect("copy the rule tests");
    let checked = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
    promtool(dir.path(), &["test", "rules", "shard_alerts_test.yaml"]);
    let exported = exported_names();
    let shard_down = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|rule| rule["alert"] == "TasklistOperatorShardDown")
        .expect("the shard alert");
    for name in operator_metrics_in(shard_down["expr"].as_str().expect("an expression")) {
        assert!(
            exported.contains(&name),
            "the shard alert uses {name}, which the operator does not export"
        );
    }
}

#[test]
fn dashboard_queries_are_valid_promql_on_exported_metrics() {
    let config_map = render_one("ConfigMap", &["grafanaDashboard.enabled=true"]);
    let dashboard: serde_json::Value =
        serde_json::from_str(config_map["data"]["tasklist-operator.json"].as_str().expect("the dashboard")).expect("JSON");
    let exported = exported_names();
    let mut recording_rules = Vec::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        titles.push(panel["title"].as_str().expect("a title").to_owned());
        for target in panel["targets"].as_array().expect("targets") {
            let expression = target["expr"].as_str().expect("an expression");
            let names = operator_metrics_in(expression);
            assert!(!names.is_empty(), "panel {} queries no operator metric", panel["title"]);
            for name in names {
                assert!(
                    exported.contains(&name),
                    "panel {} uses {name}, which the operator does not export",
                    panel["title"]
                );
            }
            // Grafana's variables, as Grafana would fill them in.
            let promql = expression.replace("$__rate_interval", "5m").replace("$namespace", ".*");
            recording_rules.push(serde_json::json!({"record": format!("dashboard:panel{}", recording_rules.len()), "expr": promql}));
        }
    }
    for wanted in ["Ready", "expiry", "Token request latency", "Login latency", "failures by reason"] {
        assert!(
            titles.iter().any(|title| title.contains(wanted)),
            "no panel about {wanted:?}: {titles:?}"
        );
    }
    // promtool parses every query (as recording rules).
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rules = serde_json::json!({"groups": [{"name": "dashboard", "rules": recording_rules}]});
    std::fs::write(dir.path().join("dashboard.yaml"), serde_yaml::to_string(&rules).expect("YAML")).expect("write");
    let checked = promtool(dir.path(), &["check", "rules", "dashboard.yaml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
}
