//! A plain connection's task end to end: resting, waking, timeouts, closing, size.

use super::*;
use crate::ingress::resting::REST_AFTER;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Context;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers every request with the length of its body; counts its clones (one per
/// hyper connection a socket was served by).
struct Counted(Arc<AtomicUsize>);

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(&self.0))
    }
}

impl tower::Service<http::Request<Incoming>> for Counted {
    type Response = http::Response<crate::http::body::ProxyBody>;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Incoming>) -> Self::Future {
        Box::pin(async move {
            let body = http_body_util::BodyExt::collect(req.into_body()).await;
            let n = body.map(|b| b.to_bytes().len()).unwrap_or(usize::MAX);
            Ok(http::Response::new(crate::http::body::full(n.to_string())))
        })
    }
}

struct Server {
    addr: std::net::SocketAddr,
    served_by: Arc<AtomicUsize>,
    /// The listener's closing signal.
    closing: watch::Sender<bool>,
    /// The size of a connection's task (its future).
    task_bytes: Arc<AtomicUsize>,
    listener: Arc<PlainListener<Counted, ()>>,
}

async fn server() -> Server {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let served_by = Arc::new(AtomicUsize::new(0));
    let counted = Counted(Arc::clone(&served_by));
    let (closing, closed) = watch::channel(false);
    let task_bytes = Arc::new(AtomicUsize::new(0));
    let sizes = Arc::clone(&task_bytes);
    let mut builder = http1::Builder::new();
    builder.half_close(true);
    let auto = Arc::new(hyper_util::server::conn::auto::Builder::new(
        hyper_util::rt::TokioExecutor::new(),
    ));
    let (rests, poll) = Rests::new("test");
    let poll = poll.unwrap();
    let listener = Arc::new(PlainListener {
        http1: builder,
        auto,
        service: counted,
        what: "test",
        rests,
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let watcher = Arc::new(graceful.watcher());
    let plain = {
        let (listener, watcher, closed) =
            (Arc::clone(&listener), Arc::clone(&watcher), closed.clone());
        move |peer: IpAddr| Plain {
            listener: Arc::clone(&listener),
            watcher: Arc::clone(&watcher),
            closed: closed.clone(),
            peer,
            slots: (),
        }
    };
    listener.watch_rests(poll, watcher, closed);
    tokio::spawn(async move {
        let _graceful = graceful;
        while let Ok((stream, peer)) = tcp.accept().await {
            let task = serve(stream, plain(peer.ip()));
            sizes.store(std::mem::size_of_val(&task), Ordering::Relaxed);
            tokio::spawn(task);
        }
    });
    Server {
        addr,
        served_by,
        closing,
        task_bytes,
        listener,
    }
}

impl Server {
    /// Clones of the service so far: one per accepted socket, one per hyper
    /// connection that served it.
    fn bursts(&self) -> usize {
        self.served_by.load(Ordering::Relaxed)
    }
}

async fn answer(client: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return body.to_string();
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_quiet_connection_rests_and_serves_its_next_request() {
    let s = server().await;
    let mut client = TcpStream::connect(s.addr).await.unwrap();
    assert_eq!(get(&mut client).await, "0");
    let first = s.bursts();
    // Quiet for longer than REST_AFTER (paused time: the clock moves, nothing waits).
    tokio::time::sleep(REST_AFTER * 2).await;
    assert_eq!(get(&mut client).await, "0");
    assert_eq!(
        s.bursts(),
        first + 1,
        "the second request found the connection resting"
    );
    // A busy connection does not rest: back to back, the same hyper connection.
    for _ in 0..3 {
        assert_eq!(get(&mut client).await, "0");
    }
    assert_eq!(s.bursts(), first + 1);
}

#[tokio::test(start_paused = true)]
async fn a_body_half_sent_or_an_upgrade_keeps_the_connection_in_hyper() {
    let s = server().await;
    let mut client = TcpStream::connect(s.addr).await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhello")
        .await
        .unwrap();
    tokio::time::sleep(REST_AFTER * 3).await;
    client.write_all(b"world").await.unwrap();
    assert_eq!(answer(&mut client).await, "10", "the body came whole");
    let first = s.bursts();
    client
        .write_all(
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(answer(&mut client).await, "0");
    tokio::time::sleep(REST_AFTER * 3).await;
    assert_eq!(get(&mut client).await, "0");
    assert_eq!(s.bursts(), first, "no rest after an upgrade request");
}

/// A GET on `client`, and its answer's body.
async fn get(client: &mut TcpStream) -> String {
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    answer(client).await
}

/// Reads until the connection ends; what came (nothing, for a closed idle connection).
async fn until_closed(client: &mut TcpStream) -> usize {
    let mut buf = [0u8; 256];
    let mut got = 0;
    loop {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got += n,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_sends_nothing_is_closed_at_the_head_timeout() {
    let s = server().await;
    let started = tokio::time::Instant::now();
    let mut client = TcpStream::connect(s.addr).await.unwrap();
    assert_eq!(until_closed(&mut client).await, 0);
    let waited = started.elapsed();
    assert!(
        waited >= HEADER_READ_TIMEOUT && waited < HEADER_READ_TIMEOUT + REST_AFTER,
        "closed after {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_resting_connection_is_closed_when_quiet_too_long_or_when_the_listener_closes() {
    let s = server().await;
    // Quiet too long: rests after 1-2 s, closed HEADER_READ_TIMEOUT later.
    let mut client = TcpStream::connect(s.addr).await.unwrap();
    assert_eq!(get(&mut client).await, "0");
    let answered = tokio::time::Instant::now();
    assert_eq!(until_closed(&mut client).await, 0);
    let waited = answered.elapsed();
    assert!(
        waited >= HEADER_READ_TIMEOUT + REST_AFTER
            && waited <= HEADER_READ_TIMEOUT + REST_AFTER * 3,
        "closed {waited:?} after its answer"
    );
    // The listener closing: a resting connection ends then, not at its timeout.
    let mut client = TcpStream::connect(s.addr).await.unwrap();
    assert_eq!(get(&mut client).await, "0");
    let bursts = s.bursts();
    tokio::time::sleep(REST_AFTER * 3).await;
    let closed_at = tokio::time::Instant::now();
    s.closing.send_replace(true);
    assert_eq!(until_closed(&mut client).await, 0);
    assert!(
        closed_at.elapsed() < REST_AFTER,
        "{:?}",
        closed_at.elapsed()
    );
    assert_eq!(s.bursts(), bursts, "it was resting, not in hyper");
}

#[tokio::test(start_paused = true)]
async fn quiet_connections_wait_in_the_table_without_a_task() {
    let s = server().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    // The accept loop and the table's watch.
    let listening = metrics.num_alive_tasks();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut client = TcpStream::connect(s.addr).await.unwrap();
        assert_eq!(get(&mut client).await, "0");
        clients.push(client);
    }
    assert!(metrics.num_alive_tasks() >= listening + 20);
    tokio::time::sleep(REST_AFTER * 3).await;
    assert_eq!(s.listener.rests.len(), 20, "all quiet, all resting");
    assert_eq!(
        metrics.num_alive_tasks(),
        listening,
        "a resting connection has no task"
    );
    // Each is served again by its next request, and rests again after it.
    let bursts = s.bursts();
    for client in &mut clients {
        assert_eq!(get(client).await, "0");
    }
    assert_eq!(s.bursts(), bursts + 20);
    assert_eq!(s.listener.rests.len(), 0);
    tokio::time::sleep(REST_AFTER * 3).await;
    assert_eq!(s.listener.rests.len(), 20);
    // One that hangs up while resting leaves the table (its end woke it).
    drop(clients.pop());
    while s.listener.rests.len() != 19 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.num_alive_tasks(), listening);
}

#[tokio::test]
async fn a_plain_connection_task_stays_small() {
    // A task lives as long as its connection serves: at 1,000 busy callers each of
    // its bytes is 1 KB (benches/load.sh measures the whole). 464 bytes here when this
    // was written (512 before the listener's shared parts moved behind one `Arc`; 648
    // before the task was one `async move` block). A local kept across an await (a
    // moved-from value still in scope, an `async fn`'s arguments, a callee's future
    // taking the connection's state by value) adds a copy and fails this.
    let s = server().await;
    let mut client = TcpStream::connect(s.addr).await.unwrap();
    assert_eq!(get(&mut client).await, "0");
    let bytes = s.task_bytes.load(Ordering::Relaxed);
    assert!(
        bytes > 0 && bytes <= 480,
        "a plain connection's task is {bytes} bytes"
    );
}
