//! `ctxgate report`: what pruning saved, read back from the transcript records. Not on the
//! request path: it reads what the transcript sinks wrote (JSONL files or the PostgreSQL
//! table, [`load`]) and adds it up.
//!
//! ```text
//! Source ──load──▶ Entry ──Tally::add──▶ Tally ──Report::new──▶ Report ──▶ table | JSON | HTML
//!                  (one per record)      (filter, integer sums)            (text, serde, html)
//! ```
//!
//! - Per route, model and UTC day, over the client's calls (`kind = "call"`): calls, tokens
//!   before and after pruning, upstream input and cache-read tokens, estimated cost and cost
//!   had the prompt gone unpruned. Token and cost figures cover the calls pruning applied to
//!   (not in the holdout): a holdout call's `tokens_after` was never sent. ctxgate's own
//!   summary calls (`kind = "summary"`) are counted apart, where the summary call itself ran.
//! - Holdout against pruned ([`Comparison`]): the calls of conversations forwarded unpruned
//!   on purpose (`prune.holdout_percent`) against the others, on what pruning could harm.
//!
//! Sums are kept in integers (costs in picodollars), so a report does not depend on the order
//! the records were read in: the same records give the same document from JSONL or PostgreSQL.

pub mod html;
pub mod load;
pub mod text;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub use load::{LoadError, Scan, Source};

use crate::transcript::{KIND_CALL, KIND_SUMMARY};

/// Version of the JSON document's shape; raised when a field changes meaning or goes away
/// (fields may be added without raising it).
pub const JSON_VERSION: u32 = 1;

/// A UTC calendar day, `YYYY-MM-DD`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Day(String);

/// Why a day did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a date of the form YYYY-MM-DD (1970 or later): {0:?}")]
pub struct BadDay(String);

impl FromStr for Day {
    type Err = BadDay;

    fn from_str(s: &str) -> Result<Day, BadDay> {
        let bad = || BadDay(s.to_string());
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, BadDay> {
            let part = &s[r];
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        if y < 1970 || !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return Err(bad());
        }
        Ok(Day(s.to_string()))
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Day {
    /// The UTC day `t` falls on.
    pub fn of(t: SystemTime) -> Day {
        Day(crate::transcript::sink::jsonl::utc_day(t))
    }

    /// The day as `YYYY-MM-DD`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Midnight UTC at the start of the day.
    pub fn start(&self) -> SystemTime {
        let field = |r: std::ops::Range<usize>| self.0.get(r).and_then(|p| p.parse().ok());
        let (y, m, d) = (
            field(0..4).unwrap_or(1970),
            field(5..7).unwrap_or(1),
            field(8..10).unwrap_or(1),
        );
        let days = days_from_civil(y, m, d).max(0).unsigned_abs();
        SystemTime::UNIX_EPOCH + Duration::from_secs(days * 86_400)
    }

    /// Midnight UTC at the end of the day (the start of the next).
    pub fn end(&self) -> SystemTime {
        self.start() + Duration::from_secs(86_400)
    }
}

fn is_leap(y: u32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: u32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Which records a report covers: `--since`, `--until` (both inclusive, UTC days of `ts`)
/// and `--route`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Filter {
    /// First day covered.
    pub since: Option<Day>,
    /// Last day covered.
    pub until: Option<Day>,
    /// The only route covered.
    pub route: Option<String>,
}

impl Filter {
    /// Whether a record of `route` on `day` is covered.
    pub fn admits(&self, day: &Day, route: &str) -> bool {
        self.since.as_ref().is_none_or(|s| day >= s)
            && self.until.as_ref().is_none_or(|u| day <= u)
            && self.route.as_deref().is_none_or(|r| r == route)
    }
}

/// What a report reads of one transcript record (`transcript::Record`, or a row of
/// `ctxgate_transcripts`). Fields older records lack hold their defaults: `kind` "call",
/// `holdout` false, the rest `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The UTC day of the record's `ts`.
    pub day: Day,
    /// The conversation the call belongs to.
    pub conversation_id: String,
    /// The route's name.
    pub route: String,
    /// The model named in the request.
    pub model: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// Arrival to last byte, in milliseconds.
    pub latency_ms: f64,
    /// ctxgate's count of the prompt as received.
    pub tokens_before: Option<u64>,
    /// ctxgate's count of the prompt as forwarded (holdout: as pruning would have sent it).
    pub tokens_after: Option<u64>,
    /// The upstream's prompt tokens (cached ones included).
    pub input_tokens: Option<u64>,
    /// The upstream's completion tokens.
    pub output_tokens: Option<u64>,
    /// Prompt tokens the upstream served from its cache.
    pub cache_read_tokens: Option<u64>,
    /// The error kind, when the call failed.
    pub error_kind: Option<String>,
    /// `call` or `summary`.
    pub kind: String,
    /// Whether the conversation is in the holdout.
    pub holdout: bool,
    /// How the answer ended, as the upstream said.
    pub finish_reason: Option<String>,
    /// Estimated cost of what was sent, US dollars.
    pub cost_usd: Option<f64>,
    /// Estimated cost had the prompt gone unpruned, US dollars.
    pub cost_unpruned_usd: Option<f64>,
}

/// A dollar amount in picodollars (10⁻¹² USD), so that sums are exact and independent of the
/// order they are taken in. Non-finite amounts count as nothing.
fn pico(usd: f64) -> i128 {
    if usd.is_finite() {
        (usd * 1e12).round() as i128
    } else {
        0
    }
}

fn usd(pico: i128) -> f64 {
    pico as f64 / 1e12
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Running sums behind one row of [`Figures`].
#[derive(Debug, Clone, Default)]
struct Sums {
    calls: u64,
    holdout_calls: u64,
    tokens_before: u64,
    tokens_after: u64,
    input_tokens: u64,
    cache_read_tokens: u64,
    priced_calls: u64,
    cost: i128,
    cost_unpruned: i128,
    summary_calls: u64,
    summary_cost: i128,
}

impl Sums {
    fn add(&mut self, e: &Entry) {
        if e.kind == KIND_SUMMARY {
            self.summary_calls += 1;
            self.summary_cost += e.cost_usd.map_or(0, pico);
            return;
        }
        self.calls += 1;
        if e.holdout {
            self.holdout_calls += 1;
            return;
        }
        self.tokens_before += e.tokens_before.unwrap_or(0);
        self.tokens_after += e.tokens_after.unwrap_or(0);
        self.input_tokens += e.input_tokens.unwrap_or(0);
        self.cache_read_tokens += e.cache_read_tokens.unwrap_or(0);
        if e.cost_usd.is_some() {
            self.priced_calls += 1;
        }
        self.cost += e.cost_usd.map_or(0, pico);
        self.cost_unpruned += e.cost_unpruned_usd.map_or(0, pico);
    }

    fn figures(&self) -> Figures {
        let saved = self.cost_unpruned - self.cost;
        Figures {
            calls: self.calls,
            holdout_calls: self.holdout_calls,
            tokens_before: self.tokens_before,
            tokens_after: self.tokens_after,
            saved_share: ratio(self.tokens_after, self.tokens_before).map(|r| 1.0 - r),
            input_tokens: self.input_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_read_share: ratio(self.cache_read_tokens, self.input_tokens),
            priced_calls: self.priced_calls,
            cost_usd: usd(self.cost),
            cost_unpruned_usd: usd(self.cost_unpruned),
            cost_saved_usd: usd(saved),
            summary_calls: self.summary_calls,
            summary_cost_usd: usd(self.summary_cost),
            net_saved_usd: usd(saved - self.summary_cost),
        }
    }
}

/// The figures of one row (a route, model and day; a day; or the totals).
///
/// `calls` and `holdout_calls` count every client call; the token and cost figures cover the
/// calls pruning applied to (`calls - holdout_calls`), since a holdout call's `tokens_after`
/// is what pruning *would* have sent. Sums skip records that lack the figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// Client calls (`kind = "call"`), holdout included.
    pub calls: u64,
    /// Of which in the holdout (forwarded unpruned).
    pub holdout_calls: u64,
    /// Sum of ctxgate's count of the prompts as received.
    pub tokens_before: u64,
    /// Sum of ctxgate's count of the prompts as forwarded.
    pub tokens_after: u64,
    /// `1 - tokens_after / tokens_before`; `null` without tokens.
    pub saved_share: Option<f64>,
    /// Sum of the upstream's prompt tokens (cached ones included).
    pub input_tokens: u64,
    /// Sum of the prompt tokens the upstream served from its cache.
    pub cache_read_tokens: u64,
    /// `cache_read_tokens / input_tokens`; `null` without input tokens.
    pub cache_read_share: Option<f64>,
    /// Calls with a cost estimate (the others had no usage or no price for their model).
    pub priced_calls: u64,
    /// Estimated cost of what was sent, US dollars.
    pub cost_usd: f64,
    /// Estimated cost had the prompts gone unpruned.
    pub cost_unpruned_usd: f64,
    /// `cost_unpruned_usd - cost_usd`.
    pub cost_saved_usd: f64,
    /// ctxgate's own summary calls (`kind = "summary"`), counted where they ran.
    pub summary_calls: u64,
    /// Their estimated cost.
    pub summary_cost_usd: f64,
    /// `cost_saved_usd - summary_cost_usd`: what pruning saved net of its summaries.
    pub net_saved_usd: f64,
}

/// One route, model and day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The route's name.
    pub route: String,
    /// The model named in the requests; `null` for calls without one.
    pub model: Option<String>,
    /// The UTC day.
    pub day: Day,
    /// The figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// One day, every route and model together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayRow {
    /// The UTC day.
    pub day: Day,
    /// The figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// How an answer ended, in the classes the comparison uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model finished: OpenAI `stop`, Anthropic `end_turn` or `stop_sequence`, Responses
    /// `completed`.
    Stop,
    /// The answer was cut by its token limit: `length`, `max_tokens`, `incomplete`,
    /// `max_output_tokens`.
    Length,
    /// The model called a tool: `tool_calls`, `function_call`, `tool_use`.
    Tool,
    /// Any other reason (`content_filter`, `refusal`, `pause_turn`, …).
    Other,
    /// No reason recorded (an error, or a record from before `finish_reason`).
    None,
}

impl Finish {
    /// The class of a recorded `finish_reason`: the classes of the metrics
    /// ([`crate::dialect::finish_class`]), `content_filter` counted among the others.
    pub fn of(reason: Option<&str>) -> Finish {
        match reason.map(crate::dialect::finish_class) {
            None => Finish::None,
            Some("stop") => Finish::Stop,
            Some("length") => Finish::Length,
            Some("tool_calls") => Finish::Tool,
            Some(_) => Finish::Other,
        }
    }

    fn index(self) -> usize {
        match self {
            Finish::Stop => 0,
            Finish::Length => 1,
            Finish::Tool => 2,
            Finish::Other => 3,
            Finish::None => 4,
        }
    }
}

/// Shares of a group's calls by how their answer ended; they add up to 1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FinishShares {
    /// [`Finish::Stop`].
    pub stop: f64,
    /// [`Finish::Length`].
    pub length: f64,
    /// [`Finish::Tool`].
    pub tool: f64,
    /// [`Finish::Other`].
    pub other: f64,
    /// [`Finish::None`].
    pub none: f64,
}

/// Running figures of one side of the holdout comparison.
#[derive(Debug, Clone, Default)]
struct GroupSums {
    calls: u64,
    conversations: HashSet<String>,
    output_tokens: u64,
    output_known: u64,
    errors: u64,
    finish: [u64; 5],
    latencies: Vec<f64>,
    sent_tokens: u64,
    sent_known: u64,
    input_tokens: u64,
    cache_read_tokens: u64,
    cost: i128,
    priced: u64,
}

impl GroupSums {
    fn add(&mut self, e: &Entry) {
        self.calls += 1;
        if !self.conversations.contains(&e.conversation_id) {
            self.conversations.insert(e.conversation_id.clone());
        }
        if let Some(o) = e.output_tokens {
            self.output_tokens += o;
            self.output_known += 1;
        }
        if e.status >= 400 || e.error_kind.is_some() {
            self.errors += 1;
        }
        self.finish[Finish::of(e.finish_reason.as_deref()).index()] += 1;
        self.latencies.push(e.latency_ms);
        // What was sent: a holdout call went unpruned, as received.
        let sent = if e.holdout {
            e.tokens_before
        } else {
            e.tokens_after
        };
        if let Some(s) = sent {
            self.sent_tokens += s;
            self.sent_known += 1;
        }
        self.input_tokens += e.input_tokens.unwrap_or(0);
        self.cache_read_tokens += e.cache_read_tokens.unwrap_or(0);
        if let Some(c) = e.cost_usd {
            self.cost += pico(c);
            self.priced += 1;
        }
    }

    fn group(mut self) -> Group {
        let mean = |sum: u64, n: u64| ratio(sum, n);
        self.latencies.sort_by(f64::total_cmp);
        let share = |n: u64| n as f64 / self.calls as f64;
        let conversations = self.conversations.len() as u64;
        Group {
            calls: self.calls,
            conversations,
            calls_per_conversation: ratio(self.calls, conversations),
            mean_output_tokens: mean(self.output_tokens, self.output_known),
            error_rate: ratio(self.errors, self.calls),
            finish_reasons: (self.calls > 0).then(|| FinishShares {
                stop: share(self.finish[0]),
                length: share(self.finish[1]),
                tool: share(self.finish[2]),
                other: share(self.finish[3]),
                none: share(self.finish[4]),
            }),
            latency_p50_ms: percentile(&self.latencies, 0.50),
            latency_p95_ms: percentile(&self.latencies, 0.95),
            mean_tokens_sent: mean(self.sent_tokens, self.sent_known),
            input_tokens: self.input_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_read_share: ratio(self.cache_read_tokens, self.input_tokens),
            mean_cost_usd: (self.priced > 0).then(|| usd(self.cost) / self.priced as f64),
        }
    }
}

/// The nearest-rank percentile `p` (0 < p ≤ 1) of sorted values; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// One side of the holdout comparison: the client calls of conversations in the holdout, or
/// of the others.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    /// Calls.
    pub calls: u64,
    /// Distinct conversations.
    pub conversations: u64,
    /// `calls / conversations`.
    pub calls_per_conversation: Option<f64>,
    /// Mean completion tokens per call, over calls with usage.
    pub mean_output_tokens: Option<f64>,
    /// Share of calls that failed: status ≥ 400 or an error kind.
    pub error_rate: Option<f64>,
    /// How answers ended; `null` without calls.
    pub finish_reasons: Option<FinishShares>,
    /// Median latency (arrival to last byte), milliseconds, nearest rank.
    pub latency_p50_ms: Option<f64>,
    /// 95th percentile latency, milliseconds, nearest rank.
    pub latency_p95_ms: Option<f64>,
    /// Mean of ctxgate's count of the prompt as forwarded (holdout: as received).
    pub mean_tokens_sent: Option<f64>,
    /// Sum of the upstream's prompt tokens.
    pub input_tokens: u64,
    /// Sum of the prompt tokens served from the upstream's cache.
    pub cache_read_tokens: u64,
    /// `cache_read_tokens / input_tokens`.
    pub cache_read_share: Option<f64>,
    /// Mean estimated cost per call, over calls with an estimate.
    pub mean_cost_usd: Option<f64>,
}

/// Holdout against pruned: the client calls of conversations pruning applied to, and of
/// those it was held back from (`prune.holdout_percent`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Conversations not in the holdout.
    pub pruned: Group,
    /// Conversations in the holdout.
    pub holdout: Group,
}

/// Adds up entries as they are read; [`Report::new`] turns it into the report.
#[derive(Debug, Default)]
pub struct Tally {
    filter: Filter,
    matched: u64,
    other_kinds: u64,
    rows: BTreeMap<(String, Option<String>, Day), Sums>,
    days: BTreeMap<Day, Sums>,
    totals: Sums,
    pruned: GroupSums,
    holdout: GroupSums,
}

impl Tally {
    /// An empty tally covering what `filter` admits.
    pub fn new(filter: Filter) -> Tally {
        Tally {
            filter,
            ..Tally::default()
        }
    }

    /// The filter this tally applies.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Counts `e` if the filter admits it.
    pub fn add(&mut self, e: &Entry) {
        if !self.filter.admits(&e.day, &e.route) {
            return;
        }
        self.matched += 1;
        if e.kind != KIND_CALL && e.kind != KIND_SUMMARY {
            self.other_kinds += 1;
            return;
        }
        let key = (e.route.clone(), e.model.clone(), e.day.clone());
        self.rows.entry(key).or_default().add(e);
        self.days.entry(e.day.clone()).or_default().add(e);
        self.totals.add(e);
        if e.kind == KIND_CALL {
            if e.holdout {
                self.holdout.add(e);
            } else {
                self.pruned.add(e);
            }
        }
    }
}

/// Where the records came from and what reading them met (`--json`: `source`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceSummary {
    /// `jsonl` or `postgres` (the path or URL itself is left out: a URL is a secret).
    pub kind: &'static str,
    /// JSONL files read; `null` for PostgreSQL.
    pub files: Option<u64>,
    /// Records read.
    pub records: u64,
    /// JSONL lines that were not a record, skipped.
    pub malformed_lines: u64,
    /// Records the filter admitted.
    pub matched: u64,
    /// Admitted records of a kind other than `call` or `summary`, left out.
    pub other_kinds: u64,
}

/// The report: the document `--json` prints, and what the table and the page show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// [`JSON_VERSION`].
    pub version: u32,
    /// Where the records came from.
    pub source: SourceSummary,
    /// What was covered.
    pub filter: Filter,
    /// Per route, model and day, in that order.
    pub rows: Vec<Row>,
    /// Per day, every route and model together, oldest first.
    pub days: Vec<DayRow>,
    /// Everything covered.
    pub totals: Figures,
    /// Holdout against pruned.
    pub holdout: Comparison,
}

impl Report {
    /// The report of a finished tally over a scanned source.
    pub fn new(tally: Tally, scan: &Scan) -> Report {
        Report {
            version: JSON_VERSION,
            source: SourceSummary {
                kind: scan.kind,
                files: scan.files,
                records: scan.records,
                malformed_lines: scan.malformed_lines,
                matched: tally.matched,
                other_kinds: tally.other_kinds,
            },
            filter: tally.filter,
            rows: tally
                .rows
                .into_iter()
                .map(|((route, model, day), s)| Row {
                    route,
                    model,
                    day,
                    figures: s.figures(),
                })
                .collect(),
            days: tally
                .days
                .into_iter()
                .map(|(day, s)| DayRow {
                    day,
                    figures: s.figures(),
                })
                .collect(),
            totals: tally.totals.figures(),
            holdout: Comparison {
                pruned: tally.pruned.group(),
                holdout: tally.holdout.group(),
            },
        }
    }

    /// The report as the stable JSON document (pretty-printed).
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}
