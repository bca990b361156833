//! Thread per core for the proxy listener: each worker thread runs its own single-threaded
//! tokio runtime, accepts on its own `SO_REUSEPORT` socket (the kernel spreads connections
//! over them) and talks to upstreams through its own connection pools.
//!
//! Why: measured on this project's 2-core machines (probes of minimal hyper proxies, and a
//! profile of this proxy), the largest cost of a
//! small proxied call on a work-stealing runtime was threads waking each other — a
//! connection's tasks and the shared pool's connection tasks on different threads. With a
//! worker per core, a call is accepted, forwarded and answered on one thread. Tokens,
//! config and metrics are still shared (atomics and `ArcSwap`, read without locks).

use std::net::SocketAddr;

/// `count` listening sockets on one address, sharing it with `SO_REUSEPORT`: the kernel
/// spreads new connections over the workers. With port 0 the first one picks the port and
/// the others take the same.
///
/// `SO_REUSEPORT` would also let a second tokengate started by mistake on the same port
/// (same user) join the group and silently take part of the connections. So a fixed port
/// that something already listens on is refused first, as a plain bind would be.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 && listened_on(addr) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process is listening on this address",
        ));
    }
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

/// Whether a socket in LISTEN state holds `addr`'s port on `addr`'s IP or on the
/// wildcard address, per the kernel's tables (`/proc/net/tcp`, `/proc/net/tcp6`; where
/// they do not exist, nothing is known and the bind decides).
fn listened_on(addr: SocketAddr) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .any(|text| text.lines().skip(1).any(|line| listens(line, addr)))
}

/// Whether one line of `/proc/net/tcp{,6}` is a socket listening on `addr`'s port, on
/// its IP or the wildcard address.
fn listens(line: &str, addr: SocketAddr) -> bool {
    const LISTEN: &str = "0A";
    let mut fields = line.split_whitespace();
    let (Some(local), Some(_remote), Some(state)) = (fields.nth(1), fields.next(), fields.next())
    else {
        return false;
    };
    let Some((ip_hex, port_hex)) = local.split_once(':') else {
        return false;
    };
    state == LISTEN
        && u16::from_str_radix(port_hex, 16).ok() == Some(addr.port())
        && (ip_hex.chars().all(|c| c == '0') || kernel_hex_ip(ip_hex) == Some(addr.ip()))
}

/// An address as `/proc/net/tcp{,6}` writes it: 32-bit words in host byte order.
fn kernel_hex_ip(hex: &str) -> Option<std::net::IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    match words.as_slice() {
        [w] => Some(std::net::Ipv4Addr::from(w.to_ne_bytes()).into()),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(std::net::Ipv6Addr::from(bytes).into())
        }
        _ => None,
    }
}

/// Runs `serve` on a new thread with its own current-thread runtime, named after worker
/// `index`. Nothing here is thread-local: what a worker serves was built for it (see
/// [`crate::live::Live::for_worker`]). The returned receiver completes when `serve` has
/// returned.
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
            runtime.block_on(async {
                // This worker's log lines (every call's audit line) are written in batches.
                crate::telemetry::log_batch::batch_this_thread();
                serve().await;
            });
            // Tasks still running (a background token refresh) end with the runtime.
            drop(runtime);
            crate::telemetry::log_batch::flush_this_thread();
            let _ = done.send(());
        })?;
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_port_is_seen_and_a_free_one_is_not() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(listened_on(addr));
        drop(taken);
        assert!(!listened_on(addr));
        let v6 = std::net::TcpListener::bind("[::1]:0");
        if let Ok(v6) = v6 {
            assert!(listened_on(v6.local_addr().unwrap()));
        }
    }

    #[test]
    fn kernel_addresses_decode() {
        assert_eq!(
            kernel_hex_ip("0100007F"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            kernel_hex_ip("00000000000000000000000001000000"),
            Some("::1".parse().unwrap())
        );
    }
}
