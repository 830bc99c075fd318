//! Write mode `fsync: always` ([`super::Writer::GroupCommit`]): requests queue their decision
//! events to the writer thread, which appends and fsyncs them in batches (group commit) and wakes
//! the waiting requests. Close events, which nothing waits for, are handed over through a list of
//! their own and never wait for room in the queue: an async task must not block on a full queue.

use super::spooled::{BACKLOG, Spooled};
use super::{Event, Msg};

impl Spooled {
    /// Queues a decision event to the writer thread; the receiver says whether it was committed.
    /// `None`: the queue is full (the writer is that far behind) and the event was not queued.
    pub(super) fn queue(&self, event: Box<Event>) -> Option<tokio::sync::oneshot::Receiver<bool>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.try_send(Msg::Event(event, Some(tx))).ok()?;
        Some(rx)
    }

    /// Hands a close event to the writer thread (`fsync: always`), which commits it with the
    /// next batch or within one tick. Never waits for the writer: the list's lock is held only
    /// to push or to swap the list. `false`: the writer is far behind (a stalled disk) and the
    /// event is dropped; the caller counts it for the next `audit_gap`.
    pub(super) fn hand_over(&self, event: Box<Event>) -> bool {
        let mut list = self.handed_over.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() >= BACKLOG {
            return false;
        }
        list.push(event);
        true
    }
}
