//! The notification channels made through the proxy, and each client's share of them.
//!
//! Genesys Cloud allows 20 channels per user and OAuth client, and a 21st silently
//! replaces the oldest channel with no socket open (PROVIDERS.md). Behind the gate every
//! app shares one OAuth client's 20, so one app's new channel would evict another's,
//! which then simply stops getting events. The proxy counts each upstream's channels per
//! client — made through it, alive, with or without a socket — and refuses a channel the
//! client has no room for (`429 too_many_channels`) before it reaches the platform:
//!
//! - a client may hold its share (`max_channels`, or an equal part of the upstream's
//!   `notification_channels` among the clients allowed there, at least one);
//! - when the upstream's channels are all held, a new channel passes only if the one the
//!   platform will evict — the oldest without a socket — is the asking client's own (the
//!   platform's rule, kept within one app); the proxy then forgets that channel. The
//!   platform has no call to delete a channel, so this is the only way to make room.
//!
//! A channel frees its place when it expires (24 h), or when the streaming host no longer
//! knows it (a socket on it is answered 404).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::call::error::ProxyError;
use crate::telemetry::metrics::Metrics;
use crate::token::shared::SharedCache;

/// Channels live 24 h on the platform; the proxy forgets them after that.
pub const CHANNEL_LIFE: Duration = Duration::from_secs(24 * 3600);

/// A channel made through the proxy.
#[derive(Debug, Clone)]
pub struct Channel {
    pub upstream: Arc<str>,
    /// The client that made it; `None` for an anonymous caller.
    pub client: Option<Arc<str>>,
    made: Instant,
    /// Sockets open on it through this replica.
    sockets: u32,
}

impl Channel {
    pub fn new(upstream: Arc<str>, client: Option<Arc<str>>) -> Channel {
        Channel {
            upstream,
            client,
            made: Instant::now(),
            sockets: 0,
        }
    }

    /// A channel made `age` ago (another replica's, learned from the fleet).
    pub fn made_ago(
        upstream: Arc<str>,
        client: Option<Arc<str>>,
        age: Duration,
    ) -> Option<Channel> {
        Some(Channel {
            upstream,
            client,
            made: Instant::now().checked_sub(age)?,
            sockets: 0,
        })
    }

    fn alive(&self) -> bool {
        self.made.elapsed() < CHANNEL_LIFE
    }
}

type Holder = (Arc<str>, Option<Arc<str>>);

#[derive(Default)]
struct Book {
    by_path: HashMap<String, Channel>,
    /// Channels asked for and not answered yet, by (upstream, client): they count
    /// against the shares, so concurrent requests cannot pass one share together.
    pending: HashMap<Holder, u32>,
}

impl Book {
    /// Live and pending channels of `upstream` whose maker `of` accepts.
    fn count(&self, upstream: &str, of: impl Fn(Option<&Arc<str>>) -> bool) -> usize {
        let live = self
            .by_path
            .values()
            .filter(|c| c.alive() && &*c.upstream == upstream && of(c.client.as_ref()))
            .count();
        let pending: u32 = self
            .pending
            .iter()
            .filter(|((u, c), _)| &**u == upstream && of(c.as_ref()))
            .map(|(_, n)| *n)
            .sum();
        live + pending as usize
    }

    /// The channel of `upstream` the platform evicts next: the oldest without a socket.
    fn next_evicted(&self, upstream: &str) -> Option<(&String, &Channel)> {
        self.by_path
            .iter()
            .filter(|(_, c)| c.alive() && &*c.upstream == upstream && c.sockets == 0)
            .min_by_key(|(_, c)| c.made)
    }
}

/// The channels made through this proxy, by the socket path it handed out
/// (`<prefix>/channels/<id>`). One for the process: a reload keeps them. With `[cache]`
/// the fleet shares them through Redis (see [`super::notifications`]), so a socket may
/// land on another replica than the one that made its channel.
pub struct Channels {
    book: Mutex<Book>,
    fleet: Arc<ArcSwapOption<SharedCache>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").finish_non_exhaustive()
    }
}

/// A channel asked for and counted, until the platform's answer makes it one (or not).
pub struct Claim {
    channels: Arc<Channels>,
    holder: Holder,
    /// The asking client's channel the platform will evict to make room.
    gives_way: Option<String>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut book = self.channels.lock();
        if let Some(n) = book.pending.get_mut(&self.holder) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                book.pending.remove(&self.holder);
            }
        }
    }
}

/// A socket open on a channel: the platform does not evict a channel with one.
pub struct SocketMark {
    channels: Arc<Channels>,
    path: String,
}

impl Drop for SocketMark {
    fn drop(&mut self) {
        if let Some(c) = self.channels.lock().by_path.get_mut(&self.path) {
            c.sockets = c.sockets.saturating_sub(1);
        }
    }
}

impl Channels {
    /// `fleet`: the fleet's Redis, when `[cache]` is configured (it may change on reload).
    pub fn new(fleet: Arc<ArcSwapOption<SharedCache>>, metrics: Metrics) -> Arc<Channels> {
        Arc::new(Channels {
            book: Mutex::default(),
            fleet,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether channels made by other replicas can be looked up.
    pub fn shared(&self) -> bool {
        self.fleet.load().is_some()
    }

    /// Count a channel `client` asks for on `upstream`, which holds `total` channels
    /// (`None`: not counted), of which `client` may hold `share` (`None`: no share, an
    /// anonymous caller); or refuse it.
    pub fn claim(
        self: &Arc<Self>,
        upstream: &Arc<str>,
        client: Option<&Arc<str>>,
        share: Option<u32>,
        total: Option<u32>,
    ) -> Result<Claim, ProxyError> {
        let mut book = self.lock();
        let who = client.map_or("an anonymous caller".to_string(), |c| {
            format!("client \"{c}\"")
        });
        if let Some(share) = share {
            let held = book.count(upstream, |c| c == client);
            if held >= share as usize {
                return Err(ProxyError::TooManyChannels(format!(
                    "{who} holds {held} notification channels on upstream \"{upstream}\", its share (max_channels {share}); \
                     a new one would make the platform evict another app's channel: reuse a channel, or let one expire"
                )));
            }
        }
        let mut gives_way = None;
        if let Some(total) = total {
            if book.count(upstream, |_| true) >= total as usize {
                // The platform will evict its oldest channel without a socket: only if that
                // is this client's own may the new one be made.
                match book.next_evicted(upstream) {
                    Some((path, c)) if c.client.as_ref() == client => {
                        gives_way = Some(path.clone());
                    }
                    _ => {
                        return Err(ProxyError::TooManyChannels(format!(
                            "all {total} notification channels of upstream \"{upstream}\" are held (notification_channels), \
                             and a new one would make the platform evict another app's channel; {who} has none without a socket to give way"
                        )))
                    }
                }
            }
        }
        let holder = (Arc::clone(upstream), client.cloned());
        *book.pending.entry(holder.clone()).or_default() += 1;
        Ok(Claim {
            channels: Arc::clone(self),
            holder,
            gives_way,
        })
    }

    /// The platform made the claimed channel: remember it (and tell the fleet, before the
    /// app is answered, so its socket finds the channel on any replica); forget the
    /// channel the platform evicted to make room, if one had to give way.
    pub async fn made(&self, claim: Claim, path: String, channel: Channel) {
        tell_fleet(self, &path, &channel).await;
        let upstream = Arc::clone(&channel.upstream);
        let client = channel.client.clone();
        {
            let mut book = self.lock();
            book.by_path.retain(|_, c| c.alive());
            if let Some(evicted) = &claim.gives_way {
                book.by_path.remove(evicted);
            }
            book.by_path.insert(path, channel);
        }
        drop(claim);
        self.publish(&upstream, client.as_ref());
    }

    /// A channel another replica made, learned from the fleet.
    fn learned(&self, path: &str, channel: Channel) {
        self.lock().by_path.insert(path.to_string(), channel);
    }

    /// The streaming host no longer knows the channel at `path`: it frees its place.
    pub fn gone(&self, path: &str) {
        let removed = self.lock().by_path.remove(path);
        if let Some(c) = removed {
            self.publish(&c.upstream, c.client.as_ref());
        }
    }

    /// A socket is open on the channel at `path` until the mark is dropped.
    pub fn socket_opened(self: &Arc<Self>, path: &str) -> SocketMark {
        if let Some(c) = self.lock().by_path.get_mut(path) {
            c.sockets += 1;
        }
        SocketMark {
            channels: Arc::clone(self),
            path: path.to_string(),
        }
    }

    /// The live channel whose socket path (as the proxy handed it out) is `path`.
    pub fn socket(&self, path: &str) -> Option<Channel> {
        self.lock().by_path.get(path).filter(|c| c.alive()).cloned()
    }

    /// Live channels by (upstream, client), for the status page.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Option<Arc<str>>)> {
        let book = self.lock();
        book.by_path
            .values()
            .filter(|c| c.alive())
            .map(|c| (Arc::clone(&c.upstream), c.client.clone()))
            .collect()
    }

    /// Set the channels gauge of (upstream, client), and of any other holder whose
    /// channels expired since.
    fn publish(&self, upstream: &Arc<str>, client: Option<&Arc<str>>) {
        let mut counts: HashMap<Holder, usize> = HashMap::new();
        counts.insert((Arc::clone(upstream), client.cloned()), 0);
        for c in self.lock().by_path.values() {
            let n = counts
                .entry((Arc::clone(&c.upstream), c.client.clone()))
                .or_default();
            if c.alive() {
                *n += 1;
            }
        }
        for ((u, c), n) in counts {
            self.metrics
                .channels_open(&u, c.as_deref().unwrap_or(""), n);
        }
    }
}

// === The fleet's channels (with `[cache]`) ===

/// A channel as the fleet stores it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    upstream: String,
    client: Option<String>,
    made_unix: u64,
}

/// The Redis name of a channel's entry: a hash, so Redis never sees a channel id (the
/// socket's credential).
fn fleet_name(path: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(path.as_bytes());
    format!("channel:{}", hex::encode(&digest[..16]))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The channel whose socket path is `path`: this replica's, else the fleet's.
pub async fn resolve(channels: &Channels, path: &str) -> Option<Channel> {
    if let Some(channel) = channels.socket(path) {
        return Some(channel);
    }
    let fleet = channels.fleet.load_full()?;
    let plain = fleet.get_sealed(&fleet_name(path)).await.ok()??;
    let stored: Stored = serde_json::from_slice(&plain).ok()?;
    let age = Duration::from_secs(now_unix().saturating_sub(stored.made_unix));
    let channel = Channel::made_ago(
        Arc::from(stored.upstream),
        stored.client.map(Arc::from),
        age,
    )?;
    channels.learned(path, channel.clone());
    Some(channel)
}

/// Tell the fleet of a channel made here (Redis down: it works on this replica only).
async fn tell_fleet(channels: &Channels, path: &str, channel: &Channel) {
    let Some(fleet) = channels.fleet.load_full() else {
        return;
    };
    let stored = Stored {
        upstream: channel.upstream.to_string(),
        client: channel.client.as_deref().map(str::to_owned),
        made_unix: now_unix(),
    };
    if let Ok(plain) = serde_json::to_vec(&stored) {
        let _ = fleet
            .put_sealed(&fleet_name(path), &plain, CHANNEL_LIFE)
            .await;
    }
}
