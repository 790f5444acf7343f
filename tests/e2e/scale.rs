//! API requests per reconcile (issue 12, items 1 and 5): connections at rest cost the API
//! server nothing, a new connection reads only what it obtains a credential with, and a
//! restarted operator reads each derived Secret once (it keeps a compact record of each,
//! not the Secret: issue 22) and no client Secret for the credentials it keeps. Counted from the
//! kube-apiserver's own audit log, in the scenario's namespace.
//!
//! The audit log does not tell the operator's requests from the test's (both use the admin
//! kubeconfig, and kube-rs sends no user agent), so each count covers only requests the
//! test does not send itself while counting: Secret GETs and creates, status writes,
//! Events. The test applies its Secrets and connections with PATCH and polls connections
//! with GET.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use serde_json::json;
use testsupport::controlplane::ApiRequest;

use crate::ScenarioFn;
use crate::scenario::{Scenario, World, scrape};

/// Connections of the at-rest scenario: enough that 2 GETs per reconcile would show.
const AT_REST: usize = 20;
/// Connections of the new-connection and restart scenarios.
const NEW: usize = 10;
/// How long connections are left alone while requests are counted.
const REST_WINDOW: Duration = Duration::from_secs(30);

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        scale: connections_at_rest_send_no_api_request,
        a_new_connection_reads_only_what_it_obtains_with_and_is_reconciled_once,
        a_restarted_operator_reads_each_derived_secret_once_and_no_client_secret,
    ]
}

fn connection_name(index: usize) -> String {
    format!("c{index:02}")
}

async fn create_ready_connections(s: &Scenario, count: usize, probe_interval: &str) -> anyhow::Result<()> {
    let mut spec = s.saas_spec();
    spec["probe"] = json!({"interval": probe_interval});
    for index in 0..count {
        s.apply_connection(&connection_name(index), spec.clone()).await?;
    }
    for index in 0..count {
        s.wait_ready(&connection_name(index)).await?;
    }
    Ok(())
}

/// Requests by `verb resource[/subresource]`, for messages.
fn tally(requests: &[ApiRequest]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in requests {
        let what = match request.subresource.as_str() {
            "" => format!("{} {}", request.verb, request.resource),
            sub => format!("{} {}/{sub}", request.verb, request.resource),
        };
        *counts.entry(what).or_insert(0) += 1;
    }
    counts
}

fn count(requests: &[ApiRequest], verb: &str, resource: &str, subresource: &str) -> usize {
    requests
        .iter()
        .filter(|r| r.verb == verb && r.resource == resource && r.subresource == subresource)
        .count()
}

/// The requests of `namespace` completed after the first `since`.
fn requests_since(world: &World, namespace: &str, since: usize) -> anyhow::Result<Vec<ApiRequest>> {
    Ok(world.control_plane.api_requests(namespace)?.into_iter().skip(since).collect())
}

async fn reconciles(s: &Scenario) -> anyhow::Result<f64> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    Ok(scrape(&http, &s.metrics_url().await?)
        .await?
        .count("tasklist_operator_reconciles_total", &[]))
}

async fn connections_at_rest_send_no_api_request(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "at-rest").await?;
    // The shortest probe interval the CRD allows, so that reconciles do happen.
    create_ready_connections(&s, AT_REST, "10s").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = world.control_plane.api_requests(&s.namespace)?.len();
    let (reconciles_before, probes_before) = (reconciles(&s).await?, s.standin.api_requests().len());
    tokio::time::sleep(REST_WINDOW).await;
    let requests = requests_since(&world, &s.namespace, before)?;
    let reconciled = reconciles(&s).await? - reconciles_before;
    let probed = s.standin.api_requests().len() - probes_before;

    let secret_reads = count(&requests, "get", "secrets", "");
    let writes: Vec<&ApiRequest> = requests.iter().filter(|r| r.is_write()).collect();
    eprintln!(
        "scale: {AT_REST} connections at rest for {}s: {reconciled} reconciles, {probed} probes, API requests {:?}",
        REST_WINDOW.as_secs(),
        tally(&requests)
    );
    ensure!(
        // The connections share one token, and so one probe per interval.
        reconciled >= AT_REST as f64 && probed >= 2,
        "only {reconciled} reconciles and {probed} probes in {}s with a 10 s probe interval: the operator is not reconciling",
        REST_WINDOW.as_secs()
    );
    ensure!(
        secret_reads == 0,
        "{secret_reads} Secret GETs in {reconciled} reconciles at rest ({:.2} per reconcile); all requests: {:?}",
        secret_reads as f64 / reconciled,
        tally(&requests)
    );
    ensure!(writes.is_empty(), "writes at rest: {:?}", tally(&requests));
    s.assert_no_credential_leaked().await
}

async fn a_new_connection_reads_only_what_it_obtains_with_and_is_reconciled_once(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "new-reads").await?;
    // Let the operator's watches see the client Secret first, so that no connection is
    // reconciled before it can be Ready.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = world.control_plane.api_requests(&s.namespace)?.len();
    // The default probe interval (60 s): nothing but the new connections wakes the operator.
    create_ready_connections(&s, NEW, "60s").await?;
    // Whatever a redundant reconcile would do happens within milliseconds of its cause.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = requests_since(&world, &s.namespace, before)?;
    let reconciled = reconciles(&s).await?;
    eprintln!(
        "scale: {NEW} new connections: {reconciled} reconciles, API requests {:?}",
        tally(&requests)
    );

    let derived_reads = requests
        .iter()
        .filter(|r| r.verb == "get" && r.resource == "secrets" && r.name.ends_with("-tasklist-auth"))
        .count();
    let client_reads = requests
        .iter()
        .filter(|r| r.verb == "get" && r.resource == "secrets" && r.name == "client")
        .count();
    let tokens = s.standin.token_requests().len();
    ensure!(
        derived_reads == 0,
        "{derived_reads} GETs of derived Secrets, which the caches answer; all requests: {:?}",
        tally(&requests)
    );
    // All of them use one client Secret: its values are read once per version.
    ensure!(
        client_reads == 1,
        "{client_reads} GETs of the one client Secret for {NEW} connections ({tokens} token requests); all requests: {:?}",
        tally(&requests)
    );
    let created = count(&requests, "create", "secrets", "");
    let status_writes = count(&requests, "patch", "tasklistconnections", "status");
    ensure!(
        (created, status_writes) == (NEW, NEW),
        "{created} Secret creates and {status_writes} status writes for {NEW} new connections; all requests: {:?}",
        tally(&requests)
    );
    ensure!(
        reconciled == NEW as f64,
        "{reconciled} reconciles for {NEW} new connections: the own Secret write or the status write woke a connection again"
    );
    s.assert_no_credential_leaked().await
}

async fn a_restarted_operator_reads_each_derived_secret_once_and_no_client_secret(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start_saas(&world, "restart-reads").await?;
    create_ready_connections(&s, NEW, "60s").await?;
    let tokens = s.standin.token_requests().len();
    let before = world.control_plane.api_requests(&s.namespace)?.len();

    s.restart_operator_after_crash()?;
    crate::scenario::eventually(
        "the restarted operator reconciling every connection",
        Duration::from_secs(60),
        || async {
            let reconciled = reconciles(&s).await.unwrap_or_default();
            Ok(if reconciled >= NEW as f64 {
                crate::scenario::Check::Done(())
            } else {
                crate::scenario::Check::NotYet(format!("{reconciled} reconciles"))
            })
        },
    )
    .await?;
    // The audit log may show a reconcile's read a moment after the reconcile counted.
    crate::scenario::eventually(
        "every derived Secret read once after the restart",
        Duration::from_secs(30),
        || async {
            let requests = requests_since(&world, &s.namespace, before)?;
            let read: std::collections::HashSet<&str> = requests
                .iter()
                .filter(|r| r.verb == "get" && r.resource == "secrets")
                .map(|r| r.name.as_str())
                .collect();
            Ok(if read.len() >= NEW {
                crate::scenario::Check::Done(())
            } else {
                crate::scenario::Check::NotYet(format!("{} Secrets read", read.len()))
            })
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = requests_since(&world, &s.namespace, before)?;
    eprintln!("scale: {NEW} connections after a restart: API requests {:?}", tally(&requests));
    // One read of each derived Secret: the metadata watch knows its version, the record
    // of the credential (for the probe) comes from that read. No client Secret is read.
    let derived_reads = requests
        .iter()
        .filter(|r| r.verb == "get" && r.resource == "secrets" && r.name.ends_with("-tasklist-auth"))
        .count();
    let secret_reads = count(&requests, "get", "secrets", "");
    let read: Vec<&str> = requests
        .iter()
        .filter(|r| r.verb == "get" && r.resource == "secrets")
        .map(|r| r.name.as_str())
        .collect();
    eprintln!("scale: Secrets read after the restart: {read:?}");
    ensure!(
        (derived_reads, secret_reads) == (NEW, NEW),
        "{derived_reads} GETs of derived Secrets and {secret_reads} Secret GETs in all after a restart of {NEW} Ready connections (one per derived Secret expected); all requests: {:?}",
        tally(&requests)
    );
    let writes: Vec<&ApiRequest> = requests.iter().filter(|r| r.is_write()).collect();
    ensure!(writes.is_empty(), "writes after a restart: {:?}", tally(&requests));
    ensure!(
        s.standin.token_requests().len() == tokens,
        "the restarted operator requested new tokens"
    );
    s.assert_no_credential_leaked().await
}
