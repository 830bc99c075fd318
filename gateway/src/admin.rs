//! The admin listener: `/metrics` (Prometheus text), `/healthz` (process alive), `/readyz`
//! (listeners bound and not draining).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::runtime::Gateway;

/// Serves the admin endpoints until the process stops (readiness must stay visible while draining).
pub(crate) async fn serve(gw: Gateway, kube: Option<Arc<crate::k8s::WatchHealth>>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (gw, kube) = (gw.clone(), kube.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (gw, kube) = (gw.clone(), kube.clone());
                async move { Ok::<_, Infallible>(route(&gw, kube.as_deref(), &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(gw: &Gateway, kube: Option<&crate::k8s::WatchHealth>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => {
            if let Some(k) = kube {
                gw.pipeline.metrics.kube_stale_seconds.set(k.stale_seconds() as i64);
            }
            let accept = req.headers().get(http::header::ACCEPT).and_then(|v| v.to_str().ok());
            let (body, ctype) = gw.pipeline.metrics.render(egress_netio::exposition::wants_openmetrics(accept));
            (StatusCode::OK, ctype, body)
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if gw.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r
}
