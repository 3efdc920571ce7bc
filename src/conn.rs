//! A client connection that ctxgate can close from outside hyper.
//!
//! hyper owns each client connection and closes it only when its own I/O fails or finishes.
//! A client that stops reading leaves hyper waiting forever on a full socket: the call on it
//! can be ended (its permit released, its upstream call dropped), but the connection would
//! sit there. [`Killable`] wraps the client's stream; the [`ConnKill`] that goes with it
//! travels in every request's extensions, so the request path can [`ConnKill::kill`] the
//! connection: the next (or the pending, which is woken) read or write fails, and hyper drops
//! the connection.
//!
//! Also here, below both the server and the request path: the index of the event loop a
//! thread drives ([`loop_index`]), by which a call picks its loop's upstream client.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The kill switch of one client connection (cheap to clone).
#[derive(Clone, Default)]
pub struct ConnKill(Arc<Switch>);

#[derive(Default)]
struct Switch {
    killed: AtomicBool,
    /// Why it was killed (the `reason` of `ctxgate_client_connections_closed_total`).
    reason: Mutex<Option<&'static str>>,
    /// The tasks waiting on the socket (reading, writing), woken by a kill.
    wakers: Mutex<[Option<Waker>; 2]>,
    /// Set by every read or write that moved bytes; cleared by the idle check.
    touched: AtomicBool,
    /// Calls in flight on the connection.
    active: AtomicUsize,
}

/// One call in flight on a connection: counted from its arrival until it is dropped, so an
/// idle check never closes a connection that is waiting on its upstream.
pub struct InFlight(ConnKill);

impl InFlight {
    /// The connection's kill switch.
    pub fn conn(&self) -> &ConnKill {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnKill {
    /// Counts a call in flight until the returned token is dropped.
    pub fn call(&self) -> InFlight {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Why the connection was killed, if it was.
    pub fn reason(&self) -> Option<&'static str> {
        *self.0.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the connection for `reason`: its pending and future reads and writes fail.
    pub fn kill_for(&self, reason: &'static str) {
        self.0
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
        self.kill();
    }

    /// Closes the connection: its pending and future reads and writes fail.
    pub fn kill(&self) {
        self.0.killed.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut *self.0.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }

    /// Whether [`ConnKill::kill`] was called.
    pub fn is_killed(&self) -> bool {
        self.0.killed.load(Ordering::Acquire)
    }

    /// Closes the connection once it has had no call in flight and moved no bytes for
    /// `idle` (checked every half of it, so it closes between once and one and a half times
    /// `idle` after the last byte). Never returns: run it beside the connection.
    pub async fn close_when_idle(&self, idle: Duration) -> std::convert::Infallible {
        let tick = (idle / 2).max(Duration::from_millis(10));
        let mut quiet = 0;
        loop {
            tokio::time::sleep(tick).await;
            let touched = self.0.touched.swap(false, Ordering::AcqRel);
            if touched || self.0.active.load(Ordering::Acquire) > 0 {
                quiet = 0;
                continue;
            }
            quiet += 1;
            if quiet >= 2 && !self.is_killed() {
                self.kill_for("idle_timeout");
            }
        }
    }

    fn touch(&self) {
        self.0.touched.store(true, Ordering::Relaxed);
    }

    fn park(&self, slot: usize, cx: &Context<'_>) {
        let mut w = self.0.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !w[slot].as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            w[slot] = Some(cx.waker().clone());
        }
    }
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed by ctxgate",
    )
}

/// A client stream with a kill switch.
pub struct Killable<T> {
    io: T,
    kill: ConnKill,
}

impl<T> Killable<T> {
    /// Wraps `io`; `kill` closes it.
    pub fn new(io: T, kill: ConnKill) -> Self {
        Killable { io, kill }
    }
}

const READ: usize = 0;
const WRITE: usize = 1;

impl<T> Killable<T> {
    /// One I/O call under the switch: refused once killed; bytes moved mark the connection
    /// busy; a pending call parks its task (on `slot`) so that a kill wakes it.
    fn guarded<R>(
        &mut self,
        slot: usize,
        cx: &mut Context<'_>,
        io: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>>
    where
        T: Unpin,
    {
        if self.kill.is_killed() {
            return Poll::Ready(Err(killed()));
        }
        let r = io(Pin::new(&mut self.io), cx);
        match &r {
            Poll::Ready(Ok(_)) => self.kill.touch(),
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                self.kill.park(slot, cx);
                // A kill between the check and the park must not be missed.
                if self.kill.is_killed() {
                    return Poll::Ready(Err(killed()));
                }
            }
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Killable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.guarded(READ, cx, |io, cx| io.poll_read(cx, buf))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Killable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guarded(WRITE, cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guarded(WRITE, cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.kill.is_killed() {
            return Poll::Ready(Err(killed()));
        }
        let r = Pin::new(&mut self.io).poll_flush(cx);
        if r.is_pending() {
            self.kill.park(WRITE, cx);
            if self.kill.is_killed() {
                return Poll::Ready(Err(killed()));
            }
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// The event loop a connection is served on (`server::EventLoops`): set by each loop's thread,
// read by per-loop state on the request path.
thread_local! {
    /// The index of the event loop this thread drives (0 on any thread that drives none).
    static LOOP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as the one driving event loop `i` (called by the loop's thread before it
/// starts).
pub fn set_loop_index(i: usize) {
    LOOP.with(|l| l.set(i));
}

/// The index of the event loop running on this thread: per-loop state (each route's upstream
/// client) is picked by it, so a call's upstream connection lives on the call's own loop.
pub fn loop_index() -> usize {
    LOOP.with(|l| l.get())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A writer blocked on a peer that reads nothing fails as soon as it is killed.
    #[tokio::test]
    async fn a_kill_wakes_a_blocked_writer() {
        let (a, _b) = tokio::io::duplex(64);
        let kill = ConnKill::default();
        let mut w = Killable::new(a, kill.clone());
        let blocked = tokio::spawn(async move { w.write_all(&[0u8; 1024]).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            !blocked.is_finished(),
            "the peer reads nothing: the write waits"
        );
        kill.kill();
        let e = blocked.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let (a, mut b) = tokio::io::duplex(64);
        let kill = ConnKill::default();
        let mut r = Killable::new(a, kill.clone());
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        r.read_exact(&mut buf).await.unwrap();
        kill.kill_for("test");
        assert!(r.read(&mut buf).await.is_err());
        assert_eq!(kill.reason(), Some("test"));
    }

    /// Idle means no call in flight and no bytes: a call in flight keeps a quiet connection.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_between_one_and_one_and_a_half_idle() {
        let kill = ConnKill::default();
        let call = kill.call();
        let k = kill.clone();
        tokio::spawn(async move { k.close_when_idle(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!kill.is_killed(), "a call is in flight");
        drop(call);
        let t0 = tokio::time::Instant::now();
        while !kill.is_killed() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited <= Duration::from_secs(16),
            "{waited:?}"
        );
        assert_eq!(kill.reason(), Some("idle_timeout"));
    }
}
