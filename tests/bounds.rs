//! What a hostile or unlucky client cannot do: slip a chat request past pruning with a path
//! variant, send TRACE, or grow the gate table without bound with fresh conversation ids.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

/// A prompt far over the limit: pruning would refuse it, so a variant that skipped pruning
/// would show as a 200 from the mock.
fn huge() -> String {
    serde_json::json!({"model": "gpt-4o", "messages": [
        {"role": "user", "content": "word ".repeat(200_000)}]})
    .to_string()
}

#[tokio::test]
async fn path_variants_of_chat_endpoints_are_refused_not_forwarded() {
    let up = mock(llm_reply).await;
    let gate = TestConfig::both(&up)
        .set("prune", "hard_token_limit", 4000)
        .start()
        .await;
    let body = huge();
    for path in [
        "/v1/chat/completions/",
        "/v1/chat//completions",
        "/v1/Chat/Completions",
        "/v1/chat/completions;",
        "/v1/chat/completions%20",
        "/v1/responses/",
        "/anthropic/v1/messages/",
        "/anthropic/v1/Messages",
    ] {
        let (s, h, b) = send("POST", &gate.url(path), &[], &body).await;
        assert_eq!(s, 400, "{path}");
        assert_eq!(h["x-ctxgate-error"], "bad_target", "{path}");
        let v: Value = serde_json::from_slice(&b).unwrap();
        let msg = if path.starts_with("/anthropic") {
            assert_eq!(v["type"], "error");
            v["error"]["message"].as_str().unwrap().to_string()
        } else {
            assert_eq!(v["error"]["type"], "invalid_request_error");
            v["error"]["message"].as_str().unwrap().to_string()
        };
        assert!(msg.contains("is not a canonical path"), "{path}: {msg}");
    }
    // The canonical path is pruned (here: refused as over the limit), and what is not a chat
    // endpoint passes whatever its spelling.
    let (s, _, _) = send("POST", &gate.url("/v1/chat/completions"), &[], &body).await;
    assert_eq!(s, 400);
    let (s, _, _) = send("GET", &gate.url("/v1//models/"), &[], "").await;
    assert_eq!(s, 200);
    assert_eq!(up.requests().len(), 1, "only the GET reached the upstream");
    let (s, h, _) = send("TRACE", &gate.url("/v1/models"), &[], "").await;
    assert_eq!(s, 400);
    assert_eq!(h["x-ctxgate-error"], "bad_target");
    assert_eq!(up.requests().len(), 1);
    stop(gate).await;
}

#[tokio::test]
async fn an_id_flood_keeps_the_gate_table_at_its_bound() {
    let up = mock(llm_reply).await;
    let gate = TestConfig::openai(&up)
        .set("gates", "max_conversations", 64)
        .start()
        .await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for i in 0..400 {
        let id = format!("flood-{i}");
        let (s, _, _) = send(
            "POST",
            &gate.url("/v1/chat/completions"),
            &[("x-conversation-id", id.as_str())],
            body,
        )
        .await;
        assert_eq!(s, 200);
    }
    let page = metrics(&gate).await;
    let known = sample(&page, "ctxgate_gate_known");
    assert!(known <= 64.0 && known > 0.0, "{known}");
    stop(gate).await;
}
