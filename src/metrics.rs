//! One [`Metrics`] struct owning the prometheus `Registry`, built once at start and passed down.
//!
//! Names follow `ctxgate_<subsystem>_<name>_<unit>`; counters end in `_total`, durations are
//! `_seconds` histograms. Labels are bounded: route names and upstream labels come from the
//! config, statuses and phases from fixed sets. A conversation id or a client-chosen model
//! name is never a label.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
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

/// Every metric ctxgate exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
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
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(h.clone()));
            h
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(g.clone()));
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
        register(&registry, Box::new(warmup_seconds.clone()));

        let plain_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
            register(&registry, Box::new(g.clone()));
            g
        };
        let m = Metrics {
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
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
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

fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>) {
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
