//! Token counting: the tiktoken vocabularies (packed, loaded once: see `bpe`), a panic-free
//! text count, and the per-message / per-tool formulas of OpenAI's token-counting guide
//! (openai-cookbook, "How to count tokens with tiktoken").
//!
//! What is counted, and how:
//! - A message costs 3 tokens, plus the tokens of every string value in it (`role`,
//!   `content`, `name`, `tool_call_id`, …), plus 1 when it has a `name`. A reply is primed
//!   with 3 more tokens. These are the guide's rules and match the API's `prompt_tokens`
//!   for plain-text messages.
//! - Values that are not strings (content parts, `tool_calls`, Anthropic blocks) are counted
//!   as the sum of their string leaves, skipping the keys `type`, `cache_control` and
//!   `signature` (structure the API renders with its own few tokens). Numbers and booleans
//!   count as their JSON text. Images count a fixed [`IMAGE_TOKENS`] (85 with
//!   `detail: "low"`; Anthropic images [`ANTHROPIC_IMAGE_TOKENS`]), and inline binary
//!   payloads (`data`, `file_data`, `data:` URLs) count as bytes / 4. These are estimates:
//!   the API does not publish formulas for them.
//! - Tool definitions follow the guide's `num_tokens_for_tools` (func_init 7 for the o200k
//!   families, 10 for gpt-4 / gpt-3.5; prop_init 3, prop_key 3, enum_init -3, enum_item 3,
//!   func_end 12). Anthropic requests are counted with the same formulas and the configured
//!   default encoding: an estimate, since Claude's tokenizer is not public.
//!
//! tiktoken's split regex fails (fancy-regex backtrack limit; tiktoken-rs panics) on
//! whitespace runs near a million characters, and BPE slows down on very long runs without
//! whitespace. [`Counter`] therefore splits whitespace runs longer than 256 characters and
//! other runs longer than 4096 bytes into separate pieces before encoding, takes a regex
//! failure as an error, and falls back to an estimate (bytes / 4) should the count still fail. Splitting can shift a count by a
//! token per split, only for such pathological runs.

use serde_json::Value;

use super::bpe::{self, Bpe};
use super::memo::{Memo, Tag, MEMO_BYTES};
use super::request::Flat;
use crate::dialect::Dialect;

/// Tokens per message (the guide's `tokens_per_message`).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Extra tokens when a message has a `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime every reply (`<|start|>assistant<|message|>`).
pub const REPLY_PRIMING: u64 = 3;
/// Estimated tokens of an OpenAI image part whose size is unknown (a 512×512 tile at high
/// detail plus base: 85 + 170 × 4).
pub const IMAGE_TOKENS: u64 = 765;
/// Estimated tokens of an OpenAI image part with `detail: "low"`.
pub const IMAGE_TOKENS_LOW: u64 = 85;
/// Estimated tokens of an Anthropic image block (about the maximum, 1.15 MP / 750).
pub const ANTHROPIC_IMAGE_TOKENS: u64 = 1568;

/// Longest whitespace run encoded in one piece (see the module doc).
const MAX_WS_RUN_CHARS: usize = 256;
/// Longest run without whitespace encoded in one piece.
const MAX_WORD_RUN_BYTES: usize = 4096;

pub use crate::config::{Encoding, UnknownEncoding};

/// The token counter: both vocabularies, built once per process (see `bpe`).
pub struct Counter {
    o200k: &'static Bpe,
    cl100k: &'static Bpe,
    default_encoding: Encoding,
    /// Counts of long parts seen in other conversations (see `memo`).
    memo: Memo,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter")
            .field("default_encoding", &self.default_encoding)
            .finish_non_exhaustive()
    }
}

impl Counter {
    /// Builds (or reuses) the o200k and cl100k vocabularies; takes ~0.5 s the first time, so
    /// call it at start, not per request. Fails only if the loader thread cannot run.
    pub fn new(default_encoding: Encoding) -> Result<Counter, String> {
        let v =
            bpe::vocabularies().map_err(|e| format!("cannot load the token vocabularies: {e}"))?;
        Ok(Counter {
            o200k: &v.o200k,
            cl100k: &v.cl100k,
            default_encoding,
            memo: Memo::new(MEMO_BYTES),
        })
    }

    /// The memoised count of a part (a message, or a request's fixed part) with exactly
    /// these bytes, else `count()` — whose result is memoised when `exact`.
    pub(crate) fn memoised(
        &self,
        fp: u64,
        tag: Tag,
        bytes: &[u8],
        count: impl FnOnce() -> (u64, bool),
    ) -> (u64, bool) {
        if let Some(t) = self.memo.get(fp, tag, bytes) {
            return (t, true);
        }
        let (t, exact) = count();
        if exact {
            self.memo.put(fp, tag, bytes, t);
        }
        (t, exact)
    }

    /// Counts served from the memo so far.
    pub fn memo_hits(&self) -> u64 {
        self.memo.hits()
    }

    /// The encoding used for models the name does not identify.
    pub fn default_encoding(&self) -> Encoding {
        self.default_encoding
    }

    /// The encoding of an OpenAI model: o200k for gpt-4o*, gpt-4.1*, gpt-4.5*, o1*, o3*,
    /// o4*, gpt-5*, chatgpt-4o*; cl100k for gpt-4* and gpt-3.5*; else the default.
    pub fn encoding_for_model(&self, model: &str) -> Encoding {
        model_encoding(model).unwrap_or(self.default_encoding)
    }

    fn bpe(&self, enc: Encoding) -> &'static Bpe {
        match enc {
            Encoding::O200kBase => self.o200k,
            Encoding::Cl100kBase => self.cl100k,
        }
    }

    /// Tokens of `text`. Never panics; see the module doc for pathological runs.
    pub fn count_text(&self, enc: Encoding, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let bpe = self.bpe(enc);
        let mut total = 0u64;
        for piece in Pieces::new(text) {
            total += count_piece(bpe, piece);
            crate::pace::pace();
        }
        total
    }

    /// Tokens of `text`, but stop early once the count is known to exceed `cap`: then the
    /// result is a lower bound above `cap` and `exact` is false. The work done is bounded
    /// by about `8 × cap` bytes, so a huge message costs little when it cannot fit anyway;
    /// one that cannot fit even at the longest token per piece costs nothing (a million
    /// characters of one letter took 7 ms to learn that from its first 36 KB).
    pub(crate) fn count_text_capped(&self, enc: Encoding, text: &str, cap: u64) -> (u64, bool) {
        let probe =
            usize::try_from(cap.saturating_mul(8).saturating_add(4096)).unwrap_or(usize::MAX);
        if text.len() <= probe {
            return (self.count_text(enc, text), true);
        }
        let floor = (text.len() as u64).div_ceil(self.bpe(enc).longest_token() as u64);
        if floor > cap {
            return (floor, false);
        }
        let mut end = probe;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let head = self.count_text(enc, &text[..end]);
        if head > cap {
            return (head, false);
        }
        (self.count_text(enc, text), true)
    }

    /// The exact prompt count of a whole request, the way the guide counts it: every
    /// message, the tool (and legacy function) definitions, reply priming; plus, for
    /// Anthropic, the `system` field. Used by `ctxgate count`.
    pub fn count_request(&self, req: &crate::prune::ChatRequest) -> u64 {
        let enc = req.encoding(self, self.default_encoding);
        let mut total = req.fixed_tokens(self, enc, 0);
        for i in 0..req.message_count() {
            let (n, _) = req.count_message(self, enc, i, u64::MAX);
            total += n;
        }
        total
    }

    /// A tally for one message: its fixed overhead counted, stopping early past `cap`.
    fn message_tally(&self, enc: Encoding, dialect: Dialect, cap: u64) -> Tally<'_> {
        Tally {
            counter: self,
            enc,
            dialect,
            total: TOKENS_PER_MESSAGE,
            cap,
            exact: true,
        }
    }

    /// Tokens of one message (OpenAI shape; Anthropic messages are counted alike).
    /// Stops early past `cap` (then `exact` is false).
    pub(crate) fn count_message(
        &self,
        enc: Encoding,
        dialect: Dialect,
        msg: &Value,
        cap: u64,
    ) -> (u64, bool) {
        let mut t = self.message_tally(enc, dialect, cap);
        if let Value::Object(map) = msg {
            for (k, v) in map {
                match v {
                    Value::String(s) => t.field(k, s),
                    // A Responses item's type, ids and status are bookkeeping, not model text.
                    _ if t.bookkeeping(k) => {}
                    other => t.value(k, other),
                }
                if !t.exact {
                    break;
                }
            }
        } else {
            t.value("", msg);
        }
        (t.total, t.exact)
    }

    /// [`Counter::count_message`] of a flat message (every field a string), without its
    /// [`Value`]: the same count.
    pub(crate) fn count_flat(
        &self,
        enc: Encoding,
        dialect: Dialect,
        msg: &Flat<'_>,
        cap: u64,
    ) -> (u64, bool) {
        let mut t = self.message_tally(enc, dialect, cap);
        for (k, s) in msg.fields() {
            t.field(k, s);
            if !t.exact {
                break;
            }
        }
        (t.total, t.exact)
    }

    /// Tokens of a tool list (OpenAI `tools` or legacy `functions`, Anthropic `tools`) by
    /// the guide's `num_tokens_for_tools`, without the messages.
    pub(crate) fn count_tools(&self, enc: Encoding, func_init: u64, tools: &Value) -> u64 {
        const PROP_INIT: i64 = 3;
        const PROP_KEY: i64 = 3;
        const ENUM_INIT: i64 = -3;
        const ENUM_ITEM: i64 = 3;
        const FUNC_END: i64 = 12;
        let Value::Array(list) = tools else {
            return 0;
        };
        if list.is_empty() {
            return 0;
        }
        let mut n: i64 = 0;
        for tool in list {
            let f = tool.get("function").unwrap_or(tool);
            n += func_init as i64;
            let name = f.get("name").and_then(Value::as_str).unwrap_or("");
            let desc = f.get("description").and_then(Value::as_str).unwrap_or("");
            let line = format!("{name}:{}", desc.strip_suffix('.').unwrap_or(desc));
            n += self.count_text(enc, &line) as i64;
            let params = f.get("parameters").or_else(|| f.get("input_schema"));
            let props = params
                .and_then(|p| p.get("properties"))
                .and_then(Value::as_object);
            if let Some(props) = props.filter(|p| !p.is_empty()) {
                n += PROP_INIT;
                for (key, schema) in props {
                    n += PROP_KEY;
                    if let Some(items) = schema.get("enum").and_then(Value::as_array) {
                        n += ENUM_INIT;
                        for item in items {
                            n += ENUM_ITEM;
                            n += self.count_text(enc, &scalar_text(item)) as i64;
                        }
                    }
                    let ty = schema.get("type").map(scalar_text).unwrap_or_default();
                    let d = schema
                        .get("description")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let line = format!("{key}:{ty}:{}", d.strip_suffix('.').unwrap_or(d));
                    n += self.count_text(enc, &line) as i64;
                }
            }
        }
        n += FUNC_END;
        u64::try_from(n).unwrap_or(0)
    }

    /// Tokens of an arbitrary value by the string-leaves rule (Anthropic `system` blocks).
    pub(crate) fn count_value(&self, enc: Encoding, dialect: Dialect, v: &Value) -> u64 {
        let mut t = Tally {
            counter: self,
            enc,
            dialect,
            total: 0,
            cap: u64::MAX,
            exact: true,
        };
        t.value("", v);
        t.total
    }
}

/// `func_init` of the guide: 10 for gpt-4 / gpt-3.5 (cl100k), 7 for the newer families.
pub(crate) fn func_init(enc: Encoding) -> u64 {
    match enc {
        Encoding::O200kBase => 7,
        Encoding::Cl100kBase => 10,
    }
}

/// The encoding a model name identifies, if any (a `provider/` prefix is ignored).
pub(crate) fn model_encoding(model: &str) -> Option<Encoding> {
    let m = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    let o200k = [
        "gpt-4o",
        "chatgpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "o1",
        "o3",
        "o4",
        "gpt-5",
    ];
    if o200k.iter().any(|p| m.starts_with(p)) {
        return Some(Encoding::O200kBase);
    }
    if ["gpt-4", "gpt-3.5", "gpt-35"]
        .iter()
        .any(|p| m.starts_with(p))
    {
        return Some(Encoding::Cl100kBase);
    }
    None
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn count_piece(bpe: &Bpe, piece: &str) -> u64 {
    // `count` returns Err instead of panicking on regex failures (the backtrack limit), and
    // encodes special-token text as ordinary text, as the API does. catch_unwind is the last
    // resort should some input still panic.
    let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bpe.count(piece)));
    match counted {
        Ok(Ok(n)) => n as u64,
        _ => estimate_bytes(piece.len()),
    }
}

/// The cheap estimate used for text never encoded: bytes / 4, rounded up.
pub(crate) fn estimate_bytes(len: usize) -> u64 {
    (len as u64).div_ceil(4)
}

/// Splits text into pieces safe to encode: no whitespace run over [`MAX_WS_RUN_CHARS`]
/// characters and no other run over [`MAX_WORD_RUN_BYTES`] bytes. Ordinary text is one
/// piece.
struct Pieces<'a> {
    text: &'a str,
    start: usize,
}

impl<'a> Pieces<'a> {
    fn new(text: &'a str) -> Self {
        Pieces { text, start: 0 }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.start >= self.text.len() {
            return None;
        }
        let rest = &self.text[self.start..];
        let mut ws_run = 0usize; // chars
        let mut word_run = 0usize; // bytes
        for (i, c) in rest.char_indices() {
            if c.is_whitespace() {
                ws_run += 1;
                word_run = 0;
                if ws_run > MAX_WS_RUN_CHARS && i > 0 {
                    let piece = &rest[..i];
                    self.start += i;
                    return Some(piece);
                }
            } else {
                ws_run = 0;
                word_run += c.len_utf8();
                if word_run > MAX_WORD_RUN_BYTES && i > 0 {
                    let piece = &rest[..i];
                    self.start += i;
                    return Some(piece);
                }
            }
        }
        self.start = self.text.len();
        Some(rest)
    }
}

/// Accumulates one message's count with an early stop past `cap`.
struct Tally<'a> {
    counter: &'a Counter,
    enc: Encoding,
    dialect: Dialect,
    total: u64,
    cap: u64,
    exact: bool,
}

impl Tally<'_> {
    /// A Responses item's `type`, ids and `status`: bookkeeping, not model text.
    fn bookkeeping(&self, key: &str) -> bool {
        self.dialect == Dialect::Responses && matches!(key, "type" | "id" | "call_id" | "status")
    }

    /// A message's top-level string field.
    fn field(&mut self, key: &str, s: &str) {
        if self.bookkeeping(key) {
            return;
        }
        if is_payload_key(key, s) {
            self.total += estimate_bytes(s.len());
            return;
        }
        self.text(s);
        if key == "name" && self.dialect != Dialect::Responses {
            self.total += TOKENS_PER_NAME;
        }
    }

    fn text(&mut self, s: &str) {
        if !self.exact {
            return;
        }
        if self.cap == u64::MAX {
            self.total += self.counter.count_text(self.enc, s);
            return;
        }
        let room = self.cap.saturating_sub(self.total);
        let (n, exact) = self.counter.count_text_capped(self.enc, s, room);
        self.total += n;
        if !exact {
            self.exact = false;
        }
    }

    fn value(&mut self, key: &str, v: &Value) {
        if !self.exact {
            return;
        }
        match v {
            Value::Null => {}
            Value::Bool(_) | Value::Number(_) => {
                let s = v.to_string();
                self.text(&s);
            }
            Value::String(s) => {
                if is_payload_key(key, s) {
                    self.total += estimate_bytes(s.len());
                } else {
                    self.text(s);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.value("", item);
                }
            }
            Value::Object(map) => {
                if let Some(n) = image_tokens(self.dialect, map) {
                    self.total += n;
                    return;
                }
                for (k, item) in map {
                    if matches!(k.as_str(), "type" | "cache_control" | "signature") {
                        continue;
                    }
                    self.value(k, item);
                }
            }
        }
    }
}

/// Inline binary payloads, estimated rather than encoded.
/// (Encrypted reasoning, Responses `encrypted_content`, is opaque too: what the model reads
/// from it cannot be known, so its base64 is estimated like any payload.)
fn is_payload_key(key: &str, s: &str) -> bool {
    matches!(key, "data" | "file_data" | "encrypted_content")
        || (key == "url" && s.starts_with("data:"))
}

/// The fixed estimate for an image part/block, if `map` is one.
pub(crate) fn image_tokens(dialect: Dialect, map: &serde_json::Map<String, Value>) -> Option<u64> {
    let ty = map.get("type").and_then(Value::as_str)?;
    match (dialect, ty) {
        (_, "image_url") | (_, "input_image") => {
            let detail = map
                .get("image_url")
                .and_then(|i| i.get("detail"))
                .or_else(|| map.get("detail"))
                .and_then(Value::as_str);
            Some(if detail == Some("low") {
                IMAGE_TOKENS_LOW
            } else {
                IMAGE_TOKENS
            })
        }
        (Dialect::Anthropic, "image") => Some(ANTHROPIC_IMAGE_TOKENS),
        (Dialect::OpenAi | Dialect::Responses, "image") => Some(IMAGE_TOKENS),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn model_encodings() {
        let c = Counter::new(Encoding::Cl100kBase).unwrap();
        assert_eq!(c.encoding_for_model("gpt-4o-mini"), Encoding::O200kBase);
        assert_eq!(c.encoding_for_model("gpt-4.1"), Encoding::O200kBase);
        assert_eq!(c.encoding_for_model("o3-mini"), Encoding::O200kBase);
        assert_eq!(c.encoding_for_model("gpt-5"), Encoding::O200kBase);
        assert_eq!(c.encoding_for_model("gpt-4-0613"), Encoding::Cl100kBase);
        assert_eq!(c.encoding_for_model("gpt-3.5-turbo"), Encoding::Cl100kBase);
        assert_eq!(c.encoding_for_model("glm-4.6"), Encoding::Cl100kBase);
        let d = Counter::new(Encoding::O200kBase).unwrap();
        assert_eq!(d.encoding_for_model("claude-sonnet-4"), Encoding::O200kBase);
        assert_eq!("o200k_base".parse::<Encoding>(), Ok(Encoding::O200kBase));
        assert_eq!("cl100k_base".parse::<Encoding>(), Ok(Encoding::Cl100kBase));
        assert!("p50k".parse::<Encoding>().is_err());
    }

    #[test]
    fn plain_counts() {
        let c = Counter::new(Encoding::O200kBase).unwrap();
        assert_eq!(c.count_text(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(c.count_text(Encoding::O200kBase, ""), 0);
        assert!(c.count_text(Encoding::Cl100kBase, "<|endoftext|>") > 1);
    }

    #[test]
    fn pathological_inputs_do_not_panic() {
        let c = Counter::new(Encoding::O200kBase).unwrap();
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let spaces = " ".repeat(1_000_000);
            let n = c.count_text(enc, &spaces);
            assert!(n > 0 && n < 1_000_000, "{n}");
            let nbsp = "\u{a0}".repeat(300_000);
            assert!(c.count_text(enc, &nbsp) > 0);
            let ideo = "\u{3000}".repeat(300_000);
            assert!(c.count_text(enc, &ideo) > 0);
            let a = "a".repeat(1_000_000);
            let n = c.count_text(enc, &a);
            assert!((100_000..=1_000_000).contains(&n), "{n}");
        }
    }

    #[test]
    fn pieces_cover_text() {
        let text = format!("ab{}cd{}e", " ".repeat(1000), "x".repeat(10_000));
        let joined: String = Pieces::new(&text).collect();
        assert_eq!(joined, text);
        assert!(Pieces::new(&text).count() > 3);
        assert_eq!(Pieces::new("short text").count(), 1);
    }

    #[test]
    fn capped_count_stops_early() {
        let c = Counter::new(Encoding::O200kBase).unwrap();
        let text = "word ".repeat(100_000);
        let (n, exact) = c.count_text_capped(Encoding::O200kBase, &text, 100);
        assert!(!exact);
        assert!(n > 100);
        let (n2, exact2) = c.count_text_capped(Encoding::O200kBase, "word word", 100);
        assert!(exact2);
        assert_eq!(n2, 2);
    }

    /// A text too long to fit even at the longest token per piece (and longer than the probe)
    /// is refused uncounted, with a lower bound that the exact count never undercuts.
    #[test]
    fn the_longest_token_bounds_a_count_from_below() {
        let c = Counter::new(Encoding::O200kBase).unwrap();
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let longest = c.bpe(enc).longest_token();
            assert!((16..=1024).contains(&longest), "{enc:?}: {longest}");
            let texts = [
                "a".repeat(50_000),
                " ".repeat(20_000),
                "-".repeat(20_000),
                "=".repeat(20_000),
                "日本語のテキスト".repeat(2_000),
                "🦀 ".repeat(5_000),
                "fn main() { println!(\"hello\"); }\n".repeat(1_000),
            ];
            for t in &texts {
                let exact = c.count_text(enc, t);
                let floor = (t.len() as u64).div_ceil(longest as u64);
                assert!(exact >= floor, "{enc:?}: {exact} < {floor}");
                // Refused at once below the floor, counted exactly from it.
                assert_eq!(c.count_text_capped(enc, t, floor - 1), (floor, false));
                assert_eq!(c.count_text_capped(enc, t, exact), (exact, true));
            }
        }
    }
}
