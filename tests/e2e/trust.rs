//! A tenant gains nothing through the operator (issue 18): no value of a referenced Secret
//! reaches status; the default policy refuses loopback, the API server, http and insecure
//! TLS before anything is sent; proxy variables are ignored; Secrets anyone labels cost the
//! operator their metadata only; one namespace's dead hosts leave another namespace's
//! refreshes on time; a refresh forced through the annotation runs at most once a minute;
//! the CRD refuses URLs with user info; an endpoint discovered under one connection's TLS
//! trust is not used under another's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tasklist_operator::crd::TasklistConnection;
use testsupport::standin::{StandinOptions, StandinTasklist};

use crate::ScenarioFn;
use crate::isolation::DeadHost;
use crate::scenario::{
    CLIENT_ID, DEFAULT_CLIENT_SECRET, Scenario, World, find_condition, operator_binary, planned_refresh_and_expiry, start_operator_with,
    tail, wait_until,
};

pub fn scenarios() -> Vec<(&'static str, ScenarioFn)> {
    scenarios![
        trust:
        status_quotes_no_value_of_a_referenced_secret,
        the_default_policy_refuses_loopback_http_and_insecure_tls_and_sends_nothing,
        a_connection_naming_the_api_server_is_refused,
        proxy_variables_are_ignored,
        secrets_anyone_labels_cost_metadata_only,
        dead_hosts_in_one_namespace_leave_another_namespace_on_time,
        a_refresh_forced_with_the_annotation_runs_at_most_once_a_minute,
        the_crd_refuses_a_url_with_user_info,
        a_discovered_endpoint_is_not_shared_between_trusts,
    ]
}

/// Finding 1: `usernameKey` may name any key of any Secret. A connection whose "username"
/// is in fact the password key of a Secret the requester may not read: before, the
/// Authenticated message quoted it (`HTTP Basic credentials of user "<value>"`).
async fn status_quotes_no_value_of_a_referenced_secret(world: Arc<World>) -> anyhow::Result<()> {
    const PASSWORD: &str = "db-password-never-shown-1";
    let mut s = Scenario::start(&world, "novalue").await?;
    s.standin.accept_basic(PASSWORD, PASSWORD);
    s.apply_secret("db-creds", &[("password", PASSWORD)]).await?;
    s.apply_connection(
        "borrowed",
        json!({
            "url": s.standin.url(),
            "auth": {"basic": {"credentialsSecretRef": {"name": "db-creds", "usernameKey": "password", "passwordKey": "password"}}},
            "probe": {"interval": "10s"},
        }),
    )
    .await?;
    let connection = s.wait_ready("borrowed").await?;
    let authenticated = find_condition(&connection, "Authenticated").context("no Authenticated condition")?;
    eprintln!("trust: Authenticated says {:?}", authenticated.message);
    let status = serde_json::to_string(&connection.status)?;
    ensure!(!status.contains(PASSWORD), "the status quotes the Secret's value: {status}");
    // The automatic leak check covers usernames too, as is and encoded.
    s.assert_no_credential_leaked().await
}

/// A TLS stand-in that knows the default client, and whose CA is in Secret `ca`.
async fn tls_standin(s: &mut Scenario) -> anyhow::Result<StandinTasklist> {
    let standin = StandinTasklist::start_with(StandinOptions {
        tls: true,
        ..StandinOptions::default()
    })
    .await?;
    standin.add_client(CLIENT_ID, DEFAULT_CLIENT_SECRET);
    let ca = standin.ca_pem().context("a TLS stand-in has a CA")?;
    s.apply_secret("ca", &[("ca.crt", &ca)]).await?;
    Ok(standin)
}

fn oauth2_spec(url: &str, token_url: &str) -> Value {
    json!({
        "url": url,
        "auth": {"oauth2": {"tokenUrl": token_url, "clientSecretRef": {"name": "client"}}},
        "tls": {"caSecretRef": {"name": "ca"}},
    })
}

/// Waits until `name` is refused with `NotAllowed` and its Authenticated message says
/// `says`; no derived Secret may exist.
async fn expect_not_allowed(s: &Scenario, name: &str, says: &str) -> anyhow::Result<()> {
    let connection = s.wait_not_ready_because(name, "NotAllowed").await?;
    let authenticated = find_condition(&connection, "Authenticated").context("no Authenticated condition")?;
    eprintln!("trust: {name}: {}", authenticated.message);
    ensure!(
        authenticated.reason == "NotAllowed" && authenticated.message.contains(says),
        "{name}: Authenticated is {}: {:?}; expected it to say {says:?}",
        authenticated.reason,
        authenticated.message
    );
    ensure!(
        s.derived_secret(&format!("{name}-tasklist-auth")).await?.is_none(),
        "{name}: a derived Secret was written"
    );
    Ok(())
}

/// Finding 2 (safe defaults): with the operator's default policy (the local test policy
/// given back), a connection to a loopback address, one over http and one with
/// insecureSkipVerify are each `NotAllowed`, and the servers they name receive nothing.
/// Before, the defaults allowed all three.
async fn the_default_policy_refuses_loopback_http_and_insecure_tls_and_sends_nothing(world: Arc<World>) -> anyhow::Result<()> {
    let namespace = world.control_plane.create_namespace("defaults").await?;
    let kubeconfig = world.control_plane.kubeconfig();
    let defaults = ["--allow-loopback=false", "--allow-http=false", "--allow-insecure-tls=false"];
    let operator = start_operator_with(kubeconfig, &namespace, &defaults, &[])?;
    let mut s = Scenario::with_operator(&world, &namespace, kubeconfig, operator).await?;
    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    let tls = tls_standin(&mut s).await?;
    let port = tls.url().rsplit(':').next().unwrap_or_default().to_owned();

    s.apply_connection("loopback", oauth2_spec(&tls.url(), &tls.token_url())).await?;
    // `localhost` resolves to loopback: refused by what it resolves to.
    let by_name = format!("https://localhost:{port}");
    s.apply_connection("by-name", oauth2_spec(&by_name, &format!("{by_name}/oauth/token")))
        .await?;
    s.apply_connection("plain-http", s.saas_spec()).await?;
    let mut insecure = oauth2_spec("https://tasklist.example.invalid", "https://login.example.invalid/oauth/token");
    insecure["tls"] = json!({"insecureSkipVerify": true});
    s.apply_connection("insecure", insecure).await?;

    expect_not_allowed(&s, "loopback", "--allow-loopback").await?;
    expect_not_allowed(&s, "by-name", "--allow-loopback").await?;
    expect_not_allowed(&s, "plain-http", "uses http://").await?;
    expect_not_allowed(&s, "insecure", "insecureSkipVerify").await?;
    for (which, standin) in [("the TLS stand-in", &tls), ("the http stand-in", &s.standin)] {
        let (tokens, api) = (standin.token_requests_arrived(), standin.api_requests().len());
        ensure!(
            tokens == 0 && api == 0,
            "{which} received {tokens} token and {api} API requests; a refused connection must send none"
        );
    }
    let logs = s.operator.logs();
    ensure!(
        logs.contains("127.0.0.0/8") && logs.contains("169.254.0.0/16") && logs.contains("http: forbidden"),
        "the operator's start-up line does not list the default denials:\n{}",
        tail(&logs, 20)
    );
    s.assert_no_credential_leaked().await
}

/// Finding 2 (the API server): a connection whose token endpoint is the API server the
/// operator talks to gets `NotAllowed`, with loopback allowed (the API server listens on
/// loopback here), so that only the API-server rule can refuse it.
async fn a_connection_naming_the_api_server_is_refused(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "apiserver").await?;
    let api_server = world.control_plane.server_url();
    s.apply_connection(
        "to-apiserver",
        json!({
            "url": s.standin.url(),
            "auth": {"oauth2": {"tokenUrl": format!("{api_server}/api/v1/namespaces/kube-system/secrets"), "clientSecretRef": {"name": "client"}}},
            "tls": {"insecureSkipVerify": true},
        }),
    )
    .await?;
    expect_not_allowed(&s, "to-apiserver", "API server").await?;
    // The same operator still serves a connection to another port of the same address.
    s.apply_connection("elsewhere", s.saas_spec()).await?;
    s.wait_ready("elsewhere").await?;
    s.assert_no_credential_leaked().await
}

/// Finding 7: `HTTP(S)_PROXY`/`ALL_PROXY` would send every request through a proxy, and
/// the address check would then see only the proxy's address. The operator ignores them
/// for requests to Camunda: with them pointing at a host that would accept and never
/// answer, a connection becomes Ready and that host receives no connection.
async fn proxy_variables_are_ignored(world: Arc<World>) -> anyhow::Result<()> {
    let (proxy, proxy_url) = DeadHost::start().await?;
    let namespace = world.control_plane.create_namespace("proxy").await?;
    let kubeconfig = world.control_plane.kubeconfig();
    // HTTPS_PROXY is left out: the Kubernetes client reads it for the API server, which is
    // the administrator's business (the stand-in speaks http, so HTTP_PROXY is the one an
    // HTTP client would use for it).
    let env: Vec<(&str, &str)> = ["HTTP_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"]
        .into_iter()
        .map(|name| (name, proxy_url.as_str()))
        .chain([("NO_PROXY", ""), ("no_proxy", "")])
        .collect();
    let operator = start_operator_with(kubeconfig, &namespace, &[], &env)?;
    let mut s = Scenario::with_operator(&world, &namespace, kubeconfig, operator).await?;
    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    s.apply_connection("direct", s.saas_spec()).await?;
    s.wait_ready("direct").await?;
    let accepted = proxy.accepted.load(Ordering::SeqCst);
    ensure!(accepted == 0, "the proxy received {accepted} connections");
    s.assert_no_credential_leaked().await
}

/// The resident set size of a process, in bytes.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kib: u64 = line.split_whitespace().nth(1).context("no VmRSS value")?.parse()?;
    Ok(kib * 1024)
}

/// Finding 3: the cache of derived Secrets selected by the operator's label, which anyone
/// can set on their own Secrets. 40 labelled Secrets of 900 KiB each (36 MB in all), one of
/// them named like a connection's derived Secret: the operator keeps their metadata only,
/// and its resident memory grows by far less than their size. Before, it kept them whole.
async fn secrets_anyone_labels_cost_metadata_only(world: Arc<World>) -> anyhow::Result<()> {
    const COUNT: usize = 40;
    const SIZE: usize = 900 * 1024;
    const MOST_GROWTH: u64 = 12 * 1024 * 1024;
    let s = Scenario::start_saas(&world, "labelled").await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = s.operator.pid();
    let before = rss_bytes(pid)?;
    let secrets = s.secrets();
    for index in 0..COUNT {
        // Not random, not a credential: a value the leak check need not know.
        let filler = ByteString(vec![b'a' + (index % 26) as u8; SIZE]);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(format!("labelled-{index:02}")),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "tasklist-operator".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("filler".to_owned(), filler)])),
            ..Secret::default()
        };
        secrets.create(&PostParams::default(), &secret).await?;
    }
    // Let the watch deliver them all, then let the operator settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_bytes(pid)?;
    let growth = after.saturating_sub(before);
    eprintln!(
        "trust: {COUNT} labelled Secrets of {} KiB: operator RSS {:.1} MB -> {:.1} MB (+{:.1} MB)",
        SIZE / 1024,
        before as f64 / 1e6,
        after as f64 / 1e6,
        growth as f64 / 1e6
    );
    for index in 0..COUNT {
        secrets.delete(&format!("labelled-{index:02}"), &DeleteParams::default()).await?;
    }
    ensure!(
        growth < MOST_GROWTH,
        "the operator's memory grew by {:.1} MB for {COUNT} labelled Secrets of {} KiB that are not its own",
        growth as f64 / 1e6,
        SIZE / 1024
    );
    // Its own derived Secret is still answered from its record: the connection stays Ready.
    s.wait_ready("orders").await?;
    s.assert_no_credential_leaked().await
}

/// Finding 4 (fair shares): an operator watching every namespace (its connections picked
/// by a label, so that it leaves other scenarios' alone), with 30 s request timeouts. 50
/// connections in one namespace point at 8 hosts that accept and never answer. A healthy
/// connection in another namespace, with 20 s tokens, becomes Ready before any of those
/// requests has timed out, and for the next 45 s its derived Secret never holds an expired
/// token. Before, the dead connections took all 32 reconcile slots (24 per host allowed).
async fn dead_hosts_in_one_namespace_leave_another_namespace_on_time(world: Arc<World>) -> anyhow::Result<()> {
    const DEAD_HOSTS: usize = 8;
    const DEAD_CONNECTIONS: usize = 50;
    const WATCH: Duration = Duration::from_secs(45);
    let tenant = world.control_plane.create_namespace("fair-dead").await?;
    let healthy_namespace = world.control_plane.create_namespace("fair-ok").await?;
    let selector = format!("fair={healthy_namespace}");
    let kubeconfig = world.control_plane.kubeconfig();
    let args: Vec<String> = [
        "run",
        "--listen-addr",
        "127.0.0.1:0",
        "--request-timeout",
        "30s",
        "--shard-selector",
        &selector,
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let env = [("RUST_LOG".to_owned(), "info,tasklist_operator::controller=debug".to_owned())];
    let operator = testsupport::operator::OperatorProcess::start(&operator_binary(), kubeconfig, &args, &env)?;
    let mut s = Scenario::with_operator(&world, &healthy_namespace, kubeconfig, operator).await?;
    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    s.standin.set_token_lifetime(Duration::from_secs(20));

    let client = world.client();
    let labelled = |name: &str, spec: Value| {
        json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1",
            "kind": "TasklistConnection",
            "metadata": {"name": name, "labels": {"fair": healthy_namespace}},
            "spec": spec,
        })
    };
    let tenant_secrets: Api<Secret> = Api::namespaced(client.clone(), &tenant);
    tenant_secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("client".into()),
                    ..ObjectMeta::default()
                },
                string_data: Some(BTreeMap::from([
                    ("client_id".to_owned(), "dead".to_owned()),
                    ("client_secret".to_owned(), "dead-tenant-secret".to_owned()),
                ])),
                ..Secret::default()
            },
        )
        .await?;
    let mut dead_hosts = Vec::new();
    for _ in 0..DEAD_HOSTS {
        dead_hosts.push(DeadHost::start().await?);
    }
    let tenant_connections: Api<TasklistConnection> = Api::namespaced(client.clone(), &tenant);
    for index in 0..DEAD_CONNECTIONS {
        let (_, url) = &dead_hosts[index % DEAD_HOSTS];
        let spec = json!({
            "url": url,
            "auth": {"oauth2": {"tokenUrl": format!("{url}/oauth/token"), "audience": format!("dead-{index:02}"),
                                 "clientSecretRef": {"name": "client"}}},
        });
        let name = format!("dead-{index:02}");
        tenant_connections
            .patch(&name, &PatchParams::apply("e2e-test").force(), &Patch::Apply(labelled(&name, spec)))
            .await?;
    }
    let accepted = || {
        dead_hosts
            .iter()
            .map(|(host, _)| host.accepted.load(Ordering::SeqCst))
            .sum::<usize>()
    };
    let closed = || {
        dead_hosts
            .iter()
            .map(|(host, _)| host.accepted.load(Ordering::SeqCst) - host.open())
            .sum::<usize>()
    };
    wait_until("the dead hosts holding requests", Duration::from_secs(20), || {
        accepted() >= DEAD_HOSTS
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(closed() == 0, "a dead-host request ended early");

    let healthy_connections = s.connections();
    healthy_connections
        .patch(
            "healthy",
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(labelled("healthy", s.saas_spec())),
        )
        .await?;
    let ready = s.wait_ready("healthy").await;
    let (accepted_before_ready, closed_before_ready) = (accepted(), closed());
    eprintln!(
        "trust: fair shares: the dead hosts accepted {accepted_before_ready} requests ({closed_before_ready} timed out) before the healthy connection was Ready"
    );
    ready?;
    ensure!(
        closed_before_ready == 0,
        "{closed_before_ready} dead-host requests had timed out before the healthy connection in another namespace was Ready: it waited for them"
    );

    let started = Instant::now();
    let (mut samples, mut expired) = (0, Vec::new());
    while started.elapsed() < WATCH {
        let tick = Instant::now();
        let now = Timestamp::now();
        if let Some(secret) = s.secrets().get_opt("healthy-tasklist-auth").await? {
            let (_, expires) = planned_refresh_and_expiry(&secret)?;
            if expires <= now && expired.len() < 10 {
                expired.push(format!("expired at {expires}, seen at {now}"));
            }
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(500).saturating_sub(tick.elapsed())).await;
    }
    let most_open: usize = dead_hosts.iter().map(|(host, _)| host.most_open.load(Ordering::SeqCst)).sum();
    eprintln!(
        "trust: fair shares: {samples} samples in {}s, {} expired; the dead hosts accepted {} requests, at most {most_open} open (summed per host)",
        WATCH.as_secs(),
        expired.len(),
        accepted()
    );
    ensure!(
        expired.is_empty(),
        "the healthy connection held expired credentials:\n{}\n--- operator log (tail) ---\n{}",
        expired.join("\n"),
        tail(&s.operator.logs(), 30)
    );
    for index in 0..DEAD_CONNECTIONS {
        tenant_connections
            .delete(&format!("dead-{index:02}"), &DeleteParams::default())
            .await?;
    }
    s.assert_no_credential_leaked().await
}

/// Finding 4 (the annotation): a changed refresh annotation used to make a new obtain at
/// once, whatever the backoff: three changes within a minute made three token requests.
/// Now the second waits for the minute, and the condition says until when.
async fn a_refresh_forced_with_the_annotation_runs_at_most_once_a_minute(world: Arc<World>) -> anyhow::Result<()> {
    const ANNOTATION: &str = "tasklist.camunda.community/refresh";
    // The default interval, which the other scenarios lift to drive refreshes.
    let namespace = world.control_plane.create_namespace("forced").await?;
    let kubeconfig = world.control_plane.kubeconfig();
    let operator = start_operator_with(kubeconfig, &namespace, &["--forced-refresh-interval=60s"], &[])?;
    let mut s = Scenario::with_operator(&world, &namespace, kubeconfig, operator).await?;
    s.add_saas_client(DEFAULT_CLIENT_SECRET).await?;
    s.apply_connection("orders", s.saas_spec()).await?;
    s.wait_ready("orders").await?;
    let tokens = || s.standin.token_requests().len();
    ensure!(tokens() == 1, "one token for a new connection, saw {}", tokens());
    s.annotate_connection("orders", ANNOTATION, "1").await?;
    wait_until("the first forced refresh", Duration::from_secs(30), || tokens() == 2).await?;
    s.annotate_connection("orders", ANNOTATION, "2").await?;
    let waiting = s
        .wait_for_connection(
            "orders",
            "a condition saying when the next refresh may run",
            Duration::from_secs(30),
            |c| find_condition(c, "Authenticated").is_some_and(|a| a.message.contains("at the earliest")),
        )
        .await?;
    let message = find_condition(&waiting, "Authenticated")
        .map(|a| a.message.clone())
        .unwrap_or_default();
    eprintln!("trust: forced refresh: {message}");
    s.annotate_connection("orders", ANNOTATION, "3").await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(
        tokens() == 2,
        "{} token requests: refreshes forced within a minute of the last one must wait",
        tokens()
    );
    // The last value asked for runs once the minute is over.
    wait_until("the forced refresh after the minute", Duration::from_secs(75), || tokens() == 3).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(tokens() == 3, "{} token requests after the minute; one was expected", tokens());
    s.assert_no_credential_leaked().await
}

/// Finding 8: a URL with `user:password@` went verbatim into status, Events, logs and the
/// derived Secret. The CRD refuses it, with the API server's message saying why.
async fn the_crd_refuses_a_url_with_user_info(world: Arc<World>) -> anyhow::Result<()> {
    let s = Scenario::start_saas(&world, "userinfo").await?;
    let mut spec = s.saas_spec();
    spec["url"] = json!("https://admin:hunter2secret@tasklist.example.com/abc");
    let refused = s.apply_connection("with-user-info", spec).await;
    let message = format!(
        "{:#}",
        refused.as_ref().err().context("the API server accepted a URL with user info")?
    );
    eprintln!("trust: the API server said: {message}");
    ensure!(
        message.contains("spec.url") && message.contains("must not hold a username or password"),
        "unexpected refusal: {message}"
    );
    let mut token_url = s.saas_spec();
    token_url["auth"]["oauth2"]["tokenUrl"] = json!("https://client:pw@login.example.com/oauth/token");
    ensure!(
        s.apply_connection("token-user-info", token_url).await.is_err(),
        "a tokenUrl with user info was accepted"
    );
    s.assert_no_credential_leaked().await
}

/// Finding 6: the discovery cache was one map keyed by the issuer only. Tenant A, who skips
/// certificate checks, reads an issuer's discovery document from an impostor (here: a
/// server whose certificate no one trusts) that names another token endpoint, one with a
/// certificate tenant B's `caSecretRef` trusts. Tenant B's connection to the same issuer
/// then sent its client secret to that endpoint without ever verifying the issuer: it
/// became Ready. Now discovered endpoints are kept per issuer and trust: B reads the
/// document itself, under its own trust, and reports the certificate failure; its secret
/// goes nowhere.
async fn a_discovered_endpoint_is_not_shared_between_trusts(world: Arc<World>) -> anyhow::Result<()> {
    let mut s = Scenario::start(&world, "disco-trust").await?;
    let tls = || {
        StandinTasklist::start_with(StandinOptions {
            tls: true,
            ..StandinOptions::default()
        })
    };
    // The issuer as A sees it: its certificate is signed by a CA nobody trusts.
    let impostor = tls().await?;
    // Tasklist and the token endpoint the impostor names; B's CA bundle trusts it.
    let elsewhere = tls().await?;
    elsewhere.add_client(CLIENT_ID, DEFAULT_CLIENT_SECRET);
    impostor.set_discovered_token_endpoint(&elsewhere.token_url());
    s.apply_secret("client", &[("client_id", CLIENT_ID), ("client_secret", DEFAULT_CLIENT_SECRET)])
        .await?;
    let trusted_ca = elsewhere.ca_pem().context("a TLS stand-in has a CA")?;
    s.apply_secret("b-ca", &[("ca.crt", &trusted_ca)]).await?;
    let spec = |tls: Value| {
        json!({
            "url": elsewhere.url(),
            "auth": {"oauth2": {"issuerUrl": impostor.issuer(), "clientSecretRef": {"name": "client"}}},
            "tls": tls,
        })
    };

    s.apply_connection("tenant-a", spec(json!({"insecureSkipVerify": true}))).await?;
    s.wait_ready("tenant-a").await?;
    ensure!(
        impostor.discovery_requests() == 1 && elsewhere.token_requests_arrived() == 1,
        "tenant A: {} discovery and {} token requests; expected one of each",
        impostor.discovery_requests(),
        elsewhere.token_requests_arrived()
    );

    s.apply_connection("tenant-b", spec(json!({"caSecretRef": {"name": "b-ca"}})))
        .await?;
    let b = s
        .wait_for_connection("tenant-b", "Authenticated False", Duration::from_secs(30), |c| {
            find_condition(c, "Authenticated").is_some_and(|c| c.status == "False")
        })
        .await?;
    let authenticated = find_condition(&b, "Authenticated").context("no Authenticated condition")?;
    eprintln!(
        "trust: tenant B after tenant A's discovery: Authenticated {} {}: {}",
        authenticated.status, authenticated.reason, authenticated.message
    );
    ensure!(
        authenticated.reason == "DiscoveryFailed",
        "tenant B: Authenticated {} {}: {:?}; expected its own discovery to fail on the issuer's certificate",
        authenticated.status,
        authenticated.reason,
        authenticated.message
    );
    let ready = find_condition(&b, "Ready").context("no Ready condition")?;
    ensure!(ready.status == "False", "tenant B is Ready: {:?}", ready.message);
    ensure!(
        elsewhere.token_requests_arrived() == 1,
        "tenant B's client secret went to the endpoint tenant A discovered ({} token requests there)",
        elsewhere.token_requests_arrived()
    );
    ensure!(
        s.derived_secret("tenant-b-tasklist-auth").await?.is_none(),
        "tenant B has a derived Secret"
    );
    s.assert_no_credential_leaked().await
}
