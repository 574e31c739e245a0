//! `keyroll completions SHELL` and `keyroll manpage`, run as a user runs
//! them: the real binary, no config needed. The bash script is also loaded
//! into a real bash and asked to complete, so it is checked by the shell
//! that will use it, not only by reading it.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_keyroll");

/// Every subcommand a user can type.
const SUBCOMMANDS: [&str; 9] = [
    "run",
    "validate",
    "plan",
    "status",
    "jwks",
    "rotate",
    "revoke",
    "completions",
    "manpage",
];

/// Runs keyroll with a config path that does not exist: neither command may
/// read the config.
fn keyroll(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("KEYROLL_CONFIG", "/nonexistent/keyroll.toml")
        .output()
        .expect("run keyroll")
}

fn stdout_of(args: &[&str]) -> String {
    let out = keyroll(args);
    assert!(
        out.status.success(),
        "keyroll {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn each_shell_gets_a_completion_script_naming_every_subcommand() {
    for (shell, marker) in [
        ("bash", "complete -F _keyroll"),
        ("zsh", "#compdef keyroll"),
        ("fish", "complete -c keyroll"),
    ] {
        let script = stdout_of(&["completions", shell]);
        assert!(script.contains(marker), "{shell}: no {marker:?}:\n{script}");
        for sub in SUBCOMMANDS {
            assert!(
                script.contains(sub),
                "{shell}: subcommand {sub} missing:\n{script}"
            );
        }
        // Options of subcommands are completed too (fish writes `-l now`).
        for option in ["now", "count", "json", "reason"] {
            let spelled = match shell {
                "fish" => format!("-l {option}"),
                _ => format!("--{option}"),
            };
            assert!(script.contains(&spelled), "{shell}: {spelled} missing");
        }
    }
}

/// Sources the bash script in a real bash and completes `keyroll WORDS…`.
fn bash_complete(words: &[&str]) -> Vec<String> {
    let script = stdout_of(&["completions", "bash"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyroll.bash");
    std::fs::write(&path, script).expect("write script");
    let line = words.join(" ");
    let program = format!(
        r#"source {path}
COMP_WORDS=(keyroll {line})
COMP_CWORD={cword}
COMP_LINE="keyroll {line}"
COMP_POINT=${{#COMP_LINE}}
_keyroll keyroll "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
        path = path.display(),
        cword = words.len(),
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completes_subcommands_and_their_options() {
    let offered = bash_complete(&["ro"]);
    assert_eq!(offered, ["rotate"], "keyroll ro<TAB>");
    let offered = bash_complete(&[""]);
    for sub in SUBCOMMANDS {
        assert!(
            offered.iter().any(|w| w == sub),
            "keyroll <TAB> lacks {sub}: {offered:?}"
        );
    }
    let offered = bash_complete(&["rotate", "--n"]);
    assert_eq!(offered, ["--now"], "keyroll rotate --n<TAB>");
    let offered = bash_complete(&["completions", "z"]);
    assert_eq!(offered, ["zsh"], "keyroll completions z<TAB>");
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = keyroll(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tcsh") && stderr.contains("bash"),
        "{stderr}"
    );
}

#[test]
fn the_man_page_is_roff_documenting_every_subcommand() {
    let page = stdout_of(&["manpage"]);
    assert!(page.contains(".TH keyroll 1"), "no .TH header:\n{page}");
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH COMMANDS",
        ".SH \"EXIT STATUS\"",
        ".SH FILES",
    ] {
        assert!(page.contains(section), "{section} missing:\n{page}");
    }
    for sub in SUBCOMMANDS {
        // roff escapes nothing in "keyroll run", the usage line of a command.
        assert!(
            page.contains(&format!("\\fBkeyroll {sub}")),
            "subcommand {sub} missing:\n{page}"
        );
    }
    assert!(page.contains("\\-\\-now"), "rotate --now missing");
}
