//! Connection limits, in total and per client address, counted per replica.
//!
//! A front asks for a [`ConnPermit`] once it knows the client (the peer address for the HTTP
//! and SOCKS5 fronts, the PROXY header's source on the transparent front, where the peer is a
//! relay) and holds it for the connection's life. The limits are read from the current
//! configuration at each admission, so a reload applies to new connections. The per-client
//! table holds only clients with connections open: it cannot grow past the connections
//! themselves.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// Open connections, in total and per client, and open tunnels per client.
#[derive(Default)]
pub(crate) struct ConnLimits {
    total: AtomicUsize,
    per_client: Counts,
    tunnels: Counts,
}

/// Which limit a connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitHit {
    /// `limits.maxConnections` connections are open.
    Total(usize),
    /// The client has `limits.maxConnectionsPerClient` connections open.
    Client(usize),
    /// The client has `limits.maxTunnelsPerClient` tunnels open.
    Tunnels(usize),
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Total(n) => write!(f, "the gateway has {n} connections open (limits.maxConnections)"),
            LimitHit::Client(n) => {
                write!(f, "this client has {n} connections open (limits.maxConnectionsPerClient)")
            }
            LimitHit::Tunnels(n) => write!(f, "this client has {n} tunnels open (limits.maxTunnelsPerClient)"),
        }
    }
}

/// Something open per client address; a client with none has no entry.
#[derive(Default, Clone)]
struct Counts(Arc<DashMap<IpAddr, usize>>);

/// One counted thing of a client; uncounted when dropped.
struct Slot {
    counts: Counts,
    client: IpAddr,
}

impl Counts {
    /// Counts one more for `client` if it has fewer than `max`.
    fn take(&self, client: IpAddr, max: usize) -> Option<Slot> {
        let mut open = self.0.entry(client).or_insert(0);
        if *open >= max {
            let idle = *open == 0;
            drop(open);
            if idle {
                self.0.remove_if(&client, |_, n| *n == 0);
            }
            return None;
        }
        *open += 1;
        Some(Slot { counts: self.clone(), client })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.counts.0.entry(self.client) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// One admitted connection; counted until dropped.
pub(crate) struct ConnPermit {
    limits: Arc<ConnLimits>,
    _client: Slot,
}

/// One admitted tunnel; counted until dropped.
pub(crate) struct TunnelPermit {
    _slot: Slot,
}

impl ConnLimits {
    /// Admits a connection of `client` if both limits leave room.
    pub(crate) fn admit(
        self: &Arc<Self>,
        client: IpAddr,
        max_total: usize,
        max_client: usize,
    ) -> Result<ConnPermit, LimitHit> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitHit::Total(max_total));
        }
        match self.per_client.take(client, max_client) {
            Some(slot) => Ok(ConnPermit { limits: self.clone(), _client: slot }),
            None => {
                self.total.fetch_sub(1, Ordering::AcqRel);
                Err(LimitHit::Client(max_client))
            }
        }
    }

    /// Admits a tunnel (CONNECT, SOCKS5, transparent) of `client` if it has fewer than `max`
    /// open.
    pub(crate) fn admit_tunnel(&self, client: IpAddr, max: usize) -> Result<TunnelPermit, LimitHit> {
        self.tunnels.take(client, max).map(|_slot| TunnelPermit { _slot }).ok_or(LimitHit::Tunnels(max))
    }

    /// Connections open.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Clients with connections open.
    #[cfg(test)]
    pub(crate) fn clients(&self) -> usize {
        self.per_client.len()
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_past_either_limit_and_frees_on_drop() {
        let l = Arc::new(ConnLimits::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let p1 = l.admit(a, 3, 2).unwrap();
        let p2 = l.admit(a, 3, 2).unwrap();
        assert_eq!(l.admit(a, 3, 2).err(), Some(LimitHit::Client(2)));
        let p3 = l.admit(b, 3, 2).unwrap();
        assert_eq!(l.admit(b, 3, 2).err(), Some(LimitHit::Total(3)));
        assert_eq!((l.open(), l.clients()), (3, 2));
        drop((p1, p2, p3));
        assert_eq!((l.open(), l.clients()), (0, 0), "nothing kept for clients without connections");
        // A refused client leaves no entry behind either.
        assert_eq!(l.admit(a, 5, 0).err(), Some(LimitHit::Client(0)));
        assert_eq!(l.clients(), 0);
        // Tunnels, counted on their own.
        let t = l.admit_tunnel(a, 1).unwrap();
        assert_eq!(l.admit_tunnel(a, 1).err(), Some(LimitHit::Tunnels(1)));
        assert!(l.admit_tunnel(b, 1).is_ok());
        drop(t);
        assert!(l.admit_tunnel(a, 1).is_ok());
        assert_eq!(l.tunnels.len(), 0);
    }
}
