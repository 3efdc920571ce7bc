//! A client that leaves before the response headers still leaves exactly one record and one
//! count: while its call waits for the upstream's headers, while it is queued at the gate, and
//! when it resets its HTTP/2 stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

fn chat(tag: &str) -> String {
    format!("{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"{tag}\"}}]}}")
}

/// A raw HTTP/1.1 chat request of conversation `conv`, left open on its connection.
async fn open_request(gate: &Gate, conv: &str, tag: &str) -> tokio::net::TcpStream {
    let body = chat(tag);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-conversation-id: {conv}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn a_client_gone_before_the_headers_leaves_one_record_and_one_count() {
    // "hold" requests get no answer for a minute; "stream" gets headers at once and a body
    // that ends when the test says so.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let rx = Mutex::new(Some(rx));
    let up = Arc::new(
        mock(move |r| {
            let body = String::from_utf8_lossy(&r.body);
            if body.contains("stream") {
                if let Some(rx) = rx.lock().unwrap().take() {
                    return Reply::Stream {
                        content_type: "text/event-stream".into(),
                        chunks: rx,
                    };
                }
            }
            Reply::Delayed(Duration::from_secs(60), Box::new(Reply::json(OPENAI_JSON)))
        })
        .await,
    );
    let dir = TempDir::new("disconnects");
    let gate = TestConfig::openai(&up)
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
        .start()
        .await;
    let disconnects = "ctxgate_client_disconnects_total{route=\"test\"}";
    let closed = "ctxgate_http_requests_total{route=\"test\",status=\"499\"}";

    // 1. Waiting for the upstream's headers: the client closes its connection.
    let s = open_request(&gate, "a", "hold-a").await;
    up.until_request("hold-a").await;
    drop(s);
    until_sample(&gate, disconnects, 1.0).await;
    until_sample(&gate, closed, 1.0).await;

    // 2. Queued at the gate behind a streaming call of its own conversation.
    let (first_status, mut first_body) = {
        let req = http::Request::post(gate.url("/v1/chat/completions"))
            .header("x-conversation-id", "b")
            .body(Full::new(Bytes::from(chat("stream-b"))))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        (resp.status(), resp.into_body())
    };
    assert_eq!(first_status, 200);
    let s = open_request(&gate, "b", "queued-b").await;
    until_sample(&gate, "ctxgate_gate_waiters", 1.0).await;
    drop(s);
    until_sample(&gate, "ctxgate_gate_waiters", 0.0).await;
    until_sample(&gate, disconnects, 2.0).await;
    until_sample(&gate, closed, 2.0).await;
    // The streaming call is unaffected: it ends normally once the upstream finishes.
    tx.send(Bytes::from_static(b"data: [DONE]\n\n"))
        .await
        .unwrap();
    drop(tx);
    let rest = (&mut first_body).collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"data: [DONE]\n\n"));

    // 3. An HTTP/2 reset: the request future is dropped, hyper's client resets the stream
    //    and keeps the connection.
    let h2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(gate.url("/v1/chat/completions"))
        .header("x-conversation-id", "c")
        .body(Full::new(Bytes::from(chat("hold-c"))))
        .unwrap();
    let pending = tokio::spawn(async move { h2.request(req).await });
    up.until_request("hold-c").await;
    pending.abort();
    until_sample(&gate, disconnects, 3.0).await;
    until_sample(&gate, closed, 3.0).await;
    until_sample(&gate, "ctxgate_gate_active", 0.0).await;

    // Exactly one record per call: three gone before their headers, one complete stream.
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_http_requests_total{route=\"test\",status=\"200\"}"
        ),
        1.0
    );
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    assert_eq!(records.len(), 4, "{records:#?}");
    let mut gone: Vec<_> = records
        .iter()
        .filter(|r| r["error_kind"] == "client_disconnect")
        .map(|r| {
            assert_eq!(r["status"], 499, "{r}");
            assert_eq!(r["ttfb_ms"], serde_json::Value::Null, "{r}");
            assert_eq!(r["route"], "test");
            r["conversation_id"].as_str().unwrap().to_string()
        })
        .collect();
    gone.sort();
    assert_eq!(gone, ["a", "b", "c"]);
    let done: Vec<_> = records.iter().filter(|r| r["status"] == 200).collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["conversation_id"], "b");
    assert_eq!(done[0]["error_kind"], serde_json::Value::Null);
    // The queued call never reached the upstream; the other three did.
    assert_eq!(up.requests().len(), 3);
}
