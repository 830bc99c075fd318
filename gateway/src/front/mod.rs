//! Protocol fronts. Each only parses its protocol into an `EgressRequest`, hands it to the
//! pipeline and writes its protocol's answer back; nothing about policy, resolution or audit
//! lives here.

pub mod http;
pub mod socks5;
pub mod transparent;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::pipeline::Gateway;

/// Accepts on `listener` until the gateway drains; every connection runs `handle` as a tracked
/// task (drained on shutdown) and is counted in `egress_active_connections`.
pub async fn accept_loop<F, Fut>(gw: Arc<Gateway>, listener: TcpListener, name: &'static str, handle: F)
where
    F: Fn(Arc<Gateway>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = gw.draining.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let conn = handle(gw.clone(), stream, peer);
                let gw2 = gw.clone();
                gw.tracker.spawn(async move {
                    gw2.metrics.active_connections.inc();
                    conn.await;
                    gw2.metrics.active_connections.dec();
                });
            }
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
