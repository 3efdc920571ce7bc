//! `ctxgate report` end to end, through the real binary: a hand-made transcript set in JSONL
//! files (two days, two routes, holdout and pruned conversations, summary calls, a malformed
//! line, a record from before the newer fields) whose totals are computed by hand below; the
//! same set written into a real PostgreSQL by ctxgate's own sink gives the same report; a
//! table made by an older ctxgate still reads; the HTML page rendered by a real headless
//! Chromium; and a set written by the real proxy in front of the mock upstream, with half
//! the conversations in the holdout and summaries on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use ctxgate::transcript::{Record, Sink, Usage};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ctxgate");

/// One record of the hand-made set; `model` defaults to the route's.
#[derive(Clone, Copy)]
struct Spec {
    ts: &'static str,
    conv: &'static str,
    route: &'static str,
    model: Option<&'static str>,
    kind: &'static str,
    holdout: bool,
    status: u16,
    error: Option<&'static str>,
    latency: f64,
    before: Option<u64>,
    after: Option<u64>,
    input: Option<u64>,
    output: Option<u64>,
    cache: Option<u64>,
    finish: Option<&'static str>,
    cost: Option<f64>,
    unpruned: Option<f64>,
}

const BASE: Spec = Spec {
    ts: "",
    conv: "",
    route: "openai",
    model: None,
    kind: "call",
    holdout: false,
    status: 200,
    error: None,
    latency: 0.0,
    before: None,
    after: None,
    input: None,
    output: None,
    cache: None,
    finish: None,
    cost: None,
    unpruned: None,
};

/// Index of the record written without the newer fields (as an older ctxgate wrote it).
const OLD: usize = 5;

/// The set. Day 1 = 2026-11-05, day 2 = 2026-11-06; `p*`/`a*` pruned conversations, `h*`
/// holdout ones.
const SET: [Spec; 11] = [
    // Day 1.
    Spec {
        ts: "2026-11-05T09:00:00.000Z",
        conv: "p1",
        latency: 100.0,
        before: Some(10_000),
        after: Some(4_000),
        input: Some(4_000),
        output: Some(100),
        cache: Some(3_000),
        finish: Some("stop"),
        cost: Some(0.002),
        unpruned: Some(0.005),
        ..BASE
    },
    Spec {
        ts: "2026-11-05T09:01:00.000Z",
        conv: "p1",
        latency: 200.0,
        before: Some(12_000),
        after: Some(4_000),
        input: Some(4_000),
        output: Some(50),
        cache: Some(3_500),
        finish: Some("tool_calls"),
        cost: Some(0.0015),
        unpruned: Some(0.0045),
        ..BASE
    },
    Spec {
        ts: "2026-11-05T10:00:00.000Z",
        conv: "h1",
        holdout: true,
        latency: 300.0,
        before: Some(11_000),
        after: Some(4_000),
        input: Some(11_000),
        output: Some(120),
        cache: Some(0),
        finish: Some("length"),
        cost: Some(0.006),
        unpruned: Some(0.006),
        ..BASE
    },
    // ctxgate's summary for p1, on a cheaper model: its own row.
    Spec {
        ts: "2026-11-05T09:01:00.500Z",
        conv: "p1",
        model: Some("gpt-4.1-nano"),
        kind: "summary",
        latency: 900.0,
        input: Some(500),
        output: Some(80),
        finish: Some("stop"),
        cost: Some(0.0002),
        ..BASE
    },
    Spec {
        ts: "2026-11-05T11:00:00.000Z",
        conv: "a1",
        route: "anthropic",
        latency: 400.0,
        before: Some(8_000),
        after: Some(8_000),
        input: Some(8_000),
        output: Some(30),
        cache: Some(6_000),
        finish: Some("end_turn"),
        cost: Some(0.01),
        unpruned: Some(0.01),
        ..BASE
    },
    // OLD: written without kind, holdout, finish_reason, summary_tokens, costs.
    Spec {
        ts: "2026-11-05T23:59:59.999Z",
        conv: "old1",
        route: "anthropic",
        latency: 50.0,
        before: Some(5_000),
        after: Some(5_000),
        input: Some(5_000),
        output: Some(10),
        ..BASE
    },
    // Day 2.
    Spec {
        ts: "2026-11-06T08:00:00.000Z",
        conv: "a1",
        route: "anthropic",
        latency: 500.0,
        before: Some(20_000),
        after: Some(9_000),
        input: Some(9_000),
        output: Some(40),
        cache: Some(8_000),
        finish: Some("tool_use"),
        cost: Some(0.008),
        unpruned: Some(0.02),
        ..BASE
    },
    Spec {
        ts: "2026-11-06T08:30:00.000Z",
        conv: "h2",
        route: "anthropic",
        holdout: true,
        latency: 600.0,
        before: Some(15_000),
        after: Some(9_000),
        input: Some(15_000),
        output: Some(60),
        cache: Some(12_000),
        finish: Some("max_tokens"),
        cost: Some(0.03),
        unpruned: Some(0.03),
        ..BASE
    },
    // An upstream failure: no usage, no cost, no finish reason.
    Spec {
        ts: "2026-11-06T12:00:00.000Z",
        conv: "p2",
        status: 502,
        error: Some("upstream_connect"),
        latency: 700.0,
        before: Some(3_000),
        after: Some(3_000),
        ..BASE
    },
    Spec {
        ts: "2026-11-06T13:00:00.000Z",
        conv: "h1",
        holdout: true,
        latency: 800.0,
        before: Some(13_000),
        after: Some(4_000),
        input: Some(13_000),
        output: Some(200),
        cache: Some(11_000),
        finish: Some("stop"),
        cost: Some(0.004),
        unpruned: Some(0.004),
        ..BASE
    },
    Spec {
        ts: "2026-11-06T08:00:01.000Z",
        conv: "a1",
        route: "anthropic",
        kind: "summary",
        latency: 800.0,
        input: Some(900),
        output: Some(90),
        finish: Some("end_turn"),
        cost: Some(0.0005),
        ..BASE
    },
];

fn record(s: &Spec) -> Record {
    let model = s.model.unwrap_or(match s.route {
        "anthropic" => "claude-sonnet-4-5",
        _ => "gpt-4o-mini",
    });
    Record {
        ts: s.ts.into(),
        conversation_id: s.conv.into(),
        route: s.route.into(),
        upstream: s.route.into(),
        model: Some(model.into()),
        status: s.status,
        latency_ms: s.latency,
        ttfb_ms: Some(s.latency / 2.0),
        stream: false,
        tokens_before: s.before,
        tokens_before_exact: true,
        tokens_after: s.after,
        messages_before: s.before.map(|_| 10),
        messages_after: s.after.map(|_| 4),
        files_elided: s.before.map(|_| 0),
        prune_action: if s.before != s.after && !s.holdout {
            "pruned"
        } else {
            "unchanged"
        }
        .into(),
        prune_reason: None,
        usage: Usage {
            input_tokens: s.input,
            output_tokens: s.output,
            cache_read_tokens: s.cache,
            cache_write_tokens: None,
        },
        usage_ratio: None,
        error_kind: s.error.map(Into::into),
        request_messages: None,
        response_text: None,
        kind: s.kind.into(),
        holdout: s.holdout,
        finish_reason: s.finish.map(Into::into),
        summary_tokens: None,
        cost_usd: s.cost,
        cost_unpruned_usd: s.unpruned,
    }
}

fn records() -> Vec<Record> {
    SET.iter().map(record).collect()
}

/// A record as one JSONL line; `OLD` without the fields added for issue 16.
fn line(i: usize, r: &Record) -> String {
    let mut v = serde_json::to_value(r).unwrap();
    if i == OLD {
        let o = v.as_object_mut().unwrap();
        for k in [
            "prune_reason",
            "kind",
            "holdout",
            "finish_reason",
            "summary_tokens",
            "cost_usd",
            "cost_unpruned_usd",
        ] {
            assert!(o.remove(k).is_some(), "{k}");
        }
    }
    v.to_string()
}

/// Writes the set as the `jsonl` sink would: day 1's file, day 2's file (with a malformed
/// line, cut short as by a crash, and a blank one) and day 2's rotated `-1` file.
fn write_jsonl(dir: &Path) {
    let rs = records();
    let lines = |idx: &[usize]| -> String {
        idx.iter()
            .map(|&i| line(i, &rs[i]) + "\n")
            .collect::<String>()
    };
    std::fs::write(
        dir.join("ctxgate-2026-11-05.jsonl"),
        lines(&[0, 1, 2, 3, 4, 5]),
    )
    .unwrap();
    std::fs::write(
        dir.join("ctxgate-2026-11-06.jsonl"),
        lines(&[6, 7])
            + "{\"ts\":\"2026-11-06T09:00:00.000Z\",\"conversation_id\":\"p9\",\"route\":\"op\n\n",
    )
    .unwrap();
    std::fs::write(dir.join("ctxgate-2026-11-06-1.jsonl"), lines(&[8, 9, 10])).unwrap();
}

/// Runs `ctxgate report ARGS…`: exit code, stdout, stderr.
fn report(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("report").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `ctxgate report ARGS… --json`, which must succeed.
fn report_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, err) = report(&a);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The hand-computed figures of the whole set (see `SET`). Token and cost sums cover the
/// calls not in the holdout: #0, #1, #4, #5 (OLD), #6, #8.
fn check_whole_set(r: &Value) {
    let t = &r["totals"];
    assert_eq!(u(&t["calls"]), 9);
    assert_eq!(u(&t["holdout_calls"]), 3);
    assert_eq!(
        u(&t["tokens_before"]),
        10_000 + 12_000 + 8_000 + 5_000 + 20_000 + 3_000
    );
    assert_eq!(
        u(&t["tokens_after"]),
        4_000 + 4_000 + 8_000 + 5_000 + 9_000 + 3_000
    );
    assert_eq!(f(&t["saved_share"]), 1.0 - 33_000.0 / 58_000.0);
    assert_eq!(u(&t["input_tokens"]), 4_000 + 4_000 + 8_000 + 5_000 + 9_000);
    assert_eq!(u(&t["cache_read_tokens"]), 3_000 + 3_500 + 6_000 + 8_000);
    assert_eq!(f(&t["cache_read_share"]), 20_500.0 / 30_000.0);
    assert_eq!(u(&t["priced_calls"]), 4);
    assert_eq!(f(&t["cost_usd"]), 0.0215); // 0.002 + 0.0015 + 0.01 + 0.008
    assert_eq!(f(&t["cost_unpruned_usd"]), 0.0395); // 0.005 + 0.0045 + 0.01 + 0.02
    assert_eq!(f(&t["cost_saved_usd"]), 0.018);
    assert_eq!(u(&t["summary_calls"]), 2);
    assert_eq!(f(&t["summary_cost_usd"]), 0.0007);
    assert_eq!(f(&t["net_saved_usd"]), 0.0173);

    // Rows: (route, model, day) in order; a summary counts under its own model and day.
    let rows: Vec<(String, String, String, u64, u64, u64)> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["route"].as_str().unwrap().to_string(),
                x["model"].as_str().unwrap().to_string(),
                x["day"].as_str().unwrap().to_string(),
                u(&x["calls"]),
                u(&x["holdout_calls"]),
                u(&x["summary_calls"]),
            )
        })
        .collect();
    let row =
        |a: &str, b: &str, c: &str, n, h, s| (a.to_string(), b.to_string(), c.to_string(), n, h, s);
    assert_eq!(
        rows,
        vec![
            row("anthropic", "claude-sonnet-4-5", "2026-11-05", 2, 0, 0),
            row("anthropic", "claude-sonnet-4-5", "2026-11-06", 2, 1, 1),
            row("openai", "gpt-4.1-nano", "2026-11-05", 0, 0, 1),
            row("openai", "gpt-4o-mini", "2026-11-05", 3, 1, 0),
            row("openai", "gpt-4o-mini", "2026-11-06", 2, 1, 0),
        ]
    );
    let oa1 = &r["rows"][3];
    assert_eq!(
        (u(&oa1["tokens_before"]), u(&oa1["tokens_after"])),
        (22_000, 8_000)
    );
    assert_eq!(f(&oa1["cost_saved_usd"]), 0.006);
    assert_eq!(f(&r["rows"][2]["summary_cost_usd"]), 0.0002);

    // Days.
    let days = r["days"].as_array().unwrap();
    assert_eq!(days.len(), 2);
    assert_eq!(days[0]["day"], "2026-11-05");
    assert_eq!(
        (
            u(&days[0]["calls"]),
            u(&days[0]["tokens_before"]),
            u(&days[0]["tokens_after"])
        ),
        (5, 35_000, 21_000)
    );
    assert_eq!(f(&days[0]["cost_saved_usd"]), 0.006);
    assert_eq!(f(&days[0]["cache_read_share"]), 12_500.0 / 21_000.0);
    assert_eq!(
        (
            u(&days[1]["calls"]),
            u(&days[1]["tokens_before"]),
            u(&days[1]["tokens_after"])
        ),
        (4, 23_000, 12_000)
    );
    assert_eq!(f(&days[1]["cost_saved_usd"]), 0.012);
    assert_eq!(f(&days[1]["net_saved_usd"]), 0.0115);

    // Holdout against pruned.
    let p = &r["holdout"]["pruned"];
    assert_eq!((u(&p["calls"]), u(&p["conversations"])), (6, 4)); // p1 a1 old1 p2
    assert_eq!(f(&p["calls_per_conversation"]), 1.5);
    assert_eq!(f(&p["mean_output_tokens"]), 46.0); // (100+50+30+10+40)/5; p2 had no usage
    assert_eq!(f(&p["error_rate"]), 1.0 / 6.0);
    let fr = &p["finish_reasons"];
    assert_eq!(
        ["stop", "length", "tool", "other", "none"].map(|k| f(&fr[k])),
        [2.0 / 6.0, 0.0, 2.0 / 6.0, 0.0, 2.0 / 6.0]
    );
    assert_eq!(f(&p["latency_p50_ms"]), 200.0); // 50 100 [200] 400 500 700
    assert_eq!(f(&p["latency_p95_ms"]), 700.0);
    assert_eq!(f(&p["mean_tokens_sent"]), 33_000.0 / 6.0);
    assert_eq!(f(&p["mean_cost_usd"]), 0.0215 / 4.0);
    let h = &r["holdout"]["holdout"];
    assert_eq!((u(&h["calls"]), u(&h["conversations"])), (3, 2)); // h1 h2
    assert_eq!(f(&h["calls_per_conversation"]), 1.5);
    assert_eq!(f(&h["mean_output_tokens"]), 380.0 / 3.0);
    assert_eq!(f(&h["error_rate"]), 0.0);
    let fr = &h["finish_reasons"];
    assert_eq!(
        ["stop", "length", "tool", "other", "none"].map(|k| f(&fr[k])),
        [1.0 / 3.0, 2.0 / 3.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(f(&h["latency_p50_ms"]), 600.0);
    assert_eq!(f(&h["latency_p95_ms"]), 800.0);
    // Holdout calls went unpruned: what was sent is tokens_before.
    assert_eq!(f(&h["mean_tokens_sent"]), 13_000.0); // (11000+15000+13000)/3
    assert_eq!(
        (u(&h["input_tokens"]), u(&h["cache_read_tokens"])),
        (39_000, 23_000)
    );
    assert_eq!(f(&h["mean_cost_usd"]), 0.04 / 3.0);
}

/// The document without `source` (which says where the records came from).
fn figures_only(mut r: Value) -> Value {
    r.as_object_mut().unwrap().remove("source");
    r
}

#[test]
fn jsonl_report_matches_the_hand_computed_figures() {
    let dir = TempDir::new("report-jsonl");
    write_jsonl(dir.path());
    let d = dir.path().to_str().unwrap();

    let r = report_json(&[d]);
    assert_eq!(r["version"], 1);
    assert_eq!(
        r["source"],
        serde_json::json!({"kind": "jsonl", "files": 3, "records": 11, "malformed_lines": 1, "matched": 11, "other_kinds": 0})
    );
    assert_eq!(
        r["filter"],
        serde_json::json!({"since": null, "until": null, "route": null})
    );
    check_whole_set(&r);

    // The malformed line is named on stderr, and the table says it was skipped.
    let (code, table, err) = report(&[d]);
    assert_eq!(code, 0);
    assert!(
        err.contains("skipped 1 line(s) that are not transcript records")
            && err.contains("ctxgate-2026-11-06.jsonl:3"),
        "{err}"
    );
    assert!(table.contains("1 malformed line skipped"), "{table}");
    let totals: Vec<&str> = table.lines().filter(|l| l.starts_with("total")).collect();
    assert_eq!(totals.len(), 2, "{table}");
    assert!(
        totals[0].split_whitespace().collect::<Vec<_>>()
            == ["total", "9", "3", "58,000", "33,000", "43.1%", "30,000", "20,500", "68.3%"],
        "{table}"
    );
    assert!(
        totals[1].split_whitespace().collect::<Vec<_>>()
            == ["total", "4", "$0.0215", "$0.0395", "$0.0180", "2", "$0.0007", "$0.0173"],
        "{table}"
    );
    // Aligned: every line of the first table is as wide as its rule at most.
    let rule = table.lines().find(|l| l.starts_with("---")).unwrap().len();
    assert!(table
        .lines()
        .skip_while(|l| !l.starts_with("route"))
        .take_while(|l| !l.is_empty())
        .all(|l| l.len() <= rule));

    // One file alone.
    let one = dir.path().join("ctxgate-2026-11-06-1.jsonl");
    let r1 = report_json(&[one.to_str().unwrap()]);
    assert_eq!(u(&r1["totals"]["calls"]), 2);
    assert_eq!(u(&r1["source"]["files"]), 1);

    // Filters: the day-1 file is not even read for --since day 2.
    let r2 = report_json(&[d, "--since", "2026-11-06"]);
    assert_eq!(u(&r2["source"]["files"]), 2);
    assert_eq!(
        (u(&r2["totals"]["calls"]), u(&r2["totals"]["summary_calls"])),
        (4, 1)
    );
    assert_eq!(f(&r2["totals"]["cost_saved_usd"]), 0.012);
    let r3 = report_json(&[d, "--until", "2026-11-05", "--route", "anthropic"]);
    assert_eq!(
        (u(&r3["totals"]["calls"]), u(&r3["totals"]["tokens_before"])),
        (2, 13_000)
    );
    assert_eq!(r3["filter"]["route"], "anthropic");
    let r4 = report_json(&[d, "--route", "nope"]);
    assert_eq!(u(&r4["totals"]["calls"]), 0);
    assert!(r4["totals"]["saved_share"].is_null());
    assert!(r4["holdout"]["pruned"]["latency_p50_ms"].is_null());
}

#[test]
fn bad_arguments_exit_64_and_unreadable_sources_66() {
    let dir = TempDir::new("report-args");
    write_jsonl(dir.path());
    let d = dir.path().to_str().unwrap();
    for args in [
        vec![d, "--since", "2026-11-31"],
        vec![d, "--until", "yesterday"],
        vec![d, "--since", "2026-11-06", "--until", "2026-11-05"],
        vec![d, "--colour"],
        vec![],
    ] {
        let (code, out, err) = report(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}");
    }
    let (code, _, err) = report(&[d, "--since", "2026-11-06", "--until", "2026-11-05"]);
    assert_eq!(code, 64);
    assert!(
        err.contains("--since 2026-11-06 is after --until 2026-11-05"),
        "{err}"
    );

    let empty = TempDir::new("report-empty");
    let missing = empty.path().join("nope");
    for (src, says) in [
        (empty.path().to_str().unwrap(), "no transcript files"),
        (missing.to_str().unwrap(), "cannot read"),
    ] {
        let (code, out, err) = report(&[src]);
        assert_eq!(code, 66, "{src}: {err}");
        assert!(out.is_empty());
        assert!(err.contains(says), "{err}");
    }

    // Nothing listens on port 1: the URL is shown with its passwords masked.
    for url in [
        "postgres://reporter:pa55word-XYZ@127.0.0.1:1/db",
        "postgresql://127.0.0.1:1/db?user=reporter&password=pa55word-XYZ",
    ] {
        let (code, _, err) = report(&[url, "--json"]);
        assert_eq!(code, 66, "{err}");
        assert!(err.contains("cannot connect to postgres"), "{err}");
        assert!(!err.contains("pa55word"), "the password leaked: {err}");
    }
    let (code, _, err) = report(&["postgres://reporter:pa55word-XYZ@127.0.0.1:1/db?sslmode=bogus"]);
    assert_eq!(code, 66);
    assert!(!err.contains("pa55word"), "{err}");

    // An unwritable page: 73, and nothing half-done on stdout.
    let (code, out, err) = report(&[d, "--html", "/nonexistent-dir/report.html"]);
    assert_eq!(code, 73, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("--html"), "{err}");
}

/// Writes `records` into PostgreSQL through ctxgate's own sink.
async fn insert(url: &str, records: &[Record]) {
    let (config, redactor) =
        ctxgate::transcript::sink::postgres::parse_url(&ctxgate::config::Secret::new(url)).unwrap();
    let mut sink = ctxgate::transcript::sink::postgres::PostgresSink::new(config, redactor);
    sink.write(records).await.unwrap();
}

async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test]
async fn postgres_report_equals_the_jsonl_report() {
    let server = pg::PgServer::start();
    let url = server.url();
    // The OLD record goes in as the sink writes it today: kind "call", holdout false, no
    // costs — what its JSONL line reads as.
    insert(&url, &records()).await;
    let dir = TempDir::new("report-pg");
    write_jsonl(dir.path());
    let d = dir.path().to_str().unwrap();

    let from_pg = report_json(&[&url]);
    assert_eq!(
        from_pg["source"],
        serde_json::json!({"kind": "postgres", "files": null, "records": 11, "malformed_lines": 0, "matched": 11, "other_kinds": 0})
    );
    check_whole_set(&from_pg);
    assert_eq!(figures_only(from_pg), figures_only(report_json(&[d])));
    for filter in [
        vec!["--since", "2026-11-06"],
        vec!["--until", "2026-11-05"],
        vec![
            "--route",
            "anthropic",
            "--since",
            "2026-11-05",
            "--until",
            "2026-11-05",
        ],
    ] {
        let mut a = vec![url.as_str()];
        a.extend(&filter);
        let mut b = vec![d];
        b.extend(&filter);
        let pg = report_json(&a);
        assert!(u(&pg["source"]["records"]) < 11, "the filter ran in SQL");
        assert_eq!(
            figures_only(pg),
            figures_only(report_json(&b)),
            "{filter:?}"
        );
    }

    // A table made by an older ctxgate, before kind, holdout, finish_reason, summary_tokens,
    // costs (and prune_reason): its rows read as client calls outside the holdout.
    let admin = pg_client(&url).await;
    admin.batch_execute("CREATE DATABASE legacy").await.unwrap();
    let db = |name: &str| format!("{}/{name}", url.strip_suffix("/postgres").unwrap());
    let legacy_url = db("legacy");
    let legacy = pg_client(&legacy_url).await;
    legacy
        .batch_execute(
            "CREATE TABLE ctxgate_transcripts (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                ts timestamptz NOT NULL, conversation_id text NOT NULL, route text NOT NULL,
                upstream text NOT NULL, model text, status integer NOT NULL,
                latency_ms double precision NOT NULL, ttfb_ms double precision,
                stream boolean NOT NULL, tokens_before bigint,
                tokens_before_exact boolean NOT NULL, tokens_after bigint,
                messages_before bigint, messages_after bigint, files_elided bigint,
                prune_action text NOT NULL, input_tokens bigint, output_tokens bigint,
                cache_read_tokens bigint, cache_write_tokens bigint,
                usage_ratio double precision, error_kind text, request_messages jsonb,
                response_text text);
             INSERT INTO ctxgate_transcripts (ts, conversation_id, route, upstream, model,
                status, latency_ms, stream, tokens_before, tokens_before_exact, tokens_after,
                prune_action, input_tokens, output_tokens, cache_read_tokens)
             VALUES ('2026-10-01T10:00:00Z', 'x', 'openai', 'u', 'gpt-4o', 200, 10, false,
                     1000, true, 400, 'pruned', 400, 7, 100),
                    ('2026-10-02T10:00:00Z', 'x', 'openai', 'u', 'gpt-4o', 504, 20, false,
                     2000, true, 500, 'pruned', NULL, NULL, NULL);",
        )
        .await
        .unwrap();
    let old = report_json(&[&legacy_url]);
    let t = &old["totals"];
    assert_eq!(
        (
            u(&t["calls"]),
            u(&t["holdout_calls"]),
            u(&t["priced_calls"])
        ),
        (2, 0, 0)
    );
    assert_eq!((u(&t["tokens_before"]), u(&t["tokens_after"])), (3000, 900));
    assert_eq!(f(&t["cache_read_share"]), 0.25);
    assert_eq!(f(&old["holdout"]["pruned"]["error_rate"]), 0.5);
    assert_eq!(u(&old["holdout"]["holdout"]["calls"]), 0);
    assert_eq!(old["rows"].as_array().unwrap().len(), 2);

    // A database without the table: 66, saying so.
    admin.batch_execute("CREATE DATABASE empty").await.unwrap();
    let (code, _, err) = report(&[&db("empty")]);
    assert_eq!(code, 66);
    assert!(err.contains("no table ctxgate_transcripts"), "{err}");
}

/// Where tests leave files for people to look at: `target/test-output/`.
fn test_output() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless Chromium (`scripts/ensure-chromium` installs it) with a fresh profile on
/// `args`, for at most 60 s; its stdout.
async fn chromium(args: &[&str]) -> String {
    let exe = "/usr/bin/chromium";
    assert!(
        Path::new(exe).exists(),
        "{exe} not found: run scripts/ensure-chromium"
    );
    let profile = TempDir::new("chromium-profile");
    let child = tokio::process::Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("chromium finishes within 60 s")
        .unwrap();
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn html_page_renders_its_charts_in_chromium() {
    let dir = TempDir::new("report-html");
    write_jsonl(dir.path());
    let out = test_output();
    let page = out.join("report.html");
    let shot = out.join("report.png");
    let _ = std::fs::remove_file(&shot);
    let (code, _, err) = report(&[
        dir.path().to_str().unwrap(),
        "--html",
        page.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let html = std::fs::read_to_string(&page).unwrap();
    for outside in ["http:", "https:", "<script", "<link", "<img", "url("] {
        assert!(!html.contains(outside), "self-contained: found {outside}");
    }

    let url = format!("file://{}", page.display());
    chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1280,2600",
        &url,
    ])
    .await;
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a real screenshot"
    );

    let dom = chromium(&["--dump-dom", &url]).await;
    // Four charts: tokens (2 days × before/after), cost saved (2 days), cache-read share
    // (2 days), holdout vs pruned (6 measures × 2 groups).
    assert_eq!(dom.matches("<svg").count(), 4, "{dom}");
    assert_eq!(dom.matches(r#"class="bar before""#).count(), 2);
    assert_eq!(dom.matches(r#"class="bar after""#).count(), 2);
    assert_eq!(dom.matches(r#"class="bar saved""#).count(), 2);
    assert_eq!(dom.matches(r#"class="bar cache""#).count(), 2);
    assert_eq!(dom.matches(r#"class="bar pruned""#).count(), 6);
    assert_eq!(dom.matches(r#"class="bar holdout""#).count(), 6);
    assert!(
        dom.contains("<title>2026-11-05: before 35,000</title>"),
        "{dom}"
    );
    assert!(
        dom.contains("<title>2026-11-06: saved $0.0120</title>"),
        "{dom}"
    );
    // The totals: headline figures and the tables' total rows.
    for text in [
        "25,000",
        "43.1% of 58,000 before pruning",
        "$0.0180",
        "$0.0173",
        "68.3%",
    ] {
        assert!(dom.contains(text), "{text} missing");
    }
    assert_eq!(dom.matches(r#"<tr class="total">"#).count(), 2);
    assert!(dom.contains("Holdout vs pruned"));
}

/// The summariser's model: its calls are ctxgate's own (`kind = "summary"`).
const SUMMARISER: &str = "summariser-1";

/// The mock: summary requests get a summary with a fixed usage (counted in `n`); every other
/// request the usual answer (`llm_reply`: OpenAI usage 21 in, 8 cached, 5 out; Anthropic 39
/// in, 13 cached, 5 out, or 3 when streamed).
fn summariser(
    n: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    move |r: &Recorded| {
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
        if v["model"] != SUMMARISER {
            return llm_reply(r);
        }
        let k = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        Reply::json(
            &serde_json::json!({
                "id": format!("chatcmpl-s{k}"), "object": "chat.completion", "model": SUMMARISER,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("SUMMARY #{k}")}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050},
            })
            .to_string(),
        )
    }
}

/// Sends `turns` turns of the agent conversation (two calls each) to the OpenAI route.
async fn converse(gate: &Gate, conv: &str, turns: usize) -> usize {
    let mut history =
        vec![serde_json::json!({"role": "system", "content": "You are a careful coding agent."})];
    let mut sent = 0;
    for i in 0..turns {
        let [task, call, result, answer] = agent_turn(i);
        for step in [vec![task], vec![call, result]] {
            history.extend(step);
            let body = serde_json::json!({"model": "gpt-4o", "messages": history}).to_string();
            let (s, _, _) = send(
                "POST",
                &gate.url("/v1/chat/completions"),
                // The summary call goes with the client's own credentials: it needs some.
                &[
                    ("x-conversation-id", conv),
                    ("authorization", "Bearer sk-client-key"),
                ],
                &body,
            )
            .await;
            assert_eq!(s, 200);
            sent += 1;
        }
        history.push(answer);
    }
    sent
}

/// Picodollars, as the report sums them.
fn pico(usd: f64) -> i128 {
    (usd * 1e12).round() as i128
}

/// The real proxy writes the records: the report's call counts, token sums and holdout
/// sample sizes must be what the clients sent, what the records hold and what the mock's
/// usage says. Costs are checked against whatever the records carry: summary calls are
/// priced today; client calls are priced once the cost filling lands, and this test holds
/// either way.
#[tokio::test]
async fn report_of_a_proxy_run_matches_its_records() {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let up = mock(summariser(n.clone())).await;
    let dir = TempDir::new("report-proxy");
    let gate = TestConfig::new()
        .route("anthropic", "/anthropic/", &up.url(), "anthropic")
        .route("openai", "/v1/", &format!("{}v1/", up.url()), "openai")
        .set_route(
            "prune",
            "models",
            serde_json::json!([{"match": "summariser-*", "hard_token_limit": 100000}]),
        )
        .set("prune", "hard_token_limit", 4000)
        // Files are never elided, so each cut move drops whole turns: something to summarise.
        .set("prune", "keep_file_content_turns", 100)
        .set("prune", "holdout_percent", 50.0)
        .set("prune.summary", "enabled", true)
        .set("prune.summary", "model", SUMMARISER)
        .set("prune.summary", "min_dropped_tokens", 1)
        .set(
            "",
            "prices",
            serde_json::json!([{"match": "summariser-*", "input": 1.0, "output": 2.0}]),
        )
        .set("transcripts", "sink", "jsonl")
        .set("transcripts", "dir", dir.0.display().to_string())
        .start()
        .await;

    // Four agent conversations on the OpenAI route, two small ones on the Anthropic route,
    // named so that the holdout hash puts half of each in (the hash is fixed: this holds on
    // every run).
    let held = |c: &str| ctxgate::proxy::prune::in_holdout(c, 5000);
    let agents = ["agent-a", "agent-b", "agent-e", "agent-h"];
    let chats = ["chat-1", "chat-3"];
    let held_agents = agents.iter().filter(|c| held(c)).count();
    assert_eq!(held_agents, 2, "agent-e and agent-h are held");
    assert_eq!(
        chats.iter().filter(|c| held(c)).count(),
        1,
        "chat-3 is held"
    );
    let mut sent = std::collections::HashMap::new();
    for c in agents {
        sent.insert(c, converse(&gate, c, 10).await);
    }
    for c in chats {
        for stream in [false, true] {
            let body = serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).to_string();
            let (s, _, _) = send(
                "POST",
                &gate.url("/anthropic/v1/messages"),
                &[("x-conversation-id", c)],
                &body,
            )
            .await;
            assert_eq!(s, 200);
        }
        sent.insert(c, 2);
    }
    // Summary calls run in the background; shutdown waits for those in flight and their
    // records.
    stop(gate).await;
    let summaries = n.load(std::sync::atomic::Ordering::SeqCst);
    assert!(summaries > 0, "the pruned agents' cuts were summarised");

    let r = report_json(&[dir.path().to_str().unwrap()]);
    let records = jsonl_records(dir.path());
    assert_eq!(u(&r["source"]["records"]), records.len() as u64);
    assert_eq!(u(&r["source"]["malformed_lines"]), 0);
    let calls: Vec<&Value> = records.iter().filter(|x| x["kind"] == "call").collect();
    let pruned: Vec<&Value> = calls
        .iter()
        .copied()
        .filter(|x| x["holdout"] == false)
        .collect();
    let held_calls: usize = sent.iter().filter(|(c, _)| held(c)).map(|(_, k)| k).sum();
    let all_calls: usize = sent.values().sum();

    // Calls: every call the clients made, and the holdout's by the hash of their conversation.
    let t = &r["totals"];
    assert_eq!(u(&t["calls"]), all_calls as u64);
    assert_eq!(calls.len(), all_calls);
    assert_eq!(u(&t["holdout_calls"]), held_calls as u64);
    assert_eq!(calls.len() - pruned.len(), held_calls);

    // Tokens: the sums over the records of the calls pruning applied to, and the mock's
    // usage for those calls (OpenAI 21 in / 8 cached; Anthropic 39 in / 13 cached).
    let sum = |rs: &[&Value], f: &dyn Fn(&Value) -> &Value| -> u64 {
        rs.iter().filter_map(|x| f(x).as_u64()).sum()
    };
    assert_eq!(
        u(&t["tokens_before"]),
        sum(&pruned, &|x| &x["tokens_before"])
    );
    assert_eq!(u(&t["tokens_after"]), sum(&pruned, &|x| &x["tokens_after"]));
    assert!(
        u(&t["tokens_after"]) < u(&t["tokens_before"]),
        "something was pruned"
    );
    let pruned_oa = pruned.iter().filter(|x| x["route"] == "openai").count() as u64;
    let pruned_an = pruned.len() as u64 - pruned_oa;
    assert_eq!(u(&t["input_tokens"]), 21 * pruned_oa + 39 * pruned_an);
    assert_eq!(
        u(&t["input_tokens"]),
        sum(&pruned, &|x| &x["usage"]["input_tokens"])
    );
    assert_eq!(u(&t["cache_read_tokens"]), 8 * pruned_oa + 13 * pruned_an);

    // Costs: whatever the records carry (summaries: 1000 in at $1/M + 50 out at $2/M each).
    let priced: Vec<f64> = pruned
        .iter()
        .filter_map(|x| x["cost_usd"].as_f64())
        .collect();
    assert_eq!(u(&t["priced_calls"]), priced.len() as u64);
    assert_eq!(
        pico(f(&t["cost_usd"])),
        priced.iter().map(|c| pico(*c)).sum::<i128>()
    );
    assert_eq!(u(&t["summary_calls"]), summaries as u64);
    assert_eq!(
        records.iter().filter(|x| x["kind"] == "summary").count(),
        summaries
    );
    assert_eq!(
        pico(f(&t["summary_cost_usd"])),
        summaries as i128 * 1_100_000_000
    );

    // Rows: one per route and model today; the summaries under their own model.
    let rows = r["rows"].as_array().unwrap();
    let keys: Vec<(&str, &str)> = rows
        .iter()
        .map(|x| (x["route"].as_str().unwrap(), x["model"].as_str().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            ("anthropic", "claude-sonnet-4-5"),
            ("openai", "gpt-4o"),
            ("openai", SUMMARISER)
        ]
    );
    assert_eq!(u(&rows[2]["summary_calls"]), summaries as u64);
    assert_eq!(u(&rows[2]["calls"]), 0);

    // Holdout against pruned: sample sizes by the hash.
    let group = |h: bool| {
        (
            sent.iter()
                .filter(|(c, _)| held(c) == h)
                .map(|(_, k)| *k as u64)
                .sum::<u64>(),
            sent.keys().filter(|c| held(c) == h).count() as u64,
        )
    };
    let (p, h) = (&r["holdout"]["pruned"], &r["holdout"]["holdout"]);
    assert_eq!((u(&p["calls"]), u(&p["conversations"])), group(false));
    assert_eq!((u(&h["calls"]), u(&h["conversations"])), group(true));
    assert_eq!(f(&p["error_rate"]), 0.0);
    // Output tokens from the mock: 5 a call, 3 for a streamed Anthropic answer.
    let out = |h: bool| {
        let streamed = chats.iter().filter(|c| held(c) == h).count() as f64;
        let (calls, _) = group(h);
        (5.0 * calls as f64 - 2.0 * streamed) / calls as f64
    };
    assert_eq!(f(&p["mean_output_tokens"]), out(false));
    assert_eq!(f(&h["mean_output_tokens"]), out(true));
    // A holdout call went as it came: what it sent is its tokens_before.
    let held_records: Vec<&Value> = calls
        .iter()
        .copied()
        .filter(|x| x["holdout"] == true)
        .collect();
    assert_eq!(
        f(&h["mean_tokens_sent"]),
        sum(&held_records, &|x| &x["tokens_before"]) as f64 / held_records.len() as f64
    );
}
