//! The pool for the heavy part of a request: joining, decoding, parsing, counting and pruning
//! a chat body whose *new* part is large (over [`INLINE_BYTES`]: a conversation ctxgate has
//! not seen, a client that resent a changed history, a pathological prompt). A warm request
//! of a known conversation parses only its new turn and never comes here, however large its
//! body.
//!
//! The threads run at normal priority. An earlier design ran them at nice 19 so that a
//! pathological prompt could never take CPU from other conversations; on a busy host that
//! starved the common case instead (any ordinary process outranks nice 19: a 2 MB agent
//! request waited 119 ms behind two busy processes, against 1.4 ms sent direct). Now the pool
//! is bounded in threads, one fewer than the cores (at least one), so the async workers keep
//! a core, and its work is paced ([`crate::pace`]): the long loops of parsing, counting and
//! joining rest for a moment after each slice of work, so a pathological request uses at
//! most part of a core and never holds one for long. Its size is bounded by its work
//! (counting stops once the budget is spent, bodies by `max_body_bytes`), not by OS
//! priority.
//!
//! Admission is fair: jobs queue per conversation, and the threads take the conversations in
//! turn (round robin in order of arrival, one job each), so one conversation sending many
//! large bodies delays only itself. The queue is bounded ([`Heavy::new`]'s `max_queued`):
//! past it a job is refused ([`Refused::Full`]) and the request answered 503, never held.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

/// Bodies whose new part is above this size are joined, parsed and pruned on the pool, so
/// that a large prompt never holds an async worker for milliseconds.
pub const INLINE_BYTES: usize = 32 * 1024;

type Job = Box<dyn FnOnce() + Send>;

/// The pool; cheap to clone. The threads end when the last clone is dropped.
#[derive(Clone)]
pub struct Heavy {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    max_queued: usize,
}

#[derive(Default)]
struct State {
    /// Jobs waiting, per conversation, in arrival order.
    queues: HashMap<String, VecDeque<Job>>,
    /// Conversations with jobs waiting, in the order they are served.
    turn: VecDeque<String>,
    queued: usize,
    closed: bool,
}

/// Tells the threads to end when the last [`Heavy`] goes.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.closed = true;
        }
        self.0.ready.notify_all();
    }
}

/// Why a job did not run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// `max_queued` jobs were already waiting.
    #[error("{0} large requests are already waiting to be parsed")]
    Full(usize),
    /// The job panicked, or the pool is gone.
    #[error("heavy-work thread failed")]
    Failed,
}

impl Heavy {
    /// Starts `threads` worker threads (at least one) with room for `max_queued` waiting jobs.
    pub fn new(threads: usize, max_queued: usize) -> Heavy {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            max_queued: max_queued.max(1),
        });
        for i in 0..threads.max(1) {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("ctxgate-heavy-{i}"))
                .spawn(move || {
                    crate::pace::enable();
                    s.work()
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a heavy-work thread");
            }
        }
        Heavy {
            _closer: Arc::new(Closer(Arc::clone(&shared))),
            shared,
        }
    }

    /// The pool for this machine: one thread fewer than the cores (at least one), and 64
    /// waiting jobs per thread.
    pub fn for_machine() -> Heavy {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let threads = cores.saturating_sub(1).max(1);
        Heavy::new(threads, 64 * threads)
    }

    /// Runs `f` on a pool thread, in `conversation`'s turn, and waits for its result without
    /// blocking the async worker. A panic inside `f` is caught and reported as
    /// [`Refused::Failed`].
    pub async fn run<T, F>(&self, conversation: &str, f: F) -> Result<T, Refused>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = done.send(r);
        });
        self.submit(conversation, job)?;
        match result.await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(Refused::Failed),
        }
    }

    fn submit(&self, conversation: &str, job: Job) -> Result<(), Refused> {
        let mut s = self.shared.state.lock().map_err(|_| Refused::Failed)?;
        if s.queued >= self.shared.max_queued {
            return Err(Refused::Full(s.queued));
        }
        s.queued += 1;
        match s.queues.get_mut(conversation) {
            Some(q) => q.push_back(job),
            None => {
                s.queues
                    .insert(conversation.to_string(), VecDeque::from([job]));
                s.turn.push_back(conversation.to_string());
            }
        }
        drop(s);
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl Shared {
    fn work(&self) {
        loop {
            let job = {
                let Ok(mut s) = self.state.lock() else {
                    return;
                };
                loop {
                    if let Some(job) = s.next() {
                        break job;
                    }
                    if s.closed {
                        return;
                    }
                    s = match self.ready.wait(s) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                }
            };
            crate::pace::start();
            job();
        }
    }
}

impl State {
    /// The next job: the first waiting job of the conversation whose turn it is; that
    /// conversation goes to the back of the line if it has more.
    fn next(&mut self) -> Option<Job> {
        let conversation = self.turn.pop_front()?;
        let q = self.queues.get_mut(&conversation)?;
        let job = q.pop_front();
        if q.is_empty() {
            self.queues.remove(&conversation);
        } else {
            self.turn.push_back(conversation);
        }
        if job.is_some() {
            self.queued -= 1;
        }
        job
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[tokio::test]
    async fn runs_jobs_and_survives_panics() {
        let h = Heavy::new(2, 16);
        assert_eq!(h.run("a", || 40 + 2).await.unwrap(), 42);
        assert_eq!(
            h.run("a", || -> u8 { panic!("boom") }).await,
            Err(Refused::Failed)
        );
        // The thread that caught the panic still serves jobs.
        for i in 0..10 {
            assert_eq!(h.run("b", move || i * 2).await.unwrap(), i * 2);
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn threads_run_at_normal_priority() {
        let h = Heavy::new(1, 4);
        // SAFETY: getpriority only reads its arguments.
        let nice = h
            .run("a", || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) })
            .await
            .unwrap();
        // SAFETY: as above.
        let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(nice, ours);
    }

    /// One thread, held busy while jobs queue: conversation `a` queues five jobs before `b`
    /// and `c` queue one each; the thread then serves a, b, c in turn, not a's five first.
    #[test]
    fn conversations_are_served_in_turn_and_the_queue_is_bounded() {
        let h = Heavy::new(1, 8);
        let (order_tx, order_rx) = mpsc::channel::<String>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut waits = Vec::new();
        // The blocker holds the only thread until released.
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let blocker = {
            let h = h.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(h.run("x", move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                }))
            })
        };
        started_rx.recv().unwrap();
        let jobs = [("a", 5), ("b", 1), ("c", 1)];
        for (conv, n) in jobs {
            for k in 0..n {
                let tx = order_tx.clone();
                let tag = format!("{conv}{k}");
                let job: Job = Box::new(move || tx.send(tag).unwrap());
                h.submit(conv, job).unwrap();
            }
        }
        // 7 waiting of 8 allowed: one more fits, the next is refused.
        h.submit("d", Box::new(|| ())).unwrap();
        assert_eq!(h.submit("e", Box::new(|| ())), Err(Refused::Full(8)));
        release_tx.send(()).unwrap();
        blocker.join().unwrap().unwrap();
        let got: Vec<String> = (0..7).map(|_| order_rx.recv().unwrap()).collect();
        assert_eq!(got, ["a0", "b0", "c0", "a1", "a2", "a3", "a4"]);
        waits.push(rt.block_on(h.run("f", || 1)));
        assert_eq!(waits, [Ok(1)]);
    }
}
