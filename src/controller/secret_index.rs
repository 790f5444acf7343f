//! What the operator keeps of every Secret of the watched namespaces: a compact summary per
//! Secret, fed by the metadata watch, in place of the watch's objects.
//!
//! The metadata watch sees every Secret of the namespaces, the derived Secrets included, so
//! whatever is kept per Secret costs that times the number of Secrets. kube's reflector keeps
//! each one as a whole `ObjectMeta` (about 400 bytes before any of its strings, and a
//! B-tree node of some 500 bytes for a single annotation): about 1.5 KB per Secret, 16.9 MB
//! of the 97 MB heap at 10,000 connections. A [`SecretSummary`] keeps what the decisions
//! read, about 400 bytes:
//! - uid and resourceVersion (the fingerprint of a referenced Secret, the version of a
//!   derived one);
//! - the controller owner when it is a TasklistConnection: its name and uid (who owns a
//!   derived Secret, and whether a Secret of the derived name is someone else's), unless
//!   it is a connection of another shard (then no connection of this process owns it);
//! - the data-hash annotation, only a value of SHA-256's length (anyone can set
//!   annotations), and not for a Secret another shard's connection controls;
//! - whether the opt-in label says `"true"` (`--require-secret-opt-in`).
//!
//! The index follows the watch like kube's store does: a relist (`Init` .. `InitDone`)
//! builds a new map and replaces the old one at its end, so that a Secret deleted while the
//! watch was down is gone; readiness is the first `InitDone`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use tokio::sync::watch;

use crate::derived_secret::DATA_HASH;
use crate::inputs::ALLOW_REFERENCE_LABEL;
use crate::machinery::lock::lock;
use crate::shard::Sharding;

/// What is kept of one Secret (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSummary {
    uid: Box<str>,
    resource_version: Box<str>,
    /// The controller owner, when it is a TasklistConnection.
    controller: Option<Box<ControllerOwner>>,
    data_hash: Option<Box<str>>,
    opted_in: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ControllerOwner {
    api_version: Box<str>,
    name: Box<str>,
    uid: Box<str>,
}

/// The length of the data-hash annotation's value: SHA-256 in hex.
const DATA_HASH_LENGTH: usize = 64;

impl SecretSummary {
    /// The summary of `metadata`. With sharding, a Secret whose controller is a connection
    /// of another shard keeps its versions only: no connection of this process owns it (so
    /// the owner check says "not ours", as it would with the owner), and its data hash tells
    /// this process nothing. The versions stay: a connection here may read it, or want its
    /// name (a conflict).
    pub fn of(metadata: &ObjectMeta, sharding: &Sharding) -> SecretSummary {
        let namespace = metadata.namespace.as_deref().unwrap_or_default();
        let controller = metadata
            .owner_references
            .iter()
            .flatten()
            .find(|owner| owner.controller == Some(true) && owner.kind == "TasklistConnection");
        let another_shards = controller.is_some_and(|owner| !sharding.owns(namespace, &owner.name));
        let data_hash = metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(DATA_HASH))
            .filter(|hash| hash.len() == DATA_HASH_LENGTH && !another_shards);
        SecretSummary {
            uid: metadata.uid.as_deref().unwrap_or_default().into(),
            resource_version: metadata.resource_version.as_deref().unwrap_or_default().into(),
            controller: controller.filter(|_| !another_shards).map(|owner| {
                Box::new(ControllerOwner {
                    api_version: owner.api_version.as_str().into(),
                    name: owner.name.as_str().into(),
                    uid: owner.uid.as_str().into(),
                })
            }),
            data_hash: data_hash.map(|hash| hash.as_str().into()),
            opted_in: crate::inputs::allows_reference(metadata.labels.as_ref()),
        }
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn resource_version(&self) -> &str {
        &self.resource_version
    }

    /// Whether the Secret carries the opt-in label with `"true"`.
    pub fn opted_in(&self) -> bool {
        self.opted_in
    }

    /// The metadata the summary keeps, as an `ObjectMeta` of `namespace`/`name`: what the
    /// owner check and a Secret rebuilt from its record read.
    pub fn to_metadata(&self, namespace: &str, name: &str) -> ObjectMeta {
        let owner = self.controller.as_ref().map(|owner| OwnerReference {
            api_version: owner.api_version.to_string(),
            kind: "TasklistConnection".into(),
            name: owner.name.to_string(),
            uid: owner.uid.to_string(),
            controller: Some(true),
            block_owner_deletion: None,
        });
        let data_hash = self.data_hash.as_ref().map(|hash| (DATA_HASH.to_owned(), hash.to_string()));
        let opt_in = self.opted_in.then(|| (ALLOW_REFERENCE_LABEL.to_owned(), "true".to_owned()));
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid: Some(self.uid.to_string()),
            resource_version: Some(self.resource_version.to_string()),
            owner_references: owner.map(|owner| vec![owner]),
            annotations: data_hash.map(|entry| BTreeMap::from([entry])),
            labels: opt_in.map(|entry| BTreeMap::from([entry])),
            ..ObjectMeta::default()
        }
    }
}

/// The summaries of every Secret the metadata watch shows, by namespace and name.
pub struct SecretIndex {
    sharding: Sharding,
    summaries: Mutex<Summaries>,
    listed: watch::Sender<bool>,
}

#[derive(Default)]
struct Summaries {
    current: HashMap<Box<str>, SecretSummary>,
    /// A relist in progress: the new map, which replaces `current` at its end.
    relisting: Option<HashMap<Box<str>, SecretSummary>>,
}

/// The key of a Secret: names cannot hold a `/`.
fn key(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into()
}

impl SecretIndex {
    pub fn new(sharding: Sharding) -> SecretIndex {
        SecretIndex {
            sharding,
            summaries: Mutex::default(),
            listed: watch::Sender::new(false),
        }
    }

    /// Follows one event of the metadata watch.
    pub fn apply(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        let mut summaries = lock(&self.summaries, "the Secret index");
        match event {
            watcher::Event::Apply(secret) => {
                let (key, summary) = self.entry_of(secret);
                summaries.current.insert(key, summary);
            }
            watcher::Event::Delete(secret) => {
                let (key, _) = self.entry_of(secret);
                summaries.current.remove(&key);
            }
            watcher::Event::Init => summaries.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(secret) => {
                let (key, summary) = self.entry_of(secret);
                summaries.relisting.get_or_insert_with(HashMap::new).insert(key, summary);
            }
            watcher::Event::InitDone => {
                if let Some(mut listed) = summaries.relisting.take() {
                    listed.shrink_to_fit();
                    summaries.current = listed;
                }
                drop(summaries);
                self.listed.send_replace(true);
            }
        }
    }

    fn entry_of(&self, secret: &PartialObjectMeta<Secret>) -> (Box<str>, SecretSummary) {
        let metadata = &secret.metadata;
        let key = key(
            metadata.namespace.as_deref().unwrap_or_default(),
            metadata.name.as_deref().unwrap_or_default(),
        );
        (key, SecretSummary::of(metadata, &self.sharding))
    }

    /// The summary of the Secret `namespace`/`name`, if the watch shows one.
    pub fn get(&self, namespace: &str, name: &str) -> Option<SecretSummary> {
        lock(&self.summaries, "the Secret index")
            .current
            .get(&key(namespace, name))
            .cloned()
    }

    /// Waits until the watch has listed once.
    pub async fn listed(&self) {
        let mut listed = self.listed.subscribe();
        // The sender lives as long as `self`: the wait cannot fail while it is borrowed.
        let _ = listed.wait_for(|listed| *listed).await;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.summaries, "the Secret index").current.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    fn secret(name: &str, extra: serde_json::Value) -> PartialObjectMeta<Secret> {
        let mut metadata = json!({"name": name, "namespace": "team-a", "uid": format!("uid-{name}"), "resourceVersion": "7"});
        if let (Some(metadata), Some(extra)) = (metadata.as_object_mut(), extra.as_object()) {
            metadata.extend(extra.clone());
        }
        PartialObjectMeta {
            types: None,
            metadata: serde_json::from_value(metadata).expect("valid metadata"),
            _phantom: Default::default(),
        }
    }

    fn derived(owner: &str, hash: &str) -> PartialObjectMeta<Secret> {
        secret(
            &format!("{owner}-tasklist-auth"),
            json!({
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "u-cm"},
                    {"apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
                     "name": owner, "uid": format!("u-{owner}"), "controller": true},
                ],
                "annotations": {DATA_HASH: hash, "kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{}}", "team": "x"},
                "labels": {"app.kubernetes.io/managed-by": "tasklist-operator"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            }),
        )
    }

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_summary_keeps_what_the_decisions_read_and_nothing_else() {
        let index = SecretIndex::new(Sharding::default());
        index.apply(&watcher::Event::Apply(derived("orders", HASH)));
        let summary = index.get("team-a", "orders-tasklist-auth").expect("a summary");
        assert_eq!((summary.uid(), summary.resource_version()), ("uid-orders-tasklist-auth", "7"));
        let metadata = summary.to_metadata("team-a", "orders-tasklist-auth");
        assert_eq!(metadata.name.as_deref(), Some("orders-tasklist-auth"));
        let owners = metadata.owner_references.unwrap_or_default();
        assert_eq!(owners.len(), 1, "the controller only: {owners:?}");
        assert_eq!((owners[0].name.as_str(), owners[0].uid.as_str()), ("orders", "u-orders"));
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(
            metadata.annotations,
            Some(BTreeMap::from([(DATA_HASH.to_owned(), HASH.to_owned())])),
            "only the data hash"
        );
        assert_eq!((metadata.labels, metadata.managed_fields), (None, None));
    }

    #[test]
    fn a_data_hash_of_another_length_or_the_owner_and_hash_of_another_shards_secret_are_not_kept() {
        let index = SecretIndex::new(Sharding::default());
        index.apply(&watcher::Event::Apply(derived(
            "orders",
            "a-long-value-anyone-could-set".repeat(100).as_str(),
        )));
        let summary = index.get("team-a", "orders-tasklist-auth").expect("a summary");
        assert_eq!(summary.to_metadata("team-a", "x").annotations, None);

        let sharding = Sharding::new(0, 2, None).expect("two shards");
        let theirs = (0..50)
            .map(|i| format!("c{i}"))
            .find(|name| !sharding.owns("team-a", name))
            .expect("a connection of the other shard");
        let index = SecretIndex::new(sharding);
        index.apply(&watcher::Event::Apply(derived(&theirs, HASH)));
        let summary = index.get("team-a", &format!("{theirs}-tasklist-auth")).expect("a summary");
        let metadata = summary.to_metadata("team-a", "x");
        assert_eq!(metadata.annotations, None, "another shard's data hash tells nothing");
        assert_eq!(metadata.owner_references, None, "no connection of this shard owns it");
        assert_eq!(summary.resource_version(), "7", "a connection here may read it");
    }

    #[test]
    fn the_opt_in_label_is_kept_as_whether_it_says_true() {
        let index = SecretIndex::new(Sharding::default());
        index.apply(&watcher::Event::Apply(secret(
            "yes",
            json!({"labels": {ALLOW_REFERENCE_LABEL: "true"}}),
        )));
        index.apply(&watcher::Event::Apply(secret(
            "no",
            json!({"labels": {ALLOW_REFERENCE_LABEL: "yes"}}),
        )));
        assert!(index.get("team-a", "yes").is_some_and(|summary| summary.opted_in()));
        assert!(index.get("team-a", "no").is_some_and(|summary| !summary.opted_in()));
    }

    #[tokio::test]
    async fn a_relist_replaces_the_index_at_its_end_and_makes_it_listed() {
        let index = SecretIndex::new(Sharding::default());
        index.apply(&watcher::Event::Apply(secret("gone", json!({}))));
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(secret("kept", json!({}))));
        assert!(
            index.get("team-a", "gone").is_some(),
            "the old list answers until the new one is whole"
        );
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), index.listed()).await;
        assert!(waiting.is_err(), "not listed before InitDone");
        index.apply(&watcher::Event::InitDone);
        index.listed().await;
        assert_eq!(
            (index.get("team-a", "gone"), index.len()),
            (None, 1),
            "deleted while the watch was down"
        );
        index.apply(&watcher::Event::Delete(secret("kept", json!({}))));
        assert_eq!(index.len(), 0);
    }
}
