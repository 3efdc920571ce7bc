//! Transcript records through the proxy: N calls of both dialects, streamed and not, then a
//! clean shutdown leaves exactly N records whose figures match what the mock upstream sent and
//! what pruning did — usage, finish reason, and the cost at the config's `[[prices]]` — in
//! JSONL files and in a real PostgreSQL; the effectiveness metrics count the same.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

const SEED: &str = include_str!("fixtures/openai-seed.json");

/// Both routes, a 4000-token limit, prices for both mock models, and a long flush interval:
/// records are still queued when the shutdown comes.
fn cfg(up: &Mock) -> TestConfig {
    TestConfig::both(up)
        .set("prune", "hard_token_limit", 4000)
        .set("transcripts", "flush_interval", "60s")
        .set(
            "",
            "prices",
            serde_json::json!([
                // Cache writes at the input price, as OpenAI bills them.
                {"match": "gpt-4o*", "input": 1.0, "cached_input": 0.5, "output": 4.0},
                {"match": "claude-sonnet-4*", "input": 2.0, "cached_input": 0.25, "cache_write": 2.5, "output": 8.0},
            ]),
        )
}

/// What the mock's answers cost at [`cfg`]'s prices, US dollars: OpenAI's usage is 21 prompt
/// tokens, 8 of them cached (13 fresh), 5 output as JSON and 3 streamed; Anthropic's 21
/// fresh, 13 cache reads, 5 cache writes, 5 or 3 output.
const OPENAI_JSON_USD: f64 = (13.0 * 1.0 + 8.0 * 0.5 + 5.0 * 4.0) / 1e6;
const OPENAI_SSE_USD: f64 = (13.0 * 1.0 + 8.0 * 0.5 + 3.0 * 4.0) / 1e6;
const ANTHROPIC_JSON_USD: f64 = (21.0 * 2.0 + 13.0 * 0.25 + 5.0 * 2.5 + 5.0 * 8.0) / 1e6;
const ANTHROPIC_SSE_USD: f64 = (21.0 * 2.0 + 13.0 * 0.25 + 5.0 * 2.5 + 3.0 * 8.0) / 1e6;

/// What the pruned call (c-5) would have cost unpruned: the tokens pruning removed, scaled by
/// its usage ratio (the upstream's 21 prompt tokens over ctxgate's count of what was sent),
/// at its mix of cached (8 of 21) and fresh prompt prices.
fn unpruned_usd(r: &Value) -> f64 {
    let (before, after) = (
        r["tokens_before"].as_u64().unwrap(),
        r["tokens_after"].as_u64().unwrap(),
    );
    let removed = ((before - after) as f64 * 21.0 / after as f64).round();
    let share = 8.0 / 21.0;
    OPENAI_SSE_USD + removed * (share * 0.5 + (1.0 - share) * 1.0) / 1e6
}

/// The calls every test makes: (path, body, conversation), in order.
fn calls() -> Vec<(&'static str, String, &'static str)> {
    let oa = |stream: bool| {
        serde_json::json!({"model": "gpt-4o-mini", "stream": stream, "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { Value::Null }, "messages": [{"role": "user", "content": "hi"}]}).to_string()
    };
    let an = |stream: bool| {
        serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).to_string()
    };
    vec![
        ("/v1/chat/completions", oa(false), "c-1"),
        ("/v1/chat/completions", oa(true), "c-2"),
        ("/anthropic/v1/messages", an(false), "c-3"),
        ("/anthropic/v1/messages", an(true), "c-4"),
        ("/v1/chat/completions", SEED.to_string(), "c-5"),
        ("/v1/models", String::new(), "c-6"),
    ]
}

async fn drive(gate: &Gate) {
    for (path, body, conv) in calls() {
        let method = if body.is_empty() { "GET" } else { "POST" };
        let (s, _, _) = send(
            method,
            &gate.url(path),
            &[
                ("x-conversation-id", conv),
                (
                    "authorization",
                    "Bearer sk-proj-abcdefghijklmnopqrstuvwxyz0123456789",
                ),
                ("x-api-key", "sk-ant-api03-ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            ],
            &body,
        )
        .await;
        assert_eq!(s, 200);
    }
}

/// Checks the records against what the mock sent and what pruning did.
fn check(records: &[Value]) {
    assert_eq!(records.len(), 6, "{records:#?}");
    let by = |c: &str| {
        records
            .iter()
            .find(|r| r["conversation_id"] == c)
            .unwrap_or_else(|| panic!("no record for {c}"))
    };
    // Costs and finish reasons, streamed and not, per dialect: exact, as the mock's usage at
    // the config's prices; an unpruned call would have cost what it did.
    for (c, usd, finish) in [
        ("c-1", OPENAI_JSON_USD, "stop"),
        ("c-2", OPENAI_SSE_USD, "stop"),
        ("c-3", ANTHROPIC_JSON_USD, "end_turn"),
        ("c-4", ANTHROPIC_SSE_USD, "end_turn"),
    ] {
        let r = by(c);
        assert_eq!(r["cost_usd"].as_f64(), Some(usd), "{c}: {r}");
        assert_eq!(r["cost_unpruned_usd"].as_f64(), Some(usd), "{c}");
        assert_eq!(r["finish_reason"], finish, "{c}");
        assert_eq!(r["holdout"], false);
    }
    let r = by("c-5");
    assert_eq!(r["cost_usd"].as_f64(), Some(OPENAI_SSE_USD));
    let unpruned = r["cost_unpruned_usd"].as_f64().unwrap();
    assert!(
        (unpruned - unpruned_usd(r)).abs() < 1e-12,
        "{unpruned} vs {}",
        unpruned_usd(r)
    );
    assert!(
        unpruned > 10.0 * OPENAI_SSE_USD,
        "pruning removed most of it"
    );
    assert_eq!(r["finish_reason"], "stop");
    let r = by("c-6");
    assert!(r["cost_usd"].is_null() && r["cost_unpruned_usd"].is_null());
    assert!(r["finish_reason"].is_null());
    let r = by("c-1");
    assert_eq!(
        (
            r["route"].as_str(),
            r["status"].as_u64(),
            r["stream"].as_bool()
        ),
        (Some("openai"), Some(200), Some(false))
    );
    assert_eq!(r["model"], "gpt-4o-mini");
    assert_eq!(r["prune_action"], "unchanged");
    assert_eq!(
        (
            r["input_tokens"].as_u64(),
            r["output_tokens"].as_u64(),
            r["cache_read_tokens"].as_u64()
        ),
        (Some(21), Some(5), Some(8))
    );
    let r = by("c-2");
    assert_eq!(r["stream"], true);
    assert_eq!(
        (
            r["input_tokens"].as_u64(),
            r["output_tokens"].as_u64(),
            r["cache_read_tokens"].as_u64()
        ),
        (Some(21), Some(3), Some(8))
    );
    // Anthropic reports input_tokens (21) without the cached 13 + 5; records hold the whole prompt.
    let r = by("c-3");
    assert_eq!(
        (
            r["input_tokens"].as_u64(),
            r["output_tokens"].as_u64(),
            r["cache_read_tokens"].as_u64(),
            r["cache_write_tokens"].as_u64()
        ),
        (Some(39), Some(5), Some(13), Some(5))
    );
    let r = by("c-4");
    assert_eq!(
        (
            r["input_tokens"].as_u64(),
            r["output_tokens"].as_u64(),
            r["cache_read_tokens"].as_u64(),
            r["cache_write_tokens"].as_u64()
        ),
        (Some(39), Some(3), Some(13), Some(5))
    );
    let r = by("c-5");
    assert_eq!(r["prune_action"], "pruned");
    assert!(r["tokens_before"].as_u64().unwrap() > 50_000);
    assert!(r["tokens_after"].as_u64().unwrap() <= 4000);
    assert_eq!(r["messages_before"].as_u64(), Some(22));
    assert!(r["messages_after"].as_u64().unwrap() <= 5);
    let ratio = r["usage_ratio"].as_f64().unwrap();
    assert!((ratio - 21.0 / r["tokens_after"].as_f64().unwrap()).abs() < 1e-9);
    let r = by("c-6");
    assert_eq!(r["prune_action"], "none");
    assert!(r["input_tokens"].is_null());
    for r in records {
        assert!(r["latency_ms"].as_f64().unwrap() >= 0.0);
        assert!(
            r["request_messages"].is_null() && r["response_text"].is_null(),
            "no bodies unless include_bodies"
        );
        let text = r.to_string();
        assert!(
            !text.contains("sk-proj-") && !text.contains("sk-ant-api03"),
            "a credential reached a record"
        );
    }
}

/// JSONL records flattened to the same shape as PostgreSQL rows (usage columns at top level).
fn flatten(mut r: Value) -> Value {
    if let Some(u) = r.get("usage").cloned() {
        for k in [
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
        ] {
            r[k] = u[k].clone();
        }
    }
    r
}

#[tokio::test]
async fn jsonl_holds_exactly_one_record_per_call_after_shutdown() {
    let up = mock(llm_reply).await;
    let dir = TempDir::new("jsonl-e2e");
    let gate = cfg(&up)
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
        .start()
        .await;
    drive(&gate).await;
    // The effectiveness metrics count what the records hold (each call ends a moment after
    // the client's last read: wait for the last one).
    until_sample(
        &gate,
        "ctxgate_effect_calls_total{group=\"pruned\",model=\"claude-sonnet-4*\",route=\"anthropic\"}",
        2.0,
    )
    .await;
    until_sample(
        &gate,
        "ctxgate_effect_calls_total{group=\"pruned\",model=\"gpt-4o*\",route=\"openai\"}",
        3.0,
    )
    .await;
    let page = metrics(&gate).await;
    stop(gate).await;
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1, "one file");
    let records: Vec<Value> = jsonl_records(&dir.0).into_iter().map(flatten).collect();
    check(&records);
    check_metrics(&page, &records);
}

/// The effectiveness series after [`drive`], against the records of the same calls.
fn check_metrics(page: &str, records: &[Value]) {
    // Labels print in name order: group, model, prompt, reason, route, stage, type.
    let v = |series: &str| sample(page, series);
    let oa = |name: &str, group: &str, tail: &str| {
        v(&format!(
            "ctxgate_effect_{name}{{{group}model=\"gpt-4o*\",route=\"openai\"{tail}}}"
        ))
    };
    let an = |name: &str, group: &str, tail: &str| {
        v(&format!(
            "ctxgate_effect_{name}{{{group}model=\"claude-sonnet-4*\",route=\"anthropic\"{tail}}}"
        ))
    };
    let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    let pruned = records
        .iter()
        .find(|r| r["conversation_id"] == "c-5")
        .unwrap();
    close(
        v("ctxgate_effect_cost_usd_total{model=\"gpt-4o*\",prompt=\"sent\",route=\"openai\"}"),
        OPENAI_JSON_USD + 2.0 * OPENAI_SSE_USD,
    );
    close(
        v("ctxgate_effect_cost_usd_total{model=\"gpt-4o*\",prompt=\"unpruned\",route=\"openai\"}"),
        OPENAI_JSON_USD + OPENAI_SSE_USD + unpruned_usd(pruned),
    );
    close(
        v("ctxgate_effect_cost_usd_total{model=\"claude-sonnet-4*\",prompt=\"sent\",route=\"anthropic\"}"),
        ANTHROPIC_JSON_USD + ANTHROPIC_SSE_USD,
    );
    close(
        v("ctxgate_effect_cost_usd_total{model=\"claude-sonnet-4*\",prompt=\"unpruned\",route=\"anthropic\"}"),
        ANTHROPIC_JSON_USD + ANTHROPIC_SSE_USD,
    );
    // ctxgate's prompt counts: what it received, and what it sent (less only for c-5).
    let sum = |route: &str, key: &str| -> f64 {
        records
            .iter()
            .filter(|r| r["route"] == route)
            .filter_map(|r| r[key].as_u64())
            .sum::<u64>() as f64
    };
    let received = sum("openai", "tokens_before");
    assert!(received > 50_000.0);
    assert_eq!(
        v("ctxgate_effect_prompt_tokens_total{model=\"gpt-4o*\",route=\"openai\",stage=\"received\"}"),
        received
    );
    let removed = (pruned["tokens_before"].as_u64().unwrap()
        - pruned["tokens_after"].as_u64().unwrap()) as f64;
    assert_eq!(
        v("ctxgate_effect_prompt_tokens_total{model=\"gpt-4o*\",route=\"openai\",stage=\"sent\"}"),
        received - removed
    );
    assert_eq!(
        v("ctxgate_effect_prompt_tokens_total{model=\"claude-sonnet-4*\",route=\"anthropic\",stage=\"sent\"}"),
        sum("anthropic", "tokens_before")
    );
    // The upstream's figures, per model: 3 OpenAI answers of 21 (8 cached), 2 Anthropic of 39
    // (13 cache reads).
    assert_eq!(oa("upstream_tokens_total", "", ",type=\"input\""), 63.0);
    assert_eq!(
        oa("upstream_tokens_total", "", ",type=\"cache_read\""),
        24.0
    );
    assert_eq!(an("upstream_tokens_total", "", ",type=\"input\""), 78.0);
    assert_eq!(
        an("upstream_tokens_total", "", ",type=\"cache_read\""),
        26.0
    );
    // The comparison: every chat call is in group pruned (no holdout configured).
    let g = "group=\"pruned\",";
    assert_eq!(oa("calls_total", g, ""), 3.0);
    assert_eq!(oa("errors_total", g, ""), 0.0);
    assert_eq!(oa("output_tokens_total", g, ""), 11.0);
    assert_eq!(an("output_tokens_total", g, ""), 8.0);
    assert_eq!(
        v("ctxgate_effect_finish_reasons_total{group=\"pruned\",model=\"gpt-4o*\",reason=\"stop\",route=\"openai\"}"),
        3.0
    );
    assert_eq!(
        v("ctxgate_effect_finish_reasons_total{group=\"pruned\",model=\"claude-sonnet-4*\",reason=\"stop\",route=\"anthropic\"}"),
        2.0,
        "end_turn counts as stop"
    );
    assert_eq!(
        v("ctxgate_effect_call_duration_seconds_count{group=\"pruned\",route=\"openai\"}"),
        3.0
    );
    assert_eq!(
        v("ctxgate_effect_calls_total{group=\"holdout\",model=\"gpt-4o*\",route=\"openai\"}"),
        0.0,
        "the configured globs' series exist from the start"
    );
    assert!(page.contains(
        "ctxgate_effect_calls_total{group=\"holdout\",model=\"gpt-4o*\",route=\"openai\"} 0"
    ));
}

#[tokio::test]
async fn postgres_holds_exactly_one_row_per_call() {
    let server = pg::PgServer::start();
    let up = mock(llm_reply).await;
    let gate = cfg(&up)
        .set("transcripts", "sink", "postgres")
        .set("transcripts", "postgres_url", server.url())
        .start()
        .await;
    drive(&gate).await;
    stop(gate).await;
    let (client, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT row_to_json(t)::text FROM ctxgate_transcripts t ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let records: Vec<Value> = rows
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect();
    check(&records);
}
