use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use lb_operator::settings::{LeaseSettings, Settings};

/// Registers UniMRCP server pods (MrcpServer resources) with every lb-proxy replica.
#[derive(Parser)]
#[command(name = "lb-operator", version)]
struct Cli {
    /// Watch MrcpServers and pods in this namespace only (default: all namespaces).
    #[arg(long, env = "LB_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Watch only the pods this label selector selects, e.g. "mrcp-lb.io/server" (pods that
    /// carry the label) or "app in (unimrcp,unimrcp-tts)": the API server filters, so other
    /// pods cost the operator nothing. Pods it leaves out never become destinations, whatever
    /// the MrcpServers select. Default: every pod (of --namespace), kept in memory cut down
    /// to the fields the operator reads.
    #[arg(long, env = "LB_OPERATOR_POD_SELECTOR")]
    pod_selector: Option<String>,
    /// Take only the MrcpServers whose spec.className is NAME (default: only those without a
    /// className), so that several releases or tenants never register each other's servers.
    #[arg(long = "class", value_name = "NAME", env = "LB_OPERATOR_CLASS")]
    class: Option<String>,
    /// Label selector of the lb-proxy pods, e.g. "app.kubernetes.io/component=proxy".
    #[arg(long, env = "LB_OPERATOR_PROXY_SELECTOR")]
    proxy_selector: Option<String>,
    /// Namespace of the lb-proxy pods (default: all namespaces).
    #[arg(long, env = "LB_OPERATOR_PROXY_NAMESPACE")]
    proxy_namespace: Option<String>,
    /// Admin port of the lb-proxy pods.
    #[arg(long, default_value_t = 8081, env = "LB_OPERATOR_PROXY_ADMIN_PORT")]
    proxy_admin_port: u16,
    /// A proxy admin URL to push to besides the discovered ones (repeatable), e.g.
    /// http://127.0.0.1:8081.
    #[arg(
        long = "proxy-url",
        env = "LB_OPERATOR_PROXY_URLS",
        value_delimiter = ','
    )]
    proxy_urls: Vec<String>,
    /// UDP port of the proxies' cluster listener (`cluster.listen`). Every pushed set lists
    /// each proxy replica at <IP>:<port> as the `peers` the replicas share their load with
    /// (discovered pods at their pod IP, --proxy-url proxies at the IP of their URL). 0: push
    /// no peer list; the proxies keep the `cluster.peers` of their config files.
    #[arg(long, default_value_t = 7070, env = "LB_OPERATOR_PROXY_CLUSTER_PORT")]
    proxy_cluster_port: u16,
    /// Reach the discovered proxies' admin API over HTTPS (their `admin.tls`).
    #[arg(long, env = "LB_OPERATOR_PROXY_TLS")]
    proxy_tls: bool,
    /// With --proxy-tls: the CA (PEM) the proxies' admin certificates chain to (default: the
    /// system's roots).
    #[arg(long, env = "LB_OPERATOR_PROXY_CA_FILE")]
    proxy_ca_file: Option<PathBuf>,
    /// With --proxy-tls: the name the proxies' admin certificates carry (e.g. the admin
    /// Service's DNS name), checked instead of the pod IP the operator connects to.
    #[arg(long, env = "LB_OPERATOR_PROXY_TLS_SERVER_NAME")]
    proxy_tls_server_name: Option<String>,
    /// File with the proxies' admin bearer token.
    #[arg(long, env = "LB_OPERATOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "LB_OPERATOR_LISTEN")]
    listen: SocketAddr,
    /// Push the set to every proxy at least this often (seconds), so a proxy that restarted
    /// catches up.
    #[arg(long, default_value_t = 10, env = "LB_OPERATOR_RESYNC_SECONDS")]
    resync_seconds: u64,
    /// Read every proxy's live load (GET /v1/destinations) this often (seconds) for the
    /// MrcpServer statuses' per-resource load; a status changes for load at most this often.
    /// 0: never read (the statuses show capacity only).
    #[arg(long, default_value_t = 5, env = "LB_OPERATOR_LOAD_INTERVAL_SECONDS")]
    load_interval_seconds: u64,
    /// Elect a leader with this Lease (for several operator replicas).
    #[arg(long, env = "LB_OPERATOR_LEASE_NAME")]
    lease_name: Option<String>,
    /// Namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log filter, e.g. "info" or "lb_operator=debug" (overrides RUST_LOG).
    #[arg(long, env = "LB_OPERATOR_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format: pretty or json.
    #[arg(long, default_value = "pretty", value_parser = ["pretty", "json"], env = "LB_OPERATOR_LOG_FORMAT")]
    log_format: String,
}

fn main() -> ExitCode {
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
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        sub.json().init();
    } else {
        sub.init();
    }
    let token = match &cli.token_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                eprintln!(
                    "lb-operator: --token-file {}: the file is empty",
                    p.display()
                );
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("lb-operator: --token-file {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    for u in &cli.proxy_urls {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            eprintln!("lb-operator: --proxy-url {u:?} must start with http:// or https://");
            return ExitCode::from(2);
        }
    }
    if let Some(c) = &cli.class {
        if !lb_operator::settings::valid_class(c) {
            eprintln!(
                "lb-operator: --class {c:?} must be 1 to 63 lower-case letters, digits or '-', \
                 starting and ending with a letter or digit (as spec.className)"
            );
            return ExitCode::from(2);
        }
    }
    if cli
        .pod_selector
        .as_deref()
        .is_some_and(|s| s.trim().is_empty())
    {
        eprintln!("lb-operator: --pod-selector is empty (leave it out to watch every pod)");
        return ExitCode::from(2);
    }
    let lease = match &cli.lease_name {
        Some(name) => {
            let Some(identity) = cli.identity.clone() else {
                eprintln!("lb-operator: --lease-name needs --identity (or POD_NAME)");
                return ExitCode::from(2);
            };
            Some(LeaseSettings {
                name: name.clone(),
                namespace: cli
                    .lease_namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                identity,
            })
        }
        None => None,
    };
    let settings = Settings {
        namespace: cli.namespace,
        pod_selector: cli.pod_selector,
        class: cli.class,
        proxy_selector: cli.proxy_selector,
        proxy_namespace: cli.proxy_namespace,
        proxy_admin_port: cli.proxy_admin_port,
        proxy_urls: cli
            .proxy_urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect(),
        proxy_cluster_port: (cli.proxy_cluster_port != 0).then_some(cli.proxy_cluster_port),
        token,
        listen: cli.listen,
        resync: Duration::from_secs(cli.resync_seconds.max(1)),
        lease,
        load_interval: (cli.load_interval_seconds != 0)
            .then(|| Duration::from_secs(cli.load_interval_seconds)),
        proxy_tls: cli.proxy_tls.then(|| lb_operator::proxy_http::ProxyTls {
            ca_file: cli.proxy_ca_file.clone(),
            server_name: cli.proxy_tls_server_name.clone().filter(|n| !n.is_empty()),
        }),
    };
    if !cli.proxy_tls && (cli.proxy_ca_file.is_some() || cli.proxy_tls_server_name.is_some()) {
        eprintln!("lb-operator: --proxy-ca-file and --proxy-tls-server-name need --proxy-tls");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb-operator: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("lb-operator: no Kubernetes client (kubeconfig or in-cluster): {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            s.cancel();
        });
        match lb_operator::run::run(settings, client, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-operator: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
