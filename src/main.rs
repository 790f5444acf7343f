use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;
use kube::api::{Api, ListParams};
use tasklist_operator::camunda::{HttpClient, HttpSettings, TlsTrust};
use tasklist_operator::check;
use tasklist_operator::controller::{self, Context, ProbeSettings, Scope};
use tasklist_operator::crd::TasklistConnection;
use tasklist_operator::leader::{LeaderElector, LeaseSettings};
use tasklist_operator::logging;
use tasklist_operator::metrics::Metrics;
use tasklist_operator::nudge::{NudgeArgs, NudgeMetrics, Nudger};
use tasklist_operator::policy::{HostPolicy, PolicyArgs};
use tasklist_operator::schedule::RefreshPolicy;
use tasklist_operator::serve::{Health, serve};
use tasklist_operator::shard::Sharding;
use tasklist_operator::time::parse_duration;
use tokio::sync::watch;
use tracing::{error, info};

/// Keeps applications logged in to Camunda's Tasklist API.
#[derive(Parser)]
// A flag given twice takes its last value, so that a wrapper's defaults can be overridden.
#[command(version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Print the TasklistConnection CRD as YAML.
    Crd,
    /// Run the credential and probe flow once, without a cluster, and say what happened.
    /// Exit code 0: Tasklist accepted the credential; 1: no credential was obtained;
    /// 2: Tasklist did not accept it or could not be reached; 3: unusable input.
    Check(CheckArgs),
}

#[derive(Parser)]
struct CheckArgs {
    /// A manifest with the TasklistConnection (it may also hold the Secrets it references).
    #[arg(short = 'f', long = "filename")]
    connection: std::path::PathBuf,
    /// A manifest with the referenced Secret(s). Without it, TASKLIST_CLIENT_ID and
    /// TASKLIST_CLIENT_SECRET (oauth2) or TASKLIST_USERNAME and TASKLIST_PASSWORD (cookie)
    /// are read from the environment.
    #[arg(long)]
    credentials: Option<std::path::PathBuf>,
    /// Timeout of each HTTP request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// A PEM CA bundle to trust on top of the public roots (and the connection's caSecretRef).
    #[arg(long, value_name = "FILE")]
    ca_bundle: Option<std::path::PathBuf>,
    /// The same host policy as `run`, so that a check succeeds only where the operator would.
    #[command(flatten)]
    policy: PolicyArgs,
}

#[derive(Parser)]
struct RunArgs {
    /// Watch only this namespace (repeat for several); all namespaces when not given.
    #[arg(long = "namespace", value_name = "NAMESPACE")]
    namespaces: Vec<String>,
    /// Log lines as human-readable text or as JSON objects. Filter with RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Address of the port serving /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen_addr: SocketAddr,
    /// How many connections are reconciled at once (per watched namespace); 0 means no limit.
    #[arg(long, default_value_t = controller::DEFAULT_CONCURRENCY)]
    concurrency: u16,
    /// Use a referenced Secret only when it carries the label
    /// `tasklist.camunda.community/allow-reference: "true"`; a connection naming one without
    /// it reports SecretNotOptedIn, and nothing is read or sent. For clusters without the
    /// chart's admission policy, which checks that a connection's author may read its Secrets.
    #[arg(long)]
    require_secret_opt_in: bool,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    refresh: RefreshArgs,
    #[command(flatten)]
    probes: ProbeArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    leader: LeaderArgs,
    #[command(flatten)]
    shards: ShardArgs,
    /// The nudge of the Pods that mount a derived Secret (docs/nudge.md).
    #[command(flatten)]
    nudge: NudgeArgs,
}

/// Requests to Camunda.
#[derive(clap::Args)]
struct HttpArgs {
    /// Timeout of each HTTP request to Camunda (token endpoint, login, probe).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// A PEM CA bundle every connection trusts on top of the public roots and its own
    /// caSecretRef, for clusters behind an intercepting proxy. Read at start-up.
    #[arg(long, value_name = "FILE")]
    ca_bundle: Option<std::path::PathBuf>,
}

/// The refresh rule's operator-wide settings.
#[derive(clap::Args)]
struct RefreshArgs {
    /// Room left before a credential expires for the kubelet to copy the new one into the
    /// Pods' Secret volumes: credentials are replaced at the latest this long before expiry
    /// (at most half their lifetime, at least 5 s).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    secret_volume_delay: Duration,
    /// No credential is taken to live longer than this, whatever the token endpoint says.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_credential_lifetime: Duration,
    /// At most one new credential per connection is forced through the refresh annotation
    /// in this long; a later change of the annotation waits (the condition says until when).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    forced_refresh_interval: Duration,
}

impl RefreshArgs {
    fn policy(&self) -> RefreshPolicy {
        RefreshPolicy {
            secret_volume_delay: self.secret_volume_delay,
            max_credential_lifetime: self.max_credential_lifetime,
            forced_refresh_interval: self.forced_refresh_interval,
            nudged_secret_volume_delay: None,
        }
    }
}

/// The probe lane.
#[derive(clap::Args)]
struct ProbeArgs {
    /// How many probes may be in flight (or waited for) at once in all; 0 means no limit.
    /// Never more than half of --concurrency, so that probes leave the rest to refreshes.
    #[arg(long, default_value_t = controller::DEFAULT_PROBE_CONCURRENCY)]
    probe_concurrency: u16,
    /// How many probes may be in flight (or waited for) at once per Tasklist host; 0 means
    /// no limit. A due probe that finds no free slot keeps the last result and is tried
    /// again 1 to 2 s later.
    #[arg(long, default_value_t = controller::DEFAULT_PROBES_PER_HOST)]
    probes_per_host: u16,
    /// Timeout of a probe (default 5s, never longer than --request-timeout).
    #[arg(long, value_parser = parse_duration)]
    probe_timeout: Option<Duration>,
}

impl ProbeArgs {
    fn settings(&self) -> ProbeSettings {
        ProbeSettings {
            concurrency: self.probe_concurrency,
            per_host: self.probes_per_host,
            timeout: self.probe_timeout,
        }
    }
}

/// Several replicas, one active at a time.
#[derive(clap::Args)]
struct LeaderArgs {
    /// Reconcile only while holding a coordination.k8s.io Lease, so that several replicas
    /// can run with one active at a time.
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", required_if_eq("leader_election", "true"))]
    leader_election_namespace: Option<String>,
    /// Name of the Lease. Default: tasklist-operator, or tasklist-operator-shard-<I>-of-<N>
    /// with --shards N; required with --shard-selector.
    #[arg(long)]
    leader_election_lease_name: Option<String>,
    /// This replica's identity in the Lease; must be unique among replicas (the Pod name).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// How long standbys wait after the leader's last renewal before taking over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_election_lease_duration: Duration,
    /// The leader gives up when it could not renew the Lease for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leader_election_renew_deadline: Duration,
    /// Pause between tries to take (standbys) or renew (the leader) the Lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    leader_election_retry_period: Duration,
}

/// Several processes, each with a share of the connections.
#[derive(clap::Args)]
struct ShardArgs {
    /// Split the connections among this many operator processes (each its own Deployment
    /// and Lease) by a stable hash of namespace/name; this one handles --shard-index.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    shards: u32,
    /// Which of the --shards this process handles, from 0 to N-1.
    #[arg(long, default_value_t = 0)]
    shard_index: u32,
    /// Handle only the TasklistConnections matching this label selector (e.g. `team=a` or
    /// `tier in (gold,silver)`), as the API server applies it to the watch. Combines with
    /// --shards: the hash then splits the matching connections.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    shard_selector: Option<String>,
}

impl ShardArgs {
    /// The sharding flags, checked together; a clap usage error (exit code 2) when they
    /// do not fit.
    fn sharding(&self) -> Result<Sharding, clap::Error> {
        Sharding::new(self.shard_index, self.shards, self.shard_selector.clone())
            .map_err(|message| Cli::command().error(clap::error::ErrorKind::ArgumentConflict, message))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    tasklist_operator::allocator::limit_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(command(Cli::parse()))
}

async fn command(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Crd => {
            print!("{}", serde_yaml::to_string(&TasklistConnection::crd())?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let settings = http_settings(args.request_timeout, args.ca_bundle.as_deref()).and_then(|settings| {
                let policy = HostPolicy::from_args(&args.policy)?;
                Ok(HttpSettings {
                    policy: Some(Arc::new(policy)),
                    ..settings
                })
            });
            let settings = match settings {
                Ok(settings) => settings,
                Err(message) => {
                    eprintln!("{message}");
                    return Ok(std::process::ExitCode::from(3));
                }
            };
            let code = check::run(&args.connection, args.credentials.as_deref(), &settings, &mut std::io::stdout()).await;
            Ok(std::process::ExitCode::from(code))
        }
        Command::Run(args) => {
            let sharding = args.shards.sharding().unwrap_or_else(|error| error.exit());
            run(*args, sharding).await.map(|()| std::process::ExitCode::SUCCESS)
        }
    }
}

async fn run(args: RunArgs, sharding: Sharding) -> anyhow::Result<()> {
    logging::init(match args.log_format {
        LogFormat::Text => logging::LogFormat::Text,
        LogFormat::Json => logging::LogFormat::Json,
    });
    let settings = http_settings(args.http.request_timeout, args.http.ca_bundle.as_deref()).map_err(anyhow::Error::msg)?;
    let kube_config = kube::Config::infer().await?;
    let cluster_url = &kube_config.cluster_url;
    let api_server = api_server_addresses(cluster_url.host(), cluster_url.port_u16(), cluster_url.scheme_str()).await;
    let policy = HostPolicy::from_args(&args.policy).map_err(anyhow::Error::msg)?;
    let policy = Arc::new(policy.refusing_api_server(&args.policy, api_server));
    info!("policy: {}", policy.describe());
    if args.require_secret_opt_in {
        info!(
            "referenced Secrets are used only with the label {}: \"true\" (--require-secret-opt-in)",
            tasklist_operator::inputs::ALLOW_REFERENCE_LABEL
        );
    }
    info!("handling {}", sharding.describe());
    let client = kube::Client::try_from(kube_config)?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("stopping: finishing reconciles in flight");
        let _ = stop.send(true);
    });
    let shutdown = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };

    let elector = match leader_election(&args.leader, &sharding, &client) {
        Ok(elector) => elector,
        Err(message) => anyhow::bail!("leader election: {message}"),
    };
    let health = Arc::new(Health::default());
    let nudge_metrics = NudgeMetrics::default();
    let metrics = Arc::new(
        Metrics::default()
            .with_shard_info(sharding.index(), sharding.count())
            .with_pod_nudges(nudge_metrics.pod_nudges.clone()),
    );
    let server = tokio::spawn(serve(args.listen_addr, health.clone(), metrics.clone(), shutdown()));
    wait_until_crd_answers(&client, &args.namespaces, sharding.label_selector()).await?;
    // Standbys are ready too: they are healthy, just not the one reconciling.
    health.set_ready(true);

    let scope = if args.namespaces.is_empty() {
        Scope::AllNamespaces
    } else {
        Scope::Namespaces(args.namespaces.clone())
    };
    let settings = controller::Settings {
        http: HttpSettings {
            policy: Some(policy),
            ..settings
        },
        refresh: RefreshPolicy {
            // The shorter margin of connections whose consumers are all nudged.
            nudged_secret_volume_delay: args.nudge.nudge_pods.then_some(args.nudge.nudged_secret_volume_delay),
            ..args.refresh.policy()
        },
        probes: args.probes.settings(),
        concurrency: args.concurrency,
        sharding,
        require_secret_opt_in: args.require_secret_opt_in,
    };
    let nudger = Nudger::start(client.clone(), &args.namespaces, &args.nudge, nudge_metrics);
    let ctx = Arc::new(Context::new(
        client,
        metrics,
        settings,
        nudger,
        args.leader.leader_election_identity.clone(),
    ));
    match &elector {
        None => controller::run(ctx, scope, shutdown()).await,
        Some(elector) => {
            tokio::select! {
                _ = elector.acquire() => {}
                _ = shutdown() => return wait_for_server(server).await,
            }
            // While stopping gracefully the lease keeps being renewed; when it is lost, the
            // controller is dropped at once and the process exits, to restart as a standby.
            tokio::select! {
                _ = controller::run(ctx, scope, shutdown()) => elector.release().await,
                _ = elector.hold() => anyhow::bail!("lost leadership; exiting so that another replica takes over"),
            }
        }
    }
    wait_for_server(server).await
}

async fn wait_for_server(server: tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    if let Ok(Err(error)) = server.await {
        error!("health server failed: {error}");
    }
    info!("stopped");
    Ok(())
}

/// The addresses and port of the API server the operator talks to, which no connection may
/// name (its host resolved once, at start-up; in a Pod, the `kubernetes` Service's address).
async fn api_server_addresses(host: Option<&str>, port: Option<u16>, scheme: Option<&str>) -> Vec<SocketAddr> {
    let Some(host) = host else {
        return Vec::new();
    };
    let port = port.unwrap_or(if scheme == Some("http") { 80 } else { 443 });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::net::lookup_host((host, port)).await {
        Ok(addresses) => addresses.collect(),
        Err(error) => {
            tracing::warn!("could not resolve the API server's host {host:?} to refuse it as a connection's host: {error}");
            Vec::new()
        }
    }
}

/// The operator-wide HTTP settings; an unreadable or unusable `--ca-bundle` is refused here,
/// at start-up, rather than failing every connection later.
fn http_settings(timeout: Duration, ca_bundle: Option<&std::path::Path>) -> Result<HttpSettings, String> {
    let ca_bundle_pem = match ca_bundle {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|error| format!("cannot read --ca-bundle {}: {error}", path.display()))?),
        None => None,
    };
    let settings = HttpSettings {
        timeout,
        ca_bundle_pem,
        ..HttpSettings::default()
    };
    HttpClient::new(&settings, &TlsTrust::default())
        .map_err(|error| format!("{error} ({})", ca_bundle.map(|p| p.display().to_string()).unwrap_or_default()))?;
    Ok(settings)
}

fn leader_election(args: &LeaderArgs, sharding: &Sharding, client: &kube::Client) -> Result<Option<LeaderElector>, String> {
    if !args.leader_election {
        return Ok(None);
    }
    let namespace = args
        .leader_election_namespace
        .clone()
        .ok_or("--leader-election-namespace (or POD_NAMESPACE) is required")?;
    let identity = args
        .leader_election_identity
        .clone()
        .ok_or("--leader-election-identity (or POD_NAME) is required: it must be unique per replica")?;
    let settings = LeaseSettings {
        lease_duration: args.leader_election_lease_duration,
        renew_deadline: args.leader_election_renew_deadline,
        retry_period: args.leader_election_retry_period,
        ..LeaseSettings::new(
            namespace,
            sharding.lease_name(args.leader_election_lease_name.as_deref())?,
            identity,
        )
    };
    settings.validate()?;
    Ok(Some(LeaderElector::new(client.clone(), settings)))
}

/// Waits until TasklistConnections can be listed: the CRD is installed and RBAC allows it.
/// A `--shard-selector` the API server refuses (400) stops the operator at once: waiting
/// would not make it valid.
async fn wait_until_crd_answers(client: &kube::Client, namespaces: &[String], label_selector: Option<&str>) -> anyhow::Result<()> {
    let api: Api<TasklistConnection> = match namespaces.first() {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let mut params = ListParams::default().limit(1);
    if let Some(selector) = label_selector {
        params = params.labels(selector);
    }
    let mut delay = Duration::from_millis(500);
    loop {
        match api.list_metadata(&params).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 400 && label_selector.is_some() => {
                anyhow::bail!(
                    "--shard-selector {:?} was refused by the API server: {}",
                    label_selector.unwrap_or_default(),
                    status.message
                )
            }
            Err(error) => error!("cannot list TasklistConnections (is the CRD installed?): {error}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn wait_for_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(flags: &[&str]) -> RunArgs {
        let command = ["tasklist-operator", "run"].iter().chain(flags);
        match Cli::try_parse_from(command) {
            Ok(Cli {
                command: Command::Run(args),
            }) => *args,
            Ok(_) => panic!("not the run command"),
            Err(error) => panic!("{flags:?} refused: {error}"),
        }
    }

    #[test]
    fn shard_flags_are_checked_together() {
        let sharding = run_args(&["--shards", "3", "--shard-index", "2", "--shard-selector", "team=a"])
            .shards
            .sharding()
            .expect("valid");
        assert_eq!(
            (sharding.index(), sharding.count(), sharding.label_selector()),
            (2, 3, Some("team=a"))
        );
        let beyond = run_args(&["--shards", "2", "--shard-index", "2"])
            .shards
            .sharding()
            .expect_err("index 2 of 2");
        assert_eq!(beyond.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(beyond.to_string().contains("--shard-index 2 is not below --shards 2"), "{beyond}");
        let alone = run_args(&["--shard-index", "1"]).shards.sharding().expect_err("index 1 of 1");
        assert!(alone.to_string().contains("not below --shards 1"), "{alone}");
        assert!(Cli::try_parse_from(["tasklist-operator", "run", "--shards", "0"]).is_err());
        assert!(Cli::try_parse_from(["tasklist-operator", "run", "--shard-selector", ""]).is_err());
        let default = run_args(&[]).shards.sharding().expect("valid");
        assert_eq!((default.index(), default.count(), default.label_selector()), (0, 1, None));
    }
}
