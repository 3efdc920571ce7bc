//! Phase 2, identify: which conversation a request belongs to. First match wins:
//! a configured header (`x-conversation-id` by default), a configured body field (e.g.
//! `metadata.conversation_id`), else a fingerprint of route + system prompt + first user
//! message, which stays the same as a conversation grows. The id keys the gate and the
//! conversation view; it is never a metric label and never logged in full.

use http::HeaderMap;

use crate::config::Conversation;

/// Longest id accepted from a client; longer ones are hashed, so a client cannot make the
/// gate table hold arbitrarily large keys.
const MAX_ID_LEN: usize = 128;

/// The conversation id of a request, if it has one. `field` looks up a dotted path in the
/// body, `fingerprint` computes the fallback; both are only called when needed.
pub fn conversation_id(
    headers: &HeaderMap,
    cfg: &Conversation,
    field: impl FnOnce(&str) -> Option<String>,
    fingerprint: impl FnOnce() -> Option<String>,
) -> Option<String> {
    for name in &cfg.headers {
        if let Some(v) = headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
            let v = v.trim();
            if !v.is_empty() {
                return Some(bounded(v));
            }
        }
    }
    if let Some(path) = &cfg.body_field {
        if let Some(v) = field(path) {
            if !v.is_empty() {
                return Some(bounded(&v));
            }
        }
    }
    fingerprint()
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

    fn cfg(body_field: Option<&str>) -> Conversation {
        Conversation {
            headers: vec!["x-conversation-id".into(), "x-session-id".into()],
            body_field: body_field.map(str::to_string),
        }
    }

    #[test]
    fn first_match_wins() {
        let mut h = HeaderMap::new();
        let fp = || Some("fp".to_string());
        assert_eq!(
            conversation_id(&h, &cfg(None), |_| None, fp),
            Some("fp".into())
        );
        assert_eq!(
            conversation_id(
                &h,
                &cfg(Some("metadata.c")),
                |p| Some(format!("body:{p}")),
                fp
            ),
            Some("body:metadata.c".into())
        );
        h.insert("x-session-id", "s-1".parse().unwrap());
        assert_eq!(
            conversation_id(&h, &cfg(Some("m")), |_| Some("b".into()), fp),
            Some("s-1".into())
        );
        h.insert("x-conversation-id", "c-1".parse().unwrap());
        assert_eq!(
            conversation_id(&h, &cfg(None), |_| None, fp),
            Some("c-1".into())
        );
        h.insert("x-conversation-id", "x".repeat(500).parse().unwrap());
        let id = conversation_id(&h, &cfg(None), |_| None, fp).unwrap();
        assert_eq!(id.len(), 18);
        assert!(id.starts_with("h:"));
    }
}
