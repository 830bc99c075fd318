//! The HTTP batch sink: events POSTed in batches (gzip), with three presets:
//!
//! - `splunk_hec`: the HEC event envelope, `Authorization: Splunk <token>`, optional indexer
//!   acknowledgement (a channel, then ack polling until the batch is indexed);
//! - `elastic_bulk`: `_bulk` with a `create` per event and `_id` = the event id; per-item results:
//!   2xx and 409 (already there) are delivered, 429 and 5xx are sent again, 400s go to the
//!   dead-letter file;
//! - `ndjson`: a generic webhook, one event per line, `Idempotency-Key` per request.
//!
//! The delivery thread owns retries (backoff with jitter, `Retry-After` honoured through
//! [`RetrySoon`]); a send succeeds only when every event of the batch is delivered or
//! dead-lettered. A retry resumes where the batch failed: chunks already accepted, and `_bulk`
//! items already stored or dead-lettered, are not sent again (after a restart the whole batch
//! is, and `_bulk` answers 409 for what it has).

use std::io::{self, Write};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};

use crate::config::{HttpPreset, HttpSettings};

fn retry_error(status: u16, retry_after: Option<Duration>, body: &str) -> io::Error {
    let text = format!("HTTP {status}: {}", body.chars().take(300).collect::<String>());
    match retry_after {
        Some(d) => io::Error::other(RetrySoon { text, after: d }),
        None => io::Error::other(text),
    }
}

/// An error with the server's `Retry-After`.
#[derive(Debug)]
pub(crate) struct RetrySoon {
    text: String,
    /// When to try again.
    pub after: Duration,
}
impl std::fmt::Display for RetrySoon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (Retry-After {:?})", self.text, self.after)
    }
}
impl std::error::Error for RetrySoon {}

/// The server's wish for a pause, if an error carries one.
pub(crate) fn retry_after_of(e: &io::Error) -> Option<Duration> {
    e.get_ref().and_then(|x| x.downcast_ref::<RetrySoon>()).map(|r| r.after)
}

struct Target {
    tls: bool,
    host: String,
    port: u16,
    path_and_query: String,
    authority: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let uri: hyper::Uri = url.parse().map_err(|e| anyhow::anyhow!("url {url:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => anyhow::bail!("url {url:?}: http:// or https://"),
    };
    let host = uri.host().ok_or_else(|| anyhow::anyhow!("url {url:?}: no host"))?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let path_and_query = uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
    Ok(Target { tls, host, port, path_and_query, authority })
}

/// The sink.
pub(crate) struct HttpSink {
    cfg: HttpSettings,
    target: Target,
    /// Taken out while a batch is sent (`block_on` needs it by value next to `&mut self`).
    rt: Option<tokio::runtime::Runtime>,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    sender: Option<SendRequest<Full<Bytes>>>,
    hostname: String,
    dead_letter: Option<PathBuf>,
    /// Events written to the dead-letter file (for the metric).
    pub dead_lettered: u64,
    /// How far a failed batch got, so that its retry (the delivery thread sends the same batch
    /// again) resumes there instead of sending accepted or dead-lettered events again.
    progress: Option<Progress>,
}

/// Progress through one batch, identified by its first and last event ids and its length.
struct Progress {
    batch: (String, String, usize),
    /// Events before this index are delivered or dead-lettered.
    done: usize,
    /// `_bulk`: within the chunk starting at `done`, only these items are left (429/5xx).
    only: Option<Vec<usize>>,
}

impl HttpSink {
    /// Checks the settings and loads TLS material; connects on first use.
    pub(crate) fn new(cfg: &HttpSettings, hostname: &str, dead_letter: Option<PathBuf>) -> anyhow::Result<HttpSink> {
        let target = parse_url(&cfg.url)?;
        let tls = if target.tls {
            let (config, name) = super::tls::client(cfg.tls.as_ref(), &target.host)?;
            Some((tokio_rustls::TlsConnector::from(config), name))
        } else {
            None
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(HttpSink {
            cfg: cfg.clone(),
            target,
            rt: Some(rt),
            tls,
            sender: None,
            hostname: hostname.to_string(),
            dead_letter,
            dead_lettered: 0,
            progress: None,
        })
    }

    async fn connect(&mut self) -> io::Result<()> {
        if self.sender.as_ref().is_some_and(|s| !s.is_closed()) {
            return Ok(());
        }
        let addr = (self.target.host.as_str(), self.target.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other(format!("{}: no address", self.target.host)))?;
        let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        let sender = match &self.tls {
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), tcp).await?;
                let (s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(io::Error::other)?;
                tokio::spawn(conn);
                s
            }
            None => {
                let (s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(io::Error::other)?;
                tokio::spawn(conn);
                s
            }
        };
        self.sender = Some(sender);
        Ok(())
    }

    /// POSTs `body` to `path` (gzip when configured); returns status, `Retry-After` and body.
    async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
        extra: &[(&str, String)],
    ) -> io::Result<(u16, Option<Duration>, Vec<u8>)> {
        self.connect().await?;
        let (body, encoding) = if self.cfg.gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
            gz.write_all(&body)?;
            (gz.finish()?, Some("gzip"))
        } else {
            (body, None)
        };
        let mut req = hyper::Request::post(path)
            .header("host", &self.target.authority)
            .header("content-type", content_type)
            .header("user-agent", concat!("egress-gateway/", env!("CARGO_PKG_VERSION")));
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        if let Some(auth) = self.authorization() {
            req = req.header("authorization", auth);
        }
        for (k, v) in extra {
            req = req.header(*k, v);
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(io::Error::other)?;
        let sender = self.sender.as_mut().expect("connected");
        let timeout = self.cfg.timeout;
        let resp = match tokio::time::timeout(timeout, sender.send_request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.sender = None;
                return Err(io::Error::other(e));
            }
            Err(_) => {
                self.sender = None;
                return Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out"));
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let body = match tokio::time::timeout(timeout, resp.into_body().collect()).await {
            Ok(Ok(b)) => b.to_bytes().to_vec(),
            _ => {
                self.sender = None;
                return Err(io::Error::other("response body not read"));
            }
        };
        Ok((status, retry_after, body))
    }

    fn authorization(&self) -> Option<String> {
        let t = self.cfg.token.as_ref()?;
        Some(match self.cfg.preset {
            HttpPreset::SplunkHec => format!("Splunk {t}"),
            HttpPreset::ElasticBulk => format!("ApiKey {t}"),
            HttpPreset::Ndjson => format!("Bearer {t}"),
        })
    }

    /// (events, bytes, longest wait) of a batch.
    pub(crate) fn batching(&self) -> (usize, usize, Duration) {
        (self.cfg.max_events, self.cfg.max_bytes, self.cfg.max_age)
    }

    /// Delivers a batch: `rendered` in the sink's format, `originals` the same events as egress.v1
    /// (ids, times). Splits it by `batch.maxEvents` / `batch.maxBytes`.
    pub(crate) fn send(&mut self, rendered: &[u8], originals: &[u8]) -> io::Result<()> {
        let rendered: Vec<&[u8]> = rendered.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
        let originals: Vec<Value> = originals
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap_or_default())
            .collect();
        let id = |v: Option<&Value>| v.and_then(|o| o["id"].as_str()).unwrap_or("").to_string();
        let batch = (id(originals.first()), id(originals.last()), rendered.len());
        let mut start = match &self.progress {
            Some(p) if p.batch == batch => p.done,
            _ => {
                self.progress = Some(Progress { batch, done: 0, only: None });
                0
            }
        };
        while start < rendered.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < rendered.len()
                && end - start < self.cfg.max_events
                && (end == start || bytes + rendered[end].len() <= self.cfg.max_bytes)
            {
                bytes += rendered[end].len() + 1;
                end += 1;
            }
            // The runtime drives this sink's connection: only `Runtime::block_on` (not a
            // handle) runs the IO driver of a current-thread runtime.
            let rt = self.rt.take().expect("runtime");
            let r = rt.block_on(self.send_one(&rendered[start..end], &originals[start..end.min(originals.len())]));
            self.rt = Some(rt);
            r?;
            start = end;
            if let Some(p) = self.progress.as_mut() {
                (p.done, p.only) = (end, None);
            }
        }
        self.progress = None;
        Ok(())
    }

    async fn send_one(&mut self, events: &[&[u8]], originals: &[Value]) -> io::Result<()> {
        let path = self.target.path_and_query.clone();
        match self.cfg.preset {
            HttpPreset::Ndjson => {
                let mut body = Vec::new();
                for e in events {
                    body.extend_from_slice(e);
                    body.push(b'\n');
                }
                let key = idempotency_key(originals);
                let (status, ra, resp) =
                    self.post(&path, body, "application/x-ndjson", &[("idempotency-key", key)]).await?;
                match status {
                    200..=299 => Ok(()),
                    408 | 429 | 500..=599 => Err(retry_error(status, ra, &String::from_utf8_lossy(&resp))),
                    _ => {
                        self.dead(events, &format!("HTTP {status}: {}", String::from_utf8_lossy(&resp)))?;
                        Ok(())
                    }
                }
            }
            HttpPreset::SplunkHec => {
                let mut body = Vec::new();
                for (e, o) in events.iter().zip(originals) {
                    let event: Value = serde_json::from_slice(e).unwrap_or(Value::Null);
                    let mut env = json!({
                        "time": epoch_secs(o["time"].as_str().unwrap_or("")),
                        "host": self.hostname,
                        "source": self.cfg.source.clone().unwrap_or_else(|| "egress-gateway".into()),
                        "sourcetype": self.cfg.sourcetype.clone().unwrap_or_else(|| "egress:audit".into()),
                        "event": event,
                    });
                    if let Some(i) = &self.cfg.index {
                        env["index"] = json!(i);
                    }
                    serde_json::to_writer(&mut body, &env)?;
                    body.push(b'\n');
                }
                let mut headers = Vec::new();
                if let Some(ch) = &self.cfg.channel {
                    headers.push(("x-splunk-request-channel", ch.clone()));
                }
                let (status, ra, resp) = self.post(&path, body, "application/json", &headers).await?;
                match status {
                    200..=299 => {}
                    400 => {
                        // Bad data (HEC codes 5, 6, 12...): never accepted as it is.
                        self.dead(events, &format!("HTTP 400: {}", String::from_utf8_lossy(&resp)))?;
                        return Ok(());
                    }
                    _ => return Err(retry_error(status, ra, &String::from_utf8_lossy(&resp))),
                }
                if !self.cfg.ack {
                    return Ok(());
                }
                let ack_id = serde_json::from_slice::<Value>(&resp)
                    .ok()
                    .and_then(|v| v["ackId"].as_u64())
                    .ok_or_else(|| io::Error::other("HEC acknowledgement is on but the response has no ackId"))?;
                self.wait_ack(ack_id).await
            }
            HttpPreset::ElasticBulk => {
                // A retry sends only the items the receiver asked to have again.
                let pending: Vec<usize> = match self.progress.as_ref().and_then(|p| p.only.clone()) {
                    Some(only) if only.iter().all(|i| *i < events.len()) => only,
                    _ => (0..events.len()).collect(),
                };
                let mut body = Vec::new();
                for &i in &pending {
                    let id = originals.get(i).and_then(|o| o["id"].as_str()).unwrap_or("");
                    let mut action = json!({"create": {"_id": id}});
                    if let Some(ix) = &self.cfg.index {
                        action["create"]["_index"] = json!(ix);
                    }
                    serde_json::to_writer(&mut body, &action)?;
                    body.push(b'\n');
                    body.extend_from_slice(events[i]);
                    body.push(b'\n');
                }
                let (status, ra, resp) = self.post(&path, body, "application/x-ndjson", &[]).await?;
                if !(200..=299).contains(&status) {
                    return Err(retry_error(status, ra, &String::from_utf8_lossy(&resp)));
                }
                let v: Value =
                    serde_json::from_slice(&resp).map_err(|e| io::Error::other(format!("_bulk response: {e}")))?;
                let items = v["items"].as_array().cloned().unwrap_or_default();
                if items.len() != pending.len() {
                    return Err(io::Error::other(format!(
                        "_bulk answered {} items for {}",
                        items.len(),
                        pending.len()
                    )));
                }
                let mut dead = Vec::new();
                let mut retry = Vec::new();
                for (k, item) in items.iter().enumerate() {
                    let r = item.get("create").or_else(|| item.get("index")).cloned().unwrap_or_default();
                    match r["status"].as_u64().unwrap_or(0) {
                        200..=299 | 409 => {} // created, or already there (a redelivery)
                        429 | 500..=599 => retry.push(pending[k]),
                        _ => dead.push((pending[k], r["error"].to_string())),
                    }
                }
                for (i, why) in &dead {
                    self.dead(&[events[*i]], why)?;
                }
                if retry.is_empty() {
                    Ok(())
                } else {
                    // The delivery thread sends the batch again; only these items go.
                    let n = retry.len();
                    if let Some(p) = self.progress.as_mut() {
                        p.only = Some(retry);
                    }
                    Err(io::Error::other(format!("{n} _bulk items to retry (429/5xx)")))
                }
            }
        }
    }

    /// Polls HEC's ack endpoint until the batch is indexed (or the ack timeout passes: then
    /// the batch is sent again; HEC may then hold it twice, with the same event ids).
    async fn wait_ack(&mut self, ack_id: u64) -> io::Result<()> {
        let channel = self.cfg.channel.clone().unwrap_or_default();
        let path = ack_path(&self.target.path_and_query);
        let deadline = tokio::time::Instant::now() + self.cfg.ack_timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            let body = serde_json::to_vec(&json!({"acks": [ack_id]}))?;
            let (status, ra, resp) =
                self.post(&path, body, "application/json", &[("x-splunk-request-channel", channel.clone())]).await?;
            if !(200..=299).contains(&status) {
                return Err(retry_error(status, ra, &String::from_utf8_lossy(&resp)));
            }
            let v: Value = serde_json::from_slice(&resp).unwrap_or_default();
            if v["acks"][ack_id.to_string()] == json!(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(io::Error::other(format!(
                    "HEC ack {ack_id} not confirmed within {:?}",
                    self.cfg.ack_timeout
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    fn dead(&mut self, events: &[&[u8]], why: &str) -> io::Result<()> {
        tracing::error!(sink = %self.cfg.url, events = events.len(), reason = %why.chars().take(300).collect::<String>(), "audit events rejected by the receiver: dead-lettered");
        self.dead_lettered += events.len() as u64;
        let Some(path) = &self.dead_letter else { return Ok(()) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let mut out = Vec::new();
        for e in events {
            let event: Value = serde_json::from_slice(e).unwrap_or(Value::Null);
            serde_json::to_writer(&mut out, &json!({"rejected": why, "event": event}))?;
            out.push(b'\n');
        }
        f.write_all(&out)?;
        f.sync_data()
    }
}

/// `.../services/collector/event` -> `.../services/collector/ack`.
fn ack_path(event_path: &str) -> String {
    let path = event_path.split('?').next().unwrap_or("");
    match path.rfind("/services/collector") {
        Some(i) => format!("{}/services/collector/ack", &path[..i]),
        None => "/services/collector/ack".into(),
    }
}

fn idempotency_key(originals: &[Value]) -> String {
    let first = originals.first().and_then(|o| o["id"].as_str()).unwrap_or("");
    let last = originals.last().and_then(|o| o["id"].as_str()).unwrap_or("");
    format!("{first}..{last}")
}

fn epoch_secs(t: &str) -> f64 {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map(|d| d.unix_timestamp_nanos() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// `Retry-After`: delta-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(s) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(s.min(3600)));
    }
    let when = httpdate::parse_http_date(v.trim()).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or_default().min(Duration::from_secs(3600)))
}
