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

#[tokio::test]
async fn official_sdks_through_ctxgate() {
    let up = mock(llm_reply).await;
    let cfg = format!(
        "[[routes]]\nname = \"openai\"\nprefix = \"/v1/\"\nupstream = \"{u}v1/\"\ndialect = \"openai\"\nprewarm_connections = 0\n\
         [[routes]]\nname = \"anthropic\"\nprefix = \"/anthropic/\"\nupstream = \"{u}\"\ndialect = \"anthropic\"\nprewarm_connections = 0\n",
        u = up.url()
    );
    let gate = start(&cfg).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/clients.py");
    let base = format!("http://{}", gate.addr);
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(&base)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "sdk script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
