//! The nudge (issue 21): right after the operator writes a derived Secret, it changes one
//! annotation on each running Pod that mounts that Secret and opted in, so that the kubelet
//! syncs the Pod at once and re-projects the Secret volume; the mounted file then holds the
//! new credential within seconds instead of the kubelet's 60–90 s sync period.
//!
//! Why it works: any change to a Pod's annotations makes the kubelet sync that Pod
//! (`podsDifferSemantically`), and every sync re-projects its Secret volumes
//! (`WaitForAttachAndMount` → `MarkRemountRequired`) from the kubelet's Secret manager,
//! which watches the Secrets its Pods use and so already holds the new content.
//!
//! Choices (the issue leaves them open):
//! - **Opt-in per Pod, by label**: `tasklist.camunda.community/nudge: "true"`. The operator
//!   watches only Pods with that label (a label-selected watch: the API server filters), so
//!   unlabelled Pods cost nothing and are never touched. Which connection a Pod follows is
//!   told by what it mounts: a labelled Pod is nudged after each write of any derived
//!   Secret it mounts (a `secret` volume or a `projected` volume's `secret` source), and
//!   only while it is Running and not being deleted. No annotation naming the connection:
//!   it would say again what the volumes say, and a typo in it would silently stop the nudge.
//! - **A small record per labelled Pod**: the decision needs the volumes' Secret names,
//!   which a metadata-only watch cannot see; so the watch hands over each whole Pod and
//!   keeps only a [`PodRecord`]: namespace, name, Running or not, being deleted or not, and
//!   the mounted Secrets' names (about 150 bytes a Pod). A reflector store of slimmed `Pod`
//!   objects would keep about 4 KB each (every field of Pod is there, if empty): measured
//!   with 1,000 Pods, +6 MB RSS. No GET per write.
//! - **The annotation's value** is the derived Secret's resourceVersion after the write:
//!   it names the version, tells nothing about the credential (no hash of it: Pods are
//!   readable by more people than Secrets), and changes with every write.
//! - **Off by default** (`--nudge-pods`, chart value `nudge.enabled`): it needs `patch pods`,
//!   which the chart grants only then, with an admission policy that lets the operator's
//!   ServiceAccount change nothing on a Pod but this one annotation.
//!
//! A write is never held up: [`Nudger::after_write`] picks the Pods from the store and hands
//! one patch per Pod to a task of its own; at most `--nudge-concurrency` patches are in
//! flight. A failed patch is counted (`pod_nudges_total{result="failed"}`), logged once per
//! Pod until a patch of that Pod works again, and never retried: the next write nudges
//! again, and the kubelet's own sync catches up meanwhile.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::{Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::machinery::lock::lock;
use crate::metrics::ResultLabels;
use crate::time::parse_duration;

/// The label a Pod opts in with.
pub const NUDGE_LABEL: &str = "tasklist.camunda.community/nudge";
/// The one annotation the operator writes on a Pod: the derived Secret's resourceVersion.
pub const CREDENTIAL_VERSION_ANNOTATION: &str = "tasklist.camunda.community/credential-version";
/// On a TasklistConnection: every Pod that mounts its derived Secret is nudged, so the
/// refresh may come as late as `--nudged-secret-volume-delay` before expiry.
pub use crate::crd::ALL_CONSUMERS_NUDGED_ANNOTATION;
/// The field manager of the Pod patches (the operator's own, as for Secrets).
const FIELD_MANAGER: &str = "tasklist-operator";

/// Default of `--nudged-secret-volume-delay`. Measured on the real node (docs/node.md): a
/// nudged Pod's file held the new credential 0.7 s after the Secret write at the median,
/// 1.1 s at most. 15 s is over ten times that: room for an API server under load, a busy
/// kubelet and the application's own read period, and still a quarter of a 60 s token's
/// life instead of half of it.
pub const DEFAULT_NUDGED_SECRET_VOLUME_DELAY: Duration = Duration::from_secs(15);
/// Default of `--nudge-concurrency`.
pub const DEFAULT_NUDGE_CONCURRENCY: u16 = 8;

/// The nudge's flags (flattened into `run`).
#[derive(Debug, Clone, clap::Args)]
pub struct NudgeArgs {
    /// After each write of a derived Secret, change the annotation
    /// `tasklist.camunda.community/credential-version` on each running Pod labelled
    /// `tasklist.camunda.community/nudge: "true"` that mounts it, so that the kubelet updates
    /// the mounted file within seconds. Needs `list`, `watch` and `patch` on Pods.
    #[arg(long)]
    pub nudge_pods: bool,
    /// Pod patches in flight at once (each write's Pods queue behind them).
    #[arg(long, default_value_t = DEFAULT_NUDGE_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    pub nudge_concurrency: u16,
    /// Room left before expiry for connections annotated
    /// `tasklist.camunda.community/all-consumers-nudged: "true"` (with --nudge-pods), in
    /// place of --secret-volume-delay.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub nudged_secret_volume_delay: Duration,
}

impl Default for NudgeArgs {
    fn default() -> Self {
        NudgeArgs {
            nudge_pods: false,
            nudge_concurrency: DEFAULT_NUDGE_CONCURRENCY,
            nudged_secret_volume_delay: DEFAULT_NUDGED_SECRET_VOLUME_DELAY,
        }
    }
}

// ---------------------------------------------------------------------------------------
// decisions (pure)

/// The names of the Secrets `spec` mounts: `secret` volumes and `projected` volumes'
/// `secret` sources. (Environment variables from a Secret are read once at start: a nudge
/// cannot update them, so they do not count.)
pub fn mounted_secrets(spec: &PodSpec) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for volume in spec.volumes.iter().flatten() {
        if let Some(name) = volume.secret.as_ref().and_then(|secret| secret.secret_name.clone()) {
            names.insert(name);
        }
        let projected = volume.projected.as_ref().and_then(|projected| projected.sources.as_ref());
        for source in projected.into_iter().flatten() {
            if let Some(secret) = &source.secret {
                names.insert(secret.name.clone());
            }
        }
    }
    names
}

/// What the nudge keeps of a labelled Pod: what the decision reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    running: bool,
    deleting: bool,
    /// The Secrets it mounts ([`mounted_secrets`]).
    secrets: Box<[String]>,
}

impl PodRecord {
    pub fn of(pod: &Pod) -> PodRecord {
        PodRecord {
            running: pod.status.as_ref().and_then(|status| status.phase.as_deref()) == Some("Running"),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            secrets: pod.spec.as_ref().map(mounted_secrets).unwrap_or_default().into_iter().collect(),
        }
    }

    /// Whether the Pod is to be nudged after a write of `secret` in its namespace: Running,
    /// not being deleted, mounts the Secret. (The label was checked by the watch's selector.)
    pub fn consumes(&self, secret: &str) -> bool {
        self.running && !self.deleting && self.secrets.iter().any(|name| name == secret)
    }
}

/// Whether `pod` is to be nudged after a write of `secret` in `namespace`.
pub fn is_consumer(pod: &Pod, namespace: &str, secret: &str) -> bool {
    pod.metadata.namespace.as_deref() == Some(namespace) && PodRecord::of(pod).consumes(secret)
}

/// The records of the labelled Pods of one watch, by namespace and name, kept from its
/// events: a relist (after a start or a lost watch) replaces them all once it is complete.
#[derive(Debug, Default)]
pub struct PodRecords {
    listed: HashMap<(String, String), PodRecord>,
    relisting: Option<HashMap<(String, String), PodRecord>>,
}

impl PodRecords {
    pub fn apply(&mut self, event: watcher::Event<Pod>) {
        let key = |pod: &Pod| (pod.metadata.namespace.clone().unwrap_or_default(), pod.name_any());
        match event {
            watcher::Event::Apply(pod) => {
                self.listed.insert(key(&pod), PodRecord::of(&pod));
            }
            watcher::Event::Delete(pod) => {
                self.listed.remove(&key(&pod));
            }
            watcher::Event::Init => self.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                self.relisting.get_or_insert_default().insert(key(&pod), PodRecord::of(&pod));
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.relisting.take() {
                    self.listed = listed;
                }
            }
        }
    }

    /// The names of the Pods of `namespace` to nudge after a write of `secret`.
    pub fn consumers(&self, namespace: &str, secret: &str) -> Vec<String> {
        self.listed
            .iter()
            .filter(|((pod_namespace, _), record)| pod_namespace == namespace && record.consumes(secret))
            .map(|((_, name), _)| name.clone())
            .collect()
    }
}

/// The merge patch of a nudge: metadata, one annotation, nothing else.
pub fn nudge_patch(version: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {CREDENTIAL_VERSION_ANNOTATION: version}}})
}

// ---------------------------------------------------------------------------------------
// the nudger

/// The nudge's counters: `pod_nudges_total{result="patched"|"failed"}`.
#[derive(Clone, Default)]
pub struct NudgeMetrics {
    pub pod_nudges: Family<ResultLabels, Counter>,
}

impl NudgeMetrics {
    fn count(&self, result: &str) {
        self.pod_nudges.get_or_create(&ResultLabels { result: result.into() }).inc();
    }
}

/// Nudges the consuming Pods after each write of a derived Secret; does nothing when the
/// nudge is off.
#[derive(Clone, Default)]
pub struct Nudger {
    on: Option<Arc<On>>,
}

struct On {
    client: Client,
    /// The labelled Pods of each watched namespace (`None`: all namespaces).
    stores: Vec<(Option<String>, Arc<Mutex<PodRecords>>)>,
    permits: Arc<Semaphore>,
    metrics: NudgeMetrics,
    /// Pods whose last patch failed and was logged: the next failures are not logged again.
    failing: Mutex<HashSet<(String, String)>>,
}

impl Nudger {
    /// Starts watching the labelled Pods of `namespaces` (all when empty) when `args` turn the
    /// nudge on; a Nudger that does nothing otherwise. Needs a Tokio runtime.
    pub fn start(client: Client, namespaces: &[String], args: &NudgeArgs, metrics: NudgeMetrics) -> Nudger {
        if !args.nudge_pods {
            return Nudger::default();
        }
        let scopes: Vec<Option<String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().cloned().map(Some).collect()
        };
        let stores = scopes
            .into_iter()
            .map(|scope| {
                let api: Api<Pod> = match scope.as_deref() {
                    Some(namespace) => Api::namespaced(client.clone(), namespace),
                    None => Api::all(client.clone()),
                };
                let store = Arc::new(Mutex::new(PodRecords::default()));
                let records = store.clone();
                let config = watcher::Config::default().labels(&format!("{NUDGE_LABEL}=true"));
                let pods = watcher(api, config).default_backoff().for_each(move |event| {
                    match event {
                        Ok(event) => {
                            lock(&records, "the labelled Pods").apply(event);
                        }
                        Err(error) => debug!("the watch of labelled Pods failed, reconnecting: {error}"),
                    }
                    std::future::ready(())
                });
                tokio::spawn(pods);
                (scope, store)
            })
            .collect();
        info!(
            concurrency = args.nudge_concurrency,
            "nudging labelled Pods ({NUDGE_LABEL}: \"true\") after each write of a derived Secret they mount"
        );
        Nudger {
            on: Some(Arc::new(On {
                client,
                stores,
                permits: Arc::new(Semaphore::new(usize::from(args.nudge_concurrency))),
                metrics,
                failing: Mutex::default(),
            })),
        }
    }

    /// Called right after the derived Secret `secret` in `namespace` was written, now at
    /// resourceVersion `version`: one patch per consuming Pod, each on a task of its own
    /// (returns at once).
    pub fn after_write(&self, namespace: &str, secret: &str, version: &str) {
        let Some(on) = &self.on else {
            return;
        };
        let consumers: Vec<String> = on
            .stores
            .iter()
            .filter(|(scope, _)| scope.as_deref().is_none_or(|scope| scope == namespace))
            .flat_map(|(_, store)| lock(store, "the labelled Pods").consumers(namespace, secret))
            .collect();
        if consumers.is_empty() {
            return;
        }
        debug!(secret, pods = consumers.len(), "nudging the Pods that mount the Secret");
        for pod in consumers {
            let (on, namespace, version) = (on.clone(), namespace.to_owned(), version.to_owned());
            tokio::spawn(async move { on.nudge(namespace, pod, version).await });
        }
    }
}

impl On {
    async fn nudge(&self, namespace: String, pod: String, version: String) {
        let Ok(_permit) = self.permits.acquire().await else {
            return;
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let result = pods.patch_metadata(&pod, &params, &Patch::Merge(nudge_patch(&version))).await;
        let key = (namespace, pod);
        let first_failure = match &result {
            Ok(_) => {
                lock(&self.failing, "the Pods whose nudge failed").remove(&key);
                false
            }
            // A Pod deleted meanwhile is not remembered (nor logged above debug): the set
            // holds only Pods that exist.
            Err(kube::Error::Api(response)) if response.code == 404 => false,
            Err(_) => lock(&self.failing, "the Pods whose nudge failed").insert(key.clone()),
        };
        match result {
            Ok(_) => self.metrics.count("patched"),
            Err(error) => {
                self.metrics.count("failed");
                let pod = format!("{}/{}", key.0, key.1);
                if first_failure {
                    warn!(%pod, "could not nudge the Pod (not retried; the kubelet's own sync will update its Secret volume): {error}");
                } else {
                    debug!(%pod, "could not nudge the Pod (logged before, or the Pod is gone): {error}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a Pod")
    }

    fn consumer(phase: &str, volumes: serde_json::Value) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "app", "namespace": "team", "labels": {NUDGE_LABEL: "true", "app": "x"},
                         "annotations": {"big": "x".repeat(1000)}, "managedFields": [{"manager": "kubectl"}]},
            "spec": {"containers": [{"name": "app", "image": "app:1", "env": [{"name": "A", "value": "b"}]}], "volumes": volumes},
            "status": {"phase": phase, "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
    }

    #[test]
    fn secret_and_projected_volumes_count_as_mounting_the_secret() {
        let running = consumer(
            "Running",
            serde_json::json!([
                {"name": "a", "secret": {"secretName": "orders-tasklist-auth"}},
                {"name": "b", "projected": {"sources": [{"configMap": {"name": "c"}}, {"secret": {"name": "billing-auth"}}]}},
                {"name": "c", "configMap": {"name": "orders-tasklist-auth-not"}},
            ]),
        );
        let spec = running.spec.as_ref().expect("a spec");
        assert_eq!(
            mounted_secrets(spec),
            BTreeSet::from(["billing-auth".to_owned(), "orders-tasklist-auth".to_owned()])
        );
        assert!(is_consumer(&running, "team", "orders-tasklist-auth"));
        assert!(is_consumer(&running, "team", "billing-auth"));
        assert!(
            !is_consumer(&running, "team", "orders-tasklist-auth-not"),
            "a ConfigMap is not a Secret"
        );
        assert!(
            !is_consumer(&running, "other", "orders-tasklist-auth"),
            "another namespace's Secret of that name"
        );
    }

    #[test]
    fn only_running_pods_that_are_not_being_deleted_are_nudged() {
        let volumes = serde_json::json!([{"name": "a", "secret": {"secretName": "s"}}]);
        for phase in ["Pending", "Succeeded", "Failed", "Unknown"] {
            assert!(!is_consumer(&consumer(phase, volumes.clone()), "team", "s"), "{phase}");
        }
        let mut deleting = consumer("Running", volumes.clone());
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
        assert!(!is_consumer(&deleting, "team", "s"));
        assert!(
            !is_consumer(&consumer("Running", serde_json::json!([])), "team", "s"),
            "mounts nothing"
        );
        assert!(is_consumer(&consumer("Running", volumes), "team", "s"));
    }

    #[test]
    fn the_records_follow_the_watch_and_a_relist_replaces_them() {
        let volumes = serde_json::json!([{"name": "a", "secret": {"secretName": "s"}}]);
        let named = |name: &str, phase: &str| {
            let mut pod = consumer(phase, volumes.clone());
            pod.metadata.name = Some(name.to_owned());
            pod
        };
        let mut records = PodRecords::default();
        records.apply(watcher::Event::Apply(named("a", "Running")));
        records.apply(watcher::Event::Apply(named("b", "Pending")));
        assert_eq!(records.consumers("team", "s"), ["a"]);
        assert!(records.consumers("other", "s").is_empty());
        assert!(records.consumers("team", "t").is_empty());
        // b starts running, a is deleted.
        records.apply(watcher::Event::Apply(named("b", "Running")));
        records.apply(watcher::Event::Delete(named("a", "Running")));
        assert_eq!(records.consumers("team", "s"), ["b"]);
        // A relist: until it is complete the old records hold; then only what it listed.
        records.apply(watcher::Event::Init);
        records.apply(watcher::Event::InitApply(named("c", "Running")));
        assert_eq!(records.consumers("team", "s"), ["b"]);
        records.apply(watcher::Event::InitDone);
        assert_eq!(records.consumers("team", "s"), ["c"]);
        // The record decides like the whole Pod.
        for phase in ["Running", "Pending"] {
            let pod = named("d", phase);
            for secret in ["s", "t"] {
                assert_eq!(PodRecord::of(&pod).consumes(secret), is_consumer(&pod, "team", secret));
            }
        }
    }

    #[test]
    fn the_patch_changes_one_annotation_and_nothing_else() {
        assert_eq!(
            nudge_patch("4711"),
            serde_json::json!({"metadata": {"annotations": {"tasklist.camunda.community/credential-version": "4711"}}})
        );
    }
}
