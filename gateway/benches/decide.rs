//! Decision cost against the size of the policy set: domain matching is a hash lookup per label
//! suffix and CIDR matching a prefix-trie lookup, so a decision should cost about the same with
//! 10 or 10 000 rules. `cargo bench -p egress-gateway --bench decide`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use egress_crds::AnyPolicy;
use egress_gateway::config::DefaultAction;
use egress_gateway::guard::Guard;
use egress_gateway::identity::Identity;
use egress_gateway::policy::{HttpFacts, Snapshot};
use egress_gateway::target::{Host, Target};

/// `n` namespaced policies in namespace `shop`, each with a domain rule, a wildcard rule and a CIDR rule.
fn policies(n: usize) -> Vec<AnyPolicy> {
    (0..n)
        .map(|i| {
            let doc = serde_json::json!({
                "apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": "shop"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": if i % 10 == 0 { "api".to_string() } else { format!("app{i}") }}},
                    "rules": [
                        {"name": "exact", "to": [{"domain": format!("svc{i}.example.com")}], "ports": [{"port": 443}]},
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
    let mut g = c.benchmark_group("decide");
    for n in [10usize, 1_000, 10_000] {
        let snap = Snapshot::compile(DefaultAction::Deny, &policies(n), None);
        id.selected = snap.selected(Some(&id)).into();
        let wild = Target { host: Host::Name("a.b.tenant0.example.net".into()), port: 443 };
        let miss = Target { host: Host::Name("www.unknown-site.example".into()), port: 443 };
        let ip = Target { host: Host::Ip("10.0.0.7".parse().unwrap()), port: 5432 };
        let http_t = Target { host: Host::Name("api0.example.org".into()), port: 80 };
        let facts = HttpFacts { method: "GET".into(), path: "/v1/charges".into() };
        g.bench_with_input(BenchmarkId::new("wildcard_allow", n), &snap, |b, s| {
            b.iter(|| s.decide(&guard, Some(&id), black_box(&wild), None))
        });
        g.bench_with_input(BenchmarkId::new("no_match_deny", n), &snap, |b, s| {
            b.iter(|| s.decide(&guard, Some(&id), black_box(&miss), None))
        });
        g.bench_with_input(BenchmarkId::new("cidr_allow", n), &snap, |b, s| {
            b.iter(|| s.decide(&guard, Some(&id), black_box(&ip), None))
        });
        g.bench_with_input(BenchmarkId::new("http_path_allow", n), &snap, |b, s| {
            b.iter(|| s.decide(&guard, Some(&id), black_box(&http_t), Some(&facts)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
