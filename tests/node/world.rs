//! The shared world of the node tests (control plane, node, registry, images) and the
//! helpers the scenarios share: helm and kubectl as subprocesses, namespaces, connections,
//! waiting.
//!
//! The operator's image and chart are published the way the README says: its "Install with
//! Helm" commands run as written (`make image`, `buildah push`, `helm package`, `helm push`)
//! against a private registry on the node's network, with TLS and a password. Every scenario
//! then installs the chart from `oci://` and the kubelet pulls the image with a pull secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Client, CustomResourceExt};
use tasklist_operator::crd::TasklistConnection;
use tempfile::TempDir;
use testsupport::controlplane::ControlPlane;
use testsupport::image::{self, ImageArchive, ImageConfig};
use testsupport::node::{self, Node, NodeTools, RegistryTrust};
use testsupport::registry::{Registry, ShippingTools};
use testsupport::standin::{StandinOptions, StandinTasklist};
use testsupport::tools::Tools;

/// Where the registry listens: the node IP, on the node's bridge, inside the test's own
/// network namespace.
const REGISTRY_PORT: u16 = 5000;
/// The README's lines before the commands the tests run as written.
pub const README_PUBLISH_MARKER: &str = "<!-- tests/node runs these commands as written: publish -->";
pub const README_INSTALL_MARKER: &str = "<!-- tests/node runs these commands as written: install -->";
/// The pull secret the README's commands create, and the chart's values name.
pub const PULL_SECRET: &str = "registry-pull";
/// The consumer's image, imported (never pulled). The `.test` domain is reserved (RFC 2606):
/// nothing could ever be pulled from it.
pub const CONSUMER_IMAGE: &str = "tasklist-operator.test/consumer:node";
/// Where the consumer's image keeps its program.
pub const CONSUMER_PROGRAM: &str = "/consumer";
/// How long one helm or kubectl command may take (a busy 2-core machine included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(240);
pub const CLIENT_ID: &str = "orders";
pub const CLIENT_SECRET: &str = "orders-node-secret-1";

pub struct World {
    pub tools: Tools,
    pub node_tools: NodeTools,
    pub runtime: tokio::runtime::Runtime,
    /// Dropped before the control plane: the kubelet talks to it until it stops.
    node: Mutex<Node>,
    pub control_plane: ControlPlane,
    registry: Mutex<Registry>,
    /// The registry's address and account, and the chart's version.
    pub published: Published,
    /// HELM_*, REGISTRY_* and the other variables the README's commands and helm run with.
    pub shell_env: Vec<(String, String)>,
    /// Figures the scenarios measured, printed at the end (`name: value` lines).
    figures: Mutex<Vec<String>>,
    _images: TempDir,
}

impl World {
    pub fn start() -> anyhow::Result<World> {
        let tools = Tools::from_env()?;
        let node_tools = NodeTools::from_env()?;
        let shipping_tools = ShippingTools::from_env()?;
        // Removed on drop, or by the next run when this process was killed before that.
        let images_dir = testsupport::tools::fixture_workdir("node-images")?;
        let images = build_node_images(images_dir.path())?;
        let mut figures = Vec::new();

        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
        // The image and the chart are published while the control plane starts.
        let publishing = async {
            let registry = Registry::start(&shipping_tools, std::net::SocketAddrV4::new(node::NODE_IP, REGISTRY_PORT))
                .await
                .context("starting the registry")?;
            let shell_env = shell_env(&tools, &node_tools, &shipping_tools, &registry, images_dir.path())?;
            let published = publish(&registry, &shipping_tools, &shell_env, &mut figures)
                .await
                .map_err(|error| anyhow::anyhow!("{error:#}\n==> registry log <==\n{}", registry.logs_tail(15)))?;
            anyhow::Ok((registry, published, shell_env))
        };
        let starting_control_plane = async {
            let control_plane = ControlPlane::start_with(&tools, &node::node_control_plane_options())
                .await
                .context("starting the control plane")?;
            install_crd(&control_plane.client()).await?;
            anyhow::Ok(control_plane)
        };
        let (publishing, control_plane) = runtime.block_on(async { tokio::join!(publishing, starting_control_plane) });
        let (control_plane, (registry, published, shell_env)) = (control_plane?, publishing?);
        let trust = RegistryTrust {
            host: registry.address.clone(),
            ca_file: registry.ca_file.clone(),
        };
        let node = runtime
            .block_on(Node::start(&node_tools, &control_plane, &images, &[trust]))
            .context("starting the node")?;
        Ok(World {
            tools,
            node_tools,
            runtime,
            node: Mutex::new(node),
            control_plane,
            registry: Mutex::new(registry),
            published,
            shell_env,
            figures: Mutex::new(figures),
            _images: images_dir,
        })
    }

    /// Runs one scenario; on failure, the message carries the node's and the control plane's
    /// log tails.
    pub fn run(&self, name: &str, scenario: impl Future<Output = anyhow::Result<()>>) -> Result<(), String> {
        self.runtime.block_on(async {
            // A node component that died (the kubelet once panicked here) explains any failure.
            let outcome = scenario
                .await
                .and_then(|()| self.node().check_running())
                .and_then(|()| self.registry().check_running());
            match outcome {
                Ok(()) => Ok(()),
                Err(error) => Err(format!(
                    "{name}: {error:#}\n--- Pods and Events ---\n{}\n--- node logs (tail) ---\n{}\n--- registry log (tail) ---\n{}\n--- control plane logs (tail) ---\n{}",
                    self.cluster_state().await,
                    self.node().logs_tail(15),
                    self.registry().logs_tail(10),
                    self.control_plane.logs_tail(10)
                )),
            }
        })
    }

    /// Every Pod and the latest Events, as kubectl shows them, for failure messages.
    async fn cluster_state(&self) -> String {
        let mut state = String::new();
        for args in [
            &["get", "pods", "--all-namespaces", "--output", "wide"][..],
            &["get", "events", "--all-namespaces", "--sort-by", ".lastTimestamp"][..],
        ] {
            match self.kubectl(args).await {
                Ok((_, output)) => state.push_str(&output),
                Err(error) => state.push_str(&format!("kubectl {}: {error:#}\n", args.join(" "))),
            }
        }
        let pods = Api::<Pod>::all(self.client()).list(&ListParams::default()).await;
        for pod in pods.map(|list| list.items).unwrap_or_default() {
            let (Some(namespace), Some(name)) = (pod.metadata.namespace, pod.metadata.name) else {
                continue;
            };
            let logs = self.kubectl(&["logs", "--namespace", &namespace, &name, "--tail", "15"]).await;
            let logs = logs.map(|(_, output)| output).unwrap_or_else(|error| format!("{error:#}"));
            state.push_str(&format!("--- logs of {namespace}/{name} ---\n{logs}\n"));
        }
        state
    }

    pub fn client(&self) -> Client {
        self.control_plane.client()
    }

    pub fn node(&self) -> std::sync::MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a measured figure for the summary at the end of the run.
    pub fn figure(&self, line: String) {
        eprintln!("node figure: {line}");
        if let Ok(mut figures) = self.figures.lock() {
            figures.push(line);
        }
    }

    pub fn print_figures(&self) {
        if let Ok(figures) = self.figures.lock() {
            eprintln!("\n==> figures measured on the node\n  {}", figures.join("\n  "));
        }
    }

    /// Runs helm with the admin kubeconfig (and logged in to the registry); fails with its
    /// output unless it succeeds.
    pub async fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let (success, output) = run_tool(&self.tools.helm, self.control_plane.kubeconfig(), &self.shell_env, args).await?;
        ensure!(success, "`helm {}` failed:\n{output}", args.join(" "));
        Ok(output)
    }

    /// Runs kubectl with the admin kubeconfig: whether it succeeded, and its stdout and stderr.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        run_tool(&self.node_tools.kubectl, self.control_plane.kubeconfig(), &[], args).await
    }

    /// Runs one of the README's commands with bash, as written, in the repository's folder,
    /// with the registry's variables and the admin kubeconfig: its stdout and stderr.
    pub async fn readme_command(&self, command: &str) -> anyhow::Result<String> {
        run_shell(command, &self.shell_env, Some(self.control_plane.kubeconfig())).await
    }

    /// The chart in the registry, as `helm install` takes it.
    pub fn chart_reference(&self) -> String {
        format!("oci://{}/charts/tasklist-operator", self.published.registry)
    }

    /// Creates the pull secret [`PULL_SECRET`] in `namespace` with the registry's account and
    /// `password` (a wrong one, to see the kubelet fail), as the README does.
    pub async fn create_pull_secret(&self, namespace: &str, password: &str) -> anyhow::Result<()> {
        let server = format!("--docker-server={}", self.published.registry);
        let user = format!("--docker-username={}", self.published.user);
        let password = format!("--docker-password={password}");
        let (created, output) = self
            .kubectl(&[
                "--namespace",
                namespace,
                "create",
                "secret",
                "docker-registry",
                PULL_SECRET,
                &server,
                &user,
                &password,
            ])
            .await?;
        // The command line holds the password: only kubectl's answer goes into the error.
        ensure!(created, "kubectl create secret docker-registry failed:\n{output}");
        Ok(())
    }

    /// Creates a namespace `prefix-XXXXXX` that enforces the restricted Pod Security Standard.
    pub async fn restricted_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let name = self.control_plane.create_namespace(prefix).await?;
        self.enforce_restricted(&name).await?;
        Ok(name)
    }

    /// Creates namespace `name` (the README's), enforcing the restricted Pod Security Standard.
    pub async fn restricted_namespace_named(&self, name: &str) -> anyhow::Result<()> {
        self.control_plane.create_namespace_named(name).await?;
        self.enforce_restricted(name).await
    }

    async fn enforce_restricted(&self, name: &str) -> anyhow::Result<()> {
        let namespaces = Api::<Namespace>::all(self.client());
        let patch = serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
        namespaces
            .patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .with_context(|| format!("cannot label namespace {name}"))?;
        Ok(())
    }

    /// The messages of the kubelet's `Pulled` Events for Pods of `release` ("Successfully
    /// pulled image ... in 1.2s ...").
    pub async fn pull_events(&self, namespace: &str) -> anyhow::Result<Vec<String>> {
        let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(self.client(), namespace)
            .list(&ListParams::default().fields("reason=Pulled"))
            .await?;
        Ok(events.items.into_iter().filter_map(|event| event.message).collect())
    }

    /// `helm install RELEASE` of the chart from the registry into `namespace`, watching only
    /// `namespace`, with the README's settings: the image from the registry, pulled
    /// `Always` with the pull secret (created here). Waits until the Deployment is available;
    /// returns helm's output (the chart's notes).
    pub async fn install(&self, release: &str, namespace: &str, extra: &[&str]) -> anyhow::Result<String> {
        self.create_pull_secret(namespace, &self.published.password).await?;
        let mut args = vec!["--wait", "--timeout", "120s"];
        args.extend_from_slice(extra);
        self.install_without_waiting(release, namespace, &args).await
    }

    /// `helm install` as [`World::install`] does, without creating the pull secret or waiting.
    pub async fn install_without_waiting(&self, release: &str, namespace: &str, extra: &[&str]) -> anyhow::Result<String> {
        let watch = format!("watchNamespaces={{{namespace}}}");
        let repository = format!("image.repository={}/tasklist-operator", self.published.registry);
        let pull_secret = format!("imagePullSecrets[0].name={PULL_SECRET}");
        let chart = self.chart_reference();
        let ca_file = self.published.ca_file.display().to_string();
        let mut args = vec![
            "install",
            release,
            &chart,
            "--version",
            &self.published.chart_version,
            "--ca-file",
            &ca_file,
            "--namespace",
            namespace,
            "--set",
            &repository,
            "--set",
            "image.pullPolicy=Always",
            "--set",
            &pull_secret,
            // The stand-ins on the node's bridge speak plain http.
            "--set",
            "policy.allowHttp=true",
            "--set",
            &watch,
        ];
        args.extend_from_slice(extra);
        self.helm(&args).await
    }

    /// Registers the client at `standin` and applies Secret `client` and an oauth2
    /// connection `name` against it, with `refresh_before` if given.
    pub async fn create_connection(
        &self,
        namespace: &str,
        name: &str,
        standin: &StandinTasklist,
        refresh_before: Option<&str>,
    ) -> anyhow::Result<()> {
        standin.add_client(CLIENT_ID, CLIENT_SECRET);
        let oauth2 = serde_json::json!({"tokenUrl": standin.token_url(), "clientSecretRef": {"name": "client"}});
        self.create_oauth2_connection(namespace, name, &standin.url(), oauth2, (CLIENT_ID, CLIENT_SECRET), refresh_before)
            .await
    }

    /// Applies Secret `client` with `client` (id, secret) and connection `name` to Tasklist
    /// at `url` with the `oauth2` settings (which name Secret `client`).
    pub async fn create_oauth2_connection(
        &self,
        namespace: &str,
        name: &str,
        url: &str,
        oauth2: serde_json::Value,
        client: (&str, &str),
        refresh_before: Option<&str>,
    ) -> anyhow::Result<()> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("client".into()),
                ..Default::default()
            },
            string_data: Some(BTreeMap::from([
                ("client_id".to_owned(), client.0.to_owned()),
                ("client_secret".to_owned(), client.1.to_owned()),
            ])),
            ..Default::default()
        };
        let secrets = Api::<Secret>::namespaced(self.client(), namespace);
        if secrets.get_opt("client").await?.is_none() {
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .context("creating Secret client")?;
        }
        let mut spec = serde_json::json!({ "url": url, "auth": {"oauth2": oauth2} });
        if let Some(refresh_before) = refresh_before {
            spec["refreshBefore"] = refresh_before.into();
        }
        let connection: TasklistConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1",
            "kind": "TasklistConnection",
            "metadata": {"name": name},
            "spec": spec,
        }))?;
        Api::<TasklistConnection>::namespaced(self.client(), namespace)
            .create(&PostParams::default(), &connection)
            .await
            .with_context(|| format!("creating connection {namespace}/{name}"))?;
        Ok(())
    }

    /// Whether connection `name` has `Ready=True`.
    pub async fn connection_ready(&self, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let connection = Api::<TasklistConnection>::namespaced(self.client(), namespace).get(name).await?;
        Ok(connection
            .status
            .iter()
            .flat_map(|status| status.conditions.iter())
            .any(|condition| condition.type_ == "Ready" && condition.status == "True"))
    }

    pub async fn wait_connection_ready(&self, namespace: &str, name: &str, within: Duration) -> anyhow::Result<()> {
        wait_for(&format!("connection {namespace}/{name} Ready"), within, async || {
            self.connection_ready(namespace, name).await
        })
        .await
    }

    /// The Pods of release `release` in `namespace` (the chart's instance label).
    pub async fn release_pods(&self, namespace: &str, release: &str) -> anyhow::Result<Vec<Pod>> {
        let pods = Api::<Pod>::namespaced(self.client(), namespace);
        let selector = format!("app.kubernetes.io/instance={release}");
        Ok(pods.list(&ListParams::default().labels(&selector)).await?.items)
    }

    /// The derived Secret's data, decoded.
    pub async fn derived_secret(&self, namespace: &str, name: &str) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        let secret = Api::<Secret>::namespaced(self.client(), namespace).get_opt(name).await?;
        Ok(secret.map(|secret| {
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(key, value)| (key, String::from_utf8_lossy(&value.0).into_owned()))
                .collect()
        }))
    }
}

/// A stand-in Tasklist on the node IP, where Pods reach it.
pub async fn node_standin() -> anyhow::Result<StandinTasklist> {
    StandinTasklist::start_with(StandinOptions {
        listen_address: node::NODE_IP,
        ..StandinOptions::default()
    })
    .await
}

/// Whether the Pod is Running with every container ready.
pub fn pod_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|status| status.phase.as_deref()) == Some("Running")
        && status
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The restart count of the Pod's first container.
pub fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .and_then(|statuses| statuses.first())
        .map_or(0, |status| status.restart_count)
}

/// Polls `check` every 500 ms until it says true; fails after `within`, or at once when
/// `check` fails.
pub async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if check().await.with_context(|| format!("while waiting for {what}"))? {
            return Ok(());
        }
        if started.elapsed() >= within {
            bail!("{what}: not reached within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run_tool(program: &Path, kubeconfig: &Path, env: &[(String, String)], args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(name, value)| (name, value)))
        .env("KUBECONFIG", kubeconfig)
        .kill_on_drop(true);
    let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .with_context(|| format!("`{} {}` took longer than {COMMAND_TIMEOUT:?}", program.display(), args.join(" ")))?
        .with_context(|| format!("cannot run {}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The release build of the operator: the image holds it, as the Dockerfile's does.
/// `make test` builds it before the tests (`cargo build --release`).
fn release_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TLO_OPERATOR_RELEASE_BINARY") {
        return Ok(PathBuf::from(path));
    }
    // target/debug/tasklist-operator -> target/release/tasklist-operator
    let debug = PathBuf::from(env!("CARGO_BIN_EXE_tasklist-operator"));
    let release = debug
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("release/tasklist-operator"))
        .context("cannot tell the target folder from the test binary's path")?;
    ensure!(
        release.is_file(),
        "{} is missing: the node tests put the release build into the image. Run `make test`, or \
         `cargo build --release --locked --bin tasklist-operator` first (or set TLO_OPERATOR_RELEASE_BINARY)",
        release.display()
    );
    Ok(release)
}

/// The pause and the consumer's images, which containerd imports: small static C programs.
fn build_node_images(dir: &Path) -> anyhow::Result<Vec<ImageArchive>> {
    let sources = repository_root().join("tests/node/images");
    let pause_rootfs = dir.join("pause-rootfs");
    std::fs::create_dir_all(&pause_rootfs)?;
    image::static_c_program(&sources.join("pause.c"), &pause_rootfs.join("pause"))?;
    let pause_config = ImageConfig {
        entrypoint: vec!["/pause".into()],
        user: Some("65535:65535".into()),
        ..ImageConfig::default()
    };
    let pause = image::write_docker_archive(&pause_rootfs, &pause_config, node::PAUSE_IMAGE, &dir.join("pause.tar"))?;

    let consumer_rootfs = dir.join("consumer-rootfs");
    std::fs::create_dir_all(&consumer_rootfs)?;
    image::static_c_program(
        &sources.join("consumer.c"),
        &consumer_rootfs.join(CONSUMER_PROGRAM.trim_start_matches('/')),
    )?;
    let consumer_config = ImageConfig {
        entrypoint: vec![CONSUMER_PROGRAM.into()],
        user: Some("65532:65532".into()),
        ..ImageConfig::default()
    };
    let consumer = image::write_docker_archive(&consumer_rootfs, &consumer_config, CONSUMER_IMAGE, &dir.join("consumer.tar"))?;
    Ok(vec![pause, consumer])
}

/// What the README's publish commands put into the registry, and how to reach it.
pub struct Published {
    /// `host:port` of the registry.
    pub registry: String,
    pub user: String,
    pub password: String,
    pub ca_file: PathBuf,
    /// The chart's version (Chart.yaml), which `helm install oci://... --version` names.
    pub chart_version: String,
    /// The image's digest in the registry (`sha256:...`).
    pub image_digest: String,
}

/// The variables the README's commands read (REGISTRY, REGISTRY_USER, REGISTRY_PASSWORD,
/// REGISTRY_CA, REGISTRY_CERTS), and those that keep buildah's and helm's state in this run's
/// folder instead of the machine's: image storage (vfs, no mounts), registry logins, helm's
/// cache. `make image` uses the release binary the tests use (cargo's lock is the test run's).
fn shell_env(
    tools: &Tools,
    node_tools: &NodeTools,
    shipping_tools: &ShippingTools,
    registry: &Registry,
    dir: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let state = dir.join("shipping");
    std::fs::create_dir_all(&state)?;
    let path_of = |name: &str| state.join(name).display().to_string();
    let storage_conf = state.join("storage.conf");
    std::fs::write(
        &storage_conf,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            path_of("containers-storage"),
            path_of("containers-run")
        ),
    )?;
    let mut search_path = Vec::new();
    for program in [&tools.helm, &node_tools.kubectl, &shipping_tools.buildah] {
        if let Some(folder) = program.parent() {
            search_path.push(folder.to_path_buf());
        }
    }
    search_path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let search_path = std::env::join_paths(search_path).context("a PATH entry holds a colon")?;
    Ok(vec![
        ("REGISTRY".into(), registry.address.clone()),
        ("REGISTRY_USER".into(), registry.user.clone()),
        ("REGISTRY_PASSWORD".into(), registry.password.clone()),
        ("REGISTRY_CA".into(), registry.ca_file.display().to_string()),
        ("REGISTRY_CERTS".into(), registry.certs_dir.display().to_string()),
        ("CONTAINERS_STORAGE_CONF".into(), storage_conf.display().to_string()),
        ("REGISTRY_AUTH_FILE".into(), path_of("auth.json")),
        ("HELM_REGISTRY_CONFIG".into(), path_of("helm-registry.json")),
        ("HELM_CACHE_HOME".into(), path_of("helm-cache")),
        ("HELM_CONFIG_HOME".into(), path_of("helm-config")),
        ("HELM_DATA_HOME".into(), path_of("helm-data")),
        ("TLO_OPERATOR_RELEASE_BINARY".into(), release_binary()?.display().to_string()),
        ("TLO_IMAGE_OUT".into(), path_of("image")),
        ("PATH".into(), search_path.to_string_lossy().into_owned()),
    ])
}

/// Runs the README's publish commands as written, each timed, and checks what they made:
/// `make image` printed the image, its digest, size and SBOM (CycloneDX, naming the
/// operator); the registry serves the image with the Dockerfile's settings.
async fn publish(
    registry: &Registry,
    shipping_tools: &ShippingTools,
    env: &[(String, String)],
    figures: &mut Vec<String>,
) -> anyhow::Result<Published> {
    let readme = std::fs::read_to_string(repository_root().join("README.md")).context("cannot read the README")?;
    let commands = testsupport::readme::shell_commands_after(&readme, README_PUBLISH_MARKER)?;
    let mut make_image_output = None;
    for command in &commands {
        let started = Instant::now();
        let output = run_shell(command, env, None).await?;
        let program = command_name(command);
        figures.push(format!("{program}: {:.1} s", started.elapsed().as_secs_f64()));
        if program == "make image" {
            // hack/image.sh's own timing of `buildah build`, without cargo and the SBOM.
            if let Some(build) = output.lines().find_map(|line| line.strip_prefix("image: built in ")) {
                figures.push(format!("buildah build (within make image): {build}"));
            }
            make_image_output = Some(output);
        }
    }
    let output = make_image_output.context("the README's publish commands do not run `make image`")?;
    let printed = |key: &str| {
        output
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}: ")))
            .map(str::to_owned)
            .with_context(|| format!("`make image` printed no `{key}:` line:\n{output}"))
    };
    let (image, size, sbom) = (printed("image")?, printed("size")?, printed("sbom")?);
    ensure!(
        printed("digest")?.starts_with("sha256:"),
        "`make image` printed no sha256 digest:\n{output}"
    );
    let sbom_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sbom).with_context(|| format!("cannot read the SBOM {sbom}"))?)
            .with_context(|| format!("the SBOM {sbom} is not JSON"))?;
    ensure!(
        sbom_json["bomFormat"] == "CycloneDX" && sbom_json["metadata"]["component"]["name"] == "tasklist-operator",
        "the SBOM {sbom} is not a CycloneDX BOM of tasklist-operator"
    );
    let components = sbom_json["components"].as_array().map_or(0, Vec::len);
    ensure!(
        sbom_json["components"]
            .as_array()
            .is_some_and(|all| all.iter().any(|component| component["name"] == "kube-runtime")),
        "the SBOM {sbom} does not list kube-runtime among its {components} components"
    );
    figures.push(format!(
        "make image: {image}, {size} in buildah's storage; SBOM with {components} crates"
    ));

    // What the registry serves, as the kubelet will pull it.
    let creds = format!("{}:{}", registry.user, registry.password);
    let reference = format!("docker://{image}");
    let inspect = |extra: &'static [&'static str]| {
        let mut command = tokio::process::Command::new(&shipping_tools.skopeo);
        command
            .arg("inspect")
            .args(extra)
            .arg("--cert-dir")
            .arg(&registry.certs_dir)
            .arg("--creds")
            .arg(&creds)
            .arg(&reference);
        command
    };
    let config = run_json(inspect(&["--config"]), "skopeo inspect --config").await?;
    ensure!(
        config["config"]["User"] == "65532:65532" && config["config"]["Entrypoint"][0] == "/usr/local/bin/tasklist-operator",
        "the pushed image does not run as the Dockerfile says: {}",
        config["config"]
    );
    let manifest = run_json(inspect(&["--raw"]), "skopeo inspect --raw").await?;
    let compressed: u64 = manifest["layers"]
        .as_array()
        .map(|layers| layers.iter().filter_map(|layer| layer["size"].as_u64()).sum())
        .unwrap_or_default();
    let described = run_json(inspect(&[]), "skopeo inspect").await?;
    let image_digest = described["Digest"].as_str().context("skopeo inspect printed no Digest")?.to_owned();
    figures.push(format!(
        "image in the registry: {image_digest}, {:.1} MB compressed",
        compressed as f64 / 1e6
    ));

    let chart: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        repository_root().join("charts/tasklist-operator/Chart.yaml"),
    )?)?;
    Ok(Published {
        registry: registry.address.clone(),
        user: registry.user.clone(),
        password: registry.password.clone(),
        ca_file: registry.ca_file.clone(),
        chart_version: chart["version"].as_str().context("Chart.yaml has no version")?.to_owned(),
        image_digest,
    })
}

/// A command's name for the figures: its leading plain words (`helm registry login`), up to
/// the first option, variable or path.
fn command_name(command: &str) -> String {
    let plain = |word: &&str| word.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !word.starts_with('-');
    command.split_whitespace().take_while(plain).take(3).collect::<Vec<_>>().join(" ")
}

/// Runs a program that prints JSON; fails with its stderr.
async fn run_json(mut command: tokio::process::Command, what: &str) -> anyhow::Result<serde_json::Value> {
    let output = command.output().await.with_context(|| format!("cannot run {what}"))?;
    ensure!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| format!("{what} printed no JSON"))
}

/// Runs `command` with `bash -c` in the repository's folder (as a user of the README would),
/// with `env` added; fails with its output unless it succeeds. The command, not the
/// variables, goes into the error: the variables hold the registry's password.
async fn run_shell(command: &str, env: &[(String, String)], kubeconfig: Option<&Path>) -> anyhow::Result<String> {
    let mut shell = tokio::process::Command::new("bash");
    shell
        .args(["-euo", "pipefail", "-c", command])
        .current_dir(repository_root())
        .envs(env.iter().map(|(name, value)| (name, value)))
        .kill_on_drop(true);
    if let Some(kubeconfig) = kubeconfig {
        shell.env("KUBECONFIG", kubeconfig);
    }
    let output = tokio::time::timeout(COMMAND_TIMEOUT, shell.output())
        .await
        .with_context(|| format!("`{command}` took longer than {COMMAND_TIMEOUT:?}"))?
        .context("cannot run bash")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "`{command}` failed ({}):\n{text}", output.status);
    Ok(text)
}

/// Installs the CRD from `crds/` and waits until it is established, so that the helm
/// installs of several scenarios at once never race to create it.
async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let path = repository_root().join("crds/tasklistconnection.yaml");
    let committed: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
    crds.create(&PostParams::default(), &committed)
        .await
        .context("creating the CRD from crds/")?;
    let established = kube::runtime::wait::conditions::is_crd_established();
    tokio::time::timeout(
        Duration::from_secs(30),
        kube::runtime::wait::await_condition(crds, TasklistConnection::crd_name(), established),
    )
    .await
    .context("the CRD was not established within 30 s")??;
    Ok(())
}
