//! Phase 3, admit: a chat call with a conversation waits for its conversation's slot, then the
//! route's and the global cap; every other call (model lists, embeddings, token counts, chat
//! calls known only by a fingerprint) takes only the caps.
//! The permit is stored in the [`Call`] and released when the call ends, on every path. The
//! gates themselves (semaphores, bounded queues, the sweeper) are `crate::gate`; this file
//! builds them from `[gates]` and owns their metric families.

use std::sync::Arc;

use prometheus::{HistogramVec, IntCounterVec, IntGauge};

use crate::config::Config;
use crate::error::Error;
use crate::gate::{Gates, Limits};
use crate::metrics::{Metrics, LATENCY_BUCKETS};

use super::call::Call;
use super::Proxy;

/// Builds the gates from `[gates]` and the routes' `max_inflight` caps.
pub fn gates(config: &Config, shared: Option<Arc<crate::state::State>>) -> Arc<Gates> {
    let g = &config.gates;
    Gates::new_shared(
        Limits {
            per_conversation: g.max_concurrent_per_conversation,
            max_queue_per_conversation: g.max_queue_per_conversation,
            queue_timeout: g.queue_timeout,
            max_inflight: g.max_inflight,
            idle_ttl: g.idle_ttl,
            max_conversations: g.max_conversations,
        },
        config
            .routes
            .iter()
            .filter_map(|r| r.max_inflight.map(|n| (r.name.clone(), n))),
        shared,
    )
}

impl Proxy {
    /// Waits for the call's permit; a refusal is the 429 error.
    pub(super) async fn admit(&self, call: &mut Call) -> Result<(), Error> {
        let route = call.route_name();
        // Only chat calls run one at a time per conversation: an agent's other calls (token
        // counts, model lists) carry its session id too, and must not wait behind its stream.
        // A fingerprint is a guess: unless configured, it keys the view but not a gate.
        let gated = call.chat && (!call.guessed_conversation || self.gate_fingerprinted);
        let acquire = async {
            match call.conversation.as_deref().filter(|_| gated) {
                Some(id) => self.gates.acquire(id, route).await,
                None => self.gates.acquire_shared(route).await,
            }
        };
        // A call still queued when the shutdown grace ends is cut like the others (503).
        let admitted = tokio::select! {
            a = acquire => a,
            _ = self.cut_signal() => return Err(Error::ShuttingDown),
        };
        let permit = admitted.map_err(Error::Gate)?;
        call.waited = Some(permit.waited());
        call.permit = Some(permit);
        Ok(())
    }
}

/// The gate's metric families.
#[derive(Clone)]
pub struct GateMetrics {
    /// `ctxgate_gate_wait_seconds{route}`: time a request waited for admission.
    pub wait: HistogramVec,
    /// `ctxgate_gate_rejections_total{route,reason}`: 429s by reason (queue_full,
    /// queue_timeout, too_many_conversations).
    pub rejections: IntCounterVec,
    /// `ctxgate_gate_waiters`: requests waiting for admission now.
    waiters: IntGauge,
    /// `ctxgate_gate_active`: conversations with a call in flight now.
    active: IntGauge,
    /// `ctxgate_gate_known`: conversation gates in memory (held, awaited or idle).
    known: IntGauge,
}

/// The `reason` label values of `ctxgate_gate_rejections_total`.
const REJECTION_REASONS: [&str; 3] = ["queue_full", "queue_timeout", "too_many_conversations"];

impl GateMetrics {
    /// Registers the families, with every route's series at 0.
    pub fn register(m: &Metrics, routes: &[&str]) -> GateMetrics {
        let g = GateMetrics {
            wait: m.histogram_vec(
                "ctxgate_gate_wait_seconds",
                "Time a request waited at its gate before being admitted.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            rejections: m.counter_vec(
                "ctxgate_gate_rejections_total",
                "Requests refused with 429 by the gate, by reason.",
                &["route", "reason"],
            ),
            waiters: m.gauge("ctxgate_gate_waiters", "Requests waiting for admission."),
            active: m.gauge(
                "ctxgate_gate_active",
                "Conversations with at least one call in flight.",
            ),
            known: m.gauge(
                "ctxgate_gate_known",
                "Conversation gates held in memory (in use or idle, not yet forgotten).",
            ),
        };
        for r in routes {
            g.wait.with_label_values(&[r]);
            for reason in REJECTION_REASONS {
                g.rejections.with_label_values(&[r, reason]);
            }
        }
        g
    }

    /// Sets the gauges from the gates (before each scrape).
    pub fn sync(&self, gates: &Gates) {
        self.waiters.set(gates.waiters() as i64);
        self.active.set(gates.active_gates() as i64);
        self.known.set(gates.known_gates() as i64);
    }
}
