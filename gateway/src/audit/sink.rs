//! Audit sinks: stdout and append-only files (optionally rotated by size).

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;

use crate::config::SinkConfig;

pub(super) enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File(FileSink),
    Syslog(String, Box<super::syslog::Syslog>),
    Http(String, Box<super::http::HttpSink>),
}

/// An append-only file, rotated to `<path>.1` ... `<path>.<maxFiles>` when it would exceed
/// `maxBytes` (the oldest rotated file is deleted).
pub(super) struct FileSink {
    name: String,
    path: std::path::PathBuf,
    w: BufWriter<std::fs::File>,
    size: u64,
    max_bytes: Option<u64>,
    max_files: u32,
}

fn open_append(path: &std::path::Path) -> io::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl FileSink {
    fn rotated(&self, n: u32) -> std::path::PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    /// Closes the current file and shifts the rotated ones; a rename never loses a line.
    fn rotate(&mut self) -> io::Result<()> {
        self.w.flush()?;
        let _ = std::fs::remove_file(self.rotated(self.max_files));
        for n in (1..self.max_files).rev() {
            match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.w = BufWriter::with_capacity(64 * 1024, open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(max) = self.max_bytes
            && self.size > 0
            && self.size + data.len() as u64 > max
        {
            self.rotate()?;
        }
        self.w.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }
}

pub(super) fn open(cfg: &SinkConfig, dead_letter: Option<std::path::PathBuf>) -> io::Result<Sink> {
    match cfg {
        SinkConfig::Http(h) => {
            let hc = h.settings().map_err(|e| io::Error::other(format!("{e:#}")))?;
            let hostname = super::format::Context::local().hostname;
            let dead = h.dead_letter.clone().or(dead_letter);
            let s = super::http::HttpSink::new(&hc, &hostname, dead).map_err(|e| io::Error::other(format!("{e:#}")))?;
            Ok(Sink::Http(hc.url.clone(), Box::new(s)))
        }
        SinkConfig::Syslog(sc) => {
            let hostname = super::format::Context::local().hostname;
            let s = super::syslog::Syslog::new(sc, &hostname).map_err(|e| io::Error::other(format!("{e:#}")))?;
            Ok(Sink::Syslog(format!("syslog {}", sc.address), Box::new(s)))
        }
        SinkConfig::Stdout(_) => Ok(Sink::Stdout(BufWriter::with_capacity(64 * 1024, io::stdout()))),
        SinkConfig::File(fc) => {
            let path = &fc.path;
            let mut f = open_append(path)?;
            end_torn_line(path, &mut f).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let size = f.metadata()?.len();
            Ok(Sink::File(FileSink {
                name: path.display().to_string(),
                path: path.clone(),
                w: BufWriter::with_capacity(64 * 1024, f),
                size,
                max_bytes: fc.max_bytes,
                max_files: fc.max_files,
            }))
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
            Sink::File(f) => &f.name,
            Sink::Syslog(n, _) | Sink::Http(n, _) => n,
        }
    }

    /// Writes rendered events (`line`: one or more lines in the sink's format; `original`: the
    /// same events as egress.v1 lines, for sinks that need facts outside the format).
    pub(super) fn write(&mut self, line: &[u8], original: &[u8]) -> io::Result<()> {
        match self {
            Sink::Syslog(_, s) => s.send(line, original),
            Sink::Http(_, s) => s.send(line, original),
            Sink::Stdout(w) => w.write_all(line),
            Sink::File(f) => f.write(line),
        }
    }

    pub(super) fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(w) => w.flush(),
            Sink::File(f) => f.w.flush(),
            Sink::Syslog(..) | Sink::Http(..) => Ok(()),
        }
    }
}

impl Sink {
    /// Batch bounds the delivery thread should gather before calling `write` (HTTP sinks):
    /// (events, bytes, longest wait).
    pub(super) fn batching(&self) -> Option<(usize, usize, std::time::Duration)> {
        match self {
            Sink::Http(_, s) => Some(s.batching()),
            _ => None,
        }
    }

    /// Events dead-lettered so far (HTTP sinks).
    pub(super) fn dead_lettered(&self) -> u64 {
        match self {
            Sink::Http(_, s) => s.dead_lettered,
            _ => 0,
        }
    }
}
