//! `tasklist-operator check`: the credential and probe flow once, without a cluster, so a
//! user can see a connection work (or why it does not) before applying it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use serde::Deserialize as _;

use crate::camunda::discovery;
use crate::camunda::probe::{Probe, ProbeOutcome};
use crate::camunda::token::TokenLocation;
use crate::camunda::{AuthFailure, HttpClient, HttpSettings};
use crate::crd::{ClientAuthentication, TasklistConnection};
use crate::credential::Credential;
use crate::inputs::{LoginMaterial, SecretSource, read_inputs};
use crate::obtain::obtain_credential;
use crate::reason::Reason;
use crate::service_account_token::ServiceAccountTokens;
use crate::time::{NEVER, rfc3339, since};

/// Exit codes, so scripts can tell the failures apart.
pub mod exit {
    /// Tasklist accepted the credential.
    pub const ACCEPTED: u8 = 0;
    /// No credential: the inputs were incomplete, or the token endpoint or login refused or failed.
    pub const NO_CREDENTIAL: u8 = 1;
    /// A credential was obtained, but Tasklist did not accept it or could not be reached.
    pub const NOT_ACCEPTED: u8 = 2;
    /// The files given could not be used.
    pub const USAGE: u8 = 3;
}

/// Environment variables read when a referenced Secret is not among the manifests.
pub const ENVIRONMENT: [(&str, &str); 4] = [
    ("client_id", "TASKLIST_CLIENT_ID"),
    ("client_secret", "TASKLIST_CLIENT_SECRET"),
    ("username", "TASKLIST_USERNAME"),
    ("password", "TASKLIST_PASSWORD"),
];

/// Secrets from manifests, falling back to the environment.
struct ManifestSecrets {
    secrets: BTreeMap<String, Secret>,
    from_environment: Secret,
    /// With `ServiceAccountToken`: the cluster of the kubeconfig (`KUBECONFIG` or
    /// ~/.kube/config), in the manifest's namespace or the kubeconfig's.
    service_account_tokens: Option<ServiceAccountTokens>,
}

impl SecretSource for ManifestSecrets {
    async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        if let Some(secret) = self.secrets.get(name) {
            return Ok(Some(secret.clone()));
        }
        let has_any = self.from_environment.data.as_ref().is_some_and(|data| !data.is_empty());
        Ok(has_any.then(|| self.from_environment.clone()))
    }

    fn service_account_tokens(&self) -> Option<ServiceAccountTokens> {
        self.service_account_tokens.clone()
    }
}

/// Runs the check and writes what happened to `out`; returns the exit code.
pub async fn run(connection_file: &Path, credentials_file: Option<&Path>, settings: &HttpSettings, out: &mut impl Write) -> u8 {
    match check(connection_file, credentials_file, settings, out).await {
        Ok(code) => code,
        Err(message) => {
            let _ = writeln!(out, "error: {message}");
            exit::USAGE
        }
    }
}

async fn check(
    connection_file: &Path,
    credentials_file: Option<&Path>,
    settings: &HttpSettings,
    out: &mut impl Write,
) -> Result<u8, String> {
    let mut documents = read_documents(connection_file)?;
    if let Some(file) = credentials_file {
        documents.extend(read_documents(file)?);
    }
    let connection = documents
        .iter()
        .find(|doc| doc.get("kind").and_then(|k| k.as_str()) == Some("TasklistConnection"))
        .ok_or_else(|| format!("{} holds no TasklistConnection", connection_file.display()))?;
    let connection: TasklistConnection =
        serde_json::from_value(connection.clone()).map_err(|error| format!("the TasklistConnection is not valid: {error}"))?;
    let secrets: BTreeMap<String, Secret> = documents
        .iter()
        .filter(|doc| doc.get("kind").and_then(|k| k.as_str()) == Some("Secret"))
        .filter_map(|doc| serde_json::from_value::<Secret>(doc.clone()).ok())
        .filter_map(|secret| Some((secret.metadata.name.clone()?, with_string_data_merged(secret))))
        .collect();
    let service_account_tokens = match &connection.spec.auth.oauth2 {
        Some(oauth2) if oauth2.client_authentication == ClientAuthentication::ServiceAccountToken => {
            Some(kubeconfig_tokens(connection.metadata.namespace.as_deref()).await?)
        }
        _ => None,
    };
    let source = ManifestSecrets {
        secrets,
        from_environment: environment_secret(),
        service_account_tokens,
    };

    let name = connection.metadata.name.as_deref().unwrap_or("<unnamed>");
    say(
        out,
        &format!(
            "connection {name} ({}), Tasklist at {}",
            connection.spec.auth.method_name(),
            connection.spec.url
        ),
    );
    let inputs = match read_inputs(&connection, &source).await {
        Ok(Ok(inputs)) => inputs,
        Ok(Err(problem)) => {
            say(out, &format!("credentials: {} ({})", problem.message, problem.reason));
            say(
                out,
                "  give the Secret with --credentials secret.yaml, or set TASKLIST_CLIENT_ID/TASKLIST_CLIENT_SECRET or TASKLIST_USERNAME/TASKLIST_PASSWORD",
            );
            return Ok(exit::NO_CREDENTIAL);
        }
        Err(error) => return Err(error.to_string()),
    };
    // The operator's host policy, before anything is sent: a check passes only where the
    // operator would send the same requests.
    if let Some(policy) = &settings.policy
        && let Err(why) = policy.check_connection(&connection).await
    {
        say(out, &format!("policy: {why} ({})", Reason::NotAllowed));
        say(
            out,
            "  nothing was sent; the flags --allowed-hosts, --allow-loopback, --allow-http and --allow-insecure-tls set the policy, as for `run`",
        );
        return Ok(exit::NO_CREDENTIAL);
    }
    let http = HttpClient::new(settings, &inputs.trust).map_err(|error| format!("TLS settings: {error}"))?;
    if inputs.trust.insecure_skip_verify {
        say(out, "warning: tls.insecureSkipVerify is on: server certificates are not verified");
    }

    if let LoginMaterial::OAuth2 { endpoint, .. } = &inputs.login
        && let TokenLocation::Issuer(issuer) = &endpoint.location
    {
        say(out, &format!("discovery: GET {}", discovery::discovery_url(issuer)));
        let started = Instant::now();
        match discovery::token_endpoint(&http, issuer).await {
            Ok(url) => say(out, &format!("  ok in {} ms: token endpoint {url}", started.elapsed().as_millis())),
            Err(failure) => {
                say_failure(out, started, &failure);
                return Ok(exit::NO_CREDENTIAL);
            }
        }
    }
    let what = match &inputs.login {
        LoginMaterial::OAuth2 { endpoint, client } => {
            let audience = if endpoint.audience.is_empty() {
                "no audience".to_owned()
            } else {
                format!("audience {:?}", endpoint.audience)
            };
            let scope = endpoint
                .scope
                .as_deref()
                .filter(|scope| !scope.is_empty())
                .map(|scope| format!(", scope {scope:?}"))
                .unwrap_or_default();
            format!(
                "token: POST {} ({:?} body, {}, {audience}{scope})",
                endpoint.location.describe(&http),
                endpoint.encoding,
                client.describe()
            )
        }
        // No value of a Secret is printed, not even the username.
        LoginMaterial::Cookie { login, .. } => format!("login: POST {} with the username and password given", login.login_url),
        LoginMaterial::Basic { .. } => {
            "basic: HTTP Basic with the username and password given; nothing to obtain, it does not expire".to_owned()
        }
    };
    say(out, &what);
    let started = Instant::now();
    let stored = match obtain_credential(&inputs, &http).await {
        Ok(stored) => stored,
        Err(failure) => {
            say_failure(out, started, &failure);
            return Ok(exit::NO_CREDENTIAL);
        }
    };
    let kind = match &stored.credential {
        Credential::Bearer(_) => "an access token".to_owned(),
        Credential::Basic(_) => "an Authorization header".to_owned(),
        Credential::Session(session) => {
            let names: Vec<&str> = session.cookies.iter().map(|(name, _)| name.as_str()).collect();
            let csrf = if session.csrf_token.is_some() { "with" } else { "without" };
            format!("a session (cookies {}; {csrf} a CSRF token)", names.join(", "))
        }
    };
    let lifetime = if stored.expires_at == NEVER {
        "which does not expire".to_owned()
    } else {
        format!(
            "valid until {} ({} s), would be refreshed at {}",
            rfc3339(stored.expires_at),
            since(stored.expires_at, stored.issued_at).as_secs(),
            rfc3339(stored.refresh_at)
        )
    };
    say(out, &format!("  ok in {} ms: {kind}, {lifetime}", started.elapsed().as_millis()));

    let probe = Probe::new(&connection.spec.url, &connection.spec.probe, http.facts());
    if !connection.spec.probe.enabled {
        say(out, "probe: disabled in the spec; running it once anyway");
    }
    say(out, &format!("probe: {}", probe.describe()));
    let started = Instant::now();
    let outcome = probe.run(&http, stored.credential.as_probe_credential()).await;
    say(
        out,
        &format!(
            "  after {} ms: {}",
            started.elapsed().as_millis(),
            outcome.message(&probe.describe())
        ),
    );
    if outcome == ProbeOutcome::Succeeded {
        say(out, "Tasklist accepts the credential");
        Ok(exit::ACCEPTED)
    } else {
        Ok(exit::NOT_ACCEPTED)
    }
}

/// ServiceAccount tokens from the cluster of the kubeconfig (`KUBECONFIG` or
/// ~/.kube/config), whose user must be allowed to create `serviceaccounts/token`, in
/// `namespace` or else the kubeconfig's namespace.
async fn kubeconfig_tokens(namespace: Option<&str>) -> Result<ServiceAccountTokens, String> {
    let config = kube::Config::infer().await.map_err(|error| {
        format!("auth.oauth2.clientAuthentication ServiceAccountToken: the token is requested from a cluster, but no kubeconfig could be read ({error})")
    })?;
    let namespace = namespace.unwrap_or(&config.default_namespace).to_owned();
    let client = kube::Client::try_from(config).map_err(|error| format!("cannot use the kubeconfig: {error}"))?;
    Ok(ServiceAccountTokens::new(client, namespace))
}

/// A step that failed: how long it took, what the server said and the condition reason
/// the operator would report.
fn say_failure(out: &mut impl Write, started: Instant, failure: &AuthFailure) {
    let reason = Reason::of_auth_failure(failure);
    say(
        out,
        &format!(
            "  failed after {} ms: {} ({reason})",
            started.elapsed().as_millis(),
            failure.message
        ),
    );
}

fn say(out: &mut impl Write, line: &str) {
    let _ = writeln!(out, "{line}");
}

fn read_documents(path: &Path) -> Result<Vec<serde_json::Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document).map_err(|error| format!("{} is not YAML: {error}", path.display()))?;
        if value.is_null() {
            continue;
        }
        documents.push(serde_json::to_value(value).map_err(|error| format!("{}: {error}", path.display()))?);
    }
    Ok(documents)
}

/// A Secret manifest may use `stringData`; the API server would merge it into `data`.
fn with_string_data_merged(mut secret: Secret) -> Secret {
    if let Some(string_data) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (key, value) in string_data {
            data.insert(key, ByteString(value.into_bytes()));
        }
    }
    secret
}

fn environment_secret() -> Secret {
    let data: BTreeMap<String, ByteString> = ENVIRONMENT
        .iter()
        .filter_map(|(key, variable)| Some((key.to_string(), ByteString(std::env::var(variable).ok()?.into_bytes()))))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some("environment".into()),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..Secret::default()
    }
}
