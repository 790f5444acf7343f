//! `OperatorProcess` with a shell script standing in for the operator binary.

use std::path::Path;
use std::time::Duration;

use testsupport::operator::OperatorProcess;

fn start_script(script: &str, env: &[(String, String)]) -> anyhow::Result<OperatorProcess> {
    OperatorProcess::start(
        Path::new("/bin/sh"),
        Path::new("/tmp/some.kubeconfig"),
        &["-c".into(), script.into()],
        env,
    )
}

async fn wait_for_log(process: &OperatorProcess, text: &str) {
    for _ in 0..100 {
        if process.logs().contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{text:?} never appeared in the log: {}", process.logs());
}

#[tokio::test]
async fn passes_environment_collects_output_and_stops_on_sigterm() -> anyhow::Result<()> {
    let script = r#"echo "kubeconfig=$KUBECONFIG log=$RUST_LOG"; echo oops >&2
        trap 'echo stopping; exit 0' TERM; echo ready; while :; do sleep 0.05; done"#;
    let mut process = start_script(script, &[])?;
    wait_for_log(&process, "ready").await;
    assert!(process.is_running());
    assert!(process.pid() > 0);
    let logs = process.logs();
    assert!(
        logs.contains("kubeconfig=/tmp/some.kubeconfig log=info,tasklist_operator=debug"),
        "{logs}"
    );
    assert!(logs.contains("oops"), "stderr missing: {logs}");

    let status = process.terminate(Duration::from_secs(10)).await?;
    assert!(status.success(), "{status}");
    assert!(!process.is_running());
    assert!(process.logs().contains("stopping"));
    Ok(())
}

#[tokio::test]
async fn a_process_ignoring_sigterm_is_killed_and_reported() -> anyhow::Result<()> {
    let env = [("RUST_LOG".to_string(), "warn".to_string())];
    let mut process = start_script(r#"trap '' TERM; echo "log=$RUST_LOG"; while :; do sleep 0.05; done"#, &env)?;
    wait_for_log(&process, "log=warn").await;
    let error = process.terminate(Duration::from_millis(500)).await.unwrap_err();
    assert!(error.to_string().contains("SIGTERM"), "{error}");
    assert!(!process.is_running());
    Ok(())
}

#[tokio::test]
async fn kill_stops_at_once() -> anyhow::Result<()> {
    let mut process = start_script("trap '' TERM; echo up; while :; do sleep 0.05; done", &[])?;
    wait_for_log(&process, "up").await;
    process.kill();
    assert!(!process.is_running());
    Ok(())
}
