//! The state in force: everything derived from one config load (and, in Kubernetes mode, one
//! change of the API's policies and Pods), compiled once and swapped whole, so that a request
//! sees one consistent snapshot from its first stage to its last.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{self, Loaded};
use crate::dial::Pools;
use crate::guard::Guard;
use crate::identity::{Identity, IdentityTable};
use crate::inputs::{KubeInputs, PodIdentity};
use crate::policy::Snapshot;
use crate::token;

/// Everything derived from one config load, swapped whole.
pub(crate) struct State {
    /// The config and its policies.
    pub loaded: Loaded,
    /// Compiled policies.
    pub snapshot: Snapshot,
    /// Client identities.
    pub identities: IdentityTable,
    /// The guard.
    pub guard: Guard,
    /// Source-address pools.
    pub pools: Pools,
    /// Checks the relays' PROXY header MACs (`transparent.relayKeyFile`, `relayMaxSkew`).
    pub relay_auth: egress_netio::proxy::Verifier,
    /// Verifies ServiceAccount tokens (`identity.tokens`), with the keys of `jwksFile` (none:
    /// the keys come from the API server, `Pipeline::api_keys`).
    pub tokens: Option<(token::Verifier, Option<Arc<token::KeySet>>)>,
    /// The API's Pods by `(namespace, name)`, for Pod-bound tokens (only with `identity.tokens`).
    pub pods_by_name: HashMap<(String, String), PodIdentity>,
    /// The API's Namespace labels (Kubernetes mode), for clients identified by a token or a
    /// SOCKS5 user rather than by a Pod.
    pub namespace_labels: Arc<std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>>,
    /// The identities `socks5.users` entries name, by user name, compiled with this snapshot.
    pub socks5_identities: HashMap<String, Arc<Identity>>,
    /// `socks5.users`, shared by the connections the SOCKS5 front serves with this state.
    pub socks5_users: Arc<[config::Socks5User]>,
    /// The `clients` rows that name a client certificate, in order, compiled with this snapshot.
    pub certificate_identities: Vec<(config::CertificateMatch, Arc<Identity>)>,
    /// Identities that verified credentials (tokens, SPIFFE certificates) made under this state,
    /// by a hash of `(namespace, name, serviceAccount)` (a hit is checked field by field): the
    /// policies that select one are found once per state, not per request (see
    /// `Pipeline::account_identity`). At most [`CREDENTIAL_IDENTITIES`] entries; past that,
    /// identities are computed per request.
    pub credential_identities: dashmap::DashMap<u64, Arc<Identity>>,
}

/// The bound of [`State::credential_identities`].
pub(crate) const CREDENTIAL_IDENTITIES: usize = 10_000;

impl State {
    /// The labels of namespace `ns`: the API's, or (unknown namespace, standalone mode) only
    /// `kubernetes.io/metadata.name`.
    pub(crate) fn labels_of_namespace(&self, ns: &str) -> std::collections::BTreeMap<String, String> {
        labels_of_namespace(&self.namespace_labels, ns)
    }
}

impl State {
    /// Compiles a loaded config and, in Kubernetes mode, the API's policies and Pods.
    /// `previous` lends its rate-limit buckets to unchanged policies.
    pub(crate) fn build(loaded: Loaded, kube: Option<&KubeInputs>, previous: Option<&State>, own: &[IpAddr]) -> State {
        let c = &loaded.config;
        let mut policies: Vec<_> = loaded.policies.iter().map(|(_, p)| p.clone()).collect();
        if let Some(k) = kube {
            policies.extend(k.policies.iter().cloned());
        }
        // `kubernetes.rateLimitReplicas`: every rate limit shared among the Ready replicas.
        let replicas = kube.and_then(|k| k.ready_replicas).unwrap_or(1).max(1);
        let snapshot = Snapshot::compile_shared(c.default_action, &policies, previous.map(|p| &p.snapshot), replicas);
        let pods = kube.map(|k| k.pods.as_slice()).unwrap_or(&[]);
        let namespace_labels = kube.map(|k| k.namespace_labels.clone()).unwrap_or_default();
        // A `socks5.users` entry naming `namespace` and `serviceAccount` is that identity.
        let socks5_identities = c
            .socks5
            .users
            .iter()
            .filter_map(|u| {
                let (ns, sa) = (u.namespace.clone()?, u.service_account.clone()?);
                let mut id = Identity {
                    namespace_labels: labels_of_namespace(&namespace_labels, &ns),
                    namespace: ns,
                    name: u.username.clone(),
                    service_account: Some(sa),
                    labels: u.labels.clone(),
                    verified: true,
                    selected: Arc::from([]),
                };
                id.selected = snapshot.selected(Some(&id)).into();
                Some((u.username.clone(), Arc::new(id)))
            })
            .collect();
        let certificate_identities = c
            .clients
            .iter()
            .filter_map(|r| {
                let m = r.certificate.clone()?;
                let mut id = Identity {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    service_account: r.service_account.clone(),
                    labels: r.labels.clone(),
                    namespace_labels: labels_of_namespace(&namespace_labels, &r.namespace),
                    verified: true,
                    selected: Arc::from([]),
                };
                id.selected = snapshot.selected(Some(&id)).into();
                Some((m, Arc::new(id)))
            })
            .collect();
        State {
            socks5_users: c.socks5.users.clone().into(),
            certificate_identities,
            identities: IdentityTable::build(&c.clients, pods, |id| snapshot.selected(Some(id))),
            snapshot,
            guard: Guard::new(c.guard.allow_cidrs.clone(), own.to_vec()),
            pools: Pools::new(&c.egress_addresses),
            relay_auth: egress_netio::proxy::Verifier::new(loaded.relay_keys.clone(), c.transparent.relay_max_skew),
            tokens: c.identity.tokens.as_ref().map(|t| {
                let verifier = token::Verifier {
                    issuer: t.issuer.clone(),
                    audiences: t.audiences.clone(),
                    leeway: t.leeway.as_secs(),
                };
                (verifier, loaded.token_keys.clone())
            }),
            namespace_labels,
            socks5_identities,
            credential_identities: dashmap::DashMap::new(),
            pods_by_name: if c.identity.tokens.is_some() {
                pods.iter().map(|p| ((p.namespace.clone(), p.name.clone()), p.clone())).collect()
            } else {
                HashMap::new()
            },
            loaded,
        }
    }
}

fn labels_of_namespace(
    all: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    ns: &str,
) -> std::collections::BTreeMap<String, String> {
    all.get(ns).cloned().unwrap_or_else(|| egress_crds::namespace_labels(ns, &std::collections::BTreeMap::new()))
}

/// The gateway's own addresses (every interface, and the listeners'), blocked by the guard.
pub(crate) fn own_addresses(listen: &config::Listen) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> =
        if_addrs::get_if_addrs().map(|l| l.into_iter().map(|i| i.ip()).collect()).unwrap_or_default();
    for sa in [listen.http, listen.https, listen.socks5, listen.admin, listen.transparent].into_iter().flatten() {
        if !sa.ip().is_unspecified() {
            v.push(sa.ip());
        }
    }
    v.sort();
    v.dedup();
    v
}
