//! The floor of a forward proxy on this machine: the least CPU a user-space proxy can spend per
//! request, to judge the gateway's cost against (bench/floor.sh). Not a product and not safe to
//! expose: no policy, no audit, no DNS, no limits, no timeouts.
//!
//! One thread, one level-triggered epoll loop, non-blocking sockets and nothing allocated per
//! chunk. It does only what any forward proxy must do:
//! - `CONNECT ip:port`: connect, answer 200, then relay both ways, passing half-closes on.
//! - An absolute-form request to `http://ip:port/...`: connect once per client connection, then
//!   pass each request on in origin form (the request line's scheme and authority cut out, the
//!   rest sent as it came, with one `writev`) and the answers back as they come. It assumes what
//!   the benchmark's load does: every read from the client starts with a request line, and nothing
//!   is pipelined.
//!
//! ```sh
//! cargo run --release --example floor_proxy -p egress-netio -- 127.0.0.1:28128
//! ```

use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Marks the listener's events.
const LISTENER: u64 = u64::MAX;

enum State {
    /// Reading the first request head from the client.
    Head,
    /// Connecting to the target; the client is not watched meanwhile.
    Connecting,
    /// Relaying both ways.
    Relay,
}

struct Conn {
    /// Client (0) and upstream (1); -1 before the upstream socket exists.
    fds: [RawFd; 2],
    state: State,
    /// The first request head (and anything after it) until the upstream is connected.
    head: Vec<u8>,
    /// Absolute-form forwarding: request lines are rewritten to origin form.
    forward: bool,
    /// Whether each side still sends (not yet read EOF from it).
    open: [bool; 2],
}

fn check(rc: libc::c_int, what: &str) -> libc::c_int {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
    rc
}

fn ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: epoll_ctl with a valid event struct.
    let _ = unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
}

/// Turns a boolean socket option on.
fn set_on(fd: RawFd, level: libc::c_int, option: libc::c_int) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a c_int value and its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn nodelay(fd: RawFd) {
    set_on(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY);
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_in, libc::socklen_t) {
    let SocketAddr::V4(a) = addr else { panic!("IPv4 targets only") };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    };
    (sin, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
}

/// Sends all of `a` then `b` to `fd` (one `writev`); waits with poll(2) in the rare case the
/// socket is full. False when the peer is gone.
fn send_all(fd: RawFd, a: &[u8], b: &[u8]) -> bool {
    let mut parts = [a, b];
    while parts.iter().any(|p| !p.is_empty()) {
        let iov = parts.map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() });
        // SAFETY: writev over buffers that outlive the call.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                return false;
            }
            let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
            // SAFETY: poll on one pollfd.
            unsafe { libc::poll(&mut p, 1, -1) };
            continue;
        }
        let mut n = n as usize;
        for p in &mut parts {
            let take = n.min(p.len());
            *p = &p[take..];
            n -= take;
        }
    }
    true
}

/// Splits an absolute-form request line's start into (up to and including the space before the
/// URL, the rest from the path on) and the target's address; `None` if `buf` does not start with
/// one.
fn absolute_form(buf: &[u8]) -> Option<(usize, usize, SocketAddr)> {
    let sp = buf.iter().position(|&b| b == b' ')?;
    let rest = buf[sp + 1..].strip_prefix(b"http://")?;
    let slash = rest.iter().position(|&b| b == b'/')?;
    let addr = std::str::from_utf8(&rest[..slash]).ok()?.parse().ok()?;
    Some((sp + 1, sp + 1 + 7 + slash, addr))
}

fn main() {
    let listen: SocketAddr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:28128".into()).parse().unwrap();
    // SAFETY: plain socket calls on descriptors this process owns.
    let (ep, lfd) = unsafe {
        let lfd = check(
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0),
            "socket",
        );
        set_on(lfd, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        let (sa, len) = sockaddr(listen);
        check(libc::bind(lfd, (&sa as *const libc::sockaddr_in).cast(), len), "bind");
        check(libc::listen(lfd, 4096), "listen");
        (check(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1"), lfd)
    };
    ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32, LISTENER);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 16 << 10];
    loop {
        // SAFETY: epoll_wait into a buffer of that many events.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as libc::c_int, -1) };
        for ev in &events[..n.max(0) as usize] {
            let token = ev.u64;
            if token == LISTENER {
                loop {
                    // SAFETY: accept4 without an address.
                    let fd = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if fd < 0 {
                        break;
                    }
                    nodelay(fd);
                    let conn =
                        Conn { fds: [fd, -1], state: State::Head, head: Vec::new(), forward: false, open: [true; 2] };
                    let slot = match free.pop() {
                        Some(s) => {
                            conns[s] = Some(conn);
                            s
                        }
                        None => {
                            conns.push(Some(conn));
                            conns.len() - 1
                        }
                    };
                    ctl(ep, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, (slot as u64) << 1);
                }
                continue;
            }
            let (slot, side) = ((token >> 1) as usize, (token & 1) as usize);
            let Some(c) = conns[slot].as_mut() else { continue };
            let done = match c.state {
                State::Head => {
                    // SAFETY: recv into a buffer of that length.
                    let n = unsafe { libc::recv(c.fds[0], buf.as_mut_ptr().cast(), buf.len(), 0) };
                    if n <= 0 {
                        true
                    } else {
                        c.head.extend_from_slice(&buf[..n as usize]);
                        match c.head.windows(4).position(|w| w == b"\r\n\r\n") {
                            None => false,
                            Some(_) => {
                                let target = if let Some(t) = c.head.strip_prefix(b"CONNECT ") {
                                    let end = t.iter().position(|&b| b == b' ').unwrap_or(t.len());
                                    std::str::from_utf8(&t[..end]).ok().and_then(|s| s.parse().ok())
                                } else {
                                    c.forward = true;
                                    absolute_form(&c.head).map(|(_, _, a)| a)
                                };
                                match target {
                                    None => true,
                                    Some(addr) => {
                                        // SAFETY: a new non-blocking socket, connected without waiting.
                                        let up = unsafe {
                                            let up = libc::socket(
                                                libc::AF_INET,
                                                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                                                0,
                                            );
                                            let (sa, len) = sockaddr(addr);
                                            libc::connect(up, (&sa as *const libc::sockaddr_in).cast(), len);
                                            up
                                        };
                                        nodelay(up);
                                        c.fds[1] = up;
                                        c.state = State::Connecting;
                                        ctl(ep, libc::EPOLL_CTL_MOD, c.fds[0], 0, (slot as u64) << 1);
                                        ctl(
                                            ep,
                                            libc::EPOLL_CTL_ADD,
                                            up,
                                            libc::EPOLLOUT as u32,
                                            ((slot as u64) << 1) | 1,
                                        );
                                        false
                                    }
                                }
                            }
                        }
                    }
                }
                State::Connecting => {
                    let mut err: libc::c_int = 0;
                    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    // SAFETY: getsockopt into a c_int with its size.
                    unsafe {
                        libc::getsockopt(
                            c.fds[1],
                            libc::SOL_SOCKET,
                            libc::SO_ERROR,
                            (&mut err as *mut libc::c_int).cast(),
                            &mut len,
                        )
                    };
                    if err != 0 {
                        send_all(c.fds[0], b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", &[]);
                        true
                    } else {
                        let head = std::mem::take(&mut c.head);
                        let ok = if c.forward {
                            let (a, b, _) = absolute_form(&head).expect("checked when the head arrived");
                            send_all(c.fds[1], &head[..a], &head[b..])
                        } else {
                            let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                            send_all(c.fds[0], b"HTTP/1.1 200 Connection established\r\n\r\n", &[])
                                && send_all(c.fds[1], &head[end..], &[])
                        };
                        c.state = State::Relay;
                        ctl(ep, libc::EPOLL_CTL_MOD, c.fds[1], libc::EPOLLIN as u32, ((slot as u64) << 1) | 1);
                        ctl(ep, libc::EPOLL_CTL_MOD, c.fds[0], libc::EPOLLIN as u32, (slot as u64) << 1);
                        !ok
                    }
                }
                State::Relay => {
                    let (from, to) = (c.fds[side], c.fds[1 - side]);
                    // SAFETY: recv into a buffer of that length.
                    let n = unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), 0) };
                    if n < 0 {
                        std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
                    } else if n == 0 {
                        // SAFETY: shutdown and epoll_ctl on sockets this connection owns.
                        unsafe { libc::shutdown(to, libc::SHUT_WR) };
                        ctl(ep, libc::EPOLL_CTL_DEL, from, 0, 0);
                        c.open[side] = false;
                        !c.open[1 - side]
                    } else {
                        let got = &buf[..n as usize];
                        let ok = match (side, c.forward, absolute_form(got)) {
                            (0, true, Some((a, b, _))) => send_all(to, &got[..a], &got[b..]),
                            _ => send_all(to, got, &[]),
                        };
                        !ok
                    }
                }
            };
            if done {
                let c = conns[slot].take().unwrap();
                for fd in c.fds.into_iter().filter(|&fd| fd >= 0) {
                    // SAFETY: each descriptor is closed once; closing also removes it from epoll.
                    unsafe { libc::close(fd) };
                }
                free.push(slot);
            }
        }
    }
}
