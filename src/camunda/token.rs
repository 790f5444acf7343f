//! The OAuth2 client-credentials grant against Camunda SaaS or Identity (Keycloak).

use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::http::{HttpClient, TransportError, excerpt};
use super::{AuthFailure, Sensitive, redact};
use crate::crd::RequestEncoding;

/// Where and how to ask for a token.
#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    pub url: String,
    pub audience: String,
    pub scope: Option<String>,
    pub encoding: RequestEncoding,
}

/// The client id and secret from the referenced Secret.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: Sensitive,
}

/// A token as the endpoint handed it out.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub access_token: Sensitive,
    /// Seconds, when the endpoint said; `expires_in` alone is not trusted for the lifetime
    /// when the token is a JWT with `exp` (SaaS may hand back a cached token).
    pub expires_in: Option<u64>,
}

/// RFC 6749's error answer.
#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
}

impl TokenEndpoint {
    /// POSTs `grant_type=client_credentials` with the client id, secret, audience and scope.
    pub async fn request_token(&self, http: &HttpClient, client: &ClientCredentials) -> Result<TokenGrant, AuthFailure> {
        let mut fields = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client.client_id.as_str()),
            ("client_secret", client.client_secret.expose()),
            ("audience", self.audience.as_str()),
        ];
        if let Some(scope) = self.scope.as_deref().filter(|scope| !scope.is_empty()) {
            fields.push(("scope", scope));
        }
        let request = http.request(Method::POST, &self.url).header("accept", "application/json");
        let request = match self.encoding {
            RequestEncoding::Form => request.form(&fields),
            RequestEncoding::Json => request.json(&fields.iter().copied().collect::<std::collections::BTreeMap<_, _>>()),
        };
        let answer = http.send(request).await.map_err(|error| unreachable_token_endpoint(&error))?;
        let status = answer.status;
        if status.is_success() {
            return parse_grant(&answer.body);
        }
        let detail = oauth_error_detail(&answer.body, client);
        if status.is_client_error() {
            Err(AuthFailure::rejected(format!(
                "the token endpoint rejected the request ({}){detail}",
                describe_status(status)
            )))
        } else {
            Err(AuthFailure::server_error(format!(
                "the token endpoint answered {}{detail}",
                describe_status(status)
            )))
        }
    }
}

fn parse_grant(body: &[u8]) -> Result<TokenGrant, AuthFailure> {
    // The body is never quoted: an answer that cannot be parsed may still hold a token.
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Err(AuthFailure::server_error(format!(
            "the token endpoint answered with success but not with JSON ({} bytes; expected an OAuth2 token answer with access_token)",
            body.len()
        )));
    };
    let token = answer
        .get("access_token")
        .and_then(|token| token.as_str())
        .map(str::trim)
        .filter(|token| !token.is_empty());
    let Some(token) = token else {
        return Err(AuthFailure::server_error(
            "the token endpoint answered with success but without an access_token",
        ));
    };
    Ok(TokenGrant {
        access_token: Sensitive::new(token),
        expires_in: answer.get("expires_in").and_then(seconds),
    })
}

/// `expires_in` as a number of seconds, also when a server sends it as a string; anything
/// else counts as absent.
fn seconds(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(number) => number
            .as_u64()
            .or_else(|| number.as_f64().filter(|n| n.is_finite() && *n >= 0.0).map(|n| n as u64)),
        serde_json::Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// ": invalid_client: Invalid client credentials", or "" when the body is not an OAuth2
/// error. Anything that repeats the client id or secret, in any encoding it was sent in, is
/// cut out before the text is shortened (shortening first could leave a prefix behind).
fn oauth_error_detail(body: &[u8], client: &ClientCredentials) -> String {
    let Ok(error) = serde_json::from_slice::<OAuthError>(body) else {
        return String::new();
    };
    let text = match (error.error, error.error_description) {
        (Some(code), Some(description)) => format!("{code}: {description}"),
        (Some(code), None) => code,
        (None, Some(description)) => description,
        (None, None) => return String::new(),
    };
    let secret = client.client_secret.expose();
    let basic = format!("{}:{secret}", client.client_id);
    let text = redact(&text, &[secret, &basic, &client.client_id]);
    format!(": {}", excerpt(text.as_bytes(), 200))
}

fn unreachable_token_endpoint(error: &TransportError) -> AuthFailure {
    AuthFailure::server_error(format!("the token endpoint could not be used: {error}"))
}

pub(crate) fn describe_status(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientCredentials {
        ClientCredentials {
            client_id: "orders".into(),
            client_secret: Sensitive::new("s3cr3t-value"),
        }
    }

    #[test]
    fn reads_a_grant_with_expires_in_as_number_or_string() {
        let grant = parse_grant(br#"{"access_token":"abc","expires_in":300,"token_type":"Bearer"}"#).unwrap();
        assert_eq!(grant.access_token.expose(), "abc");
        assert_eq!(grant.expires_in, Some(300));
        assert_eq!(
            parse_grant(br#"{"access_token":"abc","expires_in":"60"}"#).unwrap().expires_in,
            Some(60)
        );
        assert_eq!(parse_grant(br#"{"access_token":"abc"}"#).unwrap().expires_in, None);
    }

    #[test]
    fn a_page_or_json_without_a_token_is_a_server_error_that_names_no_token() {
        let html = parse_grant(b"<html><body>Login</body></html>").unwrap_err();
        assert_eq!(html.kind, super::super::AuthFailureKind::ServerError);
        assert!(html.message.contains("not with JSON"), "{}", html.message);
        let odd = parse_grant(br#"{"access_token":"secret-token-value","expires_in":true}"#).unwrap();
        assert_eq!(odd.expires_in, None);
        let bare = parse_grant(b"secret-token-value").unwrap_err();
        assert!(!bare.message.contains("secret-token-value"), "{}", bare.message);
        let empty = parse_grant(br#"{"token_type":"Bearer"}"#).unwrap_err();
        assert!(empty.message.contains("without an access_token"));
    }

    #[test]
    fn oauth_errors_are_reported_without_the_secret() {
        let detail = oauth_error_detail(
            br#"{"error":"invalid_client","error_description":"bad secret s3cr3t-value for orders"}"#,
            &client(),
        );
        assert_eq!(detail, ": invalid_client: bad secret <redacted> for <redacted>");
        assert_eq!(oauth_error_detail(b"<html>", &client()), "");
    }

    #[test]
    fn a_secret_straddling_the_200_character_cut_leaves_no_prefix() {
        let secret = client().client_secret;
        for offset in 185..200 {
            let description = format!("{}{} was wrong", "x".repeat(offset), secret.expose());
            let body = serde_json::json!({"error": "invalid_client", "error_description": description}).to_string();
            let detail = oauth_error_detail(body.as_bytes(), &client());
            for prefix_length in 3..=secret.expose().len() {
                let prefix = &secret.expose()[..prefix_length];
                assert!(!detail.contains(prefix), "offset {offset}: {prefix:?} in {detail}");
            }
            let description = format!(
                "{}{}",
                "y".repeat(offset),
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("orders:{}", secret.expose()))
            );
            let body = serde_json::json!({"error_description": description}).to_string();
            let detail = oauth_error_detail(body.as_bytes(), &client());
            assert!(!detail.contains("b3JkZXJz"), "offset {offset}: base64 prefix in {detail}");
        }
    }
}
