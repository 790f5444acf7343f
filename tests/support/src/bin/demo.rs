//! `make demo`: the operator's main job end to end, on this machine.
//!
//! Starts a control plane, Keycloak and a stand-in Tasklist, installs the CRD, runs the
//! operator binary, applies `examples/` (placeholders rewritten to the local servers), waits
//! until every TasklistConnection is Ready, and shows the status, the derived Secrets (values
//! redacted) and what Tasklist answers to each credential. Then it keeps running until
//! Ctrl-C or SIGTERM, or, with `--once`, stops right away (exit code 0 only if all went well).
//!
//! The output never contains a token, cookie, CSRF token, client secret or password.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use rand::Rng as _;
use serde::Deserialize as _;
use serde_json::Value;
use testsupport::controlplane::ControlPlane;
use testsupport::keycloak::{ClientAuthenticator, Keycloak};
use testsupport::operator::OperatorProcess;
use testsupport::standin::StandinTasklist;
use testsupport::tools::Tools;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The namespace the examples go to; the control plane is private to this run, so a fixed,
/// short name is safe and makes the printed kubectl commands easy to type.
const NAMESPACE: &str = "demo";
const FIELD_MANAGER: &str = "tasklist-demo";
const SAAS_CLIENT_ID: &str = "orders-saas";
const TASKLIST_USER: &str = "demo";
/// The ServiceAccount of the secretless example, and the Keycloak client bound to it.
const SECRETLESS_ACCOUNT: &str = "tasklist-orders";
/// The alias of the Kubernetes identity provider in Keycloak (the control plane's issuer).
const CLUSTER_IDENTITY_PROVIDER: &str = "demo-cluster";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STATUS_INTERVAL: Duration = Duration::from_secs(30);
const LOG_TAIL_LINES: usize = 20;

const GROUP: &str = "tasklist.camunda.community";
const VERSION: &str = "v1alpha1";
const KIND: &str = "TasklistConnection";
const PLURAL: &str = "tasklistconnections";

/// Derived-Secret keys whose values are not credentials and may be shown.
const SHOWN_KEYS: [&str; 2] = ["url", "expiresAt"];

const USAGE: &str = "usage: demo [--once]

Runs the operator end to end on a local control plane with a stand-in Tasklist and Keycloak,
applies examples/ and prints the status. Runs until Ctrl-C or SIGTERM.

  --once   exit as soon as everything is Ready (exit code 0), or failed to become Ready (1)";

fn main() -> ExitCode {
    let mut once = false;
    for argument in std::env::args().skip(1) {
        match argument.as_str() {
            "--once" => once = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("demo: unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    // The fixtures' child processes are spawned by testsupport's own long-lived thread, so
    // they survive runtime worker threads coming and going; block_on on main keeps the
    // runtime (and the stand-in Tasklist's server tasks) alive for the whole run.
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("demo: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(once));
    // `run` has dropped every fixture by now, which killed the processes and removed their
    // temporary folders.
    println!("stopped, cleaned up");
    match outcome {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

enum Outcome {
    /// `--once` succeeded, or the user stopped a demo that was up.
    Done,
    /// Stopped by a signal before everything was Ready.
    Interrupted,
}

async fn run(once: bool) -> anyhow::Result<Outcome> {
    // Registered before anything starts, so that Ctrl-C during the minute-long start-up also
    // ends in an orderly drop of what did start, rather than the default instant death.
    let mut signals = Signals::new()?;

    // `biased`: the signal wins a tie. Ctrl-C in a terminal also reaches the control plane's
    // processes, whose death would otherwise race in as a confusing start-up failure.
    let mut demo = tokio::select! {
        biased;
        signal = signals.recv() => {
            println!("{signal} while starting: stopping");
            return Ok(Outcome::Interrupted);
        }
        demo = Demo::start() => demo?,
    };
    tokio::select! {
        biased;
        signal = signals.recv() => {
            println!("{signal} while waiting for Ready: stopping");
            return Ok(Outcome::Interrupted);
        }
        ready = demo.wait_ready() => ready?,
    }
    let rows = demo.show_everything().await.map_err(|error| demo.with_operator_log(error))?;
    demo.print_how_to_look_around();
    if once {
        step("--once: everything is Ready, stopping");
        return Ok(Outcome::Done);
    }
    demo.keep_running(rows, &mut signals).await?;
    Ok(Outcome::Done)
}

/// Everything the demo started. Fields drop in declaration order: the operator first (so it
/// does not log errors about servers vanishing under it), the control plane last.
struct Demo {
    operator: OperatorProcess,
    standin: StandinTasklist,
    /// Only held: the Self-Managed example gets its tokens there until this is dropped.
    _keycloak: Keycloak,
    control_plane: ControlPlane,
    client: Client,
    /// The TasklistConnections from examples/, by name.
    connection_names: Vec<String>,
    started: Instant,
}

impl Demo {
    async fn start() -> anyhow::Result<Demo> {
        let started = Instant::now();
        let tools = Tools::from_env()?;

        step("starting a control plane, Keycloak and a stand-in Tasklist (Keycloak needs a minute or two)");
        // The control plane first: Keycloak trusts its CA, to verify the ServiceAccount
        // tokens of the secretless example against the API server's JWKS.
        let control_plane = ControlPlane::start(&tools).await.context("starting the control plane")?;
        let (keycloak, standin) = tokio::try_join!(
            async {
                Keycloak::start_trusting(&tools, control_plane.ca_pem())
                    .await
                    .context("starting Keycloak")
            },
            async { StandinTasklist::start().await.context("starting the stand-in Tasklist") },
        )?;
        let local = LocalServers {
            tasklist_url: standin.url(),
            tasklist_token_url: standin.token_url(),
            saas_client_secret: random_secret(),
            tasklist_password: random_secret(),
            keycloak_token_url: keycloak.token_url(),
            identity_client_id: keycloak.client_id().to_string(),
            identity_client_secret: keycloak.client_secret().to_string(),
        };
        standin.add_client(SAAS_CLIENT_ID, &local.saas_client_secret);
        standin.add_user(TASKLIST_USER, &local.tasklist_password);
        // The Self-Managed example's Tasklist accepts Keycloak's tokens, as a real one with
        // Identity does.
        standin.trust_jwks(&keycloak.jwks_url());
        step(&format!("control plane:      {}", control_plane.server_url()));
        step(&format!("Keycloak:           {}", keycloak.base_url()));
        step(&format!(
            "stand-in Tasklist:  {} (OAuth2 client {SAAS_CLIENT_ID}, user {TASKLIST_USER}; ready after {})",
            standin.url(),
            elapsed(started)
        ));

        let client = control_plane.client();
        install_crd(&client).await?;
        create_namespace(&client).await?;
        step(&format!("installed the CRD, created namespace {NAMESPACE}"));
        trust_the_cluster(&client, &control_plane, &keycloak).await?;
        step(&format!(
            "Keycloak trusts the cluster's ServiceAccount tokens; client {SECRETLESS_ACCOUNT} is ServiceAccount {NAMESPACE}/{SECRETLESS_ACCOUNT} (no secret)"
        ));

        let binary = operator_binary();
        if !binary.is_file() {
            bail!(
                "the operator binary {} does not exist; build it first (cargo build --bin tasklist-operator), or run make demo",
                binary.display()
            );
        }
        let operator = OperatorProcess::start(
            &binary,
            control_plane.kubeconfig(),
            &["run".into(), "--listen-addr".into(), "127.0.0.1:0".into()],
            // Its log goes to a file that people tail and that failures quote: no colour codes.
            &[("NO_COLOR".into(), "1".into())],
        )?;
        step(&format!("started the operator (pid {}), watching all namespaces", operator.pid()));

        let mut demo = Demo {
            operator,
            standin,
            _keycloak: keycloak,
            control_plane,
            client,
            connection_names: Vec::new(),
            started,
        };
        match demo.apply_examples(&local).await {
            Ok(names) => demo.connection_names = names,
            Err(error) => return Err(demo.with_operator_log(error)),
        }
        Ok(demo)
    }

    /// Applies the examples with their placeholders pointed at the local servers; returns
    /// the names of the TasklistConnections they hold.
    async fn apply_examples(&self, local: &LocalServers) -> anyhow::Result<Vec<String>> {
        let mut connection_names = Vec::new();
        for (file, replacements) in example_rewrites(local) {
            let mut applied = Vec::new();
            for manifest in rewritten_example(file, &replacements)? {
                let object = self
                    .apply(manifest)
                    .await
                    .with_context(|| format!("cannot apply examples/{file}"))?;
                let kind = object.types.as_ref().map_or("?", |types| types.kind.as_str());
                if kind == KIND {
                    connection_names.push(object.name_any());
                }
                applied.push(format!("{kind}/{}", object.name_any()));
            }
            step(&format!("applied examples/{file}: {}", applied.join(", ")));
        }
        if connection_names.is_empty() {
            bail!("examples/ holds no TasklistConnection");
        }
        Ok(connection_names)
    }

    /// Server-side apply of one manifest into the demo namespace, like `kubectl apply --server-side`.
    async fn apply(&self, manifest: Value) -> anyhow::Result<DynamicObject> {
        let mut object: DynamicObject = serde_json::from_value(manifest).context("not a Kubernetes object")?;
        let types = object.types.clone().context("the manifest has no apiVersion or kind")?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let (resource, _) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .with_context(|| format!("the API server does not know {}/{}", types.api_version, types.kind))?;
        object.metadata.namespace = Some(NAMESPACE.to_string());
        let name = object.metadata.name.clone().context("the manifest has no metadata.name")?;
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), NAMESPACE, &resource);
        let applied = api
            .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object))
            .await
            .with_context(|| format!("server-side apply of {}/{name}", types.kind))?;
        Ok(applied)
    }

    fn connections(&self) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
        Api::namespaced_with(self.client.clone(), NAMESPACE, &ApiResource::from_gvk_with_plural(&gvk, PLURAL))
    }

    /// Step 5: waits until every connection from examples/ is Ready; the error says why not
    /// and carries the operator's log.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        step(&format!(
            "waiting up to {}s for {} to be Ready",
            READY_TIMEOUT.as_secs(),
            self.connection_names.join(", ")
        ));
        loop {
            let rows = self.rows().await.map_err(|error| self.with_operator_log(error))?;
            let all_ready = self
                .connection_names
                .iter()
                .all(|name| rows.iter().any(|row| &row.name == name && row.ready == "True"));
            if all_ready {
                step(&format!("all {} Ready after {}", self.connection_names.len(), elapsed(started)));
                return Ok(());
            }
            if !self.operator.is_running() {
                return Err(self.with_operator_log(anyhow!("the operator exited")));
            }
            if started.elapsed() > READY_TIMEOUT {
                let error = anyhow!(
                    "not everything became Ready within {}s:\n{}\n{}",
                    READY_TIMEOUT.as_secs(),
                    format_table(&rows),
                    self.not_ready_details().await
                );
                return Err(self.with_operator_log(error));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The Ready condition's message of each connection that is not Ready: why it is not.
    async fn not_ready_details(&self) -> String {
        let mut details = Vec::new();
        for name in &self.connection_names {
            match self.connections().get_opt(name).await {
                Ok(Some(connection)) => match ready_condition(&connection) {
                    None => details.push(format!("{name}: no Ready condition yet (has the operator seen it?)")),
                    Some(ready) if ready["status"] != "True" => {
                        details.push(format!("{name}: {}", ready["message"].as_str().unwrap_or("")));
                    }
                    Some(_) => {}
                },
                Ok(None) => details.push(format!("{name}: does not exist")),
                Err(error) => details.push(format!("{name}: cannot read it: {error}")),
            }
        }
        details.join("\n")
    }

    /// One row per TasklistConnection in the namespace, sorted by name (as kubectl does).
    async fn rows(&self) -> anyhow::Result<Vec<Row>> {
        let list = self
            .connections()
            .list(&ListParams::default())
            .await
            .context("cannot list the TasklistConnections")?;
        let mut rows: Vec<Row> = list.items.iter().map(Row::of).collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(rows)
    }

    /// Step 6: the status table, each derived Secret with its values redacted, and what
    /// Tasklist answers to the credential in it. Fails if Tasklist rejects one.
    async fn show_everything(&self) -> anyhow::Result<Vec<Row>> {
        let rows = self.rows().await?;
        println!("\n$ kubectl get tlc -n {NAMESPACE}\n{}\n", format_table(&rows));
        let mut rejected = Vec::new();
        for name in &self.connection_names {
            let (secret_name, data) = self.derived_secret(name).await?;
            println!("Secret {NAMESPACE}/{secret_name}:");
            for (key, value) in &data {
                if SHOWN_KEYS.contains(&key.as_str()) {
                    println!("  {key}: {value}");
                } else {
                    println!("  {key}: <redacted, {} bytes>", value.len());
                }
            }
            let status = self.standin.call_api_with_secret(&data).await?;
            println!("  -> Tasklist answered POST /v1/tasks/search with this credential: HTTP {status}\n");
            if !(200..300).contains(&status) {
                rejected.push(format!("{name} (HTTP {status})"));
            }
        }
        if !rejected.is_empty() {
            bail!("Tasklist rejected the credential of {}", rejected.join(", "));
        }
        Ok(rows)
    }

    /// The derived Secret of connection `name` (its status names it) as text.
    async fn derived_secret(&self, name: &str) -> anyhow::Result<(String, BTreeMap<String, String>)> {
        let connection = self.connections().get(name).await?;
        let secret_name = connection.data["status"]["secretName"]
            .as_str()
            .map_or_else(|| format!("{name}-tasklist-auth"), str::to_string);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NAMESPACE);
        let secret = secrets
            .get(&secret_name)
            .await
            .with_context(|| format!("cannot read Secret {NAMESPACE}/{secret_name}"))?;
        let data = secret
            .data
            .into_iter()
            .flatten()
            .map(|(key, value)| (key, String::from_utf8_lossy(&value.0).into_owned()))
            .collect();
        Ok((secret_name, data))
    }

    /// Step 7.
    fn print_how_to_look_around(&self) {
        println!("Look around while it runs:");
        println!("  export KUBECONFIG={}", self.control_plane.kubeconfig().display());
        println!("  kubectl get tlc -A");
        println!("  kubectl describe tlc -n {NAMESPACE} {}", self.connection_names[0]);
        match self.operator_log_path() {
            Some(path) => println!("  tail -f {}   # the operator's log", path.display()),
            None => println!("  (the operator's log: its last {LOG_TAIL_LINES} lines are printed when the demo stops)"),
        }
        println!("Everything here started in {}.", elapsed(self.started));
    }

    /// OperatorProcess keeps its log file to itself; its stdout is that file, so /proc shows
    /// where it is (until the demo stops and removes it).
    fn operator_log_path(&self) -> Option<PathBuf> {
        let path = std::fs::read_link(format!("/proc/{}/fd/1", self.operator.pid())).ok()?;
        path.is_file().then_some(path)
    }

    /// Step 8: a status line every 30 s (and the table when it changed) until a signal.
    async fn keep_running(mut self, mut shown: Vec<Row>, signals: &mut Signals) -> anyhow::Result<()> {
        println!("\nRunning until Ctrl-C; a status line every {}s.", STATUS_INTERVAL.as_secs());
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + STATUS_INTERVAL, STATUS_INTERVAL);
        loop {
            tokio::select! {
                biased;
                signal = signals.recv() => {
                    println!("\n{signal}: stopping");
                    println!("--- operator log (last {LOG_TAIL_LINES} lines) ---\n{}", tail(&self.operator.logs(), LOG_TAIL_LINES));
                    return Ok(());
                }
                _ = ticks.tick() => {}
            }
            if !self.operator.is_running() {
                return Err(self.with_operator_log(anyhow!("the operator exited")));
            }
            match self.status_line().await {
                Ok((line, rows)) => {
                    println!("[{}] {line}", elapsed(self.started));
                    if rows != shown {
                        println!("{}", format_table(&rows));
                        shown = rows;
                    }
                }
                // A hiccup is worth a line, not the end of the demo.
                Err(error) => println!("[{}] cannot read the status: {error:#}", elapsed(self.started)),
            }
        }
    }

    async fn status_line(&self) -> anyhow::Result<(String, Vec<Row>)> {
        let rows = self.rows().await?;
        let ready = rows.iter().filter(|row| row.ready == "True").count();
        let mut accepted = 0;
        for name in &self.connection_names {
            let (_, data) = self.derived_secret(name).await?;
            if (200..300).contains(&self.standin.call_api_with_secret(&data).await?) {
                accepted += 1;
            }
        }
        let line = format!(
            "{ready}/{} Ready; Tasklist accepts {accepted}/{} derived Secrets",
            rows.len(),
            self.connection_names.len()
        );
        Ok((line, rows))
    }

    fn with_operator_log(&self, error: anyhow::Error) -> anyhow::Error {
        anyhow!(
            "{error:#}\n--- operator log (last {LOG_TAIL_LINES} lines) ---\n{}",
            tail(&self.operator.logs(), LOG_TAIL_LINES)
        )
    }
}

/// One line of `kubectl get tlc`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    name: String,
    ready: String,
    auth: String,
    expires: String,
    reason: String,
}

impl Row {
    /// The columns the CRD's additionalPrinterColumns define (except AGE).
    fn of(connection: &DynamicObject) -> Row {
        let status = &connection.data["status"];
        let ready = ready_condition(connection);
        let text = |value: Option<&Value>| value.and_then(Value::as_str).unwrap_or("").to_string();
        Row {
            name: connection.name_any(),
            ready: text(ready.map(|ready| &ready["status"])),
            auth: text(status.get("authMethod")),
            expires: text(status.get("expiresAt")),
            reason: text(ready.map(|ready| &ready["reason"])),
        }
    }
}

fn ready_condition(connection: &DynamicObject) -> Option<&Value> {
    connection.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|condition| condition["type"] == "Ready")
}

fn format_table(rows: &[Row]) -> String {
    let mut lines = vec![["NAME", "READY", "AUTH", "EXPIRES", "REASON"].map(str::to_string)];
    lines.extend(
        rows.iter()
            .map(|row| [&row.name, &row.ready, &row.auth, &row.expires, &row.reason].map(Clone::clone)),
    );
    let widths: Vec<usize> = (0..5)
        .map(|column| lines.iter().map(|line| line[column].len()).max().unwrap_or(0))
        .collect();
    lines
        .iter()
        .map(|line| {
            let cells: Vec<String> = line.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            cells.join("   ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the examples' placeholders become in this run: the local servers, and the
/// credentials they accept (the SaaS client secret and the password are made up here).
struct LocalServers {
    tasklist_url: String,
    tasklist_token_url: String,
    saas_client_secret: String,
    tasklist_password: String,
    keycloak_token_url: String,
    identity_client_id: String,
    identity_client_secret: String,
}

/// Keycloak's federated client authentication for the secretless example: anonymous
/// requests may read the API server's discovery document and JWKS, Keycloak's realm trusts
/// the control plane's ServiceAccount issuer, and a "Signed JWT - Federated" client is
/// bound to the example's ServiceAccount.
async fn trust_the_cluster(client: &Client, control_plane: &ControlPlane, keycloak: &Keycloak) -> anyhow::Result<()> {
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "demo-service-account-issuer-discovery-anonymous"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:service-account-issuer-discovery"},
        "subjects": [{"kind": "Group", "name": "system:unauthenticated", "apiGroup": "rbac.authorization.k8s.io"}],
    }))?;
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .context("cannot let anonymous requests read the ServiceAccount issuer's discovery document")?;
    keycloak
        .add_kubernetes_identity_provider(CLUSTER_IDENTITY_PROVIDER, &control_plane.service_account_issuer())
        .await?;
    let federated = ClientAuthenticator::Federated {
        identity_provider: CLUSTER_IDENTITY_PROVIDER.to_owned(),
        subject: format!("system:serviceaccount:{NAMESPACE}:{SECRETLESS_ACCOUNT}"),
    };
    keycloak.add_client(SECRETLESS_ACCOUNT, &federated).await?;
    Ok(())
}

/// The examples the demo applies (not pod.yaml: no Pod ever runs on this control plane),
/// each with its placeholders and what they become.
fn example_rewrites(local: &LocalServers) -> [(&'static str, Vec<(&'static str, String)>); 4] {
    [
        (
            "saas.yaml",
            vec![
                ("https://bru-2.tasklist.camunda.io/abc123", local.tasklist_url.clone()),
                ("https://login.cloud.camunda.io/oauth/token", local.tasklist_token_url.clone()),
                ("YOUR_SAAS_CLIENT_ID", yaml_string(SAAS_CLIENT_ID)),
                ("YOUR_SAAS_CLIENT_SECRET", yaml_string(&local.saas_client_secret)),
            ],
        ),
        (
            "self-managed-identity.yaml",
            vec![
                ("http://camunda-tasklist.camunda.svc:8080", local.tasklist_url.clone()),
                (
                    "http://camunda-keycloak.camunda.svc:18080/auth/realms/camunda-platform/protocol/openid-connect/token",
                    local.keycloak_token_url.clone(),
                ),
                ("YOUR_IDENTITY_CLIENT_ID", yaml_string(&local.identity_client_id)),
                ("YOUR_IDENTITY_CLIENT_SECRET", yaml_string(&local.identity_client_secret)),
            ],
        ),
        (
            "cookie.yaml",
            vec![
                ("http://camunda-tasklist.camunda.svc:8080", local.tasklist_url.clone()),
                // The username stays `demo`, the user the stand-in knows.
                ("password: demo", format!("password: {}", yaml_string(&local.tasklist_password))),
            ],
        ),
        (
            "secretless-keycloak.yaml",
            vec![
                ("http://camunda-tasklist.camunda.svc:8080", local.tasklist_url.clone()),
                (
                    "https://keycloak.example.com/auth/realms/camunda-platform/protocol/openid-connect/token",
                    local.keycloak_token_url.clone(),
                ),
            ],
        ),
    ]
}

/// The manifests of `examples/{file}` with `replacements` made and checked.
fn rewritten_example(file: &str, replacements: &[(&str, String)]) -> anyhow::Result<Vec<Value>> {
    let path = workspace_root().join("examples").join(file);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = rewrite_placeholders(&text, replacements).with_context(|| format!("examples/{file}"))?;
    let mut manifests = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let manifest = Value::deserialize(document).with_context(|| format!("examples/{file} is not valid YAML"))?;
        if manifest.is_null() {
            continue; // an empty document, e.g. only comments
        }
        check_points_at_local_servers(&manifest).with_context(|| format!("examples/{file}"))?;
        manifests.push(manifest);
    }
    Ok(manifests)
}

/// Replaces every placeholder; a placeholder that is not there is an error, so that the
/// examples and the demo cannot drift apart silently.
fn rewrite_placeholders(text: &str, replacements: &[(&str, String)]) -> anyhow::Result<String> {
    let mut text = text.to_string();
    for (placeholder, value) in replacements {
        if !text.contains(placeholder) {
            bail!("the placeholder {placeholder:?} is gone; update the demo (tests/support/src/bin/demo.rs) to match");
        }
        text = text.replace(placeholder, value);
    }
    Ok(text)
}

/// The other half of the drift check: a placeholder the demo does not know yet (a new
/// `YOUR_...`, or a URL of a real Camunda) would send the demo to the internet.
fn check_points_at_local_servers(manifest: &Value) -> anyhow::Result<()> {
    fn strings<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::String(text) => found.push(text),
            Value::Array(items) => items.iter().for_each(|item| strings(item, found)),
            Value::Object(fields) => fields.values().for_each(|field| strings(field, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    strings(manifest, &mut found);
    for text in found {
        let remote_url = (text.starts_with("http://") || text.starts_with("https://")) && !text.starts_with("http://127.0.0.1:");
        if text.contains("YOUR_") || remote_url {
            bail!("{text:?} is a placeholder the demo does not rewrite; update tests/support/src/bin/demo.rs");
        }
    }
    Ok(())
}

async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let path = workspace_root().join("crds/tasklistconnection.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).with_context(|| format!("{} is not a CRD", path.display()))?;
    let name = crd.name_any();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .context("cannot create the CRD from crds/")?;
    let established = kube::runtime::wait::conditions::is_crd_established();
    tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(crds, &name, established),
    )
    .await
    .context("the CRD was not Established within 30 s")??;
    Ok(())
}

async fn create_namespace(client: &Client) -> anyhow::Result<()> {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("cannot create namespace {NAMESPACE}"))?;
    Ok(())
}

/// The repository root: this crate lives in `tests/support`.
fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // Canonical, so that paths in messages and `ps` read /work/x/target, not .../support/../../target.
    root.canonicalize().unwrap_or(root)
}

/// Where `cargo build --bin tasklist-operator` puts the binary (hack/demo.sh builds it).
fn operator_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    target.join("debug/tasklist-operator")
}

/// 24 letters and digits: fine as a client secret or password, and safe in YAML.
fn random_secret() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// A YAML double-quoted scalar (JSON strings are valid YAML), so that a value like `0123`
/// or `yes` stays a string.
fn yaml_string(value: &str) -> String {
    serde_json::to_string(value).expect("a string always serializes")
}

fn step(message: &str) {
    println!("demo: {message}");
}

fn elapsed(since: Instant) -> String {
    let seconds = since.elapsed().as_secs();
    if seconds < 60 {
        format!("{:.1}s", since.elapsed().as_secs_f64())
    } else {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Ctrl-C (SIGINT) and SIGTERM, the two ways to stop the demo.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// Waits for either signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalServers {
        LocalServers {
            tasklist_url: "http://127.0.0.1:1001".into(),
            tasklist_token_url: "http://127.0.0.1:1001/oauth/token".into(),
            saas_client_secret: "saas-secret".into(),
            tasklist_password: "0123".into(),
            keycloak_token_url: "http://127.0.0.1:1002/auth/realms/camunda-platform/protocol/openid-connect/token".into(),
            identity_client_id: "identity-client".into(),
            identity_client_secret: "identity-secret".into(),
        }
    }

    /// The fast half of the drift check: the committed examples still have every placeholder
    /// the demo rewrites, and nothing else points away from the local servers.
    #[test]
    fn every_example_rewrites_to_a_secret_and_a_connection_on_local_servers() {
        for (file, replacements) in example_rewrites(&local()) {
            let manifests = rewritten_example(file, &replacements).unwrap_or_else(|error| panic!("{error:#}"));
            let kinds: Vec<&str> = manifests.iter().map(|m| m["kind"].as_str().unwrap_or("")).collect();
            // The secretless example holds a ServiceAccount instead of a Secret.
            assert!(kinds == ["Secret", KIND] || kinds == ["ServiceAccount", KIND], "{file}: {kinds:?}");
            assert!(
                manifests[1]["spec"]["url"].as_str().unwrap().starts_with("http://127.0.0.1:1001"),
                "{file}"
            );
        }
    }

    #[test]
    fn credentials_stay_strings_and_the_username_stays_demo() {
        let [_, _, (file, replacements), _] = example_rewrites(&local());
        let manifests = rewritten_example(file, &replacements).unwrap();
        assert_eq!(manifests[0]["stringData"]["password"], "0123");
        assert_eq!(manifests[0]["stringData"]["username"], "demo");
    }

    #[test]
    fn a_missing_placeholder_is_an_error() {
        let error = rewrite_placeholders("url: x", &[("YOUR_URL", "y".into())]).unwrap_err();
        assert!(error.to_string().contains("YOUR_URL"), "{error}");
    }

    #[test]
    fn an_unknown_placeholder_or_remote_url_is_an_error() {
        let unknown = serde_json::json!({"stringData": {"token": "YOUR_TOKEN"}});
        assert!(check_points_at_local_servers(&unknown).is_err());
        let remote = serde_json::json!({"spec": {"url": "https://tasklist.example.com"}});
        assert!(check_points_at_local_servers(&remote).is_err());
        let local = serde_json::json!({"spec": {"url": "http://127.0.0.1:8080", "refreshBefore": "1m"}});
        assert!(check_points_at_local_servers(&local).is_ok());
    }

    #[test]
    fn the_table_lines_up_like_kubectl() {
        let row = Row {
            name: "orders-saas".into(),
            ready: "True".into(),
            auth: "oauth2".into(),
            expires: "2030-01-01T00:00:00Z".into(),
            reason: "Ready".into(),
        };
        assert_eq!(
            format_table(&[row]),
            "NAME          READY   AUTH     EXPIRES                REASON\n\
             orders-saas   True    oauth2   2030-01-01T00:00:00Z   Ready"
        );
    }
}
