//! Admission rules (`x-kubernetes-validations`, CEL) added to the generated schema, and the
//! regular expressions the Rust validation shares with them, so that the API server and the
//! gateway reject exactly the same objects.
//!
//! The rules use the Kubernetes CEL libraries for IPs and CIDRs (`isCIDR`, `cidr(...).masked()`,
//! `containsCIDR`, `prefixLength`): Kubernetes 1.31 or later.

use schemars::Schema;
use serde_json::{Value, json};

/// A canonical domain pattern: lower-case ASCII labels (`a-z 0-9 - _`, not starting or ending with
/// `-`), punycode for internationalised names, optionally `*.` in front.
pub const DOMAIN_RE: &str =
    "^([*][.])?[a-z0-9_]([-a-z0-9_]{0,61}[a-z0-9_])?([.][a-z0-9_]([-a-z0-9_]{0,61}[a-z0-9_])?)*$";
/// A last label that makes a host an IPv4 literal (decimal or hex).
pub const NUMERIC_TLD_RE: &str = "(^|[.])([0-9]+|0[xX][0-9a-fA-F]*)$";
/// A ServiceAccount name (a DNS-1123 subdomain).
pub const SERVICE_ACCOUNT_RE: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A rule name.
pub const RULE_NAME_RE: &str = "^[a-zA-Z0-9]([-a-zA-Z0-9_.]{0,251}[a-zA-Z0-9])?$";
/// An HTTP method.
pub const METHOD_RE: &str = "^[A-Z_-]+$";
/// An HTTP path pattern.
pub const PATH_RE: &str = "^/[^*?#]*[*]?$";

/// List bounds (also keep the CEL cost estimate of the rules bounded).
pub const MAX_RULES: usize = 256;
/// Peers per rule.
pub const MAX_PEERS: usize = 128;
/// Except entries per peer, ports per rule, paths per rule.
pub const MAX_SMALL: usize = 64;
/// Methods per rule.
pub const MAX_METHODS: usize = 16;

fn add(s: &mut Schema, rules: Vec<Value>) {
    let obj = s.ensure_object();
    let list = obj.entry("x-kubernetes-validations").or_insert_with(|| json!([]));
    if let Some(a) = list.as_array_mut() {
        a.extend(rules);
    }
}

fn rule(rule: String, message: &str, field_path: &str) -> Value {
    let mut v = json!({"rule": rule, "message": message, "reason": "FieldValueInvalid"});
    if !field_path.is_empty() {
        v["fieldPath"] = json!(field_path);
    }
    v
}

/// Rules of a peer (`to[]` entry).
pub fn peer(s: &mut Schema) {
    add(
        s,
        vec![
            rule("has(self.domain) != has(self.cidr)".into(), "set exactly one of domain or cidr", ""),
            rule(
                format!(
                    "!has(self.domain) || (self.domain.matches('{DOMAIN_RE}') && !self.domain.matches('{NUMERIC_TLD_RE}') && size(self.domain) <= (self.domain.startsWith('*.') ? 255 : 253))"
                ),
                "domain must be a lower-case host name (punycode for internationalised names), optionally prefixed by '*.'; an IP address belongs in cidr",
                ".domain",
            ),
            rule(
                "!has(self.cidr) || (isCIDR(self.cidr) && cidr(self.cidr) == cidr(self.cidr).masked())".into(),
                "cidr must be an IP prefix such as 10.0.0.0/8 with no host bits set",
                ".cidr",
            ),
            rule(
                "!has(self.except) || size(self.except) == 0 || (has(self.cidr) && isCIDR(self.cidr) && self.except.all(e, isCIDR(e) && cidr(e) == cidr(e).masked() && cidr(self.cidr).containsCIDR(e) && cidr(e).prefixLength() > cidr(self.cidr).prefixLength()))".into(),
                "every except entry must be a prefix strictly inside cidr (and except needs a cidr)",
                ".except",
            ),
        ],
    );
}

/// Rules of a port range.
pub fn port_range(s: &mut Schema) {
    add(
        s,
        vec![rule(
            "!has(self.endPort) || self.endPort >= self.port".into(),
            "endPort must not be below port",
            ".endPort",
        )],
    );
}

/// Rules of the http section.
pub fn http(s: &mut Schema) {
    add(
        s,
        vec![
            rule(
                format!("!has(self.methods) || self.methods.all(m, m.matches('{METHOD_RE}') && m != 'CONNECT')"),
                "methods are upper-case HTTP methods other than CONNECT (tunnels are opaque: allow host and port without http)",
                ".methods",
            ),
            rule(
                format!("!has(self.paths) || self.paths.all(p, p.matches('{PATH_RE}'))"),
                "paths start with '/', may end with '*' (prefix match) and never contain '?' or '#'",
                ".paths",
            ),
        ],
    );
}

/// Rules of a rule.
pub fn egress_rule(s: &mut Schema) {
    add(
        s,
        vec![rule(
            format!("!has(self.name) || self.name.matches('{RULE_NAME_RE}')"),
            "name must be 1-253 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            ".name",
        )],
    );
}

/// Rules of a spec: unique rule names; `identity: Verified` not with `redirect: Transparent`.
pub fn spec(s: &mut Schema) {
    add(
        s,
        vec![
            rule(
                "!has(self.rules) || self.rules.all(r, !has(r.name) || size(self.rules.filter(x, has(x.name) && x.name == r.name)) == 1)".into(),
                "rule names must be unique within the policy",
                ".rules",
            ),
            rule(
                "!(has(self.identity) && self.identity == 'Verified' && has(self.redirect) && self.redirect == 'Transparent')".into(),
                VERIFIED_TRANSPARENT,
                ".identity",
            ),
        ],
    );
}

/// Why `identity: Verified` and `redirect: Transparent` exclude each other (CEL and Rust alike).
pub const VERIFIED_TRANSPARENT: &str = "identity: Verified selects only clients that present a token or a certificate, which transparently redirected connections never carry; use redirect: None";

/// Rules of a ServiceAccount selector.
pub fn service_account_selector(s: &mut Schema) {
    add(
        s,
        vec![rule(
            format!("self.names.all(n, n.matches('{SERVICE_ACCOUNT_RE}'))"),
            "names are ServiceAccount names: lower-case DNS subdomains of at most 253 characters",
            ".names",
        )],
    );
}

/// Rules of a label selector requirement.
pub fn requirement(s: &mut Schema) {
    add(
        s,
        vec![rule(
            "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)".into(),
            "In and NotIn need at least one value; Exists and DoesNotExist take none",
            ".values",
        )],
    );
}
