//! Zero-copy relaying with `splice(2)`: socket -> pipe -> socket, in the kernel, both directions
//! at once; a half-close is passed on. Nothing is allocated per chunk; bytes are counted as they
//! pass (for audit and idle detection).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

const CHUNK: usize = 1 << 20;
const BATCH: usize = 256 << 10;

fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two valid fds on success; we own them from here on.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A larger pipe moves more per call; failure to grow it is harmless.
    // SAFETY: fcntl on a valid pipe fd.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    Ok((r, w))
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

/// One direction: `from` -> `to` until EOF; then `to`'s write side is shut down. `pipe_size` is
/// the kernel pipe's size in bytes (it holds that many pages, one socket fragment each).
async fn one_way(from: &TcpStream, to: &TcpStream, counter: &AtomicU64, pipe_size: usize) -> io::Result<u64> {
    let (pr, pw) = pipe(pipe_size)?;
    let mut total = 0u64;
    loop {
        let mut in_pipe = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pw.as_raw_fd(), CHUNK)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if in_pipe == 0 {
            // SAFETY: shutdown on a valid connected socket.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        // Take whatever else is already queued (never waiting for more), so that it leaves in as
        // few sends as possible: measured to help bulk transfers (fewer, larger segments).
        // Not through `try_io`: EAGAIN here may mean that the *pipe* is full (it holds one socket
        // fragment per page), and clearing the socket's readiness then would wait for an edge
        // that never comes once the sender is stalled on a full receive window. The next
        // `readable()` returns at once and the splice into the emptied pipe tells the truth.
        while in_pipe < BATCH {
            match splice(from.as_raw_fd(), pw.as_raw_fd(), CHUNK - in_pipe) {
                Ok(n) if n > 0 => in_pipe += n,
                // EOF is seen again by the next read; EAGAIN: nothing more queued, or the pipe full.
                _ => break,
            }
        }
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(pr.as_raw_fd(), to.as_raw_fd(), in_pipe)) {
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

/// Relays both directions until both are finished (or one fails), counting bytes a->b into
/// `a_to_b` and b->a into `b_to_a` as they pass; returns the totals.
pub async fn relay(a: &TcpStream, b: &TcpStream, a_to_b: &AtomicU64, b_to_a: &AtomicU64) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, a_to_b, CHUNK), one_way(b, a, b_to_a, CHUNK))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_counts_and_passes_half_close() {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (fa, ba) = (front.local_addr().unwrap(), back.local_addr().unwrap());
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let server = tokio::spawn(async move {
            let (mut s, _) = back.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap(); // ends when the client half-closes
            s.write_all(&vec![7u8; 3 << 20]).await.unwrap();
            got.len()
        });
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(fa).await.unwrap();
            c.write_all(&vec![1u8; 5 << 20]).await.unwrap();
            c.shutdown().await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            back.len()
        });
        let (a, _) = front.accept().await.unwrap();
        let b = tokio::net::TcpStream::connect(ba).await.unwrap();
        let (x, y) = relay(&a, &b, &up, &down).await.unwrap();
        assert_eq!((x, y), (5 << 20, 3 << 20));
        assert_eq!((up.load(Ordering::Relaxed), down.load(Ordering::Relaxed)), (5 << 20, 3 << 20));
        drop((a, b));
        assert_eq!(server.await.unwrap(), 5 << 20);
        assert_eq!(client.await.unwrap(), 3 << 20);
    }

    /// A pipe that fills up before the socket is drained (one page: one fragment) must not stall
    /// the transfer: the sender writes many small segments, so the pipe is full long before a
    /// batch is, again and again.
    #[tokio::test]
    async fn a_full_pipe_never_stalls_the_transfer() {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (fa, ba) = (front.local_addr().unwrap(), back.local_addr().unwrap());
        const TOTAL: usize = 700 * 12_000;
        let sender = tokio::spawn(async move {
            let (mut s, _) = back.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            for _ in 0..TOTAL / 700 {
                s.write_all(&[3u8; 700]).await.unwrap();
            }
        });
        let receiver = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(fa).await.unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        let (a, _) = front.accept().await.unwrap();
        let b = tokio::net::TcpStream::connect(ba).await.unwrap();
        let counter = AtomicU64::new(0);
        // b -> a only, through a one-page pipe.
        let moved = tokio::time::timeout(std::time::Duration::from_secs(30), one_way(&b, &a, &counter, 4096)).await;
        assert!(moved.is_ok(), "stalled after {} of {TOTAL} bytes", counter.load(Ordering::Relaxed));
        assert_eq!(moved.unwrap().unwrap(), TOTAL as u64);
        drop(a);
        sender.await.unwrap();
        assert_eq!(receiver.await.unwrap(), TOTAL);
    }
}
