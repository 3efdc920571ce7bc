//! /metrics after a known sequence of calls: exact counter values and histogram counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

const SEED: &str = include_str!("fixtures/openai-seed.json");

#[tokio::test]
async fn known_sequence_gives_exact_figures() {
    let up = mock(|r| {
        if String::from_utf8_lossy(&r.body).contains("\"slow\"") {
            Reply::Delayed(Duration::from_secs(5), Box::new(Reply::json(OPENAI_JSON)))
        } else {
            llm_reply(r)
        }
    })
    .await;
    let gate = Arc::new(
        TestConfig::openai(&up)
            .set("prune", "hard_token_limit", 4000)
            .set("timeouts", "response_headers", "1500ms")
            .set("gates", "max_queue_per_conversation", 0)
            .start()
            .await,
    );
    let chat = |content: &str| {
        serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).to_string()
    };
    let post = |conv: &'static str, body: String| {
        let g = gate.clone();
        async move {
            send(
                "POST",
                &g.url("/v1/chat/completions"),
                &[("x-conversation-id", conv)],
                &body,
            )
            .await
            .0
            .as_u16()
        }
    };

    // 1 pruned, 2 unchanged, 1 rejected (pinned part over the limit), 1 timed out, 1 gated.
    assert_eq!(post("a", SEED.to_string()).await, 200);
    assert_eq!(post("b", chat("hello")).await, 200);
    assert_eq!(post("b", chat("hello again")).await, 200);
    assert_eq!(post("c", chat(&"word ".repeat(5000))).await, 400);
    let slow = tokio::spawn(post("d", chat("slow")));
    up.until_request("\"slow\"").await;
    // Conversation d is busy and may not queue: 429 at once.
    assert_eq!(post("d", chat("second")).await, 429);
    assert_eq!(slow.await.unwrap(), 504);

    let page = metrics(&gate).await;
    let v = |series: &str| sample(&page, series);
    let r = "route=\"test\"";
    assert_eq!(
        v(&format!(
            "ctxgate_http_requests_total{{{r},status=\"200\"}}"
        )),
        3.0
    );
    assert_eq!(
        v(&format!(
            "ctxgate_http_requests_total{{{r},status=\"400\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            "ctxgate_http_requests_total{{{r},status=\"429\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            "ctxgate_http_requests_total{{{r},status=\"504\"}}"
        )),
        1.0
    );
    assert_eq!(
        v("ctxgate_prune_actions_total{action=\"pruned\",route=\"test\"}"),
        1.0
    );
    assert_eq!(
        v("ctxgate_prune_actions_total{action=\"unchanged\",route=\"test\"}"),
        3.0,
        "b, b and the timed-out d"
    );
    assert_eq!(
        v("ctxgate_prune_actions_total{action=\"rejected\",route=\"test\"}"),
        1.0
    );
    assert_eq!(
        v("ctxgate_prune_prompt_tokens_count{route=\"test\",stage=\"before\"}"),
        4.0,
        "pruned + 3 unchanged"
    );
    assert_eq!(
        v("ctxgate_timeouts_total{phase=\"response_headers\",route=\"test\"}"),
        1.0
    );
    assert_eq!(
        v("ctxgate_upstream_errors_total{kind=\"timeout_response_headers\",route=\"test\"}"),
        1.0
    );
    assert_eq!(
        v("ctxgate_gate_rejections_total{reason=\"queue_full\",route=\"test\"}"),
        1.0
    );
    assert_eq!(
        v(&format!(
            "ctxgate_http_time_to_first_byte_seconds_count{{{r}}}"
        )),
        3.0
    );
    assert_eq!(
        v(&format!("ctxgate_gate_wait_seconds_count{{{r}}}")),
        5.0,
        "every admitted request"
    );
    // Usage of the three answered chat calls: the pruned one streamed, two JSON answers.
    assert_eq!(
        v("ctxgate_upstream_tokens_total{route=\"test\",type=\"input\"}"),
        63.0
    );
    assert_eq!(
        v("ctxgate_upstream_tokens_total{route=\"test\",type=\"output\"}"),
        13.0
    );
    assert_eq!(
        v("ctxgate_upstream_tokens_total{route=\"test\",type=\"cache_read\"}"),
        24.0
    );
    assert_eq!(v("gen_ai_client_token_usage_count{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"openai\",gen_ai_token_type=\"input\"}"), 3.0);
    assert_eq!(v("ctxgate_token_estimate_ratio_count{route=\"test\"}"), 3.0);
    assert_eq!(v("ctxgate_build_info{version=\"0.1.0\"}"), 1.0);
    // The whole-call duration is observed once per call, errors included, when its body ends —
    // which can trail the client's last read by a moment, so this polls (bounded).
    until_sample(
        &gate,
        &format!("ctxgate_http_request_duration_seconds_count{{{r}}}"),
        6.0,
    )
    .await;
}

#[tokio::test]
async fn a_fresh_page_shows_every_known_series_at_zero() {
    let up = mock(llm_reply).await;
    let dir = TempDir::new("zero-series");
    let gate = TestConfig::openai(&up)
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.path().display().to_string())
        .start()
        .await;
    let page = metrics(&gate).await;
    let has = |line: &str| {
        assert!(
            page.lines().any(|l| l == line),
            "no `{line}` on a fresh page:\n{page}"
        )
    };
    for action in [
        "unchanged",
        "pruned",
        "rejected",
        "skipped",
        "shadow",
        "holdout",
    ] {
        has(&format!(
            "ctxgate_prune_actions_total{{action=\"{action}\",route=\"test\"}} 0"
        ));
    }
    for phase in ["connect", "response_headers", "stream_idle", "total"] {
        has(&format!(
            "ctxgate_timeouts_total{{phase=\"{phase}\",route=\"test\"}} 0"
        ));
    }
    for reason in ["queue_full", "queue_timeout"] {
        has(&format!(
            "ctxgate_gate_rejections_total{{reason=\"{reason}\",route=\"test\"}} 0"
        ));
    }
    for kind in ["upstream_connect", "upstream_reset", "upstream_body"] {
        has(&format!(
            "ctxgate_upstream_errors_total{{kind=\"{kind}\",route=\"test\"}} 0"
        ));
    }
    for t in ["input", "output", "cache_read", "cache_write"] {
        has(&format!(
            "ctxgate_upstream_tokens_total{{route=\"test\",type=\"{t}\"}} 0"
        ));
    }
    for reason in ["queue_full", "retry_evicted", "rejected", "shutdown"] {
        has(&format!(
            "ctxgate_transcript_records_dropped_total{{reason=\"{reason}\",sink=\"jsonl\"}} 0"
        ));
    }
    has("ctxgate_client_disconnects_total{route=\"test\"} 0");
    has("ctxgate_prune_cut_moves_total{route=\"test\"} 0");
    has("ctxgate_transcript_records_written_total{sink=\"jsonl\"} 0");
    has("ctxgate_http_request_duration_seconds_count{route=\"test\"} 0");
    stop(gate).await;
}

#[tokio::test]
async fn compressed_answers_pass_untouched_and_their_usage_is_read() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(OPENAI_JSON.as_bytes()).unwrap();
    let gz = bytes::Bytes::from(gz.finish().unwrap());
    let reply = gz.clone();
    let up = mock(move |_| Reply::Full {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("content-encoding".into(), "gzip".into()),
        ],
        body: reply.clone(),
    })
    .await;
    let gate = TestConfig::openai(&up).start().await;
    let body = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let (s, h, b) = send(
        "POST",
        &gate.url("/v1/chat/completions"),
        &[("accept-encoding", "gzip")],
        &body,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(
        b, gz,
        "the client gets the upstream's compressed bytes as they were"
    );
    // The tap read the usage from the decoded answer: 21 prompt, 5 completion, 8 cached.
    until_sample(
        &gate,
        "ctxgate_upstream_tokens_total{route=\"test\",type=\"input\"}",
        21.0,
    )
    .await;
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_upstream_tokens_total{route=\"test\",type=\"output\"}"
        ),
        5.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_upstream_tokens_total{route=\"test\",type=\"cache_read\"}"
        ),
        8.0
    );
}
