//! The one rule for a poisoned lock.
//!
//! A `std::sync::Mutex` is poisoned when a thread panicked while holding it. Every value
//! this crate keeps behind one (caches, counters, backoff state) is changed by whole
//! statements under the lock: a panic can leave it a step behind, never half changed.
//! Dropping the value, or skipping the work, would be worse than going on: a slot never
//! given back shrinks its lane for good, and forgotten backoff state sends requests to a
//! host that does not answer. So a poisoned lock is recovered, its poison cleared (it is
//! reported once), and the recovery is logged with what the lock guards.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, recovering its value if a panic elsewhere poisoned it (see the module).
/// `what` names what the lock guards, for the log line.
pub fn lock<'a, T>(mutex: &'a Mutex<T>, what: &'static str) -> MutexGuard<'a, T> {
    mutex.lock().unwrap_or_else(|poisoned: PoisonError<MutexGuard<'a, T>>| {
        tracing::warn!(
            lock = what,
            "a panic elsewhere poisoned this lock; going on with its value (every change under it is made whole)"
        );
        mutex.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn poison(mutex: &Arc<Mutex<Vec<u32>>>) {
        let shared = mutex.clone();
        let _ = std::thread::spawn(move || {
            let mut value = shared.lock().expect("not poisoned yet");
            value.push(2);
            panic!("a panic while the lock is held");
        })
        .join();
    }

    #[test]
    fn a_poisoned_lock_keeps_its_value_and_is_cleared() {
        let mutex = Arc::new(Mutex::new(vec![1]));
        poison(&mutex);
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex, "a test value"), vec![1, 2], "the value is kept, not dropped");
        assert!(!mutex.is_poisoned(), "recovered once, not on every lock");
        lock(&mutex, "a test value").push(3);
        assert_eq!(*lock(&mutex, "a test value"), vec![1, 2, 3]);
    }

    #[test]
    fn an_unpoisoned_lock_is_just_locked() {
        let mutex = Mutex::new(5);
        *lock(&mutex, "a test value") += 1;
        assert_eq!(*lock(&mutex, "a test value"), 6);
    }
}
