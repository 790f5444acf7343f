//! Obtaining a new credential: a token from the token endpoint or a session from the
//! login, with its lifetime and the time to replace it.

use jiff::Timestamp;

use crate::camunda::{AuthFailure, HttpClient};
use crate::credential::{Credential, NEVER, add, bearer_token_expiry};
use crate::derived_secret::StoredCredential;
use crate::inputs::Inputs;
use crate::inputs::LoginMaterial;
use crate::schedule::{RefreshPolicy, refresh_time, session_lifetime};

/// With the default refresh policy (as `check` uses it).
pub async fn obtain_credential(inputs: &Inputs, http: &HttpClient) -> Result<StoredCredential, AuthFailure> {
    obtain_credential_with(inputs, http, &RefreshPolicy::default()).await
}

pub async fn obtain_credential_with(inputs: &Inputs, http: &HttpClient, policy: &RefreshPolicy) -> Result<StoredCredential, AuthFailure> {
    // Whole seconds: the Secret stores RFC 3339 without fractions, and a credential read
    // back after a restart must compare equal to the one written.
    let issued_at = whole_seconds(Timestamp::now());
    let (credential, expires_at) = match &inputs.login {
        LoginMaterial::OAuth2 { endpoint, client } => {
            let grant = endpoint.request_token(http, client).await?;
            let expires_at = bearer_token_expiry(&grant.access_token, grant.expires_in, issued_at, policy.max_credential_lifetime)?;
            (Credential::Bearer(grant.access_token), expires_at)
        }
        LoginMaterial::Cookie {
            login,
            credentials,
            session_timeout,
        } => {
            let session = login.log_in(http, credentials).await?;
            let lifetime = session_lifetime(*session_timeout).min(policy.max_credential_lifetime);
            (Credential::Session(session), add(issued_at, lifetime))
        }
        LoginMaterial::Basic { authorization, .. } => {
            // Nothing to obtain and nothing expires: the credential is replaced only when
            // the source Secret or the spec changes.
            return Ok(StoredCredential {
                credential: Credential::Basic(authorization.clone()),
                issued_at,
                expires_at: NEVER,
                refresh_at: NEVER,
                inputs: inputs.fingerprint.clone(),
            });
        }
    };
    let expires_at = whole_seconds(expires_at);
    let refresh_at = refresh_time(issued_at, expires_at, inputs.refresh_before, policy, rand::random());
    Ok(StoredCredential {
        credential,
        issued_at,
        expires_at,
        // Milliseconds: with short lifetimes, whole seconds would bunch the jitter into a
        // few instants.
        refresh_at: Timestamp::from_millisecond(refresh_at.as_millisecond()).unwrap_or(refresh_at),
        inputs: inputs.fingerprint.clone(),
    })
}

pub fn whole_seconds(timestamp: Timestamp) -> Timestamp {
    Timestamp::from_second(timestamp.as_second()).unwrap_or(timestamp)
}
