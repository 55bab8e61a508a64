//! Pod creations in flight, shared fairly between applications: one application's 2,000-pod
//! ramp must not delay another application's first executor. A fixed number of slots (at most
//! `--kube-create-concurrency` creations at once); when one frees, it goes to the next
//! application in round-robin order that has a creation waiting, and within an application to
//! its oldest waiting creation. A FIFO semaphore would instead serve the 2,000 creations queued
//! first before anyone else's.
//!
//! [`RoundRobin`] is the pure order (unit and property tests); [`FairSlots`] the async shell.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

/// Waiters per key, served one key at a time in turn.
#[derive(Debug)]
pub struct RoundRobin<K, W> {
    queues: BTreeMap<K, VecDeque<W>>,
    /// Keys with waiters, in serving order: the front is served next, then goes to the back.
    turn: VecDeque<K>,
}

impl<K: Ord + Clone, W> Default for RoundRobin<K, W> {
    fn default() -> Self {
        Self {
            queues: BTreeMap::new(),
            turn: VecDeque::new(),
        }
    }
}

impl<K: Ord + Clone, W> RoundRobin<K, W> {
    /// Queues `waiter` behind `key`'s other waiters; a key without waiters joins the back of
    /// the turn.
    pub fn push(&mut self, key: K, waiter: W) {
        let queue = self.queues.entry(key.clone()).or_default();
        if queue.is_empty() {
            self.turn.push_back(key);
        }
        queue.push_back(waiter);
    }

    /// The next waiter: the oldest of the key whose turn it is; that key goes to the back.
    pub fn pop(&mut self) -> Option<(K, W)> {
        let key = self.turn.pop_front()?;
        let queue = self.queues.get_mut(&key)?;
        let waiter = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&key);
        } else {
            self.turn.push_back(key.clone());
        }
        Some((key, waiter))
    }

    /// Whether anyone waits.
    pub fn is_empty(&self) -> bool {
        self.turn.is_empty()
    }

    /// Waiters in all.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }
}

struct State {
    free: usize,
    waiting: RoundRobin<String, oneshot::Sender<()>>,
}

/// `slots` creations at once, handed out per application in turn.
pub struct FairSlots {
    state: Arc<Mutex<State>>,
}

/// A slot, given back when dropped.
pub struct Slot {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is counts and queues updated in single steps; a panic elsewhere cannot leave it
    // half-changed.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hands a freed slot to the next live waiter, or back to the pool.
fn release(state: &Mutex<State>) {
    let mut state = lock(state);
    while let Some((_, waiter)) = state.waiting.pop() {
        if waiter.send(()).is_ok() {
            return;
        }
        // That waiter gave up (its creation was cancelled): the next one.
    }
    state.free += 1;
}

impl FairSlots {
    /// `slots` at once (at least one).
    pub fn new(slots: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                free: slots.max(1),
                waiting: RoundRobin::default(),
            })),
        }
    }

    /// A slot for a creation of application `app`.
    pub async fn acquire(&self, app: &str) -> Slot {
        let receiver = {
            let mut state = lock(&self.state);
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                return self.slot();
            }
            let (sender, receiver) = oneshot::channel();
            state.waiting.push(app.to_owned(), sender);
            receiver
        };
        let mut waiting = Waiting {
            receiver: Some(receiver),
            state: Arc::clone(&self.state),
        };
        if let Some(receiver) = waiting.receiver.as_mut() {
            // The sender is only dropped after a successful send or by `release` skipping it;
            // an error cannot happen while this receiver lives, and would mean no slot.
            let _ = receiver.await;
        }
        waiting.receiver = None;
        self.slot()
    }

    fn slot(&self) -> Slot {
        Slot {
            state: Arc::clone(&self.state),
        }
    }

    /// Creations waiting for a slot.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        lock(&self.state).waiting.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        release(&self.state);
    }
}

/// A creation waiting for its slot; if it is cancelled after its slot was handed to it, the slot
/// goes on to the next waiter.
struct Waiting {
    receiver: Option<oneshot::Receiver<()>>,
    state: Arc<Mutex<State>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut receiver) = self.receiver.take() {
            receiver.close();
            if receiver.try_recv().is_ok() {
                release(&self.state);
            }
        }
    }
}

#[cfg(test)]
mod tests;
