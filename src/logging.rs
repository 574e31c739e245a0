//! Logs through `tracing` to stderr: human-readable by default, JSON with
//! `--log-format json`; the level from `--log-level`, else `RUST_LOG`, else
//! `info`. stdout stays for command output.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid log level {level:?}: {source}")]
pub struct LogLevelError {
    level: String,
    source: tracing_subscriber::filter::ParseError,
}

pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), LogLevelError> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).map_err(|source| LogLevelError {
            level: level.to_string(),
            source,
        })?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests calling in twice) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    Ok(())
}
