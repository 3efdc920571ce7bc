//! A parsed chat body that keeps the bytes it was parsed from: the top level as an ordered
//! list of `(key, raw value)` and each message as its own raw JSON, so that fields ctxgate
//! does not know, and messages it does not change, are re-emitted byte for byte and in
//! order. Also the per-message facts pruning needs (role, tool calls, tool results).

use std::fmt;

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

/// One message of the request: its raw JSON and a fingerprint of those bytes.
#[derive(Debug)]
pub(crate) struct RawMessage {
    pub(crate) raw: Box<RawValue>,
    pub(crate) fp: u64,
    pub(crate) chars: usize,
}

/// A parsed chat body (OpenAI chat completions or Anthropic Messages).
#[derive(Debug)]
pub struct ChatRequest {
    dialect: Dialect,
    fields: Vec<(String, Box<RawValue>)>,
    messages_at: usize,
    pub(crate) messages: Vec<RawMessage>,
    model: Option<String>,
    max_output: Option<u64>,
    stream: bool,
    body_len: usize,
    /// A Responses `input` given as a string.
    input_text: Option<String>,
    unprunable: Option<Unprunable>,
}

impl ChatRequest {
    /// Parses a chat body. Unknown fields are kept, raw and in order.
    pub fn parse(dialect: Dialect, body: &[u8]) -> Result<ChatRequest, ParseError> {
        let key = dialect.items_key();
        let mut de = serde_json::Deserializer::from_slice(body);
        let top = TopLevel::parse(&mut de, key)?;
        de.end()?;
        let fields = top.fields.ok_or(ParseError::NotObject)?;
        let messages_at = fields
            .iter()
            .rposition(|(k, _)| k == key)
            .ok_or(ParseError::NoMessages(key))?;
        // The visitor already split the last `messages` array (one scan of the body).
        let (list, input_text) = match top.items {
            Items::List(list) => (list, None),
            Items::Text(t) if dialect == Dialect::Responses => (Vec::new(), Some(t)),
            _ => return Err(ParseError::MessagesNotArray(key)),
        };
        let mut messages = Vec::with_capacity(list.len());
        for (i, raw) in list.into_iter().enumerate() {
            if !raw.get().starts_with('{') {
                return Err(ParseError::MessageNotObject(key, i));
            }
            let fp = hash64(raw.get().as_bytes(), 0x5eed);
            let chars = count_chars(raw.get());
            messages.push(RawMessage { raw, fp, chars });
        }
        let mut req = ChatRequest {
            dialect,
            fields,
            messages_at,
            messages,
            model: None,
            max_output: None,
            stream: false,
            body_len: body.len(),
            unprunable: input_text.as_ref().map(|_| Unprunable::StringInput),
            input_text,
        };
        req.model = req
            .field_value("model")
            .and_then(|v| v.as_str().map(str::to_string));
        req.max_output = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| req.field_value(k).and_then(|v| v.as_u64()));
        req.stream = req
            .field_value("stream")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if dialect == Dialect::Responses
            && req
                .raw_field("previous_response_id")
                .is_some_and(|v| v.get() != "null")
        {
            req.unprunable = Some(Unprunable::PreviousResponseId);
        }
        Ok(req)
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
        self.messages.len()
    }

    /// Length of the body parsed, in bytes.
    pub fn body_len(&self) -> usize {
        self.body_len
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
                buf.extend_from_slice(sys.get().as_bytes());
            }
        }
        buf.push(0);
        if let Some(t) = &self.input_text {
            buf.extend_from_slice(t.as_bytes());
        }
        for m in &self.messages {
            let Ok(v) = serde_json::from_str::<Value>(m.raw.get()) else {
                continue;
            };
            let role = v.get("role").and_then(Value::as_str).unwrap_or("");
            if matches!(role, "system" | "developer") {
                buf.extend_from_slice(m.raw.get().as_bytes());
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

    pub(crate) fn raw_field(&self, key: &str) -> Option<&RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    fn field_value(&self, key: &str) -> Option<Value> {
        self.raw_field(key)
            .and_then(|r| serde_json::from_str(r.get()).ok())
    }

    /// A hash of what [`ChatRequest::fixed_tokens`] counts besides leading system messages:
    /// tools, functions, Anthropic `system`, Responses `instructions`.
    pub(crate) fn fixed_fp(&self) -> u64 {
        let mut h = 0u64;
        for k in FIXED_FIELDS {
            if let Some(r) = self.raw_field(k) {
                h = h.rotate_left(7) ^ hash64(r.get().as_bytes(), 3);
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
                out.extend_from_slice(r.get().as_bytes());
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
        (0..n.min(self.messages.len()))
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
        match serde_json::from_str::<Value>(self.messages[i].raw.get()) {
            Ok(v) => counter.count_message(enc, self.dialect, &v, cap),
            Err(_) => (
                crate::prune::tokens::estimate_bytes(self.messages[i].raw.get().len()),
                false,
            ),
        }
    }

    /// Re-emits the body with `messages` replaced by `messages` (raw JSON values, in
    /// order) and, optionally, one other top-level field replaced. Other fields keep their
    /// raw bytes and order.
    pub(crate) fn serialise<'a>(
        &self,
        mut messages: impl Iterator<Item = &'a str>,
        replace: Option<(&str, &str)>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body_len);
        out.push(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, k);
            out.push(b':');
            if i == self.messages_at {
                out.push(b'[');
                for (j, m) in messages.by_ref().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(m.as_bytes());
                }
                out.push(b']');
                continue;
            }
            push_field(&mut out, k, v, replace);
        }
        out.push(b'}');
        out
    }
}

/// Top-level fields counted as the fixed part beside the messages.
const FIXED_FIELDS: [&str; 4] = ["tools", "functions", "system", "instructions"];

fn push_field(out: &mut Vec<u8>, k: &str, v: &RawValue, replace: Option<(&str, &str)>) {
    match replace {
        Some((rk, rv)) if rk == k => out.extend_from_slice(rv.as_bytes()),
        _ => out.extend_from_slice(v.get().as_bytes()),
    }
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    match serde_json::to_string(s) {
        Ok(q) => out.extend_from_slice(q.as_bytes()),
        Err(_) => out.extend_from_slice(b"\"\""),
    }
}

/// The top level of a body: `Some(fields)` for an object, `None` for any other JSON value;
/// the last value under the items key (`messages`, or Responses `input`), when an array,
/// comes split into its elements (its raw value in `fields` is then not needed: the items are
/// re-emitted from the elements).
struct TopLevel {
    fields: Option<Vec<(String, Box<RawValue>)>>,
    items: Items,
}

/// The items value: an array split into raw elements in the same scan, a string (a Responses
/// `input` may be one), or something else.
enum Items {
    List(Vec<Box<RawValue>>),
    Text(String),
    Other,
}

impl TopLevel {
    fn parse<'de, D: Deserializer<'de>>(d: D, key: &'static str) -> Result<TopLevel, D::Error> {
        de::DeserializeSeed::deserialize(TopSeed(key), d)
    }
}

struct TopSeed(&'static str);

impl<'de> de::DeserializeSeed<'de> for TopSeed {
    type Value = TopLevel;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<TopLevel, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed {
    type Value = TopLevel;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
        let mut fields = Vec::new();
        let mut items = Items::Other;
        while let Some(k) = map.next_key::<String>()? {
            if k == self.0 {
                items = map.next_value::<Items>()?;
                fields.push((k, empty_raw()));
                continue;
            }
            let v: Box<RawValue> = map.next_value()?;
            fields.push((k, v));
        }
        Ok(TopLevel {
            fields: Some(fields),
            items,
        })
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<TopLevel, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TopLevel, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<TopLevel, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<TopLevel, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TopLevel, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
    fn visit_unit<E: de::Error>(self) -> Result<TopLevel, E> {
        Ok(TopLevel::NOT_OBJECT)
    }
}

impl TopLevel {
    const NOT_OBJECT: TopLevel = TopLevel {
        fields: None,
        items: Items::Other,
    };
}

impl<'de> Deserialize<'de> for Items {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Items;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a json value")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
                let mut list = Vec::new();
                while let Some(m) = seq.next_element::<Box<RawValue>>()? {
                    list.push(m);
                }
                Ok(Items::List(list))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Items, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Items::Other)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Items, E> {
                Ok(Items::Text(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Items, E> {
                Ok(Items::Text(s))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Items, E> {
                Ok(Items::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Items, E> {
                Ok(Items::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Items, E> {
                Ok(Items::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Items, E> {
                Ok(Items::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Items, E> {
                Ok(Items::Other)
            }
        }
        d.deserialize_any(V)
    }
}

fn empty_raw() -> Box<RawValue> {
    // `[]` is valid JSON, so this never falls back; the fallback keeps it panic-free.
    RawValue::from_string("[]".to_string()).unwrap_or_else(|_| RawValue::NULL.to_owned())
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

impl Meta {
    pub(crate) fn of(dialect: Dialect, v: &Value) -> Meta {
        let role = v.get("role").and_then(Value::as_str).unwrap_or("");
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
                if let Some(calls) = v.get("tool_calls").and_then(Value::as_array) {
                    for c in calls {
                        if let Some(id) = c.get("id").and_then(Value::as_str) {
                            m.calls.push(id.to_string());
                        }
                    }
                }
                if let Some(id) = v.get("tool_call_id").and_then(Value::as_str) {
                    m.answers.push(id.to_string());
                }
                m.legacy_call = v.get("function_call").is_some_and(|f| !f.is_null());
                m.legacy_result = role == "function";
            }
            Dialect::Anthropic => {
                if let Some(blocks) = v.get("content").and_then(Value::as_array) {
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
    fn responses_item(&mut self, v: &Value) {
        let ty = v.get("type").and_then(Value::as_str).unwrap_or("message");
        let str_at = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
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
    s.as_bytes().iter().filter(|&&b| (b as i8) >= -0x40).count()
}
