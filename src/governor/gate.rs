//! The [`Governor`]: one upstream's (or route's) budget, the calls it lets through, and
//! the queue of those that wait (see [`super`] for the why). Learning the budget
//! from answers is in `answers`, sharing it with a fleet in `fleet`.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::queue::{book_finish, Refusal, State, Waiter};
use super::shares::ShareNow;
use super::unanswered::{Admission, Unanswered};
use super::window::{documented_budget, Budget, TokenWindow};
use crate::config::{RateLimit, UpstreamConfig};
use crate::token::shared::SharedCache;

/// Where a fleet shares a token's budget: the shared cache (while one is configured) and
/// the credentials whose tokens the budget belongs to.
pub struct FleetBudget {
    pub shared: Arc<arc_swap::ArcSwapOption<SharedCache>>,
    /// [`GrantConfig::cache_key`](crate::config::GrantConfig::cache_key).
    pub cache_key: String,
}

/// A tag step for share 1: tags are integers, `STEP / share` apart for one client.
const STEP: u64 = 1_000_000;

/// One upstream's rate governor (see the module's documentation).
pub struct Governor {
    max_wait: Duration,
    /// A budget is known (configured, or learned from an answer), or assumed.
    pub(super) active: AtomicBool,
    /// Some token's budget is still the provider's documented one, assumed.
    pub(super) assuming: AtomicBool,
    pub(super) state: Mutex<State>,
    /// Itself, for the dispatcher task it spawns (which must not keep it alive).
    pub(super) me: Weak<Governor>,
    /// Wakes the dispatcher before its time (see [`Governor::arm`]).
    nudge: Arc<tokio::sync::Notify>,
    pub(super) fleet: Option<FleetBudget>,
}

impl std::fmt::Debug for Governor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
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
    pub(super) fn drop_assumption(&self) {
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
        let window = TokenWindow::new(limit);
        Arc::new_cyclic(|me| Governor {
            max_wait,
            active: AtomicBool::new(limit.is_some()),
            assuming: AtomicBool::new(false),
            state: Mutex::new(State::new(vec![window; tokens.max(1)])),
            me: me.clone(),
            nudge: Arc::new(tokio::sync::Notify::new()),
            fleet,
        })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
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
        self.admit_call(client, share, cap).await.map(|a| a.index)
    }

    /// [`Governor::admit`], with the call counted as on its way until the [`Admission`]'s
    /// guard is dropped: the caller keeps it until the answer was observed.
    pub async fn admit_call(
        &self,
        client: &Arc<str>,
        share: u32,
        cap: Option<u64>,
    ) -> Result<Admission, Refusal> {
        let passed = |st: &State, index| Admission {
            index,
            unanswered: index.map(|i| Unanswered::counted(&st.unanswered, i)),
        };
        if !self.is_active() && cap.is_none() {
            return Ok(Admission {
                index: None,
                unanswered: None,
            });
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
            book.share = share.max(1);
            book.last_asked = Some(now);
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
                return Ok(passed(&st, None));
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
                if let Some(i) = st.take_room(now, several, client) {
                    st.virtual_time = start;
                    let book = st.clients.entry(Arc::clone(client)).or_default();
                    book.finish = tag;
                    book.served += 1;
                    return Ok(passed(&st, Some(i)));
                }
            }
            let room_at = st.room_at_for(client, now);
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
            Ok(Ok((index, unanswered))) => Ok(Admission {
                index: Some(index),
                unanswered: Some(unanswered),
            }),
            _ => {
                let now = Instant::now();
                let room_at = self.lock().room_at_for(client, now);
                Err(Refusal::Budget(
                    room_at
                        .saturating_duration_since(now)
                        .max(Duration::from_secs(1)),
                ))
            }
        }
    }

    /// Start the task that lets waiting calls through when room comes, if none is asleep;
    /// wake the one asleep if this call has room before it meant to look again (a call
    /// within its share, behind calls that spent theirs and wait for the window's end).
    fn arm(&self, st: &mut State, first_wake: Instant) {
        if st.dispatcher {
            if st.wake_at.is_some_and(|at| first_wake < at) {
                st.wake_at = Some(first_wake);
                self.nudge.notify_one();
            }
            return;
        }
        st.dispatcher = true;
        st.wake_at = Some(first_wake);
        let me = self.me.clone();
        let nudge = Arc::clone(&self.nudge);
        tokio::spawn(async move {
            let mut wake = first_wake;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => {}
                    () = nudge.notified() => {
                        let Some(governor) = me.upgrade() else { return };
                        let at = governor.lock().wake_at;
                        if let Some(at) = at.filter(|at| *at > Instant::now()) {
                            wake = at;
                            continue;
                        }
                    }
                }
                let Some(governor) = me.upgrade() else { return };
                // Reserve more of the fleet's budget first, if a window ran out of it
                // (outside the lock: a round trip to Redis).
                let wanted = governor.lock().lease_wanted(Instant::now());
                if let Some((index, lease)) = wanted {
                    governor.lease(index, lease).await;
                }
                let mut st = governor.lock();
                let now = Instant::now();
                st.dispatch(now);
                if st.waiting.is_empty() {
                    st.dispatcher = false;
                    st.wake_at = None;
                    return;
                }
                // Room comes again at the next window's end (or at once, if a window
                // started by these calls has room left: it has none, or they'd be gone).
                wake = st.next_wake(now).max(now + Duration::from_millis(1));
                st.wake_at = Some(wake);
            }
        });
    }

    /// Take room for a call of the proxy's own with pooled token `index` (the idle
    /// timeout's question), now or never: it counts in the window like any call, but is
    /// no client's (it takes no client's share, and makes no client share), and on its way
    /// until the guard is dropped. `None`: no room now.
    pub fn take_own(&self, index: usize) -> Option<Unanswered> {
        let now = Instant::now();
        let mut st = self.lock();
        if !self.is_active() {
            return Some(Unanswered::counted(&st.unanswered, index));
        }
        if !st.waiting.is_empty() {
            return None;
        }
        let fleet = st.fleet_mode(now);
        let w = st.windows.get_mut(index)?;
        w.roll(now);
        if w.assumed || !w.has_room(fleet, false) {
            return None;
        }
        w.count_call(now, fleet);
        Some(Unanswered::counted(&st.unanswered, index))
    }

    /// The share of `client` as it stands now (see [`ShareNow`]), for its answers'
    /// `RateLimit-*` headers; `None` while no budget is known.
    pub fn share_of(&self, client: &Arc<str>) -> Option<ShareNow> {
        if !self.is_active() {
            return None;
        }
        self.lock().share_now(client, Instant::now())
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
