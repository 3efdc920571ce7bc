//! The `ctxgate` binary: CLI, logging, config loading (exit 64 on a bad config or bad
//! arguments), signals.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ctxgate",
    version,
    about = "A sidecar proxy that keeps LLM chat prompts inside a token budget"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective config (secrets masked).
    Check {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Prune a chat request read from stdin as the proxy would: the request on stdout, the
    /// summary on stderr.
    Prune {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// The route whose dialect and budget apply.
        #[arg(long, short)]
        route: String,
    },
    /// Print the prompt token count of a chat request read from stdin (tools included).
    Count {
        /// The config file (optional: without it the dialect is OpenAI's and the encoding
        /// follows the body's `model`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The route whose dialect and default encoding apply (needs --config).
        #[arg(long, short, requires = "config")]
        route: Option<String>,
    },
    /// Report what pruning saved, from transcript records: per route, model and UTC day, and
    /// the holdout against pruned conversations.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// A JSONL transcript directory (or one .jsonl file), or a postgres:// URL.
    source: String,
    /// Print the report as JSON (its shape is in the README) instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write the report as a self-contained HTML page to FILE.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// First UTC day covered.
    #[arg(long, value_name = "YYYY-MM-DD")]
    since: Option<ctxgate::report::Day>,
    /// Last UTC day covered.
    #[arg(long, value_name = "YYYY-MM-DD")]
    until: Option<ctxgate::report::Day>,
    /// Only this route.
    #[arg(long, value_name = "NAME")]
    route: Option<String>,
}

fn read_stdin() -> Result<Vec<u8>, ExitCode> {
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map_err(|e| {
        eprintln!("ctxgate: cannot read stdin: {e}");
        ExitCode::FAILURE
    })?;
    Ok(buf)
}

fn find_route<'a>(
    cfg: &'a ctxgate::Config,
    name: &str,
) -> Result<&'a ctxgate::config::Route, ExitCode> {
    cfg.route(name).ok_or_else(|| {
        let names: Vec<&str> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
        eprintln!(
            "ctxgate: no route named {name:?} (--route); routes: {}",
            names.join(", ")
        );
        ExitCode::from(EXIT_USAGE)
    })
}

#[allow(clippy::print_stdout)]
fn prune_cmd(config: &std::path::Path, route: &str) -> Result<ExitCode, ExitCode> {
    use ctxgate::prune::{ChatRequest, Counter, Outcome, View};
    use std::io::Write;
    let cfg = load(config)?;
    let route = find_route(&cfg, route)?;
    let body = read_stdin()?;
    let req = ChatRequest::parse(route.dialect, &body).map_err(|e| {
        eprintln!(
            "ctxgate: stdin is not a chat request in the {} dialect: {e}",
            route.dialect.as_str()
        );
        ExitCode::FAILURE
    })?;
    let budget = ctxgate::prune::Budget::for_request(&route.prune, req.model(), None);
    let counter = Counter::new(budget.default_encoding).map_err(|e| {
        eprintln!("ctxgate: {e}");
        ExitCode::FAILURE
    })?;
    let view = View::new(cfg.prune.view_max_bytes, cfg.prune.view_idle_ttl);
    let conversation = req.fingerprint(&route.name);
    let with = ctxgate::prune::With::default();
    let Some((outcome, _)) =
        ctxgate::proxy::prune_guarded(&req, &budget, &view, &conversation, &counter, with)
    else {
        eprintln!("ctxgate: pruning failed (a bug: please report it with the request)");
        return Err(ExitCode::FAILURE);
    };
    let (out, label): (&[u8], &str) = match &outcome {
        Outcome::Unchanged(_) => (&body, "unchanged"),
        Outcome::Shadow(_) => (&body, "shadow (forwarded unchanged)"),
        Outcome::Pruned { body, .. } => (body, "pruned"),
        Outcome::Rejected(r) => {
            eprintln!("ctxgate: rejected: {}", r.message);
            return Ok(ExitCode::from(2));
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out);
    let _ = stdout.write_all(b"\n");
    if let Some(s) = outcome.summary() {
        let pct = if s.tokens_before == 0 {
            0.0
        } else {
            100.0 * (1.0 - s.tokens_after as f64 / s.tokens_before as f64)
        };
        eprintln!(
            "{label}: route {}, budget {} tokens (target {}), {} messages max\n\
             BEFORE pruning: {} messages, {} chars, {}{} tokens\n\
             AFTER pruning: {}/{} messages kept, {} chars, {} tokens ({:.1}% reduction), {} files elided",
            route.name,
            budget.hard_token_limit,
            budget.target_tokens,
            budget.max_messages,
            s.messages_before,
            s.chars_before,
            if s.tokens_before_exact { "" } else { "~" },
            s.tokens_before,
            s.messages_after,
            s.messages_before,
            s.chars_after,
            s.tokens_after,
            pct,
            s.files_elided
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)]
fn count_cmd(config: Option<&std::path::Path>, route: Option<&str>) -> Result<ExitCode, ExitCode> {
    use ctxgate::prune::{ChatRequest, Counter, Encoding};
    let (dialect, encoding) = match (config, route) {
        (Some(path), Some(name)) => {
            let cfg = load(path)?;
            let r = find_route(&cfg, name)?;
            (r.dialect, r.prune.budget.default_encoding)
        }
        (Some(path), None) => (
            ctxgate::dialect::Dialect::OpenAi,
            load(path)?.prune.budget.default_encoding,
        ),
        _ => (ctxgate::dialect::Dialect::OpenAi, Encoding::O200kBase),
    };
    let body = read_stdin()?;
    let req = ChatRequest::parse(dialect, &body).map_err(|e| {
        eprintln!(
            "ctxgate: stdin is not a chat request in the {} dialect: {e}",
            dialect.as_str()
        );
        ExitCode::FAILURE
    })?;
    let counter = Counter::new(encoding).map_err(|e| {
        eprintln!("ctxgate: {e}");
        ExitCode::FAILURE
    })?;
    println!("{}", counter.count_request(&req));
    Ok(ExitCode::SUCCESS)
}

fn report_cmd(args: ReportArgs) -> ExitCode {
    use ctxgate::report::{html, text, Filter, Report, Source, Tally};
    use std::io::Write;
    if let (Some(since), Some(until)) = (&args.since, &args.until) {
        if since > until {
            eprintln!("ctxgate: --since {since} is after --until {until}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let mut tally = Tally::new(Filter {
        since: args.since,
        until: args.until,
        route: args.route,
    });
    let scan = match Source::parse(&args.source).load(&mut tally) {
        Ok(scan) => scan,
        Err(e) => {
            eprintln!("ctxgate: {e}");
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    if scan.malformed_lines > 0 {
        let at: Vec<String> = scan
            .malformed_at
            .iter()
            .map(|(file, line)| format!("{}:{line}", file.display()))
            .collect();
        eprintln!(
            "ctxgate: skipped {} line(s) that are not transcript records (first at {})",
            scan.malformed_lines,
            at.join(", ")
        );
    }
    let report = Report::new(tally, &scan);
    if let Some(path) = &args.html {
        if let Err(e) = std::fs::write(path, html::render(&report)) {
            eprintln!("ctxgate: cannot write {} (--html): {e}", path.display());
            return ExitCode::from(EXIT_CANT_CREATE);
        }
    }
    let out = if args.json {
        report.to_json() + "\n"
    } else {
        text::render(&report)
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

/// Exit code for a bad config or bad arguments (EX_USAGE from sysexits.h).
const EXIT_USAGE: u8 = 64;
/// Exit code for a report source that cannot be read (EX_NOINPUT).
const EXIT_NO_INPUT: u8 = 66;
/// Exit code for a report page that cannot be written (EX_CANTCREAT).
const EXIT_CANT_CREATE: u8 = 73;

fn load(path: &std::path::Path) -> Result<ctxgate::Config, ExitCode> {
    ctxgate::Config::load(path, std::env::vars()).map_err(|e| {
        eprintln!("ctxgate: invalid config {}: {e}", path.display());
        ExitCode::from(EXIT_USAGE)
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CTXGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("CTXGATE_LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(false);
    // Colours only on a terminal: logs collected from a container or a file stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        _ = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    // Bad arguments exit 64 like a bad config (clap's own code would be 2); help and
    // version print to stdout and exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                if !c.ignored_env.is_empty() {
                    eprintln!(
                        "ctxgate: note: ignoring environment variables that name no config key: {}",
                        c.ignored_env.join(", ")
                    );
                }
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Prune { config, route } => prune_cmd(&config, &route).unwrap_or_else(|c| c),
        Command::Count { config, route } => {
            count_cmd(config.as_deref(), route.as_deref()).unwrap_or_else(|c| c)
        }
        Command::Report(args) => report_cmd(args),
        Command::Serve { config } => {
            init_tracing();
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if !cfg.ignored_env.is_empty() {
                tracing::warn!(
                    variables = %cfg.ignored_env.join(", "),
                    "ignoring environment variables that name no config key"
                );
            }
            // server.io_threads event loops: this thread's (which also accepts and runs the
            // admin listener and the background tasks) and one thread each for the others.
            let loops = match ctxgate::server::EventLoops::start(cfg.server.loops()) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("ctxgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let handles = loops.handles();
            let code = loops.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("ctxgate: cannot listen on {} (listen): {e}", cfg.listen);
                        return ExitCode::FAILURE;
                    }
                };
                let admin = match tokio::net::TcpListener::bind(cfg.admin_listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!(
                            "ctxgate: cannot listen on {} (admin_listen): {e}",
                            cfg.admin_listen
                        );
                        return ExitCode::FAILURE;
                    }
                };
                let loops = ctxgate::server::Loops::new(handles);
                match ctxgate::serve_on(cfg, listener, admin, shutdown_signal(), loops).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("ctxgate: {e}");
                        ExitCode::from(EXIT_USAGE)
                    }
                }
            });
            loops.stop();
            code
        }
    }
}
