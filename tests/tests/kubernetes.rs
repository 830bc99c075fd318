//! Kubernetes mode against a scripted API server (real list/watch JSON over HTTP), asserting
//! decisions made through the real proxy listener.

use std::time::Duration;

use egress_e2e::kubeapi::*;
use egress_e2e::*;
use serde_json::{Value, json};

fn egress_policy(ns: &str, name: &str, selector: Value, rules: Value) -> Value {
    json!({"apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
           "metadata": {"name": name, "namespace": ns, "generation": 1},
           "spec": {"podSelector": selector, "rules": rules}})
}

fn cluster_policy(name: &str, ns_selector: Value, rules: Value) -> Value {
    json!({"apiVersion": "egress.dev/v1alpha1", "kind": "ClusterEgressPolicy",
           "metadata": {"name": name, "generation": 1},
           "spec": {"namespaceSelector": ns_selector, "podSelector": {}, "rules": rules}})
}

struct Setup {
    api: FakeApi,
    gw: Gateway,
    _dns: Dns,
    _up: Upstream,
    port: u16,
}

fn setup(populate: impl FnOnce(&FakeApi, u16)) -> Setup {
    let dns = Dns::start(&[("up.test", "127.0.0.2"), ("other.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let api = FakeApi::start();
    populate(&api, up.addr.port());
    let kc = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kc.path(), api.kubeconfig()).unwrap();
    let (kc_file, kc_path) = kc.keep().unwrap();
    drop(kc_file);
    let body = format!(
        "guard: {{allowCidrs: [127.0.0.2/32]}}\nkubernetes: {{enabled: true, kubeconfig: {}}}\n",
        kc_path.display()
    );
    let gw = Gateway::start(&dns, &body);
    Setup {
        api,
        gw,
        _dns: dns,
        port: up.addr.port(),
        _up: up,
    }
}

impl Setup {
    fn get(&self, iface: &str, host: &str) -> CurlResult {
        curl(&[
            "--interface",
            iface,
            "-x",
            &format!("http://{}", self.gw.http),
            &format!("http://{host}:{}/", self.port),
        ])
    }

    /// Waits until requests from `iface` to `host` get `status` (the API change has reached decisions).
    fn eventually(&self, iface: &str, host: &str, status: u16) -> CurlResult {
        let start = std::time::Instant::now();
        loop {
            let r = self.get(iface, host);
            if r.status == status {
                return r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "expected {status} for {iface} -> {host}, got {r:?}\n{}",
                self.gw.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn allow_up(port: u16) -> Value {
    json!([{"name": "up", "to": [{"domain": "up.test"}], "ports": [{"port": port}]}])
}

#[test]
fn pods_and_policies_from_the_api_drive_decisions() {
    let s = setup(|api, port| {
        api.apply(NAMESPACES, namespace("shop", json!({"team": "payments"})));
        api.apply(
            PODS,
            pod(
                "shop",
                "api-1",
                &["127.0.0.1", "fd00::1"],
                json!({"app": "api"}),
                "Running",
            ),
        );
        api.apply(
            POLICIES,
            egress_policy(
                "shop",
                "api-egress",
                json!({"matchLabels": {"app": "api"}}),
                allow_up(port),
            ),
        );
    });
    let r = s.eventually("127.0.0.1", "up.test", 200);
    assert_eq!(r.json()["path"], "/");
    let ev = s.gw.events_at_least(1);
    let d = ev.iter().find(|e| e["event"] == "decision").unwrap();
    assert_eq!(d["client"]["namespace"], "shop");
    assert_eq!(d["client"]["name"], "api-1");
    assert_eq!(d["client"]["serviceAccount"], "api-1-sa");
    assert_eq!(d["decision"]["policy"], "shop/api-egress");
    // An unknown address gets the default action.
    assert_eq!(s.get("127.0.0.9", "up.test").status, 403);

    // Policy modified: the rule now allows only other.test.
    s.api.apply(
        POLICIES,
        egress_policy(
            "shop",
            "api-egress",
            json!({"matchLabels": {"app": "api"}}),
            json!([{"name": "other", "to": [{"domain": "other.test"}]}]),
        ),
    );
    s.eventually("127.0.0.1", "up.test", 403);
    assert_eq!(s.get("127.0.0.1", "other.test").status, 200);

    // Pod labels changed: no longer selected -> default deny.
    s.api.apply(
        PODS,
        pod(
            "shop",
            "api-1",
            &["127.0.0.1"],
            json!({"app": "batch"}),
            "Running",
        ),
    );
    let r = s.eventually("127.0.0.1", "other.test", 403);
    assert!(r.body.contains("default_deny"), "{r:?}");

    // A ClusterEgressPolicy selecting namespaces by label.
    s.api.apply(
        CLUSTER_POLICIES,
        cluster_policy(
            "payments",
            json!({"matchLabels": {"team": "payments"}}),
            json!([{"name": "up", "action": "Allow", "to": [{"domain": "up.test"}]}]),
        ),
    );
    s.eventually("127.0.0.1", "up.test", 200);
    // Namespace labels changed: the cluster policy stops selecting.
    s.api
        .apply(NAMESPACES, namespace("shop", json!({"team": "growth"})));
    s.eventually("127.0.0.1", "up.test", 403);
    s.api
        .apply(NAMESPACES, namespace("shop", json!({"team": "payments"})));
    s.eventually("127.0.0.1", "up.test", 200);

    // Pod deleted: the address is unknown again.
    s.api.delete(PODS, "shop", "api-1");
    let r = s.eventually("127.0.0.1", "up.test", 403);
    assert!(r.body.contains("default_deny"), "{r:?}");

    // Policy deleted.
    s.api.delete(CLUSTER_POLICIES, "", "payments");
    s.api.apply(
        PODS,
        pod(
            "shop",
            "api-2",
            &["127.0.0.1"],
            json!({"app": "api"}),
            "Running",
        ),
    );
    s.eventually("127.0.0.1", "other.test", 200);
    s.api.delete(POLICIES, "shop", "api-egress");
    s.eventually("127.0.0.1", "other.test", 403);
}

#[test]
fn a_reused_ip_belongs_to_the_live_pod_and_host_network_pods_own_no_ip() {
    let s = setup(|api, port| {
        api.apply(NAMESPACES, namespace("a", json!({})));
        api.apply(NAMESPACES, namespace("b", json!({})));
        api.apply(
            POLICIES,
            egress_policy("a", "a-up", json!({}), allow_up(port)),
        );
        // An old, finished Pod of namespace a still reports the IP.
        api.apply(
            PODS,
            pod("a", "old", &["127.0.0.1"], json!({}), "Succeeded"),
        );
        // The IP now belongs to a running Pod of namespace b (no policy: default deny).
        api.apply(PODS, pod("b", "new", &["127.0.0.1"], json!({}), "Running"));
    });
    let r = s.eventually("127.0.0.1", "up.test", 403);
    assert!(r.body.contains("default_deny"), "{r:?}");
    let d =
        s.gw.events_at_least(1)
            .into_iter()
            .rev()
            .find(|e| e["event"] == "decision")
            .unwrap();
    assert_eq!(d["client"]["name"], "new");
    // The running Pod goes away and a new Pod of namespace a gets the IP.
    s.api.delete(PODS, "b", "new");
    s.api.apply(
        PODS,
        pod("a", "newer", &["127.0.0.1"], json!({}), "Running"),
    );
    s.eventually("127.0.0.1", "up.test", 200);
    // A hostNetwork Pod reporting the node's address never owns it.
    let mut hn = pod("b", "hostnet", &["127.0.0.5"], json!({}), "Running");
    hn["spec"]["hostNetwork"] = json!(true);
    s.api.apply(PODS, hn);
    s.api.apply(
        POLICIES,
        egress_policy("b", "b-up", json!({}), allow_up(s.port)),
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = s.get("127.0.0.5", "up.test");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("default_deny"), "{r:?}");
}

#[test]
fn invalid_policies_are_skipped_whole() {
    let s = setup(|api, port| {
        api.apply(NAMESPACES, namespace("shop", json!({})));
        api.apply(
            PODS,
            pod("shop", "api", &["127.0.0.1"], json!({}), "Running"),
        );
        let mut rules = allow_up(port);
        rules
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "bad", "to": [{"domain": "a.*.b"}]}));
        api.apply(
            POLICIES,
            egress_policy("shop", "half-bad", json!({}), rules),
        );
    });
    // The valid rule of an invalid policy is not applied either.
    let r = s.eventually("127.0.0.1", "up.test", 403);
    assert!(r.body.contains("default_deny"), "{r:?}");
    wait_until(Duration::from_secs(5), || {
        s.gw.log_text().contains("spec.rules[1].to[0].domain")
    });
    // Fixed: applied.
    s.api.apply(
        POLICIES,
        egress_policy("shop", "half-bad", json!({}), allow_up(s.port)),
    );
    s.eventually("127.0.0.1", "up.test", 200);
}

#[test]
fn watch_410_gone_relists_and_api_outage_keeps_the_last_snapshot() {
    let s = setup(|api, port| {
        api.apply(NAMESPACES, namespace("shop", json!({})));
        api.apply(
            PODS,
            pod("shop", "api", &["127.0.0.1"], json!({}), "Running"),
        );
        api.apply(
            POLICIES,
            egress_policy("shop", "p", json!({}), allow_up(port)),
        );
    });
    s.eventually("127.0.0.1", "up.test", 200);
    let lists_before = s
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
        .count();
    s.api.compact(PODS);
    s.api.compact(POLICIES);
    // Changes made after the compaction arrive through the relist.
    s.api.apply(
        POLICIES,
        egress_policy(
            "shop",
            "p",
            json!({}),
            json!([{"name": "o", "to": [{"domain": "other.test"}]}]),
        ),
    );
    s.eventually("127.0.0.1", "up.test", 403);
    wait_until(Duration::from_secs(10), || {
        s.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="))
            .count()
            > lists_before
    });
    // API outage: decisions keep using the last snapshot; readiness stays true.
    s.api.set_down(true);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.get("127.0.0.1", "other.test").status, 200);
    assert_eq!(s.get("127.0.0.1", "up.test").status, 403);
    assert_eq!(s.gw.admin_get("/readyz").map(|r| r.0), Some(200));
    wait_until(Duration::from_secs(10), || {
        s.gw.log_text().contains("serving the last snapshot")
    });
    wait_until(Duration::from_secs(10), || {
        s.gw.metric("egress_kube_stale_seconds")
            .is_some_and(|v| v >= 1.0)
    });
    // Back: changes flow again and staleness returns to 0.
    s.api.set_down(false);
    s.api.apply(
        POLICIES,
        egress_policy("shop", "p", json!({}), allow_up(s.port)),
    );
    s.eventually("127.0.0.1", "up.test", 200);
    wait_until(Duration::from_secs(10), || {
        s.gw.metric("egress_kube_stale_seconds") == Some(0.0)
    });
}

#[test]
fn not_ready_while_the_api_is_unreachable_at_start() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let dead = free_port();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: x, cluster: {{server: 'http://127.0.0.1:{dead}'}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: x, user: u}}}}]\ncurrent-context: c\n"
    )).unwrap();
    let gw = Gateway::start_alive(
        &dns,
        &format!(
            "kubernetes: {{enabled: true, kubeconfig: {}}}\n",
            kc.display()
        ),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(gw.admin_get("/readyz").map(|r| r.0), Some(503));
    assert_eq!(gw.admin_get("/healthz").map(|r| r.0), Some(200));
    // Nothing is allowed meanwhile: no policy is known yet, defaultAction applies.
    let r = curl(&["-x", &format!("http://{}", gw.http), "http://up.test/"]);
    assert_eq!(r.status, 403, "{r:?}");
}
