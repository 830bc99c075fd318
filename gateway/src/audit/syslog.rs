//! The syslog sink: RFC 5424 messages, one event per message, over TCP with octet-counting
//! framing (RFC 6587), TLS (RFC 5425, rustls) or UDP (RFC 5426, lossy).

use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::config::{SyslogSinkConfig, SyslogTransport};

/// Largest message (header and body) the sink sends; a longer event is replaced by a summary.
pub(crate) const MAX_MESSAGE: usize = 8 * 1024 - 1;

enum Conn {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Udp(UdpSocket),
}

/// A syslog destination, connected lazily and again after every error.
pub(crate) struct Syslog {
    cfg: SyslogSinkConfig,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    hostname: String,
    conn: Option<Conn>,
    frames: Vec<u8>,
}

impl Syslog {
    /// Checks the settings and loads the TLS material; connects on first use.
    pub(crate) fn new(cfg: &SyslogSinkConfig, hostname: &str) -> anyhow::Result<Syslog> {
        let tls = match cfg.transport {
            SyslogTransport::Tls => {
                let t = cfg.tls.as_ref().ok_or_else(|| anyhow::anyhow!("tls: required for transport tls"))?;
                let host = cfg.address.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or_default();
                Some(super::tls::client(Some(t), host)?)
            }
            _ => None,
        };
        Ok(Syslog { cfg: cfg.clone(), tls, hostname: hostname.to_string(), conn: None, frames: Vec::new() })
    }

    fn connect(&mut self) -> io::Result<&mut Conn> {
        if self.conn.is_none() {
            let addr = self
                .cfg
                .address
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::other(format!("{}: no address", self.cfg.address)))?;
            let timeout = Duration::from_secs(5);
            let conn = match self.cfg.transport {
                SyslogTransport::Udp => {
                    let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                    let s = UdpSocket::bind(bind)?;
                    s.connect(addr)?;
                    Conn::Udp(s)
                }
                SyslogTransport::Tcp | SyslogTransport::Tls => {
                    let s = TcpStream::connect_timeout(&addr, timeout)?;
                    s.set_write_timeout(Some(Duration::from_secs(30)))?;
                    s.set_nodelay(true)?;
                    match &self.tls {
                        None => Conn::Tcp(s),
                        Some((config, name)) => {
                            let c = rustls::ClientConnection::new(config.clone(), name.clone())
                                .map_err(io::Error::other)?;
                            let mut tls = rustls::StreamOwned::new(c, s);
                            // Handshake now, so that a certificate problem shows as a connect error.
                            while tls.conn.is_handshaking() {
                                tls.conn.complete_io(&mut tls.sock)?;
                            }
                            Conn::Tls(Box::new(tls))
                        }
                    }
                }
            };
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// Sends rendered events (one per line, in the sink's format) as one message each. On error
    /// the connection is dropped and the whole batch fails (the caller retries it).
    pub(crate) fn send(&mut self, lines: &[u8], originals: &[u8]) -> io::Result<()> {
        let mut frames = std::mem::take(&mut self.frames);
        frames.clear();
        let mut datagrams: Vec<(usize, usize)> = Vec::new();
        let mut orig = originals.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        for body in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let ev: serde_json::Value = orig.next().and_then(|o| serde_json::from_slice(o).ok()).unwrap_or_default();
            let msg = self.message(&ev, body);
            let start = frames.len();
            if self.cfg.transport != SyslogTransport::Udp {
                frames.extend_from_slice(msg.len().to_string().as_bytes());
                frames.push(b' ');
            }
            frames.extend_from_slice(&msg);
            datagrams.push((start, frames.len()));
        }
        let r = (|| {
            let conn = self.connect()?;
            match conn {
                Conn::Tcp(s) => s.write_all(&frames).and_then(|()| s.flush()),
                Conn::Tls(s) => s.write_all(&frames).and_then(|()| s.flush()),
                Conn::Udp(s) => {
                    for (a, b) in &datagrams {
                        s.send(&frames[*a..*b])?;
                    }
                    Ok(())
                }
            }
        })();
        self.frames = frames;
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    /// One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`.
    fn message(&self, ev: &serde_json::Value, body: &[u8]) -> Vec<u8> {
        let kind = ev["event"].as_str().unwrap_or("event");
        // Severity: 6 informational for allowed traffic and checkpoints, 4 warning for denials,
        // 3 error for lost audit events.
        let severity = match (kind, ev["decision"]["action"].as_str()) {
            ("audit_gap", _) => 3,
            (_, Some("deny")) => 4,
            _ => 6,
        };
        let pri = self.cfg.facility * 8 + severity;
        let time = ev["time"].as_str().map(rfc5424_time).unwrap_or_else(|| "-".to_string());
        let header = format!(
            "<{pri}>1 {time} {} {} {} {} - ",
            field(&self.hostname, 255),
            field(&self.cfg.app_name, 48),
            std::process::id(),
            field(kind, 32)
        );
        let mut msg = header.into_bytes();
        if msg.len() + body.len() <= MAX_MESSAGE {
            msg.extend_from_slice(body);
        } else {
            // Too long for one message (a huge `resolved` list or error text): the summary keeps
            // what identifies the event; the spool and the other sinks keep all of it.
            let summary = serde_json::json!({
                "schema": ev["schema"], "event": ev["event"], "id": ev["id"], "seq": ev["seq"],
                "time": ev["time"], "instance": ev["instance"], "front": ev["front"],
                "client": {"address": ev["client"]["address"]},
                "target": {"host": ev["target"]["host"], "port": ev["target"]["port"]},
                "decision": {"action": ev["decision"]["action"], "reason": ev["decision"]["reason"]},
                "hash": ev["hash"], "truncated": true,
            });
            msg.extend_from_slice(summary.to_string().as_bytes());
            msg.truncate(MAX_MESSAGE);
        }
        msg
    }
}

/// A header field: printable US-ASCII without spaces, at most `max` characters, `-` when empty.
fn field(s: &str, max: usize) -> String {
    let f: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if f.is_empty() { "-".into() } else { f }
}

/// RFC 5424 TIMESTAMP: RFC 3339 with at most 6 fractional digits.
fn rfc5424_time(t: &str) -> String {
    match t.split_once('.') {
        Some((secs, rest)) => {
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            let zone = &rest[digits.len()..];
            format!("{secs}.{}{zone}", &digits[..digits.len().min(6)])
        }
        None => t.to_string(),
    }
}
