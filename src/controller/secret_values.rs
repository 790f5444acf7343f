//! The values of the Secrets connections reference (client secrets, logins, CA bundles),
//! kept by version: connections that share a client Secret read it from the API server
//! once per version, not once per connection. The metadata watch says which version is
//! current; a version the watch has not seen yet is read from the API server.
//!
//! Only the keys connections read are kept (a referenced Secret may hold much more), at
//! most [`MAX_KEPT_BYTES`] in all, and a Secret is forgotten once no connection of the
//! store references it: a tenant cannot grow this cache beyond what its connections read.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::SecretCaches;
use crate::inputs::SecretSource;
use crate::machinery::bounded::{Capacity, prune_weighed};
use crate::machinery::single_flight::Flights;

/// The values kept, in bytes of keys and values, at most; past it the oldest reads go first.
const MAX_KEPT_BYTES: usize = 8 * 1024 * 1024;
/// Referenced Secrets kept at most, whatever their size.
const MAX_KEPT: usize = 4096;

/// Namespace and name of a referenced Secret.
pub type SecretKey = (String, String);

/// The referenced Secrets' values, shared with the reads in flight.
#[derive(Default)]
pub struct SecretValues {
    values: Arc<Values>,
}

impl std::ops::Deref for SecretValues {
    type Target = Values;

    fn deref(&self) -> &Values {
        &self.values
    }
}

#[derive(Default)]
pub struct Values {
    kept: Mutex<KeptValues>,
    reads: AtomicU64,
    /// One read of a Secret at a time: connections that need the same Secret at once (a
    /// burst of new connections of one client) wait for the first read, not read it too.
    reading: Mutex<Flights<SecretKey, SharedRead>>,
}

/// A read as the connections that waited for it share it.
type SharedRead = Result<Option<Arc<Secret>>, Arc<kube::Error>>;

/// A Kubernetes API error for each connection that waited for the read that failed: the
/// API server's answer as it was, anything else by its message.
fn copy_of(error: &kube::Error) -> kube::Error {
    match error {
        kube::Error::Api(status) => kube::Error::Api(status.clone()),
        other => kube::Error::Service(other.to_string().into()),
    }
}

#[derive(Default)]
struct KeptValues {
    secrets: HashMap<SecretKey, Kept>,
    bytes: usize,
}

struct Kept {
    /// The Secret with only the kept keys in its data.
    secret: Arc<Secret>,
    /// The keys asked for at this version (a key asked for but absent is known absent).
    keys: BTreeSet<String>,
    /// When it was read, in reads: the oldest go first when the map is full.
    sequence: u64,
    bytes: usize,
}

impl Kept {
    fn answers(&self, wanted: &BTreeSet<String>) -> Option<Arc<Secret>> {
        wanted.is_subset(&self.keys).then(|| self.secret.clone())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    crate::machinery::lock::lock(mutex, "the referenced Secrets' values")
}

impl KeptValues {
    fn remove(&mut self, key: &SecretKey) {
        if let Some(gone) = self.secrets.remove(key) {
            self.bytes -= gone.bytes;
        }
    }

    fn insert(&mut self, key: SecretKey, kept: Kept) {
        self.remove(&key);
        self.bytes += kept.bytes;
        self.secrets.insert(key.clone(), kept);
        let capacity = Capacity {
            prune_at: 0,
            at_most: MAX_KEPT,
            at_most_weight: MAX_KEPT_BYTES,
        };
        // The oldest reads go first; the one just put is needed now.
        let gone = prune_weighed(
            &mut self.secrets,
            capacity,
            |kept| kept.bytes,
            |_, _| false,
            |kept_key, kept| (*kept_key != key).then_some(kept.sequence),
        );
        for (_, gone) in gone.into_iter().flatten() {
            self.bytes -= gone.bytes;
        }
    }
}

impl Values {
    /// The Secret of `version` if it was read before with at least the `wanted` keys.
    fn get(&self, key: &SecretKey, version: &str, wanted: &BTreeSet<String>) -> Option<Arc<Secret>> {
        let kept = lock(&self.kept);
        let entry = kept.secrets.get(key)?;
        if entry.secret.metadata.resource_version.as_deref() != Some(version) {
            return None;
        }
        entry.answers(wanted)
    }

    /// Keeps the `wanted` keys of `secret` (with those kept of the same version before).
    fn put(&self, key: SecretKey, secret: Option<&Secret>, wanted: &BTreeSet<String>) {
        let mut kept = lock(&self.kept);
        let Some(secret) = secret else {
            kept.remove(&key);
            return;
        };
        let mut keys = wanted.clone();
        if let Some(before) = kept.secrets.get(&key)
            && before.secret.metadata.resource_version == secret.metadata.resource_version
        {
            keys.extend(before.keys.iter().cloned());
        }
        let data: BTreeMap<_, _> = secret
            .data
            .iter()
            .flatten()
            .filter(|(name, _)| keys.contains(*name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let bytes = data.iter().map(|(name, value)| name.len() + value.0.len()).sum();
        let sequence = self.reads.fetch_add(1, Ordering::Relaxed);
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: secret.metadata.name.clone(),
                namespace: secret.metadata.namespace.clone(),
                uid: secret.metadata.uid.clone(),
                resource_version: secret.metadata.resource_version.clone(),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        };
        kept.insert(
            key,
            Kept {
                secret: Arc::new(secret),
                keys,
                sequence,
                bytes,
            },
        );
    }

    /// Forgets the Secrets of `namespace` (None: any) that no connection in `referenced`
    /// reads any more (after a connection is deleted, or a relist).
    pub fn forget_unreferenced(&self, namespace: Option<&str>, referenced: &HashSet<SecretKey>) {
        let mut kept = lock(&self.kept);
        let gone: Vec<SecretKey> = kept
            .secrets
            .keys()
            .filter(|key| namespace.is_none_or(|namespace| key.0 == namespace) && !referenced.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            kept.remove(&key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.kept).secrets.len()
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        lock(&self.kept).bytes
    }
}

impl SecretValues {
    /// The Secret `key` as `read` gets it from the API server, or as the read of the same
    /// Secret in flight gets it (its failure too); its `wanted` keys are kept.
    async fn read<F>(&self, key: SecretKey, wanted: &BTreeSet<String>, read: impl FnOnce() -> F) -> Result<Option<Secret>, kube::Error>
    where
        F: Future<Output = Result<Option<Secret>, kube::Error>> + Send + 'static,
    {
        let answer = {
            let mut reading = lock(&self.reading);
            match reading.join(&key) {
                Some(answer) => answer,
                None => {
                    let request = read();
                    let (values, flight_key, flight_wanted) = (self.values.clone(), key.clone(), wanted.clone());
                    reading.start(
                        key.clone(),
                        move |id| async move {
                            let read = request.await.map(|secret| secret.map(Arc::new)).map_err(Arc::new);
                            if let Ok(secret) = &read {
                                values.put(flight_key.clone(), secret.as_deref(), &flight_wanted);
                            }
                            lock(&values.reading).land(&flight_key, id);
                            read
                        },
                        |why| {
                            Err(Arc::new(kube::Error::Service(
                                format!("the Secret read did not finish: {why}").into(),
                            )))
                        },
                    )
                }
            }
        };
        match answer.await {
            Ok(secret) => {
                // The keys this connection reads, with those of the read's starter.
                self.put(key, secret.as_deref(), wanted);
                Ok(secret.map(|secret| secret.as_ref().clone()))
            }
            Err(error) => Err(copy_of(&error)),
        }
    }
}

/// A [`SecretSource`] that answers from [`SecretValues`] when the metadata watch's version
/// of the Secret was read before, and from the API server otherwise.
pub struct ByVersion<'a> {
    pub api: &'a Api<Secret>,
    pub namespace: &'a str,
    pub caches: &'a SecretCaches,
    pub values: &'a SecretValues,
    /// The keys the connection reads, by Secret name ([`crate::inputs::referenced_keys`]).
    pub wanted: &'a BTreeMap<String, BTreeSet<String>>,
}

impl ByVersion<'_> {
    /// The Secret as read before, if that is the version the metadata watch has now.
    fn known(&self, key: &SecretKey, wanted: &BTreeSet<String>) -> Option<Secret> {
        let summary = self.caches.metadata(&key.0, &key.1)?;
        self.values
            .get(key, summary.resource_version(), wanted)
            .map(|known| known.as_ref().clone())
    }
}

impl SecretSource for ByVersion<'_> {
    async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        let key = (self.namespace.to_owned(), name.to_owned());
        let no_keys = BTreeSet::new();
        let wanted = self.wanted.get(name).unwrap_or(&no_keys);
        if let Some(known) = self.known(&key, wanted) {
            return Ok(Some(known));
        }
        let api = self.api.clone();
        let name = name.to_owned();
        self.values.read(key, wanted, move || async move { api.get_opt(&name).await }).await
    }

    fn service_account_tokens(&self) -> Option<crate::service_account_token::ServiceAccountTokens> {
        let client = self.api.clone().into_client();
        Some(crate::service_account_token::ServiceAccountTokens::new(client, self.namespace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(name: &str, version: &str) -> Secret {
        secret_with(name, version, &[("id", 2), ("secret", 6)])
    }

    fn secret_with(name: &str, version: &str, data: &[(&str, usize)]) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(key, size)| (key.to_string(), ByteString(vec![b'x'; *size])))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn key(name: &str) -> SecretKey {
        ("team".into(), name.into())
    }

    fn keys(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn a_secret_is_answered_only_for_the_version_that_was_read() {
        let values = SecretValues::default();
        let wanted = keys(&["id", "secret"]);
        values.put(key("client"), Some(&secret("client", "7")), &wanted);
        assert!(values.get(&key("client"), "7", &wanted).is_some());
        assert!(values.get(&key("client"), "8", &wanted).is_none(), "a rotated Secret is read again");
        assert!(values.get(&key("other"), "7", &wanted).is_none());
    }

    #[test]
    fn only_the_keys_read_are_kept_and_another_key_is_read_again() {
        let values = SecretValues::default();
        let big = secret_with("shared", "3", &[("id", 2), ("secret", 6), ("unrelated", 64 * 1024)]);
        values.put(key("shared"), Some(&big), &keys(&["id", "secret"]));
        let kept = values.get(&key("shared"), "3", &keys(&["id"])).expect("kept");
        assert_eq!(kept.data.as_ref().map(|data| data.len()), Some(2));
        assert_eq!(values.bytes(), 2 + 2 + 6 + 6, "the 64 KiB key is not kept");
        assert!(
            values.get(&key("shared"), "3", &keys(&["unrelated"])).is_none(),
            "a key not read before"
        );
        values.put(key("shared"), Some(&big), &keys(&["password"]));
        let both = values
            .get(&key("shared"), "3", &keys(&["id", "password"]))
            .expect("the union of keys");
        assert_eq!(
            both.data.as_ref().map(|data| data.len()),
            Some(2),
            "a key absent from the Secret stays absent"
        );
    }

    type Read = std::pin::Pin<Box<dyn Future<Output = Result<Option<Secret>, kube::Error>> + Send>>;

    /// A read that answers `answer` once `release` says so, counting how many started.
    fn read_of(
        reads: &Arc<std::sync::atomic::AtomicUsize>,
        release: &tokio::sync::watch::Receiver<bool>,
        answer: fn() -> Result<Option<Secret>, kube::Error>,
    ) -> impl FnOnce() -> Read {
        let (reads, mut release) = (reads.clone(), release.clone());
        move || {
            reads.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let _ = release.wait_for(|released| *released).await;
                answer()
            })
        }
    }

    /// Two connections that need `client` at once, the second wanting other keys.
    async fn two_at_once(
        values: &SecretValues,
        answer: fn() -> Result<Option<Secret>, kube::Error>,
    ) -> (usize, [Result<Option<Secret>, kube::Error>; 2]) {
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let (id, secret) = (keys(&["id"]), keys(&["secret"]));
        let first = values.read(key("client"), &id, read_of(&reads, &released, answer));
        let second = values.read(key("client"), &secret, read_of(&reads, &released, answer));
        let releaser = async {
            while lock(&values.reading).joined(&key("client")) < 1 {
                tokio::task::yield_now().await;
            }
            release.send(true).expect("a receiver");
        };
        let (first, second, ()) = tokio::join!(first, second, releaser);
        (reads.load(Ordering::SeqCst), [first, second])
    }

    #[tokio::test]
    async fn connections_that_need_a_secret_at_once_share_one_read_and_keep_their_keys() {
        let values = SecretValues::default();
        let (reads, answers) = two_at_once(&values, || Ok(Some(secret("client", "8")))).await;
        assert_eq!(reads, 1, "one read for both");
        for answer in answers {
            let read = answer.expect("read").expect("present");
            assert_eq!(read.metadata.resource_version.as_deref(), Some("8"));
        }
        assert!(values.get(&key("client"), "8", &keys(&["id", "secret"])).is_some());
    }

    #[tokio::test]
    async fn a_failed_read_reaches_every_connection_that_waited_and_is_not_kept() {
        let values = SecretValues::default();
        let forbidden = || {
            Err(kube::Error::Api(Box::new(kube::core::Status {
                code: 403,
                message: "secrets \"client\" is forbidden".into(),
                ..Default::default()
            })))
        };
        let (reads, answers) = two_at_once(&values, forbidden).await;
        assert_eq!(reads, 1);
        for answer in answers {
            assert!(matches!(answer, Err(kube::Error::Api(status)) if status.code == 403));
        }
        let (reads, _) = two_at_once(&values, || Ok(None)).await;
        assert_eq!(reads, 1, "the failure was not kept: read again");
    }

    #[test]
    fn a_secret_read_as_absent_is_forgotten() {
        let values = SecretValues::default();
        values.put(key("client"), Some(&secret("client", "7")), &keys(&["id"]));
        values.put(key("client"), None, &keys(&["id"]));
        assert!(values.get(&key("client"), "7", &keys(&["id"])).is_none());
        assert_eq!(values.bytes(), 0);
    }

    #[test]
    fn the_cache_stays_bounded_in_bytes_and_count_and_keeps_the_latest_reads() {
        let values = SecretValues::default();
        let wanted = keys(&["ca.crt"]);
        for index in 0..200 {
            let name = format!("ca-{index}");
            values.put(key(&name), Some(&secret_with(&name, "1", &[("ca.crt", 64 * 1024)])), &wanted);
        }
        assert!(values.bytes() <= MAX_KEPT_BYTES, "{} bytes", values.bytes());
        assert!(values.get(&key("ca-199"), "1", &wanted).is_some());
        assert!(values.get(&key("ca-0"), "1", &wanted).is_none(), "the oldest went first");
        for index in 0..MAX_KEPT + 10 {
            let name = format!("client-{index}");
            values.put(key(&name), Some(&secret(&name, "1")), &keys(&["id"]));
        }
        assert!(values.len() <= MAX_KEPT);
    }

    #[test]
    fn secrets_no_connection_references_are_forgotten() {
        let values = SecretValues::default();
        let wanted = keys(&["id"]);
        values.put(key("kept"), Some(&secret("kept", "1")), &wanted);
        values.put(key("gone"), Some(&secret("gone", "1")), &wanted);
        values.put(("other-team".into(), "gone".into()), Some(&secret("gone", "1")), &wanted);
        values.forget_unreferenced(Some("team"), &HashSet::from([key("kept")]));
        assert!(values.get(&key("kept"), "1", &wanted).is_some());
        assert!(values.get(&key("gone"), "1", &wanted).is_none());
        assert!(
            values.get(&("other-team".into(), "gone".into()), "1", &wanted).is_some(),
            "another namespace is left alone"
        );
    }
}
