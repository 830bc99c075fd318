//! The transparent front: connections steered to the gateway by the node-redirector, each
//! preceded by a PROXY protocol v2 header naming the Pod (source) and the destination it dialled.
//!
//! - Only relays listed in `transparent.trustedRelays` may send the header, and the header must
//!   carry a MAC under a key of `transparent.relayKeyFile` (fresh, never seen before: see
//!   `egress_netio::proxy`); anything else is closed and audited as `untrusted_relay`. The
//!   address alone is no proof: a node that masquerades its Pods gives them its own address.
//! - The first bytes are peeked, never decrypted: a TLS ClientHello gives the SNI (parsed by
//!   rustls's `Acceptor`), an HTTP/1 request head gives the Host. That name is decided like an
//!   explicit-proxy target on the original port, and the gateway dials its own resolution of it,
//!   never the address the Pod picked. Without SNI or Host, the original destination address is
//!   the target, which only a `cidr` rule can allow.
//! - The peeked bytes are replayed upstream, then bytes are relayed both ways.
//! - Refusals: an HTTP client gets `403`/`429`/`502` with the reason; anything else is closed.
//!
//! Plain HTTP seen this way is treated like a tunnel (rules with `http` never match): only the
//! first request of a kept-alive connection could be inspected, so method/path rules could not be
//! enforced for the ones after it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::pipeline::{Refusal, RefusalKind};
use crate::reason::Reason;
use crate::request::{EgressRequest, Front, RawTarget, TransparentFacts};
use crate::runtime::Gateway;

/// Largest first flight the front waits for before it decides without a name.
const MAX_PEEK: usize = 16 * 1024;

/// Serves the transparent front until the gateway drains.
pub(crate) async fn serve(gw: Gateway, listener: TcpListener) {
    super::accept_loop(
        gw,
        listener,
        "transparent",
        |gw, stream, relay| async move { serve_conn(&gw, stream, relay).await },
    )
    .await
}

/// What the first bytes revealed.
#[derive(Debug, PartialEq, Eq)]
enum Peeked {
    Tls(Option<String>),
    Http(Option<String>),
    Opaque,
}

fn refuse_bare(gw: &Gateway, relay: SocketAddr, reason: Reason, detail: &str) {
    let conn = gw.pipeline.new_conn(relay, Front::Transparent);
    gw.pipeline.refuse_malformed(&EgressRequest::bare(&conn, Front::Transparent), reason, detail);
}

async fn serve_conn(gw: &Gateway, mut stream: TcpStream, relay: SocketAddr) {
    if !gw.pipeline.trusts_relay(crate::target::canonical_ip(relay.ip())) {
        refuse_bare(gw, relay, Reason::UntrustedRelay, "PROXY protocol accepted only from transparent.trustedRelays");
        return;
    }
    let limits = gw.pipeline.limits();
    let (header_timeout, first_byte) = (limits.header_timeout, gw.pipeline.first_byte_timeout());
    let tunnel = crate::relay::Tunnel::from(&limits);
    let header = match tokio::time::timeout(header_timeout, read_proxy_header(&mut stream)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            refuse_bare(gw, relay, Reason::MalformedRequest, &format!("PROXY v2 header: {e}"));
            return;
        }
        Err(_) => {
            refuse_bare(gw, relay, Reason::HeaderTimeout, "no PROXY v2 header in time");
            return;
        }
    };
    let (source, original_dst, dns_names) = match egress_netio::proxy::parse(&header) {
        Ok(h) => {
            let Some((source, original)) = h.addresses else { return }; // LOCAL: a relay health check
            if let Err(e) = gw.pipeline.verify_relay(&h) {
                refuse_bare(gw, relay, Reason::UntrustedRelay, &format!("PROXY v2 header refused: {e}"));
                return;
            }
            // Only now, under a verified MAC, are the relay's DNS names believed.
            let names: Vec<std::sync::Arc<str>> = h.dns_names().map(Into::into).collect();
            (source, original, names)
        }
        Err(e) => {
            refuse_bare(gw, relay, Reason::MalformedRequest, &format!("PROXY v2 header: {e}"));
            return;
        }
    };
    // The client is the Pod the header names, not the relay: the connection limits count it.
    let conn = gw.pipeline.new_conn(source, Front::Transparent);
    let _permit = match gw.pipeline.admit_connection(&conn, Front::Transparent) {
        Ok(p) => p,
        Err(r) => return refuse(&mut stream, &r, false).await,
    };
    let mut buf = Vec::with_capacity(4096);
    let peeked = peek(&mut stream, &mut buf, first_byte, header_timeout).await;
    let (target, sni, http_host, is_http) = match &peeked {
        Peeked::Tls(Some(name)) => {
            (RawTarget::HostPort(name.clone(), original_dst.port()), Some(name.clone()), None, false)
        }
        Peeked::Http(Some(host)) => {
            let name = host_without_port(host);
            (RawTarget::HostPort(name.to_string(), original_dst.port()), None, Some(host.clone()), true)
        }
        Peeked::Http(None) => (RawTarget::Addr(original_dst), None, None, true),
        Peeked::Tls(None) | Peeked::Opaque => (RawTarget::Addr(original_dst), None, None, false),
    };
    let req = EgressRequest {
        id: conn.next_request_id(),
        conn,
        front: Front::Transparent,
        target,
        http: None,
        transparent: Some(Box::new(TransparentFacts {
            original_dst,
            relay,
            sni,
            http_host,
            original_in_resolved: None,
            dns_names,
            dns_name: None,
        })),
        credential: None,
    };
    let _tunnel_permit = match gw.pipeline.admit_tunnel(&req) {
        Ok(p) => p,
        Err(r) => return refuse(&mut stream, &r, false).await,
    };
    let permit = match gw.pipeline.authorize(&req).await {
        Ok(p) => p,
        Err(r) => return refuse(&mut stream, &r, is_http).await,
    };
    let mut up = match permit.connect().await {
        Ok(u) => u,
        Err(r) => return refuse(&mut stream, &r, is_http).await,
    };
    if let Err(e) = up.stream.write_all(&buf).await {
        up.log.finish(0, 0, crate::audit::End::UpstreamClosed, None, Some(e.to_string()));
        return;
    }
    let first = buf.len() as u64;
    drop(buf);
    let r = crate::relay::relay_tcp(stream, up.stream, tunnel, &gw.runtime.stop).await;
    up.log.finish(r.up + first, r.down, r.end, None, r.error);
}

/// Reads one PROXY v2 header (its length bounded by `egress_netio::proxy::MAX_LEN`).
async fn read_proxy_header(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let len = egress_netio::proxy::header_len(&head).map_err(|e| e.to_string())?;
    let mut all = head.to_vec();
    all.resize(len, 0);
    s.read_exact(&mut all[16..]).await.map_err(|e| e.to_string())?;
    Ok(all)
}

/// Reads the client's first flight into `buf` until it is classified.
/// Waits `first_byte` for the first bytes (`transparent.firstByteTimeout`), and up to `limit` in
/// all.
async fn peek(s: &mut TcpStream, buf: &mut Vec<u8>, first_byte: Duration, limit: Duration) -> Peeked {
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 4096];
    loop {
        let wait = if buf.is_empty() { first_byte.min(limit) } else { deadline - tokio::time::Instant::now() };
        let n = match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return classify_final(buf),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        match classify(buf) {
            Some(p) => return p,
            None if buf.len() >= MAX_PEEK => return classify_final(buf),
            None => {}
        }
    }
}

/// `Some` once the bytes say what they are; `None` while more are needed.
fn classify(buf: &[u8]) -> Option<Peeked> {
    if buf.first() == Some(&0x16) {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = buf;
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd).is_err() {
                return Some(Peeked::Opaque);
            }
        }
        return match acceptor.accept() {
            Ok(None) => None,
            Ok(Some(accepted)) => Some(Peeked::Tls(accepted.client_hello().server_name().map(str::to_string))),
            Err(_) => Some(Peeked::Opaque),
        };
    }
    let token_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if token_len == 0 || (token_len == buf.len() && token_len < 16) {
        return if token_len == 0 { Some(Peeked::Opaque) } else { None };
    }
    if buf.get(token_len) != Some(&b' ') {
        return Some(Peeked::Opaque);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|h| h.trim().to_string());
            Some(Peeked::Http(host))
        }
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Peeked::Opaque),
    }
}

fn classify_final(buf: &[u8]) -> Peeked {
    match classify(buf) {
        Some(p) => p,
        None if buf.first() == Some(&0x16) => Peeked::Tls(None),
        None => Peeked::Opaque,
    }
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map(|(h, _)| h.trim_start_matches('[')).unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

async fn refuse(stream: &mut TcpStream, r: &Refusal, is_http: bool) {
    if matches!(r.kind, RefusalKind::AuditUnavailable | RefusalKind::ConnectionLimit) {
        // Reset, whatever the protocol: the relay and the Pod see a refused connection.
        let _ = socket2::SockRef::from(&*stream).set_linger(Some(std::time::Duration::ZERO));
        return;
    }
    if !is_http {
        return; // TLS or opaque: the connection is closed
    }
    let _ = stream.write_all(super::raw_http_refusal(r).as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_flights() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n"),
            Some(Peeked::Http(Some("a.example:8080".into())))
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHo"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Peeked::Opaque));
        assert_eq!(classify(b"\x00\x01binary"), Some(Peeked::Opaque));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00]), None);
        assert_eq!(host_without_port("a.example:8080"), "a.example");
        assert_eq!(host_without_port("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(host_without_port("a.example"), "a.example");
    }

    use proptest::prelude::*;

    /// A real TLS ClientHello (rustls as the client) for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(3000)))]

        /// Hostile first flights: never a panic, and an answer once the peek is full.
        #[test]
        fn never_panics_on_hostile_first_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048), tls in any::<bool>()) {
            let mut bytes = bytes;
            if tls && !bytes.is_empty() {
                bytes[0] = 0x16;
            }
            let _ = classify(&bytes);
            let _ = classify_final(&bytes);
        }
    }

    proptest! {
        // Each case classifies every prefix of a ClientHello (some 300): fewer cases.
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(150)))]

        /// A ClientHello's SNI is found, and no prefix of it is taken for something else: the
        /// peek waits for more (a name is never lost to a ClientHello split across segments).
        #[test]
        fn finds_the_sni_of_a_client_hello_and_waits_on_every_prefix(name in "[a-z][a-z0-9]{0,20}(\\.[a-z][a-z0-9]{0,20}){1,3}") {
            let hello = client_hello(&name);
            prop_assert_eq!(classify(&hello), Some(Peeked::Tls(Some(name.clone()))));
            for cut in 1..hello.len() {
                prop_assert_eq!(classify(&hello[..cut]), None, "prefix of {} bytes", cut);
            }
        }
    }
}
