//! The conversation view's shared part: what one replica learnt about a conversation, so
//! that the next replica to serve it counts nothing twice and keeps the same cut.
//!
//! After a call is pruned its replica writes, under `{prefix}{conversation}:view`, the
//! writer and version of its view entry, the settings its counts were made with, the
//! fingerprint and token count of the fixed part (tools, Anthropic system) and of every
//! message, and the cut (index and fingerprint of the first kept history message). The value
//! is binary (below), expires after `prune.view_idle_ttl`, and is replaced whole: calls of
//! one conversation are serialised by the shared gate, so there is one writer at a time.
//!
//! Before pruning, a replica reads it; when its own entry is not the one written last
//! (another writer or another version) it adopts the shared one: the messages of the request
//! that match the shared fingerprints, in order, take the shared counts, and the cut comes
//! along. Pruning then keeps the same cut the other replica kept, and the forwarded prefix
//! stays byte-identical from replica to replica. A message's elided form is not shared (it
//! is recomputed from the message, deterministically).

use std::sync::Arc;

use super::State;

/// The shared form of a conversation's view entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedConv {
    /// The replica that wrote it.
    pub writer: u64,
    /// Its version (one more at each write).
    pub version: u64,
    /// The settings the counts were made with (encoding, dialect, min_file_lines), opaque.
    pub key: [u64; 3],
    /// Fingerprint and extra tokens of the fixed part.
    pub fixed: Option<(u64, u64)>,
    /// Fingerprint and exact tokens (when counted) of each message, in order.
    pub msgs: Vec<(u64, Option<u64>)>,
    /// The cut: index and fingerprint of the first kept history message.
    pub cut: Option<(u64, u64)>,
}

/// The format's first bytes (and version).
const MAGIC: &[u8; 4] = b"cgv1";

/// Writes the entry only over the one read: KEYS[1] the entry; ARGV: the first 20 bytes of
/// the entry read (magic, writer, version; empty when there was none), the new entry, its
/// ttl in ms. Atomic as a script; returns 1 (written) or 0 (another call wrote first).
pub const VIEW_PUT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (not cur and ARGV[1] == '') or (cur and string.sub(cur, 1, 20) == ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
  return 1
end
return 0
"#;

/// An entry's first 20 bytes: the magic, its writer and its version.
fn header(writer: u64, version: u64) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&writer.to_le_bytes());
    h.extend_from_slice(&version.to_le_bytes());
    h
}
/// Stands for "not counted" among the token counts.
const NONE: u64 = u64::MAX;

impl SharedConv {
    /// `MAGIC`, then little-endian u64s: writer, version, key ×3, fixed flag, fixed fp,
    /// fixed tokens, cut flag, cut index, cut fp, message count, then fp and tokens per
    /// message (`u64::MAX`: not counted).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * (12 + 2 * self.msgs.len()));
        out.extend_from_slice(MAGIC);
        let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
        put(self.writer);
        put(self.version);
        for k in self.key {
            put(k);
        }
        let (f, (ffp, ft)) = (self.fixed.is_some(), self.fixed.unwrap_or_default());
        put(u64::from(f));
        put(ffp);
        put(ft);
        let (c, (ci, cfp)) = (self.cut.is_some(), self.cut.unwrap_or_default());
        put(u64::from(c));
        put(ci);
        put(cfp);
        put(self.msgs.len() as u64);
        for &(fp, t) in &self.msgs {
            put(fp);
            put(t.unwrap_or(NONE));
        }
        out
    }

    /// The inverse of [`SharedConv::encode`]; `None` for anything else (another format, a
    /// truncated value).
    pub fn decode(b: &[u8]) -> Option<SharedConv> {
        let rest = b.strip_prefix(MAGIC)?;
        let mut words = rest
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
        if rest.len() % 8 != 0 {
            return None;
        }
        let mut next = || words.next();
        let writer = next()?;
        let version = next()?;
        let key = [next()?, next()?, next()?];
        let fixed = (next()? == 1, next()?, next()?);
        let cut = (next()? == 1, next()?, next()?);
        // The count must match the length exactly (checked without overflow), so a value
        // from Redis can never make this allocate more than it holds.
        let n = usize::try_from(next()?).ok()?;
        let want = n.checked_mul(2)?.checked_add(12)?.checked_mul(8)?;
        if rest.len() != want {
            return None;
        }
        let mut msgs = Vec::with_capacity(n);
        for _ in 0..n {
            let fp = next()?;
            let t = next()?;
            msgs.push((fp, (t != NONE).then_some(t)));
        }
        Some(SharedConv {
            writer,
            version,
            key,
            fixed: fixed.0.then_some((fixed.1, fixed.2)),
            msgs,
            cut: cut.0.then_some((cut.1, cut.2)),
        })
    }
}

impl State {
    /// The conversation's shared view entry: `Ok(None)` when there is none (or not one this
    /// build reads), `Err` when Redis failed (the fallback is now on).
    pub async fn view_get(self: &Arc<Self>, conversation: &str) -> Result<Option<SharedConv>, ()> {
        let key = self.key(conversation, "view");
        let mut c = self.conn.clone();
        let r = self
            .trip("view_get", async move {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            })
            .await;
        if r.is_err() {
            self.probe();
        }
        Ok(r?.and_then(|b| SharedConv::decode(&b)))
    }

    /// Writes the conversation's shared view entry, to expire after `ttl`, if the entry in
    /// Redis is still the one read (`read`: its writer and version; `None`: there was none).
    /// `Ok(false)`: another call wrote first, and this entry was not written.
    pub async fn view_put(
        self: &Arc<Self>,
        conversation: &str,
        entry: &SharedConv,
        read: Option<(u64, u64)>,
        ttl: std::time::Duration,
    ) -> Result<bool, ()> {
        let key = self.key(conversation, "view");
        let value = entry.encode();
        let expected = read.map_or_else(Vec::new, |(w, v)| header(w, v));
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut inv = self.view_put.prepare_invoke();
        inv.key(&key).arg(expected).arg(value).arg(ms);
        let r = self.eval("view_put", inv).await.map(|n| n == 1);
        if r.is_err() {
            self.probe();
        }
        r
    }

    /// Reads the conversation's shared summary (`[prune.summary]`; its encoding is the
    /// summaries' own business) and keeps it `ttl` longer: a conversation in use keeps it.
    pub async fn summary_get(
        self: &Arc<Self>,
        conversation: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<Vec<u8>>, ()> {
        let key = self.key(conversation, "summary");
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut c = self.conn.clone();
        let r = self
            .trip("summary_get", async move {
                redis::cmd("GETEX")
                    .arg(&key)
                    .arg("PX")
                    .arg(ms)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            })
            .await;
        if r.is_err() {
            self.probe();
        }
        r
    }

    /// Writes the conversation's shared summary, to expire after `ttl`.
    pub async fn summary_put(
        self: &Arc<Self>,
        conversation: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<(), ()> {
        let key = self.key(conversation, "summary");
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut c = self.conn.clone();
        let r = self
            .trip("summary_put", async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .arg("PX")
                    .arg(ms)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        if r.is_err() {
            self.probe();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_refuses_what_it_did_not_write() {
        let e = SharedConv {
            writer: 7,
            version: 42,
            key: [1, 2, 3],
            fixed: Some((99, 1234)),
            msgs: vec![(5, Some(10)), (6, None), (u64::MAX - 1, Some(0))],
            cut: Some((1, 6)),
        };
        let b = e.encode();
        assert_eq!(b.len(), 4 + 8 * (12 + 6));
        assert_eq!(b[..20], header(7, 42)[..], "the compare-and-set header");
        assert_eq!(SharedConv::decode(&b), Some(e.clone()));
        let none = SharedConv {
            fixed: None,
            cut: None,
            msgs: vec![],
            ..e
        };
        assert_eq!(SharedConv::decode(&none.encode()), Some(none));
        assert_eq!(SharedConv::decode(&b[..b.len() - 8]), None, "truncated");
        assert_eq!(SharedConv::decode(&b[..b.len() - 3]), None, "ragged");
        assert_eq!(SharedConv::decode(b"cgv2"), None, "another format");
        assert_eq!(SharedConv::decode(b""), None);
        // A count that would overflow the length check, or claim more than the value holds.
        let mut huge = b[..4 + 8 * 11].to_vec();
        huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert_eq!(SharedConv::decode(&huge), None);
        huge[4 + 8 * 11..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(SharedConv::decode(&huge), None);
    }
}
