//! Quiet plain connections, held in one table per listener instead of a task each.
//!
//! A keep-alive caller quiet between its calls cost, waiting in a task of its own, that
//! task (jemalloc's 768-byte class) and tokio's registration of its socket (256 bytes):
//! 10 MB at 10,000 idle callers, where nginx needs about 7 MB in all. Here a connection
//! that came to rest (see [`super::resting`]) leaves tokio: its socket is registered with
//! one `mio::Poll` per listener and worker, whose descriptor tokio watches, and a row of
//! this table (about 80 bytes) holds it until its next bytes come — then it gets a task
//! again, and a new hyper connection — until it has been quiet for
//! [`HEADER_READ_TIMEOUT`], or until the listener closes. A woken socket costs one `epoll_ctl` to leave the table and one
//! to join tokio's: only after a second of quiet, never on a busy connection's path.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;
use tokio::io::unix::{AsyncFd, AsyncFdReadyMutGuard};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::between::RESTED;
use super::connection::HEADER_READ_TIMEOUT;
use super::memory;

/// How often the table is looked over for connections quiet too long.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A row is closed at the first sweep at least [`HEADER_READ_TIMEOUT`] after it came to
/// rest (up to a sweep later): counting sweeps keeps the clock out of every rest.
const QUIET_SWEEPS: u32 = HEADER_READ_TIMEOUT.as_secs() as u32 + 1;
/// Rests on a worker worth flushing its allocator cache for, at a sweep.
const RESTS_WORTH_A_FLUSH: usize = 256;

/// The quiet connections of one listener, with `H` each connection's places under the
/// listener's caps (they stay taken while it rests).
pub(super) struct Rests<H> {
    /// Where sockets are registered; `None` if the poll could not be made.
    registry: Option<Registry>,
    table: Mutex<Table<H>>,
}

struct Table<H> {
    rows: Slab<Row<H>>,
    /// Sweeps so far: a row's age is the count now less the count when it came.
    sweeps: u32,
    /// The listener closed (or the table's watch failed): rests are refused.
    closed: bool,
    /// Rests since this worker last flushed its allocator's cache.
    rests_since_flush: usize,
}

struct Row<H> {
    socket: std::net::TcpStream,
    peer: IpAddr,
    slots: H,
    since: u32,
}

impl<H> Rests<H> {
    /// An empty table, and the poll its sockets are registered with (for [`Rests::watch`]).
    /// Without a poll (out of descriptors at start, say; logged) a quiet connection is
    /// closed instead of resting, and its caller opens a new one when it calls again.
    pub(super) fn new(what: &'static str) -> (Rests<H>, Option<Poll>) {
        let made = Poll::new().and_then(|poll| Ok((poll.registry().try_clone()?, poll)));
        let (registry, poll) = match made {
            Ok((registry, poll)) => (Some(registry), Some(poll)),
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "no table for quiet connections: they are closed instead of resting");
                (None, None)
            }
        };
        let table = Table {
            rows: Slab::new(),
            sweeps: 0,
            closed: false,
            rests_since_flush: 0,
        };
        let rests = Rests {
            registry,
            table: Mutex::new(table),
        };
        (rests, poll)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table<H>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections resting now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table().rows.len()
    }

    /// `stream` rests here until its next bytes. If it cannot (the listener is closing,
    /// the registration failed) it is closed, as an idle keep-alive connection may be.
    pub(super) fn rest(&self, stream: TcpStream, peer: IpAddr, slots: H) {
        let socket = match stream.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                tracing::debug!(error = %e, "a resting connection could not leave tokio; closed");
                return;
            }
        };
        let mut table = self.table();
        let Some(registry) = self.registry.as_ref().filter(|_| !table.closed) else {
            return;
        };
        let since = table.sweeps;
        let fd = socket.as_raw_fd();
        let entry = table.rows.vacant_entry();
        let token = Token(entry.key());
        // Registered after it left tokio: bytes that came meanwhile make it ready at once.
        match registry.register(&mut SourceFd(&fd), token, Interest::READABLE) {
            Ok(()) => {
                entry.insert(Row {
                    socket,
                    peer,
                    slots,
                    since,
                });
                table.rests_since_flush += 1;
                RESTED.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(error = %e, "a resting connection could not be registered; closed")
            }
        }
    }

    /// Watches the table's sockets until the listener closes: a socket with bytes (or an
    /// end) leaves the table through `wake`, one quiet for [`HEADER_READ_TIMEOUT`] is
    /// closed. When this ends, every resting connection is closed and rests are refused.
    pub(super) async fn watch<W>(&self, poll: Poll, mut closed: watch::Receiver<bool>, mut wake: W)
    where
        W: FnMut(TcpStream, IpAddr, H),
    {
        // SAFETY: the poll owns its epoll descriptor, open and the same for its whole life,
        // and the `AsyncFd` owns the poll.
        #[allow(unsafe_code)]
        let registered =
            unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) };
        let mut poll = match registered {
            Ok(poll) => poll,
            Err(e) => {
                tracing::warn!(error = %e, "quiet connections cannot rest here; they are closed instead");
                return self.close_all();
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events = Events::with_capacity(256);
        loop {
            tokio::select! {
                _ = closed.wait_for(|closing| *closing) => break,
                _ = sweep.tick() => self.sweep(),
                ready = poll.readable_mut() => {
                    let woke = match ready {
                        Ok(mut ready) => self.wake_ready(&mut ready, &mut events, &mut wake),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = woke {
                        tracing::warn!(error = %e, "the resting connections' poll failed; closing them");
                        break;
                    }
                }
            }
        }
        self.close_all();
    }

    /// Every socket ready now leaves the table through `wake`; then tokio's readiness of
    /// the poll is cleared (it knows if more came meanwhile).
    fn wake_ready<W>(
        &self,
        ready: &mut AsyncFdReadyMutGuard<'_, Poll>,
        events: &mut Events,
        wake: &mut W,
    ) -> io::Result<()>
    where
        W: FnMut(TcpStream, IpAddr, H),
    {
        loop {
            match ready.get_inner_mut().poll(events, Some(Duration::ZERO)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            if events.is_empty() {
                ready.clear_ready();
                return Ok(());
            }
            for (socket, peer, slots) in self.take_ready(events) {
                match TcpStream::from_std(socket) {
                    Ok(stream) => wake(stream, peer, slots),
                    Err(e) => {
                        tracing::debug!(error = %e, "a rested connection could not join tokio again; closed")
                    }
                }
            }
        }
    }

    /// The rows of `events`' sockets, out of the table and out of its poll (taken under
    /// the lock, woken after it).
    fn take_ready(&self, events: &Events) -> Vec<(std::net::TcpStream, IpAddr, H)> {
        let mut woken = Vec::new();
        let mut table = self.table();
        for event in events {
            if let Some(row) = table.rows.try_remove(event.token().0) {
                if let Some(registry) = &self.registry {
                    let _ = registry.deregister(&mut SourceFd(&row.socket.as_raw_fd()));
                }
                woken.push((row.socket, row.peer, row.slots));
            }
        }
        woken
    }

    /// Closes the connections quiet for [`HEADER_READ_TIMEOUT`] (closing a socket takes it
    /// out of the poll too).
    fn sweep(&self) {
        let mut table = self.table();
        table.sweeps = table.sweeps.wrapping_add(1);
        let now = table.sweeps;
        table
            .rows
            .retain(|_, row| now.wrapping_sub(row.since) < QUIET_SWEEPS);
        // After a crowd has gone, its rows' room is given back (as far as the keys of the
        // rows still resting allow).
        if table.rows.len() < table.rows.capacity() / 4 {
            table.rows.shrink_to_fit();
        }
        // Many connections came to rest: the buffers they freed on this worker's thread
        // sit in its allocator cache until it allocates again; hand them back so their
        // pages can go (see `memory`).
        if table.rests_since_flush >= RESTS_WORTH_A_FLUSH {
            table.rests_since_flush = 0;
            memory::flush_thread_cache();
        }
    }

    fn close_all(&self) {
        let mut table = self.table();
        table.closed = true;
        table.rows.clear();
    }
}
