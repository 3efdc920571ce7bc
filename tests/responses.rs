//! The OpenAI Responses API through ctxgate, against a mock that validates `input` the way the
//! API does (every tool output answers an earlier call of the same `call_id`, every call is
//! answered, a reasoning item is followed by another item, encrypted reasoning comes back byte
//! for byte): a Codex-like session grows past the limit and is pruned on every turn without
//! one rejection; records carry the model, the stream flag, usage with cached tokens and the
//! `prompt_cache_key` as conversation; `previous_response_id` and string inputs pass unpruned
//! with their reason; an overflow is answered in the API's own words; the count endpoint
//! passes through.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

/// What the mock issued as encrypted reasoning: only these strings may come back.
fn encrypted(step: usize) -> String {
    format!("gAAAAB-mock-{step}-").repeat(40)
}

/// The API's own 400, in its shape.
fn bad_request(message: String) -> Reply {
    Reply::Full {
        status: 400,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(
            json!({"error": {"message": message, "type": "invalid_request_error", "param": "input", "code": null}})
                .to_string(),
        ),
    }
}

/// Checks `input` as the Responses API does; `Err` holds the API's message.
fn validate(input: &[Value]) -> Result<(), String> {
    let mut calls = Vec::new();
    let mut answered = Vec::new();
    for (i, item) in input.iter().enumerate() {
        let ty = item["type"].as_str().unwrap_or("message");
        match ty {
            "function_call" => calls.push(item["call_id"].as_str().unwrap_or("").to_string()),
            "function_call_output" => {
                let id = item["call_id"].as_str().unwrap_or("");
                if !calls.iter().any(|c| c == id) {
                    return Err(format!(
                        "No tool call found for function call output with call_id {id}."
                    ));
                }
                answered.push(id.to_string());
            }
            "reasoning" => {
                let enc = item["encrypted_content"].as_str().unwrap_or("");
                if !(0..64).any(|s| encrypted(s) == enc) {
                    return Err("The encrypted content could not be verified.".into());
                }
                let next = input.get(i + 1).and_then(|n| n["type"].as_str());
                if next.is_none() || next == Some("reasoning") {
                    return Err(format!(
                        "Item '{}' of type 'reasoning' was provided without its required following item.",
                        item["id"].as_str().unwrap_or("")
                    ));
                }
            }
            _ => {}
        }
    }
    if let Some(c) = calls.iter().find(|c| !answered.contains(c)) {
        return Err(format!("No tool output found for function call {c}."));
    }
    Ok(())
}

/// A Responses answer: `response.completed` with usage (SSE), or the response object.
fn responses_reply(r: &Recorded) -> Reply {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
    if r.uri.ends_with("/responses/input_tokens") {
        return Reply::json(r#"{"object":"response.input_tokens","input_tokens":321}"#);
    }
    if let Some(input) = v["input"].as_array() {
        if let Err(m) = validate(input) {
            return bad_request(m);
        }
    }
    let response = json!({
        "id": "resp_mock", "object": "response", "status": "completed", "model": v["model"],
        "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "ok", "annotations": []}]}],
        "usage": {"input_tokens": 5000, "input_tokens_details": {"cached_tokens": 4096},
                  "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 3},
                  "total_tokens": 5007},
    });
    if v["stream"] == true {
        let ev = |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        return Reply::Sse {
            chunks: vec![
                ev(
                    "response.created",
                    json!({"type": "response.created", "sequence_number": 0,
                           "response": {"id": "resp_mock", "status": "in_progress", "usage": null}}),
                ),
                ev(
                    "response.output_text.delta",
                    json!({"type": "response.output_text.delta", "sequence_number": 1,
                           "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "ok"}),
                ),
                ev(
                    "response.completed",
                    json!({"type": "response.completed", "sequence_number": 2, "response": response}),
                ),
            ],
            gap: Duration::ZERO,
        };
    }
    Reply::json(&response.to_string())
}

/// Codex's request after `steps` tool steps: instructions, tools, a developer turn, the
/// task, then per step a reasoning item, a shell call and its (large) output.
fn codex_request(steps: usize) -> Value {
    let mut input = vec![
        json!({"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions instructions>workspace-write</permissions instructions>"}]}),
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context><cwd>/repo</cwd></environment_context>"}]}),
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Fix the failing tests."}]}),
    ];
    for s in 0..steps {
        input.push(json!({"type": "reasoning", "id": format!("rs_{s}"), "summary": [], "content": null, "encrypted_content": encrypted(s)}));
        input.push(json!({"type": "function_call", "id": format!("fc_{s}"), "call_id": format!("call_{s}"), "name": "shell", "arguments": format!("{{\"command\":[\"cat\",\"src/m{s}.rs\"]}}")}));
        let out = format!("pub fn m{s}(x: u64) -> u64 {{ x * {s} }}\n").repeat(40);
        input.push(
            json!({"type": "function_call_output", "call_id": format!("call_{s}"), "output": out}),
        );
    }
    json!({
        "model": "gpt-5-codex",
        "instructions": "You are Codex, based on GPT-5. You are running as a coding agent.",
        "input": input,
        "tools": [{"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.", "strict": false,
                   "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}, "description": "The command to execute"}}, "required": ["command"]}}],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": false,
        "stream": true,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199c3a4-codex-session",
    })
}

fn cfg(up: &Mock, dir: &TempDir) -> TestConfig {
    TestConfig::openai(up)
        .set("prune", "hard_token_limit", 6000)
        .set("prune", "target_tokens", 3600)
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
}

#[tokio::test]
async fn a_growing_codex_session_is_pruned_and_recorded() {
    let up = mock(responses_reply).await;
    let dir = TempDir::new("responses-e2e");
    let gate = cfg(&up, &dir)
        .set(
            "",
            "prices",
            json!([{"match": "gpt-5-codex", "input": 2.0, "cached_input": 0.5, "output": 8.0}]),
        )
        .start()
        .await;
    let turns = 20;
    for steps in 0..turns {
        let body = codex_request(steps).to_string();
        let (s, h, b) = send("POST", &gate.url("/v1/responses"), &[], &body).await;
        let text = String::from_utf8_lossy(&b);
        assert_eq!(s, 200, "turn {steps}: {text}");
        assert!(text.contains("event: response.completed"), "{text}");
        if steps >= 8 {
            assert!(
                h.contains_key("x-ctxgate-tokens-after"),
                "turn {steps} pruned"
            );
        }
    }
    // Every forwarded request passed the mock's validation (it answers 400 otherwise) and
    // kept what is pinned: the developer turn, the task, the newest step whole.
    let reqs = up.requests();
    assert_eq!(reqs.len(), turns);
    for (steps, r) in reqs.iter().enumerate() {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        let want = codex_request(steps);
        assert_eq!(v["instructions"], want["instructions"]);
        assert_eq!(v["tools"], want["tools"]);
        let input = v["input"].as_array().unwrap();
        let orig = want["input"].as_array().unwrap();
        assert_eq!(input[0], orig[0], "developer turn pinned");
        assert!(input.contains(&orig[2]), "task pinned");
        let n = orig.len();
        if steps > 0 {
            assert_eq!(
                &input[input.len() - 3..],
                &orig[n - 3..],
                "newest step whole"
            );
        }
        if steps >= 12 {
            assert!(input.len() < orig.len(), "turn {steps} dropped items");
        }
    }
    // Cache-stable: between cut moves, each forwarded input starts with the previous one
    // byte for byte (the provider's prompt cache keeps hitting).
    let forwarded: Vec<Vec<Value>> = reqs
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            v["input"].as_array().unwrap().clone()
        })
        .collect();
    let stable = forwarded
        .windows(2)
        .filter(|w| w[1].starts_with(&w[0]))
        .count();

    assert!(
        stable >= 15,
        "{stable} of {} turns kept the prefix",
        turns - 1
    );
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    assert_eq!(records.len(), turns);
    for r in &records {
        assert_eq!(r["route"], "test");
        assert_eq!(r["conversation_id"], "0199c3a4-codex-session");
        assert_eq!(r["model"], "gpt-5-codex");
        assert_eq!(r["stream"], true);
        assert_eq!(r["usage"]["input_tokens"], 5000);
        assert_eq!(r["usage"]["cache_read_tokens"], 4096);
        assert_eq!(r["usage"]["output_tokens"], 7);
        assert!(r["tokens_after"].as_u64().unwrap() <= 6000, "{r}");
        assert_eq!(r["finish_reason"], "completed");
        // 5000 prompt tokens, 4096 cached (904 fresh), 7 output, at the config's price.
        let sent = (904.0 * 2.0 + 4096.0 * 0.5 + 7.0 * 8.0) / 1e6;
        assert_eq!(r["cost_usd"].as_f64(), Some(sent));
        // Pruned: plus what was removed, in the upstream's tokens, at the call's cache mix.
        let unpruned = r["cost_unpruned_usd"].as_f64().unwrap();
        if r["prune_action"] == "pruned" {
            let (before, after) = (
                r["tokens_before"].as_f64().unwrap(),
                r["tokens_after"].as_f64().unwrap(),
            );
            let removed = ((before - after) * 5000.0 / after).round();
            let share = 4096.0 / 5000.0;
            let want = sent + removed * (share * 0.5 + (1.0 - share) * 2.0) / 1e6;
            assert!((unpruned - want).abs() < 1e-12, "{unpruned} vs {want}");
        } else {
            assert_eq!(unpruned, sent);
        }
    }
    let pruned = records
        .iter()
        .filter(|r| r["prune_action"] == "pruned")
        .count();
    assert!(pruned >= 4, "{pruned} pruned: {records:#?}");
    assert_eq!(records[0]["prune_action"], "unchanged");
}

#[tokio::test]
async fn server_held_history_and_string_input_pass_unpruned_with_their_reason() {
    let up = mock(responses_reply).await;
    let dir = TempDir::new("responses-skip");
    let gate = cfg(&up, &dir).start().await;
    let mut follow_up = codex_request(20);
    follow_up["previous_response_id"] = json!("resp_earlier");
    follow_up["stream"] = json!(false);
    let follow_up = follow_up.to_string();
    let string_input =
        json!({"model": "gpt-5", "input": "hello ".repeat(20_000), "prompt_cache_key": "s-2"})
            .to_string();
    for body in [&follow_up, &string_input] {
        let (s, h, _) = send("POST", &gate.url("/v1/responses"), &[], body).await;
        assert_eq!(s, 200);
        assert!(!h.contains_key("x-ctxgate-tokens-after"));
    }
    // Forwarded byte for byte.
    let reqs = up.requests();
    assert_eq!(reqs[0].body, Bytes::from(follow_up));
    assert_eq!(reqs[1].body, Bytes::from(string_input));
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    let reasons: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["prune_action"].as_str().unwrap(),
                r["prune_reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("skipped", "previous_response_id"),
            ("skipped", "string_input")
        ]
    );
    assert_eq!(records[0]["usage"]["input_tokens"], 5000, "JSON usage read");
    assert_eq!(records[0]["finish_reason"], "completed", "JSON status read");
    // gpt-5 is in the shipped price table: a cost without any [[prices]].
    assert!(records[0]["cost_usd"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn an_overflow_is_answered_in_the_responses_api_wording() {
    let up = mock(responses_reply).await;
    let dir = TempDir::new("responses-overflow");
    let gate = cfg(&up, &dir).start().await;
    let mut body = codex_request(1);
    body["instructions"] = json!("Follow the rules. ".repeat(3000));
    let (s, h, b) = send("POST", &gate.url("/v1/responses"), &[], &body.to_string()).await;
    assert_eq!(s, 400);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("Your input exceeds the context window of this model."),
        "{msg}"
    );
    assert!(msg.contains("hard_token_limit"), "{msg}");
    assert_eq!(h["x-ctxgate-limit-tokens"], "6000");
    assert!(up.requests().is_empty());
    stop(gate).await;
}

#[tokio::test]
async fn the_count_endpoint_passes_through_untouched() {
    let up = mock(responses_reply).await;
    let dir = TempDir::new("responses-count");
    let gate = cfg(&up, &dir).start().await;
    let body = codex_request(20).to_string();
    let (s, _, b) = send("POST", &gate.url("/v1/responses/input_tokens"), &[], &body).await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["input_tokens"],
        321
    );
    assert_eq!(up.requests()[0].body, Bytes::from(body));
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    assert_eq!(records[0]["prune_action"], "none");
}

/// `count_tokens = "local"`: both count endpoints are answered by ctxgate with the count it
/// prunes by, in each endpoint's own shape, and never reach the upstream; an unparseable body
/// gets the dialect's 400.
#[tokio::test]
async fn count_endpoints_can_be_answered_locally() {
    let up = mock(responses_reply).await;
    let dir = TempDir::new("count-local");
    let gate = TestConfig::new()
        .route("openai", "/v1/", &format!("{}v1/", up.url()), "openai")
        .set_route("", "count_tokens", "local")
        .route("glm", "/glm/", &up.url(), "anthropic")
        .set_route("", "count_tokens", "local")
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
        .start()
        .await;
    let counter = ctxgate::prune::Counter::new(ctxgate::prune::Encoding::O200kBase).unwrap();
    let body = codex_request(3).to_string();
    let want = counter.count_request(
        &ctxgate::prune::ChatRequest::parse(ctxgate::dialect::Dialect::Responses, body.as_bytes())
            .unwrap(),
    );
    let (s, h, b) = send("POST", &gate.url("/v1/responses/input_tokens"), &[], &body).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap(),
        json!({"object": "response.input_tokens", "input_tokens": want})
    );
    let anthropic = json!({"model": "glm-4.6", "system": "You are terse.",
        "messages": [{"role": "user", "content": "How many tokens is this?"}]})
    .to_string();
    let want_a = counter.count_request(
        &ctxgate::prune::ChatRequest::parse(
            ctxgate::dialect::Dialect::Anthropic,
            anthropic.as_bytes(),
        )
        .unwrap(),
    );
    let (s, _, b) = send(
        "POST",
        &gate.url("/glm/v1/messages/count_tokens"),
        &[("anthropic-version", "2023-06-01")],
        &anthropic,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap(),
        json!({"input_tokens": want_a})
    );
    let (s, _, b) = send(
        "POST",
        &gate.url("/glm/v1/messages/count_tokens"),
        &[],
        "{not json",
    )
    .await;
    assert_eq!(s, 400);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(up.requests().is_empty(), "nothing reached the upstream");
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    let got: Vec<(&str, u64, Option<&str>)> = records
        .iter()
        .map(|r| {
            (
                r["route"].as_str().unwrap(),
                r["status"].as_u64().unwrap(),
                r["model"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("openai", 200, Some("gpt-5-codex")),
            ("glm", 200, Some("glm-4.6")),
            ("glm", 400, None)
        ]
    );
}
