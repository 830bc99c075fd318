//! The `egress-gateway` binary: thin CLI over the library.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use egress_gateway::config;

/// mimalloc instead of glibc's malloc: a proxy allocates and frees small objects per request
/// (hyper's messages, events, futures) from several threads, where glibc's arenas spend ~7% of
/// a keep-alive request's CPU (bench/cpu-ab.sh, perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Decide as for a client whose identity a credential proved (a token, an
        /// identity-bearing SOCKS5 user): the Allow rules of `identity: Verified` policies apply.
        #[arg(long)]
        verified: bool,
        /// `http://host/path`, `https://host` or `host:port`.
        target: String,
    },
    /// Validate the configuration and every policy document; print every error.
    Validate {
        /// The YAML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain and the signed checkpoints of egress.v1 JSON lines (a `json` sink's
    /// files or the spool's segments, in order); report the first broken or missing sequence
    /// number. Exit 0 intact, 1 broken, 2 error.
    Verify {
        /// Ed25519 public key (PEM) of the checkpoint signer; without it checkpoints are not checked.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Files in order (oldest first).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// What happened, per workload and per policy, from egress.v1 events: decisions by reason,
    /// top (denied) destinations, bytes, busiest hours, guard refusals, DNS failures.
    Report {
        /// `text` (default) or `html` (one self-contained page with SVG charts).
        #[arg(long, default_value = "text", value_parser = ["text", "html"])]
        format: String,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// egress.v1 JSON lines: files, rotated files, `.gz`, or `-` for stdin.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Write least-privilege EgressPolicy documents from observed traffic: one per workload,
    /// allowing exactly what its egress.v1 decision events show (Audit-mode rollouts included).
    Suggest {
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only events of the last DURATION (e.g. 24h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Leave out destinations seen fewer times (listed in a comment).
        #[arg(long, default_value_t = 1)]
        min_count: u64,
        /// Distinct names directly under one parent that make a `*.parent` wildcard (never for a
        /// public suffix).
        #[arg(long, default_value_t = 3)]
        wildcard_min: usize,
        /// Add HTTP method and path constraints for destinations only ever reached by plain HTTP.
        #[arg(long)]
        http_rules: bool,
        /// egress.v1 JSON lines: files, rotated files, `.gz`, or `-` for stdin.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn load(path: &std::path::Path) -> Result<config::Loaded, ExitCode> {
    reported(config::load(path))
}

/// Prints a load's errors (exit 2).
fn reported(r: Result<config::Loaded, config::ConfigErrors>) -> Result<config::Loaded, ExitCode> {
    r.map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    // Fault injection of the crash tests (`FAILPOINTS`); absent from release builds.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    // `run` logs in the format its configuration asks for, so it starts logging once loaded.
    if !matches!(cli.command, Command::Run { .. }) {
        egress_log::init(egress_log::Format::Text, &[]);
    }
    match cli.command {
        Command::Audit { command: AuditCommand::Verify { public_key, files } } => audit_verify(public_key, files),
        Command::Audit { command: AuditCommand::Report { format, out, files } } => audit_report(&format, out, &files),
        Command::Audit {
            command: AuditCommand::Suggest { namespace, since, min_count, wildcard_min, http_rules, files },
        } => {
            let since = since
                .and_then(|d| std::time::SystemTime::now().checked_sub(d))
                .map(|t| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0));
            let opts = egress_gateway::suggest::Options { namespace, since, min_count, wildcard_min, http_rules };
            match egress_gateway::suggest::read_events(&files) {
                Ok((events, skipped)) => {
                    if skipped > 0 {
                        eprintln!("warning: {skipped} lines are not JSON events and were skipped");
                    }
                    print!("{}", egress_gateway::suggest::suggest(&events, &opts));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Validate { config } => match load(&config) {
            Ok(l) => {
                println!("{}: ok ({} policies)", config.display(), l.policies.len());
                ExitCode::SUCCESS
            }
            Err(c) => c,
        },
        Command::Check { config, client, method, no_resolve, verified, target } => {
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
            match rt.block_on(egress_gateway::check::check(
                loaded,
                client,
                verified,
                method.as_deref(),
                &target,
                !no_resolve,
            )) {
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
            let loaded = match reported(config::load_with_secrets(&config)) {
                Ok(l) => l,
                Err(c) => return c,
            };
            egress_log::init(loaded.config.log.format, &[]);
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

fn audit_verify(public_key: Option<PathBuf>, files: Vec<PathBuf>) -> ExitCode {
    use egress_gateway::audit::chain;
    let key = match public_key.map(|p| chain::Verifier::load(&p)).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let mut lines = Vec::new();
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(text) => {
                for (i, l) in text.lines().enumerate() {
                    lines.push((format!("{}:{}", f.display(), i + 1), l.to_string()));
                }
            }
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    }
    let r = chain::verify(&lines, key.as_ref());
    for (instance, from, to) in &r.declared_gaps {
        println!("declared gap: instance {instance} seq {from}..={to} lost (audit_gap)");
    }
    match r.problem {
        Some(p) => {
            println!("BROKEN: {p}");
            println!("{} events verified before it", r.events);
            ExitCode::from(1)
        }
        None => {
            if r.duplicates > 0 {
                println!(
                    "skipped {} exact duplicates of events already checked (redelivered after a restart: at-least-once delivery)",
                    r.duplicates
                );
            }
            println!(
                "ok: {} events, hash chain intact; {} checkpoints verified{}; {} events after the last verified checkpoint",
                r.events,
                r.checkpoints_verified,
                if r.checkpoints_unverified > 0 {
                    format!(", {} not checked (no --public-key)", r.checkpoints_unverified)
                } else {
                    String::new()
                },
                r.unsigned_tail
            );
            ExitCode::SUCCESS
        }
    }
}

/// `audit report`: the report of `files` as `format`, to `out` or standard output.
fn audit_report(format: &str, out: Option<PathBuf>, files: &[PathBuf]) -> ExitCode {
    let (events, skipped) = match egress_gateway::suggest::read_events(files) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if skipped > 0 {
        eprintln!("warning: {skipped} lines are not JSON events and were skipped");
    }
    let r = egress_gateway::report::build(&events);
    let text = if format == "html" { r.html() } else { r.text() };
    match out {
        Some(path) => match std::fs::write(&path, text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                ExitCode::from(2)
            }
        },
        None => {
            print!("{text}");
            ExitCode::SUCCESS
        }
    }
}
