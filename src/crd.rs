//! The `TasklistConnection` custom resource, exactly as the v1alpha1 contract names it.
//!
//! Validation lives in the schema (patterns and CEL rules) so that the API server rejects
//! a bad manifest with a readable message before the operator ever sees it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::{Message, Rule};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Go-style durations as users write them: `30s`, `5m`, `1h`, `1h30m`, `500ms`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";
/// An http or https URL with a host.
pub const HTTP_URL_PATTERN: &str = r"^https?://[^\s/?#]+[^\s]*$";
/// A Kubernetes object name (DNS-1123 subdomain).
pub const OBJECT_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key of a Secret's data.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// An absolute request path.
pub const PATH_PATTERN: &str = r"^/[^\s]*$";

/// The shortest `sessionTimeout`: a session trusted for less would mean a login every few
/// seconds.
pub const MIN_SESSION_TIMEOUT: &str = "30s";
/// The shortest probe interval: each probe is a request to Tasklist.
pub const MIN_PROBE_INTERVAL: &str = "10s";

// The CRD rejects a bad value with a CEL rule whose message says what to write instead
// (a plain `pattern` would answer with the regular expression). The rules repeat the
// patterns above; CEL's own duration() then checks the minimums.

/// A duration such as `30s`, `5m`, `1h30m`.
fn duration_rule() -> Rule {
    Rule::new(format!("self.matches(r'{DURATION_PATTERN}')"))
        .message(Message::Expression(
            "'write a duration such as 30s, 5m or 1h30m, not \"' + self + '\"'".into(),
        ))
        .reason(kube::core::Reason::FieldValueInvalid)
}

/// A well-formed duration of at least `minimum`.
fn minimum_duration_rule(minimum: &str, why: &str) -> Rule {
    Rule::new(format!(
        "!self.matches(r'{DURATION_PATTERN}') || duration(self) >= duration('{minimum}')"
    ))
    .message(Message::Expression(format!("'must be at least {minimum} ({why}), not ' + self")))
    .reason(kube::core::Reason::FieldValueInvalid)
}

/// An http(s) URL with a host.
fn http_url_rule() -> Rule {
    Rule::new(format!("self.matches(r'{HTTP_URL_PATTERN}')"))
        .message("write an http:// or https:// URL with a host, such as https://bru-2.tasklist.camunda.io/abc123")
        .reason(kube::core::Reason::FieldValueInvalid)
}

/// No `user:password@` in a URL: URLs are shown in status, Events and logs, and credentials
/// belong in a referenced Secret.
fn no_user_info_rule() -> Rule {
    Rule::new(r"!self.matches(r'^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')")
        .message("must not hold a username or password (user:password@host): URLs appear in status, Events and logs; put credentials in the Secret that auth references")
        .reason(kube::core::Reason::FieldValueForbidden)
}

/// A Kubernetes object name.
fn object_name_rule() -> Rule {
    Rule::new(format!("self.matches(r'{OBJECT_NAME_PATTERN}')"))
        .message("must be a Kubernetes object name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, such as orders-tasklist-auth")
        .reason(kube::core::Reason::FieldValueInvalid)
}

/// A key of a Secret's data.
fn secret_key_rule() -> Rule {
    Rule::new(format!("self.matches(r'{SECRET_KEY_PATTERN}')"))
        .message("must be a Secret key: letters, digits, '-', '_' and '.', such as client_secret")
        .reason(kube::core::Reason::FieldValueInvalid)
}

/// An absolute request path.
fn path_rule() -> Rule {
    Rule::new(format!("self.matches(r'{PATH_PATTERN}')"))
        .message("write an absolute path without spaces, such as /v1/tasks/search")
        .reason(kube::core::Reason::FieldValueInvalid)
}

/// The annotation whose change of value asks for a new credential at once.
pub const REFRESH_ANNOTATION: &str = "tasklist.camunda.community/refresh";
/// Set to "true" by a user whose every consumer Pod of the derived Secret is nudged
/// (docs/nudge.md): the credential may then be replaced closer to its expiry.
pub const ALL_CONSUMERS_NUDGED_ANNOTATION: &str = "tasklist.camunda.community/all-consumers-nudged";

/// A TasklistConnection keeps a credential for Camunda's Tasklist API fresh in a Secret
/// and reports whether Tasklist accepts it.
// Each printcolumn repeats `type_ = "string"`, which clippy mistakes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tasklist.camunda.community",
    version = "v1alpha1",
    kind = "TasklistConnection",
    plural = "tasklistconnections",
    shortname = "tlc",
    namespaced,
    status = "TasklistConnectionStatus",
    doc = "A TasklistConnection keeps a credential for Camunda's Tasklist API fresh in a Secret and reports whether Tasklist accepts it.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether Tasklist accepts the stored credential"
    ),
    printcolumn(
        name = "Auth",
        type_ = "string",
        json_path = ".status.authMethod",
        description = "oauth2, cookie or basic"
    ),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".status.expiresAt",
        description = "When the stored credential expires"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the connection is or is not Ready"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct TasklistConnectionSpec {
    /// Base URL of Tasklist, http or https, for example https://bru-2.tasklist.camunda.io/abc123.
    /// The probe and the cookie login are sent to paths below it.
    #[x_kube(validation = http_url_rule())]
    #[x_kube(validation = no_user_info_rule())]
    #[schemars(length(max = 2048))]
    pub url: String,

    /// How to obtain a credential: exactly one of `oauth2` (SaaS, Self-Managed Identity or
    /// another OIDC provider), `cookie` (Tasklist's own login) or `basic` (HTTP Basic).
    pub auth: AuthSpec,

    /// Name of the Secret the operator writes the credential to, in this namespace.
    /// Defaults to `<metadata.name>-tasklist-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = object_name_rule())]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,

    /// Obtain a new credential at least this long before the current one expires
    /// (for example `5m`). Without it, a credential is replaced after 80 % of its lifetime.
    /// A credential is never replaced before half its lifetime: a longer refreshBefore is
    /// reported in the Authenticated condition, not obeyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = duration_rule())]
    #[schemars(length(max = 64))]
    pub refresh_before: Option<String>,

    /// A request sent to Tasklist with the credential to check that Tasklist accepts it.
    #[serde(default)]
    pub probe: ProbeSpec,

    /// TLS settings for every request to Tasklist and to the token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<TlsSpec>>,

    /// Labels, annotations and extra keys of the derived Secret, for consumers that expect
    /// them (like cert-manager's `secretTemplate`). A change gets a new credential, and every
    /// key is rewritten together at each rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<Box<SecretTemplate>>,
}

/// The keys the operator writes to the derived Secret (the contract's).
pub const STANDARD_SECRET_KEYS: [&str; 6] = ["token", "authorization", "expiresAt", "url", "cookie", "csrfToken"];
/// The prefix of the operator's own annotations on the derived Secret.
pub const OPERATOR_ANNOTATION_PREFIX: &str = "tasklist.camunda.community/";
/// The operator's own label on the derived Secret.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

fn standard_keys_cel() -> String {
    let quoted: Vec<String> = STANDARD_SECRET_KEYS.iter().map(|key| format!("'{key}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// No extra key may be named like a standard key: it would hide or replace it.
fn extra_keys_do_not_collide_rule() -> Rule {
    Rule::new(format!("self.all(k, !(k in {}))", standard_keys_cel()))
        .message(Message::Message(format!(
            "a key in secretTemplate.keys cannot be named like a key the operator writes ({}): it would hide or replace it; choose another name, such as CAMUNDA_OAUTH_TOKEN",
            STANDARD_SECRET_KEYS.join(", ")
        )))
        .reason(kube::core::Reason::FieldValueForbidden)
}

/// Each extra key copies a standard key.
fn extra_keys_copy_a_standard_key_rule() -> Rule {
    Rule::new(format!("self.all(k, self[k] in {})", standard_keys_cel()))
        .message(Message::Message(format!(
            "each value in secretTemplate.keys names the key whose value it copies, one of {}",
            STANDARD_SECRET_KEYS.join(", ")
        )))
        .reason(kube::core::Reason::FieldValueInvalid)
}

/// The operator's label on the derived Secret is its own.
fn labels_leave_the_operators_label_rule() -> Rule {
    Rule::new(format!("!('{MANAGED_BY_LABEL}' in self)"))
        .message(Message::Message(format!(
            "secretTemplate.labels cannot set {MANAGED_BY_LABEL}: the operator sets it on the Secrets it owns"
        )))
        .reason(kube::core::Reason::FieldValueForbidden)
}

/// The operator's annotations on the derived Secret are its own.
fn annotations_leave_the_operators_own_rule() -> Rule {
    Rule::new(format!("self.all(k, !k.startsWith('{OPERATOR_ANNOTATION_PREFIX}'))"))
        .message(Message::Message(format!(
            "secretTemplate.annotations cannot set annotations starting with {OPERATOR_ANNOTATION_PREFIX}: the operator keeps its own state there"
        )))
        .reason(kube::core::Reason::FieldValueForbidden)
}

/// Labels, annotations and extra keys of the derived Secret.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Labels added to the derived Secret. The operator's own label
    /// `app.kubernetes.io/managed-by` is always its own and cannot be set here.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[x_kube(validation = labels_leave_the_operators_label_rule())]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "description": "The label's value."}))]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Annotations added to the derived Secret. Annotations starting with
    /// `tasklist.camunda.community/` are the operator's own and cannot be set here.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[x_kube(validation = annotations_leave_the_operators_own_rule())]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "description": "The annotation's value."}))]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Extra keys of the derived Secret, each a copy of a key the operator writes, under
    /// the name a consumer expects: `{CAMUNDA_OAUTH_TOKEN: token}` adds the key
    /// `CAMUNDA_OAUTH_TOKEN` with the bearer token, as Camunda's JS SDK reads it (auth
    /// strategy BEARER) from an environment filled by `envFrom`. Values: one of token,
    /// authorization, expiresAt, url, cookie, csrfToken; a key whose source the credential
    /// does not have (`token` with cookie login) is left out. A name cannot be one of those.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[x_kube(
        validation = extra_keys_do_not_collide_rule(),
        validation = extra_keys_copy_a_standard_key_rule()
    )]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "description": "The standard key this one copies: token, authorization, expiresAt, url, cookie or csrfToken."}))]
    pub keys: std::collections::BTreeMap<String, String>,
}

/// How to obtain a credential. Exactly one of `oauth2`, `cookie` or `basic` must be set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.oauth2), has(self.cookie), has(self.basic)].filter(set, set).size() == 1").message("exactly one of auth.oauth2, auth.cookie or auth.basic must be set"))]
// The optional parts are boxed: the connection store keeps every connection for the
// operator's lifetime, and an unset box costs a pointer where the struct would cost its
// whole size (AuthSpec 536 bytes unboxed, 24 boxed; see `crd_sizes` below).
pub struct AuthSpec {
    /// OAuth2 client credentials: Camunda SaaS, Self-Managed with Identity (Keycloak), or
    /// another OIDC provider (Microsoft Entra ID, Okta).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<Box<OAuth2Spec>>,
    /// Tasklist's own login (`POST /api/login` with a username and password), for
    /// Self-Managed Tasklist without Identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<Box<CookieSpec>>,
    /// HTTP Basic authentication (Camunda 8.8+ Orchestration Cluster with Basic auth): the
    /// derived Secret gets `authorization: Basic ...`, which never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<Box<BasicSpec>>,
}

/// OAuth2 client-credentials grant.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.tokenUrl) != has(self.issuerUrl)").message("exactly one of auth.oauth2.tokenUrl or auth.oauth2.issuerUrl must be set"))]
#[x_kube(validation = Rule::new("!has(self.clientAuthentication) || self.clientAuthentication != 'PrivateKeyJwt' || has(self.clientAssertionKeyRef)").message("auth.oauth2.clientAuthentication PrivateKeyJwt needs auth.oauth2.clientAssertionKeyRef (the Secret with the private key)"))]
#[x_kube(validation = Rule::new("(has(self.clientAuthentication) && self.clientAuthentication == 'ServiceAccountToken') == has(self.clientAssertion)").message("auth.oauth2.clientAuthentication ServiceAccountToken goes with auth.oauth2.clientAssertion (the ServiceAccount whose token is the client assertion), and clientAssertion only with it"))]
#[x_kube(validation = Rule::new("(has(self.clientAuthentication) && self.clientAuthentication == 'ServiceAccountToken') != has(self.clientSecretRef)").message("auth.oauth2.clientSecretRef is required, except with clientAuthentication ServiceAccountToken, which reads no Secret (set auth.oauth2.clientId there instead)"))]
#[x_kube(validation = Rule::new("!has(self.clientId) || (has(self.clientAuthentication) && self.clientAuthentication == 'ServiceAccountToken')").message("auth.oauth2.clientId is for clientAuthentication ServiceAccountToken; the other client authentications read the client id from clientSecretRef"))]
pub struct OAuth2Spec {
    /// Token endpoint of the authorization server, http or https. SaaS:
    /// https://login.cloud.camunda.io/oauth/token; Identity: the Keycloak realm's
    /// .../protocol/openid-connect/token. Exactly one of `tokenUrl` and `issuerUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = http_url_rule())]
    #[x_kube(validation = no_user_info_rule())]
    #[schemars(length(max = 2048))]
    pub token_url: Option<String>,

    /// Issuer of the authorization server, http or https (for example
    /// https://login.microsoftonline.com/<tenant>/v2.0): the token endpoint is read from
    /// `<issuerUrl>/.well-known/openid-configuration`. Exactly one of `tokenUrl` and `issuerUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = http_url_rule())]
    #[x_kube(validation = no_user_info_rule())]
    #[schemars(length(max = 2048))]
    pub issuer_url: Option<String>,

    /// Audience requested for the token. SaaS: tasklist.camunda.io; Identity: usually
    /// tasklist-api. Set it to "" to send no audience (Microsoft Entra ID rejects it; use
    /// `scope: api://<app-id>/.default` there).
    #[serde(default = "default_audience")]
    pub audience: String,

    /// OAuth2 scope, sent only when set (Microsoft Entra ID: `api://<app-id>/.default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,

    /// How the token request body is encoded: `Form` (works everywhere, including Keycloak)
    /// or `Json` (Camunda SaaS also accepts it).
    #[serde(default)]
    pub request_encoding: RequestEncoding,

    /// How the client proves who it is at the token endpoint: `Body` (client_id and
    /// client_secret in the request body; the default), `Basic` (client_secret_basic: an
    /// HTTP Basic header), `PrivateKeyJwt` (private_key_jwt: a short-lived JWT signed with
    /// the key in `clientAssertionKeyRef`; no client secret is needed) or
    /// `ServiceAccountToken` (a token of the Kubernetes ServiceAccount in `clientAssertion`,
    /// requested for each token request; no Secret at all; Keycloak federated client
    /// authentication, Microsoft Entra ID workload identity federation).
    // Left out when `Body`, so that the fingerprint of connections written before this
    // field existed stays the same and an upgrade does not replace every token at once.
    #[serde(default, skip_serializing_if = "ClientAuthentication::is_body")]
    pub client_authentication: ClientAuthentication,

    /// The Secret in this namespace that holds the client id and client secret. With
    /// `PrivateKeyJwt`, only the client id is read from it. Required, except with
    /// `ServiceAccountToken`, where it cannot be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<ClientSecretRef>,

    /// The client id, with `ServiceAccountToken` only (no Secret is read then). Microsoft
    /// Entra ID: the application (client) id, required. Keycloak: optional; Keycloak finds
    /// the client by the token's issuer and subject, and when a client id is sent it must
    /// be that client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub client_id: Option<String>,

    /// With `ServiceAccountToken`: the ServiceAccount of this namespace whose token is the
    /// client assertion, and the audience the token is requested for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_assertion: Option<ClientAssertionSpec>,

    /// The Secret in this namespace that holds the PEM private key (RSA for RS256, P-256 EC
    /// for ES256) that signs client assertions; required with `PrivateKeyJwt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_assertion_key_ref: Option<ClientAssertionKeyRef>,
}

/// How the client authenticates at the token endpoint.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClientAuthentication {
    /// `client_id` and `client_secret` in the request body (client_secret_post).
    #[default]
    Body,
    /// `Authorization: Basic` with the client id and secret (client_secret_basic, RFC 6749 §2.3.1).
    Basic,
    /// A JWT signed with the client's private key (private_key_jwt, RFC 7523).
    PrivateKeyJwt,
    /// A token of a Kubernetes ServiceAccount, requested from the API server (TokenRequest)
    /// for each token request, sent as the client assertion (RFC 7523 §2.2).
    ServiceAccountToken,
}

impl ClientAuthentication {
    fn is_body(&self) -> bool {
        *self == ClientAuthentication::Body
    }
}

/// Where the private key for client assertions is.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientAssertionKeyRef {
    /// Name of a Secret in the connection's namespace.
    #[x_kube(validation = object_name_rule())]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the PEM private key in that Secret (PKCS#8, or PKCS#1/SEC1).
    #[serde(default = "default_private_key_key")]
    #[x_kube(validation = secret_key_rule())]
    pub key: String,
    /// The `kid` put in the assertion's header: the id under which the authorization server
    /// knows the public key. Left out of the header when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub key_id: Option<String>,
    /// Key of the key's PEM X.509 certificate in the same Secret. When set, the assertion's
    /// header carries the certificate's thumbprints (`x5t`, `x5t#S256`), by which Microsoft
    /// Entra ID finds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = secret_key_rule())]
    pub certificate_key: Option<String>,
}

/// The ServiceAccount token sent as client assertion with `ServiceAccountToken`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientAssertionSpec {
    /// The ServiceAccount, in the connection's namespace, whose token the operator requests
    /// (TokenRequest, 10 minutes, the shortest the API server allows). Its token's subject,
    /// `system:serviceaccount:<namespace>:<name>`, is what the identity provider maps to the
    /// client. Creating the connection needs permission to create `serviceaccounts/token`
    /// for it (the chart's admission policy).
    pub service_account_ref: ServiceAccountRef,
    /// The audience the token is requested for: the one the identity provider expects.
    /// Default: `api://AzureADTokenExchange` for Microsoft Entra ID
    /// (login.microsoftonline.com), otherwise the issuer (`issuerUrl`, or for a Keycloak
    /// `tokenUrl` the realm URL before `/protocol/openid-connect/token`). Never one of the
    /// API server's own audiences: such a token would be a key to the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub audience: Option<String>,
}

/// A ServiceAccount in the connection's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Name of the ServiceAccount.
    #[x_kube(validation = object_name_rule())]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// HTTP Basic authentication against Tasklist.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BasicSpec {
    /// The Secret in this namespace that holds the username and password.
    pub credentials_secret_ref: CredentialsSecretRef,
}

/// Body encoding of the token request.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RequestEncoding {
    /// `application/x-www-form-urlencoded`
    #[default]
    Form,
    /// `application/json`
    Json,
}

/// Where the OAuth2 client id and secret are.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientSecretRef {
    /// Name of a Secret in the connection's namespace.
    #[x_kube(validation = object_name_rule())]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the client id in that Secret.
    #[serde(default = "default_client_id_key")]
    #[x_kube(validation = secret_key_rule())]
    #[schemars(length(max = 253))]
    pub client_id_key: String,
    /// Key of the client secret in that Secret.
    #[serde(default = "default_client_secret_key")]
    #[x_kube(validation = secret_key_rule())]
    #[schemars(length(max = 253))]
    pub client_secret_key: String,
}

/// Tasklist's cookie login.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CookieSpec {
    /// Path of the login endpoint below `url`.
    #[serde(default = "default_login_path")]
    #[x_kube(validation = path_rule())]
    #[schemars(length(max = 1024))]
    pub login_path: String,
    /// How long a session is trusted before the operator logs in again (for example `30m`);
    /// at least 30s.
    #[serde(default = "default_session_timeout")]
    #[x_kube(validation = duration_rule(), validation = minimum_duration_rule(MIN_SESSION_TIMEOUT, "a shorter session would mean a login every few seconds"))]
    #[schemars(length(max = 64))]
    pub session_timeout: String,
    /// The Secret in this namespace that holds the username and password.
    pub credentials_secret_ref: CredentialsSecretRef,
}

/// Where the login username and password are.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of a Secret in the connection's namespace.
    #[x_kube(validation = object_name_rule())]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the username in that Secret.
    #[serde(default = "default_username_key")]
    #[x_kube(validation = secret_key_rule())]
    #[schemars(length(max = 253))]
    pub username_key: String,
    /// Key of the password in that Secret.
    #[serde(default = "default_password_key")]
    #[x_kube(validation = secret_key_rule())]
    #[schemars(length(max = 253))]
    pub password_key: String,
}

/// The request that checks whether Tasklist accepts the credential.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSpec {
    /// Whether to probe at all. When off, the Reachable condition says `ProbeDisabled`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// HTTP method of the probe (with `path` only).
    #[serde(default)]
    pub method: ProbeMethod,
    /// Path below `url`, probed with `method` and `body`. Unset (the default): the probe
    /// works on every Camunda version by itself: it sends `POST /v1/tasks/search` and, where
    /// that endpoint does not exist (404 or 405: Camunda 8.10 removed the v1 API),
    /// `POST /v2/user-tasks/search`; it remembers which one answered for this `url`, and the
    /// Reachable message names it. Unauthenticated endpoints such as `/v2/license` are never
    /// used as proof.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = path_rule())]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
    /// Body sent with POST as application/json (with `path` only), at most 4096 characters (and 4 KiB).
    #[serde(default = "default_probe_body")]
    #[schemars(length(max = 4096))]
    pub body: String,
    /// How often to probe (for example `60s`); at least 10s.
    #[serde(default = "default_probe_interval")]
    #[x_kube(validation = duration_rule(), validation = minimum_duration_rule(MIN_PROBE_INTERVAL, "each probe is a request to Tasklist"))]
    #[schemars(length(max = 64))]
    pub interval: String,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        ProbeSpec {
            enabled: true,
            method: ProbeMethod::default(),
            path: None,
            body: default_probe_body(),
            interval: default_probe_interval(),
        }
    }
}

/// HTTP method of the probe.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProbeMethod {
    /// GET, without a body.
    #[serde(rename = "GET")]
    Get,
    /// POST, with `body` as application/json.
    #[default]
    #[serde(rename = "POST")]
    Post,
}

/// TLS settings.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A PEM CA bundle to trust in addition to the public roots, from a Secret in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,
    /// Accept any server certificate. Only for testing: the credential can then be stolen
    /// by anyone between the operator and the server.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// A client certificate to present to the token endpoint and to Tasklist, for servers
    /// that require mutual TLS: a Secret of type `kubernetes.io/tls` in this namespace, with
    /// the PEM certificate (chain) under `tls.crt` and its private key under `tls.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_secret_ref: Option<ClientCertificateSecretRef>,
}

/// Where the client certificate is.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificateSecretRef {
    /// Name of a Secret of type `kubernetes.io/tls` in the connection's namespace.
    #[x_kube(validation = object_name_rule())]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Where the CA bundle is.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaSecretRef {
    /// Name of a Secret in the connection's namespace.
    #[x_kube(validation = object_name_rule())]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the PEM bundle in that Secret.
    #[serde(default = "default_ca_key")]
    #[x_kube(validation = secret_key_rule())]
    #[schemars(length(max = 253))]
    pub key: String,
}

/// What the operator observed, written only when something in it changes.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TasklistConnectionStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Secret that holds the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// `oauth2`, `cookie` or `basic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<String>,
    /// When the credential in the Secret expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When the credential in the Secret was obtained (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<String>,
    /// When the operator plans to obtain the next credential (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<String>,
    /// `Authenticated`, `Reachable` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// What the default name of a derived Secret adds to its connection's name.
const DERIVED_SECRET_SUFFIX: &str = "-tasklist-auth";

impl TasklistConnection {
    /// The name of the derived Secret.
    pub fn secret_name(&self) -> String {
        match &self.spec.secret_name {
            Some(name) => name.clone(),
            None => format!("{}{DERIVED_SECRET_SUFFIX}", self.metadata.name.as_deref().unwrap_or_default()),
        }
    }

    /// Whether `name` is the name of this connection's derived Secret ([`Self::secret_name`]),
    /// without allocating one.
    pub fn has_secret_name(&self, name: &str) -> bool {
        match &self.spec.secret_name {
            Some(own) => own == name,
            None => name.strip_suffix(DERIVED_SECRET_SUFFIX) == Some(self.metadata.name.as_deref().unwrap_or_default()),
        }
    }

    /// The value of the manual refresh annotation, if any.
    pub fn refresh_request(&self) -> Option<&str> {
        self.metadata.annotations.as_ref()?.get(REFRESH_ANNOTATION).map(String::as_str)
    }

    /// Whether the connection carries `tasklist.camunda.community/all-consumers-nudged: "true"`.
    pub fn says_all_consumers_nudged(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(ALL_CONSUMERS_NUDGED_ANNOTATION))
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"))
    }
}

impl AuthSpec {
    /// `oauth2`, `cookie` or `basic`, as shown in status and `kubectl get tlc`.
    pub fn method_name(&self) -> &'static str {
        if self.cookie.is_some() {
            "cookie"
        } else if self.basic.is_some() {
            "basic"
        } else {
            "oauth2"
        }
    }
}

fn default_audience() -> String {
    "tasklist.camunda.io".into()
}
fn default_client_id_key() -> String {
    "client_id".into()
}
fn default_private_key_key() -> String {
    "private_key.pem".into()
}
fn default_client_secret_key() -> String {
    "client_secret".into()
}
fn default_login_path() -> String {
    "/api/login".into()
}
fn default_session_timeout() -> String {
    "30m".into()
}
fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}
fn default_true() -> bool {
    true
}
fn default_probe_body() -> String {
    r#"{"pageSize":1}"#.into()
}
fn default_probe_interval() -> String {
    "60s".into()
}
fn default_ca_key() -> String {
    "ca.crt".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(secret_name: Option<&str>) -> TasklistConnection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tasklist.camunda.community/v1alpha1", "kind": "TasklistConnection",
            "metadata": {"name": "orders", "namespace": "apps"},
            "spec": {"url": "https://t.example", "secretName": secret_name,
                     "auth": {"oauth2": {"tokenUrl": "https://login.example/token", "clientSecretRef": {"name": "c"}}}},
        }))
        .expect("a valid connection")
    }

    #[test]
    fn has_secret_name_agrees_with_secret_name() {
        for (connection, other) in [(connection(None), "orders"), (connection(Some("mine")), "orders-tasklist-auth")] {
            assert!(connection.has_secret_name(&connection.secret_name()));
            assert!(!connection.has_secret_name(other));
        }
        assert!(!connection(None).has_secret_name("billing-tasklist-auth"));
    }
}
