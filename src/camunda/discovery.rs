//! OpenID Connect discovery: the token endpoint of an issuer, read from
//! `<issuer>/.well-known/openid-configuration` and kept until a token request fails.

use std::time::Instant;

use reqwest::Method;

use super::facts::DiscoveryKey;
use super::http::{HttpClient, describe_status};
use super::{AuthFailure, FailureDetail};

/// `<issuer>/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §4).
pub fn discovery_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

/// The token endpoint discovered for `issuer` under `http`'s trust earlier, if any.
pub fn cached_token_endpoint(http: &HttpClient, issuer: &str) -> Option<String> {
    http.facts().token_endpoint(&key(http, issuer), Instant::now())
}

/// Forgets what was discovered for `issuer` under `http`'s trust, so that the next request
/// reads the document again.
pub fn forget(http: &HttpClient, issuer: &str) {
    http.facts().forget_token_endpoint(&key(http, issuer));
}

fn key(http: &HttpClient, issuer: &str) -> DiscoveryKey {
    (issuer.to_owned(), http.trust_key())
}

/// The token endpoint of `issuer`: from the cache, or read from its discovery document.
pub async fn token_endpoint(http: &HttpClient, issuer: &str) -> Result<String, AuthFailure> {
    if let Some(endpoint) = cached_token_endpoint(http, issuer) {
        return Ok(endpoint);
    }
    let url = discovery_url(issuer);
    let failed = |detail: String| format!("OIDC discovery at {url} failed: {detail}");
    let request = http.request(Method::GET, &url).header("accept", "application/json");
    let answer = http
        .send(request)
        .await
        .map_err(|error| AuthFailure::server_error(failed(error.to_string())).with_detail(FailureDetail::DiscoveryFailed))?;
    if !answer.status.is_success() {
        let message = failed(format!("the issuer answered {}", describe_status(answer.status)));
        // A 4xx means the URL is wrong; trying again soon will not help.
        let failure = if answer.status.is_client_error() {
            AuthFailure::rejected(message)
        } else {
            AuthFailure::server_error(message)
        };
        return Err(failure.with_detail(FailureDetail::DiscoveryFailed));
    }
    let endpoint = token_endpoint_of(&answer.body, issuer)
        .map_err(|detail| AuthFailure::server_error(failed(detail)).with_detail(FailureDetail::DiscoveryFailed))?;
    // The issuer, not the user, chose this URL: the administrator's policy decides
    // whether the client's secret or assertion may go there.
    if let Some(policy) = http.host_policy() {
        policy
            .check_url_resolved("the token endpoint discovered from auth.oauth2.issuerUrl", &endpoint)
            .await
            .map_err(|why| AuthFailure::rejected(failed(why)).with_detail(FailureDetail::DiscoveryFailed))?;
    }
    http.facts()
        .remember_token_endpoint(key(http, issuer), endpoint.clone(), Instant::now());
    Ok(endpoint)
}

/// The `token_endpoint` of a discovery document. An https issuer must name an https
/// endpoint: the client's secret or assertion goes there.
fn token_endpoint_of(document: &[u8], issuer: &str) -> Result<String, String> {
    let Ok(document) = serde_json::from_slice::<serde_json::Value>(document) else {
        return Err("the answer is not a JSON discovery document".into());
    };
    let Some(endpoint) = document.get("token_endpoint").and_then(|value| value.as_str()) else {
        return Err("the discovery document has no token_endpoint".into());
    };
    let scheme_ok = if issuer.starts_with("https://") {
        endpoint.starts_with("https://")
    } else {
        endpoint.starts_with("https://") || endpoint.starts_with("http://")
    };
    if !scheme_ok || endpoint.len() > 2048 {
        return Err(format!(
            "the discovery document's token_endpoint is not an {} URL",
            if issuer.starts_with("https://") { "https" } else { "http(s)" }
        ));
    }
    Ok(endpoint.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_below_the_issuer_with_or_without_a_slash() {
        assert_eq!(
            discovery_url("https://login.example/tenant/v2.0/"),
            "https://login.example/tenant/v2.0/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("http://kc/auth/realms/camunda-platform"),
            "http://kc/auth/realms/camunda-platform/.well-known/openid-configuration"
        );
    }

    #[test]
    fn reads_the_token_endpoint() {
        let document = br#"{"issuer":"https://idp","token_endpoint":"https://idp/oauth2/v2.0/token","jwks_uri":"https://idp/keys"}"#;
        assert_eq!(token_endpoint_of(document, "https://idp").unwrap(), "https://idp/oauth2/v2.0/token");
    }

    #[test]
    fn refuses_documents_without_a_usable_endpoint() {
        assert!(token_endpoint_of(b"<html>", "https://idp").unwrap_err().contains("not a JSON"));
        assert!(
            token_endpoint_of(br#"{"issuer":"x"}"#, "https://idp")
                .unwrap_err()
                .contains("no token_endpoint")
        );
        let downgrade = br#"{"token_endpoint":"http://idp/token"}"#;
        assert!(token_endpoint_of(downgrade, "https://idp").unwrap_err().contains("https"));
        assert!(token_endpoint_of(downgrade, "http://idp").is_ok());
        assert!(token_endpoint_of(br#"{"token_endpoint":"ftp://idp/token"}"#, "http://idp").is_err());
    }

    fn client(settings: &crate::camunda::HttpSettings, insecure_skip_verify: bool) -> HttpClient {
        let trust = crate::camunda::TlsTrust {
            insecure_skip_verify,
            ..Default::default()
        };
        HttpClient::new(settings, &trust).expect("a client")
    }

    #[test]
    fn the_cache_is_forgotten_on_request() {
        let http = client(&crate::camunda::HttpSettings::default(), false);
        http.facts()
            .remember_token_endpoint(key(&http, "https://cache-test"), "https://cache-test/token".into(), Instant::now());
        assert_eq!(
            cached_token_endpoint(&http, "https://cache-test").as_deref(),
            Some("https://cache-test/token")
        );
        forget(&http, "https://cache-test");
        assert_eq!(cached_token_endpoint(&http, "https://cache-test"), None);
    }

    #[test]
    fn what_one_trust_discovered_is_not_used_under_another() {
        // Two clients of the same settings share what they learn, but only under one trust.
        let settings = crate::camunda::HttpSettings::default();
        let (verified, insecure) = (client(&settings, false), client(&settings, true));
        let issuer = "https://trust-test";
        insecure
            .facts()
            .remember_token_endpoint(key(&insecure, issuer), "https://attacker/token".into(), Instant::now());
        assert_eq!(cached_token_endpoint(&verified, issuer), None);
        assert_eq!(cached_token_endpoint(&insecure, issuer).as_deref(), Some("https://attacker/token"));
        forget(&insecure, issuer);
    }
}
