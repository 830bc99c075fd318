//! The desired nftables table, as one intermediate form rendered both as nft syntax (for
//! `render` and people) and as libnftables JSON (applied with `nft -j -f -` in one transaction).

use std::collections::BTreeSet;
use std::net::IpAddr;

use egress_crds::{AnyPolicy, Redirect};
use ipnet::IpNet;
use serde_json::{Value, json};

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::config::{Config, PodEntry};

/// What the table is computed from: one shape for both sources (standalone file, Kubernetes).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// This node.
    pub node_name: String,
    /// Pods (only those on this node matter).
    pub pods: Vec<PodEntry>,
    /// Namespace labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Valid policies.
    pub policies: Vec<AnyPolicy>,
    /// Gateway transparent endpoints.
    pub gateways: Vec<SocketAddr>,
    /// When the first API event of the change that produced these inputs arrived (Kubernetes).
    pub changed_at: Option<std::time::Instant>,
}

/// The table the redirector owns entirely.
pub const TABLE: &str = "egress_redirector";

/// Addresses the node drops from selected Pods, whatever else happens (defence in depth; the
/// gateway's guard blocks them too).
pub const METADATA: &[&str] =
    &["169.254.169.254/32", "169.254.170.2/32", "100.100.100.200/32", "168.63.129.16/32", "fd00:ec2::254/128"];

/// The desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Pod addresses whose TCP egress is steered.
    pub selected: BTreeSet<IpAddr>,
    /// Destinations never steered.
    pub excluded: BTreeSet<IpNet>,
    /// Cluster DNS servers.
    pub dns: BTreeSet<IpAddr>,
    /// Relay port.
    pub relay_port: u16,
}

/// Whether a `redirect: Transparent` policy selects `pod`.
pub fn is_selected(i: &Inputs, pod: &PodEntry) -> bool {
    let ns_labels =
        egress_crds::namespace_labels(&pod.namespace, i.namespaces.get(&pod.namespace).unwrap_or(&Default::default()));
    i.policies.iter().any(|p| match p {
        AnyPolicy::Namespaced(p) => {
            p.spec.redirect == Redirect::Transparent
                && p.metadata.namespace.as_deref() == Some(pod.namespace.as_str())
                && p.spec.pod_selector.matches(&pod.labels)
        }
        AnyPolicy::Cluster(p) => {
            p.spec.redirect == Redirect::Transparent
                && p.spec.namespace_selector.matches(&ns_labels)
                && p.spec.pod_selector.matches(&pod.labels)
        }
    })
}

/// The table for the Pods of this node that are selected by a `redirect: Transparent` policy.
pub fn desired(i: &Inputs, c: &Config) -> Desired {
    let mut selected = BTreeSet::new();
    for pod in i.pods.iter().filter(|p| p.node_name == i.node_name) {
        if is_selected(i, pod) {
            selected.extend(pod.ips.iter().copied());
        }
    }
    let mut nets: Vec<IpNet> = c.exclude_cidrs.iter().map(|n| n.trunc()).collect();
    nets.extend(i.gateways.iter().map(|g| IpNet::from(g.ip())));
    // nft interval sets refuse overlapping elements: merge them first.
    let excluded: BTreeSet<IpNet> = IpNet::aggregate(&nets).into_iter().collect();
    Desired { selected, excluded, dns: c.cluster_dns.iter().copied().collect(), relay_port: c.relay.port }
}

fn v4<T: Copy + Into<IpAddr>>(xs: impl IntoIterator<Item = T>) -> Vec<IpAddr> {
    xs.into_iter().map(Into::into).filter(|a: &IpAddr| a.is_ipv4()).collect()
}

impl Desired {
    fn split_addrs(set: &BTreeSet<IpAddr>) -> (Vec<IpAddr>, Vec<IpAddr>) {
        (v4(set.iter().copied()), set.iter().copied().filter(|a| a.is_ipv6()).collect())
    }

    fn split_nets(set: impl IntoIterator<Item = IpNet>) -> (Vec<IpNet>, Vec<IpNet>) {
        set.into_iter().partition(|n| matches!(n, IpNet::V4(_)))
    }

    fn metadata() -> (Vec<IpNet>, Vec<IpNet>) {
        Self::split_nets(METADATA.iter().filter_map(|s| s.parse().ok()))
    }

    /// nft syntax.
    pub fn render(&self) -> String {
        let (sel4, sel6) = Self::split_addrs(&self.selected);
        let (ex4, ex6) = Self::split_nets(self.excluded.iter().copied());
        let (dns4, dns6) = Self::split_addrs(&self.dns);
        let (md4, md6) = Self::metadata();
        let list =
            |v: Vec<String>| if v.is_empty() { String::new() } else { format!(" elements = {{ {} }};", v.join(", ")) };
        let addrs = |v: &[IpAddr]| list(v.iter().map(|a| a.to_string()).collect());
        let nets = |v: &[IpNet]| list(v.iter().map(|a| a.to_string()).collect());
        let p = self.relay_port;
        format!(
            "table inet {TABLE} {{
\tset selected_v4 {{ type ipv4_addr;{s4} }}
\tset selected_v6 {{ type ipv6_addr;{s6} }}
\tset excluded_v4 {{ type ipv4_addr; flags interval;{e4} }}
\tset excluded_v6 {{ type ipv6_addr; flags interval;{e6} }}
\tset dns_v4 {{ type ipv4_addr;{d4} }}
\tset dns_v6 {{ type ipv6_addr;{d6} }}
\tset metadata_v4 {{ type ipv4_addr; flags interval;{m4} }}
\tset metadata_v6 {{ type ipv6_addr; flags interval;{m6} }}
\tchain guard {{
\t\ttype filter hook prerouting priority -150; policy accept;
\t\tip saddr @selected_v4 ip daddr @metadata_v4 drop
\t\tip6 saddr @selected_v6 ip6 daddr @metadata_v6 drop
\t\tip saddr @selected_v4 ip daddr @dns_v4 udp dport 53 accept
\t\tip6 saddr @selected_v6 ip6 daddr @dns_v6 udp dport 53 accept
\t\tip saddr @selected_v4 ip daddr != @excluded_v4 meta l4proto udp drop
\t\tip6 saddr @selected_v6 ip6 daddr != @excluded_v6 meta l4proto udp drop
\t}}
\tchain steer {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip saddr @selected_v4 ip daddr @dns_v4 tcp dport 53 accept
\t\tip6 saddr @selected_v6 ip6 daddr @dns_v6 tcp dport 53 accept
\t\tip saddr @selected_v4 ip daddr != @excluded_v4 meta l4proto tcp redirect to :{p}
\t\tip6 saddr @selected_v6 ip6 daddr != @excluded_v6 meta l4proto tcp redirect to :{p}
\t}}
}}
",
            s4 = addrs(&sel4),
            s6 = addrs(&sel6),
            e4 = nets(&ex4),
            e6 = nets(&ex6),
            d4 = addrs(&dns4),
            d6 = addrs(&dns6),
            m4 = nets(&md4),
            m6 = nets(&md6),
        )
    }

    /// libnftables JSON for one transaction that replaces the whole table.
    pub fn json(&self) -> Value {
        let (sel4, sel6) = Self::split_addrs(&self.selected);
        let (ex4, ex6) = Self::split_nets(self.excluded.iter().copied());
        let (dns4, dns6) = Self::split_addrs(&self.dns);
        let (md4, md6) = Self::metadata();
        let t = json!({"family": "inet", "name": TABLE});
        let mut cmds =
            vec![json!({"add": {"table": t}}), json!({"delete": {"table": t}}), json!({"add": {"table": t}})];
        let addr_elems = |v: &[IpAddr]| v.iter().map(|a| json!(a.to_string())).collect::<Vec<_>>();
        let net_elems = |v: &[IpNet]| {
            v.iter()
                .map(|n| json!({"prefix": {"addr": n.addr().to_string(), "len": n.prefix_len()}}))
                .collect::<Vec<_>>()
        };
        let mut set = |name: &str, ty: &str, interval: bool, elems: Vec<Value>| {
            let mut s = json!({"family": "inet", "table": TABLE, "name": name, "type": ty});
            if interval {
                s["flags"] = json!(["interval"]);
            }
            if !elems.is_empty() {
                s["elem"] = json!(elems);
            }
            cmds.push(json!({"add": {"set": s}}));
        };
        set("selected_v4", "ipv4_addr", false, addr_elems(&sel4));
        set("selected_v6", "ipv6_addr", false, addr_elems(&sel6));
        set("excluded_v4", "ipv4_addr", true, net_elems(&ex4));
        set("excluded_v6", "ipv6_addr", true, net_elems(&ex6));
        set("dns_v4", "ipv4_addr", false, addr_elems(&dns4));
        set("dns_v6", "ipv6_addr", false, addr_elems(&dns6));
        set("metadata_v4", "ipv4_addr", true, net_elems(&md4));
        set("metadata_v6", "ipv6_addr", true, net_elems(&md6));
        let chain = |name: &str, ty: &str, prio: i32| json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": name, "type": ty, "hook": "prerouting", "prio": prio, "policy": "accept"}}});
        cmds.push(chain("guard", "filter", -150));
        cmds.push(chain("steer", "nat", -100));
        let m = |op: &str, proto: &str, field: &str, right: Value| json!({"match": {"op": op, "left": {"payload": {"protocol": proto, "field": field}}, "right": right}});
        let l4 = |p: &str| json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": p}});
        let mut rule = |chain: &str, expr: Vec<Value>| {
            cmds.push(json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": expr}}}));
        };
        for (ip, v) in [("ip", "v4"), ("ip6", "v6")] {
            let sel = m("==", ip, "saddr", json!(format!("@selected_{v}")));
            rule(
                "guard",
                vec![sel.clone(), m("==", ip, "daddr", json!(format!("@metadata_{v}"))), json!({"drop": null})],
            );
            rule(
                "guard",
                vec![
                    sel.clone(),
                    m("==", ip, "daddr", json!(format!("@dns_{v}"))),
                    m("==", "udp", "dport", json!(53)),
                    json!({"accept": null}),
                ],
            );
            rule(
                "guard",
                vec![
                    sel.clone(),
                    m("!=", ip, "daddr", json!(format!("@excluded_{v}"))),
                    l4("udp"),
                    json!({"drop": null}),
                ],
            );
        }
        for (ip, v) in [("ip", "v4"), ("ip6", "v6")] {
            let sel = m("==", ip, "saddr", json!(format!("@selected_{v}")));
            rule(
                "steer",
                vec![
                    sel.clone(),
                    m("==", ip, "daddr", json!(format!("@dns_{v}"))),
                    m("==", "tcp", "dport", json!(53)),
                    json!({"accept": null}),
                ],
            );
            rule(
                "steer",
                vec![
                    sel,
                    m("!=", ip, "daddr", json!(format!("@excluded_{v}"))),
                    l4("tcp"),
                    json!({"redirect": {"port": self.relay_port}}),
                ],
            );
        }
        json!({"nftables": cmds})
    }
}

impl Desired {
    /// When only the selected Pod addresses differ from `current`, the element changes that turn
    /// it into `self` (one transaction, the table and its rules untouched); `None` when the
    /// table's shape changed and it must be replaced whole.
    pub fn delta_from(&self, current: &Desired) -> Option<Value> {
        if self.excluded != current.excluded || self.dns != current.dns || self.relay_port != current.relay_port {
            return None;
        }
        let mut cmds = Vec::new();
        for (verb, from, to) in
            [("add", &current.selected, &self.selected), ("delete", &self.selected, &current.selected)]
        {
            let changed: Vec<&IpAddr> = to.difference(from).collect();
            for (set, v4) in [("selected_v4", true), ("selected_v6", false)] {
                let elems: Vec<Value> =
                    changed.iter().filter(|a| a.is_ipv4() == v4).map(|a| json!(a.to_string())).collect();
                if !elems.is_empty() {
                    cmds.push(
                        json!({verb: {"element": {"family": "inet", "table": TABLE, "name": set, "elem": elems}}}),
                    );
                }
            }
        }
        Some(json!({"nftables": cmds}))
    }
}
