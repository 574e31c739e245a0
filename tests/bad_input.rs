//! Bad input gets a clear error, and nothing is lost (SPEC §3, §7), checked
//! against the real binary with two corpora:
//!
//! - `tests/data/bad-configs/*.toml`: one mistake per file; its header says
//!   the exit code and the words the message must contain. `validate` and
//!   `run` must both refuse it that way and write nothing.
//! - `tests/data/bad-documents/*.json`: tampered stored documents (made by
//!   `generate.py`, expectations in `cases.toml`). Every command that reads
//!   the store, and a running daemon, must report the document by its path,
//!   show no key material, publish nothing from it and leave its bytes as
//!   they were.

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{run_to_end, tail, Out, Sandbox, LONG};
use serde::Deserialize;
use serde_json::Value;

fn data_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Runs `keyroll --config CONFIG ARGS…` in the sandbox.
fn keyroll(sb: &Sandbox, config: &Path, args: &[&str]) -> Out {
    let mut cmd = sb.command();
    cmd.arg("--config").arg(config).args(args);
    run_to_end(cmd, sb.root(), format!("keyroll {}", args.join(" ")))
}

/// Files a test run leaves in a sandbox by itself: the captured output.
fn is_harness_file(name: &str) -> bool {
    name.starts_with("cmd-") || name.starts_with("daemon-")
}

fn entries(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|list| {
            list.map(|e| e.expect("a folder entry").file_name())
                .map(|name| name.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

// ---- bad configs --------------------------------------------------------------

/// One file of `tests/data/bad-configs`. Its leading comment says what
/// keyroll must answer:
///
/// ```toml
/// # Why the file is wrong, in a sentence.
/// # expect: exit 2
/// # contains: "rsa_bits", "line 7"
/// ```
///
/// `contains` lists JSON strings (so quotes are written `\"`); it may be
/// repeated. Line numbers count the header too.
struct ConfigCase {
    path: PathBuf,
    exit: i32,
    contains: Vec<String>,
}

fn config_case(path: &Path) -> Result<ConfigCase, String> {
    // Lossy: one case is deliberately not UTF-8 (after its header).
    let text = String::from_utf8_lossy(&fs::read(path).map_err(|e| e.to_string())?).into_owned();
    let mut exit = None;
    let mut contains = Vec::new();
    for line in text.lines().take_while(|line| line.starts_with('#')) {
        let line = line.trim_start_matches('#').trim();
        if let Some(rest) = line.strip_prefix("expect:") {
            let code = rest.trim().strip_prefix("exit").map(str::trim);
            exit = Some(
                code.and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("`{line}`: write `expect: exit N`"))?,
            );
        } else if let Some(rest) = line.strip_prefix("contains:") {
            let words: Vec<String> = serde_json::from_str(&format!("[{rest}]"))
                .map_err(|e| format!("`{line}`: not a list of JSON strings ({e})"))?;
            contains.extend(words);
        }
    }
    Ok(ConfigCase {
        path: path.to_path_buf(),
        exit: exit.ok_or("no `# expect: exit N` line")?,
        contains,
    })
}

fn config_cases() -> Vec<ConfigCase> {
    let dir = data_dir("bad-configs");
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a folder entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| config_case(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// What is wrong with keyroll's answer to one bad config, if anything.
fn check_config_case(case: &ConfigCase) -> Vec<String> {
    let sb = Sandbox::new();
    let name = case
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut wrong = Vec::new();
    for command in ["validate", "run"] {
        let out = keyroll(&sb, &case.path, &[command]);
        let mut problems = Vec::new();
        if out.code != Some(case.exit) {
            problems.push(format!("exit code {:?}, expected {}", out.code, case.exit));
        }
        let needles = case
            .contains
            .iter()
            .map(String::as_str)
            .chain([case.path.to_str().expect("a UTF-8 path")]);
        for needle in needles {
            if !out.stderr.contains(needle) {
                problems.push(format!("{needle:?} missing"));
            }
        }
        if out.stdout.contains("is valid") {
            problems.push("stdout says the config is valid".into());
        }
        if !problems.is_empty() {
            wrong.push(format!(
                "{name}, `{command}`: {}\n{out}",
                problems.join("; ")
            ));
        }
    }
    // A refused config writes nothing: no store folder, no outputs.
    let left: Vec<String> = entries(sb.root())
        .into_iter()
        .filter(|n| !is_harness_file(n))
        .collect();
    if !left.is_empty() {
        wrong.push(format!("{name}: a refused config left {left:?} behind"));
    }
    wrong
}

#[test]
fn every_bad_config_is_refused_with_its_reason_and_writes_nothing() {
    let cases = config_cases();
    assert!(
        cases.len() >= 25,
        "the corpus has only {} configs",
        cases.len()
    );
    let wrong: Vec<String> = cases.iter().flat_map(check_config_case).collect();
    assert!(
        wrong.is_empty(),
        "{} of {} bad configs were not refused as their header says:\n\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n\n")
    );
}

// ---- tampered documents -----------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentCases {
    case: Vec<DocumentCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentCase {
    file: String,
    contains: Vec<String>,
}

const STEADY_KEYSET: &str = r#"
[[keysets]]
name = "default"
algorithms = ["ES256", "RS256"]
rotate_every = "1h"
token_ttl = "5s"
jwks_cache_ttl = "2s"
verifier_cache_ttl = "2s"
propagation = "2s"
clock_skew = "1s"
"#;

fn document_config(sb: &Sandbox) -> PathBuf {
    let text = format!(
        "reconcile_interval = \"1s\"\nstate_dir = '{state}'\n\n[store]\ntype = \"file\"\ndir = '{store}'\n{STEADY_KEYSET}jwks_file = '{jwks}'\nsigning_dir = '{signing}'\n",
        state = sb.path("state").display(),
        store = sb.store_dir().display(),
        jwks = sb.path("out/jwks.json").display(),
        signing = sb.path("out/signing").display(),
    );
    fs::write(sb.config_path(), text).expect("write the config");
    sb.config_path()
}

/// Values for the placeholders of the fixtures (`{{ES256.active.kid}}`,
/// `{{RS256.next.private_key_pem}}`, `….private_key_pem.truncated}}`),
/// taken from a document the binary makes now: two `rotate --now` give an
/// active, a next and a retired key per algorithm.
struct Keys {
    values: BTreeMap<String, String>,
    /// Lines of every private key, to look for in outputs.
    secret_lines: Vec<String>,
}

fn real_keys() -> Keys {
    let sb = Sandbox::new();
    let config = document_config(&sb);
    for _ in 0..2 {
        keyroll(&sb, &config, &["rotate", "--now"]).ok();
    }
    let doc: Value = serde_json::from_slice(&fs::read(sb.store_file("default")).unwrap())
        .expect("the binary writes JSON");
    let mut values = BTreeMap::new();
    let mut secret_lines = Vec::new();
    for key in doc["keys"].as_array().expect("keys") {
        let label = format!(
            "{}.{}",
            key["alg"].as_str().unwrap(),
            key["state"].as_str().unwrap()
        );
        for field in ["kid", "private_key_pem", "certificate"] {
            let value = key[field].as_str().expect("a string").to_string();
            values.insert(format!("{label}.{field}"), value);
        }
        let pem = key["private_key_pem"].as_str().unwrap();
        values.insert(
            format!("{label}.private_key_pem.truncated"),
            pem[..pem.len() / 2].to_string(),
        );
        secret_lines.extend(
            pem.lines()
                .filter(|line| !line.starts_with("-----"))
                .map(str::to_string),
        );
    }
    assert_eq!(
        values.len(),
        6 * 4,
        "one key per algorithm and state: {doc}"
    );
    Keys {
        values,
        secret_lines,
    }
}

impl Keys {
    /// `text` with every `{{name}}` replaced by its value, JSON-escaped when
    /// it stands inside a JSON string (as in the fixtures), raw otherwise.
    fn fill(&self, text: &[u8], json_escaped: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len() * 4);
        let mut rest = text;
        while let Some(start) = rest.windows(2).position(|w| w == b"{{") {
            let Some(len) = rest[start..].windows(2).position(|w| w == b"}}") else {
                break;
            };
            let name = String::from_utf8_lossy(&rest[start + 2..start + len]).into_owned();
            out.extend_from_slice(&rest[..start]);
            match self.values.get(&name) {
                Some(value) if json_escaped => {
                    let quoted = serde_json::to_string(value).unwrap();
                    out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
                }
                Some(value) => out.extend_from_slice(value.as_bytes()),
                // A truncated document may cut a placeholder: keep it as is.
                None => out.extend_from_slice(&rest[start..start + len + 2]),
            }
            rest = &rest[start + len + 2..];
        }
        out.extend_from_slice(rest);
        out
    }

    fn leaked(&self, text: &str) -> bool {
        text.contains("PRIVATE KEY") || self.secret_lines.iter().any(|line| text.contains(line))
    }
}

/// A sandbox whose store holds `bytes` as the default keyset's document.
fn store_with(bytes: &[u8]) -> (Sandbox, PathBuf, PathBuf) {
    let sb = Sandbox::new();
    let config = document_config(&sb);
    fs::create_dir_all(sb.store_dir()).unwrap();
    fs::set_permissions(sb.store_dir(), fs::Permissions::from_mode(0o700)).unwrap();
    let file = sb.store_file("default");
    fs::write(&file, bytes).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    (sb, config, file)
}

/// What is wrong with keyroll's handling of one tampered document.
fn check_document_case(keys: &Keys, case: &DocumentCase) -> Vec<String> {
    let fixture = data_dir("bad-documents").join(&case.file);
    let bytes = keys.fill(&fs::read(&fixture).expect("read the fixture"), true);
    let (sb, config, file) = store_with(&bytes);
    let location = file.display().to_string();
    let mut needles: Vec<String> = case
        .contains
        .iter()
        .map(|c| String::from_utf8(keys.fill(c.as_bytes(), false)).unwrap())
        .collect();
    needles.push(location.clone());
    needles.push("left untouched".into());
    let mut wrong = Vec::new();
    let mut judge = |what: &str, code: Option<i32>, output: &str, shown: &dyn std::fmt::Display| {
        let mut problems = Vec::new();
        if code != Some(1) {
            problems.push(format!("exit code {code:?}, expected 1"));
        }
        for needle in &needles {
            if !output.contains(needle.as_str()) {
                problems.push(format!("{needle:?} missing"));
            }
        }
        if keys.leaked(output) {
            problems.push("private key material in the output".into());
        }
        if !problems.is_empty() {
            wrong.push(format!(
                "{}, `{what}`: {}\n{shown}",
                case.file,
                problems.join("; ")
            ));
        }
    };

    let revoke_kid = &keys.values["ES256.active.kid"];
    let commands: [&[&str]; 7] = [
        &["status"],
        &["status", "--json"],
        &["jwks"],
        &["plan"],
        &["rotate"],
        &["rotate", "--now"],
        &["revoke", "default", revoke_kid],
    ];
    for args in commands {
        let out = keyroll(&sb, &config, args);
        let output = format!("{}{}", out.stdout, out.stderr);
        judge(&args.join(" "), out.code, &output, &out);
    }

    // The daemon reports the keyset and keeps running; it publishes nothing.
    let mut daemon = sb.spawn(&[]);
    let seen = common::poll("the daemon to report the document", LONG, || {
        daemon.assert_alive();
        let log = daemon.stderr();
        (log.contains(&location) && log.contains("left untouched"))
            .then_some(log)
            .ok_or_else(|| "not yet".to_string())
    });
    match seen {
        Ok(log) => {
            let (status, _) = daemon.stop("TERM");
            let log_lines = format!("--- daemon stderr ---\n{}", tail(&log));
            judge("run", Some(1), &log, &log_lines);
            if !status.success() {
                wrong.push(format!(
                    "{}, `run`: exited with {status} after SIGTERM",
                    case.file
                ));
            }
        }
        Err(e) => wrong.push(format!(
            "{}, `run`: {e}\n{}",
            case.file,
            tail(&daemon.stderr())
        )),
    }
    for output in ["out/jwks.json", "out/signing"] {
        if sb.path(output).exists() {
            wrong.push(format!(
                "{}: {output} was published from a refused document",
                case.file
            ));
        }
    }

    let after = fs::read(&file).unwrap_or_default();
    if after != bytes {
        wrong.push(format!("{}: the document was changed", case.file));
    }
    let mode = common::mode(&file);
    if mode != 0o600 {
        wrong.push(format!(
            "{}: the document's mode became {mode:o}",
            case.file
        ));
    }
    let extra: Vec<String> = entries(&sb.store_dir())
        .into_iter()
        .filter(|n| n != "default.json" && n != ".default.lock")
        .collect();
    if !extra.is_empty() {
        wrong.push(format!("{}: the store folder gained {extra:?}", case.file));
    }
    wrong
}

fn document_cases() -> Vec<DocumentCase> {
    let dir = data_dir("bad-documents");
    let manifest = fs::read_to_string(dir.join("cases.toml")).expect("read cases.toml");
    let cases: DocumentCases = toml::from_str(&manifest).expect("cases.toml parses");
    let listed: BTreeSet<String> = cases.case.iter().map(|c| c.file.clone()).collect();
    let present: BTreeSet<String> = entries(&dir)
        .into_iter()
        .filter(|n| n.ends_with(".json") && n != "valid.json")
        .collect();
    assert_eq!(
        listed,
        present,
        "cases.toml and the documents in {} differ",
        dir.display()
    );
    cases.case
}

#[test]
fn every_tampered_document_is_reported_and_never_overwritten() {
    let cases = document_cases();
    assert!(
        cases.len() >= 15,
        "the corpus has only {} documents",
        cases.len()
    );
    let keys = real_keys();

    // The control: the untampered template loads, so each case fails for
    // its own tampering and nothing else.
    let valid = keys.fill(
        &fs::read(data_dir("bad-documents/valid.json")).unwrap(),
        true,
    );
    let (sb, config, file) = store_with(&valid);
    keyroll(&sb, &config, &["status"]).ok();
    let jwks = keyroll(&sb, &config, &["jwks"]).ok();
    for state in ["active", "next", "retired"] {
        let kid = &keys.values[&format!("ES256.{state}.kid")];
        assert!(jwks.stdout.contains(kid.as_str()), "{kid} missing: {jwks}");
    }
    assert_eq!(
        fs::read(&file).unwrap(),
        valid,
        "status changed the document"
    );

    // Two at a time: each case starts a few short processes and a daemon.
    let halves: Vec<&[DocumentCase]> = cases.chunks(cases.len().div_ceil(2)).collect();
    let wrong: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = halves
            .iter()
            .map(|half| {
                let keys = &keys;
                scope.spawn(move || {
                    half.iter()
                        .flat_map(|case| check_document_case(keys, case))
                        .collect::<Vec<String>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a worker thread"))
            .collect()
    });
    assert!(
        wrong.is_empty(),
        "{} problems with {} tampered documents:\n\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n\n")
    );
}
