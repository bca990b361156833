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
    /// More arguments (a replica's `--replicaof`).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one with a password (so tests can check it never reaches a log).
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A replica of `master`, with the same password.
    pub fn replica_of(master: &RedisServer) -> RedisServer {
        let port = master.port.to_string();
        let replica = Self::start_with(&[
            "--replicaof",
            "127.0.0.1",
            &port,
            "--masterauth",
            &master.password,
        ]);
        let synced = wait_until(Duration::from_secs(20), || {
            let mut c = replica.connection().ok()?;
            let info: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
            info.contains("master_link_status:up").then_some(())
        });
        assert!(synced.is_some(), "the replica did not sync with its master");
        replica
    }

    fn start_with(extra: &[&str]) -> RedisServer {
        let password = format!("redis-pw-{}", std::process::id());
        // A port the OS just gave out is free unless something takes it in between: try
        // a few times rather than fail on that race.
        for _ in 0..5 {
            let port = super::closed_addr().port();
            let mut server = RedisServer {
                child: None,
                port,
                password: password.clone(),
                dir: tempfile::tempdir().expect("temp dir"),
                extra: extra.iter().map(|a| a.to_string()).collect(),
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
            .args(&self.extra)
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

    /// The calls a window's counter of the fleet's rate budget holds (its low 48 bits;
    /// the high ones count the replicas), if one is alive.
    pub fn calls_counted(&self) -> Option<u64> {
        self.dump()
            .into_iter()
            .find(|(k, _)| k.starts_with("tokengate:calls:"))
            .and_then(|(_, v)| String::from_utf8(v).ok()?.parse::<u64>().ok())
            .map(|v| v % (1 << 48))
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

/// A real Redis Sentinel (`redis-server --sentinel`, what Debian's redis-sentinel runs)
/// watching one master, quick to fail it over: down after 1 s.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    password: String,
    _dir: tempfile::TempDir,
}

pub const MASTER_NAME: &str = "tokengate-master";

impl Sentinel {
    pub fn watching(master: &RedisServer) -> Sentinel {
        let binary =
            std::env::var("TOKENGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        for _ in 0..5 {
            let port = super::closed_addr().port();
            let dir = tempfile::tempdir().expect("temp dir");
            let conf = dir.path().join("sentinel.conf");
            // The sentinel asks for the same password as the servers, so one URL carries it.
            std::fs::write(
                &conf,
                format!(
                    "bind 127.0.0.1\nport {port}\ndir {dir}\nrequirepass {pw}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 1\n\
                     sentinel auth-pass {MASTER_NAME} {pw}\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n",
                    dir = dir.path().display(),
                    pw = master.password,
                    master = master.port,
                ),
            )
            .expect("sentinel config");
            let child = Command::new(&binary)
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {binary} --sentinel ({e})"));
            let mut sentinel = Sentinel {
                child,
                port,
                password: master.password.clone(),
                _dir: dir,
            };
            if wait_until(Duration::from_secs(10), || sentinel.master_port()).is_some() {
                return sentinel;
            }
            let _ = sentinel.child.kill();
        }
        panic!("redis sentinel did not start on a free port");
    }

    /// `redis://:password@127.0.0.1:port`, for `[cache] sentinels`.
    pub fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}", self.password, self.port)
    }

    /// The port of the master it names now.
    pub fn master_port(&mut self) -> Option<u16> {
        if let Ok(Some(_)) = self.child.try_wait() {
            return None;
        }
        let client = redis::Client::open(self.url()).ok()?;
        let mut c = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()?;
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER_NAME)
            .query(&mut c)
            .ok()?;
        addr.get(1)?.parse().ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
