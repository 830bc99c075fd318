//! The node-redirector with real kernel nftables, in network namespaces this test creates:
//!
//! ```text
//!  pod (192.0.2.10 selected, 192.0.2.11 not) -- node (nftables + relay) -- gw (gateway, 198.51.100.2)
//!                                                  \-- inet (upstream + DNS, 203.0.113.10)
//! ```
//! All addresses are documentation ranges that exist only inside these namespaces.

use std::process::Stdio;
use std::time::Duration;

use egress_e2e::*;

struct World {
    pod: Netns,
    node: Netns,
    gw_ns: Netns,
    inet: Netns,
}

fn world() -> World {
    let w = World {
        pod: Netns::new("rpod"),
        node: Netns::new("rnode"),
        gw_ns: Netns::new("rgw"),
        inet: Netns::new("rinet"),
    };
    let t = std::process::id() % 100_000;
    Netns::link(
        &w.pod,
        &format!("rp{t}"),
        &["192.0.2.10/24", "192.0.2.11/24"],
        &w.node,
        &format!("rnp{t}"),
        &["192.0.2.1/24"],
    );
    Netns::link(&w.gw_ns, &format!("rg{t}"), &["198.51.100.2/24"], &w.node, &format!("rng{t}"), &["198.51.100.1/24"]);
    Netns::link(&w.inet, &format!("ri{t}"), &["203.0.113.10/24"], &w.node, &format!("rni{t}"), &["203.0.113.1/24"]);
    w.pod.exec_ok("ip", &["route", "add", "default", "via", "192.0.2.1"]);
    w.gw_ns.exec_ok("ip", &["route", "add", "default", "via", "198.51.100.1"]);
    w.inet.exec_ok("ip", &["route", "add", "192.0.2.0/24", "via", "203.0.113.1"]);
    w.inet.exec_ok("ip", &["route", "add", "198.51.100.0/24", "via", "203.0.113.1"]);
    w.node.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    w
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

#[test]
fn selected_pods_are_steered_through_the_gateway_with_real_nftables() {
    let w = world();
    let dns = Dns::start_at(
        Some(&w.inet),
        "203.0.113.10:53".parse().unwrap(),
        &[("allowed.test", "203.0.113.10"), ("denied.test", "203.0.113.10")],
    );
    let up = Upstream::start_in(&w.inet, "203.0.113.10");
    let p = up.addr.port();
    let body = format!(
        r#"
transparent: {{trustedRelays: [198.51.100.1/32]}}
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
"#
    );
    let gw = Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("redirector.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
nodeName: node-1
gateways: [198.51.100.2:{gp}]
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
"#,
            gp = gw.transparent.port()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("redirector.log")).unwrap();
    let child = w
        .node
        .command(workspace_bin("node-redirector"))
        .args(["run", "--reconcile", "500ms", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut redirector = Proc(child);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());

    // An allowed domain, plain curl with no proxy settings: the upstream sees the gateway.
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let r = curl_in(
        Some(&w.pod),
        &["--interface", "192.0.2.10", "--resolve", &resolve, &format!("http://allowed.test:{p}/x")],
    );
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.log_text());
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "198.51.100.2");
    let d = gw.events_at_least(1).into_iter().find(|e| e["event"] == "decision").unwrap();
    assert_eq!(d["front"], "transparent");
    assert_eq!(d["client"]["name"], "web-1");
    assert_eq!(d["transparent"]["original_dst"], format!("203.0.113.10:{p}"));
    assert_eq!(d["transparent"]["relay"].as_str().unwrap().split(':').next(), Some("198.51.100.1"));
    assert_eq!(d["transparent"]["original_in_resolved"], true);

    // A denied domain: refused by the gateway, audited.
    let resolve = format!("denied.test:{p}:203.0.113.10");
    let r = curl_in(
        Some(&w.pod),
        &["--interface", "192.0.2.10", "--resolve", &resolve, &format!("http://denied.test:{p}/")],
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("no_rule_matched"), "{r:?}");

    // An unselected Pod is not redirected: the upstream sees the Pod itself.
    let r = curl_in(Some(&w.pod), &["--interface", "192.0.2.11", &format!("http://203.0.113.10:{p}/")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "192.0.2.11");

    // The Pod connecting to the gateway's transparent port itself is an untrusted relay.
    let r = curl_in(
        Some(&w.pod),
        &["--interface", "192.0.2.10", &format!("http://198.51.100.2:{}/", gw.transparent.port())],
    );
    assert_ne!(r.status, 200, "{r:?}");
    wait_until(Duration::from_secs(5), || gw.events().iter().any(|e| e["decision"]["reason"] == "untrusted_relay"));

    // UDP: DNS to the cluster resolver passes, anything else is dropped (silence, not even ICMP).
    let query = "12340100000100000000000007616c6c6f77656404746573740000010001";
    assert!(udp_probe(&w.pod, "192.0.2.10", "203.0.113.10", 53, query).starts_with("reply"));
    assert_eq!(udp_probe(&w.pod, "192.0.2.10", "203.0.113.10", 9999, "00"), "silence");
    assert_eq!(
        udp_probe(&w.pod, "192.0.2.11", "203.0.113.10", 9999, "00"),
        "refused",
        "unselected Pod's UDP is untouched"
    );

    // Metadata from a selected Pod is dropped on the node.
    w.inet.exec_ok("ip", &["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    w.node.exec_ok("ip", &["route", "add", "169.254.169.254/32", "via", "203.0.113.10"]);
    let r = curl_in(
        Some(&w.pod),
        &["--interface", "192.0.2.10", "--max-time", "2", &format!("http://169.254.169.254:{p}/")],
    );
    assert_eq!(r.status, 0, "{r:?}");
    assert!(
        !gw.events()
            .iter()
            .any(|e| e["transparent"]["original_dst"].as_str().is_some_and(|d| d.starts_with("169.254."))),
        "dropped on the node, never relayed to the gateway"
    );

    // Someone deletes the table: it is repaired.
    w.node.exec_ok("nft", &["delete", "table", "inet", "egress_redirector"]);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let r = curl_in(
        Some(&w.pod),
        &["--interface", "192.0.2.10", "--resolve", &resolve, &format!("http://allowed.test:{p}/")],
    );
    assert_eq!(r.status, 200, "after repair: {r:?}");

    // Graceful shutdown removes the table.
    let pid = redirector.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_until(Duration::from_secs(10), || redirector.0.try_wait().unwrap().is_some());
    assert!(node_table(&w.node).is_none(), "table removed on SIGTERM");
}
