//! `POST /oauth/token`: a SaaS-style OAuth2 client-credentials token endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::Serialize;
use serde_json::json;

use super::assertion::{self, ASSERTION_TYPE};
use super::state::{Shared, apply_mode, json_response, random_token};
use super::{ECHO_SECRET_AT, TokenAnswer, TokenRequestEncoding, TokenRequestRecord, ZEEBE_AUDIENCE};

/// Size of the [`TokenAnswer::Huge`] body.
const HUGE_BODY_BYTES: usize = 10 * 1024 * 1024;

/// The stand-in's own ES256 signing key, generated at start.
pub(super) struct TokenIssuer {
    pub key_id: String,
    encoding_key: EncodingKey,
    pub decoding_key: DecodingKey,
}

impl TokenIssuer {
    pub fn generate() -> anyhow::Result<Self> {
        // Pin jsonwebtoken's crypto backend: if another crate in the build enabled its
        // aws-lc backend too, automatic selection would panic. An error only means some
        // provider is installed already.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the stand-in's ES256 key")?;
        Ok(Self {
            key_id: format!("standin-{}", random_token(8)),
            // PKCS#8 private key and the uncompressed SEC1 public point, as jsonwebtoken's
            // EC keys expect.
            encoding_key: EncodingKey::from_ec_der(&key.serialize_der()),
            decoding_key: DecodingKey::from_ec_der(key.public_key_raw()),
        })
    }

    fn sign(&self, claims: &Claims<'_>) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding_key).context("signing a JWT")
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    azp: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

/// The parameters of a token request, from whichever place it carried them.
struct TokenRequest {
    encoding: TokenRequestEncoding,
    /// The body was JSON (Keycloak refuses that even with HTTP Basic).
    json_body: bool,
    body: HashMap<String, String>,
    /// Client id and secret from an HTTP Basic header.
    basic: Option<(String, String)>,
}

impl TokenRequest {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Self {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let (body_encoding, fields) = if content_type.starts_with("application/json") {
            (TokenRequestEncoding::Json, parse_json_fields(body))
        } else if content_type.starts_with("application/x-www-form-urlencoded")
            // Like servlet containers, treat a body without a content type as a form.
            || (content_type.is_empty() && !body.is_empty())
        {
            let fields = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
                .unwrap_or_default()
                .into_iter()
                .collect();
            (TokenRequestEncoding::Form, fields)
        } else if content_type.is_empty() {
            (TokenRequestEncoding::Form, HashMap::new())
        } else {
            (TokenRequestEncoding::Other, HashMap::new())
        };
        let basic = basic_credentials(headers);
        let assertion = fields.contains_key("client_assertion");
        Self {
            encoding: if body_encoding == TokenRequestEncoding::Other {
                body_encoding
            } else if basic.is_some() {
                TokenRequestEncoding::Basic
            } else if assertion {
                TokenRequestEncoding::Assertion
            } else {
                body_encoding
            },
            json_body: body_encoding == TokenRequestEncoding::Json,
            body: fields,
            basic,
        }
    }

    fn field(&self, name: &str) -> Option<&str> {
        self.body.get(name).map(String::as_str)
    }

    fn client_id(&self) -> Option<&str> {
        match &self.basic {
            Some((client_id, _)) => Some(client_id),
            None => self.field("client_id"),
        }
    }

    fn client_secret(&self) -> Option<&str> {
        match &self.basic {
            Some((_, client_secret)) => Some(client_secret),
            None => self.field("client_secret"),
        }
    }
}

/// String-valued members of a JSON object body; anything else yields no fields.
fn parse_json_fields(body: &[u8]) -> HashMap<String, String> {
    let Ok(serde_json::Value::Object(members)) = serde_json::from_slice(body) else {
        return HashMap::new();
    };
    members
        .into_iter()
        .filter_map(|(name, value)| match value {
            serde_json::Value::String(value) => Some((name, value)),
            _ => None,
        })
        .collect()
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
    let (client_id, client_secret) = decoded.split_once(':')?;
    // RFC 6749 §2.3.1: both are form-urlencoded before they are joined.
    Some((form_decode(client_id)?, form_decode(client_secret)?))
}

fn form_decode(value: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&format!("v={value}")).ok()?;
    pairs.into_iter().next().map(|(_, decoded)| decoded)
}

pub(super) async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let time = SystemTime::now();
    let request = TokenRequest::parse(&headers, &body);
    let mode = {
        let mut state = shared.lock();
        state.token_requests_arrived += 1;
        state.token_endpoint
    };
    let response = match apply_mode(mode, invalid_client).await {
        Some(response) => response,
        None => answer(&shared, &request),
    };
    shared.lock().token_requests.push(TokenRequestRecord {
        time,
        encoding: request.encoding,
        client_id: request.client_id().unwrap_or_default().to_owned(),
        audience: request.field("audience").unwrap_or_default().to_owned(),
        scope: request.field("scope").map(str::to_owned),
        status: response.status().as_u16(),
    });
    response
}

fn answer(shared: &Shared, request: &TokenRequest) -> Response {
    let (token_answer, lifetime, expires_in_override, client_secret, permitted, unknown_scopes) = {
        let state = shared.lock();
        let client_secret = request.client_id().and_then(|client_id| state.clients.get(client_id).cloned());
        let permitted = request
            .client_id()
            .is_none_or(|client_id| !state.clients_without_permission.contains(client_id));
        let unknown_scopes: Vec<String> = request
            .field("scope")
            .unwrap_or_default()
            .split_whitespace()
            .filter(|scope| !state.known_scopes.contains(*scope))
            .map(str::to_owned)
            .collect();
        (
            state.token_answer,
            state.token_lifetime,
            state.expires_in_override,
            client_secret,
            permitted,
            unknown_scopes,
        )
    };

    if request.json_body && token_answer == TokenAnswer::Keycloak400ForJson {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "Missing form parameter: grant_type");
    }
    if request.encoding == TokenRequestEncoding::Other {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "Unsupported content type");
    }
    if token_answer == TokenAnswer::EchoSecretInError {
        let secret = request.client_secret().unwrap_or_default();
        let basic = BASE64.encode(format!("{}:{secret}", request.client_id().unwrap_or_default()));
        let padding = "x".repeat(ECHO_SECRET_AT - "invalid_client: ".len());
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            &format!("{padding}{secret} is not the secret (Basic {basic})"),
        );
    }
    match request.field("grant_type") {
        Some("client_credentials") => {}
        None => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "Missing grant_type");
        }
        Some(_) => {
            return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "Unsupported grant type");
        }
    }
    // RFC 6749 §2.3: a client uses one authentication method per request.
    let methods = [
        request.basic.is_some(),
        request.field("client_secret").is_some(),
        request.field("client_assertion").is_some(),
    ];
    if methods.iter().filter(|used| **used).count() > 1 {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "More than one client authentication method",
        );
    }
    if let Some(client_assertion) = request.field("client_assertion") {
        if request.field("client_assertion_type") != Some(ASSERTION_TYPE) {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                "Parameter client_assertion_type is missing or incorrect",
            );
        }
        let token_url = format!("{}/oauth/token", shared.base_url);
        let client_id = request.client_id().unwrap_or_default();
        let mut state = shared.lock();
        let clients = &mut state.assertion_clients;
        if clients.federated.contains_key(client_id) || request.field("client_id").is_none() {
            // Entra's workload identity federation: a token another issuer signed.
            let verdict = assertion::verify_federated(clients, client_id, client_assertion);
            drop(state);
            if let Err(description) = verdict {
                return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &description);
            }
        } else {
            let verdict = assertion::verify(clients, client_id, client_assertion, &token_url);
            drop(state);
            if let Err(description) = verdict {
                return oauth_error(StatusCode::UNAUTHORIZED, "unauthorized_client", description);
            }
        }
    } else if client_secret.is_none() || client_secret.as_deref() != request.client_secret() {
        return invalid_client();
    }
    let audience = match token_audience(&shared.options.audience, request) {
        Ok(audience) => audience,
        Err((error, description)) => return oauth_error(StatusCode::BAD_REQUEST, error, description),
    };
    let audience = audience.as_str();
    // Entra-style endpoints (no configured audience) take the resource from `scope`.
    if !shared.options.audience.is_empty() && !unknown_scopes.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!("Invalid scopes: {}", unknown_scopes.join(" ")),
        );
    }

    let client_id = request.client_id().unwrap_or_default();
    let scope = request.field("scope");
    let lifetime_secs = whole_seconds_rounded_up(lifetime);
    let expires_in = expires_in_override.unwrap_or(lifetime_secs);
    // Issued now, not when the request arrived: a slow endpoint must not shorten the lifetime.
    let now = SystemTime::now();
    let issued_at = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let jwt = || {
        let claims = Claims {
            iss: &shared.base_url,
            aud: audience,
            sub: client_id,
            azp: client_id,
            iat: issued_at,
            exp: issued_at + lifetime_secs,
            jti: random_token(16),
            scope,
        };
        let token = shared.issuer.sign(&claims)?;
        shared.lock().tokens.issued(&token, None, audience, permitted);
        anyhow::Ok(token)
    };
    let opaque = || {
        let token = random_token(40);
        let expires_at = now + Duration::from_secs(lifetime_secs);
        shared.lock().tokens.issued(&token, Some(expires_at), audience, permitted);
        token
    };
    let scope = scope.unwrap_or_default();

    let body = match token_answer {
        TokenAnswer::Jwt | TokenAnswer::Keycloak400ForJson | TokenAnswer::EchoSecretInError => match jwt() {
            Ok(token) => json!({
                "access_token": token,
                "expires_in": expires_in,
                "token_type": "Bearer",
                "scope": scope,
            }),
            Err(error) => return internal_error(&error),
        },
        TokenAnswer::OpaqueWithExpiresIn => json!({
            "access_token": opaque(),
            "expires_in": expires_in,
            "token_type": "Bearer",
            "scope": scope,
        }),
        TokenAnswer::OpaqueWithoutExpiresIn => json!({
            "access_token": opaque(),
            "token_type": "Bearer",
            "scope": scope,
        }),
        TokenAnswer::JsonWithoutAccessToken => json!({
            "expires_in": expires_in,
            "token_type": "Bearer",
            "scope": scope,
        }),
        TokenAnswer::Html200 => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\
                 <body><h1>Sign in to continue</h1></body></html>\n",
            )
                .into_response();
        }
        TokenAnswer::Huge => {
            let token = match jwt() {
                Ok(token) => token,
                Err(error) => return internal_error(&error),
            };
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                huge_body(&token, expires_in),
            )
                .into_response();
        }
    };
    let mut response = json_response(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

/// The audience of the token to issue. With an empty configured audience the endpoint acts
/// like Microsoft Entra ID: an `audience` parameter is refused, and the resource comes from
/// a `scope` of the form `<resource>/.default`. `Err` holds the OAuth2 error and its
/// description, answered with 400.
fn token_audience(configured: &str, request: &TokenRequest) -> Result<String, (&'static str, &'static str)> {
    if configured.is_empty() {
        if request.field("audience").is_some() {
            return Err((
                "invalid_request",
                "AADSTS901002: The 'audience' request parameter is not supported.",
            ));
        }
        return match request.field("scope").and_then(|scope| scope.strip_suffix("/.default")) {
            Some(resource) if !resource.is_empty() => Ok(resource.to_owned()),
            _ => Err((
                "invalid_scope",
                "AADSTS1002012: The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
            )),
        };
    }
    match request.field("audience") {
        // SaaS issues tokens for Tasklist's own API and for the Orchestration API (`/v2/**`).
        Some(audience) if audience == configured || audience == ZEEBE_AUDIENCE => Ok(audience.to_owned()),
        _ => Err(("invalid_request", "Unknown or missing audience")),
    }
}

/// A valid token answer after [`HUGE_BODY_BYTES`] of padding, streamed in 64 KiB chunks
/// without a Content-Length (chunked transfer encoding): a client can only refuse it by
/// counting what it reads, not by looking at a header.
fn huge_body(token: &str, expires_in: u64) -> axum::body::Body {
    const CHUNK: usize = 64 * 1024;
    let head = Bytes::from_static(br#"{"padding":""#);
    let padding = Bytes::from(vec![b'x'; CHUNK]);
    let tail = Bytes::from(format!(
        r#"","access_token":"{token}","expires_in":{expires_in},"token_type":"Bearer"}}"#
    ));
    let chunks = std::iter::once(head)
        .chain(std::iter::repeat_n(padding, HUGE_BODY_BYTES / CHUNK))
        .chain(std::iter::once(tail))
        .map(Ok::<_, std::io::Error>);
    axum::body::Body::from_stream(futures::stream::iter(chunks))
}

fn whole_seconds_rounded_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The answer to an unknown client or a wrong secret; it never echoes the secret.
fn invalid_client() -> Response {
    oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "Invalid client or Invalid client credentials",
    )
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(status, json!({ "error": error, "error_description": description }))
}

fn internal_error(error: &anyhow::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("stand-in: {error:#}\n")).into_response()
}

/// `GET /.well-known/openid-configuration`: the parts of a discovery document a client
/// credentials client reads.
pub(super) async fn discovery(State(shared): State<Arc<Shared>>) -> Response {
    let (mode, token_endpoint) = {
        let mut state = shared.lock();
        state.discovery_requests += 1;
        (state.discovery, state.discovered_token_endpoint.clone())
    };
    let not_found = || (StatusCode::NOT_FOUND, "stand-in: no such issuer\n").into_response();
    if let Some(response) = apply_mode(mode, not_found).await {
        return response;
    }
    json_response(
        StatusCode::OK,
        json!({
            "issuer": shared.base_url,
            "token_endpoint": token_endpoint.unwrap_or_else(|| format!("{}/oauth/token", shared.base_url)),
            "jwks_uri": format!("{}/oauth/jwks", shared.base_url),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256"],
        }),
    )
}
