//! Client keys for private_key_jwt tests: the test-only PEM keys in `tests/fixtures/`, and
//! the public JWKS a server registers for them.

use anyhow::Context as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};

/// A P-256 EC key (ES256), PKCS#8 PEM.
pub const EC_KEY_PEM: &str = include_str!("../../fixtures/ec-p256-test-key.pem");
/// An RSA key (RS256), PKCS#8 PEM.
pub const RSA_KEY_PEM: &str = include_str!("../../fixtures/rsa-2048-test-key.pem");
/// A self-signed certificate of [`RSA_KEY_PEM`], as Entra ID registers it.
pub const RSA_CERTIFICATE_PEM: &str = include_str!("../../fixtures/rsa-2048-test-cert.pem");
/// Its SHA-1 thumbprint, base64url (the `x5t` Entra ID matches assertions by).
pub const RSA_CERTIFICATE_X5T: &str = "mHOSVnmJ61KWQbpyqXJNYCQgBcU";
/// Another RSA key, registered nowhere: "the wrong key".
pub const OTHER_RSA_KEY_PEM: &str = include_str!("../../fixtures/rsa-2048-other-test-key.pem");

/// The public part of `pem` as a JWK Set with one key (`kid` when given, `use: sig`), as
/// Keycloak's `jwks.string` client attribute and the stand-in take it.
pub fn public_jwks(pem: &str, kid: Option<&str>) -> anyhow::Result<serde_json::Value> {
    public_jwks_with_x5t(pem, kid, None)
}

/// [`public_jwks`] with the certificate thumbprint `x5t` on the key.
pub fn public_jwks_with_x5t(pem: &str, kid: Option<&str>, x5t: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let (key, algorithm) = match EncodingKey::from_rsa_pem(pem.as_bytes()) {
        Ok(key) => (key, Algorithm::RS256),
        Err(_) => (
            EncodingKey::from_ec_pem(pem.as_bytes()).context("neither an RSA nor an EC private key")?,
            Algorithm::ES256,
        ),
    };
    let mut jwk = Jwk::from_encoding_key(&key, algorithm).context("deriving the public JWK")?;
    jwk.common.key_id = kid.map(str::to_owned);
    jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
    jwk.common.x509_sha1_fingerprint = x5t.map(str::to_owned);
    Ok(serde_json::json!({ "keys": [serde_json::to_value(&jwk)?] }))
}
