//! Pruning: keeps a chat prompt inside its token budget. A pure function of (request,
//! budget, conversation view, token counter) — no I/O — so it can be unit-tested,
//! property-tested and benchmarked alone.
//!
//! Terms (docs/ARCHITECTURE.md, "Pruning"). A *turn* starts at a genuine user message (a
//! tool result, or an Anthropic user message holding `tool_result` blocks, does not start
//! one). A *unit* is what stays or goes together: a message, or an assistant message with tool
//! calls plus the results answering them. *Pinned*: every system/developer message wherever it
//! stands (Anthropic: `system`), tool definitions, the user message opening the newest turn
//! (the task), the newest turn's newest tool exchange and the newest unit. The kept history is
//! one contiguous tail of units plus the pinned units before it.
//!
//! Steps: count (newest first, exact only while the running total is within the limit;
//! older messages use cached counts or a bytes/4 estimate, so the work grows with the
//! budget, not the conversation); if within budget and message cap, forward the original
//! bytes; else elide file contents in older turns, keep the view's cut while the total from
//! it stays within the hard limit (a byte-stable prefix for provider prompt caches), or
//! move it in one step down to `target_tokens`; pinned part over the limit → `on_overflow`.
//!
//! `max_messages` counts entries of `messages` (leading system messages included; the
//! pinned part is kept even when it alone is over the cap). The budget itself is decided in
//! [`budget`].

mod bpe;
pub mod budget;
mod elide;
mod memo;
mod policy;
mod request;
mod tokens;
mod view;

#[cfg(test)]
mod tests;

pub use policy::{prune, prune_shared, prune_with, Dropped, Pin, With, LAYOUT_MIN_BYTES};
pub use request::{ChatRequest, Layout, ParseError, Verifier};
pub use tokens::{Counter, Encoding, UnknownEncoding};
pub use view::View;

pub use crate::config::{Budget, Mode, OnOverflow};

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
    /// Tokens of ctxgate's summary pinned after the system prefix (part of `tokens_after`).
    pub summary_tokens: u64,
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
