//! Sharding: several operator processes (each its own Deployment, each leader-elected on
//! its own Lease) share the TasklistConnections of one cluster, each handling its own.
//!
//! Two ways to split, which combine: a label selector (`--shard-selector`) that the API
//! server applies to the watch, and a split by a stable hash of `namespace/name`
//! (`--shards N --shard-index I`) applied to what the watch returns. A process handles a
//! connection when it matches the selector (if any) and its hash falls in its shard.

use sha2::{Digest, Sha256};

/// The shard (0 ≤ shard < `count`) that owns the connection `namespace/name`: the first 8
/// bytes of SHA-256 over the UTF-8 text `namespace/name`, read as a big-endian unsigned
/// 64-bit integer, modulo `count`. Stable across versions, platforms and restarts (not
/// std's `DefaultHasher`, whose output may change with any Rust release), and easy to
/// reproduce elsewhere:
/// `python3 -c 'import hashlib,sys; print(int.from_bytes(hashlib.sha256(sys.argv[1].encode()).digest()[:8], "big") % int(sys.argv[2]))' team-a/orders 3`.
/// `count` 0 is taken as 1.
pub fn shard_of(namespace: &str, name: &str, count: u32) -> u32 {
    let digest = Sha256::new()
        .chain_update(namespace.as_bytes())
        .chain_update(b"/")
        .chain_update(name.as_bytes())
        .finalize();
    let mut first_eight = [0u8; 8];
    first_eight.copy_from_slice(&digest[..8]);
    let hash = u64::from_be_bytes(first_eight);
    // The remainder is below `count`, a u32: the conversion cannot fail.
    u32::try_from(hash % u64::from(count.max(1))).unwrap_or(0)
}

/// The Lease name when leader election is on and none is given, without sharding.
pub const DEFAULT_LEASE_NAME: &str = "tasklist-operator";

/// Which TasklistConnections this process handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharding {
    index: u32,
    count: u32,
    label_selector: Option<String>,
}

impl Default for Sharding {
    /// Every connection: one shard, no selector (the behaviour without any sharding flag).
    fn default() -> Self {
        Sharding {
            index: 0,
            count: 1,
            label_selector: None,
        }
    }
}

impl Sharding {
    /// Shard `index` of `count` (by hash), of the connections matching `label_selector`
    /// (all when None). Refuses a count of 0, an index outside `0..count` and an empty
    /// selector.
    pub fn new(index: u32, count: u32, label_selector: Option<String>) -> Result<Self, String> {
        if count == 0 {
            return Err("--shards must be at least 1".into());
        }
        if index >= count {
            return Err(format!(
                "--shard-index {index} is not below --shards {count}: the shards are numbered 0 to {}",
                count - 1
            ));
        }
        if label_selector.as_deref().is_some_and(|selector| selector.trim().is_empty()) {
            return Err("--shard-selector must not be empty (leave it out to select every connection)".into());
        }
        Ok(Sharding {
            index,
            count,
            label_selector,
        })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The label selector the TasklistConnection watch passes to the API server.
    pub fn label_selector(&self) -> Option<&str> {
        self.label_selector.as_deref()
    }

    /// Whether this process handles the connection `namespace/name` (that it matches the
    /// selector is the API server's part).
    pub fn owns(&self, namespace: &str, name: &str) -> bool {
        self.count <= 1 || shard_of(namespace, name, self.count) == self.index
    }

    /// The Lease of this shard: `explicit` when given, else `tasklist-operator`, or
    /// `tasklist-operator-shard-<index>-of-<count>` when split by hash, so that each shard
    /// elects its own leader. With a selector the name cannot be derived (two Deployments
    /// with different selectors would share one Lease, and one of them would stay idle for
    /// good), so it must be given.
    pub fn lease_name(&self, explicit: Option<&str>) -> Result<String, String> {
        if let Some(name) = explicit {
            return Ok(name.to_owned());
        }
        if self.label_selector.is_some() {
            return Err(
                "--shard-selector with --leader-election needs --leader-election-lease-name: give each selector its own Lease".into(),
            );
        }
        Ok(if self.count > 1 {
            format!("{DEFAULT_LEASE_NAME}-shard-{}-of-{}", self.index, self.count)
        } else {
            DEFAULT_LEASE_NAME.to_owned()
        })
    }

    /// For the start-up log line.
    pub fn describe(&self) -> String {
        let split = if self.count > 1 {
            format!("shard {} of {} (by hash of namespace/name)", self.index, self.count)
        } else {
            "every connection".to_owned()
        };
        match &self.label_selector {
            Some(selector) => format!("{split} matching the label selector {selector:?}"),
            None => split,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned_to_known_values() {
        // printf '%s' default/orders | sha256sum  →  962fc807ee8f6dd9…
        // 0x962fc807ee8f6dd9 = 10822088365987294681
        assert_eq!(shard_of("default", "orders", 2), 1);
        assert_eq!(shard_of("default", "orders", 3), 1);
        assert_eq!(shard_of("default", "orders", 10), 1);
        // 0x0ea1910a770e17b3 = 1054283261914519475
        assert_eq!(shard_of("team-a", "payments", 3), 2);
        assert_eq!(shard_of("team-a", "payments", 10), 5);
        // 0x5bc11629bbe5a799 = 6611590096458459033
        assert_eq!(shard_of("ns", "c-1", 3), 0);
        assert_eq!(shard_of("ns", "c-1", 10), 3);
    }

    #[test]
    fn namespace_and_name_are_separated() {
        // "a/bc" and "ab/c" are different connections; with the separator they hash apart.
        let first = shard_of("a", "bc", u32::MAX);
        let second = shard_of("ab", "c", u32::MAX);
        assert_ne!(first, second);
    }

    #[test]
    fn one_shard_owns_everything() {
        let everything = Sharding::default();
        assert!(everything.owns("default", "orders"));
        assert_eq!(shard_of("default", "orders", 1), 0);
        assert_eq!(shard_of("default", "orders", 0), 0, "a count of 0 is taken as 1");
    }

    #[test]
    fn every_connection_has_exactly_one_owner_and_the_split_is_even() {
        let shards: Vec<Sharding> = (0..3).map(|index| Sharding::new(index, 3, None).expect("valid")).collect();
        let mut per_shard = [0usize; 3];
        for number in 0..3000 {
            let name = format!("connection-{number}");
            let owners: Vec<u32> = shards
                .iter()
                .filter(|shard| shard.owns("team", &name))
                .map(Sharding::index)
                .collect();
            assert_eq!(owners.len(), 1, "{name} is owned by {owners:?}");
            per_shard[owners[0] as usize] += 1;
        }
        // 1000 expected each; a binomial spread stays well within ±10 %.
        assert!(per_shard.iter().all(|count| (900..=1100).contains(count)), "{per_shard:?}");
    }

    #[test]
    fn invalid_shard_settings_are_refused() {
        assert!(Sharding::new(0, 0, None).unwrap_err().contains("at least 1"));
        assert!(Sharding::new(3, 3, None).unwrap_err().contains("0 to 2"));
        assert!(Sharding::new(0, 1, Some(" ".into())).unwrap_err().contains("must not be empty"));
        assert!(Sharding::new(2, 3, Some("team=a".into())).is_ok());
    }

    #[test]
    fn each_hash_shard_has_its_own_lease_unless_one_is_named() {
        let shard = Sharding::new(1, 3, None).expect("valid");
        assert_eq!(shard.lease_name(None).as_deref(), Ok("tasklist-operator-shard-1-of-3"));
        assert_eq!(shard.lease_name(Some("mine")).as_deref(), Ok("mine"));
        assert_eq!(Sharding::default().lease_name(None).as_deref(), Ok("tasklist-operator"));
    }

    #[test]
    fn a_selector_shard_must_name_its_lease() {
        let shard = Sharding::new(0, 1, Some("team=a".into())).expect("valid");
        assert!(shard.lease_name(None).unwrap_err().contains("--leader-election-lease-name"));
        assert_eq!(shard.lease_name(Some("team-a")).as_deref(), Ok("team-a"));
    }

    #[test]
    fn selector_and_hash_combine() {
        let shard = Sharding::new(1, 2, Some("team=a".into())).expect("valid");
        assert_eq!(shard.label_selector(), Some("team=a"));
        assert!(shard.owns("default", "orders"));
        assert_eq!(
            shard.describe(),
            "shard 1 of 2 (by hash of namespace/name) matching the label selector \"team=a\""
        );
    }
}
