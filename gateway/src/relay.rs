//! Bidirectional relay with byte counters, an idle timeout and shutdown. Socket to socket:
//! egress-netio (small exchanges copied through a stack buffer, bulk directions spliced in the
//! kernel). Otherwise one pair of 64 KiB buffers per connection, allocated once; nothing is
//! allocated per chunk.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::audit::End;

const BUF: usize = 64 * 1024;

/// Result of a relay.
#[derive(Debug)]
pub(crate) struct Relayed {
    /// Bytes client -> upstream.
    pub up: u64,
    /// Bytes upstream -> client.
    pub down: u64,
    /// How it ended.
    pub end: End,
    /// Error text, if any.
    pub error: Option<String>,
}

pin_project_lite::pin_project! {
    /// Counts bytes read from the inner stream.
    struct Counted<'a, S> {
        #[pin]
        inner: S,
        read: &'a AtomicU64,
    }
}

impl<S: AsyncRead> AsyncRead for Counted<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Counted<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Relays until both directions are done, the connection is idle for `idle`, or `stop` fires.
/// For streams that are not plain sockets (an upgraded HTTP connection): user-space copy with
/// one pair of 64 KiB buffers.
pub(crate) async fn relay<C, U>(client: C, upstream: U, idle: Duration, stop: &CancellationToken) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let mut c = Counted { inner: client, read: &up };
    let mut u = Counted { inner: upstream, read: &down };
    let copy = std::pin::pin!(tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, BUF, BUF));
    supervise(copy, &up, &down, idle, stop).await
}

/// How a tunnel relays, from `limits` (read once per connection, so a reload applies to the
/// next tunnel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tunnel {
    /// `limits.idleTimeout`.
    pub idle: Duration,
    /// `limits.tunnelNoDelay`: on (the default), every splice leaves at once, as the endpoints
    /// wrote it (a proxy that adds Nagle delays the endpoints' own small writes); off, the kernel
    /// holds a write smaller than the MSS until the previous one is acknowledged.
    pub nodelay: bool,
    /// `limits.tunnelCoalesce`: the longest a bulk direction holds a partial read while it
    /// batches (egress-netio's read batching; zero: never).
    pub coalesce: Duration,
}

impl From<&crate::config::Limits> for Tunnel {
    fn from(l: &crate::config::Limits) -> Self {
        Tunnel { idle: l.idle_timeout, nodelay: l.tunnel_no_delay, coalesce: l.tunnel_coalesce }
    }
}

/// The same for two plain sockets, through egress-netio (splice(2) once a direction is bulk,
/// reads batched while it keeps arriving back to back). Both sockets arrive with TCP_NODELAY on
/// (the fronts' accept loop and the dialer set it), so only `nodelay: false` costs a syscall here.
pub(crate) async fn relay_tcp(
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    tunnel: Tunnel,
    stop: &CancellationToken,
) -> Relayed {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    if !tunnel.nodelay {
        let _ = client.set_nodelay(false);
        let _ = upstream.set_nodelay(false);
    }
    let copy = std::pin::pin!(egress_netio::relay(&client, &upstream, &up, &down, tunnel.coalesce));
    supervise(copy, &up, &down, tunnel.idle, stop).await
}

/// Runs `copy` until it ends, the counters stop moving for `idle`, or `stop` fires.
///
/// `copy` is pinned by the caller and borrowed here, not moved in: a future passed by value is
/// stored twice in the state machine (once as the argument, once as the awaited value), and
/// every open tunnel carries that state for its whole life.
async fn supervise<T>(
    copy: Pin<&mut impl std::future::Future<Output = io::Result<T>>>,
    up: &AtomicU64,
    down: &AtomicU64,
    idle: Duration,
    stop: &CancellationToken,
) -> Relayed {
    let watch = async {
        let tick = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        let mut last = 0u64;
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(tick).await;
            let now = up.load(Ordering::Relaxed) + down.load(Ordering::Relaxed);
            if now == last {
                quiet += tick;
                if quiet >= idle {
                    return;
                }
            } else {
                quiet = Duration::ZERO;
                last = now;
            }
        }
    };
    let (end, error) = tokio::select! {
        r = copy => match r {
            Ok(_) => (End::Completed, None),
            Err(e) => {
                let end = match e.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => End::UpstreamClosed,
                    _ => End::Error,
                };
                (end, Some(e.to_string()))
            }
        },
        _ = watch => (End::IdleTimeout, None),
        _ = stop.cancelled() => (End::Shutdown, None),
    };
    Relayed { up: up.load(Ordering::Relaxed), down: down.load(Ordering::Relaxed), end, error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    /// Tunnel sockets carry TCP_NODELAY unless the config turns it off: Nagle in the relay holds
    /// every sub-MSS write behind the previous one's ACK (a delayed ACK stalls it for up to 40 ms).
    /// The sockets arrive with it on, as the accept loop and the dialer leave them (each has its
    /// own test).
    #[tokio::test]
    async fn tunnel_sockets_keep_nodelay_by_default_and_lose_it_when_turned_off() {
        let defaults = Tunnel::from(&crate::config::Limits::default());
        for nodelay in [defaults.nodelay, false] {
            let (mut app, client) = pair().await;
            let (upstream, mut server) = pair().await;
            client.set_nodelay(true).unwrap();
            upstream.set_nodelay(true).unwrap();
            // The option belongs to the socket, so a duplicate descriptor sees what the relay set.
            let c = socket2::Socket::from(client.as_fd().try_clone_to_owned().unwrap());
            let u = socket2::Socket::from(upstream.as_fd().try_clone_to_owned().unwrap());
            let stop = CancellationToken::new();
            let relay = tokio::spawn({
                let stop = stop.clone();
                async move { relay_tcp(client, upstream, Tunnel { nodelay, ..defaults }, &stop).await }
            });
            app.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            assert_eq!((c.tcp_nodelay().unwrap(), u.tcp_nodelay().unwrap()), (nodelay, nodelay));
            drop((app, server));
            let r = relay.await.unwrap();
            assert_eq!((r.up, r.down), (4, 0));
        }
        assert!(defaults.nodelay, "the default is on");
    }
}
