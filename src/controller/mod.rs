//! The Kubernetes side: watches TasklistConnections and Secrets, and runs the reconcile.

mod memory;
mod reconcile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector;
use kube::runtime::utils::Predicate;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::camunda::{HttpClient, HttpClientError, HttpSettings, TlsTrust};
use crate::crd::TasklistConnection;
use crate::events::EventPublisher;
use crate::inputs::Inputs;
use crate::metrics::{Metrics, ReasonLabels};
use memory::Memory;

/// The field manager named in server-side apply of Secrets and status.
pub const FIELD_MANAGER: &str = "tasklist-operator";

/// Errors a reconcile cannot turn into a condition: the Kubernetes API failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    events: EventPublisher,
    http_settings: HttpSettings,
    /// One HTTP client per trust configuration: most connections share the default.
    http_clients: Mutex<HashMap<TlsTrust, HttpClient>>,
    memory: Memory,
    /// How many connections are reconciled at once (per watched namespace).
    concurrency: u16,
}

/// Reconciles in flight at once unless `--concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: u16 = 32;

impl Context {
    /// `instance` names this operator process in Events (its Pod name).
    pub fn new(client: Client, http_settings: HttpSettings, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        Context {
            events: EventPublisher::new(client.clone(), instance),
            client,
            metrics,
            http_settings,
            http_clients: Mutex::default(),
            memory: Memory::default(),
            concurrency: DEFAULT_CONCURRENCY,
        }
    }

    /// Reconcile at most this many connections at once (0: no limit).
    pub fn with_concurrency(mut self, concurrency: u16) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// A deleted connection leaves nothing behind in memory or in the metrics.
    fn forget(&self, connection: &TasklistConnection) {
        let (namespace, name) = (connection.namespace().unwrap_or_default(), connection.name_any());
        self.memory.forget(&(namespace.clone(), name.clone()));
        self.metrics.forget_connection(&namespace, &name);
    }

    fn http_client(&self, inputs: &Inputs) -> Result<HttpClient, HttpClientError> {
        let mut clients = self
            .http_clients
            .lock()
            .map_err(|_| HttpClientError::Setup("HTTP client cache poisoned".into()))?;
        if let Some(client) = clients.get(&inputs.trust) {
            return Ok(client.clone());
        }
        let client = HttpClient::new(&self.http_settings, &inputs.trust)?;
        clients.insert(inputs.trust.clone(), client.clone());
        Ok(client)
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
}

async fn run_in(ctx: Arc<Context>, namespace: Option<String>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let connections: Api<TasklistConnection> = scoped_api(&ctx.client, namespace.as_deref());
    let secrets: Api<PartialObjectMeta<Secret>> = match namespace.as_deref() {
        Some(namespace) => Api::namespaced(ctx.client.clone(), namespace),
        None => Api::all(ctx.client.clone()),
    };
    info!(namespace = namespace.as_deref().unwrap_or("<all>"), "watching TasklistConnections");

    let (reader, writer) = reflector::store();
    // Status writes change neither generation nor annotations: they do not wake the controller.
    let forget_ctx = ctx.clone();
    let connection_changes = watcher(connections, watcher::Config::default())
        .backoff(WatchBackoff::default())
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::Delete(deleted)) = event {
                forget_ctx.forget(deleted);
            }
        })
        .applied_objects()
        .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
    // Metadata is enough to know a Secret changed, and keeps memory small.
    let secret_changes = watcher(secrets, watcher::Config::default())
        .backoff(WatchBackoff::default())
        .touched_objects();
    let mapper_ctx = ctx.clone();

    Controller::for_stream(connection_changes, reader)
        .watches_stream(secret_changes, move |secret| mapper_ctx.memory.connections_affected_by(&secret))
        .with_config(controller::Config::default().concurrency(ctx.concurrency))
        // The controller backs off its trigger streams too; kube's default would again wait
        // up to half a minute and more after an API server restart.
        .trigger_backoff(WatchBackoff::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile_logged, error_policy, ctx)
        .for_each(|_| std::future::ready(()))
        .await;
}

#[tracing::instrument(skip_all, fields(connection = %format!("{}/{}", connection.namespace().unwrap_or_default(), connection.name_any())))]
async fn reconcile_logged(connection: Arc<TasklistConnection>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let metrics = ctx.metrics.clone();
    let result = reconcile::reconcile(connection, ctx).await;
    metrics.reconciles.inc();
    metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics
            .reconcile_errors
            .get_or_create(&ReasonLabels {
                reason: "KubernetesApi".into(),
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
