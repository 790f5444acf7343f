//! Obtaining a new credential: a token from the token endpoint or a session from the
//! login, with its lifetime and the time to replace it.

use std::hash::Hash;

use jiff::Timestamp;

use crate::camunda::{AuthFailure, AuthFailureKind, HttpClient, Sensitive};
use crate::credential::{Credential, bearer_token_expiry};
use crate::derived_secret::StoredCredential;
use crate::inputs::Inputs;
use crate::inputs::LoginMaterial;
use crate::schedule::{RefreshPolicy, refresh_time, session_lifetime};
use crate::time::{NEVER, add, whole_milliseconds, whole_seconds};
use crate::token_cache::{SharedToken, TokenCache, TokenKey, TokenSource, refresh_time_if_reusable};

/// With the default refresh policy (as `check` uses it).
pub async fn obtain_credential(inputs: &Inputs, http: &HttpClient) -> Result<StoredCredential, AuthFailure> {
    obtain_credential_with(inputs, http, &RefreshPolicy::default()).await
}

pub async fn obtain_credential_with(inputs: &Inputs, http: &HttpClient, policy: &RefreshPolicy) -> Result<StoredCredential, AuthFailure> {
    // The room before expiry depends on whether the connection's Pods are all nudged.
    let policy = &policy.for_connection(inputs.all_consumers_nudged);
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
    Ok(stored(
        credential,
        issued_at,
        whole_seconds(expires_at),
        inputs,
        policy,
        rand::random(),
    ))
}

/// A credential obtained for a connection, and whether a request was sent for it.
pub struct Obtained {
    pub result: Result<StoredCredential, AuthFailure>,
    pub source: TokenSource,
}

/// As [`obtain_credential_with`], but a token is shared with the other connections of
/// `cache` that would send the same token request (see [`crate::token_cache`]): a token
/// another connection obtained is reused while this connection's own refresh time for it
/// is ahead, and a request in flight is awaited rather than sent again. `held` is the token
/// the connection has now: it is never handed back, and leaves the cache (its refresh
/// is due, its inputs changed, or Tasklist refused it). With `reuse` false no cached token
/// is taken (a request in flight is still awaited): the contract restores a deleted or
/// edited derived Secret with a new credential. Sessions and HTTP Basic are not shared.
pub async fn obtain_shared_credential<User: Hash + Eq + Send + 'static>(
    inputs: &Inputs,
    http: &HttpClient,
    policy: &RefreshPolicy,
    cache: &TokenCache<User>,
    user: User,
    held: Option<&Sensitive>,
    reuse: bool,
) -> Obtained {
    let policy = &policy.for_connection(inputs.all_consumers_nudged);
    let LoginMaterial::OAuth2 { endpoint, client } = &inputs.login else {
        return Obtained {
            result: obtain_credential_with(inputs, http, policy).await,
            source: TokenSource::Requested,
        };
    };
    let url = match endpoint.resolve(http).await {
        Ok(url) => url,
        Err(failure) => {
            return Obtained {
                result: Err(failure),
                source: TokenSource::Requested,
            };
        }
    };
    let key = TokenKey::new(&url, endpoint, client, &inputs.trust);
    // One draw decides both whether a cached token is reusable and the refresh time given.
    let jitter: f64 = rand::random();
    let now = Timestamp::now();
    let reusable = |token: &SharedToken| reuse && refresh_time_if_reusable(token, inputs.refresh_before, policy, jitter, now).is_some();
    let fetch = {
        let (endpoint, client, http, url) = (endpoint.clone(), client.clone(), http.clone(), url.clone());
        let max_lifetime = policy.max_credential_lifetime;
        move || async move {
            let issued_at = whole_seconds(Timestamp::now());
            let grant = endpoint.request_token_at(&url, &http, &client).await?;
            let expires_at = bearer_token_expiry(&grant.access_token, grant.expires_in, issued_at, max_lifetime)?;
            Ok(SharedToken {
                access_token: grant.access_token,
                issued_at,
                expires_at: whole_seconds(expires_at),
            })
        }
    };
    let (source, result) = cache.obtain(key, user, held, reusable, fetch).await;
    let result = match result {
        Ok(token) => Ok(stored(
            Credential::Bearer(token.access_token),
            token.issued_at,
            token.expires_at,
            inputs,
            policy,
            jitter,
        )),
        // A token that expired on arrival says nothing about the endpoint's address.
        Err(failure) if failure.kind == AuthFailureKind::ExpiredOnArrival => Err(failure),
        // Each connection words the failure for its own spec (an issuer's endpoint is
        // forgotten, so that its next try reads the discovery document again).
        Err(failure) => Err(endpoint.after_failed_request(http, &url, failure)),
    };
    Obtained { result, source }
}

/// The credential with its refresh time, planned by the refresh rule with `jitter`.
fn stored(
    credential: Credential,
    issued_at: Timestamp,
    expires_at: Timestamp,
    inputs: &Inputs,
    policy: &RefreshPolicy,
    jitter: f64,
) -> StoredCredential {
    let refresh_at = refresh_time(issued_at, expires_at, inputs.refresh_before, policy, jitter);
    StoredCredential {
        credential,
        issued_at,
        expires_at,
        // Milliseconds: with short lifetimes, whole seconds would bunch the jitter into a
        // few instants.
        refresh_at: whole_milliseconds(refresh_at),
        inputs: inputs.fingerprint.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::camunda::token::{ClientCredentials, TokenEndpoint};
    use crate::camunda::{HttpSettings, TlsTrust};
    use crate::crd::RequestEncoding;

    /// A token endpoint on 127.0.0.1 that counts requests and holds every answer until the
    /// test opens the gate.
    struct CountingTokenEndpoint {
        url: String,
        requests: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl CountingTokenEndpoint {
        async fn start() -> CountingTokenEndpoint {
            let requests = Arc::new(AtomicUsize::new(0));
            let gate = Arc::new(tokio::sync::Semaphore::new(0));
            let (counter, held) = (requests.clone(), gate.clone());
            let router = axum::Router::new().route(
                "/oauth/token",
                axum::routing::post(move |body: String| {
                    let (counter, held) = (counter.clone(), held.clone());
                    async move {
                        let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        let permit = held.acquire().await;
                        drop(permit);
                        if !body.contains("grant_type=client_credentials") || !body.contains("client_secret=s3cret") {
                            return (axum::http::StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#.to_owned());
                        }
                        (
                            axum::http::StatusCode::OK,
                            format!(r#"{{"access_token":"token-{number}","expires_in":3600,"token_type":"Bearer"}}"#),
                        )
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, router).await });
            CountingTokenEndpoint { url, requests, gate }
        }

        fn open(&self) {
            self.gate.add_permits(1000);
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        fn inputs(&self) -> Inputs {
            Inputs {
                login: LoginMaterial::OAuth2 {
                    endpoint: TokenEndpoint::at(&self.url, "tasklist.camunda.io", None, RequestEncoding::Form),
                    client: ClientCredentials::with_secret_in_body("orders", Sensitive::new("s3cret")),
                },
                trust: TlsTrust::default(),
                refresh_before: None,
                probe_interval: Duration::from_secs(60),
                all_consumers_nudged: false,
                fingerprint: "inputs".into(),
            }
        }

        fn key(&self, inputs: &Inputs) -> TokenKey {
            let LoginMaterial::OAuth2 { endpoint, client } = &inputs.login else {
                unreachable!()
            };
            TokenKey::new(&self.url, endpoint, client, &inputs.trust)
        }
    }

    fn http() -> HttpClient {
        HttpClient::new(&HttpSettings::default(), &TlsTrust::default()).unwrap()
    }

    fn token_of(credential: &StoredCredential) -> &str {
        match &credential.credential {
            Credential::Bearer(token) => token.expose(),
            other => panic!("a token expected, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twenty_concurrent_connections_of_one_client_send_one_request() {
        let server = CountingTokenEndpoint::start().await;
        let (inputs, http, policy) = (server.inputs(), http(), RefreshPolicy::default());
        let cache = TokenCache::<usize>::default();
        let callers = (0..20).map(|user| obtain_shared_credential(&inputs, &http, &policy, &cache, user, None, true));
        let all = futures::future::join_all(callers);
        let release = async {
            // Every caller waits for the one request before the endpoint answers.
            while server.requests() < 1 || cache.joined(server.key(&inputs)) < 19 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            server.open();
        };
        let (obtained, ()) = tokio::join!(all, release);
        assert_eq!(server.requests(), 1, "one request for twenty connections of one client");
        let sources: Vec<TokenSource> = obtained.iter().map(|o| o.source).collect();
        assert_eq!(sources.iter().filter(|s| **s == TokenSource::Requested).count(), 1, "{sources:?}");
        assert_eq!(sources.iter().filter(|s| **s == TokenSource::InFlight).count(), 19, "{sources:?}");
        let credentials: Vec<StoredCredential> = obtained.into_iter().map(|o| o.result.unwrap()).collect();
        let first = &credentials[0];
        for credential in &credentials {
            assert_eq!(token_of(credential), "token-1");
            assert_eq!((credential.issued_at, credential.expires_at), (first.issued_at, first.expires_at));
            // Each connection plans its own refresh: 80 % of 3600 s minus up to 10 % jitter.
            let after = credential.refresh_at.duration_since(credential.issued_at).as_secs();
            assert!((2520..=2880).contains(&after), "refresh {after}s after issue");
        }
        // A connection that comes later gets the cached token: still one request.
        let late = obtain_shared_credential(&inputs, &http, &policy, &cache, 20, None, true).await;
        assert_eq!(late.source, TokenSource::Cached);
        assert_eq!(token_of(&late.result.unwrap()), "token-1");
        assert_eq!(server.requests(), 1);
    }

    #[tokio::test]
    async fn a_refused_token_is_replaced_once_for_every_connection_that_holds_it() {
        let server = CountingTokenEndpoint::start().await;
        server.open();
        let (inputs, http, policy) = (server.inputs(), http(), RefreshPolicy::default());
        let cache = TokenCache::<usize>::default();
        let first = obtain_shared_credential(&inputs, &http, &policy, &cache, 0, None, true)
            .await
            .result
            .unwrap();
        let shared = obtain_shared_credential(&inputs, &http, &policy, &cache, 1, None, true)
            .await
            .result
            .unwrap();
        assert_eq!(token_of(&shared), "token-1");
        // Tasklist refused token-1 (a 401): connection 0 must not get it back from the cache.
        let held = Sensitive::new(token_of(&first));
        let renewed = obtain_shared_credential(&inputs, &http, &policy, &cache, 0, Some(&held), true).await;
        assert_eq!(renewed.source, TokenSource::Requested);
        assert_eq!(token_of(&renewed.result.unwrap()), "token-2");
        // Connection 1, refused too, gets the new one without another request.
        let other = obtain_shared_credential(&inputs, &http, &policy, &cache, 1, Some(&held), true).await;
        assert_eq!(other.source, TokenSource::Cached);
        assert_eq!(token_of(&other.result.unwrap()), "token-2");
        assert_eq!(server.requests(), 2);
    }

    #[tokio::test]
    async fn a_restored_secret_gets_a_new_token_which_the_others_then_share() {
        let server = CountingTokenEndpoint::start().await;
        server.open();
        let (inputs, http, policy) = (server.inputs(), http(), RefreshPolicy::default());
        let cache = TokenCache::<usize>::default();
        obtain_shared_credential(&inputs, &http, &policy, &cache, 0, None, true)
            .await
            .result
            .unwrap();
        // Connection 0's derived Secret was deleted: it holds nothing, and reuses nothing.
        let restored = obtain_shared_credential(&inputs, &http, &policy, &cache, 0, None, false).await;
        assert_eq!(restored.source, TokenSource::Requested);
        assert_eq!(token_of(&restored.result.unwrap()), "token-2");
        let other = obtain_shared_credential(&inputs, &http, &policy, &cache, 1, None, true).await;
        assert_eq!((other.source, token_of(&other.result.unwrap())), (TokenSource::Cached, "token-2"));
        assert_eq!(server.requests(), 2);
    }

    #[tokio::test]
    async fn sessions_are_not_shared() {
        let logins = Arc::new(AtomicUsize::new(0));
        let counter = logins.clone();
        let router = axum::Router::new().route(
            "/api/login",
            axum::routing::post(move || {
                let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    (
                        axum::http::StatusCode::NO_CONTENT,
                        [("set-cookie", format!("TASKLIST-SESSION=session-{number}; Path=/; HttpOnly"))],
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let login_url = format!("http://{}/api/login", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let inputs = Inputs {
            login: LoginMaterial::Cookie {
                login: crate::camunda::login::CookieLogin { login_url },
                credentials: crate::camunda::login::LoginCredentials {
                    username: "demo".into(),
                    password: Sensitive::new("demo-password"),
                },
                session_timeout: Duration::from_secs(1800),
            },
            trust: TlsTrust::default(),
            refresh_before: None,
            probe_interval: Duration::from_secs(60),
            all_consumers_nudged: false,
            fingerprint: "inputs".into(),
        };
        let cache = TokenCache::<usize>::default();
        let policy = RefreshPolicy::default();
        let mut sessions = Vec::new();
        for user in 0..2 {
            let obtained = obtain_shared_credential(&inputs, &http(), &policy, &cache, user, None, true).await;
            assert_eq!(obtained.source, TokenSource::Requested);
            sessions.push(obtained.result.unwrap().credential);
        }
        assert_eq!(logins.load(Ordering::SeqCst), 2, "each connection logs in for a session of its own");
        assert_ne!(sessions[0], sessions[1]);
    }
}
