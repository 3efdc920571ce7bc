//! Config loading: defaults, validation errors naming the key, env overrides.

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
    // A misspelt key under a real table is an error, like one in the file...
    let e = Config::from_toml(
        MIN,
        vec![("CTXGATE_PRUNE__HARD_TOKEN_LIMT".into(), "1".into())],
    )
    .unwrap_err();
    assert!(e.problem.contains("unknown field `hard_token_limt`"), "{e}");
    // ...but a variable that names no config key at all (another tool's CTXGATE_BIN) is
    // skipped and reported, never a reason not to start.
    let c = Config::from_toml(
        MIN,
        vec![
            ("CTXGATE_BIN".into(), "/usr/local/bin/ctxgate".into()),
            ("CTXGATE_HOME".into(), "/opt".into()),
            ("CTXGATE_LOG".into(), "debug".into()),
        ],
    )
    .unwrap();
    assert_eq!(c.ignored_env, ["CTXGATE_BIN", "CTXGATE_HOME"]);
    assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
}

#[test]
fn every_top_level_key_is_one_the_file_accepts() {
    use super::raw::TOP_LEVEL_KEYS;
    for key in TOP_LEVEL_KEYS {
        let e = load(&format!("{key} = []\n"));
        // Each key is known: a wrong type is an error about its value, never "unknown field".
        if let Err(e) = e {
            assert!(!e.problem.contains("unknown field"), "{key}: {e}");
        }
    }
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
    let b = Budget::for_request(r, Some("gpt-4o-mini"), None);
    assert_eq!(
        (
            b.hard_token_limit,
            b.target_tokens,
            b.keep_file_content_turns
        ),
        (8000, 4800, 2)
    );
    let b = Budget::for_request(r, Some("claude-sonnet-4-5"), None);
    assert_eq!((b.hard_token_limit, b.target_tokens), (10000, 5000));
    assert_eq!(Budget::for_request(r, None, None).hard_token_limit, 10000);

    let e = load(&format!("[prune]\ntarget_tokens = 500000\n{MIN}")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "prune.target_tokens: must be between 1 and hard_token_limit (100000), got 500000"
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
    assert_eq!(
        e.to_string(),
        "routes[0].prune.default_encoding: must be \"o200k_base\" or \"cl100k_base\", got \"p50k\""
    );
}

#[test]
fn transcripts_table() {
    let c = load(MIN).unwrap();
    assert_eq!(c.transcripts.sink, SinkKind::Jsonl);
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

#[test]
fn count_tokens_is_upstream_unless_local_and_responses_is_no_route_value() {
    assert_eq!(
        load(MIN).unwrap().routes[0].count_tokens,
        CountTokens::Upstream
    );
    let c = load(&format!("{MIN}count_tokens = \"local\"\n")).unwrap();
    assert_eq!(c.routes[0].count_tokens, CountTokens::Local);
    let e = load(&format!("{MIN}count_tokens = \"remote\"\n")).unwrap_err();
    assert_eq!(e.key, "routes[0].count_tokens");
    assert!(
        e.problem.contains("remote") && e.problem.contains("local"),
        "{e}"
    );
    // The Responses API is served by "openai" routes; it is not a route's dialect.
    let e = load(&MIN.replace("\"openai\"\n", "\"openai-responses\"\n")).unwrap_err();
    assert_eq!(e.key, "routes[0].dialect");
    assert_eq!(
        Dialect::OpenAi.for_path("/v1/responses"),
        Dialect::Responses
    );
    assert_eq!(
        Dialect::OpenAi.for_path("/v1/responses/input_tokens"),
        Dialect::Responses
    );
    assert_eq!(
        Dialect::OpenAi.for_path("/v1/chat/completions"),
        Dialect::OpenAi
    );
    assert_eq!(
        Dialect::Anthropic.for_path("/v1/responses"),
        Dialect::Anthropic
    );
}

#[test]
fn server_limits_default_and_validate() {
    let c = load(MIN).unwrap();
    assert_eq!(c.server.max_connections, 4096);
    assert_eq!(c.server.first_bytes_timeout, Duration::from_secs(10));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(30));
    assert_eq!(c.server.memory_trim_interval, Duration::from_secs(10));
    let c = load(&format!(
        "[server]\nmemory_trim_interval = \"0\"\nidle_timeout = \"2m\"\n{MIN}"
    ))
    .unwrap();
    assert_eq!(c.server.memory_trim_interval, Duration::ZERO);
    assert_eq!(c.server.idle_timeout, Duration::from_secs(120));
    let e = load(&format!("[server]\nmax_connections = 0\n{MIN}")).unwrap_err();
    assert_eq!(e.to_string(), "server.max_connections: must be > 0, got 0");
    let e = load(&format!("[server]\nheader_read_timeout = \"soon\"\n{MIN}")).unwrap_err();
    assert_eq!(e.key, "server.header_read_timeout");
    let e = load(&format!("[server]\nbogus = 1\n{MIN}")).unwrap_err();
    assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
}

#[test]
fn state_defaults_validate_and_the_password_never_prints() {
    let c = load(MIN).unwrap();
    assert_eq!(c.state.backend, StateBackend::Memory);
    assert_eq!(c.state.on_error, OnStateError::Local);
    assert_eq!(c.state.lease_ttl, Duration::from_secs(10));
    assert_eq!(c.state.key_prefix, "ctxgate:");
    let url = "redis://app:s3cret-pass@redis.internal:6380/2";
    let c = load(&format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"{url}\"\non_error = \"reject\"\ntimeout = \"100ms\"\nlease_ttl = \"2s\"\n{MIN}"
    ))
    .unwrap();
    assert_eq!(c.state.backend, StateBackend::Redis);
    assert_eq!(c.state.on_error, OnStateError::Reject);
    assert_eq!(c.state.redis_url.as_ref().unwrap().expose(), url);
    let shown = c.to_toml();
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains("redis://app:*****@redis.internal:6380/2"),
        "{shown}"
    );
    assert!(!format!("{c:?}").contains("s3cret"));
    assert_eq!(mask_url("rediss://:pw@h:1"), "rediss://:*****@h:1");
    assert_eq!(mask_url("redis://tok@h"), "redis://*****@h");
    assert_eq!(mask_url("redis://h:6379/0"), "redis://h:6379/0");
    assert_eq!(
        mask_url("redis://:ab/cd?e#f@host:6379/0"),
        "redis://:*****@host:6379/0",
        "a password with '/', '?' or '#' in it"
    );

    let e = load(&format!("[state]\nbackend = \"redis\"\n{MIN}")).unwrap_err();
    assert_eq!(e.key, "state.redis_url");
    let e = load(&format!("[state]\nredis_url = \"http://u:pw@h\"\n{MIN}")).unwrap_err();
    assert_eq!(e.key, "state.redis_url");
    assert!(!e.to_string().contains("pw@"), "{e}");
    let e = load(&format!(
        "[state]\ntimeout = \"1s\"\nlease_ttl = \"2s\"\n{MIN}"
    ))
    .unwrap_err();
    assert_eq!(e.key, "state.lease_ttl");
    let e = load(&format!("[state]\nbackend = \"etcd\"\n{MIN}")).unwrap_err();
    assert!(e.to_string().contains("etcd"), "{e}");
}

#[test]
fn holdout_summary_and_prices() {
    let c = load(MIN).unwrap();
    assert_eq!(c.prune.budget.holdout_basis_points, 0);
    assert!(!c.prune.budget.summary.enabled);
    assert!(c.prices.entries.is_empty());

    let text = format!(
        r#"
[prune]
holdout_percent = 12.5
[prune.summary]
enabled = true
model = "gpt-4.1-mini"
timeout = "5s"
[[prices]]
match = "gpt-4.1-mini*"
input = 0.4
output = 1.6
{MIN}
[routes.prune.summary]
max_tokens = 300
[[routes.prune.models]]
match = "o3*"
holdout_percent = 0
summary.enabled = false
"#
    );
    let c = load(&text).unwrap();
    assert_eq!(c.prune.budget.holdout_basis_points, 1250);
    let s = &c.routes[0].prune.budget.summary;
    assert_eq!(
        (s.enabled, s.model.as_str(), s.max_tokens, s.timeout),
        (true, "gpt-4.1-mini", 300, Duration::from_secs(5))
    );
    let m = &c.routes[0].prune.models[0].budget;
    assert_eq!((m.holdout_basis_points, m.summary.enabled), (0, false));
    assert_eq!(m.summary.max_tokens, 300, "inherited from the route");
    let p = c.prices.entries[0].price;
    assert_eq!(
        (p.input, p.cached_input, p.cache_write, p.output),
        (0.4, 0.4, 0.4, 1.6)
    );

    let bad = |extra: &str, key: &str, says: &str| {
        let e = load(&format!("{extra}\n{MIN}")).unwrap_err();
        assert_eq!(e.key, key, "{e}");
        assert!(e.problem.contains(says), "{e}");
    };
    bad(
        "[prune]\nholdout_percent = 101",
        "prune.holdout_percent",
        "between 0 and 100",
    );
    bad(
        "[prune.summary]\nenabled = true",
        "prune.summary.model",
        "must name the model",
    );
    bad(
        "[prune.summary]\npath = \"/v1/x\"",
        "prune.summary.path",
        "relative path",
    );
    bad(
        "[prune.summary]\nmax_tokens = 0",
        "prune.summary.max_tokens",
        "> 0",
    );
    bad(
        "[[prices]]\nmatch = \"x\"\ninput = -1\noutput = 1",
        "prices[0].input",
        ">= 0",
    );

    // A summary route elsewhere needs its own key: the client's never leaves its upstream.
    let other = r#"
[[routes]]
name = "cheap"
prefix = "/cheap/"
upstream = "https://api.deepseek.com/"
dialect = "openai"
"#;
    let e = load(&format!(
        "[prune.summary]\nenabled = true\nmodel = \"deepseek-chat\"\nroute = \"cheap\"\n{MIN}{other}"
    ))
    .unwrap_err();
    assert_eq!(e.key, "routes[0].prune.summary.api_key_env", "{e}");
    let ok = format!(
        "[prune.summary]\nenabled = true\nmodel = \"deepseek-chat\"\nroute = \"cheap\"\napi_key_env = \"DEEPSEEK_KEY\"\n{MIN}{other}"
    );
    assert!(load(&ok).is_ok());
    let e = load(&format!(
        "[prune.summary]\nenabled = true\nmodel = \"m\"\nroute = \"nope\"\n{MIN}"
    ))
    .unwrap_err();
    assert_eq!(e.key, "routes[0].prune.summary.route", "{e}");
}
