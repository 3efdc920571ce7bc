//! A call's effectiveness figures — does pruning pay, and does it hurt? — worked out by the
//! recorder once per call ([`Effects::of`]) for the transcript record and counted
//! ([`Effects::observe`]) in the families below:
//!
//! - what the call cost as sent (`cost_usd`: the upstream's usage at the model's price) and
//!   what it would have cost unpruned (`cost_unpruned_usd`: plus the prompt tokens pruning
//!   removed, at the call's own mix of cached and fresh prompt prices);
//! - the prompt tokens ctxgate received and sent (its own count), and the provider cache's
//!   share of what the upstream billed;
//! - the holdout comparison: conversations forwarded unpruned (`prune.holdout_percent`, group
//!   `holdout`) against those pruning was on for (group `pruned`: unchanged, pruned or
//!   rejected on a route that enforces its budget, not `mode = "shadow"`) on calls, errors,
//!   output tokens, finish reasons and latency. The groups are drawn by conversation id, so
//!   within a route they see the same mix of work.
//!
//! Series are by route and model, the model label being the glob of the call's price entry
//! (`[[prices]]`, then the shipped table) or `other`: a bounded set, never the client's model
//! string. A route's series for a model are created at its first call of that model; those
//! of `other` and of the config's own `[[prices]]` globs at start, at 0.
//!
//! The estimate counts what pruning removed at the price of the call's prompt tokens; an
//! unpruned conversation would often have read that old part from the provider's cache, so
//! the saving is an upper bound where caching is good (the cache-read share says how good).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{Counter, CounterVec, Histogram, HistogramVec, IntCounter, IntCounterVec};

use crate::dialect::{finish_class, Tapped, FINISH_CLASSES};
use crate::metrics::{Metrics, LATENCY_BUCKETS};
use crate::prices::{self, Price, Prices};
use crate::prune::{Mode, Summary};

use super::call::{Call, End, PruneAction};

/// The model label of a call without a price.
const OTHER: &str = "other";

/// The `group` label values, by [`Group`].
const GROUPS: [&str; 2] = ["pruned", "holdout"];

/// A call's side of the holdout comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// Pruning was on for its conversation (whether or not it cut this call).
    Pruned = 0,
    /// Its conversation is in the holdout: forwarded unpruned.
    Holdout = 1,
}

/// The group of a chat call whose pruning ran: holdout when its conversation is in the
/// holdout (`holdout`: pruning would have changed it; `unchanged`: it would not have); pruned
/// when pruning enforced its budget (`enforced`: not `mode = "shadow"`) and decided it
/// (unchanged, pruned, or rejected — a refusal is pruning's doing too); none for calls
/// pruning did not decide (skipped, shadow, not pruned at all), on either side.
fn group(holdout: bool, enforced: bool, action: PruneAction) -> Option<Group> {
    match action {
        PruneAction::Holdout => Some(Group::Holdout),
        PruneAction::Unchanged if holdout => Some(Group::Holdout),
        PruneAction::Unchanged | PruneAction::Pruned | PruneAction::Rejected if enforced => {
            Some(Group::Pruned)
        }
        PruneAction::Unchanged
        | PruneAction::Pruned
        | PruneAction::Rejected
        | PruneAction::None
        | PruneAction::Skipped
        | PruneAction::Shadow => None,
    }
}

/// How a call of the comparison went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Answered to the last byte with a success status.
    Answered,
    /// An error status (ctxgate's or the upstream's), a timeout, the upstream breaking off.
    Failed,
    /// Neither: the client left, or the shutdown cut it.
    Cut,
}

fn outcome(end: End, status: u16) -> Outcome {
    match end {
        End::Complete if status < 400 => Outcome::Answered,
        End::Complete | End::Failed | End::Timeout(_) | End::UpstreamError | End::Panicked => {
            Outcome::Failed
        }
        End::ClientGone | End::Shutdown => Outcome::Cut,
    }
}

/// Prompt tokens pruning removed from a call, in the upstream's tokens: ctxgate's count of
/// what it removed (`tokens_before - tokens_after`), scaled by the call's usage ratio (the
/// upstream's prompt tokens over ctxgate's count of what was sent) when known. Zero unless
/// the call went out pruned.
fn removed_tokens(summary: Option<&Summary>, went_pruned: bool, ratio: Option<f64>) -> u64 {
    let Some(s) = summary.filter(|_| went_pruned) else {
        return 0;
    };
    let removed = s.tokens_before.saturating_sub(s.tokens_after);
    match ratio {
        Some(r) if r.is_finite() && r > 0.0 => (removed as f64 * r).round() as u64,
        _ => removed,
    }
}

/// A call's estimated cost, US dollars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// What was sent, from the upstream's usage.
    pub sent: f64,
    /// Had the prompt gone unpruned: `sent` plus the `removed` prompt tokens.
    pub unpruned: f64,
}

/// The cost of a call whose upstream reported usage `t`, `removed` prompt tokens having been
/// pruned away; none without usage.
pub fn costs(price: &Price, t: &Tapped, removed: u64) -> Option<Costs> {
    if t.input_tokens.is_none() && t.output_tokens.is_none() {
        return None;
    }
    let input = t.input_tokens.unwrap_or(0);
    let cache_read = t.cache_read_tokens.unwrap_or(0);
    let sent = prices::cost(
        price,
        input,
        cache_read,
        t.cache_write_tokens.unwrap_or(0),
        t.output_tokens.unwrap_or(0),
    );
    let unpruned = match removed {
        0 => sent,
        n => sent + prices::removed_cost(price, n, input, cache_read),
    };
    Some(Costs { sent, unpruned })
}

/// One call's effect figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Effect {
    /// The place of the model's price entry in the table (none: no price, label `other`).
    model: Option<usize>,
    /// The estimated cost (none without usage or a price).
    pub costs: Option<Costs>,
    /// Prompt tokens by ctxgate's count as received and as sent, for a forwarded chat call
    /// with pruning figures.
    prompt: Option<(u64, u64)>,
    /// Its side of the holdout comparison.
    group: Option<Group>,
}

/// The effectiveness families.
#[derive(Clone)]
pub struct EffectMetrics {
    /// `ctxgate_effect_prompt_tokens_total{route,model,stage}`: ctxgate's count of the prompt
    /// tokens of forwarded chat calls, as `received` and as `sent`.
    pub prompt_tokens: IntCounterVec,
    /// `ctxgate_effect_cost_usd_total{route,model,prompt}`: estimated US dollars of answered
    /// chat calls, with the prompt as `sent` and as it would have been `unpruned`.
    pub cost: CounterVec,
    /// `ctxgate_effect_upstream_tokens_total{route,model,type}`: upstream-reported prompt
    /// tokens, `input` (all) and `cache_read`.
    pub upstream_tokens: IntCounterVec,
    /// `ctxgate_effect_calls_total{route,model,group}`: chat calls of the holdout comparison.
    pub calls: IntCounterVec,
    /// `ctxgate_effect_errors_total{route,model,group}`: those that failed.
    pub errors: IntCounterVec,
    /// `ctxgate_effect_output_tokens_total{route,model,group}`: their upstream-reported output
    /// tokens.
    pub output_tokens: IntCounterVec,
    /// `ctxgate_effect_finish_reasons_total{route,model,group,reason}`: how their answers
    /// ended ([`FINISH_CLASSES`]).
    pub finish_reasons: IntCounterVec,
    /// `ctxgate_effect_call_duration_seconds{route,group}`: arrival to last byte of those
    /// answered (no model label: a histogram's buckets multiply its series, and the groups
    /// see the same mix of models).
    pub duration: HistogramVec,
}

impl EffectMetrics {
    /// Registers the families, with each route's duration series at 0 (the per-model ones
    /// come with [`Effects::new`]).
    pub fn register(m: &Metrics, routes: &[&str]) -> EffectMetrics {
        let e = EffectMetrics {
            prompt_tokens: m.counter_vec(
                "ctxgate_effect_prompt_tokens_total",
                "Prompt tokens of forwarded chat calls by ctxgate's count, as received and as sent (fewer when pruned); model is the price glob matched, or other.",
                &["route", "model", "stage"],
            ),
            cost: m.float_counter_vec(
                "ctxgate_effect_cost_usd_total",
                "Estimated US dollars of answered chat calls (the upstream's usage at [[prices]]), with the prompt as sent and as it would have been unpruned.",
                &["route", "model", "prompt"],
            ),
            upstream_tokens: m.counter_vec(
                "ctxgate_effect_upstream_tokens_total",
                "Upstream-reported prompt tokens by model: input (all of them) and cache_read.",
                &["route", "model", "type"],
            ),
            calls: m.counter_vec(
                "ctxgate_effect_calls_total",
                "Chat calls of the holdout comparison: group pruned (pruning on) or holdout (forwarded unpruned).",
                &["route", "model", "group"],
            ),
            errors: m.counter_vec(
                "ctxgate_effect_errors_total",
                "Calls of the holdout comparison that failed: an error status, a timeout, the upstream breaking off.",
                &["route", "model", "group"],
            ),
            output_tokens: m.counter_vec(
                "ctxgate_effect_output_tokens_total",
                "Upstream-reported output tokens of the calls of the holdout comparison.",
                &["route", "model", "group"],
            ),
            finish_reasons: m.counter_vec(
                "ctxgate_effect_finish_reasons_total",
                "How the answers of the holdout comparison ended: stop, length, tool_calls, content_filter, other.",
                &["route", "model", "group", "reason"],
            ),
            duration: m.histogram_vec(
                "ctxgate_effect_call_duration_seconds",
                "Arrival to last byte of the answered calls of the holdout comparison.",
                &["route", "group"],
                LATENCY_BUCKETS,
            ),
        };
        for r in routes {
            for g in GROUPS {
                e.duration.with_label_values(&[r, g]);
            }
        }
        e
    }
}

/// One route's series for one model.
struct ModelSeries {
    /// Received, sent.
    prompt: [IntCounter; 2],
    /// Sent, unpruned.
    cost: [Counter; 2],
    /// Input, cache read.
    upstream: [IntCounter; 2],
    /// By [`Group`].
    groups: [GroupSeries; 2],
}

struct GroupSeries {
    calls: IntCounter,
    errors: IntCounter,
    output: IntCounter,
    /// By [`FINISH_CLASSES`].
    finish: [IntCounter; 5],
}

impl ModelSeries {
    fn new(m: &EffectMetrics, route: &str, model: &str) -> ModelSeries {
        ModelSeries {
            prompt: ["received", "sent"]
                .map(|s| m.prompt_tokens.with_label_values(&[route, model, s])),
            cost: ["sent", "unpruned"].map(|p| m.cost.with_label_values(&[route, model, p])),
            upstream: ["input", "cache_read"]
                .map(|t| m.upstream_tokens.with_label_values(&[route, model, t])),
            groups: GROUPS.map(|g| GroupSeries {
                calls: m.calls.with_label_values(&[route, model, g]),
                errors: m.errors.with_label_values(&[route, model, g]),
                output: m.output_tokens.with_label_values(&[route, model, g]),
                finish: FINISH_CLASSES
                    .map(|c| m.finish_reasons.with_label_values(&[route, model, g, c])),
            }),
        }
    }
}

/// One route's series.
struct RouteEffect {
    name: String,
    /// By the model's place in the price table, `other` last; each made at its first use.
    models: Box<[OnceLock<ModelSeries>]>,
    /// By [`Group`].
    duration: [Histogram; 2],
}

/// The price table and every route's effectiveness series: the recorder's.
pub struct Effects {
    prices: Arc<Prices>,
    metrics: EffectMetrics,
    /// By `RouteState::index`.
    routes: Vec<RouteEffect>,
}

impl Effects {
    /// The effects of calls on `routes` (in `RouteState::index` order) priced by `prices`;
    /// creates each route's series of `other` and of the config's `[[prices]]` globs at 0.
    pub fn new(prices: Arc<Prices>, metrics: EffectMetrics, routes: &[&str]) -> Effects {
        let routes = routes
            .iter()
            .map(|r| RouteEffect {
                name: r.to_string(),
                models: (0..=prices.table_len()).map(|_| OnceLock::new()).collect(),
                duration: GROUPS.map(|g| metrics.duration.with_label_values(&[r, g])),
            })
            .collect();
        let e = Effects {
            prices,
            metrics,
            routes,
        };
        let known = (0..e.prices.entries.len()).map(Some).chain([None]);
        for model in known {
            for r in &e.routes {
                e.series(r, model);
            }
        }
        e
    }

    /// The series of `model` (its place in the price table; none: `other`) on route `r`.
    fn series<'a>(&self, r: &'a RouteEffect, model: Option<usize>) -> &'a ModelSeries {
        let other = self.prices.table_len();
        let i = model.filter(|i| *i < other).unwrap_or(other);
        r.models[i].get_or_init(|| {
            let label = self.prices.glob(i).unwrap_or(OTHER);
            ModelSeries::new(&self.metrics, &r.name, label)
        })
    }

    /// The figures of a call that has ended, its upstream having reported `t`; `ratio` is
    /// the call's usage ratio (upstream prompt tokens over ctxgate's count of what was sent).
    pub fn of(&self, call: &Call, t: &Tapped, ratio: Option<f64>) -> Effect {
        let found = call
            .model
            .as_deref()
            .and_then(|m| self.prices.find_indexed(m));
        let went_pruned = call.action == PruneAction::Pruned && !call.holdout;
        let summary = call.summary.as_ref();
        let removed = removed_tokens(summary, went_pruned, ratio);
        Effect {
            model: found.map(|(i, _, _)| i),
            costs: found.and_then(|(_, _, price)| costs(&price, t, removed)),
            prompt: summary.filter(|_| call.forwarded_at.is_some()).map(|s| {
                let sent = if went_pruned {
                    s.tokens_after
                } else {
                    s.tokens_before
                };
                (s.tokens_before, sent)
            }),
            // A rejected call has no budget stored; only an enforced budget rejects.
            group: group(
                call.holdout,
                call.budget.as_ref().is_none_or(|b| b.mode == Mode::Enforce),
                call.action,
            ),
        }
    }

    /// Counts a chat call's figures on its route's series.
    pub fn observe(&self, call: &Call, e: &Effect, t: &Tapped, end: End, elapsed: Duration) {
        let Some(r) = call.route.as_ref().and_then(|r| self.routes.get(r.index)) else {
            return;
        };
        if !call.chat {
            return;
        }
        let s = self.series(r, e.model);
        if let Some((received, sent)) = e.prompt {
            s.prompt[0].inc_by(received);
            s.prompt[1].inc_by(sent);
        }
        if let Some(c) = e.costs {
            add(&s.cost[0], c.sent);
            add(&s.cost[1], c.unpruned);
        }
        for (series, v) in s.upstream.iter().zip([t.input_tokens, t.cache_read_tokens]) {
            if let Some(n) = v {
                series.inc_by(n);
            }
        }
        let Some(g) = e.group else { return };
        let gs = &s.groups[g as usize];
        gs.calls.inc();
        if let Some(n) = t.output_tokens {
            gs.output.inc_by(n);
        }
        if let Some(reason) = &t.finish_reason {
            let class = finish_class(reason);
            if let Some(i) = FINISH_CLASSES.iter().position(|c| *c == class) {
                gs.finish[i].inc();
            }
        }
        match outcome(end, call.status.unwrap_or(super::call::CLIENT_CLOSED)) {
            Outcome::Answered => r.duration[g as usize].observe(elapsed.as_secs_f64()),
            Outcome::Failed => gs.errors.inc(),
            Outcome::Cut => {}
        }
    }
}

/// Adds dollars to a counter (which may not go down).
fn add(c: &Counter, usd: f64) {
    if usd.is_finite() && usd > 0.0 {
        c.inc_by(usd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Phase;

    fn summary(before: u64, after: u64) -> Summary {
        Summary {
            tokens_before: before,
            tokens_after: after,
            ..Summary::default()
        }
    }

    fn usage(input: u64, cache_read: u64, cache_write: u64, output: u64) -> Tapped {
        Tapped {
            input_tokens: Some(input),
            cache_read_tokens: Some(cache_read),
            cache_write_tokens: Some(cache_write),
            output_tokens: Some(output),
            ..Tapped::default()
        }
    }

    #[test]
    fn removed_tokens_are_scaled_to_the_upstream_and_only_when_pruned() {
        let s = summary(10_000, 2_000);
        // The upstream counted 2100 for ctxgate's 2000: 8000 removed are 8400 of its own.
        assert_eq!(removed_tokens(Some(&s), true, Some(1.05)), 8400);
        assert_eq!(removed_tokens(Some(&s), true, None), 8000);
        assert_eq!(removed_tokens(Some(&s), true, Some(f64::NAN)), 8000);
        // Forwarded as received (unchanged, shadow, holdout): nothing removed.
        assert_eq!(removed_tokens(Some(&s), false, Some(1.05)), 0);
        assert_eq!(removed_tokens(None, true, Some(1.0)), 0);
        // A summary pinned in can make what is sent larger than what was received.
        assert_eq!(removed_tokens(Some(&summary(100, 150)), true, None), 0);
    }

    #[test]
    fn costs_as_sent_and_unpruned() {
        let price = Price {
            input: 2.0,
            cached_input: 0.5,
            cache_write: 2.5,
            output: 8.0,
        };
        // 1000 prompt tokens, 400 read from the cache, 100 written; 50 output.
        let t = usage(1000, 400, 100, 50);
        let sent = (500.0 * 2.0 + 400.0 * 0.5 + 100.0 * 2.5 + 50.0 * 8.0) / 1e6;
        let c = costs(&price, &t, 0).unwrap();
        assert!((c.sent - sent).abs() < 1e-15, "{c:?}");
        assert_eq!(c.unpruned, c.sent);
        // 2000 removed, at the call's mix: 40% cached, 60% fresh.
        let c = costs(&price, &t, 2000).unwrap();
        let extra = 2000.0 * (0.4 * 0.5 + 0.6 * 2.0) / 1e6;
        assert!((c.unpruned - (sent + extra)).abs() < 1e-15, "{c:?}");
        // No usage, no cost; output alone is usage.
        assert_eq!(costs(&price, &Tapped::default(), 10), None);
        let out = Tapped {
            output_tokens: Some(10),
            ..Tapped::default()
        };
        assert_eq!(
            costs(&price, &out, 0).map(|c| c.sent),
            Some(10.0 * 8.0 / 1e6)
        );
    }

    #[test]
    fn groups_and_outcomes() {
        // A holdout call's budget is turned to shadow mode: `enforced` is false for it.
        assert_eq!(
            group(true, false, PruneAction::Unchanged),
            Some(Group::Holdout)
        );
        assert_eq!(
            group(true, false, PruneAction::Holdout),
            Some(Group::Holdout)
        );
        assert_eq!(
            group(true, false, PruneAction::Skipped),
            None,
            "as on the pruned side"
        );
        for a in [
            PruneAction::Unchanged,
            PruneAction::Pruned,
            PruneAction::Rejected,
        ] {
            assert_eq!(group(false, true, a), Some(Group::Pruned), "{a:?}");
            // A route in shadow mode prunes nothing: its calls are in neither group.
            assert_eq!(group(false, false, a), None, "{a:?}");
        }
        for a in [PruneAction::None, PruneAction::Skipped, PruneAction::Shadow] {
            assert_eq!(group(false, true, a), None, "{a:?}");
        }
        assert_eq!(outcome(End::Complete, 200), Outcome::Answered);
        assert_eq!(outcome(End::Complete, 400), Outcome::Failed);
        assert_eq!(outcome(End::Failed, 400), Outcome::Failed);
        assert_eq!(
            outcome(End::Timeout(Phase::StreamIdle), 200),
            Outcome::Failed
        );
        assert_eq!(outcome(End::UpstreamError, 200), Outcome::Failed);
        assert_eq!(outcome(End::ClientGone, 200), Outcome::Cut);
        assert_eq!(outcome(End::Shutdown, 200), Outcome::Cut);
    }

    #[test]
    fn series_are_made_for_other_and_the_configured_globs_at_start() {
        let m = Metrics::new();
        let prices = Prices {
            entries: vec![crate::prices::PriceEntry {
                pattern: "mock-*".into(),
                price: Price {
                    input: 1.0,
                    cached_input: 0.1,
                    cache_write: 1.0,
                    output: 2.0,
                },
            }],
        };
        let e = Effects::new(
            Arc::new(prices),
            EffectMetrics::register(&m, &["a"]),
            &["a"],
        );
        let page = String::from_utf8(m.render()).unwrap();
        for model in ["mock-*", "other"] {
            let line = format!(
                "ctxgate_effect_calls_total{{group=\"holdout\",model=\"{model}\",route=\"a\"}} 0"
            );
            assert!(page.contains(&line), "{line} in\n{page}");
        }
        assert!(
            !page.contains("gpt-4o*"),
            "shipped globs wait for their first call"
        );
        assert!(page.contains(
            "ctxgate_effect_call_duration_seconds_count{group=\"pruned\",route=\"a\"} 0"
        ));
        // A shipped glob's series come with its first use, under the glob.
        let r = &e.routes[0];
        let (i, _, _) = e.prices.find_indexed("gpt-4o-mini-2024-07-18").unwrap();
        e.series(r, Some(i)).groups[0].calls.inc();
        let page = String::from_utf8(m.render()).unwrap();
        assert!(page.contains(
            "ctxgate_effect_calls_total{group=\"pruned\",model=\"gpt-4o-mini*\",route=\"a\"} 1"
        ));
        // An index past the table is `other`.
        e.series(r, Some(10_000)).prompt[0].inc_by(5);
        let page = String::from_utf8(m.render()).unwrap();
        assert!(page.contains(
            "ctxgate_effect_prompt_tokens_total{model=\"other\",route=\"a\",stage=\"received\"} 5"
        ));
    }
}
