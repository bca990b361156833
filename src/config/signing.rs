//! The key that signs `private_key_jwt` assertions: read when the config is checked (so
//! a bad key file is a config error) and again for every grant (so a rotated key is used
//! by the next one).

use std::path::PathBuf;

use super::raw::SigningAlg;

/// `private_key_jwt` (RFC 7523 §2.2): the key the client assertion is signed with, read
/// from its file at each grant (a rotated key needs no reload).
#[derive(Debug, Clone)]
pub struct JwtSigning {
    pub key_file: PathBuf,
    pub alg: SigningAlg,
    pub key_id: Option<String>,
    /// The assertion's `aud`; `None`: the token endpoint.
    pub audience: Option<String>,
}

/// The signing key in `signing.key_file` (PEM: PKCS#8, or PKCS#1 for RSA, SEC1 for EC), as
/// the algorithm needs it. The file is read on every call: a rotated key is used by the
/// next grant.
pub fn signing_key(signing: &JwtSigning) -> Result<jsonwebtoken::EncodingKey, String> {
    let pem = std::fs::read(&signing.key_file)
        .map_err(|e| format!("cannot read {}: {e}", signing.key_file.display()))?;
    let key = match signing.alg {
        SigningAlg::RS256 | SigningAlg::PS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
        SigningAlg::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
    };
    key.map_err(|e| {
        format!(
            "{} is not a PEM {} private key ({e})",
            signing.key_file.display(),
            match signing.alg {
                SigningAlg::ES256 => "EC (P-256)",
                _ => "RSA",
            }
        )
    })
}
