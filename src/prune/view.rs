//! The conversation view: per conversation, what earlier requests taught us — each
//! message's fingerprint, facts and token count, its elided form, and the current cut
//! point — so that a conversation that grows by one message costs one message's count, and
//! the cut can stay put from turn to turn (a byte-stable prefix for provider caches).
//!
//! A moka cache bounded by an approximate weight in bytes, with an idle TTL. Requests of one
//! conversation are serialised by the gate, so read-modify-write of an entry is race-free in
//! practice; a lost update only costs a recount.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use serde_json::value::RawValue;

use crate::hash::Seeded;
use crate::prune::request::{ChatRequest, Layout, Meta};
use crate::prune::tokens::Encoding;
use crate::state::shared::SharedConv;

/// The conversation view shared by all requests (cheap to share: wrap it in an `Arc`).
pub struct View {
    cache: Cache<String, Arc<ConvState>, Seeded>,
    /// For conversations no header names: the hash of a body's first bytes (the anchor) →
    /// the conversations, newest first, whose bodies began so. Bounded in entries.
    anchors: Cache<u64, Arc<[String]>, Seeded>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("entries", &self.cache.entry_count())
            .field("hits", &self.hits())
            .field("misses", &self.misses())
            .finish()
    }
}

impl View {
    /// A view holding at most about `max_weight_bytes` of state; a conversation idle for
    /// `idle_ttl` is forgotten.
    pub fn new(max_weight_bytes: u64, idle_ttl: Duration) -> View {
        let cache = Cache::builder()
            .max_capacity(max_weight_bytes)
            .weigher(|k: &String, v: &Arc<ConvState>| {
                u32::try_from(k.len() + v.weight()).unwrap_or(u32::MAX)
            })
            .time_to_idle(idle_ttl)
            .build_with_hasher(Seeded::default());
        View {
            cache,
            anchors: Cache::builder()
                .max_capacity(ANCHORS)
                .time_to_idle(idle_ttl)
                .build_with_hasher(Seeded::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Conversations held (approximate: moka applies evictions lazily).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// Requests that found their conversation's earlier messages in the view.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Requests that did not.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    pub(crate) fn get(&self, conversation: &str) -> Option<Arc<ConvState>> {
        self.cache.get(conversation)
    }

    /// Where the parts of the conversation's last body lay, for
    /// [`crate::prune::ChatRequest::parse_after`].
    pub fn layout(&self, conversation: &str) -> Option<Arc<Layout>> {
        self.cache.get(conversation).and_then(|s| s.layout.clone())
    }

    /// The layouts of the conversations whose bodies began like this one (`anchor`), newest
    /// first.
    pub fn anchored(&self, anchor: u64) -> Vec<Arc<Layout>> {
        self.anchors
            .get(&anchor)
            .map(|ids| ids.iter().filter_map(|id| self.layout(id)).collect())
            .unwrap_or_default()
    }

    /// Notes that `conversation`'s body began like this (`anchor`); keeps the newest
    /// [`ANCHORED`] conversations of each anchor.
    pub fn note_anchor(&self, anchor: u64, conversation: &str) {
        let old = self.anchors.get(&anchor);
        if old.as_ref().and_then(|ids| ids.first()).map(String::as_str) == Some(conversation) {
            return;
        }
        let mut ids = vec![conversation.to_string()];
        ids.extend(
            old.iter()
                .flat_map(|o| o.iter())
                .filter(|id| id.as_str() != conversation)
                .take(ANCHORED - 1)
                .cloned(),
        );
        self.anchors.insert(anchor, ids.into());
    }

    pub(crate) fn record(&self, hit: bool) {
        let c = if hit { &self.hits } else { &self.misses };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn put(&self, conversation: &str, state: ConvState) {
        self.cache.insert(conversation.to_string(), Arc::new(state));
    }

    /// The shared form of the conversation's entry, to be written as `writer`'s `version`
    /// (`[state] backend = "redis"`); `None` when the view has no entry for it.
    pub fn shared_entry(
        &self,
        conversation: &str,
        writer: u64,
        version: u64,
    ) -> Option<SharedConv> {
        let s = self.cache.get(conversation)?;
        Some(SharedConv {
            writer,
            version,
            key: s.key.words(),
            fixed: s.fixed,
            msgs: s.msgs.iter().map(|e| (e.fp, e.tokens)).collect(),
            cut: s.cut.map(|(i, fp)| (i as u64, fp)),
        })
    }

    /// Marks the conversation's entry as the shared one `(writer, version)` (it was written):
    /// the next request finds it current and keeps it.
    pub fn set_origin(&self, conversation: &str, origin: (u64, u64)) {
        if let Some(s) = self.cache.get(conversation) {
            let mut s = (*s).clone();
            s.origin = Some(origin);
            self.put(conversation, s);
        }
    }
}

/// Anchors kept (each a few conversation ids).
const ANCHORS: u64 = 65_536;
/// Conversations kept per anchor: bodies that begin alike (one agent's system prompt) are
/// tried newest first.
const ANCHORED: usize = 4;

/// What the view knows about one conversation.
#[derive(Debug, Clone)]
pub(crate) struct ConvState {
    /// Encoding, min_file_lines and dialect the counts and elisions were made with.
    pub(crate) key: StateKey,
    /// Fingerprint and tokens of the tools / functions / Anthropic system part.
    pub(crate) fixed: Option<(u64, u64)>,
    /// One entry per message, in order.
    pub(crate) msgs: Vec<Entry>,
    /// The current cut: index and fingerprint of the first kept history message.
    pub(crate) cut: Option<(usize, u64)>,
    /// Where the last body's parts lay, so that the next body parses only what is new.
    pub(crate) layout: Option<Arc<Layout>>,
    /// The shared entry this one is (writer, version), when state is shared through Redis.
    pub(crate) origin: Option<(u64, u64)>,
}

impl ConvState {
    /// The state a replica adopts from the shared entry `sh` for `req`: the request's leading
    /// messages whose fingerprints match the shared ones, in order, with the shared counts
    /// (their facts read from the request), the fixed part's count and the cut.
    pub(crate) fn from_shared(sh: &SharedConv, req: &ChatRequest, key: StateKey) -> ConvState {
        let mut msgs = Vec::new();
        for (i, (m, &(fp, tokens))) in req.messages().iter().zip(&sh.msgs).enumerate() {
            if m.fp != fp {
                break;
            }
            let v: serde_json::Value =
                serde_json::from_slice(req.raw(i)).unwrap_or(serde_json::Value::Null);
            msgs.push(Entry {
                fp,
                meta: Arc::new(Meta::of(req.dialect(), &v)),
                tokens,
                elided: None,
            });
            crate::pace::pace_by(16);
        }
        ConvState {
            key,
            fixed: sh.fixed,
            msgs,
            cut: sh
                .cut
                .and_then(|(i, fp)| Some((usize::try_from(i).ok()?, fp))),
            layout: None,
            origin: Some((sh.writer, sh.version)),
        }
    }

    fn weight(&self) -> usize {
        let per = std::mem::size_of::<Entry>() + std::mem::size_of::<Meta>() + 32;
        let elided: usize = self
            .msgs
            .iter()
            .filter_map(|e| e.elided.as_ref())
            .map(|e| e.raw.as_ref().map_or(0, |r| r.get().len()) + 32)
            .sum();
        let layout = self.layout.as_ref().map_or(0, |l| l.weight());
        128 + self.msgs.len() * per + elided + layout
    }
}

/// Settings the cached figures depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StateKey {
    pub(crate) enc: Encoding,
    pub(crate) min_file_lines: u64,
    pub(crate) dialect: crate::dialect::Dialect,
}

impl StateKey {
    /// The key as three numbers, for the shared entry.
    pub(crate) fn words(self) -> [u64; 3] {
        [self.enc as u64, self.dialect as u64, self.min_file_lines]
    }
}

/// What the view knows about one message.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) fp: u64,
    pub(crate) meta: Arc<Meta>,
    /// Exact tokens of the message as sent, once counted.
    pub(crate) tokens: Option<u64>,
    /// The message with older file contents elided, once computed.
    pub(crate) elided: Option<Arc<Elided>>,
}

/// A message's elided form.
#[derive(Debug)]
pub(crate) struct Elided {
    /// The elided JSON; `None` when there was nothing to elide (use the original).
    pub(crate) raw: Option<Box<RawValue>>,
    /// Exact tokens of the elided form.
    pub(crate) tokens: u64,
    /// Files elided.
    pub(crate) files: usize,
}
