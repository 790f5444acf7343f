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
pub struct ResultLabels {
    pub result: String,
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
    pub token_request_duration: Histogram,
    pub login_duration: Histogram,
    pub probe_duration: Family<ResultLabels, Histogram>,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
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
            token_request_duration,
            login_duration,
            probe_duration,
            reconciles,
            reconcile_errors,
            reconcile_duration,
        }
    }
}

impl Metrics {
    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
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
        let text = metrics.encode();
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
        assert!(!metrics.encode().contains(r#"name="orders""#));
    }
}
