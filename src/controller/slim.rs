//! What the connection store keeps of each TasklistConnection.
//!
//! The reflector holds every watched connection for the operator's lifetime, so whatever
//! it keeps costs memory times the number of connections. Two parts of an object are never
//! read by the operator and are often the largest:
//! - `metadata.managedFields`: the server-side apply bookkeeping of every writer (the
//!   user's tool and the operator's own status apply), about 1 KB per connection;
//! - the annotation `kubectl.kubernetes.io/last-applied-configuration`: a second copy of
//!   the object as `kubectl apply` last sent it.
//!
//! Both are dropped before an object enters the store (and the Secret metadata store). Everything reconcile reads stays:
//! spec, status (the last credential's times and conditions), labels, the other
//! annotations (the refresh annotation, and the annotation predicate), uid, generation and
//! resourceVersion.

use crate::crd::TasklistConnection;
use crate::derived_secret::DATA_HASH;
use crate::inputs::ALLOW_REFERENCE_LABEL;
use crate::shard::Sharding;

/// The annotation `kubectl apply` keeps its last input in.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops from `connection` what the operator never reads (see the module docs).
pub fn slim_connection(connection: &mut TasklistConnection) {
    slim_metadata(&mut connection.metadata);
    if connection
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| annotations.is_empty())
    {
        connection.metadata.annotations = None;
    }
}

/// What the metadata store of every Secret keeps: what tells which version a Secret is at,
/// who owns it, whether a change is this process's own write (the data-hash annotation),
/// and whether it opted in to being referenced (`--require-secret-opt-in`). This store holds
/// every Secret of the watched namespaces; what the decisions need beyond it of a
/// connection's own derived Secret is its compact record (`derived_record`).
///
/// Anyone can put the data-hash annotation on a Secret: only a value of a SHA-256's length
/// is kept. With sharding, a Secret whose controller is a connection of another shard keeps
/// its versions and owners only (its data hash tells this process nothing).
pub fn slim_secret_metadata(metadata: &mut kube::api::ObjectMeta, sharding: &Sharding) {
    slim_metadata(metadata);
    let namespace = metadata.namespace.as_deref().unwrap_or_default();
    let another_shards = metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true) && owner.kind == "TasklistConnection")
        .is_some_and(|owner| !sharding.owns(namespace, &owner.name));
    if let Some(labels) = metadata.labels.as_mut() {
        labels.retain(|key, _| key == ALLOW_REFERENCE_LABEL);
    }
    if metadata.labels.as_ref().is_some_and(|labels| labels.is_empty()) {
        metadata.labels = None;
    }
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.retain(|key, value| key == DATA_HASH && value.len() == DATA_HASH_LENGTH && !another_shards);
    }
    if metadata.annotations.as_ref().is_some_and(|annotations| annotations.is_empty()) {
        metadata.annotations = None;
    }
}

/// The length of the data-hash annotation's value: SHA-256 in hex.
const DATA_HASH_LENGTH: usize = 64;

/// What the Secret caches keep too: no managed fields and no `kubectl apply` copy of the
/// whole object (which, for a Secret applied with kubectl, holds its data).
pub fn slim_metadata(metadata: &mut kube::api::ObjectMeta) {
    metadata.managed_fields = None;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::crd::REFRESH_ANNOTATION;
    use serde_json::json;

    fn connection(annotations: serde_json::Value) -> TasklistConnection {
        serde_json::from_value(json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
            "metadata": {
                "name": "orders", "namespace": "apps", "uid": "u-1", "generation": 3, "resourceVersion": "42",
                "labels": {"team": "orders"},
                "annotations": annotations,
                "managedFields": [
                    {"manager": "kubectl", "operation": "Apply", "apiVersion": "tasklist.camunda.community/v1alpha1",
                     "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:url": {}}}},
                    {"manager": "tasklist-operator", "operation": "Apply", "subresource": "status",
                     "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:expiresAt": {}}}},
                ],
            },
            "spec": {"url": "https://t.example", "auth": {"oauth2": {
                "tokenUrl": "https://login.example/oauth/token", "clientSecretRef": {"name": "orders-client"}}}},
            "status": {"observedGeneration": 3, "secretName": "orders-tasklist-auth", "authMethod": "oauth2",
                       "expiresAt": "2026-11-22T10:00:00Z"},
        }))
        .expect("a valid connection")
    }

    #[test]
    fn managed_fields_and_the_last_applied_copy_are_dropped() {
        let mut slim = connection(json!({LAST_APPLIED_ANNOTATION: "{\"spec\":{}}", REFRESH_ANNOTATION: "1"}));
        let before = serde_json::to_vec(&slim).expect("serializes").len();
        slim_connection(&mut slim);
        assert_eq!(slim.metadata.managed_fields, None);
        let annotations = slim.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.len(), 1, "{annotations:?}");
        assert_eq!(slim.refresh_request(), Some("1"), "the refresh annotation is read; it stays");
        assert!(serde_json::to_vec(&slim).expect("serializes").len() < before);
    }

    #[test]
    fn everything_reconcile_reads_stays() {
        let full = connection(json!({REFRESH_ANNOTATION: "now"}));
        let mut slim = full.clone();
        slim_connection(&mut slim);
        assert_eq!(slim.spec, full.spec);
        assert_eq!(slim.status, full.status, "status holds the last credential's times: it stays");
        assert_eq!(slim.metadata.labels, full.metadata.labels);
        assert_eq!(slim.metadata.annotations, full.metadata.annotations);
        assert_eq!(slim.metadata.uid, full.metadata.uid);
        assert_eq!(slim.metadata.generation, full.metadata.generation);
        assert_eq!(slim.metadata.resource_version, full.metadata.resource_version);
        assert_eq!(
            (slim.metadata.name, slim.metadata.namespace),
            (full.metadata.name, full.metadata.namespace)
        );
    }

    #[test]
    fn only_the_last_applied_annotation_leaves_none() {
        let mut slim = connection(json!({LAST_APPLIED_ANNOTATION: "{}"}));
        slim_connection(&mut slim);
        assert_eq!(slim.metadata.annotations, None);
        let mut without = connection(serde_json::Value::Null);
        slim_connection(&mut without);
        assert_eq!(without.metadata.annotations, None);
    }

    #[test]
    fn the_metadata_store_keeps_versions_owners_the_data_hash_and_the_opt_in_label_only() {
        let mut metadata: kube::api::ObjectMeta = serde_json::from_value(json!({
            "name": "orders-tasklist-auth", "uid": "u1", "resourceVersion": "42",
            "labels": {"app.kubernetes.io/managed-by": "tasklist-operator"},
            "annotations": {DATA_HASH: "a".repeat(64), "tasklist.camunda.community/inputs": "f00"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "TasklistConnection", "name": "orders", "uid": "c1", "controller": true}],
            "managedFields": [{"manager": "kubectl"}],
        }))
        .unwrap();
        let other_shard_copy = metadata.clone();
        let forged_copy = metadata.clone();
        slim_secret_metadata(&mut metadata, &Sharding::default());
        assert_eq!(metadata.labels, None);
        assert_eq!(
            metadata.annotations.unwrap().into_iter().collect::<Vec<_>>(),
            vec![(DATA_HASH.to_owned(), "a".repeat(64))]
        );
        assert_eq!(
            (metadata.uid.as_deref(), metadata.resource_version.as_deref()),
            (Some("u1"), Some("42"))
        );
        assert_eq!(metadata.owner_references.map(|owners| owners.len()), Some(1));
        assert_eq!(metadata.managed_fields, None);

        // Owned by a connection of another shard: versions and owners only.
        let owner_shard = crate::shard::shard_of("", "orders", 2);
        let mut other_shard = other_shard_copy;
        slim_secret_metadata(&mut other_shard, &Sharding::new(1 - owner_shard, 2, None).expect("a shard"));
        assert_eq!(other_shard.annotations, None);
        assert_eq!(other_shard.owner_references.map(|owners| owners.len()), Some(1));
        assert_eq!(other_shard.resource_version.as_deref(), Some("42"));
        let mut own_shard = forged_copy.clone();
        slim_secret_metadata(&mut own_shard, &Sharding::new(owner_shard, 2, None).expect("a shard"));
        assert!(own_shard.annotations.is_some());

        // A data hash of any other length is not one the operator wrote: dropped.
        let mut forged = forged_copy;
        forged.annotations = Some([(DATA_HASH.to_owned(), "x".repeat(200_000))].into());
        slim_secret_metadata(&mut forged, &Sharding::default());
        assert_eq!(forged.annotations, None);

        // The opt-in label stays, alone.
        let mut opted_in: kube::api::ObjectMeta = serde_json::from_value(json!({
            "name": "client", "labels": {ALLOW_REFERENCE_LABEL: "true", "team": "orders"},
        }))
        .unwrap();
        slim_secret_metadata(&mut opted_in, &Sharding::default());
        assert_eq!(
            opted_in.labels.unwrap().into_iter().collect::<Vec<_>>(),
            vec![(ALLOW_REFERENCE_LABEL.to_owned(), "true".to_owned())]
        );
    }
}
