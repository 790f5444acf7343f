//! Time in one place: the instants and durations the operator computes with, reads and
//! writes, each rule once.
//!
//! - Arithmetic saturates ([`add`], [`sub`], [`since`]): a lifetime or a delay that does not
//!   fit is "never" ([`NEVER`]), not a panic nor a wrap.
//! - What is written down (a Secret, status) is RFC 3339 in UTC with whole seconds
//!   ([`rfc3339`], [`whole_seconds`]): a credential read back after a restart compares equal
//!   to the one written.
//! - Durations as users write them in a TasklistConnection and in flags ([`parse_duration`]):
//!   `30s`, `5m`, `1h30m`, `500ms`.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// The expiry and refresh time of a credential that does not expire (HTTP Basic): it is
/// replaced only when what it is made from changes. Never shown in status.
pub const NEVER: Timestamp = Timestamp::MAX;

/// `duration` as a signed duration, saturating at the longest one.
pub fn signed(duration: Duration) -> SignedDuration {
    SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX)
}

/// `at + duration`, saturating at [`NEVER`].
pub fn add(at: Timestamp, duration: Duration) -> Timestamp {
    plus(at, signed(duration))
}

/// `at - duration`, saturating at the earliest timestamp.
pub fn sub(at: Timestamp, duration: Duration) -> Timestamp {
    minus(at, signed(duration))
}

/// `at + duration` for a signed duration, saturating at either end.
pub fn plus(at: Timestamp, duration: SignedDuration) -> Timestamp {
    at.checked_add(duration)
        .unwrap_or(if duration.is_negative() { Timestamp::MIN } else { NEVER })
}

/// `at - duration` for a signed duration, saturating at either end.
pub fn minus(at: Timestamp, duration: SignedDuration) -> Timestamp {
    at.checked_sub(duration)
        .unwrap_or(if duration.is_negative() { NEVER } else { Timestamp::MIN })
}

/// How long from `earlier` to `later`; zero when `earlier` is not earlier.
pub fn since(later: Timestamp, earlier: Timestamp) -> Duration {
    Duration::try_from(later.duration_since(earlier)).unwrap_or_default()
}

/// `at` without its fraction of a second (what RFC 3339 in a Secret or status keeps).
pub fn whole_seconds(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

/// `at` without its fraction of a millisecond.
pub fn whole_milliseconds(at: Timestamp) -> Timestamp {
    Timestamp::from_millisecond(at.as_millisecond()).unwrap_or(at)
}

/// `duration` in whole seconds, rounded up (a lease must not look shorter than it is).
pub fn seconds_rounded_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// `duration` in seconds for messages: `0.2s`, `10s`.
pub fn in_seconds(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

/// RFC 3339 in UTC with whole seconds, as the contract shows it: `2026-05-04T10:00:00Z`.
pub fn rfc3339(at: Timestamp) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// An RFC 3339 timestamp (any offset), or `None`.
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    text.parse().ok()
}

/// Unix seconds as RFC 3339 for messages, or the number itself when it is no time.
pub fn describe_unix_seconds(unix_seconds: i64) -> String {
    Timestamp::from_second(unix_seconds).map_or_else(|_| unix_seconds.to_string(), rfc3339)
}

/// Parses a duration made of `<number><unit>` parts, units `h`, `m`, `s`, `ms`.
/// The CRD schema already rejects other spellings; this is the operator's own check.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("{text:?} is not a duration like 30s, 5m or 1h30m");
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
        if digits == 0 {
            return Err(invalid());
        }
        let amount: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "h" => Duration::from_secs(3600),
            "m" => Duration::from_secs(60),
            "s" => Duration::from_secs(1),
            "ms" => Duration::from_millis(1),
            _ => return Err(invalid()),
        };
        let part = unit
            .checked_mul(u32::try_from(amount).map_err(|_| invalid())?)
            .ok_or_else(invalid)?;
        total = total.checked_add(part).ok_or_else(invalid)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("a valid second")
    }

    #[test]
    fn arithmetic_saturates_instead_of_failing() {
        let cases = [
            (add(at(100), Duration::from_secs(5)), at(105)),
            (add(at(100), Duration::MAX), NEVER),
            (add(NEVER, Duration::from_secs(1)), NEVER),
            (sub(at(100), Duration::from_secs(5)), at(95)),
            (sub(at(100), Duration::MAX), Timestamp::MIN),
            (plus(at(100), SignedDuration::from_secs(-5)), at(95)),
            (minus(at(100), SignedDuration::from_secs(-5)), at(105)),
            (minus(Timestamp::MIN, SignedDuration::from_secs(1)), Timestamp::MIN),
        ];
        for (index, (computed, expected)) in cases.into_iter().enumerate() {
            assert_eq!(computed, expected, "case {index}");
        }
        assert_eq!(since(at(105), at(100)), Duration::from_secs(5));
        assert_eq!(since(at(100), at(105)), Duration::ZERO, "never negative");
    }

    #[test]
    fn written_times_have_whole_seconds_and_read_back_equal() {
        let precise = Timestamp::from_millisecond(1_000_999).expect("valid");
        assert_eq!(whole_seconds(precise), at(1_000));
        assert_eq!(
            whole_milliseconds(Timestamp::from_microsecond(1_000_999_999).expect("valid")),
            precise
        );
        assert_eq!(rfc3339(precise), "1970-01-01T00:16:40Z");
        assert_eq!(parse_rfc3339(&rfc3339(precise)), Some(whole_seconds(precise)));
        assert_eq!(parse_rfc3339("1970-01-01T01:16:40+01:00"), Some(at(1_000)));
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(describe_unix_seconds(0), "1970-01-01T00:00:00Z");
        assert_eq!(describe_unix_seconds(i64::MAX), i64::MAX.to_string());
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(seconds_rounded_up(Duration::from_secs(15)), 15);
        assert_eq!(seconds_rounded_up(Duration::from_millis(2500)), 3);
        assert_eq!(seconds_rounded_up(Duration::ZERO), 0);
        assert_eq!(in_seconds(Duration::from_millis(200)), "0.2s");
        assert_eq!(in_seconds(Duration::from_secs(10)), "10s");
    }

    #[test]
    fn parses_the_spellings_the_contract_shows() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m500ms"), Ok(Duration::from_millis(60_500)));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        for bad in ["", "30", "s", "1d", "-5m", "5 m", "1.5h", "99999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
