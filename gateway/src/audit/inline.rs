//! Write mode `fsync: <period>` (the default; [`super::Writer::Inline`]): each request appends
//! its own event to the spool's page cache under the writer's lock, with no hand-off between
//! threads; a close event, which nothing waits for, keeps its place in line and is written with
//! the next decision or by the writer thread within one tick. The writer thread only fsyncs every
//! period, outside the lock.

use super::Event;
use super::spooled::Spooled;

impl Spooled {
    /// Appends one event on the calling thread; returns whether it may go ahead (committed, or
    /// lost under `failOpen`). Used with `fsync: <period>`, where a commit is a write to the page
    /// cache: cheaper than waking the writer thread and being woken by it. An event nothing waits
    /// for (a close) is queued in order and written with the next decision, or by the writer
    /// thread within one tick (at most the fsync period, or 200 ms).
    pub(super) fn append_now(&self, event: Box<Event>, waits: bool) -> bool {
        /// Close events held back at most (one write each time that many are queued).
        const DEFERRED: usize = 64;
        let mut w = self.writer();
        if !waits {
            w.inline_batch.push((event, None));
            if w.inline_batch.len() >= DEFERRED {
                w.commit_inline();
            }
            return true;
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        w.inline_batch.push((event, Some(tx)));
        w.commit_inline();
        drop(w);
        // `commit` answered before returning; nothing waits on the receiver.
        rx.try_recv() == Ok(true)
    }
}
