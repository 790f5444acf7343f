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
//! Both are dropped before an object enters the store (and the Secret caches). Everything reconcile reads stays:
//! spec, status (the last credential's times and conditions), labels, the other
//! annotations (the refresh annotation, and the annotation predicate), uid, generation and
//! resourceVersion.

use k8s_openapi::api::core::v1::Secret;

use crate::crd::TasklistConnection;
use crate::derived_secret::{DATA_HASH, MANAGED_BY_LABEL, is_owned_by};
use crate::inputs::ALLOW_REFERENCE_LABEL;

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
/// and whether it opted in to being referenced (`--require-secret-opt-in`). The other
/// labels and annotations are read from the labelled store of the operator's own Secrets,
/// never from this one, which holds every Secret of the watched namespaces.
pub fn slim_secret_metadata(metadata: &mut kube::api::ObjectMeta) {
    slim_metadata(metadata);
    if let Some(labels) = metadata.labels.as_mut() {
        labels.retain(|key, _| key == ALLOW_REFERENCE_LABEL);
    }
    if metadata.labels.as_ref().is_some_and(|labels| labels.is_empty()) {
        metadata.labels = None;
    }
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.retain(|key, _| key == DATA_HASH);
    }
}

/// What the store of labelled Secrets keeps of `secret`: whole (less [`slim_metadata`]) only
/// when it is the derived Secret of `owner`, a connection this process knows (found by the
/// Secret's namespace and the name in its controller reference, then checked by uid and by
/// the connection's derived Secret name). Anyone can put the operator's label on a Secret
/// of their own: such a Secret keeps its name, versions and owners, nothing else, so that
/// labelling large Secrets cannot grow the operator's memory.
pub fn keep_whole_only_if_derived(secret: &mut Secret, owner: impl FnOnce(&str, &str) -> Option<std::sync::Arc<TasklistConnection>>) {
    slim_metadata(&mut secret.metadata);
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let controller = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|reference| reference.controller == Some(true) && reference.kind == "TasklistConnection")
        .map(|reference| reference.name.clone());
    let derived = controller.and_then(|name| owner(&namespace, &name)).is_some_and(|connection| {
        is_owned_by(secret, &connection) && secret.metadata.name.as_deref() == Some(connection.secret_name().as_str())
    });
    if !derived {
        secret.data = None;
        secret.string_data = None;
        secret.type_ = None;
        secret.metadata.annotations = None;
        if let Some(labels) = secret.metadata.labels.as_mut() {
            labels.retain(|key, _| key == MANAGED_BY_LABEL);
        }
    }
}

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

    fn labelled_secret(name: &str, owner: Option<(&str, &str)>) -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": name, "namespace": "apps", "resourceVersion": "7",
                "labels": {MANAGED_BY_LABEL: "tasklist-operator", "big": "x"},
                "annotations": {"note": "y".repeat(1000), DATA_HASH: "h"},
                "ownerReferences": owner.map(|(owner, uid)| vec![json!({
                    "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
                    "name": owner, "uid": uid, "controller": true})]).unwrap_or_default(),
            },
            "data": {"token": "AAAA"},
        }))
        .expect("a Secret")
    }

    #[test]
    fn only_the_derived_secret_of_a_known_connection_is_kept_whole() {
        let known = std::sync::Arc::new(connection(json!({})));
        let lookup = |namespace: &str, name: &str| (namespace == "apps" && name == "orders").then(|| known.clone());

        let mut derived = labelled_secret("orders-tasklist-auth", Some(("orders", "u-1")));
        keep_whole_only_if_derived(&mut derived, lookup);
        assert!(derived.data.is_some(), "the derived Secret of a known connection stays whole");
        assert!(derived.metadata.annotations.is_some());

        for (name, owner) in [
            ("anything", None),
            // The right owner name, another uid (a forged or stale reference).
            ("orders-tasklist-auth", Some(("orders", "u-other"))),
            // The known owner, but not its derived Secret's name.
            ("second-copy", Some(("orders", "u-1"))),
            // An owner this process does not know.
            ("billing-tasklist-auth", Some(("billing", "u-2"))),
        ] {
            let mut foreign = labelled_secret(name, owner);
            keep_whole_only_if_derived(&mut foreign, lookup);
            assert_eq!(foreign.data, None, "{name}");
            assert_eq!(foreign.metadata.annotations, None, "{name}");
            assert_eq!(foreign.metadata.labels.as_ref().map(|labels| labels.len()), Some(1), "{name}");
            assert_eq!(foreign.metadata.resource_version.as_deref(), Some("7"), "{name}: versions stay");
        }
    }
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
            "annotations": {DATA_HASH: "abc", "tasklist.camunda.community/inputs": "f00"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "orders", "uid": "c1", "controller": true}],
            "managedFields": [{"manager": "kubectl"}],
        }))
        .unwrap();
        slim_secret_metadata(&mut metadata);
        assert_eq!(metadata.labels, None);
        assert_eq!(
            metadata.annotations.unwrap().into_iter().collect::<Vec<_>>(),
            vec![(DATA_HASH.to_owned(), "abc".to_owned())]
        );
        assert_eq!(
            (metadata.uid.as_deref(), metadata.resource_version.as_deref()),
            (Some("u1"), Some("42"))
        );
        assert_eq!(metadata.owner_references.map(|owners| owners.len()), Some(1));
        assert_eq!(metadata.managed_fields, None);

        // The opt-in label stays, alone.
        let mut opted_in: kube::api::ObjectMeta = serde_json::from_value(json!({
            "name": "client", "labels": {ALLOW_REFERENCE_LABEL: "true", "team": "orders"},
        }))
        .unwrap();
        slim_secret_metadata(&mut opted_in);
        assert_eq!(
            opted_in.labels.unwrap().into_iter().collect::<Vec<_>>(),
            vec![(ALLOW_REFERENCE_LABEL.to_owned(), "true".to_owned())]
        );
    }
}
