//! The transcript [`Record`]: one per call through ctxgate, built by the request path and
//! handed to the queue. It carries figures and names only — never a header, so no credential
//! can reach a sink — plus the bodies when `include_bodies = true`.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// What happened on one call through ctxgate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When the call arrived: RFC 3339, UTC, milliseconds (see [`now_ts`]).
    pub ts: String,
    /// The conversation the call belongs to.
    pub conversation_id: String,
    /// Name of the route that matched.
    pub route: String,
    /// Label of the upstream the call went to.
    pub upstream: String,
    /// Model named in the request, when there was one.
    pub model: Option<String>,
    /// Status code sent to the client.
    pub status: u16,
    /// Arrival to last byte, in milliseconds.
    pub latency_ms: f64,
    /// Arrival to response headers, in milliseconds, when headers were sent.
    pub ttfb_ms: Option<f64>,
    /// Whether the response was streamed (SSE).
    pub stream: bool,
    /// ctxgate's count of the prompt as received.
    pub tokens_before: Option<u64>,
    /// Whether `tokens_before` is an exact tokenizer count rather than an estimate.
    pub tokens_before_exact: bool,
    /// ctxgate's count of the prompt as forwarded.
    pub tokens_after: Option<u64>,
    /// Messages in the prompt as received.
    pub messages_before: Option<u64>,
    /// Messages in the prompt as forwarded.
    pub messages_after: Option<u64>,
    /// File contents elided by pruning.
    pub files_elided: Option<u64>,
    /// What pruning did: `unchanged`, `pruned`, `rejected`, `skipped`, `shadow`, `holdout` or `none`.
    pub prune_action: String,
    /// Why a chat request was forwarded unpruned (`skipped`): `compressed_body`,
    /// `unparseable`, `string_input`, `previous_response_id` or `prune_failed`.
    #[serde(default)]
    pub prune_reason: Option<String>,
    /// Token usage reported by the upstream's response.
    pub usage: Usage,
    /// Upstream prompt tokens divided by ctxgate's count of the forwarded prompt.
    pub usage_ratio: Option<f64>,
    /// Short error kind (the metric label) when the call failed.
    pub error_kind: Option<String>,
    /// The pruned request messages; only with `include_bodies = true`.
    pub request_messages: Option<serde_json::Value>,
    /// The assembled response text; only with `include_bodies = true`.
    pub response_text: Option<String>,
    /// `call`: a client's call; `summary`: ctxgate's own call summarising what the cut dropped
    /// from `conversation_id` (`[prune.summary]`).
    #[serde(default = "kind_call")]
    pub kind: String,
    /// The conversation is in the holdout (`prune.holdout_percent`): forwarded unpruned, its
    /// `tokens_after` what pruning would have sent.
    #[serde(default)]
    pub holdout: bool,
    /// How the answer ended, as the upstream said: OpenAI `finish_reason`, Anthropic
    /// `stop_reason`, Responses `status` (`incomplete_details.reason` when incomplete).
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Tokens of ctxgate's summary pinned into the forwarded prompt (part of `tokens_after`).
    #[serde(default)]
    pub summary_tokens: Option<u64>,
    /// Estimated cost in US dollars of what was sent, from the upstream's usage and
    /// `[[prices]]`; `None` without usage or a price for the model.
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// Estimated cost had the prompt gone unpruned: `cost_usd` plus the removed tokens at the
    /// call's own mix of cached and fresh prompt prices.
    #[serde(default)]
    pub cost_unpruned_usd: Option<f64>,
}

/// [`Record::kind`] of a client's call.
pub const KIND_CALL: &str = "call";
/// [`Record::kind`] of ctxgate's summary call.
pub const KIND_SUMMARY: &str = "summary";

fn kind_call() -> String {
    KIND_CALL.to_string()
}

/// Token usage as the upstream reported it; `None` where it reported nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens (OpenAI `prompt_tokens`, Anthropic `input_tokens`).
    pub input_tokens: Option<u64>,
    /// Completion tokens.
    pub output_tokens: Option<u64>,
    /// Prompt tokens served from the provider's cache.
    pub cache_read_tokens: Option<u64>,
    /// Prompt tokens written to the provider's cache (Anthropic `cache_creation_input_tokens`).
    pub cache_write_tokens: Option<u64>,
}

/// The current time in the form [`Record::ts`] uses: `2026-11-05T09:30:12.345Z`.
pub fn now_ts() -> String {
    format_ts(SystemTime::now())
}

/// `t` in the form [`Record::ts`] uses.
pub fn format_ts(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
