//! The rate budget of an upstream's tokens, and a fair share of it for every client.
//!
//! Genesys Cloud allows each token so many API calls per window (300 a minute by
//! default) and says where a token stands on every answer: `inin-ratelimit-allowed`,
//! `inin-ratelimit-count`, `inin-ratelimit-reset` (seconds). The [`Governor`] learns that
//! (or takes `rate_limit = "300/min"` where a platform says nothing), counts the calls it
//! lets through in each token's window, and holds back a call that would overrun it:
//! the call waits for the window to reset, up to `rate_limit_max_wait_secs`, else the
//! proxy answers `429 rate_limited` itself, without spending the platform's budget.
//!
//! Waiting calls are let through in weighted fair order (start-time fair queueing): each
//! call gets a tag, its client's last tag (or the virtual time, if later) plus
//! `1 / share`, and the smallest tag goes first. A client within its share is never
//! starved by one above it, and a quiet client's call goes ahead of a noisy client's
//! backlog. Until a budget is known, calls pass without taking the lock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{RateLimit, UpstreamConfig};
use crate::token::shared::SharedCache;

/// A tag step for share 1: tags are integers, `STEP / share` apart for one client.
const STEP: u64 = 1_000_000;

/// Added to the end of a window the platform reports: its reset is in whole seconds, so
/// the real end may be up to a second later than it says.
const MARGIN: Duration = Duration::from_secs(1);

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The budget has no room within the longest wait; room comes after this long.
    Budget(Duration),
    /// The client made `max_per_minute` calls this minute; the minute ends after this long.
    ClientCap(Duration),
}

/// One pooled token's window, as the governor counts it, and the pace it spends it at.
#[derive(Debug, Clone)]
struct TokenWindow {
    /// Calls allowed per window; `None`: not known (the token is not held back).
    allowed: Option<u64>,
    /// Calls let through in this window (or counted by the platform, if more).
    used: u64,
    /// When this window ends; `None`: no call started one yet (the next one does).
    ends: Option<Instant>,
    /// How long a window lasts, as configured or as the platform's resets tell (the
    /// longest reset seen); `None`: not known yet.
    len: Option<Duration>,
    /// Calls that may start now, once calls wait: a backlog is let through at an even
    /// pace (`allowed / len`, with a burst of a quarter of it), so it cannot spend a
    /// whole window in its first moment and leave a quiet client nothing. While nobody
    /// waits, a call with room in the window goes at once (it spends the pace too).
    bucket: f64,
    refilled: Instant,
    /// With a fleet: calls of this window reserved in Redis and not used yet. A call
    /// spends one; when none are left, the dispatcher reserves a slice more.
    leased: u64,
    /// Calls reserved by this replica in this window; the fleet's reservations in it as
    /// the last lease told; and how many replicas reserved (kept across windows). While
    /// Redis is down, a replica spends what it reserved, then an equal part of what the
    /// fleet had not reserved.
    reserved: u64,
    fleet_total: u64,
    replicas: u64,
    /// Since Redis went down (in this window): the window's count then, and this
    /// replica's calls then.
    fallback_from: Option<(u64, u64)>,
    /// Calls that were in flight when this window's count was learned (the platform may
    /// not have counted them yet): held back from the budget until the platform's count
    /// shows them, or fewer calls than that are still in flight.
    guard: u64,
    /// Calls this replica let through in this window.
    own: u64,
    /// Calls let through in the window's last two seconds (and when the first was): the
    /// platform's window may already have ended, so they may count in its next one.
    late: u64,
    late_first: Option<Instant>,
    /// `allowed` and `len` are the provider's documented budget, assumed until the
    /// platform's first answer says what it is.
    assumed: bool,
}

impl TokenWindow {
    /// Calls per second and the burst, when both the budget and the window are known.
    fn pace(&self) -> Option<(f64, f64)> {
        let (allowed, len) = (self.allowed?, self.len?);
        if len.is_zero() {
            return None;
        }
        let burst = (allowed as f64 / 4.0).max(1.0);
        Some((allowed as f64 / len.as_secs_f64(), burst))
    }

    fn refill(&mut self, now: Instant) {
        if let Some((rate, burst)) = self.pace() {
            let gained = now.saturating_duration_since(self.refilled).as_secs_f64() * rate;
            self.bucket = (self.bucket + gained).min(burst);
        }
        self.refilled = now;
    }

    /// Calls this replica made in the window beyond what it reserved (while Redis was
    /// away).
    fn unreserved(&self) -> u64 {
        self.own
            .saturating_sub(self.reserved.saturating_sub(self.leased))
    }

    fn window_has_room(&self) -> bool {
        self.allowed.is_none_or(|a| self.used + self.guard < a)
    }

    /// Room for a call now. `fleet`: the budget is shared through Redis and reachable
    /// (a reserved call is needed); `Some(false)`: shared but Redis is down (this
    /// replica's part of the budget); `None`: not shared.
    fn has_room(&self, fleet: Option<bool>, paced: bool) -> bool {
        let share = match fleet {
            None => true,
            Some(true) => self.leased > 0,
            Some(false) => {
                // What nobody had counted when Redis went down, less what the others may
                // still hold reserved (a slice each), in equal parts.
                let (base, own_then) = self.fallback_from.unwrap_or((self.used, self.own));
                self.leased > 0
                    || self.allowed.is_none_or(|a| {
                        let others = (self.replicas.max(1) - 1) * slice_of(a);
                        let part =
                            a.saturating_sub(base).saturating_sub(others) / self.replicas.max(1);
                        self.own.saturating_sub(own_then) < part
                    })
            }
        };
        share && self.window_has_room() && (!paced || self.pace().is_none() || self.bucket >= 1.0)
    }

    fn roll(&mut self, now: Instant) {
        if self.ends.is_some_and(|e| e <= now) {
            // The late calls may have started the platform's next window: count them in
            // ours, which then ends a window after the first of them.
            self.used = self.late;
            self.own = self.late;
            self.ends = self
                .late_first
                .map(|t| t + self.len.unwrap_or(Duration::from_secs(60)) + MARGIN);
            self.leased = 0;
            self.reserved = 0;
            self.fleet_total = 0;
            self.fallback_from = None;
            self.guard = 0;
            self.late = 0;
            self.late_first = None;
        }
        self.refill(now);
    }

    /// When it next has room (`now` if it has, or if it needs a lease from the fleet).
    fn room_at(&self, now: Instant, fleet: Option<bool>) -> Instant {
        let part_spent =
            fleet == Some(false) && !self.has_room(Some(false), false) && self.window_has_room();
        if self.guard > 0 && self.allowed.is_some_and(|a| self.used < a) && !self.window_has_room()
        {
            // Room comes with the answers of the calls in flight (each answer dispatches);
            // look again soon in any case.
            return now + Duration::from_millis(20);
        }
        if !self.window_has_room() || part_spent {
            return self.ends.unwrap_or(now);
        }
        match self.pace() {
            Some((rate, _)) if self.bucket < 1.0 => {
                now + Duration::from_secs_f64((1.0 - self.bucket) / rate)
            }
            _ => now,
        }
    }
}

/// A call waiting for room.
struct Waiter {
    tag: u64,
    start: u64,
    seq: u64,
    client: Arc<str>,
    tx: oneshot::Sender<usize>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.tag, self.seq) == (other.tag, other.seq)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.tag, self.seq).cmp(&(other.tag, other.seq))
    }
}

/// What the governor keeps of one client.
#[derive(Debug, Default, Clone)]
struct ClientBook {
    /// The tag of its last call.
    finish: u64,
    /// The minute of `max_per_minute`: when it started, and the calls in it.
    minute: Option<(Instant, u64)>,
    /// Calls let through, and calls waiting now (for the status page).
    served: u64,
}

struct State {
    windows: Vec<TokenWindow>,
    waiting: BinaryHeap<Reverse<Waiter>>,
    /// The start tag of the last call let through.
    virtual_time: u64,
    clients: HashMap<Arc<str>, ClientBook>,
    seq: u64,
    /// A task is asleep until the next window ends, to let waiting calls through.
    dispatcher: bool,
    next_token: usize,
    /// The budget is shared with the fleet through Redis (`[cache]`).
    fleet: bool,
    /// Redis failed a lease: until then, each window gets this replica's part only.
    fleet_down_until: Option<Instant>,
    /// The last client to ask for a call; until `several_until` (a window after another
    /// client asked) more than one client counts as calling, and calls are paced.
    last_client: Option<Arc<str>>,
    several_until: Option<Instant>,
}

/// One upstream's rate governor (see the module's documentation).
pub struct Governor {
    max_wait: Duration,
    /// A budget is known (configured, or learned from an answer), or assumed.
    active: AtomicBool,
    /// Some token's budget is still the provider's documented one, assumed.
    assuming: AtomicBool,
    state: Mutex<State>,
    /// Itself, for the dispatcher task it spawns (which must not keep it alive).
    me: Weak<Governor>,
    fleet: Option<FleetBudget>,
}

/// Where a fleet shares a token's budget: the shared cache (while one is configured) and
/// the credentials whose tokens the budget belongs to.
pub struct FleetBudget {
    pub shared: Arc<arc_swap::ArcSwapOption<SharedCache>>,
    /// [`GrantConfig::cache_key`](crate::config::GrantConfig::cache_key).
    pub cache_key: String,
}

impl std::fmt::Debug for Governor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A budget as it stands, for the status page, metrics and `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Calls allowed per window, over the pool's tokens.
    pub allowed: u64,
    pub used: u64,
    pub window: Duration,
    /// Calls waiting for room now.
    pub waiting: usize,
}

impl Governor {
    /// A governor for `config`'s pool of `tokens` tokens.
    pub fn new(
        config: &UpstreamConfig,
        tokens: usize,
        fleet: Option<FleetBudget>,
    ) -> Arc<Governor> {
        let documented = match config.rate_limit {
            Some(_) => None,
            None => documented_budget(config.provider),
        };
        let governor = Governor::with(
            config.rate_limit.or(documented),
            config.rate_limit_max_wait,
            tokens,
            fleet,
        );
        if documented.is_some() {
            governor.assume();
        }
        governor
    }

    /// Hold calls to the budget given at construction as an assumption until the
    /// platform's first answer: adopt its figures then, or, if it sends none, govern
    /// nothing (an API host that is not the platform, or a platform that changed).
    fn assume(&self) {
        for w in &mut self.lock().windows {
            // Paced calls wait for the first answer: a burst of the assumed size could
            // spend a smaller real window first come, first served.
            (w.assumed, w.bucket) = (true, 1.0);
        }
        self.assuming.store(true, Ordering::Relaxed);
    }

    /// An answer with no budget in it while one is assumed: the host does not count calls
    /// as the provider documents; stop holding calls to the assumption.
    fn drop_assumption(&self) {
        let mut st = self.lock();
        if !self.assuming.swap(false, Ordering::Relaxed) {
            return;
        }
        for w in &mut st.windows {
            if w.assumed {
                (w.assumed, w.allowed, w.len, w.bucket) = (false, None, None, 1.0);
            }
        }
        if st.windows.iter().all(|w| w.allowed.is_none()) {
            self.active.store(false, Ordering::Relaxed);
        }
        let now = Instant::now();
        st.dispatch(now);
    }

    pub fn with(
        limit: Option<RateLimit>,
        max_wait: Duration,
        tokens: usize,
        fleet: Option<FleetBudget>,
    ) -> Arc<Governor> {
        let window = TokenWindow {
            allowed: limit.map(|l| l.calls),
            used: 0,
            ends: None,
            len: limit.map(|l| l.window),
            bucket: limit.map_or(1.0, |l| (l.calls as f64 / 4.0).max(1.0)),
            refilled: Instant::now(),
            leased: 0,
            reserved: 0,
            fleet_total: 0,
            replicas: 1,
            fallback_from: None,
            guard: 0,
            own: 0,
            late: 0,
            late_first: None,
            assumed: false,
        };
        Arc::new_cyclic(|me| Governor {
            max_wait,
            active: AtomicBool::new(limit.is_some()),
            assuming: AtomicBool::new(false),
            state: Mutex::new(State {
                windows: vec![window; tokens.max(1)],
                waiting: BinaryHeap::new(),
                virtual_time: 0,
                clients: HashMap::new(),
                seq: 0,
                dispatcher: false,
                next_token: 0,
                fleet: false,
                fleet_down_until: None,
                last_client: None,
                several_until: None,
            }),
            me: me.clone(),
            fleet,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether calls are held to a budget (else they pass without a lock).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Let a call of `client` (weight `share`, at most `cap` calls a minute) through: the
    /// pooled token it must use (`None`: no budget is known; pick as usual), or why not.
    pub async fn admit(
        &self,
        client: &Arc<str>,
        share: u32,
        cap: Option<u64>,
    ) -> Result<Option<usize>, Refusal> {
        if !self.is_active() && cap.is_none() {
            return Ok(None);
        }
        let now = Instant::now();
        let fleet = self
            .fleet
            .as_ref()
            .is_some_and(|f| f.shared.load().is_some());
        let rx = {
            let mut st = self.lock();
            st.fleet = fleet;
            let active = self.is_active();
            let book = st.clients.entry(Arc::clone(client)).or_default();
            if let Some(cap) = cap {
                let minute = Duration::from_secs(60);
                let (started, calls) = match book.minute {
                    Some((started, calls)) if now < started + minute => (started, calls),
                    _ => (now, 0),
                };
                if calls >= cap {
                    return Err(Refusal::ClientCap(started + minute - now));
                }
                book.minute = Some((started, calls + 1));
            }
            if !active {
                return Ok(None);
            }
            let start = st.virtual_time.max(book_finish(&st, client));
            let tag = start + STEP / u64::from(share.max(1));
            for w in &mut st.windows {
                w.roll(now);
            }
            // Alone, a client's burst within the budget goes at once. With others calling
            // too, calls are paced over the window (a quarter of it at once), so that no
            // client can spend a whole window in its first moment — refused calls come
            // back at once, and the quiet client would find nothing left for the rest of
            // the window — and a backlog queues, where the shares decide.
            if st.last_client.as_ref() != Some(client) {
                if st.last_client.is_some() {
                    let len = st.windows[0].len.unwrap_or(Duration::from_secs(60));
                    st.several_until = Some(now + len);
                }
                st.last_client = Some(Arc::clone(client));
            }
            let several = st.several_until.is_some_and(|until| now < until);
            if st.waiting.is_empty() {
                if let Some(i) = st.take_room(now, several) {
                    st.virtual_time = start;
                    let book = st.clients.entry(Arc::clone(client)).or_default();
                    book.finish = tag;
                    book.served += 1;
                    return Ok(Some(i));
                }
            }
            let room_at = st.room_at(now);
            // An assumed budget is not refused against: the first answer brings the real
            // one (or none), and waiting calls are looked at again then.
            let assumed = st.windows.iter().any(|w| w.assumed);
            if room_at > now + self.max_wait && !assumed {
                return Err(Refusal::Budget(room_at - now));
            }
            let room_at = if assumed {
                room_at.min(now + Duration::from_millis(100))
            } else {
                room_at
            };
            let (tx, rx) = oneshot::channel();
            st.seq += 1;
            let seq = st.seq;
            st.clients.entry(Arc::clone(client)).or_default().finish = tag;
            st.waiting.push(Reverse(Waiter {
                tag,
                start,
                seq,
                client: Arc::clone(client),
                tx,
            }));
            self.arm(&mut st, room_at);
            rx
        };
        match tokio::time::timeout(self.max_wait, rx).await {
            Ok(Ok(index)) => Ok(Some(index)),
            _ => {
                let now = Instant::now();
                let room_at = self.lock().room_at(now);
                Err(Refusal::Budget(
                    room_at
                        .saturating_duration_since(now)
                        .max(Duration::from_secs(1)),
                ))
            }
        }
    }

    /// Start the task that lets waiting calls through when room comes, if none is asleep.
    fn arm(&self, st: &mut State, first_wake: Instant) {
        if st.dispatcher {
            return;
        }
        st.dispatcher = true;
        let me = self.me.clone();
        tokio::spawn(async move {
            let mut wake = first_wake;
            loop {
                tokio::time::sleep_until(wake).await;
                let Some(governor) = me.upgrade() else { return };
                // Reserve more of the fleet's budget first, if a window ran out of it
                // (outside the lock: a round trip to Redis).
                let wanted = governor.lock().lease_wanted(Instant::now());
                if let Some((index, slice, left)) = wanted {
                    let got = governor.lease(index, slice, left).await;
                    governor.lock().leased(index, slice, got, Instant::now());
                }
                let mut st = governor.lock();
                let now = Instant::now();
                st.dispatch(now);
                if st.waiting.is_empty() {
                    st.dispatcher = false;
                    return;
                }
                // Room comes again at the next window's end (or at once, if a window
                // started by these calls has room left: it has none, or they'd be gone).
                wake = st.room_at(now).max(now + Duration::from_millis(1));
            }
        });
    }

    /// Reserve `slice` calls of pool token `index`'s window in Redis: the fleet's
    /// reservations in the window so far and how many replicas made them, or `None` when
    /// Redis cannot be used.
    async fn lease(&self, index: usize, slice: u64, left: Duration) -> Option<(u64, u64)> {
        let fleet = self.fleet.as_ref()?;
        let shared = fleet.shared.load_full()?;
        let creds = shared.credentials_id(&fleet.cache_key);
        shared.lease_budget(&creds, index, slice, left).await.ok()
    }

    /// Read an answer's budget for pooled token `index` (Genesys' `inin-ratelimit-*`),
    /// and a platform 429, which says the window is spent whatever was believed.
    /// `in_flight`: calls sent and not yet answered — the platform may have counted them
    /// after this answer's count (read only when a budget is first learned, or the
    /// platform starts a window the governor did not expect).
    pub fn observe(
        &self,
        index: usize,
        status: u16,
        headers: &HeaderMap,
        in_flight: impl Fn() -> u64,
    ) {
        let number = |name| header_number(headers, name);
        let allowed = number(RATELIMIT_ALLOWED);
        if allowed.is_none()
            && !matches!(status, 401 | 429)
            && self.assuming.load(Ordering::Relaxed)
        {
            self.drop_assumption();
            return;
        }
        if allowed.is_none() && (status != 429 || !self.is_active()) {
            return;
        }
        let (count, reset) = (
            number(RATELIMIT_COUNT),
            number(RATELIMIT_RESET).or_else(|| number(http::header::RETRY_AFTER)),
        );
        let now = Instant::now();
        let mut st = self.lock();
        let Some(w) = st.windows.get_mut(index) else {
            return;
        };
        w.roll(now);
        let learned = allowed.is_some() && (w.allowed.is_none() || w.assumed);
        let was_assumed = w.assumed;
        if let Some(a) = allowed {
            w.allowed = Some(a);
            w.assumed = false;
            self.active.store(true, Ordering::Relaxed);
        }
        if let Some(reset) = reset {
            let left = Duration::from_secs(reset.min(86_400));
            if status != 429 {
                // The platform's resets replace an assumed window's length.
                let learned = w.len.is_none() || (was_assumed && !w.assumed);
                w.len = Some(if learned {
                    left
                } else {
                    w.len.unwrap_or_default().max(left)
                });
                if learned {
                    w.bucket = w.pace().map_or(1.0, |(_, burst)| burst);
                }
            }
            let end = now + left + MARGIN;
            // A reset well past the window believed: the platform started a new one.
            let len = w.len.unwrap_or(left);
            let newer = w.ends.is_none_or(|e| end > e + len / 2);
            if newer || learned {
                // Calls let through before this count was known, or counted in a window
                // it did not expect, may be in flight: hold that many back until the count
                // shows them (this answer's own call is in it).
                w.used = count.unwrap_or(w.used);
                w.guard = in_flight().saturating_sub(1);
                if learned {
                    // They were not reserved with the fleet either: the first lease
                    // reserves them (erring on the side of the fleet's whole count).
                    w.own = w.own.max(w.used + w.guard);
                }
            } else {
                let count = count.unwrap_or(0);
                if w.guard > 0 {
                    // Counted beyond what was let through since: those were the calls in
                    // flight; and no more can be unaccounted than are in flight now.
                    let held = w.guard.saturating_sub(count.saturating_sub(w.used));
                    w.guard = held.min(in_flight().saturating_sub(1));
                }
                w.used = w.used.max(count);
            }
            // The platform's clock decides when its window ends.
            w.ends = Some(end);
        }
        if status == 429 {
            w.used = w.used.max(w.allowed.unwrap_or(w.used));
            if w.allowed.is_none() {
                w.allowed = Some(w.used.max(1));
            }
            if reset.is_none() {
                w.ends = Some(w.ends.unwrap_or(now).max(now + Duration::from_secs(1)));
            }
        }
        if !st.waiting.is_empty() {
            st.dispatch(now);
        }
    }

    /// The budget over the pool's tokens, once known.
    pub fn budget(&self) -> Option<Budget> {
        if !self.is_active() {
            return None;
        }
        let st = self.lock();
        let now = Instant::now();
        let mut b = Budget {
            allowed: 0,
            used: 0,
            window: Duration::ZERO,
            waiting: st.waiting.len(),
        };
        for w in &st.windows {
            let mut w = w.clone();
            w.roll(now);
            b.allowed += w.allowed?;
            b.used += w.used;
            b.window = b.window.max(w.len.unwrap_or_default());
        }
        Some(b)
    }
}

/// The budget a provider documents for a token, held until its answers say otherwise:
/// Genesys Cloud allows 300 calls a minute per client-credentials token
/// (`client.credentials.token.rate.per.minute`). CXone documents none.
pub fn documented_budget(provider: crate::config::providers::Provider) -> Option<RateLimit> {
    match provider {
        crate::config::providers::Provider::Genesys => Some(RateLimit {
            calls: 300,
            window: Duration::from_secs(60),
        }),
        _ => None,
    }
}

/// Genesys Cloud's rate-limit headers, as names made once: looked up in every answer, a
/// name given as text would be parsed and checked again each time.
pub const RATELIMIT_ALLOWED: HeaderName = HeaderName::from_static("inin-ratelimit-allowed");
pub const RATELIMIT_COUNT: HeaderName = HeaderName::from_static("inin-ratelimit-count");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("inin-ratelimit-reset");

/// A header holding a whole number (`inin-ratelimit-*`, `Retry-After` in seconds).
pub fn header_number(headers: &HeaderMap, name: HeaderName) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// How many calls a replica reserves at a time: an eighth of the budget, at least 10
/// (one Redis command, four counted by Redis with the script's own, per slice).
fn slice_of(allowed: u64) -> u64 {
    (allowed / 8).max(10).min(allowed)
}

fn book_finish(st: &State, client: &Arc<str>) -> u64 {
    st.clients.get(client).map_or(0, |b| b.finish)
}

impl State {
    /// How the budget is shared now (see [`TokenWindow::has_room`]).
    fn fleet_mode(&self, now: Instant) -> Option<bool> {
        self.fleet
            .then(|| self.fleet_down_until.is_none_or(|until| now >= until))
    }

    /// A window that needs a lease from the fleet: its index, the slice to reserve (see
    /// [`slice_of`]) and how long the window has left.
    fn lease_wanted(&mut self, now: Instant) -> Option<(usize, u64, Duration)> {
        if self.fleet_mode(now) != Some(true) {
            return None;
        }
        self.windows.iter_mut().enumerate().find_map(|(i, w)| {
            w.roll(now);
            let allowed = w.allowed.filter(|_| !w.assumed)?;
            (w.leased == 0 && w.window_has_room()).then(|| {
                // Calls made on its own while Redis was away are reserved too, so the
                // fleet's count includes them.
                let slice = slice_of(allowed) + w.unreserved();
                let left = w
                    .ends
                    .map_or(w.len.unwrap_or(Duration::from_secs(60)) + MARGIN, |e| {
                        e.saturating_duration_since(now)
                    });
                (i, slice, left)
            })
        })
    }

    /// What a lease of `slice` calls for window `index` got: the fleet's reservations
    /// in the window and its replicas (`None`: Redis could not be used; this replica falls
    /// back to its part of the budget for a while).
    fn leased(&mut self, index: usize, slice: u64, got: Option<(u64, u64)>, now: Instant) {
        let Some(w) = self.windows.get_mut(index) else {
            return;
        };
        let Some((total, replicas)) = got else {
            self.fleet_down_until = Some(now + Duration::from_secs(5));
            w.fallback_from.get_or_insert((w.used, w.own));
            return;
        };
        w.fallback_from = None;
        w.replicas = replicas.max(1);
        w.fleet_total = w.fleet_total.max(total);
        let allowed = w.allowed.unwrap_or(u64::MAX);
        let granted = slice.min(allowed.saturating_sub(total.saturating_sub(slice)));
        // The first of them pay for the calls already made without a reservation.
        let owed = w.unreserved();
        w.reserved += granted;
        w.leased += granted.saturating_sub(owed);
        if granted == 0 {
            // The fleet has reserved the whole window: none until it ends.
            w.used = w.used.max(allowed);
            if w.ends.is_none() {
                w.ends = Some(now + w.len.unwrap_or(Duration::from_secs(60)) + MARGIN);
            }
        }
    }

    /// Take one call's room in the next token that has some (round-robin).
    /// `paced`: a waiting call, held to the pace (see [`TokenWindow::bucket`]).
    fn take_room(&mut self, now: Instant, paced: bool) -> Option<usize> {
        let n = self.windows.len();
        let fleet = self.fleet_mode(now);
        for k in 0..n {
            let i = (self.next_token + k) % n;
            let w = &mut self.windows[i];
            if w.has_room(fleet.filter(|_| !w.assumed), paced) {
                w.used += 1;
                w.own += 1;
                // A reserved call first (also while Redis is down).
                if fleet.is_some() && w.leased > 0 {
                    w.leased -= 1;
                }
                if w.pace().is_some() {
                    w.bucket = (w.bucket - 1.0).max(0.0);
                }
                match w.ends {
                    // Until the platform says otherwise, a window as long as the longest
                    // seen (a minute, if none was).
                    None => w.ends = Some(now + w.len.unwrap_or(Duration::from_secs(60)) + MARGIN),
                    Some(e) if now + MARGIN * 2 >= e => {
                        w.late += 1;
                        w.late_first.get_or_insert(now);
                    }
                    Some(_) => {}
                }
                self.next_token = (i + 1) % n;
                return Some(i);
            }
        }
        None
    }

    fn room_at(&self, now: Instant) -> Instant {
        let fleet = self.fleet_mode(now);
        self.windows
            .iter()
            .map(|w| {
                let mut w = w.clone();
                w.roll(now);
                // An assumed budget is this replica's own until the platform's is known:
                // nothing is reserved in the fleet against a window that may not exist.
                w.room_at(now, fleet.filter(|_| !w.assumed))
            })
            .min()
            .unwrap_or(now)
    }

    /// Let waiting calls through, smallest tag first, while there is room.
    fn dispatch(&mut self, now: Instant) {
        for w in &mut self.windows {
            w.roll(now);
        }
        while let Some(Reverse(top)) = self.waiting.peek() {
            if top.tx.is_closed() {
                // It gave up (its wait ran out, or its caller went away).
                self.waiting.pop();
                continue;
            }
            let Some(i) = self.take_room(now, true) else {
                break;
            };
            let Some(Reverse(w)) = self.waiting.pop() else {
                break;
            };
            self.virtual_time = self.virtual_time.max(w.start);
            if w.tx.send(i).is_err() {
                self.windows[i].used -= 1;
            } else if let Some(book) = self.clients.get_mut(&w.client) {
                book.served += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(calls: u64, secs: u64) -> Option<RateLimit> {
        Some(RateLimit {
            calls,
            window: Duration::from_secs(secs),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_budget_calls_pass_untouched() {
        let g = Governor::with(None, Duration::from_secs(10), 1, None);
        let c: Arc<str> = Arc::from("a");
        for _ in 0..1000 {
            assert_eq!(g.admit(&c, 1, None).await, Ok(None));
        }
        assert_eq!(g.budget(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_within_the_window_go_at_once_and_the_rest_wait_or_are_refused() {
        let g = Governor::with(limit(4, 10), Duration::from_secs(3), 1, None);
        let c: Arc<str> = Arc::from("a");
        let started = Instant::now();
        for _ in 0..4 {
            assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
        }
        assert_eq!(Instant::now(), started, "nobody waited: no pace");
        // The window (10 s and the margin) ends at 11 s: past the 3 s wait, refused at once.
        match g.admit(&c, 1, None).await {
            Err(Refusal::Budget(after)) => assert_eq!(after, Duration::from_secs(11)),
            other => panic!("{other:?}"),
        }
        assert_eq!(Instant::now(), started, "refused without waiting");
        tokio::time::sleep(Duration::from_secs(9)).await;
        // 2 s left: it waits for the reset, then goes.
        assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
        assert_eq!(Instant::now() - started, Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_let_through_at_the_pace_not_all_at_once() {
        // 40 calls per 10 s: 4 a second, a burst of 10.
        let g = Governor::with(limit(40, 10), Duration::from_secs(60), 1, None);
        let c: Arc<str> = Arc::from("a");
        for _ in 0..40 {
            assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
        }
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for _ in 0..40 {
            let (g, c, served) = (Arc::clone(&g), Arc::clone(&c), Arc::clone(&served));
            tokio::spawn(async move {
                if g.admit(&c, 1, None).await.is_ok() {
                    served.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let at =
            |secs: f64| tokio::time::sleep_until(Instant::now() + Duration::from_secs_f64(secs));
        at(11.01).await; // the window resets at 11 s: the burst goes
        assert_eq!(served.load(Ordering::SeqCst), 10);
        at(2.5).await; // then four a second
        assert_eq!(served.load(Ordering::SeqCst), 20);
        at(5.0).await;
        assert_eq!(served.load(Ordering::SeqCst), 40);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_calls_are_served_in_the_ratio_of_their_shares() {
        // 20 calls a window for 40 callers: more want in than fit, so shares decide.
        let g = Governor::with(limit(20, 1), Duration::from_secs(600), 1, None);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (client, share) in [(a, 3), (b, 1)] {
            for _ in 0..20 {
                let (g, client, served) = (Arc::clone(&g), Arc::clone(&client), served.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        if g.admit(&client, share, None).await.is_ok() {
                            served
                                .lock()
                                .unwrap()
                                .push((Instant::now(), client.clone()));
                        }
                    }
                }));
            }
        }
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(20)).await;
        for t in tasks {
            t.abort();
        }
        let served = served.lock().unwrap();
        assert!(
            (190..=210).contains(&served.len()),
            "20 per 2 s window: {}",
            served.len()
        );
        // After the first window (taken first come, first served, before anyone waited).
        let count = |name: &str| {
            served
                .iter()
                .filter(|(at, c)| c.as_ref() == name && *at > started + Duration::from_secs(3))
                .count()
        };
        let (na, nb) = (count("a"), count("b"));
        let ratio = na as f64 / nb as f64;
        assert!((2.7..=3.3).contains(&ratio), "{na}:{nb}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_client_goes_ahead_of_a_noisy_backlog() {
        let g = Governor::with(limit(10, 1), Duration::from_secs(600), 1, None);
        let noisy: Arc<str> = Arc::from("noisy");
        for _ in 0..50 {
            let (g, noisy) = (Arc::clone(&g), Arc::clone(&noisy));
            tokio::spawn(async move {
                loop {
                    let _ = g.admit(&noisy, 1, None).await;
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let quiet: Arc<str> = Arc::from("quiet");
        let asked = Instant::now();
        assert_eq!(g.admit(&quiet, 1, None).await, Ok(Some(0)));
        // Served at the next reset, not after the noisy client's backlog of 50.
        assert!(Instant::now() - asked <= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_platforms_headers_set_the_budget_and_its_429_spends_it() {
        let g = Governor::with(None, Duration::from_secs(30), 1, None);
        let c: Arc<str> = Arc::from("a");
        let mut h = HeaderMap::new();
        h.insert("inin-ratelimit-allowed", "5".parse().unwrap());
        h.insert("inin-ratelimit-count", "4".parse().unwrap());
        h.insert("inin-ratelimit-reset", "20".parse().unwrap());
        g.observe(0, 200, &h, || 0);
        assert_eq!(
            g.budget(),
            Some(Budget {
                allowed: 5,
                used: 4,
                window: Duration::from_secs(20),
                waiting: 0
            })
        );
        assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
        let asked = Instant::now();
        assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
        assert_eq!(Instant::now() - asked, Duration::from_secs(21));
        // A platform 429 spends the window, whatever the count said.
        let mut h = HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        g.observe(0, 429, &h, || 0);
        let asked = Instant::now();
        assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
        assert!(Instant::now() - asked >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn max_per_minute_caps_a_client_without_a_budget() {
        let g = Governor::with(None, Duration::from_secs(10), 1, None);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        for _ in 0..3 {
            assert_eq!(g.admit(&a, 1, Some(3)).await, Ok(None));
        }
        assert_eq!(
            g.admit(&a, 1, Some(3)).await,
            Err(Refusal::ClientCap(Duration::from_secs(60)))
        );
        assert_eq!(g.admit(&b, 1, Some(3)).await, Ok(None));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(g.admit(&a, 1, Some(3)).await, Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_multiplies_the_budget() {
        let g = Governor::with(limit(2, 10), Duration::from_secs(30), 3, None);
        let c: Arc<str> = Arc::from("a");
        let started = Instant::now();
        let mut used = Vec::new();
        for _ in 0..6 {
            used.push(g.admit(&c, 1, None).await.unwrap().unwrap());
        }
        used.sort();
        assert_eq!(used, [0, 0, 1, 1, 2, 2]);
        assert_eq!(Instant::now(), started, "within the pool's budget: at once");
        // All three windows spent: the next call waits for the first reset (11 s).
        assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
        assert_eq!(Instant::now() - started, Duration::from_secs(11));
    }
}
