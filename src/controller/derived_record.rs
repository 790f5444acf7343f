//! What the operator keeps of each derived Secret: a compact record per connection, not the
//! Secret.
//!
//! Every Secret of the watched namespaces is watched by metadata only (`SecretCaches`):
//! name, uid, resourceVersion, owners and the data-hash annotation. For the derived Secret
//! of a connection this process handles, [`DerivedRecord`] adds what the decisions and the
//! probe need: the stored credential (its bytes once, its issue, expiry and refresh times,
//! and the fingerprint of its inputs), at the resourceVersion it was written or read at.
//! The record comes from what this process wrote itself, or from one GET of the Secret when
//! the version the metadata watch shows is not the recorded one (after a start, or when
//! someone else changed it). Nothing else of the Secret is kept: a write GETs it first
//! ([`whole_for_write`]), so that the patch sees its keys, labels and owners as they are.
//!
//! A Secret labelled as the operator's by someone else is then just a Secret: the metadata
//! watch keeps its versions and owners, and no watch transfers its data.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta};

use super::Error;
use super::memory::ConnectionKey;
use crate::crd::TasklistConnection;
use crate::derived_secret::{StoredCredential, is_owned_by};
use crate::machinery::lock::lock;

/// The derived Secret of one connection as this process last wrote or read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedRecord {
    /// The Secret's name (a connection's `secretName` can change).
    pub secret: String,
    /// The resourceVersion the record is of.
    pub resource_version: String,
    /// The credential the Secret holds, checked against its data-hash annotation.
    pub stored: StoredCredential,
}

/// The records of the connections this process handles (so, with sharding, its own share).
#[derive(Default)]
pub struct DerivedRecords {
    // Boxed, like the connections' memory: an empty slot of the table costs a pointer.
    records: Mutex<HashMap<ConnectionKey, Box<DerivedRecord>>>,
}

impl DerivedRecords {
    /// The record of `key`'s Secret `secret`, if there is one of that Secret.
    pub fn get(&self, key: &ConnectionKey, secret: &str) -> Option<DerivedRecord> {
        let records = lock(&self.records, "the derived Secrets' records");
        records
            .get(key)
            .filter(|record| record.secret == secret)
            .map(|record| record.as_ref().clone())
    }

    /// Records what was read or written: `secret`, a whole Secret from the API server, when
    /// `connection` owns it and it holds a usable credential; otherwise the record goes.
    pub fn remember(&self, key: &ConnectionKey, connection: &TasklistConnection, secret: Option<&Secret>) {
        self.keep(key, secret.and_then(|secret| record_of(connection, secret)));
    }

    /// Records this process's own write: `written` as the API server answered it, holding
    /// `stored`. The record shares `stored`'s values (one copy of a client's token for all
    /// its connections) instead of reading them back from the Secret's data.
    pub fn remember_write(&self, key: &ConnectionKey, connection: &TasklistConnection, written: &Secret, stored: &StoredCredential) {
        let record = is_owned_by(written, connection).then(|| record_at(written, stored.clone()));
        self.keep(key, record.flatten());
    }

    fn keep(&self, key: &ConnectionKey, record: Option<DerivedRecord>) {
        let mut records = lock(&self.records, "the derived Secrets' records");
        match record {
            Some(record) => records.insert(key.clone(), Box::new(record)),
            None => records.remove(key),
        };
    }

    pub fn forget(&self, key: &ConnectionKey) {
        lock(&self.records, "the derived Secrets' records").remove(key);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.records, "the derived Secrets' records").len()
    }
}

/// The record of `secret`, a whole Secret as the API server returned it: only when
/// `connection` owns it, it has a resourceVersion, and its data is what the operator wrote.
fn record_of(connection: &TasklistConnection, secret: &Secret) -> Option<DerivedRecord> {
    if !is_owned_by(secret, connection) {
        return None;
    }
    record_at(secret, StoredCredential::from_secret(secret).ok()?)
}

/// The record of `stored` in `secret`, at the Secret's resourceVersion.
fn record_at(secret: &Secret, stored: StoredCredential) -> Option<DerivedRecord> {
    Some(DerivedRecord {
        secret: secret.metadata.name.clone()?,
        resource_version: secret.metadata.resource_version.clone()?,
        stored,
    })
}

/// The derived Secret as the decisions see it, rebuilt from `record` and from what the
/// metadata watch knows of it (`metadata`: name, resourceVersion, owners): its data and the
/// operator's annotations are those [`StoredCredential::to_secret`] makes of the record, so
/// that [`StoredCredential::from_secret`] gives the record's credential back. A rebuilt
/// Secret has no uid (every Secret the API server returns has one): see [`is_rebuilt`].
pub fn rebuilt(record: &DerivedRecord, connection: &TasklistConnection, metadata: &ObjectMeta) -> Secret {
    let mut secret = record.stored.to_secret(connection);
    secret.metadata = ObjectMeta {
        name: metadata.name.clone(),
        namespace: metadata.namespace.clone(),
        resource_version: metadata.resource_version.clone(),
        owner_references: metadata.owner_references.clone(),
        labels: secret.metadata.labels,
        annotations: secret.metadata.annotations,
        ..ObjectMeta::default()
    };
    secret
}

/// Whether `secret` was rebuilt from a record rather than returned by the API server.
pub fn is_rebuilt(secret: &Secret) -> bool {
    secret.metadata.uid.is_none()
}

/// What a write of the derived Secret is checked against: `checked` as it is, unless it was
/// rebuilt from a record; then the Secret as the API server has it, which must still be at
/// the version the decision was made on (otherwise someone changed or deleted it meanwhile,
/// and it is not overwritten: the next reconcile looks again).
pub async fn whole_for_write(api: &Api<Secret>, checked: Option<Secret>) -> Result<Option<Secret>, Error> {
    let checked = match checked {
        Some(checked) if is_rebuilt(&checked) => checked,
        whole_or_none => return Ok(whole_or_none),
    };
    let name = checked.metadata.name.clone().unwrap_or_default();
    let current = api.get_opt(&name).await?;
    match current {
        Some(current) if current.metadata.resource_version == checked.metadata.resource_version => Ok(Some(current)),
        _ => Err(Error::SecretChangedMeanwhile(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::camunda::Sensitive;
    use crate::credential::Credential;
    use jiff::Timestamp;
    use kube::Resource;

    fn connection() -> TasklistConnection {
        let mut connection: TasklistConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
            "metadata": {"name": "orders", "namespace": "apps", "uid": "u-1"},
            "spec": {"url": "https://t.example", "auth": {"oauth2": {
                "tokenUrl": "https://login.example/oauth/token", "clientSecretRef": {"name": "orders-client"}}},
                "secretTemplate": {"keys": {"access-token": "token"}, "labels": {"team": "orders"}}},
        }))
        .expect("a connection");
        connection.metadata.resource_version = Some("3".into());
        connection
    }

    fn stored() -> StoredCredential {
        StoredCredential {
            credential: Credential::Bearer(Sensitive::new("eyJ.token.sig")),
            issued_at: Timestamp::from_second(1_000).expect("a time"),
            expires_at: Timestamp::from_second(4_600).expect("a time"),
            refresh_at: Timestamp::from_second(3_880).expect("a time"),
            inputs: "fingerprint".into(),
        }
    }

    /// The Secret as the API server returns it after the operator wrote `stored()`.
    fn written(connection: &TasklistConnection) -> Secret {
        let mut secret = stored().to_secret(connection);
        secret.metadata.uid = Some("s-1".into());
        secret.metadata.resource_version = Some("21".into());
        secret
    }

    fn key() -> ConnectionKey {
        super::super::memory::connection_key("apps", "orders")
    }

    #[test]
    fn a_written_secret_is_recorded_and_rebuilt_into_the_same_credential() {
        let connection = connection();
        let records = DerivedRecords::default();
        let secret = written(&connection);
        records.remember(&key(), &connection, Some(&secret));
        let record = records.get(&key(), "orders-tasklist-auth").expect("a record");
        assert_eq!((record.resource_version.as_str(), &record.stored), ("21", &stored()));
        assert_eq!(records.get(&key(), "another-name"), None, "a record is of one Secret name");

        let rebuilt = rebuilt(&record, &connection, &secret.metadata);
        assert!(is_rebuilt(&rebuilt));
        assert!(!is_rebuilt(&secret));
        assert_eq!(StoredCredential::from_secret(&rebuilt), Ok(stored()));
        assert!(is_owned_by(&rebuilt, &connection));
        assert_eq!(rebuilt.metadata.resource_version.as_deref(), Some("21"));
    }

    #[test]
    fn the_owners_of_a_rebuilt_secret_are_those_the_watch_saw() {
        let connection = connection();
        let records = DerivedRecords::default();
        records.remember(&key(), &connection, Some(&written(&connection)));
        let record = records.get(&key(), "orders-tasklist-auth").expect("a record");
        let mut seen = written(&connection).metadata;
        seen.owner_references = None;
        assert!(!is_owned_by(&rebuilt(&record, &connection, &seen), &connection));
    }

    #[test]
    fn no_record_of_a_secret_that_is_not_ours_or_not_usable() {
        let connection = connection();
        let records = DerivedRecords::default();
        records.remember(&key(), &connection, Some(&written(&connection)));

        let mut edited = written(&connection);
        if let Some(data) = edited.data.as_mut() {
            data.insert("token".into(), k8s_openapi::ByteString(b"edited".to_vec()));
        }
        records.remember(&key(), &connection, Some(&edited));
        assert_eq!(records.len(), 0, "an edited Secret replaces the record with none");

        records.remember(&key(), &connection, Some(&written(&connection)));
        let mut foreign = written(&connection);
        foreign.metadata.owner_references = None;
        records.remember(&key(), &connection, Some(&foreign));
        assert_eq!(records.len(), 0, "someone else's Secret");

        records.remember(&key(), &connection, Some(&written(&connection)));
        records.remember(&key(), &connection, None);
        assert_eq!(records.len(), 0, "a deleted Secret");

        records.remember(&key(), &connection, Some(&written(&connection)));
        records.forget(&key());
        assert_eq!(records.len(), 0);
        assert!(connection.meta().uid.is_some());
    }
}
