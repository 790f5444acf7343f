use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

/// What replaces a credential value in text shown to people.
pub const REDACTED: &str = "<redacted>";
/// Values shorter than this are not cut out: they would garble ordinary words.
const SHORTEST_REDACTED: usize = 3;

/// A credential value: a client secret, password, token, cookie or CSRF token.
///
/// It has no `Display`, and its `Debug` prints nothing of the value, so it cannot end up
/// in a log line, an Event, a status message or a panic by accident.
///
/// A clone shares the value: the connections of one client hold one copy of its token
/// (the token cache's), not one each.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Sensitive(std::sync::Arc<str>);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Sensitive(value.into().into())
    }

    /// The value itself, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sensitive(<redacted>)")
    }
}

/// `text` with every value cut out, also in the forms a server may echo it in:
/// URL-encoded (as sent in a form body) and base64 (as sent in an HTTP Basic header).
/// Redact first, then shorten: cutting first could leave a prefix of a value behind.
pub fn redact(text: &str, values: &[&str]) -> String {
    let mut patterns: Vec<String> = values
        .iter()
        .filter(|value| value.len() >= SHORTEST_REDACTED)
        .flat_map(|value| encoded_forms(value))
        .collect();
    // Longest first, so that a form containing another is cut out whole.
    patterns.sort_by_key(|pattern| std::cmp::Reverse(pattern.len()));
    patterns.dedup();
    let mut text = text.to_owned();
    for pattern in patterns {
        text = text.replace(&pattern, REDACTED);
    }
    text
}

fn encoded_forms(value: &str) -> Vec<String> {
    let mut forms = vec![
        value.to_owned(),
        percent_encoded(value, false, false),
        percent_encoded(value, false, true),
        percent_encoded(value, true, false),
        percent_encoded(value, true, true),
    ];
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(engine.encode(value));
    }
    forms
}

/// RFC 3986 percent-encoding of everything but unreserved characters; `form` writes a
/// space as `+` (application/x-www-form-urlencoded).
fn percent_encoded(value: &str, form: bool, lower_hex: bool) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(char::from(byte)),
            b' ' if form => out.push('+'),
            _ if lower_hex => out.push_str(&format!("%{byte:02x}")),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_redacted_raw_url_encoded_and_base64() {
        let secret = "p@ss word/+=";
        let text = format!(
            "raw {secret} form p%40ss+word%2F%2B%3D url p%40ss%20word%2F%2B%3D lower p%40ss%20word%2f%2b%3d b64 {} b64url {}",
            STANDARD.encode(secret),
            URL_SAFE_NO_PAD.encode(secret)
        );
        let redacted = redact(&text, &[secret]);
        assert_eq!(
            redacted,
            "raw <redacted> form <redacted> url <redacted> lower <redacted> b64 <redacted> b64url <redacted>"
        );
    }

    #[test]
    fn short_values_are_left_alone() {
        assert_eq!(redact("an ab", &["ab", ""]), "an ab");
    }

    #[test]
    fn debug_output_hides_the_value() {
        let printed = format!("{:?}", Some(Sensitive::new("hunter2")));
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
