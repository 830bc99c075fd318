//! Decision cost against the size of the policy set: domain matching is a hash lookup per label
//! suffix and CIDR matching a prefix-trie lookup, so a decision should cost about the same with
//! 10 or 100 000 rules. Sizes: 10, 1 000 and 10 000 policies of four rules each, and 10 000
//! policies whose domain rule names ten domains (100 000 exact domains, 10 000 wildcards and
//! 10 000 CIDRs in all). The `compile` group is what a reload of that policy set costs.
//! `cargo bench -p egress-gateway --bench decide`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use egress_crds::AnyPolicy;
use egress_gateway::config::DefaultAction;
use egress_gateway::guard::Guard;
use egress_gateway::identity::Identity;
use egress_gateway::policy::{Action, HttpFacts, Snapshot};
use egress_gateway::target::{Host, Target};

/// `n` namespaced policies in namespace `shop`, each with a rule of `domains` exact domains, a
/// wildcard rule, a CIDR rule and an HTTP rule.
fn policies(n: usize, domains: usize) -> Vec<AnyPolicy> {
    (0..n)
        .map(|i| {
            let exact: Vec<serde_json::Value> = (0..domains)
                .map(|j| {
                    let name = if j == 0 { format!("svc{i}.example.com") } else { format!("svc{i}-{j}.example.com") };
                    serde_json::json!({"domain": name})
                })
                .collect();
            let doc = serde_json::json!({
                "apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": "shop"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": if i % 10 == 0 { "api".to_string() } else { format!("app{i}") }}},
                    "rules": [
                        {"name": "exact", "to": exact, "ports": [{"port": 443}]},
                        {"name": "wild", "to": [{"domain": format!("*.tenant{i}.example.net")}]},
                        {"name": "net", "to": [{"cidr": format!("10.{}.{}.0/24", i / 256 % 256, i % 256)}], "ports": [{"port": 5432}]},
                        {"name": "http", "to": [{"domain": format!("api{i}.example.org")}], "http": {"methods": ["GET"], "paths": ["/v1/*"]}}
                    ]
                }
            });
            AnyPolicy::from_value(doc).expect("valid")
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let guard = Guard::default();
    let mut id = Identity {
        namespace: "shop".into(),
        name: "api".into(),
        service_account: None,
        labels: BTreeMap::from([("app".to_string(), "api".to_string())]),
        namespace_labels: egress_crds::namespace_labels("shop", &BTreeMap::new()),
        verified: false,
        selected: std::sync::Arc::from([]),
    };
    let sizes = [(10usize, 1usize), (1_000, 1), (10_000, 1), (10_000, 10)];
    let mut g = c.benchmark_group("decide");
    for (n, domains) in sizes {
        let snap = Snapshot::compile(DefaultAction::Deny, &policies(n, domains), None);
        id.selected = snap.selected(Some(&id)).into();
        let size = format!("{n}p_{}domains_{n}cidrs", n * domains);
        let exact = Target { host: Host::Name(format!("svc{}-{}.example.com", n - 10, domains.max(2) - 1)), port: 443 };
        let wild = Target { host: Host::Name("a.b.tenant0.example.net".into()), port: 443 };
        let miss = Target { host: Host::Name("www.unknown-site.example".into()), port: 443 };
        let ip = Target { host: Host::Ip("10.0.0.7".parse().unwrap()), port: 5432 };
        let http_t = Target { host: Host::Name("api0.example.org".into()), port: 80 };
        let facts = HttpFacts { method: "GET".into(), path: "/v1/charges".into() };
        if domains > 1 {
            // The last selected policy's last domain (policies i % 10 == 0 select the client).
            assert_eq!(snap.decide(&guard, Some(&id), &exact, None).action, Action::Allow, "{size}: {exact:?}");
            g.bench_with_input(BenchmarkId::new("exact_allow", &size), &snap, |b, s| {
                b.iter(|| s.decide(&guard, Some(&id), black_box(&exact), None))
            });
        }
        g.bench_with_input(BenchmarkId::new("wildcard_allow", &size), &snap, |b, s| {
            b.iter(|| s.decide(&guard, Some(&id), black_box(&wild), None))
        });
        g.bench_with_input(BenchmarkId::new("no_match_deny", &size), &snap, |b, s| {
            b.iter(|| s.decide(&guard, Some(&id), black_box(&miss), None))
        });
        g.bench_with_input(BenchmarkId::new("cidr_allow", &size), &snap, |b, s| {
            b.iter(|| s.decide(&guard, Some(&id), black_box(&ip), None))
        });
        g.bench_with_input(BenchmarkId::new("http_path_allow", &size), &snap, |b, s| {
            b.iter(|| s.decide(&guard, Some(&id), black_box(&http_t), Some(&facts)))
        });
    }
    g.finish();

    // The policies selecting a client: made once per snapshot for address clients, and (since
    // issue 18) once per state and account for token clients, which paid it on every request
    // before. Every policy of the client's namespace and every cluster policy is evaluated.
    let mut g = c.benchmark_group("select");
    for n in [10usize, 1_000, 10_000] {
        let snap = Snapshot::compile(DefaultAction::Deny, &policies(n, 1), None);
        g.bench_with_input(BenchmarkId::from_parameter(format!("{n}p")), &snap, |b, s| {
            b.iter(|| s.selected(Some(black_box(&id))))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    for (n, domains) in [(1_000usize, 1usize), (10_000, 10)] {
        let set = policies(n, domains);
        g.bench_with_input(BenchmarkId::from_parameter(format!("{n}p_{}domains", n * domains)), &set, |b, set| {
            b.iter(|| Snapshot::compile(DefaultAction::Deny, black_box(set), None))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
