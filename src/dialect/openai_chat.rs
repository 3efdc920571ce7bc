//! OpenAI-compatible chat completions (OpenAI, GLM, Kimi, DeepSeek, …).
//!
//! - Pruned: `POST …/chat/completions`.
//! - Errors: `{"error":{"message","type","param","code"}}`; a stream in error ends with a
//!   `data: {"error":…}` event.
//! - Usage, non-streaming: `usage.prompt_tokens`, `completion_tokens`,
//!   `prompt_tokens_details.cached_tokens`; the finish reason from `choices[0].finish_reason`;
//!   text from `choices[0].message.content`.
//! - Usage, streaming: the chunk with `usage` (sent last when `stream_options.include_usage`
//!   is set); the finish reason from the chunk whose `choices[0].finish_reason` is not null
//!   (every chunk has the key, so only a string value gets a chunk parsed); text from
//!   `choices[0].delta.content`.

use http::Method;
use serde_json::Value;

use super::tap::{names_string, put, set, set_str, Count, Tapped};
use super::{ErrorClass, Wire};

/// The OpenAI chat completions format.
pub struct OpenAiChat;

/// What the tap reads of a whole answer: serde skips every other field without building it.
/// An answer with an unexpected shape fails this parse and is read as a `Value` instead.
#[derive(serde::Deserialize)]
struct Answer {
    usage: Option<Numbers>,
    choices: Option<Vec<Choice>>,
}

#[derive(serde::Deserialize)]
struct Choice {
    finish_reason: Option<String>,
}

/// OpenAI's usage figures.
#[derive(serde::Deserialize)]
struct Numbers {
    prompt_tokens: Option<Count>,
    completion_tokens: Option<Count>,
    prompt_tokens_details: Option<Details>,
}

#[derive(serde::Deserialize)]
struct Details {
    cached_tokens: Option<Count>,
}

fn usage(u: &Value, f: &mut Tapped) {
    set(&mut f.input_tokens, &u["prompt_tokens"]);
    set(&mut f.output_tokens, &u["completion_tokens"]);
    set(
        &mut f.cache_read_tokens,
        &u["prompt_tokens_details"]["cached_tokens"],
    );
}

fn json_value(v: &Value, f: &mut Tapped) {
    usage(&v["usage"], f);
    set_str(&mut f.finish_reason, &v["choices"][0]["finish_reason"]);
    if let Some(t) = v
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
    {
        f.push_text(t);
    }
}

impl Wire for OpenAiChat {
    fn is_chat(&self, method: &Method, path: &str) -> bool {
        method == Method::POST && path.ends_with("/chat/completions")
    }

    fn error_body(&self, class: ErrorClass, code: &str, message: &str) -> String {
        let kind = match class {
            ErrorClass::InvalidRequest | ErrorClass::NotFound | ErrorClass::TooLarge => {
                "invalid_request_error"
            }
            ErrorClass::RateLimit => "rate_limit_error",
            ErrorClass::Upstream | ErrorClass::Timeout => "server_error",
        };
        serde_json::json!({
            "error": { "message": message, "type": kind, "param": null, "code": code }
        })
        .to_string()
    }

    fn sse_error_event(&self, class: ErrorClass, code: &str, message: &str) -> String {
        format!("data: {}\n\n", self.error_body(class, code, message))
    }

    /// OpenAI's own wording for `context_length_exceeded`, then ctxgate's detail.
    fn overflow_message(&self, detail: &str, pinned: u64, limit: u64) -> String {
        format!(
            "This model's maximum context length is {limit} tokens. However, your messages resulted in {pinned} tokens. Please reduce the length of the messages. ({detail})"
        )
    }

    fn tap_json(&self, body: &[u8], found: &mut Tapped) {
        if found.text.is_none() {
            if let Ok(b) = serde_json::from_slice::<Answer>(body) {
                if let Some(u) = b.usage {
                    put(&mut found.input_tokens, u.prompt_tokens);
                    put(&mut found.output_tokens, u.completion_tokens);
                    put(
                        &mut found.cache_read_tokens,
                        u.prompt_tokens_details.and_then(|d| d.cached_tokens),
                    );
                }
                found.finish_reason = b
                    .choices
                    .and_then(|c| c.into_iter().next())
                    .and_then(|c| c.finish_reason);
                return;
            }
        }
        if let Ok(v) = serde_json::from_slice::<Value>(body) {
            json_value(&v, found);
        }
    }

    fn tap_event(&self, v: &Value, found: &mut Tapped) {
        if v.get("usage").is_some_and(|u| !u.is_null()) {
            usage(&v["usage"], found);
        }
        set_str(&mut found.finish_reason, &v["choices"][0]["finish_reason"]);
        if let Some(t) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            found.push_text(t);
        }
    }

    fn tap_wants(&self, data: &[u8]) -> bool {
        names_string(data, "finish_reason")
    }
}
