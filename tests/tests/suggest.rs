//! `egress-gateway audit suggest` end to end: real traffic (curl through HTTP, CONNECT and
//! SOCKS5) from two workloads under an Audit-mode policy, the audit file fed to `suggest`, its
//! output applied as Enforce policies (a reload), and the same traffic replayed: everything
//! observed passes, a new destination is denied.

#![forbid(unsafe_code)]

use std::process::Command;
use std::time::Duration;

use egress_e2e::*;

const CLIENTS: &str = r#"
guard: {allowCidrs: [127.0.0.2/32]}
clients:
  - {cidr: 127.0.0.1/32, namespace: shop, name: api-1, serviceAccount: api, labels: {app: api, pod-template-hash: 5d8f9}}
  - {cidr: 127.0.0.3/32, namespace: shop, name: web-1, serviceAccount: web, labels: {app: web}}
"#;

#[test]
fn suggested_policies_allow_what_was_observed_and_nothing_else() {
    let dns = Dns::start(&[
        ("up.test", "127.0.0.2"),
        ("a.files.test", "127.0.0.2"),
        ("b.files.test", "127.0.0.2"),
        ("c.files.test", "127.0.0.2"),
        ("d.files.test", "127.0.0.2"),
        ("new.test", "127.0.0.2"),
    ]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let observe = format!(
        "{CLIENTS}policies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: observe, namespace: shop}}\n    spec: {{podSelector: {{}}, mode: Audit, rules: []}}\n"
    );
    let gw = Gateway::start(&dns, &observe);
    let traffic = |gw: &Gateway| -> Vec<(String, CurlResult)> {
        let proxy = format!("http://{}", gw.http);
        let socks = format!("socks5h://{}", gw.socks);
        let url = |h: &str| format!("http://{h}:{p}/x");
        let mut out = vec![
            ("api http up.test".to_string(), curl(&["-x", &proxy, &url("up.test")])),
            ("api connect up.test".to_string(), curl(&["-p", "-x", &proxy, &url("up.test")])),
        ];
        for h in ["a.files.test", "b.files.test", "c.files.test"] {
            out.push((format!("api socks5 {h}"), curl(&["-x", &socks, &url(h)])));
        }
        out.push((
            "web http 127.0.0.2".to_string(),
            curl(&["--interface", "127.0.0.3", "-x", &proxy, &url("127.0.0.2")]),
        ));
        out
    };
    for (what, r) in traffic(&gw) {
        assert_eq!(r.status, 200, "observed under Audit: {what}: {r:?}");
    }
    gw.wait_reason("audit_would_deny");
    std::thread::sleep(Duration::from_millis(300));

    let out = Command::new(gateway_bin()).args(["audit", "suggest"]).arg(gw.audit_path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let suggested = String::from_utf8(out.stdout).unwrap();
    assert!(suggested.contains("{domain: \"*.files.test\"}"), "three names under files.test: {suggested}");
    assert!(suggested.contains("{cidr: \"127.0.0.2/32\"}"), "{suggested}");
    assert!(!suggested.contains("pod-template-hash"), "{suggested}");
    let file = gw.dir.path().join("suggested.yaml");
    std::fs::write(&file, &suggested).unwrap();

    // Enforce the suggestion instead of observing: `validate` accepts it, a reload applies it.
    gw.write_config(&dns, &format!("{CLIENTS}policyFiles: [suggested.yaml]\n"));
    let v = Command::new(gateway_bin()).args(["validate", "--config"]).arg(gw.config_path()).output().unwrap();
    assert!(v.status.success(), "{}\n{suggested}", String::from_utf8_lossy(&v.stderr));
    wait_until(Duration::from_secs(10), || gw.log_text().contains("configuration reloaded"));
    for (what, r) in traffic(&gw) {
        assert_eq!(r.status, 200, "replayed under the suggestion: {what}: {r:?}\n{suggested}");
    }
    let proxy = format!("http://{}", gw.http);
    // New destinations are denied: another name, another port, the other workload's destination.
    let r = curl(&["-x", &proxy, &format!("http://new.test:{p}/")]);
    assert_eq!(r.status, 403, "{r:?}");
    let r = curl(&["-x", &proxy, &format!("http://up.test:{}/", p + 1)]);
    assert_eq!(r.status, 403, "{r:?}");
    let r = curl(&["--interface", "127.0.0.3", "-x", &proxy, &format!("http://up.test:{p}/")]);
    assert_eq!(r.status, 403, "web never went to up.test: {r:?}");
    // The wildcard covers a name of files.test never seen (by design: three names made it one).
    assert_eq!(curl(&["-x", &format!("socks5h://{}", gw.socks), &format!("http://d.files.test:{p}/")]).status, 200);
}

/// `audit report --format html` of real traffic, opened in a real headless browser (Debian's
/// chromium): the page renders (a screenshot that is not empty), its SVG charts are in the
/// rendered DOM, and the browser reports no console error.
#[test]
fn the_html_report_renders_in_a_real_browser() {
    let dns = Dns::start(&[("up.test", "127.0.0.2"), ("meta.test", "169.254.169.254")]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let gw = Gateway::start(
        &dns,
        &format!(
            "{CLIENTS}policies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: api, namespace: shop}}\n    spec: {{podSelector: {{matchLabels: {{app: api}}}}, rules: [{{name: up, to: [{{domain: up.test}}, {{domain: meta.test}}], ports: [{{port: {p}}}]}}]}}\n"
        ),
    );
    let proxy = format!("http://{}", gw.http);
    for _ in 0..3 {
        assert_eq!(curl(&["-x", &proxy, &format!("http://up.test:{p}/bytes/4096")]).status, 200);
    }
    assert_eq!(curl(&["-x", &proxy, &format!("http://meta.test:{p}/")]).status, 403);
    assert_eq!(curl(&["-x", &proxy, &format!("http://169.254.169.254:{p}/")]).status, 403);
    gw.wait_reason("guard_blocked");
    std::thread::sleep(Duration::from_millis(300));

    let dir = tempfile::tempdir().unwrap();
    let (html, text) = (dir.path().join("report.html"), dir.path().join("report.txt"));
    for (format, out) in [("html", &html), ("text", &text)] {
        let o = Command::new(gateway_bin())
            .args(["audit", "report", "--format", format, "--out"])
            .arg(out)
            .arg(gw.audit_path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let text = std::fs::read_to_string(&text).unwrap();
    assert!(text.contains("5 decisions: 3 allowed, 2 denied, 0 would-deny"), "{text}");
    assert!(text.contains("169.254.169.254:") && text.contains("(guard_blocked)"), "{text}");
    assert!(text.contains("(dns_guard_blocked)"), "a name resolving to metadata: {text}");

    let url = format!("file://{}", html.display());
    let chromium = |args: &[&str]| {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .args([&format!("--user-data-dir={}", dir.path().join("profile").display())])
            .args(args)
            .arg(&url)
            .output()
            .expect("chromium (apt-get install chromium)")
    };
    let shot = dir.path().join("report.png");
    let o = chromium(&[&format!("--screenshot={}", shot.display()), "--window-size=1000,1400"]);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a rendered page ({} bytes): {stderr}", png.len());
    assert!(!stderr.contains("CONSOLE"), "console messages: {stderr}");
    let o = chromium(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&o.stdout);
    assert!(dom.contains("<svg id=\"workloads\"") && dom.contains("<svg id=\"hours\""), "{dom}");
    assert!(dom.matches("<rect").count() >= 25, "bars drawn: {dom}");
}
