//! The transparent proxy end to end: ctxgate in-process in front of a recording mock upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Version;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

#[tokio::test]
async fn forwards_bytes_and_headers_exactly() {
    let up = mock(|_| Reply::Full {
        status: 201,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-upstream".into(), "yes".into()),
            ("connection".into(), "x-resp-hop".into()),
            ("x-resp-hop".into(), "secret".into()),
            ("keep-alive".into(), "timeout=5".into()),
        ],
        body: Bytes::from_static(b"{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\"}"),
    })
    .await;
    let gate = TestConfig::openai(&up).start().await;
    // Odd spacing and key order must survive byte for byte.
    let body = "{\"model\": \"gpt-4o\",\n \"messages\":[{\"role\":\"user\",\"content\":\"hi \\u00e9\"}], \"zzz\": 1.50}";
    let (status, headers, resp) = send(
        "POST",
        &gate.url("/v1/chat/completions?x=1&y=%20"),
        &[
            ("authorization", "Bearer sk-test-abc"),
            ("x-api-key", "key-123"),
            ("x-custom", "a, b"),
            ("content-type", "application/json"),
            ("connection", "x-hop"),
            ("x-hop", "must-go"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic Zm9v"),
            ("keep-alive", "timeout=5"),
        ],
        body,
    )
    .await;
    assert_eq!(status.as_u16(), 201);
    assert_eq!(
        resp,
        Bytes::from_static(b"{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\"}")
    );
    assert_eq!(headers["x-upstream"], "yes");
    assert!(headers.get("x-resp-hop").is_none());
    assert!(headers.get("keep-alive").is_none());

    let got = up.requests();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.uri, "/v1/chat/completions?x=1&y=%20");
    assert_eq!(r.body, Bytes::from(body));
    assert_eq!(r.headers["authorization"], "Bearer sk-test-abc");
    assert_eq!(r.headers["x-api-key"], "key-123");
    assert_eq!(r.headers["x-custom"], "a, b");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["host"], up.addr.to_string());
    for h in [
        "x-hop",
        "te",
        "proxy-authorization",
        "keep-alive",
        "connection",
    ] {
        assert!(r.headers.get(h).is_none(), "{h} was forwarded");
    }
}

#[tokio::test]
async fn non_chat_paths_stream_through() {
    let up = mock(|r| Reply::json(&format!("{{\"len\":{}}}", r.body.len()))).await;
    let gate = TestConfig::one("/openai/", &up.url(), "openai")
        .start()
        .await;
    let (s, _, b) = send("GET", &gate.url("/openai/v1/models"), &[], "").await;
    assert_eq!(s, 200);
    assert_eq!(b, Bytes::from_static(b"{\"len\":0}"));
    let big = "x".repeat(300_000);
    let (s, _, b) = send("POST", &gate.url("/openai/v1/embeddings"), &[], &big).await;
    assert_eq!(s, 200);
    assert_eq!(b, Bytes::from_static(b"{\"len\":300000}"));
    let (s, _, _) = send("DELETE", &gate.url("/openai/v1/files/f-1"), &[], "").await;
    assert_eq!(s, 200);
    let got = up.requests();
    assert_eq!(
        got.iter()
            .map(|r| (r.method.as_str(), r.uri.as_str()))
            .collect::<Vec<_>>(),
        [
            ("GET", "/v1/models"),
            ("POST", "/v1/embeddings"),
            ("DELETE", "/v1/files/f-1")
        ]
    );
    assert_eq!(got[1].body.len(), 300_000);
}

#[tokio::test]
async fn sse_chunks_reach_client_before_upstream_sends_the_next() {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let rx = std::sync::Mutex::new(Some(rx));
    let up = mock(move |_| Reply::Stream {
        content_type: "text/event-stream".into(),
        chunks: rx.lock().unwrap().take().unwrap(),
    })
    .await;
    let gate = TestConfig::openai(&up).start().await;
    let req = http::Request::post(gate.url("/v1/chat/completions"))
        .body(http_body_util::Full::new(Bytes::from_static(
            b"{\"model\":\"m\",\"stream\":true,\"messages\":[]}",
        )))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    tx.send(Bytes::from_static(first)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The second chunk has not been sent yet: the first arrived on its own.
    assert_eq!(got.into_data().unwrap(), Bytes::from_static(first));
    tx.send(Bytes::from_static(b"data: [DONE]\n\n"))
        .await
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn error_bodies_404_413_502() {
    let up = mock(|r| {
        if r.uri.contains("reset") {
            Reply::Reset
        } else {
            Reply::json("{}")
        }
    })
    .await;
    let gate = TestConfig::one("/anthropic/", &up.url(), "anthropic")
        .set("", "max_body_bytes", 1000)
        .start()
        .await;

    let (s, h, b) = send("GET", &gate.url("/nowhere"), &[], "").await;
    assert_eq!(s, 404);
    assert_eq!(h["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "route_not_found");
    assert_eq!(
        v["error"]["message"],
        "no route serves GET /nowhere; configured prefixes: /anthropic/"
    );

    // Anthropic route: Anthropic's error shape.
    let (s, _, b) = send(
        "POST",
        &gate.url("/anthropic/v1/messages"),
        &[],
        &"x".repeat(1001),
    )
    .await;
    assert_eq!(s, 413);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "request_too_large");
    assert_eq!(
        v["error"]["message"],
        "request body is larger than 1000 bytes (max_body_bytes)"
    );
    // Streamed (non-chat) body without a length, over the limit: 413 too.
    let (s, _, _) = send_chunked(&gate, "/anthropic/v1/files", 5000).await;
    assert_eq!(s, 413);

    let (s, _, b) = send("POST", &gate.url("/anthropic/v1/reset"), &[], "{}").await;
    assert_eq!(s, 502);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("upstream {} closed the connection", up.addr)));

    // Nothing listens on the upstream port: refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let gate2 = TestConfig::one("/v1/", &format!("http://127.0.0.1:{port}/v1/"), "openai")
        .start()
        .await;
    let (s, _, b) = send("POST", &gate2.url("/v1/chat/completions"), &[], "{}").await;
    assert_eq!(s, 502);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "upstream_unreachable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be reached"),
        "{v}"
    );
}

async fn send_chunked(
    gate: &Gate,
    path: &str,
    n: usize,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    send_frames(
        gate,
        path,
        vec![Bytes::from(vec![b'a'; 100]); n / 100],
        None,
    )
    .await
}

/// POSTs `frames` as separate body frames: chunked, or with `Content-Length` when given.
async fn send_frames(
    gate: &Gate,
    path: &str,
    frames: Vec<Bytes>,
    content_length: Option<usize>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let body = http_body_util::StreamBody::new(futures_stream(rx));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let mut req = http::Request::post(gate.url(path));
    if let Some(n) = content_length {
        req = req.header("content-length", n);
    }
    let req = req.body(body).unwrap();
    tokio::spawn(async move {
        for f in frames {
            if tx.send(f).await.is_err() {
                break;
            }
            // Let each frame go out on its own.
            tokio::task::yield_now().await;
        }
    });
    let resp = client.request(req).await.unwrap();
    let (p, b) = resp.into_parts();
    (p.status, p.headers, b.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn chat_body_in_many_frames_is_read_whole_and_limited() {
    let up = mock(|_| Reply::json("{}")).await;
    let gate = TestConfig::openai(&up)
        .set("", "max_body_bytes", 6000)
        .start()
        .await;
    let body = serde_json::json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "ab ".repeat(1500)}],
    })
    .to_string();
    assert!(body.len() > 4500 && body.len() < 6000);
    let frames: Vec<Bytes> = body
        .as_bytes()
        .chunks(97)
        .map(Bytes::copy_from_slice)
        .collect();
    // Chunked, then with a length: the upstream gets the exact bytes both times.
    for length in [None, Some(body.len())] {
        let (s, _, _) = send_frames(&gate, "/v1/chat/completions", frames.clone(), length).await;
        assert_eq!(s, 200, "length {length:?}");
    }
    let got = up.requests();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.body, body.as_bytes());
    }
    // Over the limit without a length: 413, and nothing reaches the upstream.
    let mut big = frames.clone();
    big.extend(frames);
    let (s, _, b) = send_frames(&gate, "/v1/chat/completions", big, None).await;
    assert_eq!(s, 413);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        v["error"]["message"],
        "request body is larger than 6000 bytes (max_body_bytes)"
    );
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn host_steering_is_refused_or_goes_to_the_upstream() {
    let up = mock(|_| Reply::json("{}")).await;
    let gate = TestConfig::openai(&up).start().await;
    // Absolute-form target naming another host, and a Host header naming another host.
    let r = raw(gate.addr, b"GET http://169.254.169.254/v1/models HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = raw(
        gate.addr,
        b"GET /v1/models HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // A path that looks like a host after the prefix stays a path on the upstream.
    let r = raw(
        gate.addr,
        b"GET /v1//evil.example/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Dot segments, encoded or not, are refused before anything is sent.
    for target in ["/v1/../admin", "/v1/%2e%2e/%2e%2e/etc", "/v1/a/./b"] {
        let r = raw(
            gate.addr,
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400"), "{target}: {r}");
    }
    // A path outside every prefix is a 404, whatever host it names.
    let r = raw(
        gate.addr,
        b"GET //evil.example/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = raw(
        gate.addr,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");

    let got = up.requests();
    let seen: Vec<(&str, &str)> = got
        .iter()
        .map(|r| (r.uri.as_str(), r.headers["host"].to_str().unwrap()))
        .collect();
    let host = up.addr.to_string();
    assert_eq!(
        seen,
        [
            ("/v1/models", host.as_str()),
            ("/v1/models", host.as_str()),
            ("/v1//evil.example/x", host.as_str())
        ]
    );
}

#[tokio::test]
async fn h2c_inbound() {
    let up = mock(|_| Reply::json("{\"ok\":true}")).await;
    let gate = TestConfig::openai(&up).start().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let req = http::Request::get(gate.url("/v1/models"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(b"{\"ok\":true}")
    );
}

#[tokio::test]
async fn readyz_turns_200_after_warm_up() {
    let up = mock(|r| {
        if r.method == http::Method::HEAD {
            Reply::Delayed(Duration::from_millis(1500), Box::new(Reply::json("")))
        } else {
            Reply::json("{}")
        }
    })
    .await;
    let gate = TestConfig::openai(&up)
        .set_route("", "prewarm_connections", 3)
        .start()
        .await;
    let (s, _, b) = send("GET", &format!("http://{}/readyz", gate.admin), &[], "").await;
    assert_eq!(s, 503);
    assert_eq!(b, Bytes::from_static(b"test: warming up\n"));
    let (s, _, _) = send("GET", &format!("http://{}/healthz", gate.admin), &[], "").await;
    assert_eq!(s, 200);
    let mut ready = None;
    for _ in 0..100 {
        let (s, _, b) = send("GET", &format!("http://{}/readyz", gate.admin), &[], "").await;
        if s == 200 {
            ready = Some(String::from_utf8(b.to_vec()).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = ready.expect("readyz never turned 200");
    assert!(ready.starts_with("test: ok (3 connections in "), "{ready}");
    let heads = up
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == http::Method::HEAD)
        .count();
    assert_eq!(heads, 3);
    // The warmed connections are reused: a request opens no new connection.
    let page = metrics(&gate).await;
    assert_eq!(
        sample(&page, "ctxgate_upstream_ready{upstream=\"test\"}"),
        1.0
    );
}

#[tokio::test]
async fn readyz_reports_a_failed_warm_up() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let gate = TestConfig::one("/v1/", &format!("http://127.0.0.1:{port}/v1/"), "openai")
        .set_route("", "prewarm_connections", 1)
        .start()
        .await;
    let mut body = String::new();
    for _ in 0..100 {
        let (s, _, b) = send("GET", &format!("http://{}/readyz", gate.admin), &[], "").await;
        body = String::from_utf8(b.to_vec()).unwrap();
        if s == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(body.starts_with("test: warm-up failed: "), "{body}");
    assert_eq!(
        sample(
            &metrics(&gate).await,
            "ctxgate_upstream_ready{upstream=\"test\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn shutdown_lets_a_slow_request_finish() {
    let up = mock(|_| {
        Reply::Delayed(
            Duration::from_millis(700),
            Box::new(Reply::json("{\"slow\":true}")),
        )
    })
    .await;
    let mut gate = TestConfig::openai(&up)
        .set("", "shutdown_grace", "10s")
        .start()
        .await;
    let url = gate.url("/v1/chat/completions");
    let inflight = tokio::spawn(async move { send("POST", &url, &[], "{}").await });
    // Wait until the upstream has the request, then signal shutdown.
    up.until_request("").await;
    assert_eq!(up.requests().len(), 1);
    gate.shutdown();
    let (s, _, b) = inflight.await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(b, Bytes::from_static(b"{\"slow\":true}"));
    tokio::time::timeout(Duration::from_secs(5), &mut gate.task)
        .await
        .unwrap()
        .unwrap();
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(gate.addr).await.is_err());
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let up = mock(|r| {
        if r.uri.ends_with("/missing") {
            Reply::Full {
                status: 404,
                headers: vec![],
                body: Bytes::new(),
            }
        } else {
            Reply::json("{}")
        }
    })
    .await;
    let gate = TestConfig::openai(&up).start().await;
    for _ in 0..3 {
        send("GET", &gate.url("/v1/models"), &[], "").await;
    }
    send("GET", &gate.url("/v1/missing"), &[], "").await;
    send("GET", &gate.url("/elsewhere"), &[], "").await;
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_http_requests_total{route=\"test\",status=\"200\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_http_requests_total{route=\"test\",status=\"404\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_http_requests_total{route=\"none\",status=\"404\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_http_time_to_first_byte_seconds_count{route=\"test\"}"
        ),
        4.0
    );
}
