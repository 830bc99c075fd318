//! Kubernetes mode: watchers (kube-rs reflectors) for EgressPolicy, ClusterEgressPolicy,
//! Namespaces and Pods, compiled into the same snapshot the standalone mode uses and swapped whole.
//!
//! - Readiness: `/readyz` stays false until every watcher has its first full list.
//! - Outage: once ready, an unreachable API keeps the last snapshot serving; the metric
//!   `egress_kube_stale_seconds` and a warning log say for how long it has been stale.
//! - Invalid policies are skipped whole (never half-applied) and logged.

mod identity;

pub use identity::{PodIdentity, pod_identities};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use egress_crds::{AnyPolicy, ClusterEgressPolicy, EgressPolicy};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::pipeline::Gateway;

/// What the API contributes to a snapshot.
#[derive(Debug, Default, Clone)]
pub struct KubeInputs {
    /// Valid policies (invalid ones are left out whole).
    pub policies: Vec<AnyPolicy>,
    /// Invalid policies: `(kind, key, errors)`.
    pub invalid: Vec<(&'static str, String, Vec<egress_crds::FieldError>)>,
    /// Pod IP -> identity.
    pub pods: Vec<PodIdentity>,
}

/// The four stores.
#[derive(Clone)]
pub struct Stores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    policies: Store<EgressPolicy>,
    cluster: Store<ClusterEgressPolicy>,
}

impl Stores {
    /// Builds the inputs of a snapshot from the current store contents.
    pub fn inputs(&self, pools: &dyn Fn(&str) -> bool) -> KubeInputs {
        let ns_labels: BTreeMap<String, BTreeMap<String, String>> = self
            .namespaces
            .state()
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.clone()?;
                let labels = n.metadata.labels.clone().unwrap_or_default();
                Some((name.clone(), egress_crds::namespace_labels(&name, &labels)))
            })
            .collect();
        let mut out = KubeInputs {
            pods: pod_identities(&self.pods.state(), &ns_labels),
            ..Default::default()
        };
        let mut ns_pol: Vec<Arc<EgressPolicy>> = self.policies.state();
        ns_pol.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
        let mut cl_pol: Vec<Arc<ClusterEgressPolicy>> = self.cluster.state();
        cl_pol.sort_by_key(|p| p.metadata.name.clone());
        let all = cl_pol
            .into_iter()
            .map(|p| ("ClusterEgressPolicy", AnyPolicy::Cluster((*p).clone())))
            .chain(
                ns_pol
                    .into_iter()
                    .map(|p| ("EgressPolicy", AnyPolicy::Namespaced((*p).clone()))),
            );
        for (kind, p) in all {
            let mut errors = p.validate();
            let pool = match &p {
                AnyPolicy::Namespaced(p) => p.spec.egress_address.clone(),
                AnyPolicy::Cluster(p) => p.spec.egress_address.clone(),
            };
            if let Some(pool) = pool
                && pool != "default"
                && !pools(&pool)
            {
                errors.push(egress_crds::FieldError {
                    path: "spec.egressAddress".into(),
                    message: format!(
                        "pool {pool:?} is not configured on the gateway (egressAddresses)"
                    ),
                    reason: "UnknownEgressAddress",
                });
            }
            if errors.is_empty() {
                out.policies.push(p);
            } else {
                out.invalid.push((kind, p.key(), errors));
            }
        }
        out
    }
}

/// Health of the watchers, for readiness and staleness.
#[derive(Default)]
pub struct WatchHealth {
    /// Unix seconds since which some watcher has been failing (0: all healthy).
    failing_since: AtomicU64,
}

impl WatchHealth {
    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn failed(&self) {
        let _ = self.failing_since.compare_exchange(
            0,
            Self::now(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn ok(&self) {
        self.failing_since.store(0, Ordering::Relaxed);
    }

    /// Seconds the snapshot has been possibly stale (0 when every watcher is healthy).
    pub fn stale_seconds(&self) -> u64 {
        match self.failing_since.load(Ordering::Relaxed) {
            0 => 0,
            t => Self::now().saturating_sub(t),
        }
    }
}

fn watch<K>(
    api: Api<K>,
    what: &'static str,
    tx: tokio::sync::mpsc::Sender<()>,
    health: Arc<WatchHealth>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    health.ok();
                    let _ = tx.try_send(());
                }
                Err(e) => {
                    health.failed();
                    tracing::warn!(watch = what, error = %e, stale_seconds = health.stale_seconds(), "Kubernetes watch failed; serving the last snapshot");
                }
            }
        }
    });
    store
}

/// Connects to the API (KUBECONFIG, `kubernetes.kubeconfig` or in-cluster), starts the
/// watchers, and keeps the gateway's snapshot in step with them.
pub async fn start(gw: Arc<Gateway>, kubeconfig: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    let client = Client::try_from(config)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let health = gw.kube_health.clone();
    let stores = Stores {
        pods: watch(
            Api::<Pod>::all(client.clone()),
            "pods",
            tx.clone(),
            health.clone(),
        ),
        namespaces: watch(
            Api::<Namespace>::all(client.clone()),
            "namespaces",
            tx.clone(),
            health.clone(),
        ),
        policies: watch(
            Api::<EgressPolicy>::all(client.clone()),
            "egresspolicies",
            tx.clone(),
            health.clone(),
        ),
        cluster: watch(
            Api::<ClusterEgressPolicy>::all(client.clone()),
            "clusteregresspolicies",
            tx.clone(),
            health.clone(),
        ),
    };
    let gw2 = gw.clone();
    tokio::spawn(async move {
        // Not ready until every watcher has its first full list.
        let ready = async {
            stores.pods.wait_until_ready().await?;
            stores.namespaces.wait_until_ready().await?;
            stores.policies.wait_until_ready().await?;
            stores.cluster.wait_until_ready().await
        };
        if ready.await.is_err() {
            tracing::error!("Kubernetes watchers stopped before their first list");
            return;
        }
        gw2.apply_kube(&stores);
        gw2.set_kube_ready();
        tracing::info!("Kubernetes watchers synced; serving API policies");
        while rx.recv().await.is_some() {
            // Coalesce bursts (a relist delivers many events) into one rebuild.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while rx.try_recv().is_ok() {}
            gw2.apply_kube(&stores);
        }
    });
    Ok(())
}
