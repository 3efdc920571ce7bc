//! The official `openai` and `anthropic` Python SDKs, base URL swapped to ctxgate, make a
//! non-streaming and a streaming call each through it to the mock upstream. Needs the SDKs in
//! `.venv` (the README's test command, `scripts/test`, installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// The Python with the SDKs: `$TEST_SDK_PYTHON`, else the repository's `.venv`.
pub fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TEST_SDK_PYTHON") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/test, which installs the SDKs into .venv",
        p.display()
    );
    p
}

/// Runs tests/sdk/clients.py against ctxgate and returns the JSON it prints.
async fn run_clients(gate: &Gate, args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/clients.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(format!("http://{}", gate.addr))
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "sdk script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn official_sdks_through_ctxgate() {
    let up = mock(llm_reply).await;
    let gate = TestConfig::both(&up).start().await;
    let v = run_clients(&gate, &[]).await;
    assert_eq!(
        v["openai"],
        serde_json::json!({"id": "chatcmpl-mock1", "text": "Hello from the mock.", "prompt_tokens": 21})
    );
    assert_eq!(
        v["openai_stream"],
        serde_json::json!({"text": "Hello stream.", "prompt_tokens": 21})
    );
    assert_eq!(
        v["anthropic"],
        serde_json::json!({"id": "msg_mock1", "text": "Hello from the mock.", "input_tokens": 21})
    );
    assert_eq!(
        v["anthropic_stream"],
        serde_json::json!({"text": "Hello stream.", "output_tokens": 3})
    );

    let got = up.requests();
    let paths: Vec<&str> = got.iter().map(|r| r.uri.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/messages"
        ]
    );
    assert_eq!(
        got[0].headers["authorization"],
        "Bearer sk-test-openai-0123456789"
    );
    assert_eq!(got[2].headers["x-api-key"], "sk-ant-test-0123456789");
    assert!(got[2].headers.contains_key("anthropic-version"));
}

#[tokio::test]
async fn openai_sdk_long_conversation_is_pruned() {
    let up = mock(llm_reply).await;
    let gate = TestConfig::new()
        .route("openai", "/v1/", &format!("{}v1/", up.url()), "openai")
        .set("prune", "hard_token_limit", 4000)
        .set("prune", "max_messages", 5)
        .start()
        .await;
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openai-seed.json"
    );
    let v = run_clients(&gate, &["long", fixture]).await;
    assert_eq!(v["text"], "Hello from the mock.");
    let got = up.requests();
    assert_eq!(got.len(), 1);
    let fwd: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    let n = fwd["messages"].as_array().unwrap().len();
    assert!(n <= 5, "upstream got {n} messages");
    let req = ctxgate::prune::ChatRequest::parse(ctxgate::dialect::Dialect::OpenAi, &got[0].body)
        .unwrap();
    let after = ctxgate::prune::Counter::new(ctxgate::prune::Encoding::O200kBase)
        .unwrap()
        .count_request(&req);
    assert!(after <= 4000, "upstream got {after} tokens");
    assert_eq!(v["tokens_after"].as_str().unwrap(), after.to_string());
    assert!(v["tokens_before"].as_str().unwrap().parse::<u64>().unwrap() > 50_000);
}
