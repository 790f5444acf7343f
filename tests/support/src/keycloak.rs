//! A real Keycloak for end-to-end tests: the unpacked distribution from `TLO_KEYCLOAK_HOME`
//! in dev mode with an in-memory database, configured through its admin REST API with the
//! realm Camunda uses and one confidential client whose tokens are meant for Tasklist.
//!
//! Federated client authentication (Keycloak 26.4+, supported from 26.6) is switched on:
//! [`Keycloak::add_kubernetes_identity_provider`] trusts a cluster's ServiceAccount issuer
//! and [`ClientAuthenticator::Federated`] binds a client to one ServiceAccount's subject.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::tools::{self, Tools};

/// The realm Camunda's Helm chart creates, so issuer URLs look like production ones.
pub const REALM: &str = "camunda-platform";
/// The audience Tasklist checks for; an audience mapper on the client adds it to access tokens.
pub const TASKLIST_AUDIENCE: &str = "tasklist-api";
/// The confidential client the tests log in with (client-credentials grant).
const CLIENT_ID: &str = "tasklist-e2e-client";
/// The features federated client authentication with Kubernetes ServiceAccounts needs
/// (preview in 26.4 and 26.5, enabled by default from 26.6; naming them does no harm).
const FEATURES: &str = "client-auth-federated,kubernetes-service-accounts";
/// Keycloak's own default access token lifespan.
const DEFAULT_ACCESS_TOKEN_LIFESPAN_SECONDS: u32 = 300;
/// The context path Camunda's Helm chart gives Keycloak.
const RELATIVE_PATH: &str = "/auth";
/// Dev mode on two busy cores needs ~1 minute, plus ~1 more when it rebuilds its configuration.
const STARTUP_DEADLINE: Duration = Duration::from_secs(240);
const LOG: &str = "keycloak.log";
const BOOTSTRAP_ADMIN: &str = "admin";

/// A running Keycloak with realm [`REALM`] and a client for Tasklist. See the module docs.
pub struct Keycloak {
    /// `kc.sh`, leader of a process group that also holds the JVM (kc.sh does not exec it).
    process: Child,
    port: u16,
    admin_password: String,
    /// Keycloak's internal id of the client, used in admin API paths.
    client_uuid: String,
    /// The current secret. Leaked on purpose: [`Keycloak::client_secret`] hands out `&str`
    /// while [`Keycloak::rotate_client_secret`] replaces it through `&self`; a few leaked
    /// bytes per rotation are the price of that simple signature.
    client_secret: Mutex<&'static str>,
    http: reqwest::Client,
    /// The log and the transaction store; removed on drop, after the processes are gone.
    workdir: TempDir,
}

impl Keycloak {
    /// Starts Keycloak on a free loopback port and creates realm [`REALM`] (access tokens live
    /// 300 s) with a confidential client that may use the client-credentials grant and whose
    /// access tokens carry the audience [`TASKLIST_AUDIENCE`].
    pub async fn start(tools: &Tools) -> anyhow::Result<Keycloak> {
        Self::start_on(tools, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// [`Keycloak::start`], listening on `host`. The node tests use 0.0.0.0 in their own
    /// network namespace: Pods reach it at the node's address (see [`Keycloak::token_url_at`]),
    /// while the tests and the admin API keep using 127.0.0.1, because Keycloak refuses the
    /// master realm to non-local clients (403).
    pub async fn start_on(tools: &Tools, host: std::net::Ipv4Addr) -> anyhow::Result<Keycloak> {
        Self::start_with(tools, host, None).await
    }

    /// [`Keycloak::start`], trusting `ca_pem` besides the JVM's CAs for its own outgoing
    /// HTTPS (a Kubernetes API server's discovery document and JWKS).
    pub async fn start_trusting(tools: &Tools, ca_pem: &str) -> anyhow::Result<Keycloak> {
        Self::start_with(tools, std::net::Ipv4Addr::LOCALHOST, Some(ca_pem)).await
    }

    async fn start_with(tools: &Tools, host: std::net::Ipv4Addr, ca_pem: Option<&str>) -> anyhow::Result<Keycloak> {
        let started = Instant::now();
        let workdir = tools::fixture_workdir("keycloak")?;
        let port = tools::free_loopback_port()?;
        let admin_password = random_password();
        // No idle connections are kept: a pooled connection belongs to the tokio runtime that
        // opened it and breaks when that runtime ends, and a shared Keycloak outlives the
        // runtimes of the tests that use it.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(30))
            .build()?;

        // Dev mode may rebuild the distribution's configuration (in lib/quarkus) while starting;
        // two starts doing that at once could corrupt it, so starts take turns.
        let start_lock = lock_distribution(&tools.keycloak_home, STARTUP_DEADLINE).await?;
        let truststore = match ca_pem {
            Some(pem) => {
                let path = workdir.path().join("truststore.pem");
                std::fs::write(&path, pem).with_context(|| format!("cannot write {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let process = spawn_keycloak(tools, workdir.path(), host, port, &admin_password, truststore.as_deref())?;
        let mut keycloak = Keycloak {
            process,
            port,
            admin_password,
            client_uuid: String::new(),
            client_secret: Mutex::new(""),
            http,
            workdir,
        };
        keycloak.wait_until_ready().await?;
        drop(start_lock);

        keycloak
            .create_realm_and_client()
            .await
            .map_err(|error| keycloak.failure_with_logs(error))?;
        eprintln!(
            "testsupport: Keycloak ready at {} in {:.1}s",
            keycloak.base_url(),
            started.elapsed().as_secs_f64()
        );
        Ok(keycloak)
    }

    /// `http://127.0.0.1:PORT/auth`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}{RELATIVE_PATH}", self.port)
    }

    pub fn issuer(&self) -> String {
        format!("{}/realms/{REALM}", self.base_url())
    }

    pub fn token_url(&self) -> String {
        format!("{}/protocol/openid-connect/token", self.issuer())
    }

    /// The token endpoint at `address` instead of 127.0.0.1 (with [`Keycloak::start_on`]).
    pub fn token_url_at(&self, address: std::net::Ipv4Addr) -> String {
        self.token_url().replacen("127.0.0.1", &address.to_string(), 1)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/protocol/openid-connect/certs", self.issuer())
    }

    pub fn client_id(&self) -> &str {
        CLIENT_ID
    }

    /// The client's current secret (after [`Keycloak::rotate_client_secret`], the new one).
    pub fn client_secret(&self) -> &str {
        *self.client_secret.lock().expect("client secret lock poisoned")
    }

    /// Has Keycloak generate a new client secret, which invalidates the old one at once,
    /// and returns it.
    pub async fn rotate_client_secret(&self) -> anyhow::Result<String> {
        let url = format!(
            "{}/admin/realms/{REALM}/clients/{}/client-secret",
            self.base_url(),
            self.client_uuid
        );
        let response = self.admin_request(reqwest::Method::POST, &url).await?.send().await;
        let credential: Value = json_of(response, "regenerate the client secret").await?;
        let secret = secret_value(&credential)?;
        *self.client_secret.lock().expect("client secret lock poisoned") = String::leak(secret.clone());
        Ok(secret)
    }

    /// Sets how long new access tokens of the realm are valid.
    pub async fn set_access_token_lifespan(&self, seconds: u32) -> anyhow::Result<()> {
        let url = format!("{}/admin/realms/{REALM}", self.base_url());
        // A partial representation: Keycloak updates only the fields present.
        let request = self.admin_request(reqwest::Method::PUT, &url).await?;
        let response = request.json(&json!({ "accessTokenLifespan": seconds })).send().await;
        success(response, "set the access token lifespan").await?;
        Ok(())
    }

    /// The last `lines` lines of Keycloak's log, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        format!("==> {LOG} <==\n{}", tools::tail_of_file(&self.workdir.path().join(LOG), lines))
    }

    fn failure_with_logs(&self, error: anyhow::Error) -> anyhow::Error {
        anyhow!("{error:#}\n{}", self.logs_tail(60))
    }

    async fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        let http = self.http.clone();
        let url = format!("{}/realms/master/.well-known/openid-configuration", self.base_url());
        let ready = async || {
            let response = http.get(&url).timeout(Duration::from_secs(5)).send().await;
            response.is_ok_and(|response| response.status().is_success())
        };
        let result = tools::wait_until_ready(&mut self.process, "Keycloak", STARTUP_DEADLINE, ready).await;
        result.map_err(|error| self.failure_with_logs(error))
    }

    /// Creates another confidential client in [`REALM`] for the client-credentials grant,
    /// with the audience [`TASKLIST_AUDIENCE`], that authenticates with `authenticator`.
    /// Returns its secret (`None` for [`ClientAuthenticator::SignedJwt`]).
    pub async fn add_client(&self, client_id: &str, authenticator: &ClientAuthenticator) -> anyhow::Result<Option<String>> {
        let mut client = client_representation(client_id);
        match authenticator {
            ClientAuthenticator::Secret => {}
            ClientAuthenticator::SignedJwt { jwks } => {
                client["clientAuthenticatorType"] = json!("client-jwt");
                client["attributes"] = json!({
                    "use.jwks.url": "false",
                    "use.jwks.string": "true",
                    "jwks.string": jwks.to_string(),
                });
            }
            ClientAuthenticator::Federated {
                identity_provider,
                subject,
            } => {
                client["clientAuthenticatorType"] = json!("federated-jwt");
                client["attributes"] = json!({
                    "jwt.credential.issuer": identity_provider,
                    "jwt.credential.sub": subject,
                });
            }
        }
        let clients_url = format!("{}/admin/realms/{REALM}/clients", self.base_url());
        let request = self.admin_request(reqwest::Method::POST, &clients_url).await?;
        let created = success(request.json(&client).send().await, "create a client").await?;
        if !matches!(authenticator, ClientAuthenticator::Secret) {
            return Ok(None);
        }
        let uuid = created_id(&created)?;
        let secret_url = format!("{clients_url}/{uuid}/client-secret");
        let request = self.admin_request(reqwest::Method::GET, &secret_url).await?;
        let credential: Value = json_of(request.send().await, "read the client secret").await?;
        Ok(Some(secret_value(&credential)?))
    }

    /// Creates a Kubernetes identity provider `alias` in [`REALM`] that trusts ServiceAccount
    /// tokens of `issuer`: Keycloak reads `<issuer>/.well-known/openid-configuration` and the
    /// JWKS it names to verify them ("Signed JWT - Federated" clients name the alias).
    pub async fn add_kubernetes_identity_provider(&self, alias: &str, issuer: &str) -> anyhow::Result<()> {
        let url = format!("{}/admin/realms/{REALM}/identity-provider/instances", self.base_url());
        let provider = json!({
            "alias": alias,
            "providerId": "kubernetes",
            "enabled": true,
            "config": { "issuer": issuer },
        });
        let request = self.admin_request(reqwest::Method::POST, &url).await?;
        success(request.json(&provider).send().await, "create the Kubernetes identity provider").await?;
        Ok(())
    }

    /// Points identity provider `alias` at another issuer: tokens of the old one are no
    /// longer trusted (Keycloak finds the identity provider by the token's issuer).
    pub async fn set_identity_provider_issuer(&self, alias: &str, issuer: &str) -> anyhow::Result<()> {
        let url = format!("{}/admin/realms/{REALM}/identity-provider/instances/{alias}", self.base_url());
        let request = self.admin_request(reqwest::Method::GET, &url).await?;
        let mut provider: Value = json_of(request.send().await, "read the identity provider").await?;
        provider["config"]["issuer"] = json!(issuer);
        let request = self.admin_request(reqwest::Method::PUT, &url).await?;
        success(request.json(&provider).send().await, "change the identity provider's issuer").await?;
        Ok(())
    }

    /// Sets attributes of client `client_id` (merged into the ones it has), e.g.
    /// `jwt.credential.sub` (its federated subject) or `access.token.lifespan` (seconds).
    pub async fn set_client_attributes(&self, client_id: &str, attributes: Value) -> anyhow::Result<()> {
        let clients_url = format!("{}/admin/realms/{REALM}/clients", self.base_url());
        let request = self.admin_request(reqwest::Method::GET, &clients_url).await?;
        let found: Value = json_of(request.query(&[("clientId", client_id)]).send().await, "find the client").await?;
        let mut client = found.get(0).cloned().with_context(|| format!("no client {client_id}"))?;
        let uuid = client["id"].as_str().context("the client has no id")?.to_owned();
        let Some(new) = attributes.as_object() else {
            bail!("client attributes must be a JSON object");
        };
        for (key, value) in new {
            client["attributes"][key] = value.clone();
        }
        let request = self.admin_request(reqwest::Method::PUT, &format!("{clients_url}/{uuid}")).await?;
        success(request.json(&client).send().await, "update the client's attributes").await?;
        Ok(())
    }

    async fn create_realm_and_client(&mut self) -> anyhow::Result<()> {
        let base = self.base_url();
        let realm = json!({
            "realm": REALM,
            "enabled": true,
            "accessTokenLifespan": DEFAULT_ACCESS_TOKEN_LIFESPAN_SECONDS,
            // Plain HTTP also from Pods on the node tests' bridge; the default ("external")
            // accepts it only from loopback and private ranges, and 198.18/15 is neither.
            "sslRequired": "none",
        });
        let request = self.admin_request(reqwest::Method::POST, &format!("{base}/admin/realms")).await?;
        success(request.json(&realm).send().await, "create the realm").await?;

        let client = client_representation(CLIENT_ID);
        let clients_url = format!("{base}/admin/realms/{REALM}/clients");
        let request = self.admin_request(reqwest::Method::POST, &clients_url).await?;
        let created = success(request.json(&client).send().await, "create the client").await?;
        self.client_uuid = created_id(&created)?;

        let secret_url = format!("{clients_url}/{}/client-secret", self.client_uuid);
        let request = self.admin_request(reqwest::Method::GET, &secret_url).await?;
        let credential: Value = json_of(request.send().await, "read the client secret").await?;
        *self.client_secret.get_mut().expect("client secret lock poisoned") = String::leak(secret_value(&credential)?);
        Ok(())
    }

    /// A request to the admin API with a fresh token of the bootstrap admin (master realm
    /// tokens live only a minute, so none is kept).
    async fn admin_request(&self, method: reqwest::Method, url: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        let token_url = format!("{}/realms/master/protocol/openid-connect/token", self.base_url());
        let form = [
            ("grant_type", "password"),
            ("client_id", "admin-cli"),
            ("username", BOOTSTRAP_ADMIN),
            ("password", self.admin_password.as_str()),
        ];
        let response = self.http.post(&token_url).form(&form).send().await;
        let token: Value = json_of(response, "log in as the bootstrap admin").await?;
        let access_token = token["access_token"]
            .as_str()
            .context("the admin token response has no access_token")?;
        Ok(self.http.request(method, url).bearer_auth(access_token))
    }
}

/// How a client created with [`Keycloak::add_client`] authenticates at the token endpoint.
pub enum ClientAuthenticator {
    /// Keycloak's "client-secret" authenticator, which takes the secret in the body
    /// (client_secret_post) or in an HTTP Basic header (client_secret_basic).
    Secret,
    /// Keycloak's "client-jwt" authenticator (private_key_jwt), checking assertions against
    /// this JWK Set (its `jwks.string` attribute).
    SignedJwt { jwks: Value },
    /// Keycloak's "federated-jwt" authenticator ("Signed JWT - Federated"): a token issued by
    /// `identity_provider` (an alias, see [`Keycloak::add_kubernetes_identity_provider`])
    /// whose subject is `subject` (`system:serviceaccount:<namespace>:<name>`).
    Federated { identity_provider: String, subject: String },
}

/// A confidential client for the client-credentials grant whose access tokens carry the
/// audience [`TASKLIST_AUDIENCE`].
fn client_representation(client_id: &str) -> Value {
    json!({
        "clientId": client_id,
        "enabled": true,
        "protocol": "openid-connect",
        "publicClient": false,
        "clientAuthenticatorType": "client-secret",
        "serviceAccountsEnabled": true,
        "standardFlowEnabled": false,
        "implicitFlowEnabled": false,
        "directAccessGrantsEnabled": false,
        "protocolMappers": [{
            "name": "tasklist-api audience",
            "protocol": "openid-connect",
            "protocolMapper": "oidc-audience-mapper",
            "config": {
                "included.custom.audience": TASKLIST_AUDIENCE,
                "access.token.claim": "true",
                "introspection.token.claim": "true",
                "id.token.claim": "false",
            },
        }],
    })
}

impl Drop for Keycloak {
    fn drop(&mut self) {
        // kc.sh runs the JVM as its child: kill the whole group, then reap kc.sh.
        tools::kill_process_group(&self.process);
        tools::kill_and_reap(&mut self.process);
    }
}

fn spawn_keycloak(
    tools: &Tools,
    workdir: &Path,
    host: std::net::Ipv4Addr,
    port: u16,
    admin_password: &str,
    truststore: Option<&Path>,
) -> anyhow::Result<Child> {
    let java_home = tools
        .keycloak_java
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("TLO_KEYCLOAK_JAVA={} is not inside a JDK's bin/", tools.keycloak_java.display()))?;
    let java = write_java_launcher(workdir, &tools.keycloak_java)?;
    let mut transaction_store = std::ffi::OsString::from("-Dquarkus.transaction-manager.object-store.directory=");
    transaction_store.push(workdir.join("transaction-logs"));

    let mut command = Command::new(tools.keycloak_home.join("bin/kc.sh"));
    command
        .arg("start-dev")
        .arg(format!("--http-port={port}"))
        .arg(format!("--http-host={host}"))
        .arg(format!("--http-relative-path={RELATIVE_PATH}"))
        .arg("--db=dev-mem")
        .arg(format!("--features={FEATURES}"))
        // By default the transaction log goes to data/ in the distribution, a shared cache.
        .arg(transaction_store)
        .args(truststore.map(|path| {
            let mut flag = std::ffi::OsString::from("--truststore-paths=");
            flag.push(path);
            flag
        }))
        .env("JAVA_HOME", java_home)
        .env("JAVA", &java)
        .env("KC_BOOTSTRAP_ADMIN_USERNAME", BOOTSTRAP_ADMIN)
        .env("KC_BOOTSTRAP_ADMIN_PASSWORD", admin_password)
        .current_dir(workdir)
        .stdin(std::process::Stdio::null());
    let (stdout, stderr) = tools::log_file_stdio(&workdir.join(LOG))?;
    command.stdout(stdout).stderr(stderr);
    tools::spawn_supervised(command, true).context("cannot run Keycloak's bin/kc.sh")
}

/// kc.sh starts the JVM as a background child instead of exec-ing it, so the parent-death
/// signal set on kc.sh would not reach the JVM if the test process died. kc.sh runs `$JAVA`
/// when set: this launcher gives the JVM its own parent-death signal via util-linux's
/// `setpriv` (when installed; otherwise only the process-group kill on drop protects).
fn write_java_launcher(workdir: &Path, java: &Path) -> anyhow::Result<PathBuf> {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(Path::new)
        .find(|path| path.exists());
    let exec = match setpriv {
        Some(setpriv) => format!("exec '{}' --pdeathsig KILL -- '{}' \"$@\"", setpriv.display(), java.display()),
        None => format!("exec '{}' \"$@\"", java.display()),
    };
    let path = workdir.join("java");
    std::fs::write(&path, format!("#!/bin/sh\n{exec}\n"))
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Takes an exclusive `flock` on a lock file in the Keycloak distribution, waiting up to
/// `deadline`. The lock is released when the returned file is dropped (or the process dies).
async fn lock_distribution(keycloak_home: &Path, deadline: Duration) -> anyhow::Result<File> {
    let path = keycloak_home.join(".tasklist-e2e-start.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let started = Instant::now();
    loop {
        // SAFETY: plain syscall on a descriptor `file` owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::WouldBlock {
            return Err(error).with_context(|| format!("cannot lock {}", path.display()));
        }
        if started.elapsed() >= deadline {
            bail!("another Keycloak kept {} locked for {deadline:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Fails unless the request went through and Keycloak answered with a 2xx status; the error
/// includes Keycloak's answer, which says what it did not like.
async fn success(response: reqwest::Result<reqwest::Response>, action: &str) -> anyhow::Result<reqwest::Response> {
    let response = response.with_context(|| format!("cannot {action}: request failed"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    bail!("cannot {action}: Keycloak answered {status}: {body}")
}

async fn json_of(response: reqwest::Result<reqwest::Response>, action: &str) -> anyhow::Result<Value> {
    let response = success(response, action).await?;
    response
        .json()
        .await
        .with_context(|| format!("cannot {action}: the answer is not JSON"))
}

fn secret_value(credential: &Value) -> anyhow::Result<String> {
    credential["value"]
        .as_str()
        .map(str::to_string)
        .context("Keycloak's client-secret answer has no value")
}

fn random_password() -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// The id Keycloak gave a client it just created: only in the Location header,
/// `.../clients/{id}`.
fn created_id(created: &reqwest::Response) -> anyhow::Result<String> {
    Ok(created
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|location| location.to_str().ok())
        .and_then(|location| location.rsplit('/').next())
        .context("Keycloak created the client but sent no Location header")?
        .to_string())
}
