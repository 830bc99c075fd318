//! What both write modes with a spool share ([`super::group_commit`], [`super::inline`]): an
//! event is appended to the spool before the decision waiting on it is acknowledged, so the
//! client is answered, or the first byte sent upstream, only after its decision event is
//! committed. The writer thread writes time-based checkpoints and gap events, retries what
//! failed and probes for recovery. When an event cannot be committed (spool full or
//! unwritable), `audit.onFailure` decides: `failClosed` refuses the request and turns readiness
//! false until commits work again (with a margin of room after a full spool, for admission and
//! readiness alike); `failOpen` lets it through, counts the loss and writes an `audit_gap` event
//! with the lost sequence range once writing works again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use super::checkpoint::Checkpoints;
use super::spool::{self, Cursor, Reader, Shared, Spool};
use super::{Event, Msg, QUEUE, Timestamp, deliver, sink, write_line, write_value};
use crate::config::{AuditConfig, FsyncPolicy, OnFailure, SpoolConfig};
use crate::metrics::{Metrics, SinkMetrics};

pub(super) struct Spooled {
    /// Decisions to the writer thread (`fsync: always`) and flush requests (both modes).
    pub(super) tx: mpsc::SyncSender<Msg>,
    pub(super) shared: Arc<Shared>,
    pub(super) sinks: Vec<SinkThread>,
    pub(super) writer: Arc<Mutex<SpoolWriter>>,
    /// Close events handed to the writer thread (`fsync: always`).
    #[allow(clippy::vec_box, reason = "events arrive boxed and are written from the box: no 570-byte moves")]
    pub(super) handed_over: Arc<Mutex<Vec<Box<Event>>>>,
}

impl Spooled {
    /// Opens the spool, starts one delivery thread per sink from its cursor and the writer
    /// thread. Returns the spool's instance id (kept across restarts).
    pub(super) fn start(
        cfg: &AuditConfig,
        spool_cfg: &SpoolConfig,
        opened: Vec<(String, sink::Sink)>,
        checkpoints: Option<Checkpoints>,
        (healthy, lost_in_queue): (Arc<AtomicBool>, Arc<AtomicU64>),
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<(Spooled, Arc<str>)> {
        let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
        let (mut spool, committed, spool_instance) =
            Spool::open(spool_cfg).map_err(|e| anyhow::anyhow!("audit.spool.dir {}: {e}", spool_cfg.dir.display()))?;
        let instance: Arc<str> = spool_instance.into();
        let oldest = committed.segments.first().copied().unwrap_or(1);
        let last_seq = committed.last_seq;
        let last_hash = committed.last_hash.clone();
        metrics.audit_spool_bytes.set(spool.total_bytes() as i64);
        metrics.audit_spool_max_bytes.set(spool.max_bytes() as i64);
        let shared = Arc::new(Shared { state: std::sync::Mutex::new(committed), cond: Default::default() });
        let mut threads = Vec::new();
        let mut in_use = Vec::new();
        for ((name, sink), sc) in opened.into_iter().zip(&cfg.sinks) {
            let cursor = Cursor::load(spool.dir(), &name, oldest);
            let reader = Reader::new(spool.dir().to_path_buf(), shared.clone(), cursor.pos);
            in_use.push(reader.in_use.clone());
            let delivered = Arc::new(AtomicU64::new(cursor.seq));
            let persisted = Arc::new(AtomicU64::new(cursor.seq));
            let abandon = Arc::new(AtomicBool::new(false));
            let sm = metrics.audit_sinks.sink(&name);
            sm.lag.set(last_seq.saturating_sub(cursor.seq) as i64);
            let d = delivered.clone();
            let ps = persisted.clone();
            let a = abandon.clone();
            let sh = shared.clone();
            let format = sc.format();
            let handle = std::thread::Builder::new()
                .name(format!("audit-sink-{name}"))
                .spawn(move || deliver::deliver_loop(reader, cursor, sink, format, sh, (d, ps), a, sm))?;
            threads.push(SinkThread { name, delivered, persisted, abandon, _handle: handle });
        }
        // Segments no sink reads any more (sinks removed from the config) are collected now.
        let oldest_in_use = in_use.iter().map(|a| a.load(Ordering::Acquire)).min().unwrap_or(u64::MAX);
        let segments = spool.collect(oldest_in_use);
        shared.state.lock().unwrap_or_else(|p| p.into_inner()).segments = segments;
        let lags = threads.iter().map(|t| (t.delivered.clone(), metrics.audit_sinks.sink(&t.name))).collect();
        let w = SpoolWriter {
            spool,
            lags,
            shared: shared.clone(),
            in_use,
            instance: instance.clone(),
            seq: last_seq,
            fsync: spool_cfg.fsync,
            on_failure: cfg.on_failure,
            healthy,
            lost_in_queue,
            metrics: metrics.clone(),
            gap: None,
            backlog: Vec::new(),
            full: false,
            prev: last_hash,
            checkpoints,
            inline_batch: Vec::with_capacity(64),
            inline_buf: Vec::with_capacity(4096),
            handed_over: Arc::default(),
        };
        let handed_over = w.handed_over.clone();
        let writer = Arc::new(Mutex::new(w));
        let wr = writer.clone();
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || SpoolWriter::run(wr, rx))?;
        Ok((Spooled { tx, shared, sinks: threads, writer, handed_over }, instance))
    }

    pub(super) fn writer(&self) -> MutexGuard<'_, SpoolWriter> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fsyncs the spool now (at shutdown).
    pub(super) fn sync(&self) {
        if let Err(e) = self.writer().spool.sync() {
            tracing::error!(error = %e, "audit spool fsync failed");
        }
    }
}

pub(super) struct SinkThread {
    pub(super) name: String,
    pub(super) delivered: Arc<AtomicU64>,
    /// Last sequence number whose cursor is saved.
    pub(super) persisted: Arc<AtomicU64>,
    pub(super) abandon: Arc<AtomicBool>,
    pub(super) _handle: std::thread::JoinHandle<()>,
}

/// Most events written in one append (one group commit).
const BATCH: usize = 4096;
/// Close events kept in memory while the spool refuses them (`failClosed`); beyond, counted lost.
pub(super) const BACKLOG: usize = 100_000;

pub(super) struct SpoolWriter {
    spool: Spool,
    /// Each sink's last delivered sequence number and metrics, for its lag.
    lags: Vec<(Arc<AtomicU64>, SinkMetrics)>,
    shared: Arc<Shared>,
    in_use: Vec<Arc<AtomicU64>>,
    instance: Arc<str>,
    seq: u64,
    fsync: FsyncPolicy,
    on_failure: OnFailure,
    healthy: Arc<AtomicBool>,
    lost_in_queue: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// Sequence range lost (`failOpen`), written as an `audit_gap` event when writing works again.
    gap: Option<(u64, u64)>,
    /// Close events not yet committed (`failClosed`).
    backlog: Vec<Event>,
    /// The last failure was a full spool (recovers when delivered segments are collected).
    full: bool,
    /// Hash of the last event written (the chain goes on from it, also across restarts).
    prev: String,
    checkpoints: Option<Checkpoints>,
    /// Events appended by callers (`Spooled::append_now`) and not written yet: close events wait
    /// here for the next decision or tick.
    pub(super) inline_batch: Vec<(Box<Event>, Option<tokio::sync::oneshot::Sender<bool>>)>,
    inline_buf: Vec<u8>,
    /// Close events handed over by callers (`fsync: always`), taken at every wake-up.
    #[allow(clippy::vec_box, reason = "events arrive boxed and are written from the box: no 570-byte moves")]
    handed_over: Arc<Mutex<Vec<Box<Event>>>>,
}

impl SpoolWriter {
    /// Commits the events callers queued (`inline_batch`).
    pub(super) fn commit_inline(&mut self) {
        let mut batch = std::mem::take(&mut self.inline_batch);
        let mut buf = std::mem::take(&mut self.inline_buf);
        self.commit(&mut batch, &mut buf);
        batch.clear();
        (self.inline_batch, self.inline_buf) = (batch, buf);
    }

    /// The writer thread: group commits of queued events (`fsync: always`; with a period, callers
    /// append themselves and the queue carries only flush requests), fsync every period,
    /// checkpoints by time, gap events, retries of the backlog, recovery probes, segment collection.
    pub(super) fn run(writer: Arc<Mutex<SpoolWriter>>, rx: mpsc::Receiver<Msg>) {
        let lock = || writer.lock().unwrap_or_else(|p| p.into_inner());
        let fsync = lock().fsync;
        let tick = match fsync {
            FsyncPolicy::Every(p) => p.min(Duration::from_millis(200)),
            FsyncPolicy::Always => Duration::from_millis(200),
        };
        let mut last_sync = Instant::now();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut events: Vec<(Box<Event>, Option<tokio::sync::oneshot::Sender<bool>>)> = Vec::with_capacity(BATCH);
        let mut flushes: Vec<mpsc::Sender<u64>> = Vec::new();
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            for m in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok()).take(BATCH)) {
                match m {
                    Msg::Event(ev, done) => events.push((ev, done)),
                    Msg::Flush(done) => flushes.push(done),
                }
            }
            let (to_sync, seq) = {
                let mut w = lock();
                w.collect();
                for (delivered, m) in &w.lags {
                    m.lag.set(w.seq.saturating_sub(delivered.load(Ordering::Acquire)) as i64);
                }
                {
                    let handed = w.handed_over.clone();
                    let mut handed = handed.lock().unwrap_or_else(|p| p.into_inner());
                    w.inline_batch.extend(handed.drain(..).map(|ev| (ev, None)));
                }
                if !w.inline_batch.is_empty() {
                    w.commit_inline();
                }
                let checkpoint_due = w.checkpoints.as_ref().is_some_and(|c| c.due(0));
                if !events.is_empty() || !w.backlog.is_empty() || w.gap.is_some() || w.pending_lost() || checkpoint_due
                {
                    w.commit(&mut events, &mut buf);
                } else if !w.healthy.load(Ordering::Relaxed) {
                    w.probe();
                }
                let to_sync = match fsync {
                    FsyncPolicy::Every(p) if last_sync.elapsed() >= p => {
                        last_sync = Instant::now();
                        w.spool.take_unsynced()
                    }
                    _ => None,
                };
                (to_sync, w.seq)
            };
            // Outside the lock: appends go on while the disk flushes.
            if let Some(f) = to_sync
                && let Err(e) = f.sync_data()
            {
                let w = lock();
                w.metrics.audit_errors.inc();
                tracing::error!(error = %e, "audit spool fsync failed");
            }
            for f in flushes.drain(..) {
                let _ = f.send(seq);
            }
        }
        let _ = lock().spool.sync();
    }

    fn pending_lost(&self) -> bool {
        self.lost_in_queue.load(Ordering::Relaxed) > 0
    }

    /// Deletes segments every sink has moved past.
    fn collect(&mut self) {
        let oldest = self.in_use.iter().map(|a| a.load(Ordering::Acquire)).min().unwrap_or(u64::MAX);
        let before = self.spool.total_bytes();
        let segments = self.spool.collect(oldest);
        if self.spool.total_bytes() != before {
            self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).segments = segments;
            self.metrics.audit_spool_bytes.set(self.spool.total_bytes() as i64);
        }
    }

    /// Recovery check while nothing is being written: room again (the margin admission asks
    /// for), or the spool writable again (what an append needs, not only a flush).
    fn probe(&mut self) {
        let ok = if self.full { !self.still_full() } else { self.spool.probe().is_ok() };
        if ok {
            self.full = false;
            self.set_healthy(true);
        }
    }

    /// After the spool was found full: until the sinks have freed a margin of room, it counts as
    /// full for admission and readiness alike (a close event may still fit; it changes neither).
    fn still_full(&self) -> bool {
        self.full && self.spool.total_bytes() >= self.spool_max_minus_margin()
    }

    fn spool_max_minus_margin(&self) -> u64 {
        // Healthy again once room for a burst is back (a decision is well under 8 KiB).
        let max = self.spool.max_bytes();
        max - (max / 4).min(64 * 1024)
    }

    fn set_healthy(&self, ok: bool) {
        let was = self.healthy.swap(ok, Ordering::Relaxed);
        self.metrics.audit_unavailable.set(i64::from(!ok));
        if was != ok {
            if ok {
                tracing::info!("audit events can be committed again");
            } else {
                tracing::error!(on_failure = ?self.on_failure, "audit events cannot be committed");
            }
        }
    }

    /// Appends the backlog, a pending gap event and the batch as one write; acknowledges the
    /// waiting decisions.
    fn commit(
        &mut self,
        events: &mut Vec<(Box<Event>, Option<tokio::sync::oneshot::Sender<bool>>)>,
        buf: &mut Vec<u8>,
    ) {
        buf.clear();
        if self.still_full() && self.on_failure == OnFailure::FailClosed {
            // Decisions are refused as on a failed write; close events are kept and written below
            // while they fit.
            events.retain_mut(|(_, done)| match done.take() {
                Some(d) => {
                    self.metrics.audit_dropped.inc();
                    let _ = d.send(false);
                    false
                }
                None => true,
            });
            if events.is_empty() && self.backlog.is_empty() && self.gap.is_none() {
                return;
            }
        }
        let mut seq = self.seq;
        // Events lost before reaching the writer (failOpen, queue full) take their numbers now.
        let lost = self.lost_in_queue.swap(0, Ordering::Relaxed);
        if lost > 0 {
            self.widen_gap(seq + 1, seq + lost);
            seq += lost;
        }
        let first_written = seq + 1;
        let mut prev = self.prev.clone();
        if let Some((from, to)) = self.gap {
            seq += 1;
            write_value(buf, gap_event(seq, &self.instance, from, to), &mut prev, None);
        }
        for ev in self.backlog.iter_mut() {
            seq += 1;
            write_line(buf, ev, seq, &self.instance, &mut prev);
        }
        for (ev, _) in events.iter_mut() {
            seq += 1;
            write_line(buf, ev, seq, &self.instance, &mut prev);
        }
        let mut checkpointed = false;
        if let Some(cp) = &self.checkpoints {
            let written = seq - first_written + 1;
            if cp.due(written) {
                seq += 1;
                write_value(buf, cp.event(seq, &self.instance, cp.since + written), &mut prev, Some(&cp.signer));
                checkpointed = true;
            }
        }
        let result = self.spool.append(buf, first_written).and_then(|pos| {
            if self.fsync == FsyncPolicy::Always {
                self.spool.sync().map_err(spool::AppendError::Io)?;
            }
            Ok(pos)
        });
        match result {
            Ok(pos) => {
                let n = seq - self.seq - lost;
                self.seq = seq;
                self.prev = prev;
                if let Some(cp) = self.checkpoints.as_mut() {
                    if checkpointed {
                        cp.since = 0;
                        cp.last = Instant::now();
                    } else {
                        cp.since += n;
                    }
                }
                self.gap = None;
                self.backlog.clear();
                self.full = self.still_full();
                self.metrics.audit_events.inc_by(n);
                self.metrics.audit_spool_bytes.set(self.spool.total_bytes() as i64);
                let wake = {
                    let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.last_seq = seq;
                    st.end = pos;
                    if st.segments.last() != Some(&pos.segment) {
                        st.segments.push(pos.segment);
                    }
                    st.waiting > 0
                };
                if wake {
                    self.shared.cond.notify_all();
                }
                self.set_healthy(!self.full);
                for (_, done) in events.drain(..) {
                    if let Some(d) = done {
                        let _ = d.send(true);
                    }
                }
            }
            Err(e) => {
                self.full = matches!(e, spool::AppendError::Full);
                self.metrics.audit_errors.inc();
                // Once per failure, not once per refused request (egress_audit_errors_total counts).
                if self.healthy.load(Ordering::Relaxed) {
                    tracing::error!(error = %e, "audit spool: events not committed");
                }
                self.set_healthy(false);
                match self.on_failure {
                    OnFailure::FailClosed => {
                        // Nothing was written: the numbers are not used. Decisions are refused;
                        // close events wait in memory for the next attempt.
                        for (ev, done) in events.drain(..) {
                            match done {
                                Some(d) => {
                                    self.metrics.audit_dropped.inc();
                                    let _ = d.send(false);
                                }
                                None if self.backlog.len() < BACKLOG => self.backlog.push(*ev),
                                None => {
                                    self.metrics.audit_dropped.inc();
                                }
                            }
                        }
                    }
                    OnFailure::FailOpen => {
                        // Lost: the numbers stay used and the range is reported once writing works.
                        let n = events.len() as u64 + self.backlog.len() as u64;
                        self.metrics.audit_dropped.inc_by(n);
                        self.widen_gap(first_written, seq);
                        self.seq = seq;
                        self.backlog.clear();
                        for (_, done) in events.drain(..) {
                            if let Some(d) = done {
                                let _ = d.send(true);
                            }
                        }
                    }
                }
            }
        }
    }

    fn widen_gap(&mut self, from: u64, to: u64) {
        if from > to {
            return;
        }
        self.gap = Some(match self.gap {
            Some((a, b)) => (a.min(from), b.max(to)),
            None => (from, to),
        });
    }
}

/// The `audit_gap` event: events `from_seq..=to_seq` of this instance were lost.
fn gap_event(seq: u64, instance: &str, from: u64, to: u64) -> serde_json::Value {
    serde_json::json!({
        "schema": "egress.v1",
        "event": "audit_gap",
        "id": uuid::Uuid::now_v7().to_string(),
        "seq": seq,
        "time": Timestamp::now().to_string(),
        "instance": instance,
        "gap": {"from_seq": from, "to_seq": to, "lost": to - from + 1},
    })
}
