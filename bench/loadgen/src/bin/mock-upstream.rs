//! A fast mock of an OpenAI-compatible upstream for ctxgate's benchmarks.
//!
//! `POST …/chat/completions` reads the whole request body, then answers in OpenAI's real wire
//! formats: a `chat.completion` JSON object, or — when the body asks for `"stream": true` —
//! an SSE stream of `chat.completion.chunk` events (`--chunks` of them, `--chunk-gap-ms`
//! apart, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`).
//! The request headers `x-mock-chunks` and `x-mock-gap-ms` override both per request.
//! `GET /v1/models` lists one model; any other request (ctxgate's warm-up `HEAD`s included)
//! gets an empty 200.
//!
//! `mock-upstream --listen 127.0.0.1:0` prints `listening on ADDR` once bound.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Parser, Clone)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Content chunks per streamed answer.
    #[arg(long, default_value_t = 20)]
    chunks: u32,
    /// Gap between two chunks of a streamed answer, in milliseconds.
    #[arg(long, default_value_t = 10)]
    chunk_gap_ms: u64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `needle` occurs in `hay` as JSON syntax, not inside a string (a quote escaped as `\"`
/// in message content is preceded by a backslash).
fn has_key(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .enumerate()
        .any(|(i, w)| w == needle && (i == 0 || hay[i - 1] != b'\\'))
}

fn header_num(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.headers().get(name)?.to_str().ok()?.parse().ok()
}

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! The invoice module is tidy now; all 42 tests pass.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1841,"completion_tokens":16,"total_tokens":1857,"prompt_tokens_details":{"cached_tokens":1536},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_bench"}"#;

fn chunk(delta: &str, finish: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_bench\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
    ))
}

async fn handle(args: Args, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let chunks = header_num(&req, "x-mock-chunks").map_or(args.chunks, |n| n as u32);
    let gap = Duration::from_millis(header_num(&req, "x-mock-gap-ms").unwrap_or(args.chunk_gap_ms));
    let is_post = req.method() == hyper::Method::POST;
    // Read the whole request, as a real upstream does before answering.
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if is_post && path.ends_with("/chat/completions") {
        let stream = has_key(&body, br#""stream":true"#) || has_key(&body, br#""stream": true"#);
        if !stream {
            return Ok(json(COMPLETION));
        }
        let usage = has_key(&body, br#""include_usage":true"#)
            || has_key(&body, br#""include_usage": true"#);
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        tokio::spawn(async move {
            let mut frames = vec![chunk(
                r#"{"role":"assistant","content":"","refusal":null}"#,
                "null",
            )];
            for i in 0..chunks {
                frames.push(chunk(&format!("{{\"content\":\"tok{i} \"}}"), "null"));
            }
            frames.push(chunk("{}", "\"stop\""));
            if usage {
                frames.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_bench\",\"choices\":[],\"usage\":{\"prompt_tokens\":1841,\"completion_tokens\":20,\"total_tokens\":1861}}\n\n"));
            }
            frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
            let n = frames.len();
            for (i, f) in frames.into_iter().enumerate() {
                if tx.send(f).await.is_err() {
                    return; // the client went away
                }
                // Content chunks are `gap` apart; the closing events follow at once.
                if i < chunks as usize && i + 1 < n {
                    tokio::time::sleep(gap).await;
                }
            }
        });
        let mut resp = Response::new(BodyExt::boxed(ChanBody(rx)));
        let h = resp.headers_mut();
        h.insert(
            "content-type",
            hyper::header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(
            "cache-control",
            hyper::header::HeaderValue::from_static("no-cache"),
        );
        return Ok(resp);
    }
    if path.ends_with("/models") {
        return Ok(json(
            r#"{"object":"list","data":[{"id":"gpt-4o","object":"model","created":1700000000,"owned_by":"bench"}]}"#,
        ));
    }
    Ok(Response::new(Full::new(Bytes::new()).boxed()))
}

fn json(s: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(s.as_bytes())).boxed());
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A response body fed by a channel, one frame per SSE event.
struct ChanBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {}: {e}", args.listen));
        let addr = listener.local_addr().unwrap_or(args.listen);
        println!("listening on {addr}");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let args = args.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(args.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}
