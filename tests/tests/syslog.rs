//! The syslog sink against real receivers: a TCP receiver in the test and `openssl s_server` as a
//! TLS collector requiring a client certificate; every frame is split by its octet count and
//! parsed with a real RFC 5424 parser (syslog_rfc5424), and every message is compared with the
//! event the json file sink got. The TCP collector is down when the run starts: every event
//! arrives once it is up, in order. UDP delivers one datagram per event.

#![forbid(unsafe_code)]

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egress_e2e::*;
use serde_json::Value;
use syslog_rfc5424::{SyslogMessage, SyslogSeverity, parse_message};

fn policy(port: u16, audit: &str) -> String {
    format!(
        "guard: {{allowCidrs: [127.0.0.2/32]}}\nclients: [{{cidr: 127.0.0.1/32, namespace: ns, name: c, labels: {{}}}}]\n{audit}\npolicies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: p, namespace: ns}}\n    spec:\n      podSelector: {{}}\n      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]\n"
    )
}

/// Splits an octet-counted stream (RFC 6587 3.4.1) into messages; a trailing partial frame is left.
fn frames(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(sp) = rest.iter().position(|b| *b == b' ') {
        let len: usize = std::str::from_utf8(&rest[..sp]).ok().and_then(|s| s.parse().ok()).expect("octet count");
        if rest.len() < sp + 1 + len {
            break;
        }
        out.push(String::from_utf8(rest[sp + 1..sp + 1 + len].to_vec()).expect("UTF-8 message"));
        rest = &rest[sp + 1 + len..];
    }
    out
}

fn parse_all(msgs: &[String]) -> Vec<SyslogMessage> {
    msgs.iter().map(|m| parse_message(m).unwrap_or_else(|e| panic!("not RFC 5424 ({e}): {m}"))).collect()
}

fn file_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Checks each syslog message against the json sink's event of the same position.
fn compare(messages: &[SyslogMessage], events: &[Value]) {
    assert_eq!(messages.len(), events.len());
    for (m, e) in messages.iter().zip(events) {
        let body: Value =
            serde_json::from_str(&m.msg).unwrap_or_else(|err| panic!("MSG is not JSON ({err}): {}", m.msg));
        assert_eq!(&body, e, "the message body is the event");
        assert_eq!(m.appname.as_deref(), Some("egress-gateway"));
        assert_eq!(m.msgid.as_deref(), e["event"].as_str());
        assert_eq!(m.facility as u8, 16, "local0");
        let expected =
            if e["decision"]["action"] == "deny" { SyslogSeverity::SEV_WARNING } else { SyslogSeverity::SEV_INFO };
        assert_eq!(m.severity, expected, "{e}");
        assert!(m.timestamp.is_some());
        assert!(m.hostname.is_some());
        assert!(m.msg.len() < 8192);
    }
}

#[test]
fn tcp_collector_down_then_up_receives_every_event_in_order() {
    let dns = Dns::start(&[("up.test", "127.0.0.2"), ("no.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    // Held, not listened on: the collector refuses connections until it comes up on the same port.
    let held = HeldPort::new();
    let port = held.port();
    let audit = format!(
        "audit:\n  spool: {{dir: $DIR/spool}}\n  sinks:\n    - {{name: file, type: file, path: $DIR/audit.jsonl}}\n    - {{name: siem, type: syslog, address: \"127.0.0.1:{port}\", transport: tcp}}\n"
    );
    let gw = Gateway::start(&dns, &policy(p, &audit));
    let proxy = format!("http://{}", gw.http);
    for i in 0..20 {
        let host = if i % 5 == 4 { "no.test" } else { "up.test" };
        curl(&["-x", &proxy, &format!("http://{host}:{p}/{i}")]);
    }
    // The collector is down: nothing delivered, retries counted, events kept.
    wait_for("failed deliveries", Duration::from_secs(10), || {
        gw.metric("egress_audit_sink_failed_total{sink=\"siem\"}").unwrap_or(0.0) >= 1.0
    });
    wait_for("36 events at the json sink", Duration::from_secs(10), || file_events(&gw.audit_path()).len() >= 36);
    let expected = file_events(&gw.audit_path()).len();
    assert_eq!(expected, 36, "16 allowed (decision + close) and 4 denied");
    assert!(gw.metric("egress_audit_sink_lag_events{sink=\"siem\"}").unwrap() > 0.0);

    // It comes up: everything arrives, once, in order.
    let listener = held.listen();
    let data = Arc::new(Mutex::new(Vec::new()));
    let d = data.clone();
    std::thread::spawn(move || {
        while let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 65536];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                d.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }
    });
    wait_for("every event at the collector", Duration::from_secs(20), || {
        frames(&data.lock().unwrap()).len() >= expected
    });
    let messages = parse_all(&frames(&data.lock().unwrap()));
    compare(&messages, &file_events(&gw.audit_path()));
    wait_for("lag 0", Duration::from_secs(5), || gw.metric("egress_audit_sink_lag_events{sink=\"siem\"}") == Some(0.0));
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// A CA, a server certificate for `syslog.test` and a client certificate.
    fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().unwrap() };
        let ossl = |args: &[&str]| {
            let out = Command::new("openssl").current_dir(pki.dir.path()).args(args).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        ossl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-days",
                    "1",
                    "-subj",
                    &format!("/CN=test ca {}", unique_tag()),
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                ],
            ]
            .concat(),
        );
        for (who, ext, days) in [
            ("server", "subjectAltName=DNS:syslog.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n", "1"),
            ("client", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n", "1"),
            // Valid for the right name, from the right CA, and expired yesterday.
            (
                "expired",
                "subjectAltName=DNS:syslog.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
                "-1",
            ),
        ] {
            std::fs::write(pki.path(&format!("{who}.ext")), ext).unwrap();
            ossl(
                &[
                    &["req"][..],
                    &ec,
                    &["-subj", &format!("/CN={who}"), "-keyout", &format!("{who}.key"), "-out", &format!("{who}.csr")],
                ]
                .concat(),
            );
            ossl(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                days,
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.pem"),
            ]);
        }
        pki
    }
}

/// `openssl s_server` as a TLS syslog collector that requires a client certificate; what it
/// receives goes to a file.
struct TlsCollector {
    child: Child,
    out: PathBuf,
    port: u16,
}

impl TlsCollector {
    fn start(pki: &Pki) -> TlsCollector {
        TlsCollector::start_with(pki, "server", true)
    }

    /// A collector presenting `cert` (`server` or `expired`), demanding a client certificate or
    /// not (then only the sink's own verification of the collector can refuse it).
    fn start_with(pki: &Pki, cert: &str, client_cert: bool) -> TlsCollector {
        let out = pki.path("received.bin");
        let pick = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (child, port) = spawn_listening(pick, |port| {
            Command::new("openssl")
                .current_dir(pki.dir.path())
                .args([
                    "s_server",
                    "-quiet",
                    "-accept",
                    &format!("127.0.0.1:{port}"),
                    "-cert",
                    &format!("{cert}.pem"),
                    "-key",
                    &format!("{cert}.key"),
                ])
                .args(if client_cert {
                    &["-CAfile", "ca.pem", "-Verify", "1", "-verify_return_error"][..]
                } else {
                    &[][..]
                })
                .stdin(Stdio::piped())
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        });
        TlsCollector { child, out, port }
    }

    fn received(&self) -> Vec<u8> {
        std::fs::read(&self.out).unwrap_or_default()
    }
}

impl Drop for TlsCollector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tls_collector_with_client_certificate_receives_every_event() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let pki = Pki::new();
    let collector = TlsCollector::start(&pki);
    let audit = format!(
        "audit:\n  spool: {{dir: $DIR/spool}}\n  sinks:\n    - {{name: file, type: file, path: $DIR/audit.jsonl}}\n    - name: siem\n      type: syslog\n      address: \"127.0.0.1:{}\"\n      transport: tls\n      format: json\n      tls: {{ca: {}, cert: {}, key: {}, serverName: syslog.test}}\n",
        collector.port,
        pki.path("ca.pem").display(),
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    );
    let gw = Gateway::start(&dns, &policy(p, &audit));
    for i in 0..10 {
        assert_eq!(curl(&["-x", &format!("http://{}", gw.http), &format!("http://up.test:{p}/{i}")]).status, 200);
    }
    wait_for("every event over TLS", Duration::from_secs(20), || frames(&collector.received()).len() >= 20);
    // The file sink delivers on its own, and may be a beat behind the syslog one.
    wait_for("every event in the file", Duration::from_secs(20), || file_events(&gw.audit_path()).len() >= 20);
    let messages = parse_all(&frames(&collector.received()));
    compare(&messages, &file_events(&gw.audit_path()));
}

#[test]
fn a_collector_with_a_certificate_from_another_ca_gets_nothing() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let (pki, other) = (Pki::new(), Pki::new());
    let collector = TlsCollector::start(&pki);
    let audit = format!(
        "audit:\n  spool: {{dir: $DIR/spool}}\n  sinks:\n    - name: siem\n      type: syslog\n      address: \"127.0.0.1:{}\"\n      transport: tls\n      tls: {{ca: {}, serverName: syslog.test}}\n",
        collector.port,
        other.path("ca.pem").display()
    );
    let gw = Gateway::start(&dns, &policy(p, &audit));
    assert_eq!(curl(&["-x", &format!("http://{}", gw.http), &format!("http://up.test:{p}/")]).status, 200);
    wait_for("a failed TLS delivery", Duration::from_secs(10), || {
        gw.metric("egress_audit_sink_failed_total{sink=\"siem\"}").unwrap_or(0.0) >= 1.0
    });
    assert!(collector.received().is_empty(), "nothing sent to an unverified collector");
    assert!(gw.log_text().contains("audit delivery failed"), "{}", gw.log_text());
}

/// The sink verifies the collector itself: against a collector that asks for no client
/// certificate (so nothing but the sink's own check can refuse it), a wrong `serverName`, a CA
/// the sink does not trust and an expired certificate each get nothing, with rustls's reason in
/// the log; the same collector with the right settings gets every event (the positive control).
#[test]
fn the_sink_refuses_a_wrong_name_an_untrusted_ca_and_an_expired_certificate() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let (pki, other) = (Pki::new(), Pki::new());
    let run = |collector: &TlsCollector, ca: &Path, name: &str| {
        let audit = format!(
            "audit:\n  spool: {{dir: $DIR/spool}}\n  sinks:\n    - name: siem\n      type: syslog\n      address: \"127.0.0.1:{}\"\n      transport: tls\n      tls: {{ca: {}, serverName: {name}}}\n",
            collector.port,
            ca.display()
        );
        let gw = Gateway::start(&dns, &policy(p, &audit));
        assert_eq!(curl(&["-x", &format!("http://{}", gw.http), &format!("http://up.test:{p}/")]).status, 200);
        gw
    };
    let good = TlsCollector::start_with(&pki, "server", false);
    let gw = run(&good, &pki.path("ca.pem"), "syslog.test");
    wait_for("events at a verified collector", Duration::from_secs(20), || frames(&good.received()).len() >= 2);
    drop(gw);
    for (what, cert, ca, name, reason) in [
        ("wrong serverName", "server", pki.path("ca.pem"), "other.test", "not valid for name"),
        ("untrusted CA", "server", other.path("ca.pem"), "syslog.test", "UnknownIssuer"),
        ("expired certificate", "expired", pki.path("ca.pem"), "syslog.test", "Expired"),
    ] {
        let collector = TlsCollector::start_with(&pki, cert, false);
        let gw = run(&collector, &ca, name);
        wait_for(what, Duration::from_secs(10), || {
            gw.metric("egress_audit_sink_failed_total{sink=\"siem\"}").unwrap_or(0.0) >= 1.0
        });
        assert!(collector.received().is_empty(), "{what}: nothing sent");
        let log = gw.log_text();
        assert!(log.lines().any(|l| l.contains("audit delivery failed") && l.contains(reason)), "{what}: {log}");
    }
}

#[test]
fn udp_sends_one_datagram_per_event() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let audit = format!(
        "audit:\n  sinks:\n    - {{name: file, type: file, path: $DIR/audit.jsonl}}\n    - {{name: siem, type: syslog, address: \"{}\", transport: udp, format: ecs, facility: 1, appName: egw}}\n",
        sock.local_addr().unwrap()
    );
    let gw = Gateway::start(&dns, &policy(p, &audit));
    for i in 0..5 {
        assert_eq!(curl(&["-x", &format!("http://{}", gw.http), &format!("http://up.test:{p}/{i}")]).status, 200);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 9000];
    while got.len() < 10 {
        let n =
            sock.recv(&mut buf).unwrap_or_else(|e| panic!("datagram {} of 10: {e}\n{}", got.len() + 1, gw.log_text()));
        got.push(parse_message(std::str::from_utf8(&buf[..n]).unwrap()).unwrap());
    }
    wait_for("the json sink", Duration::from_secs(10), || file_events(&gw.audit_path()).len() >= 10);
    let events = file_events(&gw.audit_path());
    for (m, e) in got.iter().zip(&events) {
        let body: Value = serde_json::from_str(&m.msg).unwrap();
        assert_eq!(body["event"]["id"], e["id"], "ECS in the message body");
        assert_eq!((m.facility as u8, m.appname.as_deref()), (1, Some("egw")));
    }
}
