//! Smoke test of the real binary: `--version`, `--help`, `check` (exit 0 / 64), and `serve`
//! with a temporary config in front of the mock upstream, stopped by SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_ctxgate");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn version_help_and_check() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("ctxgate {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["serve", "check"] {
        assert!(help.contains(sub), "{help}");
    }

    // The shipped config is valid.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let out = Command::new(BIN)
        .args(["check", "--config", shipped])
        .env_remove("CTXGATE_LISTEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("listen = \"127.0.0.1:8787\""), "{printed}");
    assert!(
        printed.contains("upstream = \"https://api.anthropic.com/\""),
        "{printed}"
    );
    // An environment override shows in the effective config.
    let out = Command::new(BIN)
        .args(["check", "--config", shipped])
        .env("CTXGATE_LISTEN", "127.0.0.1:9999")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen = \"127.0.0.1:9999\""));

    // A bad value: exit 64, the key, the value and what is allowed.
    let dir = TempDir::new("smoke-bad");
    let bad = dir.file(
        "config.toml",
        &std::fs::read_to_string(shipped)
            .unwrap()
            .replace("dialect = \"anthropic\"", "dialect = \"antropic\""),
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "routes[2].dialect: unknown variant `antropic`, expected `openai` or `anthropic`"
        ),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/ctxgate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn serve_forwards_and_exits_zero_on_sigterm() {
    let up = mock(llm_reply).await;
    let (port, admin) = (free_port(), free_port());
    let dir = TempDir::new("smoke-serve");
    let tdir = dir.path().join("transcripts");
    let cfg = TestConfig::openai(&up)
        .set("", "listen", format!("127.0.0.1:{port}"))
        .set("", "admin_listen", format!("127.0.0.1:{admin}"))
        .set("", "shutdown_grace", "5s")
        .set("transcripts", "dir", tdir.display().to_string())
        .set("transcripts", "include_bodies", true)
        .set("transcripts", "flush_interval", "60s")
        .toml();
    let path = dir.file("config.toml", &cfg);
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("CTXGATE_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up_ok = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_ok()
        {
            up_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up_ok, "ctxgate did not start");
    // Real-looking keys, which must reach neither a log line nor a transcript.
    let keys = [
        "sk-proj-Zx8d2kQ7mN4pL1vB9cR6tY3wE0aS5fG",
        "sk-ant-api03-Hq7Lm2Nc9Xv4Bz8Kd1Wp6Ty3Rs0Ja5Fe",
    ];
    let bearer = format!("Bearer {}", keys[0]);
    let (s, _, b) = send(
        "POST",
        &format!("http://127.0.0.1:{port}/v1/chat/completions"),
        &[("authorization", bearer.as_str()), ("x-api-key", keys[1])],
        "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b, bytes::Bytes::from_static(OPENAI_JSON.as_bytes()));
    let (s, _, _) = send("GET", &format!("http://127.0.0.1:{admin}/healthz"), &[], "").await;
    assert_eq!(s, 200);

    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut log = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .await
        .unwrap();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("transcripts flushed"), "{log}");
    // The record queued at SIGTERM was flushed before exit: exactly one, with the body.
    let files: Vec<_> = std::fs::read_dir(&tdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(text.lines().count(), 1);
    let rec: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(rec["response_text"], "Hello from the mock.");
    assert_eq!(rec["request_messages"][0]["content"], "hi");
    for k in keys {
        assert!(!log.contains(k), "a credential reached the log");
        assert!(!text.contains(k), "a credential reached a transcript");
    }
}
