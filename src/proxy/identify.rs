//! Phase 2, identify: which conversation a request belongs to. A chat request (as its dialect
//! says: [`crate::dialect::Wire::is_chat`]) is read whole here, within `max_body_bytes`, and
//! parsed, because identify, admit and prune all need its body; every other request keeps its
//! body streaming. First match wins for the id: a configured header (`x-conversation-id` by
//! default), a configured body field (e.g. `metadata.conversation_id`), else a fingerprint of
//! route + system prompt + first user message, which stays the same as a conversation grows.
//! The id keys the gate and the conversation view; it is never a metric label and never
//! logged in full.
//!
//! A compressed chat body (`Content-Encoding: gzip`, `deflate`, `br` or `zstd` on the request)
//! is decoded within `max_body_bytes` and handled as a plain one; it goes upstream decoded
//! (without the header), pruned or not. A body in another coding, corrupt, or decoding past
//! the limit is forwarded as it came and counted as skipped (`compressed_body`).
//!
//! When a header names the conversation, the body is parsed after the conversation's previous
//! one (the view's [`Layout`]): the unchanged part is checked by hash, only the rest parsed.
//! Joining and parsing a body whose new part is large (over `heavy::INLINE_BYTES`) runs on the
//! heavy pool, not on an async worker.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::coding::{decode_all, DecodeError};
use crate::config::{Conversation, OnParseError, Route, Server};
use crate::dialect::Dialect;
use crate::error::Error;
use crate::prune::{ChatRequest, Layout, ParseError, Verifier, LAYOUT_MIN_BYTES};
use std::sync::Arc;

pub use super::call::Identity;
use super::call::{Call, Payload, PruneAction};
use super::heavy::{Refused, INLINE_BYTES};
use super::Proxy;

impl Proxy {
    /// Finds the call's conversation; reads and parses a chat body on the way.
    pub(super) async fn identify(&self, call: &mut Call) -> Result<(), Error> {
        let Some(route) = call.route.clone() else {
            return Ok(());
        };
        let cfg = &route.config;
        let req = &call.request;
        if !call.dialect.wire().is_chat(&req.method, req.uri.path()) {
            call.identify(self.header_identity(&req.headers));
            return Ok(());
        }
        call.chat = true;
        let Payload::Stream(body) = std::mem::take(&mut call.payload) else {
            return Ok(());
        };
        // An id from the headers is known before the body arrives: the conversation's last
        // layout then lets the body be checked, as it arrives, against the previous request's
        // (by hash); only what follows the unchanged part is parsed. (A compressed body is
        // checked once decoded.)
        // Layouts are kept only for bodies of LAYOUT_MIN_BYTES or more: a smaller plain body
        // (by its Content-Length) follows none worth looking up, and is parsed whole in
        // microseconds.
        let header_id = self.header_identity(&req.headers);
        let compressed = req.headers.contains_key(http::header::CONTENT_ENCODING);
        let small = !compressed
            && req
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_some_and(|n| n < LAYOUT_MIN_BYTES);
        let layout = header_id
            .as_ref()
            .filter(|_| cfg.prune.enabled && !small)
            .and_then(|id| self.pruning.view.layout(&id.id));
        let mut verifier = layout
            .as_ref()
            .filter(|_| !compressed)
            .map(|l| l.verifier());
        let read = read_body(body, self.max_body_bytes, &self.server, verifier.as_mut()).await;
        let mut frames = match read {
            Ok(f) => f,
            Err(e) => {
                // A body that broke off still belongs to the conversation its headers name.
                call.identify(self.header_identity(&req.headers));
                return Err(e);
            }
        };
        // A compressed chat body (Content-Encoding on the request) is decoded, within
        // `max_body_bytes`, and goes upstream decoded (pruned or not); one ctxgate cannot
        // decode is forwarded as it came and counted as skipped: never parsed as if it were
        // plain, never refused as unparseable.
        let encoding = req
            .headers
            .get(http::header::CONTENT_ENCODING)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .filter(|v| !v.trim().eq_ignore_ascii_case("identity"));
        if let Some(enc) = encoding {
            let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
            let compressed = frames.clone();
            let e2 = enc.clone();
            let lane = self.heavy_lane(&req.headers);
            let decoded = match self
                .heavy
                .run(&lane, move || decode_all(&e2, &compressed.join(), limit))
                .await
            {
                Ok(d) => d,
                Err(Refused::Full(n)) => {
                    call.identify(self.header_identity(&req.headers));
                    return Err(Error::Busy(n));
                }
                Err(Refused::Failed) => Err(DecodeError::Corrupt(enc.clone())),
            };
            match decoded {
                Ok(Some(plain)) => {
                    let h = &mut call.request.headers;
                    h.remove(http::header::CONTENT_ENCODING);
                    h.insert(http::header::CONTENT_LENGTH, plain.len().into());
                    frames = Frames::one(Bytes::from(plain));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(route = %cfg.name, error = %e, "compressed chat body; forwarded unchanged");
                    call.identify(self.header_identity(&call.request.headers));
                    call.payload = Payload::Opaque(frames.join());
                    call.prune_reason = Some("compressed_body");
                    return Ok(());
                }
            }
        }
        let req = &call.request;
        let dialect = call.dialect;
        if verifier.is_none() {
            // A decoded body: checked now, whole.
            verifier = layout.as_ref().map(|l| checked(l, &frames));
        }
        // A conversation no header names (known by a body field or a fingerprint): the
        // conversations whose bodies began with the same bytes are candidates; the one whose
        // last body this one repeats furthest is parsed after. The id itself still comes from
        // the parsed body, so a wrong candidate costs only a hash pass, never a wrong id.
        // (Only bodies large enough to keep a layout take part, and none so large that
        // checking candidates would hold the async worker: those are parsed whole, on the
        // heavy pool.)
        let anchor = (header_id.is_none()
            && cfg.prune.enabled
            && !compressed
            && (LAYOUT_MIN_BYTES..=ANCHOR_MAX_BYTES).contains(&frames.len()))
        .then(|| anchor_of(&cfg.name, &frames));
        if let (None, Some(a)) = (&verifier, anchor) {
            verifier = self
                .pruning
                .view
                .anchored(a)
                .iter()
                .map(|l| checked(l, &frames))
                .min_by_key(|v| v.fresh_bytes(frames.len()));
        }
        let fresh = verifier
            .as_ref()
            .map_or(frames.len(), |v| v.fresh_bytes(frames.len()));
        let (bytes, parsed, id) = if fresh > INLINE_BYTES {
            // Joined (one copy) and parsed off the async workers.
            let (f, h, c, r) = (
                frames.clone(),
                req.headers.clone(),
                self.conversation.clone(),
                cfg.clone(),
            );
            let lane = header_id.as_ref().map_or("", |i| i.id.as_str());
            let job = self
                .heavy
                .run(lane, move || {
                    let bytes = f.join();
                    let (parsed, id) =
                        parse_and_identify(&r, dialect, bytes.clone(), verifier, &h, &c);
                    (bytes, parsed, id)
                })
                .await;
            match job {
                Ok(done) => done,
                Err(Refused::Full(n)) => {
                    call.identify(header_id);
                    return Err(Error::Busy(n));
                }
                Err(e @ Refused::Failed) => {
                    tracing::error!(route = %cfg.name, error = %e, "parsing task failed");
                    (frames.join(), Err(ParseError::NotObject), header_id)
                }
            }
        } else {
            let bytes = frames.join();
            let (parsed, id) = parse_and_identify(
                cfg,
                dialect,
                bytes.clone(),
                verifier,
                &req.headers,
                &self.conversation,
            );
            (bytes, parsed, id)
        };
        if let (Some(a), Some(i), Ok(_)) = (anchor, &id, &parsed) {
            self.pruning.view.note_anchor(a, &i.id);
        }
        call.identify(id);
        match parsed {
            Ok(p) => {
                let fresh = p.fresh_bytes() as u64;
                call.parsed_bytes = Some((p.body_len() as u64 - fresh, fresh));
                call.model = p.model().map(str::to_string);
                call.stream = p.is_stream();
                call.payload = Payload::Chat(bytes, Box::new(p));
            }
            Err(e) if cfg.prune.enabled && cfg.prune.on_parse_error == OnParseError::Reject => {
                call.action = PruneAction::Rejected;
                return Err(Error::BadChatBody(e.to_string()));
            }
            Err(e) => {
                tracing::debug!(route = %cfg.name, error = %e, "chat body not parseable; forwarded unchanged");
                call.payload = Payload::Opaque(bytes);
                call.prune_reason = Some("unparseable");
            }
        }
        Ok(())
    }
}

impl Proxy {
    /// The heavy pool's lane for a request: its conversation when its headers name one (its
    /// jobs then wait only behind its own), else the lane all unnamed requests share.
    pub(super) fn heavy_lane(&self, headers: &HeaderMap) -> String {
        self.header_identity(headers)
            .map(|i| i.id)
            .unwrap_or_default()
    }

    /// The conversation id from the headers alone (a request whose body is not read or not
    /// parsed).
    fn header_identity(&self, headers: &HeaderMap) -> Option<Identity> {
        conversation_id(headers, &self.conversation, |_| None, || None)
    }
}

/// A verifier of `layout` fed the whole body.
fn checked(layout: &Arc<Layout>, frames: &Frames) -> Verifier {
    let mut v = layout.verifier();
    for f in frames.parts() {
        v.feed(f);
    }
    v
}

/// Largest body checked against its anchor's candidates (on the async worker: a hash pass
/// per candidate, about 0.1 ms per MiB).
const ANCHOR_MAX_BYTES: usize = 8 << 20;

/// Bytes of a body's start that key the anchor index.
const ANCHOR_BYTES: usize = 1024;

/// The anchor of a body on a route: a hash of its first [`ANCHOR_BYTES`] bytes.
fn anchor_of(route: &str, frames: &Frames) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::with_seed(fnv1a(route.as_bytes()));
    let mut left = ANCHOR_BYTES;
    for f in frames.parts() {
        let take = left.min(f.len());
        h.update(&f[..take]);
        left -= take;
        if left == 0 {
            break;
        }
    }
    h.digest()
}

/// Parses a chat body (after the conversation's previous body, when `verifier` checked it
/// against that one's layout) and finds its conversation id (header, body field, or
/// fingerprint).
fn parse_and_identify(
    route: &Route,
    dialect: Dialect,
    body: Bytes,
    verifier: Option<Verifier>,
    headers: &HeaderMap,
    conversation: &Conversation,
) -> (Result<ChatRequest, ParseError>, Option<Identity>) {
    let parsed = match verifier {
        Some(v) => ChatRequest::parse_resumed(dialect, body, v),
        None => ChatRequest::parse_bytes(dialect, body),
    };
    let p = parsed.as_ref().ok();
    let id = conversation_id(
        headers,
        conversation,
        |path| p.and_then(|p| p.field_str(path)),
        || p.map(|p| p.fingerprint(&route.name)),
    );
    (parsed, id)
}

/// A request body read whole: as the frames it arrived in, or already in one buffer (when it
/// was checked against a layout as it arrived, it was gathered there as well).
#[derive(Clone, Default)]
pub struct Frames {
    frames: Vec<Bytes>,
    len: usize,
}

impl Frames {
    /// One frame.
    pub fn one(b: Bytes) -> Frames {
        Frames {
            len: b.len(),
            frames: vec![b],
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The frames.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.frames.iter().map(|f| &f[..])
    }

    /// The body as one buffer: the frame itself when there is one, else one copy of all.
    pub fn join(mut self) -> Bytes {
        match self.frames.len() {
            0 => Bytes::new(),
            1 => self.frames.pop().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(self.len);
                for f in &self.frames {
                    for piece in f.chunks(64 << 10) {
                        b.extend_from_slice(piece);
                        crate::pace::pace_by(64);
                    }
                }
                b.freeze()
            }
        }
    }
}

/// Bytes of a body read between two yields to the loop's other tasks.
const YIELD_BYTES: usize = 256 << 10;

/// Reads a whole request body, refusing more than `limit` bytes, with at most
/// `server.body_idle_timeout` between chunks and `server.body_total_timeout` in all (a client
/// whose body stalls gets 408). Without a `verifier` the frames are kept as they are, not
/// joined: a large body is joined (one copy) on the heavy pool that parses it, not on an async
/// worker, where copying 20 MB would hold the worker for milliseconds. With one, each frame is
/// fed to it and copied into one buffer as it arrives, so that the hashing and the copy are
/// done while the rest of the body is still on its way (a warm request of a known
/// conversation then parses only its new turn, inline).
pub async fn read_body(
    mut body: Incoming,
    limit: u64,
    t: &Server,
    mut verifier: Option<&mut Verifier>,
) -> Result<Frames, Error> {
    let mut out = Frames::default();
    // Sized by the declared length (so it is never copied to grow), but past 8 MiB only when
    // the conversation's previous body was at least half as long: a client cannot make
    // ctxgate reserve `max_body_bytes` by announcing it.
    let mut joined: Option<BytesMut> = verifier.as_ref().map(|v| {
        let hint =
            usize::try_from(http_body::Body::size_hint(&body).lower().min(limit)).unwrap_or(0);
        let cap = (8 << 20).max(v.previous_len().saturating_mul(2));
        BytesMut::with_capacity(hint.min(cap))
    });
    let mut since_yield = 0usize;
    let deadline = tokio::time::Instant::now() + t.body_total_timeout;
    loop {
        let idle_at = (tokio::time::Instant::now() + t.body_idle_timeout).min(deadline);
        let frame = match tokio::time::timeout_at(idle_at, body.frame()).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) if idle_at >= deadline => {
                return Err(Error::BodyTimeout {
                    key: "server.body_total_timeout",
                    after: t.body_total_timeout,
                })
            }
            Err(_) => {
                return Err(Error::BodyTimeout {
                    key: "server.body_idle_timeout",
                    after: t.body_idle_timeout,
                })
            }
        };
        let frame = frame.map_err(|e| Error::BodyRead(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing ctxgate forwards for a chat body
        };
        out.len = out.len.saturating_add(data.len());
        if out.len as u64 > limit {
            return Err(Error::BodyTooLarge { limit });
        }
        // Frames that are ready come back without a yield: give the loop's other
        // connections a turn after each YIELD_BYTES received (and hashed and copied).
        since_yield += data.len();
        let turn = since_yield >= YIELD_BYTES;
        match (verifier.as_deref_mut(), joined.as_mut()) {
            (Some(v), Some(j)) if !v.failed() => {
                v.feed(&data);
                j.extend_from_slice(&data);
            }
            (_, Some(j)) => {
                // The body differs from the previous one: nothing more to check, and the rest
                // is kept as it came (a large body is joined on the heavy pool).
                if !j.is_empty() {
                    out.frames.push(std::mem::take(j).freeze());
                }
                joined = None;
                out.frames.push(data);
            }
            _ => out.frames.push(data),
        }
        if turn {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    if let Some(j) = joined {
        out.frames = vec![j.freeze()];
    }
    Ok(out)
}

/// Longest id accepted from a client; longer ones are hashed, so a client cannot make the
/// gate table hold arbitrarily large keys.
const MAX_ID_LEN: usize = 128;

/// The conversation id of a request, if it has one. `field` looks up a dotted path in the
/// body, `fingerprint` computes the fallback; both are only called when needed.
pub fn conversation_id(
    headers: &HeaderMap,
    cfg: &Conversation,
    mut field: impl FnMut(&str) -> Option<String>,
    fingerprint: impl FnOnce() -> Option<String>,
) -> Option<Identity> {
    let sent = |id: &str| {
        Some(Identity {
            id: bounded(id),
            guessed: false,
        })
    };
    for name in &cfg.headers {
        if let Some(v) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
            let v = v.trim();
            if !v.is_empty() {
                return sent(v);
            }
        }
    }
    for path in &cfg.body_fields {
        if let Some(id) = field(path).and_then(|v| field_id(path, v)) {
            return sent(&id);
        }
    }
    fingerprint().map(|id| Identity { id, guessed: true })
}

/// The conversation id a body field's value gives. A user id (Anthropic `metadata.user_id`)
/// names a conversation only through the session it carries: Claude Code sends
/// `user_<hash>_account_<uuid>_session_<uuid>`, or (newer builds) a JSON string with a
/// `session_id`; a plain user id names a person, whose conversations must not share a gate.
fn field_id(path: &str, value: String) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(value) {
            if let Some(s) = v.get("session_id").and_then(|s| s.as_str()) {
                return (!s.is_empty()).then(|| s.to_string());
            }
        }
    }
    if let Some((_, session)) = value.rsplit_once("_session_") {
        return (!session.is_empty()).then(|| session.to_string());
    }
    if path.ends_with("user_id") {
        return None;
    }
    Some(value.to_string())
}

fn bounded(id: &str) -> String {
    if id.len() <= MAX_ID_LEN {
        id.to_string()
    } else {
        format!("h:{:016x}", fnv1a(id.as_bytes()))
    }
}

/// FNV-1a, 64 bit: a stable hash (the same across runs and builds, unlike `RandomState`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(body_fields: &[&str]) -> Conversation {
        Conversation {
            headers: vec!["x-conversation-id".into(), "x-session-id".into()],
            body_fields: body_fields.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn id(i: Option<Identity>) -> Option<String> {
        i.map(|i| i.id)
    }

    #[test]
    fn first_match_wins() {
        let mut h = HeaderMap::new();
        let fp = || Some("fp".to_string());
        assert_eq!(
            conversation_id(&h, &cfg(&[]), |_| None, fp),
            Some(Identity {
                id: "fp".into(),
                guessed: true
            })
        );
        assert_eq!(
            id(conversation_id(
                &h,
                &cfg(&["metadata.c"]),
                |p| Some(format!("body:{p}")),
                fp
            )),
            Some("body:metadata.c".into())
        );
        h.insert("x-session-id", "s-1".parse().unwrap());
        assert_eq!(
            conversation_id(&h, &cfg(&["m"]), |_| Some("b".into()), fp),
            Some(Identity {
                id: "s-1".into(),
                guessed: false
            })
        );
        h.insert("x-conversation-id", "c-1".parse().unwrap());
        assert_eq!(
            id(conversation_id(&h, &cfg(&[]), |_| None, fp)),
            Some("c-1".into())
        );
        h.insert("x-conversation-id", "x".repeat(500).parse().unwrap());
        let id = conversation_id(&h, &cfg(&[]), |_| None, fp).unwrap().id;
        assert_eq!(id.len(), 18);
        assert!(id.starts_with("h:"));
    }

    #[test]
    fn body_fields_in_order_and_user_ids_only_through_their_session() {
        let h = HeaderMap::new();
        let c = cfg(&["prompt_cache_key", "metadata.user_id"]);
        let fp = || Some("fp".to_string());
        let body = |key: Option<&str>, user: Option<&str>| {
            let (key, user) = (key.map(str::to_string), user.map(str::to_string));
            move |p: &str| match p {
                "prompt_cache_key" => key.clone(),
                "metadata.user_id" => user.clone(),
                _ => None,
            }
        };
        let got = |key, user| id(conversation_id(&h, &c, body(key, user), fp));
        // Codex: prompt_cache_key names the conversation.
        assert_eq!(got(Some("conv-7"), None), Some("conv-7".into()));
        // Claude Code, older builds: the session is the tail of the user id.
        assert_eq!(
            got(None, Some("user_ab12_account_9f0e_session_4d5c-77")),
            Some("4d5c-77".into())
        );
        // Claude Code, newer builds: a JSON string with a session_id.
        assert_eq!(
            got(
                None,
                Some(r#"{"device_id":"d1","account_uuid":"a1","session_id":"s-42"}"#)
            ),
            Some("s-42".into())
        );
        // A plain user id names a person, not a conversation: the fingerprint decides.
        assert_eq!(got(None, Some("user-123")), Some("fp".into()));
        assert_eq!(got(Some(" "), None), Some("fp".into()));
    }
}
