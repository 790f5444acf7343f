//! The figures of the node tests' consumer scenario (tests/node/consumer.rs), from what the
//! stand-in Tasklist recorded of the consumer Pod's calls and from the derived Secret's
//! updates: calls refused because the mounted file held an expired token, and how long each
//! update took to reach the file.

use std::time::{Duration, SystemTime};

use crate::standin::ApiRequestRecord;

/// One new token in the derived Secret.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    pub seen_at: SystemTime,
    /// The Secret's `expiresAt`, which is the token's `exp`.
    pub expires_at: SystemTime,
}

#[derive(Debug, Default)]
pub struct Figures {
    pub calls: usize,
    pub expired_refusals: usize,
    pub other_refusals: usize,
    pub propagations: Vec<Duration>,
    pub propagation_p50: Duration,
    /// Nearest rank: with fewer than 100 propagations, it is the largest.
    pub propagation_p99: Duration,
    pub propagation_max: Duration,
    /// Updates the file never caught up with: the consumer used neither that token nor a
    /// later one (their expiry).
    pub unseen: Vec<SystemTime>,
}

/// The figures from the consumer's calls and the Secret's updates: every update after the
/// consumer started, up to `cycles` of them, counts towards the propagation delays.
pub fn analyse(calls: &[ApiRequestRecord], updates: &[Update], consumer_started: SystemTime, cycles: usize) -> Figures {
    let mut figures = Figures {
        calls: calls.len(),
        ..Figures::default()
    };
    for call in calls.iter().filter(|call| call.status != 200) {
        let expired = call.bearer_expires_at.is_some_and(|expires_at| expires_at <= call.time);
        if expired {
            figures.expired_refusals += 1;
        } else {
            figures.other_refusals += 1;
        }
    }
    // The file is up to date with an update once a call carries that token or a later one:
    // when refreshes come faster than the kubelet syncs, it skips tokens, which is fine.
    for update in updates.iter().filter(|update| update.seen_at >= consumer_started).take(cycles) {
        let first_use = calls
            .iter()
            .filter(|call| call.bearer_expires_at.is_some_and(|expires_at| expires_at >= update.expires_at))
            .map(|call| call.time)
            .min();
        match first_use {
            Some(first_use) => figures
                .propagations
                .push(first_use.duration_since(update.seen_at).unwrap_or_default()),
            None => figures.unseen.push(update.expires_at),
        }
    }
    let mut sorted = figures.propagations.clone();
    sorted.sort();
    figures.propagation_p50 = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    let p99_rank = (sorted.len() * 99).div_ceil(100);
    figures.propagation_p99 = sorted.get(p99_rank.saturating_sub(1)).copied().unwrap_or_default();
    figures.propagation_max = sorted.last().copied().unwrap_or_default();
    figures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standin::AuthKind;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(seconds: u64) -> SystemTime {
        T0 + Duration::from_secs(seconds)
    }

    fn call(time: u64, token_expires: u64, status: u16) -> ApiRequestRecord {
        ApiRequestRecord {
            time: at(time),
            method: "POST".into(),
            path: "/v1/tasks/consumer/variables/search".into(),
            auth: AuthKind::Bearer,
            status,
            bearer_expires_at: Some(at(token_expires)),
            credential: None,
        }
    }

    #[test]
    fn refusals_are_told_apart_and_skipped_tokens_count_as_caught_up() {
        // Tokens expiring at 160, 190 and 220 reach the Secret at 100, 130 and 160. The file
        // holds the first until 165 (expired from 160 on), then jumps to the third.
        let updates = [
            Update {
                seen_at: at(100),
                expires_at: at(160),
            },
            Update {
                seen_at: at(130),
                expires_at: at(190),
            },
            Update {
                seen_at: at(160),
                expires_at: at(220),
            },
        ];
        let mut calls: Vec<_> = (101..=165).map(|t| call(t, 160, if t < 160 { 200 } else { 401 })).collect();
        calls.extend((166..=170).map(|t| call(t, 220, 200)));
        // One refusal of a valid token: the server's fault, not the file's.
        calls.push(call(171, 220, 401));
        let figures = analyse(&calls, &updates[1..], at(101), 5);
        assert_eq!(figures.calls, 71);
        assert_eq!(figures.expired_refusals, 6);
        assert_eq!(figures.other_refusals, 1);
        // Update at 130 caught up at 166 (a later token), update at 160 at 166 too.
        assert_eq!(figures.propagations, [Duration::from_secs(36), Duration::from_secs(6)]);
        assert_eq!(figures.propagation_max, Duration::from_secs(36));
        assert_eq!(figures.propagation_p50, Duration::from_secs(36));
        assert_eq!(figures.propagation_p99, Duration::from_secs(36));
        assert!(figures.unseen.is_empty());
    }

    #[test]
    fn an_update_the_file_never_reached_is_named() {
        let updates = [Update {
            seen_at: at(100),
            expires_at: at(200),
        }];
        let calls: Vec<_> = (90..=120).map(|t| call(t, 150, 200)).collect();
        let figures = analyse(&calls, &updates, at(90), 5);
        assert_eq!(figures.unseen, [at(200)]);
        assert!(figures.propagations.is_empty());
        assert_eq!(figures.expired_refusals, 0);
    }
}
