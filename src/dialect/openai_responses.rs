//! OpenAI's Responses API, served by `openai` routes on their `…/responses` paths.
//!
//! - Pruned: `POST …/responses` (the `input` items; `instructions` and `tools` are pinned).
//!   `POST …/responses/input_tokens` (the count endpoint) passes through.
//! - Errors: the OpenAI shape, `{"error":{"message","type","param","code"}}`. A stream in error
//!   ends with a `response.failed` event whose `response.error` holds the code and message:
//!   the event the SDKs and Codex read a failed response from.
//! - Usage, non-streaming: `usage.input_tokens` (cached part included), `output_tokens`,
//!   `input_tokens_details.cached_tokens`; text from the `output_text` parts of `output`. The
//!   finish reason is the response's `status` (`completed`, `failed`), or for an `incomplete`
//!   one the reason it gives (`incomplete_details.reason`: `max_output_tokens`,
//!   `content_filter`).
//! - Usage, streaming: the final event (`response.completed`, `response.incomplete` or
//!   `response.failed`) carries the whole response, usage, status and output included; text
//!   is taken from it rather than from the deltas.

use http::Method;
use serde_json::Value;

use super::tap::{put, set, Count, Tapped};
use super::{ErrorClass, Wire};

/// The OpenAI Responses format.
pub struct OpenAiResponses;

/// What the tap reads of a whole response: serde skips every other field without building
/// it. A response with an unexpected shape fails this parse and is read as a `Value` instead.
#[derive(serde::Deserialize)]
struct Answer {
    usage: Option<Numbers>,
    status: Option<String>,
    incomplete_details: Option<Incomplete>,
}

#[derive(serde::Deserialize)]
struct Incomplete {
    reason: Option<String>,
}

/// The finish reason of a response: its status, or why it is incomplete.
fn finish_reason(status: Option<&str>, incomplete_reason: Option<&str>) -> Option<String> {
    match (status, incomplete_reason) {
        (Some("incomplete"), Some(reason)) => Some(reason.to_string()),
        (status, _) => status.map(str::to_string),
    }
}

/// The Responses API's usage figures.
#[derive(serde::Deserialize)]
struct Numbers {
    input_tokens: Option<Count>,
    output_tokens: Option<Count>,
    input_tokens_details: Option<Details>,
}

#[derive(serde::Deserialize)]
struct Details {
    cached_tokens: Option<Count>,
}

fn usage(u: &Value, f: &mut Tapped) {
    set(&mut f.input_tokens, &u["input_tokens"]);
    set(&mut f.output_tokens, &u["output_tokens"]);
    set(
        &mut f.cache_read_tokens,
        &u["input_tokens_details"]["cached_tokens"],
    );
}

/// Usage, finish reason and text of a whole response object.
fn response(r: &Value, f: &mut Tapped) {
    if r.get("usage").is_some_and(|u| !u.is_null()) {
        usage(&r["usage"], f);
    }
    let reason = finish_reason(
        r["status"].as_str(),
        r["incomplete_details"]["reason"].as_str(),
    );
    if reason.is_some() {
        f.finish_reason = reason;
    }
    if f.text.is_none() {
        return;
    }
    let items = r.get("output").and_then(Value::as_array);
    for item in items.into_iter().flatten() {
        if item.get("type").and_then(Value::as_str) != Some("message") {
            continue;
        }
        let parts = item.get("content").and_then(Value::as_array);
        for p in parts.into_iter().flatten() {
            if p.get("type").and_then(Value::as_str) == Some("output_text") {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    f.push_text(t);
                }
            }
        }
    }
}

impl Wire for OpenAiResponses {
    fn is_count(&self, method: &Method, path: &str) -> bool {
        method == Method::POST && path.ends_with("/responses/input_tokens")
    }

    fn count_answer(&self, tokens: u64) -> String {
        format!("{{\"object\":\"response.input_tokens\",\"input_tokens\":{tokens}}}")
    }

    fn is_chat(&self, method: &Method, path: &str) -> bool {
        method == Method::POST && path.ends_with("/responses")
    }

    fn error_body(&self, class: ErrorClass, code: &str, message: &str) -> String {
        super::openai_chat::OpenAiChat.error_body(class, code, message)
    }

    fn sse_error_event(&self, class: ErrorClass, code: &str, message: &str) -> String {
        let kind = match class {
            ErrorClass::RateLimit => "rate_limit_exceeded",
            ErrorClass::InvalidRequest | ErrorClass::NotFound | ErrorClass::TooLarge => {
                "invalid_request_error"
            }
            ErrorClass::Upstream | ErrorClass::Timeout => "server_error",
        };
        let event = serde_json::json!({
            "type": "response.failed",
            "response": {
                "object": "response",
                "status": "failed",
                "error": { "code": kind, "message": format!("{message} ({code})") },
            },
        });
        format!("event: response.failed\ndata: {event}\n\n")
    }

    /// The Responses API's own wording for `context_length_exceeded`, then ctxgate's detail.
    fn overflow_message(&self, detail: &str, pinned: u64, limit: u64) -> String {
        format!(
            "Your input exceeds the context window of this model. Please adjust your input and try again. (input needs {pinned} tokens, the limit is {limit}: {detail})"
        )
    }

    fn tap_json(&self, body: &[u8], found: &mut Tapped) {
        if found.text.is_none() {
            if let Ok(b) = serde_json::from_slice::<Answer>(body) {
                if let Some(u) = b.usage {
                    put(&mut found.input_tokens, u.input_tokens);
                    put(&mut found.output_tokens, u.output_tokens);
                    put(
                        &mut found.cache_read_tokens,
                        u.input_tokens_details.and_then(|d| d.cached_tokens),
                    );
                }
                found.finish_reason = finish_reason(
                    b.status.as_deref(),
                    b.incomplete_details.and_then(|d| d.reason).as_deref(),
                );
                return;
            }
        }
        if let Ok(v) = serde_json::from_slice::<Value>(body) {
            response(&v, found);
        }
    }

    fn tap_event(&self, v: &Value, found: &mut Tapped) {
        let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
        if matches!(
            ty,
            "response.completed" | "response.incomplete" | "response.failed"
        ) {
            response(&v["response"], found);
        }
    }

    /// The final events carry `usage` (so they are parsed anyway); this catches one whose
    /// response has none.
    fn tap_wants(&self, data: &[u8]) -> bool {
        [
            &b"response.completed"[..],
            b"response.incomplete",
            b"response.failed",
        ]
        .iter()
        .any(|t| memchr::memmem::find(data, t).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::{Dialect, UsageTap};

    fn tap(sse: bool, text: bool, body: &str) -> Tapped {
        let mut t = UsageTap::new(Dialect::Responses.wire(), sse, text);
        // Split in the middle of an event: the tap reassembles lines across chunks.
        let (a, b) = body.split_at(body.len() / 2);
        t.feed(&bytes::Bytes::from(a.to_string()));
        t.feed(&bytes::Bytes::from(b.to_string()));
        t.finish()
    }

    const COMPLETED: &str = r#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"reasoning","id":"rs_1","summary":[]},{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Hel"},{"type":"output_text","text":"lo"}]}],"usage":{"input_tokens":1200,"input_tokens_details":{"cached_tokens":1024},"output_tokens":30,"output_tokens_details":{"reasoning_tokens":12},"total_tokens":1230}}"#;

    #[test]
    fn usage_from_a_json_response() {
        let t = tap(false, false, COMPLETED);
        assert_eq!(
            (t.input_tokens, t.cache_read_tokens, t.output_tokens, t.text),
            (Some(1200), Some(1024), Some(30), None)
        );
        let t = tap(false, true, COMPLETED);
        assert_eq!(t.text.as_deref(), Some("Hello"));
        assert_eq!(t.finish_reason.as_deref(), Some("completed"));
        let t = tap(false, false, COMPLETED);
        assert_eq!(t.finish_reason.as_deref(), Some("completed"));
    }

    const INCOMPLETE: &str = r#"{"id":"resp_2","object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"output":[],"usage":{"input_tokens":10,"output_tokens":64}}"#;

    #[test]
    fn an_incomplete_response_gives_its_reason() {
        for text in [false, true] {
            let t = tap(false, text, INCOMPLETE);
            assert_eq!(
                (t.finish_reason.as_deref(), t.output_tokens),
                (Some("max_output_tokens"), Some(64)),
                "text {text}"
            );
        }
        let stream = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"status\":\"in_progress\",\"usage\":null}}}}\n\n\
             event: response.incomplete\ndata: {{\"type\":\"response.incomplete\",\"response\":{INCOMPLETE}}}\n\n"
        );
        let t = tap(true, false, &stream);
        assert_eq!(t.finish_reason.as_deref(), Some("max_output_tokens"));
        // A stream broken off before its final event has no finish reason (the created
        // event's in_progress is not one); a final event without usage is read too.
        let cut = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"status\":\"in_progress\",\"usage\":null}}\n\n";
        assert_eq!(tap(true, false, cut).finish_reason, None);
        let bare = "data: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\"}}\n\n";
        assert_eq!(
            tap(true, false, bare).finish_reason.as_deref(),
            Some("failed")
        );
    }

    #[test]
    fn usage_from_the_completed_event_of_a_stream() {
        let stream = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"id\":\"resp_1\",\"usage\":null}}}}\n\n\
             event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"Hel\"}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{COMPLETED}}}\n\n"
        );
        let t = tap(true, true, &stream);
        assert_eq!(
            (t.input_tokens, t.cache_read_tokens, t.output_tokens),
            (Some(1200), Some(1024), Some(30))
        );
        // Text comes once, from the final response, not twice (deltas and final).
        assert_eq!(t.text.as_deref(), Some("Hello"));
        assert_eq!(t.finish_reason.as_deref(), Some("completed"));
    }

    #[test]
    fn a_stream_in_error_ends_with_response_failed() {
        let e = OpenAiResponses.sse_error_event(ErrorClass::Timeout, "timeout", "upstream slow");
        let data = e
            .strip_prefix("event: response.failed\ndata: ")
            .and_then(|d| d.strip_suffix("\n\n"))
            .unwrap();
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], "response.failed");
        assert_eq!(v["response"]["status"], "failed");
        assert_eq!(v["response"]["error"]["code"], "server_error");
        assert_eq!(v["response"]["error"]["message"], "upstream slow (timeout)");
    }
}
