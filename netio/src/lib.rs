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
//!
//! A spliced direction that keeps arriving back to back (a run of [`RUN_TO_BATCH`] with no gap
//! longer than the hold) batches its reads: `SO_RCVLOWAT` asks the kernel to wake the relay only
//! once [`BATCH`] bytes are queued (or the window is nearly closed, or the peer closed), instead
//! of once per segment. A TLS download arrives one 16 KiB record at a time, and each wake-up
//! cost a readiness event, two splices and a send; batched, the gateway's CPU per GiB relayed
//! fell to about 40%, and the endpoints receive fewer, larger segments. Nothing waits longer
//! than the hold (`limits.tunnelCoalesce`, 1 ms by default; tokio's timers round it up to the
//! next millisecond tick): when it passes with less than a
//! batch queued, the relay moves what is there and stops batching until the next run, so the
//! end of a burst and anything interactive after it go out at once. A hold of zero turns it off.

pub mod exposition;
pub mod proxy;
pub mod sockopt;

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Size of the copy buffer; a read that fills it marks the direction as bulk.
const COPY: usize = 16 << 10;
/// Pipe asked for when a direction turns bulk, and the most one splice moves. 64 pages: 256
/// bulk directions at once fit the default per-user quota; 1 MiB pipes measured no faster.
const PIPE: usize = 256 << 10;

/// Most a batched read waits for (`SO_RCVLOWAT`); at most a quarter of the socket's receive
/// buffer, so the kernel never has to grow the buffer (or clamp the window) to honour it.
pub const BATCH: usize = 256 << 10;
/// Bytes a spliced direction moves back to back (no gap longer than the hold) before its reads
/// are batched: a short answer or an interactive exchange never waits for a batch.
pub const RUN_TO_BATCH: u64 = 1 << 20;
/// The hold used when the caller has no setting of its own (`limits.tunnelCoalesce`).
pub const DEFAULT_HOLD: Duration = Duration::from_millis(1);
/// The longest hold the configurations accept: a relayed byte may wait that long.
pub const MAX_HOLD: Duration = Duration::from_millis(100);

/// Checks a configured hold (`limits.tunnelCoalesce`, `relay.coalesce`): the message to show
/// after the field's name when it is longer than [`MAX_HOLD`].
pub fn check_hold(hold: Duration) -> Result<(), String> {
    if hold > MAX_HOLD {
        return Err(format!(
            "{hold:?} is longer than {MAX_HOLD:?}: it is how long a relayed byte may wait for a batch (0s turns batching off)"
        ));
    }
    Ok(())
}

static SPLICED: AtomicU64 = AtomicU64::new(0);
static PIPE_REFUSED: AtomicU64 = AtomicU64::new(0);
static BATCHED: AtomicU64 = AtomicU64::new(0);

/// Process-wide counts of relay directions, since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Directions that turned bulk and were moved to splice.
    pub spliced: u64,
    /// Directions that turned bulk but kept copying because the kernel refused the pipe size
    /// (the per-user pipe quota is spent).
    pub pipe_refused: u64,
    /// Times a spliced direction started batching its reads (a run of back-to-back data).
    pub batched: u64,
}

/// Relay counts so far.
pub fn stats() -> Stats {
    Stats {
        spliced: SPLICED.load(Ordering::Relaxed),
        pipe_refused: PIPE_REFUSED.load(Ordering::Relaxed),
        batched: BATCHED.load(Ordering::Relaxed),
    }
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
            (
                "relay_batched",
                "Times a spliced relay direction started batching its reads (SO_RCVLOWAT, limits.tunnelCoalesce)",
                s.batched,
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

fn set_rcvlowat(fd: RawFd, bytes: usize) -> bool {
    let v = bytes as libc::c_int;
    // SAFETY: setsockopt with a pointer to an int of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// An integer socket option at SOL_SOCKET level (`SO_RCVBUF`, `SO_RCVLOWAT`).
fn socket_int(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the int we own.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, option, (&mut v as *mut libc::c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

fn rcvbuf(fd: RawFd) -> usize {
    socket_int(fd, libc::SO_RCVBUF).map_or(0, |v| v.max(0) as usize)
}

/// Whether the kernel calls `fd` readable now, by its own rule: the low-water mark reached, the
/// peer closed, an error, or the window nearly closed (what an epoll wake-up would have said).
fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: poll on one pollfd we own, without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n != 0
}

/// Read batching for one spliced direction (see the module docs).
struct Batching {
    hold: Duration,
    /// Batching: the socket's low-water mark is raised.
    armed: bool,
    /// Bytes moved back to back so far, and when the last of them was read.
    run: u64,
    last: Option<Instant>,
}

impl Batching {
    fn new(hold: Duration) -> Self {
        Batching { hold, armed: false, run: 0, last: None }
    }

    /// Counts `n` bytes just read from `fd` (not batching yet) and starts batching once the run
    /// is long enough.
    fn moved(&mut self, fd: RawFd, n: usize) {
        if self.armed || self.hold.is_zero() {
            return;
        }
        let now = Instant::now();
        self.run = match self.last {
            Some(t) if now.duration_since(t) <= self.hold => self.run + n as u64,
            _ => n as u64,
        };
        self.last = Some(now);
        if self.run >= RUN_TO_BATCH {
            let batch = BATCH.min(rcvbuf(fd) / 4);
            if batch > COPY && set_rcvlowat(fd, batch) {
                self.armed = true;
                BATCHED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The hold passed without a full batch: back to one wake-up per arrival.
    fn stop(&mut self, fd: RawFd) {
        set_rcvlowat(fd, 1);
        *self = Batching::new(self.hold);
    }
}

/// Waits until `from` has something, then receives it into a buffer on the stack and sends as
/// much as `to` takes at once. Returns what was received and how much of it is still to send
/// (that tail is copied into `pending`).
async fn copy_once(from: &TcpStream, to: &TcpStream, pending: &mut Vec<u8>) -> io::Result<(usize, usize)> {
    loop {
        from.readable().await?;
        // No await in this block, so the buffer lives on the thread's stack, not in the future.
        let mut buf = [MaybeUninit::<u8>::uninit(); COPY];
        // A short read emptied the socket: its readiness is cleared with it (the closure answers
        // WouldBlock, which is what clears it), as tokio's own reads do, so the next wait does
        // not begin with a recv that finds nothing. Readiness that arrives meanwhile carries a
        // newer tick and is kept: nothing is missed.
        let mut got = None;
        let read = from.try_io(Interest::READABLE, || {
            let n = recv(from.as_raw_fd(), &mut buf)?;
            got = Some(n);
            if n > 0 && n < COPY { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
        });
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match got {
                Some(n) => n,
                None => continue,
            },
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

/// Moves everything from `from` through `pipe` to `to` until EOF, batching reads while data
/// keeps arriving back to back (`hold`: see the module docs).
async fn splice_all(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &AtomicU64,
    hold: Duration,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut batching = Batching::new(hold);
    loop {
        let mut in_pipe = loop {
            if batching.armed {
                // A batch (or the peer's FIN) may have come in while the last one was written
                // out; if not, forget the readiness left from before it and wait for the
                // kernel's low-water wake-up. Checked inside `try_io`, so a wake-up that arrives
                // meanwhile is kept.
                let fd = from.as_raw_fd();
                let waiting = from.try_io(Interest::READABLE, || {
                    if readable_now(fd) { Ok(()) } else { Err(io::ErrorKind::WouldBlock.into()) }
                });
                if waiting.is_err() && tokio::time::timeout(hold, from.readable()).await.is_err() {
                    // Less than a batch came within the hold: move what is there now. Not
                    // through `try_io`, whose cached readiness may say "nothing" while a tail
                    // below the low-water mark is queued; the pipe is empty here, so EAGAIN
                    // means the socket is.
                    batching.stop(fd);
                    match splice(from.as_raw_fd(), pipe.w.as_raw_fd(), PIPE) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                }
            } else {
                from.readable().await?;
            }
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
        batching.moved(from.as_raw_fd(), in_pipe);
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
    hold: Duration,
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
                    total += splice_all(from, to, &pipe, counter, hold).await?;
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
/// `a_to_b` and b->a into `b_to_a` as they leave; returns the totals. `hold` is the longest a
/// bulk direction holds a partial read while batching ([`DEFAULT_HOLD`]; zero: never batch).
///
/// The sockets may come from another task (hyper's connection task hands a CONNECT's client
/// socket over): their registrations still hold that task's waker, and with it the task's whole
/// allocation (about 9 KiB for an HTTP connection), until the next readiness event. An idle
/// tunnel may never see one, so the wakers are let go here first.
pub async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
    hold: Duration,
) -> io::Result<(u64, u64)> {
    release_wakers(a);
    release_wakers(b);
    tokio::try_join!(one_way(a, b, a_to_b, hold, || pipe(PIPE)), one_way(b, a, b_to_a, hold, || pipe(PIPE)))
}

/// Replaces the wakers stored in `s`'s registration by a no-op one. A waker is stored only for
/// a direction that is not ready, and the relay waits through `readable()`/`writable()`, which
/// keep their own waiters: nothing that waits is forgotten.
fn release_wakers(s: &TcpStream) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = s.poll_read_ready(&mut cx);
    let _ = s.poll_write_ready(&mut cx);
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
        let (x, y) = relay(&a, &b, &up, &down, DEFAULT_HOLD).await.unwrap();
        assert_eq!((x, y), (5 << 20, 3 << 20));
        assert_eq!((up.load(Ordering::Relaxed), down.load(Ordering::Relaxed)), (5 << 20, 3 << 20));
        drop((a, b));
        assert!(server.await.unwrap() == up_data, "upstream bytes differ");
        assert!(client.await.unwrap() == down_data, "downstream bytes differ");
    }

    /// A socket handed over by a task that waited on it (hyper's connection task) must not keep
    /// that task's waker, and so its memory, for as long as the tunnel is idle.
    #[tokio::test]
    async fn lets_go_of_the_wakers_of_the_task_that_had_the_socket() {
        struct Marker;
        impl std::task::Wake for Marker {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let ((_client, a), (_server, b)) = pairs().await;
        let marker = std::sync::Arc::new(Marker);
        let waker = std::task::Waker::from(marker.clone());
        // Nothing to read (a read that would block clears a readiness left from registering):
        // the registration keeps the waker, as it does for hyper's task.
        assert!(a.try_read(&mut [0u8; 16]).is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock));
        assert!(a.poll_read_ready(&mut std::task::Context::from_waker(&waker)).is_pending());
        drop(waker);
        assert_eq!(std::sync::Arc::strong_count(&marker), 2, "the registration holds the waker");
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let relaying = relay(&a, &b, &up, &down, DEFAULT_HOLD);
        let _ = tokio::time::timeout(Duration::from_millis(50), relaying).await;
        assert_eq!(std::sync::Arc::strong_count(&marker), 1, "the idle relay let go of the old waker");
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
        let moved =
            tokio::try_join!(one_way(&a, &b, &up, DEFAULT_HOLD, make), one_way(&b, &a, &down, DEFAULT_HOLD, make))
                .unwrap();
        assert_eq!(moved, (50 * 300, 50 * 1200));
        assert_eq!(pipes.load(Ordering::Relaxed), 0);
        drop((a, b));
        far.await.unwrap();
        echo.await.unwrap();
    }

    /// A short read clears the socket's readiness: bytes that arrive after it (the second half
    /// of a message, written a moment later) must still wake the relay, every time.
    #[tokio::test]
    async fn bytes_after_a_short_read_are_never_missed() {
        let ((mut client, a), (mut server, b)) = pairs().await;
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let far = tokio::spawn(async move {
            for i in 0..100u8 {
                client.write_all(&[i; 10]).await.unwrap();
                if i % 2 == 0 {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                client.write_all(&[i; 7]).await.unwrap();
                let mut answer = [0u8; 17];
                client.read_exact(&mut answer).await.unwrap();
                assert_eq!(answer, [i; 17]);
            }
            client.shutdown().await.unwrap();
        });
        let echo = tokio::spawn(async move {
            let mut q = [0u8; 17];
            while server.read_exact(&mut q).await.is_ok() {
                server.write_all(&q).await.unwrap();
            }
        });
        let moved = tokio::time::timeout(Duration::from_secs(20), relay(&a, &b, &up, &down, DEFAULT_HOLD))
            .await
            .expect("a relay direction missed bytes that arrived after a short read")
            .unwrap();
        assert_eq!(moved, (100 * 17, 100 * 17));
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
        let moved = tokio::time::timeout(Duration::from_secs(30), one_way(&b, &a, &counter, DEFAULT_HOLD, make)).await;
        assert!(moved.is_ok(), "stalled after {} of {} bytes", counter.load(Ordering::Relaxed), data.len());
        assert_eq!(moved.unwrap().unwrap(), data.len() as u64);
        assert_eq!(pipes.load(Ordering::Relaxed), 1);
        drop(a);
        sender.await.unwrap();
        assert!(receiver.await.unwrap() == data, "bytes differ");
    }

    /// The socket's low-water mark, as the relay left it.
    fn rcvlowat(s: &TcpStream) -> i32 {
        socket_int(s.as_raw_fd(), libc::SO_RCVLOWAT).expect("SO_RCVLOWAT")
    }

    /// A run is counted only while reads come back to back; a gap longer than the hold starts
    /// it again, and a zero hold never batches.
    #[tokio::test]
    async fn batching_starts_after_a_back_to_back_run_only() {
        let ((_far, s), _) = pairs().await;
        let fd = s.as_raw_fd();
        let mut b = Batching::new(Duration::from_secs(30));
        b.moved(fd, (RUN_TO_BATCH / 2) as usize);
        assert!(!b.armed && rcvlowat(&s) == 1);
        b.moved(fd, (RUN_TO_BATCH / 2) as usize);
        assert!(b.armed, "a run of {RUN_TO_BATCH} bytes within the hold batches");
        assert_eq!(rcvlowat(&s) as usize, BATCH.min(rcvbuf(fd) / 4));
        b.stop(fd);
        assert!(!b.armed && rcvlowat(&s) == 1);

        let mut b = Batching::new(Duration::from_millis(1));
        b.moved(fd, (RUN_TO_BATCH - 1) as usize);
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.moved(fd, (RUN_TO_BATCH - 1) as usize);
        assert!(!b.armed && rcvlowat(&s) == 1, "a gap longer than the hold starts the run again");

        let mut b = Batching::new(Duration::ZERO);
        b.moved(fd, 64 * RUN_TO_BATCH as usize);
        assert!(!b.armed && rcvlowat(&s) == 1, "a zero hold never batches");
    }

    /// A long run batches its reads, yet what is queued below a batch still leaves once the
    /// hold has passed, with the sender keeping the connection open and waiting: the end of a
    /// download, then small writes after it, each answered before the next is sent.
    #[tokio::test]
    async fn a_batching_direction_never_keeps_a_tail() {
        let ((mut sender, b), (mut receiver, a)) = pairs().await;
        let hold = Duration::from_secs(1);
        let bulk = pattern(8 << 20);
        let (seen_tx, mut seen) = tokio::sync::watch::channel(0usize);
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = receiver.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
                seen_tx.send_replace(got.len());
            }
        });
        let counter = AtomicU64::new(0);
        let mut expected = bulk.clone();
        let drive = async {
            sender.write_all(&bulk).await.unwrap();
            // The last of the bulk is below a batch (or the relay is waiting for the next one)
            // for up to the hold: the low-water mark is raised meanwhile.
            let mut highest = 0;
            while *seen.borrow() < bulk.len() {
                highest = highest.max(rcvlowat(&b));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut total = bulk.len();
            for i in 0..5u8 {
                let small = vec![i; 700];
                sender.write_all(&small).await.unwrap();
                expected.extend_from_slice(&small);
                total += small.len();
                seen.wait_for(|n| *n >= total).await.unwrap();
            }
            let after = rcvlowat(&b);
            drop(sender);
            (highest, after)
        };
        let both = async { tokio::join!(one_way(&b, &a, &counter, hold, || pipe(PIPE)), drive) };
        let (moved, (highest, after)) =
            tokio::time::timeout(Duration::from_secs(60), both).await.expect("the relay kept bytes back");
        assert_eq!(moved.unwrap(), expected.len() as u64);
        assert!(highest > 1, "8 MiB back to back must batch (low-water mark stayed {highest})");
        assert_eq!(after, 1, "once the hold passed with less than a batch, batching stops");
        drop(a);
        assert!(receiver.await.unwrap() == expected, "bytes differ");
    }

    /// The peer's FIN ends a batching direction at once, however long the hold: the kernel
    /// wakes a reader below its low-water mark for it, and the relay asks the kernel rather
    /// than trusting readiness left over from before.
    #[tokio::test]
    async fn a_batching_direction_ends_at_the_fin_not_after_the_hold() {
        let ((mut sender, b), (mut receiver, a)) = pairs().await;
        let data = pattern((8 << 20) + 3000);
        let sent = data.clone();
        let sender = tokio::spawn(async move {
            sender.write_all(&sent).await.unwrap();
            // dropped: FIN right behind a tail below any batch
        });
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        let counter = AtomicU64::new(0);
        let hold = Duration::from_secs(600);
        let moved = tokio::time::timeout(Duration::from_secs(60), one_way(&b, &a, &counter, hold, || pipe(PIPE)))
            .await
            .expect("waited for the hold, not the FIN");
        assert_eq!(moved.unwrap(), data.len() as u64);
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
        let moved = one_way(&b, &a, &counter, DEFAULT_HOLD, refuse).await.unwrap();
        assert_eq!((moved, counter.load(Ordering::Relaxed)), (8 << 20, 8 << 20));
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        assert!(stats().pipe_refused > refused_before);
        drop(a);
        sender.await.unwrap();
        assert!(receiver.await.unwrap() == data, "bytes differ");
    }
}
