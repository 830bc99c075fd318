//! The gateway's transparent front, driven through a stand-in relay that speaks PROXY protocol
//! v2 (the node-redirector's side and its nftables rules are a separate piece). Real curl, real
//! HTTPS (openssl s_server) and HTTP upstreams, dnsmasq.

#![forbid(unsafe_code)]

use std::time::Duration;

use egress_e2e::*;

const RELAY_IP: &str = "127.0.0.7";
/// An address the Pod "dialled": it exists nowhere; the gateway must never dial it.
const PICKED: &str = "198.51.100.9";

struct Setup {
    gw: Gateway,
    tls: TlsUpstream,
    http: Upstream,
    _dns: Dns,
}

fn setup() -> Setup {
    setup_with("")
}

fn setup_with(transparent_extra: &str) -> Setup {
    let dns = Dns::start(&[("up.test", "127.0.0.2"), ("denied.test", "127.0.0.2"), ("meta.test", "169.254.169.254")]);
    let tls = TlsUpstream::start("127.0.0.2", "up.test");
    let http = Upstream::start("127.0.0.2");
    let body = format!(
        r#"
transparent: {{trustedRelays: ["{RELAY_IP}/32"], relayKeyFile: $RELAY_KEY{transparent_extra}}}
guard: {{allowCidrs: [127.0.0.2/32]}}
clients: [{{cidr: 127.0.0.1/32, namespace: shop, name: api, labels: {{app: api}}}}]
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: api, namespace: shop}}
    spec:
      podSelector: {{}}
      rules:
        - name: https
          to: [{{domain: up.test}}, {{domain: meta.test}}]
          ports: [{{port: {tp}}}, {{port: {hp}}}]
        - name: upstream-ip
          to: [{{cidr: 127.0.0.2/32}}]
          ports: [{{port: {hp}}}]
"#,
        tp = tls.addr.port(),
        hp = http.addr.port()
    );
    let gw = Gateway::start(&dns, &body);
    Setup { gw, tls, http, _dns: dns }
}

#[test]
fn tls_is_decided_by_sni_and_dialled_to_the_gateways_own_resolution() {
    let s = setup();
    let port = s.tls.addr.port();
    let relay = TestRelay::start(s.gw.transparent, RELAY_IP, format!("{PICKED}:{port}").parse().unwrap());
    let cacert = s.tls.cert.display().to_string();
    let to = format!("up.test:{port}:127.0.0.1:{}", relay.addr.port());
    let r = curl(&["--cacert", &cacert, "--connect-to", &to, &format!("https://up.test:{port}/")]);
    assert_eq!(r.status, 200, "{r:?}\n{}", s.gw.log_text());
    let d = s.gw.decision(|e| e["transparent"]["sni"] == "up.test");
    assert_eq!(d["front"], "transparent");
    assert_eq!(d["decision"]["action"], "allow");
    assert_eq!(d["client"]["name"], "api", "identity from the PROXY header's source");
    assert_eq!(d["transparent"]["original_dst"], format!("{PICKED}:{port}"));
    assert_eq!(d["transparent"]["relay"].as_str().unwrap().split(':').next(), Some(RELAY_IP));
    assert_eq!(d["transparent"]["original_in_resolved"], false);
    assert_eq!(d["dialled"], format!("127.0.0.2:{port}"), "the Pod's pick is never dialled");

    // The SNI of a name no rule allows, sent to the very same address: denied.
    let to = format!("denied.test:{port}:127.0.0.1:{}", relay.addr.port());
    let r = curl(&["-k", "--connect-to", &to, &format!("https://denied.test:{port}/")]);
    assert_ne!(r.exit, 0, "{r:?}");
    let d = s.gw.decision(|e| e["transparent"]["sni"] == "denied.test");
    assert_eq!(d["decision"]["reason"], "no_rule_matched");
    // An allowed name resolving to a guarded address: denied.
    let to = format!("meta.test:{port}:127.0.0.1:{}", relay.addr.port());
    assert_ne!(curl(&["-k", "--connect-to", &to, &format!("https://meta.test:{port}/")]).exit, 0);
    assert_eq!(s.gw.decision(|e| e["transparent"]["sni"] == "meta.test")["decision"]["reason"], "dns_guard_blocked");
}

#[test]
fn http_is_decided_by_host_and_refused_with_an_http_answer() {
    let s = setup();
    let port = s.http.addr.port();
    let relay = TestRelay::start(s.gw.transparent, RELAY_IP, format!("{PICKED}:{port}").parse().unwrap());
    let to = format!("up.test:{port}:127.0.0.1:{}", relay.addr.port());
    let r = curl(&["--connect-to", &to, &format!("http://up.test:{port}/x")]);
    assert_eq!(r.status, 200, "{r:?}\n{}", s.gw.log_text());
    assert_eq!(r.json()["path"], "/x");
    let d = s.gw.decision(|e| e["transparent"]["http_host"].as_str().is_some_and(|h| h.starts_with("up.test")));
    assert_eq!(d["target"]["host"], "up.test");
    let to = format!("denied.test:{port}:127.0.0.1:{}", relay.addr.port());
    let r = curl(&["--connect-to", &to, &format!("http://denied.test:{port}/x")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("reason: no_rule_matched"), "{r:?}");
    let c = s.gw.events_at_least(3).into_iter().find(|e| e["event"] == "close").expect("close event");
    assert!(c["close"]["bytes_up"].as_u64().unwrap() > 20, "peeked bytes count: {c}");
}

#[test]
fn without_a_name_only_cidr_rules_on_the_original_destination_apply() {
    let s = setup();
    let port = s.http.addr.port();
    // No SNI, no Host: opaque bytes to the upstream's real address, allowed by the cidr rule.
    let allowed = TestRelay::start(s.gw.transparent, RELAY_IP, format!("127.0.0.2:{port}").parse().unwrap());
    let out = raw_exchange(allowed.addr, b"\x00\x01 not a protocol the gateway knows\r\n\r\n", Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&out).contains("400"), "the upstream answered: {out:?}");
    let d = s.gw.decision(|e| e["transparent"]["original_dst"] == format!("127.0.0.2:{port}"));
    assert_eq!(d["decision"]["rule"], "upstream-ip");
    // The same bytes to an address no cidr rule covers: closed.
    let denied = TestRelay::start(s.gw.transparent, RELAY_IP, format!("{PICKED}:{port}").parse().unwrap());
    let out = raw_exchange(denied.addr, b"\x00\x01 opaque\r\n", Duration::from_secs(5));
    assert!(out.is_empty(), "{out:?}");
    let d = s.gw.decision(|e| e["transparent"]["original_dst"] == format!("{PICKED}:{port}"));
    assert_eq!(d["decision"]["action"], "deny");
    // TLS without SNI to an address no cidr rule covers: closed as well.
    let out = raw_exchange(
        denied.addr,
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00],
        Duration::from_secs(5),
    );
    assert!(out.is_empty());
}

/// Sends `header` and an HTTP request from the trusted relay address; returns the answer.
fn from_relay(gw: &Gateway, header: &[u8], host: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut c = connect_from(RELAY_IP, gw.transparent);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut msg = header.to_vec();
    msg.extend_from_slice(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes());
    c.write_all(&msg).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    out
}

#[test]
fn untrusted_relays_are_closed_and_audited() {
    let s = setup();
    let port = s.http.addr.port();
    let up: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let h = proxy_v2_header("127.0.0.1:5555".parse().unwrap(), up);
    let mut msg = h.clone();
    msg.extend_from_slice(b"GET / HTTP/1.1\r\nHost: up.test\r\n\r\n");
    let out = raw_exchange(s.gw.transparent, &msg, Duration::from_secs(5));
    assert!(out.is_empty(), "{out:?}");
    let d = s.gw.decision(|e| e["decision"]["reason"] == "untrusted_relay");
    assert_eq!(d["front"], "transparent");
    assert_eq!(d["client"]["address"], "127.0.0.1");

    // The positive control: a header signed with the relays' key, from the relay's address,
    // is believed (the request reaches the upstream as the Pod the header names).
    let signer = relay_signer();
    let now = std::time::SystemTime::now();
    let good = signer.header("127.0.0.1:5556".parse().unwrap(), up, now);
    let out = from_relay(&s.gw, &good, "up.test");
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    let d = s.gw.decision(|e| e["client"]["port"] == 5556);
    assert_eq!((d["decision"]["action"].as_str(), d["client"]["name"].as_str()), (Some("allow"), Some("api")));

    // From the trusted address, as a Pod behind a masquerading node would connect: a header
    // without the MAC, one signed with another key, a replay of the good one, a stale one. Each
    // is closed unanswered, never reaches the upstream, and is audited with its cause.
    let other_key = egress_netio::proxy::RelayKey::new(&[9u8; 32]).unwrap();
    let forger = egress_netio::proxy::Signer::new(other_key).unwrap();
    let stale = signer.header("127.0.0.1:5560".parse().unwrap(), up, now - Duration::from_secs(120));
    let served_before = s.http.hits();
    for (header, cause) in [
        (proxy_v2_header("127.0.0.1:5557".parse().unwrap(), up), "no relay authentication"),
        (forger.header("127.0.0.1:5558".parse().unwrap(), up, now), "does not verify"),
        (good.clone(), "replayed"),
        (stale, "beyond the allowed skew"),
    ] {
        let out = from_relay(&s.gw, &header, "up.test");
        assert!(out.is_empty(), "{cause}: {}", String::from_utf8_lossy(&out));
        let d = s.gw.decision(|e| {
            e["decision"]["reason"] == "untrusted_relay"
                && e["decision"]["detail"].as_str().is_some_and(|d| d.contains(cause))
        });
        assert_eq!(d["client"]["address"], RELAY_IP, "{cause}: {d}");
    }
    assert_eq!(s.http.hits(), served_before, "no forged header reached the upstream");

    // A trusted relay with a broken header: closed, audited as malformed.
    let mut c = connect_from(RELAY_IP, s.gw.transparent);
    use std::io::{Read, Write};
    c.write_all(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x02ab").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(c.read(&mut buf).unwrap_or(0), 0, "closed without an answer");
    let d = s.gw.decision(|e| e["decision"]["reason"] == "malformed_request");
    assert!(d["decision"]["detail"].as_str().unwrap().contains("PROXY v2"), "{d}");
    // Meanwhile, everything else keeps working.
    let relay = TestRelay::start(s.gw.transparent, RELAY_IP, format!("{PICKED}:{port}").parse().unwrap());
    let to = format!("up.test:{port}:127.0.0.1:{}", relay.addr.port());
    assert_eq!(curl(&["--connect-to", &to, &format!("http://up.test:{port}/")]).status, 200);
}

/// `transparent.firstByteTimeout`: a client that speaks after the wait is decided without its
/// name (the original destination, which no rule allows: closed); with a longer wait the same
/// client is decided by its Host and served.
#[test]
fn the_first_byte_wait_is_a_setting() {
    let slow_client = |s: &Setup| {
        use std::io::{Read, Write};
        let port = s.http.addr.port();
        let relay = TestRelay::start(s.gw.transparent, RELAY_IP, format!("{PICKED}:{port}").parse().unwrap());
        let mut c = std::net::TcpStream::connect(relay.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Speaks 1.5 s after connecting.
        std::thread::sleep(Duration::from_millis(1500));
        let _ = c.write_all(format!("GET / HTTP/1.1\r\nHost: up.test:{port}\r\nConnection: close\r\n\r\n").as_bytes());
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).to_string()
    };
    let quick = setup();
    let out = slow_client(&quick);
    assert!(!out.starts_with("HTTP/1.1 200"), "{out}");
    let d = quick.gw.decision(|e| e["front"] == "transparent");
    assert_eq!(d["target"]["host"], PICKED, "decided on the original destination: {d}");
    assert_eq!(d["decision"]["action"], "deny");
    let patient = setup_with(", firstByteTimeout: 5s");
    let out = slow_client(&patient);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let d = patient.gw.decision(|e| e["front"] == "transparent");
    assert_eq!(
        (d["target"]["host"].as_str(), d["decision"]["action"].as_str()),
        (Some("up.test"), Some("allow")),
        "{d}"
    );
}

/// On the transparent front the client of the connection limits is the Pod the PROXY header
/// names, not the relay: one Pod over `limits.maxConnectionsPerClient` is reset (and audited
/// with its own address) while another Pod behind the same relay is answered.
#[test]
fn connection_limits_count_the_pod_not_the_relay() {
    use std::io::{Read, Write};
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let http = Upstream::start("127.0.0.2");
    let hp = http.addr.port();
    let body = format!(
        "transparent: {{trustedRelays: [\"{RELAY_IP}/32\"], relayKeyFile: $RELAY_KEY}}\nlimits: {{maxConnectionsPerClient: 1}}\nguard: {{allowCidrs: [127.0.0.2/32]}}\nclients: [{{cidr: 127.0.0.0/8, namespace: shop, name: pods, labels: {{}}}}]\npolicies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: p, namespace: shop}}\n    spec:\n      podSelector: {{}}\n      rules: [{{name: ip, to: [{{cidr: 127.0.0.2/32}}], ports: [{{port: {hp}}}]}}]\n"
    );
    let gw = Gateway::start(&dns, &body);
    let relay = TestRelay::start(gw.transparent, RELAY_IP, format!("127.0.0.2:{hp}").parse().unwrap());
    // The first connection of Pod 127.0.0.1 stays open (silent: decided on its original
    // destination once the first-byte wait is over).
    let held = connect_from("127.0.0.1", relay.addr);
    gw.decision(|e| e["front"] == "transparent" && e["client"]["address"] == "127.0.0.1");
    // Its second: reset, audited with the Pod's address.
    let mut second = connect_from("127.0.0.1", relay.addr);
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = second.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    let _ = second.read_to_end(&mut out);
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    let d = gw.decision(|e| e["decision"]["reason"] == "connection_limit");
    assert_eq!(d["client"]["address"], "127.0.0.1", "the Pod, not the relay {RELAY_IP}: {d}");
    // Another Pod behind the same relay is served.
    let mut other = connect_from("127.0.0.5", relay.addr);
    other.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(other, "GET / HTTP/1.1\r\nHost: 127.0.0.2:{hp}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = other.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    drop(held);
}

/// A connection whose payload names nothing (no SNI, no Host) is decided by the names the Pod
/// resolved to the address it dialled, as the relay states them: allowed when one of them is
/// (ports and all), dialled to that original address, never opening what the guard closes;
/// with an SNI the payload's name decides, whatever the names say.
#[test]
fn a_payload_without_a_name_is_decided_by_the_names_the_pod_resolved() {
    let dns = Dns::start(&[("db.test", "127.0.0.2"), ("elsewhere.test", "127.0.0.3"), ("cdn.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let tls = TlsUpstream::start("127.0.0.2", "cdn.test");
    let (p, tp) = (up.addr.port(), tls.addr.port());
    let gw = Gateway::start(
        &dns,
        &format!(
            r#"
transparent: {{trustedRelays: ["{RELAY_IP}/32"], relayKeyFile: $RELAY_KEY}}
guard: {{allowCidrs: [127.0.0.2/32]}}
clients: [{{cidr: 127.0.0.1/32, namespace: shop, name: api, labels: {{app: api}}}}]
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: api, namespace: shop}}
    spec:
      podSelector: {{}}
      rules:
        - {{name: db, to: [{{domain: db.test}}, {{domain: elsewhere.test}}], ports: [{{port: {p}}}]}}
        - {{name: tls, to: [{{domain: db.test}}], ports: [{{port: {tp}}}]}}
"#
        ),
    );
    let original: std::net::SocketAddr = format!("127.0.0.2:{p}").parse().unwrap();
    let opaque = b"\x00\x01 a protocol that names nothing\r\n\r\n";
    let exchange = |names: &[&str], to: std::net::SocketAddr| {
        let relay = TestRelay::start_with_names(gw.transparent, RELAY_IP, to, names);
        raw_exchange(relay.addr, opaque, Duration::from_secs(5))
    };
    let decision_for = |names: &str| {
        gw.decision(|e| {
            e["transparent"]["dns_names"]
                .as_array()
                .is_some_and(|n| n.iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>().join(",") == names)
        })
    };

    // Allowed by the name; the original address is what is dialled.
    let out = exchange(&["db.test"], original);
    assert!(String::from_utf8_lossy(&out).contains("400"), "the upstream answered: {out:?}\n{}", gw.log_text());
    let d = decision_for("db.test");
    assert_eq!((d["decision"]["action"].as_str(), d["decision"]["rule"].as_str()), (Some("allow"), Some("db")), "{d}");
    assert_eq!(d["transparent"]["dns_name"], "db.test");
    assert_eq!(d["target"]["host"], "db.test");
    assert_eq!(d["dialled"], original.to_string());
    assert_eq!(d["transparent"]["original_in_resolved"], true);

    // A name that resolves (for the gateway) elsewhere: still the Pod's address is dialled.
    assert!(String::from_utf8_lossy(&exchange(&["elsewhere.test"], original)).contains("400"));
    let d = decision_for("elsewhere.test");
    assert_eq!(
        (d["dialled"].as_str(), &d["transparent"]["original_in_resolved"]),
        (Some(&*original.to_string()), &serde_json::json!(false))
    );

    // Anti-sharing: two names on one address, one allowed: allowed, and the event says which.
    assert!(String::from_utf8_lossy(&exchange(&["cdn.test", "db.test"], original)).contains("400"));
    let d = decision_for("cdn.test,db.test");
    assert_eq!(
        (d["decision"]["action"].as_str(), d["transparent"]["dns_name"].as_str()),
        (Some("allow"), Some("db.test"))
    );

    // No allowed name, or no name at all: the address decides (no rule: closed).
    for names in [&["cdn.test"][..], &[]] {
        assert!(exchange(names, original).is_empty(), "{names:?}");
    }
    let d = decision_for("cdn.test");
    assert_eq!(
        (d["decision"]["action"].as_str(), d["decision"]["reason"].as_str()),
        (Some("deny"), Some("no_rule_matched"))
    );
    assert!(d["transparent"].get("dns_name").is_none(), "{d}");
    // The allowed name on another port: the rule's ports hold.
    let other_port: std::net::SocketAddr = format!("127.0.0.2:{}", p.wrapping_add(1).max(1)).parse().unwrap();
    assert!(exchange(&["db.test"], other_port).is_empty());
    gw.decision(|e| {
        e["transparent"]["original_dst"] == other_port.to_string() && e["decision"]["reason"] == "no_rule_matched"
    });
    // A name never opens what the guard closes: an internal address, cloud metadata.
    for to in ["10.255.0.1:5432", "169.254.169.254:80"] {
        let to: std::net::SocketAddr = to.parse().unwrap();
        assert!(exchange(&["db.test"], to).is_empty(), "{to}");
        let d = gw.decision(|e| e["transparent"]["original_dst"] == to.to_string());
        assert_eq!(d["decision"]["action"], "deny", "{d}");
        assert!(d["transparent"].get("dns_name").is_none(), "{d}");
    }

    // With an SNI the payload's name decides: cdn.test is not allowed, whatever the names say.
    let relay =
        TestRelay::start_with_names(gw.transparent, RELAY_IP, format!("127.0.0.2:{tp}").parse().unwrap(), &["db.test"]);
    let cacert = tls.cert.display().to_string();
    let to = format!("cdn.test:{tp}:127.0.0.1:{}", relay.addr.port());
    let r = curl(&["--cacert", &cacert, "--connect-to", &to, &format!("https://cdn.test:{tp}/")]);
    assert_ne!(r.status, 200, "{r:?}");
    let d = gw.decision(|e| e["transparent"]["sni"] == "cdn.test");
    assert_eq!((d["decision"]["action"].as_str(), d["target"]["host"].as_str()), (Some("deny"), Some("cdn.test")));
}
