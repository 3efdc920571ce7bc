//! Shared test harness: a mock upstream LLM on 127.0.0.1:0 that records exactly what it
//! received and answers as each test tells it (JSON, SSE chunk by chunk, slowly, stalled, or by
//! resetting the connection), ctxgate in-process on 127.0.0.1:0, and a small HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod pg;
mod temp;
pub use temp::TempDir;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One request as the mock upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What the mock answers.
pub enum Reply {
    /// A complete response.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// Response headers at once, then each chunk the test sends on the channel; the body ends
    /// when the sender is dropped.
    Stream {
        content_type: String,
        chunks: mpsc::Receiver<Bytes>,
    },
    /// A scripted SSE stream: each chunk sent `gap` after the previous one.
    Sse { chunks: Vec<Bytes>, gap: Duration },
    /// Answer after a delay.
    Delayed(Duration, Box<Reply>),
    /// Close the connection without answering.
    Reset,
}

impl Reply {
    pub fn json(body: &str) -> Reply {
        Reply::Full {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
        }
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A mock upstream LLM.
pub struct Mock {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Recorded>>>,
    /// Connections the mock saw closed by the peer (ctxgate), counted when the serving task ends.
    pub closed_connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Mock {
    /// Requests received, warm-up HEADs left out.
    pub fn requests(&self) -> Vec<Recorded> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method != Method::HEAD)
            .cloned()
            .collect()
    }
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
    /// Waits (bounded, see [`until`]) until a request whose body contains `needle` has
    /// arrived; an empty needle matches any request.
    pub async fn until_request(&self, needle: &str) {
        until(&format!("the upstream to receive {needle:?}"), || async {
            self.requests()
                .iter()
                .any(|r| String::from_utf8_lossy(&r.body).contains(needle))
        })
        .await
    }
}

type MockBody = BoxBody<Bytes, Infallible>;

fn full(status: u16, headers: Vec<(String, String)>, body: Bytes) -> Response<MockBody> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(&v).unwrap(),
        );
    }
    r
}

fn answer(
    reply: Reply,
) -> Pin<Box<dyn Future<Output = Result<Response<MockBody>, std::io::Error>> + Send>> {
    Box::pin(async move {
        match reply {
            Reply::Full {
                status,
                headers,
                body,
            } => Ok(full(status, headers, body)),
            Reply::Stream {
                content_type,
                chunks,
            } => {
                let stream = futures_stream(chunks);
                let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
                r.headers_mut()
                    .insert("content-type", content_type.parse().unwrap());
                r.headers_mut()
                    .insert("cache-control", "no-cache".parse().unwrap());
                Ok(r)
            }
            Reply::Sse { chunks, gap } => {
                let (tx, rx) = mpsc::channel(chunks.len().max(1));
                tokio::spawn(async move {
                    for c in chunks {
                        if !gap.is_zero() {
                            tokio::time::sleep(gap).await;
                        }
                        if tx.send(c).await.is_err() {
                            return;
                        }
                    }
                });
                answer(Reply::Stream {
                    content_type: "text/event-stream".into(),
                    chunks: rx,
                })
                .await
            }
            Reply::Delayed(d, inner) => {
                tokio::time::sleep(d).await;
                answer(*inner).await
            }
            Reply::Reset => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "mock reset",
            )),
        }
    })
}

/// Adapts an mpsc receiver into a Stream of frames without pulling in a streams crate (a
/// mock's streamed answer, or a request body sent frame by frame).
pub fn futures_stream(rx: mpsc::Receiver<Bytes>) -> ChunkStream {
    ChunkStream { rx }
}

pub struct ChunkStream {
    rx: mpsc::Receiver<Bytes>,
}

impl futures_core::Stream for ChunkStream {
    type Item = Result<Frame<Bytes>, Infallible>;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Starts a plain-HTTP mock (HTTP/1.1 and h2c).
pub async fn mock(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Mock {
    mock_with_tls(handler, None).await
}

/// Starts a mock, over TLS when an acceptor is given.
pub async fn mock_with_tls(
    handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Mock {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler: Handler = Arc::new(handler);
    let rec = received.clone();
    let closed2 = closed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let rec = rec.clone();
            let closed = closed2.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let rec = rec.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let r = Recorded {
                            method: parts.method,
                            uri: parts.uri.to_string(),
                            version: parts.version,
                            headers: parts.headers,
                            body,
                        };
                        let reply = handler(&r);
                        rec.lock().unwrap().push(r);
                        answer(reply).await
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acc) => {
                        if let Ok(s) = acc.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    Mock {
        addr,
        received,
        closed_connections: closed,
    }
}

/// ctxgate running in-process.
pub struct Gate {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    /// Sends the shutdown signal (as SIGTERM would).
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Starts ctxgate with this TOML config on 127.0.0.1:0.
pub async fn start(config_toml: &str) -> Gate {
    // Tests that do not look at transcripts write none (instead of a transcripts/ directory
    // in the working tree).
    let env = if config_toml.contains("[transcripts]") {
        Vec::new()
    } else {
        vec![("CTXGATE_TRANSCRIPTS__SINK".to_string(), "none".to_string())]
    };
    let cfg = ctxgate::Config::from_toml(config_toml, env).expect("test config");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        ctxgate::serve(cfg, listener, admin, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Gate {
        addr,
        admin: admin_addr,
        stop: Some(tx),
        task,
    }
}

/// A test config, built key by key and rendered as the TOML a user would write, so that no
/// test writes TOML by hand. Routes get `prewarm_connections = 0` unless a test sets it.
#[derive(Clone, Default)]
pub struct TestConfig {
    top: toml::Table,
    routes: Vec<toml::Table>,
}

impl TestConfig {
    /// No routes, no keys.
    pub fn new() -> TestConfig {
        TestConfig::default()
    }

    /// One route named `test` of `dialect` at `prefix` in front of `upstream`.
    pub fn one(prefix: &str, upstream: &str, dialect: &str) -> TestConfig {
        TestConfig::new().route("test", prefix, upstream, dialect)
    }

    /// The usual: one OpenAI route named `test` at `/v1/` in front of the mock's `/v1/`.
    pub fn openai(up: &Mock) -> TestConfig {
        TestConfig::one("/v1/", &format!("{}v1/", up.url()), "openai")
    }

    /// Two routes in front of the mock: `openai` at `/v1/` and `anthropic` at `/anthropic/`.
    pub fn both(up: &Mock) -> TestConfig {
        TestConfig::new()
            .route("openai", "/v1/", &format!("{}v1/", up.url()), "openai")
            .route("anthropic", "/anthropic/", &up.url(), "anthropic")
    }

    /// Adds a route.
    pub fn route(mut self, name: &str, prefix: &str, upstream: &str, dialect: &str) -> Self {
        let mut r = toml::Table::new();
        for (k, v) in [
            ("name", name),
            ("prefix", prefix),
            ("upstream", upstream),
            ("dialect", dialect),
        ] {
            r.insert(k.into(), toml::Value::String(v.into()));
        }
        r.insert("prewarm_connections".into(), toml::Value::Integer(0));
        self.routes.push(r);
        self
    }

    /// Sets `key` at the top level (`table` empty) or in `[table]` (dotted for nested tables,
    /// e.g. `"prune"`, `"gates"`).
    pub fn set(mut self, table: &str, key: &str, value: impl serde::Serialize) -> Self {
        let v = toml::Value::try_from(value).unwrap();
        insert(&mut self.top, table, key, v);
        self
    }

    /// Sets `key` in the last route (`table` empty) or in one of its tables (`"prune"`, `"tls"`).
    pub fn set_route(mut self, table: &str, key: &str, value: impl serde::Serialize) -> Self {
        let v = toml::Value::try_from(value).unwrap();
        insert(self.routes.last_mut().expect("a route"), table, key, v);
        self
    }

    /// The config as TOML.
    pub fn toml(&self) -> String {
        let mut t = self.top.clone();
        t.insert(
            "routes".into(),
            toml::Value::Array(
                self.routes
                    .iter()
                    .cloned()
                    .map(toml::Value::Table)
                    .collect(),
            ),
        );
        toml::to_string(&t).unwrap()
    }

    /// Starts ctxgate with this config (see [`start`]).
    pub async fn start(&self) -> Gate {
        start(&self.toml()).await
    }
}

fn insert(t: &mut toml::Table, table: &str, key: &str, v: toml::Value) {
    let mut cur = t;
    for part in table.split('.').filter(|p| !p.is_empty()) {
        cur = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap();
    }
    cur.insert(key.into(), v);
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and reads the whole response.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client()
        .request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

/// Writes raw bytes on a new TCP connection and reads until the peer closes (or 5 s).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Scrapes the admin /metrics page.
pub async fn metrics(gate: &Gate) -> String {
    let (_, _, body) = send("GET", &format!("http://{}/metrics", gate.admin), &[], "").await;
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of one sample line (`name{labels} value`) in a metrics page, 0 if absent.
pub fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// Real wire formats of the two APIs, as the mock upstream sends them.

pub const OPENAI_JSON: &str = r#"{"id":"chatcmpl-mock1","object":"chat.completion","created":1764000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":5,"total_tokens":26,"prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_mock"}"#;

/// An OpenAI chat completion stream: role, two content deltas, finish, usage chunk, [DONE].
pub fn openai_sse() -> Vec<Bytes> {
    let head = r#""id":"chatcmpl-mock2","object":"chat.completion.chunk","created":1764000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_mock""#;
    vec![
        format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"),
        format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hello\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"),
        format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" stream.\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"),
        format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n"),
        format!("data: {{{head},\"choices\":[],\"usage\":{{\"prompt_tokens\":21,\"completion_tokens\":3,\"total_tokens\":24,\"prompt_tokens_details\":{{\"cached_tokens\":8}}}}}}\n\n"),
        "data: [DONE]\n\n".to_string(),
    ]
    .into_iter()
    .map(Bytes::from)
    .collect()
}

pub const ANTHROPIC_JSON: &str = r#"{"id":"msg_mock1","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hello from the mock."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":21,"cache_creation_input_tokens":5,"cache_read_input_tokens":13,"output_tokens":5}}"#;

/// An Anthropic Messages stream, event by event.
pub fn anthropic_sse() -> Vec<Bytes> {
    [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_mock2\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":21,\"cache_creation_input_tokens\":5,\"cache_read_input_tokens\":13,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" stream.\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":3}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ]
    .into_iter()
    .map(|s: &'static str| Bytes::from_static(s.as_bytes()))
    .collect()
}

/// A mock that answers both dialects as the real APIs would: JSON, or SSE when the request
/// body asks for `"stream": true`.
pub fn llm_reply(r: &Recorded) -> Reply {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let stream = v["stream"].as_bool().unwrap_or(false);
    let anthropic = r.uri.ends_with("/v1/messages");
    match (anthropic, stream) {
        (false, false) => Reply::json(OPENAI_JSON),
        (false, true) => Reply::Sse {
            chunks: openai_sse(),
            gap: Duration::ZERO,
        },
        (true, false) => Reply::json(ANTHROPIC_JSON),
        (true, true) => Reply::Sse {
            chunks: anthropic_sse(),
            gap: Duration::ZERO,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting, shutting down and reading what was recorded.

/// Polls `cond` every 5 ms until it holds, for at most 4 s; panics naming `what` otherwise.
/// Background work (a body dropped after the client's last read, a permit released) trails
/// what the client sees by a moment: tests wait for it with this, bounded, never by sleeping.
pub async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..800 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Polls the metrics page until `series` has the value `want` (bounded, see [`until`]).
pub async fn until_sample(gate: &Gate, series: &str, want: f64) {
    let mut last = 0.0;
    for _ in 0..800 {
        last = sample(&metrics(gate).await, series);
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{series} is {last}, want {want}");
}

/// Sends the shutdown signal and waits (at most 20 s) until ctxgate has stopped and flushed.
pub async fn stop(mut gate: Gate) {
    gate.shutdown();
    tokio::time::timeout(Duration::from_secs(20), &mut gate.task)
        .await
        .expect("ctxgate stops within 20 s")
        .unwrap();
}

/// Every JSONL transcript record in `dir`, file by file in name order.
pub fn jsonl_records(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The forwarded `messages` of a chat body, each as its raw bytes.
pub fn raw_messages(body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct B<'a> {
        #[serde(borrow)]
        messages: Vec<&'a serde_json::value::RawValue>,
    }
    let b: B = serde_json::from_slice(body).unwrap();
    b.messages.iter().map(|m| m.get().to_string()).collect()
}

/// Turn `i` of a 40-turn coding-agent conversation: a task, a tool call, its result (a
/// 40-line file) and the answer.
pub fn agent_turn(i: usize) -> [serde_json::Value; 4] {
    let file: String = (0..40)
        .map(|l| format!("fn handler_{i}_{l}(x: u32) -> u32 {{ x * {l} + {i} }} // line {l}\n"))
        .collect();
    [
        serde_json::json!({"role": "user", "content": format!("Step {i}: look at src/mod_{i}.rs and tell me what handler_{i}_3 returns for x = {i}. Be precise and brief.")}),
        serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{"id": format!("call_{i}"), "type": "function", "function": {"name": "read_file", "arguments": format!("{{\"path\":\"src/mod_{i}.rs\"}}")}}]}),
        serde_json::json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": format!("```rust\n{file}```")}),
        serde_json::json!({"role": "assistant", "content": format!("handler_{i}_3({i}) returns {} because it computes x * 3 + {i}.", i * 3 + i)}),
    ]
}

/// Sends the 40-turn agent conversation to `url` as conversation `conv`: each turn the task,
/// then the tool result (80 calls, each answered 200); the answer joins the history after.
pub async fn send_agent_conversation(url: &str, conv: &str) {
    send_agent_turns(url, &[("x-conversation-id", conv)], 40).await;
}

/// The agent conversation's first `turns` turns (two calls each), every call with `headers`.
pub async fn send_agent_turns(url: &str, headers: &[(&str, &str)], turns: usize) {
    let tools = serde_json::json!([{"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "The path."}}, "required": ["path"]}}}]);
    let mut history =
        vec![serde_json::json!({"role": "system", "content": "You are a careful coding agent."})];
    for i in 0..turns {
        let [task, call, result, answer] = agent_turn(i);
        for step in [vec![task], vec![call, result]] {
            history.extend(step);
            let body = serde_json::json!({"model": "gpt-4o", "messages": history, "tools": tools})
                .to_string();
            let (s, _, _) = send("POST", url, headers, &body).await;
            assert_eq!(s, 200);
        }
        history.push(answer);
    }
}

/// Of the agent conversation's forwarded messages (two calls per turn): `(stable, turns)`,
/// the turns whose first call repeats byte for byte the previous turn's last call, all but
/// its newest turn, at its start.
pub fn stable_turns(forwarded: &[Vec<String>]) -> (usize, usize) {
    let (mut stable, mut turns) = (0, 0);
    for pair in forwarded.chunks(2).collect::<Vec<_>>().windows(2) {
        let prev = pair[0].last().unwrap();
        let cur = &pair[1][0];
        let newest_turn_start = prev
            .iter()
            .rposition(|m| m.contains("\"role\":\"user\""))
            .unwrap();
        let prefix = &prev[..newest_turn_start];
        turns += 1;
        if cur.len() >= prefix.len() && &cur[..prefix.len()] == prefix {
            stable += 1;
        }
    }
    (stable, turns)
}
