//! One request in flight per key: callers that need what a request for the same key is
//! already fetching wait for its answer instead of sending their own.
//!
//! - The request runs as a task of its own: a caller that gives up does not cancel it for
//!   the others, and it lands (the user records its answer) even when nobody waits.
//! - Its answer, a failure as much as a success, reaches every caller that joined it.
//! - Nothing is kept here once the request has landed: what to keep (a token, a probe
//!   result, a Secret) and for how long is the user's cache's decision, and a failure is
//!   never kept, so the next caller after it sends a request of its own.
//!
//! [`Flights`] is plain data, kept under the lock of the state it serves, so that a caller
//! looks at the cache and at the flights in one step, and a request records its answer
//! and [`Flights::land`]s in one step. A flight whose task ended without landing (it
//! panicked) is dropped when next found.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

/// The answer of a flight, for every caller that awaits it.
pub type Answer<V> = Shared<BoxFuture<'static, V>>;

/// Which flight of a key: a request that lands late does not end a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlightId(u64);

/// The requests in flight, by key.
pub struct Flights<K, V> {
    in_flight: HashMap<K, Flight<V>>,
    started: u64,
}

struct Flight<V> {
    id: FlightId,
    answer: Answer<V>,
    /// Callers that joined it, besides the one that started it.
    joined: usize,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            in_flight: HashMap::new(),
            started: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone + Send + Sync + 'static> Flights<K, V> {
    /// Whether a request for `key` is in flight.
    pub fn is_in_flight(&mut self, key: &K) -> bool {
        self.drop_if_ended(key);
        self.in_flight.contains_key(key)
    }

    /// The answer of the request in flight for `key`, if there is one: the caller joins it.
    pub fn join(&mut self, key: &K) -> Option<Answer<V>> {
        self.drop_if_ended(key);
        let flight = self.in_flight.get_mut(key)?;
        flight.joined += 1;
        Some(flight.answer.clone())
    }

    /// Starts the request `request(id)` for `key` as a task of its own, and returns its
    /// answer; `lost` answers for a task that did not finish (it panicked). The request
    /// must record what it brought and call [`Flights::land`] with `id`, under the lock
    /// that guards these flights, before it returns.
    pub fn start<F>(&mut self, key: K, request: impl FnOnce(FlightId) -> F, lost: impl FnOnce(String) -> V + Send + 'static) -> Answer<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        self.started += 1;
        let id = FlightId(self.started);
        let task = tokio::spawn(request(id));
        let answer = async move { task.await.unwrap_or_else(|error| lost(error.to_string())) }
            .boxed()
            .shared();
        self.in_flight.insert(
            key,
            Flight {
                id,
                answer: answer.clone(),
                joined: 0,
            },
        );
        answer
    }

    /// Ends flight `id` of `key`: the next caller finds no request in flight. A flight of
    /// the same key started since stays. Says whether it ended one.
    pub fn land(&mut self, key: &K, id: FlightId) -> bool {
        let ours = self.in_flight.get(key).is_some_and(|flight| flight.id == id);
        if ours {
            self.in_flight.remove(key);
        }
        ours
    }

    /// How many callers joined the request in flight for `key`, besides its starter.
    pub fn joined(&self, key: &K) -> usize {
        self.in_flight.get(key).map_or(0, |flight| flight.joined)
    }

    /// How many requests are in flight.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// A flight whose answer is there but that never landed (its task panicked) is over.
    fn drop_if_ended(&mut self, key: &K) {
        if self.in_flight.get(key).is_some_and(|flight| flight.answer.peek().is_some()) {
            self.in_flight.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    type Shared = Arc<Mutex<Flights<&'static str, Result<u32, String>>>>;

    /// A caller: joins the flight for `key` or starts `answer` (after `release`), landing it.
    fn call(
        flights: &Shared,
        key: &'static str,
        sent: &Arc<AtomicUsize>,
        release: &tokio::sync::watch::Receiver<bool>,
        answer: Result<u32, String>,
    ) -> (bool, Answer<Result<u32, String>>) {
        let mut guard = flights.lock().expect("not poisoned");
        if let Some(joined) = guard.join(&key) {
            return (true, joined);
        }
        let (flights, sent, mut release) = (flights.clone(), sent.clone(), release.clone());
        let started = guard.start(
            key,
            move |id| async move {
                sent.fetch_add(1, Ordering::SeqCst);
                let _ = release.wait_for(|released| *released).await;
                flights.lock().expect("not poisoned").land(&key, id);
                answer
            },
            Err,
        );
        (false, started)
    }

    #[tokio::test]
    async fn callers_of_one_key_share_one_request_and_its_failure_is_not_kept() {
        let flights = Shared::default();
        let sent = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        // (key, whether it joins): four callers of "a", one of "b".
        let cases = [("a", false), ("a", true), ("b", false), ("a", true), ("a", true)];
        let mut answers = Vec::new();
        for (index, (key, joins)) in cases.into_iter().enumerate() {
            let (joined, answer) = call(&flights, key, &sent, &released, Err(format!("{key} failed")));
            assert_eq!(joined, joins, "case {index}");
            answers.push(answer);
        }
        assert_eq!(flights.lock().expect("not poisoned").joined(&"a"), 3);
        release.send(true).expect("a receiver");
        for (answer, (key, _)) in answers.into_iter().zip(cases) {
            assert_eq!(answer.await, Err(format!("{key} failed")), "every caller gets the failure");
        }
        assert_eq!(sent.load(Ordering::SeqCst), 2, "one request per key");
        assert!(flights.lock().expect("not poisoned").is_empty(), "landed");
        // The failure is not kept: the next caller sends a request of its own.
        let (joined, answer) = call(&flights, "a", &sent, &released, Ok(7));
        assert!(!joined);
        assert_eq!(answer.await, Ok(7));
        assert_eq!(sent.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_cancel_the_request_for_the_others() {
        let flights = Shared::default();
        let sent = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let (_, starter) = call(&flights, "a", &sent, &released, Ok(1));
        let (_, joiner) = call(&flights, "a", &sent, &released, Ok(2));
        drop(starter);
        release.send(true).expect("a receiver");
        assert_eq!(joiner.await, Ok(1));
    }

    #[test]
    fn a_late_landing_does_not_end_a_newer_flight() {
        let mut flights = Flights::<&str, u32>::default();
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
        let _guard = runtime.enter();
        let mut first = None;
        let _first = flights.start(
            "a",
            |id| {
                first = Some(id);
                std::future::pending()
            },
            |_| 0,
        );
        let first = first.expect("started");
        assert!(flights.land(&"a", first));
        let _second = flights.start("a", |_| std::future::pending(), |_| 0);
        assert!(!flights.land(&"a", first), "the first flight already landed");
        assert!(flights.is_in_flight(&"a"));
    }

    #[tokio::test]
    async fn a_request_that_panicked_answers_lost_and_is_dropped_when_next_found() {
        let mut flights = Flights::<&str, String>::default();
        let answer = flights.start("a", |_| async { panic!("the request panicked") }, |why| format!("lost: {why}"));
        assert!(answer.await.starts_with("lost: "));
        assert!(!flights.is_in_flight(&"a"), "not joined forever");
        assert!(flights.join(&"a").is_none());
    }
}
