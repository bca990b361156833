//! A worker's connections to one upstream, shared fairly between clients.
//!
//! A call takes a [`Slot`] before it is sent and gives it back when its answer has been
//! read from the upstream (see [`crate::http::body::settle_answer`]). Each client may hold at
//! most its share of the slots:
//!
//! - a client calling alone may hold all but a reserve (an eighth of them, at least one
//!   when there are two or more), so a client arriving while another holds every
//!   connection it may is served at once, not after that client's slow calls end;
//! - clients calling together (holding slots, or waiting for one) split what is left of
//!   the reserve by their `share` weights (the governor's), each at least one.
//!
//! A call past its client's share waits even when a slot is free. When a slot comes free
//! it goes to the waiting call whose client holds the fewest for its weight (the earliest
//! of those first), not simply to the call that waited longest. So one client that fills
//! its connections — slow uploads, answers read slowly, a stalled API path — gets no more
//! while another client waits, and never the reserve. (A plain FIFO semaphore gave the
//! freed slots to the busy client's own queue first, and a client alone could take every
//! connection for as long as its calls lasted.)
//!
//! Each worker has its own set, used only from its thread: the mutex is never contended,
//! it only makes the set shareable through the upstream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The connection slots of one worker for one upstream.
#[derive(Debug)]
pub struct ConnectionSlots {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_use: usize,
    /// Slots held per client (anonymous callers share the empty name), with the client's
    /// weight: a short list of the clients with calls under way, looked through by pointer
    /// first. Every call counts here twice; a hash map made that three SipHash rounds of
    /// the client's name per call.
    held: Vec<(Arc<str>, usize, u32)>,
    /// The calls waiting, in one first-come line per client: a freed slot is handed over
    /// by looking at each client's first call, never by walking every waiting call (a
    /// thousand callers queued on one worker made that quadratic).
    lines: Vec<Line>,
    /// Arrival order of waiters, for ties.
    next_seq: u64,
}

/// One client's waiting calls, in arrival order.
#[derive(Debug)]
struct Line {
    client: Arc<str>,
    weight: u32,
    waiters: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    hand_over: oneshot::Sender<Slot>,
}

/// One connection slot, held by a client's call; given back (or handed to the next
/// waiter) when dropped.
#[derive(Debug)]
pub struct Slot {
    /// `None` once disarmed (a hand-over that found its waiter gone).
    slots: Option<Arc<ConnectionSlots>>,
    client: Arc<str>,
}

/// Who asks for a slot: the client's name and its `share` weight.
#[derive(Debug, Clone, Copy)]
pub struct Claimant<'a> {
    pub client: &'a Arc<str>,
    pub weight: u32,
}

impl ConnectionSlots {
    pub fn new(capacity: usize) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots {
            capacity: capacity.max(1),
            state: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `who` if one is free now and within its share.
    pub fn try_acquire(self: &Arc<Self>, who: Claimant<'_>) -> Option<Slot> {
        let mut state = self.state();
        self.take_free(&mut state, who)
    }

    fn take_free(self: &Arc<Self>, state: &mut State, who: Claimant<'_>) -> Option<Slot> {
        if state.in_use >= self.capacity || state.held_by(who.client) >= self.share_of(state, who) {
            return None;
        }
        state.in_use += 1;
        state.count_one(who.client, who.weight);
        Some(Slot {
            slots: Some(Arc::clone(self)),
            client: Arc::clone(who.client),
        })
    }

    /// The most slots `who` may hold now (see the module's notes).
    fn share_of(&self, state: &State, who: Claimant<'_>) -> usize {
        let weight = who.weight.max(1);
        let active = state.position(who.client).is_some() || state.line_of(who.client).is_some();
        let total = state.active_weight() + if active { 0 } else { u64::from(weight) };
        self.share_for(weight, total)
    }

    /// The most slots a client of `weight` may hold when the active clients weigh `total`
    /// in all (its own weight included).
    fn share_for(&self, weight: u32, total: u64) -> usize {
        let reserve = if self.capacity >= 2 {
            (self.capacity / 8).max(1)
        } else {
            0
        };
        let usable = (self.capacity - reserve) as u64;
        ((usable * u64::from(weight) / total.max(1)) as usize).max(1)
    }

    /// A slot for `who`: at once if one is free and within its share, else when one is
    /// handed over. Dropping the future gives up the place in line.
    pub async fn acquire(self: &Arc<Self>, who: Claimant<'_>) -> Slot {
        let receiver = {
            let mut state = self.state();
            if let Some(slot) = self.take_free(&mut state, who) {
                return slot;
            }
            let (hand_over, receiver) = oneshot::channel();
            let seq = state.next_seq;
            state.next_seq += 1;
            let waiter = Waiter { seq, hand_over };
            match state.line_of(who.client) {
                Some(i) => state.lines[i].waiters.push_back(waiter),
                None => state.lines.push(Line {
                    client: Arc::clone(who.client),
                    weight: who.weight.max(1),
                    waiters: VecDeque::from([waiter]),
                }),
            }
            receiver
        };
        match receiver.await {
            Ok(slot) => slot,
            // The sender is dropped only with the set itself, which we hold: unreachable,
            // but waiting for ever is the honest answer to a set that is gone.
            Err(_) => std::future::pending().await,
        }
    }

    /// Slots in use now (for tests and the status page).
    pub fn in_use(&self) -> usize {
        self.state().in_use
    }

    /// `client` gave a slot back: hand it to the fairest waiter within its share, or
    /// free it.
    fn release(self: &Arc<Self>, client: &Arc<str>) {
        let mut state = self.state();
        state.forget_one(client);
        loop {
            // Calls that gave up leave the front of their lines; empty lines go.
            for line in &mut state.lines {
                while line
                    .waiters
                    .front()
                    .is_some_and(|w| w.hand_over.is_closed())
                {
                    line.waiters.pop_front();
                }
            }
            state.lines.retain(|l| !l.waiters.is_empty());
            // Every waiting client is among the active ones: the total is the same for
            // all. Fewest held for the weight first (compared without division), then
            // the earliest first call.
            let total = state.active_weight();
            let fairest = (0..state.lines.len())
                .filter(|&i| {
                    let l = &state.lines[i];
                    state.held_by(&l.client) < self.share_for(l.weight, total)
                })
                .min_by(|&a, &b| {
                    let (la, lb) = (&state.lines[a], &state.lines[b]);
                    let ha = state.held_by(&la.client) as u64 * u64::from(lb.weight);
                    let hb = state.held_by(&lb.client) as u64 * u64::from(la.weight);
                    let first = |l: &Line| l.waiters.front().map_or(u64::MAX, |w| w.seq);
                    ha.cmp(&hb).then(first(la).cmp(&first(lb)))
                });
            let Some(fairest) = fairest else {
                break;
            };
            let line = &mut state.lines[fairest];
            let Some(waiter) = line.waiters.pop_front() else {
                break;
            };
            let (client, weight) = (Arc::clone(&line.client), line.weight);
            state.count_one(&client, weight);
            let slot = Slot {
                slots: Some(Arc::clone(self)),
                client: Arc::clone(&client),
            };
            match waiter.hand_over.send(slot) {
                Ok(()) => return,
                // It gave up in the meantime: disarm the slot (we hold the lock) and try
                // the next waiter.
                Err(mut slot) => {
                    slot.slots = None;
                    state.forget_one(&client);
                }
            }
        }
        state.in_use -= 1;
    }
}

fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

impl State {
    fn position(&self, client: &Arc<str>) -> Option<usize> {
        self.held.iter().position(|(c, _, _)| same(c, client))
    }

    fn held_by(&self, client: &Arc<str>) -> usize {
        self.position(client).map_or(0, |i| self.held[i].1)
    }

    fn line_of(&self, client: &Arc<str>) -> Option<usize> {
        self.lines.iter().position(|l| same(&l.client, client))
    }

    /// The weights of the clients holding or waiting for slots, each once.
    fn active_weight(&self) -> u64 {
        let holding: u64 = self.held.iter().map(|(_, _, w)| u64::from(*w)).sum();
        let only_waiting: u64 = self
            .lines
            .iter()
            .filter(|l| self.position(&l.client).is_none())
            .map(|l| u64::from(l.weight))
            .sum();
        holding + only_waiting
    }

    fn count_one(&mut self, client: &Arc<str>, weight: u32) {
        match self.position(client) {
            Some(i) => self.held[i].1 += 1,
            None => self.held.push((Arc::clone(client), 1, weight.max(1))),
        }
    }

    fn forget_one(&mut self, client: &Arc<str>) {
        if let Some(i) = self.position(client) {
            self.held[i].1 -= 1;
            if self.held[i].1 == 0 {
                self.held.swap_remove(i);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release(&self.client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn who(client: &Arc<str>) -> Claimant<'_> {
        Claimant { client, weight: 1 }
    }

    #[tokio::test]
    async fn a_client_alone_leaves_a_reserve_and_a_freed_slot_goes_to_the_client_holding_fewest() {
        let slots = ConnectionSlots::new(8);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut held_by_a: Vec<Slot> = (0..7)
            .map(|_| slots.try_acquire(who(&a)).unwrap())
            .collect();
        // The eighth is the reserve: not for the client holding the other seven.
        assert!(slots.try_acquire(who(&a)).is_none());
        let mut a_waits = Box::pin(slots.acquire(who(&a)));
        assert!((&mut a_waits).now_or_never().is_none());
        // Another client takes it at once.
        let b1 = slots.try_acquire(who(&b)).expect("the reserve");
        let mut b2 = Box::pin(slots.acquire(who(&b)));
        assert!((&mut b2).now_or_never().is_none());
        // a queued first; b, holding fewer, gets the slot a frees.
        drop(held_by_a.pop());
        let b2 = (&mut b2).now_or_never().expect("b got the freed slot");
        // a holds 6, past its half of the seven: it waits while it holds more than 3.
        for _ in 0..2 {
            drop(held_by_a.pop());
            assert!((&mut a_waits).now_or_never().is_none());
        }
        drop(held_by_a.pop());
        drop(held_by_a.pop());
        assert!(
            (&mut a_waits).now_or_never().is_some(),
            "a holds 2 of its 3 now"
        );
        drop((b1, b2, held_by_a));
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test]
    async fn shares_split_the_slots_by_weight() {
        let slots = ConnectionSlots::new(9);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let heavy = Claimant {
            client: &a,
            weight: 3,
        };
        let b1 = slots.try_acquire(who(&b)).unwrap();
        // With b calling, a (weight 3) may hold 3/4 of the 8 usable: 6.
        let held: Vec<Slot> = std::iter::from_fn(|| slots.try_acquire(heavy)).collect();
        assert_eq!(held.len(), 6);
        // b may hold 2.
        let b2 = slots.try_acquire(who(&b)).unwrap();
        assert!(slots.try_acquire(who(&b)).is_none());
        drop((b1, b2, held));
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_slot_behind() {
        let slots = ConnectionSlots::new(1);
        let a: Arc<str> = "a".into();
        let held = slots.acquire(who(&a)).await;
        let mut gave_up = Box::pin(slots.acquire(who(&a)));
        assert!((&mut gave_up).now_or_never().is_none());
        drop(gave_up);
        drop(held);
        assert_eq!(slots.in_use(), 0);
        let again = slots.acquire(who(&a)).now_or_never().expect("free");
        assert_eq!(slots.in_use(), 1);
        drop(again);
    }
}
