//! [`TranscriptMetrics`]: the queue's and the sinks' metrics, registered once at start into
//! the process registry (see `crate::metrics::Metrics::registry`).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Buckets (seconds) for one batch write: an fsync of a local file up to a slow remote insert.
const BATCH_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why a record was dropped: the `reason` label of `ctxgate_transcript_records_dropped_total`.
pub(crate) mod reason {
    /// The queue was full and the sink was healthy (just slow): the new record was dropped.
    pub const QUEUE_FULL: &str = "queue_full";
    /// The sink was failing and the queue needed room: the oldest pending record was dropped.
    pub const RETRY_EVICTED: &str = "retry_evicted";
    /// The sink refused the batch as bad data; retrying it could never succeed.
    pub const REJECTED: &str = "rejected";
    /// Still pending when the shutdown wait ran out, or submitted after shutdown began.
    pub const SHUTDOWN: &str = "shutdown";
}

/// Every transcript metric. Cheap to clone; clones share the same series.
#[derive(Clone)]
pub struct TranscriptMetrics {
    /// `ctxgate_transcript_queue_depth`: records held and not yet written (queued plus the
    /// batch the writer holds).
    pub queue_depth: IntGauge,
    /// `ctxgate_transcript_records_written_total{sink}`: records the sink acknowledged.
    pub written: IntCounterVec,
    /// `ctxgate_transcript_records_dropped_total{sink,reason}`: records lost, by reason
    /// (`queue_full`, `retry_evicted`, `rejected`, `shutdown`).
    pub dropped: IntCounterVec,
    /// `ctxgate_transcript_write_failures_total{sink}`: batch write attempts that failed.
    pub write_failures: IntCounterVec,
    /// `ctxgate_transcript_batch_write_seconds{sink}`: time of each successful batch write.
    pub batch_write: HistogramVec,
}

impl TranscriptMetrics {
    /// Builds every transcript metric and registers it in `registry`.
    pub fn register(registry: &Registry) -> TranscriptMetrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| invalid_metric(name, e));
            register(registry, Box::new(c.clone()));
            c
        };
        let queue_depth = IntGauge::new(
            "ctxgate_transcript_queue_depth",
            "Transcript records held and not yet written (queued plus the batch being written).",
        )
        .unwrap_or_else(|e| invalid_metric("ctxgate_transcript_queue_depth", e));
        register(registry, Box::new(queue_depth.clone()));
        let batch_write = HistogramVec::new(
            HistogramOpts::new(
                "ctxgate_transcript_batch_write_seconds",
                "Time to write one batch of transcript records that the sink accepted.",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
            &["sink"],
        )
        .unwrap_or_else(|e| invalid_metric("ctxgate_transcript_batch_write_seconds", e));
        register(registry, Box::new(batch_write.clone()));
        TranscriptMetrics {
            queue_depth,
            written: counter(
                "ctxgate_transcript_records_written_total",
                "Transcript records the sink acknowledged.",
                &["sink"],
            ),
            dropped: counter(
                "ctxgate_transcript_records_dropped_total",
                "Transcript records lost, by reason.",
                &["sink", "reason"],
            ),
            write_failures: counter(
                "ctxgate_transcript_write_failures_total",
                "Transcript batch writes that failed (each is retried).",
                &["sink"],
            ),
            batch_write,
        }
    }
}

impl TranscriptMetrics {
    /// Creates every series of `sink` at 0, so a dashboard shows 0 rather than "No data"
    /// before the first write or drop.
    pub fn zero(&self, sink: &str) {
        self.written.with_label_values(&[sink]);
        self.write_failures.with_label_values(&[sink]);
        self.batch_write.with_label_values(&[sink]);
        for r in [
            reason::QUEUE_FULL,
            reason::RETRY_EVICTED,
            reason::REJECTED,
            reason::SHUTDOWN,
        ] {
            self.dropped.with_label_values(&[sink, r]);
        }
    }
}

fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = registry.register(c) {
        // Only a programming error (a duplicate name) can get here; metrics are not worth a
        // crash, so it is logged.
        tracing::error!(error = %e, "transcript metric registration failed");
    }
}

fn invalid_metric<T>(name: &str, e: prometheus::Error) -> T {
    // Metric definitions are constants: a failure here is a bug caught by the first test run.
    panic!("invalid metric definition {name}: {e}")
}
