//! Policy status, written by one replica at a time.
//!
//! Leader election is a small Lease lock (no maintained crate fitted kube 5 at the time): every
//! `leaseDuration / 3` the replica reads the `coordination.k8s.io/v1` Lease; it creates it when
//! absent, renews it when it holds it, and takes it over when the holder has not renewed for
//! `leaseDuration`. Every write carries the `resourceVersion` it read, so two replicas racing for
//! an expired lease cannot both win (the API answers 409 to the loser). A leader that shuts down
//! releases the lease (no holder, a duration of one second, as client-go's `ReleaseOnCancel`
//! does), so another replica takes over at its next try instead of after `leaseDuration`.
//!
//! The leader writes each policy's status with server-side apply (field manager
//! `egress-gateway`): `observedGeneration`, an `Accepted` condition (`True`/`Valid`, or `False`
//! with the reason of the first problem and every problem in the message) and `selectedPods`.
//! Unchanged statuses are not written again. When a policy's `Accepted` condition changes, the
//! leader also records a Kubernetes Event on it (`events.k8s.io/v1`; cluster-scoped policies'
//! land in `default`): `Normal Accepted` or `Warning <reason>` with the problems, so that
//! `kubectl describe` says why a policy is not applied.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use egress_crds::{AnyPolicy, ClusterEgressPolicy, Condition, EgressPolicy, FieldError, Lenient, PolicyStatus};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};

use super::Stores;
use crate::inputs::KubeInputs;

/// Field manager of every status write.
pub(crate) const FIELD_MANAGER: &str = "egress-gateway";

/// Lease-based leader election.
pub(crate) struct Election {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    leader: Arc<AtomicBool>,
}

impl Election {
    /// An election on Lease `namespace/name` as `identity`.
    pub(crate) fn new(client: Client, namespace: &str, name: &str, identity: String, duration: Duration) -> Self {
        Election {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity,
            duration,
            leader: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether this replica holds the lease.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        self.leader.clone()
    }

    /// Runs until `shutdown`, then releases the lease if it holds it; `became_leader` is
    /// signalled on every transition to leader.
    pub(crate) async fn run(
        self,
        became_leader: tokio::sync::mpsc::Sender<()>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let period = (self.duration / 3).max(Duration::from_millis(200));
        loop {
            let was = self.leader.load(Ordering::Relaxed);
            let now = match self.try_acquire_or_renew().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "lease update failed");
                    false
                }
            };
            self.leader.store(now, Ordering::Relaxed);
            if now && !was {
                tracing::info!(identity = %self.identity, "became the status writer (lease acquired)");
                let _ = became_leader.try_send(());
            } else if was && !now {
                tracing::warn!(identity = %self.identity, "lost the lease; no longer writing status");
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if self.leader.swap(false, Ordering::Relaxed) {
            match self.release().await {
                Ok(()) => tracing::info!(identity = %self.identity, "released the status-writer lease"),
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "could not release the lease"),
            }
        }
    }

    /// Gives the lease up if this replica still holds it.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(current) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let mut spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        let next = Lease { spec: Some(spec), ..current };
        self.api.replace(&self.name, &PostParams::default(), &next).await.map(|_| ())
    }

    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let secs = self.duration.as_secs().max(1) as i32;
        let current = match self.api.get_opt(&self.name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(t), Some(d)) => {
                let age = Timestamp::now().duration_since(t.0);
                age.as_secs() >= i64::from(d)
            }
            _ => true,
        };
        if !mine && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let mut next = current.clone();
        let mut s = spec;
        if !mine {
            s.holder_identity = Some(self.identity.clone());
            s.acquire_time = Some(now.clone());
            s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
        }
        s.renew_time = Some(now);
        s.lease_duration_seconds = Some(secs);
        next.spec = Some(s);
        match self.api.replace(&self.name, &PostParams::default(), &next).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The status a policy should have.
fn desired(
    generation: Option<i64>,
    errors: Option<&[FieldError]>,
    selected: i64,
    current: Option<&PolicyStatus>,
) -> PolicyStatus {
    let (status, reason, message) = match errors {
        None => ("True", "Valid".to_string(), String::new()),
        Some(errs) => (
            "False",
            errs.first().map(|e| e.reason.to_string()).unwrap_or_else(|| "Invalid".into()),
            errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
        ),
    };
    let prev = current.and_then(|c| c.conditions.iter().find(|c| c.type_ == "Accepted"));
    let last_transition_time = match prev {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Some(Timestamp::now().to_string()),
    };
    PolicyStatus {
        observed_generation: generation,
        conditions: vec![Condition {
            type_: "Accepted".into(),
            status: status.into(),
            reason,
            message,
            last_transition_time,
            observed_generation: generation,
        }],
        selected_pods: Some(selected),
    }
}

fn same(a: &PolicyStatus, b: Option<&PolicyStatus>) -> bool {
    let Some(b) = b else { return false };
    let strip = |s: &PolicyStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = None;
        }
        s
    };
    strip(a) == strip(b)
}

fn selected_pods(p: &AnyPolicy, inputs: &KubeInputs) -> i64 {
    inputs.pods.iter().filter(|pod| p.selects(&pod.workload())).count() as i64
}

/// Writes every status that differs from what the API has.
/// The `Accepted` condition's (status, reason, message), what an Event reports a change of.
fn accepted(s: Option<&PolicyStatus>) -> Option<(String, String, String)> {
    let c = s?.conditions.iter().find(|c| c.type_ == "Accepted")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A Kubernetes Event on the policy when its `Accepted` condition changed (what `kubectl
/// describe` shows): `Normal Accepted` or `Warning <reason>` with the problems.
async fn announce(events: &Recorder, reference: &ObjectReference, key: &str, want: &PolicyStatus) {
    let Some((status, reason, message)) = accepted(Some(want)) else { return };
    let selected = want.selected_pods.unwrap_or(0);
    let (type_, reason, note) = if status == "True" {
        (EventType::Normal, "Accepted".to_string(), format!("valid; selects {selected} Pods"))
    } else {
        // events.k8s.io notes are at most 1 KiB.
        let note: String = message.chars().take(1000).collect();
        (EventType::Warning, reason, note)
    };
    let ev = Event { type_, reason, note: Some(note), action: "Validate".into(), secondary: None };
    if let Err(e) = events.publish(&ev, reference).await {
        tracing::warn!(policy = %key, error = %e, "cannot record a Kubernetes Event");
    }
}

/// What status writing needs of each policy kind.
trait PolicyKind: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug {
    /// `kind` of the status patch.
    const KIND: &'static str;
    /// The policy as the pipeline sees it.
    fn any(&self) -> AnyPolicy;
    /// Its status as last written.
    fn status(&self) -> Option<&PolicyStatus>;
    /// Where its status is written (Lenient: the answer is the whole object, which may be one
    /// that does not decode).
    fn api(client: Client, namespace: Option<&str>) -> Api<Lenient<Self>>;
}

impl PolicyKind for EgressPolicy {
    const KIND: &'static str = "EgressPolicy";
    fn any(&self) -> AnyPolicy {
        AnyPolicy::Namespaced(self.clone())
    }
    fn status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
    fn api(client: Client, namespace: Option<&str>) -> Api<Lenient<Self>> {
        Api::namespaced(client, namespace.unwrap_or_default())
    }
}

impl PolicyKind for ClusterEgressPolicy {
    const KIND: &'static str = "ClusterEgressPolicy";
    fn any(&self) -> AnyPolicy {
        AnyPolicy::Cluster(self.clone())
    }
    fn status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }
    fn api(client: Client, _: Option<&str>) -> Api<Lenient<Self>> {
        Api::all(client)
    }
}

/// Writes every status that differs from what the API has, and records an Event on each
/// policy whose `Accepted` condition changed.
pub(crate) async fn write_statuses(client: &Client, stores: &Stores, inputs: &KubeInputs, events: &Recorder) {
    write_kind(client, &stores.policies, inputs, events).await;
    write_kind(client, &stores.cluster, inputs, events).await;
}

/// [`write_statuses`] for one kind. A policy that does not decode gets its status too: `Accepted`
/// `False`, reason `Undecodable`, each problem at its field.
async fn write_kind<K: PolicyKind>(
    client: &Client,
    store: &kube::runtime::reflector::Store<Lenient<K>>,
    inputs: &KubeInputs,
    events: &Recorder,
) {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for p in store.state() {
        let (key, selected, current) = match &*p {
            Lenient::Decoded(d) => {
                let any = d.any();
                (any.key(), selected_pods(&any, inputs), d.status())
            }
            Lenient::Undecodable(u) => (u.key(), 0, u.status.as_ref()),
        };
        let errors =
            inputs.invalid.iter().find(|(kind, k, _)| *k == key && *kind == K::KIND).map(|(_, _, e)| e.as_slice());
        let want = desired(p.meta().generation, errors, selected, current);
        if same(&want, current) {
            continue;
        }
        let Some(name) = p.meta().name.as_deref() else { continue };
        let body = serde_json::json!({"apiVersion": egress_crds::API_VERSION, "kind": K::KIND, "status": want});
        let api = K::api(client.clone(), p.meta().namespace.as_deref());
        match api.patch_status(name, &params, &Patch::Apply(&body)).await {
            Ok(_) if accepted(Some(&want)) != accepted(current) => {
                announce(events, &p.object_ref(&()), &key, &want).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(policy = %key, error = %e, "status write failed"),
        }
    }
}
