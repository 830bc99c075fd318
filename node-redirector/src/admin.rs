//! `/healthz`, `/readyz` (the table is applied) and `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The redirector's metrics and readiness.
pub struct Admin {
    registry: Registry,
    /// The process's own metrics (`process_*`, no prefix).
    process: Registry,
    /// Table applied at least once.
    pub ready: AtomicBool,
    /// Drift repairs.
    pub drift_repairs: Counter,
    /// Table updates (incremental or whole).
    pub updates: Counter,
    /// Selected Pod addresses in the table.
    pub selected: Gauge,
    /// Of those, addresses whose host-side interface is unknown: steered, without anti-spoofing.
    pub unguarded: Gauge,
    /// 1 while the last table update failed (retried at every reconcile).
    pub apply_failing: Gauge,
    /// Seconds from an input change (Pod, policy, config) to its rules being applied.
    pub apply_seconds: Histogram,
    /// Seconds from a CNI plugin's `ADD` arriving to the Pod's addresses in the kernel.
    pub cni_admit_seconds: Histogram,
    /// CNI plugin requests by result.
    pub cni_requests: Family<ResultLabel, Counter>,
}

/// Label of [`Admin::cni_requests`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `selected`, `not_selected`, `deleted`, `checked` or `error`.
    pub result: &'static str,
}

impl Admin {
    /// Publishes what the table `d` now in the kernel steers, `unguarded` of its addresses
    /// without anti-spoofing.
    pub fn table(&self, d: &crate::rules::Desired, unguarded: usize) {
        self.selected.set(d.selected.len() as i64);
        self.unguarded.set(unguarded as i64);
    }

    /// The registry, with the relay's metrics in it.
    pub fn new(relay: &crate::relay::RelayMetrics, dns: &crate::dnsfwd::DnsMetrics) -> Self {
        let mut registry = Registry::with_prefix("egress_redirector");
        egress_netio::exposition::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
        let drift_repairs = Counter::default();
        registry.register(
            "drift_repairs",
            "Times the table was found changed by someone else and repaired",
            drift_repairs.clone(),
        );
        let updates = Counter::default();
        registry.register("table_updates", "Table updates applied", updates.clone());
        let selected = Gauge::default();
        registry.register("selected_addresses", "Pod addresses steered to the gateway", selected.clone());
        let unguarded = Gauge::default();
        registry.register(
            "unguarded_addresses",
            "Steered Pod addresses whose host-side interface is unknown, so that anti-spoofing cannot apply to \
             them (Pods the CNI plugin never admitted, with no host route naming their interface)",
            unguarded.clone(),
        );
        let apply_failing = Gauge::default();
        registry.register(
            "table_apply_failing",
            "1 while the last update of the nftables table failed (it is retried at every reconcile)",
            apply_failing.clone(),
        );
        let apply_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "apply_seconds",
            "Time from an input change to its rules being applied",
            apply_seconds.clone(),
        );
        registry.register_collector(Box::new(egress_netio::RelayCollector));
        registry.register(
            "endpoint_up",
            "Whether a gateway endpoint is healthy (1) or down and probed (0)",
            relay.endpoint_up.clone(),
        );
        registry.register(
            "endpoint_failures",
            "Connects to a gateway endpoint for a client that failed (refused or timed out); the endpoint is then marked down",
            relay.failures.clone(),
        );
        registry.register(
            "relay_refused",
            "Connections the relay refused: not_redirected (a direct connection to the relay port), no_endpoint (no healthy gateway)",
            relay.refused.clone(),
        );
        registry.register(
            "dns_queries",
            "Queries the DNS forwarder relayed, by transport and result: recorded (the answer bound a name), answered (it bound nothing), failed (no answer from the resolver), dropped (too many in flight)",
            dns.queries.clone(),
        );
        registry.register("dns_names", "Names the DNS forwarder holds, all Pods together", dns.names.clone());
        registry.register(
            "dns_evicted",
            "Names evicted to keep within dns.maxNamesPerPod (and 4 address pairs per name)",
            dns.evicted.clone(),
        );
        let cni_admit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "cni_admit_seconds",
            "Time from a CNI plugin ADD arriving to the Pod's addresses being in the kernel",
            cni_admit_seconds.clone(),
        );
        let cni_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "cni_requests",
            "CNI plugin requests: selected / not_selected (ADD), deleted (DEL), checked (CHECK), error (could not decide or apply)",
            cni_requests.clone(),
        );
        Admin {
            registry,
            process: egress_netio::exposition::process_registry(),
            ready: AtomicBool::new(false),
            drift_repairs,
            updates,
            selected,
            unguarded,
            apply_failing,
            apply_seconds,
            cni_admit_seconds,
            cni_requests,
        }
    }

    /// Serves until the process ends.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let admin = admin.clone();
                    async move {
                        let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
                        let openmetrics = egress_netio::exposition::wants_openmetrics(accept);
                        Ok::<_, Infallible>(admin.route(req.uri().path(), openmetrics))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn route(&self, path: &str, openmetrics: bool) -> hyper::Response<Full<Bytes>> {
        let mut ctype = "text/plain; charset=utf-8";
        let (code, body) = match path {
            "/healthz" => (200, "ok\n".to_string()),
            "/readyz" if self.ready.load(Ordering::Relaxed) => (200, "ready\n".to_string()),
            "/readyz" => (503, "table not applied yet\n".to_string()),
            "/metrics" => {
                let (body, t) = egress_netio::exposition::render(&[&self.registry, &self.process], openmetrics);
                ctype = t;
                (200, body)
            }
            _ => (404, "not found\n".to_string()),
        };
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    }
}
