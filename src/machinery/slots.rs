//! Counted slots with limits per key: a semaphore whose permits are counted per key (a
//! host, a namespace), so that one key cannot take every slot. Taking is a decision made
//! on the counts under one lock ([`Slots::try_take`]); the [`Slot`] it gives back counts
//! until dropped, whatever ends its holder (an answer, an error, a cancelled task). A key
//! with nothing taken leaves the map, so the counts stay as small as what is in flight.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use super::lock::lock;

/// What is taken, per key and in all.
#[derive(Debug)]
pub struct Counts<K> {
    per_key: HashMap<K, usize>,
    /// Slots held (one a [`Slot`], whatever its number of keys).
    held: usize,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Counts {
            per_key: HashMap::new(),
            held: 0,
        }
    }
}

impl<K: Hash + Eq> Counts<K> {
    /// How many slots of `key` are taken.
    pub fn of(&self, key: &K) -> usize {
        self.per_key.get(key).copied().unwrap_or_default()
    }

    /// How many slots are held in all.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Every key with a slot taken, and how many.
    pub fn iter(&self) -> impl Iterator<Item = (&K, usize)> {
        self.per_key.iter().map(|(key, count)| (key, *count))
    }

    /// How many keys have a slot taken.
    pub fn keys(&self) -> usize {
        self.per_key.len()
    }

    fn take(&mut self, keys: &[K])
    where
        K: Clone,
    {
        self.held += 1;
        for key in keys {
            *self.per_key.entry(key.clone()).or_default() += 1;
        }
    }

    fn give_back(&mut self, keys: &[K]) {
        self.held = self.held.saturating_sub(1);
        for key in keys {
            if let Some(count) = self.per_key.get_mut(key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_key.remove(key);
                }
            }
        }
    }
}

/// The slots of one lane, shared by its clones.
pub struct Slots<K> {
    counts: Arc<Mutex<Counts<K>>>,
    /// Woken whenever a slot is given back, for those that wait for one.
    released: Arc<tokio::sync::Notify>,
    /// What the slots are for, for the lock's log line.
    what: &'static str,
}

impl<K> Clone for Slots<K> {
    fn clone(&self) -> Self {
        Slots {
            counts: self.counts.clone(),
            released: self.released.clone(),
            what: self.what,
        }
    }
}

impl<K: Hash + Eq + Clone> Slots<K> {
    /// No slot taken; `what` names the lane in logs.
    pub fn new(what: &'static str) -> Self {
        Slots {
            counts: Arc::default(),
            released: Arc::default(),
            what,
        }
    }

    /// One slot of each of the keys `admit` names, if it names any (`Ok`) after looking
    /// at the counts; taken in the same lock, so two callers cannot both take the last one.
    pub fn try_take<E>(&self, admit: impl FnOnce(&Counts<K>) -> Result<Vec<K>, E>) -> Result<Slot<K>, E> {
        let mut counts = lock(&self.counts, self.what);
        let keys = admit(&counts)?;
        counts.take(&keys);
        Ok(Slot { keys, slots: self.clone() })
    }

    /// One slot of each of `keys`, whatever the counts: for a caller that decided under a
    /// lock of its own, which every take goes through.
    pub fn take(&self, keys: Vec<K>) -> Slot<K> {
        lock(&self.counts, self.what).take(&keys);
        Slot { keys, slots: self.clone() }
    }

    /// Looks at the counts.
    pub fn with_counts<R>(&self, look: impl FnOnce(&Counts<K>) -> R) -> R {
        look(&lock(&self.counts, self.what))
    }

    /// Completes when a slot is given back after this call (create it before trying, so
    /// that a slot given back in between is not missed).
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }
}

/// Taken slots, given back when dropped.
pub struct Slot<K: Hash + Eq + Clone> {
    keys: Vec<K>,
    slots: Slots<K>,
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        lock(&self.slots.counts, self.slots.what).give_back(&self.keys);
        self.slots.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At most `total` slots, at most `per_key` for one key.
    fn limited(
        total: usize,
        per_key: usize,
        keys: &[&'static str],
    ) -> impl FnOnce(&Counts<&'static str>) -> Result<Vec<&'static str>, &'static str> {
        let keys = keys.to_vec();
        move |counts| {
            if counts.held() >= total {
                return Err("all slots taken");
            }
            match keys.iter().find(|key| counts.of(key) >= per_key) {
                Some(full) => Err(full),
                None => Ok(keys),
            }
        }
    }

    #[test]
    fn limits_per_key_and_in_all() {
        let slots = Slots::new("test slots");
        // (keys, expected): taken in order, all kept until the end.
        let cases: [(&[&str], Result<(), &str>); 7] = [
            (&["a"], Ok(())),
            (&["a"], Ok(())),
            (&["a"], Err("a")),
            (&["b", "a"], Err("a")),
            (&["b"], Ok(())),
            (&["c"], Ok(())),
            (&["d"], Err("all slots taken")),
        ];
        let mut held = Vec::new();
        for (index, (keys, expected)) in cases.into_iter().enumerate() {
            let taken = slots.try_take(limited(4, 2, keys));
            assert_eq!(taken.as_ref().map(|_| ()).map_err(|e| *e), expected, "case {index}");
            held.extend(taken.ok());
        }
        slots.with_counts(|counts| {
            assert_eq!((counts.held(), counts.of(&"a"), counts.of(&"b"), counts.of(&"d")), (4, 2, 1, 0));
        });
    }

    #[test]
    fn a_refused_take_takes_nothing_and_a_dropped_slot_gives_back_every_key() {
        let slots = Slots::new("test slots");
        let both = slots.try_take(limited(10, 1, &["a", "b"])).expect("free");
        assert!(slots.try_take(limited(10, 1, &["c", "b"])).is_err());
        slots.with_counts(|counts| assert_eq!((counts.held(), counts.of(&"c")), (1, 0)));
        drop(both);
        slots.with_counts(|counts| assert_eq!((counts.held(), counts.keys()), (0, 0), "no key is kept with nothing taken"));
        assert!(slots.try_take(limited(10, 1, &["c", "b"])).is_ok());
    }

    #[test]
    fn a_slot_given_back_on_another_thread_is_counted() {
        let slots = Slots::new("test slots");
        let slot = slots.try_take(limited(1, 1, &["a"])).expect("free");
        std::thread::spawn(move || drop(slot)).join().expect("the thread ends");
        assert!(slots.try_take(limited(1, 1, &["a"])).is_ok());
    }

    #[tokio::test]
    async fn waiters_are_woken_when_a_slot_is_given_back() {
        let slots = Slots::new("test slots");
        let slot = slots.try_take(limited(1, 1, &["a"])).expect("free");
        let released = slots.released();
        assert!(slots.try_take(limited(1, 1, &["a"])).is_err());
        drop(slot);
        tokio::time::timeout(std::time::Duration::from_secs(10), released)
            .await
            .expect("woken by the slot given back");
        assert!(slots.try_take(limited(1, 1, &["a"])).is_ok());
    }
}
