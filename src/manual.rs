//! Shell completions and the man page, generated from the clap definitions
//! in `cli.rs` so they can never disagree with the parser:
//! `keyroll completions SHELL` (clap_complete) and `keyroll manpage`
//! (clap_mangen plus a few hand-written sections). `make install` installs
//! both. Neither needs a config.

use std::io::Write;

use clap::CommandFactory;
use clap_mangen::roff::{bold, italic, roman, Roff};

use crate::cli::Cli;

/// A failure to write the generated text.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to stdout: {0}")]
pub struct WriteError(#[from] std::io::Error);

/// The completion script for `shell`, for the binary named `keyroll`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    // Rendered into memory: clap_complete panics on a failed write, and a
    // closed stdout is an ordinary error, not a bug.
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "keyroll", &mut out);
    out
}

/// The keyroll(1) man page, in roff.
pub fn manpage() -> Result<Vec<u8>, WriteError> {
    let mut cmd = Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    // clap_mangen's own SUBCOMMANDS section only points at keyroll-run(1)
    // and the like, pages we do not ship: one page documents every command.
    commands_section(&cmd).to_writer(&mut out)?;
    trailing_sections().to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(once_preamble(&out))
}

/// Each roff fragment starts with the same two-line string definition
/// (`.ie \n(.g .ds Aq ...`); one at the top of the page is enough.
fn once_preamble(page: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let mut seen = std::collections::HashSet::new();
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let preamble = line.starts_with(".ie \\n(.g .ds Aq") || line.starts_with(".el .ds Aq");
        if preamble && !seen.insert(line.to_string()) {
            continue;
        }
        out.push_str(line);
    }
    out.into_bytes()
}

/// Writes generated text to stdout.
pub fn print(bytes: &[u8]) -> Result<(), WriteError> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()?;
    Ok(())
}

/// COMMANDS: each subcommand's usage line, summary and arguments.
fn commands_section(cmd: &clap::Command) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let usage = sub.clone().render_usage().to_string();
        let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage).to_string();
        roff.control("TP", []);
        roff.text([bold(usage)]);
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            roff.text([roman(about.to_string())]);
        }
        let args: Vec<_> = sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .collect();
        if args.is_empty() {
            continue;
        }
        roff.control("RS", []);
        for arg in args {
            roff.control("TP", []);
            roff.text([bold(arg_name(arg))]);
            if let Some(help) = arg.get_long_help().or_else(|| arg.get_help()) {
                roff.text([roman(help.to_string())]);
            }
        }
        roff.control("RE", []);
    }
    roff
}

/// `--alg ALG`, `--now`, or `KEYSET` for a positional argument.
fn arg_name(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map(|name| name.to_string())
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    match arg.get_long() {
        Some(long) if arg.get_action().takes_values() => format!("--{long} {value}"),
        Some(long) => format!("--{long}"),
        None => value,
    }
}

/// EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO: what an operator looks
/// up in a man page and clap does not know.
fn trailing_sections() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in [
        ("0", "success"),
        (
            "1",
            "runtime failure (store unreadable, key generation failed, ...)",
        ),
        (
            "2",
            "usage error or invalid config; the message names the key and its line",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(code)]);
        roff.text([roman(meaning)]);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, meaning) in [
        ("KEYROLL_CONFIG", "the config file, as --config"),
        (
            "STATE_DIRECTORY",
            "the default state_dir (set by systemd's StateDirectory=)",
        ),
        ("RUST_LOG", "the log filter when --log-level is absent"),
        (
            "AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE",
            "the AWS chain, for the aws-secrets-manager store",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(name)]);
        roff.text([roman(meaning)]);
    }
    roff.control("SH", ["FILES"]);
    for (path, meaning) in [
        (
            crate::config::SYSTEM_CONFIG_PATH,
            "the config, when --config and KEYROLL_CONFIG are absent",
        ),
        (
            "/var/lib/keyroll/keysets/KEYSET.json",
            "the file store under systemd (mode 0600, private keys inside)",
        ),
    ] {
        roff.control("TP", []);
        roff.text([italic(path)]);
        roff.text([roman(meaning)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("systemctl"),
        roman("(1), "),
        bold("systemd.service"),
        roman("(5); the README, for the config reference and the rotation timing."),
    ]);
    roff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_documents_every_subcommand_and_its_options() {
        let page = String::from_utf8(manpage().expect("rendered in memory")).expect("UTF-8");
        assert!(page.contains("\n.TH keyroll 1 "), "{page}");
        for sub in Cli::command().get_subcommands() {
            let usage_start = format!("keyroll {}", sub.get_name());
            assert!(
                page.contains(&usage_start),
                "{usage_start} missing:\n{page}"
            );
        }
        for needle in ["\\-\\-now", "\\-\\-count", "EXIT STATUS", "KEYROLL_CONFIG"] {
            assert!(page.contains(needle), "{needle} missing:\n{page}");
        }
    }
}
