//! The external programs the tests run (found through `TLO_*` environment variables that
//! `hack/tools.sh` prints), and the process plumbing shared by every fixture that runs one:
//! spawning children that cannot outlive the test process, log files, free ports.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use tempfile::TempDir;

/// Paths of the external components. Every one is required: a test that cannot find one fails.
#[derive(Debug, Clone)]
pub struct Tools {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub etcd: PathBuf,
    pub helm: PathBuf,
    /// The unpacked keycloak-quarkus-dist folder (contains `bin/kc.sh`).
    pub keycloak_home: PathBuf,
    /// A `java` binary of version 21 or newer, which Keycloak 26 needs.
    pub keycloak_java: PathBuf,
}

const HOW_TO_GET_TOOLS: &str =
    "build or fetch the tools and export their paths: run `make test`, or `eval \"$(hack/tools.sh)\"` before `cargo test`";

impl Tools {
    /// Reads the `TLO_*` variables and checks that every file they name exists.
    /// The error lists every missing or broken variable at once.
    pub fn from_env() -> anyhow::Result<Tools> {
        Self::from_lookup(|var| std::env::var_os(var))
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> anyhow::Result<Tools> {
        let mut problems = Vec::new();
        let mut path_of = |var: &str, check: &dyn Fn(&Path) -> Option<String>| -> PathBuf {
            match lookup(var).filter(|value| !value.is_empty()) {
                Some(value) => {
                    let path = PathBuf::from(value);
                    if let Some(problem) = check(&path) {
                        problems.push(format!("{var}={} {problem}", path.display()));
                    }
                    path
                }
                None => {
                    problems.push(format!("{var} is not set"));
                    PathBuf::new()
                }
            }
        };
        let executable = |path: &Path| (!is_executable_file(path)).then(|| "is not an executable file".to_string());
        let keycloak_dist = |path: &Path| {
            (!is_executable_file(&path.join("bin/kc.sh")))
                .then(|| "has no executable bin/kc.sh (expected an unpacked keycloak-quarkus-dist)".to_string())
        };
        let tools = Tools {
            kube_apiserver: path_of("TLO_KUBE_APISERVER", &executable),
            kube_controller_manager: path_of("TLO_KUBE_CONTROLLER_MANAGER", &executable),
            etcd: path_of("TLO_ETCD", &executable),
            helm: path_of("TLO_HELM", &executable),
            keycloak_home: path_of("TLO_KEYCLOAK_HOME", &keycloak_dist),
            keycloak_java: path_of("TLO_KEYCLOAK_JAVA", &executable),
        };
        if !problems.is_empty() {
            bail!(
                "the end-to-end tests cannot find their tools:\n  {}\nTo fix: {HOW_TO_GET_TOOLS}.",
                problems.join("\n  ")
            );
        }
        Ok(tools)
    }
}

pub(crate) fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Spawns `command` so that it cannot outlive the test process.
///
/// The child gets `PR_SET_PDEATHSIG(SIGKILL)`, so the kernel kills it when its parent dies,
/// even on a crash or SIGKILL that skips every `Drop`. The kernel's "parent" is the *thread*
/// that forked, not the process: a child spawned from a tokio worker or a test thread would be
/// killed as soon as that thread exits, which is how a shared fixture started in one test would
/// silently vanish in the next. So every spawn is handed to one dedicated thread that lives
/// as long as the process; callers may spawn from any thread or runtime.
///
/// With `own_process_group`, the child leads a new process group, for programs (like kc.sh)
/// that run the real server as a grandchild: [`kill_process_group`] then reaches both.
pub fn spawn_supervised(mut command: Command, own_process_group: bool) -> io::Result<Child> {
    let test_process = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect; then no signal would come.
            if libc::getppid() as u32 != test_process {
                return Err(io::Error::other("the test process exited while spawning"));
            }
            Ok(())
        });
    }
    if own_process_group {
        command.process_group(0);
    }
    let (reply_to, reply) = mpsc::sync_channel(1);
    spawner()
        .send((command, reply_to))
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
    reply
        .recv()
        .map_err(|_| io::Error::other("the process spawner thread did not answer"))?
}

type SpawnRequest = (Command, mpsc::SyncSender<io::Result<Child>>);

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testsupport-spawner".into())
            .spawn(move || {
                // Never returns while the process lives: `SPAWNER` keeps a sender forever.
                for (mut command, reply_to) in incoming {
                    let _ = reply_to.send(command.spawn());
                }
            })
            .expect("cannot start the process spawner thread");
        requests
    })
}

/// Sends SIGKILL to every process in the group `leader` leads (see [`spawn_supervised`]).
pub(crate) fn kill_process_group(leader: &Child) {
    // SAFETY: plain syscall; a group that is already gone just yields ESRCH.
    unsafe {
        libc::killpg(leader.id() as libc::pid_t, libc::SIGKILL);
    }
}

/// Sends `signal` to the child unless it has already been reaped (its pid could be reused).
pub(crate) fn send_signal(child: &mut Child, signal: libc::c_int) {
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: plain syscall on a pid we own and have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
    }
}

/// SIGKILLs the child (if still running) and reaps it.
pub(crate) fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERMs the child and waits up to `grace` for it to exit; SIGKILLs it after that.
/// Returns the exit status, and whether it exited within `grace`.
pub(crate) async fn terminate_child(child: &mut Child, grace: Duration) -> io::Result<(std::process::ExitStatus, bool)> {
    send_signal(child, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, true));
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            return Ok((child.wait()?, false));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `probe` until it says ready. Fails early if `child` exits (a crashed server never
/// becomes ready, no need to wait for the deadline), and fails once `deadline` has passed.
/// The errors name `what` but carry no logs: the caller knows where they are.
pub(crate) async fn wait_until_ready(
    child: &mut Child,
    what: &str,
    deadline: Duration,
    mut probe: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status} before it became ready");
        }
        if probe().await {
            return Ok(());
        }
        if started.elapsed() >= deadline {
            bail!("{what} was not ready within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Start of the names of fixture folders in the temporary directory.
pub(crate) const WORKDIR_PREFIX: &str = "tasklist-e2e-";
/// File in a fixture folder holding the pid of the test process that owns it.
const WORKDIR_OWNER_FILE: &str = "owner.pid";

/// Creates a temporary folder for one fixture, `tasklist-e2e-{what}-XXXXXX`, removed when the
/// returned value is dropped. A test process killed by a signal never drops it, and etcd's
/// data alone is tens of megabytes, so each folder records its owner's pid and every new one
/// first removes the folders whose owner is gone.
pub fn fixture_workdir(what: &str) -> anyhow::Result<TempDir> {
    remove_abandoned_workdirs();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{WORKDIR_PREFIX}{what}-"))
        .tempdir()
        .with_context(|| format!("cannot create a temporary folder for {what}"))?;
    std::fs::write(dir.path().join(WORKDIR_OWNER_FILE), std::process::id().to_string())?;
    Ok(dir)
}

fn remove_abandoned_workdirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(WORKDIR_PREFIX) {
            continue;
        }
        // No owner file: not one of ours, or being created right now. Leave it.
        let Ok(owner) = std::fs::read_to_string(entry.path().join(WORKDIR_OWNER_FILE)) else {
            continue;
        };
        if owner.trim().parse::<libc::pid_t>().is_ok_and(|pid| !process_exists(pid)) {
            // Another process may be removing it at the same time; either way it goes.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether the test process that created the fixture folder `dir` is still running (false
/// also when the folder or its owner file is gone).
pub(crate) fn workdir_owner_alive(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(WORKDIR_OWNER_FILE))
        .ok()
        .and_then(|owner| owner.trim().parse::<libc::pid_t>().ok())
        .is_some_and(process_exists)
}

fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks whether the process exists; nothing is sent.
    let result = unsafe { libc::kill(pid, 0) };
    // EPERM means it exists but belongs to someone else.
    result == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Opens `path` for appending (so a restarted process adds to its earlier log) and returns
/// it twice, for the child's stdout and stderr.
pub(crate) fn log_file_stdio(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log file {}", path.display()))?;
    let stderr = file.try_clone()?;
    Ok((Stdio::from(file), Stdio::from(stderr)))
}

/// The last `lines` lines of a log file, or a note saying why it cannot be read.
pub(crate) fn tail_of_file(path: &Path, lines: usize) -> String {
    // Only the end of the file matters, and a chatty server's log can be large.
    const MAX_TAIL_BYTES: u64 = 1 << 20;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(MAX_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("<cannot read {}: {error}>", path.display()),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process could take it before
/// the caller binds it, but on a test machine that race is rare enough to accept.
pub fn free_loopback_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_are_all_named_with_the_way_to_get_them() {
        let error = Tools::from_lookup(|_| None).unwrap_err().to_string();
        for var in [
            "TLO_KUBE_APISERVER",
            "TLO_KUBE_CONTROLLER_MANAGER",
            "TLO_ETCD",
            "TLO_HELM",
            "TLO_KEYCLOAK_HOME",
            "TLO_KEYCLOAK_JAVA",
        ] {
            assert!(error.contains(&format!("{var} is not set")), "{var} missing from: {error}");
        }
        assert!(error.contains("make test") && error.contains("hack/tools.sh"), "{error}");
    }

    #[test]
    fn a_path_that_is_not_a_program_is_named() {
        let error = Tools::from_lookup(|var| Some(if var == "TLO_ETCD" { "/nonexistent/etcd" } else { "/bin/sh" }.into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("TLO_ETCD=/nonexistent/etcd is not an executable file"), "{error}");
        assert!(error.contains("TLO_KEYCLOAK_HOME=/bin/sh has no executable bin/kc.sh"), "{error}");
        assert!(!error.contains("TLO_HELM"), "{error}");
    }
}
