//! Prometheus metrics. Label values stay bounded: a connection's namespace and name at
//! most, never a URL, a token or a secret.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialRequestLabels {
    /// `oauth2` or `cookie`.
    pub method: String,
    /// `success`, or the condition reason of the failure.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `in_flight` (another connection's request was awaited) or `cache` (a token another
    /// connection obtained was reused).
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabels {
    /// `reused` (a fresh answer another connection's probe got) or `joined` (waited for
    /// the same request in flight).
    pub how: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub connection_ready: Family<ConnectionLabels, Gauge>,
    pub credential_expiry: Family<ConnectionLabels, Gauge<i64, AtomicI64>>,
    pub credential_requests: Family<CredentialRequestLabels, Counter>,
    pub credential_refreshes: Family<MethodLabels, Counter>,
    pub token_requests_saved: Family<SourceLabels, Counter>,
    pub token_request_duration: Histogram,
    pub login_duration: Histogram,
    pub probe_duration: Family<ResultLabels, Histogram>,
    pub probes_shared: Family<HowLabels, Counter>,
    pub probes_deferred: Counter,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// The length of the last exposition: the next one starts with room for it, since
    /// growing a string of two series per connection by doubling kept up to four times its
    /// size in memory at once (7 MB at 10,000 connections).
    last_exposition: std::sync::atomic::AtomicUsize,
}

/// Buckets for requests to Camunda: 5 ms to about 20 s.
fn request_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 13)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tasklist_operator");
        let connection_ready = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "connection_ready",
            "Whether the connection is Ready (1) or not (0)",
            connection_ready.clone(),
        );
        let credential_expiry = Family::<ConnectionLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "credential_expiry_timestamp_seconds",
            "When the credential in the connection's Secret expires, as a Unix time",
            credential_expiry.clone(),
        );
        let credential_requests = Family::<CredentialRequestLabels, Counter>::default();
        registry.register(
            "credential_requests",
            "Token requests and logins, by method and result",
            credential_requests.clone(),
        );
        let credential_refreshes = Family::<MethodLabels, Counter>::default();
        registry.register(
            "credential_refreshes",
            "New credentials that replaced a stored one, by method",
            credential_refreshes.clone(),
        );
        let token_requests_saved = Family::<SourceLabels, Counter>::default();
        registry.register(
            "token_requests_saved",
            "Tokens a connection got without a request of its own, shared with connections of the same client, by source",
            token_requests_saved.clone(),
        );
        let token_request_duration = Histogram::new(request_buckets());
        registry.register(
            "token_request_duration_seconds",
            "Duration of token requests",
            token_request_duration.clone(),
        );
        let login_duration = Histogram::new(request_buckets());
        registry.register("login_duration_seconds", "Duration of cookie logins", login_duration.clone());
        let probe_duration = Family::<ResultLabels, Histogram>::new_with_constructor(|| Histogram::new(request_buckets()));
        registry.register(
            "probe_duration_seconds",
            "Duration of probes, by condition reason",
            probe_duration.clone(),
        );
        let probes_shared = Family::<HowLabels, Counter>::default();
        registry.register(
            "probes_shared",
            "Due probes answered without a request of their own: a fresh answer to the same request and credential reused, or the same request in flight joined",
            probes_shared.clone(),
        );
        let probes_deferred = Counter::default();
        registry.register(
            "probes_deferred",
            "Due probes put off for a second or two because no probe slot was free (per host or in all)",
            probes_deferred.clone(),
        );
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed with a Kubernetes API error and were retried, by reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(request_buckets());
        registry.register("reconcile_duration_seconds", "Duration of reconciles", reconcile_duration.clone());
        Metrics {
            registry,
            connection_ready,
            credential_expiry,
            credential_requests,
            credential_refreshes,
            token_requests_saved,
            token_request_duration,
            login_duration,
            probe_duration,
            probes_shared,
            probes_deferred,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            last_exposition: Default::default(),
        }
    }
}

/// The two exposition formats `/metrics` serves, chosen by the scraper's `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpositionFormat {
    /// The Prometheus text format 0.0.4: what Prometheus, its agents and most tools read.
    Text,
    /// OpenMetrics 1.0.0: counters are typed without `_total`, and the answer ends in `# EOF`.
    OpenMetrics,
}

impl ExpositionFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ExpositionFormat::Text => "text/plain; version=0.0.4; charset=utf-8",
            ExpositionFormat::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Content negotiation as Prometheus's own client libraries do it: the acceptable
    /// media range with the highest `q` wins, the first one on a tie; without an `Accept`
    /// header, or when nothing listed is acceptable, the text format.
    pub fn negotiate(accept: Option<&str>) -> ExpositionFormat {
        let mut best: Option<(f32, ExpositionFormat)> = None;
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media_type = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut quality = 1.0_f32;
            let mut version = None;
            for parameter in parts {
                let Some((key, value)) = parameter.split_once('=') else { continue };
                match key.trim().to_ascii_lowercase().as_str() {
                    "q" => quality = value.trim().parse().unwrap_or(0.0),
                    "version" => version = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
            let format = match media_type.as_str() {
                // prometheus-client writes OpenMetrics 1.0.0, which 0.0.1 readers read too.
                "application/openmetrics-text" => match version.as_deref() {
                    None | Some("1.0.0") | Some("0.0.1") => ExpositionFormat::OpenMetrics,
                    Some(_) => continue,
                },
                // Text format 1.0.0 only adds UTF-8 names; these names are plain ASCII.
                "text/plain" | "text/*" | "*/*" => ExpositionFormat::Text,
                _ => continue,
            };
            if quality > 0.0 && best.is_none_or(|(best_quality, _)| quality > best_quality) {
                best = Some((quality, format));
            }
        }
        best.map_or(ExpositionFormat::Text, |(_, format)| format)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub index: String,
    pub count: String,
}

impl Metrics {
    /// Adds the constant `shard_info{index, count}` = 1: which shard this process is, so that
    /// dashboards and alerts can tell the shards apart (index 0 of 1 without sharding).
    pub fn with_shard_info(mut self, index: u32, count: u32) -> Self {
        let info = Family::<ShardLabels, Gauge>::default();
        info.get_or_create(&ShardLabels {
            index: index.to_string(),
            count: count.to_string(),
        })
        .set(1);
        self.registry.register(
            "shard_info",
            "The shard this process handles (index of count; by hash of namespace/name); always 1",
            info,
        );
        self
    }

    /// Adds the nudge's `pod_nudges_total{result}` (issue 21): Pod patches after derived
    /// Secret writes, `patched` or `failed`.
    pub fn with_pod_nudges(mut self, pod_nudges: Family<ResultLabels, Counter>) -> Self {
        self.registry.register(
            "pod_nudges",
            "Patches of the credential-version annotation on Pods that mount a derived Secret, after its writes (patched or failed)",
            pod_nudges,
        );
        self
    }

    /// Every metric, in the format asked for.
    pub fn encode(&self, format: ExpositionFormat) -> String {
        use std::sync::atomic::Ordering;
        let room = self.last_exposition.load(Ordering::Relaxed);
        let mut openmetrics = String::with_capacity(room + room / 16);
        if prometheus_client::encoding::text::encode(&mut openmetrics, &self.registry).is_err() {
            openmetrics.clear();
        }
        self.last_exposition.store(openmetrics.len(), Ordering::Relaxed);
        match format {
            ExpositionFormat::OpenMetrics => openmetrics,
            ExpositionFormat::Text => openmetrics_to_text_format(&openmetrics),
        }
    }

    /// Drops the per-connection series of a deleted connection.
    pub fn forget_connection(&self, namespace: &str, name: &str) {
        let labels = ConnectionLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.connection_ready.remove(&labels);
        self.credential_expiry.remove(&labels);
    }
}

/// Rewrites prometheus-client's OpenMetrics output as the Prometheus text format 0.0.4.
///
/// The two differ, for the families this operator has, only in the metadata: an
/// OpenMetrics counter family `x` has samples `x_total`, while the text format names the
/// family `x_total` (a text-format reader would otherwise see a counter without samples
/// and an untyped `x_total`); `unknown` is `untyped`; `# UNIT` and `# EOF` do not exist;
/// HELP escapes only `\\` and `\n`. Samples are the same in both.
pub fn openmetrics_to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let family_name = |name: &str| {
        if counters.contains(name) {
            format!("{name}_total")
        } else {
            name.to_owned()
        }
    };
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = if kind == "unknown" { "untyped" } else { kind };
            text.push_str(&format!("# TYPE {} {kind}\n", family_name(name)));
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            text.push_str(&format!("# HELP {} {}\n", family_name(name), help.replace("\\\"", "\"")));
        } else if counters
            .iter()
            .any(|counter| line.strip_prefix(counter).is_some_and(|rest| rest.starts_with("_created")))
        {
            // A counter's creation time has no place in the text format.
            continue;
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::default();
        let labels = ConnectionLabels {
            namespace: "team-a".into(),
            name: "orders".into(),
        };
        metrics.connection_ready.get_or_create(&labels).set(1);
        metrics
            .credential_requests
            .get_or_create(&CredentialRequestLabels {
                method: "oauth2".into(),
                result: "success".into(),
            })
            .inc();
        metrics.token_request_duration.observe(0.02);
        let text = metrics.encode(ExpositionFormat::OpenMetrics);
        assert!(
            text.contains(r#"tasklist_operator_connection_ready{namespace="team-a",name="orders"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tasklist_operator_credential_requests_total{method="oauth2",result="success"} 1"#),
            "{text}"
        );
        assert!(text.contains("tasklist_operator_token_request_duration_seconds_bucket"), "{text}");
        metrics.forget_connection("team-a", "orders");
        assert!(!metrics.encode(ExpositionFormat::OpenMetrics).contains(r#"name="orders""#));
    }

    #[test]
    fn scrapers_get_the_format_they_ask_for() {
        use ExpositionFormat::{OpenMetrics, Text};
        // Prometheus 2.x and 3.x scrape headers.
        let prometheus2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let prometheus3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        let text_only = "text/plain;version=0.0.4;q=1,*/*;q=0.1";
        let cases = [
            (None, Text),
            (Some(""), Text),
            (Some("*/*"), Text),
            (Some(prometheus2), OpenMetrics),
            (Some(prometheus3), OpenMetrics),
            (Some(text_only), Text),
            (Some("text/plain"), Text),
            (Some("application/openmetrics-text"), OpenMetrics),
            (Some("application/openmetrics-text; version=2.0.0, text/plain;q=0.1"), Text),
            (Some("application/openmetrics-text;q=0, text/plain;q=0.1"), Text),
            (Some("text/plain;q=0.2, application/openmetrics-text;q=0.9"), OpenMetrics),
            (Some("text/plain, application/openmetrics-text"), Text),
            (Some("application/json"), Text),
        ];
        for (accept, expected) in cases {
            assert_eq!(ExpositionFormat::negotiate(accept), expected, "Accept: {accept:?}");
        }
    }

    #[test]
    fn the_text_format_names_counter_families_with_total() {
        let openmetrics = "# HELP x_reconciles Reconciles \\\"run\\\".\n# TYPE x_reconciles counter\n\
            x_reconciles_total 3\nx_reconciles_created 1.7e9\n# HELP x_up Up.\n# TYPE x_up gauge\n# UNIT x_up seconds\n\
            x_up{name=\"a\"} 1\n# TYPE x_odd unknown\nx_odd 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text_format(openmetrics),
            "# HELP x_reconciles_total Reconciles \"run\".\n# TYPE x_reconciles_total counter\nx_reconciles_total 3\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up{name=\"a\"} 1\n# TYPE x_odd untyped\nx_odd 2\n"
        );
    }

    #[test]
    fn every_family_reads_the_same_in_both_formats() {
        let metrics = Metrics::default();
        let labels = ConnectionLabels {
            namespace: "team-a".into(),
            name: "orders".into(),
        };
        metrics.connection_ready.get_or_create(&labels).set(1);
        metrics.reconciles.inc();
        metrics
            .probe_duration
            .get_or_create(&ResultLabels {
                result: "ProbeSucceeded".into(),
            })
            .observe(0.1);
        let openmetrics = metrics.encode(ExpositionFormat::OpenMetrics);
        let text = metrics.encode(ExpositionFormat::Text);
        let samples = |exposition: &str| -> Vec<String> { exposition.lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect() };
        assert_eq!(samples(&openmetrics), samples(&text));
        assert!(text.contains("# TYPE tasklist_operator_reconciles_total counter\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    }
}
