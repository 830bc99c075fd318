//! Write mode without a spool: the calling thread numbers, chains and serialises its event into
//! a shared buffer (under a short lock, no hand-off) and one writer thread writes the buffer to
//! every sink every few milliseconds. Nothing survives a crash; a stalled sink makes callers
//! wait once 8 MiB are buffered, so nothing is dropped either.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::checkpoint::Checkpoints;
use super::{Event, format, sink, write_line};
use crate::config::AuditFormat;
use crate::metrics::Metrics;

/// The audit log without a spool: callers serialise into `buf`, the writer thread writes it out.
pub(super) struct Direct {
    state: Mutex<DirectState>,
    /// The writer waits on it between ticks; callers wait on it for room or for a flush.
    cond: Condvar,
    instance: Arc<str>,
    metrics: Arc<Metrics>,
}

struct DirectState {
    /// Serialised lines not yet written to the sinks.
    buf: Vec<u8>,
    /// Sequence number of the last event in `buf` (or written).
    seq: u64,
    /// Sequence number of the last event written to the sinks.
    written: u64,
    /// Hash of the last event (the chain goes on from it).
    prev: String,
    checkpoints: Option<Checkpoints>,
    /// The writer sleeps long (nothing came for a while): the next event wakes it.
    sleeping: bool,
}

impl Direct {
    /// How often the writer writes what callers buffered.
    const TICK: Duration = Duration::from_millis(5);
    /// Beyond this much unwritten (a stalled sink), callers wait for the writer: nothing is lost.
    const MAX_BUFFERED: usize = 8 << 20;

    pub(super) fn new(instance: Arc<str>, checkpoints: Option<Checkpoints>, metrics: Arc<Metrics>) -> Direct {
        Direct {
            state: Mutex::new(DirectState {
                buf: Vec::with_capacity(64 * 1024),
                seq: 0,
                written: 0,
                prev: super::chain::GENESIS.to_string(),
                checkpoints,
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

    /// Numbers, chains and serialises `event` on the calling thread; its order among all events
    /// is the order of calls.
    pub(super) fn append(&self, mut event: Event) {
        let mut st = self.lock();
        while st.buf.len() >= Self::MAX_BUFFERED {
            self.cond.notify_all();
            st = self.cond.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
        let st = &mut *st;
        if st.sleeping {
            st.sleeping = false;
            self.cond.notify_all();
        }
        st.seq += 1;
        write_line(&mut st.buf, &mut event, st.seq, &self.instance, &mut st.prev);
        self.metrics.audit_events.inc();
        if let Some(cp) = st.checkpoints.as_mut() {
            cp.since += 1;
            if cp.due(0) {
                st.seq += 1;
                cp.write(&mut st.buf, st.seq, &self.instance, &mut st.prev);
            }
        }
    }

    /// Waits until every event appended so far is written and flushed; returns the last number.
    pub(super) fn flush(&self) -> u64 {
        let mut st = self.lock();
        let target = st.seq;
        while st.written < target {
            self.cond.notify_all();
            st = self.cond.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
        target
    }

    /// The writer thread: every tick (or at once for a flush or a full buffer), takes the buffer
    /// and writes it to every sink in its format. Callers never wake it, except the first event
    /// after a quiet spell.
    pub(super) fn run(&self, mut sinks: Vec<(sink::Sink, AuditFormat)>) {
        let ctx = format::Context::local();
        let mut lines = Vec::with_capacity(64 * 1024);
        let mut mapped = Vec::with_capacity(64 * 1024);
        let mut quiet = Quiet::default();
        loop {
            let (wait, sleep) = quiet.after_tick(!lines.is_empty());
            lines.clear();
            let upto = {
                let mut st = self.lock();
                st.sleeping = sleep;
                st = self.cond.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
                st.sleeping = false;
                // A checkpoint due by time while traffic is quiet.
                let st = &mut *st;
                if let Some(cp) = st.checkpoints.as_mut()
                    && cp.since > 0
                    && cp.due(0)
                {
                    st.seq += 1;
                    cp.write(&mut st.buf, st.seq, &self.instance, &mut st.prev);
                }
                std::mem::swap(&mut st.buf, &mut lines);
                st.seq
            };
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
            if st.written != upto {
                st.written = upto;
                self.cond.notify_all();
            }
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
