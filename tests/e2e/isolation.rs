//! Nothing left behind, and nobody held up: a connection deleted while the operator's
//! watch was down leaves no metric series after the relist; a host that accepts
//! connections and never answers does not delay a connection elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use kube::api::DeleteParams;
use serde_json::json;
use testsupport::controlplane::ControlPlane;
use testsupport::operator::OperatorProcess;
use tokio::io::AsyncReadExt as _;

use crate::ScenarioFn;
use crate::scenario::{Scenario, Scrape, World, condition, install_crd, operator_binary, scrape, tail, wait_for_scrape, wait_until};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        isolation:
        a_connection_deleted_while_the_watch_was_down_leaves_no_metrics,
        a_dead_host_does_not_delay_a_healthy_connection,
    ]
}

/// Runs `future` to completion on this thread (testsupport's ControlPlane futures are not `Send`).
fn block_here<F: Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// The operator is frozen (SIGSTOP) while kube-apiserver restarts and a connection is
/// deleted, so it never sees the Delete event. Thawed, its watch cannot resume from its old
/// resourceVersion (the restarted API server's watch cache starts later), so it lists
/// again. After that relist, the deleted connection's metric series must be gone and the
/// other connection's kept.
async fn a_connection_deleted_while_the_watch_was_down_leaves_no_metrics(world: Arc<World>) -> anyhow::Result<()> {
    let mut plane = block_here(ControlPlane::start(&world.tools)).context("starting a control plane of its own")?;
    install_crd(&plane.client()).await?;
    let mut s = Scenario::start_on(&plane, "leftovers", &[]).await?;
    s.add_saas_client(crate::scenario::DEFAULT_CLIENT_SECRET).await?;
    s.apply_connection("kept", s.saas_spec()).await?;
    s.apply_connection("gone", s.saas_spec()).await?;
    s.wait_ready("kept").await?;
    s.wait_ready("gone").await?;
    let metrics_url = s.metrics_url().await?;
    let http = reqwest::Client::new();
    let ready =
        |scraped: &Scrape, name: &str| scraped.get("tasklist_operator_connection_ready", &[("namespace", &s.namespace), ("name", name)]);
    let before = scrape(&http, &metrics_url).await?;
    ensure!(
        ready(&before, "gone") == Some(1.0) && ready(&before, "kept") == Some(1.0),
        "both connections should have a Ready series:\n{}",
        before.excerpt(&s.namespace)
    );

    let pid = s.operator.pid();
    signal(pid, "STOP")?;
    let outcome = async {
        block_here(plane.stop_apiserver())?;
        block_here(plane.start_apiserver())?;
        s.connections().delete("gone", &DeleteParams::default()).await?;
        anyhow::Ok(())
    }
    .await;
    signal(pid, "CONT")?;
    outcome?;

    let names_gone = |scraped: &Scrape| {
        scraped
            .samples
            .iter()
            .any(|sample| sample.labels.get("name").is_some_and(|n| n == "gone"))
    };
    let after = wait_for_scrape(
        &http,
        &metrics_url,
        "no series of the deleted connection after the relist",
        Duration::from_secs(60),
        |scraped| !names_gone(scraped),
    )
    .await
    .with_context(|| format!("--- operator log (tail) ---\n{}", tail(&s.operator.logs(), 30)))?;
    ensure!(
        ready(&after, "kept") == Some(1.0),
        "the kept connection's series went too:\n{}",
        after.excerpt(&s.namespace)
    );
    // The relist, not a Delete event, removed them: this is the case being tested.
    let logs = s.operator.logs();
    ensure!(
        logs.contains("forgetting a connection deleted while the watch was down"),
        "the series went, but not through a relist; the scenario did not provoke one:\n{}",
        tail(&logs, 30)
    );
    s.wait_ready("kept").await?;
    s.assert_no_credential_leaked().await
}

/// A scenario in a namespace of its own whose operator waits 30 s for each request, so that
/// requests to a host that never answers stay open that long.
pub(crate) async fn with_30s_request_timeout(world: &Arc<World>, prefix: &str, env: &[(String, String)]) -> anyhow::Result<Scenario> {
    let namespace = world.control_plane.create_namespace(prefix).await?;
    let kubeconfig = world.control_plane.kubeconfig();
    let args: Vec<String> = [
        "run",
        "--namespace",
        &namespace,
        "--listen-addr",
        "127.0.0.1:0",
        "--request-timeout",
        "30s",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let operator = OperatorProcess::start(&operator_binary(), kubeconfig, &args, env)?;
    Scenario::with_operator(world, &namespace, kubeconfig, operator).await
}

/// A TCP server that accepts connections and never answers. Counts connections accepted,
/// closed by the client, and the most open at once.
#[derive(Default)]
pub(crate) struct DeadHost {
    pub(crate) accepted: AtomicUsize,
    closed: AtomicUsize,
    pub(crate) most_open: AtomicUsize,
}

impl DeadHost {
    pub(crate) async fn start() -> anyhow::Result<(Arc<DeadHost>, String)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let host = Arc::new(DeadHost::default());
        let counting = host.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let accepted = counting.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let open = accepted - counting.closed.load(Ordering::SeqCst);
                counting.most_open.fetch_max(open, Ordering::SeqCst);
                let closing = counting.clone();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    // Read whatever comes, answer nothing, until the client gives up.
                    while matches!(socket.read(&mut buffer).await, Ok(read) if read > 0) {}
                    closing.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok((host, url))
    }

    pub(crate) fn open(&self) -> usize {
        self.accepted.load(Ordering::SeqCst) - self.closed.load(Ordering::SeqCst)
    }
}

/// 40 connections point at a host that accepts and never answers; the operator's request
/// timeout is 30 s here, so each of their requests holds on for 30 s. A healthy connection
/// created after them in the same namespace (the same controller and reconcile slots) must
/// become Ready before any of those requests has timed out: it did not wait for a slot.
/// And the dead host, never proven, never has more requests open than all slow hosts
/// together may hold (a quarter of the 32 reconcile slots): two on probation at first, then
/// up to 8 once it is known slow.
async fn a_dead_host_does_not_delay_a_healthy_connection(world: Arc<World>) -> anyhow::Result<()> {
    const DEAD: usize = 40;
    const SLOW_HOSTS: usize = 8;
    let mut s = with_30s_request_timeout(&world, "isolation", &[]).await?;
    s.add_saas_client(crate::scenario::DEFAULT_CLIENT_SECRET).await?;
    let (dead, dead_url) = DeadHost::start().await?;

    for index in 0..DEAD {
        let spec = json!({
            "url": dead_url,
            // A distinct audience each: one token request per connection, not one shared.
            "auth": {"oauth2": {
                "tokenUrl": format!("{dead_url}/oauth/token"),
                "audience": format!("dead-{index:02}"),
                "clientSecretRef": {"name": "client"},
            }},
            "probe": {"interval": "10s"},
        });
        s.apply_connection(&format!("dead-{index:02}"), spec).await?;
    }
    wait_until(
        &format!("{SLOW_HOSTS} requests reaching the dead host"),
        Duration::from_secs(20),
        || dead.open() >= SLOW_HOSTS,
    )
    .await
    .with_context(|| format!("only {} arrived", dead.open()))?;
    // Let the remaining dead connections be picked up too (or be deferred).
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(dead.closed.load(Ordering::SeqCst) == 0, "a dead-host request ended early");

    s.apply_connection("healthy", s.saas_spec()).await?;
    let ready = s
        .wait_for_connection("healthy", "Ready", Duration::from_secs(25), |c| {
            condition(c, "Ready").is_some_and(|(status, _)| status == "True")
        })
        .await;
    let (closed, most_open, accepted) = (
        dead.closed.load(Ordering::SeqCst),
        dead.most_open.load(Ordering::SeqCst),
        dead.accepted.load(Ordering::SeqCst),
    );
    eprintln!("isolation: dead host: {accepted} accepted, {closed} closed, at most {most_open} open at once");
    ready?;
    ensure!(
        closed == 0,
        "{closed} dead-host requests had timed out before the healthy connection was Ready: it waited for them"
    );
    ensure!(
        most_open <= SLOW_HOSTS,
        "the dead host had {most_open} requests open at once; at most {SLOW_HOSTS} should be"
    );
    ensure!(
        s.standin.token_requests().len() == 1,
        "the healthy connection should have obtained one token"
    );
    s.assert_no_credential_leaked().await
}
