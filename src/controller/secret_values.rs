//! The values of the Secrets connections reference (client secrets, logins, CA bundles),
//! kept by version: connections that share a client Secret read it from the API server
//! once per version, not once per connection. The metadata watch says which version is
//! current; a version the watch has not seen yet is read from the API server.
//!
//! Only the keys connections read are kept (a referenced Secret may hold much more), at
//! most [`MAX_KEPT_BYTES`] in all, and a Secret is forgotten once no connection of the
//! store references it: a tenant cannot grow this cache beyond what its connections read.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::SecretCaches;
use crate::inputs::SecretSource;

/// The values kept, in bytes of keys and values, at most; past it the oldest reads go first.
const MAX_KEPT_BYTES: usize = 8 * 1024 * 1024;
/// Referenced Secrets kept at most, whatever their size.
const MAX_KEPT: usize = 4096;

/// Namespace and name of a referenced Secret.
pub type SecretKey = (String, String);

#[derive(Default)]
pub struct SecretValues {
    kept: Mutex<KeptValues>,
    reads: AtomicU64,
    /// One read of a Secret at a time: connections that need the same Secret at once (a
    /// burst of new connections of one client) wait for the first read, not read it too.
    reading: Mutex<HashMap<SecretKey, Arc<tokio::sync::Mutex<()>>>>,
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

/// Poisoned or not, the map holds whole entries only (each insert or removal is one
/// statement under the lock): go on with it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        self.secrets.insert(key, kept);
        while (self.bytes > MAX_KEPT_BYTES || self.secrets.len() > MAX_KEPT) && self.secrets.len() > 1 {
            let Some(oldest) = self
                .secrets
                .iter()
                .min_by_key(|(_, kept)| kept.sequence)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }
}

impl SecretValues {
    /// The Secret of `version` if it was read before with at least the `wanted` keys.
    fn get(&self, key: &SecretKey, version: &str, wanted: &BTreeSet<String>) -> Option<Arc<Secret>> {
        let kept = lock(&self.kept);
        let entry = kept.secrets.get(key)?;
        if entry.secret.metadata.resource_version.as_deref() != Some(version) {
            return None;
        }
        entry.answers(wanted)
    }

    /// Where the reads stand now, for [`Self::read_since`].
    fn mark(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The Secret as a read finished after `mark` got it: as fresh as a read now.
    fn read_since(&self, key: &SecretKey, mark: u64, wanted: &BTreeSet<String>) -> Option<Arc<Secret>> {
        let kept = lock(&self.kept);
        kept.secrets
            .get(key)
            .filter(|entry| entry.sequence >= mark)
            .and_then(|entry| entry.answers(wanted))
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

    /// The lock that one read of `key` holds.
    fn read_lock(&self, key: &SecretKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut reading = lock(&self.reading);
        if reading.len() >= MAX_KEPT {
            // Locks nobody holds or waits for.
            reading.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        reading.entry(key.clone()).or_default().clone()
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
        let meta = self.caches.metadata(&key.0, &key.1)?;
        let version = meta.metadata.resource_version.as_deref()?;
        self.values.get(key, version, wanted).map(|known| known.as_ref().clone())
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
        let mark = self.values.mark();
        let lock = self.values.read_lock(&key);
        let _reading = lock.lock().await;
        // Read by another connection while this one waited (the watch may not have seen
        // that version yet, as with a Secret created just before its connections).
        if let Some(read) = self.values.read_since(&key, mark, wanted) {
            return Ok(Some(read.as_ref().clone()));
        }
        let read = self.api.get_opt(name).await?;
        self.values.put(key, read.as_ref(), wanted);
        Ok(read)
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

    #[test]
    fn a_read_that_finished_while_waiting_is_as_good_as_a_read_now() {
        let values = SecretValues::default();
        let wanted = keys(&["id"]);
        values.put(key("client"), Some(&secret("client", "7")), &wanted);
        let mark = values.mark();
        assert!(
            values.read_since(&key("client"), mark, &wanted).is_none(),
            "read before the wait began"
        );
        values.put(key("client"), Some(&secret("client", "8")), &wanted);
        let read = values.read_since(&key("client"), mark, &wanted).expect("read while waiting");
        assert_eq!(read.metadata.resource_version.as_deref(), Some("8"));
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
