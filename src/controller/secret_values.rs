//! The values of the Secrets connections reference (client secrets, logins, CA bundles),
//! kept by version: connections that share a client Secret read it from the API server
//! once per version, not once per connection. The metadata watch says which version is
//! current; a version the watch has not seen yet is read from the API server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::SecretCaches;
use crate::inputs::SecretSource;

/// Referenced Secrets kept at most; past it the oldest half is dropped (a Secret no
/// connection reads any more is never asked for again, so this also bounds leftovers).
const MAX_KEPT: usize = 4096;

/// Namespace and name of a referenced Secret.
type SecretKey = (String, String);

#[derive(Default)]
pub struct SecretValues {
    kept: Mutex<HashMap<SecretKey, Kept>>,
    reads: AtomicU64,
    /// One read of a Secret at a time: connections that need the same Secret at once (a
    /// burst of new connections of one client) wait for the first read, not read it too.
    reading: Mutex<HashMap<SecretKey, Arc<tokio::sync::Mutex<()>>>>,
}

struct Kept {
    secret: Arc<Secret>,
    /// When it was read, in reads: the oldest go first when the map is full.
    sequence: u64,
}

impl SecretValues {
    /// The Secret of `version` if it was read before.
    fn get(&self, key: &SecretKey, version: &str) -> Option<Arc<Secret>> {
        let kept = self.kept.lock().ok()?;
        let entry = kept.get(key)?;
        (entry.secret.metadata.resource_version.as_deref() == Some(version)).then(|| entry.secret.clone())
    }

    /// Where the reads stand now, for [`Self::read_since`].
    fn mark(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The Secret as a read finished after `mark` got it: as fresh as a read now.
    fn read_since(&self, key: &SecretKey, mark: u64) -> Option<Arc<Secret>> {
        let kept = self.kept.lock().ok()?;
        kept.get(key)
            .filter(|entry| entry.sequence >= mark)
            .map(|entry| entry.secret.clone())
    }

    fn put(&self, key: SecretKey, secret: Option<&Secret>) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        let Some(secret) = secret else {
            kept.remove(&key);
            return;
        };
        let sequence = self.reads.fetch_add(1, Ordering::Relaxed);
        if kept.len() >= MAX_KEPT && !kept.contains_key(&key) {
            drop_oldest_half(&mut kept);
        }
        kept.insert(
            key,
            Kept {
                secret: Arc::new(secret.clone()),
                sequence,
            },
        );
    }

    /// The lock that one read of `key` holds.
    fn read_lock(&self, key: &SecretKey) -> Arc<tokio::sync::Mutex<()>> {
        let Ok(mut reading) = self.reading.lock() else {
            return Arc::default();
        };
        if reading.len() >= MAX_KEPT {
            // Locks nobody holds or waits for.
            reading.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        reading.entry(key.clone()).or_default().clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().map(|kept| kept.len()).unwrap_or_default()
    }
}

fn drop_oldest_half(kept: &mut HashMap<SecretKey, Kept>) {
    let mut sequences: Vec<u64> = kept.values().map(|entry| entry.sequence).collect();
    sequences.sort_unstable();
    let cut = sequences.get(sequences.len() / 2).copied().unwrap_or_default();
    kept.retain(|_, entry| entry.sequence >= cut);
}

/// A [`SecretSource`] that answers from [`SecretValues`] when the metadata watch's version
/// of the Secret was read before, and from the API server otherwise.
pub struct ByVersion<'a> {
    pub api: &'a Api<Secret>,
    pub namespace: &'a str,
    pub caches: &'a SecretCaches,
    pub values: &'a SecretValues,
}

impl ByVersion<'_> {
    /// The Secret as read before, if that is the version the metadata watch has now.
    fn known(&self, key: &SecretKey) -> Option<Secret> {
        let meta = self.caches.metadata(&key.0, &key.1)?;
        let version = meta.metadata.resource_version.as_deref()?;
        self.values.get(key, version).map(|known| known.as_ref().clone())
    }
}

impl SecretSource for ByVersion<'_> {
    async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        let key = (self.namespace.to_owned(), name.to_owned());
        if let Some(known) = self.known(&key) {
            return Ok(Some(known));
        }
        let mark = self.values.mark();
        let lock = self.values.read_lock(&key);
        let _reading = lock.lock().await;
        // Read by another connection while this one waited (the watch may not have seen
        // that version yet, as with a Secret created just before its connections).
        if let Some(read) = self.values.read_since(&key, mark) {
            return Ok(Some(read.as_ref().clone()));
        }
        let read = self.api.get_opt(name).await?;
        self.values.put(key, read.as_ref());
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, version: &str) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn key(name: &str) -> SecretKey {
        ("team".into(), name.into())
    }

    #[test]
    fn a_secret_is_answered_only_for_the_version_that_was_read() {
        let values = SecretValues::default();
        values.put(key("client"), Some(&secret("client", "7")));
        assert!(values.get(&key("client"), "7").is_some());
        assert!(values.get(&key("client"), "8").is_none(), "a rotated Secret is read again");
        assert!(values.get(&key("other"), "7").is_none());
    }

    #[test]
    fn a_read_that_finished_while_waiting_is_as_good_as_a_read_now() {
        let values = SecretValues::default();
        values.put(key("client"), Some(&secret("client", "7")));
        let mark = values.mark();
        assert!(values.read_since(&key("client"), mark).is_none(), "read before the wait began");
        values.put(key("client"), Some(&secret("client", "8")));
        let read = values.read_since(&key("client"), mark).expect("read while waiting");
        assert_eq!(read.metadata.resource_version.as_deref(), Some("8"));
    }

    #[test]
    fn a_secret_read_as_absent_is_forgotten() {
        let values = SecretValues::default();
        values.put(key("client"), Some(&secret("client", "7")));
        values.put(key("client"), None);
        assert!(values.get(&key("client"), "7").is_none());
    }

    #[test]
    fn the_map_stays_bounded_and_keeps_the_latest_reads() {
        let values = SecretValues::default();
        for index in 0..MAX_KEPT + 10 {
            let name = format!("client-{index}");
            values.put(key(&name), Some(&secret(&name, "1")));
        }
        assert!(values.len() <= MAX_KEPT);
        let latest = format!("client-{}", MAX_KEPT + 9);
        assert!(values.get(&key(&latest), "1").is_some());
    }
}
