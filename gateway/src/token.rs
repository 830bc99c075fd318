//! Kubernetes ServiceAccount tokens: a projected token's signature and claims, verified locally
//! against the issuer's JSON Web Key Set (no API call per request).
//!
//! A token is a JWS in compact form (`header.payload.signature`, base64url without padding).
//! It is accepted only when every one of these holds, in this order, and the first that fails
//! names the refusal ([`TokenError`]):
//! 1. it is at most [`MAX_TOKEN`] bytes and has three parts that decode;
//! 2. its `alg` is `RS256`, `ES256` or `ES384` (what the API server signs with for RSA and
//!    ECDSA keys): `none`, the HMAC algorithms (the public key used as a shared secret) and
//!    anything else are refused, as is a `crit` header this code does not implement;
//! 3. a key of the set has its `kid` (or, without a `kid`, some key of that algorithm) and the
//!    signature verifies under it;
//! 4. `iss` is the configured issuer, `aud` names a configured audience, `exp` has not passed
//!    and `nbf` has (both with a small leeway for clock skew);
//! 5. it carries the `kubernetes.io` claim (namespace, ServiceAccount, and for a Pod-bound token
//!    the Pod) and its `sub` is `system:serviceaccount:<namespace>:<name>`.
//!
//! Why by hand: a JWS with a fixed allowlist of three algorithms is small enough to read whole
//! and to property-test as hostile input, and it verifies with ring, the crypto the gateway
//! already uses for TLS; jsonwebtoken 10 offers only aws-lc-rs or RustCrypto's `rsa`
//! (RUSTSEC-2023-0071).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;

/// Longest token read (projected tokens are 1-2 KiB).
pub const MAX_TOKEN: usize = 16 * 1024;

/// Why a token was refused. The text goes into the audit event's detail (never the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWS in compact form, or its JSON is not what a token holds.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// An algorithm outside the allowlist (`none`, `HS256`, ...).
    #[error("algorithm {0:?} is not accepted (RS256, ES256, ES384)")]
    Algorithm(String),
    /// No key of the set has this `kid` (or none fits the algorithm).
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    Signature,
    /// `exp` has passed.
    #[error("expired")]
    Expired,
    /// `nbf` has not come yet.
    #[error("not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("issuer {0:?} is not the configured one")]
    Issuer(String),
    /// `aud` names none of the configured audiences.
    #[error("audience is none of the configured ones")]
    Audience,
    /// A valid token, but not a Kubernetes ServiceAccount token.
    #[error("not a Kubernetes ServiceAccount token: {0}")]
    NotServiceAccount(&'static str),
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// Namespace of the ServiceAccount.
    pub namespace: String,
    /// The ServiceAccount.
    pub service_account: String,
    /// The Pod a Pod-bound token names: `(name, uid)`.
    pub pod: Option<(String, String)>,
    /// `exp`, Unix seconds.
    pub expires: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
    Es384,
}

impl Alg {
    fn parse(s: &str) -> Result<Alg, TokenError> {
        match s {
            "RS256" => Ok(Alg::Rs256),
            "ES256" => Ok(Alg::Es256),
            "ES384" => Ok(Alg::Es384),
            other => Err(TokenError::Algorithm(other.chars().take(32).collect())),
        }
    }
}

/// One verification key of a JWKS.
struct Key {
    kid: Option<String>,
    alg: Alg,
    /// RSA: `(n, e)`; EC: the uncompressed point.
    public: Public,
}

enum Public {
    Rsa(signature::RsaPublicKeyComponents<Vec<u8>>),
    Ec(Vec<u8>),
}

impl Key {
    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match (&self.public, self.alg) {
            (Public::Rsa(k), Alg::Rs256) => k.verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig).is_ok(),
            (Public::Ec(p), Alg::Es256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, p).verify(message, sig).is_ok()
            }
            (Public::Ec(p), Alg::Es384) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, p).verify(message, sig).is_ok()
            }
            _ => false,
        }
    }
}

/// The verification keys of an issuer, from its JWKS document (`{"keys": [...]}`).
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_deref().unwrap_or("")).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64(s: &Option<String>) -> Result<Vec<u8>, String> {
    let s = s.as_deref().ok_or("a key member is missing")?;
    URL_SAFE_NO_PAD.decode(s).map_err(|e| format!("base64url: {e}"))
}

impl KeySet {
    /// Reads a JWKS document. Keys for encryption (`use: enc`) and of kinds no accepted
    /// algorithm uses are skipped; a set with no usable key is an error.
    pub fn from_jwks(json: &[u8]) -> Result<KeySet, String> {
        let doc: Jwks = serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for (i, k) in doc.keys.iter().enumerate() {
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let key = match (k.kty.as_str(), k.crv.as_deref()) {
                ("RSA", _) => {
                    let (n, e) = (b64(&k.n), b64(&k.e));
                    let (n, e) = (n.map_err(|m| format!("keys[{i}]: {m}"))?, e.map_err(|m| format!("keys[{i}]: {m}"))?);
                    Key {
                        kid: k.kid.clone(),
                        alg: Alg::Rs256,
                        public: Public::Rsa(signature::RsaPublicKeyComponents { n, e }),
                    }
                }
                ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                    let (x, y) = (
                        b64(&k.x).map_err(|m| format!("keys[{i}]: {m}"))?,
                        b64(&k.y).map_err(|m| format!("keys[{i}]: {m}"))?,
                    );
                    let (alg, len) = if crv == "P-256" { (Alg::Es256, 32) } else { (Alg::Es384, 48) };
                    if x.len() != len || y.len() != len {
                        return Err(format!("keys[{i}]: {crv} coordinates of the wrong length"));
                    }
                    let mut point = vec![0x04];
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    Key { kid: k.kid.clone(), alg, public: Public::Ec(point) }
                }
                _ => continue,
            };
            // A key that names its algorithm must name the one its kind implies.
            if let Some(a) = &k.alg
                && Alg::parse(a).ok() != Some(key.alg)
            {
                continue;
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no RSA, P-256 or P-384 signing key in the set".into());
        }
        Ok(KeySet { keys })
    }
}

/// What a token must say to be accepted.
pub struct Verifier {
    /// `iss`.
    pub issuer: String,
    /// `aud` must name one of them.
    pub audiences: Vec<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway: u64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: String,
    serviceaccount: Named,
    #[serde(default)]
    pod: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
    #[serde(default)]
    uid: String,
}

impl Verifier {
    /// Verifies `token` at `now` (Unix seconds) against `keys`.
    pub fn verify(&self, keys: &KeySet, token: &str, now: u64) -> Result<TokenIdentity, TokenError> {
        if token.len() > MAX_TOKEN {
            return Err(TokenError::Malformed("longer than 16 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed("not three dot-separated parts"));
        };
        let decode = |part: &str, what| URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed(what));
        let header: Header = serde_json::from_slice(&decode(h, "header is not base64url")?)
            .map_err(|_| TokenError::Malformed("header is not a JWS header"))?;
        if header.crit.is_some() {
            return Err(TokenError::Malformed("critical header extensions are not supported"));
        }
        let alg = Alg::parse(&header.alg)?;
        let sig = decode(s, "signature is not base64url")?;
        let message = &token.as_bytes()[..h.len() + 1 + p.len()];
        let mut candidates = keys.keys.iter().filter(|k| k.alg == alg).filter(|k| match &header.kid {
            Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
            None => true,
        });
        let Some(first) = candidates.next() else {
            return Err(TokenError::UnknownKey(header.kid.unwrap_or_default().chars().take(64).collect()));
        };
        if !std::iter::once(first).chain(candidates).any(|k| k.verify(message, &sig)) {
            return Err(TokenError::Signature);
        }
        // Signed by the issuer's key: now the claims.
        let claims: Claims = serde_json::from_slice(&decode(p, "payload is not base64url")?)
            .map_err(|_| TokenError::Malformed("payload is not a claims object"))?;
        let iss = claims.iss.unwrap_or_default();
        if iss != self.issuer {
            return Err(TokenError::Issuer(iss.chars().take(128).collect()));
        }
        let aud = match claims.aud {
            Some(Audience::One(a)) => vec![a],
            Some(Audience::Many(v)) => v,
            None => Vec::new(),
        };
        if !aud.iter().any(|a| self.audiences.contains(a)) {
            return Err(TokenError::Audience);
        }
        let exp = claims.exp.ok_or(TokenError::Malformed("no exp"))?;
        if now > exp.saturating_add(self.leeway) {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = claims.nbf
            && now.saturating_add(self.leeway) < nbf
        {
            return Err(TokenError::NotYetValid);
        }
        let k = claims.kubernetes.ok_or(TokenError::NotServiceAccount("no kubernetes.io claim"))?;
        let expected = format!("system:serviceaccount:{}:{}", k.namespace, k.serviceaccount.name);
        if claims.sub.as_deref() != Some(expected.as_str()) {
            return Err(TokenError::NotServiceAccount("sub does not name its ServiceAccount"));
        }
        Ok(TokenIdentity {
            namespace: k.namespace,
            service_account: k.serviceaccount.name,
            pod: k.pod.map(|p| (p.name, p.uid)),
            expires: exp,
        })
    }
}

/// Verified tokens until they expire, keyed by the SHA-256 of the token (the map never holds a
/// token): a client that presents the same token again costs a hash and a lookup instead of a
/// signature check. An entry answers only for the key set and settings it was verified with (a
/// reload re-verifies); at `capacity`, expired entries are dropped, and if none are, new tokens
/// are verified without being kept.
pub struct Cache {
    entries: dashmap::DashMap<[u8; 32], Cached>,
    capacity: usize,
}

struct Cached {
    identity: std::sync::Arc<TokenIdentity>,
    keys: std::sync::Arc<KeySet>,
    settings: (String, Vec<String>, u64),
}

impl Cache {
    /// A cache of at most `capacity` tokens.
    pub fn new(capacity: usize) -> Cache {
        Cache { entries: dashmap::DashMap::new(), capacity }
    }

    /// [`Verifier::verify`], answered from the cache when this token was verified before under
    /// the same keys and settings and has not expired since.
    pub fn verify(
        &self,
        verifier: &Verifier,
        keys: &std::sync::Arc<KeySet>,
        token: &str,
        now: u64,
    ) -> Result<std::sync::Arc<TokenIdentity>, TokenError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let key: [u8; 32] = digest.as_ref().try_into().expect("SHA-256");
        if let Some(hit) = self.entries.get(&key)
            && std::sync::Arc::ptr_eq(&hit.keys, keys)
            && hit.settings.0 == verifier.issuer
            && hit.settings.1 == verifier.audiences
            && hit.settings.2 == verifier.leeway
        {
            if now <= hit.identity.expires.saturating_add(verifier.leeway) {
                return Ok(hit.identity.clone());
            }
            drop(hit);
            self.entries.remove(&key);
            return Err(TokenError::Expired);
        }
        let identity = std::sync::Arc::new(verifier.verify(keys, token, now)?);
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, c| now <= c.identity.expires.saturating_add(c.settings.2));
        }
        if self.entries.len() < self.capacity {
            let settings = (verifier.issuer.clone(), verifier.audiences.clone(), verifier.leeway);
            self.entries.insert(key, Cached { identity: identity.clone(), keys: keys.clone(), settings });
        }
        Ok(identity)
    }

    /// Tokens held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The issuer's keys as the API server publishes them (`/openid/v1/jwks`; Kubernetes mode
/// without `jwksFile`): the set last fetched, and a line to the fetcher (`k8s::issuer_keys`)
/// to fetch again now, for a token whose `kid` no key of the set has (the cluster rotated its
/// signing key). The fetcher bounds how often that happens, whatever clients send.
pub(crate) struct ApiKeys {
    current: arc_swap::ArcSwapOption<KeySet>,
    asks: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    fetched: tokio::sync::watch::Sender<bool>,
}

/// What the fetcher receives: one sender per waiting request, answered after the fetch.
pub(crate) type KeyAsks = tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>;

/// Asks queued for the fetcher at once; beyond them a token with an unknown key is refused at once.
const WAITING_FOR_KEYS: usize = 256;

/// How long a request with a token of an unknown key waits for the keys to be fetched again.
pub(crate) const KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl ApiKeys {
    /// No keys yet, and the fetcher's end of the line.
    pub(crate) fn new() -> (std::sync::Arc<ApiKeys>, KeyAsks) {
        let (asks, rx) = tokio::sync::mpsc::channel(WAITING_FOR_KEYS);
        let keys = ApiKeys {
            current: arc_swap::ArcSwapOption::empty(),
            asks,
            fetched: tokio::sync::watch::Sender::new(false),
        };
        (std::sync::Arc::new(keys), rx)
    }

    /// The set in force, once one was fetched.
    pub(crate) fn current(&self) -> Option<std::sync::Arc<KeySet>> {
        self.current.load_full()
    }

    /// Puts a freshly fetched set in force.
    pub(crate) fn set(&self, keys: KeySet) {
        self.current.store(Some(std::sync::Arc::new(keys)));
        self.fetched.send_replace(true);
    }

    /// Waits until a first set is in force.
    pub(crate) async fn first(&self) {
        let mut rx = self.fetched.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }

    /// Asks the fetcher for a fetch now and waits (at most [`KEY_WAIT`]) until it has run or
    /// declined (it fetches at most once per interval); returns at once when too many wait.
    pub(crate) async fn refetch(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.asks.try_send(tx).is_ok() {
            let _ = tokio::time::timeout(KEY_WAIT, rx).await;
        }
    }
}

/// Test tokens: an issuer with ES256 (generated) and RS256 (openssl-made) keys.
#[cfg(test)]
pub(crate) mod testing {
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair};

    use super::*;

    pub(crate) struct Issuer {
        pub(crate) es: EcdsaKeyPair,
        pub(crate) rs: Option<RsaKeyPair>,
    }

    fn rsa_pkcs8() -> Option<Vec<u8>> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let pem = Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())?
            .stdout;
        let mut child = Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(&pem).ok()?;
        let out = child.wait_with_output().ok().filter(|o| o.status.success())?;
        Some(out.stdout)
    }

    impl Issuer {
        pub(crate) fn new() -> Issuer {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let es =
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
            // RSA keys come from openssl (ring cannot generate them), as PKCS#8 (OpenSSL 3.0's
            // genpkey writes DER in the PKCS#1 form); without openssl, ES256 only.
            let rs = rsa_pkcs8().and_then(|der| RsaKeyPair::from_pkcs8(&der).ok());
            Issuer { es, rs }
        }

        pub(crate) fn jwks(&self) -> String {
            let p = self.es.public_key().as_ref();
            let mut keys =
                vec![serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "es-1", "use": "sig", "alg": "ES256",
                "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])})];
            if let Some(rs) = &self.rs {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(rs.public());
                keys.push(serde_json::json!({"kty": "RSA", "kid": "rs-1", "alg": "RS256",
                    "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)}));
            }
            serde_json::json!({ "keys": keys }).to_string()
        }

        /// A token with this header and these claims, signed by the key its `alg` names.
        pub(crate) fn sign(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
            let msg = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let rng = SystemRandom::new();
            let sig = match header["alg"].as_str() {
                Some("RS256") => {
                    let rs = self.rs.as_ref().expect("openssl for an RSA key");
                    let mut sig = vec![0; rs.public().modulus_len()];
                    rs.sign(&signature::RSA_PKCS1_SHA256, &rng, msg.as_bytes(), &mut sig).unwrap();
                    sig
                }
                _ => self.es.sign(&rng, msg.as_bytes()).unwrap().as_ref().to_vec(),
            };
            format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig))
        }
    }

    /// The claims of a Pod-bound projected token of `shop/api` (Pod `api-1`), valid from `now`
    /// for an hour.
    pub(crate) fn claims(now: u64) -> serde_json::Value {
        serde_json::json!({
            "iss": "https://kubernetes.default.svc", "aud": ["egress.dev"], "iat": now, "nbf": now, "exp": now + 3600,
            "sub": "system:serviceaccount:shop:api",
            "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "api", "uid": "sa-uid"},
                              "pod": {"name": "api-1", "uid": "pod-uid"}, "node": {"name": "n1", "uid": "n-uid"}},
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::testing::{Issuer, claims};
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn verifier() -> Verifier {
        Verifier { issuer: "https://kubernetes.default.svc".into(), audiences: vec!["egress.dev".into()], leeway: 60 }
    }

    fn es() -> serde_json::Value {
        json!({"alg": "ES256", "kid": "es-1", "typ": "JWT"})
    }

    #[test]
    fn a_pod_bound_token_names_its_service_account_and_pod() {
        let issuer = Issuer::new();
        let keys = KeySet::from_jwks(issuer.jwks().as_bytes()).unwrap();
        let id = verifier().verify(&keys, &issuer.sign(&es(), &claims(NOW)), NOW).unwrap();
        assert_eq!(
            id,
            TokenIdentity {
                namespace: "shop".into(),
                service_account: "api".into(),
                pod: Some(("api-1".into(), "pod-uid".into())),
                expires: NOW + 3600
            }
        );
        assert!(issuer.rs.is_some(), "openssl makes the RSA key (the test command installs it)");
        let rs = json!({"alg": "RS256", "kid": "rs-1"});
        assert_eq!(verifier().verify(&keys, &issuer.sign(&rs, &claims(NOW)), NOW).unwrap().namespace, "shop");
        // An RS256 token under an EC key's kid finds no key of its algorithm.
        let wrong = issuer.sign(&json!({"alg": "RS256", "kid": "es-1"}), &claims(NOW));
        assert_eq!(verifier().verify(&keys, &wrong, NOW), Err(TokenError::UnknownKey("es-1".into())));
        // No kid: any key of the algorithm.
        assert!(verifier().verify(&keys, &issuer.sign(&json!({"alg": "ES256"}), &claims(NOW)), NOW).is_ok());
    }

    #[test]
    fn rejects_expired_and_not_yet_valid_tokens_beyond_the_leeway() {
        let issuer = Issuer::new();
        let keys = KeySet::from_jwks(issuer.jwks().as_bytes()).unwrap();
        let t = issuer.sign(&es(), &claims(NOW));
        assert_eq!(verifier().verify(&keys, &t, NOW + 3600 + 61), Err(TokenError::Expired));
        assert!(verifier().verify(&keys, &t, NOW + 3600 + 59).is_ok(), "within the leeway");
        assert_eq!(verifier().verify(&keys, &t, NOW - 61), Err(TokenError::NotYetValid));
        let mut c = claims(NOW);
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(verifier().verify(&keys, &issuer.sign(&es(), &c), NOW), Err(TokenError::Malformed("no exp")));
    }

    #[test]
    fn rejects_the_wrong_issuer_or_audience() {
        let issuer = Issuer::new();
        let keys = KeySet::from_jwks(issuer.jwks().as_bytes()).unwrap();
        let mut c = claims(NOW);
        c["iss"] = json!("https://evil.example");
        assert_eq!(
            verifier().verify(&keys, &issuer.sign(&es(), &c), NOW),
            Err(TokenError::Issuer("https://evil.example".into()))
        );
        let mut c = claims(NOW);
        c["aud"] = json!(["https://kubernetes.default.svc"]);
        assert_eq!(verifier().verify(&keys, &issuer.sign(&es(), &c), NOW), Err(TokenError::Audience));
        c["aud"] = json!("egress.dev");
        assert!(verifier().verify(&keys, &issuer.sign(&es(), &c), NOW).is_ok(), "a single audience string");
    }

    #[test]
    fn rejects_unknown_keys_none_and_hmac_with_the_public_key() {
        let issuer = Issuer::new();
        let keys = KeySet::from_jwks(issuer.jwks().as_bytes()).unwrap();
        let other = Issuer::new();
        let t = other.sign(&json!({"alg": "ES256", "kid": "es-2"}), &claims(NOW));
        assert_eq!(verifier().verify(&keys, &t, NOW), Err(TokenError::UnknownKey("es-2".into())));
        // Same kid, another issuer's key: the signature fails.
        assert_eq!(verifier().verify(&keys, &other.sign(&es(), &claims(NOW)), NOW), Err(TokenError::Signature));
        // alg none, with and without a signature.
        let body = |h: serde_json::Value| {
            format!("{}.{}.", URL_SAFE_NO_PAD.encode(h.to_string()), URL_SAFE_NO_PAD.encode(claims(NOW).to_string()))
        };
        assert_eq!(
            verifier().verify(&keys, &body(json!({"alg": "none"})), NOW),
            Err(TokenError::Algorithm("none".into()))
        );
        // HS256 keyed with the public key's bytes, the classic confusion: refused by algorithm.
        let msg = body(json!({"alg": "HS256", "kid": "es-1"}));
        let msg = msg.trim_end_matches('.');
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, issuer.jwks().as_bytes());
        let t = format!("{msg}.{}", URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, msg.as_bytes())));
        assert_eq!(verifier().verify(&keys, &t, NOW), Err(TokenError::Algorithm("HS256".into())));
        let t = issuer.sign(&json!({"alg": "ES256", "kid": "es-1", "crit": ["exp"]}), &claims(NOW));
        assert!(matches!(verifier().verify(&keys, &t, NOW), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn rejects_tampered_truncated_and_oversized_tokens() {
        let issuer = Issuer::new();
        let keys = KeySet::from_jwks(issuer.jwks().as_bytes()).unwrap();
        let t = issuer.sign(&es(), &claims(NOW));
        // Another payload under the same signature.
        let mut c = claims(NOW);
        c["kubernetes.io"]["namespace"] = json!("kube-system");
        let forged = issuer.sign(&es(), &c);
        let mixed: Vec<&str> = t.split('.').collect();
        let forged: Vec<&str> = forged.split('.').collect();
        let swapped = format!("{}.{}.{}", mixed[0], forged[1], mixed[2]);
        assert_eq!(verifier().verify(&keys, &swapped, NOW), Err(TokenError::Signature));
        assert_eq!(verifier().verify(&keys, &t[..t.len() - 2], NOW), Err(TokenError::Signature));
        assert!(matches!(verifier().verify(&keys, &t[..t.rfind('.').unwrap()], NOW), Err(TokenError::Malformed(_))));
        assert!(matches!(verifier().verify(&keys, &format!("{t}.x"), NOW), Err(TokenError::Malformed(_))));
        let long = format!("{t}{}", "A".repeat(MAX_TOKEN));
        assert_eq!(verifier().verify(&keys, &long, NOW), Err(TokenError::Malformed("longer than 16 KiB")));
    }

    #[test]
    fn rejects_signed_tokens_that_are_not_service_account_tokens() {
        let issuer = Issuer::new();
        let keys = KeySet::from_jwks(issuer.jwks().as_bytes()).unwrap();
        let mut c = claims(NOW);
        c.as_object_mut().unwrap().remove("kubernetes.io");
        assert!(matches!(
            verifier().verify(&keys, &issuer.sign(&es(), &c), NOW),
            Err(TokenError::NotServiceAccount(_))
        ));
        let mut c = claims(NOW);
        c["sub"] = json!("system:serviceaccount:kube-system:admin");
        assert!(matches!(
            verifier().verify(&keys, &issuer.sign(&es(), &c), NOW),
            Err(TokenError::NotServiceAccount(_))
        ));
    }

    #[test]
    fn rejects_key_sets_without_a_usable_key() {
        let err = |doc: &[u8]| KeySet::from_jwks(doc).expect_err("refused");
        assert!(err(b"{}").starts_with("not a JWKS document"));
        let none = "no RSA, P-256 or P-384 signing key in the set";
        assert_eq!(err(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#), none, "no shared secrets");
        assert_eq!(
            err(br#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}"#),
            "keys[0]: P-256 coordinates of the wrong length"
        );
        let issuer = Issuer::new();
        let mut doc: serde_json::Value = serde_json::from_str(&issuer.jwks()).unwrap();
        doc["keys"][0]["use"] = json!("enc");
        doc["keys"].as_array_mut().unwrap().truncate(1);
        assert_eq!(err(doc.to_string().as_bytes()), none, "an encryption key does not verify");
    }

    #[test]
    fn the_cache_answers_for_its_keys_until_expiry_and_stays_bounded() {
        let issuer = Issuer::new();
        let keys = std::sync::Arc::new(KeySet::from_jwks(issuer.jwks().as_bytes()).unwrap());
        let cache = Cache::new(2);
        let t = issuer.sign(&es(), &claims(NOW));
        let first = cache.verify(&verifier(), &keys, &t, NOW).unwrap();
        let again = cache.verify(&verifier(), &keys, &t, NOW + 10).unwrap();
        assert!(std::sync::Arc::ptr_eq(&first, &again), "answered from the cache");
        // Expired since: refused, and forgotten.
        assert_eq!(cache.verify(&verifier(), &keys, &t, NOW + 3600 + 61), Err(TokenError::Expired));
        assert_eq!(cache.len(), 0);
        // Another key set (a reload) or other settings: verified again, not taken on trust.
        cache.verify(&verifier(), &keys, &t, NOW).unwrap();
        let rotated = std::sync::Arc::new(KeySet::from_jwks(Issuer::new().jwks().as_bytes()).unwrap());
        assert_eq!(cache.verify(&verifier(), &rotated, &t, NOW), Err(TokenError::Signature));
        let strict = Verifier { audiences: vec!["other".into()], ..verifier() };
        assert_eq!(cache.verify(&strict, &keys, &t, NOW), Err(TokenError::Audience));
        // Bounded: a third live token is verified but not kept.
        for n in 1..=3 {
            let mut c = claims(NOW);
            c["iat"] = json!(NOW + n);
            cache.verify(&verifier(), &keys, &issuer.sign(&es(), &c), NOW).unwrap();
        }
        assert_eq!(cache.len(), 2);
        // Refused tokens are never kept.
        let _ = cache.verify(&verifier(), &keys, "x.y.z", NOW);
        assert_eq!(cache.len(), 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(2000)))]

        /// Hostile tokens never panic and never verify.
        #[test]
        fn never_panics_nor_verifies_hostile_tokens(
            token in "[A-Za-z0-9_.=-]{0,400}|\\PC{0,300}",
            header in prop::sample::select(vec!["", "{\"alg\":\"ES256\"}", "{\"alg\":\"none\"}", "{\"alg\":\"ES256\",\"kid\":\"es-1\"}"]),
        ) {
            let keys = KeySet::from_jwks(br#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "es-1",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#).unwrap();
            prop_assert!(verifier().verify(&keys, &token, NOW).is_err());
            let t = format!("{}.{token}", URL_SAFE_NO_PAD.encode(header));
            prop_assert!(verifier().verify(&keys, &t, NOW).is_err());
        }
    }
}
