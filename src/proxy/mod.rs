//! The life of a request, one phase per file, over one per-call context ([`call::Call`]):
//!
//! ```text
//! client ─► route ─► identify ─► admit ─► prune ─► forward ─► stream back ─► record
//!           route.rs identify.rs admit.rs prune.rs forward.rs stream.rs     record.rs
//! ```
//!
//! [`Proxy::handle`] below is that diagram in code. Each phase is a method of [`Proxy`] in its
//! own file that reads and writes the [`call::Call`] and returns an [`Error`] to end the call
//! early; no phase counts or records anything (they log only debug lines and ctxgate's own
//! faults) — `record` alone does, exactly once per call, on every path (the `Call` is a drop
//! guard from the moment the request arrives). The
//! wire formats are `crate::dialect`, pruning itself is `crate::prune`, the gates are
//! `crate::gate`. `upstream.rs` holds the pooled clients, TLS and the start-up warm-up;
//! `heavy.rs` the pool for large bodies (fair per conversation, bounded); `effect.rs` a call's
//! cost and its side of the holdout comparison, which `record` works out. docs/ARCHITECTURE.md has the whole map.

pub mod admit;
pub mod call;
pub mod count;
pub mod effect;
pub mod forward;
pub mod heavy;
pub mod identify;
pub mod prune;
pub mod record;
pub mod route;
pub mod stream;
pub mod summary;
pub mod upstream;

use std::convert::Infallible;
use std::sync::{Arc, Weak};

use http::{Request, Response};
use hyper::body::Incoming;

use crate::config::{Config, Conversation, Route};
use crate::error::Error;
use crate::gate::Gates;
use crate::metrics::Metrics;
use crate::transcript::Transcripts;

use call::{Call, End, RouteState};
use record::{CallMetrics, Recorder, RouteMetrics};
use stream::ResponseBody;

pub use prune::{prune_guarded, TOKEN_LIMIT_HEADER};

/// The proxy: routes, gates, pruning state and the recorder, shared by every connection.
pub struct Proxy {
    /// Routes sorted by prefix length, longest first, so the first match is the longest.
    routes: Vec<Arc<RouteState>>,
    max_body_bytes: u64,
    /// Client-side limits (request-body timeouts).
    server: crate::config::Server,
    conversation: Conversation,
    gates: Arc<Gates>,
    /// The shared state (`[state] backend = "redis"`).
    state: Option<Arc<crate::state::State>>,
    /// How long a shared view entry lives unused.
    view_idle_ttl: std::time::Duration,
    gate_fingerprinted: bool,
    pruning: prune::Pruning,
    /// Conversations' summaries and the calls making them (`[prune.summary]`).
    summaries: Arc<summary::Summaries>,
    /// Model prices, for the summaries' cost.
    prices: Arc<crate::config::Prices>,
    heavy: heavy::Heavy,
    transcripts: Transcripts,
    recorder: Arc<Recorder>,
    gauges: Gauges,
    warmup: upstream::WarmupMetrics,
    /// Turns true when the shutdown grace period is over: calls still running are cut.
    cut: tokio::sync::watch::Sender<bool>,
}

/// Gauges read from the gates and the view when `/metrics` is scraped.
struct Gauges {
    gate: admit::GateMetrics,
    prune: prune::PruneMetrics,
}

impl Proxy {
    /// Builds the proxy, one pooled client per route, and registers the request path's
    /// metric families in `metrics`.
    pub fn new(
        config: &Config,
        metrics: &Metrics,
        transcripts: Transcripts,
        loops: usize,
        state: Option<Arc<crate::state::State>>,
    ) -> Result<Proxy, upstream::BuildError> {
        let m = ProxyMetrics::register(metrics, &config.routes);
        let native = upstream::native_roots();
        let mut configs: Vec<&Route> = config.routes.iter().collect();
        configs.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let mut routes = Vec::with_capacity(configs.len());
        let mut route_metrics = Vec::with_capacity(configs.len());
        let prices = Arc::new(config.prices.clone());
        // Route names in `RouteState::index` order, as the recorder keeps its series.
        let by_index: Vec<&str> = configs.iter().map(|r| r.name.as_str()).collect();
        let effects = effect::Effects::new(prices.clone(), m.effect, &by_index);
        for (index, r) in configs.into_iter().enumerate() {
            routes.push(Arc::new(RouteState {
                config: r.clone(),
                clients: (0..loops.max(1))
                    .map(|_| upstream::build_client(r, &native))
                    .collect::<Result<_, _>>()?,
                index,
            }));
            route_metrics.push(RouteMetrics::new(
                &m.call,
                &m.gate.wait,
                &m.prune,
                &r.name,
                r.dialect,
            ));
        }
        let gates = admit::gates(config, state.clone());
        let summaries = Arc::new(summary::Summaries::new(
            m.summary.clone(),
            config.prune.view_idle_ttl,
            state.clone(),
        ));
        Ok(Proxy {
            routes,
            max_body_bytes: config.max_body_bytes,
            server: config.server.clone(),
            conversation: config.conversation.clone(),
            gates,
            state,
            view_idle_ttl: config.prune.view_idle_ttl,
            gate_fingerprinted: config.gates.gate_fingerprinted,
            pruning: prune::Pruning::new(config).map_err(upstream::BuildError::Counter)?,
            summaries,
            prices,
            // One thread fewer than the cores, at normal priority, fair per conversation.
            heavy: heavy::Heavy::for_machine(),
            recorder: Arc::new(Recorder::new(
                m.call,
                route_metrics,
                m.gate.rejections.clone(),
                effects,
                transcripts.clone(),
            )),
            transcripts,
            gauges: Gauges {
                gate: m.gate,
                prune: m.prune,
            },
            warmup: m.warmup,
            cut: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Serves one request. Never fails: every error becomes a response in the dialect's shape.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let (parts, body) = req.into_parts();
        let mut call = Call::new(self.recorder.clone(), parts, body);
        Ok(match self.phases(&mut call).await {
            Ok(Answer::Upstream(upstream)) => self.stream_back(call, upstream),
            Ok(Answer::Local(resp)) => self.answer_locally(call, resp),
            Err(e) => fail(call, e),
        })
    }

    /// Phases 1 to 5; phase 6 (`stream_back`) takes the call over with the response, and the
    /// call records itself (phase 7) when it ends. A count-tokens request of a route that
    /// counts locally is answered right after `route` (`count.rs`).
    async fn phases(&self, call: &mut Call) -> Result<Answer, Error> {
        let upstream_uri = self.route(call)?;
        if let Some(resp) = self.count_locally(call).await? {
            return Ok(Answer::Local(resp));
        }
        self.identify(call).await?;
        self.admit(call).await?;
        self.prune(call).await?;
        self.forward(call, upstream_uri).await.map(Answer::Upstream)
    }

    /// Sends an answer ctxgate made itself, and records the call.
    fn answer_locally(
        &self,
        mut call: Call,
        resp: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        call.status = Some(resp.status().as_u16());
        call.ttfb = Some(call.start.elapsed());
        self.recorder.responded(&call);
        call.end(End::Complete);
        resp
    }

    /// Cuts every call still running (the shutdown grace period is over): a streaming
    /// response ends with the dialect's error (an SSE error event, or a cut body) and is
    /// recorded as `shutdown`; a call still waiting for its upstream's headers or queued at
    /// the gate is answered 503. The records reach the transcript queue before the writer drains it.
    pub fn cut_calls(&self) {
        self.cut.send_replace(true);
    }

    /// Resolves when no summary call is running (their records must reach the transcript
    /// queue before it is drained).
    pub async fn summaries_done(&self) {
        self.summaries.idle().await;
    }

    /// Ends the summary calls still running (the grace period is over); each records itself.
    pub fn cancel_summaries(&self) {
        self.summaries.cancel();
    }

    /// Resolves once the calls are cut ([`Proxy::cut_calls`]); never before.
    pub(super) async fn cut_signal(&self) {
        let mut cut = self.cut.subscribe();
        if cut.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Starts the background work: the gate sweeper (it holds the gates weakly and ends with
    /// the proxy) and each route's connection warm-up, reporting to `readiness`.
    /// Each loop's client is warmed on its loop (`loops`: the event loops' runtime handles,
    /// in index order; its connections' tasks run there), the route's `prewarm_connections`
    /// dealt out over the loops.
    pub fn start_background(
        &self,
        readiness: &Arc<upstream::Readiness>,
        loops: &[tokio::runtime::Handle],
    ) {
        self.gates.spawn_sweeper();
        for r in &self.routes {
            let clients = r
                .clients
                .iter()
                .cloned()
                .zip(loops.iter().cloned())
                .collect();
            tokio::spawn(upstream::warm_up(
                r.config.clone(),
                clients,
                readiness.clone(),
                self.warmup.clone(),
            ));
        }
    }

    /// A hook for the admin listener: refreshes the gauges read from the gates and the view
    /// before each scrape. Holds the proxy weakly, so it never keeps it alive.
    pub fn gauge_refresher(self: &Arc<Self>) -> Box<dyn Fn() + Send + Sync> {
        let proxy: Weak<Proxy> = Arc::downgrade(self);
        Box::new(move || {
            if let Some(p) = proxy.upgrade() {
                p.gauges.gate.sync(&p.gates);
                p.gauges.prune.sync(&p.pruning.view);
            }
        })
    }
}

/// What the phases end with: the upstream's response, or one ctxgate made itself.
enum Answer {
    Upstream(Response<Incoming>),
    Local(Response<ResponseBody>),
}

/// Ends a call with the error ctxgate answers: recorded, then rendered in its dialect.
fn fail(mut call: Call, e: Error) -> Response<ResponseBody> {
    let resp = e.to_response(call.dialect);
    call.failure = Some(e);
    call.end(End::Failed);
    resp
}

/// Every metric family of the request path, registered once.
pub struct ProxyMetrics {
    /// Traffic, latency, failures, usage.
    pub call: CallMetrics,
    /// Admission.
    pub gate: admit::GateMetrics,
    /// Pruning and the view.
    pub prune: prune::PruneMetrics,
    /// Start-up warm-up.
    pub warmup: upstream::WarmupMetrics,
    /// Costs and the holdout comparison.
    pub effect: effect::EffectMetrics,
    /// Summaries (`[prune.summary]`).
    pub summary: summary::SummaryMetrics,
}

impl ProxyMetrics {
    /// Registers the families, with the series of every route at 0.
    pub fn register(m: &Metrics, routes: &[Route]) -> ProxyMetrics {
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        let with_dialect: Vec<_> = routes
            .iter()
            .map(|r| (r.name.as_str(), r.dialect))
            .collect();
        ProxyMetrics {
            call: CallMetrics::register(m, &with_dialect),
            gate: admit::GateMetrics::register(m, &names),
            prune: prune::PruneMetrics::register(m, &names),
            warmup: upstream::WarmupMetrics::register(m, &names),
            summary: summary::SummaryMetrics::register(m, &names),
            effect: effect::EffectMetrics::register(m, &names),
        }
    }
}
