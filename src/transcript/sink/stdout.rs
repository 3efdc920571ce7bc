//! `sink = "stdout"`: JSON lines on standard output, for containers whose log collector
//! already ships stdout somewhere.

use std::io::Write;

use super::{json_lines, Sink, SinkError};
use crate::transcript::record::Record;

/// Writes each batch as JSON lines to stdout.
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    async fn write(&mut self, batch: &[Record]) -> Result<(), SinkError> {
        let buf = json_lines(batch)?;
        // A full pipe blocks the write: keep that off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(&buf).and_then(|()| out.flush())
        })
        .await
        .map_err(|e| SinkError::Task(e.to_string()))?
        .map_err(|source| SinkError::Io {
            what: "cannot write to",
            path: "stdout".into(),
            source,
        })
    }
}
