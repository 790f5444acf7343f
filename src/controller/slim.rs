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
//! Both are dropped before an object enters the store (the Secrets' metadata is kept as a
//! summary of its own: `secret_index`). Everything reconcile reads stays:
//! spec, status (the last credential's times and conditions), labels, the other
//! annotations (the refresh annotation, and the annotation predicate), uid, generation and
//! resourceVersion.

use crate::crd::TasklistConnection;

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

/// No managed fields and no `kubectl apply` copy of the whole object.
fn slim_metadata(metadata: &mut kube::api::ObjectMeta) {
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
}
