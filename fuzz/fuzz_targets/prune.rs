//! Parsing and pruning in all three dialects: never a panic; a pruned body re-parses, stays
//! within the limit (as the pruner counts it), is deterministic, and keeps every tool result
//! with its call.
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use ctxgate::dialect::Dialect;
use ctxgate::prune::{prune, Budget, ChatRequest, Counter, Encoding, Outcome, View};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn counter() -> &'static Counter {
    static C: OnceLock<Counter> = OnceLock::new();
    C.get_or_init(|| Counter::new(Encoding::O200kBase).expect("counter"))
}

/// Per item, the (calls, answers) ids it holds, as the dialect pairs them.
fn ids(dialect: Dialect, m: &Value) -> (Vec<String>, Vec<String>) {
    let (mut calls, mut answers) = (Vec::new(), Vec::new());
    let s = |v: &Value| v.as_str().map(str::to_string);
    match dialect {
        Dialect::OpenAi => {
            for c in m["tool_calls"].as_array().into_iter().flatten() {
                calls.extend(s(&c["id"]));
            }
            answers.extend(s(&m["tool_call_id"]));
        }
        Dialect::Anthropic => {
            for b in m["content"].as_array().into_iter().flatten() {
                match b["type"].as_str() {
                    Some("tool_use") | Some("server_tool_use") => calls.extend(s(&b["id"])),
                    Some("tool_result") => answers.extend(s(&b["tool_use_id"])),
                    _ => {}
                }
            }
        }
        Dialect::Responses => match m["type"].as_str() {
            Some(t) if t.ends_with("_call_output") => answers.extend(s(&m["call_id"])),
            Some(t) if t.ends_with("_call") => calls.extend(s(&m["call_id"])),
            _ => {}
        },
    }
    (calls, answers)
}

/// A system/developer message: pinned on its own, whatever ids it carries (pairing is not its
/// business, and the API would refuse such a message anyway).
fn system(m: &Value) -> bool {
    matches!(m["role"].as_str(), Some("system" | "developer"))
}

/// The results that answer a call made before them (the pairs pruning must keep together).
fn paired(dialect: Dialect, items: &[Value]) -> HashSet<String> {
    let (mut seen, mut out) = (HashSet::new(), HashSet::new());
    for m in items.iter().filter(|m| !system(m)) {
        let (calls, answers) = ids(dialect, m);
        out.extend(answers.into_iter().filter(|a| seen.contains(a)));
        seen.extend(calls);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let dialect = [Dialect::OpenAi, Dialect::Anthropic, Dialect::Responses][first as usize % 3];
    let Ok(req) = ChatRequest::parse(dialect, body) else {
        return;
    };
    let limit = 200 + u64::from(first) * 16;
    let budget = Budget {
        hard_token_limit: limit,
        target_tokens: limit * 6 / 10,
        max_messages: u64::from(first % 7),
        keep_file_content_turns: u64::from(first % 3),
        min_file_lines: 3,
        ..Budget::default()
    };
    let view = View::new(1 << 20, Duration::from_secs(60));
    let out = prune(&req, &budget, &view, "fuzz", counter());
    let again = prune(&req, &budget, &View::new(1 << 20, Duration::from_secs(60)), "f2", counter());
    assert_eq!(out, again, "pruning is deterministic");
    if let Outcome::Pruned { body: pruned, summary } = &out {
        let re = ChatRequest::parse(dialect, pruned).expect("a pruned body re-parses");
        if !summary.overflow_forwarded {
            assert!(summary.tokens_after <= limit, "{summary:?}");
        }
        assert_eq!(counter().count_request(&re), summary.tokens_after);
        let v: Value = serde_json::from_slice(pruned).expect("json");
        let items = v[dialect.items_key()].as_array().cloned().unwrap_or_default();
        let orig: Value = serde_json::from_slice(body).expect("json");
        let orig_items = orig[dialect.items_key()].as_array().cloned().unwrap_or_default();
        let pairs = paired(dialect, &orig_items);
        let kept_calls: HashSet<String> = items.iter().flat_map(|m| ids(dialect, m).0).collect();
        for m in items.iter().filter(|m| !system(m)) {
            for a in ids(dialect, m).1 {
                assert!(
                    !pairs.contains(&a) || kept_calls.contains(&a),
                    "tool result {a} forwarded without its call"
                );
            }
        }
    }
});
