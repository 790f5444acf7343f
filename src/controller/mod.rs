//! The Kubernetes side: watches TasklistConnections and Secrets, and runs the reconcile.

mod decide;
mod derived_record;
mod host_slots;
mod memory;
mod plan;
mod probe_scheduler;
mod reconcile;
mod secret_index;
mod secret_values;
mod slim;
#[cfg(test)]
mod wiring_tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::Predicate;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, info, warn};

use crate::camunda::{HttpClient, HttpClientError, HttpSettings, TlsTrust};
use crate::crd::TasklistConnection;
use crate::events::EventPublisher;
use crate::machinery::lock::lock;
use crate::machinery::users::SharedByUsers;
use crate::metrics::{Metrics, ReasonLabels};
use crate::nudge::Nudger;
use crate::policy::{HostPolicy, ResolutionCache};
use crate::schedule::RefreshPolicy;
use crate::shard::Sharding;
use crate::token_cache::TokenCache;
use derived_record::DerivedRecords;
use host_slots::{DEFERRAL, Full, HostSlots, reconcile_deadline};
use memory::{ConnectionKey, Memory, connection_key};
pub use probe_scheduler::{DEFAULT_PROBE_CONCURRENCY, DEFAULT_PROBES_PER_HOST};
use probe_scheduler::{ProbeScheduler, probe_limits, probe_timeout};
use secret_index::{SecretIndex, SecretSummary};

/// The field manager named in server-side apply of Secrets and status.
pub const FIELD_MANAGER: &str = "tasklist-operator";

/// Errors a reconcile cannot turn into a condition: the Kubernetes API failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// The derived Secret was created or changed by someone else between the check of its
    /// owner and the write: it is not overwritten, and the next reconcile looks again.
    #[error("the Secret {0:?} was created or changed by someone else while a credential was obtained; it was not overwritten")]
    SecretChangedMeanwhile(String),
    /// The reconcile took longer than any reconcile should (every request has a timeout,
    /// so this bounds what has none, such as a hung Kubernetes API call).
    #[error("the reconcile did not finish within {0:?}; abandoned")]
    DeadlineExceeded(Duration),
    /// A credential request was due, and a host it goes to (or the namespace's share) has
    /// as many in flight as it may: the reconcile is tried again shortly, not counted as a
    /// failure.
    #[error("no free slot for this connection's credential hosts or namespace ({0:?}); deferred")]
    Deferred(Full),
}

impl Error {
    /// The `reason` label of `reconcile_errors`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::SecretChangedMeanwhile(_) => "SecretChangedMeanwhile",
            Error::DeadlineExceeded(_) => "DeadlineExceeded",
            Error::Deferred(_) => "Deferred",
        }
    }
}

/// Shared by every reconcile, in three parts: how the operator was configured, what the
/// reconciles share (caches and limits, each bounded), and how it talks to the cluster.
pub struct Context {
    pub settings: Settings,
    shared: Shared,
    pub client: Client,
    pub metrics: Arc<Metrics>,
    events: EventPublisher,
    /// Nudges the Pods that mount a derived Secret after each write (`--nudge-pods`).
    nudger: Nudger,
}

/// How the operator was configured (its flags), fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Timeouts, the operator's CA bundle and the host policy of every request to Camunda.
    pub http: HttpSettings,
    /// The operator-wide settings of the refresh rule.
    pub refresh: RefreshPolicy,
    pub probes: ProbeSettings,
    /// How many connections are reconciled at once (per watched namespace).
    pub concurrency: u16,
    /// Which connections this process handles; the others never reach the controller.
    pub sharding: Sharding,
    /// `--require-secret-opt-in`: use only referenced Secrets that carry the opt-in label.
    pub require_secret_opt_in: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            http: HttpSettings::default(),
            refresh: RefreshPolicy::default(),
            probes: ProbeSettings::default(),
            concurrency: DEFAULT_CONCURRENCY,
            sharding: Sharding::default(),
            require_secret_opt_in: false,
        }
    }
}

/// What the reconciles share: memory, caches and limits, made from the settings.
struct Shared {
    /// Which hosts connections may send requests to (from the HTTP settings).
    host_policy: Arc<HostPolicy>,
    /// The policy pre-check's recent answers per host name.
    resolved_hosts: ResolutionCache,
    /// One HTTP client per trust configuration: most connections share the default. A
    /// client no connection uses any more is dropped.
    http_clients: Mutex<SharedByUsers<ConnectionKey, TlsTrust, HttpClient>>,
    memory: Memory,
    /// The compact record of each connection's derived Secret: the credential it holds, at
    /// the version this process wrote or read.
    derived: DerivedRecords,
    /// Tokens shared by the connections that would send the same token request.
    token_cache: TokenCache<ConnectionKey>,
    /// The referenced Secrets' values by version: read once per version, not per connection.
    secret_values: secret_values::SecretValues,
    /// Reconciles in flight per credential host, so that a dead token endpoint cannot hold
    /// every reconcile slot.
    host_slots: HostSlots,
    /// The probe lane: shared probe answers, requests in flight, probe slots.
    probes: ProbeScheduler,
}

impl Shared {
    fn for_settings(settings: &Settings) -> Self {
        let probes = &settings.probes;
        Shared {
            host_policy: settings.http.policy.clone().unwrap_or_default(),
            resolved_hosts: ResolutionCache::default(),
            http_clients: Mutex::default(),
            memory: Memory::default(),
            derived: DerivedRecords::default(),
            token_cache: TokenCache::default(),
            secret_values: secret_values::SecretValues::default(),
            host_slots: HostSlots::new(settings.http.health.clone()),
            probes: ProbeScheduler::new(probe_limits(probes.concurrency, probes.per_host, settings.concurrency)),
        }
    }
}

/// The probe lane's flags (`--probe-concurrency`, `--probes-per-host`, `--probe-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Probe slots in all (0: no limit); never more than half the reconcile slots.
    pub concurrency: u16,
    /// Probe slots per Tasklist host (0: no limit).
    pub per_host: u16,
    /// `None`: 5 s; never longer than the request timeout.
    pub timeout: Option<Duration>,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        ProbeSettings {
            concurrency: DEFAULT_PROBE_CONCURRENCY,
            per_host: DEFAULT_PROBES_PER_HOST,
            timeout: None,
        }
    }
}

/// Reconciles in flight at once unless `--concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: u16 = 32;

impl Context {
    /// `instance` names this operator process in Events (its Pod name).
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: Settings, nudger: Nudger, instance: Option<String>) -> Self {
        Context {
            events: EventPublisher::new(client.clone(), instance),
            shared: Shared::for_settings(&settings),
            settings,
            client,
            metrics,
            nudger,
        }
    }

    fn probe_timeout(&self) -> Duration {
        probe_timeout(self.settings.probes.timeout, self.settings.http.timeout)
    }

    /// A deleted connection leaves nothing behind in memory, in the metrics or in the HTTP
    /// client cache.
    fn forget(&self, connection: &TasklistConnection) {
        self.forget_key(&connection_key(connection.namespace().unwrap_or_default(), connection.name_any()));
    }

    fn forget_key(&self, key: &ConnectionKey) {
        self.shared.memory.forget(key);
        self.shared.derived.forget(key);
        self.shared.token_cache.forget(key);
        self.metrics.forget_connection(&key.0, &key.1);
        lock(&self.shared.http_clients, "the HTTP clients").forget(key);
    }

    /// Forgets the values of referenced Secrets in `namespace` (None: all) that none of the
    /// `present` connections reads any more.
    fn forget_unreferenced_secrets(&self, namespace: Option<&str>, present: &[Arc<TasklistConnection>]) {
        let referenced: HashSet<secret_values::SecretKey> = present
            .iter()
            .filter(|connection| namespace.is_none_or(|namespace| connection.namespace().as_deref() == Some(namespace)))
            .flat_map(|connection| {
                let namespace = connection.namespace().unwrap_or_default();
                crate::inputs::referenced_secret_names(connection)
                    .into_iter()
                    .map(move |name| (namespace.clone(), name))
            })
            .collect();
        self.shared.secret_values.forget_unreferenced(namespace, &referenced);
    }

    /// After a relist: forgets every connection of `namespace` (None: all namespaces) that
    /// is not in `present`. A connection deleted while the watch was down sends no Delete
    /// event; without this its records and metric series would stay for good.
    fn forget_absent(&self, namespace: Option<&str>, present: &[Arc<TasklistConnection>]) {
        let present: HashSet<ConnectionKey> = present
            .iter()
            .map(|connection| connection_key(connection.namespace().unwrap_or_default(), connection.name_any()))
            .collect();
        for key in absent_in_scope(self.shared.memory.keys(), namespace, &present) {
            info!(connection = %format!("{}/{}", key.0, key.1), "forgetting a connection deleted while the watch was down");
            self.forget_key(&key);
        }
    }

    fn http_client(&self, key: &ConnectionKey, trust: &TlsTrust) -> Result<HttpClient, HttpClientError> {
        let mut clients = lock(&self.shared.http_clients, "the HTTP clients");
        clients.get_or_make(key.clone(), trust, || HttpClient::new(&self.settings.http, trust))
    }
}

/// What the metadata watch tells of Secrets, which a reconcile reads instead of asking the
/// API server: at rest, a reconcile sends no request at all.
#[derive(Clone)]
pub struct SecretCaches {
    /// Every Secret of the watched namespaces, summarised: uid, resourceVersion, controller
    /// owner, data hash, opt-in (`secret_index`).
    pub metadata: Arc<SecretIndex>,
}

/// How long a reconcile waits for the Secret watches' first list after a start before it
/// reads from the API server instead.
const CACHE_SYNC_WAIT: Duration = Duration::from_secs(5);

impl SecretCaches {
    /// Whether the Secret watch has listed once (waiting up to [`CACHE_SYNC_WAIT`] for it).
    async fn synced(&self) -> bool {
        tokio::time::timeout(CACHE_SYNC_WAIT, self.metadata.listed()).await.is_ok()
    }

    fn metadata(&self, namespace: &str, name: &str) -> Option<SecretSummary> {
        self.metadata.get(namespace, name)
    }
}

/// The keys of `known` that belong to `namespace` (None: any) and are not `present`.
fn absent_in_scope(known: Vec<ConnectionKey>, namespace: Option<&str>, present: &HashSet<ConnectionKey>) -> Vec<ConnectionKey> {
    known
        .into_iter()
        .filter(|key| namespace.is_none_or(|namespace| key.0 == namespace))
        .filter(|key| !present.contains(key))
        .collect()
}

/// Whether a watch event concerns this shard. Events about connections another shard owns
/// are dropped before the store sees them: this process then neither reconciles them, nor
/// keeps memory or metric series of them, nor forgets them after a relist (its store never
/// held them), and Secrets map only to its own connections. Ownership by hash depends on
/// namespace and name alone, which never change, so a connection cannot move between hash
/// shards; one that stops matching `--shard-selector` arrives as a Delete (the API server's
/// doing) and is forgotten like a deleted one.
fn concerns_this_shard(sharding: &Sharding, event: &Result<watcher::Event<TasklistConnection>, watcher::Error>) -> bool {
    match event {
        Ok(watcher::Event::Apply(connection) | watcher::Event::InitApply(connection) | watcher::Event::Delete(connection)) => {
            sharding.owns(&connection.namespace().unwrap_or_default(), &connection.name_any())
        }
        Ok(watcher::Event::Init | watcher::Event::InitDone) | Err(_) => true,
    }
}

/// Which namespaces to watch: all of them, or only the listed ones.
#[derive(Debug, Clone)]
pub enum Scope {
    AllNamespaces,
    Namespaces(Vec<String>),
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(ctx: Arc<Context>, scope: Scope, shutdown: impl Future<Output = ()> + Send + 'static) {
    let namespaces: Vec<Option<String>> = match scope {
        Scope::AllNamespaces => vec![None],
        Scope::Namespaces(list) => list.into_iter().map(Some).collect(),
    };
    // One controller per namespace: a watch can cover one namespace or all of them.
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let controllers = namespaces
        .into_iter()
        .map(|namespace| run_in(ctx.clone(), namespace, shutdown.clone()));
    futures::future::join_all(controllers).await;
    // The Events of the last reconciles are sent by tasks of their own: let them go out.
    ctx.events.flush(EVENT_FLUSH).await;
}

/// How long a shutdown waits for queued Events.
const EVENT_FLUSH: Duration = Duration::from_secs(2);

async fn run_in(ctx: Arc<Context>, namespace: Option<String>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let connections: Api<TasklistConnection> = scoped_api(&ctx.client, namespace.as_deref());
    let secrets: Api<PartialObjectMeta<Secret>> = match namespace.as_deref() {
        Some(namespace) => Api::namespaced(ctx.client.clone(), namespace),
        None => Api::all(ctx.client.clone()),
    };
    info!(namespace = namespace.as_deref().unwrap_or("<all>"), shard = %ctx.settings.sharding.describe(), "watching TasklistConnections");
    let mut connections_config = watcher::Config::default();
    if let Some(selector) = ctx.settings.sharding.label_selector() {
        connections_config = connections_config.labels(selector);
    }
    let sharding = ctx.settings.sharding.clone();

    let (reader, writer) = reflector::store();
    // Status writes change neither generation nor annotations: they do not wake the controller.
    let forget_ctx = ctx.clone();
    let (listed, scope) = (reader.clone(), namespace.clone());
    let connection_changes = watcher(connections, connections_config)
        .backoff(WatchBackoff::default())
        .filter(move |event| std::future::ready(concerns_this_shard(&sharding, event)))
        // The store keeps every connection for the operator's lifetime: only what is read.
        .modify(slim::slim_connection)
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::Delete(deleted)) => {
                forget_ctx.forget(deleted);
                forget_ctx.forget_unreferenced_secrets(deleted.namespace().as_deref(), &listed.state());
            }
            // The store holds the new list by now (`reflect` comes first).
            Ok(watcher::Event::InitDone) => {
                let present = listed.state();
                forget_ctx.forget_absent(scope.as_deref(), &present);
                forget_ctx.forget_unreferenced_secrets(scope.as_deref(), &present);
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
    // Metadata is enough to know a Secret changed, and keeps memory small. Its store tells
    // a reconcile the uid and resourceVersion of the Secrets a connection reads.
    // The index keeps a compact summary of each (`secret_index`); the events themselves go on
    // to wake the connections concerned and are dropped.
    let index = Arc::new(SecretIndex::new(ctx.settings.sharding.clone()));
    let indexing = index.clone();
    let secret_changes = watcher(secrets, watcher::Config::default())
        .backoff(WatchBackoff::default())
        .inspect(move |event| {
            if let Ok(event) = event {
                indexing.apply(event);
            }
        })
        .touched_objects();
    // The derived Secrets are in that store too, by metadata only; what the decisions need of
    // the connections' own is a compact record in memory (`derived_record`), filled by this
    // process's own writes and, when the watch shows another version, by a GET. No watch
    // transfers a Secret's data: labelling a Secret as the operator's costs its metadata.
    let caches = SecretCaches { metadata: index };
    let mapper_ctx = ctx.clone();
    let present = reader.clone();
    // Which connections a changed Secret concerns comes from the store the controller keeps
    // anyway, not from a hand-kept index.
    let store = reader.clone();

    Controller::for_stream(connection_changes, reader)
        .watches_stream(secret_changes, move |secret| {
            mapper_ctx.shared.memory.connections_affected_by(&secret, || store.state())
        })
        .with_config(controller::Config::default().concurrency(ctx.settings.concurrency))
        // The controller backs off its trigger streams too; kube's default would again wait
        // up to half a minute and more after an API server restart.
        .trigger_backoff(WatchBackoff::default())
        .graceful_shutdown_on(shutdown)
        .run(
            move |connection, ctx| reconcile_logged(connection, ctx, present.clone(), caches.clone()),
            error_policy,
            ctx,
        )
        .for_each(|_| std::future::ready(()))
        .await;
}

#[tracing::instrument(skip_all, fields(connection = %format!("{}/{}", connection.namespace().unwrap_or_default(), connection.name_any())))]
async fn reconcile_logged(
    connection: Arc<TasklistConnection>,
    ctx: Arc<Context>,
    present: reflector::Store<TasklistConnection>,
    caches: SecretCaches,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let metrics = ctx.metrics.clone();
    let deadline = reconcile_deadline(ctx.settings.http.timeout);
    let reference = ObjectRef::from_obj(connection.as_ref());
    let result = match tokio::time::timeout(deadline, reconcile::reconcile(connection.clone(), ctx.clone(), caches)).await {
        Ok(Err(Error::Deferred(full))) => {
            debug!(?full, "deferred: no free slot for this connection's credential hosts or namespace");
            Ok(Action::requeue(DEFERRAL.mul_f64(1.0 + rand::random::<f64>())))
        }
        Ok(result) => result,
        Err(_) => Err(Error::DeadlineExceeded(deadline)),
    };
    // Deleted while this reconcile ran: the Delete event (or the relist) forgot the
    // connection before this reconcile wrote its memory and metric series again.
    if present.get(&reference).is_none() {
        ctx.forget(&connection);
    }
    metrics.reconciles.inc();
    metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    // Only reconciles that failed and are retried count as errors; a connection that is
    // not Ready is a condition in its status, not a reconcile error.
    if let Err(error) = &result {
        metrics
            .reconcile_errors
            .get_or_create(&ReasonLabels {
                reason: error.metric_label().into(),
            })
            .inc();
    }
    result
}

fn error_policy(connection: Arc<TasklistConnection>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(connection = %format!("{}/{}", connection.namespace().unwrap_or_default(), connection.name_any()), "reconcile failed, retrying in 5s: {error}");
    Action::requeue(Duration::from_secs(5))
}

fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// How long a watch waits before reconnecting: from 0.5 s, doubling up to 5 s, reset once
/// it works again. kube's default waits up to 30 s and more (jitter on top); after an API
/// server restart that left connections blind for over a minute.
struct WatchBackoff {
    next: Duration,
}

const FIRST_RECONNECT: Duration = Duration::from_millis(500);
const MAX_RECONNECT: Duration = Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: FIRST_RECONNECT }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_RECONNECT);
        // Up to 20 % jitter, so that replicas of many operators do not reconnect in step.
        Some(wait.mul_f64(1.0 + 0.2 * rand::random::<f64>()))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST_RECONNECT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(namespace: &str, name: &str) -> ConnectionKey {
        connection_key(namespace, name)
    }

    #[test]
    fn a_relist_forgets_only_absent_connections_of_its_own_namespace() {
        let known = vec![key("a", "kept"), key("a", "deleted"), key("b", "other-scope")];
        let present = HashSet::from([key("a", "kept")]);
        assert_eq!(absent_in_scope(known.clone(), Some("a"), &present), vec![key("a", "deleted")]);
        let mut everywhere = absent_in_scope(known, None, &present);
        everywhere.sort();
        assert_eq!(everywhere, vec![key("a", "deleted"), key("b", "other-scope")]);
    }

    fn connection(namespace: &str, name: &str) -> TasklistConnection {
        let spec = serde_json::json!({
            "url": "http://tasklist",
            "auth": {"basic": {"credentialsSecretRef": {"name": "login"}}},
        });
        let mut connection = TasklistConnection::new(name, serde_json::from_value(spec).expect("a spec"));
        connection.metadata.namespace = Some(namespace.to_owned());
        connection
    }

    #[test]
    fn events_about_another_shards_connections_are_dropped_before_the_store() {
        let shards = [Sharding::new(0, 2, None).expect("valid"), Sharding::new(1, 2, None).expect("valid")];
        for name in (0..20).map(|n| format!("orders-{n}")) {
            let owner = crate::shard::shard_of("team", &name, 2);
            for shard in &shards {
                let mine = shard.index() == owner;
                for event in [
                    watcher::Event::Apply(connection("team", &name)),
                    watcher::Event::InitApply(connection("team", &name)),
                    watcher::Event::Delete(connection("team", &name)),
                ] {
                    assert_eq!(concerns_this_shard(shard, &Ok(event)), mine, "{name} for shard {}", shard.index());
                }
            }
        }
        // The relist markers reach every shard: forget_absent runs on InitDone.
        for shard in &shards {
            assert!(concerns_this_shard(shard, &Ok(watcher::Event::Init)));
            assert!(concerns_this_shard(shard, &Ok(watcher::Event::InitDone)));
        }
        let everything = Sharding::default();
        assert!(concerns_this_shard(
            &everything,
            &Ok(watcher::Event::Apply(connection("team", "orders-1")))
        ));
    }
}
