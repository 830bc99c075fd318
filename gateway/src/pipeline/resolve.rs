//! Stage 5, resolve and check: runs after an allow (a denial passes through untouched).
//!
//! A name is resolved by the gateway's own resolver (never the client's answer), and every
//! address is put to the built-in guard and to the cluster Deny CIDR rules; only addresses that
//! pass both may be dialled. It refuses when the name does not resolve (`dns_failure`), when every
//! address is blocked (`dns_guard_blocked`) or internal (`dns_internal_address`), and when every
//! address is covered by a cluster Deny rule (`cluster_deny`): a domain rule must never open a
//! way to an address its CIDR would not. An IP-literal target was checked by the decide stage.

use std::net::IpAddr;
use std::time::Instant;

use super::State;
use crate::audit::ResolvedAddr;
use crate::guard::Verdict;
use crate::metrics::Metrics;
use crate::policy::{Action, Decision};
use crate::reason::Reason;
use crate::resolve::Resolver;
use crate::target::{self, Host, Target};

/// The result of resolving an allowed name and checking every address.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    /// The decision, turned into a denial when no address survived.
    pub decision: Decision,
    /// Every resolved address with its verdict.
    pub resolved: Vec<ResolvedAddr>,
    /// Addresses that may be dialled.
    pub addrs: Vec<IpAddr>,
    /// DNS error text.
    pub detail: Option<String>,
    /// The DNS name (of the relay's names TLV) that allowed a connection whose payload named
    /// nothing; its original destination is then what `addrs` holds.
    pub dns_name: Option<std::sync::Arc<str>>,
}

/// Resolves an allowed target (when it is a name) and keeps only the addresses the guard passes
/// and no cluster Deny CIDR rule covers. A denied decision is returned unchanged.
pub(crate) async fn resolve_checked(
    state: &State,
    resolver: Option<&Resolver>,
    metrics: Option<&Metrics>,
    mut decision: Decision,
    target: &Target,
) -> Checked {
    let name = match (&target.host, decision.action) {
        (_, Action::Deny) => {
            return Checked { decision, resolved: vec![], addrs: vec![], detail: None, dns_name: None };
        }
        (Host::Ip(ip), _) => {
            return Checked { decision, resolved: vec![], addrs: vec![*ip], detail: None, dns_name: None };
        }
        (Host::Name(n), _) => n,
    };
    let Some(resolver) = resolver else {
        return Checked { decision, resolved: vec![], addrs: vec![], detail: None, dns_name: None };
    };
    let started = Instant::now();
    // Boxed: the resolver's future is large, and an unboxed one would be part of every request's
    // future (copied with it), IP-literal and keep-alive ones included.
    let lookup = Box::pin(resolver.lookup(name)).await;
    if let Some(m) = metrics {
        m.dns_seconds.observe(started.elapsed().as_secs_f64());
    }
    let ips = match lookup {
        Ok(ips) => ips,
        Err(e) => {
            if let Some(m) = metrics {
                m.dns_failures.inc();
            }
            return Checked {
                decision: decision.deny(Reason::DnsFailure),
                resolved: vec![],
                addrs: vec![],
                detail: Some(e),
                dns_name: None,
            };
        }
    };
    let mut resolved = Vec::with_capacity(ips.len());
    let mut addrs = Vec::with_capacity(ips.len());
    for ip in ips {
        let ip = target::canonical_ip(ip);
        let verdict = state.guard.check(ip);
        let mut denied_by = None;
        if matches!(verdict, Verdict::Pass | Verdict::Exempt(_)) {
            denied_by =
                state.snapshot.deny_for_address(&decision.selected, ip, target.port).map(|(p, r)| format!("{p}/{r}"));
            if denied_by.is_none() {
                addrs.push(ip);
                if let Verdict::Exempt(n) = verdict
                    && decision.guard_exempt.is_none()
                {
                    decision.guard_exempt = Some(n);
                }
            }
        }
        resolved.push(ResolvedAddr { address: ip, verdict, denied_by });
    }
    if addrs.is_empty() {
        let blocked = resolved.iter().find_map(|r| match r.verdict {
            Verdict::Blocked(c) => Some(c),
            _ => None,
        });
        let internal = resolved.iter().find_map(|r| match r.verdict {
            Verdict::Internal(c) => Some(c),
            _ => None,
        });
        decision = match (blocked, internal) {
            (Some(c), _) => {
                decision.guard_category = Some(c);
                decision.deny(Reason::DnsGuardBlocked)
            }
            (None, Some(c)) => {
                decision.guard_category = Some(c);
                decision.deny(Reason::DnsInternalAddress)
            }
            (None, None) if resolved.iter().any(|r| r.denied_by.is_some()) => decision.deny(Reason::ClusterDeny),
            (None, None) => decision.deny(Reason::DnsFailure),
        };
        let detail = resolved.is_empty().then(|| "no address".to_string());
        return Checked { decision, resolved, addrs, detail, dns_name: None };
    }
    Checked { decision, resolved, addrs, detail: None, dns_name: None }
}
