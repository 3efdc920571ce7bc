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

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dialect::Dialect;
use crate::prune::{Budget, Encoding, Mode, OnOverflow};

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
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// A string that must never be printed: `Debug`, `Display` and `Serialize` show `*****`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("*****")
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
    /// Default timeouts; each route may override them.
    pub timeouts: Timeouts,
    /// Per-conversation gates and in-flight caps.
    pub gates: Gates,
    /// How a request's conversation is identified.
    pub conversation: Conversation,
    /// Pruning defaults and the conversation view.
    pub prune: Prune,
    /// Transcript records.
    pub transcripts: crate::transcript::Settings,
    /// Routes, in file order. Matching picks the longest prefix.
    pub routes: Vec<Route>,
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

impl RoutePrune {
    /// The budget for a request's model: the first matching model entry, else the route's.
    pub fn budget_for(&self, model: Option<&str>) -> &Budget {
        if let Some(m) = model {
            for entry in &self.models {
                if glob_match(&entry.pattern, m) {
                    return &entry.budget;
                }
            }
        }
        &self.budget
    }
}

/// `*`-only glob matching (case-sensitive), enough for model names.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
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
        let mut m = s.serialize_map(Some(9))?;
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
}

/// The `[conversation]` table: where the conversation id comes from, first match wins.
#[derive(Debug, Clone, Serialize)]
pub struct Conversation {
    /// Request headers that carry a conversation id, in order of preference.
    pub headers: Vec<String>,
    /// A dotted path into the request body holding the id (e.g. `metadata.conversation_id`).
    pub body_field: Option<String>,
}

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
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            response_headers: Duration::from_secs(120),
            stream_idle: Duration::from_secs(60),
            total: Duration::from_secs(300),
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
    /// This route's pruning.
    pub prune: RoutePrune,
}

/// An upstream base URL split into the parts the forwarder needs.
#[derive(Debug, Clone, Default)]
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
// Raw TOML shapes.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    max_body_bytes: Option<u64>,
    shutdown_grace: Option<String>,
    timeouts: Option<RawTimeouts>,
    gates: Option<RawGates>,
    conversation: Option<RawConversation>,
    prune: Option<RawPrune>,
    transcripts: Option<RawTranscripts>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTranscripts {
    sink: Option<crate::transcript::SinkKind>,
    dir: Option<PathBuf>,
    postgres_url: Option<String>,
    queue_capacity: Option<usize>,
    batch_size: Option<usize>,
    flush_interval: Option<String>,
    include_bodies: Option<bool>,
    rotate_bytes: Option<u64>,
}

/// One `[prune]` table at any level; keys that only belong to one level are checked in
/// validation so the error can say where they go.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrune {
    enabled: Option<bool>,
    hard_token_limit: Option<u64>,
    target_tokens: Option<u64>,
    max_messages: Option<u64>,
    keep_file_content_turns: Option<u64>,
    min_file_lines: Option<u64>,
    reserve_output: Option<bool>,
    on_overflow: Option<OnOverflow>,
    mode: Option<Mode>,
    default_encoding: Option<String>,
    on_parse_error: Option<OnParseError>,
    view_max_bytes: Option<u64>,
    view_idle_ttl: Option<String>,
    models: Option<Vec<RawPrune>>,
    /// Only in `[[routes.prune.models]]`: the model-name pattern.
    #[serde(rename = "match")]
    pattern: Option<String>,
}

impl RawPrune {
    /// Keys set here that do not belong at this level (`level` names it for the error).
    fn misplaced(
        &self,
        allowed_view: bool,
        allowed_models: bool,
        allowed_match: bool,
    ) -> Option<&'static str> {
        let checks = [
            (
                "view_max_bytes",
                self.view_max_bytes.is_some() && !allowed_view,
            ),
            (
                "view_idle_ttl",
                self.view_idle_ttl.is_some() && !allowed_view,
            ),
            ("models", self.models.is_some() && !allowed_models),
            ("match", self.pattern.is_some() && !allowed_match),
            // Model entries refine the budget only; these switches belong to the route.
            ("enabled", self.enabled.is_some() && allowed_match),
            (
                "on_parse_error",
                self.on_parse_error.is_some() && allowed_match,
            ),
        ];
        checks.iter().find(|(_, bad)| *bad).map(|(k, _)| *k)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGates {
    max_concurrent_per_conversation: Option<usize>,
    max_queue_per_conversation: Option<usize>,
    queue_timeout: Option<String>,
    max_inflight: Option<usize>,
    idle_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConversation {
    headers: Option<Vec<String>>,
    body_field: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<String>,
    response_headers: Option<String>,
    stream_idle: Option<String>,
    total: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    prefix: String,
    upstream: String,
    dialect: Dialect,
    prewarm_connections: Option<usize>,
    tls: Option<RawTls>,
    timeouts: Option<RawTimeouts>,
    max_inflight: Option<usize>,
    prune: Option<RawPrune>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    extra_ca_file: Option<PathBuf>,
}

/// Default `max_body_bytes`: 32 MiB, well above any real prompt, far below a memory problem.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

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
        apply_env(&mut tree, env)?;
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
        raw.validate()
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

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let listen = parse_addr("listen", self.listen.as_deref().unwrap_or("127.0.0.1:8787"))?;
        let admin_listen = parse_addr(
            "admin_listen",
            self.admin_listen.as_deref().unwrap_or("127.0.0.1:9464"),
        )?;
        let max_body_bytes = self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err(ConfigError::new("max_body_bytes", "must be > 0, got 0"));
        }
        let shutdown_grace = match &self.shutdown_grace {
            Some(s) => parse_duration("shutdown_grace", s)?,
            None => Duration::from_secs(30),
        };
        let timeouts = resolve_timeouts(
            "timeouts",
            Timeouts::default(),
            self.timeouts.unwrap_or_default(),
        )?;

        let gates = validate_gates(self.gates.unwrap_or_default())?;
        let transcripts = validate_transcripts(self.transcripts.unwrap_or_default())?;
        let conversation = validate_conversation(self.conversation.unwrap_or_default())?;
        let raw_prune = self.prune.unwrap_or_default();
        if let Some(k) = raw_prune.misplaced(true, false, false) {
            return Err(ConfigError::new(
                format!("prune.{k}"),
                "not allowed here: model budgets belong to a route ([[routes.prune.models]] with match = \"…\")",
            ));
        }
        let prune = Prune {
            budget: refine_budget("prune", Budget::default(), &raw_prune)?,
            enabled: raw_prune.enabled.unwrap_or(true),
            on_parse_error: raw_prune.on_parse_error.unwrap_or(OnParseError::Forward),
            view_max_bytes: match raw_prune.view_max_bytes {
                Some(0) => {
                    return Err(ConfigError::new(
                        "prune.view_max_bytes",
                        "must be > 0, got 0",
                    ))
                }
                Some(n) => n,
                None => 256 * 1024 * 1024,
            },
            view_idle_ttl: match &raw_prune.view_idle_ttl {
                Some(v) => parse_duration("prune.view_idle_ttl", v)?,
                None => Duration::from_secs(3600),
            },
        };

        if self.routes.is_empty() {
            return Err(ConfigError::new(
                "routes",
                "at least one [[routes]] entry is required",
            ));
        }
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.into_iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            if r.name.is_empty()
                || !r
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::new(
                    key("name"),
                    format!(
                        "must be non-empty letters, digits, '-' or '_', got {:?}",
                        r.name
                    ),
                ));
            }
            if routes.iter().any(|o: &Route| o.name == r.name) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("must be unique, got {:?} twice", r.name),
                ));
            }
            if !r.prefix.starts_with('/') || !r.prefix.ends_with('/') || r.prefix.contains("//") {
                return Err(ConfigError::new(
                    key("prefix"),
                    format!(
                        "must start and end with '/' (e.g. \"/openai/\"), got {:?}",
                        r.prefix
                    ),
                ));
            }
            if routes.iter().any(|o: &Route| o.prefix == r.prefix) {
                return Err(ConfigError::new(
                    key("prefix"),
                    format!("must be unique, got {:?} twice", r.prefix),
                ));
            }
            let target = parse_upstream(&key("upstream"), &r.upstream)?;
            let tls = r.tls.unwrap_or_default();
            if let Some(ca) = &tls.extra_ca_file {
                if !ca.is_file() {
                    return Err(ConfigError::new(
                        key("tls.extra_ca_file"),
                        format!(
                            "must be a readable PEM file, got {:?}",
                            ca.display().to_string()
                        ),
                    ));
                }
            }
            let route_timeouts =
                resolve_timeouts(&key("timeouts"), timeouts, r.timeouts.unwrap_or_default())?;
            if r.max_inflight == Some(0) {
                return Err(ConfigError::new(key("max_inflight"), "must be > 0, got 0"));
            }
            let route_prune =
                validate_route_prune(&key("prune"), &prune, r.prune.unwrap_or_default())?;
            routes.push(Route {
                name: r.name,
                prefix: r.prefix,
                upstream: r.upstream,
                target,
                dialect: r.dialect,
                prewarm_connections: r.prewarm_connections.unwrap_or(1),
                tls: Tls {
                    extra_ca_file: tls.extra_ca_file,
                },
                timeouts: route_timeouts,
                max_inflight: r.max_inflight,
                prune: route_prune,
            });
        }
        Ok(Config {
            listen,
            admin_listen,
            max_body_bytes,
            shutdown_grace,
            timeouts,
            gates,
            conversation,
            prune,
            transcripts,
            routes,
        })
    }
}

/// Applies one `[prune]` level over `base`. Setting `hard_token_limit` without
/// `target_tokens` re-derives the target (60% of the new limit) instead of keeping a target
/// that belonged to another limit.
fn refine_budget(key: &str, base: Budget, raw: &RawPrune) -> Result<Budget, ConfigError> {
    let mut b = base;
    if let Some(h) = raw.hard_token_limit {
        if h == 0 {
            return Err(ConfigError::new(
                format!("{key}.hard_token_limit"),
                "must be > 0, got 0",
            ));
        }
        b.hard_token_limit = h;
        b.target_tokens = h * 6 / 10;
    }
    if let Some(t) = raw.target_tokens {
        if t == 0 || t > b.hard_token_limit {
            return Err(ConfigError::new(
                format!("{key}.target_tokens"),
                format!(
                    "must be between 1 and hard_token_limit ({}), got {t}",
                    b.hard_token_limit
                ),
            ));
        }
        b.target_tokens = t;
    }
    if let Some(v) = raw.max_messages {
        b.max_messages = v;
    }
    if let Some(v) = raw.keep_file_content_turns {
        b.keep_file_content_turns = v;
    }
    if let Some(v) = raw.min_file_lines {
        if v == 0 {
            return Err(ConfigError::new(
                format!("{key}.min_file_lines"),
                "must be > 0, got 0",
            ));
        }
        b.min_file_lines = v;
    }
    if let Some(v) = raw.reserve_output {
        b.reserve_output = v;
    }
    if let Some(v) = raw.on_overflow {
        b.on_overflow = v;
    }
    if let Some(v) = raw.mode {
        b.mode = v;
    }
    if let Some(e) = &raw.default_encoding {
        b.default_encoding = e.parse::<Encoding>().map_err(|_| {
            ConfigError::new(
                format!("{key}.default_encoding"),
                format!("must be \"o200k_base\" or \"cl100k_base\", got {e:?}"),
            )
        })?;
    }
    Ok(b)
}

fn validate_route_prune(
    key: &str,
    global: &Prune,
    raw: RawPrune,
) -> Result<RoutePrune, ConfigError> {
    if let Some(k) = raw.misplaced(false, true, false) {
        let why = if k.starts_with("view_") {
            "the conversation view is shared: set it in the top-level [prune] table"
        } else {
            "only allowed in a [[routes.prune.models]] entry"
        };
        return Err(ConfigError::new(format!("{key}.{k}"), why));
    }
    let budget = refine_budget(key, global.budget.clone(), &raw)?;
    let mut models = Vec::new();
    for (i, m) in raw.models.iter().flatten().enumerate() {
        let mkey = format!("{key}.models[{i}]");
        if let Some(k) = m.misplaced(false, false, true) {
            return Err(ConfigError::new(
                format!("{mkey}.{k}"),
                "not allowed in a model entry: set it in the route's [routes.prune] table",
            ));
        }
        let pattern = m.pattern.clone().unwrap_or_default();
        if pattern.is_empty() {
            return Err(ConfigError::new(
                format!("{mkey}.match"),
                "must be a model name pattern such as \"gpt-4o*\", got \"\"",
            ));
        }
        models.push(ModelPrune {
            pattern,
            budget: refine_budget(&mkey, budget.clone(), m)?,
        });
    }
    Ok(RoutePrune {
        enabled: raw.enabled.unwrap_or(global.enabled),
        on_parse_error: raw.on_parse_error.unwrap_or(global.on_parse_error),
        budget,
        models,
    })
}

fn validate_transcripts(raw: RawTranscripts) -> Result<crate::transcript::Settings, ConfigError> {
    use crate::transcript::{Settings, SinkKind};
    let d = Settings::default();
    let positive = |name: &str, v: Option<u64>, default: u64| match v {
        Some(0) => Err(ConfigError::new(
            format!("transcripts.{name}"),
            "must be > 0, got 0",
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    let sink = raw.sink.unwrap_or(d.sink);
    let postgres_url = raw.postgres_url.filter(|u| !u.is_empty()).map(Secret::new);
    if sink == SinkKind::Postgres && postgres_url.is_none() {
        return Err(ConfigError::new(
            "transcripts.postgres_url",
            "required when transcripts.sink = \"postgres\" (e.g. set CTXGATE_TRANSCRIPTS__POSTGRES_URL)",
        ));
    }
    Ok(Settings {
        sink,
        dir: raw.dir.unwrap_or(d.dir),
        postgres_url,
        queue_capacity: positive(
            "queue_capacity",
            raw.queue_capacity.map(|v| v as u64),
            d.queue_capacity as u64,
        )? as usize,
        batch_size: positive(
            "batch_size",
            raw.batch_size.map(|v| v as u64),
            d.batch_size as u64,
        )? as usize,
        flush_interval: match &raw.flush_interval {
            Some(v) => parse_duration("transcripts.flush_interval", v)?,
            None => d.flush_interval,
        },
        include_bodies: raw.include_bodies.unwrap_or(d.include_bodies),
        rotate_bytes: positive("rotate_bytes", raw.rotate_bytes, d.rotate_bytes)?,
    })
}

fn validate_gates(raw: RawGates) -> Result<Gates, ConfigError> {
    let positive = |name: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(ConfigError::new(
            format!("gates.{name}"),
            "must be > 0, got 0",
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    let duration = |name: &str, v: &Option<String>, default: u64| match v {
        Some(s) => parse_duration(&format!("gates.{name}"), s),
        None => Ok(Duration::from_secs(default)),
    };
    Ok(Gates {
        max_concurrent_per_conversation: positive(
            "max_concurrent_per_conversation",
            raw.max_concurrent_per_conversation,
            1,
        )?,
        // 0 is allowed: no queue, a busy conversation answers 429 at once.
        max_queue_per_conversation: raw.max_queue_per_conversation.unwrap_or(8),
        queue_timeout: duration("queue_timeout", &raw.queue_timeout, 60)?,
        max_inflight: positive("max_inflight", raw.max_inflight, 1024)?,
        idle_ttl: duration("idle_ttl", &raw.idle_ttl, 300)?,
    })
}

fn validate_conversation(raw: RawConversation) -> Result<Conversation, ConfigError> {
    let headers = raw
        .headers
        .unwrap_or_else(|| vec!["x-conversation-id".to_string()]);
    for (i, h) in headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            return Err(ConfigError::new(
                format!("conversation.headers[{i}]"),
                format!("must be a valid header name, got {h:?}"),
            ));
        }
    }
    if let Some(f) = &raw.body_field {
        if f.is_empty() || f.split('.').any(str::is_empty) {
            return Err(ConfigError::new(
                "conversation.body_field",
                format!("must be a dotted path such as \"metadata.conversation_id\", got {f:?}"),
            ));
        }
    }
    Ok(Conversation {
        headers: headers
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        body_field: raw.body_field,
    })
}

/// Applies a `[timeouts]` table over `base`. A `response_headers` or `stream_idle` written in
/// this table must not exceed the total; one inherited (a default, or the global value under a
/// route that only lowers `total`) is lowered to the total instead.
fn resolve_timeouts(key: &str, base: Timeouts, raw: RawTimeouts) -> Result<Timeouts, ConfigError> {
    let get = |name: &str, v: &Option<String>, d: Duration| match v {
        Some(s) => parse_duration(&format!("{key}.{name}"), s),
        None => Ok(d),
    };
    let total = get("total", &raw.total, base.total)?;
    let mut t = Timeouts {
        connect: get("connect", &raw.connect, base.connect)?,
        response_headers: get(
            "response_headers",
            &raw.response_headers,
            base.response_headers,
        )?,
        stream_idle: get("stream_idle", &raw.stream_idle, base.stream_idle)?,
        total,
    };
    for (name, explicit, d) in [
        (
            "response_headers",
            raw.response_headers.is_some(),
            &mut t.response_headers,
        ),
        ("stream_idle", raw.stream_idle.is_some(), &mut t.stream_idle),
    ] {
        if *d > total {
            if explicit {
                return Err(ConfigError::new(
                    format!("{key}.{name}"),
                    format!(
                        "must not exceed {key}.total ({}), got {}",
                        fmt_duration(total),
                        fmt_duration(*d)
                    ),
                ));
            }
            *d = total;
        }
    }
    Ok(t)
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("must be an address like \"127.0.0.1:8787\", got {s:?}"),
        )
    })
}

/// Parses a humantime duration (`"30s"`, `"2m"`, `"1500ms"`); zero is refused.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(ConfigError::new(key, format!("must be > 0, got {s:?}"))),
        Err(_) => Err(ConfigError::new(
            key,
            format!("must be a duration such as \"30s\", \"2m\" or \"500ms\", got {s:?}"),
        )),
    }
}

fn parse_upstream(key: &str, s: &str) -> Result<Upstream, ConfigError> {
    let bad = |why: &str| {
        ConfigError::new(
            key,
            format!("must be an http:// or https:// base URL ({why}), got {s:?}"),
        )
    };
    let uri: http::Uri = s.parse().map_err(|_| bad("not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        _ => return Err(bad("scheme must be http or https")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| bad("no host"))?
        .as_str()
        .to_string();
    if authority.contains('@') {
        return Err(bad("credentials in the URL are not allowed"));
    }
    if uri.query().is_some() {
        return Err(bad("no query string allowed"));
    }
    let mut base_path = uri.path().to_string();
    if !base_path.ends_with('/') {
        base_path.push('/');
    }
    Ok(Upstream {
        scheme: scheme.to_string(),
        authority,
        base_path,
    })
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

// ---------------------------------------------------------------------------------------------
// Environment overrides.

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "CTXGATE_";

/// Applies `CTXGATE_…` overrides to the parsed TOML tree.
///
/// The variable name after `CTXGATE_` is a path whose segments are separated by `__` (double
/// underscore) and matched case-insensitively against keys: `CTXGATE_LISTEN`,
/// `CTXGATE_TIMEOUTS__TOTAL`. A segment after `ROUTES` names a route by its `name` (with `-`
/// written as `_`) or by its index: `CTXGATE_ROUTES__OPENAI__UPSTREAM`,
/// `CTXGATE_ROUTES__0__PREWARM_CONNECTIONS`. The value is read as a TOML value when it parses
/// as one (`42`, `true`, `"text"`) and as a plain string otherwise. Variables outside this
/// scheme that start with `CTXGATE_` and match no key are errors, like unknown keys in the file.
pub fn apply_env(
    tree: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    // Sorted so that the order of application (and of errors) is stable.
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    for (name, value) in vars {
        // Variables the binary itself reads (the log filter) are not config keys.
        if name == "CTXGATE_LOG" || name == "CTXGATE_LOG_FORMAT" {
            continue;
        }
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|s| s.is_empty()) {
            return Err(ConfigError::new(
                name.clone(),
                "malformed override: separate keys with '__', e.g. CTXGATE_TIMEOUTS__TOTAL",
            ));
        }
        let parsed = parse_env_value(&value);
        set_path(tree, &path, parsed).map_err(|problem| ConfigError::new(name.clone(), problem))?;
    }
    Ok(())
}

fn parse_env_value(v: &str) -> toml::Value {
    let doc = format!("v = {v}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.to_string())),
        Err(_) => toml::Value::String(v.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((head, rest)) = path.split_first() else {
        return Err("empty key".into());
    };
    if head == "routes" {
        let Some((sel, rest)) = rest.split_first() else {
            return Err("routes cannot be replaced whole; name a route and a key".into());
        };
        let Some(toml::Value::Array(routes)) = table.get_mut("routes") else {
            return Err("no [[routes]] in the config to override".into());
        };
        let idx = match sel.parse::<usize>() {
            Ok(i) if i < routes.len() => i,
            Ok(i) => return Err(format!("no route at index {i}")),
            Err(_) => routes
                .iter()
                .position(|r| {
                    r.get("name")
                        .and_then(|n| n.as_str())
                        .map(|n| n.replace('-', "_").eq_ignore_ascii_case(sel))
                        .unwrap_or(false)
                })
                .ok_or_else(|| format!("no route named {sel:?}"))?,
        };
        let Some(toml::Value::Table(route)) = routes.get_mut(idx) else {
            return Err(format!("routes[{idx}] is not a table"));
        };
        return set_path(route, rest, value);
    }
    if rest.is_empty() {
        table.insert(head.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(head.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => set_path(t, rest, value),
        _ => Err(format!("{head} is not a table")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[routes]]
name = "openai"
prefix = "/openai/"
upstream = "https://api.openai.com/"
dialect = "openai"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Vec::new())
    }

    #[test]
    fn defaults() {
        let c = load(MIN).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.routes[0].prewarm_connections, 1);
        assert_eq!(c.routes[0].target.authority, "api.openai.com");
        assert_eq!(c.routes[0].target.base_path, "/");
        assert_eq!(c.routes[0].timeouts, Timeouts::default());
    }

    #[test]
    fn unknown_key_names_its_path() {
        let e = load(&format!("{MIN}bogus = 1\n")).unwrap_err();
        assert_eq!(e.key, "routes[0].bogus");
        assert!(e.problem.contains("unknown field `bogus`"), "{e}");
        let e = load(&format!("lisen = \"x\"\n{MIN}")).unwrap_err();
        assert!(e.to_string().contains("unknown field `lisen`"), "{e}");
    }

    #[test]
    fn bad_dialect_names_key_value_and_allowed() {
        let e = load(&MIN.replace("\"openai\"\n", "\"gemini\"\n")).unwrap_err();
        assert_eq!(e.key, "routes[0].dialect");
        assert!(
            e.problem.contains("gemini") && e.problem.contains("openai"),
            "{e}"
        );
    }

    #[test]
    fn bad_values() {
        let e = load(&MIN.replace("/openai/", "openai")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "routes[0].prefix: must start and end with '/' (e.g. \"/openai/\"), got \"openai\""
        );
        let e = load(&MIN.replace("https://api.openai.com/", "ftp://x/")).unwrap_err();
        assert_eq!(e.key, "routes[0].upstream");
        let e = load(&format!("shutdown_grace = \"soon\"\n{MIN}")).unwrap_err();
        assert_eq!(e.key, "shutdown_grace");
        assert!(e.problem.contains("\"soon\""));
        let e = load(&format!(
            "[timeouts]\ntotal = \"10s\"\nresponse_headers = \"5s\"\nstream_idle = \"20s\"\n{MIN}"
        ))
        .unwrap_err();
        assert_eq!(e.key, "timeouts.stream_idle");
        assert!(
            e.problem
                .contains("must not exceed timeouts.total (10s), got 20s"),
            "{e}"
        );
        let e = load(&format!(
            "{MIN}[routes.timeouts]\nresponse_headers = \"400s\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "routes[0].timeouts.response_headers");
        // Inherited values are lowered to a smaller total rather than refused.
        let c = load(&format!("[timeouts]\ntotal = \"30s\"\n{MIN}")).unwrap();
        assert_eq!(c.timeouts.response_headers, Duration::from_secs(30));
        assert_eq!(c.routes[0].timeouts.stream_idle, Duration::from_secs(30));
        let e = load(&format!("{MIN}max_inflight = 0\n")).unwrap_err();
        assert_eq!(e.to_string(), "routes[0].max_inflight: must be > 0, got 0");
        let e = load(&format!("[gates]\nqueue_timeout = \"0s\"\n{MIN}")).unwrap_err();
        assert_eq!(e.key, "gates.queue_timeout");
    }

    #[test]
    fn env_overrides() {
        let env = vec![
            ("CTXGATE_LISTEN".to_string(), "127.0.0.1:1".to_string()),
            ("CTXGATE_TIMEOUTS__TOTAL".to_string(), "500s".to_string()),
            (
                "CTXGATE_ROUTES__OPENAI__UPSTREAM".to_string(),
                "http://127.0.0.1:9/".to_string(),
            ),
            (
                "CTXGATE_ROUTES__0__PREWARM_CONNECTIONS".to_string(),
                "3".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let c = Config::from_toml(MIN, env).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:1");
        assert_eq!(c.timeouts.total, Duration::from_secs(500));
        assert_eq!(c.routes[0].timeouts.total, Duration::from_secs(500));
        assert_eq!(c.routes[0].target.authority, "127.0.0.1:9");
        assert_eq!(c.routes[0].prewarm_connections, 3);

        let e = Config::from_toml(MIN, vec![("CTXGATE_ROUTES__NOPE__NAME".into(), "x".into())])
            .unwrap_err();
        assert_eq!(e.key, "CTXGATE_ROUTES__NOPE__NAME");
        let e = Config::from_toml(MIN, vec![("CTXGATE_BOGUS".into(), "1".into())]).unwrap_err();
        assert!(e.problem.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn prune_levels_refine_each_other() {
        let text = format!(
            "[prune]\nhard_token_limit = 10000\nmax_messages = 0\n{MIN}[routes.prune]\nkeep_file_content_turns = 2\n\
             [[routes.prune.models]]\nmatch = \"gpt-4o*\"\nhard_token_limit = 8000\n\
             [[routes.prune.models]]\nmatch = \"*\"\ntarget_tokens = 5000\n"
        );
        let c = load(&text).unwrap();
        assert_eq!(c.prune.budget.hard_token_limit, 10000);
        assert_eq!(c.prune.budget.target_tokens, 6000);
        let r = &c.routes[0].prune;
        assert_eq!(r.budget.keep_file_content_turns, 2);
        assert_eq!(r.budget.max_messages, 0);
        let b = r.budget_for(Some("gpt-4o-mini"));
        assert_eq!(
            (
                b.hard_token_limit,
                b.target_tokens,
                b.keep_file_content_turns
            ),
            (8000, 4800, 2)
        );
        let b = r.budget_for(Some("claude-sonnet-4-5"));
        assert_eq!((b.hard_token_limit, b.target_tokens), (10000, 5000));
        assert_eq!(r.budget_for(None).hard_token_limit, 10000);

        let e = load(&format!("[prune]\ntarget_tokens = 5000\n{MIN}")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "prune.target_tokens: must be between 1 and hard_token_limit (4000), got 5000"
        );
        let e = load(&format!("[prune]\non_overflow = \"drop\"\n{MIN}")).unwrap_err();
        assert_eq!(e.key, "prune.on_overflow");
        assert!(e.problem.contains("`reject`, `truncate`, `forward`"), "{e}");
        let e = load(&format!(
            "{MIN}[[routes.prune.models]]\nhard_token_limit = 5\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "routes[0].prune.models[0].match");
        let e = load(&format!(
            "{MIN}[[routes.prune.models]]\nmatch = \"x\"\nenabled = false\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "routes[0].prune.models[0].enabled");
        let e = load(&format!("[prune]\nmatch = \"x\"\n{MIN}")).unwrap_err();
        assert_eq!(e.key, "prune.match");
        let e = load(&format!("{MIN}[routes.prune]\nview_max_bytes = 5\n")).unwrap_err();
        assert_eq!(e.key, "routes[0].prune.view_max_bytes");
        let e = load(&format!(
            "{MIN}[routes.prune]\ndefault_encoding = \"p50k\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.to_string(), "routes[0].prune.default_encoding: must be \"o200k_base\" or \"cl100k_base\", got \"p50k\"");
    }

    #[test]
    fn globs() {
        assert!(glob_match("gpt-4o*", "gpt-4o-mini"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("claude-*-4-5", "claude-sonnet-4-5"));
        assert!(!glob_match("claude-*-4-5", "claude-sonnet-4-1"));
        assert!(glob_match("glm-4", "glm-4"));
        assert!(!glob_match("glm-4", "glm-4.5"));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn transcripts_table() {
        let c = load(MIN).unwrap();
        assert_eq!(c.transcripts.sink, crate::transcript::SinkKind::Jsonl);
        assert_eq!(c.transcripts.queue_capacity, 1000);
        let e = load(&format!("[transcripts]\nsink = \"postgres\"\n{MIN}")).unwrap_err();
        assert_eq!(e.key, "transcripts.postgres_url");
        let e = load(&format!("[transcripts]\nsink = \"kafka\"\n{MIN}")).unwrap_err();
        assert_eq!(e.key, "transcripts.sink");
        let c = Config::from_toml(
            &format!("[transcripts]\nsink = \"postgres\"\n{MIN}"),
            vec![(
                "CTXGATE_TRANSCRIPTS__POSTGRES_URL".into(),
                "postgres://u:hunter2@db/x".into(),
            )],
        )
        .unwrap();
        let printed = c.to_toml();
        assert!(printed.contains("postgres_url = \"*****\""), "{printed}");
        assert!(!printed.contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn secret_is_masked() {
        let s = Secret::new("postgres://u:pw@h/db");
        assert_eq!(format!("{s:?}"), "*****");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"*****\"");
    }
}
