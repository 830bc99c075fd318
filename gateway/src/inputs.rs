//! What the Kubernetes API contributes to a snapshot: the types `k8s` produces and `pipeline`
//! compiles. Neither of those modules imports the other; both import this one.

use std::collections::BTreeMap;
use std::net::IpAddr;

use egress_crds::AnyPolicy;

/// The policies and Pods of the API, as of one coalesced change of the watchers.
#[derive(Debug, Default, Clone)]
pub(crate) struct KubeInputs {
    /// Valid policies (invalid ones are left out whole).
    pub policies: Vec<AnyPolicy>,
    /// Invalid policies: `(kind, key, errors)`.
    pub invalid: Vec<(&'static str, String, Vec<egress_crds::FieldError>)>,
    /// Pod IP -> identity.
    pub pods: Vec<PodIdentity>,
    /// The gateway's Ready replicas (`kubernetes.rateLimitReplicas`; `None` when not counted).
    pub ready_replicas: Option<u32>,
    /// Every Namespace's labels (with `kubernetes.io/metadata.name`), for clients identified by
    /// a token or a SOCKS5 user rather than by a Pod.
    pub namespace_labels: std::sync::Arc<BTreeMap<String, BTreeMap<String, String>>>,
}

/// One Pod's identity and addresses.
#[derive(Debug, Clone)]
pub struct PodIdentity {
    /// Its IPs.
    pub ips: Vec<IpAddr>,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Namespace labels.
    pub namespace_labels: BTreeMap<String, String>,
    /// Service account.
    pub service_account: Option<String>,
    /// Node.
    pub node: Option<String>,
}

impl PodIdentity {
    /// What a policy's selectors look at.
    pub fn workload(&self) -> egress_crds::Workload<'_> {
        egress_crds::Workload {
            namespace: &self.namespace,
            namespace_labels: &self.namespace_labels,
            labels: &self.labels,
            service_account: self.service_account.as_deref(),
        }
    }
}
