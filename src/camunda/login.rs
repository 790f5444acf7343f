//! Tasklist's own login: `POST /api/login` (8.6, 8.7) or `POST /login` (8.8+) with a username
//! and password (Spring Security form login), answered with a session cookie and, where CSRF
//! protection is on, a CSRF token.
//!
//! Newer Camunda versions also protect the login itself: `POST /login` wants an
//! `X-CSRF-TOKEN` header handed out by a preceding `GET /login`, and refuses the login with
//! 401 or 403 without it. The login is tried without first (servers that do not ask for it
//! answer at once, with no extra request); only a refused login fetches a token with `GET`
//! on the same path and is sent once more with it. A login URL where that worked gets the
//! `GET` first from then on (remembered in the HTTP clients' [`super::facts`]).

use reqwest::Method;
use reqwest::header::{COOKIE, HeaderMap, HeaderValue, SET_COOKIE};

use super::http::{HttpClient, describe_status, excerpt};
use super::{AuthFailure, Sensitive, redact};

/// Header names Tasklist uses for the CSRF token: the current one, then the one older
/// versions used.
pub const CSRF_HEADERS: [&str; 2] = ["X-CSRF-TOKEN", "TASKLIST-X-CSRF-TOKEN"];

/// Where to log in.
#[derive(Debug, Clone)]
pub struct CookieLogin {
    pub login_url: String,
}

/// The username and password from the referenced Secret.
#[derive(Debug, Clone)]
pub struct LoginCredentials {
    pub username: String,
    pub password: Sensitive,
}

/// A logged-in session: every cookie the login set, and the CSRF token when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub cookies: Vec<(String, Sensitive)>,
    pub csrf_token: Option<Sensitive>,
    cookie_header: Sensitive,
}

impl Session {
    pub fn new(cookies: Vec<(String, Sensitive)>, csrf_token: Option<Sensitive>) -> Self {
        let cookie_header = cookie_header(&cookies);
        Session {
            cookies,
            csrf_token,
            cookie_header,
        }
    }

    /// A session read back from a stored `Cookie` header value.
    pub fn from_cookie_header(header: &str, csrf_token: Option<Sensitive>) -> Self {
        let cookies = header
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, value)| (name.trim().to_owned(), Sensitive::new(value.trim())))
            .collect();
        Session::new(cookies, csrf_token)
    }

    /// A `Cookie` header value with every cookie the login set.
    pub fn cookie_header(&self) -> Sensitive {
        self.cookie_header.clone()
    }

    pub fn cookie_header_ref(&self) -> &Sensitive {
        &self.cookie_header
    }

    /// The header name to send the CSRF token under: the name of the CSRF cookie the
    /// server set (older Tasklists use `TASKLIST-X-CSRF-TOKEN`), else `X-CSRF-TOKEN`.
    pub fn csrf_header_name(&self) -> &'static str {
        CSRF_HEADERS
            .iter()
            .find(|header| self.cookies.iter().any(|(name, _)| name.eq_ignore_ascii_case(header)))
            .copied()
            .unwrap_or(CSRF_HEADERS[0])
    }
}

fn cookie_header(cookies: &[(String, Sensitive)]) -> Sensitive {
    let pairs: Vec<String> = cookies.iter().map(|(name, value)| format!("{name}={}", value.expose())).collect();
    Sensitive::new(pairs.join("; "))
}

/// What a `GET` of the login path handed out for the login to send back: its cookies (the
/// CSRF cookie, a pre-login session) and the CSRF token under the header name it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LoginCsrf {
    cookies: Vec<(String, Sensitive)>,
    header: &'static str,
    token: Sensitive,
}

/// Whether a refused login may be a missing CSRF token, worth one `GET` for a token and one
/// more try: servers that check it answer 401 or 403 without it (a wrong password too,
/// which the second try then reports).
fn may_want_a_csrf_token(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403)
}

/// The CSRF token a `GET` of the login path handed out, as a header (`X-CSRF-TOKEN` or the
/// older name) or, failing that, as a cookie of that name; `None` when it gave none.
fn login_csrf_from_answer(headers: &HeaderMap) -> Option<LoginCsrf> {
    let cookies = set_cookies(headers);
    let from_header = CSRF_HEADERS.iter().find_map(|name| {
        let value = headers.get(*name)?.to_str().ok().filter(|value| !value.is_empty())?;
        Some((*name, Sensitive::new(value)))
    });
    let from_cookie = || {
        CSRF_HEADERS.iter().find_map(|name| {
            let (_, value) = cookies.iter().find(|(cookie, _)| cookie.eq_ignore_ascii_case(name))?;
            Some((*name, value.clone()))
        })
    };
    let (header, token) = from_header.or_else(from_cookie)?;
    Some(LoginCsrf { cookies, header, token })
}

impl CookieLogin {
    /// Logs in with a form body, which keeps the password out of access logs; where the
    /// server refuses a login without a CSRF token, fetches one first (see the module).
    pub async fn log_in(&self, http: &HttpClient, credentials: &LoginCredentials) -> Result<Session, AuthFailure> {
        // A login URL known to demand the token gets it first: a re-login costs two
        // requests, not three.
        if http.facts().demands_csrf(&self.login_url)
            && let Some(csrf) = self.fetch_csrf(http).await
        {
            let answer = self.post(http, credentials, Some(&csrf)).await?;
            return session_after_login(answer, credentials, &csrf.cookies);
        }
        let answer = self.post(http, credentials, None).await?;
        if may_want_a_csrf_token(answer.status)
            && let Some(csrf) = self.fetch_csrf(http).await
        {
            let answer = self.post(http, credentials, Some(&csrf)).await?;
            if answer.status.is_success() {
                http.facts().remember_demands_csrf(&self.login_url);
            }
            return session_after_login(answer, credentials, &csrf.cookies);
        }
        session_after_login(answer, credentials, &[])
    }

    /// `GET` on the login path, for a CSRF token; `None` when the server gives none (an
    /// older Tasklist answers 405, which is no failure of the login itself).
    async fn fetch_csrf(&self, http: &HttpClient) -> Option<LoginCsrf> {
        let request = http.request(Method::GET, &self.login_url);
        let answer = http.send(request).await.ok()?;
        if !answer.status.is_success() {
            return None;
        }
        login_csrf_from_answer(&answer.headers)
    }

    async fn post(
        &self,
        http: &HttpClient,
        credentials: &LoginCredentials,
        csrf: Option<&LoginCsrf>,
    ) -> Result<super::http::Answer, AuthFailure> {
        let form = [
            ("username", credentials.username.as_str()),
            ("password", credentials.password.expose()),
        ];
        let mut request = http.request(Method::POST, &self.login_url).form(&form);
        if let Some(csrf) = csrf {
            request = request
                .header(csrf.header, sensitive_header(csrf.token.expose()))
                .header(COOKIE, sensitive_header(cookie_header(&csrf.cookies).expose()));
        }
        http.send(request)
            .await
            .map_err(|error| AuthFailure::server_error(format!("the login endpoint could not be used: {error}")))
    }
}

/// A header value kept out of debug output; a value that is no valid header (not from a
/// server that follows HTTP) is sent empty.
fn sensitive_header(value: &str) -> HeaderValue {
    let mut value = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

/// The session a login answer gives, or why there is none. `earlier_cookies` (from the
/// CSRF pre-fetch) stay part of the session unless the login set a cookie of that name.
fn session_after_login(
    answer: super::http::Answer,
    credentials: &LoginCredentials,
    earlier_cookies: &[(String, Sensitive)],
) -> Result<Session, AuthFailure> {
    let status = answer.status;
    if status.is_client_error() {
        return Err(AuthFailure::rejected(format!(
            "the login was refused ({}){}",
            describe_status(status),
            login_error_detail(&answer.body, credentials)
        )));
    }
    if !status.is_success() {
        return Err(AuthFailure::server_error(format!(
            "the login endpoint answered {}",
            describe_status(status)
        )));
    }
    session_from_answer(&answer.headers, earlier_cookies)
}

/// Every cookie an answer sets (`name=value`; cleared cookies are left out).
fn set_cookies(headers: &HeaderMap) -> Vec<(String, Sensitive)> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(cookie_pair)
        .collect()
}

fn session_from_answer(headers: &HeaderMap, earlier_cookies: &[(String, Sensitive)]) -> Result<Session, AuthFailure> {
    let set_now = set_cookies(headers);
    if set_now.is_empty() {
        return Err(AuthFailure::server_error(
            "the login answered with success but set no cookie: is loginPath the Tasklist login endpoint?",
        ));
    }
    // Cookies from before the login stay (a load balancer's, say) unless the login replaced them.
    let mut cookies: Vec<(String, Sensitive)> = earlier_cookies
        .iter()
        .filter(|(name, _)| !set_now.iter().any(|(now, _)| now == name))
        .cloned()
        .collect();
    cookies.extend(set_now);
    let csrf_from_header = CSRF_HEADERS
        .iter()
        .find_map(|name| headers.get(*name))
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
        .map(Sensitive::new);
    // Where the server sent the token only as a cookie, that cookie is still the token.
    let csrf_token = csrf_from_header.or_else(|| {
        cookies
            .iter()
            .find(|(name, _)| CSRF_HEADERS.iter().any(|csrf| csrf.eq_ignore_ascii_case(name)))
            .map(|(_, value)| value.clone())
    });
    Ok(Session::new(cookies, csrf_token))
}

/// `name=value` from a `Set-Cookie` header; attributes (Path, HttpOnly, …) are dropped,
/// and a cookie being cleared (empty value) is not kept.
fn cookie_pair(set_cookie: &str) -> Option<(String, Sensitive)> {
    let pair = set_cookie.split(';').next()?;
    let (name, value) = pair.split_once('=')?;
    let (name, value) = (name.trim(), value.trim());
    (!name.is_empty() && !value.is_empty()).then(|| (name.to_owned(), Sensitive::new(value)))
}

/// Tasklist answers a failed login with `{"message": ...}`.
fn login_error_detail(body: &[u8], credentials: &LoginCredentials) -> String {
    #[derive(serde::Deserialize)]
    struct LoginError {
        message: Option<String>,
    }
    let Some(message) = serde_json::from_slice::<LoginError>(body).ok().and_then(|error| error.message) else {
        return String::new();
    };
    // Redact first, then shorten: shortening first could leave a prefix of the password.
    let message = redact(&message, &[credentials.password.expose()]);
    format!(": {}", excerpt(message.as_bytes(), 200))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn keeps_every_cookie_and_the_csrf_header() {
        let session = session_from_answer(
            &headers(&[
                ("set-cookie", "TASKLIST-SESSION=abc; Path=/; HttpOnly; SameSite=Lax"),
                ("set-cookie", "X-CSRF-TOKEN=xyz; Path=/"),
                ("x-csrf-token", "xyz"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(session.cookie_header().expose(), "TASKLIST-SESSION=abc; X-CSRF-TOKEN=xyz");
        assert_eq!(session.csrf_token.unwrap().expose(), "xyz");
    }

    #[test]
    fn accepts_the_older_csrf_header_and_no_csrf_at_all() {
        let legacy = session_from_answer(
            &headers(&[("set-cookie", "TASKLIST-SESSION=abc"), ("tasklist-x-csrf-token", "old")]),
            &[],
        )
        .unwrap();
        assert_eq!(legacy.csrf_token.unwrap().expose(), "old");
        let none = session_from_answer(&headers(&[("set-cookie", "TASKLIST-SESSION=abc")]), &[]).unwrap();
        assert_eq!(none.csrf_token, None);
    }

    #[test]
    fn a_password_straddling_the_200_character_cut_leaves_no_prefix() {
        let credentials = LoginCredentials {
            username: "demo".into(),
            password: Sensitive::new("Pw9xK2mQ7vLr"),
        };
        for offset in 190..200 {
            let body = serde_json::json!({"message": format!("{}{} is wrong", "m".repeat(offset), "Pw9xK2mQ7vLr")}).to_string();
            let detail = login_error_detail(body.as_bytes(), &credentials);
            assert!(!detail.contains("Pw9x"), "offset {offset}: {detail}");
        }
    }

    #[test]
    fn success_without_a_cookie_is_a_server_error() {
        assert!(session_from_answer(&headers(&[]), &[]).is_err());
        assert!(session_from_answer(&headers(&[("set-cookie", "TASKLIST-SESSION=; Max-Age=0")]), &[]).is_err());
    }

    #[test]
    fn the_pre_fetch_reads_the_csrf_header_else_the_cookie() {
        let answer = headers(&[
            ("set-cookie", "X-CSRF-TOKEN=from-cookie; Path=/"),
            ("set-cookie", "camunda-session=anonymous; Path=/"),
            ("x-csrf-token", "from-header"),
        ]);
        let csrf = login_csrf_from_answer(&answer).expect("a token");
        assert_eq!((csrf.header, csrf.token.expose()), ("X-CSRF-TOKEN", "from-header"));
        assert_eq!(csrf.cookies.len(), 2);

        let legacy = login_csrf_from_answer(&headers(&[("set-cookie", "TASKLIST-X-CSRF-TOKEN=old")])).expect("a token");
        assert_eq!((legacy.header, legacy.token.expose()), ("TASKLIST-X-CSRF-TOKEN", "old"));

        assert_eq!(login_csrf_from_answer(&headers(&[("set-cookie", "JSESSIONID=x")])), None);
        assert_eq!(login_csrf_from_answer(&headers(&[])), None);
    }

    #[test]
    fn only_a_401_or_403_login_tries_a_csrf_token() {
        for (status, retry) in [
            (401, true),
            (403, true),
            (400, false),
            (404, false),
            (405, false),
            (500, false),
            (204, false),
        ] {
            let status = reqwest::StatusCode::from_u16(status).unwrap();
            assert_eq!(may_want_a_csrf_token(status), retry, "{status}");
        }
    }

    #[test]
    fn the_login_answer_replaces_pre_fetched_cookies_of_the_same_name_and_keeps_the_rest() {
        let earlier = vec![
            ("X-CSRF-TOKEN".to_owned(), Sensitive::new("before")),
            ("lb-affinity".to_owned(), Sensitive::new("node-2")),
        ];
        let session = session_from_answer(
            &headers(&[
                ("set-cookie", "camunda-session=abc; Path=/; HttpOnly"),
                ("set-cookie", "X-CSRF-TOKEN=after; Path=/"),
            ]),
            &earlier,
        )
        .unwrap();
        assert_eq!(
            session.cookie_header().expose(),
            "lb-affinity=node-2; camunda-session=abc; X-CSRF-TOKEN=after"
        );
        assert_eq!(session.csrf_token.unwrap().expose(), "after");
    }
}
