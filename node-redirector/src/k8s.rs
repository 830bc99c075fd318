//! Kubernetes inputs: the Pods on this node (field selector `spec.nodeName`), Namespaces, both
//! policy kinds, and the EndpointSlices of the gateway's transparent Service. After loading, the
//! same code path as the standalone file.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use egress_crds::{AnyPolicy, ClusterEgressPolicy, EgressPolicy};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::config::{Config, PodEntry};
use crate::rules::Inputs;

fn reflect<K>(api: Api<K>, cfg: watcher::Config, what: &'static str, tx: tokio::sync::mpsc::Sender<()>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, cfg).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    let _ = tx.try_send(());
                }
                Err(e) => {
                    tracing::warn!(watch = what, error = %e, "Kubernetes watch failed; keeping the current table")
                }
            }
        }
    });
    store
}

/// Gateway endpoints from EndpointSlices: ready addresses, on the named port (or the first).
pub fn endpoints(slices: &[std::sync::Arc<EndpointSlice>], port_name: Option<&str>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in slices {
        let port = s
            .ports
            .iter()
            .flatten()
            .find(|p| port_name.is_none_or(|n| p.name.as_deref() == Some(n)))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        let Some(port) = port else { continue };
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            out.extend(e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()).map(|ip| SocketAddr::new(ip, port)));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Starts the watchers; the receiver gets new inputs after every (coalesced) change, and its first
/// value once every watcher has listed.
pub async fn start(cfg: &Config, node: String) -> anyhow::Result<watch::Receiver<Option<Inputs>>> {
    let k = &cfg.kubernetes;
    let config = match &k.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = Client::try_from(config)?;
    let (svc_ns, svc_name) = k
        .gateway_service
        .as_deref()
        .and_then(|s| s.split_once('/'))
        .ok_or_else(|| anyhow::anyhow!("kubernetes.gatewayService must be namespace/name"))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        "pods",
        tx.clone(),
    );
    let namespaces =
        reflect(Api::<Namespace>::all(client.clone()), watcher::Config::default(), "namespaces", tx.clone());
    let policies =
        reflect(Api::<EgressPolicy>::all(client.clone()), watcher::Config::default(), "egresspolicies", tx.clone());
    let cluster = reflect(
        Api::<ClusterEgressPolicy>::all(client.clone()),
        watcher::Config::default(),
        "clusteregresspolicies",
        tx.clone(),
    );
    let slices = reflect(
        Api::<EndpointSlice>::namespaced(client.clone(), svc_ns),
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={svc_name}")),
        "endpointslices",
        tx,
    );
    let (out_tx, out_rx) = watch::channel(None);
    let port_name = k.gateway_port_name.clone();
    tokio::spawn(async move {
        let ready = async {
            pods.wait_until_ready().await?;
            namespaces.wait_until_ready().await?;
            policies.wait_until_ready().await?;
            cluster.wait_until_ready().await?;
            slices.wait_until_ready().await
        };
        if ready.await.is_err() {
            return;
        }
        let mut changed_at = None;
        loop {
            let inputs = Inputs {
                node_name: node.clone(),
                pods: pods
                    .state()
                    .iter()
                    .filter(|p| !p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false))
                    .filter(|p| {
                        !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
                    })
                    .map(|p| PodEntry {
                        namespace: p.metadata.namespace.clone().unwrap_or_default(),
                        name: p.metadata.name.clone().unwrap_or_default(),
                        node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
                        ips: p
                            .status
                            .as_ref()
                            .and_then(|s| s.pod_ips.clone())
                            .unwrap_or_default()
                            .iter()
                            .filter_map(|i| i.ip.parse().ok())
                            .collect(),
                        labels: p.metadata.labels.clone().unwrap_or_default(),
                    })
                    .collect(),
                namespaces: namespaces
                    .state()
                    .iter()
                    .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
                    .collect::<BTreeMap<_, _>>(),
                policies: cluster
                    .state()
                    .iter()
                    .map(|p| AnyPolicy::Cluster((**p).clone()))
                    .chain(policies.state().iter().map(|p| AnyPolicy::Namespaced((**p).clone())))
                    .filter(|p| {
                        let problems = p.validate();
                        if !problems.is_empty() {
                            tracing::warn!(policy = %p.key(), "invalid policy ignored");
                        }
                        problems.is_empty()
                    })
                    .collect(),
                gateways: endpoints(&slices.state(), port_name.as_deref()),
                changed_at,
            };
            if out_tx.send(Some(inputs)).is_err() || rx.recv().await.is_none() {
                return;
            }
            changed_at = Some(std::time::Instant::now());
            tokio::time::sleep(Duration::from_millis(50)).await;
            while rx.try_recv().is_ok() {}
        }
    });
    Ok(out_rx)
}
