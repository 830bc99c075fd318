//! Delivery from the spool: one thread per sink reads committed lines from its own persisted
//! cursor, renders them in the sink's format, delivers them (retrying with backoff and jitter)
//! and moves the cursor only once the sink has them: at least once, in sequence order, and
//! after a restart (also `kill -9`) from where it stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::spool::{self, Cursor, ReadResult, Reader, Shared};
use super::{format, http, sink};
use crate::config::AuditFormat;
use crate::metrics::SinkMetrics;

/// One sink's delivery thread: reads committed lines from its cursor, delivers them, and moves
/// the cursor only after the sink accepted them (at least once, in order).
#[allow(clippy::too_many_arguments)]
pub(super) fn deliver_loop(
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
