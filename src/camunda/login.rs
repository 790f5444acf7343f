//! Tasklist's own login: `POST /api/login` with a username and password (Spring Security
//! form login), answered with a session cookie and, where CSRF protection is on, a CSRF token.

use reqwest::Method;
use reqwest::header::{HeaderMap, SET_COOKIE};

use super::http::{HttpClient, excerpt};
use super::token::describe_status;
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

impl CookieLogin {
    /// Logs in with a form body, which keeps the password out of access logs.
    pub async fn log_in(&self, http: &HttpClient, credentials: &LoginCredentials) -> Result<Session, AuthFailure> {
        let form = [
            ("username", credentials.username.as_str()),
            ("password", credentials.password.expose()),
        ];
        let request = http.request(Method::POST, &self.login_url).form(&form);
        let answer = http
            .send(request)
            .await
            .map_err(|error| AuthFailure::server_error(format!("the login endpoint could not be used: {error}")))?;
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
        session_from_answer(&answer.headers)
    }
}

fn session_from_answer(headers: &HeaderMap) -> Result<Session, AuthFailure> {
    let cookies: Vec<(String, Sensitive)> = headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(cookie_pair)
        .collect();
    if cookies.is_empty() {
        return Err(AuthFailure::server_error(
            "the login answered with success but set no cookie: is loginPath the Tasklist login endpoint?",
        ));
    }
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
        let session = session_from_answer(&headers(&[
            ("set-cookie", "TASKLIST-SESSION=abc; Path=/; HttpOnly; SameSite=Lax"),
            ("set-cookie", "X-CSRF-TOKEN=xyz; Path=/"),
            ("x-csrf-token", "xyz"),
        ]))
        .unwrap();
        assert_eq!(session.cookie_header().expose(), "TASKLIST-SESSION=abc; X-CSRF-TOKEN=xyz");
        assert_eq!(session.csrf_token.unwrap().expose(), "xyz");
    }

    #[test]
    fn accepts_the_older_csrf_header_and_no_csrf_at_all() {
        let legacy = session_from_answer(&headers(&[
            ("set-cookie", "TASKLIST-SESSION=abc"),
            ("tasklist-x-csrf-token", "old"),
        ]))
        .unwrap();
        assert_eq!(legacy.csrf_token.unwrap().expose(), "old");
        let none = session_from_answer(&headers(&[("set-cookie", "TASKLIST-SESSION=abc")])).unwrap();
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
        assert!(session_from_answer(&headers(&[])).is_err());
        assert!(session_from_answer(&headers(&[("set-cookie", "TASKLIST-SESSION=; Max-Age=0")])).is_err());
    }
}
