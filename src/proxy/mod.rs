//! The life of a request, one phase after another:
//!
//! ```text
//! client ─► route ─► identify ─► gate ─► prune ─► forward ─► stream back ─► record
//! ```
//!
//! 1. **route** ([`Proxy::route`]): the longest configured prefix that matches the path picks
//!    the upstream. Only the path and query of the request target are used, so absolute-form
//!    targets and `Host` headers cannot steer ctxgate to another host; dot segments are refused.
//! 2. **identify**, 3. **gate**, 4. **prune**: chat requests (OpenAI `POST …/chat/completions`,
//!    Anthropic `POST …/v1/messages`) are read whole (within `max_body_bytes`) so they can be
//!    identified, gated and pruned; every other request streams through untouched.
//! 5. **forward** ([`Proxy::forward`]): hop-by-hop headers removed, `Host` set by the client
//!    from the upstream URL, everything else passed through as is, on the route's pooled client,
//!    bounded by `timeouts.connect` and `timeouts.response_headers`.
//! 6. **stream back** ([`body::StreamBack`]): the response body streams through frame by frame,
//!    bounded by `timeouts.stream_idle` and `timeouts.total`.
//! 7. **record**: the call's [`body::CallGuard`] runs once at the end of the body and records
//!    the outcome.

pub mod body;
pub mod heavy;
pub mod identify;
pub mod upstream;
pub mod usage;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use prometheus::{Histogram, IntCounter};

use crate::config::{Config, Conversation, OnParseError, Route};
use crate::dialect::Dialect;
use crate::error::{Error, Phase};
use crate::gate::{Gates, Permit};
use crate::metrics::Metrics;
use crate::prune::{self, Budget, ChatRequest, Counter, Outcome, ParseError, Summary, View};
use crate::transcript::{Record, Transcripts, Usage};
use body::{CallEnd, CallGuard, End, ResponseBody, StreamBack, StreamTimers};
use upstream::{RequestBody, UpstreamClient};
use usage::{Tapped, UsageTap};

/// A route with everything it needs at run time.
pub struct RouteState {
    /// The route's config.
    pub config: Route,
    /// Its pooled upstream client.
    pub client: UpstreamClient,
    metrics: RouteMetrics,
    prune_metrics: crate::metrics::PruneMetrics,
}

/// Per-route metric handles, resolved once so the hot path does no label lookups.
#[derive(Clone)]
struct RouteMetrics {
    duration: Histogram,
    ttfb: Histogram,
    overhead: Histogram,
    disconnects: IntCounter,
    gate_wait: Histogram,
}

impl RouteMetrics {
    fn new(m: &Metrics, route: &str) -> Self {
        RouteMetrics {
            duration: m.request_duration.with_label_values(&[route]),
            ttfb: m.ttfb.with_label_values(&[route]),
            overhead: m.overhead.with_label_values(&[route]),
            disconnects: m.client_disconnects.with_label_values(&[route]),
            gate_wait: m.gate_wait.with_label_values(&[route]),
        }
    }
}

/// The proxy: routes, clients and metrics, shared by every connection.
pub struct Proxy {
    /// Routes sorted by prefix length, longest first, so the first match is the longest.
    routes: Vec<Arc<RouteState>>,
    max_body_bytes: u64,
    metrics: Metrics,
    gates: Arc<Gates>,
    conversation: Conversation,
    counter: Arc<Counter>,
    view: Arc<View>,
    transcripts: Transcripts,
    heavy: heavy::Heavy,
}

impl Proxy {
    /// Builds the proxy and one pooled client per route.
    pub fn new(
        config: &Config,
        metrics: Metrics,
        transcripts: Transcripts,
    ) -> Result<Proxy, upstream::BuildError> {
        let native = upstream::native_roots();
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let client = upstream::build_client(r, &native)?;
            routes.push(Arc::new(RouteState {
                config: r.clone(),
                client,
                metrics: RouteMetrics::new(&metrics, &r.name),
                prune_metrics: metrics.prune_for(&r.name),
            }));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.config.prefix.len()));
        let g = &config.gates;
        let gates = Gates::new(
            crate::gate::Limits {
                per_conversation: g.max_concurrent_per_conversation,
                max_queue_per_conversation: g.max_queue_per_conversation,
                queue_timeout: g.queue_timeout,
                max_inflight: g.max_inflight,
                idle_ttl: g.idle_ttl,
            },
            config
                .routes
                .iter()
                .filter_map(|r| r.max_inflight.map(|n| (r.name.clone(), n))),
        );
        Ok(Proxy {
            routes,
            max_body_bytes: config.max_body_bytes,
            metrics,
            gates,
            conversation: config.conversation.clone(),
            counter: Arc::new(
                Counter::new(config.prune.budget.default_encoding)
                    .map_err(upstream::BuildError::Counter)?,
            ),
            view: Arc::new(View::new(
                config.prune.view_max_bytes,
                config.prune.view_idle_ttl,
            )),
            transcripts,
            // One low-priority thread per core: heavy requests use idle CPU in parallel, and
            // yield it to the async workers whenever they need it.
            heavy: heavy::Heavy::new(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            ),
        })
    }

    /// The conversation view, for its gauges.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// The gates, for the sweeper and the gauges.
    pub fn gates(&self) -> &Arc<Gates> {
        &self.gates
    }

    /// The routes, longest prefix first.
    pub fn routes(&self) -> &[Arc<RouteState>] {
        &self.routes
    }

    /// Serves one request. Never fails: every error becomes a response in the dialect's shape.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let start = Instant::now();
        let route = match self.route(req.method(), req.uri()) {
            Ok(r) => r,
            Err(e) => {
                // No route: no dialect either; OpenAI's shape is the common one, and Anthropic
                // clients are recognised by their path.
                let dialect = if req.uri().path().ends_with("/v1/messages")
                    || req.headers().contains_key("anthropic-version")
                {
                    Dialect::Anthropic
                } else {
                    Dialect::OpenAi
                };
                tracing::debug!(method = %req.method(), path = %req.uri().path(), "no route");
                let mut info = CallInfo::new();
                info.status = e.status().as_u16();
                info.error_kind = Some(e.kind());
                self.transcripts.submit(info.into_unrouted_record(start));
                return Ok(self.error_response("none", dialect, e));
            }
        };
        let dialect = route.config.dialect;
        let mut info = CallInfo::new();
        match self.forward(&route, req, start, &mut info).await {
            Ok(resp) => Ok(resp),
            Err(e) => {
                if let Error::Timeout { phase, .. } = &e {
                    self.metrics
                        .timeouts
                        .with_label_values(&[&route.config.name, phase.as_str()])
                        .inc();
                }
                if matches!(
                    e,
                    Error::UpstreamConnect { .. }
                        | Error::UpstreamReset { .. }
                        | Error::Timeout { .. }
                ) {
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[&route.config.name, e.kind()])
                        .inc();
                }
                tracing::warn!(route = %route.config.name, kind = e.kind(), error = %e, "request failed");
                info.status = e.status().as_u16();
                info.error_kind = Some(e.kind());
                let resp = self.error_response(&route.config.name, dialect, e);
                route
                    .metrics
                    .duration
                    .observe(start.elapsed().as_secs_f64());
                self.transcripts
                    .submit(info.into_record(&route, start, &Tapped::default()));
                Ok(resp)
            }
        }
    }

    fn error_response(&self, route: &str, dialect: Dialect, e: Error) -> Response<ResponseBody> {
        let status = e.status();
        self.metrics
            .requests
            .with_label_values(&[route, status.as_str()])
            .inc();
        e.into_response(dialect)
    }

    /// Phase 1, route: the longest matching prefix. Only the path is looked at.
    pub fn route(&self, method: &Method, uri: &Uri) -> Result<Arc<RouteState>, Error> {
        let path = uri.path();
        if method == Method::CONNECT {
            return Err(Error::BadTarget(
                "CONNECT is not supported: ctxgate is not an open proxy".into(),
            ));
        }
        check_path(path)?;
        for r in &self.routes {
            let p = r.config.prefix.as_str();
            // "/openai" (no trailing slash) also selects the "/openai/" route.
            if path.starts_with(p) || path == &p[..p.len() - 1] {
                return Ok(r.clone());
            }
        }
        Err(Error::NoRoute {
            method: method.to_string(),
            path: path.to_string(),
            prefixes: self
                .routes
                .iter()
                .map(|r| r.config.prefix.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Phases 2 to 6 for a routed request.
    async fn forward(
        &self,
        route: &Arc<RouteState>,
        req: Request<Incoming>,
        start: Instant,
        info: &mut CallInfo,
    ) -> Result<Response<ResponseBody>, Error> {
        let cfg = &route.config;
        let (mut parts, body) = req.into_parts();

        if let Some(len) = content_length(&parts.headers) {
            if len > self.max_body_bytes {
                return Err(Error::BodyTooLarge {
                    limit: self.max_body_bytes,
                });
            }
        }
        let uri = upstream_uri(cfg, parts.uri.path(), parts.uri.query())?;

        // Identify. Chat bodies are read whole: identify, gate and prune need them. Parsing
        // and fingerprinting a large body runs on the blocking pool, like pruning it.
        let (stream_body, chat, conversation) = if is_chat(
            cfg.dialect,
            &parts.method,
            parts.uri.path(),
        ) {
            let frames = read_body(body, self.max_body_bytes).await?;
            let (bytes, parsed, conversation) = if frames.len() > INLINE_PRUNE_BYTES {
                let (f, h, c, r) = (
                    frames.clone(),
                    parts.headers.clone(),
                    self.conversation.clone(),
                    route.clone(),
                );
                self.heavy
                    .run(move || {
                        let bytes = f.join();
                        let (parsed, id) = parse_and_identify(&r.config, &bytes, &h, &c);
                        (bytes, parsed, id)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(route = %cfg.name, error = %e, "parsing task failed");
                        (frames.join(), Err(ParseError::NotObject), None)
                    })
            } else {
                let bytes = frames.join();
                let (parsed, id) =
                    parse_and_identify(cfg, &bytes, &parts.headers, &self.conversation);
                (bytes, parsed, id)
            };
            let parsed = match parsed {
                Ok(p) => Some(p),
                Err(e) if cfg.prune.enabled && cfg.prune.on_parse_error == OnParseError::Reject => {
                    route.prune_metrics.action("rejected");
                    return Err(Error::BadChatBody(e.to_string()));
                }
                Err(e) => {
                    tracing::debug!(route = %cfg.name, error = %e, "chat body not parseable; forwarded unchanged");
                    None
                }
            };
            (None, Some((bytes, parsed)), conversation)
        } else {
            let id =
                identify::conversation_id(&parts.headers, &self.conversation, |_| None, || None);
            (Some(body), None, id)
        };
        info.chat = chat.is_some();
        if let Some(p) = chat.as_ref().and_then(|(_, p)| p.as_ref()) {
            info.model = p.model().map(str::to_string);
            info.stream = p.is_stream();
        }
        info.conversation = conversation.clone();

        // Gate.
        let permit = self.admit(route, conversation.as_deref()).await?;

        // Prune.
        let mut pruned_headers = None;
        let body: RequestBody = match chat {
            None => {
                let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
                match stream_body {
                    Some(b) => Either::Left(Limited::new(b, limit)),
                    None => Either::Right(Full::new(Bytes::new())),
                }
            }
            Some((bytes, None)) => {
                if cfg.prune.enabled {
                    route.prune_metrics.action("skipped");
                    info.action = "skipped";
                }
                Either::Right(Full::new(bytes))
            }
            Some((bytes, Some(req))) if cfg.prune.enabled => {
                let limit = token_limit_header(&parts.headers)?;
                let conv = conversation.clone().unwrap_or_default();
                let started = Instant::now();
                let outcome = self.run_prune(route, req, conv, limit, info).await;
                route
                    .prune_metrics
                    .duration
                    .observe(started.elapsed().as_secs_f64());
                match outcome {
                    PhaseOutcome::Forward => {
                        if self.transcripts.include_bodies() {
                            info.request_messages = messages_of(&bytes);
                        }
                        Either::Right(Full::new(bytes))
                    }
                    PhaseOutcome::Replace(body, summary) => {
                        parts.headers.remove(header::CONTENT_LENGTH);
                        parts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                        pruned_headers = Some(summary);
                        if self.transcripts.include_bodies() {
                            info.request_messages = messages_of(&body);
                        }
                        Either::Right(Full::new(Bytes::from(body)))
                    }
                    PhaseOutcome::Reject(e) => return Err(e),
                }
            }
            Some((bytes, Some(_))) => Either::Right(Full::new(bytes)),
        };
        parts.headers.remove(TOKEN_LIMIT_HEADER);

        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let up_req = Request::from_parts(parts, body);

        route.metrics.overhead.observe(
            start
                .elapsed()
                .saturating_sub(permit.waited())
                .as_secs_f64(),
        );

        // Forward. The call's timers start once it is admitted: the gate wait has its own bound.
        let deadline = tokio::time::Instant::now() + cfg.timeouts.total;
        let resp = await_headers(route.client.request(up_req), &cfg.timeouts, deadline)
            .await?
            .map_err(|e| classify(&e, cfg, self.max_body_bytes))?;

        // Stream back.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        info.status = parts.status.as_u16();
        info.ttfb = Some(start.elapsed());
        if let Some(s) = &pruned_headers {
            let h = &mut parts.headers;
            h.insert(
                "x-ctxgate-tokens-before",
                HeaderValue::from(s.tokens_before),
            );
            h.insert("x-ctxgate-tokens-after", HeaderValue::from(s.tokens_after));
            h.insert(
                "x-ctxgate-messages-dropped",
                HeaderValue::from(s.messages_dropped),
            );
        }
        route.metrics.ttfb.observe(start.elapsed().as_secs_f64());
        self.metrics
            .requests
            .with_label_values(&[&cfg.name, parts.status.as_str()])
            .inc();
        let sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        // Usage is read from chat answers only: nothing else carries prompt usage.
        let tap = info
            .chat
            .then(|| UsageTap::new(cfg.dialect, sse, self.transcripts.include_bodies()));
        let guard = CallGuard::new(Box::new(CallRecord {
            start,
            route: route.clone(),
            metrics: self.metrics.clone(),
            info: std::mem::take(info),
            tap,
            transcripts: self.transcripts.clone(),
            _permit: permit,
        }));
        let timers = StreamTimers {
            stream_idle: cfg.timeouts.stream_idle,
            deadline,
            total: cfg.timeouts.total,
        };
        let body = StreamBack::new(body, timers, sse, cfg.dialect, guard);
        Ok(Response::from_parts(parts, ResponseBody::Stream(body)))
    }

    /// Phase 3, gate: a conversation's request waits for its conversation's slot, then the
    /// route and global caps; a request with no conversation takes only the caps.
    async fn admit(&self, route: &RouteState, conversation: Option<&str>) -> Result<Permit, Error> {
        let name = route.config.name.as_str();
        let admitted = match conversation {
            Some(id) => self.gates.acquire(id, name).await,
            None => self.gates.acquire_shared(name).await,
        };
        match admitted {
            Ok(permit) => {
                let waited = permit.waited();
                route.metrics.gate_wait.observe(waited.as_secs_f64());
                // Admission always takes a few microseconds; only a real wait is worth a line.
                if waited >= std::time::Duration::from_millis(1) {
                    tracing::info!(
                        route = name,
                        waited_ms = waited.as_millis() as u64,
                        "request waited for its gate"
                    );
                }
                Ok(permit)
            }
            Err(rejected) => {
                self.metrics
                    .gate_rejections
                    .with_label_values(&[name, rejected.reason()])
                    .inc();
                tracing::warn!(
                    route = name,
                    reason = rejected.reason(),
                    "request rejected by the gate"
                );
                Err(Error::Gate(rejected))
            }
        }
    }
}

/// Parses a chat body and finds its conversation id (header, body field, or fingerprint).
fn parse_and_identify(
    route: &Route,
    body: &[u8],
    headers: &HeaderMap,
    conversation: &Conversation,
) -> (Result<ChatRequest, prune::ParseError>, Option<String>) {
    let parsed = ChatRequest::parse(route.dialect, body);
    let p = parsed.as_ref().ok();
    let id = identify::conversation_id(
        headers,
        conversation,
        |path| p.and_then(|p| p.field_str(path)),
        || p.map(|p| p.fingerprint(&route.name)),
    );
    (parsed, id)
}

/// What the prune phase decided for the proxy.
enum PhaseOutcome {
    /// Forward the original bytes.
    Forward,
    /// Forward this body instead.
    Replace(Vec<u8>, Summary),
    /// Answer with this error.
    Reject(Error),
}

/// The request header with which a request lowers (never raises) its own token limit.
pub const TOKEN_LIMIT_HEADER: &str = "x-ctxgate-token-limit";

/// Bodies above this size are parsed and pruned on the low-priority heavy pool, so that
/// counting a pathological prompt never stalls the async workers serving other conversations.
const INLINE_PRUNE_BYTES: usize = 32 * 1024;

fn token_limit_header(h: &HeaderMap) -> Result<Option<u64>, Error> {
    let Some(v) = h.get(TOKEN_LIMIT_HEADER) else {
        return Ok(None);
    };
    match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(n) if n > 0 => Ok(Some(n)),
        _ => Err(Error::BadTarget(format!(
            "{TOKEN_LIMIT_HEADER} must be a positive integer, got {:?}",
            String::from_utf8_lossy(v.as_bytes())
        ))),
    }
}

/// The budget for one request: the route's (or its model's), lowered by the request's own
/// `x-ctxgate-token-limit` if that is smaller. The target keeps its ratio to the limit.
pub fn effective_budget(
    route: &crate::config::RoutePrune,
    model: Option<&str>,
    limit: Option<u64>,
) -> Budget {
    let mut b = route.budget_for(model).clone();
    if let Some(l) = limit {
        if l < b.hard_token_limit {
            b.target_tokens = (u128::from(b.target_tokens) * u128::from(l)
                / u128::from(b.hard_token_limit.max(1))) as u64;
            b.target_tokens = b.target_tokens.clamp(1, l);
            b.hard_token_limit = l;
        }
    }
    b
}

/// Runs the pure pruning function, catching a panic (a bug must cost one request its
/// pruning, never the process or the connection).
pub fn prune_guarded(
    req: &ChatRequest,
    budget: &Budget,
    view: &View,
    conversation: &str,
    counter: &Counter,
) -> Option<Outcome> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        prune::prune(req, budget, view, conversation, counter)
    })) {
        Ok(o) => Some(o),
        Err(_) => {
            tracing::error!("pruning panicked; the request is forwarded unchanged");
            None
        }
    }
}

impl Proxy {
    /// Phase 4, prune: decides what to forward and records the decision in metrics and logs.
    async fn run_prune(
        &self,
        route: &RouteState,
        req: ChatRequest,
        conversation: String,
        limit: Option<u64>,
        info: &mut CallInfo,
    ) -> PhaseOutcome {
        let cfg = &route.config;
        let budget = effective_budget(&cfg.prune, req.model(), limit);
        let outcome = if req.body_len() > INLINE_PRUNE_BYTES {
            let (view, counter, b) = (self.view.clone(), self.counter.clone(), budget.clone());
            match self
                .heavy
                .run(move || prune_guarded(&req, &b, &view, &conversation, &counter))
                .await
            {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(route = %cfg.name, error = %e, "pruning task failed; forwarded unchanged");
                    None
                }
            }
        } else {
            prune_guarded(&req, &budget, &self.view, &conversation, &self.counter)
        };
        let m = &route.prune_metrics;
        let Some(outcome) = outcome else {
            m.action("skipped");
            info.action = "skipped";
            return PhaseOutcome::Forward;
        };
        info.summary = outcome.summary().cloned();
        if let Some(s) = outcome.summary() {
            m.tokens_before.observe(s.tokens_before as f64);
            m.tokens_after.observe(s.tokens_after as f64);
            if s.cut_moved {
                m.cut_moves.inc();
            }
        }
        match outcome {
            Outcome::Unchanged(_) => {
                m.action("unchanged");
                info.action = "unchanged";
                PhaseOutcome::Forward
            }
            Outcome::Shadow(s) => {
                m.action("shadow");
                info.action = "shadow";
                log_pruned(&cfg.name, &s, true);
                PhaseOutcome::Forward
            }
            Outcome::Pruned { body, summary } => {
                m.action("pruned");
                info.action = "pruned";
                m.tokens_removed
                    .inc_by(summary.tokens_before.saturating_sub(summary.tokens_after));
                m.messages_dropped.inc_by(summary.messages_dropped as u64);
                m.files_elided.inc_by(summary.files_elided as u64);
                log_pruned(&cfg.name, &summary, false);
                PhaseOutcome::Replace(body, summary)
            }
            Outcome::Rejected(r) => {
                m.action("rejected");
                info.action = "rejected";
                tracing::warn!(route = %cfg.name, pinned_tokens = r.pinned_tokens, limit = r.limit, "request rejected: pinned part over the token limit");
                PhaseOutcome::Reject(Error::ContextOverflow(r))
            }
        }
    }
}

fn log_pruned(route: &str, s: &Summary, shadow: bool) {
    let reduction = if s.tokens_before == 0 {
        0.0
    } else {
        100.0 * (1.0 - s.tokens_after as f64 / s.tokens_before as f64)
    };
    tracing::info!(
        route,
        shadow,
        messages_before = s.messages_before,
        messages_after = s.messages_after,
        chars_before = s.chars_before,
        chars_after = s.chars_after,
        tokens_before = s.tokens_before,
        tokens_before_exact = s.tokens_before_exact,
        tokens_after = s.tokens_after,
        files_elided = s.files_elided,
        cut_moved = s.cut_moved,
        reduction_pct = (reduction * 10.0).round() / 10.0,
        "{}: {} -> {} messages, ~{} -> {} tokens ({:.1}% reduction)",
        if shadow { "shadow prune" } else { "pruned" },
        s.messages_before,
        s.messages_after,
        s.tokens_before,
        s.tokens_after,
        reduction
    );
}

/// Waits for the upstream's response headers, bounded by `timeouts.response_headers` and by
/// the call's `total` deadline, whichever comes first; the error names the phase that fired.
pub async fn await_headers<F: std::future::Future>(
    fut: F,
    timeouts: &crate::config::Timeouts,
    deadline: tokio::time::Instant,
) -> Result<F::Output, Error> {
    let headers_deadline = (tokio::time::Instant::now() + timeouts.response_headers).min(deadline);
    match tokio::time::timeout_at(headers_deadline, fut).await {
        Ok(out) => Ok(out),
        Err(_) if headers_deadline >= deadline => Err(Error::Timeout {
            phase: Phase::Total,
            after: timeouts.total,
        }),
        Err(_) => Err(Error::Timeout {
            phase: Phase::ResponseHeaders,
            after: timeouts.response_headers,
        }),
    }
}

/// What is learnt about a call phase by phase; at its end it becomes the transcript record.
#[derive(Default)]
pub struct CallInfo {
    ts: String,
    conversation: Option<String>,
    model: Option<String>,
    stream: bool,
    chat: bool,
    action: &'static str,
    summary: Option<Summary>,
    request_messages: Option<serde_json::Value>,
    status: u16,
    ttfb: Option<std::time::Duration>,
    error_kind: Option<&'static str>,
}

impl CallInfo {
    fn new() -> Self {
        CallInfo {
            ts: crate::transcript::now_ts(),
            action: "none",
            ..CallInfo::default()
        }
    }

    fn into_record(self, route: &RouteState, start: Instant, tapped: &Tapped) -> Record {
        let s = self.summary.as_ref();
        let usage = Usage {
            input_tokens: tapped.input_tokens,
            output_tokens: tapped.output_tokens,
            cache_read_tokens: tapped.cache_read_tokens,
            cache_write_tokens: tapped.cache_write_tokens,
        };
        // The forwarded prompt as ctxgate counted it: the pruned count, or the whole count
        // when it was forwarded unchanged.
        let usage_ratio = match (tapped.input_tokens, s.map(|s| s.tokens_after)) {
            (Some(up), Some(ours)) if ours > 0 => Some(up as f64 / ours as f64),
            _ => None,
        };
        Record {
            ts: self.ts,
            conversation_id: self.conversation.unwrap_or_default(),
            route: route.config.name.clone(),
            upstream: route.config.target.authority.clone(),
            model: self.model,
            status: self.status,
            latency_ms: start.elapsed().as_secs_f64() * 1e3,
            ttfb_ms: self.ttfb.map(|d| d.as_secs_f64() * 1e3),
            stream: self.stream,
            tokens_before: s.map(|s| s.tokens_before),
            tokens_before_exact: s.is_some_and(|s| s.tokens_before_exact),
            tokens_after: s.map(|s| s.tokens_after),
            messages_before: s.map(|s| s.messages_before as u64),
            messages_after: s.map(|s| s.messages_after as u64),
            files_elided: s.map(|s| s.files_elided as u64),
            prune_action: self.action.to_string(),
            usage,
            usage_ratio,
            error_kind: self.error_kind.map(str::to_string),
            request_messages: self.request_messages,
            response_text: tapped.text.clone(),
        }
    }

    fn into_unrouted_record(self, start: Instant) -> Record {
        Record {
            ts: self.ts,
            conversation_id: String::new(),
            route: "none".into(),
            upstream: String::new(),
            model: None,
            status: self.status,
            latency_ms: start.elapsed().as_secs_f64() * 1e3,
            ttfb_ms: None,
            stream: false,
            tokens_before: None,
            tokens_before_exact: false,
            tokens_after: None,
            messages_before: None,
            messages_after: None,
            files_elided: None,
            prune_action: "none".into(),
            usage: Usage::default(),
            usage_ratio: None,
            error_kind: self.error_kind.map(str::to_string),
            request_messages: None,
            response_text: None,
        }
    }
}

/// The `messages` of a chat body, for transcripts with `include_bodies = true`.
fn messages_of(body: &[u8]) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(v.get_mut("messages")?.take())
}

/// Phase 7, record: what happens when a forwarded call's response ends.
struct CallRecord {
    start: Instant,
    route: Arc<RouteState>,
    metrics: Metrics,
    info: CallInfo,
    tap: Option<UsageTap>,
    transcripts: Transcripts,
    /// The gate permit, released when the response ends (on every path: this record lives in
    /// the response body's guard).
    _permit: Permit,
}

impl CallEnd for CallRecord {
    fn on_data(&mut self, data: &Bytes) {
        if let Some(t) = self.tap.as_mut() {
            t.feed(data);
        }
    }

    fn finish(&mut self, end: End) {
        let m = &self.route.metrics;
        let elapsed = self.start.elapsed();
        m.duration.observe(elapsed.as_secs_f64());
        let name = self.route.config.name.as_str();
        let mut error_kind = None;
        match end {
            End::Complete => {}
            End::ClientGone => {
                m.disconnects.inc();
                error_kind = Some("client_disconnect");
                tracing::info!(
                    route = name,
                    "client went away before the end of the response"
                );
            }
            End::Timeout(phase) => {
                self.metrics
                    .timeouts
                    .with_label_values(&[name, phase.as_str()])
                    .inc();
                error_kind = Some(match phase {
                    Phase::StreamIdle => "timeout_stream_idle",
                    _ => "timeout_total",
                });
                tracing::warn!(
                    route = name,
                    phase = phase.as_str(),
                    "timeout during the response body"
                );
            }
            End::UpstreamError => {
                self.metrics
                    .upstream_errors
                    .with_label_values(&[name, "upstream_body"])
                    .inc();
                error_kind = Some("upstream_body");
                tracing::warn!(route = name, "upstream failed during the response body");
            }
        }
        let tapped = self.tap.take().map(UsageTap::finish).unwrap_or_default();
        if self.info.chat {
            self.metrics.observe_usage(
                name,
                self.route.config.dialect,
                &tapped,
                elapsed,
                self.info.summary.as_ref().map(|s| s.tokens_after),
            );
        }
        let mut info = std::mem::take(&mut self.info);
        if info.error_kind.is_none() {
            info.error_kind = error_kind;
        }
        self.transcripts
            .submit(info.into_record(&self.route, self.start, &tapped));
    }
}

/// Whether this request is a chat request of the route's dialect (read whole and pruned).
pub fn is_chat(dialect: Dialect, method: &Method, path: &str) -> bool {
    method == Method::POST
        && match dialect {
            Dialect::OpenAi => path.ends_with("/chat/completions"),
            Dialect::Anthropic => path.ends_with("/v1/messages"),
        }
}

/// Refuses dot segments (plain or percent-encoded) and backslashes, which some upstreams
/// would resolve to a path outside the route's base.
fn check_path(path: &str) -> Result<(), Error> {
    if !path.starts_with('/') {
        return Err(Error::BadTarget(format!(
            "path must start with '/', got {path:?}"
        )));
    }
    for seg in path.split('/') {
        let lower = seg.to_ascii_lowercase();
        let decoded = lower.replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err(Error::BadTarget(format!(
                "dot segments are not allowed in {path:?}"
            )));
        }
        if lower.contains('\\') || lower.contains("%5c") || lower.contains("%2f") {
            return Err(Error::BadTarget(format!(
                "encoded slashes and backslashes are not allowed in {path:?}"
            )));
        }
    }
    Ok(())
}

/// The upstream URL: the route's scheme and host, its base path, then the request path after
/// the prefix, then the query. Nothing from the client can change the scheme or host.
fn upstream_uri(route: &Route, path: &str, query: Option<&str>) -> Result<Uri, Error> {
    let rest = path.get(route.prefix.len()..).unwrap_or("");
    let t = &route.target;
    let mut s = String::with_capacity(
        t.scheme.len() + t.authority.len() + t.base_path.len() + rest.len() + 8,
    );
    s.push_str(&t.scheme);
    s.push_str("://");
    s.push_str(&t.authority);
    s.push_str(&t.base_path);
    s.push_str(rest);
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    let uri: Uri = s
        .parse()
        .map_err(|_| Error::BadTarget(format!("cannot form an upstream URL from {path:?}")))?;
    // Belt and braces: the host must be the configured one.
    if uri.authority().map(|a| a.as_str()) != Some(t.authority.as_str()) {
        return Err(Error::BadTarget(format!(
            "path {path:?} would change the upstream host"
        )));
    }
    Ok(uri)
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A request body read whole, as the frames it arrived in.
#[derive(Clone, Default)]
pub struct Frames {
    frames: Vec<Bytes>,
    len: usize,
}

impl Frames {
    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body as one buffer: the frame itself when there is one, else one copy of all.
    pub fn join(mut self) -> Bytes {
        match self.frames.len() {
            0 => Bytes::new(),
            1 => self.frames.pop().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(self.len);
                for f in &self.frames {
                    b.extend_from_slice(f);
                }
                b.freeze()
            }
        }
    }
}

/// Reads a whole request body, refusing more than `limit` bytes. The frames are kept as they
/// are, not joined: a large body is joined (one copy) on the low-priority pool that parses
/// it, not on an async worker, where copying 20 MB would hold the worker for milliseconds.
pub async fn read_body(mut body: Incoming, limit: u64) -> Result<Frames, Error> {
    let mut out = Frames::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::BodyRead(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing ctxgate forwards for a chat body
        };
        out.len = out.len.saturating_add(data.len());
        if out.len as u64 > limit {
            return Err(Error::BodyTooLarge { limit });
        }
        out.frames.push(data);
    }
    Ok(out)
}

/// Whether a header name (lowercase, as `http` keeps them) is always hop-by-hop.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || name.starts_with("proxy-")
}

/// Removes hop-by-hop headers: those `Connection` names, then the fixed list of RFC 9110
/// (see [`is_hop_by_hop`]; any other `Proxy-*` header is meant for a proxy, i.e. for ctxgate,
/// not the upstream).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names decides (a header `Connection`
    // names is only hop-by-hop when `Connection` itself is present).
    if !h.keys().any(|k| is_hop_by_hop(k.as_str())) {
        return;
    }
    let mut hop: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    hop.extend(h.keys().filter(|k| is_hop_by_hop(k.as_str())).cloned());
    for n in hop {
        h.remove(n);
    }
}

/// Maps a client error to what the caller sees.
fn classify(e: &hyper_util::client::legacy::Error, route: &Route, max_body: u64) -> Error {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(t) = s.downcast_ref::<upstream::ConnectTimeout>() {
            return Error::Timeout {
                phase: Phase::Connect,
                after: t.0,
            };
        }
        if s.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            return Error::BodyTooLarge { limit: max_body };
        }
        src = s.source();
    }
    let reason = error_chain(e);
    if e.is_connect() {
        Error::UpstreamConnect {
            upstream: route.target.authority.clone(),
            reason,
        }
    } else {
        Error::UpstreamReset {
            upstream: route.target.authority.clone(),
            reason,
        }
    }
}

/// An error and its sources, joined with `: ` (hyper's top-level messages alone say little).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out
}

/// A plain response ctxgate makes itself.
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

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("proxy-foo", HeaderValue::from_static("1"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-x"),
        );
        h.insert("x-api-key", HeaderValue::from_static("k"));
        strip_hop_by_hop(&mut h);
        let mut keys: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        keys.sort();
        assert_eq!(keys, ["authorization", "x-api-key"]);

        // Each hop-by-hop header alone is removed; a name that only `Connection` could make
        // hop-by-hop stays when there is no `Connection`.
        for name in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "proxy-anything",
        ] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
            h.insert("x-secret-hop", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            let keys: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
            assert_eq!(keys, ["x-secret-hop"], "{name}");
        }
    }

    #[test]
    fn dot_segments_refused() {
        for p in [
            "/v1/../admin",
            "/v1/%2e%2e/x",
            "/v1/./x",
            "/v1/%2E/x",
            "/v1/a%2fb",
            "/v1/a\\b",
        ] {
            assert!(check_path(p).is_err(), "{p}");
        }
        for p in ["/v1/chat/completions", "/v1//x", "/v1/a..b"] {
            assert!(check_path(p).is_ok(), "{p}");
        }
    }
}

#[cfg(test)]
mod timing_tests {
    use super::*;
    use crate::config::Timeouts;
    use std::time::Duration;
    use tokio::time::Instant;

    const T: Timeouts = Timeouts {
        connect: Duration::from_secs(10),
        response_headers: Duration::from_secs(120),
        stream_idle: Duration::from_secs(60),
        total: Duration::from_secs(300),
    };

    #[tokio::test(start_paused = true)]
    async fn response_headers_fires_at_its_time() {
        let t0 = Instant::now();
        let e = await_headers(std::future::pending::<()>(), &T, t0 + T.total)
            .await
            .unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(120));
        assert_eq!(e.kind(), "timeout_response_headers");
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn total_fires_first_when_less_is_left() {
        let t0 = Instant::now();
        // 250 s of the call already spent (say, in a slow upload): 50 s are left of total.
        let deadline = t0 + Duration::from_secs(50);
        let e = await_headers(std::future::pending::<()>(), &T, deadline)
            .await
            .unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(50));
        assert_eq!(e.kind(), "timeout_total");
        assert_eq!(
            e.to_string(),
            "upstream call did not finish within 300s (timeouts.total)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn headers_in_time_pass_through() {
        let t0 = Instant::now();
        let fut = async {
            tokio::time::sleep(Duration::from_secs(119)).await;
            7
        };
        assert_eq!(await_headers(fut, &T, t0 + T.total).await.unwrap(), 7);
    }
}
