//! Transcript records: one [`Record`] per call, handed by the request path to a bounded queue
//! and written in batches by one background writer to the configured [`Sink`].
//!
//! ```text
//! request path ──submit()──▶ queue (bounded, never waits) ──▶ writer task ──▶ sink
//!                               │ full: drop + count            batches, retry with backoff
//! ```
//!
//! - [`Transcripts`] is the cheap handle the request path holds; [`Transcripts::submit`]
//!   never waits: when the queue is full the record is dropped and counted (see `queue` for
//!   exactly which record goes, and when).
//! - The [`Writer`] owns the background task; [`Writer::shutdown`] closes the queue, drains
//!   and flushes every record, and reports the totals.
//! - Sinks: [`sink::jsonl`] (default), [`sink::postgres`], [`sink::stdout`], and `none`.
//!
//! Records carry no headers, so no credential can reach a sink, and this module never logs a
//! record's contents — only counts, sink names, paths and error kinds.

pub mod metrics;
mod queue;
pub mod record;
pub mod sink;
mod writer;

#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use metrics::TranscriptMetrics;
pub use record::{now_ts, Record, Usage, KIND_CALL, KIND_SUMMARY};
pub use sink::{Sink, SinkError};

use queue::Queue;
use sink::AnySink;
use writer::Tuning;

/// How long [`Writer::shutdown`] keeps trying to flush before giving up on a sink that stays
/// down.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::config::{SinkKind, TranscriptSettings as Settings};

/// Why transcripts could not start. The messages never contain the PostgreSQL URL.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `sink = "postgres"` without a URL.
    #[error("transcripts.postgres_url: required when transcripts.sink = \"postgres\"")]
    MissingPostgresUrl,
    /// The URL does not parse; the reason has the URL and its password removed.
    #[error("transcripts.postgres_url: not a valid PostgreSQL URL: {0}")]
    InvalidPostgresUrl(String),
    /// The JSONL directory does not exist and cannot be created.
    #[error("transcripts.dir: {0}")]
    Dir(SinkError),
}

/// Totals over the writer's life, returned by [`Writer::shutdown`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Records the sink acknowledged (0 for `sink = "none"`).
    pub written: u64,
    /// Records dropped, for any reason (queue full, evicted, rejected, lost at shutdown).
    pub dropped: u64,
    /// Batch write attempts that failed (each failed batch was retried or dropped).
    pub failed: u64,
}

/// The request path's handle: cheap to clone, never waits.
#[derive(Clone)]
pub struct Transcripts {
    queue: Arc<Queue>,
    include_bodies: bool,
}

/// Owns the writer task; keep it until shutdown.
pub struct Writer {
    queue: Arc<Queue>,
    task: tokio::task::JoinHandle<()>,
}

impl Transcripts {
    /// Builds the configured sink, starts the writer task, and returns the handle and the
    /// writer.
    ///
    /// For PostgreSQL it connects and creates the table now, so problems show at start; a
    /// server that is down is only logged (the writer keeps trying with backoff). Only an
    /// unparseable URL stops the start. For JSONL the directory is created now.
    pub async fn start(
        settings: Settings,
        metrics: TranscriptMetrics,
    ) -> Result<(Transcripts, Writer), StartError> {
        Transcripts::start_tuned(settings, metrics, Tuning::default()).await
    }

    /// [`Transcripts::start`] with chosen backoff timings (tests shorten them).
    pub(crate) async fn start_tuned(
        settings: Settings,
        metrics: TranscriptMetrics,
        tuning: Tuning,
    ) -> Result<(Transcripts, Writer), StartError> {
        let sink = match settings.sink {
            SinkKind::Jsonl => {
                let s = sink::jsonl::JsonlSink::new(settings.dir.clone(), settings.rotate_bytes);
                s.create_dir().map_err(StartError::Dir)?;
                AnySink::Jsonl(s)
            }
            SinkKind::Postgres => {
                let url = settings
                    .postgres_url
                    .as_ref()
                    .ok_or(StartError::MissingPostgresUrl)?;
                let (config, redactor) =
                    sink::postgres::parse_url(url).map_err(StartError::InvalidPostgresUrl)?;
                let mut s = sink::postgres::PostgresSink::new(config, redactor);
                if let Err(e) = s.connect().await {
                    tracing::warn!(error = %e, "transcripts: postgres not reachable at start; will keep trying");
                }
                AnySink::Postgres(Box::new(s))
            }
            SinkKind::Stdout => AnySink::Stdout(sink::stdout::StdoutSink),
            SinkKind::None => AnySink::None(sink::Discard),
        };
        Ok(Transcripts::start_with_sink(
            &settings, metrics, sink, tuning,
        ))
    }

    /// Starts the writer with any sink (tests use their own).
    pub(crate) fn start_with_sink<S: Sink>(
        settings: &Settings,
        metrics: TranscriptMetrics,
        sink: S,
        tuning: Tuning,
    ) -> (Transcripts, Writer) {
        metrics.zero(sink.name());
        let queue = Arc::new(Queue::new(
            settings.queue_capacity,
            settings.batch_size,
            metrics,
            sink.name(),
        ));
        let task = tokio::spawn(writer::run(
            queue.clone(),
            sink,
            settings.flush_interval,
            tuning,
        ));
        (
            Transcripts {
                queue: queue.clone(),
                include_bodies: settings.include_bodies,
            },
            Writer { queue, task },
        )
    }

    /// Hands `record` to the writer. Never waits: when the queue is full a record is dropped
    /// and counted, and a warning is logged at most every 10 s.
    pub fn submit(&self, record: Record) {
        self.queue.submit(record);
    }

    /// Whether records should carry bodies (`transcripts.include_bodies`).
    pub fn include_bodies(&self) -> bool {
        self.include_bodies
    }

    /// Records held and not yet written (queued plus the batch being written).
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }
}

impl Writer {
    /// Closes the queue, writes every record still held, and returns the totals. A sink that
    /// stays down is retried for at most [`SHUTDOWN_TIMEOUT`]; what is still held then is
    /// dropped and counted (`reason="shutdown"`).
    pub async fn shutdown(self) -> ShutdownReport {
        self.shutdown_within(SHUTDOWN_TIMEOUT).await
    }

    /// [`Writer::shutdown`] with a chosen limit.
    pub async fn shutdown_within(self, limit: Duration) -> ShutdownReport {
        let Writer { queue, mut task } = self;
        queue.close();
        match tokio::time::timeout(limit, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "transcript writer task failed");
            }
            Err(_) => {
                task.abort();
                // Aborting only takes effect at the task's next await; wait for it so the
                // counts below are final. The error is the expected cancellation.
                let _ = task.await;
            }
        }
        let lost = {
            let mut st = queue.lock();
            let lost = st.held();
            st.queue.clear();
            st.batch_len = 0;
            st.batch_evicted = 0;
            lost
        };
        if lost > 0 {
            queue.count_dropped(metrics::reason::SHUTDOWN, lost as u64);
            tracing::error!(
                sink = queue.sink,
                lost,
                limit = ?limit,
                "transcript sink still failing at shutdown; records lost"
            );
        }
        queue.metrics.queue_depth.set(0);
        ShutdownReport {
            written: queue.totals.written.load(Ordering::Relaxed),
            dropped: queue.totals.dropped.load(Ordering::Relaxed),
            failed: queue.totals.failed.load(Ordering::Relaxed),
        }
    }
}
