//! The raw TOML shapes (`deny_unknown_fields`) and their validation into the typed
//! [`Config`](super::Config): every error names the dotted key, what is allowed and the value.

use super::*;

// ---------------------------------------------------------------------------------------------
// Raw TOML shapes.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    max_body_bytes: Option<u64>,
    shutdown_grace: Option<String>,
    server: Option<RawServer>,
    timeouts: Option<RawTimeouts>,
    gates: Option<RawGates>,
    conversation: Option<RawConversation>,
    prune: Option<RawPrune>,
    transcripts: Option<RawTranscripts>,
    state: Option<RawState>,
    #[serde(default)]
    prices: Vec<RawPrice>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

/// One `[[prices]]` entry: a model glob and its prices per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    #[serde(rename = "match")]
    pattern: String,
    input: f64,
    output: f64,
    cached_input: Option<f64>,
    cache_write: Option<f64>,
}

/// One `[prune.summary]` table at any level.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSummary {
    enabled: Option<bool>,
    route: Option<String>,
    model: Option<String>,
    path: Option<String>,
    max_tokens: Option<u64>,
    timeout: Option<String>,
    prompt: Option<String>,
    min_dropped_tokens: Option<u64>,
    api_key_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    backend: Option<StateBackend>,
    redis_url: Option<String>,
    key_prefix: Option<String>,
    timeout: Option<String>,
    lease_ttl: Option<String>,
    on_error: Option<OnStateError>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTranscripts {
    sink: Option<SinkKind>,
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
    holdout_percent: Option<f64>,
    summary: Option<RawSummary>,
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
struct RawServer {
    max_connections: Option<usize>,
    first_bytes_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    body_idle_timeout: Option<String>,
    body_total_timeout: Option<String>,
    memory_trim_interval: Option<String>,
    io_threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGates {
    max_concurrent_per_conversation: Option<usize>,
    max_queue_per_conversation: Option<usize>,
    queue_timeout: Option<String>,
    max_inflight: Option<usize>,
    idle_ttl: Option<String>,
    gate_fingerprinted: Option<bool>,
    max_conversations: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConversation {
    headers: Option<Vec<String>>,
    body_fields: Option<Vec<String>>,
    /// One more body field, tried before `body_fields` (the older, single form).
    body_field: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<String>,
    response_headers: Option<String>,
    stream_idle: Option<String>,
    total: Option<String>,
    client_write: Option<String>,
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
    count_tokens: Option<CountTokens>,
    prune: Option<RawPrune>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    extra_ca_file: Option<PathBuf>,
}

/// Every top-level key of the file (the fields of [`RawConfig`]): an environment variable
/// `CTXGATE_<KEY>…` is an override only when `<KEY>` is one of these.
pub(super) const TOP_LEVEL_KEYS: [&str; 13] = [
    "listen",
    "admin_listen",
    "max_body_bytes",
    "shutdown_grace",
    "server",
    "timeouts",
    "gates",
    "conversation",
    "prune",
    "transcripts",
    "state",
    "prices",
    "routes",
];

/// Default `max_body_bytes`: 32 MiB, well above any real prompt, far below a memory problem.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
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

        let server = validate_server(self.server.unwrap_or_default())?;
        let gates = validate_gates(self.gates.unwrap_or_default())?;
        let transcripts = validate_transcripts(self.transcripts.unwrap_or_default())?;
        let state = validate_state(self.state.unwrap_or_default())?;
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
                count_tokens: r.count_tokens.unwrap_or_default(),
                prune: route_prune,
            });
        }
        check_summary_routes(&routes)?;
        let prices = validate_prices(self.prices)?;
        Ok(Config {
            listen,
            admin_listen,
            max_body_bytes,
            shutdown_grace,
            server,
            timeouts,
            gates,
            conversation,
            prune,
            transcripts,
            state,
            prices,
            routes,
            ignored_env: Vec::new(),
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
    if let Some(v) = raw.holdout_percent {
        if !(0.0..=100.0).contains(&v) {
            return Err(ConfigError::new(
                format!("{key}.holdout_percent"),
                format!("must be between 0 and 100, got {v}"),
            ));
        }
        b.holdout_basis_points = (v * 100.0).round() as u32;
    }
    if let Some(s) = &raw.summary {
        b.summary = Arc::new(refine_summary(&format!("{key}.summary"), &b.summary, s)?);
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

/// Applies one `[prune.summary]` level over `base`.
fn refine_summary(
    key: &str,
    base: &SummarySettings,
    raw: &RawSummary,
) -> Result<SummarySettings, ConfigError> {
    let mut s = base.clone();
    if let Some(v) = raw.enabled {
        s.enabled = v;
    }
    if let Some(v) = &raw.route {
        s.route = Some(v.clone()).filter(|r| !r.is_empty());
    }
    if let Some(v) = &raw.model {
        s.model = v.clone();
    }
    if let Some(v) = &raw.path {
        if v.starts_with('/') || v.contains("..") || v.contains("://") {
            return Err(ConfigError::new(
                format!("{key}.path"),
                format!("must be a relative path such as \"chat/completions\", got {v:?}"),
            ));
        }
        s.path = Some(v.clone()).filter(|p| !p.is_empty());
    }
    if let Some(v) = raw.max_tokens {
        if v == 0 {
            return Err(ConfigError::new(
                format!("{key}.max_tokens"),
                "must be > 0, got 0",
            ));
        }
        s.max_tokens = v;
    }
    if let Some(v) = &raw.timeout {
        s.timeout = parse_duration(&format!("{key}.timeout"), v)?;
    }
    if let Some(v) = &raw.prompt {
        if v.trim().is_empty() {
            return Err(ConfigError::new(
                format!("{key}.prompt"),
                "must not be empty",
            ));
        }
        s.prompt = v.clone();
    }
    if let Some(v) = raw.min_dropped_tokens {
        s.min_dropped_tokens = v;
    }
    if let Some(v) = &raw.api_key_env {
        s.api_key_env = Some(v.clone()).filter(|e| !e.is_empty());
    }
    if s.enabled && s.model.is_empty() {
        return Err(ConfigError::new(
            format!("{key}.model"),
            "must name the model that writes summaries when summaries are enabled",
        ));
    }
    Ok(s)
}

/// Checks each route's summary settings (and its model entries') against the routes: the
/// summary route must exist, and a summary sent to another upstream must carry its own key
/// (`api_key_env`): the client's credentials only ever go to the upstream they were meant for.
fn check_summary_routes(routes: &[Route]) -> Result<(), ConfigError> {
    for (i, r) in routes.iter().enumerate() {
        let levels = std::iter::once((format!("routes[{i}].prune.summary"), &r.prune.budget))
            .chain(
                r.prune
                    .models
                    .iter()
                    .enumerate()
                    .map(|(j, m)| (format!("routes[{i}].prune.models[{j}].summary"), &m.budget)),
            );
        for (key, b) in levels {
            let s = &b.summary;
            if !s.enabled {
                continue;
            }
            let name = s.route.as_deref().unwrap_or(&r.name);
            let Some(target) = routes.iter().find(|o| o.name == name) else {
                return Err(ConfigError::new(
                    format!("{key}.route"),
                    format!("must name a route, got {name:?}"),
                ));
            };
            // The same upstream means the same scheme, host and base path: one host can front
            // several providers (a gateway), and http is not https.
            if target.target != r.target && s.api_key_env.is_none() {
                return Err(ConfigError::new(
                    format!("{key}.api_key_env"),
                    format!(
                        "must name the variable holding a key for route {name:?}: its upstream is not this route's, and a client's credentials are never sent to another upstream"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_prices(raw: Vec<RawPrice>) -> Result<Prices, ConfigError> {
    let mut entries = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("prices[{i}].{k}");
        if r.pattern.is_empty() {
            return Err(ConfigError::new(
                key("match"),
                "must be a model name pattern such as \"gpt-4o*\", got \"\"",
            ));
        }
        let check = |k: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(ConfigError::new(
                    key(k),
                    format!("must be a price >= 0 in US dollars per million tokens, got {v}"),
                ))
            }
        };
        let input = check("input", r.input)?;
        entries.push(PriceEntry {
            pattern: r.pattern,
            price: Price {
                input,
                output: check("output", r.output)?,
                cached_input: check("cached_input", r.cached_input.unwrap_or(input))?,
                cache_write: check("cache_write", r.cache_write.unwrap_or(input))?,
            },
        });
    }
    Ok(Prices { entries })
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

fn validate_state(raw: RawState) -> Result<StateSettings, ConfigError> {
    let d = StateSettings::default();
    let backend = raw.backend.unwrap_or(d.backend);
    let redis_url = raw.redis_url.filter(|u| !u.is_empty()).map(Secret::new);
    if let Some(u) = &redis_url {
        let scheme = u.expose().split("://").next().unwrap_or_default();
        if !matches!(scheme, "redis" | "rediss") || !u.expose().contains("://") {
            return Err(ConfigError::new(
                "state.redis_url",
                format!(
                    "must be a redis:// or rediss:// URL, got {}",
                    crate::config::mask_url(u.expose())
                ),
            ));
        }
    }
    if backend == StateBackend::Redis && redis_url.is_none() {
        return Err(ConfigError::new(
            "state.redis_url",
            "required when state.backend = \"redis\" (e.g. set CTXGATE_STATE__REDIS_URL)",
        ));
    }
    let positive = |name: &str, v: &Option<String>, default: Duration| match v {
        Some(s) => {
            let key = format!("state.{name}");
            let d = parse_duration(&key, s)?;
            if d.is_zero() {
                return Err(ConfigError::new(key, "must be > 0"));
            }
            Ok(d)
        }
        None => Ok(default),
    };
    let timeout = positive("timeout", &raw.timeout, d.timeout)?;
    let lease_ttl = positive("lease_ttl", &raw.lease_ttl, d.lease_ttl)?;
    if lease_ttl < timeout * 4 {
        return Err(ConfigError::new(
            "state.lease_ttl",
            format!(
                "must be at least 4 × state.timeout ({timeout:?}): a lease is renewed every third of it, and a renewal may take a timeout"
            ),
        ));
    }
    Ok(StateSettings {
        backend,
        redis_url,
        key_prefix: raw.key_prefix.unwrap_or(d.key_prefix),
        timeout,
        lease_ttl,
        on_error: raw.on_error.unwrap_or(d.on_error),
    })
}

fn validate_transcripts(raw: RawTranscripts) -> Result<TranscriptSettings, ConfigError> {
    let d = TranscriptSettings::default();
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
    Ok(TranscriptSettings {
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

fn validate_server(raw: RawServer) -> Result<Server, ConfigError> {
    let d = Server::default();
    let duration = |name: &str, v: &Option<String>, default: Duration| match v {
        Some(s) => parse_duration(&format!("server.{name}"), s),
        None => Ok(default),
    };
    let max_connections = match raw.max_connections {
        Some(0) => {
            return Err(ConfigError::new(
                "server.max_connections",
                "must be > 0, got 0",
            ))
        }
        Some(n) => n,
        None => d.max_connections,
    };
    Ok(Server {
        max_connections,
        first_bytes_timeout: duration(
            "first_bytes_timeout",
            &raw.first_bytes_timeout,
            d.first_bytes_timeout,
        )?,
        header_read_timeout: duration(
            "header_read_timeout",
            &raw.header_read_timeout,
            d.header_read_timeout,
        )?,
        idle_timeout: duration("idle_timeout", &raw.idle_timeout, d.idle_timeout)?,
        body_idle_timeout: duration(
            "body_idle_timeout",
            &raw.body_idle_timeout,
            d.body_idle_timeout,
        )?,
        body_total_timeout: duration(
            "body_total_timeout",
            &raw.body_total_timeout,
            d.body_total_timeout,
        )?,
        memory_trim_interval: match raw.memory_trim_interval.as_deref() {
            Some("0") | Some("0s") | Some("off") => Duration::ZERO,
            v => duration(
                "memory_trim_interval",
                &v.map(str::to_string),
                d.memory_trim_interval,
            )?,
        },
        io_threads: raw.io_threads.unwrap_or(d.io_threads),
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
        max_conversations: positive("max_conversations", raw.max_conversations, 100_000)?,
        gate_fingerprinted: raw.gate_fingerprinted.unwrap_or(false),
    })
}

fn validate_conversation(raw: RawConversation) -> Result<Conversation, ConfigError> {
    let headers = raw
        .headers
        .unwrap_or_else(|| DEFAULT_ID_HEADERS.map(str::to_string).to_vec());
    for (i, h) in headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            return Err(ConfigError::new(
                format!("conversation.headers[{i}]"),
                format!("must be a valid header name, got {h:?}"),
            ));
        }
    }
    let mut body_fields: Vec<(String, String)> = Vec::new();
    if let Some(f) = raw.body_field {
        body_fields.push(("conversation.body_field".into(), f));
    }
    let fields = raw
        .body_fields
        .unwrap_or_else(|| DEFAULT_ID_FIELDS.map(str::to_string).to_vec());
    for (i, f) in fields.into_iter().enumerate() {
        body_fields.push((format!("conversation.body_fields[{i}]"), f));
    }
    for (key, f) in &body_fields {
        if f.is_empty() || f.split('.').any(str::is_empty) {
            return Err(ConfigError::new(
                key.clone(),
                format!("must be a dotted path such as \"metadata.conversation_id\", got {f:?}"),
            ));
        }
    }
    Ok(Conversation {
        headers: headers
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        body_fields: body_fields.into_iter().map(|(_, f)| f).collect(),
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
        client_write: get("client_write", &raw.client_write, base.client_write)?,
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
