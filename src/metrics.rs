//! One [`Metrics`] struct owning the prometheus `Registry`, built once at start and passed down.
//!
//! Names follow `ctxgate_<subsystem>_<name>_<unit>`; counters end in `_total`, durations are
//! `_seconds` histograms. Labels are bounded: route names and upstream labels come from the
//! config, statuses and phases from fixed sets. A conversation id or a client-chosen model
//! name is never a label.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds) spanning sub-millisecond proxy overhead to multi-minute streams.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Buckets (seconds) for ctxgate's own work before forwarding: tens of microseconds up.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.5,
];

/// Token-count buckets: from a short prompt to a long agent conversation.
const TOKEN_BUCKETS: &[f64] = &[
    250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 64000.0, 128000.0, 256000.0,
];

/// One route's pruning metrics, resolved once so the hot path does no label lookups.
#[derive(Clone)]
pub struct PruneMetrics {
    actions: IntCounterVec,
    route: String,
    /// Prompt tokens before pruning.
    pub tokens_before: Histogram,
    /// Prompt tokens forwarded.
    pub tokens_after: Histogram,
    /// Tokens removed by pruning.
    pub tokens_removed: IntCounter,
    /// Messages dropped.
    pub messages_dropped: IntCounter,
    /// Files elided.
    pub files_elided: IntCounter,
    /// Times the cache-stable cut moved.
    pub cut_moves: IntCounter,
    /// Time the prune phase took.
    pub duration: Histogram,
}

impl PruneMetrics {
    /// Counts one prune action (`unchanged`, `pruned`, `rejected`, `skipped`, `shadow`).
    pub fn action(&self, action: &str) {
        self.actions.with_label_values(&[&self.route, action]).inc();
    }
}

/// Every metric ctxgate exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Names of every family registered here, including those with no series yet (which
    /// `Registry::gather` leaves out).
    names: std::sync::Arc<Vec<String>>,
    /// `ctxgate_http_requests_total{route,status}`: responses sent, by route and status code.
    pub requests: IntCounterVec,
    /// `ctxgate_http_request_duration_seconds{route}`: arrival to last byte sent.
    pub request_duration: HistogramVec,
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
    /// `ctxgate_prune_actions_total{route,action}`: what pruning did with each chat request.
    pub prune_actions: IntCounterVec,
    /// `ctxgate_prune_prompt_tokens{route,stage}`: prompt tokens before / after pruning.
    pub prune_tokens: HistogramVec,
    /// `ctxgate_prune_tokens_removed_total{route}`.
    pub prune_tokens_removed: IntCounterVec,
    /// `ctxgate_prune_messages_dropped_total{route}`.
    pub prune_messages_dropped: IntCounterVec,
    /// `ctxgate_prune_files_elided_total{route}`.
    pub prune_files_elided: IntCounterVec,
    /// `ctxgate_prune_cut_moves_total{route}`: times the cache-stable cut had to move.
    pub prune_cut_moves: IntCounterVec,
    /// `ctxgate_prune_duration_seconds{route}`: time the prune phase took.
    pub prune_duration: HistogramVec,
    /// `ctxgate_view_hits_total`: prunes that found the conversation in the view.
    pub view_hits: IntCounter,
    /// `ctxgate_view_misses_total`: prunes that did not.
    pub view_misses: IntCounter,
    /// `ctxgate_view_entries`: conversations in the view.
    pub view_entries: IntGauge,
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
    /// `ctxgate_gate_wait_seconds{route}`: time a request waited for admission.
    pub gate_wait: HistogramVec,
    /// `ctxgate_gate_rejections_total{route,reason}`: 429s by reason (queue_full, queue_timeout).
    pub gate_rejections: IntCounterVec,
    /// `ctxgate_gate_waiters`: requests waiting for admission now.
    pub gate_waiters: IntGauge,
    /// `ctxgate_gate_active`: conversations with a call in flight now.
    pub gate_active: IntGauge,
    /// `ctxgate_gate_known`: conversation gates in memory (held, awaited or idle).
    pub gate_known: IntGauge,
    /// `ctxgate_upstream_warmup_seconds{upstream}`: time the start-up warm-up took.
    pub warmup_seconds: prometheus::GaugeVec,
    /// `ctxgate_upstream_ready{upstream}`: 1 once warm-up succeeded, 0 before or on failure.
    pub upstream_ready: IntGaugeVec,
    /// `ctxgate_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let names = std::cell::RefCell::new(Vec::new());
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, &names, Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, &names, Box::new(h.clone()));
            h
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, &names, Box::new(g.clone()));
            g
        };
        let warmup_seconds = prometheus::GaugeVec::new(
            Opts::new(
                "ctxgate_upstream_warmup_seconds",
                "Time the start-up warm-up took.",
            ),
            &["upstream"],
        )
        .unwrap_or_else(|e| unreachable_metric("ctxgate_upstream_warmup_seconds", e));
        register(&registry, &names, Box::new(warmup_seconds.clone()));

        let plain_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, &names, Box::new(g.clone()));
            g
        };
        let plain_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, &names, Box::new(c.clone()));
            c
        };
        let m = Metrics {
            upstream_tokens: counter(
                "ctxgate_upstream_tokens_total",
                "Tokens the upstream reported, by type: input, output, cache_read, cache_write.",
                &["route", "type"],
            ),
            estimate_ratio: histogram(
                "ctxgate_token_estimate_ratio",
                "Upstream-reported prompt tokens divided by ctxgate's count of the forwarded prompt.",
                &["route"],
                &[0.5, 0.8, 0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0],
            ),
            genai_tokens: histogram(
                "gen_ai_client_token_usage",
                "Tokens used per call (OpenTelemetry GenAI semantic conventions).",
                &["gen_ai_token_type", "gen_ai_operation_name", "gen_ai_provider_name"],
                &[
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
                    1048576.0, 4194304.0, 16777216.0, 67108864.0,
                ],
            ),
            genai_duration: histogram(
                "gen_ai_client_operation_duration_seconds",
                "Duration of GenAI calls (OpenTelemetry GenAI semantic conventions).",
                &["gen_ai_operation_name", "gen_ai_provider_name"],
                &[
                    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92,
                ],
            ),
            prune_actions: counter(
                "ctxgate_prune_actions_total",
                "Chat requests by what pruning did: unchanged, pruned, rejected, skipped, shadow.",
                &["route", "action"],
            ),
            prune_tokens: histogram(
                "ctxgate_prune_prompt_tokens",
                "Prompt tokens of chat requests before and after pruning (stage).",
                &["route", "stage"],
                TOKEN_BUCKETS,
            ),
            prune_tokens_removed: counter(
                "ctxgate_prune_tokens_removed_total",
                "Prompt tokens removed by pruning.",
                &["route"],
            ),
            prune_messages_dropped: counter(
                "ctxgate_prune_messages_dropped_total",
                "Messages dropped by pruning.",
                &["route"],
            ),
            prune_files_elided: counter(
                "ctxgate_prune_files_elided_total",
                "File contents elided from older turns.",
                &["route"],
            ),
            prune_cut_moves: counter(
                "ctxgate_prune_cut_moves_total",
                "Times the cache-stable cut point had to move (each move costs a prompt-cache write).",
                &["route"],
            ),
            prune_duration: histogram(
                "ctxgate_prune_duration_seconds",
                "Time the prune phase took.",
                &["route"],
                OVERHEAD_BUCKETS,
            ),
            view_hits: plain_counter(
                "ctxgate_view_hits_total",
                "Prunes that found the conversation's earlier messages in the view.",
            ),
            view_misses: plain_counter(
                "ctxgate_view_misses_total",
                "Prunes that did not find the conversation in the view.",
            ),
            view_entries: plain_gauge("ctxgate_view_entries", "Conversations held in the view."),
            gate_wait: histogram(
                "ctxgate_gate_wait_seconds",
                "Time a request waited at its gate before being admitted.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            gate_rejections: counter(
                "ctxgate_gate_rejections_total",
                "Requests refused with 429 by the gate, by reason.",
                &["route", "reason"],
            ),
            gate_waiters: plain_gauge("ctxgate_gate_waiters", "Requests waiting for admission."),
            gate_active: plain_gauge(
                "ctxgate_gate_active",
                "Conversations with at least one call in flight.",
            ),
            gate_known: plain_gauge(
                "ctxgate_gate_known",
                "Conversation gates held in memory (in use or idle, not yet forgotten).",
            ),
            requests: counter(
                "ctxgate_http_requests_total",
                "Responses sent, by route and status code.",
                &["route", "status"],
            ),
            request_duration: histogram(
                "ctxgate_http_request_duration_seconds",
                "Time from the request's arrival to the response's last byte.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            ttfb: histogram(
                "ctxgate_http_time_to_first_byte_seconds",
                "Time from the request's arrival to the response headers.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            overhead: histogram(
                "ctxgate_proxy_overhead_seconds",
                "ctxgate's own time before the request is forwarded (routing, gating, pruning).",
                &["route"],
                OVERHEAD_BUCKETS,
            ),
            upstream_errors: counter(
                "ctxgate_upstream_errors_total",
                "Upstream calls that failed, by error kind.",
                &["route", "kind"],
            ),
            timeouts: counter(
                "ctxgate_timeouts_total",
                "Timeouts that fired, by phase.",
                &["route", "phase"],
            ),
            client_disconnects: counter(
                "ctxgate_client_disconnects_total",
                "Clients that went away before the response's last byte.",
                &["route"],
            ),
            warmup_seconds,
            upstream_ready: gauge(
                "ctxgate_upstream_ready",
                "1 once the upstream's warm-up succeeded.",
                &["upstream"],
            ),
            build_info: gauge(
                "ctxgate_build_info",
                "Build information; always 1.",
                &["version"],
            ),
            registry,
            names: std::sync::Arc::new(names.take()),
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The pruning metrics of one route.
    pub fn prune_for(&self, route: &str) -> PruneMetrics {
        PruneMetrics {
            actions: self.prune_actions.clone(),
            route: route.to_string(),
            tokens_before: self.prune_tokens.with_label_values(&[route, "before"]),
            tokens_after: self.prune_tokens.with_label_values(&[route, "after"]),
            tokens_removed: self.prune_tokens_removed.with_label_values(&[route]),
            messages_dropped: self.prune_messages_dropped.with_label_values(&[route]),
            files_elided: self.prune_files_elided.with_label_values(&[route]),
            cut_moves: self.prune_cut_moves.with_label_values(&[route]),
            duration: self.prune_duration.with_label_values(&[route]),
        }
    }

    /// Records a chat call's upstream usage and duration (ctxgate's and GenAI names).
    pub fn observe_usage(
        &self,
        route: &str,
        dialect: crate::dialect::Dialect,
        t: &crate::proxy::usage::Tapped,
        elapsed: std::time::Duration,
        forwarded_tokens: Option<u64>,
    ) {
        let provider = dialect.as_str();
        self.genai_duration
            .with_label_values(&["chat", provider])
            .observe(elapsed.as_secs_f64());
        for (kind, v) in [
            ("input", t.input_tokens),
            ("output", t.output_tokens),
            ("cache_read", t.cache_read_tokens),
            ("cache_write", t.cache_write_tokens),
        ] {
            if let Some(n) = v {
                self.upstream_tokens
                    .with_label_values(&[route, kind])
                    .inc_by(n);
            }
        }
        if let Some(n) = t.input_tokens {
            self.genai_tokens
                .with_label_values(&["input", "chat", provider])
                .observe(n as f64);
        }
        if let Some(n) = t.output_tokens {
            self.genai_tokens
                .with_label_values(&["output", "chat", provider])
                .observe(n as f64);
        }
        if let (Some(up), Some(ours)) = (t.input_tokens, forwarded_tokens) {
            if ours > 0 {
                self.estimate_ratio
                    .with_label_values(&[route])
                    .observe(up as f64 / ours as f64);
            }
        }
    }

    /// Raises a counter to a cumulative value kept elsewhere (the view's own hit counts).
    pub fn sync_counter(c: &IntCounter, total: u64) {
        let cur = c.get();
        if total > cur {
            c.inc_by(total - cur);
        }
    }

    /// The name of every metric family registered through this struct (histograms without
    /// their `_bucket`/`_sum`/`_count` suffixes), whether or not it has series yet.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The registry, for modules that register their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        buf
    }

    /// A histogram handle, cached by the caller per route to keep label lookups off the hot path.
    pub fn route_histogram(h: &HistogramVec, route: &str) -> Histogram {
        h.with_label_values(&[route])
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn register(
    registry: &Registry,
    names: &std::cell::RefCell<Vec<String>>,
    c: Box<dyn prometheus::core::Collector>,
) {
    names
        .borrow_mut()
        .extend(c.desc().iter().map(|d| d.fq_name.clone()));
    if let Err(e) = registry.register(c) {
        // Only a programming error (a duplicate name) can get here; metrics are not worth a
        // crash, so it is logged.
        tracing::error!(error = %e, "metric registration failed");
    }
}

fn unreachable_metric<T>(name: &str, e: prometheus::Error) -> T {
    // Metric definitions are constants: a failure here is a bug caught by the first test run.
    panic!("invalid metric definition {name}: {e}")
}
