//! HTTP/1.1 explicit proxy (hyper): absolute-form requests of every method with bodies streamed
//! both ways, and CONNECT tunnels. A policy decision is made for every request, never per
//! connection; an upstream connection is reused only for a request whose checked addresses
//! include the address it is connected to.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::audit::End;
use crate::pipeline::{CloseLog, Permit, Refusal, RefusalKind, http_facts};
use crate::reason::Reason;
use crate::request::{ClientConn, Credential, EgressRequest, Front, RawTarget};
use crate::runtime::Gateway;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// An upstream connection kept for the next request of the same client connection.
struct Cached {
    dialled: SocketAddr,
    source: Option<SocketAddr>,
    pool: Arc<str>,
    sender: SendRequest<TrackedBody>,
}

/// Serves the explicit HTTP proxy on `listener` until the gateway drains.
pub(crate) async fn serve(gw: Gateway, listener: TcpListener) {
    super::accept_loop(gw, listener, "http", serve_conn).await
}

async fn serve_conn(gw: Gateway, mut stream: TcpStream, peer: SocketAddr) {
    let conn = gw.pipeline.new_conn(peer, Front::Http);
    let _permit = match gw.pipeline.admit_connection(&conn, Front::Http) {
        Ok(p) => p,
        Err(r) => return super::answer_and_close(&mut stream, super::raw_http_refusal(&r).as_bytes()).await,
    };
    serve_http(gw, conn, stream, None).await
}

/// Serves HTTP/1.1 proxy requests on an admitted client connection `io` (plain TCP, or TLS
/// from the HTTPS front, whose verified client certificate is `certificate`: the credential of
/// every request that carries no `Proxy-Authorization` of its own).
pub(super) async fn serve_http<IO>(gw: Gateway, conn: Arc<ClientConn>, io: IO, certificate: Option<Credential>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let limits = gw.pipeline.limits();
    let cache: Arc<Mutex<Option<Cached>>> = Arc::new(Mutex::new(None));
    // Bytes read from the client, and that count when the last request was answered: a header
    // timeout with nothing read since is an idle keep-alive connection closing, not a request.
    let read = Arc::new(AtomicU64::new(0));
    let answered_at = Arc::new(AtomicU64::new(0));
    let svc = {
        let (gw, conn, read, answered_at) = (gw.clone(), conn.clone(), read.clone(), answered_at.clone());
        service_fn(move |req| {
            let (gw, conn, cache, certificate) = (gw.clone(), conn.clone(), cache.clone(), certificate.clone());
            let (read, answered_at) = (read.clone(), answered_at.clone());
            async move {
                let resp = handle(gw, conn, cache, req, certificate).await;
                answered_at.store(read.load(Ordering::Relaxed), Ordering::Relaxed);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A hard bound on the request head, also when it arrives in one read (the buffer bound
        // alone is checked only while the head is incomplete).
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    let stream = CountingIo { io, read: read.clone() };
    let served = builder.serve_connection(TokioIo::new(stream), svc).with_upgrades();
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = gw.runtime.draining.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        let idle = read.load(Ordering::Relaxed) == answered_at.load(Ordering::Relaxed);
        let reason = if e.is_timeout() && idle {
            // Nothing of a next request arrived: a quiet close, not a decision.
            tracing::debug!(peer = %peer, "idle client connection closed after headerTimeout");
            None
        } else if e.is_timeout() {
            Some(Reason::HeaderTimeout)
        } else if e.is_parse() || e.is_parse_too_large() {
            Some(Reason::MalformedRequest)
        } else {
            None
        };
        if let Some(reason) = reason {
            gw.pipeline.refuse_malformed(&EgressRequest::bare(&conn, Front::Http), reason, &e.to_string());
        }
    }
}

#[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice in its future")]
fn handle(
    gw: Gateway,
    conn: Arc<ClientConn>,
    cache: Arc<Mutex<Option<Cached>>>,
    req: Request<Incoming>,
    certificate: Option<Credential>,
) -> impl Future<Output = Response<ProxyBody>> {
    // An async block, as in `forward`: the future hyper moves with every request.
    async move {
        let id = conn.next_request_id();
        let credential = credential(req.headers()).or(certificate);
        if req.method() == Method::CONNECT {
            let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
            let ereq = EgressRequest {
                conn,
                id,
                front: Front::Connect,
                target: RawTarget::Authority(authority),
                http: None,
                transparent: None,
                credential,
            };
            // A CONNECT request has no content (RFC 9110 §9.3.6): bytes announced as one would be
            // either swallowed or sent on as tunnel data. Refused, and the connection closed.
            let has_content = req.headers().contains_key(header::TRANSFER_ENCODING)
                || req.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
            if has_content {
                let r = gw.pipeline.refuse_malformed(
                    &ereq,
                    Reason::MalformedRequest,
                    "a CONNECT request carries no content",
                );
                return refusal(&r, true);
            }
            // Boxed, as the other paths that dial: out of every keep-alive request's future.
            return Box::pin(connect(gw, ereq, req)).await;
        }
        let uri = req.uri().clone();
        let facts = http_facts(req.method().as_str(), uri.path());
        let mut ereq = EgressRequest {
            conn,
            id,
            front: Front::Http,
            target: RawTarget::Authority(String::new()),
            http: Some(facts),
            transparent: None,
            credential,
        };
        match (uri.scheme_str(), uri.host()) {
            (Some("http"), Some(host)) => {
                ereq.target = RawTarget::HostPort(host.to_string(), uri.port_u16().unwrap_or(80));
                forward(gw, ereq, cache, req).await
            }
            (None, _) => {
                let r = gw.pipeline.refuse_malformed(
                    &ereq,
                    Reason::OriginForm,
                    "this is an egress proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port",
                );
                refusal(&r, true)
            }
            (Some(scheme), _) => {
                let msg = if scheme == "https" {
                    "https:// in absolute form is not proxied: use CONNECT host:443".to_string()
                } else {
                    format!("scheme {scheme:?} is not supported: only http:// and CONNECT")
                };
                let r = gw.pipeline.refuse_malformed(&ereq, Reason::MalformedRequest, &msg);
                refusal(&r, false)
            }
        }
    }
}

async fn connect(gw: Gateway, ereq: EgressRequest, req: Request<Incoming>) -> Response<ProxyBody> {
    let tunnel_permit = match gw.pipeline.admit_tunnel(&ereq) {
        Ok(p) => p,
        Err(r) => return refusal(&r, true),
    };
    let permit = match gw.pipeline.authorize(&ereq).await {
        Ok(p) => p,
        Err(r) => return refusal(&r, false),
    };
    let up = match permit.connect().await {
        Ok(u) => u,
        Err(r) => return refusal(&r, false),
    };
    let tunnel = crate::relay::Tunnel::from(&gw.pipeline.limits());
    let gw2 = gw.clone();
    // Boxed (as every per-connection task): spawning moves a pointer, not the tunnel's state.
    gw.runtime.tracker.spawn(Box::pin(async move {
        let _tunnel_permit = tunnel_permit;
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => return up.log.finish(0, 0, End::ClientClosed, None, Some(e.to_string())),
        };
        // The client's socket itself, when hyper hands it back: then the tunnel is spliced.
        let r = match upgraded.downcast::<TokioIo<CountingIo<TcpStream>>>() {
            Ok(parts) => {
                let mut upstream = up.stream;
                // What the client sent after its CONNECT head. Dropped before relaying: it is a
                // view of hyper's read buffer (8 KiB or more), which it would keep alive for
                // the tunnel's whole life.
                let read_buf = parts.read_buf;
                let early = read_buf.len() as u64;
                if early > 0
                    && let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut upstream, &read_buf).await
                {
                    return up.log.finish(0, 0, End::UpstreamClosed, None, Some(e.to_string()));
                }
                drop(read_buf);
                let mut r =
                    crate::relay::relay_tcp(parts.io.into_inner().io, upstream, tunnel, &gw2.runtime.stop).await;
                r.up += early;
                r
            }
            Err(upgraded) => {
                // Not a plain socket (the HTTPS front's TLS stream): boxed, so that its larger
                // state is not part of every plain tunnel's.
                Box::pin(crate::relay::relay(TokioIo::new(upgraded), up.stream, tunnel.idle, &gw2.runtime.stop)).await
            }
        };
        up.log.finish(r.up, r.down, r.end, None, r.error);
    }));
    Response::new(empty())
}

/// The client's socket (or TLS stream), counting the bytes read from it (one relaxed add per
/// read).
struct CountingIo<IO> {
    io: IO,
    read: Arc<AtomicU64>,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingIo<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The ServiceAccount token of `Proxy-Authorization`: `Bearer <token>`, or `Basic` with any
/// user name and the token as the password (what `http://x:TOKEN@gw:3128` in `HTTPS_PROXY` makes
/// curl, Go, Python and Java send). Another scheme or an unreadable value is no credential: the
/// request is then decided by its address, as without the header. The pipeline verifies it.
fn credential(h: &HeaderMap) -> Option<Credential> {
    let v = h.get(header::PROXY_AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    let token = if scheme.eq_ignore_ascii_case("bearer") {
        rest.trim().to_string()
    } else if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let text = String::from_utf8(raw).ok()?;
        text.split_once(':')?.1.to_string()
    } else {
        return None;
    };
    (!token.is_empty()).then(|| Credential::Token(token.into()))
}

/// The hop-by-hop headers RFC 9110 section 7.6.1 and RFC 9112 name, with a standard name.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The legacy hop-by-hop headers.
const HOP_BY_HOP_LEGACY: [&str; 2] = ["keep-alive", "proxy-connection"];

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy ones; headers named in `Connection` too.
/// Allocates nothing: most messages carry none of them, and a response carries `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names present (a handful) instead of a hashed lookup per hop-by-hop name.
    let found: smallvec::SmallVec<[HeaderName; 4]> = h.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    if found.is_empty() {
        return;
    }
    // Names the Connection header lists are hop-by-hop too. Its values are kept by reference
    // count (they share the read buffer) while the map changes.
    let listed: smallvec::SmallVec<[HeaderValue; 2]> = h.get_all(header::CONNECTION).iter().cloned().collect();
    for n in &found {
        h.remove(n);
    }
    for n in listed.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')) {
        // A name that is not a valid header name matches nothing.
        h.remove(n.trim());
    }
}

fn is_hop_by_hop(n: &HeaderName) -> bool {
    HOP_BY_HOP.contains(n) || HOP_BY_HOP_LEGACY.contains(&n.as_str())
}

#[allow(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice in its future")]
fn forward(
    gw: Gateway,
    ereq: EgressRequest,
    cache: Arc<Mutex<Option<Cached>>>,
    req: Request<Incoming>,
) -> impl Future<Output = Response<ProxyBody>> {
    // An async block, not an async fn: an async fn keeps its arguments twice in its future
    // (as captured and as locals), and this future is moved whole with every request.
    async move {
        let permit = match gw.pipeline.authorize(&ereq).await {
            Ok(p) => p,
            Err(r) => return refusal(&r, false),
        };
        let mut cached = cache.lock().ok().and_then(|mut c| c.take());
        // An idle upstream connection may have been closed by the upstream since its last response:
        // find out before committing the request to it (then a fresh connection is dialled).
        if let Some(c) = cached.as_mut()
            && (c.sender.is_closed() || c.sender.ready().await.is_err())
        {
            cached = None;
        }
        let mut leg = match cached {
            Some(c) if permit.accepts(c.dialled, &c.pool) => match permit.reuse(c.dialled, c.source).await {
                Ok(log) => {
                    Leg { sender: c.sender, log, dialled: c.dialled, source: c.source, pool: c.pool, reused: true }
                }
                Err(r) => return refusal(&r, false),
            },
            // Dialling futures are boxed: they are large, and only a request that opens an
            // upstream connection needs them (hyper moves the request's future as a whole).
            _ => match Box::pin(open(permit, &gw, &ereq.id)).await {
                Ok(leg) => leg,
                Err(resp) => return resp,
            },
        };
        // Only what lives across the awaits below is kept in this future, which hyper moves.
        let (mut upstream_req, counters) = upstream_request(req, leg.reused);
        let (resp, leg) = loop {
            // On failure: the error, and the request when it never went out (the connection was
            // closed before the request was taken).
            let (e, unsent) = match leg.sender.ready().await {
                Err(e) => (e, Some(upstream_req)),
                Ok(()) => match leg.sender.try_send_request(upstream_req).await {
                    Ok(resp) => break (resp, leg),
                    Err(mut e) => {
                        let unsent = e.take_message();
                        (e.into_error(), unsent)
                    }
                },
            };
            let Some(again) = resend(&e, unsent, leg.reused, &counters) else {
                return failed(&e, leg.log, &counters, &ereq.id);
            };
            let detail = format!("{e}; the request was sent again on a new connection");
            leg.log.finish(0, 0, End::UpstreamClosed, None, Some(detail));
            // A new attempt: decided again on the state in force now (without a second rate-limit
            // token: the client asked once), and audited as one.
            (leg, upstream_req) = match Box::pin(redial(&gw, &ereq, again)).await {
                Ok(next) => next,
                Err(resp) => return resp,
            };
        };
        if let Ok(mut c) = cache.lock() {
            *c = Some(Cached { dialled: leg.dialled, source: leg.source, pool: leg.pool, sender: leg.sender });
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let status = parts.status.as_u16();
        let body = TrackedBody::response(body, counters, leg.log, status);
        Response::from_parts(parts, body.boxed())
    }
}

/// An upstream connection carrying one request, with the close log of that request's allow.
struct Leg {
    sender: SendRequest<TrackedBody>,
    log: CloseLog,
    dialled: SocketAddr,
    source: Option<SocketAddr>,
    pool: Arc<str>,
    /// Kept from an earlier request: the upstream may have closed it meanwhile.
    reused: bool,
}

/// Dials for `permit` (auditing the allow) and makes the HTTP/1.1 handshake.
async fn open(permit: Permit, gw: &Gateway, request_id: &str) -> Result<Leg, Response<ProxyBody>> {
    let pool = permit.pool.clone();
    let up = permit.connect().await.map_err(|r| refusal(&r, false))?;
    match hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(up.stream)).await {
        Ok((sender, connection)) => {
            gw.runtime.tracker.spawn(Box::pin(async move {
                let _ = connection.await;
            }));
            Ok(Leg { sender, log: up.log, dialled: up.dialled, source: up.source, pool, reused: false })
        }
        Err(e) => {
            up.log.finish(0, 0, End::Error, None, Some(e.to_string()));
            Err(upstream_error(request_id, StatusCode::BAD_GATEWAY, &e.to_string()))
        }
    }
}

/// Decides `ereq` again and dials a new upstream connection for `req` (kept here, not in the
/// request's future, while that happens).
async fn redial(
    gw: &Gateway,
    ereq: &EgressRequest,
    req: Request<TrackedBody>,
) -> Result<(Leg, Request<TrackedBody>), Response<ProxyBody>> {
    let permit = gw.pipeline.reauthorize(ereq).await.map_err(|r| refusal(&r, false))?;
    Ok((open(permit, gw, &ereq.id).await?, req))
}

/// The request to send upstream, built from the client's: origin form, one Host, no hop-by-hop
/// headers; and its byte counters, which also keep what it takes to send it once more when that
/// may be needed (`reused`: the upstream connection is a kept one).
fn upstream_request(req: Request<Incoming>, reused: bool) -> (Request<TrackedBody>, Arc<Counters>) {
    let (mut parts, body) = req.into_parts();
    // Host from the URI's host and port only (never its userinfo), so that the upstream sees
    // the name that was decided. Most clients send exactly that already: the header then
    // stays as it came.
    let host = host_header(&parts.uri);
    let mut sent = parts.headers.get_all(header::HOST).iter();
    let keep = sent.next().is_some_and(|v| v.as_bytes() == host.as_slice()) && sent.next().is_none();
    // Origin form, keeping the path and query the client sent (shared, not copied).
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = None;
    uri.authority = None;
    parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
    strip_hop_by_hop(&mut parts.headers);
    if !keep && let Ok(v) = HeaderValue::from_bytes(&host) {
        parts.headers.insert(header::HOST, v);
    }
    // Kept in the counters' allocation: no allocation of its own, nothing in the request's future.
    let replay = (reused && Replay::allowed(&parts.method, &body)).then(|| Replay::of(&parts));
    let counters = Arc::new(Counters { replay: Mutex::new(replay), ..Counters::default() });
    (Request::from_parts(parts, TrackedBody::request(Some(body), counters.clone())), counters)
}

/// The keep-alive race: the upstream closed a kept connection while a request was on its way
/// (`e`). Only a kept connection's request goes again, on a new connection, so once at most: one
/// that never went out (`unsent`), or one that may be repeated (its kept head, RFC 9110 section
/// 9.2.2: idempotent, no body) when the connection was lost before an answer. A proxy never
/// repeats any other request.
fn resend(
    e: &hyper::Error,
    unsent: Option<Request<TrackedBody>>,
    reused: bool,
    counters: &Arc<Counters>,
) -> Option<Request<TrackedBody>> {
    match unsent {
        Some(r) if reused => Some(r),
        // The head is kept for a kept connection only.
        None if !counters.client_body_error.load(Ordering::Relaxed) && lost_connection(e) => {
            let replay = counters.replay.lock().ok().and_then(|mut r| r.take());
            replay.map(|r| r.request(counters.clone()))
        }
        _ => None,
    }
}

/// The answer to a request that failed upstream (`e`), its close event written: 400 when the
/// client's body was malformed (the connection is then closed: its framing is lost), else 502.
fn failed(e: &hyper::Error, log: CloseLog, counters: &Counters, request_id: &str) -> Response<ProxyBody> {
    let up = counters.up.load(Ordering::Relaxed);
    if counters.client_body_error.load(Ordering::Relaxed) {
        let detail = format!(
            "malformed request body: {}",
            std::error::Error::source(e).map_or_else(|| e.to_string(), |s| s.to_string())
        );
        log.finish(up, 0, End::ClientError, None, Some(detail.clone()));
        let body = format!(
            "egress gateway: bad request\nreason: malformed_request\nrequest_id: {request_id}\ndetail: {detail}\n"
        );
        return text(StatusCode::BAD_REQUEST, body, "malformed_request", request_id, true);
    }
    log.finish(up, 0, End::UpstreamClosed, None, Some(e.to_string()));
    upstream_error(request_id, StatusCode::BAD_GATEWAY, &e.to_string())
}

/// Whether `e` says that the connection was lost before a response came: closed, reset or cut
/// off. Not an answer the upstream gave (a malformed response is one).
fn lost_connection(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof);
        }
        source = s.source();
    }
    false
}

/// A request's head, kept so that it can be sent once more; for requests without a body only.
struct Replay {
    method: Method,
    uri: Uri,
    version: http::Version,
    headers: HeaderMap,
}

impl Replay {
    /// Whether a request may be sent twice: an idempotent method (RFC 9110 section 9.2.2) and
    /// no body.
    fn allowed(method: &Method, body: &Incoming) -> bool {
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
            && body.is_end_stream()
    }

    fn of(parts: &http::request::Parts) -> Replay {
        Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn request(self, counters: Arc<Counters>) -> Request<TrackedBody> {
        let mut r = Request::new(TrackedBody::request(None, counters));
        *r.method_mut() = self.method;
        *r.uri_mut() = self.uri;
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers;
        r
    }
}

/// The Host header an absolute-form request is forwarded with: the URI's host, and its port when
/// the URI names one (never its userinfo).
fn host_header(uri: &Uri) -> smallvec::SmallVec<[u8; 64]> {
    let mut out = smallvec::SmallVec::new();
    if let Some(h) = uri.host() {
        out.extend_from_slice(h.as_bytes());
        if let Some(p) = uri.port_u16() {
            out.push(b':');
            out.extend_from_slice(itoa::Buffer::new().format(p).as_bytes());
        }
    }
    out
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    /// The client's request body could not be decoded (bad chunked framing, cut short).
    client_body_error: std::sync::atomic::AtomicBool,
    /// What it takes to send the request once more ([`Replay`]), when that may be needed. Locked
    /// only on a failure.
    replay: Mutex<Option<Replay>>,
}

/// A body that counts what passes and, for responses, emits the close event at its end.
struct TrackedBody {
    /// `None`: no body (a request sent once more, see [`Replay`]).
    inner: Option<Incoming>,
    counters: Arc<Counters>,
    upstream: bool,
    close: Option<(CloseLog, u16)>,
}

impl TrackedBody {
    fn request(inner: Option<Incoming>, counters: Arc<Counters>) -> Self {
        TrackedBody { inner, counters, upstream: true, close: None }
    }

    fn response(inner: Incoming, counters: Arc<Counters>, log: CloseLog, status: u16) -> Self {
        let mut b = TrackedBody { inner: Some(inner), counters, upstream: false, close: Some((log, status)) };
        if b.is_end_stream() {
            b.finish(End::Completed, None);
        }
        b
    }

    fn finish(&mut self, end: End, error: Option<String>) {
        if let Some((log, status)) = self.close.take() {
            let up = self.counters.up.load(Ordering::Relaxed);
            let down = self.counters.down.load(Ordering::Relaxed);
            log.finish(up, down, end, Some(status), error);
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let r = Pin::new(inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let c = if self.upstream { &self.counters.up } else { &self.counters.down };
                    c.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                if self.is_end_stream() {
                    self.finish(End::Completed, None);
                }
            }
            Poll::Ready(None) => self.finish(End::Completed, None),
            Poll::Ready(Some(Err(e))) => {
                if self.upstream {
                    self.counters.client_body_error.store(true, Ordering::Relaxed);
                }
                let msg = e.to_string();
                self.finish(End::UpstreamClosed, Some(msg));
            }
            Poll::Pending => {}
        }
        r.map(|o| o.map(|res| res.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.finish(End::ClientClosed, Some("client stopped reading the response".into()));
    }
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, body: String, reason: &str, request_id: &str, close: bool) -> Response<ProxyBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert("x-egress-reason", v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-egress-request-id", v);
    }
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The protocol answer to a refusal.
fn refusal(r: &Refusal, close: bool) -> Response<ProxyBody> {
    let what = r.words();
    let status = StatusCode::from_u16(r.kind.http_status().0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = r.reason.as_str();
    let mut body = format!("egress gateway: {what}\nreason: {reason}\nrequest_id: {}\n", r.request_id);
    if !r.detail.is_empty() {
        body.push_str(&format!("detail: {}\n", r.detail));
    }
    let mut resp = text(status, body, reason, &r.request_id, close || r.kind == RefusalKind::BadRequest);
    if r.kind == RefusalKind::AuthRequired {
        let h = resp.headers_mut();
        h.append(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"egress-gateway\""));
        h.append(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"egress-gateway\""));
    }
    resp
}

fn upstream_error(request_id: &str, status: StatusCode, detail: &str) -> Response<ProxyBody> {
    let body = format!("egress gateway: upstream error\nrequest_id: {request_id}\ndetail: {detail}\n");
    text(status, body, "upstream_error", request_id, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_is_the_uris_host_and_port_without_userinfo() {
        for (uri, host) in [
            ("http://up.test/x", "up.test"),
            ("http://Up.Test:8080/x?q", "Up.Test:8080"),
            ("http://user:secret@up.test:81/", "up.test:81"),
            ("http://[::1]:80/", "[::1]:80"),
            ("http://10.0.0.1/", "10.0.0.1"),
        ] {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(host_header(&uri).as_slice(), host.as_bytes(), "{uri}");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_proxy_headers_and_those_connection_names() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Hop, bad header name"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("x-kept", "2"),
            ("host", "up.test"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        // HeaderMap::remove moves the last entry into the hole: what is left, in any order.
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-kept"], "the proxy credentials never reach the upstream");
    }

    #[test]
    fn reads_a_token_as_bearer_or_as_the_basic_password_and_nothing_else() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            credential(&h).map(|c| match c {
                Credential::Token(t) => t.to_string(),
                Credential::Socks5User(_) | Credential::Certificate(_) => unreachable!("the header carries tokens"),
            })
        };
        assert_eq!(with("Bearer abc.def.ghi"), Some("abc.def.ghi".into()));
        assert_eq!(with("bearer   abc.def.ghi "), Some("abc.def.ghi".into()));
        // `http://pod:TOKEN@gw` in HTTPS_PROXY: any user name, the token as the password.
        assert_eq!(with("Basic cG9kOmFiYy5kZWYuZ2hp"), Some("abc.def.ghi".into()));
        assert_eq!(with("Basic cG9kOg=="), None, "an empty password");
        assert_eq!(with("Basic !!!"), None);
        assert_eq!(with("Digest username=x"), None);
        assert_eq!(with("Bearer"), None);
        assert!(credential(&HeaderMap::new()).is_none());
        assert_eq!(format!("{:?}", Credential::Token("secret".into())), "Token(<redacted>)");
    }

    #[test]
    fn a_refusal_says_what_refused_and_a_bad_request_closes() {
        let r = Refusal {
            kind: RefusalKind::Denied,
            reason: Reason::GuardBlocked,
            request_id: "gw-1-1".into(),
            detail: String::new(),
        };
        let resp = refusal(&r, false);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()["x-egress-reason"], "guard_blocked");
        assert_eq!(resp.headers()["x-egress-request-id"], "gw-1-1");
        assert!(resp.headers().get(header::CONNECTION).is_none(), "a denial keeps the connection");
        let bad = Refusal { kind: RefusalKind::BadRequest, reason: Reason::InvalidTarget, ..r };
        let resp = refusal(&bad, false);
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }
}
