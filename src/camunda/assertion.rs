//! Client assertions for `private_key_jwt` (RFC 7523 §2.2, OpenID Connect Core §9): a
//! short-lived JWT signed with the client's private key that the token endpoint checks
//! against the public key it has registered for the client.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use sha2::Digest as _;

use super::Sensitive;

/// The assertion type RFC 7523 defines for client authentication.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long an assertion is valid. Short, because it is a bearer credential until it
/// expires; long enough for a token endpoint whose clock lags by a little.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// The private key that signs client assertions, with the key id the server knows it by.
#[derive(Clone)]
pub struct AssertionKey {
    key: EncodingKey,
    pub algorithm: Algorithm,
    pub key_id: Option<String>,
    /// SHA-1 and SHA-256 thumbprints of the key's certificate (`x5t`, `x5t#S256`), by which
    /// Microsoft Entra ID finds the key.
    pub thumbprints: Option<(String, String)>,
    /// SHA-256 of the PEM the key was read from: tells keys apart (for sharing tokens
    /// between connections) without keeping or showing the key itself.
    digest: [u8; 32],
}

impl fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionKey")
            .field("key", &"<redacted>")
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .field("thumbprints", &self.thumbprints)
            .finish()
    }
}

/// The claims of a client assertion.
#[derive(Debug, Serialize)]
pub struct AssertionClaims<'a> {
    /// The client id (RFC 7523 §3: issuer and subject are the client).
    pub iss: &'a str,
    pub sub: &'a str,
    /// The token endpoint the assertion is meant for.
    pub aud: &'a str,
    /// A fresh id, so that the server can refuse a replayed assertion.
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
}

impl<'a> AssertionClaims<'a> {
    /// Claims for one token request at `now` (Unix seconds).
    pub fn new(client_id: &'a str, token_endpoint: &'a str, now: i64) -> Self {
        AssertionClaims {
            iss: client_id,
            sub: client_id,
            aud: token_endpoint,
            jti: hex::encode(rand::random::<[u8; 16]>()),
            iat: now,
            exp: now + ASSERTION_LIFETIME.as_secs() as i64,
        }
    }
}

impl AssertionKey {
    /// Reads a PEM private key: RSA (PKCS#8 or PKCS#1) signs with RS256, a P-256 EC key
    /// (PKCS#8) with ES256. The key is tried once, so that a key that cannot sign is
    /// reported when it is read, not at each token request. The error names no key material.
    pub fn from_pem(pem: &str, mut key_id: Option<String>) -> Result<AssertionKey, String> {
        install_crypto_provider();
        let digest: [u8; 32] = sha2::Sha256::digest(pem.trim().as_bytes()).into();
        let candidates = [
            (EncodingKey::from_rsa_pem(pem.as_bytes()), Algorithm::RS256),
            (EncodingKey::from_ec_pem(pem.as_bytes()), Algorithm::ES256),
        ];
        for (key, algorithm) in candidates {
            let Ok(key) = key else { continue };
            let candidate = AssertionKey {
                key,
                algorithm,
                key_id,
                thumbprints: None,
                digest,
            };
            if candidate.sign(&AssertionClaims::new("probe", "probe", 0)).is_ok() {
                return Ok(candidate);
            }
            key_id = candidate.key_id;
        }
        Err(
            "is not a usable private key: expected PEM, an RSA key (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY) or a P-256 EC key (BEGIN PRIVATE KEY)"
                .into(),
        )
    }

    /// Adds the `x5t` and `x5t#S256` headers of the key's PEM certificate. A certificate is
    /// public, but the error still quotes none of it.
    pub fn with_certificate(self, certificate_pem: &str) -> Result<AssertionKey, String> {
        let der = certificate_der(certificate_pem).ok_or("is not a PEM certificate (expected -----BEGIN CERTIFICATE-----)")?;
        let encode = |digest: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
        let thumbprints = (encode(&sha1::Sha1::digest(&der)), encode(&sha2::Sha256::digest(&der)));
        Ok(AssertionKey {
            thumbprints: Some(thumbprints),
            ..self
        })
    }

    /// SHA-256 of the key's PEM. Never shown: `Debug` leaves it out.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The signed assertion for `claims`.
    pub fn sign(&self, claims: &AssertionClaims<'_>) -> Result<Sensitive, String> {
        let mut header = Header::new(self.algorithm);
        header.kid = self.key_id.clone();
        if let Some((sha1, sha256)) = &self.thumbprints {
            header.x5t = Some(sha1.clone());
            header.x5t_s256 = Some(sha256.clone());
        }
        jsonwebtoken::encode(&header, claims, &self.key)
            .map(Sensitive::new)
            // jsonwebtoken's error kinds name what failed, never key material.
            .map_err(|error| format!("cannot sign the client assertion: {:?}", error.kind()))
    }

    /// "RS256, key id \"k1\"" or "ES256, no key id", for messages.
    pub fn describe(&self) -> String {
        let kid = match &self.key_id {
            Some(kid) => format!("{:?}, key id {kid:?}", self.algorithm),
            None => format!("{:?}, no key id", self.algorithm),
        };
        match &self.thumbprints {
            Some((sha1, _)) => format!("{kid}, certificate x5t {sha1:?}"),
            None => kid,
        }
    }
}

/// The DER bytes of the first certificate in a PEM text.
fn certificate_der(pem: &str) -> Option<Vec<u8>> {
    let (_, rest) = pem.split_once("-----BEGIN CERTIFICATE-----")?;
    let (body, _) = rest.split_once("-----END CERTIFICATE-----")?;
    let base64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(base64).ok()
}

/// jsonwebtoken needs one crypto backend chosen; an error only means one is chosen already.
fn install_crypto_provider() {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_part(part: &str) -> serde_json::Value {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn an_ec_key_signs_es256_with_the_claims_rfc_7523_wants() {
        let key = AssertionKey::from_pem(TEST_EC_KEY, Some("k1".into())).unwrap();
        assert_eq!(key.algorithm, Algorithm::ES256);
        let claims = AssertionClaims::new("orders", "https://idp/token", 1_000);
        let jwt = key.sign(&claims).unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode_part(parts[0]);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "k1");
        let body = decode_part(parts[1]);
        assert_eq!(body["iss"], "orders");
        assert_eq!(body["sub"], "orders");
        assert_eq!(body["aud"], "https://idp/token");
        assert_eq!(body["iat"], 1_000);
        assert_eq!(body["exp"], 1_060);
        assert_eq!(body["jti"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn every_assertion_has_a_fresh_jti() {
        let first = AssertionClaims::new("a", "b", 0);
        let second = AssertionClaims::new("a", "b", 0);
        assert_ne!(first.jti, second.jti);
    }

    #[test]
    fn an_rsa_key_signs_rs256() {
        let key = AssertionKey::from_pem(TEST_RSA_KEY, None).unwrap();
        assert_eq!(key.algorithm, Algorithm::RS256);
        let jwt = key.sign(&AssertionClaims::new("orders", "https://idp/token", 0)).unwrap();
        let header = decode_part(jwt.expose().split('.').next().unwrap());
        assert_eq!(header["alg"], "RS256");
        assert!(header.get("kid").is_none());
    }

    #[test]
    fn a_certificate_adds_the_thumbprints_entra_looks_for() {
        let key = AssertionKey::from_pem(TEST_RSA_KEY, None)
            .unwrap()
            .with_certificate(include_str!("../../tests/fixtures/rsa-2048-test-cert.pem"))
            .unwrap();
        let jwt = key.sign(&AssertionClaims::new("orders", "https://idp/token", 0)).unwrap();
        let header = decode_part(jwt.expose().split('.').next().unwrap());
        // Both from `openssl x509 -outform DER | openssl dgst -sha1|-sha256 -binary | basenc --base64url`.
        assert_eq!(header["x5t"], "mHOSVnmJ61KWQbpyqXJNYCQgBcU");
        assert_eq!(header["x5t#S256"], "GhMHzb1Dj30iT4J3qGRmXjL_4PinweUnmMTvwI13XRQ");
        let error = AssertionKey::from_pem(TEST_RSA_KEY, None)
            .unwrap()
            .with_certificate("not a certificate")
            .unwrap_err();
        assert!(error.contains("not a PEM certificate"), "{error}");
    }

    #[test]
    fn garbage_is_refused_without_quoting_it() {
        for garbage in ["", "not a key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"] {
            let error = AssertionKey::from_pem(garbage, None).unwrap_err();
            assert!(error.contains("not a usable private key"), "{error}");
            assert!(!error.contains("AAAA"));
        }
    }

    #[test]
    fn debug_output_hides_the_key() {
        let key = AssertionKey::from_pem(TEST_EC_KEY, None).unwrap();
        let printed = format!("{key:?}");
        assert!(printed.contains("<redacted>") && !printed.contains("MIG"), "{printed}");
    }

    /// Test keys made with openssl for these tests only.
    const TEST_EC_KEY: &str = include_str!("../../tests/fixtures/ec-p256-test-key.pem");
    const TEST_RSA_KEY: &str = include_str!("../../tests/fixtures/rsa-2048-test-key.pem");
}
