//! What every scenario needs: the shared world, and per scenario a namespace, a stand-in
//! Tasklist and an operator process, with helpers that read like the user's actions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use tasklist_operator::crd::TasklistConnection;
use testsupport::controlplane::ControlPlane;
use testsupport::keycloak::Keycloak;
use testsupport::operator::OperatorProcess;
use testsupport::standin::StandinTasklist;
use testsupport::tools::Tools;

/// The OAuth2 client id most scenarios register with their stand-in.
pub const CLIENT_ID: &str = "orders";
/// Its secret, unless a scenario chooses another.
pub const DEFAULT_CLIENT_SECRET: &str = "orders-secret-1";

/// An oauth2 connection spec against `standin`, reading the client from Secret `client_secret_ref`.
pub fn saas_spec_for(standin: &StandinTasklist, client_secret_ref: &str) -> serde_json::Value {
    serde_json::json!({
        "url": standin.url(),
        "auth": {"oauth2": {"tokenUrl": standin.token_url(), "clientSecretRef": {"name": client_secret_ref}}},
    })
}

/// The shared world: one control plane, one Keycloak.
pub struct World {
    pub tools: Tools,
    pub runtime: tokio::runtime::Runtime,
    pub control_plane: ControlPlane,
    pub keycloak: Keycloak,
}

impl World {
    pub fn start() -> anyhow::Result<World> {
        let tools = Tools::from_env()?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
        let (control_plane, keycloak) = runtime.block_on(async {
            // The control plane first: Keycloak trusts its CA, to read the ServiceAccount
            // issuer's discovery document and JWKS (federated client authentication).
            let control_plane = ControlPlane::start(&tools).await.context("starting the control plane")?;
            let admin = control_plane.client();
            let (keycloak, crd) = tokio::join!(Keycloak::start_trusting(&tools, control_plane.ca_pem()), install_crd(&admin));
            let keycloak = keycloak.context("starting Keycloak")?;
            crd?;
            anyhow::Ok((control_plane, keycloak))
        })?;
        Ok(World {
            tools,
            runtime,
            control_plane,
            keycloak,
        })
    }

    /// Runs one scenario, then the leak check for every [`Scenario`] it started (so that no
    /// scenario can forget it); on failure, the message carries the control plane's log tail.
    pub fn run(&self, name: &str, scenario: impl Future<Output = anyhow::Result<()>>) -> Result<(), String> {
        let watches = LeakWatches::default();
        let outcome = self.runtime.block_on(LEAK_WATCHES.scope(watches.clone(), async {
            scenario.await?;
            let all = watches.lock().unwrap_or_else(PoisonError::into_inner).clone();
            for watch in all {
                watch.check().await.context("the leak check after the scenario")?;
            }
            anyhow::Ok(())
        }));
        outcome.map_err(|error| {
            format!(
                "{name}: {error:#}\n--- control plane logs (tail) ---\n{}",
                self.control_plane.logs_tail(15)
            )
        })
    }

    pub fn client(&self) -> Client {
        self.control_plane.client()
    }
}

/// Installs the CRD from `crds/` and waits until it is established.
pub async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let committed: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(crd_path())?)?;
    crds.create(&PostParams::default(), &committed)
        .await
        .context("creating the CRD from crds/")?;
    let name = TasklistConnection::crd_name();
    let established = kube::runtime::wait::conditions::is_crd_established();
    tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(crds, name, established),
    )
    .await
    .context("the CRD was not established within 30 s")??;
    Ok(())
}

pub fn crd_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds/tasklistconnection.yaml")
}

pub fn operator_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tasklist-operator"))
}

/// One scenario's namespace, stand-in Tasklist and operator.
pub struct Scenario {
    pub namespace: String,
    pub client: Client,
    pub standin: StandinTasklist,
    pub operator: OperatorProcess,
    kubeconfig: PathBuf,
    /// What the leak check after the scenario looks at: every credential value this
    /// scenario used or read, and the logs of the operators it stopped.
    leak_watch: LeakWatch,
}

impl Scenario {
    pub async fn start(world: &World, prefix: &str) -> anyhow::Result<Scenario> {
        let namespace = world.control_plane.create_namespace(prefix).await?;
        let standin = StandinTasklist::start().await?;
        let kubeconfig = world.control_plane.kubeconfig().to_path_buf();
        let operator = start_operator(&kubeconfig, &namespace)?;
        let leak_watch = LeakWatch::register(Some(world.client()), &namespace);
        Ok(Scenario {
            namespace,
            client: world.client(),
            standin,
            operator,
            kubeconfig,
            leak_watch,
        })
    }

    /// A scenario on `control_plane`, which need not be the shared one (e.g. a control plane
    /// the scenario stops and starts; install the CRD first with [`install_crd`]).
    /// `env` is passed to [`start_operator_with`].
    pub async fn start_on(control_plane: &ControlPlane, prefix: &str, env: &[(&str, &str)]) -> anyhow::Result<Scenario> {
        let namespace = control_plane.create_namespace(prefix).await?;
        let standin = StandinTasklist::start().await?;
        let kubeconfig = control_plane.kubeconfig().to_path_buf();
        let operator = start_operator_with(&kubeconfig, &namespace, &[], env)?;
        // Its control plane may be gone when the scenario ends: the automatic check reads
        // the logs only, and the scenario calls [`Scenario::assert_no_credential_leaked`]
        // itself while its control plane runs.
        let leak_watch = LeakWatch::register(None, &namespace);
        Ok(Scenario {
            namespace,
            client: control_plane.client(),
            standin,
            operator,
            kubeconfig,
            leak_watch,
        })
    }

    /// A scenario in an existing `namespace`, with an operator the caller started (e.g. with
    /// a Helm chart's arguments, as the chart's ServiceAccount). `kubeconfig` is the one
    /// [`Scenario::restart_operator_after_crash`] gives the restarted operator.
    pub async fn with_operator(world: &World, namespace: &str, kubeconfig: &Path, operator: OperatorProcess) -> anyhow::Result<Scenario> {
        Ok(Scenario {
            namespace: namespace.to_owned(),
            client: world.client(),
            standin: StandinTasklist::start().await?,
            operator,
            kubeconfig: kubeconfig.to_path_buf(),
            leak_watch: LeakWatch::register(Some(world.client()), namespace),
        })
    }

    /// Stops the operator with SIGTERM, as a rollout would, and puts `operator` in its place.
    /// The old log stays part of [`Scenario::all_operator_logs`] and the leak check.
    pub async fn replace_operator(&mut self, operator: OperatorProcess) -> anyhow::Result<()> {
        self.operator.terminate(Duration::from_secs(10)).await?;
        let previous = std::mem::replace(&mut self.operator, operator);
        self.leak_watch.add_logs(previous.logs());
        Ok(())
    }

    /// The logs of every operator process of this scenario, oldest first.
    pub fn all_operator_logs(&self) -> String {
        let mut logs = self.leak_watch.logs();
        logs.push(self.operator.logs());
        logs.join("\n")
    }

    /// Adds the logs of an operator process the scenario ran besides [`Scenario::operator`]
    /// (e.g. a second replica) to the leak check.
    pub fn watch_logs_of(&self, operator: &OperatorProcess) {
        self.leak_watch.add_logs(operator.logs());
    }

    /// The base URL (`http://ADDRESS`) of the operator's `/metrics`, `/healthz` and `/readyz` port.
    pub async fn operator_url(&self) -> anyhow::Result<String> {
        served_url(&self.operator, Duration::from_secs(60)).await
    }

    /// The operator's `/metrics` URL.
    pub async fn metrics_url(&self) -> anyhow::Result<String> {
        Ok(format!("{}/metrics", self.operator_url().await?))
    }

    /// A scenario whose stand-in knows the client [`CLIENT_ID`] with [`DEFAULT_CLIENT_SECRET`],
    /// and whose Secret `client` holds them.
    pub async fn start_saas(world: &World, prefix: &str) -> anyhow::Result<Scenario> {
        let mut scenario = Scenario::start(world, prefix).await?;
        scenario.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
        Ok(scenario)
    }

    /// Registers [`CLIENT_ID`] with `client_secret` at the stand-in and applies Secret `client`.
    pub async fn add_saas_client(&mut self, client_secret: &str) -> anyhow::Result<()> {
        self.standin.add_client(CLIENT_ID, client_secret);
        self.apply_secret("client", &[("client_id", CLIENT_ID), ("client_secret", client_secret)])
            .await
    }

    /// An oauth2 spec against this scenario's stand-in, reading Secret `client`.
    pub fn saas_spec(&self) -> serde_json::Value {
        saas_spec_for(&self.standin, "client")
    }

    /// Stops the operator with SIGKILL and starts a new one, as a crash and restart would.
    pub fn restart_operator_after_crash(&mut self) -> anyhow::Result<()> {
        self.operator.kill();
        let previous_logs = self.operator.logs();
        self.operator = start_operator(&self.kubeconfig, &self.namespace)?;
        self.leak_watch.add_logs(previous_logs);
        Ok(())
    }

    pub fn connections(&self) -> Api<TasklistConnection> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates or replaces a Secret with string data, remembering the values as secrets.
    pub async fn apply_secret(&mut self, name: &str, data: &[(&str, &str)]) -> anyhow::Result<()> {
        // Every value but a client id (which messages name on purpose), usernames included:
        // no value read from a referenced Secret may reach status, Events or logs.
        for (_, value) in data.iter().filter(|(key, _)| !key.contains("id")) {
            self.leak_watch.add_value(value);
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        self.secrets()
            .patch(name, &PatchParams::apply("e2e-test").force(), &Patch::Apply(&secret))
            .await?;
        Ok(())
    }

    /// Applies a TasklistConnection from its spec as JSON.
    pub async fn apply_connection(&self, name: &str, spec: serde_json::Value) -> anyhow::Result<()> {
        let manifest = serde_json::json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1",
            "kind": "TasklistConnection",
            "metadata": {"name": name},
            "spec": spec,
        });
        self.connections()
            .patch(name, &PatchParams::apply("e2e-test").force(), &Patch::Apply(manifest))
            .await?;
        Ok(())
    }

    /// Sets an annotation on a connection (a user's `kubectl annotate --overwrite`).
    pub async fn annotate_connection(&self, name: &str, key: &str, value: &str) -> anyhow::Result<()> {
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        self.connections()
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    /// Waits until `check` accepts the connection, up to `timeout`.
    pub async fn wait_for_connection(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&TasklistConnection) -> bool,
    ) -> anyhow::Result<TasklistConnection> {
        eventually(&format!("connection {name} becoming {what}"), timeout, || async {
            let connection = self.connections().get_opt(name).await?;
            Ok(match connection {
                Some(connection) if check(&connection) => Check::Done(connection),
                other => Check::NotYet(format!(
                    "last status: {}\n--- operator log (tail) ---\n{}",
                    serde_json::to_string_pretty(&other.and_then(|c| c.status)).unwrap_or_default(),
                    tail(&self.operator.logs(), 40)
                )),
            })
        })
        .await
    }

    pub async fn wait_ready(&self, name: &str) -> anyhow::Result<TasklistConnection> {
        self.wait_for_connection(name, "Ready", Duration::from_secs(30), |c| {
            condition(c, "Ready").is_some_and(|(status, _)| status == "True")
        })
        .await
    }

    /// Waits until the Ready condition is False with `reason`.
    pub async fn wait_not_ready_because(&self, name: &str, reason: &str) -> anyhow::Result<TasklistConnection> {
        self.wait_for_connection(name, &format!("not Ready with reason {reason}"), Duration::from_secs(30), |c| {
            condition(c, "Ready").is_some_and(|(status, why)| status == "False" && why == reason)
        })
        .await
    }

    /// The derived Secret's data as text, or None when it does not exist. The credential
    /// values read are remembered for the leak check.
    pub async fn derived_secret(&self, name: &str) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        let Some(secret) = self.secrets().get_opt(name).await? else {
            return Ok(None);
        };
        let data = secret_text(&secret);
        self.remember_credential(&data);
        Ok(Some(data))
    }

    /// Waits until the derived Secret exists and `check` accepts its data.
    pub async fn wait_for_secret(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        eventually(&format!("Secret {name} becoming {what}"), timeout, || async {
            Ok(match self.derived_secret(name).await? {
                Some(data) if check(&data) => Check::Done(data),
                _ => Check::NotYet(format!("--- operator log (tail) ---\n{}", tail(&self.operator.logs(), 40))),
            })
        })
        .await
    }

    /// Remembers credential values the operator obtained (tokens, cookies) for the leak
    /// check. [`Scenario::derived_secret`] and [`Scenario::wait_for_secret`] do this
    /// themselves; call it for data read another way (e.g. a list of Secrets).
    pub fn remember_credential(&self, data: &BTreeMap<String, String>) {
        for key in ["token", "cookie", "csrfToken"] {
            if let Some(value) = data.get(key) {
                self.leak_watch.add_value(value);
                // A cookie header holds several values; each must stay secret on its own.
                if key == "cookie" {
                    for (_, part) in value.split(';').filter_map(|pair| pair.split_once('=')) {
                        self.leak_watch.add_value(part.trim());
                    }
                }
            }
        }
    }

    /// Remembers one more value for the leak check (e.g. a secret stored in another namespace).
    pub fn remember_secret_value(&self, value: &str) {
        self.leak_watch.add_value(value);
    }

    /// Remembers a PEM private key for the leak check: the whole key and each line of it.
    pub fn remember_private_key(&self, pem: &str) {
        self.leak_watch.add_value(pem);
        for line in pem.lines().filter(|line| !line.starts_with("-----") && line.len() >= 16) {
            self.leak_watch.add_value(line);
        }
    }

    /// Every credential value remembered so far, for checks beyond [`Scenario::assert_no_credential_leaked`].
    pub fn credential_values(&self) -> Vec<String> {
        self.leak_watch.values()
    }

    /// No credential used in this scenario appears in the operator's logs, in any
    /// connection's status, or in any Event of the namespace. [`World::run`] runs this after
    /// every scenario; calling it earlier checks at that point too.
    pub async fn assert_no_credential_leaked(&self) -> anyhow::Result<()> {
        let mut logs = self.leak_watch.logs();
        logs.push(self.operator.logs());
        find_leaks(&self.leak_watch.values(), &logs, Some((&self.client, &self.namespace))).await
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // The operator process stops with the scenario; its log stays for the leak check.
        self.leak_watch.add_logs(self.operator.logs());
    }
}

tokio::task_local! {
    /// The leak watches of the scenario [`World::run`] is running.
    static LEAK_WATCHES: LeakWatches;
}

type LeakWatches = Arc<Mutex<Vec<LeakWatch>>>;

/// What the leak check of one [`Scenario`] looks at; shared between the scenario and
/// [`World::run`], which checks it after the scenario ended.
#[derive(Clone)]
struct LeakWatch {
    /// `None` when the scenario's control plane may be gone by then (its own one).
    client: Option<Client>,
    namespace: String,
    values: Arc<Mutex<Vec<String>>>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl LeakWatch {
    /// A watch for `namespace`, registered with the running [`World::run`] (if any).
    fn register(client: Option<Client>, namespace: &str) -> LeakWatch {
        let watch = LeakWatch {
            client,
            namespace: namespace.to_owned(),
            values: Arc::default(),
            logs: Arc::default(),
        };
        // Outside World::run (no task-local) there is nothing to register with.
        let _ = LEAK_WATCHES.try_with(|watches| watches.lock().unwrap_or_else(PoisonError::into_inner).push(watch.clone()));
        watch
    }

    fn add_value(&self, value: &str) {
        let mut values = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        if !values.iter().any(|known| known == value) {
            values.push(value.to_owned());
        }
    }

    fn values(&self) -> Vec<String> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn add_logs(&self, logs: String) {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner).push(logs);
    }

    fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    async fn check(&self) -> anyhow::Result<()> {
        let api = self.client.as_ref().map(|client| (client, self.namespace.as_str()));
        find_leaks(&self.values(), &self.logs(), api).await
    }
}

/// Fails when any of `values` (of 4 characters or more) appears in `logs`, or, with `api`,
/// in a connection's status or an Event of the namespace.
async fn find_leaks(values: &[String], logs: &[String], api: Option<(&Client, &str)>) -> anyhow::Result<()> {
    let mut places: Vec<(String, String)> = logs.iter().map(|logs| ("operator log".to_owned(), logs.clone())).collect();
    if let Some((client, namespace)) = api {
        let connections: Api<TasklistConnection> = Api::namespaced(client.clone(), namespace);
        for connection in connections.list(&ListParams::default()).await? {
            places.push((
                format!("status of {}", connection.metadata.name.unwrap_or_default()),
                serde_json::to_string(&connection.status)?,
            ));
        }
        let events: Api<Event> = Api::namespaced(client.clone(), namespace);
        for event in events.list(&ListParams::default()).await? {
            places.push(("an Event".to_owned(), serde_json::to_string(&event)?));
        }
    }
    for secret in values.iter().filter(|value| value.len() >= 4) {
        for (form, encoded) in encoded_forms(secret) {
            for (place, text) in &places {
                if text.contains(encoded.as_str()) {
                    bail!("a credential value ({} characters) appears {form} in the {place}", secret.len());
                }
            }
        }
    }
    // Client assertions are never stored anywhere a test could read them back: look for
    // anything shaped like a JWT instead.
    for (place, text) in &places {
        if contains_jwt(text) {
            bail!("something shaped like a JWT (a token or a client assertion) appears in the {place}");
        }
    }
    Ok(())
}

/// One look at a condition [`eventually`] waits for.
pub enum Check<T> {
    /// It holds; this is what the wait returns.
    Done(T),
    /// Not yet; what was seen instead, for the message if time runs out.
    NotYet(String),
}

/// How often [`eventually`] looks.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Looks with `probe` every 200 ms until it answers [`Check::Done`], for up to `timeout`;
/// then fails naming `what` and what the last look saw. An error from `probe` ends the
/// wait at once. The one waiting loop of the suite.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Check<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match probe().await? {
            Check::Done(value) => return Ok(value),
            Check::NotYet(seen) => seen,
        };
        if Instant::now() >= deadline {
            if seen.is_empty() {
                bail!("{what} did not happen within {timeout:?}");
            }
            bail!("{what} did not happen within {timeout:?}; {seen}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`eventually`] for a condition that needs no I/O.
pub async fn wait_until(what: &str, timeout: Duration, mut holds: impl FnMut() -> bool) -> anyhow::Result<()> {
    eventually(what, timeout, || {
        let check = if holds() { Check::Done(()) } else { Check::NotYet(String::new()) };
        async move { Ok(check) }
    })
    .await
}

fn start_operator(kubeconfig: &std::path::Path, namespace: &str) -> anyhow::Result<OperatorProcess> {
    start_operator_with(kubeconfig, namespace, &[], &[])
}

/// Starts an operator for `namespace` as [`Scenario::start`] does, with `extra_args` after the
/// usual ones (e.g. `--log-format json`) and `env` winning over the usual `RUST_LOG`.
pub fn start_operator_with(
    kubeconfig: &std::path::Path,
    namespace: &str,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<OperatorProcess> {
    let args: Vec<String> = [
        "run",
        "--namespace",
        namespace,
        "--listen-addr",
        "127.0.0.1:0",
        "--request-timeout",
        "3s",
    ]
    .iter()
    .chain(extra_args)
    .map(|s| s.to_string())
    .collect();
    // Debug logging, so the leak check covers the most verbose output.
    let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if !env.iter().any(|(name, _)| name == "RUST_LOG") {
        env.push(("RUST_LOG".to_owned(), "info,tasklist_operator=debug".to_owned()));
    }
    OperatorProcess::start(&operator_binary(), kubeconfig, &args, &env)
}

/// The base URL (`http://ADDRESS`) of the port an operator serves `/metrics`, `/healthz` and
/// `/readyz` on, read from its `serving /metrics, /healthz and /readyz` log line (text or
/// JSON format); waits up to `timeout` for that line.
pub async fn served_url(operator: &OperatorProcess, timeout: Duration) -> anyhow::Result<String> {
    eventually("the operator logging the address it serves /metrics on", timeout, || {
        let logs = operator.logs();
        let check = match logs.lines().find_map(served_address) {
            Some(address) => Check::Done(format!("http://{address}")),
            None => Check::NotYet(format!("--- operator log (tail) ---\n{}", tail(&logs, 40))),
        };
        async move { Ok(check) }
    })
    .await
}

/// The `address` of a `serving /metrics, ...` log line, in text or JSON format.
fn served_address(line: &str) -> Option<String> {
    let line = strip_ansi(line);
    if !line.contains("serving /metrics") {
        return None;
    }
    if let Ok(serde_json::Value::Object(object)) = serde_json::from_str::<serde_json::Value>(&line) {
        let fields = object.get("fields").and_then(|f| f.as_object()).unwrap_or(&object);
        return fields.get("address").and_then(|a| a.as_str()).map(str::to_owned);
    }
    let (_, rest) = line.split_once("address=")?;
    Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A condition of the connection's status, by type.
/// `value` as it may appear in an output: as is, URL-encoded, and base64 (standard and
/// URL-safe, without the padding, which depends on what follows).
fn encoded_forms(value: &str) -> Vec<(&'static str, String)> {
    use base64::Engine as _;
    let url_encoded: String = value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(byte).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    let mut forms = vec![
        ("as is", value.to_owned()),
        ("base64-encoded", base64::engine::general_purpose::STANDARD_NO_PAD.encode(value)),
        ("base64url-encoded", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value)),
    ];
    if url_encoded != value {
        forms.push(("URL-encoded", url_encoded));
    }
    forms
}

/// Whether `text` holds a JWT: two base64url JSON objects (`eyJ...`) joined by a dot.
pub fn contains_jwt(text: &str) -> bool {
    let is_base64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices("eyJ").any(|(start, _)| {
        let rest = &text[start..];
        let header_length = rest.find(|c: char| !is_base64url(c)).unwrap_or(rest.len());
        header_length >= 10 && rest[header_length..].starts_with(".eyJ")
    })
}

/// A TasklistConnection named `name` with `spec`, as a manifest would give it (no namespace:
/// the API it is created through says which).
pub fn connection(name: &str, spec: serde_json::Value) -> anyhow::Result<TasklistConnection> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "tasklist.camunda.community/v1alpha1",
        "kind": "TasklistConnection",
        "metadata": {"name": name},
        "spec": spec,
    }))?)
}

pub fn find_condition<'a>(connection: &'a TasklistConnection, type_: &str) -> Option<&'a Condition> {
    connection.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// The status and reason of a condition.
pub fn condition(connection: &TasklistConnection, type_: &str) -> Option<(String, String)> {
    find_condition(connection, type_).map(|c| (c.status.clone(), c.reason.clone()))
}

/// The refresh time the operator planned for the credential in a derived Secret (its
/// `refresh-at` annotation), and the credential's `expiresAt`. Comparing the two says
/// whether the credential is replaced before it expires without reading the wall clock,
/// which a busy machine makes unreliable.
pub fn planned_refresh_and_expiry(secret: &Secret) -> anyhow::Result<(jiff::Timestamp, jiff::Timestamp)> {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let planned = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(tasklist_operator::derived_secret::REFRESH_AT))
        .with_context(|| format!("Secret {name} has no refresh-at annotation"))?
        .parse()
        .with_context(|| format!("Secret {name}'s refresh-at is not a time"))?;
    let expires = secret_text(secret)
        .get("expiresAt")
        .with_context(|| format!("Secret {name} has no expiresAt"))?
        .parse()
        .with_context(|| format!("Secret {name}'s expiresAt is not a time"))?;
    Ok((planned, expires))
}

/// The objects of a multi-document YAML manifest (empty documents left out).
pub fn parse_manifest(text: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    use serde::Deserialize as _;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let object = serde_json::Value::deserialize(document).context("the manifest is not valid YAML")?;
        if !object.is_null() {
            objects.push(object);
        }
    }
    Ok(objects)
}

pub fn secret_text(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

/// The events.k8s.io/v1 Events regarding one connection, oldest first.
pub async fn events_about(s: &Scenario, connection: &str) -> anyhow::Result<Vec<Event>> {
    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.namespace);
    let mut found: Vec<Event> = events
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|event| {
            event
                .regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some("TasklistConnection") && r.name.as_deref() == Some(connection))
        })
        .collect();
    found.sort_by_key(|event| event.event_time.as_ref().map(|t| t.0));
    Ok(found)
}

pub fn with_reason<'a>(events: &'a [Event], reason: &str) -> Vec<&'a Event> {
    events.iter().filter(|e| e.reason.as_deref() == Some(reason)).collect()
}

/// How often the Event happened: its series count, else 1.
pub fn occurrences(event: &Event) -> i32 {
    event.series.as_ref().map_or(event.deprecated_count.unwrap_or(1), |s| s.count)
}

pub fn describe(event: &Event) -> String {
    format!(
        "{:<8} {:<20} x{:<3} {:<10} {}",
        event.type_.as_deref().unwrap_or("?"),
        event.reason.as_deref().unwrap_or("?"),
        occurrences(event),
        event.regarding.as_ref().and_then(|r| r.name.as_deref()).unwrap_or("?"),
        event.note.as_deref().unwrap_or(""),
    )
}

pub fn describe_all(events: &[Event]) -> String {
    events.iter().map(describe).collect::<Vec<_>>().join("\n")
}

/// Waits until an Event with `reason` about `connection` exists; returns the latest.
pub async fn wait_for_event(s: &Scenario, connection: &str, reason: &str, timeout: Duration) -> anyhow::Result<Event> {
    let what = format!("a {reason} Event about {connection}");
    eventually(&what, timeout, || async {
        let events = events_about(s, connection).await?;
        Ok(match with_reason(&events, reason).last() {
            Some(event) => Check::Done((*event).clone()),
            None => Check::NotYet(format!(
                "Events:\n{}\n--- operator log (tail) ---\n{}",
                describe_all(&events),
                tail(&s.operator.logs(), 30)
            )),
        })
    })
    .await
}

/// Waits until the (latest) Event with `reason` about `connection` has happened `count` times.
pub async fn wait_for_series(s: &Scenario, connection: &str, reason: &str, count: i32, timeout: Duration) -> anyhow::Result<Event> {
    let what = format!("a {reason} Event about {connection} counted {count} times");
    eventually(&what, timeout, || async {
        let events = events_about(s, connection).await?;
        Ok(match with_reason(&events, reason).last() {
            Some(event) if occurrences(event) >= count => Check::Done((*event).clone()),
            _ => Check::NotYet(format!("Events:\n{}", describe_all(&events))),
        })
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

/// One line of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One answer of `/metrics`.
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the series with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|sample| {
                sample.name == name
                    && sample.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|sample| sample.value)
    }

    /// The value of the series with exactly these labels, 0 when there is none.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|sample| sample.name == name)
    }

    /// The lines of the families named, without histogram buckets except `+Inf`: what a
    /// person would look at.
    pub fn excerpt(&self, namespace: &str) -> String {
        self.text
            .lines()
            .filter(|line| line.starts_with("tasklist_operator_"))
            .filter(|line| !line.contains("_bucket") || line.contains("le=\"+Inf\""))
            .filter(|line| !line.contains("namespace=") || line.contains(namespace))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub fn parse_samples(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).with_context(|| format!("no value in {line:?}"))?;
        let name = line[..name_end].to_owned();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(inner).with_context(|| format!("bad labels in {line:?}"))?;
            labels = parsed;
            rest = after;
        }
        let value = rest.split_whitespace().next().with_context(|| format!("no value in {line:?}"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().with_context(|| format!("bad value in {line:?}"))?,
        };
        samples.push(Sample { name, labels, value });
    }
    Ok(samples)
}

/// Parses `key="value",...}` and returns the labels and what follows the `}`.
pub fn parse_labels(text: &str) -> anyhow::Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (key, after) = rest.split_once("=\"").context("expected key=\"value\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().context("unterminated label value")? {
                (_, '\\') => match chars.next().context("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (index, '"') => break index,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = &after[end + 1..];
    }
}

/// The operator's `/metrics`, asked for as Prometheus asks (OpenMetrics preferred), which
/// is what it must answer with.
pub async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<Scrape> {
    // Prometheus's own Accept header: OpenMetrics preferred (tests/monitoring.rs reads the
    // text format too, with Prometheus's parsers).
    let response = http
        .get(url)
        .header(
            reqwest::header::ACCEPT,
            "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        )
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    ensure!(response.status() == 200, "GET {url} answered {}", response.status());
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "/metrics answered a scraper preferring OpenMetrics with content type {content_type:?}"
    );
    let text = response.text().await?;
    let samples = parse_samples(&text)?;
    Ok(Scrape { text, samples })
}

/// Scrapes until `check` accepts the metrics.
pub async fn wait_for_scrape(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    eventually(&format!("/metrics showing {what}"), timeout, || async {
        let scraped = scrape(http, url).await?;
        Ok(if check(&scraped) {
            Check::Done(scraped)
        } else {
            Check::NotYet(format!("last scrape:\n{}", scraped.excerpt("")))
        })
    })
    .await
}

/// Each metric's samples summed over their labels.
impl Scrape {
    pub fn sums(&self) -> BTreeMap<String, f64> {
        let mut sums = BTreeMap::new();
        for sample in &self.samples {
            *sums.entry(sample.name.clone()).or_insert(0.0) += sample.value;
        }
        sums
    }
}
