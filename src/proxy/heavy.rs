//! A small pool of low-priority threads for the heavy part of a request: parsing, counting and
//! pruning a large chat body.
//!
//! tokio's blocking pool would keep such work off the async workers, but on a 2-core machine a
//! thread that burns a core for a quarter of a second (a million repeated characters to count)
//! still takes that core from every other conversation's requests. These threads run at the
//! lowest scheduling priority (nice 19 on Linux), so the kernel gives the async workers the CPU
//! whenever they want it, and the heavy request makes progress in the gaps. They stay niced
//! for their whole life: a thread could not raise its priority back without CAP_SYS_NICE.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Bodies above this size are joined, parsed and pruned on the low-priority heavy pool, so
/// that a pathological prompt never stalls the async workers serving other conversations.
pub const INLINE_BYTES: usize = 32 * 1024;

type Job = Box<dyn FnOnce() + Send>;

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct Heavy {
    tx: mpsc::Sender<Job>,
}

/// The job's thread panicked or the pool is gone.
#[derive(Debug, thiserror::Error)]
#[error("heavy-work thread failed")]
pub struct Failed;

impl Heavy {
    /// Starts `threads` low-priority worker threads.
    pub fn new(threads: usize) -> Heavy {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ctxgate-heavy-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // the pool was dropped
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a heavy-work thread");
            }
        }
        Heavy { tx }
    }

    /// Runs `f` on a pool thread and waits for its result without blocking the async worker.
    /// A panic inside `f` is caught and reported as [`Failed`].
    pub async fn run<T, F>(&self, f: F) -> Result<T, Failed>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = done.send(r);
        });
        self.tx.send(job).map_err(|_| Failed)?;
        match result.await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(Failed),
        }
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux, nice values are per thread: `setpriority(PRIO_PROCESS, 0, …)` changes only the
    // calling thread.
    // SAFETY: setpriority has no memory-safety preconditions; it only reads its arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if r != 0 {
        tracing::debug!("could not lower the heavy-work thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_survives_panics() {
        let h = Heavy::new(2);
        assert_eq!(h.run(|| 40 + 2).await.unwrap(), 42);
        assert!(h.run(|| -> u8 { panic!("boom") }).await.is_err());
        // The thread that caught the panic still serves jobs.
        for i in 0..10 {
            assert_eq!(h.run(move || i * 2).await.unwrap(), i * 2);
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn threads_run_at_nice_19() {
        let h = Heavy::new(1);
        // SAFETY: getpriority only reads its arguments.
        let nice = h
            .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) })
            .await
            .unwrap();
        assert_eq!(nice, 19);
    }
}
