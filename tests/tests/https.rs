//! The HTTPS proxy front (`listen.https`) with client certificates, through curl
//! (`--proxy https://... --proxy-cert ...`), with certificates an openssl-made CA issued: a
//! SPIFFE ID is a namespace and ServiceAccount, another certificate is the `clients` row that
//! names it; certificates that do not verify end the handshake, audited.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use egress_e2e::*;
use serde_json::json;

/// A small PKI made with the openssl command line, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl").args(args).current_dir(self.dir.path()).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A CA `<name>.crt` / `<name>.key` (EC P-256), with what `openssl ca` needs beside it.
    fn ca(&self, name: &str) {
        let d = self.path(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("index.txt"), "").unwrap();
        std::fs::write(d.join("serial"), "1000\n").unwrap();
        std::fs::write(
            d.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = local\n[local]\ndatabase = {0}/index.txt\nnew_certs_dir = {0}\nserial = {0}/serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n",
                d.display()
            ),
        )
        .unwrap();
        let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "2",
        ]);
    }

    /// `<name>.crt` / `<name>.key` for `cn`, signed by CA `ca`, with the extensions `ext` (an
    /// openssl extension section body), valid from `start` to `end` (`YYYYMMDDHHMMSSZ`; none:
    /// from now for a day).
    fn issue(&self, ca: &str, name: &str, cn: &str, ext: &str, dates: Option<(&str, &str)>) {
        let (csr, key, crt) = (format!("{name}.csr"), format!("{name}.key"), format!("{name}.crt"));
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ]);
        let extfile = format!("{name}.ext");
        std::fs::write(self.path(&extfile), format!("[ext]\n{ext}\n")).unwrap();
        let cnf = self.path(ca).join("ca.cnf").display().to_string();
        let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
        let mut args = vec![
            "ca",
            "-batch",
            "-notext",
            "-config",
            &cnf,
            "-cert",
            &ca_crt,
            "-keyfile",
            &ca_key,
            "-in",
            &csr,
            "-out",
            &crt,
            "-extfile",
            &extfile,
            "-extensions",
            "ext",
        ];
        match dates {
            Some((start, end)) => args.extend(["-startdate", start, "-enddate", end]),
            None => args.extend(["-days", "1"]),
        }
        self.openssl(&args);
    }
}

const CLIENT_EXT: &str = "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = clientAuth";

fn pki() -> Pki {
    let pki = Pki::new();
    pki.ca("ca");
    pki.ca("other-ca");
    pki.issue(
        "ca",
        "server",
        "egress-gateway",
        "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1",
        None,
    );
    pki.issue(
        "ca",
        "spiffe",
        "api",
        &format!("{CLIENT_EXT}\nsubjectAltName = URI:spiffe://cluster.local/ns/shop/sa/api"),
        None,
    );
    pki.issue("ca", "runner", "ci-runner", &format!("{CLIENT_EXT}\nsubjectAltName = DNS:runner.ci.example"), None);
    pki.issue("other-ca", "stranger", "ci-runner", CLIENT_EXT, None);
    pki.issue("ca", "expired", "ci-runner", CLIENT_EXT, Some(("20200101000000Z", "20200102000000Z")));
    pki
}

/// Client 127.0.0.1 is shop/api-addr by its address; the row of ServiceAccount shop/api lends
/// `app: api` to certificate clients of that account; CN ci-runner is ci/runner. Both policies
/// are `identity: Verified`.
fn config(pki: &Pki, port: u16, client_cert: &str) -> String {
    let p = |n: &str| pki.path(n).display().to_string();
    format!(
        r#"
guard: {{allowCidrs: [127.0.0.2/32]}}
https: {{cert: {}, key: {}, clientCa: {}, clientCert: {client_cert}}}
clients:
  - {{cidr: 127.0.0.1/32, namespace: shop, name: api-addr, serviceAccount: api, labels: {{app: api}}}}
  - {{certificate: {{commonName: ci-runner}}, namespace: ci, name: runner, labels: {{app: ci}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: api, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: api}}}}
      serviceAccountSelector: {{names: [api]}}
      identity: Verified
      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: ci, namespace: ci}}
    spec:
      podSelector: {{matchLabels: {{app: ci}}}}
      identity: Verified
      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]
"#,
        p("server.crt"),
        p("server.key"),
        p("ca.crt"),
    )
}

/// curl through the HTTPS proxy, trusting `ca` for the proxy's certificate, presenting `cert`.
fn through(gw: &Gateway, pki: &Pki, ca: &str, cert: Option<&str>, port: u16, connect: bool) -> CurlResult {
    let proxy = format!("https://127.0.0.1:{}", gw.https.port());
    let cacert = pki.path(&format!("{ca}.crt")).display().to_string();
    let (crt, key) = match cert {
        Some(c) => {
            (pki.path(&format!("{c}.crt")).display().to_string(), pki.path(&format!("{c}.key")).display().to_string())
        }
        None => (String::new(), String::new()),
    };
    let url = format!("http://up.test:{port}/");
    let mut args = vec!["--proxy", proxy.as_str(), "--proxy-cacert", cacert.as_str()];
    if cert.is_some() {
        args.extend(["--proxy-cert", crt.as_str(), "--proxy-key", key.as_str()]);
    }
    if connect {
        args.extend(["-p", "-w", "\n%{http_connect}"]);
    }
    args.push(&url);
    curl(&args)
}

#[test]
fn client_certificates_identify_clients_and_bad_ones_end_the_handshake() {
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let pki = pki();
    let gw = Gateway::start(&dns, &config(&pki, port, "Optional"));

    // A SPIFFE ID: ServiceAccount shop/api, verified; absolute form and CONNECT.
    for connect in [false, true] {
        let r = through(&gw, &pki, "ca", Some("spiffe"), port, connect);
        assert_eq!(r.status, 200, "connect={connect}: {r:?}\n{}", gw.log_text());
    }
    let d = gw.decision(|e| e["client"]["identity_source"] == "certificate" && e["front"] == "connect");
    assert_eq!(d["client"]["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/api", "{d}");
    assert_eq!(
        (d["client"]["namespace"].as_str(), d["client"]["serviceAccount"].as_str()),
        (Some("shop"), Some("api"))
    );
    assert_eq!(d["client"]["labels"], json!({"app": "api"}), "lent by the clients row of shop/api: {d}");
    assert_eq!(d["decision"]["policy"], "shop/api", "{d}");
    assert_eq!(gw.metric("egress_client_identities_total{source=\"certificate\"}"), Some(2.0));

    // No certificate (Optional): the client is its address, which a Verified policy never selects.
    let r = through(&gw, &pki, "ca", None, port, false);
    assert_eq!(r.status, 407, "{r:?}");
    let d = gw.decision(|e| e["decision"]["reason"] == "identity_required");
    assert_eq!(
        (d["client"]["identity_source"].as_str(), d["client"]["name"].as_str()),
        (Some("address"), Some("api-addr"))
    );

    // Another certificate: the clients row naming its common name.
    assert_eq!(through(&gw, &pki, "ca", Some("runner"), port, false).status, 200);
    let d = gw.decision(|e| e["client"]["namespace"] == "ci");
    assert_eq!(
        (d["client"]["identity_source"].as_str(), d["client"]["name"].as_str()),
        (Some("certificate"), Some("runner"))
    );
    assert!(d["client"].get("spiffe_id").is_none(), "{d}");

    // From another CA, or expired: the handshake ends, no request is served, each is audited.
    for (cert, cause) in [("stranger", "UnknownIssuer"), ("expired", "certificate expired")] {
        let before = up.hits();
        let r = through(&gw, &pki, "ca", Some(cert), port, false);
        assert_eq!(r.status, 0, "{cert}: {r:?}");
        assert_ne!(r.exit, 0, "{cert}: {r:?}");
        assert_eq!(up.hits(), before);
        let d = gw.decision(|e| {
            e["decision"]["reason"] == "auth_failed"
                && e["decision"]["detail"].as_str().is_some_and(|d| d.contains(cause))
        });
        assert!(d["decision"]["detail"].as_str().unwrap().starts_with("TLS: "), "{d}");
    }
    // Not TLS at all: refused and audited as malformed; the front keeps serving.
    let out = raw_exchange(gw.https, b"GET http://up.test/ HTTP/1.1\r\nHost: up.test\r\n\r\n", Duration::from_secs(5));
    assert!(!String::from_utf8_lossy(&out).contains("200"), "{out:?}");
    gw.decision(|e| {
        e["decision"]["reason"] == "malformed_request"
            && e["decision"]["detail"].as_str().is_some_and(|d| d.starts_with("TLS: "))
    });
    assert_eq!(through(&gw, &pki, "ca", Some("spiffe"), port, false).status, 200);
}

#[test]
fn a_required_client_certificate_and_a_renewed_server_certificate() {
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let pki = pki();
    let gw = Gateway::start(&dns, &config(&pki, port, "Required"));
    assert_eq!(through(&gw, &pki, "ca", Some("spiffe"), port, true).status, 200);
    // Required: no certificate, no handshake.
    let r = through(&gw, &pki, "ca", None, port, false);
    assert!(r.status == 0 && r.exit != 0, "{r:?}");
    gw.decision(|e| e["decision"]["reason"] == "auth_failed");

    // The server certificate is renewed in place (by another CA, to tell them apart): new
    // connections get the new one, without a restart.
    pki.ca("ca-2");
    pki.issue(
        "ca-2",
        "server-2",
        "egress-gateway",
        "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1",
        None,
    );
    for (from, to) in [("server-2.key", "server.key.new"), ("server-2.crt", "server.crt.new")] {
        std::fs::copy(pki.path(from), pki.path(to)).unwrap();
    }
    std::fs::rename(pki.path("server.key.new"), pki.path("server.key")).unwrap();
    std::fs::rename(pki.path("server.crt.new"), pki.path("server.crt")).unwrap();
    wait_until(Duration::from_secs(10), || through(&gw, &pki, "ca-2", Some("spiffe"), port, false).status == 200);
    let r = through(&gw, &pki, "ca", Some("spiffe"), port, false);
    assert!(r.status == 0 && r.exit != 0, "the old CA no longer vouches for the proxy: {r:?}");
    assert!(gw.log_text().contains("configuration reloaded"));
}

/// Kubernetes mode: a SPIFFE certificate is accepted from a Pod of its ServiceAccount (the
/// client is then that Pod, with its labels) and refused as `identity_mismatch` from a Pod of
/// another account.
#[test]
fn in_kubernetes_mode_a_spiffe_certificate_comes_from_a_pod_of_its_account() {
    use egress_e2e::kubeapi::*;
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let pki = pki();
    // pod() gives Pod <name> the ServiceAccount <name>-sa.
    pki.issue(
        "ca",
        "api-1-sa",
        "api",
        &format!("{CLIENT_EXT}\nsubjectAltName = URI:spiffe://cluster.local/ns/shop/sa/api-1-sa"),
        None,
    );
    let api = FakeApi::start();
    api.apply(NAMESPACES, namespace("shop", json!({})));
    api.apply(PODS, pod("shop", "api-1", &["127.0.0.1"], json!({"app": "api"}), "Running"));
    api.apply(
        POLICIES,
        json!({"apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
               "metadata": {"name": "api", "namespace": "shop", "generation": 1},
               "spec": {"podSelector": {"matchLabels": {"app": "api"}}, "identity": "Verified",
                        "rules": [{"name": "up", "to": [{"domain": "up.test"}], "ports": [{"port": port}]}]}}),
    );
    let kubeconfig = pki.path("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let p = |n: &str| pki.path(n).display().to_string();
    let gw = Gateway::start(
        &dns,
        &format!(
            "guard: {{allowCidrs: [127.0.0.2/32]}}\nkubernetes: {{enabled: true, writeStatus: false, kubeconfig: {}}}\nhttps: {{cert: {}, key: {}, clientCa: {}}}\n",
            kubeconfig.display(),
            p("server.crt"),
            p("server.key"),
            p("ca.crt")
        ),
    );
    wait_until(Duration::from_secs(10), || through(&gw, &pki, "ca", Some("api-1-sa"), port, false).status == 200);
    let d = gw.decision(|e| e["client"]["identity_source"] == "certificate");
    assert_eq!((d["client"]["name"].as_str(), &d["client"]["labels"]), (Some("api-1"), &json!({"app": "api"})), "{d}");
    // The certificate of shop/api (another account) from Pod api-1: identity_mismatch.
    let r = through(&gw, &pki, "ca", Some("spiffe"), port, false);
    assert_eq!(r.status, 403, "{r:?}");
    let m = gw.decision(|e| e["decision"]["reason"] == "identity_mismatch");
    assert_eq!(m["client"]["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/api", "{m}");
    assert!(m["decision"]["detail"].as_str().unwrap().contains("the certificate is ServiceAccount shop/api's"), "{m}");
}
