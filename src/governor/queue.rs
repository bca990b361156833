//! The fair queue: calls waiting for room in the budget, each client's place in it
//! (start-time fair queueing by `share`), and the state the governor keeps under its lock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::unanswered::Unanswered;
use super::window::TokenWindow;
use super::window::{slice_of, MARGIN};
use crate::token::shared::{Lease, Leased};

/// How long the most replicas a lease saw is believed (see [`State::leased`]).
const REPLICAS_KEPT: Duration = Duration::from_secs(300);

/// A call waiting for room.
pub(super) struct Waiter {
    pub(super) tag: u64,
    pub(super) start: u64,
    pub(super) seq: u64,
    pub(super) client: Arc<str>,
    pub(super) tx: oneshot::Sender<(usize, Unanswered)>,
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
pub(super) struct ClientBook {
    /// The tag of its last call.
    pub(super) finish: u64,
    /// The minute of `max_per_minute`: when it started, and the calls in it.
    pub(super) minute: Option<(Instant, u64)>,
    /// Calls let through, and calls waiting now (for the status page).
    pub(super) served: u64,
    /// Its weight, and when it last asked for a call: clients that asked within a window
    /// share the budget (see [`super::shares`]).
    pub(super) share: u32,
    pub(super) last_asked: Option<Instant>,
    /// Calls let through in each pooled token's window: (the window's generation, calls).
    pub(super) spent: Vec<(u64, u64)>,
}

pub(super) struct State {
    pub(super) windows: Vec<TokenWindow>,
    pub(super) waiting: BinaryHeap<Reverse<Waiter>>,
    /// The start tag of the last call let through.
    pub(super) virtual_time: u64,
    pub(super) clients: HashMap<Arc<str>, ClientBook>,
    pub(super) seq: u64,
    /// A task is asleep until the next window ends, to let waiting calls through.
    pub(super) dispatcher: bool,
    /// When that task means to look next.
    pub(super) wake_at: Option<Instant>,
    pub(super) next_token: usize,
    /// The budget is shared with the fleet through Redis (`[cache]`).
    pub(super) fleet: bool,
    /// Redis failed a lease: until then, each window gets this replica's part only.
    pub(super) fleet_down_until: Option<Instant>,
    /// The last client to ask for a call; until `several_until` (a window after another
    /// client asked) more than one client counts as calling, and calls are paced.
    pub(super) last_client: Option<Arc<str>>,
    pub(super) several_until: Option<Instant>,
    /// The calls let through and not answered yet, per pooled token (see [`Unanswered`]).
    pub(super) unanswered: Arc<[AtomicU64]>,
}

impl State {
    /// A queue with nobody waiting, over these windows.
    pub(super) fn new(windows: Vec<TokenWindow>) -> State {
        let tokens = windows.len();
        State {
            windows,
            waiting: BinaryHeap::new(),
            virtual_time: 0,
            clients: HashMap::new(),
            seq: 0,
            dispatcher: false,
            wake_at: None,
            next_token: 0,
            fleet: false,
            fleet_down_until: None,
            last_client: None,
            several_until: None,
            unanswered: (0..tokens).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

pub(super) fn book_finish(st: &State, client: &Arc<str>) -> u64 {
    st.clients.get(client).map_or(0, |b| b.finish)
}

impl State {
    /// How the budget is shared now (see [`TokenWindow::has_room`]).
    pub(super) fn fleet_mode(&self, now: Instant) -> Option<bool> {
        self.fleet
            .then(|| self.fleet_down_until.is_none_or(|until| now >= until))
    }

    /// A window that needs a lease from the fleet: its index and what to ask for (see
    /// [`Lease`]). A slice is about what this replica uses: twice its calls of the last
    /// window and the calls waiting now, at most [`slice_of`] the budget (all of that
    /// when it has no last window, or was short in it).
    pub(super) fn lease_wanted(&mut self, now: Instant) -> Option<(usize, Lease)> {
        if self.fleet_mode(now) != Some(true) {
            return None;
        }
        let waiting = self.waiting.len() as u64;
        self.windows.iter_mut().enumerate().find_map(|(i, w)| {
            w.roll(now);
            let allowed = w.allowed.filter(|_| !w.assumed)?;
            (w.leased == 0 && w.window_has_room() && !w.in_tail(now)).then(|| {
                let most = slice_of(allowed);
                let slice = match w.last {
                    Some((own, false)) => (2 * (own + waiting)).clamp(1, most),
                    _ => most,
                };
                let lease = w.lease(slice, now);
                (i, lease)
            })
        })
    }

    /// What a lease for window `index` got (`None`: Redis could not be used; this replica
    /// falls back to its part of the budget for a while): the calls granted.
    pub(super) fn leased(
        &mut self,
        index: usize,
        lease: Lease,
        got: Option<Leased>,
        now: Instant,
    ) -> u64 {
        let Some(w) = self.windows.get_mut(index) else {
            return 0;
        };
        let Some(got) = got else {
            self.fleet_down_until = Some(now + Duration::from_secs(5));
            w.fallback_from.get_or_insert((w.used, w.own));
            return 0;
        };
        w.fallback_from = None;
        w.joined = true;
        // The most replicas seen lately: a window's count grows as they lease, and one
        // with fewer callers sees fewer; a lower count is believed after five minutes.
        let stale = w
            .replicas_seen
            .is_none_or(|t| now.saturating_duration_since(t) > REPLICAS_KEPT);
        if got.replicas >= w.replicas || stale {
            (w.replicas, w.replicas_seen) = (got.replicas.max(1), Some(now));
        }
        w.fleet_total = w.fleet_total.max(got.counted);
        w.unreserved = w.unreserved.saturating_sub(lease.unreserved);
        let allowed = w.allowed.unwrap_or(u64::MAX);
        let before = got.counted.saturating_sub(lease.slice);
        let granted = lease.slice.min(allowed.saturating_sub(before));
        w.leased += granted;
        // A report of calls (no slice asked) finds the window spent only at the budget.
        let spent = granted == 0 && (lease.slice > 0 || got.counted >= allowed);
        if lease.first {
            w.spent_joins = if spent { w.spent_joins + 1 } else { 0 };
        }
        if spent {
            w.starved = true;
            // The fleet has reserved the whole window: none until it ends — when the
            // fleet's counter says, if this replica had not seen the window start.
            w.used = w.used.max(allowed);
            if let Some(left) = got.left {
                // With the margin every replica's own view of a window has.
                w.ends = Some(now + left + MARGIN);
            } else if w.ends.is_none() {
                // It began moments ago: replicas start their windows together.
                w.ends = Some(now + w.len.unwrap_or(Duration::from_secs(60)) + MARGIN);
            }
        }
        granted
    }

    /// Take one call's room in the next token that has some (round-robin).
    /// `paced`: a waiting call, held to the pace (see [`TokenWindow::bucket`]).
    pub(super) fn take_room(
        &mut self,
        now: Instant,
        paced: bool,
        client: &Arc<str>,
    ) -> Option<usize> {
        let n = self.windows.len();
        let fleet = self.fleet_mode(now);
        let sharing = self.sharing(client, now);
        for k in 0..n {
            let i = (self.next_token + k) % n;
            if self.past_share(client, i, sharing) {
                continue;
            }
            let w = &mut self.windows[i];
            // While clients share the budget, each one's cap keeps a burst from taking the
            // others' part; the pace still holds an assumed budget until the first answer.
            let paced = paced && (sharing.is_none() || w.assumed);
            if w.has_room(fleet.filter(|_| !w.assumed), paced) {
                w.count_call(now, fleet);
                self.next_token = (i + 1) % n;
                self.spend(client, i);
                return Some(i);
            }
        }
        None
    }

    pub(super) fn room_at(&self, now: Instant) -> Instant {
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

    /// Let waiting calls through, smallest tag first, while there is room. A call whose
    /// client has spent its share of every window steps aside for the others' (it goes
    /// back in line, and waits for a window to end).
    pub(super) fn dispatch(&mut self, now: Instant) {
        for w in &mut self.windows {
            w.roll(now);
        }
        let mut aside = Vec::new();
        while let Some(Reverse(top)) = self.waiting.peek() {
            if top.tx.is_closed() {
                // It gave up (its wait ran out, or its caller went away).
                self.waiting.pop();
                continue;
            }
            let client = Arc::clone(&top.client);
            let Some(i) = self.take_room(now, true, &client) else {
                if self.share_spent(&client, now) {
                    if let Some(held) = self.waiting.pop() {
                        aside.push(held);
                    }
                    continue;
                }
                break;
            };
            let Some(Reverse(w)) = self.waiting.pop() else {
                break;
            };
            self.virtual_time = self.virtual_time.max(w.start);
            let unanswered = Unanswered::counted(&self.unanswered, i);
            if w.tx.send((i, unanswered)).is_err() {
                self.windows[i].used -= 1;
                self.unspend(&w.client, i);
            } else if let Some(book) = self.clients.get_mut(&w.client) {
                book.served += 1;
            }
        }
        self.waiting.extend(aside);
    }
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The budget has no room within the longest wait; room comes after this long.
    Budget(Duration),
    /// The client made `max_per_minute` calls this minute; the minute ends after this long.
    ClientCap(Duration),
}
