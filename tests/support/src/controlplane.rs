//! A real Kubernetes control plane for end-to-end tests: etcd, kube-apiserver and
//! kube-controller-manager as child processes on loopback ports, with a throw-away PKI.
//!
//! There are no nodes: pods are never scheduled. What the tests rely on is the API server itself
//! (validation, RBAC, watches, TokenRequest) and the controllers that change objects behind the
//! operator's back: the garbage collector (ownerReferences), namespace deletion, and the
//! service-account controllers.
//!
//! Processes are killed when the [`ControlPlane`] is dropped and, because they are spawned
//! with a parent-death signal, also when the test process dies without dropping it.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use rand::Rng as _;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use serde_json::json;
use tempfile::TempDir;

use crate::tools::{self, Tools};

/// How long the API server may take to become ready (also after [`ControlPlane::start_apiserver`]).
/// One request the API server completed, from its audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// `secrets`, `events`, `tasklistconnections`.
    pub resource: String,
    /// `status`, or empty.
    pub subresource: String,
    /// Empty for a list or a watch.
    pub name: String,
    /// The HTTP status code of the answer.
    pub code: u64,
    /// The client's User-Agent (kube-controller-manager's start with `kube-controller-manager/`).
    pub user_agent: String,
}

impl ApiRequest {
    /// A request that changes something.
    pub fn is_write(&self) -> bool {
        matches!(self.verb.as_str(), "create" | "update" | "patch" | "delete" | "deletecollection")
    }
}

/// The API server's audit log, in the control plane's folder.
const AUDIT_LOG: &str = "audit.log";
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    verbs: ["patch", "update"]
    resources:
      - group: tasklist.camunda.community
        resources: ["tasklistconnections/status"]
  # Every request on what the operator reads and writes, by metadata only (no Secret data):
  # what tests count with `api_requests` (pods: the nudge's patches, issue 21).
  - level: Metadata
    resources:
      - group: ""
        resources: ["secrets", "events", "pods"]
      - group: events.k8s.io
        resources: ["events"]
      - group: tasklist.camunda.community
        resources: ["tasklistconnections"]
  - level: None
"#;
const STARTUP_DEADLINE: Duration = Duration::from_secs(90);
/// How long a stopped API server gets to shut down before it is killed. It stops listening
/// at once on SIGTERM, finishes short requests, then would wait for the watches clients hold
/// open to end for up to --request-timeout (60 s): not worth waiting for in an outage test.
const APISERVER_SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Lifetime of the tokens behind [`ControlPlane::service_account_kubeconfig`].
const SERVICE_ACCOUNT_TOKEN_SECONDS: i64 = 3600;

const ETCD_LOG: &str = "etcd.log";
const APISERVER_LOG: &str = "kube-apiserver.log";
const CONTROLLER_MANAGER_LOG: &str = "kube-controller-manager.log";

/// A running etcd + kube-apiserver + kube-controller-manager. See the module docs.
pub struct ControlPlane {
    etcd: Child,
    /// `None` between [`ControlPlane::stop_apiserver`] and [`ControlPlane::start_apiserver`].
    apiserver: Option<Child>,
    /// `None` only while [`ControlPlane::start`] runs: it starts once the API server is ready.
    controller_manager: Option<Child>,
    apiserver_binary: PathBuf,
    /// Kept so that a restarted API server is configured exactly like the first one.
    apiserver_args: Vec<OsString>,
    apiserver_port: u16,
    ca_pem: String,
    admin_token: String,
    admin_kubeconfig: PathBuf,
    admin_config: Config,
    kubeconfig_counter: AtomicU32,
    /// Certificates, keys, etcd's data and the logs; removed on drop, after the processes are gone.
    workdir: TempDir,
}

/// The throw-away certificates and keys of one control plane.
struct Pki {
    ca_pem: String,
    serving_cert_pem: String,
    serving_key_pem: String,
    /// ECDSA P-256 in PKCS#8 PEM: signs service-account tokens (ES256).
    service_account_key_pem: String,
    /// Its public half, with which the API server verifies them.
    service_account_public_key_pem: String,
}

/// What differs between a control plane without nodes (the default) and one that a real
/// node joins (see [`crate::node`]).
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// The address Pods reach the API server at, through the `kubernetes` Service. `None`:
    /// the API server listens on 127.0.0.1 only and publishes no endpoint for the Service.
    pub advertise_address: Option<Ipv4Addr>,
    /// `--service-cluster-ip-range`.
    pub service_cidr: String,
    /// `--controllers` of kube-controller-manager.
    pub controllers: Vec<&'static str>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            advertise_address: None,
            service_cidr: "10.0.0.0/24".to_owned(),
            // Only what changes objects the operator cares about; no node, pod or volume machinery.
            controllers: vec![
                "garbagecollector",
                "namespace",
                "serviceaccount-token",
                "serviceaccount",
                "clusterrole-aggregation",
            ],
        }
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager, and waits until the API server
    /// is ready and the controller manager works (it has created the `default` service account).
    ///
    /// May be called from any thread and any tokio runtime: the processes do not depend on the
    /// calling thread staying alive (see [`tools`]'s `spawn_supervised`).
    pub async fn start(tools: &Tools) -> anyhow::Result<ControlPlane> {
        Self::start_with(tools, &ControlPlaneOptions::default()).await
    }

    /// [`ControlPlane::start`] with `options`.
    pub async fn start_with(tools: &Tools, options: &ControlPlaneOptions) -> anyhow::Result<ControlPlane> {
        let started = Instant::now();
        let workdir = tools::fixture_workdir("controlplane")?;
        let dir = workdir.path();

        let extra_names: Vec<String> = options
            .advertise_address
            .iter()
            .map(ToString::to_string)
            .chain(first_service_address(&options.service_cidr))
            .collect();
        let pki = generate_pki(&extra_names)?;
        let admin_token = random_token();
        let write = |name: &str, contents: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(path)
        };
        let ca_file = write("ca.crt", &pki.ca_pem)?;
        let serving_cert_file = write("apiserver.crt", &pki.serving_cert_pem)?;
        let serving_key_file = write("apiserver.key", &pki.serving_key_pem)?;
        let service_account_key_file = write("service-account.key", &pki.service_account_key_pem)?;
        // The API server reads only public keys, or private keys in the older PKCS#1/SEC1
        // formats, from --service-account-key-file; it would reject the PKCS#8 file.
        let service_account_public_key_file = write("service-account.pub", &pki.service_account_public_key_pem)?;
        // Static token file format: token,user,uid,"group1,group2".
        let token_file = write("tokens.csv", &format!("{admin_token},admin,admin,system:masters\n"))?;

        // Audit only status writes of TasklistConnections: tests count them to prove the
        // operator writes status only when something in it changed.
        let audit_policy_file = write("audit-policy.yaml", AUDIT_POLICY)?;

        let etcd_client_port = tools::free_loopback_port()?;
        let etcd_peer_port = tools::free_loopback_port()?;
        let apiserver_port = tools::free_loopback_port()?;

        let mut apiserver_args: Vec<OsString> = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_client_port}").into(),
            format!("--secure-port={apiserver_port}").into(),
            flag_with_path("--tls-cert-file", &serving_cert_file),
            flag_with_path("--tls-private-key-file", &serving_key_file),
            flag_with_path("--client-ca-file", &ca_file),
            flag_with_path("--token-auth-file", &token_file),
            "--authorization-mode=RBAC".into(),
            // The issuer is the API server's own URL, as on clusters whose issuer identity
            // providers can reach: Keycloak reads <issuer>/.well-known/openid-configuration
            // and the JWKS it names to verify ServiceAccount tokens (federated client
            // authentication). The API server's audiences default to it.
            format!("--service-account-issuer={}", server_url(apiserver_port)).into(),
            format!("--service-account-jwks-uri={}/openid/v1/jwks", server_url(apiserver_port)).into(),
            flag_with_path("--service-account-key-file", &service_account_public_key_file),
            flag_with_path("--service-account-signing-key-file", &service_account_key_file),
            format!("--service-cluster-ip-range={}", options.service_cidr).into(),
            "--allow-privileged=true".into(),
            // API Priority and Fairness adds start-up work and nothing these tests need.
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            flag_with_path("--audit-policy-file", &audit_policy_file),
            flag_with_path("--audit-log-path", &dir.join(AUDIT_LOG)),
        ];
        match options.advertise_address {
            Some(address) => apiserver_args.extend([
                // Loopback for the tests and the tools, the node's address for the kubelet and Pods.
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={address}").into(),
                // `kubectl logs` and `exec` go to the kubelet at the node's InternalIP.
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]),
            None => apiserver_args.extend([
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // The reconciler would publish 127.0.0.1 as the `kubernetes` service's endpoint, which
                // validation rejects (loopback), logging an error every few seconds. No pod needs it.
                "--endpoint-reconciler-type=none".into(),
            ]),
        }

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &server_url(apiserver_port),
            &pki.ca_pem,
            "admin",
            &admin_token,
            None,
        )?;
        let admin_config = Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&admin_kubeconfig).context("cannot read the admin kubeconfig just written")?,
            &KubeConfigOptions::default(),
        )
        .await
        .context("cannot build a client configuration from the admin kubeconfig")?;

        // From here on, a failing step drops `control_plane`, which kills what did start.
        let mut control_plane = ControlPlane {
            etcd: start_etcd(tools, dir, etcd_client_port, etcd_peer_port)?,
            apiserver: None,
            controller_manager: None,
            apiserver_binary: tools.kube_apiserver.clone(),
            apiserver_args,
            apiserver_port,
            ca_pem: pki.ca_pem,
            admin_token,
            admin_kubeconfig,
            admin_config,
            kubeconfig_counter: AtomicU32::new(0),
            workdir,
        };
        control_plane.wait_for_etcd(etcd_client_port).await?;
        control_plane.start_apiserver().await?;
        control_plane.controller_manager = Some(start_controller_manager(
            tools,
            control_plane.workdir.path(),
            &control_plane.admin_kubeconfig,
            &service_account_key_file,
            &ca_file,
            &options.controllers,
        )?);
        control_plane.wait_for_controller_manager().await?;
        eprintln!(
            "testsupport: control plane ready at {} in {:.1}s",
            control_plane.server_url(),
            started.elapsed().as_secs_f64()
        );
        Ok(control_plane)
    }

    /// A client authenticated as cluster admin (`system:masters`).
    ///
    /// Each call builds a fresh client bound to the calling tokio runtime (a `kube::Client`
    /// runs a background task on the runtime that created it), so it must be called inside one.
    pub fn client(&self) -> Client {
        Client::try_from(self.admin_config.clone()).expect("the admin client configuration was valid at start")
    }

    /// The issuer of the API server's ServiceAccount tokens (`--service-account-issuer`),
    /// which is also its default audience: its own URL.
    pub fn service_account_issuer(&self) -> String {
        self.server_url()
    }

    /// The admin kubeconfig file; `kubectl --kubeconfig` and the operator accept it.
    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// `https://127.0.0.1:PORT`; the port stays the same across API server restarts.
    pub fn server_url(&self) -> String {
        server_url(self.apiserver_port)
    }

    /// PEM of the CA that signed the API server's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Creates a namespace named `prefix` plus a random suffix and returns its name.
    pub async fn create_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let separator = if prefix.ends_with('-') { "" } else { "-" };
        let name = format!("{prefix}{separator}{}", random_suffix(6));
        self.create_namespace_named(&name).await?;
        Ok(name)
    }

    /// Creates the namespace `name` exactly (a README's, for example).
    pub async fn create_namespace_named(&self, name: &str) -> anyhow::Result<()> {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("cannot create namespace {name}"))?;
        Ok(())
    }

    /// Stops kube-apiserver, leaving etcd and the controller manager running, to simulate an
    /// API outage: SIGTERM (it stops listening at once), then SIGKILL after a few seconds.
    /// Does nothing if it is already stopped.
    pub async fn stop_apiserver(&mut self) -> anyhow::Result<()> {
        let Some(mut apiserver) = self.apiserver.take() else {
            return Ok(());
        };
        tools::terminate_child(&mut apiserver, APISERVER_SHUTDOWN_GRACE)
            .await
            .context("cannot stop kube-apiserver")?;
        Ok(())
    }

    /// Starts kube-apiserver again, on the same port with the same configuration and data,
    /// and waits until it is ready. Does nothing but wait if it is already running.
    pub async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        if self.apiserver.is_none() {
            let mut command = Command::new(&self.apiserver_binary);
            command.args(&self.apiserver_args);
            let (stdout, stderr) = tools::log_file_stdio(&self.workdir.path().join(APISERVER_LOG))?;
            command.stdout(stdout).stderr(stderr);
            let child =
                tools::spawn_supervised(command, false).with_context(|| format!("cannot run {}", self.apiserver_binary.display()))?;
            self.apiserver = Some(child);
        }
        self.wait_for_apiserver_ready().await
    }

    /// Asks the API server for a one-hour token of `service_account` (created if it does not
    /// exist yet) and writes a kubeconfig that uses it, with `namespace` as its default.
    /// Returns the file's path; the file lives as long as the control plane.
    pub async fn service_account_kubeconfig(&self, namespace: &str, service_account: &str) -> anyhow::Result<PathBuf> {
        let accounts = Api::<ServiceAccount>::namespaced(self.client(), namespace);
        if accounts.get_opt(service_account).await?.is_none() {
            let account = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(service_account.to_string()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let created = accounts.create(&PostParams::default(), &account).await;
            // 409: created meanwhile (the service-account controller makes `default` everywhere).
            if let Err(error) = created
                && !matches!(&error, kube::Error::Api(status) if status.code == 409)
            {
                return Err(error).with_context(|| format!("cannot create service account {namespace}/{service_account}"));
            }
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                // No audiences: the token is for the API server itself.
                audiences: Vec::new(),
                expiration_seconds: Some(SERVICE_ACCOUNT_TOKEN_SECONDS),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = accounts
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("cannot request a token for service account {namespace}/{service_account}"))?
            .status
            .context("the TokenRequest response has no status")?
            .token;
        let number = self.kubeconfig_counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .workdir
            .path()
            .join(format!("sa-{namespace}-{service_account}-{number}.kubeconfig"));
        let user = format!("system:serviceaccount:{namespace}:{service_account}");
        write_kubeconfig(&path, &self.server_url(), &self.ca_pem, &user, &token, Some(namespace))?;
        Ok(path)
    }

    /// How many writes (patch or update) of TasklistConnection status in `namespace` the API
    /// server has completed, from its audit log.
    ///
    /// Fails when the audit log cannot be read: a count of 0 must mean "no writes", never
    /// "could not look".
    pub fn status_writes(&self, namespace: &str) -> anyhow::Result<usize> {
        let path = self.workdir.path().join(AUDIT_LOG);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the audit log {}", path.display()))?;
        Ok(text
            .lines()
            // A line still being written does not parse; it is counted next time.
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| {
                event["stage"] == "ResponseComplete"
                    && event["objectRef"]["namespace"] == namespace
                    && event["objectRef"]["subresource"] == "status"
            })
            .count())
    }

    /// Every request on Secrets, Events and TasklistConnections (and writes of their status)
    /// in `namespace` that the API server has completed, from its audit log, oldest first.
    /// Long-running watches count when they end.
    ///
    /// Fails when the audit log cannot be read, like [`ControlPlane::status_writes`].
    pub fn api_requests(&self, namespace: &str) -> anyhow::Result<Vec<ApiRequest>> {
        let path = self.workdir.path().join(AUDIT_LOG);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the audit log {}", path.display()))?;
        Ok(text
            .lines()
            // A line still being written does not parse; it is counted next time.
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["stage"] == "ResponseComplete" && event["objectRef"]["namespace"] == namespace)
            .map(|event| {
                let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_owned();
                ApiRequest {
                    verb: text(&event["verb"]),
                    resource: text(&event["objectRef"]["resource"]),
                    subresource: text(&event["objectRef"]["subresource"]),
                    name: text(&event["objectRef"]["name"]),
                    code: event["responseStatus"]["code"].as_u64().unwrap_or_default(),
                    user_agent: text(&event["userAgent"]),
                }
            })
            .collect())
    }

    /// The last `lines` lines of each component's log, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        [ETCD_LOG, APISERVER_LOG, CONTROLLER_MANAGER_LOG]
            .iter()
            .map(|name| format!("==> {name} <==\n{}", tools::tail_of_file(&self.workdir.path().join(name), lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn failure_with_logs(&self, error: anyhow::Error) -> anyhow::Error {
        anyhow!("{error:#}\n{}", self.logs_tail(40))
    }

    async fn wait_for_etcd(&mut self, client_port: u16) -> anyhow::Result<()> {
        let http = plain_http_client()?;
        let url = format!("http://127.0.0.1:{client_port}/health");
        let healthy = async || match http.get(&url).send().await {
            Ok(response) => response.text().await.is_ok_and(|body| body.contains("\"health\":\"true\"")),
            Err(_) => false,
        };
        let result = tools::wait_until_ready(&mut self.etcd, "etcd", STARTUP_DEADLINE, healthy).await;
        result.map_err(|error| self.failure_with_logs(error))
    }

    async fn wait_for_apiserver_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?)
            .timeout(Duration::from_secs(5))
            .build()?;
        let url = format!("{}/readyz", self.server_url());
        let token = self.admin_token.clone();
        let ready = async || {
            let response = http.get(&url).bearer_auth(&token).send().await;
            response.is_ok_and(|response| response.status().is_success())
        };
        let apiserver = self.apiserver.as_mut().expect("start_apiserver spawned it");
        let result = tools::wait_until_ready(apiserver, "kube-apiserver", STARTUP_DEADLINE, ready).await;
        result.map_err(|error| self.failure_with_logs(error))
    }

    /// The service-account controller creates `default` in every namespace, so its appearance
    /// in `default` shows that the controller manager runs and can reach the API server.
    async fn wait_for_controller_manager(&mut self) -> anyhow::Result<()> {
        let accounts = Api::<ServiceAccount>::namespaced(self.client(), "default");
        let working = async || matches!(accounts.get_opt("default").await, Ok(Some(_)));
        let controller_manager = self.controller_manager.as_mut().expect("start spawned it");
        let result = tools::wait_until_ready(controller_manager, "kube-controller-manager", STARTUP_DEADLINE, working).await;
        result.map_err(|error| self.failure_with_logs(error))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Clients first, storage last: fewer error lines in the logs of the survivors.
        for child in [&mut self.controller_manager, &mut self.apiserver].into_iter().flatten() {
            tools::kill_and_reap(child);
        }
        tools::kill_and_reap(&mut self.etcd);
        // `workdir` is removed after this, when the fields are dropped.
    }
}

fn start_etcd(tools: &Tools, dir: &Path, client_port: u16, peer_port: u16) -> anyhow::Result<Child> {
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new(&tools.etcd);
    command
        .arg("--name=e2e")
        .arg(flag_with_path("--data-dir", &dir.join("etcd-data")))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=e2e={peer_url}"))
        // The data is thrown away after the test; fsync would only slow every write down.
        .arg("--unsafe-no-fsync=true")
        .arg("--log-level=warn");
    let (stdout, stderr) = tools::log_file_stdio(&dir.join(ETCD_LOG))?;
    command.stdout(stdout).stderr(stderr);
    tools::spawn_supervised(command, false).with_context(|| format!("cannot run {}", tools.etcd.display()))
}

fn start_controller_manager(
    tools: &Tools,
    dir: &Path,
    admin_kubeconfig: &Path,
    service_account_key_file: &Path,
    ca_file: &Path,
    controllers: &[&str],
) -> anyhow::Result<Child> {
    let mut command = Command::new(&tools.kube_controller_manager);
    command
        .arg(flag_with_path("--kubeconfig", admin_kubeconfig))
        // clusterrole-aggregation fills the built-in view/edit roles from the chart's
        // aggregated ClusterRoles.
        .arg(format!("--controllers={}", controllers.join(",")))
        .arg(flag_with_path("--service-account-private-key-file", service_account_key_file))
        .arg(flag_with_path("--root-ca-file", ca_file))
        .arg("--leader-elect=false")
        .arg("--use-service-account-credentials=false")
        // No metrics or health endpoint: nothing scrapes it, and it would need a free port.
        .arg("--secure-port=0");
    let (stdout, stderr) = tools::log_file_stdio(&dir.join(CONTROLLER_MANAGER_LOG))?;
    command.stdout(stdout).stderr(stderr);
    tools::spawn_supervised(command, false).with_context(|| format!("cannot run {}", tools.kube_controller_manager.display()))
}

/// The `kubernetes` Service's address: the first address of the service range.
fn first_service_address(service_cidr: &str) -> Option<String> {
    let network: Ipv4Addr = service_cidr.split('/').next()?.parse().ok()?;
    Some(Ipv4Addr::from(u32::from(network) + 1).to_string())
}

fn generate_pki(extra_names: &[String]) -> anyhow::Result<Pki> {
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "tasklist-e2e-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    // The names a client inside or outside a real cluster would use for the API server.
    let names = [
        "127.0.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
    ];
    let mut all_names: Vec<String> = names.map(String::from).to_vec();
    all_names.extend(extra_names.iter().cloned());
    let mut serving_params = CertificateParams::new(all_names)?;
    serving_params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving_params.use_authority_key_identifier_extension = true;
    let serving_key = KeyPair::generate()?;
    let serving_cert = serving_params.signed_by(&serving_key, &ca)?;

    let service_account_key = KeyPair::generate()?;
    Ok(Pki {
        ca_pem: ca.pem(),
        serving_cert_pem: serving_cert.pem(),
        serving_key_pem: serving_key.serialize_pem(),
        service_account_key_pem: service_account_key.serialize_pem(),
        service_account_public_key_pem: service_account_key.public_key_pem(),
    })
}

/// Writes a kubeconfig with one cluster (CA embedded, so the file stands alone), one user
/// authenticated by bearer `token`, and a current context joining them.
fn write_kubeconfig(path: &Path, server: &str, ca_pem: &str, user: &str, token: &str, namespace: Option<&str>) -> anyhow::Result<()> {
    let mut context = json!({ "cluster": "e2e", "user": user });
    if let Some(namespace) = namespace {
        context["namespace"] = json!(namespace);
    }
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "e2e",
            "cluster": {
                "server": server,
                "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
        }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{ "name": "e2e", "context": context }],
        "current-context": "e2e",
    });
    let text = serde_yaml::to_string(&kubeconfig)?;
    std::fs::write(path, text).with_context(|| format!("cannot write kubeconfig {}", path.display()))
}

fn server_url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

fn flag_with_path(flag: &str, path: &Path) -> OsString {
    let mut argument = OsString::from(format!("{flag}="));
    argument.push(path);
    argument
}

fn plain_http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build()?)
}

fn random_token() -> String {
    random_suffix(40)
}

/// Lower-case letters and digits: valid in DNS labels and in static token files.
fn random_suffix(length: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..length).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}
