//! The wire formats ctxgate speaks, one file each, behind one trait ([`Wire`]):
//!
//! - [`openai_chat`]: OpenAI-compatible chat completions (OpenAI, GLM, Kimi, DeepSeek, …);
//! - [`anthropic`]: Anthropic's Messages API;
//! - [`openai_responses`]: OpenAI's Responses API, served by `openai` routes on their
//!   `…/responses` paths ([`Dialect::for_path`]).
//!
//! A dialect owns what differs on the wire: which requests it prunes, the JSON shape of an
//! error and of the SSE event that ends a stream in error, the wording of a context overflow,
//! and where an answer carries its token usage and finish reason (read by the
//! [`tap::UsageTap`]). The route's
//! `dialect` key names one ([`Dialect`], a config value); [`Dialect::wire`] gives its
//! implementation. How a chat body is split into messages, counted and pruned per dialect
//! lives with pruning (`prune::request`, `prune::tokens`, `prune::elide`), which asks
//! [`Dialect`] for the format: pruning stays one pure function over both.
//!
//! Adding a dialect: a file here implementing [`Wire`], a variant of [`Dialect`] in `config`,
//! and one arm in [`Dialect::wire`] (see docs/ARCHITECTURE.md).

pub mod anthropic;
pub mod openai_chat;
pub mod openai_responses;
pub mod tap;

use http::{HeaderMap, Method};

pub use crate::config::Dialect;
pub use tap::{Tapped, UsageTap};

/// What kind of error the client is told about, in the vocabulary both APIs share. Each
/// dialect spells it its own way (OpenAI `error.type`, Anthropic `error.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is malformed or cannot be served as sent.
    InvalidRequest,
    /// Nothing serves the path.
    NotFound,
    /// The request body is too large.
    TooLarge,
    /// Too many requests: the gate refused it.
    RateLimit,
    /// The upstream failed (refused, reset, broke off).
    Upstream,
    /// A timer fired.
    Timeout,
}

/// One wire format. Implementations are stateless unit structs.
pub trait Wire: Sync {
    /// Whether a request is a chat request of this format: read whole, identified by its
    /// body and pruned. Every other request streams through untouched.
    fn is_chat(&self, method: &Method, path: &str) -> bool;

    /// An error body in the format's own shape; `code` is a short machine-readable reason.
    fn error_body(&self, class: ErrorClass, code: &str, message: &str) -> String;

    /// The SSE bytes that end a stream in error.
    fn sse_error_event(&self, class: ErrorClass, code: &str, message: &str) -> String;

    /// Reads usage (and, when `found.text` is `Some`, the answer text) from a whole JSON
    /// answer.
    fn tap_json(&self, body: &[u8], found: &mut Tapped);

    /// Reads usage, the finish reason (and text) from the `data:` payload of one SSE event;
    /// only called for payloads that mention `usage`, that [`Wire::tap_wants`], or (when
    /// collecting it) that mention text.
    fn tap_event(&self, data: &serde_json::Value, found: &mut Tapped);

    /// Whether an SSE payload carries something [`Wire::tap_event`] reads besides usage and
    /// text (the finish reason, where its event carries no usage). A byte check: it runs on
    /// every event, and only the payloads it accepts are parsed.
    fn tap_wants(&self, _data: &[u8]) -> bool {
        false
    }

    /// The message of the error that refuses a prompt whose pinned part is over the limit
    /// (`pinned` tokens against `limit`), in the API's own words, so that clients react to it
    /// as to the provider's (an agent compacts its history); `detail` is pruning's wording,
    /// with the config key, and stays in the message.
    fn overflow_message(&self, detail: &str, pinned: u64, limit: u64) -> String;

    /// Brings the usage found to ctxgate's meaning once the answer has ended (input tokens
    /// always include the cached part).
    fn finish_usage(&self, _found: &mut Tapped) {}

    /// Whether a request is the format's count-tokens request (its body is a chat body),
    /// which a route with `count_tokens = "local"` answers itself.
    fn is_count(&self, _method: &Method, _path: &str) -> bool {
        false
    }

    /// The answer of the count-tokens endpoint for `tokens`.
    fn count_answer(&self, tokens: u64) -> String {
        format!("{{\"input_tokens\":{tokens}}}")
    }
}

/// The bounded set a finish reason is counted under, whatever the dialect's word for it.
pub const FINISH_CLASSES: [&str; 5] = ["stop", "length", "tool_calls", "content_filter", "other"];

/// The class in [`FINISH_CLASSES`] of a finish reason as the upstream said it (OpenAI chat
/// `finish_reason`, Anthropic `stop_reason`, Responses `status` or incomplete reason). The
/// dialects' words do not clash, so one table serves all three. A Responses answer that
/// ends in tool calls is `completed` like any other: it counts as `stop`.
pub fn finish_class(reason: &str) -> &'static str {
    match reason {
        // OpenAI; Anthropic; Responses.
        "stop" | "end_turn" | "stop_sequence" | "completed" => "stop",
        // A Responses answer `incomplete` without a reason is most often one out of tokens
        // (`ctxgate report` counts it so too).
        "length"
        | "max_tokens"
        | "model_context_window_exceeded"
        | "max_output_tokens"
        | "incomplete" => "length",
        "tool_calls" | "function_call" | "tool_use" => "tool_calls",
        "content_filter" | "refusal" => "content_filter",
        // Anthropic `pause_turn`, Responses `failed`, anything new.
        _ => "other",
    }
}

impl Dialect {
    /// The implementation of this dialect.
    pub fn wire(self) -> &'static dyn Wire {
        match self {
            Dialect::OpenAi => &openai_chat::OpenAiChat,
            Dialect::Anthropic => &anthropic::Anthropic,
            Dialect::Responses => &openai_responses::OpenAiResponses,
        }
    }

    /// The top-level field that holds the conversation: `messages`, or the Responses API's
    /// `input`.
    pub fn items_key(self) -> &'static str {
        match self {
            Dialect::OpenAi | Dialect::Anthropic => "messages",
            Dialect::Responses => "input",
        }
    }

    /// The dialect a request that matched no route most likely speaks: Anthropic clients are
    /// recognised by their path or their `anthropic-version` header; OpenAI's shape is the
    /// common one.
    pub fn guess(path: &str, headers: &HeaderMap) -> Dialect {
        if path.ends_with("/v1/messages") || headers.contains_key("anthropic-version") {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi.for_path(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shapes() {
        let o: serde_json::Value = serde_json::from_str(&Dialect::OpenAi.wire().error_body(
            ErrorClass::InvalidRequest,
            "x",
            "m",
        ))
        .unwrap();
        assert_eq!(o["error"]["message"], "m");
        assert_eq!(o["error"]["type"], "invalid_request_error");
        assert_eq!(o["error"]["code"], "x");
        let a: serde_json::Value = serde_json::from_str(&Dialect::Anthropic.wire().error_body(
            ErrorClass::NotFound,
            "x",
            "m",
        ))
        .unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "not_found_error");
        assert_eq!(a["error"]["message"], "m");
        assert_eq!(
            Dialect::Anthropic
                .wire()
                .sse_error_event(ErrorClass::Timeout, "c", "m"),
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"timeout_error\",\"message\":\"m\"}}\n\n"
        );
    }

    #[test]
    fn finish_reasons_fall_into_the_bounded_set() {
        for (word, class) in [
            ("stop", "stop"),
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("completed", "stop"),
            ("length", "length"),
            ("max_tokens", "length"),
            ("max_output_tokens", "length"),
            ("incomplete", "length"),
            ("model_context_window_exceeded", "length"),
            ("tool_calls", "tool_calls"),
            ("function_call", "tool_calls"),
            ("tool_use", "tool_calls"),
            ("content_filter", "content_filter"),
            ("refusal", "content_filter"),
            ("pause_turn", "other"),
            ("failed", "other"),
            ("Stop", "other"),
        ] {
            assert_eq!(finish_class(word), class, "{word}");
            assert!(FINISH_CLASSES.contains(&class));
        }
    }

    #[test]
    fn guess_for_unrouted_requests() {
        let mut h = HeaderMap::new();
        assert_eq!(Dialect::guess("/x/v1/messages", &h), Dialect::Anthropic);
        assert_eq!(Dialect::guess("/v1/chat/completions", &h), Dialect::OpenAi);
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        assert_eq!(Dialect::guess("/other", &h), Dialect::Anthropic);
    }
}
