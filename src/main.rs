//! The `ctxgate` binary: CLI, logging, config loading (exit 64 on a bad config), signals.

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
}

/// Exit code for a bad config (EX_USAGE from sysexits.h).
const EXIT_CONFIG: u8 = 64;

fn load(path: &std::path::Path) -> Result<ctxgate::Config, ExitCode> {
    ctxgate::Config::load(path, std::env::vars()).map_err(|e| {
        eprintln!("ctxgate: invalid config {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CTXGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("CTXGATE_LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(false);
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve { config } => {
            init_tracing();
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ctxgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
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
                match ctxgate::serve(cfg, listener, admin, shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("ctxgate: {e}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                }
            })
        }
    }
}
