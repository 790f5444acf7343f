use std::fmt;

/// A credential value: a client secret, password, token, cookie or CSRF token.
///
/// It has no `Display`, and its `Debug` prints nothing of the value, so it cannot end up
/// in a log line, an Event, a status message or a panic by accident.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Sensitive(String);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Sensitive(value.into())
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

#[cfg(test)]
mod tests {
    use super::Sensitive;

    #[test]
    fn debug_output_hides_the_value() {
        let printed = format!("{:?}", Some(Sensitive::new("hunter2")));
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
