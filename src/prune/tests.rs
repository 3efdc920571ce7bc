//! Tests of the pruning core: the cookbook's token counts, the seed-like fixtures, the
//! cache-stable cut over a growing conversation, overflow, and properties over generated
//! conversations in both dialects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::dialect::Dialect;

mod resume;

fn counter() -> Counter {
    Counter::new(Encoding::O200kBase).unwrap()
}

fn view() -> View {
    View::new(64 << 20, Duration::from_secs(600))
}

fn seed_budget() -> Budget {
    Budget {
        hard_token_limit: 4000,
        target_tokens: 2400,
        max_messages: 5,
        keep_file_content_turns: 1,
        min_file_lines: 20,
        ..Budget::default()
    }
}

fn count_body(dialect: Dialect, body: &[u8]) -> u64 {
    let req = ChatRequest::parse(dialect, body).unwrap();
    counter().count_request(&req)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(path).unwrap()
}

/// The dialect a test body is written in, as far as its items key tells: Responses bodies
/// hold `input`.
fn dialect_of(body: &[u8]) -> Dialect {
    let v: Value = serde_json::from_slice(body).unwrap();
    if v.get("input").is_some() {
        Dialect::Responses
    } else {
        Dialect::OpenAi
    }
}

fn messages(body: &[u8]) -> Vec<Value> {
    let v: Value = serde_json::from_slice(body).unwrap();
    v[dialect_of(body).items_key()].as_array().unwrap().clone()
}

fn raw_messages(body: &[u8]) -> Vec<String> {
    let req = ChatRequest::parse(dialect_of(body), body).unwrap();
    (0..req.message_count())
        .map(|i| String::from_utf8(req.raw(i).to_vec()).unwrap())
        .collect()
}

// ---------------------------------------------------------------- counting (cookbook)

fn cookbook_messages(model: &str) -> Vec<u8> {
    json!({"model": model, "messages": [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}
    ]})
    .to_string()
    .into_bytes()
}

fn cookbook_tools(model: &str) -> Vec<u8> {
    json!({"model": model, "tools": [{"type": "function", "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
        }, "required": ["location"]}
    }}], "messages": [
        {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
        {"role": "user", "content": "What's the weather like in San Francisco?"}
    ]})
    .to_string()
    .into_bytes()
}

#[test]
fn cookbook_message_counts() {
    for (model, want) in [
        ("gpt-3.5-turbo", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ] {
        assert_eq!(
            count_body(Dialect::OpenAi, &cookbook_messages(model)),
            want,
            "{model}"
        );
    }
}

#[test]
fn cookbook_tool_counts() {
    for (model, want) in [
        ("gpt-3.5-turbo", 105),
        ("gpt-4", 105),
        ("gpt-4o", 101),
        ("gpt-4o-mini", 101),
    ] {
        assert_eq!(
            count_body(Dialect::OpenAi, &cookbook_tools(model)),
            want,
            "{model}"
        );
    }
}

#[test]
fn unknown_model_uses_default_encoding() {
    let body = cookbook_messages("glm-4.6");
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    assert_eq!(
        Counter::new(Encoding::O200kBase)
            .unwrap()
            .count_request(&req),
        124
    );
    assert_eq!(
        Counter::new(Encoding::Cl100kBase)
            .unwrap()
            .count_request(&req),
        129
    );
}

// ---------------------------------------------------------------- parsing

#[test]
fn parse_errors() {
    assert!(matches!(
        ChatRequest::parse(Dialect::OpenAi, b"nope"),
        Err(ParseError::Json(_))
    ));
    assert!(matches!(
        ChatRequest::parse(Dialect::OpenAi, b"[1]"),
        Err(ParseError::NotObject)
    ));
    assert!(matches!(
        ChatRequest::parse(Dialect::OpenAi, b"{\"model\":\"x\"}"),
        Err(ParseError::NoMessages("messages"))
    ));
    assert!(matches!(
        ChatRequest::parse(Dialect::OpenAi, b"{\"messages\":{}}"),
        Err(ParseError::MessagesNotArray("messages"))
    ));
    assert!(matches!(
        ChatRequest::parse(Dialect::OpenAi, b"{\"messages\":[{\"role\":\"user\"},3]}"),
        Err(ParseError::MessageNotObject("messages", 1))
    ));
}

#[test]
fn accessors() {
    let body = br#"{"model":"gpt-4o","max_completion_tokens":321,"stream":true,"user":"u1",
        "metadata":{"conversation_id":"c-9","n":7},"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}]}"#;
    let req = ChatRequest::parse(Dialect::OpenAi, body).unwrap();
    assert_eq!(req.model(), Some("gpt-4o"));
    assert_eq!(req.max_output_tokens(), Some(321));
    assert!(req.is_stream());
    assert_eq!(req.message_count(), 2);
    assert_eq!(req.dialect(), Dialect::OpenAi);
    assert_eq!(
        req.field_str("metadata.conversation_id").as_deref(),
        Some("c-9")
    );
    assert_eq!(req.field_str("metadata.n").as_deref(), Some("7"));
    assert_eq!(req.field_str("user").as_deref(), Some("u1"));
    assert_eq!(req.field_str("metadata.missing"), None);
    let fp = req.fingerprint("openai");
    assert_eq!(fp.len(), 32);
    assert_eq!(fp, req.fingerprint("openai"));
    assert_ne!(fp, req.fingerprint("other"));
    // Growing the conversation keeps the fingerprint.
    let grown = br#"{"model":"gpt-4o","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#;
    assert_eq!(
        ChatRequest::parse(Dialect::OpenAi, grown)
            .unwrap()
            .fingerprint("openai"),
        fp
    );
    let a = br#"{"model":"claude","max_tokens":99,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(
        ChatRequest::parse(Dialect::Anthropic, a)
            .unwrap()
            .max_output_tokens(),
        Some(99)
    );
}

#[test]
fn keys_known_unknown_and_escaped_are_kept_and_scalars_read_only_as_their_types() {
    // A known key, an unknown one, a known one spelt with an escape (JSON's same name), and
    // scalars of the wrong type: read as absent, as the `Value` reading did.
    let body = br#"{"mod\u0065l":"gpt-\u0034o","x_vendor_flag":{"a":[1]},"max_tokens":32.5,"max_completion_tokens":-1,"max_output_tokens":7,"stream":"yes","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
    let req = ChatRequest::parse(Dialect::OpenAi, body).unwrap();
    assert_eq!(req.model(), Some("gpt-4o"));
    assert_eq!(req.max_output_tokens(), Some(7));
    assert!(!req.is_stream());
    let m = req.raw(0).to_vec();
    let out = req.serialise(std::iter::once(&m[..]), None);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"model":"gpt-\u0034o","x_vendor_flag":{"a":[1]},"max_tokens":32.5,"max_completion_tokens":-1,"max_output_tokens":7,"stream":"yes","messages":[{"role":"user","content":"hi"}],"temperature":0}"#
    );
    let (fields, ..) = req.parts();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "model",
            "x_vendor_flag",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "stream",
            "messages",
            "temperature"
        ]
    );
    /// The head before the messages; then the model, max output tokens, stream and keys.
    type Case<'a> = (&'a str, Option<&'a str>, Option<u64>, bool, &'a [&'a str]);
    let cases: [Case; 8] = [
        (
            r#""model":"m","max_tokens":1e3,"stream":true"#,
            Some("m"),
            None,
            true,
            &["model", "max_tokens", "stream"],
        ),
        (
            r#""model":"m","max_tokens":32.0"#,
            Some("m"),
            None,
            false,
            &["model", "max_tokens"],
        ),
        (
            r#""model":5,"max_tokens":18446744073709551615"#,
            None,
            Some(u64::MAX),
            false,
            &["model", "max_tokens"],
        ),
        (
            r#""model":null,"max_tokens":"9","stream":1"#,
            None,
            None,
            false,
            &["model", "max_tokens", "stream"],
        ),
        // A prefix of a known key is its own key; the last of a repeated key counts.
        (
            r#""max_token":5,"model":"a","model":"b","max_tokens":3,"max_tokens":4"#,
            Some("b"),
            Some(4),
            false,
            &["max_token", "model", "model", "max_tokens", "max_tokens"],
        ),
        (
            r#""x_\u00e9t\u00e9":1,"stream":false,"stream":true"#,
            None,
            None,
            true,
            &["x_\u{e9}t\u{e9}", "stream", "stream"],
        ),
        (
            r#""max_completion_tokens":12,"max_tokens":99"#,
            None,
            Some(12),
            false,
            &["max_completion_tokens", "max_tokens"],
        ),
        (
            r#""model":{"id":"m"},"stream":"true""#,
            None,
            None,
            false,
            &["model", "stream"],
        ),
    ];
    for (head, model, max, stream, keys) in cases {
        let body = format!(r#"{{{head},"messages":[{{"role":"user","content":"hi"}}]}}"#);
        let req = ChatRequest::parse(Dialect::OpenAi, body.as_bytes()).unwrap();
        assert_eq!(req.model(), model, "{head}");
        assert_eq!(req.max_output_tokens(), max, "{head}");
        assert_eq!(req.is_stream(), stream, "{head}");
        let (fields, ..) = req.parts();
        let got: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        let want: Vec<&str> = keys.iter().copied().chain(["messages"]).collect();
        assert_eq!(got, want, "{head}");
        let m = req.raw(0).to_vec();
        let out = req.serialise(std::iter::once(&m[..]), None);
        let reparsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let original: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(reparsed, original, "{head}");
    }
}

// ---------------------------------------------------------------- fixtures

#[test]
fn fixture_size_is_seed_like() {
    let body = fixture("openai-seed.json");
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    assert_eq!(req.message_count(), 22);
    let chars: usize = req.messages().iter().map(|m| m.chars).sum();
    let tokens = counter().count_request(&req);
    assert!(
        (52_000..=57_000).contains(&tokens),
        "{tokens} tokens, {chars} chars"
    );
    assert!(
        (205_000..=235_000).contains(&chars),
        "{tokens} tokens, {chars} chars"
    );
}

#[test]
fn seed_fixture_pruned_to_budget() {
    let body = fixture("openai-seed.json");
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let c = counter();
    let out = prune(&req, &seed_budget(), &view(), "seed", &c);
    let Outcome::Pruned {
        body: pruned,
        summary,
    } = out
    else {
        panic!("{out:?}")
    };
    assert!(summary.tokens_after <= 4000, "{summary:?}");
    assert!(summary.messages_after <= 5, "{summary:?}");
    assert_eq!(summary.messages_before, 22);
    assert_eq!(summary.messages_dropped, 22 - summary.messages_after);
    assert_eq!(count_body(Dialect::OpenAi, &pruned), summary.tokens_after);
    assert!(!summary.tokens_before_exact);
    assert!(summary.tokens_before > 40_000);
    let orig = raw_messages(&body);
    let kept = raw_messages(&pruned);
    // System and the newest messages, byte for byte; the task pinned.
    assert_eq!(kept[0], orig[0]);
    assert_eq!(kept[kept.len() - 2..], orig[orig.len() - 2..]);
    assert!(kept.contains(&orig[16]), "the task message is pinned");
    check_structure(Dialect::OpenAi, &body, &pruned);
    check_fields(&body, &pruned);
}

#[test]
fn anthropic_fixture_pruned() {
    let body = fixture("anthropic-seed.json");
    let req = ChatRequest::parse(Dialect::Anthropic, &body).unwrap();
    let out = prune(&req, &seed_budget(), &view(), "a", &counter());
    let Outcome::Pruned {
        body: pruned,
        summary,
    } = out
    else {
        panic!("{out:?}")
    };
    assert!(
        summary.tokens_after <= 4000 && summary.messages_after <= 5,
        "{summary:?}"
    );
    assert_eq!(
        count_body(Dialect::Anthropic, &pruned),
        summary.tokens_after
    );
    let msgs = messages(&pruned);
    assert_eq!(msgs[0]["role"], "user");
    check_structure(Dialect::Anthropic, &body, &pruned);
    check_fields(&body, &pruned);
}

#[test]
fn fixture_with_larger_budget_elides_old_files_and_keeps_recent() {
    let body = fixture("openai-seed.json");
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let budget = Budget {
        hard_token_limit: 20_000,
        target_tokens: 12_000,
        max_messages: 0,
        ..seed_budget()
    };
    let out = prune(&req, &budget, &view(), "big", &counter());
    let Outcome::Pruned {
        body: pruned,
        summary,
    } = out
    else {
        panic!("{out:?}")
    };
    assert!(summary.files_elided > 0, "{summary:?}");
    assert!(summary.tokens_after <= 12_000, "{summary:?}");
    let text = String::from_utf8(pruned.clone()).unwrap();
    assert!(text.contains("[ctxgate: elided file "), "{text}");
    check_structure(Dialect::OpenAi, &body, &pruned);
    // Deterministic: a fresh view gives the same bytes; pruning the output again elides
    // nothing more (idempotent).
    let again = prune(&req, &budget, &view(), "big2", &counter());
    assert!(matches!(&again, Outcome::Pruned { body, .. } if *body == pruned));
    // Pruning the output again with the same budget changes nothing.
    let req2 = ChatRequest::parse(Dialect::OpenAi, &pruned).unwrap();
    let o = prune(&req2, &budget, &view(), "idem", &counter());
    assert!(matches!(o, Outcome::Unchanged(_)), "{o:?}");
}

#[test]
fn shadow_reports_but_forwards_original() {
    let body = fixture("openai-seed.json");
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let enforce = prune(&req, &seed_budget(), &view(), "e", &counter());
    let shadow = prune(
        &req,
        &Budget {
            mode: Mode::Shadow,
            ..seed_budget()
        },
        &view(),
        "s",
        &counter(),
    );
    let Outcome::Shadow(s) = shadow else {
        panic!("{shadow:?}")
    };
    assert_eq!(Some(&s), enforce.summary());
}

#[test]
fn within_budget_is_unchanged_and_exact() {
    let body = cookbook_tools("gpt-4o");
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let out = prune(&req, &seed_budget(), &view(), "x", &counter());
    let Outcome::Unchanged(s) = out else {
        panic!("{out:?}")
    };
    assert_eq!(
        (s.tokens_before, s.tokens_after, s.tokens_before_exact),
        (101, 101, true)
    );
    assert_eq!(
        (s.messages_before, s.messages_after, s.messages_dropped),
        (2, 2, 0)
    );
}

#[test]
fn a_new_conversation_reuses_counts_of_parts_seen_in_another() {
    // An agent's long system prompt and tool definitions, in two conversations.
    let system = "You are a careful coding agent. Read the code before you change it. ".repeat(20);
    let tools = json!([{"type": "function", "function": {
        "name": "read_file",
        "description": "Reads a file of the repository and returns its text. ".repeat(8),
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]);
    let body = |task: &str| {
        json!({"model": "gpt-4o", "tools": tools, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": task}]})
        .to_string()
        .into_bytes()
    };
    let (c, v) = (counter(), view());
    let a = ChatRequest::parse(Dialect::OpenAi, &body("fix the parser")).unwrap();
    prune(&a, &seed_budget(), &v, "conv-a", &c);
    assert_eq!(c.memo_hits(), 0);
    let b = ChatRequest::parse(Dialect::OpenAi, &body("write the docs")).unwrap();
    let out = prune(&b, &seed_budget(), &v, "conv-b", &c);
    // The system message and the tools came from the memo; the task was counted.
    assert_eq!(c.memo_hits(), 2);
    // Same figures as a counter that never saw the first conversation.
    let fresh = prune(&b, &seed_budget(), &view(), "conv-b", &counter());
    let (s, f) = (out.summary().unwrap(), fresh.summary().unwrap());
    assert_eq!(
        (s.tokens_before, s.tokens_after, s.tokens_before_exact),
        (f.tokens_before, f.tokens_after, f.tokens_before_exact)
    );
    assert_eq!(s.tokens_before, c.count_request(&b));
}

// ---------------------------------------------------------------- overflow

fn big_task_body(words: usize) -> Vec<u8> {
    json!({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "summarise this: ".to_string() + &"lorem ipsum dolor ".repeat(words)}
    ]})
    .to_string()
    .into_bytes()
}

#[test]
fn overflow_reject_message() {
    let body = big_task_body(3000);
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let c = counter();
    let total = c.count_request(&req);
    let out = prune(&req, &seed_budget(), &view(), "r", &c);
    let Outcome::Rejected(r) = out else {
        panic!("{out:?}")
    };
    // Pinned: everything but the old question/answer pair.
    let pinned_req = ChatRequest::parse(
        Dialect::OpenAi,
        &json!({"model":"gpt-4o","messages":[messages(&body)[0], messages(&body)[3]]})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    // Counting stops once the limit is passed: the figure is a lower bound over the limit.
    assert!(r.pinned_tokens > 4000 && r.pinned_tokens <= c.count_request(&pinned_req));
    assert!(r.pinned_tokens < total);
    assert_eq!(r.limit, 4000);
    assert_eq!(
        r.message,
        format!("prompt needs at least {} tokens for its pinned part (system, tools, task, newest tool exchange and newest message), over the limit of 4000 (prune.hard_token_limit)", r.pinned_tokens)
    );
}

#[test]
fn rejecting_a_huge_message_counts_about_the_budget() {
    // A million repeats of one character: the request is rejected after counting a few
    // budgets' worth of it, not all of it.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "a".repeat(1_000_000)}]})
        .to_string()
        .into_bytes();
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let Outcome::Rejected(r) = prune(&req, &seed_budget(), &view(), "huge", &counter()) else {
        panic!("not rejected")
    };
    assert!(
        r.pinned_tokens > 4000 && r.pinned_tokens < 40_000,
        "{}",
        r.pinned_tokens
    );
    assert!(
        r.message.starts_with("prompt needs at least "),
        "{}",
        r.message
    );
}

#[test]
fn overflow_truncate_and_forward() {
    let body = big_task_body(3000);
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let c = counter();
    let out = prune(
        &req,
        &Budget {
            on_overflow: OnOverflow::Truncate,
            ..seed_budget()
        },
        &view(),
        "t",
        &c,
    );
    let Outcome::Pruned {
        body: pruned,
        summary,
    } = out
    else {
        panic!("{out:?}")
    };
    assert!(summary.truncated);
    assert!(summary.tokens_after <= 4000);
    assert_eq!(count_body(Dialect::OpenAi, &pruned), summary.tokens_after);
    let msgs = messages(&pruned);
    assert_eq!(msgs.len(), 2);
    let content = msgs[1]["content"].as_str().unwrap();
    assert!(content.starts_with("summarise this: lorem"));
    assert!(content.contains("\n[ctxgate: truncated "));
    let out = prune(
        &req,
        &Budget {
            on_overflow: OnOverflow::Forward,
            ..seed_budget()
        },
        &view(),
        "f",
        &c,
    );
    let Outcome::Unchanged(s) = out else {
        panic!("{out:?}")
    };
    assert!(s.overflow_forwarded);
    assert_eq!(s.tokens_after, c.count_request(&req));
}

#[test]
fn reserve_output_lowers_the_limit() {
    let body = json!({"model":"gpt-4o","max_tokens":3000,"messages":[
        {"role":"user","content":"a ".repeat(1500)}]})
    .to_string()
    .into_bytes();
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let b = Budget {
        reserve_output: true,
        ..seed_budget()
    };
    let out = prune(&req, &b, &view(), "ro", &counter());
    let Outcome::Rejected(r) = out else {
        panic!("{out:?}")
    };
    assert_eq!(r.limit, 1000);
    assert!(r.message.contains("prune.reserve_output"), "{}", r.message);
    assert!(matches!(
        prune(&req, &seed_budget(), &view(), "ro2", &counter()),
        Outcome::Unchanged(_)
    ));
}

#[test]
fn pathological_message_does_not_panic() {
    for text in [
        "a".repeat(1_000_000),
        " ".repeat(1_000_000),
        "\u{3000}".repeat(400_000),
    ] {
        let body = json!({"model":"gpt-4o","messages":[
            {"role":"user","content": text},
            {"role":"assistant","content":"ok"},
            {"role":"user","content":"and now?"}]})
        .to_string()
        .into_bytes();
        let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
        let out = prune(&req, &seed_budget(), &view(), "p", &counter());
        let s = out.summary().unwrap();
        assert!(s.messages_after == 2 || s.messages_after == 3, "{s:?}");
    }
}

// ---------------------------------------------------------------- growing conversation

/// A 40-turn agent conversation: each turn a user message (sometimes with a file), a tool
/// loop of 0–2 calls, and an answer.
fn grow_conversation(turns: usize) -> Vec<Vec<Value>> {
    let mut msgs = vec![json!({"role":"system","content":"You are an agent. Use the tools."})];
    let mut requests = Vec::new();
    let mut call = 0;
    for t in 0..turns {
        let mut user = format!("Turn {t}: please look at module {t} and fix the bug in it.");
        if t % 3 == 0 {
            let file: String = (0..30)
                .map(|i| format!("def f{t}_{i}(x):\n    return x * {i} + {t}\n"))
                .collect();
            user.push_str(&format!("\n```python src/m{t}.py\n{file}```\n"));
        }
        msgs.push(json!({"role":"user","content": user}));
        requests.push(msgs.clone());
        for k in 0..(t % 3) {
            call += 1;
            let id = format!("call_{call}");
            msgs.push(json!({"role":"assistant","content":null,"tool_calls":[
                {"id": id, "type":"function","function":{"name":"read_file","arguments": format!("{{\"path\":\"src/m{t}_{k}.py\"}}")}}]}));
            let out: String = (0..12)
                .map(|i| format!("line {i} of m{t}_{k}: value = compute({i}, {k})\n"))
                .collect();
            msgs.push(json!({"role":"tool","tool_call_id": id, "content": out}));
            requests.push(msgs.clone());
        }
        msgs.push(json!({"role":"assistant","content": format!("Fixed module {t}: the loop bound was off by one. {}", "Details follow. ".repeat(20))}));
    }
    requests
}

#[test]
fn growing_conversation_keeps_a_stable_prefix() {
    let c = counter();
    let v = view();
    let budget = Budget {
        hard_token_limit: 4000,
        target_tokens: 2400,
        max_messages: 0,
        keep_file_content_turns: 1,
        min_file_lines: 10,
        ..Budget::default()
    };
    let mut prev: Option<(Vec<String>, usize)> = None; // forwarded raws, index of its newest turn's first forwarded message
    let (mut turns, mut stable, mut moved, mut pruned_turns) = (0, 0, 0, 0);
    for msgs in grow_conversation(40) {
        let body = json!({"model":"gpt-4o","messages": msgs})
            .to_string()
            .into_bytes();
        let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
        let out = prune(&req, &budget, &v, "grow", &c);
        let forwarded = match &out {
            Outcome::Unchanged(_) => raw_messages(&body),
            Outcome::Pruned { body: b, summary } => {
                assert!(summary.tokens_after <= 4000);
                assert_eq!(count_body(Dialect::OpenAi, b), summary.tokens_after);
                pruned_turns += 1;
                if summary.cut_moved {
                    moved += 1;
                }
                check_structure(Dialect::OpenAi, &body, b);
                raw_messages(b)
            }
            other => panic!("{other:?}"),
        };
        // Index (in `forwarded`) of the user message opening this request's newest turn.
        let last_user = forwarded
            .iter()
            .rposition(|m| m.contains("\"role\":\"user\""))
            .unwrap_or(0);
        if let Some((p, p_last_user)) = &prev {
            turns += 1;
            let stable_part = &p[..*p_last_user];
            if forwarded.len() >= stable_part.len()
                && forwarded[..stable_part.len()] == *stable_part
            {
                stable += 1;
            }
        }
        prev = Some((forwarded, last_user));
    }
    assert!(pruned_turns > 20, "{pruned_turns}");
    assert!(moved >= 3, "cut moved {moved} times");
    assert!(
        stable * 10 >= turns * 9,
        "{stable} of {turns} turns kept the prefix, cut moved {moved} times"
    );
    assert!(
        v.hits() >= 70 && v.misses() == 1,
        "{} {}",
        v.hits(),
        v.misses()
    );
}

#[test]
fn max_messages_moves_the_cut_every_turn() {
    let c = counter();
    let v = view();
    let budget = Budget {
        hard_token_limit: 100_000,
        target_tokens: 60_000,
        max_messages: 4,
        ..Budget::default()
    };
    let mut moved = 0;
    for msgs in grow_conversation(10).into_iter().skip(6) {
        let body = json!({"model":"gpt-4o","messages": msgs})
            .to_string()
            .into_bytes();
        let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
        let Outcome::Pruned { summary, .. } = prune(&req, &budget, &v, "cap", &c) else {
            panic!()
        };
        assert!(summary.messages_after <= 4 || summary.messages_after == 1 + 1 + 2);
        moved += usize::from(summary.cut_moved);
    }
    assert!(moved >= 5, "{moved}");
}

#[test]
fn warm_request_reuses_counts() {
    let mut v: Value = serde_json::from_slice(&fixture("openai-seed.json")).unwrap();
    let body = serde_json::to_vec(&v).unwrap();
    let c = counter();
    let view = view();
    let first = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let a = prune(&first, &seed_budget(), &view, "w", &c);
    v["messages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role":"assistant","content":"Done: the export is in place."}));
    let grown = serde_json::to_vec(&v).unwrap();
    let second = ChatRequest::parse(Dialect::OpenAi, &grown).unwrap();
    let b = prune(&second, &seed_budget(), &view, "w", &c);
    assert!(!a.summary().unwrap().view_hit);
    assert!(b.summary().unwrap().view_hit);
    assert_eq!((view.hits(), view.misses()), (1, 1));
    assert_eq!(view.entry_count(), 1);
}

// ---------------------------------------------------------------- structure checks

/// Index in `orig` of each forwarded message (elided ones matched by role and tool ids).
fn origin(orig: &[Value], orig_raw: &[String], out: &[Value], out_raw: &[String]) -> Vec<usize> {
    let mut idx = Vec::new();
    let mut from = 0;
    for (j, m) in out.iter().enumerate() {
        let pos = (from..orig.len())
            .find(|&i| orig_raw[i] == out_raw[j])
            .or_else(|| {
                // An elided message: same bytes up to its first marker (or 80 bytes).
                let mark = out_raw[j].find("[ctxgate: ")?;
                let want = mark.min(80);
                (from..orig.len()).find(|&i| {
                    let compact = serde_json::to_string(&orig[i]).unwrap();
                    let lcp = compact
                        .bytes()
                        .zip(out_raw[j].bytes())
                        .take_while(|(a, b)| a == b)
                        .count();
                    lcp >= want
                        && orig[i]["role"] == m["role"]
                        && orig[i].get("tool_call_id") == m.get("tool_call_id")
                        && orig[i].get("tool_calls") == m.get("tool_calls")
                        && orig[i].get("call_id") == m.get("call_id")
                        && orig[i].get("type") == m.get("type")
                })
            })
            .unwrap_or_else(|| {
                panic!(
                    "forwarded message {j} not found in the original: {}",
                    out_raw[j]
                )
            });
        idx.push(pos);
        from = pos + 1;
    }
    idx
}

fn ids(m: &Value, dialect: Dialect) -> (Vec<String>, Vec<String>) {
    let mut calls = Vec::new();
    let mut answers = Vec::new();
    match dialect {
        Dialect::OpenAi => {
            for c in m["tool_calls"].as_array().into_iter().flatten() {
                calls.push(c["id"].as_str().unwrap().to_string());
            }
            if let Some(id) = m["tool_call_id"].as_str() {
                answers.push(id.to_string());
            }
        }
        Dialect::Anthropic => {
            for b in m["content"].as_array().into_iter().flatten() {
                match b["type"].as_str() {
                    Some("tool_use") => calls.push(b["id"].as_str().unwrap().to_string()),
                    Some("tool_result") => {
                        answers.push(b["tool_use_id"].as_str().unwrap().to_string())
                    }
                    _ => {}
                }
            }
        }
        Dialect::Responses => match m["type"].as_str() {
            Some("function_call") => calls.push(m["call_id"].as_str().unwrap().to_string()),
            Some("function_call_output") => {
                answers.push(m["call_id"].as_str().unwrap().to_string())
            }
            _ => {}
        },
    }
    (calls, answers)
}

/// Kept history = system prefix + optional pinned task + one contiguous tail ending at the
/// newest message; no orphaned call or result; Anthropic starts with a user message.
fn check_structure(dialect: Dialect, orig_body: &[u8], out_body: &[u8]) {
    let orig = messages(orig_body);
    let out = messages(out_body);
    let orig_raw = raw_messages(orig_body);
    let out_raw = raw_messages(out_body);
    let idx = origin(&orig, &orig_raw, &out, &out_raw);
    let sys = orig
        .iter()
        .take_while(|m| m["role"] == "system" || m["role"] == "developer")
        .count();
    assert_eq!(
        &idx[..sys.min(idx.len())],
        &(0..sys).collect::<Vec<_>>()[..],
        "system prefix kept"
    );
    assert_eq!(
        idx.last().copied(),
        Some(orig.len() - 1),
        "newest message kept"
    );
    // Every system message, wherever it stands, is kept.
    let is_sys = |i: usize| orig[i]["role"] == "system" || orig[i]["role"] == "developer";
    for i in (0..orig.len()).filter(|&i| is_sys(i)) {
        assert!(idx.contains(&i), "system message {i} dropped: kept {idx:?}");
    }
    // The newest turn's newest tool exchange is kept, whatever system notes follow it.
    let genuine_at = |i: usize| {
        let m = &orig[i];
        m["role"] == "user"
            && !(dialect == Dialect::Anthropic
                && m["content"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|b| b["type"] == "tool_result")))
    };
    let task_at = (0..orig.len()).rev().find(|&i| genuine_at(i));
    let exchange = (task_at.unwrap_or(0)..orig.len())
        .rev()
        .find(|&i| !ids(&orig[i], dialect).0.is_empty());
    if let Some(e) = exchange {
        assert!(
            idx.contains(&e),
            "newest tool exchange {e} dropped: kept {idx:?}"
        );
    }
    // Apart from the system messages: a contiguous tail, allowing one gap right after the
    // pinned task.
    let rest: Vec<usize> = idx[sys..].iter().copied().filter(|&i| !is_sys(i)).collect();
    let rest = &rest[..];
    let gaps: Vec<usize> = (1..rest.len())
        .filter(|&k| (rest[k - 1] + 1..rest[k]).any(|i| !is_sys(i)))
        .collect();
    assert!(gaps.len() <= 1, "kept {idx:?}");
    if let Some(&g) = gaps.first() {
        // Everything before the gap is the task's unit, which opens the newest turn.
        let task = rest[..g]
            .iter()
            .copied()
            .find(|&i| orig[i]["role"] == "user")
            .unwrap_or_else(|| panic!("no task before the gap: {idx:?}"));
        let genuine = |m: &Value| {
            m["role"] == "user"
                && !(dialect == Dialect::Anthropic
                    && m["content"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|b| b["type"] == "tool_result")))
        };
        assert!(
            orig[task + 1..].iter().all(|m| !genuine(m)),
            "gap only inside the newest turn: {idx:?}"
        );
    }
    let mut calls = std::collections::HashSet::new();
    let mut answers = std::collections::HashSet::new();
    for m in &out {
        let (c, a) = ids(m, dialect);
        calls.extend(c);
        answers.extend(a);
    }
    let mut answered_in_orig = std::collections::HashSet::new();
    for m in &orig {
        answered_in_orig.extend(ids(m, dialect).1);
    }
    for a in &answers {
        assert!(calls.contains(a), "orphaned result {a}");
    }
    for c in &calls {
        assert!(
            !answered_in_orig.contains(c) || answers.contains(c),
            "call {c} without its result"
        );
    }
    if dialect == Dialect::Anthropic {
        assert_eq!(out[0]["role"], "user");
    }
    // Responses: a reasoning item goes with the item after it, both byte-identical.
    for (j, m) in out.iter().enumerate() {
        if m["type"] == "reasoning" {
            assert_eq!(out_raw[j], orig_raw[idx[j]], "reasoning item edited");
            assert!(
                j + 1 < out.len() && idx[j + 1] == idx[j] + 1,
                "reasoning item {} forwarded without the item after it: kept {idx:?}",
                idx[j]
            );
        }
    }
    for i in 1..orig.len() {
        if orig[i - 1]["type"] == "reasoning" && idx.contains(&i) {
            assert!(
                idx.contains(&(i - 1)),
                "item {i} lost its reasoning item: {idx:?}"
            );
        }
    }
}

/// Top-level fields other than `messages` are kept, raw and in order.
fn check_fields(orig_body: &[u8], out_body: &[u8]) {
    check_fields_except(orig_body, out_body, &[]);
}

#[test]
fn unknown_fields_and_raw_bytes_are_preserved() {
    let body = br#"{"zeta": {"b":1, "a":[1,2.50,3]},"model":"gpt-4o","messages":[
        {"role":"system","content":"sys"},
        {"role":"user","content":"first question with padding padding padding padding"},
        {"role":"assistant","content":"first answer", "extra_field": {"k": "v"}},
        {"role":"user", "content":"second   question",   "weird":  true}
    ],"alpha":   "x"}"#;
    let req = ChatRequest::parse(Dialect::OpenAi, body).unwrap();
    let budget = Budget {
        max_messages: 3,
        ..seed_budget()
    };
    let out = prune(&req, &budget, &view(), "u", &counter());
    let Outcome::Pruned { body: pruned, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(
        String::from_utf8(pruned).unwrap(),
        r#"{"zeta":{"b":1, "a":[1,2.50,3]},"model":"gpt-4o","messages":[{"role":"system","content":"sys"},{"role":"assistant","content":"first answer", "extra_field": {"k": "v"}},{"role":"user", "content":"second   question",   "weird":  true}],"alpha":"x"}"#
    );
}

// ---------------------------------------------------------------- properties

#[derive(Debug, Clone)]
struct GenTurn {
    user_words: usize,
    user_file_lines: usize,
    steps: Vec<(usize, usize)>, // (calls in the step, result lines)
    answer_words: usize,
    /// A `role: "system"` message right after the user message (OpenAI only: Anthropic's
    /// system prompt is a field, not a message).
    system_note: bool,
}

fn gen_turn() -> impl Strategy<Value = GenTurn> {
    (
        1usize..60,
        prop_oneof![Just(0usize), 5usize..60],
        prop::collection::vec((1usize..3, 1usize..40), 0..3),
        0usize..80,
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(user_words, user_file_lines, steps, answer_words, system_note)| GenTurn {
                user_words,
                user_file_lines,
                steps,
                answer_words,
                system_note,
            },
        )
}

/// A generated conversation as a request body; with `trailing_note` (OpenAI) a system note
/// after the last message, as an agent appends one after a large tool result.
fn render_with_note(
    turns: &[GenTurn],
    dialect: Dialect,
    end_in_tool: bool,
    trailing_note: bool,
) -> Vec<u8> {
    let mut msgs: Vec<Value> = Vec::new();
    match dialect {
        Dialect::OpenAi => msgs.push(json!({"role":"system","content":"You are a careful agent."})),
        Dialect::Responses => msgs.push(json!({"type":"message","role":"developer","content":[{"type":"input_text","text":"Sandbox: workspace-write."}]})),
        Dialect::Anthropic => {}
    }
    let mut call = 0;
    for (t, turn) in turns.iter().enumerate() {
        let mut text = format!("turn {t}: ") + &"please do the thing ".repeat(turn.user_words);
        if turn.user_file_lines > 0 {
            let file: String = (0..turn.user_file_lines)
                .map(|i| format!("let v{i} = {t} + {i};\n"))
                .collect();
            text += &format!("\n--- BEGIN FILE: src/f{t}.rs ---\n{file}--- END FILE: src/f{t}.rs ---\n```rust src/g{t}.rs\n{file}```\n");
        }
        msgs.push(match dialect {
            Dialect::OpenAi => json!({"role":"user","content": text}),
            Dialect::Anthropic => json!({"role":"user","content":[{"type":"text","text": text}]}),
            Dialect::Responses => json!({"type":"message","role":"user","content":[{"type":"input_text","text": text}]}),
        });
        let note = format!("note {t}: the working directory is /repo/{t}");
        match dialect {
            _ if !turn.system_note => {}
            Dialect::OpenAi => msgs.push(json!({"role":"system","content": note})),
            Dialect::Responses => msgs.push(json!({"role":"developer","content": note})),
            Dialect::Anthropic => {}
        }
        let last_turn = t + 1 == turns.len();
        for (s, &(n_calls, lines)) in turn.steps.iter().enumerate() {
            let result: String = (0..lines)
                .map(|i| format!("out {i}: ok {t} {s}\n"))
                .collect();
            let ids: Vec<String> = (0..n_calls)
                .map(|_| {
                    call += 1;
                    format!("c{call}")
                })
                .collect();
            match dialect {
                Dialect::OpenAi => {
                    msgs.push(json!({"role":"assistant","content":null,"tool_calls": ids.iter().map(|id|
                        json!({"id": id, "type":"function","function":{"name":"run","arguments":"{\"cmd\":\"ls\"}"}})).collect::<Vec<_>>()}));
                    for id in &ids {
                        msgs.push(json!({"role":"tool","tool_call_id": id, "content": result}));
                    }
                }
                Dialect::Anthropic => {
                    msgs.push(json!({"role":"assistant","content": ids.iter().map(|id|
                        json!({"type":"tool_use","id": id,"name":"run","input":{"cmd":"ls"}})).collect::<Vec<_>>()}));
                    let mut blocks: Vec<Value> = ids
                        .iter()
                        .map(|id| json!({"type":"tool_result","tool_use_id": id,"content": result}))
                        .collect();
                    // Claude Code puts notes beside tool results; they open no turn.
                    if turn.system_note {
                        blocks.push(json!({"type":"text","text": format!("<system-reminder>step {s}</system-reminder>")}));
                    }
                    msgs.push(json!({"role":"user","content": blocks}));
                }
                Dialect::Responses => {
                    // As Codex sends them: the reasoning item, the calls, then the outputs.
                    msgs.push(
                        json!({"type":"reasoning","id": format!("rs_{t}_{s}"),"summary":[],
                        "encrypted_content": format!("gAAAAB{}", "Qk9QUw".repeat(40 + s * 7))}),
                    );
                    for id in &ids {
                        msgs.push(json!({"type":"function_call","id": format!("fc_{id}"),"call_id": id,"name":"run","arguments":"{\"cmd\":\"ls\"}"}));
                    }
                    for id in &ids {
                        msgs.push(
                            json!({"type":"function_call_output","call_id": id,"output": result}),
                        );
                    }
                }
            }
        }
        if !last_turn || (!end_in_tool && turn.answer_words > 0) {
            let a = format!("answer {t}: ") + &"done and dusted ".repeat(turn.answer_words.max(1));
            msgs.push(match dialect {
                Dialect::OpenAi => json!({"role":"assistant","content": a}),
                Dialect::Anthropic => {
                    json!({"role":"assistant","content":[{"type":"text","text": a}]})
                }
                Dialect::Responses => {
                    json!({"type":"message","role":"assistant","content":[{"type":"output_text","text": a}]})
                }
            });
        }
    }
    match dialect {
        _ if !trailing_note => {}
        Dialect::OpenAi => {
            msgs.push(json!({"role":"system","content":"reminder: keep the answer short"}))
        }
        Dialect::Responses => msgs.push(
            json!({"type":"message","role":"system","content":[{"type":"input_text","text":"reminder: keep the answer short"}]}),
        ),
        Dialect::Anthropic => {}
    }
    let mut body = json!({"model":"gpt-4o","temperature":0.5});
    let obj = body.as_object_mut().unwrap();
    if dialect == Dialect::Anthropic {
        obj.insert("system".into(), json!([{"type":"text","text":"You are a careful agent.","cache_control":{"type":"ephemeral"}}]));
        obj.insert("max_tokens".into(), json!(256));
    }
    if dialect == Dialect::Responses {
        obj.insert("model".into(), json!("gpt-5"));
        obj.insert("instructions".into(), json!("You are a careful agent."));
        obj.insert("input".into(), Value::Array(msgs));
        obj.insert("tools".into(), json!([{"type":"function","name":"run","description":"Run a command.","strict":false,"parameters":{"type":"object","properties":{"cmd":{"type":"string","description":"Command."}}}}]));
        obj.insert("store".into(), json!(false));
        obj.insert("include".into(), json!(["reasoning.encrypted_content"]));
    } else {
        obj.insert("messages".into(), Value::Array(msgs));
        obj.insert("tools".into(), json!([{"type":"function","function":{"name":"run","description":"Run a command.","parameters":{"type":"object","properties":{"cmd":{"type":"string","description":"Command."}}}}}]));
    }
    obj.insert("zz_unknown".into(), json!({"keep": [1, 2, 3]}));
    body.to_string().into_bytes()
}

fn gen_budget() -> impl Strategy<Value = Budget> {
    (
        200u64..3000,
        prop_oneof![Just(0u64), 2u64..9],
        0u64..3,
        3u64..12,
        0usize..3,
        any::<bool>(),
    )
        .prop_map(
            |(hard, max_messages, keep, min_lines, ov, reserve)| Budget {
                hard_token_limit: hard,
                target_tokens: hard * 6 / 10,
                max_messages,
                keep_file_content_turns: keep,
                min_file_lines: min_lines,
                reserve_output: reserve,
                on_overflow: [
                    OnOverflow::Reject,
                    OnOverflow::Truncate,
                    OnOverflow::Forward,
                ][ov],
                mode: Mode::Enforce,
                default_encoding: Encoding::O200kBase,
                ..Budget::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pruning_properties(
        turns in prop::collection::vec(gen_turn(), 1..8),
        dialect in prop_oneof![Just(Dialect::OpenAi), Just(Dialect::Anthropic), Just(Dialect::Responses)],
        end_in_tool in any::<bool>(),
        trailing_note in any::<bool>(),
        budget in gen_budget(),
    ) {
        let anthropic = dialect == Dialect::Anthropic;
        let body = render_with_note(&turns, dialect, end_in_tool, trailing_note);
        let req = ChatRequest::parse(dialect, &body).unwrap();
        let c = counter();
        let v = view();
        let limit = budget.hard_token_limit - if budget.reserve_output && anthropic { 256 } else { 0 }.min(budget.hard_token_limit);
        let out = prune(&req, &budget, &v, "p", &c);
        match &out {
            Outcome::Unchanged(s) => {
                if !s.overflow_forwarded {
                    prop_assert!(s.tokens_after <= limit);
                    prop_assert!(s.tokens_before_exact);
                }
                prop_assert_eq!(s.tokens_after, c.count_request(&req));
            }
            Outcome::Pruned { body: pruned, summary } => {
                prop_assert!(summary.tokens_after <= limit, "{:?}", summary);
                prop_assert_eq!(count_body(dialect, pruned), summary.tokens_after);
                if !summary.truncated {
                    check_structure(dialect, &body, pruned);
                }
                check_fields(&body, pruned);
                // Deterministic, and shadow mode reports the same.
                let again = prune(&req, &budget, &view(), "q", &c);
                prop_assert_eq!(&again, &out);
                let shadow = prune(&req, &Budget { mode: Mode::Shadow, ..budget.clone() }, &view(), "s", &c);
                prop_assert_eq!(shadow, Outcome::Shadow(summary.clone()));
                // Same request again through the same view: same bytes.
                let warm = prune(&req, &budget, &v, "p", &c);
                prop_assert_eq!(&warm, &Outcome::Pruned { body: pruned.clone(), summary: Summary {
                    view_hit: true,
                    cut_moved: false,
                    // Counts cached by the first run may replace estimates.
                    tokens_before: warm.summary().unwrap().tokens_before,
                    tokens_before_exact: warm.summary().unwrap().tokens_before_exact,
                    ..summary.clone()
                } });
            }
            Outcome::Rejected(r) => {
                prop_assert_eq!(budget.on_overflow == OnOverflow::Reject || budget.on_overflow == OnOverflow::Truncate, true);
                prop_assert!(r.pinned_tokens > r.limit);
                prop_assert_eq!(r.limit, limit);
            }
            Outcome::Shadow(_) => prop_assert!(false, "enforce mode"),
        }
    }

    #[test]
    fn elision_is_idempotent(lines in 0usize..40, min_lines in 1u64..30, pre in "[a-z ]{0,40}") {
        let c = counter();
        let file: String = (0..lines).map(|i| format!("x{i}\n")).collect();
        let text = format!("{pre}\n```rust a/b.rs\n{file}```\ntail\n--- BEGIN FILE: q ---\n{file}--- END FILE: q ---\n");
        let once = elide::elide_text(&text, min_lines, &c, Encoding::O200kBase).map(|x| x.0).unwrap_or_else(|| text.clone());
        let twice = elide::elide_text(&once, min_lines, &c, Encoding::O200kBase).map(|x| x.0).unwrap_or_else(|| once.clone());
        prop_assert_eq!(&once, &twice);
        let again = elide::elide_text(&text, min_lines, &c, Encoding::O200kBase).map(|x| x.0).unwrap_or_else(|| text.clone());
        prop_assert_eq!(once, again);
    }
}

#[test]
fn system_turns_anywhere_and_the_newest_tool_exchange_stay_pinned() {
    // What a coding agent sends: its prompt, a second system turn with the environment, the
    // task, a first tool exchange, a second one with a large result, then a system note.
    let big = "line of output from the tool\n".repeat(400);
    let msgs = json!([
        {"role":"system","content":"You are a coding agent."},
        {"role":"system","content":"Working directory: /repo. Platform: linux. Agents: explore, plan."},
        {"role":"user","content":"Fix the failing test in src/lib.rs."},
        {"role":"assistant","content":null,"tool_calls":[{"id":"t1","type":"function","function":{"name":"read","arguments":"{\"p\":\"a\"}"}}]},
        {"role":"tool","tool_call_id":"t1","content":"old ".repeat(300)},
        {"role":"assistant","content":null,"tool_calls":[{"id":"t2","type":"function","function":{"name":"run","arguments":"{\"cmd\":\"cargo test\"}"}}]},
        {"role":"tool","tool_call_id":"t2","content": big},
        {"role":"system","content":"Reminder: the test output above is truncated."},
    ]);
    let body = json!({"model":"gpt-4o","messages": msgs})
        .to_string()
        .into_bytes();
    let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
    let c = counter();
    let total = c.count_request(&req);
    let budget = Budget {
        hard_token_limit: total - 100,
        target_tokens: total - 200,
        max_messages: 0,
        ..Budget::default()
    };
    let Outcome::Pruned { body: out, summary } = prune(&req, &budget, &view(), "agent", &c) else {
        panic!("expected pruning");
    };
    let kept = messages(&out);
    // Only the first, smaller exchange went: both system turns, the task, the newest exchange
    // and the note stay, in order.
    let roles: Vec<&str> = kept.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        ["system", "system", "user", "assistant", "tool", "system"]
    );
    assert_eq!(kept[1], msgs[1]);
    assert_eq!(kept[3], msgs[5]);
    assert_eq!(kept[4], msgs[6]);
    assert_eq!(kept[5], msgs[7]);
    assert_eq!(summary.messages_dropped, 2);
}

// ---------------------------------------------------------------- Responses API

/// A Codex-like Responses body: instructions, tools, a developer turn, the task, reasoning
/// before each call, a compaction item from an earlier compaction, and big tool outputs.
fn responses_body(steps: usize) -> (Vec<u8>, Vec<Value>) {
    let mut input = vec![
        json!({"type":"message","role":"developer","content":[{"type":"input_text","text":"<permissions>workspace-write</permissions>"}]}),
        json!({"type":"compaction","encrypted_content":"gAAAAABcompacted".repeat(50)}),
        json!({"type":"message","role":"user","content":[{"type":"input_text","text":"Make the tests pass."}]}),
    ];
    for s in 0..steps {
        input.push(json!({"type":"reasoning","id":format!("rs_{s}"),"summary":[{"type":"summary_text","text":"Look at the file."}],"content":null,"encrypted_content":format!("gAAAAB{s}").repeat(60)}));
        input.push(json!({"type":"function_call","id":format!("fc_{s}"),"call_id":format!("call_{s}"),"name":"shell","arguments":format!("{{\"command\":[\"cat\",\"f{s}.rs\"]}}")}));
        input.push(json!({"type":"function_call_output","call_id":format!("call_{s}"),"output": format!("fn f{s}() {{}}\n").repeat(300)}));
    }
    let body = json!({
        "model": "gpt-5-codex",
        "instructions": "You are Codex, a coding agent.",
        "input": input,
        "tools": [{"type":"function","name":"shell","description":"Runs a shell command.","strict":false,
                   "parameters":{"type":"object","properties":{"command":{"type":"array","items":{"type":"string"}}}}},
                  {"type":"custom","name":"apply_patch","description":"Applies a patch.","format":{"type":"grammar","syntax":"lark","definition":"start: begin_patch hunk+ end_patch\nbegin_patch: \"*** Begin Patch\" LF"}}],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "reasoning": {"effort":"medium","summary":"auto"},
        "store": false,
        "stream": true,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "019a-session",
    });
    (body.to_string().into_bytes(), input)
}

#[test]
fn responses_items_are_parsed_as_units() {
    let (body, input) = responses_body(3);
    let req = ChatRequest::parse(Dialect::Responses, &body).unwrap();
    assert_eq!(req.message_count(), input.len());
    assert_eq!(req.model(), Some("gpt-5-codex"));
    assert!(req.is_stream());
    assert_eq!(req.unprunable(), None);
    assert_eq!(
        req.field_str("prompt_cache_key").as_deref(),
        Some("019a-session")
    );
    // The same body read as chat completions has no messages.
    assert!(matches!(
        ChatRequest::parse(Dialect::OpenAi, &body),
        Err(ParseError::NoMessages("messages"))
    ));
    let s = br#"{"model":"gpt-5","input":"Say hi","instructions":"Be brief."}"#;
    let r = ChatRequest::parse(Dialect::Responses, s).unwrap();
    assert_eq!(r.unprunable(), Some(request::Unprunable::StringInput));
    // Instructions and the string count; the fingerprint depends on both.
    let other = br#"{"model":"gpt-5","input":"Say bye","instructions":"Be brief."}"#;
    let o = ChatRequest::parse(Dialect::Responses, other).unwrap();
    assert_ne!(r.fingerprint("openai"), o.fingerprint("openai"));
    assert!(counter().count_request(&r) > counter().count_request(&o) - 3);
    let p = br#"{"model":"gpt-5","previous_response_id":"resp_1","input":[{"role":"user","content":"go on"}]}"#;
    let r = ChatRequest::parse(Dialect::Responses, p).unwrap();
    assert_eq!(
        r.unprunable(),
        Some(request::Unprunable::PreviousResponseId)
    );
    let n = br#"{"model":"gpt-5","previous_response_id":null,"input":[{"role":"user","content":"go on"}]}"#;
    assert_eq!(
        ChatRequest::parse(Dialect::Responses, n)
            .unwrap()
            .unprunable(),
        None
    );
    assert!(matches!(
        ChatRequest::parse(Dialect::Responses, br#"{"model":"gpt-5"}"#),
        Err(ParseError::NoMessages("input"))
    ));
    assert!(matches!(
        ChatRequest::parse(Dialect::Responses, br#"{"input":[{"type":"message"},3]}"#),
        Err(ParseError::MessageNotObject("input", 1))
    ));
}

#[test]
fn responses_function_tools_count_like_chat_tools() {
    let c = counter();
    let chat = json!({"model":"gpt-5","messages":[{"role":"user","content":"hi"}],
        "tools":[{"type":"function","function":{"name":"get_weather","description":"Get the weather.",
        "parameters":{"type":"object","properties":{"city":{"type":"string","description":"City."}}}}}]});
    let resp = json!({"model":"gpt-5","input":[{"type":"message","role":"user","content":"hi"}],
        "tools":[{"type":"function","name":"get_weather","description":"Get the weather.","strict":true,
        "parameters":{"type":"object","properties":{"city":{"type":"string","description":"City."}}}}]});
    let a =
        c.count_request(&ChatRequest::parse(Dialect::OpenAi, chat.to_string().as_bytes()).unwrap());
    let b = c.count_request(
        &ChatRequest::parse(Dialect::Responses, resp.to_string().as_bytes()).unwrap(),
    );
    // The item's "type":"message" is bookkeeping, not text: the same count.
    assert_eq!(a, b);
}

#[test]
fn responses_pruning_keeps_reasoning_with_its_call_and_opaque_items_intact() {
    let (body, input) = responses_body(6);
    let req = ChatRequest::parse(Dialect::Responses, &body).unwrap();
    let c = counter();
    let total = c.count_request(&req);
    let budget = Budget {
        hard_token_limit: total / 2,
        target_tokens: total / 3,
        max_messages: 0,
        keep_file_content_turns: 0,
        ..Budget::default()
    };
    let out = prune(&req, &budget, &view(), "codex", &c);
    let Outcome::Pruned {
        body: pruned,
        summary,
    } = &out
    else {
        panic!("{out:?}")
    };
    assert!(summary.tokens_after <= budget.hard_token_limit);
    assert_eq!(count_body(Dialect::Responses, pruned), summary.tokens_after);
    check_structure(Dialect::Responses, &body, pruned);
    check_fields(&body, pruned);
    let kept = messages(pruned);
    let orig_raw = raw_messages(&body);
    let kept_raw = raw_messages(pruned);
    // The developer turn and the task are pinned; the compaction item, opaque, is either
    // forwarded byte for byte or dropped whole.
    assert_eq!(kept[0], input[0]);
    assert!(kept.iter().any(|m| m == &input[2]));
    for (k, m) in kept.iter().enumerate() {
        if m["type"] == "compaction" {
            assert_eq!(kept_raw[k], orig_raw[1]);
        }
    }
    // Whole steps went, oldest first; the newest step is whole and unedited.
    let n = kept.len();
    assert_eq!(&kept_raw[n - 3..], &orig_raw[orig_raw.len() - 3..]);
    assert_eq!(
        (kept.len() - 2 - usize::from(kept[1]["type"] == "compaction")) % 3,
        0
    );
}

#[test]
fn responses_elision_edits_tool_outputs_but_never_reasoning() {
    let file: String = (0..40).map(|i| format!("let x{i} = {i};\n")).collect();
    let fenced = format!("```rust src/a.rs\n{file}```\n");
    let input = json!([
        {"type":"message","role":"user","content":[{"type":"input_text","text":"task one"}]},
        {"type":"reasoning","id":"rs_1","summary":[],"content":[{"type":"reasoning_text","text": fenced}],"encrypted_content":"gAAAAB"},
        {"type":"function_call","call_id":"c1","name":"shell","arguments":"{}"},
        {"type":"function_call_output","call_id":"c1","output": fenced},
        {"type":"message","role":"assistant","content":[{"type":"output_text","text":"done one"}]},
        {"type":"message","role":"user","content":[{"type":"input_text","text": format!("task two {}", "pad ".repeat(400))}]},
    ]);
    let body = json!({"model":"gpt-5","input": input})
        .to_string()
        .into_bytes();
    let req = ChatRequest::parse(Dialect::Responses, &body).unwrap();
    let c = counter();
    let total = c.count_request(&req);
    let budget = Budget {
        hard_token_limit: total - 50,
        target_tokens: total - 60,
        max_messages: 0,
        keep_file_content_turns: 1,
        min_file_lines: 10,
        ..Budget::default()
    };
    let out = prune(&req, &budget, &view(), "e", &c);
    let Outcome::Pruned {
        body: pruned,
        summary,
    } = &out
    else {
        panic!("{out:?}")
    };
    assert_eq!(summary.files_elided, 1);
    assert_eq!(summary.messages_dropped, 0);
    let kept = messages(pruned);
    assert_eq!(kept[1], input[1], "reasoning untouched");
    let out = kept[3]["output"].as_str().unwrap();
    assert!(out.starts_with("[ctxgate: elided file src/a.rs, "), "{out}");
}

/// Claude Code after its own compaction: the summary is a plain user message, and every later
/// user message carries tool results with a note beside them. Those open no turn, so the
/// summary stays the task, and the forwarded history starts with a user message (the API
/// refuses an assistant one first).
#[test]
fn tool_results_with_notes_open_no_turn_and_the_history_starts_with_the_user() {
    let mut msgs = vec![
        json!({"role":"user","content":[{"type":"text","text":"This session is being continued from a previous conversation. Summary: fix the parser."}]}),
    ];
    for s in 0..8 {
        let id = format!("toolu_{s}");
        msgs.push(json!({"role":"assistant","content":[{"type":"tool_use","id": id,"name":"Read","input":{"file_path": format!("/r/{s}.rs")}}]}));
        msgs.push(json!({"role":"user","content":[
            {"type":"tool_result","tool_use_id": id,"content": "fn x() {}\n".repeat(200)},
            {"type":"text","text":"<system-reminder>Keep going.</system-reminder>"}]}));
    }
    let body = json!({"model":"claude-sonnet-4-5","max_tokens":1024,
        "system":[{"type":"text","text":"You are Claude Code."}],"messages": msgs})
    .to_string()
    .into_bytes();
    let req = ChatRequest::parse(Dialect::Anthropic, &body).unwrap();
    let c = counter();
    let total = c.count_request(&req);
    let budget = Budget {
        hard_token_limit: total / 2,
        target_tokens: total / 3,
        max_messages: 0,
        ..Budget::default()
    };
    let Outcome::Pruned { body: out, .. } = prune(&req, &budget, &view(), "cc", &c) else {
        panic!("expected pruning");
    };
    let kept: Vec<Value> = serde_json::from_slice::<Value>(&out).unwrap()["messages"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        kept[0], msgs[0],
        "the summary is the task, pinned and first"
    );
    assert_eq!(kept[1]["role"], "assistant");
    assert!(kept.len() < msgs.len());
    check_structure(Dialect::Anthropic, &body, &out);
}

/// `on_overflow = "truncate"` cuts an oversized Anthropic `system` (and Responses
/// `instructions`) from the middle instead of refusing the request.
#[test]
fn truncate_cuts_an_oversized_system_field() {
    let c = counter();
    let budget = Budget {
        hard_token_limit: 3000,
        target_tokens: 1800,
        max_messages: 0,
        on_overflow: OnOverflow::Truncate,
        ..Budget::default()
    };
    let rules = "Rule: always check the tests before answering. ".repeat(1500);
    for (dialect, body) in [
        (
            Dialect::Anthropic,
            json!({"model":"claude-sonnet-4-5","max_tokens":100,
                "system":[{"type":"text","text": rules,"cache_control":{"type":"ephemeral"}}],
                "messages":[{"role":"user","content":"hi"}]}),
        ),
        (
            Dialect::Responses,
            json!({"model":"gpt-5","instructions": rules,
                "input":[{"type":"message","role":"user","content":"hi"}]}),
        ),
    ] {
        let body = body.to_string().into_bytes();
        let req = ChatRequest::parse(dialect, &body).unwrap();
        let out = prune(&req, &budget, &view(), "t", &c);
        let Outcome::Pruned { body: cut, summary } = &out else {
            panic!("{dialect:?}: {out:?}")
        };
        assert!(summary.truncated);
        assert!(summary.tokens_after <= 3000, "{summary:?}");
        assert_eq!(count_body(dialect, cut), summary.tokens_after);
        let v: Value = serde_json::from_slice(cut).unwrap();
        let system = match dialect {
            Dialect::Anthropic => {
                assert_eq!(v["system"][0]["cache_control"]["type"], "ephemeral");
                v["system"][0]["text"].as_str().unwrap().to_string()
            }
            _ => v["instructions"].as_str().unwrap().to_string(),
        };
        assert!(system.contains("[ctxgate: truncated "), "{dialect:?}");
        assert!(system.starts_with("Rule: always") && system.ends_with("answering. "));
        check_fields_except(&body, cut, &["system", "instructions"]);
    }
}

/// Top-level fields other than `messages`/`input` and those in `changed` are kept, raw and
/// in order.
fn check_fields_except(orig_body: &[u8], out_body: &[u8], changed: &[&str]) {
    let orig: serde_json::Map<String, Value> = serde_json::from_slice(orig_body).unwrap();
    let out: serde_json::Map<String, Value> = serde_json::from_slice(out_body).unwrap();
    assert_eq!(
        orig.keys().collect::<Vec<_>>(),
        out.keys().collect::<Vec<_>>()
    );
    for (k, v) in &orig {
        if !changed.contains(&k.as_str()) && k != "messages" && k != "input" {
            assert_eq!(&out[k], v, "{k}");
        }
    }
}

/// Replicas sharing the view (`[state] backend = "redis"`): three views take the growing
/// conversation's requests in turn, each adopting the entry the previous one shared; every
/// request is forwarded exactly as one view alone forwards it.
#[test]
fn views_taking_turns_through_the_shared_entry_prune_as_one_view() {
    let c = counter();
    let budget = Budget {
        hard_token_limit: 4000,
        target_tokens: 2400,
        max_messages: 0,
        keep_file_content_turns: 1,
        min_file_lines: 10,
        ..Budget::default()
    };
    let alone = view();
    let replicas = [view(), view(), view()];
    let mut shared: Option<crate::state::shared::SharedConv> = None;
    let mut adopted = 0;
    for (i, msgs) in grow_conversation(40).into_iter().enumerate() {
        let body = json!({"model":"gpt-4o","messages": msgs})
            .to_string()
            .into_bytes();
        let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
        let want = prune(&req, &budget, &alone, "grow", &c);
        let r = &replicas[i % 3];
        let writer = (i % 3) as u64 + 1;
        if shared.is_some()
            && r.get("grow").and_then(|s| s.origin)
                != shared.as_ref().map(|s| (s.writer, s.version))
        {
            adopted += 1;
        }
        let got = crate::prune::prune_shared(&req, &budget, r, "grow", &c, shared.as_ref());
        let bytes = |o: &Outcome| match o {
            Outcome::Unchanged(_) => body.clone(),
            Outcome::Pruned { body: b, .. } => b.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            String::from_utf8(bytes(&got)).unwrap(),
            String::from_utf8(bytes(&want)).unwrap(),
            "request {i}"
        );
        let version = shared.as_ref().map_or(0, |s| s.version) + 1;
        shared = r.shared_entry("grow", writer, version);
        r.set_origin("grow", (writer, version));
    }
    assert!(adopted > 50, "{adopted}");
}

// ---------------------------------------------------------------- summaries (pin, dropped span)

/// The growing conversation with summaries: each cut move hands back exactly the messages it
/// dropped (from the previous cut when a summary was pinned for it, else from the start of the
/// history); a pin made for the current cut rides right after the system prompt, counted in
/// `tokens_after`, and the forwarded prefix is byte-identical from one request to the next
/// until the cut moves again; nothing forwarded is over the limit.
#[test]
fn a_pinned_summary_rides_after_the_system_prompt_until_the_cut_moves() {
    let c = counter();
    let budget = Budget {
        hard_token_limit: 4000,
        target_tokens: 2400,
        keep_file_content_turns: 1,
        min_file_lines: 10,
        ..Budget::default()
    };
    let v = view();
    let mut pin: Option<Pin> = None;
    let (mut moves, mut pinned_requests, mut stable, mut carried) = (0, 0, 0, 0);
    let mut last: Option<Vec<String>> = None;
    for (i, msgs) in grow_conversation(40).into_iter().enumerate() {
        let body = json!({"model":"gpt-4o","messages": msgs})
            .to_string()
            .into_bytes();
        let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
        let with = With {
            pin: pin.as_ref(),
            want_dropped: true,
            ..With::default()
        };
        let (outcome, dropped) = prune_with(&req, &budget, &v, "sum", &c, with);
        let (out, s) = match &outcome {
            Outcome::Unchanged(s) => (body.clone(), s.clone()),
            Outcome::Pruned { body, summary } => (body.clone(), summary.clone()),
            other => panic!("request {i}: {other:?}"),
        };
        assert!(s.tokens_after <= 4000, "request {i}: {}", s.tokens_after);
        assert_eq!(
            count_body(Dialect::OpenAi, &out),
            s.tokens_after,
            "request {i}"
        );
        let fwd = raw_messages(&out);
        match dropped {
            Some(d) => {
                moves += 1;
                assert!(s.cut_moved);
                assert_eq!(
                    s.summary_tokens, 0,
                    "request {i}: the move goes with the plain cut"
                );
                // Exactly the messages neither forwarded nor covered by the pinned summary.
                let all = raw_messages(&body);
                let start = if d.after_pin {
                    all.iter()
                        .position(|m| Some(m) == last.as_ref().and_then(|l| l.get(2)))
                        .unwrap()
                } else {
                    1
                };
                let end = all.iter().position(|m| m == &fwd[1]).unwrap();
                let want: Vec<&String> = all[start..end]
                    .iter()
                    .filter(|m| !fwd.contains(m))
                    .collect();
                assert_eq!(d.messages.iter().collect::<Vec<_>>(), want, "request {i}");
                assert_eq!(d.after_pin, pin.is_some(), "request {i}");
                let text = format!("summary up to request {i}");
                let raw = json!({"role":"system","content": text}).to_string();
                let tokens = c
                    .count_message(
                        Encoding::O200kBase,
                        Dialect::OpenAi,
                        &serde_json::from_str(&raw).unwrap(),
                        u64::MAX,
                    )
                    .0;
                pin = Some(Pin {
                    cut_id: d.cut_id,
                    raw,
                    tokens,
                });
            }
            None if s.summary_tokens > 0 => {
                pinned_requests += 1;
                let p = pin.as_ref().unwrap();
                assert_eq!(s.summary_tokens, p.tokens);
                assert_eq!(fwd[0], raw_messages(&body)[0], "the system prompt first");
                assert_eq!(fwd[1], p.raw, "request {i}: the summary right after it");
                if let Some(prev) = &last {
                    if prev.get(1) == Some(&p.raw) {
                        // Byte-stable but for a file elided as its turn ages.
                        stable +=
                            usize::from(fwd.len() >= prev.len() && fwd[..prev.len()] == prev[..]);
                        carried += 1;
                    }
                }
            }
            None => assert!(!s.cut_moved),
        }
        last = Some(fwd);
    }
    assert!(moves >= 3, "{moves} cut moves");
    assert!(
        pinned_requests >= 20,
        "{pinned_requests} requests carried the summary"
    );
    assert!(
        stable * 10 >= carried * 6,
        "{stable} of {carried} byte-stable"
    );
}

/// A summary too big for the room the kept cut leaves moves the cut rather than break the
/// limit; one made for another cut is never pinned.
#[test]
fn a_summary_that_does_not_fit_or_belongs_to_another_cut_is_left_out() {
    let c = counter();
    let budget = Budget {
        hard_token_limit: 4000,
        target_tokens: 2400,
        min_file_lines: 10,
        ..Budget::default()
    };
    let reqs: Vec<Vec<u8>> = grow_conversation(30)
        .into_iter()
        .map(|m| {
            json!({"model":"gpt-4o","messages": m})
                .to_string()
                .into_bytes()
        })
        .collect();
    // Find the first cut move and the cut it made.
    let v = view();
    let mut at = None;
    for (i, body) in reqs.iter().enumerate() {
        let req = ChatRequest::parse(Dialect::OpenAi, body).unwrap();
        let with = With {
            want_dropped: true,
            ..With::default()
        };
        if let (_, Some(d)) = prune_with(&req, &budget, &v, "fit", &c, with) {
            at = Some((i, d.cut_id));
            break;
        }
    }
    let (i, cut_id) = at.unwrap();
    let next = ChatRequest::parse(Dialect::OpenAi, &reqs[i + 1]).unwrap();
    let huge = Pin {
        cut_id,
        raw: json!({"role":"system","content":"x"}).to_string(),
        tokens: 3000,
    };
    let other = Pin {
        cut_id: cut_id ^ 1,
        raw: huge.raw.clone(),
        tokens: 10,
    };
    for (pin, name) in [(&huge, "huge"), (&other, "other cut")] {
        let v2 = view();
        for body in &reqs[..=i] {
            let req = ChatRequest::parse(Dialect::OpenAi, body).unwrap();
            prune(&req, &budget, &v2, "fit", &c);
        }
        let with = With {
            pin: Some(pin),
            want_dropped: true,
            ..With::default()
        };
        let (o, d) = prune_with(&next, &budget, &v2, "fit", &c, with);
        let s = o.summary().unwrap();
        assert_eq!(s.summary_tokens, 0, "{name}");
        assert!(s.tokens_after <= 4000, "{name}");
        assert_eq!(
            d.is_some(),
            name == "huge",
            "{name}: the cut moves only to make room"
        );
    }
}

/// A summary belongs to its history: a request of the same conversation id whose history
/// differs before the cut (another user's chat under a shared fingerprint, an edited or
/// rewound history) never gets it, with or without a message cap; the same history does.
#[test]
fn a_summary_is_never_pinned_into_another_history() {
    let c = counter();
    for cap in [0, 9] {
        let budget = Budget {
            hard_token_limit: 4000,
            target_tokens: 2400,
            max_messages: cap,
            min_file_lines: 10,
            ..Budget::default()
        };
        let reqs: Vec<Vec<Value>> = grow_conversation(30);
        let v = view();
        let mut pin: Option<Pin> = None;
        let mut at = 0;
        for (i, msgs) in reqs.iter().enumerate() {
            let body = json!({"model":"gpt-4o","messages": msgs})
                .to_string()
                .into_bytes();
            let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
            let with = With {
                want_dropped: true,
                ..With::default()
            };
            if let (_, Some(d)) = prune_with(&req, &budget, &v, "same-id", &c, with) {
                let raw = json!({"role":"system","content":"[ctxgate summary of earlier conversation]\nA's secret"}).to_string();
                pin = Some(Pin {
                    cut_id: d.cut_id,
                    raw,
                    tokens: 20,
                });
                at = i;
                break;
            }
        }
        let pin = pin.unwrap();
        // The next request as it is, and with its first history message edited.
        let next = reqs[at + 1].clone();
        let mut other = next.clone();
        other[1] = json!({"role":"user","content":"Turn 0: something else entirely."});
        for (msgs, want) in [(other, false), (next, true)] {
            let v2 = view();
            for m in &reqs[..=at] {
                let body = json!({"model":"gpt-4o","messages": m})
                    .to_string()
                    .into_bytes();
                prune(
                    &ChatRequest::parse(Dialect::OpenAi, &body).unwrap(),
                    &budget,
                    &v2,
                    "same-id",
                    &c,
                );
            }
            let body = json!({"model":"gpt-4o","messages": msgs})
                .to_string()
                .into_bytes();
            let req = ChatRequest::parse(Dialect::OpenAi, &body).unwrap();
            let with = With {
                pin: Some(&pin),
                ..With::default()
            };
            let (o, _) = prune_with(&req, &budget, &v2, "same-id", &c, with);
            let out = match &o {
                Outcome::Pruned { body, .. } => String::from_utf8(body.clone()).unwrap(),
                _ => String::from_utf8(body.clone()).unwrap(),
            };
            assert_eq!(
                out.contains("A's secret"),
                want,
                "cap {cap}, own history {want}"
            );
        }
    }
}

/// A message of strings only is read without a `Value` (`Flat`): its facts and its count,
/// capped or not, are exactly those of its `Value`; anything else is not flat.
#[test]
fn a_flat_message_reads_as_its_value() {
    use crate::prune::request::{Flat, Meta};
    let c = counter();
    let flat = [
        r#"{"role":"user","content":"hello \"quoted\" \u00e9 world\nnext line"}"#,
        r#"{"role":"system","content":"You are a careful assistant."}"#,
        r#"{"role":"developer","content":"x"}"#,
        r#"{"role":"tool","tool_call_id":"call_1","content":"result text"}"#,
        r#"{"role":"assistant","content":"a","name":"bob"}"#,
        r#"{"role":"function","name":"f","content":"{}"}"#,
        r#"{"role":"assistant","function_call":"odd","content":""}"#,
        r#"{"type":"function_call_output","call_id":"c1","output":"done"}"#,
        r#"{"type":"function_call","call_id":"c1","name":"ls","arguments":"{}"}"#,
        r#"{"type":"reasoning","id":"rs_1","encrypted_content":"QUFBQUFBQUFBQUFB"}"#,
        r#"{"type":"mcp_approval_request","id":"m1","name":"x","server_label":"s"}"#,
        r#"{"type":"mcp_approval_response","approval_request_id":"m1","reason":"ok"}"#,
        r#"{"role":"user","content":"see","url":"data:image/png;base64,AAAA"}"#,
        r#"{"type":"message","role":"user","content":"hi","status":"completed","id":"m"}"#,
        r#"{}"#,
    ];
    // Long enough that the capped counts stop early (past the probe of 8 × cap + 4096 bytes).
    let long = format!(
        r#"{{"role":"tool","tool_call_id":"c9","name":"read","content":"{}"}}"#,
        "fn main() { let x = 1; }\\n".repeat(600)
    );
    let many = format!(
        "{{{}}}",
        (0..17)
            .map(|i| format!(r#""k{i}":"v""#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let flat: Vec<&str> = flat.into_iter().chain([long.as_str()]).collect();
    let not_flat = [
        many.as_str(),
        r#"{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}"#,
        r#"{"role":"user","content":[{"type":"text","text":"hi"}]}"#,
        r#"{"role":"user","content":"a","content":"b"}"#,
        r#"{"role":"user","n":1}"#,
        r#"["user"]"#,
        r#""user""#,
    ];
    for raw in not_flat {
        assert!(Flat::parse(raw.as_bytes()).is_none(), "{raw}");
    }
    for dialect in [Dialect::OpenAi, Dialect::Anthropic, Dialect::Responses] {
        for &raw in &flat {
            let v: Value = serde_json::from_str(raw).unwrap();
            let f = Flat::parse(raw.as_bytes()).expect(raw);
            assert_eq!(Meta::of_flat(dialect, &f), Meta::of(dialect, &v), "{raw}");
            for cap in [u64::MAX, 40, 6, 1] {
                assert_eq!(
                    c.count_flat(Encoding::O200kBase, dialect, &f, cap),
                    c.count_message(Encoding::O200kBase, dialect, &v, cap),
                    "{dialect:?} {raw} cap {cap}"
                );
            }
        }
    }
}
