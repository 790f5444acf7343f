//! What the operator remembers between reconciles, in memory only: failures (for backoff),
//! the last probe (so a wake-up for something else does not probe again), and which
//! Secrets each connection reads (so a change to one of them wakes the right connections).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;

use super::decide::UnauthorizedReobtain;
use crate::camunda::AuthFailure;
use crate::crd::TasklistConnection;
use crate::derived_secret::{DATA_HASH, StoredCredential};
use crate::status::ConditionState;

/// Namespace and name of a connection.
pub type ConnectionKey = (String, String);

/// Consecutive failures to obtain a credential from the same inputs.
#[derive(Debug, Clone)]
pub struct FailureRecord {
    pub fingerprint: String,
    pub failure: AuthFailure,
    pub consecutive: u32,
    pub retry_at: Timestamp,
}

/// A write of the derived Secret that the API server refused, and the credential it
/// carried, kept (in memory only) so that only the write is retried.
#[derive(Debug, Clone)]
pub struct WriteFailureRecord {
    /// The fingerprint of the inputs the kept credential was made from.
    pub fingerprint: String,
    /// The credential the failed write carried; `None` once dropped (its refresh time came
    /// or the inputs changed) while the episode goes on.
    pub credential: Option<StoredCredential>,
    pub consecutive: u32,
    pub retry_at: Timestamp,
    /// The API server's answer, with every credential value cut out.
    pub message: String,
    /// Whether this episode's `SecretWriteFailed` Warning Event was published.
    pub announced: bool,
}

/// The last probe and what it found.
#[derive(Debug, Clone)]
pub struct ProbeRecord {
    pub at: Timestamp,
    /// Which credential was probed (its issue time).
    pub credential_issued_at: Timestamp,
    pub result: ConditionState,
}

#[derive(Debug, Default, Clone)]
pub struct ConnectionMemory {
    pub failure: Option<FailureRecord>,
    pub last_probe: Option<ProbeRecord>,
    /// The last time a 401 from the probe made the operator obtain a new credential.
    pub unauthorized_reobtain: Option<UnauthorizedReobtain>,
    /// Whether the `RefreshBeforeTooLong` Event was published for the current warning.
    pub refresh_warning_announced: bool,
    /// A failed write of the derived Secret, retried with backoff.
    pub write_failure: Option<WriteFailureRecord>,
    /// Whether this process reconciled the connection before (false: first sight after a
    /// start, when status tells what the previous process knew).
    pub seen: bool,
}

#[derive(Default)]
pub struct Memory {
    connections: Mutex<HashMap<ConnectionKey, ConnectionMemory>>,
    /// (namespace, Secret name) -> names of connections that read or write it.
    secret_readers: Mutex<HashMap<(String, String), BTreeSet<String>>>,
    /// (namespace, connection name) -> the Secret names it was last recorded with.
    secrets_of: Mutex<HashMap<ConnectionKey, Vec<String>>>,
    /// (namespace, Secret name) -> the resourceVersion of the operator's own last write, so
    /// that the watch event of that write does not wake the connection a second time.
    own_writes: Mutex<HashMap<(String, String), String>>,
    /// (namespace, Secret name) -> the data-hash annotation of a write in flight. Its watch
    /// event can arrive before the write's answer (and so before `own_writes` knows its
    /// resourceVersion); the hash recognises it then.
    writes_in_flight: Mutex<HashMap<(String, String), String>>,
}

impl Memory {
    pub fn get(&self, key: &ConnectionKey) -> ConnectionMemory {
        self.connections
            .lock()
            .map(|map| map.get(key).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn update(&self, key: &ConnectionKey, change: impl FnOnce(&mut ConnectionMemory)) {
        if let Ok(mut map) = self.connections.lock() {
            change(map.entry(key.clone()).or_default());
        }
    }

    /// Every connection something is remembered about.
    pub fn keys(&self) -> Vec<ConnectionKey> {
        let mut keys: BTreeSet<ConnectionKey> = BTreeSet::new();
        if let Ok(map) = self.connections.lock() {
            keys.extend(map.keys().cloned());
        }
        if let Ok(secrets_of) = self.secrets_of.lock() {
            keys.extend(secrets_of.keys().cloned());
        }
        keys.into_iter().collect()
    }

    /// Forgets a deleted connection.
    pub fn forget(&self, key: &ConnectionKey) {
        if let Ok(mut map) = self.connections.lock() {
            map.remove(key);
        }
        if let (Ok(mut writes), Ok(mut in_flight), Ok(secrets_of)) =
            (self.own_writes.lock(), self.writes_in_flight.lock(), self.secrets_of.lock())
            && let Some(names) = secrets_of.get(key)
        {
            for name in names {
                writes.remove(&(key.0.clone(), name.clone()));
                in_flight.remove(&(key.0.clone(), name.clone()));
            }
        }
        self.record_secrets(key, Vec::new());
        if let Ok(mut secrets_of) = self.secrets_of.lock() {
            secrets_of.remove(key);
        }
    }

    /// Records the Secrets a connection depends on, replacing what was recorded before.
    pub fn record_secrets(&self, key: &ConnectionKey, names: Vec<String>) {
        let (Ok(mut readers), Ok(mut secrets_of)) = (self.secret_readers.lock(), self.secrets_of.lock()) else {
            return;
        };
        let (namespace, connection) = key;
        if secrets_of.get(key) == Some(&names) {
            return;
        }
        for old in secrets_of.remove(key).unwrap_or_default() {
            let secret = (namespace.clone(), old);
            if let Some(set) = readers.get_mut(&secret) {
                set.remove(connection);
                if set.is_empty() {
                    readers.remove(&secret);
                }
            }
        }
        for name in &names {
            readers
                .entry((namespace.clone(), name.clone()))
                .or_default()
                .insert(connection.clone());
        }
        secrets_of.insert(key.clone(), names);
    }

    /// Remembers, just before writing a derived Secret, the data hash the write carries.
    pub fn record_write_in_flight(&self, namespace: &str, secret: &str, data_hash: Option<String>) {
        if let (Ok(mut in_flight), Some(hash)) = (self.writes_in_flight.lock(), data_hash) {
            in_flight.insert((namespace.to_owned(), secret.to_owned()), hash);
        }
    }

    /// Remembers the resourceVersion the operator's own write of a derived Secret produced
    /// (`None` when the write failed), and that the write is no longer in flight.
    pub fn record_own_write(&self, namespace: &str, secret: &str, resource_version: Option<String>) {
        let key = (namespace.to_owned(), secret.to_owned());
        if let (Ok(mut writes), Some(version)) = (self.own_writes.lock(), resource_version) {
            writes.insert(key.clone(), version);
        }
        if let Ok(mut in_flight) = self.writes_in_flight.lock() {
            in_flight.remove(&key);
        }
    }

    /// Whether this watch event is the operator's own write of the Secret: the
    /// resourceVersion it produced, or the data hash of a write whose answer has not come yet.
    fn is_own_write(&self, secret: &PartialObjectMeta<Secret>) -> bool {
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        let version = secret.resource_version();
        if version.is_some() && self.own_writes.lock().ok().and_then(|writes| writes.get(&key).cloned()) == version {
            return true;
        }
        let hash = secret.annotations().get(DATA_HASH);
        hash.is_some()
            && self
                .writes_in_flight
                .lock()
                .ok()
                .and_then(|in_flight| in_flight.get(&key).cloned())
                .as_ref()
                == hash
    }

    /// The connections to reconcile when `secret` changed: its controller owner, and every
    /// connection that reads it or wants to write a Secret of that name.
    pub fn connections_affected_by(&self, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<TasklistConnection>> {
        let namespace = secret.namespace().unwrap_or_default();
        if self.is_own_write(secret) {
            return Vec::new();
        }
        let mut affected: Vec<ObjectRef<TasklistConnection>> = secret
            .owner_references()
            .iter()
            .filter(|owner| owner.controller == Some(true) && owner.kind == "TasklistConnection")
            .map(|owner| ObjectRef::new(&owner.name).within(&namespace))
            .collect();
        if let Ok(readers) = self.secret_readers.lock()
            && let Some(names) = readers.get(&(namespace.clone(), secret.name_any()))
        {
            affected.extend(names.iter().map(|name| ObjectRef::new(name).within(&namespace)));
        }
        affected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    fn event(version: &str, hash: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some("orders-tasklist-auth".into()),
                namespace: Some("team-a".into()),
                resource_version: Some(version.into()),
                annotations: Some(BTreeMap::from([(DATA_HASH.to_owned(), hash.to_owned())])),
                owner_references: Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    controller: Some(true),
                    kind: "TasklistConnection".into(),
                    name: "orders".into(),
                    ..Default::default()
                }]),
                ..ObjectMeta::default()
            },
            _phantom: Default::default(),
        }
    }

    #[test]
    fn the_watch_event_of_an_own_write_wakes_nothing_even_before_the_write_answered() {
        let memory = Memory::default();
        memory.record_write_in_flight("team-a", "orders-tasklist-auth", Some("h2".into()));
        // The event arrives before the write's answer: recognised by its data hash.
        assert!(memory.connections_affected_by(&event("7", "h2")).is_empty());
        // A change carrying other data (a hand edit of an earlier version) wakes the owner.
        assert_eq!(memory.connections_affected_by(&event("8", "h1")).len(), 1);
        memory.record_own_write("team-a", "orders-tasklist-auth", Some("7".into()));
        // The event arrives after the answer: recognised by its resourceVersion.
        assert!(memory.connections_affected_by(&event("7", "h2")).is_empty());
        // Anything later wakes the owner.
        assert_eq!(memory.connections_affected_by(&event("9", "h2")).len(), 1);
    }
}
