//! Workload identity: Kubernetes ServiceAccount tokens in `Proxy-Authorization` (standalone mode,
//! the issuer's keys from a JWKS file), through the real HTTP proxy with curl.

#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use egress_e2e::*;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

const ISSUER: &str = "https://kubernetes.default.svc";

/// A token issuer with one ES256 key.
struct Issuer {
    key: EcdsaKeyPair,
    kid: &'static str,
}

impl Issuer {
    fn new(kid: &'static str) -> Issuer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        Issuer { key, kid }
    }

    fn jwk(&self) -> Value {
        let p = self.key.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig", "alg": "ES256",
               "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])})
    }

    fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let msg =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = self.key.sign(&SystemRandom::new(), msg.as_bytes()).unwrap();
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A projected token of ServiceAccount `shop/api`, bound to Pod `api-7`, valid for an hour.
fn claims() -> Value {
    let now = now();
    json!({"iss": ISSUER, "aud": ["egress.dev"], "iat": now, "nbf": now, "exp": now + 3600,
           "sub": "system:serviceaccount:shop:api",
           "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "api", "uid": "sa-uid"},
                             "pod": {"name": "api-7", "uid": "pod-uid"}}})
}

/// Standalone: client 127.0.0.1 is nobody by its address; the `clients` row of ServiceAccount
/// `shop/api` (at an address no test uses) lends `app: api` to token clients of that account,
/// and only `app: api` may reach up.test.
fn start(dns: &Dns, port: u16, jwks: &std::path::Path) -> Gateway {
    let body = format!(
        r#"
guard: {{allowCidrs: [127.0.0.2/32]}}
identity:
  tokens: {{issuer: "{ISSUER}", jwksFile: {}}}
clients:
  - {{cidr: 10.255.0.1/32, namespace: shop, name: api-row, serviceAccount: api, labels: {{app: api}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: api-egress, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: api}}}}
      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]
"#,
        jwks.display()
    );
    Gateway::start(dns, &body)
}

fn through(gw: &Gateway, port: u16, auth: &[&str], connect: bool) -> CurlResult {
    let proxy = format!("http://{}", gw.http);
    let url = format!("http://up.test:{port}/who");
    let mut args = vec!["-x", &proxy];
    if connect {
        args.push("-p");
    }
    args.extend_from_slice(auth);
    args.push(&url);
    curl(&args)
}

#[test]
fn service_account_tokens_identify_clients_and_bad_ones_get_407() {
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let issuer = Issuer::new("key-1");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [issuer.jwk()]}).to_string()).unwrap();
    let gw = start(&dns, port, &jwks);

    // By its address alone the client is nobody: the default action (deny).
    assert_eq!(through(&gw, port, &[], false).status, 403);
    // With a valid token it is shop/api (labels lent by the clients row), through both the
    // absolute-form front and CONNECT, as Bearer and as Basic (the token as the password).
    let token = issuer.sign(&claims());
    let bearer = format!("Proxy-Authorization: Bearer {token}");
    for (auth, connect) in [
        (vec!["-H", bearer.as_str()], false),
        (vec!["--proxy-header", bearer.as_str()], true),
        (vec!["--proxy-user", &format!("pod:{token}")], false),
        (vec!["--proxy-user", &format!("pod:{token}")], true),
    ] {
        let r = through(&gw, port, &auth, connect);
        assert_eq!(r.status, 200, "{auth:?} connect={connect}: {r:?}\n{}", gw.log_text());
    }
    let d = gw.decision(|e| e["decision"]["action"] == "allow" && e["client"]["identity_source"] == "token");
    assert_eq!(d["client"]["namespace"], "shop", "{d}");
    assert_eq!(d["client"]["serviceAccount"], "api", "{d}");
    assert_eq!(d["client"]["name"], "api-7", "{d}");
    assert_eq!(d["client"]["labels"], json!({"app": "api"}), "{d}");
    assert_eq!(d["decision"]["policy"], "shop/api-egress", "{d}");
    let plain = gw.decision(|e| e["decision"]["reason"] == "default_deny");
    assert_eq!(plain["client"]["identity_source"], "address", "{plain}");

    // Refused tokens: 407 with a challenge, reason token_invalid and the cause in the detail.
    let other = Issuer::new("key-1");
    let mut expired = claims();
    expired["exp"] = json!(now() - 600);
    let mut early = claims();
    early["nbf"] = json!(now() + 600);
    let mut audience = claims();
    audience["aud"] = json!(["https://kubernetes.default.svc"]);
    let mut iss = claims();
    iss["iss"] = json!("https://evil.example");
    let unknown_kid = Issuer::new("key-9").sign(&claims());
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    // HS256 "signed" with the issuer's public key as the HMAC secret (the key-confusion attack).
    let hs256 = {
        let msg = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "kid": "key-1", "typ": "JWT"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, issuer.key.public_key().as_ref());
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, msg.as_bytes()).as_ref()))
    };
    let cases = [
        (hs256, "algorithm \"HS256\""),
        (issuer.sign(&expired), "expired"),
        (issuer.sign(&early), "not yet valid"),
        (issuer.sign(&audience), "audience"),
        (issuer.sign(&iss), "issuer"),
        (other.sign(&claims()), "signature"),
        (unknown_kid, "unknown key"),
        (none, "algorithm \"none\""),
        (token[..token.len() - 10].to_string(), "signature"),
        ("not-a-token".to_string(), "malformed"),
    ];
    for (bad, cause) in &cases {
        let h = format!("Proxy-Authorization: Bearer {bad}");
        let r = through(&gw, port, &["-H", &h, "-D", "-"], false);
        assert_eq!(r.status, 407, "{cause}: {r:?}");
        assert!(r.body.to_ascii_lowercase().contains("proxy-authenticate: bearer"), "{cause}: a challenge: {r:?}");
        let d = gw.decision(|e| {
            e["decision"]["reason"] == "token_invalid"
                && e["decision"]["detail"].as_str().is_some_and(|d| d.contains(cause))
        });
        assert_eq!(d["decision"]["action"], "deny", "{d}");
    }
    // CONNECT with a refused token: 407 too (the CONNECT's own status).
    let h = format!("Proxy-Authorization: Bearer {}", issuer.sign(&expired));
    assert_eq!(through(&gw, port, &["--proxy-header", &h, "-w", "\n%{http_connect}"], true).status, 407);

    // The token itself is never written: not to the audit trail, not to the log.
    gw.events_at_least(1);
    std::thread::sleep(Duration::from_millis(300));
    let signature = token.rsplit('.').next().unwrap();
    let audit = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(!audit.contains(signature) && !audit.contains(&token[..40]), "a token in the audit trail");
    assert!(!gw.log_text().contains(signature), "a token in the log");
}

/// Kubernetes mode: a Pod-bound token is that Pod (its labels from the watch), only from that
/// Pod's own address unless `identity.allowRemote`; a token of a Pod that is gone is refused.
#[test]
fn in_kubernetes_mode_a_pod_bound_token_is_its_pod_and_only_from_it() {
    use egress_e2e::kubeapi::*;
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let api = FakeApi::start();
    api.apply(NAMESPACES, namespace("shop", json!({"team": "payments"})));
    // A platform rule by namespace label, for a SOCKS5 user of namespace shop (no Pod).
    api.apply(
        CLUSTER_POLICIES,
        json!({"apiVersion": "egress.dev/v1alpha1", "kind": "ClusterEgressPolicy", "metadata": {"name": "payments-ci", "generation": 1},
               "spec": {"namespaceSelector": {"matchLabels": {"team": "payments"}}, "podSelector": {"matchLabels": {"app": "ci"}},
                        "rules": [{"name": "up", "action": "Allow", "to": [{"domain": "up.test"}], "ports": [{"port": port}]}]}}),
    );
    // pod() gives Pod <name> the ServiceAccount <name>-sa and the uid uid-<ns>-<name>.
    api.apply(PODS, pod("shop", "api-1", &["127.0.0.1"], json!({"app": "api"}), "Running"));
    api.apply(PODS, pod("shop", "web-1", &["127.0.0.5"], json!({"app": "web"}), "Running"));
    api.apply(
        POLICIES,
        json!({"apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
               "metadata": {"name": "api-egress", "namespace": "shop", "generation": 1},
               "spec": {"podSelector": {"matchLabels": {"app": "api"}}, "serviceAccountSelector": {"names": ["api-1-sa"]},
                        "rules": [{"name": "up", "to": [{"domain": "up.test"}], "ports": [{"port": port}]}]}}),
    );
    // Labelled app: api, but running as ServiceAccount api-2-sa: the policy does not select it.
    api.apply(PODS, pod("shop", "api-2", &["127.0.0.6"], json!({"app": "api"}), "Running"));
    let issuer = Issuer::new("key-1");
    let dir = tempfile::tempdir().unwrap();
    let (jwks, kubeconfig) = (dir.path().join("jwks.json"), dir.path().join("kubeconfig"));
    std::fs::write(&jwks, json!({"keys": [issuer.jwk()]}).to_string()).unwrap();
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let token_of = |pod: &str, uid: &str| {
        let mut c = claims();
        c["sub"] = json!(format!("system:serviceaccount:shop:{pod}-sa"));
        c["kubernetes.io"] = json!({"namespace": "shop", "serviceaccount": {"name": format!("{pod}-sa"), "uid": "sa"},
                                    "pod": {"name": pod, "uid": uid}});
        format!("Proxy-Authorization: Bearer {}", issuer.sign(&c))
    };
    let start = |allow_remote: bool| {
        Gateway::start(
            &dns,
            &format!(
                "guard: {{allowCidrs: [127.0.0.2/32]}}\nkubernetes: {{enabled: true, kubeconfig: {}}}\nidentity:\n  allowRemote: {allow_remote}\n  tokens: {{issuer: \"{ISSUER}\", jwksFile: {}}}\nsocks5: {{users: [{{username: ci, password: pw, namespace: shop, serviceAccount: ci, labels: {{app: ci}}}}]}}\n",
                kubeconfig.display(),
                jwks.display()
            ),
        )
    };
    let get = |gw: &Gateway, from: &str, auth: &str| {
        let proxy = format!("http://{}", gw.http);
        let url = format!("http://up.test:{port}/");
        curl(&["--interface", from, "-x", &proxy, "-H", auth, &url])
    };
    let gw = start(false);
    let api_1 = token_of("api-1", "uid-shop-api-1");
    wait_until(Duration::from_secs(10), || get(&gw, "127.0.0.1", &api_1).status == 200);
    // By address: the Pod's ServiceAccount (from the watch) takes part in the selection.
    assert_eq!(get(&gw, "127.0.0.1", "X-No-Token: 1").status, 200);
    let r = get(&gw, "127.0.0.6", "X-No-Token: 1");
    assert!(r.status == 403 && r.body.contains("default_deny"), "{r:?}");
    let d = gw.decision(|e| e["client"]["identity_source"] == "token" && e["decision"]["action"] == "allow");
    assert_eq!(
        (d["client"]["name"].as_str(), d["client"]["serviceAccount"].as_str()),
        (Some("api-1"), Some("api-1-sa"))
    );
    assert_eq!(d["client"]["labels"], json!({"app": "api"}), "the Pod's labels from the watch: {d}");
    // The same token from another Pod, or from an address that is no Pod: identity_mismatch.
    for from in ["127.0.0.5", "127.0.0.9"] {
        let r = get(&gw, from, &api_1);
        assert_eq!(r.status, 403, "{from}: {r:?}");
        assert!(r.body.contains("identity_mismatch"), "{from}: {r:?}");
    }
    // A SOCKS5 user of namespace shop has that Namespace's labels (team: payments) from the watch.
    let socks = curl(&[
        "--interface",
        "127.0.0.9",
        "-x",
        &format!("socks5h://ci:pw@{}", gw.socks),
        &format!("http://up.test:{port}/"),
    ]);
    assert_eq!(socks.status, 200, "{socks:?}");
    let d = gw.decision(|e| e["client"]["identity_source"] == "socks5_user");
    assert_eq!(d["decision"]["policy"], "payments-ci", "{d}");
    let m = gw.decision(|e| e["decision"]["reason"] == "identity_mismatch" && e["client"]["address"] == "127.0.0.5");
    assert!(m["decision"]["detail"].as_str().unwrap().contains("Pod shop/web-1"), "{m}");
    // A token of a Pod that was replaced (same name, another uid): the Pod it names is gone.
    let stale = token_of("api-1", "uid-of-an-earlier-api-1");
    let r = get(&gw, "127.0.0.1", &stale);
    assert_eq!(r.status, 407, "{r:?}");
    gw.decision(|e| e["decision"]["detail"].as_str().is_some_and(|d| d.contains("pod gone: shop/api-1")));
    drop(gw);

    // allowRemote: a client outside the cluster may present a Pod's token; the Pod must exist.
    let gw = start(true);
    wait_until(Duration::from_secs(10), || get(&gw, "127.0.0.9", &api_1).status == 200);
    let r = get(&gw, "127.0.0.9", &token_of("api-9", "uid-shop-api-9"));
    assert_eq!(r.status, 407, "{r:?}");
    api.delete(PODS, "shop", "api-1");
    wait_until(Duration::from_secs(10), || get(&gw, "127.0.0.9", &api_1).status == 407);
}

/// SOCKS5 carries no token (RFC 1929 caps a password at 255 bytes), but a `socks5.users` entry
/// may name an identity: a client that authenticates as it is that identity, verified by its
/// password; a user that names none is left to its address.
#[test]
fn a_socks5_user_can_name_an_identity() {
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let gw = Gateway::start(
        &dns,
        &format!(
            r#"
guard: {{allowCidrs: [127.0.0.2/32]}}
socks5:
  users:
    - {{username: ci, password: s3cret, namespace: shop, serviceAccount: runner, labels: {{app: api}}}}
    - {{username: plain, password: pw}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: api-egress, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: api}}}}
      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]
"#
        ),
    );
    let url = format!("http://up.test:{port}/");
    let via = |user: &str| curl(&["-x", &format!("socks5h://{user}@{}", gw.socks), &url]);
    assert_eq!(via("ci:s3cret").status, 200);
    let d = gw.decision(|e| e["client"]["identity_source"] == "socks5_user");
    assert_eq!(d["decision"]["action"], "allow", "{d}");
    assert_eq!(
        (d["client"]["namespace"].as_str(), d["client"]["serviceAccount"].as_str()),
        (Some("shop"), Some("runner"))
    );
    assert_eq!((d["client"]["name"].as_str(), &d["client"]["labels"]), (Some("ci"), &json!({"app": "api"})), "{d}");
    // A user without an identity: who its address says (nobody here), so the default action.
    assert_ne!(via("plain:pw").status, 200);
    let d = gw.decision(|e| e["front"] == "socks5" && e["decision"]["reason"] == "default_deny");
    assert_eq!(d["client"]["identity_source"], "address", "{d}");
}

/// `identity: Verified`: the policy's Allow rules apply only to clients that proved who they
/// are. The very client it selects by address (the `clients` row of 127.0.0.1: shop/api, app
/// api) is refused as `identity_required` on every front, answered in that front's protocol,
/// while a policy that asks nothing of the identity still serves it; with a token (HTTP,
/// CONNECT) or an identity-bearing SOCKS5 user it is allowed.
#[test]
fn a_verified_policy_never_selects_an_address_only_client_on_any_front() {
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2"), ("open.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let issuer = Issuer::new("key-1");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [issuer.jwk()]}).to_string()).unwrap();
    let gw = Gateway::start(
        &dns,
        &format!(
            r#"
guard: {{allowCidrs: [127.0.0.2/32]}}
transparent: {{trustedRelays: [127.0.0.3/32], relayKeyFile: $RELAY_KEY}}
identity:
  tokens: {{issuer: "{ISSUER}", jwksFile: {}}}
socks5:
  users:
    - {{username: api, password: s3cret, namespace: shop, serviceAccount: api, labels: {{app: api}}}}
    - {{username: plain, password: pw}}
clients:
  - {{cidr: 127.0.0.1/32, namespace: shop, name: api-1, serviceAccount: api, labels: {{app: api}}}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: verified-only, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: api}}}}
      serviceAccountSelector: {{names: [api]}}
      identity: Verified
      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: anyone, namespace: shop}}
    spec:
      podSelector: {{matchLabels: {{app: api}}}}
      rules: [{{name: open, to: [{{domain: open.test}}], ports: [{{port: {port}}}]}}]
"#,
            jwks.display()
        ),
    );
    let (up_url, open_url) = (format!("http://up.test:{port}/"), format!("http://open.test:{port}/"));
    let proxy = format!("http://{}", gw.http);
    let required = |front: &str| {
        let d = gw.decision(|e| e["front"] == front && e["decision"]["reason"] == "identity_required");
        assert_eq!(d["client"]["identity_source"], "address", "{d}");
        assert_eq!(d["decision"]["policy"], "shop/verified-only", "{d}");
        assert_eq!(d["client"]["name"], "api-1", "selected by its address: {d}");
    };

    // HTTP (absolute form) and CONNECT: 407 with a challenge; a token gets through.
    for connect in [false, true] {
        let mut args = vec!["-x", proxy.as_str(), "-D", "-"];
        if connect {
            args.extend(["-p", "-w", "\n%{http_connect}"]);
        }
        assert_eq!(curl(&[&args[..], &[open_url.as_str()]].concat()).status, 200, "open.test needs no identity");
        let r = curl(&[&args[..], &[up_url.as_str()]].concat());
        assert_eq!(r.status, 407, "connect={connect}: {r:?}");
        assert!(r.body.to_ascii_lowercase().contains("proxy-authenticate: bearer"), "{r:?}");
        assert!(r.body.contains("identity_required"), "{r:?}");
        let token = format!("Proxy-Authorization: Bearer {}", issuer.sign(&claims()));
        let auth = if connect { "--proxy-header" } else { "-H" };
        let r = curl(&[&args[..], &[auth, token.as_str(), up_url.as_str()]].concat());
        assert_eq!(r.status, 200, "connect={connect} with a token: {r:?}");
    }
    required("http");
    required("connect");

    // SOCKS5: a user that names no identity is its address: 0x02; the identity-bearing user passes.
    let via = |user: &str, url: &str| curl(&["-x", &format!("socks5h://{user}@{}", gw.socks), url]);
    assert_eq!(via("plain:pw", &open_url).status, 200);
    let r = via("plain:pw", &up_url);
    assert!(r.status == 0 && r.exit != 0, "{r:?}");
    required("socks5");
    assert_eq!(via("api:s3cret", &up_url).status, 200);
    gw.decision(|e| {
        e["front"] == "socks5" && e["client"]["identity_source"] == "socks5_user" && e["decision"]["action"] == "allow"
    });

    // Transparent: a redirected connection never carries a credential, so the address it comes
    // from is all there is: refused (403 to a client that does not know it speaks to a proxy).
    let relay = TestRelay::start(gw.transparent, "127.0.0.3", format!("127.0.0.2:{port}").parse().unwrap());
    let via_relay = |host: &str| {
        curl(&[
            "--connect-to",
            &format!("{host}:{port}:127.0.0.1:{}", relay.addr.port()),
            &format!("http://{host}:{port}/"),
        ])
    };
    assert_eq!(via_relay("open.test").status, 200);
    let r = via_relay("up.test");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("identity_required"), "{r:?}");
    required("transparent");

    // The simulator agrees: address-only is identity_required, --verified is allowed.
    let check = |extra: &[&str]| {
        let out = std::process::Command::new(gateway_bin())
            .args(["check", "--no-resolve", "--client", "127.0.0.1", "--config"])
            .arg(gw.config_path())
            .args(extra)
            .arg(format!("up.test:{port}"))
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["reason_code"].clone()
    };
    assert_eq!(check(&[]), "identity_required");
    assert_eq!(check(&["--verified"]), "rule_allow");
}

/// Kubernetes mode without `jwksFile`: the keys come from the API server's `/openid/v1/jwks`
/// (granted by deploy/rbac.yaml). A token signed by a key the cluster adds later (a rotation)
/// is accepted on first use; tokens with made-up key ids are refused and cannot make the gateway
/// fetch more than once per interval. Without the grant the gateway never becomes ready.
#[test]
fn in_kubernetes_mode_the_keys_come_from_the_api_server_and_follow_a_rotation() {
    use egress_e2e::kubeapi::*;
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let api = FakeApi::start();
    api.apply(NAMESPACES, namespace("shop", json!({})));
    api.apply(
        POLICIES,
        json!({"apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
               "metadata": {"name": "api-egress", "namespace": "shop", "generation": 1},
               "spec": {"podSelector": {}, "identity": "Verified",
                        "rules": [{"name": "up", "to": [{"domain": "up.test"}], "ports": [{"port": port}]}]}}),
    );
    let (one, two) = (Issuer::new("key-1"), Issuer::new("key-2"));
    api.set_jwks(json!({"keys": [one.jwk()]}));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let config = format!(
        "guard: {{allowCidrs: [127.0.0.2/32]}}\nkubernetes: {{enabled: true, writeStatus: false, kubeconfig: {}}}\nidentity:\n  allowRemote: true\n  tokens: {{issuer: \"{ISSUER}\"}}\n",
        kubeconfig.display()
    );
    // A ServiceAccount token of shop/api, not bound to a Pod.
    let token = |issuer: &Issuer| {
        let mut c = claims();
        c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
        format!("Proxy-Authorization: Bearer {}", issuer.sign(&c))
    };
    let gw = Gateway::start(&dns, &config);
    let get =
        |auth: &str| curl(&["-x", &format!("http://{}", gw.http), "-H", auth, &format!("http://up.test:{port}/")]);
    assert_eq!(get(&token(&one)).status, 200);
    let fetches = || api.requests().iter().filter(|r| r.ends_with(" /openid/v1/jwks")).count();
    let before = fetches();

    // The cluster rotates: key-2 joins the set. The first token signed with it is accepted.
    api.set_jwks(json!({"keys": [one.jwk(), two.jwk()]}));
    let r = get(&token(&two));
    assert_eq!(r.status, 200, "{r:?}\n{}", gw.log_text());
    assert_eq!(fetches(), before + 1, "fetched once, for the unknown key");
    assert_eq!(get(&token(&one)).status, 200, "the old key still verifies");

    // Made-up key ids: refused, and the burst costs the API at most one more fetch.
    let after_rotation = fetches();
    for i in 0..20 {
        let kid: &'static str = Box::leak(format!("made-up-{i}").into_boxed_str());
        let r = get(&token(&Issuer::new(kid)));
        assert_eq!(r.status, 407, "{r:?}");
    }
    assert!(fetches() <= after_rotation + 1, "{} fetches for 20 unknown keys", fetches() - after_rotation);
    gw.decision(|e| e["decision"]["detail"].as_str().is_some_and(|d| d.contains("unknown key \"made-up-")));
    let seen = egress_e2e::rbac::assert_covered(
        &api.requests(),
        &std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap(),
        "deploy/rbac.yaml",
    );
    assert!(seen.contains("get /openid/v1/jwks"), "{seen:?}");
    drop(gw);

    // Without the grant: forbidden, and the gateway does not become ready.
    let rbac = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap();
    let without = rbac
        .replace("  - nonResourceURLs: [/.well-known/openid-configuration, /openid/v1/jwks]\n    verbs: [get]\n", "");
    assert_ne!(without, rbac);
    api.set_rbac(&[&without]);
    let gw = Gateway::start_alive(&dns, &config);
    wait_until(Duration::from_secs(10), || gw.log_text().contains("not ready until they are fetched"));
    assert_eq!(gw.admin_get("/readyz").map(|(s, _)| s), Some(503));
    assert!(api.forbidden().iter().any(|l| l.ends_with(" /openid/v1/jwks")), "{:?}", api.forbidden());
}

/// A collector that keeps every byte sent to it: a syslog-over-TCP receiver, or (`http`) an
/// HTTP endpoint answering each request `200` (an ndjson webhook).
struct Collector {
    addr: std::net::SocketAddr,
    bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Collector {
    fn start(http: bool) -> Collector {
        use std::io::{BufRead, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = bytes.clone();
        std::thread::spawn(move || {
            while let Ok((s, _)) = listener.accept() {
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    let mut r = std::io::BufReader::new(s);
                    if !http {
                        let mut buf = [0u8; 65536];
                        while let Ok(n @ 1..) = r.read(&mut buf) {
                            kept.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        return;
                    }
                    loop {
                        let mut len = 0usize;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0u8; len];
                        r.read_exact(&mut body).unwrap();
                        kept.lock().unwrap().extend_from_slice(&body);
                        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
                    }
                });
            }
        });
        Collector { addr, bytes }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).to_string()
    }
}

/// The token never reaches an audit sink, in any format or transport: JSON, OCSF and ECS files,
/// syslog over TCP and an HTTP batch endpoint all carry the token clients' decisions (allowed
/// and refused) and none of them the token or its signature; neither does the log.
#[test]
fn no_sink_ever_receives_the_token() {
    let (dns, up) = (Dns::start(&[("up.test", "127.0.0.2")]), Upstream::start("127.0.0.2"));
    let port = up.addr.port();
    let issuer = Issuer::new("key-1");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [issuer.jwk()]}).to_string()).unwrap();
    let (syslog, http) = (Collector::start(false), Collector::start(true));
    let audit = format!(
        "audit:\n  spool: {{dir: $DIR/spool}}\n  sinks:\n    - {{name: json, type: file, path: $DIR/audit.jsonl}}\n    - {{name: ocsf, type: file, format: ocsf, path: $DIR/ocsf.jsonl}}\n    - {{name: ecs, type: file, format: ecs, path: $DIR/ecs.jsonl}}\n    - {{name: syslog, type: syslog, address: \"{}\", transport: tcp}}\n    - {{name: webhook, type: http, url: \"http://{}/events\", preset: ndjson, gzip: false, batch: {{maxAge: 100ms}}}}\n",
        syslog.addr, http.addr
    );
    let body = format!(
        "{audit}guard: {{allowCidrs: [127.0.0.2/32]}}\nidentity:\n  tokens: {{issuer: \"{ISSUER}\", jwksFile: {}}}\nclients:\n  - {{cidr: 10.255.0.1/32, namespace: shop, name: api-row, serviceAccount: api, labels: {{app: api}}}}\npolicies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: api-egress, namespace: shop}}\n    spec:\n      podSelector: {{matchLabels: {{app: api}}}}\n      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]\n",
        jwks.display()
    );
    let gw = Gateway::start(&dns, &body);
    let token = issuer.sign(&claims());
    let mut expired = claims();
    expired["exp"] = json!(now() - 600);
    let refused = issuer.sign(&expired);
    let bearer = |t: &str| format!("Proxy-Authorization: Bearer {t}");
    assert_eq!(through(&gw, port, &["-H", &bearer(&token)], false).status, 200);
    assert_eq!(through(&gw, port, &["--proxy-user", &format!("pod:{token}")], true).status, 200);
    assert_eq!(through(&gw, port, &["-H", &bearer(&refused)], false).status, 407);
    let files = ["audit.jsonl", "ocsf.jsonl", "ecs.jsonl"].map(|f| gw.dir.path().join(f));
    let outputs = || -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> =
            files.iter().map(|f| (f.display().to_string(), std::fs::read_to_string(f).unwrap_or_default())).collect();
        v.push(("syslog".into(), syslog.text()));
        v.push(("http".into(), http.text()));
        v
    };
    // Every sink has the refusal (the last event) before anything is looked for.
    let start = std::time::Instant::now();
    while let Some((sink, text)) = outputs().into_iter().find(|(_, text)| !text.contains("token_invalid")) {
        assert!(start.elapsed() < Duration::from_secs(20), "{sink} has not the refusal: {text}\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    for (sink, text) in outputs() {
        assert!(text.contains("\"identity_source\":\"token\""), "{sink} carries the token clients' events");
        for secret in [&token, &refused] {
            let signature = secret.rsplit('.').next().unwrap();
            assert!(!text.contains(signature), "{sink} holds a token's signature");
            assert!(!text.contains(&secret[..40]), "{sink} holds a token");
        }
    }
    assert!(!gw.log_text().contains(token.rsplit('.').next().unwrap()), "a token in the log");
}
