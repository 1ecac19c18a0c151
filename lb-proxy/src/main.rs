use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// Least-loaded SIP load balancer for UniMRCP (MRCPv2) servers.
#[derive(Parser)]
#[command(name = "lb-proxy", version)]
struct Cli {
    /// YAML configuration file.
    #[arg(long, short, env = "LB_PROXY_CONFIG")]
    config: PathBuf,
    /// Advertised `host:port` (or a host: each listener's own port) for Via and Record-Route,
    /// overriding the file's `advertise`.
    #[arg(long, env = "LB_PROXY_ADVERTISE")]
    advertise: Option<String>,
    /// `ip:port` of the admin API, overriding the file's `admin.listen` (the chart passes the
    /// pod IP: `$(POD_IP):8081`; a bare IPv6 address before the port is accepted).
    #[arg(long, env = "LB_PROXY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Log level or filter (overrides RUST_LOG), e.g. "info" or "lb_proxy=debug".
    #[arg(long, env = "LB_PROXY_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format: "pretty" for terminals, "json" for clusters.
    #[arg(long, default_value = "pretty", value_parser = ["pretty", "json"], env = "LB_PROXY_LOG_FORMAT")]
    log_format: String,
}

fn main() -> ExitCode {
    let code = run();
    lb_proxy::logging::flush();
    code
}

fn run() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log_level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Colour only on a terminal: escape codes in log files cost time and garble them.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(lb_proxy::logging::Buffered::install());
    if cli.log_format == "json" {
        sub.json().init();
    } else {
        sub.init();
    }
    let overrides = lb_proxy::config::Overrides {
        advertise: cli.advertise.clone().filter(|a| !a.is_empty()),
        admin_listen: cli.admin_listen.clone().filter(|a| !a.is_empty()),
    };
    let cfg = match lb_proxy::config::Config::load_with(&cli.config, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "lb-proxy: invalid configuration {}: {e}",
                cli.config.display()
            );
            return ExitCode::from(2);
        }
    };
    // The files the configuration names (TLS material) are read here, once, for the check and
    // for the run alike.
    let prepared = match lb_proxy::runtime::prepare(cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "lb-proxy: invalid configuration {}: {e}",
                cli.config.display()
            );
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!("configuration {} is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb-proxy: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let drain_period = prepared.config().shutdown_drain;
        let reload = Some((cli.config.clone(), overrides.clone()));
        let running = match lb_proxy::runtime::start_prepared(prepared, reload).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("lb-proxy: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = running.shutdown.clone();
        let handle = running.handle.clone();
        let mut done = running.done;
        tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("SIGTERM: draining for up to {drain_period:?} (a second signal stops at once)");
                tokio::select! {
                    _ = handle.drain(drain_period) => {}
                    _ = shutdown_signal() => tracing::warn!("second signal: stopping now"),
                }
                shutdown.cancel();
            }
            _ = &mut done => {}
        }
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
