//! The `egress.dev/v1alpha1` API: `EgressPolicy` (namespaced) and `ClusterEgressPolicy`
//! (cluster-scoped), shared by the gateway and the node-redirector.
//!
//! This crate depends on nothing of the gateway: it holds the types (with their generated CRD
//! schema), label-selector matching, domain-pattern normalisation and validation with precise
//! field paths.

#![forbid(unsafe_code)]
// kube-derive repeats `type_` in each `printcolumn(...)`; clippy takes them for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod cel;
pub mod domain;
pub mod lenient;
pub mod manifests;
pub mod selector;
pub mod validate;

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use lenient::{Lenient, Undecodable};
pub use selector::{LabelSelector, LabelSelectorRequirement};
pub use validate::FieldError;

/// API group of every kind in this crate.
pub const GROUP: &str = "egress.dev";
/// API version of every kind in this crate.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in documents.
pub const API_VERSION: &str = "egress.dev/v1alpha1";

/// Desired egress of the Pods of one namespace.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "egress.dev",
    version = "v1alpha1",
    kind = "EgressPolicy",
    namespaced,
    shortname = "egp",
    status = "PolicyStatus",
    derive = "PartialEq",
    doc = "EgressPolicy allows selected Pods of its namespace to reach declared domains, CIDRs and ports through the egress gateway. Allows are additive; a Pod selected by no policy gets the gateway's defaultAction.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Redirect", type_ = "string", json_path = ".spec.redirect"),
    printcolumn(name = "Identity", type_ = "string", json_path = ".spec.identity"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.selectedPods"),
    printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = cel::spec)]
pub struct EgressPolicySpec {
    /// Selects the Pods of this namespace the policy applies to. `{}` selects every Pod of the namespace.
    pub pod_selector: LabelSelector,
    /// Narrows the selection to clients running as one of these ServiceAccounts (of this
    /// namespace). Absent: any ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<ServiceAccountSelector>,
    /// `Any` (default): a client is who its address, token, certificate or SOCKS5 user says.
    /// `Verified`: the policy's Allow rules apply only to clients that proved their identity with
    /// a ServiceAccount token, a client certificate or an identity-bearing SOCKS5 user; a client it
    /// would select by its address alone is still isolated by it and refused as `identity_required`.
    #[serde(default)]
    pub identity: IdentityRequirement,
    /// `Enforce` (default) denies what no rule allows; `Audit` lets would-deny connections through and
    /// records them. Audit never overrides the built-in guard or a cluster Deny rule.
    #[serde(default)]
    pub mode: Mode,
    /// `Transparent` asks the node-redirector to steer all TCP egress of the selected Pods to the
    /// gateway; `None` (default) relies on the application's proxy settings.
    #[serde(default)]
    pub redirect: Redirect,
    /// Name of a source-address pool configured on the gateway (`egressAddresses`); absent means `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub egress_address: Option<String>,
    /// Allow rules. An empty list allows nothing (the selected Pods are isolated).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub rules: Vec<EgressRule>,
    /// Token bucket applied per client Pod to the requests this policy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Platform-wide egress rules that select Pods across namespaces.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "egress.dev",
    version = "v1alpha1",
    kind = "ClusterEgressPolicy",
    shortname = "cegp",
    status = "PolicyStatus",
    derive = "PartialEq",
    doc = "ClusterEgressPolicy selects Pods across namespaces. Its Deny rules beat every namespaced Allow; its Allow rules add to the namespaced ones.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Redirect", type_ = "string", json_path = ".spec.redirect"),
    printcolumn(name = "Identity", type_ = "string", json_path = ".spec.identity"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.selectedPods"),
    printcolumn(name = "Accepted", type_ = "string", json_path = ".status.conditions[?(@.type==\"Accepted\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = cel::spec)]
pub struct ClusterEgressPolicySpec {
    /// Selects the namespaces by their labels. Every namespace carries
    /// `kubernetes.io/metadata.name: <name>`. `{}` selects every namespace.
    pub namespace_selector: LabelSelector,
    /// Selects Pods within the selected namespaces. `{}` selects every Pod.
    pub pod_selector: LabelSelector,
    /// Narrows the selection to clients running as one of these ServiceAccounts (in any
    /// selected namespace). Absent: any ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<ServiceAccountSelector>,
    /// `Any` (default) or `Verified`; see EgressPolicy.
    #[serde(default)]
    pub identity: IdentityRequirement,
    /// `Enforce` (default) or `Audit`; see EgressPolicy.
    #[serde(default)]
    pub mode: Mode,
    /// `None` (default) or `Transparent`; see EgressPolicy.
    #[serde(default)]
    pub redirect: Redirect,
    /// Name of a source-address pool configured on the gateway; absent means `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub egress_address: Option<String>,
    /// Rules with an explicit action. Deny rules are evaluated before any Allow rule of any policy.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub rules: Vec<ClusterEgressRule>,
    /// Token bucket applied per client Pod to the requests this policy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Whether a policy enforces its decisions or only records them.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum Mode {
    /// Deny what no rule allows.
    #[default]
    Enforce,
    /// Let would-deny connections through and record them as `audit_would_deny`.
    Audit,
}

/// How the selected Pods reach the gateway.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum Redirect {
    /// The application uses the gateway as an explicit proxy.
    #[default]
    None,
    /// The node-redirector steers all TCP egress of the selected Pods to the gateway.
    Transparent,
}

/// What a policy asks of how a client's identity was established.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum IdentityRequirement {
    /// Any way: the source address included.
    #[default]
    Any,
    /// A verified credential: a ServiceAccount token, a client certificate, or a SOCKS5 user
    /// that names an identity. Never the source address alone.
    Verified,
}

/// Selects clients by the ServiceAccount they run as.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = cel::service_account_selector)]
pub struct ServiceAccountSelector {
    /// ServiceAccount names (at least one). A client whose ServiceAccount is unknown (a
    /// `clients` row without one) matches none.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 253)))]
    pub names: Vec<String>,
}

impl ServiceAccountSelector {
    /// Whether a client running as `service_account` is selected.
    pub fn matches(&self, service_account: Option<&str>) -> bool {
        service_account.is_some_and(|sa| self.names.iter().any(|n| n == sa))
    }
}

/// What a policy's selectors look at: one client workload.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// The labels of its namespace, `kubernetes.io/metadata.name` included.
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// Its Pod's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Its ServiceAccount, when known.
    pub service_account: Option<&'a str>,
}

/// Action of a ClusterEgressPolicy rule.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum RuleAction {
    /// Allow matching connections (additive with namespaced allows).
    Allow,
    /// Deny matching connections, whatever any other policy allows.
    Deny,
}

/// One allow rule: destinations, optional ports, optional HTTP constraints.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = cel::egress_rule)]
pub struct EgressRule {
    /// Name reported in audit events and decisions. Defaults to `rules[N]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Destinations (at least one): each either a `domain` or a `cidr`.
    #[schemars(length(min = 1, max = 128))]
    pub to: Vec<Peer>,
    /// Destination ports. Empty means any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<PortRange>,
    /// Method and path constraints. A rule with `http` only matches plain-HTTP requests the gateway
    /// sees in full (absolute-form); it never matches a CONNECT, SOCKS or TLS target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
}

/// One ClusterEgressPolicy rule.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = cel::egress_rule)]
pub struct ClusterEgressRule {
    /// Name reported in audit events and decisions. Defaults to `rules[N]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// `Allow` or `Deny`.
    pub action: RuleAction,
    /// Destinations (at least one): each either a `domain` or a `cidr`.
    #[schemars(length(min = 1, max = 128))]
    pub to: Vec<Peer>,
    /// Destination ports. Empty means any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<PortRange>,
    /// Method and path constraints, as in EgressPolicy rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
}

impl ClusterEgressRule {
    /// The matching part of the rule, without its action.
    pub fn matcher(&self) -> EgressRule {
        EgressRule { name: self.name.clone(), to: self.to.clone(), ports: self.ports.clone(), http: self.http.clone() }
    }
}

/// A destination: exactly one of `domain` or `cidr`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = cel::peer)]
pub struct Peer {
    /// An exact host name (`api.stripe.com`) or `*.` followed by a name (`*.stripe.com`: one or more
    /// labels below stripe.com, never stripe.com itself). Case-insensitive; IDNA names are compared
    /// in punycode. A domain never opens private (RFC 1918, CGNAT, ULA) addresses, whatever it resolves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub domain: Option<String>,
    /// An IPv4 or IPv6 prefix such as `10.40.0.0/16`. Matches targets given as IP addresses.
    /// The only way to open private ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub cidr: Option<String>,
    /// Prefixes inside `cidr` that stay closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    pub except: Vec<String>,
}

/// A TCP port or an inclusive range of ports.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = cel::port_range)]
pub struct PortRange {
    /// The port, 1..65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    /// Last port of the range (inclusive), not below `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<u32>,
}

/// HTTP constraints of a rule.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = cel::http)]
pub struct HttpMatch {
    /// Allowed methods (upper case). Empty means any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 32)))]
    pub methods: Vec<String>,
    /// Allowed paths: a pattern ending in `*` matches every path starting with what precedes the `*`;
    /// any other pattern matches that path exactly. The query string never takes part. Empty means any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    pub paths: Vec<String>,
}

/// A token bucket per client Pod.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests (HTTP requests or new connections) per second, at least 1.
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    /// Bucket size; defaults to `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
}

/// Status written by the gateway.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: `True` with reason `Valid`, or `False` with the reason and the exact problem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How many Pods the policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i64>,
}

/// A status condition, as in `metav1.Condition`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason in CamelCase.
    #[serde(default)]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation this condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Either kind of policy, as read from a YAML document.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyPolicy {
    /// A namespaced policy.
    Namespaced(EgressPolicy),
    /// A cluster-scoped policy.
    Cluster(ClusterEgressPolicy),
}

/// Error reading a policy document.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// The document is not a mapping with `apiVersion` and `kind`.
    #[error("{0}")]
    Shape(String),
    /// The document does not deserialise into its kind: every problem found, each at its field.
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Decode(Vec<DecodeProblem>),
}

/// One field of a document that does not fit its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeProblem {
    /// The field, as a path from the document's root (`spec.rules[0].to[0].domian`), as
    /// segments: a map key or a list index.
    pub path: Vec<PathSegment>,
    /// What is wrong.
    pub message: String,
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    /// A mapping key.
    Key(String),
    /// A list index.
    Index(usize),
}

impl std::fmt::Display for DecodeProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", path_string(&self.path), self.message)
    }
}

/// `spec.rules[0].to`, or `.` for the root.
pub fn path_string(path: &[PathSegment]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            PathSegment::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            PathSegment::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    if s.is_empty() { ".".into() } else { s }
}

/// Decodes `value` as `T`, collecting every unknown field (each is reported and set aside, and
/// decoding goes on) and the first other problem.
fn decode_all<T: serde::de::DeserializeOwned>(mut value: serde_json::Value) -> Result<T, Vec<DecodeProblem>> {
    let mut problems = Vec::new();
    for _ in 0..64 {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(v) if problems.is_empty() => return Ok(v),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let path: Vec<PathSegment> = err
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(PathSegment::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(PathSegment::Index(*index)),
                _ => None,
            })
            .collect();
        let message = err.inner().to_string();
        let unknown = message.starts_with("unknown field");
        let removed = unknown && remove_at(&mut value, &path);
        problems.push(DecodeProblem { path, message });
        if !removed {
            return Err(problems);
        }
    }
    Err(problems)
}

/// Removes the field at `path` (its last segment a key); whether there was one.
fn remove_at(value: &mut serde_json::Value, path: &[PathSegment]) -> bool {
    let Some((PathSegment::Key(last), parent)) = path.split_last() else { return false };
    let mut v = value;
    for seg in parent {
        v = match (seg, v) {
            (PathSegment::Key(k), serde_json::Value::Object(m)) => match m.get_mut(k) {
                Some(x) => x,
                None => return false,
            },
            (PathSegment::Index(i), serde_json::Value::Array(a)) => match a.get_mut(*i) {
                Some(x) => x,
                None => return false,
            },
            _ => return false,
        };
    }
    v.as_object_mut().is_some_and(|m| m.remove(last).is_some())
}

impl AnyPolicy {
    /// Reads one document (already parsed as YAML/JSON) into its kind.
    pub fn from_value(value: serde_json::Value) -> Result<Self, DocumentError> {
        let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        if api_version != API_VERSION {
            return Err(DocumentError::Shape(format!("apiVersion: expected {API_VERSION:?}, found {api_version:?}")));
        }
        match kind {
            "EgressPolicy" => decode_all(value).map(AnyPolicy::Namespaced).map_err(DocumentError::Decode),
            "ClusterEgressPolicy" => decode_all(value).map(AnyPolicy::Cluster).map_err(DocumentError::Decode),
            other => Err(DocumentError::Shape(format!(
                "kind: expected EgressPolicy or ClusterEgressPolicy, found {other:?}"
            ))),
        }
    }

    /// Whether the policy's selectors (namespace, Pod labels, ServiceAccount) select `w`. How
    /// `w`'s identity was established (`spec.identity`) is the gateway's concern, not this.
    pub fn selects(&self, w: &Workload<'_>) -> bool {
        let (in_scope, pods, accounts) = match self {
            AnyPolicy::Namespaced(p) => (
                p.metadata.namespace.as_deref() == Some(w.namespace),
                &p.spec.pod_selector,
                p.spec.service_account_selector.as_ref(),
            ),
            AnyPolicy::Cluster(p) => (
                p.spec.namespace_selector.matches(w.namespace_labels),
                &p.spec.pod_selector,
                p.spec.service_account_selector.as_ref(),
            ),
        };
        in_scope && pods.matches(w.labels) && accounts.is_none_or(|a| a.matches(w.service_account))
    }

    /// `spec.identity`.
    pub fn identity(&self) -> IdentityRequirement {
        match self {
            AnyPolicy::Namespaced(p) => p.spec.identity,
            AnyPolicy::Cluster(p) => p.spec.identity,
        }
    }

    /// `spec.redirect`.
    pub fn redirect(&self) -> Redirect {
        match self {
            AnyPolicy::Namespaced(p) => p.spec.redirect,
            AnyPolicy::Cluster(p) => p.spec.redirect,
        }
    }

    /// `namespace/name` for namespaced policies, `name` for cluster ones.
    pub fn key(&self) -> String {
        match self {
            AnyPolicy::Namespaced(p) => format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name.as_deref().unwrap_or("")
            ),
            AnyPolicy::Cluster(p) => p.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// Every problem of the document, with field paths.
    pub fn validate(&self) -> Vec<FieldError> {
        match self {
            AnyPolicy::Namespaced(p) => validate::egress_policy(p),
            AnyPolicy::Cluster(p) => validate::cluster_egress_policy(p),
        }
    }
}

/// Labels of a namespace as Kubernetes sets them: its own labels plus
/// `kubernetes.io/metadata.name: <name>`.
pub fn namespace_labels(name: &str, labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut all = labels.clone();
    all.insert("kubernetes.io/metadata.name".to_string(), name.to_string());
    all
}

#[cfg(test)]
mod hostile_documents {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// `n` cases, times `EGRESS_FUZZ_SCALE` (scripts/fuzz.sh runs a longer budget).
    fn fuzz_cases(n: u32) -> u32 {
        n * std::env::var("EGRESS_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
    }

    /// JSON values shaped like policy documents: the keys of the schema (and a few that are not)
    /// at any depth, with any kind of value.
    fn document() -> impl Strategy<Value = Value> {
        let keys = prop::sample::select(vec![
            "apiVersion",
            "kind",
            "metadata",
            "name",
            "namespace",
            "spec",
            "podSelector",
            "namespaceSelector",
            "matchLabels",
            "matchExpressions",
            "key",
            "operator",
            "values",
            "rules",
            "to",
            "domain",
            "cidr",
            "except",
            "ports",
            "port",
            "endPort",
            "protocol",
            "http",
            "methods",
            "paths",
            "action",
            "mode",
            "redirect",
            "egressAddress",
            "rateLimit",
            "requestsPerSecond",
            "burst",
            "podSelectr",
            "",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "\\PC{0,24}".prop_map(Value::from),
            prop::sample::select(vec![
                "*.example.com",
                "10.0.0.0/8",
                "Deny",
                "Allow",
                "Audit",
                "Transparent",
                "GET",
                "In",
                "::/0"
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(keys.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases(3000)))]

        /// Any document: decoding and validation never panic, and every decode problem names a
        /// field path.
        #[test]
        fn never_panics_on_hostile_documents(spec in document(), kind in prop::sample::select(vec!["EgressPolicy", "ClusterEgressPolicy", "Other"])) {
            let doc = json!({"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "p", "namespace": "n"}, "spec": spec});
            match AnyPolicy::from_value(doc) {
                Ok(p) => {
                    let _ = p.validate();
                }
                Err(DocumentError::Decode(problems)) => prop_assert!(!problems.is_empty()),
                Err(DocumentError::Shape(_)) => prop_assert_eq!(kind, "Other"),
            }
        }
    }
}
