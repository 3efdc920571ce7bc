//! Stream back: the response body ctxgate sends to the client.
//!
//! [`StreamBack`] passes the upstream's frames through as they arrive (no buffering) and
//! enforces two timers while doing so: `stream_idle` (longest gap between chunks) and `total`
//! (the whole call). Both are real timers registered with tokio, so they fire on time even
//! when no chunk arrives. When one fires, an SSE response ends with an error event in the
//! dialect's format and then closes; any other body is cut with an error, which makes hyper
//! close the connection so the client cannot mistake it for a complete answer.
//!
//! The body also carries the call's [`CallGuard`]: whatever must be released or recorded when
//! the response ends (metrics now; the gate permit and transcript record as they land). It
//! runs exactly once, on the last byte, on an error, or when the client goes away and hyper
//! drops the body — the same drop also drops the upstream body, which cancels the upstream
//! request.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::dialect::Dialect;
use crate::error::{Error, Phase};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Hooks run when a response ends; implemented by the proxy's per-call state.
pub trait CallEnd: Send + Sync + 'static {
    /// Called once, with how the response ended.
    fn finish(&mut self, end: End);
    /// Called for each data frame passed through (for the usage tap); must not block.
    fn on_data(&mut self, _data: &Bytes) {}
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The last byte was sent.
    Complete,
    /// A timer fired: the body was ended early.
    Timeout(Phase),
    /// The upstream failed mid-body.
    UpstreamError,
    /// The client went away before the end.
    ClientGone,
}

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
pub struct StreamBack {
    inner: Incoming,
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

impl StreamBack {
    /// Wraps an upstream body.
    pub fn new(
        inner: Incoming,
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
        if self.sse {
            let (oa_type, code, an_type) = match &err {
                Error::Timeout { .. } => ("server_error", "upstream_timeout", "timeout_error"),
                _ => ("server_error", "upstream_error", "api_error"),
            };
            let kind = match self.dialect {
                Dialect::OpenAi => oa_type,
                Dialect::Anthropic => an_type,
            };
            let event = self.dialect.sse_error_event(kind, code, &err.to_string());
            self.state = State::Done;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
        } else {
            self.state = State::Done;
            Poll::Ready(Some(Err(Box::new(err))))
        }
    }
}

use std::future::Future;

impl Body for StreamBack {
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
                let reason = crate::proxy::error_chain(&e);
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

impl Drop for StreamBack {
    fn drop(&mut self) {
        // hyper stops polling once a body with a known length has delivered it all, so a body
        // dropped at its end is complete, not abandoned.
        if matches!(self.state, State::Streaming) && self.inner.is_end_stream() {
            self.guard.finish(End::Complete);
        }
    }
}

/// The body of every response ctxgate sends: a streamed upstream body or one ctxgate made.
pub enum ResponseBody {
    /// The upstream's body, streamed through.
    Stream(StreamBack),
    /// A body made by ctxgate (errors, admin pages), with an optional guard to run at its end.
    Full(Full<Bytes>, Option<CallGuard>),
}

impl From<Bytes> for ResponseBody {
    fn from(b: Bytes) -> Self {
        ResponseBody::Full(Full::new(b), None)
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
            ResponseBody::Full(f, guard) => {
                let r = ready!(Pin::new(f).poll_frame(cx));
                if r.is_none() {
                    if let Some(mut g) = guard.take() {
                        g.finish(End::Complete);
                    }
                }
                Poll::Ready(r.map(|f| f.map_err(|never| match never {})))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Stream(s) => s.is_end_stream(),
            ResponseBody::Full(f, _) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Stream(s) => s.size_hint(),
            ResponseBody::Full(f, _) => f.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A ctxgate-made body is fully known: once hyper has it, the response is complete.
        if let ResponseBody::Full(f, Some(g)) = self {
            if f.is_end_stream() {
                g.finish(End::Complete);
            }
        }
    }
}
