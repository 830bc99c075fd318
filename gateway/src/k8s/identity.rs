//! The Pod identity index: every Pod IP (IPv4 and IPv6, `status.podIPs`) -> the Pod.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::inputs::PodIdentity;

/// Rank of a Pod's claim on its IP when two Pods report the same one (a reused IP): a running
/// Pod beats a pending one, a Pod not being deleted beats one that is, newer beats older.
fn claim_rank(p: &Pod) -> (u8, bool, String) {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    let phase_rank = match phase {
        "Running" => 2,
        "Pending" => 1,
        _ => 0,
    };
    let created = p.metadata.creation_timestamp.as_ref().map(|t| format!("{:?}", t.0)).unwrap_or_default();
    (phase_rank, p.metadata.deletion_timestamp.is_none(), created)
}

/// Builds the identities of Pods that own IPs. Pods with `hostNetwork` never own an IP (they share
/// the node's); finished Pods (`Succeeded`, `Failed`) have released theirs.
pub(crate) fn pod_identities(
    pods: &[Arc<Pod>],
    ns_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<PodIdentity> {
    let mut owner: HashMap<IpAddr, &Pod> = HashMap::new();
    for p in pods {
        let host_network = p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
        if host_network || matches!(phase, "Succeeded" | "Failed") {
            continue;
        }
        for ip in pod_ips(p) {
            match owner.get(&ip) {
                Some(cur) if claim_rank(cur) >= claim_rank(p) => {}
                _ => {
                    owner.insert(ip, p);
                }
            }
        }
    }
    let mut by_pod: BTreeMap<(String, String), PodIdentity> = BTreeMap::new();
    for (ip, p) in owner {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let entry = by_pod.entry((namespace.clone(), name.clone())).or_insert_with(|| PodIdentity {
            ips: Vec::new(),
            namespace_labels: ns_labels
                .get(&namespace)
                .cloned()
                .unwrap_or_else(|| egress_crds::namespace_labels(&namespace, &BTreeMap::new())),
            namespace,
            name,
            uid: p.metadata.uid.clone().unwrap_or_default(),
            labels: p.metadata.labels.clone().unwrap_or_default(),
            service_account: p.spec.as_ref().and_then(|s| s.service_account_name.clone()),
            node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        });
        entry.ips.push(ip);
    }
    by_pod.into_values().collect()
}

fn pod_ips(p: &Pod) -> Vec<IpAddr> {
    let Some(st) = p.status.as_ref() else {
        return Vec::new();
    };
    let mut v: Vec<IpAddr> = st.pod_ips.iter().flatten().filter_map(|i| i.ip.parse().ok()).collect();
    if let Some(ip) = st.pod_ip.as_deref().and_then(|s| s.parse().ok())
        && !v.contains(&ip)
    {
        v.push(ip);
    }
    v
}
