//! Validation of policy objects with exact field paths. The gateway refuses a whole object with
//! any error: a policy is never half-applied.

use std::fmt;

use ipnet::IpNet;

use std::sync::LazyLock;

use regex::Regex;

use crate::cel;
use crate::domain::DomainPattern;
use crate::{
    ClusterEgressPolicy, EgressPolicy, EgressRule, HttpMatch, IdentityRequirement, LabelSelector, RateLimit, Redirect,
    ServiceAccountSelector,
};

/// One problem, at one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.rules[0].to[1].domain`.
    pub path: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
    /// Short machine-readable reason (`InvalidDomain`, `InvalidCidr`, ...), for status conditions.
    pub reason: &'static str,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, reason: &'static str, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into(), reason });
    }
}

/// Validates a namespaced policy.
pub fn egress_policy(p: &EgressPolicy) -> Vec<FieldError> {
    let mut e = Errors(Vec::new());
    metadata(&mut e, p.metadata.name.as_deref(), p.metadata.namespace.as_deref(), true);
    selector(&mut e, "spec.podSelector", &p.spec.pod_selector);
    who(&mut e, p.spec.service_account_selector.as_ref(), p.spec.identity, p.spec.redirect);
    common(&mut e, p.spec.egress_address.as_deref(), p.spec.rate_limit.as_ref());
    if p.spec.rules.len() > cel::MAX_RULES {
        e.push("spec.rules", "InvalidRule", format!("at most {} rules", cel::MAX_RULES));
    }
    let mut names = Vec::new();
    for (i, r) in p.spec.rules.iter().enumerate() {
        rule(&mut e, &format!("spec.rules[{i}]"), r, &mut names);
    }
    e.0
}

/// Validates a cluster-scoped policy.
pub fn cluster_egress_policy(p: &ClusterEgressPolicy) -> Vec<FieldError> {
    let mut e = Errors(Vec::new());
    metadata(&mut e, p.metadata.name.as_deref(), p.metadata.namespace.as_deref(), false);
    selector(&mut e, "spec.namespaceSelector", &p.spec.namespace_selector);
    selector(&mut e, "spec.podSelector", &p.spec.pod_selector);
    who(&mut e, p.spec.service_account_selector.as_ref(), p.spec.identity, p.spec.redirect);
    common(&mut e, p.spec.egress_address.as_deref(), p.spec.rate_limit.as_ref());
    if p.spec.rules.len() > cel::MAX_RULES {
        e.push("spec.rules", "InvalidRule", format!("at most {} rules", cel::MAX_RULES));
    }
    let mut names = Vec::new();
    for (i, r) in p.spec.rules.iter().enumerate() {
        rule(&mut e, &format!("spec.rules[{i}]"), &r.matcher(), &mut names);
    }
    e.0
}

fn metadata(e: &mut Errors, name: Option<&str>, namespace: Option<&str>, namespaced: bool) {
    if name.is_none_or(str::is_empty) {
        e.push("metadata.name", "InvalidMetadata", "required");
    }
    match (namespaced, namespace.is_some_and(|n| !n.is_empty())) {
        (true, false) => e.push("metadata.namespace", "InvalidMetadata", "required for EgressPolicy"),
        (false, true) => e.push(
            "metadata.namespace",
            "InvalidMetadata",
            "ClusterEgressPolicy is cluster-scoped and takes no namespace",
        ),
        _ => {}
    }
}

fn selector(e: &mut Errors, path: &str, s: &LabelSelector) {
    for p in s.problems() {
        e.push(format!("{path}.{p}"), "InvalidSelector", "");
    }
    // `problems` embeds the sub-path and the message in one string; split it back out.
    for fe in e.0.iter_mut().filter(|f| f.reason == "InvalidSelector" && f.message.is_empty()) {
        if let Some((p, m)) = fe.path.split_once(": ") {
            let (p, m) = (p.to_string(), m.to_string());
            fe.path = p;
            fe.message = m;
        }
    }
}

/// `serviceAccountSelector` and `identity`.
fn who(e: &mut Errors, accounts: Option<&ServiceAccountSelector>, identity: IdentityRequirement, redirect: Redirect) {
    if let Some(a) = accounts {
        if a.names.is_empty() {
            e.push("spec.serviceAccountSelector.names", "InvalidSelector", "at least one ServiceAccount name");
        }
        if a.names.len() > cel::MAX_SMALL {
            e.push("spec.serviceAccountSelector.names", "InvalidSelector", format!("at most {} names", cel::MAX_SMALL));
        }
        for (i, n) in a.names.iter().enumerate() {
            if n.len() > 253 || !SERVICE_ACCOUNT.is_match(n) {
                e.push(
                    format!("spec.serviceAccountSelector.names[{i}]"),
                    "InvalidSelector",
                    format!("{n:?} is not a ServiceAccount name: a lower-case DNS subdomain of at most 253 characters"),
                );
            }
        }
    }
    if identity == IdentityRequirement::Verified && redirect == Redirect::Transparent {
        e.push("spec.identity", "InvalidIdentity", cel::VERIFIED_TRANSPARENT);
    }
}

fn common(e: &mut Errors, egress_address: Option<&str>, rate: Option<&RateLimit>) {
    if egress_address.is_some_and(|a| a.is_empty() || a.len() > 253) {
        e.push("spec.egressAddress", "InvalidEgressAddress", "must be 1-253 characters (omit it for `default`)");
    }
    if let Some(r) = rate {
        if r.requests_per_second == 0 {
            e.push("spec.rateLimit.requestsPerSecond", "InvalidRateLimit", "must be at least 1");
        }
        if r.burst == Some(0) {
            e.push("spec.rateLimit.burst", "InvalidRateLimit", "must be at least 1");
        }
    }
}

static DOMAIN: LazyLock<Regex> = LazyLock::new(|| Regex::new(cel::DOMAIN_RE).expect("valid regex"));
static NUMERIC_TLD: LazyLock<Regex> = LazyLock::new(|| Regex::new(cel::NUMERIC_TLD_RE).expect("valid regex"));
static SERVICE_ACCOUNT: LazyLock<Regex> = LazyLock::new(|| Regex::new(cel::SERVICE_ACCOUNT_RE).expect("valid regex"));
static RULE_NAME: LazyLock<Regex> = LazyLock::new(|| Regex::new(cel::RULE_NAME_RE).expect("valid regex"));
static METHOD: LazyLock<Regex> = LazyLock::new(|| Regex::new(cel::METHOD_RE).expect("valid regex"));
static PATH: LazyLock<Regex> = LazyLock::new(|| Regex::new(cel::PATH_RE).expect("valid regex"));

/// Parses a CIDR strictly, as the admission rule does: host bits must be zero and IPv4-mapped
/// IPv6 prefixes are refused (write the IPv4 prefix).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.parse().map_err(|_| format!("{s:?} is not an IP prefix like 10.0.0.0/8 or 2001:db8::/32"))?;
    if let IpNet::V6(n) = net
        && n.addr().to_ipv4_mapped().is_some()
    {
        return Err(format!("{s:?} is an IPv4-mapped IPv6 prefix; write the IPv4 prefix"));
    }
    if net.trunc() != net {
        return Err(format!("{s:?} has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// Checks a domain pattern exactly as the admission rule does: the canonical form only.
pub fn check_domain(d: &str) -> Result<(), String> {
    let max = if d.starts_with("*.") { 255 } else { 253 };
    if d.len() <= max && DOMAIN.is_match(d) && !NUMERIC_TLD.is_match(d) {
        return Ok(());
    }
    Err(match DomainPattern::parse(d) {
        Ok(DomainPattern::Exact(n)) if n != d => format!("{d:?} is not in canonical form; write {n:?}"),
        Ok(DomainPattern::Suffix(n)) if format!("*.{n}") != d => {
            format!("{d:?} is not in canonical form; write \"*.{n}\"")
        }
        Err(e) => format!("{d:?}: {e}"),
        _ => format!("{d:?}: labels are a-z, 0-9, '-' and '_', and do not start or end with '-'"),
    })
}

fn rule(e: &mut Errors, path: &str, r: &EgressRule, names: &mut Vec<String>) {
    if let Some(n) = &r.name {
        if !RULE_NAME.is_match(n) {
            e.push(
                format!("{path}.name"),
                "InvalidRuleName",
                "must be 1-253 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            );
        } else if names.contains(n) {
            e.push(format!("{path}.name"), "InvalidRuleName", format!("duplicate rule name {n:?}"));
        } else {
            names.push(n.clone());
        }
    }
    if r.to.is_empty() {
        e.push(format!("{path}.to"), "InvalidPeer", "at least one destination (domain or cidr) is required");
    }
    if r.to.len() > cel::MAX_PEERS {
        e.push(format!("{path}.to"), "InvalidPeer", format!("at most {} destinations", cel::MAX_PEERS));
    }
    if r.ports.len() > cel::MAX_SMALL {
        e.push(format!("{path}.ports"), "InvalidPort", format!("at most {} ports", cel::MAX_SMALL));
    }
    for (j, peer) in r.to.iter().enumerate() {
        let pp = format!("{path}.to[{j}]");
        match (&peer.domain, &peer.cidr) {
            (Some(_), Some(_)) | (None, None) => e.push(pp.clone(), "InvalidPeer", "set exactly one of domain or cidr"),
            (Some(d), None) => {
                if let Err(m) = check_domain(d) {
                    e.push(format!("{pp}.domain"), "InvalidDomain", m);
                }
                if !peer.except.is_empty() {
                    e.push(format!("{pp}.except"), "InvalidCidr", "except only applies to a cidr");
                }
            }
            (None, Some(c)) => match parse_cidr(c) {
                Err(m) => e.push(format!("{pp}.cidr"), "InvalidCidr", m),
                Ok(net) => {
                    if peer.except.len() > cel::MAX_SMALL {
                        e.push(format!("{pp}.except"), "InvalidCidr", format!("at most {} entries", cel::MAX_SMALL));
                    }
                    for (k, x) in peer.except.iter().enumerate() {
                        let xp = format!("{pp}.except[{k}]");
                        match parse_cidr(x) {
                            Err(m) => e.push(xp, "InvalidCidr", m),
                            Ok(xn) if !net.contains(&xn) || xn.prefix_len() <= net.prefix_len() => {
                                e.push(xp, "InvalidCidr", format!("{x:?} is not strictly inside {c:?}"))
                            }
                            Ok(_) => {}
                        }
                    }
                }
            },
        }
    }
    for (j, p) in r.ports.iter().enumerate() {
        let pp = format!("{path}.ports[{j}]");
        if !(1..=65535).contains(&p.port) {
            e.push(format!("{pp}.port"), "InvalidPort", format!("{} is outside 1..65535", p.port));
        }
        if let Some(end) = p.end_port {
            if !(1..=65535).contains(&end) {
                e.push(format!("{pp}.endPort"), "InvalidPort", format!("{end} is outside 1..65535"));
            } else if end < p.port {
                e.push(format!("{pp}.endPort"), "InvalidPort", format!("{end} is below port {}", p.port));
            }
        }
    }
    if let Some(h) = &r.http {
        http(e, &format!("{path}.http"), h);
    }
}

fn http(e: &mut Errors, path: &str, h: &HttpMatch) {
    if h.methods.len() > cel::MAX_METHODS {
        e.push(format!("{path}.methods"), "InvalidHttp", format!("at most {} methods", cel::MAX_METHODS));
    }
    if h.paths.len() > cel::MAX_SMALL {
        e.push(format!("{path}.paths"), "InvalidHttp", format!("at most {} paths", cel::MAX_SMALL));
    }
    for (i, m) in h.methods.iter().enumerate() {
        if m.len() > 32 || !METHOD.is_match(m) {
            e.push(format!("{path}.methods[{i}]"), "InvalidHttp", format!("{m:?} is not an upper-case HTTP method"));
        } else if m == "CONNECT" {
            e.push(
                format!("{path}.methods[{i}]"),
                "InvalidHttp",
                "CONNECT tunnels are opaque; allow the host and port without an http section",
            );
        }
    }
    for (i, p) in h.paths.iter().enumerate() {
        if p.len() > 1024 || !PATH.is_match(p) {
            e.push(
                format!("{path}.paths[{i}]"),
                "InvalidHttp",
                format!("{p:?}: paths start with '/', may end with '*' (prefix match) and never contain '?' or '#'"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::AnyPolicy;

    fn policy(spec: &str) -> AnyPolicy {
        let doc = format!(
            "apiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n{spec}"
        );
        let v: serde_json::Value = serde_yaml_ng::from_str(&doc).unwrap();
        AnyPolicy::from_value(v).unwrap()
    }

    fn paths(p: &AnyPolicy) -> Vec<String> {
        p.validate().into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn valid_policy_has_no_errors() {
        let p = policy(
            "  podSelector: {matchLabels: {app: api}}\n  rules:\n  - name: a\n    to: [{domain: '*.stripe.com'}, {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]\n    ports: [{port: 443}, {port: 8000, endPort: 8100}]\n    http: {methods: [GET], paths: ['/v1/*', /x]}\n  rateLimit: {requestsPerSecond: 5}\n",
        );
        assert_eq!(p.validate(), vec![]);
    }

    #[test]
    fn every_error_names_its_field() {
        let p = policy(
            "  podSelector: {matchExpressions: [{key: a, operator: In}]}\n  rules:\n  - name: a\n    to: [{domain: 'a.*.com'}, {cidr: 10.0.0.1/8}, {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}, {domain: x.com, cidr: 1.0.0.0/8}, {}]\n    ports: [{port: 0}, {port: 90, endPort: 80}, {port: 70000}]\n    http: {methods: [get, CONNECT], paths: [v1, '/a*b', '/a?b']}\n  - name: a\n    to: []\n  rateLimit: {requestsPerSecond: 0, burst: 0}\n",
        );
        assert_eq!(
            paths(&p),
            vec![
                "spec.podSelector.matchExpressions[0]",
                "spec.rateLimit.requestsPerSecond",
                "spec.rateLimit.burst",
                "spec.rules[0].to[0].domain",
                "spec.rules[0].to[1].cidr",
                "spec.rules[0].to[2].except[0]",
                "spec.rules[0].to[3]",
                "spec.rules[0].to[4]",
                "spec.rules[0].ports[0].port",
                "spec.rules[0].ports[1].endPort",
                "spec.rules[0].ports[2].port",
                "spec.rules[0].http.methods[0]",
                "spec.rules[0].http.methods[1]",
                "spec.rules[0].http.paths[0]",
                "spec.rules[0].http.paths[1]",
                "spec.rules[0].http.paths[2]",
                "spec.rules[1].name",
                "spec.rules[1].to",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_rejected_not_ignored() {
        let doc = "apiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: p, namespace: ns}\nspec:\n  podSelector: {matchLabel: {app: api}}\n";
        let v: serde_json::Value = serde_yaml_ng::from_str(doc).unwrap();
        let err = AnyPolicy::from_value(v).unwrap_err().to_string();
        assert!(err.contains("matchLabel"), "{err}");
        let doc = "apiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: p, namespace: ns}\nspec:\n  podSelector: {}\n  rules: [{to: [{domain: a.com}], port: [{port: 1}]}]\n";
        let v: serde_json::Value = serde_yaml_ng::from_str(doc).unwrap();
        assert!(AnyPolicy::from_value(v).is_err());
    }
}
