//! Client connections that would otherwise sit open forever are closed, each by its own limit
//! from `[server]`, and counted by reason: one that sends nothing, part of the HTTP/2 preface,
//! slow HTTP/1.1 headers, an idle h2c connection after SETTINGS, a chat body that stops after
//! its headers (408, recorded with its conversation), and the cap on open connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn cfg(up: &Mock) -> TestConfig {
    TestConfig::openai(up)
        .set("server", "first_bytes_timeout", "300ms")
        .set("server", "header_read_timeout", "300ms")
        .set("server", "idle_timeout", "400ms")
        .set("server", "body_idle_timeout", "300ms")
}

/// Reads until the server closes the connection; returns what it sent and how long it took.
async fn until_closed(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the connection was not closed within 5 s");
    (out, t0.elapsed())
}

fn closed(reason: &str) -> String {
    format!("ctxgate_client_connections_closed_total{{reason=\"{reason}\"}}")
}

#[tokio::test]
async fn stalled_connections_are_closed_by_their_timeouts() {
    let up = mock(llm_reply).await;
    let gate = cfg(&up).start().await;

    // Sends nothing at all.
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    let (got, took) = until_closed(&mut s).await;
    assert!(got.is_empty());
    assert!(took >= Duration::from_millis(250), "{took:?}");
    // Part of the HTTP/2 preface, then nothing.
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (got, _) = until_closed(&mut s).await;
    assert!(got.is_empty());
    until_sample(&gate, &closed("first_bytes_timeout"), 2.0).await;

    // HTTP/1.1 headers that never end.
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    until_closed(&mut s).await;
    until_sample(&gate, &closed("header_read_timeout"), 1.0).await;

    // h2c: the preface and an empty SETTINGS frame, then silence.
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (got, took) = until_closed(&mut s).await;
    assert_eq!(got[3], 4, "the server's SETTINGS came first");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    until_sample(&gate, &closed("idle_timeout"), 1.0).await;
    until_sample(&gate, "ctxgate_client_connections", 0.0).await;
    stop(gate).await;
}

#[tokio::test]
async fn a_chat_body_that_stops_gets_408_with_its_conversation() {
    let up = mock(llm_reply).await;
    let dir = TempDir::new("body-stall");
    let gate = cfg(&up)
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
        .start()
        .await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-conversation-id: stalled-body\r\ncontent-length: 100\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("the request body did not arrive within 300ms (server.body_idle_timeout)"),
        "{text}"
    );
    assert!(up.requests().is_empty());
    drop(s);
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["status"], 408);
    assert_eq!(records[0]["error_kind"], "body_timeout");
    assert_eq!(records[0]["conversation_id"], "stalled-body");
}

#[tokio::test]
async fn past_max_connections_new_ones_wait_for_a_free_slot() {
    let up = mock(llm_reply).await;
    let gate = TestConfig::openai(&up)
        .set("server", "max_connections", 2)
        .start()
        .await;
    let a = TcpStream::connect(gate.addr).await.unwrap();
    let _b = TcpStream::connect(gate.addr).await.unwrap();
    until_sample(&gate, "ctxgate_client_connections", 2.0).await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut c = TcpStream::connect(gate.addr).await.unwrap();
    c.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut buf)).await;
    assert!(
        early.is_err(),
        "the third connection waits while two are open"
    );
    drop(a);
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    stop(gate).await;
}

#[tokio::test]
async fn a_request_hyper_cannot_parse_is_answered_and_counted() {
    let up = mock(llm_reply).await;
    let gate = cfg(&up).start().await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nbad header line\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = until_closed(&mut s).await;
    assert!(
        got.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    until_sample(&gate, &closed("bad_request"), 1.0).await;
    assert!(up.requests().is_empty());
    stop(gate).await;
}
