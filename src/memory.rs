//! Giving freed memory back to the system. glibc's allocator keeps the pages of freed
//! allocations in its arenas: after a burst (thousands of connections, a few hundred 1 MB chat
//! bodies) the process stays at its peak size. A background task calls `malloc_trim(0)` every
//! `server.memory_trim_interval` (on a blocking thread: a trim walks the arenas), which returns
//! the free pages. Other targets (musl, macOS) have no `malloc_trim`; there the task is not
//! started. README "Memory" has the measurements behind the choice.

use std::time::Duration;

/// Starts the trimmer (a no-op where the allocator has no trim). `interval` zero disables it.
pub fn spawn_trimmer(interval: Duration) {
    if interval.is_zero() || !supported() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if tokio::task::spawn_blocking(trim).await.is_err() {
                return;
            }
        }
    });
}

/// Whether this build's allocator can be trimmed.
pub const fn supported() -> bool {
    cfg!(all(target_os = "linux", target_env = "gnu"))
}

/// Returns free heap pages to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free memory; it takes the
    // arena locks itself and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
