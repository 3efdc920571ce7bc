//! ctxgate: a sidecar HTTP proxy in front of LLM APIs that keeps chat prompts inside a token
//! budget, gates concurrency per conversation, bounds every phase with a timeout, records
//! each call and exports Prometheus metrics. See `proxy` for the life of a request.

pub mod admin;
pub mod config;
pub mod dialect;
pub mod error;
pub mod gate;
pub mod metrics;
pub mod proxy;
pub mod prune;
pub mod server;
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
}

/// Runs ctxgate on the given listeners until `shutdown` resolves, then shuts down gracefully:
/// stop accepting, let in-flight requests finish within `shutdown_grace`, and return.
///
/// Tests call this in-process with listeners bound to `127.0.0.1:0`; `main` calls it with the
/// configured addresses and a signal future.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let metrics = metrics::Metrics::new();
    let transcript_metrics = transcript::TranscriptMetrics::register(metrics.registry());
    let (transcripts, writer) =
        transcript::Transcripts::start(config.transcripts.clone(), transcript_metrics).await?;
    let proxy = Arc::new(proxy::Proxy::new(&config, metrics.clone(), transcripts)?);
    let readiness = proxy::upstream::Readiness::new(&config.routes);

    // Admin first, so /healthz and /readyz answer while warm-up runs.
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gates = proxy.gates().clone();
    let sweeper = gates.spawn_sweeper();
    let m = metrics.clone();
    let view = proxy.view().clone();
    let before_scrape: Box<dyn Fn() + Send + Sync> = Box::new(move || {
        metrics::Metrics::sync_counter(&m.view_hits, view.hits());
        metrics::Metrics::sync_counter(&m.view_misses, view.misses());
        m.view_entries
            .set(i64::try_from(view.entry_count()).unwrap_or(i64::MAX));
        m.gate_waiters.set(gates.waiters() as i64);
        m.gate_active.set(gates.active_gates() as i64);
        m.gate_known.set(gates.known_gates() as i64);
    });
    let admin = Arc::new(admin::Admin {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        before_scrape: Some(before_scrape),
    });
    let admin_task = tokio::spawn(server::serve_admin(admin_listener, admin, async {
        let _ = admin_stop_rx.await;
    }));

    for r in proxy.routes() {
        tokio::spawn(proxy::upstream::warm_up(
            r.config.clone(),
            r.client.clone(),
            readiness.clone(),
            metrics.clone(),
        ));
    }

    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        routes = config.routes.len(), "ctxgate serving");
    let p = proxy.clone();
    let handler = move |req| p.clone().handle(req);
    let clean =
        server::serve_until(listener, handler, shutdown, config.shutdown_grace, "proxy").await;
    tracing::info!(clean, "proxy stopped");

    // In-flight calls are done (or the grace period is over): drain and flush the records.
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
    sweeper.abort();
    Ok(())
}
