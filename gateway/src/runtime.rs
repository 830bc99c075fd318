//! The process side of a running gateway: shutdown and drain, the tracker of connection tasks,
//! and readiness; and [`Gateway`], the pair of it and the decision pipeline that a listener
//! serves with. The pipeline never sees this module.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Loaded;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;

/// Shutdown, drain and readiness.
pub(crate) struct Runtime {
    /// Fires when the shutdown grace period is over: open relays end.
    pub stop: CancellationToken,
    /// Fires when shutdown starts: listeners stop accepting, keep-alive connections close.
    pub draining: CancellationToken,
    /// Tracks every connection task, for draining.
    pub tracker: TaskTracker,
    listening: AtomicBool,
    kube_synced: AtomicBool,
}

impl Runtime {
    /// A runtime; in Kubernetes mode it is not ready before the watchers have synced.
    pub(crate) fn new(kube_mode: bool) -> Runtime {
        Runtime {
            stop: CancellationToken::new(),
            draining: CancellationToken::new(),
            tracker: TaskTracker::new(),
            listening: AtomicBool::new(false),
            kube_synced: AtomicBool::new(!kube_mode),
        }
    }

    /// Marks the listeners bound.
    pub(crate) fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    /// Marks the Kubernetes watchers synced.
    pub(crate) fn set_kube_synced(&self) {
        self.kube_synced.store(true, Ordering::Relaxed);
    }

    /// Listeners bound, Kubernetes watchers synced (in Kubernetes mode), not draining.
    pub(crate) fn is_serving(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
            && self.kube_synced.load(Ordering::Relaxed)
            && !self.draining.is_cancelled()
    }
}

/// What a listener serves with: the decision pipeline and the runtime (two `Arc`s; cheap to clone).
#[derive(Clone)]
pub(crate) struct Gateway {
    /// The decision pipeline.
    pub pipeline: Arc<Pipeline>,
    /// Shutdown, drain and readiness.
    pub runtime: Arc<Runtime>,
}

impl Gateway {
    /// Builds the gateway from a loaded config (`api_keys`: see [`Pipeline::new`]).
    pub(crate) fn new(
        loaded: Loaded,
        metrics: Arc<Metrics>,
        api_keys: Option<Arc<crate::token::ApiKeys>>,
    ) -> anyhow::Result<Gateway> {
        let kube_mode = loaded.config.kubernetes.enabled;
        Ok(Gateway { pipeline: Pipeline::new(loaded, metrics, api_keys)?, runtime: Arc::new(Runtime::new(kube_mode)) })
    }

    /// `/readyz`: serving, and the audit log can take decisions (the same rule as admission).
    pub(crate) fn is_ready(&self) -> bool {
        self.runtime.is_serving() && self.pipeline.audit.is_available()
    }
}
