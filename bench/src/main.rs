//! The scale benchmark of issue 12: `make bench N=1000` (see the README's Performance
//! section). Not a test: it measures and reports, and fails only when something breaks.
//!
//! In one run, on one control plane (tests/support), with the test support's stand-in as
//! token endpoint and Tasklist API, and the release operator binary:
//! 1. the floor: the writes the contract requires per new connection (Secret create, status
//!    apply, `CredentialIssued` Event) sent straight to the kube-apiserver, twice;
//! 2. cold start: N connections exist, then the operator starts; time until all are Ready;
//!    with `--shards K`, again with K operator processes sharing them, each one's memory;
//! 3. burst: the operator runs, then N connections are created; time until all are Ready;
//! 4. token requests in both, against the number of distinct clients;
//! 5. steady state over a window: the API server's own request counters, probes, CPU;
//! 6. the operator's RSS and VmHWM, also with unrelated 2 KB Secrets present;
//! 7. its RSS before and after Secrets a tenant could make it cache: 1,000 connections' own
//!    client Secrets growing by 64 KiB they do not read, and 300 Secrets of 1 MB labelled
//!    as the operator's own;
//! 7. rotation under load: client Secrets rotated, time until every connection using one
//!    holds a new token;
//! 8. the nudge (issue 21): an operator with `--nudge-pods`, 1,000 labelled Running Pods
//!    mounting the derived Secrets of 100 connections; every connection refreshed at once;
//!    the API requests the nudge adds (Pod patches, from the audit log) and the time until
//!    every Pod carries the new credential version.
//!
//! Each phase has namespaces of its own; the cold-start namespace is deleted (and gone)
//! before the burst begins, so the steady state and memory figures are for N connections.

mod figures;

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::{Value, json};
use testsupport::controlplane::ControlPlane;
use testsupport::operator::OperatorProcess;
use testsupport::standin::StandinTasklist;
use testsupport::tools::{self, Tools};

const GROUP: &str = "tasklist.camunda.community";
const VERSION: &str = "v1alpha1";
const KIND: &str = "TasklistConnection";
const DERIVED_LABEL: &str = "app.kubernetes.io/managed-by=tasklist-operator";
/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, which Linux fixes at 100 per second.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Parser, Debug)]
#[command(about = "Measures tasklist-operator at scale (issue 12); prints a table and writes JSON")]
struct Args {
    /// Connections per phase.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Distinct OAuth2 clients per 1,000 connections; connection i uses client i mod clients.
    #[arg(long, default_value_t = 100)]
    clients_per_thousand: usize,
    /// Lifetime of the stand-in's tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime: u64,
    /// Length of the steady-state window, in seconds (the table used 300).
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// The operator's `--concurrency`.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests in flight at once when the benchmark itself writes (floor, creating objects).
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Unrelated 2 KB Secrets added to the connections' namespace before the last memory figure.
    #[arg(long, default_value_t = 5000)]
    unrelated_secrets: usize,
    /// Secrets anyone could label as the operator's (`app.kubernetes.io/managed-by`), 1 MB
    /// each, added to the connections' namespace for the last memory figure (issue 18).
    #[arg(long, default_value_t = 300)]
    hostile_labelled: usize,
    /// Further connections, each reading its own client Secret that also holds 64 KiB the
    /// connection does not read, added for the last memory figure (issue 18).
    #[arg(long, default_value_t = 1000)]
    hostile_referenced: usize,
    /// Operator processes of the sharded phase (`--shards K --shard-index i`), a cold start
    /// of N connections split between them, each one's RSS against the one-process cold
    /// start (issue 22); 1: no such phase.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Client Secrets rotated per round.
    #[arg(long, default_value_t = 20)]
    rotated_secrets: usize,
    /// Rotation rounds.
    #[arg(long, default_value_t = 3)]
    rotation_rounds: usize,
    /// Connections of the nudge phase (0: no nudge phase).
    #[arg(long, default_value_t = 100)]
    nudge_connections: usize,
    /// Labelled Running Pods of the nudge phase, each mounting the derived Secret of
    /// connection (pod mod nudge-connections).
    #[arg(long, default_value_t = 1000)]
    nudge_pods: usize,
    /// Run only the nudge phase (the others take minutes).
    #[arg(long)]
    nudge_only: bool,
    /// Stop after the cold start (and the sharded one): the floor, the cold-start ratio and
    /// the memory at all Ready, for repeated runs and heap profiles.
    #[arg(long)]
    cold_start_only: bool,
    /// The operator binary (the release build).
    #[arg(long, default_value = "target/release/tasklist-operator")]
    operator: PathBuf,
    /// The CRD to install.
    #[arg(long, default_value = "crds/tasklistconnection.yaml")]
    crd: PathBuf,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench.json")]
    json: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(
        args.operator.is_file(),
        "no operator binary at {} (build it with `cargo build --release`)",
        args.operator.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

/// A row of the printed table and a field of the JSON report.
struct Report {
    rows: Vec<(String, String)>,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn row(&mut self, figure: &str, value: String) {
        println!("{figure:<52} {value}");
        self.rows.push((figure.to_owned(), value));
    }

    /// The rows and the JSON of a phase that ends when all connections are Ready (cold
    /// start, burst): `title` leads its rows, `short` its detail rows, `key` names its JSON.
    fn ready_phase(&mut self, (title, short, key): (&str, &str, &str), phase: ReadyPhase<'_>, floor: f64, clients: usize, n: usize) {
        let ready = phase.ready.as_secs_f64();
        self.row(
            &format!("{title}: all Ready after (s), ratio"),
            format!("{ready:.2}, {:.2}", ready / floor),
        );
        self.row(
            &format!("{title}: token requests / distinct clients"),
            format!("{} / {clients}", phase.token_requests),
        );
        self.row(
            &format!("{title}: RSS, VmHWM, anonymous RSS at all Ready (MB)"),
            format!(
                "{:.1}, {:.1}, {:.1}",
                mb(phase.memory.rss),
                mb(phase.memory.hwm),
                mb(phase.memory.anonymous)
            ),
        );
        for (series, count) in phase.operator_counters {
            self.row(&format!("  {short}: operator {series}"), format!("{count:.0}"));
        }
        for (request, count) in phase.requests {
            self.row(
                &format!("  {short}: apiserver {request} (per connection)"),
                format!("{count:.0} ({:.2})", count / n as f64),
            );
        }
        self.json.insert(
            key.into(),
            json!({"ready_s": ready, "ratio": ready / floor, "apiserver_requests": phase.requests,
                   "token_requests": phase.token_requests, "rss_bytes": phase.memory.rss, "hwm_bytes": phase.memory.hwm, "anonymous_rss_bytes": phase.memory.anonymous}),
        );
    }
}

/// What cold start and burst both measure.
struct ReadyPhase<'a> {
    ready: Duration,
    token_requests: usize,
    memory: &'a Memory,
    operator_counters: &'a BTreeMap<String, f64>,
    requests: &'a BTreeMap<String, f64>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let tools = Tools::from_env()?;
    let control_plane = ControlPlane::start(&tools).await.context("starting the control plane")?;
    let client = control_plane.client();
    install_crd(&client, &args.crd).await?;
    let standin = StandinTasklist::start().await?;
    standin.set_token_lifetime(Duration::from_secs(args.token_lifetime));
    let clients = (args.connections * args.clients_per_thousand).div_ceil(1000).max(1);
    for c in 0..clients {
        standin.add_client(&client_id(c), &client_secret(c, 0));
    }
    let bench = Bench {
        args,
        clients,
        client,
        control_plane,
        standin,
        connection_resource: ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, KIND)),
    };
    let n = bench.args.connections;
    let mut report = Report {
        rows: Vec::new(),
        json: serde_json::Map::new(),
    };
    println!(
        "bench: {n} connections, {clients} clients, tokens valid {} s, operator --concurrency {}",
        bench.args.token_lifetime, bench.args.concurrency
    );
    report.json.insert(
        "setup".into(),
        json!({"connections": n, "clients": clients, "token_lifetime_s": bench.args.token_lifetime,
               "operator_concurrency": bench.args.concurrency, "writers": bench.args.writers,
               "window_s": bench.args.window, "cores": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0)}),
    );

    if bench.args.nudge_only {
        bench.nudge_phase(&mut report).await.context("nudge")?;
        return report.write(&bench.args.json, started);
    }

    // 1. The floor, twice.
    let mut floors = Vec::new();
    for run in 1..=2 {
        let took = bench.floor().await.with_context(|| format!("floor run {run}"))?;
        report.row(&format!("floor run {run} (s)"), format!("{:.2}", took.as_secs_f64()));
        floors.push(took.as_secs_f64());
    }
    let floor = floors.iter().sum::<f64>() / floors.len() as f64;
    let spread = floors.iter().cloned().fold(f64::MIN, f64::max) - floors.iter().cloned().fold(f64::MAX, f64::min);
    report.row("floor mean (s), spread (s)", format!("{floor:.2}, {spread:.2}"));
    report.json.insert("floor_s".into(), json!(floors));

    // 2. Cold start.
    let cold = bench.cold_start().await.context("cold start")?;
    report.ready_phase(
        ("cold start", "cold", "cold_start"),
        ReadyPhase {
            ready: cold.ready,
            token_requests: cold.token_requests,
            memory: &cold.memory,
            operator_counters: &cold.operator_counters,
            requests: &cold.requests,
        },
        floor,
        clients,
        n,
    );
    let with_events = cold.with_events.as_secs_f64();
    report.row(
        "cold start: all Ready and every CredentialIssued Event (s), ratio",
        format!("{with_events:.2}, {:.2}", with_events / floor),
    );
    report.row(
        "cold start: 50 %, 90 %, 99 % Ready after (s)",
        cold.ready_quantiles
            .iter()
            .map(|at| format!("{:.2}", at.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.json.insert(
        "cold_start_with_events".into(),
        json!({"s": with_events, "ratio": with_events / floor}),
    );

    // 2b. The same cold start split between shards.
    if bench.args.shards > 1 {
        let sharded = bench.sharded_cold_start().await.context("sharded cold start")?;
        let shards = bench.args.shards;
        let ready = sharded.ready.as_secs_f64();
        report.row(
            &format!("sharded cold start ({shards} shards): all Ready after (s), ratio"),
            format!("{ready:.2}, {:.2}", ready / floor),
        );
        for (index, (at_ready, settled)) in sharded.at_ready.iter().zip(&sharded.settled).enumerate() {
            report.row(
                &format!("  shard {index}: RSS at all Ready, 10 s later (MB), share of one process"),
                format!(
                    "{:.1}, {:.1}, {:.0} %",
                    mb(at_ready.rss),
                    mb(settled.rss),
                    100.0 * settled.rss as f64 / cold.memory.rss.max(1) as f64
                ),
            );
        }
        report.json.insert(
            "sharded_cold_start".into(),
            json!({"shards": shards, "ready_s": ready, "ratio": ready / floor,
                   "rss_at_ready_bytes": sharded.at_ready.iter().map(|m| m.rss).collect::<Vec<_>>(),
                   "rss_settled_bytes": sharded.settled.iter().map(|m| m.rss).collect::<Vec<_>>(),
                   "hwm_bytes": sharded.settled.iter().map(|m| m.hwm).collect::<Vec<_>>(),
                   "one_process_rss_bytes": cold.memory.rss}),
        );
    }

    if bench.args.cold_start_only {
        return report.write(&bench.args.json, started);
    }

    // 3. Burst, and everything after it on the same operator.
    let mut burst = bench.burst().await.context("burst")?;
    let burst_memory = process_memory(burst.operator.pid())?;
    report.ready_phase(
        ("burst", "burst", "burst"),
        ReadyPhase {
            ready: burst.ready,
            token_requests: burst.token_requests,
            memory: &burst_memory,
            operator_counters: &burst.operator_counters,
            requests: &burst.requests,
        },
        floor,
        clients,
        n,
    );

    // 5. Steady state.
    let steady = bench.steady_state(&burst).await.context("steady state")?;
    let window = steady.window.as_secs_f64();
    let per_second = |count: f64| count / window;
    let operator_requests: f64 = steady
        .requests
        .iter()
        .filter(|(k, _)| figures::is_operator_resource(k))
        .map(|(_, v)| v)
        .fold(0.0, |a, b| a + b);
    let operator_writes: f64 = steady
        .requests
        .iter()
        .filter(|(k, _)| figures::is_operator_resource(k) && figures::is_write(k))
        .map(|(_, v)| v)
        .fold(0.0, |a, b| a + b);
    report.row(
        &format!("steady {window:.0} s: requests on secrets/tlc/events (/s)"),
        format!("{:.1}", per_second(operator_requests)),
    );
    report.row(&format!("steady {window:.0} s: writes at rest"), format!("{operator_writes:.0}"));
    for (key, count) in &steady.requests {
        report.row(
            &format!("  apiserver {key} (/s)"),
            format!("{:.2} ({count:.0})", per_second(*count)),
        );
    }
    for (what, count) in &steady.audited {
        report.row(&format!("  audit log: {what}"), format!("{count}"));
    }
    if !steady.audited.keys().any(|what| what.starts_with("operator")) {
        report.row("  audit log: operator", "no request".to_owned());
    }
    // kube-controller-manager's garbage collector checks the owners of new dependents.
    let gc_owner_gets = steady
        .audited
        .get("kube-controller-manager get tasklistconnections")
        .copied()
        .unwrap_or_default();
    report.row(
        &format!("steady {window:.0} s after the burst: GC's owner GETs (get tasklistconnections)"),
        format!("{gc_owner_gets}"),
    );
    report.row("steady: probes (/s)", format!("{:.2}", per_second(steady.probes as f64)));
    report.row("steady: token requests", format!("{}", steady.token_requests));
    report.row(
        "steady: operator CPU (% of one core)",
        format!("{:.1}", 100.0 * steady.cpu_seconds / window),
    );
    report.row(
        "steady: RSS, VmHWM (MB)",
        format!("{:.1}, {:.1}", mb(steady.memory.rss), mb(steady.memory.hwm)),
    );
    report.row(
        "a TasklistConnection as JSON, its managedFields (bytes)",
        format!("{:.0}, {:.0}", steady.connection_json_bytes, steady.managed_fields_json_bytes),
    );
    report.json.insert(
        "steady".into(),
        json!({"window_s": window, "gc_owner_gets": gc_owner_gets, "audited": steady.audited, "apiserver_requests": steady.requests, "operator_resource_requests": operator_requests,
               "writes_at_rest": operator_writes, "probes": steady.probes, "probes_per_s": per_second(steady.probes as f64),
               "token_requests": steady.token_requests, "connection_json_bytes": steady.connection_json_bytes,
               "managed_fields_json_bytes": steady.managed_fields_json_bytes,
               "operator_cpu_s": steady.cpu_seconds, "rss_bytes": steady.memory.rss, "hwm_bytes": steady.memory.hwm}),
    );

    // 7. Rotation under load.
    let rotation = bench.rotation(&burst).await.context("rotation")?;
    let p50 = figures::percentile(&rotation, 50.0).unwrap_or_default();
    let p99 = figures::percentile(&rotation, 99.0).unwrap_or_default();
    report.row(
        &format!("rotation: {} samples, p50, p99 (s)", rotation.len()),
        format!("{:.3}, {:.3}", p50.as_secs_f64(), p99.as_secs_f64()),
    );
    report.json.insert(
        "rotation".into(),
        json!({"samples_s": rotation.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
               "p50_s": p50.as_secs_f64(), "p99_s": p99.as_secs_f64()}),
    );

    // 6. Memory with unrelated Secrets.
    let with_unrelated = bench.with_unrelated_secrets(&burst).await.context("unrelated Secrets")?;
    report.row(
        &format!("with {} unrelated 2 KB Secrets: RSS, VmHWM (MB)", bench.args.unrelated_secrets),
        format!("{:.1}, {:.1}", mb(with_unrelated.rss), mb(with_unrelated.hwm)),
    );
    report.json.insert(
        "with_unrelated_secrets".into(),
        json!({"count": bench.args.unrelated_secrets, "rss_bytes": with_unrelated.rss, "hwm_bytes": with_unrelated.hwm}),
    );

    // 7. Memory with Secrets a tenant could make the operator cache.
    let (before, after) = bench.with_hostile_secrets(&burst).await.context("hostile Secrets")?;
    report.row(
        &format!(
            "{} read Secrets +64 KiB, +{} labelled 1 MB: RSS before, after, growth (MB)",
            bench.args.hostile_referenced, bench.args.hostile_labelled
        ),
        format!(
            "{:.1}, {:.1}, {:.1}",
            mb(before.rss),
            mb(after.rss),
            mb(after.rss.saturating_sub(before.rss))
        ),
    );
    report.json.insert(
        "with_hostile_secrets".into(),
        json!({"referenced": bench.args.hostile_referenced, "labelled": bench.args.hostile_labelled,
               "rss_before_bytes": before.rss, "rss_after_bytes": after.rss, "hwm_after_bytes": after.hwm}),
    );

    burst.operator.terminate(Duration::from_secs(30)).await?;

    // 8. The nudge.
    if bench.args.nudge_connections > 0 {
        bench.nudge_phase(&mut report).await.context("nudge")?;
    }
    report.write(&bench.args.json, started)
}

impl Report {
    /// Adds the whole run's time and the table, and writes the JSON report.
    fn write(mut self, path: &Path, started: Instant) -> anyhow::Result<()> {
        let took = started.elapsed().as_secs_f64();
        self.row("whole run (s)", format!("{took:.0}"));
        self.json.insert("run_s".into(), json!(took));
        self.json
            .insert("table".into(), Value::Array(self.rows.iter().map(|(k, v)| json!([k, v])).collect()));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(self.json))?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("bench: JSON written to {}", path.display());
        Ok(())
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

fn client_id(c: usize) -> String {
    format!("bench-client-{c:04}")
}

/// The client secret of client `c` after `rotation` rotations.
fn client_secret(c: usize, rotation: usize) -> String {
    format!("bench-secret-{c:04}-r{rotation}-x7Qp2Lm9")
}

fn client_secret_name(c: usize) -> String {
    format!("client-{c:04}")
}

fn connection_name(i: usize) -> String {
    format!("conn-{i:05}")
}

fn derived_secret_name(i: usize) -> String {
    format!("{}-tasklist-auth", connection_name(i))
}

async fn install_crd(client: &Client, path: &Path) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the CRD {}", path.display()))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    crds.create(&PostParams::default(), &crd).await.context("creating the CRD")?;
    let established = kube::runtime::wait::conditions::is_crd_established();
    let name = crd.metadata.name.clone().unwrap_or_default();
    tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(crds, &name, established),
    )
    .await
    .context("the CRD was not established within 30 s")??;
    Ok(())
}

struct Bench {
    args: Args,
    clients: usize,
    client: Client,
    control_plane: ControlPlane,
    standin: StandinTasklist,
    connection_resource: ApiResource,
}

struct ColdStart {
    ready: Duration,
    /// Until all were Ready and every connection's `CredentialIssued` Event was created.
    with_events: Duration,
    /// When half, 90 % and 99 % of the connections were Ready.
    ready_quantiles: Vec<Duration>,
    /// The operator's own counters when all were Ready (reconciles, probes, tokens saved).
    operator_counters: BTreeMap<String, f64>,
    /// The API server's requests on secrets, TasklistConnections and Events meanwhile.
    requests: BTreeMap<String, f64>,
    token_requests: usize,
    memory: Memory,
}

/// The sharded cold start: until all Ready, and each shard's memory then and 10 s later.
struct Sharded {
    ready: Duration,
    at_ready: Vec<Memory>,
    settled: Vec<Memory>,
}

/// The burst phase's operator and namespace, which the later phases go on using.
struct Burst {
    ready: Duration,
    operator_counters: BTreeMap<String, f64>,
    /// The API server's requests on secrets, TasklistConnections and Events meanwhile
    /// (the benchmark's own creates of the connections included).
    requests: BTreeMap<String, f64>,
    token_requests: usize,
    operator: OperatorProcess,
    namespace: String,
    tokens: TokenTracker,
}

struct SteadyState {
    window: Duration,
    /// Mean size of a TasklistConnection as JSON, and of its managedFields alone, in bytes.
    connection_json_bytes: f64,
    managed_fields_json_bytes: f64,
    requests: BTreeMap<String, f64>,
    /// From the audit log, in the connections' namespace, by client: `operator` (every
    /// client but kube-controller-manager: the benchmark is idle) or
    /// `kube-controller-manager`, then verb and resource.
    audited: BTreeMap<String, usize>,
    probes: usize,
    token_requests: usize,
    cpu_seconds: f64,
    memory: Memory,
}

impl Bench {
    fn connections(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.connection_resource)
    }

    fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Creates the N connections of `namespace`, `writers` at a time.
    async fn create_connections(&self, namespace: &str) -> anyhow::Result<()> {
        self.create_some_connections(namespace, self.args.connections).await
    }

    /// Creates `count` connections in `namespace`, `writers` at a time.
    async fn create_some_connections(&self, namespace: &str, count: usize) -> anyhow::Result<()> {
        let api = self.connections(namespace);
        let (url, token_url) = (self.standin.url(), self.standin.token_url());
        futures::stream::iter(0..count)
            .map(|i| {
                let api = api.clone();
                let mut object = DynamicObject::new(&connection_name(i), &self.connection_resource);
                object.data = json!({"spec": {
                    "url": url,
                    "auth": {"oauth2": {"tokenUrl": token_url, "clientSecretRef": {"name": client_secret_name(i % self.clients)}}},
                }});
                async move { create(&api, &object).await }
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await
            .with_context(|| format!("creating connections in {namespace}"))?;
        Ok(())
    }

    async fn create_client_secrets(&self, namespace: &str) -> anyhow::Result<()> {
        // The Secrets hold each client's first secret: the stand-in takes it again (the
        // rotation phase taught it later ones, which made the nudge phase's clients fail).
        for c in 0..self.clients {
            self.standin.add_client(&client_id(c), &client_secret(c, 0));
        }
        let api = self.secrets(namespace);
        futures::stream::iter(0..self.clients)
            .map(|c| {
                let api = api.clone();
                let secret = client_secret_object(c, 0);
                async move { create(&api, &secret).await }
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await
            .with_context(|| format!("creating client Secrets in {namespace}"))?;
        Ok(())
    }

    fn start_operator(&self, namespace: &str, listen: &str) -> anyhow::Result<OperatorProcess> {
        self.start_operator_with(namespace, listen, &[])
    }

    fn start_operator_with(&self, namespace: &str, listen: &str, extra: &[String]) -> anyhow::Result<OperatorProcess> {
        let concurrency = self.args.concurrency.to_string();
        let mut args: Vec<String> = [
            "run",
            "--namespace",
            namespace,
            "--listen-addr",
            listen,
            "--concurrency",
            &concurrency,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        OperatorProcess::start(
            &self.args.operator,
            self.control_plane.kubeconfig(),
            &args,
            // TLO_BENCH_RUST_LOG: a closer look at one run (the figures are taken at info).
            &[(
                "RUST_LOG".to_owned(),
                std::env::var("TLO_BENCH_RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )],
        )
    }

    /// How long the writes the contract requires per new connection take when sent straight
    /// to the API server: one Secret create, one status apply and one Event each, the three
    /// in sequence, `writers` connections at once over one HTTP/2 connection. The
    /// connections they concern are created first, untimed, in a namespace no operator watches.
    async fn floor(&self) -> anyhow::Result<Duration> {
        let namespace = self.control_plane.create_namespace("floor").await?;
        self.create_connections(&namespace).await?;
        let connections = self.connections(&namespace);
        let uids: HashMap<String, String> = connections
            .list(&ListParams::default())
            .await?
            .into_iter()
            .map(|o| (o.metadata.name.unwrap_or_default(), o.metadata.uid.unwrap_or_default()))
            .collect();
        let http = FloorClient::new(&self.control_plane)?;
        let started = Instant::now();
        futures::stream::iter(0..self.args.connections)
            .map(|i| {
                let uid = uids.get(&connection_name(i)).cloned().unwrap_or_default();
                http.contract_writes(&namespace, i, uid)
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(started.elapsed())
    }

    async fn cold_start(&self) -> anyhow::Result<ColdStart> {
        let namespace = self.control_plane.create_namespace("cold").await?;
        self.create_client_secrets(&namespace).await?;
        self.create_connections(&namespace).await?;
        let ready = ReadyTracker::start(self.connections(&namespace));
        let issued = IssuedEventTracker::start(Api::namespaced(self.client.clone(), &namespace));
        let tokens_before = self.standin.token_requests_arrived();
        let listen = format!("127.0.0.1:{}", tools::free_loopback_port()?);
        let requests_before = self.apiserver_requests().await?;
        let started = Instant::now();
        let mut operator = self.start_operator(&namespace, &listen)?;
        let all_ready = ready.wait_for(self.args.connections, &mut operator).await?;
        let took = all_ready.duration_since(started);
        // The floor's connections each have their Event too: the fair end is the later of
        // the last Ready and the last CredentialIssued Event.
        let last_event = issued.wait_for(self.args.connections).await?;
        let with_events = all_ready.max(last_event).duration_since(started);
        let ready_quantiles = ready.quantiles(started, &[0.5, 0.9, 0.99])?;
        let token_requests = self.standin.token_requests_arrived() - tokens_before;
        let requests = operator_resources(figures::counter_delta(&requests_before, &self.apiserver_requests().await?));
        let memory = process_memory(operator.pid())?;
        let operator_counters = operator_counters(&listen).await?;
        operator.terminate(Duration::from_secs(30)).await?;
        // TLO_BENCH_OPERATOR_LOG: where to keep the cold start's operator log, for a closer look.
        if let Ok(path) = std::env::var("TLO_BENCH_OPERATOR_LOG") {
            std::fs::write(&path, operator.logs()).with_context(|| format!("cannot write {path}"))?;
        }
        self.delete_namespace(&namespace).await?;
        Ok(ColdStart {
            ready: took,
            with_events,
            ready_quantiles,
            operator_counters,
            requests,
            token_requests,
            memory,
        })
    }

    /// Like the cold start, with `shards` operator processes each handling its share
    /// (`--shards`, `--shard-index`): time until all N are Ready, and each process's memory
    /// then and 10 s later.
    async fn sharded_cold_start(&self) -> anyhow::Result<Sharded> {
        let shards = self.args.shards;
        let namespace = self.control_plane.create_namespace("sharded").await?;
        self.create_client_secrets(&namespace).await?;
        self.create_connections(&namespace).await?;
        let ready = ReadyTracker::start(self.connections(&namespace));
        let started = Instant::now();
        let mut operators = Vec::new();
        for index in 0..shards {
            let listen = format!("127.0.0.1:{}", tools::free_loopback_port()?);
            let extra = [
                "--shards".to_owned(),
                shards.to_string(),
                "--shard-index".to_owned(),
                index.to_string(),
            ];
            operators.push(self.start_operator_with(&namespace, &listen, &extra)?);
        }
        let all_ready = match operators.first_mut() {
            Some(first) => ready.wait_for(self.args.connections, first).await?,
            None => bail!("no shard"),
        };
        let at_ready = operators
            .iter()
            .map(|o| process_memory(o.pid()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let settled = operators
            .iter()
            .map(|o| process_memory(o.pid()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for operator in &mut operators {
            operator.terminate(Duration::from_secs(30)).await?;
        }
        self.delete_namespace(&namespace).await?;
        Ok(Sharded {
            ready: all_ready.duration_since(started),
            at_ready,
            settled,
        })
    }

    async fn burst(&self) -> anyhow::Result<Burst> {
        let namespace = self.control_plane.create_namespace("burst").await?;
        self.create_client_secrets(&namespace).await?;
        let ready = ReadyTracker::start(self.connections(&namespace));
        let tokens = TokenTracker::start(self.secrets(&namespace));
        let listen = format!("127.0.0.1:{}", tools::free_loopback_port()?);
        let mut operator = self.start_operator(&namespace, &listen)?;
        wait_until_ready_endpoint(&listen, &mut operator).await?;
        let tokens_before = self.standin.token_requests_arrived();
        let requests_before = self.apiserver_requests().await?;
        let started = Instant::now();
        self.create_connections(&namespace).await?;
        let all_ready = ready.wait_for(self.args.connections, &mut operator).await?;
        let requests = operator_resources(figures::counter_delta(&requests_before, &self.apiserver_requests().await?));
        let operator_counters = operator_counters(&listen).await?;
        Ok(Burst {
            ready: all_ready.duration_since(started),
            operator_counters,
            requests,
            token_requests: self.standin.token_requests_arrived() - tokens_before,
            operator,
            namespace,
            tokens,
        })
    }

    /// Counts over `window` with nothing changing and the benchmark idle (its two watches
    /// stay open but carry no events). The API server's counters include every client:
    /// kube-controller-manager's requests show up too (leases, its own lists).
    async fn steady_state(&self, burst: &Burst) -> anyhow::Result<SteadyState> {
        // Let the last status writes and Events of the burst settle.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pid = burst.operator.pid();
        let requests_before = self.apiserver_requests().await?;
        let audited_before = self.control_plane.api_requests(&burst.namespace)?.len();
        let probes_before = self.standin.api_requests().len();
        let tokens_before = self.standin.token_requests_arrived();
        let cpu_before = cpu_seconds(pid)?;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(self.args.window)).await;
        let window = started.elapsed();
        let cpu_seconds = cpu_seconds(pid)? - cpu_before;
        let requests_after = self.apiserver_requests().await?;
        let audited = self.control_plane.api_requests(&burst.namespace)?;
        let mut by_client = BTreeMap::new();
        for request in audited.iter().skip(audited_before) {
            let client = if request.user_agent.starts_with("kube-controller-manager") {
                "kube-controller-manager"
            } else {
                "operator"
            };
            let what = format!("{client} {} {}", request.verb, request.resource);
            *by_client.entry(what).or_insert(0) += 1;
        }
        // TLO_BENCH_OPERATOR_LOG: where to copy the operator's log after the window.
        if let Ok(path) = std::env::var("TLO_BENCH_OPERATOR_LOG") {
            std::fs::write(&path, burst.operator.logs()).with_context(|| format!("writing {path}"))?;
        }
        // What a full object costs, and how much of it is managedFields (after the window).
        let listed = self.connections(&burst.namespace).list(&ListParams::default()).await?;
        let count = listed.items.len().max(1) as f64;
        let (mut whole, mut managed) = (0usize, 0usize);
        for object in &listed.items {
            whole += serde_json::to_vec(object)?.len();
            managed += serde_json::to_vec(&object.metadata.managed_fields)?.len();
        }
        Ok(SteadyState {
            window,
            connection_json_bytes: whole as f64 / count,
            managed_fields_json_bytes: managed as f64 / count,
            requests: figures::counter_delta(&requests_before, &requests_after),
            audited: by_client,
            probes: self.standin.api_requests().len() - probes_before,
            token_requests: self.standin.token_requests_arrived() - tokens_before,
            cpu_seconds,
            memory: process_memory(pid)?,
        })
    }

    /// Rotates `rotated_secrets` client Secrets one after the other, `rotation_rounds` times
    /// (other clients each round), while all N connections exist. A sample: from the update
    /// of one client Secret until every connection using it holds a new token in its derived
    /// Secret; the next rotation starts after that.
    async fn rotation(&self, burst: &Burst) -> anyhow::Result<Vec<Duration>> {
        let secrets = self.secrets(&burst.namespace);
        let rotated = self.args.rotated_secrets.min(self.clients);
        let mut samples = Vec::new();
        for round in 1..=self.args.rotation_rounds {
            for k in 0..rotated {
                let c = ((round - 1) * rotated + k) % self.clients;
                let users: Vec<String> = (0..self.args.connections)
                    .filter(|i| i % self.clients == c)
                    .map(derived_secret_name)
                    .collect();
                let old_tokens = burst.tokens.tokens_of(&users);
                // The token endpoint learns the new secret first, as an identity provider would.
                self.standin.add_client(&client_id(c), &client_secret(c, round));
                let updated = Instant::now();
                secrets
                    .patch(
                        &client_secret_name(c),
                        &PatchParams::default(),
                        &Patch::Merge(&client_secret_object(c, round)),
                    )
                    .await?;
                let renewed = burst
                    .tokens
                    .wait_for_new_tokens(&old_tokens, Duration::from_secs(120))
                    .await
                    .with_context(|| format!("round {round}: connections of client {c}"))?;
                samples.push(renewed.saturating_duration_since(updated));
            }
        }
        Ok(samples)
    }

    async fn with_unrelated_secrets(&self, burst: &Burst) -> anyhow::Result<Memory> {
        let api = self.secrets(&burst.namespace);
        // 2 KB of data each (base64 of 1,536 random-looking bytes would be larger on the wire;
        // the size that counts is what the API server stores and sends).
        let filler: String = (0..2048).map(|k| char::from(b'a' + (k % 26) as u8)).collect();
        futures::stream::iter(0..self.args.unrelated_secrets)
            .map(|k| {
                let api = api.clone();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("unrelated-{k:05}")),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([("payload".to_owned(), ByteString(filler.clone().into_bytes()))])),
                    ..Secret::default()
                };
                async move { create(&api, &secret).await }
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await?;
        // The operator's Secret watch sees them all within moments; give it time to settle.
        tokio::time::sleep(Duration::from_secs(10)).await;
        process_memory(burst.operator.pid())
    }

    /// In the burst's namespace: `hostile_referenced` more connections, each reading a client
    /// Secret of its own, Ready first (the baseline); then every one of those Secrets grows
    /// by 64 KiB no connection reads (a new version each, read again), and
    /// `hostile_labelled` Secrets of 1 MB appear with the operator's label. Returns the
    /// operator's memory at the baseline and once it has settled: what a tenant adds to the
    /// operator's caches beyond what its connections cost.
    async fn with_hostile_secrets(&self, burst: &Burst) -> anyhow::Result<(Memory, Memory)> {
        let api = self.secrets(&burst.namespace);
        let first = self.clients;
        let hostile = first..first + self.args.hostile_referenced;
        futures::stream::iter(hostile.clone())
            .map(|c| {
                let api = api.clone();
                self.standin.add_client(&client_id(c), &client_secret(c, 0));
                let secret = client_secret_object(c, 0);
                async move { create(&api, &secret).await }
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await?;
        let connections = self.connections(&burst.namespace);
        let (url, token_url) = (self.standin.url(), self.standin.token_url());
        futures::stream::iter(hostile.clone())
            .map(|c| {
                let api = connections.clone();
                let mut object = DynamicObject::new(&format!("reads-{c:05}"), &self.connection_resource);
                object.data = json!({"spec": {
                    "url": url,
                    "auth": {"oauth2": {"tokenUrl": token_url, "clientSecretRef": {"name": client_secret_name(c)}}},
                }});
                async move { create(&api, &object).await }
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await?;
        // Their tokens obtained and written: the baseline.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let before = process_memory(burst.operator.pid())?;

        let extra = ByteString(vec![b'y'; 64 * 1024]);
        futures::stream::iter(hostile)
            .map(|c| {
                let api = api.clone();
                let mut secret = client_secret_object(c, 0);
                if let Some(data) = secret.data.as_mut() {
                    data.insert("unread".to_owned(), extra.clone());
                }
                async move { api.replace(&client_secret_name(c), &PostParams::default(), &secret).await.map(drop) }
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await?;
        let big = ByteString(vec![b'x'; 1_000_000]);
        futures::stream::iter(0..self.args.hostile_labelled)
            .map(|k| {
                let api = api.clone();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("labelled-{k:05}")),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "tasklist-operator".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([("payload".to_owned(), big.clone())])),
                    ..Secret::default()
                };
                async move { create(&api, &secret).await }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        // The watches see them within moments, and the grown Secrets (new versions) are read
        // again: give it time to settle.
        tokio::time::sleep(Duration::from_secs(20)).await;
        Ok((before, process_memory(burst.operator.pid())?))
    }

    async fn apiserver_requests(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = self
            .client
            .request_text(request)
            .await
            .context("reading the kube-apiserver's /metrics")?;
        Ok(figures::apiserver_requests(&text))
    }

    /// Phase 8, the nudge (issue 21): `nudge_connections` connections Ready under an operator with
    /// `--nudge-pods`, then `nudge_pods` labelled Pods, each mounting the derived Secret of
    /// connection (pod mod connections), set Running through the status subresource (no
    /// kubelet here); then every connection is refreshed at once (the refresh annotation).
    /// Counted from the audit log of that namespace between the refresh and the last Pod
    /// nudged: the operator's Pod patches and Secret writes.
    async fn nudge_phase(&self, report: &mut Report) -> anyhow::Result<()> {
        let (connections, pod_count) = (self.args.nudge_connections.max(1), self.args.nudge_pods);
        let namespace = self.control_plane.create_namespace("nudge").await?;
        self.create_client_secrets(&namespace).await?;
        let ready = ReadyTracker::start(self.connections(&namespace));
        let listen = format!("127.0.0.1:{}", tools::free_loopback_port()?);
        let mut operator = self.start_operator_with(&namespace, &listen, &["--nudge-pods".to_owned()])?;
        wait_until_ready_endpoint(&listen, &mut operator).await?;
        self.create_some_connections(&namespace, connections).await?;
        ready.wait_for(connections, &mut operator).await?;
        let memory_without_pods = process_memory(operator.pid())?;

        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &namespace);
        // Pods are admitted once the namespace's default ServiceAccount exists.
        let deadline = Instant::now() + Duration::from_secs(30);
        while accounts.get_opt("default").await?.is_none() {
            ensure!(Instant::now() < deadline, "no default ServiceAccount in {namespace} after 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        futures::stream::iter(0..pod_count)
            .map(|j| {
                let pods = pods.clone();
                async move {
                    let name = format!("app-{j}");
                    let pod: Pod = serde_json::from_value(json!({
                        "metadata": {"name": name, "labels": {"tasklist.camunda.community/nudge": "true", "app": "bench"}},
                        "spec": {
                            "automountServiceAccountToken": false,
                            "containers": [{"name": "app", "image": "bench.test/app:1",
                                            "volumeMounts": [{"name": "tasklist", "mountPath": "/var/run/tasklist"}]}],
                            "volumes": [{"name": "tasklist", "secret": {"secretName": derived_secret_name(j % connections)}}],
                        },
                    }))?;
                    pods.create(&PostParams::default(), &pod).await?;
                    let running = json!({"status": {"phase": "Running"}});
                    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(running)).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await
            .context("creating the Pods")?;
        // The operator's Pod watch sees them within moments.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let memory_with_pods = process_memory(operator.pid())?;

        let audited_before = self.control_plane.api_requests(&namespace)?.len();
        let started = Instant::now();
        let api = self.connections(&namespace);
        futures::stream::iter(0..connections)
            .map(|i| {
                let api = api.clone();
                let patch = json!({"metadata": {"annotations": {"tasklist.camunda.community/refresh": "bench-nudge"}}});
                async move {
                    api.patch(&connection_name(i), &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .map(drop)
                }
            })
            .buffer_unordered(self.args.writers)
            .try_collect::<Vec<()>>()
            .await
            .context("refreshing the connections")?;
        let all_nudged = loop {
            let listed = pods.list_metadata(&ListParams::default()).await?;
            let nudged = listed
                .items
                .iter()
                .filter(|pod| {
                    pod.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key("tasklist.camunda.community/credential-version"))
                })
                .count();
            if nudged >= pod_count {
                break started.elapsed();
            }
            ensure!(
                started.elapsed() < Duration::from_secs(180),
                "only {nudged} of {pod_count} Pods nudged 180 s after the refresh"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        // Let the audit log catch up with the last requests.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let audited = self.control_plane.api_requests(&namespace)?;
        let after: Vec<_> = audited.iter().skip(audited_before).collect();
        let count = |verb: &str, resource: &str| {
            after
                .iter()
                .filter(|r| r.verb == verb && r.resource == resource && r.subresource.is_empty() && r.code < 300)
                .count()
        };
        let (pod_patches, secret_writes) = (count("patch", "pods"), count("patch", "secrets"));
        let failed_pod_patches = after
            .iter()
            .filter(|r| r.verb == "patch" && r.resource == "pods" && r.subresource.is_empty() && r.code >= 300)
            .count();
        let counters = operator_counters(&listen).await?;
        operator.terminate(Duration::from_secs(30)).await?;
        self.delete_namespace(&namespace).await?;

        let title = format!("nudge, {pod_count} Pods over {connections} connections");
        report.row(
            &format!("{title}: refresh of all to all Pods nudged (s)"),
            format!("{:.2}", all_nudged.as_secs_f64()),
        );
        report.row(
            &format!("{title}: Pod patches, failed, Secret writes"),
            format!("{pod_patches}, {failed_pod_patches}, {secret_writes}"),
        );
        report.row(
            &format!("{title}: Pod patches per Secret write"),
            format!("{:.2}", pod_patches as f64 / secret_writes.max(1) as f64),
        );
        report.row(
            &format!("{title}: RSS before, after the Pods (MB)"),
            format!("{:.1}, {:.1}", mb(memory_without_pods.rss), mb(memory_with_pods.rss)),
        );
        report.json.insert(
            "nudge".into(),
            json!({"connections": connections, "pods": pod_count, "all_nudged_s": all_nudged.as_secs_f64(),
                   "pod_patches": pod_patches, "failed_pod_patches": failed_pod_patches, "secret_writes": secret_writes,
                   "pod_nudges_patched": counters.get("tasklist_operator_pod_nudges_total{result=\"patched\"}"),
                   "rss_without_pods_bytes": memory_without_pods.rss, "rss_with_pods_bytes": memory_with_pods.rss}),
        );
        Ok(())
    }

    async fn delete_namespace(&self, namespace: &str) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.delete(namespace, &Default::default()).await?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while api.get_opt(namespace).await?.is_some() {
            ensure!(
                Instant::now() < deadline,
                "namespace {namespace} still there 300 s after its deletion"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }
}

/// Only the counters of what the operator reads and writes.
fn operator_resources(requests: BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    requests.into_iter().filter(|(key, _)| figures::is_operator_resource(key)).collect()
}

fn client_secret_object(c: usize, rotation: usize) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(client_secret_name(c)),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            ("client_id".to_owned(), ByteString(client_id(c).into_bytes())),
            ("client_secret".to_owned(), ByteString(client_secret(c, rotation).into_bytes())),
        ])),
        ..Secret::default()
    }
}

/// Waits until the operator answers `/readyz` (it has listed its TasklistConnections).
/// The operator's own counters (`tasklist_operator_*_total`), by series.
async fn operator_counters(listen: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = reqwest::get(format!("http://{listen}/metrics")).await?.text().await?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with("tasklist_operator_") && !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            (name.ends_with("_total") && !name.contains("duration")).then(|| Some((series.to_owned(), value.parse().ok()?)))?
        })
        .collect())
}

async fn wait_until_ready_endpoint(listen: &str, operator: &mut OperatorProcess) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = http.get(format!("http://{listen}/readyz")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if !operator.is_running() || Instant::now() > deadline {
            bail!("the operator did not become ready:\n{}", tail(&operator.logs(), 30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// When each object of a watch was first seen passing a test, by the name the test gives.
struct FirstSeen {
    first_seen: Arc<Mutex<HashMap<String, Instant>>>,
    watch: tokio::task::JoinHandle<()>,
}

impl FirstSeen {
    fn start<K>(api: Api<K>, seen_as: impl Fn(K) -> Option<String> + Send + 'static) -> FirstSeen
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let first_seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let seen = first_seen.clone();
        let watch = tokio::spawn(async move {
            let mut objects = std::pin::pin!(watcher(api, watcher::Config::default()).applied_objects());
            while let Some(object) = objects.next().await {
                if let Some(name) = object.ok().and_then(&seen_as)
                    && let Ok(mut seen) = seen.lock()
                {
                    seen.entry(name).or_insert_with(Instant::now);
                }
            }
        });
        FirstSeen { first_seen, watch }
    }

    /// How many were seen, and when the last of them was.
    fn seen(&self) -> anyhow::Result<(usize, Option<Instant>)> {
        let seen = self.first_seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok((seen.len(), seen.values().max().copied()))
    }

    /// When the given shares of those seen were, from `started`.
    fn quantiles(&self, started: Instant, shares: &[f64]) -> anyhow::Result<Vec<Duration>> {
        let seen = self.first_seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut times: Vec<Duration> = seen.values().map(|at| at.duration_since(started)).collect();
        times.sort();
        Ok(shares
            .iter()
            .map(|share| {
                let index = ((times.len() as f64 * share).ceil() as usize).clamp(1, times.len().max(1)) - 1;
                times.get(index).copied().unwrap_or_default()
            })
            .collect())
    }

    /// Waits until `count` were seen, while `going_on` says so and until `deadline`; returns
    /// when the last one was seen, or `why_not` of how many were.
    async fn wait_for(
        &self,
        count: usize,
        deadline: Instant,
        mut going_on: impl FnMut() -> bool,
        why_not: impl Fn(usize) -> String,
    ) -> anyhow::Result<Instant> {
        loop {
            let (seen, last) = self.seen()?;
            if seen >= count
                && let Some(last) = last
            {
                return Ok(last);
            }
            if !going_on() || Instant::now() > deadline {
                bail!("{}", why_not(seen));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for FirstSeen {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

/// When each connection of a namespace was first seen Ready.
struct ReadyTracker(FirstSeen);

impl ReadyTracker {
    fn start(api: Api<DynamicObject>) -> ReadyTracker {
        ReadyTracker(FirstSeen::start(api, |object: DynamicObject| {
            is_ready(&object).then(|| object.metadata.name.clone().unwrap_or_default())
        }))
    }

    /// When the given shares of the connections seen Ready were, from `started`.
    fn quantiles(&self, started: Instant, shares: &[f64]) -> anyhow::Result<Vec<Duration>> {
        self.0.quantiles(started, shares)
    }

    /// Waits until `count` connections have been Ready; returns when the last one became so.
    async fn wait_for(&self, count: usize, operator: &mut OperatorProcess) -> anyhow::Result<Instant> {
        // Generous: the slowest figure is 7 ms per connection.
        let deadline = Instant::now() + Duration::from_secs(120) + Duration::from_millis(50 * count as u64);
        let last = self
            .0
            .wait_for(
                count,
                deadline,
                || operator.is_running(),
                |seen| format!("only {seen} of {count} connections became Ready"),
            )
            .await;
        last.map_err(|error| anyhow::anyhow!("{error}; operator log:\n{}", tail(&operator.logs(), 30)))
    }
}

/// When each connection's first `CredentialIssued` Event was seen, by a watch of the
/// namespace's Events (the operator sends them off the reconcile's path).
struct IssuedEventTracker(FirstSeen);

impl IssuedEventTracker {
    fn start(api: Api<Event>) -> IssuedEventTracker {
        IssuedEventTracker(FirstSeen::start(api, |event: Event| {
            (event.reason.as_deref() == Some("CredentialIssued"))
                .then_some(event.regarding)
                .flatten()
                .and_then(|regarding| regarding.name)
        }))
    }

    /// Waits (up to a minute) until `count` connections have their Event; returns when the
    /// last one was seen.
    async fn wait_for(&self, count: usize) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(60);
        self.0
            .wait_for(
                count,
                deadline,
                || true,
                |seen| format!("only {seen} of {count} connections had a CredentialIssued Event a minute after all were Ready"),
            )
            .await
    }
}

fn is_ready(object: &DynamicObject) -> bool {
    object.data["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// The token each derived Secret holds (as a hash) and when it last changed, from a watch.
struct TokenTracker {
    tokens: Arc<Mutex<HashMap<String, (u64, Instant)>>>,
    watch: tokio::task::JoinHandle<()>,
}

impl TokenTracker {
    fn start(api: Api<Secret>) -> TokenTracker {
        let tokens: Arc<Mutex<HashMap<String, (u64, Instant)>>> = Arc::default();
        let seen = tokens.clone();
        let watch = tokio::spawn(async move {
            let config = watcher::Config::default().labels(DERIVED_LABEL);
            let mut events = std::pin::pin!(watcher(api, config).applied_objects());
            while let Some(event) = events.next().await {
                let Ok(secret) = event else { continue };
                let Some(token) = secret.data.as_ref().and_then(|d| d.get("token")) else {
                    continue;
                };
                let mut hasher = DefaultHasher::new();
                token.0.hash(&mut hasher);
                let hash = hasher.finish();
                if let Ok(mut seen) = seen.lock() {
                    let entry = seen
                        .entry(secret.metadata.name.clone().unwrap_or_default())
                        .or_insert((hash, Instant::now()));
                    if entry.0 != hash {
                        *entry = (hash, Instant::now());
                    }
                }
            }
        });
        TokenTracker { tokens, watch }
    }

    fn tokens_of(&self, names: &[String]) -> HashMap<String, u64> {
        let tokens = self.tokens.lock().map(|t| t.clone()).unwrap_or_default();
        names
            .iter()
            .map(|name| (name.clone(), tokens.get(name).map(|t| t.0).unwrap_or_default()))
            .collect()
    }

    /// Waits until every Secret of `old` holds another token; returns when the last changed.
    async fn wait_for_new_tokens(&self, old: &HashMap<String, u64>, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let (renewed, last) = {
                let tokens = self.tokens.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                let changed: Vec<Instant> = old
                    .iter()
                    .filter_map(|(name, hash)| tokens.get(name).filter(|t| t.0 != *hash).map(|t| t.1))
                    .collect();
                (changed.len(), changed.into_iter().max())
            };
            if renewed == old.len()
                && let Some(last) = last
            {
                return Ok(last);
            }
            ensure!(
                Instant::now() < deadline,
                "only {renewed} of {} derived Secrets got a new token within {timeout:?}",
                old.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TokenTracker {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

/// The floor's HTTP/2 client: one connection to the API server, as cluster admin.
struct FloorClient {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl FloorClient {
    fn new(control_plane: &ControlPlane) -> anyhow::Result<FloorClient> {
        let kubeconfig: Value = serde_yaml::from_str(&std::fs::read_to_string(control_plane.kubeconfig())?)?;
        let token = kubeconfig["users"][0]["user"]["token"]
            .as_str()
            .context("the admin kubeconfig has no token")?
            .to_owned();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(control_plane.ca_pem().as_bytes())?)
            .http2_prior_knowledge()
            .build()?;
        Ok(FloorClient {
            http,
            server: control_plane.server_url(),
            token,
        })
    }

    async fn send(&self, method: reqwest::Method, path: &str, content_type: &str, body: String) -> anyhow::Result<()> {
        let response = self
            .http
            .request(method.clone(), format!("{}{path}", self.server))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        // Read to the end: a dropped answer resets its HTTP/2 stream, and the h2 crate closes
        // a connection after 1,024 such resets.
        let body = response.bytes().await?;
        ensure!(status.is_success(), "{method} {path}: {status}: {}", String::from_utf8_lossy(&body));
        Ok(())
    }

    /// What the operator writes for a new connection: the derived Secret, the status, the Event.
    async fn contract_writes(&self, namespace: &str, i: usize, uid: String) -> anyhow::Result<()> {
        let name = connection_name(i);
        let now = jiff::Timestamp::now();
        let expires = now + jiff::SignedDuration::from_secs(3600);
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": derived_secret_name(i),
                         "labels": {"app.kubernetes.io/managed-by": "tasklist-operator"},
                         "ownerReferences": [{"apiVersion": format!("{GROUP}/{VERSION}"), "kind": KIND, "name": name,
                                              "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
            "type": "Opaque",
            "stringData": {"token": format!("eyJhbGciOiJFUzI1NiJ9.floor-{i}.{}", "s".repeat(400)),
                           "authorization": format!("Bearer eyJhbGciOiJFUzI1NiJ9.floor-{i}.{}", "s".repeat(400)),
                           "expiresAt": expires.to_string(), "url": "http://127.0.0.1/"},
        });
        self.send(
            reqwest::Method::POST,
            &format!("/api/v1/namespaces/{namespace}/secrets?fieldManager=tasklist-operator"),
            "application/json",
            secret.to_string(),
        )
        .await?;
        let condition = |kind: &str, reason: &str| {
            json!({"type": kind, "status": "True", "reason": reason, "message": "floor",
                   "lastTransitionTime": now.to_string(), "observedGeneration": 1})
        };
        let status = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"), "kind": KIND,
            "status": {"observedGeneration": 1, "secretName": derived_secret_name(i), "authMethod": "oauth2",
                       "expiresAt": expires.to_string(), "lastRefreshTime": now.to_string(),
                       "nextRefreshTime": (now + jiff::SignedDuration::from_secs(2880)).to_string(),
                       "conditions": [condition("Ready", "CredentialIssued"), condition("Authenticated", "TokenIssued"),
                                      condition("Reachable", "ProbeSucceeded")]},
        });
        self.send(
            reqwest::Method::PATCH,
            &format!(
                "/apis/{GROUP}/{VERSION}/namespaces/{namespace}/tasklistconnections/{name}/status?fieldManager=tasklist-operator&force=true"
            ),
            "application/apply-patch+yaml",
            status.to_string(),
        )
        .await?;
        let event = Event {
            metadata: ObjectMeta {
                // Named as kube's event Recorder names them.
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some("Reconcile".into()),
            reason: Some("CredentialIssued".into()),
            note: Some("floor: a credential was issued".into()),
            type_: Some("Normal".into()),
            reporting_controller: Some("tasklist-operator".into()),
            reporting_instance: Some("bench-floor".into()),
            regarding: Some(ObjectReference {
                api_version: Some(format!("{GROUP}/{VERSION}")),
                kind: Some(KIND.into()),
                name: Some(name.clone()),
                namespace: Some(namespace.to_owned()),
                uid: Some(uid),
                ..ObjectReference::default()
            }),
            ..Event::default()
        };
        self.send(
            reqwest::Method::POST,
            &format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events"),
            "application/json",
            serde_json::to_string(&event)?,
        )
        .await
    }
}

#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    hwm: u64,
    /// The resident part that is not the binary's or a library's pages: the heap, stacks.
    anonymous: u64,
}

fn process_memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(Memory {
        rss: figures::status_kilobytes(&status, "VmRSS").context("no VmRSS")?,
        hwm: figures::status_kilobytes(&status, "VmHWM").context("no VmHWM")?,
        anonymous: figures::status_kilobytes(&status, "RssAnon").context("no RssAnon")?,
    })
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    figures::cpu_seconds_from_stat(&stat, TICKS_PER_SECOND).context("cannot read CPU time from /proc/<pid>/stat")
}

/// Creates `object`. A request the API server's end of a pooled connection closed under
/// (seen once at 10,000, after the quiet window) is sent again, at most twice; a repeat that
/// finds the object already there counts as created.
async fn create<K>(api: &Api<K>, object: &K) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut tries = 1;
    loop {
        match api.create(&PostParams::default(), object).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if tries > 1 && status.is_already_exists() => return Ok(()),
            Err(kube::Error::HyperError(_) | kube::Error::Service(_)) if tries < 3 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error),
        }
    }
}
