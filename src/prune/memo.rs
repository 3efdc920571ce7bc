//! Counts of texts seen in *other* conversations: an agent sends the same system prompt and
//! tool definitions at the start of every conversation, often thousands of tokens that the
//! conversation view (per conversation) cannot have seen yet. The memo keeps the count of
//! each such part, keyed by its fingerprint and checked against its exact bytes, so a new
//! conversation pays for them once per process rather than once per conversation.
//!
//! Only parts of at least [`MIN_MEMO_BYTES`] are kept (shorter ones cost about as much to
//! count as to look up); the memo is bounded by [`MEMO_BYTES`] of stored text, least
//! recently used first out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moka::sync::Cache;

use crate::config::Encoding;
use crate::dialect::Dialect;
use crate::hash::Seeded;

/// Parts shorter than this are counted, not memoised.
pub(crate) const MIN_MEMO_BYTES: usize = 256;
/// Most text the memo holds.
pub(crate) const MEMO_BYTES: u64 = 16 * 1024 * 1024;

/// What a count depends on besides the text: the encoding and the dialect's rules, and
/// which kind of part it is (a message, or the fixed part of a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tag {
    pub enc: Encoding,
    pub dialect: Dialect,
    pub fixed: bool,
}

struct Memoed {
    tag: Tag,
    bytes: Box<[u8]>,
    tokens: u64,
}

/// The process-wide memo (inside the [`crate::prune::Counter`]).
pub(crate) struct Memo {
    cache: Cache<u64, Arc<Memoed>, Seeded>,
    hits: AtomicU64,
}

impl Memo {
    pub(crate) fn new(max_bytes: u64) -> Memo {
        Memo {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_: &u64, v: &Arc<Memoed>| {
                    u32::try_from(v.bytes.len() + 64).unwrap_or(u32::MAX)
                })
                .build_with_hasher(Seeded::default()),
            hits: AtomicU64::new(0),
        }
    }

    /// Counts served from the memo so far.
    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn key(fp: u64, tag: Tag) -> u64 {
        let t = (tag.enc as u64) << 2 | (tag.dialect as u64) << 1 | u64::from(tag.fixed);
        fp ^ t.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// The count stored for exactly these bytes under this tag, if any.
    pub(crate) fn get(&self, fp: u64, tag: Tag, bytes: &[u8]) -> Option<u64> {
        if bytes.len() < MIN_MEMO_BYTES {
            return None;
        }
        let e = self.cache.get(&Memo::key(fp, tag))?;
        let hit = (e.tag == tag && *e.bytes == *bytes).then_some(e.tokens);
        if hit.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Stores an exact count (a no-op for short parts).
    pub(crate) fn put(&self, fp: u64, tag: Tag, bytes: &[u8], tokens: u64) {
        if bytes.len() < MIN_MEMO_BYTES {
            return;
        }
        self.cache.insert(
            Memo::key(fp, tag),
            Arc::new(Memoed {
                tag,
                bytes: bytes.into(),
                tokens,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: Tag = Tag {
        enc: Encoding::O200kBase,
        dialect: Dialect::OpenAi,
        fixed: false,
    };

    #[test]
    fn hit_needs_the_same_bytes_and_tag() {
        let m = Memo::new(1 << 20);
        let text = "x".repeat(300);
        m.put(7, TAG, text.as_bytes(), 42);
        assert_eq!(m.get(7, TAG, text.as_bytes()), Some(42));
        // Same fingerprint, other bytes (a collision): not served.
        let other = "y".repeat(300);
        assert_eq!(m.get(7, TAG, other.as_bytes()), None);
        // Other encoding, dialect or kind: not served.
        for tag in [
            Tag {
                enc: Encoding::Cl100kBase,
                ..TAG
            },
            Tag {
                dialect: Dialect::Anthropic,
                ..TAG
            },
            Tag { fixed: true, ..TAG },
        ] {
            assert_eq!(m.get(7, tag, text.as_bytes()), None);
        }
    }

    #[test]
    fn short_parts_are_not_kept() {
        let m = Memo::new(1 << 20);
        let text = "x".repeat(MIN_MEMO_BYTES - 1);
        m.put(7, TAG, text.as_bytes(), 42);
        assert_eq!(m.get(7, TAG, text.as_bytes()), None);
        m.cache.run_pending_tasks();
        assert_eq!(m.cache.entry_count(), 0);
    }
}
