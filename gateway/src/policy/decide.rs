//! The decision: cluster Deny rules, then Allow rules of every policy that selects the client,
//! else `defaultAction`; the built-in guard wins over all of them and Audit mode never bypasses it.

use std::net::IpAddr;
use std::sync::Arc;

use egress_crds::{IdentityRequirement, Mode, RuleAction};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::compile::{CidrEntry, PeerMatch, Snapshot};
use crate::config::DefaultAction;
use crate::guard::{Guard, Verdict};
use crate::identity::Identity;
use crate::reason::Reason;
use crate::target::{Host, Target};

/// The rules a target may match, by index: on the stack for the usual handful (every decision,
/// and every resolved address of a name, collects them).
type Candidates = smallvec::SmallVec<[usize; 8]>;

/// What the gateway sees of a plain-HTTP request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpFacts {
    /// Request method, upper case.
    pub method: Arc<str>,
    /// Path without the query string.
    pub path: Arc<str>,
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
        let w = id.workload();
        let mut out: Vec<usize> = self
            .by_namespace
            .get(&id.namespace)
            .into_iter()
            .flatten()
            .chain(&self.cluster)
            .copied()
            .filter(|&i| self.policies[i].selects(&w))
            .collect();
        out.sort_unstable();
        out
    }

    fn cidr_candidates(&self, ip: IpAddr) -> Candidates {
        let keep = |e: &CidrEntry| !e.except.iter().any(|x| x.contains(&ip));
        let mut out = Candidates::new();
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

    fn name_candidates(&self, host: &str) -> Candidates {
        let mut out: Candidates = self.exact.get(host).map(|v| v.iter().copied().collect()).unwrap_or_default();
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
        let mut applicable: Candidates =
            candidates.into_iter().filter(|&ri| self.rule_applies(ri, &selected, target.port, http)).collect();
        applicable.sort_unstable();
        let verified = id.is_some_and(|i| i.verified);
        // An `identity: Verified` policy's Allow rules do not apply to a client known by its
        // address alone; its Deny rules and its isolation still do.
        let withheld =
            |ri: usize| !verified && self.policies[self.rules[ri].policy].identity == IdentityRequirement::Verified;
        let deny = applicable.iter().find(|&&ri| self.rules[ri].action == RuleAction::Deny);
        let allow = applicable.iter().find(|&&ri| self.rules[ri].action == RuleAction::Allow && !withheld(ri));
        let mut d = match (deny, allow) {
            (Some(&ri), _) => self.decided_by(ri, Decision::new(Action::Deny, Reason::ClusterDeny, selected), via),
            (None, Some(&ri)) => self.decided_by(ri, Decision::new(Action::Allow, Reason::RuleAllow, selected), via),
            (None, None) => {
                let needs_identity = applicable.iter().copied().find(|&ri| {
                    self.rules[ri].action == RuleAction::Allow
                        && withheld(ri)
                        && self.policies[self.rules[ri].policy].mode == Mode::Enforce
                });
                match needs_identity {
                    Some(ri) => {
                        self.decided_by(ri, Decision::new(Action::Deny, Reason::IdentityRequired, selected), via)
                    }
                    None => self.fallback(selected),
                }
            }
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
        // One pass that stops at the first isolating policy in Enforce mode, nothing allocated:
        // a client many policies select pays for them only when all of those are in Audit mode.
        let mut first = None;
        let mut enforcing = None;
        for &i in selected.iter() {
            let p = &self.policies[i];
            if !p.isolates {
                continue;
            }
            first.get_or_insert(i);
            if p.mode == Mode::Enforce {
                enforcing = Some(i);
                break;
            }
        }
        let Some(first) = first else {
            return match self.default_action {
                DefaultAction::Allow => Decision::new(Action::Allow, Reason::DefaultAllow, selected),
                DefaultAction::Deny => Decision::new(Action::Deny, Reason::DefaultDeny, selected),
            };
        };
        // All in Audit mode: the first decides and lets it through; else the first that enforces.
        let (index, mut d) = match enforcing {
            None => (first, Decision::new(Action::Allow, Reason::AuditWouldDeny, selected)),
            Some(i) => (i, Decision::new(Action::Deny, Reason::NoRuleMatched, selected)),
        };
        let decider = &self.policies[index];
        d.policy = Some(decider.key.clone());
        d.mode = decider.mode;
        d.policy_index = Some(index);
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

/// The decision order of DESIGN.md on small snapshots: the guard first, then cluster Deny
/// rules, then the policies selecting the client, then the default action.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use egress_crds::AnyPolicy;
    use serde_json::{Value, json};

    use super::*;
    use crate::config::DefaultAction;

    fn snapshot(default_action: DefaultAction, policies: &[Value]) -> Snapshot {
        let policies: Vec<AnyPolicy> = policies.iter().map(|p| AnyPolicy::from_value(p.clone()).unwrap()).collect();
        Snapshot::compile(default_action, &policies, None)
    }

    fn namespaced(name: &str, mode: &str, rules: Value) -> Value {
        json!({"apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
               "metadata": {"name": name, "namespace": "shop"},
               "spec": {"podSelector": {"matchLabels": {"app": "api"}}, "mode": mode, "rules": rules}})
    }

    fn cluster(name: &str, rules: Value) -> Value {
        json!({"apiVersion": "egress.dev/v1alpha1", "kind": "ClusterEgressPolicy", "metadata": {"name": name},
               "spec": {"namespaceSelector": {}, "podSelector": {}, "rules": rules}})
    }

    /// A Pod of namespace `shop` with label `app`, as the snapshot selects it.
    fn pod(s: &Snapshot, app: &str) -> Identity {
        workload(s, app, None, false)
    }

    /// A client of namespace `shop` with label `app`, ServiceAccount `sa`, whose identity was
    /// `verified` by a credential or taken from its address.
    fn workload(s: &Snapshot, app: &str, sa: Option<&str>, verified: bool) -> Identity {
        let mut id = Identity {
            namespace: "shop".into(),
            name: format!("{app}-1"),
            service_account: sa.map(str::to_string),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            namespace_labels: egress_crds::namespace_labels("shop", &BTreeMap::new()),
            verified,
            selected: Arc::from([]),
        };
        id.selected = s.selected(Some(&id)).into();
        id
    }

    fn decide(s: &Snapshot, id: &Identity, target: &str) -> (Action, Reason) {
        let guard = Guard::new(Vec::new(), Vec::new());
        let d = s.decide(&guard, Some(id), &crate::target::parse_authority(target).unwrap(), None);
        (d.action, d.reason)
    }

    #[test]
    fn rejects_metadata_and_blocked_ranges_whatever_a_policy_allows() {
        let s = snapshot(
            DefaultAction::Allow,
            &[namespaced("open", "Enforce", json!([{"to": [{"cidr": "0.0.0.0/0"}, {"domain": "*.internal"}]}]))],
        );
        let api = pod(&s, "api");
        assert_eq!(decide(&s, &api, "169.254.169.254:80"), (Action::Deny, Reason::GuardBlocked));
        assert_eq!(decide(&s, &api, "127.0.0.1:80"), (Action::Deny, Reason::GuardBlocked));
        assert_eq!(decide(&s, &api, "metadata.google.internal:80"), (Action::Deny, Reason::GuardBlockedName));
        assert_eq!(decide(&s, &api, "93.184.216.34:443"), (Action::Allow, Reason::RuleAllow));
    }

    #[test]
    fn rejects_by_a_cluster_deny_before_a_namespaced_allow() {
        let s = snapshot(
            DefaultAction::Allow,
            &[
                namespaced("api", "Enforce", json!([{"to": [{"domain": "*.example.com"}]}])),
                cluster("platform", json!([{"action": "Deny", "to": [{"domain": "bad.example.com"}]}])),
            ],
        );
        let api = pod(&s, "api");
        assert_eq!(decide(&s, &api, "bad.example.com:443"), (Action::Deny, Reason::ClusterDeny));
        assert_eq!(decide(&s, &api, "good.example.com:443"), (Action::Allow, Reason::RuleAllow));
        // A client no namespaced policy selects meets the cluster Deny too.
        assert_eq!(decide(&s, &pod(&s, "batch"), "bad.example.com:443"), (Action::Deny, Reason::ClusterDeny));
    }

    #[test]
    fn rejects_what_no_rule_allows_for_a_selected_client_and_defaults_the_others() {
        let s = snapshot(
            DefaultAction::Deny,
            &[namespaced("api", "Enforce", json!([{"to": [{"domain": "a.test"}], "ports": [{"port": 443}]}]))],
        );
        let api = pod(&s, "api");
        assert_eq!(decide(&s, &api, "a.test:443"), (Action::Allow, Reason::RuleAllow));
        assert_eq!(decide(&s, &api, "a.test:80"), (Action::Deny, Reason::NoRuleMatched), "wrong port");
        assert_eq!(decide(&s, &api, "b.test:443"), (Action::Deny, Reason::NoRuleMatched));
        assert_eq!(decide(&s, &pod(&s, "batch"), "a.test:443"), (Action::Deny, Reason::DefaultDeny));
        let open = snapshot(DefaultAction::Allow, &[]);
        assert_eq!(decide(&open, &pod(&open, "batch"), "b.test:443"), (Action::Allow, Reason::DefaultAllow));
    }

    #[test]
    fn an_audit_mode_policy_lets_a_would_deny_through_and_says_so() {
        let s = snapshot(DefaultAction::Deny, &[namespaced("try", "Audit", json!([{"to": [{"domain": "a.test"}]}]))]);
        let d = {
            let guard = Guard::new(Vec::new(), Vec::new());
            s.decide(&guard, Some(&pod(&s, "api")), &crate::target::parse_authority("b.test:443").unwrap(), None)
        };
        assert_eq!((d.action, d.reason, d.mode), (Action::Allow, Reason::AuditWouldDeny, Mode::Audit));
        assert_eq!(d.policy.as_deref(), Some("shop/try"));
    }

    /// Several isolating policies and no rule matched: one in Enforce mode denies, whichever
    /// comes first; only when all are in Audit mode does the request go through.
    #[test]
    fn a_no_match_is_denied_if_any_isolating_policy_enforces() {
        let rules = json!([{"to": [{"domain": "a.test"}]}]);
        let mixed = snapshot(
            DefaultAction::Allow,
            &[namespaced("a-try", "Audit", rules.clone()), namespaced("b-strict", "Enforce", rules.clone())],
        );
        let guard = Guard::new(Vec::new(), Vec::new());
        let target = crate::target::parse_authority("b.test:443").unwrap();
        let d = mixed.decide(&guard, Some(&pod(&mixed, "api")), &target, None);
        assert_eq!((d.action, d.reason, d.mode), (Action::Deny, Reason::NoRuleMatched, Mode::Enforce));
        assert_eq!(d.policy.as_deref(), Some("shop/b-strict"));
        let audit = snapshot(
            DefaultAction::Deny,
            &[namespaced("a-try", "Audit", rules.clone()), namespaced("b-try", "Audit", rules)],
        );
        let d = audit.decide(&guard, Some(&pod(&audit, "api")), &target, None);
        assert_eq!((d.action, d.reason, d.mode), (Action::Allow, Reason::AuditWouldDeny, Mode::Audit));
        assert_eq!(d.policy.as_deref(), Some("shop/a-try"));
    }

    #[test]
    fn rejects_internal_addresses_that_only_a_cidr_rule_names() {
        let s =
            snapshot(DefaultAction::Allow, &[namespaced("lan", "Enforce", json!([{"to": [{"cidr": "10.1.0.0/16"}]}]))]);
        let api = pod(&s, "api");
        assert_eq!(decide(&s, &api, "10.1.2.3:443"), (Action::Allow, Reason::RuleAllow));
        // The default action never opens an internal range; neither does a rule that does not name it.
        assert_eq!(decide(&s, &pod(&s, "batch"), "10.1.2.3:443"), (Action::Deny, Reason::GuardInternal));
        assert_eq!(decide(&s, &api, "10.2.0.1:443"), (Action::Deny, Reason::NoRuleMatched));
    }

    #[test]
    fn rejects_an_address_only_client_under_a_verified_policy_that_would_allow_it() {
        let mut verified = namespaced("api", "Enforce", json!([{"to": [{"domain": "a.test"}]}]));
        verified["spec"]["identity"] = json!("Verified");
        let s = snapshot(
            DefaultAction::Allow,
            &[
                verified,
                namespaced("any", "Enforce", json!([{"to": [{"domain": "b.test"}]}])),
                cluster("platform", json!([{"action": "Deny", "to": [{"domain": "c.test"}]}])),
            ],
        );
        let by_token = workload(&s, "api", Some("api"), true);
        let by_address = workload(&s, "api", Some("api"), false);
        assert_eq!(decide(&s, &by_token, "a.test:443"), (Action::Allow, Reason::RuleAllow));
        assert_eq!(decide(&s, &by_address, "a.test:443"), (Action::Deny, Reason::IdentityRequired));
        // A policy that asks nothing of the identity still allows what it allows.
        assert_eq!(decide(&s, &by_address, "b.test:443"), (Action::Allow, Reason::RuleAllow));
        // The Verified policy still isolates the client: no fall-through to defaultAction Allow.
        assert_eq!(decide(&s, &by_address, "d.test:443"), (Action::Deny, Reason::NoRuleMatched));
        assert_eq!(decide(&s, &by_token, "c.test:443"), (Action::Deny, Reason::ClusterDeny));
        assert_eq!(decide(&s, &by_address, "c.test:443"), (Action::Deny, Reason::ClusterDeny));
    }

    #[test]
    fn an_audit_mode_verified_policy_lets_an_address_only_client_through_as_would_deny() {
        let mut p = namespaced("try", "Audit", json!([{"to": [{"domain": "a.test"}]}]));
        p["spec"]["identity"] = json!("Verified");
        let s = snapshot(DefaultAction::Deny, &[p]);
        assert_eq!(
            decide(&s, &workload(&s, "api", None, false), "a.test:443"),
            (Action::Allow, Reason::AuditWouldDeny)
        );
        assert_eq!(decide(&s, &workload(&s, "api", None, true), "a.test:443"), (Action::Allow, Reason::RuleAllow));
    }

    #[test]
    fn selects_by_service_account_only_the_named_ones() {
        let mut p = namespaced("api", "Enforce", json!([{"to": [{"domain": "a.test"}]}]));
        p["spec"]["serviceAccountSelector"] = json!({"names": ["api", "api-canary"]});
        let mut c = cluster("platform", json!([{"action": "Allow", "to": [{"domain": "b.test"}]}]));
        c["spec"]["serviceAccountSelector"] = json!({"names": ["batch"]});
        let s = snapshot(DefaultAction::Deny, &[p, c]);
        assert_eq!(
            decide(&s, &workload(&s, "api", Some("api"), false), "a.test:443"),
            (Action::Allow, Reason::RuleAllow)
        );
        assert_eq!(
            decide(&s, &workload(&s, "api", Some("api-canary"), true), "a.test:443"),
            (Action::Allow, Reason::RuleAllow)
        );
        assert_eq!(
            decide(&s, &workload(&s, "api", Some("default"), false), "a.test:443"),
            (Action::Deny, Reason::DefaultDeny),
            "another ServiceAccount: not selected"
        );
        assert_eq!(
            decide(&s, &workload(&s, "api", None, false), "a.test:443"),
            (Action::Deny, Reason::DefaultDeny),
            "an unknown ServiceAccount matches no name"
        );
        assert_eq!(
            decide(&s, &workload(&s, "x", Some("batch"), false), "b.test:443"),
            (Action::Allow, Reason::RuleAllow)
        );
        assert_eq!(
            decide(&s, &workload(&s, "x", Some("api"), false), "b.test:443"),
            (Action::Deny, Reason::DefaultDeny)
        );
    }
}
