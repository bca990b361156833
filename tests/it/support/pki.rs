//! A test certificate authority: a server certificate for 127.0.0.1 and client
//! certificates it signs, written to a temporary folder the proxy's config can name; and a
//! TLS front (rustls) that puts HTTPS in front of a plain loopback server such as the
//! sandbox, as a private API host or token endpoint behind a private CA would be.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Served;

/// A CA, a server certificate for 127.0.0.1, and client certificates for two names:
/// `reporting-job` (a configured client) and `someone-else` (not one).
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    /// (certificate, key) PEM for reporting-job, then for someone-else.
    pub clients: Vec<(String, String)>,
}

pub fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tokengate test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let clients: Vec<(String, String)> = ["reporting-job", "someone-else"]
        .iter()
        .map(|name| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, *name);
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("ca.pem", &ca.pem());
    write("server.pem", &server.pem());
    write("server.key", &server_key.serialize_pem());
    for (i, (cert, key)) in clients.iter().enumerate() {
        write(&format!("client{i}.pem"), cert);
        write(&format!("client{i}.key"), key);
    }
    Pki {
        dir,
        ca_pem: ca.pem(),
        clients,
    }
}

impl Pki {
    /// A file of the folder, as a path for a config.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A rustls server config with the server certificate; when `client_certs` is set, a
    /// client certificate from this CA is required.
    pub fn server_config(&self, client_certs: bool) -> Arc<rustls::ServerConfig> {
        let chain =
            vec![CertificateDer::from_pem_file(self.dir.path().join("server.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(self.dir.path().join("server.key")).unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = if client_certs {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
                .unwrap();
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap(),
            )
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(builder.with_single_cert(chain, key).unwrap())
    }
}

/// HTTPS on a loopback port in front of the plain server at `target`: each TLS connection
/// is relayed byte for byte to a new connection to `target`. Stops when dropped.
pub async fn tls_front(target: SocketAddr, config: Arc<rustls::ServerConfig>) -> Served {
    tls_front_recording(target, config).await.0
}

/// The protocol each TLS connection to a front agreed by ALPN (`None`: none), in order.
pub type Negotiated = Arc<std::sync::Mutex<Vec<Option<Vec<u8>>>>>;

/// [`tls_front`], noting what each connection agreed by ALPN.
pub async fn tls_front_recording(
    target: SocketAddr,
    config: Arc<rustls::ServerConfig>,
) -> (Served, Negotiated) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let negotiated = Negotiated::default();
    let seen = Arc::clone(&negotiated);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                seen.lock().unwrap().push(alpn);
                let Ok(mut plain) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (Served::new(addr, task), negotiated)
}
