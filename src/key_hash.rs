//! Keys of shared work (one token per client, one probe per credential) that hold no
//! secret: a salted SHA-256 over a list of fields.

use std::sync::LazyLock;

use sha2::{Digest, Sha256};

use crate::camunda::TlsTrust;

/// Random per process: a key found in a memory dump does not let anyone test guesses of a
/// secret (a password in a Basic header, a client secret) against it.
static SALT: LazyLock<[u8; 32]> = LazyLock::new(rand::random);

/// Declares a key type: the 32 bytes of a [`KeyHash`], whose `Debug` shows its name and
/// nothing of the hash (which is as good as the fields to whoever can guess them).
macro_rules! hashed_key {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name([u8; 32]);

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(<hash>)"))
            }
        }
    };
}
pub(crate) use hashed_key;

/// Builds a key field by field.
pub struct KeyHash(Sha256);

impl KeyHash {
    pub fn new() -> Self {
        let mut hash = KeyHash(Sha256::new());
        hash.field(SALT.as_slice());
        hash
    }

    /// One field, length first, so that no two lists of fields hash alike.
    pub fn field(&mut self, value: &[u8]) {
        self.0.update((value.len() as u64).to_be_bytes());
        self.0.update(value);
    }

    /// A field preceded by what it is, so that the same value in two roles hashes apart.
    pub fn tagged(&mut self, tag: &[u8], value: &[u8]) {
        self.field(tag);
        self.field(value);
    }

    /// A field that may be absent (absent and empty hash apart).
    pub fn optional(&mut self, value: Option<&str>) {
        match value {
            None => self.field(b"-"),
            Some(value) => {
                self.field(b"+");
                self.field(value.as_bytes());
            }
        }
    }

    /// Which certificates a request trusts: answers under another trust are not the same.
    pub fn trust(&mut self, trust: &TlsTrust) {
        self.optional(trust.extra_roots_pem.as_deref());
        self.field(&[u8::from(trust.insecure_skip_verify)]);
        // Another client certificate may be allowed other things.
        self.optional(trust.client_identity_pem.as_ref().map(|pem| pem.expose()));
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

impl Default for KeyHash {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fields: &[&[u8]]) -> [u8; 32] {
        let mut hash = KeyHash::new();
        for value in fields {
            hash.field(value);
        }
        hash.finish()
    }

    #[test]
    fn fields_are_delimited_by_their_length() {
        assert_eq!(key(&[b"ab", b"c"]), key(&[b"ab", b"c"]));
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
    }

    #[test]
    fn absent_and_empty_differ() {
        let (mut absent, mut empty) = (KeyHash::new(), KeyHash::new());
        absent.optional(None);
        empty.optional(Some(""));
        assert_ne!(absent.finish(), empty.finish());
    }
}
