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
    /// The listener could not be shared with the other event-loop threads.
    #[error("cannot share the listener between threads: {0}")]
    Listener(std::io::Error),
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
    let threads = event_loops();
    let readiness = proxy::upstream::Readiness::new(&config.routes, threads);

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
            proxy::upstream::warm_share(r.config.prewarm_connections, threads, 0),
            r.client.clone(),
            readiness.clone(),
            metrics.clone(),
        ));
    }

    // One event loop per core: this one, plus a thread with a current-thread runtime for each
    // other core, every one accepting on the same listener and serving its connections start
    // to end with its own upstream clients. Nothing hands a request from one thread to
    // another: tokio's work-stealing scheduler woke its other worker about twice a request
    // (futex calls), which this design does without (see bench/README.md).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (listener, shards) = start_shards(
        &config, &proxy, &metrics, &readiness, threads, listener, &stop_rx,
    )?;
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        routes = config.routes.len(), threads = shards.len() + 1, "ctxgate serving");
    let p = proxy.clone();
    let handler = move |req| p.clone().handle(req);
    let stop_all = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let mut clean =
        server::serve_until(listener, handler, stop_all, config.shutdown_grace, "proxy").await;
    // Every thread is joined (no short-circuit): all must have drained before the records
    // are flushed.
    let joined = tokio::task::spawn_blocking(move || {
        let mut all = true;
        for h in shards {
            all &= h.join().unwrap_or(false);
        }
        all
    })
    .await
    .unwrap_or(false);
    clean = clean && joined;
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

type Shard = std::thread::JoinHandle<bool>;

/// Starts one more event-loop thread per core beyond the first (see [`serve`]); each returns
/// whether its connections finished within the grace period.
/// Event-loop threads: one per core the process may use.
fn event_loops() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[allow(clippy::too_many_arguments)]
fn start_shards(
    config: &Config,
    proxy: &Arc<proxy::Proxy>,
    metrics: &metrics::Metrics,
    readiness: &Arc<proxy::upstream::Readiness>,
    n: usize,
    listener: TcpListener,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(TcpListener, Vec<Shard>), StartError> {
    if n <= 1 {
        return Ok((listener, Vec::new()));
    }
    let std_listener = listener.into_std().map_err(StartError::Listener)?;
    let mut shards = Vec::with_capacity(n - 1);
    for i in 1..n {
        let l = std_listener.try_clone().map_err(StartError::Listener)?;
        let p = Arc::new(proxy.shard()?);
        let (grace, m, ready) = (config.shutdown_grace, metrics.clone(), readiness.clone());
        let mut stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ctxgate-loop-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start an event-loop thread");
                        return false;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "event-loop thread cannot listen");
                            return false;
                        }
                    };
                    // This thread's share of each route's warm connections, in its own pool.
                    for r in p.routes() {
                        tokio::spawn(proxy::upstream::warm_up(
                            r.config.clone(),
                            proxy::upstream::warm_share(r.config.prewarm_connections, n, i),
                            r.client.clone(),
                            ready.clone(),
                            m.clone(),
                        ));
                    }
                    let handler = {
                        let p = p.clone();
                        move |req| p.clone().handle(req)
                    };
                    let stopped = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    server::serve_until(listener, handler, stopped, grace, "proxy").await
                })
            });
        match spawned {
            Ok(h) => shards.push(h),
            Err(e) => tracing::error!(error = %e, "cannot start an event-loop thread"),
        }
    }
    let listener = TcpListener::from_std(std_listener).map_err(StartError::Listener)?;
    Ok((listener, shards))
}
