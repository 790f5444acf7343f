//! The time arithmetic of the refresh rule: when to replace a credential, how long to wait
//! after a failure, and how long a credential may be taken to live. Pure; the README's
//! "When credentials are refreshed" section states the same rules in words.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::camunda::AuthFailureKind;
use crate::time::{minus, plus, signed};

/// Never plan a refresh later than this before expiry (when the lifetime allows).
const LAST_MOMENT: Duration = Duration::from_secs(5);
/// Share of the lifetime after which a credential is replaced.
const REFRESH_AT_SHARE: f64 = 0.8;
/// Largest random jitter, as a share of the lifetime: spreads connections that were issued
/// together so they do not all refresh at the same instant.
const MAX_JITTER_SHARE: f64 = 0.1;
/// Never replace a credential sooner than this after it was issued, whatever its lifetime:
/// a server handing out 1 s tokens must not make the operator ask every half second.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Default of `--secret-volume-delay`: how long the kubelet may take to copy a changed
/// Secret into the Pods' volumes (its sync period is 1 minute, plus jitter and cache TTL).
pub const DEFAULT_SECRET_VOLUME_DELAY: Duration = Duration::from_secs(120);
/// Default of `--max-credential-lifetime`.
pub const DEFAULT_MAX_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Cookie sessions are trusted for at least this long: a shorter `sessionTimeout` would
/// log in again every few seconds.
pub const MIN_SESSION_TIMEOUT: Duration = Duration::from_secs(30);

/// The operator-wide settings of the refresh rule (operator flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Room left before expiry for the kubelet to update mounted Secrets
    /// (`--secret-volume-delay`).
    pub secret_volume_delay: Duration,
    /// No credential is taken to live longer than this (`--max-credential-lifetime`).
    pub max_credential_lifetime: Duration,
    /// At most one obtain per connection is forced through the refresh annotation in this
    /// long (`--forced-refresh-interval`).
    pub forced_refresh_interval: Duration,
    /// The room left for connections whose consumers are all nudged
    /// (`--nudged-secret-volume-delay`), when the nudge is on (`--nudge-pods`).
    pub nudged_secret_volume_delay: Option<Duration>,
}

/// At most one obtain a minute may be forced through the refresh annotation, per connection:
/// bumping it must not become a way around the failure backoff, or a way to make the
/// operator hammer a token endpoint.
pub const DEFAULT_FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            secret_volume_delay: DEFAULT_SECRET_VOLUME_DELAY,
            max_credential_lifetime: DEFAULT_MAX_CREDENTIAL_LIFETIME,
            forced_refresh_interval: DEFAULT_FORCED_REFRESH_INTERVAL,
            nudged_secret_volume_delay: None,
        }
    }
}

impl RefreshPolicy {
    /// The policy for a connection: the room before expiry is the nudged one when the nudge
    /// is on and the connection says every consumer of its Secret is nudged
    /// (`all_consumers_nudged`), never more than `--secret-volume-delay`; otherwise as is.
    pub fn for_connection(&self, all_consumers_nudged: bool) -> RefreshPolicy {
        match self.nudged_secret_volume_delay {
            Some(nudged) if all_consumers_nudged => RefreshPolicy {
                secret_volume_delay: nudged.min(self.secret_volume_delay),
                ..*self
            },
            _ => *self,
        }
    }
}

/// The bounds of the refresh rule for one credential, before jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefreshWindow {
    lifetime: SignedDuration,
    /// Never earlier: half the lifetime (at least [`MIN_REFRESH_INTERVAL`]) after issue.
    earliest: Timestamp,
    /// The planned time: 80 %, or `refreshBefore` before expiry if earlier, at the latest
    /// the kubelet margin before expiry, and never before `earliest`.
    planned: Timestamp,
    /// Whether `refreshBefore` could be honoured (its time is not before `earliest`).
    refresh_before_honoured: bool,
}

fn window(issued_at: Timestamp, expires_at: Timestamp, refresh_before: Option<Duration>, policy: &RefreshPolicy) -> RefreshWindow {
    let lifetime = expires_at.duration_since(issued_at).max(SignedDuration::ZERO);
    let half = lifetime / 2;
    let earliest = plus(issued_at, half.max(signed(MIN_REFRESH_INTERVAL)));
    let mut planned = plus(issued_at, lifetime.mul_f64(REFRESH_AT_SHARE));
    let mut refresh_before_honoured = true;
    if let Some(before) = refresh_before {
        let wanted = minus(expires_at, signed(before));
        refresh_before_honoured = wanted >= earliest;
        planned = planned.min(wanted);
    }
    // Room for the kubelet: the Pods must see the new credential before the old one expires.
    let margin = signed(policy.secret_volume_delay).min(half).max(signed(LAST_MOMENT));
    planned = planned.min(minus(expires_at, margin)).max(earliest);
    RefreshWindow {
        lifetime,
        earliest,
        planned,
        refresh_before_honoured,
    }
}

/// When to replace a credential issued at `issued_at` that expires at `expires_at`:
///
/// 1. planned: at 80 % of the lifetime, or `refresh_before` before expiry if earlier;
/// 2. at the latest `max(5 s, min(secret_volume_delay, lifetime / 2))` before expiry;
/// 3. never earlier than half the lifetime (and at least 5 s) after issue: this floor wins
///    over 1 and 2, so at most two credentials are obtained per lifetime;
/// 4. minus a jitter of up to 10 % of the lifetime (`jitter` in `0.0..1.0` picks how much);
///    a time before the floor is reflected upward from it, so that jitter still spreads
///    connections whose planned time sits on the floor.
pub fn refresh_time(
    issued_at: Timestamp,
    expires_at: Timestamp,
    refresh_before: Option<Duration>,
    policy: &RefreshPolicy,
    jitter: f64,
) -> Timestamp {
    let window = window(issued_at, expires_at, refresh_before, policy);
    let jittered = minus(window.planned, window.lifetime.mul_f64(MAX_JITTER_SHARE * jitter.clamp(0.0, 1.0)));
    if jittered >= window.earliest {
        jittered
    } else {
        plus(window.earliest, window.earliest.duration_since(jittered))
    }
}

/// Whether `refresh_before` can be honoured for a credential living from `issued_at` to
/// `expires_at`: it cannot when it asks for a refresh before the floor (half the lifetime).
pub fn refresh_before_honoured(
    issued_at: Timestamp,
    expires_at: Timestamp,
    refresh_before: Option<Duration>,
    policy: &RefreshPolicy,
) -> bool {
    window(issued_at, expires_at, refresh_before, policy).refresh_before_honoured
}

/// The lifetime a cookie session is trusted for: `sessionTimeout`, at least
/// [`MIN_SESSION_TIMEOUT`].
pub fn session_lifetime(session_timeout: Duration) -> Duration {
    session_timeout.max(MIN_SESSION_TIMEOUT)
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
        AuthFailureKind::ServerError | AuthFailureKind::ExpiredOnArrival => spread,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn policy() -> RefreshPolicy {
        RefreshPolicy::default()
    }

    fn refresh(lifetime: i64, refresh_before: Option<u64>, jitter: f64) -> Timestamp {
        refresh_time(at(0), at(lifetime), refresh_before.map(Duration::from_secs), &policy(), jitter)
    }

    #[test]
    fn refreshes_at_80_percent_of_a_long_lifetime() {
        assert_eq!(refresh(1000, None, 0.0), at(800));
        assert_eq!(refresh(86_400, None, 0.0), at(69_120));
    }

    #[test]
    fn jitter_moves_the_refresh_earlier_by_at_most_10_percent() {
        assert_eq!(refresh(1000, None, 1.0), at(700));
        for step in 0..=10 {
            let refresh = refresh(1000, None, f64::from(step) / 10.0);
            assert!(refresh >= at(700) && refresh <= at(800), "{refresh}");
        }
    }

    #[test]
    fn refresh_before_wins_when_it_comes_earlier() {
        // 86400 s SaaS token with refreshBefore 6h: 6 h before expiry beats 80 %.
        assert_eq!(refresh(86_400, Some(6 * 3600), 0.0), at(64_800));
        // A late refreshBefore does not delay the 80 % rule.
        assert_eq!(refresh(1000, Some(10), 0.0), at(800));
    }

    #[test]
    fn the_kubelet_margin_is_kept_before_expiry() {
        // 300 s (Keycloak): 80 % would leave 60 s; the 120 s margin plans at 180 s.
        assert_eq!(refresh(300, None, 0.0), at(180));
        let custom = RefreshPolicy {
            secret_volume_delay: Duration::from_secs(30),
            ..policy()
        };
        assert_eq!(refresh_time(at(0), at(300), None, &custom, 0.0), at(240));
        // The margin is at most half the lifetime: a 200 s token is planned at 100 s.
        assert_eq!(refresh(200, None, 0.0), at(100));
    }

    #[test]
    fn never_earlier_than_half_the_lifetime_whatever_refresh_before_says() {
        // The hot loop of issue 10: refreshBefore 10m against 300 s tokens.
        assert_eq!(refresh(300, Some(600), 0.0), at(150));
        for step in 0..=10 {
            let refresh = refresh(300, Some(600), f64::from(step) / 10.0);
            assert!(refresh >= at(150) && refresh <= at(180), "{refresh}");
        }
        // refreshBefore equal to the lifetime.
        assert_eq!(refresh(1000, Some(1000), 0.0), at(500));
        assert!(!refresh_before_honoured(at(0), at(300), Some(Duration::from_secs(600)), &policy()));
        assert!(!refresh_before_honoured(at(0), at(300), Some(Duration::from_secs(151)), &policy()));
        assert!(refresh_before_honoured(at(0), at(300), Some(Duration::from_secs(150)), &policy()));
        assert!(refresh_before_honoured(at(0), at(300), None, &policy()));
    }

    #[test]
    fn jitter_is_reflected_upward_from_the_floor() {
        // 20 s tokens: planned on the floor (10 s); jitter spreads them over 10-12 s.
        assert_eq!(refresh(20, None, 0.0), at(10));
        assert_eq!(refresh(20, None, 1.0), at(12));
        assert_eq!(refresh(20, None, 0.5), at(11));
        // 86400 s with refreshBefore 20h: planned 14400 s, on the floor 43200 s.
        assert_eq!(refresh(86_400, Some(20 * 3600), 0.5), at(43_200 + 4_320));
    }

    #[test]
    fn lifetimes_of_5s_or_less_refresh_5s_after_issue() {
        assert_eq!(refresh(10, None, 0.0), at(5));
        assert_eq!(refresh(4, None, 0.0), at(5));
        assert_eq!(refresh(0, None, 1.0), at(5));
    }

    #[test]
    fn an_expiry_in_the_past_still_waits_for_the_floor() {
        // A credential read back with expiry before issue (clock moved): never at once.
        assert_eq!(refresh_time(at(100), at(50), None, &policy(), 0.0), at(105));
    }

    #[test]
    fn sessions_are_trusted_for_at_least_30_seconds() {
        assert_eq!(session_lifetime(Duration::from_secs(3)), MIN_SESSION_TIMEOUT);
        assert_eq!(session_lifetime(Duration::from_secs(1800)), Duration::from_secs(1800));
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

    #[test]
    fn the_short_margin_needs_the_nudge_on_and_the_connection_saying_all_consumers_are_nudged() {
        let (nudged, usual) = (Duration::from_secs(15), Duration::from_secs(120));
        let on = RefreshPolicy {
            nudged_secret_volume_delay: Some(nudged),
            ..RefreshPolicy::default()
        };
        assert_eq!(on.for_connection(true).secret_volume_delay, nudged);
        assert_eq!(on.for_connection(false).secret_volume_delay, usual);
        let off = RefreshPolicy::default();
        assert_eq!(off.for_connection(true), off, "annotated, but nobody nudges");
        // Never more room than without the nudge.
        let long = RefreshPolicy {
            nudged_secret_volume_delay: Some(Duration::from_secs(200)),
            ..RefreshPolicy::default()
        };
        assert_eq!(long.for_connection(true).secret_volume_delay, usual);
    }
}
