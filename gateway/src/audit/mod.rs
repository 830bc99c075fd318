//! Audit events (`schema: egress.v1`), the spool they are committed to, and their sinks.
//!
//! Events are built by the pipeline (never by a front) and written in one of three modes
//! ([`Writer`], one file each): without a spool ([`direct`]), or with one ([`spooled`], the
//! writer both share), committed by group commit (`fsync: always`, [`group_commit`]) or appended
//! by the calling request (`fsync: <period>`, [`inline`]). Every event gets its per-instance sequence number, id and place in the hash
//! chain ([`chain`]) when it is written, and is serialised once; every sink renders those lines
//! in its format ([`format`]). With a spool, one thread per sink delivers from its own cursor
//! ([`deliver`]).

pub mod chain;
mod checkpoint;
mod deliver;
mod direct;
mod event;
pub(crate) mod format;
mod group_commit;
pub(crate) mod http;
mod inline;
mod json;
mod sink;
mod spool;
mod spooled;
pub(crate) mod syslog;
mod tls;

pub use event::{ClientInfo, CloseInfo, DecisionInfo, End, Event, EventKind, ResolvedAddr, TargetInfo, Timestamp};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::config::{AuditConfig, FsyncPolicy, OnFailure};
use crate::metrics::Metrics;
use checkpoint::Checkpoints;
use direct::Direct;
use spooled::Spooled;

/// Messages to the writer thread of a spool.
enum Msg {
    /// A decision event, and whom to tell when it is committed.
    Event(Box<Event>, Option<tokio::sync::oneshot::Sender<bool>>),
    /// Answered once everything queued before it is committed.
    Flush(mpsc::Sender<u64>),
}

/// Bound of the queue to the writer: beyond it an event cannot be committed in time.
const QUEUE: usize = 16 * 1024;

/// How events are written: the three modes.
enum Writer {
    /// No spool: callers hand events over; a thread serialises them and writes to the sinks.
    Direct(Arc<Direct>),
    /// Spool with `fsync: always`: the writer thread appends and fsyncs queued decisions in
    /// batches.
    GroupCommit(Spooled),
    /// Spool with `fsync: <period>`: each request appends its own event; the writer thread
    /// fsyncs every period.
    Inline(Spooled),
}

/// The audit log handle. Cheap to share.
pub struct Audit {
    writer: Writer,
    on_failure: OnFailure,
    /// False while events cannot be committed.
    healthy: Arc<AtomicBool>,
    /// Events dropped before they reached the spool (queue full under `failOpen`, close events
    /// beyond the hand-over bound), numbered in the next `audit_gap`.
    lost_in_queue: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

/// The event could not be committed and `audit.onFailure` is `failClosed`: refuse the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditUnavailable;

/// A decision event handed to [`Audit::commit`]: resolves once it is committed.
#[must_use = "the event may not be committed yet: await it"]
pub struct Commit(CommitState);

enum CommitState {
    /// Decided at the call (no spool, `fsync: always`, or the queue refused it).
    Done(Option<Result<(), AuditUnavailable>>),
    /// Queued for the group commit: the writer answers once it is on disk.
    Waiting(tokio::sync::oneshot::Receiver<bool>),
}

impl Commit {
    fn done(r: Result<(), AuditUnavailable>) -> Commit {
        Commit(CommitState::Done(Some(r)))
    }
}

impl std::future::Future for Commit {
    type Output = Result<(), AuditUnavailable>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            CommitState::Done(r) => std::task::Poll::Ready(r.take().expect("Commit polled after completion")),
            CommitState::Waiting(rx) => std::pin::Pin::new(rx).poll(cx).map(|r| match r {
                Ok(true) => Ok(()),
                _ => Err(AuditUnavailable),
            }),
        }
    }
}

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
        let healthy = Arc::new(AtomicBool::new(true));
        let lost_in_queue = Arc::new(AtomicU64::new(0));
        let Some(spool_cfg) = &cfg.spool else {
            let sinks = opened.into_iter().zip(&cfg.sinks).map(|((_, s), c)| (s, c.format())).collect();
            let direct = Arc::new(Direct::new(instance.clone(), metrics.clone()));
            let d = direct.clone();
            // Detached: it ends with the process; `close` makes sure everything queued is written first.
            std::thread::Builder::new().name("audit-writer".into()).spawn(move || d.run(sinks, checkpoints))?;
            let audit =
                Audit { writer: Writer::Direct(direct), on_failure: cfg.on_failure, healthy, lost_in_queue, metrics };
            return Ok((audit, instance));
        };
        let (spooled, instance) =
            Spooled::start(cfg, spool_cfg, opened, checkpoints, (healthy.clone(), lost_in_queue.clone()), &metrics)?;
        let inline = matches!(spool_cfg.fsync, FsyncPolicy::Every(_));
        let writer = if inline { Writer::Inline(spooled) } else { Writer::GroupCommit(spooled) };
        Ok((Audit { writer, on_failure: cfg.on_failure, healthy, lost_in_queue, metrics }, instance))
    }

    /// Writes an event that nothing waits for (close events), without blocking: its order
    /// among all events is the order of calls, except that under `fsync: always` it may be
    /// written after decisions queued at the same time (never before the decision of its own
    /// connection, which was committed before it was emitted).
    pub fn emit(&self, event: Box<Event>) {
        match &self.writer {
            Writer::Direct(d) => d.append(event),
            Writer::Inline(sp) => {
                sp.append_now(event, false);
            }
            Writer::GroupCommit(sp) => {
                if !sp.hand_over(event) {
                    self.metrics.audit_dropped.inc();
                    self.lost_in_queue.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Writes a decision event (handed over at the call, in the order of calls); the returned
    /// future resolves once it is committed. `Err` means the request must be refused
    /// (`failClosed` and the event could not be committed). Not an `async fn`: its future would
    /// hold the event, and it is part of every request's future.
    pub fn commit(&self, event: Box<Event>) -> Commit {
        let sp = match &self.writer {
            Writer::Direct(d) => {
                d.append(event);
                return Commit::done(Ok(()));
            }
            Writer::Inline(sp) => {
                return Commit::done(if sp.append_now(event, true) { Ok(()) } else { Err(AuditUnavailable) });
            }
            Writer::GroupCommit(sp) => sp,
        };
        failpoint!("audit::queue_full", |_| Commit::done(self.failed()));
        match sp.queue(event) {
            Some(committed) => Commit(CommitState::Waiting(committed)),
            None => Commit::done(self.failed()),
        }
    }

    fn spooled(&self) -> Option<&Spooled> {
        match &self.writer {
            Writer::Direct(_) => None,
            Writer::GroupCommit(sp) | Writer::Inline(sp) => Some(sp),
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
        let sp = match &self.writer {
            Writer::Direct(d) => return d.flush(),
            Writer::GroupCommit(sp) | Writer::Inline(sp) => sp,
        };
        let (tx, rx) = mpsc::channel();
        if sp.tx.send(Msg::Flush(tx)).is_ok() {
            return rx.recv().unwrap_or(0);
        }
        0
    }

    /// At shutdown: commits everything queued, then lets every sink deliver it, for at most
    /// `within`. What a sink could not deliver stays in the spool for the next start.
    pub fn close(&self, within: Duration) {
        let last = self.flush();
        let Some(sp) = self.spooled() else { return };
        sp.sync();
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
        self.spooled()
            .map(|sp| sp.sinks.iter().map(|s| (s.name.clone(), s.delivered.load(Ordering::Acquire))).collect())
            .unwrap_or_default()
    }
}

/// Serialises an event with its sequence number, id, instance and place in the hash chain
/// (`prev` is the previous event's hash and becomes this one's) into `out` (one JSON line).
fn write_line(out: &mut Vec<u8>, ev: &mut Event, seq: u64, instance: &Arc<str>, prev: &mut String) {
    ev.seq = seq;
    ev.id = uuid::Uuid::now_v7();
    ev.instance = instance.clone();
    ev.prev_hash = Some(std::mem::take(prev));
    ev.hash = None;
    let start = out.len();
    json::write_event(out, ev);
    // The compact serialisation is the canonical form (members declared in order), unless a
    // label name is outside ASCII (byte order and UTF-16 order may then differ).
    let ascii_labels = ev.client.labels().is_none_or(|l| l.keys().all(|k| k.is_ascii()));
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
