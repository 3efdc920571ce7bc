//! Configuration: `config.toml` → raw structs (`deny_unknown_fields`) → a validated [`Config`].
//!
//! Loading has three steps, each with errors that name the dotted key:
//! 1. the file is parsed as TOML into a tree;
//! 2. `CTXGATE_…` environment overrides are applied to that tree (see [`apply_env`]); the
//!    environment is passed in, so tests never touch the process environment;
//! 3. the tree is deserialised into `Raw*` structs (unknown keys are errors, reported with
//!    their path by `serde_path_to_error`) and validated into the typed [`Config`].
//!
//! Every error is a [`ConfigError`] whose message reads `key: problem, got value`; `main`
//! prints it and exits with code 64.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::prices::{Price, PriceEntry, Prices};
pub use crate::secret::Secret;

mod env;
mod raw;
#[cfg(test)]
mod tests;

pub use env::{apply_env, ENV_PREFIX};
use raw::RawConfig;
pub use raw::DEFAULT_MAX_BODY_BYTES;

/// A configuration problem: the dotted key, what is wrong, and what was given.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `routes[1].dialect`.
    pub key: String,
    /// What is wrong and what is allowed, including the value that was given.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Typed, validated configuration.

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: u64,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the process exits.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
    /// Client connections: how many, and how long each may take to send.
    pub server: Server,
    /// Default timeouts; each route may override them.
    pub timeouts: Timeouts,
    /// Per-conversation gates and in-flight caps.
    pub gates: Gates,
    /// How a request's conversation is identified.
    pub conversation: Conversation,
    /// Pruning defaults and the conversation view.
    pub prune: Prune,
    /// Transcript records.
    pub transcripts: TranscriptSettings,
    /// Where gates and the conversation view live: this process, or Redis shared by replicas.
    pub state: StateSettings,
    /// `[[prices]]`: model prices for cost estimates (before the shipped table).
    pub prices: Prices,
    /// Routes, in file order. Matching picks the longest prefix.
    pub routes: Vec<Route>,
    /// `CTXGATE_…` variables in the environment that name no config key (skipped; the binary
    /// warns about them once).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// The top-level `[prune]` table, resolved (routes and models refine it).
#[derive(Debug, Clone, Serialize)]
pub struct Prune {
    /// The default budget of every route.
    #[serde(flatten)]
    pub budget: Budget,
    /// Whether chat requests are pruned at all (per route overridable).
    pub enabled: bool,
    /// What to do with a chat request whose body is not a parseable chat body.
    pub on_parse_error: OnParseError,
    /// Memory bound of the conversation view (approximate bytes).
    pub view_max_bytes: u64,
    /// A conversation unused this long is dropped from the view.
    #[serde(serialize_with = "ser_duration")]
    pub view_idle_ttl: Duration,
}

/// A route's pruning: its budget and per-model budgets (first matching pattern wins).
#[derive(Debug, Clone, Serialize)]
pub struct RoutePrune {
    /// Whether chat requests of this route are pruned.
    pub enabled: bool,
    /// What to do with an unparseable chat body.
    pub on_parse_error: OnParseError,
    /// The route's budget.
    #[serde(flatten)]
    pub budget: Budget,
    /// `[[routes.prune.models]]`: budgets for models matching a pattern.
    pub models: Vec<ModelPrune>,
}

/// One `[[routes.prune.models]]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct ModelPrune {
    /// A model-name pattern: `*` matches any run of characters (`"gpt-4o*"`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// The budget for matching models.
    #[serde(flatten)]
    pub budget: Budget,
}

/// The `[server]` table: limits on client connections, each closing what would otherwise sit
/// open forever.
#[derive(Debug, Clone, Serialize)]
pub struct Server {
    /// Client connections open at once; past it ctxgate stops accepting until one closes.
    pub max_connections: usize,
    /// A new connection must send its first bytes (the request line, or the whole HTTP/2
    /// preface) within this.
    #[serde(serialize_with = "ser_duration")]
    pub first_bytes_timeout: Duration,
    /// An HTTP/1.1 request's headers must arrive within this (also bounds an idle keep-alive
    /// connection's wait for its next request).
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    /// A connection with no call in flight and no bytes either way for this long is closed
    /// (HTTP/2 and HTTP/1.1 alike).
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Longest gap between two chunks of a request body ctxgate reads whole (chat requests).
    #[serde(serialize_with = "ser_duration")]
    pub body_idle_timeout: Duration,
    /// Longest a request body ctxgate reads whole may take altogether.
    #[serde(serialize_with = "ser_duration")]
    pub body_total_timeout: Duration,
    /// How often freed heap memory is given back to the system (`malloc_trim`); zero: never.
    #[serde(serialize_with = "ser_duration")]
    pub memory_trim_interval: Duration,
    /// Event loops serving client connections, each a single-threaded tokio runtime on its
    /// own thread; 0: one per core. Each accepted connection goes to the loop with the fewest
    /// open connections and stays there.
    pub io_threads: usize,
}

impl Server {
    /// The number of event loops to run: `io_threads`, or one per core when it is 0.
    pub fn loops(&self) -> usize {
        match self.io_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            max_connections: 4096,
            first_bytes_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(30),
            body_total_timeout: Duration::from_secs(120),
            memory_trim_interval: Duration::from_secs(10),
            io_threads: 0,
        }
    }
}

/// Who answers a route's count-tokens requests (Anthropic `POST …/v1/messages/count_tokens`,
/// OpenAI `POST …/responses/input_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CountTokens {
    /// Forwarded to the upstream like any other request.
    #[default]
    Upstream,
    /// Answered by ctxgate with its own count, for upstreams that lack the endpoint
    /// (Anthropic-compatible endpoints of GLM, Kimi, DeepSeek).
    Local,
}

/// What happens to a chat request whose body cannot be parsed as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnParseError {
    /// Forward it unchanged (counted as `skipped`).
    Forward,
    /// Answer 400.
    Reject,
}

impl Serialize for Budget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(11))?;
        m.serialize_entry("hard_token_limit", &self.hard_token_limit)?;
        m.serialize_entry("target_tokens", &self.target_tokens)?;
        m.serialize_entry("max_messages", &self.max_messages)?;
        m.serialize_entry("keep_file_content_turns", &self.keep_file_content_turns)?;
        m.serialize_entry("min_file_lines", &self.min_file_lines)?;
        m.serialize_entry("reserve_output", &self.reserve_output)?;
        let overflow = match self.on_overflow {
            OnOverflow::Reject => "reject",
            OnOverflow::Truncate => "truncate",
            OnOverflow::Forward => "forward",
        };
        m.serialize_entry("on_overflow", overflow)?;
        let mode = match self.mode {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        };
        m.serialize_entry("mode", mode)?;
        m.serialize_entry("default_encoding", self.default_encoding.as_str())?;
        m.serialize_entry(
            "holdout_percent",
            &(f64::from(self.holdout_basis_points) / 100.0),
        )?;
        m.serialize_entry("summary", &*self.summary)?;
        m.end()
    }
}

/// The `[gates]` table.
#[derive(Debug, Clone, Serialize)]
pub struct Gates {
    /// Calls of one conversation in flight at once.
    pub max_concurrent_per_conversation: usize,
    /// Calls of one conversation waiting behind those in flight; more get 429 at once.
    pub max_queue_per_conversation: usize,
    /// Longest wait for admission; past it, 429.
    #[serde(serialize_with = "ser_duration")]
    pub queue_timeout: Duration,
    /// Calls in flight across all conversations and routes.
    pub max_inflight: usize,
    /// A conversation's gate is forgotten after this long unused (never while in use).
    #[serde(serialize_with = "ser_duration")]
    pub idle_ttl: Duration,
    /// Most conversation gates kept at once; past it the longest-idle unused one is forgotten,
    /// and a new conversation is refused (429) when all are in use.
    pub max_conversations: usize,
    /// Whether requests identified only by a fingerprint (no header or body id) are gated per
    /// conversation too. Off by default: a fingerprint is a guess, and k identical requests
    /// (an eval harness running one task k times) are k conversations.
    pub gate_fingerprinted: bool,
}

/// The `[conversation]` table: where the conversation id comes from, first match wins.
#[derive(Debug, Clone, Serialize)]
pub struct Conversation {
    /// Request headers that carry a conversation id, in order of preference.
    pub headers: Vec<String>,
    /// Dotted paths into the request body that carry one, in order of preference (after the
    /// headers).
    pub body_fields: Vec<String>,
}

/// The agents' own session headers, tried in this order: Claude Code's, Codex's (`thread-id`,
/// `session-id`, and older builds' `session_id`), then the generic `x-conversation-id`.
pub const DEFAULT_ID_HEADERS: [&str; 5] = [
    "x-claude-code-session-id",
    "thread-id",
    "session-id",
    "session_id",
    "x-conversation-id",
];

/// Body fields tried after the headers: OpenAI's `prompt_cache_key` (Codex sets it to its
/// conversation), then Anthropic's `metadata.user_id`, which names a conversation only when it
/// carries a session (Claude Code's does).
pub const DEFAULT_ID_FIELDS: [&str; 2] = ["prompt_cache_key", "metadata.user_id"];

/// Per-phase timeouts of one upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// TCP + TLS connect.
    #[serde(serialize_with = "ser_duration")]
    pub connect: Duration,
    /// From sending the request to the response headers (time to first byte).
    #[serde(serialize_with = "ser_duration")]
    pub response_headers: Duration,
    /// Longest gap between two body chunks of the response.
    #[serde(serialize_with = "ser_duration")]
    pub stream_idle: Duration,
    /// The whole call, from the request's arrival to the response's last byte.
    #[serde(serialize_with = "ser_duration")]
    pub total: Duration,
    /// Longest time a response chunk may wait for the client to take it (a client that stops
    /// reading): the call then ends, its permit and upstream connection are released.
    #[serde(serialize_with = "ser_duration")]
    pub client_write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            response_headers: Duration::from_secs(120),
            stream_idle: Duration::from_secs(60),
            total: Duration::from_secs(300),
            client_write: Duration::from_secs(30),
        }
    }
}

/// One `[[routes]]` entry: a path prefix served by one upstream.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// Short label for metrics, logs and `--route`.
    pub name: String,
    /// Path prefix, starting and ending with `/`.
    pub prefix: String,
    /// The upstream base URL, as written.
    pub upstream: String,
    /// The upstream's parts, split once at load.
    #[serde(skip)]
    pub target: Upstream,
    /// The wire format the upstream speaks.
    pub dialect: Dialect,
    /// Connections opened at start so the first call pays no handshake.
    pub prewarm_connections: usize,
    /// TLS settings for this upstream.
    pub tls: Tls,
    /// This route's timeouts (the global ones with the route's overrides applied).
    pub timeouts: Timeouts,
    /// Cap on this route's calls in flight (none: only the global cap applies).
    pub max_inflight: Option<usize>,
    /// Who answers count-tokens requests.
    pub count_tokens: CountTokens,
    /// This route's pruning.
    pub prune: RoutePrune,
}

/// An upstream base URL split into the parts the forwarder needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`, also sent as `Host`.
    pub authority: String,
    /// Base path, always ending in `/`.
    pub base_path: String,
}

/// TLS settings of a route.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tls {
    /// A PEM file of extra CA certificates trusted for this upstream, beside the system roots.
    pub extra_ca_file: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Values the concerns take from the config and re-export under their own names
// (`dialect::Dialect`, `prune::Budget`, `prune::Encoding`, `transcript::Settings`), so that
// every arrow between config and a concern points down to config.

/// Which wire format a route speaks (`routes[].dialect`); `dialect` has the implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// OpenAI-compatible chat completions: OpenAI, GLM, Kimi, DeepSeek, ….
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// OpenAI's Responses API. Not a route's value: an `openai` route serves it on its
    /// `…/responses` paths ([`Dialect::for_path`]).
    #[serde(rename = "openai-responses", skip_deserializing)]
    Responses,
}

impl Dialect {
    /// The config spelling (`"openai"` / `"anthropic"`), also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
            Dialect::Responses => "openai-responses",
        }
    }

    /// The dialect a request on a route of this dialect speaks: an `openai` route serves
    /// chat completions and, on `…/responses` and `…/responses/input_tokens`, the Responses
    /// API.
    pub fn for_path(self, path: &str) -> Dialect {
        match self {
            Dialect::OpenAi
                if path.ends_with("/responses") || path.ends_with("/responses/input_tokens") =>
            {
                Dialect::Responses
            }
            d => d,
        }
    }
}

/// The budget one request is pruned to (config `[prune]`, already resolved per route and
/// model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Hard limit on prompt tokens (`prune.hard_token_limit`).
    pub hard_token_limit: u64,
    /// Low-water mark the cut moves down to when the limit is crossed (resolved; config
    /// default 60% of the hard limit).
    pub target_tokens: u64,
    /// Cap on entries of `messages`; 0 = none.
    pub max_messages: u64,
    /// Turns (newest first) whose file contents are kept; older ones are elided.
    pub keep_file_content_turns: u64,
    /// Fenced code blocks shorter than this many lines are not elided.
    pub min_file_lines: u64,
    /// Subtract the request's `max_tokens` / `max_completion_tokens` from the hard limit.
    pub reserve_output: bool,
    /// What to do when the pinned part alone is over the limit.
    pub on_overflow: OnOverflow,
    /// Enforce, or only report.
    pub mode: Mode,
    /// Encoding for models whose name does not identify one (and all Anthropic requests).
    pub default_encoding: Encoding,
    /// Share of conversations forwarded unpruned as the holdout, in hundredths of a percent
    /// (`prune.holdout_percent` × 100).
    pub holdout_basis_points: u32,
    /// `[prune.summary]`: summaries of what the cut drops.
    pub summary: Arc<SummarySettings>,
}

/// `[prune.summary]`, resolved for one route and model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummarySettings {
    /// Summarise what the cut drops (off by default).
    pub enabled: bool,
    /// The route the summary call goes to (default: the request's own).
    pub route: Option<String>,
    /// The model that writes the summary.
    pub model: String,
    /// Path after the route's upstream URL (default by the route's dialect: `chat/completions`
    /// for openai, `v1/messages` for anthropic).
    pub path: Option<String>,
    /// The summary's `max_tokens`.
    pub max_tokens: u64,
    /// Longest the summary call may take.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// The instructions the summariser gets.
    pub prompt: String,
    /// A cut that drops fewer tokens than this is not summarised.
    pub min_dropped_tokens: u64,
    /// Environment variable holding the summary route's API key (default: the client's own
    /// credentials, only when the summary route has the request route's upstream).
    pub api_key_env: Option<String>,
}

/// The summariser's default instructions.
pub const DEFAULT_SUMMARY_PROMPT: &str = "You keep the running summary of a long conversation between a user and an AI assistant (often a coding agent). The messages below no longer fit in the assistant's context window; they will be replaced by your summary. If a previous summary is given, fold it in. Keep what the assistant needs to carry on: the user's goals and constraints, decisions made and why, files, functions and commands involved, facts learned, errors met and how they were fixed, and work still open. Be concise and concrete. Write plain text, without a preamble.";

impl Default for SummarySettings {
    fn default() -> Self {
        SummarySettings {
            enabled: false,
            route: None,
            model: String::new(),
            path: None,
            max_tokens: 1024,
            timeout: Duration::from_secs(60),
            prompt: DEFAULT_SUMMARY_PROMPT.to_string(),
            min_dropped_tokens: 1000,
            api_key_env: None,
        }
    }
}

impl Default for Budget {
    /// Room for a coding agent: 100,000 tokens (its system prompt and tools alone are
    /// 8,000-25,000), the cut moving down to 60,000, no message cap (a cap moves the cut every
    /// turn), file contents kept 1 turn. The small profile for short-context chat models
    /// (4,000 tokens, 5 messages) is `examples/small-chat.toml`.
    fn default() -> Self {
        Budget {
            hard_token_limit: 100_000,
            target_tokens: 60_000,
            max_messages: 0,
            keep_file_content_turns: 1,
            min_file_lines: 20,
            reserve_output: false,
            on_overflow: OnOverflow::Reject,
            mode: Mode::Enforce,
            default_encoding: Encoding::O200kBase,
            holdout_basis_points: 0,
            summary: Arc::new(SummarySettings::default()),
        }
    }
}

/// What to do when the pinned part alone is over the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOverflow {
    /// Answer 400 `context_length_exceeded` with the numbers.
    #[default]
    Reject,
    /// Cut the largest pinned text from the middle (marker inserted) until it fits.
    Truncate,
    /// Send the request as it came (counted in metrics).
    Forward,
}

/// Whether pruning is applied or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward the pruned body.
    #[default]
    Enforce,
    /// Compute and report; forward the original bytes.
    Shadow,
}

/// A tiktoken encoding ctxgate can count with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum Encoding {
    /// `o200k_base`: gpt-4o, gpt-4.1, o-series, gpt-5.
    #[serde(rename = "o200k_base")]
    O200kBase,
    /// `cl100k_base`: gpt-4, gpt-3.5-turbo.
    #[serde(rename = "cl100k_base")]
    Cl100kBase,
}

impl Encoding {
    /// The tiktoken name (`"o200k_base"` / `"cl100k_base"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }
}

/// The error of parsing an unknown encoding name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown encoding {0:?}: expected \"o200k_base\" or \"cl100k_base\"")]
pub struct UnknownEncoding(pub String);

impl FromStr for Encoding {
    type Err = UnknownEncoding;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "o200k_base" => Ok(Encoding::O200kBase),
            "cl100k_base" => Ok(Encoding::Cl100kBase),
            other => Err(UnknownEncoding(other.to_string())),
        }
    }
}

/// Where the gates and the conversation view live: `state.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// In this process (the default: a sidecar beside one agent).
    #[default]
    Memory,
    /// In Redis at `state.redis_url`, shared by every replica that names it.
    Redis,
}

/// What a replica does while Redis is unreachable or slow: `state.on_error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStateError {
    /// Falls back to its own in-memory gates and view, and goes back when Redis answers.
    #[default]
    Local,
    /// Answers 503 (`state_unavailable`) to calls that need the shared state.
    Reject,
}

/// The validated `[state]` table.
#[derive(Debug, Clone, Serialize)]
pub struct StateSettings {
    /// Memory or Redis.
    pub backend: StateBackend,
    /// `redis://[user:password@]host:port/db` or `rediss://…` (TLS); printed with the
    /// password masked.
    #[serde(serialize_with = "ser_masked_url")]
    pub redis_url: Option<Secret>,
    /// Prefix of every key ctxgate writes (several deployments can share one Redis).
    pub key_prefix: String,
    /// Longest one Redis round trip may take; past it the operation counts as failed.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// A permit's lease: a replica that dies holding one loses it after this (renewed every
    /// third of it while the call runs).
    #[serde(serialize_with = "ser_duration")]
    pub lease_ttl: Duration,
    /// What happens while Redis cannot be reached.
    pub on_error: OnStateError,
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            backend: StateBackend::Memory,
            redis_url: None,
            key_prefix: "ctxgate:".to_string(),
            timeout: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(10),
            on_error: OnStateError::Local,
        }
    }
}

/// `scheme://user:password@host…` with the password (or a lone user-info part) replaced by
/// `*****`; a URL without user info as it is.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "*****".to_string();
    };
    // Everything before the last '@' is user info, whatever it holds: a generated password
    // may contain '/', '?' or '#', which would otherwise end the authority early.
    match rest.rsplit_once('@') {
        None => url.to_string(),
        Some((userinfo, host)) => {
            let masked = match userinfo.split_once(':') {
                Some((user, _)) if !user.contains(['/', '?', '#']) => format!("{user}:*****"),
                _ => "*****".to_string(),
            };
            format!("{scheme}://{masked}@{host}")
        }
    }
}

fn ser_masked_url<S: serde::Serializer>(u: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match u {
        Some(u) => s.serialize_str(&mask_url(u.expose())),
        None => s.serialize_none(),
    }
}

/// Where records go: `transcripts.sink`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// JSON lines in rotated files under `transcripts.dir` (the default).
    #[default]
    Jsonl,
    /// Rows in the `ctxgate_transcripts` table at `transcripts.postgres_url`.
    Postgres,
    /// JSON lines on standard output.
    Stdout,
    /// Nowhere: records are discarded.
    None,
}

/// The validated `[transcripts]` table.
#[derive(Debug, Clone, Serialize)]
pub struct TranscriptSettings {
    /// Where records go.
    pub sink: SinkKind,
    /// Directory of the JSONL files (default `transcripts`).
    pub dir: PathBuf,
    /// PostgreSQL URL, required when `sink = "postgres"`; never printed.
    pub postgres_url: Option<Secret>,
    /// Records held at most before new ones are dropped (default 1000).
    pub queue_capacity: usize,
    /// Records written at most per batch (default 100).
    pub batch_size: usize,
    /// How long a partial batch waits for more records before it is written (default 1 s).
    #[serde(serialize_with = "ser_duration")]
    pub flush_interval: Duration,
    /// Whether records carry the pruned request messages and the response text.
    pub include_bodies: bool,
    /// Size at which a JSONL file is rotated (default 64 MiB).
    pub rotate_bytes: u64,
}

impl Default for TranscriptSettings {
    fn default() -> Self {
        TranscriptSettings {
            sink: SinkKind::Jsonl,
            dir: PathBuf::from("transcripts"),
            postgres_url: None,
            queue_capacity: 1000,
            batch_size: 100,
            flush_interval: Duration::from_secs(1),
            include_bodies: false,
            rotate_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Config {
    /// Loads a config file, applies `env` overrides and validates it.
    pub fn load(
        path: &std::path::Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        Config::from_toml(&text, env)
    }

    /// Parses TOML text, applies `env` overrides and validates.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::new("config", e.message().to_string()))?;
        let ignored_env = apply_env(&mut tree, env)?;
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
                let path = e.path().to_string();
                let key = if path == "." {
                    "config".to_string()
                } else {
                    path
                };
                ConfigError::new(key, e.into_inner().to_string())
            })?;
        let mut config = raw.validate()?;
        config.ignored_env = ignored_env;
        Ok(config)
    }

    /// The effective config as TOML, secrets masked (`ctxgate check` prints this).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The route with this name.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&fmt_duration(*d))
}

/// Formats a duration the way config files write it: `"120s"`, or `"1500ms"` when it is not
/// a whole number of seconds.
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        humantime::format_duration(d).to_string()
    }
}
