//! The node-redirector with real kernel nftables, in network namespaces this test creates:
//!
//! ```text
//!  pod  (192.0.2.10, selected) --\
//!  pod2 (192.0.2.11, not)     ---- node (nftables + relay) -- gw (gateway, 198.51.100.2)
//!                                                  \-- inet (upstream + DNS, 203.0.113.10)
//! ```
//! Each Pod has its own veth, as point-to-point CNIs build it ([`world`]); [`bridge_world`] puts
//! both behind one bridge instead, as bridge CNIs do. All addresses are documentation ranges that
//! exist only inside these namespaces.

#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egress_e2e::*;

/// The namespaces of one test, and the node-side interface of each Pod.
struct World {
    /// The selected Pod web-1: 192.0.2.10 (and 2001:db8:2::10 where a test adds IPv6).
    pod: Netns,
    /// An unselected Pod db-1: 192.0.2.11.
    pod2: Netns,
    node: Netns,
    gw_ns: Netns,
    inet: Netns,
    /// Node-side interfaces of `pod` and `pod2`.
    pod_if: String,
    pod2_if: String,
    /// The Pods' own interface names.
    pod_inner_if: String,
    pod2_inner_if: String,
}

/// A node as point-to-point CNIs build one: each Pod has its own veth and a `/32` address, and the
/// node a host route to each Pod. The node's end of `pod`'s veth carries the address `pod` routes
/// through (as kindnet and the CNI ptp plugin do); the node's end of `pod2`'s carries none, and
/// `pod2` routes through 169.254.1.1, which the node answers for (as Calico, Cilium and the AWS VPC
/// CNI do): `redirect` would drop what arrives there, so steering must DNAT to a node address.
fn world() -> World {
    let t = unique_tag();
    let w = World::namespaces("r", &t);
    // The node answers ARP for an address it holds on any interface (arp_ignore 0).
    w.node.exec_ok("ip", &["addr", "add", "169.254.1.1/32", "dev", "lo"]);
    for (pod, inner, outer, ip, via, node_end) in [
        (&w.pod, &w.pod_inner_if, &w.pod_if, "192.0.2.10", "192.0.2.1", Some("192.0.2.1/32")),
        (&w.pod2, &w.pod2_inner_if, &w.pod2_if, "192.0.2.11", "169.254.1.1", None),
    ] {
        Netns::link(pod, inner, &[&format!("{ip}/32")], &w.node, outer, node_end.as_slice());
        pod.exec_ok("ip", &["route", "add", via, "dev", inner]);
        pod.exec_ok("ip", &["route", "add", "default", "via", via]);
        w.node.exec_ok("ip", &["route", "add", &format!("{ip}/32"), "dev", outer]);
    }
    w.outside(&t);
    w
}

/// A node as bridge CNIs build one (flannel, kubenet, the CNI bridge plugin): every Pod's veth is
/// a port of one bridge, which holds the Pods' gateway address 192.0.2.1/24, and the node reaches
/// the Pods through the bridge's subnet route (no host route names a Pod's interface). Returns the
/// world and the bridge's name.
fn bridge_world() -> (World, String) {
    let t = unique_tag();
    let w = World::namespaces("rb", &t);
    let bridge = format!("rbr{t}");
    w.node.exec_ok("ip", &["link", "add", &bridge, "type", "bridge"]);
    w.node.exec_ok("ip", &["addr", "add", "192.0.2.1/24", "dev", &bridge]);
    w.node.exec_ok("ip", &["link", "set", &bridge, "up"]);
    for (pod, inner, outer, ip) in
        [(&w.pod, &w.pod_inner_if, &w.pod_if, "192.0.2.10"), (&w.pod2, &w.pod2_inner_if, &w.pod2_if, "192.0.2.11")]
    {
        Netns::link(pod, inner, &[&format!("{ip}/24")], &w.node, outer, &[]);
        w.node.exec_ok("ip", &["link", "set", outer, "master", &bridge]);
        pod.exec_ok("ip", &["route", "add", "default", "via", "192.0.2.1"]);
    }
    w.outside(&t);
    (w, bridge)
}

impl World {
    /// The namespaces (names starting with `prefix`), not linked yet, and the Pods' interface
    /// names (tagged `t`).
    fn namespaces(prefix: &str, t: &str) -> World {
        World {
            pod: Netns::new(&format!("{prefix}pod")),
            pod2: Netns::new(&format!("{prefix}pod2")),
            node: Netns::new(&format!("{prefix}node")),
            gw_ns: Netns::new(&format!("{prefix}gw")),
            inet: Netns::new(&format!("{prefix}inet")),
            pod_if: format!("rna{t}"),
            pod2_if: format!("rnb{t}"),
            pod_inner_if: format!("rpa{t}"),
            pod2_inner_if: format!("rpb{t}"),
        }
    }

    /// Links the node to the gateway's namespace (198.51.100.0/24) and to the "internet"
    /// (203.0.113.0/24), and makes it route.
    fn outside(&self, t: &str) {
        Netns::link(
            &self.gw_ns,
            &format!("rg{t}"),
            &["198.51.100.2/24"],
            &self.node,
            &format!("rng{t}"),
            &["198.51.100.1/24"],
        );
        Netns::link(
            &self.inet,
            &format!("ri{t}"),
            &["203.0.113.10/24"],
            &self.node,
            &format!("rni{t}"),
            &["203.0.113.1/24"],
        );
        self.gw_ns.exec_ok("ip", &["route", "add", "default", "via", "198.51.100.1"]);
        self.inet.exec_ok("ip", &["route", "add", "192.0.2.0/24", "via", "203.0.113.1"]);
        self.inet.exec_ok("ip", &["route", "add", "198.51.100.0/24", "via", "203.0.113.1"]);
        self.node.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    }

    /// The MAC address of interface `ifname` in `ns`.
    fn mac(ns: &Netns, ifname: &str) -> String {
        let out = ns.command("cat").arg(format!("/sys/class/net/{ifname}/address")).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The namespace of the Pod with address `ip`.
    fn pod_of(&self, ip: &str) -> &Netns {
        if ip == "192.0.2.11" { &self.pod2 } else { &self.pod }
    }
}

/// The redirector's standalone config: `body` plus the relay key (and the shared lines).
fn redirector_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let cfg = dir.join("redirector.yaml");
    let body = body.replace("$RELAY_KEY", &relay_key_file().display().to_string());
    std::fs::write(&cfg, body).unwrap();
    cfg
}

/// The gateway's relay key lines for a transparent config.
const TRUSTED: &str = "transparent: {trustedRelays: [198.51.100.1/32], relayKeyFile: $RELAY_KEY}";

/// Starts `node-redirector run` inside `node` with `config` (and extra arguments).
fn spawn_redirector(
    node: &Netns,
    config: &std::path::Path,
    extra: &[&str],
    stderr: impl Into<Stdio>,
) -> std::process::Child {
    node.command(workspace_bin("node-redirector"))
        .arg("run")
        .args(extra)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// The kernel's handle of the table: it changes only when the table is replaced.
fn table_handle(node: &Netns) -> String {
    let out = node.command("nft").args(["-a", "list", "table", "inet", "egress_redirector"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines().next().and_then(|l| l.split("# handle ").nth(1)).expect("table handle").trim().to_string()
}

/// The selected IPv4 Pod addresses as the kernel has them.
fn selected_set(node: &Netns) -> String {
    let out = node.command("nft").args(["list", "set", "inet", "egress_redirector", "selected_v4"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn node_table(node: &Netns) -> Option<String> {
    let out = node.command("nft").args(["list", "table", "inet", "egress_redirector"]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// Sends one UDP datagram from the pod and reports what came back: Some(bytes), or None on
/// silence (dropped), or Err text (e.g. ICMP port unreachable -> connection refused).
fn udp_probe(pod: &Netns, src: &str, dst: &str, port: u16, payload_hex: &str) -> String {
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{src}',0))\ns.settimeout(1.5)\ns.connect(('{dst}',{port}))\ns.send(bytes.fromhex('{payload_hex}'))\ntry:\n  d=s.recv(4096); print('reply', len(d))\nexcept socket.timeout: print('silence')\nexcept ConnectionRefusedError: print('refused')\n"
    );
    let out = pod.command("python3").arg("-c").arg(script).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The standalone world of most tests: web-1 (192.0.2.10) selected, db-1 (192.0.2.11) not; the
/// gateway allows `allowed.test` on the upstream's port.
fn standalone(w: &World, extra_gateway: &str, extra_redirector: &str) -> (Dns, Upstream, Gateway, tempfile::TempDir) {
    standalone_with_dns(w, &[], extra_gateway, extra_redirector)
}

/// [`standalone`] with more records in the cluster DNS.
fn standalone_with_dns(
    w: &World,
    records: &[(&str, &str)],
    extra_gateway: &str,
    extra_redirector: &str,
) -> (Dns, Upstream, Gateway, tempfile::TempDir) {
    let mut all = vec![("allowed.test", "203.0.113.10"), ("denied.test", "203.0.113.10")];
    all.extend_from_slice(records);
    let dns = Dns::start_at(Some(&w.inet), "203.0.113.10:53".parse().unwrap(), &all);
    let up = Upstream::start_in(&w.inet, "203.0.113.10");
    let p = up.addr.port();
    let body = format!(
        r#"
{TRUSTED}
clients:
  - {{cidr: 192.0.2.10/32, namespace: shop, name: web-1, labels: {{app: web}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: web, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: web}}}}
      redirect: Transparent
      rules: [{{name: allowed, to: [{{domain: allowed.test}}], ports: [{{port: {p}}}]}}]
{extra_gateway}
"#
    );
    let gw = Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body);
    let dir = tempfile::tempdir().unwrap();
    redirector_config(
        dir.path(),
        &format!(
            r#"
nodeName: node-1
gateways: [198.51.100.2:{gp}]
relay: {{coalesce: 100ms, keyFile: $RELAY_KEY}}
admin: 127.0.0.1:9792
clusterDns: [203.0.113.10]
excludeCidrs: [192.0.2.0/24, 198.51.100.0/24]
pods:
  - {{namespace: shop, name: web-1, nodeName: node-1, ips: [192.0.2.10], labels: {{app: web}}}}
  - {{namespace: shop, name: db-1, nodeName: node-1, ips: [192.0.2.11], labels: {{app: db}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: web, namespace: shop}}
    spec: {{podSelector: {{matchLabels: {{app: web}}}}, redirect: Transparent, rules: []}}
{extra_redirector}
"#,
            gp = gw.transparent.port()
        ),
    );
    (dns, up, gw, dir)
}

/// Resolves `name` (A) from the Pod at 192.0.2.10 with the cluster resolver 203.0.113.10, over
/// UDP or TCP, as a stub resolver does; the answered addresses.
fn lookup_from_pod(pod: &Netns, name: &str, tcp: bool) -> Vec<String> {
    let script = format!(
        r#"
import socket, struct
name = "{name}"
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
if {tcp}:
    s = socket.create_connection(("203.0.113.10", 53), timeout=5, source_address=("192.0.2.10", 0))
    s.sendall(struct.pack(">H", len(q)) + q)
    n = struct.unpack(">H", s.recv(2, socket.MSG_WAITALL))[0]
    a = s.recv(n, socket.MSG_WAITALL)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("192.0.2.10", 0)); s.settimeout(5)
    s.sendto(q, ("203.0.113.10", 53))
    a = s.recv(65535)
def skip(i):
    while True:
        l = a[i]
        if l == 0: return i + 1
        if l >= 0xC0: return i + 2
        i += 1 + l
qd, an = struct.unpack(">HH", a[4:8])
i = 12
for _ in range(qd): i = skip(i) + 4
for _ in range(an):
    i = skip(i)
    t, c, ttl, rl = struct.unpack(">HHIH", a[i:i+10]); i += 10
    if t == 1: print(".".join(str(b) for b in a[i:i+4]))
    i += rl
"#,
        tcp = if tcp { "True" } else { "False" }
    );
    let out = pod.command("python3").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "lookup {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Opens a TCP connection from the Pod to `dst`, sends `first`, reads the answer; then, after
/// `pause`, sends `second` on the same connection and reads again (empty: nothing came back).
fn exchange_from_pod(pod: &Netns, dst: &str, first: &str, pause: f64, second: &str) -> (String, String) {
    let (ip, port) = dst.rsplit_once(':').unwrap();
    let script = format!(
        r#"
import socket, time
s = socket.create_connection(("{ip}", {port}), timeout=5, source_address=("192.0.2.10", 0))
def ask(data):
    if not data: return ""
    try:
        s.sendall(data.encode())
        return s.recv(65535).decode(errors="replace").splitlines()[0]
    except Exception as e:
        return ""
print(ask({first:?}))
time.sleep({pause})
print(ask({second:?}))
"#
    );
    let out = pod.command("python3").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "{dst}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines().map(str::to_string);
    (lines.next().unwrap_or_default(), lines.next().unwrap_or_default())
}

fn redirector_metric(node: &Netns, name: &str) -> Option<f64> {
    let admin: std::net::SocketAddr = "127.0.0.1:9792".parse().unwrap();
    let metrics = node.enter(move || admin_get(admin, "/metrics"))?.1;
    metrics.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().rsplit(' ').next()?.parse().ok())
}

#[test]
fn selected_pods_are_steered_through_the_gateway_with_real_nftables() {
    let w = world();
    let (_dns, up, gw, dir) = standalone(&w, "", "");
    let p = up.addr.port();
    let log = std::fs::File::create(dir.path().join("redirector.log")).unwrap();
    let child = spawn_redirector(&w.node, &dir.path().join("redirector.yaml"), &["--reconcile", "500ms"], log);
    let mut redirector = Proc(child);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    let t = node_table(&w.node).unwrap();
    assert!(t.contains(&format!("\"{}\" . 192.0.2.10", w.pod_if)), "interfaces from the host routes: {t}");

    // An allowed domain, plain curl with no proxy settings: the upstream sees the gateway.
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let r = curl_in(Some(&w.pod), &["--resolve", &resolve, &format!("http://allowed.test:{p}/x")]);
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.log_text());
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "198.51.100.2");
    let d = gw.events_at_least(1).into_iter().find(|e| e["event"] == "decision").unwrap();
    assert_eq!(d["front"], "transparent");
    assert_eq!(d["client"]["name"], "web-1");
    assert_eq!(d["transparent"]["original_dst"], format!("203.0.113.10:{p}"));
    assert_eq!(d["transparent"]["relay"].as_str().unwrap().split(':').next(), Some("198.51.100.1"));
    assert_eq!(d["transparent"]["original_in_resolved"], true);

    // A download arrives whole, and the node's relay batched its reads (`relay.coalesce`; the
    // longest hold, so that a busy machine still sees one back-to-back run).
    let out = dir.path().join("download.bin");
    let r = curl_in(
        Some(&w.pod),
        &["--resolve", &resolve, "-o", out.to_str().unwrap(), &format!("http://allowed.test:{p}/bytes/8000000")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(std::fs::read(&out).unwrap() == pattern(8_000_000), "the download arrived changed");
    let batched = redirector_metric(&w.node, "egress_redirector_relay_batched_total ");
    assert!(batched.is_some_and(|b| b >= 1.0), "{batched:?}");

    // A denied domain: refused by the gateway, audited.
    let resolve_denied = format!("denied.test:{p}:203.0.113.10");
    let r = curl_in(Some(&w.pod), &["--resolve", &resolve_denied, &format!("http://denied.test:{p}/")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("no_rule_matched"), "{r:?}");
    let d = gw.decision(|e| e["target"]["host"] == "denied.test");
    assert_eq!((d["front"].as_str(), d["decision"]["reason"].as_str()), (Some("transparent"), Some("no_rule_matched")));

    // An unselected Pod is not redirected: the upstream sees the Pod itself.
    let r = curl_in(Some(&w.pod2), &[&format!("http://203.0.113.10:{p}/")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "192.0.2.11");

    // UDP: DNS to the cluster resolver passes, anything else is dropped (silence, not even ICMP);
    // the unselected Pod's UDP is untouched (the closed port answers).
    let query = "12340100000100000000000007616c6c6f77656404746573740000010001";
    assert!(udp_probe(&w.pod, "192.0.2.10", "203.0.113.10", 53, query).starts_with("reply"));
    assert_eq!(udp_probe(&w.pod, "192.0.2.10", "203.0.113.10", 9999, "00"), "silence");
    assert_eq!(udp_probe(&w.pod2, "192.0.2.11", "203.0.113.10", 9999, "00"), "refused");

    // Metadata from a selected Pod is dropped on the node: a canary listener on the metadata
    // address sees nothing, and nothing reaches the gateway (the unselected Pod, which the node
    // does not police, reaches the canary: the probe works).
    w.inet.exec_ok("ip", &["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    w.node.exec_ok("ip", &["route", "add", "169.254.169.254/32", "via", "203.0.113.10"]);
    let canary = Upstream::start_in(&w.inet, "169.254.169.254");
    let cp = canary.addr.port();
    let r = curl_in(Some(&w.pod), &["--max-time", "2", &format!("http://169.254.169.254:{cp}/")]);
    assert_eq!(r.status, 0, "{r:?}");
    let r = curl_in(Some(&w.pod2), &["--max-time", "5", &format!("http://169.254.169.254:{cp}/")]);
    assert_eq!(r.status, 200, "the canary answers the unselected Pod: {r:?}");
    assert_eq!(canary.peers().iter().map(|p| p.ip().to_string()).collect::<Vec<_>>(), vec!["192.0.2.11"]);
    assert!(
        !gw.events()
            .iter()
            .any(|e| e["transparent"]["original_dst"].as_str().is_some_and(|d| d.starts_with("169.254."))),
        "dropped on the node, never relayed to the gateway"
    );

    // Someone deletes the table: it is repaired.
    w.node.exec_ok("nft", &["delete", "table", "inet", "egress_redirector"]);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    let r = curl_in(Some(&w.pod), &["--resolve", &resolve, &format!("http://allowed.test:{p}/")]);
    assert_eq!(r.status, 200, "after repair: {r:?}");
    assert_eq!(
        redirector_metric(&w.node, "egress_redirector_drift_repairs_total "),
        Some(1.0),
        "one repair, no false drift"
    );

    // db-1 becomes selected (the file is re-read): its node-side interface has no address, where
    // `redirect` drops every packet; DNAT to a node address steers it like web-1. The gateway
    // knows no client at its address: its default action refuses it, and the decision shows the
    // connection arrived through the relay.
    let cfg = dir.path().join("redirector.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let relabelled = text.replace("ips: [192.0.2.11], labels: {app: db}", "ips: [192.0.2.11], labels: {app: web}");
    assert_ne!(relabelled, text);
    std::fs::write(&cfg, relabelled).unwrap();
    wait_until(Duration::from_secs(10), || selected_set(&w.node).contains("192.0.2.11"));
    let r = curl_in(Some(&w.pod2), &["--max-time", "5", "--resolve", &resolve, &format!("http://allowed.test:{p}/")]);
    assert_eq!(r.status, 403, "steered to the gateway, which knows no such client: {r:?}");
    let d = gw.decision(|e| e["client"]["address"] == "192.0.2.11");
    assert_eq!((d["front"].as_str(), d["decision"]["action"].as_str()), (Some("transparent"), Some("deny")), "{d}");

    // SIGTERM stops the redirector and leaves the table: the selected Pod's connections are
    // refused (nothing listens on the relay port), never sent directly.
    let handle = table_handle(&w.node);
    let pid = redirector.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_until(Duration::from_secs(10), || redirector.0.try_wait().unwrap().is_some());
    assert_eq!(table_handle(&w.node), handle, "the table stays in the kernel");
    let before = up.hits();
    let r = curl_in(Some(&w.pod), &["--max-time", "5", &format!("http://203.0.113.10:{p}/")]);
    assert_eq!((r.exit, r.status), (7, 0), "refused while the relay is down: {r:?}");
    assert_eq!(up.hits(), before, "nothing went direct");

    // `uninstall` is the explicit act that removes steering.
    let out = w.node.command(workspace_bin("node-redirector")).arg("uninstall").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(node_table(&w.node).is_none(), "no table after uninstall");
    let r = curl_in(Some(&w.pod), &[&format!("http://203.0.113.10:{p}/")]);
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "192.0.2.10", "direct after uninstall");
}

/// Counts, in the "internet" namespace, every packet that arrives from `src` with protocol
/// `proto` (before anything else sees it): the canary that must stay at zero.
struct Arrivals<'a> {
    ns: &'a Netns,
}

impl<'a> Arrivals<'a> {
    fn start(ns: &'a Netns, sources: &[&str], protos: &[&str]) -> Arrivals<'a> {
        ns.exec_ok("nft", &["add", "table", "inet", "arrivals"]);
        ns.exec_ok(
            "nft",
            &["add", "chain", "inet", "arrivals", "pre", "{ type filter hook prerouting priority -300; }"],
        );
        for src in sources {
            for proto in protos {
                let name = Self::name(src, proto);
                ns.exec_ok("nft", &["add", "counter", "inet", "arrivals", &name]);
                let rule = format!("ip saddr {src} meta l4proto {proto} counter name {name}");
                ns.exec_ok("nft", &["add", "rule", "inet", "arrivals", "pre", &rule]);
            }
        }
        Arrivals { ns }
    }

    fn name(src: &str, proto: &str) -> String {
        format!("c_{}_{proto}", src.replace('.', "_"))
    }

    fn packets(&self, src: &str, proto: &str) -> u64 {
        let out = self
            .ns
            .command("nft")
            .args(["list", "counter", "inet", "arrivals", &Self::name(src, proto)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split("packets ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{text}"))
    }
}

/// Sends one raw IP packet of protocol `proto` from `src` to `dst` inside `ns` (ICMP echo with a
/// payload for 1, an SCTP-looking datagram for 132, opaque bytes otherwise).
fn raw_send(ns: &Netns, src: &str, dst: &str, proto: u8) {
    let script = format!(
        r#"
import socket
p = {proto}
data = b"exfiltrated secret " * 4
if p == 1:
    hdr = bytes([8, 0, 0, 0, 0x12, 0x34, 0, 1]) + data
    s = sum(int.from_bytes(hdr[i:i+2].ljust(2, b"\0"), "big") for i in range(0, len(hdr), 2))
    s = (s & 0xffff) + (s >> 16); s = (s & 0xffff) + (s >> 16)
    data = hdr[:2] + (~s & 0xffff).to_bytes(2, "big") + hdr[4:]
elif p == 132:
    data = (40000).to_bytes(2, "big") + (9).to_bytes(2, "big") + bytes(8) + data
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, p)
s.bind(("{src}", 0))
s.sendto(data, ("{dst}", 0))
"#
    );
    let out = ns.command("python3").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "raw send {proto}: {}", String::from_utf8_lossy(&out.stderr));
}

/// What a Pod can try to walk around the steering, each with a positive control that shows the
/// probe would see a leak: other IP protocols, a second address, a forged PROXY header (also from
/// behind a masquerading node), a direct connection to the relay port.
#[test]
fn pods_cannot_walk_around_the_steering() {
    let w = world();
    let (_dns, up, gw, dir) = standalone(&w, "", "");
    let p = up.addr.port();
    // A reconcile period longer than the test: a rule removed below stays removed.
    let child = spawn_redirector(&w.node, &dir.path().join("redirector.yaml"), &["--reconcile", "1h"], Stdio::null());
    let _redirector = Proc(child);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    let arrivals = Arrivals::start(
        &w.inet,
        &["192.0.2.10", "192.0.2.11", "192.0.2.99", "192.0.2.98"],
        &["icmp", "sctp", "253", "tcp", "udp"],
    );

    // Other protocols: ICMP echo with a payload, SCTP, a raw protocol. Nothing from the selected
    // Pod arrives; the same packets from the unselected Pod do.
    for proto in [1u8, 132, 253] {
        raw_send(&w.pod, "192.0.2.10", "203.0.113.10", proto);
        raw_send(&w.pod2, "192.0.2.11", "203.0.113.10", proto);
    }
    wait_until(Duration::from_secs(5), || {
        ["icmp", "sctp", "253"].iter().all(|proto| arrivals.packets("192.0.2.11", proto) >= 1)
    });
    for proto in ["icmp", "sctp", "253"] {
        assert_eq!(arrivals.packets("192.0.2.10", proto), 0, "{proto} from the selected Pod left the node");
    }

    // A second address on the selected Pod's interface: TCP and UDP from it are dropped on the
    // node, neither steered nor direct. The unselected Pod (not policed) does get out with one.
    w.pod.exec_ok("ip", &["addr", "add", "192.0.2.99/32", "dev", &w.pod_inner_if]);
    w.pod2.exec_ok("ip", &["addr", "add", "192.0.2.98/32", "dev", &w.pod2_inner_if]);
    let r =
        curl_in(Some(&w.pod), &["--interface", "192.0.2.99", "--max-time", "2", &format!("http://203.0.113.10:{p}/")]);
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(udp_probe(&w.pod, "192.0.2.99", "203.0.113.10", 9999, "00"), "silence");
    let _ =
        curl_in(Some(&w.pod2), &["--interface", "192.0.2.98", "--max-time", "2", &format!("http://203.0.113.10:{p}/")]);
    wait_until(Duration::from_secs(5), || arrivals.packets("192.0.2.98", "tcp") >= 1);
    for proto in ["tcp", "udp"] {
        assert_eq!(arrivals.packets("192.0.2.99", proto), 0, "{proto} from a second address left the node");
    }
    assert!(!up.peers().iter().any(|a| a.ip().to_string() == "192.0.2.99"));
    assert!(gw.events().iter().all(|e| e["client"]["address"] != "192.0.2.99"), "not steered either");

    // A forged PROXY header to the gateway's transparent port. From the node's own Pods it is
    // dropped on the node (the gateway never sees it)...
    let forged = {
        let mut h = proxy_v2_header("192.0.2.10:4000".parse().unwrap(), format!("203.0.113.10:{p}").parse().unwrap());
        h.extend_from_slice(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n");
        h
    };
    let transparent: std::net::SocketAddr = format!("198.51.100.2:{}", gw.transparent.port()).parse().unwrap();
    let send_forged = |ns: &Netns, src: &'static str| {
        let forged = forged.clone();
        ns.enter(move || {
            use std::io::{Read, Write};
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&std::net::SocketAddr::new(src.parse().unwrap(), 0).into()).unwrap();
            match sock.connect_timeout(&transparent.into(), Duration::from_secs(2)) {
                Err(e) => Err(e.kind()),
                Ok(()) => {
                    let mut s: std::net::TcpStream = sock.into();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.write_all(&forged).unwrap();
                    let mut out = Vec::new();
                    let _ = s.read_to_end(&mut out);
                    Ok(out)
                }
            }
        })
    };
    for (ns, src) in [(&w.pod, "192.0.2.10"), (&w.pod2, "192.0.2.11")] {
        assert_eq!(send_forged(ns, src), Err(std::io::ErrorKind::TimedOut), "{src}");
    }
    assert!(gw.events().iter().all(|e| e["decision"]["reason"] != "untrusted_relay"), "dropped on the node");
    // ... and from behind a masquerading node, from a Pod the redirector does not know (so
    // nothing on the node stops it), it arrives from the node's address, the relay's own: the
    // gateway refuses it for want of the relay's MAC.
    let t = unique_tag();
    let rogue = Netns::new("rrogue");
    let (inner, outer) = (format!("rrp{t}"), format!("rrn{t}"));
    Netns::link(&rogue, &inner, &["192.0.2.12/32"], &w.node, &outer, &["192.0.2.3/32"]);
    rogue.exec_ok("ip", &["route", "add", "192.0.2.3", "dev", &inner]);
    rogue.exec_ok("ip", &["route", "add", "default", "via", "192.0.2.3"]);
    w.node.exec_ok("ip", &["route", "add", "192.0.2.12/32", "dev", &outer]);
    w.node.exec_ok("nft", &["add", "table", "ip", "masq"]);
    w.node.exec_ok("nft", &["add", "chain", "ip", "masq", "post", "{ type nat hook postrouting priority 100; }"]);
    w.node.exec_ok(
        "nft",
        &[
            "add",
            "rule",
            "ip",
            "masq",
            "post",
            "ip",
            "saddr",
            "192.0.2.0/24",
            "ip",
            "daddr",
            "198.51.100.0/24",
            "masquerade",
        ],
    );
    let answer = send_forged(&rogue, "192.0.2.12").expect("reaches the gateway");
    assert!(answer.is_empty(), "closed unanswered: {}", String::from_utf8_lossy(&answer));
    let d = gw.decision(|e| e["decision"]["reason"] == "untrusted_relay");
    assert_eq!(d["client"]["address"], "198.51.100.1", "from the node's (the relay's) address: {d}");
    assert!(d["decision"]["detail"].as_str().unwrap_or_default().contains("no relay authentication"), "{d}");
    assert!(
        gw.events().iter().all(|e| e["client"]["port"] != 4000),
        "the identity the forged header claimed never reached a decision"
    );

    // A direct connection to the relay port: reset by the table...
    let relay_port: std::net::SocketAddr = "169.254.1.1:15001".parse().unwrap();
    let direct = w.pod2.enter(move || {
        std::net::TcpStream::connect_timeout(&relay_port, Duration::from_secs(2)).map(|_| ()).map_err(|e| e.kind())
    });
    assert_eq!(direct, Err(std::io::ErrorKind::ConnectionRefused));
    // ... and by the relay itself when that rule is gone (defence in depth).
    w.node.exec_ok("nft", &["flush", "chain", "inet", "egress_redirector", "relay_in"]);
    let direct = w.pod2.enter(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect_timeout(&relay_port, Duration::from_secs(2)).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        s.read(&mut b).map(|_| ()).map_err(|e| e.kind())
    });
    assert_eq!(direct, Err(std::io::ErrorKind::ConnectionReset), "the relay resets what was not redirected");
    assert_eq!(
        redirector_metric(&w.node, "egress_redirector_relay_refused_total{reason=\"not_redirected\"} "),
        Some(1.0)
    );
    assert!(gw.events().iter().all(|e| e["client"]["address"] != "192.0.2.11"), "never relayed");

    // Meanwhile the selected Pod's steered traffic works.
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    assert_eq!(curl_in(Some(&w.pod), &["--resolve", &resolve, &format!("http://allowed.test:{p}/")]).status, 200);
}

/// Broadcasts, from `ns`'s interface `ifname` (MAC `mac`), a gratuitous ARP request that says
/// "`claimed` is at `mac`": what a Pod does to take over a neighbour's address. A node updates
/// an existing entry from a gratuitous ARP at once, whatever its lock time.
fn arp_claim(ns: &Netns, ifname: &str, mac: &str, claimed: &str) {
    let script = format!(
        r#"
import socket, struct
me, ip = bytes.fromhex("{mac}".replace(":", "")), socket.inet_aton("{claimed}")
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, me, ip, bytes(6), ip)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("{ifname}", 0))
s.send(b"\xff" * 6 + me + b"\x08\x06" + arp)
"#
    );
    let out = ns.command("python3").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "ARP from {ifname}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The node's neighbour entry for `ip` on `dev`: its MAC address, if it has one.
fn neighbour(node: &Netns, ip: &str, dev: &str) -> Option<String> {
    let out = node.command("ip").args(["neigh", "show", ip, "dev", dev]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split("lladdr ").nth(1).and_then(|s| s.split_whitespace().next()).map(str::to_string)
}

/// On a bridge CNI every Pod's packets reach the node's IP layer from the bridge, so the Pod's own
/// interface is known only where the frame enters the bridge: there, a selected Pod's port
/// carries only its own addresses, in IP and in ARP. The port comes from the bridge CNI's result
/// through the chained plugin, as a real node learns it. Each probe has a positive control: the
/// unselected Pod's same attempt succeeds.
#[test]
fn a_pod_behind_a_bridge_cannot_walk_around_the_steering() {
    let (w, bridge) = bridge_world();
    let (_dns, up, gw, dir) = standalone(&w, "", "");
    let p = up.addr.port();
    let d = dir.path();
    let cfg = d.join("redirector.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap()
        + &format!("cni: {{enabled: true, socket: {0}/cni.sock, logFile: {0}/cni.log}}\n", d.display());
    std::fs::write(&cfg, text).unwrap();
    let _redirector = Proc(spawn_redirector(&w.node, &cfg, &["--reconcile", "1h"], Stdio::null()));
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some() && d.join("cni.sock").exists());

    // The bridge plugin's result: the bridge, web-1's port on it, web-1's eth0. The plugin runs in
    // the node's namespace, as the runtime runs it, and tells the bridge from the port.
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "cbr0", "type": "egress-redirector",
        "socket": d.join("cni.sock"), "logFile": d.join("cni.log"),
        "prevResult": {"cniVersion": "1.0.0",
            "interfaces": [{"name": bridge}, {"name": w.pod_if}, {"name": "eth0", "sandbox": "/var/run/netns/web-1"}],
            "ips": [{"address": "192.0.2.10/24", "gateway": "192.0.2.1", "interface": 2}]}});
    let mut plugin = w.node.command(workspace_bin("node-redirector"));
    plugin.arg("cni");
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "sandbox-web-1"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1"),
    ];
    // Listed with its address only: steered, but its port is unknown until the plugin says it.
    let unguarded = || redirector_metric(&w.node, "egress_redirector_unguarded_addresses ");
    assert_eq!(unguarded(), Some(1.0));
    let (code, out) = invoke_plugin(plugin, &env, &conf);
    assert_eq!(code, 0, "{out}");
    assert_eq!(unguarded(), Some(0.0));
    let listed = w.node.command("nft").args(["list", "table", "bridge", "egress_redirector"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.contains(&format!("\"{}\" . 192.0.2.10", w.pod_if)), "web-1's port, not the bridge: {listed}");
    assert!(!listed.contains(&format!("\"{bridge}\"")), "{listed}");

    // Its steered traffic works (and its ARP for the node's address passes).
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let r = curl_in(Some(&w.pod), &["--resolve", &resolve, &format!("http://allowed.test:{p}/")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(gw.decision(|e| e["target"]["host"] == "allowed.test")["client"]["address"], "192.0.2.10");

    // A second address: nothing from it leaves the node, neither steered nor direct. The same
    // from the unselected Pod's port gets out (the control: the probe would see a leak).
    let arrivals = Arrivals::start(&w.inet, &["192.0.2.99", "192.0.2.98"], &["tcp", "udp"]);
    w.pod.exec_ok("ip", &["addr", "add", "192.0.2.99/24", "dev", &w.pod_inner_if]);
    w.pod2.exec_ok("ip", &["addr", "add", "192.0.2.98/24", "dev", &w.pod2_inner_if]);
    let r =
        curl_in(Some(&w.pod), &["--interface", "192.0.2.99", "--max-time", "2", &format!("http://203.0.113.10:{p}/")]);
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(udp_probe(&w.pod, "192.0.2.99", "203.0.113.10", 9999, "00"), "silence");
    let r =
        curl_in(Some(&w.pod2), &["--interface", "192.0.2.98", "--max-time", "2", &format!("http://203.0.113.10:{p}/")]);
    assert_eq!(r.status, 200, "the unselected Pod's second address goes direct: {r:?}");
    assert!(arrivals.packets("192.0.2.98", "tcp") >= 1);
    for proto in ["tcp", "udp"] {
        assert_eq!(arrivals.packets("192.0.2.99", proto), 0, "{proto} from a second address left the node");
    }
    assert!(!up.peers().iter().any(|a| a.ip().to_string() == "192.0.2.99"));
    assert!(gw.events().iter().all(|e| e["client"]["address"] != "192.0.2.99"), "not steered either");

    // ARP: web-1 claims db-1's address to the node; the node keeps db-1's MAC. db-1, whose port
    // is not selected, may not take web-1's either: a Pod's address whose port is known comes
    // only from that port. The control: db-1's claim of an address no Pod holds is taken.
    let (web_mac, db_mac) = (World::mac(&w.pod, &w.pod_inner_if), World::mac(&w.pod2, &w.pod2_inner_if));
    let bridge_mac = World::mac(&w.node, &bridge);
    let neighbours =
        || String::from_utf8_lossy(&w.node.command("ip").arg("neigh").output().unwrap().stdout).to_string();
    let _ = w.node.command("curl").args(["-s", "--max-time", "2", "http://192.0.2.11:9/"]).output();
    assert_eq!(neighbour(&w.node, "192.0.2.11", &bridge).as_deref(), Some(db_mac.as_str()));
    arp_claim(&w.pod, &w.pod_inner_if, &web_mac, "192.0.2.11");
    arp_claim(&w.pod2, &w.pod2_inner_if, &db_mac, "192.0.2.10");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        neighbour(&w.node, "192.0.2.11", &bridge).as_deref(),
        Some(db_mac.as_str()),
        "web-1 took db-1's address: {}",
        neighbours()
    );
    assert_eq!(
        neighbour(&w.node, "192.0.2.10", &bridge).as_deref(),
        Some(web_mac.as_str()),
        "db-1 took web-1's address: {}",
        neighbours()
    );
    let _ = w.node.command("curl").args(["-s", "--max-time", "1", "http://192.0.2.77:9/"]).output();
    arp_claim(&w.pod2, &w.pod2_inner_if, &db_mac, "192.0.2.77");
    wait_until(Duration::from_secs(5), || {
        neighbour(&w.node, "192.0.2.77", &bridge).as_deref() == Some(db_mac.as_str())
    });

    // IP: db-1 sending from web-1's address (which the table would steer, and the gateway take
    // for web-1) is dropped as it enters the bridge; from its own second address it reaches the
    // node (the control). Its neighbour entry for the node is pinned, so that its packets leave
    // it whatever its ARP for web-1's address meets.
    let at_node = Arrivals::start(&w.node, &["192.0.2.10", "192.0.2.98"], &["tcp"]);
    w.pod2.exec_ok(
        "ip",
        &["neigh", "replace", "192.0.2.1", "lladdr", &bridge_mac, "dev", &w.pod2_inner_if, "nud", "permanent"],
    );
    w.pod2.exec_ok("ip", &["addr", "add", "192.0.2.10/32", "dev", &w.pod2_inner_if]);
    for src in ["192.0.2.10", "192.0.2.98"] {
        let _ = curl_in(Some(&w.pod2), &["--interface", src, "--max-time", "1", "http://203.0.113.10:9/"]);
    }
    assert!(at_node.packets("192.0.2.98", "tcp") >= 1);
    assert_eq!(at_node.packets("192.0.2.10", "tcp"), 0, "db-1's packets from web-1's address reached the node");
    assert!(gw.events().iter().all(|e| e["target"]["port"] != 9), "nothing steered as web-1");
}

/// A kernel without nf_tables' bridge family (an `nft` in front of the real one that refuses
/// it, as such a kernel does): the redirector still steers, without the bridge table, and says
/// that the Pod on a bridge port goes without anti-spoofing: a log line and the unguarded gauge.
#[test]
fn without_the_bridge_family_pods_on_bridge_ports_are_steered_and_reported_unguarded() {
    let (w, _bridge) = bridge_world();
    let (_dns, up, gw, dir) = standalone(&w, "", "");
    let p = up.addr.port();
    let d = dir.path();
    let cfg = d.join("redirector.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "ips: [192.0.2.10], labels: {app: web}}",
        &format!("ips: [192.0.2.10], labels: {{app: web}}, interface: {}}}", w.pod_if),
    );
    std::fs::write(&cfg, text).unwrap();
    let real = String::from_utf8(Command::new("sh").args(["-c", "command -v nft"]).output().unwrap().stdout).unwrap();
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = bin.join("nft");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ninput=''\ncase \" $* \" in *' -f - '*) input=$(cat);; esac\n\
             if printf '%s %s' \"$*\" \"$input\" | grep -q bridge; then\n  \
             echo 'Error: Could not process rule: Address family not supported by protocol' >&2; exit 1\nfi\n\
             if [ -n \"$input\" ]; then printf '%s' \"$input\" | exec {real} \"$@\"; fi\nexec {real} \"$@\"\n",
            real = real.trim()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let log_path = d.join("redirector.log");
    let child = w
        .node
        .command(workspace_bin("node-redirector"))
        .args(["run", "--reconcile", "1h", "--config"])
        .arg(&cfg)
        .env("PATH", path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let _redirector = Proc(child);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    let bridge_table = w.node.command("nft").args(["list", "table", "bridge", "egress_redirector"]).output().unwrap();
    assert!(!bridge_table.status.success(), "no bridge table");
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let r = curl_in(Some(&w.pod), &["--resolve", &resolve, &format!("http://allowed.test:{p}/")]);
    assert_eq!(r.status, 200, "still steered: {r:?}");
    assert_eq!(gw.decision(|e| e["target"]["host"] == "allowed.test")["client"]["address"], "192.0.2.10");
    assert_eq!(redirector_metric(&w.node, "egress_redirector_unguarded_addresses "), Some(1.0));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("the kernel has no nf_tables bridge family"), "{log}");
    assert!(log.contains("steered Pod addresses without anti-spoofing") && log.contains("192.0.2.10"), "{log}");
}

/// A restart (a DaemonSet rolling update, a crash) never lets a selected Pod's traffic go direct:
/// the table stays in the kernel while no relay listens (connections are refused), and the next
/// instance adopts it (same table, no replacement).
#[test]
fn steering_survives_a_restart_and_nothing_goes_direct() {
    let w = world();
    let (_dns, up, _gw, dir) = standalone(&w, "", "");
    let p = up.addr.port();
    let cfg = dir.path().join("redirector.yaml");
    let mut first = Proc(spawn_redirector(&w.node, &cfg, &[], Stdio::null()));
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    let handle = table_handle(&w.node);
    // The Pod connects in a loop (bounded: at most 60 s), recording each attempt's outcome.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(std::time::Instant, bool)>>> = Arc::default();
    let target: std::net::SocketAddr = format!("203.0.113.10:{p}").parse().unwrap();
    let (stop2, log2, ns) = (stop.clone(), log.clone(), w.pod.name.clone());
    let client = std::thread::spawn(move || {
        let ns = Netns { name: ns };
        ns.enter(move || {
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < until {
                use std::io::{Read, Write};
                let ok = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")?;
                        let mut out = Vec::new();
                        s.read_to_end(&mut out)?;
                        Ok(out.starts_with(b"HTTP/1.1 200"))
                    })
                    .unwrap_or(false);
                log2.lock().unwrap().push((std::time::Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        std::mem::forget(ns); // the test's World owns the namespace
    });
    wait_until(Duration::from_secs(20), || log.lock().unwrap().iter().filter(|(_, ok)| *ok).count() >= 5);
    let pid = first.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_until(Duration::from_secs(10), || first.0.try_wait().unwrap().is_some());
    let stopped = std::time::Instant::now();
    // Ten attempts while no redirector runs (refused, if the table stayed).
    wait_until(Duration::from_secs(30), || log.lock().unwrap().iter().filter(|(at, _)| *at > stopped).count() >= 10);
    let _second = Proc(spawn_redirector(&w.node, &cfg, &[], Stdio::null()));
    let restarted = std::time::Instant::now();
    wait_until(Duration::from_secs(20), || log.lock().unwrap().iter().any(|(at, ok)| *ok && *at > restarted));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    client.join().unwrap();
    let log = log.lock().unwrap().clone();
    let refused: Vec<_> = log.iter().filter(|(at, ok)| !ok && *at > stopped).collect();
    let back = log.iter().find(|(at, ok)| *ok && *at > restarted).unwrap().0;
    eprintln!(
        "restart: {} attempts, {} refused; new connections refused for {:?} (stop to the first success after the new start; {:?} of it before the new process was started)",
        log.len(),
        refused.len(),
        back - stopped,
        restarted - stopped
    );
    let peers = up.peers();
    assert!(!peers.is_empty());
    assert!(
        peers.iter().all(|a| a.ip().to_string() == "198.51.100.2"),
        "every connection the upstream saw came through the gateway, none from the Pod itself: {peers:?}"
    );
    assert_eq!(table_handle(&w.node), handle, "the new instance adopted the table rather than replacing it");
}

/// Runs the CNI plugin exactly as a container runtime does: the binary installed in the CNI bin
/// dir (no arguments), the CNI environment, the plugin's conflist entry with `cniVersion`,
/// `name` and `prevResult` on stdin. Returns (exit code, stdout).
fn run_plugin(
    bin: &std::path::Path,
    command: &str,
    conf: &serde_json::Value,
    pod_if: &str,
) -> (i32, serde_json::Value) {
    let mut stdin = conf.clone();
    stdin["prevResult"] = serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": pod_if}, {"name": "eth0", "sandbox": "/var/run/netns/cni-1234"}],
        "ips": [{"address": "192.0.2.10/32", "gateway": "192.0.2.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}]
    });
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=sandbox-web-1";
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "sandbox-web-1"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", bin.parent().unwrap().to_str().unwrap()),
        ("CNI_ARGS", args),
    ];
    invoke_plugin(Command::new(bin), &env, &stdin)
}

/// A `redirect: Transparent` EgressPolicy of namespace `shop` selecting `app: <app>`.
fn transparent_policy(name: &str, app: &str, rules: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "redirect": "Transparent", "rules": rules}})
}

/// The gateway transparent Service's EndpointSlice: the gateway 198.51.100.2 on `port`.
fn gateway_slice(port: u16, ready: bool) -> serde_json::Value {
    serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "egress-transparent-abc", "namespace": "egress-system", "labels": {"kubernetes.io/service-name": "egress-transparent"}},
        "ports": [{"name": "transparent", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["198.51.100.2"], "conditions": {"ready": ready}}]})
}

/// Writes a kubeconfig for `api` and a Kubernetes-mode config for node-1 (the CNI plugin served
/// on a socket in `dir`, `extra` lines added) into `dir`; the config's path.
fn kube_redirector_config(
    dir: &std::path::Path,
    api: &egress_e2e::kubeapi::FakeApi,
    extra: &str,
) -> std::path::PathBuf {
    let (kc, cfg) = (dir.join("kubeconfig"), dir.join("redirector.yaml"));
    std::fs::write(&kc, api.kubeconfig()).unwrap();
    std::fs::write(&cfg, format!(
        "nodeName: node-1\n{extra}relay: {{keyFile: {}}}\nexcludeCidrs: [192.0.2.0/24, 198.51.100.0/24]\nkubernetes: {{enabled: true, kubeconfig: {}, gatewayService: egress-system/egress-transparent, gatewayPortName: transparent}}\ncni: {{enabled: true, socket: {}, logFile: {}}}\n",
        relay_key_file().display(),
        kc.display(),
        dir.join("cni.sock").display(),
        dir.join("cni.log").display()
    )).unwrap();
    cfg
}

/// The CNI plugin's ADD (sandbox `container`) for Pod shop/`name`, which the watch has not shown,
/// against the redirector of [`kube_redirector_config`] in `dir`: (exit code, the plugin's error).
fn cni_add_unshown(dir: &std::path::Path, container: &str, name: &str) -> (i32, serde_json::Value) {
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s", "type": "egress-redirector",
        "socket": dir.join("cni.sock"), "logFile": dir.join("cni.log"),
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "192.0.2.13/32"}]}});
    let mut cmd = Command::new(workspace_bin("node-redirector"));
    cmd.arg("cni");
    let args = format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}");
    invoke_plugin(cmd, &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", container), ("CNI_ARGS", &args)], &conf)
}

/// Runs a CNI plugin command with only `env` in its environment and `stdin` on its standard
/// input: (exit code, stdout as JSON, `Null` when empty).
fn invoke_plugin(mut cmd: Command, env: &[(&str, &str)], stdin: &serde_json::Value) -> (i32, serde_json::Value) {
    let mut child = cmd
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(stdin.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let json = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    (out.status.code().unwrap_or(-1), json)
}

/// The chained CNI plugin closes the start-up window: a Pod the redirector does not know yet is
/// steered from its very first connection, because the plugin returns only once its address is
/// in the kernel's set. Installed with `install-cni` into a kindnet-like conflist, run as the
/// runtime runs it; fails closed when the redirector is down (or starts the Pod unsteered with
/// `failurePolicy: Ignore`); `uninstall` takes everything out again.
#[test]
fn the_cni_plugin_steers_a_pod_from_its_first_connection() {
    let w = world();
    let (_dns, up, gw, dir) = standalone(&w, "", "");
    let p = up.addr.port();
    let d = dir.path();
    let (bin_dir, conf_dir) = (d.join("opt-cni-bin"), d.join("etc-cni-net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let kindnet = r#"{"cniVersion": "0.3.1", "name": "kindnet", "plugins": [{"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": "192.0.2.0/24"}]]}, "mtu": 1500}, {"type": "portmap", "capabilities": {"portMappings": true}}]}"#;
    std::fs::write(conf_dir.join("10-kindnet.conflist"), kindnet).unwrap();
    // web-1 is listed without an address yet: only the plugin can tell the redirector its address.
    let cfg_text = std::fs::read_to_string(d.join("redirector.yaml")).unwrap().replace(
        "  - {namespace: shop, name: web-1, nodeName: node-1, ips: [192.0.2.10], labels: {app: web}}",
        "  - {namespace: shop, name: web-1, nodeName: node-1, ips: [], labels: {app: web}}",
    ) + &format!(
        "cni: {{enabled: true, socket: {0}/run/cni.sock, logFile: {0}/run/cni.log, binDir: {1}, confDir: {2}}}\n",
        d.display(),
        bin_dir.display(),
        conf_dir.display()
    );
    let cfg = d.join("redirector.yaml");
    std::fs::write(&cfg, &cfg_text).unwrap();
    // The init container's step.
    let out =
        Command::new(workspace_bin("node-redirector")).args(["install-cni", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plugin = bin_dir.join("egress-redirector");
    let conflist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join("10-kindnet.conflist")).unwrap()).unwrap();
    let entry = conflist["plugins"][2].clone();
    assert_eq!(
        (entry["type"].as_str(), conflist["plugins"][0]["type"].as_str()),
        (Some("egress-redirector"), Some("ptp")),
        "{conflist}"
    );
    // As libcni hands a chained plugin its config: the entry plus the list's name and version.
    let mut conf = entry.clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();

    // The redirector is not running: ADD fails closed, with the spec's error and the cause.
    let (code, out) = run_plugin(&plugin, "ADD", &conf, &w.pod_if);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        (out["code"].as_u64(), out["msg"].as_str()),
        (Some(11), Some("egress node-redirector unavailable")),
        "{out}"
    );
    assert!(out["details"].as_str().unwrap().contains("cni.sock"), "{out}");
    let mut ignore = conf.clone();
    ignore["failurePolicy"] = serde_json::json!("Ignore");
    let (code, out) = run_plugin(&plugin, "ADD", &ignore, &w.pod_if);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["ips"][0]["address"], "192.0.2.10/32", "prevResult passed on: {out}");
    let log = std::fs::read_to_string(d.join("run/cni.log")).unwrap();
    assert!(log.contains("WARNING: the Pod starts unsteered (failurePolicy: Ignore)"), "{log}");

    let mut redirector = Proc(spawn_redirector(&w.node, &cfg, &["--reconcile", "1h"], Stdio::null()));
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some() && d.join("run/cni.sock").exists());
    assert!(!selected_set(&w.node).contains("192.0.2.10"), "not steered before the plugin runs");
    let (code, out) = run_plugin(&plugin, "ADD", &conf, &w.pod_if);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["ips"][0]["address"], "192.0.2.10/32");
    assert_eq!(out["cniVersion"], "0.3.1", "the result in the list's version: {out}");
    // In the kernel when the plugin returned: no waiting here.
    assert!(selected_set(&w.node).contains("192.0.2.10"), "{}", selected_set(&w.node));
    let t = node_table(&w.node).unwrap();
    assert!(t.contains(&format!("\"{}\" . 192.0.2.10", w.pod_if)), "the interface from the CNI result: {t}");
    // The Pod's first connection goes through the gateway.
    let r = curl_in(
        Some(&w.pod),
        &["--resolve", &format!("allowed.test:{p}:203.0.113.10"), &format!("http://allowed.test:{p}/first")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.peers().iter().map(|a| a.ip().to_string()).collect::<Vec<_>>(), vec!["198.51.100.2"]);
    assert_eq!(gw.decision(|e| e["target"]["host"] == "allowed.test")["front"], "transparent");
    let (code, _) = run_plugin(&plugin, "CHECK", &conf, &w.pod_if);
    assert_eq!(code, 0);
    assert_eq!(redirector_metric(&w.node, "egress_redirector_cni_requests_total{result=\"selected\"} "), Some(1.0));
    assert_eq!(redirector_metric(&w.node, "egress_redirector_cni_admit_seconds_count "), Some(1.0));

    // The primary CNI rewrites its conflist (as its agent does on restart): the entry is back at
    // once (the reconcile period here is an hour: the conf dir is watched).
    std::fs::write(conf_dir.join("10-kindnet.conflist"), kindnet).unwrap();
    wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(conf_dir.join("10-kindnet.conflist")).unwrap().contains("egress-redirector")
    });

    // A restart remembers the admission: the new instance adopts the table with it.
    let pid = redirector.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_until(Duration::from_secs(10), || redirector.0.try_wait().unwrap().is_some());
    let mut second = Proc(spawn_redirector(&w.node, &cfg, &["--reconcile", "1h"], Stdio::null()));
    let admin: std::net::SocketAddr = "127.0.0.1:9792".parse().unwrap();
    wait_until(Duration::from_secs(10), || w.node.enter(move || admin_get(admin, "/readyz")).map(|r| r.0) == Some(200));
    assert!(selected_set(&w.node).contains("192.0.2.10"), "still steered after the new instance adopted the table");

    // DEL forgets it.
    let (code, out) = run_plugin(&plugin, "DEL", &conf, &w.pod_if);
    assert_eq!((code, out), (0, serde_json::Value::Null));
    assert!(!selected_set(&w.node).contains("192.0.2.10"));

    // uninstall (with the redirector stopped: a running one keeps its entry): no table, no
    // conflist entry, no plugin binary.
    assert!(Command::new("kill").args(["-TERM", &second.0.id().to_string()]).status().unwrap().success());
    wait_until(Duration::from_secs(10), || second.0.try_wait().unwrap().is_some());
    let out =
        w.node.command(workspace_bin("node-redirector")).args(["uninstall", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(node_table(&w.node).is_none());
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join("10-kindnet.conflist")).unwrap()).unwrap();
    assert_eq!(after, serde_json::from_str::<serde_json::Value>(kindnet).unwrap(), "the primary CNI's list as it was");
    assert!(!plugin.exists());
}

/// Deleting the release takes steering off every node (the chart's pre-delete hook): the hook's
/// `uninstall-daemonset` turns the DaemonSet's Pods into `uninstall --wait` (the scripted API
/// stands in for the API server, the test for the DaemonSet controller), each node's Pod removes
/// the table, the conflist entry and the plugin, and the hook returns once every node is done.
#[test]
fn deleting_the_release_takes_steering_off_every_node() {
    use egress_e2e::kubeapi::*;
    use serde_json::json;
    let w = world();
    let (_dns, _up, _gw, dir) = standalone(&w, "", "");
    let d = dir.path();
    let (bin_dir, conf_dir) = (d.join("bin"), d.join("net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::write(conf_dir.join("10-flannel.conflist"), r#"{"name": "cbr0", "cniVersion": "0.3.1", "plugins": [{"type": "flannel", "delegate": {"isDefaultGateway": true}}]}"#).unwrap();
    let cfg = d.join("redirector.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap()
        + &format!(
            "cni: {{enabled: true, socket: {0}/run/cni.sock, logFile: {0}/run/cni.log, binDir: {1}, confDir: {2}}}\n",
            d.display(),
            bin_dir.display(),
            conf_dir.display()
        );
    std::fs::write(&cfg, text).unwrap();
    let out =
        Command::new(workspace_bin("node-redirector")).args(["install-cni", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A node as the release left it: the redirector ran and stopped; the table stays.
    let mut running = Proc(spawn_redirector(&w.node, &cfg, &[], Stdio::null()));
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    assert!(Command::new("kill").args(["-TERM", &running.0.id().to_string()]).status().unwrap().success());
    wait_until(Duration::from_secs(10), || running.0.try_wait().unwrap().is_some());
    assert!(node_table(&w.node).is_some() && bin_dir.join("egress-redirector").exists());

    let api = FakeApi::start();
    // The hook runs with its own Role only.
    api.set_rbac(&[egress_e2e::rbac::UNINSTALL_HOOK_ROLE]);
    let ds = |generation: i64, updated: i64, ready: i64| {
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "egress-node-redirector", "namespace": "egress-system", "generation": generation, "uid": "ds-1"},
            "spec": {"selector": {"matchLabels": {"app": "r"}}, "template": {"metadata": {"labels": {"app": "r"}}, "spec": {
                "initContainers": [{"name": "install-cni", "image": "r", "args": ["install-cni"]}],
                "containers": [{"name": "node-redirector", "image": "r", "args": ["run", "--config", "/etc/node-redirector/node-redirector.yaml"]}]}}},
            "status": {"desiredNumberScheduled": 1, "currentNumberScheduled": 1, "numberMisscheduled": 0, "numberReady": ready,
                "updatedNumberScheduled": updated, "observedGeneration": generation}})
    };
    api.set_daemonset(ds(1, 1, 1));
    let kc = d.join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig()).unwrap();
    let hook = |timeout: &str| {
        Command::new(workspace_bin("node-redirector"))
            .args([
                "uninstall-daemonset",
                "--namespace",
                "egress-system",
                "--name",
                "egress-node-redirector",
                "--timeout",
                timeout,
                "--kubeconfig",
            ])
            .arg(&kc)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut hook_proc = Proc(hook("30s"));
    wait_until(Duration::from_secs(10), || !api.patches().is_empty());
    let p = &api.patches()[0];
    assert_eq!(p.path, "/apis/apps/v1/namespaces/egress-system/daemonsets/egress-node-redirector");
    let spec = &p.body["spec"]["template"]["spec"];
    assert_eq!(
        spec["containers"],
        json!([{"name": "node-redirector", "args": ["uninstall", "--config", "/etc/node-redirector/node-redirector.yaml", "--wait"]}])
    );
    assert_eq!(
        spec["initContainers"],
        json!([{"name": "install-cni", "$patch": "delete"}]),
        "the installer does not run again"
    );
    assert_eq!(p.body["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], "100%", "every node at once");
    // It reads the DaemonSet again and again (the rollout is not done) and stays.
    let gets = || {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /apis/apps/v1/namespaces/egress-system/daemonsets/egress-node-redirector"))
            .count()
    };
    wait_until(Duration::from_secs(10), || gets() >= 3);
    assert!(hook_proc.0.try_wait().unwrap().is_none(), "the hook waits for the rollout");

    // The controller replaces the node's Pod with the patched one: it uninstalls, then is ready.
    let mut uninstaller = Proc(
        w.node
            .command(workspace_bin("node-redirector"))
            .args(["uninstall", "--wait", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin: std::net::SocketAddr = "127.0.0.1:9792".parse().unwrap();
    wait_until(Duration::from_secs(10), || w.node.enter(move || admin_get(admin, "/readyz")).map(|r| r.0) == Some(200));
    assert!(node_table(&w.node).is_none(), "no table");
    assert!(!bin_dir.join("egress-redirector").exists(), "no plugin binary");
    let list = std::fs::read_to_string(conf_dir.join("10-flannel.conflist")).unwrap();
    assert!(!list.contains("egress-redirector"), "no conflist entry: {list}");
    api.set_daemonset(ds(2, 1, 1));
    wait_until(Duration::from_secs(10), || hook_proc.0.try_wait().unwrap().is_some());
    assert!(hook_proc.0.try_wait().unwrap().unwrap().success());
    // The DaemonSet's deletion stops the uninstaller: nothing is put back.
    assert!(Command::new("kill").args(["-TERM", &uninstaller.0.id().to_string()]).status().unwrap().success());
    wait_until(Duration::from_secs(10), || uninstaller.0.try_wait().unwrap().is_some());
    assert!(uninstaller.0.try_wait().unwrap().unwrap().success());
    assert!(node_table(&w.node).is_none());

    // A node that never reports done: the hook gives up, failing, and says what is left.
    api.set_daemonset(ds(2, 0, 0));
    let out = hook("1s").wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("steering still in place on some nodes") && err.contains("0 of 1 uninstalled"), "{err}");
}

/// HTTPS (IPv4 and IPv6) through the redirector, names decided by SNI, and failover between two
/// gateway endpoints when one is killed (the time it took is printed, not asserted).
#[test]
fn https_over_ipv4_and_ipv6_sni_decides_and_endpoints_fail_over() {
    let w = world();
    // IPv6 on the same links: the Pod's address is a /128 with a host route on the node (as for
    // IPv4); the gateway's and the internet's links carry a /64 on the interface that carries
    // their IPv4 subnet.
    w.pod.exec_ok("ip", &["addr", "add", "2001:db8:2::10/128", "dev", &w.pod_inner_if, "nodad"]);
    w.node.exec_ok("ip", &["addr", "add", "2001:db8:2::1/128", "dev", &w.pod_if, "nodad"]);
    w.pod.exec_ok("ip", &["-6", "route", "add", "2001:db8:2::1", "dev", &w.pod_inner_if]);
    w.node.exec_ok("ip", &["-6", "route", "add", "2001:db8:2::10/128", "dev", &w.pod_if]);
    for (ns, v6, v4_subnet) in [
        (&w.gw_ns, "2001:db8:51::2/64", "198.51.100."),
        (&w.node, "2001:db8:51::1/64", "198.51.100."),
        (&w.inet, "2001:db8:113::10/64", "203.0.113."),
        (&w.node, "2001:db8:113::1/64", "203.0.113."),
    ] {
        let out = ns.command("ip").args(["-o", "-4", "addr", "show"]).output().unwrap();
        let addrs = String::from_utf8_lossy(&out.stdout).to_string();
        let dev =
            addrs.lines().find(|l| l.contains(v4_subnet)).and_then(|l| l.split_whitespace().nth(1)).expect("interface");
        ns.exec_ok("ip", &["addr", "add", v6, "dev", dev, "nodad"]);
    }
    w.pod.exec_ok("ip", &["-6", "route", "add", "default", "via", "2001:db8:2::1"]);
    w.gw_ns.exec_ok("ip", &["-6", "route", "add", "default", "via", "2001:db8:51::1"]);
    w.inet.exec_ok("ip", &["-6", "route", "add", "default", "via", "2001:db8:113::1"]);
    w.node.exec_ok("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);

    let dns = Dns::start_at(
        Some(&w.inet),
        "203.0.113.10:53".parse().unwrap(),
        &[("allowed.test", "203.0.113.10"), ("allowed.test", "2001:db8:113::10"), ("denied.test", "203.0.113.10")],
    );
    let tls4 = TlsUpstream::start_in(Some(&w.inet), "203.0.113.10", "allowed.test", None);
    let p = tls4.addr.port();
    let tls6 = TlsUpstream::start_in(Some(&w.inet), "2001:db8:113::10", "allowed.test", Some(p));
    let body = format!(
        r#"
{TRUSTED}
clients:
  - {{cidr: 192.0.2.10/32, namespace: shop, name: web-1, labels: {{app: web}}}}
  - {{cidr: "2001:db8:2::10/128", namespace: shop, name: web-1, labels: {{app: web}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: web, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: web}}}}
      redirect: Transparent
      rules: [{{name: allowed, to: [{{domain: allowed.test}}], ports: [{{port: {p}}}]}}]
"#
    );
    // The gateway dials its own resolution of the name (IPv6 or IPv4, whichever answers first),
    // so clients trust both upstreams' certificates.
    let bundle = tempfile::NamedTempFile::new().unwrap();
    let pem = std::fs::read_to_string(&tls4.cert).unwrap() + &std::fs::read_to_string(&tls6.cert).unwrap();
    std::fs::write(bundle.path(), pem).unwrap();
    let mut gw1 = Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body);
    let gw2 = Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("redirector.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
nodeName: node-1
gateways: [198.51.100.2:{g1}, 198.51.100.2:{g2}]
relay: {{keyFile: {key}}}
excludeCidrs: [192.0.2.0/24, 198.51.100.0/24, "2001:db8:2::/64", "2001:db8:51::/64"]
pods:
  - {{namespace: shop, name: web-1, nodeName: node-1, ips: [192.0.2.10, "2001:db8:2::10"], labels: {{app: web}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: web, namespace: shop}}
    spec: {{podSelector: {{matchLabels: {{app: web}}}}, redirect: Transparent, rules: []}}
"#,
            g1 = gw1.transparent.port(),
            g2 = gw2.transparent.port(),
            key = relay_key_file().display()
        ),
    )
    .unwrap();
    let child = spawn_redirector(&w.node, &cfg, &[], Stdio::null());
    let _redirector = Proc(child);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    // Both families are DNAT'ed to a node address of their own (the first usable one: the node
    // end of web-1's veth).
    let t = node_table(&w.node).unwrap();
    assert!(t.contains("meta l4proto tcp dnat ip to 192.0.2.1:15001"), "{t}");
    assert!(t.contains("meta l4proto tcp dnat ip6 to [2001:db8:2::1]:15001"), "{t}");
    let https = |src: &str, name: &str, ip: &str, cacert: &std::path::Path| {
        let resolve = if ip.contains(':') { format!("{name}:{p}:[{ip}]") } else { format!("{name}:{p}:{ip}") };
        curl_in(
            Some(&w.pod),
            &[
                "--interface",
                src,
                "--cacert",
                &cacert.display().to_string(),
                "--resolve",
                &resolve,
                &format!("https://{name}:{p}/"),
            ],
        )
    };
    // Allowed over IPv4 and IPv6 (the relay spreads connections over both gateways).
    let ca = bundle.path();
    let events = || gw1.events().into_iter().chain(gw2.events()).collect::<Vec<_>>();
    let decision = |f: &dyn Fn(&serde_json::Value) -> bool| {
        let mut found = None;
        wait_until(Duration::from_secs(5), || {
            found = events().into_iter().find(|e| e["event"] == "decision" && f(e));
            found.is_some()
        });
        found.unwrap()
    };
    assert_eq!(https("192.0.2.10", "allowed.test", "203.0.113.10", ca).status, 200);
    let r = https("2001:db8:2::10", "allowed.test", "2001:db8:113::10", ca);
    assert_eq!(r.status, 200, "{r:?}\n{}", gw1.log_text());
    let d = decision(&|e| e["client"]["address"] == "2001:db8:2::10");
    assert_eq!((d["decision"]["action"].as_str(), d["client"]["name"].as_str()), (Some("allow"), Some("web-1")));
    // SNI of a denied name to the allowed address: denied by the gateway (the decision says so;
    // curl failing alone would prove nothing, its certificate check fails too).
    let r = https("192.0.2.10", "denied.test", "203.0.113.10", ca);
    assert_ne!(r.exit, 0, "{r:?}");
    let d = decision(&|e| e["transparent"]["sni"] == "denied.test");
    assert_eq!(
        (d["decision"]["action"].as_str(), d["decision"]["reason"].as_str()),
        (Some("deny"), Some("no_rule_matched"))
    );
    // SNI of the allowed name sent to an arbitrary address reaches the allowed name's real address.
    assert_eq!(https("192.0.2.10", "allowed.test", "203.0.113.99", ca).status, 200);
    let e = decision(&|e| e["transparent"]["original_dst"] == format!("203.0.113.99:{p}"));
    assert_eq!(e["transparent"]["original_in_resolved"], false);
    let dialled = e["dialled"].as_str().unwrap_or_default().to_string();
    assert!(dialled.contains("203.0.113.10") || dialled.contains("2001:db8:113::10"), "{e}");

    // Fail over: the first endpoint dies, new connections go to the second.
    let killed = std::time::Instant::now();
    gw1.signal("KILL");
    let mut attempts = 0;
    loop {
        attempts += 1;
        if https("192.0.2.10", "allowed.test", "203.0.113.10", ca).status == 200 {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "no failover");
    }
    eprintln!("failover: first successful request {:?} after the kill ({attempts} attempt(s))", killed.elapsed());
    wait_until(Duration::from_secs(5), || gw2.events().iter().any(|e| e["event"] == "close"));
}

/// An endpoint that silently drops SYNs costs one connect timeout in total: it is marked down
/// after the first, new connections go to the healthy endpoint without trying it, and once it
/// answers again (the background probe sees it) traffic returns to it.
#[test]
fn a_silent_endpoint_costs_one_timeout_and_traffic_returns_when_it_answers() {
    let w = world();
    let dns = Dns::start_at(Some(&w.inet), "203.0.113.10:53".parse().unwrap(), &[("allowed.test", "203.0.113.10")]);
    let up = Upstream::start_in(&w.inet, "203.0.113.10");
    let p = up.addr.port();
    let body = format!(
        "{TRUSTED}\nclients: [{{cidr: 192.0.2.10/32, namespace: shop, name: web-1, labels: {{}}}}]\npolicies:\n  - {{apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {{name: w, namespace: shop}}, spec: {{podSelector: {{}}, rules: [{{to: [{{domain: allowed.test}}], ports: [{{port: {p}}}]}}]}}}}\n"
    );
    let (mut gw1, mut gw2) = (
        Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body),
        Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body),
    );
    let (g1, g2) = (gw1.transparent.port(), gw2.transparent.port());
    let dir = tempfile::tempdir().unwrap();
    let cfg = redirector_config(
        dir.path(),
        &format!(
            "nodeName: n\ngateways: [198.51.100.2:{g1}, 198.51.100.2:{g2}]\nadmin: 127.0.0.1:9792\nrelay: {{keyFile: $RELAY_KEY, connectTimeout: 1s, probeInterval: 500ms}}\nexcludeCidrs: [192.0.2.0/24, 198.51.100.0/24]\npods: [{{namespace: shop, name: web-1, nodeName: n, ips: [192.0.2.10]}}]\npolicies: [{{apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {{name: w, namespace: shop}}, spec: {{podSelector: {{}}, redirect: Transparent, rules: []}}}}]\n"
        ),
    );
    let _r = Proc(spawn_redirector(&w.node, &cfg, &[], Stdio::null()));
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    // gw1's port goes silent: its SYNs are dropped in the gateway's namespace.
    w.gw_ns.exec_ok("nft", &["add", "table", "inet", "silence"]);
    w.gw_ns.exec_ok("nft", &["add", "chain", "inet", "silence", "in", "{ type filter hook input priority 0; }"]);
    w.gw_ns.exec_ok("nft", &["add", "rule", "inet", "silence", "in", "tcp", "dport", &g1.to_string(), "drop"]);
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let get =
        || curl_in(Some(&w.pod), &["--max-time", "10", "--resolve", &resolve, &format!("http://allowed.test:{p}/")]);
    let failures = |ep: u16| {
        redirector_metric(
            &w.node,
            &format!("egress_redirector_endpoint_failures_total{{endpoint=\"198.51.100.2:{ep}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let started = std::time::Instant::now();
    for i in 0..6 {
        let r = get();
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        eprintln!("request {i} done after {:?}", started.elapsed());
    }
    assert_eq!(failures(g1), 1.0, "one connect to the silent endpoint timed out, the rest never tried it");
    let up_g1 = format!("egress_redirector_endpoint_up{{endpoint=\"198.51.100.2:{g1}\"}}");
    assert_eq!(redirector_metric(&w.node, &up_g1), Some(0.0));
    assert!(gw1.events().iter().all(|e| e["event"] != "decision"), "nothing reached the silent endpoint");
    // It answers again: the probe brings it back, and connections return to it.
    w.gw_ns.exec_ok("nft", &["delete", "table", "inet", "silence"]);
    wait_until(Duration::from_secs(10), || redirector_metric(&w.node, &up_g1) == Some(1.0));
    for i in 0..4 {
        assert_eq!(get().status, 200, "request {i} after recovery");
    }
    wait_until(Duration::from_secs(5), || gw1.events().iter().any(|e| e["event"] == "decision"));

    // Every gateway down: connections are refused at once, never sent direct.
    gw1.signal("KILL");
    gw2.signal("KILL");
    let before = up.hits();
    let mut refused = 0;
    while redirector_metric(&w.node, "egress_redirector_relay_refused_total{reason=\"no_endpoint\"} ").unwrap_or(0.0)
        < 1.0
    {
        let r = get();
        assert_ne!(r.status, 200, "{r:?}");
        refused += 1;
        assert!(refused < 20, "never refused for want of an endpoint");
    }
    assert_eq!(up.hits(), before, "nothing reached the upstream while every gateway was down");
}

/// Benchmark (not a test; `cargo test -p egress-e2e --test redirector -- --ignored --nocapture`):
/// a 100 MiB download and the new-connection rate through pod -> node relay -> gateway, against
/// the same Pod network with redirection off (the unselected address). Prints the ratios, the
/// CPU each hop costs, and the relay's cost against the floors of its design ([`NodeFloor`]).
/// Use release binaries: `EGRESS_GATEWAY_BIN=target/release/egress-gateway`
/// (the redirector is taken from the same folder). `EGRESS_BENCH=bulk|rate` runs one half;
/// `EGRESS_BENCH_PIN=1` puts the node (Pod clients, relay) on CPU 0 and the rest on CPU 1.
#[test]
#[ignore]
fn bench_redirected_vs_direct() {
    let w = world();
    // A and AAAA answers, as most public names have: the test DNS answers REFUSED for a type a
    // name lacks, which no resolver caches, so an A-only name would cost a query per connection.
    let records = [("allowed.test", "203.0.113.10"), ("allowed.test", "2001:db8:113::10")];
    let dns = Dns::start_at(Some(&w.inet), "203.0.113.10:53".parse().unwrap(), &records);
    let up = Upstream::start_in(&w.inet, "203.0.113.10");
    let p = up.addr.port();
    let body = format!(
        r#"
{TRUSTED}
clients:
  - {{cidr: 192.0.2.10/32, namespace: shop, name: web-1, labels: {{app: web}}}}
  - {{cidr: 127.0.0.1/32, namespace: shop, name: web-2, labels: {{app: web}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: web, namespace: shop}}
    spec: {{podSelector: {{}}, redirect: Transparent, rules: [{{to: [{{domain: allowed.test}}, {{cidr: 203.0.113.10/32}}], ports: [{{port: {p}}}]}}]}}
"#
    );
    let gw = Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body);
    let gw_http = gw.http;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("redirector.yaml");
    std::fs::write(&cfg, format!(
        "nodeName: n\ngateways: [198.51.100.2:{}]\nrelay: {{keyFile: {}}}\nexcludeCidrs: [192.0.2.0/24, 198.51.100.0/24]\npods: [{{namespace: shop, name: web-1, nodeName: n, ips: [192.0.2.10], labels: {{}}}}]\npolicies: [{{apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {{name: w, namespace: shop}}, spec: {{podSelector: {{}}, redirect: Transparent, rules: []}}}}]\n",
        gw.transparent.port(),
        relay_key_file().display()
    )).unwrap();
    let child = spawn_redirector(&w.node, &cfg, &[], Stdio::null());
    let pids = [child.id(), gw.pid()];
    let _r = Proc(child);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    // EGRESS_BENCH_PIN=1: the node on CPU 0 (the Pod's clients and the relay), the rest of the
    // world on CPU 1 (gateway, upstream, DNS), as if the gateway ran on another machine. The
    // direct path then has its client on CPU 0 and the upstream on CPU 1. (Kernel work still
    // runs where the sending thread runs, so the split is close, not exact.)
    let pinned = std::env::var("EGRESS_BENCH_PIN").is_ok_and(|v| v == "1");
    if pinned {
        pin(pids[0], 0);
        pin(pids[1], 1);
        pin(dns.pid(), 1);
        up.pin_to(1);
        pin(0, 0); // this thread: curl and the client threads inherit it
    }
    let url = format!("http://allowed.test:{p}/bytes/104857600");
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let bulk = |src: &str| {
        let cpu = CpuSample::now(pids);
        let mut v: Vec<f64> = (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                let r = curl_in(Some(w.pod_of(src)), &["--resolve", &resolve, "-o", "/dev/null", &url]);
                assert_eq!(r.status, 200);
                100.0 / t.elapsed().as_secs_f64()
            })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[2], cpu.until_now(500.0 / 1024.0))
    };
    let rate = |src: &'static str| {
        let target: std::net::SocketAddr = format!("203.0.113.10:{p}").parse().unwrap();
        let cpu = CpuSample::now(pids);
        let n = w.pod_of(src).enter(move || {
            // Spawned from a pinned thread when EGRESS_BENCH_PIN=1: the threads inherit CPU 0.
            connections_for_5s(move || get_1k(connect_from(src, target)))
        });
        (n as f64 / 5.0, cpu.until_now(n as f64))
    };
    // EGRESS_BENCH=rate skips the downloads, =bulk the connection rate (to profile one alone).
    if pinned {
        eprintln!("pinned: Pod clients and relay on CPU 0; gateway, upstream and DNS on CPU 1");
    }
    let only = std::env::var("EGRESS_BENCH").unwrap_or_default();
    if only != "rate" {
        let ((r, rc), (d, dc)) = (bulk("192.0.2.10"), bulk("192.0.2.11"));
        eprintln!("bulk 100 MiB: redirected {r:.0} MiB/s, direct {d:.0} MiB/s, ratio {:.2}", r / d);
        eprintln!("  CPU s/GiB   redirected: {rc}\n              direct:     {dc}");
        eprintln!("  CPU-bound ceiling of the ratio on these cores: {:.2}", dc.total / rc.total);
        let floor = NodeFloor::start(&w, Floor::Relay(format!("203.0.113.10:{p}").parse().unwrap()));
        let url = format!("http://{}/bytes/104857600", floor.listener.local_addr().unwrap());
        let before = floor.cpu();
        for _ in 0..5 {
            // The floor relays one exchange per connection: the upstream must close after it.
            assert_eq!(curl_in(Some(&w.pod2), &["-H", "Connection: close", "-o", "/dev/null", &url]).status, 200);
        }
        let relayed = (floor.cpu() - before) / (500.0 / 1024.0);
        eprintln!(
            "node floor, CPU s/GiB of one blocking thread on the node splicing the download over a second \
             connection: {relayed:.3}; the relay: {:.3} ({:.2}x the floor)",
            rc.relay,
            rc.relay / relayed
        );
    }
    if only != "bulk" {
        let ((r, rc), (d, dc)) = (rate("192.0.2.10"), rate("192.0.2.11"));
        eprintln!("new connections (8 parallel): redirected {r:.0}/s, direct {d:.0}/s, ratio {:.2}", r / d);
        let us = |c: Cpu| Cpu {
            relay: c.relay * 1e6,
            gateway: c.gateway * 1e6,
            rest: c.rest * 1e6,
            total: c.total * 1e6,
            ..c
        };
        eprintln!("  CPU us/conn redirected: {}\n              direct:     {}", us(rc), us(dc));
        eprintln!("  CPU-bound ceiling of the ratio on these cores: {:.2}", dc.total / rc.total);
        // The same requests as explicit CONNECTs to the gateway (from inside its namespace, a
        // client of the same policy): the gateway's CPU per connection on its CONNECT front,
        // to hold its transparent front's against, in the same run.
        let cpu = CpuSample::now(pids);
        let n = w.gw_ns.enter(move || {
            connections_for_5s(move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(gw_http).unwrap();
                s.write_all(format!("CONNECT allowed.test:{p} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n").as_bytes())
                    .unwrap();
                let mut head = [0u8; 256];
                let k = s.read(&mut head).unwrap();
                assert!(head[..k].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head[..k]));
                get_1k(s)
            })
        });
        let cc = cpu.until_now(n as f64);
        eprintln!("CONNECT to the gateway (8 parallel): {:.0}/s", n as f64 / 5.0);
        eprintln!(
            "  gateway CPU us/conn: CONNECT {:.1}, transparent {:.1} (ratio {:.2})",
            cc.gateway * 1e6,
            rc.gateway * 1e6,
            rc.gateway / cc.gateway
        );
        let upstream = format!("203.0.113.10:{p}").parse().unwrap();
        let [answer, relayed, shared] =
            [Floor::Answer, Floor::Relay(upstream), Floor::Shared(upstream)].map(|f| NodeFloor::per_connection(&w, f));
        eprintln!(
            "node floors, CPU us/conn of one blocking thread on the node: answering the GET itself {answer:.1}; \
             relaying it over a second connection {relayed:.1}, over one shared connection {shared:.1}; \
             the relay: {:.1} ({:.2}x the floor of its design)",
            rc.relay * 1e6,
            rc.relay * 1e6 / relayed
        );
    }
}

/// How a [`NodeFloor`] serves a Pod's connection.
#[derive(Clone, Copy)]
enum Floor {
    /// Answers the request itself (a 1 KiB body).
    Answer,
    /// Connects to the upstream, passes the request on, splices the answer back (through one
    /// pipe, made once) and closes both: a relay with a second connection per Pod connection.
    Relay(std::net::SocketAddr),
    /// Passes the request on over one keep-alive connection to the upstream, made once, and
    /// copies the answer back: a relay over a link shared by every Pod connection (what a
    /// multiplexed node-gateway link would cost, its framing aside).
    Shared(std::net::SocketAddr),
}

/// The least CPU a node can spend on the connections of a Pod's that it terminates in user space,
/// measured the way the relay's is: one blocking thread in the node namespace (no event loop)
/// serves the unselected Pod's connections to a node address, one at a time, as [`Floor`] says.
/// Its kernel work (the TCP connections, and the receive processing that veth runs in the
/// sender's context) is what any design that terminates the Pod's TCP on the node pays.
struct NodeFloor {
    listener: std::net::TcpListener,
    tid: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl NodeFloor {
    fn start(w: &World, how: Floor) -> NodeFloor {
        use std::io::{Read, Write};
        use std::os::fd::{AsFd, BorrowedFd};
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let server = w.node.spawn({
            let stop = stop.clone();
            move || {
                let listener = std::net::TcpListener::bind("192.0.2.1:0").unwrap();
                let tid = rustix::thread::gettid().as_raw_nonzero().get();
                tx.send((listener.try_clone().unwrap(), tid)).unwrap();
                let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n".to_vec();
                answer.extend_from_slice(&[b'x'; 1024]);
                let (pipe_r, pipe_w) = rustix::pipe::pipe().unwrap();
                let mut shared = match how {
                    Floor::Shared(to) => Some(std::net::TcpStream::connect(to).unwrap()),
                    _ => None,
                };
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = listener.accept() else { continue };
                    let mut got = 0;
                    while !buf[..got].ends_with(b"\r\n\r\n") {
                        match s.read(&mut buf[got..]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got += n,
                        }
                    }
                    if !buf[..got].ends_with(b"\r\n\r\n") {
                        continue;
                    }
                    match how {
                        Floor::Answer => {
                            let _ = s.write_all(&answer);
                        }
                        Floor::Relay(to) => {
                            let Ok(mut up) = std::net::TcpStream::connect(to) else { continue };
                            let _ = up.write_all(&buf[..got]);
                            let splice = |from: BorrowedFd, to: BorrowedFd| {
                                rustix::pipe::splice(from, None, to, None, 1 << 16, rustix::pipe::SpliceFlags::empty())
                            };
                            while let Ok(n @ 1..) = splice(up.as_fd(), pipe_w.as_fd()) {
                                let mut left = n;
                                while left > 0 {
                                    left -= splice(pipe_r.as_fd(), s.as_fd()).expect("splice to the Pod");
                                }
                            }
                        }
                        Floor::Shared(_) => {
                            let up = shared.as_mut().unwrap();
                            let request = String::from_utf8_lossy(&buf[..got])
                                .replace("Connection: close", "Connection: keep-alive");
                            up.write_all(request.as_bytes()).unwrap();
                            // The answer: its head, then Content-Length bytes.
                            let mut got = 0;
                            let head = loop {
                                got += up.read(&mut buf[got..]).unwrap();
                                if let Some(i) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n") {
                                    break i + 4;
                                }
                            };
                            let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
                            let length: usize = text
                                .split("content-length: ")
                                .nth(1)
                                .unwrap()
                                .split("\r\n")
                                .next()
                                .unwrap()
                                .parse()
                                .unwrap();
                            while got < head + length {
                                got += up.read(&mut buf[got..]).unwrap();
                            }
                            let _ = s.write_all(&buf[..got]);
                        }
                    }
                }
            }
        });
        let (listener, tid) = rx.recv().unwrap();
        NodeFloor { listener, tid, stop, server: Some(server) }
    }

    /// On-CPU seconds of the serving thread so far.
    fn cpu(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/self/task/{}/schedstat", self.tid)).unwrap();
        s.split_whitespace().next().unwrap().parse::<f64>().unwrap() / 1e9
    }

    /// CPU microseconds per connection over 5 seconds of `get_1k` from 8 threads of the Pod.
    fn per_connection(w: &World, how: Floor) -> f64 {
        let floor = NodeFloor::start(w, how);
        let (addr, before) = (floor.listener.local_addr().unwrap(), floor.cpu());
        let n =
            w.pod_of("192.0.2.11").enter(move || connections_for_5s(move || get_1k(connect_from("192.0.2.11", addr))));
        (floor.cpu() - before) * 1e6 / n as f64
    }
}

impl Drop for NodeFloor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the server's accept (with an error) to see the flag.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Opens connections with `one` from 8 threads for 5 seconds; returns how many completed.
fn connections_for_5s(one: impl Fn() + Clone + Send + 'static) -> u64 {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let one = one.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while std::time::Instant::now() < until {
                    one();
                    n += 1;
                }
                n
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

/// One `GET /bytes/1024` on `s` (closing it), checked for a 200.
fn get_1k(mut s: std::net::TcpStream) {
    use std::io::{Read, Write};
    s.write_all(b"GET /bytes/1024 HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
}

/// CPU spent during a benchmark phase, per unit of work (GiB or connection): the relay's and the
/// gateway's processes (user + system, from /proc/PID/stat), everything else the machine did
/// (clients, upstream, softirq in other contexts), the machine's total, and how many of its cores
/// were busy on average. When the machine is saturated, the ratio of two phases' totals bounds
/// their throughput ratio: the redirected path cannot do better than `direct.total / redirected.total`.
#[derive(Clone, Copy)]
struct Cpu {
    relay: f64,
    gateway: f64,
    rest: f64,
    total: f64,
    busy_cores: f64,
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "relay {:.3}, gateway {:.3}, clients+upstream+kernel {:.3}, total {:.3} ({:.2} cores busy)",
            self.relay, self.gateway, self.rest, self.total, self.busy_cores
        )
    }
}

struct CpuSample {
    pids: [u32; 2],
    procs: [f64; 2],
    busy: f64,
    at: std::time::Instant,
}

impl CpuSample {
    fn now(pids: [u32; 2]) -> CpuSample {
        CpuSample { pids, procs: pids.map(process_cpu), busy: machine_busy(), at: std::time::Instant::now() }
    }

    fn until_now(&self, units: f64) -> Cpu {
        let wall = self.at.elapsed().as_secs_f64();
        let [relay, gateway] = [0, 1].map(|i| process_cpu(self.pids[i]) - self.procs[i]);
        let total = machine_busy() - self.busy;
        Cpu {
            relay: relay / units,
            gateway: gateway / units,
            rest: (total - relay - gateway) / units,
            total: total / units,
            busy_cores: total / wall,
        }
    }
}

fn clock_ticks() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// On-CPU time of a process's threads, in seconds (schedstat: nanoseconds, where /proc/PID/stat
/// counts 10 ms ticks).
fn process_cpu(pid: u32) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .map(|s| s.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum();
    ns as f64 / 1e9
}

/// Seconds every core of the machine spent not idle (user, nice, system, irq, softirq, steal).
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<f64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
    let (idle, iowait) = (f[3], f[4]);
    (f[..8].iter().sum::<f64>() - idle - iowait) / clock_ticks()
}

/// Kubernetes mode: Pods on the node, policies and the gateway's EndpointSlices come from a
/// scripted API server (running inside the node namespace); a label change stops the steering.
/// The Pod condition `egress.dev/redirected` (for a readiness gate) is written only once the
/// Pod's address is in the kernel's set, and only on Pods that are steered or wait for it.
#[test]
fn kubernetes_inputs_drive_the_table_and_the_relay() {
    use egress_e2e::kubeapi::*;
    use serde_json::json;
    let w = world();
    let dns = Dns::start_at(Some(&w.inet), "203.0.113.10:53".parse().unwrap(), &[("allowed.test", "203.0.113.10")]);
    let up = Upstream::start_in(&w.inet, "203.0.113.10");
    let p = up.addr.port();
    let body = format!(
        r#"
{TRUSTED}
clients: [{{cidr: 192.0.2.0/24, namespace: shop, name: any, labels: {{}}}}]
policies:
  - {{apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {{name: web, namespace: shop}}, spec: {{podSelector: {{}}, rules: [{{to: [{{domain: allowed.test}}], ports: [{{port: {p}}}]}}]}}}}
"#
    );
    let gw = Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body);
    let api = w.node.enter(FakeApi::start);
    api.apply(NAMESPACES, namespace("shop", json!({})));
    let mut web = pod("shop", "web-1", &["192.0.2.10"], json!({"app": "web"}), "Running");
    web["spec"]["nodeName"] = json!("node-1");
    web["spec"]["readinessGates"] = json!([{"conditionType": "egress.dev/redirected"}]);
    api.apply(PODS, web.clone());
    // On this node, not selected, no readiness gate: never written.
    let mut db = pod("shop", "db-1", &["192.0.2.12"], json!({"app": "db"}), "Running");
    db["spec"]["nodeName"] = json!("node-1");
    api.apply(PODS, db);
    // At the moment each Pod status is written: is web-1's address in the kernel's set?
    let seen: Arc<Mutex<Vec<(String, String, bool)>>> = Arc::default();
    let (seen2, node_name) = (seen.clone(), w.node.name.clone());
    api.on_patch(move |p| {
        let out = Command::new("ip")
            .args(["netns", "exec", &node_name, "nft", "list", "set", "inet", "egress_redirector", "selected_v4"])
            .output()
            .unwrap();
        let in_set = String::from_utf8_lossy(&out.stdout).contains("192.0.2.10");
        let c = &p.body["status"]["conditions"][0];
        seen2.lock().unwrap().push((p.path.clone(), c["status"].as_str().unwrap_or("").to_string(), in_set));
    });
    // A Transparent policy that does not decode (a port by name in a rule) and one that is
    // invalid (a bad domain): the gateway skips both whole, and both still steer the Pods they
    // select, so that those Pods' traffic is denied at the gateway instead of leaving directly.
    for (name, ip, bad_rule) in [
        ("legacy", "192.0.2.14", json!({"to": [{"domain": "allowed.test"}], "ports": [{"port": "http"}]})),
        ("broken", "192.0.2.15", json!({"to": [{"domain": "a.*.b"}]})),
    ] {
        let mut p = pod("shop", &format!("{name}-1"), &[ip], json!({"app": name}), "Running");
        p["spec"]["nodeName"] = json!("node-1");
        api.apply(PODS, p);
        api.apply(POLICIES, transparent_policy(name, name, json!([bad_rule])));
    }
    let mut elsewhere = pod("shop", "web-2", &["192.0.2.11"], json!({"app": "web"}), "Running");
    elsewhere["spec"]["nodeName"] = json!("node-2");
    api.apply(PODS, elsewhere);
    api.apply(POLICIES, transparent_policy("steer", "web", json!([])));
    api.apply(SLICES, gateway_slice(gw.transparent.port(), true));
    // Another Service's slice in the same namespace: its endpoints must never be relayed to (the
    // redirector lists slices by the gateway Service's label; the scripted API applies selectors).
    api.apply(SLICES, json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "other-xyz", "namespace": "egress-system", "labels": {"kubernetes.io/service-name": "other"}},
        "ports": [{"name": "transparent", "port": 9, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["198.51.100.99"], "conditions": {"ready": true}}]}));
    let dir = tempfile::tempdir().unwrap();
    let cfg = kube_redirector_config(dir.path(), &api, "admin: 127.0.0.1:9791\n");
    let log_path = dir.path().join("redirector.log");
    let child = spawn_redirector(&w.node, &cfg, &[], std::fs::File::create(&log_path).unwrap());
    let _r = Proc(child);
    wait_until(Duration::from_secs(10), || selected_set(&w.node).contains("192.0.2.10"));
    let set = selected_set(&w.node);
    assert!(set.contains("192.0.2.14") && set.contains("192.0.2.15"), "undecodable and invalid policies steer: {set}");
    let t = node_table(&w.node).unwrap();
    assert!(!t.contains("192.0.2.11"), "a Pod of another node is not steered (nor known): {t}");
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let get = |src: &str| curl_in(Some(w.pod_of(src)), &["--resolve", &resolve, &format!("http://allowed.test:{p}/")]);
    let r = get("192.0.2.10");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "198.51.100.2", "through the gateway");
    // Reported on the Pod, after the address was in the set.
    let condition = |name: &str| {
        api.object(PODS, "shop", name).and_then(|p| {
            p["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "egress.dev/redirected").cloned())
        })
    };
    wait_until(Duration::from_secs(10), || condition("web-1").is_some_and(|c| c["status"] == "True"));
    let c = condition("web-1").unwrap();
    assert_eq!(c["reason"], "Redirected", "{c}");
    assert!(c["lastTransitionTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{c}");
    // web-1's writes (legacy-1 and broken-1, steered too, get theirs).
    let web_1 = || -> Vec<(String, String, bool)> {
        seen.lock().unwrap().iter().filter(|(path, ..)| path.ends_with("/pods/web-1/status")).cloned().collect()
    };
    wait_until(Duration::from_secs(10), || {
        ["legacy-1", "broken-1"].iter().all(|n| condition(n).is_some_and(|c| c["status"] == "True"))
    });
    assert_eq!(
        web_1(),
        vec![("/api/v1/namespaces/shop/pods/web-1/status".to_string(), "True".to_string(), true)],
        "written once, after the address was in the kernel's set"
    );
    // The gateway's endpoint turns `ready: false`: the relay stops using it (the connection is
    // refused, never sent direct); ready again, it is used again.
    let admin: std::net::SocketAddr = "127.0.0.1:9791".parse().unwrap();
    let metrics = || w.node.enter(move || admin_get(admin, "/metrics")).map(|r| r.1).unwrap_or_default();
    let endpoints: Vec<String> =
        metrics().lines().filter(|l| l.starts_with("egress_redirector_endpoint_up{")).map(str::to_string).collect();
    assert_eq!(
        endpoints,
        vec![format!("egress_redirector_endpoint_up{{endpoint=\"198.51.100.2:{}\"}} 1", gw.transparent.port())]
    );
    let gw_ep = format!("egress_redirector_endpoint_up{{endpoint=\"198.51.100.2:{}\"}}", gw.transparent.port());
    let slice = |ready: bool| gateway_slice(gw.transparent.port(), ready);
    api.apply(SLICES, slice(false));
    wait_until(Duration::from_secs(10), || !metrics().contains(&gw_ep));
    let before = up.hits();
    assert_ne!(get("192.0.2.10").status, 200);
    assert_eq!(up.hits(), before, "nothing direct without an endpoint");
    assert!(metrics().contains("egress_redirector_relay_refused_total{reason=\"no_endpoint\"} 1"), "{}", metrics());
    api.apply(SLICES, slice(true));
    wait_until(Duration::from_secs(10), || metrics().contains(&format!("{gw_ep} 1")));
    assert_eq!(get("192.0.2.10").status, 200);
    // The API goes down: the table and the endpoints stay; steering goes on.
    let handle = table_handle(&w.node);
    api.set_down(true);
    let r = get("192.0.2.10");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "198.51.100.2");
    assert_eq!(table_handle(&w.node), handle);
    api.set_down(false);

    // The Pod's labels change: no longer selected, no longer steered — by removing the set
    // element, not by replacing the table (same table handle).
    let handle = table_handle(&w.node);
    web["metadata"]["labels"] = json!({"app": "batch"});
    api.apply(PODS, web);
    wait_until(Duration::from_secs(10), || !selected_set(&w.node).contains("192.0.2.10"));
    assert_eq!(table_handle(&w.node), handle, "membership changes are incremental");
    // Its readiness gate now says why it is not steered (written after the removal).
    wait_until(Duration::from_secs(10), || condition("web-1").is_some_and(|c| c["status"] == "False"));
    assert_eq!(condition("web-1").unwrap()["reason"], "NotSelected");
    assert_eq!(
        web_1().last().unwrap(),
        &("/api/v1/namespaces/shop/pods/web-1/status".to_string(), "False".to_string(), false)
    );
    assert!(condition("db-1").is_none(), "an unselected Pod without the gate is not written");
    // The two broken policies were logged once each, not at every one of these rebuilds.
    let log = std::fs::read_to_string(&log_path).unwrap();
    for (what, policy) in [("policy does not decode", "shop/legacy"), ("invalid policy", "shop/broken")] {
        let n = log.lines().filter(|l| l.contains(what) && l.contains(policy)).count();
        assert_eq!(n, 1, "{what} {policy}:\n{log}");
    }
    assert_eq!(web_1().len(), 2, "one write per change: {:?}", web_1());
    // The admin endpoint (inside the node namespace) reports readiness and the change.
    let admin: std::net::SocketAddr = "127.0.0.1:9791".parse().unwrap();
    assert_eq!(w.node.enter(move || admin_get(admin, "/readyz")).map(|r| r.0), Some(200));
    let metrics = w.node.enter(move || admin_get(admin, "/metrics")).unwrap().1;
    assert!(metrics.contains("egress_redirector_selected_addresses 2"), "legacy-1 and broken-1: {metrics}");
    // Three changes: the endpoint unready, ready again, the Pod's labels.
    assert!(metrics.contains("egress_redirector_table_updates_total 3"), "{metrics}");
    assert!(metrics.contains("egress_redirector_relay_pipe_refused_total 0"), "relay paths are exported: {metrics}");
    assert!(
        metrics.contains("egress_redirector_apply_seconds_count 3"),
        "time from each API event to its rules: {metrics}"
    );
    let r = get("192.0.2.10");
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "192.0.2.10", "direct again");
    // The CNI plugin asks about a Pod the watch has not shown: the redirector asks the API (a
    // cache miss), which does not know it either: the sandbox fails, to be retried.
    let (code, e) = cni_add_unshown(dir.path(), "ghost-sandbox", "ghost");
    assert_eq!(code, 1, "{e}");
    assert_eq!(e["msg"], "egress node-redirector cannot admit shop/ghost", "{e}");
    assert!(e["details"].as_str().unwrap().contains("Pod shop/ghost does not exist"), "{e}");
    // Every API request it made is allowed by its minimal RBAC (the chart renders the same rules).
    let rbac = std::fs::read_to_string(repo_root().join("deploy/node-redirector-rbac.yaml")).unwrap();
    let seen = egress_e2e::rbac::assert_covered(&api.requests(), &rbac, "deploy/node-redirector-rbac.yaml");
    for needed in [
        "list pods",
        "watch pods",
        "list namespaces",
        "list egresspolicies",
        "list endpointslices",
        "patch pods/status",
        "get pods",
    ] {
        assert!(seen.contains(needed), "{needed} not exercised: {seen:?}");
    }
}

/// An operator trimmed the redirector's RBAC of `patch pods/status` and `get pods`: steering is
/// unaffected (the selected Pod's address is in the kernel's set), the forbidden condition write
/// is logged and tried again at the next application or reconcile, never in a loop, and the CNI
/// plugin's cache miss fails the sandbox with the API's refusal in its error (the kubelet retries
/// it; nothing starts unsteered).
#[test]
fn a_forbidden_status_write_costs_the_condition_never_the_steering() {
    use egress_e2e::kubeapi::*;
    use serde_json::json;
    let w = world();
    let api = w.node.enter(FakeApi::start);
    let rbac = std::fs::read_to_string(repo_root().join("deploy/node-redirector-rbac.yaml")).unwrap();
    let trimmed =
        rbac.replace("  - apiGroups: [\"\"]\n    resources: [pods/status]\n    verbs: [patch]\n", "").replace(
            "    resources: [pods]\n    verbs: [get, list, watch]\n",
            "    resources: [pods]\n    verbs: [list, watch]\n",
        );
    assert!(
        !trimmed.contains("resources: [pods/status]\n    verbs: [patch]")
            && trimmed.contains("resources: [pods]\n    verbs: [list, watch]"),
        "both rules were in the manifest: {trimmed}"
    );
    api.set_rbac(&[&trimmed]);
    api.apply(NAMESPACES, namespace("shop", json!({})));
    let mut web = pod("shop", "web-1", &["192.0.2.10"], json!({"app": "web"}), "Running");
    web["spec"]["nodeName"] = json!("node-1");
    web["spec"]["readinessGates"] = json!([{"conditionType": "egress.dev/redirected"}]);
    api.apply(PODS, web);
    api.apply(POLICIES, transparent_policy("steer", "web", json!([])));
    api.apply(SLICES, gateway_slice(15080, true));
    let dir = tempfile::tempdir().unwrap();
    let cfg = kube_redirector_config(dir.path(), &api, "");
    let log_path = dir.path().join("redirector.log");
    let child = spawn_redirector(&w.node, &cfg, &["--reconcile", "500ms"], std::fs::File::create(&log_path).unwrap());
    let mut redirector = Proc(child);
    wait_until(Duration::from_secs(10), || selected_set(&w.node).contains("192.0.2.10"));
    let patch = "PATCH /api/v1/namespaces/shop/pods/web-1/status";
    let refused = || api.forbidden().iter().filter(|l| l.starts_with(patch)).count();
    wait_until(Duration::from_secs(10), || refused() >= 2);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("cannot write the egress.dev/redirected condition; retrying"), "{log}");
    // Retried at the reconciles (every 500 ms), not in a loop: a few in two seconds, not hundreds.
    let before = refused();
    std::thread::sleep(Duration::from_secs(2));
    let retries = refused() - before;
    assert!(retries <= 10, "{retries} retries in 2 s");
    assert_eq!(
        api.forbidden().iter().filter(|l| !l.starts_with(patch)).count(),
        0,
        "nothing else was refused: {:?}",
        api.forbidden()
    );
    // The CNI plugin asks about a Pod the watch has not shown: the GET is refused.
    let (code, e) = cni_add_unshown(dir.path(), "new-sandbox", "web-2");
    assert_eq!(code, 1, "{e}");
    assert_eq!(e["msg"], "egress node-redirector cannot admit shop/web-2", "{e}");
    assert!(e["details"].as_str().unwrap().contains("forbidden"), "{e}");
    assert!(
        api.forbidden().iter().any(|l| l.starts_with("GET /api/v1/namespaces/shop/pods/web-2")),
        "{:?}",
        api.forbidden()
    );
    assert!(redirector.0.try_wait().unwrap().is_none(), "still running:\n{log}");
    assert!(selected_set(&w.node).contains("192.0.2.10"), "still steered");
}

/// The commented standalone example next to the gateway's validates and renders: the selected
/// Pod of this node is steered, the unselected one and the other node's are not.
#[test]
fn the_standalone_example_validates_and_renders() {
    let example = repo_root().join("examples/node-redirector.yaml");
    let run = |cmd: &str| {
        let out =
            Command::new(workspace_bin("node-redirector")).args([cmd, "--config"]).arg(&example).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(run("validate").contains("ok (1 policies)"));
    let rules = run("render");
    let selected = rules.lines().find(|l| l.contains("set selected_v4")).unwrap();
    assert!(
        selected.contains("10.244.1.5") && !selected.contains("10.244.1.6") && !selected.contains("10.244.2.7"),
        "{selected}"
    );
    assert!(rules.contains("10.0.0.10 . 15080, 10.0.0.11 . 15080"), "{rules}");
}

/// DNS-aware steering: the node's forwarder answers the selected Pod's DNS and remembers what it
/// resolved; a connection whose payload names nothing (HTTP/1.0 without Host here) is allowed
/// when a name the Pod resolved to that address is, and only then; a name's pairs expire after
/// TTL + grace while a connection opened before keeps relaying.
#[test]
fn the_names_a_pod_resolved_decide_what_its_payload_does_not_name() {
    let w = world();
    w.inet.exec_ok("ip", &["addr", "add", "203.0.113.20/32", "dev", "lo"]);
    let (_dns, up, gw, dir) = standalone_with_dns(
        &w,
        &[("blocked.test", "203.0.113.20"), ("alias.test", "203.0.113.10")],
        "",
        "dns: {grace: 3s}",
    );
    let p = up.addr.port();
    let log = std::fs::File::create(dir.path().join("redirector.log")).unwrap();
    let _redirector =
        Proc(spawn_redirector(&w.node, &dir.path().join("redirector.yaml"), &["--reconcile", "500ms"], log));
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    let t = node_table(&w.node).unwrap();
    // To the forwarder at the node's first usable address (no default route here: the first
    // interface's, the node end of web-1's veth), which its UDP socket is bound to.
    assert!(
        t.contains("ip daddr 203.0.113.10 meta l4proto { tcp, udp } th dport 53 dnat ip to 192.0.2.1:15053"),
        "{t}"
    );
    let nameless = "GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let to = |ip: &str| format!("{ip}:{p}");

    // Nothing resolved yet: the address alone allows nothing.
    let (first, _) = exchange_from_pod(&w.pod, &to("203.0.113.10"), nameless, 0.0, "");
    assert!(!first.contains("200"), "{first:?}");
    // A name no rule allows, resolved to its own address: still nothing.
    assert_eq!(lookup_from_pod(&w.pod, "blocked.test", false), ["203.0.113.20"]);
    let (first, _) = exchange_from_pod(&w.pod, &to("203.0.113.20"), nameless, 0.0, "");
    assert!(!first.contains("200"), "{first:?}");
    let d = gw.decision(|e| e["transparent"]["original_dst"] == to("203.0.113.20"));
    assert_eq!(
        (d["decision"]["action"].as_str(), &d["transparent"]["dns_names"]),
        (Some("deny"), &serde_json::json!(["blocked.test"]))
    );

    // The allowed name, over UDP: the address it answered is reachable, on the rule's port
    // only, dialled from the gateway; a connection opened now outlives the name's expiry.
    assert_eq!(lookup_from_pod(&w.pod, "allowed.test", false), ["203.0.113.10"]);
    let (first, second) = exchange_from_pod(&w.pod, &to("203.0.113.10"), nameless, 4.5, nameless);
    assert!(first.contains("200"), "{first:?}\n{}", gw.log_text());
    assert!(second.contains("200"), "the open connection keeps relaying after expiry: {second:?}");
    let d = gw.decision(|e| e["transparent"]["dns_name"] == "allowed.test");
    assert_eq!((d["front"].as_str(), d["client"]["name"].as_str()), (Some("transparent"), Some("web-1")));
    assert_eq!(d["transparent"]["dns_names"], serde_json::json!(["allowed.test"]));
    assert_eq!(d["dialled"], to("203.0.113.10"));
    assert_eq!(up.peers().last().unwrap().ip().to_string(), "198.51.100.2", "from the gateway");
    // Expired now (TTL 0 + grace 3s): a new connection is denied.
    let (first, _) = exchange_from_pod(&w.pod, &to("203.0.113.10"), nameless, 0.0, "");
    assert!(!first.contains("200"), "after TTL + grace: {first:?}");

    // Over TCP too; then another port of the same address is not allowed by the name.
    assert_eq!(lookup_from_pod(&w.pod, "alias.test", true), ["203.0.113.10"]);
    assert_eq!(lookup_from_pod(&w.pod, "allowed.test", true), ["203.0.113.10"]);
    let (first, _) = exchange_from_pod(&w.pod, &to("203.0.113.10"), nameless, 0.0, "");
    assert!(first.contains("200"), "{first:?}");
    let d = gw.decision(|e| e["transparent"]["dns_names"] == serde_json::json!(["allowed.test", "alias.test"]));
    assert_eq!(d["transparent"]["dns_name"], "allowed.test");
    let (first, _) = exchange_from_pod(&w.pod, &format!("203.0.113.10:{}", p + 1), nameless, 0.0, "");
    assert!(!first.contains("200"), "{first:?}");
    let recorded = |t: &str| {
        redirector_metric(
            &w.node,
            &format!("egress_redirector_dns_queries_total{{transport=\"{t}\",result=\"recorded\"}} "),
        )
    };
    assert!(recorded("udp").is_some_and(|n| n >= 2.0) && recorded("tcp").is_some_and(|n| n >= 2.0));
}

/// The forwarder binds the name the Pod asked for to the end of its CNAME chain and to every
/// address of a many-address answer; a Pod that floods it with distinct names keeps its memory
/// bounded (least recently answered names evicted) while DNS keeps answering.
#[test]
fn cname_chains_many_addresses_and_a_flood_of_names() {
    let w = world();
    let wide: Vec<String> = (100..164).map(|i| format!("203.0.113.{i}")).collect();
    for ip in ["203.0.113.100", "203.0.113.131", "203.0.113.163"] {
        w.inet.exec_ok("ip", &["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    let mut records: Vec<(&str, &str)> =
        vec![("target.test", "203.0.113.10"), ("alias.test", "target.test"), ("*.flood.test", "203.0.113.30")];
    records.extend(wide.iter().map(|ip| ("wide.test", ip.as_str())));
    let gateway_policy = r#"
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {name: names, namespace: shop}
    spec:
      podSelector: {matchLabels: {app: web}}
      rules: [{name: by-name, to: [{domain: alias.test}, {domain: wide.test}]}]
"#;
    let (_dns, up, gw, dir) = standalone_with_dns(&w, &records, gateway_policy, "");
    let p = up.addr.port();
    let log = std::fs::File::create(dir.path().join("redirector.log")).unwrap();
    let redirector =
        Proc(spawn_redirector(&w.node, &dir.path().join("redirector.yaml"), &["--reconcile", "500ms"], log));
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    let nameless = "GET /x HTTP/1.0\r\n\r\n";

    // alias.test -> CNAME target.test -> 203.0.113.10: the policy on alias.test allows it.
    assert_eq!(lookup_from_pod(&w.pod, "alias.test", false), ["203.0.113.10"]);
    let (first, _) = exchange_from_pod(&w.pod, &format!("203.0.113.10:{p}"), nameless, 0.0, "");
    assert!(first.contains("200"), "{first:?}\n{}", gw.log_text());
    let d = gw.decision(|e| e["transparent"]["dns_name"] == "alias.test");
    assert_eq!(d["transparent"]["dns_names"], serde_json::json!(["alias.test"]), "target.test binds nothing");

    // 64 addresses in one answer (over TCP, as a stub resolver retries a truncated UDP answer):
    // each is allowed after that one lookup.
    let mut answered = lookup_from_pod(&w.pod, "wide.test", true);
    answered.sort();
    let mut expected = wide.clone();
    expected.sort();
    assert_eq!(answered, expected);
    for ip in ["203.0.113.100", "203.0.113.131", "203.0.113.163"] {
        let _ = exchange_from_pod(&w.pod, &format!("{ip}:{p}"), nameless, 0.0, "");
        let d = gw.decision(|e| e["transparent"]["original_dst"] == format!("{ip}:{p}"));
        assert_eq!(
            (d["decision"]["action"].as_str(), d["transparent"]["dns_name"].as_str()),
            (Some("allow"), Some("wide.test")),
            "{ip}"
        );
    }

    // UDP to port 53 of another address is still dropped (only the cluster resolver is forwarded).
    let query = "12340100000100000000000007616c6c6f77656404746573740000010001";
    assert_eq!(udp_probe(&w.pod, "192.0.2.10", "203.0.113.99", 53, query), "silence");

    // A flood of 100k distinct names: the table keeps at most dns.maxNamesPerPod (2000) and
    // evicts the rest; memory stays flat; DNS keeps answering.
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", redirector.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = rss();
    let flood = r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.10", 0)); s.settimeout(1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
got = 0
for batch in range(1000):
    for i in range(100):
        n = batch * 100 + i
        name = b"".join(bytes([len(l)]) + l.encode() for l in ("n%d" % n, "flood", "test")) + b"\0"
        s.sendto(struct.pack(">HHHHHH", n & 0xffff, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1), ("203.0.113.10", 53))
    for i in range(100):
        try:
            s.recv(65535); got += 1
        except socket.timeout:
            break
print(got)
"#;
    let out = w.pod.command("python3").arg("-c").arg(flood).output().unwrap();
    let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    let after = rss();
    let evicted = redirector_metric(&w.node, "egress_redirector_dns_evicted_total ").unwrap_or(0.0);
    eprintln!("flood: {got} answers; redirector RSS {before} -> {after} KiB; {evicted} names evicted");
    assert!(got >= 99_000, "DNS answered through the flood: {got}");
    assert!(evicted >= 97_000.0, "{evicted}");
    assert!(after.saturating_sub(before) < 32 * 1024, "RSS {before} -> {after} KiB");
    assert_eq!(lookup_from_pod(&w.pod, "allowed.test", false), ["203.0.113.10"], "still answering");
}

/// Live scrapes of both binaries lint clean with promtool (Debian's `prometheus`): the Prometheus
/// text format by default, HELP on every family, `*_build_info`, `process_*`; OpenMetrics to a
/// scraper that asks for it.
#[test]
fn live_metrics_of_both_binaries_pass_promtool() {
    let w = world();
    // A spool and a named sink, so that the sink families have their children.
    let audit = "audit:\n  spool: {dir: $DIR/spool}\n  sinks: [{name: file, type: file, path: $DIR/audit.jsonl}]";
    let (_dns, _up, gw, dir) = standalone(&w, audit, "");
    let log = std::fs::File::create(dir.path().join("redirector.log")).unwrap();
    let _redirector =
        Proc(spawn_redirector(&w.node, &dir.path().join("redirector.yaml"), &["--reconcile", "500ms"], log));
    wait_until(Duration::from_secs(10), || {
        redirector_metric(&w.node, "egress_redirector_selected_addresses ").is_some()
    });
    // One query through the DNS forwarder.
    let query = "12340100000100000000000007616c6c6f77656404746573740000010001";
    assert!(udp_probe(&w.pod, "192.0.2.10", "203.0.113.10", 53, query).starts_with("reply"));
    let lint = |what: &str, text: &str| {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (apt-get install prometheus)");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && report.trim().is_empty(), "{what}: promtool check metrics:\n{report}");
        for family in ["build_info", "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
            assert!(text.lines().any(|l| l.starts_with("# HELP ") && l.contains(family)), "{what}: {family}");
        }
    };
    let (status, gateway_text) = gw.admin_get("/metrics").unwrap();
    assert_eq!(status, 200);
    lint("gateway", &gateway_text);
    assert!(!gateway_text.contains("action=\"allow\",reason=\"no_rule_matched\""), "no impossible combination");
    let admin: std::net::SocketAddr = "127.0.0.1:9792".parse().unwrap();
    let redirector_text = w.node.enter(move || admin_get(admin, "/metrics")).unwrap().1;
    lint("node-redirector", &redirector_text);

    // Every metric the chart's dashboard and alerts use exists in these scrapes.
    let mut families = std::collections::BTreeSet::new();
    for line in gateway_text.lines().chain(redirector_text.lines()) {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, ty) = rest.split_once(' ').unwrap();
        families.insert(name.to_string());
        if ty == "histogram" {
            for suffix in ["_bucket", "_count", "_sum"] {
                families.insert(format!("{name}{suffix}"));
            }
        }
    }
    let chart = repo_root().join("charts/egress-gateway/files");
    let used = std::fs::read_to_string(chart.join("dashboard.json")).unwrap()
        + &std::fs::read_to_string(chart.join("alerts.yaml")).unwrap();
    let names: std::collections::BTreeSet<&str> = used
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("egress_") || t.starts_with("process_"))
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    let missing: Vec<&&str> = names.iter().filter(|n| !families.contains(**n)).collect();
    assert!(missing.is_empty(), "used by the dashboard or the alerts, absent from a live scrape: {missing:?}");
}
