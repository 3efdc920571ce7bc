//! Summaries instead of hard cuts (`[prune.summary]`). When a request moves its conversation's
//! cut, the prune phase hands what the cut dropped ([`Dropped`]) to [`Summaries::start`], which
//! asks the configured model for a summary in the background: the request that moved the cut
//! goes out with the plain cut, never waiting. Once the summary is ready it is kept per
//! conversation, rendered as a message in the client's dialect ([`Pin`]), and pruning pins it
//! right after the system prefix for as long as the cut stays where it was made for — so its
//! bytes, like the rest of the prefix, change only around a cut move (the moving request goes
//! with the plain cut, the next with the new summary).
//!
//! The summary call goes to the configured route (default: the request's own) with the
//! client's own credentials from the request that moved the cut — held only by the task making
//! the call, never stored — or, when `api_key_env` names a variable, with that key. Config
//! refuses a summary route on another upstream without a key of its own. Every call leaves a
//! transcript record (`kind = "summary"`) and metrics; a failed, slow or over-budget summary
//! leaves the plain cut, counted, and no client request ever fails for it.
//!
//! With `[state] backend = "redis"` a summary is also written to Redis and read from there
//! before pruning, so every replica pins the same bytes (one more round trip per request of a
//! route with summaries on); without Redis, summaries live in this process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus::{CounterVec, HistogramVec, IntCounterVec};
use serde_json::{json, Value};

use crate::config::{Prices, SummarySettings};
use crate::dialect::{Dialect, UsageTap};
use crate::metrics::{Metrics, LATENCY_BUCKETS};
use crate::prune::{Budget, Counter, Dropped, Encoding, Pin};
use crate::state::State;
use crate::transcript::{now_ts, Record, Transcripts, Usage, KIND_SUMMARY};

use super::call::RouteState;
use super::upstream::RequestBody;

/// The first line of every summary ctxgate pins: whoever reads a transcript sees whose it is.
pub const SUMMARY_MARK: &str = "[ctxgate summary of earlier conversation]";

/// Summary calls running at once, across conversations; past it a cut move is not summarised
/// (counted as `busy`).
const MAX_RUNNING: usize = 16;
/// Largest summary answer read.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Characters of one dropped message shown to the summariser: its head and tail.
const MESSAGE_HEAD: usize = 3000;
const MESSAGE_TAIL: usize = 1000;
/// Memory the kept summaries may take, in bytes (a summary of 1,024 tokens with its pinned
/// form is ~8 KB: some 8,000 conversations' summaries at once; Redis keeps them too when
/// replicas share state).
const MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Client headers that carry credentials or the API version, copied to a summary call sent to
/// the request's own upstream.
const CREDENTIAL_HEADERS: [&str; 6] = [
    "authorization",
    "x-api-key",
    "api-key",
    "anthropic-version",
    "openai-organization",
    "openai-project",
];

/// A conversation's current summary.
#[derive(Debug)]
pub struct Entry {
    /// The summary text (without the mark).
    pub text: String,
    /// The message pinned, for the client's dialect and encoding.
    pub pin: Pin,
    /// Messages dropped since the summary was made, too few to summarise yet (the next
    /// summary folds them in).
    backlog: Vec<String>,
    backlog_tokens: u64,
    dialect: Dialect,
    enc: Encoding,
    /// When it was made (Unix milliseconds): of a local and a shared entry, the newer wins.
    made_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Entry {
    /// Approximate bytes held.
    fn weight(&self) -> usize {
        let backlog: usize = self.backlog.iter().map(|m| m.len() + 24).sum();
        128 + self.text.len() + self.pin.raw.len() + backlog
    }

    /// The shared form: JSON of the summary, its pin and the dialect and encoding it is for.
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "v": 2,
            "text": self.text,
            "cut_id": self.pin.cut_id,
            "raw": self.pin.raw,
            "tokens": self.pin.tokens,
            "backlog": self.backlog,
            "backlog_tokens": self.backlog_tokens,
            "dialect": self.dialect.as_str(),
            "enc": self.enc.as_str(),
            "made_ms": self.made_ms,
        }))
        .unwrap_or_default()
    }

    /// The entry another replica shared; `None` for anything else.
    fn decode(b: &[u8]) -> Option<Entry> {
        let v: Value = serde_json::from_slice(b).ok()?;
        if v["v"] != 2 {
            return None;
        }
        let dialect = match v["dialect"].as_str()? {
            "openai" => Dialect::OpenAi,
            "anthropic" => Dialect::Anthropic,
            "openai-responses" => Dialect::Responses,
            _ => return None,
        };
        let text = v["text"].as_str()?.to_string();
        // The pinned form must be what this version renders from the text, or it is not used
        // (an entry of another version, or one edited by hand, never reaches a request).
        let raw = v["raw"].as_str()?.to_string();
        if raw != pin_message(dialect, &text) {
            return None;
        }
        Some(Entry {
            text,
            pin: Pin {
                cut_id: v["cut_id"].as_u64()?,
                raw,
                tokens: v["tokens"].as_u64()?,
            },
            backlog: v["backlog"]
                .as_array()?
                .iter()
                .map(|m| m.as_str().map(str::to_string))
                .collect::<Option<_>>()?,
            backlog_tokens: v["backlog_tokens"].as_u64()?,
            dialect,
            enc: v["enc"].as_str()?.parse().ok()?,
            made_ms: v["made_ms"].as_u64()?,
        })
    }
}

/// The summaries of every conversation, and the calls making them.
pub struct Summaries {
    entries: moka::sync::Cache<String, Arc<Entry>>,
    /// Where replicas share summaries (`[state] backend = "redis"`).
    state: Option<Arc<State>>,
    ttl: Duration,
    pending: Mutex<HashSet<String>>,
    running: Arc<tokio::sync::Semaphore>,
    /// Summary calls in flight, watched by shutdown (their records must reach the queue).
    in_flight: tokio::sync::watch::Sender<usize>,
    /// Turns true when shutdown's grace period is over: running calls end, recorded.
    cancel: tokio::sync::watch::Sender<bool>,
    metrics: SummaryMetrics,
}

/// A summary call in flight: counted while it lives, its conversation free again when dropped.
struct InFlight {
    summaries: Arc<Summaries>,
    conversation: String,
}

impl InFlight {
    fn new(summaries: Arc<Summaries>, conversation: String) -> InFlight {
        summaries.in_flight.send_modify(|n| *n += 1);
        summaries.metrics.running.inc();
        InFlight {
            summaries,
            conversation,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.summaries.pending.lock() {
            pending.remove(&self.conversation);
        }
        self.summaries.metrics.running.dec();
        self.summaries
            .in_flight
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What a summary task needs from the request that moved the cut.
pub struct Job {
    /// The conversation.
    pub conversation: String,
    /// The request's route (the metrics' label; the default summary route).
    pub route: Arc<RouteState>,
    /// The route the summary call goes to.
    pub target: Arc<RouteState>,
    /// `[prune.summary]` for the request's route and model.
    pub settings: Arc<SummarySettings>,
    /// The client's dialect and encoding: the pin is rendered and counted in them.
    pub dialect: Dialect,
    /// See `dialect`.
    pub enc: Encoding,
    /// What the cut dropped.
    pub dropped: Dropped,
    /// The path after the target route's upstream URL.
    pub path: String,
    /// The credentials to send (the client's, or the configured key's).
    pub credentials: HeaderMap,
    /// The token counter.
    pub counter: Arc<Counter>,
    /// Where the record goes.
    pub transcripts: Transcripts,
    /// For the summary's cost.
    pub prices: Arc<Prices>,
}

impl Summaries {
    /// An empty store; registers the summary metric families (every route's series at 0).
    pub fn new(
        metrics: SummaryMetrics,
        idle_ttl: Duration,
        state: Option<Arc<State>>,
    ) -> Summaries {
        Summaries {
            entries: moka::sync::Cache::builder()
                .max_capacity(MAX_BYTES)
                .weigher(|k: &String, e: &Arc<Entry>| {
                    u32::try_from(k.len() + e.weight()).unwrap_or(u32::MAX)
                })
                .time_to_idle(idle_ttl)
                .build(),
            state,
            ttl: idle_ttl,
            pending: Mutex::new(HashSet::new()),
            running: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING)),
            in_flight: tokio::sync::watch::Sender::new(0),
            cancel: tokio::sync::watch::Sender::new(false),
            metrics,
        }
    }

    /// The conversation's summary, when one is ready for this dialect and encoding: the shared
    /// one when replicas share state (and Redis answers), else this process's.
    pub async fn get(
        &self,
        conversation: &str,
        dialect: Dialect,
        enc: Encoding,
    ) -> Option<Arc<Entry>> {
        let shared = match &self.state {
            Some(s) if s.up() => s.summary_get(conversation, self.ttl).await.ok().flatten(),
            _ => None,
        };
        let local = self.entries.get(conversation);
        let newest = match shared.as_deref().and_then(Entry::decode) {
            // Another replica's, newer than this one's (or this one has none): adopted.
            Some(e) if local.as_ref().is_none_or(|l| e.made_ms > l.made_ms) => {
                let e = Arc::new(e);
                self.entries.insert(conversation.to_string(), e.clone());
                Some(e)
            }
            _ => local,
        };
        newest.filter(|e| e.dialect == dialect && e.enc == enc)
    }

    /// Counts a request forwarded with the conversation's summary pinned.
    pub fn pinned(&self, route: &str) {
        self.metrics.pinned.with_label_values(&[route]).inc();
    }

    /// Counts a cut move that is not summarised, and why.
    pub fn skipped(&self, route: &str, reason: &str) {
        self.metrics
            .skipped
            .with_label_values(&[route, reason])
            .inc();
    }

    /// Summarises what a cut dropped, in the background (`previous`: the conversation's summary,
    /// which the dropped span continues when it was made for the cut the span starts at).
    /// Returns at once.
    pub fn start(self: &Arc<Self>, job: Job, previous: Option<Arc<Entry>>) {
        let route = job.route.config.name.clone();
        let previous = previous.filter(|_| job.dropped.after_pin);
        // Messages dropped by earlier moves too small to summarise count too.
        let backlog_tokens = previous.as_ref().map_or(0, |p| p.backlog_tokens);
        if job.dropped.tokens + backlog_tokens < job.settings.min_dropped_tokens {
            // Too little to be worth a call: the previous summary, if any, is carried to the
            // new cut (it still says what lies before it), and what this move dropped waits
            // in its backlog, as the summariser will read it, for the next summary.
            match previous {
                Some(p) => {
                    let pin = Pin {
                        cut_id: job.dropped.cut_id,
                        ..p.pin.clone()
                    };
                    let mut lines = p.backlog.clone();
                    lines.extend(job.dropped.messages.iter().map(|m| render_message(m)));
                    let tokens = backlog_tokens + job.dropped.tokens;
                    self.store(&job, p.text.clone(), pin, (lines, tokens));
                    self.skipped(&route, "carried");
                }
                None => self.skipped(&route, "too_small"),
            }
            return;
        }
        if job.credentials.is_empty() {
            self.skipped(&route, "no_credentials");
            return;
        }
        let Ok(permit) = self.running.clone().try_acquire_owned() else {
            self.skipped(&route, "busy");
            return;
        };
        {
            let Ok(mut pending) = self.pending.lock() else {
                return;
            };
            if !pending.insert(job.conversation.clone()) {
                self.skipped(&route, "busy");
                return;
            }
        }
        // Given back when the task ends, however it ends (a panic included).
        let guard = InFlight::new(self.clone(), job.conversation.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let this = guard.summaries.clone();
            this.run(job, previous).await;
            drop(guard);
        });
    }

    /// Ends the summary calls still running: each records itself as cut by the shutdown.
    pub fn cancel(&self) {
        self.cancel.send_replace(true);
    }

    /// Resolves when no summary call is in flight (shutdown waits for their records).
    pub async fn idle(&self) {
        let mut rx = self.in_flight.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    fn store(&self, job: &Job, text: String, pin: Pin, backlog: (Vec<String>, u64)) {
        let e = Entry {
            text,
            pin,
            backlog: backlog.0,
            backlog_tokens: backlog.1,
            dialect: job.dialect,
            enc: job.enc,
            made_ms: now_ms(),
        };
        if let Some(s) = self.state.clone().filter(|s| s.up()) {
            let (conversation, value, ttl) = (job.conversation.clone(), e.encode(), self.ttl);
            tokio::spawn(async move {
                let _ = s.summary_put(&conversation, value, ttl).await;
            });
        }
        self.entries.insert(job.conversation.clone(), Arc::new(e));
    }

    /// Makes the summary call, stores the summary, records the call.
    async fn run(&self, job: Job, previous: Option<Arc<Entry>>) {
        let route = job.route.config.name.as_str();
        let s = &job.settings;
        let target = &job.target.config;
        let mut lines = previous
            .as_ref()
            .map_or_else(Vec::new, |p| p.backlog.clone());
        lines.extend(job.dropped.messages.iter().map(|m| render_message(m)));
        let input = summariser_input(previous.as_deref().map(|p| p.text.as_str()), &lines);
        // The summary request is itself a chat request of its route: over that route's limit
        // for the model, it is not sent.
        let enc = job.counter.encoding_for_model(&s.model);
        let prompt_tokens =
            job.counter.count_text(enc, &s.prompt) + job.counter.count_text(enc, &input) + 16;
        let limit = Budget::for_request(&target.prune, Some(&s.model), None).hard_token_limit;
        if prompt_tokens.saturating_add(s.max_tokens) > limit {
            self.skipped(route, "over_budget");
            return;
        }
        let started = Instant::now();
        let body = request_body(target.dialect, s, &input);
        let mut cancel = self.cancel.subscribe();
        let answer = tokio::select! {
            a = tokio::time::timeout(s.timeout, self.call(&job, body)) => a.map_err(|_| "summary_timeout"),
            _ = cancel.wait_for(|c| *c) => Err("summary_shutdown"),
        };
        let elapsed = started.elapsed();
        let m = &self.metrics;
        m.duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        let (status, tapped, error) = match answer {
            Err(kind) => (504, Default::default(), Some(kind)),
            Ok(Err(())) => (502, Default::default(), Some("summary_upstream")),
            Ok(Ok((status, t))) if status != 200 => (status, t, Some("summary_status")),
            Ok(Ok((status, t))) if t.text.as_deref().is_none_or(|x| x.trim().is_empty()) => {
                (status, t, Some("summary_empty"))
            }
            Ok(Ok((status, t))) => (status, t, None),
        };
        let outcome = match error {
            None => "ok",
            Some("summary_timeout" | "summary_shutdown") => "timeout",
            Some(_) => "failed",
        };
        m.calls.with_label_values(&[route, outcome]).inc();
        let price = job.prices.find(&s.model).map(|(_, p)| p);
        let cost = match (price, tapped.input_tokens, tapped.output_tokens) {
            (Some(p), Some(i), Some(o)) => Some(crate::prices::cost(
                &p,
                i,
                tapped.cache_read_tokens.unwrap_or(0),
                tapped.cache_write_tokens.unwrap_or(0),
                o,
            )),
            _ => None,
        };
        if let Some(c) = cost {
            m.cost.with_label_values(&[route]).inc_by(c);
        }
        for (kind, v) in [
            ("input", tapped.input_tokens),
            ("output", tapped.output_tokens),
        ] {
            if let Some(n) = v {
                m.tokens.with_label_values(&[route, kind]).inc_by(n);
            }
        }
        if error.is_none() {
            let text = tapped.text.clone().unwrap_or_default().trim().to_string();
            let raw = pin_message(job.dialect, &text);
            let value: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
            // An Anthropic block is counted as the message it would be (a little more than
            // what it adds to the message it joins: room to spare).
            let value = match job.dialect {
                Dialect::Anthropic => json!({"role": "user", "content": [value]}),
                _ => value,
            };
            let tokens = job
                .counter
                .count_message(job.enc, job.dialect, &value, u64::MAX)
                .0;
            let pin = Pin {
                cut_id: job.dropped.cut_id,
                raw,
                tokens,
            };
            self.store(&job, text, pin, (Vec::new(), 0));
        } else {
            tracing::warn!(
                route,
                summary_route = target.name.as_str(),
                status,
                kind = error,
                "summary failed; the conversation keeps the plain cut"
            );
        }
        job.transcripts.submit(Record {
            ts: now_ts(),
            conversation_id: job.conversation.clone(),
            route: target.name.clone(),
            upstream: target.target.authority.clone(),
            model: Some(s.model.clone()),
            status,
            latency_ms: elapsed.as_secs_f64() * 1e3,
            ttfb_ms: None,
            stream: false,
            tokens_before: Some(prompt_tokens),
            tokens_before_exact: true,
            tokens_after: Some(prompt_tokens),
            messages_before: Some(job.dropped.messages.len() as u64),
            messages_after: Some(2),
            files_elided: None,
            prune_action: "none".to_string(),
            prune_reason: None,
            usage_ratio: tapped
                .input_tokens
                .map(|i| i as f64 / prompt_tokens.max(1) as f64),
            usage: Usage {
                input_tokens: tapped.input_tokens,
                output_tokens: tapped.output_tokens,
                cache_read_tokens: tapped.cache_read_tokens,
                cache_write_tokens: tapped.cache_write_tokens,
            },
            error_kind: error.map(str::to_string),
            request_messages: None,
            response_text: None,
            kind: KIND_SUMMARY.to_string(),
            holdout: false,
            finish_reason: tapped.finish_reason.clone(),
            summary_tokens: None,
            cost_usd: cost,
            cost_unpruned_usd: cost,
        });
    }

    /// Sends the summary request; the status and what the usage tap read (text included).
    async fn call(&self, job: &Job, body: Vec<u8>) -> Result<(u16, crate::dialect::Tapped), ()> {
        let target = &job.target;
        let cfg = &target.config;
        let uri = super::route::upstream_uri(cfg, &format!("{}{}", cfg.prefix, job.path), None)
            .map_err(|_| ())?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .body(RequestBody::Right(Full::new(Bytes::from(body))))
            .map_err(|_| ())?;
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (k, v) in &job.credentials {
            h.insert(k.clone(), v.clone());
        }
        if cfg.dialect == Dialect::Anthropic && !h.contains_key("anthropic-version") {
            h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        }
        let resp = target.client().request(req).await.map_err(|_| ())?;
        let status = resp.status().as_u16();
        let body: Incoming = resp.into_body();
        let bytes = Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|_| ())?
            .to_bytes();
        let mut tap = UsageTap::new(cfg.dialect.wire(), false, true);
        tap.feed(&bytes);
        Ok((status, tap.finish()))
    }
}

/// The chat endpoint of a dialect, after an upstream base URL that ends in its version
/// (`…/v1/`) for OpenAI-compatible routes, and at the API root for Anthropic's.
pub fn default_endpoint(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Anthropic => "v1/messages",
        _ => "chat/completions",
    }
}

/// The chat endpoint of `dialect` beside the client's own request path (after the route's
/// prefix): `v1/responses` gives `v1/chat/completions`, so an upstream whose base URL lacks the
/// version segment is called where its clients call it.
pub fn endpoint_like(client_rest: &str, dialect: Dialect) -> String {
    let tail = match dialect {
        Dialect::Anthropic => "messages",
        _ => "chat/completions",
    };
    for end in ["chat/completions", "responses", "messages"] {
        if let Some(base) = client_rest.strip_suffix(end) {
            if base.is_empty() || base.ends_with('/') {
                return format!("{base}{tail}");
            }
        }
    }
    default_endpoint(dialect).to_string()
}

/// The credentials a summary call of `settings` sends: the key in `api_key_env` (as the
/// target dialect expects it), else the client's own headers when the summary goes to the
/// request's own upstream; empty when there are none.
pub fn credentials(
    settings: &SummarySettings,
    client: &HeaderMap,
    same_upstream: bool,
    target: Dialect,
) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(var) = &settings.api_key_env {
        let Ok(key) = std::env::var(var) else {
            return out;
        };
        let value = match target {
            Dialect::Anthropic => HeaderValue::from_str(&key).map(|v| ("x-api-key", v)),
            _ => HeaderValue::from_str(&format!("Bearer {key}")).map(|v| ("authorization", v)),
        };
        if let Ok((name, mut v)) = value {
            v.set_sensitive(true);
            out.insert(name, v);
        }
        return out;
    }
    if same_upstream {
        for name in CREDENTIAL_HEADERS {
            if let Some(v) = client.get(name) {
                out.insert(name, v.clone());
            }
        }
        // A Claude subscription's OAuth token works only with its beta flag.
        let oauth: Vec<&str> = client
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|b| b.starts_with("oauth"))
            .collect();
        if let Ok(v) = HeaderValue::from_str(&oauth.join(",")) {
            if !oauth.is_empty() {
                out.insert("anthropic-beta", v);
            }
        }
        // The API version alone is not a credential.
        if !out
            .keys()
            .any(|k| k != "anthropic-version" && k != "anthropic-beta")
        {
            out.clear();
        }
    }
    out
}

/// The summary request's body in the summary route's dialect.
fn request_body(dialect: Dialect, s: &SummarySettings, input: &str) -> Vec<u8> {
    let v = match dialect {
        Dialect::Anthropic => json!({
            "model": s.model,
            "max_tokens": s.max_tokens,
            "system": s.prompt,
            "messages": [{"role": "user", "content": input}],
        }),
        _ => {
            // OpenAI's reasoning models take max_completion_tokens and refuse max_tokens; the
            // OpenAI-compatible providers know only max_tokens.
            let reasoning = s.model.starts_with("gpt-5")
                || (s.model.starts_with('o')
                    && s.model.chars().nth(1).is_some_and(|c| c.is_ascii_digit()));
            let key = if reasoning {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            let mut v = json!({
                "model": s.model,
                key: s.max_tokens,
                "messages": [
                    {"role": "system", "content": s.prompt},
                    {"role": "user", "content": input},
                ],
            });
            // Their max_completion_tokens counts reasoning too: a summary needs little of it.
            if reasoning {
                v["reasoning_effort"] = json!("low");
            }
            v
        }
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// What the summariser reads: the previous summary, then the dropped messages, one per
/// paragraph ([`render_message`]).
pub fn summariser_input(previous: Option<&str>, lines: &[String]) -> String {
    let mut out = String::new();
    if let Some(p) = previous {
        out.push_str("Previous summary:\n");
        out.push_str(p);
        out.push_str("\n\n");
    }
    out.push_str(&format!(
        "Messages to fold in ({}, oldest first):\n",
        lines.len()
    ));
    for l in lines {
        out.push('\n');
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// One dropped message as the summariser reads it: `[role] text`, its text cut to head and
/// tail when long (this is also what a backlog keeps: never images or signatures).
pub fn render_message(m: &str) -> String {
    let v: Value = serde_json::from_str(m).unwrap_or(Value::Null);
    let role = v
        .get("role")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("message");
    let mut text = String::new();
    collect_text(&v, &mut text);
    format!("[{role}] {}", clip(text.trim()))
}

/// The readable text of a message: strings under the keys that hold what was said, tool
/// names and arguments, results; never signatures, encrypted reasoning or media data.
fn collect_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(s);
        }
        Value::Array(items) => items.iter().for_each(|i| collect_text(i, out)),
        Value::Object(map) => {
            for (k, x) in map {
                match k.as_str() {
                    "content" | "text" | "output" | "arguments" | "name" | "thinking"
                    | "summary" | "function" | "tool_calls" => collect_text(x, out),
                    "input" if x.is_object() => {
                        out.push(' ');
                        out.push_str(&x.to_string());
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// `s` cut to its head and tail, with the number of characters left out between them.
fn clip(s: &str) -> String {
    let n = s.chars().count();
    if n <= MESSAGE_HEAD + MESSAGE_TAIL {
        return s.to_string();
    }
    let head: String = s.chars().take(MESSAGE_HEAD).collect();
    let tail: String = s.chars().skip(n - MESSAGE_TAIL).collect();
    format!(
        "{head} […{} characters left out…] {tail}",
        n - MESSAGE_HEAD - MESSAGE_TAIL
    )
}

/// The summary in the client's dialect: a system message (OpenAI chat), a developer message
/// (Responses), a text block that pruning puts at the head of the first kept user message
/// (Anthropic: its system prompt is a field, and its turns must alternate).
pub fn pin_message(dialect: Dialect, text: &str) -> String {
    let body = format!("{SUMMARY_MARK}\n{text}");
    let v = match dialect {
        Dialect::OpenAi => json!({"role": "system", "content": body}),
        Dialect::Responses => json!({"type": "message", "role": "developer", "content": body}),
        Dialect::Anthropic => json!({"type": "text", "text": body}),
    };
    v.to_string()
}

/// The summary metric families.
#[derive(Clone)]
pub struct SummaryMetrics {
    running: prometheus::IntGauge,
    calls: IntCounterVec,
    skipped: IntCounterVec,
    tokens: IntCounterVec,
    cost: CounterVec,
    duration: HistogramVec,
    pinned: IntCounterVec,
}

impl SummaryMetrics {
    /// Registers the families, with every route's series at 0.
    pub fn register(m: &Metrics, routes: &[&str]) -> SummaryMetrics {
        let cost = m.float_counter_vec(
            "ctxgate_summary_cost_usd_total",
            "Estimated cost of summary calls in US dollars ([[prices]]), by the conversation's route.",
            &["route"],
        );
        let s = SummaryMetrics {
            running: m.gauge(
                "ctxgate_summary_running",
                "Summary calls running now.",
            ),
            calls: m.counter_vec(
                "ctxgate_summary_calls_total",
                "Summary calls by outcome (ok, failed, timeout), by the conversation's route.",
                &["route", "outcome"],
            ),
            skipped: m.counter_vec(
                "ctxgate_summary_skipped_total",
                "Cut moves not summarised, by reason: too_small, carried (the previous summary kept), busy, no_credentials, over_budget.",
                &["route", "reason"],
            ),
            tokens: m.counter_vec(
                "ctxgate_summary_tokens_total",
                "Tokens of summary calls as the upstream reported them (kind: input, output).",
                &["route", "kind"],
            ),
            cost,
            duration: m.histogram_vec(
                "ctxgate_summary_duration_seconds",
                "Time a summary call took.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            pinned: m.counter_vec(
                "ctxgate_summary_pinned_total",
                "Requests forwarded with the conversation's summary pinned after the system prefix.",
                &["route"],
            ),
        };
        for r in routes {
            for o in ["ok", "failed", "timeout"] {
                s.calls.with_label_values(&[r, o]);
            }
            for why in [
                "too_small",
                "carried",
                "busy",
                "no_credentials",
                "over_budget",
            ] {
                s.skipped.with_label_values(&[r, why]);
            }
            for k in ["input", "output"] {
                s.tokens.with_label_values(&[r, k]);
            }
            s.cost.with_label_values(&[r]);
            s.duration.with_label_values(&[r]);
            s.pinned.with_label_values(&[r]);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shared_entry_round_trips_and_refuses_anything_else() {
        for dialect in [Dialect::OpenAi, Dialect::Responses, Dialect::Anthropic] {
            let raw = pin_message(dialect, "the user fixed the parser");
            let e = Entry {
                text: "the user fixed the parser".into(),
                pin: Pin {
                    cut_id: 0xfeed,
                    raw: raw.clone(),
                    tokens: 17,
                },
                backlog: vec!["[user] later".into()],
                backlog_tokens: 9,
                dialect,
                enc: Encoding::Cl100kBase,
                made_ms: 1_790_000_000_000,
            };
            let d = Entry::decode(&e.encode()).unwrap();
            assert_eq!(
                (d.text, d.pin, d.backlog, d.backlog_tokens, d.dialect, d.enc),
                (e.text, e.pin, e.backlog, 9, dialect, e.enc)
            );
            let v: Value = serde_json::from_str(&raw).unwrap();
            let text = match dialect {
                Dialect::Anthropic => v["text"].as_str().unwrap(),
                _ => v["content"].as_str().unwrap(),
            };
            assert!(text.starts_with(SUMMARY_MARK));
        }
        assert!(Entry::decode(b"cgv1 not json").is_none());
        assert!(Entry::decode(br#"{"v":2}"#).is_none());
        assert!(Entry::decode(br#"{"v":2,"text":"t","cut_id":1,"raw":"{}","tokens":1,"backlog":[],"backlog_tokens":0,"dialect":"gemini","enc":"o200k_base"}"#).is_none());
        // Version 1 pinned Anthropic summaries as whole messages: never read back.
        assert!(Entry::decode(br#"{"v":1,"text":"t","cut_fp":1,"raw":"{}","tokens":1,"backlog":[],"backlog_tokens":0,"dialect":"anthropic","enc":"o200k_base"}"#).is_none());
        // A pinned form that is not this version's rendering of the text is refused.
        assert!(Entry::decode(br#"{"v":2,"text":"t","cut_id":1,"raw":"{\"role\":\"user\",\"content\":\"x\"}","tokens":1,"backlog":[],"backlog_tokens":0,"dialect":"anthropic","enc":"o200k_base"}"#).is_none());
    }

    #[test]
    fn credentials_go_only_where_they_were_meant_for() {
        let mut client = HeaderMap::new();
        client.insert(
            "authorization",
            HeaderValue::from_static("Bearer sk-client"),
        );
        client.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        client.insert("cookie", HeaderValue::from_static("session=1"));
        let s = SummarySettings::default();
        let same = credentials(&s, &client, true, Dialect::OpenAi);
        assert_eq!(same.len(), 2);
        assert_eq!(same["authorization"], "Bearer sk-client");
        assert!(!same.contains_key("cookie"));
        assert!(credentials(&s, &client, false, Dialect::OpenAi).is_empty());
        let mut only_version = HeaderMap::new();
        only_version.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        assert!(credentials(&s, &only_version, true, Dialect::Anthropic).is_empty());
        std::env::set_var("CTXGATE_UNIT_SUMMARY_KEY", "sk-env");
        let keyed = SummarySettings {
            api_key_env: Some("CTXGATE_UNIT_SUMMARY_KEY".into()),
            ..SummarySettings::default()
        };
        let h = credentials(&keyed, &client, true, Dialect::Anthropic);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-api-key"], "sk-env");
        assert_eq!(
            credentials(&keyed, &client, false, Dialect::OpenAi)["authorization"],
            "Bearer sk-env"
        );
        let missing = SummarySettings {
            api_key_env: Some("CTXGATE_UNIT_SUMMARY_KEY_UNSET".into()),
            ..SummarySettings::default()
        };
        assert!(credentials(&missing, &client, true, Dialect::OpenAi).is_empty());
    }

    #[test]
    fn the_summary_endpoint_sits_beside_the_clients_own() {
        for (rest, dialect, want) in [
            ("chat/completions", Dialect::OpenAi, "chat/completions"),
            (
                "v1/chat/completions",
                Dialect::OpenAi,
                "v1/chat/completions",
            ),
            ("v1/responses", Dialect::OpenAi, "v1/chat/completions"),
            ("responses", Dialect::OpenAi, "chat/completions"),
            ("v1/messages", Dialect::Anthropic, "v1/messages"),
            ("api/v1/messages", Dialect::Anthropic, "api/v1/messages"),
            ("v1/models", Dialect::OpenAi, "chat/completions"),
            ("v1/xmessages", Dialect::Anthropic, "v1/messages"),
        ] {
            assert_eq!(endpoint_like(rest, dialect), want, "{rest}");
        }
    }

    #[test]
    fn the_summariser_reads_text_never_signatures_or_media() {
        let dropped = Dropped {
            after_pin: true,
            messages: vec![
                json!({"role": "user", "content": [{"type": "text", "text": "fix parse.rs"}, {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}).to_string(),
                json!({"role": "assistant", "content": [{"type": "thinking", "thinking": "look at it", "signature": "SIG"}, {"type": "tool_use", "id": "t", "name": "read", "input": {"path": "parse.rs"}}]}).to_string(),
                json!({"role": "tool", "content": "x".repeat(10_000)}).to_string(),
            ],
            tokens: 3000,
            cut_id: 1,
        };
        let lines: Vec<String> = dropped.messages.iter().map(|m| render_message(m)).collect();
        let input = summariser_input(Some("before"), &lines);
        assert!(input
            .starts_with("Previous summary:\nbefore\n\nMessages to fold in (3, oldest first):"));
        assert!(input.contains("[user] fix parse.rs"));
        assert!(input.contains("look at it"));
        assert!(input.contains(r#"{"path":"parse.rs"}"#));
        assert!(!input.contains("SIG") && !input.contains("AAAA"));
        assert!(input.contains("[…6000 characters left out…]"));
    }
}
