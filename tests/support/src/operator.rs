//! The operator binary run as a child process, the way it runs in a cluster: configured by
//! a kubeconfig, flags and environment, logging to stdout/stderr, stopped by SIGTERM.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::tools;

/// Used when the caller's environment list does not set `RUST_LOG`.
const DEFAULT_RUST_LOG: &str = "info,tasklist_operator=debug";

/// What a local test needs: its stand-ins, Keycloak and API server listen on loopback, over
/// http or with self-signed certificates, all of which the operator refuses by default; and
/// many scenarios force refreshes with the annotation, which the operator allows once a
/// minute by default. [`OperatorProcess::start`] puts these right after `run`, so that a
/// test of a default gives the flag again (`--allow-loopback=false`): the last value wins.
pub const LOCAL_TEST_FLAGS: [&str; 4] = [
    "--allow-loopback=true",
    "--allow-http=true",
    "--allow-insecure-tls=true",
    "--forced-refresh-interval=0s",
];

/// The flags of [`LOCAL_TEST_FLAGS`] that `check` takes too.
pub const LOCAL_TEST_POLICY: [&str; 3] = ["--allow-loopback=true", "--allow-http=true", "--allow-insecure-tls=true"];

/// A running (or exited) operator process, whose output is collected in a log file.
pub struct OperatorProcess {
    child: Child,
    log: PathBuf,
    /// Holds the log file; removed on drop.
    _workdir: TempDir,
}

impl OperatorProcess {
    /// Runs `binary` with `args` (after `run`, the [`LOCAL_TEST_FLAGS`]),
    /// `KUBECONFIG=kubeconfig`, `RUST_LOG` (default `info,tasklist_operator=debug`) and the
    /// extra `env`, which wins over both. The rest of the environment is inherited.
    pub fn start(binary: &Path, kubeconfig: &Path, args: &[String], env: &[(String, String)]) -> anyhow::Result<OperatorProcess> {
        let workdir = tools::fixture_workdir("operator")?;
        let log = workdir.path().join("operator.log");
        let mut command = Command::new(binary);
        match args.split_first() {
            Some((run, rest)) if run == "run" => command.arg(run).args(LOCAL_TEST_FLAGS).args(rest),
            _ => command.args(args),
        };
        command.env("KUBECONFIG", kubeconfig).stdin(Stdio::null());
        if !env.iter().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", DEFAULT_RUST_LOG);
        }
        command.envs(env.iter().map(|(name, value)| (OsStr::new(name), OsStr::new(value))));
        let (stdout, stderr) = tools::log_file_stdio(&log)?;
        command.stdout(stdout).stderr(stderr);
        let child = tools::spawn_supervised(command, false).with_context(|| format!("cannot run the operator {}", binary.display()))?;
        Ok(OperatorProcess {
            child,
            log,
            _workdir: workdir,
        })
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(error) => format!("<cannot read {}: {error}>", self.log.display()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as when a node dies or the OOM killer strikes, and reap the process.
    pub fn kill(&mut self) {
        tools::kill_and_reap(&mut self.child);
    }

    /// SIGTERM, as Kubernetes sends before deleting a pod, and wait up to `within` for the
    /// process to exit. If it is still running by then, it is killed and this is an error:
    /// an operator that ignores SIGTERM would be killed the same way in a cluster.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let (status, graceful) = tools::terminate_child(&mut self.child, within)
            .await
            .context("cannot stop the operator")?;
        if !graceful {
            bail!("the operator was still running {within:?} after SIGTERM and had to be killed");
        }
        Ok(status)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        tools::kill_and_reap(&mut self.child);
    }
}
