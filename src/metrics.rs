//! The process's prometheus `Registry`, wrapped in [`Metrics`]: built once at start and passed
//! down. Each concern defines its own families next to it and registers them here through the
//! helpers below (`proxy::record`, `proxy::prune`, `proxy::admit`, `proxy::upstream`,
//! `transcript::metrics`); this file owns only the registry, the list of names and
//! `ctxgate_build_info`.
//!
//! Names follow `ctxgate_<subsystem>_<name>_<unit>`; counters end in `_total`, durations are
//! `_seconds` histograms. Labels are bounded: route names and upstream labels come from the
//! config, statuses and phases from fixed sets. A conversation id or a client-chosen model
//! name is never a label. Every series whose label values are known in advance is created at
//! start, at 0, so a fresh dashboard shows 0 rather than "No data".

use std::sync::{Arc, Mutex};

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds) spanning sub-millisecond proxy overhead to multi-minute streams.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Buckets (seconds) for ctxgate's own work before forwarding: tens of microseconds up.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.5,
];

/// The registry and the names of every family registered through it. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Names of every family registered here, including those with no series yet (which
    /// `Registry::gather` leaves out).
    names: Arc<Mutex<Vec<String>>>,
}

impl Metrics {
    /// An empty registry with `ctxgate_build_info{version}` (always 1).
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::new(),
            names: Arc::new(Mutex::new(Vec::new())),
        };
        m.gauge_vec(
            "ctxgate_build_info",
            "Build information; always 1.",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        m
    }

    /// Registers a counter family.
    pub fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| invalid_metric(name, e));
        self.register(Box::new(c.clone()));
        c
    }

    /// Registers a counter family of floating-point values (US dollars).
    pub fn float_counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        let c = CounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| invalid_metric(name, e));
        self.register(Box::new(c.clone()));
        c
    }

    /// Registers a histogram family.
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .unwrap_or_else(|e| invalid_metric(name, e));
        self.register(Box::new(h.clone()));
        h
    }

    /// Registers an integer gauge family.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| invalid_metric(name, e));
        self.register(Box::new(g.clone()));
        g
    }

    /// Registers a float gauge family.
    pub fn float_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
        let g = prometheus::GaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| invalid_metric(name, e));
        self.register(Box::new(g.clone()));
        g
    }

    /// Registers a gauge without labels.
    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::new(name, help).unwrap_or_else(|e| invalid_metric(name, e));
        self.register(Box::new(g.clone()));
        g
    }

    /// Registers a counter without labels.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        let c = IntCounter::new(name, help).unwrap_or_else(|e| invalid_metric(name, e));
        self.register(Box::new(c.clone()));
        c
    }

    /// Registers any collector and remembers its names.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Ok(mut names) = self.names.lock() {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
        }
        if let Err(e) = self.registry.register(c) {
            // Only a programming error (a duplicate name) can get here; metrics are not worth
            // a crash, so it is logged.
            tracing::error!(error = %e, "metric registration failed");
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
    pub fn names(&self) -> Vec<String> {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
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
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn invalid_metric<T>(name: &str, e: prometheus::Error) -> T {
    // Metric definitions are constants: a failure here is a bug caught by the first test run.
    panic!("invalid metric definition {name}: {e}")
}
