//! The `node-redirector` binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use node_redirector::{admin, config, k8s, nft, relay, routes, rules};
use tokio::signal::unix::{SignalKind, signal};

/// Per-node nftables steering of selected Pods' egress to the egress gateway.
#[derive(Parser)]
#[command(name = "node-redirector", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply (or adopt) the table, run the relay, reconcile. SIGTERM/SIGINT stop the process and
    /// leave the table in the kernel: steered Pods stay steered (their connections are refused
    /// while no relay listens) until `uninstall`.
    Run {
        /// Standalone configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Reconcile period (the table is also checked for drift then).
        #[arg(long, default_value = "2s")]
        reconcile: humantime::Duration,
    },
    /// Validate the configuration and every policy document; print every error (exit 0 valid, 2 not).
    Validate {
        /// Standalone configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the ruleset `run` would apply (nft syntax), without applying it.
    Render {
        /// Standalone configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Remove steering from this node: delete the table. Selected Pods egress directly afterwards
    /// (or not at all, where the network allows no direct egress).
    Uninstall,
}

fn load(path: &std::path::Path) -> Result<config::Loaded, ExitCode> {
    config::load(path).map_err(|errs| {
        for e in errs {
            eprintln!("{e}");
        }
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REDIRECTOR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    match cli.command {
        Cmd::Validate { config } => match load(&config) {
            Ok(l) => {
                println!("{}: ok ({} policies)", config.display(), l.policies.len());
                ExitCode::SUCCESS
            }
            Err(c) => c,
        },
        Cmd::Uninstall => match nft::remove() {
            Ok(()) => {
                println!("table inet {} removed", rules::TABLE);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Render { config } => match load(&config) {
            Ok(l) => {
                let mut inputs = l.inputs();
                inputs.interfaces = routes::host_routes();
                print!("{}", rules::desired(&inputs, &l.config).render());
                ExitCode::SUCCESS
            }
            Err(c) => c,
        },
        Cmd::Run { config, reconcile } => {
            let loaded = match load(&config) {
                Ok(l) => l,
                Err(c) => return c,
            };
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match rt.block_on(run(config, loaded, reconcile.into())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

async fn run(path: PathBuf, loaded: config::Loaded, period: Duration) -> anyhow::Result<()> {
    let port = loaded.config.relay.port;
    // Relay first: once the table exists, redirected connections must find it listening.
    let v4 = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    let v6 = {
        let s = tokio::net::TcpSocket::new_v6()?;
        let sock = socket_v6only(s)?;
        sock.bind(std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))?;
        sock.listen(1024)?
    };
    let relay_metrics = Arc::new(relay::RelayMetrics::default());
    let rc = &loaded.config.relay;
    let endpoints = Arc::new(relay::Endpoints::new(
        loaded.config.gateways.clone(),
        rc.connect_timeout,
        rc.probe_interval,
        relay_metrics.clone(),
    ));
    let key = loaded.relay_keys.first().cloned().ok_or_else(|| anyhow::anyhow!("relay.keyFile: no key"))?;
    let relay = Arc::new(relay::Relay {
        endpoints: endpoints.clone(),
        signer: egress_netio::proxy::Signer::new(key).map_err(anyhow::Error::msg)?,
        coalesce: rc.coalesce,
    });
    tokio::spawn(relay::serve(v4, relay.clone()));
    tokio::spawn(relay::serve(v6, relay));
    let metrics = Arc::new(admin::Admin::new(&relay_metrics));
    if let Some(addr) = loaded.config.admin {
        tokio::spawn(metrics.clone().serve(tokio::net::TcpListener::bind(addr).await?));
    }
    // Inputs: the Kubernetes watchers, or the file (re-read every period).
    let (mut kube, reporter) = if loaded.config.kubernetes.enabled {
        let (mut rx, reporter) = k8s::start(&loaded.config, loaded.node_name()).await?;
        // No table until every watcher listed: nothing is steered on a half-known state.
        while rx.borrow().is_none() {
            rx.changed().await?;
        }
        (Some(rx), Some(reporter))
    } else {
        (None, None)
    };
    // After every application (and every reconcile, which retries failed writes): the Pods'
    // condition says what is in the kernel now.
    let report = |inputs: &rules::Inputs| {
        if let Some(r) = &reporter {
            r.applied(inputs);
        }
    };
    let mut cfg = loaded.config.clone();
    let mut inputs = match &kube {
        Some(rx) => rx.borrow().clone().unwrap_or_default(),
        None => loaded.inputs(),
    };
    inputs.interfaces = routes::host_routes();
    endpoints.set(inputs.gateways.clone());
    let mut desired = rules::desired(&inputs, &cfg);
    // A table left by the previous instance (a restart, an upgrade) kept steering while no relay
    // listened; adopt it rather than remove it.
    let adopted = nft::adopt(&desired)?;
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    metrics.selected.set(desired.selected.len() as i64);
    tracing::info!(selected = desired.selected.len(), port, adopted, "table in place; relay listening");
    report(&inputs);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut drift_repairs: u64 = 0;
    loop {
        let changed = async {
            match kube.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            true = changed => {
                if let Some(rx) = &kube {
                    inputs = rx.borrow().clone().unwrap_or_default();
                }
            }
            _ = tokio::time::sleep(period) => {
                inputs.changed_at = None;
                if kube.is_none() {
                    match config::load(&path) {
                        Ok(l) => {
                            inputs = l.inputs();
                            cfg = l.config;
                        }
                        Err(errs) => tracing::error!(errors = %errs.join("; "), "config reload failed; keeping the current table"),
                    }
                }
            }
        }
        endpoints.set(inputs.gateways.clone());
        inputs.interfaces = routes::host_routes();
        let next = rules::desired(&inputs, &cfg);
        if next != desired {
            let incremental = nft::update(&desired, &next)?;
            metrics.updates.inc();
            metrics.selected.set(next.selected.len() as i64);
            if let Some(t) = inputs.changed_at {
                metrics.apply_seconds.observe(t.elapsed().as_secs_f64());
            }
            tracing::info!(selected = next.selected.len(), incremental, "table updated");
            desired = next;
            report(&inputs);
            continue;
        }
        match nft::observed() {
            Ok(Some(seen)) if seen.matches(&desired) => {}
            Ok(_) => {
                drift_repairs += 1;
                metrics.drift_repairs.inc();
                tracing::warn!(drift_repairs, "table drifted from the desired state; repairing");
                nft::apply(&desired)?;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the table"),
        }
        report(&inputs);
    }
    tracing::info!("stopped; the table stays in the kernel (node-redirector uninstall removes it)");
    Ok(())
}

fn socket_v6only(s: tokio::net::TcpSocket) -> std::io::Result<tokio::net::TcpSocket> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    s.set_reuseaddr(true)?;
    Ok(s)
}
