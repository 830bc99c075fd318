//! Kubernetes mode: watchers (kube-rs reflectors) for EgressPolicy, ClusterEgressPolicy,
//! Namespaces and Pods, compiled into the same snapshot the standalone mode uses and swapped whole.
//!
//! - Readiness: `/readyz` stays false until every watcher has its first full list.
//! - Outage: once ready, an unreachable API keeps the last snapshot serving; the metric
//!   `egress_kube_stale_seconds` and a warning log say for how long it has been stale.
//! - Invalid policies are skipped whole (never half-applied) and logged; so is a policy object
//!   that does not decode (policies are watched as [`Lenient`]: one such object never stops the
//!   watch of the others).

mod identity;
mod keys;
pub(crate) mod status;

pub(crate) use identity::pod_identities;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use egress_crds::{AnyPolicy, ClusterEgressPolicy, EgressPolicy, Lenient};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use tokio::sync::watch as channel;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::inputs::KubeInputs;

/// The four stores.
#[derive(Clone)]
pub(crate) struct Stores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    policies: Store<Lenient<EgressPolicy>>,
    cluster: Store<Lenient<ClusterEgressPolicy>>,
}

impl Stores {
    /// Builds the inputs of a snapshot from the current store contents.
    pub(crate) fn inputs(&self, pools: &dyn Fn(&str) -> bool, replicas: Option<&Replicas>) -> KubeInputs {
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
        let pods = self.pods.state();
        let mut out = KubeInputs {
            pods: pod_identities(&pods, &ns_labels),
            ready_replicas: replicas.map(|r| r.ready(&pods)),
            ..Default::default()
        };
        out.namespace_labels = Arc::new(ns_labels);
        fn key<K: Resource>(p: &Arc<K>) -> (Option<String>, Option<String>) {
            (p.meta().namespace.clone(), p.meta().name.clone())
        }
        let mut ns_pol = self.policies.state();
        ns_pol.sort_by_key(key);
        let mut cl_pol = self.cluster.state();
        cl_pol.sort_by_key(key);
        let all = cl_pol
            .iter()
            .map(|p| match &**p {
                Lenient::Decoded(p) => ("ClusterEgressPolicy", Ok(AnyPolicy::Cluster(p.clone()))),
                Lenient::Undecodable(u) => ("ClusterEgressPolicy", Err(u)),
            })
            .chain(ns_pol.iter().map(|p| match &**p {
                Lenient::Decoded(p) => ("EgressPolicy", Ok(AnyPolicy::Namespaced(p.clone()))),
                Lenient::Undecodable(u) => ("EgressPolicy", Err(u)),
            }));
        for (kind, p) in all {
            let p = match p {
                Ok(p) => p,
                Err(undecodable) => {
                    out.invalid.push((kind, undecodable.key(), undecodable.errors()));
                    continue;
                }
            };
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
                    message: format!("pool {pool:?} is not configured on the gateway (egressAddresses)"),
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

/// The gateway's own Pods (`kubernetes.rateLimitReplicas`).
pub(crate) struct Replicas {
    /// Their namespace.
    pub(crate) namespace: String,
    /// Labels each of them carries.
    pub(crate) labels: BTreeMap<String, String>,
}

impl Replicas {
    /// How many of `pods` are gateway replicas that serve: selected, Ready, not being deleted.
    fn ready(&self, pods: &[Arc<Pod>]) -> u32 {
        let n = pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(self.namespace.as_str()))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                let labels = p.metadata.labels.as_ref();
                self.labels.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .filter(|p| {
                let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
                conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// Health of the watchers, for staleness: one slot per watcher.
///
/// A watcher that fails is stale from its first error until it delivers an event again or, since
/// an idle watch delivers nothing, until the API answers a probe and that watcher has not failed
/// for `QUIET` seconds.
#[derive(Default)]
pub(crate) struct WatchHealth {
    /// Unix seconds since which each watcher has been failing (0: healthy).
    failing_since: [AtomicU64; 4],
    /// Unix seconds of each watcher's last error.
    last_error: [AtomicU64; 4],
}

const QUIET: u64 = 3;

impl WatchHealth {
    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn failed(&self, slot: usize) {
        let now = Self::now();
        let _ = self.failing_since[slot].compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_error[slot].store(now, Ordering::Relaxed);
    }

    fn any_failing(&self) -> bool {
        self.failing_since.iter().any(|t| t.load(Ordering::Relaxed) != 0)
    }

    /// The API answered: clear the watchers that have been quiet since.
    fn api_answered(&self) {
        let now = Self::now();
        for slot in 0..4 {
            if now.saturating_sub(self.last_error[slot].load(Ordering::Relaxed)) >= QUIET {
                self.failing_since[slot].store(0, Ordering::Relaxed);
            }
        }
    }

    fn ok(&self, slot: usize) {
        self.failing_since[slot].store(0, Ordering::Relaxed);
    }

    /// Seconds the snapshot has been possibly stale: how long the longest-failing watcher has
    /// been failing (0 when every watcher is healthy).
    pub(crate) fn stale_seconds(&self) -> u64 {
        let now = Self::now();
        self.failing_since
            .iter()
            .map(|t| match t.load(Ordering::Relaxed) {
                0 => 0,
                t => now.saturating_sub(t),
            })
            .max()
            .unwrap_or(0)
    }
}

fn watch<K>(
    api: Api<K>,
    what: &'static str,
    slot: usize,
    trim: fn(&mut K),
    tx: tokio::sync::mpsc::Sender<()>,
    health: Arc<WatchHealth>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default()).default_backoff().modify(trim).reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    health.ok(slot);
                    let _ = tx.try_send(());
                }
                Err(e) => {
                    health.failed(slot);
                    tracing::warn!(watch = what, error = %e, stale_seconds = health.stale_seconds(), "Kubernetes watch failed; serving the last snapshot");
                }
            }
        }
    });
    store
}

/// Keeps only what identity needs of a Pod (names, labels, uid, node, service account,
/// hostNetwork, phase and IPs) and its Ready condition.
fn trim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p.metadata.owner_references = None;
    if let Some(spec) = p.spec.take() {
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            host_network: spec.host_network,
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            ..Default::default()
        });
    }
    if let Some(st) = p.status.take() {
        // Of the conditions only Ready, which counts the gateway's own replicas.
        let ready = st.conditions.map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect());
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: st.phase,
            pod_ip: st.pod_ip,
            pod_ips: st.pod_ips,
            conditions: ready,
            ..Default::default()
        });
    }
}

fn trim_meta<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// What `start` needs of the process, and nothing of the pipeline.
pub(crate) struct Context {
    /// Whether an egress address pool is configured (a policy naming another is invalid). Read
    /// at every rebuild, so that a config reload is seen.
    pub pool_exists: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    /// The gateway instance id: part of the leader-election identity.
    pub instance: Arc<str>,
    /// Shutdown waits for the tasks on it (the election releases its lease there).
    pub tracker: TaskTracker,
    /// Fires when shutdown starts.
    pub draining: CancellationToken,
    /// The gateway's own Pods, counted for `kubernetes.rateLimitReplicas`.
    pub replicas: Option<Replicas>,
    /// The token issuer's keys to fetch (`identity.tokens` without `jwksFile`).
    pub token_keys: Option<TokenKeys>,
}

/// The token issuer's keys the watch fetches from the API server, and the line on which the
/// pipeline asks for an early fetch.
pub(crate) struct TokenKeys {
    /// `identity.tokens.issuer`, compared with what discovery announces.
    pub issuer: String,
    /// Where the fetched set goes.
    pub keys: Arc<crate::token::ApiKeys>,
    /// Early fetches asked for.
    pub asks: crate::token::KeyAsks,
}

/// What `start` hands back.
pub(crate) struct Watching {
    /// The inputs, replaced whole on every coalesced change; `None` until every watcher has
    /// its first full list.
    pub inputs: channel::Receiver<Option<Arc<KubeInputs>>>,
    /// Health of the watchers (`egress_kube_stale_seconds`).
    pub health: Arc<WatchHealth>,
}

/// Connects to the API (KUBECONFIG, `kubernetes.kubeconfig` or in-cluster) and starts the
/// watchers; their contents come out of the returned channel, and the elected replica writes
/// policy status.
pub(crate) async fn start(cfg: crate::config::KubernetesConfig, cx: Context) -> anyhow::Result<Watching> {
    let config = match cfg.kubeconfig.clone() {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = Client::try_from(config)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let health = Arc::new(WatchHealth::default());
    let stores = Stores {
        pods: watch(Api::<Pod>::all(client.clone()), "pods", 0, trim_pod, tx.clone(), health.clone()),
        namespaces: watch(
            Api::<Namespace>::all(client.clone()),
            "namespaces",
            1,
            trim_meta,
            tx.clone(),
            health.clone(),
        ),
        policies: watch(
            Api::<Lenient<EgressPolicy>>::all(client.clone()),
            "egresspolicies",
            2,
            trim_meta,
            tx.clone(),
            health.clone(),
        ),
        cluster: watch(
            Api::<Lenient<ClusterEgressPolicy>>::all(client.clone()),
            "clusteregresspolicies",
            3,
            trim_meta,
            tx.clone(),
            health.clone(),
        ),
    };
    let (lead_tx, mut lead_rx) = tokio::sync::mpsc::channel::<()>(1);
    let leader = if cfg.write_status {
        let ns = cfg
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let who = std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
            .unwrap_or_else(|| "egress-gateway".into());
        let identity = format!("{who}_{}", cx.instance);
        let election = status::Election::new(client.clone(), &ns, &cfg.lease_name, identity, cfg.lease_duration);
        let flag = election.flag();
        // On the connection tracker: shutdown waits for the lease to be released.
        cx.tracker.spawn(election.run(lead_tx, cx.draining.clone()));
        Some(flag)
    } else {
        None
    };
    let is_leader = move || leader.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
    let (probe_client, probe_health) = (client.clone(), health.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if probe_health.any_failing() && probe_client.apiserver_version().await.is_ok() {
                probe_health.api_answered();
            }
        }
    });
    let first_keys = cx.token_keys.as_ref().map(|t| t.keys.clone());
    if let Some(t) = cx.token_keys {
        cx.tracker.spawn(keys::follow(client.clone(), t.issuer, t.keys, t.asks, cx.draining.clone()));
    }
    let events = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: status::FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok().or_else(|| Some(cx.instance.to_string())),
        },
    );
    let (out, inputs_rx) = channel::channel(None);
    let (pool_exists, replicas) = (cx.pool_exists, cx.replicas);
    let rebuild = move |stores: &Stores, before: Option<&KubeInputs>| {
        let inputs = stores.inputs(&*pool_exists, replicas.as_ref());
        let old_invalid: Vec<&String> =
            before.map(|k| k.invalid.iter().map(|(_, key, _)| key).collect()).unwrap_or_default();
        for (kind, key, errors) in &inputs.invalid {
            if !old_invalid.contains(&key) {
                let msg: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                tracing::warn!(kind = kind, policy = %key, errors = %msg.join("; "), "invalid policy skipped whole");
            }
        }
        Arc::new(inputs)
    };
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
        // Nor before the token issuer's keys, when they come from the API.
        if let Some(k) = &first_keys {
            k.first().await;
        }
        let mut inputs = rebuild(&stores, None);
        out.send_replace(Some(inputs.clone()));
        tracing::info!("Kubernetes watchers synced; serving API policies");
        if is_leader() {
            status::write_statuses(&client, &stores, &inputs, &events).await;
        }
        loop {
            tokio::select! {
                changed = rx.recv() => {
                    if changed.is_none() {
                        return;
                    }
                    // Coalesce bursts (a relist delivers many events) into one rebuild.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while rx.try_recv().is_ok() {}
                    inputs = rebuild(&stores, Some(&inputs));
                    out.send_replace(Some(inputs.clone()));
                }
                Some(()) = lead_rx.recv() => {}
            }
            if is_leader() {
                status::write_statuses(&client, &stores, &inputs, &events).await;
            }
        }
    });
    Ok(Watching { inputs: inputs_rx, health })
}
