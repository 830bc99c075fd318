//! Protocol fronts. Each only parses its protocol into an `EgressRequest`, hands it to the
//! pipeline and writes its protocol's answer back; nothing about policy, resolution or audit
//! lives here.

pub(crate) mod http;
pub(crate) mod https;
pub(crate) mod socks5;
pub(crate) mod transparent;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use crate::runtime::Gateway;

/// Accepts on `listener` until the gateway drains; every connection runs `handle` as a tracked
/// task (drained on shutdown) and is counted in `egress_active_connections`. Accepted sockets
/// carry TCP_NODELAY (handshakes and answers are small writes that must leave at once; a tunnel
/// clears it only when `limits.tunnelNoDelay` is off).
pub(crate) async fn accept_loop<F, Fut>(gw: Gateway, listener: TcpListener, name: &'static str, handle: F)
where
    F: Fn(Gateway, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Accept errors (out of file descriptors, mostly) repeat every 50 ms while they last: one
    // warning every few seconds, with the count since the last one.
    let mut failed_since_warning = 0u64;
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = gw.runtime.draining.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                // Boxed: a connection's future is several KiB (hyper's state machine), and a
                // task moves its future a few times while it is spawned and again when it
                // finishes; a box moves a pointer.
                let conn = Box::pin(handle(gw.clone(), stream, peer));
                let gw2 = gw.clone();
                gw.runtime.tracker.spawn(async move {
                    gw2.pipeline.metrics.active_connections.inc();
                    conn.await;
                    gw2.pipeline.metrics.active_connections.dec();
                });
            }
            Err(e) => {
                failed_since_warning += 1;
                if last_warning.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) {
                    let hint = if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        ": raise the file descriptor limit (ulimit -n, LimitNOFILE) or lower the connection limits"
                    } else {
                        ""
                    };
                    tracing::warn!(listener = name, error = %e, failures = failed_since_warning, "accept failed{hint}");
                    failed_since_warning = 0;
                    last_warning = Some(std::time::Instant::now());
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A refusal as a complete HTTP/1.1 response that closes the connection, for fronts that
/// answer outside hyper (the transparent front, a connection refused before it is served). A
/// `407` is a proxy's challenge, which only a client that knows it speaks to a proxy can answer
/// (and a transparent client carries no credential): it goes out as `403`, the reason unchanged.
pub(crate) fn raw_http_refusal(r: &crate::pipeline::Refusal) -> String {
    let code = match r.kind.http_status().0 {
        407 => 403,
        c => c,
    };
    let what = r.words();
    let status = ::http::StatusCode::from_u16(code).map_or("", |s| s.canonical_reason().unwrap_or(""));
    let body = format!(
        "egress gateway: {what}\nreason: {}\nrequest_id: {}\ndetail: {}\n",
        r.reason.as_str(),
        r.request_id,
        r.detail
    );
    format!(
        "HTTP/1.1 {code} {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nx-egress-reason: {}\r\nx-egress-request-id: {}\r\nconnection: close\r\n\r\n{body}",
        body.len(),
        r.reason.as_str(),
        r.request_id
    )
}

/// Writes `bytes`, shuts the write side and drains what the client sent (at most 64 KiB, for at
/// most a second) before the socket closes: closing with unread input sends a reset, which can
/// destroy the answer in flight.
pub(crate) async fn answer_and_close(stream: &mut tokio::net::TcpStream, bytes: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.write_all(bytes).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_carry_tcp_nodelay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        let audit = dir.path().join("audit.jsonl");
        std::fs::write(&path, format!("audit: {{sinks: [{{type: file, path: {}}}]}}\n", audit.display())).unwrap();
        let loaded = crate::config::load(&path).unwrap();
        let gw = Gateway::new(loaded, std::sync::Arc::new(crate::metrics::Metrics::new()), None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let accepting = tokio::spawn(accept_loop(gw.clone(), listener, "test", move |_, s: TcpStream, _| {
            let tx = tx.clone();
            async move { tx.send(s.nodelay().unwrap()).unwrap() }
        }));
        let _client = TcpStream::connect(addr).await.unwrap();
        assert!(rx.recv().await.unwrap(), "TCP_NODELAY on the accepted socket");
        gw.runtime.draining.cancel();
        accepting.await.unwrap();
    }
}
