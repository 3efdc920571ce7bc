//! Benchmarks of the pruning core: token counting throughput, pruning the seed-like
//! fixture cold (first sight) and warm (the same conversation plus one new message), and a
//! warm prune in a view holding 10,000 conversations; warm agent conversations of 0.25 to 4 MB
//! parsed after their previous body (one new turn) beside a full parse.
//!
//! `cargo bench --bench prune`
#![allow(clippy::unwrap_used)] // a benchmark that cannot load its counter has nothing to measure

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ctxgate::dialect::Dialect;
use ctxgate::prune::{prune, Budget, ChatRequest, Counter, Encoding, View};
use serde_json::{json, Value};

fn fixture() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openai-seed.json"
    );
    std::fs::read(path).unwrap_or_default()
}

/// The fixture as a compact body, and the same conversation plus one new message.
fn bodies() -> (Vec<u8>, Vec<u8>) {
    let mut v: Value = serde_json::from_slice(&fixture()).unwrap_or(Value::Null);
    let base = serde_json::to_vec(&v).unwrap_or_default();
    if let Some(m) = v.get_mut("messages").and_then(Value::as_array_mut) {
        m.push(json!({"role": "assistant", "content": "The export command is in place; running the suite now."}));
    }
    (base, serde_json::to_vec(&v).unwrap_or_default())
}

fn view() -> View {
    View::new(256 << 20, Duration::from_secs(600))
}

fn counting(c: &mut Criterion) {
    let counter = Counter::new(Encoding::O200kBase).unwrap();
    let text = String::from_utf8(fixture()).unwrap_or_default();
    let mut g = c.benchmark_group("count");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("o200k_text_fixture", |b| {
        b.iter(|| counter.count_text(Encoding::O200kBase, black_box(&text)))
    });
    g.bench_function("cl100k_text_fixture", |b| {
        b.iter(|| counter.count_text(Encoding::Cl100kBase, black_box(&text)))
    });
    let body = fixture();
    let Ok(req) = ChatRequest::parse(Dialect::OpenAi, &body) else {
        return;
    };
    g.bench_function("count_request_fixture", |b| {
        b.iter(|| counter.count_request(black_box(&req)))
    });
    g.finish();
}

fn pruning(c: &mut Criterion) {
    let counter = Counter::new(Encoding::O200kBase).unwrap();
    // The small profile (examples/small-chat.toml): the seed fixture is ~14x over it, so
    // every run prunes.
    let budget = Budget {
        hard_token_limit: 4000,
        target_tokens: 2400,
        max_messages: 5,
        ..Budget::default()
    };
    let (base, grown) = bodies();
    let (Ok(base_req), Ok(grown_req)) = (
        ChatRequest::parse(Dialect::OpenAi, &base),
        ChatRequest::parse(Dialect::OpenAi, &grown),
    ) else {
        return;
    };
    let mut g = c.benchmark_group("prune");
    g.bench_function("parse_fixture", |b| {
        b.iter(|| ChatRequest::parse(Dialect::OpenAi, black_box(&grown)))
    });
    // What every pass-through call parses: a two-message chat request.
    let small = br#"{"model":"gpt-4o","max_tokens":32,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence."}]}"#;
    g.bench_function("parse_small", |b| {
        b.iter(|| ChatRequest::parse(Dialect::OpenAi, black_box(small)))
    });
    // Cold: neither the view nor the counter's memo has seen any of it.
    g.bench_function("fixture_cold", |b| {
        b.iter_batched_ref(
            || (view(), Counter::new(Encoding::O200kBase).unwrap()),
            |(v, c)| prune(&base_req, &budget, v, "conv", c),
            BatchSize::SmallInput,
        )
    });
    // A new conversation whose long parts the memo saw in another conversation (an agent
    // resending its system prompt and tools).
    prune(&base_req, &budget, &view(), "another", &counter);
    g.bench_function("fixture_cold_memoised", |b| {
        b.iter_batched_ref(
            view,
            |v: &mut View| prune(&base_req, &budget, v, "conv", &counter),
            BatchSize::SmallInput,
        )
    });
    // Warm: the view has seen the conversation; this request adds one message.
    g.bench_function("fixture_warm", |b| {
        b.iter_batched_ref(
            || {
                let v = view();
                prune(&base_req, &budget, &v, "conv", &counter);
                v
            },
            |v: &mut View| prune(&grown_req, &budget, v, "conv", &counter),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("fixture_warm_parse_and_prune", |b| {
        b.iter_batched_ref(
            || {
                let v = view();
                prune(&base_req, &budget, &v, "conv", &counter);
                v
            },
            |v| {
                ChatRequest::parse(Dialect::OpenAi, &grown)
                    .map(|r| prune(&r, &budget, v, "conv", &counter))
            },
            BatchSize::SmallInput,
        )
    });
    // A view holding 10,000 other conversations.
    let big = view();
    let small: Vec<Value> = (0..20)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("message {i} ").repeat(60)}))
        .collect();
    for k in 0..10_000 {
        let mut msgs = small.clone();
        msgs[0] = json!({"role": "user", "content": format!("conversation {k}")});
        let body = json!({"model": "gpt-4o", "messages": msgs}).to_string();
        if let Ok(r) = ChatRequest::parse(Dialect::OpenAi, body.as_bytes()) {
            prune(&r, &budget, &big, &format!("c{k}"), &counter);
        }
    }
    prune(&base_req, &budget, &big, "conv", &counter);
    g.bench_function("fixture_warm_view_10000", |b| {
        b.iter(|| prune(&grown_req, &budget, &big, "conv", &counter))
    });
    g.finish();
}

/// An agent conversation of about `bytes` bytes (OpenAI chat completions): the fixture's
/// system prompt, a task, then steps of a tool call, its result and an answer (a new user
/// instruction every eight steps), their texts
/// taken in turn from the fixture's messages (each marked with its turn, so no two are
/// alike); `model` before `messages` and the fixture's other fields after, as the SDKs send
/// them.
fn agent_conversation(bytes: usize) -> Value {
    let seed: Value = serde_json::from_slice(&fixture()).unwrap_or(Value::Null);
    let texts: Vec<String> = seed["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["content"].as_str())
                .filter(|t| t.len() > 100)
                .map(|t| t.chars().take(24_000).collect())
                .collect()
        })
        .unwrap_or_default();
    let mut msgs = vec![
        seed["messages"][0].clone(),
        json!({"role": "user", "content": "Add an export command to the CLI and make the test suite pass."}),
    ];
    let mut size = 0;
    let mut k = 0;
    while size < bytes && !texts.is_empty() {
        let id = format!("call_{k:05}");
        let result = format!("(turn {k}) {}", texts[k % texts.len()]);
        let turn = [
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "read_file", "arguments": format!("{{\"path\":\"src/f{k}.rs\"}}")}}]}),
            json!({"role": "tool", "tool_call_id": id, "content": result}),
            json!({"role": "assistant", "content": format!("Turn {k}: read it; the next step is the parser.")}),
        ];
        size += turn.iter().map(|m| m.to_string().len()).sum::<usize>();
        msgs.extend(turn);
        k += 1;
        if k % 8 == 0 {
            msgs.push(json!({"role": "user", "content": format!("Good. Step {}: carry on with the next file.", k / 8)}));
        }
    }
    json!({
        "model": "gpt-4o",
        "messages": msgs,
        "tools": seed["tools"],
        "temperature": 0.2,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// A warm conversation of 0.25 to 4 MB, one new turn per request, limit 150,000 tokens: what
/// parsing after the conversation's previous body and pruning costs, beside a full parse and
/// the same pruning. The view holds the previous request (set up outside the timing).
fn big_conversations(c: &mut Criterion) {
    let counter = Counter::new(Encoding::O200kBase).unwrap();
    let budget = Budget {
        hard_token_limit: 150_000,
        target_tokens: 90_000,
        max_messages: 0,
        ..Budget::default()
    };
    let mut g = c.benchmark_group("warm_big");
    g.sample_size(10);
    for (label, size) in [
        ("0.25MB", 250_000),
        ("1MB", 1 << 20),
        ("2MB", 2 << 20),
        ("4MB", 4 << 20),
    ] {
        let conv = agent_conversation(size);
        let base = bytes::Bytes::from(serde_json::to_vec(&conv).unwrap_or_default());
        let mut grown = conv.clone();
        if let Some(m) = grown["messages"].as_array_mut() {
            m.push(
                json!({"role": "user", "content": "Now run the suite again and fix what fails."}),
            );
        }
        let grown = bytes::Bytes::from(serde_json::to_vec(&grown).unwrap_or_default());
        let primed = || {
            let v = view();
            if let Ok(r) = ChatRequest::parse_bytes(Dialect::OpenAi, base.clone()) {
                prune(&r, &budget, &v, "conv", &counter);
            }
            v
        };
        g.throughput(Throughput::Bytes(grown.len() as u64));
        g.bench_function(format!("{label}_resumed"), |b| {
            b.iter_batched_ref(
                primed,
                |v: &mut View| {
                    let layout = v.layout("conv");
                    let req = match layout {
                        Some(l) => ChatRequest::parse_after(Dialect::OpenAi, grown.clone(), &l),
                        None => ChatRequest::parse_bytes(Dialect::OpenAi, grown.clone()),
                    };
                    req.map(|r| prune(&r, &budget, v, "conv", &counter))
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("{label}_full_parse"), |b| {
            b.iter_batched_ref(
                primed,
                |v: &mut View| {
                    ChatRequest::parse_bytes(Dialect::OpenAi, grown.clone())
                        .map(|r| prune(&r, &budget, v, "conv", &counter))
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    targets = counting, pruning, big_conversations
}
criterion_main!(benches);
