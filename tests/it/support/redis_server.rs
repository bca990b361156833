//! A real `redis-server` on a free loopback port, for the shared-cache tests.
//! `scripts/test.sh` installs it (Debian's redis-server); `TOKENGATE_REDIS_SERVER` may name
//! another binary.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub password: String,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one with a password (so tests can check it never reaches a log).
    pub fn start() -> RedisServer {
        let password = format!("redis-pw-{}", std::process::id());
        // A port the OS just gave out is free unless something takes it in between: try
        // a few times rather than fail on that race.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut server = RedisServer {
                child: None,
                port,
                password: password.clone(),
                dir: tempfile::tempdir().expect("temp dir"),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on a free port");
    }

    /// (Re)starts the server on its port; true once it answers PING.
    pub fn spawn(&mut self) -> bool {
        let binary =
            std::env::var("TOKENGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--requirepass", &self.password])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {binary} ({e}); scripts/test.sh installs it (apt-get install -y redis-server)")
            });
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(10), || {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited {
                return Some(false);
            }
            self.connection().ok().map(|_| true)
        });
        up == Some(true)
    }

    pub fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}/0", self.password, self.port)
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
        redis::cmd("PING").query::<String>(&mut c)?;
        Ok(c)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Every key and its raw value.
    pub fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let mut c = self.connection().expect("redis connection");
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
        keys.into_iter()
            .map(|k| {
                let v: Vec<u8> = redis::cmd("GET").arg(&k).query(&mut c).unwrap_or_default();
                (k, v)
            })
            .collect()
    }

    /// Commands served since the last `CONFIG RESETSTAT`, by name (`INFO commandstats`).
    pub fn command_counts(&self) -> Vec<(String, u64)> {
        let mut c = self.connection().expect("redis connection");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut c)
            .unwrap();
        info.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("cmdstat_")?;
                let (name, stats) = rest.split_once(':')?;
                let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect()
    }

    pub fn reset_stats(&self) {
        let mut c = self.connection().expect("redis connection");
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut c)
            .unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
