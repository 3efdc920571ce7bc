//! The two API dialects ctxgate speaks: OpenAI-compatible chat completions and Anthropic
//! Messages. This module owns what differs between them on the wire: the JSON shape of an
//! error, the SSE event that ends a stream in error, and (in `openai`/`anthropic`) how a chat
//! body is parsed and serialised for pruning.

use serde::{Deserialize, Serialize};

/// Which wire format a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// OpenAI-compatible APIs: OpenAI, GLM, Kimi, DeepSeek, ….
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

impl Dialect {
    /// The config spelling (`"openai"` / `"anthropic"`), also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
        }
    }

    /// An error body in the dialect's own shape.
    ///
    /// OpenAI: `{"error":{"message","type","code"}}`;
    /// Anthropic: `{"type":"error","error":{"type","message"}}`.
    /// `kind` is the OpenAI `type` / Anthropic `error.type`; `code` only appears in OpenAI's.
    pub fn error_body(self, kind: &str, code: &str, message: &str) -> String {
        let v = match self {
            Dialect::OpenAi => serde_json::json!({
                "error": { "message": message, "type": kind, "param": null, "code": code }
            }),
            Dialect::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": kind, "message": message }
            }),
        };
        v.to_string()
    }

    /// The SSE bytes that end a stream in error, in the dialect's format.
    ///
    /// OpenAI streams carry `data: {"error":…}` events; Anthropic streams carry an
    /// `event: error` event whose data is the error object.
    pub fn sse_error_event(self, kind: &str, code: &str, message: &str) -> String {
        let body = self.error_body(kind, code, message);
        match self {
            Dialect::OpenAi => format!("data: {body}\n\n"),
            Dialect::Anthropic => format!("event: error\ndata: {body}\n\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shapes() {
        let o: serde_json::Value =
            serde_json::from_str(&Dialect::OpenAi.error_body("invalid_request_error", "x", "m"))
                .unwrap();
        assert_eq!(o["error"]["message"], "m");
        assert_eq!(o["error"]["type"], "invalid_request_error");
        assert_eq!(o["error"]["code"], "x");
        let a: serde_json::Value =
            serde_json::from_str(&Dialect::Anthropic.error_body("not_found_error", "x", "m"))
                .unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "not_found_error");
        assert_eq!(a["error"]["message"], "m");
        assert_eq!(
            Dialect::Anthropic.sse_error_event("timeout_error", "c", "m"),
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"timeout_error\",\"message\":\"m\"}}\n\n"
        );
    }
}
