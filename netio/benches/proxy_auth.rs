//! The per-connection cost of relay authentication: the relay signs one PROXY v2 header, the
//! gateway parses and verifies it (MAC, timestamp, replay window). Compare `plain_parse` (what
//! the gateway did before: parse only).
//!
//! `cargo bench -p egress-netio --bench proxy_auth`

use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use egress_netio::proxy::{self, RelayKey, ReplayGuard, Signer, Verifier};

fn bench(c: &mut Criterion) {
    let key = RelayKey::new(&[7u8; 32]).unwrap();
    let signer = Signer::new(key.clone()).unwrap();
    let verifier = Verifier::new(vec![key], Duration::from_secs(30));
    let replay = ReplayGuard::default();
    let (src, dst) = ("10.1.2.3:40000".parse().unwrap(), "93.184.216.34:443".parse().unwrap());
    let now = SystemTime::now();
    c.bench_function("sign", |b| b.iter(|| std::hint::black_box(signer.header(src, dst, now))));
    c.bench_function("parse_and_verify", |b| {
        b.iter_batched(
            || signer.header(src, dst, now),
            |h| verifier.verify(&proxy::parse(&h).unwrap(), now, &replay).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    let header = signer.header(src, dst, now);
    c.bench_function("plain_parse", |b| b.iter(|| std::hint::black_box(proxy::parse(&header).unwrap().addresses)));
}

criterion_group!(benches, bench);
criterion_main!(benches);
