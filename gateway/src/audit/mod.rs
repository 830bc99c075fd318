//! Audit events (`schema: egress.v1`), the spool they are committed to, and their sinks.
//!
//! Events are built by the pipeline (never by a front) and handed to one writer thread through a
//! bounded queue. The writer assigns the per-instance sequence number and the event id and
//! serialises each event once.
//!
//! - Without `audit.spool` the calling thread numbers and serialises its event into a shared buffer
//!   (under a short lock, no hand-off) and the writer thread writes the buffer to the sinks every
//!   few milliseconds; nothing survives a crash.
//! - With `audit.spool` an event is appended to the spool before the decision waiting on it is
//!   acknowledged: the client is answered, or the first byte sent upstream, after its decision
//!   event is committed. With `fsync: always` the writer thread appends and fsyncs in batches (group
//!   commit) and wakes the waiting requests. With `fsync: <period>` (the default) each request
//!   appends its own event to the page cache under the writer's lock, with no hand-off between
//!   threads (close events, which nothing waits for, keep their place in line and are written with the
//!   next decision or within one tick), and the writer thread only fsyncs every period (outside
//!   the lock), writes time-based checkpoints and gap events and retries what failed. One thread per
//!   sink delivers from its own persisted cursor, at least once and in sequence order; after a
//!   restart (also `kill -9`) each sink resumes where it stopped. When an event cannot be committed
//!   (spool full or unwritable), `audit.onFailure` decides: `failClosed` refuses the request and
//!   turns readiness false until commits work again; `failOpen` lets it through, counts the loss
//!   and writes an `audit_gap` event with the lost sequence range once writing works again.

pub mod chain;
mod event;
pub mod format;
pub mod http;
mod sink;
mod spool;
pub mod syslog;
mod tls;

pub use event::{ClientInfo, CloseInfo, DecisionInfo, End, Event, EventKind, ResolvedAddr, TargetInfo, now_rfc3339};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use crate::config::{AuditConfig, AuditFormat, FsyncPolicy, OnFailure};
use crate::metrics::{Metrics, SinkMetrics};
use spool::{Cursor, ReadResult, Reader, Shared, Spool};

/// Messages to the writer thread.
enum Msg {
    /// An event, and whom to tell when it is committed (decisions wait; close events do not).
    Event(Box<Event>, Option<tokio::sync::oneshot::Sender<bool>>),
    /// Answered once everything queued before it is committed (or written, without a spool).
    Flush(mpsc::Sender<u64>),
}

/// Bound of the queue to the writer: beyond it an event cannot be committed in time.
const QUEUE: usize = 16 * 1024;

/// The audit log handle. Cheap to share.
pub struct Audit {
    tx: mpsc::SyncSender<Msg>,
    /// Without a spool.
    direct: Option<Arc<Direct>>,
    spooled: Option<Spooled>,
    on_failure: OnFailure,
    /// False while events cannot be committed.
    healthy: Arc<AtomicBool>,
    /// Events dropped before they reached the writer (queue full), for the next `audit_gap`.
    lost_in_queue: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

struct Spooled {
    shared: Arc<Shared>,
    sinks: Vec<SinkThread>,
    writer: Arc<Mutex<SpoolWriter>>,
    /// `fsync: <period>`: events are appended by the calling thread, not the writer thread.
    inline: bool,
}

impl Spooled {
    fn writer(&self) -> MutexGuard<'_, SpoolWriter> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one event on the calling thread; returns whether it may go ahead (committed, or
    /// lost under `failOpen`). Used with `fsync: <period>`, where a commit is a write to the page
    /// cache: cheaper than waking the writer thread and being woken by it. An event nothing waits
    /// for (a close) is queued in order and written with the next decision, or by the writer
    /// thread within one tick (at most the fsync period, or 200 ms).
    fn append_now(&self, event: Event, waits: bool) -> bool {
        /// Close events held back at most (one write each time that many are queued).
        const DEFERRED: usize = 64;
        let mut w = self.writer();
        if !waits {
            w.inline_batch.push((Box::new(event), None));
            if w.inline_batch.len() >= DEFERRED {
                w.commit_inline();
            }
            return true;
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        w.inline_batch.push((Box::new(event), Some(tx)));
        w.commit_inline();
        drop(w);
        // `commit` answered before returning; nothing waits on the receiver.
        rx.try_recv() == Ok(true)
    }
}

struct SinkThread {
    name: String,
    delivered: Arc<AtomicU64>,
    /// Last sequence number whose cursor is saved.
    persisted: Arc<AtomicU64>,
    abandon: Arc<AtomicBool>,
    _handle: std::thread::JoinHandle<()>,
}

/// The event could not be committed and `audit.onFailure` is `failClosed`: refuse the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditUnavailable;

impl Audit {
    /// Opens the spool and every sink (errors name them) and starts the writer (and, with a
    /// spool, one delivery thread per sink). Returns the instance id of the event stream: the
    /// spool's own (kept across restarts) or `instance`.
    pub fn start(cfg: &AuditConfig, instance: Arc<str>, metrics: Arc<Metrics>) -> anyhow::Result<(Audit, Arc<str>)> {
        let mut opened = Vec::new();
        for (i, s) in cfg.sinks.iter().enumerate() {
            let name = s.name_or_default(i);
            let dead_letter = cfg.spool.as_ref().map(|sp| sp.dir.join("dead-letter").join(format!("{name}.jsonl")));
            let sink = sink::open(s, dead_letter).map_err(|e| anyhow::anyhow!("audit.sinks[{i}]: {e}"))?;
            opened.push((name, sink));
        }
        let checkpoints = Checkpoints::new(&cfg.checkpoint)?;
        let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let lost_in_queue = Arc::new(AtomicU64::new(0));
        let Some(spool_cfg) = &cfg.spool else {
            let sinks = opened.into_iter().zip(&cfg.sinks).map(|((_, s), c)| (s, c.format())).collect();
            drop(rx);
            let direct = Arc::new(Direct {
                state: Mutex::new(DirectState {
                    buf: Vec::with_capacity(64 * 1024),
                    seq: 0,
                    written: 0,
                    prev: chain::GENESIS.to_string(),
                    checkpoints,
                    sleeping: false,
                }),
                cond: Condvar::new(),
                instance: instance.clone(),
                metrics: metrics.clone(),
            });
            let d = direct.clone();
            // Detached: it ends with the process; `close` makes sure everything buffered is written first.
            std::thread::Builder::new().name("audit-writer".into()).spawn(move || d.run(sinks))?;
            let audit = Audit {
                tx,
                direct: Some(direct),
                spooled: None,
                on_failure: cfg.on_failure,
                healthy,
                lost_in_queue,
                metrics,
            };
            return Ok((audit, instance));
        };
        let (mut spool, committed, spool_instance) =
            Spool::open(spool_cfg).map_err(|e| anyhow::anyhow!("audit.spool.dir {}: {e}", spool_cfg.dir.display()))?;
        let instance: Arc<str> = spool_instance.into();
        let oldest = committed.segments.first().copied().unwrap_or(1);
        let last_seq = committed.last_seq;
        let last_hash = committed.last_hash.clone();
        metrics.audit_spool_bytes.set(spool.total_bytes() as i64);
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
                .spawn(move || deliver_loop(reader, cursor, sink, format, sh, (d, ps), a, sm))?;
            threads.push(SinkThread { name, delivered, persisted, abandon, _handle: handle });
        }
        // Segments no sink reads any more (sinks removed from the config) are collected now.
        let oldest_in_use = in_use.iter().map(|a| a.load(Ordering::Acquire)).min().unwrap_or(u64::MAX);
        let segments = spool.collect(oldest_in_use);
        shared.state.lock().unwrap_or_else(|p| p.into_inner()).segments = segments;
        let lags = threads.iter().map(|t| (t.delivered.clone(), metrics.audit_sinks.sink(&t.name))).collect();
        let inline = matches!(spool_cfg.fsync, FsyncPolicy::Every(_));
        let w = SpoolWriter {
            spool,
            lags,
            shared: shared.clone(),
            in_use,
            instance: instance.clone(),
            seq: last_seq,
            fsync: spool_cfg.fsync,
            on_failure: cfg.on_failure,
            healthy: healthy.clone(),
            lost_in_queue: lost_in_queue.clone(),
            metrics: metrics.clone(),
            gap: None,
            backlog: Vec::new(),
            full: false,
            prev: last_hash,
            checkpoints,
            inline_batch: Vec::with_capacity(64),
            inline_buf: Vec::with_capacity(4096),
        };
        let writer = Arc::new(Mutex::new(w));
        let wr = writer.clone();
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || SpoolWriter::run(wr, rx))?;
        let spooled = Spooled { shared, sinks: threads, writer, inline };
        let audit = Audit {
            tx,
            direct: None,
            spooled: Some(spooled),
            on_failure: cfg.on_failure,
            healthy,
            lost_in_queue,
            metrics,
        };
        Ok((audit, instance))
    }

    /// Queues an event that nothing waits for (close events). Its order among all events is
    /// the order of calls.
    pub fn emit(&self, event: Event) {
        if let Some(d) = &self.direct {
            d.append(event);
            return;
        }
        if let Some(sp) = self.spooled.as_ref().filter(|sp| sp.inline) {
            sp.append_now(event, false);
            return;
        }
        match self.tx.try_send(Msg::Event(Box::new(event), None)) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(m)) => {
                // The writer is behind (slow disk): wait for room rather than lose the event.
                let _ = self.tx.send(m);
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {}
        }
    }

    /// Queues a decision event and waits until it is committed. `Err` means the request must be
    /// refused (`failClosed` and the event could not be committed).
    pub async fn commit(&self, event: Event) -> Result<(), AuditUnavailable> {
        let Some(sp) = &self.spooled else {
            self.emit(event);
            return Ok(());
        };
        if sp.inline {
            return if sp.append_now(event, true) { Ok(()) } else { Err(AuditUnavailable) };
        }
        failpoint!("audit::queue_full", |_| self.failed());
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.tx.try_send(Msg::Event(Box::new(event), Some(tx))) {
            Ok(()) => {}
            Err(_) => return self.failed(),
        }
        match rx.await {
            Ok(true) => Ok(()),
            _ => Err(AuditUnavailable),
        }
    }

    fn failed(&self) -> Result<(), AuditUnavailable> {
        self.metrics.audit_dropped.inc();
        match self.on_failure {
            OnFailure::FailClosed => Err(AuditUnavailable),
            OnFailure::FailOpen => {
                self.lost_in_queue.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// False while events cannot be committed and `onFailure` is `failClosed` (readiness).
    pub fn is_available(&self) -> bool {
        self.on_failure == OnFailure::FailOpen || self.healthy.load(Ordering::Relaxed)
    }

    /// Waits until every event queued so far is written (no spool) or committed (spool) and
    /// returns the sequence number of the last one.
    pub fn flush(&self) -> u64 {
        if let Some(d) = &self.direct {
            return d.flush();
        }
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            return rx.recv().unwrap_or(0);
        }
        0
    }

    /// At shutdown: commits everything queued, then lets every sink deliver it, for at most
    /// `within`. What a sink could not deliver stays in the spool for the next start.
    pub fn close(&self, within: Duration) {
        let last = self.flush();
        let Some(sp) = &self.spooled else { return };
        if let Err(e) = sp.writer().spool.sync() {
            tracing::error!(error = %e, "audit spool fsync failed");
        }
        {
            let mut st = sp.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            st.closing = true;
        }
        sp.shared.cond.notify_all();
        let deadline = Instant::now() + within;
        for s in &sp.sinks {
            // Delivered and its cursor saved (the delivery thread saves it when it sees `closing`
            // with nothing left to read).
            while s.persisted.load(Ordering::Acquire) < last && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let behind = last.saturating_sub(s.delivered.load(Ordering::Acquire));
            if behind > 0 {
                tracing::warn!(sink = %s.name, undelivered = behind, "audit sink did not catch up before shutdown; the events stay in the spool");
            }
            s.abandon.store(true, Ordering::Release);
        }
    }

    /// Sequence number of the last event each sink delivered (spool only), by sink name.
    pub fn delivered(&self) -> Vec<(String, u64)> {
        self.spooled
            .as_ref()
            .map(|sp| sp.sinks.iter().map(|s| (s.name.clone(), s.delivered.load(Ordering::Acquire))).collect())
            .unwrap_or_default()
    }
}

/// Serialises an event with its sequence number, id, instance and place in the hash chain
/// (`prev` is the previous event's hash and becomes this one's) into `out` (one JSON line).
fn write_line(out: &mut Vec<u8>, ev: &mut Event, seq: u64, instance: &Arc<str>, prev: &mut String) {
    ev.seq = seq;
    ev.id = uuid::Uuid::now_v7().to_string();
    ev.instance = instance.clone();
    ev.prev_hash = Some(std::mem::take(prev));
    ev.hash = None;
    let start = out.len();
    if serde_json::to_writer(&mut *out, &*ev).is_err() {
        out.truncate(start);
        return;
    }
    // The compact serialisation is the canonical form (members declared in order), unless a
    // label name is outside ASCII (byte order and UTF-16 order may then differ).
    let ascii_labels = ev.client.labels.as_ref().is_none_or(|l| l.keys().all(|k| k.is_ascii()));
    let hash = if ascii_labels { chain::sha256_hex(&out[start..]) } else { chain::hash_of(&*ev) };
    debug_assert_eq!(hash, chain::hash_of(&*ev), "Event members are not in canonical order");
    // `{...}` -> `{...,"hash":"<hex>"}`: `hash` is the last member of the line.
    out.pop();
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
    *prev = hash;
}

/// Chains and writes an event built as JSON (`audit_gap`, `checkpoint`); a checkpoint is signed.
fn write_value(out: &mut Vec<u8>, mut v: serde_json::Value, prev: &mut String, signer: Option<&chain::Signer>) {
    v["prev_hash"] = serde_json::Value::String(std::mem::take(prev));
    let hash = chain::hash_of_value(&v);
    if let Some(s) = signer {
        v["checkpoint"]["signature"] = serde_json::Value::String(s.sign(&hash));
    }
    v["hash"] = serde_json::Value::String(hash.clone());
    *prev = hash;
    if serde_json::to_writer(&mut *out, &v).is_ok() {
        out.push(b'\n');
    }
}

/// When checkpoints are due.
struct Checkpoints {
    signer: Arc<chain::Signer>,
    every: u64,
    interval: Duration,
    /// Events written since the last checkpoint.
    since: u64,
    last: Instant,
}

impl Checkpoints {
    fn new(cfg: &Option<crate::config::CheckpointConfig>) -> anyhow::Result<Option<Checkpoints>> {
        let Some(c) = cfg else { return Ok(None) };
        let signer = chain::Signer::load(&c.key_file).map_err(|e| anyhow::anyhow!("audit.checkpoint.keyFile: {e}"))?;
        Ok(Some(Checkpoints {
            signer: Arc::new(signer),
            every: c.every,
            interval: c.interval,
            since: 0,
            last: Instant::now(),
        }))
    }

    /// Due after `pending` more events?
    fn due(&self, pending: u64) -> bool {
        let n = self.since + pending;
        n >= self.every || (n > 0 && self.last.elapsed() >= self.interval)
    }

    /// Writes the checkpoint event `seq` (signed, chained on `prev`) and starts counting again.
    fn write(&mut self, out: &mut Vec<u8>, seq: u64, instance: &str, prev: &mut String) {
        write_value(out, self.event(seq, instance, self.since), prev, Some(&self.signer));
        self.since = 0;
        self.last = Instant::now();
    }

    /// The checkpoint event (`seq`), covering every event up to `seq - 1`.
    fn event(&self, seq: u64, instance: &str, events: u64) -> serde_json::Value {
        serde_json::json!({
            "schema": "egress.v1",
            "event": "checkpoint",
            "id": uuid::Uuid::now_v7().to_string(),
            "seq": seq,
            "time": now_rfc3339(),
            "instance": instance,
            "checkpoint": {"key_id": self.signer.key_id, "covers_to_seq": seq - 1, "events": events},
        })
    }
}

/// The audit log without a spool: callers serialise into `buf`, the writer thread writes it out.
struct Direct {
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

    fn lock(&self) -> MutexGuard<'_, DirectState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers, chains and serialises `event` on the calling thread; its order among all events
    /// is the order of calls.
    fn append(&self, mut event: Event) {
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
    fn flush(&self) -> u64 {
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
    fn run(&self, mut sinks: Vec<(sink::Sink, AuditFormat)>) {
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

/// Most events written in one append (one group commit).
const BATCH: usize = 4096;
/// Close events kept in memory while the spool refuses them (`failClosed`); beyond, counted lost.
const BACKLOG: usize = 100_000;

struct SpoolWriter {
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
    inline_batch: Vec<(Box<Event>, Option<tokio::sync::oneshot::Sender<bool>>)>,
    inline_buf: Vec<u8>,
}

impl SpoolWriter {
    /// Commits the events callers queued (`inline_batch`).
    fn commit_inline(&mut self) {
        let mut batch = std::mem::take(&mut self.inline_batch);
        let mut buf = std::mem::take(&mut self.inline_buf);
        self.commit(&mut batch, &mut buf);
        batch.clear();
        (self.inline_batch, self.inline_buf) = (batch, buf);
    }

    /// The writer thread: group commits of queued events (`fsync: always`; with a period, callers
    /// append themselves and the queue carries only flush requests), fsync every period,
    /// checkpoints by time, gap events, retries of the backlog, recovery probes, segment collection.
    fn run(writer: Arc<Mutex<SpoolWriter>>, rx: mpsc::Receiver<Msg>) {
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
        "time": now_rfc3339(),
        "instance": instance,
        "gap": {"from_seq": from, "to_seq": to, "lost": to - from + 1},
    })
}

/// One sink's delivery thread: reads committed lines from its cursor, delivers them, and moves
/// the cursor only after the sink accepted them (at least once, in order).
#[allow(clippy::too_many_arguments)]
fn deliver_loop(
    mut reader: Reader,
    mut cursor: Cursor,
    mut sink: sink::Sink,
    format: AuditFormat,
    shared: Arc<Shared>,
    (delivered, persisted): (Arc<AtomicU64>, Arc<AtomicU64>),
    abandon: Arc<AtomicBool>,
    m: SinkMetrics,
) {
    let ctx = format::Context::local();
    let mut buf = Vec::with_capacity(1 << 20);
    let mut mapped = Vec::new();
    let mut pos = cursor.pos;
    let mut dead_seen = 0;
    let mut last_saved = Instant::now();
    let mut unsaved = false;
    let save = |cursor: &Cursor, sink: &sink::Sink| match cursor.save() {
        Ok(()) => persisted.store(cursor.seq, Ordering::Release),
        Err(e) => {
            tracing::warn!(sink = %sink.name(), error = %e, "audit cursor not saved; events may be delivered again")
        }
    };
    loop {
        if abandon.load(Ordering::Acquire) {
            return;
        }
        match reader.read(&mut pos, &mut buf, 1 << 20, Duration::from_millis(500)) {
            Ok(ReadResult::Lines(mut end)) => {
                // Gather a fuller batch: up to the HTTP sink's bounds, or for local sinks a few
                // milliseconds' worth (fewer, larger writes under load).
                const LOCAL_BATCH: (usize, usize, Duration) = (100_000, 1 << 20, Duration::from_millis(5));
                {
                    let remote = sink.batching();
                    let (max_events, max_bytes, max_age) = remote.unwrap_or(LOCAL_BATCH);
                    let started = Instant::now();
                    let mut more = Vec::new();
                    while buf.iter().filter(|b| **b == b'\n').count() < max_events
                        && buf.len() < max_bytes
                        && started.elapsed() < max_age
                    {
                        let left = max_age.saturating_sub(started.elapsed());
                        // A local sink sleeps through its few milliseconds instead of waking at
                        // every commit; an HTTP sink wakes as events come, to send a full batch
                        // as soon as it is full.
                        let wait = if remote.is_some() {
                            left
                        } else {
                            std::thread::sleep(left);
                            Duration::ZERO
                        };
                        match reader.read(&mut pos, &mut more, max_bytes.saturating_sub(buf.len()).max(8192), wait) {
                            Ok(ReadResult::Lines(e)) => {
                                buf.extend_from_slice(&more);
                                end = e;
                            }
                            _ => break,
                        }
                    }
                }
                let last = buf[..buf.len() - 1].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                let last_seq = spool::line_seq(&buf[last..]).unwrap_or(cursor.seq);
                let lines = buf.iter().filter(|b| **b == b'\n').count() as u64;
                let bytes = if format == AuditFormat::Json {
                    &buf
                } else {
                    mapped.clear();
                    format::render(format, &ctx, &buf, &mut mapped);
                    &mapped
                };
                let mut backoff = Duration::from_millis(50);
                let mut attempt = 0u32;
                loop {
                    let r = sink.write(bytes, &buf).and_then(|()| sink.flush());
                    match r {
                        Ok(()) => break,
                        Err(e) => {
                            m.failed.inc();
                            if attempt == 0 {
                                tracing::error!(sink = %sink.name(), error = %e, "audit delivery failed; retrying");
                            }
                            attempt += 1;
                            m.retried.inc();
                            m.oldest_age.set(age_of(&buf));
                            if abandon.load(Ordering::Acquire) {
                                return;
                            }
                            // Exponential backoff with jitter (50-150 %), never sooner than the
                            // receiver's Retry-After.
                            let pause = jitter(backoff).max(http::retry_after_of(&e).unwrap_or_default());
                            std::thread::sleep(pause);
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                cursor.pos = end;
                cursor.seq = last_seq;
                // The cursor file is rewritten at most every 100 ms under load (and when idle or
                // stopping): after a crash a sink may get up to that much again, never less.
                if last_saved.elapsed() >= Duration::from_millis(100) {
                    save(&cursor, &sink);
                    last_saved = Instant::now();
                    unsaved = false;
                } else {
                    unsaved = true;
                }
                delivered.store(last_seq, Ordering::Release);
                m.delivered.inc_by(lines);
                let dead = sink.dead_lettered();
                if dead > dead_seen {
                    m.dead_lettered.inc_by(dead - dead_seen);
                    dead_seen = dead;
                }
                m.last_success.set(unix_now() as i64);
                let committed = shared.state.lock().unwrap_or_else(|p| p.into_inner()).last_seq;
                m.lag.set(committed.saturating_sub(last_seq) as i64);
                m.oldest_age.set(0);
            }
            Ok(ReadResult::Idle) => {
                if unsaved {
                    save(&cursor, &sink);
                    last_saved = Instant::now();
                    unsaved = false;
                }
                let committed = shared.state.lock().unwrap_or_else(|p| p.into_inner()).last_seq;
                m.lag.set(committed.saturating_sub(cursor.seq) as i64);
            }
            Ok(ReadResult::Closed) => {
                if unsaved {
                    save(&cursor, &sink);
                }
                return;
            }
            Err(e) => {
                m.failed.inc();
                tracing::error!(sink = %sink.name(), error = %e, "audit spool read failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
                pos = cursor.pos;
            }
        }
    }
}

/// `d` scaled by a pseudo-random factor in [0.5, 1.5), so that many gateways retrying the same
/// receiver spread out.
fn jitter(d: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    let x = (nanos ^ (nanos >> 13)).wrapping_mul(0x9E37_79B9) as u64 % 1000;
    d.mul_f64(0.5 + x as f64 / 1000.0)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Seconds since the `time` of the first line in `lines`.
fn age_of(lines: &[u8]) -> i64 {
    // The first line; its top-level `time` is its last `"time":` (members are sorted, and no
    // member after it has a `time` of its own).
    let first = &lines[..lines.iter().position(|b| *b == b'\n').unwrap_or(lines.len())];
    const KEY: &[u8] = b"\"time\":\"";
    let Some(at) = first.windows(KEY.len()).rposition(|w| w == KEY).map(|i| i + KEY.len()) else { return 0 };
    let lines = first;
    let Some(len) = lines[at..].iter().position(|b| *b == b'"') else { return 0 };
    let Ok(s) = std::str::from_utf8(&lines[at..at + len]) else { return 0 };
    match humantime::parse_rfc3339(s) {
        Ok(t) => std::time::SystemTime::now().duration_since(t).map(|d| d.as_secs() as i64).unwrap_or(0),
        Err(_) => 0,
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
