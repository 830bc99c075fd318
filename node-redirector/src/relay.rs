//! The node relay: accepts redirected connections, recovers the original destination with
//! `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, connects to a gateway endpoint (the next one on
//! failure), sends a PROXY protocol v2 header (source = Pod, destination = original), then relays
//! with splice(2).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The original destination of a redirected connection (from conntrack).
pub fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let fd = s.as_raw_fd();
    if s.local_addr()?.is_ipv4() {
        // SAFETY: getsockopt writes at most `len` bytes into a properly sized sockaddr_in.
        unsafe {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, &mut addr as *mut _ as *mut libc::c_void, &mut len)
                != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
        }
    } else {
        // SAFETY: as above, with sockaddr_in6.
        unsafe {
            let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                IP6T_SO_ORIGINAL_DST,
                &mut addr as *mut _ as *mut libc::c_void,
                &mut len,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0)))
        }
    }
}

/// Gateway endpoints (swapped whole when they change) with the index of the last one that worked.
pub struct Endpoints {
    list: arc_swap::ArcSwap<Vec<SocketAddr>>,
    preferred: AtomicUsize,
    timeout: Duration,
}

impl Endpoints {
    /// The endpoints, tried in order starting from the last good one, each for up to `timeout`.
    pub fn new(list: Vec<SocketAddr>, timeout: Duration) -> Self {
        Endpoints { list: arc_swap::ArcSwap::from_pointee(list), preferred: AtomicUsize::new(0), timeout }
    }

    /// Replaces the endpoint list.
    pub fn set(&self, list: Vec<SocketAddr>) {
        if **self.list.load() != list {
            tracing::info!(endpoints = ?list, "gateway endpoints changed");
            self.list.store(std::sync::Arc::new(list));
        }
    }

    /// Connects to the first endpoint that answers.
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        let list = self.list.load_full();
        let n = list.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = std::io::Error::other("no gateway endpoint");
        for i in 0..n {
            let idx = (start + i) % n;
            match tokio::time::timeout(self.timeout, TcpStream::connect(list[idx])).await {
                Ok(Ok(s)) => {
                    if idx != start {
                        tracing::warn!(endpoint = %list[idx], "failed over to another gateway endpoint");
                        self.preferred.store(idx, Ordering::Relaxed);
                    }
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, "gateway connect timed out"),
            }
        }
        Err(last)
    }
}

/// The PROXY v2 header for one connection.
pub fn proxy_header(source: SocketAddr, original: SocketAddr) -> std::io::Result<Vec<u8>> {
    let (source, original) = match (source, original) {
        (SocketAddr::V6(s), SocketAddr::V4(o)) => match s.ip().to_ipv4_mapped() {
            Some(v4) => (SocketAddr::from((v4, s.port())), SocketAddr::V4(o)),
            None => (SocketAddr::V6(s), SocketAddr::from((o.ip().to_ipv6_mapped(), o.port()))),
        },
        other => other,
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, original),
    )
    .build()
}

/// Serves redirected connections on `listener`; bulk reads are batched for up to `coalesce`
/// (`relay.coalesce`).
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>, coalesce: Duration) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(client, peer, &endpoints, coalesce).await {
                tracing::debug!(peer = %peer, error = %e, "relay connection ended with an error");
            }
        });
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, endpoints: &Endpoints, coalesce: Duration) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let original = original_dst(&client)?;
    // Fail closed: no gateway, no connection (the client sees a reset).
    let mut gw = endpoints.connect().await?;
    gw.write_all(&proxy_header(peer, original)?).await?;
    let (up, down) = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));
    egress_netio::relay(&client, &gw, &up, &down, coalesce).await?;
    Ok(())
}
