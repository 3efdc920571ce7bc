//! The bounded queue between the request path and the writer task.
//!
//! One mutex guards a small [`State`]; it is held only for a few pointer moves, never across
//! an `.await`, so [`Queue::submit`] cannot block a request for more than that.
//!
//! # Capacity and who gets dropped
//!
//! `capacity` bounds every record held and not yet written: the records queued *plus* the
//! batch the writer has taken and is writing or retrying. Counting the batch keeps memory
//! bounded while a sink is down, and makes the overflow exact: with capacity 1000 and a sink
//! that hangs, submitting 1050 records drops exactly 50, however many the writer had taken.
//!
//! When a record arrives and the queue is full:
//! - if the sink is healthy (its last write succeeded, or none failed yet) the writer is merely
//!   behind, so the *new* record is dropped (`reason="queue_full"`);
//! - if the sink is failing (its last write failed and the writer is retrying), pending records
//!   are dropped to make room, oldest first (`reason="retry_evicted"`): first the front of the
//!   batch being retried — but only while the writer is asleep in its backoff, so a record that
//!   a write attempt in progress might store is never counted as dropped — then the front of
//!   the queue. The new record is kept: while a sink is down the newest records are the ones
//!   most worth having when it comes back. If nothing can be evicted (everything held is in a
//!   write attempt in progress) the new record is dropped as `queue_full`.
//!
//! A failed write is thus only ever dropped when the queue needs the room, and it is never
//! counted as written.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::metrics::{reason, TranscriptMetrics};
use super::record::Record;

/// How often, at most, a warning about dropped records is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the writer is doing with the batch it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Holding no batch (waiting for records).
    Idle,
    /// A write attempt is in progress: the batch must not be touched.
    Writing,
    /// Asleep between attempts after a failure: the batch's front may be evicted.
    Backoff,
}

/// The queue's state, behind one mutex.
pub(crate) struct State {
    /// Records waiting for the writer, oldest first.
    pub(crate) queue: VecDeque<Record>,
    /// Length of the batch the writer holds (0 when idle).
    pub(crate) batch_len: usize,
    /// How many records at the front of the writer's batch were evicted while it slept; the
    /// writer removes them before its next attempt.
    pub(crate) batch_evicted: usize,
    /// What the writer is doing.
    pub(crate) phase: Phase,
    /// Whether the sink's last write attempt failed.
    pub(crate) failing: bool,
    /// Set by shutdown: no more records are accepted.
    pub(crate) closed: bool,
    full_warn: RateLimited,
    evict_warn: RateLimited,
    closed_warn: RateLimited,
}

impl State {
    /// Records held and not yet written.
    pub(crate) fn held(&self) -> usize {
        self.queue.len() + self.batch_len - self.batch_evicted
    }
}

/// Lifetime totals, for [`super::ShutdownReport`].
#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) written: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// The queue shared by [`super::Transcripts`] handles and the writer.
pub(crate) struct Queue {
    pub(crate) state: Mutex<State>,
    /// Wakes the writer: when a batch is full, when the queue stops being empty (to start the
    /// flush timer), and at shutdown.
    pub(crate) wake: Notify,
    pub(crate) capacity: usize,
    pub(crate) batch_size: usize,
    pub(crate) metrics: TranscriptMetrics,
    /// The sink's name: the `sink` label.
    pub(crate) sink: &'static str,
    pub(crate) totals: Totals,
}

impl Queue {
    pub(crate) fn new(
        capacity: usize,
        batch_size: usize,
        metrics: TranscriptMetrics,
        sink: &'static str,
    ) -> Queue {
        Queue {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(capacity.min(4096)),
                batch_len: 0,
                batch_evicted: 0,
                phase: Phase::Idle,
                failing: false,
                closed: false,
                full_warn: RateLimited::default(),
                evict_warn: RateLimited::default(),
                closed_warn: RateLimited::default(),
            }),
            wake: Notify::new(),
            capacity: capacity.max(1),
            batch_size: batch_size.max(1),
            metrics,
            sink,
            totals: Totals::default(),
        }
    }

    /// Locks the state. A panic while the lock was held cannot leave the state torn (every
    /// critical section is a few field updates), so a poisoned lock is used as is rather than
    /// spreading the panic to the request path.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Enqueues `record`, or drops it (counted) when there is no room. Never waits.
    pub(crate) fn submit(&self, record: Record) {
        let mut st = self.lock();
        if st.closed {
            let warn = st.closed_warn.hit();
            drop(st);
            self.count_dropped(reason::SHUTDOWN, 1);
            if let Some(n) = warn {
                tracing::warn!(
                    sink = self.sink,
                    dropped = n,
                    "transcript records submitted after shutdown began; dropped"
                );
            }
            return;
        }
        if st.held() >= self.capacity {
            let evicted = st.failing && self.evict_oldest(&mut st);
            if !evicted {
                let warn = st.full_warn.hit();
                drop(st);
                self.count_dropped(reason::QUEUE_FULL, 1);
                if let Some(n) = warn {
                    tracing::warn!(
                        sink = self.sink,
                        dropped = n,
                        capacity = self.capacity,
                        "transcript queue full; records dropped \
                         (transcripts.queue_capacity)"
                    );
                }
                return;
            }
            let warn = st.evict_warn.hit();
            st.queue.push_back(record);
            let depth = st.held();
            drop(st);
            self.metrics.queue_depth.set(depth as i64);
            self.count_dropped(reason::RETRY_EVICTED, 1);
            if let Some(n) = warn {
                tracing::warn!(
                    sink = self.sink,
                    dropped = n,
                    capacity = self.capacity,
                    "transcript sink failing and queue full; oldest pending records dropped \
                     (transcripts.queue_capacity)"
                );
            }
            return;
        }
        st.queue.push_back(record);
        let len = st.queue.len();
        let depth = st.held();
        drop(st);
        self.metrics.queue_depth.set(depth as i64);
        // The writer needs waking only to start its flush timer or to take a full batch;
        // waking it on every record would cost a context switch per call.
        if len == 1 || len == self.batch_size {
            self.wake.notify_one();
        }
    }

    /// Evicts the oldest pending record that no write attempt is using. Returns false when
    /// there is none.
    fn evict_oldest(&self, st: &mut State) -> bool {
        if st.phase == Phase::Backoff && st.batch_evicted < st.batch_len {
            st.batch_evicted += 1;
            return true;
        }
        st.queue.pop_front().is_some()
    }

    pub(crate) fn count_dropped(&self, why: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.metrics
            .dropped
            .with_label_values(&[self.sink, why])
            .inc_by(n);
        self.totals.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Records held and not yet written.
    pub(crate) fn depth(&self) -> usize {
        self.lock().held()
    }

    /// Stops accepting records and wakes the writer so it drains what is left.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

/// Lets one warning through per [`WARN_EVERY`], reporting how many events it stands for.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    since: u64,
}

impl RateLimited {
    /// Counts one event; returns `Some(events since the last warning)` when a warning is due.
    fn hit(&mut self) -> Option<u64> {
        self.since += 1;
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < WARN_EVERY => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.since))
            }
        }
    }
}
