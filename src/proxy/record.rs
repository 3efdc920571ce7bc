//! Phase 7, record: the one place where a call's facts become metrics, its log event and its
//! transcript record. The phases only store facts in the [`Call`]; the [`Recorder`] reads them
//! twice at most:
//!
//! - [`Recorder::responded`], when the response headers go out: the response is counted
//!   (`ctxgate_http_requests_total`, time to first byte);
//! - [`Recorder::finish`], exactly once per call, when it ends — last byte, an error ctxgate
//!   answered with, a timeout, the upstream breaking off, the client gone before or after the
//!   headers (the [`Call`]'s drop guard calls it): everything else (with the call's cost and
//!   its side of the holdout comparison, worked out in `effect.rs`), the log event and the
//!   transcript record, handed to the bounded queue without waiting.
//!
//! A call that ends before any response was sent counts as status 499 (the client closed the
//! request: nginx's convention) in the metrics and the record; one whose handling panicked
//! (a bug) as 500, error kind `internal_panic`.

use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};

use crate::dialect::{Dialect, Tapped};
use crate::error::{Error, Phase};
use crate::metrics::{Metrics, LATENCY_BUCKETS, OVERHEAD_BUCKETS};
use crate::prune::Summary;
use crate::transcript::{Record, Transcripts, Usage, KIND_CALL};

use super::call::{Call, End, Finish, PruneAction};
use super::effect::{Effect, Effects};
use super::prune::{PruneMetrics, RoutePruneMetrics};

pub use super::call::CLIENT_CLOSED;

/// The `kind` label values of `ctxgate_upstream_errors_total`.
const UPSTREAM_ERROR_KINDS: [&str; 6] = [
    "upstream_connect",
    "upstream_reset",
    "upstream_body",
    "timeout_connect",
    "timeout_response_headers",
    "timeout_total",
];

/// The phases of `ctxgate_timeouts_total`.
const PHASES: [Phase; 5] = [
    Phase::Connect,
    Phase::ResponseHeaders,
    Phase::StreamIdle,
    Phase::Total,
    Phase::ClientWrite,
];

/// Token types of `ctxgate_upstream_tokens_total`.
const TOKEN_TYPES: [&str; 4] = ["input", "output", "cache_read", "cache_write"];

/// The call-level metric families: traffic, latency, upstream failures, timeouts,
/// disconnects, token usage.
#[derive(Clone)]
pub struct CallMetrics {
    /// `ctxgate_http_requests_total{route,status}`: responses sent, by route and status code.
    pub requests: IntCounterVec,
    /// `ctxgate_http_request_duration_seconds{route}`: arrival to last byte sent.
    pub duration: HistogramVec,
    /// `ctxgate_http_time_to_first_byte_seconds{route}`: arrival to response headers.
    pub ttfb: HistogramVec,
    /// `ctxgate_proxy_overhead_seconds{route}`: ctxgate's own work before forwarding.
    pub overhead: HistogramVec,
    /// `ctxgate_upstream_errors_total{route,kind}`: failed upstream calls by error kind.
    pub upstream_errors: IntCounterVec,
    /// `ctxgate_timeouts_total{route,phase}`: timeouts fired, by phase.
    pub timeouts: IntCounterVec,
    /// `ctxgate_client_disconnects_total{route}`: clients that left before the last byte.
    pub client_disconnects: IntCounterVec,
    /// `ctxgate_upstream_tokens_total{route,type}`: tokens the upstream reported (input,
    /// output, cache_read, cache_write).
    pub upstream_tokens: IntCounterVec,
    /// `ctxgate_token_estimate_ratio{route}`: upstream-reported prompt tokens / ctxgate's count
    /// of the forwarded prompt.
    pub estimate_ratio: HistogramVec,
    /// `gen_ai_client_token_usage{gen_ai_token_type,gen_ai_operation_name,gen_ai_provider_name}`
    /// (OpenTelemetry GenAI semantic conventions).
    pub genai_tokens: HistogramVec,
    /// `gen_ai_client_operation_duration_seconds{gen_ai_operation_name,gen_ai_provider_name}`.
    pub genai_duration: HistogramVec,
}

impl CallMetrics {
    /// Registers the families, with the series of every route (and its provider) at 0.
    pub fn register(m: &Metrics, routes: &[(&str, Dialect)]) -> CallMetrics {
        let c = CallMetrics {
            requests: m.counter_vec(
                "ctxgate_http_requests_total",
                "Responses sent, by route and status code.",
                &["route", "status"],
            ),
            duration: m.histogram_vec(
                "ctxgate_http_request_duration_seconds",
                "Time from the request's arrival to the response's last byte.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            ttfb: m.histogram_vec(
                "ctxgate_http_time_to_first_byte_seconds",
                "Time from the request's arrival to the response headers.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            overhead: m.histogram_vec(
                "ctxgate_proxy_overhead_seconds",
                "ctxgate's own time before the request is forwarded (routing, gating, pruning).",
                &["route"],
                OVERHEAD_BUCKETS,
            ),
            upstream_errors: m.counter_vec(
                "ctxgate_upstream_errors_total",
                "Upstream calls that failed, by error kind.",
                &["route", "kind"],
            ),
            timeouts: m.counter_vec(
                "ctxgate_timeouts_total",
                "Timeouts that fired, by phase.",
                &["route", "phase"],
            ),
            client_disconnects: m.counter_vec(
                "ctxgate_client_disconnects_total",
                "Clients that went away before the response's last byte.",
                &["route"],
            ),
            upstream_tokens: m.counter_vec(
                "ctxgate_upstream_tokens_total",
                "Tokens the upstream reported, by type: input, output, cache_read, cache_write.",
                &["route", "type"],
            ),
            estimate_ratio: m.histogram_vec(
                "ctxgate_token_estimate_ratio",
                "Upstream-reported prompt tokens divided by ctxgate's count of the forwarded prompt.",
                &["route"],
                &[0.5, 0.8, 0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0],
            ),
            genai_tokens: m.histogram_vec(
                "gen_ai_client_token_usage",
                "Tokens used per call (OpenTelemetry GenAI semantic conventions).",
                &["gen_ai_token_type", "gen_ai_operation_name", "gen_ai_provider_name"],
                &[
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
                    1048576.0, 4194304.0, 16777216.0, 67108864.0,
                ],
            ),
            genai_duration: m.histogram_vec(
                "gen_ai_client_operation_duration_seconds",
                "Duration of GenAI calls (OpenTelemetry GenAI semantic conventions).",
                &["gen_ai_operation_name", "gen_ai_provider_name"],
                &[
                    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92,
                ],
            ),
        };
        for (r, dialect) in routes {
            for h in [&c.duration, &c.ttfb, &c.overhead, &c.estimate_ratio] {
                h.with_label_values(&[r]);
            }
            c.client_disconnects.with_label_values(&[r]);
            for kind in UPSTREAM_ERROR_KINDS {
                c.upstream_errors.with_label_values(&[r, kind]);
            }
            for p in PHASES {
                c.timeouts.with_label_values(&[r, p.as_str()]);
            }
            for t in TOKEN_TYPES {
                c.upstream_tokens.with_label_values(&[r, t]);
            }
            let provider = dialect.as_str();
            c.genai_duration.with_label_values(&["chat", provider]);
            for t in ["input", "output"] {
                c.genai_tokens.with_label_values(&[t, "chat", provider]);
            }
        }
        c
    }
}

/// One route's series, resolved once so the hot path does no label lookups.
#[derive(Clone)]
pub struct RouteMetrics {
    duration: Histogram,
    ttfb: Histogram,
    overhead: Histogram,
    disconnects: IntCounter,
    gate_wait: Histogram,
    prune: RoutePruneMetrics,
    /// `ctxgate_http_requests_total{route,status="200"}`, the status nearly every call ends
    /// with (others are looked up).
    ok: IntCounter,
    /// The usage series: upstream tokens by `TOKEN_TYPES`, the estimate ratio, and the GenAI
    /// duration and input/output token histograms of the route's provider.
    upstream_tokens: [IntCounter; 4],
    estimate_ratio: Histogram,
    genai_duration: Histogram,
    genai_tokens: [Histogram; 2],
}

impl RouteMetrics {
    /// Resolves the series of route `route`, whose upstream speaks `dialect`.
    pub fn new(
        call: &CallMetrics,
        gate_wait: &HistogramVec,
        prune: &PruneMetrics,
        route: &str,
        dialect: Dialect,
    ) -> Self {
        let provider = dialect.as_str();
        RouteMetrics {
            ok: call.requests.with_label_values(&[route, "200"]),
            upstream_tokens: TOKEN_TYPES
                .map(|t| call.upstream_tokens.with_label_values(&[route, t])),
            estimate_ratio: call.estimate_ratio.with_label_values(&[route]),
            genai_duration: call.genai_duration.with_label_values(&["chat", provider]),
            genai_tokens: ["input", "output"]
                .map(|t| call.genai_tokens.with_label_values(&[t, "chat", provider])),
            duration: call.duration.with_label_values(&[route]),
            ttfb: call.ttfb.with_label_values(&[route]),
            overhead: call.overhead.with_label_values(&[route]),
            disconnects: call.client_disconnects.with_label_values(&[route]),
            gate_wait: gate_wait.with_label_values(&[route]),
            prune: prune.route(route),
        }
    }
}

/// Turns finished calls into metrics, log events and transcript records.
pub struct Recorder {
    metrics: CallMetrics,
    /// Each route's series, by `RouteState::index`.
    routes: Vec<RouteMetrics>,
    gate_rejections: IntCounterVec,
    /// Costs and the holdout comparison (`effect.rs`).
    effects: Effects,
    transcripts: Transcripts,
}

impl Recorder {
    /// A recorder writing to these families and this transcript queue.
    pub fn new(
        metrics: CallMetrics,
        routes: Vec<RouteMetrics>,
        gate_rejections: IntCounterVec,
        effects: Effects,
        transcripts: Transcripts,
    ) -> Recorder {
        Recorder {
            metrics,
            routes,
            gate_rejections,
            effects,
            transcripts,
        }
    }

    fn route(&self, call: &Call) -> Option<&RouteMetrics> {
        self.routes.get(call.route.as_ref()?.index)
    }

    /// The response headers are going out: counts the response.
    pub fn responded(&self, call: &Call) {
        let status = call.status.unwrap_or(CLIENT_CLOSED);
        match self.route(call) {
            Some(r) if status == 200 => r.ok.inc(),
            _ => self.count_response(call.route_name(), status),
        }
        if let (Some(r), Some(t)) = (self.route(call), call.ttfb) {
            r.ttfb.observe(t.as_secs_f64());
        }
        self.count_admission(call);
    }

    /// What the call's admission and pruning were: counted once, when the response starts
    /// (or when the call ends without one), so that a long stream's pruning shows at once.
    fn count_admission(&self, call: &Call) {
        let Some(m) = self.route(call) else { return };
        if let Some(w) = call.waited {
            m.gate_wait.observe(w.as_secs_f64());
        }
        if let (Some(at), Some(w)) = (call.forwarded_at, call.waited) {
            let own = at.saturating_duration_since(call.start).saturating_sub(w);
            m.overhead.observe(own.as_secs_f64());
        }
        m.prune.observe(call);
    }

    fn count_response(&self, route: &str, status: u16) {
        let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        self.metrics
            .requests
            .with_label_values(&[route, status.as_str()])
            .inc();
    }
}

impl Finish for Recorder {
    fn finish(&self, call: &mut Call, end: End) {
        let elapsed = call.start.elapsed();
        let responded = call.status.is_some();
        if !responded {
            call.status = Some(match &call.failure {
                Some(e) if end == End::Failed => e.status().as_u16(),
                _ if end == End::Panicked => 500,
                _ => CLIENT_CLOSED,
            });
            self.count_response(call.route_name(), call.status.unwrap_or(CLIENT_CLOSED));
        }
        let tapped = call.take_usage();
        let ratio = usage_ratio(&tapped, call.summary.as_ref());
        let effect = self.effects.of(call, &tapped, ratio);
        let error_kind = self.count(call, end, elapsed, responded, &tapped);
        self.effects.observe(call, &effect, &tapped, end, elapsed);
        log(call, end, error_kind);
        self.transcripts
            .submit(record(call, elapsed, error_kind, tapped, &effect));
    }
}

impl Recorder {
    /// Counts the call's facts; returns the error kind for the record.
    fn count(
        &self,
        call: &Call,
        end: End,
        elapsed: Duration,
        responded: bool,
        tapped: &Tapped,
    ) -> Option<&'static str> {
        let (Some(route), Some(m)) = (&call.route, self.route(call)) else {
            return call.failure.as_ref().map(Error::kind);
        };
        let name = route.config.name.as_str();
        m.duration.observe(elapsed.as_secs_f64());
        if !responded {
            self.count_admission(call);
        }
        if responded && call.chat {
            Self::observe_usage(m, tapped, elapsed, call.summary.as_ref());
        }
        self.count_end(name, m, call, end)
    }

    /// Counts how the call ended: failures, timeouts, disconnects. Returns the error kind.
    fn count_end(
        &self,
        name: &str,
        m: &RouteMetrics,
        call: &Call,
        end: End,
    ) -> Option<&'static str> {
        match end {
            End::Complete => None,
            End::Failed => {
                let e = call.failure.as_ref()?;
                if let Error::Timeout { phase, .. } = e {
                    self.metrics
                        .timeouts
                        .with_label_values(&[name, phase.as_str()])
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
                        .with_label_values(&[name, e.kind()])
                        .inc();
                }
                if let Error::Gate(r) = e {
                    self.gate_rejections
                        .with_label_values(&[name, r.reason()])
                        .inc();
                }
                Some(e.kind())
            }
            End::ClientGone => {
                m.disconnects.inc();
                Some("client_disconnect")
            }
            End::Panicked => Some("internal_panic"),
            End::Timeout(phase) => {
                self.metrics
                    .timeouts
                    .with_label_values(&[name, phase.as_str()])
                    .inc();
                Some(match phase {
                    Phase::StreamIdle => "timeout_stream_idle",
                    Phase::ClientWrite => "timeout_client_write",
                    _ => "timeout_total",
                })
            }
            End::UpstreamError => {
                self.metrics
                    .upstream_errors
                    .with_label_values(&[name, "upstream_body"])
                    .inc();
                Some("upstream_body")
            }
            End::Shutdown => Some("shutdown"),
        }
    }

    /// A chat call's upstream usage and duration (ctxgate's and the GenAI names), on the
    /// route's series resolved at start.
    fn observe_usage(m: &RouteMetrics, t: &Tapped, elapsed: Duration, summary: Option<&Summary>) {
        m.genai_duration.observe(elapsed.as_secs_f64());
        let counts = [
            t.input_tokens,
            t.output_tokens,
            t.cache_read_tokens,
            t.cache_write_tokens,
        ];
        for (series, v) in m.upstream_tokens.iter().zip(counts) {
            if let Some(n) = v {
                series.inc_by(n);
            }
        }
        for (series, v) in m.genai_tokens.iter().zip([t.input_tokens, t.output_tokens]) {
            if let Some(n) = v {
                series.observe(n as f64);
            }
        }
        if let Some(ratio) = usage_ratio(t, summary) {
            m.estimate_ratio.observe(ratio);
        }
    }
}

/// The upstream's prompt tokens over ctxgate's count of the forwarded prompt.
fn usage_ratio(t: &Tapped, s: Option<&Summary>) -> Option<f64> {
    match (t.input_tokens, s.map(|s| s.tokens_after)) {
        (Some(up), Some(ours)) if ours > 0 => Some(up as f64 / ours as f64),
        _ => None,
    }
}

/// The transcript record of a finished call.
fn record(
    call: &mut Call,
    elapsed: Duration,
    error_kind: Option<&'static str>,
    tapped: Tapped,
    effect: &Effect,
) -> Record {
    let s = call.summary.as_ref();
    let (route, upstream) = match &call.route {
        Some(r) => (r.config.name.clone(), r.config.target.authority.clone()),
        None => ("none".to_string(), String::new()),
    };
    Record {
        ts: std::mem::take(&mut call.ts),
        conversation_id: call.conversation.clone().unwrap_or_default(),
        route,
        upstream,
        model: call.model.clone(),
        status: call.status.unwrap_or(CLIENT_CLOSED),
        latency_ms: elapsed.as_secs_f64() * 1e3,
        ttfb_ms: call.ttfb.map(|d| d.as_secs_f64() * 1e3),
        stream: call.stream,
        tokens_before: s.map(|s| s.tokens_before),
        tokens_before_exact: s.is_some_and(|s| s.tokens_before_exact),
        tokens_after: s.map(|s| s.tokens_after),
        messages_before: s.map(|s| s.messages_before as u64),
        messages_after: s.map(|s| s.messages_after as u64),
        files_elided: s.map(|s| s.files_elided as u64),
        prune_action: call.action.as_str().to_string(),
        prune_reason: call.prune_reason.map(str::to_string),
        usage_ratio: usage_ratio(&tapped, s),
        usage: Usage {
            input_tokens: tapped.input_tokens,
            output_tokens: tapped.output_tokens,
            cache_read_tokens: tapped.cache_read_tokens,
            cache_write_tokens: tapped.cache_write_tokens,
        },
        error_kind: error_kind.map(str::to_string),
        request_messages: call.request_messages.take(),
        response_text: tapped.text,
        kind: KIND_CALL.to_string(),
        holdout: call.holdout,
        finish_reason: tapped.finish_reason,
        summary_tokens: call.summary_tokens,
        cost_usd: effect.costs.map(|c| c.sent),
        cost_unpruned_usd: effect.costs.map(|c| c.unpruned),
    }
}

/// The call's one log event: a warning for what went wrong, a line for what was pruned or
/// waited, nothing for an ordinary call (the hot path logs nothing).
fn log(call: &Call, end: End, error_kind: Option<&'static str>) {
    let route = call.route_name();
    let action = call.action.as_str();
    // What pruning and the gate did, on every event: a pruned call that then fails still
    // shows its figures.
    let tokens_before = call.summary.as_ref().map(|s| s.tokens_before);
    let tokens_after = call.summary.as_ref().map(|s| s.tokens_after);
    let waited_ms = call.waited.map(|w| w.as_millis() as u64);
    let error = call.failure.as_ref().map(|e| e.to_string());
    match end {
        End::Failed if call.route.is_none() => {
            tracing::debug!(method = %call.request.method, path = %call.request.uri.path(), kind = error_kind, "no route");
        }
        End::Failed => match &call.failure {
            Some(Error::ContextOverflow(r)) => {
                tracing::warn!(
                    route,
                    kind = error_kind,
                    pinned_tokens = r.pinned_tokens,
                    limit = r.limit,
                    error,
                    "request rejected: pinned part over the token limit"
                )
            }
            _ => tracing::warn!(
                route,
                kind = error_kind,
                action,
                tokens_before,
                tokens_after,
                waited_ms,
                error,
                "request failed"
            ),
        },
        End::Panicked => {
            tracing::error!(
                route,
                action,
                "request handling panicked (a bug: please report it)"
            );
        }
        End::ClientGone => {
            let when = match call.ttfb {
                None => "the response headers",
                Some(_) => "the end of the response",
            };
            tracing::info!(
                route,
                action,
                tokens_before,
                tokens_after,
                waited_ms,
                "client went away before {when}"
            );
        }
        End::Timeout(phase) => {
            tracing::warn!(
                route,
                phase = phase.as_str(),
                action,
                tokens_before,
                tokens_after,
                waited_ms,
                "timeout during the response body"
            );
        }
        End::UpstreamError => {
            tracing::warn!(
                route,
                action,
                tokens_before,
                tokens_after,
                waited_ms,
                "upstream failed during the response body"
            );
        }
        End::Shutdown => {
            tracing::warn!(
                route,
                action,
                tokens_before,
                tokens_after,
                "response cut: shutdown_grace ended while it was streaming"
            );
        }
        End::Complete => match (&call.summary, call.action) {
            (Some(s), PruneAction::Pruned | PruneAction::Shadow) => {
                log_pruned(route, s, call.action == PruneAction::Shadow, call.waited);
            }
            // Admission always takes a few microseconds; only a real wait is worth a line.
            _ => match call.waited {
                Some(w) if w >= Duration::from_millis(1) => {
                    tracing::info!(
                        route,
                        waited_ms = w.as_millis() as u64,
                        "request waited for its gate"
                    );
                }
                _ => {}
            },
        },
    }
}

fn log_pruned(route: &str, s: &Summary, shadow: bool, waited: Option<Duration>) {
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
        waited_ms = waited.map_or(0, |w| w.as_millis() as u64),
        "{}: {} -> {} messages, ~{} -> {} tokens ({:.1}% reduction)",
        if shadow { "shadow prune" } else { "pruned" },
        s.messages_before,
        s.messages_after,
        s.tokens_before,
        s.tokens_after,
        reduction
    );
}
