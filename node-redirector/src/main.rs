//! The `node-redirector` binary.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use node_redirector::{admin, admit, cni, config, conflist, dnsfwd, k8s, nft, relay, routes, rules};
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
    /// Remove steering from this node: delete the table, and with `--config`, the CNI plugin's
    /// conflist entry and binary (`cni.confDir`, `cni.binDir`). Selected Pods egress directly
    /// afterwards (or not at all, where the network allows no direct egress).
    Uninstall {
        /// The configuration naming the CNI dirs.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Then stay up (serving `/readyz` 200 on the config's `admin` address) until SIGTERM:
        /// what the DaemonSet's Pods run while the release is deleted.
        #[arg(long, requires = "config")]
        wait: bool,
    },
    /// Take steering off every node (the chart's pre-delete hook): turn the DaemonSet's Pods into
    /// `uninstall --wait` and wait until each has run it.
    UninstallDaemonset {
        /// The DaemonSet's namespace.
        #[arg(long)]
        namespace: String,
        /// The DaemonSet.
        #[arg(long)]
        name: String,
        /// The config path inside the DaemonSet's Pods.
        #[arg(long, default_value = "/etc/node-redirector/node-redirector.yaml")]
        config: String,
        /// Kubeconfig; default: `KUBECONFIG`, `~/.kube/config`, then in-cluster.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Give up (and fail, naming what is left) after this long.
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
    },
    /// Install the CNI plugin on this node (the DaemonSet's init container): copy this binary
    /// into `cni.binDir` as `egress-redirector` and add the plugin as the last plugin of the
    /// primary conflist in `cni.confDir` (idempotent; a malformed file is left untouched).
    InstallCni {
        /// Standalone configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run as the chained CNI plugin (the container runtime calls it with the CNI environment and
    /// the network configuration on stdin; installed as `egress-redirector`, it needs no argument).
    Cni,
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
    // Installed in the CNI bin dir as the plugin, the runtime calls it by that name, without
    // arguments: the plugin speaks CNI on stdout and never logs there.
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    if argv0.as_deref().and_then(|p| p.file_name()).is_some_and(|n| n == cni::PLUGIN_TYPE) {
        return cni::main();
    }
    let cli = Cli::parse();
    // EGRESS_LOG (and EGRESS_LOG_FORMAT) as for the gateway; REDIRECTOR_LOG, the older name,
    // still works.
    egress_log::init(egress_log::Format::Text, &["REDIRECTOR_LOG"]);
    match cli.command {
        Cmd::Validate { config } => match load(&config) {
            Ok(l) => {
                println!("{}: ok ({} policies)", config.display(), l.policies.len());
                ExitCode::SUCCESS
            }
            Err(c) => c,
        },
        Cmd::Cni => cni::main(),
        Cmd::Uninstall { config, wait } => {
            let code = uninstall(config.as_deref());
            match (wait, config) {
                (true, Some(c)) if code == ExitCode::SUCCESS => wait_uninstalled(&c),
                _ => code,
            }
        }
        Cmd::UninstallDaemonset { namespace, name, config, kubeconfig, timeout } => {
            block_on(false, k8s::uninstall_daemonset(kubeconfig.as_deref(), &namespace, &name, &config, timeout.into()))
        }
        Cmd::InstallCni { config } => match load(&config) {
            Ok(l) => install_cni(&l.config.cni),
            Err(c) => c,
        },
        Cmd::Render { config } => match load(&config) {
            Ok(l) => {
                let mut inputs = l.inputs();
                inputs.interfaces = routes::host_routes();
                let node = rules::Node { relay_to: relay_addresses(&l.config), bridge: nft::bridge_family_available() };
                print!("{}", rules::desired(&inputs, &l.config, node).render());
                ExitCode::SUCCESS
            }
            Err(c) => c,
        },
        Cmd::Run { config, reconcile } => {
            let loaded = match load(&config) {
                Ok(l) => l,
                Err(c) => return c,
            };
            block_on(true, run(config, loaded, reconcile.into()))
        }
    }
}

/// Runs `f` on a tokio runtime (multi-threaded for `run`); errors printed, exit 2.
fn block_on(multi_thread: bool, f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let r = b.enable_all().build().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(f));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
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
    let key = loaded.relay_keys().map_err(anyhow::Error::msg)?.swap_remove(0);
    let relay_to = relay_addresses(&loaded.config);
    let node = rules::Node { relay_to, bridge: nft::bridge_family_available() };
    if !node.bridge {
        tracing::error!(
            "the kernel has no nf_tables bridge family: no anti-spoofing on bridge ports (bridge CNIs); their Pods \
             are steered without it and counted in egress_redirector_unguarded_addresses"
        );
    }
    // The DNS forwarder, listening before the table redirects DNS to it.
    let dns_metrics = Arc::new(dnsfwd::DnsMetrics::default());
    let forwarder = if loaded.config.dns.enabled {
        let d = &loaded.config.dns;
        let fwd = dnsfwd::Forwarder::new(d.max_names_per_pod, d.grace, dns_metrics.clone());
        for (resolver, port) in rules::dns_forward_ports(&loaded.config) {
            let upstream = std::net::SocketAddr::new(resolver, 53);
            let v4 =
                tokio::net::UdpSocket::bind((relay_to.v4.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED), port)).await?;
            let v6 = udp_v6only(relay_to.v6.unwrap_or(std::net::Ipv6Addr::UNSPECIFIED), port)?;
            let t4 = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
            let t6 = {
                let sock = socket_v6only(tokio::net::TcpSocket::new_v6()?)?;
                sock.bind(std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))?;
                sock.listen(1024)?
            };
            tokio::spawn(dnsfwd::serve_udp(v4, upstream, fwd.clone()));
            tokio::spawn(dnsfwd::serve_udp(v6, upstream, fwd.clone()));
            tokio::spawn(dnsfwd::serve_tcp(t4, upstream, fwd.clone()));
            tokio::spawn(dnsfwd::serve_tcp(t6, upstream, fwd.clone()));
            tracing::info!(port, resolver = %resolver, "DNS forwarder listening");
        }
        tokio::spawn(fwd.clone().sweep_forever());
        Some(fwd)
    } else {
        None
    };
    let relay = Arc::new(relay::Relay {
        endpoints: endpoints.clone(),
        signer: egress_netio::proxy::Signer::new(key).map_err(anyhow::Error::msg)?,
        coalesce: rc.coalesce,
        names: forwarder.clone(),
    });
    tokio::spawn(relay::serve(v4, relay.clone()));
    tokio::spawn(relay::serve(v6, relay));
    let metrics = Arc::new(admin::Admin::new(&relay_metrics, &dns_metrics));
    if let Some(addr) = loaded.config.admin {
        tokio::spawn(metrics.clone().serve(tokio::net::TcpListener::bind(addr).await?));
    }
    // Inputs: the Kubernetes watchers, or the file (re-read every period).
    let (mut kube, reporter, client) = if loaded.config.kubernetes.enabled {
        let (mut rx, reporter, client) = k8s::start(&loaded.config, loaded.node_name()).await?;
        // No table until every watcher listed: nothing is steered on a half-known state.
        while rx.borrow().is_none() {
            rx.changed().await?;
        }
        (Some(rx), Some(reporter), Some(client))
    } else {
        (None, None, None)
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
    // Pods the CNI plugin admitted before a restart: still steered while the watch or the file
    // does not list them.
    let admissions_file = cfg.cni.socket.with_file_name("admissions.json");
    let mut admissions =
        if cfg.cni.enabled { admit::Admissions::load(&admissions_file) } else { admit::Admissions::default() };
    let mut desired_inputs = admissions.merged(&inputs);
    inputs.interfaces = routes::host_routes();
    desired_inputs.interfaces = inputs.interfaces.clone();
    endpoints.set(inputs.gateways.clone());
    let mut desired = rules::desired(&desired_inputs, &cfg, node);
    if let Some(f) = &forwarder {
        f.set_pods(&desired_inputs.pods);
    }
    // A table left by the previous instance (a restart, an upgrade) kept steering while no relay
    // listened; adopt it rather than remove it.
    let adopted = nft::adopt(&desired)?;
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut unguarded = BTreeSet::new();
    publish(&metrics, &desired, &mut unguarded);
    tracing::info!(selected = desired.selected.len(), port, adopted, "table in place; relay listening");
    report(&desired_inputs);
    drop(desired_inputs);
    // The CNI plugin's admissions, once the table is in place (before, the plugin finds no
    // socket: it cannot be answered yet, and fails or passes per its failure policy).
    let (cni_tx, mut cni_rx) = tokio::sync::mpsc::channel::<cni::Pending>(64);
    // A primary CNI that rewrites its conflist (many do when their agent restarts) drops our
    // entry: the conf dir is watched, so the entry is back within milliseconds, not at the next
    // reconcile.
    let (conf_tx, mut conf_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut _conf_watcher = None;
    if cfg.cni.enabled {
        cni::serve(cfg.cni.socket.clone(), cni_tx).await?;
        ensure_conflist(&cfg.cni);
        _conf_watcher = cfg.cni.conf_dir.as_deref().and_then(|d| watch_dir(d, conf_tx));
    } else {
        drop(cni_tx);
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut drift_repairs: u64 = 0;
    // The reconcile period, kept however busy the other events are.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = async {
            match kube.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let mut answer = None;
        let mut tick = false;
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            true = changed => {
                if let Some(rx) = &kube {
                    inputs = rx.borrow().clone().unwrap_or_default();
                    admissions.prune(&inputs);
                }
            }
            Some(()) = conf_rx.recv() => {
                ensure_conflist(&cfg.cni);
                continue;
            }
            Some((req, started, reply)) = cni_rx.recv() => {
                let outcome = admit_request(&req, &inputs, client.as_ref(), &mut admissions).await;
                if let Err(e) = admissions.save(&admissions_file) {
                    tracing::warn!(file = %admissions_file.display(), error = %e, "cannot save the CNI admissions");
                }
                answer = Some((req, started, reply, outcome));
            }
            _ = ticker.tick() => {
                tick = true;
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
                if cfg.cni.enabled {
                    ensure_conflist(&cfg.cni);
                }
            }
        }
        endpoints.set(inputs.gateways.clone());
        inputs.interfaces = routes::host_routes();
        let merged = admissions.merged(&inputs);
        if let Some(f) = &forwarder {
            f.set_pods(&merged.pods);
        }
        let next = rules::desired(&merged, &cfg, node);
        let mut applied = Ok(());
        if next != desired {
            match nft::update(&desired, &next) {
                Ok(incremental) => {
                    metrics.updates.inc();
                    metrics.apply_failing.set(0);
                    publish(&metrics, &next, &mut unguarded);
                    if let Some(t) = inputs.changed_at.take() {
                        metrics.apply_seconds.observe(t.elapsed().as_secs_f64());
                    }
                    tracing::info!(selected = next.selected.len(), incremental, "table updated");
                    desired = next;
                    report(&merged);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot update the table; retrying at the next reconcile");
                    metrics.apply_failing.set(1);
                    applied = Err(e.to_string());
                }
            }
        } else if tick {
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
            report(&merged);
        }
        if let Some((req, started, reply, outcome)) = answer {
            let response = match (outcome, applied) {
                (Err(e), _) | (Ok(_), Err(e)) => cni::Response { ok: false, selected: false, message: e },
                (Ok(()), Ok(())) => cni_response(&req, &merged, &desired),
            };
            let result = match (req.command.as_str(), response.ok, response.selected) {
                (_, false, _) => "error",
                ("ADD", true, true) => "selected",
                ("ADD", true, false) => "not_selected",
                ("DEL", true, _) => "deleted",
                _ => "checked",
            };
            metrics.cni_requests.get_or_create(&admin::ResultLabel { result }).inc();
            if req.command == "ADD" && response.ok {
                metrics.cni_admit_seconds.observe(started.elapsed().as_secs_f64());
            }
            tracing::info!(pod = %format!("{}/{}", req.namespace, req.name), command = %req.command, result, message = %response.message, "CNI request");
            let _ = reply.send(response);
        }
    }
    tracing::info!("stopped; the table stays in the kernel (node-redirector uninstall removes it)");
    Ok(())
}

/// Publishes what the table `d`, now in the kernel, steers: the gauges, and a log line when the
/// steered addresses without anti-spoofing (their host-side interface is unknown, or a bridge port
/// while the kernel has no bridge family) change; `last` is what was logged before.
fn publish(metrics: &admin::Admin, d: &rules::Desired, last: &mut BTreeSet<std::net::IpAddr>) {
    let now = d.unguarded(routes::is_bridge_port);
    metrics.table(d, now.len());
    if now == *last {
        return;
    }
    if now.is_empty() {
        tracing::info!("every steered Pod address has anti-spoofing on its interface");
    } else {
        tracing::warn!(
            addresses = ?now,
            "steered Pod addresses without anti-spoofing: their host-side interface is unknown (no CNI plugin \
             admission, no host route; restart those Pods so that the CNI plugin admits them, or set \
             pods[].interface), or a bridge port while the kernel has no bridge family"
        );
    }
    *last = now;
}

fn uninstall(config: Option<&std::path::Path>) -> ExitCode {
    let mut ok = true;
    match nft::remove() {
        Ok(()) => println!("tables inet {0} and bridge {0} removed", rules::TABLE),
        Err(e) => {
            eprintln!("error: {e}");
            ok = false;
        }
    }
    if let Some(path) = config {
        let l = match load(path) {
            Ok(l) => l,
            Err(c) => return c,
        };
        if let Some(dir) = &l.config.cni.conf_dir {
            match conflist::uninstall(dir) {
                Ok(files) => files.iter().for_each(|f| println!("CNI plugin entry removed from {}", f.display())),
                Err(e) => {
                    eprintln!("error: {e}");
                    ok = false;
                }
            }
        }
        if let Some(dir) = &l.config.cni.bin_dir {
            let bin = dir.join(cni::PLUGIN_TYPE);
            match std::fs::remove_file(&bin) {
                Ok(()) => println!("{} removed", bin.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    eprintln!("error: {}: {e}", bin.display());
                    ok = false;
                }
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::from(2) }
}

/// After `uninstall`: ready (on the config's `admin` address) and idle until SIGTERM/SIGINT.
fn wait_uninstalled(config: &std::path::Path) -> ExitCode {
    let admin = match load(config) {
        Ok(l) => l.config.admin,
        Err(c) => return c,
    };
    block_on(false, async move {
        let a = Arc::new(admin::Admin::new(&relay::RelayMetrics::default(), &dnsfwd::DnsMetrics::default()));
        a.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(addr) = admin {
            tokio::spawn(a.serve(tokio::net::TcpListener::bind(addr).await?));
        }
        tracing::info!("steering removed from this node; waiting for the DaemonSet's deletion");
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        Ok(())
    })
}

fn install_cni(c: &config::CniConfig) -> ExitCode {
    if let Some(dir) = &c.bin_dir {
        match conflist::install_binary(dir) {
            Ok(p) => println!("CNI plugin installed as {}", p.display()),
            Err(e) => {
                eprintln!("error: cni.binDir: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(dir) = &c.conf_dir else { return ExitCode::SUCCESS };
    match conflist::install(dir, &conflist::entry(&c.socket, c.failure_policy, &c.log_file)) {
        Ok(conflist::Installed::Changed(f)) => println!("CNI plugin added to {}", f.display()),
        Ok(conflist::Installed::Unchanged(f)) => println!("CNI plugin already in {}", f.display()),
        Ok(conflist::Installed::NoPrimary) => {
            println!(
                "no CNI configuration in {} yet; node-redirector run adds the plugin once there is one",
                dir.display()
            )
        }
        Err(e) => {
            eprintln!("error: cni.confDir: {e}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// Records what a CNI request changes in the admissions (the main loop then applies it): `ADD`
/// and `CHECK` need the Pod's labels, from the inputs (watch or file), or from the API on a
/// cache miss (Kubernetes mode), which may fail: the Pod's sandbox is then retried.
async fn admit_request(
    req: &cni::Request,
    inputs: &rules::Inputs,
    client: Option<&kube::Client>,
    admissions: &mut admit::Admissions,
) -> Result<(), String> {
    match req.command.as_str() {
        "DEL" => {
            admissions.remove(&req.container_id);
            Ok(())
        }
        "ADD" | "CHECK" => {
            let known = inputs.pods.iter().find(|p| p.namespace == req.namespace && p.name == req.name).cloned();
            let known = match (known, client) {
                (Some(p), _) => p,
                (None, Some(c)) => k8s::get_pod(c, &req.namespace, &req.name)
                    .await?
                    .ok_or_else(|| format!("Pod {}/{} does not exist", req.namespace, req.name))?,
                // Standalone: a Pod the file does not list has no labels; a policy whose
                // selectors match that still selects it.
                (None, None) => config::PodEntry {
                    namespace: req.namespace.clone(),
                    name: req.name.clone(),
                    node_name: inputs.node_name.clone(),
                    ips: Vec::new(),
                    labels: Default::default(),
                    service_account: None,
                    interface: None,
                    uid: String::new(),
                },
            };
            if req.command == "ADD" {
                let entry = config::PodEntry {
                    node_name: inputs.node_name.clone(),
                    ips: req.ips.clone(),
                    interface: req.interface.clone(),
                    ..known
                };
                admissions.add(&req.container_id, entry);
            }
            Ok(())
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

/// The answer to a request whose effect is in the kernel: whether the Pod is selected, and for
/// `CHECK` whether each of its addresses is steered.
fn cni_response(req: &cni::Request, merged: &rules::Inputs, desired: &rules::Desired) -> cni::Response {
    let pod = merged.pods.iter().find(|p| p.namespace == req.namespace && p.name == req.name);
    let selected = pod.is_some_and(|p| rules::is_selected(merged, p));
    if req.command == "DEL" {
        return cni::Response { ok: true, selected: false, message: "forgotten".into() };
    }
    let missing: Vec<String> =
        req.ips.iter().filter(|ip| !desired.selected.contains(ip)).map(|ip| ip.to_string()).collect();
    match (selected, missing.is_empty()) {
        (true, true) => cni::Response { ok: true, selected, message: "steered: addresses in the kernel's set".into() },
        (true, false) => {
            cni::Response { ok: false, selected, message: format!("selected but not steered: {}", missing.join(", ")) }
        }
        (false, _) => {
            cni::Response { ok: true, selected, message: "no redirect: Transparent policy selects this Pod".into() }
        }
    }
}

/// Watches `dir` (not recursively); every change sends on `tx`.
fn watch_dir(dir: &std::path::Path, tx: tokio::sync::mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|ev| !ev.kind.is_access()) {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the CNI conf dir; the entry is checked at every reconcile"))
    .ok()?;
    if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the CNI conf dir; the entry is checked at every reconcile");
    }
    Some(w)
}

/// Puts the plugin's entry into the node's primary conflist when it is missing (another
/// installer rewrote the file, or the primary CNI wrote its configuration after us).
fn ensure_conflist(c: &config::CniConfig) {
    let Some(dir) = &c.conf_dir else { return };
    match conflist::install(dir, &conflist::entry(&c.socket, c.failure_policy, &c.log_file)) {
        Ok(conflist::Installed::Changed(f)) => {
            tracing::warn!(file = %f.display(), "CNI plugin entry (re)added to the conflist")
        }
        Ok(conflist::Installed::Unchanged(_)) => {}
        Ok(conflist::Installed::NoPrimary) => {
            tracing::warn!(dir = %dir.display(), "no CNI configuration yet; the plugin entry is added once the primary CNI writes one")
        }
        Err(e) => tracing::error!(error = %e, "cannot add the CNI plugin entry"),
    }
}

/// A UDP socket on `[::]:port`, IPv6 only (the IPv4 one is separate).
fn udp_v6only(ip: std::net::Ipv6Addr, port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_only_v6(true)?;
    s.set_nonblocking(true)?;
    s.bind(&std::net::SocketAddr::from((ip, port)).into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// Where steered connections go on this node, fixed for the life of the process:
/// `relay.addresses`, else the addresses found on the node (see `routes::node_addresses`). The
/// DNS forwarder's UDP sockets are bound to them, so that its answers leave from the address the
/// queries were sent to (conntrack then gives them back the resolver's address).
fn relay_addresses(c: &config::Config) -> rules::RelayTo {
    let mut r = if c.relay.addresses.is_empty() { routes::node_addresses() } else { rules::RelayTo::default() };
    for a in &c.relay.addresses {
        match a {
            std::net::IpAddr::V4(x) => r.v4 = Some(*x),
            std::net::IpAddr::V6(x) => r.v6 = Some(*x),
        }
    }
    tracing::info!(ipv4 = ?r.v4, ipv6 = ?r.v6, "steered connections are sent to these node addresses");
    if r.v4.is_none() {
        tracing::warn!(
            "no IPv4 address to send steered connections to (relay.addresses): they are redirected to the \
             address of the interface they arrive on, and dropped where that interface has none"
        );
    }
    r
}

fn socket_v6only(s: tokio::net::TcpSocket) -> std::io::Result<tokio::net::TcpSocket> {
    socket2::SockRef::from(&s).set_only_v6(true)?;
    s.set_reuseaddr(true)?;
    Ok(s)
}
