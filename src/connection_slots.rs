//! A worker's connections to one upstream, shared fairly between clients.
//!
//! A call takes a [`Slot`] before it is sent and gives it back when its answer has been
//! read from the upstream (see [`crate::body::settle_answer`]). While slots are free a call
//! takes one at once. When none is, calls wait; and when a slot comes free it goes to the
//! waiting call whose client holds the fewest slots (the earliest of those first), not
//! simply to the call that waited longest. So one client that fills every connection — a
//! burst of slow calls, or callers that read slowly — gets no more while another client
//! waits: the other is served with the next slot that frees. (A plain FIFO semaphore gave
//! the freed slots to the busy client's own queue first.)
//!
//! Each worker has its own set, used only from its thread: the mutex is never contended,
//! it only makes the set shareable through the upstream.

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
    /// Slots held per client (anonymous callers share the empty name): a short list of
    /// the clients with calls under way, looked through by pointer first. Every call
    /// counts here twice; a hash map made that three SipHash rounds of the client's name
    /// per call.
    held: Vec<(Arc<str>, usize)>,
    waiting: Vec<Waiter>,
    /// Arrival order of waiters, for ties.
    next_seq: u64,
}

#[derive(Debug)]
struct Waiter {
    client: Arc<str>,
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

    /// A slot for `client` if one is free now.
    pub fn try_acquire(self: &Arc<Self>, client: &Arc<str>) -> Option<Slot> {
        let mut state = self.state();
        self.take_free(&mut state, client)
    }

    fn take_free(self: &Arc<Self>, state: &mut State, client: &Arc<str>) -> Option<Slot> {
        if state.in_use >= self.capacity {
            return None;
        }
        state.in_use += 1;
        state.count_one(client);
        Some(Slot {
            slots: Some(Arc::clone(self)),
            client: Arc::clone(client),
        })
    }

    /// A slot for `client`: at once if one is free, else when one is handed over.
    /// Dropping the future gives up the place in line.
    pub async fn acquire(self: &Arc<Self>, client: &Arc<str>) -> Slot {
        let receiver = {
            let mut state = self.state();
            if let Some(slot) = self.take_free(&mut state, client) {
                return slot;
            }
            let (hand_over, receiver) = oneshot::channel();
            let seq = state.next_seq;
            state.next_seq += 1;
            state.waiting.push(Waiter {
                client: Arc::clone(client),
                seq,
                hand_over,
            });
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

    /// `client` gave a slot back: hand it to the fairest waiter, or free it.
    fn release(self: &Arc<Self>, client: &Arc<str>) {
        let mut state = self.state();
        state.forget_one(client);
        // Waiters that gave up are dropped from the line.
        state.waiting.retain(|w| !w.hand_over.is_closed());
        while !state.waiting.is_empty() {
            let fairest = (0..state.waiting.len())
                .min_by_key(|&i| {
                    let w = &state.waiting[i];
                    (state.held_by(&w.client), w.seq)
                })
                .unwrap_or(0);
            let waiter = state.waiting.swap_remove(fairest);
            state.count_one(&waiter.client);
            let slot = Slot {
                slots: Some(Arc::clone(self)),
                client: Arc::clone(&waiter.client),
            };
            match waiter.hand_over.send(slot) {
                Ok(()) => return,
                // It gave up in the meantime: disarm the slot (we hold the lock) and try
                // the next waiter.
                Err(mut slot) => {
                    slot.slots = None;
                    state.forget_one(&waiter.client);
                }
            }
        }
        state.in_use -= 1;
    }
}

impl State {
    fn position(&self, client: &Arc<str>) -> Option<usize> {
        self.held
            .iter()
            .position(|(c, _)| Arc::ptr_eq(c, client) || **c == **client)
    }

    fn held_by(&self, client: &Arc<str>) -> usize {
        self.position(client).map_or(0, |i| self.held[i].1)
    }

    fn count_one(&mut self, client: &Arc<str>) {
        match self.position(client) {
            Some(i) => self.held[i].1 += 1,
            None => self.held.push((Arc::clone(client), 1)),
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

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_client_holding_fewest() {
        let slots = ConnectionSlots::new(2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let a1 = slots.acquire(&a).await;
        let a2 = slots.acquire(&a).await;
        // a queues first, b after: b is served first all the same.
        let mut a3 = Box::pin(slots.acquire(&a));
        assert!((&mut a3).now_or_never().is_none());
        let mut b1 = Box::pin(slots.acquire(&b));
        assert!((&mut b1).now_or_never().is_none());
        drop(a1);
        let b1 = (&mut b1).now_or_never().expect("b got the freed slot");
        assert!((&mut a3).now_or_never().is_none());
        drop(a2);
        let a3 = a3.now_or_never().expect("then a");
        assert_eq!(slots.in_use(), 2);
        drop((a3, b1));
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_slot_behind() {
        let slots = ConnectionSlots::new(1);
        let a: Arc<str> = "a".into();
        let held = slots.acquire(&a).await;
        let mut gave_up = Box::pin(slots.acquire(&a));
        assert!((&mut gave_up).now_or_never().is_none());
        drop(gave_up);
        drop(held);
        assert_eq!(slots.in_use(), 0);
        let again = slots.acquire(&a).now_or_never().expect("free");
        assert_eq!(slots.in_use(), 1);
        drop(again);
    }
}
