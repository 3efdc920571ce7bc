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
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use http::{header, HeaderValue, Response, StatusCode};

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
}

enum State {
    Streaming,
    Done,
}

/// The upstream body streamed through with timers and the call guard.
pub struct StreamBack<B: Body = Incoming> {
    inner: B,
    timers: StreamTimers,
    /// Fires at the earlier of the idle deadline and the total deadline.
    sleep: Pin<Box<Sleep>>,
    /// When the last chunk arrived (the idle timer is re-armed lazily from it).
    last_activity: Instant,
    sse: bool,
    dialect: Dialect,
    state: State,
    guard: CallGuard,
}

impl<B> StreamBack<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    /// Wraps an upstream body.
    pub fn new(
        inner: B,
        timers: StreamTimers,
        sse: bool,
        dialect: Dialect,
        guard: CallGuard,
    ) -> Self {
        let now = Instant::now();
        let first = (now + timers.stream_idle).min(timers.deadline);
        StreamBack {
            inner,
            timers,
            sleep: Box::pin(tokio::time::sleep_until(first)),
            last_activity: now,
            sse,
            dialect,
            state: State::Streaming,
            guard,
        }
    }

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

    fn end_with(&mut self, end: End, err: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.guard.finish(end);
        self.state = State::Done;
        if self.sse {
            let event = err.sse_event(self.dialect);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
        } else {
            Poll::Ready(Some(Err(Box::new(err))))
        }
    }
}

use std::future::Future;

impl<B> Body for StreamBack<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if matches!(this.state, State::Done) {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_activity = Instant::now();
                if let Some(data) = frame.data_ref() {
                    this.guard.on_data(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.guard.finish(End::Complete);
                this.state = State::Done;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let reason = error_chain(&e);
                this.end_with(
                    End::UpstreamError,
                    Error::UpstreamReset {
                        upstream: String::new(),
                        reason,
                    },
                )
            }
            Poll::Pending => {
                let Some(phase) = this.poll_timer(cx) else {
                    return Poll::Pending;
                };
                let after = match phase {
                    Phase::Total => this.timers.total,
                    _ => this.timers.stream_idle,
                };
                this.end_with(End::Timeout(phase), Error::Timeout { phase, after })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.state {
            State::Done => true,
            State::Streaming => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Streaming => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl<B: Body> Drop for StreamBack<B> {
    fn drop(&mut self) {
        // hyper stops polling once a body with a known length has delivered it all, so a body
        // dropped at its end is complete, not abandoned.
        if matches!(self.state, State::Streaming) && self.inner.is_end_stream() {
            self.guard.finish(End::Complete);
        }
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
        };
        let guard = CallGuard::new(Box::new(call));
        let body = StreamBack::new(body, timers, sse, dialect, guard);
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
        };
        let b = StreamBack::new(
            Chan(rx),
            timers,
            sse,
            dialect,
            CallGuard::new(Box::new(Rec(ends.clone()))),
        );
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
