//! Pruning through the proxy: the seed-like conversation, the cache-stable prefix over a
//! 40-turn agent conversation, rejection, the per-request limit header, shadow mode and
//! bodies that are not chat requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use ctxgate::dialect::Dialect;
use ctxgate::prune::{ChatRequest, Counter, Encoding};

const SEED: &str = include_str!("fixtures/openai-seed.json");
const SEED_ANTHROPIC: &str = include_str!("fixtures/anthropic-seed.json");

fn count(dialect: Dialect, body: &[u8]) -> u64 {
    Counter::new(Encoding::O200kBase)
        .unwrap()
        .count_request(&ChatRequest::parse(dialect, body).unwrap())
}

#[tokio::test]
async fn seed_conversation_is_pruned_to_the_budget() {
    let up = mock(llm_reply).await;
    let gate = TestConfig::both(&up)
        .set("prune", "hard_token_limit", 4000)
        .set("prune", "max_messages", 5)
        .set("prune", "keep_file_content_turns", 1)
        .start()
        .await;
    let before = count(Dialect::OpenAi, SEED.as_bytes());
    assert!(before > 50_000, "fixture has {before} tokens");
    let (s, h, b) = send(
        "POST",
        &gate.url("/v1/chat/completions"),
        &[("authorization", "Bearer sk-x")],
        SEED,
    )
    .await;
    assert_eq!(s, 200);
    // The fixture asks for a stream: the SSE answer comes back whole.
    assert_eq!(b, openai_sse().concat());
    let got = up.requests();
    let fwd = &got[0].body;
    let after = count(Dialect::OpenAi, fwd);
    assert!(after <= 4000, "forwarded {after} tokens");
    assert!(raw_messages(fwd).len() <= 5);
    assert_eq!(
        h["x-ctxgate-tokens-after"].to_str().unwrap(),
        after.to_string()
    );
    let tb: u64 = h["x-ctxgate-tokens-before"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(tb > 50_000, "tokens-before {tb}");
    assert_eq!(
        h["x-ctxgate-messages-dropped"].to_str().unwrap(),
        (raw_messages(SEED.as_bytes()).len() - raw_messages(fwd).len()).to_string()
    );
    assert_eq!(
        got[0].headers["content-length"].to_str().unwrap(),
        fwd.len().to_string()
    );
    // The system prompt and the newest message are kept byte for byte.
    let orig = raw_messages(SEED.as_bytes());
    let kept = raw_messages(fwd);
    assert_eq!(kept[0], orig[0]);
    assert_eq!(kept.last(), orig.last());
    // Fields ctxgate does not know survive in their order.
    let ov: serde_json::Value = serde_json::from_str(SEED).unwrap();
    let fv: serde_json::Value = serde_json::from_slice(fwd).unwrap();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&ov), keys(&fv));

    // Anthropic: the same through its route.
    let (s, h, _) = send(
        "POST",
        &gate.url("/anthropic/v1/messages"),
        &[("x-api-key", "k")],
        SEED_ANTHROPIC,
    )
    .await;
    assert_eq!(s, 200);
    let fwd = &up.requests()[1].body;
    let v: serde_json::Value = serde_json::from_slice(fwd).unwrap();
    assert_eq!(v["messages"][0]["role"], "user");
    assert!(h.contains_key("x-ctxgate-tokens-after"));

    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_prune_actions_total{action=\"pruned\",route=\"openai\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_prune_actions_total{action=\"pruned\",route=\"anthropic\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_prune_prompt_tokens_count{route=\"openai\",stage=\"after\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn forty_turns_keep_a_byte_stable_prefix() {
    let up = mock(llm_reply).await;
    let gate = TestConfig::both(&up)
        .set("prune", "hard_token_limit", 4000)
        .set("prune", "max_messages", 0)
        .set("prune", "keep_file_content_turns", 1)
        .start()
        .await;
    send_agent_conversation(&gate.url("/v1/chat/completions"), "agent-40").await;
    let mut forwarded: Vec<Vec<String>> = Vec::new();
    for r in up.requests() {
        assert!(count(Dialect::OpenAi, &r.body) <= 4000);
        forwarded.push(raw_messages(&r.body));
    }
    assert_eq!(forwarded.len(), 80);
    // Turn by turn (each user task opens a turn): the previous turn's forwarded messages, all but
    // its newest turn, must reappear byte-identical at the start of this turn's.
    let (stable, turns) = stable_turns(&forwarded);
    assert!(
        stable * 10 >= turns * 9,
        "{stable}/{turns} turns kept the prefix"
    );
    let page = metrics(&gate).await;
    let moves = sample(&page, "ctxgate_prune_cut_moves_total{route=\"openai\"}");
    assert!(
        moves >= 2.0,
        "the limit was crossed several times: {moves} cut moves"
    );
    assert!(
        moves <= 12.0,
        "the cut moves in steps, not every turn: {moves}"
    );
    assert!(sample(&page, "ctxgate_view_hits_total") >= 70.0);
}

#[tokio::test]
async fn rejection_limit_header_shadow_and_skips() {
    let up = mock(llm_reply).await;
    let gate = TestConfig::both(&up)
        .set("prune", "hard_token_limit", 1000)
        .start()
        .await;
    // The newest message alone is over the limit: 400 at once, nothing sent upstream.
    let huge = "word ".repeat(3000);
    let body =
        serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": huge}]})
            .to_string();
    let (s, h, b) = send("POST", &gate.url("/v1/chat/completions"), &[], &body).await;
    assert_eq!(s, 400);
    assert_eq!(h["x-ctxgate-error"], "context_length_exceeded");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("over the limit of 1000 (prune.hard_token_limit)"),
        "{msg}"
    );
    // In OpenAI's own words, with ctxgate's figures in headers too.
    assert!(
        msg.starts_with("This model's maximum context length is 1000 tokens. However, your messages resulted in "),
        "{msg}"
    );
    assert_eq!(h["x-ctxgate-limit-tokens"], "1000");
    let pinned: u64 = h["x-ctxgate-pinned-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pinned > 1000, "{pinned}");
    let body_a = serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": huge}]}).to_string();
    let (s, _, b) = send("POST", &gate.url("/anthropic/v1/messages"), &[], &body_a).await;
    assert_eq!(s, 400);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // Anthropic's wording, which Claude Code answers by compacting its history.
    let msg = v["error"]["message"].as_str().unwrap();
    let re_like = msg
        .strip_prefix("prompt is too long: ")
        .and_then(|r| r.split_once(" tokens > 1000 maximum ("));
    assert!(
        re_like.is_some_and(|(n, _)| n.parse::<u64>().unwrap() > 1000),
        "{msg}"
    );
    assert!(msg.ends_with("(prune.hard_token_limit))"), "{msg}");
    assert!(up.requests().is_empty());

    // A request may lower its own limit, never raise it.
    let small = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "word ".repeat(300)}]}).to_string();
    let (s, _, _) = send(
        "POST",
        &gate.url("/v1/chat/completions"),
        &[("x-ctxgate-token-limit", "100")],
        &small,
    )
    .await;
    assert_eq!(s, 400);
    let (s, _, _) = send(
        "POST",
        &gate.url("/v1/chat/completions"),
        &[("x-ctxgate-token-limit", "100000")],
        &small,
    )
    .await;
    assert_eq!(s, 200);
    let r = up.requests();
    assert_eq!(
        r[0].body,
        Bytes::from(small.clone()),
        "within budget: forwarded byte for byte"
    );
    assert!(!r[0].headers.contains_key("x-ctxgate-token-limit"));
    let (s, _, _) = send(
        "POST",
        &gate.url("/v1/chat/completions"),
        &[("x-ctxgate-token-limit", "lots")],
        &small,
    )
    .await;
    assert_eq!(s, 400);

    // Not JSON: forwarded unchanged, counted as skipped.
    let (s, _, _) = send("POST", &gate.url("/v1/chat/completions"), &[], "not json {").await;
    assert_eq!(s, 200);
    assert_eq!(
        up.requests().last().unwrap().body,
        Bytes::from_static(b"not json {")
    );
    let page = metrics(&gate).await;
    assert_eq!(
        sample(
            &page,
            "ctxgate_prune_actions_total{action=\"skipped\",route=\"openai\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_prune_actions_total{action=\"rejected\",route=\"openai\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &page,
            "ctxgate_prune_actions_total{action=\"unchanged\",route=\"openai\"}"
        ),
        1.0
    );

    // Shadow mode forwards the original bytes.
    let up2 = mock(llm_reply).await;
    let gate2 = TestConfig::both(&up2)
        .set("prune", "hard_token_limit", 4000)
        .set("prune", "mode", "shadow")
        .start()
        .await;
    let (s, h, _) = send("POST", &gate2.url("/v1/chat/completions"), &[], SEED).await;
    assert_eq!(s, 200);
    assert!(!h.contains_key("x-ctxgate-tokens-after"));
    assert_eq!(up2.requests()[0].body, Bytes::from_static(SEED.as_bytes()));
    assert_eq!(
        sample(
            &metrics(&gate2).await,
            "ctxgate_prune_actions_total{action=\"shadow\",route=\"openai\"}"
        ),
        1.0
    );

    // on_parse_error = "reject": 400 for a body that is not a chat request.
    let up3 = mock(llm_reply).await;
    let gate3 = TestConfig::both(&up3)
        .set("prune", "on_parse_error", "reject")
        .start()
        .await;
    let (s, _, b) = send(
        "POST",
        &gate3.url("/v1/chat/completions"),
        &[],
        "{\"model\":\"x\"}",
    )
    .await;
    assert_eq!(s, 400);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "invalid_chat_body");
    assert!(up3.requests().is_empty());
}

/// A compressed chat body: gzip and zstd are decoded, pruned like a plain one and forwarded
/// decoded (no Content-Encoding, the decoded length); a coding ctxgate does not read, or a
/// corrupt body, is forwarded byte for byte and counted as skipped — even with
/// `on_parse_error = "reject"`, since a compressed body is not an unparseable one.
#[tokio::test]
async fn compressed_chat_bodies_are_decoded_for_pruning_or_forwarded_untouched() {
    use std::io::Write;
    let up = mock(llm_reply).await;
    let gate = TestConfig::both(&up)
        .set("prune", "hard_token_limit", 4000)
        .set("prune", "on_parse_error", "reject")
        .start()
        .await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(SEED.as_bytes()).unwrap();
    let gz = Bytes::from(gz.finish().unwrap());
    let zst = Bytes::from(zstd::encode_all(SEED.as_bytes(), 3).unwrap());
    let post = |enc: &str, body: Bytes| {
        http::Request::post(gate.url("/v1/chat/completions"))
            .header("content-encoding", enc)
            .header("content-type", "application/json")
            .header("x-conversation-id", format!("compressed-{enc}"))
            .body(http_body_util::Full::new(body))
            .unwrap()
    };
    for (enc, body) in [("gzip", gz.clone()), ("zstd", zst)] {
        let resp = client().request(post(enc, body)).await.unwrap();
        assert_eq!(resp.status(), 200, "{enc}");
        assert!(
            resp.headers().contains_key("x-ctxgate-tokens-after"),
            "{enc} pruned"
        );
    }
    let got = up.requests();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert!(!r.headers.contains_key("content-encoding"));
        assert_eq!(
            r.headers["content-length"],
            r.body.len().to_string().as_str()
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["messages"].as_array().unwrap().len() < 22, "pruned");
    }
    assert_eq!(got[0].body, got[1].body, "same conversation, same bytes");
    // Not decodable: forwarded byte for byte, skipped.
    let resp = client()
        .request(post("compress", gz.clone()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let corrupt = Bytes::from_static(b"\x1f\x8b not really gzip");
    let resp = client()
        .request(post("gzip", corrupt.clone()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = up.requests();
    assert_eq!(got.len(), 4);
    assert_eq!(got[2].body, gz, "forwarded byte for byte");
    assert_eq!(got[2].headers["content-encoding"], "compress");
    assert_eq!(got[3].body, corrupt);
    assert_eq!(got[3].headers["content-encoding"], "gzip");
    until_sample(
        &gate,
        "ctxgate_prune_actions_total{action=\"skipped\",route=\"openai\"}",
        2.0,
    )
    .await;
    until_sample(
        &gate,
        "ctxgate_prune_actions_total{action=\"pruned\",route=\"openai\"}",
        2.0,
    )
    .await;
}

/// One ctxgate before each mock, with a 4,000-token limit and no message cap.
async fn limited_gates(ups: &[Mock]) -> Vec<Gate> {
    let mut gates = Vec::new();
    for up in ups {
        gates.push(
            TestConfig::both(up)
                .set("prune", "hard_token_limit", 4000)
                .set("prune", "max_messages", 0)
                .start()
                .await,
        );
    }
    gates
}

/// A conversation named by a header is parsed after its previous body, checked as it arrives;
/// one known only by a body field is found through the bytes its bodies begin with and parsed
/// after its previous body too. Both forward, turn after turn, exactly the bytes that a
/// ctxgate parsing every body whole forwards (the reference: gzip bodies without a header,
/// which are parsed whole) — also after the client edits an earlier message and changes its
/// system prompt.
#[tokio::test]
async fn a_resumed_parse_forwards_what_a_full_parse_forwards() {
    use std::io::Write;
    let ups = [
        mock(llm_reply).await,
        mock(llm_reply).await,
        mock(llm_reply).await,
    ];
    let gates = limited_gates(&ups).await;
    let mut history =
        vec![serde_json::json!({"role": "system", "content": "You are a careful coding agent."})];
    for i in 0..30 {
        history.extend(agent_turn(i));
        if i == 20 {
            history[3]["content"] = serde_json::json!("an edited tool result");
        }
        if i == 25 {
            history[0]["content"] = serde_json::json!("You are a terse coding agent.");
        }
        let body = serde_json::json!({"model": "gpt-4o", "messages": history, "prompt_cache_key": "conv-r"})
            .to_string();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(body.as_bytes()).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        for (k, gate) in gates.iter().enumerate() {
            let mut req = http::Request::post(gate.url("/v1/chat/completions"))
                .header("content-type", "application/json");
            req = match k {
                0 => req.header("x-conversation-id", "conv-r"),
                1 => req.header("content-encoding", "gzip"),
                _ => req,
            };
            let b = if k == 1 {
                gz.clone()
            } else {
                Bytes::from(body.clone())
            };
            let resp = client()
                .request(req.body(http_body_util::Full::new(b)).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    }
    let forwarded: Vec<_> = ups.iter().map(|u| u.requests()).collect();
    assert_eq!(forwarded[1].len(), 30);
    for k in [0, 2] {
        for (i, (x, y)) in forwarded[k].iter().zip(&forwarded[1]).enumerate() {
            assert_eq!(
                x.body, y.body,
                "gate {k}, request {i} forwarded differently"
            );
        }
    }
    assert!(
        forwarded[1]
            .iter()
            .any(|r| raw_messages(&r.body).len() < 30 * 4 / 2),
        "the limit pruned"
    );
    let bytes = |page: &str, part: &str| {
        sample(
            page,
            &format!("ctxgate_prune_body_bytes_total{{part=\"{part}\",route=\"openai\"}}"),
        )
    };
    let mut pages = Vec::new();
    for g in &gates {
        pages.push(metrics(g).await);
    }
    // The header-named and the body-field conversation parsed little more than their new
    // turns (and, after the edit and the system prompt change, the bodies from the change on).
    for k in [0, 2] {
        let (reused, parsed) = (bytes(&pages[k], "reused"), bytes(&pages[k], "parsed"));
        assert!(
            reused > 4.0 * parsed,
            "gate {k}: {reused} reused, {parsed} parsed"
        );
        assert_eq!(reused + parsed, bytes(&pages[1], "parsed"));
    }
    assert_eq!(bytes(&pages[1], "reused"), 0.0);
}

/// A body that arrives in many small frames is checked against its conversation's last body
/// frame by frame; when it differs part-way (an edited message, another model before the
/// messages) the rest is kept as it came and parsed after the part that matched. Each turn
/// goes upstream exactly as the same body sent in one piece does.
#[tokio::test]
async fn a_body_in_small_frames_is_checked_as_it_arrives() {
    let ups = [mock(llm_reply).await, mock(llm_reply).await];
    let gates = limited_gates(&ups).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let mut history =
        vec![serde_json::json!({"role": "system", "content": "You are a careful coding agent."})];
    let mut model = "gpt-4o";
    let mut total = 0usize;
    for i in 0..16 {
        history.extend(agent_turn(i));
        if i == 9 {
            history[5]["content"] = serde_json::json!("an edited answer");
        }
        if i == 12 {
            model = "gpt-4.1";
        }
        let body = serde_json::json!({"model": model, "messages": history}).to_string();
        total += body.len();
        // Gate 0: 997-byte frames, each sent on its own; gate 1: the body in one piece.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames: Vec<Bytes> = body
            .as_bytes()
            .chunks(997)
            .map(Bytes::copy_from_slice)
            .collect();
        tokio::spawn(async move {
            for f in frames {
                if tx.send(f).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        });
        let req = http::Request::post(gates[0].url("/v1/chat/completions"))
            .header("x-conversation-id", "framed")
            .header("content-type", "application/json")
            .body(http_body_util::StreamBody::new(futures_stream(rx)))
            .unwrap();
        assert_eq!(client.request(req).await.unwrap().status(), 200);
        let (s, _, _) = send(
            "POST",
            &gates[1].url("/v1/chat/completions"),
            &[("x-conversation-id", "framed")],
            &body,
        )
        .await;
        assert_eq!(s, 200);
    }
    let (a, b) = (ups[0].requests(), ups[1].requests());
    assert_eq!(a.len(), 16);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.body, y.body, "turn {i} forwarded differently");
    }
    // Older file contents were elided (or messages dropped): pruning ran on every path.
    let sent = serde_json::json!({"model": model, "messages": history}).to_string();
    assert!(a[15].body.len() < sent.len() / 2, "the limit pruned");
    let page = metrics(&gates[0]).await;
    let reused = sample(
        &page,
        "ctxgate_prune_body_bytes_total{part=\"reused\",route=\"openai\"}",
    );
    let parsed = sample(
        &page,
        "ctxgate_prune_body_bytes_total{part=\"parsed\",route=\"openai\"}",
    );
    // Every byte received is counted once, as reused or parsed; the small first bodies, the
    // edit and the model change were parsed again, the rest mostly reused.
    assert_eq!(reused + parsed, total as f64);
    assert!(reused > parsed, "{reused} reused, {parsed} parsed");
}

/// The holdout: with `holdout_percent = 50`, each conversation is in or out by its id; a
/// holdout conversation's request goes upstream byte for byte (action `holdout`, the record
/// saying `holdout` with what pruning would have sent), the others are pruned; about half
/// fall each way, and a conversation stays where it fell.
#[tokio::test]
async fn holdout_conversations_go_unpruned_and_are_recorded_as_such() {
    let up = mock(llm_reply).await;
    let dir = TempDir::new("holdout");
    let gate = TestConfig::both(&up)
        .set("prune", "hard_token_limit", 4000)
        .set("prune", "holdout_percent", 50.0)
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
        .start()
        .await;
    let ids: Vec<String> = (0..24).map(|i| format!("holdout-{i}")).collect();
    let held: Vec<bool> = ids
        .iter()
        .map(|c| ctxgate::proxy::prune::in_holdout(c, 5000))
        .collect();
    let n_held = held.iter().filter(|h| **h).count();
    assert!(
        (6..=18).contains(&n_held),
        "{n_held} of 24 in a 50% holdout"
    );
    for round in 0..2 {
        for id in &ids {
            let (s, _, _) = send(
                "POST",
                &gate.url("/v1/chat/completions"),
                &[("x-conversation-id", id)],
                SEED,
            )
            .await;
            assert_eq!(s, 200, "{id} round {round}");
        }
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 48);
    for (k, r) in reqs.iter().enumerate() {
        let h = held[k % 24];
        assert_eq!(
            r.body == Bytes::from_static(SEED.as_bytes()),
            h,
            "request {k}: holdout {h}"
        );
    }
    let page = metrics(&gate).await;
    let action = |a: &str| {
        sample(
            &page,
            &format!("ctxgate_prune_actions_total{{action=\"{a}\",route=\"openai\"}}"),
        )
    };
    assert_eq!(action("holdout"), 2.0 * n_held as f64);
    assert_eq!(action("pruned"), 2.0 * (24 - n_held) as f64);
    stop(gate).await;
    let records = jsonl_records(&dir.0);
    assert_eq!(records.len(), 48);
    for r in &records {
        let id = r["conversation_id"].as_str().unwrap();
        let k = ids.iter().position(|i| i == id).unwrap();
        assert_eq!(r["holdout"], held[k], "{id}");
        assert_eq!(
            r["prune_action"],
            if held[k] { "holdout" } else { "pruned" },
            "{id}"
        );
        // A holdout record carries what pruning would have sent.
        assert!(r["tokens_after"].as_u64().unwrap() <= 4000, "{id}");
        assert!(r["tokens_before"].as_u64().unwrap() > 4000, "{id}");
    }
}
