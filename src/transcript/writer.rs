//! The writer task: takes batches from the queue, writes them to the sink, retries failures
//! with backoff, and drains everything at shutdown.
//!
//! A batch is up to `batch_size` records, taken as soon as that many are queued, or whatever
//! is queued `flush_interval` after the first of them arrived. A failed write keeps the batch
//! and tries again after 100 ms, doubling up to 5 s, until it succeeds; records leave the
//! batch meanwhile only when the queue needs the room (see `queue`). Only a successful write
//! counts records as written.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::metrics::reason;
use super::queue::{Phase, Queue};
use super::record::Record;
use super::sink::Sink;

/// Timing knobs that are constants in production and shortened in tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// Wait after the first failure.
    pub(crate) backoff_initial: Duration,
    /// Longest wait between attempts.
    pub(crate) backoff_max: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Runs until the queue is closed and empty.
pub(crate) async fn run<S: Sink>(
    queue: Arc<Queue>,
    mut sink: S,
    flush_interval: Duration,
    tuning: Tuning,
) {
    let name = sink.name();
    let counts = sink.counts_written();
    let mut backoff = tuning.backoff_initial;
    while let Some(mut batch) = next_batch(&queue, flush_interval).await {
        let mut attempt: u32 = 0;
        loop {
            // Drop what submit evicted while we slept, then mark the batch as in use.
            {
                let mut st = queue.lock();
                let evicted = st.batch_evicted.min(batch.len());
                batch.drain(..evicted);
                st.batch_evicted = 0;
                st.batch_len = batch.len();
                st.phase = if batch.is_empty() {
                    Phase::Idle
                } else {
                    Phase::Writing
                };
            }
            if batch.is_empty() {
                break;
            }
            attempt += 1;
            let started = Instant::now();
            let res = sink.write(&batch).await;
            let n = batch.len() as u64;
            match res {
                Ok(()) => {
                    let depth = {
                        let mut st = queue.lock();
                        st.batch_len = 0;
                        st.phase = Phase::Idle;
                        st.failing = false;
                        st.held()
                    };
                    queue.metrics.queue_depth.set(depth as i64);
                    if counts {
                        queue
                            .metrics
                            .batch_write
                            .with_label_values(&[name])
                            .observe(started.elapsed().as_secs_f64());
                        queue.metrics.written.with_label_values(&[name]).inc_by(n);
                        queue.totals.written.fetch_add(n, Ordering::Relaxed);
                    }
                    if attempt > 1 {
                        tracing::info!(
                            sink = name,
                            attempts = attempt,
                            "transcript sink recovered"
                        );
                    }
                    backoff = tuning.backoff_initial;
                    break;
                }
                Err(e) if e.is_permanent() => {
                    let depth = {
                        let mut st = queue.lock();
                        st.batch_len = 0;
                        st.phase = Phase::Idle;
                        st.held()
                    };
                    queue.metrics.queue_depth.set(depth as i64);
                    count_failure(&queue, name);
                    queue.count_dropped(reason::REJECTED, n);
                    tracing::error!(sink = name, error = %e, records = n, "transcript batch rejected by the sink; dropped");
                    break;
                }
                Err(e) => {
                    {
                        // Backoff is set before the failure is counted, so anyone who sees
                        // the count also sees the batch as evictable.
                        let mut st = queue.lock();
                        st.phase = Phase::Backoff;
                        st.failing = true;
                    }
                    count_failure(&queue, name);
                    tracing::warn!(
                        sink = name,
                        error = %e,
                        records = n,
                        attempt,
                        retry_in = ?backoff,
                        "transcript write failed; will retry"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(tuning.backoff_max);
                }
            }
        }
    }
}

fn count_failure(queue: &Queue, name: &'static str) {
    queue
        .metrics
        .write_failures
        .with_label_values(&[name])
        .inc();
    queue.totals.failed.fetch_add(1, Ordering::Relaxed);
}

/// Waits for the next batch; `None` once the queue is closed and empty.
async fn next_batch(queue: &Queue, flush_interval: Duration) -> Option<Vec<Record>> {
    // When the first record of a partial batch was seen: the flush timer's start.
    let mut deadline: Option<Instant> = None;
    loop {
        {
            let mut st = queue.lock();
            let len = st.queue.len();
            let due = deadline.is_some_and(|d| Instant::now() >= d);
            if len > 0 && (len >= queue.batch_size || st.closed || due) {
                let n = len.min(queue.batch_size);
                let batch: Vec<Record> = st.queue.drain(..n).collect();
                st.batch_len = n;
                st.batch_evicted = 0;
                st.phase = Phase::Writing;
                return Some(batch);
            }
            if len == 0 {
                if st.closed {
                    return None;
                }
                deadline = None;
            } else if deadline.is_none() {
                deadline = Some(Instant::now() + flush_interval);
            }
        }
        // `Notify` keeps a permit for a wake sent while we were not waiting, so no record
        // that arrived between the check above and this wait is missed.
        match deadline {
            Some(d) => {
                let _ = tokio::time::timeout_at(d, queue.wake.notified()).await;
            }
            None => queue.wake.notified().await,
        }
    }
}
