//! A real forward proxy, Debian's `tinyproxy`, on a free loopback port, with Basic
//! authentication: the corporate egress proxy of the enterprise tests. `scripts/test.sh`
//! installs it; `TOKENGATE_TINYPROXY` may name another binary.

use std::process::{Child, Command};
use std::time::Duration;

use super::wait_until;

pub struct Tinyproxy {
    child: Child,
    pub port: u16,
    pub user: &'static str,
    pub password: String,
    dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts one that tunnels (CONNECT) to any port, for callers from 127.0.0.1 with
    /// the right user and password.
    pub fn start() -> Tinyproxy {
        let binary = std::env::var("TOKENGATE_TINYPROXY").unwrap_or_else(|_| "tinyproxy".into());
        let password = format!("proxy-pw-{}", std::process::id());
        for _ in 0..5 {
            let port = super::closed_addr().port();
            let dir = tempfile::tempdir().expect("temp dir");
            // No ConnectPort line: CONNECT is allowed to every port.
            let conf = format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogLevel Info\nMaxClients 100\nAllow 127.0.0.1\nBasicAuth tokengate {password}\n"
            );
            std::fs::write(dir.path().join("tinyproxy.conf"), conf).expect("write config");
            let log = std::fs::File::create(dir.path().join("tinyproxy.log")).expect("log file");
            let child = Command::new(&binary)
                .arg("-d")
                .arg("-c")
                .arg(dir.path().join("tinyproxy.conf"))
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {binary} (scripts/test.sh installs Debian's tinyproxy): {e}"
                    )
                });
            let mut proxy = Tinyproxy {
                child,
                port,
                user: "tokengate",
                password: password.clone(),
                dir,
            };
            let up = wait_until(Duration::from_secs(10), || {
                if let Ok(Some(_)) = proxy.child.try_wait() {
                    return Some(false);
                }
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| true)
            });
            if up == Some(true) {
                return proxy;
            }
            let _ = proxy.child.kill();
        }
        panic!("tinyproxy did not start on a free port");
    }

    /// `http://user:password@127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!(
            "http://{}:{}@127.0.0.1:{}",
            self.user, self.password, self.port
        )
    }

    pub fn url_with_password(&self, password: &str) -> String {
        format!("http://{}:{password}@127.0.0.1:{}", self.user, self.port)
    }

    /// What it logged so far (one line per connection and request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }

    /// The ports it opened CONNECT tunnels to.
    pub fn tunnels(&self) -> Vec<u16> {
        self.log()
            .lines()
            .filter_map(|l| l.split("): CONNECT 127.0.0.1:").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
