//! Gates and timeouts through the proxy, against a mock upstream that answers after a delay,
//! streams and stalls, or trickles chunks forever.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

// Long enough that a loaded CI machine still sends the queued requests while the first is in
// flight.
const D: Duration = Duration::from_millis(800);

/// When each request reached the mock, in arrival order, with the tag of its prompt.
type Arrivals = Arc<Mutex<Vec<(Instant, String)>>>;

/// A mock that answers every request `D` after it arrives, recording arrivals. Overlap is read
/// from the arrival times: the answer to a request cannot exist before `arrival + D`, so a
/// request that arrives less than `D` after another ran beside it upstream, and one that
/// arrives `D` or more after the previous one could have waited for its answer.
async fn slow_mock() -> (Mock, Arrivals) {
    let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
    let a = arrivals.clone();
    let up = mock(move |r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        let tag = v["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        a.lock().unwrap().push((Instant::now(), tag));
        Reply::Delayed(D, Box::new(Reply::json("{}")))
    })
    .await;
    (up, arrivals)
}

fn chat(conv: &str, tag: &str) -> (Vec<(String, String)>, String) {
    (
        vec![("x-conversation-id".into(), conv.into())],
        format!(
            "{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"{tag}\"}}]}}"
        ),
    )
}

async fn post(gate: &Gate, conv: &str, tag: &str) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let (h, b) = chat(conv, tag);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    send("POST", &gate.url("/v1/chat/completions"), &h, &b).await
}

/// After a test: every gate gauge back to 0 (the permit is released as the body is dropped,
/// which can trail the client's last read by a moment, so this polls, bounded).
async fn assert_gates_idle(gate: &Gate) {
    until_sample(gate, "ctxgate_gate_active", 0.0).await;
    until_sample(gate, "ctxgate_gate_waiters", 0.0).await;
}

#[tokio::test]
async fn different_conversations_run_in_parallel_one_conversation_in_order() {
    let (up, arrivals) = slow_mock().await;
    let gate = Arc::new(TestConfig::openai(&up).start().await);
    let (g1, g2) = (gate.clone(), gate.clone());
    let a = tokio::spawn(async move { post(&g1, "conv-a", "a1").await });
    let b = tokio::spawn(async move { post(&g2, "conv-b", "b1").await });
    assert_eq!(a.await.unwrap().0, 200);
    assert_eq!(b.await.unwrap().0, 200);
    {
        let seen = arrivals.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(
            seen[1].0 - seen[0].0 < D,
            "different conversations overlap upstream: {:?} apart",
            seen[1].0 - seen[0].0
        );
    }

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, tag) in ["c1", "c2", "c3"].into_iter().enumerate() {
        let g = gate.clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let r = post(&g, "conv-c", tag).await;
            order.lock().unwrap().push(tag);
            r
        }));
        // The next one is sent once this one is in flight or queued, so arrival order is known.
        if i == 0 {
            up.until_request("c1").await;
        } else {
            until_sample(&gate, "ctxgate_gate_waiters", i as f64).await;
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().0, 200);
    }
    // Each request of conv-c reached the upstream only after the previous one was answered,
    // and in the order they arrived at ctxgate.
    let seen: Vec<(Instant, String)> = arrivals.lock().unwrap()[2..].to_vec();
    let tags: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(tags, ["c1", "c2", "c3"]);
    for w in seen.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= D,
            "one conversation never races itself: {} arrived {:?} after {}",
            w[1].1,
            w[1].0 - w[0].0,
            w[0].1
        );
    }
    assert_eq!(*order.lock().unwrap(), ["c1", "c2", "c3"]);
    let page = metrics(&gate).await;
    assert_eq!(
        sample(&page, "ctxgate_gate_wait_seconds_count{route=\"test\"}"),
        5.0
    );
    assert_gates_idle(&gate).await;
}

/// Sends `n` copies of one chat body at once, each with `headers`, and waits for all.
async fn burst(gate: &Arc<Gate>, n: usize, headers: Vec<(&'static str, String)>) -> Vec<u16> {
    let (_, body) = chat("unused", "same task");
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (g, body, headers) = (gate.clone(), body.clone(), headers.clone());
            tokio::spawn(async move {
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                send("POST", &g.url("/v1/chat/completions"), &h, &body)
                    .await
                    .0
                    .as_u16()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn identical_requests_without_an_id_are_not_serialised() {
    // An eval harness running one task 32 times in parallel: no id, the same prompt. The
    // fingerprint is a guess, so it keys the view but not a gate: all 32 run at once.
    let (up, arrivals) = slow_mock().await;
    let gate = Arc::new(TestConfig::openai(&up).start().await);
    let statuses = burst(&gate, 32, Vec::new()).await;
    assert_eq!(statuses, vec![200; 32]);
    let seen = arrivals.lock().unwrap().clone();
    assert_eq!(seen.len(), 32);
    let spread = seen.last().unwrap().0 - seen[0].0;
    assert!(
        spread < D,
        "all 32 reached the upstream before the first was answered; spread {spread:?}"
    );
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_gate_rejections_total{reason=\"queue_full\",route=\"test\"}"
        ),
        0.0
    );
    assert_gates_idle(&gate).await;
}

#[tokio::test]
async fn agent_session_headers_are_conversations_by_default() {
    // Two Claude Code sessions started with the same prompt are two conversations (they run
    // side by side); one session's calls run one at a time.
    let (up, arrivals) = slow_mock().await;
    let gate = Arc::new(TestConfig::openai(&up).start().await);
    let g = gate.clone();
    let a = tokio::spawn(async move {
        burst(
            &g,
            2,
            vec![("x-claude-code-session-id", "session-a".to_string())],
        )
        .await
    });
    let g = gate.clone();
    let b = tokio::spawn(async move {
        burst(
            &g,
            1,
            vec![("x-claude-code-session-id", "session-b".to_string())],
        )
        .await
    });
    assert_eq!(a.await.unwrap(), [200, 200]);
    assert_eq!(b.await.unwrap(), [200]);
    let seen = arrivals.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    // The first two arrivals overlap (one of each session); the third (session a's second)
    // waited for session a's first answer.
    assert!(seen[1].0 - seen[0].0 < D, "{:?}", seen[1].0 - seen[0].0);
    assert!(seen[2].0 - seen[0].0 >= D, "{:?}", seen[2].0 - seen[0].0);
    assert_gates_idle(&gate).await;
}

#[tokio::test]
async fn beyond_the_queue_bound_gets_429_at_once() {
    let (up, _) = slow_mock().await;
    let gate = Arc::new(
        TestConfig::openai(&up)
            .set("gates", "max_queue_per_conversation", 1)
            .start()
            .await,
    );
    let g1 = gate.clone();
    let first = tokio::spawn(async move { post(&g1, "c", "1").await });
    up.until_request("").await;
    let g2 = gate.clone();
    let second = tokio::spawn(async move { post(&g2, "c", "2").await });
    until_sample(&gate, "ctxgate_gate_waiters", 1.0).await;
    let (s, h, b) = post(&gate, "c", "3").await;
    assert_eq!(s, 429);
    assert_eq!(h["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["code"], "queue_full");
    assert_eq!(
        v["error"]["message"],
        "conversation already has 1 requests waiting (gates.max_queue_per_conversation)"
    );
    // The first and second still complete; the third never reached the upstream.
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(second.await.unwrap().0, 200);
    assert_eq!(up.requests().len(), 2);
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_gate_rejections_total{reason=\"queue_full\",route=\"test\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_http_requests_total{route=\"test\",status=\"429\"}"
        ),
        1.0
    );
    assert_gates_idle(&gate).await;
}

#[tokio::test]
async fn queue_timeout_gets_429_in_anthropic_shape() {
    let up = mock(|_| {
        Reply::Delayed(
            Duration::from_secs(2),
            Box::new(Reply::json(ANTHROPIC_JSON)),
        )
    })
    .await;
    let gate = Arc::new(
        TestConfig::one("/anthropic/", &up.url(), "anthropic")
            .set("gates", "queue_timeout", "200ms")
            .start()
            .await,
    );
    let body = "{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":10,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    let g = gate.clone();
    let first = tokio::spawn(async move {
        send(
            "POST",
            &g.url("/anthropic/v1/messages"),
            &[("x-conversation-id", "k")],
            body,
        )
        .await
    });
    up.until_request("").await;
    let (s, h, b) = send(
        "POST",
        &gate.url("/anthropic/v1/messages"),
        &[("x-conversation-id", "k")],
        body,
    )
    .await;
    assert_eq!(s, 429);
    assert_eq!(h["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(gates.queue_timeout)"),
        "{v}"
    );
    assert_eq!(first.await.unwrap().0, 200);
    assert_gates_idle(&gate).await;
}

#[tokio::test]
async fn stalled_stream_gets_the_error_event_after_stream_idle() {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let rx = Mutex::new(Some(rx));
    let up = mock(move |_| Reply::Stream {
        content_type: "text/event-stream".into(),
        chunks: rx.lock().unwrap().take().unwrap(),
    })
    .await;
    let gate = TestConfig::openai(&up)
        .set("timeouts", "stream_idle", "300ms")
        .set("timeouts", "total", "30s")
        .start()
        .await;
    let first = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
    tx.send(Bytes::from_static(first.as_bytes())).await.unwrap();
    let (s, _, b) = post(&gate, "s", "x").await;
    assert_eq!(s, 200);
    assert_eq!(
        String::from_utf8(b.to_vec()).unwrap(),
        format!("{first}data: {{\"error\":{{\"message\":\"upstream sent nothing within 300ms (timeouts.stream_idle)\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_timeout\"}}}}\n\n")
    );
    // ctxgate dropped the upstream response: the mock's stream is gone.
    until("the upstream stream to close", || async { tx.is_closed() }).await;
    assert!(tx.is_closed());
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_timeouts_total{phase=\"stream_idle\",route=\"test\"}"
        ),
        1.0
    );
    assert_gates_idle(&gate).await;
}

#[tokio::test]
async fn trickling_stream_is_cut_at_total() {
    let chunks: Vec<Bytes> = (0..1000)
        .map(|i| Bytes::from(format!("data: {{\"n\":{i}}}\n\n")))
        .collect();
    let up = mock(move |_| Reply::Sse {
        chunks: chunks.clone(),
        gap: Duration::from_millis(50),
    })
    .await;
    let gate = TestConfig::openai(&up)
        .set("timeouts", "stream_idle", "500ms")
        .set("timeouts", "response_headers", "500ms")
        .set("timeouts", "total", "800ms")
        .start()
        .await;
    let (s, _, b) = post(&gate, "t", "x").await;
    assert_eq!(s, 200);
    let text = String::from_utf8(b.to_vec()).unwrap();
    assert!(text.starts_with("data: {\"n\":0}\n\n"), "{text}");
    assert!(text.ends_with("data: {\"error\":{\"message\":\"upstream call did not finish within 800ms (timeouts.total)\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_timeout\"}}\n\n"), "{text}");
    let n = text.matches("\"n\":").count();
    assert!(n > 1 && n < 1000, "cut mid-stream after {n} chunks");
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_timeouts_total{phase=\"total\",route=\"test\"}"
        ),
        1.0
    );
    assert_gates_idle(&gate).await;
}

#[tokio::test]
async fn response_headers_timeout_is_504_naming_the_key() {
    let up = mock(|_| Reply::Delayed(Duration::from_secs(5), Box::new(Reply::json("{}")))).await;
    let gate = TestConfig::openai(&up)
        .set("timeouts", "response_headers", "200ms")
        .start()
        .await;
    let (s, h, b) = post(&gate, "h", "x").await;
    assert_eq!(s, 504);
    assert_eq!(h["x-ctxgate-error"], "timeout_response_headers");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        v["error"]["message"],
        "upstream sent no response headers within 200ms (timeouts.response_headers)"
    );
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_timeouts_total{phase=\"response_headers\",route=\"test\"}"
        ),
        1.0
    );
    assert_gates_idle(&gate).await;
}

#[tokio::test]
async fn client_disconnect_cancels_upstream_and_frees_the_gate() {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let rx = Mutex::new(Some(rx));
    let up = mock(move |_| match rx.lock().unwrap().take() {
        Some(rx) => Reply::Stream {
            content_type: "text/event-stream".into(),
            chunks: rx,
        },
        None => Reply::json(OPENAI_JSON),
    })
    .await;
    let gate = TestConfig::openai(&up).start().await;
    tx.send(Bytes::from_static(b"data: {\"first\":true}\n\n"))
        .await
        .unwrap();
    let (h, b) = chat("d", "x");
    let req = http::Request::post(gate.url("/v1/chat/completions"))
        .header(&h[0].0, &h[0].1)
        .body(http_body_util::Full::new(Bytes::from(b)))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    let f = body.frame().await.unwrap().unwrap();
    assert_eq!(
        f.into_data().unwrap(),
        Bytes::from_static(b"data: {\"first\":true}\n\n")
    );
    drop(body); // the client goes away mid-stream

    // The upstream request is cancelled: its connection is closed, its stream dropped.
    until("the upstream stream to close", || async { tx.is_closed() }).await;
    assert!(tx.is_closed(), "upstream stream still open");
    // The next request of that conversation is admitted at once.
    assert_gates_idle(&gate).await;
    let (s, _, b) = post(&gate, "d", "y").await;
    assert_eq!(s, 200);
    assert_eq!(b, Bytes::from_static(OPENAI_JSON.as_bytes()));
    let page = metrics(&gate).await;
    assert_eq!(
        sample(&page, "ctxgate_client_disconnects_total{route=\"test\"}"),
        1.0
    );
}

#[tokio::test]
async fn an_agents_token_counts_do_not_wait_behind_its_stream() {
    // Claude Code calls count_tokens with its session header while its own message stream
    // is in flight: the count must not queue behind the stream.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let rx = Mutex::new(Some(rx));
    let up = mock(move |r| {
        if r.uri.ends_with("/count_tokens") {
            return Reply::json("{\"input_tokens\":42}");
        }
        match rx.lock().unwrap().take() {
            Some(rx) => Reply::Stream {
                content_type: "text/event-stream".into(),
                chunks: rx,
            },
            None => Reply::json(ANTHROPIC_JSON),
        }
    })
    .await;
    let gate = TestConfig::one("/anthropic/", &up.url(), "anthropic")
        .set("gates", "max_queue_per_conversation", 0)
        .start()
        .await;
    let session = [("x-claude-code-session-id", "cc-1")];
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let req = session
        .iter()
        .fold(
            http::Request::post(gate.url("/anthropic/v1/messages")),
            |b, (k, v)| b.header(*k, *v),
        )
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The stream holds its conversation's only slot, and no one may queue: a second chat
    // call of the session is refused at once, a token count is answered.
    let (s, _, _) = send("POST", &gate.url("/anthropic/v1/messages"), &session, body).await;
    assert_eq!(s, 429);
    let (s, _, b) = send(
        "POST",
        &gate.url("/anthropic/v1/messages/count_tokens"),
        &session,
        r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b, Bytes::from_static(b"{\"input_tokens\":42}"));
    drop(tx);
    let rest = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(rest.is_empty());
    assert_gates_idle(&gate).await;
}
