//! `outflow-collector`: receives per-connection byte deltas from outflow agents over gRPC,
//! aggregates them across the fleet, and answers queries; `top` and `client` ask a running
//! collector.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use outflow_collector::{
    client::{self, ClientOptions},
    cluster::{config::NodeRole, permissions},
    config::{Config, DEFAULT_CONFIG_PATH},
    server::Server,
    systemd,
};
use outflow_proto::v1;
use tokio::signal::unix::{SignalKind, signal};

/// mimalloc, not glibc's malloc: the ingest path allocates per delta on the gRPC workers
/// (prost's decode, the folded batch) and frees on the store writer's thread, and glibc's malloc
/// and free took a third of the workers' CPU there (BENCHMARKS.md, "mimalloc measured again").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The outflow collector: agents stream per-connection byte counts to it over gRPC; it
/// aggregates response and request bytes per client address, client prefix, host, workload,
/// client id and TCP peer in rolling 1m/10m/1h/24h windows of batch time, and answers queries.
///
/// Without a subcommand (or with `run`) it serves: gRPC (outflow.v1.Ingest and Query, health,
/// reflection) on --listen [default: [::]:7411], Prometheus metrics on --metrics-listen
/// [default: 127.0.0.1:9411] at /metrics, with /healthz (200 while running) and /readyz (200
/// once the store is open and gRPC serves, 503 while starting and stopping), data in
/// --data-dir [default: /var/lib/outflow-collector]. Settings come from a TOML file (--config,
/// else /etc/outflow/collector.toml if it exists), overridden by flags; `print-config` shows
/// the result. Under systemd (Type=notify) it sends READY=1 once ready, WATCHDOG=1 while its
/// store writer keeps up (WatchdogSec=) and STOPPING=1; SIGTERM/SIGINT stop it cleanly.
///
/// `top` and `client` ask a running collector and print a table; `top --watch` keeps it live.
#[derive(Parser, Debug)]
#[command(
    name = "outflow-collector",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve (the default)
    Run(ServeArgs),
    /// Print the effective configuration as TOML and exit
    PrintConfig(ServeArgs),
    /// Print the NATS permissions a cluster node of this role needs (for its `[cluster]`
    /// stream and subject prefix): a `permissions { ... }` block for its user in the servers'
    /// authorization, and the `nsc edit user` flags for operator mode; then exit
    NatsPermissions(ServeArgs),
    /// Show the keys with the most response bytes in a window
    Top(TopArgs),
    /// Show one client address, prefix or client id in every window
    Client(ClientArgs),
    /// Show the alerts, open ones first
    Alerts(AlertsArgs),
}

#[derive(Args, Debug, Clone, Default)]
struct ServeArgs {
    /// TOML config file [default: /etc/outflow/collector.toml, if it exists]
    #[arg(long, short = 'c', env = "OUTFLOW_COLLECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address [default: [::]:7411]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address of /metrics, /healthz and /readyz [default: 127.0.0.1:9411]
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Directory of the database [default: /var/lib/outflow-collector]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// File with the bearer token agents and query clients must send
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM certificate chain: serve TLS
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA: require client certificates signed by it (mTLS)
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Largest accepted gRPC message, bytes [default: 16777216]
    #[arg(long, value_name = "BYTES")]
    max_message_bytes: Option<usize>,
    /// Push OpenTelemetry metrics (the top clients' bytes, alert counts) over OTLP/gRPC to this
    /// receiver, e.g. http://otel-collector:4317 (the rest of it: `[otlp]` in the config file)
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// What this process does: `standalone` (the whole collector, the default), `ingest` (take
    /// agents' streams and publish them to NATS JetStream) or `aggregator` (apply a share of
    /// the partitions from JetStream); every cluster node answers Query and Alerts for the
    /// whole cluster; the rest of it: `[cluster]` in the config file
    #[arg(long, value_name = "ROLE", value_parser = ["standalone", "ingest", "aggregator"])]
    role: Option<String>,
    /// A NATS server of the JetStream cluster, e.g. nats://10.0.0.5:4222 (repeat for more; in
    /// place of `cluster.nats_urls`)
    #[arg(long = "nats-url", value_name = "URL")]
    nats_urls: Vec<String>,
}

impl ServeArgs {
    fn config(&self) -> Result<Config> {
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut c = Config::load(&path, explicit)?;
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.metrics_listen {
            c.metrics_listen = v;
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.token_file {
            c.auth.token_file = Some(v.clone());
        }
        if let Some(v) = &self.tls_cert {
            c.tls.cert = Some(v.clone());
        }
        if let Some(v) = &self.tls_key {
            c.tls.key = Some(v.clone());
        }
        if let Some(v) = &self.tls_client_ca {
            c.tls.client_ca = Some(v.clone());
        }
        if let Some(v) = self.max_message_bytes {
            c.limits.max_message_bytes = v;
        }
        if let Some(v) = &self.otlp_endpoint {
            c.otlp.endpoint = Some(v.clone());
        }
        match self.role.as_deref() {
            Some("ingest") => c.cluster.role = NodeRole::Ingest,
            Some("aggregator") => c.cluster.role = NodeRole::Aggregator,
            Some(_) => c.cluster.role = NodeRole::Standalone,
            None => {}
        }
        if !self.nats_urls.is_empty() {
            c.cluster.nats_urls = self.nats_urls.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

/// How to reach a running collector.
#[derive(Args, Debug, Clone)]
struct ConnArgs {
    /// Collector URL: http://HOST:PORT or https://HOST:PORT
    #[arg(
        long,
        short = 's',
        env = "OUTFLOW_COLLECTOR_SERVER",
        default_value = "http://localhost:7411"
    )]
    server: String,
    /// File with the bearer token
    #[arg(long, value_name = "FILE", env = "OUTFLOW_COLLECTOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA of the collector's certificate (https)
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// PEM client certificate (mTLS)
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// PEM key of --cert
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Server name to verify the certificate against [default: the URL's host]
    #[arg(long)]
    domain: Option<String>,
    /// Print exact byte counts instead of KiB/MiB/GiB
    #[arg(long)]
    exact: bool,
}

impl ConnArgs {
    fn options(&self) -> ClientOptions {
        ClientOptions {
            server: self.server.clone(),
            token_file: self.token_file.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            domain: self.domain.clone(),
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum GroupArg {
    /// The client (attributed by the agent, else the TCP peer)
    ClientAddress,
    /// The client's /24 or /64
    ClientPrefix,
    /// The host that served the bytes
    Host,
    /// Host, cgroup and process name of the server
    Workload,
    /// The client id agents sent
    ClientId,
    /// The TCP peer: gateways, whoever the clients behind them
    Peer,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum WindowArg {
    #[value(name = "1m")]
    M1,
    #[value(name = "10m")]
    M10,
    #[value(name = "1h")]
    H1,
    #[value(name = "24h")]
    H24,
}

#[derive(Args, Debug)]
struct TopArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// What to group response bytes by
    #[arg(long, short = 'g', value_enum, default_value = "client-prefix")]
    group_by: GroupArg,
    /// The window
    #[arg(long, short = 'w', value_enum, default_value = "1h")]
    window: WindowArg,
    /// How many keys (1 to 1000)
    #[arg(long, short = 'n', default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// A live view: the table and the open alerts, asked again every --interval; keys: g/G
    /// grouping, w/W window, r refresh, q quit
    #[arg(long)]
    watch: bool,
    /// How often --watch asks, e.g. 2s, 500ms
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration, requires = "watch")]
    interval: Duration,
}

#[derive(Args, Debug)]
struct ClientArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Client address (203.0.113.7, 2001:db8::7), prefix (203.0.113.0/24, 2001:db8::/64) or
    /// client id (h:0123..., or id:ID for an id that looks like an address)
    client: String,
}

#[derive(Args, Debug)]
struct AlertsArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Only open alerts
    #[arg(long)]
    open: bool,
    /// Service alerts too (workload volume changes, marked `service`); by default only alerts
    /// that name a client are listed
    #[arg(long)]
    service: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    // A bug must still end in one line, not a trace.
    std::panic::set_hook(Box::new(|p| {
        eprintln!("error: internal error: {p} (please report this)");
    }));
    let cli = Cli::parse();
    if let Err(e) = outflow_collector::crash::arm_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => serve(&cli.serve),
        Some(Command::Run(a)) => serve(&a),
        Some(Command::PrintConfig(a)) => {
            print!("{}", a.config()?.to_toml());
            Ok(())
        }
        Some(Command::NatsPermissions(a)) => nats_permissions(&a),
        Some(Command::Top(a)) => runtime()?.block_on(top(a)),
        Some(Command::Client(a)) => runtime()?.block_on(client(a)),
        Some(Command::Alerts(a)) => runtime()?.block_on(alerts(a)),
    }
}

fn nats_permissions(args: &ServeArgs) -> Result<()> {
    let cfg = args.config()?;
    let Some(p) = permissions::for_node(&cfg.cluster) else {
        bail!(
            "a standalone collector does not use NATS: give the node's role (--role ingest or \
             --role aggregator, or cluster.role in the config file)"
        );
    };
    let role = cfg.cluster.role.as_str();
    println!(
        "# The NATS permissions of an outflow-collector {role} node (stream {}, subjects {}.*).\n\
         # In the servers' authorization: this block in the node's user.",
        cfg.cluster.stream, cfg.cluster.subject_prefix
    );
    print!("{}", p.server_config());
    println!(
        "# In operator mode: nsc edit user --name <the node's user> {}",
        p.nsc_flags()
    );
    Ok(())
}

fn serve(args: &ServeArgs) -> Result<()> {
    let cfg = args.config()?;
    runtime()?.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
        let server = Server::start(cfg).await?;
        systemd::ready();
        // Ends when the shutdown starts.
        let watchdog = systemd::spawn_watchdog(server.collector(), server.shutdown_token());
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = server.stopped() => {}
        }
        systemd::stopping();
        server.shutdown().await?;
        if let Some(w) = watchdog {
            let _ = w.await;
        }
        Ok(())
    })
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn group_of(g: GroupArg) -> (v1::GroupBy, &'static str) {
    match g {
        GroupArg::ClientAddress => (v1::GroupBy::ClientAddress, "client-address"),
        GroupArg::ClientPrefix => (v1::GroupBy::ClientPrefix, "client-prefix"),
        GroupArg::Host => (v1::GroupBy::Host, "host"),
        GroupArg::Workload => (v1::GroupBy::Workload, "workload"),
        GroupArg::ClientId => (v1::GroupBy::ClientId, "client-id"),
        GroupArg::Peer => (v1::GroupBy::Peer, "peer"),
    }
}

fn window_of(w: WindowArg) -> (v1::Window, &'static str) {
    match w {
        WindowArg::M1 => (v1::Window::Window1m, "1m"),
        WindowArg::M10 => (v1::Window::Window10m, "10m"),
        WindowArg::H1 => (v1::Window::Window1h, "1h"),
        WindowArg::H24 => (v1::Window::Window24h, "24h"),
    }
}

async fn top(a: TopArgs) -> Result<()> {
    if a.watch {
        use outflow_collector::watch::{self, GROUPS, View, WINDOWS};
        let view = View {
            group: GROUPS
                .iter()
                .position(|(g, _)| *g == group_of(a.group_by).0)
                .unwrap_or(0),
            window: WINDOWS
                .iter()
                .position(|(w, _)| *w == window_of(a.window).0)
                .unwrap_or(0),
            limit: a.limit,
            interval: a.interval.max(Duration::from_millis(100)),
            exact: a.conn.exact,
        };
        return Ok(watch::run(&a.conn.options(), view).await?);
    }
    let mut q = client::query_client(&a.conn.options()).await?;
    let (group, group_name) = group_of(a.group_by);
    let (window, window_name) = window_of(a.window);
    let r = q
        .top_talkers(v1::TopTalkersRequest {
            group_by: group as i32,
            window: window as i32,
            limit: a.limit,
        })
        .await
        .map_err(status)?
        .into_inner();
    print!(
        "{}",
        client::top_table(group_name, window_name, &r, a.conn.exact)
    );
    Ok(())
}

async fn client(a: ClientArgs) -> Result<()> {
    let mut q = client::query_client(&a.conn.options()).await?;
    let r = q
        .client_stats(v1::ClientStatsRequest {
            client: a.client.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    print!("{}", client::client_table(&r, a.conn.exact));
    Ok(())
}

async fn alerts(a: AlertsArgs) -> Result<()> {
    let mut c = client::alerts_client(&a.conn.options()).await?;
    let r = c
        .list(v1::ListAlertsRequest {
            open_only: a.open,
            limit: 0,
            include_service: a.service,
        })
        .await
        .map_err(status)?
        .into_inner();
    print!("{}", client::alerts_table(&r, a.conn.exact));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_the_file() {
        let dir =
            std::env::temp_dir().join(format!("outflow-collector-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\ndata_dir = \"/a\"\n").unwrap();
        let cli = Cli::try_parse_from([
            "outflow-collector",
            "print-config",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:2",
        ])
        .unwrap();
        let Some(Command::PrintConfig(a)) = cli.command else {
            panic!("{cli:?}")
        };
        let c = a.config().unwrap();
        assert_eq!(c.listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/a"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
