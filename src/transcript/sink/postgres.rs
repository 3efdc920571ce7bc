//! `sink = "postgres"`: batched multi-row `INSERT`s into `ctxgate_transcripts` over
//! tokio-postgres.
//!
//! The table and its indexes are created if missing, and columns added since the table was
//! made are added, each time a connection is opened (see `SCHEMA.md` beside this module for
//! the schema and the migration story). A connection that drops is opened again on the next
//! attempt; the writer's backoff spaces the attempts out.
//!
//! Secrecy: the URL is a [`Secret`] and is never formatted. Error text from tokio-postgres
//! names hosts and option keys, not the URL, but is passed through [`Redactor`] anyway. A
//! server error of class 22 (data exception) or 23 (integrity violation) may quote a record's
//! values, so only its SQLSTATE is logged.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Sink, SinkError};
use crate::secret::Secret;
use crate::transcript::record::Record;

/// The table records go to.
pub const TABLE: &str = "ctxgate_transcripts";

/// Connect timeout used when the URL sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit on creating or migrating the table after connecting.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit on inserting one batch.
const INSERT_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows per INSERT statement: 1000 × 31 parameters stays below PostgreSQL's 65535.
const ROWS_PER_STATEMENT: usize = 1000;
/// Advisory lock key ("ctxgate1") taken while creating or migrating, so several ctxgate
/// instances starting together do not race on `CREATE TABLE`.
const SCHEMA_LOCK: i64 = 0x6374_7867_6174_6531;

/// `CREATE TABLE` for the current schema. Keep in step with [`COLUMNS`] and `SCHEMA.md`.
const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS ctxgate_transcripts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts timestamptz NOT NULL,
    conversation_id text NOT NULL,
    route text NOT NULL,
    upstream text NOT NULL,
    model text,
    status integer NOT NULL,
    latency_ms double precision NOT NULL,
    ttfb_ms double precision,
    stream boolean NOT NULL,
    tokens_before bigint,
    tokens_before_exact boolean NOT NULL,
    tokens_after bigint,
    messages_before bigint,
    messages_after bigint,
    files_elided bigint,
    prune_action text NOT NULL,
    input_tokens bigint,
    output_tokens bigint,
    cache_read_tokens bigint,
    cache_write_tokens bigint,
    usage_ratio double precision,
    error_kind text,
    request_messages jsonb,
    response_text text,
    prune_reason text,
    kind text,
    holdout boolean,
    finish_reason text,
    summary_tokens bigint,
    cost_usd double precision,
    cost_unpruned_usd double precision
)";

/// Every column ctxgate inserts, in insert order, with the type used when a migration adds
/// it to an older table (nullable, since existing rows have no value).
pub const COLUMNS: &[(&str, &str)] = &[
    ("ts", "timestamptz"),
    ("conversation_id", "text"),
    ("route", "text"),
    ("upstream", "text"),
    ("model", "text"),
    ("status", "integer"),
    ("latency_ms", "double precision"),
    ("ttfb_ms", "double precision"),
    ("stream", "boolean"),
    ("tokens_before", "bigint"),
    ("tokens_before_exact", "boolean"),
    ("tokens_after", "bigint"),
    ("messages_before", "bigint"),
    ("messages_after", "bigint"),
    ("files_elided", "bigint"),
    ("prune_action", "text"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("cache_read_tokens", "bigint"),
    ("cache_write_tokens", "bigint"),
    ("usage_ratio", "double precision"),
    ("error_kind", "text"),
    ("request_messages", "jsonb"),
    ("response_text", "text"),
    ("prune_reason", "text"),
    ("kind", "text"),
    ("holdout", "boolean"),
    ("finish_reason", "text"),
    ("summary_tokens", "bigint"),
    ("cost_usd", "double precision"),
    ("cost_unpruned_usd", "double precision"),
];

/// Indexes ctxgate creates: name and definition.
const INDEXES: &[(&str, &str)] = &[
    (
        "ctxgate_transcripts_ts_idx",
        "CREATE INDEX IF NOT EXISTS ctxgate_transcripts_ts_idx ON ctxgate_transcripts (ts)",
    ),
    (
        "ctxgate_transcripts_conversation_ts_idx",
        "CREATE INDEX IF NOT EXISTS ctxgate_transcripts_conversation_ts_idx \
         ON ctxgate_transcripts (conversation_id, ts)",
    ),
];

/// Removes every trace of the URL (whole, and its password) from a message.
#[derive(Clone)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// A redactor for `url`.
    pub fn new(url: &Secret) -> Redactor {
        let url = url.expose();
        let mut secrets = vec![url.to_string()];
        if let Some(pw) = password_in(url) {
            // A very short password would redact innocent text; error messages never hold
            // the password anyway, so this is belt and braces for the plausible case.
            if pw.len() >= 4 {
                secrets.push(pw.to_string());
            }
        }
        secrets.retain(|s| !s.is_empty());
        Redactor { secrets }
    }

    /// `msg` with every secret replaced by `*****`.
    pub fn clean(&self, msg: &str) -> String {
        let mut out = msg.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "*****");
            }
        }
        out
    }
}

/// The password in a URL (`scheme://user:password@host…`) or key/value string
/// (`… password=secret …`), found by hand because the string may not parse.
fn password_in(url: &str) -> Option<&str> {
    if let Some((_, rest)) = url.split_once("://") {
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let userinfo = authority.rsplit_once('@')?.0;
        return userinfo.split_once(':').map(|(_, pw)| pw);
    }
    let at = url.find("password=")?;
    let rest = &url[at + "password=".len()..];
    let rest = rest.strip_prefix('\'').unwrap_or(rest);
    rest.split([' ', '\'']).next()
}

/// Parses the URL; the error message is free of it.
pub fn parse_url(url: &Secret) -> Result<(tokio_postgres::Config, Redactor), String> {
    let redactor = Redactor::new(url);
    let mut config: tokio_postgres::Config = url
        .expose()
        .parse()
        .map_err(|e: tokio_postgres::Error| redactor.clean(&e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("ctxgate");
    }
    Ok((config, redactor))
}

/// Writes batches to PostgreSQL, connecting (again) when needed.
pub struct PostgresSink {
    config: tokio_postgres::Config,
    redactor: Redactor,
    client: Option<Client>,
    /// TLS through rustls with the system's roots. The URL's `sslmode` decides whether it is
    /// used: `prefer` (libpq's default) takes TLS when the server offers it, `require` insists
    /// (managed databases such as Supabase), `disable` never asks.
    tls: MakeRustlsConnect,
}

/// The rustls client configuration for PostgreSQL: the system's native roots (also used by
/// `ctxgate report` to read the table back).
pub(crate) fn tls_connector() -> MakeRustlsConnect {
    let mut roots = rustls::RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(loaded.certs);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        // ring supports the default versions; should that ever change, fall back to the
        // process default provider rather than failing transcripts.
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    };
    MakeRustlsConnect::new(config)
}

impl PostgresSink {
    /// A sink for the given parsed URL; it connects on [`PostgresSink::connect`] or on the
    /// first write.
    pub fn new(config: tokio_postgres::Config, redactor: Redactor) -> PostgresSink {
        PostgresSink {
            config,
            redactor,
            client: None,
            tls: tls_connector(),
        }
    }

    /// Connects and makes sure the table exists, unless already connected.
    pub async fn connect(&mut self) -> Result<(), SinkError> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        self.client = None;
        let limit = CONNECT_TIMEOUT + SCHEMA_TIMEOUT;
        let (mut client, connection) =
            tokio::time::timeout(limit, self.config.connect(self.tls.clone()))
                .await
                .map_err(|_| SinkError::Timeout {
                    what: "connecting to postgres",
                    after: limit,
                })?
                .map_err(|e| SinkError::Postgres(describe(&e, &self.redactor)))?;
        let redactor = self.redactor.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %describe(&e, &redactor), "postgres connection for transcripts ended");
            }
        });
        match tokio::time::timeout(SCHEMA_TIMEOUT, ensure_schema(&mut client)).await {
            Err(_) => {
                return Err(SinkError::Timeout {
                    what: "creating the transcripts table",
                    after: SCHEMA_TIMEOUT,
                })
            }
            Ok(Err(e)) if is_insufficient_privilege(&e) => {
                // A role allowed to insert but not to create: the table was made by someone
                // else, which is a supported setup. The insert will tell if it is missing.
                tracing::warn!(
                    error = %describe(&e, &self.redactor),
                    "cannot create or migrate {TABLE}; assuming it exists"
                );
            }
            Ok(Err(e)) => return Err(SinkError::Postgres(describe(&e, &self.redactor))),
            Ok(Ok(())) => {}
        }
        self.client = Some(client);
        Ok(())
    }

    async fn insert(&mut self, batch: &[Record]) -> Result<(), SinkError> {
        self.connect().await?;
        let Some(client) = self.client.as_mut() else {
            return Err(SinkError::Postgres("not connected".into()));
        };
        let rows: Vec<Row> = batch.iter().map(Row::from).collect();
        let res = if rows.len() <= ROWS_PER_STATEMENT {
            client
                .execute(&insert_sql(rows.len()), &params(&rows))
                .await
                .map(|_| ())
        } else {
            // More than one statement: one transaction, so a retry never duplicates a part.
            insert_chunked(client, &rows).await
        };
        res.map_err(|e| classify(&e, &self.redactor))
    }
}

async fn insert_chunked(client: &mut Client, rows: &[Row]) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        tx.execute(&insert_sql(chunk.len()), &params(chunk)).await?;
    }
    tx.commit().await
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn write(&mut self, batch: &[Record]) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let res = match tokio::time::timeout(INSERT_TIMEOUT, self.insert(batch)).await {
            Ok(res) => res,
            Err(_) => Err(SinkError::Timeout {
                what: "inserting transcripts",
                after: INSERT_TIMEOUT,
            }),
        };
        if res.is_err() {
            // Whatever went wrong, the next attempt starts from a fresh connection (which
            // also recreates the table if someone dropped it).
            self.client = None;
        }
        res
    }
}

/// Creates the table and indexes if missing and adds columns missing from an older table,
/// under an advisory lock. Only what is missing is altered, so an up-to-date table takes no
/// lock that would queue behind a long dashboard query.
async fn ensure_schema(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await?;
    tx.batch_execute(CREATE_TABLE).await?;
    let present: Vec<String> = tx
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
            &[&TABLE],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (name, ty) in COLUMNS {
        if !present.iter().any(|p| p == name) {
            tx.batch_execute(&format!(
                "ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {name} {ty}"
            ))
            .await?;
            tracing::info!(column = name, "added column to {TABLE}");
        }
    }
    for (name, sql) in INDEXES {
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[name])
            .await?
            .get(0);
        if !exists {
            tx.batch_execute(sql).await?;
        }
    }
    tx.commit().await
}

fn is_insufficient_privilege(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}

/// A failed insert as a [`SinkError`]: bad data is permanent, everything else is retried.
fn classify(e: &tokio_postgres::Error, redactor: &Redactor) -> SinkError {
    let msg = describe(e, redactor);
    match e.code().map(|c| c.code()) {
        Some(code) if code.starts_with("22") || code.starts_with("23") => SinkError::Rejected(msg),
        _ => SinkError::Postgres(msg),
    }
}

/// An error as text fit for a log line: no URL, and no record values.
fn describe(e: &tokio_postgres::Error, redactor: &Redactor) -> String {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        if code.starts_with("22") || code.starts_with("23") {
            // Data errors quote the offending value, which comes from a record.
            return format!(
                "{} {code} (message withheld: it may quote record values)",
                db.severity()
            );
        }
        // The DETAIL of other errors can still show a row, so only the message is kept.
        return redactor.clean(&format!("{} {code}: {}", db.severity(), db.message()));
    }
    redactor.clean(&e.to_string())
}

/// `INSERT … VALUES ($1, …), …` for `n` rows.
fn insert_sql(n: usize) -> String {
    let cols: Vec<&str> = COLUMNS.iter().map(|(c, _)| *c).collect();
    let width = COLUMNS.len();
    let mut sql = format!("INSERT INTO {TABLE} ({}) VALUES ", cols.join(", "));
    for row in 0..n {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for (col, (name, _)) in COLUMNS.iter().enumerate() {
            if col > 0 {
                sql.push_str(", ");
            }
            let i = row * width + col + 1;
            // request_messages travels as text and is cast, so no JSON feature is needed.
            if *name == "request_messages" {
                sql.push_str(&format!("${i}::text::jsonb"));
            } else {
                sql.push_str(&format!("${i}"));
            }
        }
        sql.push(')');
    }
    sql
}

/// One record converted to the column types.
struct Row {
    ts: SystemTime,
    conversation_id: String,
    route: String,
    upstream: String,
    model: Option<String>,
    status: i32,
    latency_ms: f64,
    ttfb_ms: Option<f64>,
    stream: bool,
    tokens_before: Option<i64>,
    tokens_before_exact: bool,
    tokens_after: Option<i64>,
    messages_before: Option<i64>,
    messages_after: Option<i64>,
    files_elided: Option<i64>,
    prune_action: String,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cache_read_tokens: Option<i64>,
    cache_write_tokens: Option<i64>,
    usage_ratio: Option<f64>,
    error_kind: Option<String>,
    request_messages: Option<String>,
    response_text: Option<String>,
    prune_reason: Option<String>,
    kind: String,
    holdout: bool,
    finish_reason: Option<String>,
    summary_tokens: Option<i64>,
    cost_usd: Option<f64>,
    cost_unpruned_usd: Option<f64>,
}

impl From<&Record> for Row {
    fn from(r: &Record) -> Row {
        Row {
            // The request path always sets ts from `now_ts`; should one ever not parse, the
            // write time stands in rather than the batch being refused forever.
            ts: humantime::parse_rfc3339_weak(&r.ts).unwrap_or_else(|_| SystemTime::now()),
            conversation_id: text(&r.conversation_id),
            route: text(&r.route),
            upstream: text(&r.upstream),
            model: r.model.as_deref().map(text),
            status: i32::from(r.status),
            latency_ms: r.latency_ms,
            ttfb_ms: r.ttfb_ms,
            stream: r.stream,
            tokens_before: big(r.tokens_before),
            tokens_before_exact: r.tokens_before_exact,
            tokens_after: big(r.tokens_after),
            messages_before: big(r.messages_before),
            messages_after: big(r.messages_after),
            files_elided: big(r.files_elided),
            prune_action: text(&r.prune_action),
            input_tokens: big(r.usage.input_tokens),
            output_tokens: big(r.usage.output_tokens),
            cache_read_tokens: big(r.usage.cache_read_tokens),
            cache_write_tokens: big(r.usage.cache_write_tokens),
            usage_ratio: r.usage_ratio,
            error_kind: r.error_kind.as_deref().map(text),
            request_messages: r.request_messages.as_ref().map(json_text),
            response_text: r.response_text.as_deref().map(text),
            prune_reason: r.prune_reason.as_deref().map(text),
            kind: text(&r.kind),
            holdout: r.holdout,
            finish_reason: r.finish_reason.as_deref().map(text),
            summary_tokens: big(r.summary_tokens),
            cost_usd: r.cost_usd,
            cost_unpruned_usd: r.cost_unpruned_usd,
        }
    }
}

/// The row's values in [`COLUMNS`] order.
fn params(rows: &[Row]) -> Vec<&(dyn ToSql + Sync)> {
    let mut p: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * COLUMNS.len());
    for r in rows {
        p.extend_from_slice(&[
            &r.ts,
            &r.conversation_id,
            &r.route,
            &r.upstream,
            &r.model,
            &r.status,
            &r.latency_ms,
            &r.ttfb_ms,
            &r.stream,
            &r.tokens_before,
            &r.tokens_before_exact,
            &r.tokens_after,
            &r.messages_before,
            &r.messages_after,
            &r.files_elided,
            &r.prune_action,
            &r.input_tokens,
            &r.output_tokens,
            &r.cache_read_tokens,
            &r.cache_write_tokens,
            &r.usage_ratio,
            &r.error_kind,
            &r.request_messages,
            &r.response_text,
            &r.prune_reason,
            &r.kind,
            &r.holdout,
            &r.finish_reason,
            &r.summary_tokens,
            &r.cost_usd,
            &r.cost_unpruned_usd,
        ]);
    }
    p
}

/// PostgreSQL text cannot hold NUL; anything else goes through unchanged.
fn text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

/// jsonb cannot hold `\u0000` either: such strings (and keys) are cleaned before encoding.
fn json_text(v: &serde_json::Value) -> String {
    fn clean(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => *s = text(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(clean),
            serde_json::Value::Object(o) => {
                let old = std::mem::take(o);
                for (k, mut v) in old {
                    clean(&mut v);
                    o.insert(text(&k), v);
                }
            }
            _ => {}
        }
    }
    let s = v.to_string();
    if !s.contains("\\u0000") {
        return s;
    }
    let mut v = v.clone();
    clean(&mut v);
    v.to_string()
}

/// bigint is signed: a count past i64::MAX (never seen in practice) is clamped, not refused.
fn big(v: Option<u64>) -> Option<i64> {
    v.map(|x| i64::try_from(x).unwrap_or(i64::MAX))
}
