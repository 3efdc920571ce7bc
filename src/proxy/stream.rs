//! Phase 6, stream back: the response ctxgate sends to the client.
//!
//! [`Proxy::stream_back`] sets the response headers (hop-by-hop removed, the pruning summary
//! added) and wraps the upstream body in a [`StreamBack`], which passes the upstream's frames
//! through as they arrive (no buffering) and enforces two timers while doing so:
//! `stream_idle` (longest gap between chunks) and `total` (the whole call). Both are real
//! timers registered with tokio, so they fire on time even when no chunk arrives. When one
//! fires, an SSE response ends with an error event in the dialect's format and then closes;
//! any other body is cut with an error, which makes hyper close the connection so the client
//! cannot mistake it for a complete answer.
//!
//! The body carries the [`Call`] as its [`CallGuard`]: it feeds the usage tap with each chunk
//! and ends the call exactly once — on the last byte, on an error or timeout, or when the
//! client goes away and hyper drops the body (the same drop also drops the upstream body,
//! which cancels the upstream request).

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};

use http::{header, HeaderValue, Response, StatusCode};

use crate::conn::ConnKill;
use crate::dialect::{Dialect, UsageTap};
use crate::error::{Error, Phase};

use super::call::{Call, CallEnd, End, PruneAction};
use super::forward::strip_hop_by_hop;
use super::upstream::error_chain;
use super::Proxy;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A call's guard: `finish` runs exactly once, at the latest when it is dropped.
pub struct CallGuard {
    hook: Option<Box<dyn CallEnd>>,
}

impl CallGuard {
    /// Wraps a hook.
    pub fn new(hook: Box<dyn CallEnd>) -> Self {
        CallGuard { hook: Some(hook) }
    }
    fn finish(&mut self, end: End) {
        if let Some(mut h) = self.hook.take() {
            h.finish(end);
        }
    }
    fn on_data(&mut self, data: &Bytes) {
        if let Some(h) = self.hook.as_mut() {
            h.on_data(data);
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.finish(End::ClientGone);
    }
}

/// Timer settings of one response.
#[derive(Debug, Clone, Copy)]
pub struct StreamTimers {
    /// Longest gap between chunks.
    pub stream_idle: Duration,
    /// Deadline of the whole call.
    pub deadline: Instant,
    /// The configured `total`, for the error message.
    pub total: Duration,
    /// Longest time a chunk handed to hyper may wait for the client to take it.
    pub client_write: Duration,
}

enum State {
    Streaming,
    /// Ended from outside (a timer the client's reading does not drive, or the shutdown cut):
    /// the next poll gets this error (an SSE event, or a body error), then the end.
    Cut(Error),
    Done,
}

/// What can end a stream from outside: the shutdown cut, and the client connection's kill
/// switch (for a client that stopped reading).
#[derive(Default)]
pub struct Outside {
    /// Turns true when the shutdown grace period is over.
    pub cut: Option<watch::Receiver<bool>>,
    /// Closes the client's connection.
    pub conn: Option<ConnKill>,
}

/// How long a stream cut by `total` or the shutdown has to hand its error to the client
/// before the connection is closed under it (a client that reads nothing never takes it).
const DELIVER: Duration = Duration::from_secs(1);

/// What the body and its watchdog share.
struct Live<B> {
    /// The upstream body; dropped (which cancels the upstream call) when the call is cut.
    inner: Option<B>,
    timers: StreamTimers,
    /// Fires at the earlier of the idle deadline and the total deadline.
    sleep: Pin<Box<Sleep>>,
    /// When the last chunk arrived (the idle timer is re-armed lazily from it).
    last_activity: Instant,
    /// Set when a chunk was handed to hyper, cleared when hyper polls again: while set, the
    /// chunk waits on the client.
    handed_at: Option<Instant>,
    /// The task that polled last, woken when the call is cut.
    waker: Option<Waker>,
    sse: bool,
    dialect: Dialect,
    state: State,
    guard: CallGuard,
    /// Dropped when the body ends: stops the watchdog.
    stop: Option<oneshot::Sender<()>>,
}

impl<B: Body> Live<B> {
    fn streaming(&self) -> bool {
        matches!(self.state, State::Streaming)
    }

    /// Ends the call from outside the body's own polling: records it, releases its permit,
    /// cancels the upstream call, and leaves the error for the client's next poll.
    fn cut(&mut self, end: End, err: Error) {
        if !self.streaming() {
            return;
        }
        self.guard.finish(end);
        self.inner = None;
        self.state = State::Cut(err);
        self.stop = None;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn done(&mut self) {
        self.state = State::Done;
        self.inner = None;
        self.stop = None;
    }
}

/// The upstream body streamed through with timers and the call guard.
///
/// `stream_idle` and `total` are checked by the body while hyper polls it. hyper stops
/// polling while the client is not reading (its TCP or HTTP/2 window is full), so a watchdog
/// task, sharing the body's state, enforces `total` and `client_write` on its own: when either
/// runs out the call is recorded, its permit released and the upstream call dropped, whether
/// or not the client ever reads again. The same watchdog cuts the stream when the shutdown
/// grace period ends.
pub struct StreamBack<B: Body = Incoming> {
    live: Arc<Mutex<Live<B>>>,
    /// What the watchdog needs, until it is started: on the first poll that does not finish
    /// the body (a body that ends at its first poll, the usual small JSON answer, needs none).
    watch: Option<Watch>,
}

/// The watchdog's arguments.
struct Watch {
    timers: StreamTimers,
    stopped: oneshot::Receiver<()>,
    outside: Outside,
}

fn lock<B>(m: &Mutex<Live<B>>) -> std::sync::MutexGuard<'_, Live<B>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<B> StreamBack<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    /// Wraps an upstream body; `cut` turns true when the shutdown grace period is over.
    pub fn new(
        inner: B,
        timers: StreamTimers,
        sse: bool,
        dialect: Dialect,
        guard: CallGuard,
        outside: Outside,
    ) -> Self {
        let now = Instant::now();
        let first = (now + timers.stream_idle).min(timers.deadline);
        let (stop, stopped) = oneshot::channel();
        let live = Arc::new(Mutex::new(Live {
            inner: Some(inner),
            timers,
            sleep: Box::pin(tokio::time::sleep_until(first)),
            last_activity: now,
            handed_at: None,
            waker: None,
            sse,
            dialect,
            state: State::Streaming,
            guard,
            stop: Some(stop),
        }));
        StreamBack {
            live,
            watch: Some(Watch {
                timers,
                stopped,
                outside,
            }),
        }
    }

    /// Starts the watchdog now rather than at the first poll that leaves the body unfinished:
    /// for a stream (SSE) and for HTTP/2, where hyper may not poll the body at all while the
    /// connection's window is full.
    pub fn watched_now(mut self) -> Self {
        self.start_watchdog();
        self
    }

    /// Starts the watchdog (once).
    fn start_watchdog(&mut self) {
        let Some(w) = self.watch.take() else { return };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(watchdog(
                Arc::downgrade(&self.live),
                w.timers,
                w.stopped,
                w.outside,
            ));
        }
    }
}

/// Enforces `total` and `client_write` without the client's help, and the shutdown cut.
/// `client_write` is checked every half of it, so it fires between once and one and a half
/// times its setting after the client stopped taking chunks.
async fn watchdog<B: Body>(
    live: Weak<Mutex<Live<B>>>,
    timers: StreamTimers,
    mut stopped: oneshot::Receiver<()>,
    outside: Outside,
) {
    let Outside { mut cut, conn } = outside;
    let tick = (timers.client_write / 2).max(Duration::from_millis(10));
    let kill = |reason| {
        if let Some(c) = &conn {
            c.kill_for(reason);
        }
    };
    loop {
        let next = (Instant::now() + tick).min(timers.deadline);
        let shutdown = async {
            let cut_now = match cut.as_mut() {
                Some(rx) => rx.wait_for(|c| *c).await.is_ok(),
                None => false,
            };
            if !cut_now {
                std::future::pending::<()>().await;
            }
        };
        let cutting = tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep_until(next) => false,
            _ = shutdown => true,
        };
        match check(&live, &timers, cutting) {
            Check::Going => continue,
            Check::Over => return,
            Check::Stuck => {
                // The client takes nothing: it will not take the error either.
                kill("client_write");
                return;
            }
            Check::Cut => {
                // The error waits for the client's next read; a client that reads nothing
                // loses its connection instead of keeping it open.
                tokio::time::sleep(DELIVER).await;
                let taken = live
                    .upgrade()
                    .is_none_or(|l| !matches!(lock(&l).state, State::Cut(_)));
                if !taken {
                    kill("error_not_taken");
                }
                return;
            }
        }
    }
}

/// What the watchdog found.
enum Check {
    /// Still streaming, within its timers.
    Going,
    /// The body ended on its own.
    Over,
    /// Cut by `total` or the shutdown: its error awaits the client.
    Cut,
    /// Cut because the client stopped reading.
    Stuck,
}

fn check<B: Body>(live: &Weak<Mutex<Live<B>>>, timers: &StreamTimers, cutting: bool) -> Check {
    let Some(strong) = live.upgrade() else {
        return Check::Over;
    };
    let mut l = lock(&strong);
    if !l.streaming() {
        return Check::Over;
    }
    let now = Instant::now();
    if cutting {
        l.cut(End::Shutdown, Error::ShuttingDown);
        return Check::Cut;
    }
    let timed_out = |l: &mut Live<B>, phase, after| {
        l.cut(End::Timeout(phase), Error::Timeout { phase, after });
    };
    if now >= timers.deadline {
        timed_out(&mut l, Phase::Total, timers.total);
        return Check::Cut;
    }
    if l.handed_at
        .is_some_and(|t| now.saturating_duration_since(t) >= timers.client_write)
    {
        timed_out(&mut l, Phase::ClientWrite, timers.client_write);
        return Check::Stuck;
    }
    Check::Going
}

impl<B> Live<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    /// Checks the timer; returns the phase that fired, if one did. Re-arms the timer lazily
    /// (only when it fires early because chunks kept arriving), so a busy stream does not
    /// touch the timer wheel on every chunk.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Option<Phase> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            if now >= self.timers.deadline {
                return Some(Phase::Total);
            }
            let idle_at = self.last_activity + self.timers.stream_idle;
            if now >= idle_at {
                return Some(Phase::StreamIdle);
            }
            let next = idle_at.min(self.timers.deadline);
            self.sleep.as_mut().reset(next);
        }
    }

    /// The frame that tells the client of `err`: an SSE error event, or a body error (hyper
    /// then closes the connection, so the client cannot take a cut body for a whole one).
    fn error_frame(&mut self, err: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done();
        if self.sse {
            let event = err.sse_event(self.dialect);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
        } else {
            Poll::Ready(Some(Err(Box::new(err))))
        }
    }

    fn end_with(&mut self, end: End, err: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.guard.finish(end);
        self.error_frame(err)
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.handed_at = None;
        match std::mem::replace(&mut self.state, State::Streaming) {
            State::Done => {
                self.state = State::Done;
                return Poll::Ready(None);
            }
            State::Cut(err) => return self.error_frame(err),
            State::Streaming => {}
        }
        let Some(inner) = self.inner.as_mut() else {
            self.done();
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let now = Instant::now();
                self.last_activity = now;
                self.handed_at = Some(now);
                if let Some(data) = frame.data_ref() {
                    self.guard.on_data(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.guard.finish(End::Complete);
                self.done();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let reason = error_chain(&e);
                self.end_with(
                    End::UpstreamError,
                    Error::UpstreamReset {
                        upstream: String::new(),
                        reason,
                    },
                )
            }
            Poll::Pending => {
                if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    self.waker = Some(cx.waker().clone());
                }
                let Some(phase) = self.poll_timer(cx) else {
                    return Poll::Pending;
                };
                let after = match phase {
                    Phase::Total => self.timers.total,
                    _ => self.timers.stream_idle,
                };
                self.end_with(End::Timeout(phase), Error::Timeout { phase, after })
            }
        }
    }
}

use std::future::Future;

impl<B> Body for StreamBack<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let (polled, done) = {
            let mut l = lock(&this.live);
            let p = l.poll_frame(cx);
            let done = !l.streaming() || l.inner.as_ref().is_none_or(|b| b.is_end_stream());
            (p, done)
        };
        if !done && this.watch.is_some() {
            this.start_watchdog();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let l = lock(&self.live);
        match &l.state {
            State::Done => true,
            State::Cut(_) => false,
            State::Streaming => l.inner.as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let l = lock(&self.live);
        match (&l.state, &l.inner) {
            (State::Streaming, Some(b)) => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl<B: Body> Drop for StreamBack<B> {
    fn drop(&mut self) {
        let mut l = lock(&self.live);
        // hyper stops polling once a body with a known length has delivered it all, so a body
        // dropped at its end is complete, not abandoned.
        if l.streaming() && l.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
            l.guard.finish(End::Complete);
        }
        // Otherwise the guard records the client as gone when the state goes.
        l.stop = None;
        l.inner = None;
        let guard = std::mem::replace(&mut l.guard, CallGuard { hook: None });
        drop(l);
        drop(guard);
    }
}

/// The body of every response ctxgate sends: a streamed upstream body or one ctxgate made.
/// (A call answered with ctxgate's own error is recorded when the error is made, so a body
/// ctxgate makes carries no call.)
pub enum ResponseBody {
    /// The upstream's body, streamed through.
    Stream(StreamBack),
    /// A body made by ctxgate (errors, admin pages).
    Full(Full<Bytes>),
}

impl From<Bytes> for ResponseBody {
    fn from(b: Bytes) -> Self {
        ResponseBody::Full(Full::new(b))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Stream(s) => Pin::new(s).poll_frame(cx),
            ResponseBody::Full(f) => {
                let r = ready!(Pin::new(f).poll_frame(cx));
                Poll::Ready(r.map(|f| f.map_err(|never| match never {})))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Stream(s) => s.is_end_stream(),
            ResponseBody::Full(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Stream(s) => s.size_hint(),
            ResponseBody::Full(f) => f.size_hint(),
        }
    }
}

impl Proxy {
    /// Sends the upstream's response on: its headers now, its body as it streams, the call
    /// riding in the body until it ends.
    pub(super) fn stream_back(
        &self,
        mut call: Call,
        resp: Response<Incoming>,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if call.action == PruneAction::Pruned {
            if let Some(s) = &call.summary {
                super::prune::summary_headers(&mut parts.headers, s);
            }
        }
        let sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        // Usage is read from chat answers only: nothing else carries prompt usage.
        if call.chat {
            let encoding = parts
                .headers
                .get(header::CONTENT_ENCODING)
                .map(|v| v.to_str().unwrap_or("unreadable"));
            call.tap = Some(
                UsageTap::new(call.dialect.wire(), sse, self.transcripts.include_bodies())
                    .decoding(encoding),
            );
        }
        call.status = Some(parts.status.as_u16());
        call.ttfb = Some(call.start.elapsed());
        self.recorder.responded(&call);
        let (timeouts, dialect) = match &call.route {
            Some(r) => (r.config.timeouts, call.dialect),
            None => (crate::config::Timeouts::default(), call.dialect),
        };
        let timers = StreamTimers {
            stream_idle: timeouts.stream_idle,
            deadline: call
                .deadline
                .unwrap_or_else(|| Instant::now() + timeouts.total),
            total: timeouts.total,
            client_write: timeouts.client_write,
        };
        // Only an HTTP/1.1 connection is closed under a stuck client: it carries nothing else.
        // An HTTP/2 stream that stops reading is ended (permit, upstream and record go) but
        // its connection, which may carry other streams, stays, until `server.idle_timeout`
        // closes it once nothing else is in flight.
        let call_version = call.request.version;
        let conn_kill = call
            .conn
            .as_ref()
            .filter(|_| call.request.version < http::Version::HTTP_2)
            .map(|c| c.conn().clone());
        let guard = CallGuard::new(Box::new(call));
        let outside = Outside {
            cut: Some(self.cut.subscribe()),
            conn: conn_kill,
        };
        let eager = sse || call_version >= http::Version::HTTP_2;
        let mut body = StreamBack::new(body, timers, sse, dialect, guard, outside);
        if eager {
            body = body.watched_now();
        }
        Response::from_parts(parts, ResponseBody::Stream(body))
    }
}

/// A plain response ctxgate makes itself (admin pages).
pub fn simple_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::from(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;

    /// A body fed by a channel, standing in for the upstream.
    struct Chan(mpsc::Receiver<Bytes>);

    impl Body for Chan {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }

    struct Rec(Arc<Mutex<Vec<End>>>);
    impl CallEnd for Rec {
        fn finish(&mut self, end: End) {
            self.0.lock().unwrap().push(end);
        }
    }

    const IDLE: Duration = Duration::from_secs(60);
    const TOTAL: Duration = Duration::from_secs(300);
    const CLIENT_WRITE: Duration = Duration::from_secs(1000);

    fn body(
        sse: bool,
        dialect: Dialect,
    ) -> (mpsc::Sender<Bytes>, StreamBack<Chan>, Arc<Mutex<Vec<End>>>) {
        let (tx, rx) = mpsc::channel(8);
        let ends = Arc::new(Mutex::new(Vec::new()));
        let timers = StreamTimers {
            stream_idle: IDLE,
            deadline: Instant::now() + TOTAL,
            total: TOTAL,
            client_write: CLIENT_WRITE,
        };
        let b = StreamBack::new(
            Chan(rx),
            timers,
            sse,
            dialect,
            CallGuard::new(Box::new(Rec(ends.clone()))),
            Outside::default(),
        );
        // As stream_back does: a stream is watched from the start.
        let b = if sse { b.watched_now() } else { b };
        (tx, b, ends)
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_sse_gets_the_error_event_at_stream_idle() {
        let (tx, mut b, ends) = body(true, Dialect::OpenAi);
        let t0 = Instant::now();
        tx.send(Bytes::from_static(b"data: {\"a\":1}\n\n"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(7)).await;
        let f = b.frame().await.unwrap().unwrap();
        assert_eq!(
            f.into_data().unwrap(),
            Bytes::from_static(b"data: {\"a\":1}\n\n")
        );
        // Nothing more arrives: the idle timer fires 60 s after the chunk, not earlier/later.
        let f = b.frame().await.unwrap().unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(67));
        let ev = String::from_utf8(f.into_data().unwrap().to_vec()).unwrap();
        assert_eq!(
            ev,
            "data: {\"error\":{\"message\":\"upstream sent nothing within 60s (timeouts.stream_idle)\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_timeout\"}}\n\n"
        );
        assert!(b.frame().await.is_none());
        assert_eq!(*ends.lock().unwrap(), [End::Timeout(Phase::StreamIdle)]);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn trickling_anthropic_stream_is_cut_at_total() {
        let (tx, mut b, ends) = body(true, Dialect::Anthropic);
        let t0 = Instant::now();
        tokio::spawn(async move {
            loop {
                if tx
                    .send(Bytes::from_static(
                        b"event: ping\ndata: {\"type\":\"ping\"}\n\n",
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        let mut last = None;
        let mut n = 0;
        while let Some(f) = b.frame().await {
            last = Some(f.unwrap().into_data().unwrap());
            n += 1;
        }
        assert_eq!(t0.elapsed(), TOTAL);
        assert_eq!(n, 11, "10 pings (t=0..270s) and the error event");
        let ev = String::from_utf8(last.unwrap().to_vec()).unwrap();
        assert_eq!(
            ev,
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"timeout_error\",\"message\":\"upstream call did not finish within 300s (timeouts.total)\"}}\n\n"
        );
        assert_eq!(*ends.lock().unwrap(), [End::Timeout(Phase::Total)]);
    }

    #[tokio::test(start_paused = true)]
    async fn non_sse_body_is_cut_with_an_error() {
        let (tx, mut b, ends) = body(false, Dialect::OpenAi);
        tx.send(Bytes::from_static(b"{\"partial\":")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
        let t0 = Instant::now();
        let e = b.frame().await.unwrap().unwrap_err();
        assert_eq!(t0.elapsed(), IDLE);
        assert_eq!(
            e.to_string(),
            "upstream sent nothing within 60s (timeouts.stream_idle)"
        );
        assert_eq!(*ends.lock().unwrap(), [End::Timeout(Phase::StreamIdle)]);
        drop(tx);
    }

    /// A client that takes one chunk and then reads nothing: hyper stops polling the body,
    /// and the watchdog still ends the call at `client_write` — recorded, the upstream side
    /// dropped — and at `total` when chunks are not even waiting on the client.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_without_being_polled() {
        let (tx, rx) = mpsc::channel(8);
        let ends = Arc::new(Mutex::new(Vec::new()));
        let timers = StreamTimers {
            stream_idle: IDLE,
            deadline: Instant::now() + TOTAL,
            total: TOTAL,
            client_write: Duration::from_secs(10),
        };
        let mut b = StreamBack::new(
            Chan(rx),
            timers,
            true,
            Dialect::OpenAi,
            CallGuard::new(Box::new(Rec(ends.clone()))),
            Outside::default(),
        );
        tx.send(Bytes::from_static(b"data: {}\n\n")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
        let t0 = Instant::now();
        // Never polled again: the watchdog checks every 5 s, so it fires at 10-15 s.
        while ends.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited <= Duration::from_secs(15),
            "{waited:?}"
        );
        assert_eq!(*ends.lock().unwrap(), [End::Timeout(Phase::ClientWrite)]);
        assert!(tx.is_closed(), "the upstream side was dropped");
        // Should the client read again, it learns why the stream ended.
        let ev = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&ev).contains("timeouts.client_write"));
        assert!(b.frame().await.is_none());

        // `total` fires on time even if the body is never polled at all.
        let (tx, mut b, ends) = body(true, Dialect::Anthropic);
        let t0 = Instant::now();
        while ends.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            t0.elapsed() - TOTAL < Duration::from_millis(200),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(*ends.lock().unwrap(), [End::Timeout(Phase::Total)]);
        assert!(tx.is_closed());
        let ev = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&ev).starts_with("event: error\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn complete_and_client_gone_are_recorded_once() {
        let (tx, mut b, ends) = body(true, Dialect::OpenAi);
        tx.send(Bytes::from_static(b"data: [DONE]\n\n"))
            .await
            .unwrap();
        drop(tx);
        assert!(b.frame().await.unwrap().is_ok());
        assert!(b.frame().await.is_none());
        drop(b);
        assert_eq!(*ends.lock().unwrap(), [End::Complete]);

        let (tx, mut b, ends) = body(true, Dialect::OpenAi);
        tx.send(Bytes::from_static(b"data: {}\n\n")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
        drop(b); // the client went away mid-stream
        assert_eq!(*ends.lock().unwrap(), [End::ClientGone]);
        // Dropping the body dropped the upstream side too: the sender sees it closed.
        assert!(tx.is_closed());
    }
}
