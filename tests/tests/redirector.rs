//! The node-redirector with real kernel nftables, in network namespaces this test creates:
//!
//! ```text
//!  pod (192.0.2.10 selected, 192.0.2.11 not) -- node (nftables + relay) -- gw (gateway, 198.51.100.2)
//!                                                  \-- inet (upstream + DNS, 203.0.113.10)
//! ```
//! All addresses are documentation ranges that exist only inside these namespaces.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
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
transparent: {{trustedRelays: [198.51.100.1/32], relayKeyFile: $RELAY_KEY}}
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
relay: {{coalesce: 100ms}}
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
"#,
            gp = gw.transparent.port()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("redirector.log")).unwrap();
    let child = spawn_redirector(&w.node, &cfg, &["--reconcile", "500ms"], log);
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

    // A download arrives whole, and the node's relay batched its reads (`relay.coalesce`; the
    // longest hold, so that a busy machine still sees one back-to-back run).
    let out = dir.path().join("download.bin");
    let r = curl_in(
        Some(&w.pod),
        &[
            "--interface",
            "192.0.2.10",
            "--resolve",
            &resolve,
            "-o",
            out.to_str().unwrap(),
            &format!("http://allowed.test:{p}/bytes/8000000"),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(std::fs::read(&out).unwrap() == pattern(8_000_000), "the download arrived changed");
    let admin: std::net::SocketAddr = "127.0.0.1:9792".parse().unwrap();
    let metrics = w.node.enter(move || admin_get(admin, "/metrics")).unwrap().1;
    let batched = metrics
        .lines()
        .find_map(|l| l.strip_prefix("egress_redirector_relay_batched_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(batched.is_some_and(|b| b >= 1.0), "{metrics}");

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

/// HTTPS (IPv4 and IPv6) through the redirector, names decided by SNI, and failover between two
/// gateway endpoints when one is killed (the time it took is printed, not asserted).
#[test]
fn https_over_ipv4_and_ipv6_sni_decides_and_endpoints_fail_over() {
    let w = world();
    // IPv6 on the same links: each address goes on the interface that carries the IPv4 subnet
    // of the same link.
    for (ns, v6, v4_subnet) in [
        (&w.pod, "2001:db8:2::10/64", "192.0.2."),
        (&w.node, "2001:db8:2::1/64", "192.0.2."),
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
transparent: {{trustedRelays: [198.51.100.1/32], relayKeyFile: $RELAY_KEY}}
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
            g2 = gw2.transparent.port()
        ),
    )
    .unwrap();
    let child = spawn_redirector(&w.node, &cfg, &[], Stdio::null());
    let _redirector = Proc(child);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some());
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
    // Allowed over IPv4 and IPv6.
    let ca = bundle.path();
    assert_eq!(https("192.0.2.10", "allowed.test", "203.0.113.10", ca).status, 200);
    let r = https("2001:db8:2::10", "allowed.test", "2001:db8:113::10", ca);
    assert_eq!(r.status, 200, "{r:?}\n{}", gw1.log_text());
    let d =
        gw1.events_at_least(1).into_iter().chain(gw2.events()).filter(|e| e["event"] == "decision").collect::<Vec<_>>();
    assert!(
        d.iter().any(|e| e["client"]["address"] == "2001:db8:2::10" && e["decision"]["action"] == "allow"),
        "{d:#?}"
    );
    // SNI of a denied name to the allowed address: denied.
    let r = https("192.0.2.10", "denied.test", "203.0.113.10", ca);
    assert_ne!(r.exit, 0, "{r:?}");
    // SNI of the allowed name sent to an arbitrary address reaches the allowed name's real address.
    assert_eq!(https("192.0.2.10", "allowed.test", "203.0.113.99", ca).status, 200);
    let e = gw1
        .events()
        .into_iter()
        .chain(gw2.events())
        .find(|e| e["transparent"]["original_dst"] == format!("203.0.113.99:{p}"))
        .expect("audited");
    assert_eq!(e["transparent"]["original_in_resolved"], false);
    assert!(
        e["dialled"].as_str().unwrap().contains("203.0.113.10")
            || e["dialled"].as_str().unwrap().contains("2001:db8:113::10"),
        "{e}"
    );

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

/// Benchmark (not a test; `cargo test -p egress-e2e --test redirector -- --ignored --nocapture`):
/// a 100 MiB download and the new-connection rate through pod -> node relay -> gateway, against
/// the same Pod network with redirection off (the unselected address). Prints the ratios and the
/// CPU each hop costs. Use release binaries: `EGRESS_GATEWAY_BIN=target/release/egress-gateway`
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
transparent: {{trustedRelays: [198.51.100.1/32], relayKeyFile: $RELAY_KEY}}
clients: [{{cidr: 192.0.2.10/32, namespace: shop, name: web-1, labels: {{app: web}}}}]
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: web, namespace: shop}}
    spec: {{podSelector: {{}}, redirect: Transparent, rules: [{{to: [{{domain: allowed.test}}, {{cidr: 203.0.113.10/32}}], ports: [{{port: {p}}}]}}]}}
"#
    );
    let gw = Gateway::start_with(Some(dns.addr), Some(&w.gw_ns), &body);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("redirector.yaml");
    std::fs::write(&cfg, format!(
        "nodeName: n\ngateways: [198.51.100.2:{}]\nexcludeCidrs: [192.0.2.0/24, 198.51.100.0/24]\npods: [{{namespace: shop, name: web-1, nodeName: n, ips: [192.0.2.10], labels: {{}}}}]\npolicies: [{{apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {{name: w, namespace: shop}}, spec: {{podSelector: {{}}, redirect: Transparent, rules: []}}}}]\n",
        gw.transparent.port()
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
                let r = curl_in(Some(&w.pod), &["--interface", src, "--resolve", &resolve, "-o", "/dev/null", &url]);
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
        let n = w.pod.enter(move || {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    // Spawned from a pinned thread when EGRESS_BENCH_PIN=1: they inherit CPU 0.
                    std::thread::spawn(move || {
                        let mut n = 0u64;
                        while std::time::Instant::now() < until {
                            let mut s = connect_from(src, target);
                            use std::io::{Read, Write};
                            s.write_all(b"GET /bytes/1024 HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
                                .unwrap();
                            let mut buf = Vec::new();
                            s.read_to_end(&mut buf).unwrap();
                            assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum::<u64>()
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
    }
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
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
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
transparent: {{trustedRelays: [198.51.100.1/32], relayKeyFile: $RELAY_KEY}}
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
    let mut elsewhere = pod("shop", "web-2", &["192.0.2.11"], json!({"app": "web"}), "Running");
    elsewhere["spec"]["nodeName"] = json!("node-2");
    api.apply(PODS, elsewhere);
    api.apply(
        POLICIES,
        json!({"apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
        "metadata": {"name": "steer", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "redirect": "Transparent", "rules": []}}),
    );
    api.apply(SLICES, json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "egress-transparent-abc", "namespace": "egress-system", "labels": {"kubernetes.io/service-name": "egress-transparent"}},
        "ports": [{"name": "transparent", "port": gw.transparent.port(), "protocol": "TCP"}],
        "endpoints": [{"addresses": ["198.51.100.2"], "conditions": {"ready": true}}]}));
    let dir = tempfile::tempdir().unwrap();
    let (kc, cfg) = (dir.path().join("kubeconfig"), dir.path().join("redirector.yaml"));
    std::fs::write(&kc, api.kubeconfig()).unwrap();
    std::fs::write(&cfg, format!(
        "nodeName: node-1\nadmin: 127.0.0.1:9791\nexcludeCidrs: [192.0.2.0/24, 198.51.100.0/24]\nkubernetes: {{enabled: true, kubeconfig: {}, gatewayService: egress-system/egress-transparent, gatewayPortName: transparent}}\n",
        kc.display()
    )).unwrap();
    let child = spawn_redirector(&w.node, &cfg, &[], Stdio::null());
    let _r = Proc(child);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some_and(|t| t.contains("192.0.2.10")));
    let t = node_table(&w.node).unwrap();
    assert!(!t.contains("192.0.2.11"), "a Pod of another node is not steered: {t}");
    let resolve = format!("allowed.test:{p}:203.0.113.10");
    let get = |src: &str| {
        curl_in(Some(&w.pod), &["--interface", src, "--resolve", &resolve, &format!("http://allowed.test:{p}/")])
    };
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
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![("/api/v1/namespaces/shop/pods/web-1/status".to_string(), "True".to_string(), true)],
        "written once, after the address was in the kernel's set"
    );
    // The Pod's labels change: no longer selected, no longer steered — by removing the set
    // element, not by replacing the table (same table handle).
    let handle = table_handle(&w.node);
    web["metadata"]["labels"] = json!({"app": "batch"});
    api.apply(PODS, web);
    wait_until(Duration::from_secs(10), || node_table(&w.node).is_some_and(|t| !t.contains("192.0.2.10")));
    assert_eq!(table_handle(&w.node), handle, "membership changes are incremental");
    // Its readiness gate now says why it is not steered (written after the removal).
    wait_until(Duration::from_secs(10), || condition("web-1").is_some_and(|c| c["status"] == "False"));
    assert_eq!(condition("web-1").unwrap()["reason"], "NotSelected");
    assert_eq!(
        seen.lock().unwrap().last().unwrap(),
        &("/api/v1/namespaces/shop/pods/web-1/status".to_string(), "False".to_string(), false)
    );
    assert!(condition("db-1").is_none(), "an unselected Pod without the gate is not written");
    assert_eq!(seen.lock().unwrap().len(), 2, "one write per change");
    // The admin endpoint (inside the node namespace) reports readiness and the change.
    let admin: std::net::SocketAddr = "127.0.0.1:9791".parse().unwrap();
    assert_eq!(w.node.enter(move || admin_get(admin, "/readyz")).map(|r| r.0), Some(200));
    let metrics = w.node.enter(move || admin_get(admin, "/metrics")).unwrap().1;
    assert!(metrics.contains("egress_redirector_selected_addresses 0"), "{metrics}");
    assert!(metrics.contains("egress_redirector_table_updates_total 1"), "{metrics}");
    assert!(metrics.contains("egress_redirector_relay_pipe_refused_total 0"), "relay paths are exported: {metrics}");
    assert!(
        metrics.contains("egress_redirector_apply_seconds_count 1"),
        "time from the Pod event to its rules: {metrics}"
    );
    let r = get("192.0.2.10");
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "192.0.2.10", "direct again");
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
    ] {
        assert!(seen.contains(needed), "{needed} not exercised: {seen:?}");
    }
}
