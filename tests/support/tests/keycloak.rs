//! Keycloak issues the tokens Tasklist expects (RS256, audience tasklist-api), only for form
//! bodies, and its admin helpers (secret rotation, token lifespan) take effect.
//! Needs the `TLO_*` variables (see `hack/tools.sh`); fails without them.

use anyhow::{Context, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use testsupport::keycloak::Keycloak;
use testsupport::tools::Tools;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_issues_tasklist_tokens_for_form_requests_only() -> anyhow::Result<()> {
    let tools = Tools::from_env()?;
    let keycloak = Keycloak::start(&tools).await?;
    let http = reqwest::Client::builder().no_proxy().build()?;

    let token = client_credentials(&http, &keycloak, keycloak.client_secret()).await?;
    let (header, claims) = decode_jwt(&token)?;
    assert_eq!(header["alg"], "RS256", "{header}");
    assert_eq!(claims["iss"], keycloak.issuer().as_str(), "{claims}");
    let audiences = match &claims["aud"] {
        Value::String(one) => vec![one.clone()],
        Value::Array(many) => many.iter().filter_map(|aud| aud.as_str().map(str::to_string)).collect(),
        other => bail!("unexpected aud {other}"),
    };
    assert!(audiences.iter().any(|aud| aud == "tasklist-api"), "aud = {audiences:?}");
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 300, "{claims}");

    // The signing key is published in the JWKS.
    let jwks: Value = http.get(keycloak.jwks_url()).send().await?.error_for_status()?.json().await?;
    let keys = jwks["keys"].as_array().context("JWKS without keys")?;
    assert!(
        keys.iter().any(|key| key["kid"] == header["kid"]),
        "kid {} not in {jwks}",
        header["kid"]
    );

    // Like real Keycloak: the token endpoint wants a form body, not JSON.
    let json_body = json!({
        "grant_type": "client_credentials",
        "client_id": keycloak.client_id(),
        "client_secret": keycloak.client_secret(),
    });
    let rejected = http.post(keycloak.token_url()).json(&json_body).send().await?;
    assert_eq!(rejected.status(), 400, "{}", rejected.text().await?);

    // A rotated secret replaces the old one at once.
    let old_secret = keycloak.client_secret().to_string();
    let new_secret = keycloak.rotate_client_secret().await?;
    assert_ne!(old_secret, new_secret);
    assert_eq!(keycloak.client_secret(), new_secret);
    assert!(
        client_credentials(&http, &keycloak, &old_secret).await.is_err(),
        "the old secret still works"
    );
    client_credentials(&http, &keycloak, &new_secret).await?;

    keycloak.set_access_token_lifespan(60).await?;
    let (_, claims) = decode_jwt(&client_credentials(&http, &keycloak, &new_secret).await?)?;
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 60, "{claims}");
    Ok(())
}

async fn client_credentials(http: &reqwest::Client, keycloak: &Keycloak, secret: &str) -> anyhow::Result<String> {
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", keycloak.client_id()),
        ("client_secret", secret),
    ];
    let response = http.post(keycloak.token_url()).form(&form).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("token request failed with {status}: {body}");
    }
    Ok(body["access_token"].as_str().context("no access_token")?.to_string())
}

/// Header and claims of a JWT, unverified: the test only inspects what Keycloak put in.
fn decode_jwt(token: &str) -> anyhow::Result<(Value, Value)> {
    let decode = |part: &str| -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part)?,
        )?)
    };
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(_signature)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("not a JWT: {token}");
    };
    Ok((decode(header)?, decode(claims)?))
}
