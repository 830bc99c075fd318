//! The `egress.v1` event. Field by field documentation: docs/audit.md.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use crate::guard::Verdict;
use crate::policy::{Action, HttpFacts, Reason};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
    /// A relay or protocol error.
    Error,
}

/// One audit event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Always `egress.v1`.
    pub schema: &'static str,
    /// `decision` or `close`.
    pub event: EventKind,
    /// Unique event id (UUIDv7), assigned when written.
    pub id: String,
    /// Per-instance sequence number, starting at 1, gap-free.
    pub seq: u64,
    /// RFC 3339 time (UTC) of the event.
    pub time: String,
    /// Gateway instance id (random per process start).
    pub instance: Arc<str>,
    /// Client connection id.
    pub connection_id: Arc<str>,
    /// Request id (shared by the decision and close events of one request).
    pub request_id: Arc<str>,
    /// Front.
    pub front: Front,
    /// Client.
    pub client: ClientInfo,
    /// Target.
    pub target: TargetInfo,
    /// Decision.
    pub decision: DecisionInfo,
    /// Resolved addresses and the guard's verdict on each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<ResolvedAddr>,
    /// Address dialled (or reused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialled: Option<SocketAddr>,
    /// Local (egress source) address of the upstream connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_source: Option<SocketAddr>,
    /// Source-address pool name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_pool: Option<Arc<str>>,
    /// Transparent front: original destination, relay, SNI/Host, whether the original
    /// destination was among the resolved addresses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent: Option<crate::request::TransparentFacts>,
    /// Close details (close events only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close: Option<CloseInfo>,
    /// `hash` of the event written before this one in the instance's stream (tamper evidence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
    /// SHA-256 of the RFC 8785 canonical JSON of this event without `hash`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// Who the client is.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientInfo {
    /// Source address.
    pub address: IpAddr,
    /// Source port.
    pub port: u16,
    /// Namespace (absent: unknown client).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// Where to.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// Host as normalised (or as sent, when invalid).
    pub host: String,
    /// Port (0 when unknown).
    pub port: u16,
    /// Method and path (plain HTTP only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpFacts>,
}

/// The decision.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionInfo {
    /// `allow` or `deny`.
    pub action: Action,
    /// Reason code.
    pub reason: Reason,
    /// Deciding policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Arc<str>>,
    /// Deciding rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Arc<str>>,
    /// `Enforce` or `Audit`.
    pub mode: egress_crds::Mode,
    /// `guard.allowCidrs` entries used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub guard_exempt: Vec<ipnet::IpNet>,
    /// Guard category, when the guard refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_category: Option<&'static str>,
    /// Free-text detail (error text for malformed input, DNS errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A resolved address with the guard's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedAddr {
    /// The address.
    pub address: IpAddr,
    /// Guard verdict.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Removed by a cluster Deny CIDR rule (`policy/rule`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_by: Option<String>,
}

/// How an allowed connection or request ended.
#[derive(Debug, Clone, Serialize)]
pub struct CloseInfo {
    /// Bytes client -> upstream.
    pub bytes_up: u64,
    /// Bytes upstream -> client.
    pub bytes_down: u64,
    /// Milliseconds from decision to close.
    pub duration_ms: u64,
    /// How it ended.
    pub end: End,
    /// Upstream HTTP status (plain HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Error text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The current time in RFC 3339 (UTC, nanoseconds).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
