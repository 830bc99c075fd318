//! The `egress.v1` event. Field by field documentation: docs/audit.md.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::guard::Verdict;
use crate::identity::Identity;
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
    /// Unique event id (UUIDv7), assigned when written (nil before); serialised hyphenated, lower
    /// case.
    pub id: uuid::Uuid,
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
    pub time: Timestamp,
    /// Transparent front: original destination, relay, SNI/Host, whether the original
    /// destination was among the resolved addresses. Boxed: the other fronts' events (nearly
    /// all) carry a pointer, not the facts' 160 bytes, through every move.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent: Option<Box<crate::request::TransparentFacts>>,
}

/// Who the client is.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Source address.
    pub address: IpAddr,
    /// How the identity below was established: `address`, `token`, `socks5_user` or
    /// `certificate`.
    pub identity_source: &'static str,
    /// Who the client is (absent: unknown client), shared with the state it was found in:
    /// written as `labels`, `name`, `namespace` and `serviceAccount`. An event holds the
    /// identity itself, not copies of its strings and labels, so that building, cloning and
    /// dropping an event allocates nothing for it.
    pub identity: Option<Arc<Identity>>,
    /// Source port.
    pub port: u16,
    /// The SPIFFE ID of the client certificate that identified the client.
    pub spiffe_id: Option<Arc<str>>,
}

impl ClientInfo {
    /// Namespace (absent: unknown client).
    pub fn namespace(&self) -> Option<&str> {
        self.identity.as_deref().map(|i| i.namespace.as_str())
    }

    /// Name.
    pub fn name(&self) -> Option<&str> {
        self.identity.as_deref().map(|i| i.name.as_str())
    }

    /// Labels.
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.identity.as_deref().map(|i| &i.labels)
    }

    /// Service account.
    pub fn service_account(&self) -> Option<&str> {
        self.identity.as_deref().and_then(|i| i.service_account.as_deref())
    }
}

/// The members in RFC 8785 order, as the derive of every other struct here writes them:
/// `address`, `identity_source`, `labels`, `name`, `namespace`, `port`, `serviceAccount`,
/// `spiffe_id` (the identity's members are absent when it is).
impl Serialize for ClientInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let id = self.identity.as_deref();
        let sa = self.service_account();
        let len =
            3 + if id.is_some() { 3 } else { 0 } + usize::from(sa.is_some()) + usize::from(self.spiffe_id.is_some());
        let mut st = s.serialize_struct("ClientInfo", len)?;
        st.serialize_field("address", &self.address)?;
        st.serialize_field("identity_source", self.identity_source)?;
        if let Some(i) = id {
            st.serialize_field("labels", &i.labels)?;
            st.serialize_field("name", &i.name)?;
            st.serialize_field("namespace", &i.namespace)?;
        }
        st.serialize_field("port", &self.port)?;
        if let Some(sa) = sa {
            st.serialize_field("serviceAccount", sa)?;
        }
        if let Some(sp) = &self.spiffe_id {
            st.serialize_field("spiffe_id", sp)?;
        }
        st.end()
    }
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

/// When an event happened: read from the clock on the request's task, written as RFC 3339 (UTC,
/// nanoseconds) by the audit writer, so that the request neither formats nor allocates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(time::OffsetDateTime);

impl Timestamp {
    /// Now.
    pub fn now() -> Timestamp {
        Timestamp(time::OffsetDateTime::now_utc())
    }

    /// The instant `nanos` after the Unix epoch (years 1970 to 9999).
    #[cfg(test)]
    pub(crate) fn from_unix_nanos(nanos: i128) -> Option<Timestamp> {
        time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok().map(Timestamp)
    }

    /// Appends the RFC 3339 form, without quotes; nothing for a year RFC 3339 cannot write
    /// (after 9999), which a clock never gives.
    pub fn write(&self, out: &mut Vec<u8>) {
        let _ = self.0.format_into(out, &time::format_description::well_known::Rfc3339);
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = Vec::with_capacity(32);
        self.write(&mut out);
        f.write_str(std::str::from_utf8(&out).map_err(|_| std::fmt::Error)?)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
