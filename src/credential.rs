//! The credential the operator keeps for a connection, and how long it lives.

use std::time::Duration;

use base64::Engine as _;
use jiff::Timestamp;

use crate::camunda::login::Session;
use crate::camunda::probe::ProbeCredential;
use crate::camunda::{AuthFailure, AuthFailureKind, Sensitive};
use crate::time::add;

/// Lifetime assumed for a token that is not a JWT with `exp` and comes without `expires_in`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// What Tasklist accepts: a bearer token, a logged-in session, or HTTP Basic credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Bearer(Sensitive),
    Session(Session),
    /// The whole `Authorization` header value, `Basic <base64(username:password)>`.
    Basic(Sensitive),
}

impl Credential {
    pub fn as_probe_credential(&self) -> ProbeCredential<'_> {
        match self {
            Credential::Bearer(token) => ProbeCredential::Bearer(token),
            Credential::Basic(authorization) => ProbeCredential::Authorization(authorization),
            Credential::Session(session) => ProbeCredential::Session {
                cookie_header: session.cookie_header_ref(),
                csrf_token: session.csrf_token.as_ref(),
                csrf_header: session.csrf_header_name(),
            },
        }
    }
}

/// When a freshly issued bearer token expires: the earlier of the JWT `exp` claim (when
/// the token is a JWT with one) and `now + expires_in` (when the endpoint said), otherwise
/// after [`DEFAULT_TOKEN_LIFETIME`]; never later than `now + max_lifetime`. Each source alone
/// can overstate the life: SaaS may hand back a cached token whose `expires_in` is too long,
/// and a server clock ahead of ours moves `exp` later. A token whose `exp` has passed
/// already is refused: the clocks disagree, and storing it would help no one.
pub fn bearer_token_expiry(
    token: &Sensitive,
    expires_in: Option<u64>,
    now: Timestamp,
    max_lifetime: Duration,
) -> Result<Timestamp, AuthFailure> {
    let exp = jwt_expiry(token.expose());
    if let Some(exp) = exp
        && exp <= now
    {
        return Err(AuthFailure {
            kind: AuthFailureKind::ExpiredOnArrival,
            message: format!(
                "the token endpoint issued a token that had expired already (exp {exp}, {}s before this machine's time {now}): \
                 probably the clocks of this machine and the token server disagree",
                crate::time::since(now, exp).as_secs()
            ),
            detail: None,
        });
    }
    let from_expires_in = expires_in
        .filter(|seconds| *seconds > 0)
        .map(|seconds| add(now, Duration::from_secs(seconds)));
    let expiry = match (exp, from_expires_in) {
        (Some(exp), Some(stated)) => exp.min(stated),
        (Some(only), None) | (None, Some(only)) => only,
        (None, None) => add(now, DEFAULT_TOKEN_LIFETIME),
    };
    Ok(expiry.min(add(now, max_lifetime)))
}

/// The `exp` claim of a JWT, read without verifying the signature: the operator only needs
/// to know when the server will stop accepting the token, not whether to trust it.
pub fn jwt_expiry(token: &str) -> Option<Timestamp> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&decoded).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp <= 0.0 {
        return None;
    }
    Timestamp::from_second(exp as i64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", encode(r#"{"alg":"RS256"}"#), encode(claims))
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_earlier_of_exp_and_expires_in_wins() {
        let token = Sensitive::new(jwt(r#"{"exp":1000,"sub":"x"}"#));
        // A cached SaaS token: expires_in overstates its life.
        assert_eq!(bearer_token_expiry(&token, Some(86_400), at(400), DAY), Ok(at(1000)));
        // A server clock ahead of ours: exp overstates it.
        assert_eq!(bearer_token_expiry(&token, Some(100), at(400), DAY), Ok(at(500)));
    }

    #[test]
    fn expires_in_is_used_for_opaque_tokens_and_300s_otherwise() {
        let opaque = Sensitive::new("not-a-jwt");
        assert_eq!(bearer_token_expiry(&opaque, Some(60), at(0), DAY), Ok(at(60)));
        assert_eq!(bearer_token_expiry(&opaque, None, at(0), DAY), Ok(at(300)));
        assert_eq!(bearer_token_expiry(&opaque, Some(0), at(0), DAY), Ok(at(300)));
        let jwt_without_exp = Sensitive::new(jwt(r#"{"sub":"x"}"#));
        assert_eq!(bearer_token_expiry(&jwt_without_exp, Some(120), at(0), DAY), Ok(at(120)));
    }

    #[test]
    fn lifetimes_are_capped_by_the_maximum() {
        let opaque = Sensitive::new("not-a-jwt");
        assert_eq!(bearer_token_expiry(&opaque, Some(u64::MAX), at(0), DAY), Ok(at(86_400)));
        let far = Sensitive::new(jwt(r#"{"exp":4102444800}"#));
        assert_eq!(bearer_token_expiry(&far, None, at(0), Duration::from_secs(3600)), Ok(at(3600)));
    }

    #[test]
    fn a_token_that_expired_already_names_a_clock_skew() {
        let token = Sensitive::new(jwt(r#"{"exp":100}"#));
        let failure = bearer_token_expiry(&token, Some(300), at(200), DAY).unwrap_err();
        assert_eq!(failure.kind, AuthFailureKind::ExpiredOnArrival);
        assert!(failure.message.contains("clocks"), "{}", failure.message);
        assert!(bearer_token_expiry(&token, Some(300), at(100), DAY).is_err());
    }

    #[test]
    fn garbage_is_not_a_jwt() {
        for token in ["", "a.b", "a.b.c.d", "a.!!!.c", &jwt("[1,2]"), &jwt(r#"{"exp":"soon"}"#)] {
            assert_eq!(jwt_expiry(token), None, "{token}");
        }
    }
}
