//! `egress-gateway run`: binds the listeners, serves, reloads on file change or SIGHUP, and
//! drains on SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Loaded;
use crate::metrics::Metrics;
use crate::runtime::Gateway;

async fn bind(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr).with_context(|| format!("listen.{what}: cannot bind {addr}"))?;
    sock.listen(4096).with_context(|| format!("listen.{what}: cannot listen on {addr}"))
}

/// Runs the gateway until SIGTERM/SIGINT and the drain that follows.
pub async fn run(loaded: Loaded) -> anyhow::Result<()> {
    let listen = loaded.config.listen.clone();
    if listen.http.is_none() && listen.socks5.is_none() && listen.transparent.is_none() && listen.https.is_none() {
        anyhow::bail!(
            "{}: listen: none of listen.http, listen.https, listen.socks5, listen.transparent is set; nothing to serve",
            loaded.path.display()
        );
    }
    let watch_paths = watched_paths(&loaded);
    let kube = loaded.config.kubernetes.clone();
    let metrics = Arc::new(Metrics::new());
    // Kubernetes mode without `identity.tokens.jwksFile`: the token keys come from the API.
    let issuer = loaded.config.identity.tokens.as_ref().filter(|t| t.jwks_file.is_none()).map(|t| t.issuer.clone());
    let api_keys = issuer.filter(|_| kube.enabled).map(|issuer| {
        let (keys, asks) = crate::token::ApiKeys::new();
        crate::k8s::TokenKeys { issuer, keys, asks }
    });
    let gw = Gateway::new(loaded, metrics, api_keys.as_ref().map(|k| k.keys.clone()))?;
    let kube_health = if kube.enabled { Some(follow_kubernetes(&gw, kube, api_keys).await?) } else { None };
    let http = match listen.http {
        Some(a) => Some(bind("http", a).await?),
        None => None,
    };
    let socks = match listen.socks5 {
        Some(a) => Some(bind("socks5", a).await?),
        None => None,
    };
    let transparent = match listen.transparent {
        Some(a) => Some(bind("transparent", a).await?),
        None => None,
    };
    let https = match listen.https {
        Some(a) => Some(bind("https", a).await?),
        None => None,
    };
    let admin = match listen.admin {
        Some(a) => Some(bind("admin", a).await?),
        None => None,
    };
    let mut fronts = tokio::task::JoinSet::new();
    if let Some(l) = http {
        tracing::info!(addr = %l.local_addr()?, "HTTP proxy listening");
        fronts.spawn(crate::front::http::serve(gw.clone(), l));
    }
    if let Some(l) = https {
        tracing::info!(addr = %l.local_addr()?, "HTTPS proxy listening");
        fronts.spawn(crate::front::https::serve(gw.clone(), l));
    }
    if let Some(l) = socks {
        tracing::info!(addr = %l.local_addr()?, "SOCKS5 proxy listening");
        fronts.spawn(crate::front::socks5::serve(gw.clone(), l));
    }
    if let Some(l) = transparent {
        tracing::info!(addr = %l.local_addr()?, "transparent front listening");
        fronts.spawn(crate::front::transparent::serve(gw.clone(), l));
    }
    if let Some(l) = admin {
        tracing::info!(addr = %l.local_addr()?, "admin listening");
        tokio::spawn(crate::admin::serve(gw.clone(), kube_health.clone(), l));
    }
    // The rate limiters keep one state per client address: every 10 s the states that are back
    // to a full bucket (indistinguishable from a new client) are dropped, so that many
    // short-lived client addresses do not grow memory without bound.
    let pruning = gw.pipeline.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            pruning.prune_rate_limiters();
        }
    });
    gw.runtime.set_listening();
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<()>(1);
    let _watcher = start_watcher(&watch_paths, reload_tx.clone());
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => { let _ = reload_tx.try_send(()); }
            Some(()) = reload_rx.recv() => {
                // Let a burst of file events settle, then reload once.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while reload_rx.try_recv().is_ok() {}
                let gw2 = gw.clone();
                let _ = tokio::task::spawn_blocking(move || gw2.pipeline.reload()).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let grace = gw.pipeline.state().loaded.config.shutdown.grace;
    let shutdown_started = std::time::Instant::now();
    tracing::info!(grace = ?grace, "shutting down: no new connections, draining open ones");
    gw.runtime.draining.cancel();
    while fronts.join_next().await.is_some() {}
    gw.runtime.tracker.close();
    if tokio::time::timeout(grace, gw.runtime.tracker.wait()).await.is_err() {
        tracing::warn!("grace period over: closing the remaining connections");
        gw.runtime.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), gw.runtime.tracker.wait()).await;
    }
    // The sinks drain for what is left of the grace period (at least two seconds).
    gw.pipeline.audit.close(grace.saturating_sub(shutdown_started.elapsed()).max(Duration::from_secs(2)));
    tracing::info!("stopped");
    Ok(())
}

/// Starts the Kubernetes watchers and applies what they deliver to the pipeline; the gateway is
/// not ready before their first full list.
async fn follow_kubernetes(
    gw: &Gateway,
    cfg: crate::config::KubernetesConfig,
    token_keys: Option<crate::k8s::TokenKeys>,
) -> anyhow::Result<Arc<crate::k8s::WatchHealth>> {
    let pipeline = gw.pipeline.clone();
    let cx = crate::k8s::Context {
        pool_exists: Arc::new(move |pool: &str| pipeline.pool_exists(pool)),
        instance: gw.pipeline.instance.clone(),
        tracker: gw.runtime.tracker.clone(),
        draining: gw.runtime.draining.clone(),
        replicas: cfg.rate_limit_replicas.as_ref().map(|r| crate::k8s::Replicas {
            namespace: r
                .namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into()),
            labels: r.match_labels.clone(),
        }),
        token_keys,
    };
    let mut watching = crate::k8s::start(cfg, cx).await.context("kubernetes")?;
    let gw = gw.clone();
    tokio::spawn(async move {
        while watching.inputs.changed().await.is_ok() {
            let inputs = watching.inputs.borrow_and_update().clone();
            if let Some(inputs) = inputs {
                gw.pipeline.apply_kube(inputs);
                gw.runtime.set_kube_synced();
            }
        }
    });
    Ok(watching.health)
}

fn watched_paths(loaded: &Loaded) -> Vec<PathBuf> {
    let base = loaded.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut v = vec![loaded.path.clone()];
    let jwks = loaded.config.identity.tokens.as_ref().and_then(|t| t.jwks_file.as_ref());
    let h = &loaded.config.https;
    let tls = h.cert.iter().chain(&h.key).chain(&h.client_ca);
    for p in loaded.config.policy_files.iter().chain(&loaded.config.transparent.relay_key_file).chain(jwks).chain(tls) {
        v.push(crate::config::relative_to(&base, p));
    }
    v
}

/// Whether a changed path concerns a watched file or directory: the path itself, a file in a
/// watched directory, or a Kubernetes ConfigMap `..data` symlink swap next to a watched file.
fn relevant(changed: &Path, watched: &Path) -> bool {
    changed == watched
        || changed.parent() == Some(watched)
        || (changed.parent() == watched.parent()
            && changed.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("..")))
}

/// Watches the config file and the policy files/directories (their parent directories, so that
/// editors and ConfigMap symlink swaps that replace files are seen).
fn start_watcher(paths: &[PathBuf], tx: tokio::sync::mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let targets: Vec<PathBuf> =
        paths.iter().filter_map(|p| std::fs::canonicalize(p).ok().or(Some(p.clone()))).collect();
    let interesting = targets.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !ev.kind.is_access()
            && ev.paths.iter().any(|p| interesting.iter().any(|t| relevant(p, t)))
        {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "file watching unavailable; reload with SIGHUP"))
    .ok()?;
    for t in &targets {
        let dir = if t.is_dir() { t.clone() } else { t.parent().map(Path::to_path_buf).unwrap_or_else(|| t.clone()) };
        if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot watch; reload with SIGHUP");
        }
    }
    Some(w)
}
