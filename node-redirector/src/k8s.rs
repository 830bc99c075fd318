//! Kubernetes inputs: the Pods on this node (field selector `spec.nodeName`), Namespaces, both
//! policy kinds, and the EndpointSlices of the gateway's transparent Service. After loading, the
//! same code path as the standalone file.
//!
//! And one output: the Pod condition [`CONDITION`], written on a Pod once the table that steers it
//! is in the kernel (never before), so that a Pod listing it in `spec.readinessGates` becomes
//! ready only when its egress goes through the gateway.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use egress_crds::{AnyPolicy, ClusterEgressPolicy, EgressPolicy, Lenient};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
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

/// A Pod as the table needs it.
fn entry_of(p: &Pod) -> PodEntry {
    PodEntry {
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
        service_account: p.spec.as_ref().and_then(|s| s.service_account_name.clone()),
        interface: None,
        uid: p.metadata.uid.clone().unwrap_or_default(),
    }
}

/// A Pod the watch has not shown yet (a CNI admission's cache miss), straight from the API:
/// `Ok(None)` when it does not exist.
pub async fn get_pod(client: &Client, namespace: &str, name: &str) -> Result<Option<PodEntry>, String> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    match tokio::time::timeout(Duration::from_secs(5), api.get_opt(name)).await {
        Ok(Ok(p)) => Ok(p.as_ref().map(entry_of)),
        Ok(Err(e)) => Err(format!("GET pod {namespace}/{name}: {e}")),
        Err(_) => Err(format!("GET pod {namespace}/{name}: no answer within 5s")),
    }
}

/// A client from `kubeconfig`, or else `KUBECONFIG`, `~/.kube/config`, then in-cluster.
async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The container args of the DaemonSet's Pods while the release is being deleted.
pub fn uninstall_args(config: &str) -> Vec<String> {
    ["uninstall", "--config", config, "--wait"].iter().map(|s| s.to_string()).collect()
}

/// Takes steering off every node before the release is deleted (the chart's pre-delete hook):
/// turns the node-redirector DaemonSet's Pods into `uninstall --wait` (all nodes at once, without
/// the CNI installer), and waits until every node's Pod has run it (the rollout is complete and
/// every Pod ready: ready means uninstalled). A redirector stopped any other way leaves steering
/// in place, by design.
pub async fn uninstall_daemonset(
    kubeconfig: Option<&std::path::Path>,
    namespace: &str,
    name: &str,
    config: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let api = Api::<DaemonSet>::namespaced(client(kubeconfig).await?, namespace);
    let patch = serde_json::json!({
        "spec": {
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "100%"}},
            "template": {
                "metadata": {"annotations": {"egress.dev/uninstall": "true"}},
                "spec": {
                    "initContainers": [{"name": "install-cni", "$patch": "delete"}],
                    "containers": [{"name": "node-redirector", "args": uninstall_args(config)}]
                }
            }
        }
    });
    let patched = api.patch(name, &PatchParams::default(), &Patch::Strategic(patch)).await?;
    let generation = patched.metadata.generation.unwrap_or(0);
    tracing::info!(daemonset = %format!("{namespace}/{name}"), generation, "node-redirectors switched to uninstall");
    let deadline = Instant::now() + timeout;
    loop {
        let ds = api.get(name).await?;
        let st = ds.status.unwrap_or_default();
        let want = st.desired_number_scheduled;
        let done = st.observed_generation.unwrap_or(0) >= generation
            && st.updated_number_scheduled.unwrap_or(0) == want
            && st.number_ready == want;
        if done {
            tracing::info!(nodes = want, "steering removed from every node");
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{namespace}/{name}: steering still in place on some nodes after {timeout:?} \
                 ({} of {want} uninstalled); run `node-redirector uninstall --config FILE` on them",
                st.number_ready.min(st.updated_number_scheduled.unwrap_or(0))
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The Pod condition type the redirector reports (`status.conditions[].type`; a Pod may name it in
/// `spec.readinessGates`).
pub const CONDITION: &str = "egress.dev/redirected";

/// Tells the reporter which inputs are now in the kernel.
pub struct Reporter(watch::Sender<Option<Inputs>>);

impl Reporter {
    /// Call after the table computed from `inputs` is applied (and again now and then, which
    /// retries failed writes).
    pub fn applied(&self, inputs: &Inputs) {
        self.0.send_replace(Some(inputs.clone()));
    }
}

/// Why the condition says what it says (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Redirected,
    WaitingForAddress,
    NotSelected,
    /// Written by someone else.
    Other,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Redirected => "Redirected",
            Reason::WaitingForAddress => "WaitingForAddress",
            Reason::NotSelected => "NotSelected",
            Reason::Other => "",
        }
    }

    fn message(self, node: &str) -> String {
        match self {
            Reason::Redirected => format!("TCP egress is steered to the egress gateway on node {node}"),
            Reason::WaitingForAddress => "selected for transparent redirection; the Pod has no IP yet".to_string(),
            _ => "no EgressPolicy or ClusterEgressPolicy with redirect: Transparent selects this Pod".to_string(),
        }
    }
}

/// What the condition says, or should say, about a Pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Report {
    status: bool,
    reason: Reason,
}

/// The condition a Pod should carry, if any: `True` once steered; `False` when it is not (only on
/// Pods that wait for it in a readiness gate, or that were reported `True` before).
fn wanted(applied: &Inputs, entry: &PodEntry, pod: &Pod) -> Option<Report> {
    let gate = pod
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.condition_type == CONDITION));
    let selected = crate::rules::is_selected(applied, entry);
    if selected && !entry.ips.is_empty() {
        return Some(Report { status: true, reason: Reason::Redirected });
    }
    let shown = observed(pod).is_some_and(|r| r.status);
    let reason = if selected { Reason::WaitingForAddress } else { Reason::NotSelected };
    (gate || shown).then_some(Report { status: false, reason })
}

/// Whether `pod` (from the watch's store) has the labels and ServiceAccount `entry` (what the
/// applied table was computed from) has: what a policy selects by.
fn selects_as(pod: &Pod, entry: &PodEntry) -> bool {
    let labels = pod.metadata.labels.as_ref().map_or(entry.labels.is_empty(), |l| *l == entry.labels);
    let account = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref());
    labels && account == entry.service_account.as_deref()
}

/// The condition as the Pod carries it now.
fn observed(pod: &Pod) -> Option<Report> {
    let c = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == CONDITION)?;
    let reason = [Reason::Redirected, Reason::WaitingForAddress, Reason::NotSelected]
        .into_iter()
        .find(|r| c.reason.as_deref() == Some(r.as_str()))
        .unwrap_or(Reason::Other);
    Some(Report { status: c.status == "True", reason })
}

/// Writes [`CONDITION`] on this node's Pods after each application: only where it changes, with a
/// uid precondition (a Pod replaced under the same name is not written), failed writes retried at
/// the next round.
async fn report(client: Client, pods: Store<Pod>, mut rx: watch::Receiver<Option<Inputs>>) {
    // Recent writes by Pod uid: not repeated while the watch has not shown them yet.
    let mut written: HashMap<String, (Report, Instant)> = HashMap::new();
    const SHOWN_WITHIN: Duration = Duration::from_secs(30);
    while rx.changed().await.is_ok() {
        let Some(applied) = rx.borrow_and_update().clone() else { continue };
        for entry in applied.pods.iter().filter(|p| p.node_name == applied.node_name) {
            let Some(pod) = pods.get(&ObjectRef::new(&entry.name).within(&entry.namespace)) else { continue };
            if pod.metadata.uid.as_deref() != Some(entry.uid.as_str()) {
                continue; // replaced since: its own round comes
            }
            // The watch's store may already hold a newer version of the Pod than the table was
            // computed from (its labels changed, the inputs not yet rebuilt): judged against the
            // old table it would be written what it no longer is. Its own round comes.
            if !selects_as(&pod, entry) {
                continue;
            }
            let Some(want) = wanted(&applied, entry, &pod) else { continue };
            if observed(&pod) == Some(want) {
                written.remove(&entry.uid);
                continue;
            }
            if written.get(&entry.uid).is_some_and(|(r, at)| *r == want && at.elapsed() < SHOWN_WITHIN) {
                continue;
            }
            let patch = serde_json::json!({
                "metadata": {"uid": entry.uid},
                "status": {"conditions": [{
                    "type": CONDITION,
                    "status": if want.status { "True" } else { "False" },
                    "reason": want.reason.as_str(),
                    "message": want.reason.message(&applied.node_name),
                    "lastTransitionTime": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                }]}
            });
            let api = Api::<Pod>::namespaced(client.clone(), &entry.namespace);
            match api.patch_status(&entry.name, &PatchParams::default(), &Patch::Strategic(patch)).await {
                Ok(_) => {
                    tracing::debug!(pod = %format!("{}/{}", entry.namespace, entry.name), status = want.status, reason = want.reason.as_str(), "reported");
                    written.insert(entry.uid.clone(), (want, Instant::now()));
                }
                Err(e) => tracing::warn!(
                    pod = %format!("{}/{}", entry.namespace, entry.name),
                    error = %e,
                    "cannot write the {CONDITION} condition; retrying"
                ),
            }
        }
        written.retain(|uid, _| applied.pods.iter().any(|p| &p.uid == uid));
    }
}

/// What of a policy steers: its selectors and `redirect`, whether or not the policy is valid. The
/// gateway skips an invalid policy whole (what only it allowed is denied); were its Pods not
/// steered, their traffic would leave directly instead. A policy object that does not decode
/// steers by its selectors and `redirect` when those can be read; when not, nothing can be said
/// of what it selects. What is wrong with it comes back too, for [`Reported`].
fn steering<K: DeserializeOwned + Clone>(
    p: &Lenient<K>,
    any: fn(K) -> AnyPolicy,
) -> (Option<AnyPolicy>, Option<Problem>) {
    let selection = p.selection().map(any);
    fn joined<T: std::fmt::Display>(items: &[T]) -> String {
        items.iter().map(T::to_string).collect::<Vec<_>>().join("; ")
    }
    let problem = match (p, &selection) {
        (Lenient::Decoded(_), Some(sel)) => {
            let errors = sel.validate();
            (!errors.is_empty()).then(|| Problem { key: sel.key(), text: joined(&errors), kind: ProblemKind::Invalid })
        }
        (Lenient::Undecodable(u), sel) => Some(Problem {
            key: u.key(),
            text: joined(&u.problems),
            kind: if sel.is_some() { ProblemKind::Undecodable } else { ProblemKind::Unreadable },
        }),
        // A decoded policy always has its selection.
        (Lenient::Decoded(_), None) => None,
    };
    (selection, problem)
}

/// A policy [`steering`] found something wrong with.
struct Problem {
    key: String,
    text: String,
    kind: ProblemKind,
}

enum ProblemKind {
    /// Decodes, but does not validate.
    Invalid,
    /// Does not decode; its selectors do.
    Undecodable,
    /// Not even its selectors decode.
    Unreadable,
}

/// The problems logged so far: each policy's is logged when it appears or changes, not at every
/// rebuild of the inputs.
#[derive(Default)]
struct Reported(HashMap<String, String>);

impl Reported {
    /// Logs what is new in `problems` and keeps exactly those (a policy fixed and broken again is
    /// logged again).
    fn update(&mut self, problems: Vec<Problem>) {
        let mut now = HashMap::with_capacity(problems.len());
        for p in problems {
            if self.0.get(&p.key) != Some(&p.text) {
                match p.kind {
                    ProblemKind::Invalid => {
                        tracing::warn!(policy = %p.key, problems = %p.text, "invalid policy: its Pods are steered all the same, and the gateway skips it")
                    }
                    ProblemKind::Undecodable => {
                        tracing::warn!(policy = %p.key, problems = %p.text, "policy does not decode: its Pods are steered by its selectors, and the gateway skips it")
                    }
                    ProblemKind::Unreadable => {
                        tracing::error!(policy = %p.key, problems = %p.text, "policy does not decode, not even its selectors: the Pods it means to steer cannot be known")
                    }
                }
            }
            now.insert(p.key, p.text);
        }
        self.0 = now;
    }
}

/// Starts the watchers; the receiver gets new inputs after every (coalesced) change, and its first
/// value once every watcher has listed. The [`Reporter`] writes the Pod condition.
pub async fn start(cfg: &Config, node: String) -> anyhow::Result<(watch::Receiver<Option<Inputs>>, Reporter, Client)> {
    let k = &cfg.kubernetes;
    let client = client(k.kubeconfig.as_deref()).await?;
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
    // Lenient: one policy object that does not decode must not stop the watch of the others.
    let policies = reflect(
        Api::<Lenient<EgressPolicy>>::all(client.clone()),
        watcher::Config::default(),
        "egresspolicies",
        tx.clone(),
    );
    let cluster = reflect(
        Api::<Lenient<ClusterEgressPolicy>>::all(client.clone()),
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
    let (applied_tx, applied_rx) = watch::channel(None);
    tokio::spawn(report(client.clone(), pods.clone(), applied_rx));
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
        let mut reported = Reported::default();
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
                    .map(|p| entry_of(p))
                    .collect(),
                namespaces: namespaces
                    .state()
                    .iter()
                    .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
                    .collect::<BTreeMap<_, _>>(),
                policies: {
                    let (cluster, policies) = (cluster.state(), policies.state());
                    let (steer, problems): (Vec<_>, Vec<_>) = cluster
                        .iter()
                        .map(|p| steering(p, AnyPolicy::Cluster))
                        .chain(policies.iter().map(|p| steering(p, AnyPolicy::Namespaced)))
                        .unzip();
                    reported.update(problems.into_iter().flatten().collect());
                    steer.into_iter().flatten().collect()
                },
                gateways: endpoints(&slices.state(), port_name.as_deref()),
                interfaces: Default::default(),
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
    Ok((out_rx, Reporter(applied_tx), client))
}
