//! Audit events (`schema: egress.v1`) and their sinks.
//!
//! Events are built by the pipeline (never by a front) and handed to one writer thread through
//! an unbounded queue, so a slow sink never stalls the data path and no event is dropped. The
//! writer assigns the per-instance sequence number and the event id, serialises once, and writes
//! to every sink, flushing whenever the queue is empty (group commit).

mod event;
mod sink;

pub use event::{ClientInfo, CloseInfo, DecisionInfo, End, Event, EventKind, ResolvedAddr, TargetInfo, now_rfc3339};

use std::sync::Arc;
use std::sync::mpsc;

use crate::config::SinkConfig;
use crate::metrics::Metrics;

enum Msg {
    Event(Box<Event>),
    Flush(mpsc::Sender<()>),
}

/// The audit log handle. Cheap to share; emitting never blocks.
pub struct Audit {
    tx: mpsc::Sender<Msg>,
}

impl Audit {
    /// Opens every sink (errors name the sink) and starts the writer thread.
    pub fn start(sinks: &[SinkConfig], instance: Arc<str>, metrics: Arc<Metrics>) -> anyhow::Result<Audit> {
        let mut opened = Vec::new();
        for (i, s) in sinks.iter().enumerate() {
            opened.push(sink::open(s).map_err(|e| anyhow::anyhow!("audit.sinks[{i}]: {e}"))?);
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        // Detached: it ends with the process; `close` makes sure everything queued is written first.
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer_loop(rx, opened, instance, metrics))?;
        Ok(Audit { tx })
    }

    /// Queues an event. Never blocks; order of calls is the order of sequence numbers.
    pub fn emit(&self, event: Event) {
        // The receiver lives as long as the writer thread, which lives as long as the process.
        let _ = self.tx.send(Msg::Event(Box::new(event)));
    }

    /// Waits until every event queued so far is written and flushed.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Writes and flushes everything queued (at shutdown).
    pub fn close(&self) {
        self.flush();
    }
}

fn writer_loop(rx: mpsc::Receiver<Msg>, mut sinks: Vec<sink::Sink>, instance: Arc<str>, metrics: Arc<Metrics>) {
    let mut seq: u64 = 0;
    let mut line = Vec::with_capacity(2048);
    let mut msg = rx.recv();
    while let Ok(m) = msg {
        match m {
            Msg::Event(mut ev) => {
                seq += 1;
                ev.seq = seq;
                ev.id = uuid::Uuid::now_v7().to_string();
                ev.instance = instance.clone();
                line.clear();
                if serde_json::to_writer(&mut line, &ev).is_ok() {
                    line.push(b'\n');
                    for s in sinks.iter_mut() {
                        if let Err(e) = s.write(&line) {
                            metrics.audit_errors.inc();
                            tracing::error!(sink = %s.name(), error = %e, "audit write failed");
                        }
                    }
                    metrics.audit_events.inc();
                }
            }
            Msg::Flush(done) => {
                flush_all(&mut sinks, &metrics);
                let _ = done.send(());
            }
        }
        msg = match rx.try_recv() {
            Ok(m) => Ok(m),
            Err(mpsc::TryRecvError::Empty) => {
                flush_all(&mut sinks, &metrics);
                rx.recv().map_err(|_| mpsc::TryRecvError::Disconnected)
            }
            Err(e) => Err(e),
        }
        .map_err(|_| mpsc::RecvError);
    }
    flush_all(&mut sinks, &metrics);
}

fn flush_all(sinks: &mut [sink::Sink], metrics: &Metrics) {
    for s in sinks.iter_mut() {
        if let Err(e) = s.flush() {
            metrics.audit_errors.inc();
            tracing::error!(sink = %s.name(), error = %e, "audit flush failed");
        }
    }
}
