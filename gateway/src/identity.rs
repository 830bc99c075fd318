//! Client identity: who a source address is. Standalone mode maps source CIDRs to a namespace,
//! name, service account and labels (the `clients` table); the most specific prefix wins.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use prefix_trie::PrefixMap;
use serde::Serialize;

use crate::config::ClientEntry;

/// Who a client is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// Namespace.
    pub namespace: String,
    /// Pod (or client) name.
    pub name: String,
    /// Service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Labels of the namespace, including `kubernetes.io/metadata.name`.
    #[serde(skip)]
    pub namespace_labels: BTreeMap<String, String>,
    /// Whether the identity was proved by a credential (a ServiceAccount token, a client
    /// certificate, an identity-bearing SOCKS5 user) rather than taken from the source address:
    /// only then do the Allow rules of `identity: Verified` policies apply.
    #[serde(skip)]
    pub verified: bool,
    /// Indices of the policies (in the snapshot built with this identity) that select it,
    /// computed once per snapshot so that a decision never scans the policy list.
    #[serde(skip)]
    pub selected: Arc<[usize]>,
}

impl Identity {
    /// What a policy's selectors look at.
    pub fn workload(&self) -> egress_crds::Workload<'_> {
        egress_crds::Workload {
            namespace: &self.namespace,
            namespace_labels: &self.namespace_labels,
            labels: &self.labels,
            service_account: self.service_account.as_deref(),
        }
    }
}

/// Source address -> identity, by longest prefix.
#[derive(Debug, Default)]
pub struct IdentityTable {
    v4: PrefixMap<ipnet::Ipv4Net, Arc<Identity>>,
    v6: PrefixMap<ipnet::Ipv6Net, Arc<Identity>>,
}

impl IdentityTable {
    /// Builds the table from the config's `clients` list (later rows win on equal prefixes) and
    /// the Pods of the Kubernetes index (a Pod IP beats a `clients` row); `select` gives the
    /// policies selecting each identity.
    pub fn build(
        clients: &[ClientEntry],
        pods: &[crate::inputs::PodIdentity],
        select: impl Fn(&Identity) -> Vec<usize>,
    ) -> Self {
        let mut t = IdentityTable::from_clients(clients, &select);
        for p in pods {
            let mut id = Identity {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                service_account: p.service_account.clone(),
                labels: p.labels.clone(),
                namespace_labels: p.namespace_labels.clone(),
                verified: false,
                selected: Arc::from([]),
            };
            id.selected = select(&id).into();
            let id = Arc::new(id);
            for ip in &p.ips {
                t.insert(IpNet::from(*ip), id.clone());
            }
        }
        t
    }

    fn insert(&mut self, net: IpNet, id: Arc<Identity>) {
        match net {
            IpNet::V4(n) => {
                self.v4.insert(n, id);
            }
            IpNet::V6(n) => {
                self.v6.insert(n, id);
            }
        }
    }

    /// Builds the table from the config's `clients` list (later rows win on equal prefixes);
    /// `select` gives the policies selecting each identity.
    pub fn from_clients(clients: &[ClientEntry], select: impl Fn(&Identity) -> Vec<usize>) -> Self {
        let mut t = IdentityTable::default();
        for c in clients {
            let mut id = Identity {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                service_account: c.service_account.clone(),
                labels: c.labels.clone(),
                namespace_labels: egress_crds::namespace_labels(&c.namespace, &BTreeMap::new()),
                verified: false,
                selected: Arc::from([]),
            };
            id.selected = select(&id).into();
            if let Some(cidr) = c.cidr {
                t.insert(cidr, Arc::new(id));
            }
        }
        t
    }

    /// The identity of a source address, if known.
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<Identity>> {
        match crate::target::canonical_ip(ip) {
            IpAddr::V4(a) => self.v4.get_lpm(&ipnet::Ipv4Net::from(a)).map(|(_, v)| v.clone()),
            IpAddr::V6(a) => self.v6.get_lpm(&ipnet::Ipv6Net::from(a)).map(|(_, v)| v.clone()),
        }
    }
}
