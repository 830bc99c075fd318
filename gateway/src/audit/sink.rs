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
            Ok(Sink::File(path.display().to_string(), BufWriter::with_capacity(64 * 1024, f)))
        }
    }
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
