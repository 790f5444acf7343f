//! What a connection's credential is made from: the spec and the referenced Secrets, read
//! only from the connection's own namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use sha2::{Digest, Sha256};

use crate::camunda::assertion::AssertionKey;
use crate::camunda::login::{CookieLogin, LoginCredentials};
use crate::camunda::token::{ClientCredentials, ClientProof, TokenEndpoint, TokenLocation};
use crate::camunda::{Sensitive, TlsTrust, join_url};
use crate::crd::{ClientAuthentication, OAuth2Spec, TasklistConnection, TasklistConnectionSpec};
use crate::reason::Reason;
use crate::service_account_token::{ServiceAccountTokens, default_audience};
use crate::time::parse_duration;

/// How to obtain a credential, with the values read from the referenced Secret.
#[derive(Debug, Clone)]
pub enum LoginMaterial {
    OAuth2 {
        endpoint: TokenEndpoint,
        client: ClientCredentials,
    },
    Cookie {
        login: CookieLogin,
        credentials: LoginCredentials,
        session_timeout: Duration,
    },
    /// HTTP Basic: the `Authorization` header value is the credential; nothing to obtain.
    Basic { username: String, authorization: Sensitive },
}

/// Everything needed to obtain and check a credential.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub login: LoginMaterial,
    pub trust: TlsTrust,
    pub refresh_before: Option<Duration>,
    pub probe_interval: Duration,
    /// The connection says every consumer Pod of its Secret is nudged (a shorter margin).
    pub all_consumers_nudged: bool,
    /// Changes whenever the spec, a referenced Secret or the refresh annotation changes.
    pub fingerprint: String,
}

impl Inputs {
    /// The summary of inputs read in full, as [`summarize`] would give it for the same
    /// versions. The TLS trust is in `self.trust`, so `ca_version` stays unset.
    pub fn summary(&self) -> InputsSummary {
        let (session_timeout, token_endpoint, basic) = match &self.login {
            LoginMaterial::Cookie { session_timeout, .. } => (Some(*session_timeout), None, false),
            LoginMaterial::OAuth2 { endpoint, .. } => (None, Some(endpoint.clone()), false),
            LoginMaterial::Basic { .. } => (None, None, true),
        };
        InputsSummary {
            fingerprint: self.fingerprint.clone(),
            refresh_before: self.refresh_before,
            probe_interval: self.probe_interval,
            all_consumers_nudged: self.all_consumers_nudged,
            session_timeout,
            token_endpoint,
            basic,
            insecure_skip_verify: self.trust.insecure_skip_verify,
            ca_version: None,
        }
    }
}

/// Why the inputs could not be read; `reason` is the Authenticated condition's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputProblem {
    pub reason: Reason,
    pub message: String,
}

/// The problems both [`read_inputs`] and [`summarize`] find, worded once.
impl InputProblem {
    pub(crate) fn secret_not_found(name: &str) -> Self {
        InputProblem {
            reason: Reason::SecretNotFound,
            message: format!("Secret {name:?} not found in the connection's namespace"),
        }
    }

    fn no_auth_method() -> Self {
        InputProblem {
            reason: Reason::InvalidSpec,
            message: "auth has neither oauth2 nor cookie".into(),
        }
    }

    fn no_client_secret_ref() -> Self {
        InputProblem {
            reason: Reason::InvalidSpec,
            message: "auth.oauth2.clientSecretRef is required, except with clientAuthentication ServiceAccountToken".into(),
        }
    }

    fn no_client_assertion() -> Self {
        InputProblem {
            reason: Reason::InvalidSpec,
            message: "auth.oauth2.clientAuthentication ServiceAccountToken needs auth.oauth2.clientAssertion".into(),
        }
    }

    fn no_assertion_key() -> Self {
        InputProblem {
            reason: Reason::InvalidSpec,
            message: "auth.oauth2.clientAuthentication PrivateKeyJwt needs auth.oauth2.clientAssertionKeyRef".into(),
        }
    }
}

/// Something that can fetch Secrets by name from the connection's namespace.
pub trait SecretSource {
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Secret>, kube::Error>> + Send;

    /// Requests ServiceAccount tokens in the connection's namespace, for
    /// `ServiceAccountToken`; None where no cluster is at hand.
    fn service_account_tokens(&self) -> Option<ServiceAccountTokens> {
        None
    }
}

impl SecretSource for Api<Secret> {
    async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        self.get_opt(name).await
    }
}

/// The result of reading inputs: a Kubernetes API failure is not the user's problem and
/// is retried by the controller; an `InputProblem` is reported in status.
pub type ReadResult = Result<Result<Inputs, InputProblem>, kube::Error>;

pub async fn read_inputs(connection: &TasklistConnection, secrets: &impl SecretSource) -> ReadResult {
    match read(connection, secrets).await {
        Ok(inputs) => Ok(Ok(inputs)),
        Err(ReadError::Problem(problem)) => Ok(Err(problem)),
        Err(ReadError::Kube(error)) => Err(error),
    }
}

/// Either kind of failure, so that `read` can use `?` for both.
enum ReadError {
    Kube(kube::Error),
    Problem(InputProblem),
}

impl From<kube::Error> for ReadError {
    fn from(error: kube::Error) -> Self {
        ReadError::Kube(error)
    }
}

impl From<InputProblem> for ReadError {
    fn from(problem: InputProblem) -> Self {
        ReadError::Problem(problem)
    }
}

async fn read(connection: &TasklistConnection, secrets: &impl SecretSource) -> Result<Inputs, ReadError> {
    let spec = &connection.spec;
    let mut reader = SecretReader {
        secrets,
        read: BTreeMap::new(),
        versions: BTreeMap::new(),
    };

    let login = if let Some(cookie) = &spec.auth.cookie {
        let reference = &cookie.credentials_secret_ref;
        let username = reader.value(&reference.name, &reference.username_key).await?;
        let password = reader.value(&reference.name, &reference.password_key).await?;
        LoginMaterial::Cookie {
            login: CookieLogin {
                login_url: join_url(&spec.url, &cookie.login_path),
            },
            credentials: LoginCredentials {
                username: username.expose().to_owned(),
                password,
            },
            session_timeout: duration_field("auth.cookie.sessionTimeout", &cookie.session_timeout)?,
        }
    } else if let Some(basic) = &spec.auth.basic {
        let reference = &basic.credentials_secret_ref;
        let username = reader.value(&reference.name, &reference.username_key).await?;
        let password = reader.value(&reference.name, &reference.password_key).await?;
        // RFC 7617: the user-id cannot contain a colon, the password can.
        if username.expose().contains(':') {
            return Err(InputProblem {
                reason: Reason::InvalidCredentials,
                message: format!(
                    "Secret {:?} key {:?}: a username for HTTP Basic cannot contain ':'",
                    reference.name, reference.username_key
                ),
            }
            .into());
        }
        let encoded = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:{}", username.expose(), password.expose()),
        );
        LoginMaterial::Basic {
            username: username.expose().to_owned(),
            authorization: Sensitive::new(format!("Basic {encoded}")),
        }
    } else if let Some(oauth2) = &spec.auth.oauth2 {
        LoginMaterial::OAuth2 {
            endpoint: token_endpoint(oauth2)?,
            client: client_credentials(oauth2, &mut reader).await?,
        }
    } else {
        return Err(InputProblem::no_auth_method().into());
    };

    let tls = spec.tls.clone().unwrap_or_default();
    let extra_roots_pem = match &tls.ca_secret_ref {
        Some(reference) => Some(reader.value(&reference.name, &reference.key).await?.expose().to_owned()),
        None => None,
    };
    let client_identity_pem = match &tls.client_certificate_secret_ref {
        Some(reference) => {
            let certificate = reader.value(&reference.name, "tls.crt").await?;
            let key = reader.value(&reference.name, "tls.key").await?;
            Some(Sensitive::new(format!("{}\n{}\n", certificate.expose(), key.expose())))
        }
        None => None,
    };
    let (refresh_before, probe_interval) = schedule_fields(spec)?;

    Ok(Inputs {
        login,
        trust: TlsTrust {
            extra_roots_pem,
            insecure_skip_verify: tls.insecure_skip_verify,
            client_identity_pem,
        },
        refresh_before,
        probe_interval,
        all_consumers_nudged: connection.says_all_consumers_nudged(),
        fingerprint: fingerprint(connection, &reader.versions),
    })
}

/// What a connection's credential is made from, known without reading any Secret's
/// values: the spec, and the uid and resourceVersion of each Secret it reads (which the
/// metadata watch of Secrets has). Enough to tell whether the stored credential still fits,
/// to probe with it and to describe it; the values are read only to obtain a new one.
#[derive(Debug, Clone)]
pub struct InputsSummary {
    /// Equal to [`Inputs::fingerprint`] of the same spec and Secret versions.
    pub fingerprint: String,
    pub refresh_before: Option<Duration>,
    pub probe_interval: Duration,
    /// The connection says every consumer Pod of its Secret is nudged (a shorter margin).
    pub all_consumers_nudged: bool,
    /// The cookie login's session timeout.
    pub session_timeout: Option<Duration>,
    /// The token endpoint (oauth2 only), for messages.
    pub token_endpoint: Option<TokenEndpoint>,
    /// HTTP Basic: the credential is the user's own login, nothing to obtain again.
    pub basic: bool,
    pub insecure_skip_verify: bool,
    /// The name, key, uid and resourceVersion of the CA bundle Secret and of the client
    /// certificate Secret, when `tls.caSecretRef` or `tls.clientCertificateSecretRef` is
    /// set: the TLS settings change exactly when this does.
    pub ca_version: Option<String>,
}

/// The [`InputsSummary`] of `connection`, with the uid and resourceVersion of each Secret
/// from `version_of` (None: no such Secret). A missing Secret or a spec the operator cannot
/// read is the same [`InputProblem`] that [`read_inputs`] gives; a missing key shows only
/// when the values are read.
pub fn summarize(
    connection: &TasklistConnection,
    version_of: impl Fn(&str) -> Option<(String, String)>,
) -> Result<InputsSummary, InputProblem> {
    let spec = &connection.spec;
    let mut versions = BTreeMap::new();
    // In the order `read` meets them, so that the first problem is the one it reports.
    let mut look_up = |name: &str| match version_of(name) {
        Some(version) => {
            versions.insert(name.to_owned(), version);
            Ok(())
        }
        None => Err(InputProblem::secret_not_found(name)),
    };
    let (mut session_timeout, mut token_endpoint_of_spec, mut basic) = (None, None, false);
    if let Some(cookie) = &spec.auth.cookie {
        look_up(&cookie.credentials_secret_ref.name)?;
        session_timeout = Some(duration_field("auth.cookie.sessionTimeout", &cookie.session_timeout)?);
    } else if let Some(credentials) = &spec.auth.basic {
        look_up(&credentials.credentials_secret_ref.name)?;
        basic = true;
    } else if let Some(oauth2) = &spec.auth.oauth2 {
        token_endpoint_of_spec = Some(token_endpoint(oauth2)?);
        if oauth2.client_authentication == ClientAuthentication::ServiceAccountToken {
            // No Secret: the ServiceAccount's token is requested when a credential is.
            assertion_audience(oauth2)?;
        } else {
            let Some(reference) = &oauth2.client_secret_ref else {
                return Err(InputProblem::no_client_secret_ref());
            };
            look_up(&reference.name)?;
        }
        if oauth2.client_authentication == ClientAuthentication::PrivateKeyJwt {
            let Some(key_ref) = &oauth2.client_assertion_key_ref else {
                return Err(InputProblem::no_assertion_key());
            };
            look_up(&key_ref.name)?;
        }
    } else {
        return Err(InputProblem::no_auth_method());
    }
    let tls = spec.tls.clone().unwrap_or_default();
    if let Some(reference) = &tls.ca_secret_ref {
        look_up(&reference.name)?;
    }
    if let Some(reference) = &tls.client_certificate_secret_ref {
        look_up(&reference.name)?;
    }
    let version_of = |name: &str, key: &str| {
        let (uid, version) = versions.get(name).cloned().unwrap_or_default();
        format!("{name}/{key}/{uid}/{version}")
    };
    let tls_versions: Vec<String> = [
        tls.ca_secret_ref
            .as_ref()
            .map(|reference| version_of(&reference.name, &reference.key)),
        tls.client_certificate_secret_ref
            .as_ref()
            .map(|reference| format!("client:{}", version_of(&reference.name, "tls.crt"))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let ca_version = (!tls_versions.is_empty()).then(|| tls_versions.join(","));
    let (refresh_before, probe_interval) = schedule_fields(spec)?;
    Ok(InputsSummary {
        fingerprint: fingerprint(connection, &versions),
        refresh_before,
        probe_interval,
        all_consumers_nudged: connection.says_all_consumers_nudged(),
        session_timeout,
        token_endpoint: token_endpoint_of_spec,
        basic,
        insecure_skip_verify: tls.insecure_skip_verify,
        ca_version,
    })
}

fn token_endpoint(oauth2: &OAuth2Spec) -> Result<TokenEndpoint, InputProblem> {
    let location = match (&oauth2.token_url, &oauth2.issuer_url) {
        (Some(url), None) => TokenLocation::Url(url.clone()),
        (None, Some(issuer)) => TokenLocation::Issuer(issuer.clone()),
        // The schema rejects both and neither; a CRD installed without its rules may not.
        _ => {
            return Err(InputProblem {
                reason: Reason::InvalidSpec,
                message: "exactly one of auth.oauth2.tokenUrl or auth.oauth2.issuerUrl must be set".into(),
            });
        }
    };
    Ok(TokenEndpoint {
        location,
        audience: oauth2.audience.clone(),
        scope: oauth2.scope.clone(),
        encoding: oauth2.request_encoding,
    })
}

/// The audience of the ServiceAccount token: `clientAssertion.audience`, or the default
/// for the token endpoint ([`default_audience`]).
fn assertion_audience(oauth2: &OAuth2Spec) -> Result<String, InputProblem> {
    let Some(assertion) = &oauth2.client_assertion else {
        return Err(InputProblem::no_client_assertion());
    };
    let default = || default_audience(oauth2.token_url.as_deref(), oauth2.issuer_url.as_deref());
    assertion.audience.clone().or_else(default).ok_or_else(|| InputProblem {
        reason: Reason::InvalidSpec,
        message: "auth.oauth2.clientAssertion.audience has no default for this tokenUrl (neither Keycloak's \
                  .../protocol/openid-connect/token nor Microsoft Entra ID): set the audience the identity provider expects"
            .into(),
    })
}

async fn client_credentials<S: SecretSource>(
    oauth2: &OAuth2Spec,
    reader: &mut SecretReader<'_, S>,
) -> Result<ClientCredentials, ReadError> {
    if oauth2.client_authentication == ClientAuthentication::ServiceAccountToken {
        let audience = assertion_audience(oauth2)?;
        let Some(assertion) = &oauth2.client_assertion else {
            return Err(InputProblem::no_client_assertion().into());
        };
        let Some(tokens) = reader.secrets.service_account_tokens() else {
            return Err(InputProblem {
                reason: Reason::InvalidSpec,
                message: "auth.oauth2.clientAuthentication ServiceAccountToken needs a Kubernetes API server to request the \
                          token from, and none is at hand"
                    .into(),
            }
            .into());
        };
        return Ok(ClientCredentials {
            client_id: oauth2.client_id.clone().unwrap_or_default(),
            proof: ClientProof::WorkloadIdentity(tokens.of(&assertion.service_account_ref.name, &audience)),
        });
    }
    let Some(reference) = &oauth2.client_secret_ref else {
        return Err(InputProblem::no_client_secret_ref().into());
    };
    let client_id = reader.value(&reference.name, &reference.client_id_key).await?.expose().to_owned();
    let proof = match oauth2.client_authentication {
        ClientAuthentication::Body => ClientProof::SecretInBody(reader.value(&reference.name, &reference.client_secret_key).await?),
        ClientAuthentication::Basic => ClientProof::SecretInBasicHeader(reader.value(&reference.name, &reference.client_secret_key).await?),
        // Returned above, before any Secret is read.
        ClientAuthentication::ServiceAccountToken => return Err(InputProblem::no_client_assertion().into()),
        ClientAuthentication::PrivateKeyJwt => {
            let Some(key_ref) = &oauth2.client_assertion_key_ref else {
                return Err(InputProblem::no_assertion_key().into());
            };
            let pem = reader.value(&key_ref.name, &key_ref.key).await?;
            let invalid = |key: &str, problem: String| InputProblem {
                reason: Reason::InvalidClientKey,
                message: format!("Secret {:?} key {key:?} {problem}", key_ref.name),
            };
            let mut key = AssertionKey::from_pem(pem.expose(), key_ref.key_id.clone()).map_err(|problem| invalid(&key_ref.key, problem))?;
            if let Some(certificate_key) = &key_ref.certificate_key {
                let certificate = reader.value(&key_ref.name, certificate_key).await?;
                key = key
                    .with_certificate(certificate.expose())
                    .map_err(|problem| invalid(certificate_key, problem))?;
            }
            ClientProof::PrivateKeyJwt(key)
        }
    };
    Ok(ClientCredentials { client_id, proof })
}

/// Each Secret `connection` names: the field that names it, the Secret's name and the keys
/// read of it, in the order of the spec. A key reference without `PrivateKeyJwt` is listed
/// too: it names a Secret, even if it is not read. The one walk over the references; the
/// functions below take what they need of it.
fn references(connection: &TasklistConnection) -> impl Iterator<Item = (&'static str, &str, [Option<&str>; 2])> {
    let spec = &connection.spec;
    let auth = &spec.auth;
    let oauth2 = auth.oauth2.as_ref();
    let tls = spec.tls.as_ref();
    // Nothing here allocates: the Secret watch asks `reads_secret` of every connection of a
    // namespace at each change of one of its Secrets.
    [
        oauth2.and_then(|o| o.client_secret_ref.as_ref()).map(|client| {
            let keys = [Some(client.client_id_key.as_str()), Some(client.client_secret_key.as_str())];
            ("spec.auth.oauth2.clientSecretRef", client.name.as_str(), keys)
        }),
        oauth2.and_then(|o| o.client_assertion_key_ref.as_ref()).map(|r| {
            let keys = [Some(r.key.as_str()), r.certificate_key.as_deref()];
            ("spec.auth.oauth2.clientAssertionKeyRef", r.name.as_str(), keys)
        }),
        auth.cookie.as_ref().map(|c| {
            let login = &c.credentials_secret_ref;
            let keys = [Some(login.username_key.as_str()), Some(login.password_key.as_str())];
            ("spec.auth.cookie.credentialsSecretRef", login.name.as_str(), keys)
        }),
        auth.basic.as_ref().map(|b| {
            let login = &b.credentials_secret_ref;
            let keys = [Some(login.username_key.as_str()), Some(login.password_key.as_str())];
            ("spec.auth.basic.credentialsSecretRef", login.name.as_str(), keys)
        }),
        tls.and_then(|tls| tls.ca_secret_ref.as_ref())
            .map(|r| ("spec.tls.caSecretRef", r.name.as_str(), [Some(r.key.as_str()), None])),
        tls.and_then(|tls| tls.client_certificate_secret_ref.as_ref()).map(|r| {
            (
                "spec.tls.clientCertificateSecretRef",
                r.name.as_str(),
                [Some("tls.crt"), Some("tls.key")],
            )
        }),
    ]
    .into_iter()
    .flatten()
}

/// Whether `connection` reads the Secret `name` (any of [`referenced_secret_names`]).
pub fn reads_secret(connection: &TasklistConnection, name: &str) -> bool {
    references(connection).any(|(_, referenced, _)| referenced == name)
}

/// Each Secret a connection reads, with the keys it reads of it: only those are kept in
/// memory between reads.
pub fn referenced_keys(connection: &TasklistConnection) -> BTreeMap<String, BTreeSet<String>> {
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, name, read) in references(connection) {
        keys.entry(name.to_owned())
            .or_default()
            .extend(read.into_iter().flatten().map(str::to_owned));
    }
    keys
}

/// Each Secret `connection` names, with the field that names it, in the order of the spec
/// (see [`references`]).
pub fn secret_references(connection: &TasklistConnection) -> Vec<(&'static str, String)> {
    references(connection).map(|(field, name, _)| (field, name.to_owned())).collect()
}

/// The names of the Secrets a connection reads, sorted and each once (which values to keep
/// after a relist; a Secret change is mapped to connections by [`reads_secret`]).
pub fn referenced_secret_names(connection: &TasklistConnection) -> Vec<String> {
    let mut names: Vec<String> = secret_references(connection).into_iter().map(|(_, name)| name).collect();
    names.sort();
    names.dedup();
    names
}

/// The label by which whoever manages a Secret lets the TasklistConnections of its
/// namespace use it, when the operator runs with `--require-secret-opt-in` (for clusters
/// without the chart's admission policy, which checks the author's own permission).
pub const ALLOW_REFERENCE_LABEL: &str = "tasklist.camunda.community/allow-reference";

/// Whether a Secret with these labels may be used by TasklistConnections: the opt-in
/// label's value is exactly `"true"`.
pub fn allows_reference(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|labels| labels.get(ALLOW_REFERENCE_LABEL))
        .is_some_and(|value| value == "true")
}

/// With `--require-secret-opt-in`: the problem of the first Secret `connection` references
/// that does not carry the opt-in label, told from metadata alone, before any value is
/// read. `opted_in` answers for a Secret by name (None: there is no such Secret, which the
/// inputs report as `SecretNotFound`).
pub fn secret_opt_in_problem(connection: &TasklistConnection, opted_in: impl Fn(&str) -> Option<bool>) -> Option<InputProblem> {
    let (field, name) = secret_references(connection)
        .into_iter()
        .find(|(_, name)| opted_in(name) == Some(false))?;
    Some(InputProblem {
        reason: Reason::SecretNotOptedIn,
        message: format!(
            "Secret {name:?} ({field}) does not carry the label {ALLOW_REFERENCE_LABEL}: \"true\", which this operator \
             requires (--require-secret-opt-in) before it reads a Secret for a TasklistConnection; nothing was read or sent. \
             Whoever manages the Secret can add the label"
        ),
    })
}

struct SecretReader<'a, S> {
    secrets: &'a S,
    /// Each Secret is read once, so that all its keys come from the same version.
    read: BTreeMap<String, Option<Secret>>,
    /// name -> (uid, resourceVersion) of every Secret read, for the fingerprint.
    versions: BTreeMap<String, (String, String)>,
}

impl<S: SecretSource> SecretReader<'_, S> {
    async fn value(&mut self, name: &str, key: &str) -> Result<Sensitive, ReadError> {
        if !self.read.contains_key(name) {
            let secret = self.secrets.get(name).await?;
            self.read.insert(name.to_owned(), secret);
        }
        let Some(secret) = self.read.get(name).cloned().flatten() else {
            return Err(InputProblem::secret_not_found(name).into());
        };
        self.versions.insert(
            name.to_owned(),
            (
                secret.metadata.uid.clone().unwrap_or_default(),
                secret.metadata.resource_version.clone().unwrap_or_default(),
            ),
        );
        let missing = |what: &str| InputProblem {
            reason: Reason::SecretKeyMissing,
            message: format!("Secret {name:?} {what} key {key:?}"),
        };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|data| data.get(key))
            .map(|value| value.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|data| data.get(key))
                    .map(|v| v.clone().into_bytes())
            });
        let Some(bytes) = bytes else {
            return Err(missing("has no").into());
        };
        let Ok(text) = String::from_utf8(bytes) else {
            return Err(missing("has a non-UTF-8 value under").into());
        };
        // `echo secret > file` adds a newline that is never part of the value.
        let value = text.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(missing("has an empty value under").into());
        }
        Ok(Sensitive::new(value))
    }
}

/// `refreshBefore` and `probe.interval` (at least a second).
fn schedule_fields(spec: &TasklistConnectionSpec) -> Result<(Option<Duration>, Duration), InputProblem> {
    let refresh_before = spec
        .refresh_before
        .as_deref()
        .map(|text| duration_field("refreshBefore", text))
        .transpose()?;
    let probe_interval = duration_field("probe.interval", &spec.probe.interval)?.max(Duration::from_secs(1));
    Ok((refresh_before, probe_interval))
}

fn duration_field(field: &str, text: &str) -> Result<Duration, InputProblem> {
    parse_duration(text).map_err(|message| InputProblem {
        reason: Reason::InvalidSpec,
        message: format!("{field}: {message}"),
    })
}

/// A hash of what the credential depends on. It holds no credential material: Secrets
/// enter it only by uid and resourceVersion, which change whenever their data does.
fn fingerprint(connection: &TasklistConnection, secret_versions: &BTreeMap<String, (String, String)>) -> String {
    let material = serde_json::json!({
        "spec": connection.spec,
        "refresh": connection.refresh_request(),
        "secrets": secret_versions,
    });
    let digest = Sha256::digest(material.to_string().as_bytes());
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;
    use std::sync::Mutex;

    struct FakeSecrets(Mutex<BTreeMap<String, Secret>>);

    impl SecretSource for FakeSecrets {
        async fn get(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
            Ok(self.0.lock().unwrap().get(name).cloned())
        }
    }

    fn secret(name: &str, version: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn connection(auth: serde_json::Value) -> TasklistConnection {
        let spec = serde_json::from_value(serde_json::json!({"url": "https://tasklist.example", "auth": auth})).unwrap();
        TasklistConnection::new("orders", spec)
    }

    fn oauth2() -> TasklistConnection {
        connection(serde_json::json!({"oauth2": {"tokenUrl": "https://login/oauth/token", "clientSecretRef": {"name": "client"}}}))
    }

    fn secrets(list: Vec<Secret>) -> FakeSecrets {
        FakeSecrets(Mutex::new(
            list.into_iter().map(|s| (s.metadata.name.clone().unwrap(), s)).collect(),
        ))
    }

    #[tokio::test]
    async fn reads_client_credentials_with_default_keys_and_trims_a_newline() {
        let source = secrets(vec![secret(
            "client",
            "1",
            &[("client_id", "orders\n"), ("client_secret", "s3cret\n")],
        )]);
        let inputs = read_inputs(&oauth2(), &source).await.unwrap().unwrap();
        let LoginMaterial::OAuth2 { endpoint, client } = inputs.login else {
            panic!("oauth2 expected")
        };
        assert_eq!(client.client_id, "orders");
        let ClientProof::SecretInBody(secret) = client.proof else {
            panic!("the secret goes in the body by default")
        };
        assert_eq!(secret.expose(), "s3cret");
        assert_eq!(endpoint.audience, "tasklist.camunda.io");
        assert_eq!(inputs.probe_interval, Duration::from_secs(60));
    }

    #[tokio::test]
    async fn a_service_account_token_connection_reads_no_secret() {
        let secretless = |audience: Option<&str>, token_url: &str| {
            let mut assertion = serde_json::json!({"serviceAccountRef": {"name": "orders-bot"}});
            if let Some(audience) = audience {
                assertion["audience"] = serde_json::json!(audience);
            }
            connection(
                serde_json::json!({"oauth2": {"tokenUrl": token_url, "clientAuthentication": "ServiceAccountToken",
                "clientId": "orders", "clientAssertion": assertion}}),
            )
        };
        let keycloak = "https://kc.example/auth/realms/camunda-platform/protocol/openid-connect/token";
        // Known from the spec alone: no Secret is looked up.
        let summary = summarize(&secretless(None, keycloak), |name| panic!("looked up Secret {name}")).unwrap();
        assert!(summary.token_endpoint.is_some());
        // Without a cluster at hand (the fake source has none): the spec cannot be served.
        let problem = read_inputs(&secretless(None, keycloak), &secrets(vec![]))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(problem.reason, Reason::InvalidSpec);
        assert!(problem.message.contains("Kubernetes API server"), "{}", problem.message);
        // No default audience for an unknown token endpoint: said before anything is read.
        let problem = summarize(&secretless(None, "https://idp.example/oauth/token"), |_| None).unwrap_err();
        assert_eq!(problem.reason, Reason::InvalidSpec);
        assert!(problem.message.contains("clientAssertion.audience"), "{}", problem.message);
        assert!(summarize(&secretless(Some("aud"), "https://idp.example/oauth/token"), |_| None).is_ok());
        assert!(secret_references(&secretless(None, keycloak)).is_empty());
    }

    #[tokio::test]
    async fn missing_secret_and_missing_key_have_their_reasons() {
        let problem = read_inputs(&oauth2(), &secrets(vec![])).await.unwrap().unwrap_err();
        assert_eq!(problem.reason, Reason::SecretNotFound);
        let source = secrets(vec![secret("client", "1", &[("client_id", "orders")])]);
        let problem = read_inputs(&oauth2(), &source).await.unwrap().unwrap_err();
        assert_eq!(problem.reason, Reason::SecretKeyMissing);
        assert!(problem.message.contains("client_secret"), "{}", problem.message);
    }

    #[tokio::test]
    async fn the_fingerprint_follows_secret_versions_and_the_refresh_annotation() {
        let data = [("client_id", "orders"), ("client_secret", "s3cret")];
        let first = read_inputs(&oauth2(), &secrets(vec![secret("client", "1", &data)]))
            .await
            .unwrap()
            .unwrap();
        let same = read_inputs(&oauth2(), &secrets(vec![secret("client", "1", &data)]))
            .await
            .unwrap()
            .unwrap();
        let rotated = read_inputs(&oauth2(), &secrets(vec![secret("client", "2", &data)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.fingerprint, same.fingerprint);
        assert_ne!(first.fingerprint, rotated.fingerprint);

        let mut annotated = oauth2();
        annotated.metadata.annotations = Some(BTreeMap::from([(crate::crd::REFRESH_ANNOTATION.to_string(), "now".to_string())]));
        let refreshed = read_inputs(&annotated, &secrets(vec![secret("client", "1", &data)]))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(first.fingerprint, refreshed.fingerprint);
        assert!(!first.fingerprint.contains("s3cret"));
    }

    #[tokio::test]
    async fn basic_reads_the_login_into_a_header_and_refuses_a_colon_in_the_username() {
        let connection = connection(serde_json::json!({"basic": {"credentialsSecretRef": {"name": "login"}}}));
        let source = secrets(vec![secret("login", "1", &[("username", "demo"), ("password", "pa:ss")])]);
        let inputs = read_inputs(&connection, &source).await.unwrap().unwrap();
        let LoginMaterial::Basic { username, authorization } = inputs.login else {
            panic!("basic expected")
        };
        assert_eq!(username, "demo");
        // RFC 7617: base64 of "demo:pa:ss", no further encoding.
        assert_eq!(authorization.expose(), "Basic ZGVtbzpwYTpzcw==");

        let source = secrets(vec![secret("login", "1", &[("username", "de:mo"), ("password", "x")])]);
        let problem = read_inputs(&connection, &source).await.unwrap().unwrap_err();
        assert_eq!(problem.reason, Reason::InvalidCredentials);
        assert!(!problem.message.contains("de:mo"), "{}", problem.message);
    }

    #[tokio::test]
    async fn issuer_body_basic_and_private_key_jwt_are_read_from_the_spec() {
        let spec = |extra: serde_json::Value| {
            let mut oauth2 = serde_json::json!({"issuerUrl": "https://idp/realm", "audience": "", "clientSecretRef": {"name": "client"}});
            oauth2.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            connection(serde_json::json!({ "oauth2": oauth2 }))
        };
        let source = secrets(vec![
            secret("client", "1", &[("client_id", "orders"), ("client_secret", "s3cret")]),
            secret(
                "keys",
                "1",
                &[("private_key.pem", include_str!("../tests/fixtures/ec-p256-test-key.pem"))],
            ),
        ]);
        let inputs = read_inputs(&spec(serde_json::json!({"clientAuthentication": "Basic"})), &source)
            .await
            .unwrap()
            .unwrap();
        let LoginMaterial::OAuth2 { endpoint, client } = inputs.login else {
            panic!("oauth2 expected")
        };
        assert_eq!(endpoint.location, TokenLocation::Issuer("https://idp/realm".into()));
        assert_eq!(endpoint.audience, "");
        assert!(matches!(client.proof, ClientProof::SecretInBasicHeader(_)));

        let jwt =
            spec(serde_json::json!({"clientAuthentication": "PrivateKeyJwt", "clientAssertionKeyRef": {"name": "keys", "keyId": "k1"}}));
        let inputs = read_inputs(&jwt, &source).await.unwrap().unwrap();
        let LoginMaterial::OAuth2 { client, .. } = inputs.login else {
            panic!("oauth2 expected")
        };
        let ClientProof::PrivateKeyJwt(key) = client.proof else {
            panic!("a signing key expected")
        };
        assert_eq!(key.key_id.as_deref(), Some("k1"));
        // The key's Secret is watched like the client's.
        assert_eq!(referenced_secret_names(&jwt), ["client", "keys"]);
        assert!(reads_secret(&jwt, "keys") && reads_secret(&jwt, "client") && !reads_secret(&jwt, "other"));
        // Only the keys read of each are kept between reads.
        let keys = |names: &[&str]| names.iter().map(|name| name.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            referenced_keys(&jwt),
            BTreeMap::from([
                ("client".to_owned(), keys(&["client_id", "client_secret"])),
                ("keys".to_owned(), keys(&["private_key.pem"])),
            ])
        );
    }

    /// What the metadata watch knows of `source`: uid and resourceVersion, no values.
    fn versions_of(source: &FakeSecrets) -> impl Fn(&str) -> Option<(String, String)> + '_ {
        |name| {
            let secrets = source.0.lock().unwrap();
            let secret = secrets.get(name)?;
            Some((secret.metadata.uid.clone()?, secret.metadata.resource_version.clone()?))
        }
    }

    #[tokio::test]
    async fn the_fingerprint_from_the_watch_metadata_equals_the_one_from_the_values() {
        let source = secrets(vec![
            secret("client", "7", &[("client_id", "orders"), ("client_secret", "s3cret")]),
            secret("login", "8", &[("username", "demo"), ("password", "demo")]),
            secret(
                "keys",
                "9",
                &[("private_key.pem", include_str!("../tests/fixtures/ec-p256-test-key.pem"))],
            ),
            secret("ca", "10", &[("ca.crt", "PEM")]),
            secret("client-tls", "11", &[("tls.crt", "CERT PEM"), ("tls.key", "KEY PEM")]),
        ]);
        let oauth2 = |extra: serde_json::Value| {
            let mut oauth2 = serde_json::json!({"tokenUrl": "https://login/oauth/token", "clientSecretRef": {"name": "client"}});
            oauth2.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            connection(serde_json::json!({ "oauth2": oauth2 }))
        };
        let mut with_ca = oauth2(serde_json::json!({}));
        with_ca.spec.tls = Some(serde_json::from_value(serde_json::json!({"caSecretRef": {"name": "ca"}})).unwrap());
        let mut with_client_certificate = oauth2(serde_json::json!({}));
        with_client_certificate.spec.tls =
            Some(serde_json::from_value(serde_json::json!({"clientCertificateSecretRef": {"name": "client-tls"}})).unwrap());
        let mut annotated = oauth2(serde_json::json!({}));
        annotated.metadata.annotations = Some(BTreeMap::from([(crate::crd::REFRESH_ANNOTATION.to_string(), "now".to_string())]));
        let connections = [
            oauth2(serde_json::json!({})),
            oauth2(serde_json::json!({"clientAuthentication": "Basic", "scope": "s", "audience": ""})),
            oauth2(serde_json::json!({"clientAuthentication": "PrivateKeyJwt", "clientAssertionKeyRef": {"name": "keys"}})),
            // A key reference without PrivateKeyJwt is not read, so not fingerprinted.
            oauth2(serde_json::json!({"clientAssertionKeyRef": {"name": "keys"}})),
            connection(serde_json::json!({"cookie": {"credentialsSecretRef": {"name": "login"}}})),
            connection(serde_json::json!({"basic": {"credentialsSecretRef": {"name": "login"}}})),
            with_ca,
            with_client_certificate.clone(),
            annotated,
        ];
        // The certificate and key are read together, watched, and their Secret's version is
        // what says the TLS settings changed.
        let read = read_inputs(&with_client_certificate, &source).await.unwrap().unwrap();
        assert_eq!(
            read.trust.client_identity_pem.as_ref().map(Sensitive::expose),
            Some("CERT PEM\nKEY PEM\n")
        );
        assert_eq!(referenced_secret_names(&with_client_certificate), ["client", "client-tls"]);
        assert!(reads_secret(&with_client_certificate, "client-tls"));
        assert!(!with_client_certificate.has_secret_name("client-tls"));
        let summary = summarize(&with_client_certificate, versions_of(&source)).unwrap();
        assert!(summary.ca_version.is_some_and(|version| version.contains("client-tls")));
        for connection in connections {
            let read = read_inputs(&connection, &source).await.unwrap().unwrap();
            let summary = summarize(&connection, versions_of(&source)).unwrap();
            assert_eq!(summary.fingerprint, read.fingerprint, "{:?}", connection.spec.auth);
            let from_values = read.summary();
            assert_eq!(
                (
                    summary.refresh_before,
                    summary.probe_interval,
                    summary.session_timeout,
                    summary.basic
                ),
                (
                    from_values.refresh_before,
                    from_values.probe_interval,
                    from_values.session_timeout,
                    from_values.basic
                )
            );
            assert_eq!(format!("{:?}", summary.token_endpoint), format!("{:?}", from_values.token_endpoint));
        }
    }

    #[tokio::test]
    async fn the_summary_gives_the_reasons_of_the_read_without_reading_values() {
        // A missing Secret is seen from metadata alone.
        let empty = secrets(vec![]);
        let problem = summarize(&oauth2(), versions_of(&empty)).unwrap_err();
        let read = read_inputs(&oauth2(), &empty).await.unwrap().unwrap_err();
        assert_eq!(problem, read);
        // A missing key shows only when the values are read: the summary is fine.
        let source = secrets(vec![secret("client", "1", &[("client_id", "orders")])]);
        assert!(summarize(&oauth2(), versions_of(&source)).is_ok());
        assert_eq!(
            read_inputs(&oauth2(), &source).await.unwrap().unwrap_err().reason,
            Reason::SecretKeyMissing
        );
        // A duration the schema let through but the operator cannot read.
        let mut odd = oauth2();
        odd.spec.probe.interval = "soon".into();
        let source = secrets(vec![secret("client", "1", &[("client_id", "o"), ("client_secret", "s")])]);
        let problem = summarize(&odd, versions_of(&source)).unwrap_err();
        assert_eq!(problem, read_inputs(&odd, &source).await.unwrap().unwrap_err());
        assert_eq!(problem.reason, Reason::InvalidSpec);
    }

    #[test]
    fn a_spec_without_the_new_fields_serializes_as_before_so_its_fingerprint_stays() {
        let spec = serde_json::to_value(&oauth2().spec).unwrap();
        let keys = |value: &serde_json::Value| value.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&spec["auth"]), ["oauth2"]);
        assert_eq!(
            keys(&spec["auth"]["oauth2"]),
            ["audience", "clientSecretRef", "requestEncoding", "tokenUrl"]
        );
    }

    #[test]
    fn the_opt_in_names_the_first_referenced_secret_without_the_label_and_skips_missing_ones() {
        let labels = |value: &str| BTreeMap::from([(ALLOW_REFERENCE_LABEL.to_owned(), value.to_owned())]);
        assert!(allows_reference(Some(&labels("true"))));
        for refused in ["false", "True", "yes", ""] {
            assert!(!allows_reference(Some(&labels(refused))), "{refused:?}");
        }
        assert!(!allows_reference(None));
        assert!(!allows_reference(Some(&BTreeMap::from([("team".to_owned(), "true".to_owned())]))));

        let mut jwt = connection(serde_json::json!({"oauth2": {
            "issuerUrl": "https://idp/realm", "clientSecretRef": {"name": "client"},
            "clientAuthentication": "PrivateKeyJwt", "clientAssertionKeyRef": {"name": "keys"}}}));
        jwt.spec.tls = Some(serde_json::from_value(serde_json::json!({"caSecretRef": {"name": "ca"}})).unwrap());
        assert_eq!(
            secret_references(&jwt),
            [
                ("spec.auth.oauth2.clientSecretRef", "client".to_owned()),
                ("spec.auth.oauth2.clientAssertionKeyRef", "keys".to_owned()),
                ("spec.tls.caSecretRef", "ca".to_owned()),
            ]
        );
        // Every Secret opted in: no problem.
        assert_eq!(secret_opt_in_problem(&jwt, |_| Some(true)), None);
        // A missing Secret is SecretNotFound's business, not this check's.
        assert_eq!(secret_opt_in_problem(&jwt, |name| (name != "client").then_some(true)), None);
        // The key's Secret lacks the label: it is named, with its field.
        let problem = secret_opt_in_problem(&jwt, |name| Some(name != "keys")).unwrap();
        assert_eq!(problem.reason, Reason::SecretNotOptedIn);
        assert!(
            problem.message.starts_with(
                "Secret \"keys\" (spec.auth.oauth2.clientAssertionKeyRef) does not carry the label tasklist.camunda.community/allow-reference: \"true\""
            ),
            "{}",
            problem.message
        );
        let basic = connection(serde_json::json!({"basic": {"credentialsSecretRef": {"name": "login"}}}));
        let problem = secret_opt_in_problem(&basic, |_| Some(false)).unwrap();
        assert!(
            problem.message.contains("(spec.auth.basic.credentialsSecretRef)"),
            "{}",
            problem.message
        );
    }

    #[tokio::test]
    async fn cookie_login_url_keeps_the_base_path() {
        let connection = connection(serde_json::json!({"cookie": {"credentialsSecretRef": {"name": "login"}}}));
        let source = secrets(vec![secret("login", "1", &[("username", "demo"), ("password", "demo")])]);
        let inputs = read_inputs(&connection, &source).await.unwrap().unwrap();
        let LoginMaterial::Cookie {
            login, session_timeout, ..
        } = inputs.login
        else {
            panic!("cookie expected")
        };
        assert_eq!(login.login_url, "https://tasklist.example/api/login");
        assert_eq!(session_timeout, Duration::from_secs(1800));
    }
}
