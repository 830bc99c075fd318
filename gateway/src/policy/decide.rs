//! The decision: cluster Deny rules, then Allow rules of every policy that selects the client,
//! else `defaultAction`; the built-in guard wins over all of them and Audit mode never bypasses it.

use std::net::IpAddr;
use std::sync::Arc;

use egress_crds::{Mode, RuleAction};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::compile::{CidrEntry, PeerMatch, Snapshot};
use crate::config::DefaultAction;
use crate::guard::{Guard, Verdict};
use crate::identity::Identity;
use crate::reason::Reason;
use crate::target::{Host, Target};

/// What the gateway sees of a plain-HTTP request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpFacts {
    /// Request method, upper case.
    pub method: String,
    /// Path without the query string.
    pub path: String,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
}

/// The policy decision for one request (before resolution).
#[derive(Debug, Clone)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// Why.
    pub reason: Reason,
    /// Policy that decided, if any.
    pub policy: Option<Arc<str>>,
    /// Rule that decided, if any.
    pub rule: Option<Arc<str>>,
    /// Mode of the deciding policy (Enforce when none).
    pub mode: Mode,
    /// Index of the deciding policy in the snapshot.
    pub policy_index: Option<usize>,
    /// What the allowing rule matched on.
    pub via: Option<PeerMatch>,
    /// The `guard.allowCidrs` entry that exempted the target address, if any.
    pub guard_exempt: Option<IpNet>,
    /// Guard category of the target address when it was refused by the guard.
    pub guard_category: Option<&'static str>,
    /// Source-address pool to dial from.
    pub egress_address: Arc<str>,
    /// Policies selecting the client.
    pub selected: Arc<[usize]>,
}

impl Decision {
    fn new(action: Action, reason: Reason, selected: Arc<[usize]>) -> Self {
        Decision {
            action,
            reason,
            policy: None,
            rule: None,
            mode: Mode::Enforce,
            policy_index: None,
            via: None,
            guard_exempt: None,
            guard_category: None,
            egress_address: Arc::from("default"),
            selected,
        }
    }

    /// Turns this decision into a denial for `reason`, keeping the policy context.
    pub fn deny(mut self, reason: Reason) -> Self {
        self.action = Action::Deny;
        self.reason = reason;
        self
    }
}

impl Snapshot {
    /// Indices of the policies selecting a client, from its labels (computed once per identity
    /// and snapshot; `decide` uses the precomputed `Identity::selected`).
    pub fn selected(&self, id: Option<&Identity>) -> Vec<usize> {
        let Some(id) = id else { return Vec::new() };
        let mut out: Vec<usize> = self
            .by_namespace
            .get(&id.namespace)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&i| self.policies[i].pod_selector.matches(&id.labels))
            .collect();
        out.extend(self.cluster.iter().copied().filter(|&i| {
            let p = &self.policies[i];
            p.namespace_selector.as_ref().is_some_and(|s| s.matches(&id.namespace_labels))
                && p.pod_selector.matches(&id.labels)
        }));
        out.sort_unstable();
        out
    }

    fn cidr_candidates(&self, ip: IpAddr) -> Vec<usize> {
        let keep = |e: &CidrEntry| !e.except.iter().any(|x| x.contains(&ip));
        let mut out = Vec::new();
        match ip {
            IpAddr::V4(a) => {
                for (_, v) in self.cidr_v4.cover(&ipnet::Ipv4Net::from(a)) {
                    out.extend(v.iter().filter(|e| keep(e)).map(|e| e.rule));
                }
            }
            IpAddr::V6(a) => {
                for (_, v) in self.cidr_v6.cover(&ipnet::Ipv6Net::from(a)) {
                    out.extend(v.iter().filter(|e| keep(e)).map(|e| e.rule));
                }
            }
        }
        out
    }

    fn name_candidates(&self, host: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self.exact.get(host).cloned().unwrap_or_default();
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(v) = self.suffix.get(parent) {
                out.extend_from_slice(v);
            }
            rest = parent;
        }
        out
    }

    fn rule_applies(&self, ri: usize, selected: &[usize], port: u16, http: Option<&HttpFacts>) -> bool {
        let r = &self.rules[ri];
        if selected.binary_search(&r.policy).is_err() || !r.port_matches(port) {
            return false;
        }
        match (&r.http, http) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(rule), Some(h)) => rule.matches(&h.method, &h.path),
        }
    }

    fn decided_by(&self, ri: usize, mut d: Decision, via: PeerMatch) -> Decision {
        let r = &self.rules[ri];
        let p = &self.policies[r.policy];
        d.policy = Some(p.key.clone());
        d.rule = Some(r.name.clone());
        d.mode = p.mode;
        d.policy_index = Some(r.policy);
        d.egress_address = p.egress_address.clone();
        d.via = Some(via);
        d
    }

    /// Decides a request. `http` is present only for plain-HTTP requests the gateway sees in full.
    pub fn decide(&self, guard: &Guard, id: Option<&Identity>, target: &Target, http: Option<&HttpFacts>) -> Decision {
        let selected: Arc<[usize]> = id.map(|i| i.selected.clone()).unwrap_or_else(|| Arc::from([]));
        let mut exempt = None;
        let mut internal = None;
        let (candidates, via) = match &target.host {
            Host::Ip(ip) => {
                match guard.check(*ip) {
                    Verdict::Blocked(c) => {
                        let mut d = Decision::new(Action::Deny, Reason::GuardBlocked, selected);
                        d.guard_category = Some(c);
                        return d;
                    }
                    Verdict::Exempt(n) => exempt = Some(n),
                    Verdict::Internal(c) => internal = Some(c),
                    Verdict::Pass => {}
                }
                (self.cidr_candidates(*ip), PeerMatch::Cidr)
            }
            Host::Name(n) => {
                if Guard::blocked_name(n) {
                    let mut d = Decision::new(Action::Deny, Reason::GuardBlockedName, selected);
                    d.guard_category = Some("metadata");
                    return d;
                }
                (self.name_candidates(n), PeerMatch::Domain)
            }
        };
        let mut applicable: Vec<usize> =
            candidates.into_iter().filter(|&ri| self.rule_applies(ri, &selected, target.port, http)).collect();
        applicable.sort_unstable();
        let deny = applicable.iter().find(|&&ri| self.rules[ri].action == RuleAction::Deny);
        let allow = applicable.iter().find(|&&ri| self.rules[ri].action == RuleAction::Allow);
        let mut d = match (deny, allow) {
            (Some(&ri), _) => self.decided_by(ri, Decision::new(Action::Deny, Reason::ClusterDeny, selected), via),
            (None, Some(&ri)) => self.decided_by(ri, Decision::new(Action::Allow, Reason::RuleAllow, selected), via),
            (None, None) => self.fallback(selected),
        };
        d.guard_exempt = exempt;
        if let Some(c) = internal
            && d.action == Action::Allow
            && d.via != Some(PeerMatch::Cidr)
        {
            d.guard_category = Some(c);
            return d.deny(Reason::GuardInternal);
        }
        d
    }

    /// No rule matched: isolated clients are denied (or let through by Audit mode), others get
    /// the default action.
    fn fallback(&self, selected: Arc<[usize]>) -> Decision {
        let isolating: Vec<usize> = selected.iter().copied().filter(|&i| self.policies[i].isolates).collect();
        if isolating.is_empty() {
            return match self.default_action {
                DefaultAction::Allow => Decision::new(Action::Allow, Reason::DefaultAllow, selected),
                DefaultAction::Deny => Decision::new(Action::Deny, Reason::DefaultDeny, selected),
            };
        }
        let first = &self.policies[isolating[0]];
        let all_audit = isolating.iter().all(|&i| self.policies[i].mode == Mode::Audit);
        let mut d = if all_audit {
            Decision::new(Action::Allow, Reason::AuditWouldDeny, selected)
        } else {
            Decision::new(Action::Deny, Reason::NoRuleMatched, selected)
        };
        let decider = if all_audit {
            first
        } else {
            isolating.iter().map(|&i| &self.policies[i]).find(|p| p.mode == Mode::Enforce).unwrap_or(first)
        };
        d.policy = Some(decider.key.clone());
        d.mode = decider.mode;
        d.policy_index = isolating.iter().copied().find(|&i| Arc::ptr_eq(&self.policies[i].key, &decider.key));
        d.egress_address = decider.egress_address.clone();
        d
    }

    /// A cluster Deny rule that matches a resolved address (so a namespaced domain allow cannot
    /// reach a range the platform denied by CIDR): `(policy, rule)`.
    pub fn deny_for_address(&self, selected: &[usize], ip: IpAddr, port: u16) -> Option<(Arc<str>, Arc<str>)> {
        self.cidr_candidates(ip)
            .into_iter()
            .filter(|&ri| self.rules[ri].action == RuleAction::Deny && self.rule_applies(ri, selected, port, None))
            .min()
            .map(|ri| (self.policies[self.rules[ri].policy].key.clone(), self.rules[ri].name.clone()))
    }
}
