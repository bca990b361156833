//! Thread per core for the proxy listener: each worker thread runs its own single-threaded
//! tokio runtime, accepts on its own `SO_REUSEPORT` socket (the kernel spreads connections
//! over them) and talks to upstreams through its own connection pools.
//!
//! Why: measured here (PERF-NOTES, and a profile of this proxy), the largest cost of a
//! small proxied call on a work-stealing runtime was threads waking each other — a
//! connection's tasks and the shared pool's connection tasks on different threads. With a
//! worker per core, a call is accepted, forwarded and answered on one thread. Tokens,
//! config and metrics are still shared (atomics and `ArcSwap`, read without locks).

use std::cell::Cell;
use std::net::SocketAddr;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running on this thread (0 outside the workers).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

fn set_current(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// How many workers to run when the config does not say: one per core the process may use.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `count` listening sockets on one address, sharing it with `SO_REUSEPORT`. With port 0
/// the first one picks the port and the others take the same.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Runs `serve` on a new thread with its own current-thread runtime; the thread is worker
/// `index`. The returned receiver completes when `serve` has returned.
pub fn spawn<F, Fut>(index: usize, serve: F) -> std::io::Result<tokio::sync::oneshot::Receiver<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("tokengate-worker-{index}"))
        .spawn(move || {
            set_current(index);
            runtime.block_on(serve());
            // Tasks still running (a background token refresh) end with the runtime.
            drop(runtime);
            let _ = done.send(());
        })?;
    Ok(finished)
}
