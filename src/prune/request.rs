//! A parsed chat body that keeps the bytes it was parsed from: the top level as an ordered
//! list of `(key, span of its raw value)` and each message as the span of its raw JSON, so
//! that fields ctxgate does not know, and messages it does not change, are re-emitted byte for
//! byte and in order. Also the per-message facts pruning needs (role, tool calls, tool
//! results).
//!
//! A conversation's request N+1 repeats request N's body byte for byte and adds a few
//! messages. [`Layout`] is what the conversation view keeps of request N (offsets and chained
//! hashes, not bytes); [`ChatRequest::parse_after`] checks the new body against it (one hash
//! pass over the unchanged part, no parse) and parses only what follows, so a warm request
//! costs what its new turn costs, not what the whole conversation does.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::dialect::Dialect;
use crate::prune::tokens::{
    func_init, model_encoding, Counter, Encoding, REPLY_PRIMING, TOKENS_PER_MESSAGE,
};

/// Why a body is not a chat request ctxgate can prune.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The body is not valid JSON (or not UTF-8).
    #[error("body is not valid json: {0}")]
    Json(#[from] serde_json::Error),
    /// The body is JSON but not an object.
    #[error("body is not a json object")]
    NotObject,
    /// There is no `messages` field (Responses: `input`).
    #[error("body has no \"{0}\" field")]
    NoMessages(&'static str),
    /// `messages` (`input`) is not an array.
    #[error("\"{0}\" is not an array")]
    MessagesNotArray(&'static str),
    /// A message (an input item) is not an object.
    #[error("{0}[{1}] is not an object")]
    MessageNotObject(&'static str, usize),
}

/// Why a parsed request is forwarded as it came, unpruned (the record's `prune_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unprunable {
    /// A Responses `input` given as one string: there are no items to choose from.
    StringInput,
    /// A Responses request with `previous_response_id`: the server holds the history, the
    /// request carries only the new items.
    PreviousResponseId,
}

impl Unprunable {
    /// The record's `prune_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unprunable::StringInput => "string_input",
            Unprunable::PreviousResponseId => "previous_response_id",
        }
    }
}

/// A byte range of the body.
pub(crate) type Span = std::ops::Range<usize>;

/// One message of the request: where its raw JSON lies in the body, a fingerprint of those
/// bytes, its characters, and `chain`: a hash of every byte of the body up to its end, which
/// lets the next request of the conversation prove that it starts with the same bytes.
#[derive(Debug, Clone)]
pub(crate) struct RawMessage {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) fp: u64,
    pub(crate) chars: usize,
    pub(crate) chain: u64,
}

/// A top-level field: its key and where its raw value lies in the body (empty for the items
/// key, whose value is re-emitted from the messages).
#[derive(Debug, Clone)]
pub(crate) struct Field {
    key: Key,
    span: Span,
}

/// A top-level key: one of the names the three APIs define is held without an allocation (a
/// body's keys are read on every request, and a layout's are cloned into every warm one).
type Key = Cow<'static, str>;

/// Top-level request fields of the chat, Messages and Responses APIs, the names a body is
/// made of in practice.
const KNOWN_KEYS: [&str; 44] = [
    "model",
    "messages",
    "input",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "stop_sequences",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "system",
    "instructions",
    "metadata",
    "user",
    "store",
    "stream_options",
    "response_format",
    "reasoning",
    "reasoning_effort",
    "thinking",
    "text",
    "include",
    "previous_response_id",
    "seed",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "truncation",
    "modalities",
    "context_management",
    "mcp_servers",
];

/// `k` as a [`Key`]: borrowed from [`KNOWN_KEYS`] when it is one of them.
fn intern(k: Cow<'_, str>) -> Key {
    match KNOWN_KEYS.iter().find(|&&known| known == k) {
        Some(&known) => Cow::Borrowed(known),
        None => Cow::Owned(k.into_owned()),
    }
}

/// Where a body's parts lie: the top-level fields before the items array, the messages, and
/// the hashes that let a later body of the same conversation be checked against them. What a
/// conversation view keeps of a request so that the next one parses only what is new
/// ([`ChatRequest::parse_after`]): offsets and hashes, never the bytes themselves.
#[derive(Debug)]
pub struct Layout {
    dialect: Dialect,
    /// The body up to the first message's first byte (the fields before the items key, the
    /// key, `[`).
    head_end: usize,
    head_hash: u64,
    /// The fields before the items key, in order.
    head_fields: Vec<Field>,
    pub(crate) messages: Vec<RawMessage>,
}

impl Layout {
    /// Approximate bytes held.
    pub(crate) fn weight(&self) -> usize {
        64 + self.messages.len() * std::mem::size_of::<RawMessage>()
            + self
                .head_fields
                .iter()
                .map(|f| f.key.len() + 40)
                .sum::<usize>()
    }

    /// A checker that reads a new body as it arrives (frame by frame) and tells how much of
    /// it repeats the body this layout was taken from.
    pub fn verifier(self: &Arc<Layout>) -> Verifier {
        Verifier {
            layout: Arc::clone(self),
            hasher: Xxh3::with_seed(CHAIN_SEED),
            pos: 0,
            segment: 0,
            head: false,
            matched: 0,
            failed: self.head_end == usize::MAX,
        }
    }
}

/// Checks a body against a [`Layout`] as its bytes arrive, so the hashing is done while the
/// body is still being received: at each of the layout's boundaries (the end of the head,
/// then of each message) the hash chained over the bytes so far must equal the layout's.
/// Stops at the first difference. [`Verifier::finish`] gives what
/// [`ChatRequest::parse_resumed`] needs.
pub struct Verifier {
    layout: Arc<Layout>,
    hasher: Xxh3,
    /// Bytes fed so far.
    pos: usize,
    /// The boundary being hashed towards: 0 the head's end, `k + 1` message `k`'s end.
    segment: usize,
    head: bool,
    matched: usize,
    failed: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("pos", &self.pos)
            .field("matched", &self.matched)
            .field("failed", &self.failed)
            .finish()
    }
}

impl Verifier {
    fn boundary(&self) -> Option<(usize, u64)> {
        let l = &self.layout;
        match self.segment {
            0 => Some((l.head_end, l.head_hash)),
            k => l.messages.get(k - 1).map(|m| (m.end, m.chain)),
        }
    }

    /// Whether the body already differs from the layout's.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Length of the body the layout was taken from (up to its last message).
    pub fn previous_len(&self) -> usize {
        self.layout.messages.last().map_or(0, |m| m.end)
    }

    /// Feeds the body's next bytes.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !self.failed && !chunk.is_empty() {
            let Some((end, want)) = self.boundary() else {
                self.pos += chunk.len();
                return; // every message of the layout matched: the rest is new
            };
            let take = (end - self.pos).min(chunk.len());
            self.hasher.update(&chunk[..take]);
            self.pos += take;
            chunk = &chunk[take..];
            if self.pos == end {
                let got = self.hasher.digest();
                if got != want {
                    self.failed = true;
                    return;
                }
                if self.segment == 0 {
                    self.head = true;
                } else {
                    self.matched += 1;
                }
                self.segment += 1;
                self.hasher = Xxh3::with_seed(got);
            }
        }
    }

    /// Bytes of a body of `len` bytes left to parse after what was found to repeat the
    /// layout's body (all of it when even the top level before the messages differs).
    pub fn fresh_bytes(&self, len: usize) -> usize {
        if !self.head {
            return len;
        }
        let known = match self.matched {
            0 => self.layout.head_end,
            k => self.layout.messages[k - 1].end,
        };
        len.saturating_sub(known)
    }

    /// How many leading messages of the body fed are byte for byte those of the layout's
    /// body, with everything before them: `None` when the top level before the first
    /// message differs.
    pub fn finish(self) -> (Arc<Layout>, Option<usize>) {
        let k = self.head.then_some(self.matched);
        (self.layout, k)
    }
}

/// Seed of the chained body hashes.
const CHAIN_SEED: u64 = 0x6374_7867_6174_6531;

/// A parsed chat body (OpenAI chat completions, Responses or Anthropic Messages). It holds
/// the body itself (shared, not copied) and the spans of its parts, so fields ctxgate does
/// not know and messages it does not change are re-emitted byte for byte and in order.
#[derive(Debug)]
pub struct ChatRequest {
    dialect: Dialect,
    body: Bytes,
    fields: Vec<Field>,
    messages_at: usize,
    /// The messages, and how the body's parts lie (kept by the conversation view).
    layout: Option<Arc<Layout>>,
    model: Option<String>,
    max_output: Option<u64>,
    stream: bool,
    /// A Responses `input` given as a string.
    input_text: Option<String>,
    unprunable: Option<Unprunable>,
    /// Leading messages taken from an earlier body's layout instead of being parsed.
    reused: usize,
}

impl ChatRequest {
    /// Parses a chat body (copying it once). Unknown fields are kept, raw and in order.
    pub fn parse(dialect: Dialect, body: &[u8]) -> Result<ChatRequest, ParseError> {
        ChatRequest::parse_bytes(dialect, Bytes::copy_from_slice(body))
    }

    /// Parses a chat body without copying it.
    pub fn parse_bytes(dialect: Dialect, body: Bytes) -> Result<ChatRequest, ParseError> {
        let key = dialect.items_key();
        let mut de = serde_json::Deserializer::from_slice(&body);
        let top = TopLevel::parse(&mut de, key)?;
        de.end()?;
        let fields = top.fields.ok_or(ParseError::NotObject)?;
        let messages_at = fields
            .iter()
            .rposition(|(k, _)| k == key)
            .ok_or(ParseError::NoMessages(key))?;
        let base = body.as_ptr() as usize;
        let span = |r: &str| {
            let s = (r.as_ptr() as usize).saturating_sub(base);
            s..s + r.len()
        };
        let mut input_text = None;
        let list = match top.items {
            Items::List(list) => list,
            Items::Text(t) if dialect == Dialect::Responses => {
                input_text = Some(t);
                Vec::new()
            }
            _ => return Err(ParseError::MessagesNotArray(key)),
        };
        let mut messages = Vec::with_capacity(list.len());
        for (i, raw) in list.iter().enumerate() {
            messages.push(raw_message(key, i, span(raw.get()), raw.get())?);
            crate::pace::pace_by(8);
        }
        let fields: Vec<Field> = fields
            .iter()
            .map(|(k, v)| Field {
                key: k.clone(),
                span: v.map_or(0..0, |v| span(v.get())),
            })
            .collect();
        // A layout (for the next request of the conversation) when the items key is there
        // once and holds at least one message: the head is everything before the first one.
        let once = fields.iter().filter(|f| f.key == key).count() == 1;
        let layout = match messages.first() {
            Some(first) if once => {
                let head_end = first.start;
                let mut h = xxh3_64_with_seed(&body[..head_end], CHAIN_SEED);
                let head_hash = h;
                let mut at = head_end;
                for m in &mut messages {
                    h = xxh3_64_with_seed(&body[at..m.end], h);
                    m.chain = h;
                    at = m.end;
                    crate::pace::pace_by(2);
                }
                Layout {
                    dialect,
                    head_end,
                    head_hash,
                    head_fields: fields[..messages_at].to_vec(),
                    messages,
                }
            }
            _ => Layout {
                dialect,
                head_end: usize::MAX,
                head_hash: 0,
                head_fields: Vec::new(),
                messages,
            },
        };
        drop(list);
        drop(de);
        ChatRequest::build(dialect, body, fields, messages_at, layout, input_text, 0)
    }

    /// Parses a body of a conversation whose previous body had `prev`'s layout: the leading
    /// messages (and the fields before them) that are byte for byte the same are taken from
    /// the layout, and only what follows them is parsed. The result is the same as
    /// [`ChatRequest::parse_bytes`] gives; anything unusual (the top level before the
    /// messages changed, the items key repeated after them) falls back to it.
    pub fn parse_after(
        dialect: Dialect,
        body: Bytes,
        prev: &Arc<Layout>,
    ) -> Result<ChatRequest, ParseError> {
        let mut v = prev.verifier();
        v.feed(&body);
        ChatRequest::parse_resumed(dialect, body, v)
    }

    /// [`ChatRequest::parse_after`] for a body already fed to `verifier` (as it arrived).
    pub fn parse_resumed(
        dialect: Dialect,
        body: Bytes,
        verifier: Verifier,
    ) -> Result<ChatRequest, ParseError> {
        let (prev, k) = verifier.finish();
        let Some(k) = k.filter(|_| prev.dialect == dialect) else {
            return ChatRequest::parse_bytes(dialect, body);
        };
        match ChatRequest::resume(dialect, body.clone(), &prev, k) {
            Some(r) => Ok(r),
            None => ChatRequest::parse_bytes(dialect, body),
        }
    }

    /// Parses what follows the first `k` messages of `prev` (the caller checked that the body
    /// holds them, byte for byte): the rest of the items array and of the top level, as the
    /// JSON text `{"KEY":[`, then `null` when `k > 0` (standing for the messages already
    /// known), then the body's tail. `None` when that tail is not a clean continuation (a
    /// parse error is then reported by the full parse, in its own words).
    fn resume(dialect: Dialect, body: Bytes, prev: &Layout, k: usize) -> Option<ChatRequest> {
        let key = dialect.items_key();
        let at = if k == 0 {
            prev.head_end
        } else {
            prev.messages[k - 1].end
        };
        let mut text = Vec::with_capacity(body.len() - at + key.len() + 12);
        text.extend_from_slice(b"{");
        write_json_string(&mut text, key);
        text.extend_from_slice(if k == 0 { b":[" } else { b":[null" });
        let lead = text.len();
        text.extend_from_slice(&body[at..]);
        let mut de = serde_json::Deserializer::from_slice(&text);
        let top = TopLevel::parse(&mut de, key).ok()?;
        de.end().ok()?;
        let tail_fields = top.fields?;
        if tail_fields.iter().filter(|(f, _)| f == key).count() != 1 {
            return None;
        }
        let Items::List(list) = top.items else {
            return None;
        };
        let base = text.as_ptr() as usize;
        // A span of `text` as a span of the body.
        let span = |r: &str| {
            let s = (r.as_ptr() as usize).saturating_sub(base) + at - lead;
            s..s + r.len()
        };
        let mut messages = Vec::with_capacity(k + list.len());
        messages.extend_from_slice(&prev.messages[..k]);
        let mut h = messages.last().map_or(prev.head_hash, |m| m.chain);
        let mut end = at;
        for (i, raw) in list.iter().enumerate().skip(usize::from(k > 0)) {
            let idx = k + i - usize::from(k > 0);
            let mut m = raw_message(key, idx, span(raw.get()), raw.get()).ok()?;
            h = xxh3_64_with_seed(&body[end..m.end], h);
            m.chain = h;
            end = m.end;
            messages.push(m);
        }
        if messages.is_empty() {
            return None;
        }
        let mut fields = prev.head_fields.clone();
        let messages_at = fields.len();
        for (f, v) in &tail_fields {
            fields.push(Field {
                key: f.clone(),
                span: v.map_or(0..0, |v| span(v.get())),
            });
        }
        let layout = Layout {
            dialect,
            head_end: prev.head_end,
            head_hash: prev.head_hash,
            head_fields: prev.head_fields.clone(),
            messages,
        };
        drop(list);
        drop(de);
        ChatRequest::build(dialect, body, fields, messages_at, layout, None, k).ok()
    }

    fn build(
        dialect: Dialect,
        body: Bytes,
        fields: Vec<Field>,
        messages_at: usize,
        layout: Layout,
        input_text: Option<String>,
        reused: usize,
    ) -> Result<ChatRequest, ParseError> {
        let mut req = ChatRequest {
            dialect,
            body,
            fields,
            messages_at,
            layout: Some(Arc::new(layout)),
            model: None,
            max_output: None,
            stream: false,
            unprunable: input_text.as_ref().map(|_| Unprunable::StringInput),
            input_text,
            reused,
        };
        // Read as their types, not through a `Value`: these are read on every request.
        req.model = req.field_as::<Str>("model").map(|Str(m)| m.into_owned());
        req.max_output = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| req.field_as::<u64>(k));
        req.stream = req.field_as::<bool>("stream").unwrap_or(false);
        if dialect == Dialect::Responses
            && req
                .raw_field("previous_response_id")
                .is_some_and(|v| v != b"null")
        {
            req.unprunable = Some(Unprunable::PreviousResponseId);
        }
        Ok(req)
    }

    /// Everything a parse yields, as comparable values: the fields (key, raw bytes), the
    /// messages (raw bytes, fingerprint, characters, chained hash), the scalar facts and the
    /// items key's place. Two parses of one body must give the same parts, however they ran
    /// (the tests and the `resume` fuzz target check it).
    #[doc(hidden)]
    #[allow(clippy::type_complexity)]
    pub fn parts(
        &self,
    ) -> (
        Vec<(String, Vec<u8>)>,
        Vec<(Vec<u8>, u64, usize, u64)>,
        (Option<String>, Option<u64>, bool, Option<Unprunable>, usize),
        Option<(usize, u64)>,
    ) {
        let fields = self
            .fields
            .iter()
            .map(|f| (f.key.to_string(), self.body[f.span.clone()].to_vec()))
            .collect();
        let msgs = (0..self.message_count())
            .map(|i| {
                let m = &self.messages()[i];
                (self.raw(i).to_vec(), m.fp, m.chars, m.chain)
            })
            .collect();
        let facts = (
            self.model.clone(),
            self.max_output,
            self.stream,
            self.unprunable,
            self.messages_at,
        );
        let head = self.layout().map(|l| (l.head_end, l.head_hash));
        (fields, msgs, facts, head)
    }

    /// The messages (raw spans and their facts).
    pub(crate) fn messages(&self) -> &[RawMessage] {
        self.layout.as_ref().map_or(&[], |l| &l.messages)
    }

    /// The raw JSON of message `i`.
    pub(crate) fn raw(&self, i: usize) -> &[u8] {
        let m = &self.messages()[i];
        &self.body[m.start..m.end]
    }

    /// The body's layout, for the conversation view: `None` when it cannot be resumed from.
    pub fn layout(&self) -> Option<Arc<Layout>> {
        self.layout
            .as_ref()
            .filter(|l| l.head_end != usize::MAX)
            .cloned()
    }

    /// Leading messages taken from the previous body's layout rather than parsed.
    pub fn reused_messages(&self) -> usize {
        self.reused
    }

    /// Bytes of the body after the messages taken from the previous body's layout: what this
    /// request costs to parse, count and prune (the whole body when nothing was reused).
    pub fn fresh_bytes(&self) -> usize {
        match self.reused {
            0 => self.body.len(),
            k => self.body.len() - self.messages()[k - 1].end,
        }
    }

    /// The body as received.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Why this request is forwarded unpruned whatever its size, if it is.
    pub fn unprunable(&self) -> Option<Unprunable> {
        self.unprunable
    }

    /// The dialect the body was parsed as.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The `model` field.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// `max_completion_tokens`, else `max_tokens`.
    pub fn max_output_tokens(&self) -> Option<u64> {
        self.max_output
    }

    /// Whether `stream` is true.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// Number of entries in `messages`.
    pub fn message_count(&self) -> usize {
        self.messages().len()
    }

    /// Length of the body parsed, in bytes.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// A string (or number / bool, as text) at a dotted path, e.g.
    /// `"metadata.conversation_id"` or `"user"`.
    pub fn field_str(&self, dotted_path: &str) -> Option<String> {
        let mut parts = dotted_path.split('.');
        let first = parts.next()?;
        let mut v = self.field_value(first)?;
        for p in parts {
            v = match v {
                Value::Object(mut m) => m.swap_remove(p)?,
                Value::Array(mut a) => {
                    let i: usize = p.parse().ok()?;
                    if i >= a.len() {
                        return None;
                    }
                    a.swap_remove(i)
                }
                _ => return None,
            };
        }
        match v {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// A stable hex id for a conversation that carries no id: a hash of the route, the
    /// system prompt and the first user message's content (which do not change as the
    /// conversation grows).
    pub fn fingerprint(&self, route: &str) -> String {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(route.as_bytes());
        buf.push(0);
        for k in ["system", "instructions"] {
            if let Some(sys) = self.raw_field(k) {
                buf.extend_from_slice(sys);
            }
        }
        buf.push(0);
        if let Some(t) = &self.input_text {
            buf.extend_from_slice(t.as_bytes());
        }
        for i in 0..self.message_count() {
            let raw = self.raw(i);
            let Ok(v) = serde_json::from_slice::<Value>(raw) else {
                continue;
            };
            let role = v.get("role").and_then(Value::as_str).unwrap_or("");
            if matches!(role, "system" | "developer") {
                buf.extend_from_slice(raw);
                buf.push(0);
                continue;
            }
            if role == "user" {
                let content = v.get("content").map(Value::to_string).unwrap_or_default();
                buf.extend_from_slice(content.as_bytes());
                break;
            }
        }
        format!("{:016x}{:016x}", hash64(&buf, 1), hash64(&buf, 2))
    }

    /// The encoding for this request: by model (OpenAI), else `fallback`.
    pub(crate) fn encoding(&self, counter: &Counter, fallback: Encoding) -> Encoding {
        match (self.dialect, self.model()) {
            (Dialect::OpenAi | Dialect::Responses, Some(m)) => {
                model_encoding(m).unwrap_or(fallback)
            }
            _ => {
                let _ = counter;
                fallback
            }
        }
    }

    /// The raw JSON of the last top-level field named `key`.
    pub(crate) fn raw_field(&self, key: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .rev()
            .find(|f| f.key == key)
            .map(|f| &self.body[f.span.clone()])
    }

    /// The last top-level field named `key`, when it is a `T`.
    fn field_as<'a, T: Deserialize<'a>>(&'a self, key: &str) -> Option<T> {
        self.raw_field(key)
            .and_then(|r| serde_json::from_slice(r).ok())
    }

    fn field_value(&self, key: &str) -> Option<Value> {
        self.field_as(key)
    }

    /// A hash of what [`ChatRequest::fixed_tokens`] counts besides leading system messages:
    /// tools, functions, Anthropic `system`, Responses `instructions`.
    pub(crate) fn fixed_fp(&self) -> u64 {
        let mut h = 0u64;
        for k in FIXED_FIELDS {
            if let Some(r) = self.raw_field(k) {
                h = h.rotate_left(7) ^ hash64(r, 3);
            }
        }
        h
    }

    /// The bytes [`ChatRequest::fixed_fp`] hashes, joined by a byte that JSON text never holds
    /// (0xFF), with each field's name: what a memoised count of the fixed part is checked
    /// against.
    pub(crate) fn fixed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for k in FIXED_FIELDS {
            if let Some(r) = self.raw_field(k) {
                out.extend_from_slice(k.as_bytes());
                out.push(0xFF);
                out.extend_from_slice(r);
                out.push(0xFF);
            }
        }
        out
    }

    /// Tokens of the parts that are never pruned: tool / function definitions, Anthropic
    /// `system`, reply priming, plus the first `system_msgs` messages.
    pub(crate) fn fixed_tokens(&self, counter: &Counter, enc: Encoding, system_msgs: usize) -> u64 {
        self.fixed_extra_tokens(counter, enc)
            + self.system_message_tokens(counter, enc, system_msgs)
    }

    pub(crate) fn fixed_extra_tokens(&self, counter: &Counter, enc: Encoding) -> u64 {
        let mut total = REPLY_PRIMING;
        for k in ["tools", "functions"] {
            if let Some(v) = self.field_value(k) {
                total += counter.count_tools(enc, func_init(enc), &v);
            }
        }
        if let Some((_, v)) = self.system_field() {
            total += self.system_field_tokens(counter, enc, &v);
        }
        if let Some(t) = &self.input_text {
            total += TOKENS_PER_MESSAGE + 1 + counter.count_text(enc, t);
        }
        total
    }

    /// The top-level field that holds the system prompt, with its value: Anthropic `system`,
    /// Responses `instructions` (a string).
    pub(crate) fn system_field(&self) -> Option<(&'static str, Value)> {
        let key = match self.dialect {
            Dialect::Anthropic => "system",
            Dialect::Responses => "instructions",
            Dialect::OpenAi => return None,
        };
        let v = self.field_value(key)?;
        match (self.dialect, &v) {
            (Dialect::Responses, Value::String(_)) | (Dialect::Anthropic, _) => Some((key, v)),
            _ => None,
        }
    }

    /// Tokens of a value of [`ChatRequest::system_field`] (`instructions` is a system message
    /// ahead of the input).
    pub(crate) fn system_field_tokens(&self, counter: &Counter, enc: Encoding, v: &Value) -> u64 {
        match (self.dialect, v) {
            (Dialect::Responses, Value::String(s)) => {
                TOKENS_PER_MESSAGE + 1 + counter.count_text(enc, s)
            }
            (Dialect::Responses, _) => 0,
            _ => counter.count_value(enc, self.dialect, v),
        }
    }

    fn system_message_tokens(&self, counter: &Counter, enc: Encoding, n: usize) -> u64 {
        (0..n.min(self.message_count()))
            .map(|i| self.count_message(counter, enc, i, u64::MAX).0)
            .sum()
    }

    /// Tokens of message `i`, stopping early past `cap`.
    pub(crate) fn count_message(
        &self,
        counter: &Counter,
        enc: Encoding,
        i: usize,
        cap: u64,
    ) -> (u64, bool) {
        let raw = self.raw(i);
        match serde_json::from_slice::<Value>(raw) {
            Ok(v) => counter.count_message(enc, self.dialect, &v, cap),
            Err(_) => (crate::prune::tokens::estimate_bytes(raw.len()), false),
        }
    }

    /// Re-emits the body with `messages` replaced by `messages` (raw JSON values, in
    /// order) and, optionally, one other top-level field replaced. Other fields keep their
    /// raw bytes and order.
    pub(crate) fn serialise<'a>(
        &self,
        mut messages: impl Iterator<Item = &'a [u8]>,
        replace: Option<(&str, &str)>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len());
        out.push(b'{');
        for (i, f) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, &f.key);
            out.push(b':');
            if i == self.messages_at {
                out.push(b'[');
                for (j, m) in messages.by_ref().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(m);
                }
                out.push(b']');
                continue;
            }
            match replace {
                Some((rk, rv)) if rk == f.key => out.extend_from_slice(rv.as_bytes()),
                // An earlier copy of the items key (JSON lets a key repeat; the last one
                // counts): its items were never kept, so it goes out as an empty array.
                _ if f.span.is_empty() => out.extend_from_slice(b"[]"),
                _ => out.extend_from_slice(&self.body[f.span.clone()]),
            }
        }
        out.push(b'}');
        out
    }
}

/// A message's facts from its raw JSON (`span` in the body): not an object → an error.
fn raw_message(
    key: &'static str,
    i: usize,
    span: Span,
    raw: &str,
) -> Result<RawMessage, ParseError> {
    if !raw.starts_with('{') {
        return Err(ParseError::MessageNotObject(key, i));
    }
    Ok(RawMessage {
        start: span.start,
        end: span.end,
        fp: hash64(raw.as_bytes(), 0x5eed),
        chars: count_chars(raw),
        chain: 0,
    })
}

/// Top-level fields counted as the fixed part beside the messages.
const FIXED_FIELDS: [&str; 4] = ["tools", "functions", "system", "instructions"];

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    match serde_json::to_string(s) {
        Ok(q) => out.extend_from_slice(q.as_bytes()),
        Err(_) => out.extend_from_slice(b"\"\""),
    }
}

/// The top level of a body: `Some(fields)` for an object, `None` for any other JSON value;
/// the last value under the items key (`messages`, or Responses `input`), when an array,
/// comes split into its elements (its raw value in `fields` is then `None`: the items are
/// re-emitted from the elements). Values borrow from the body: nothing is copied.
struct TopLevel<'de> {
    fields: Option<Vec<(Key, Option<&'de RawValue>)>>,
    items: Items<'de>,
}

/// The items value: an array split into raw elements in the same scan, a string (a Responses
/// `input` may be one), or something else.
enum Items<'de> {
    List(Vec<&'de RawValue>),
    Text(String),
    Other,
}

impl<'de> TopLevel<'de> {
    fn parse<D: Deserializer<'de>>(d: D, key: &'static str) -> Result<TopLevel<'de>, D::Error> {
        de::DeserializeSeed::deserialize(TopSeed(key), d)
    }

    const NOT_OBJECT: TopLevel<'de> = TopLevel {
        fields: None,
        items: Items::Other,
    };
}

struct TopSeed(&'static str);

impl<'de> de::DeserializeSeed<'de> for TopSeed {
    type Value = TopLevel<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<TopLevel<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed {
    type Value = TopLevel<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel<'de>, A::Error> {
        let mut fields = Vec::new();
        let mut items = Items::Other;
        while let Some(Str(k)) = map.next_key::<Str<'de>>()? {
            let k = intern(k);
            if k == self.0 {
                items = map.next_value::<Items<'de>>()?;
                fields.push((k, None));
                continue;
            }
            let v: &'de RawValue = map.next_value()?;
            fields.push((k, Some(v)));
        }
        Ok(TopLevel {
            fields: Some(fields),
            items,
        })
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel<'de>, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<TopLevel<'de>, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TopLevel<'de>, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<TopLevel<'de>, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<TopLevel<'de>, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TopLevel<'de>, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_unit<E: de::Error>(self) -> Result<TopLevel<'de>, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
}

impl<'de> Deserialize<'de> for Items<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Items<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a json value")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Items<'de>, A::Error> {
                let mut list = Vec::new();
                while let Some(m) = seq.next_element::<&'de RawValue>()? {
                    list.push(m);
                    crate::pace::pace_by(16);
                }
                Ok(Items::List(list))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Items<'de>, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Items::Other)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Items<'de>, E> {
                Ok(Items::Text(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Items<'de>, E> {
                Ok(Items::Text(s))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// What pruning needs to know about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    /// `system` or `developer`.
    pub(crate) system: bool,
    /// `role` is `user`.
    pub(crate) user: bool,
    /// A user message that opens a turn (not only tool results).
    pub(crate) genuine_user: bool,
    /// Tool call ids this message makes (OpenAI `tool_calls[].id`, Anthropic `tool_use`).
    pub(crate) calls: Vec<String>,
    /// Tool call ids this message answers (`tool_call_id`, Anthropic `tool_result`).
    pub(crate) answers: Vec<String>,
    /// Legacy `function_call` in an assistant message.
    pub(crate) legacy_call: bool,
    /// Legacy `function` role result.
    pub(crate) legacy_result: bool,
    /// Stays with the item after it (a Responses `reasoning` item: the API refuses a
    /// reasoning item without the item that follows it, and that item without it).
    pub(crate) joins_next: bool,
}

/// A message read for its facts: a parsed [`Value`], or a [`Flat`] one (every field a string).
trait Fields {
    fn str_at(&self, key: &str) -> Option<&str>;
    /// The array under `key` (never for a flat message).
    fn array_at(&self, key: &str) -> Option<&Vec<Value>>;
    /// Whether `key` is there and not `null`.
    fn present(&self, key: &str) -> bool;
}

impl Fields for Value {
    fn str_at(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    fn array_at(&self, key: &str) -> Option<&Vec<Value>> {
        self.get(key).and_then(Value::as_array)
    }
    fn present(&self, key: &str) -> bool {
        self.get(key).is_some_and(|f| !f.is_null())
    }
}

impl Fields for Flat<'_> {
    fn str_at(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
    fn array_at(&self, _: &str) -> Option<&Vec<Value>> {
        None
    }
    fn present(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// A message object whose every field is a string — a plain text message, a tool result
/// with text content —, its fields borrowed from the body in their order. Its facts and its
/// count need no [`Value`]: a new message of this shape (most of them) costs no tree of
/// allocations, which a body of thousands of small messages paid mostly to `malloc`.
#[derive(Debug)]
pub(crate) struct Flat<'a> {
    fields: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Flat<'a> {
    /// The message's fields, if it is an object of at most [`MAX_FLAT_FIELDS`] strings with
    /// no key twice (`None` for anything else: the caller parses a [`Value`]).
    pub(crate) fn parse(raw: &'a [u8]) -> Option<Flat<'a>> {
        serde_json::from_slice(raw).ok()
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// The fields in the body's order.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }
}

/// Most fields a flat message has (a message has a handful; more go through a `Value`, so
/// that the check for a repeated key, quadratic in the fields, stays bounded).
const MAX_FLAT_FIELDS: usize = 16;

/// A string borrowed from the body when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Flat<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Flat<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Flat<'de>, A::Error> {
                let mut fields = Vec::with_capacity(4);
                // A value that is not a string ends the parse with an error: not flat.
                while let Some((Str(k), Str(v))) = map.next_entry::<Str<'de>, Str<'de>>()? {
                    if fields.len() == MAX_FLAT_FIELDS {
                        return Err(de::Error::custom("too many fields for a flat message"));
                    }
                    // A key twice: a `Value` keeps the last one, in the first one's place.
                    if fields.iter().any(|(j, _)| *j == k) {
                        return Err(de::Error::custom("a key twice"));
                    }
                    fields.push((k, v));
                }
                Ok(Flat { fields })
            }
        }
        d.deserialize_map(V)
    }
}

impl Meta {
    pub(crate) fn of(dialect: Dialect, v: &Value) -> Meta {
        Meta::of_fields(dialect, v)
    }

    /// The facts of a flat message: the same as [`Meta::of`] its parsed [`Value`].
    pub(crate) fn of_flat(dialect: Dialect, f: &Flat<'_>) -> Meta {
        Meta::of_fields(dialect, f)
    }

    fn of_fields(dialect: Dialect, v: &impl Fields) -> Meta {
        let role = v.str_at("role").unwrap_or("");
        let mut m = Meta {
            system: matches!(role, "system" | "developer"),
            user: role == "user",
            genuine_user: false,
            calls: Vec::new(),
            answers: Vec::new(),
            legacy_call: false,
            legacy_result: false,
            joins_next: false,
        };
        match dialect {
            Dialect::Responses => m.responses_item(v),
            Dialect::OpenAi => {
                m.genuine_user = m.user;
                if let Some(calls) = v.array_at("tool_calls") {
                    for c in calls {
                        if let Some(id) = c.get("id").and_then(Value::as_str) {
                            m.calls.push(id.to_string());
                        }
                    }
                }
                if let Some(id) = v.str_at("tool_call_id") {
                    m.answers.push(id.to_string());
                }
                m.legacy_call = v.present("function_call");
                m.legacy_result = role == "function";
            }
            Dialect::Anthropic => {
                if let Some(blocks) = v.array_at("content") {
                    for b in blocks {
                        match b.get("type").and_then(Value::as_str) {
                            Some("tool_use") | Some("server_tool_use") => {
                                if let Some(id) = b.get("id").and_then(Value::as_str) {
                                    m.calls.push(id.to_string());
                                }
                            }
                            Some("tool_result") => {
                                if let Some(id) = b.get("tool_use_id").and_then(Value::as_str) {
                                    m.answers.push(id.to_string());
                                }
                            }
                            _ => {}
                        }
                    }
                }
                // A user message that answers tool calls continues the turn, even with text
                // beside the results (Claude Code adds <system-reminder> notes there): it is
                // not a new task, and it cannot open the kept history (its calls precede it).
                m.genuine_user = m.user && m.answers.is_empty();
            }
        }
        m
    }

    /// A Responses `input` item: a message (with or without `"type": "message"`), a tool call
    /// with a `call_id` (`function_call`, `custom_tool_call`, `local_shell_call`,
    /// `computer_call`, `shell_call`, `apply_patch_call`, …), the output answering it (the same
    /// type with `_output`), an MCP approval request and its response, a `reasoning` item, or
    /// something self-contained (`mcp_call`, `web_search_call`, `compaction`, …).
    fn responses_item(&mut self, v: &impl Fields) {
        let ty = v.str_at("type").unwrap_or("message");
        let str_at = |k: &str| v.str_at(k).map(str::to_string);
        match ty {
            "message" => self.genuine_user = self.user,
            "reasoning" => self.joins_next = true,
            "mcp_approval_request" => self.calls.extend(str_at("id")),
            "mcp_approval_response" => self.answers.extend(str_at("approval_request_id")),
            t if t.ends_with("_call_output") => self
                .answers
                .extend(str_at("call_id").or_else(|| str_at("id"))),
            t if t.ends_with("_call") => self.calls.extend(str_at("call_id")),
            _ => {}
        }
        // Only messages have roles that pin or open turns.
        if ty != "message" {
            self.system = false;
            self.user = false;
        }
    }
}

/// A fast, deterministic 64-bit hash (stable across processes and versions of Rust, unlike
/// `DefaultHasher`): 8 bytes at a time, multiply-xorshift mixing.
pub(crate) fn hash64(bytes: &[u8], seed: u64) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K);
        h ^= h >> 29;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    h ^= h >> 32;
    h = h.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^ (h >> 32)
}

/// Unicode scalar values in `s`, counted from the bytes (fast).
pub(crate) fn count_chars(s: &str) -> usize {
    // The standard library's count reads a word at a time: a byte-wise filter over a cold
    // 20 MB body was 13% of its CPU.
    s.chars().count()
}
