//! ctxgate: a sidecar HTTP proxy in front of LLM APIs that keeps chat prompts inside a token
//! budget, gates concurrency per conversation, bounds every phase with a timeout, records
//! each call and exports Prometheus metrics. See `proxy` for the life of a request and
//! docs/ARCHITECTURE.md for the map of the code.

pub mod admin;
pub mod coding;
pub mod config;
pub mod conn;
pub mod dialect;
pub mod error;
pub mod gate;
pub mod hash;
pub mod memory;
pub mod metrics;
pub mod pace;
pub mod prices;
pub mod proxy;
pub mod prune;
pub mod report;
pub mod secret;
pub mod server;
pub mod state;
pub mod transcript;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A route's upstream client could not be built (bad CA file, TLS setup).
    #[error(transparent)]
    Upstream(#[from] proxy::upstream::BuildError),
    /// The transcript sink could not start (bad URL, directory not creatable).
    #[error(transparent)]
    Transcripts(#[from] transcript::StartError),
    /// The shared state's Redis URL could not be used.
    #[error(transparent)]
    State(#[from] state::StartError),
}

/// Runs ctxgate on the given listeners until `shutdown` resolves, then shuts down gracefully:
/// stop accepting, let in-flight requests finish within `shutdown_grace`, and return.
///
/// Client connections are served on the runtime this is called on. Tests call this in-process
/// with listeners bound to `127.0.0.1:0`; `main` calls [`serve_on`].
pub async fn serve(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    serve_on(
        config,
        listener,
        admin_listener,
        shutdown,
        server::Loops::here(),
    )
    .await
}

/// [`serve`], with client connections spread over `loops` (`server.io_threads` event loops;
/// `main` builds them).
pub async fn serve_on(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    loops: server::Loops,
) -> Result<(), StartError> {
    let metrics = metrics::Metrics::new();
    let transcript_metrics = transcript::TranscriptMetrics::register(metrics.registry());
    let (transcripts, writer) =
        transcript::Transcripts::start(config.transcripts.clone(), transcript_metrics).await?;
    let shared = state::State::start(&config.state, &metrics)?;
    if let Some(s) = &shared {
        s.check().await;
    }
    let proxy = Arc::new(proxy::Proxy::new(
        &config,
        &metrics,
        transcripts,
        loops.len(),
        shared,
    )?);
    let readiness = proxy::upstream::Readiness::new(&config.routes);

    // Admin first, so /healthz and /readyz answer while warm-up runs.
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin = Arc::new(admin::Admin {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        before_scrape: Some(proxy.gauge_refresher()),
    });
    let admin_task = tokio::spawn(server::serve_admin(admin_listener, admin, async {
        let _ = admin_stop_rx.await;
    }));
    proxy.start_background(&readiness, loops.handles());
    memory::spawn_trimmer(config.server.memory_trim_interval);

    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        routes = config.routes.len(), loops = loops.len(), "ctxgate serving");
    let p = proxy.clone();
    let handler = move |req| p.clone().handle(req);
    let cutter = proxy.clone();
    let clean = server::serve_until(
        listener,
        &loops,
        handler,
        shutdown,
        config.shutdown_grace,
        "proxy",
        &config.server,
        Some(server::ConnMetrics::register(&metrics)),
        move || cutter.cut_calls(),
    )
    .await;
    tracing::info!(clean, "proxy stopped");

    // In-flight calls are done (or the grace period is over). Summary calls still running get
    // the grace period to finish, so that each leaves its record; then drain and flush.
    if tokio::time::timeout(config.shutdown_grace, proxy.summaries_done())
        .await
        .is_err()
    {
        // Past the grace period: the calls still running end now, each leaving its record.
        proxy.cancel_summaries();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), proxy.summaries_done()).await;
    }
    drop(proxy);
    let report = writer.shutdown().await;
    tracing::info!(
        written = report.written,
        dropped = report.dropped,
        failed_writes = report.failed,
        "transcripts flushed"
    );

    let _ = admin_stop_tx.send(());
    let _ = admin_task.await;
    Ok(())
}
