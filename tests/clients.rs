//! Camunda's own clients follow the derived Secret as the kubelet mounts it.
//!
//! The recipes in `examples/clients/` run in the real clients (`@camunda8/sdk` and
//! `io.camunda:camunda-client-java`, at the versions `hack/tools.sh` pins and fetches) as
//! child processes that call the stand-in Tasklist in a loop and print each call's status.
//! Meanwhile the test rotates the credential in a folder laid out as the kubelet lays out a
//! Secret volume, with what the operator writes into the Secret: every second a new one,
//! 20 times. Bearer tokens expire 4 s after they are issued; a Basic user is deleted and a
//! session logged out as soon as its successor is in the folder.
//!
//! Each recipe must get **no call refused**, and the stand-in must see every new credential
//! in turn and never an older one after a newer. The control runs (the client given the
//! token once, as the SDK's BEARER strategy takes it, with no recipe) must be refused.
//!
//! Needs `TLO_NODE`, `TLO_CAMUNDA_JS_SDK`, `TLO_JAVA`, `TLO_JAVAC` and `TLO_CAMUNDA_JAVA_CLIENT`
//! (from `eval "$(hack/tools.sh)"`, which `make test` runs); without them the tests fail.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jiff::Timestamp;
use tasklist_operator::camunda::Sensitive;
use tasklist_operator::camunda::login::Session;
use tasklist_operator::credential::Credential;
use tasklist_operator::derived_secret::StoredCredential;
use tasklist_operator::time::NEVER;
use tempfile::TempDir;
use testsupport::standin::{ApiRequestRecord, EndpointMode, StandinTasklist};
use testsupport::tools::spawn_supervised;

/// Credentials written after the first one.
const ROTATIONS: usize = 20;
const ROTATION_PERIOD: Duration = Duration::from_secs(1);
/// A token is replaced at least 3 s before it expires, so a client that follows the file
/// never sends an expired one (unless a call stalls that long between reading the file and
/// reaching the server).
const TOKEN_LIFETIME: Duration = Duration::from_secs(4);
/// The control runs rotate for twice the token lifetime: long enough for the token they were
/// given to expire.
const CONTROL_ROTATIONS: usize = 8;
/// How long the stand-in holds a request before checking a Basic or session credential.
const IN_FLIGHT: Duration = Duration::from_millis(200);
/// How long a client may take to start (a JVM on a busy machine) and to use a new credential.
const FIRST_CALL_TIMEOUT: Duration = Duration::from_secs(90);
const NEW_CREDENTIAL_TIMEOUT: Duration = Duration::from_secs(20);

const CLIENT_ID: &str = "app";
const CLIENT_SECRET: &str = "app-secret";
const USERNAME: &str = "demo";
const PASSWORD: &str = "demo-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sdk_recipes_follow_the_mounted_secret() {
    let client = |recipe| Client::Js { recipe };
    run_all(vec![
        Scenario::recipe("js bearer v1", client("bearer"), Auth::OAuth2, Api::V1),
        Scenario::recipe("js bearer v2", client("bearer"), Auth::OAuth2, Api::V2),
        Scenario::recipe("js headers basic v1", client("headers"), Auth::Basic, Api::V1),
        Scenario::recipe("js headers cookie v2", client("headers"), Auth::Cookie, Api::V2),
        Scenario::control("js once v1", client("once"), Api::V1),
        Scenario::control("js once v2", client("once"), Api::V2),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_client_recipe_follows_the_mounted_secret() {
    let client = |recipe| Client::Java { recipe };
    run_all(vec![
        Scenario::recipe("java bearer v2", client("recipe"), Auth::OAuth2, Api::V2),
        Scenario::recipe("java basic v2", client("recipe"), Auth::Basic, Api::V2),
        Scenario::recipe("java cookie v2", client("recipe"), Auth::Cookie, Api::V2),
        Scenario::control("java once v2", client("once"), Api::V2),
    ])
    .await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    OAuth2,
    Basic,
    Cookie,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// Tasklist's own API, `POST /v1/tasks/search`.
    V1,
    /// The Orchestration Cluster API, `POST /v2/user-tasks/search`.
    V2,
}

#[derive(Debug, Clone, Copy)]
enum Client {
    /// `tests/clients/js/loop.js` with this recipe (see there).
    Js { recipe: &'static str },
    /// `tests/clients/java/Loop.java` with this recipe (see there).
    Java { recipe: &'static str },
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    client: Client,
    auth: Auth,
    api: Api,
    /// The client is given the token once: it must be refused.
    control: bool,
}

impl Scenario {
    fn recipe(name: &'static str, client: Client, auth: Auth, api: Api) -> Self {
        Scenario {
            name,
            client,
            auth,
            api,
            control: false,
        }
    }

    fn control(name: &'static str, client: Client, api: Api) -> Self {
        Scenario {
            name,
            client,
            auth: Auth::OAuth2,
            api,
            control: true,
        }
    }
}

/// What a run saw: each call's status as the application saw it, the stand-in's records, and
/// the credentials written into the folder, in order (by the name the stand-in records them by).
struct Run {
    statuses: Vec<String>,
    requests: Vec<ApiRequestRecord>,
    written: Vec<String>,
    /// The first credential written once the client had made a call: it and every later one
    /// must be used.
    required_from: usize,
}

/// Runs the scenarios at once (each with its own stand-in, folder and client process), then
/// checks every one and fails with all the problems.
async fn run_all(scenarios: Vec<Scenario>) {
    let tools = ClientTools::from_env().unwrap_or_else(|error| panic!("{error:#}"));
    let runs = futures::future::join_all(scenarios.iter().map(|scenario| run(*scenario, &tools))).await;
    let mut problems = Vec::new();
    for (scenario, run) in scenarios.iter().zip(runs) {
        match run {
            Ok(run) => {
                let refused_by_standin = run.requests.iter().filter(|request| request.status == 401).count();
                println!(
                    "{}: {} calls, {} refused, {} credentials written, {} requests refused by the stand-in (retried)",
                    scenario.name,
                    run.statuses.len(),
                    refused(&run.statuses),
                    run.written.len(),
                    refused_by_standin
                );
                if let Err(problem) = check(scenario, &run) {
                    problems.push(format!("{}: {problem}", scenario.name));
                }
            }
            Err(error) => problems.push(format!("{}: {error:#}", scenario.name)),
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

fn check(scenario: &Scenario, run: &Run) -> Result<(), String> {
    let seen: Vec<Option<String>> = run.requests.iter().map(|request| request.credential.clone()).collect();
    if scenario.control {
        if refused(&run.statuses) == 0 {
            return Err(format!("the control run was never refused in {} calls", run.statuses.len()));
        }
        if seen.iter().any(|credential| Some(credential) != seen.first()) {
            return Err("the control run used more than the one credential it was given".into());
        }
        return Ok(());
    }
    if run.statuses.len() < run.written.len() {
        return Err(format!("only {} calls for {} credentials", run.statuses.len(), run.written.len()));
    }
    let refusals = refused(&run.statuses);
    if refusals > 0 {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for status in &run.statuses {
            *counts.entry(status.as_str()).or_default() += 1;
        }
        return Err(format!("{refusals} of {} calls failed: {counts:?}", run.statuses.len()));
    }
    // Tokens are replaced long before they expire: a recipe that notices the new file before
    // each call never needs the retry after a 401. Basic users and sessions are retired the
    // moment their successor is written, and the stand-in holds each request for a while
    // before it checks it, so some calls in flight then are refused: the retry must save them.
    let refused_by_standin = run.requests.iter().filter(|request| request.status == 401).count();
    match scenario.auth {
        Auth::OAuth2 if refused_by_standin > 0 => {
            return Err(format!(
                "the stand-in refused {refused_by_standin} requests: the recipe sent a token after its successor was in the folder"
            ));
        }
        Auth::Basic | Auth::Cookie if refused_by_standin == 0 => {
            return Err("no request was refused by the stand-in: the retry after a 401 was not exercised".into());
        }
        _ => {}
    }
    follows(&run.written, run.required_from, &seen)
}

/// Calls that did not succeed (any other answer than 200, or no answer).
fn refused(statuses: &[String]) -> usize {
    statuses.iter().filter(|status| status.as_str() != "200").count()
}

/// Whether the credentials the server saw, in the order requests came, follow the ones
/// written: none was used after a later one had been, and each from `required_from` on was
/// used. (Those before were written while the client started, and may be skipped.)
fn follows(written: &[String], required_from: usize, seen: &[Option<String>]) -> Result<(), String> {
    let rank: HashMap<&str, usize> = written.iter().enumerate().map(|(index, name)| (name.as_str(), index)).collect();
    let mut latest = 0;
    let mut used = vec![false; written.len()];
    for (call, credential) in seen.iter().enumerate() {
        let Some(index) = credential.as_deref().and_then(|name| rank.get(name)).copied() else {
            return Err(format!("request {call} carried an unknown credential ({credential:?})"));
        };
        if index < latest {
            return Err(format!(
                "request {call} carried credential #{index} after credential #{latest} had been used"
            ));
        }
        latest = index;
        used[index] = true;
    }
    match used.iter().enumerate().skip(required_from).find(|(_, used)| !**used) {
        Some((index, _)) => Err(format!("credential #{index} of {} was never used", written.len())),
        None => Ok(()),
    }
}

async fn run(scenario: Scenario, tools: &ClientTools) -> anyhow::Result<Run> {
    let standin = StandinTasklist::start().await?;
    standin.add_client(CLIENT_ID, CLIENT_SECRET);
    standin.add_user(USERNAME, PASSWORD);
    standin.set_token_lifetime(TOKEN_LIFETIME);
    if scenario.auth != Auth::OAuth2 {
        // A request spends this long in the stand-in before its credential is checked, so a
        // credential retired at a rotation catches calls in flight (see `check`).
        standin.set_api(EndpointMode::Slow(IN_FLIGHT));
    }
    let mut issuer = Issuer::new(&standin, scenario.auth, scenario.api);
    let mut volume = SecretVolume::new()?;

    let first = issuer.issue().await?;
    volume.write(&first.data)?;
    let mut client = ClientProcess::start(tools, scenario, volume.path(), &standin.url())?;
    // A client can take longer to start than a token lives (a JVM on a busy machine): keep
    // the folder fresh, as the operator does, until it has made its first call.
    let mut previous = first;
    let mut rotated = Instant::now();
    let start = Instant::now();
    while client.statuses_so_far().is_empty() {
        anyhow::ensure!(
            start.elapsed() < FIRST_CALL_TIMEOUT,
            "the client made no call within {FIRST_CALL_TIMEOUT:?}; its stderr:\n{}",
            client.stderr()
        );
        if rotated.elapsed() >= ROTATION_PERIOD {
            let next = issuer.issue().await?;
            volume.write(&next.data)?;
            issuer.retire(&previous).await?;
            previous = next;
            rotated = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut written = issuer.names.clone();
    // The client may have skipped credentials written while its first call was under way.
    let required_from = written.len() - 1;
    if !scenario.control {
        wait_until_used(&standin, &previous.name, NEW_CREDENTIAL_TIMEOUT, &client).await?;
    }

    let rotations = if scenario.control { CONTROL_ROTATIONS } else { ROTATIONS };
    for _ in 0..rotations {
        tokio::time::sleep(ROTATION_PERIOD).await;
        let next = issuer.issue().await?;
        volume.write(&next.data)?;
        issuer.retire(&previous).await?;
        written.push(next.name.clone());
        if !scenario.control {
            wait_until_used(&standin, &next.name, NEW_CREDENTIAL_TIMEOUT, &client).await?;
        }
        previous = next;
    }
    let statuses = client.stop().await?;
    Ok(Run {
        statuses,
        requests: standin.api_requests(),
        written,
        required_from,
    })
}

/// Waits until the stand-in has accepted a request with `credential`.
async fn wait_until_used(standin: &StandinTasklist, credential: &str, timeout: Duration, client: &ClientProcess) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let used = standin
            .api_requests()
            .iter()
            .any(|request| request.status == 200 && request.credential.as_deref() == Some(credential));
        if used {
            return Ok(());
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "no request with credential {credential} accepted within {timeout:?}; the client printed {:?}; its stderr:\n{}",
                client.statuses_so_far().iter().rev().take(10).collect::<Vec<_>>(),
                client.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A credential as the operator would store it, and the name the stand-in records it by.
struct Issued {
    name: String,
    data: BTreeMap<String, String>,
    /// The `Cookie` header of a session, to log it out.
    cookie: Option<String>,
}

/// Obtains credentials from the stand-in as the operator does, and retires them.
struct Issuer {
    standin: StandinTasklist,
    auth: Auth,
    api: Api,
    http: reqwest::Client,
    /// The name of every credential issued, in order.
    names: Vec<String>,
}

impl Issuer {
    fn new(standin: &StandinTasklist, auth: Auth, api: Api) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a plain HTTP client builds");
        Issuer {
            standin: standin.clone(),
            auth,
            api,
            http,
            names: Vec::new(),
        }
    }

    async fn issue(&mut self) -> anyhow::Result<Issued> {
        let number = self.names.len() + 1;
        let now = Timestamp::now();
        let (credential, name, cookie, lifetime) = match self.auth {
            Auth::OAuth2 => {
                // On SaaS the Orchestration Cluster API wants tokens for zeebe.camunda.io.
                let audience = match self.api {
                    Api::V1 => "tasklist.camunda.io",
                    Api::V2 => "zeebe.camunda.io",
                };
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", CLIENT_ID),
                    ("client_secret", CLIENT_SECRET),
                    ("audience", audience),
                ];
                let response = self
                    .http
                    .post(self.standin.token_url())
                    .form(&form)
                    .send()
                    .await?
                    .error_for_status()?;
                let body: serde_json::Value = response.json().await?;
                let token = body["access_token"]
                    .as_str()
                    .ok_or_else(|| anyhow::anyhow!("no access_token"))?
                    .to_owned();
                let name = jwt_id(&token)?;
                (Credential::Bearer(Sensitive::new(token)), name, None, Some(TOKEN_LIFETIME))
            }
            Auth::Basic => {
                let username = format!("user-{number}");
                let password = format!("password-{number}");
                self.standin.accept_basic(&username, &password);
                let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
                (Credential::Basic(Sensitive::new(format!("Basic {encoded}"))), username, None, None)
            }
            Auth::Cookie => {
                let response = self
                    .http
                    .post(format!("{}/api/login", self.standin.url()))
                    .form(&[("username", USERNAME), ("password", PASSWORD)])
                    .send()
                    .await?
                    .error_for_status()?;
                let cookies: Vec<(String, Sensitive)> = response
                    .headers()
                    .get_all(reqwest::header::SET_COOKIE)
                    .iter()
                    .filter_map(|value| value.to_str().ok())
                    .filter_map(|value| value.split(';').next()?.split_once('='))
                    .map(|(name, value)| (name.to_owned(), Sensitive::new(value)))
                    .collect();
                let csrf = response
                    .headers()
                    .get("X-CSRF-TOKEN")
                    .and_then(|value| value.to_str().ok())
                    .map(Sensitive::new);
                let session = Session::new(cookies, csrf);
                let cookie = session.cookie_header().expose().to_owned();
                // The stand-in numbers sessions in login order, and each issue logs in once.
                let name = format!("session-{number}");
                (Credential::Session(session), name, Some(cookie), None)
            }
        };
        let stored = StoredCredential {
            credential,
            issued_at: now,
            expires_at: lifetime.map_or(NEVER, |lifetime| now + lifetime),
            refresh_at: now,
            inputs: String::new(),
        };
        self.names.push(name.clone());
        Ok(Issued {
            name,
            data: stored.secret_data(&self.standin.url()),
            cookie,
        })
    }

    /// Makes a replaced credential unusable where it does not expire by itself: the Basic user
    /// is deleted, the session logged out. (Tokens expire.)
    async fn retire(&self, issued: &Issued) -> anyhow::Result<()> {
        match self.auth {
            Auth::OAuth2 => {}
            Auth::Basic => self.standin.forget_basic(&issued.name),
            Auth::Cookie => {
                let cookie = issued.cookie.clone().unwrap_or_default();
                self.http
                    .post(format!("{}/api/logout", self.standin.url()))
                    .header(reqwest::header::COOKIE, cookie)
                    .send()
                    .await?
                    .error_for_status()?;
            }
        }
        Ok(())
    }
}

/// The `jti` of a JWT (unchecked): the name the stand-in records a bearer token by.
fn jwt_id(token: &str) -> anyhow::Result<String> {
    let payload = token.split('.').nth(1).ok_or_else(|| anyhow::anyhow!("the token is not a JWT"))?;
    let claims: serde_json::Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    claims["jti"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("the token has no jti"))
}

/// A folder laid out as the kubelet lays out a Secret volume (its `AtomicWriter`): the data in
/// a timestamped folder `..2006_01_02_15_04_05.<n>`, the symlink `..data` pointing to it and
/// swapped atomically (a new symlink `..data_tmp` renamed over it), and each key a symlink
/// `<key> -> ..data/<key>`. The previous timestamped folder is removed after the swap.
struct SecretVolume {
    dir: TempDir,
    current: Option<PathBuf>,
    writes: usize,
}

impl SecretVolume {
    fn new() -> std::io::Result<Self> {
        Ok(SecretVolume {
            dir: tempfile::Builder::new().prefix("tasklist-secret-volume-").tempdir()?,
            current: None,
            writes: 0,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&mut self, data: &BTreeMap<String, String>) -> std::io::Result<()> {
        self.writes += 1;
        let root = self.dir.path();
        let name = format!("..{}.{:09}", Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S"), self.writes);
        let folder = root.join(&name);
        std::fs::create_dir(&folder)?;
        for (key, value) in data {
            std::fs::write(folder.join(key), value)?;
        }
        let staged = root.join("..data_tmp");
        symlink(&name, &staged)?;
        std::fs::rename(&staged, root.join("..data"))?;
        for key in data.keys() {
            let link = root.join(key);
            if link.symlink_metadata().is_err() {
                symlink(Path::new("..data").join(key), &link)?;
            }
        }
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if !file_name.starts_with("..") && !data.contains_key(&file_name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        if let Some(previous) = self.current.replace(folder) {
            std::fs::remove_dir_all(previous)?;
        }
        Ok(())
    }
}

/// Where the clients and their runtimes are, from `hack/tools.sh`.
struct ClientTools {
    node: PathBuf,
    js_sdk: PathBuf,
    java: PathBuf,
    /// The recipe and the loop, compiled against the Java client.
    java_classpath: OsString,
    _java_classes: TempDir,
}

impl ClientTools {
    fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str| -> anyhow::Result<PathBuf> {
            let value = std::env::var_os(name).filter(|value| !value.is_empty()).ok_or_else(|| {
                anyhow::anyhow!(
                    "{name} is not set: run `make test`, or `eval \"$(hack/tools.sh)\"` before `cargo test` (it fetches the clients)"
                )
            })?;
            let path = PathBuf::from(value);
            anyhow::ensure!(path.exists(), "{name}={} does not exist: run hack/tools.sh", path.display());
            Ok(path)
        };
        let node = var("TLO_NODE")?;
        let js_sdk = var("TLO_CAMUNDA_JS_SDK")?;
        anyhow::ensure!(
            js_sdk.join("@camunda8/sdk/package.json").is_file(),
            "TLO_CAMUNDA_JS_SDK={} holds no @camunda8/sdk: run hack/tools.sh",
            js_sdk.display()
        );
        let java = var("TLO_JAVA")?;
        let javac = var("TLO_JAVAC")?;
        let java_client = var("TLO_CAMUNDA_JAVA_CLIENT")?;
        let classes = tempfile::Builder::new().prefix("tasklist-java-recipes-").tempdir()?;
        let library = java_client.join("*").into_os_string();
        let output = Command::new(&javac)
            .arg("-d")
            .arg(classes.path())
            .arg("-cp")
            .arg(&library)
            .arg(repo().join("examples/clients/java/MountedSecretCredentialsProvider.java"))
            .arg(repo().join("tests/clients/java/Loop.java"))
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "javac failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut java_classpath = classes.path().as_os_str().to_owned();
        java_classpath.push(":");
        java_classpath.push(&library);
        Ok(ClientTools {
            node,
            js_sdk,
            java,
            java_classpath,
            _java_classes: classes,
        })
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A client calling in a loop; its stdout lines (one status per call) are collected as they come.
struct ClientProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    statuses: Arc<Mutex<Vec<String>>>,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
}

impl ClientProcess {
    fn start(tools: &ClientTools, scenario: Scenario, volume: &Path, url: &str) -> anyhow::Result<Self> {
        let mut command = match scenario.client {
            Client::Js { recipe } => {
                let mut command = Command::new(&tools.node);
                command
                    .env("NODE_PATH", &tools.js_sdk)
                    .env("RECIPE_JS", repo().join("examples/clients/js/mounted-secret.js"))
                    .arg(repo().join("tests/clients/js/loop.js"))
                    .arg(recipe)
                    .arg(match scenario.api {
                        Api::V1 => "v1",
                        Api::V2 => "v2",
                    });
                command
            }
            Client::Java { recipe } => {
                let mut command = Command::new(&tools.java);
                command
                    // Starts faster; the loop needs no optimised code.
                    .arg("-XX:TieredStopAtLevel=1")
                    .arg("-cp")
                    .arg(&tools.java_classpath)
                    .arg("Loop")
                    .arg(recipe);
                command
            }
        };
        // Both clients also read CAMUNDA_* and ZEEBE_* settings from the environment.
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("CAMUNDA_") || text.starts_with("ZEEBE_") {
                command.env_remove(&name);
            }
        }
        command
            .arg(volume)
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_supervised(command, false)?;
        let stdin = child.stdin.take();
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let lines = statuses.clone();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|poison| poison.into_inner()).push(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let text = stderr.clone();
            std::thread::spawn(move || {
                let mut buffer = String::new();
                let _ = pipe.read_to_string(&mut buffer);
                text.lock().unwrap_or_else(|poison| poison.into_inner()).push_str(&buffer);
            });
        }
        Ok(ClientProcess {
            child,
            stdin,
            statuses,
            stdout_reader: Some(stdout_reader),
            stderr,
        })
    }

    fn statuses_so_far(&self) -> Vec<String> {
        self.statuses.lock().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    /// Closes the client's stdin, which ends its loop, and returns every status it printed.
    async fn stop(&mut self) -> anyhow::Result<Vec<String>> {
        drop(self.stdin.take());
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("the client did not stop within 30 s of its stdin closing");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(reader) = self.stdout_reader.take() {
            let _ = reader.join();
        }
        Ok(self.statuses_so_far())
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod follows_tests {
    use super::follows;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    fn seen(list: &[&str]) -> Vec<Option<String>> {
        list.iter().map(|name| Some(name.to_string())).collect()
    }

    #[test]
    fn every_credential_used_in_order_follows() {
        assert_eq!(follows(&names(&["a", "b", "c"]), 0, &seen(&["a", "a", "b", "c", "c"])), Ok(()));
    }

    #[test]
    fn an_older_credential_after_a_newer_does_not_follow() {
        let problem = follows(&names(&["a", "b", "c"]), 0, &seen(&["a", "b", "a", "c"])).unwrap_err();
        assert!(problem.contains("credential #0 after credential #1"), "{problem}");
    }

    #[test]
    fn credentials_written_while_the_client_started_may_be_skipped() {
        assert_eq!(follows(&names(&["a", "b", "c", "d"]), 2, &seen(&["a", "c", "d"])), Ok(()));
        let problem = follows(&names(&["a", "b", "c", "d"]), 2, &seen(&["a", "b", "d"])).unwrap_err();
        assert!(problem.contains("credential #2 of 4 was never used"), "{problem}");
    }

    #[test]
    fn a_credential_never_used_does_not_follow() {
        let problem = follows(&names(&["a", "b", "c"]), 0, &seen(&["a", "c"])).unwrap_err();
        assert!(problem.contains("credential #1 of 3 was never used"), "{problem}");
    }

    #[test]
    fn an_unknown_or_missing_credential_does_not_follow() {
        assert!(follows(&names(&["a"]), 0, &seen(&["a", "x"])).is_err());
        assert!(follows(&names(&["a"]), 0, &[None]).is_err());
        assert!(follows(&names(&["a", "b"]), 0, &[]).is_err());
    }
}
