//! Stage 3, identify: who the client is, for selection and the audit. Runs on every normalised
//! request, before the decision.
//!
//! Without a credential (or without `identity.tokens`) the client is who its source address
//! says: a Pod IP in Kubernetes mode, a `clients` row, or unknown. With a ServiceAccount token
//! in `Proxy-Authorization` it is who the token says, once the token verifies (`token`; a token
//! verified before is answered from a bounded cache until it expires):
//! its namespace and ServiceAccount, and for a Pod-bound token in Kubernetes mode that Pod's
//! labels from the watch; in standalone mode a `clients` row with the same namespace and
//! `serviceAccount` lends its labels. It refuses a token that does not verify or whose Pod no
//! longer exists (`token_invalid`, HTTP 407, the cause in the event's detail) and, in
//! Kubernetes mode, a token of another Pod or ServiceAccount than the Pod the connection comes
//! from (`identity_mismatch`), unless `identity.allowRemote` lets clients outside the cluster
//! present one. A SOCKS5 client that authenticated as a `socks5.users` entry naming an identity
//! (`namespace`, `serviceAccount`, `labels`) is that identity (RFC 1929 caps a password at 255
//! bytes, too short for a token); an entry that names none leaves the client to its address.
//! The identity a verified credential makes, with the policies that select it, is kept for the
//! state it was made under (`State::credential_identities`): the next request of the same
//! account reuses it instead of evaluating every selector again.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Pipeline, State};
use crate::identity::Identity;
use crate::reason::Reason;
use crate::request::{Credential, EgressRequest};

/// How the client's identity was established (`client.identity_source` in the audit; the
/// order is that of `metrics::IDENTITY_SOURCES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdentitySource {
    /// The source address (a Pod IP, a `clients` row), or nothing at all.
    Address,
    /// A verified ServiceAccount token.
    Token,
    /// A `socks5.users` entry that names an identity, authenticated by its password.
    Socks5User,
    /// A verified client certificate (HTTPS front): its SPIFFE ID, or a `clients` row naming it.
    Certificate,
}

impl IdentitySource {
    /// Its index in `metrics::IDENTITY_SOURCES`.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Address => "address",
            IdentitySource::Token => "token",
            IdentitySource::Socks5User => "socks5_user",
            IdentitySource::Certificate => "certificate",
        }
    }
}

/// Labels borrowed from where an identity comes from, or made for it.
type Labels<'a> = Cow<'a, BTreeMap<String, String>>;

/// Why a client could not be identified: its credential was refused.
pub(super) struct Unidentified {
    pub(super) reason: Reason,
    pub(super) detail: String,
    /// The token names a key the issuer's set does not have (yet: a rotation may have added it).
    pub(super) unknown_key: bool,
}

impl From<(Reason, String)> for Unidentified {
    fn from((reason, detail): (Reason, String)) -> Self {
        Unidentified { reason, detail, unknown_key: false }
    }
}

/// Who a request's client is.
pub(super) struct Who {
    pub(super) identity: Option<Arc<Identity>>,
    pub(super) source: IdentitySource,
    /// The SPIFFE ID of the client certificate that established it.
    pub(super) spiffe_id: Option<Arc<str>>,
}

impl Who {
    fn new(identity: Option<Arc<Identity>>, source: IdentitySource) -> Who {
        Who { identity, source, spiffe_id: None }
    }
}

/// What a credential claims: a ServiceAccount and, for a Pod-bound token, the Pod.
struct Claim<'a> {
    /// `token` or `certificate`, for the refusal's words.
    what: &'static str,
    namespace: &'a str,
    service_account: &'a str,
    /// `(name, uid)`.
    pod: Option<&'a (String, String)>,
}

impl Pipeline {
    /// The client of `req`, or why its credential is refused.
    pub(super) fn identify(&self, state: &State, req: &EgressRequest) -> Result<Who, Unidentified> {
        let by_address = state.identities.lookup(req.conn.peer.ip());
        let token = match &req.credential {
            Some(Credential::Socks5User(name)) => {
                return Ok(match state.socks5_identities.get(&**name) {
                    Some(id) => Who::new(Some(id.clone()), IdentitySource::Socks5User),
                    None => Who::new(by_address, IdentitySource::Address),
                });
            }
            Some(Credential::Certificate(cert)) => {
                if let Some(sp) = &cert.spiffe {
                    let claim = Claim {
                        what: "certificate",
                        namespace: &sp.namespace,
                        service_account: &sp.service_account,
                        pod: None,
                    };
                    let id = self.account_identity(state, by_address.as_deref(), &claim)?;
                    return Ok(Who {
                        identity: Some(id),
                        source: IdentitySource::Certificate,
                        spiffe_id: Some(sp.id.as_str().into()),
                    });
                }
                // Another certificate: a `clients` row naming it, else the client is its address.
                return Ok(
                    match state
                        .certificate_identities
                        .iter()
                        .find(|(m, _)| m.matches(cert.common_name.as_deref(), &cert.sans))
                    {
                        Some((_, id)) => Who::new(Some(id.clone()), IdentitySource::Certificate),
                        None => Who::new(by_address, IdentitySource::Address),
                    },
                );
            }
            Some(Credential::Token(t)) => t,
            None => return Ok(Who::new(by_address, IdentitySource::Address)),
        };
        let Some((verifier, file_keys)) = &state.tokens else {
            return Ok(Who::new(by_address, IdentitySource::Address));
        };
        // The keys of `jwksFile`, else those fetched from the API server.
        let keys = file_keys.clone().or_else(|| self.api_keys.as_ref().and_then(|k| k.current())).ok_or_else(|| {
            Unidentified::from((
                Reason::TokenInvalid,
                "no issuer keys yet (they are fetched from the API server)".into(),
            ))
        })?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let t = self.token_cache.verify(verifier, &keys, token, now).map_err(|e| Unidentified {
            reason: Reason::TokenInvalid,
            detail: e.to_string(),
            unknown_key: matches!(e, crate::token::TokenError::UnknownKey(_)),
        })?;
        let claim =
            Claim { what: "token", namespace: &t.namespace, service_account: &t.service_account, pod: t.pod.as_ref() };
        Ok(Who::new(Some(self.account_identity(state, by_address.as_deref(), &claim)?), IdentitySource::Token))
    }

    /// The identity a verified credential claims, `from` being the connection's own (by its
    /// address). Kubernetes mode: the connection must come from the claimed Pod (or a Pod of the
    /// claimed ServiceAccount) unless `identity.allowRemote`, and a claimed Pod must exist; the
    /// client is then that Pod (the claimed one, or for a ServiceAccount-only credential the
    /// connection's own Pod of that account), with its labels. Standalone: a `clients` row of
    /// the same namespace and ServiceAccount lends its labels.
    fn account_identity(
        &self,
        state: &State,
        from: Option<&Identity>,
        claim: &Claim<'_>,
    ) -> Result<Arc<Identity>, Unidentified> {
        let (ns, sa) = (claim.namespace, claim.service_account);
        let c = &state.loaded.config;
        let (name, labels, namespace_labels): (&str, Labels<'_>, Labels<'_>) = if c.kubernetes.enabled {
            let same_account = from.is_some_and(|p| p.namespace == ns && p.service_account.as_deref() == Some(sa));
            let same_pod = match claim.pod {
                Some((pod, _)) => same_account && from.is_some_and(|p| p.name == *pod),
                None => same_account,
            };
            if !same_pod && !c.identity.allow_remote {
                let source = match from {
                    Some(p) => format!("Pod {}/{}", p.namespace, p.name),
                    None => "an address that is no Pod".to_string(),
                };
                let claimed = match claim.pod {
                    Some((pod, _)) => format!("Pod {ns}/{pod}"),
                    None => format!("ServiceAccount {ns}/{sa}"),
                };
                let what = claim.what;
                return Err((
                    Reason::IdentityMismatch,
                    format!("the {what} is {claimed}'s; the connection comes from {source}"),
                )
                    .into());
            }
            match claim.pod {
                Some((pod, uid)) => {
                    let p = state
                        .pods_by_name
                        .get(&(ns.to_string(), pod.clone()))
                        .filter(|p| p.uid == *uid)
                        .ok_or_else(|| {
                            Unidentified::from((Reason::TokenInvalid, format!("pod gone: {ns}/{pod} no longer exists")))
                        })?;
                    (pod, Cow::Borrowed(&p.labels), Cow::Borrowed(&p.namespace_labels))
                }
                // The connection's own Pod, of the claimed ServiceAccount: that Pod.
                None => match from.filter(|_| same_account) {
                    Some(p) => (&p.name, Cow::Borrowed(&p.labels), Cow::Borrowed(&p.namespace_labels)),
                    None => (sa, Cow::Owned(BTreeMap::new()), Cow::Owned(state.labels_of_namespace(ns))),
                },
            }
        } else {
            let row = c.clients.iter().find(|r| r.namespace == ns && r.service_account.as_deref() == Some(sa));
            let name = claim.pod.map_or(sa, |(p, _)| p.as_str());
            let labels = row.map_or_else(|| Cow::Owned(BTreeMap::new()), |r| Cow::Borrowed(&r.labels));
            (name, labels, Cow::Owned(state.labels_of_namespace(ns)))
        };
        // Made before under this state: the same identity, when every field it is made of is
        // equal (the selection depends on nothing else). Looked up by a hash of the account, so
        // a hit allocates nothing; a colliding account is made again and takes the slot.
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (ns, name, sa).hash(&mut h);
            h.finish()
        };
        if let Some(id) = state.credential_identities.get(&key)
            && id.namespace == ns
            && id.name == name
            && id.service_account.as_deref() == Some(sa)
            && id.labels == *labels
            && id.namespace_labels == *namespace_labels
        {
            return Ok(id.clone());
        }
        let mut id = Identity {
            namespace: ns.to_string(),
            name: name.to_string(),
            service_account: Some(sa.to_string()),
            labels: labels.into_owned(),
            namespace_labels: namespace_labels.into_owned(),
            verified: true,
            selected: Arc::from([]),
        };
        id.selected = state.snapshot.selected(Some(&id)).into();
        let id = Arc::new(id);
        if state.credential_identities.len() < super::state::CREDENTIAL_IDENTITIES {
            state.credential_identities.insert(key, id.clone());
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::IdentitySource::*;
    use crate::request::{ClientConn, Credential, EgressRequest, Front};
    use crate::token::testing::{Issuer, claims};

    /// A token's identity is made once per state (its selection is what costs: every policy of
    /// its namespace and every cluster policy), never shared between accounts, and made again
    /// under the next state.
    #[test]
    fn a_credential_identity_is_made_once_per_state_and_never_shared() {
        let issuer = Issuer::new();
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, issuer.jwks()).unwrap();
        let path = dir.path().join("gateway.yaml");
        std::fs::write(
            &path,
            format!(
                "audit: {{sinks: [{{type: file, path: {}}}]}}\nidentity:\n  tokens: {{issuer: \"https://kubernetes.default.svc\", jwksFile: {}}}\nclients:\n  - {{cidr: 192.0.2.1/32, namespace: shop, name: a, serviceAccount: api, labels: {{app: api}}}}\n  - {{cidr: 192.0.2.2/32, namespace: shop, name: w, serviceAccount: web, labels: {{app: web}}}}\npolicies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: api-only, namespace: shop}}\n    spec: {{podSelector: {{matchLabels: {{app: api}}}}, rules: []}}\n",
                dir.path().join("audit.jsonl").display(),
                jwks.display()
            ),
        )
        .unwrap();
        let loaded = crate::config::load_with_secrets(&path).unwrap();
        let gw = super::Pipeline::new(loaded, Arc::new(crate::metrics::Metrics::new()), None).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let header = serde_json::json!({"alg": "ES256", "kid": "es-1", "typ": "JWT"});
        let api = issuer.sign(&header, &claims(now));
        let mut web_claims = claims(now);
        web_claims["sub"] = "system:serviceaccount:shop:web".into();
        web_claims["kubernetes.io"]["serviceaccount"]["name"] = "web".into();
        web_claims["kubernetes.io"]["pod"]["name"] = "web-1".into();
        let web = issuer.sign(&header, &web_claims);
        let conn = Arc::new(ClientConn::new("c-1".into(), "127.0.0.1:4000".parse().unwrap()));
        let who = |state: &super::State, token: &str| {
            let req = EgressRequest {
                credential: Some(Credential::Token(token.into())),
                ..EgressRequest::bare(&conn, Front::Http)
            };
            let who = gw.identify(state, &req).unwrap_or_else(|e| panic!("{:?}: {}", e.reason, e.detail));
            assert_eq!(who.source, Token);
            who.identity.unwrap()
        };
        let state = gw.state();
        let (a, b, w) = (who(&state, &api), who(&state, &api), who(&state, &web));
        assert!(Arc::ptr_eq(&a, &b), "the second request of an account reuses its identity");
        assert!(!Arc::ptr_eq(&a, &w));
        assert_eq!((a.service_account.as_deref(), a.labels["app"].as_str()), (Some("api"), "api"));
        assert_eq!((w.service_account.as_deref(), w.labels["app"].as_str()), (Some("web"), "web"));
        assert_eq!((a.selected.len(), w.selected.len()), (1, 0), "selected by its own labels");
        gw.reload().unwrap();
        let next = gw.state();
        let c = who(&next, &api);
        assert!(!Arc::ptr_eq(&a, &c), "a new state makes it again");
        assert_eq!((c.name.as_str(), c.selected.len()), ("api-1", 1));
    }

    #[test]
    fn sources_are_counted_under_their_own_names() {
        for s in [Address, Token, Socks5User, Certificate] {
            assert_eq!(crate::metrics::IDENTITY_SOURCES[s.index()], s.as_str());
        }
    }
}
