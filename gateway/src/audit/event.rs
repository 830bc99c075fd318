//! The `egress.v1` event. Field by field documentation: docs/audit.md.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::guard::Verdict;
use crate::policy::{Action, HttpFacts};
use crate::reason::Reason;
use crate::request::Front;

/// `decision` or `close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A decision on one request (allowed or denied).
    Decision,
    /// The end of an allowed connection or request.
    Close,
}

/// How an allowed connection or request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Both directions finished normally.
    Completed,
    /// The client went away first or reset.
    ClientClosed,
    /// The upstream went away first or reset.
    UpstreamClosed,
    /// No traffic for `limits.idleTimeout`.
    IdleTimeout,
    /// Closed at the end of the shutdown grace period.
    Shutdown,
    /// The upstream connect failed.
    ConnectFailed,
    /// The client sent something invalid after the decision (a malformed request body).
    ClientError,
    /// A relay or protocol error.
    Error,
}

/// One audit event. The members of every struct here are declared in RFC 8785 order (sorted by
/// name) and the only map (labels) is sorted, so that serde_json's compact output is the
/// canonical form the hash chain needs, without a second serialisation (a test and a debug
/// assertion in the writer hold this).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Client.
    pub client: ClientInfo,
    /// Close details (close events only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close: Option<CloseInfo>,
    /// Client connection id.
    pub connection_id: Arc<str>,
    /// Decision.
    pub decision: DecisionInfo,
    /// Address dialled (or reused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialled: Option<SocketAddr>,
    /// Source-address pool name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_pool: Option<Arc<str>>,
    /// Local (egress source) address of the upstream connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_source: Option<SocketAddr>,
    /// `decision` or `close`.
    pub event: EventKind,
    /// Front.
    pub front: Front,
    /// SHA-256 of the RFC 8785 canonical JSON of this event without `hash`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Unique event id (UUIDv7), assigned when written.
    pub id: String,
    /// Gateway instance id (random per process start).
    pub instance: Arc<str>,
    /// `hash` of the event written before this one in the instance's stream (tamper evidence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
    /// Request id (shared by the decision and close events of one request).
    pub request_id: Arc<str>,
    /// Resolved addresses and the guard's verdict on each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<ResolvedAddr>,
    /// Always `egress.v1`.
    pub schema: &'static str,
    /// Per-instance sequence number, starting at 1, gap-free.
    pub seq: u64,
    /// Target.
    pub target: TargetInfo,
    /// RFC 3339 time (UTC) of the event.
    pub time: String,
    /// Transparent front: original destination, relay, SNI/Host, whether the original
    /// destination was among the resolved addresses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent: Option<crate::request::TransparentFacts>,
}

/// Who the client is.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientInfo {
    /// Source address.
    pub address: IpAddr,
    /// How the identity below was established: `address`, `token`, `socks5_user` or
    /// `certificate`.
    #[serde(rename = "identity_source")]
    pub identity_source: &'static str,
    /// Labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Namespace (absent: unknown client).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Source port.
    pub port: u16,
    /// Service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The SPIFFE ID of the client certificate that identified the client.
    #[serde(rename = "spiffe_id", skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<Arc<str>>,
}

/// Where to.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// Host as normalised (or as sent, when invalid).
    pub host: String,
    /// Method and path (plain HTTP only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpFacts>,
    /// Port (0 when unknown).
    pub port: u16,
}

/// The decision.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionInfo {
    /// `allow` or `deny`.
    pub action: Action,
    /// Free-text detail (error text for malformed input, DNS errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Guard category, when the guard refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_category: Option<&'static str>,
    /// `guard.allowCidrs` entries used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub guard_exempt: Vec<ipnet::IpNet>,
    /// `Enforce` or `Audit`.
    pub mode: egress_crds::Mode,
    /// Deciding policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Arc<str>>,
    /// Reason code.
    pub reason: Reason,
    /// Deciding rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Arc<str>>,
}

/// A resolved address with the guard's verdict.
#[derive(Debug, Clone)]
pub struct ResolvedAddr {
    /// The address.
    pub address: IpAddr,
    /// Guard verdict.
    pub verdict: Verdict,
    /// Removed by a cluster Deny CIDR rule (`policy/rule`).
    pub denied_by: Option<String>,
}

impl Serialize for ResolvedAddr {
    /// `{"address", "category"?, "denied_by"?, "exempt_by"?, "verdict"}`: members in RFC 8785
    /// order, like every struct of the event (see `audit::chain`).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (verdict, category, exempt_by) = match &self.verdict {
            Verdict::Pass => ("pass", None, None),
            Verdict::Exempt(n) => ("exempt", None, Some(n)),
            Verdict::Blocked(c) => ("blocked", Some(*c), None),
            Verdict::Internal(c) => ("internal", Some(*c), None),
        };
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("address", &self.address)?;
        if let Some(c) = category {
            m.serialize_entry("category", c)?;
        }
        if let Some(d) = &self.denied_by {
            m.serialize_entry("denied_by", d)?;
        }
        if let Some(n) = exempt_by {
            m.serialize_entry("exempt_by", n)?;
        }
        m.serialize_entry("verdict", verdict)?;
        m.end()
    }
}

/// How an allowed connection or request ended.
#[derive(Debug, Clone, Serialize)]
pub struct CloseInfo {
    /// Bytes upstream -> client.
    pub bytes_down: u64,
    /// Bytes client -> upstream.
    pub bytes_up: u64,
    /// Milliseconds from decision to close.
    pub duration_ms: u64,
    /// How it ended.
    pub end: End,
    /// Error text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Upstream HTTP status (plain HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
}

/// The current time in RFC 3339 (UTC, nanoseconds).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
