//! [`Call`]: everything one request's phases learn about it, in one place. Each phase reads
//! what earlier ones stored and adds its own typed facts; none of them counts, logs or
//! records anything. `record` alone turns the facts into metrics, the log event and the
//! transcript record, once, when the call ends.
//!
//! A `Call` is also the call's drop guard: it is created the moment a request arrives, lives
//! in the request's future until the response headers, then in the response body. However the
//! call ends — the last byte, an error, a timeout, the client gone before or after the headers
//! (the future or the body dropped), an HTTP/2 reset — it is recorded exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use hyper::body::Incoming;

use crate::conn::{ConnKill, InFlight};
use crate::dialect::{Dialect, Tapped, UsageTap};
use crate::error::{Error, Phase};
use crate::gate::Permit;
use crate::prune::{Budget, ChatRequest, Summary};

use crate::config::Route;

use super::upstream::UpstreamClient;

/// The request body as the phases hand it on.
#[derive(Default)]
pub enum Payload {
    /// Not read (a request that is not a chat request): streamed through to the upstream.
    Stream(Incoming),
    /// Read whole but not a chat body ctxgate can parse: forwarded as it came.
    Opaque(Bytes),
    /// Read whole and parsed.
    Chat(Bytes, Box<ChatRequest>),
    /// The bytes to forward, decided by the prune phase.
    Ready(Bytes),
    /// Handed to the upstream request (or never there: a request without a body).
    #[default]
    Taken,
}

/// What the prune phase did with a chat request (the `action` label and the record's
/// `prune_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PruneAction {
    /// Not a chat request, or pruning is off for the route.
    #[default]
    None,
    /// Within budget: forwarded byte for byte.
    Unchanged,
    /// Forwarded pruned.
    Pruned,
    /// Refused: the pinned part over the limit, or an unparseable body with
    /// `on_parse_error = "reject"`.
    Rejected,
    /// Not parseable (or pruning failed): forwarded unchanged.
    Skipped,
    /// `mode = "shadow"`: pruning computed and reported, the original forwarded.
    Shadow,
    /// The conversation is in the holdout (`prune.holdout_percent`) and pruning would have
    /// changed the request: computed and reported, the original forwarded.
    Holdout,
}

impl PruneAction {
    /// Every action that is counted, in the order the metric's series are created.
    pub const COUNTED: [PruneAction; 6] = [
        PruneAction::Unchanged,
        PruneAction::Pruned,
        PruneAction::Rejected,
        PruneAction::Skipped,
        PruneAction::Shadow,
        PruneAction::Holdout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PruneAction::None => "none",
            PruneAction::Unchanged => "unchanged",
            PruneAction::Pruned => "pruned",
            PruneAction::Rejected => "rejected",
            PruneAction::Skipped => "skipped",
            PruneAction::Shadow => "shadow",
            PruneAction::Holdout => "holdout",
        }
    }
}

/// A route with everything it needs at run time.
pub struct RouteState {
    /// The route's config.
    pub config: Route,
    /// Its pooled upstream clients, one per event loop (`server.io_threads`): a call uses its
    /// loop's, so the upstream connection's task runs beside the call's.
    pub clients: Box<[UpstreamClient]>,
    /// Its place in the proxy's route list (the recorder keeps its metric series by it).
    pub index: usize,
}

impl RouteState {
    /// The upstream client of the event loop this runs on.
    pub fn client(&self) -> &UpstreamClient {
        &self.clients[crate::conn::loop_index() % self.clients.len()]
    }
}

/// Status recorded for a call whose client left before any response was sent.
pub const CLIENT_CLOSED: u16 = 499;

/// What ends a call: implemented by `record::Recorder`, the only one that records.
pub trait Finish: Send + Sync {
    /// The call has ended: record it. Called once per call, by the call itself.
    fn finish(&self, call: &mut Call, end: End);
}

/// Hooks run when a response ends; implemented by [`Call`]; `stream::CallGuard` calls them.
pub trait CallEnd: Send + Sync + 'static {
    /// Called once, with how the response ended.
    fn finish(&mut self, end: End);
    /// Called for each data frame passed through (for the usage tap); must not block.
    fn on_data(&mut self, _data: &Bytes) {}
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The last byte was sent.
    Complete,
    /// ctxgate answered with the error in `Call::failure` (before any upstream response).
    Failed,
    /// A timer fired: the body was ended early.
    Timeout(Phase),
    /// The upstream failed mid-body.
    UpstreamError,
    /// The client went away before the end.
    ClientGone,
    /// Handling the call panicked (a bug) and unwound through it.
    Panicked,
    /// `shutdown_grace` ended while the response was still streaming: cut.
    Shutdown,
}

/// A conversation id and where it came from (found by `identify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The id (bounded in length).
    pub id: String,
    /// Whether it is a fingerprint: a guess from the prompt, not an id the client sent.
    pub guessed: bool,
}

/// One call, from arrival to its record.
pub struct Call {
    /// When the request arrived.
    pub start: Instant,
    /// The arrival time as the record writes it.
    pub ts: String,
    /// The route, once routed (none: no route matched, or the target was refused).
    pub route: Option<Arc<RouteState>>,
    /// The route's dialect, or the one guessed for an unrouted request.
    pub dialect: Dialect,
    /// The request's method, target and headers (its body is in `payload`).
    pub request: Parts,
    /// The request body.
    pub payload: Payload,
    /// The conversation the call belongs to, if it has one.
    pub conversation: Option<String>,
    /// Whether that id is only a fingerprint of the prompt (a guess, not the client's id).
    pub guessed_conversation: bool,
    /// Whether this is a chat request (read whole; its answer carries usage).
    pub chat: bool,
    /// The request's `model`.
    pub model: Option<String>,
    /// Whether the request asked for a stream.
    pub stream: bool,
    /// The gate's permit, held from admission to the end of the call.
    pub permit: Option<Permit>,
    /// How long admission waited (set once admitted).
    pub waited: Option<Duration>,
    /// The budget the request was pruned to.
    pub budget: Option<Budget>,
    /// What pruning did.
    pub action: PruneAction,
    /// Why pruning skipped the request (`PruneAction::Skipped`).
    pub prune_reason: Option<&'static str>,
    /// Pruning's figures (not for rejected or skipped requests).
    pub summary: Option<Summary>,
    /// The conversation is in the holdout (`prune.holdout_percent`): forwarded unpruned.
    pub holdout: bool,
    /// Tokens of ctxgate's summary pinned into the forwarded prompt.
    pub summary_tokens: Option<u64>,
    /// How long the prune phase took.
    pub prune_took: Option<Duration>,
    /// Bytes of the chat body taken from the conversation's previous body unparsed, and bytes
    /// parsed.
    pub parsed_bytes: Option<(u64, u64)>,
    /// The forwarded messages, when transcripts include bodies.
    pub request_messages: Option<serde_json::Value>,
    /// When the request was handed to the upstream client.
    pub forwarded_at: Option<Instant>,
    /// When `timeouts.total` runs out (set when the call is forwarded: the gate wait has its
    /// own bound).
    pub deadline: Option<tokio::time::Instant>,
    /// The status sent to the client, once response headers exist.
    pub status: Option<u16>,
    /// Arrival to response headers.
    pub ttfb: Option<Duration>,
    /// The usage tap on the response body (chat answers only).
    pub tap: Option<UsageTap>,
    /// The error ctxgate answered with, or that broke the call off.
    pub failure: Option<Error>,
    /// The client connection (its kill switch), counting this call as in flight on it; none
    /// for a request not from the server's own accept loop.
    pub conn: Option<InFlight>,
    /// Set while the call is unrecorded; taken by the one recording.
    recorder: Option<Arc<dyn Finish>>,
}

impl Call {
    /// A call that has just arrived.
    pub fn new(recorder: Arc<dyn Finish>, request: Parts, body: Incoming) -> Call {
        let conn = request.extensions.get::<ConnKill>().map(ConnKill::call);
        Call {
            start: Instant::now(),
            ts: crate::transcript::now_ts(),
            route: None,
            // Set by route; guessed from the request only when no route matches.
            dialect: Dialect::OpenAi,
            request,
            payload: Payload::Stream(body),
            conversation: None,
            guessed_conversation: false,
            chat: false,
            model: None,
            stream: false,
            permit: None,
            waited: None,
            budget: None,
            action: PruneAction::None,
            prune_reason: None,
            conn,
            summary: None,
            holdout: false,
            summary_tokens: None,
            prune_took: None,
            parsed_bytes: None,
            request_messages: None,
            forwarded_at: None,
            deadline: None,
            status: None,
            ttfb: None,
            tap: None,
            failure: None,
            recorder: Some(recorder),
        }
    }

    /// Stores the conversation identify found.
    pub fn identify(&mut self, id: Option<Identity>) {
        if let Some(i) = id {
            self.conversation = Some(i.id);
            self.guessed_conversation = i.guessed;
        }
    }

    /// The route's name, or `none`.
    pub fn route_name(&self) -> &str {
        self.route
            .as_ref()
            .map_or("none", |r| r.config.name.as_str())
    }

    /// The usage found by the tap so far (none without a tap).
    pub fn take_usage(&mut self) -> Tapped {
        self.tap.take().map(UsageTap::finish).unwrap_or_default()
    }

    /// Ends the call: records it (the first time only) and releases its permit.
    pub fn end(&mut self, end: End) {
        if let Some(r) = self.recorder.take() {
            r.finish(self, end);
        }
        self.permit = None;
    }

    /// The timeout phase of the failure, if it is a timeout.
    pub fn timeout_phase(&self) -> Option<Phase> {
        match &self.failure {
            Some(Error::Timeout { phase, .. }) => Some(*phase),
            _ => None,
        }
    }
}

impl CallEnd for Call {
    fn finish(&mut self, end: End) {
        self.end(end);
    }

    fn on_data(&mut self, data: &Bytes) {
        if let Some(t) = self.tap.as_mut() {
            t.feed(data);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Dropped unrecorded: the request's future was dropped (the client left before the
        // response headers, or reset its HTTP/2 stream), or a bug panicked through it.
        if std::thread::panicking() {
            self.end(End::Panicked);
        } else {
            self.end(End::ClientGone);
        }
    }
}
