//! The key that signs `private_key_jwt` assertions: read when the config is checked (so
//! a bad key file is a config error) and again for every grant (so a rotated key is used
//! by the next one).

use super::grant::{JwtSigning, SigningAlg};

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
