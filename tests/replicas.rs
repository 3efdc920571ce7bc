//! Replicas sharing state through a real Redis (`[state] backend = "redis"`): a
//! `redis-server` started on loopback in a temporary directory (scripts/ensure-redis installs
//! it), three ctxgate replicas behind a round-robin TCP proxy that sends each new connection
//! to the next replica. One conversation's calls are serialised across replicas while others
//! overlap; an 80-turn conversation spread over the replicas keeps a byte-stable prefix; a
//! replica killed holding a permit loses it within `lease_ttl`; Redis stopped and restarted
//! mid-run: no call hangs, the fallback and the recovery are counted, gauges end at 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::net::{TcpListener, TcpStream};

/// A throwaway redis-server on a free loopback port, no persistence, in its own directory.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Redis {
    async fn start() -> Redis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("ctxgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            port,
            dir,
            child: None,
        };
        r.run().await;
        r
    }

    async fn run(&mut self) {
        self.run_with(&[]).await;
    }

    async fn run_with(&mut self, extra: &[&str]) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(extra)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (scripts/ensure-redis installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s.write_all(b"PING\r\n").await;
                let mut buf = [0u8; 16];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
                {
                    if buf[..n].starts_with(b"+PONG") {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Sends one inline command and returns the first line of the answer.
    async fn command(&self, line: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        s.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A round-robin TCP proxy: each new connection goes to the next backend.
async fn round_robin(backends: Vec<SocketAddr>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            let to = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
            tokio::spawn(async move {
                if let Ok(mut out) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    addr
}

/// Replicas on `redis` with a short lease (the kill test waits it out) and a round-trip
/// timeout to match (the restart test waits for it).
fn shared(up: &Mock, redis: &Redis) -> TestConfig {
    TestConfig::openai(up)
        .set("state", "backend", "redis")
        .set("state", "redis_url", redis.url())
        .set("state", "key_prefix", format!("t{}:", std::process::id()))
        .set("state", "timeout", "400ms")
        .set("state", "lease_ttl", "2s")
}

/// The same with a round-trip timeout no loaded test machine reaches: a slow Redis must not
/// turn these tests' replicas to their local gates (which, by design, do not serialise
/// across replicas).
fn shared_patient(up: &Mock, redis: &Redis) -> TestConfig {
    shared(up, redis)
        .set("state", "timeout", "3s")
        .set("state", "lease_ttl", "12s")
}

/// When each request reached the mock, with its tag.
type Arrivals = Arc<Mutex<Vec<(Instant, String)>>>;

const D: Duration = Duration::from_millis(500);

async fn slow_mock(hold: Option<Duration>) -> (Mock, Arrivals) {
    let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
    let a = arrivals.clone();
    let up = mock(move |r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        let tag = v["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        a.lock().unwrap().push((Instant::now(), tag.clone()));
        let d = match hold {
            Some(h) if tag.starts_with("hold") => h,
            _ => D,
        };
        Reply::Delayed(d, Box::new(llm_reply(r)))
    })
    .await;
    (up, arrivals)
}

async fn post(
    addr: SocketAddr,
    conv: &str,
    tag: &str,
) -> (http::StatusCode, http::HeaderMap, bytes::Bytes) {
    let body = format!(
        "{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"{tag}\"}}]}}"
    );
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        send(
            "POST",
            &format!("http://{addr}/v1/chat/completions"),
            &[("x-conversation-id", conv)],
            &body,
        ),
    )
    .await;
    r.expect("no call hangs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conversation_is_serialised_across_replicas_while_others_overlap() {
    let redis = Redis::start().await;
    let (up, arrivals) = slow_mock(None).await;
    let cfg = shared_patient(&up, &redis);
    let replicas = vec![cfg.start().await, cfg.start().await, cfg.start().await];
    let lb = round_robin(replicas.iter().map(|g| g.addr).collect()).await;

    // Three calls of conversation A and three of B, spread over the replicas: the first of
    // each goes upstream at once; each later one is sent once the one before it waits in line
    // (the replicas' waiter gauges say so), so the order they were queued in is known.
    let waiting = |n: f64| {
        let admins: Vec<_> = replicas.iter().map(|g| g.admin).collect();
        async move {
            for _ in 0..1000 {
                let mut sum = 0.0;
                for a in &admins {
                    let (_, _, body) = send("GET", &format!("http://{a}/metrics"), &[], "").await;
                    sum += sample(&String::from_utf8_lossy(&body), "ctxgate_gate_waiters");
                }
                if sum >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("{n} calls never waited in line");
        }
    };
    let call = |conv: &'static str, i: usize| {
        tokio::spawn(async move { post(lb, &format!("conv-{conv}"), &format!("{conv}{i}")).await })
    };
    let mut calls = vec![call("A", 0)];
    up.until_request("A0").await;
    calls.push(call("B", 0));
    up.until_request("B0").await;
    let mut queued = 0.0;
    for i in 1..3 {
        for conv in ["A", "B"] {
            calls.push(call(conv, i));
            queued += 1.0;
            waiting(queued).await;
        }
    }
    for c in calls {
        let (s, _, _) = c.await.unwrap();
        assert_eq!(s, 200);
    }
    for g in &replicas {
        let page = metrics(g).await;
        assert_eq!(
            sample(&page, "ctxgate_state_fallbacks_total"),
            0.0,
            "Redis answered throughout"
        );
    }
    let got = arrivals.lock().unwrap().clone();
    assert_eq!(got.len(), 6);
    for conv in ["A", "B"] {
        let mine: Vec<Instant> = got
            .iter()
            .filter(|(_, t)| t.starts_with(conv))
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(mine.len(), 3);
        // Admitted in the order they were queued.
        let order: Vec<&str> = got
            .iter()
            .filter(|(_, t)| t.starts_with(conv))
            .map(|(_, t)| t.as_str())
            .collect();
        assert_eq!(
            order,
            [format!("{conv}0"), format!("{conv}1"), format!("{conv}2")]
        );
        for w in mine.windows(2) {
            let gap = w[1] - w[0];
            // The next call may go upstream only once the previous answer exists (D after it
            // arrived upstream); a little slack for the clock of the two tasks.
            assert!(
                gap >= D - Duration::from_millis(20),
                "conversation {conv}: two calls upstream {gap:?} apart, less than {D:?}"
            );
        }
    }
    // Different conversations did not wait on each other: the first calls of A and B were
    // upstream at the same time.
    let first = |c: &str| got.iter().find(|(_, t)| t.starts_with(c)).unwrap().0;
    let (a, b) = (first("A"), first("B"));
    let apart = if a > b { a - b } else { b - a };
    assert!(apart < D, "A and B overlapped upstream ({apart:?} apart)");
    for g in &replicas {
        until_sample(g, "ctxgate_state_leases", 0.0).await;
        until_sample(g, "ctxgate_gate_active", 0.0).await;
        let page = metrics(g).await;
        assert_eq!(sample(&page, "ctxgate_state_local"), 0.0);
        assert_eq!(sample(&page, "ctxgate_state_fallbacks_total"), 0.0);
    }
    for g in replicas {
        stop(g).await;
    }
}

/// The 40-turn agent conversation of tests/prune.rs (80 calls), every call on the next replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_turns_spread_over_replicas_keep_a_byte_stable_prefix() {
    let redis = Redis::start().await;
    let up = mock(llm_reply).await;
    let cfg = shared_patient(&up, &redis)
        .set("prune", "hard_token_limit", 4000)
        .set("prune", "max_messages", 0)
        .set("prune", "keep_file_content_turns", 1);
    let replicas = vec![cfg.start().await, cfg.start().await, cfg.start().await];
    let lb = round_robin(replicas.iter().map(|g| g.addr).collect()).await;
    send_agent_conversation(&format!("http://{lb}/v1/chat/completions"), "agent-80").await;
    let forwarded: Vec<Vec<String>> = up
        .requests()
        .iter()
        .map(|r| raw_messages(&r.body))
        .collect();
    assert_eq!(forwarded.len(), 80);
    // Each replica served about a third of the calls.
    for g in &replicas {
        let page = metrics(g).await;
        let served = sample(
            &page,
            "ctxgate_http_requests_total{route=\"test\",status=\"200\"}",
        );
        assert!(
            (20.0..=34.0).contains(&served),
            "a replica served {served} of 80 calls"
        );
    }
    // Turn by turn: the previous turn's forwarded messages, all but its newest turn, reappear
    // byte-identical at the start of this turn's.
    let (stable, turns) = stable_turns(&forwarded);
    assert!(
        stable * 10 >= turns * 9,
        "{stable}/{turns} turns kept the prefix across replicas"
    );
    for g in replicas {
        stop(g).await;
    }
}

/// Summaries shared through Redis: the 70-turn conversation spread over three replicas with
/// summaries on; a summary made by one replica is pinned by all, so the prefix holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_are_shared_by_the_replicas() {
    let redis = Redis::start().await;
    let up = mock(|r: &Recorded| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        if v["model"] != "summariser-1" {
            return llm_reply(r);
        }
        Reply::json(r#"{"id":"s","object":"chat.completion","model":"summariser-1","choices":[{"index":0,"message":{"role":"assistant","content":"SUMMARY: steps through src/mod_*.rs."},"finish_reason":"stop"}],"usage":{"prompt_tokens":900,"completion_tokens":12,"total_tokens":912}}"#)
    })
    .await;
    let cfg = shared_patient(&up, &redis)
        .set("prune", "hard_token_limit", 4000)
        .set("prune.summary", "enabled", true)
        .set("prune.summary", "model", "summariser-1")
        .set("prune.summary", "min_dropped_tokens", 1)
        .set_route(
            "prune",
            "models",
            serde_json::json!([{"match": "summariser-*", "hard_token_limit": 100000}]),
        );
    let replicas = vec![cfg.start().await, cfg.start().await, cfg.start().await];
    let lb = round_robin(replicas.iter().map(|g| g.addr).collect()).await;
    let headers = [
        ("x-conversation-id", "agent-shared-summary"),
        ("authorization", "Bearer sk-client-key"),
    ];
    send_agent_turns(&format!("http://{lb}/v1/chat/completions"), &headers, 70).await;
    let reqs = up.requests();
    let forwarded: Vec<Vec<String>> = reqs
        .iter()
        .filter(|r| !String::from_utf8_lossy(&r.body).contains("summariser-1"))
        .map(|r| raw_messages(&r.body))
        .collect();
    assert_eq!(forwarded.len(), 140);
    let summaries = reqs.len() - 140;
    assert!(summaries >= 2, "{summaries} summary calls");
    let mut pinning = 0;
    for g in &replicas {
        let page = metrics(g).await;
        if sample(&page, "ctxgate_summary_pinned_total{route=\"test\"}") > 0.0 {
            pinning += 1;
        }
        assert_eq!(sample(&page, "ctxgate_state_fallbacks_total"), 0.0);
    }
    assert_eq!(pinning, 3, "every replica pinned the shared summary");
    let (stable, turns) = stable_turns(&forwarded);
    assert!(
        stable * 10 >= turns * 9,
        "{stable}/{turns} turns kept the prefix across replicas, with summaries"
    );
    for g in replicas {
        stop(g).await;
    }
}

/// A replica process killed (SIGKILL) while its call holds the conversation's permit: the
/// next call of that conversation, on another replica, goes upstream within `lease_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_holding_a_permit_loses_it_within_the_lease_ttl() {
    let redis = Redis::start().await;
    let (up, arrivals) = slow_mock(Some(Duration::from_secs(30))).await;
    let cfg = shared(&up, &redis);
    // The replica that will die: the real binary, in its own process.
    let dir = std::env::temp_dir().join(format!("ctxgate-replica-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let admin = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let toml = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{}",
        cfg.clone().set("transcripts", "sink", "none").toml()
    );
    std::fs::write(dir.join("config.toml"), toml).unwrap();
    let mut doomed = tokio::process::Command::new(env!("CARGO_BIN_EXE_ctxgate"))
        .args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let doomed_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // A debug build on a loaded machine may take a while to start: up to 30 s.
    let mut up_yet = false;
    for _ in 0..600 {
        if TcpStream::connect(doomed_addr).await.is_ok() {
            up_yet = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up_yet, "the doomed replica did not start listening");
    let survivor = cfg.start().await;

    // Its call holds the permit (the upstream answers in 30 s).
    let held = tokio::spawn(async move {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            send(
                "POST",
                &format!("http://{doomed_addr}/v1/chat/completions"),
                &[("x-conversation-id", "conv-K")],
                "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"hold\"}]}",
            ),
        )
        .await;
    });
    up.until_request("hold").await;
    doomed.start_kill().unwrap();
    let _ = doomed.wait().await;
    let killed = Instant::now();

    let (s, _, _) = post(survivor.addr, "conv-K", "next").await;
    assert_eq!(s, 200);
    let got = arrivals.lock().unwrap().clone();
    let next = got.iter().find(|(_, t)| t == "next").unwrap().0;
    let after = next - killed;
    assert!(
        after <= Duration::from_millis(2000 + 400),
        "the dead replica's permit was given up {after:?} after the kill (lease_ttl 2s)"
    );
    assert!(
        after >= Duration::from_millis(200),
        "the next call did not wait for the dead replica's lease: {after:?}"
    );
    held.abort();
    until_sample(&survivor, "ctxgate_state_leases", 0.0).await;
    stop(survivor).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis stopped mid-run and started again: calls keep being answered (each replica falls
/// back to its own gates, once, counted); a Redis that is back but read-only keeps them
/// there; once it takes writes the replicas go back to Redis (counted), and every gauge ends
/// at 0. With `on_error = "reject"` the calls get 503 `state_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_mid_run() {
    let mut redis = Redis::start().await;
    let up = mock(llm_reply).await;
    let cfg = shared(&up, &redis);
    let a = cfg.start().await;
    let b = cfg.start().await;
    let strict = cfg.clone().set("state", "on_error", "reject").start().await;
    for (i, g) in [&a, &b].iter().enumerate() {
        let (s, _, _) = post(g.addr, &format!("conv-{i}"), "before").await;
        assert_eq!(s, 200);
    }

    redis.stop().await;
    for round in 0..3 {
        for (i, g) in [&a, &b].iter().enumerate() {
            let t = Instant::now();
            let (s, _, _) = post(g.addr, &format!("conv-{i}"), &format!("down {round}")).await;
            assert_eq!(s, 200, "answered from the local gates while Redis is down");
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "took {:?}",
                t.elapsed()
            );
        }
    }
    let (s, h, body) = post(strict.addr, "conv-s", "down").await;
    assert_eq!(s, 503);
    assert_eq!(h["x-ctxgate-error"], "state_unavailable");
    assert!(String::from_utf8_lossy(&body).contains("state_unavailable"));
    for g in [&a, &b] {
        let page = metrics(g).await;
        assert_eq!(
            sample(&page, "ctxgate_state_fallbacks_total"),
            1.0,
            "one transition, counted once"
        );
        assert_eq!(sample(&page, "ctxgate_state_local"), 1.0);
        // The first round trip to fail (whichever op it was) is counted.
        let errors: f64 = [
            "acquire", "release", "renew", "view_get", "view_put", "ping",
        ]
        .iter()
        .map(|op| sample(&page, &format!("ctxgate_state_errors_total{{op=\"{op}\"}}")))
        .sum();
        assert!(errors >= 1.0, "{errors}");
    }

    // Back, but read-only (a replica of a primary that is not there, as after a failover
    // gone wrong): it answers PING, refuses writes, so the replicas stay on their fallback.
    redis.run_with(&["--replicaof", "127.0.0.1", "1"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for g in [&a, &b] {
        let page = metrics(g).await;
        assert_eq!(
            sample(&page, "ctxgate_state_local"),
            1.0,
            "a read-only Redis is still down"
        );
        assert_eq!(sample(&page, "ctxgate_state_recoveries_total"), 0.0);
    }
    assert_eq!(redis.command("REPLICAOF NO ONE").await, "+OK");
    for g in [&a, &b, &strict] {
        until_sample(g, "ctxgate_state_recoveries_total", 1.0).await;
        until_sample(g, "ctxgate_state_local", 0.0).await;
    }
    for (i, g) in [&a, &b, &strict].iter().enumerate() {
        let (s, _, _) = post(g.addr, &format!("conv-{i}"), "after").await;
        assert_eq!(s, 200);
    }
    for g in [&a, &b, &strict] {
        until_sample(g, "ctxgate_state_leases", 0.0).await;
        until_sample(g, "ctxgate_gate_active", 0.0).await;
        until_sample(g, "ctxgate_gate_waiters", 0.0).await;
        let page = metrics(g).await;
        assert_eq!(sample(&page, "ctxgate_state_fallbacks_total"), 1.0);
    }
    for g in [a, b, strict] {
        stop(g).await;
    }
}
