//! Stage 4b, decide by the names the Pod resolved: only for a transparent connection whose
//! payload names nothing (no TLS SNI, no HTTP Host) and whose address alone is not allowed.
//!
//! The node-redirector's DNS forwarder saw which names the Pod recently resolved to the address
//! it dialled, and its relay states them in the PROXY header (the names TLV, under the relay's
//! MAC). Each name, most recently answered first, is decided like any other target (policies,
//! port rules, rate limits, Audit mode); the first that is allowed allows the connection. No
//! name ever overrides what the address decision refused for the address itself: the guard
//! (metadata, blocked and internal ranges: a domain never opens those) and cluster Deny CIDR
//! rules stand. Since no payload names the host, what is dialled is the original destination,
//! not the gateway's own resolution of the name (which may pick another address of a
//! many-address name); the gateway still resolves the name, to record whether the address was
//! among its answers (`transparent.original_in_resolved`).
//!
//! Two names on one address (a CDN): the connection is allowed when one of them is, which is
//! the best any address-level control can do; the event names both (`transparent.dns_names`)
//! and the one that allowed (`transparent.dns_name`).

use std::net::IpAddr;
use std::sync::Arc;

use super::resolve::{Checked, resolve_checked};
use super::{Charge, Pipeline, State};
use crate::guard::Verdict;
use crate::identity::Identity;
use crate::policy::{Action, Decision};
use crate::reason::Reason;
use crate::request::EgressRequest;
use crate::target::{self, Host, Target};

impl Pipeline {
    /// The decision by one of the request's DNS names, when the payload named nothing and the
    /// address decision `by_address` refused for want of a rule; `None` otherwise (the address
    /// decision stands). `charge`: as for the address decision.
    pub(super) async fn decide_by_names(
        &self,
        state: &State,
        identity: Option<&Identity>,
        req: &EgressRequest,
        target: &Target,
        by_address: &Decision,
        charge: Charge,
    ) -> Option<(Target, Checked)> {
        let facts = req.transparent.as_ref()?;
        let Host::Ip(ip) = target.host else { return None };
        if facts.dns_names.is_empty()
            || by_address.action != Action::Deny
            || !matches!(by_address.reason, Reason::NoRuleMatched | Reason::DefaultDeny)
            || !matches!(state.guard.check(ip), Verdict::Pass | Verdict::Exempt(_))
        {
            return None;
        }
        for name in &facts.dns_names {
            // A name that reads as an address is not a name.
            let Ok(Host::Name(n)) = target::parse_host(name) else { continue };
            let by_name = Target { host: Host::Name(n), port: target.port };
            let d = super::decide::decide(state, identity, &by_name, req, charge);
            if d.action != Action::Allow {
                continue;
            }
            // Boxed: only a connection allowed by one of its names resolves here, and the
            // future of every request holds this one's.
            return Some((by_name.clone(), Box::pin(self.checked_original(state, d, &by_name, ip, name)).await));
        }
        None
    }

    /// The original destination `ip`, for a connection `name` allowed: cluster Deny CIDR rules
    /// still apply to it; the gateway's own resolution of the name is recorded, not dialled.
    async fn checked_original(
        &self,
        state: &State,
        d: Decision,
        by_name: &Target,
        ip: IpAddr,
        name: &Arc<str>,
    ) -> Checked {
        let own = resolve_checked(state, Some(&self.resolver), Some(&self.metrics), d.clone(), by_name).await;
        let mut checked = Checked {
            decision: d,
            resolved: own.resolved,
            addrs: vec![ip],
            detail: None,
            dns_name: Some(name.clone()),
        };
        if let Some((p, r)) = state.snapshot.deny_for_address(&checked.decision.selected, ip, by_name.port) {
            checked.decision.policy = Some(p);
            checked.decision.rule = Some(r);
            checked.decision = checked.decision.deny(Reason::ClusterDeny);
            checked.addrs.clear();
        }
        checked
    }
}
