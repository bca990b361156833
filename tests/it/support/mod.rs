//! Helpers for the integration tests: the real `tokengate` binary on a loopback port, the
//! sandbox as its upstream, and waiting on conditions (never on the clock).

#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use tokengate_sandbox::{Sandbox, SandboxOptions};

pub mod nginx;
pub mod pki;
pub mod redis_server;
pub mod tinyproxy;

pub const CLIENT_KEY: &str = "tg_test-client-key-0123456789abcdefghijklmnop";
pub const CLIENT_SECRET: &str = "sandbox-secret-Zq8!x";

/// Sandbox options with a recognisable secret.
pub fn sandbox_options() -> SandboxOptions {
    SandboxOptions {
        client_secret: CLIENT_SECRET.into(),
        ..SandboxOptions::default()
    }
}

/// The sandbox, its streaming host sending a heartbeat on every socket every `heartbeat`.
pub async fn sandbox_with_heartbeat(heartbeat: Duration) -> Sandbox {
    Sandbox::start(SandboxOptions {
        heartbeat,
        ..sandbox_options()
    })
    .await
    .expect("sandbox starts")
}

pub async fn sandbox() -> Sandbox {
    Sandbox::start(sandbox_options())
        .await
        .expect("sandbox starts")
}

/// An upstream section for the sandbox; the secret comes through `${SANDBOX_SECRET}`.
pub fn upstream_toml(sandbox: &Sandbox, name: &str, prefix: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "{name}"
provider = "genesys"
region = "us_east_1"
prefix = "{prefix}"
token_url = "{token_url}"
base_url = "{api_url}"
client_id = "{client_id}"
client_secret = "${{SANDBOX_SECRET}}"
"#,
        token_url = sandbox.token_url(),
        api_url = sandbox.api_url(),
        client_id = sandbox.options().client_id,
    )
}

/// A `[[client]]` section for `CLIENT_KEY`.
pub fn client_toml(name: &str, extra: &str) -> String {
    format!(
        "\n[[client]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n{extra}\n",
        tokengate::front::keys::hash_key(CLIENT_KEY)
    )
}

/// The usual config: one client, the sandbox at `/`, an admin listener.
pub fn standard_config(sandbox: &Sandbox, server_extra: &str) -> String {
    config_with(sandbox, server_extra, "")
}

/// The usual config with lines added to `[server]` and to the upstream.
pub fn config_with(sandbox: &Sandbox, server_extra: &str, upstream_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server_extra}\n{}{upstream_extra}\n{}",
        upstream_toml(sandbox, "genesys", "/"),
        client_toml("reporting-job", "")
    )
}

/// Everything the process wrote, stdout and stderr.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<String>>);

impl Output {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
    fn drain(&self, stream: impl Read + Send + 'static) -> std::thread::JoinHandle<()> {
        let out = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut o = out.0.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        })
    }
}

/// The `tokengate` binary, serving on a loopback port.
pub struct Proxy {
    child: Child,
    pub addr: String,
    pub admin: Option<String>,
    pub output: Output,
    _dir: tempfile::TempDir,
}

pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tokengate"))
}

/// Write `config` to a temporary proxy.toml; the returned dir must outlive its use.
pub fn write_config(config: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("write config");
    (dir, path)
}

impl Proxy {
    pub fn start(config: &str) -> Proxy {
        Self::start_with_env(config, &[("SANDBOX_SECRET", CLIENT_SECRET)])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Proxy {
        Self::start_as(binary(), config, env)
    }

    /// Started by a shell that first sets the limit of open files (soft and hard) to
    /// `nofile`, as a login shell's `ulimit -n` does.
    pub fn start_with_open_files(config: &str, nofile: u32) -> Proxy {
        Self::start_with_ulimit(config, &format!("-n {nofile}"))
    }

    /// Started with a soft limit of open files of `nofile` (the hard one unchanged).
    pub fn start_with_soft_open_files(config: &str, nofile: u32) -> Proxy {
        Self::start_with_ulimit(config, &format!("-Sn {nofile}"))
    }

    fn start_with_ulimit(config: &str, ulimit: &str) -> Proxy {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("ulimit {ulimit} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_tokengate"));
        Self::start_as(sh, config, &[("SANDBOX_SECRET", CLIENT_SECRET)])
    }

    fn start_as(mut cmd: Command, config: &str, env: &[(&str, &str)]) -> Proxy {
        let (dir, path) = write_config(config);
        cmd.arg("run").arg("-c").arg(&path);
        cmd.env("TOKENGATE_LOG", "debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tokengate starts");
        let output = Output::default();
        output.drain(child.stdout.take().unwrap());
        output.drain(child.stderr.take().unwrap());
        let wants_admin = config.contains("admin_listen");
        let found = wait_until(Duration::from_secs(30), || {
            let text = output.text();
            let proxy = find_addr(&text, "proxy listening on http://");
            let admin = find_addr(&text, "admin listening on http://");
            match (proxy, admin) {
                (Some(p), a) if a.is_some() || !wants_admin => Some((p, a)),
                _ => None,
            }
        });
        let Some((addr, admin)) = found else {
            let _ = child.kill();
            panic!("tokengate did not start:\n{}", output.text());
        };
        Proxy {
            child,
            addr,
            admin,
            output,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.admin.as_ref().expect("admin listener")
        )
    }

    /// Replace the proxy's config file (then `signal("HUP")` to reload it).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(self._dir.path().join("proxy.toml"), config).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory of the proxy process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// Resident memory now.
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Wait for the process to exit (bounded), returning its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        wait_until(Duration::from_secs(30), || child.try_wait().ok().flatten())
            .expect("tokengate exits")
    }

    /// SIGTERM while `silent` connections are open that have sent nothing: the process
    /// must exit 0 well inside the 10 s a request head or handshake may take (and the
    /// 30 s grace), as there is nothing of theirs to drain.
    pub async fn terminate_with_silent_connections(mut self, silent: usize) {
        let held: Vec<std::net::TcpStream> = (0..silent)
            .map(|_| std::net::TcpStream::connect(&self.addr).unwrap())
            .collect();
        let asked = Instant::now();
        self.signal("TERM");
        let status = tokio::task::spawn_blocking(move || self.wait_exit())
            .await
            .unwrap();
        assert_eq!(status.code(), Some(0));
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(5), "exit took {took:?}");
        drop(held);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_addr(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let rest = &text[start..];
    let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

/// Poll `cond` until it gives a value or `limit` passes. The limit only bounds a failure;
/// it never decides a pass.
pub fn wait_until<T>(limit: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After a Genesys upstream's first call: wait until the proxy's own question for the
/// org's idle timeout (asked once per token, off the call's path) has reached the sandbox,
/// so a test that revokes or counts next sees only its own calls.
pub async fn idle_question_asked(sandbox: &Sandbox) {
    let asked = wait_for(Duration::from_secs(10), || {
        (sandbox.idle_questions() >= 1).then_some(())
    })
    .await;
    assert!(asked.is_some(), "the proxy asked for the idle timeout");
}

/// The async twin of [`wait_until`].
pub async fn wait_for<T>(limit: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`wait_for`] with a condition that has to wait itself (an HTTP call, say).
pub async fn wait_for_async<T, F>(limit: Duration, mut cond: impl FnMut() -> F) -> Option<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An HTTP client that does not pool too eagerly and never follows redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// `GET path` through the proxy as the test client (`CLIENT_KEY`).
/// A session token from the proxy's token endpoint, for client `name` with `key` (what a
/// legacy app doing OAuth itself gets).
pub async fn session_token(proxy: &Proxy, name: &str, key: &str) -> String {
    let answer: serde_json::Value = client()
        .post(proxy.url("/oauth/token"))
        .basic_auth(name, Some(key))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"].as_str().unwrap().to_string()
}

/// The status of a `GET /api/v2/users/me` sent with this `Authorization` header.
pub async fn status_with_authorization(proxy: &Proxy, authorization: &str) -> u16 {
    client()
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", authorization)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

pub async fn get_with_key(proxy: &Proxy, path: &str) -> reqwest::Response {
    client()
        .get(proxy.url(path))
        .header("Authorization", format!("Bearer {CLIENT_KEY}"))
        .send()
        .await
        .unwrap()
}

/// The body of `GET path` on the proxy's admin listener.
pub async fn admin_text(proxy: &Proxy, path: &str) -> String {
    client()
        .get(proxy.admin_url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the metric line `name{labels}` in Prometheus text, summed over matches.
pub fn metric(text: &str, name: &str, label_filter: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| label_filter.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Serve `handler` on a loopback port (a stand-in for some other server); stops on drop.
pub struct Served {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    pub fn new(addr: std::net::SocketAddr, task: tokio::task::JoinHandle<()>) -> Served {
        Served { addr, task }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serve `svc` on a loopback port; stops when the returned [`Served`] is dropped.
pub async fn serve_service<S>(svc: S) -> Served
where
    S: tokengate::ingress::server::HttpService<hyper::body::Incoming>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(tokengate::ingress::server::serve(
        tokengate::ingress::server::plain("test-server", listener),
        svc,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    Served { addr, task }
}

pub async fn serve_fixed(status: u16, content_type: &'static str, body: &'static str) -> Served {
    let svc = tower::service_fn(
        move |_req: http::Request<hyper::body::Incoming>| async move {
            let mut resp = http::Response::new(tokengate::http::body::full(body));
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            resp.headers_mut()
                .insert("content-type", http::HeaderValue::from_static(content_type));
            Ok::<_, std::convert::Infallible>(resp)
        },
    );
    serve_service(svc).await
}

/// A TLS server whose certificate nobody trusts (self-signed, made here).
pub async fn serve_untrusted_tls() -> Served {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(stream).await;
            });
        }
    });
    Served { addr, task }
}

/// A loopback address nothing listens on (its port is free for a server a test starts).
pub fn closed_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
