//! The shared policy conformance vectors (`../shared/vectors/policy-decisions.yaml`) through the
//! real listeners, not only the `check` simulator: every case goes through the HTTP front
//! (`http://` targets, as an absolute-form request with the case's method) or through CONNECT and
//! SOCKS5 (`https://` and `host:port` targets), from the case's client address, inside a network
//! namespace where a real DNS server answers the vectors' names and upstreams listen on the
//! addresses they resolve to. The decision the gateway audits for each request must match the
//! vector, and `egress-gateway check` on the same configuration (resolving through the same DNS)
//! must agree with it, case by case.
//!
//! The guard's vectors use a client whose rules do not allow those targets anyway, so they would
//! pass without a guard. Each case `check` decides by the guard is therefore run again for a
//! client with a rule that allows every address and `*.internal`; it must still be denied by the
//! guard (and that client is shown to be allowed elsewhere, so the rule is real).

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use egress_e2e::*;
use serde_json::Value;

/// A client whose policy allows every address and every `*.internal` name on any port.
const BROAD: &str = "10.3.0.9";

#[derive(Debug, Clone)]
struct Case {
    client: String,
    method: Option<String>,
    target: String,
    expect: String,
}

fn vectors() -> (Value, Vec<Case>) {
    let path = repo_root().join("../shared/vectors/policy-decisions.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the shared/ folder must sit beside the repository)", path.display()));
    let doc: Value = serde_yaml_ng::from_str(&text).unwrap();
    let config: Value = serde_yaml_ng::from_str(doc["config"].as_str().unwrap()).unwrap();
    let s = |v: &Value| v.as_str().map(str::to_string);
    let cases = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            client: s(&c["client"]).unwrap(),
            method: s(&c["method"]),
            target: s(&c["target"]).unwrap(),
            expect: s(&c["expect"]).unwrap(),
        })
        .collect();
    (config, cases)
}

/// The vectors' configuration plus the broad client and its policy.
fn with_broad_client(mut config: Value) -> String {
    let clients = config["clients"].as_array_mut().unwrap();
    clients.push(serde_json::json!({"cidr": "10.3.0.0/24", "namespace": "open", "name": "anything", "labels": {}}));
    let policies = config["policies"].as_array_mut().unwrap();
    policies.push(serde_json::json!({
        "apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
        "metadata": {"name": "everything", "namespace": "open"},
        "spec": {"podSelector": {}, "rules": [{"name": "everything",
            "to": [{"cidr": "0.0.0.0/0"}, {"cidr": "::/0"}, {"domain": "*.internal"}]}]}
    }));
    serde_yaml_ng::to_string(&config).unwrap()
}

/// How one front carries a target.
#[derive(Debug, Clone)]
enum Request {
    Http { method: String, url: String, host: String },
    Connect { authority: String },
    Socks { host: String, port: u16 },
}

/// `host` and `port` of an authority (`[v6]:port` too).
fn split_authority(a: &str) -> (String, u16) {
    let (h, p) = a.rsplit_once(':').expect("host:port");
    (h.trim_start_matches('[').trim_end_matches(']').to_string(), p.parse().unwrap())
}

fn requests(case: &Case) -> Vec<Request> {
    let t = &case.target;
    if let Some(rest) = t.strip_prefix("http://") {
        let host = rest.split('/').next().unwrap().to_string();
        return vec![Request::Http { method: case.method.clone().unwrap_or("GET".into()), url: t.clone(), host }];
    }
    let authority = match t.strip_prefix("https://") {
        Some(rest) => {
            let a = rest.split('/').next().unwrap();
            let has_port = if a.starts_with('[') { a.contains("]:") } else { a.contains(':') };
            if has_port { a.to_string() } else { format!("{a}:443") }
        }
        None => t.clone(),
    };
    let (host, port) = split_authority(&authority);
    vec![Request::Connect { authority }, Request::Socks { host, port }]
}

/// Sends `req` from `client` to the gateway inside its namespace; returns the local port (the
/// audit's `client.port`) and what the front answered (`HTTP status` or SOCKS5 reply code).
fn send(ns: &Netns, gw: &Gateway, client: &str, req: &Request) -> (u16, String) {
    let (client, req, http, socks) = (client.to_string(), req.clone(), gw.http, gw.socks);
    ns.enter(move || {
        let dst = match req {
            Request::Socks { .. } => socks,
            _ => http,
        };
        let s = connect_from(&client, dst);
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let port = s.local_addr().unwrap().port();
        let mut s = s;
        let status_line = |s: TcpStream| {
            let mut r = BufReader::new(s);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            line.split_whitespace().nth(1).unwrap_or("none").to_string()
        };
        let answer = match req {
            Request::Http { method, url, host } => {
                let body = if method == "GET" { "" } else { "content-length: 0\r\n" };
                write!(s, "{method} {url} HTTP/1.1\r\nHost: {host}\r\n{body}Connection: close\r\n\r\n").unwrap();
                status_line(s)
            }
            Request::Connect { authority } => {
                write!(s, "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").unwrap();
                status_line(s)
            }
            Request::Socks { host, port } => {
                s.write_all(&[5, 1, 0]).unwrap();
                let mut m = [0u8; 2];
                s.read_exact(&mut m).unwrap();
                let mut r = vec![5, 1, 0, 3, host.len() as u8];
                r.extend_from_slice(host.as_bytes());
                r.extend_from_slice(&port.to_be_bytes());
                s.write_all(&r).unwrap();
                let mut rep = [0u8; 2];
                s.read_exact(&mut rep).map(|_| format!("socks {:#04x}", rep[1])).unwrap_or("socks none".into())
            }
        };
        (port, answer)
    })
}

/// `egress-gateway check` on the gateway's own config file, resolving through the same DNS, run
/// inside the namespace: (allowed, reason code).
fn check(ns: &Netns, gw: &Gateway, client: &str, method: Option<&str>, target: &str) -> (bool, String) {
    let mut cmd = ns.command(gateway_bin());
    cmd.args(["check", "--config"]).arg(gw.config_path()).args(["--client", client]);
    if let Some(m) = method {
        cmd.args(["--method", m]);
    }
    let out = cmd.arg(target).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check {target}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let allowed = match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("check {target}: exit {other:?}: {v}"),
    };
    (allowed, v["reason_code"].as_str().unwrap_or_default().to_string())
}

/// What the protocol answer says (the audit decides; this only must not contradict it).
fn answered_allow(answer: &str) -> bool {
    answer == "200" || answer == "socks 0x00"
}

#[test]
fn every_vector_through_the_http_connect_and_socks5_listeners_agrees_with_check() {
    let (config, cases) = vectors();
    // The gateway, its clients and the DNS server in one namespace; the upstreams in another,
    // behind a link (the gateway's own addresses are guarded, so upstreams cannot be local).
    let ns = Netns::new("vec");
    let up = Netns::new("vecup");
    for a in ["10.1.0.5/32", "10.1.1.7/32", "10.2.0.3/32", "10.9.9.9/32", "10.3.0.9/32", "203.0.113.53/32"] {
        ns.exec_ok("ip", &["addr", "add", a, "dev", "lo"]);
    }
    let t = unique_tag();
    Netns::link(
        &ns,
        &format!("vg{t}"),
        &["198.51.100.1/24", "2001:db8:ff::1/64"],
        &up,
        &format!("vu{t}"),
        &["198.51.100.2/24", "2001:db8:ff::2/64"],
    );
    for a in ["203.0.113.20/32", "10.40.1.2/32", "2001:db8:40::5/128"] {
        up.exec_ok("ip", &["addr", "add", a, "dev", "lo"]);
    }
    ns.exec_ok("ip", &["route", "add", "203.0.113.20/32", "via", "198.51.100.2"]);
    ns.exec_ok("ip", &["route", "add", "10.40.0.0/16", "via", "198.51.100.2"]);
    ns.exec_ok("ip", &["-6", "route", "add", "2001:db8:40::/48", "via", "2001:db8:ff::2"]);
    // Every name of the vectors resolves to the upstream address (the guard's names never reach
    // DNS); the upstreams listen where allowed cases go.
    let names = [
        "api.stripe.com",
        "files.stripe.com",
        "a.b.stripe.com",
        "xn--bcher-kva.stripe.com",
        "stripe.com",
        "evilstripe.com",
        "stripe.com.evil.example",
        "api.stripe.com.attacker.net",
        "ranged.example.com",
        "x.evil.example",
        "httpbin.org",
        "cdn.example.com",
        "other.example.com",
        "bucket.s3.amazonaws.com",
        "s3.amazonaws.com",
        "svc.internal",
    ];
    let records: Vec<(&str, &str)> = names.iter().map(|n| (*n, "203.0.113.20")).collect();
    let dns = Dns::start_at(Some(&ns), "203.0.113.53:53".parse().unwrap(), &records);
    let bind = |a: &str| {
        let a: SocketAddr = a.parse().unwrap();
        up.enter(move || TcpListener::bind(a).unwrap())
    };
    let _web = Upstream::serve(bind("203.0.113.20:80"));
    let _tls: Vec<TcpListener> =
        ["203.0.113.20:443", "203.0.113.20:8000", "203.0.113.20:8100", "10.40.1.2:5432", "[2001:db8:40::5]:5432"]
            .iter()
            .map(|a| bind(a))
            .collect();
    let gw = Gateway::start_with(Some(dns.addr), Some(&ns), &with_broad_client(config));

    let mut runs = 0;
    let mut disagreements = Vec::new();
    let mut run_case = |case: &Case, expect_reason: Option<&str>| {
        let (check_allows, check_reason) = check(&ns, &gw, &case.client, case.method.as_deref(), &case.target);
        let want_allow = case.expect == "allow";
        if check_allows != want_allow || expect_reason.is_some_and(|r| r != check_reason) {
            disagreements.push(format!("check {case:?}: allowed={check_allows} ({check_reason})"));
        }
        for req in requests(case) {
            runs += 1;
            // Only events written after this request was sent: the client's source port may have
            // been used by an earlier request whose event is already in the file.
            let before = gw.events().len();
            let (port, answer) = send(&ns, &gw, &case.client, &req);
            let d = gw.decision_since(before, |e| {
                e["client"]["address"] == case.client.as_str() && e["client"]["port"] == port
            });
            let (action, reason) =
                (d["decision"]["action"].as_str().unwrap(), d["decision"]["reason"].as_str().unwrap());
            let listener_allows = action == "allow";
            if listener_allows != want_allow
                || reason != check_reason
                || (!listener_allows && answered_allow(&answer))
                || expect_reason.is_some_and(|r| r != reason)
            {
                disagreements.push(format!(
                    "{case:?} via {req:?}: audited {action} ({reason}), answered {answer}; check said {check_allows} ({check_reason})"
                ));
            }
        }
    };
    let mut guarded = Vec::new();
    for case in &cases {
        run_case(case, None);
        let (_, reason) = check(&ns, &gw, &case.client, case.method.as_deref(), &case.target);
        if reason.starts_with("guard") {
            guarded.push((case.clone(), reason));
        }
    }
    assert!(guarded.len() >= 10, "the vectors' guard cases: {guarded:?}");
    // The guard's cases again, for a client that a rule allows everywhere: still the guard.
    for (case, reason) in &guarded {
        run_case(&Case { client: BROAD.into(), ..case.clone() }, Some(reason));
    }
    // ... and that client's rule is real: what the guard does not cover, it may reach.
    for target in ["10.40.1.2:5432", "https://svc.internal", "http://203.0.113.20/status/200", "[2001:db8:40::5]:5432"]
    {
        let case = Case { client: BROAD.into(), method: None, target: target.into(), expect: "allow".into() };
        run_case(&case, Some("rule_allow"));
    }
    eprintln!("{} vectors (+{} guard cases for the broad client) in {runs} requests", cases.len(), guarded.len());
    assert!(disagreements.is_empty(), "{} disagreement(s):\n{}", disagreements.len(), disagreements.join("\n"));
}
