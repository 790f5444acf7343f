//! What a monitoring stack makes of the operator: `/metrics` read by Prometheus's own
//! scrape parsers in both formats it negotiates, and the chart's alerting rules checked
//! and unit-tested by promtool. Needs `TLO_SCRAPECHECK`, `TLO_PROMTOOL` and `TLO_HELM`
//! (`eval "$(hack/tools.sh)"`); a missing one fails the test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde::Deserialize;
use tasklist_operator::metrics::{ConnectionLabels, CredentialRequestLabels, Metrics, ResultLabels};
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

/// Serves a registry with a series in every kind of family on a free loopback port.
async fn serve_some_metrics() -> String {
    let metrics = Arc::new(Metrics::default());
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
    metrics.token_request_duration.observe(0.2);
    metrics
        .probe_duration
        .get_or_create(&ResultLabels {
            result: "ProbeSucceeded".into(),
        })
        .observe(0.05);
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
