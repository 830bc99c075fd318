//! The `egress-gateway` binary: thin CLI over the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use egress_gateway::config;

/// Kubernetes egress gateway: explicit HTTP/CONNECT and SOCKS5 proxy with domain policy,
/// a built-in metadata/internal-range guard and an audit event for every decision.
#[derive(Parser)]
#[command(name = "egress-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The YAML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Decide one request offline and print the verdict as JSON (exit 0 allowed, 1 denied, 2 error).
    Check {
        /// The YAML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The client's source address.
        #[arg(long)]
        client: IpAddr,
        /// HTTP method for http:// targets (default GET).
        #[arg(long)]
        method: Option<String>,
        /// Do not resolve names (the guard then sees only IP-literal targets).
        #[arg(long)]
        no_resolve: bool,
        /// `http://host/path`, `https://host` or `host:port`.
        target: String,
    },
    /// Validate the configuration and every policy document; print every error.
    Validate {
        /// The YAML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<config::Loaded, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("EGRESS_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    match cli.command {
        Command::Validate { config } => match load(&config) {
            Ok(l) => {
                println!("{}: ok ({} policies)", config.display(), l.policies.len());
                ExitCode::SUCCESS
            }
            Err(c) => c,
        },
        Command::Check { config, client, method, no_resolve, target } => {
            let loaded = match load(&config) {
                Ok(l) => l,
                Err(c) => return c,
            };
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match rt.block_on(egress_gateway::check::check(loaded, client, method.as_deref(), &target, !no_resolve)) {
                Ok((json, allowed)) => {
                    println!("{json}");
                    if allowed { ExitCode::SUCCESS } else { ExitCode::from(1) }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config } => {
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
            match rt.block_on(egress_gateway::server::run(loaded)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
