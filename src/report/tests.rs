//! Tests of the report's pure parts: days, the filter, sums, percentiles, finish classes,
//! JSONL lines, the SQL for older tables, masking, number formats and the page's escaping.
//! Whole reports from real files, a real PostgreSQL and the real proxy are in
//! `tests/report.rs`.

use std::time::{Duration, SystemTime};

use super::load::{parse_line, select_sql, shown_url};
use super::text::{int, money, pct};
use super::*;
use crate::secret::Secret;

fn day(s: &str) -> Day {
    match s.parse() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

fn entry(d: &str, route: &str) -> Entry {
    Entry {
        day: day(d),
        conversation_id: "c".into(),
        route: route.into(),
        model: Some("m".into()),
        status: 200,
        latency_ms: 1.0,
        tokens_before: Some(100),
        tokens_after: Some(40),
        input_tokens: Some(40),
        output_tokens: Some(5),
        cache_read_tokens: Some(10),
        error_kind: None,
        kind: "call".into(),
        holdout: false,
        finish_reason: Some("stop".into()),
        cost_usd: Some(0.1),
        cost_unpruned_usd: Some(0.3),
    }
}

#[test]
fn days_parse_strictly_and_know_their_midnight() {
    assert_eq!(day("2024-02-29").as_str(), "2024-02-29");
    for bad in [
        "2023-02-29",
        "2026-13-01",
        "2026-00-10",
        "2026-1-01",
        "26-01-01",
        "1969-12-31",
        "2026-01-32",
        "2026/01/01",
        "２026-01-01",
    ] {
        assert!(bad.parse::<Day>().is_err(), "{bad}");
    }
    assert_eq!(day("1970-01-01").start(), SystemTime::UNIX_EPOCH);
    let d = day("2026-11-05");
    assert_eq!(
        humantime::format_rfc3339_seconds(d.start()).to_string(),
        "2026-11-05T00:00:00Z"
    );
    assert_eq!(d.end() - Duration::from_secs(1), {
        let t = humantime::parse_rfc3339("2026-11-05T23:59:59Z");
        t.unwrap_or(SystemTime::UNIX_EPOCH)
    });
    assert_eq!(Day::of(d.start()), d);
    assert_eq!(Day::of(d.end() - Duration::from_millis(1)), d);
}

#[test]
fn the_filter_takes_inclusive_days_and_one_route() {
    let f = Filter {
        since: Some(day("2026-11-05")),
        until: Some(day("2026-11-06")),
        route: Some("a".into()),
    };
    assert!(f.admits(&day("2026-11-05"), "a"));
    assert!(f.admits(&day("2026-11-06"), "a"));
    assert!(!f.admits(&day("2026-11-04"), "a"));
    assert!(!f.admits(&day("2026-11-07"), "a"));
    assert!(!f.admits(&day("2026-11-05"), "b"));
    assert!(Filter::default().admits(&day("2026-11-05"), "b"));
}

#[test]
fn nearest_rank_percentiles() {
    assert_eq!(percentile(&[], 0.5), None);
    assert_eq!(percentile(&[7.0], 0.95), Some(7.0));
    let v: Vec<f64> = (1..=20).map(f64::from).collect();
    assert_eq!(percentile(&v, 0.5), Some(10.0));
    assert_eq!(percentile(&v, 0.95), Some(19.0));
    assert_eq!(percentile(&v, 1.0), Some(20.0));
}

#[test]
fn finish_reasons_of_every_dialect_fall_in_their_class() {
    for (r, f) in [
        ("stop", Finish::Stop),
        ("end_turn", Finish::Stop),
        ("completed", Finish::Stop),
        ("length", Finish::Length),
        ("max_tokens", Finish::Length),
        ("max_output_tokens", Finish::Length),
        ("incomplete", Finish::Length),
        ("tool_calls", Finish::Tool),
        ("tool_use", Finish::Tool),
        ("content_filter", Finish::Other),
        ("refusal", Finish::Other),
    ] {
        assert_eq!(Finish::of(Some(r)), f, "{r}");
    }
    assert_eq!(Finish::of(None), Finish::None);
}

#[test]
fn sums_do_not_depend_on_the_order_records_come_in() {
    let costs = [0.1, 0.2, 0.3, 1e-7, 12.345678, 0.000_003];
    let run = |order: &[usize]| {
        let mut t = Tally::new(Filter::default());
        for &i in order {
            let mut e = entry("2026-11-05", "a");
            e.cost_usd = Some(costs[i]);
            e.latency_ms = costs[i];
            t.add(&e);
        }
        Report::new(t, &Scan::default())
    };
    let a = run(&[0, 1, 2, 3, 4, 5]);
    let b = run(&[5, 3, 1, 4, 0, 2]);
    assert_eq!(a, b);
    assert_eq!(a.totals.cost_usd, 12.9456811);
    assert_eq!(a.totals.cost_unpruned_usd, 1.8);
}

#[test]
fn holdout_calls_are_counted_not_summed_and_summaries_stand_apart() {
    let mut t = Tally::new(Filter::default());
    t.add(&entry("2026-11-05", "a"));
    let mut h = entry("2026-11-05", "a");
    h.holdout = true;
    h.conversation_id = "h".into();
    t.add(&h);
    let mut s = entry("2026-11-06", "a");
    s.kind = "summary".into();
    s.cost_usd = Some(0.05);
    t.add(&s);
    let mut odd = entry("2026-11-06", "a");
    odd.kind = "future".into();
    t.add(&odd);
    let r = Report::new(t, &Scan::default());
    let f = &r.totals;
    assert_eq!((f.calls, f.holdout_calls, f.summary_calls), (2, 1, 1));
    assert_eq!((f.tokens_before, f.tokens_after), (100, 40));
    assert_eq!(f.saved_share, Some(1.0 - 40.0 / 100.0));
    assert_eq!(f.cache_read_share, Some(0.25));
    assert_eq!(f.cost_saved_usd, 0.2);
    assert_eq!(f.net_saved_usd, 0.15);
    assert_eq!((r.source.matched, r.source.other_kinds), (4, 1));
    assert_eq!(r.rows.len(), 2, "one row per day");
    assert_eq!(r.rows[1].figures.calls, 0, "the summary's own row");
    assert_eq!(r.holdout.holdout.calls, 1);
    assert_eq!(
        r.holdout.holdout.mean_tokens_sent,
        Some(100.0),
        "sent unpruned"
    );
    assert_eq!(r.holdout.pruned.mean_tokens_sent, Some(40.0));
}

#[test]
fn a_jsonl_line_from_before_the_new_fields_reads_with_defaults() {
    let old = br#"{"ts":"2026-11-05T23:59:59.999Z","conversation_id":"c","route":"r","upstream":"u","model":null,"status":200,"latency_ms":3.5,"ttfb_ms":null,"stream":false,"tokens_before":10,"tokens_before_exact":true,"tokens_after":8,"messages_before":1,"messages_after":1,"files_elided":0,"prune_action":"pruned","usage":{"input_tokens":8,"output_tokens":2,"cache_read_tokens":null,"cache_write_tokens":null},"usage_ratio":1.0,"error_kind":null,"request_messages":[{"role":"user","content":"hi"}],"response_text":null}"#;
    let e = parse_line(old);
    let Some(e) = e else {
        panic!("an old record is a record")
    };
    assert_eq!(e.day.as_str(), "2026-11-05");
    assert_eq!((e.kind.as_str(), e.holdout), ("call", false));
    assert_eq!((e.cost_usd, e.finish_reason), (None, None));
    assert_eq!((e.input_tokens, e.output_tokens), (Some(8), Some(2)));
    for bad in [
        &b"{\"ts\":\"2026-11-05T00:00:00Z\",\"route\":\"r\"}"[..],
        b"not json",
        b"{\"ts\":\"yesterday\",\"conversation_id\":\"c\",\"route\":\"r\",\"status\":200,\"latency_ms\":1}",
        b"\xff\xfe",
        b"[]",
    ] {
        assert!(parse_line(bad).is_none(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn columns_an_older_table_lacks_read_as_typed_nulls() {
    let present: Vec<String> = ["ts", "route", "kind"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let sql = select_sql(&present);
    assert!(
        sql.starts_with("SELECT ts, NULL::text AS conversation_id, route,"),
        "{sql}"
    );
    assert!(sql.contains(" kind, NULL::boolean AS holdout,"), "{sql}");
    assert!(
        sql.contains("NULL::double precision AS cost_unpruned_usd FROM"),
        "{sql}"
    );
}

#[test]
fn urls_in_messages_hide_passwords_and_queries() {
    let s = |u: &str| shown_url(&Secret::new(u));
    assert_eq!(
        s("postgres://app:hunter22@db:5432/x"),
        "postgres://app:*****@db:5432/x"
    );
    assert_eq!(
        s("postgresql://db/x?user=a&password=hunter22"),
        "postgresql://db/x?…"
    );
    assert_eq!(s("postgres://db/x"), "postgres://db/x");
}

#[test]
fn numbers_print_for_people() {
    assert_eq!(int(0), "0");
    assert_eq!(int(999), "999");
    assert_eq!(int(1000), "1,000");
    assert_eq!(int(1_234_567), "1,234,567");
    assert_eq!(pct(Some(0.43103)), "43.1%");
    assert_eq!(pct(None), "-");
    assert_eq!(money(0.0215), "$0.0215");
    assert_eq!(money(-0.001), "-$0.0010");
    assert_eq!(money(-0.00001), "$0.0000");
}

#[test]
fn the_page_escapes_names_and_needs_nothing_from_outside() {
    let mut t = Tally::new(Filter::default());
    t.add(&entry("2026-11-05", "<script>alert(1)</script>"));
    let page = html::render(&Report::new(t, &Scan::default()));
    assert!(!page.contains("<script"), "route names are escaped");
    assert!(page.contains("&lt;script&gt;"));
    for outside in ["http://", "https://", "src=", "@import", "url("] {
        assert!(!page.contains(outside), "{outside}");
    }
    assert_eq!(page.matches("<svg").count(), 4);
}
