//! `sink = "jsonl"`, the embedded default: one JSON object a line in files under `dir`.
//!
//! Files are named by UTC day: `ctxgate-2026-11-05.jsonl`, then `ctxgate-2026-11-05-1.jsonl`,
//! `-2`, … as each reaches `rotate_bytes`; a new day starts a new file. A batch never spans two
//! files: when appending it would take the current file past `rotate_bytes`, the batch goes to
//! the next file (a batch larger than `rotate_bytes` gets a file of its own). That keeps each
//! write a single append that can be undone, so a retried batch is never stored twice.
//!
//! Every batch opens its file by path, appends, and calls `sync_data` before reporting
//! success. Opening by path (rather than keeping a handle) is what makes a directory that
//! disappears or becomes unwritable fail the write — a kept handle would go on writing into a
//! deleted file — and lets writes succeed again once it is back. A missing directory is
//! created. After a failed append the file is truncated back to its length before the batch.
//! After a restart, appending resumes in the day's highest-numbered file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::{json_lines, Sink, SinkError};
use crate::transcript::record::Record;

/// The time source used to pick the day; injectable so tests can change the day.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Appends batches to rotated JSONL files under a directory.
pub struct JsonlSink {
    dir: PathBuf,
    rotate_bytes: u64,
    clock: Clock,
    /// The file batches go to now: its day and number. `None` until the first batch, and
    /// after a failure so the next attempt looks at the directory afresh.
    current: Option<(String, u32)>,
}

impl JsonlSink {
    /// A sink writing under `dir`, rotating at `rotate_bytes`, using the system clock.
    pub fn new(dir: PathBuf, rotate_bytes: u64) -> JsonlSink {
        JsonlSink::with_clock(dir, rotate_bytes, Arc::new(SystemTime::now))
    }

    /// Like [`JsonlSink::new`] with the day taken from `clock`.
    pub fn with_clock(dir: PathBuf, rotate_bytes: u64, clock: Clock) -> JsonlSink {
        JsonlSink {
            dir,
            rotate_bytes: rotate_bytes.max(1),
            clock,
            current: None,
        }
    }

    /// Creates the directory if it is missing.
    pub fn create_dir(&self) -> Result<(), SinkError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| SinkError::Io {
            what: "cannot create directory",
            path: self.dir.display().to_string(),
            source,
        })
    }
}

/// The file name for `day` (`YYYY-MM-DD`) and rotation number `n`.
pub fn file_name(day: &str, n: u32) -> String {
    if n == 0 {
        format!("ctxgate-{day}.jsonl")
    } else {
        format!("ctxgate-{day}-{n}.jsonl")
    }
}

/// The UTC day of `t` as `YYYY-MM-DD`.
pub fn utc_day(t: SystemTime) -> String {
    let mut s = humantime::format_rfc3339_seconds(t).to_string();
    s.truncate(10);
    s
}

impl Sink for JsonlSink {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    async fn write(&mut self, batch: &[Record]) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let buf = json_lines(batch)?;
        let day = utc_day((self.clock)());
        let start = match self.current.take() {
            Some((d, n)) if d == day => Some(n),
            _ => None,
        };
        let dir = self.dir.clone();
        let rotate = self.rotate_bytes;
        let task_day = day.clone();
        // File I/O and fsync block: keep them off the async workers.
        let (n, res) = tokio::task::spawn_blocking(move || {
            let n = match start {
                Some(n) => n,
                None => last_file(&dir, &task_day),
            };
            append(&dir, &task_day, n, rotate, &buf)
        })
        .await
        .map_err(|e| SinkError::Task(e.to_string()))?;
        if res.is_ok() {
            self.current = Some((day, n));
        }
        res
    }
}

/// The highest-numbered existing file for `day`, or 0 when there is none.
fn last_file(dir: &Path, day: &str) -> u32 {
    let mut n = 0;
    while dir.join(file_name(day, n + 1)).exists() {
        n += 1;
    }
    n
}

/// Appends `buf` to file `n` of `day`, moving on to later numbers while it would not fit.
/// Returns the number of the file written (or last tried) and the outcome.
fn append(
    dir: &Path,
    day: &str,
    mut n: u32,
    rotate: u64,
    buf: &[u8],
) -> (u32, Result<(), SinkError>) {
    if let Err(source) = std::fs::create_dir_all(dir) {
        return (
            n,
            Err(SinkError::Io {
                what: "cannot create directory",
                path: dir.display().to_string(),
                source,
            }),
        );
    }
    loop {
        let path = dir.join(file_name(day, n));
        let io = |what: &'static str| {
            let path = path.display().to_string();
            move |source| SinkError::Io { what, path, source }
        };
        let mut file = match open_append(&path) {
            Ok(f) => f,
            Err(e) => return (n, Err(io("cannot open")(e))),
        };
        let len = match file.metadata() {
            Ok(m) => m.len(),
            Err(e) => return (n, Err(io("cannot stat")(e))),
        };
        if len > 0 && len + buf.len() as u64 > rotate {
            n += 1;
            continue;
        }
        let res = file.write_all(buf).and_then(|()| file.sync_data());
        if let Err(e) = res {
            // Undo a partial append so the retried batch is not stored twice; if even that
            // fails the file is unusable anyway and the error below is what matters.
            let _ = file.set_len(len);
            return (n, Err(io("cannot append to")(e)));
        }
        if len == 0 {
            // A new file: make its directory entry durable too. Failing that is not worth
            // failing the batch over — the data itself is synced.
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                tracing::debug!(error = %e, "cannot sync transcript directory");
            }
        }
        return (n, Ok(()));
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    {
        // Transcripts may hold conversation bodies: not world-readable.
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o640);
    }
    opts.open(path)
}
