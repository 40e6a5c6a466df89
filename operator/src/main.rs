//! `lacuna-operator`: runs the controllers while this replica holds the leader Lease, and serves
//! `/metrics` and `/health`.

use std::net::TcpListener;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use lacuna_lineage::LineageStore;
use lacuna_operator::metrics::Metrics;
use lacuna_operator::{
    Context, InMemoryLineage, LineageRecorder, OperatorConfig, StoreLineage, context::system_clock, controller, server,
    telemetry,
};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Image with the `lacuna` binary for pods whose resource names none.
    #[arg(long, env = "LACUNA_IMAGE", default_value = "ghcr.io/lacuna-ml/lacuna:latest")]
    image: String,
    /// Address of the `/metrics` and `/health` server.
    #[arg(long, env = "LACUNA_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// Name of the coordination.k8s.io Lease that elects the active replica.
    #[arg(long, env = "LACUNA_LEASE_NAME", default_value = "lacuna-operator")]
    lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lineage database (`postgres://…` in a cluster, `sqlite://…?mode=rwc` for trials); without
    /// one, lineage is kept in memory only and lost on restart.
    #[arg(long, env = "LACUNA_LINEAGE_URL")]
    lineage_url: Option<String>,
    /// Lease validity, seconds.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    lacuna_api::tls::install_crypto_provider();
    let args = Args::parse();
    let _telemetry = telemetry::init()?;
    let client = Client::try_default().await.context("connecting to the Kubernetes API")?;

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::default().register(&mut registry));
    let listener = TcpListener::bind(&args.listen).with_context(|| format!("binding {}", args.listen))?;
    let http = server::serve(listener, Arc::new(registry)).context("starting the metrics server")?;
    let http_handle = http.handle();
    let http_task = tokio::spawn(http);

    let lineage: Arc<dyn LineageRecorder> = match &args.lineage_url {
        Some(url) => {
            // An unreachable database is not fatal: writes spool and replay once it is back.
            let store = LineageStore::connect(url).await.context("opening the lineage store")?;
            info!(spool = %store.spool_dir().display(), "recording lineage");
            Arc::new(StoreLineage::new(Arc::new(store)))
        }
        None => {
            warn!("no LACUNA_LINEAGE_URL: lineage is kept in memory and lost on restart");
            Arc::new(InMemoryLineage::default())
        }
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: OperatorConfig { image: args.image, ..OperatorConfig::default() },
        lineage,
        metrics,
        clock: system_clock(),
    });

    let mut lease = LeaseManagerBuilder::new(client, &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_duration(args.lease_seconds)
        .with_grace(args.lease_seconds.div_ceil(3))
        .with_field_manager(lacuna_operator::FIELD_MANAGER);
    if let Some(id) = args.identity {
        lease = lease.with_identity(id);
    }
    let (mut leader, lease_task) = lease.build().await.context("creating the leader lease")?.watch().await;
    info!(lease = %args.lease_name, "waiting to become the leader");
    while !*leader.borrow_and_update() {
        tokio::select! {
            changed = leader.changed() => changed.context("the lease manager stopped")?,
            _ = tokio::signal::ctrl_c() => { http_handle.stop(true).await; return Ok(()); }
        }
    }
    info!("leading: reconciling");
    // Stop reconciling as soon as the lease is lost (or on SIGINT/SIGTERM); a follower takes over.
    let mut watch = leader.clone();
    let lost = async move {
        tokio::select! {
            _ = async { while watch.changed().await.is_ok() { if !*watch.borrow() { break; } } } => warn!("lost the lease"),
            _ = tokio::signal::ctrl_c() => info!("shutting down"),
        }
    };
    let result = controller::run(ctx, lost).await;
    drop(leader);
    let _ = lease_task.await;
    http_handle.stop(true).await;
    let _ = http_task.await;
    result.context("running the controllers")
}
