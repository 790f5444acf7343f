//! The shared world of the node tests (control plane, node, images) and the helpers the
//! scenarios share: helm and kubectl as subprocesses, namespaces, connections, waiting.

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
use testsupport::node::{self, Node, NodeTools};
use testsupport::standin::{StandinOptions, StandinTasklist};
use testsupport::tools::Tools;

/// The operator's image, as the chart's `image.repository` and `image.tag` name it. The
/// `.test` domain is reserved (RFC 2606): nothing could ever be pulled from it.
pub const OPERATOR_REPOSITORY: &str = "tasklist-operator.test/tasklist-operator";
pub const OPERATOR_TAG: &str = "node";
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
    /// Figures the scenarios measured, printed at the end (`name: value` lines).
    figures: Mutex<Vec<String>>,
    _images: TempDir,
}

impl World {
    pub fn start() -> anyhow::Result<World> {
        let tools = Tools::from_env()?;
        let node_tools = NodeTools::from_env()?;
        // Removed on drop, or by the next run when this process was killed before that.
        let images_dir = testsupport::tools::fixture_workdir("node-images")?;
        let images = build_images(images_dir.path())?;
        let operator_image_bytes = images[0].layer_bytes;

        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
        let (control_plane, node) = runtime.block_on(async {
            let control_plane = ControlPlane::start_with(&tools, &node::node_control_plane_options())
                .await
                .context("starting the control plane")?;
            install_crd(&control_plane.client()).await?;
            let node = Node::start(&node_tools, &control_plane, &images)
                .await
                .context("starting the node")?;
            anyhow::Ok((control_plane, node))
        })?;
        Ok(World {
            tools,
            node_tools,
            runtime,
            node: Mutex::new(node),
            control_plane,
            figures: Mutex::new(vec![format!(
                "operator image: {:.1} MB (one layer, uncompressed)",
                operator_image_bytes as f64 / 1e6
            )]),
            _images: images_dir,
        })
    }

    /// Runs one scenario; on failure, the message carries the node's and the control plane's
    /// log tails.
    pub fn run(&self, name: &str, scenario: impl Future<Output = anyhow::Result<()>>) -> Result<(), String> {
        self.runtime.block_on(async {
            // A node component that died (the kubelet once panicked here) explains any failure.
            match scenario.await.and_then(|()| self.node().check_running()) {
                Ok(()) => Ok(()),
                Err(error) => Err(format!(
                    "{name}: {error:#}\n--- Pods and Events ---\n{}\n--- node logs (tail) ---\n{}\n--- control plane logs (tail) ---\n{}",
                    self.cluster_state().await,
                    self.node().logs_tail(15),
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

    /// Runs helm with the admin kubeconfig; fails with its output unless it succeeds.
    pub async fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let (success, output) = run_tool(&self.tools.helm, self.control_plane.kubeconfig(), args).await?;
        ensure!(success, "`helm {}` failed:\n{output}", args.join(" "));
        Ok(output)
    }

    /// Runs kubectl with the admin kubeconfig: whether it succeeded, and its stdout and stderr.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        run_tool(&self.node_tools.kubectl, self.control_plane.kubeconfig(), args).await
    }

    /// Creates a namespace `prefix-XXXXXX` that enforces the restricted Pod Security Standard.
    pub async fn restricted_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let name = self.control_plane.create_namespace(prefix).await?;
        let namespaces = Api::<Namespace>::all(self.client());
        let patch = serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
        namespaces
            .patch(&name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .with_context(|| format!("cannot label namespace {name}"))?;
        Ok(name)
    }

    /// `helm install RELEASE` of the chart into `namespace` with the offline image, watching
    /// only `namespace`, and waits until the Deployment is available. Returns helm's output
    /// (the chart's notes).
    pub async fn install(&self, release: &str, namespace: &str, extra: &[&str]) -> anyhow::Result<String> {
        let watch = format!("watchNamespaces={{{namespace}}}");
        let repository = format!("image.repository={OPERATOR_REPOSITORY}");
        let tag = format!("image.tag={OPERATOR_TAG}");
        let chart = chart_path();
        let mut args = vec![
            "install",
            release,
            chart.to_str().context("the chart path is not UTF-8")?,
            "--namespace",
            namespace,
            "--set",
            &repository,
            "--set",
            &tag,
            "--set",
            "image.pullPolicy=Never",
            // The stand-ins on the node's bridge speak plain http.
            "--set",
            "policy.allowHttp=true",
            "--set",
            &watch,
            "--wait",
            "--timeout",
            "120s",
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

async fn run_tool(program: &Path, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut command = tokio::process::Command::new(program);
    command.args(args).env("KUBECONFIG", kubeconfig).kill_on_drop(true);
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

pub fn chart_path() -> PathBuf {
    repository_root().join("charts/tasklist-operator")
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

/// The operator's, the pause and the consumer's images, in that order. The operator's has
/// the Dockerfile's runtime settings and `hack/image-rootfs.sh`'s files: the same recipe
/// as the Dockerfile, whose runtime stage must be exactly `FROM scratch` plus that rootfs.
fn build_images(dir: &Path) -> anyhow::Result<Vec<ImageArchive>> {
    let dockerfile = std::fs::read_to_string(repository_root().join("Dockerfile")).context("cannot read the Dockerfile")?;
    let stage = image::parse_runtime_stage(&dockerfile).context("reading the Dockerfile's runtime stage")?;
    ensure!(
        stage.base == "scratch" && stage.copies == ["COPY --from=builder /rootfs/ /"],
        "the Dockerfile's runtime stage no longer is `FROM scratch` + `COPY --from=builder /rootfs/ /` \
         (hack/image-rootfs.sh's output): the tests would not run the image users build. It is: FROM {} {:?}",
        stage.base,
        stage.copies
    );
    let operator_rootfs = dir.join("operator-rootfs");
    image::operator_rootfs(&repository_root(), &release_binary()?, &operator_rootfs)?;
    let entrypoint = stage.config.entrypoint.first().context("the Dockerfile has no ENTRYPOINT")?;
    ensure!(
        testsupport_is_executable(&operator_rootfs.join(entrypoint.trim_start_matches('/'))),
        "the Dockerfile's ENTRYPOINT {entrypoint} is not an executable file in hack/image-rootfs.sh's rootfs"
    );
    let operator_reference = format!("{OPERATOR_REPOSITORY}:{OPERATOR_TAG}");
    let operator = image::write_docker_archive(&operator_rootfs, &stage.config, &operator_reference, &dir.join("operator.tar"))?;

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
    Ok(vec![operator, pause, consumer])
}

fn testsupport_is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
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
