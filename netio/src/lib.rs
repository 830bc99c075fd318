//! TCP relaying, both directions at once; a half-close is passed on and bytes are counted as
//! they leave (for audit and idle detection).
//!
//! Each direction starts by copying through a buffer on the thread's stack: the first bytes of
//! most connections (handshakes, requests, small answers) are cheaper to move with one `recv`
//! and one `send` than through a pipe, and a connection that never moves bulk data never creates
//! one. The first read that fills that buffer marks the direction as bulk and moves it to
//! `splice(2)` (socket -> pipe -> socket in the kernel, nothing copied through user space).
//!
//! Pipe sizes count against a per-user kernel quota (`fs.pipe-user-pages-soft`, 64 MiB by
//! default, shared by every process of that uid on the machine) unless the process has
//! CAP_SYS_RESOURCE. Once it is spent the kernel hands out two-page pipes, which would crawl; a
//! direction whose pipe the kernel refused keeps copying instead, and [`stats`] counts it.
//!
//! Nothing is allocated per chunk: the stack buffer is reused, a direction whose peer cannot
//! take a copy at once keeps the remainder in one buffer allocated the first time that happens.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Size of the copy buffer; a read that fills it marks the direction as bulk.
const COPY: usize = 16 << 10;
/// Pipe asked for when a direction turns bulk, and the most one splice moves. 64 pages: 256
/// bulk directions at once fit the default per-user quota; 1 MiB pipes measured no faster.
const PIPE: usize = 256 << 10;

static SPLICED: AtomicU64 = AtomicU64::new(0);
static PIPE_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Process-wide counts of relay directions, since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Directions that turned bulk and were moved to splice.
    pub spliced: u64,
    /// Directions that turned bulk but kept copying because the kernel refused the pipe size
    /// (the per-user pipe quota is spent).
    pub pipe_refused: u64,
}

/// Relay counts so far.
pub fn stats() -> Stats {
    Stats { spliced: SPLICED.load(Ordering::Relaxed), pipe_refused: PIPE_REFUSED.load(Ordering::Relaxed) }
}

/// Exports [`stats`] on a prometheus-client registry (its prefix applies): `relay_spliced_total`
/// and `relay_pipe_refused_total`, read at each scrape.
#[derive(Debug)]
pub struct RelayCollector;

impl prometheus_client::collector::Collector for RelayCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let s = stats();
        for (name, help, value) in [
            ("relay_spliced", "Relay directions that turned bulk and were moved to splice(2)", s.spliced),
            (
                "relay_pipe_refused",
                "Bulk relay directions that kept copying because the kernel refused the pipe \
                 (per-user pipe quota spent: raise fs.pipe-user-pages-soft or grant CAP_SYS_RESOURCE)",
                s.pipe_refused,
            ),
        ] {
            let metric = prometheus_client::metrics::counter::ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// A pipe of at least `size` bytes, or `None` when the kernel will not give that much.
fn pipe(size: usize) -> Option<Pipe> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two valid fds on success; we own them from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a valid pipe fd. Over the quota this fails (EPERM), and a pipe created
    // over it has two pages whatever we ask: read the size back rather than trust either call.
    let got = unsafe {
        libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int);
        libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
    };
    (got >= 0 && got as usize >= size).then_some(Pipe { r, w })
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two valid fds with null offsets (both are pipes or sockets).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn recv(fd: RawFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf, which we own mutably.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most buf.len() initialised bytes. MSG_NOSIGNAL: a closed peer
    // is an EPIPE error here, never a SIGPIPE for the process.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Waits until `from` has something, then receives it into a buffer on the stack and sends as
/// much as `to` takes at once. Returns what was received and how much of it is still to send
/// (that tail is copied into `pending`).
async fn copy_once(from: &TcpStream, to: &TcpStream, pending: &mut Vec<u8>) -> io::Result<(usize, usize)> {
    loop {
        from.readable().await?;
        // No await in this block, so the buffer lives on the thread's stack, not in the future.
        let mut buf = [MaybeUninit::<u8>::uninit(); COPY];
        let n = match from.try_io(Interest::READABLE, || recv(from.as_raw_fd(), &mut buf)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok((0, 0));
        }
        // SAFETY: recv initialised the first n bytes.
        let got = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
        let sent = match to.try_io(Interest::WRITABLE, || send(to.as_raw_fd(), got)) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if sent < n {
            pending.clear();
            pending.extend_from_slice(&got[sent..]);
        }
        return Ok((n, n - sent));
    }
}

/// Sends all of `pending`, waiting for `to` as needed.
async fn drain(to: &TcpStream, pending: &[u8], counter: &AtomicU64) -> io::Result<()> {
    let mut at = 0;
    while at < pending.len() {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || send(to.as_raw_fd(), &pending[at..])) {
            Ok(n) => {
                at += n;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Moves everything from `from` through `pipe` to `to` until EOF.
async fn splice_all(from: &TcpStream, to: &TcpStream, pipe: &Pipe, counter: &AtomicU64) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let mut in_pipe = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pipe.w.as_raw_fd(), PIPE)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if in_pipe == 0 {
            return Ok(total);
        }
        // Take whatever else is already queued (never waiting for more), so that it leaves in as
        // few sends as possible: measured to help bulk transfers (fewer, larger segments).
        // Not through `try_io`: EAGAIN here may mean that the *pipe* is full (it holds one socket
        // fragment per page), and clearing the socket's readiness then would wait for an edge
        // that never comes once the sender is stalled on a full receive window. The next
        // `readable()` returns at once and the splice into the emptied pipe tells the truth.
        while in_pipe < PIPE {
            match splice(from.as_raw_fd(), pipe.w.as_raw_fd(), PIPE - in_pipe) {
                Ok(n) if n > 0 => in_pipe += n,
                // EOF is seen again by the next read; EAGAIN: nothing more queued, or the pipe full.
                _ => break,
            }
        }
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(pipe.r.as_raw_fd(), to.as_raw_fd(), in_pipe)) {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// One direction: `from` -> `to` until EOF; then `to`'s write side is shut down. `pipe_for`
/// makes the pipe when the direction turns bulk (`None`: keep copying).
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    pipe_for: impl Fn() -> Option<Pipe>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pending = Vec::new();
    let mut bulk_refused = false;
    loop {
        let (n, left) = copy_once(from, to, &mut pending).await?;
        if n == 0 {
            break;
        }
        counter.fetch_add((n - left) as u64, Ordering::Relaxed);
        if left > 0 {
            drain(to, &pending, counter).await?;
        }
        total += n as u64;
        if n == COPY && !bulk_refused {
            match pipe_for() {
                Some(pipe) => {
                    SPLICED.fetch_add(1, Ordering::Relaxed);
                    total += splice_all(from, to, &pipe, counter).await?;
                    break;
                }
                None => {
                    PIPE_REFUSED.fetch_add(1, Ordering::Relaxed);
                    bulk_refused = true;
                }
            }
        }
    }
    // SAFETY: shutdown on a valid connected socket.
    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
    Ok(total)
}

/// Relays both directions until both are finished (or one fails), counting bytes a->b into
/// `a_to_b` and b->a into `b_to_a` as they leave; returns the totals.
pub async fn relay(a: &TcpStream, b: &TcpStream, a_to_b: &AtomicU64, b_to_a: &AtomicU64) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, a_to_b, || pipe(PIPE)), one_way(b, a, b_to_a, || pipe(PIPE)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected pairs: (far end, relay side) for the source and for the destination.
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let mut out = Vec::new();
        for _ in 0..2 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let far = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            out.push((far, l.accept().await.unwrap().0));
        }
        let dst = out.pop().unwrap();
        (out.pop().unwrap(), dst)
    }

    /// Bytes that differ by position, so that a lost, repeated or reordered chunk shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn relays_both_ways_counts_and_passes_half_close() {
        let ((mut client, a), (mut server, b)) = pairs().await;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let (up_data, down_data) = (pattern(5 << 20), pattern(3 << 20));
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap(); // ends when the client half-closes
            server.write_all(&pattern(3 << 20)).await.unwrap();
            got
        });
        let client = tokio::spawn(async move {
            client.write_all(&pattern(5 << 20)).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let (x, y) = relay(&a, &b, &up, &down).await.unwrap();
        assert_eq!((x, y), (5 << 20, 3 << 20));
        assert_eq!((up.load(Ordering::Relaxed), down.load(Ordering::Relaxed)), (5 << 20, 3 << 20));
        drop((a, b));
        assert!(server.await.unwrap() == up_data, "upstream bytes differ");
        assert!(client.await.unwrap() == down_data, "downstream bytes differ");
    }

    /// A request and a small answer are copied; no pipe is ever made for them.
    #[tokio::test]
    async fn small_exchanges_never_make_a_pipe() {
        let ((mut client, a), (mut server, b)) = pairs().await;
        let pipes = AtomicUsize::new(0);
        let make = || {
            pipes.fetch_add(1, Ordering::Relaxed);
            pipe(PIPE)
        };
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let far = tokio::spawn(async move {
            for i in 0..50u8 {
                client.write_all(&[i; 300]).await.unwrap();
                let mut answer = [0u8; 1200];
                client.read_exact(&mut answer).await.unwrap();
                assert_eq!(answer, [i ^ 0xff; 1200]);
            }
            client.shutdown().await.unwrap();
            client.read_to_end(&mut Vec::new()).await.unwrap();
        });
        let echo = tokio::spawn(async move {
            let mut q = [0u8; 300];
            while server.read_exact(&mut q).await.is_ok() {
                server.write_all(&[q[0] ^ 0xff; 1200]).await.unwrap();
            }
        });
        let moved = tokio::try_join!(one_way(&a, &b, &up, make), one_way(&b, &a, &down, make)).unwrap();
        assert_eq!(moved, (50 * 300, 50 * 1200));
        assert_eq!(pipes.load(Ordering::Relaxed), 0);
        drop((a, b));
        far.await.unwrap();
        echo.await.unwrap();
    }

    /// A read that fills the copy buffer moves the direction to splice; a pipe that fills up
    /// before the socket is drained (one page: one fragment) must not stall it: the sender
    /// writes many small segments, so the pipe is full long before a batch is, again and again.
    #[tokio::test]
    async fn bulk_moves_to_splice_and_a_full_pipe_never_stalls_it() {
        let ((mut sender, b), (mut receiver, a)) = pairs().await;
        let data = pattern(64 * 1024 + 700 * 12_000);
        let sent = data.clone();
        let sender = tokio::spawn(async move {
            sender.set_nodelay(true).unwrap();
            // A first block larger than the copy buffer (the relay waits for it below), then
            // small segments.
            sender.write_all(&sent[..64 * 1024]).await.unwrap();
            for c in sent[64 * 1024..].chunks(700) {
                sender.write_all(c).await.unwrap();
            }
        });
        let mut peek = vec![0u8; COPY];
        while b.peek(&mut peek).await.unwrap() < COPY {
            tokio::task::yield_now().await;
        }
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        let pipes = AtomicUsize::new(0);
        let make = || {
            pipes.fetch_add(1, Ordering::Relaxed);
            pipe(4096)
        };
        let counter = AtomicU64::new(0);
        let moved = tokio::time::timeout(Duration::from_secs(30), one_way(&b, &a, &counter, make)).await;
        assert!(moved.is_ok(), "stalled after {} of {} bytes", counter.load(Ordering::Relaxed), data.len());
        assert_eq!(moved.unwrap().unwrap(), data.len() as u64);
        assert_eq!(pipes.load(Ordering::Relaxed), 1);
        drop(a);
        sender.await.unwrap();
        assert!(receiver.await.unwrap() == data, "bytes differ");
    }

    /// When the kernel refuses the pipe (quota spent), a bulk direction keeps copying, asks
    /// once, and loses nothing to a receiver that reads slowly (partial sends are kept).
    #[tokio::test]
    async fn a_refused_pipe_keeps_copying_through_a_slow_receiver() {
        let ((mut sender, b), (mut receiver, a)) = pairs().await;
        let data = pattern(8 << 20);
        let sent = data.clone();
        let sender = tokio::spawn(async move {
            sender.write_all(&sent).await.unwrap();
        });
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 3000];
            loop {
                let n = receiver.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
                if got.len() % 7 == 0 {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        });
        let asked = AtomicUsize::new(0);
        let refuse = || {
            asked.fetch_add(1, Ordering::Relaxed);
            None
        };
        let counter = AtomicU64::new(0);
        let refused_before = stats().pipe_refused;
        let moved = one_way(&b, &a, &counter, refuse).await.unwrap();
        assert_eq!((moved, counter.load(Ordering::Relaxed)), (8 << 20, 8 << 20));
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        assert!(stats().pipe_refused > refused_before);
        drop(a);
        sender.await.unwrap();
        assert!(receiver.await.unwrap() == data, "bytes differ");
    }
}
