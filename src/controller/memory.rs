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

use crate::camunda::AuthFailure;
use crate::crd::TasklistConnection;
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
        if let (Ok(mut writes), Ok(secrets_of)) = (self.own_writes.lock(), self.secrets_of.lock())
            && let Some(names) = secrets_of.get(key)
        {
            for name in names {
                writes.remove(&(key.0.clone(), name.clone()));
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

    /// Remembers the resourceVersion the operator's own write of a derived Secret produced.
    pub fn record_own_write(&self, namespace: &str, secret: &str, resource_version: Option<String>) {
        if let (Ok(mut writes), Some(version)) = (self.own_writes.lock(), resource_version) {
            writes.insert((namespace.to_owned(), secret.to_owned()), version);
        }
    }

    /// The connections to reconcile when `secret` changed: its controller owner, and every
    /// connection that reads it or wants to write a Secret of that name.
    pub fn connections_affected_by(&self, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<TasklistConnection>> {
        let namespace = secret.namespace().unwrap_or_default();
        let own_write = self
            .own_writes
            .lock()
            .ok()
            .and_then(|writes| writes.get(&(namespace.clone(), secret.name_any())).cloned());
        if own_write.is_some() && own_write == secret.resource_version() {
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
