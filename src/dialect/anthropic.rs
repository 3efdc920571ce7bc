//! Anthropic's Messages API.
//!
//! - Pruned: `POST …/v1/messages`. `POST …/v1/messages/count_tokens` passes through, or is
//!   answered locally (`{"input_tokens": N}`) on a route with `count_tokens = "local"`.
//! - Errors: `{"type":"error","error":{"type","message"}}`; a stream in error ends with an
//!   `event: error` event whose data is that object.
//! - Usage, non-streaming: `usage.input_tokens`, `output_tokens`, `cache_read_input_tokens`,
//!   `cache_creation_input_tokens`; the finish reason from `stop_reason`; text from
//!   `content[].text`.
//! - Usage, streaming: `message_start.message.usage`, then `message_delta.usage` (cumulative
//!   output tokens) and `message_delta.delta.stop_reason`; text from `content_block_delta`
//!   `text_delta`s.
//! - Anthropic's `input_tokens` leaves out the cached part; ctxgate adds cache reads and
//!   writes back so that input always means the whole prompt.

use http::Method;
use serde_json::Value;

use super::tap::{names_string, put, set, set_str, Count, Tapped};
use super::{ErrorClass, Wire};

/// The Anthropic Messages format.
pub struct Anthropic;

/// What the tap reads of a whole answer: serde skips every other field without building it.
/// An answer with an unexpected shape fails this parse and is read as a `Value` instead.
#[derive(serde::Deserialize)]
struct Answer {
    usage: Option<Numbers>,
    stop_reason: Option<String>,
}

/// Anthropic's usage figures.
#[derive(serde::Deserialize)]
struct Numbers {
    input_tokens: Option<Count>,
    output_tokens: Option<Count>,
    cache_read_input_tokens: Option<Count>,
    cache_creation_input_tokens: Option<Count>,
}

fn usage(u: &Value, f: &mut Tapped) {
    // message_delta repeats output_tokens cumulatively; later values win.
    set(&mut f.input_tokens, &u["input_tokens"]);
    set(&mut f.output_tokens, &u["output_tokens"]);
    set(&mut f.cache_read_tokens, &u["cache_read_input_tokens"]);
    set(&mut f.cache_write_tokens, &u["cache_creation_input_tokens"]);
}

impl Wire for Anthropic {
    fn is_count(&self, method: &Method, path: &str) -> bool {
        method == Method::POST && path.ends_with("/v1/messages/count_tokens")
    }

    fn is_chat(&self, method: &Method, path: &str) -> bool {
        method == Method::POST && path.ends_with("/v1/messages")
    }

    fn error_body(&self, class: ErrorClass, _code: &str, message: &str) -> String {
        let kind = match class {
            ErrorClass::InvalidRequest => "invalid_request_error",
            ErrorClass::NotFound => "not_found_error",
            ErrorClass::TooLarge => "request_too_large",
            ErrorClass::RateLimit => "rate_limit_error",
            ErrorClass::Upstream => "api_error",
            ErrorClass::Timeout => "timeout_error",
        };
        serde_json::json!({
            "type": "error",
            "error": { "type": kind, "message": message }
        })
        .to_string()
    }

    fn sse_error_event(&self, class: ErrorClass, code: &str, message: &str) -> String {
        format!(
            "event: error\ndata: {}\n\n",
            self.error_body(class, code, message)
        )
    }

    /// Anthropic's own wording (Claude Code compacts its history when it reads it), then
    /// ctxgate's detail.
    fn overflow_message(&self, detail: &str, pinned: u64, limit: u64) -> String {
        format!("prompt is too long: {pinned} tokens > {limit} maximum ({detail})")
    }

    fn tap_json(&self, body: &[u8], found: &mut Tapped) {
        if found.text.is_none() {
            if let Ok(b) = serde_json::from_slice::<Answer>(body) {
                if let Some(u) = b.usage {
                    put(&mut found.input_tokens, u.input_tokens);
                    put(&mut found.output_tokens, u.output_tokens);
                    put(&mut found.cache_read_tokens, u.cache_read_input_tokens);
                    put(&mut found.cache_write_tokens, u.cache_creation_input_tokens);
                }
                found.finish_reason = b.stop_reason;
                return;
            }
        }
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        usage(&v["usage"], found);
        set_str(&mut found.finish_reason, &v["stop_reason"]);
        if let Some(blocks) = v["content"].as_array() {
            for b in blocks {
                if let Some(t) = b["text"].as_str() {
                    found.push_text(t);
                }
            }
        }
    }

    fn tap_event(&self, v: &Value, found: &mut Tapped) {
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => usage(&v["message"]["usage"], found),
            Some("message_delta") => {
                usage(&v["usage"], found);
                set_str(&mut found.finish_reason, &v["delta"]["stop_reason"]);
            }
            Some("content_block_delta") => {
                if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
                    found.push_text(t);
                }
            }
            _ => {}
        }
    }

    /// `message_delta` carries usage too; this catches one that does not.
    fn tap_wants(&self, data: &[u8]) -> bool {
        names_string(data, "stop_reason")
    }

    fn finish_usage(&self, found: &mut Tapped) {
        if let Some(n) = found.input_tokens.as_mut() {
            *n += found.cache_read_tokens.unwrap_or(0) + found.cache_write_tokens.unwrap_or(0);
        }
    }
}
