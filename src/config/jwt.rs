//! A `[[client]]` that proves itself with a signed JWT instead of a key: the workload
//! identity it already carries (a Kubernetes projected service-account token, a CI job's
//! OIDC token). See `front/jwt_callers.rs` for the checks.

use std::path::PathBuf;
use std::sync::Arc;

use http::Uri;

use super::cx::Cx;
use super::egress::EgressParts;
use super::error::ConfigError;
use super::raw::RawClient;
use super::server::ServerConfig;
use crate::outbound::egress::Egress;

/// What a client's JWTs must say, and where their signing keys are.
#[derive(Debug, Clone)]
pub struct JwtCaller {
    /// `jwt_issuer`: the `iss` its tokens carry, exactly.
    pub issuer: String,
    /// `jwt_audience`: one of its tokens' `aud`.
    pub audience: String,
    /// `jwt_subject`: its tokens' `sub`, where `*` stands for any run of characters
    /// (`system:serviceaccount:etl:*`).
    pub subject: String,
    pub jwks: JwksSource,
}

/// Where the issuer's public keys are.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// `jwks_url`, fetched through the proxy's egress path (`[server] egress_proxy`).
    Url(Uri, Arc<Egress>),
    /// `jwks_file`, read again when it changes.
    File(PathBuf),
    /// Neither: the `jwks_uri` of the issuer's discovery document
    /// (`<jwt_issuer>/.well-known/openid-configuration`), through the egress path.
    Discovery(Uri, Arc<Egress>),
}

impl JwksSource {
    /// The URL or the path, to tell the source by (no secret is in either).
    pub fn name(&self) -> String {
        match self {
            JwksSource::Url(u, _) => u.to_string(),
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Discovery(issuer, _) => format!("the discovery document of {issuer}"),
        }
    }
}

impl JwtCaller {
    /// Whether `sub` is a subject of this client.
    pub fn subject_matches(&self, sub: &str) -> bool {
        glob_matches(self.subject.as_bytes(), sub.as_bytes())
    }
}

/// `pattern` with `*` for any run of characters (none included), against `text`.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative, with one backtrack point: linear in practice, never exponential.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl Cx<'_> {
    /// The client's JWT settings: all of `jwt_issuer`, `jwt_audience`, `jwt_subject` and
    /// one of `jwks_url`, `jwks_file`, or none of them.
    pub(super) fn jwt_caller(
        &self,
        raw: &RawClient,
        server: &ServerConfig,
    ) -> Result<Option<JwtCaller>, ConfigError> {
        let key = |k: &str| format!("client \"{}\".{k}", raw.name);
        let given = [
            raw.jwt_issuer.is_some(),
            raw.jwt_audience.is_some(),
            raw.jwt_subject.is_some(),
            raw.jwks_url.is_some() || raw.jwks_file.is_some(),
        ];
        if given.iter().all(|g| !g) {
            return Ok(None);
        }
        let needed = |v: &Option<String>, k: &str| {
            v.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
                self.err(
                    &key(k),
                    "is missing: a JWT caller needs jwt_issuer, jwt_audience, jwt_subject and jwks_url or jwks_file",
                )
            })
        };
        let issuer = needed(&raw.jwt_issuer, "jwt_issuer")?;
        let audience = needed(&raw.jwt_audience, "jwt_audience")?;
        let subject = needed(&raw.jwt_subject, "jwt_subject")?;
        let jwks = match (&raw.jwks_url, &raw.jwks_file) {
            (Some(_), Some(_)) => {
                return Err(self.err(&key("jwks_url"), "give jwks_url or jwks_file, not both"))
            }
            (Some(url), None) => {
                let uri = self.keys_url(&key("jwks_url"), url)?;
                JwksSource::Url(uri, self.jwks_egress(raw, server)?)
            }
            (None, Some(path)) => JwksSource::File(path.clone()),
            (None, None) => {
                let issuer_url = self.keys_url(&key("jwt_issuer"), &issuer).map_err(|_| {
                    self.err(
                        &key("jwks_url"),
                        "is missing: give jwks_url or jwks_file (the issuer's public keys), or a jwt_issuer that is an https:// URL with a discovery document",
                    )
                })?;
                JwksSource::Discovery(issuer_url, self.jwks_egress(raw, server)?)
            }
        };
        Ok(Some(JwtCaller {
            issuer,
            audience,
            subject,
            jwks,
        }))
    }
}

impl Cx<'_> {
    /// A URL keys are fetched from: https, or http on loopback (keys fetched in the clear
    /// could be replaced on the way).
    fn keys_url(&self, key: &str, url: &str) -> Result<Uri, ConfigError> {
        let uri = self.http_url(key, url)?;
        if uri.scheme_str() != Some("https") && !is_loopback(&uri) {
            return Err(self.err(
                key,
                "must be https:// (keys fetched in the clear could be replaced on the way)",
            ));
        }
        Ok(uri)
    }

    /// The way out for a client's keys: the server's egress path, trusting the web roots
    /// and `jwks_ca_file` (a cluster's own CA, for its API server's JWKS).
    fn jwks_egress(
        &self,
        raw: &RawClient,
        server: &ServerConfig,
    ) -> Result<Arc<Egress>, ConfigError> {
        let (egress, _) = self.egress(
            server.egress.as_ref(),
            EgressParts {
                key_prefix: &format!("client \"{}\"", raw.name),
                proxy: None,
                ca_file: raw.jwks_ca_file.as_deref(),
                ca_key: "jwks_ca_file",
                ca_only: false,
                token_identity: None,
                api_identity: None,
            },
        )?;
        Ok(Arc::new(egress))
    }
}

/// Whether `uri`'s host is this machine.
pub fn is_loopback(uri: &Uri) -> bool {
    uri.authority()
        .is_some_and(|a| crate::http::is_loopback_host(a.as_str()))
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

    #[test]
    fn subjects_match_their_glob() {
        let m = |p: &str, t: &str| glob_matches(p.as_bytes(), t.as_bytes());
        assert!(m(
            "system:serviceaccount:etl:*",
            "system:serviceaccount:etl:nightly"
        ));
        assert!(m(
            "system:serviceaccount:etl:*",
            "system:serviceaccount:etl:"
        ));
        assert!(!m(
            "system:serviceaccount:etl:*",
            "system:serviceaccount:etl2:x"
        ));
        assert!(!m(
            "system:serviceaccount:etl:*",
            "system:serviceaccount:et"
        ));
        assert!(m(
            "repo:org/*:ref:refs/heads/main",
            "repo:org/app:ref:refs/heads/main"
        ));
        assert!(!m(
            "repo:org/*:ref:refs/heads/main",
            "repo:org/app:ref:refs/heads/dev"
        ));
        assert!(m("exact", "exact") && !m("exact", "exact2") && m("*", ""));
        // Many stars against a long text: answered at once.
        assert!(!m(&"*a".repeat(50), &"a".repeat(40)));
    }
}
