//! The desired nftables table. Every rule is described once ([`Rule`]: matches and a verdict) and
//! rendered both as nft syntax (for `render` and people) and as libnftables JSON (applied with
//! `nft -j -f -`, one transaction).
//!
//! What the table enforces for a selected Pod (one whose address a `redirect: Transparent` policy
//! selects), in order:
//!
//! 1. Its interface carries only its own addresses (anti-spoofing): a packet from the interface
//!    of a selected Pod whose source is not an address of a Pod on that interface is dropped, so
//!    a second address added inside the Pod gets nowhere. IPv6 neighbour discovery from
//!    link-local addresses stays on the link and passes. A routed interface (one veth per Pod,
//!    the node routing to it) is checked in the `inet` table; a bridge port (flannel, kubenet,
//!    the CNI bridge plugin: every Pod behind one bridge) in a second table of the `bridge`
//!    family, as frames enter the bridge, where the port is still known: there ARP is checked
//!    too (a Pod may claim only its own addresses) and any other kind of frame is dropped.
//! 2. Cloud metadata is dropped.
//! 3. Cluster destinations (`excludeCidrs`, the gateways) are left alone.
//! 4. Of the rest only two kinds of traffic leave: TCP, which the `steer` chain redirects to the
//!    relay (and the packets of connections so redirected), and DNS to `clusterDns`. Answers to
//!    connections made *to* the Pod, and ICMP errors of allowed flows (conntrack `related`),
//!    pass. Everything else (UDP, ICMP echo, SCTP, any other protocol, TCP that conntrack calls
//!    invalid or that was never redirected) is dropped.
//!
//! And for everyone: the relay port accepts only connections that were redirected to it (a
//! direct connection is reset), and Pods of this node cannot reach the gateways' transparent
//! endpoints themselves (only the relay, a local process, does).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use egress_crds::{AnyPolicy, Redirect, Workload};
use ipnet::IpNet;
use serde_json::{Value, json};

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
    /// The policies whose selection steers (in Kubernetes mode, invalid ones too: see
    /// `k8s::steering`).
    pub policies: Vec<AnyPolicy>,
    /// Gateway transparent endpoints.
    pub gateways: Vec<SocketAddr>,
    /// Host-side interface of a Pod address, from the node's host routes (see [`crate::routes`]),
    /// for Pods whose entry names none.
    pub interfaces: BTreeMap<IpAddr, String>,
    /// When the first API event of the change that produced these inputs arrived (Kubernetes).
    pub changed_at: Option<std::time::Instant>,
}

/// The name of the tables the redirector owns entirely: one of the `inet` family (everything),
/// and one of the `bridge` family (anti-spoofing on bridge ports); see [`Table`].
pub const TABLE: &str = "egress_redirector";

/// The redirector's two tables, both named [`TABLE`], changed together in one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `inet`: steering, and everything checked of routed packets.
    Inet,
    /// `bridge`: anti-spoofing of the frames a selected Pod sends into a bridge (its port is
    /// its host-side interface): after the bridge, the routed packet's interface is the bridge
    /// itself, shared by every Pod behind it.
    Bridge,
}

impl Table {
    /// Both, in the order they are written.
    pub const ALL: [Table; 2] = [Table::Inet, Table::Bridge];

    /// The nft family.
    pub fn family(self) -> &'static str {
        match self {
            Table::Inet => "inet",
            Table::Bridge => "bridge",
        }
    }
}

/// Addresses the node drops from selected Pods, whatever else happens (defence in depth; the
/// gateway's guard blocks them too).
pub const METADATA: &[&str] =
    &["169.254.169.254/32", "169.254.170.2/32", "100.100.100.200/32", "168.63.129.16/32", "fd00:ec2::254/128"];

/// The desired state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// Pod addresses whose egress is steered.
    pub selected: BTreeSet<IpAddr>,
    /// Host-side interfaces of selected Pods (anti-spoofing applies to these).
    pub selected_ifaces: BTreeSet<String>,
    /// `(interface, address)` of every Pod of this node whose interface is known: the only
    /// sources a selected Pod's interface may carry.
    pub pod_addrs: BTreeSet<(String, IpAddr)>,
    /// Every Pod address of this node (they may not reach the gateways' transparent endpoints).
    pub pods: BTreeSet<IpAddr>,
    /// Gateway transparent endpoints.
    pub gateways: BTreeSet<SocketAddr>,
    /// Destinations never steered.
    pub excluded: BTreeSet<IpNet>,
    /// Cluster DNS servers.
    pub dns: BTreeSet<IpAddr>,
    /// The DNS forwarder's port for each cluster DNS server (`dns.enabled`): selected Pods' DNS
    /// to that server is redirected there.
    pub dns_forward: Vec<(IpAddr, u16)>,
    /// Relay port.
    pub relay_port: u16,
    /// What the tables depend on of the node itself: where steered connections are DNAT'ed to,
    /// and whether there is a `bridge` table.
    pub node: Node,
}

/// What the table depends on of the node itself: found once at start, fixed for the life of the
/// process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Node {
    /// Where steered connections go.
    pub relay_to: RelayTo,
    /// Whether the kernel has nf_tables' `bridge` family (every distribution kernel does). Without
    /// it there is no `bridge` table: steering works, and Pods on bridge ports go without
    /// anti-spoofing, counted as unguarded (see [`Desired::unguarded`]).
    pub bridge: bool,
}

/// The node's own addresses that steered connections (TCP to the relay, DNS to the forwarder)
/// are sent to, one per family (`relay.addresses`, else found at start: see
/// [`crate::routes::node_addresses`]). `redirect` would use the primary address of the interface
/// a packet came in on, and the kernel drops the packet when that interface has none: the case
/// of the host side of a Pod's veth under Calico, Cilium or the AWS VPC CNI. A family without an
/// address falls back to `redirect` (which works where the Pod's interface has an address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayTo {
    /// For IPv4.
    pub v4: Option<std::net::Ipv4Addr>,
    /// For IPv6.
    pub v6: Option<std::net::Ipv6Addr>,
}

impl RelayTo {
    /// The address for family `f`.
    fn of(&self, f: Fam) -> Option<IpAddr> {
        match f {
            Fam::V4 => self.v4.map(IpAddr::V4),
            Fam::V6 => self.v6.map(IpAddr::V6),
        }
    }

    /// To `port` on this node: DNAT to the family's address, or `redirect`.
    fn verdict(&self, f: Fam, port: u16) -> Verdict {
        match self.of(f) {
            Some(a) => Verdict::Dnat(a, port),
            None => Verdict::Redirect(port),
        }
    }
}

/// Whether a `redirect: Transparent` policy selects `pod`.
pub fn is_selected(i: &Inputs, pod: &PodEntry) -> bool {
    let ns_labels =
        egress_crds::namespace_labels(&pod.namespace, i.namespaces.get(&pod.namespace).unwrap_or(&Default::default()));
    let w = Workload {
        namespace: &pod.namespace,
        namespace_labels: &ns_labels,
        labels: &pod.labels,
        service_account: pod.service_account.as_deref(),
    };
    i.policies.iter().any(|p| p.redirect() == Redirect::Transparent && p.selects(&w))
}

/// The tables for the Pods of this node (`node`: what they depend on of the node itself).
pub fn desired(i: &Inputs, c: &Config, node: Node) -> Desired {
    let mut d =
        Desired { relay_port: c.relay.port, dns: c.cluster_dns.iter().copied().collect(), node, ..Desired::default() };
    if c.dns.enabled {
        d.dns_forward = dns_forward_ports(c);
    }
    for pod in i.pods.iter().filter(|p| p.node_name == i.node_name) {
        let selected = is_selected(i, pod);
        for ip in &pod.ips {
            d.pods.insert(*ip);
            let iface = pod.interface.as_ref().or_else(|| i.interfaces.get(ip));
            if let Some(iface) = iface {
                d.pod_addrs.insert((iface.clone(), *ip));
                if selected {
                    d.selected_ifaces.insert(iface.clone());
                }
            }
            if selected {
                d.selected.insert(*ip);
            }
        }
    }
    d.gateways = i.gateways.iter().copied().collect();
    let mut nets: Vec<IpNet> = c.exclude_cidrs.iter().map(|n| n.trunc()).collect();
    nets.extend(i.gateways.iter().map(|g| IpNet::from(g.ip())));
    // nft interval sets refuse overlapping elements: merge them first.
    d.excluded = IpNet::aggregate(&nets).into_iter().collect();
    d
}

/// The forwarder port of each `clusterDns` address: `dns.port + index`.
pub fn dns_forward_ports(c: &Config) -> Vec<(IpAddr, u16)> {
    c.cluster_dns.iter().enumerate().map(|(i, ip)| (*ip, c.dns.port.saturating_add(i as u16))).collect()
}

/// The address families, with their nft names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn ip(self) -> &'static str {
        match self {
            Fam::V4 => "ip",
            Fam::V6 => "ip6",
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Fam::V4 => "v4",
            Fam::V6 => "v6",
        }
    }
    fn addr_type(self) -> &'static str {
        match self {
            Fam::V4 => "ipv4_addr",
            Fam::V6 => "ipv6_addr",
        }
    }
    fn icmp(self) -> &'static str {
        match self {
            Fam::V4 => "icmp",
            Fam::V6 => "ipv6-icmp",
        }
    }
    /// The chain of a selected Pod's packets of this family.
    fn guard_chain(self) -> &'static str {
        match self {
            Fam::V4 => "selected_v4",
            Fam::V6 => "selected_v6",
        }
    }
    fn of(a: IpAddr) -> Fam {
        if a.is_ipv4() { Fam::V4 } else { Fam::V6 }
    }
}

/// One match of a rule.
#[derive(Debug, Clone)]
enum M {
    /// `ip saddr @set` (or `!=`).
    Saddr(Fam, String, bool),
    /// `ip daddr @set` (or `!=`).
    Daddr(Fam, String, bool),
    /// `ip saddr { nets }`.
    SaddrNets(Fam, Vec<&'static str>),
    /// `ip daddr { nets }`.
    DaddrNets(Fam, Vec<&'static str>),
    /// `ip daddr ADDR`.
    DaddrIs(IpAddr),
    /// `iifname @set`.
    Iif(String),
    /// `iifname . ip saddr @set` (or `!=`).
    IifSaddr(Fam, String, bool),
    /// `arp htype 1 arp ptype ip arp hlen 6 arp plen 4`: ARP for IPv4 over Ethernet, the only
    /// kind whose sender address the next matches read.
    ArpIpv4,
    /// `arp saddr ip ADDR`.
    ArpSaddrIs(&'static str),
    /// `arp saddr ip @set`.
    ArpSaddr(String),
    /// `iifname . arp saddr ip @set` (or `!=`).
    IifArpSaddr(String, bool),
    /// `ip daddr . tcp dport @set`.
    DaddrDport(Fam, String),
    /// `meta l4proto { .. }`.
    L4(Vec<&'static str>),
    /// `th dport N` (TCP or UDP: after an `L4` match).
    Dport(u16),
    /// `tcp dport N`.
    TcpDport(u16),
    /// `icmpv6 type { .. }`.
    Icmp6Type(Vec<&'static str>),
    /// `ct state { .. }`.
    CtState(Vec<&'static str>),
    /// `ct direction reply`.
    CtReply,
    /// `ct status dnat`.
    CtDnat,
}

impl M {
    fn text(&self) -> String {
        let set = |neg: bool, s: &str| format!("{}@{s}", if neg { "!= " } else { "" });
        let list = |v: &[&str]| if v.len() == 1 { v[0].to_string() } else { format!("{{ {} }}", v.join(", ")) };
        match self {
            M::Saddr(f, s, neg) => format!("{} saddr {}", f.ip(), set(*neg, s)),
            M::Daddr(f, s, neg) => format!("{} daddr {}", f.ip(), set(*neg, s)),
            M::SaddrNets(f, v) => format!("{} saddr {}", f.ip(), list(v)),
            M::DaddrNets(f, v) => format!("{} daddr {}", f.ip(), list(v)),
            M::DaddrIs(a) => format!("{} daddr {a}", Fam::of(*a).ip()),
            M::Iif(s) => format!("iifname @{s}"),
            M::IifSaddr(f, s, neg) => format!("iifname . {} saddr {}", f.ip(), set(*neg, s)),
            M::ArpIpv4 => "arp htype 1 arp ptype ip arp hlen 6 arp plen 4".to_string(),
            M::ArpSaddrIs(a) => format!("arp saddr ip {a}"),
            M::ArpSaddr(s) => format!("arp saddr ip @{s}"),
            M::IifArpSaddr(s, neg) => format!("iifname . arp saddr ip {}", set(*neg, s)),
            M::DaddrDport(f, s) => format!("{} daddr . tcp dport @{s}", f.ip()),
            M::L4(v) => format!("meta l4proto {}", list(v)),
            M::Dport(p) => format!("th dport {p}"),
            M::TcpDport(p) => format!("tcp dport {p}"),
            M::Icmp6Type(v) => format!("icmpv6 type {}", list(v)),
            M::CtState(v) => format!("ct state {}", list(v)),
            M::CtReply => "ct direction reply".to_string(),
            M::CtDnat => "ct status dnat".to_string(),
        }
    }

    /// The libnftables JSON expressions of this match (one, except for [`M::ArpIpv4`]).
    fn json(&self) -> Vec<Value> {
        let payload = |proto: &str, field: &str| json!({"payload": {"protocol": proto, "field": field}});
        let m = |op: &str, left: Value, right: Value| json!({"match": {"op": op, "left": left, "right": right}});
        let eq = |neg: bool| if neg { "!=" } else { "==" };
        let anon = |v: &[&str]| -> Value {
            let items: Vec<Value> = v
                .iter()
                .map(|x| match x.parse::<IpNet>() {
                    Ok(n) => json!({"prefix": {"addr": n.addr().to_string(), "len": n.prefix_len()}}),
                    Err(_) => json!(x),
                })
                .collect();
            if items.len() == 1 { items[0].clone() } else { json!({"set": items}) }
        };
        let iif = json!({"meta": {"key": "iifname"}});
        vec![match self {
            M::Saddr(f, s, neg) => m(eq(*neg), payload(f.ip(), "saddr"), json!(format!("@{s}"))),
            M::Daddr(f, s, neg) => m(eq(*neg), payload(f.ip(), "daddr"), json!(format!("@{s}"))),
            M::SaddrNets(f, v) => m("==", payload(f.ip(), "saddr"), anon(v)),
            M::DaddrNets(f, v) => m("==", payload(f.ip(), "daddr"), anon(v)),
            M::DaddrIs(a) => m("==", payload(Fam::of(*a).ip(), "daddr"), json!(a.to_string())),
            M::Iif(s) => m("==", iif, json!(format!("@{s}"))),
            M::IifSaddr(f, s, neg) => {
                m(eq(*neg), json!({"concat": [iif, payload(f.ip(), "saddr")]}), json!(format!("@{s}")))
            }
            M::ArpIpv4 => {
                let arp = |field: &str, v: Value| m("==", payload("arp", field), v);
                return vec![
                    arp("htype", json!(1)),
                    arp("ptype", json!("ip")),
                    arp("hlen", json!(6)),
                    arp("plen", json!(4)),
                ];
            }
            M::ArpSaddrIs(a) => m("==", payload("arp", "saddr ip"), json!(a)),
            M::ArpSaddr(s) => m("==", payload("arp", "saddr ip"), json!(format!("@{s}"))),
            M::IifArpSaddr(s, neg) => {
                m(eq(*neg), json!({"concat": [iif, payload("arp", "saddr ip")]}), json!(format!("@{s}")))
            }
            M::DaddrDport(f, s) => {
                m("==", json!({"concat": [payload(f.ip(), "daddr"), payload("tcp", "dport")]}), json!(format!("@{s}")))
            }
            M::L4(v) => m("==", json!({"meta": {"key": "l4proto"}}), anon(v)),
            M::Dport(p) => m("==", payload("th", "dport"), json!(p)),
            M::TcpDport(p) => m("==", payload("tcp", "dport"), json!(p)),
            M::Icmp6Type(v) => m("==", payload("icmpv6", "type"), anon(v)),
            M::CtState(v) => m("in", json!({"ct": {"key": "state"}}), json!(v)),
            M::CtReply => m("==", json!({"ct": {"key": "direction"}}), json!("reply")),
            M::CtDnat => m("in", json!({"ct": {"key": "status"}}), json!("dnat")),
        }]
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Accept,
    Drop,
    Redirect(u16),
    /// DNAT to an address of this node and a port.
    Dnat(IpAddr, u16),
    Reset,
    /// Continue in a regular chain (back here after its last rule).
    Jump(&'static str),
}

/// One rule of one chain.
#[derive(Debug, Clone)]
struct Rule {
    chain: &'static str,
    matches: Vec<M>,
    verdict: Verdict,
}

impl Rule {
    fn text(&self) -> String {
        let mut s: Vec<String> = self.matches.iter().map(M::text).collect();
        s.push(match self.verdict {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
            Verdict::Redirect(p) => format!("redirect to :{p}"),
            Verdict::Dnat(IpAddr::V4(a), p) => format!("dnat ip to {a}:{p}"),
            Verdict::Dnat(IpAddr::V6(a), p) => format!("dnat ip6 to [{a}]:{p}"),
            Verdict::Reset => "reject with tcp reset".into(),
            Verdict::Jump(c) => format!("jump {c}"),
        });
        s.join(" ")
    }

    fn json(&self) -> Value {
        let mut expr: Vec<Value> = self.matches.iter().flat_map(M::json).collect();
        expr.push(match self.verdict {
            Verdict::Accept => json!({"accept": null}),
            Verdict::Drop => json!({"drop": null}),
            Verdict::Redirect(p) => json!({"redirect": {"port": p}}),
            Verdict::Dnat(a, p) => {
                json!({"dnat": {"family": Fam::of(a).ip(), "addr": a.to_string(), "port": p}})
            }
            Verdict::Reset => json!({"reject": {"type": "tcp reset"}}),
            Verdict::Jump(c) => json!({"jump": {"target": c}}),
        });
        let family = table_of(self.chain).family();
        json!({"add": {"rule": {"family": family, "table": TABLE, "chain": self.chain, "expr": expr}}})
    }
}

/// IPv6 neighbour discovery from the unspecified or a link-local address to a link-local or
/// link-scope multicast one: stays on the link, passes anti-spoofing.
fn link_local_nd() -> Vec<M> {
    vec![
        M::SaddrNets(Fam::V6, vec!["::", "fe80::/10"]),
        M::DaddrNets(Fam::V6, vec!["fe80::/10", "ff02::/16"]),
        M::L4(vec!["ipv6-icmp"]),
    ]
}

/// A base chain's type, hook and priority.
type Hook = (&'static str, &'static str, i32);

/// The chains: name, table and, for a base chain, its hook (the others are regular chains that
/// `guard` or `port_guard` jump to). Names are unique across both tables.
const CHAINS: &[(&str, Table, Option<Hook>)] = &[
    ("guard", Table::Inet, Some(("filter", "prerouting", -150))),
    ("antispoof", Table::Inet, None),
    ("selected_v4", Table::Inet, None),
    ("selected_v6", Table::Inet, None),
    ("steer", Table::Inet, Some(("nat", "prerouting", -100))),
    ("relay_in", Table::Inet, Some(("filter", "input", 0))),
    ("gateway_fwd", Table::Inet, Some(("filter", "forward", 0))),
    // Before anything else of the bridge sees the frame (bridge filter priority), br_netfilter
    // included.
    ("port_guard", Table::Bridge, Some(("filter", "prerouting", -200))),
    ("port_antispoof", Table::Bridge, None),
];

/// The table of a chain of [`CHAINS`].
fn table_of(chain: &str) -> Table {
    CHAINS.iter().find(|(name, ..)| *name == chain).map_or(Table::Inet, |(_, t, _)| *t)
}

/// One named set: its table, name (unique across both tables), element type (one type, or a
/// concatenation), interval, elements.
struct Set {
    table: Table,
    name: String,
    ty: Vec<&'static str>,
    interval: bool,
    elems: Vec<Value>,
    /// Changes with Pods and endpoints (refilled in place), or only with the configuration.
    dynamic: bool,
}

impl Desired {
    fn rules(&self) -> Vec<Rule> {
        use Fam::*;
        let mut r = Vec::new();
        let mut add = |chain, matches: Vec<M>, verdict| r.push(Rule { chain, matches, verdict });
        // The guard sees every packet that enters the node, most of them from Pods it does not
        // concern: one set lookup sends a packet to the rules that concern it, instead of every
        // rule testing it again (the relay's own traffic crosses it too).
        add("guard", vec![M::Iif("selected_ifaces".into())], Verdict::Jump("antispoof"));
        for f in [V4, V6] {
            let s = f.suffix();
            add("guard", vec![M::Saddr(f, format!("selected_{s}"), false)], Verdict::Jump(f.guard_chain()));
        }
        // Anti-spoofing on the selected Pods' interfaces.
        add("antispoof", link_local_nd(), Verdict::Accept);
        for f in [V4, V6] {
            add("antispoof", vec![M::IifSaddr(f, format!("pod_addrs_{}", f.suffix()), true)], Verdict::Drop);
        }
        // The same on bridge ports, as frames enter the bridge (the `bridge` table): a selected
        // Pod's port carries only IP from its own addresses, link-local neighbour discovery, and
        // ARP that claims only its own address (or none: a probe). Anything else is dropped:
        // another source address, ARP for another, VLAN-tagged or any other kind of frame.
        add("port_guard", vec![M::Iif("selected_ports".into())], Verdict::Jump("port_antispoof"));
        // From any port, selected or not: the address of a Pod whose port is known comes only
        // from that port, so that no neighbour takes a Pod's address (to be steered, decided and
        // audited as that Pod) in IP or in ARP. Other addresses of unselected Pods are theirs to
        // use: nothing else changes for them.
        for f in [V4, V6] {
            let s = f.suffix();
            add(
                "port_guard",
                vec![M::Saddr(f, format!("port_known_{s}"), false), M::IifSaddr(f, format!("port_addrs_{s}"), true)],
                Verdict::Drop,
            );
        }
        add(
            "port_guard",
            vec![M::ArpIpv4, M::ArpSaddr("port_known_v4".into()), M::IifArpSaddr("port_addrs_v4".into(), true)],
            Verdict::Drop,
        );
        for f in [V4, V6] {
            add("port_antispoof", vec![M::IifSaddr(f, format!("port_addrs_{}", f.suffix()), false)], Verdict::Accept);
        }
        add("port_antispoof", link_local_nd(), Verdict::Accept);
        add("port_antispoof", vec![M::ArpIpv4, M::ArpSaddrIs("0.0.0.0")], Verdict::Accept);
        add("port_antispoof", vec![M::ArpIpv4, M::IifArpSaddr("port_addrs_v4".into(), false)], Verdict::Accept);
        add("port_antispoof", vec![], Verdict::Drop);
        // What a selected Pod's packets may do (its source address is in `selected_*`).
        for f in [V4, V6] {
            let (c, s) = (f.guard_chain(), f.suffix());
            add(c, vec![M::Daddr(f, format!("metadata_{s}"), false)], Verdict::Drop);
            add(c, vec![M::Daddr(f, format!("excluded_{s}"), false)], Verdict::Accept);
            add(c, vec![M::CtState(vec!["invalid"])], Verdict::Drop);
            add(c, vec![M::CtReply], Verdict::Accept);
            add(
                c,
                vec![M::Daddr(f, format!("dns_{s}"), false), M::L4(vec!["tcp", "udp"]), M::Dport(53)],
                Verdict::Accept,
            );
            add(c, vec![M::L4(vec!["tcp"]), M::CtState(vec!["new"])], Verdict::Accept);
            add(c, vec![M::L4(vec!["tcp"]), M::CtDnat], Verdict::Accept);
            add(c, vec![M::CtState(vec!["related"]), M::L4(vec![f.icmp()])], Verdict::Accept);
            if f == V6 {
                // Neighbour discovery from the Pod's global address (to its router).
                add(
                    c,
                    vec![M::Icmp6Type(vec!["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit"])],
                    Verdict::Accept,
                );
            }
            add(c, vec![], Verdict::Drop);
        }
        // DNS to the cluster resolvers goes through the forwarder (`dns.enabled`), one port per
        // resolver so that it knows which one each query was addressed to.
        for &(ip, port) in &self.dns_forward {
            let f = Fam::of(ip);
            add(
                "steer",
                vec![
                    M::Saddr(f, format!("selected_{}", f.suffix()), false),
                    M::DaddrIs(ip),
                    M::L4(vec!["tcp", "udp"]),
                    M::Dport(53),
                ],
                self.node.relay_to.verdict(f, port),
            );
        }
        for f in [V4, V6] {
            let s = f.suffix();
            let sel = || M::Saddr(f, format!("selected_{s}"), false);
            add(
                "steer",
                vec![sel(), M::Daddr(f, format!("dns_{s}"), false), M::L4(vec!["tcp"]), M::Dport(53)],
                Verdict::Accept,
            );
            add(
                "steer",
                vec![sel(), M::Daddr(f, format!("excluded_{s}"), true), M::L4(vec!["tcp"])],
                self.node.relay_to.verdict(f, self.relay_port),
            );
        }
        add("relay_in", vec![M::TcpDport(self.relay_port), M::CtDnat], Verdict::Accept);
        add("relay_in", vec![M::TcpDport(self.relay_port)], Verdict::Reset);
        for f in [V4, V6] {
            let s = f.suffix();
            add(
                "gateway_fwd",
                vec![M::Saddr(f, format!("pods_{s}"), false), M::DaddrDport(f, format!("gateways_{s}"))],
                Verdict::Drop,
            );
        }
        r.retain(|rule| self.tables().contains(&table_of(rule.chain)));
        r
    }

    /// The tables of this state: both, or only `inet` where the kernel has no `bridge` family.
    fn tables(&self) -> &'static [Table] {
        if self.node.bridge { &Table::ALL } else { &[Table::Inet] }
    }

    fn sets(&self) -> Vec<Set> {
        let addr = |a: &IpAddr| json!(a.to_string());
        let net = |n: &IpNet| json!({"prefix": {"addr": n.addr().to_string(), "len": n.prefix_len()}});
        let metadata: Vec<IpNet> = METADATA.iter().filter_map(|s| s.parse().ok()).collect();
        let ifaces = || self.selected_ifaces.iter().map(|i| json!(i)).collect();
        let mut out = vec![
            Set {
                table: Table::Inet,
                name: "selected_ifaces".into(),
                ty: vec!["ifname"],
                interval: false,
                elems: ifaces(),
                dynamic: true,
            },
            Set {
                table: Table::Bridge,
                name: "selected_ports".into(),
                ty: vec!["ifname"],
                interval: false,
                elems: ifaces(),
                dynamic: true,
            },
        ];
        for f in [Fam::V4, Fam::V6] {
            let s = f.suffix();
            let t = f.addr_type();
            let of = |a: &IpAddr| Fam::of(*a) == f;
            let mk = |name: &str, ty: Vec<&'static str>, interval, elems: Vec<Value>, dynamic| Set {
                table: Table::Inet,
                name: format!("{name}_{s}"),
                ty,
                interval,
                elems,
                dynamic,
            };
            out.push(mk("selected", vec![t], false, self.selected.iter().filter(|a| of(a)).map(addr).collect(), true));
            let pod_addrs = || -> Vec<Value> {
                self.pod_addrs
                    .iter()
                    .filter(|(_, a)| of(a))
                    .map(|(i, a)| json!({"concat": [i, a.to_string()]}))
                    .collect()
            };
            out.push(mk("pod_addrs", vec!["ifname", t], false, pod_addrs(), true));
            out.push(Set { table: Table::Bridge, ..mk("port_addrs", vec!["ifname", t], false, pod_addrs(), true) });
            let known: BTreeSet<&IpAddr> = self.pod_addrs.iter().map(|(_, a)| a).filter(|a| of(a)).collect();
            let known = known.into_iter().map(addr).collect();
            out.push(Set { table: Table::Bridge, ..mk("port_known", vec![t], false, known, true) });
            out.push(mk("pods", vec![t], false, self.pods.iter().filter(|a| of(a)).map(addr).collect(), true));
            out.push(mk(
                "gateways",
                vec![t, "inet_service"],
                false,
                self.gateways
                    .iter()
                    .filter(|g| of(&g.ip()))
                    .map(|g| json!({"concat": [g.ip().to_string(), g.port()]}))
                    .collect(),
                true,
            ));
            let nets = |v: &mut dyn Iterator<Item = &IpNet>| -> Vec<Value> {
                v.filter(|n| Fam::of(n.addr()) == f).map(net).collect()
            };
            out.push(mk("excluded", vec![t], true, nets(&mut self.excluded.iter()), false));
            out.push(mk("dns", vec![t], false, self.dns.iter().filter(|a| of(a)).map(addr).collect(), false));
            out.push(mk("metadata", vec![t], true, nets(&mut metadata.iter()), false));
        }
        out.retain(|set| self.tables().contains(&set.table));
        out
    }

    /// A fingerprint of everything but the dynamic sets' elements: a table with the same shape
    /// can be brought up to date by refilling those sets, without replacing it.
    pub fn shape(&self) -> String {
        let mut s = String::new();
        for set in self.sets().iter().filter(|s| !s.dynamic) {
            let _ = write!(s, "{}={};", set.name, Value::Array(set.elems.clone()));
        }
        for r in self.rules() {
            let _ = write!(s, "{}:{};", r.chain, r.text());
        }
        let h = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
        h.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn marker(&self) -> String {
        format!("{SHAPE_MARK}{}", self.shape())
    }

    /// nft syntax.
    pub fn render(&self) -> String {
        let (sets, rules) = (self.sets(), self.rules());
        let mut out = String::new();
        for &table in self.tables() {
            let _ = writeln!(out, "table {} {TABLE} {{", table.family());
            for set in sets.iter().filter(|s| s.table == table) {
                let elems: Vec<String> = set.elems.iter().map(canonical).collect();
                let _ = writeln!(
                    out,
                    "\tset {} {{ type {};{}{} }}",
                    set.name,
                    set.ty.join(" . "),
                    if set.interval { " flags interval;" } else { "" },
                    if elems.is_empty() { String::new() } else { format!(" elements = {{ {} }};", elems.join(", ")) }
                );
            }
            for (name, _, base) in CHAINS.iter().filter(|(_, t, _)| *t == table) {
                let _ = writeln!(out, "\tchain {name} {{");
                if let Some((ty, hook, prio)) = base {
                    let _ = writeln!(out, "\t\ttype {ty} hook {hook} priority {prio}; policy accept;");
                }
                for (i, r) in rules.iter().filter(|r| r.chain == *name).enumerate() {
                    let comment = if *name == "guard" && i == 0 {
                        format!(" comment \"{}\"", self.marker())
                    } else {
                        String::new()
                    };
                    let _ = writeln!(out, "\t\t{}{comment}", r.text());
                }
                out.push_str("\t}\n");
            }
            out.push_str("}\n");
        }
        out
    }

    fn set_json(set: &Set) -> Value {
        let ty = if set.ty.len() == 1 { json!(set.ty[0]) } else { json!(set.ty) };
        let mut s = json!({"family": set.table.family(), "table": TABLE, "name": set.name, "type": ty});
        if set.interval {
            s["flags"] = json!(["interval"]);
        }
        if !set.elems.is_empty() {
            s["elem"] = json!(set.elems);
        }
        s
    }

    /// libnftables JSON for one transaction that replaces both tables whole.
    pub fn json(&self) -> Value {
        let mut cmds = Vec::new();
        for table in self.tables() {
            let t = json!({"family": table.family(), "name": TABLE});
            cmds.extend([json!({"add": {"table": t}}), json!({"delete": {"table": t}}), json!({"add": {"table": t}})]);
        }
        for set in self.sets() {
            cmds.push(json!({"add": {"set": Desired::set_json(&set)}}));
        }
        // Every chain before any rule: a jump needs its target.
        for (name, table, base) in CHAINS.iter().filter(|(_, t, _)| self.tables().contains(t)) {
            let mut chain = json!({"family": table.family(), "table": TABLE, "name": name});
            if let Some((ty, hook, prio)) = base {
                chain = json!({"family": table.family(), "table": TABLE, "name": name, "type": ty, "hook": hook, "prio": prio, "policy": "accept"});
            }
            cmds.push(json!({"add": {"chain": chain}}));
        }
        let mut first = true;
        for r in self.rules() {
            let mut j = r.json();
            if first && r.chain == "guard" {
                j["add"]["rule"]["comment"] = json!(self.marker());
                first = false;
            }
            cmds.push(j);
        }
        json!({"nftables": cmds})
    }

    /// When the table's shape is the same as `current`'s, the element changes that turn it into
    /// `self` (one transaction, the table and its rules untouched); `None` when it must be
    /// replaced whole.
    pub fn delta_from(&self, current: &Desired) -> Option<Value> {
        if self.shape() != current.shape() {
            return None;
        }
        let (old, new) = (current.sets(), self.sets());
        let mut cmds = Vec::new();
        for (o, n) in old.iter().zip(&new).filter(|(o, _)| o.dynamic) {
            let key = |v: &Value| canonical(v);
            let had: BTreeMap<String, &Value> = o.elems.iter().map(|e| (key(e), e)).collect();
            let has: BTreeMap<String, &Value> = n.elems.iter().map(|e| (key(e), e)).collect();
            for (verb, from, to) in [("add", &had, &has), ("delete", &has, &had)] {
                let changed: Vec<&Value> = to.iter().filter(|(k, _)| !from.contains_key(*k)).map(|(_, v)| *v).collect();
                if !changed.is_empty() {
                    let family = n.table.family();
                    cmds.push(
                        json!({verb: {"element": {"family": family, "table": TABLE, "name": n.name, "elem": changed}}}),
                    );
                }
            }
        }
        Some(json!({"nftables": cmds}))
    }

    /// One transaction that refills every dynamic set of an existing table of the same shape
    /// (adopting the table a previous instance left, without replacing it).
    pub fn refill_json(&self) -> Value {
        let mut cmds = Vec::new();
        for set in self.sets().iter().filter(|s| s.dynamic) {
            let mut bare = Desired::set_json(set);
            bare.as_object_mut().map(|o| o.remove("elem"));
            cmds.push(json!({"flush": {"set": bare}}));
            if !set.elems.is_empty() {
                let family = set.table.family();
                cmds.push(json!({"add": {"element": {"family": family, "table": TABLE, "name": set.name, "elem": set.elems}}}));
            }
        }
        json!({"nftables": cmds})
    }

    /// Every set's elements as canonical strings (see [`canonical`]), by set name: compared with
    /// what the kernel lists to tell drift.
    pub fn elements(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.sets().iter().map(|s| (s.name.clone(), s.elems.iter().map(canonical).collect())).collect()
    }

    /// Selected addresses steered by their address with no anti-spoofing: their host-side
    /// interface is unknown (see [`Desired::pod_addrs`]), or it is a bridge port
    /// (`is_bridge_port`) and there is no `bridge` table.
    pub fn unguarded(&self, is_bridge_port: impl Fn(&str) -> bool) -> BTreeSet<IpAddr> {
        let guarded: BTreeSet<IpAddr> =
            self.pod_addrs.iter().filter(|(i, _)| self.node.bridge || !is_bridge_port(i)).map(|(_, a)| *a).collect();
        self.selected.difference(&guarded).copied().collect()
    }

    /// The number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules().len()
    }
}

/// Comment on the table's first rule: the shape fingerprint of the table in the kernel.
pub const SHAPE_MARK: &str = "egress-redirector shape ";

/// One set element in a canonical text form, from our JSON or from `nft -j list`: addresses and
/// names as they are, concatenations joined with ` . `, prefixes as `addr/len` (a full-length
/// prefix as the bare address, as nft lists it).
pub fn canonical(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            if let Some(c) = o.get("concat").and_then(Value::as_array) {
                return c.iter().map(canonical).collect::<Vec<_>>().join(" . ");
            }
            if let Some(p) = o.get("prefix") {
                let addr = p["addr"].as_str().unwrap_or_default();
                let len = p["len"].as_u64().unwrap_or(0);
                let full = if addr.contains(':') { 128 } else { 32 };
                return if len == full { addr.to_string() } else { format!("{addr}/{len}") };
            }
            if let Some(e) = o.get("elem") {
                return canonical(&e["val"]);
            }
            v.to_string()
        }
        _ => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Desired {
        Desired {
            selected: ["192.0.2.10".parse().unwrap()].into(),
            selected_ifaces: ["veth1".to_string()].into(),
            pod_addrs: [("veth1".to_string(), "192.0.2.10".parse().unwrap())].into(),
            pods: ["192.0.2.10".parse().unwrap()].into(),
            gateways: ["198.51.100.2:15080".parse().unwrap()].into(),
            excluded: ["10.0.0.0/8".parse().unwrap()].into(),
            dns: ["10.96.0.10".parse().unwrap()].into(),
            dns_forward: vec![("10.96.0.10".parse().unwrap(), 15053)],
            relay_port: 15001,
            node: Node { relay_to: RelayTo::default(), bridge: true },
        }
    }

    #[test]
    fn selects_a_pod_by_its_service_account_when_the_policy_names_one() {
        let policy: AnyPolicy = AnyPolicy::from_value(json!({
            "apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"podSelector": {}, "redirect": "Transparent", "serviceAccountSelector": {"names": ["api"]}}
        }))
        .unwrap();
        let inputs = Inputs {
            node_name: "n".into(),
            pods: vec![],
            namespaces: BTreeMap::new(),
            policies: vec![policy],
            gateways: vec![],
            interfaces: BTreeMap::new(),
            changed_at: None,
        };
        let pod = |sa: Option<&str>| PodEntry {
            namespace: "shop".into(),
            name: "a".into(),
            node_name: "n".into(),
            ips: vec![],
            labels: BTreeMap::new(),
            service_account: sa.map(str::to_string),
            interface: None,
            uid: String::new(),
        };
        assert!(is_selected(&inputs, &pod(Some("api"))));
        assert!(!is_selected(&inputs, &pod(Some("default"))));
        assert!(!is_selected(&inputs, &pod(None)), "an unknown ServiceAccount matches no name");
    }

    #[test]
    fn renders_every_rule_in_both_forms() {
        let d = d();
        let text = d.render();
        let json = d.json();
        let rules: Vec<&Value> =
            json["nftables"].as_array().unwrap().iter().filter(|c| c["add"].get("rule").is_some()).collect();
        assert_eq!(rules.len(), d.rule_count());
        let lines = text.lines().filter(|l| l.starts_with("\t\t") && !l.starts_with("\t\ttype ")).count();
        assert_eq!(lines, d.rule_count());
        assert!(text.contains("iifname . ip saddr != @pod_addrs_v4 drop"), "{text}");
        // One lookup sends a selected Pod's packet to its chain, which ends in a drop.
        assert!(text.contains("\t\tip saddr @selected_v4 jump selected_v4\n"), "{text}");
        assert!(text.contains("\t\tiifname @selected_ifaces jump antispoof"), "{text}");
        let v4 = text.split("\tchain selected_v4 {\n").nth(1).and_then(|c| c.split("\t}").next()).unwrap();
        assert!(v4.starts_with("\t\tip daddr @metadata_v4 drop\n") && v4.ends_with("\t\tdrop\n"), "{v4}");
        assert!(text.contains("tcp dport 15001 ct status dnat accept"), "{text}");
        assert!(text.contains("ip saddr @pods_v4 ip daddr . tcp dport @gateways_v4 drop"), "{text}");
        assert!(text.contains("elements = { veth1 . 192.0.2.10 }"), "{text}");
        assert!(text.contains(&format!("comment \"{SHAPE_MARK}{}\"", d.shape())), "{text}");
        // The JSON fits the nftables crate's schema.
        serde_json::from_value::<nftables::schema::Nftables>(json).unwrap();
    }

    #[test]
    fn bridge_ports_of_selected_pods_carry_only_their_pods_addresses() {
        let d = d();
        let text = d.render();
        let bridge = text.split("table bridge egress_redirector {\n").nth(1).expect("a bridge table");
        assert!(bridge.contains("set selected_ports { type ifname; elements = { veth1 }; }"), "{bridge}");
        assert!(bridge.contains("set port_addrs_v4 { type ifname . ipv4_addr; elements = { veth1 . 192.0.2.10 }; }"));
        let guard = bridge.split("\tchain port_guard {\n").nth(1).and_then(|c| c.split("\t}").next()).unwrap();
        assert_eq!(
            guard.lines().map(str::trim).collect::<Vec<_>>(),
            [
                "type filter hook prerouting priority -200; policy accept;",
                "iifname @selected_ports jump port_antispoof",
                // Any port: a known Pod's address only from its own port.
                "ip saddr @port_known_v4 iifname . ip saddr != @port_addrs_v4 drop",
                "ip6 saddr @port_known_v6 iifname . ip6 saddr != @port_addrs_v6 drop",
                "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ip @port_known_v4 iifname . arp saddr ip != @port_addrs_v4 drop",
            ]
        );
        assert!(bridge.contains("set port_known_v4 { type ipv4_addr; elements = { 192.0.2.10 }; }"), "{bridge}");
        let chain = bridge.split("\tchain port_antispoof {\n").nth(1).and_then(|c| c.split("\t}").next()).unwrap();
        assert_eq!(
            chain.lines().map(str::trim).collect::<Vec<_>>(),
            [
                "iifname . ip saddr @port_addrs_v4 accept",
                "iifname . ip6 saddr @port_addrs_v6 accept",
                "ip6 saddr { ::, fe80::/10 } ip6 daddr { fe80::/10, ff02::/16 } meta l4proto ipv6-icmp accept",
                "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ip 0.0.0.0 accept",
                "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . arp saddr ip @port_addrs_v4 accept",
                "drop",
            ]
        );
        // The JSON: both tables replaced in one transaction, the bridge's rules in the bridge table.
        let json = d.json();
        let cmds = json["nftables"].as_array().unwrap();
        let tables: Vec<&Value> = cmds.iter().filter_map(|c| c["delete"].get("table")).collect();
        assert_eq!(tables, [&json!({"family": "inet", "name": TABLE}), &json!({"family": "bridge", "name": TABLE})]);
        let bridge_rules: Vec<&Value> =
            cmds.iter().filter_map(|c| c["add"].get("rule")).filter(|r| r["family"] == "bridge").collect();
        assert_eq!(bridge_rules.len(), 10);
        assert!(bridge_rules.iter().all(|r| r["chain"].as_str().unwrap().starts_with("port_")), "{bridge_rules:?}");
        let arp = bridge_rules[8]["expr"].as_array().unwrap();
        assert_eq!(arp.len(), 6, "four ARP header checks, the sender address, the verdict: {arp:?}");
        assert_eq!(arp[4]["match"]["left"]["concat"][1], json!({"payload": {"protocol": "arp", "field": "saddr ip"}}));
        // A selected address whose interface is unknown is steered, without anti-spoofing.
        let no_port = |_: &str| false;
        assert!(d.unguarded(no_port).is_empty());
        let mut u = d.clone();
        u.selected.insert("192.0.2.12".parse().unwrap());
        assert_eq!(u.unguarded(no_port), ["192.0.2.12".parse().unwrap()].into());
        // Without the kernel's bridge family: no bridge table, and a selected Pod on a bridge port
        // is steered without anti-spoofing.
        let mut n = d.clone();
        n.node.bridge = false;
        assert!(!n.render().contains("table bridge") && !n.json().to_string().contains("\"bridge\""));
        assert_eq!(n.rule_count(), d.rule_count() - 10);
        assert!(n.unguarded(no_port).is_empty(), "a routed interface is checked in the inet table");
        assert_eq!(n.unguarded(|i| i == "veth1"), ["192.0.2.10".parse().unwrap()].into());
        assert!(d.unguarded(|i| i == "veth1").is_empty());
        // Element changes reach the bridge table's sets too.
        let mut e = d.clone();
        e.selected_ifaces.insert("veth2".into());
        let delta = e.delta_from(&d).unwrap().to_string();
        assert!(
            delta.contains(r#"{"add":{"element":{"elem":["veth2"],"family":"bridge","name":"selected_ports""#),
            "{delta}"
        );
        assert!(e.refill_json().to_string().contains(r#""family":"bridge","name":"port_addrs_v4""#));
        serde_json::from_value::<nftables::schema::Nftables>(json).unwrap();
    }

    #[test]
    fn steered_connections_are_dnated_to_the_node_address_of_their_family_else_redirected() {
        let mut d = d();
        d.dns_forward.push(("fd00::a".parse().unwrap(), 15054));
        let text = d.render();
        assert!(text.contains("tcp redirect to :15001") && text.contains("redirect to :15053"), "{text}");
        d.node.relay_to = RelayTo { v4: Some("10.0.0.5".parse().unwrap()), v6: None };
        let text = d.render();
        assert!(text.contains("ip daddr != @excluded_v4 meta l4proto tcp dnat ip to 10.0.0.5:15001"), "{text}");
        assert!(text.contains("dport 53 dnat ip to 10.0.0.5:15053"), "{text}");
        assert!(text.contains("ip6 daddr != @excluded_v6 meta l4proto tcp redirect to :15001"), "{text}");
        assert!(text.contains("dport 53 redirect to :15054"), "{text}");
        d.node.relay_to.v6 = Some("2001:db8::5".parse().unwrap());
        let text = d.render();
        assert!(text.contains("dnat ip6 to [2001:db8::5]:15001") && text.contains("dnat ip6 to [2001:db8::5]:15054"));
        assert!(!text.contains("redirect to"), "{text}");
        let json = d.json();
        let dnat: Vec<&Value> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"]["rule"]["expr"].as_array()?.last().filter(|e| e.get("dnat").is_some()))
            .collect();
        assert_eq!(dnat.len(), 4, "{dnat:?}");
        assert!(dnat.contains(&&json!({"dnat": {"family": "ip", "addr": "10.0.0.5", "port": 15001}})), "{dnat:?}");
        assert!(dnat.contains(&&json!({"dnat": {"family": "ip6", "addr": "2001:db8::5", "port": 15054}})), "{dnat:?}");
        serde_json::from_value::<nftables::schema::Nftables>(json).unwrap();
    }

    #[test]
    fn pod_changes_keep_the_shape_and_config_changes_do_not() {
        let a = d();
        let mut b = a.clone();
        b.selected.insert("192.0.2.11".parse().unwrap());
        b.pod_addrs.insert(("veth2".into(), "192.0.2.11".parse().unwrap()));
        b.gateways.clear();
        assert_eq!(a.shape(), b.shape());
        let delta = b.delta_from(&a).unwrap();
        let text = delta.to_string();
        assert!(
            text.contains(r#""add":{"element""#) && text.contains("192.0.2.11") && text.contains("veth2"),
            "{text}"
        );
        assert!(text.contains(r#""delete":{"element""#) && text.contains("15080"), "{text}");
        serde_json::from_value::<nftables::schema::Nftables>(delta).unwrap();
        serde_json::from_value::<nftables::schema::Nftables>(b.refill_json()).unwrap();
        let mut c = a.clone();
        c.relay_port = 15002;
        assert!(c.delta_from(&a).is_none());
        let mut c = a.clone();
        c.excluded.insert("172.16.0.0/12".parse().unwrap());
        assert!(c.delta_from(&a).is_none());
    }

    #[test]
    fn canonical_forms_match_what_nft_lists() {
        assert_eq!(canonical(&json!({"prefix": {"addr": "10.0.0.0", "len": 8}})), "10.0.0.0/8");
        assert_eq!(canonical(&json!({"prefix": {"addr": "169.254.169.254", "len": 32}})), "169.254.169.254");
        assert_eq!(canonical(&json!({"concat": ["198.51.100.2", 15080]})), "198.51.100.2 . 15080");
        assert_eq!(canonical(&json!({"elem": {"val": "a", "comment": "x"}})), "a");
    }
}
