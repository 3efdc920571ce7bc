//! Parsing after a conversation's previous body gives what a full parse gives: for a body
//! that parses (the previous request) and a second body spliced from it (a cut and a resumed
//! copy: dropped, repeated, grown or broken tails), `ChatRequest::parse_after` with the first
//! body's layout yields the same fields, messages, facts and hashes as `ChatRequest::parse`,
//! or the same error.
#![no_main]

use bytes::Bytes;
use ctxgate::dialect::Dialect;
use ctxgate::prune::ChatRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [first, cut, from, body @ ..] = data else {
        return;
    };
    let dialect = [Dialect::OpenAi, Dialect::Anthropic, Dialect::Responses][*first as usize % 3];
    let Ok(prev) = ChatRequest::parse(dialect, body) else {
        return;
    };
    let Some(layout) = prev.layout() else {
        return;
    };
    let at = |b: u8| body.len() * usize::from(b) / 255;
    let mut next = body[..at(*cut)].to_vec();
    next.extend_from_slice(&body[at(*from)..]);
    let full = ChatRequest::parse(dialect, &next).map(|r| r.parts());
    let resumed = ChatRequest::parse_after(dialect, Bytes::from(next), &layout).map(|r| r.parts());
    assert_eq!(format!("{resumed:?}"), format!("{full:?}"));
});
