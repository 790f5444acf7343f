//! How the operator logs: the subscriber set-up, and the small decisions about what a line
//! says (how loud a probe result is, how a duration reads).

use std::io::IsTerminal;
use std::time::Duration;

use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// kube-runtime wraps every reconcile in a span of this name that names the object again
/// (`object.ref=TasklistConnection.v1alpha1.tasklist.camunda.community/orders.team-a`); the
/// operator's own span (`connection=team-a/orders`) already does, once and shorter.
const KUBE_RECONCILE_SPAN: &str = "reconciling object";

/// Log lines as human-readable text or as JSON objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: `kubectl logs` and log files get plain text.
    let colours = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let without_kube_span = filter_fn(|metadata| !(metadata.is_span() && metadata.name() == KUBE_RECONCILE_SPAN));
    let layer = fmt::layer().with_writer(std::io::stderr).with_ansi(colours);
    let layer = match format {
        LogFormat::Text => layer.with_filter(without_kube_span).boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(without_kube_span)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(layer).init();
}

/// A duration as a person writes it: `962ms`, `2.5s`, `42s`, `5m`, `1h30m`, `4m12s`.
pub fn human_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1_000 {
        return format!("{millis}ms");
    }
    if millis < 10_000 {
        // One decimal below ten seconds, where it still matters.
        let tenths = (millis + 50) / 100;
        return if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    let seconds = (millis + 500) / 1_000;
    let (hours, minutes, seconds) = (seconds / 3_600, seconds / 60 % 60, seconds % 60);
    let mut text = String::new();
    for (amount, unit) in [(hours, "h"), (minutes, "m"), (seconds, "s")] {
        if amount > 0 {
            text.push_str(&format!("{amount}{unit}"));
        }
    }
    text
}

/// [`human_duration`] of a jiff duration; a negative one reads as `0ms`.
pub fn human_signed_duration(duration: jiff::SignedDuration) -> String {
    human_duration(Duration::try_from(duration).unwrap_or_default())
}

/// How loud a probe result is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeLogLevel {
    /// The probe started failing, or fails differently: a WARN line.
    Warn,
    /// The probe succeeds again after failing: an INFO line.
    Info,
    /// The same as last time: DEBUG only, so that a failing probe does not repeat its WARN
    /// every interval.
    Debug,
}

/// Compares a probe's result with the previous one: `(succeeded, reason)` of each.
pub fn probe_log_level(previous: Option<(bool, &str)>, current: (bool, &str)) -> ProbeLogLevel {
    match (previous, current) {
        (Some(previous), current) if previous == current => ProbeLogLevel::Debug,
        (_, (false, _)) => ProbeLogLevel::Warn,
        (Some((false, _)), (true, _)) => ProbeLogLevel::Info,
        (_, (true, _)) => ProbeLogLevel::Debug,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let cases = [
            (Duration::from_nanos(962_635_863), "962ms"),
            (Duration::ZERO, "0ms"),
            (Duration::from_millis(2_500), "2.5s"),
            (Duration::from_millis(2_960), "3s"),
            (Duration::from_secs(42), "42s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(252), "4m12s"),
            (Duration::from_secs(5_400), "1h30m"),
            (Duration::from_secs(3_600), "1h"),
            (Duration::from_millis(59_600), "1m"),
        ];
        for (duration, expected) in cases {
            assert_eq!(human_duration(duration), expected, "{duration:?}");
        }
        assert_eq!(human_signed_duration(jiff::SignedDuration::from_millis(-5)), "0ms");
        assert_eq!(human_signed_duration(jiff::SignedDuration::from_millis(1_200)), "1.2s");
    }

    #[test]
    fn a_probe_warns_when_its_state_changes_not_at_every_probe() {
        use ProbeLogLevel::*;
        let cases = [
            (None, (false, "ProbeUnauthorized"), Warn),
            (Some((true, "ProbeSucceeded")), (false, "ProbeUnauthorized"), Warn),
            (Some((false, "ProbeUnauthorized")), (false, "ProbeUnauthorized"), Debug),
            (Some((false, "ProbeUnauthorized")), (false, "Unreachable"), Warn),
            (Some((false, "Unreachable")), (true, "ProbeSucceeded"), Info),
            (Some((true, "ProbeSucceeded")), (true, "ProbeSucceeded"), Debug),
            (None, (true, "ProbeSucceeded"), Debug),
        ];
        for (previous, current, expected) in cases {
            assert_eq!(probe_log_level(previous, current), expected, "{previous:?} then {current:?}");
        }
    }
}
