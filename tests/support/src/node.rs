//! A real Kubernetes node for the node tests: containerd (with runc and the bridge CNI
//! plugin), kubelet, kube-proxy and kube-scheduler, joined to a [`ControlPlane`] started with
//! [`node_control_plane_options`].
//!
//! # Network
//! Everything runs inside a network namespace of its own, which the test process enters
//! before it starts anything ([`enter_private_namespaces`]): it has only a loopback
//! interface and the node's bridge, and no route anywhere else, so no Pod or Service traffic
//! can leave the machine. The addresses come from 198.18.0.0/15, the range reserved for
//! benchmarking networks (RFC 2544), which is never routed on the Internet:
//!
//! | what | address |
//! | --- | --- |
//! | bridge `tlo0`, node IP, API server (advertised), stand-in Tasklist | 198.18.0.1 |
//! | Pods | 198.18.0.0/24, from 198.18.0.10 |
//! | Services | 198.18.1.0/24; `kubernetes` is 198.18.1.1 |
//!
//! The test process also gets a mount namespace of its own, so the kubelet's and
//! containerd's mounts disappear with it, and a tmpfs over the folders they write to
//! whatever their configuration says (/var/log/containers, /run/containerd, /var/lib/cni).
//!
//! # Clean-up
//! Dropping the [`Node`] stops the kubelet, kills every container and shim of its containerd,
//! and unmounts what they mounted. A test process killed before that leaves shims and
//! containers behind: the next [`Node::start`] kills those of runs whose process is gone.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::Api;
use tempfile::TempDir;

use crate::controlplane::{ControlPlane, ControlPlaneOptions};
use crate::image::ImageArchive;
use crate::tools;

/// The node's name (the kubelet's `--hostname-override`).
pub const NODE_NAME: &str = "tlo-node";
/// The node's bridge, which the CNI bridge plugin attaches Pods to.
pub const BRIDGE: &str = "tlo0";
/// The bridge's address: the node IP, where Pods reach the API server and the stand-ins.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Pod addresses.
pub const POD_CIDR: &str = "198.18.0.0/24";
/// Service addresses; the `kubernetes` Service gets the first, 198.18.1.1.
pub const SERVICE_CIDR: &str = "198.18.1.0/24";
/// The image containerd 1.6 runs as every Pod's sandbox; it never pulls it, the tests import it.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.6";
/// How long the node may take to become Ready (measured: under 15 s).
const NODE_READY_DEADLINE: Duration = Duration::from_secs(90);

const CONTAINERD_LOG: &str = "containerd.log";
const KUBELET_LOG: &str = "kubelet.log";
const KUBE_PROXY_LOG: &str = "kube-proxy.log";
const SCHEDULER_LOG: &str = "kube-scheduler.log";
/// Start of the node fixture's folder name (see `tools::fixture_workdir`).
const WORKDIR_KIND: &str = "node";

/// Paths of the node's programs, from the `TLO_*` variables `hack/tools.sh` prints.
#[derive(Debug, Clone)]
pub struct NodeTools {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub kube_scheduler: PathBuf,
    /// kubectl of the same version, to run the commands the chart tells users to run.
    pub kubectl: PathBuf,
    pub containerd: PathBuf,
    pub runc: PathBuf,
    pub ctr: PathBuf,
    pub cni_bin_dir: PathBuf,
}

impl NodeTools {
    /// Reads the variables; the error names every missing one at once.
    pub fn from_env() -> anyhow::Result<NodeTools> {
        let mut problems = Vec::new();
        let mut path_of = |var: &str, wanted: &str| -> PathBuf {
            let path = PathBuf::from(std::env::var_os(var).unwrap_or_default());
            let present = match wanted {
                "dir" => path.join("bridge").is_file() && path.join("host-local").is_file() && path.join("loopback").is_file(),
                _ => tools::is_executable_file(&path),
            };
            if !present {
                problems.push(format!("{var}={} is not {wanted}", path.display()));
            }
            path
        };
        let found = NodeTools {
            kubelet: path_of("TLO_KUBELET", "an executable file"),
            kube_proxy: path_of("TLO_KUBE_PROXY", "an executable file"),
            kube_scheduler: path_of("TLO_KUBE_SCHEDULER", "an executable file"),
            kubectl: path_of("TLO_KUBECTL", "an executable file"),
            containerd: path_of("TLO_CONTAINERD", "an executable file"),
            runc: path_of("TLO_RUNC", "an executable file"),
            ctr: path_of("TLO_CTR", "an executable file"),
            cni_bin_dir: path_of("TLO_CNI_BIN_DIR", "dir"),
        };
        if !problems.is_empty() {
            bail!(
                "the node tests cannot find the node's components (\"dir\": a folder with the bridge, host-local and loopback CNI plugins):\n  {}\n\
                 To fix: run `make test`, or `eval \"$(hack/tools.sh)\"` (as root: it installs containerd, runc and containernetworking-plugins with apt-get).",
                problems.join("\n  ")
            );
        }
        Ok(found)
    }
}

/// The control plane a node can join: the API server advertised at the node IP, the
/// `kubernetes` Service in [`SERVICE_CIDR`], and the controllers a Deployment needs.
pub fn node_control_plane_options() -> ControlPlaneOptions {
    ControlPlaneOptions {
        advertise_address: Some(NODE_IP),
        service_cidr: SERVICE_CIDR.to_owned(),
        controllers: vec![
            "garbagecollector",
            "namespace",
            "serviceaccount-token",
            "serviceaccount",
            // Every Pod's projected service-account volume needs the kube-root-ca.crt ConfigMap.
            "root-ca-cert-publisher",
            "deployment",
            "replicaset",
            "endpointslice",
            // Removes Pods of a deleted node, and orphans; cheap.
            "podgc",
            // Takes the not-ready taint the kubelet registers the node with off once it is Ready.
            "nodelifecycle",
        ],
    }
}

/// Moves the calling process into a new network and mount namespace, with only a loopback
/// interface (up) and the node's bridge. Must be called first thing in `main`, before any
/// thread exists: namespaces are per thread, and threads inherit their creator's.
pub fn enter_private_namespaces() -> anyhow::Result<()> {
    // SAFETY: plain syscalls; the process is still single-threaded.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot create a network and mount namespace (the node tests must run as root)");
        }
        // Mounts made from here on (the kubelet's, containerd's) stay in this namespace.
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("cannot make the mounts private");
        }
    }
    // Folders the kubelet, containerd and the CNI plugins use whatever they are configured
    // with: an empty tmpfs over each, in this mount namespace only, so that nothing of the
    // node is left on the machine's disk and nothing there is seen by the node.
    for folder in SCRATCH_FOLDERS {
        std::fs::create_dir_all(folder).with_context(|| format!("cannot create {folder}"))?;
        run_ok(Command::new("mount").args(["-t", "tmpfs", "tmpfs", folder]))?;
    }
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    run_ok(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
    run_ok(Command::new("ip").args(["address", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE]))?;
    run_ok(Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;
    // Pods' packets to Service addresses are routed through the node, like on any node.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("cannot enable IP forwarding in the node's namespace")?;
    Ok(())
}

/// Covered by a tmpfs of the test process's own: the kubelet's container log links,
/// containerd's shim sockets, the CNI plugins' cache.
const SCRATCH_FOLDERS: [&str; 3] = ["/var/log/containers", "/run/containerd", "/var/lib/cni"];

/// A registry the node's containerd pulls from over HTTPS, trusting `ca_file` for it (written
/// to containerd's `hosts.toml`, as on any node that pulls from a private registry).
#[derive(Debug, Clone)]
pub struct RegistryTrust {
    /// `host:port`, as image references name it.
    pub host: String,
    pub ca_file: PathBuf,
}

/// A running node. See the module docs.
pub struct Node {
    containerd: Child,
    kubelet: Child,
    kube_proxy: Child,
    scheduler: Child,
    socket: PathBuf,
    ctr: PathBuf,
    workdir: TempDir,
}

impl Node {
    /// Starts containerd (trusting `registries`), imports `images` (the pause image among
    /// them), then starts the kubelet, kube-proxy and kube-scheduler, and waits until the node
    /// is Ready.
    pub async fn start(
        tools: &NodeTools,
        control_plane: &ControlPlane,
        images: &[ImageArchive],
        registries: &[RegistryTrust],
    ) -> anyhow::Result<Node> {
        let started = Instant::now();
        kill_abandoned_shims();
        let workdir = tools::fixture_workdir(WORKDIR_KIND)?;
        let dir = workdir.path().to_owned();
        let socket = dir.join("containerd.sock");
        let write = |name: &str, contents: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(path)
        };

        std::fs::create_dir_all(dir.join("cni"))?;
        write("cni/10-tlo.conflist", &cni_config(&dir))?;
        for registry in registries {
            std::fs::create_dir_all(dir.join("certs.d").join(&registry.host))?;
            write(&format!("certs.d/{}/hosts.toml", registry.host), &registry_hosts_toml(registry))?;
        }
        let containerd_config = write("containerd.toml", &containerd_config(tools, &dir, &socket))?;
        let mut containerd = Command::new(&tools.containerd);
        containerd.arg("--config").arg(&containerd_config);
        let containerd = spawn_logged(containerd, &dir.join(CONTAINERD_LOG))?;

        // Each later step that fails drops `node`, which stops what did start.
        let kubeconfig = control_plane.kubeconfig();
        let mut node = Node {
            containerd,
            kubelet: placeholder_child()?,
            kube_proxy: placeholder_child()?,
            scheduler: placeholder_child()?,
            socket: socket.clone(),
            ctr: tools.ctr.clone(),
            workdir,
        };
        node.wait_for_containerd().await.map_err(|error| node.failure_with_logs(error))?;
        for image in images {
            node.import(image).map_err(|error| node.failure_with_logs(error))?;
        }

        let resolv_conf = write("resolv.conf", "")?;
        let kubelet_config = write("kubelet.yaml", &kubelet_config(&dir, &socket, &resolv_conf))?;
        let mut kubelet = Command::new(&tools.kubelet);
        kubelet
            .arg(flag("--config", &kubelet_config))
            .arg(flag("--kubeconfig", kubeconfig))
            .arg(flag("--root-dir", &dir.join("kubelet")))
            .arg(flag("--cert-dir", &dir.join("kubelet-pki")))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg("--v=1");
        node.kubelet = spawn_logged(kubelet, &dir.join(KUBELET_LOG))?;

        let proxy_config = write("kube-proxy.yaml", &kube_proxy_config(kubeconfig))?;
        let mut kube_proxy = Command::new(&tools.kube_proxy);
        kube_proxy.arg(flag("--config", &proxy_config));
        node.kube_proxy = spawn_logged(kube_proxy, &dir.join(KUBE_PROXY_LOG))?;

        let mut scheduler = Command::new(&tools.kube_scheduler);
        scheduler
            .arg(flag("--kubeconfig", kubeconfig))
            .arg(flag("--authentication-kubeconfig", kubeconfig))
            .arg(flag("--authorization-kubeconfig", kubeconfig))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1");
        node.scheduler = spawn_logged(scheduler, &dir.join(SCHEDULER_LOG))?;

        node.wait_until_ready(control_plane)
            .await
            .map_err(|error| node.failure_with_logs(error))?;
        eprintln!("testsupport: node {NODE_NAME} Ready in {:.1}s", started.elapsed().as_secs_f64());
        Ok(node)
    }

    /// Imports an image tarball into containerd's `k8s.io` namespace, where the kubelet finds it.
    pub fn import(&self, image: &ImageArchive) -> anyhow::Result<()> {
        run_ok(
            Command::new(&self.ctr)
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "k8s.io", "images", "import"])
                .arg(&image.path),
        )
        .with_context(|| format!("cannot import {} into containerd", image.reference))?;
        Ok(())
    }

    /// The last `lines` lines of each component's log, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        [CONTAINERD_LOG, KUBELET_LOG, KUBE_PROXY_LOG, SCHEDULER_LOG]
            .iter()
            .map(|name| format!("==> {name} <==\n{}", tools::tail_of_file(&self.workdir.path().join(name), lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The pid of the main process of a running container, from containerd (the test
    /// process shares the node's pid namespace view, so it can signal it).
    pub fn container_pid(&self, container_id: &str) -> anyhow::Result<u32> {
        let output = run_ok(
            Command::new(&self.ctr)
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "k8s.io", "tasks", "list"]),
        )?;
        // TASK  PID  STATUS
        output
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                Some((fields.next()?, fields.next()?, fields.next()?))
            })
            .find(|(task, _, status)| *task == container_id && *status == "RUNNING")
            .and_then(|(_, pid, _)| pid.parse().ok())
            .with_context(|| format!("containerd has no running task {container_id}:\n{output}"))
    }

    /// Fails, naming it, if a component of the node has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for (child, what) in [
            (&mut self.containerd, "containerd"),
            (&mut self.kubelet, "the kubelet"),
            (&mut self.kube_proxy, "kube-proxy"),
            (&mut self.scheduler, "kube-scheduler"),
        ] {
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited with {status}");
            }
        }
        Ok(())
    }

    /// SIGKILLs the main process of a running container from outside, as an OOM kill would.
    pub fn kill_container_process(&self, container_id: &str) -> anyhow::Result<()> {
        let pid = self.container_pid(container_id)?;
        // SAFETY: plain syscall on the container's main process, found through containerd.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot kill process {pid} of container {container_id}"));
        }
        Ok(())
    }

    fn failure_with_logs(&self, error: anyhow::Error) -> anyhow::Error {
        anyhow!("{error:#}\n{}", self.logs_tail(30))
    }

    async fn wait_for_containerd(&mut self) -> anyhow::Result<()> {
        let ctr = self.ctr.clone();
        let socket = self.socket.clone();
        let answers = async || {
            Command::new(&ctr)
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .output()
                .is_ok_and(|output| output.status.success())
        };
        tools::wait_until_ready(&mut self.containerd, "containerd", Duration::from_secs(30), answers).await
    }

    async fn wait_until_ready(&mut self, control_plane: &ControlPlane) -> anyhow::Result<()> {
        let nodes = Api::<NodeObject>::all(control_plane.client());
        let ready = async || {
            let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await else {
                return false;
            };
            node.status
                .and_then(|status| status.conditions)
                .unwrap_or_default()
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        };
        tools::wait_until_ready(&mut self.kubelet, "the kubelet's node", NODE_READY_DEADLINE, ready).await?;
        for (child, what) in [(&mut self.kube_proxy, "kube-proxy"), (&mut self.scheduler, "kube-scheduler")] {
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited with {status}");
            }
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The kubelet first, so that it does not restart what is killed next.
        for child in [&mut self.scheduler, &mut self.kubelet, &mut self.kube_proxy] {
            tools::kill_and_reap(child);
        }
        kill_shims_under(self.workdir.path());
        tools::kill_and_reap(&mut self.containerd);
        unmount_under(self.workdir.path());
        // `workdir` is removed after this, when the fields are dropped.
    }
}

fn cni_config(dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "tlo",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            // Nothing leaves the namespace, so nothing needs translating.
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": POD_CIDR, "rangeStart": "198.18.0.10", "gateway": NODE_IP.to_string() }]],
                // Pods send everything to the node (Service addresses included); the node's
                // namespace itself has no route beyond the bridge.
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": dir.join("cni-ipam"),
            },
        }],
    })
    .to_string()
}

fn containerd_config(tools: &NodeTools, dir: &Path, socket: &Path) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The machine's process may not lower oom_score_adj (no CAP_SYS_RESOURCE); without this
  # runc fails every sandbox with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  # One folder per registry host, with its hosts.toml (the CA it is trusted with).
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs_d}"
"#,
        root = path("containerd-root"),
        state = path("containerd-state"),
        socket = socket.display(),
        opt = path("containerd-opt"),
        runc = tools.runc.display(),
        cni_bin = tools.cni_bin_dir.display(),
        cni_conf = path("cni"),
        certs_d = path("certs.d"),
    )
}

/// containerd's `certs.d/<host>/hosts.toml`: pull and resolve from the host over HTTPS,
/// trusting the registry's CA.
fn registry_hosts_toml(registry: &RegistryTrust) -> String {
    format!(
        r#"server = "https://{host}"

[host."https://{host}"]
  capabilities = ["pull", "resolve"]
  ca = "{ca}"
"#,
        host = registry.host,
        ca = registry.ca_file.display(),
    )
}

fn kubelet_config(dir: &Path, socket: &Path, resolv_conf: &Path) -> String {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": format!("unix://{}", socket.display()),
        // The settings this machine needs (see the README, "Tested on a real node").
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": false,
        "enforceNodeAllocatable": [],
        "failSwapOn": false,
        // syncFrequency stays at its default (1m): Secret volume updates depend on it.
        "address": NODE_IP.to_string(),
        "readOnlyPort": 0,
        "healthzPort": 0,
        // The API server is the only client (logs, exec), inside the node's namespace.
        "authentication": { "anonymous": { "enabled": true }, "webhook": { "enabled": false } },
        "authorization": { "mode": "AlwaysAllow" },
        // No DNS server: Pods get an empty resolv.conf instead of the machine's.
        "resolvConf": resolv_conf,
        "podLogsDir": dir.join("pod-logs"),
        // The pause and consumer images were imported and cannot be pulled again: never
        // collect images, and never evict Pods because the shared machine's disk filled up a little.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": { "memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%" },
        "serializeImagePulls": false,
        "localStorageCapacityIsolation": false,
        // With cgroupsPerQOS off, the in-place resize path dereferences the missing pod
        // cgroup and the kubelet panics (v1.34.4, seen when Pods start at the same time).
        "featureGates": { "InPlacePodVerticalScaling": false },
    })
    .to_string()
}

fn kube_proxy_config(kubeconfig: &Path) -> String {
    serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": { "kubeconfig": kubeconfig },
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        // Zero: leave the conntrack sysctls alone (they are not all per network namespace).
        "conntrack": { "maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s" },
        // Inside the node's own network namespace: the usual port cannot clash.
        "metricsBindAddress": "127.0.0.1:10249",
        "healthzBindAddress": "",
    })
    .to_string()
}

fn flag(name: &str, path: &Path) -> std::ffi::OsString {
    let mut argument = std::ffi::OsString::from(format!("{name}="));
    argument.push(path);
    argument
}

fn spawn_logged(mut command: Command, log: &Path) -> anyhow::Result<Child> {
    let (stdout, stderr) = tools::log_file_stdio(log)?;
    command.stdout(stdout).stderr(stderr);
    let program = command.get_program().to_owned();
    tools::spawn_supervised(command, false).with_context(|| format!("cannot run {}", program.display()))
}

/// A child that has already exited, to fill a [`Node`] field until the real one starts.
fn placeholder_child() -> anyhow::Result<Child> {
    let mut child = Command::new("true").spawn().context("cannot run true")?;
    child.wait()?;
    Ok(child)
}

/// Runs a command and returns its stdout; fails with its stderr.
fn run_ok(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {}", command.get_program().display()))?;
    ensure!(
        output.status.success(),
        "{:?} failed ({}): {}",
        command,
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The processes of this machine: pid to (parent pid, command line).
fn processes() -> HashMap<u32, (u32, Vec<String>)> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(parent) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse().ok())
        else {
            continue;
        };
        let command_line = std::fs::read(entry.path().join("cmdline"))
            .unwrap_or_default()
            .split(|byte| *byte == 0)
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        found.insert(pid, (parent, command_line));
    }
    found
}

/// The containerd address a shim serves (`containerd-shim-runc-v2 ... -address PATH`).
fn shim_address(command_line: &[String]) -> Option<&str> {
    let program = command_line.first()?;
    if !program.contains("containerd-shim") {
        return None;
    }
    let position = command_line.iter().position(|argument| argument == "-address")?;
    command_line.get(position + 1).map(String::as_str)
}

/// Kills the shims whose containerd socket lies under `dir`, and everything below them
/// (the containers), children first.
fn kill_shims_under(dir: &Path) {
    kill_shims_where(|address| Path::new(address).starts_with(dir));
}

/// Kills the shims (and their containers) of node fixtures whose test process is gone.
fn kill_abandoned_shims() {
    let prefix = std::env::temp_dir().join(format!("{}{WORKDIR_KIND}-", tools::WORKDIR_PREFIX));
    let prefix = prefix.display().to_string();
    kill_shims_where(|address| {
        address.starts_with(&prefix) && !tools::workdir_owner_alive(Path::new(address).parent().unwrap_or(Path::new("/")))
    });
}

fn kill_shims_where(matches: impl Fn(&str) -> bool) {
    let all = processes();
    let shims: Vec<u32> = all
        .iter()
        .filter(|(_, (_, command_line))| shim_address(command_line).is_some_and(&matches))
        .map(|(pid, _)| *pid)
        .collect();
    let mut doomed = Vec::new();
    let mut frontier = shims.clone();
    while let Some(pid) = frontier.pop() {
        doomed.push(pid);
        frontier.extend(all.iter().filter(|(_, (parent, _))| *parent == pid).map(|(child, _)| *child));
    }
    // Containers before their shims, so that no shim reports a death to a containerd that
    // would restart nothing anyway, and no container is left without its shim.
    for pid in doomed.iter().rev() {
        // SAFETY: plain syscall; a process that is already gone yields ESRCH.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in points {
        if let Ok(path) = std::ffi::CString::new(point) {
            // SAFETY: plain syscall with a valid C string.
            unsafe {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shim_is_known_by_its_address() {
        let line = |parts: &[&str]| parts.iter().map(|part| part.to_string()).collect::<Vec<_>>();
        let shim = line(&[
            "/usr/bin/containerd-shim-runc-v2",
            "-namespace",
            "k8s.io",
            "-id",
            "abc",
            "-address",
            "/tmp/x/containerd.sock",
        ]);
        assert_eq!(shim_address(&shim), Some("/tmp/x/containerd.sock"));
        assert_eq!(shim_address(&line(&["/usr/bin/containerd", "--address", "/tmp/x"])), None);
        assert_eq!(shim_address(&line(&["/usr/bin/containerd-shim-runc-v2", "-id", "abc"])), None);
    }

    #[test]
    fn a_trusted_registry_is_pulled_from_over_https_with_its_ca() {
        let toml = registry_hosts_toml(&RegistryTrust {
            host: "198.18.0.1:5000".into(),
            ca_file: PathBuf::from("/run/x/ca.crt"),
        });
        assert!(toml.starts_with("server = \"https://198.18.0.1:5000\"\n"), "{toml}");
        assert!(toml.contains("[host.\"https://198.18.0.1:5000\"]\n"), "{toml}");
        assert!(toml.contains("  ca = \"/run/x/ca.crt\"\n"), "{toml}");
        assert!(toml.contains(r#"capabilities = ["pull", "resolve"]"#), "{toml}");
    }

    #[test]
    fn the_addresses_stay_in_the_benchmarking_range() {
        // 198.18.0.0/15 (RFC 2544) is never routed on the Internet.
        let in_range = |address: Ipv4Addr| u32::from(address) >> 17 == u32::from(Ipv4Addr::new(198, 18, 0, 0)) >> 17;
        assert!(in_range(NODE_IP));
        for cidr in [POD_CIDR, SERVICE_CIDR] {
            let network: Ipv4Addr = cidr.split('/').next().unwrap().parse().unwrap();
            assert!(in_range(network), "{cidr}");
        }
    }
}
