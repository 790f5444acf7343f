//! When to obtain the next credential, and how long to wait after a failure.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::camunda::AuthFailureKind;

/// Never refresh later than this before expiry.
const LAST_MOMENT: Duration = Duration::from_secs(5);
/// Share of the lifetime after which a credential is replaced.
const REFRESH_AT_SHARE: f64 = 0.8;
/// Largest random jitter, as a share of the lifetime: spreads connections that were issued
/// together so they do not all refresh at the same instant.
const MAX_JITTER_SHARE: f64 = 0.1;

/// When to replace a credential issued at `issued_at` that expires at `expires_at`:
/// at 80 % of its lifetime, or `refresh_before` before expiry if that comes earlier, minus
/// a jitter of up to 10 % of the lifetime (`jitter` in `0.0..1.0` picks how much), and
/// never later than 5 s before expiry.
pub fn refresh_time(issued_at: Timestamp, expires_at: Timestamp, refresh_before: Option<Duration>, jitter: f64) -> Timestamp {
    let lifetime = expires_at.duration_since(issued_at).max(SignedDuration::ZERO);
    let mut refresh = issued_at + lifetime.mul_f64(REFRESH_AT_SHARE);
    if let Some(before) = refresh_before.and_then(|before| SignedDuration::try_from(before).ok()) {
        refresh = refresh.min(expires_at.checked_sub(before).unwrap_or(issued_at));
    }
    refresh -= lifetime.mul_f64(MAX_JITTER_SHARE * jitter.clamp(0.0, 1.0));
    let last_moment = expires_at - SignedDuration::try_from(LAST_MOMENT).unwrap_or_default();
    refresh.min(last_moment).max(issued_at)
}

/// The first retry after a failure waits this long; each further failure doubles it.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between retries.
const MAX_RETRY: Duration = Duration::from_secs(300);
/// After a rejection (4xx) the same credentials are not tried again sooner than this:
/// SaaS itself slows down clients that repeat bad credentials.
const MIN_RETRY_AFTER_REJECTION: Duration = Duration::from_secs(30);

/// How long to wait before the next try after `consecutive_failures` failures in a row
/// (1 for the first). `jitter` in `0.0..1.0` spreads the wait by ±25 %.
pub fn retry_delay(consecutive_failures: u32, kind: AuthFailureKind, jitter: f64) -> Duration {
    let doublings = consecutive_failures.saturating_sub(1).min(16);
    let exponential = FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY);
    let spread = exponential.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0)).min(MAX_RETRY);
    match kind {
        AuthFailureKind::Rejected => spread.max(MIN_RETRY_AFTER_REJECTION),
        AuthFailureKind::ServerError => spread,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn refreshes_at_80_percent_without_jitter() {
        assert_eq!(refresh_time(at(0), at(1000), None, 0.0), at(800));
    }

    #[test]
    fn jitter_moves_the_refresh_earlier_by_at_most_10_percent() {
        assert_eq!(refresh_time(at(0), at(1000), None, 1.0), at(700));
        for step in 0..=10 {
            let refresh = refresh_time(at(0), at(1000), None, f64::from(step) / 10.0);
            assert!(refresh >= at(700) && refresh <= at(800), "{refresh}");
        }
    }

    #[test]
    fn refresh_before_wins_when_it_comes_earlier() {
        // 86400 s SaaS token with refreshBefore 6h: 6 h before expiry beats 80 %.
        assert_eq!(
            refresh_time(at(0), at(86_400), Some(Duration::from_secs(6 * 3600)), 0.0),
            at(64_800)
        );
        // A late refreshBefore does not delay the 80 % rule.
        assert_eq!(refresh_time(at(0), at(1000), Some(Duration::from_secs(10)), 0.0), at(800));
    }

    #[test]
    fn never_later_than_5s_before_expiry_nor_before_issue() {
        assert_eq!(refresh_time(at(0), at(20), None, 0.0), at(15));
        assert_eq!(refresh_time(at(0), at(3), None, 0.0), at(0));
        assert_eq!(refresh_time(at(0), at(1000), Some(Duration::from_secs(5000)), 0.0), at(0));
    }

    #[test]
    fn retries_double_from_one_second_up_to_five_minutes() {
        let server = |n| retry_delay(n, AuthFailureKind::ServerError, 0.5);
        assert_eq!(server(1), Duration::from_secs(1));
        assert_eq!(server(2), Duration::from_secs(2));
        assert_eq!(server(5), Duration::from_secs(16));
        assert_eq!(server(9), Duration::from_secs(256));
        assert_eq!(server(10), MAX_RETRY);
        assert_eq!(server(u32::MAX), MAX_RETRY);
        assert_eq!(retry_delay(10, AuthFailureKind::ServerError, 1.0), MAX_RETRY);
        assert_eq!(retry_delay(1, AuthFailureKind::ServerError, 0.0), Duration::from_millis(750));
    }

    #[test]
    fn rejections_wait_at_least_30_seconds() {
        assert_eq!(retry_delay(1, AuthFailureKind::Rejected, 0.0), Duration::from_secs(30));
        assert_eq!(retry_delay(7, AuthFailureKind::Rejected, 0.5), Duration::from_secs(64));
    }
}
