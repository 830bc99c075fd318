//! The one request type every front builds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::policy::HttpFacts;

/// Which front a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Front {
    /// Absolute-form HTTP request through the explicit proxy.
    Http,
    /// CONNECT tunnel through the explicit proxy.
    Connect,
    /// SOCKS5 CONNECT.
    Socks5,
    /// A connection steered by the node-redirector (PROXY protocol v2).
    Transparent,
}

impl Front {
    /// Every front.
    pub const ALL: [Front; 4] = [Front::Http, Front::Connect, Front::Socks5, Front::Transparent];

    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Front::Http => "http",
            Front::Connect => "connect",
            Front::Socks5 => "socks5",
            Front::Transparent => "transparent",
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct ClientConn {
    /// Connection id, unique per gateway instance run.
    pub id: Arc<str>,
    /// The client's address as the gateway sees it.
    pub peer: SocketAddr,
    requests: AtomicU32,
}

impl ClientConn {
    /// A new connection record.
    pub(crate) fn new(id: Arc<str>, peer: SocketAddr) -> Self {
        ClientConn { id, peer, requests: AtomicU32::new(0) }
    }

    /// The next request id on this connection: `<connection id>.<n>`.
    pub(crate) fn next_request_id(&self) -> Arc<str> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let mut digits = itoa::Buffer::new();
        let n = digits.format(n);
        // Built on the stack and copied once into the Arc (connection ids are about 20 bytes).
        let mut buf = [0u8; 64];
        let len = self.id.len() + 1 + n.len();
        if len > buf.len() {
            return format!("{}.{n}", self.id).into();
        }
        buf[..self.id.len()].copy_from_slice(self.id.as_bytes());
        buf[self.id.len()] = b'.';
        buf[self.id.len() + 1..len].copy_from_slice(n.as_bytes());
        std::str::from_utf8(&buf[..len]).map_or_else(|_| format!("{}.{n}", self.id).into(), Arc::from)
    }
}

/// Where the client wants to go, as its protocol spelled it (normalised by the pipeline).
#[derive(Debug, Clone)]
pub(crate) enum RawTarget {
    /// `host:port` (CONNECT request target).
    Authority(String),
    /// Host as written, and port (absolute-form URI, SOCKS5 domain).
    HostPort(String, u16),
    /// An address (SOCKS5 IPv4/IPv6).
    Addr(SocketAddr),
}

/// What every front hands to the pipeline.
#[derive(Debug, Clone)]
pub(crate) struct EgressRequest {
    /// The client connection.
    pub conn: Arc<ClientConn>,
    /// Request id (decision and close events share it; denial bodies name it).
    pub id: Arc<str>,
    /// The front.
    pub front: Front,
    /// Where to.
    pub target: RawTarget,
    /// Method and path for plain-HTTP requests.
    pub http: Option<HttpFacts>,
    /// What the transparent front knows (original destination, relay, SNI or Host); boxed, as
    /// in the events: the other fronts' requests carry a pointer through every stage.
    pub transparent: Option<Box<TransparentFacts>>,
    /// A credential the client presented for this request (HTTP `Proxy-Authorization`).
    pub credential: Option<Credential>,
}

/// A credential a client presented.
#[derive(Clone)]
pub(crate) enum Credential {
    /// A ServiceAccount token (HTTP `Proxy-Authorization`). Never logged, audited or shown: its
    /// `Debug` says only that there is one.
    Token(Arc<str>),
    /// The SOCKS5 user (RFC 1929) the client authenticated as.
    Socks5User(Arc<str>),
    /// The client certificate the HTTPS front verified in the handshake.
    Certificate(Arc<crate::certs::ClientCert>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Token(<redacted>)"),
            Credential::Socks5User(u) => write!(f, "Socks5User({u:?})"),
            Credential::Certificate(c) => write!(f, "Certificate({c:?})"),
        }
    }
}

impl EgressRequest {
    /// A request with no target yet: what a refusal before the target is known (a handshake
    /// gone wrong, a connection limit) is audited as.
    pub(crate) fn bare(conn: &Arc<ClientConn>, front: Front) -> Self {
        EgressRequest {
            id: conn.next_request_id(),
            conn: conn.clone(),
            front,
            target: RawTarget::Authority(String::new()),
            http: None,
            transparent: None,
            credential: None,
        }
    }
}

/// Facts of a transparently steered connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransparentFacts {
    /// The one of `dns_names` that allowed the connection (set by the pipeline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<Arc<str>>,
    /// The names the Pod recently resolved to `original_dst`, as the relay stated them (most
    /// recently answered first); decided only when the payload names nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<Arc<str>>,
    /// HTTP Host header of the first request, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_host: Option<String>,
    /// The destination the Pod dialled (from the PROXY header).
    pub original_dst: SocketAddr,
    /// Whether the original destination was among the addresses the gateway resolved for the
    /// name (set by the pipeline; absent when the decision did not resolve a name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_in_resolved: Option<bool>,
    /// The relay (node) that forwarded the connection.
    pub relay: SocketAddr,
    /// TLS server name from the ClientHello, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_number_the_connections_requests_from_one() {
        let conn = ClientConn::new("4a181add0c56-7".into(), "127.0.0.1:1".parse().unwrap());
        assert_eq!(&*conn.next_request_id(), "4a181add0c56-7.1");
        assert_eq!(&*conn.next_request_id(), "4a181add0c56-7.2");
        // An id too long for the stack buffer is formatted alike.
        let long: String = "x".repeat(70);
        let conn = ClientConn::new(long.as_str().into(), "127.0.0.1:1".parse().unwrap());
        conn.requests.store(u32::MAX - 1, Ordering::Relaxed);
        assert_eq!(&*conn.next_request_id(), format!("{long}.{}", u32::MAX));
    }
}
