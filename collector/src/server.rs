//! The running collector: gRPC (Ingest, Query, health, reflection) and `/metrics` (with
//! `/healthz` and `/readyz`), with a graceful stop.
//!
//! Start order: both addresses are bound, then the metrics server answers (`/readyz` 503)
//! while the store opens and loads, then gRPC serves, and only then is the collector ready
//! (`/readyz` 200, `outflow_collector_ready` 1). A stop makes it not ready first, drains gRPC
//! and closes the store, and stops the metrics server last.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use outflow_collector::{config::Config, server::Server};
//! let config = Config {
//!     listen: "127.0.0.1:0".parse()?,
//!     metrics_listen: "127.0.0.1:0".parse()?,
//!     data_dir: "/tmp/outflow-test".into(),
//!     ..Config::default()
//! };
//! let server = Server::start(config).await?;
//! println!("gRPC on {}, metrics on {}", server.addr(), server.metrics_addr());
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use log::{error, info, warn};
use outflow_proto::v1::{
    aggregator_query_server::AggregatorQueryServer, alerts_server::AlertsServer,
    feed_server::FeedServer, query_server::QueryServer,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    alerts_service::AlertsService,
    auth::{self, Auth, AuthError, ClientCerts, Role},
    cluster::{
        aggregator_query::AggregatorQueryService,
        config::NodeRole,
        delivered::DeliveryLog,
        fleet_query::{Fleet, FleetAlertsService, FleetQueryService},
        holdings::Holdings,
        ingest::ClusterIngest,
    },
    collector::{Collector, OpenError},
    config::{Config, ConfigError},
    dashboard::Dashboard,
    feed_service::FeedService,
    ingest::IngestService,
    metrics::{self, Metrics},
    query::QueryService,
    sinks::{otlp, webhook},
    top_clients::TopClients,
};

/// Names of the services reported SERVING by gRPC health checking.
pub const SERVICES: [&str; 4] = [
    "outflow.v1.Ingest",
    "outflow.v1.Query",
    "outflow.v1.Alerts",
    "outflow.v1.Feed",
];
/// How long a stop waits for streams and connections to end before cutting them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    #[error(transparent)]
    Otlp(#[from] otlp::OtlpError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot listen on {addr} ({what}): {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS setup")]
    Tls(#[source] tonic::transport::Error),
    #[error("the gRPC server ended before serving: {0}")]
    NotServing(String),
    #[error("the store cannot be opened: {0}")]
    OpenTask(tokio::task::JoinError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::publish::PublishError),
    #[error("aggregator: {0}")]
    Aggregator(#[from] crate::cluster::aggregator::AggregatorError),
    #[error("cluster queries: {0}")]
    Fleet(#[from] crate::cluster::fleet_query::FleetError),
    #[error("the webhook's delivery records: {0}")]
    Delivered(#[source] crate::cluster::membership::MembershipError),
}

/// The gRPC server failed while running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server")]
    Grpc(#[source] tonic::transport::Error),
    #[error("gRPC server task: {0}")]
    Task(tokio::task::JoinError),
}

/// A running collector.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    collector: Arc<Collector>,
    shutdown: CancellationToken,
    /// Stops the metrics server, after the rest.
    http_stop: CancellationToken,
    health: HealthReporter,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics: JoinHandle<std::io::Result<()>>,
    /// The OTLP exporter and what stops it (after the store has applied everything, so that
    /// its last push has the final values).
    otlp: Option<(JoinHandle<()>, CancellationToken)>,
    /// An aggregator's consumer tasks (they end at the stop, before the store closes).
    consumers: Vec<JoinHandle<()>>,
    /// An aggregator's file saying it stopped cleanly, written once the store is closed.
    clean_stop: Option<std::path::PathBuf>,
}

impl Server {
    /// Validates `config`, opens the store, binds both addresses and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        let aggregator = config.cluster.role == NodeRole::Aggregator;
        let config = if aggregator {
            // Agents were rate-limited and their clocks checked by the ingest nodes.
            let mut c = config;
            c.limits.batches_per_second = 0.0;
            c.limits.deltas_per_second = 0.0;
            c.limits.max_clock_skew = Duration::ZERO;
            c
        } else {
            config
        };
        let tokens = Arc::new(auth::Tokens::load(&config.auth)?);
        let tls = auth::server_tls(&config.tls)?;
        let otlp = otlp::Otlp::new(&config.otlp)?;
        let mut metrics = Metrics::new();
        let top_clients = if config.metrics.top_clients > 0 {
            let top = TopClients::new(config.metrics.top_clients, config.metrics.window()?);
            metrics.register_collector(Box::new(top.clone()));
            Some(top)
        } else {
            None
        };
        let metrics = Arc::new(metrics);
        let certs = ClientCerts::of(&config.tls);
        let ingest_auth = Auth::new(tokens.clone(), Role::Ingest, certs, metrics.clone());
        let auth = Auth::new(tokens.clone(), Role::Read, certs, metrics.clone());
        if config.auth.token_file.is_some() {
            info!(
                "auth.token_file: one token may ingest under any agent id and read; auth.agent_tokens_file and auth.read_token_file keep them apart"
            );
        }

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|error| StartError::Bind {
                what: "listen",
                addr: config.listen,
                error,
            })?;
        let addr = listener.local_addr().map_err(|error| StartError::Bind {
            what: "listen",
            addr: config.listen,
            error,
        })?;
        let metrics_listener = metrics::bind(config.metrics_listen)
            .await
            .map_err(|error| StartError::Bind {
                what: "metrics_listen",
                addr: config.metrics_listen,
                error,
            })?;
        let metrics_addr = metrics_listener
            .local_addr()
            .map_err(|error| StartError::Bind {
                what: "metrics_listen",
                addr: config.metrics_listen,
                error,
            })?;

        // Health and metrics answer while the store loads (not ready yet).
        let http_stop = CancellationToken::new();
        let http_guard = http_stop.clone().drop_guard();
        // The dashboard answers once the store is open (503 before).
        let dashboard = Dashboard::new(tokens.clone(), certs);
        let metrics_task = tokio::spawn(metrics::serve(
            metrics_listener,
            metrics.clone(),
            dashboard.router(),
            http_stop.clone(),
        ));

        if config.cluster.role != NodeRole::Standalone {
            metrics
                .cluster_partitions
                .set(i64::from(config.cluster.partitions));
        }
        let ingest_node = config.cluster.role == NodeRole::Ingest;
        let collector = if ingest_node {
            info!(
                "ingest node: batches go to the JetStream stream {} ({} partitions, {} replicas) at {}",
                config.cluster.stream,
                config.cluster.partitions,
                config.cluster.replicas,
                config.cluster.nats_urls.join(",")
            );
            let ingest = ClusterIngest::connect(&config.cluster, metrics.clone()).await?;
            Collector::open_ingest(&config, metrics.clone(), ingest)
        } else {
            let (config, metrics) = (config.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || Collector::open(&config, metrics))
                .await
                .map_err(StartError::OpenTask)??
        };
        let collector = Arc::new(collector);
        dashboard.attach(&collector);
        if let Some(top) = &top_clients {
            top.attach(&collector);
        }
        let shutdown = CancellationToken::new();
        let shutdown_guard = shutdown.clone().drop_guard();
        let held = Holdings::new(&metrics);
        let consumers = if aggregator {
            let advertise = config.cluster.advertised(addr);
            info!("aggregator: other nodes reach it at {advertise} (cluster.advertise)");
            vec![
                crate::cluster::aggregator::start(
                    collector.clone(),
                    &config.cluster,
                    &config.data_dir,
                    advertise,
                    held.clone(),
                    config.detect.clone(),
                    shutdown.clone(),
                )
                .await?,
            ]
        } else {
            Vec::new()
        };
        // In cluster mode every node answers Query and Alerts for the whole cluster.
        let fleet = if config.cluster.role == NodeRole::Standalone {
            None
        } else {
            Some(Arc::new(
                Fleet::connect(&config.cluster, &config.tls).await?,
            ))
        };

        let (health, health_service) = tonic_health::server::health_reporter();
        for s in SERVICES {
            // An ingest node has no feed of its own (Query and Alerts it fans out).
            let status = if ingest_node && s == "outflow.v1.Feed" {
                ServingStatus::NotServing
            } else {
                ServingStatus::Serving
            };
            health.set_service_status(s, status).await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(outflow_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| {
                // The descriptor sets are compiled in: this cannot fail for a built binary.
                error!("reflection disabled: {e}");
                e
            })
            .ok();

        let ingest = IngestService::new(collector.clone(), shutdown.clone(), &config.limits);
        let local_alerts = AlertsService::new(collector.alerts().clone(), shutdown.clone());
        let (query, fleet_query, alerts, fleet_alerts) = match &fleet {
            None => (
                Some(QueryServer::new(QueryService::new(collector.clone()))),
                None,
                Some(AlertsServer::new(local_alerts.clone())),
                None,
            ),
            Some(f) => (
                None,
                Some(QueryServer::new(FleetQueryService::new(f.clone()))),
                None,
                Some(AlertsServer::new(FleetAlertsService::new(
                    f.clone(),
                    shutdown.clone(),
                ))),
            ),
        };
        let aggregator_query = aggregator.then(|| {
            AggregatorQueryServer::new(AggregatorQueryService::new(
                collector.clone(),
                local_alerts,
                held,
            ))
            .max_encoding_message_size(256 << 20)
        });
        let feed = FeedServer::new(FeedService::new(
            collector.feed().clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let open = auth.is_open();

        // A connection that stops answering pings is dropped; one connection holds at most 64
        // streams and calls at once.
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(Some(64))
            .concurrency_limit_per_connection(64);
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).map_err(StartError::Tls)?;
        }
        let router = builder
            .add_service(health_service)
            .add_optional_service(reflection)
            .add_service(InterceptedService::new(ingest, ingest_auth))
            .add_optional_service(query.map(|q| InterceptedService::new(q, auth.clone())))
            .add_optional_service(fleet_query.map(|q| InterceptedService::new(q, auth.clone())))
            .add_optional_service(alerts.map(|a| InterceptedService::new(a, auth.clone())))
            .add_optional_service(fleet_alerts.map(|a| InterceptedService::new(a, auth.clone())))
            .add_optional_service(
                aggregator_query.map(|a| InterceptedService::new(a, auth.clone())),
            )
            // An ingest node answers UNIMPLEMENTED for the feed, which it does not hold.
            .add_optional_service((!ingest_node).then(|| InterceptedService::new(feed, auth)));
        let (serving_tx, serving) = oneshot::channel();
        let incoming = Serving {
            inner: TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            first: Some(serving_tx),
        };
        let grpc = {
            let token = shutdown.clone();
            tokio::spawn(async move {
                let r = router
                    .serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned())
                    .await;
                // Whatever ended it, the rest of the server stops too.
                token.cancel();
                r
            })
        };
        if let Some(hook) = webhook::Webhook::new(&config.webhook)? {
            // An aggregator judges again what it replays: the cluster remembers what was sent.
            let delivered: Option<Arc<dyn webhook::Delivered>> = if aggregator {
                let log = DeliveryLog::open(&config.cluster)
                    .await
                    .map_err(StartError::Delivered)?;
                Some(Arc::new(log))
            } else {
                None
            };
            info!(
                "alerts are POSTed to {}{}",
                hook.url(),
                if delivered.is_some() {
                    " (each change once for the cluster: a replay does not send it again)"
                } else {
                    ""
                }
            );
            webhook::spawn(
                collector.alerts(),
                hook,
                config.webhook.clone(),
                metrics.clone(),
                delivered,
                shutdown.clone(),
            );
        }
        let otlp = otlp.map(|o| {
            info!(
                "metrics are pushed over OTLP to {} every {}",
                o.endpoint(),
                humantime::format_duration(config.otlp.interval)
            );
            let stop = CancellationToken::new();
            (otlp::spawn(&collector, o, stop.clone()), stop)
        });
        let otlp_guard = otlp.as_ref().map(|(_, stop)| stop.clone().drop_guard());
        if serving.await.is_err() {
            let why = match grpc.await {
                Ok(Ok(())) => "it stopped".to_owned(),
                Ok(Err(e)) => format!("{e}"),
                Err(e) => format!("{e}"),
            };
            return Err(StartError::NotServing(why));
        }
        metrics.set_ready(true);
        shutdown_guard.disarm();
        http_guard.disarm();
        if let Some(g) = otlp_guard {
            g.disarm();
        }
        if open {
            warn!(
                "no auth token files and no tls.client_ca: ingest and query are open to anyone who can reach {}",
                addr
            );
        }
        info!(
            "listening on {addr} ({}), dashboard on http://{metrics_addr}/, metrics on http://{metrics_addr}/metrics, {}",
            if config.tls.enabled() {
                "TLS"
            } else {
                "plaintext"
            },
            if ingest_node {
                "no store (ingest node)".to_owned()
            } else {
                format!("data in {}", config.data_dir.display())
            }
        );
        Ok(Server {
            addr,
            metrics_addr,
            collector,
            shutdown,
            http_stop,
            health,
            grpc,
            metrics: metrics_task,
            otlp,
            consumers,
            clean_stop: aggregator.then(|| {
                config
                    .data_dir
                    .join(crate::cluster::aggregator::CLEAN_STOP_FILE)
            }),
        })
    }

    /// The bound gRPC address (with the real port when the config said port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The collector behind the services (for in-process queries and tests).
    pub fn collector(&self) -> &Arc<Collector> {
        &self.collector
    }

    /// A token that stops the server when cancelled (as [`Server::shutdown`] does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the shutdown token is cancelled, or the gRPC server ended on its own (then
    /// [`Server::shutdown`] returns its error).
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
    }

    /// Stops gracefully: refuses new calls, ends every agent stream after acknowledging what
    /// it had queued (with UNAVAILABLE, so agents reconnect), commits everything queued,
    /// closes the store. Waits at most 10 s for clients to go.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        info!("shutting down");
        self.collector.metrics().set_ready(false);
        for s in SERVICES {
            self.health
                .set_service_status(s, ServingStatus::NotServing)
                .await;
        }
        self.shutdown.cancel();
        let Server {
            collector,
            mut grpc,
            metrics,
            http_stop,
            otlp,
            consumers,
            clean_stop,
            ..
        } = self;
        for c in consumers {
            if let Err(e) = c.await {
                error!("cluster consumer task: {e}");
            }
        }
        let result = match tokio::time::timeout(DRAIN_TIMEOUT, &mut grpc).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ServeError::Grpc(e)),
            Ok(Err(e)) => Err(ServeError::Task(e)),
            Err(_) => {
                warn!("clients still connected after {DRAIN_TIMEOUT:?}: closing them");
                grpc.abort();
                Ok(())
            }
        };
        collector.close().await;
        if let Some(path) = clean_stop
            && let Err(e) = std::fs::write(&path, b"")
        {
            // The next start rebuilds the store from the stream, as after a crash.
            warn!("{}: {e}", path.display());
        }
        if let Some((task, stop)) = otlp {
            // The last push, with the values everything applied made.
            stop.cancel();
            if let Err(e) = task.await {
                error!("otlp exporter task: {e}");
            }
        }
        // `/readyz` said 503 until here.
        http_stop.cancel();
        match metrics.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("metrics server: {e}"),
            Err(e) => error!("metrics server task: {e}"),
        }
        info!("stopped");
        result
    }
}

/// The gRPC listener's connections, telling `first` when the server first asks for one: it
/// serves from then on.
struct Serving<S> {
    inner: S,
    first: Option<oneshot::Sender<()>>,
}

impl<S: Stream + Unpin> Stream for Serving<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if let Some(tx) = self.first.take() {
            let _ = tx.send(());
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
