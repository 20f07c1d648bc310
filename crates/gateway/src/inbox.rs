//! A connection's inbox: the bounded queue the hub puts deliveries into and the
//! connection takes them from.
//!
//! tokio's `mpsc` channel did this job at about 790 bytes per connection: its shared
//! state is padded to cache lines, and its first block of 32 slots is allocated up
//! front. Every open socket holds one for its whole life, nearly always empty, so the
//! inbox is one small allocation instead (under 100 bytes): a queue that grows only as
//! far as a backlog needs, a lock that only the hub (putting, one channel at a time)
//! and the connection (taking) ever take, and one waker, the connection's.
//!
//! Putting never waits: a full inbox refuses ([`Refused::Full`]), and the hub closes
//! that connection as a slow consumer rather than let it slow everyone else.

use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
};

use futures_util::task::AtomicWaker;

/// Creates an inbox holding at most `capacity` items, and the handle that puts into it.
pub fn inbox<T>(capacity: usize) -> (Sender<T>, Inbox<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            closed: false,
        }),
        waker: AtomicWaker::new(),
        capacity,
    });
    (Sender(shared.clone()), Inbox(shared))
}

/// Puts into an inbox; cheap to clone (one per channel the connection follows).
#[derive(Debug)]
pub struct Sender<T>(Arc<Shared<T>>);

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// The taking side, owned by the connection. Dropping it closes the inbox and drops
/// what it held.
#[derive(Debug)]
pub struct Inbox<T>(Arc<Shared<T>>);

/// Why an item was not put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The inbox holds `capacity` items: its connection does not keep up.
    Full,
    /// The connection is gone.
    Closed,
}

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    /// The connection's task, while it waits for an item.
    waker: AtomicWaker,
    capacity: usize,
}

#[derive(Debug)]
struct State<T> {
    queue: VecDeque<T>,
    closed: bool,
}

impl<T> Shared<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while holding the lock; if something did, the queue is still
        // a queue.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Sender<T> {
    /// Puts `item` at the back, never waiting, and wakes the connection.
    pub fn try_send(&self, item: T) -> Result<(), Refused> {
        {
            let mut state = self.0.state();
            if state.closed {
                return Err(Refused::Closed);
            }
            if state.queue.len() >= self.0.capacity {
                return Err(Refused::Full);
            }
            state.queue.push_back(item);
        }
        self.0.waker.wake();
        Ok(())
    }
}

impl<T> Inbox<T> {
    /// The next item, waiting for one. Cancel-safe: an item is taken only when this
    /// completes.
    pub async fn recv(&mut self) -> T {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        // Registered before looking, so an item put after the look wakes this task.
        self.0.waker.register(cx.waker());
        match self.try_recv() {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        }
    }

    /// The next item, if one is there.
    pub fn try_recv(&mut self) -> Option<T> {
        self.0.state().queue.pop_front()
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        let dropped = {
            let mut state = self.0.state();
            state.closed = true;
            std::mem::take(&mut state.queue)
        };
        // Outside the lock: dropping an item may be arbitrary work.
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn items_come_out_in_order_and_a_full_inbox_refuses() {
        let (sender, mut inbox) = inbox(3);
        let other = sender.clone();
        for item in [1, 2, 3] {
            sender.try_send(item).expect("room");
        }
        assert_eq!(other.try_send(4), Err(Refused::Full));
        assert_eq!(inbox.try_recv(), Some(1));
        other.try_send(4).expect("room again");
        let taken: Vec<_> = std::iter::from_fn(|| inbox.try_recv()).collect();
        assert_eq!(taken, [2, 3, 4]);
        assert_eq!(inbox.try_recv(), None);
    }

    #[test]
    fn a_dropped_inbox_refuses_and_frees_what_it_held() {
        let (sender, inbox) = inbox(4);
        let held = Arc::new(());
        sender.try_send(held.clone()).expect("room");
        drop(inbox);
        assert_eq!(Arc::strong_count(&held), 1, "the queued item was dropped");
        assert_eq!(sender.try_send(held.clone()), Err(Refused::Closed));
    }

    #[test]
    fn recv_is_ready_with_what_is_queued_and_pending_without() {
        let (sender, mut inbox) = inbox(4);
        assert_eq!(inbox.recv().now_or_never(), None);
        sender.try_send("a").expect("room");
        assert_eq!(inbox.recv().now_or_never(), Some("a"));
    }

    /// Takes the next item, failing if it takes a second or more: only a wake-up,
    /// never the deadline's timer, can make it ready in time.
    async fn next_in_time<T>(inbox: &mut Inbox<T>) -> T {
        let deadline = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(deadline);
        tokio::select! {
            biased;
            () = &mut deadline => panic!("a put item did not wake the waiting taker"),
            item = inbox.recv() => item,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_taker_is_woken_by_every_put_from_another_thread() {
        // One item at a time, put only once the last one was taken: each put races
        // the taker's going to sleep on an empty inbox, where a lost wake-up is lost
        // for good.
        let (sender, mut inbox) = inbox(8);
        let rounds = 20_000;
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let putter = std::thread::spawn({
            let taken = taken.clone();
            move || {
                for item in 0..rounds {
                    while taken.load(std::sync::atomic::Ordering::Acquire) < item {
                        std::hint::spin_loop();
                    }
                    sender.try_send(item).expect("room");
                }
            }
        });
        for expected in 0..rounds {
            assert_eq!(next_in_time(&mut inbox).await, expected);
            taken.store(expected + 1, std::sync::atomic::Ordering::Release);
        }
        putter.join().expect("the putter finished");
    }
}
