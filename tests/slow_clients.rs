//! A client that stops reading cannot hold its conversation's permit or its upstream call:
//! `timeouts.total` and `timeouts.client_write` fire without the client's help (hyper stops
//! polling a body whose client's window is full), release the permit, drop the upstream
//! call, and record the call with its error kind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn chat(tag: &str) -> String {
    format!("{{\"model\":\"gpt-4o\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"{tag}\"}}]}}")
}

/// "flood" requests get an endless SSE stream of 64 KiB events (at most 4,000, until the
/// receiver goes); others get a short answer.
fn flooding(r: &Recorded) -> Reply {
    if !String::from_utf8_lossy(&r.body).contains("flood") {
        return llm_reply(r);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let event = Bytes::from(format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(64 * 1024)
        ));
        for _ in 0..4000 {
            if tx.send(event.clone()).await.is_err() {
                return;
            }
        }
    });
    Reply::Stream {
        content_type: "text/event-stream".into(),
        chunks: rx,
    }
}

/// Sends a flood request of conversation `conv` on a raw connection, reads the response's
/// first bytes, and then reads nothing more (the connection stays open).
async fn stuck_client(gate: &Gate, conv: &str) -> tokio::net::TcpStream {
    let body = chat("flood");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-conversation-id: {conv}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    s
}

/// The conversation's next call, sent while the stuck one may still hold the permit: its
/// status (429 while the permit is held: no queue).
async fn next_call(gate: &Gate, conv: &str) -> u16 {
    let (s, _, _) = send(
        "POST",
        &gate.url("/v1/chat/completions"),
        &[("x-conversation-id", conv)],
        &chat("next").replace("\"stream\":true", "\"stream\":false"),
    )
    .await;
    s.as_u16()
}

/// Reads `s` to its end; the connection must end within 10 s.
async fn drained(mut s: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 1 << 20];
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stuck connection was not closed");
}

fn cfg(up: &Mock, dir: &TempDir) -> TestConfig {
    TestConfig::openai(up)
        .set("gates", "max_queue_per_conversation", 0)
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
}

#[tokio::test]
async fn total_fires_while_the_client_reads_nothing() {
    let up = mock(flooding).await;
    let dir = TempDir::new("slow-total");
    let gate = cfg(&up, &dir)
        .set("timeouts", "total", "2s")
        .set("timeouts", "client_write", "60s")
        .start()
        .await;
    // The first call pays for loading the tokenizer; the timers are measured after it.
    assert_eq!(next_call(&gate, "warm").await, 200);
    let t0 = Instant::now();
    let _stuck = stuck_client(&gate, "s").await;
    assert_eq!(next_call(&gate, "s").await, 429, "the permit is held");
    until_sample(
        &gate,
        "ctxgate_timeouts_total{phase=\"total\",route=\"test\"}",
        1.0,
    )
    .await;
    let fired = t0.elapsed();
    assert!(
        fired >= Duration::from_secs(2) && fired < Duration::from_secs(3),
        "{fired:?}"
    );
    assert_eq!(next_call(&gate, "s").await, 200, "the permit was released");
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    let kinds: Vec<_> = records.iter().map(|r| r["error_kind"].clone()).collect();
    assert_eq!(
        kinds,
        [
            serde_json::Value::Null,
            serde_json::json!("gate_queue_full"),
            serde_json::json!("timeout_total"),
            serde_json::Value::Null
        ]
    );
}

#[tokio::test]
async fn client_write_fires_for_a_client_that_stops_reading() {
    let up = mock(flooding).await;
    let dir = TempDir::new("slow-write");
    let gate = cfg(&up, &dir)
        .set("timeouts", "client_write", "1s")
        .start()
        .await;
    // The first call pays for loading the tokenizer; the timers are measured after it.
    assert_eq!(next_call(&gate, "warm").await, 200);
    let t0 = Instant::now();
    let stuck = stuck_client(&gate, "w").await;
    until_sample(
        &gate,
        "ctxgate_timeouts_total{phase=\"client_write\",route=\"test\"}",
        1.0,
    )
    .await;
    let fired = t0.elapsed();
    // Fires once the client has left a chunk untaken for 1 s (checked every 0.5 s).
    assert!(
        fired >= Duration::from_secs(1) && fired < Duration::from_millis(2500),
        "{fired:?}"
    );
    assert_eq!(next_call(&gate, "w").await, 200);
    // The connection was closed under the client: what was in flight drains, then it ends.
    drained(stuck).await;
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    assert_eq!(records[1]["error_kind"], "timeout_client_write");
    assert_eq!(records[1]["status"], 200);
    assert_eq!(records.len(), 3);
}

/// Streams still running when `shutdown_grace` ends get the dialect's error event and are
/// recorded before ctxgate exits.
#[tokio::test]
async fn streams_cut_at_the_end_of_the_grace_period_get_an_error_event_and_a_record() {
    let up = mock(|r| {
        let body = String::from_utf8_lossy(&r.body);
        if body.contains("hold") {
            return Reply::Delayed(Duration::from_secs(60), Box::new(Reply::json(OPENAI_JSON)));
        }
        if !body.contains("slow") {
            return llm_reply(r);
        }
        Reply::Sse {
            chunks: (0..600)
                .map(|_| {
                    Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n")
                })
                .collect(),
            gap: Duration::from_millis(100),
        }
    })
    .await;
    let dir = TempDir::new("slow-shutdown");
    let gate = cfg(&up, &dir)
        .set("", "shutdown_grace", "1s")
        .set("gates", "max_queue_per_conversation", 4)
        .start()
        .await;
    let mut bodies = Vec::new();
    for i in 0..3 {
        let req = http::Request::post(gate.url("/v1/chat/completions"))
            .header("x-conversation-id", format!("cut-{i}"))
            .body(http_body_util::Full::new(Bytes::from(chat("slow"))))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push(tokio::spawn(async move {
            use http_body_util::BodyExt;
            let mut body = resp.into_body();
            let mut text = String::new();
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    text.push_str(&String::from_utf8_lossy(d));
                }
            }
            text
        }));
    }
    // One call waiting for its upstream's headers, one queued behind a stream of its own
    // conversation: both are answered 503 when the grace ends.
    let waiting = ["hold", "queued"].map(|kind| {
        let conv = if kind == "hold" { "hold" } else { "cut-0" };
        let url = gate.url("/v1/chat/completions");
        tokio::spawn(async move {
            let (s, _, b) = send("POST", &url, &[("x-conversation-id", conv)], &chat(kind)).await;
            (s.as_u16(), String::from_utf8_lossy(&b).into_owned())
        })
    });
    up.until_request("hold").await;
    until_sample(&gate, "ctxgate_gate_waiters", 1.0).await;
    let t0 = Instant::now();
    stop(gate).await;
    let took = t0.elapsed();
    for w in waiting {
        let (status, body) = w.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("shutting_down"), "{body}");
    }
    assert!(took < Duration::from_secs(4), "{took:?}");
    for b in bodies {
        let text = b.await.unwrap();
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        assert!(
            last.starts_with("data: {\"error\"") && last.contains("shutting_down"),
            "{last}"
        );
    }
    let records = jsonl_records(&dir.0);
    assert_eq!(records.len(), 5);
    let mut statuses: Vec<u64> = records
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 503, 503]);
    for r in &records {
        assert_eq!(r["error_kind"], "shutdown");
    }
}

/// Over HTTP/2 a stream that stops reading is ended at `client_write` (permit released,
/// recorded) while its connection stays up for the client's other streams.
#[tokio::test]
async fn an_http2_stream_that_stops_reading_is_ended_but_its_connection_stays() {
    use http_body_util::{BodyExt, Full};
    let up = mock(flooding).await;
    let dir = TempDir::new("slow-h2");
    let gate = cfg(&up, &dir)
        .set("timeouts", "client_write", "1s")
        .start()
        .await;
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let post = |conv: &str, body: String| {
        http::Request::post(gate.url("/v1/chat/completions"))
            .header("x-conversation-id", conv)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    // Warm (the first call loads the tokenizer), on the same connection.
    let r = h2.request(post("warm", chat("warm"))).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
    let stuck = h2.request(post("h2", chat("flood"))).await.unwrap();
    assert_eq!(stuck.status(), 200);
    assert_eq!(stuck.version(), http::Version::HTTP_2);
    // Its body is never read.
    until_sample(
        &gate,
        "ctxgate_timeouts_total{phase=\"client_write\",route=\"test\"}",
        1.0,
    )
    .await;
    let next = h2
        .request(post(
            "h2",
            chat("next").replace("\"stream\":true", "\"stream\":false"),
        ))
        .await
        .unwrap();
    assert_eq!(next.status(), 200, "the permit was released");
    next.into_body().collect().await.unwrap();
    assert_eq!(
        sample(
            &metrics(&gate).await,
            "ctxgate_client_connections_closed_total{reason=\"client_write\"}"
        ),
        0.0,
        "the HTTP/2 connection was not closed"
    );
    drop(stuck);
    stop(gate).await;
}
