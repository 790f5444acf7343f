//! What every scenario needs: the shared world, and per scenario a namespace, a stand-in
//! Tasklist and an operator process, with helpers that read like the user's actions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
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
            let (control_plane, keycloak) = tokio::join!(ControlPlane::start(&tools), Keycloak::start(&tools));
            let control_plane = control_plane.context("starting the control plane")?;
            let keycloak = keycloak.context("starting Keycloak")?;
            install_crd(&control_plane.client()).await?;
            anyhow::Ok((control_plane, keycloak))
        })?;
        Ok(World {
            tools,
            runtime,
            control_plane,
            keycloak,
        })
    }

    /// Runs one scenario; on failure, the message carries the control plane's log tail.
    pub fn run(&self, name: &str, scenario: impl Future<Output = anyhow::Result<()>>) -> Result<(), String> {
        self.runtime.block_on(scenario).map_err(|error| {
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
    /// Every credential value this scenario used, for the leak check.
    secrets_used: Vec<String>,
    /// Logs of operator processes this scenario stopped.
    earlier_logs: Vec<String>,
}

impl Scenario {
    pub async fn start(world: &World, prefix: &str) -> anyhow::Result<Scenario> {
        let namespace = world.control_plane.create_namespace(prefix).await?;
        let standin = StandinTasklist::start().await?;
        let kubeconfig = world.control_plane.kubeconfig().to_path_buf();
        let operator = start_operator(&kubeconfig, &namespace)?;
        Ok(Scenario {
            namespace,
            client: world.client(),
            standin,
            operator,
            kubeconfig,
            secrets_used: Vec::new(),
            earlier_logs: Vec::new(),
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
        Ok(Scenario {
            namespace,
            client: control_plane.client(),
            standin,
            operator,
            kubeconfig,
            secrets_used: Vec::new(),
            earlier_logs: Vec::new(),
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
            secrets_used: Vec::new(),
            earlier_logs: Vec::new(),
        })
    }

    /// Stops the operator with SIGTERM, as a rollout would, and puts `operator` in its place.
    /// The old log stays part of [`Scenario::all_operator_logs`] and the leak check.
    pub async fn replace_operator(&mut self, operator: OperatorProcess) -> anyhow::Result<()> {
        self.operator.terminate(Duration::from_secs(10)).await?;
        let previous = std::mem::replace(&mut self.operator, operator);
        self.earlier_logs.push(previous.logs());
        Ok(())
    }

    /// The logs of every operator process of this scenario, oldest first.
    pub fn all_operator_logs(&self) -> String {
        let mut logs = self.earlier_logs.clone();
        logs.push(self.operator.logs());
        logs.join("\n")
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
        self.earlier_logs.push(previous_logs);
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
        self.secrets_used.extend(
            data.iter()
                .filter(|(key, _)| !key.contains("id") && *key != "username")
                .map(|(_, v)| v.to_string()),
        );
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
        let deadline = Instant::now() + timeout;
        loop {
            let connection = self.connections().get_opt(name).await?;
            if let Some(connection) = &connection
                && check(connection)
            {
                return Ok(connection.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "connection {name} did not become {what} within {timeout:?}; last status: {}\n--- operator log (tail) ---\n{}",
                    serde_json::to_string_pretty(&connection.and_then(|c| c.status)).unwrap_or_default(),
                    tail(&self.operator.logs(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

    /// The derived Secret's data as text, or None when it does not exist.
    pub async fn derived_secret(&self, name: &str) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        let Some(secret) = self.secrets().get_opt(name).await? else {
            return Ok(None);
        };
        Ok(Some(secret_text(&secret)))
    }

    /// Waits until the derived Secret exists and `check` accepts its data.
    pub async fn wait_for_secret(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(data) = self.derived_secret(name).await?
                && check(&data)
            {
                return Ok(data);
            }
            if Instant::now() > deadline {
                bail!(
                    "Secret {name} did not become {what} within {timeout:?}\n--- operator log (tail) ---\n{}",
                    tail(&self.operator.logs(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Remembers credential values the operator obtained (tokens, cookies) for the leak check.
    pub fn remember_credential(&mut self, data: &BTreeMap<String, String>) {
        for key in ["token", "cookie", "csrfToken"] {
            if let Some(value) = data.get(key) {
                self.secrets_used.push(value.clone());
                // A cookie header holds several values; each must stay secret on its own.
                if key == "cookie" {
                    self.secrets_used.extend(
                        value
                            .split(';')
                            .filter_map(|pair| pair.split_once('='))
                            .map(|(_, v)| v.trim().to_owned()),
                    );
                }
            }
        }
    }

    /// Remembers one more value for the leak check (e.g. a secret stored in another namespace).
    pub fn remember_secret_value(&mut self, value: &str) {
        self.secrets_used.push(value.to_owned());
    }

    /// Every credential value remembered so far, for checks beyond [`Scenario::assert_no_credential_leaked`].
    pub fn credential_values(&self) -> &[String] {
        &self.secrets_used
    }

    /// No credential used in this scenario appears in the operator's logs, in any
    /// connection's status, or in any Event of the namespace.
    pub async fn assert_no_credential_leaked(&self) -> anyhow::Result<()> {
        let mut places = vec![("operator log".to_owned(), self.operator.logs())];
        places.extend(
            self.earlier_logs
                .iter()
                .map(|logs| ("earlier operator log".to_owned(), logs.clone())),
        );
        for connection in self.connections().list(&ListParams::default()).await? {
            places.push((
                format!("status of {}", connection.metadata.name.unwrap_or_default()),
                serde_json::to_string(&connection.status)?,
            ));
        }
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        for event in events.list(&ListParams::default()).await? {
            places.push(("an Event".to_owned(), serde_json::to_string(&event)?));
        }
        for secret in self.secrets_used.iter().filter(|value| value.len() >= 4) {
            for (place, text) in &places {
                if text.contains(secret.as_str()) {
                    bail!("a credential value ({} characters) appears in the {place}", secret.len());
                }
            }
        }
        Ok(())
    }
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
    let deadline = Instant::now() + timeout;
    loop {
        let logs = operator.logs();
        if let Some(address) = logs.lines().find_map(served_address) {
            return Ok(format!("http://{address}"));
        }
        if Instant::now() > deadline {
            bail!(
                "the operator did not log the address it serves /metrics on within {timeout:?}\n--- operator log (tail) ---\n{}",
                tail(&logs, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
