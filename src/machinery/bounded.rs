//! The one rule that keeps a map bounded.
//!
//! A map that grows with what connections name (tokens, Secrets, issuers, hosts, probe
//! answers) is pruned once it is full ([`Capacity::prune_at`] entries): the stale entries
//! go first (expired, or remembering nothing any more); then, while it still holds more
//! than it may ([`Capacity::at_most`] entries, and [`Capacity::at_most_weight`] in all by
//! the map's own weight), the entry the map's own order puts first goes (the oldest read,
//! the first to expire). An entry that must stay (a request in flight for it, the value
//! just put) is never taken: the order gives it no rank.
//!
//! A map bounded by what is alive rather than by a number (probe answers of the last hour)
//! sets no `at_most` and moves `prune_at` to twice what is left after each pruning, so
//! that pruning costs a constant share of its inserts.

use std::collections::HashMap;
use std::hash::Hash;

/// When a map is full and how much it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The map is pruned once it holds this many entries (0: whenever asked).
    pub prune_at: usize,
    /// Beyond this many entries, live ones go too.
    pub at_most: usize,
    /// Beyond this weight in all, live entries go too.
    pub at_most_weight: usize,
}

impl Capacity {
    /// Pruned at `prune_at` entries, keeping at most `at_most` of them.
    pub const fn entries(prune_at: usize, at_most: usize) -> Self {
        Capacity {
            prune_at,
            at_most,
            at_most_weight: usize::MAX,
        }
    }

    /// Only stale entries go, once the map holds `prune_at`.
    pub const fn stale_only(prune_at: usize) -> Self {
        Capacity::entries(prune_at, usize::MAX)
    }
}

/// What one pruning took: nothing was looked at (`None`) while the map was not full.
pub type Pruned<K, V> = Option<Vec<(K, V)>>;

/// Prunes `map` by the rule of the module. `stale` says which entries go once the map is
/// full; `first_to_go` ranks the live ones (lowest first; `None`: stays).
pub fn prune<K: Hash + Eq + Clone, V, O: Ord>(
    map: &mut HashMap<K, V>,
    capacity: Capacity,
    stale: impl FnMut(&K, &V) -> bool,
    first_to_go: impl FnMut(&K, &V) -> Option<O>,
) -> Pruned<K, V> {
    prune_weighed(map, capacity, |_| 0, stale, first_to_go)
}

/// [`prune`], with `weight` counted against [`Capacity::at_most_weight`].
pub fn prune_weighed<K: Hash + Eq + Clone, V, O: Ord>(
    map: &mut HashMap<K, V>,
    capacity: Capacity,
    weight: impl Fn(&V) -> usize,
    mut stale: impl FnMut(&K, &V) -> bool,
    mut first_to_go: impl FnMut(&K, &V) -> Option<O>,
) -> Pruned<K, V> {
    if map.len() < capacity.prune_at.max(1) {
        return None;
    }
    let gone_stale: Vec<K> = map
        .iter()
        .filter(|(key, value)| stale(key, value))
        .map(|(key, _)| key.clone())
        .collect();
    let mut gone: Vec<(K, V)> = gone_stale.into_iter().filter_map(|key| map.remove_entry(&key)).collect();
    let mut total: usize = map.values().map(&weight).sum();
    while map.len() > capacity.at_most || total > capacity.at_most_weight {
        let first = map
            .iter()
            .filter_map(|(key, value)| first_to_go(key, value).map(|rank| (rank, key)))
            .min_by(|one, other| one.0.cmp(&other.0))
            .map(|(_, key)| key.clone());
        let Some((key, value)) = first.and_then(|key| map.remove_entry(&key)) else {
            break;
        };
        total = total.saturating_sub(weight(&value));
        gone.push((key, value));
    }
    Some(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries "k0".."k{n}" valued by their number.
    fn map_of(n: u32) -> HashMap<String, u32> {
        (0..n).map(|index| (format!("k{index}"), index)).collect()
    }

    fn keys(map: &HashMap<String, u32>) -> Vec<u32> {
        let mut kept: Vec<u32> = map.values().copied().collect();
        kept.sort();
        kept
    }

    #[test]
    fn stale_entries_go_first_then_the_first_by_order_never_a_pinned_one() {
        /// (entries, capacity, stale below, pinned, kept)
        type Case = (u32, Capacity, u32, Option<u32>, Vec<u32>);
        let cases: [Case; 6] = [
            // Not full: nothing is looked at, stale or not.
            (3, Capacity::entries(4, 4), 2, None, vec![0, 1, 2]),
            // Full: the stale go; what is left fits.
            (4, Capacity::entries(4, 4), 2, None, vec![2, 3]),
            // Still too many: the lowest rank goes next.
            (6, Capacity::entries(4, 3), 1, None, vec![3, 4, 5]),
            // A pinned entry stays, the next one goes instead.
            (6, Capacity::entries(4, 3), 1, Some(1), vec![1, 4, 5]),
            // Only stale entries go.
            (6, Capacity::stale_only(4), 3, None, vec![3, 4, 5]),
            // Nothing but pinned entries left: the map stays over, rather than lose them.
            (3, Capacity::entries(0, 1), 0, None, vec![0, 1, 2]),
        ];
        for (index, (entries, capacity, stale_below, pinned, kept)) in cases.into_iter().enumerate() {
            let mut map = map_of(entries);
            let pinned_only = index == 5;
            prune(
                &mut map,
                capacity,
                |_, value| *value < stale_below,
                |_, value| (Some(*value) != pinned && !pinned_only).then_some(*value),
            );
            assert_eq!(keys(&map), kept, "case {index}");
        }
    }

    #[test]
    fn a_weight_bound_takes_the_first_by_order_until_the_rest_fits() {
        let mut map = map_of(5);
        // Weights 0 to 4, 10 in all, at most 6: by order 0, 1, 2 and 3 go (10, 9, 7, then 4).
        let gone = prune_weighed(
            &mut map,
            Capacity {
                prune_at: 0,
                at_most: usize::MAX,
                at_most_weight: 6,
            },
            |value| *value as usize,
            |_, _| false,
            |_, value| Some(*value),
        )
        .expect("pruned");
        assert_eq!(keys(&map), vec![4]);
        assert_eq!(gone.len(), 4, "what went is handed back");
    }

    #[test]
    fn what_went_is_handed_back_and_nothing_when_not_full() {
        let mut map = map_of(2);
        assert!(prune(&mut map, Capacity::entries(3, 3), |_, _| true, |_, value| Some(*value)).is_none());
        let gone = prune(&mut map, Capacity::entries(2, 2), |_, value| *value == 0, |_, value| Some(*value)).expect("pruned");
        assert_eq!(gone, vec![("k0".to_owned(), 0)]);
    }
}
