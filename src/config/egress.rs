//! The way out: `egress_proxy` (or the environment's `HTTPS_PROXY`, `HTTP_PROXY`,
//! `NO_PROXY`), `ca_file`/`ca_only`, and the client certificate an upstream presents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};

use super::cx::Cx;
use super::error::ConfigError;
use crate::outbound::egress::{Egress, ProxyRoutes};

/// A client certificate chain and its key, as read from PEM files.
pub(super) struct Identity {
    pub(super) chain: Vec<CertificateDer<'static>>,
    pub(super) key: PrivateKeyDer<'static>,
}

/// What shapes an upstream's egress, as written.
pub(super) struct EgressParts<'a> {
    pub(super) key_prefix: &'a str,
    /// `egress_proxy` of the upstream: only `"none"` is accepted.
    pub(super) proxy: Option<&'a str>,
    pub(super) ca_file: Option<&'a Path>,
    /// The key `ca_file` was given as (`ca_file`, a client's `jwks_ca_file`): errors name it.
    pub(super) ca_key: &'static str,
    pub(super) ca_only: bool,
    /// Presented to the token endpoint.
    pub(super) token_identity: Option<&'a Identity>,
    /// Presented to the API host.
    pub(super) api_identity: Option<&'a Identity>,
}

impl Cx<'_> {
    /// `[server] egress_proxy`, else the environment as curl reads it; `None`: direct.
    pub(super) fn proxy_routes(
        &self,
        configured: Option<String>,
    ) -> Result<Option<ProxyRoutes>, ConfigError> {
        let env = |names: &[&'static str]| -> Option<(&'static str, String)> {
            names.iter().find_map(|n| {
                (self.env)(n)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (*n, v))
            })
        };
        let no_proxy = env(&["no_proxy", "NO_PROXY"])
            .map(|(_, v)| v)
            .unwrap_or_default();
        if let Some(url) = configured {
            let url = self.interpolate("server.egress_proxy", &url)?;
            self.proxy_url("server.egress_proxy", &url)?;
            let url = SecretString::from(url);
            return Ok(Some(ProxyRoutes {
                http: Some(url.clone()),
                https: Some(url),
                no_proxy,
            }));
        }
        let all = env(&["all_proxy", "ALL_PROXY"]);
        let read = |names: &[&'static str]| -> Result<Option<SecretString>, ConfigError> {
            match env(names).or_else(|| all.clone()) {
                Some((name, url)) => {
                    // As curl: a value without a scheme is an HTTP proxy.
                    let url = if url.contains("://") {
                        url
                    } else {
                        format!("http://{url}")
                    };
                    self.proxy_url(&format!("the environment variable {name}"), &url)?;
                    Ok(Some(SecretString::from(url)))
                }
                None => Ok(None),
            }
        };
        let https = read(&["https_proxy", "HTTPS_PROXY"])?;
        let http = read(&["http_proxy", "HTTP_PROXY"])?;
        Ok((http.is_some() || https.is_some()).then_some(ProxyRoutes {
            http,
            https,
            no_proxy,
        }))
    }

    /// An HTTP proxy URL: `http://[user:pass@]host:port`. The value may hold a password,
    /// so errors never repeat it.
    fn proxy_url(&self, key: &str, url: &str) -> Result<(), ConfigError> {
        let bad = || {
            self.err(
                key,
                "must be an http:// proxy URL such as http://user:pass@proxy.corp:3128 (https:// and socks proxies are not supported)",
            )
        };
        let uri: Result<http::Uri, _> = url.parse();
        let host = uri.as_ref().ok().and_then(|u| u.authority()).map(|a| {
            a.as_str()
                .rsplit('@')
                .next()
                .unwrap_or_default()
                .to_string()
        });
        // A `/`, `?` or `#` in the user or password ends the host part early: the rest
        // (with the password) reads as a path. Said apart, with the cure.
        let userinfo_cut = url.split_once("://").is_some_and(|(_, rest)| {
            rest.find(['/', '?', '#'])
                .is_some_and(|end| rest[end..].contains('@'))
        });
        if userinfo_cut {
            return Err(self.err(
                key,
                "its user or password holds a '/', '?' or '#', which ends the host part of a URL: percent-encode them (%2F, %3F, %23)",
            ));
        }
        let Ok(uri) = uri else {
            return Err(bad());
        };
        if uri.scheme_str() != Some("http") || host.is_none_or(|h| h.is_empty()) {
            return Err(bad());
        }
        // What the token endpoint's client will make of it (reqwest's own parse).
        if reqwest::Proxy::http(url).is_err() {
            return Err(bad());
        }
        Ok(())
    }

    /// The upstream's egress: the server's proxy routes unless it opts out, and TLS
    /// trusting the web roots and/or its `ca_file`.
    pub(super) fn egress(
        &self,
        server_routes: Option<&ProxyRoutes>,
        parts: EgressParts<'_>,
    ) -> Result<(Egress, String), ConfigError> {
        let key = |k: &str| format!("{}.{k}", parts.key_prefix);
        let proxy = match parts.proxy {
            None => server_routes.cloned(),
            Some("none") => None,
            Some(_) => {
                return Err(self.err(
                    &key("egress_proxy"),
                    "an upstream can only opt out, with \"none\"; the proxy itself is [server] egress_proxy",
                ))
            }
        };
        let ca = match parts.ca_file {
            Some(path) => self.pem_certs(&key(parts.ca_key), path)?,
            None if parts.ca_only => {
                return Err(self.err(&key("ca_only"), "needs ca_file (the CAs to trust instead)"))
            }
            None => Vec::new(),
        };
        // One config (and one copy of the web roots) for both sides unless they present
        // different certificates.
        let same = parts.api_identity.map(std::ptr::from_ref)
            == parts.token_identity.map(std::ptr::from_ref);
        let tls = |identity: Option<&Identity>| {
            self.client_tls(&key(parts.ca_key), &ca, parts.ca_only, identity)
        };
        let api_tls = tls(parts.api_identity)?;
        let token_tls = if same {
            Arc::clone(&api_tls)
        } else {
            tls(parts.token_identity)?
        };
        let egress = Egress {
            proxy,
            api_tls,
            token_tls,
        };
        // What makes two upstreams' side-call clients differ (token sources are shared
        // only between upstreams whose clients are the same).
        let fingerprint = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            if let Some(p) = &egress.proxy {
                for part in [&p.http, &p.https] {
                    h.update(part.as_ref().map(|u| u.expose_secret()).unwrap_or("-"));
                    h.update([0]);
                }
                h.update(&p.no_proxy);
            }
            h.update([0, parts.ca_only as u8]);
            for c in &ca {
                h.update(c.as_ref());
            }
            for c in parts.token_identity.iter().flat_map(|i| &i.chain) {
                h.update(c.as_ref());
            }
            hex::encode(h.finalize())
        };
        Ok((egress, fingerprint))
    }

    fn client_tls(
        &self,
        key: &str,
        ca: &[CertificateDer<'static>],
        ca_only: bool,
        identity: Option<&Identity>,
    ) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        if !ca_only {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for c in ca {
            roots
                .add(c.clone())
                .map_err(|e| self.err(key, format!("an unusable CA certificate: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| {
                    self.err(
                        key.replace("ca_file", "client_key_file").as_str(),
                        format!("does not fit client_cert_file: {e}"),
                    )
                })?,
        };
        Ok(Arc::new(config))
    }

    /// Certificates from a PEM file (relative to the config file's folder); at least one.
    pub(super) fn pem_certs(
        &self,
        key: &str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let path = self.relative(path);
        let certs: Vec<_> = CertificateDer::pem_file_iter(&path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                self.err(
                    key,
                    format!("cannot read certificates from {}: {e}", path.display()),
                )
            })?;
        if certs.is_empty() {
            return Err(self.err(key, format!("{} holds no PEM certificate", path.display())));
        }
        Ok(certs)
    }

    /// A client certificate and its private key.
    pub(super) fn identity(
        &self,
        key_prefix: &str,
        cert: &Path,
        key: &Path,
    ) -> Result<Identity, ConfigError> {
        let chain = self.pem_certs(&format!("{key_prefix}.client_cert_file"), cert)?;
        let path = self.relative(key);
        let key = PrivateKeyDer::from_pem_file(&path).map_err(|e| {
            self.err(
                &format!("{key_prefix}.client_key_file"),
                format!("cannot read a private key from {}: {e}", path.display()),
            )
        })?;
        Ok(Identity { chain, key })
    }

    /// A path from the config, relative to the config file's folder.
    pub(super) fn relative(&self, path: &Path) -> PathBuf {
        self.file.parent().unwrap_or(Path::new(".")).join(path)
    }
}
