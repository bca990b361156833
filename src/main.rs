//! The `tokengate` command: parse the command line, load the config, run.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokengate::config::{Config, LogFormat};
use tokengate::telemetry::events::EventsLayer;

#[derive(Parser)]
#[command(
    name = "tokengate",
    version,
    about = "An authenticating reverse proxy for the Genesys Cloud and NICE CXone APIs",
    after_help = "Without a command, tokengate serves (as `run`). Logs go to stderr; TOKENGATE_LOG sets the level."
)]
struct Cli {
    /// The config file (default: $TOKENGATE_CONFIG, else ./proxy.toml).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where `run` and `check` read their config.
#[derive(clap::Args)]
struct ConfigFile {
    /// The config file (default: $TOKENGATE_CONFIG, else ./proxy.toml).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default). SIGHUP reloads the config; SIGINT or SIGTERM stops, letting
    /// requests in flight finish.
    #[command(
        after_help = "Exit status: 0 after SIGINT/SIGTERM; 1 when it cannot serve (a port in use, no runtime); 2 on a config error."
    )]
    Run {
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Validate the config, then try one real token grant per upstream and explain failures.
    #[command(
        after_help = "Exit status: 0 when every upstream's grant works; 1 when one fails; 2 on a config error."
    )]
    Check {
        #[command(flatten)]
        file: ConfigFile,
        /// One JSON object per upstream, one per line.
        #[arg(long)]
        json: bool,
    },
    /// A built-in Genesys-like sandbox with the proxy in front of it; no credentials and
    /// no config needed.
    #[command(
        after_help = "Exit status: 0 after Ctrl-C; 1 when it cannot start (the port in use)."
    )]
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Client keys (no config needed).
    #[command(after_help = "Exit status: 0; 1 when no key can be read (key hash).")]
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Make a random client key and print it with its hash.
    New {
        /// Make it stop working after this long (`90d`, `12h`, `2w`): prints the
        /// `keys = [{ sha256, not_after }]` line to paste.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// Print the SHA-256 of a key read from stdin.
    Hash,
}

fn config_path(cli: &Cli) -> PathBuf {
    let given = match &cli.command {
        Some(Command::Run { file } | Command::Check { file, .. }) => file.config.clone(),
        _ => None,
    };
    given
        .or_else(|| cli.config.clone())
        .or_else(|| std::env::var_os("TOKENGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("proxy.toml"))
}

/// `TOKENGATE_LOG` as `EnvFilter` directives. A bare level (`debug`, `trace`) is the
/// proxy's own level: dependencies stay at `info`, or hyper and h2 log every frame
/// (216 MB in 10 s under load at `debug`). Full directives pass unchanged.
fn log_directives(setting: Option<&str>) -> String {
    match setting.map(str::trim) {
        None | Some("") => "info".into(),
        Some(level @ ("trace" | "debug")) => format!("info,tokengate={level}"),
        Some(directives) => directives.into(),
    }
}

fn init_logging(format: LogFormat, events: Option<EventsLayer>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_new(log_directives(
        std::env::var("TOKENGATE_LOG").ok().as_deref(),
    ))
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Straight to stderr, in batches on the workers (see `log_batch`).
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(tokengate::telemetry::log_batch::Stderr)
        .with_ansi(false);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
    };
    // The log's level does not filter security events: they have their own sinks. Each
    // layer has its filter, so a callsite neither wants stays off (not dispatched).
    let only_events = tracing_subscriber::filter::Targets::new()
        .with_target(tokengate::telemetry::events::TARGET, tracing::Level::TRACE);
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(events.with_filter(only_events))
        .init();
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
}

fn load(cli: &Cli) -> Result<Config, ExitCode> {
    Config::load(&config_path(cli)).map_err(|e| {
        eprintln!("tokengate: config error: {e}");
        ExitCode::from(2)
    })
}

/// jemalloc: an idle connection's small state is not left holding pages among the
/// buffers it freed (see `ingress::memory`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start: freed pages go back to the system after
/// about a second, not ten, and on time even when the proxy is idle (one background
/// thread; without it jemalloc purges only while it allocates). Measured: 1,000 busy
/// callers' peak 35.2 → 34.4 MiB; an idle proxy's RSS 15.0 → 12.2 MiB after its start.
#[allow(unsafe_code, non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 68] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000\0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Key { action }) => return key(action),
        Some(Command::Demo { .. }) => init_logging(LogFormat::Text, None),
        // `run` logs as its config says, once it is loaded; `check` prints, it does not log.
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokengate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        match &cli.command {
            None | Some(Command::Run { .. }) => serve(&cli).await,
            Some(Command::Check { json, .. }) => check(&cli, *json).await,
            Some(Command::Demo { listen }) => {
                match tokengate::cli::demo::run(*listen, shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("tokengate: demo failed: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            Some(Command::Key { .. }) => ExitCode::SUCCESS,
        }
    })
}

async fn serve(cli: &Cli) -> ExitCode {
    let config = match load(cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let events = match EventsLayer::open(&config.events) {
        Ok(events) => events,
        Err(e) => {
            eprintln!("tokengate: {e}");
            return ExitCode::from(1);
        }
    };
    init_logging(config.log_format, events);
    let mut running = match tokengate::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokengate: {e}");
            return ExitCode::from(1);
        }
    };
    // Scripts and tests read the real addresses (port 0 in the config) from these lines.
    println!(
        "tokengate: proxy listening on http://{}",
        running.proxy_addr
    );
    if let Some(admin) = running.admin_addr {
        println!("tokengate: admin listening on http://{admin}");
    }
    let path = config_path(cli);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut reloads = reload_signals();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = next_reload(&mut reloads) => match Config::load(&path) {
                Ok(config) => running.reload(config),
                Err(e) => {
                    tracing::error!(error = %e, "config reload refused; the running config stays");
                    // The reason stays in the log: a parse error may quote the file's line.
                    tokengate::emit!(error, "config_refused", file = %path.display());
                }
            },
        }
    }
    running.shutdown().await;
    ExitCode::SUCCESS
}

/// SIGHUP: re-read the config.
#[cfg(unix)]
fn reload_signals() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn reload_signals() -> Option<()> {
    None
}

#[cfg(unix)]
async fn next_reload(signals: &mut Option<tokio::signal::unix::Signal>) {
    let received = match signals {
        Some(s) => s.recv().await.is_some(),
        None => false,
    };
    if !received {
        // No SIGHUP stream: never reload.
        return std::future::pending().await;
    }
    tracing::info!("SIGHUP: reloading the config");
}

#[cfg(not(unix))]
async fn next_reload(_: &mut Option<()>) {
    std::future::pending().await
}

async fn check(cli: &Cli, json: bool) -> ExitCode {
    let config = match load(cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let results = tokengate::cli::check::check(&config).await;
    for d in &results {
        // How the client proved itself, and the way out when it is not direct.
        let via = match &d.egress_proxy {
            Some(p) => format!(", {}, via {p}", d.auth_method),
            None => format!(", {}", d.auth_method),
        };
        if json {
            println!("{}", serde_json::to_string(d).unwrap_or_default());
        } else if d.ok {
            println!("ok    {}: {} ({}{via})", d.upstream, d.message, d.token_url);
            if let Some(b) = &d.rate_budget {
                println!("      {}: {b}", d.upstream);
            }
        } else {
            println!(
                "FAIL  {}: [{}] {} ({}{via})",
                d.upstream, d.hint, d.message, d.token_url
            );
        }
    }
    // Keys near their end do not decide the exit code either: they still work.
    for warning in tokengate::cli::check::key_warnings(&config, std::time::SystemTime::now()) {
        if json {
            println!(
                "{}",
                serde_json::json!({ "warning": "client_key_expiring", "message": warning })
            );
        } else {
            println!("WARN  {warning}");
        }
    }
    // The shared cache does not decide the exit code (serving never depends on it), but an
    // operator running check wants to know whether the fleet can share its tokens.
    if let (Some(cache), false) = (&config.cache, json) {
        println!("{}", check_shared_cache(cache).await);
    }
    if results.iter().all(|d| d.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn check_shared_cache(cache: &tokengate::config::CacheConfig) -> String {
    let target = &cache.redis_target;
    let shared = match tokengate::token::shared::SharedCache::new(
        cache,
        &tokengate::telemetry::metrics::Metrics::new(),
    ) {
        Ok(s) => s,
        Err(e) => return format!("FAIL  shared cache {target}: {e}"),
    };
    match shared.probe().await {
        Err(why) => format!(
            "FAIL  shared cache {target}: unreachable: {why}; replicas will mint their own tokens until it answers"
        ),
        Ok((_, closed)) if closed > 0 => format!(
            "FAIL  shared cache {target}: {closed} stored token(s) do not open with this cache.encryption_key; give every replica the same key"
        ),
        Ok((opened, _)) => format!(
            "ok    shared cache {target}: reachable; {opened} shared token(s), all open with this cache.encryption_key"
        ),
    }
}

fn key(action: &KeyAction) -> ExitCode {
    match action {
        KeyAction::New { expires: None } => {
            let key = tokengate::front::keys::new_key();
            println!("key:        {key}");
            println!("key_sha256: {}", tokengate::front::keys::hash_key(&key));
            eprintln!("Give the key to the client; put only key_sha256 in proxy.toml. The key is not shown again.");
            ExitCode::SUCCESS
        }
        KeyAction::New {
            expires: Some(after),
        } => {
            let Some(lifetime) = tokengate::front::keys::lifetime(after) else {
                eprintln!("tokengate: --expires wants a whole number of days, hours or weeks, such as 90d, 12h or 2w; got {after:?}");
                return ExitCode::from(2);
            };
            let key = tokengate::front::keys::new_key();
            let not_after = tokengate::config::rfc3339(std::time::SystemTime::now() + lifetime);
            println!("key: {key}");
            println!(
                "keys = [{{ sha256 = \"{}\", not_after = {not_after} }}]",
                tokengate::front::keys::hash_key(&key)
            );
            eprintln!("Give the key to the client; put only the keys line in its [[client]] (beside the key it replaces, until that one's not_after). The key is not shown again.");
            ExitCode::SUCCESS
        }
        KeyAction::Hash => {
            let mut input = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut input) {
                eprintln!("tokengate: cannot read stdin: {e}");
                return ExitCode::from(1);
            }
            let key = input.trim_end_matches(['\r', '\n']);
            if key.is_empty() {
                eprintln!("tokengate: no key on stdin");
                return ExitCode::from(1);
            }
            println!("{}", tokengate::front::keys::hash_key(key));
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_directives;

    #[test]
    fn a_bare_debug_level_is_the_proxys_own() {
        assert_eq!(log_directives(Some("debug")), "info,tokengate=debug");
        assert_eq!(log_directives(None), "info");
        assert_eq!(log_directives(Some("warn")), "warn");
        assert_eq!(log_directives(Some("hyper=trace")), "hyper=trace");
    }
}
