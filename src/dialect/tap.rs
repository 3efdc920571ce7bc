//! The usage tap: reads the upstream's token usage and how the answer ended (its finish
//! reason; and, when asked, the assembled answer text) from a response as it streams through. It sees a reference to each chunk after it has been
//! handed on, copies only what it must (a non-streamed JSON body, up to a cap; the current
//! partial SSE line), and parses only the events that can carry what it looks for, so it never
//! delays a byte. Where each dialect keeps its usage is the dialect's own business
//! ([`Wire::tap_json`], [`Wire::tap_event`]); this file is the machinery they share.
//!
//! A compressed answer (`Content-Encoding: gzip`, `deflate`, `br` or `zstd`; the SDKs ask for
//! them) is decoded as it streams, for the tap only: the client gets the upstream's bytes
//! untouched. Decoding stops (and usage is not read) past [`MAX_DECODED`] bytes or at the
//! first corrupt byte; an encoding the tap does not know leaves usage unread.

use bytes::Bytes;
use serde_json::Value;

use crate::coding::Decoder;

use super::Wire;

/// Largest non-streamed body the tap copies to parse; beyond it, usage is not read.
const MAX_JSON_COPY: usize = 8 * 1024 * 1024;
/// Longest SSE line the tap keeps while waiting for its end.
const MAX_LINE: usize = 1024 * 1024;
/// Most bytes the tap decodes from one compressed answer (a bound against decompression
/// bombs; the answer itself is passed on whatever its size).
pub const MAX_DECODED: usize = 64 * 1024 * 1024;

/// What the tap found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tapped {
    /// All prompt tokens the upstream counted, cached ones included: OpenAI `prompt_tokens`;
    /// Anthropic `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`
    /// (Anthropic's `input_tokens` leaves out the cached part, OpenAI's includes it; one
    /// meaning for both keeps cache-hit shares and the estimate ratio comparable).
    pub input_tokens: Option<u64>,
    /// Completion tokens.
    pub output_tokens: Option<u64>,
    /// Prompt tokens served from the provider's cache.
    pub cache_read_tokens: Option<u64>,
    /// Prompt tokens written to the provider's cache (Anthropic).
    pub cache_write_tokens: Option<u64>,
    /// How the answer ended, in the upstream's own word: OpenAI chat `finish_reason` (of the
    /// first choice), Anthropic `stop_reason`, Responses `status` (`incomplete_details.reason`
    /// when incomplete).
    pub finish_reason: Option<String>,
    /// The assembled answer text, when text collection was asked for.
    pub text: Option<String>,
}

impl Tapped {
    /// Appends answer text, when text is being collected.
    pub(crate) fn push_text(&mut self, t: &str) {
        if let Some(text) = self.text.as_mut() {
            text.push_str(t);
        }
    }
}

/// An incremental reader of one response.
pub struct UsageTap {
    wire: &'static dyn Wire,
    sse: bool,
    /// Set for a compressed answer.
    decoder: Option<Decoder>,
    /// Bytes decoded so far.
    decoded: usize,
    /// Usage cannot be read (an unknown encoding, corrupt data, past [`MAX_DECODED`]).
    blind: bool,
    /// Non-streamed body copy, or the current partial SSE line.
    buf: Vec<u8>,
    overflow: bool,
    found: Tapped,
}

impl UsageTap {
    /// A tap for a response in `wire`'s format; `sse` when its content type is an event
    /// stream; `collect_text` to assemble the answer text too.
    pub fn new(wire: &'static dyn Wire, sse: bool, collect_text: bool) -> Self {
        UsageTap {
            wire,
            sse,
            decoder: None,
            decoded: 0,
            blind: false,
            buf: Vec::new(),
            overflow: false,
            found: Tapped {
                text: collect_text.then(String::new),
                ..Tapped::default()
            },
        }
    }

    /// Reads the answer through its `Content-Encoding` (none when absent).
    pub fn decoding(mut self, content_encoding: Option<&str>) -> Self {
        match content_encoding.map(Decoder::of) {
            None | Some(Ok(None)) => {}
            Some(Ok(Some(d))) => self.decoder = Some(d),
            Some(Err(())) => {
                tracing::debug!(
                    encoding = content_encoding.unwrap_or_default(),
                    "answer in an encoding the usage tap cannot decode; usage not read"
                );
                self.blind = true;
            }
        }
        self
    }

    /// Feeds one chunk of the response body (as it came from the upstream).
    pub fn feed(&mut self, chunk: &Bytes) {
        if self.blind {
            return;
        }
        let Some(d) = self.decoder.as_mut() else {
            self.feed_plain(chunk);
            return;
        };
        match d.write(chunk) {
            Ok(plain) => self.feed_decoded(plain),
            Err(_) => self.blind = true,
        }
    }

    fn feed_decoded(&mut self, plain: Vec<u8>) {
        self.decoded += plain.len();
        if self.decoded > MAX_DECODED {
            self.blind = true;
            return;
        }
        if !plain.is_empty() {
            self.feed_plain(&plain);
        }
    }

    /// Feeds decoded bytes.
    fn feed_plain(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.buf.len() + chunk.len() > MAX_JSON_COPY {
                self.overflow = true;
                self.buf = Vec::new();
            }
            if !self.overflow {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        let mut rest: &[u8] = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if self.buf.is_empty() {
                self.line(line);
            } else {
                let mut full = std::mem::take(&mut self.buf);
                full.extend_from_slice(line);
                self.line(&full);
            }
        }
        if !rest.is_empty() && self.buf.len() + rest.len() <= MAX_LINE {
            self.buf.extend_from_slice(rest);
        }
    }

    /// What was found; call once the body has ended.
    pub fn finish(mut self) -> Tapped {
        if let Some(mut d) = self.decoder.take() {
            match d.finish() {
                Ok(plain) if !self.blind => self.feed_decoded(plain),
                _ => self.blind = true,
            }
        }
        if self.blind {
            return Tapped {
                text: self.found.text.take().filter(|t| !t.is_empty()),
                ..Tapped::default()
            };
        }
        if !self.sse && !self.overflow && !self.buf.is_empty() {
            let body = std::mem::take(&mut self.buf);
            self.wire.tap_json(&body, &mut self.found);
        } else if self.sse && !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf);
            self.line(&last);
        }
        self.wire.finish_usage(&mut self.found);
        self.found
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        // Only parse events that can carry usage, the finish reason or (when collecting) text.
        let wanted = contains(data, b"usage")
            || self.wire.tap_wants(data)
            || (self.found.text.is_some()
                && (contains(data, b"\"text\"") || contains(data, b"\"content\"")));
        if !wanted {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            self.wire.tap_event(&v, &mut self.found);
        }
    }
}

/// Sets `slot` when `v` is an unsigned integer (floats, negatives, strings, null: absent).
pub(crate) fn set(slot: &mut Option<u64>, v: &Value) {
    if let Some(n) = v.as_u64() {
        *slot = Some(n);
    }
}

/// A token count in a typed usage parse: an unsigned integer, or (like `Value::as_u64`)
/// nothing. A string fails the typed parse, which then falls back to reading a `Value`.
pub(crate) struct Count(pub(crate) Option<u64>);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(n).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Sets `slot` from a typed count, when there is one.
pub(crate) fn put(slot: &mut Option<u64>, c: Option<Count>) {
    if let Some(Count(Some(n))) = c {
        *slot = Some(n);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether the JSON text `data` has the key `"key"` with a string value somewhere (`"key":"…"`,
/// whitespace allowed around the colon): a byte check, no parsing, so that an SSE event whose
/// finish reason is still `null` is not parsed for it.
pub(crate) fn names_string(data: &[u8], key: &str) -> bool {
    let quoted = format!("\"{key}\"");
    memchr::memmem::find_iter(data, quoted.as_bytes()).any(|at| {
        let mut rest = data[at + quoted.len()..]
            .iter()
            .skip_while(|b| b.is_ascii_whitespace());
        rest.next() == Some(&b':') && rest.find(|b| !b.is_ascii_whitespace()) == Some(&b'"')
    })
}

/// Sets `slot` when `v` is a string (anything else: absent).
pub(crate) fn set_str(slot: &mut Option<String>, v: &Value) {
    if let Some(s) = v.as_str() {
        *slot = Some(s.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::Dialect;

    fn run(dialect: Dialect, sse: bool, chunks: &[&str]) -> Tapped {
        let mut t = UsageTap::new(dialect.wire(), sse, true);
        for c in chunks {
            t.feed(&Bytes::from(c.to_string()));
        }
        t.finish()
    }

    #[test]
    fn openai_json() {
        let body = r#"{"choices":[{"message":{"content":"Hi there"},"finish_reason":"length"}],"usage":{"prompt_tokens":120,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":64}}}"#;
        let (a, b) = body.split_at(40);
        let t = run(Dialect::OpenAi, false, &[a, b]);
        assert_eq!(
            t,
            Tapped {
                input_tokens: Some(120),
                output_tokens: Some(7),
                cache_read_tokens: Some(64),
                cache_write_tokens: None,
                finish_reason: Some("length".into()),
                text: Some("Hi there".into())
            }
        );
    }

    #[test]
    fn openai_stream_split_mid_line() {
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\ndata: [DONE]\n\n";
        for cut in [1, 17, 60, 120, s.len() - 3] {
            let (a, b) = s.split_at(cut);
            let t = run(Dialect::OpenAi, true, &[a, b]);
            assert_eq!(t.input_tokens, Some(50), "cut {cut}");
            assert_eq!(t.output_tokens, Some(2));
            assert_eq!(t.cache_read_tokens, Some(0));
            assert_eq!(t.text.as_deref(), Some("Hello"));
            assert_eq!(t.finish_reason, None, "no chunk gave one");
        }
    }

    #[test]
    fn openai_finish_reason_streamed_and_not() {
        // The finish reason comes in a chunk of its own, without usage (no include_usage);
        // every chunk before it has `"finish_reason": null` (Python's spacing here).
        let s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\": null}]}\n\n\
                 data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\": \"tool_calls\"}]}\n\n\
                 data: [DONE]\n\n";
        for text in [false, true] {
            let mut t = UsageTap::new(Dialect::OpenAi.wire(), true, text);
            for c in s.as_bytes().chunks(11) {
                t.feed(&Bytes::copy_from_slice(c));
            }
            let t = t.finish();
            assert_eq!(
                t.finish_reason.as_deref(),
                Some("tool_calls"),
                "text {text}"
            );
            assert_eq!(t.input_tokens, None);
        }
        // Providers that put usage in the finishing chunk (DeepSeek): both are read.
        let s = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n";
        let t = run(Dialect::OpenAi, true, &[s]);
        assert_eq!(
            (t.finish_reason.as_deref(), t.input_tokens),
            (Some("stop"), Some(9))
        );
        // Not streamed: the typed parse and the `Value` one (collecting text) agree.
        let body = r#"{"choices":[{"index":0,"message":{"content":"x"},"finish_reason":"content_filter"},{"index":1,"finish_reason":"stop"}]}"#;
        for text in [false, true] {
            let mut t = UsageTap::new(Dialect::OpenAi.wire(), false, text);
            t.feed(&Bytes::from_static(body.as_bytes()));
            assert_eq!(
                t.finish().finish_reason.as_deref(),
                Some("content_filter"),
                "the first choice's, text {text}"
            );
        }
        // A finish reason that is not a string is no finish reason.
        let t = run(
            Dialect::OpenAi,
            false,
            &[r#"{"choices":[{"finish_reason":7}]}"#],
        );
        assert_eq!(t.finish_reason, None);
    }

    #[test]
    fn a_string_value_is_told_from_null_without_parsing() {
        assert!(names_string(
            br#"{"finish_reason":"stop"}"#,
            "finish_reason"
        ));
        assert!(names_string(
            br#"{"finish_reason" :  "stop"}"#,
            "finish_reason"
        ));
        assert!(names_string(
            br#"{"a":{"finish_reason":null},"b":{"finish_reason":"length"}}"#,
            "finish_reason"
        ));
        assert!(!names_string(
            br#"{"finish_reason": null}"#,
            "finish_reason"
        ));
        assert!(!names_string(br#"{"finish_reason"}"#, "finish_reason"));
        assert!(!names_string(br#"{"x":"finish_reason"}"#, "finish_reason"));
        assert!(!names_string(
            br#"{"my_finish_reason":"x"}"#,
            "finish_reason"
        ));
        assert!(!names_string(
            br#"{"text":"say \"finish_reason\": \"stop\""}"#,
            "finish_reason"
        ));
    }

    #[test]
    fn anthropic_stream_and_json() {
        let s = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":900,\"cache_creation_input_tokens\":300,\"cache_read_input_tokens\":500,\"output_tokens\":1}}}\r\n\r\nevent: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\r\n\r\nevent: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":12}}\r\n\r\n";
        let t = run(Dialect::Anthropic, true, &[s]);
        assert_eq!(
            t,
            Tapped {
                input_tokens: Some(1700),
                output_tokens: Some(12),
                cache_read_tokens: Some(500),
                cache_write_tokens: Some(300),
                finish_reason: Some("end_turn".into()),
                text: Some("Hi".into())
            }
        );
        let j = r#"{"content":[{"type":"text","text":"A"},{"type":"tool_use","id":"t"},{"type":"text","text":"B"}],"stop_reason":"tool_use","usage":{"input_tokens":5,"output_tokens":6,"cache_read_input_tokens":0,"cache_creation_input_tokens":0}}"#;
        let t = run(Dialect::Anthropic, false, &[j]);
        assert_eq!(t.text.as_deref(), Some("AB"));
        assert_eq!(t.finish_reason.as_deref(), Some("tool_use"));
        assert_eq!(
            (
                t.input_tokens,
                t.output_tokens,
                t.cache_read_tokens,
                t.cache_write_tokens
            ),
            (Some(5), Some(6), Some(0), Some(0))
        );
        let mut typed = UsageTap::new(Dialect::Anthropic.wire(), false, false);
        typed.feed(&Bytes::from_static(j.as_bytes()));
        assert_eq!(typed.finish().finish_reason.as_deref(), Some("tool_use"));
        // A message_delta without usage still gives its stop reason; message_start's null
        // is none.
        let s = "data: {\"type\":\"message_start\",\"message\":{\"stop_reason\":null,\"usage\":{\"input_tokens\":3}}}\n\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"}}\n\n";
        let mut t = UsageTap::new(Dialect::Anthropic.wire(), true, false);
        t.feed(&Bytes::from_static(s.as_bytes()));
        assert_eq!(t.finish().finish_reason.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn usage_without_text_collection() {
        let body = r#"{"id":"x","choices":[{"message":{"content":"Hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let mut t = UsageTap::new(Dialect::OpenAi.wire(), false, false);
        t.feed(&Bytes::from_static(body.as_bytes()));
        let t = t.finish();
        assert_eq!(
            (t.input_tokens, t.output_tokens, t.cache_read_tokens, t.text),
            (Some(12), Some(3), Some(4), None)
        );
        let body = r#"{"content":[{"type":"text","text":"A"}],"usage":{"input_tokens":5,"output_tokens":6,"cache_read_input_tokens":2,"cache_creation_input_tokens":1}}"#;
        let mut t = UsageTap::new(Dialect::Anthropic.wire(), false, false);
        t.feed(&Bytes::from_static(body.as_bytes()));
        let t = t.finish();
        assert_eq!(
            (
                t.input_tokens,
                t.output_tokens,
                t.cache_read_tokens,
                t.cache_write_tokens
            ),
            (Some(8), Some(6), Some(2), Some(1))
        );
        // Odd shapes: a count as a string fails the typed parse and is read as a `Value`
        // (the string ignored, the number kept); floats, negatives and nulls count as absent.
        for (body, want) in [
            (
                r#"{"usage":{"prompt_tokens":"12","completion_tokens":5}}"#,
                (None, Some(5), None),
            ),
            (
                r#"{"usage":{"prompt_tokens":12.5,"completion_tokens":-1,"prompt_tokens_details":null}}"#,
                (None, None, None),
            ),
            (
                r#"{"usage":{"prompt_tokens":7,"prompt_tokens_details":{"cached_tokens":"x"}}}"#,
                (Some(7), None, None),
            ),
            (r#"{"usage":null,"id":"x"}"#, (None, None, None)),
        ] {
            let mut t = UsageTap::new(Dialect::OpenAi.wire(), false, false);
            t.feed(&Bytes::from_static(body.as_bytes()));
            let t = t.finish();
            assert_eq!(
                (t.input_tokens, t.output_tokens, t.cache_read_tokens),
                want,
                "{body}"
            );
        }
    }

    /// Feeds `bytes` in chunks of `n` through a tap reading `encoding`.
    fn tap_encoded(dialect: Dialect, sse: bool, encoding: &str, bytes: &[u8], n: usize) -> Tapped {
        let mut t = UsageTap::new(dialect.wire(), sse, false).decoding(Some(encoding));
        for c in bytes.chunks(n) {
            t.feed(&Bytes::copy_from_slice(c));
        }
        t.finish()
    }

    const ANSWER: &[u8] = include_bytes!("../../tests/fixtures/openai-answer.json");

    #[test]
    fn compressed_answers_are_read_in_every_encoding() {
        use std::io::Write;
        let want = (Some(31), Some(4), Some(16));
        let figures = |t: Tapped| (t.input_tokens, t.output_tokens, t.cache_read_tokens);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(ANSWER).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(ANSWER).unwrap();
        let zl = zl.finish().unwrap();
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(ANSWER).unwrap();
        let raw = raw.finish().unwrap();
        let zst = zstd::encode_all(ANSWER, 3).unwrap();
        // Made with Python's brotli package (the crate here only decodes).
        let br = include_bytes!("../../tests/fixtures/openai-answer.json.br");
        for (enc, bytes) in [
            ("gzip", &gz[..]),
            ("deflate", &zl[..]),
            ("deflate", &raw[..]),
            ("br", &br[..]),
            ("zstd", &zst[..]),
            ("GZIP", &gz[..]),
        ] {
            for n in [1, 7, 4096] {
                assert_eq!(
                    figures(tap_encoded(Dialect::OpenAi, false, enc, bytes, n)),
                    want,
                    "{enc} in chunks of {n}"
                );
            }
        }
        // A compressed SSE stream, Anthropic's, split mid-event.
        let events = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9}}\n\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(events.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let t = tap_encoded(Dialect::Anthropic, true, "gzip", &gz, 5);
        assert_eq!(
            (t.input_tokens, t.output_tokens, t.finish_reason.as_deref()),
            (Some(15), Some(9), Some("end_turn"))
        );
        // A compressed OpenAI stream whose finish reason has a chunk of its own, and a
        // compressed JSON answer.
        let events = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":null}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(events.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let t = tap_encoded(Dialect::OpenAi, true, "gzip", &gz, 3);
        assert_eq!(t.finish_reason.as_deref(), Some("length"));
        let answer = r#"{"choices":[{"message":{"content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4}}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(answer.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let t = tap_encoded(Dialect::OpenAi, false, "gzip", &gz, 3);
        assert_eq!(
            (t.finish_reason.as_deref(), t.input_tokens),
            (Some("stop"), Some(4))
        );
        // Identity is no encoding at all.
        assert_eq!(
            figures(tap_encoded(Dialect::OpenAi, false, "identity", ANSWER, 9)),
            want
        );
    }

    #[test]
    fn undecodable_answers_leave_usage_unread() {
        // An unknown encoding, corrupt bytes, and a bomb past the decoding bound.
        let none = (None, None);
        let figures = |t: Tapped| (t.input_tokens, t.output_tokens);
        assert_eq!(
            figures(tap_encoded(Dialect::OpenAi, false, "compress", ANSWER, 64)),
            none
        );
        assert_eq!(
            figures(tap_encoded(Dialect::OpenAi, false, "gzip", ANSWER, 64)),
            none
        );
        assert_eq!(
            figures(tap_encoded(
                Dialect::OpenAi,
                false,
                "br",
                b"\xff\xfe nonsense",
                4
            )),
            none
        );
        let zeros = vec![b' '; MAX_DECODED + 1024];
        let mut body = zeros;
        body.extend_from_slice(ANSWER);
        let bomb = zstd::encode_all(&body[..], 1).unwrap();
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        assert_eq!(
            figures(tap_encoded(Dialect::OpenAi, false, "zstd", &bomb, 8192)),
            none
        );
    }

    #[test]
    fn garbage_is_ignored() {
        let t = run(
            Dialect::OpenAi,
            true,
            &["data: {not json usage\n\n", "event: x\n"],
        );
        assert_eq!(t.input_tokens, None);
        let t = run(Dialect::OpenAi, false, &["<html>"]);
        assert_eq!(t.input_tokens, None);
    }
}
