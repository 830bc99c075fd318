//! Kubernetes mode against a scripted API server (real list/watch JSON over HTTP), asserting
//! decisions made through the real proxy listener.

#![forbid(unsafe_code)]

use std::time::Duration;

use egress_e2e::kubeapi::Patch;
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
    setup_with("", populate)
}

/// [`setup`], with `extra` added to the `kubernetes` settings (`, key: value`).
fn setup_with(extra: &str, populate: impl FnOnce(&FakeApi, u16)) -> Setup {
    let dns = Dns::start(&[("up.test", "127.0.0.2"), ("other.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let api = FakeApi::start();
    populate(&api, up.addr.port());
    let kc = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kc.path(), api.kubeconfig()).unwrap();
    let (kc_file, kc_path) = kc.keep().unwrap();
    drop(kc_file);
    let body = format!(
        "guard: {{allowCidrs: [127.0.0.2/32]}}\nkubernetes: {{enabled: true, kubeconfig: {}{extra}}}\n",
        kc_path.display()
    );
    let gw = Gateway::start(&dns, &body);
    Setup { api, gw, _dns: dns, port: up.addr.port(), _up: up }
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
        api.apply(PODS, pod("shop", "api-1", &["127.0.0.1", "fd00::1"], json!({"app": "api"}), "Running"));
        api.apply(
            POLICIES,
            egress_policy("shop", "api-egress", json!({"matchLabels": {"app": "api"}}), allow_up(port)),
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
    s.api.apply(PODS, pod("shop", "api-1", &["127.0.0.1"], json!({"app": "batch"}), "Running"));
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
    s.api.apply(NAMESPACES, namespace("shop", json!({"team": "growth"})));
    s.eventually("127.0.0.1", "up.test", 403);
    s.api.apply(NAMESPACES, namespace("shop", json!({"team": "payments"})));
    s.eventually("127.0.0.1", "up.test", 200);

    // Pod deleted: the address is unknown again.
    s.api.delete(PODS, "shop", "api-1");
    let r = s.eventually("127.0.0.1", "up.test", 403);
    assert!(r.body.contains("default_deny"), "{r:?}");

    // Policy deleted.
    s.api.delete(CLUSTER_POLICIES, "", "payments");
    s.api.apply(PODS, pod("shop", "api-2", &["127.0.0.1"], json!({"app": "api"}), "Running"));
    s.eventually("127.0.0.1", "other.test", 200);
    s.api.delete(POLICIES, "shop", "api-egress");
    s.eventually("127.0.0.1", "other.test", 403);
}

/// A gateway replica: a Pod of namespace `egress` with the Deployment's labels.
/// A list longer than a page: kube-rs lists in pages of 500 (`limit`, then `continue` with the
/// token of the page before), and the Pod that comes on the last page is known as well as the first.
#[test]
fn a_list_longer_than_a_page_is_read_whole() {
    let s = setup(|api, port| {
        api.apply(NAMESPACES, namespace("shop", json!({})));
        for i in 0..1100 {
            let ip = format!("10.99.{}.{}", i / 250, i % 250 + 1);
            api.apply(PODS, pod("shop", &format!("filler-{i:04}"), &[&ip], json!({"app": "filler"}), "Running"));
        }
        // Listed after every filler: on the third page.
        api.apply(PODS, pod("shop", "zz-api-1", &["127.0.0.1"], json!({"app": "api"}), "Running"));
        api.apply(
            POLICIES,
            egress_policy("shop", "api-egress", json!({"matchLabels": {"app": "api"}}), allow_up(port)),
        );
    });
    s.eventually("127.0.0.1", "up.test", 200);
    let d = s.gw.decision(|e| e["target"]["host"] == "up.test" && e["decision"]["action"] == "allow");
    assert_eq!(d["client"]["name"], "zz-api-1", "{d}");
    let pages: Vec<String> =
        s.api.requests().into_iter().filter(|r| r.contains("/pods?") && !r.contains("watch=true")).collect();
    assert!(pages.iter().any(|r| r.contains("limit=500")), "{pages:?}");
    assert!(pages.iter().filter(|r| r.contains("continue=")).count() >= 2, "three pages: {pages:?}");
}

fn gateway_pod(name: &str, ip: &str, ready: bool) -> Value {
    let mut p = pod("egress", name, &[ip], json!({"app": "egress-gateway"}), "Running");
    p["status"]["conditions"] = json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}, {"type": "PodScheduled", "status": "True"}]);
    p
}

/// `kubernetes.rateLimitReplicas`: a policy's rate limit is shared among the gateway's Ready
/// replicas (the Pods its labels select), and follows them as they come and go. With
/// `requestsPerSecond: 1, burst: 6`, a replica lets a client through `6 / N` times at once.
#[test]
fn rate_limits_are_shared_among_the_ready_replicas() {
    let extra = ", rateLimitReplicas: {matchLabels: {app: egress-gateway}, namespace: egress}";
    let s = setup_with(extra, |api, port| {
        api.apply(NAMESPACES, namespace("shop", json!({})));
        api.apply(NAMESPACES, namespace("egress", json!({})));
        api.apply(PODS, pod("shop", "api-1", &["127.0.0.1"], json!({"app": "api"}), "Running"));
        // Two Ready replicas; one not Ready and one with other labels do not count.
        api.apply(PODS, gateway_pod("gw-a", "10.9.0.1", true));
        api.apply(PODS, gateway_pod("gw-b", "10.9.0.2", true));
        api.apply(PODS, gateway_pod("gw-c", "10.9.0.3", false));
        let mut other = gateway_pod("other", "10.9.0.4", true);
        other["metadata"]["labels"] = json!({"app": "something-else"});
        api.apply(PODS, other);
        let mut p = egress_policy("shop", "api-egress", json!({"matchLabels": {"app": "api"}}), allow_up(port));
        p["spec"]["rateLimit"] = json!({"requestsPerSecond": 1, "burst": 6});
        api.apply(POLICIES, p);
    });
    s.eventually("127.0.0.1", "other.test", 403); // synced (and no token spent)
    // Ten requests at once: the share of the burst passes, and at most one more token per
    // `N` seconds that the ten took (one every N seconds at 1 request per second shared by N).
    let allowed_of_ten = |n: u32| {
        let started = std::time::Instant::now();
        let ok = (0..10).filter(|_| s.get("127.0.0.1", "up.test").status == 200).count() as f64;
        let refill = started.elapsed().as_secs_f64() / f64::from(n);
        let share = f64::from(6 / n);
        assert!(
            ok >= share && ok <= share + refill.ceil(),
            "{ok} of 10 allowed; shared by {n} replicas: {share} at once, {refill:.2} refilled\n{}",
            s.gw.log_text()
        );
        let denied = s.gw.decision(|e| e["decision"]["reason"] == "rate_limited");
        assert_eq!(denied["decision"]["policy"], "shop/api-egress");
    };
    let replicas = |n: f64| {
        wait_for("the replicas counted", Duration::from_secs(10), || {
            s.gw.metric("egress_rate_limit_replicas") == Some(n)
        })
    };
    replicas(2.0);
    allowed_of_ten(2);
    // A third replica turns Ready: each one's share shrinks (new buckets).
    s.api.apply(PODS, gateway_pod("gw-c", "10.9.0.3", true));
    replicas(3.0);
    allowed_of_ten(3);
    // Down to one Ready replica (one not Ready, one being deleted): the whole rate.
    s.api.apply(PODS, gateway_pod("gw-b", "10.9.0.2", false));
    let mut leaving = gateway_pod("gw-c", "10.9.0.3", true);
    leaving["metadata"]["deletionTimestamp"] = json!("2026-11-28T00:00:00Z");
    s.api.apply(PODS, leaving);
    replicas(1.0);
    allowed_of_ten(1);
}

#[test]
fn a_reused_ip_belongs_to_the_live_pod_a_terminating_pod_keeps_it_and_host_network_pods_own_no_ip() {
    let s = setup(|api, port| {
        api.apply(NAMESPACES, namespace("a", json!({})));
        api.apply(NAMESPACES, namespace("b", json!({})));
        api.apply(POLICIES, egress_policy("a", "a-up", json!({}), allow_up(port)));
        // An old, finished Pod of namespace a still reports the IP.
        api.apply(PODS, pod("a", "old", &["127.0.0.1"], json!({}), "Succeeded"));
        // The IP now belongs to a running Pod of namespace b (no policy: default deny).
        api.apply(PODS, pod("b", "new", &["127.0.0.1"], json!({}), "Running"));
    });
    let r = s.eventually("127.0.0.1", "up.test", 403);
    assert!(r.body.contains("default_deny"), "{r:?}");
    let d = s.gw.events_at_least(1).into_iter().rev().find(|e| e["event"] == "decision").unwrap();
    assert_eq!(d["client"]["name"], "new");
    // The running Pod goes away and a new Pod of namespace a gets the IP.
    s.api.delete(PODS, "b", "new");
    s.api.apply(PODS, pod("a", "newer", &["127.0.0.1"], json!({}), "Running"));
    s.eventually("127.0.0.1", "up.test", 200);
    // A hostNetwork Pod reporting the node's address never owns it.
    let mut hn = pod("b", "hostnet", &["127.0.0.5"], json!({}), "Running");
    hn["spec"]["hostNetwork"] = json!(true);
    s.api.apply(PODS, hn);
    s.api.apply(POLICIES, egress_policy("b", "b-up", json!({}), allow_up(s.port)));
    // The positive control, applied after both: an ordinary Pod of namespace b is allowed by
    // that policy (so the hostNetwork Pod and the policy are known by now too).
    s.api.apply(PODS, pod("b", "ordinary", &["127.0.0.6"], json!({}), "Running"));
    s.eventually("127.0.0.6", "up.test", 200);
    let r = s.get("127.0.0.5", "up.test");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("default_deny"), "{r:?}");
    // A Pod being deleted gracefully still runs, and still owns its address, until the API
    // deletes it: its egress is decided under its own policy meanwhile.
    s.api.begin_delete(PODS, "a", "newer");
    s.api.apply(PODS, pod("a", "marker", &["127.0.0.7"], json!({}), "Running"));
    s.eventually("127.0.0.7", "up.test", 200); // the deletion, seen before the marker, is known
    let url = format!("http://up.test:{}/terminating", s.port);
    let r = curl(&["--interface", "127.0.0.1", "-x", &format!("http://{}", s.gw.http), &url]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(s.gw.decision(|e| e["target"]["http"]["path"] == "/terminating")["client"]["name"], "newer");
    // A live Pod that reports the address while the old one terminates owns it, even when it is
    // the older of the two (namespace c has no policy: default deny).
    s.api.apply(NAMESPACES, namespace("c", json!({})));
    let mut replacement = pod("c", "replacement", &["127.0.0.1"], json!({}), "Running");
    replacement["metadata"]["creationTimestamp"] = json!("2026-11-25T00:00:00Z");
    s.api.apply(PODS, replacement);
    let r = s.eventually("127.0.0.1", "up.test", 403);
    assert_eq!(s.gw.request_events(&r.request_id())[0]["client"]["name"], "replacement", "{r:?}");
    s.api.delete(PODS, "a", "newer");
}

#[test]
fn invalid_policies_are_skipped_whole() {
    let s = setup(|api, port| {
        api.apply(NAMESPACES, namespace("shop", json!({})));
        api.apply(PODS, pod("shop", "api", &["127.0.0.1"], json!({}), "Running"));
        let mut rules = allow_up(port);
        rules.as_array_mut().unwrap().push(json!({"name": "bad", "to": [{"domain": "a.*.b"}]}));
        api.apply(POLICIES, egress_policy("shop", "half-bad", json!({}), rules));
    });
    // The valid rule of an invalid policy is not applied either.
    let r = s.eventually("127.0.0.1", "up.test", 403);
    assert!(r.body.contains("default_deny"), "{r:?}");
    wait_until(Duration::from_secs(5), || s.gw.log_text().contains("spec.rules[1].to[0].domain"));
    assert_eq!(s.gw.metric("egress_kube_policies_invalid "), Some(1.0));
    // Fixed: applied.
    s.api.apply(POLICIES, egress_policy("shop", "half-bad", json!({}), allow_up(s.port)));
    s.eventually("127.0.0.1", "up.test", 200);
    assert_eq!(s.gw.metric("egress_kube_policies_invalid "), Some(0.0));
}

/// A policy object that does not decode as this version's types (what a newer CRD version may
/// store: a field this version does not know, a mode it does not have; or a port by name) is
/// skipped whole and reported in its status, namespaced or cluster-scoped, and the watch goes on: the other policies apply, and later changes too. A
/// watch of the plain type fails its whole list on that one object and retries it for ever.
#[test]
fn a_policy_that_does_not_decode_is_skipped_whole_and_reported_and_the_others_apply() {
    let dns = Dns::start(&[("up.test", "127.0.0.2"), ("other.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let port = up.addr.port();
    let api = FakeApi::start();
    api.apply(NAMESPACES, namespace("shop", json!({})));
    api.apply(PODS, pod("shop", "api", &["127.0.0.1"], json!({"app": "api"}), "Running"));
    api.apply(POLICIES, egress_policy("shop", "good", json!({}), allow_up(port)));
    let mut newer = egress_policy(
        "shop",
        "newer",
        json!({}),
        json!([{"name": "other", "to": [{"domain": "other.test"}], "ports": [{"port": "http"}]}]),
    );
    newer["spec"]["futureField"] = json!(true);
    api.apply(POLICIES, newer);
    // And a cluster-scoped one (its status is written through the cluster-wide endpoint).
    let mut cluster = cluster_policy("cluster-newer", json!({}), json!([]));
    cluster["spec"]["mode"] = json!("Shadow");
    api.apply(CLUSTER_POLICIES, cluster);
    let gw = start_gateway(&api, &dns, "gw-a", "");
    let get = |host: &str| {
        curl(&["--interface", "127.0.0.1", "-x", &format!("http://{}", gw.http), &format!("http://{host}:{port}/")])
    };
    let eventually = |host: &str, status: u16| {
        wait_for(&format!("{status} for {host}"), Duration::from_secs(10), || get(host).status == status)
    };
    eventually("up.test", 200);
    let r = get("other.test");
    assert_eq!(r.status, 403, "the undecodable policy's rule is not applied: {r:?}");
    let p = wait_patch(&api, |p| p.path.ends_with("/namespaces/shop/egresspolicies/newer/status"));
    let c = &p.body["status"]["conditions"][0];
    assert_eq!(
        (c["type"].as_str(), c["status"].as_str(), c["reason"].as_str()),
        (Some("Accepted"), Some("False"), Some("Undecodable")),
        "{c}"
    );
    let message = c["message"].as_str().unwrap();
    assert!(message.contains("spec.futureField: unknown field"), "{message}");
    assert!(message.contains("spec.rules[0].ports[0].port: invalid type"), "{message}");
    assert_eq!(p.body["status"]["observedGeneration"], 1);
    wait_until(Duration::from_secs(5), || gw.log_text().contains("shop/newer"));
    let p = wait_patch(&api, |p| p.path.ends_with("/clusteregresspolicies/cluster-newer/status"));
    let c = &p.body["status"]["conditions"][0];
    assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("False"), Some("Undecodable")), "{c}");
    assert!(c["message"].as_str().unwrap().starts_with("spec.mode: unknown variant `Shadow`"), "{c}");
    assert_eq!(p.body["kind"], "ClusterEgressPolicy");
    assert_eq!(gw.metric("egress_kube_policies_invalid "), Some(2.0), "what EgressPolicyInvalid alerts on");
    // The watch goes on.
    api.apply(
        POLICIES,
        egress_policy(
            "shop",
            "later",
            json!({}),
            json!([{"to": [{"domain": "other.test"}], "ports": [{"port": port}]}]),
        ),
    );
    eventually("other.test", 200);
    let good = wait_patch(&api, |p| p.path.ends_with("/namespaces/shop/egresspolicies/later/status"));
    assert_eq!(good.body["status"]["conditions"][0]["status"], "True");
}

#[test]
fn watch_410_gone_relists_and_api_outage_keeps_the_last_snapshot() {
    let s = setup(|api, port| {
        api.apply(NAMESPACES, namespace("shop", json!({})));
        api.apply(PODS, pod("shop", "api", &["127.0.0.1"], json!({}), "Running"));
        api.apply(POLICIES, egress_policy("shop", "p", json!({}), allow_up(port)));
    });
    s.eventually("127.0.0.1", "up.test", 200);
    let lists =
        || s.api.requests().iter().filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=")).count();
    let lists_before = lists();
    // API outage: decisions keep using the last snapshot; readiness stays true.
    s.api.set_down(true);
    wait_until(Duration::from_secs(10), || s.gw.log_text().contains("serving the last snapshot"));
    // Meanwhile the policy changes and the history the watchers would resume from is compacted.
    s.api.apply(
        POLICIES,
        egress_policy("shop", "p", json!({}), json!([{"name": "o", "to": [{"domain": "other.test"}]}])),
    );
    s.api.apply(PODS, pod("shop", "other", &["127.0.0.9"], json!({}), "Running"));
    s.api.compact(PODS);
    s.api.compact(POLICIES);
    assert_eq!(s.get("127.0.0.1", "up.test").status, 200);
    assert_eq!(s.get("127.0.0.1", "other.test").status, 403);
    assert_eq!(s.gw.admin_get("/readyz").map(|r| r.0), Some(200));
    wait_until(Duration::from_secs(10), || s.gw.metric("egress_kube_stale_seconds").is_some_and(|v| v >= 1.0));
    // Back: the watch from the old resourceVersion is 410 Gone; the watchers relist, and the
    // change made during the outage arrives through the relist.
    s.api.set_down(false);
    s.eventually("127.0.0.1", "up.test", 403);
    assert_eq!(s.get("127.0.0.1", "other.test").status, 200);
    wait_until(Duration::from_secs(10), || lists() > lists_before);
    wait_until(Duration::from_secs(10), || s.gw.metric("egress_kube_stale_seconds") == Some(0.0));
    // Changes flow again.
    s.api.apply(POLICIES, egress_policy("shop", "p", json!({}), allow_up(s.port)));
    s.eventually("127.0.0.1", "up.test", 200);
}

/// Watches end (the API server's request timeout) and resume from the last resourceVersion the
/// watcher saw, a bookmark's included, without a relist: a Pod watch that sees no event of its
/// own for a while is kept current by bookmarks, so compaction of the history it no longer needs
/// costs no relist.
#[test]
fn watches_that_time_out_resume_from_the_last_bookmark_without_a_relist() {
    let s = setup(|api, port| {
        api.set_watch_timeout(Duration::from_millis(300));
        api.apply(NAMESPACES, namespace("shop", json!({})));
        api.apply(PODS, pod("shop", "api", &["127.0.0.1"], json!({}), "Running"));
        api.apply(POLICIES, egress_policy("shop", "p", json!({}), allow_up(port)));
    });
    s.eventually("127.0.0.1", "up.test", 200);
    let watches = |kind: &str| -> Vec<u64> {
        s.api
            .requests()
            .iter()
            .filter(|r| r.starts_with(&format!("GET {kind}?")) && r.contains("watch=true"))
            .map(|r| {
                let q = r.split_once('?').unwrap().1;
                q.split('&').find_map(|kv| kv.strip_prefix("resourceVersion=")).unwrap().parse().unwrap()
            })
            .collect()
    };
    let lists = |kind: &str| {
        s.api.requests().iter().filter(|r| r.starts_with(&format!("GET {kind}?")) && !r.contains("watch=")).count()
    };
    // Policy changes (no Pod changes) across several watch timeouts.
    for i in 0..3 {
        let n = watches(PODS).len();
        let target = if i % 2 == 0 { "other.test" } else { "up.test" };
        s.api.apply(POLICIES, egress_policy("shop", "p", json!({}), json!([{"to": [{"domain": target}]}])));
        wait_until(Duration::from_secs(10), || watches(PODS).len() > n);
    }
    s.eventually("127.0.0.1", "other.test", 200);
    // The Pod watch resumed from bookmarks: it moved forward without events of its own.
    let pod_watches = watches(PODS);
    assert!(pod_watches.windows(2).all(|w| w[0] <= w[1]), "{pod_watches:?}");
    assert!(pod_watches.last() > pod_watches.first(), "bookmarks advanced the Pod watch: {pod_watches:?}");
    // Compacting the history that the watches no longer need (up to where they resumed) costs no
    // relist.
    let (pod_lists, policy_lists) = (lists(PODS), lists(POLICIES));
    let n = watches(PODS).len();
    wait_until(Duration::from_secs(10), || watches(PODS).len() > n + 1);
    let through = *watches(PODS).last().unwrap().min(watches(POLICIES).last().unwrap());
    s.api.compact_through(PODS, through);
    s.api.compact_through(POLICIES, through);
    s.api.apply(PODS, pod("shop", "api", &["127.0.0.1"], json!({"v": "2"}), "Running"));
    s.api.apply(POLICIES, egress_policy("shop", "p", json!({}), allow_up(s.port)));
    s.eventually("127.0.0.1", "up.test", 200);
    assert_eq!((lists(PODS), lists(POLICIES)), (pod_lists, policy_lists), "no relist");
}

#[test]
fn not_ready_while_the_api_is_unreachable_at_start() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    // A port held but not listened on: every connection is refused.
    let dead = HeldPort::new();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: x, cluster: {{server: 'http://127.0.0.1:{}'}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: x, user: u}}}}]\ncurrent-context: c\n",
        dead.port()
    )).unwrap();
    // The upstream's address is exempt from the guard: only the missing policies can refuse.
    let gw = Gateway::start_alive(
        &dns,
        &format!(
            "guard: {{allowCidrs: [127.0.0.2/32]}}\nkubernetes: {{enabled: true, kubeconfig: {}}}\n",
            kc.display()
        ),
    );
    // The watchers have tried the API and failed: still not ready.
    wait_for("a failed watch", Duration::from_secs(10), || gw.log_text().contains("Kubernetes watch failed"));
    assert_eq!(gw.admin_get("/readyz").map(|r| r.0), Some(503));
    assert_eq!(gw.admin_get("/healthz").map(|r| r.0), Some(200));
    // Nothing is allowed meanwhile: no policy is known yet, defaultAction applies.
    let r = curl(&["-x", &format!("http://{}", gw.http), "http://up.test/"]);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(gw.request_events(&r.request_id())[0]["decision"]["reason"], "default_deny", "{r:?}");
}

fn wait_patch(api: &FakeApi, pred: impl Fn(&Patch) -> bool) -> Patch {
    let start = std::time::Instant::now();
    loop {
        if let Some(p) = api.patches().into_iter().rev().find(|p| pred(p)) {
            return p;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no matching status patch in {:#?}", api.patches());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_gateway(api: &FakeApi, dns: &Dns, token: &str, extra: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.keep().join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig_with_token(token)).unwrap();
    Gateway::start(
        dns,
        &format!(
            "guard: {{allowCidrs: [127.0.0.2/32]}}\nkubernetes: {{enabled: true, kubeconfig: {}, leaseNamespace: egress-system{extra}}}\n",
            kc.display()
        ),
    )
}

#[test]
fn status_accepted_false_for_an_invalid_policy_and_true_once_fixed() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let api = FakeApi::start();
    api.apply(NAMESPACES, namespace("shop", json!({})));
    api.apply(PODS, pod("shop", "a", &["127.0.0.1"], json!({"app": "api"}), "Running"));
    api.apply(PODS, pod("shop", "b", &["127.0.0.3"], json!({"app": "api"}), "Running"));
    api.apply(PODS, pod("shop", "c", &["127.0.0.4"], json!({"app": "web"}), "Running"));
    let good = egress_policy(
        "shop",
        "p",
        json!({"matchLabels": {"app": "api"}}),
        json!([{"name": "ok", "to": [{"domain": "up.test"}]}]),
    );
    api.apply(POLICIES, good.clone());
    // Another field manager (someone's `kubectl edit --subresource status`) owns the status: the
    // gateway's apply conflicts with it unless forced.
    api.apply_status_as(POLICIES, "shop", "p", "kubectl-edit", json!({"observedGeneration": 1}));
    // Then the spec changes (generation 2) to an invalid rule.
    let bad = egress_policy(
        "shop",
        "p",
        json!({"matchLabels": {"app": "api"}}),
        json!([{"name": "ok", "to": [{"domain": "up.test"}]}, {"name": "bad", "to": [{"domain": "*.*.example.com"}]}]),
    );
    api.apply(POLICIES, bad);
    let _gw = start_gateway(&api, &dns, "gw-a", "");
    let p = wait_patch(&api, |p| p.path.ends_with("/namespaces/shop/egresspolicies/p/status"));
    // Written over the other manager's status (a forced apply; without force the API answers 409).
    wait_for("the status written", Duration::from_secs(10), || {
        api.object(POLICIES, "shop", "p").is_some_and(|o| o["status"]["observedGeneration"] == 2)
    });
    assert_eq!(p.content_type, "application/apply-patch+yaml", "server-side apply");
    assert!(p.query.contains("fieldManager=egress-gateway") && p.query.contains("force=true"), "{}", p.query);
    let st = &p.body["status"];
    assert_eq!(st["observedGeneration"], 2);
    let c = &st["conditions"][0];
    assert_eq!(c["type"], "Accepted");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "InvalidDomain");
    assert!(c["message"].as_str().unwrap().contains("spec.rules[1].to[0].domain"), "{c}");
    assert_eq!(p.body["kind"], "EgressPolicy");
    assert_eq!(p.body["apiVersion"], "egress.dev/v1alpha1");
    // And an Event on the policy, for `kubectl describe`.
    let rejected = |e: &Value| e["regarding"]["name"] == "p" && e["type"] == "Warning";
    wait_until(Duration::from_secs(10), || api.events().iter().any(rejected));
    let ev = api.events().into_iter().find(|e| rejected(e)).unwrap();
    assert_eq!(
        (ev["reason"].as_str(), ev["regarding"]["kind"].as_str()),
        (Some("InvalidDomain"), Some("EgressPolicy")),
        "{ev}"
    );
    assert_eq!(ev["metadata"]["namespace"], "shop");
    assert!(ev["note"].as_str().unwrap().contains("spec.rules[1].to[0].domain"), "{ev}");
    let stored = api.object(POLICIES, "shop", "p").unwrap();
    assert_eq!(stored["metadata"]["managedFields"][0]["manager"], "egress-gateway", "{stored}");
    // Fixed: generation 3.
    api.apply(POLICIES, good);
    let p = wait_patch(&api, |p| p.body["status"]["observedGeneration"] == 3);
    let st = &p.body["status"];
    assert_eq!(st["conditions"][0]["status"], "True");
    assert_eq!(st["conditions"][0]["reason"], "Valid");
    assert_eq!(st["selectedPods"], 2);
    let accepted = |e: &Value| e["regarding"]["name"] == "p" && e["type"] == "Normal" && e["reason"] == "Accepted";
    wait_until(Duration::from_secs(10), || api.events().iter().any(accepted));
    // A status that did not change is not written again. Status passes run one after another,
    // each on the policies as the watch last delivered them; a pass that ran before the echo of
    // its own write may write the same status once more. A marker policy's status, once written,
    // shows that a pass ran after that echo (the watch delivers in order): from then on, nothing
    // is written for p.
    wait_until(Duration::from_secs(10), || {
        api.object(POLICIES, "shop", "p").is_some_and(|o| o["status"]["observedGeneration"] == 3)
    });
    api.apply(POLICIES, egress_policy("shop", "marker-1", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    wait_patch(&api, |p| p.path.ends_with("/egresspolicies/marker-1/status"));
    let n = api.patches().len();
    api.apply(PODS, pod("shop", "c", &["127.0.0.4"], json!({"app": "web", "x": "y"}), "Running"));
    // A marker applied after it: once its status is written, the Pod change was seen too.
    api.apply(POLICIES, egress_policy("shop", "marker-2", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    wait_patch(&api, |p| p.path.ends_with("/egresspolicies/marker-2/status"));
    let since: Vec<String> = api.patches()[n..].iter().map(|p| p.path.clone()).collect();
    assert!(since.iter().all(|p| p.contains("/egresspolicies/marker-")), "{since:#?}");
    // A cluster policy gets its status too.
    api.apply(
        CLUSTER_POLICIES,
        cluster_policy("all", json!({}), json!([{"name": "d", "action": "Deny", "to": [{"cidr": "203.0.113.0/24"}]}])),
    );
    let p = wait_patch(&api, |p| p.path.ends_with("/clusteregresspolicies/all/status"));
    assert_eq!(p.body["status"]["selectedPods"], 3);
    assert_eq!(p.body["status"]["conditions"][0]["status"], "True");
}

#[test]
fn only_the_lease_holder_writes_status_and_another_replica_takes_over() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let api = FakeApi::start();
    api.apply(NAMESPACES, namespace("shop", json!({})));
    api.apply(POLICIES, egress_policy("shop", "p1", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    let mut a = start_gateway(&api, &dns, "gw-a", ", leaseDuration: 6s");
    wait_patch(&api, |p| p.path.ends_with("/egresspolicies/p1/status"));
    let b = start_gateway(&api, &dns, "gw-b", ", leaseDuration: 6s");
    api.apply(POLICIES, egress_policy("shop", "p2", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    wait_patch(&api, |p| p.path.ends_with("/egresspolicies/p2/status"));
    // B has seen p2 (a marker written by A after it) and has tried for the lease twice since:
    // it wrote nothing.
    api.apply(POLICIES, egress_policy("shop", "marker", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    wait_patch(&api, |p| p.path.ends_with("/egresspolicies/marker/status"));
    let lease_reads = || api.requests_by("gw-b").iter().filter(|r| r.contains("/leases/")).count();
    let n = lease_reads();
    wait_until(Duration::from_secs(30), || lease_reads() >= n + 2);
    let tokens: std::collections::BTreeSet<String> = api.patches().iter().map(|p| p.token.clone()).collect();
    assert_eq!(tokens.into_iter().collect::<Vec<_>>(), ["gw-a"], "only the leader writes");
    let holder = api.lease("egress-system", "egress-gateway-status").unwrap()["spec"]["holderIdentity"].clone();
    // The leader shuts down: it releases the lease (no holder), and the other replica takes it at
    // its next try, without waiting for the lease to expire.
    a.signal("TERM");
    assert!(a.child().wait().unwrap().success());
    let (by, released) = api.lease_writes().last().cloned().unwrap();
    assert_eq!(by, "gw-a");
    assert!(released["spec"]["holderIdentity"].is_null(), "{released}");
    assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
    api.apply(POLICIES, egress_policy("shop", "p3", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    let p = wait_patch(&api, |p| p.path.ends_with("/egresspolicies/p3/status"));
    assert_eq!(p.token, "gw-b");
    let lease = api.lease("egress-system", "egress-gateway-status").unwrap();
    assert_ne!(lease["spec"]["holderIdentity"], holder);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    drop(b);
}

/// Every request the gateway makes is allowed by deploy/rbac.yaml, and nothing more is needed.
#[test]
fn every_api_request_is_covered_by_the_rbac_manifest() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let api = FakeApi::start();
    api.apply(NAMESPACES, namespace("shop", json!({})));
    api.apply(PODS, pod("shop", "a", &["127.0.0.1"], json!({}), "Running"));
    api.apply(POLICIES, egress_policy("shop", "p", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    api.apply(
        CLUSTER_POLICIES,
        cluster_policy("c", json!({}), json!([{"action": "Deny", "to": [{"domain": "x.test"}]}])),
    );
    let _gw = start_gateway(&api, &dns, "t", ", leaseDuration: 1s");
    wait_patch(&api, |p| p.path.ends_with("/clusteregresspolicies/c/status"));
    wait_patch(&api, |p| p.path.ends_with("/egresspolicies/p/status"));
    // A lease renewal (PUT) too.
    wait_until(Duration::from_secs(10), || {
        api.requests()
            .iter()
            .any(|r| r.starts_with("PUT /apis/coordination.k8s.io/v1/namespaces/egress-system/leases/"))
    });

    let text = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap();
    let seen_verbs = egress_e2e::rbac::assert_covered(&api.requests(), &text, "deploy/rbac.yaml");
    for needed in [
        "list pods",
        "watch pods",
        "list namespaces",
        "list egresspolicies",
        "list clusteregresspolicies",
        "patch egresspolicies/status",
        "patch clusteregresspolicies/status",
        "create leases",
        "update leases",
    ] {
        assert!(seen_verbs.contains(needed), "{needed} not exercised: {seen_verbs:?}");
    }
}

/// `kubernetes.writeStatus: false`: the replica never takes the status Lease nor writes a
/// status. Shown against a replica with it on, started later on the same API: that one gets the
/// Lease and writes (had the first taken the Lease, the second could not write within the wait).
#[test]
fn write_status_false_takes_no_lease_and_writes_no_status() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let api = FakeApi::start();
    api.apply(NAMESPACES, namespace("shop", json!({})));
    api.apply(PODS, pod("shop", "a", &["127.0.0.1"], json!({}), "Running"));
    api.apply(POLICIES, egress_policy("shop", "p", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    let off = start_gateway(&api, &dns, "gw-off", ", writeStatus: false");
    let url = format!("http://up.test:{}/", up.addr.port());
    wait_until(Duration::from_secs(10), || curl(&["-x", &format!("http://{}", off.http), &url]).status == 200);
    let _on = start_gateway(&api, &dns, "gw-on", "");
    let p = wait_patch(&api, |p| p.path.ends_with("/egresspolicies/p/status"));
    assert_eq!(p.token, "gw-on");
    assert!(api.patches().iter().all(|p| p.token != "gw-off"), "{:?}", api.patches());
}

/// A permission the RBAC does not grant (here the Lease Role was left out of the install): the API
/// answers 403, the gateway says what it could not do, keeps serving API policies, and writes
/// no status. With the full deploy/rbac.yaml the same gateway writes it (the positive control).
#[test]
fn a_forbidden_lease_costs_status_writes_not_service() {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let api = FakeApi::start();
    let full = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap();
    let cluster_role_only: String =
        full.split("\n---").filter(|d| d.contains("\nkind: ClusterRole\n")).collect::<Vec<_>>().join("\n---");
    assert!(!cluster_role_only.contains("leases"), "{cluster_role_only}");
    api.set_rbac(&[&cluster_role_only]);
    api.apply(NAMESPACES, namespace("shop", json!({})));
    api.apply(PODS, pod("shop", "a", &["127.0.0.1"], json!({}), "Running"));
    api.apply(POLICIES, egress_policy("shop", "p", json!({}), json!([{"to": [{"domain": "up.test"}]}])));
    let gw = start_gateway(&api, &dns, "gw", "");
    let url = format!("http://up.test:{}/", up.addr.port());
    wait_until(Duration::from_secs(10), || curl(&["-x", &format!("http://{}", gw.http), &url]).status == 200);
    wait_for("the forbidden lease in the log", Duration::from_secs(10), || {
        let log = gw.log_text();
        log.contains("lease update failed") && log.contains("leases \"egress-gateway-status\" is forbidden")
    });
    assert!(api.forbidden().iter().all(|r| r.contains("/leases/")), "{:?}", api.forbidden());
    assert_eq!(gw.admin_get("/readyz").map(|r| r.0), Some(200));
    assert!(api.patches().is_empty(), "{:?}", api.patches());
    // Granted again: the same gateway takes the lease and writes the status.
    api.set_rbac(&[&full]);
    let p = wait_patch(&api, |p| p.path.ends_with("/egresspolicies/p/status"));
    assert_eq!(p.token, "gw");
}
