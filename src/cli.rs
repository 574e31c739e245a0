//! The commands (SPEC §6). Each one loads the config, then goes through the
//! same reconcile path as the daemon: there is no other write path.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::clock::{rfc3339, Clock, SystemClock, Timestamp};
use crate::config::{
    Config, ConfigError, KeysetPolicy, ParseContext, Problem, StoreSettings, SYSTEM_CONFIG_PATH,
};
use crate::daemon;
use crate::document::{AuditEvent, KeyState};
use crate::key::{Alg, CryptoKeys};
use crate::logging::{self, LogFormat};
use crate::manual;
use crate::planner::{self, Action, PlanError};
use crate::publish;
use crate::reconcile::{ReconcileError, Reconciler, Snapshot};
use crate::store;

#[derive(Debug, Parser)]
#[command(
    name = "keyroll",
    version,
    about = "Automated JWT signing-key rotation"
)]
pub struct Cli {
    /// Config file [default: $KEYROLL_CONFIG, else /etc/keyroll/keyroll.toml
    /// if it exists, else the embedded default]
    #[arg(long, global = true, env = "KEYROLL_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Log level or filter (like RUST_LOG, which is used when this is absent)
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon
    Run,
    /// Check the config and print the derived timings; exit 0 or 2
    Validate,
    /// Print the next lifecycle events per slot; changes nothing
    Plan {
        keyset: Option<String>,
        /// Events per slot
        #[arg(long, default_value_t = 4)]
        count: usize,
    },
    /// Keysets, keys, states, timestamps and the next event
    Status {
        keyset: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print the JWKS as it is published
    Jwks { keyset: Option<String> },
    /// Activate the next key as soon as it is safe (with --now: at once)
    Rotate {
        keyset: Option<String>,
        #[arg(long)]
        alg: Option<Alg>,
        /// Activate even if the next key is younger than publish_lead
        #[arg(long)]
        now: bool,
    },
    /// Remove a key from the JWKS and destroy it at once
    Revoke {
        keyset: String,
        /// The key id (a kid starting with "-" is read as a kid, never as a flag)
        #[arg(allow_hyphen_values = true)]
        kid: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the keyroll(1) man page (roff)
    Manpage,
    /// Sign a token through the running daemon's signer socket
    Sign {
        keyset: Option<String>,
        /// ES256 or RS256 [default: the keyset's first algorithm]
        #[arg(long)]
        alg: Option<String>,
        /// The claims, a JSON object; iat and exp default to now and now + token_ttl
        #[arg(long, value_name = "JSON")]
        claims: String,
    },
}

/// A command's failure, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A usage mistake, in the CLI's own words.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A request the planner refuses (revoke of an unknown kid, …).
    #[error(transparent)]
    Plan(PlanError),
    #[error(transparent)]
    Open(#[from] store::OpenError),
    #[error(transparent)]
    LogLevel(#[from] logging::LogLevelError),
    #[error(transparent)]
    Reconcile(ReconcileError),
    #[error(transparent)]
    Daemon(daemon::DaemonError),
    #[error(transparent)]
    Manual(#[from] manual::WriteError),
    #[error(transparent)]
    Sign(#[from] crate::signer::client::ClientError),
    /// A runtime failure, in the CLI's own words.
    #[error("{0}")]
    Failure(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_)
            | CliError::Config(_)
            | CliError::Plan(_)
            | CliError::Open(_)
            | CliError::LogLevel(_) => 2,
            CliError::Reconcile(_)
            | CliError::Daemon(_)
            | CliError::Manual(_)
            | CliError::Sign(_)
            | CliError::Failure(_) => 1,
        }
    }
}

impl From<ReconcileError> for CliError {
    fn from(e: ReconcileError) -> Self {
        match e {
            ReconcileError::Plan(e) => CliError::Plan(e),
            other => CliError::Reconcile(other),
        }
    }
}

impl Cli {
    pub fn try_parse_args() -> Result<Self, clap::Error> {
        Cli::try_parse()
    }
}

/// Runs the parsed command line.
pub fn main(cli: Cli) -> Result<(), CliError> {
    // Generated from the clap definitions: no config, no runtime (manual.rs).
    let generated = match cli.command {
        Command::Completions { shell } => Some(manual::completions(shell)),
        Command::Manpage => Some(manual::manpage()?),
        _ => None,
    };
    if let Some(text) = generated {
        return Ok(manual::print(&text)?);
    }
    logging::init(cli.log_format, cli.log_level.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failure(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(dispatch(cli));
    // Key generation may still be running on a blocking thread after a
    // shutdown; it holds nothing that needs finishing.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn dispatch(cli: Cli) -> Result<(), CliError> {
    let config_path = cli.config.clone();
    let config = load_config(config_path.as_deref())?;
    match cli.command {
        Command::Run => run(config, config_path).await,
        Command::Validate => validate(&config),
        Command::Plan { keyset, count } => plan(&config, keyset.as_deref(), count).await,
        Command::Status { keyset, json } => status(&config, keyset.as_deref(), json).await,
        Command::Jwks { keyset } => jwks(&config, keyset.as_deref()).await,
        Command::Rotate { keyset, alg, now } => rotate(&config, keyset.as_deref(), alg, now).await,
        Command::Revoke {
            keyset,
            kid,
            reason,
        } => revoke(&config, &keyset, &kid, &reason).await,
        Command::Completions { .. } | Command::Manpage => Ok(()), // answered in main()
        Command::Sign {
            keyset,
            alg,
            claims,
        } => sign(&config, keyset.as_deref(), alg.as_deref(), &claims).await,
    }
}

/// `--config`/`KEYROLL_CONFIG`, else /etc/keyroll/keyroll.toml when it
/// exists, else the embedded default (SPEC §6).
fn load_config(explicit: Option<&Path>) -> Result<Config, ConfigError> {
    let context = ParseContext::from_env(SystemClock.now());
    match explicit {
        Some(path) => Config::load(path, &context),
        None if Path::new(SYSTEM_CONFIG_PATH).exists() => {
            Config::load(Path::new(SYSTEM_CONFIG_PATH), &context)
        }
        None => Ok(Config::embedded(&context)),
    }
}

/// Checks that every path keyroll writes can be written, as this user, and
/// safely (`fsutil`: no link, FIFO or device at a file, no folder others
/// may write): a config that parses but points at a read-only or unsafe
/// place fails now, not at the first rotation. Writes nothing.
fn check_paths(config: &Config) -> Result<(), ConfigError> {
    use crate::fsutil::{check_output_file, writable_dir};
    let mut problems = Vec::new();
    let mut check = |key: String, result: Result<(), crate::fsutil::FsError>| {
        if let Err(e) = result {
            problems.push(Problem {
                line: None,
                key,
                message: e.to_string(),
            });
        }
    };
    if let StoreSettings::File { dir } = &config.store {
        let first = writable_dir(dir);
        let folder_ok = first.is_ok();
        check("store.dir".into(), first);
        for keyset in config.keysets.iter().filter(|_| folder_ok) {
            for name in [
                format!("{}.json", keyset.name),
                format!(".{}.lock", keyset.name),
            ] {
                check("store.dir".into(), check_output_file(&dir.join(name)));
            }
        }
    }
    for keyset in &config.keysets {
        let discovery_file = keyset.discovery.as_ref().and_then(|d| d.file.as_ref());
        for (field, file) in [
            ("jwks_file", keyset.jwks_file.as_ref()),
            ("discovery_file", discovery_file),
        ] {
            if let Some(file) = file {
                let key = format!("keysets[{}].{field}", keyset.name);
                check(key, check_output_file(file));
            }
        }
        if let Some(dir) = &keyset.signing_dir {
            let key = format!("keysets[{}].signing_dir", keyset.name);
            let first = writable_dir(dir);
            let folder_ok = first.is_ok();
            check(key.clone(), first);
            let names = crate::key::Alg::ALL
                .iter()
                .flat_map(|alg| [format!("{alg}.pem"), format!("{alg}.kid")])
                .chain([publish::SIGNING_JSON.to_string()]);
            for name in names.filter(|_| folder_ok) {
                check(key.clone(), check_output_file(&dir.join(name)));
            }
        }
    }
    problems.extend(overlapping_outputs(config));
    problems.extend(crate::signer::check_socket_paths(config));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError {
            source_name: config.source.to_string(),
            problems,
        })
    }
}

/// `path` made absolute, with `.` and `..` resolved lexically (it may not
/// exist yet, so it cannot be canonicalized).
fn lexical_absolute(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Outputs that would overwrite the store or each other: a `jwks_file`
/// written over `<store dir>/<keyset>.json` would destroy every private key.
fn overlapping_outputs(config: &Config) -> Vec<Problem> {
    let store_dir = match &config.store {
        StoreSettings::File { dir } => Some(lexical_absolute(dir)),
        StoreSettings::AwsSecretsManager(_) => None,
    };
    let mut problems = Vec::new();
    let mut seen: Vec<(PathBuf, String)> = Vec::new();
    for keyset in &config.keysets {
        let outputs = [
            ("jwks_file", keyset.jwks_file.as_ref()),
            ("signing_dir", keyset.signing_dir.as_ref()),
            (
                "discovery_file",
                keyset.discovery.as_ref().and_then(|d| d.file.as_ref()),
            ),
        ];
        for (field, path) in outputs {
            let Some(path) = path else { continue };
            let key = format!("keysets[{}].{field}", keyset.name);
            let absolute = lexical_absolute(path);
            let mut refuse = |message: String| {
                problems.push(Problem {
                    line: None,
                    key: key.clone(),
                    message,
                })
            };
            if let Some(store_dir) = store_dir.as_ref().filter(|dir| absolute.starts_with(dir)) {
                refuse(format!(
                    "{} is inside the store folder {}: keyroll would overwrite its own keyset documents",
                    path.display(),
                    store_dir.display()
                ));
            } else if let Some((_, other)) = seen.iter().find(|(p, _)| *p == absolute) {
                refuse(format!(
                    "{} is also {other}: each output needs its own path",
                    path.display()
                ));
            }
            seen.push((absolute, key));
        }
    }
    problems
}

fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `validate`'s lines for OpenID discovery and S3: where each is served.
fn describe_discovery_and_s3(keyset: &KeysetPolicy) -> String {
    let mut out = String::new();
    if let Some(d) = &keyset.discovery {
        out.push_str(&format!("  issuer: {}\n", d.issuer));
        out.push_str(&format!("    discovery: HTTP {}\n", d.route));
        match &d.jwks_route {
            Some(route) => out.push_str(&format!("    jwks_uri: {} (HTTP {route})\n", d.jwks_uri)),
            None => out.push_str(&format!(
                "    jwks_uri: {} (another origin: not served here)\n",
                d.jwks_uri
            )),
        }
        if let Some(file) = &d.file {
            out.push_str(&format!("    discovery_file: {}\n", file.display()));
        }
        if let Some(object) = &d.s3 {
            out.push_str(&format!("    s3_discovery: {object}\n"));
        }
    }
    if let Some(object) = &keyset.s3_jwks {
        out.push_str(&format!("  s3_jwks: {object}\n"));
    }
    out
}

fn validate(config: &Config) -> Result<(), CliError> {
    check_paths(config)?;
    let mut out = String::new();
    out.push_str(&format!("config {} is valid\n", config.source));
    match &config.store {
        StoreSettings::File { dir } => out.push_str(&format!("store: file, {}\n", dir.display())),
        StoreSettings::AwsSecretsManager(aws) => out.push_str(&format!(
            "store: aws-secrets-manager, secrets {}<keyset>\n",
            aws.secret_prefix
        )),
    }
    match config.http_listen {
        Some(addr) => match config.http_metrics_listen {
            Some(metrics) => out.push_str(&format!("http: {addr}, /metrics on {metrics}\n")),
            None => out.push_str(&format!("http: {addr}\n")),
        },
        None => out.push_str("http: off\n"),
    }
    out.push_str(&format!(
        "reconcile_interval: {}\n",
        show(config.reconcile_interval)
    ));
    for k in &config.keysets {
        let t = &k.timings;
        let algs: Vec<&str> = k.algorithms.iter().map(|a| a.as_str()).collect();
        out.push_str(&format!("\nkeyset {}\n", k.name));
        out.push_str(&format!(
            "  algorithms: {} (RSA {} bits)\n",
            algs.join(", "),
            k.rsa_bits
        ));
        out.push_str(&format!("  rotation: {}\n", k.schedule.describe()));
        out.push_str(&format!(
            "  token_ttl {}, jwks_cache_ttl {}, verifier_cache_ttl {}, propagation {}, clock_skew {}\n",
            show(t.token_ttl),
            show(t.jwks_cache_ttl),
            show(t.verifier_cache_ttl),
            show(t.propagation),
            show(t.clock_skew)
        ));
        if t.relay_cache.is_zero() {
            out.push_str(&format!(
                "  publish_lead = verifier_cache_ttl + propagation = {}\n",
                show(t.publish_lead())
            ));
        } else {
            out.push_str(&format!(
                "  publish_lead = verifier_cache_ttl + propagation + kube-apiserver cache ({}) = {}\n",
                show(t.relay_cache),
                show(t.publish_lead())
            ));
        }
        out.push_str(&format!(
            "  retire_grace = token_ttl + clock_skew + propagation = {}\n",
            show(t.retire_grace())
        ));
        if let Some(f) = &k.jwks_file {
            out.push_str(&format!("  jwks_file: {}\n", f.display()));
        }
        if let Some(d) = &k.signing_dir {
            out.push_str(&format!("  signing_dir: {}\n", d.display()));
        }
        out.push_str(&describe_discovery_and_s3(k));
    }
    out.push_str(&describe_signer(config));
    for warning in &config.warnings {
        out.push_str(&format!("\nwarning: {warning}\n"));
    }
    print!("{out}");
    Ok(())
}

async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), CliError> {
    check_paths(&config)?;
    let setup = daemon::Setup {
        config,
        // A reload is held to the same checks as a start.
        reload: Box::new(move || {
            let config = load_config(config_path.as_deref())?;
            check_paths(&config)?;
            Ok(config)
        }),
        keys: Arc::new(CryptoKeys),
        clock: Arc::new(SystemClock),
        store: None,
        published: Default::default(),
    };
    daemon::run(setup, termination())
        .await
        .map_err(|e| match e {
            daemon::DaemonError::Store(e) => CliError::from(e),
            other => CliError::Daemon(other),
        })
}

/// Completes on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without handlers the default action (exit) still stops us.
        _ => std::future::pending().await,
    }
}

async fn reconciler(config: &Config) -> Result<Reconciler, CliError> {
    Ok(Reconciler::new(
        store::open(&config.store).await?,
        Arc::new(CryptoKeys),
        Arc::new(SystemClock),
    ))
}

/// The named keyset, or the default one (`default`, or the only one).
fn pick_keyset<'c>(config: &'c Config, name: Option<&str>) -> Result<&'c KeysetPolicy, CliError> {
    match name {
        Some(name) => config
            .keyset(name)
            .ok_or_else(|| unknown_keyset(config, name)),
        None => config.default_keyset().ok_or_else(|| {
            CliError::Usage(
                "name a keyset: there are several and none is called \"default\"".into(),
            )
        }),
    }
}

fn unknown_keyset(config: &Config, name: &str) -> CliError {
    let names: Vec<&str> = config.keysets.iter().map(|k| k.name.as_str()).collect();
    CliError::Usage(format!(
        "no keyset {name:?} in {} (keysets: {})",
        config.source,
        names.join(", ")
    ))
}

/// The keysets a read-only command shows: the named one, or all.
fn selected<'c>(config: &'c Config, name: Option<&str>) -> Result<Vec<&'c KeysetPolicy>, CliError> {
    match name {
        Some(name) => Ok(vec![config
            .keyset(name)
            .ok_or_else(|| unknown_keyset(config, name))?]),
        None => Ok(config.keysets.iter().collect()),
    }
}

async fn plan(config: &Config, keyset: Option<&str>, count: usize) -> Result<(), CliError> {
    let reconciler = reconciler(config).await?;
    let now = SystemClock.now();
    let mut out = String::new();
    for policy in selected(config, keyset)? {
        let snapshot = reconciler.load(&policy.name).await?;
        out.push_str(&format!("keyset {}\n", policy.name));
        for event in planner::upcoming(now, &snapshot.doc, policy, count) {
            let verb = match event.event {
                AuditEvent::Created => "publish",
                AuditEvent::Activated => "activate",
                AuditEvent::Retired => "retire",
                AuditEvent::Removed => "remove",
                AuditEvent::Revoked => "revoke",
            };
            out.push_str(&format!(
                "  {}  {:<5}  {:<8}  {}  ({})\n",
                rfc3339(event.at),
                event.alg,
                verb,
                event.kid,
                event.trigger.as_str()
            ));
        }
    }
    print!("{out}");
    Ok(())
}

#[derive(Serialize)]
struct StatusJson {
    keysets: Vec<KeysetStatus>,
}

#[derive(Serialize)]
struct KeysetStatus {
    name: String,
    store: String,
    bootstrapped: bool,
    next_rotation: Option<String>,
    /// The next lifecycle event of any slot (a rotation, a removal, …).
    next_event: Option<EventStatus>,
    /// `verifier_cache_ttl + propagation (+ relay)`, as text (`1h 1m`).
    publish_lead: String,
    verifier_cache_ttl: String,
    retire_grace: String,
    /// SPEC C2: when the stored document was found missing after it had
    /// been published, until an operator acts (`rotate` or `revoke`).
    document_lost_at: Option<String>,
    /// SPEC C6: how far the document's newest timestamp is ahead of this
    /// clock, in seconds, when more than `clock_skew`.
    clock_behind_seconds: Option<f64>,
    /// Warnings the planner has for this keyset now.
    warnings: Vec<String>,
    /// Kids of revoked or removed keys whose private keys are still in the
    /// store because deleting them failed (AWS); retried at every pass.
    destruction_pending: Vec<String>,
    slots: Vec<SlotStatus>,
    keys: Vec<KeyStatus>,
}

#[derive(Serialize)]
struct EventStatus {
    at: String,
    event: &'static str,
    alg: Alg,
    kid: String,
}

#[derive(Serialize)]
struct SlotStatus {
    alg: Alg,
    next_rotation: Option<String>,
    waiting_for: Option<String>,
}

#[derive(Serialize)]
struct KeyStatus {
    kid: String,
    alg: Alg,
    state: KeyState,
    created_at: Option<String>,
    published_at: Option<String>,
    activated_at: Option<String>,
    retired_at: Option<String>,
    remove_at: Option<String>,
}

fn keyset_status(
    policy: &KeysetPolicy,
    snapshot: &Snapshot,
    location: String,
    now: Timestamp,
) -> KeysetStatus {
    let plan = planner::plan(now, &snapshot.doc, policy, None).ok();
    let outlook = plan
        .as_ref()
        .map(|plan| plan.outlook.clone())
        .unwrap_or_default();
    let ts = |t: Option<Timestamp>| t.map(rfc3339);
    let mut keys: Vec<KeyStatus> = snapshot
        .doc
        .keys
        .iter()
        .map(|k| KeyStatus {
            kid: k.kid.clone(),
            alg: k.alg,
            state: k.state,
            created_at: ts(Some(k.created_at)),
            published_at: ts(Some(k.published_at)),
            activated_at: ts(k.activated_at),
            retired_at: ts(k.retired_at),
            remove_at: ts(k.remove_at),
        })
        .collect();
    // Keys kept from a lost document (C2) are published as retired.
    keys.extend(snapshot.doc.orphans.iter().map(|o| KeyStatus {
        kid: o.kid.clone(),
        alg: o.alg,
        state: KeyState::Retired,
        created_at: None,
        published_at: None,
        activated_at: None,
        retired_at: ts(Some(o.retired_at)),
        remove_at: ts(Some(o.remove_at)),
    }));
    keys.sort_by(|a, b| {
        (a.state != KeyState::Active, a.state, a.alg).cmp(&(
            b.state != KeyState::Active,
            b.state,
            b.alg,
        ))
    });
    let next_event = planner::upcoming(now, &snapshot.doc, policy, 1)
        .into_iter()
        .find(|e| e.at > now || snapshot.version.is_none())
        .map(|e| EventStatus {
            at: rfc3339(e.at),
            event: e.event.log_name(),
            alg: e.alg,
            kid: e.kid,
        });
    KeysetStatus {
        name: policy.name.clone(),
        store: location,
        bootstrapped: snapshot.version.is_some(),
        next_rotation: ts(outlook.iter().filter_map(|s| s.next_rotation).min()),
        next_event,
        publish_lead: show(policy.timings.publish_lead()),
        verifier_cache_ttl: show(policy.timings.verifier_cache_ttl),
        retire_grace: show(policy.timings.retire_grace()),
        document_lost_at: snapshot.doc.lost.as_ref().map(|l| rfc3339(l.detected_at)),
        clock_behind_seconds: plan
            .as_ref()
            .and_then(|p| p.clock_behind)
            .map(|d| d.num_milliseconds() as f64 / 1000.0),
        warnings: plan.map(|p| p.warnings).unwrap_or_default(),
        destruction_pending: Vec::new(),
        slots: outlook
            .iter()
            .map(|s| SlotStatus {
                alg: s.alg,
                next_rotation: ts(s.next_rotation),
                waiting_for: s.waiting_for.clone(),
            })
            .collect(),
        keys,
    }
}

async fn status(config: &Config, keyset: Option<&str>, json: bool) -> Result<(), CliError> {
    let reconciler = reconciler(config).await?;
    let now = SystemClock.now();
    let mut keysets = Vec::new();
    for policy in selected(config, keyset)? {
        let snapshot = reconciler.load(&policy.name).await?;
        let location = reconciler.store().location(&policy.name);
        let mut status = keyset_status(policy, &snapshot, location, now);
        status.destruction_pending = reconciler.store().destruction_pending(&policy.name);
        keysets.push(status);
    }
    if json {
        let text = serde_json::to_string_pretty(&StatusJson { keysets })
            .expect("status always serializes");
        println!("{text}");
        return Ok(());
    }
    let mut out = String::new();
    for k in keysets {
        out.push_str(&format!("keyset {}  ({})\n", k.name, k.store));
        if !k.bootstrapped {
            out.push_str(
                "  not bootstrapped yet: `keyroll run` (or `keyroll rotate`) creates its keys\n",
            );
        }
        out.push_str(&format!(
            "  publish_lead {} (verifier_cache_ttl {}), retire_grace {}\n",
            k.publish_lead, k.verifier_cache_ttl, k.retire_grace
        ));
        if let Some(at) = &k.document_lost_at {
            out.push_str(&format!(
                "  DOCUMENT LOST: found missing at {at}; the keys published before stay published until their remove_at (SPEC C2); `keyroll rotate` acknowledges\n"
            ));
        }
        for warning in &k.warnings {
            out.push_str(&format!("  warning: {warning}\n"));
        }
        for kid in &k.destruction_pending {
            out.push_str(&format!(
                "  KEY NOT DESTROYED: {kid} was revoked or removed, but deleting its private key from the store failed; retried at every pass\n"
            ));
        }
        if let Some(e) = &k.next_event {
            out.push_str(&format!(
                "  next event: {} {} {} {}\n",
                e.at, e.event, e.alg, e.kid
            ));
        }
        for slot in &k.slots {
            let at = slot.next_rotation.as_deref().unwrap_or("never");
            out.push_str(&format!("  {} next rotation: {at}\n", slot.alg));
            if let Some(why) = &slot.waiting_for {
                out.push_str(&format!("    waiting: {why}\n"));
            }
        }
        for key in &k.keys {
            let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "  {:<7} {:<5} {}  published {}  activated {}  remove_at {}\n",
                key.state.as_str(),
                key.alg,
                key.kid,
                dash(&key.published_at),
                dash(&key.activated_at),
                dash(&key.remove_at)
            ));
        }
    }
    print!("{out}");
    Ok(())
}

async fn jwks(config: &Config, keyset: Option<&str>) -> Result<(), CliError> {
    let policy = pick_keyset(config, keyset)?;
    let reconciler = reconciler(config).await?;
    let snapshot = reconciler.load(&policy.name).await?;
    if snapshot.version.is_none() {
        return Err(CliError::Failure(format!(
            "keyset {:?} has no keys yet: `keyroll run` (or `keyroll rotate`) creates them",
            policy.name
        )));
    }
    let jwks = publish::render(
        &snapshot.doc,
        &snapshot.jwks,
        policy.x5c,
        policy.timings.jwks_cache_ttl.as_secs(),
    );
    let mut stdout = std::io::stdout().lock();
    let newline = if std::io::stdout().is_terminal() {
        &b"\n"[..]
    } else {
        b""
    };
    stdout
        .write_all(&jwks.body)
        .and_then(|()| stdout.write_all(newline))
        .map_err(|e| CliError::Failure(format!("cannot write to stdout: {e}")))
}

async fn rotate(
    config: &Config,
    keyset: Option<&str>,
    alg: Option<Alg>,
    force: bool,
) -> Result<(), CliError> {
    let policy = pick_keyset(config, keyset)?;
    let action = Action::Rotate { alg, force };
    let outcome = reconciler(config)
        .await?
        .reconcile_with(
            policy,
            Some(&action),
            &publish::published_in_jwks_file(policy),
        )
        .await?;
    for warning in &outcome.plan.warnings {
        eprintln!("warning: {warning}");
    }
    for record in &outcome.committed {
        daemon::log_transition(&policy.name, record);
    }
    let targets = match alg {
        Some(alg) => vec![alg],
        None => policy.algorithms.clone(),
    };
    for alg in targets {
        let activated = outcome
            .committed
            .iter()
            .find(|r| r.alg == alg && r.event == AuditEvent::Activated);
        match activated {
            Some(record) => println!("{}/{alg}: {} is now active", policy.name, record.kid),
            None => {
                let slot = outcome.plan.outlook.iter().find(|s| s.alg == alg);
                let at = slot
                    .and_then(|s| s.next_rotation)
                    .map(rfc3339)
                    .unwrap_or_else(|| "unknown".into());
                println!(
                    "{}/{alg}: rotation requested; the next key becomes active at {at}, once it has been published for publish_lead ({}); the running daemon carries it out (or use --now)",
                    policy.name,
                    show(policy.timings.publish_lead())
                );
            }
        }
    }
    Ok(())
}

async fn revoke(config: &Config, keyset: &str, kid: &str, reason: &str) -> Result<(), CliError> {
    let policy = config
        .keyset(keyset)
        .ok_or_else(|| unknown_keyset(config, keyset))?;
    let action = Action::Revoke {
        kid: kid.to_string(),
        reason: reason.to_string(),
    };
    let reconciler = reconciler(config).await?;
    let outcome = match reconciler
        .reconcile_with(
            policy,
            Some(&action),
            &publish::published_in_jwks_file(policy),
        )
        .await
    {
        Ok(outcome) => outcome,
        Err(e @ ReconcileError::Plan(PlanError::UnknownKid { .. })) => {
            // A revoke repeated after its answer was lost (a timeout, a
            // killed CLI) finds the key gone: that is success, not an error.
            let snapshot = reconciler.load(&policy.name).await?;
            let revoked = snapshot
                .doc
                .audit
                .iter()
                .rev()
                .find(|r| r.kid == kid && r.event == AuditEvent::Revoked);
            return match revoked {
                Some(_) if destruction_pending(&reconciler, &policy.name, kid) => {
                    Err(destruction_failed(&policy.name, kid))
                }
                Some(record) => {
                    println!(
                        "{}: {kid} was already revoked at {}; it is gone from the JWKS and the store",
                        policy.name,
                        rfc3339(record.at)
                    );
                    Ok(())
                }
                None => Err(CliError::from(e)),
            };
        }
        Err(other) => return Err(other.into()),
    };
    for warning in &outcome.plan.warnings {
        eprintln!("warning: {warning}");
    }
    for record in &outcome.committed {
        daemon::log_transition(&policy.name, record);
    }
    if destruction_pending(&reconciler, &policy.name, kid) {
        return Err(destruction_failed(&policy.name, kid));
    }
    println!(
        "{}: revoked {kid}; it is gone from the JWKS and the store",
        policy.name
    );
    for record in outcome
        .committed
        .iter()
        .filter(|r| r.event == AuditEvent::Activated)
    {
        println!(
            "{}/{}: {} is now active",
            policy.name, record.alg, record.kid
        );
    }
    Ok(())
}

/// Whether the store still holds the private key of a dropped key because
/// deleting it failed (the AWS store's key secrets).
fn destruction_pending(reconciler: &Reconciler, keyset: &str, kid: &str) -> bool {
    reconciler
        .store()
        .destruction_pending(keyset)
        .iter()
        .any(|pending| pending == kid)
}

fn destruction_failed(keyset: &str, kid: &str) -> CliError {
    CliError::Failure(format!(
        "{keyset}: revoked {kid}: it is gone from the JWKS, but deleting its private key from \
         the store failed (see the error above); a running keyroll retries at every pass, and \
         `keyroll revoke` again retries now"
    ))
}

/// The `[signer]` part of `validate`'s output.
fn describe_signer(config: &Config) -> String {
    let Some(signer) = &config.signer else {
        return String::new();
    };
    let mut out = String::from("\nsigner\n");
    if let Some(socket) = &signer.socket {
        out.push_str(&format!(
            "  sign API: {} (mode {:04o})\n",
            socket.display(),
            signer.socket_mode
        ));
    }
    if let Some(kubernetes) = &signer.kubernetes {
        let token_ttl = config
            .keyset(&kubernetes.keyset)
            .map(|k| show(k.timings.token_ttl))
            .unwrap_or_default();
        out.push_str(&format!(
            "  kubernetes: {} (keyset {}, {}; --service-account-max-token-expiration={token_ttl})\n",
            kubernetes.socket.display(),
            kubernetes.keyset,
            kubernetes.alg
        ));
    }
    out
}

/// `keyroll sign`: one token from the running daemon's sign API.
async fn sign(
    config: &Config,
    keyset: Option<&str>,
    alg: Option<&str>,
    claims: &str,
) -> Result<(), CliError> {
    let socket = config
        .signer
        .as_ref()
        .and_then(|signer| signer.socket.as_ref())
        .ok_or_else(|| {
            CliError::Failure(format!(
                "{} has no [signer] socket: the daemon offers no sign API (set [signer] socket and restart keyroll)",
                config.source
            ))
        })?;
    let policy = pick_keyset(config, keyset)?;
    let claims: serde_json::Value = serde_json::from_str(claims)
        .map_err(|e| CliError::Usage(format!("--claims is not JSON: {e}")))?;
    let answer = crate::signer::client::sign(socket, &policy.name, alg, claims).await?;
    let token = answer.body["token"].as_str();
    match (answer.status, token) {
        (200, Some(token)) => {
            println!("{token}");
            Ok(())
        }
        (status, _) => {
            let why = answer.body["error"]
                .as_str()
                .map_or_else(|| answer.body.to_string(), str::to_string);
            let message = format!("the signer refused ({status}): {why}");
            // The request was wrong (400, 404, 413): a usage error.
            Err(if (400..500).contains(&status) {
                CliError::Usage(message)
            } else {
                CliError::Failure(message)
            })
        }
    }
}
