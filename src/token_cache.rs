//! One token per client: connections that would send the same token request share one
//! request in flight, and the token it brought while each one's own refresh time is ahead.
//!
//! Entries are keyed by a salted SHA-256 of everything the request depends on: the token
//! endpoint as resolved (after discovery), the client id, the client secret or signing
//! key, the client authentication, audience, scope, encoding and TLS trust. No key holds
//! or shows the secret. A rotated client Secret gives a new key, so a new token is
//! requested at once; the old entry goes when its last connection has moved on, tokens go
//! when they expire, and the number of entries is bounded. Only tokens are shared: cookie
//! sessions stay per connection, and a failure is never kept (it reaches only the
//! connections that waited for the request that failed).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jiff::Timestamp;

use crate::camunda::token::{ClientCredentials, ClientProof, TokenEndpoint};
use crate::camunda::{AuthFailure, Sensitive, TlsTrust};
use crate::crd::RequestEncoding;
use crate::key_hash::{KeyHash, hashed_key};
use crate::machinery::bounded::{Capacity, prune};
use crate::machinery::single_flight::{FlightId, Flights};
use crate::machinery::users::Users;
use crate::schedule::{RefreshPolicy, refresh_time};
use crate::time::add;

/// At most this many tokens are kept (a JWT is 1-2 KB); beyond that, the one that expires
/// first goes.
pub const MAX_ENTRIES: usize = 4096;
/// A cached token is reused only while the refresh time it gives the connection is at
/// least this far ahead, and at least [`REUSE_MARGIN_SHARE`] of its lifetime: a token
/// about to be replaced anyway would only cost one more Secret write.
const MIN_REUSE_MARGIN: Duration = Duration::from_secs(5);
const REUSE_MARGIN_SHARE: f64 = 0.1;

hashed_key!(
    /// What identifies one token request. `Debug` shows nothing of it.
    TokenKey
);

impl TokenKey {
    /// The key of a token request to `token_url` (the resolved endpoint) by `client`.
    pub fn new(token_url: &str, endpoint: &TokenEndpoint, client: &ClientCredentials, trust: &TlsTrust) -> TokenKey {
        let mut hash = KeyHash::new();
        hash.field(token_url.as_bytes());
        hash.field(client.client_id.as_bytes());
        match &client.proof {
            ClientProof::SecretInBody(secret) => {
                hash.tagged(b"client_secret_post", secret.expose().as_bytes());
            }
            ClientProof::SecretInBasicHeader(secret) => {
                hash.tagged(b"client_secret_basic", secret.expose().as_bytes());
            }
            ClientProof::PrivateKeyJwt(key) => {
                hash.tagged(b"private_key_jwt", key.digest());
                hash.field(format!("{:?}", key.algorithm).as_bytes());
                hash.optional(key.key_id.as_deref());
                // The certificate's thumbprints go into the assertion's header.
                hash.optional(key.thumbprints.as_ref().map(|(sha1, _)| sha1.as_str()));
                hash.optional(key.thumbprints.as_ref().map(|(_, sha256)| sha256.as_str()));
            }
            ClientProof::WorkloadIdentity(identity) => {
                hash.field(b"workload_identity");
                hash.field(identity.identity().as_bytes());
            }
        }
        hash.field(endpoint.audience.as_bytes());
        // An empty scope is not sent: the same request as none.
        hash.optional(endpoint.scope.as_deref().filter(|scope| !scope.is_empty()));
        hash.field(match endpoint.encoding {
            RequestEncoding::Form => b"form",
            RequestEncoding::Json => b"json",
        });
        hash.trust(trust);
        TokenKey(hash.finish())
    }
}

/// A token as the cache keeps it: its real issue time (when it was requested) and expiry,
/// from which each connection computes its own refresh time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedToken {
    pub access_token: Sensitive,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// The refresh time a connection gives a token another connection obtained (the normal
/// rule, from the token's real issue time and expiry, with this connection's
/// `refreshBefore` and jitter), when it may reuse the token at `now`: only while that
/// time is at least max(5 s, 10 % of the lifetime) ahead. A token whose refresh time for
/// this connection has come is never reused: the connection requests a new one, which
/// replaces it for everyone, so no connection can loop on a cached token.
pub fn refresh_time_if_reusable(
    token: &SharedToken,
    refresh_before: Option<Duration>,
    policy: &RefreshPolicy,
    jitter: f64,
    now: Timestamp,
) -> Option<Timestamp> {
    // A token cached under a longer --max-credential-lifetime (not in one process; cheap).
    let expires_at = token.expires_at.min(add(token.issued_at, policy.max_credential_lifetime));
    let lifetime = Duration::try_from(expires_at.duration_since(token.issued_at)).ok()?;
    let refresh_at = refresh_time(token.issued_at, expires_at, refresh_before, policy, jitter);
    let margin = MIN_REUSE_MARGIN.max(lifetime.mul_f64(REUSE_MARGIN_SHARE));
    let ahead = add(now, margin);
    (refresh_at >= ahead && expires_at > ahead).then_some(refresh_at)
}

/// Where a token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// This caller's request went to the token endpoint.
    Requested,
    /// Another connection's request was in flight; its answer (token or failure) is shared.
    InFlight,
    /// A token another connection obtained earlier, still good for this one.
    Cached,
}

impl TokenSource {
    /// The `source` label of `token_requests_saved`; `None` for a request really sent.
    pub fn saved_label(self) -> Option<&'static str> {
        match self {
            TokenSource::Requested => None,
            TokenSource::InFlight => Some("in_flight"),
            TokenSource::Cached => Some("cache"),
        }
    }
}

type FlightResult = Result<SharedToken, AuthFailure>;

/// Tokens shared between the connections (`User`s) that would request the same one.
pub struct TokenCache<User> {
    state: Arc<Mutex<State<User>>>,
}

impl<User> Default for TokenCache<User> {
    fn default() -> Self {
        TokenCache {
            state: Arc::new(Mutex::new(State {
                entries: HashMap::new(),
                flights: Flights::default(),
                users: Users::default(),
            })),
        }
    }
}

struct State<User> {
    entries: HashMap<TokenKey, Entry>,
    /// The token requests in flight.
    flights: Flights<TokenKey, FlightResult>,
    /// The key each connection last obtained a token with; an entry goes with its last user.
    users: Users<User, TokenKey>,
}

#[derive(Default)]
struct Entry {
    token: Option<SharedToken>,
}

fn lock<User>(state: &Mutex<State<User>>) -> MutexGuard<'_, State<User>> {
    crate::machinery::lock::lock(state, "the token cache")
}

impl<User: Hash + Eq + Send + 'static> TokenCache<User> {
    /// A token for `key`, for connection `user`:
    /// - the cached one, unless it is `held` (the token the connection has and must replace:
    ///   its refresh is due, its inputs changed, or Tasklist refused it), which is dropped
    ///   from the cache at once so that nobody gets it from here again; and only when
    ///   `reusable` accepts it (see [`refresh_time_if_reusable`]);
    /// - otherwise the answer of the request in flight for `key`, if there is one;
    /// - otherwise the answer of `fetch`, which runs as a task of its own (a caller that
    ///   gives up does not cancel it for the others) and whose token replaces the entry.
    pub async fn obtain<Fetch>(
        &self,
        key: TokenKey,
        user: User,
        held: Option<&Sensitive>,
        reusable: impl FnOnce(&SharedToken) -> bool,
        fetch: impl FnOnce() -> Fetch,
    ) -> (TokenSource, FlightResult)
    where
        Fetch: Future<Output = FlightResult> + Send + 'static,
    {
        let (source, flight) = {
            let mut guard = lock(&self.state);
            let state = &mut *guard;
            if let Some(unused) = state.users.use_key(user, key) {
                state.entries.remove(&unused);
            }
            let entry = state.entries.entry(key).or_default();
            if let Some(token) = &entry.token {
                if held.is_some_and(|held| *held == token.access_token) {
                    entry.token = None;
                } else if reusable(token) {
                    return (TokenSource::Cached, Ok(token.clone()));
                }
            }
            match state.flights.join(&key) {
                Some(answer) => (TokenSource::InFlight, answer),
                None => {
                    let request = fetch();
                    let shared_state = Arc::clone(&self.state);
                    let answer = state.flights.start(
                        key,
                        move |id| async move {
                            let result = request.await;
                            lock(&shared_state).finish_flight(key, id, &result, Timestamp::now());
                            result
                        },
                        |why| Err(AuthFailure::server_error(format!("the token request did not finish: {why}"))),
                    );
                    (TokenSource::Requested, answer)
                }
            }
        };
        (source, flight.await)
    }

    /// Forgets connection `user` (deleted), and the entry it was the last to use.
    pub fn forget(&self, user: &User) {
        let mut state = lock(&self.state);
        if let Some(unused) = state.users.forget(user) {
            state.entries.remove(&unused);
        }
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        lock(&self.state).entries.len()
    }

    /// How many callers are waiting for the request in flight for `key`, besides its sender.
    #[cfg(test)]
    pub(crate) fn joined(&self, key: TokenKey) -> usize {
        lock(&self.state).flights.joined(&key)
    }
}

impl<User: Hash + Eq> State<User> {
    /// Keeps the token a flight brought (a failure is not kept: the entry's token, if any,
    /// stays), unless nobody uses the key any more.
    fn finish_flight(&mut self, key: TokenKey, id: FlightId, result: &FlightResult, now: Timestamp) {
        self.flights.land(&key, id);
        let Some(entry) = self.entries.get_mut(&key) else { return };
        if let Ok(token) = result {
            entry.token = Some(token.clone());
            self.make_room(now);
        }
    }

    /// Drops expired tokens, then the tokens that expire first while there are more than
    /// [`MAX_ENTRIES`]. Entries with a request in flight stay.
    fn make_room(&mut self, now: Timestamp) {
        let flights = &mut self.flights;
        let in_flight: Vec<TokenKey> = self.entries.keys().filter(|key| flights.is_in_flight(key)).copied().collect();
        prune(
            &mut self.entries,
            Capacity::entries(0, MAX_ENTRIES),
            |key, entry| !in_flight.contains(key) && entry.token.as_ref().is_none_or(|token| token.expires_at <= now),
            |key, entry| (!in_flight.contains(key)).then(|| entry.token.as_ref().map(|token| token.expires_at)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::camunda::assertion::AssertionKey;
    use futures::FutureExt as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn endpoint() -> TokenEndpoint {
        TokenEndpoint::at("https://idp/token", "tasklist.camunda.io", None, RequestEncoding::Form)
    }

    fn client(secret: &str) -> ClientCredentials {
        ClientCredentials::with_secret_in_body("orders", Sensitive::new(secret))
    }

    fn key_of(endpoint: &TokenEndpoint, client: &ClientCredentials, trust: &TlsTrust) -> TokenKey {
        TokenKey::new("https://idp/token", endpoint, client, trust)
    }

    #[test]
    fn the_key_changes_with_every_field_the_request_depends_on() {
        let trust = TlsTrust::default();
        let base = key_of(&endpoint(), &client("s3cret-1"), &trust);
        assert_eq!(
            base,
            key_of(&endpoint(), &client("s3cret-1"), &trust),
            "the same request, the same key"
        );
        let mut different = vec![
            key_of(&endpoint(), &client("s3cret-2"), &trust),
            TokenKey::new("https://other/token", &endpoint(), &client("s3cret-1"), &trust),
            key_of(
                &endpoint(),
                &ClientCredentials::with_secret_in_body("billing", Sensitive::new("s3cret-1")),
                &trust,
            ),
            key_of(
                &TokenEndpoint::at("https://idp/token", "zeebe.camunda.io", None, RequestEncoding::Form),
                &client("s3cret-1"),
                &trust,
            ),
            key_of(
                &TokenEndpoint::at(
                    "https://idp/token",
                    "tasklist.camunda.io",
                    Some("tasklist".into()),
                    RequestEncoding::Form,
                ),
                &client("s3cret-1"),
                &trust,
            ),
            key_of(
                &TokenEndpoint::at("https://idp/token", "tasklist.camunda.io", None, RequestEncoding::Json),
                &client("s3cret-1"),
                &trust,
            ),
            key_of(
                &endpoint(),
                &ClientCredentials {
                    client_id: "orders".into(),
                    proof: ClientProof::SecretInBasicHeader(Sensitive::new("s3cret-1")),
                },
                &trust,
            ),
            key_of(
                &endpoint(),
                &client("s3cret-1"),
                &TlsTrust {
                    extra_roots_pem: Some("-----BEGIN CERTIFICATE-----".into()),
                    ..TlsTrust::default()
                },
            ),
            key_of(
                &endpoint(),
                &client("s3cret-1"),
                &TlsTrust {
                    insecure_skip_verify: true,
                    ..TlsTrust::default()
                },
            ),
            // Another client certificate may be allowed other things.
            key_of(
                &endpoint(),
                &client("s3cret-1"),
                &TlsTrust {
                    client_identity_pem: Some(crate::camunda::Sensitive::new("-----BEGIN CERTIFICATE-----")),
                    ..TlsTrust::default()
                },
            ),
        ];
        let pem = |file: &str| std::fs::read_to_string(format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let signed_by = |file: &str, kid: Option<&str>| ClientCredentials {
            client_id: "orders".into(),
            proof: ClientProof::PrivateKeyJwt(AssertionKey::from_pem(&pem(file), kid.map(str::to_owned)).unwrap()),
        };
        different.push(key_of(&endpoint(), &signed_by("rsa-2048-test-key.pem", Some("k1")), &trust));
        different.push(key_of(&endpoint(), &signed_by("rsa-2048-other-test-key.pem", Some("k1")), &trust));
        different.push(key_of(&endpoint(), &signed_by("rsa-2048-test-key.pem", Some("k2")), &trust));
        different.push(key_of(&endpoint(), &signed_by("rsa-2048-test-key.pem", None), &trust));
        different.push(base);
        let count = different.len();
        different.sort_by_key(|key| key.0);
        different.dedup();
        assert_eq!(different.len(), count, "every field must change the key");
        // An empty scope is not sent: the same request as none.
        assert_eq!(
            key_of(
                &TokenEndpoint::at(
                    "https://idp/token",
                    "tasklist.camunda.io",
                    Some(String::new()),
                    RequestEncoding::Form
                ),
                &client("s3cret-1"),
                &trust
            ),
            base
        );
    }

    #[test]
    fn neither_the_key_nor_a_cached_token_shows_the_secret_in_debug() {
        let key = key_of(&endpoint(), &client("s3cret-value"), &TlsTrust::default());
        let shown = format!("{key:?}");
        assert_eq!(shown, "TokenKey(<hash>)");
        let hex = hex::encode(key.0);
        assert!(!shown.contains(&hex[..8]));
        let token = SharedToken {
            access_token: Sensitive::new("token-value"),
            issued_at: at(0),
            expires_at: at(300),
        };
        assert!(!format!("{token:?}").contains("token-value"));
    }

    fn token(issued: i64, expires: i64) -> SharedToken {
        SharedToken {
            access_token: Sensitive::new(format!("token-{issued}")),
            issued_at: at(issued),
            expires_at: at(expires),
        }
    }

    fn reusable_at(token: &SharedToken, refresh_before: Option<u64>, jitter: f64, now: i64) -> Option<Timestamp> {
        let policy = RefreshPolicy::default();
        refresh_time_if_reusable(token, refresh_before.map(Duration::from_secs), &policy, jitter, at(now))
    }

    #[test]
    fn a_late_joiner_gets_its_own_refresh_time_from_the_real_issue_time() {
        // 3600 s token issued at 0: planned at 80 % (2880 s) minus up to 360 s of jitter.
        let shared = token(0, 3600);
        assert_eq!(reusable_at(&shared, None, 0.0, 100), Some(at(2880)));
        assert_eq!(reusable_at(&shared, None, 1.0, 100), Some(at(2520)));
        // Its own refreshBefore: 30 min before expiry.
        assert_eq!(reusable_at(&shared, Some(1800), 0.0, 100), Some(at(1800)));
    }

    #[test]
    fn a_token_is_not_reused_once_the_refresh_time_it_gives_is_near_or_past() {
        let shared = token(0, 3600);
        // Margin: 10 % of 3600 s = 360 s before the refresh time at 2880 s.
        assert_eq!(reusable_at(&shared, None, 0.0, 2520), Some(at(2880)));
        assert_eq!(reusable_at(&shared, None, 0.0, 2521), None);
        assert_eq!(reusable_at(&shared, None, 0.0, 2880), None);
        assert_eq!(reusable_at(&shared, None, 0.0, 4000), None, "expired");
        // refreshBefore 50 min: refresh on the floor at half the lifetime.
        assert_eq!(reusable_at(&shared, Some(3000), 0.0, 1500), None);
        // Short tokens: at least 5 s ahead. 20 s token: refresh at 10 s.
        let short = token(0, 20);
        assert_eq!(reusable_at(&short, None, 0.0, 5), Some(at(10)));
        assert_eq!(reusable_at(&short, None, 0.0, 6), None);
    }

    #[test]
    fn odd_tokens_are_never_reused() {
        // Expiry before issue (a clock that moved), and a 1 s token.
        assert_eq!(reusable_at(&token(100, 50), None, 0.0, 100), None);
        assert_eq!(reusable_at(&token(0, 1), None, 0.0, 0), None);
        // Lifetime capped by --max-credential-lifetime: a 48 h token counts as 24 h.
        let long = token(0, 48 * 3600);
        assert_eq!(reusable_at(&long, None, 0.0, 0), Some(at(69_120)));
    }

    fn fetched(counter: &Arc<AtomicUsize>, value: &str) -> impl Future<Output = FlightResult> + Send + 'static {
        counter.fetch_add(1, Ordering::SeqCst);
        let value = value.to_owned();
        async move {
            Ok(SharedToken {
                access_token: Sensitive::new(value),
                issued_at: Timestamp::now(),
                expires_at: add(Timestamp::now(), Duration::from_secs(300)),
            })
        }
    }

    fn cache_key(secret: &str) -> TokenKey {
        key_of(&endpoint(), &client(secret), &TlsTrust::default())
    }

    #[tokio::test]
    async fn callers_share_the_cached_token_until_they_must_replace_the_one_they_hold() {
        let cache = TokenCache::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let key = cache_key("s1");
        let (source, first) = cache.obtain(key, "a", None, |_| true, || fetched(&requests, "t1")).await;
        assert_eq!(source, TokenSource::Requested);
        let first = first.unwrap();
        let (source, second) = cache.obtain(key, "b", None, |_| true, || fetched(&requests, "t2")).await;
        assert_eq!((source, second.unwrap()), (TokenSource::Cached, first.clone()));
        // Not reusable for this caller (its refresh time for it has come): a new request.
        let (source, third) = cache.obtain(key, "c", None, |_| false, || fetched(&requests, "t3")).await;
        assert_eq!(source, TokenSource::Requested);
        assert_eq!(third.unwrap().access_token.expose(), "t3");
        // "b" holds t1, so t3 is not "held": b reuses t3.
        let (source, fourth) = cache
            .obtain(key, "b", Some(&first.access_token), |_| true, || fetched(&requests, "t4"))
            .await;
        assert_eq!(
            (source, fourth.unwrap().access_token.expose().to_owned()),
            (TokenSource::Cached, "t3".to_owned())
        );
        // "c" must replace t3 (Tasklist refused it): the entry is dropped, a new request made.
        let (source, fifth) = cache
            .obtain(key, "c", Some(&Sensitive::new("t3")), |_| true, || fetched(&requests, "t5"))
            .await;
        assert_eq!(
            (source, fifth.unwrap().access_token.expose().to_owned()),
            (TokenSource::Requested, "t5".to_owned())
        );
        assert_eq!(requests.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failure_reaches_every_caller_that_waited_for_it_and_is_not_kept() {
        let cache = TokenCache::<usize>::default();
        let key = cache_key("s1");
        let release = Arc::new(tokio::sync::Notify::new());
        let requests = Arc::new(AtomicUsize::new(0));
        let leader = {
            let (cache_release, counter) = (release.clone(), requests.clone());
            let fetch = move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    cache_release.notified().await;
                    Err(AuthFailure::server_error("the token endpoint answered 503 Service Unavailable"))
                }
            };
            cache.obtain(key, 0, None, |_| true, fetch)
        };
        let waiters = (1..5).map(|user| cache.obtain(key, user, None, |_| true, || fetched(&requests, "never")));
        let all = futures::future::join_all(std::iter::once(leader.boxed()).chain(waiters.map(|w| w.boxed())));
        let releaser = async {
            while cache.joined(key) < 4 {
                tokio::task::yield_now().await;
            }
            release.notify_one();
        };
        let (results, ()) = tokio::join!(all, releaser);
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        let sources: Vec<_> = results.iter().map(|(source, _)| *source).collect();
        assert_eq!(sources[0], TokenSource::Requested);
        assert!(sources[1..].iter().all(|source| *source == TokenSource::InFlight), "{sources:?}");
        assert!(
            results
                .iter()
                .all(|(_, result)| result.as_ref().is_err_and(|f| f.message.contains("503")))
        );
        // Not kept: the next caller sends a request of its own.
        let (source, result) = cache.obtain(key, 9, None, |_| true, || fetched(&requests, "t2")).await;
        assert_eq!(source, TokenSource::Requested);
        assert!(result.is_ok());
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_rotated_secret_gets_a_new_request_and_the_old_entry_goes_with_its_last_user() {
        let cache = TokenCache::default();
        let requests = Arc::new(AtomicUsize::new(0));
        for user in ["a", "b"] {
            cache
                .obtain(cache_key("old"), user, None, |_| true, || fetched(&requests, "t1"))
                .await
                .1
                .unwrap();
        }
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        let (source, _) = cache
            .obtain(cache_key("new"), "a", None, |_| true, || fetched(&requests, "t2"))
            .await;
        assert_eq!(source, TokenSource::Requested, "a new secret is requested at once");
        assert_eq!(cache.entries(), 2, "b still uses the old entry");
        let (source, _) = cache
            .obtain(cache_key("new"), "b", None, |_| true, || fetched(&requests, "t3"))
            .await;
        assert_eq!(source, TokenSource::Cached);
        assert_eq!(cache.entries(), 1, "the old entry went with its last user");
        cache.forget(&"a");
        assert_eq!(cache.entries(), 1);
        cache.forget(&"b");
        assert_eq!(cache.entries(), 0, "a deleted connection leaves nothing behind");
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn expired_tokens_go_and_the_cache_stays_bounded() {
        let cache = TokenCache::default();
        let expired = |value: String| async move {
            Ok(SharedToken {
                access_token: Sensitive::new(value),
                issued_at: at(0),
                expires_at: at(1),
            })
        };
        cache
            .obtain(cache_key("expired"), 0, None, |_| true, || expired("old".into()))
            .await
            .1
            .unwrap();
        for user in 1..=MAX_ENTRIES + 10 {
            let requests = Arc::new(AtomicUsize::new(0));
            cache
                .obtain(
                    cache_key(&format!("secret-{user}")),
                    user,
                    None,
                    |_| true,
                    || fetched(&requests, "t"),
                )
                .await
                .1
                .unwrap();
        }
        assert_eq!(cache.entries(), MAX_ENTRIES);
        assert!(
            !lock(&cache.state).entries.contains_key(&cache_key("expired")),
            "the expired token went first"
        );
    }
}
