//! The node relay: accepts redirected connections (and only those), recovers the original
//! destination with `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, connects to a healthy gateway
//! endpoint, sends a signed PROXY protocol v2 header (source = Pod, destination = original, and
//! the names the Pod resolved to that address; see `egress_netio::proxy`), then relays with
//! splice(2).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The original destination of a redirected connection (from conntrack: `SO_ORIGINAL_DST`,
/// `IP6T_SO_ORIGINAL_DST`).
pub fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(s);
    let addr = if s.local_addr()?.is_ipv4() { sock.original_dst_v4()? } else { sock.original_dst_v6()? };
    addr.as_socket().ok_or_else(|| std::io::Error::other("SO_ORIGINAL_DST: not an IP address"))
}

/// One gateway endpoint and its health.
#[derive(Debug)]
struct Endpoint {
    addr: SocketAddr,
    up: AtomicBool,
    probing: AtomicBool,
}

/// Gateway endpoints (swapped whole when they change), each healthy or down. New connections are
/// spread over the healthy ones; one that fails to connect (refused, or silent for
/// `relay.connectTimeout`) is marked down at once and probed in the background every
/// `relay.probeInterval` until it answers, so a silent endpoint costs one timeout in total, not
/// one per connection, and traffic returns to it once it is back.
pub struct Endpoints {
    list: arc_swap::ArcSwap<Vec<Arc<Endpoint>>>,
    next: AtomicUsize,
    timeout: Duration,
    probe_interval: Duration,
    metrics: Arc<RelayMetrics>,
}

/// The relay's metrics (registered by [`crate::admin::Admin`]).
#[derive(Default)]
pub struct RelayMetrics {
    /// `egress_redirector_endpoint_up{endpoint}`: 1 healthy, 0 down.
    pub endpoint_up: Family<EndpointLabel, Gauge>,
    /// `egress_redirector_relay_refused_total{reason}`: connections the relay refused.
    pub refused: Family<ReasonLabel, Counter>,
    /// `egress_redirector_endpoint_failures_total{endpoint}`: connects for clients that failed
    /// (refused or timed out; probes not counted).
    pub failures: Family<EndpointLabel, Counter>,
}

/// Label of [`RelayMetrics::endpoint_up`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// `ip:port`.
    pub endpoint: String,
}

/// Label of [`RelayMetrics::refused`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `not_redirected` (a direct connection to the relay port) or `no_endpoint`.
    pub reason: &'static str,
}

impl Endpoints {
    /// The endpoints, all presumed healthy, each connect given up to `timeout`.
    pub fn new(list: Vec<SocketAddr>, timeout: Duration, probe_interval: Duration, metrics: Arc<RelayMetrics>) -> Self {
        let e = Endpoints {
            list: arc_swap::ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            timeout,
            probe_interval,
            metrics,
        };
        e.set(list);
        e
    }

    /// Replaces the endpoint list; endpoints that stay keep their health.
    pub fn set(&self, list: Vec<SocketAddr>) {
        let old = self.list.load_full();
        if old.iter().map(|e| e.addr).eq(list.iter().copied()) {
            return;
        }
        tracing::info!(endpoints = ?list, "gateway endpoints changed");
        let new: Vec<Arc<Endpoint>> = list
            .iter()
            .map(|a| {
                old.iter().find(|e| e.addr == *a).cloned().unwrap_or_else(|| {
                    Arc::new(Endpoint { addr: *a, up: AtomicBool::new(true), probing: AtomicBool::new(false) })
                })
            })
            .collect();
        for e in old.iter().filter(|e| !list.contains(&e.addr)) {
            self.metrics.endpoint_up.remove(&EndpointLabel { endpoint: e.addr.to_string() });
        }
        for e in &new {
            self.gauge(e);
        }
        self.list.store(Arc::new(new));
    }

    fn gauge(&self, e: &Endpoint) {
        let up = e.up.load(Ordering::Relaxed);
        self.metrics.endpoint_up.get_or_create(&EndpointLabel { endpoint: e.addr.to_string() }).set(up as i64);
    }

    /// Connects to a healthy endpoint, the next one in turn; on failure marks it down and tries
    /// the next healthy one. Fails at once when none is healthy (fail closed: the client's
    /// connection is reset; the probes bring endpoints back).
    pub async fn connect(self: &Arc<Self>) -> std::io::Result<TcpStream> {
        let list = self.list.load_full();
        let n = list.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = std::io::Error::other("no healthy gateway endpoint");
        for i in 0..n {
            let e = &list[(start + i) % n];
            if !e.up.load(Ordering::Relaxed) {
                continue;
            }
            match tokio::time::timeout(self.timeout, TcpStream::connect(e.addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(err)) => last = err,
                Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, "gateway connect timed out"),
            }
            self.metrics.failures.get_or_create(&EndpointLabel { endpoint: e.addr.to_string() }).inc();
            self.mark_down(e, &last);
        }
        Err(last)
    }

    fn mark_down(self: &Arc<Self>, e: &Arc<Endpoint>, why: &std::io::Error) {
        if e.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(endpoint = %e.addr, error = %why, "gateway endpoint down; probing it in the background");
            self.gauge(e);
        }
        if e.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let (this, e) = (self.clone(), e.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(this.probe_interval).await;
                if !this.list.load().iter().any(|x| Arc::ptr_eq(x, &e)) {
                    break; // no longer an endpoint
                }
                if let Ok(Ok(mut s)) = tokio::time::timeout(this.timeout, TcpStream::connect(e.addr)).await {
                    // A LOCAL header: the gateway takes it as a health check.
                    let _ = s.write_all(&egress_netio::proxy::LOCAL).await;
                    e.up.store(true, Ordering::Relaxed);
                    this.gauge(&e);
                    tracing::info!(endpoint = %e.addr, "gateway endpoint answers again");
                    break;
                }
            }
            e.probing.store(false, Ordering::Relaxed);
        });
    }
}

/// What [`serve`] needs for every connection.
pub struct Relay {
    /// Where connections go.
    pub endpoints: Arc<Endpoints>,
    /// Signs every PROXY header.
    pub signer: egress_netio::proxy::Signer,
    /// Read batching hold (`relay.coalesce`).
    pub coalesce: Duration,
    /// The names each Pod resolved (`dns.enabled`), stated in the header's names TLV.
    pub names: Option<Arc<crate::dnsfwd::Forwarder>>,
}

/// Serves redirected connections on `listener`.
pub async fn serve(listener: TcpListener, relay: Arc<Relay>) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let relay = relay.clone();
        // Boxed, so that spawning and finishing the task move a pointer, not the relay's state.
        tokio::spawn(Box::pin(async move {
            if let Err(e) = handle(client, peer, &relay).await {
                tracing::debug!(peer = %peer, error = %e, "relay connection ended with an error");
            }
        }));
    }
}

/// Resets `s` (RST, not FIN): the client sees a refused connection.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

async fn handle(client: TcpStream, peer: SocketAddr, relay: &Relay) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    // Only connections the table redirected here: a direct connection to the relay port has no
    // original destination other than the relay itself (the table also resets those).
    let original = match original_dst(&client) {
        Ok(o) if o != client.local_addr()? => o,
        other => {
            relay.endpoints.metrics.refused.get_or_create(&ReasonLabel { reason: "not_redirected" }).inc();
            tracing::warn!(peer = %peer, "refused a connection that was not redirected to the relay");
            reset(client);
            return other.map(|_| ());
        }
    };
    // Fail closed: no gateway, no connection (the client sees a reset).
    let mut gw = match relay.endpoints.connect().await {
        Ok(gw) => gw,
        Err(e) => {
            relay.endpoints.metrics.refused.get_or_create(&ReasonLabel { reason: "no_endpoint" }).inc();
            reset(client);
            return Err(e);
        }
    };
    // The names this Pod recently resolved to the address it dialled (most recent first).
    let names = relay.names.as_ref().map(|f| f.names_for(peer.ip(), original.ip())).unwrap_or_default();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    gw.write_all(&relay.signer.header_with_names(peer, original, &names, std::time::SystemTime::now())).await?;
    let (up, down) = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));
    egress_netio::relay(&client, &gw, &up, &down, relay.coalesce).await?;
    Ok(())
}
