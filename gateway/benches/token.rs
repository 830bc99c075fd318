//! ServiceAccount token verification cost (issue 15): an uncached ES256 and RS256 signature
//! check, and a client that presents a token verified before (a cache hit: a SHA-256 of the
//! token and a map lookup). `cargo bench -p egress-gateway --bench token`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use egress_gateway::token::{Cache, KeySet, Verifier};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::json;

fn sign(header: &serde_json::Value, claims: &serde_json::Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let msg = format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let sig = sign(msg.as_bytes());
    format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// An RSA key in PKCS#8 from openssl (ring cannot generate RSA keys).
fn rsa_key() -> Option<RsaKeyPair> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let pem = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .stderr(Stdio::null())
        .output()
        .ok()?
        .stdout;
    let mut child = Command::new("openssl")
        .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(&pem).ok()?;
    RsaKeyPair::from_pkcs8(&child.wait_with_output().ok()?.stdout).ok()
}

fn bench(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"iss": "https://kubernetes.default.svc", "aud": ["egress.dev"], "nbf": now, "exp": now + 3600,
        "sub": "system:serviceaccount:shop:api",
        "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "api", "uid": "u"}, "pod": {"name": "api-1", "uid": "p"}}});
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let es = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let p = es.public_key().as_ref();
    let mut keys = vec![
        json!({"kty": "EC", "crv": "P-256", "kid": "es", "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])}),
    ];
    let es_token =
        sign(&json!({"alg": "ES256", "kid": "es"}), &claims, |m| es.sign(&rng, m).unwrap().as_ref().to_vec());
    let rs = rsa_key();
    let rs_token = rs.as_ref().map(|rs| {
        let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(rs.public());
        keys.push(
            json!({"kty": "RSA", "kid": "rs", "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)}),
        );
        sign(&json!({"alg": "RS256", "kid": "rs"}), &claims, |m| {
            let mut sig = vec![0; rs.public().modulus_len()];
            rs.sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig).unwrap();
            sig
        })
    });
    let keys = Arc::new(KeySet::from_jwks(json!({ "keys": keys }).to_string().as_bytes()).unwrap());
    let verifier =
        Verifier { issuer: "https://kubernetes.default.svc".into(), audiences: vec!["egress.dev".into()], leeway: 60 };
    c.bench_function("token/verify_es256_uncached", |b| {
        b.iter(|| verifier.verify(&keys, black_box(&es_token), now).unwrap())
    });
    if let Some(t) = &rs_token {
        c.bench_function("token/verify_rs256_uncached", |b| {
            b.iter(|| verifier.verify(&keys, black_box(t), now).unwrap())
        });
    } else {
        eprintln!("no openssl: RS256 not measured");
    }
    let cache = Cache::new(1000);
    cache.verify(&verifier, &keys, &es_token, now).unwrap();
    c.bench_function("token/cache_hit", |b| {
        b.iter(|| cache.verify(&verifier, &keys, black_box(&es_token), now).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
