//! Past one process: several operators, each with its own share of the connections, against
//! one control plane. Each connection is handled by exactly one of them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use tasklist_operator::shard::shard_of;
use testsupport::operator::OperatorProcess;

use crate::ScenarioFn;
use crate::chart::{Release, assert_nothing_forbidden, helm_ok, name_of, of_kind, start_like_the_deployment};
use crate::scenario::{
    Check, Scenario, Scrape, World, eventually, saas_spec_for, scrape, served_url, start_operator_with, tail, wait_for_scrape, wait_until,
};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        shards:
        two_hash_shards_handle_each_connection_exactly_once,
        a_relabelled_connection_moves_to_the_selector_shard_without_a_new_token,
        the_charts_shards_split_the_connections_as_its_service_account,
        a_selector_the_api_server_refuses_stops_the_operator_with_its_message,
    ]
}

const CONNECTIONS: usize = 20;
const SHARDS: u32 = 2;
const READY: &str = "tasklist_operator_connection_ready";

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?)
}

/// An operator for `namespace` with `shard_args`, leader-elected under `identity` on the
/// Lease its shard derives (no `--leader-election-lease-name` unless `shard_args` has one).
fn start_shard(world: &World, namespace: &str, identity: &str, shard_args: &[&str]) -> anyhow::Result<OperatorProcess> {
    let mut args = vec![
        "--leader-election",
        "--leader-election-namespace",
        namespace,
        "--leader-election-identity",
        identity,
    ];
    args.extend_from_slice(shard_args);
    start_operator_with(world.control_plane.kubeconfig(), namespace, &args, &[])
}

/// The connection names with a `connection_ready` series in one scrape.
fn ready_series(scraped: &Scrape, namespace: &str) -> BTreeSet<String> {
    scraped
        .samples
        .iter()
        .filter(|sample| sample.name == READY && sample.labels.get("namespace").map(String::as_str) == Some(namespace))
        .filter_map(|sample| sample.labels.get("name").cloned())
        .collect()
}

fn credential_requests(scraped: &Scrape) -> f64 {
    scraped
        .samples
        .iter()
        .filter(|sample| sample.name == "tasklist_operator_credential_requests_total")
        .map(|sample| sample.value)
        .sum()
}

async fn two_hash_shards_handle_each_connection_exactly_once(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("shards").await?;
    let count = SHARDS.to_string();
    let first = start_shard(&world, &namespace, "shard-0", &["--shards", &count, "--shard-index", "0"])?;
    let second = start_shard(&world, &namespace, "shard-1", &["--shards", &count, "--shard-index", "1"])?;
    let mut s = Scenario::with_operator(&world, &namespace, world.control_plane.kubeconfig(), first).await?;

    // Twenty connections, each with its own client: one token request each, no sharing.
    let names: Vec<String> = (0..CONNECTIONS).map(|n| format!("orders-{n:02}")).collect();
    for (n, name) in names.iter().enumerate() {
        let (client, id, secret) = (
            format!("client-{n:02}"),
            format!("orders-{n:02}-id"),
            format!("shard-secret-{n:02}"),
        );
        s.standin.add_client(&id, &secret);
        s.apply_secret(&client, &[("client_id", &id), ("client_secret", &secret)]).await?;
        s.apply_connection(name, saas_spec_for(&s.standin, &client)).await?;
    }
    let operators = [&s.operator, &second];
    let owner_of = |name: &str| shard_of(&namespace, name, SHARDS) as usize;
    let expected: Vec<BTreeSet<String>> = (0..SHARDS as usize)
        .map(|shard| names.iter().filter(|name| owner_of(name) == shard).cloned().collect())
        .collect();
    ensure!(
        expected.iter().all(|owned| !owned.is_empty()),
        "the hash gives one shard none of the {CONNECTIONS} connections: {expected:?}"
    );
    for name in &names {
        s.wait_ready(name).await.with_context(|| {
            format!(
                "{name} (shard {}) did not become Ready; log of the other shard (tail):\n{}",
                owner_of(name),
                tail(&operators[1 - owner_of(name)].logs(), 20)
            )
        })?;
    }

    // Each operator's metrics name exactly the connections of its shard.
    let http = http_client()?;
    let mut urls = Vec::new();
    let mut scrapes = Vec::new();
    for (index, operator) in operators.iter().enumerate() {
        let url = format!("{}/metrics", served_url(operator, Duration::from_secs(30)).await?);
        let scraped = wait_for_scrape(
            &http,
            &url,
            &format!("shard {index}'s connections Ready"),
            Duration::from_secs(30),
            |m| ready_series(m, &namespace) == expected[index],
        )
        .await?;
        ensure!(
            scraped.get(
                "tasklist_operator_shard_info",
                &[("index", &index.to_string()), ("count", &SHARDS.to_string())]
            ) == Some(1.0),
            "shard {index} does not say which shard it is:\n{}",
            scraped.excerpt(&namespace)
        );
        urls.push(url);
        scrapes.push(scraped);
    }
    let handled: Vec<BTreeSet<String>> = scrapes.iter().map(|m| ready_series(m, &namespace)).collect();
    let union: BTreeSet<&String> = handled[0].union(&handled[1]).collect();
    let overlap: BTreeSet<&String> = handled[0].intersection(&handled[1]).collect();
    eprintln!(
        "shards: shard 0 handles {}, shard 1 handles {} of {CONNECTIONS} connections",
        handled[0].len(),
        handled[1].len()
    );
    ensure!(
        union.len() == CONNECTIONS,
        "the shards together handle {} connections, not {CONNECTIONS}",
        union.len()
    );
    ensure!(overlap.is_empty(), "both shards handle {overlap:?}");

    // One token request per connection, each asked for by its own shard only.
    let token_requests = s.standin.token_requests().len();
    ensure!(
        token_requests == CONNECTIONS,
        "{token_requests} token requests for {CONNECTIONS} connections"
    );
    for (index, scraped) in scrapes.iter().enumerate() {
        let requests = credential_requests(scraped);
        ensure!(
            requests == expected[index].len() as f64,
            "shard {index} made {requests} credential requests for its {} connections",
            expected[index].len()
        );
    }
    // Each log names the connections of its own shard, and not one of the other shard.
    for (index, operator) in operators.iter().enumerate() {
        let logs = operator.logs();
        let unnamed: Vec<&String> = expected[index]
            .iter()
            .filter(|name| !logs.contains(&format!("{namespace}/{name}")))
            .collect();
        ensure!(unnamed.is_empty(), "shard {index}'s log does not name its connections {unnamed:?}");
        let foreign: Vec<&String> = expected[1 - index]
            .iter()
            .filter(|name| logs.contains(&format!("{namespace}/{name}")))
            .collect();
        ensure!(
            foreign.is_empty(),
            "shard {index}'s log names the other shard's connections {foreign:?}"
        );
    }

    // Each shard leader-elected on its own Lease, named after the shard.
    let leases: Api<Lease> = Api::namespaced(s.client.clone(), &namespace);
    for index in 0..SHARDS {
        let name = format!("tasklist-operator-shard-{index}-of-{SHARDS}");
        let holder = leases
            .get_opt(&name)
            .await?
            .and_then(|lease| lease.spec?.holder_identity)
            .with_context(|| format!("no Lease {name} with a holder"))?;
        ensure!(holder == format!("shard-{index}"), "Lease {name} is held by {holder}");
    }

    // A deletion is handled by the connection's own shard: its series go, the other
    // shard's stay as they were.
    let deleted = expected[1].first().context("shard 1 has no connection")?.clone();
    s.connections().delete(&deleted, &DeleteParams::default()).await?;
    let mut remaining = expected[1].clone();
    remaining.remove(&deleted);
    wait_for_scrape(
        &http,
        &urls[1],
        &format!("shard 1 forgetting {deleted}"),
        Duration::from_secs(30),
        |m| ready_series(m, &namespace) == remaining,
    )
    .await?;
    let after = scrape(&http, &urls[0]).await?;
    ensure!(
        ready_series(&after, &namespace) == expected[0],
        "shard 0's connections changed after shard 1's {deleted} was deleted"
    );
    let logs = s.operator.logs();
    ensure!(
        !logs.contains(&format!("{namespace}/{deleted}")),
        "shard 0 reacted to the deletion of shard 1's {deleted}"
    );
    // The second operator's log goes through the leak check after the scenario.
    s.watch_logs_of(&second);
    Ok(())
}

/// Two operators split by `--shard-selector`. A connection whose label moves it from one
/// selector to the other leaves the first operator (the API server sends it a Delete)
/// and is taken over by the second, which keeps the stored credential.
async fn a_relabelled_connection_moves_to_the_selector_shard_without_a_new_token(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("selector").await?;
    let team_a = start_shard(
        &world,
        &namespace,
        "team-a",
        &["--shard-selector", "team=a", "--leader-election-lease-name", "team-a"],
    )?;
    let team_b = start_shard(
        &world,
        &namespace,
        "team-b",
        &["--shard-selector", "team=b", "--leader-election-lease-name", "team-b"],
    )?;
    let mut s = Scenario::with_operator(&world, &namespace, world.control_plane.kubeconfig(), team_a).await?;
    s.add_saas_client("selector-secret-1").await?;
    let labelled = |team: &str| {
        serde_json::json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1",
            "kind": "TasklistConnection",
            "metadata": {"name": "orders", "labels": {"team": team}},
            "spec": s.saas_spec(),
        })
    };
    let apply = PatchParams::apply("e2e-test").force();
    s.connections().patch("orders", &apply, &Patch::Apply(labelled("a"))).await?;
    s.wait_ready("orders").await?;
    let stored = s.derived_secret(SECRET).await?.context("no derived Secret")?;

    let http = http_client()?;
    let url_a = format!("{}/metrics", served_url(&s.operator, Duration::from_secs(30)).await?);
    let url_b = format!("{}/metrics", served_url(&team_b, Duration::from_secs(30)).await?);
    let handles = |m: &Scrape| ready_series(m, &namespace).contains("orders");
    wait_for_scrape(&http, &url_a, "team a handling orders", Duration::from_secs(30), handles).await?;
    ensure!(
        !handles(&scrape(&http, &url_b).await?),
        "team b handles a connection labelled team=a"
    );

    s.connections().patch("orders", &apply, &Patch::Apply(labelled("b"))).await?;
    wait_for_scrape(&http, &url_b, "team b handling orders", Duration::from_secs(30), handles).await?;
    wait_for_scrape(&http, &url_a, "team a forgetting orders", Duration::from_secs(30), |m| !handles(m)).await?;
    // Team b found the credential team a stored and kept it.
    eventually("team b's reconcile of orders", Duration::from_secs(30), || async {
        Ok(if team_b.logs().contains(&format!("{namespace}/orders")) {
            Check::Done(())
        } else {
            Check::NotYet(tail(&team_b.logs(), 20))
        })
    })
    .await?;
    s.wait_ready("orders").await?;
    let now = s.derived_secret(SECRET).await?.context("no derived Secret")?;
    ensure!(now.get("token") == stored.get("token"), "team b replaced the stored token");
    let token_requests = s.standin.token_requests().len();
    ensure!(token_requests == 1, "{token_requests} token requests, expected the one of team a");
    s.watch_logs_of(&team_b);
    Ok(())
}

/// The chart with `sharding.shards=2`, installed on the real API server: each Deployment's
/// operator, run with its args as the chart's ServiceAccount, handles its own connections
/// and holds its own Lease, which the chart's Role allows.
async fn the_charts_shards_split_the_connections_as_its_service_account(world: Arc<World>) -> anyhow::Result<()> {
    let release_namespace = world.control_plane.create_namespace("tlo-shards").await?;
    let team = world.control_plane.create_namespace("team").await?;
    let release = Release::install(
        &world,
        &release_namespace,
        &[format!("sharding.shards={SHARDS}"), format!("watchNamespaces={{{team}}}")],
    )
    .await?;
    let manifest = release.manifest(&world).await?;
    let rendered = of_kind(&manifest, "Deployment");
    ensure!(
        rendered.len() == SHARDS as usize,
        "the chart rendered {} Deployments",
        rendered.len()
    );
    let account = rendered[0]["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("no serviceAccountName")?
        .to_owned();
    let installed: Api<Deployment> = Api::namespaced(world.client(), &release.namespace);
    let mut deployments = Vec::new();
    for deployment in &rendered {
        deployments.push(installed.get(name_of(deployment)).await?);
    }
    let kubeconfig = world.control_plane.service_account_kubeconfig(&release.namespace, &account).await?;
    let first = start_like_the_deployment(&deployments[0], "a", &kubeconfig)?;
    let second = start_like_the_deployment(&deployments[1], "a", &kubeconfig)?;
    let mut s = Scenario::with_operator(&world, &team, &kubeconfig, first).await?;

    let names: Vec<String> = (0..6).map(|n| format!("orders-{n:02}")).collect();
    for (n, name) in names.iter().enumerate() {
        let (client, id, secret) = (format!("client-{n:02}"), format!("chart-{n:02}-id"), format!("chart-secret-{n:02}"));
        s.standin.add_client(&id, &secret);
        s.apply_secret(&client, &[("client_id", &id), ("client_secret", &secret)]).await?;
        s.apply_connection(name, saas_spec_for(&s.standin, &client)).await?;
    }
    for name in &names {
        s.wait_ready(name).await?;
    }
    let http = http_client()?;
    for (index, operator) in [&s.operator, &second].into_iter().enumerate() {
        let expected: BTreeSet<String> = names
            .iter()
            .filter(|name| shard_of(&team, name, SHARDS) as usize == index)
            .cloned()
            .collect();
        let url = format!("{}/metrics", served_url(operator, Duration::from_secs(30)).await?);
        wait_for_scrape(&http, &url, &format!("shard {index}'s connections"), Duration::from_secs(30), |m| {
            ready_series(m, &team) == expected
        })
        .await?;
    }
    let token_requests = s.standin.token_requests().len();
    ensure!(
        token_requests == names.len(),
        "{token_requests} token requests for {} connections",
        names.len()
    );

    let leases: Api<Lease> = Api::namespaced(world.client(), &release.namespace);
    for (index, deployment) in deployments.iter().enumerate() {
        let lease = lease_name_of(rendered[index])?;
        ensure!(
            lease.ends_with(&format!("-shard-{index}-of-{SHARDS}")),
            "shard {index}'s Lease is {lease}"
        );
        let holder = leases.get_opt(&lease).await?.and_then(|lease| lease.spec?.holder_identity);
        let pod = format!("{}-a", kube::ResourceExt::name_any(deployment));
        ensure!(holder.as_ref() == Some(&pod), "Lease {lease} is held by {holder:?}, not {pod}");
    }
    let notes = helm_ok(&world, &["get", "notes", &release.name, "--namespace", &release.namespace]).await?;
    ensure!(
        notes.contains("-shard-0 to ") && notes.contains("a Lease per shard"),
        "the NOTES do not describe the shards:\n{notes}"
    );
    assert_nothing_forbidden(&format!("{}\n{}", s.all_operator_logs(), second.logs()))?;
    s.watch_logs_of(&second);
    Ok(())
}

/// A selector is checked by the API server, the authority on its syntax: one it refuses
/// stops the operator at start-up, naming the flag and quoting the API server, rather than
/// leaving it retrying a watch that can never work.
async fn a_selector_the_api_server_refuses_stops_the_operator_with_its_message(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("bad-selector").await?;
    let mut operator = start_operator_with(
        world.control_plane.kubeconfig(),
        &namespace,
        &["--shard-selector", "team in (a"],
        &[],
    )?;
    wait_until("the operator stopping", Duration::from_secs(30), || !operator.is_running())
        .await
        .with_context(|| tail(&operator.logs(), 20))?;
    let logs = operator.logs();
    ensure!(
        logs.contains(r#"--shard-selector "team in (a" was refused by the API server: "#),
        "the operator stopped without saying why:\n{}",
        tail(&logs, 20)
    );
    ensure!(
        !logs.contains("watching TasklistConnections"),
        "the operator started watching anyway"
    );
    Ok(())
}

/// The `--leader-election-lease-name` a rendered Deployment passes.
fn lease_name_of(deployment: &serde_json::Value) -> anyhow::Result<String> {
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("no args")?
        .iter()
        .filter_map(|arg| arg.as_str())
        .collect();
    args.iter()
        .position(|arg| *arg == "--leader-election-lease-name")
        .and_then(|at| args.get(at + 1))
        .map(|name| (*name).to_owned())
        .context("no --leader-election-lease-name")
}

const SECRET: &str = "orders-tasklist-auth";
