//! The audit spool: an append-only log of committed events on local disk, split in segments, read
//! by one delivery thread per sink from its own persisted cursor.
//!
//! Layout of `audit.spool.dir`:
//! - `instance`: the instance id of this spool's event stream (kept across restarts, so that
//!   `(instance, seq)` stays one gap-free sequence);
//! - `<first seq, 20 digits>.jsonl`: segments of egress.v1 JSON lines, in sequence order;
//! - `cursors/<sink>`: `<segment> <offset> <last seq>` of what the sink has delivered.
//!
//! Only the writer (behind its lock) appends; sink threads read segments through their own file handles.
//! A segment is deleted once every sink's cursor has moved past it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::SpoolConfig;

/// Where a reader is: a segment (by its first sequence number) and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// What has been committed, shared between the writer and the sink threads.
#[derive(Debug, Default)]
pub(super) struct Committed {
    /// Sequence number of the last committed event.
    pub last_seq: u64,
    /// Its hash (the chain goes on from it).
    pub last_hash: String,
    /// End of the committed data.
    pub end: Position,
    /// First sequence numbers of the segments on disk, ascending.
    pub segments: Vec<u64>,
    /// Set at shutdown: readers deliver what is committed and stop.
    pub closing: bool,
    /// Readers waiting on the condition variable (the writer wakes them only when there are).
    pub waiting: usize,
}

/// The committed state and a condition variable readers wait on.
#[derive(Default)]
pub(super) struct Shared {
    pub state: Mutex<Committed>,
    pub cond: Condvar,
}

/// The writer's side of the spool.
pub(super) struct Spool {
    dir: PathBuf,
    segment_bytes: u64,
    max_bytes: u64,
    /// The current segment; shared so that a periodic fsync can run outside the writer's lock.
    file: Arc<File>,
    current: u64,
    len: u64,
    /// first seq -> size in bytes, every segment on disk (the current one included).
    sizes: BTreeMap<u64, u64>,
    total: u64,
    unsynced: bool,
}

/// Why an append was refused.
#[derive(Debug)]
pub(super) enum AppendError {
    /// The spool would exceed `maxBytes`.
    Full,
    /// The write failed.
    Io(io::Error),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::Full => f.write_str("audit spool full (audit.spool.maxBytes)"),
            AppendError::Io(e) => write!(f, "audit spool write failed: {e}"),
        }
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.jsonl"))
}

/// The top-level `"seq":N` of an egress.v1 line: its last `"seq":` (members are in sorted order
/// and none after `seq` has a `seq` member; a string value cannot contain `"seq":` unescaped).
pub(super) fn line_seq(line: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"seq\":";
    let at = line.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[at..at + digits]).ok()?.parse().ok()
}

impl Spool {
    /// Opens (or creates) the spool: finds the segments, cuts a torn last line (a crash in the
    /// middle of a write), and returns the spool, the committed state and the instance id.
    pub(super) fn open(cfg: &SpoolConfig) -> io::Result<(Spool, Committed, String)> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(dir.join("cursors"))?;
        let instance_file = dir.join("instance");
        let instance = match fs::read_to_string(&instance_file) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                write_atomically(&instance_file, id.as_bytes())?;
                id
            }
        };
        let mut sizes = BTreeMap::new();
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name.strip_suffix(".jsonl").and_then(|n| n.parse::<u64>().ok()) {
                sizes.insert(first, e.metadata()?.len());
            }
        }
        let mut last_seq = 0;
        let mut last_hash = super::chain::GENESIS.to_string();
        if let Some((&first, _)) = sizes.iter().next_back() {
            let path = segment_path(&dir, first);
            let mut data = Vec::new();
            File::open(&path)?.read_to_end(&mut data)?;
            let keep = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if keep < data.len() {
                tracing::warn!(segment = %path.display(), cut = data.len() - keep, "audit spool: cutting a torn last line");
                OpenOptions::new().write(true).open(&path)?.set_len(keep as u64)?;
                sizes.insert(first, keep as u64);
            }
            let lines = &data[..keep];
            let last_line = match lines[..lines.len().saturating_sub(1)].iter().rposition(|b| *b == b'\n') {
                Some(i) => &lines[i + 1..],
                None => lines,
            };
            last_seq = line_seq(last_line).unwrap_or(first.saturating_sub(1));
            last_hash = serde_json::from_slice::<serde_json::Value>(last_line)
                .ok()
                .and_then(|v| v["hash"].as_str().map(str::to_string))
                .unwrap_or(last_hash);
        }
        let current = match sizes.iter().next_back() {
            Some((&first, _)) => first,
            None => {
                sizes.insert(last_seq + 1, 0);
                last_seq + 1
            }
        };
        let path = segment_path(&dir, current);
        let file = OpenOptions::new().create(true).append(true).mode(0o640).open(&path)?;
        sync_dir(&dir)?;
        let len = sizes[&current];
        let total = sizes.values().sum();
        let committed = Committed {
            last_seq,
            last_hash,
            end: Position { segment: current, offset: len },
            segments: sizes.keys().copied().collect(),
            closing: false,
            waiting: 0,
        };
        let spool = Spool {
            dir,
            segment_bytes: cfg.segment_bytes,
            max_bytes: cfg.max_bytes,
            file: Arc::new(file),
            current,
            len,
            sizes,
            total,
            unsynced: false,
        };
        Ok((spool, committed, instance))
    }

    /// Bytes on disk.
    pub(super) fn total_bytes(&self) -> u64 {
        self.total
    }

    /// The bound.
    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Appends whole lines whose first event has sequence number `first_seq`; starts a new segment
    /// first when the current one is full. Nothing is written when it fails.
    pub(super) fn append(&mut self, data: &[u8], first_seq: u64) -> Result<Position, AppendError> {
        if self.total + data.len() as u64 > self.max_bytes {
            return Err(AppendError::Full);
        }
        if self.len > 0 && self.len + data.len() as u64 > self.segment_bytes {
            self.rotate(first_seq).map_err(AppendError::Io)?;
        }
        if let Err(e) = (&*self.file).write_all(data) {
            // A partial write would leave a torn line in the middle of the log: cut it off.
            let _ = self.file.set_len(self.len);
            return Err(AppendError::Io(e));
        }
        self.len += data.len() as u64;
        self.total += data.len() as u64;
        *self.sizes.get_mut(&self.current).expect("current segment") = self.len;
        self.unsynced = true;
        Ok(Position { segment: self.current, offset: self.len })
    }

    fn rotate(&mut self, first_seq: u64) -> io::Result<()> {
        self.file.sync_data()?;
        let path = segment_path(&self.dir, first_seq);
        self.file = Arc::new(OpenOptions::new().create(true).append(true).mode(0o640).open(&path)?);
        sync_dir(&self.dir)?;
        self.current = first_seq;
        self.len = 0;
        self.sizes.insert(first_seq, 0);
        Ok(())
    }

    /// Whether an append could succeed now, for the recovery probe after an I/O error: a file can
    /// be created, written and flushed in the spool directory (a full disk, a read-only remount
    /// and a process out of file descriptors all fail it) and the current segment flushes.
    pub(super) fn probe(&mut self) -> io::Result<()> {
        let path = self.dir.join("probe.tmp");
        let f = OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&path)?;
        (&f).write_all(b"\n")?;
        f.sync_data()?;
        drop(f);
        fs::remove_file(&path)?;
        self.sync()
    }

    /// Flushes written data to stable storage.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// The current segment when it has data not yet flushed to stable storage, for a
    /// `sync_data` that does not hold up appends (earlier segments were synced when rotated).
    pub(super) fn take_unsynced(&mut self) -> Option<Arc<File>> {
        std::mem::take(&mut self.unsynced).then(|| self.file.clone())
    }

    /// Deletes every segment older than the oldest one a sink still reads. Returns the segments
    /// left.
    pub(super) fn collect(&mut self, oldest_in_use: u64) -> Vec<u64> {
        let old: Vec<u64> = self.sizes.range(..oldest_in_use).map(|(k, _)| *k).filter(|k| *k != self.current).collect();
        for first in old {
            match fs::remove_file(segment_path(&self.dir, first)) {
                Ok(()) => {
                    self.total -= self.sizes.remove(&first).unwrap_or(0);
                }
                Err(e) => tracing::warn!(segment = first, error = %e, "audit spool: cannot delete a delivered segment"),
            }
        }
        self.sizes.keys().copied().collect()
    }

    /// The directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().create(true).write(true).truncate(true).mode(0o640).open(&tmp)?;
        f.write_all(data)?;
    }
    fs::rename(&tmp, path)
}

/// A sink's persisted delivery cursor.
pub(super) struct Cursor {
    path: PathBuf,
    /// Where the next undelivered line starts.
    pub pos: Position,
    /// Sequence number of the last delivered event.
    pub seq: u64,
}

impl Cursor {
    /// Loads the cursor of `sink`; a sink without one starts at the oldest segment.
    pub(super) fn load(dir: &Path, sink: &str, oldest_segment: u64) -> Cursor {
        let path = dir.join("cursors").join(sink);
        let parsed = fs::read_to_string(&path).ok().and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>());
            match (it.next(), it.next(), it.next()) {
                (Some(Ok(segment)), Some(Ok(offset)), Some(Ok(seq))) => Some((Position { segment, offset }, seq)),
                _ => None,
            }
        });
        match parsed {
            // A cursor in a segment that was collected (cannot happen unless edited by hand):
            // restart from the oldest segment; duplicates are allowed, losses are not.
            Some((pos, seq)) if pos.segment >= oldest_segment => Cursor { path, pos, seq },
            _ => Cursor { path, pos: Position { segment: oldest_segment, offset: 0 }, seq: 0 },
        }
    }

    /// Persists the cursor (write and rename: never half-written). Not fsynced: after a power
    /// failure a sink may deliver some events again, never skip one.
    pub(super) fn save(&self) -> io::Result<()> {
        write_atomically(&self.path, format!("{} {} {}\n", self.pos.segment, self.pos.offset, self.seq).as_bytes())
    }
}

/// Reads committed lines for one sink, in order, across segments.
pub(super) struct Reader {
    dir: PathBuf,
    shared: Arc<Shared>,
    file: Option<(u64, File)>,
    /// The segment this reader is in (the writer never collects it).
    pub in_use: Arc<AtomicU64>,
}

/// What a read returned.
pub(super) enum ReadResult {
    /// Whole lines, ending at this position.
    Lines(Position),
    /// Nothing new within the wait.
    Idle,
    /// Shutting down and everything committed has been read.
    Closed,
}

impl Reader {
    pub(super) fn new(dir: PathBuf, shared: Arc<Shared>, start: Position) -> Reader {
        Reader { dir, shared, file: None, in_use: Arc::new(AtomicU64::new(start.segment)) }
    }

    /// Reads up to `max` bytes of whole committed lines from `pos` into `buf` (cleared first),
    /// waiting up to `wait` for new data.
    pub(super) fn read(
        &mut self,
        pos: &mut Position,
        buf: &mut Vec<u8>,
        max: usize,
        wait: Duration,
    ) -> io::Result<ReadResult> {
        buf.clear();
        loop {
            let (limit, next) = {
                let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let limit = if st.end.segment == pos.segment { st.end.offset } else { u64::MAX };
                    let next = st.segments.iter().copied().find(|s| *s > pos.segment);
                    if limit > pos.offset || next.is_some() {
                        break (limit, next);
                    }
                    if st.closing {
                        return Ok(ReadResult::Closed);
                    }
                    st.waiting += 1;
                    let (g, t) = self.shared.cond.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner());
                    st = g;
                    st.waiting -= 1;
                    if t.timed_out() {
                        let limit = if st.end.segment == pos.segment { st.end.offset } else { u64::MAX };
                        let next = st.segments.iter().copied().find(|s| *s > pos.segment);
                        if limit > pos.offset || next.is_some() {
                            break (limit, next);
                        }
                        return Ok(ReadResult::Idle);
                    }
                }
            };
            if self.file.as_ref().map(|(s, _)| *s) != Some(pos.segment) {
                let f = File::open(segment_path(&self.dir, pos.segment))?;
                self.file = Some((pos.segment, f));
            }
            let (_, f) = self.file.as_mut().expect("opened");
            f.seek(SeekFrom::Start(pos.offset))?;
            let want = (limit - pos.offset).min(max as u64) as usize;
            buf.resize(want, 0);
            let mut got = 0;
            while got < want {
                match f.read(&mut buf[got..])? {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if whole == 0 && got == max {
                return Err(io::Error::other("audit spool: a line longer than the read buffer"));
            }
            buf.truncate(whole);
            if whole > 0 {
                pos.offset += whole as u64;
                return Ok(ReadResult::Lines(*pos));
            }
            // The end of a finished segment: go on with the next one.
            match next {
                Some(n) if limit == u64::MAX => {
                    *pos = Position { segment: n, offset: 0 };
                    self.in_use.store(n, Ordering::Release);
                    self.file = None;
                }
                _ => return Ok(ReadResult::Idle),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FsyncPolicy, SpoolConfig};

    /// The recovery probe tests what an append needs (a file created and written in the spool
    /// directory), not only a flush of the open segment, which still succeeds when nothing new
    /// can be opened.
    #[test]
    fn rejects_an_unwritable_spool_in_the_probe() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let cfg = SpoolConfig { dir: dir.clone(), max_bytes: 1 << 20, segment_bytes: 4096, fsync: FsyncPolicy::Always };
        let (mut spool, _, _) = Spool::open(&cfg).unwrap();
        spool.append(b"{\"seq\":1}\n", 1).unwrap();
        assert!(spool.probe().is_ok());
        assert!(!dir.join("probe.tmp").exists(), "the probe leaves nothing behind");
        // The directory is gone (a volume unmounted underneath): the open segment still flushes,
        // but the probe fails.
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(spool.sync().is_ok());
        assert!(spool.probe().is_err());
    }
}
