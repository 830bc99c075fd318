//! Reason codes: why a request was allowed or refused, one vocabulary for the audit trail,
//! metrics, `check` output and refusal bodies (their names are stable: they are part of the
//! audit schema, docs/audit.md). Three groups, in this order: decisions (policy, the built-in
//! guard, DNS), refusals before policy (a request a front or normalisation could not read, an
//! untrusted relay), and refusals of the gateway's own (its egress pool, the audit log, local
//! resources, connection limits). Policy produces only the first group.

use serde::{Deserialize, Serialize};

/// Why a request was allowed or denied. Stable names: they appear in audit events, metrics,
/// `check` output and denial bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    // Decisions: policy, the built-in guard, DNS.
    /// A rule allowed it.
    RuleAllow,
    /// No policy selects the client and `defaultAction` is Allow.
    DefaultAllow,
    /// No policy selects the client and `defaultAction` is Deny.
    DefaultDeny,
    /// Policies select the client and none allows the target.
    NoRuleMatched,
    /// A policy in Audit mode let a would-deny through.
    AuditWouldDeny,
    /// A ClusterEgressPolicy Deny rule matched.
    ClusterDeny,
    /// The target is an address in the guard's blocked tier.
    GuardBlocked,
    /// The target is a metadata host name.
    GuardBlockedName,
    /// The target is an internal address not opened by an explicit cidr rule.
    GuardInternal,
    /// Every resolved address is in the guard's blocked tier.
    DnsGuardBlocked,
    /// Every resolved address is internal; domain rules never open internal ranges.
    DnsInternalAddress,
    /// The name did not resolve, or resolved to nothing usable.
    DnsFailure,
    /// The client exceeded the policy's rate limit.
    RateLimited,
    // Refusals before policy: the request could not be read (fronts and normalisation).
    /// The host or port is invalid or ambiguous.
    InvalidTarget,
    /// The request is malformed for its protocol.
    MalformedRequest,
    /// The client did not send a complete request head or handshake in time.
    HeaderTimeout,
    /// An origin-form request was sent to the proxy port.
    OriginForm,
    /// SOCKS5 authentication failed.
    AuthFailed,
    /// The SOCKS5 command is not CONNECT.
    UnsupportedCommand,
    /// The SOCKS5 address type is unknown.
    UnsupportedAddressType,
    // Refusals after an allow, and the gateway's own limits.
    /// The policy's egress address pool is not configured or has no address of the needed family.
    EgressAddressUnavailable,
    /// A transparent connection came from an address that is not a trusted relay.
    UntrustedRelay,
    /// The decision could not be committed to the audit spool (`audit.onFailure: failClosed`).
    AuditUnavailable,
    /// The gateway itself ran out of a local resource (file descriptors, ports, buffers) while
    /// connecting upstream.
    LocalResourceLimit,
    /// `limits.maxConnections` or `limits.maxConnectionsPerClient` reached.
    ConnectionLimit,
    // Workload identity (`identity`).
    /// The ServiceAccount token presented was refused (the event's detail says why: expired,
    /// audience, issuer, signature, unknown key, malformed, pod gone).
    TokenInvalid,
    /// A verified identity is required and the client presented none.
    IdentityRequired,
    /// The token names another Pod than the one the connection comes from.
    IdentityMismatch,
}

impl Reason {
    /// Every reason, for metrics pre-registration.
    pub const ALL: [Reason; 28] = [
        Reason::RuleAllow,
        Reason::DefaultAllow,
        Reason::DefaultDeny,
        Reason::NoRuleMatched,
        Reason::AuditWouldDeny,
        Reason::ClusterDeny,
        Reason::GuardBlocked,
        Reason::GuardBlockedName,
        Reason::GuardInternal,
        Reason::DnsGuardBlocked,
        Reason::DnsInternalAddress,
        Reason::DnsFailure,
        Reason::RateLimited,
        Reason::InvalidTarget,
        Reason::MalformedRequest,
        Reason::HeaderTimeout,
        Reason::OriginForm,
        Reason::AuthFailed,
        Reason::UnsupportedCommand,
        Reason::UnsupportedAddressType,
        Reason::EgressAddressUnavailable,
        Reason::UntrustedRelay,
        Reason::AuditUnavailable,
        Reason::LocalResourceLimit,
        Reason::ConnectionLimit,
        Reason::TokenInvalid,
        Reason::IdentityRequired,
        Reason::IdentityMismatch,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RuleAllow => "rule_allow",
            Reason::DefaultAllow => "default_allow",
            Reason::DefaultDeny => "default_deny",
            Reason::NoRuleMatched => "no_rule_matched",
            Reason::AuditWouldDeny => "audit_would_deny",
            Reason::ClusterDeny => "cluster_deny",
            Reason::GuardBlocked => "guard_blocked",
            Reason::GuardBlockedName => "guard_blocked_name",
            Reason::GuardInternal => "guard_internal",
            Reason::DnsGuardBlocked => "dns_guard_blocked",
            Reason::DnsInternalAddress => "dns_internal_address",
            Reason::DnsFailure => "dns_failure",
            Reason::RateLimited => "rate_limited",
            Reason::InvalidTarget => "invalid_target",
            Reason::MalformedRequest => "malformed_request",
            Reason::HeaderTimeout => "header_timeout",
            Reason::OriginForm => "origin_form",
            Reason::AuthFailed => "auth_failed",
            Reason::UnsupportedCommand => "unsupported_command",
            Reason::UnsupportedAddressType => "unsupported_address_type",
            Reason::EgressAddressUnavailable => "egress_address_unavailable",
            Reason::UntrustedRelay => "untrusted_relay",
            Reason::AuditUnavailable => "audit_unavailable",
            Reason::LocalResourceLimit => "local_resource_limit",
            Reason::ConnectionLimit => "connection_limit",
            Reason::TokenInvalid => "token_invalid",
            Reason::IdentityRequired => "identity_required",
            Reason::IdentityMismatch => "identity_mismatch",
        }
    }

    /// Index into `ALL`.
    pub fn index(self) -> usize {
        self as usize
    }
}
