//! Tasklist itself: cookie login and logout, and the API used as a connectivity probe.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

use super::bearer::{Grant, bearer_grant};
use super::state::{Session, Shared, apply_mode, header_str, header_value, json_response, random_token, request_cookie};
use super::{ApiRequestRecord, AuthKind, LoginRecord, SESSION_COOKIE, TasklistApis, UNIFIED_SESSION_COOKIE, ZEEBE_AUDIENCE};

/// `POST /api/login`: Spring Security form login, with the credentials as request
/// parameters in the query string or a form body. The session is `TASKLIST-SESSION`.
pub(super) async fn login(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    login_as(&shared, &uri, &headers, &body, "/api/login").await
}

/// `POST /login`: Camunda 8.8+ unified authentication, the same form login; the session is
/// `camunda-session`.
/// With [`super::StandinOptions::login_requires_csrf`], only with the CSRF token of a
/// preceding `GET /login` as header and cookie.
pub(super) async fn unified_login(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    login_as(&shared, &uri, &headers, &body, "/login").await
}

/// `GET /login`: with [`super::StandinOptions::login_requires_csrf`], hands out a CSRF token
/// for the login (header and cookie `X-CSRF-TOKEN`); otherwise `405`, as `/login` answers
/// only `POST` there.
pub(super) async fn login_csrf(State(shared): State<Arc<Shared>>) -> Response {
    shared.lock().login_csrf_fetches += 1;
    if !shared.options.login_requires_csrf {
        let mut response = StatusCode::METHOD_NOT_ALLOWED.into_response();
        response.headers_mut().insert(header::ALLOW, header_value("POST"));
        return response;
    }
    let token = random_token(32);
    shared.lock().login_csrf_tokens.insert(token.clone());
    let csrf_name = shared.options.csrf_name();
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert(csrf_name, header_value(&token));
    headers.append(
        header::SET_COOKIE,
        header_value(&format!("{csrf_name}={token}; Path=/; SameSite=Lax")),
    );
    response
}

/// Whether a login carries, as header and cookie, a CSRF token `GET /login` handed out; the
/// token is used up.
fn login_csrf_valid(shared: &Shared, headers: &HeaderMap) -> bool {
    let csrf_name = shared.options.csrf_name();
    let (Some(from_header), Some(from_cookie)) = (header_str(headers, csrf_name), request_cookie(headers, csrf_name)) else {
        return false;
    };
    from_header == from_cookie && shared.lock().login_csrf_tokens.remove(from_header)
}

async fn login_as(shared: &Shared, uri: &Uri, headers: &HeaderMap, body: &Bytes, path: &'static str) -> Response {
    let cookie_name = if path == "/login" { UNIFIED_SESSION_COOKIE } else { SESSION_COOKIE };
    let csrf_demanded = path == "/login" && shared.options.login_requires_csrf;
    let time = SystemTime::now();
    // Like a servlet's request parameters: the query string first, then the form body.
    let mut parameters: HashMap<String, String> = HashMap::new();
    let query_pairs = uri
        .query()
        .and_then(|query| serde_urlencoded::from_str::<Vec<(String, String)>>(query).ok());
    let body_pairs = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).ok();
    for (name, value) in query_pairs.into_iter().chain(body_pairs).flatten() {
        parameters.entry(name).or_insert(value);
    }
    let username = parameters.get("username").cloned().unwrap_or_default();
    let password = parameters.get("password");

    let mode = shared.lock().login_endpoint;
    let response = match apply_mode(mode, login_failed).await {
        Some(response) => response,
        None if csrf_demanded && !login_csrf_valid(shared, headers) => json_response(
            StatusCode::FORBIDDEN,
            json!({ "error": "Access denied due to invalid CSRF token." }),
        ),
        None => {
            let mut state = shared.lock();
            if password.is_some() && state.users.get(&username) == password {
                let session_id = random_token(32);
                let csrf_token = shared.options.csrf.then(|| random_token(32));
                state.sessions_started += 1;
                let number = state.sessions_started;
                state.session_numbers.insert(session_id.clone(), number);
                state.sessions.insert(
                    session_id.clone(),
                    Session {
                        cookie_name,
                        csrf_token: csrf_token.clone(),
                        last_used: Instant::now(),
                    },
                );
                logged_in(cookie_name, &session_id, csrf_token.as_deref(), shared.options.csrf_name())
            } else {
                login_failed()
            }
        }
    };
    shared.lock().logins.push(LoginRecord {
        time,
        path,
        username,
        csrf_header: header_str(headers, shared.options.csrf_name()).is_some(),
        status: response.status().as_u16(),
    });
    response
}

fn logged_in(cookie_name: &str, session_id: &str, csrf_token: Option<&str>, csrf_name: &'static str) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        header_value(&format!("{cookie_name}={session_id}; Path=/; HttpOnly; SameSite=Lax")),
    );
    if let Some(csrf_token) = csrf_token {
        headers.insert(csrf_name, header_value(csrf_token));
        headers.append(
            header::SET_COOKIE,
            header_value(&format!("{csrf_name}={csrf_token}; Path=/; SameSite=Lax")),
        );
    }
    response
}

fn login_failed() -> Response {
    json_response(StatusCode::UNAUTHORIZED, json!({ "message": "Bad credentials" }))
}

/// `POST /api/logout`: ends the session, if any.
pub(super) async fn logout(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some((_, session_id)) = session_cookie(&headers) {
        shared.lock().sessions.remove(session_id);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, header_value(&format!("{SESSION_COOKIE}=; Path=/; Max-Age=0")));
    response
}

/// The session cookie a request carries: `TASKLIST-SESSION`, else `camunda-session`.
fn session_cookie(headers: &HeaderMap) -> Option<(&'static str, &str)> {
    [SESSION_COOKIE, UNIFIED_SESSION_COOKIE]
        .into_iter()
        .find_map(|name| request_cookie(headers, name).map(|value| (name, value)))
}

/// The one method each Tasklist endpoint the stand-in serves answers to; `None` for a path
/// it does not serve.
fn endpoint_method(path: &str) -> Option<Method> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["v1", "tasks", "search"] => Some(Method::POST),
        ["v1", "tasks", _task_id] => Some(Method::GET),
        ["v1", "tasks", _task_id, "variables", "search"] => Some(Method::POST),
        ["v2", "topology"] => Some(Method::GET),
        ["v2", "user-tasks", "search"] => Some(Method::POST),
        _ => None,
    }
}

/// Whether a token's audience fits the API it calls. On SaaS (a token this stand-in issued)
/// the v2 Orchestration API wants `zeebe.camunda.io`, and v1 wants a Tasklist audience;
/// Self-Managed tokens (trusted JWKS) carry a Tasklist audience for both.
/// On a v2-only stand-in (8.10) every path is the Orchestration Cluster's.
fn audience_fits(path: &str, apis: TasklistApis, grant: &Grant, tasklist_audiences: &[String]) -> bool {
    let orchestration = path.starts_with("/v2/") || apis == TasklistApis::V2Only;
    if orchestration && grant.issued_here {
        grant.audiences.iter().any(|audience| audience == ZEEBE_AUDIENCE)
    } else {
        grant.audiences.iter().any(|audience| tasklist_audiences.contains(audience))
    }
}

/// Any `/v1/**` or `/v2/**` request: authenticates it (401; 403 without the Tasklist
/// permission or the CSRF token), then routes it (404 for an unknown path, 405 for another
/// method than the endpoint's), then answers like an empty Tasklist (`[]` for v1 searches,
/// an empty page for the v2 user task search, `{}` for the rest of v2), in Spring's order.
pub(super) async fn api(State(shared): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let time = SystemTime::now();
    let bearer_token = bearer_token(&headers);
    let session = session_cookie(&headers);
    let session_id = session.map(|(_, id)| id);
    let basic = basic_login(&headers);
    let auth = match (bearer_token, session_id, &basic) {
        (Some(_), _, _) => AuthKind::Bearer,
        (None, _, Some(_)) => AuthKind::Basic,
        (None, Some(_), None) => AuthKind::Cookie,
        (None, None, None) => AuthKind::None,
    };

    let mode = shared.lock().api;
    let response = match apply_mode(mode, unauthorized).await {
        Some(response) => response,
        None => {
            let denial = match (bearer_token, session) {
                (Some(token), _) => match bearer_grant(&shared, token).await {
                    Some(grant) if !audience_fits(uri.path(), shared.options.apis, &grant, &shared.accepted_audiences) => {
                        Some(invalid_bearer())
                    }
                    Some(grant) if !grant.permitted => Some(forbidden()),
                    Some(_) => None,
                    None => Some(invalid_bearer()),
                },
                (None, _) if basic.is_some() => check_basic(&shared, basic.as_ref()),
                (None, Some((cookie_name, session_id))) => check_session(&shared, cookie_name, session_id, &method, &headers),
                (None, None) => Some(unauthorized()),
            };
            let served = shared.options.apis.serves(uri.path());
            denial.unwrap_or_else(|| match endpoint_method(uri.path()).filter(|_| served) {
                None => json_response(
                    StatusCode::NOT_FOUND,
                    json!({ "message": format!("No endpoint {method} {}.", uri.path()) }),
                ),
                Some(allowed) if allowed != method => {
                    let mut response = json_response(
                        StatusCode::METHOD_NOT_ALLOWED,
                        json!({ "message": format!("Request method '{method}' is not supported") }),
                    );
                    response.headers_mut().insert(header::ALLOW, header_value(allowed.as_str()));
                    response
                }
                Some(_) => answer(uri.path(), &body),
            })
        }
    };
    let claims = bearer_token.and_then(jwt_claims);
    let credential = match (auth, &claims, &basic, session) {
        (AuthKind::Bearer, Some(claims), _, _) => claims["jti"].as_str().map(str::to_owned),
        (AuthKind::Basic, _, Some(Some((username, _))), _) => Some(username.clone()),
        (AuthKind::Cookie, _, _, Some((_, session_id))) => {
            let number = shared.lock().session_numbers.get(session_id).copied();
            Some(number.map_or_else(|| "session-unknown".to_owned(), |number| format!("session-{number}")))
        }
        _ => None,
    };
    shared.lock().api_requests.push(ApiRequestRecord {
        time,
        method: method.to_string(),
        path: uri.path().to_owned(),
        auth,
        status: response.status().as_u16(),
        bearer_expires_at: claims
            .as_ref()
            .and_then(|claims| claims["exp"].as_u64())
            .map(|exp| std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp)),
        credential,
    });
    response
}

/// The claims of a JWT, without checking anything.
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = header_str(headers, header::AUTHORIZATION.as_str())?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// The username and password of an `Authorization: Basic` header (RFC 7617: UTF-8, split at
/// the first colon, no further decoding). `Some(None)` for a Basic header that does not decode.
fn basic_login(headers: &HeaderMap) -> Option<Option<(String, String)>> {
    let value = header_str(headers, header::AUTHORIZATION.as_str())?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    Some(decoded.and_then(|text| {
        let (username, password) = text.split_once(':')?;
        Some((username.to_owned(), password.to_owned()))
    }))
}

/// `None` when Basic authentication is on and the username and password are known.
fn check_basic(shared: &Shared, login: Option<&Option<(String, String)>>) -> Option<Response> {
    let known = login
        .and_then(Option::as_ref)
        .is_some_and(|(username, password)| shared.lock().basic_users.get(username) == Some(password));
    if known {
        return None;
    }
    let mut response = unauthorized();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, header_value(r#"Basic realm="Camunda""#));
    Some(response)
}

/// `None` when the session is live (used within the idle timeout, under the cookie name it
/// was issued as) and, for state-changing requests, the CSRF cookie and header both carry
/// the session's CSRF token; otherwise the denial. A live session counts as used now.
fn check_session(shared: &Shared, cookie_name: &str, session_id: &str, method: &Method, headers: &HeaderMap) -> Option<Response> {
    let mut state = shared.lock();
    let timeout = state.session_timeout;
    let Some(session) = state
        .sessions
        .get_mut(session_id)
        .filter(|session| session.cookie_name == cookie_name)
    else {
        return Some(unauthorized());
    };
    if timeout.is_some_and(|timeout| session.last_used.elapsed() >= timeout) {
        state.sessions.remove(session_id);
        return Some(unauthorized());
    }
    session.last_used = Instant::now();
    let state_changing = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
    if let Some(expected) = &session.csrf_token
        && state_changing.contains(method)
    {
        let csrf_name = shared.options.csrf_name();
        let from_cookie = request_cookie(headers, csrf_name);
        let from_header = header_str(headers, csrf_name);
        if from_cookie != Some(expected.as_str()) || from_header != Some(expected.as_str()) {
            return Some(json_response(
                StatusCode::FORBIDDEN,
                json!({ "error": "Access denied due to invalid CSRF token." }),
            ));
        }
    }
    None
}

/// The answer to an authenticated request.
fn answer(path: &str, body: &[u8]) -> Response {
    // Searches take a JSON body; a malformed one is a client error, as in Tasklist.
    if !body.is_empty() && serde_json::from_slice::<serde_json::Value>(body).is_err() {
        return json_response(StatusCode::BAD_REQUEST, json!({ "message": "Malformed JSON request body" }));
    }
    if path.trim_end_matches('/') == "/v2/user-tasks/search" {
        // An empty page, in the shape Camunda 8.8 answers (the clients read `items`).
        json_response(
            StatusCode::OK,
            json!({ "items": [], "page": { "totalItems": 0, "hasMoreTotalItems": false, "startCursor": null, "endCursor": null } }),
        )
    } else if path.starts_with("/v2/") {
        json_response(StatusCode::OK, json!({}))
    } else {
        json_response(StatusCode::OK, json!([]))
    }
}

fn forbidden() -> Response {
    json_response(
        StatusCode::FORBIDDEN,
        json!({ "message": "Access is denied: the client has no permission for the Tasklist API" }),
    )
}

fn unauthorized() -> Response {
    json_response(
        StatusCode::UNAUTHORIZED,
        json!({ "message": "Full authentication is required to access this resource" }),
    )
}

fn invalid_bearer() -> Response {
    let mut response = unauthorized();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, header_value(r#"Bearer error="invalid_token""#));
    response
}
