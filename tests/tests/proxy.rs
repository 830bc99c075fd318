//! End-to-end: the real gateway binary with curl, dnsmasq and upstream servers on loopback.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use egress_e2e::*;
use serde_json::Value;

/// Names used by the tests: `up.test` and friends resolve to the upstream's address (127.0.0.2,
/// exempted from the guard by allowCidrs); the others to guarded addresses.
fn dns() -> Dns {
    Dns::start(&[
        ("up.test", "127.0.0.2"),
        ("api.up.test", "127.0.0.2"),
        ("a.b.up.test", "127.0.0.2"),
        ("other.test", "127.0.0.2"),
        ("meta.test", "169.254.169.254"),
        ("loop.test", "127.0.0.1"),
        ("priv.test", "10.0.0.1"),
        ("mixed.test", "127.0.0.2"),
        ("mixed.test", "fd00:ec2::254"),
        ("mapped.test", "::ffff:169.254.169.254"),
        ("alias.up.test", "up.test"),
        ("alias-meta.up.test", "meta.test"),
    ])
}

/// The standard policy set: client 127.0.0.1 is `shop/api`.
fn config(upstream_port: u16, extra: &str) -> String {
    format!(
        r#"
guard: {{allowCidrs: [127.0.0.2/32, 127.0.0.3/32, 127.0.0.4/32]}}
clients:
  - {{cidr: 127.0.0.1/32, namespace: shop, name: api, serviceAccount: api-sa, labels: {{app: api}}}}
  - {{cidr: 127.0.0.5/32, namespace: shop, name: web, serviceAccount: web, labels: {{app: web}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: api-egress, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: api}}}}
      rules:
        - name: upstream
          to: [{{domain: up.test}}, {{domain: "*.up.test"}}, {{domain: meta.test}}, {{domain: loop.test}}, {{domain: priv.test}}, {{domain: mixed.test}}, {{domain: mapped.test}}]
          ports: [{{port: {upstream_port}}}]
        - name: read-only
          to: [{{domain: other.test}}]
          ports: [{{port: {upstream_port}}}]
          http: {{methods: [GET], paths: ["/ok", "/api/*"]}}
        - name: loopback-cidr
          to: [{{cidr: 127.0.0.0/29, except: [127.0.0.3/32]}}]
          ports: [{{port: {upstream_port}}}]
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: web-observe, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: web}}}}
      mode: Audit
      rules:
        - name: nothing-much
          to: [{{domain: nothing.test}}]
{extra}
"#
    )
}

/// One EgressPolicy for client 127.0.0.1 (namespace `ns`) with the given spec lines, upstream
/// 127.0.0.2 opened by allowCidrs, and `extra` top-level config.
fn single_policy(name: &str, spec: &str, extra: &str) -> String {
    format!(
        "guard: {{allowCidrs: [127.0.0.2/32]}}\n{extra}\nclients: [{{cidr: 127.0.0.1/32, namespace: ns, name: c, labels: {{}}}}]\npolicies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: {name}, namespace: ns}}\n    spec:\n      podSelector: {{}}\n{spec}\n"
    )
}

/// [`single_policy`] `limited`, allowing up.test:`port` at one request per second after a burst
/// of `burst`.
fn rate_limited_policy(port: u16, burst: u32) -> String {
    let spec = format!(
        "      rateLimit: {{requestsPerSecond: 1, burst: {burst}}}\n      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]"
    );
    single_policy("limited", &spec, "")
}

/// Two network namespaces joined by a veth pair: the gateway's host (`gw{tag}`, holding
/// `gw_addrs`) and the upstream's (`up{tag}`, holding `up_addr`).
fn gateway_and_upstream_hosts(tag: &str, gw_addrs: &[&str], up_addr: &str) -> (Netns, Netns) {
    let (gw, up) = (Netns::new(&format!("gw{tag}")), Netns::new(&format!("up{tag}")));
    let id = std::process::id() % 100_000;
    Netns::link(&gw, &format!("eg{tag}g{id}"), gw_addrs, &up, &format!("eg{tag}u{id}"), &[up_addr]);
    (gw, up)
}

fn proxy(gw: &Gateway) -> String {
    format!("http://{}", gw.http)
}

fn socks(gw: &Gateway) -> String {
    format!("{}", gw.socks)
}

/// One client connection to a listener, for requests written by hand, answered in turn.
struct Raw {
    s: TcpStream,
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: std::net::SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        Raw { s, r }
    }

    /// Writes `text` and reads the answer: its status and its body (Content-Length framed; none
    /// without one, as for a CONNECT's 200).
    fn exchange(&mut self, text: &str) -> (u16, Vec<u8>) {
        self.s.write_all(text.as_bytes()).unwrap();
        let (status, h) = read_head(&mut self.r);
        let mut body = vec![0u8; h.get("content-length").map_or(0, |n| n.parse().unwrap())];
        self.r.read_exact(&mut body).unwrap();
        (status, body)
    }
}

#[test]
fn allowed_exact_and_wildcard_domains_through_every_front() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    for host in ["up.test", "api.up.test", "a.b.up.test", "UP.Test."] {
        let url = format!("http://{host}:{p}/x");
        let r = curl(&["-x", &proxy(&gw), &url]);
        assert_eq!(r.status, 200, "http {host}: {r:?}");
        assert_eq!(r.json()["path"], "/x");
        let r = curl(&["-p", "-x", &proxy(&gw), &url]);
        assert_eq!(r.status, 200, "connect {host}: {r:?}");
        let r = curl(&["--socks5-hostname", &socks(&gw), &url]);
        assert_eq!(r.status, 200, "socks5h {host}: {r:?}");
    }
}

#[test]
fn wildcard_never_matches_the_apex_and_ports_are_enforced() {
    let dns = Dns::start(&[("up.test", "127.0.0.2"), ("api.up.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let other = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let body = single_policy(
        "wild",
        &format!("      rules: [{{name: wild, to: [{{domain: \"*.up.test\"}}], ports: [{{port: {p}}}]}}]"),
        "",
    );
    let gw = Gateway::start(&dns, &body);
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://api.up.test:{p}/")]).status, 200);
    let apex = curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]);
    assert_eq!(apex.status, 403);
    assert!(apex.body.contains("reason: no_rule_matched"), "{apex:?}");
    let wrong_port = curl(&["-x", &proxy(&gw), &format!("http://api.up.test:{}/", other.addr.port())]);
    assert_eq!(wrong_port.status, 403, "{wrong_port:?}");
    let ev = gw.request_events(&wrong_port.request_id());
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["decision"]["reason"], "no_rule_matched");
    assert_eq!(ev[0]["decision"]["policy"], "ns/wild");
}

/// Upstreams on 127.0.0.2 and 127.0.0.3 with the same port (one rule's port covers both). A port
/// free on 127.0.0.3 is almost always free on 127.0.0.2 too; a few tries.
fn upstreams_on_one_port() -> (Upstream, Upstream) {
    (0..20)
        .find_map(|_| {
            let l3 = std::net::TcpListener::bind("127.0.0.3:0").ok()?;
            let l2 = std::net::TcpListener::bind(("127.0.0.2", l3.local_addr().ok()?.port())).ok()?;
            Some((Upstream::serve(l2), Upstream::serve(l3)))
        })
        .expect("one port free on both 127.0.0.2 and 127.0.0.3")
}

#[test]
fn cidr_rules_with_except() {
    let dns = dns();
    // Both upstreams on one port (the rule's): the excepted one is a canary that must see nothing.
    let (up2, canary) = upstreams_on_one_port();
    let p = up2.addr.port();
    let gw = Gateway::start(&dns, &config(p, ""));
    let ok = curl(&["-x", &proxy(&gw), &format!("http://127.0.0.2:{p}/")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(gw.decision(|e| e["target"]["host"] == "127.0.0.2")["decision"]["rule"], "loopback-cidr");
    let excepted = curl(&["-x", &proxy(&gw), &format!("http://127.0.0.3:{p}/")]);
    assert_eq!(excepted.status, 403, "{excepted:?}");
    assert!(excepted.body.contains("reason: no_rule_matched"), "{excepted:?}");
    assert_eq!(canary.hits(), 0, "the excepted address was never dialled");
}

#[test]
fn http_method_and_path_rules() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    let base = format!("http://other.test:{p}");
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("{base}/ok")]).status, 200);
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("{base}/ok?q=1")]).status, 200);
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("{base}/api/v1/x")]).status, 200);
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("{base}/okx")]).status, 403);
    assert_eq!(curl(&["-x", &proxy(&gw), "-X", "POST", "-d", "x=1", &format!("{base}/ok")]).status, 403);
    // An http rule never matches a tunnel: the gateway cannot see the method or path inside.
    assert_eq!(curl(&["-p", "-x", &proxy(&gw), &format!("{base}/ok")]).status, 0);
    assert_eq!(gw.decision(|e| e["front"] == "connect")["decision"]["reason"], "no_rule_matched");
}

#[test]
fn request_and_response_bodies_stream_both_ways_and_proxy_headers_are_stripped() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    let file = gw.dir.path().join("body.bin");
    std::fs::write(&file, vec![7u8; 300_000]).unwrap();
    let data = format!("@{}", file.display());
    // Content-Length body
    let r = curl(&[
        "-x",
        &proxy(&gw),
        "--data-binary",
        &data,
        "-H",
        "Proxy-Authorization: Basic eDp5",
        &format!("http://up.test:{p}/upload"),
    ]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_len"], 300_000);
    assert_eq!(r.json()["method"], "POST");
    assert_eq!(r.json()["proxy_headers_seen"], false);
    assert_eq!(r.json()["host"], format!("up.test:{p}"));
    // chunked body
    let r = curl(&[
        "-x",
        &proxy(&gw),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &data,
        &format!("http://up.test:{p}/chunked"),
    ]);
    assert_eq!(r.json()["body_len"], 300_000, "{r:?}");
    // large response
    let download = |args: &[&str]| {
        let out = gw.dir.path().join("download.bin");
        let url = format!("http://up.test:{p}/bytes/5000000");
        assert_eq!(curl(&[args, &["-o", out.to_str().unwrap(), &url]].concat()).status, 200);
        std::fs::read(&out).unwrap() == pattern(5_000_000)
    };
    assert!(download(&["-x", &proxy(&gw)]), "the download arrived changed");
    // The same through a CONNECT tunnel, both ways: a bulk direction moves to splice(2).
    assert_eq!(gw.metric("egress_relay_pipe_refused_total"), Some(0.0));
    let spliced = gw.metric("egress_relay_spliced_total").unwrap();
    assert!(download(&["-p", "-x", &proxy(&gw)]), "the tunnelled download arrived changed");
    let r = curl(&["-p", "-x", &proxy(&gw), "--data-binary", &data, &format!("http://up.test:{p}/upload")]);
    assert_eq!(r.json()["body_len"], 300_000, "{r:?}");
    assert!(gw.metric("egress_relay_spliced_total").unwrap() >= spliced + 2.0);
    let ev: Vec<Value> = gw.events_at_least(10).into_iter().filter(|e| e["event"] == "close").collect();
    let big = ev.iter().find(|e| e["target"]["http"]["path"] == "/bytes/5000000").expect("close of the download");
    assert!(big["close"]["bytes_down"].as_u64().unwrap() >= 5_000_000, "{big}");
    let upl = ev.iter().find(|e| e["target"]["http"]["path"] == "/upload").expect("close of the upload");
    assert_eq!(upl["close"]["bytes_up"], 300_000);
    assert_eq!(upl["close"]["http_status"], 200);
}

/// `limits.tunnelCoalesce` reaches the relay: a tunnelled download that arrives back to back
/// batches its reads (counted in `egress_relay_batched_total`) and still arrives whole, tail
/// included; `0s` never batches. (The batching itself is tested in egress-netio.)
#[test]
fn tunnel_read_batching_follows_limits_tunnel_coalesce() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    // The longest hold accepted, so that a busy test machine still counts the download as one
    // back-to-back run.
    for (hold, batches) in [("100ms", true), ("0s", false)] {
        let gw = Gateway::start(&dns, &format!("{}limits: {{tunnelCoalesce: {hold}}}\n", config(p, "")));
        let out = gw.dir.path().join("download.bin");
        let url = format!("http://up.test:{p}/bytes/8000000");
        let r = curl(&["-p", "-x", &proxy(&gw), "-o", out.to_str().unwrap(), &url]);
        assert_eq!(r.status, 200, "{hold}: {r:?}");
        assert!(std::fs::read(&out).unwrap() == pattern(8_000_000), "{hold}: the download arrived changed");
        assert!(gw.metric("egress_relay_spliced_total").unwrap() >= 1.0, "{hold}");
        let batched = gw.metric("egress_relay_batched_total").unwrap();
        assert_eq!(batched >= 1.0, batches, "{hold}: egress_relay_batched_total = {batched}");
    }
}

#[test]
fn audit_mode_lets_a_would_deny_through_and_logs_it() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    let r = curl(&["--interface", "127.0.0.5", "-x", &proxy(&gw), &format!("http://up.test:{p}/")]);
    assert_eq!(r.status, 200, "{r:?}");
    let d = gw.decision(|e| e["client"]["name"] == "web");
    assert_eq!(d["decision"]["action"], "allow");
    assert_eq!(d["decision"]["reason"], "audit_would_deny");
    assert_eq!(d["decision"]["mode"], "Audit");
    assert_eq!(d["decision"]["policy"], "shop/web-observe");
    assert_eq!(d["client"]["name"], "web");
    // Audit mode never bypasses the guard.
    let r = curl(&["--interface", "127.0.0.5", "-x", &proxy(&gw), "http://169.254.169.254/latest/meta-data/"]);
    assert_eq!(r.status, 403, "{r:?}");
    let r = curl(&["--interface", "127.0.0.5", "-x", &proxy(&gw), &format!("http://meta.test:{p}/")]);
    assert_eq!(r.status, 403, "{r:?}");
}

#[test]
fn unknown_client_gets_the_default_action() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let r = curl(&["--interface", "127.0.0.9", "-x", &proxy(&gw), &format!("http://up.test:{}/", up.addr.port())]);
    assert_eq!(r.status, 403, "{r:?}");
    let d = gw.decision(|e| e["client"]["address"] == "127.0.0.9");
    assert_eq!(d["decision"]["reason"], "default_deny");
    assert!(d["client"].get("namespace").is_none(), "{d}");
    assert_eq!(d["client"]["address"], "127.0.0.9");
    let (dns2, up2) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let gw2 = Gateway::start(&dns2, "guard: {allowCidrs: [127.0.0.2/32]}\ndefaultAction: Allow\n");
    let r = curl(&["-x", &proxy(&gw2), &format!("http://up.test:{}/", up2.addr.port())]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(gw2.decision(|_| true)["decision"]["reason"], "default_allow");
    // defaultAction Allow still never opens the guard.
    assert_eq!(curl(&["-x", &proxy(&gw2), "http://[::ffff:169.254.169.254]/"]).status, 403);
}

#[test]
fn domains_resolving_to_guarded_addresses_are_denied() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    for (host, reason) in [
        ("meta.test", "dns_guard_blocked"),
        ("loop.test", "dns_guard_blocked"),
        ("mapped.test", "dns_guard_blocked"),
        ("priv.test", "dns_internal_address"),
    ] {
        let url = format!("http://{host}:{p}/");
        let r = curl(&["-x", &proxy(&gw), &url]);
        assert_eq!(r.status, 403, "{host}: {r:?}");
        assert!(r.body.contains(&format!("reason: {reason}")), "{host}: {r:?}");
        let ev = gw.request_events(&r.request_id());
        assert_eq!(ev[0]["decision"]["reason"], reason);
        assert!(!ev[0]["resolved"].as_array().unwrap().is_empty(), "{}", ev[0]);
        // CONNECT and SOCKS5: refused by the DNS guard, not merely failing to connect (nothing
        // listens on the guarded addresses, so a front without the guard would also fail, with
        // a 502 or a connect error): the audit names the reason.
        assert_ne!(curl(&["-p", "-x", &proxy(&gw), &url]).status, 200, "connect {host}");
        let d = gw.decision(|e| e["target"]["host"] == host && e["front"] == "connect");
        assert_eq!(d["decision"]["reason"], reason, "connect {host}: {d}");
        assert!(d.get("dialled").is_none_or(|x| x.is_null()), "never dialled: {d}");
        let (_, code) = socks5_domain(gw.socks, host, p);
        assert_eq!(code, 0x02, "socks {host}");
        let d = gw.decision(|e| e["target"]["host"] == host && e["front"] == "socks5");
        assert_eq!(d["decision"]["reason"], reason, "socks5 {host}: {d}");
    }
    // A name with a guarded and a public answer: only the checked address is dialled.
    let r = curl(&["-x", &proxy(&gw), &format!("http://mixed.test:{p}/")]);
    assert_eq!(r.status, 200, "{r:?}");
    let d = gw.decision(|e| e["target"]["host"] == "mixed.test" && e["front"] == "http");
    assert_eq!(d["dialled"], format!("127.0.0.2:{p}"));
    let verdicts: Vec<&str> =
        d["resolved"].as_array().unwrap().iter().map(|r| r["verdict"].as_str().unwrap()).collect();
    assert!(verdicts.contains(&"blocked") && verdicts.contains(&"exempt"), "{d}");
}

/// Every spelling of a guarded address, through every front, for a client with broad allows.
#[test]
fn every_guarded_range_in_every_spelling_through_every_front() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let extra = r#"
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {name: everything, namespace: shop}
    spec:
      podSelector: {matchLabels: {app: api}}
      rules: [{name: all, to: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}]}]
"#;
    let gw = Gateway::start(&dns, &config(up.addr.port(), extra));
    let spellings = [
        "169.254.169.254",
        "2852039166",
        "0xA9FEA9FE",
        "0251.0376.0251.0376",
        "169.254.43518",
        "169.254.169.254.",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
        "[64:ff9b::a9fe:a9fe]",
        "[fd00:ec2::254]",
        "100.100.100.200",
        "168.63.129.16",
        "metadata.google.internal",
        "127.0.0.1",
        "127.1",
        "0",
        "0.0.0.0",
        "[::1]",
        "[::]",
        "169.254.1.1",
        "[fe80::1]",
        "224.0.0.1",
        "255.255.255.255",
        "[2002:a9fe:a9fe::1]",
    ];
    for host in spellings {
        // absolute-form, raw so that the client does not normalise the spelling first
        let req = format!("GET http://{host}/latest/meta-data/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let out = String::from_utf8_lossy(&raw_exchange(gw.http, req.as_bytes(), Duration::from_secs(5))).to_string();
        assert!(out.starts_with("HTTP/1.1 403"), "http {host}: {out}");
        assert!(out.contains("reason: guard_"), "http {host}: {out}");
        // CONNECT
        let req = format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\nConnection: close\r\n\r\n");
        let out = String::from_utf8_lossy(&raw_exchange(gw.http, req.as_bytes(), Duration::from_secs(5))).to_string();
        assert!(out.starts_with("HTTP/1.1 403"), "connect {host}: {out}");
        // SOCKS5 with the spelling as a domain name (what socks5h clients send)
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let (_, code) = socks5_domain(gw.socks, bare, 80);
        assert_eq!(code, 0x02, "socks5 {host}");
    }
    // curl's own spellings too
    for url in
        ["http://2852039166/", "http://0xA9FEA9FE/", "http://[::ffff:169.254.169.254]/", "http://0251.0376.0251.0376/"]
    {
        assert_eq!(curl(&["-x", &proxy(&gw), url]).status, 403, "{url}");
        assert_ne!(curl(&["-p", "-x", &proxy(&gw), url]).status, 200, "{url}");
        let r = curl(&["--socks5-hostname", &socks(&gw), url]);
        assert_eq!(r.exit, 97, "socks5h {url}: {r:?}");
        let r = curl(&["--socks5", &socks(&gw), url]);
        assert_eq!(r.exit, 97, "socks5 {url}: {r:?}");
    }
    // Private ranges through an explicit cidr rule are a decision of the operator's policy:
    // that is what `everything` says, so 10.0.0.1 is allowed by policy (and then unreachable).
    let d = check_offline(&gw, "10.0.0.1:80");
    assert_eq!(d["reason_code"], "rule_allow");
}

/// `egress-gateway check --no-resolve` for client 127.0.0.1 with this gateway's config.
fn check_offline(gw: &Gateway, target: &str) -> Value {
    let out = std::process::Command::new(gateway_bin())
        .args(["check", "--no-resolve", "--client", "127.0.0.1", "--config"])
        .arg(gw.config_path())
        .arg(target)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The upstream sees the name that was decided, whatever Host header the client sent: one Host
/// header, the URI's host and port (a virtual-hosting upstream must never serve a name the policy
/// did not see), and the path and query as sent. Each case twice on one connection, so that the
/// reused upstream connection is covered too.
#[test]
fn the_upstream_sees_the_decided_host_once_and_the_path_and_query_as_sent() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    let decided = format!("up.test:{p}");
    for (label, sent) in [
        ("the same host", format!("Host: up.test:{p}\r\n")),
        ("another name", "Host: evil.test\r\n".to_string()),
        ("the name without the port", "Host: up.test\r\n".to_string()),
        ("two Host headers", format!("Host: up.test:{p}\r\nHost: evil.test\r\n")),
        ("no Host header", String::new()),
    ] {
        let mut c = Raw::connect(gw.http);
        for _ in 0..2 {
            let (status, body) = c.exchange(&format!("GET http://up.test:{p}/x/y?q=1&r=%20 HTTP/1.1\r\n{sent}\r\n"));
            if status == 400 && label == "two Host headers" {
                // Refusing it outright is as safe as forwarding one Host.
                break;
            }
            assert_eq!(status, 200, "{label}: {}", String::from_utf8_lossy(&body));
            let seen: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(seen["host"], decided.as_str(), "{label}: {seen}");
            assert_eq!(seen["hosts"], 1, "{label}: {seen}");
            assert_eq!(seen["path_and_query"], "/x/y?q=1&r=%20", "{label}: {seen}");
        }
    }
}

#[test]
fn a_second_request_on_a_keep_alive_connection_is_decided_again() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    let mut c = Raw::connect(gw.http);
    assert_eq!(c.exchange(&format!("GET http://up.test:{p}/one HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n")).0, 200);
    assert_eq!(c.exchange(&format!("GET http://meta.test:{p}/two HTTP/1.1\r\nHost: meta.test:{p}\r\n\r\n")).0, 403);
    let (status, _) = c.exchange(&format!("GET http://up.test:{p}/three HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n"));
    assert_eq!(status, 200, "the connection keeps serving after a denial");
    let ev = gw.events_at_least(4);
    let decisions: Vec<&Value> = ev.iter().filter(|e| e["event"] == "decision").collect();
    assert_eq!(decisions.len(), 3, "{ev:#?}");
    assert!(decisions.iter().all(|e| e["connection_id"] == decisions[0]["connection_id"]));
    assert_eq!(decisions[1]["decision"]["reason"], "dns_guard_blocked");
    assert_ne!(decisions[0]["request_id"], decisions[2]["request_id"]);
}

#[test]
fn rate_limit_answers_429_and_socks_0x02_once_the_burst_is_spent() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let body = rate_limited_policy(p, 3);
    let gw = Gateway::start(&dns, &body);
    let url = format!("http://up.test:{p}/");
    // The burst is served; then requests faster than one a second get 429. No wall-clock
    // assertion: a slow machine only refills the bucket, so the test asks until it sees the 429
    // (twenty requests would have to take twenty seconds for none to come).
    let mut codes: Vec<u16> = Vec::new();
    while !codes.contains(&429) {
        assert!(codes.len() < 20, "no 429: {codes:?}");
        codes.push(curl(&["-x", &proxy(&gw), &url]).status);
    }
    assert_eq!(&codes[..3], &[200, 200, 200], "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    let mut socks = Vec::new();
    while !socks.contains(&0x02) {
        assert!(socks.len() < 20, "no 0x02: {socks:?}");
        socks.push(socks5_domain(gw.socks, "up.test", p).1);
    }
    assert!(socks.iter().all(|c| *c == 0x00 || *c == 0x02), "{socks:?}");
    assert_eq!(
        gw.decision(|e| e["front"] == "socks5" && e["decision"]["action"] == "deny")["decision"]["reason"],
        "rate_limited"
    );
}

#[test]
fn egress_source_address_pools_are_used() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let body = single_policy(
        "pooled",
        &format!(
            "      egressAddress: fixed\n      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {p}}}]}}]"
        ),
        "egressAddresses: {fixed: [127.0.0.3, 127.0.0.4]}",
    );
    let gw = Gateway::start(&dns, &body);
    let mut seen = std::collections::BTreeSet::new();
    for args in [vec!["-x"], vec!["-p", "-x"], vec!["-x"], vec!["-p", "-x"]] {
        let mut a: Vec<&str> = args.clone();
        let px = proxy(&gw);
        let url = format!("http://up.test:{p}/");
        a.push(&px);
        a.push(&url);
        let r = curl(&a);
        assert_eq!(r.status, 200, "{r:?}");
        let peer = r.json()["peer"].as_str().unwrap().to_string();
        let ip = peer.rsplit_once(':').unwrap().0.to_string();
        assert!(ip == "127.0.0.3" || ip == "127.0.0.4", "upstream saw {peer}");
        seen.insert(ip);
    }
    assert_eq!(seen.len(), 2, "round robin over the pool: {seen:?}");
    let d = gw.decision(|e| e["dialled"].is_string());
    assert_eq!(d["egress_pool"], "fixed");
    assert!(d["egress_source"].as_str().unwrap().starts_with("127.0.0."), "{d}");
}

#[test]
fn socks5_username_password_authentication() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let extra = "socks5: {users: [{username: alice, password: s3cret}]}\n";
    let gw = Gateway::start(&dns, &format!("{}{extra}", config(up.addr.port(), "")));
    let url = format!("http://up.test:{}/", up.addr.port());
    let ok = curl(&["--socks5-hostname", &socks(&gw), "--proxy-user", "alice:s3cret", &url]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let bad = curl(&["--socks5-hostname", &socks(&gw), "--proxy-user", "alice:wrong", &url]);
    assert_eq!(bad.status, 0);
    assert_ne!(bad.exit, 0);
    gw.decision(|e| e["decision"]["reason"] == "auth_failed");
    let none = curl(&["--socks5-hostname", &socks(&gw), &url]);
    assert_ne!(none.exit, 0);
    // The password never reaches the audit trail.
    let all = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(!all.contains("wrong") && !all.contains("s3cret"));
}

#[test]
fn socks5_protocol_errors_get_the_right_reply_codes() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    // BIND (0x02) -> 0x07
    let out = raw_exchange(gw.socks, &[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80], Duration::from_secs(5));
    assert_eq!(&out[..4], &[5, 0, 5, 7], "{out:?}");
    // ... and then a clean close, never a reset, even with unread bytes left behind (the rest
    // of the refused request, data sent ahead): a reset can destroy the reply in flight.
    let mut c = TcpStream::connect(gw.socks).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = vec![5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80];
    hello.extend_from_slice(&[0x42; 3000]);
    c.write_all(&hello).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).expect("a clean close (FIN), not a reset");
    assert_eq!(&out[..4], &[5, 0, 5, 7], "{out:?}");
    // address type 0x05 -> 0x08
    let out = raw_exchange(gw.socks, &[5, 1, 0, 5, 1, 0, 5, 1, 2, 3, 4, 0, 80], Duration::from_secs(5));
    assert_eq!(&out[..4], &[5, 0, 5, 8], "{out:?}");
    // connection refused -> 0x05 (nothing listens on the rule's port at 127.0.0.2 after drop)
    let p = up.addr.port();
    drop(up);
    let (_, code) = socks5_domain(gw.socks, "up.test", p);
    assert_eq!(code, 0x05);
    // unknown name -> 0x04
    let (_, code) = socks5_domain(gw.socks, "nxdomain.up.test", p);
    assert_eq!(code, 0x04);
    // IPv4 and IPv6 address types reach policy (and the guard)
    let out = raw_exchange(gw.socks, &[5, 1, 0, 5, 1, 0, 1, 169, 254, 169, 254, 0, 80], Duration::from_secs(5));
    assert_eq!(&out[..4], &[5, 0, 5, 2], "{out:?}");
    let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
    v6.extend_from_slice(&"::ffff:169.254.169.254".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v6.extend_from_slice(&[0, 80]);
    let out = raw_exchange(gw.socks, &v6, Duration::from_secs(5));
    assert_eq!(&out[..4], &[5, 0, 5, 2], "{out:?}");
    // not SOCKS5 at all: closed, audited, and the gateway keeps serving
    let out = raw_exchange(gw.socks, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(5));
    assert!(out.is_empty());
    for r in ["unsupported_command", "unsupported_address_type", "dns_failure", "guard_blocked", "malformed_request"] {
        gw.wait_reason(r);
    }
}

#[test]
fn hostile_http_input_gets_a_protocol_answer_and_an_audit_event() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(
        &dns,
        &format!("{}limits: {{headerTimeout: 1s, maxHeaderBytes: 16384}}\n", config(up.addr.port(), "")),
    );
    // origin-form to the proxy port: answered by the proxy, never forwarded
    let out = raw_exchange(gw.http, b"GET /admin HTTP/1.1\r\nHost: up.test\r\n\r\n", Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("origin_form"), "{text}");
    // garbage request line
    let out = raw_exchange(gw.http, b"\x16\x03\x01 not http at all\r\n\r\n", Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"), "{out:?}");
    // oversized headers
    let big = format!(
        "GET http://up.test:{}/ HTTP/1.1\r\nHost: up.test\r\nX-Big: {}\r\n\r\n",
        up.addr.port(),
        "a".repeat(40_000)
    );
    let out = raw_exchange(gw.http, big.as_bytes(), Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"), "{}", String::from_utf8_lossy(&out));
    // slow client: half a request head, then silence
    let mut slow = TcpStream::connect(gw.http).unwrap();
    slow.write_all(b"GET http://up.test/ HTTP/1.1\r\nHo").unwrap();
    // an invalid host
    let out = raw_exchange(gw.http, b"GET http://a..b/ HTTP/1.1\r\nHost: a..b\r\n\r\n", Duration::from_secs(5));
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400")
            || String::from_utf8_lossy(&out).starts_with("HTTP/1.1 403"),
        "{out:?}"
    );
    // https:// in absolute form
    let out = raw_exchange(gw.http, b"GET https://up.test/ HTTP/1.1\r\nHost: up.test\r\n\r\n", Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"), "{out:?}");
    // meanwhile everyone else is served
    let r = curl(&["-x", &proxy(&gw), &format!("http://up.test:{}/", up.addr.port())]);
    assert_eq!(r.status, 200);
    for r in ["origin_form", "malformed_request", "header_timeout", "invalid_target"] {
        gw.wait_reason(r);
    }
    drop(slow);
}

#[test]
fn audit_events_carry_every_field() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    let r = curl(&["-p", "-x", &proxy(&gw), &format!("http://api.up.test:{p}/hello")]);
    assert_eq!(r.status, 200);
    let ev = gw.events_at_least(2);
    assert_eq!(ev.len(), 2, "{ev:#?}");
    let (d, c) = (&ev[0], &ev[1]);
    for e in [d, c] {
        assert_eq!(e["schema"], "egress.v1");
        assert_eq!(e["front"], "connect");
        assert_eq!(e["client"]["address"], "127.0.0.1");
        assert_eq!(e["client"]["namespace"], "shop");
        assert_eq!(e["client"]["name"], "api");
        assert_eq!(e["client"]["serviceAccount"], "api-sa");
        assert_eq!(e["client"]["labels"]["app"], "api");
        assert_eq!(e["target"]["host"], "api.up.test");
        assert_eq!(e["target"]["port"], p);
        assert_eq!(e["decision"]["action"], "allow");
        assert_eq!(e["decision"]["reason"], "rule_allow");
        assert_eq!(e["decision"]["policy"], "shop/api-egress");
        assert_eq!(e["decision"]["rule"], "upstream");
        assert_eq!(e["decision"]["mode"], "Enforce");
        assert_eq!(e["decision"]["guard_exempt"][0], "127.0.0.2/32");
        assert_eq!(e["dialled"], format!("127.0.0.2:{p}"));
        assert_eq!(e["egress_pool"], "default");
        assert!(e["egress_source"].as_str().unwrap().starts_with("127.0.0."));
        assert_eq!(e["id"].as_str().unwrap().len(), 36);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(d["event"], "decision");
    assert_eq!(c["event"], "close");
    assert_eq!(d["seq"], 1);
    assert_eq!(c["seq"], 2);
    assert_eq!(d["connection_id"], c["connection_id"]);
    assert_eq!(d["request_id"], c["request_id"]);
    assert_ne!(d["id"], c["id"]);
    assert_eq!(d["resolved"][0]["address"], "127.0.0.2");
    assert_eq!(d["resolved"][0]["verdict"], "exempt");
    assert!(c["close"]["bytes_up"].as_u64().unwrap() > 30);
    assert!(c["close"]["bytes_down"].as_u64().unwrap() > 30);
    assert!(c["close"]["duration_ms"].is_u64());
    assert_eq!(c["close"]["end"], "completed");
    // every line stays well under 8 KiB
    let text = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(text.lines().all(|l| l.len() < 8192));
}

#[test]
fn hot_reload_adds_and_removes_rules_without_dropping_open_tunnels_and_keeps_the_old_policy_when_invalid() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &config(p, ""));
    // an open tunnel
    let mut t = Raw::connect(gw.http);
    assert_eq!(t.exchange(&format!("CONNECT up.test:{p} HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n")).0, 200);
    let tunnel_get = |t: &mut Raw, path: &str| t.exchange(&format!("GET {path} HTTP/1.1\r\nHost: up.test\r\n\r\n")).0;
    assert_eq!(tunnel_get(&mut t, "/before"), 200);
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]).status, 200);
    // remove every allow
    let empty = "guard: {allowCidrs: [127.0.0.2/32]}\nclients: [{cidr: 127.0.0.1/32, namespace: shop, name: api, labels: {app: api}}]\npolicies:\n  - {apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {name: api-egress, namespace: shop}, spec: {podSelector: {}}}\n";
    gw.write_config(&dns, empty);
    wait_until(Duration::from_secs(10), || gw.metric("egress_config_reloads_total{result=\"ok\"}") >= Some(1.0));
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]).status, 403);
    assert_eq!(tunnel_get(&mut t, "/after-removal"), 200, "open tunnel survives the reload");
    // add it back
    gw.write_config(&dns, &config(p, ""));
    wait_until(Duration::from_secs(10), || gw.metric("egress_config_reloads_total{result=\"ok\"}") >= Some(2.0));
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]).status, 200);
    // an invalid config keeps the previous policy
    gw.write_config(&dns, &config(p, "  - {apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {name: bad, namespace: shop}, spec: {podSelector: {}, rules: [{to: [{domain: 'a.*.b'}]}]}}"));
    wait_until(Duration::from_secs(10), || gw.metric("egress_config_reloads_total{result=\"failed\"}") >= Some(1.0));
    assert_eq!(gw.metric("egress_config_reload_failing"), Some(1.0));
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]).status, 200);
    assert!(gw.log_text().contains("spec.rules[0].to[0].domain"), "{}", gw.log_text());
    // SIGHUP reloads too
    gw.write_config(&dns, empty);
    let mut gw = gw;
    gw.signal("HUP");
    wait_until(Duration::from_secs(10), || gw.metric("egress_config_reloads_total{result=\"ok\"}") >= Some(3.0));
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]).status, 403);
    assert_eq!(tunnel_get(&mut t, "/still-open"), 200);
}

#[test]
fn sigterm_stops_accepting_and_drains_open_connections() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let mut gw = Gateway::start(&dns, &format!("{}shutdown: {{grace: 20s}}\n", config(p, "")));
    let mut t = TcpStream::connect(gw.http).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(t, "CONNECT up.test:{p} HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n").unwrap();
    let mut tr = BufReader::new(t.try_clone().unwrap());
    assert_eq!(read_head(&mut tr).0, 200);
    gw.signal("TERM");
    wait_until(Duration::from_secs(5), || admin_get(gw.admin, "/readyz").map(|r| r.0) == Some(503));
    wait_until(Duration::from_secs(5), || TcpStream::connect(gw.http).is_err());
    // the open tunnel still works during the grace period
    write!(t, "GET /during-drain HTTP/1.1\r\nHost: up.test\r\n\r\n").unwrap();
    assert_eq!(read_head(&mut tr).0, 200);
    assert!(gw.child().try_wait().unwrap().is_none(), "still draining");
    drop(tr);
    drop(t);
    let status = gw.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    let ev = gw.events();
    let close = ev.iter().find(|e| e["event"] == "close").expect("close event written before exit");
    assert!(close["close"]["bytes_up"].as_u64().unwrap() > 0);
}

/// The end of `shutdown.grace`: a tunnel still open then is closed by the gateway (the client
/// reads the end of the stream), its close event says `shutdown` and is in the audit file when
/// the process exits (sinks flushed), and the exit is clean.
#[test]
fn at_the_end_of_the_grace_period_open_tunnels_are_closed_and_audited() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let mut gw = Gateway::start(&dns, &format!("{}shutdown: {{grace: 1s}}\n", config(p, "")));
    let t = TcpStream::connect(gw.http).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tr = BufReader::new(t.try_clone().unwrap());
    write!(&t, "CONNECT up.test:{p} HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n").unwrap();
    assert_eq!(read_head(&mut tr).0, 200);
    gw.signal("TERM");
    // The client keeps the tunnel open; the gateway ends it.
    let mut rest = Vec::new();
    let n = tr.read_to_end(&mut rest);
    assert!(matches!(n, Ok(0)), "closed by the gateway, not our read timeout: {n:?}");
    let status = gw.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let close = gw.events().into_iter().find(|e| e["event"] == "close").expect("close event flushed before exit");
    assert_eq!(close["close"]["end"], "shutdown", "{close}");
}

#[test]
fn policy_conformance_vectors() {
    let run = repo_root().join("../shared/vectors/run.sh");
    assert!(run.exists(), "{} is missing: the shared/ folder must sit beside the repository", run.display());
    let out = std::process::Command::new("bash").arg(&run).arg(gateway_bin()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(" 0 failed"), "{text}");
}

/// Without CAP_SYS_RESOURCE (a gateway that is not root, as the chart runs it) pipe sizes count
/// against a per-user kernel quota (`fs.pipe-user-pages-soft`, shared by every process of the
/// uid), and once it is spent the kernel hands out two-page pipes. A bulk tunnel then keeps
/// copying through user space instead: every byte arrives, and the metric says so. The test
/// spends the quota of its own uid (root) with pipes it holds, for the gateway it runs as root
/// without that capability.
#[test]
fn bulk_tunnels_past_the_pipe_quota_keep_copying_and_lose_nothing() {
    let soft: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft").unwrap().trim().parse().unwrap();
    if soft == 0 {
        eprintln!("fs.pipe-user-pages-soft is 0 (no quota) on this machine: nothing to exhaust");
        return;
    }
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let drop_caps = ["setpriv", "--bounding-set=-sys_resource,-sys_admin", "--inh-caps=-sys_resource,-sys_admin", "--"];
    let gw = Gateway::start_under(&dns, &drop_caps, &config(p, ""));
    const LEN: usize = 4 << 20;
    let want = pattern(LEN);
    let download = || {
        let mut s = TcpStream::connect(gw.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "CONNECT up.test:{p} HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        while line != "\r\n" {
            line.clear();
            r.read_line(&mut line).unwrap();
        }
        write!(r.get_mut(), "GET /bytes/{LEN} HTTP/1.1\r\nHost: up.test\r\nConnection: close\r\n\r\n").unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        let body = all.windows(4).position(|w| w == b"\r\n\r\n").map(|i| &all[i + 4..]).expect("a response head");
        assert!(body == want, "the tunnelled download arrived changed ({} bytes)", body.len());
    };
    let metric = |name: &str| gw.metric(&format!("egress_relay_{name}_total")).unwrap();
    // Within the quota: spliced.
    download();
    assert_eq!((metric("spliced"), metric("pipe_refused")), (1.0, 0.0));
    // Spend the quota: 1 MiB pipes (256 pages each) held by this process, same uid.
    let hog: Vec<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> = (0..soft / 256 + 1)
        .map(|_| {
            let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
            assert_eq!(rustix::pipe::fcntl_setpipe_size(&w, 1 << 20).unwrap(), 1 << 20);
            (r, w)
        })
        .collect();
    for _ in 0..3 {
        download();
    }
    assert_eq!((metric("spliced"), metric("pipe_refused")), (1.0, 3.0), "{}", gw.log_text());
    drop(hog);
    // The quota is back: spliced again.
    download();
    assert_eq!((metric("spliced"), metric("pipe_refused")), (2.0, 3.0));
}

/// A real HTTPS upstream (openssl s_server) through CONNECT and SOCKS5, with the client verifying
/// the upstream's certificate end to end: the gateway never touches TLS.
#[test]
fn https_upstream_through_connect_and_socks5() {
    let dns = dns();
    let tls = TlsUpstream::start("127.0.0.2", "up.test");
    let port = tls.addr.port();
    let gw = Gateway::start(&dns, &config(port, ""));
    let url = format!("https://up.test:{port}/");
    let cacert = tls.cert.display().to_string();
    let r = curl(&["--cacert", &cacert, "-x", &proxy(&gw), &url]);
    assert_eq!(r.status, 200, "CONNECT: {r:?}");
    let r = curl(&["--cacert", &cacert, "--socks5-hostname", &socks(&gw), &url]);
    assert_eq!(r.status, 200, "SOCKS5: {r:?}");
    let closes: Vec<Value> = gw.events_at_least(4).into_iter().filter(|e| e["event"] == "close").collect();
    assert_eq!(closes.len(), 2, "{closes:#?}");
    for c in closes {
        assert!(c["close"]["bytes_up"].as_u64().unwrap() > 200, "the ClientHello went through: {c}");
        assert!(c["close"]["bytes_down"].as_u64().unwrap() > 500, "certificate and page came back: {c}");
    }
}

/// Egress source pools, observed by an upstream in another network namespace: the gateway (and
/// its client) run in namespace `gw` holding 10.77.0.2 and 10.77.0.3; the upstream runs in `up`
/// at 10.77.0.1. Everything lives in namespaces this test creates and deletes.
#[test]
fn egress_pools_seen_from_an_upstream_in_another_network_namespace() {
    let (gwns, upns) =
        gateway_and_upstream_hosts("w", &["10.77.0.2/24", "10.77.0.3/24", "10.77.0.4/24"], "10.77.0.1/24");
    let up = Upstream::start_in(&upns, "10.77.0.1");
    let p = up.addr.port();
    let body = format!(
        r#"
egressAddresses:
  pinned: [10.77.0.3]
  pair: [10.77.0.2, 10.77.0.4]
clients:
  - {{cidr: 127.0.0.1/32, namespace: a, name: one, labels: {{app: one}}}}
  - {{cidr: 127.0.0.2/32, namespace: b, name: two, labels: {{app: two}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: pinned, namespace: a}}
    spec:
      podSelector: {{}}
      egressAddress: pinned
      rules: [{{name: up, to: [{{cidr: 10.77.0.1/32}}], ports: [{{port: {p}}}]}}]
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: pair, namespace: b}}
    spec:
      podSelector: {{}}
      egressAddress: pair
      rules: [{{name: up, to: [{{cidr: 10.77.0.0/24}}], ports: [{{port: {p}}}]}}]
"#
    );
    let gw = Gateway::start_with(None, Some(&gwns), &body);
    let url = format!("http://10.77.0.1:{p}/");
    let seen = |iface: &str, args: &[&str]| -> String {
        let px = format!("http://{}", gw.http);
        let mut a = vec!["--interface", iface];
        a.extend_from_slice(args);
        a.extend_from_slice(&[&px, &url]);
        let r = curl_in(Some(&gwns), &a);
        assert_eq!(r.status, 200, "{r:?} {}", gw.log_text());
        r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0.to_string()
    };
    for args in [&["-x"][..], &["-p", "-x"][..]] {
        assert_eq!(seen("127.0.0.1", args), "10.77.0.3", "client one always leaves from its pinned address");
    }
    let mut pair = std::collections::BTreeSet::new();
    for _ in 0..4 {
        pair.insert(seen("127.0.0.2", &["-x"]));
    }
    assert_eq!(pair.into_iter().collect::<Vec<_>>(), ["10.77.0.2", "10.77.0.4"]);
    // SOCKS5 too
    let r = curl_in(Some(&gwns), &["--interface", "127.0.0.1", "--socks5", &gw.socks.to_string(), &url]);
    assert_eq!(r.json()["peer"].as_str().unwrap().rsplit_once(':').unwrap().0, "10.77.0.3");
    // The gateway's own addresses are guarded even though a cidr rule covers them.
    let r = curl_in(
        Some(&gwns),
        &["--interface", "127.0.0.2", "-x", &format!("http://{}", gw.http), &format!("http://10.77.0.2:{p}/")],
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("reason: guard_blocked"), "{r:?}");
}

/// A source address from a pool shares its ports across destinations: the kernel picks the port
/// at connect time, per destination, not at bind time for all of them (IP_BIND_ADDRESS_NO_PORT).
/// The gateway's namespace has two ephemeral ports; four upstream connections from one source
/// address are held open at once (the keep-alive pool) and need that sharing.
#[test]
fn a_pool_source_address_shares_its_ports_across_destinations() {
    let (gwns, upns) = gateway_and_upstream_hosts("p", &["10.77.0.3/24"], "10.77.0.1/24");
    let ups: Vec<Upstream> = (0..4).map(|_| Upstream::start_in(&upns, "10.77.0.1")).collect();
    let ports: Vec<String> = ups.iter().map(|u| format!("{{port: {}}}", u.addr.port())).collect();
    let body = format!(
        "egressAddresses: {{pinned: [10.77.0.3]}}\nclients: [{{cidr: 127.0.0.1/32, namespace: a, name: one, labels: {{}}}}]\npolicies:\n  - {{apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {{name: p, namespace: a}}, spec: {{podSelector: {{}}, egressAddress: pinned, rules: [{{to: [{{cidr: 10.77.0.1/32}}], ports: [{}]}}]}}}}\n",
        ports.join(", ")
    );
    let gw = Gateway::start_with(None, Some(&gwns), &body);
    // Two ephemeral ports from now on (the listeners, on port 0, took theirs already).
    let range = gwns.command("sysctl").args(["-qw", "net.ipv4.ip_local_port_range=40000 40001"]).status().unwrap();
    assert!(range.success());
    // One client connection (one port of the two), four requests, four upstreams kept open.
    let px = format!("http://{}", gw.http);
    let mut args = vec!["-x", &px];
    let urls: Vec<String> = ups.iter().map(|u| format!("http://10.77.0.1:{}/", u.addr.port())).collect();
    args.extend(urls.iter().map(String::as_str));
    let r = curl_in(Some(&gwns), &args);
    assert_eq!(r.body.matches("\"peer\":\"10.77.0.3:").count(), 4, "{r:?} {}", gw.log_text());
}

#[test]
fn userinfo_in_the_url_never_changes_the_decided_host() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    // The host is what follows '@': up.test is decided, and the upstream sees exactly that.
    let req =
        format!("GET http://meta.test:{p}@up.test:{p}/x HTTP/1.1\r\nHost: meta.test\r\nConnection: close\r\n\r\n");
    let out = String::from_utf8_lossy(&raw_exchange(gw.http, req.as_bytes(), Duration::from_secs(5))).to_string();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(&format!("\"host\":\"up.test:{p}\"")), "{out}");
    let d = gw.decision(|e| e["target"]["http"]["path"] == "/x");
    assert_eq!(d["target"]["host"], "up.test");
}

/// Upstream failures: refused -> 502 / SOCKS 0x05, silently dropped -> 504 / SOCKS 0x04 after
/// `limits.connectTimeout`; each audited as an allow followed by a `connect_failed` close.
#[test]
fn upstream_refused_and_timed_out_connects() {
    let (gwns, upns) = gateway_and_upstream_hosts("f", &["10.78.0.2/24"], "10.78.0.1/24");
    // In the upstream namespace, SYNs to port 9 vanish.
    upns.exec_ok("nft", &["add", "table", "inet", "t"]);
    upns.exec_ok("nft", &["add", "chain", "inet", "t", "in", "{ type filter hook input priority 0; }"]);
    upns.exec_ok("nft", &["add", "rule", "inet", "t", "in", "tcp", "dport", "9", "drop"]);
    let body = r#"
limits: {connectTimeout: 1s}
clients: [{cidr: 127.0.0.1/32, namespace: a, name: one, labels: {}}]
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {name: p, namespace: a}
    spec:
      podSelector: {}
      rules: [{name: up, to: [{cidr: 10.78.0.1/32}], ports: [{port: 9}, {port: 10}]}]
"#;
    let gw = Gateway::start_with(None, Some(&gwns), body);
    let px = format!("http://{}", gw.http);
    let r = curl_in(Some(&gwns), &["-x", &px, "http://10.78.0.1:10/"]);
    assert_eq!(r.status, 502, "refused: {r:?}");
    let r = curl_in(Some(&gwns), &["-x", &px, "http://10.78.0.1:9/"]);
    assert_eq!(r.status, 504, "dropped: {r:?}");
    let r = curl_in(Some(&gwns), &["-p", "-x", &px, "http://10.78.0.1:9/"]);
    assert_ne!(r.exit, 0, "CONNECT to a dropped port: {r:?}");
    let socks_reply = |port: u8| {
        let addr = gw.socks;
        gwns.enter(move || {
            let out = raw_exchange(addr, &[5, 1, 0, 5, 1, 0, 1, 10, 78, 0, 1, 0, port], Duration::from_secs(5));
            out.get(3).copied()
        })
    };
    assert_eq!(socks_reply(10), Some(0x05), "SOCKS5 refused");
    assert_eq!(socks_reply(9), Some(0x04), "SOCKS5 connect timed out: host unreachable");
    let ev = gw.events_at_least(10);
    let failed: Vec<&Value> = ev.iter().filter(|e| e["close"]["end"] == "connect_failed").collect();
    assert_eq!(failed.len(), 5, "{ev:#?}");
    for f in failed {
        let d = ev.iter().find(|e| e["event"] == "decision" && e["request_id"] == f["request_id"]).unwrap();
        assert_eq!(d["decision"]["action"], "allow");
    }
}

/// The README's quick-start config stays valid and decides what the README says.
#[test]
fn quick_start_example_is_valid() {
    let cfg = repo_root().join("examples/gateway.yaml");
    let v = std::process::Command::new(gateway_bin()).args(["validate", "--config"]).arg(&cfg).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let check = |target: &str| {
        std::process::Command::new(gateway_bin())
            .args(["check", "--no-resolve", "--client", "127.0.0.1", "--config"])
            .arg(&cfg)
            .arg(target)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(check("http://example.com/"), Some(0));
    assert_eq!(check("https://example.com"), Some(0));
    assert_eq!(check("http://example.org/"), Some(1));
    assert_eq!(check("http://169.254.169.254/latest/meta-data/"), Some(1));
    assert_eq!(check("http://2852039166/"), Some(1));
    assert_eq!(check("https://www.pastebin.com"), Some(1));
}

/// An upstream that closes idle keep-alive connections (without saying so) does not cost the
/// next request on the client's connection: the gateway notices and dials again.
#[test]
fn an_upstream_closing_an_idle_connection_is_redialled() {
    let dns = dns();
    let upstream = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let p = upstream.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let (closed_tx, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in upstream.incoming().take(4) {
            let Ok(mut c) = conn else { return };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            while std::io::BufRead::read_line(&mut r, &mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            std::thread::sleep(Duration::from_millis(100));
            drop(c); // idle close, no Connection: close
            let _ = closed_tx.send(());
        }
    });
    let gw = Gateway::start(&dns, &config(p, ""));
    let mut c = Raw::connect(gw.http);
    for i in 0..2 {
        let (status, _) = c.exchange(&format!("GET http://up.test:{p}/{i} HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n"));
        assert_eq!(status, 200, "request {i}");
        // The upstream has closed the pooled connection before the next request is sent.
        closed.recv_timeout(Duration::from_secs(10)).expect("the upstream closed its connection");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the second request got a fresh upstream connection"
    );
}

/// The keep-alive race: an upstream gives up an idle connection just as the next request goes
/// out on it, so the request meets a closed connection and no answer (here the upstream reads the
/// second request of every connection and closes without a word). The gateway sends an
/// idempotent request without a body once more, on a new connection, decided and audited again
/// under the same request id (RFC 9110 section 9.2.2). A POST, or a request with a body, is never
/// sent twice (502), and a new connection that fails the same way is an upstream error, not a
/// reason to go on (502).
#[test]
fn a_request_lost_to_an_idle_close_is_retried_once_on_a_new_connection_only_when_idempotent() {
    let dns = dns();
    let upstream = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let p = upstream.local_addr().unwrap().port();
    // (upstream connection, request line) in the order the upstream read them.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(usize, String)>::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (i, conn) in upstream.incoming().enumerate() {
            let Ok(mut c) = conn else { return };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().unwrap());
                for n in 0.. {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0;
                    let mut h = String::new();
                    while r.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        h.clear();
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    log.lock().unwrap().push((i, line.trim_end().to_string()));
                    if n > 0 || line.contains("/never") {
                        return; // closed without an answer
                    }
                    c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
                }
            });
        }
    });
    let gw = Gateway::start(&dns, &config(p, ""));
    let mut c = Raw::connect(gw.http);
    let host = format!("up.test:{p}");
    let mut statuses = Vec::new();
    // Each request here finds the upstream connection the one before it left (a failed request
    // leaves none).
    let requests = ["GET /a", "GET /b", "DELETE /c", "PUT /d", "GET /e", "POST /f", "GET /g", "GET /never"];
    for req in requests {
        let body = if req == "PUT /d" { "Content-Length: 1\r\n\r\nx" } else { "Content-Length: 0\r\n\r\n" };
        let (method, path) = req.split_once(' ').unwrap();
        let (status, _) = c.exchange(&format!("{method} http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{body}"));
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 502, 200, 502, 200, 502],
        "GET /b and DELETE /c went again; PUT /d (a body) and POST /f did not; GET /never went twice at most"
    );
    let seen: Vec<(usize, String)> = seen.lock().unwrap().clone();
    let expected: Vec<(usize, String)> = [
        (0, "GET /a"),
        (0, "GET /b"),
        (1, "GET /b"),
        (1, "DELETE /c"),
        (2, "DELETE /c"),
        (2, "PUT /d"),
        (3, "GET /e"),
        (3, "POST /f"),
        (4, "GET /g"),
        (4, "GET /never"),
        (5, "GET /never"),
    ]
    .iter()
    .map(|(i, r)| (*i, format!("{r} HTTP/1.1")))
    .collect();
    assert_eq!(seen, expected, "each request went out as many times as it should, on the connections it should");
    // The retried request: two allows and two closes under one request id, the first close
    // saying that the reused connection was lost and the request sent again.
    let events = gw.events_at_least(22);
    let of = |path: &str| -> Vec<&Value> { events.iter().filter(|e| e["target"]["http"]["path"] == path).collect() };
    let b = of("/b");
    let kinds: Vec<(&str, &str)> =
        b.iter().map(|e| (e["event"].as_str().unwrap(), e["decision"]["action"].as_str().unwrap())).collect();
    assert_eq!(kinds, [("decision", "allow"), ("close", "allow"), ("decision", "allow"), ("close", "allow")]);
    assert!(b.iter().all(|e| e["request_id"] == b[0]["request_id"]), "{b:#?}");
    assert_eq!(b[1]["close"]["end"], "upstream_closed", "{:#}", b[1]);
    assert!(b[1]["close"]["error"].as_str().unwrap().contains("sent again on a new connection"), "{:#}", b[1]);
    assert_eq!(b[3]["close"]["end"], "completed", "{:#}", b[3]);
    assert_eq!(of("/c").len(), 4, "DELETE /c was sent twice, audited twice");
    assert_eq!(of("/never").len(), 4, "GET /never was sent twice, audited twice");
    for once in ["/d", "/f"] {
        let e = of(once);
        assert_eq!(e.len(), 2, "one allow and one close: {e:#?}");
        assert_eq!(e[1]["close"]["end"], "upstream_closed", "{:#}", e[1]);
    }
}

/// The request sent once more after the keep-alive race does not take a second token from the
/// client's rate limit: a client within its burst gets its answer, not a 429 it never earned.
/// The limiter stays in force for the client's next requests.
#[test]
fn a_request_sent_again_after_an_idle_close_takes_no_second_rate_limit_token() {
    let dns = dns();
    let upstream = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let p = upstream.local_addr().unwrap().port();
    // Answers the first request of each connection, and closes on the second without answering.
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().unwrap());
                for n in 0.. {
                    let mut line = String::new();
                    while r.read_line(&mut line).map(|k| k > 2).unwrap_or(false) {
                        line.clear();
                    }
                    if n > 0 || line.is_empty() {
                        return;
                    }
                    c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
                }
            });
        }
    });
    let body = rate_limited_policy(p, 2);
    let gw = Gateway::start(&dns, &body);
    let mut c = Raw::connect(gw.http);
    let host = format!("up.test:{p}");
    let get = |c: &mut Raw, path: &str| {
        c.exchange(&format!("GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n")).0
    };
    // Two tokens: /a, then /b, which meets the idle close and goes again on a new connection.
    assert_eq!(get(&mut c, "/a"), 200);
    assert_eq!(get(&mut c, "/b"), 200, "the resend took a second token");
    let b: Vec<Value> = gw.events_at_least(6).into_iter().filter(|e| e["target"]["http"]["path"] == "/b").collect();
    let decisions: Vec<&str> =
        b.iter().filter(|e| e["event"] == "decision").map(|e| e["decision"]["action"].as_str().unwrap()).collect();
    assert_eq!(decisions, ["allow", "allow"], "both attempts decided and audited: {b:#?}");
    // The bucket is empty now: the next requests get 429 until it refills (no wall-clock
    // assertion: a slow machine only refills it, so ask until the 429 comes).
    let mut codes = Vec::new();
    while !codes.contains(&429) {
        assert!(codes.len() < 20, "no 429: {codes:?}");
        codes.push(get(&mut c, &format!("/c{}", codes.len())));
    }
}

/// A resolver that answers A but never AAAA (some middleboxes drop AAAA queries): hickory caches
/// no failure, so without a hold every request would ask again and wait for AAAA to time out.
/// The first request waits for AAAA at most `SECOND_FAMILY_WAIT`; then AAAA is not asked for the
/// name while the hold lasts, and requests go on with the IPv4 answer.
#[test]
fn a_family_the_resolver_never_answers_is_held_not_asked_again_per_request() {
    let dns = SilentAaaaDns::start(&[("v4only.test", std::net::Ipv4Addr::new(127, 0, 0, 2))]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let spec = format!(
        "      rules: [{{to: [{{domain: v4only.test}}, {{domain: \"*.v4only.test\"}}], ports: [{{port: {p}}}]}}]"
    );
    let gw = Gateway::start_with(Some(dns.addr), None, &single_policy("v4only", &spec, ""));
    let url = format!("http://v4only.test:{p}/x");
    let r = curl(&["-x", &proxy(&gw), &url]);
    assert_eq!(r.status, 200, "{r:?}");
    let aaaa = dns.queries(28);
    assert!(aaaa >= 1, "the gateway asked for AAAA once");
    assert_eq!(gw.metric("egress_dns_family_held_total"), Some(1.0));
    let d = gw.decision(|e| e["target"]["host"] == "v4only.test");
    assert_eq!(d["resolved"].as_array().unwrap().len(), 1, "{d}");
    for _ in 0..5 {
        let r = curl(&["-x", &proxy(&gw), &url]);
        assert_eq!(r.status, 200, "{r:?}");
        let r = curl(&["-p", "-x", &proxy(&gw), &url]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(dns.queries(28), aaaa, "AAAA is not asked again while it is held");
    assert_eq!(gw.metric("egress_dns_family_held_total"), Some(1.0));
    // A name the server does not know: NXDOMAIN on A is about the name, so the gateway does not
    // wait for the AAAA answer that never comes (curl would give up after 10 s), and puts nothing
    // on hold (NXDOMAIN is an answer, not a failure).
    let r = curl(&["-x", &proxy(&gw), &format!("http://nothere.v4only.test:{p}/")]);
    assert_eq!(r.status, 502, "{r:?}");
    let d = gw.decision(|e| e["target"]["host"] == "nothere.v4only.test");
    assert_eq!(d["decision"]["reason"], "dns_failure", "{d}");
    // The detail is a sentence naming the name and the outcome, not resolver debug text.
    assert_eq!(d["decision"]["detail"], "nothere.v4only.test: no such name (NXDOMAIN)", "{d}");
    assert!(r.body.contains("detail: nothere.v4only.test: no such name (NXDOMAIN)"), "{r:?}");
    assert_eq!(gw.metric("egress_dns_family_held_total"), Some(1.0));
}

/// A nameserver that never answers: each request gets its `dns_failure` answer once
/// `resolver.timeout` has passed (here 1 s; hickory's own retries would take over 10 s), through
/// every front, with the deadline named in the detail.
#[test]
fn a_silent_nameserver_fails_requests_at_the_resolver_timeout() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let spec = format!("      rules: [{{to: [{{domain: up.test}}], ports: [{{port: {p}}}]}}]");
    let resolver = format!("resolver: {{nameservers: [{}], timeout: 1s}}", silent.local_addr().unwrap());
    let gw = Gateway::start_with(None, None, &single_policy("silent", &spec, &resolver));
    let url = format!("http://up.test:{p}/");
    let r = curl(&["-x", &proxy(&gw), &url]);
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains("reason: dns_failure"), "{r:?}");
    assert!(r.body.contains("detail: up.test: no answer within resolver.timeout (1s)"), "{r:?}");
    let r = curl(&["--socks5-hostname", &socks(&gw), &url]);
    assert_eq!(r.exit, 97, "SOCKS5 refusal (host unreachable): {r:?}");
    let d = gw.decision(|e| e["front"] == "socks5");
    assert_eq!(d["decision"]["reason"], "dns_failure", "{d}");
}

/// A lost DNS datagram is sent again (hickory retransmits after about its measured round trip,
/// with a floor) well within `resolver.timeout`: the deadline does not turn one lost packet into
/// a failed request.
#[test]
fn a_lost_dns_query_is_retried_within_the_resolver_timeout() {
    let dns = SilentAaaaDns::losing(&[("up.test", std::net::Ipv4Addr::new(127, 0, 0, 2))], 1);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let spec = format!("      rules: [{{to: [{{domain: up.test}}], ports: [{{port: {p}}}]}}]");
    // The default resolver.timeout (5s).
    let gw = Gateway::start_with(Some(dns.addr), None, &single_policy("lossy", &spec, ""));
    let r = curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(dns.queries(1) >= 2, "the A query was sent again");
}

/// CNAME chains: the policy decides on the name the client asked for; the addresses at the end
/// of the chain are what the guard checks and what is dialled.
#[test]
fn cname_chains_resolve_to_checked_addresses() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    let r = curl(&["-x", &proxy(&gw), &format!("http://alias.up.test:{p}/c")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/c");
    let d = gw.decision(|e| e["target"]["host"] == "alias.up.test");
    assert_eq!(d["resolved"][0]["address"], "127.0.0.2", "{d}");
    // Allowed by *.up.test, but the chain ends at the metadata address: the guard blocks it.
    let r = curl(&["-x", &proxy(&gw), &format!("http://alias-meta.up.test:{p}/")]);
    assert_eq!(r.status, 403, "{r:?}");
    let d = gw.decision(|e| e["target"]["host"] == "alias-meta.up.test");
    assert_eq!(d["decision"]["reason"], "dns_guard_blocked", "{d}");
    assert_eq!(d["resolved"][0]["address"], "169.254.169.254", "{d}");
}

/// A refusal names its reason and request id in `X-Egress-Reason` / `X-Egress-Request-Id` (what
/// applications and their logs can read without the audit trail), the same as the audit's.
#[test]
fn refusals_carry_their_reason_and_request_id_in_headers() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let gw = Gateway::start(&dns, &config(up.addr.port(), ""));
    let p = up.addr.port();
    for (req, status, reason) in [
        (
            format!("GET http://nothing-allows.test:{p}/ HTTP/1.1\r\nHost: nothing-allows.test\r\n\r\n"),
            403,
            "no_rule_matched",
        ),
        (format!("CONNECT meta.test:{p} HTTP/1.1\r\nHost: meta.test:{p}\r\n\r\n"), 403, "dns_guard_blocked"),
        ("GET / HTTP/1.1\r\nHost: up.test\r\n\r\n".to_string(), 400, "origin_form"),
    ] {
        let mut s = TcpStream::connect(gw.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let (code, headers) = read_head(&mut BufReader::new(s));
        assert_eq!(code, status, "{req}");
        assert_eq!(headers.get("x-egress-reason").map(String::as_str), Some(reason), "{req}: {headers:?}");
        let id = headers.get("x-egress-request-id").unwrap_or_else(|| panic!("{req}: {headers:?}"));
        let ev = gw.request_events(id);
        assert_eq!(ev[0]["decision"]["reason"], reason, "{req}: the audited request");
    }
}

/// Internal addresses (RFC 1918 here) as IP literals: allowed other than by a `cidr` rule (here
/// `defaultAction: Allow` for a client no policy selects) they are still refused
/// (`guard_internal`); a `cidr` rule that names them opens them.
#[test]
fn internal_ip_literals_need_a_cidr_rule() {
    // In a namespace of its own: the allowed case dials 10.40.1.2, which must not leave this
    // machine (nothing answers there; the decision is what is checked).
    let ns = Netns::new("intl");
    let body = "defaultAction: Allow\nclients: [{cidr: 127.0.0.1/32, namespace: a, name: free, labels: {}}, {cidr: 127.0.0.5/32, namespace: a, name: db-client, labels: {app: db}}]\npolicies:\n  - {apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {name: p, namespace: a}, spec: {podSelector: {matchLabels: {app: db}}, rules: [{name: db, to: [{cidr: 10.40.0.0/16}], ports: [{port: 5432}]}]}}\n";
    let gw = Gateway::start_with(None, Some(&ns), body);
    let connect = |from: &'static str| {
        let http = gw.http;
        ns.enter(move || {
            let mut s = connect_from(from, http);
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(s, "CONNECT 10.40.1.2:5432 HTTP/1.1\r\nHost: 10.40.1.2:5432\r\n\r\n").unwrap();
            read_head(&mut BufReader::new(s)).0
        })
    };
    assert_eq!(connect("127.0.0.1"), 403);
    let d = gw.decision(|e| e["client"]["address"] == "127.0.0.1");
    assert_eq!(d["decision"]["reason"], "guard_internal", "{d}");
    assert!(d["decision"]["guard_category"].is_string(), "{d}");
    // The cidr rule opens it: allowed (the connect itself then fails: nothing is there).
    assert_ne!(connect("127.0.0.5"), 403);
    let d = gw.decision(|e| e["client"]["address"] == "127.0.0.5");
    assert_eq!((d["decision"]["action"].as_str(), d["decision"]["rule"].as_str()), (Some("allow"), Some("db")), "{d}");
}

/// A policy's egress address pool with no address of the destination's family: refused before
/// any dial, as `egress_address_unavailable` (never from another address).
#[test]
fn a_pool_without_the_destinations_family_is_egress_address_unavailable() {
    let dns = dns();
    let body = "egressAddresses: {v4only: [127.0.0.1]}\nclients: [{cidr: 127.0.0.1/32, namespace: a, name: one, labels: {}}]\npolicies:\n  - {apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {name: p, namespace: a}, spec: {podSelector: {}, egressAddress: v4only, rules: [{to: [{cidr: \"2001:db8:40::/48\"}], ports: [{port: 5432}]}]}}\n";
    let gw = Gateway::start(&dns, body);
    let mut s = TcpStream::connect(gw.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT [2001:db8:40::5]:5432 HTTP/1.1\r\nHost: [2001:db8:40::5]:5432\r\n\r\n").unwrap();
    let (code, headers) = read_head(&mut BufReader::new(s));
    assert_eq!(code, 403);
    assert_eq!(headers.get("x-egress-reason").map(String::as_str), Some("egress_address_unavailable"));
    let d = gw.decision(|e| e["decision"]["reason"] == "egress_address_unavailable");
    assert!(d.get("dialled").is_none_or(|x| x.is_null()), "{d}");
}

/// `limits.idleTimeout`: a tunnel with no traffic either way is closed by the gateway (the client
/// reads the end of the stream, well before its own 20 s timeout) and its close event says why.
#[test]
fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &config(p, "limits: {idleTimeout: 1s}"));
    let mut s = TcpStream::connect(gw.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "CONNECT up.test:{p} HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    // Nothing is sent: the gateway ends the tunnel (EOF), it is not our read timeout.
    let mut rest = Vec::new();
    let n = r.read_to_end(&mut rest);
    assert!(matches!(n, Ok(0)), "{n:?} {rest:?}");
    wait_until(Duration::from_secs(5), || gw.events().iter().any(|e| e["event"] == "close"));
    let c = gw.events().into_iter().find(|e| e["event"] == "close").unwrap();
    assert_eq!(c["close"]["end"], "idle_timeout", "{c}");
}

/// Reload through a Kubernetes ConfigMap mount: the config file is a symlink through `..data`,
/// and an update swaps `..data` to a new directory in one rename (the kubelet's atomic writer);
/// the file itself never changes in place. The new policy takes effect without a restart.
#[test]
fn a_configmap_style_data_symlink_swap_reloads_the_config() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &config(p, ""));
    let dir = gw.dir.path();
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let swap = |version: &str, text: &str| {
        std::fs::create_dir_all(dir.join(version)).unwrap();
        std::fs::write(dir.join(version).join("gateway.yaml"), text).unwrap();
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(version, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    // Turn the plain file into the ConfigMap layout (same content).
    swap("..2026_11_28_v1", &text);
    let link = dir.join(".gateway.yaml.link");
    std::os::unix::fs::symlink("..data/gateway.yaml", &link).unwrap();
    std::fs::rename(&link, gw.config_path()).unwrap();
    let url = format!("http://other.test:{p}/x");
    assert_eq!(curl(&["-x", &proxy(&gw), &url]).status, 403, "only GET /ok and /api/* on other.test");
    let reloads = gw.metric("egress_config_reloads_total{result=\"ok\"}").unwrap_or(0.0);
    // The update: a policy that allows other.test whole.
    let late = "  - {apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {name: late, namespace: shop}, spec: {podSelector: {matchLabels: {app: api}}, rules: [{name: late, to: [{domain: other.test}]}]}}\n";
    swap("..2026_11_28_v2", &format!("{text}{late}"));
    wait_until(Duration::from_secs(10), || curl(&["-x", &proxy(&gw), &url]).status == 200);
    assert_eq!(
        gw.decision(|e| e["target"]["http"]["path"] == "/x" && e["decision"]["action"] == "allow")["decision"]["rule"],
        "late"
    );
    assert!(gw.metric("egress_config_reloads_total{result=\"ok\"}").unwrap_or(0.0) > reloads);
}

/// A cluster Deny CIDR through the listeners: an allowed name whose resolution includes a denied
/// address is dialled only at the other address (the denied one is audited as removed, and a
/// canary there sees nothing); a name that resolves only into the denied range is `cluster_deny`.
#[test]
fn a_cluster_deny_cidr_is_removed_from_an_allowed_names_resolution() {
    let dns = Dns::start(&[("two.test", "127.0.0.2"), ("two.test", "127.0.0.3"), ("three.test", "127.0.0.3")]);
    let (up, canary) = upstreams_on_one_port();
    let p = up.addr.port();
    let body = format!(
        "guard: {{allowCidrs: [127.0.0.2/32, 127.0.0.3/32]}}\nclients: [{{cidr: 127.0.0.1/32, namespace: a, name: one, labels: {{}}}}]\npolicies:\n  - {{apiVersion: egress.dev/v1alpha1, kind: EgressPolicy, metadata: {{name: p, namespace: a}}, spec: {{podSelector: {{}}, rules: [{{name: names, to: [{{domain: two.test}}, {{domain: three.test}}], ports: [{{port: {p}}}]}}]}}}}\n  - {{apiVersion: egress.dev/v1alpha1, kind: ClusterEgressPolicy, metadata: {{name: platform}}, spec: {{namespaceSelector: {{}}, podSelector: {{}}, rules: [{{name: no-three, action: Deny, to: [{{cidr: 127.0.0.3/32}}]}}]}}}}\n"
    );
    let gw = Gateway::start(&dns, &body);
    for front in ["http", "connect"] {
        let url = format!("http://two.test:{p}/{front}");
        let r = if front == "http" { curl(&["-x", &proxy(&gw), &url]) } else { curl(&["-p", "-x", &proxy(&gw), &url]) };
        let d = gw.decision(|e| e["target"]["host"] == "two.test" && e["front"] == front);
        assert_eq!(r.status, 200, "{front}: {r:?} {d}");
        assert_eq!(d["dialled"], format!("127.0.0.2:{p}"), "{d}");
        let removed: Vec<&Value> =
            d["resolved"].as_array().unwrap().iter().filter(|r| r["denied_by"].is_string()).collect();
        assert_eq!(removed.len(), 1, "{d}");
        assert_eq!(
            (removed[0]["address"].as_str(), removed[0]["denied_by"].as_str()),
            (Some("127.0.0.3"), Some("platform/no-three"))
        );
    }
    let r = curl(&["-x", &proxy(&gw), &format!("http://three.test:{p}/")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("reason: cluster_deny"), "{r:?}");
    assert_eq!(canary.hits(), 0, "the denied address was never dialled");
}

/// Sends `bytes` (ignoring a write cut short by the gateway closing) and reads until close.
fn exchange_lossy(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// Defects found by trying the gateway as an attacker would, each answered as the protocol
/// says and audited: a request head over `maxHeaderBytes` sent in one write (431, never
/// forwarded); a CONNECT request announcing content (400: those bytes would be swallowed or
/// tunnelled); a malformed chunked request body (the client's fault: 400, and the close event
/// says `client_error`, not `upstream_closed`).
#[test]
fn hard_limits_on_heads_connect_without_content_and_bad_bodies_are_the_clients_fault() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &config(p, ""));
    // 100 KiB of header in one write, against the default 64 KiB.
    let big = format!(
        "GET http://up.test:{p}/big HTTP/1.1\r\nHost: up.test:{p}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = exchange_lossy(gw.http, big.as_bytes());
    assert!(out.starts_with("HTTP/1.1 431"), "{}", &out[..out.len().min(200)]);
    // CONNECT with a body.
    let out = exchange_lossy(
        gw.http,
        format!("CONNECT up.test:{p} HTTP/1.1\r\nHost: up.test:{p}\r\nContent-Length: 5\r\n\r\nhello").as_bytes(),
    );
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("a CONNECT request carries no content"), "{out}");
    let d = gw.decision(|e| e["front"] == "connect");
    assert_eq!(d["decision"]["reason"], "malformed_request", "{d}");
    // Nothing of either reached the upstream; the positive control does.
    assert_eq!(up.hits(), 0);
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/ok")]).status, 200);
    assert_eq!(up.hits(), 1);
    // A malformed chunk size in the request body.
    let bad = format!(
        "POST http://up.test:{p}/chunked HTTP/1.1\r\nHost: up.test:{p}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    );
    let out = exchange_lossy(gw.http, bad.as_bytes());
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("malformed request body"), "{out}");
    let is_close = |e: &Value| e["event"] == "close" && e["target"]["http"]["path"] == "/chunked";
    wait_for("the close event", Duration::from_secs(10), || gw.events().iter().any(is_close));
    let close = gw.events().into_iter().find(is_close).unwrap();
    assert_eq!(close["close"]["end"], "client_error", "{close}");
}

/// An idle keep-alive connection that reaches `headerTimeout` after its request was answered
/// is closed quietly: no decision (a `header_timeout` denial per pooled client connection would
/// be a false denial in every report). A request that started and did not finish in time is
/// still one (the positive control).
#[test]
fn an_idle_keep_alive_connection_times_out_without_a_false_denial() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &format!("{}limits: {{headerTimeout: 1s}}\n", config(p, "")));
    let mut c = Raw::connect(gw.http);
    assert_eq!(c.exchange(&format!("GET http://up.test:{p}/pooled HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n")).0, 200);
    // Idle until the gateway closes it.
    let mut rest = Vec::new();
    assert_eq!(c.r.read_to_end(&mut rest).unwrap(), 0, "closed without a response");
    let conn = gw.decision(|e| e["target"]["http"]["path"] == "/pooled")["connection_id"].clone();
    // The positive control: half a head, then silence.
    let out = exchange_lossy(gw.http, format!("GET http://up.test:{p}/half HTTP/1.1\r\nHo").as_bytes());
    assert!(out.starts_with("HTTP/1.1 408") || out.is_empty(), "{out}");
    gw.wait_reason("header_timeout");
    let of_conn: Vec<Value> = gw.events().into_iter().filter(|e| e["connection_id"] == conn).collect();
    assert_eq!(of_conn.len(), 2, "one decision and its close, nothing else: {of_conn:#?}");
    assert!(of_conn.iter().all(|e| e["decision"]["reason"] != "header_timeout"), "{of_conn:#?}");
}

/// The gateway out of file descriptors (run under `prlimit --nofile`): a request whose upstream
/// connect fails for it is answered 503 with its own reason (`local_resource_limit`), not 502
/// "unreachable"; connections it cannot accept are logged once in a while with a count, not
/// every 50 ms; once descriptors are free again, requests are served (the positive control).
#[test]
fn out_of_file_descriptors_is_503_local_resource_limit_and_logged_sparingly() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let body = single_policy(
        "fds",
        &format!("      rules: [{{name: up, to: [{{cidr: 127.0.0.2/32}}], ports: [{{port: {p}}}]}}]"),
        "",
    );
    let gw = Gateway::start_under(&dns, &["prlimit", "--nofile=64:64"], &body);
    let url = format!("http://127.0.0.2:{p}/");
    // Descriptors in use below the limit (one inherited from the test runner may sit above it).
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_str().unwrap().parse::<u32>().unwrap() < 64)
            .count()
    };
    assert_eq!(curl(&["-x", &proxy(&gw), &url]).status, 200);
    // Its client and upstream connections closed again (what the first request opened for good,
    // it keeps): the count settles.
    let mut seen = (fds(), 0);
    while seen.1 < 5 {
        std::thread::sleep(Duration::from_millis(50));
        let now = fds();
        seen = if now == seen.0 { (now, seen.1 + 1) } else { (now, 0) };
    }
    let base = seen.0;
    // Idle client connections until every descriptor is taken, then one closed: the next
    // connection takes that one, and its upstream connect finds none.
    let mut idle = Vec::new();
    while base + idle.len() < 64 {
        idle.push(TcpStream::connect(gw.http).unwrap());
        let n = idle.len();
        wait_for("the connection accepted", Duration::from_secs(10), || fds() >= base + n);
    }
    drop(idle.pop());
    wait_for("the connection closed", Duration::from_secs(10), || fds() == 63);
    let r = curl(&["-x", &proxy(&gw), &url]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("reason: local_resource_limit"), "{r:?}");
    assert!(r.body.contains("Too many open files"), "{r:?}");
    // None left: connections wait in the backlog; accept fails over and over.
    let queued: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(gw.http).unwrap()).collect();
    wait_for("an accept failure logged", Duration::from_secs(10), || gw.log_text().contains("accept failed"));
    std::thread::sleep(Duration::from_secs(1)); // twenty retries' worth
    let warnings = gw.log_text().matches("accept failed").count();
    assert_eq!(warnings, 1, "one warning, not one per retry:\n{}", gw.log_text());
    assert!(gw.log_text().contains("raise the file descriptor limit"));
    // Descriptors free again: served.
    drop(idle);
    drop(queued);
    wait_until(Duration::from_secs(10), || curl(&["-x", &proxy(&gw), &url]).status == 200);
}

/// First use, as a new user meets it: a guard denial says it was the built-in guard and why (no
/// policy was involved); every denial, also those a client sees only as a SOCKS5 reply or a
/// CONNECT status, is one concise line in the log; a name that does not resolve is named in a
/// sentence with both families' outcomes; the log has no colour codes when it is not a terminal,
/// and is JSON with `log.format: json` (or `EGRESS_LOG_FORMAT=json`); `log.denials: false`
/// silences the denial lines.
#[test]
fn first_use_answers_and_logs_say_what_happened() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &config(p, ""));
    // The guard, not a policy.
    let r = curl(&["-x", &proxy(&gw), "http://169.254.169.254/latest/meta-data/"]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("denied by the built-in guard: the destination is cloud metadata"), "{r:?}");
    let r = curl(&["-x", &proxy(&gw), &format!("http://nope.example:{p}/")]);
    assert!(r.body.contains("denied by egress policy: no rule allows this destination"), "{r:?}");
    // A SOCKS5 denial, in the log.
    let (_, code) = socks5_domain(gw.socks, "nope.example", p);
    assert_eq!(code, 0x02);
    wait_for("the denial line", Duration::from_secs(10), || {
        gw.log_text()
            .lines()
            .any(|l| l.contains("denied") && l.contains("front=\"socks5\"") && l.contains("to=nope.example"))
    });
    let line = gw.log_text().lines().find(|l| l.contains("front=\"socks5\"")).unwrap().to_string();
    assert!(line.contains("who=shop/api") && line.contains("reason=\"no_rule_matched\""), "{line}");
    // No colour codes in a file.
    assert!(!gw.log_text().contains('\u{1b}'), "ANSI codes in the log file");
    // Both families failed: one sentence with both outcomes.
    let r = curl(&["-x", &proxy(&gw), &format!("http://norecords.up.test:{p}/")]);
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains("detail: norecords.up.test"), "{r:?}");
    assert!(!r.body.contains("Query {"), "no debug text: {r:?}");

    // JSON lines, and no denial lines when asked.
    let gw = Gateway::start(&dns, &format!("{}log: {{format: json, denials: false}}\n", config(p, "")));
    let r = curl(&["-x", &proxy(&gw), &format!("http://nope.example:{p}/")]);
    assert_eq!(r.status, 403);
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]).status, 200);
    let log = gw.log_text();
    let lines: Vec<Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "HTTP proxy listening"), "{log}");
    assert!(lines.iter().all(|l| l["target"] != "egress_gateway::denials"), "{log}");
}

fn limits_config(p: u16, limits: &str, rate: &str) -> String {
    format!(
        "guard: {{allowCidrs: [127.0.0.2/32]}}\nlimits: {{{limits}}}\nclients: [{{cidr: 127.0.0.0/8, namespace: ns, name: c, labels: {{}}}}]\npolicies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: p, namespace: ns}}\n    spec:\n      podSelector: {{}}\n{rate}      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {p}}}]}}]\n"
    )
}

/// An HTTP GET from a chosen source address on a fresh connection: the status.
fn get_from(src: &str, gw: std::net::SocketAddr, url_host: &str) -> u16 {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&format!("{src}:0").parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    s.connect(&gw.into()).unwrap();
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET http://{url_host}/ HTTP/1.1\r\nHost: {url_host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// `limits.maxConnectionsPerClient` and `limits.maxConnections`: a client past its limit is
/// refused (HTTP 503 and SOCKS5 0x01, audited `connection_limit`) while other clients are
/// served; past the total, everyone new is refused; closed connections make room again.
#[test]
fn connection_limits_refuse_the_client_over_its_limit_and_serve_the_others() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &limits_config(p, "maxConnectionsPerClient: 3, maxConnections: 5", ""));
    let host = format!("up.test:{p}");
    // A connection is admitted (and counted) when accepted, before any request head.
    let open = |src: &str| connect_from(src, gw.http);
    let a: Vec<TcpStream> = (0..3).map(|_| open("127.0.0.1")).collect();
    wait_for("three connections open", Duration::from_secs(10), || {
        gw.metric("egress_active_connections").unwrap_or(0.0) >= 3.0
    });
    // The fourth of 127.0.0.1: refused, with the protocol's answer and an audit event.
    assert_eq!(get_from("127.0.0.1", gw.http, &host), 503);
    let d = gw.decision(|e| e["decision"]["reason"] == "connection_limit");
    assert_eq!(d["client"]["address"], "127.0.0.1", "{d}");
    assert!(d["decision"]["detail"].as_str().unwrap().contains("maxConnectionsPerClient"), "{d}");
    let mut s = connect_from("127.0.0.1", gw.socks);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 2, (p >> 8) as u8, p as u8]).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(&reply[..4], &[5, 0, 5, 1], "SOCKS5 general failure: {reply:?}");
    // Another client is served meanwhile.
    assert_eq!(get_from("127.0.0.5", gw.http, &host), 200);
    // The total: two more open connections reach 5; a sixth client is refused too. (First the
    // connections just answered are gone: the gauge counts every accepted connection, also one
    // being refused or closed.)
    wait_for("only the three held connections open", Duration::from_secs(10), || {
        gw.metric("egress_active_connections") == Some(3.0)
    });
    let b: Vec<TcpStream> = ["127.0.0.6", "127.0.0.7"].iter().map(|s| open(s)).collect();
    wait_for("five connections open", Duration::from_secs(10), || {
        gw.metric("egress_active_connections").unwrap_or(0.0) >= 5.0
    });
    assert_eq!(get_from("127.0.0.8", gw.http, &host), 503);
    gw.decision(|e| e["decision"]["detail"].as_str().is_some_and(|d| d.contains("limits.maxConnections)")));
    // Closed connections make room again.
    drop((a, b));
    wait_until(Duration::from_secs(10), || get_from("127.0.0.1", gw.http, &host) == 200);
}

/// The rate limiters keep state per client address; states back to a full bucket are pruned,
/// so 10 000 distinct client addresses (each its own key) leave nothing behind.
#[test]
fn ten_thousand_client_addresses_do_not_grow_the_rate_limiter() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &limits_config(p, "", "      rateLimit: {requestsPerSecond: 1000, burst: 10}\n"));
    let host = format!("up.test:{p}");
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (http, host) = (gw.http, host.clone());
            std::thread::spawn(move || {
                for i in (w..10_000).step_by(4) {
                    let src = format!("127.1.{}.{}", i / 250, i % 250 + 1);
                    assert_eq!(get_from(&src, http, &host), 200, "{src}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert!(gw.metric("egress_decisions_total{action=\"allow\",reason=\"rule_allow\"}").unwrap_or(0.0) >= 10_000.0);
    // Pruned within a tick or two of the pruning task: every one of them held state, and none
    // is left.
    // (A prune that overlaps new clients counts fewer than it dropped: most, not all.)
    wait_for("the limiter pruned", Duration::from_secs(30), || {
        gw.metric("egress_rate_limiter_pruned_total").unwrap_or(0.0) >= 9_000.0
            && gw.metric("egress_rate_limiter_keys") == Some(0.0)
    });
}

/// `limits.maxTunnelsPerClient`: a client's CONNECT and SOCKS5 tunnels beyond it are refused
/// (503 / 0x01, audited `connection_limit`) while its plain HTTP requests are still served; a
/// closed tunnel makes room.
#[test]
fn tunnels_per_client_are_limited_apart_from_connections() {
    let (dns, up) = (dns(), Upstream::start("127.0.0.2"));
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &limits_config(p, "maxTunnelsPerClient: 2", ""));
    let tunnel = || {
        let mut c = TcpStream::connect(gw.http).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(c, "CONNECT up.test:{p} HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n").unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        (c, String::from_utf8_lossy(&head).to_string())
    };
    let (t1, h1) = tunnel();
    let (t2, h2) = tunnel();
    assert_eq!((h1.as_str(), h2.as_str()), ("HTTP/1.1 200", "HTTP/1.1 200"));
    let (_, h3) = tunnel();
    assert_eq!(h3, "HTTP/1.1 503");
    let d = gw.decision(|e| e["decision"]["reason"] == "connection_limit");
    assert!(d["decision"]["detail"].as_str().unwrap().contains("maxTunnelsPerClient"), "{d}");
    let (_, code) = socks5_domain(gw.socks, "up.test", p);
    assert_eq!(code, 0x01, "SOCKS5 general failure");
    // Plain requests are not tunnels.
    assert_eq!(curl(&["-x", &proxy(&gw), &format!("http://up.test:{p}/")]).status, 200);
    drop((t1, t2));
    wait_until(Duration::from_secs(10), || tunnel().1 == "HTTP/1.1 200");
}
