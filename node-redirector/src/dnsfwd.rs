//! The DNS forwarder: selected Pods' DNS to the cluster resolvers is redirected here (one port
//! per resolver, so that each query goes on to the resolver it was addressed to), forwarded
//! unchanged, and each answer is read ([`crate::dns::learn`]) and recorded for the Pod that asked
//! **before** it is released to the Pod: a Pod can never dial an address faster than the node
//! learns the name it resolved it from. The relay then states those names in the PROXY header.
//!
//! UDP and TCP (RFC 7766 framing: a 2-byte length before each message) are both served. The
//! answer goes back byte for byte as the resolver sent it. Bounds: at most [`MAX_INFLIGHT`]
//! UDP queries in flight (more are dropped; the client retries), each waiting at most
//! [`UPSTREAM_TIMEOUT`] for its answer; a TCP client idle for [`TCP_IDLE`] is closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::dns::{Names, learn};

/// UDP queries in flight at once.
pub const MAX_INFLIGHT: usize = 1024;
/// How long a query waits for the resolver.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// A TCP client silent this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// The forwarder's metrics.
#[derive(Default)]
pub struct DnsMetrics {
    /// `egress_redirector_dns_queries_total{transport, result}`.
    pub queries: Family<QueryLabels, Counter>,
    /// `egress_redirector_dns_names`: names held, all Pods together.
    pub names: Gauge,
    /// `egress_redirector_dns_evicted_total`: names evicted to stay within the caps.
    pub evicted: Counter,
}

/// Labels of [`DnsMetrics::queries`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// `udp` or `tcp`.
    pub transport: &'static str,
    /// `recorded` (an answer that bound a name), `answered` (one that bound nothing: NXDOMAIN,
    /// no address, another type), `failed` (no answer from the resolver) or `dropped` (too many
    /// in flight).
    pub result: &'static str,
}

/// What the forwarder and the relay share: the names each Pod resolved.
pub struct Forwarder {
    names: Mutex<Names<String>>,
    /// Pod address -> the Pod's key (`namespace/name`), from the inputs.
    pods: arc_swap::ArcSwap<HashMap<IpAddr, String>>,
    /// Metrics.
    pub metrics: Arc<DnsMetrics>,
    inflight: Arc<tokio::sync::Semaphore>,
}

impl Forwarder {
    /// A forwarder keeping `max_names` names per Pod, each address for its TTL plus `grace`.
    pub fn new(max_names: usize, grace: Duration, metrics: Arc<DnsMetrics>) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            names: Mutex::new(Names::new(max_names, grace)),
            pods: arc_swap::ArcSwap::from_pointee(HashMap::new()),
            metrics,
            inflight: Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT)),
        })
    }

    /// The Pods of this node (their addresses name them); names of Pods no longer listed are
    /// dropped at the next sweep.
    pub fn set_pods(&self, pods: &[crate::config::PodEntry]) {
        let map: HashMap<IpAddr, String> = pods
            .iter()
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, format!("{}/{}", p.namespace, p.name))))
            .collect();
        if **self.pods.load() != map {
            self.pods.store(Arc::new(map));
        }
    }

    /// The key names are kept under for a client address: its Pod, else the address itself.
    fn key(&self, ip: IpAddr) -> String {
        let ip = canonical_ip(ip);
        self.pods.load().get(&ip).cloned().unwrap_or_else(|| ip.to_string())
    }

    /// The names the Pod at `client` resolved to `dst`, most recently answered first (at most
    /// the names TLV's cap).
    pub fn names_for(&self, client: IpAddr, dst: IpAddr) -> Vec<String> {
        let key = self.key(client);
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.lookup(&key, canonical_ip(dst), Instant::now(), egress_netio::proxy::MAX_DNS_NAMES)
    }

    /// Reads an answer to `query` for `client` and records what it binds; before the answer is
    /// released. Returns whether it bound a name.
    fn record(&self, client: IpAddr, query: &[u8], answer: &[u8]) -> bool {
        let Some(learned) = learn(query, answer) else { return false };
        let key = self.key(client);
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let before = names.evicted;
        names.record(&key, &learned, Instant::now());
        self.metrics.evicted.inc_by(names.evicted - before);
        true
    }

    /// Drops expired names and those of Pods gone; every 10 s.
    pub async fn sweep_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pods = self.pods.load_full();
            let live: std::collections::HashSet<&String> = pods.values().collect();
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            names.sweep(Instant::now(), |k| live.contains(k));
            self.metrics.names.set(names.len() as i64);
        }
    }

    fn count(&self, transport: &'static str, result: &'static str) {
        self.metrics.queries.get_or_create(&QueryLabels { transport, result }).inc();
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it means (a dual-stack socket's view).
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Serves UDP queries arriving on `socket`, forwarding each to `upstream`.
pub async fn serve_udp(socket: UdpSocket, upstream: SocketAddr, fwd: Arc<Forwarder>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok(permit) = fwd.inflight.clone().try_acquire_owned() else {
            fwd.count("udp", "dropped");
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, fwd) = (socket.clone(), fwd.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match ask_udp(&query, upstream).await {
                Some(answer) => {
                    let recorded = fwd.record(client.ip(), &query, &answer);
                    fwd.count("udp", if recorded { "recorded" } else { "answered" });
                    let _ = socket.send_to(&answer, client).await;
                }
                None => fwd.count("udp", "failed"),
            }
        });
    }
}

/// One query to `upstream` over UDP from a fresh socket; its answer (same id), or `None`.
async fn ask_udp(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
    let s = UdpSocket::bind(local).await.ok()?;
    s.connect(upstream).await.ok()?;
    s.send(query).await.ok()?;
    let id = query.get(..2)?;
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, s.recv(&mut buf)).await.ok()?.ok()?;
        if buf.get(..2) == Some(id) {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

/// Serves TCP clients arriving on `listener`, forwarding their queries to `upstream`.
pub async fn serve_tcp(listener: TcpListener, upstream: SocketAddr, fwd: Arc<Forwarder>) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let fwd = fwd.clone();
        tokio::spawn(async move {
            let _ = serve_tcp_client(client, peer, upstream, &fwd).await;
        });
    }
}

async fn read_message(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    tokio::time::timeout(limit, s.read_exact(&mut len)).await.ok()?.ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    tokio::time::timeout(limit, s.read_exact(&mut msg)).await.ok()?.ok()?;
    Some(msg)
}

async fn serve_tcp_client(
    mut client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    fwd: &Forwarder,
) -> Option<()> {
    let mut up: Option<TcpStream> = None;
    loop {
        let query = read_message(&mut client, TCP_IDLE).await?;
        if up.is_none() {
            let c =
                tokio::time::timeout(UPSTREAM_TIMEOUT, TcpStream::connect(upstream)).await.ok().and_then(Result::ok);
            if c.is_none() {
                fwd.count("tcp", "failed");
                return None;
            }
            up = c;
        }
        let u = up.as_mut()?;
        let framed = [&(query.len() as u16).to_be_bytes()[..], &query].concat();
        let answer = match u.write_all(&framed).await {
            Ok(()) => read_message(u, UPSTREAM_TIMEOUT).await,
            Err(_) => None,
        };
        let Some(answer) = answer else {
            fwd.count("tcp", "failed");
            return None;
        };
        let recorded = fwd.record(peer.ip(), &query, &answer);
        fwd.count("tcp", if recorded { "recorded" } else { "answered" });
        client.write_all(&[&(answer.len() as u16).to_be_bytes()[..], &answer].concat()).await.ok()?;
    }
}
