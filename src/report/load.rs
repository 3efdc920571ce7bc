//! Reading transcript records back for a report: JSONL files (a directory as the `jsonl` sink
//! writes it, or one file) or the PostgreSQL table `ctxgate_transcripts`.
//!
//! Each record becomes an [`Entry`] handed to the [`Tally`] at once, so a report holds the
//! sums, not the records. A JSONL line that is not a record (cut short by a crash, edited by
//! hand) is skipped and counted, never fatal. A PostgreSQL table made by an older ctxgate may
//! lack the newer columns: they read as `NULL`, as those records' fields read in JSONL.
//!
//! Secrecy: a PostgreSQL URL is a [`Secret`]; errors show it through [`shown_url`] (password
//! and query masked) and their text goes through the sink's [`Redactor`].

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use super::{Day, Entry, Tally};
use crate::secret::Secret;
use crate::transcript::sink::postgres::{self, Redactor, TABLE};
use crate::transcript::KIND_CALL;

/// Where a report reads from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A directory of `*.jsonl` files, or one file.
    Jsonl(PathBuf),
    /// A `postgres://` or `postgresql://` URL.
    Postgres(Secret),
}

impl Source {
    /// The source an argument names: a PostgreSQL URL, else a path.
    pub fn parse(arg: &str) -> Source {
        if arg.starts_with("postgres://") || arg.starts_with("postgresql://") {
            Source::Postgres(Secret::new(arg))
        } else {
            Source::Jsonl(PathBuf::from(arg))
        }
    }

    /// Reads every record, handing each to `tally`.
    pub fn load(&self, tally: &mut Tally) -> Result<Scan, LoadError> {
        match self {
            Source::Jsonl(path) => load_jsonl(path, tally),
            Source::Postgres(url) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| LoadError::Postgres(format!("cannot start a runtime: {e}")))?;
                rt.block_on(load_postgres(url, tally))
            }
        }
    }
}

/// Why a source could not be read. Messages never hold a PostgreSQL password.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A directory without any `*.jsonl` file.
    #[error("no transcript files (*.jsonl) in {0}")]
    NoFiles(String),
    /// PostgreSQL could not be reached or read; the URL in the message is masked.
    #[error("{0}")]
    Postgres(String),
}

/// What reading a source met.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    /// `jsonl` or `postgres`.
    pub kind: &'static str,
    /// JSONL files read; `None` for PostgreSQL.
    pub files: Option<u64>,
    /// Records read (whether or not the filter admitted them).
    pub records: u64,
    /// JSONL lines that were not a record.
    pub malformed_lines: u64,
    /// Where the first few malformed lines are: file and line number (from 1).
    pub malformed_at: Vec<(PathBuf, u64)>,
}

/// Malformed lines whose place is kept for the warning.
const MALFORMED_SHOWN: usize = 5;

/// One JSONL line: the fields of `transcript::Record` a report reads. Unknown fields (bodies
/// among them) are skipped unparsed.
#[derive(Deserialize)]
struct Line {
    ts: String,
    conversation_id: String,
    route: String,
    model: Option<String>,
    status: u16,
    latency_ms: f64,
    tokens_before: Option<u64>,
    tokens_after: Option<u64>,
    #[serde(default)]
    usage: LineUsage,
    error_kind: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    holdout: bool,
    finish_reason: Option<String>,
    cost_usd: Option<f64>,
    cost_unpruned_usd: Option<f64>,
}

#[derive(Deserialize, Default)]
struct LineUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_tokens: Option<u64>,
}

/// Parses one JSONL line; `None` when it is not a record.
pub(super) fn parse_line(bytes: &[u8]) -> Option<Entry> {
    let l: Line = serde_json::from_slice(bytes).ok()?;
    let ts = humantime::parse_rfc3339_weak(&l.ts).ok()?;
    Some(Entry {
        day: Day::of(ts),
        conversation_id: l.conversation_id,
        route: l.route,
        model: l.model,
        status: l.status,
        latency_ms: l.latency_ms,
        tokens_before: l.tokens_before,
        tokens_after: l.tokens_after,
        input_tokens: l.usage.input_tokens,
        output_tokens: l.usage.output_tokens,
        cache_read_tokens: l.usage.cache_read_tokens,
        error_kind: l.error_kind,
        kind: l.kind.unwrap_or_else(|| KIND_CALL.to_string()),
        holdout: l.holdout,
        finish_reason: l.finish_reason,
        cost_usd: l.cost_usd,
        cost_unpruned_usd: l.cost_unpruned_usd,
    })
}

/// The day in a name the `jsonl` sink gave its file (`ctxgate-DAY.jsonl`, `ctxgate-DAY-N.jsonl`).
fn file_day(name: &str) -> Option<Day> {
    name.strip_prefix("ctxgate-")?.get(..10)?.parse().ok()
}

/// The files to read: `path` itself, or the `*.jsonl` files in it by name. Files the `jsonl`
/// sink named after a day before `since` are passed over: a record is written on or after
/// the day its call arrived, so they hold nothing that late.
fn jsonl_files(path: &Path, since: Option<&Day>) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut any = false;
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".jsonl") || !p.is_file() {
            continue;
        }
        any = true;
        let early = match (file_day(name), since) {
            (Some(d), Some(s)) => &d < s,
            _ => false,
        };
        if !early {
            files.push(p);
        }
    }
    if !any {
        return Err(LoadError::NoFiles(path.display().to_string()));
    }
    files.sort();
    Ok(files)
}

fn load_jsonl(path: &Path, tally: &mut Tally) -> Result<Scan, LoadError> {
    let files = jsonl_files(path, tally.filter().since.as_ref())?;
    let mut scan = Scan {
        kind: "jsonl",
        files: Some(files.len() as u64),
        ..Scan::default()
    };
    let mut buf = Vec::new();
    for file in files {
        let io = |source| LoadError::Io {
            path: file.display().to_string(),
            source,
        };
        let mut reader = std::io::BufReader::new(std::fs::File::open(&file).map_err(io)?);
        let mut line_no = 0u64;
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
                break;
            }
            line_no += 1;
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse_line(&buf) {
                Some(entry) => {
                    scan.records += 1;
                    tally.add(&entry);
                }
                None => {
                    scan.malformed_lines += 1;
                    if scan.malformed_at.len() < MALFORMED_SHOWN {
                        scan.malformed_at.push((file.clone(), line_no));
                    }
                }
            }
        }
    }
    Ok(scan)
}

/// A PostgreSQL URL fit for a message: the password masked (`crate::config::mask_url`) and
/// the query string, which may carry one too, left out.
pub fn shown_url(url: &Secret) -> String {
    let url = url.expose();
    match url.split_once('?') {
        Some((base, _)) => format!("{}?…", crate::config::mask_url(base)),
        None => crate::config::mask_url(url),
    }
}

/// Cleans messages of the URL and of every password in it, the query's included.
struct Cleaner {
    redactor: Redactor,
    extra: Vec<String>,
}

impl Cleaner {
    fn new(url: &Secret) -> Cleaner {
        let query = url.expose().split_once('?').map_or("", |(_, q)| q);
        let extra = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, v)| k.eq_ignore_ascii_case("password") && v.len() >= 4)
            .map(|(_, v)| v.to_string())
            .collect();
        Cleaner {
            redactor: Redactor::new(url),
            extra,
        }
    }

    fn clean(&self, msg: &str) -> String {
        let mut out = self.redactor.clean(msg);
        for s in &self.extra {
            out = out.replace(s.as_str(), "*****");
        }
        out
    }
}

/// The columns a report reads, in select order, with their types for a table that lacks
/// them (made by a ctxgate older than the column).
const READ: &[(&str, &str)] = &[
    ("ts", "timestamptz"),
    ("conversation_id", "text"),
    ("route", "text"),
    ("model", "text"),
    ("status", "integer"),
    ("latency_ms", "double precision"),
    ("tokens_before", "bigint"),
    ("tokens_after", "bigint"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("cache_read_tokens", "bigint"),
    ("error_kind", "text"),
    ("kind", "text"),
    ("holdout", "boolean"),
    ("finish_reason", "text"),
    ("cost_usd", "double precision"),
    ("cost_unpruned_usd", "double precision"),
];

/// Rows fetched per round trip: the sums stay in memory, never the table.
const FETCH_ROWS: i32 = 5000;

/// The `SELECT` over the columns present; absent ones read as typed `NULL`s. `$1`..`$3`:
/// from (inclusive), to (exclusive), route — each `NULL` for no bound.
pub(super) fn select_sql(present: &[String]) -> String {
    let cols: Vec<String> = READ
        .iter()
        .map(|(name, ty)| {
            if present.iter().any(|p| p == name) {
                (*name).to_string()
            } else {
                format!("NULL::{ty} AS {name}")
            }
        })
        .collect();
    format!(
        "SELECT {} FROM {TABLE} \
         WHERE ($1::timestamptz IS NULL OR ts >= $1) \
         AND ($2::timestamptz IS NULL OR ts < $2) \
         AND ($3::text IS NULL OR route = $3)",
        cols.join(", ")
    )
}

/// An error and its causes, `: `-separated (tokio-postgres keeps the OS error as a cause).
fn chain(e: &tokio_postgres::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn count(v: Option<i64>) -> Option<u64> {
    v.and_then(|x| u64::try_from(x).ok())
}

/// One row (in [`READ`] order) as an [`Entry`].
fn row_entry(row: &tokio_postgres::Row) -> Result<Entry, tokio_postgres::Error> {
    let ts: SystemTime = row.try_get(0)?;
    let status: i32 = row.try_get(4)?;
    Ok(Entry {
        day: Day::of(ts),
        conversation_id: row.try_get(1)?,
        route: row.try_get(2)?,
        model: row.try_get(3)?,
        status: u16::try_from(status.max(0)).unwrap_or(u16::MAX),
        latency_ms: row.try_get(5)?,
        tokens_before: count(row.try_get(6)?),
        tokens_after: count(row.try_get(7)?),
        input_tokens: count(row.try_get(8)?),
        output_tokens: count(row.try_get(9)?),
        cache_read_tokens: count(row.try_get(10)?),
        error_kind: row.try_get(11)?,
        kind: row
            .try_get::<_, Option<String>>(12)?
            .unwrap_or_else(|| KIND_CALL.to_string()),
        holdout: row.try_get::<_, Option<bool>>(13)?.unwrap_or(false),
        finish_reason: row.try_get(14)?,
        cost_usd: row.try_get(15)?,
        cost_unpruned_usd: row.try_get(16)?,
    })
}

async fn load_postgres(url: &Secret, tally: &mut Tally) -> Result<Scan, LoadError> {
    let shown = shown_url(url);
    let cleaner = Cleaner::new(url);
    let fail = |what: &str, e: &tokio_postgres::Error| {
        LoadError::Postgres(format!("{what} {shown}: {}", cleaner.clean(&chain(e))))
    };
    let (config, _) = postgres::parse_url(url)
        .map_err(|e| LoadError::Postgres(format!("not a valid PostgreSQL URL: {e}")))?;
    let (mut client, connection) = config
        .connect(postgres::tls_connector())
        .await
        .map_err(|e| fail("cannot connect to", &e))?;
    let conn_task = tokio::spawn(connection);

    let present: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
            &[&TABLE],
        )
        .await
        .map_err(|e| fail("cannot read the columns of", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if present.is_empty() {
        return Err(LoadError::Postgres(format!(
            "no table {TABLE} in the current schema of {shown}"
        )));
    }

    let filter = tally.filter().clone();
    let from = filter.since.as_ref().map(Day::start);
    let to = filter.until.as_ref().map(Day::end);
    let route = filter.route.clone();
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| fail("cannot read", &e))?;
    let portal = tx
        .bind(select_sql(&present).as_str(), &[&from, &to, &route])
        .await
        .map_err(|e| fail("cannot query", &e))?;
    let mut scan = Scan {
        kind: "postgres",
        ..Scan::default()
    };
    loop {
        let rows = tx
            .query_portal(&portal, FETCH_ROWS)
            .await
            .map_err(|e| fail("cannot read rows of", &e))?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let entry = row_entry(row).map_err(|e| fail("unexpected column type in", &e))?;
            scan.records += 1;
            tally.add(&entry);
        }
    }
    let _ = tx.commit().await;
    drop(client);
    let _ = conn_task.await;
    Ok(scan)
}
