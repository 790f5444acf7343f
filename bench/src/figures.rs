//! The arithmetic of the benchmark, kept apart from the processes it measures so that it
//! is unit-tested: percentiles, the kube-apiserver's request counters, /proc figures.

use std::collections::BTreeMap;
use std::time::Duration;

/// The `p`-th percentile (0..=100) by the nearest-rank method: the smallest sample that at
/// least `p` % of the samples do not exceed. `None` without samples.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `apiserver_request_total` summed by `"VERB resource[/subresource]"` (over codes, scopes,
/// groups and components), from the Prometheus text the API server serves at `/metrics`.
pub fn apiserver_requests(metrics_text: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for line in metrics_text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| label_value(labels, name).unwrap_or_default();
        let resource = match label("subresource") {
            "" => label("resource").to_owned(),
            subresource => format!("{}/{subresource}", label("resource")),
        };
        *sums.entry(format!("{} {resource}", label("verb"))).or_insert(0.0) += value;
    }
    sums
}

/// The value of `name="..."` in a Prometheus label set (values here never hold quotes).
fn label_value<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let pattern = format!("{name}=\"");
    let mut search = labels;
    loop {
        let at = search.find(&pattern)?;
        // A match inside a longer name (`subresource` when looking for `resource`) is skipped.
        let preceded_by_name_char = search[..at].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let value_start = at + pattern.len();
        if !preceded_by_name_char {
            let value = &search[value_start..];
            return value.find('"').map(|end| &value[..end]);
        }
        search = &search[value_start..];
    }
}

/// `after - before` per key, leaving out keys that did not change.
pub fn counter_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(key, value)| (key.clone(), value - before.get(key).copied().unwrap_or_default()))
        .filter(|(_, delta)| *delta != 0.0)
        .collect()
}

/// Whether a `"VERB resource"` key of [`apiserver_requests`] is a write.
pub fn is_write(key: &str) -> bool {
    let verb = key.split(' ').next().unwrap_or_default();
    matches!(
        verb,
        "POST" | "PUT" | "PATCH" | "DELETE" | "DELETECOLLECTION" | "APPLY" | "CREATE" | "UPDATE"
    )
}

/// Whether a `"VERB resource"` key concerns what the operator reads or writes (its Lease
/// only with leader election, which the benchmark does not turn on).
pub fn is_operator_resource(key: &str) -> bool {
    let resource = key.split(' ').nth(1).unwrap_or_default();
    let resource = resource.split('/').next().unwrap_or_default();
    matches!(resource, "secrets" | "tasklistconnections" | "events")
}

/// CPU seconds (user + system) from the text of `/proc/<pid>/stat`, at `ticks_per_second`.
pub fn cpu_seconds_from_stat(stat: &str, ticks_per_second: f64) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// A `kB` figure such as `VmRSS` from the text of `/proc/<pid>/status`, in bytes.
pub fn status_kilobytes(status: &str, field: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|line| line.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    let kilobytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_millis(*v)).collect()
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples = ms(&[50, 10, 40, 20, 30]);
        assert_eq!(percentile(&samples, 50.0), Some(Duration::from_millis(30)));
        assert_eq!(percentile(&samples, 99.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&samples, 0.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&[], 50.0), None);
        let hundred: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&hundred, 99.0), Some(Duration::from_millis(99)));
    }

    #[test]
    fn apiserver_requests_are_summed_by_verb_and_resource() {
        let text = r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="secrets",scope="resource",subresource="",verb="GET",version="v1"} 7
apiserver_request_total{code="404",component="apiserver",dry_run="",group="",resource="secrets",scope="resource",subresource="",verb="GET",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="tasklist.camunda.community",resource="tasklistconnections",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 2
apiserver_request_total_other{verb="GET",resource="secrets"} 100
apiserver_request_duration_seconds_count{verb="GET",resource="secrets"} 100
"#;
        let sums = apiserver_requests(text);
        assert_eq!(sums.len(), 2, "{sums:?}");
        assert_eq!(sums["GET secrets"], 10.0);
        assert_eq!(sums["APPLY tasklistconnections/status"], 2.0);
    }

    #[test]
    fn the_resource_label_is_not_confused_with_subresource() {
        let labels = r#"subresource="status",resource="tasklistconnections""#;
        assert_eq!(label_value(labels, "resource"), Some("tasklistconnections"));
        assert_eq!(label_value(labels, "subresource"), Some("status"));
        assert_eq!(label_value(labels, "verb"), None);
    }

    #[test]
    fn deltas_leave_out_unchanged_counters() {
        let before = BTreeMap::from([("GET secrets".to_owned(), 5.0), ("LIST pods".to_owned(), 1.0)]);
        let after = BTreeMap::from([
            ("GET secrets".to_owned(), 9.0),
            ("LIST pods".to_owned(), 1.0),
            ("POST events".to_owned(), 2.0),
        ]);
        let delta = counter_delta(&before, &after);
        assert_eq!(delta.len(), 2);
        assert_eq!(delta["GET secrets"], 4.0);
        assert_eq!(delta["POST events"], 2.0);
    }

    #[test]
    fn writes_and_operator_resources_are_told_apart() {
        assert!(is_write("APPLY tasklistconnections/status"));
        assert!(is_write("POST secrets"));
        assert!(!is_write("GET secrets"));
        assert!(!is_write("WATCH secrets"));
        assert!(is_operator_resource("APPLY tasklistconnections/status"));
        assert!(is_operator_resource("POST events"));
        assert!(!is_operator_resource("PUT leases"));
    }

    #[test]
    fn cpu_seconds_count_user_and_system_time() {
        // Fields 14 (utime) = 250 and 15 (stime) = 50 ticks; the name holds a space and a ')'.
        let stat = "1234 (a b) c) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 3 0 100 1000 200";
        assert_eq!(cpu_seconds_from_stat(stat, 100.0), Some(3.0));
        assert_eq!(cpu_seconds_from_stat("garbage", 100.0), None);
    }

    #[test]
    fn kilobyte_figures_are_read_from_proc_status() {
        let status = "Name:\ttasklist-operator\nVmHWM:\t   40960 kB\nVmRSS:\t   35840 kB\n";
        assert_eq!(status_kilobytes(status, "VmRSS"), Some(35840 * 1024));
        assert_eq!(status_kilobytes(status, "VmHWM"), Some(40960 * 1024));
        assert_eq!(status_kilobytes(status, "VmSwap"), None);
    }
}
