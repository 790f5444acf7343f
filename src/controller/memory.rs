//! What the operator remembers between reconciles, in memory only: failures (for backoff),
//! the last probe (so a wake-up for something else does not probe again), and its own last
//! write of the derived Secret (so that write's watch event does not wake the connection).
//! Which connections read a Secret is not kept here: the reflector store of connections
//! answers that (see [`connections_affected_by`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;

use crate::camunda::{AuthFailure, TlsTrust};
use crate::crd::TasklistConnection;
use crate::derived_secret::{DATA_HASH, StoredCredential};
use crate::inputs::reads_secret;
use crate::status::ConditionState;

/// Namespace and name of a connection. Shared: each per-connection map (memory, records,
/// the HTTP clients' and the token cache's users) holds a pointer to one copy, made when
/// a reconcile starts, instead of two strings each.
pub type ConnectionKey = Arc<(String, String)>;

/// The key of `namespace`/`name`.
pub fn connection_key(namespace: impl Into<String>, name: impl Into<String>) -> ConnectionKey {
    Arc::new((namespace.into(), name.into()))
}

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

/// The last time a 401 from the probe made the operator obtain a new credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnauthorizedReobtain {
    pub at: Timestamp,
    /// The issue time of the credential obtained then; `None` when none was obtained (the
    /// try failed, or a retry was pending).
    pub obtained_issued_at: Option<Timestamp>,
}

/// The last probe and what it found.
#[derive(Debug, Clone)]
pub struct ProbeRecord {
    pub at: Timestamp,
    /// Which credential was probed (its issue time).
    pub credential_issued_at: Timestamp,
    pub result: ConditionState,
}

/// What the plan decides and the next reconcile must know: backoff, the last probe, what was
/// announced. A reconcile reads it once when it gathers its facts and writes it back once
/// when it reports ([`Memory::commit`]).
#[derive(Debug, Default, Clone)]
pub struct Decided {
    // The records of a failure episode are boxed: most connections have none, and an unset
    // box costs a pointer where the record would cost its size in every connection's entry.
    pub failure: Option<Box<FailureRecord>>,
    pub last_probe: Option<ProbeRecord>,
    /// The last time a 401 from the probe made the operator obtain a new credential.
    pub unauthorized_reobtain: Option<UnauthorizedReobtain>,
    /// Whether the `RefreshBeforeTooLong` Event was published for the current warning.
    pub refresh_warning_announced: bool,
    /// A failed write of the derived Secret, retried with backoff.
    pub write_failure: Option<Box<WriteFailureRecord>>,
    /// Whether this process reconciled the connection before (false: first sight after a
    /// start, when status tells what the previous process knew).
    pub seen: bool,
    /// The refresh annotation's value last acted on, and when (see `decide::forced_refresh`).
    pub forced_refresh: Option<(String, Timestamp)>,
    /// A forced refresh waiting for its turn: wake up then.
    pub forced_refresh_wait: Option<Timestamp>,
}

#[derive(Debug, Default, Clone)]
pub struct ConnectionMemory {
    pub decided: Decided,
    /// The operator's own last write of the derived Secret (kept by the write itself: its
    /// watch event may arrive while the reconcile is still running).
    pub own_write: Option<OwnWrite>,
    /// The TLS trust read from the connection's `caSecretRef`, with the version of that
    /// Secret it was read from (see `InputsSummary::ca_version`), so that a reconcile at
    /// rest does not read the CA bundle again.
    pub ca_trust: Option<Box<(String, TlsTrust)>>,
}

/// The operator's own last write of a derived Secret, so that the watch event of that write
/// does not wake the connection a second time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OwnWrite {
    pub secret: String,
    /// The resourceVersion the write produced, once it answered.
    pub resource_version: Option<String>,
    /// The data-hash annotation of a write in flight. Its watch event can arrive before the
    /// write's answer (and so before its resourceVersion is known); the hash recognises it.
    pub data_hash_in_flight: Option<String>,
}

/// Each record is changed whole under the lock; a poisoned lock must not drop what the
/// records remember (failures, backoff): see [`crate::machinery::lock`].
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    crate::machinery::lock::lock(mutex, "the connections' memory")
}

#[derive(Default)]
pub struct Memory {
    // Boxed: the map's table has room for up to twice its entries, and an empty slot then
    // costs a key and a pointer, not a whole record.
    connections: Mutex<HashMap<ConnectionKey, Box<ConnectionMemory>>>,
}

impl Memory {
    pub fn get(&self, key: &ConnectionKey) -> ConnectionMemory {
        lock(&self.connections)
            .get(key)
            .map(|memory| memory.as_ref().clone())
            .unwrap_or_default()
    }

    pub fn update(&self, key: &ConnectionKey, change: impl FnOnce(&mut ConnectionMemory)) {
        change(lock(&self.connections).entry(key.clone()).or_default());
    }

    /// What the last reconcile decided, for the next one to plan with.
    pub fn decided(&self, key: &ConnectionKey) -> Decided {
        self.get(key).decided
    }

    /// The operator's own last write of `key`'s derived Secret.
    pub fn own_write(&self, key: &ConnectionKey) -> Option<OwnWrite> {
        lock(&self.connections).get(key).and_then(|memory| memory.own_write.clone())
    }

    /// Keeps what a reconcile decided (the own-write record and the trust cache are kept
    /// by the steps that learn them).
    pub fn commit(&self, key: &ConnectionKey, decided: Decided) {
        self.update(key, |memory| memory.decided = decided);
    }

    /// Makes sure the connection has a record, so that a relist forgets it (and what else
    /// is kept about it, such as metric series) once it is gone.
    pub fn remember(&self, key: &ConnectionKey) {
        self.update(key, |_| {});
    }

    /// Every connection something is remembered about.
    pub fn keys(&self) -> Vec<ConnectionKey> {
        lock(&self.connections).keys().cloned().collect()
    }

    /// Forgets a deleted connection, with its own-write record.
    pub fn forget(&self, key: &ConnectionKey) {
        lock(&self.connections).remove(key);
    }

    /// Remembers, just before writing a derived Secret, the data hash the write carries.
    pub fn record_write_in_flight(&self, key: &ConnectionKey, secret: &str, data_hash: Option<String>) {
        let Some(hash) = data_hash else { return };
        self.update(key, |memory| {
            let write = own_write_of(memory, secret);
            write.data_hash_in_flight = Some(hash);
        });
    }

    /// Remembers the resourceVersion the operator's own write of a derived Secret produced
    /// (`None` when the write failed), and that the write is no longer in flight.
    pub fn record_own_write(&self, key: &ConnectionKey, secret: &str, resource_version: Option<String>) {
        self.update(key, |memory| {
            let write = own_write_of(memory, secret);
            if resource_version.is_some() {
                write.resource_version = resource_version;
            }
            write.data_hash_in_flight = None;
        });
    }

    /// Whether this watch event is the operator's own write of the Secret: the
    /// resourceVersion it produced, or the data hash of a write whose answer has not come yet.
    /// Own writes carry the connection as their controller owner.
    fn is_own_write(&self, secret: &PartialObjectMeta<Secret>) -> bool {
        let namespace = secret.namespace().unwrap_or_default();
        let name = secret.name_any();
        controller_owners(secret).any(|owner| {
            let Some(write) = self.own_write(&connection_key(namespace.as_str(), owner)) else {
                return false;
            };
            let version = secret.resource_version();
            let hash = secret.annotations().get(DATA_HASH);
            write.secret == name
                && ((version.is_some() && write.resource_version == version)
                    || (hash.is_some() && write.data_hash_in_flight.as_ref() == hash))
        })
    }

    /// The connections to reconcile when `secret` changed: its controller owner, and every
    /// connection of the store (`connections`, the controller's reflector) that reads it or
    /// wants to write a Secret of that name. Nothing for the operator's own write.
    ///
    /// `connections` is asked only when the change is not the operator's own write: a copy
    /// of the store for each of the cold start's own writes made it quadratic.
    pub fn connections_affected_by(
        &self,
        secret: &PartialObjectMeta<Secret>,
        connections: impl FnOnce() -> Vec<Arc<TasklistConnection>>,
    ) -> Vec<ObjectRef<TasklistConnection>> {
        if self.is_own_write(secret) {
            return Vec::new();
        }
        let connections = connections();
        let namespace = secret.namespace().unwrap_or_default();
        let name = secret.name_any();
        let mut affected: Vec<ObjectRef<TasklistConnection>> = controller_owners(secret)
            .map(|owner| ObjectRef::new(owner).within(&namespace))
            .collect();
        let users = connections
            .iter()
            // Nothing allocated per connection: this runs for every connection at each change.
            .filter(|connection| connection.metadata.namespace.as_deref() == Some(namespace.as_str()))
            .filter(|connection| connection.has_secret_name(&name) || reads_secret(connection, &name))
            .map(|connection| ObjectRef::new(&connection.name_any()).within(&namespace));
        for user in users {
            if !affected.contains(&user) {
                affected.push(user);
            }
        }
        affected
    }
}

/// The own-write record of `memory` for `secret`, started afresh when it was about another
/// Secret (the connection's `secretName` changed).
fn own_write_of<'m>(memory: &'m mut ConnectionMemory, secret: &str) -> &'m mut OwnWrite {
    let write = memory.own_write.get_or_insert_with(OwnWrite::default);
    if write.secret != secret {
        *write = OwnWrite {
            secret: secret.to_owned(),
            ..OwnWrite::default()
        };
    }
    write
}

/// The names of the TasklistConnections that are `secret`'s controller owner.
fn controller_owners(secret: &PartialObjectMeta<Secret>) -> impl Iterator<Item = &str> {
    secret
        .owner_references()
        .iter()
        .filter(|owner| owner.controller == Some(true) && owner.kind == "TasklistConnection")
        .map(|owner| owner.name.as_str())
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

    fn key() -> ConnectionKey {
        connection_key("team-a", "orders")
    }

    #[test]
    fn the_watch_event_of_an_own_write_wakes_nothing_even_before_the_write_answered() {
        let memory = Memory::default();
        memory.record_write_in_flight(&key(), "orders-tasklist-auth", Some("h2".into()));
        // The event arrives before the write's answer: recognised by its data hash, without
        // a look at the store.
        let unread = || -> Vec<Arc<TasklistConnection>> { unreachable!("the store is not read for an own write") };
        assert!(memory.connections_affected_by(&event("7", "h2"), unread).is_empty());
        // A change carrying other data (a hand edit of an earlier version) wakes the owner.
        assert_eq!(memory.connections_affected_by(&event("8", "h1"), Vec::new).len(), 1);
        memory.record_own_write(&key(), "orders-tasklist-auth", Some("7".into()));
        // The event arrives after the answer: recognised by its resourceVersion.
        assert!(memory.connections_affected_by(&event("7", "h2"), unread).is_empty());
        // Anything later wakes the owner.
        assert_eq!(memory.connections_affected_by(&event("9", "h2"), Vec::new).len(), 1);
        // A forgotten connection's writes are forgotten with it.
        memory.forget(&key());
        assert_eq!(memory.connections_affected_by(&event("7", "h2"), Vec::new).len(), 1);
    }

    fn connection(namespace: &str, name: &str, client_secret: &str) -> Arc<TasklistConnection> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"url": "https://t.example", "auth": {"oauth2": {
                    "tokenUrl": "https://login.example/oauth/token", "clientSecretRef": {"name": client_secret}}}},
            }))
            .expect("a valid connection"),
        )
    }

    fn changed(namespace: &str, name: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                resource_version: Some("1".into()),
                ..ObjectMeta::default()
            },
            _phantom: Default::default(),
        }
    }

    #[test]
    fn a_changed_secret_wakes_the_connections_of_the_store_that_read_it_in_its_namespace() {
        let memory = Memory::default();
        let store = [
            connection("team-a", "orders", "client"),
            connection("team-a", "billing", "client"),
            connection("team-a", "other", "another-client"),
            connection("team-b", "orders", "client"),
        ];
        let mut woken: Vec<String> = memory
            .connections_affected_by(&changed("team-a", "client"), || store.to_vec())
            .into_iter()
            .map(|reference| reference.name)
            .collect();
        woken.sort();
        assert_eq!(woken, ["billing", "orders"]);
        // A Secret taking the derived name (a conflict resolving) wakes the connection too.
        let woken = memory.connections_affected_by(&changed("team-a", "other-tasklist-auth"), || store.to_vec());
        assert_eq!(woken.len(), 1);
        assert_eq!(woken[0].name, "other");
        assert!(
            memory
                .connections_affected_by(&changed("team-c", "client"), || store.to_vec())
                .is_empty()
        );
    }
}

#[cfg(test)]
mod sizes {
    use std::mem::size_of;

    /// What every connection costs in the maps and stores that keep it for the operator's
    /// lifetime, before any string: issue 22's breakdown (docs/performance.md) found 624
    /// bytes of memory, 192 of record and 1,368 of connection per entry, mostly records of
    /// failures that most connections never have and spec parts they do not use. The rare
    /// parts are boxed; this keeps them so.
    #[test]
    fn what_each_connection_keeps_stays_small() {
        assert!(
            size_of::<super::ConnectionMemory>() <= 280,
            "{}",
            size_of::<super::ConnectionMemory>()
        );
        assert!(size_of::<super::super::derived_record::DerivedRecord>() <= 176);
        assert!(
            size_of::<crate::crd::TasklistConnection>() <= 720,
            "{}",
            size_of::<crate::crd::TasklistConnection>()
        );
        assert!(size_of::<crate::crd::AuthSpec>() <= 24);
        assert_eq!(size_of::<super::ConnectionKey>(), size_of::<usize>(), "a shared pointer");
    }
}
