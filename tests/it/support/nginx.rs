//! A real HTTP server, Debian's `nginx`, as an HTTPS API host on free loopback ports: one
//! server speaking HTTP/2 (ALPN h2) and one HTTP/1.1 only, each ending its connections on
//! its own schedule (`keepalive_requests`: a GOAWAY for h2, `Connection: close` for 1.1),
//! as API hosts and load balancers do. Every request is answered 200 with a small JSON
//! body, and logged with its protocol, connection and place on that connection.
//! `scripts/test.sh` installs it; `TOKENGATE_NGINX` may name another binary.

use std::process::{Child, Command};
use std::time::Duration;

use super::pki::Pki;
use super::wait_until;

pub struct Nginx {
    child: Child,
    /// The HTTP/2 server's port, and the HTTP/1.1 one's.
    pub h2_port: u16,
    pub h1_port: u16,
    dir: tempfile::TempDir,
}

/// One request as nginx logged it.
#[derive(Debug)]
pub struct Logged {
    pub protocol: String,
    pub port: u16,
    pub connection: u64,
    /// 1 for the first request on its connection.
    pub nth_on_connection: u64,
    pub method: String,
}

impl Nginx {
    /// Both servers with `pki`'s certificate; a connection ends after `h2_requests` streams
    /// (HTTP/2) or `h1_requests` requests (HTTP/1.1).
    pub fn start(pki: &Pki, h2_requests: u32, h1_requests: u32) -> Nginx {
        let binary = std::env::var("TOKENGATE_NGINX").unwrap_or_else(|_| "nginx".into());
        for _ in 0..5 {
            let (h2_port, h1_port) = (super::closed_addr().port(), super::closed_addr().port());
            let dir = tempfile::tempdir().expect("temp dir");
            let d = dir.path().display();
            let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
            let server = |port: u16, http2: &str, requests: u32| {
                format!(
                    "server {{ listen 127.0.0.1:{port} ssl{http2}; ssl_certificate {cert}; ssl_certificate_key {key}; keepalive_requests {requests}; location / {{ default_type application/json; return 200 '{{\"ok\":true}}'; }} }}\n"
                )
            };
            let conf = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\nclient_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\nclient_max_body_size 10m;\nlog_format calls '$server_protocol $server_port $connection $connection_requests $request_method';\naccess_log {d}/access.log calls;\n{}{}}}\n",
                server(h2_port, " http2", h2_requests),
                server(h1_port, "", h1_requests),
            );
            std::fs::write(dir.path().join("nginx.conf"), conf).expect("write config");
            let child = Command::new(&binary)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {binary} (scripts/test.sh installs Debian's nginx-light): {e}")
                });
            let mut nginx = Nginx {
                child,
                h2_port,
                h1_port,
                dir,
            };
            let up = wait_until(Duration::from_secs(10), || {
                if let Ok(Some(_)) = nginx.child.try_wait() {
                    return Some(false);
                }
                let both = [h2_port, h1_port]
                    .iter()
                    .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok());
                both.then_some(true)
            });
            if up == Some(true) {
                return nginx;
            }
            // A port taken between the look and the bind: try others.
        }
        panic!("nginx did not start");
    }

    /// Every request logged so far (nginx writes a line as each answer ends).
    pub fn logged(&self) -> Vec<Logged> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut f = line.split(' ');
                Some(Logged {
                    protocol: f.next()?.to_string(),
                    port: f.next()?.parse().ok()?,
                    connection: f.next()?.parse().ok()?,
                    nth_on_connection: f.next()?.parse().ok()?,
                    method: f.next()?.to_string(),
                })
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
