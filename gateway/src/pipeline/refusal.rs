//! The one refusal type: what the pipeline hands a front when a request may not pass, already
//! audited, and the one table from a refusal to its HTTP status and words. Every front answers
//! from it in its own protocol (an HTTP status, a SOCKS5 reply code, a reset).

use std::sync::Arc;

use crate::reason::Reason;

/// How a front must refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalKind {
    /// Policy or guard said no.
    Denied,
    /// Rate limit exceeded.
    RateLimited,
    /// The request is malformed or its target invalid.
    BadRequest,
    /// The name did not resolve.
    DnsFailure,
    /// Every upstream address refused.
    ConnectRefused,
    /// The upstream connect timed out.
    ConnectTimeout,
    /// The upstream was unreachable.
    Unreachable,
    /// The decision could not be committed to the audit spool (`failClosed`).
    AuditUnavailable,
    /// The gateway ran out of file descriptors, ports or buffers.
    LocalResources,
    /// A connection limit (`limits.maxConnections`, `limits.maxConnectionsPerClient`).
    ConnectionLimit,
    /// The credential was refused, or one is required: HTTP 407 with `Proxy-Authenticate`.
    AuthRequired,
}

impl RefusalKind {
    /// The HTTP status and the words of the answer, for every front that answers in HTTP.
    pub(crate) fn http_status(self) -> (u16, &'static str) {
        match self {
            RefusalKind::Denied => (403, "denied by egress policy"),
            RefusalKind::RateLimited => (429, "rate limit exceeded"),
            RefusalKind::BadRequest => (400, "bad request"),
            RefusalKind::DnsFailure => (502, "name resolution failed"),
            RefusalKind::ConnectRefused | RefusalKind::Unreachable => (502, "upstream unreachable"),
            RefusalKind::ConnectTimeout => (504, "upstream connect timed out"),
            RefusalKind::AuditUnavailable => (503, "audit log unavailable"),
            RefusalKind::LocalResources => (503, "gateway out of local resources"),
            RefusalKind::ConnectionLimit => (503, "too many connections"),
            RefusalKind::AuthRequired => (407, "proxy authentication required"),
        }
    }
}

impl Refusal {
    /// The words of the answer: what refused the request, in terms a user can act on (the
    /// built-in guard is not a policy, and says why).
    pub(crate) fn words(&self) -> &'static str {
        match (self.kind, self.reason) {
            (RefusalKind::Denied, Reason::GuardBlocked | Reason::GuardBlockedName) => {
                "denied by the built-in guard: the destination is cloud metadata, loopback, link-local or another blocked range, which only guard.allowCidrs opens"
            }
            (RefusalKind::Denied, Reason::GuardInternal) => {
                "denied by the built-in guard: the destination is an internal address (RFC 1918, CGNAT, ULA), which only a cidr rule naming it opens"
            }
            (RefusalKind::Denied, Reason::DnsGuardBlocked) => {
                "denied by the built-in guard: the name resolves only to blocked addresses (cloud metadata, loopback, link-local, ...)"
            }
            (RefusalKind::Denied, Reason::DnsInternalAddress) => {
                "denied by the built-in guard: the name resolves only to internal addresses, which a domain rule never opens"
            }
            (RefusalKind::Denied, Reason::ClusterDeny) => "denied by a ClusterEgressPolicy Deny rule",
            (_, Reason::TokenInvalid) => {
                "the ServiceAccount token was refused (see detail); send a valid one in Proxy-Authorization"
            }
            (_, Reason::IdentityRequired) => {
                "a policy selecting this client requires a verified identity: send a ServiceAccount token in Proxy-Authorization"
            }
            (_, Reason::IdentityMismatch) => {
                "the ServiceAccount token belongs to another Pod than the one this connection comes from"
            }
            (RefusalKind::Denied, Reason::DefaultDeny | Reason::NoRuleMatched) => {
                "denied by egress policy: no rule allows this destination for this client"
            }
            (kind, _) => kind.http_status().1,
        }
    }
}

/// A refusal, already audited.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// What kind of answer the front gives.
    pub kind: RefusalKind,
    /// Reason code.
    pub reason: Reason,
    /// Request id to show the client.
    pub request_id: Arc<str>,
    /// Detail for the client (never policy internals beyond names).
    pub detail: String,
}

impl Refusal {
    /// The audit event could not be committed: nothing may pass unaudited.
    pub(super) fn audit_unavailable(request_id: Arc<str>) -> Refusal {
        Refusal {
            kind: RefusalKind::AuditUnavailable,
            reason: Reason::AuditUnavailable,
            request_id,
            detail: "audit log unavailable; try again later".into(),
        }
    }
}
