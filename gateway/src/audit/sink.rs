//! Audit sinks: stdout and append-only files.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;

use crate::config::{SinkConfig, SinkKind};

pub(super) enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File(String, BufWriter<std::fs::File>),
}

pub(super) fn open(cfg: &SinkConfig) -> io::Result<Sink> {
    match cfg.kind {
        SinkKind::Stdout => Ok(Sink::Stdout(BufWriter::with_capacity(64 * 1024, io::stdout()))),
        SinkKind::File => {
            let path = cfg.path.as_ref().ok_or_else(|| io::Error::other("path is required"))?;
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let mut f = f;
            end_torn_line(path, &mut f).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            Ok(Sink::File(path.display().to_string(), BufWriter::with_capacity(64 * 1024, f)))
        }
    }
}

/// A crash in the middle of a write can leave a regular file ending in a partial line: end it, so
/// that the events delivered again after the restart start on a line of their own.
fn end_torn_line(path: &std::path::Path, f: &mut std::fs::File) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(());
    }
    let mut r = std::fs::File::open(path)?;
    r.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    r.read_exact(&mut last)?;
    if last[0] != b'\n' {
        f.write_all(b"\n")?;
    }
    Ok(())
}

impl Sink {
    pub(super) fn name(&self) -> &str {
        match self {
            Sink::Stdout(_) => "stdout",
            Sink::File(p, _) => p,
        }
    }

    pub(super) fn write(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(w) => w.write_all(line),
            Sink::File(_, w) => w.write_all(line),
        }
    }

    pub(super) fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(w) => w.flush(),
            Sink::File(_, w) => w.flush(),
        }
    }
}
