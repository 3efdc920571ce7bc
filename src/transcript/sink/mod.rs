//! Where records go: the [`Sink`] trait and its implementations — [`jsonl`] (the default),
//! [`postgres`], [`stdout`] and `none`. The writer knows only the trait; the request path knows
//! none of it.
//!
//! A sink writes a whole batch or fails; on failure the writer keeps the batch and calls
//! `write` again with it (possibly shortened at the front, see `queue`), so a sink must leave
//! nothing of a failed batch behind where it can (the JSONL sink truncates a partial append;
//! PostgreSQL inserts a batch in one transaction).

pub mod jsonl;
pub mod postgres;
pub mod stdout;

use std::future::Future;
use std::time::Duration;

use super::record::Record;

/// Why a batch write failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file or stream operation failed (JSONL, stdout).
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done, e.g. `cannot append to`.
        what: &'static str,
        /// The file or directory (never a credential).
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// PostgreSQL is unreachable or refused the statement; the message is free of the URL
    /// and of record values.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The sink refused the batch's data itself, so retrying it can never succeed.
    #[error("batch rejected: {0}")]
    Rejected(String),
    /// The operation took longer than the sink allows.
    #[error("{what} took longer than {after:?}")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// A blocking write task panicked or was cancelled.
    #[error("write task failed: {0}")]
    Task(String),
}

impl SinkError {
    /// Whether retrying the same batch is pointless; the writer then drops it (counted as
    /// `reason="rejected"`) instead of retrying forever and starving every later record.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SinkError::Rejected(_))
    }
}

/// A destination for transcript records.
///
/// `write` returns a `Send` future so the writer task, which is generic over the sink, can run
/// on tokio's multi-threaded runtime; implementors may write `async fn write`.
pub trait Sink: Send + 'static {
    /// The `sink` metric label: `jsonl`, `postgres`, `stdout`, `none`.
    fn name(&self) -> &'static str;

    /// Writes the whole batch durably, or fails and leaves it for a retry.
    fn write(&mut self, batch: &[Record]) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Whether records this sink accepts count as written. Only `none`, which discards them,
    /// says no.
    fn counts_written(&self) -> bool {
        true
    }
}

/// Discards every record: `sink = "none"`. The queue still drains, so nothing piles up.
pub struct Discard;

impl Sink for Discard {
    fn name(&self) -> &'static str {
        "none"
    }

    async fn write(&mut self, _batch: &[Record]) -> Result<(), SinkError> {
        Ok(())
    }

    fn counts_written(&self) -> bool {
        false
    }
}

/// The configured sink, chosen at start from `transcripts.sink`.
pub(crate) enum AnySink {
    Jsonl(jsonl::JsonlSink),
    Postgres(Box<postgres::PostgresSink>),
    Stdout(stdout::StdoutSink),
    None(Discard),
}

impl Sink for AnySink {
    fn name(&self) -> &'static str {
        match self {
            AnySink::Jsonl(s) => s.name(),
            AnySink::Postgres(s) => s.name(),
            AnySink::Stdout(s) => s.name(),
            AnySink::None(s) => s.name(),
        }
    }

    async fn write(&mut self, batch: &[Record]) -> Result<(), SinkError> {
        match self {
            AnySink::Jsonl(s) => s.write(batch).await,
            AnySink::Postgres(s) => s.write(batch).await,
            AnySink::Stdout(s) => s.write(batch).await,
            AnySink::None(s) => s.write(batch).await,
        }
    }

    fn counts_written(&self) -> bool {
        match self {
            AnySink::Jsonl(s) => s.counts_written(),
            AnySink::Postgres(s) => s.counts_written(),
            AnySink::Stdout(s) => s.counts_written(),
            AnySink::None(s) => s.counts_written(),
        }
    }
}

/// Serialises `batch` as JSON lines, one record a line.
pub(crate) fn json_lines(batch: &[Record]) -> Result<Vec<u8>, SinkError> {
    let mut buf = Vec::with_capacity(batch.len() * 512);
    for r in batch {
        // A Record is plain data, so this cannot fail in practice (a NaN figure becomes
        // `null`); if it ever did, retrying would not help. The serde message names no value.
        serde_json::to_writer(&mut buf, r).map_err(|e| SinkError::Rejected(e.to_string()))?;
        buf.push(b'\n');
    }
    Ok(buf)
}
