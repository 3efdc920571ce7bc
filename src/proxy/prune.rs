//! Phase 4, prune: decides what to forward for a chat request. The budget comes from
//! [`Budget::for_request`] (route, model, the request's `x-ctxgate-token-limit`); the decision
//! is the pure [`crate::prune::prune`], run inline for small bodies and on the heavy pool for
//! large ones, with a panic costing one request its pruning, never the process. The phase
//! stores the outcome in the [`Call`] (a [`PruneAction`], the summary, the body to forward)
//! and owns the pruning metric families, which `record` fills when the call ends.

use crate::state::shared::SharedConv;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderMap, HeaderValue};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};

use crate::config::Config;
use crate::error::Error;
use crate::metrics::{Metrics, OVERHEAD_BUCKETS};
use crate::prune::{
    self, Budget, ChatRequest, Counter, Dropped, Encoding, Outcome, Summary, View, With,
};

use super::call::{Call, Payload, PruneAction, RouteState};
use super::heavy::{Refused, INLINE_BYTES};
use super::summary;
use super::Proxy;

/// The request header with which a request lowers (never raises) its own token limit.
pub const TOKEN_LIMIT_HEADER: &str = "x-ctxgate-token-limit";

/// What pruning needs beyond the request: the counter and the conversation view.
pub struct Pruning {
    /// The token counter (both vocabularies).
    pub counter: Arc<Counter>,
    /// Per-conversation counts and the cache-stable cut.
    pub view: Arc<View>,
}

impl Pruning {
    /// The counter and an empty view, sized by `[prune]`.
    pub fn new(config: &Config) -> Result<Pruning, String> {
        Ok(Pruning {
            counter: Arc::new(Counter::new(config.prune.budget.default_encoding)?),
            view: Arc::new(View::new(
                config.prune.view_max_bytes,
                config.prune.view_idle_ttl,
            )),
        })
    }
}

impl Proxy {
    /// Prunes a chat request of a route that prunes; leaves `call.payload` ready to forward.
    pub(super) async fn prune(&self, call: &mut Call) -> Result<(), Error> {
        let limit = token_limit_header(&call.request.headers);
        call.request.headers.remove(TOKEN_LIMIT_HEADER);
        let Some(route) = call.route.clone() else {
            return Ok(());
        };
        let cfg = &route.config;
        let payload = std::mem::take(&mut call.payload);
        let (bytes, req) = match payload {
            Payload::Chat(bytes, req) if cfg.prune.enabled && req.unprunable().is_some() => {
                call.action = PruneAction::Skipped;
                call.prune_reason = req.unprunable().map(|u| u.as_str());
                call.payload = Payload::Ready(bytes);
                return Ok(());
            }
            Payload::Chat(bytes, req) if cfg.prune.enabled => (bytes, req),
            Payload::Opaque(bytes) => {
                if cfg.prune.enabled {
                    call.action = PruneAction::Skipped;
                } else {
                    call.prune_reason = None;
                }
                call.payload = Payload::Ready(bytes);
                return Ok(());
            }
            Payload::Chat(bytes, _) => {
                call.payload = Payload::Ready(bytes);
                return Ok(());
            }
            other => {
                call.payload = other;
                return Ok(());
            }
        };
        // The request holds the body too: `bytes` is let go here, and the body comes back from
        // `decide` only when it is forwarded as it came, so that a large body that was pruned
        // is freed on the heavy pool, not on an async worker.
        drop(bytes);
        let mut budget = Budget::for_request(&cfg.prune, req.model(), limit?);
        // The holdout: pruning is computed (what it would have sent is recorded) and the
        // request goes as it came, whatever its size.
        call.holdout = call
            .conversation
            .as_deref()
            .is_some_and(|c| in_holdout(c, budget.holdout_basis_points));
        if call.holdout {
            budget.mode = prune::Mode::Shadow;
            budget.on_overflow = prune::OnOverflow::Forward;
        }
        let started = Instant::now();
        // Shared state: the conversation's entry as the last replica left it, adopted when
        // this replica's own is not it; written back once pruned.
        let shared = match (&self.state, &call.conversation) {
            (Some(s), Some(c)) if s.up() => Some((s, c.clone(), s.view_get(c).await)),
            _ => None,
        };
        let entry = shared
            .as_ref()
            .and_then(|(_, _, e)| e.clone().ok().flatten());
        // Summaries: the conversation's current one is offered to pruning (pinned while the
        // cut stays where it was made for), and a moved cut hands back what it dropped.
        let summarise = budget.summary.enabled
            && !call.holdout
            && budget.mode == prune::Mode::Enforce
            && call.conversation.is_some();
        let dialect = req.dialect();
        let enc = req.encoding(&self.pruning.counter, budget.default_encoding);
        let previous = match &call.conversation {
            Some(c) if summarise => self.summaries.get(c, dialect, enc).await,
            _ => None,
        };
        let (decided, bytes) = self
            .decide(
                *req,
                &budget,
                call,
                entry.clone(),
                previous.clone(),
                summarise,
            )
            .await?;
        let (outcome, dropped) = match decided {
            Some((o, d)) => (Some(o), d),
            None => (None, None),
        };
        // Published only when pruning ran (a failed run left the view's older entry), and
        // only over the entry read (compare-and-set): a concurrent call of the conversation
        // on another replica (ungated, or max_concurrent_per_conversation > 1) cannot be
        // overwritten by an older one.
        if let (Some((s, c, Ok(_))), Some(_)) = (&shared, &outcome) {
            let read = entry.as_ref().map(|e| (e.writer, e.version));
            let version = read.map_or(0, |(_, v)| v).wrapping_add(1);
            let view = &self.pruning.view;
            if let Some(e) = view.shared_entry(c, s.writer(), version) {
                if s.view_put(c, &e, read, self.view_idle_ttl).await == Ok(true) {
                    view.set_origin(c, (s.writer(), version));
                }
            }
        }
        call.prune_took = Some(started.elapsed());
        call.summary = outcome.as_ref().and_then(|o| o.summary().cloned());
        let forward = match outcome {
            None => {
                call.action = PruneAction::Skipped;
                call.prune_reason = Some("prune_failed");
                bytes
            }
            Some(outcome) => self.apply(outcome, bytes, call)?,
        };
        if let Some(t) = call.summary.as_ref().map(|s| s.summary_tokens) {
            if t > 0 && call.action == PruneAction::Pruned {
                call.summary_tokens = Some(t);
                self.summaries.pinned(&route.config.name);
            }
        }
        if let (Some(d), true) = (dropped, call.action == PruneAction::Pruned) {
            self.summarise(call, &route, &budget, d, (dialect, enc), previous);
        }
        call.budget = Some(budget);
        if self.transcripts.include_bodies() {
            call.request_messages = messages_of(&forward, call.dialect.items_key());
        }
        call.payload = Payload::Ready(forward);
        Ok(())
    }

    /// Starts the summary of what the call's moved cut dropped (`[prune.summary]`), in the
    /// background; `previous` is the summary pinned for the cut before.
    fn summarise(
        &self,
        call: &Call,
        route: &Arc<RouteState>,
        budget: &Budget,
        dropped: Dropped,
        (dialect, enc): (crate::dialect::Dialect, Encoding),
        previous: Option<Arc<summary::Entry>>,
    ) {
        let Some(conversation) = call.conversation.clone() else {
            return;
        };
        let settings = budget.summary.clone();
        let target = match &settings.route {
            Some(name) => self.routes.iter().find(|r| &r.config.name == name).cloned(),
            None => Some(route.clone()),
        };
        let Some(target) = target else {
            self.summaries.skipped(&route.config.name, "no_credentials");
            return;
        };
        let same = target.config.target == route.config.target;
        let path = match &settings.path {
            Some(p) => p.clone(),
            None if Arc::ptr_eq(&target, route) => summary::endpoint_like(
                call.request
                    .uri
                    .path()
                    .get(route.config.prefix.len()..)
                    .unwrap_or(""),
                target.config.dialect,
            ),
            None => summary::default_endpoint(target.config.dialect).to_string(),
        };
        let credentials = summary::credentials(
            &settings,
            &call.request.headers,
            same,
            target.config.dialect,
        );
        let job = summary::Job {
            conversation,
            route: route.clone(),
            target,
            settings,
            dialect,
            enc,
            dropped,
            path,
            credentials,
            counter: self.pruning.counter.clone(),
            transcripts: self.transcripts.clone(),
            prices: self.prices.clone(),
        };
        self.summaries.start(job, previous);
    }

    /// Turns a pruning outcome into the bytes to forward (and the call's action).
    fn apply(
        &self,
        outcome: Outcome,
        bytes: bytes::Bytes,
        call: &mut Call,
    ) -> Result<bytes::Bytes, Error> {
        Ok(match outcome {
            Outcome::Unchanged(_) => {
                call.action = PruneAction::Unchanged;
                bytes
            }
            Outcome::Shadow(_) => {
                call.action = if call.holdout {
                    PruneAction::Holdout
                } else {
                    PruneAction::Shadow
                };
                bytes
            }
            Outcome::Pruned { body, .. } => {
                call.action = PruneAction::Pruned;
                let h = &mut call.request.headers;
                h.remove(header::CONTENT_LENGTH);
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                bytes::Bytes::from(body)
            }
            Outcome::Rejected(r) => {
                call.action = PruneAction::Rejected;
                return Err(Error::ContextOverflow(r));
            }
        })
    }

    /// Runs the pure pruning function, inline or on the heavy pool; `None` when it failed,
    /// [`Error::Busy`] when the pool's queue is full. With the outcome comes the body as
    /// received, unless the outcome replaces it (then it is dropped where pruning ran).
    #[allow(clippy::type_complexity)]
    async fn decide(
        &self,
        req: ChatRequest,
        budget: &Budget,
        call: &Call,
        shared: Option<SharedConv>,
        summary: Option<Arc<summary::Entry>>,
        want_dropped: bool,
    ) -> Result<(Option<(Outcome, Option<Dropped>)>, bytes::Bytes), Error> {
        let conversation = call.conversation.clone().unwrap_or_default();
        // What is new in the body is what pruning works on: a warm request of a conversation
        // in the view is pruned inline whatever its size.
        if req.fresh_bytes() <= INLINE_BYTES {
            let p = &self.pruning;
            let with = With {
                shared: shared.as_ref(),
                pin: summary.as_ref().map(|e| &e.pin),
                want_dropped,
            };
            let o = prune_guarded(&req, budget, &p.view, &conversation, &p.counter, with);
            return Ok(keep_body(o, req));
        }
        let (view, counter, b) = (
            self.pruning.view.clone(),
            self.pruning.counter.clone(),
            budget.clone(),
        );
        let lane = conversation.clone();
        match self
            .heavy
            .run(&lane, move || {
                let with = With {
                    shared: shared.as_ref(),
                    pin: summary.as_ref().map(|e| &e.pin),
                    want_dropped,
                };
                let o = prune_guarded(&req, &b, &view, &conversation, &counter, with);
                keep_body(o, req)
            })
            .await
        {
            Ok(o) => Ok(o),
            // Forwarding it unpruned could break the limit: the client is asked to retry.
            Err(Refused::Full(n)) => Err(Error::Busy(n)),
            // The pool is gone (its job catches panics itself): the request went with it.
            Err(e @ Refused::Failed) => {
                tracing::error!(route = call.route_name(), error = %e, "pruning task failed");
                Err(Error::Busy(0))
            }
        }
    }
}

/// The outcome, with the body as received when it is forwarded as it came (an empty one when
/// the outcome replaces it: the request, and with it the body, is dropped here).
#[allow(clippy::type_complexity)]
fn keep_body(
    outcome: Option<(Outcome, Option<Dropped>)>,
    req: ChatRequest,
) -> (Option<(Outcome, Option<Dropped>)>, bytes::Bytes) {
    let keep = !matches!(
        outcome,
        Some((Outcome::Pruned { .. } | Outcome::Rejected(_), _))
    );
    let body = if keep {
        req.body().clone()
    } else {
        bytes::Bytes::new()
    };
    (outcome, body)
}

/// Whether `conversation` is in the holdout of `basis_points` (hundredths of a percent): a
/// stable hash of the id, so a conversation is in or out for its whole life, on every replica.
pub fn in_holdout(conversation: &str, basis_points: u32) -> bool {
    basis_points > 0
        && xxhash_rust::xxh3::xxh3_64_with_seed(conversation.as_bytes(), HOLDOUT_SEED) % 10_000
            < u64::from(basis_points)
}

/// Seed of the holdout hash (fixed: changing it reshuffles every conversation).
const HOLDOUT_SEED: u64 = 0x686f_6c64_6f75_7401;

/// The request's own limit from [`TOKEN_LIMIT_HEADER`], if it sent one.
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

/// Runs the pure pruning function, catching a panic (a bug must cost one request its
/// pruning, never the process or the connection).
pub fn prune_guarded(
    req: &ChatRequest,
    budget: &Budget,
    view: &View,
    conversation: &str,
    counter: &Counter,
    with: With<'_>,
) -> Option<(Outcome, Option<Dropped>)> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        prune::prune_with(req, budget, view, conversation, counter, with)
    })) {
        Ok(o) => Some(o),
        Err(_) => {
            tracing::error!("pruning panicked; the request is forwarded unchanged");
            None
        }
    }
}

/// The `messages` of a chat body, for transcripts with `include_bodies = true`.
fn messages_of(body: &[u8], key: &str) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(v.get_mut(key)?.take())
}

/// The headers a pruned response carries: tokens before and after, messages dropped.
pub fn summary_headers(h: &mut HeaderMap, s: &Summary) {
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

/// Token-count buckets: from a short prompt to a long agent conversation.
const TOKEN_BUCKETS: &[f64] = &[
    250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 64000.0, 128000.0, 256000.0,
];

/// Pruning's metric families, and the conversation view's.
#[derive(Clone)]
pub struct PruneMetrics {
    /// `ctxgate_prune_actions_total{route,action}`: what pruning did with each chat request.
    pub actions: IntCounterVec,
    /// `ctxgate_prune_prompt_tokens{route,stage}`: prompt tokens before / after pruning.
    pub tokens: HistogramVec,
    /// `ctxgate_prune_tokens_removed_total{route}`.
    pub tokens_removed: IntCounterVec,
    /// `ctxgate_prune_messages_dropped_total{route}`.
    pub messages_dropped: IntCounterVec,
    /// `ctxgate_prune_files_elided_total{route}`.
    pub files_elided: IntCounterVec,
    /// `ctxgate_prune_cut_moves_total{route}`: times the cache-stable cut had to move.
    pub cut_moves: IntCounterVec,
    /// `ctxgate_prune_duration_seconds{route}`: time the prune phase took.
    pub duration: HistogramVec,
    /// `ctxgate_prune_body_bytes_total{route,part}`: chat body bytes `reused` from the
    /// conversation's previous body (checked by hash, not parsed) and `parsed`.
    pub body_bytes: IntCounterVec,
    /// `ctxgate_view_hits_total`: prunes that found the conversation in the view.
    view_hits: IntCounter,
    /// `ctxgate_view_misses_total`: prunes that did not.
    view_misses: IntCounter,
    /// `ctxgate_view_entries`: conversations in the view.
    view_entries: prometheus::IntGauge,
}

impl PruneMetrics {
    /// Registers the families, with every route's series at 0.
    pub fn register(m: &Metrics, routes: &[&str]) -> PruneMetrics {
        let p = PruneMetrics {
            actions: m.counter_vec(
                "ctxgate_prune_actions_total",
                "Chat requests by what pruning did: unchanged, pruned, rejected, skipped, shadow, holdout.",
                &["route", "action"],
            ),
            tokens: m.histogram_vec(
                "ctxgate_prune_prompt_tokens",
                "Prompt tokens of chat requests before and after pruning (stage).",
                &["route", "stage"],
                TOKEN_BUCKETS,
            ),
            tokens_removed: m.counter_vec(
                "ctxgate_prune_tokens_removed_total",
                "Prompt tokens removed by pruning.",
                &["route"],
            ),
            messages_dropped: m.counter_vec(
                "ctxgate_prune_messages_dropped_total",
                "Messages dropped by pruning.",
                &["route"],
            ),
            files_elided: m.counter_vec(
                "ctxgate_prune_files_elided_total",
                "File contents elided from older turns.",
                &["route"],
            ),
            cut_moves: m.counter_vec(
                "ctxgate_prune_cut_moves_total",
                "Times the cache-stable cut point had to move (each move costs a prompt-cache write).",
                &["route"],
            ),
            duration: m.histogram_vec(
                "ctxgate_prune_duration_seconds",
                "Time the prune phase took.",
                &["route"],
                OVERHEAD_BUCKETS,
            ),
            body_bytes: m.counter_vec(
                "ctxgate_prune_body_bytes_total",
                "Chat body bytes taken from the conversation's previous body unparsed (part=reused) or parsed (part=parsed).",
                &["route", "part"],
            ),
            view_hits: m.counter(
                "ctxgate_view_hits_total",
                "Prunes that found the conversation's earlier messages in the view.",
            ),
            view_misses: m.counter(
                "ctxgate_view_misses_total",
                "Prunes that did not find the conversation in the view.",
            ),
            view_entries: m.gauge("ctxgate_view_entries", "Conversations held in the view."),
        };
        for r in routes {
            for a in PruneAction::COUNTED {
                p.actions.with_label_values(&[r, a.as_str()]);
            }
            for stage in ["before", "after"] {
                p.tokens.with_label_values(&[r, stage]);
            }
            for c in [
                &p.tokens_removed,
                &p.messages_dropped,
                &p.files_elided,
                &p.cut_moves,
            ] {
                c.with_label_values(&[r]);
            }
            p.duration.with_label_values(&[r]);
            for part in ["reused", "parsed"] {
                p.body_bytes.with_label_values(&[r, part]);
            }
        }
        p
    }

    /// One route's series.
    pub fn route(&self, route: &str) -> RoutePruneMetrics {
        RoutePruneMetrics {
            tokens_before: self.tokens.with_label_values(&[route, "before"]),
            tokens_after: self.tokens.with_label_values(&[route, "after"]),
            tokens_removed: self.tokens_removed.with_label_values(&[route]),
            messages_dropped: self.messages_dropped.with_label_values(&[route]),
            files_elided: self.files_elided.with_label_values(&[route]),
            cut_moves: self.cut_moves.with_label_values(&[route]),
            duration: self.duration.with_label_values(&[route]),
            bytes_reused: self.body_bytes.with_label_values(&[route, "reused"]),
            bytes_parsed: self.body_bytes.with_label_values(&[route, "parsed"]),
            actions: PruneAction::COUNTED
                .map(|a| self.actions.with_label_values(&[route, a.as_str()])),
        }
    }

    /// Sets the view's series from the view (before each scrape).
    pub fn sync(&self, view: &View) {
        Metrics::sync_counter(&self.view_hits, view.hits());
        Metrics::sync_counter(&self.view_misses, view.misses());
        self.view_entries
            .set(i64::try_from(view.entry_count()).unwrap_or(i64::MAX));
    }
}

/// One route's pruning series, resolved once.
#[derive(Clone)]
pub struct RoutePruneMetrics {
    tokens_before: Histogram,
    tokens_after: Histogram,
    tokens_removed: IntCounter,
    messages_dropped: IntCounter,
    files_elided: IntCounter,
    cut_moves: IntCounter,
    duration: Histogram,
    bytes_reused: IntCounter,
    bytes_parsed: IntCounter,
    actions: [IntCounter; 6],
}

impl RoutePruneMetrics {
    /// Counts one call's pruning facts.
    pub fn observe(&self, call: &Call) {
        if let Some(i) = PruneAction::COUNTED.iter().position(|a| *a == call.action) {
            self.actions[i].inc();
        }
        if let Some(took) = call.prune_took {
            self.duration.observe(took.as_secs_f64());
        }
        if let Some((reused, parsed)) = call.parsed_bytes {
            self.bytes_reused.inc_by(reused);
            self.bytes_parsed.inc_by(parsed);
        }
        let Some(s) = &call.summary else { return };
        self.tokens_before.observe(s.tokens_before as f64);
        self.tokens_after.observe(s.tokens_after as f64);
        if s.cut_moved {
            self.cut_moves.inc();
        }
        if call.action == PruneAction::Pruned {
            self.tokens_removed
                .inc_by(s.tokens_before.saturating_sub(s.tokens_after));
            self.messages_dropped.inc_by(s.messages_dropped as u64);
            self.files_elided.inc_by(s.files_elided as u64);
        }
    }
}
