//! Connecting to checked addresses: Happy Eyeballs (RFC 8305: IPv6 first, families interleaved,
//! the next attempt starts after 250 ms or as soon as one fails), one deadline for all attempts,
//! and the source address taken from the policy's egress pool.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// Delay before the next attempt while one is still pending.
pub(crate) const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Source-address pools: name -> addresses, with a round-robin cursor each.
#[derive(Debug, Default)]
pub(crate) struct Pools {
    pools: HashMap<String, (Vec<IpAddr>, AtomicUsize)>,
}

/// The pool is unknown or has no source address of the destination's family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoSource;

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// Every address refused the connection.
    #[error("connection refused: {0}")]
    Refused(String),
    /// The deadline passed.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// Unreachable, or another error.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The gateway ran out of something of its own (file descriptors, ephemeral ports, socket
    /// buffers): no other address would fare better.
    #[error("out of local resources: {0}")]
    LocalResources(String),
}

/// Whether a connect error is about this host's resources rather than the destination.
fn is_local_resource(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL))
}

impl Pools {
    /// Builds the pools from the config.
    pub(crate) fn new(cfg: &std::collections::BTreeMap<String, Vec<IpAddr>>) -> Self {
        Pools {
            pools: cfg
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.clone(), (v.clone(), AtomicUsize::new(0))))
                .collect(),
        }
    }

    /// The source address to use towards `dest` from pool `name`: `Ok(None)` lets the kernel
    /// choose (`default` without addresses), `Err` when the pool has no address of that family.
    pub(crate) fn source_for(&self, name: &str, dest: IpAddr) -> Result<Option<IpAddr>, NoSource> {
        match self.pools.get(name) {
            None if name == "default" => Ok(None),
            None => Err(NoSource),
            Some((addrs, cursor)) => {
                let same: Vec<&IpAddr> = addrs.iter().filter(|a| a.is_ipv4() == dest.is_ipv4()).collect();
                if same.is_empty() {
                    return Err(NoSource);
                }
                let i = cursor.fetch_add(1, Ordering::Relaxed);
                Ok(Some(*same[i % same.len()]))
            }
        }
    }
}

/// Orders addresses for Happy Eyeballs: IPv6 first, then alternating families.
pub(crate) fn interleave(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let (v6, v4): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.iter().partition(|a| a.is_ipv6());
    let mut out = Vec::with_capacity(addrs.len());
    let (mut a, mut b) = (v6.into_iter(), v4.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

async fn connect_one(dest: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = if dest.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(src) = source {
        // The port is chosen by connect(), per destination, instead of by bind() for all of
        // them: without this one source address runs out of ports (TIME_WAIT included) after
        // about 28k connections a minute across every upstream, not per upstream.
        // Kernels before 4.2 lack the option; the bind below then works as before.
        let _ = egress_netio::sockopt::set_bind_address_no_port(&sock);
        sock.bind(SocketAddr::new(src, 0))?;
    }
    let s = sock.connect(dest).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects to the first address that answers. `candidates` are (destination, source) pairs,
/// already ordered.
pub(crate) async fn happy_eyeballs(
    candidates: Vec<(SocketAddr, Option<IpAddr>)>,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    if let [(dest, src)] = candidates[..] {
        // One address (an IP literal, a name with one address of the pool's family): nothing to
        // race, so no task per attempt; the errors are those of the race below.
        return match tokio::time::timeout(timeout, connect_one(dest, src)).await {
            Ok(Ok(s)) => Ok((s, dest)),
            Ok(Err(e)) if is_local_resource(&e) => Err(DialError::LocalResources(e.to_string())),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(DialError::Refused(e.to_string())),
            Ok(Err(e)) => Err(DialError::Unreachable(e.to_string())),
            Err(_) => Err(DialError::Timeout(timeout)),
        };
    }
    let work = async {
        let mut set = JoinSet::new();
        let mut next = candidates.into_iter();
        let mut last_err: Option<io::Error> = None;
        let mut refused = true;
        loop {
            if set.is_empty() {
                match next.next() {
                    Some((dest, src)) => {
                        set.spawn(async move { (dest, connect_one(dest, src).await) });
                    }
                    None => {
                        let e = last_err.map(|e| e.to_string()).unwrap_or_else(|| "no address".into());
                        return Err(if refused { DialError::Refused(e) } else { DialError::Unreachable(e) });
                    }
                }
            }
            tokio::select! {
                Some(done) = set.join_next() => match done {
                    Ok((dest, Ok(s))) => return Ok((s, dest)),
                    Ok((_, Err(e))) if is_local_resource(&e) => return Err(DialError::LocalResources(e.to_string())),
                    Ok((_, Err(e))) => {
                        refused &= e.kind() == io::ErrorKind::ConnectionRefused;
                        last_err = Some(e);
                    }
                    Err(e) => {
                        refused = false;
                        last_err = Some(io::Error::other(e.to_string()));
                    }
                },
                _ = tokio::time::sleep(ATTEMPT_DELAY), if next.len() > 0 => {
                    if let Some((dest, src)) = next.next() {
                        set.spawn(async move { (dest, connect_one(dest, src).await) });
                    }
                }
            }
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(Err(DialError::Timeout(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_v6_first() {
        let a: Vec<SocketAddr> =
            ["1.1.1.1:1", "2.2.2.2:1", "[::1]:1", "3.3.3.3:1"].iter().map(|s| s.parse().unwrap()).collect();
        let got: Vec<String> = interleave(&a).iter().map(|s| s.to_string()).collect();
        assert_eq!(got, ["[::1]:1", "1.1.1.1:1", "2.2.2.2:1", "3.3.3.3:1"]);
    }

    #[tokio::test]
    async fn dialled_sockets_carry_tcp_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        let (s, to) = happy_eyeballs(vec![(dest, None)], Duration::from_secs(5)).await.unwrap();
        assert_eq!(to, dest);
        assert!(s.nodelay().unwrap());
    }

    /// The single-address path and the race classify a refused connect alike.
    #[tokio::test]
    async fn a_refused_address_is_refused_alone_or_raced() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        drop(listener);
        for n in [1, 2] {
            match happy_eyeballs(vec![(dest, None); n], Duration::from_secs(5)).await {
                Err(DialError::Refused(_)) => {}
                other => panic!("{n} candidate(s): {:?}", other.map(|(_, d)| d)),
            }
        }
    }

    #[test]
    fn pools_round_robin_per_family() {
        let mut cfg = std::collections::BTreeMap::new();
        cfg.insert(
            "p".to_string(),
            vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        );
        let pools = Pools::new(&cfg);
        let v4: IpAddr = "198.51.100.1".parse().unwrap();
        let v6: IpAddr = "2001:db8:1::1".parse().unwrap();
        let a = pools.source_for("p", v4).unwrap().unwrap();
        let b = pools.source_for("p", v4).unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!(pools.source_for("p", v6).unwrap(), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(pools.source_for("default", v4), Ok(None));
        assert_eq!(pools.source_for("missing", v4), Err(NoSource));
    }
}
