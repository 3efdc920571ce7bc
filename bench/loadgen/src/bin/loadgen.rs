//! An open-loop HTTP/1.1 load generator for ctxgate's benchmarks, printing one JSON object.
//!
//! `loadgen rate`: requests on a fixed timetable — request k is due at `start + k/rate` — over
//! `--connections` keep-alive connections (connection j sends requests j, j+C, j+2C, …, like
//! wrk2). Latency is measured from the *intended* send time whenever a request had to wait for
//! its connection's previous answer, so a stalled target is charged for every request that
//! should have gone out meanwhile (coordinated-omission correction); a request whose
//! connection was free is timed from when it went out (the generator's timer is not the
//! target's fault).
//! Every latency is kept (runs are bounded in count), so percentiles are exact, not bucketed.
//! With `--stream` it also records time to first byte and the gaps between body frames (SSE
//! pacing). `--side-body` adds one more connection that sends a (pathological) request every
//! `--side-interval-ms` while the run lasts.
//!
//! `loadgen hold`: opens `--n` streams at once on `--n` connections, waits until every one has
//! received its first event, reads the RSS of `--pid` processes then, and reports how many
//! streams ended with `data: [DONE]`.
//!
//! `loadgen grow-closed`: closed loop on one keep-alive connection, one conversation: request
//! i is the base body with turns 0..=i appended to its `messages` (one turn more per request;
//! turns from `--turns-file`, one JSON array of messages a line), sent when the previous answer
//! has been read. Each body is built before its timer starts, so only the exchange is timed
//! (request written, answer read to its end); the first `--warmup` requests are not recorded.
//!
//! Every loop is bounded: a run stops scheduling at `duration + timeout`, each request has
//! `--timeout`, `hold` gives up after `--timeout`, and `grow-closed` sends at most
//! `warmup + turns` requests and stops after `--max-duration`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open-loop load at a fixed rate.
    Rate(RateArgs),
    /// Hold N concurrent streams open and read the target's RSS.
    Hold(HoldArgs),
    /// Closed loop, one connection: a conversation growing by one turn per request.
    GrowClosed(GrowArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Target URL, http://host:port/path.
    #[arg(long)]
    url: String,
    /// Request body: a file holding one body (POST); without it, GET.
    #[arg(long)]
    body: Option<PathBuf>,
    /// The body file is JSONL: one body a line, used in turn (cycling).
    #[arg(long)]
    jsonl: bool,
    /// Extra header "name: value" (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Header carrying a conversation id (none if unset).
    #[arg(long)]
    conv_header: Option<String>,
    /// Conversation id = this prefix + the request's index.
    #[arg(long, default_value = "c")]
    conv_prefix: String,
    /// One conversation id for every request instead.
    #[arg(long)]
    conv_fixed: Option<String>,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args, Clone)]
struct RateArgs {
    #[command(flatten)]
    c: Common,
    /// Requests per second.
    #[arg(long)]
    rate: f64,
    /// Seconds of scheduled load.
    #[arg(long)]
    duration: f64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Grow the conversation: request i is the body with i+1 new messages appended to its
    /// `messages` array (one more per request).
    #[arg(long)]
    grow: bool,
    /// Read the response body frame by frame: time to first byte and inter-frame gaps.
    #[arg(long)]
    stream: bool,
    /// Requests sent one by one on the first connection before the timed run (not recorded).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// A body sent on one more connection every --side-interval-ms during the run.
    #[arg(long)]
    side_body: Option<PathBuf>,
    #[arg(long, default_value_t = 500)]
    side_interval_ms: u64,
    /// Where the side connection sends (default: --url), to tell the host's cost of a
    /// transfer from the target's.
    #[arg(long)]
    side_url: Option<String>,
}

#[derive(Args, Clone)]
struct HoldArgs {
    #[command(flatten)]
    c: Common,
    /// Streams held open at once.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Processes whose RSS is read once all streams are open (summed; repeatable).
    #[arg(long = "pid")]
    pids: Vec<u32>,
}

#[derive(Args, Clone)]
struct GrowArgs {
    #[command(flatten)]
    c: Common,
    /// Timed requests, each carrying one turn more than the one before.
    #[arg(long, default_value_t = 60)]
    turns: usize,
    /// Requests sent first, untimed (request 0 is the cold one); they carry the first turns.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// JSONL: line k is turn k, a JSON array of the messages it appends (or one message
    /// object). Needs at least warmup + turns lines. Without it: alternately a user message
    /// and an assistant tool call with its result.
    #[arg(long)]
    turns_file: Option<PathBuf>,
    /// Stop sending after this many seconds in all (the rest counted as not_sent).
    #[arg(long, default_value_t = 120.0)]
    max_duration: f64,
}

/// Request bodies, by request index.
enum Bodies {
    Empty,
    Cycle(Vec<Bytes>),
    /// `head` ends after the last original message, `tail` starts with the array's `]`;
    /// `appended[..ends[i]]` holds new messages 0..=i, each with its leading comma.
    Grow {
        head: Vec<u8>,
        tail: Vec<u8>,
        appended: String,
        ends: Vec<usize>,
    },
}

impl Bodies {
    fn load(c: &Common, grow: Option<usize>) -> Result<Self, String> {
        let Some(path) = &c.body else {
            return Ok(Bodies::Empty);
        };
        let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(n) = grow {
            let turns = (0..n)
                .map(|i| vec![json!({"role": "user", "content": format!("Turn {i}: run the invoice tests again and tell me which ones fail, with the first line of each error.")})])
                .collect();
            return Self::grow(&raw, turns);
        }
        if c.jsonl {
            let lines: Vec<Bytes> = raw
                .split(|b| *b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .map(Bytes::copy_from_slice)
                .collect();
            if lines.is_empty() {
                return Err("body: no lines".into());
            }
            return Ok(Bodies::Cycle(lines));
        }
        Ok(Bodies::Cycle(vec![Bytes::from(raw)]))
    }

    /// The base body `raw` growing by one turn (a list of messages) per request.
    fn grow(raw: &[u8], turns: Vec<Vec<Value>>) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(raw).map_err(|e| format!("body: {e}"))?;
        let msgs = serde_json::to_string(&v["messages"]).map_err(|e| e.to_string())?;
        let full = serde_json::to_string(&v).map_err(|e| e.to_string())?;
        let key = format!("\"messages\":{msgs}");
        let at = full.find(&key).ok_or("body: no messages array")? + key.len() - 1;
        let (head, tail) = full.split_at(at);
        let mut appended = String::new();
        let mut ends = Vec::with_capacity(turns.len());
        for turn in turns {
            for m in turn {
                appended.push(',');
                appended.push_str(&m.to_string());
            }
            ends.push(appended.len());
        }
        if ends.is_empty() {
            return Err("no turns".into());
        }
        Ok(Bodies::Grow {
            head: head.as_bytes().to_vec(),
            tail: tail.as_bytes().to_vec(),
            appended,
            ends,
        })
    }

    fn get(&self, i: usize) -> Option<Bytes> {
        match self {
            Bodies::Empty => None,
            Bodies::Cycle(v) => Some(v[i % v.len()].clone()),
            Bodies::Grow {
                head,
                tail,
                appended,
                ends,
            } => {
                let end = ends[i.min(ends.len() - 1)];
                let mut b = Vec::with_capacity(head.len() + end + tail.len());
                b.extend_from_slice(head);
                b.extend_from_slice(&appended.as_bytes()[..end]);
                b.extend_from_slice(tail);
                Some(Bytes::from(b))
            }
        }
    }
}

struct Target {
    addr: String,
    host: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Target {
    fn new(c: &Common) -> Result<Self, String> {
        let uri: Uri = c.url.parse().map_err(|e| format!("--url: {e}"))?;
        let host = uri.host().ok_or("--url: no host")?.to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        let headers = c
            .headers
            .iter()
            .map(|h| {
                let (k, v) = h.split_once(':').ok_or(format!("--header {h}: no colon"))?;
                Ok((k.trim().to_owned(), v.trim().to_owned()))
            })
            .collect::<Result<_, String>>()?;
        Ok(Target {
            addr: format!("{host}:{port}"),
            host: format!("{host}:{port}"),
            path,
            headers,
        })
    }

    fn request(&self, body: Option<Bytes>, conv: Option<(&str, String)>) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(if body.is_some() { "POST" } else { "GET" })
            .uri(&self.path)
            .header("host", &self.host);
        if body.is_some()
            && !self
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            b = b.header("content-type", "application/json");
        }
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        if let Some((k, v)) = conv {
            b = b.header(k, v);
        }
        b.body(Full::new(body.unwrap_or_default()))
            .unwrap_or_else(|e| panic!("bad request: {e}"))
    }
}

async fn connect(addr: &str) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// What one response looked like, times relative to the intended send time.
#[derive(Default)]
struct Outcome {
    status: u16,
    ttfb: Option<Duration>,
    gaps: Vec<Duration>,
    done_marker: bool,
}

async fn exchange(
    send: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    t0: Instant,
    frames: bool,
    on_first: Option<&(dyn Fn() + Sync)>,
) -> Result<Outcome, String> {
    send.ready().await.map_err(|e| format!("ready: {e}"))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut out = Outcome {
        status: resp.status().as_u16(),
        ..Outcome::default()
    };
    let mut body = resp.into_body();
    let mut last: Option<Instant> = None;
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| format!("body: {e}"))?;
        let Some(d) = f.data_ref() else { continue };
        if d.is_empty() {
            continue;
        }
        let now = Instant::now();
        if frames {
            match last {
                None => {
                    out.ttfb = Some(now - t0);
                    if let Some(cb) = on_first {
                        cb();
                    }
                }
                Some(prev) => out.gaps.push(now - prev),
            }
            if d.windows(12).any(|w| w == b"data: [DONE]") {
                out.done_marker = true;
            }
        }
        last = Some(now);
    }
    Ok(out)
}

#[derive(Default)]
struct Tally {
    latencies: Vec<u64>,
    ttfb: Vec<u64>,
    gaps: Vec<u64>,
    ok: usize,
    statuses: std::collections::BTreeMap<u16, usize>,
    errors: std::collections::BTreeMap<String, usize>,
    not_sent: usize,
    no_done: usize,
    last_done: Option<Instant>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.latencies.extend(o.latencies);
        self.ttfb.extend(o.ttfb);
        self.gaps.extend(o.gaps);
        self.ok += o.ok;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.not_sent += o.not_sent;
        self.no_done += o.no_done;
        self.last_done = self.last_done.max(o.last_done);
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Exact percentiles (in microseconds) of a list of samples.
fn summary(v: &mut [u64]) -> Value {
    if v.is_empty() {
        return json!({"n": 0});
    }
    v.sort_unstable();
    let p = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
    json!({"n": v.len(), "p50_us": p(0.5), "p90_us": p(0.9), "p99_us": p(0.99), "p999_us": p(0.999),
           "max_us": v[v.len() - 1], "min_us": v[0], "mean_us": mean.round()})
}

fn short(e: &str) -> String {
    e.split(':').next().unwrap_or(e).to_owned()
}

/// The conversation header of request `i`, if any.
fn conv(c: &Common, i: usize) -> Option<(&str, String)> {
    c.conv_header.as_deref().map(|h| {
        let id = c
            .conv_fixed
            .clone()
            .unwrap_or_else(|| format!("{}{i}", c.conv_prefix));
        (h, id)
    })
}

async fn rate(a: RateArgs) -> Result<Value, String> {
    let count = (a.rate * a.duration).round() as usize;
    let conns = a.connections.clamp(1, count.max(1));
    let bodies = Arc::new(Bodies::load(&a.c, a.grow.then_some(a.warmup + count))?);
    let target = Arc::new(Target::new(&a.c)?);
    let side_target = match &a.side_url {
        Some(u) => {
            let mut c = a.c.clone();
            c.url = u.clone();
            Arc::new(Target::new(&c).map_err(|e| e.replacen("--url", "--side-url", 1))?)
        }
        None => target.clone(),
    };
    let per_req = Duration::from_secs_f64(a.c.timeout);
    let period = Duration::from_secs_f64(1.0 / a.rate);
    let barrier = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let (start_tx, start_rx) = tokio::sync::watch::channel::<Option<Instant>>(None);
    let a = Arc::new(a);
    let mut tasks = Vec::new();
    for j in 0..conns {
        let (a, bodies, target, barrier) =
            (a.clone(), bodies.clone(), target.clone(), barrier.clone());
        let mut start_rx = start_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut send = connect(&target.addr).await.ok();
            if j == 0 {
                // Warm-up: one by one, in order (a growing conversation stays in order).
                for i in 0..a.warmup {
                    if send.is_none() {
                        send = connect(&target.addr).await.ok();
                    }
                    if let Some(s) = send.as_mut() {
                        let req = target.request(bodies.get(i), conv(&a.c, i));
                        let r = tokio::time::timeout(
                            per_req,
                            exchange(s, req, Instant::now(), false, None),
                        )
                        .await;
                        if !matches!(r, Ok(Ok(_))) {
                            send = None;
                        }
                    }
                }
            }
            barrier.wait().await;
            let start = match start_rx.wait_for(Option::is_some).await {
                Ok(s) => s.unwrap_or_else(Instant::now),
                Err(_) => return t,
            };
            let hard_end = start + Duration::from_secs_f64(a.duration + a.c.timeout);
            let mut free_at = start;
            let mut k = j;
            while k < count {
                let due = start + period.mul_f64(k as f64);
                if Instant::now() > hard_end {
                    t.not_sent += (count - k).div_ceil(conns);
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                // Coordinated omission: a request that had to wait for its connection's
                // previous answer is timed from when it was due; one whose connection was free
                // is timed from when it went out, so the generator's own timer lateness
                // (tokio's 1 ms wheel) is not charged to the target.
                let t_ref = if free_at > due { due } else { Instant::now() };
                let i = a.warmup + k;
                let req = target.request(bodies.get(i), conv(&a.c, i));
                let r = async {
                    if send.as_ref().is_none_or(|s| s.is_closed()) {
                        send = Some(connect(&target.addr).await?);
                    }
                    match send.as_mut() {
                        Some(s) => exchange(s, req, t_ref, a.stream, None).await,
                        None => Err("no connection".into()),
                    }
                };
                let r = tokio::time::timeout(per_req, r).await;
                free_at = Instant::now();
                match r {
                    Ok(Ok(o)) => {
                        let now = free_at;
                        *t.statuses.entry(o.status).or_default() += 1;
                        if (200..300).contains(&o.status) {
                            t.ok += 1;
                            t.latencies.push(us(now - t_ref));
                            if a.stream {
                                if let Some(f) = o.ttfb {
                                    t.ttfb.push(us(f));
                                }
                                t.gaps.extend(o.gaps.iter().map(|g| us(*g)));
                                if !o.done_marker {
                                    t.no_done += 1;
                                }
                            }
                        }
                        t.last_done = Some(now);
                    }
                    Ok(Err(e)) => {
                        *t.errors.entry(short(&e)).or_default() += 1;
                        send = None;
                    }
                    Err(_) => {
                        *t.errors.entry("timeout".into()).or_default() += 1;
                        send = None;
                    }
                }
                k += conns;
            }
            t
        }));
    }
    // The side connection: a (pathological) request every side_interval_ms during the run.
    let side = a.side_body.clone().map(|p| {
        let (a, target) = (a.clone(), side_target.clone());
        let mut start_rx = start_rx.clone();
        tokio::spawn(async move {
            let body = Bytes::from(std::fs::read(&p).unwrap_or_default());
            let start = match start_rx.wait_for(Option::is_some).await {
                Ok(s) => s.unwrap_or_else(Instant::now),
                Err(_) => return json!({}),
            };
            let end = start + Duration::from_secs_f64(a.duration);
            let mut statuses = std::collections::BTreeMap::<String, usize>::new();
            let mut took = Vec::new();
            let mut send: Option<SendRequest<Full<Bytes>>> = None;
            for n in 0..10_000usize {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let req = target.request(
                    Some(body.clone()),
                    a.c.conv_header.as_deref().map(|h| (h, format!("side-{n}"))),
                );
                let r = tokio::time::timeout(Duration::from_secs(60), async {
                    if send.as_ref().is_none_or(|s| s.is_closed()) {
                        send = Some(connect(&target.addr).await?);
                    }
                    match send.as_mut() {
                        Some(s) => exchange(s, req, t0, false, None).await,
                        None => Err("no connection".into()),
                    }
                })
                .await;
                let key = match r {
                    Ok(Ok(o)) => o.status.to_string(),
                    Ok(Err(e)) => {
                        send = None;
                        short(&e)
                    }
                    Err(_) => {
                        send = None;
                        "timeout".into()
                    }
                };
                *statuses.entry(key).or_default() += 1;
                took.push(us(t0.elapsed()));
                tokio::time::sleep_until((t0 + Duration::from_millis(a.side_interval_ms)).into())
                    .await;
            }
            let busy: u64 = took.iter().sum();
            json!({"sent": took.len(), "statuses": statuses, "took": summary(&mut took),
                   "busy_fraction": busy as f64 / 1e6 / a.duration})
        })
    });
    barrier.wait().await;
    let start = Instant::now() + Duration::from_millis(5);
    let _ = start_tx.send(Some(start));
    let mut all = Tally::default();
    for t in tasks {
        if let Ok(t) = t.await {
            all.merge(t);
        }
    }
    let side = match side {
        Some(h) => h.await.unwrap_or(Value::Null),
        None => Value::Null,
    };
    let elapsed = all.last_done.map_or(0.0, |l| (l - start).as_secs_f64());
    let achieved = if elapsed > 0.0 {
        all.ok as f64 / elapsed.max(a.duration)
    } else {
        0.0
    };
    let errors: usize = all.errors.values().sum::<usize>()
        + all
            .statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum::<usize>()
        + all.not_sent;
    let mut out = json!({
        "mode": "rate", "url": a.c.url, "rate": a.rate, "duration_s": a.duration,
        "connections": conns, "scheduled": count, "ok": all.ok, "errors": errors,
        "not_sent": all.not_sent, "statuses": all.statuses, "error_kinds": all.errors,
        "achieved_rps": achieved, "elapsed_s": elapsed,
        "latency": summary(&mut all.latencies),
    });
    if a.stream {
        out["ttfb"] = summary(&mut all.ttfb);
        out["gaps"] = summary(&mut all.gaps);
        out["streams_without_done"] = json!(all.no_done);
    }
    if !side.is_null() {
        out["side"] = side;
    }
    Ok(out)
}

/// The turns of `grow-closed`: from the turns file, or generated.
fn load_turns(a: &GrowArgs, n: usize) -> Result<Vec<Vec<Value>>, String> {
    let Some(path) = &a.turns_file else {
        return Ok((0..n)
            .map(|i| {
                if i % 2 == 0 {
                    vec![json!({"role": "user", "content": format!("Step {i}: now check the ledger totals for invoice {} and tell me whether the rounding is per invoice.", 1000 + 7 * i)})]
                } else {
                    let id = format!("call_grow_{i}");
                    vec![
                        json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
                               "function": {"name": "run", "arguments": format!("{{\"command\": \"pytest -q tests/test_invoice.py -k case_{i}\"}}")}}]}),
                        json!({"role": "tool", "tool_call_id": id, "content": format!("tests/test_invoice.py::test_case_{i} PASSED\n{} passed in 0.{:02}s", 40 + i % 7, i % 97)}),
                    ]
                }
            })
            .collect());
    };
    let raw = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut turns = Vec::with_capacity(n);
    for (k, line) in raw
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .enumerate()
    {
        match serde_json::from_str::<Value>(line).map_err(|e| format!("turns line {k}: {e}"))? {
            Value::Array(v) => turns.push(v),
            m @ Value::Object(_) => turns.push(vec![m]),
            _ => return Err(format!("turns line {k}: not an array or an object")),
        }
    }
    if turns.len() < n {
        return Err(format!(
            "--turns-file has {} turns, {n} needed",
            turns.len()
        ));
    }
    Ok(turns)
}

/// One exchange of `grow-closed`: the status and the answer's `x-ctxgate-*` headers, the
/// answer read to its end.
async fn exchange_headers(
    send: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(u16, Vec<(String, String)>), String> {
    send.ready().await.map_err(|e| format!("ready: {e}"))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-ctxgate-"))
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let mut body = resp.into_body();
    while let Some(f) = body.frame().await {
        f.map_err(|e| format!("body: {e}"))?;
    }
    Ok((status, headers))
}

async fn grow_closed(a: GrowArgs) -> Result<Value, String> {
    let n = a.warmup + a.turns;
    let raw = match &a.c.body {
        Some(p) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => return Err("--body is required".into()),
    };
    let bodies = Bodies::grow(&raw, load_turns(&a, n)?)?;
    drop(raw);
    let target = Target::new(&a.c)?;
    let per_req = Duration::from_secs_f64(a.c.timeout);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.max_duration);
    let mut send: Option<SendRequest<Full<Bytes>>> = None;
    let mut t = Tally::default();
    let (mut warm_ok, mut connects, mut sent) = (0usize, 0usize, 0usize);
    let mut sizes = (0usize, 0usize);
    let mut last_headers = serde_json::Map::new();
    for i in 0..n {
        if Instant::now() > deadline {
            t.not_sent += n.saturating_sub(i.max(a.warmup));
            break;
        }
        let timed = i >= a.warmup;
        let body = bodies.get(i).unwrap_or_default();
        if i == a.warmup {
            sizes.0 = body.len();
        }
        sizes.1 = body.len();
        let req = target.request(Some(body), conv(&a.c, i));
        if send.as_ref().is_none_or(|s| s.is_closed()) {
            connects += 1;
            match connect(&target.addr).await {
                Ok(s) => send = Some(s),
                Err(e) => {
                    if timed {
                        *t.errors.entry(short(&e)).or_default() += 1;
                    }
                    continue;
                }
            }
        }
        let Some(s) = send.as_mut() else { continue };
        sent += 1;
        let t0 = Instant::now();
        let r = tokio::time::timeout(per_req, exchange_headers(s, req)).await;
        let took = t0.elapsed();
        match r {
            Ok(Ok((status, headers))) => {
                let good = (200..300).contains(&status);
                if !timed {
                    warm_ok += usize::from(good);
                    continue;
                }
                *t.statuses.entry(status).or_default() += 1;
                if good {
                    t.ok += 1;
                    t.latencies.push(us(took));
                }
                last_headers = headers
                    .into_iter()
                    .map(|(k, v)| (k, Value::from(v)))
                    .collect();
            }
            Ok(Err(e)) => {
                send = None;
                if timed {
                    *t.errors.entry(short(&e)).or_default() += 1;
                }
            }
            Err(_) => {
                send = None;
                if timed {
                    *t.errors.entry("timeout".into()).or_default() += 1;
                }
            }
        }
    }
    let errors: usize = t.errors.values().sum::<usize>()
        + t.statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum::<usize>()
        + t.not_sent;
    Ok(json!({
        "mode": "grow-closed", "url": a.c.url, "warmup": a.warmup, "warmup_ok": warm_ok,
        "turns": a.turns, "sent": sent, "connects": connects, "ok": t.ok, "errors": errors,
        "not_sent": t.not_sent, "statuses": t.statuses, "error_kinds": t.errors,
        "elapsed_s": start.elapsed().as_secs_f64(),
        "body_bytes_first": sizes.0, "body_bytes_last": sizes.1,
        "last_headers": last_headers,
        "latency": summary(&mut t.latencies),
    }))
}

fn proc_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn hold(a: HoldArgs) -> Result<Value, String> {
    let bodies = Arc::new(Bodies::load(&a.c, None)?);
    let target = Arc::new(Target::new(&a.c)?);
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let limit = Duration::from_secs_f64(a.c.timeout);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(a.n);
    for i in 0..a.n {
        let (bodies, target, opened, failed) = (
            bodies.clone(),
            target.clone(),
            opened.clone(),
            failed.clone(),
        );
        let conv =
            a.c.conv_header
                .clone()
                .map(|h| (h, format!("{}{i}", a.c.conv_prefix)));
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(limit, async {
                let mut s = connect(&target.addr).await?;
                let req = target.request(
                    bodies.get(i),
                    conv.as_ref().map(|(h, v)| (h.as_str(), v.clone())),
                );
                let cb = || {
                    opened.fetch_add(1, Ordering::SeqCst);
                };
                exchange(&mut s, req, Instant::now(), true, Some(&cb)).await
            })
            .await;
            match r {
                Ok(Ok(o)) if o.status == 200 && o.done_marker => Ok(o),
                Ok(Ok(o)) => {
                    if o.ttfb.is_none() {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(format!("status {}", o.status))
                }
                Ok(Err(e)) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    Err(short(&e))
                }
                Err(_) => Err("timeout".to_owned()),
            }
        }));
    }
    // Wait until every stream has its first event (or failed), bounded by the timeout.
    let mut peak_open = 0;
    while t0.elapsed() < limit {
        let o = opened.load(Ordering::SeqCst);
        peak_open = peak_open.max(o);
        if o + failed.load(Ordering::SeqCst) >= a.n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_open_s = t0.elapsed().as_secs_f64();
    let rss_open: u64 = a.pids.iter().filter_map(|p| proc_kb(*p, "VmRSS:")).sum();
    let mut ok = 0;
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    let mut ttfb = Vec::new();
    let mut gaps = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(o)) => {
                ok += 1;
                ttfb.extend(o.ttfb.map(us));
                gaps.extend(o.gaps.iter().map(|g| us(*g)));
            }
            Ok(Err(e)) => *errors.entry(e).or_default() += 1,
            Err(_) => *errors.entry("panic".into()).or_default() += 1,
        }
    }
    let hwm: u64 = a.pids.iter().filter_map(|p| proc_kb(*p, "VmHWM:")).sum();
    Ok(json!({
        "mode": "hold", "url": a.c.url, "streams": a.n, "opened": opened.load(Ordering::SeqCst),
        "ok": ok, "errors": errors, "all_open_after_s": all_open_s,
        "rss_kb_all_open": rss_open, "vmhwm_kb_end": hwm,
        "ttfb": summary(&mut ttfb), "gaps": summary(&mut gaps), "total_s": t0.elapsed().as_secs_f64(),
    }))
}

fn main() {
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Rate(a) => a.c.threads,
        Cmd::Hold(a) => a.c.threads,
        Cmd::GrowClosed(a) => a.c.threads,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Rate(a) => rate(a).await,
            Cmd::Hold(a) => hold(a).await,
            Cmd::GrowClosed(a) => grow_closed(a).await,
        }
    });
    match r {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    }
}
