//! Write mode without a spool. A caller hands its event over (moved into a queue under a short
//! lock: no serialisation, no hashing, no I/O on the request's task) and goes on; one writer
//! thread numbers, chains and serialises what was handed over, in the order of the calls, and
//! writes it to every sink every few milliseconds. Nothing survives a crash; a stalled sink makes
//! callers wait once [`Direct::MAX_QUEUED`] events are waiting, so nothing is dropped either.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::checkpoint::Checkpoints;
use super::{Event, format, sink, write_line};
use crate::config::AuditFormat;
use crate::metrics::Metrics;

/// The audit log without a spool: callers queue events, the writer thread writes them out.
pub(super) struct Direct {
    state: Mutex<DirectState>,
    /// The writer waits on it between ticks; callers wait on it for room or for a flush.
    cond: Condvar,
    instance: Arc<str>,
    metrics: Arc<Metrics>,
}

struct DirectState {
    /// Events handed over and not yet taken by the writer, in the order of the calls.
    #[allow(clippy::vec_box, reason = "events arrive boxed and are written from the box: no 570-byte moves")]
    queue: Vec<Box<Event>>,
    /// Events handed over since start.
    appended: u64,
    /// Of those, events the writer has written to (and flushed on) every sink.
    written: u64,
    /// Sequence number of the last event written (checkpoints included).
    last_seq: u64,
    /// The writer sleeps long (nothing came for a while): the next event wakes it.
    sleeping: bool,
}

/// What only the writer thread touches: the chain goes on from `prev`.
struct Chain {
    seq: u64,
    prev: String,
    checkpoints: Option<Checkpoints>,
}

impl Direct {
    /// How often the writer writes what callers handed over.
    const TICK: Duration = Duration::from_millis(5);
    /// Beyond this many events waiting (a stalled sink), callers wait for the writer: nothing is
    /// lost. About 8 MiB of serialised events.
    const MAX_QUEUED: usize = 8 * 1024;

    pub(super) fn new(instance: Arc<str>, metrics: Arc<Metrics>) -> Direct {
        Direct {
            state: Mutex::new(DirectState {
                queue: Vec::with_capacity(1024),
                appended: 0,
                written: 0,
                last_seq: 0,
                sleeping: false,
            }),
            cond: Condvar::new(),
            instance,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, DirectState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `event` to the writer; its order among all events is the order of calls. Waits only
    /// while [`Self::MAX_QUEUED`] events are waiting already.
    pub(super) fn append(&self, event: Box<Event>) {
        let mut st = self.lock();
        while st.queue.len() >= Self::MAX_QUEUED {
            self.cond.notify_all();
            st = self.cond.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
        if st.sleeping {
            st.sleeping = false;
            self.cond.notify_all();
        }
        st.queue.push(event);
        st.appended += 1;
    }

    /// Waits until every event appended so far is written and flushed; returns the last number.
    pub(super) fn flush(&self) -> u64 {
        let mut st = self.lock();
        let target = st.appended;
        while st.written < target {
            self.cond.notify_all();
            st = self.cond.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
        st.last_seq
    }

    /// The writer thread: every tick (or at once for a flush or a full queue), takes the queued
    /// events, numbers, chains and serialises them, and writes the lines to every sink in its
    /// format. Callers never wake it, except the first event after a quiet spell.
    pub(super) fn run(&self, mut sinks: Vec<(sink::Sink, AuditFormat)>, checkpoints: Option<Checkpoints>) {
        let ctx = format::Context::local();
        let mut chain = Chain { seq: 0, prev: super::chain::GENESIS.to_string(), checkpoints };
        let mut batch: Vec<Box<Event>> = Vec::with_capacity(1024);
        let mut lines = Vec::with_capacity(64 * 1024);
        let mut mapped = Vec::with_capacity(64 * 1024);
        let mut quiet = Quiet::default();
        loop {
            let (wait, sleep) = quiet.after_tick(!lines.is_empty());
            lines.clear();
            let taken = {
                let mut st = self.lock();
                st.sleeping = sleep;
                st = self.cond.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
                st.sleeping = false;
                std::mem::swap(&mut st.queue, &mut batch);
                if batch.len() >= Self::MAX_QUEUED {
                    // Callers may be waiting for room.
                    self.cond.notify_all();
                }
                st.appended
            };
            for mut event in batch.drain(..) {
                chain.seq += 1;
                write_line(&mut lines, &mut event, chain.seq, &self.instance, &mut chain.prev);
                self.metrics.audit_events.inc();
                if let Some(cp) = chain.checkpoints.as_mut() {
                    cp.since += 1;
                }
                chain.checkpoint(&mut lines, &self.instance);
            }
            // A checkpoint due by time while traffic is quiet.
            chain.checkpoint(&mut lines, &self.instance);
            if !lines.is_empty() {
                for (s, fmt) in sinks.iter_mut() {
                    let bytes = if *fmt == AuditFormat::Json {
                        &lines
                    } else {
                        mapped.clear();
                        format::render(*fmt, &ctx, &lines, &mut mapped);
                        &mapped
                    };
                    if let Err(e) = s.write(bytes, &lines) {
                        self.metrics.audit_errors.inc();
                        tracing::error!(sink = %s.name(), error = %e, "audit write failed");
                    }
                }
                flush_all(&mut sinks, &self.metrics);
                self.metrics.audit_direct_writes.inc();
            }
            let mut st = self.lock();
            st.last_seq = chain.seq;
            if st.written != taken {
                st.written = taken;
                self.cond.notify_all();
            }
        }
    }
}

impl Chain {
    /// Writes a checkpoint when one is due (by count or by time).
    fn checkpoint(&mut self, lines: &mut Vec<u8>, instance: &str) {
        if let Some(cp) = self.checkpoints.as_mut()
            && cp.since > 0
            && cp.due(0)
        {
            self.seq += 1;
            cp.write(lines, self.seq, instance, &mut self.prev);
        }
    }
}

/// When the no-spool writer next looks at the buffer: every tick while events come, a long
/// sleep (that the next event ends) after a quiet spell.
#[derive(Default)]
struct Quiet {
    /// Ticks in a row that had nothing to write.
    ticks: u32,
}

impl Quiet {
    const SLEEP_AFTER: u32 = 20;

    /// After a tick that wrote something (`wrote`) or not: how long to wait, and whether that is
    /// the long sleep. Judged by what the tick wrote, never by the buffer right after taking it,
    /// which is nearly always empty: judged that way, a busy writer went to sleep after 20 ticks
    /// and was then woken by every single event (a context switch per event).
    fn after_tick(&mut self, wrote: bool) -> (Duration, bool) {
        self.ticks = if wrote { 0 } else { self.ticks.saturating_add(1) };
        if self.ticks > Self::SLEEP_AFTER { (Duration::from_millis(200), true) } else { (Direct::TICK, false) }
    }
}

fn flush_all(sinks: &mut [(sink::Sink, AuditFormat)], metrics: &Metrics) {
    for (s, _) in sinks.iter_mut() {
        if let Err(e) = s.flush() {
            metrics.audit_errors.inc();
            tracing::error!(sink = %s.name(), error = %e, "audit flush failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_sleeps_only_after_a_quiet_spell_and_never_while_events_come() {
        let mut q = Quiet::default();
        for _ in 0..Quiet::SLEEP_AFTER {
            assert_eq!(q.after_tick(false), (Direct::TICK, false));
        }
        assert_eq!(q.after_tick(false), (Duration::from_millis(200), true));
        // The event that ends the sleep is written; from then on every tick that writes keeps
        // the writer on its tick, however long the quiet spell before it was.
        for _ in 0..1000 {
            assert_eq!(q.after_tick(true), (Direct::TICK, false));
        }
        assert_eq!(q.after_tick(false), (Direct::TICK, false));
    }
}
