//! Pacing for heavy work: a yield point that long loops (parsing a huge body, counting a huge
//! text, joining its frames) call as they go. On a thread of the heavy-work pool it rests
//! for a moment after each slice of work, so that a pathological request uses at most a share
//! of a core and the async workers serving other conversations are never kept waiting for
//! more than a slice. Everywhere else (the async workers, tests, the CLI) it does nothing.
//!
//! This bounds heavy work by a CPU budget, not by OS priority: the pool's threads run at
//! normal priority and get their fair share on a busy host, only they never hold a core for
//! long stretches. It changes when work runs, never what it computes.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Work between two rests.
pub const SLICE: Duration = Duration::from_micros(200);
/// One rest.
pub const REST: Duration = Duration::from_micros(300);

#[derive(Clone, Copy)]
struct Pacer {
    since: Instant,
    calls: u32,
}

thread_local! {
    static PACER: Cell<Option<Pacer>> = const { Cell::new(None) };
}

/// Makes the calling thread paced (the heavy-work pool's threads).
pub fn enable() {
    PACER.with(|p| {
        p.set(Some(Pacer {
            since: Instant::now(),
            calls: 0,
        }))
    });
}

/// A job starts: it gets a whole slice before its first rest.
pub fn start() {
    PACER.with(|p| {
        if p.get().is_some() {
            enable();
        }
    });
}

/// A yield point: on a paced thread, rests once a slice of work is over. Cheap to call often
/// (the clock is read once every 64 units of work; a call is one unit).
#[inline]
pub fn pace() {
    pace_by(1);
}

/// A yield point after `units` of work (64 units: about a microsecond's worth or more, so
/// the clock is read at each call with `units` ≥ 64).
#[inline]
pub fn pace_by(units: u32) {
    PACER.with(|p| {
        let Some(mut x) = p.get() else {
            return;
        };
        let before = x.calls;
        x.calls = x.calls.wrapping_add(units);
        if before / 64 != x.calls / 64 && x.since.elapsed() >= SLICE {
            std::thread::sleep(REST);
            x.since = Instant::now();
        }
        p.set(Some(x));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls to `pace` for `wall` of wall time; how many of them rested.
    fn rests(wall: Duration) -> usize {
        let t = Instant::now();
        let mut rested = 0;
        while t.elapsed() < wall {
            let c = Instant::now();
            pace();
            rested += usize::from(c.elapsed() >= REST);
        }
        rested
    }

    #[test]
    fn only_a_paced_thread_rests() {
        // 20 ms of calls on a paced thread: a rest after every slice of work (at most 27).
        let paced = std::thread::spawn(|| {
            enable();
            rests(Duration::from_millis(20))
        })
        .join()
        .unwrap();
        assert!(paced >= 5, "{paced} rests");
        // The same on an unpaced thread: `pace` returns at once. (Counted, not timed: a
        // call that the OS preempted for longer than a rest would count as one.)
        let unpaced = std::thread::spawn(|| rests(Duration::from_millis(20)))
            .join()
            .unwrap();
        assert!(unpaced < paced, "{unpaced} vs {paced}");
    }
}
