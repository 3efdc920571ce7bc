//! The one error enum of the request path. Each variant the client can see gets its status
//! from one exhaustive `match`, a body in the route's dialect, and a short `kind()` used as
//! the metric label. Messages are lowercase and name the number crossed and the config key.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::dialect::{Dialect, ErrorClass};

/// A timed phase of an upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP + TLS connect (`timeouts.connect`).
    Connect,
    /// Waiting for the response headers (`timeouts.response_headers`).
    ResponseHeaders,
    /// Gap between response body chunks (`timeouts.stream_idle`).
    StreamIdle,
    /// The whole call (`timeouts.total`).
    Total,
    /// A response chunk the client did not take (`timeouts.client_write`).
    ClientWrite,
}

impl Phase {
    /// Metric label and the last part of the config key.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::ResponseHeaders => "response_headers",
            Phase::StreamIdle => "stream_idle",
            Phase::Total => "total",
            Phase::ClientWrite => "client_write",
        }
    }
}

/// Errors the client sees, in the dialect of the route that served the request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No route's prefix matches the path.
    #[error("no route serves {method} {path}; configured prefixes: {prefixes}")]
    NoRoute {
        method: String,
        path: String,
        prefixes: String,
    },
    /// The request target is unusable (dot segments, CONNECT, …).
    #[error("bad request target: {0}")]
    BadTarget(String),
    /// The request body is over `max_body_bytes`.
    #[error("request body is larger than {limit} bytes (max_body_bytes)")]
    BodyTooLarge { limit: u64 },
    /// Reading the request body from the client failed.
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    /// The upstream could not be reached (refused, DNS, TLS).
    #[error("upstream {upstream} could not be reached: {reason}")]
    UpstreamConnect { upstream: String, reason: String },
    /// The upstream closed or reset the connection before answering.
    #[error("upstream {upstream} closed the connection before answering: {reason}")]
    UpstreamReset { upstream: String, reason: String },
    /// The chat body could not be parsed and `prune.on_parse_error = "reject"`.
    #[error("request body is not a valid chat request: {0} (prune.on_parse_error)")]
    BadChatBody(String),
    /// The pinned part of the prompt alone is over the token limit.
    #[error("{}", .0.message)]
    ContextOverflow(crate::prune::Rejection),
    /// The gate refused the request: its conversation's queue is full or the wait timed out.
    #[error("{0}")]
    Gate(crate::gate::Rejected),
    /// A phase ran past its timeout before the response started.
    #[error("{}", timeout_message(*.phase, *.after))]
    Timeout { phase: Phase, after: Duration },
    /// The client's request body stalled (`server.body_idle_timeout`) or took too long
    /// (`server.body_total_timeout`).
    #[error("the request body did not arrive within {} ({key})", crate::config::fmt_duration(*.after))]
    BodyTimeout { key: &'static str, after: Duration },
    /// Too many large bodies are already waiting for the heavy-work pool.
    #[error("ctxgate is busy: {0} large requests are already waiting to be parsed; retry shortly")]
    Busy(usize),
    /// ctxgate is shutting down and `shutdown_grace` is over: the call was cut.
    #[error("ctxgate is shutting down: the call was cut at the end of shutdown_grace")]
    ShuttingDown,
}

fn timeout_message(phase: Phase, after: Duration) -> String {
    let what = match phase {
        Phase::Connect => "could not connect to the upstream",
        Phase::ResponseHeaders => "upstream sent no response headers",
        Phase::StreamIdle => "upstream sent nothing",
        Phase::Total => "upstream call did not finish",
        Phase::ClientWrite => "the client did not read the response",
    };
    format!(
        "{what} within {} (timeouts.{})",
        crate::config::fmt_duration(after),
        phase.as_str()
    )
}

impl Error {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NoRoute { .. } => StatusCode::NOT_FOUND,
            Error::BadTarget(_) => StatusCode::BAD_REQUEST,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BodyRead(_) => StatusCode::BAD_REQUEST,
            Error::UpstreamConnect { .. } => StatusCode::BAD_GATEWAY,
            Error::UpstreamReset { .. } => StatusCode::BAD_GATEWAY,
            Error::Gate(crate::gate::Rejected::StateUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Gate(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::BadChatBody(_) => StatusCode::BAD_REQUEST,
            Error::ContextOverflow(_) => StatusCode::BAD_REQUEST,
            Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Error::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoRoute { .. } => "no_route",
            Error::BadTarget(_) => "bad_target",
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::BodyRead(_) => "body_read",
            Error::UpstreamConnect { .. } => "upstream_connect",
            Error::UpstreamReset { .. } => "upstream_reset",
            Error::BadChatBody(_) => "bad_chat_body",
            Error::ContextOverflow(_) => "context_length_exceeded",
            Error::Gate(crate::gate::Rejected::QueueFull { .. }) => "gate_queue_full",
            Error::Gate(crate::gate::Rejected::QueueTimeout { .. }) => "gate_queue_timeout",
            Error::Gate(crate::gate::Rejected::TableFull { .. }) => "gate_table_full",
            Error::Gate(crate::gate::Rejected::StateUnavailable) => "state_unavailable",
            Error::Timeout {
                phase: Phase::Connect,
                ..
            } => "timeout_connect",
            Error::Timeout {
                phase: Phase::ResponseHeaders,
                ..
            } => "timeout_response_headers",
            Error::Timeout {
                phase: Phase::StreamIdle,
                ..
            } => "timeout_stream_idle",
            Error::Timeout {
                phase: Phase::Total,
                ..
            } => "timeout_total",
            Error::Timeout {
                phase: Phase::ClientWrite,
                ..
            } => "timeout_client_write",
            Error::ShuttingDown => "shutdown",
            Error::Busy(_) => "busy",
            Error::BodyTimeout { .. } => "body_timeout",
        }
    }

    /// The error's class (each dialect spells it its own way) and its machine-readable code.
    fn wire(&self) -> (ErrorClass, &'static str) {
        match self {
            Error::NoRoute { .. } => (ErrorClass::NotFound, "route_not_found"),
            Error::BadTarget(_) => (ErrorClass::InvalidRequest, "bad_target"),
            Error::BodyTooLarge { .. } => (ErrorClass::TooLarge, "request_too_large"),
            Error::BodyRead(_) => (ErrorClass::InvalidRequest, "body_read"),
            Error::UpstreamConnect { .. } => (ErrorClass::Upstream, "upstream_unreachable"),
            Error::UpstreamReset { .. } => (ErrorClass::Upstream, "upstream_reset"),
            Error::Gate(crate::gate::Rejected::StateUnavailable) => {
                (ErrorClass::Upstream, "state_unavailable")
            }
            Error::Gate(r) => (ErrorClass::RateLimit, r.reason()),
            Error::BadChatBody(_) => (ErrorClass::InvalidRequest, "invalid_chat_body"),
            Error::ContextOverflow(_) => (ErrorClass::InvalidRequest, "context_length_exceeded"),
            Error::Timeout {
                phase: Phase::ClientWrite,
                ..
            } => (ErrorClass::Timeout, "client_timeout"),
            Error::Timeout { .. } => (ErrorClass::Timeout, "upstream_timeout"),
            Error::ShuttingDown => (ErrorClass::Upstream, "shutting_down"),
            Error::Busy(_) => (ErrorClass::RateLimit, "busy"),
            Error::BodyTimeout { .. } => (ErrorClass::InvalidRequest, "request_timeout"),
        }
    }

    /// The JSON body in `dialect`'s error shape.
    pub fn body(&self, dialect: Dialect) -> String {
        let (class, code) = self.wire();
        let wire = dialect.wire();
        let message = match self {
            Error::ContextOverflow(r) => {
                wire.overflow_message(&r.message, r.pinned_tokens, r.limit)
            }
            _ => self.to_string(),
        };
        wire.error_body(class, code, &message)
    }

    /// The SSE event that ends a stream this error broke off mid-body, in `dialect`'s format.
    pub fn sse_event(&self, dialect: Dialect) -> String {
        let (class, code) = match self {
            Error::Timeout { .. } | Error::ShuttingDown => self.wire(),
            _ => (ErrorClass::Upstream, "upstream_error"),
        };
        dialect
            .wire()
            .sse_error_event(class, code, &self.to_string())
    }

    /// The full response: status, JSON body, and `x-ctxgate-error` naming the kind.
    pub fn to_response<B: From<Bytes>>(&self, dialect: Dialect) -> Response<B> {
        let body = Bytes::from(self.body(dialect));
        let mut resp = Response::new(B::from(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-ctxgate-error", HeaderValue::from_static(self.kind()));
        if let Error::ContextOverflow(r) = self {
            h.insert(
                "x-ctxgate-pinned-tokens",
                HeaderValue::from(r.pinned_tokens),
            );
            h.insert("x-ctxgate-limit-tokens", HeaderValue::from(r.limit));
        }
        if let Error::Gate(r) = self {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(r.retry_after().as_secs().max(1)),
            );
        }
        if let Error::Busy(_) = self {
            h.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_503_with_retry_after_in_the_dialects_shape() {
        let e = Error::Busy(128);
        let r: http::Response<Bytes> = e.to_response(Dialect::OpenAi);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["x-ctxgate-error"], "busy");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"]["code"], "busy");
        assert_eq!(
            v["error"]["message"],
            "ctxgate is busy: 128 large requests are already waiting to be parsed; retry shortly"
        );
        let v: serde_json::Value = serde_json::from_str(&e.body(Dialect::Anthropic)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }

    #[test]
    fn timeout_message_names_key() {
        let e = Error::Timeout {
            phase: Phase::ResponseHeaders,
            after: Duration::from_secs(120),
        };
        assert_eq!(
            e.to_string(),
            "upstream sent no response headers within 120s (timeouts.response_headers)"
        );
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        let v: serde_json::Value = serde_json::from_str(&e.body(Dialect::Anthropic)).unwrap();
        assert_eq!(v["error"]["type"], "timeout_error");
    }
}
