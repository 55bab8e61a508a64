use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;

use super::{FairSlots, RoundRobin};

#[test]
fn a_key_that_arrives_late_is_served_next_not_after_the_backlog() {
    let mut rr = RoundRobin::default();
    for i in 0..100 {
        rr.push("big", i);
    }
    rr.push("small", 1000);
    let order: Vec<_> = std::iter::from_fn(|| rr.pop()).take(3).collect();
    assert_eq!(order, [("big", 0), ("small", 1000), ("big", 1)]);
    assert_eq!(rr.len(), 98);
}

#[derive(Debug, Clone)]
enum Op {
    Push(u8),
    Pop,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![(0u8..4).prop_map(Op::Push), Just(Op::Pop)],
        0..200,
    )
}

proptest! {
    /// Within a key, waiters are served oldest first; nobody is lost; and a key that has waiters
    /// at two consecutive services of another key is served between them (no key is served
    /// twice while another waits through both).
    #[test]
    fn fifo_within_a_key_and_no_key_served_twice_while_another_waits(ops in ops()) {
        let mut rr = RoundRobin::default();
        let mut model: BTreeMap<u8, VecDeque<usize>> = BTreeMap::new();
        // For each key: how many services happened since it last got one while it waited.
        let mut passed_over: BTreeMap<u8, usize> = BTreeMap::new();
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Push(key) => {
                    rr.push(key, n);
                    model.entry(key).or_default().push_back(n);
                }
                Op::Pop => {
                    let waiting: Vec<u8> = model.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
                    match rr.pop() {
                        None => prop_assert!(waiting.is_empty()),
                        Some((key, waiter)) => {
                            let expected = model.get_mut(&key).and_then(VecDeque::pop_front);
                            prop_assert_eq!(Some(waiter), expected, "oldest of its key first");
                            passed_over.insert(key, 0);
                            for other in waiting.into_iter().filter(|k| *k != key) {
                                let count = passed_over.entry(other).or_insert(0);
                                *count += 1;
                                // With k keys waiting, a key waits at most k - 1 turns.
                                prop_assert!(*count <= 3, "key {} passed over {} times", other, count);
                            }
                        }
                    }
                }
            }
            prop_assert_eq!(rr.len(), model.values().map(VecDeque::len).sum::<usize>());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_second_application_gets_the_next_free_slot_ahead_of_the_first_ones_backlog() {
    let slots = Arc::new(FairSlots::new(1));
    let held = slots.acquire("big").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (slots, tx) = (Arc::clone(&slots), tx.clone());
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire("big").await;
            let _ = tx.send(format!("big-{i}"));
        }));
        tokio::task::yield_now().await;
    }
    let (s, t) = (Arc::clone(&slots), tx.clone());
    tasks.push(tokio::spawn(async move {
        let _slot = s.acquire("small").await;
        let _ = t.send("small".to_string());
    }));
    tokio::task::yield_now().await;
    assert_eq!(slots.waiting(), 51);
    drop(held);
    let first = rx.recv().await.expect("served");
    let second = rx.recv().await.expect("served");
    assert_eq!([first.as_str(), second.as_str()], ["big-0", "small"]);
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(slots.waiting(), 0);
}

async fn cancelled_waiter(handed_before_cancel: bool) {
    let slots = Arc::new(FairSlots::new(1));
    let held = slots.acquire("a").await;
    let s = Arc::clone(&slots);
    let cancelled = tokio::spawn(async move {
        let _slot = s.acquire("a").await;
        std::future::pending::<()>().await;
    });
    tokio::task::yield_now().await;
    let s = Arc::clone(&slots);
    let next = tokio::spawn(async move { drop(s.acquire("b").await) });
    tokio::task::yield_now().await;
    if handed_before_cancel {
        // The slot is sent to the waiter, which is cancelled before it runs again.
        drop(held);
        cancelled.abort();
        let _ = cancelled.await;
    } else {
        cancelled.abort();
        let _ = cancelled.await;
        drop(held);
    }
    tokio::time::timeout(std::time::Duration::from_secs(5), next)
        .await
        .expect("b got the slot the cancelled waiter gave up")
        .expect("task");
    // Every slot is back: one can be taken at once.
    drop(slots.acquire("c").await);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_cancelled_before_its_turn_is_skipped() {
    cancelled_waiter(false).await;
}

#[tokio::test(start_paused = true)]
async fn a_waiter_cancelled_after_its_slot_was_handed_to_it_passes_it_on() {
    cancelled_waiter(true).await;
}
