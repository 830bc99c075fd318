//! API objects -> an immutable, indexed snapshot.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use egress_crds::domain::DomainPattern;
use egress_crds::validate::parse_cidr;
use egress_crds::{
    AnyPolicy, EgressRule, IdentityRequirement, LabelSelector, Mode, RateLimit, RuleAction, ServiceAccountSelector,
    Workload,
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use prefix_trie::PrefixMap;

use crate::config::DefaultAction;

/// A per-client token bucket of one policy.
pub(super) type Limiter = DefaultKeyedRateLimiter<IpAddr>;

/// One policy, compiled.
#[derive(Debug)]
pub struct CompiledPolicy {
    /// `namespace/name` or, for cluster policies, `name`.
    pub key: Arc<str>,
    /// `EgressPolicy` or `ClusterEgressPolicy`.
    pub cluster: bool,
    /// Namespace of a namespaced policy.
    pub namespace: Option<String>,
    /// Pod selector.
    pub pod_selector: LabelSelector,
    /// Namespace selector (cluster policies).
    pub namespace_selector: Option<LabelSelector>,
    /// ServiceAccount selector.
    pub service_accounts: Option<ServiceAccountSelector>,
    /// `Verified`: the Allow rules apply only to clients with a verified identity.
    pub identity: IdentityRequirement,
    /// Enforce or Audit.
    pub mode: Mode,
    /// Source-address pool name.
    pub egress_address: Arc<str>,
    /// Whether selecting a client isolates it (namespaced: always; cluster: with an Allow rule).
    pub isolates: bool,
    /// Rate limit and its buckets (kept across reloads while the policy and limit are unchanged).
    pub rate_limit: Option<PolicyRate>,
}

impl CompiledPolicy {
    /// Whether the policy's selectors select `w` (`AnyPolicy::selects` on the compiled form).
    pub fn selects(&self, w: &Workload<'_>) -> bool {
        let in_scope = match &self.namespace_selector {
            Some(ns) => ns.matches(w.namespace_labels),
            None => self.namespace.as_deref() == Some(w.namespace),
        };
        in_scope
            && self.pod_selector.matches(w.labels)
            && self.service_accounts.as_ref().is_none_or(|a| a.matches(w.service_account))
    }
}

/// A policy's rate limit as this replica enforces it.
#[derive(Debug)]
pub struct PolicyRate {
    /// The policy's `rateLimit`.
    pub spec: RateLimit,
    /// The replicas it is shared among (`kubernetes.rateLimitReplicas`; 1: not shared).
    pub shared_by: u32,
    /// The per-client buckets, filled at `requestsPerSecond / shared_by` up to
    /// `burst / shared_by` (at least 1).
    pub limiter: Arc<Limiter>,
}

/// What a rule matched a target on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMatch {
    /// A `domain` peer.
    Domain,
    /// A `cidr` peer.
    Cidr,
}

/// One rule, compiled.
#[derive(Debug)]
pub struct CompiledRule {
    /// Index of its policy in `Snapshot::policies`.
    pub policy: usize,
    /// Rule name (`rules[N]` when unnamed).
    pub name: Arc<str>,
    /// Allow or Deny.
    pub action: RuleAction,
    /// Inclusive port ranges; empty = any.
    pub ports: Vec<(u16, u16)>,
    /// HTTP constraints.
    pub http: Option<HttpRule>,
}

impl CompiledRule {
    /// Whether the port is allowed by the rule.
    pub fn port_matches(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|(a, b)| (*a..=*b).contains(&port))
    }
}

/// Compiled HTTP constraints of a rule.
#[derive(Debug)]
pub struct HttpRule {
    /// Allowed methods; empty = any.
    pub methods: Vec<String>,
    /// Path patterns as (text, is_prefix); empty = any.
    pub paths: Vec<(String, bool)>,
}

impl HttpRule {
    /// Whether a method and path match.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && (self.paths.is_empty()
                || self.paths.iter().any(|(p, prefix)| if *prefix { path.starts_with(p.as_str()) } else { path == p }))
    }
}

/// A CIDR peer entry: rule index and the excepted prefixes.
#[derive(Debug, Clone)]
pub struct CidrEntry {
    /// Rule index.
    pub rule: usize,
    /// Prefixes inside the CIDR that stay closed.
    pub except: Vec<IpNet>,
}

/// The compiled policy set, swapped whole on change.
#[derive(Debug)]
pub struct Snapshot {
    /// Action for clients no policy selects.
    pub default_action: DefaultAction,
    /// Policies in load order.
    pub policies: Vec<CompiledPolicy>,
    /// Rules in load order (their index orders matches).
    pub rules: Vec<CompiledRule>,
    /// Namespace -> indices of its namespaced policies.
    pub by_namespace: HashMap<String, Vec<usize>>,
    /// Indices of cluster policies.
    pub cluster: Vec<usize>,
    /// Exact domain -> rule indices.
    pub exact: HashMap<String, Vec<usize>>,
    /// Wildcard base domain (`stripe.com` for `*.stripe.com`) -> rule indices.
    pub suffix: HashMap<String, Vec<usize>>,
    /// IPv4 CIDR peers.
    pub cidr_v4: PrefixMap<ipnet::Ipv4Net, Vec<CidrEntry>>,
    /// IPv6 CIDR peers.
    pub cidr_v6: PrefixMap<ipnet::Ipv6Net, Vec<CidrEntry>>,
}

impl Snapshot {
    /// Compiles validated policies. `previous` lends its rate-limit buckets to unchanged policies.
    pub fn compile(default_action: DefaultAction, policies: &[AnyPolicy], previous: Option<&Snapshot>) -> Snapshot {
        Snapshot::compile_shared(default_action, policies, previous, 1)
    }

    /// [`Snapshot::compile`], with every rate limit shared among `replicas` replicas (each
    /// enforces its share; a change of `replicas` starts the buckets anew).
    pub fn compile_shared(
        default_action: DefaultAction,
        policies: &[AnyPolicy],
        previous: Option<&Snapshot>,
        replicas: u32,
    ) -> Snapshot {
        let replicas = replicas.max(1);
        let mut s = Snapshot {
            default_action,
            policies: Vec::new(),
            rules: Vec::new(),
            by_namespace: HashMap::new(),
            cluster: Vec::new(),
            exact: HashMap::new(),
            suffix: HashMap::new(),
            cidr_v4: PrefixMap::new(),
            cidr_v6: PrefixMap::new(),
        };
        let old_limiters: BTreeMap<(bool, &str), &PolicyRate> = previous
            .map(|p| {
                p.policies
                    .iter()
                    .filter_map(|cp| cp.rate_limit.as_ref().map(|rl| ((cp.cluster, &*cp.key), rl)))
                    .collect()
            })
            .unwrap_or_default();
        for p in policies {
            let idx = s.policies.len();
            let key: Arc<str> = p.key().into();
            let (cluster, namespace, pod_selector, namespace_selector, mode, egress, rate, rules) = match p {
                AnyPolicy::Namespaced(p) => (
                    false,
                    p.metadata.namespace.clone(),
                    p.spec.pod_selector.clone(),
                    None,
                    p.spec.mode,
                    p.spec.egress_address.clone(),
                    p.spec.rate_limit,
                    p.spec.rules.iter().map(|r| (RuleAction::Allow, r.clone())).collect::<Vec<_>>(),
                ),
                AnyPolicy::Cluster(p) => (
                    true,
                    None,
                    p.spec.pod_selector.clone(),
                    Some(p.spec.namespace_selector.clone()),
                    p.spec.mode,
                    p.spec.egress_address.clone(),
                    p.spec.rate_limit,
                    p.spec.rules.iter().map(|r| (r.action, r.matcher())).collect(),
                ),
            };
            let isolates = !cluster || rules.iter().any(|(a, _)| *a == RuleAction::Allow);
            let rate_limit = rate.map(|spec| match old_limiters.get(&(cluster, &*key)) {
                Some(old) if old.spec == spec && old.shared_by == replicas => {
                    PolicyRate { spec, shared_by: replicas, limiter: old.limiter.clone() }
                }
                _ => PolicyRate { spec, shared_by: replicas, limiter: Arc::new(new_limiter(spec, replicas)) },
            });
            let (service_accounts, identity) = match p {
                AnyPolicy::Namespaced(p) => (p.spec.service_account_selector.clone(), p.spec.identity),
                AnyPolicy::Cluster(p) => (p.spec.service_account_selector.clone(), p.spec.identity),
            };
            s.policies.push(CompiledPolicy {
                key,
                cluster,
                namespace: namespace.clone(),
                pod_selector,
                namespace_selector,
                service_accounts,
                identity,
                mode,
                egress_address: egress.unwrap_or_else(|| "default".into()).into(),
                isolates,
                rate_limit,
            });
            match namespace {
                Some(ns) => s.by_namespace.entry(ns).or_default().push(idx),
                None => s.cluster.push(idx),
            }
            for (i, (action, rule)) in rules.into_iter().enumerate() {
                s.add_rule(idx, i, action, &rule);
            }
        }
        s
    }

    fn add_rule(&mut self, policy: usize, index: usize, action: RuleAction, r: &EgressRule) {
        let ri = self.rules.len();
        self.rules.push(CompiledRule {
            policy,
            name: r.name.clone().unwrap_or_else(|| format!("rules[{index}]")).into(),
            action,
            ports: r.ports.iter().map(|p| (p.port as u16, p.end_port.unwrap_or(p.port) as u16)).collect(),
            http: r.http.as_ref().map(|h| {
                let paths = h
                    .paths
                    .iter()
                    .map(|p| match p.strip_suffix('*') {
                        Some(prefix) => (prefix.to_string(), true),
                        None => (p.clone(), false),
                    })
                    .collect();
                HttpRule { methods: h.methods.clone(), paths }
            }),
        });
        for peer in &r.to {
            if let Some(d) = &peer.domain {
                // Validated before compilation; an invalid pattern cannot reach here.
                match DomainPattern::parse(d) {
                    Ok(DomainPattern::Exact(n)) => self.exact.entry(n).or_default().push(ri),
                    Ok(DomainPattern::Suffix(n)) => self.suffix.entry(n).or_default().push(ri),
                    Err(_) => {}
                }
            }
            if let Some(Ok(net)) = peer.cidr.as_deref().map(parse_cidr) {
                let except = peer.except.iter().filter_map(|x| parse_cidr(x).ok()).collect();
                let entry = CidrEntry { rule: ri, except };
                match net {
                    IpNet::V4(n) => push_trie(&mut self.cidr_v4, n, entry),
                    IpNet::V6(n) => push_trie(&mut self.cidr_v6, n, entry),
                }
            }
        }
    }
}

fn push_trie<P: prefix_trie::Prefix>(m: &mut PrefixMap<P, Vec<CidrEntry>>, p: P, e: CidrEntry) {
    match m.get_mut(&p) {
        Some(v) => v.push(e),
        None => {
            m.insert(p, vec![e]);
        }
    }
}

/// Buckets for `rl` shared among `replicas`: one token every `replicas / requestsPerSecond`
/// seconds, at most `burst / replicas` of them (rounded down, at least 1).
fn new_limiter(rl: RateLimit, replicas: u32) -> Limiter {
    let rps = rl.requests_per_second.max(1);
    let burst = rl.burst.unwrap_or(rps).max(1);
    let share = NonZeroU32::new(burst / replicas).unwrap_or(NonZeroU32::MIN);
    let period = std::time::Duration::from_nanos(1_000_000_000 * u64::from(replicas) / u64::from(rps))
        .max(std::time::Duration::from_nanos(1));
    let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX));
    RateLimiter::keyed(quota.allow_burst(share))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens a fresh client gets at once from a limiter.
    fn at_once(l: &Limiter) -> u32 {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        (0..1000).take_while(|_| l.check_key(&ip).is_ok()).count() as u32
    }

    #[test]
    fn a_shared_rate_limit_gives_each_replica_its_share_of_the_burst() {
        let rl = |rps, burst| RateLimit { requests_per_second: rps, burst };
        assert_eq!(at_once(&new_limiter(rl(100, Some(12)), 1)), 12);
        assert_eq!(at_once(&new_limiter(rl(100, Some(12)), 3)), 4);
        assert_eq!(at_once(&new_limiter(rl(100, None), 4)), 25, "burst defaults to the rate");
        assert_eq!(at_once(&new_limiter(rl(1, Some(2)), 5)), 1, "at least one");
    }
}
