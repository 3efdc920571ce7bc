//! Summaries instead of hard cuts (`[prune.summary]`), through the proxy, with the mock
//! upstream as the summariser: each cut move makes one summary call carrying what was dropped
//! (and the previous summary), with the client's own credentials; the summary then rides right
//! after the system prompt, counted in the limit, byte-stable until the next move; a summariser
//! that fails or hangs leaves the plain cut and never the client's request; every summary call
//! leaves its record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ctxgate::dialect::Dialect;
use ctxgate::prune::{ChatRequest, Counter, Encoding};
use serde_json::{json, Value};

const MODEL: &str = "summariser-1";
const MARK: &str = "[ctxgate summary of earlier conversation]";

fn count(body: &[u8]) -> u64 {
    Counter::new(Encoding::O200kBase)
        .unwrap()
        .count_request(&ChatRequest::parse(Dialect::OpenAi, body).unwrap())
}

fn is_summary_request(r: &Recorded) -> bool {
    serde_json::from_slice::<Value>(&r.body).unwrap_or_default()["model"] == MODEL
}

/// What the summariser was asked to fold in, summary call by summary call.
fn summary_inputs(reqs: &[Recorded]) -> Vec<String> {
    reqs.iter()
        .filter(|r| is_summary_request(r))
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            v["messages"][1]["content"].as_str().unwrap().to_string()
        })
        .collect()
}

/// In how many summary inputs question `i` appears.
fn times_summarised(inputs: &[String], i: usize) -> usize {
    inputs
        .iter()
        .filter(|t| t.contains(&format!("[user] Q{i}:")))
        .count()
}

/// Turn `i` of the short question-and-answer conversation `conv`: the question is sent with
/// the client's key (answered 200), then the answer joins the history.
async fn ask(gate: &Gate, conv: &str, history: &mut Vec<Value>, i: usize) {
    history.push(json!({"role": "user", "content": format!("Q{i}: what about item {i}? {}", "Some detail. ".repeat(5))}));
    let body = json!({"model": "gpt-4o", "messages": history}).to_string();
    let headers = [
        ("x-conversation-id", conv),
        ("authorization", "Bearer sk-client-key"),
    ];
    let (s, _, _) = send("POST", &gate.url("/v1/chat/completions"), &headers, &body).await;
    assert_eq!(s, 200);
    history.push(json!({"role": "assistant", "content": format!("A{i}: item {i} is fine.")}));
}

/// The mock: summary requests get `SUMMARY #n` (n counting from 1) with a fixed usage; every
/// other request the usual answer.
fn summariser(n: Arc<AtomicUsize>) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    move |r: &Recorded| {
        if !is_summary_request(r) {
            return llm_reply(r);
        }
        let k = n.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::json(
            &json!({
                "id": format!("chatcmpl-s{k}"),
                "object": "chat.completion",
                "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("SUMMARY #{k}: the user works through src/mod_*.rs step by step.")}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050},
            })
            .to_string(),
        )
    }
}

fn config(up: &Mock, dir: &TempDir) -> TestConfig {
    TestConfig::openai(up)
        .set("prune", "hard_token_limit", 4000)
        .set("prune", "keep_file_content_turns", 1)
        // The summary call is itself a request of the route: its model gets room for it.
        .set_route(
            "prune",
            "models",
            json!([{"match": "summariser-*", "hard_token_limit": 100000}]),
        )
        .set("prune.summary", "enabled", true)
        .set("prune.summary", "model", MODEL)
        .set("prune.summary", "min_dropped_tokens", 1)
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
        .set(
            "",
            "prices",
            json!([{"match": "summariser-*", "input": 1.0, "output": 2.0}]),
        )
}

/// Sends `turns` turns of the agent conversation (two calls each) with the client's key.
async fn converse(gate: &Gate, conv: &str, turns: usize) {
    let url = gate.url("/v1/chat/completions");
    let headers = [
        ("x-conversation-id", conv),
        ("authorization", "Bearer sk-client-key"),
    ];
    send_agent_turns(&url, &headers, turns).await;
}

#[tokio::test]
async fn each_cut_move_is_summarised_and_the_summary_rides_after_the_system_prompt() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = mock(summariser(n.clone())).await;
    let dir = TempDir::new("summaries");
    let gate = config(&up, &dir).start().await;
    converse(&gate, "agent-sum", 70).await;
    let page = metrics(&gate).await;
    let moves = sample(&page, "ctxgate_prune_cut_moves_total{route=\"test\"}") as usize;
    // Every move but one that found nothing new to summarise makes one call.
    until_sample(&gate, "ctxgate_summary_running", 0.0).await;
    let reqs = up.requests();
    let (sums, calls): (Vec<_>, Vec<_>) = reqs.iter().partition(|r| is_summary_request(r));
    assert_eq!(calls.len(), 140);
    // One summary call per cut move that dropped messages (the first cut of this
    // conversation only elides files).
    assert!(
        sums.len() >= 2,
        "{} summaries, {moves} cut moves",
        sums.len()
    );
    // (A move while the previous summary is still being made is skipped as busy; what it
    // dropped goes into the next summary.)
    let busy = sample(
        &page,
        "ctxgate_summary_skipped_total{reason=\"busy\",route=\"test\"}",
    ) as usize;
    assert!(
        moves == sums.len() + busy || moves == sums.len() + busy + 1,
        "{} summaries, {busy} busy, {moves} cut moves",
        sums.len()
    );

    // The summary calls: to the route's own upstream, with the client's key, the default
    // instructions, the dropped messages; from the second on, the previous summary too.
    for (k, s) in sums.iter().enumerate() {
        assert!(s.uri.ends_with("/v1/chat/completions"), "{}", s.uri);
        assert_eq!(s.headers["authorization"], "Bearer sk-client-key");
        let v: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(v["max_tokens"], 1024);
        assert_eq!(v["messages"][0]["role"], "system");
        assert!(v["messages"][0]["content"]
            .as_str()
            .unwrap()
            .starts_with("You keep the running summary"));
        let input = v["messages"][1]["content"].as_str().unwrap();
        if k == 0 {
            assert!(input.contains("[user] Step 0:"), "{input}");
            assert!(!input.contains("Previous summary"));
        } else {
            assert!(
                input.starts_with(&format!("Previous summary:\nSUMMARY #{k}:")),
                "{}",
                &input[..80]
            );
        }
    }

    // The conversation's requests: never over the limit; once a summary is ready, it rides
    // right after the system prompt, exactly as rendered.
    let mut forwarded = Vec::new();
    let mut carried = vec![0usize; sums.len() + 1];
    for r in &calls {
        assert!(count(&r.body) <= 4000);
        let msgs = raw_messages(&r.body);
        if msgs[1].contains(MARK) {
            let v: Value = serde_json::from_str(&msgs[1]).unwrap();
            assert_eq!(v["role"], "system");
            let text = v["content"].as_str().unwrap();
            let k: usize = text[MARK.len() + "\nSUMMARY #".len()..]
                .split(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            carried[k] += 1;
            assert_eq!(
                msgs[1],
                json!({"role": "system", "content": format!("{MARK}\nSUMMARY #{k}: the user works through src/mod_*.rs step by step.")}).to_string()
            );
        }
        forwarded.push(msgs);
    }
    // Every summary but the newest (made near the end) rode on later requests.
    for (k, c) in carried.iter().enumerate().take(sums.len()).skip(1) {
        assert!(*c >= 2, "summary {k} was pinned {c} times");
    }
    let pinned: usize = carried.iter().sum();
    assert_eq!(
        sample(&page, "ctxgate_summary_pinned_total{route=\"test\"}") as usize,
        pinned
    );
    // With summaries on, the forwarded prefix still holds from turn to turn.
    let (stable, turns) = stable_turns(&forwarded);
    eprintln!(
        "summaries {}, moves {moves}, pinned {pinned}, stable {stable}/{turns}",
        sums.len()
    );
    assert!(
        stable * 10 >= turns * 9,
        "{stable}/{turns} turns kept the prefix"
    );

    // Records: one per client call, one per summary call, linked by the conversation.
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    let summary_records: Vec<&Value> = records.iter().filter(|r| r["kind"] == "summary").collect();
    assert_eq!(summary_records.len(), sums.len());
    assert_eq!(records.len(), 140 + sums.len());
    for r in &summary_records {
        assert_eq!(r["conversation_id"], "agent-sum");
        assert_eq!(r["route"], "test");
        assert_eq!(r["model"], MODEL);
        assert_eq!(r["status"], 200);
        assert_eq!(r["usage"]["input_tokens"], 1000);
        assert_eq!(r["usage"]["output_tokens"], 50);
        // 1000 input tokens at $1/M and 50 output at $2/M.
        assert!((r["cost_usd"].as_f64().unwrap() - 0.0011).abs() < 1e-12);
        assert_eq!(r["finish_reason"], "stop");
        assert!(r["error_kind"].is_null());
    }
    let with_summary = records
        .iter()
        .filter(|r| r["kind"] == "call" && r["summary_tokens"].as_u64().is_some_and(|t| t > 0))
        .count();
    assert_eq!(with_summary, pinned);
    assert!(
        !std::fs::read_to_string(dir.0.read_dir().unwrap().next().unwrap().unwrap().path())
            .unwrap()
            .contains("sk-client-key")
    );
}

/// A summariser that answers 500, or hangs past `timeout`: the conversation keeps the plain
/// cut, every client request is answered at once, and each failed call is counted and
/// recorded with its error.
#[tokio::test]
async fn a_failing_or_hanging_summariser_leaves_the_plain_cut() {
    for (name, reply_of, outcome, kind) in [
        (
            "failing",
            (|| Reply::Full {
                status: 500,
                headers: vec![("content-type".into(), "application/json".into())],
                body: bytes::Bytes::from_static(
                    br#"{"error":{"message":"boom","type":"server_error"}}"#,
                ),
            }) as fn() -> Reply,
            "failed",
            "summary_status",
        ),
        (
            "hanging",
            (|| Reply::Delayed(Duration::from_secs(30), Box::new(Reply::json("{}"))))
                as fn() -> Reply,
            "timeout",
            "summary_timeout",
        ),
    ] {
        let up = mock(move |r: &Recorded| {
            if is_summary_request(r) {
                reply_of()
            } else {
                llm_reply(r)
            }
        })
        .await;
        let dir = TempDir::new(name);
        let gate = config(&up, &dir)
            .set("prune.summary", "timeout", "300ms")
            .start()
            .await;
        converse(&gate, "agent-fail", 40).await;
        let page = metrics(&gate).await;
        let moves = sample(&page, "ctxgate_prune_cut_moves_total{route=\"test\"}") as usize;
        let series = format!("ctxgate_summary_calls_total{{outcome=\"{outcome}\",route=\"test\"}}");
        // Every cut move that dropped messages (all but the first, which only elides files).
        until_sample(&gate, &series, (moves - 1) as f64).await;
        for r in up.requests().iter().filter(|r| !is_summary_request(r)) {
            assert!(count(&r.body) <= 4000, "{name}");
            assert!(
                !String::from_utf8_lossy(&r.body).contains(MARK),
                "{name}: no summary pinned"
            );
        }
        stop(gate).await;
        let records = jsonl_records(&dir.0);
        let failed: Vec<&Value> = records.iter().filter(|r| r["kind"] == "summary").collect();
        assert_eq!(failed.len(), moves - 1, "{name}");
        for r in failed {
            assert_eq!(r["error_kind"], kind, "{name}");
        }
        let calls: Vec<&Value> = records.iter().filter(|r| r["kind"] == "call").collect();
        assert_eq!(calls.len(), 80, "{name}");
        assert!(calls.iter().all(|r| r["status"] == 200), "{name}");
    }
}

/// An Anthropic conversation summarised by a model on another route and upstream: the summary
/// call carries the key from `api_key_env`, never the client's; the summary rides first in
/// `messages` as a user message of text blocks (the system prompt is a field there).
#[tokio::test]
async fn an_anthropic_conversation_summarised_on_another_route_with_its_own_key() {
    std::env::set_var("CTXGATE_TEST_SUMMARY_KEY", "sk-summary-env");
    let up = mock(llm_reply).await;
    let n = Arc::new(AtomicUsize::new(0));
    let sum_up = mock(summariser(n.clone())).await;
    let gate = TestConfig::new()
        .route("anthropic", "/anthropic/", &up.url(), "anthropic")
        .set_route("prune", "hard_token_limit", 3000)
        .set_route("prune.summary", "enabled", true)
        .set_route("prune.summary", "model", MODEL)
        .set_route("prune.summary", "route", "sum")
        .set_route("prune.summary", "api_key_env", "CTXGATE_TEST_SUMMARY_KEY")
        .set_route("prune.summary", "min_dropped_tokens", 1)
        .route("sum", "/sum/", &format!("{}v1/", sum_up.url()), "openai")
        .start()
        .await;
    let mut history: Vec<Value> = Vec::new();
    for i in 0..30 {
        history.push(json!({"role": "user", "content": format!("Step {i}: explain part {i} of the design. {}", "Context words. ".repeat(30))}));
        let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 256, "system": "You are a careful assistant.", "messages": history}).to_string();
        let (s, _, _) = send(
            "POST",
            &gate.url("/anthropic/v1/messages"),
            &[
                ("x-conversation-id", "anthropic-sum"),
                ("x-api-key", "sk-ant-client"),
                ("anthropic-version", "2023-06-01"),
            ],
            &body,
        )
        .await;
        assert_eq!(s, 200);
        history.push(json!({"role": "assistant", "content": [{"type": "text", "text": format!("Part {i} does its one job. {}", "Answer words. ".repeat(30))}]}));
    }
    until_sample(&gate, "ctxgate_summary_running", 0.0).await;
    let sums = sum_up.requests();
    assert!(!sums.is_empty());
    for s in &sums {
        assert_eq!(s.headers["authorization"], "Bearer sk-summary-env");
        assert!(!s.headers.contains_key("x-api-key"));
        assert!(s.uri.ends_with("/v1/chat/completions"));
    }
    assert!(up
        .requests()
        .iter()
        .all(|r| r.headers["x-api-key"] == "sk-ant-client"));
    let mut pinned = 0;
    for r in up.requests() {
        let req = ChatRequest::parse(Dialect::Anthropic, &r.body).unwrap();
        assert!(
            Counter::new(Encoding::O200kBase)
                .unwrap()
                .count_request(&req)
                <= 3000
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        let msgs = v["messages"].as_array().unwrap();
        // Turns alternate, starting with the user: the summary joins the first user turn.
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m["role"], if i % 2 == 0 { "user" } else { "assistant" });
        }
        let first = &msgs[0];
        if let Some(text) = first["content"][0]["text"].as_str() {
            if text.starts_with(MARK) {
                pinned += 1;
                assert_eq!(first["content"][0]["type"], "text");
                assert!(text.strip_prefix(MARK).unwrap().starts_with("\nSUMMARY #"));
                // The turn's own text follows the summary, untouched.
                let own = first["content"][1]["text"].as_str().unwrap();
                assert!(own.starts_with("Step "), "{own}");
                assert_eq!(first["content"].as_array().unwrap().len(), 2);
            }
        }
    }
    assert!(pinned >= 3, "{pinned} requests carried the summary");
}

/// A message cap moves the cut every turn, each move dropping less than `min_dropped_tokens`:
/// the first summary waits until enough was dropped, later moves carry the summary to the new
/// cut and keep what they dropped in a backlog, which the next summary folds in — every
/// dropped message is summarised exactly once, none lost between carries; the pin counts
/// against the cap.
#[tokio::test]
async fn small_moves_are_carried_and_their_messages_folded_into_the_next_summary() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = mock(summariser(n.clone())).await;
    let dir = TempDir::new("carry");
    let gate = config(&up, &dir)
        .set("prune", "max_messages", 7)
        .set("prune.summary", "min_dropped_tokens", 150)
        .start()
        .await;
    let mut history = vec![json!({"role": "system", "content": "You answer briefly."})];
    for i in 0..24 {
        ask(&gate, "carry", &mut history, i).await;
        // A summary started by this request (counted before its answer) ends first.
        until_sample(&gate, "ctxgate_summary_running", 0.0).await;
    }
    let page = metrics(&gate).await;
    let carried = sample(
        &page,
        "ctxgate_summary_skipped_total{reason=\"carried\",route=\"test\"}",
    );
    assert!(carried >= 3.0, "{carried} carries");
    let reqs = up.requests();
    let inputs = summary_inputs(&reqs);
    assert!(inputs.len() >= 3, "{} summaries", inputs.len());
    // Every question up to the newest one summarised appears in exactly one summary's input.
    let seen = |i: usize| times_summarised(&inputs, i);
    let last = (0..24).rev().find(|&i| seen(i) > 0).unwrap();
    assert!(last >= 8, "summarised up to Q{last}");
    for i in 0..=last {
        assert_eq!(seen(i), 1, "Q{i}");
    }
    // The cap holds with the summary counted.
    for r in reqs.iter().filter(|r| !is_summary_request(r)) {
        assert!(raw_messages(&r.body).len() <= 7);
    }
    assert!(sample(&page, "ctxgate_summary_pinned_total{route=\"test\"}") >= 5.0);
}

/// A summary call still running at shutdown finishes within the grace period and leaves its
/// record: the transcript is drained only after it.
#[tokio::test]
async fn a_summary_running_at_shutdown_still_leaves_its_record() {
    let n = Arc::new(AtomicUsize::new(0));
    let answer = summariser(n.clone());
    let up = mock(move |r: &Recorded| {
        let reply = answer(r);
        if is_summary_request(r) {
            Reply::Delayed(Duration::from_millis(800), Box::new(reply))
        } else {
            reply
        }
    })
    .await;
    let dir = TempDir::new("shutdown");
    let gate = config(&up, &dir).start().await;
    let url = gate.url("/v1/chat/completions");
    let headers = [
        ("x-conversation-id", "closing"),
        ("authorization", "Bearer sk-client-key"),
    ];
    // Turn by turn until a cut move starts a summary call, then stop at once.
    let tools = json!([]);
    let mut history = vec![json!({"role": "system", "content": "You are a careful coding agent."})];
    for i in 0..40 {
        let [task, call, result, answer] = agent_turn(i);
        history.extend([task, call, result]);
        let body = json!({"model": "gpt-4o", "messages": history, "tools": tools}).to_string();
        assert_eq!(send("POST", &url, &headers, &body).await.0, 200);
        history.push(answer);
        if up.requests().iter().any(is_summary_request) {
            break;
        }
    }
    assert_eq!(n.load(Ordering::SeqCst), 1, "a summary call is running");
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    let sums: Vec<&Value> = records.iter().filter(|r| r["kind"] == "summary").collect();
    assert_eq!(sums.len(), 1);
    assert_eq!(sums[0]["status"], 200);
    assert!(sums[0]["latency_ms"].as_f64().unwrap() >= 800.0);
}

/// A Responses-API conversation: the summary rides as a developer message item right after
/// the leading developer message, in `input`.
#[tokio::test]
async fn a_responses_conversation_carries_the_summary_as_a_developer_item() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = mock(summariser(n.clone())).await;
    let dir = TempDir::new("responses");
    let gate = config(&up, &dir).start().await;
    let mut input = vec![json!({"role": "developer", "content": "You are a careful assistant."})];
    for i in 0..30 {
        input.push(json!({"role": "user", "content": format!("Step {i}: explain part {i}. {}", "Context words. ".repeat(30))}));
        let body = json!({"model": "gpt-4.1", "input": input}).to_string();
        let (s, _, _) = send(
            "POST",
            &gate.url("/v1/responses"),
            &[
                ("x-conversation-id", "responses-sum"),
                ("authorization", "Bearer sk-client-key"),
            ],
            &body,
        )
        .await;
        assert_eq!(s, 200);
        // A summary started by this request (counted before its answer) ends first.
        until_sample(&gate, "ctxgate_summary_running", 0.0).await;
        input.push(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": format!("Part {i} does its job. {}", "Answer words. ".repeat(30))}]}));
    }
    let mut pinned = 0;
    for r in up.requests().iter().filter(|r| !is_summary_request(r)) {
        assert!(r.uri.ends_with("/v1/responses"));
        let req = ChatRequest::parse(Dialect::Responses, &r.body).unwrap();
        assert!(
            Counter::new(Encoding::O200kBase)
                .unwrap()
                .count_request(&req)
                <= 4000
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["input"][0]["role"], "developer");
        let second = &v["input"][1];
        if second["content"]
            .as_str()
            .is_some_and(|t| t.starts_with(MARK))
        {
            pinned += 1;
            assert_eq!(second["type"], "message");
            assert_eq!(second["role"], "developer");
        }
    }
    assert!(n.load(Ordering::SeqCst) >= 1);
    assert!(pinned >= 3, "{pinned} requests carried the summary");
}

/// A summariser slower than the conversation's turns: moves come while a summary is still
/// being made (skipped as busy), and summaries land after the cut has moved on; the next
/// summary starts where the last one made ends, so every dropped message is still summarised
/// exactly once.
#[tokio::test]
async fn a_summariser_slower_than_the_turns_loses_nothing() {
    let n = Arc::new(AtomicUsize::new(0));
    let answer = summariser(n.clone());
    let up = mock(move |r: &Recorded| {
        let reply = answer(r);
        if is_summary_request(r) {
            Reply::Delayed(Duration::from_millis(400), Box::new(reply))
        } else {
            reply
        }
    })
    .await;
    let dir = TempDir::new("slow");
    let gate = config(&up, &dir)
        .set("prune", "max_messages", 7)
        .set("prune.summary", "min_dropped_tokens", 150)
        .start()
        .await;
    let mut history = vec![json!({"role": "system", "content": "You answer briefly."})];
    for i in 0..30 {
        ask(&gate, "slow", &mut history, i).await;
        // A turn every 30 ms or more: a summary takes several.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    until_sample(&gate, "ctxgate_summary_running", 0.0).await;
    let page = metrics(&gate).await;
    let busy = sample(
        &page,
        "ctxgate_summary_skipped_total{reason=\"busy\",route=\"test\"}",
    );
    assert!(busy >= 1.0, "the summariser never lagged: {busy} busy");
    let inputs = summary_inputs(&up.requests());
    assert!(inputs.len() >= 2, "{} summaries", inputs.len());
    let seen = |i: usize| times_summarised(&inputs, i);
    let last = (0..30).rev().find(|&i| seen(i) > 0).unwrap();
    assert!(last >= 10, "summarised up to Q{last}");
    for i in 0..=last {
        assert_eq!(seen(i), 1, "Q{i}");
    }
}

/// A summary call still running when shutdown's grace period ends is cut, and leaves its
/// record (`summary_shutdown`).
#[tokio::test]
async fn a_summary_cut_by_the_end_of_the_grace_period_is_recorded() {
    let n = Arc::new(AtomicUsize::new(0));
    let answer = summariser(n.clone());
    let up = mock(move |r: &Recorded| {
        let reply = answer(r);
        if is_summary_request(r) {
            Reply::Delayed(Duration::from_secs(30), Box::new(reply))
        } else {
            reply
        }
    })
    .await;
    let dir = TempDir::new("cut");
    let gate = config(&up, &dir)
        .set("", "shutdown_grace", "500ms")
        .start()
        .await;
    let url = gate.url("/v1/chat/completions");
    let headers = [
        ("x-conversation-id", "cut"),
        ("authorization", "Bearer sk-client-key"),
    ];
    let mut history = vec![json!({"role": "system", "content": "You are a careful coding agent."})];
    for i in 0..40 {
        let [task, call, result, answer] = agent_turn(i);
        history.extend([task, call, result]);
        let body = json!({"model": "gpt-4o", "messages": history}).to_string();
        assert_eq!(send("POST", &url, &headers, &body).await.0, 200);
        history.push(answer);
        if up.requests().iter().any(is_summary_request) {
            break;
        }
    }
    assert!(up.requests().iter().any(is_summary_request));
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    let sums: Vec<&Value> = records.iter().filter(|r| r["kind"] == "summary").collect();
    assert_eq!(sums.len(), 1);
    assert_eq!(sums[0]["error_kind"], "summary_shutdown");
}
