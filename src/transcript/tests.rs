//! Tests for the transcript queue, writer and sinks, including a real PostgreSQL server.
//!
//! Queue and writer tests use test sinks and tokio's paused clock; JSONL tests use temporary
//! directories; the PostgreSQL test starts its own server from Debian's binaries
//! (`scripts/ensure-postgres` installs them) in a temporary data directory on a free port.

use crate::secret::Secret;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::Registry;

use super::metrics::reason;
use super::sink::jsonl::{file_name, utc_day, JsonlSink};
use super::sink::{Discard, Sink, SinkError};
use super::writer::Tuning;
use super::*;

#[path = "../../tests/common/temp.rs"]
mod temp;
use temp::TempDir;
#[path = "../../tests/common/pg.rs"]
mod pg;
use pg::PgServer;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A record whose every field depends on `i`, so a mix-up shows.
fn rec(i: usize) -> Record {
    let odd = i % 2 == 1;
    Record {
        ts: format_ts(
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_794_000_000_000 + i as u64 * 1001),
        ),
        conversation_id: format!("conv-{i}"),
        route: "openai".into(),
        upstream: "mock".into(),
        model: odd.then(|| "gpt-4o".to_string()),
        status: if odd { 200 } else { 502 },
        latency_ms: 10.5 + i as f64,
        ttfb_ms: odd.then_some(3.25),
        stream: odd,
        tokens_before: Some(1000 + i as u64),
        tokens_before_exact: odd,
        tokens_after: Some(900 + i as u64),
        messages_before: Some(12),
        messages_after: odd.then_some(8),
        files_elided: Some(i as u64 % 3),
        prune_action: if odd { "pruned" } else { "skipped" }.into(),
        prune_reason: (!odd).then(|| "previous_response_id".to_string()),
        usage: Usage {
            input_tokens: Some(880 + i as u64),
            output_tokens: Some(42),
            cache_read_tokens: odd.then_some(512),
            cache_write_tokens: None,
        },
        usage_ratio: Some(0.9775),
        error_kind: (!odd).then(|| "upstream_refused".to_string()),
        request_messages: odd
            .then(|| serde_json::json!([{"role": "user", "content": format!("hello {i}")}])),
        response_text: odd.then(|| format!("answer {i}")),
        kind: if i % 3 == 0 { "summary" } else { "call" }.into(),
        holdout: i % 4 == 2,
        finish_reason: odd.then(|| "stop".to_string()),
        summary_tokens: (i % 5 == 0).then_some(i as u64),
        cost_usd: odd.then_some(0.0125 + i as f64),
        cost_unpruned_usd: odd.then_some(0.5 + i as f64),
    }
}

fn format_ts(t: SystemTime) -> String {
    record::format_ts(t)
}

fn ids(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r.conversation_id.clone()).collect()
}

fn id_range(r: std::ops::Range<usize>) -> Vec<String> {
    r.map(|i| format!("conv-{i}")).collect()
}

fn metrics() -> TranscriptMetrics {
    TranscriptMetrics::register(&Registry::new())
}

fn settings(capacity: usize, batch: usize, flush: Duration) -> Settings {
    Settings {
        queue_capacity: capacity,
        batch_size: batch,
        flush_interval: flush,
        ..Settings::default()
    }
}

fn fast() -> Tuning {
    Tuning {
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

fn written(m: &TranscriptMetrics, sink: &str) -> u64 {
    m.written.with_label_values(&[sink]).get()
}

fn dropped(m: &TranscriptMetrics, sink: &str, why: &str) -> u64 {
    m.dropped.with_label_values(&[sink, why]).get()
}

fn failures(m: &TranscriptMetrics, sink: &str) -> u64 {
    m.write_failures.with_label_values(&[sink]).get()
}

/// Polls `cond` every 5 ms (tokio time, so it also works with a paused clock), failing the
/// test after `limit`.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A test sink: stores what it is given, can fail a number of times, can block until released.
#[derive(Clone)]
struct TestSink {
    got: Arc<Mutex<Vec<Record>>>,
    /// Failures still to return; `usize::MAX` fails until changed.
    fail: Arc<AtomicUsize>,
    /// Write attempts begun.
    calls: Arc<AtomicUsize>,
    /// When set, writes wait until it holds `true`.
    gate: Option<tokio::sync::watch::Receiver<bool>>,
}

impl TestSink {
    fn new() -> TestSink {
        TestSink {
            got: Arc::default(),
            fail: Arc::new(AtomicUsize::new(0)),
            calls: Arc::default(),
            gate: None,
        }
    }

    fn got(&self) -> Vec<Record> {
        self.got.lock().unwrap().clone()
    }
}

impl Sink for TestSink {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn write(&mut self, batch: &[Record]) -> Result<(), SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &mut self.gate {
            gate.wait_for(|open| *open).await.unwrap();
        }
        let left = self.fail.load(Ordering::SeqCst);
        if left > 0 {
            if left != usize::MAX {
                self.fail.store(left - 1, Ordering::SeqCst);
            }
            return Err(SinkError::Postgres("test failure".into()));
        }
        self.got.lock().unwrap().extend_from_slice(batch);
        Ok(())
    }
}

/// Every record in every `ctxgate-*.jsonl` file under `dir`, files in name order.
fn read_jsonl(dir: &Path) -> Vec<Record> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for p in names {
        let text = std::fs::read_to_string(&p).unwrap();
        for line in text.lines() {
            out.push(serde_json::from_str::<Record>(line).unwrap());
        }
    }
    out
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

// ---------------------------------------------------------------------------------------------
// Queue and writer.

#[tokio::test(start_paused = true)]
async fn full_queue_drops_exactly_the_overflow_and_submit_never_waits() {
    let m = metrics();
    let (open_tx, open_rx) = tokio::sync::watch::channel(false);
    let sink = TestSink {
        gate: Some(open_rx),
        ..TestSink::new()
    };
    let s = settings(1000, 100, Duration::from_millis(10));
    let (t, w) = Transcripts::start_with_sink(&s, m.clone(), sink.clone(), fast());

    // Let the writer take the first record and block inside the sink.
    t.submit(rec(0));
    wait_until("the sink to block", Duration::from_secs(5), || {
        sink.calls.load(Ordering::SeqCst) == 1
    })
    .await;
    // 1049 more, with no await in between: submit is synchronous and cannot wait.
    for i in 1..1050 {
        t.submit(rec(i));
    }
    assert_eq!(dropped(&m, "test", reason::QUEUE_FULL), 50);
    assert_eq!(dropped(&m, "test", reason::RETRY_EVICTED), 0);
    assert_eq!(t.queue_depth(), 1000);
    assert_eq!(m.queue_depth.get(), 1000);
    assert_eq!(written(&m, "test"), 0);

    open_tx.send(true).unwrap();
    let report = w.shutdown().await;
    assert_eq!(
        report,
        ShutdownReport {
            written: 1000,
            dropped: 50,
            failed: 0
        }
    );
    assert_eq!(ids(&sink.got()), id_range(0..1000));
    assert_eq!(written(&m, "test"), 1000);
    assert_eq!(m.queue_depth.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn failed_writes_are_retried_and_nothing_is_lost() {
    let m = metrics();
    let sink = TestSink::new();
    sink.fail.store(3, Ordering::SeqCst);
    let s = settings(1000, 100, Duration::from_millis(10));
    let (t, w) = Transcripts::start_with_sink(&s, m.clone(), sink.clone(), fast());
    for i in 0..250 {
        t.submit(rec(i));
    }
    wait_until("all written", Duration::from_secs(60), || {
        written(&m, "test") == 250
    })
    .await;
    let report = w.shutdown().await;
    assert_eq!(
        report,
        ShutdownReport {
            written: 250,
            dropped: 0,
            failed: 3
        }
    );
    assert_eq!(failures(&m, "test"), 3);
    assert_eq!(sink.got(), (0..250).map(rec).collect::<Vec<_>>());
    // The first batch was tried 4 times, the other two once each.
    assert_eq!(sink.calls.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn failing_sink_gives_up_oldest_records_only_when_the_queue_needs_room() {
    let m = metrics();
    let sink = TestSink::new();
    sink.fail.store(usize::MAX, Ordering::SeqCst);
    let s = settings(10, 5, Duration::from_millis(10));
    let (t, w) = Transcripts::start_with_sink(&s, m.clone(), sink.clone(), fast());

    // 0..5 become the batch being retried, 5..10 wait in the queue: the queue is full.
    for i in 0..10 {
        t.submit(rec(i));
    }
    wait_until("a failed write", Duration::from_secs(5), || {
        failures(&m, "test") >= 1
    })
    .await;
    assert_eq!(t.queue_depth(), 10);
    assert_eq!(dropped(&m, "test", reason::RETRY_EVICTED), 0);

    // Each new record evicts the oldest pending one: 0..5 from the batch, then 5, 6 from the
    // queue's front.
    for i in 10..17 {
        t.submit(rec(i));
    }
    assert_eq!(dropped(&m, "test", reason::RETRY_EVICTED), 7);
    assert_eq!(dropped(&m, "test", reason::QUEUE_FULL), 0);
    assert_eq!(t.queue_depth(), 10);

    sink.fail.store(0, Ordering::SeqCst);
    let report = w.shutdown().await;
    assert_eq!(report.written, 10);
    assert_eq!(report.dropped, 7);
    assert_eq!(report.failed, failures(&m, "test"));
    assert_eq!(ids(&sink.got()), id_range(7..17));
}

#[tokio::test(start_paused = true)]
async fn partial_batch_waits_for_flush_interval() {
    let m = metrics();
    let sink = TestSink::new();
    let s = settings(1000, 100, Duration::from_secs(1));
    let (t, w) = Transcripts::start_with_sink(&s, m.clone(), sink.clone(), fast());
    for i in 0..30 {
        t.submit(rec(i));
    }
    tokio::time::sleep(Duration::from_millis(990)).await;
    assert_eq!(written(&m, "test"), 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(written(&m, "test"), 30);
    // A full batch goes at once.
    for i in 30..130 {
        t.submit(rec(i));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(written(&m, "test"), 130);
    assert_eq!(w.shutdown().await.written, 130);
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_every_queued_record() {
    let m = metrics();
    let sink = TestSink::new();
    // A flush interval far beyond the test: only shutdown can write the partial batch.
    let s = settings(1000, 100, Duration::from_secs(3600));
    let (t, w) = Transcripts::start_with_sink(&s, m.clone(), sink.clone(), fast());
    for i in 0..250 {
        t.submit(rec(i));
    }
    let report = w.shutdown().await;
    assert_eq!(
        report,
        ShutdownReport {
            written: 250,
            dropped: 0,
            failed: 0
        }
    );
    assert_eq!(sink.got(), (0..250).map(rec).collect::<Vec<_>>());
    // Submitted after shutdown: dropped and counted, not lost silently.
    t.submit(rec(999));
    assert_eq!(dropped(&m, "test", reason::SHUTDOWN), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_up_on_a_sink_that_stays_down_and_counts_the_loss() {
    let m = metrics();
    let sink = TestSink::new();
    sink.fail.store(usize::MAX, Ordering::SeqCst);
    let s = settings(1000, 100, Duration::from_millis(10));
    let (t, w) = Transcripts::start_with_sink(&s, m.clone(), sink.clone(), fast());
    for i in 0..150 {
        t.submit(rec(i));
    }
    let started = tokio::time::Instant::now();
    let report = w.shutdown().await;
    let took = started.elapsed();
    assert!(
        took >= SHUTDOWN_TIMEOUT && took < SHUTDOWN_TIMEOUT + Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(report.written, 0);
    assert_eq!(report.dropped, 150);
    assert_eq!(dropped(&m, "test", reason::SHUTDOWN), 150);
    assert!(report.failed >= 10, "{report:?}");
    assert_eq!(report.failed, failures(&m, "test"));
    assert_eq!(m.queue_depth.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn none_sink_drains_and_counts_nothing() {
    let m = metrics();
    let s = settings(1000, 100, Duration::from_millis(10));
    let (t, w) = Transcripts::start_with_sink(&s, m.clone(), Discard, fast());
    for i in 0..10 {
        t.submit(rec(i));
    }
    assert!(!t.include_bodies());
    let report = w.shutdown().await;
    assert_eq!(report, ShutdownReport::default());
    assert_eq!(written(&m, "none"), 0);
    assert_eq!(t.queue_depth(), 0);
}

#[test]
fn metrics_are_exported_under_the_documented_names() {
    let registry = Registry::new();
    let m = TranscriptMetrics::register(&registry);
    m.written.with_label_values(&["jsonl"]).inc();
    m.dropped.with_label_values(&["jsonl", "queue_full"]).inc();
    m.write_failures.with_label_values(&["jsonl"]).inc();
    m.batch_write.with_label_values(&["jsonl"]).observe(0.01);
    let mut names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ctxgate_transcript_batch_write_seconds",
            "ctxgate_transcript_queue_depth",
            "ctxgate_transcript_records_dropped_total",
            "ctxgate_transcript_records_written_total",
            "ctxgate_transcript_write_failures_total",
        ]
    );
}

#[test]
fn sink_kind_reads_lowercase_names() {
    #[derive(serde::Deserialize)]
    struct T {
        sink: SinkKind,
    }
    for (text, kind) in [
        ("jsonl", SinkKind::Jsonl),
        ("postgres", SinkKind::Postgres),
        ("stdout", SinkKind::Stdout),
        ("none", SinkKind::None),
    ] {
        let t: T = toml::from_str(&format!("sink = \"{text}\"")).unwrap();
        assert_eq!(t.sink, kind);
    }
    assert!(toml::from_str::<T>("sink = \"Jsonl\"").is_err());
}

// ---------------------------------------------------------------------------------------------
// JSONL.

#[tokio::test]
async fn jsonl_files_hold_exactly_the_records_submitted() {
    let tmp = TempDir::new("jsonl");
    let dir = tmp.0.join("nested").join("transcripts"); // missing: start creates it
    let m = metrics();
    let s = Settings {
        sink: SinkKind::Jsonl,
        dir: dir.clone(),
        include_bodies: true,
        ..settings(1000, 100, Duration::from_millis(20))
    };
    let (t, w) = Transcripts::start_tuned(s, m.clone(), fast())
        .await
        .unwrap();
    assert!(t.include_bodies());
    let mut want: Vec<Record> = (0..237).map(rec).collect();
    // Text that needs escaping survives the round trip.
    want[5].response_text = Some("line one\nline \"two\"\t\u{0}é😀".into());
    for r in &want {
        t.submit(r.clone());
    }
    let report = w.shutdown().await;
    assert_eq!(
        report,
        ShutdownReport {
            written: 237,
            dropped: 0,
            failed: 0
        }
    );
    assert_eq!(written(&m, "jsonl"), 237);
    let today = utc_day(SystemTime::now());
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, [format!("ctxgate-{today}.jsonl")]);
    assert_eq!(lines_in(&dir.join(&files[0])), 237);
    assert_eq!(read_jsonl(&dir), want);
}

/// A clock the test can set.
fn settable_clock(start: &str) -> (Arc<Mutex<SystemTime>>, super::sink::jsonl::Clock) {
    let now = Arc::new(Mutex::new(humantime::parse_rfc3339(start).unwrap()));
    let c = now.clone();
    (now, Arc::new(move || *c.lock().unwrap()))
}

#[tokio::test]
async fn jsonl_rotates_by_size_and_resumes_the_last_file_after_restart() {
    let tmp = TempDir::new("rotate");
    let (_, clock) = settable_clock("2026-11-05T10:00:00Z");
    // Records of equal length: a batch of 2 is 2 lines of `line` bytes.
    let batch: Vec<Record> = vec![rec(11), rec(13)];
    let line = serde_json::to_vec(&batch[0]).unwrap().len() as u64 + 1;
    assert_eq!(
        serde_json::to_vec(&batch[1]).unwrap().len() as u64 + 1,
        line
    );
    let rotate = 5 * line; // room for two batches, not three
    let mut sink = JsonlSink::with_clock(tmp.0.clone(), rotate, clock.clone());
    for _ in 0..3 {
        sink.write(&batch).await.unwrap();
    }
    let f0 = tmp.0.join("ctxgate-2026-11-05.jsonl");
    let f1 = tmp.0.join("ctxgate-2026-11-05-1.jsonl");
    let f2 = tmp.0.join("ctxgate-2026-11-05-2.jsonl");
    assert_eq!((lines_in(&f0), lines_in(&f1)), (4, 2));
    assert!(!f2.exists());

    // A new sink (a restart) appends to the day's last file, then rotates again.
    let mut sink = JsonlSink::with_clock(tmp.0.clone(), rotate, clock);
    sink.write(&batch).await.unwrap();
    assert_eq!((lines_in(&f0), lines_in(&f1)), (4, 4));
    sink.write(&batch).await.unwrap();
    assert_eq!(lines_in(&f2), 2);
    assert_eq!(std::fs::metadata(&f1).unwrap().len(), 4 * line);
    assert_eq!(read_jsonl(&tmp.0).len(), 10);
}

#[tokio::test]
async fn jsonl_starts_a_new_file_each_utc_day() {
    let tmp = TempDir::new("day");
    let (now, clock) = settable_clock("2026-11-05T23:59:59.999Z");
    let mut sink = JsonlSink::with_clock(tmp.0.clone(), 1 << 20, clock);
    sink.write(&[rec(1), rec(2)]).await.unwrap();
    *now.lock().unwrap() = humantime::parse_rfc3339("2026-11-06T00:00:00Z").unwrap();
    sink.write(&[rec(3)]).await.unwrap();
    *now.lock().unwrap() = humantime::parse_rfc3339("2026-11-06T13:00:00Z").unwrap();
    sink.write(&[rec(4)]).await.unwrap();
    assert_eq!(lines_in(&tmp.0.join(file_name("2026-11-05", 0))), 2);
    assert_eq!(lines_in(&tmp.0.join(file_name("2026-11-06", 0))), 2);
    assert_eq!(
        ids(&read_jsonl(&tmp.0)),
        ["conv-1", "conv-2", "conv-3", "conv-4"]
    );
}

#[tokio::test]
async fn jsonl_dir_unwritable_then_writable_again_loses_nothing() {
    let tmp = TempDir::new("unwritable");
    let dir = tmp.0.join("t");
    let m = metrics();
    let s = settings(1000, 100, Duration::from_millis(5));
    let sink = JsonlSink::new(dir.clone(), 1 << 20);
    let (t, w) = Transcripts::start_with_sink(&s, m.clone(), sink, fast());
    for i in 0..5 {
        t.submit(rec(i));
    }
    wait_until("5 written", Duration::from_secs(10), || {
        written(&m, "jsonl") == 5
    })
    .await;

    // Tests run as root, where permission bits do not stop writes: put a plain file where
    // the directory was instead.
    let aside = tmp.0.join("t.aside");
    std::fs::rename(&dir, &aside).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    for i in 5..12 {
        t.submit(rec(i));
    }
    wait_until("2 failed writes", Duration::from_secs(10), || {
        failures(&m, "jsonl") >= 2
    })
    .await;
    assert_eq!(written(&m, "jsonl"), 5);
    assert_eq!(t.queue_depth(), 7);

    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&aside, &dir).unwrap();
    wait_until("12 written", Duration::from_secs(10), || {
        written(&m, "jsonl") == 12
    })
    .await;
    let report = w.shutdown().await;
    assert_eq!(report.written, 12);
    assert_eq!(report.dropped, 0);
    assert_eq!(report.failed, failures(&m, "jsonl"));
    assert!(report.failed >= 2);
    assert_eq!(read_jsonl(&dir), (0..12).map(rec).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: URL handling without a server.

#[tokio::test]
async fn postgres_url_never_appears_in_errors_or_debug() {
    let url = "postgres://ctx:hunter2secret@db.example:notaport/x";
    let s = Settings {
        sink: SinkKind::Postgres,
        postgres_url: Some(Secret::new(url)),
        ..Settings::default()
    };
    let debug = format!("{s:?}");
    let json = serde_json::to_string(&s).unwrap();
    let Err(err) = Transcripts::start(s, metrics()).await else {
        panic!("an unparseable URL must stop the start");
    };
    let msg = err.to_string();
    assert!(matches!(err, StartError::InvalidPostgresUrl(_)), "{msg}");
    for text in [&msg, &format!("{err:?}"), &debug, &json] {
        assert!(!text.contains("hunter2secret"), "{text}");
        assert!(!text.contains("db.example"), "{text}");
    }
    assert!(msg.starts_with("transcripts.postgres_url: "), "{msg}");

    let missing = Settings {
        sink: SinkKind::Postgres,
        ..Settings::default()
    };
    assert!(matches!(
        Transcripts::start(missing, metrics()).await,
        Err(StartError::MissingPostgresUrl)
    ));
}

#[test]
fn redactor_strips_url_and_password() {
    let r = sink::postgres::Redactor::new(&Secret::new("postgresql://me:s3cr3t-pw@h:5432/db"));
    assert_eq!(
        r.clean("failed: postgresql://me:s3cr3t-pw@h:5432/db (s3cr3t-pw)"),
        "failed: ***** (*****)"
    );
    let r = sink::postgres::Redactor::new(&Secret::new("host=h user=me password=s3cr3t-pw"));
    assert_eq!(r.clean("x s3cr3t-pw y"), "x ***** y");
}

#[tokio::test]
async fn unreachable_postgres_does_not_stop_the_start() {
    // Port 1 on loopback refuses at once.
    let s = Settings {
        sink: SinkKind::Postgres,
        postgres_url: Some(Secret::new("postgres://u:pw-unreachable@127.0.0.1:1/db")),
        ..settings(1000, 100, Duration::from_millis(5))
    };
    let m = metrics();
    let (t, w) = Transcripts::start_tuned(s, m.clone(), fast())
        .await
        .unwrap();
    t.submit(rec(1));
    wait_until("a failed write", Duration::from_secs(10), || {
        failures(&m, "postgres") >= 1
    })
    .await;
    let report = w.shutdown_within(Duration::from_millis(100)).await;
    assert_eq!(report.written, 0);
    assert_eq!(report.dropped, 1);
    assert_eq!(dropped(&m, "postgres", reason::SHUTDOWN), 1);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: a real server.

async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Every row, as records, in insert order.
async fn pg_rows(client: &tokio_postgres::Client) -> Vec<Record> {
    let rows = client
        .query(
            "SELECT ts, conversation_id, route, upstream, model, status, latency_ms, ttfb_ms,
                    stream, tokens_before, tokens_before_exact, tokens_after, messages_before,
                    messages_after, files_elided, prune_action, input_tokens, output_tokens,
                    cache_read_tokens, cache_write_tokens, usage_ratio, error_kind,
                    request_messages::text, response_text, prune_reason, kind, holdout,
                    finish_reason, summary_tokens, cost_usd, cost_unpruned_usd
             FROM ctxgate_transcripts ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let u = |v: Option<i64>| v.map(|x| x as u64);
    rows.iter()
        .map(|r| Record {
            ts: format_ts(r.get::<_, SystemTime>(0)),
            conversation_id: r.get(1),
            route: r.get(2),
            upstream: r.get(3),
            model: r.get(4),
            status: r.get::<_, i32>(5) as u16,
            latency_ms: r.get(6),
            ttfb_ms: r.get(7),
            stream: r.get(8),
            tokens_before: u(r.get(9)),
            tokens_before_exact: r.get(10),
            tokens_after: u(r.get(11)),
            messages_before: u(r.get(12)),
            messages_after: u(r.get(13)),
            files_elided: u(r.get(14)),
            prune_action: r.get(15),
            usage: Usage {
                input_tokens: u(r.get(16)),
                output_tokens: u(r.get(17)),
                cache_read_tokens: u(r.get(18)),
                cache_write_tokens: u(r.get(19)),
            },
            usage_ratio: r.get(20),
            error_kind: r.get(21),
            request_messages: r
                .get::<_, Option<String>>(22)
                .map(|s| serde_json::from_str(&s).unwrap()),
            response_text: r.get(23),
            prune_reason: r.get(24),
            kind: r.get(25),
            holdout: r.get(26),
            finish_reason: r.get(27),
            summary_tokens: u(r.get(28)),
            cost_usd: r.get(29),
            cost_unpruned_usd: r.get(30),
        })
        .collect()
}

#[test]
fn postgres_rows_match_and_survive_a_server_restart() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = PgServer::start();
    let url = server.url();
    let m = metrics();
    let s = Settings {
        sink: SinkKind::Postgres,
        postgres_url: Some(Secret::new(url.clone())),
        include_bodies: true,
        ..settings(1000, 25, Duration::from_millis(10))
    };
    let mut want: Vec<Record> = (0..60).map(rec).collect();
    // NUL cannot be stored in text or jsonb: it becomes U+FFFD.
    want[1].response_text = Some("a\u{0}b".into());
    want[1].request_messages = Some(serde_json::json!({"k\u{0}": ["x\u{0}y", 1, null]}));

    // 1. Start (creates the table), write 60 records: exactly 60 matching rows.
    let (t, w) = rt.block_on(async {
        let (t, w) = Transcripts::start_tuned(s, m.clone(), fast())
            .await
            .unwrap();
        for r in &want {
            t.submit(r.clone());
        }
        wait_until("60 rows written", Duration::from_secs(10), || {
            written(&m, "postgres") == 60
        })
        .await;
        let client = pg_client(&url).await;
        let mut expect = want.clone();
        expect[1].response_text = Some("a\u{FFFD}b".into());
        expect[1].request_messages =
            Some(serde_json::json!({"k\u{FFFD}": ["x\u{FFFD}y", 1, null]}));
        assert_eq!(pg_rows(&client).await, expect);
        let indexes: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE tablename = 'ctxgate_transcripts'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(indexes, 3); // primary key, ts, (conversation_id, ts)
        (t, w)
    });
    assert_eq!(failures(&m, "postgres"), 0);

    // 2. The server goes away; 40 more records arrive and fail to be written.
    assert!(server.pg_ctl_stop("fast"), "pg_ctl stop failed");
    rt.block_on(async {
        for i in 60..100 {
            t.submit(rec(i));
        }
        wait_until("failed writes", Duration::from_secs(10), || {
            failures(&m, "postgres") >= 2
        })
        .await;
    });
    assert_eq!(written(&m, "postgres"), 60);
    assert_eq!(t.queue_depth(), 40);

    // 3. It comes back: everything queued is written, nothing lost or duplicated.
    server.pg_ctl_start();
    rt.block_on(async {
        wait_until("100 rows written", Duration::from_secs(10), || {
            written(&m, "postgres") == 100
        })
        .await;
        let report = w.shutdown().await;
        assert_eq!(report.written, 100);
        assert_eq!(report.dropped, 0);
        assert_eq!(report.failed, failures(&m, "postgres"));
        let client = pg_client(&url).await;
        let got = pg_rows(&client).await;
        assert_eq!(got.len(), 100);
        assert_eq!(ids(&got), id_range(0..100));
        assert_eq!(got[60..], (60..100).map(rec).collect::<Vec<_>>()[..]);
    });
    drop(rt);
    drop(server);
}

#[test]
fn postgres_migration_adds_missing_columns_to_an_older_table() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = PgServer::start();
    let url = server.url();
    rt.block_on(async {
        // An "older" table lacking two columns and the indexes.
        let client = pg_client(&url).await;
        client
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
                    cache_read_tokens bigint, cache_write_tokens bigint, error_kind text,
                    request_messages jsonb)",
            )
            .await
            .unwrap();
        let m = metrics();
        let s = Settings {
            sink: SinkKind::Postgres,
            postgres_url: Some(Secret::new(url.clone())),
            include_bodies: true,
            ..settings(1000, 100, Duration::from_millis(10))
        };
        let (t, w) = Transcripts::start_tuned(s, m.clone(), fast())
            .await
            .unwrap();
        t.submit(rec(1));
        t.submit(rec(2));
        let report = w.shutdown().await;
        assert_eq!((report.written, report.failed), (2, 0));
        assert_eq!(pg_rows(&client).await, vec![rec(1), rec(2)]);
        let indexes: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE tablename = 'ctxgate_transcripts'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(indexes, 3);
    });
    drop(rt);
    drop(server);
}

#[tokio::test]
async fn postgres_sslmode_decides_tls() {
    use super::sink::postgres::{parse_url, PostgresSink};
    let server = PgServer::start();
    // The test server offers no TLS: `require` must refuse to go on in plaintext…
    let (config, redactor) =
        parse_url(&Secret::new(format!("{}?sslmode=require", server.url()))).unwrap();
    let err = PostgresSink::new(config, redactor)
        .connect()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("tls"), "{err}");
    // …while `prefer` (the default) falls back to it, and `disable` never asks.
    for mode in ["prefer", "disable"] {
        let (config, redactor) =
            parse_url(&Secret::new(format!("{}?sslmode={mode}", server.url()))).unwrap();
        PostgresSink::new(config, redactor).connect().await.unwrap();
    }
}
