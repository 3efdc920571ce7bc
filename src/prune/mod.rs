//! Pruning: keeps a chat prompt inside its token budget. A pure function of (request,
//! budget, conversation view, token counter) — no I/O — so it can be unit-tested,
//! property-tested and benchmarked alone.
//!
//! Terms (DESIGN.md, "Pruning"). A *turn* starts at a genuine user message (a tool result,
//! or an Anthropic user message holding only `tool_result` blocks, does not start one). A
//! *unit* is what stays or goes together: a message, or an assistant message with tool calls
//! plus the results answering them. *Pinned*: leading system/developer messages (Anthropic:
//! `system`), tool definitions, the user message opening the newest turn (the task) and the
//! newest unit. The kept history is one contiguous tail of units plus the task.
//!
//! Steps: count (newest first, exact only while the running total is within the limit;
//! older messages use cached counts or a bytes/4 estimate, so the work grows with the
//! budget, not the conversation); if within budget and message cap, forward the original
//! bytes; else elide file contents in older turns, keep the view's cut while the total from
//! it stays within the hard limit (a byte-stable prefix for provider prompt caches), or
//! move it in one step down to `target_tokens`; pinned part over the limit → `on_overflow`.
//!
//! `max_messages` counts entries of `messages` (leading system messages included; the
//! pinned part is kept even when it alone is over the cap).

mod bpe;
mod elide;
mod memo;
mod policy;
mod request;
mod tokens;
mod view;

#[cfg(test)]
mod tests;

use serde::Deserialize;

pub use policy::prune;
pub use request::{ChatRequest, ParseError};
pub use tokens::{Counter, Encoding, UnknownEncoding};
pub use view::View;

/// The budget one request is pruned to (config `[prune]`, already resolved per route and
/// model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Hard limit on prompt tokens (`prune.hard_token_limit`).
    pub hard_token_limit: u64,
    /// Low-water mark the cut moves down to when the limit is crossed (resolved; config
    /// default 60% of the hard limit).
    pub target_tokens: u64,
    /// Cap on entries of `messages`; 0 = none.
    pub max_messages: u64,
    /// Turns (newest first) whose file contents are kept; older ones are elided.
    pub keep_file_content_turns: u64,
    /// Fenced code blocks shorter than this many lines are not elided.
    pub min_file_lines: u64,
    /// Subtract the request's `max_tokens` / `max_completion_tokens` from the hard limit.
    pub reserve_output: bool,
    /// What to do when the pinned part alone is over the limit.
    pub on_overflow: OnOverflow,
    /// Enforce, or only report.
    pub mode: Mode,
    /// Encoding for models whose name does not identify one (and all Anthropic requests).
    pub default_encoding: Encoding,
}

impl Default for Budget {
    /// The seed values: 4000 tokens, target 2400, 5 messages, file contents kept 1 turn.
    fn default() -> Self {
        Budget {
            hard_token_limit: 4000,
            target_tokens: 2400,
            max_messages: 5,
            keep_file_content_turns: 1,
            min_file_lines: 20,
            reserve_output: false,
            on_overflow: OnOverflow::Reject,
            mode: Mode::Enforce,
            default_encoding: Encoding::O200kBase,
        }
    }
}

/// What to do when the pinned part alone is over the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOverflow {
    /// Answer 400 `context_length_exceeded` with the numbers.
    #[default]
    Reject,
    /// Cut the largest pinned text from the middle (marker inserted) until it fits.
    Truncate,
    /// Send the request as it came (counted in metrics).
    Forward,
}

/// Whether pruning is applied or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward the pruned body.
    #[default]
    Enforce,
    /// Compute and report; forward the original bytes.
    Shadow,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Within budget (or overflow forwarded): forward the original bytes.
    Unchanged(Summary),
    /// Forward `body` instead of the original.
    Pruned {
        /// The pruned body (set `Content-Length` from its length).
        body: Vec<u8>,
        /// What was done.
        summary: Summary,
    },
    /// `mode = "shadow"`: this would have been pruned; forward the original bytes.
    Shadow(Summary),
    /// `on_overflow = "reject"` and the pinned part is over the limit.
    Rejected(Rejection),
}

impl Outcome {
    /// The summary, unless rejected.
    pub fn summary(&self) -> Option<&Summary> {
        match self {
            Outcome::Unchanged(s) | Outcome::Shadow(s) => Some(s),
            Outcome::Pruned { summary, .. } => Some(summary),
            Outcome::Rejected(_) => None,
        }
    }
}

/// Figures of one pruning decision (for headers, logs and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Prompt tokens of the request as received; an estimate when older messages were
    /// never counted exactly (`tokens_before_exact = false`).
    pub tokens_before: u64,
    /// Whether `tokens_before` is an exact count.
    pub tokens_before_exact: bool,
    /// Exact prompt tokens of what is forwarded (in shadow mode: of what would have been).
    pub tokens_after: u64,
    /// Entries of `messages` received.
    pub messages_before: usize,
    /// Entries of `messages` forwarded.
    pub messages_after: usize,
    /// Messages dropped.
    pub messages_dropped: usize,
    /// Files (blocks, parts) elided in kept messages.
    pub files_elided: usize,
    /// Characters of the messages' JSON received.
    pub chars_before: usize,
    /// Characters of the messages' JSON forwarded.
    pub chars_after: usize,
    /// The cut point moved (false while the forwarded prefix stays byte-stable).
    pub cut_moved: bool,
    /// The view knew this conversation's earlier messages.
    pub view_hit: bool,
    /// The pinned part was over the limit and the request was forwarded as is.
    pub overflow_forwarded: bool,
    /// Pinned text was cut from the middle to fit.
    pub truncated: bool,
}

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Tokens of the pinned part.
    pub pinned_tokens: u64,
    /// The limit it is over (hard limit, minus reserved output if any).
    pub limit: u64,
    /// Lowercase message with the numbers and the config key.
    pub message: String,
}
