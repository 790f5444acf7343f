//! The Secret the operator writes for a connection: its keys are the contract's, and its
//! annotations let a later reconcile (or a restarted operator) decide whether the stored
//! credential can be kept.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::api::ObjectMeta;
use sha2::{Digest, Sha256};

use crate::camunda::Sensitive;
use crate::camunda::login::Session;
use crate::crd::{OPERATOR_ANNOTATION_PREFIX, STANDARD_SECRET_KEYS, SecretTemplate, TasklistConnection};
use crate::credential::Credential;
use crate::time::{NEVER, parse_rfc3339, rfc3339};

pub use crate::crd::MANAGED_BY_LABEL;
pub const MANAGED_BY_VALUE: &str = "tasklist-operator";
pub const ISSUED_AT: &str = "tasklist.camunda.community/issued-at";
/// When the operator plans to replace the stored credential (RFC 3339).
pub const REFRESH_AT: &str = "tasklist.camunda.community/refresh-at";
/// Fingerprint of what the credential was made from (spec, referenced Secrets' versions,
/// refresh annotation); it holds no credential material.
const INPUTS: &str = "tasklist.camunda.community/inputs";
/// SHA-256 of the data as the operator wrote it: a hand edit shows as a mismatch.
pub const DATA_HASH: &str = "tasklist.camunda.community/data-hash";
/// The label keys `spec.secretTemplate` set, comma-separated (absent: none).
const TEMPLATE_LABELS: &str = "tasklist.camunda.community/template-labels";
/// The annotation keys `spec.secretTemplate` set, comma-separated (absent: none).
const TEMPLATE_ANNOTATIONS: &str = "tasklist.camunda.community/template-annotations";

/// A credential as kept in the derived Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredential {
    pub credential: Credential,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub refresh_at: Timestamp,
    pub inputs: String,
}

/// Why a Secret's content cannot be used as a stored credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// Keys or annotations are missing or malformed.
    Incomplete,
    /// The data differs from what the operator wrote.
    EditedByHand,
}

impl StoredCredential {
    /// The Secret's data, with the contract's keys.
    pub fn secret_data(&self, url: &str) -> BTreeMap<String, String> {
        let mut data = BTreeMap::new();
        match &self.credential {
            Credential::Bearer(token) => {
                data.insert("token".into(), token.expose().to_owned());
                data.insert("authorization".into(), format!("Bearer {}", token.expose()));
            }
            Credential::Session(session) => {
                data.insert("cookie".into(), session.cookie_header().expose().to_owned());
                if let Some(csrf) = &session.csrf_token {
                    data.insert("csrfToken".into(), csrf.expose().to_owned());
                }
            }
            Credential::Basic(authorization) => {
                data.insert("authorization".into(), authorization.expose().to_owned());
            }
        }
        if self.expires_at != NEVER {
            data.insert("expiresAt".into(), rfc3339(self.expires_at));
        }
        data.insert("url".into(), url.to_owned());
        data
    }

    /// The whole Secret to apply for `connection`, shaped by its `secretTemplate`.
    pub fn to_secret(&self, connection: &TasklistConnection) -> Secret {
        let template = connection.spec.secret_template.clone().unwrap_or_default();
        let data = with_extra_keys(self.secret_data(&connection.spec.url), &template);
        let ours = BTreeMap::from([
            (ISSUED_AT.to_owned(), rfc3339(self.issued_at)),
            (REFRESH_AT.to_owned(), self.refresh_at.to_string()),
            (INPUTS.to_owned(), self.inputs.clone()),
            (DATA_HASH.to_owned(), data_hash(&data)),
        ]);
        let (labels, annotations) = template_metadata(&template, ours);
        let mut owner = connection.controller_owner_ref(&());
        if let Some(owner) = owner.as_mut() {
            // Blocking owner deletion would need extra RBAC on the connection's finalizers.
            owner.block_owner_deletion = None;
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(connection.secret_name()),
                namespace: connection.metadata.namespace.clone(),
                labels: Some(labels),
                annotations: Some(annotations),
                owner_references: owner.map(|owner| vec![owner]),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data.into_iter().map(|(key, value)| (key, ByteString(value.into_bytes()))).collect()),
            ..Secret::default()
        }
    }

    /// Reads back what [`StoredCredential::to_secret`] wrote.
    pub fn from_secret(secret: &Secret) -> Result<StoredCredential, Unusable> {
        let annotations = secret.metadata.annotations.as_ref().ok_or(Unusable::Incomplete)?;
        let annotation = |key: &str| annotations.get(key).ok_or(Unusable::Incomplete);
        let data: BTreeMap<String, String> = secret
            .data
            .iter()
            .flatten()
            .map(|(key, value)| Ok((key.clone(), String::from_utf8(value.0.clone()).map_err(|_| Unusable::EditedByHand)?)))
            .collect::<Result<_, Unusable>>()?;
        if data_hash(&data) != *annotation(DATA_HASH)? {
            return Err(Unusable::EditedByHand);
        }
        let credential = if let Some(token) = data.get("token") {
            Credential::Bearer(Sensitive::new(token.as_str()))
        } else if let Some(cookie) = data.get("cookie") {
            Credential::Session(Session::from_cookie_header(cookie, data.get("csrfToken").map(Sensitive::new)))
        } else if let Some(authorization) = data.get("authorization").filter(|value| value.starts_with("Basic ")) {
            Credential::Basic(Sensitive::new(authorization.as_str()))
        } else {
            return Err(Unusable::Incomplete);
        };
        let timestamp = |text: &str| parse_rfc3339(text).ok_or(Unusable::Incomplete);
        let expires_at = match (&credential, data.get("expiresAt")) {
            (Credential::Basic(_), None) => NEVER,
            (_, Some(text)) => timestamp(text)?,
            (_, None) => return Err(Unusable::Incomplete),
        };
        Ok(StoredCredential {
            credential,
            issued_at: timestamp(annotation(ISSUED_AT)?)?,
            expires_at,
            refresh_at: timestamp(annotation(REFRESH_AT)?)?,
            inputs: annotation(INPUTS)?.clone(),
        })
    }
}

/// Whether `connection` is the controller owner of `secret`. A Secret of that name owned
/// by anything else, or by nothing, is never overwritten.
pub fn is_owned_by(secret: &Secret, connection: &TasklistConnection) -> bool {
    let Some(uid) = connection.metadata.uid.as_deref() else {
        return false;
    };
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

/// The JSON merge patch that turns `checked`, a Secret we own as it was read, into
/// `desired`, and only if nobody changed it since: the patch carries the resourceVersion
/// that was read, so the API server refuses it (409) otherwise. Keys of ours that the new
/// credential no longer has are removed; labels, annotations and owner references that
/// others added are kept.
pub fn update_patch(desired: &Secret, checked: &Secret) -> serde_json::Value {
    let mut data = serde_json::Map::new();
    for key in checked.data.iter().flatten().map(|(key, _)| key) {
        data.insert(key.clone(), serde_json::Value::Null);
    }
    for (key, value) in desired.data.iter().flatten() {
        data.insert(key.clone(), serde_json::to_value(value).unwrap_or_default());
    }
    let ours: Vec<&str> = desired
        .metadata
        .owner_references
        .iter()
        .flatten()
        .map(|owner| owner.uid.as_str())
        .collect();
    let owners: Vec<_> = desired
        .metadata
        .owner_references
        .iter()
        .flatten()
        .chain(
            checked
                .metadata
                .owner_references
                .iter()
                .flatten()
                .filter(|owner| !ours.contains(&owner.uid.as_str())),
        )
        .collect();
    let removable_labels: Vec<&str> = recorded_keys(checked, TEMPLATE_LABELS).collect();
    let removable_annotations: Vec<&str> = recorded_keys(checked, TEMPLATE_ANNOTATIONS)
        .chain(
            checked
                .metadata
                .annotations
                .iter()
                .flatten()
                .map(|(key, _)| key.as_str())
                .filter(|key| key.starts_with(OPERATOR_ANNOTATION_PREFIX)),
        )
        .collect();
    serde_json::json!({
        "metadata": {
            "resourceVersion": checked.metadata.resource_version,
            "labels": metadata_patch(desired.metadata.labels.as_ref(), removable_labels),
            "annotations": metadata_patch(desired.metadata.annotations.as_ref(), removable_annotations),
            "ownerReferences": owners,
        },
        "type": desired.type_,
        "data": data,
    })
}

/// The contract's keys plus the template's extra keys, each a copy of the standard key it
/// names; an extra key whose source is absent (`token` with a session) is left out, and one
/// named like a standard key (the CRD refuses it) never replaces it.
fn with_extra_keys(mut data: BTreeMap<String, String>, template: &SecretTemplate) -> BTreeMap<String, String> {
    let extra: Vec<(String, String)> = template
        .keys
        .iter()
        .filter(|(name, _)| !STANDARD_SECRET_KEYS.contains(&name.as_str()))
        .filter_map(|(name, source)| Some((name.clone(), data.get(source)?.clone())))
        .collect();
    data.extend(extra);
    data
}

/// The Secret's labels and annotations: the template's, then the operator's own (its label
/// and `ours`), which always win.
fn template_metadata(
    template: &SecretTemplate,
    mut ours: BTreeMap<String, String>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut labels = template.labels.clone();
    labels.remove(MANAGED_BY_LABEL);
    let mut annotations: BTreeMap<String, String> = template
        .annotations
        .iter()
        .filter(|(key, _)| !key.starts_with(OPERATOR_ANNOTATION_PREFIX))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    // Which labels and annotations came from the template, so that a later write removes
    // those the template no longer has (a merge patch keeps what it does not mention).
    for (record, keys) in [(TEMPLATE_LABELS, labels.keys()), (TEMPLATE_ANNOTATIONS, annotations.keys())] {
        let keys: Vec<&str> = keys.map(String::as_str).collect();
        if !keys.is_empty() {
            ours.insert(record.to_owned(), keys.join(","));
        }
    }
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
    annotations.extend(ours);
    (labels, annotations)
}

/// The keys a `checked` Secret's record annotation lists (see [`template_metadata`]).
fn recorded_keys<'s>(checked: &'s Secret, record: &str) -> impl Iterator<Item = &'s str> {
    checked
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(record))
        .into_iter()
        .flat_map(|keys| keys.split(','))
        .filter(|key| !key.is_empty())
}

/// `desired` as a merge patch: each of `removable` (what the Secret has that is ours to
/// remove: recorded as the template's, or under the operator's own annotation prefix) that
/// `desired` lacks becomes `null`; labels and annotations others added are kept.
fn metadata_patch(desired: Option<&BTreeMap<String, String>>, removable: Vec<&str>) -> serde_json::Value {
    let desired = desired.cloned().unwrap_or_default();
    let mut patch = serde_json::Map::new();
    for key in removable.into_iter().filter(|key| !desired.contains_key(*key)) {
        patch.insert(key.to_owned(), serde_json::Value::Null);
    }
    for (key, value) in desired {
        patch.insert(key, serde_json::Value::String(value));
    }
    serde_json::Value::Object(patch)
}

fn data_hash(data: &BTreeMap<String, String>) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in data {
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::TasklistConnectionSpec;

    fn connection() -> TasklistConnection {
        let spec: TasklistConnectionSpec = serde_json::from_value(serde_json::json!({
            "url": "https://tasklist.example/abc",
            "auth": {"oauth2": {"tokenUrl": "https://login.example/oauth/token", "clientSecretRef": {"name": "client"}}}
        }))
        .unwrap();
        let mut connection = TasklistConnection::new("orders", spec);
        connection.metadata.namespace = Some("team-a".into());
        connection.metadata.uid = Some("uid-1".into());
        connection
    }

    fn bearer() -> StoredCredential {
        StoredCredential {
            credential: Credential::Bearer(Sensitive::new("eyJ.token.sig")),
            issued_at: Timestamp::from_second(1_000).unwrap(),
            expires_at: Timestamp::from_second(1_300).unwrap(),
            refresh_at: Timestamp::from_millisecond(1_240_250).unwrap(),
            inputs: "fingerprint".into(),
        }
    }

    #[test]
    fn oauth2_secret_has_the_contract_keys() {
        let data = bearer().secret_data("https://tasklist.example/abc");
        assert_eq!(data["token"], "eyJ.token.sig");
        assert_eq!(data["authorization"], "Bearer eyJ.token.sig");
        assert_eq!(data["expiresAt"], "1970-01-01T00:21:40Z");
        assert_eq!(data["url"], "https://tasklist.example/abc");
        assert_eq!(data.len(), 4);
    }

    #[test]
    fn cookie_secret_has_the_contract_keys() {
        let session = Session::new(
            vec![
                ("TASKLIST-SESSION".into(), Sensitive::new("s1")),
                ("X-CSRF-TOKEN".into(), Sensitive::new("c1")),
            ],
            Some(Sensitive::new("c1")),
        );
        let stored = StoredCredential {
            credential: Credential::Session(session),
            ..bearer()
        };
        let data = stored.secret_data("https://t");
        assert_eq!(data["cookie"], "TASKLIST-SESSION=s1; X-CSRF-TOKEN=c1");
        assert_eq!(data["csrfToken"], "c1");
        assert!(!data.contains_key("token"));
    }

    #[test]
    fn the_secret_is_owned_labelled_and_reads_back_the_same() {
        let connection = connection();
        let secret = bearer().to_secret(&connection);
        assert_eq!(secret.metadata.name.as_deref(), Some("orders-tasklist-auth"));
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        assert_eq!(secret.metadata.labels.as_ref().unwrap()[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert!(is_owned_by(&secret, &connection));
        assert_eq!(StoredCredential::from_secret(&secret), Ok(bearer()));

        let session = Session::new(vec![("TASKLIST-SESSION".into(), Sensitive::new("s1"))], None);
        let cookie = StoredCredential {
            credential: Credential::Session(session),
            ..bearer()
        };
        assert_eq!(StoredCredential::from_secret(&cookie.to_secret(&connection)), Ok(cookie));
    }

    #[test]
    fn a_basic_secret_has_authorization_and_url_only_and_reads_back_the_same() {
        let basic = StoredCredential {
            credential: Credential::Basic(Sensitive::new("Basic ZGVtbzpkZW1v")),
            expires_at: NEVER,
            refresh_at: NEVER,
            ..bearer()
        };
        let data = basic.secret_data("https://t");
        assert_eq!(data.len(), 2, "{:?}", data.keys());
        assert_eq!(data["authorization"], "Basic ZGVtbzpkZW1v");
        assert_eq!(data["url"], "https://t");
        assert_eq!(StoredCredential::from_secret(&basic.to_secret(&connection())), Ok(basic));
    }

    #[test]
    fn a_hand_edit_is_noticed() {
        let mut secret = bearer().to_secret(&connection());
        secret.data.as_mut().unwrap().insert("token".into(), ByteString(b"edited".to_vec()));
        assert_eq!(StoredCredential::from_secret(&secret), Err(Unusable::EditedByHand));
        secret.metadata.annotations = None;
        assert_eq!(StoredCredential::from_secret(&secret), Err(Unusable::Incomplete));
    }

    #[test]
    fn an_update_is_conditional_on_the_version_read_and_drops_keys_no_longer_written() {
        let connection = connection();
        let mut checked = bearer().to_secret(&connection);
        checked.metadata.resource_version = Some("42".into());
        checked
            .data
            .as_mut()
            .unwrap()
            .insert("csrfToken".into(), ByteString(b"old".to_vec()));
        let mut foreign_owner = checked.metadata.owner_references.as_ref().unwrap()[0].clone();
        foreign_owner.uid = "someone-else".into();
        foreign_owner.controller = None;
        checked.metadata.owner_references.as_mut().unwrap().push(foreign_owner);
        let desired = bearer().to_secret(&connection);

        let patch = update_patch(&desired, &checked);
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(patch["data"]["csrfToken"], serde_json::Value::Null);
        assert_eq!(patch["data"]["token"], serde_json::json!(ByteString(b"eyJ.token.sig".to_vec())));
        let owners = patch["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(owners.len(), 2, "{owners:?}");
        assert_eq!(owners[0]["uid"], "uid-1");
        assert_eq!(owners[0]["controller"], true);
        assert_eq!(owners[1]["uid"], "someone-else");
    }

    #[test]
    fn a_secret_owned_by_someone_else_is_not_ours() {
        let mut secret = bearer().to_secret(&connection());
        secret.metadata.owner_references.as_mut().unwrap()[0].uid = "other".into();
        assert!(!is_owned_by(&secret, &connection()));
        secret.metadata.owner_references = None;
        assert!(!is_owned_by(&secret, &connection()));
    }

    fn templated(template: serde_json::Value) -> TasklistConnection {
        let mut connection = connection();
        connection.spec.secret_template = Some(serde_json::from_value(template).unwrap());
        connection
    }

    #[test]
    fn the_template_adds_labels_annotations_and_extra_keys_and_reads_back_the_same() {
        let connection = templated(serde_json::json!({
            "labels": {"team": "orders", MANAGED_BY_LABEL: "someone-else"},
            "annotations": {"reloader.stakater.com/match": "true", "tasklist.camunda.community/issued-at": "forged"},
            "keys": {"CAMUNDA_OAUTH_TOKEN": "token", "TASKLIST_URL": "url", "CSRF": "csrfToken", "token": "url"},
        }));
        let secret = bearer().to_secret(&connection);
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "orders");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE, "the operator's label wins");
        let annotations = secret.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["reloader.stakater.com/match"], "true");
        assert_eq!(annotations[ISSUED_AT], "1970-01-01T00:16:40Z", "the operator's annotations win");
        let data: BTreeMap<String, String> = secret
            .data
            .iter()
            .flatten()
            .map(|(key, value)| (key.clone(), String::from_utf8(value.0.clone()).unwrap()))
            .collect();
        assert_eq!(data["CAMUNDA_OAUTH_TOKEN"], "eyJ.token.sig");
        assert_eq!(data["TASKLIST_URL"], "https://tasklist.example/abc");
        assert_eq!(data["token"], "eyJ.token.sig", "an extra key never replaces a standard one");
        assert!(!data.contains_key("CSRF"), "a bearer credential has no csrfToken to copy");
        assert_eq!(data.len(), 6, "{:?}", data.keys());
        assert!(is_owned_by(&secret, &connection));
        assert_eq!(StoredCredential::from_secret(&secret), Ok(bearer()));

        // An edited extra key is an edit by hand like any other.
        let mut edited = secret.clone();
        edited
            .data
            .as_mut()
            .unwrap()
            .insert("CAMUNDA_OAUTH_TOKEN".into(), ByteString(b"x".to_vec()));
        assert_eq!(StoredCredential::from_secret(&edited), Err(Unusable::EditedByHand));
    }

    #[test]
    fn labels_and_annotations_the_template_no_longer_has_are_removed_and_others_kept() {
        let before = templated(serde_json::json!({
            "labels": {"team": "orders", "tier": "backend"},
            "annotations": {"reloader.stakater.com/match": "true"},
        }));
        let mut checked = bearer().to_secret(&before);
        checked.metadata.resource_version = Some("7".into());
        let annotations = checked.metadata.annotations.as_mut().unwrap();
        assert_eq!(annotations[TEMPLATE_LABELS], "team,tier");
        annotations.insert("someone.else/note".into(), "kept".into());
        checked
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("added-by-hand".into(), "kept".into());

        let after = templated(serde_json::json!({"labels": {"team": "orders"}}));
        let patch = update_patch(&bearer().to_secret(&after), &checked);
        let labels = &patch["metadata"]["labels"];
        assert_eq!(labels["team"], "orders");
        assert_eq!(labels.get("tier"), Some(&serde_json::Value::Null), "{labels}");
        assert!(labels.get("added-by-hand").is_none(), "not ours to remove: {labels}");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        let annotations = &patch["metadata"]["annotations"];
        assert_eq!(
            annotations.get("reloader.stakater.com/match"),
            Some(&serde_json::Value::Null),
            "{annotations}"
        );
        assert_eq!(
            annotations.get(TEMPLATE_ANNOTATIONS),
            Some(&serde_json::Value::Null),
            "{annotations}"
        );
        assert_eq!(annotations[TEMPLATE_LABELS], "team");
        assert!(annotations.get("someone.else/note").is_none(), "{annotations}");

        // Without a template the Secret carries no record annotation.
        let plain = bearer().to_secret(&connection());
        assert!(!plain.metadata.annotations.unwrap().keys().any(|key| key.contains("template")));
    }
}
