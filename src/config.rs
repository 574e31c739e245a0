//! The config file (SPEC §7), parsed and validated without I/O beyond reading
//! the one file. Every mistake is reported with the key and, where the TOML
//! gives one, the line; all mistakes are reported at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::clock::Timestamp;
use crate::key::{Alg, RSA_BITS_ALLOWED};
use crate::schedule::Schedule;

/// Where `keyroll` looks for its config when `--config` and `KEYROLL_CONFIG`
/// are not given.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/keyroll/keyroll.toml";
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");
pub const DEFAULT_SECRET_PREFIX: &str = "keyroll/";

const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_ROTATE_EVERY: Duration = Duration::from_secs(7 * 86400);
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_JWKS_CACHE_TTL: Duration = Duration::from_secs(300);
/// Most JOSE libraries cache a JWKS by their own clock, not `max-age`
/// (README, "How verifiers cache"); an hour covers all but
/// Microsoft.IdentityModel's 12 h.
const DEFAULT_VERIFIER_CACHE_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);
const DEFAULT_RSA_BITS: u32 = 2048;
/// The longest duration a setting may have: 100 years.
const MAX_DURATION: Duration = Duration::from_secs(100 * 36525 * 864);

/// Where the config came from; named in every error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Embedded => f.write_str("<embedded default config>"),
        }
    }
}

/// What the config parser needs from the environment, passed in so that
/// parsing stays pure.
#[derive(Clone, Debug)]
pub struct ParseContext {
    /// `$STATE_DIRECTORY` (systemd's `StateDirectory=`), first entry.
    pub state_directory: Option<PathBuf>,
    /// The instant cron schedules are checked from.
    pub now: Timestamp,
}

impl ParseContext {
    pub fn from_env(now: Timestamp) -> Self {
        let state_directory = std::env::var_os("STATE_DIRECTORY")
            .and_then(|v| std::env::split_paths(&v).next())
            .filter(|p| !p.as_os_str().is_empty());
        ParseContext {
            state_directory,
            now,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub source: ConfigSource,
    pub reconcile_interval: Duration,
    pub state_dir: PathBuf,
    pub store: StoreSettings,
    /// `None`: the `[http]` table is absent, nothing is served.
    pub http_listen: Option<SocketAddr>,
    /// `[http] metrics_listen`: `/metrics` is served there, and not on
    /// `http_listen`.
    pub http_metrics_listen: Option<SocketAddr>,
    /// `[http] max_connections_per_client`: open connections one client
    /// address (an IPv6 /64) may hold on each listener.
    pub http_max_connections_per_client: usize,
    pub keysets: Vec<KeysetPolicy>,
    /// Legal but doubtful settings, shown by `validate` and logged by `run`.
    pub warnings: Vec<String>,
    /// `None`: the `[signer]` table is absent, nothing signs.
    pub signer: Option<SignerSettings>,
}

/// The `[signer]` table (SPEC §4, "The signer").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerSettings {
    /// The HTTP/1.1 sign API's Unix socket.
    pub socket: Option<PathBuf>,
    /// Permission bits of both sockets (default 0660).
    pub socket_mode: u32,
    /// The Kubernetes ExternalJWTSigner service, when set.
    pub kubernetes: Option<KubernetesSigner>,
    /// Each keyset's first algorithm as written in the config: what a sign
    /// request without `alg` gets (`KeysetPolicy::algorithms` is sorted).
    pub default_algs: BTreeMap<String, Alg>,
}

impl SignerSettings {
    /// The algorithm a sign request without `alg` gets for `keyset`.
    pub fn default_alg(&self, keyset: &KeysetPolicy) -> Option<Alg> {
        self.default_algs
            .get(&keyset.name)
            .copied()
            .or_else(|| keyset.algorithms.first().copied())
    }
}

/// `[signer] kubernetes_*`: which slot kube-apiserver's tokens are signed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSigner {
    pub socket: PathBuf,
    pub keyset: String,
    pub alg: Alg,
}

/// kube-apiserver refuses an external signer whose longest token is shorter
/// (upstream's `max_token_expiration_seconds` "must be at least 600s").
pub const KUBERNETES_MIN_TOKEN_TTL: Duration = Duration::from_secs(600);
const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Open HTTP connections at most, per listener (`publish::http`).
pub const MAX_HTTP_CONNECTIONS: usize = 4096;
/// One client may hold a sixteenth of them: a reverse proxy or a NAT
/// gateway keeps many connections, but one address cannot take them all.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSettings {
    File { dir: PathBuf },
    AwsSecretsManager(AwsSettings),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsSettings {
    pub secret_prefix: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub kms_key_id: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// The timing inputs of SPEC §1 and what derives from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub token_ttl: Duration,
    pub jwks_cache_ttl: Duration,
    /// The longest any verifier keeps a fetched JWKS, whatever `max-age` says.
    pub verifier_cache_ttl: Duration,
    pub propagation: Duration,
    pub clock_skew: Duration,
    /// How long a relay between keyroll and the verifiers may keep serving
    /// keys it fetched: the kube-apiserver re-serves what the external
    /// signer's `FetchKeys` gave it for `jwks_cache_ttl`. Zero otherwise.
    pub relay_cache: Duration,
}

impl Timings {
    /// A key is never activated before it has been published this long.
    pub fn publish_lead(&self) -> Duration {
        self.verifier_cache_ttl + self.propagation + self.relay_cache
    }

    /// A retired key stays published this long after it stopped signing.
    pub fn retire_grace(&self) -> Duration {
        self.token_ttl + self.clock_skew + self.propagation
    }
}

/// One keyset's policy: what the planner needs, and where to publish.
#[derive(Clone, Debug)]
pub struct KeysetPolicy {
    pub name: String,
    /// Sorted, without duplicates: each is a slot.
    pub algorithms: Vec<Alg>,
    pub rsa_bits: u32,
    pub schedule: Schedule,
    pub timings: Timings,
    pub x5c: bool,
    /// SPEC C5: how long a replica may go without loading the document
    /// before it fails closed (default: the rotation period; for a cron
    /// schedule, the longest gap between two ticks).
    pub max_stale: Duration,
    pub jwks_file: Option<PathBuf>,
    pub signing_dir: Option<PathBuf>,
    /// OpenID discovery, when `issuer` is set. Boxed, like `s3_jwks`, so a
    /// policy stays small for the many places that copy it.
    pub discovery: Option<Box<DiscoverySettings>>,
    /// `s3_jwks`: the JWKS uploaded to S3.
    pub s3_jwks: Option<Box<S3Object>>,
}

/// A keyset's OpenID discovery (SPEC §4): the issuer and where its keys are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoverySettings {
    /// Exactly as written: relying parties compare it with `iss` verbatim.
    pub issuer: String,
    /// `jwks_uri`, by default `<issuer>/.well-known/jwks.json`.
    pub jwks_uri: String,
    /// The HTTP path of the discovery document:
    /// `<issuer path>/.well-known/openid-configuration`.
    pub route: String,
    /// The HTTP path keyroll serves the JWKS at for `jwks_uri`, when
    /// `jwks_uri` has the issuer's origin (otherwise it is served elsewhere,
    /// S3 say, and this server has nothing to answer there).
    pub jwks_route: Option<String>,
    /// `discovery_file`: the document also written to this file.
    pub file: Option<PathBuf>,
    /// `s3_discovery`: the document also uploaded to S3.
    pub s3: Option<S3Object>,
}

/// An S3 object, from an `s3://bucket/key` URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct S3Object {
    pub bucket: String,
    pub key: String,
}

impl fmt::Display for S3Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

impl KeysetPolicy {
    /// The policy of a keyset removed from the config (SPEC C1): no slot
    /// any more, so every key retires and goes after its grace.
    pub fn retiring(&self) -> KeysetPolicy {
        KeysetPolicy {
            algorithms: Vec::new(),
            ..self.clone()
        }
    }
}

/// One mistake in the config: the key, its line when known, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}:", self.source_name)?;
        for p in &self.problems {
            match p.line {
                Some(line) => write!(f, "\n  line {line}: {}: {}", p.key, p.message)?,
                None => write!(f, "\n  {}: {}", p.key, p.message)?,
            }
        }
        Ok(())
    }
}

// ---- the file as written -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    reconcile_interval: Option<Spanned<String>>,
    state_dir: Option<Spanned<PathBuf>>,
    store: Option<RawStore>,
    http: Option<RawHttp>,
    keysets: Option<Spanned<Vec<RawKeyset>>>,
    signer: Option<Spanned<RawSigner>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigner {
    socket: Option<Spanned<PathBuf>>,
    socket_mode: Option<Spanned<String>>,
    kubernetes_socket: Option<Spanned<PathBuf>>,
    kubernetes_keyset: Option<Spanned<String>>,
    kubernetes_alg: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    dir: Option<Spanned<PathBuf>>,
    secret_prefix: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    endpoint_url: Option<Spanned<String>>,
    kms_key_id: Option<Spanned<String>>,
    tags: Option<Spanned<BTreeMap<String, String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Spanned<String>,
    metrics_listen: Option<Spanned<String>>,
    max_connections_per_client: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyset {
    name: Spanned<String>,
    algorithms: Option<Spanned<Vec<String>>>,
    rsa_bits: Option<Spanned<i64>>,
    rotate: Option<Spanned<String>>,
    rotate_every: Option<Spanned<String>>,
    token_ttl: Option<Spanned<String>>,
    jwks_cache_ttl: Option<Spanned<String>>,
    verifier_cache_ttl: Option<Spanned<String>>,
    propagation: Option<Spanned<String>>,
    clock_skew: Option<Spanned<String>>,
    x5c: Option<bool>,
    max_stale: Option<Spanned<String>>,
    jwks_file: Option<Spanned<PathBuf>>,
    signing_dir: Option<Spanned<PathBuf>>,
    issuer: Option<Spanned<String>>,
    jwks_uri: Option<Spanned<String>>,
    discovery_file: Option<Spanned<PathBuf>>,
    s3_jwks: Option<Spanned<String>>,
    s3_discovery: Option<Spanned<String>>,
}

// ---- parsing ---------------------------------------------------------------

/// Collects problems while a config is checked, turning byte spans into lines.
struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn line_of(&self, span: std::ops::Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text[..end].bytes().filter(|b| *b == b'\n').count() + 1
    }

    fn problem<T>(&mut self, at: Option<&Spanned<T>>, key: &str, message: impl Into<String>) {
        let line = at.map(|s| self.line_of(s.span()));
        self.problems.push(Problem {
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, value: Option<&Spanned<String>>, key: &str) -> Option<Duration> {
        let value = value?;
        match humantime::parse_duration(value.get_ref().trim()) {
            // Timestamps derived from longer durations would leave the range
            // a stored document can represent.
            Ok(d) if d > MAX_DURATION => {
                let message = format!("{:?} is longer than 100 years", value.get_ref());
                self.problem(Some(value), key, message);
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                let message = format!(
                    "{:?} is not a duration ({e}); write it like 90s, 15m, 36h or 7d",
                    value.get_ref()
                );
                self.problem(Some(value), key, message);
                None
            }
        }
    }

    fn positive_duration(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        match self.duration(value, key) {
            Some(d) if d.is_zero() => {
                self.problem(value, key, "must be longer than zero");
                default
            }
            Some(d) => d,
            None => default,
        }
    }
}

fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Turns TOML's own error into a problem with a line and a key. serde's
/// message names the key for an unknown field; for a wrong type it does not,
/// so the key is read off the offending line (`key = value` or `[table]`).
fn toml_problem(text: &str, error: &toml::de::Error) -> Problem {
    let start = error.span().map(|span| span.start.min(text.len()));
    let line = start.map(|start| text[..start].matches('\n').count() + 1);
    let line_text = line
        .and_then(|n| text.lines().nth(n - 1))
        .unwrap_or("")
        .trim();
    let message = plain_type_names(error.message().trim());
    let key = if message.starts_with("unknown field") {
        message.split('`').nth(1).map(str::to_string)
    } else if let Some((key, _)) = line_text.split_once('=') {
        Some(key.trim().trim_matches('"').to_string())
    } else {
        let table = line_text.trim_start_matches('[').trim_end_matches(']');
        (!table.is_empty() && table.len() < line_text.len()).then(|| table.to_string())
    };
    Problem {
        line,
        key: key.unwrap_or_else(|| "toml".to_string()),
        message,
    }
}

/// serde names Rust types ("expected i64"); an operator reads TOML.
fn plain_type_names(message: &str) -> String {
    let mut message = message.to_string();
    for (rust, toml) in [
        ("expected i64", "expected an integer (no quotes)"),
        ("expected a sequence", "expected a list ([...])"),
    ] {
        if let Some(at) = message.find(rust) {
            message.replace_range(at..at + rust.len(), toml);
        }
    }
    message
}

impl Config {
    /// Reads and parses the config file at `path`.
    pub fn load(path: &Path, context: &ParseContext) -> Result<Config, ConfigError> {
        let source = ConfigSource::File(path.to_path_buf());
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source.to_string(),
            problems: vec![Problem {
                line: None,
                key: "file".into(),
                message: format!("cannot be read: {e}"),
            }],
        })?;
        Config::parse(&text, source, context)
    }

    pub fn embedded(context: &ParseContext) -> Config {
        Config::parse(EMBEDDED_DEFAULT, ConfigSource::Embedded, context)
            .expect("the embedded default config is valid (tested)")
    }

    pub fn parse(
        text: &str,
        source: ConfigSource,
        context: &ParseContext,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source.to_string(),
            problems,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| fail(vec![toml_problem(text, &e)]))?;
        let mut checker = Checker {
            text,
            problems: Vec::new(),
        };
        let config = build(raw, source.clone(), context, &mut checker);
        if checker.problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(checker.problems))
        }
    }

    pub fn keyset(&self, name: &str) -> Option<&KeysetPolicy> {
        self.keysets.iter().find(|k| k.name == name)
    }

    /// The keyset served at `/.well-known/jwks.json`: the one named
    /// `default`, or the only one.
    pub fn default_keyset(&self) -> Option<&KeysetPolicy> {
        self.keyset("default").or(match self.keysets.as_slice() {
            [only] => Some(only),
            _ => None,
        })
    }
}

fn build(raw: RawConfig, source: ConfigSource, context: &ParseContext, c: &mut Checker) -> Config {
    let reconcile_interval = c.positive_duration(
        raw.reconcile_interval.as_ref(),
        "reconcile_interval",
        DEFAULT_RECONCILE_INTERVAL,
    );
    let state_dir = match raw.state_dir {
        Some(dir) => dir.into_inner(),
        None => context
            .state_directory
            .clone()
            .unwrap_or_else(|| PathBuf::from("keyroll-state")),
    };
    let store = build_store(raw.store, &state_dir, c);
    let (http_listen, http_metrics_listen, http_max_connections_per_client) =
        build_http(raw.http, c);
    let mut warnings = Vec::new();
    let mut keysets = Vec::new();
    let mut default_algs = BTreeMap::new();
    // kube-apiserver re-serves the keys it fetched: that keyset's
    // publish_lead (checked against its schedule below) grows by it.
    let kubernetes_keyset = raw.signer.as_ref().and_then(|signer| {
        let signer = signer.get_ref();
        signer.kubernetes_socket.as_ref().map(|_| {
            signer
                .kubernetes_keyset
                .as_ref()
                .map_or_else(|| "default".to_string(), |name| name.get_ref().clone())
        })
    });
    match raw.keysets {
        None => c.problem::<()>(None, "keysets", "no [[keysets]] defined: nothing to rotate"),
        Some(list) => {
            let mut seen = BTreeSet::new();
            for raw_keyset in list.into_inner() {
                if let Some(first) = first_written_alg(&raw_keyset) {
                    default_algs
                        .entry(raw_keyset.name.get_ref().clone())
                        .or_insert(first);
                }
                if !seen.insert(raw_keyset.name.get_ref().clone()) {
                    let message =
                        format!("keyset {:?} is defined twice", raw_keyset.name.get_ref());
                    c.problem(Some(&raw_keyset.name), "keysets.name", message);
                    continue;
                }
                let spans = OutputSpans::of(&raw_keyset);
                let relayed = kubernetes_keyset.as_deref() == Some(raw_keyset.name.get_ref());
                let policy = build_keyset(
                    raw_keyset,
                    reconcile_interval,
                    relayed,
                    context,
                    c,
                    &mut warnings,
                );
                keysets.push((policy, spans));
            }
            check_shared_routes(&keysets, c);
        }
    }
    let keysets: Vec<KeysetPolicy> = keysets.into_iter().map(|(policy, _)| policy).collect();
    let signer = raw
        .signer
        .map(|signer| build_signer(signer, &keysets, default_algs, c));
    Config {
        source,
        reconcile_interval,
        state_dir,
        store,
        http_listen,
        http_metrics_listen,
        http_max_connections_per_client,
        keysets,
        warnings,
        signer,
    }
}

/// `[http]`: the listen addresses and the per-client connection cap.
fn build_http(
    raw: Option<RawHttp>,
    c: &mut Checker,
) -> (Option<SocketAddr>, Option<SocketAddr>, usize) {
    let Some(raw) = raw else {
        return (None, None, DEFAULT_MAX_CONNECTIONS_PER_CLIENT);
    };
    let mut address = |value: &Spanned<String>, key: &str| match value.get_ref().parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            let message = format!(
                "{:?} is not an address to listen on (like 127.0.0.1:8080 or [::]:8080)",
                value.get_ref()
            );
            c.problem(Some(value), key, message);
            None
        }
    };
    let listen = address(&raw.listen, "http.listen");
    let metrics_listen = raw
        .metrics_listen
        .as_ref()
        .and_then(|value| address(value, "http.metrics_listen"));
    if let (Some(value), Some(addr)) = (&raw.metrics_listen, metrics_listen) {
        if Some(addr) == listen {
            c.problem(
                Some(value),
                "http.metrics_listen",
                format!("{addr} is also http.listen: give /metrics its own address, or remove metrics_listen to serve it on http.listen"),
            );
        }
    }
    let per_client = match &raw.max_connections_per_client {
        None => DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        Some(value) => match usize::try_from(*value.get_ref()) {
            Ok(n) if (1..=MAX_HTTP_CONNECTIONS).contains(&n) => n,
            _ => {
                c.problem(
                    Some(value),
                    "http.max_connections_per_client",
                    format!(
                        "{} is not between 1 and {MAX_HTTP_CONNECTIONS} (the server's connection cap)",
                        value.get_ref()
                    ),
                );
                DEFAULT_MAX_CONNECTIONS_PER_CLIENT
            }
        },
    };
    (listen, metrics_listen, per_client)
}

/// The first algorithm a keyset's `algorithms` names, as written.
fn first_written_alg(raw: &RawKeyset) -> Option<Alg> {
    match &raw.algorithms {
        None => Some(Alg::ES256),
        Some(list) => list
            .get_ref()
            .first()
            .and_then(|name| Alg::ALL.into_iter().find(|alg| alg.as_str() == name)),
    }
}

fn build_signer(
    raw: Spanned<RawSigner>,
    keysets: &[KeysetPolicy],
    default_algs: BTreeMap<String, Alg>,
    c: &mut Checker,
) -> SignerSettings {
    let table = raw.span();
    let raw = raw.into_inner();
    let socket_mode = match &raw.socket_mode {
        None => DEFAULT_SOCKET_MODE,
        Some(mode) => match u32::from_str_radix(mode.get_ref().trim(), 8) {
            Ok(bits) if bits <= 0o777 => bits,
            _ => {
                let message = format!(
                    "{:?} is not a file mode; write permission bits in octal, like \"0660\"",
                    mode.get_ref()
                );
                c.problem(Some(mode), "signer.socket_mode", message);
                DEFAULT_SOCKET_MODE
            }
        },
    };
    if raw.socket.is_none() && raw.kubernetes_socket.is_none() {
        let line = c.line_of(table);
        c.problems.push(Problem {
            line: Some(line),
            key: "signer".into(),
            message: "set socket (the sign API), kubernetes_socket (kube-apiserver's external signer) or both; or leave out the [signer] table".into(),
        });
    }
    let kubernetes = match &raw.kubernetes_socket {
        Some(socket) => build_kubernetes_signer(&raw, socket, keysets, &default_algs, c),
        None => {
            for (key, value) in [
                ("kubernetes_keyset", &raw.kubernetes_keyset),
                ("kubernetes_alg", &raw.kubernetes_alg),
            ] {
                if value.is_some() {
                    c.problem(
                        value.as_ref(),
                        &format!("signer.{key}"),
                        "only used with kubernetes_socket, which is not set",
                    );
                }
            }
            None
        }
    };
    SignerSettings {
        socket: raw.socket.map(Spanned::into_inner),
        socket_mode,
        kubernetes,
        default_algs,
    }
}

fn build_kubernetes_signer(
    raw: &RawSigner,
    socket: &Spanned<PathBuf>,
    keysets: &[KeysetPolicy],
    default_algs: &BTreeMap<String, Alg>,
    c: &mut Checker,
) -> Option<KubernetesSigner> {
    let name = raw
        .kubernetes_keyset
        .as_ref()
        .map_or("default", |name| name.get_ref().as_str());
    let Some(keyset) = keysets.iter().find(|k| k.name == name) else {
        let names: Vec<&str> = keysets.iter().map(|k| k.name.as_str()).collect();
        let message = format!(
            "no keyset {name:?} is configured (keysets: {}); name the keyset kube-apiserver's tokens are signed with",
            names.join(", ")
        );
        match &raw.kubernetes_keyset {
            Some(at) => c.problem(Some(at), "signer.kubernetes_keyset", message),
            None => c.problem(Some(socket), "signer.kubernetes_keyset", message),
        }
        return None;
    };
    let alg = match &raw.kubernetes_alg {
        None => default_algs
            .get(name)
            .copied()
            .or_else(|| keyset.algorithms.first().copied())?,
        Some(alg) => {
            let Some(alg) = keyset
                .algorithms
                .iter()
                .copied()
                .find(|a| a.as_str() == alg.get_ref())
            else {
                let configured: Vec<&str> = keyset.algorithms.iter().map(|a| a.as_str()).collect();
                let message = format!(
                    "keyset {name:?} has no algorithm {:?} (it has {})",
                    alg.get_ref(),
                    configured.join(", ")
                );
                c.problem(Some(alg), "signer.kubernetes_alg", message);
                return None;
            };
            alg
        }
    };
    if keyset.timings.token_ttl < KUBERNETES_MIN_TOKEN_TTL {
        let message = format!(
            "keyset {name:?} has token_ttl {}: kube-apiserver needs an external signer's longest token (max_token_expiration_seconds = token_ttl) to be at least {}; raise keysets[{name}].token_ttl",
            show(keyset.timings.token_ttl),
            show(KUBERNETES_MIN_TOKEN_TTL)
        );
        c.problem(Some(socket), "signer.kubernetes_socket", message);
    }
    Some(KubernetesSigner {
        socket: socket.get_ref().clone(),
        keyset: name.to_string(),
        alg,
    })
}

/// What AWS would refuse at the first request, refused at validation.
fn check_aws_settings(raw: &RawStore, c: &mut Checker) {
    // Secret names: 512 characters of these; keyset names take up to 128.
    let name_char = |ch: char| ch.is_ascii_alphanumeric() || "/_+=.@-".contains(ch);
    if let Some(prefix) = &raw.secret_prefix {
        if !prefix.get_ref().chars().all(name_char) || prefix.get_ref().len() > 384 {
            c.problem(
                Some(prefix),
                "store.secret_prefix",
                "AWS secret names allow only letters, digits and /_+=.@- (at most 384 characters here, leaving 128 for the keyset name)",
            );
        }
    }
    if let Some(region) = &raw.region {
        let region_text = region.get_ref();
        let valid = !region_text.is_empty()
            && region_text
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-');
        if !valid {
            c.problem(
                Some(region),
                "store.region",
                format!("{region_text:?} is not an AWS region name (like \"eu-west-1\")"),
            );
        }
    }
    if let Some(endpoint) = &raw.endpoint_url {
        let usable = endpoint
            .get_ref()
            .parse::<http::uri::Uri>()
            .ok()
            .filter(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
            });
        if usable.is_none() {
            c.problem(
                Some(endpoint),
                "store.endpoint_url",
                format!(
                    "{:?} is not an http:// or https:// URL with a host",
                    endpoint.get_ref()
                ),
            );
        }
    }
    if let Some(kms) = &raw.kms_key_id {
        if kms.get_ref().trim().is_empty() {
            c.problem(
                Some(kms),
                "store.kms_key_id",
                "empty; leave it out to use the account's default key (aws/secretsmanager)",
            );
        }
    }
    if let Some(tags) = &raw.tags {
        let bad = tags.get_ref().iter().find(|(key, value)| {
            key.is_empty() || key.len() > 128 || value.len() > 256 || key.starts_with("aws:")
        });
        if tags.get_ref().len() > 50 {
            c.problem(
                Some(tags),
                "store.tags",
                "AWS allows at most 50 tags on a secret",
            );
        } else if let Some((key, _)) = bad {
            c.problem(
                Some(tags),
                "store.tags",
                format!("tag {key:?}: keys are 1 to 128 characters and may not start with \"aws:\"; values at most 256"),
            );
        }
    }
}

fn build_store(raw: Option<RawStore>, state_dir: &Path, c: &mut Checker) -> StoreSettings {
    let default_file = || StoreSettings::File {
        dir: state_dir.join("keysets"),
    };
    let Some(raw) = raw else {
        return default_file();
    };
    // The settings of each store type, with where they were written.
    let aws_only = [
        (
            "secret_prefix",
            raw.secret_prefix.as_ref().map(Spanned::span),
        ),
        ("region", raw.region.as_ref().map(Spanned::span)),
        ("endpoint_url", raw.endpoint_url.as_ref().map(Spanned::span)),
        ("kms_key_id", raw.kms_key_id.as_ref().map(Spanned::span)),
        ("tags", raw.tags.as_ref().map(Spanned::span)),
    ];
    let file_only = [("dir", raw.dir.as_ref().map(Spanned::span))];
    let mut refuse = |settings: &[(&str, Option<std::ops::Range<usize>>)], kind: &str| {
        for (key, at) in settings {
            if let Some(at) = at {
                let line = c.line_of(at.clone());
                c.problems.push(Problem {
                    line: Some(line),
                    key: format!("store.{key}"),
                    message: format!("not a setting of store type {kind:?}"),
                });
            }
        }
    };
    match raw.kind.get_ref().as_str() {
        "file" => {
            refuse(&aws_only, "file");
            match raw.dir {
                Some(dir) => StoreSettings::File {
                    dir: dir.into_inner(),
                },
                None => default_file(),
            }
        }
        "aws-secrets-manager" => {
            refuse(&file_only, "aws-secrets-manager");
            check_aws_settings(&raw, c);
            let secret_prefix = raw
                .secret_prefix
                .map(Spanned::into_inner)
                .unwrap_or_else(|| DEFAULT_SECRET_PREFIX.to_string());
            StoreSettings::AwsSecretsManager(AwsSettings {
                secret_prefix,
                region: raw.region.map(Spanned::into_inner),
                endpoint_url: raw.endpoint_url.map(Spanned::into_inner),
                kms_key_id: raw.kms_key_id.map(Spanned::into_inner),
                tags: raw.tags.map(Spanned::into_inner).unwrap_or_default(),
            })
        }
        other => {
            let message = format!(
                "unknown store type {other:?} (expected \"file\" or \"aws-secrets-manager\")"
            );
            c.problem(Some(&raw.kind), "store.type", message);
            default_file()
        }
    }
}

fn valid_keyset_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(first) if first.is_ascii_alphanumeric())
        && name.len() <= 128
        && chars.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
}

fn build_keyset(
    raw: RawKeyset,
    reconcile_interval: Duration,
    relayed_by_kubernetes: bool,
    context: &ParseContext,
    c: &mut Checker,
    warnings: &mut Vec<String>,
) -> KeysetPolicy {
    let name = raw.name.get_ref().clone();
    if !valid_keyset_name(&name) {
        let message = format!(
            "{name:?} is not a valid keyset name (letters, digits, '-', '_', '.'; starting with a letter or digit; at most 128)"
        );
        c.problem(Some(&raw.name), "keysets.name", message);
    }
    let key = |field: &str| format!("keysets[{name}].{field}");

    let algorithms = build_algorithms(raw.algorithms.as_ref(), &key("algorithms"), c);
    let rsa_bits = match &raw.rsa_bits {
        None => DEFAULT_RSA_BITS,
        Some(bits) => {
            let value = *bits.get_ref();
            match u32::try_from(value)
                .ok()
                .filter(|b| RSA_BITS_ALLOWED.contains(b))
            {
                Some(b) => b,
                None => {
                    let why = if value < 2048 {
                        "fewer than 2048 bits is refused as insecure; "
                    } else {
                        ""
                    };
                    let message = format!("{value} is not allowed: {why}use 2048, 3072 or 4096");
                    c.problem(Some(bits), &key("rsa_bits"), message);
                    DEFAULT_RSA_BITS
                }
            }
        }
    };

    let propagation_default = reconcile_interval * 2;
    let jwks_cache_ttl = c
        .duration(raw.jwks_cache_ttl.as_ref(), &key("jwks_cache_ttl"))
        .unwrap_or(DEFAULT_JWKS_CACHE_TTL);
    let verifier_cache_ttl = match c
        .duration(raw.verifier_cache_ttl.as_ref(), &key("verifier_cache_ttl"))
    {
        Some(ttl) if ttl < jwks_cache_ttl => {
            let message = format!(
                "{} is shorter than jwks_cache_ttl ({}): a verifier honouring max-age alone already caches that long; raise verifier_cache_ttl or lower jwks_cache_ttl",
                show(ttl),
                show(jwks_cache_ttl)
            );
            c.problem(
                raw.verifier_cache_ttl.as_ref(),
                &key("verifier_cache_ttl"),
                message,
            );
            jwks_cache_ttl
        }
        Some(ttl) => ttl,
        // The default never undercuts an explicit, longer max-age.
        None => DEFAULT_VERIFIER_CACHE_TTL.max(jwks_cache_ttl),
    };
    let timings = Timings {
        token_ttl: c.positive_duration(
            raw.token_ttl.as_ref(),
            &key("token_ttl"),
            DEFAULT_TOKEN_TTL,
        ),
        jwks_cache_ttl,
        verifier_cache_ttl,
        propagation: c
            .duration(raw.propagation.as_ref(), &key("propagation"))
            .unwrap_or(propagation_default),
        clock_skew: c
            .duration(raw.clock_skew.as_ref(), &key("clock_skew"))
            .unwrap_or(DEFAULT_CLOCK_SKEW),
        // kube-apiserver re-serves FetchKeys results for refresh_hint_seconds
        // = jwks_cache_ttl (signer/kube.rs).
        relay_cache: if relayed_by_kubernetes {
            jwks_cache_ttl
        } else {
            Duration::ZERO
        },
    };
    if timings.propagation < reconcile_interval {
        warnings.push(format!(
            "keyset {name:?}: propagation ({}) is shorter than reconcile_interval ({}): a replica may publish a change later than the timings assume",
            show(timings.propagation),
            show(reconcile_interval)
        ));
    }

    let schedule = build_schedule(&raw, &key, timings, context, c);
    let max_stale = build_max_stale(
        &raw,
        &key,
        &schedule,
        timings,
        reconcile_interval,
        context,
        c,
    );
    let discovery = build_discovery(&raw, &key, c);
    let s3_jwks = raw
        .s3_jwks
        .as_ref()
        .and_then(|url| s3_object(url, &key("s3_jwks"), c));

    KeysetPolicy {
        name,
        algorithms,
        rsa_bits,
        schedule,
        timings,
        x5c: raw.x5c.unwrap_or(true),
        max_stale,
        jwks_file: raw.jwks_file.map(Spanned::into_inner),
        signing_dir: raw.signing_dir.map(Spanned::into_inner),
        discovery: discovery.map(Box::new),
        s3_jwks: s3_jwks.map(Box::new),
    }
}

/// `max_stale` (SPEC C5). A replica cut off from the store keeps serving
/// its last JWKS, which lacks the `next` key the others made at the last
/// rotation; verifiers may cache that copy for `verifier_cache_ttl`. So it
/// must fail closed (leave the load balancer) at least `publish_lead`
/// before that key can sign: at most the rotation period minus
/// `publish_lead`, the default. At least two `reconcile_interval`s, so one
/// slow load does not trip it.
fn build_max_stale(
    raw: &RawKeyset,
    key: &dyn Fn(&str) -> String,
    schedule: &Schedule,
    timings: Timings,
    reconcile_interval: Duration,
    context: &ParseContext,
    c: &mut Checker,
) -> Duration {
    let period = schedule
        .longest_gap(context.now)
        .unwrap_or(DEFAULT_ROTATE_EVERY);
    let lead = timings.publish_lead();
    let floor = reconcile_interval * 2;
    let ceiling = period.saturating_sub(lead).max(floor);
    let Some(max_stale) = c.duration(raw.max_stale.as_ref(), &key("max_stale")) else {
        return ceiling;
    };
    if max_stale > period {
        let message = format!(
            "{} is longer than the rotation period ({}): a replica cut off from the store would keep \
             signing after the other replicas rotated twice; use at most {} (the period minus publish_lead)",
            show(max_stale),
            show(period),
            show(ceiling)
        );
        c.problem(raw.max_stale.as_ref(), &key("max_stale"), message);
    } else if max_stale > ceiling {
        let message = format!(
            "{} leaves less than publish_lead ({}) before the next rotation ({} apart): verifiers could \
             still hold a cut-off replica's JWKS, without the next key, when that key starts signing; \
             use at most {}",
            show(max_stale),
            show(lead),
            show(period),
            show(ceiling)
        );
        c.problem(raw.max_stale.as_ref(), &key("max_stale"), message);
    } else if max_stale < floor {
        let message = format!(
            "{} is shorter than two reconcile_interval ({}): one slow load would fail the replica closed; \
             use at least {}",
            show(max_stale),
            show(reconcile_interval),
            show(floor)
        );
        c.problem(raw.max_stale.as_ref(), &key("max_stale"), message);
    }
    max_stale
}

fn build_algorithms(raw: Option<&Spanned<Vec<String>>>, key: &str, c: &mut Checker) -> Vec<Alg> {
    let Some(raw) = raw else {
        return vec![Alg::ES256, Alg::RS256];
    };
    let mut algorithms = BTreeSet::new();
    for name in raw.get_ref() {
        // Algorithm names are exact in the config (JOSE spells them so).
        match Alg::ALL.into_iter().find(|alg| alg.as_str() == name) {
            Some(alg) if !algorithms.insert(alg) => {
                c.problem(Some(raw), key, format!("{name} is listed twice"));
            }
            Some(_) => {}
            None => c.problem(
                Some(raw),
                key,
                format!("unknown algorithm {name:?} (supported: \"ES256\", \"RS256\")"),
            ),
        }
    }
    if raw.get_ref().is_empty() {
        c.problem(Some(raw), key, "at least one algorithm is needed");
    }
    algorithms.into_iter().collect()
}

fn build_schedule(
    raw: &RawKeyset,
    key: &dyn Fn(&str) -> String,
    timings: Timings,
    context: &ParseContext,
    c: &mut Checker,
) -> Schedule {
    let default = Schedule::Every(DEFAULT_ROTATE_EVERY);
    let (schedule, field, span) = match (&raw.rotate, &raw.rotate_every) {
        (Some(cron), Some(_)) => {
            c.problem(
                Some(cron),
                &key("rotate"),
                "set either rotate (cron) or rotate_every (period), not both",
            );
            return default;
        }
        (Some(cron), None) => match Schedule::cron(cron.get_ref()) {
            Ok(schedule) => (schedule, "rotate", Some(cron)),
            Err(e) => {
                let message = format!(
                    "{:?} is not a cron expression ({e}); it has a seconds field, like \"0 0 3 * * Mon\"",
                    cron.get_ref()
                );
                c.problem(Some(cron), &key("rotate"), message);
                return default;
            }
        },
        (None, Some(every)) => match c.duration(Some(every), &key("rotate_every")) {
            // A zero period would rotate on every reconcile, forever.
            Some(period) if period.is_zero() => {
                c.problem(
                    Some(every),
                    &key("rotate_every"),
                    "must be longer than zero",
                );
                return default;
            }
            Some(period) => (Schedule::Every(period), "rotate_every", Some(every)),
            None => return default,
        },
        // The default period is held to the same rule: a long jwks_cache_ttl
        // or propagation (or reconcile_interval) can outgrow it. Found by
        // fuzzing.
        (None, None) => (default, "rotate_every", None),
    };
    let lead = timings.publish_lead();
    let apart = if span.is_some() {
        ""
    } else {
        " (the default rotate_every)"
    };
    match schedule.shortest_gap(context.now) {
        None => {
            c.problem(span, &key(field), "this schedule never fires again");
        }
        Some(gap) if gap < lead => {
            let message = format!(
                "rotations {} apart{apart} are shorter than publish_lead = verifier_cache_ttl ({}) + propagation ({}){} = {}: \
                 a verifier could meet a token signed with a key it has not fetched yet; \
                 rotate at most every {} or shorten verifier_cache_ttl (knowing your verifiers, see the README) or propagation",
                show(gap),
                show(timings.verifier_cache_ttl),
                show(timings.propagation),
                if timings.relay_cache.is_zero() {
                    String::new()
                } else {
                    format!(" + the kube-apiserver's cache ({})", show(timings.relay_cache))
                },
                show(lead),
                show(lead)
            );
            c.problem(span, &key(field), message);
        }
        Some(_) => {}
    }
    schedule
}

// ---- OpenID discovery and S3 ------------------------------------------------

/// Where a keyset's publication settings were written, for problems found
/// when keysets are compared with each other.
struct OutputSpans {
    issuer: Option<std::ops::Range<usize>>,
    jwks_uri: Option<std::ops::Range<usize>>,
    s3_jwks: Option<std::ops::Range<usize>>,
    s3_discovery: Option<std::ops::Range<usize>>,
}

impl OutputSpans {
    fn of(raw: &RawKeyset) -> Self {
        OutputSpans {
            issuer: raw.issuer.as_ref().map(Spanned::span),
            jwks_uri: raw.jwks_uri.as_ref().map(Spanned::span),
            s3_jwks: raw.s3_jwks.as_ref().map(Spanned::span),
            s3_discovery: raw.s3_discovery.as_ref().map(Spanned::span),
        }
    }
}

/// `issuer` and what hangs off it: `jwks_uri`, `discovery_file`,
/// `s3_discovery` (each meaningless without an issuer).
fn build_discovery(
    raw: &RawKeyset,
    key: &dyn Fn(&str) -> String,
    c: &mut Checker,
) -> Option<DiscoverySettings> {
    let Some(issuer) = &raw.issuer else {
        for (field, span) in [
            ("jwks_uri", raw.jwks_uri.as_ref().map(Spanned::span)),
            (
                "discovery_file",
                raw.discovery_file.as_ref().map(Spanned::span),
            ),
            ("s3_discovery", raw.s3_discovery.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span {
                let line = c.line_of(span);
                c.problems.push(Problem {
                    line: Some(line),
                    key: key(field),
                    message: "needs issuer: the discovery document is the issuer's".into(),
                });
            }
        }
        return None;
    };
    let issuer_url = public_url(issuer, &key("issuer"), c)?;
    let base = issuer.get_ref().trim_end_matches('/');
    let route = format!(
        "{}/.well-known/openid-configuration",
        issuer_url.path().trim_end_matches('/')
    );
    let (jwks_uri, jwks_url) = match &raw.jwks_uri {
        Some(uri) => (uri.get_ref().clone(), public_url(uri, &key("jwks_uri"), c)?),
        None => {
            let uri = format!("{base}/.well-known/jwks.json");
            // A valid issuer with this path appended is a valid URL.
            let url = url::Url::parse(&uri).ok()?;
            (uri, url)
        }
    };
    let jwks_route =
        (jwks_url.origin() == issuer_url.origin()).then(|| jwks_url.path().to_string());
    if jwks_route.as_deref() == Some(route.as_str()) {
        c.problem(
            raw.jwks_uri.as_ref(),
            &key("jwks_uri"),
            format!("{jwks_uri:?} is the discovery document's own URL; the JWKS needs another"),
        );
    }
    let s3 = raw
        .s3_discovery
        .as_ref()
        .and_then(|url| s3_object(url, &key("s3_discovery"), c));
    Some(DiscoverySettings {
        issuer: issuer.get_ref().clone(),
        jwks_uri,
        route,
        jwks_route,
        file: raw.discovery_file.as_ref().map(|f| f.get_ref().clone()),
        s3,
    })
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name.to_ascii_lowercase().ends_with(".localhost")
        }
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// An issuer or `jwks_uri`: https (http only on loopback, for tests and a
/// local proxy), a host, no query, fragment or credentials, and a path
/// written the way clients will send it.
fn public_url(value: &Spanned<String>, key: &str, c: &mut Checker) -> Option<url::Url> {
    let text = value.get_ref();
    let url = match url::Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            c.problem(Some(value), key, format!("{text:?} is not a URL ({e})"));
            return None;
        }
    };
    let mut wrong = Vec::new();
    match (url.scheme(), url.host()) {
        (_, None) => wrong.push("has no host".to_string()),
        ("https", Some(_)) => {}
        ("http", Some(host)) if is_loopback(&host) => {}
        (scheme, Some(_)) => wrong.push(format!(
            "uses {scheme}: relying parties fetch keys over https only (http is allowed for loopback hosts, like http://127.0.0.1:8080)"
        )),
    }
    if url.query().is_some() {
        wrong.push("has a query (?...): OpenID discovery forbids one".into());
    }
    if url.fragment().is_some() {
        wrong.push("has a fragment (#...): OpenID discovery forbids one".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        wrong.push("holds credentials (user@): leave them out".into());
    }
    // What follows the authority, as written: clients append to the
    // written form, so a path the URL parser would rewrite (dot segments,
    // characters it escapes) would be requested at a path we do not serve.
    let written_path = text
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|at| &rest[at..]))
        .map(|path| path.split(['?', '#']).next().unwrap_or(""))
        .unwrap_or("/");
    if wrong.is_empty() && written_path != url.path() {
        wrong.push(format!("write the path as {:?}", url.path()));
    }
    if wrong.is_empty() {
        Some(url)
    } else {
        c.problem(Some(value), key, format!("{text:?} {}", wrong.join("; ")));
        None
    }
}

/// An `s3://bucket/key` URL, with what S3 requires of bucket names and keys.
fn s3_object(value: &Spanned<String>, key: &str, c: &mut Checker) -> Option<S3Object> {
    let text = value.get_ref();
    let parsed = text
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(bucket, object)| {
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.chars().all(|ch| {
                    ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '.' || ch == '-'
                })
                && bucket.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                && bucket.ends_with(|ch: char| ch.is_ascii_alphanumeric());
            let key_ok =
                !object.is_empty() && object.len() <= 1024 && !object.chars().any(char::is_control);
            bucket_ok && key_ok
        });
    match parsed {
        Some((bucket, object)) => Some(S3Object {
            bucket: bucket.to_string(),
            key: object.to_string(),
        }),
        None => {
            c.problem(
                Some(value),
                key,
                format!(
                    "{text:?} is not an s3://bucket/key URL (a bucket name of 3 to 63 lowercase letters, digits, '.' and '-', then a key)"
                ),
            );
            None
        }
    }
}

/// What one HTTP route answers, for finding two things on one route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RouteKind {
    Jwks,
    Discovery,
    Builtin,
}

struct Route<'a> {
    path: String,
    keyset: &'a str,
    kind: RouteKind,
    /// What is served there, for the message naming the earlier route.
    what: String,
    /// The same, short, for the message naming the later route.
    short: &'static str,
    /// Where it was written: `None` for keyroll's own routes.
    at: Option<(String, std::ops::Range<usize>)>,
}

/// No two keysets on one HTTP route (discovery documents, `jwks_uri`
/// paths, and the built-in JWKS routes of another keyset), nor on one S3
/// object. Problems go to the setting written later.
fn check_shared_routes(keysets: &[(KeysetPolicy, OutputSpans)], c: &mut Checker) {
    let default = keysets
        .iter()
        .find(|(k, _)| k.name == "default")
        .or(match keysets {
            [only] => Some(only),
            _ => None,
        })
        .map(|(k, _)| k.name.as_str());
    let mut routes: Vec<Route> = ["/healthz", "/readyz", "/metrics"]
        .into_iter()
        .map(|path| Route {
            path: path.to_string(),
            keyset: "",
            kind: RouteKind::Builtin,
            what: format!("keyroll's {path} endpoint"),
            short: "",
            at: None,
        })
        .collect();
    for (policy, _) in keysets {
        routes.push(Route {
            path: format!("/keysets/{}/jwks.json", policy.name),
            keyset: &policy.name,
            kind: RouteKind::Jwks,
            what: format!("keyset {:?}'s JWKS route", policy.name),
            short: "",
            at: None,
        });
        if default == Some(policy.name.as_str()) {
            routes.push(Route {
                path: "/.well-known/jwks.json".into(),
                keyset: &policy.name,
                kind: RouteKind::Jwks,
                what: format!("the default keyset {:?}'s JWKS route", policy.name),
                short: "",
                at: None,
            });
        }
    }
    let mut objects: Vec<(&S3Object, String, Option<std::ops::Range<usize>>)> = Vec::new();
    for (policy, spans) in keysets {
        let key = |field: &str| format!("keysets[{}].{field}", policy.name);
        if let Some(object) = &policy.s3_jwks {
            objects.push((object, key("s3_jwks"), spans.s3_jwks.clone()));
        }
        let Some(discovery) = &policy.discovery else {
            continue;
        };
        if let Some(object) = &discovery.s3 {
            objects.push((object, key("s3_discovery"), spans.s3_discovery.clone()));
        }
        let issuer_at = spans.issuer.clone().unwrap_or_default();
        routes.push(Route {
            path: discovery.route.clone(),
            keyset: &policy.name,
            kind: RouteKind::Discovery,
            what: format!("{}'s discovery document", key("issuer")),
            short: "the discovery document",
            at: Some((key("issuer"), issuer_at.clone())),
        });
        if let Some(path) = &discovery.jwks_route {
            let at = match &spans.jwks_uri {
                Some(span) => (key("jwks_uri"), span.clone()),
                None => (key("issuer"), issuer_at),
            };
            routes.push(Route {
                path: path.clone(),
                keyset: &policy.name,
                kind: RouteKind::Jwks,
                what: format!("the JWKS at {}", key("jwks_uri")),
                short: "the JWKS at jwks_uri",
                at: Some(at),
            });
        }
    }
    for (i, route) in routes.iter().enumerate() {
        let Some((key, span)) = &route.at else {
            continue;
        };
        let clash = routes[..i].iter().find(|earlier| {
            earlier.path == route.path
                && (earlier.keyset != route.keyset || earlier.kind != route.kind)
        });
        if let Some(earlier) = clash {
            let line = c.line_of(span.clone());
            c.problems.push(Problem {
                line: Some(line),
                key: key.clone(),
                message: format!(
                    "{} would be served at {}, which is already {}: two keysets may not share a route; give each issuer its own path (like https://id.example.com/{})",
                    route.short, route.path, earlier.what, route.keyset
                ),
            });
        }
    }
    for (i, (object, key, span)) in objects.iter().enumerate() {
        if let Some((_, earlier, _)) = objects[..i].iter().find(|(o, _, _)| o == object) {
            let line = span.clone().map(|span| c.line_of(span));
            c.problems.push(Problem {
                line,
                key: key.clone(),
                message: format!("{object} is also {earlier}: each output needs its own object"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ParseContext {
        ParseContext {
            state_directory: None,
            now: chrono::Utc::now(),
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, ConfigSource::File("k.toml".into()), &context())
    }

    #[test]
    fn embedded_default_is_valid_and_matches_the_spec() {
        let config = Config::embedded(&context());
        assert_eq!(config.http_listen, Some("127.0.0.1:8080".parse().unwrap()));
        let keyset = config.default_keyset().unwrap();
        assert_eq!(keyset.name, "default");
        assert_eq!(keyset.algorithms, vec![Alg::ES256, Alg::RS256]);
        assert_eq!(keyset.timings.token_ttl, Duration::from_secs(3600));
        assert_eq!(keyset.timings.propagation, Duration::from_secs(60));
        assert!(matches!(keyset.schedule, Schedule::Every(d) if d == Duration::from_secs(604800)));
        assert_eq!(
            config.store,
            StoreSettings::File {
                dir: PathBuf::from("keyroll-state/keysets")
            }
        );
    }

    #[test]
    fn http_metrics_listen_and_client_cap_are_checked_with_their_lines() {
        let config = parse(
            "[http]\nlisten = \"127.0.0.1:8080\"\nmetrics_listen = \"127.0.0.1:9090\"\nmax_connections_per_client = 16\n[[keysets]]\nname = \"a\"\n",
        )
        .unwrap();
        assert_eq!(
            config.http_metrics_listen,
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(config.http_max_connections_per_client, 16);
        let default =
            parse("[http]\nlisten = \"127.0.0.1:8080\"\n[[keysets]]\nname = \"a\"\n").unwrap();
        assert_eq!(default.http_metrics_listen, None);
        assert_eq!(
            default.http_max_connections_per_client,
            DEFAULT_MAX_CONNECTIONS_PER_CLIENT
        );

        let err = parse(
            "[http]\nlisten = \"127.0.0.1:8080\"\nmetrics_listen = \"localhost\"\nmax_connections_per_client = 0\n[[keysets]]\nname = \"a\"\n",
        )
        .unwrap_err();
        let keys: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("http.metrics_listen", Some(3)),
                ("http.max_connections_per_client", Some(4))
            ],
            "{err}"
        );
        let err = parse(
            "[http]\nlisten = \"127.0.0.1:8080\"\nmetrics_listen = \"127.0.0.1:8080\"\n[[keysets]]\nname = \"a\"\n",
        )
        .unwrap_err();
        assert_eq!(err.problems[0].key, "http.metrics_listen", "{err}");
        assert!(err.to_string().contains("also http.listen"), "{err}");
        let err = parse("[http]\nlisten = \"127.0.0.1:8080\"\nmax_connections_per_client = 5000\n[[keysets]]\nname = \"a\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("between 1 and 4096"), "{err}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err =
            parse("reconcile_interval = \"30s\"\n[[keysets]]\nname = \"a\"\ntoken_tll = \"1h\"\n")
                .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("token_tll") && text.contains("line 4"),
            "{text}"
        );
    }

    #[test]
    fn unsafe_rotation_period_names_fields_and_numbers() {
        let err = parse("[[keysets]]\nname = \"a\"\nrotate_every = \"5m\"\nverifier_cache_ttl = \"5m\"\npropagation = \"1m\"\n")
            .unwrap_err();
        let text = err.to_string();
        for needle in ["line 3", "rotate_every", "publish_lead", "5m", "1m", "6m"] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }

    #[test]
    fn bad_values_are_all_reported_at_once() {
        let err = parse(
            "[[keysets]]\nname = \"a b\"\nalgorithms = [\"HS256\"]\nrsa_bits = 1024\ntoken_ttl = \"soon\"\nrotate = \"nope\"\n",
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 5, "{err}");
        let text = err.to_string();
        for needle in [
            "line 2", "line 3", "line 4", "line 5", "line 6", "HS256", "1024", "soon", "nope",
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }

    #[test]
    fn wrong_types_name_the_key_and_line() {
        let err = parse("[[keysets]]\nname = \"a\"\nrsa_bits = \"big\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "rsa_bits", "{err}");
        assert_eq!(err.problems[0].line, Some(3), "{err}");
        let err = parse("[[keysets]]\nname = \"a\"\nx5c = \"yes\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "x5c", "{err}");
    }

    #[test]
    fn zero_and_absurd_durations_are_refused() {
        let zero = "[[keysets]]\nname = \"a\"\nrotate_every = \"0s\"\njwks_cache_ttl = \"0s\"\npropagation = \"0s\"\n";
        let err = parse(zero).unwrap_err();
        assert!(
            err.to_string()
                .contains("rotate_every: must be longer than zero"),
            "{err}"
        );
        let err = parse("[[keysets]]\nname = \"a\"\ntoken_ttl = \"1000years\"\n").unwrap_err();
        assert!(
            err.to_string().contains("line 3: keysets[a].token_ttl"),
            "{err}"
        );
    }

    #[test]
    fn propagation_defaults_to_twice_the_reconcile_interval() {
        let config = parse("reconcile_interval = \"10s\"\n[[keysets]]\nname = \"a\"\n").unwrap();
        let timings = config.keysets[0].timings;
        assert_eq!(timings.propagation, Duration::from_secs(20));
        assert_eq!(timings.publish_lead(), Duration::from_secs(3620));
        assert_eq!(timings.retire_grace(), Duration::from_secs(3600 + 60 + 20));
    }

    #[test]
    fn store_settings_of_the_other_type_are_refused() {
        let err =
            parse("[store]\ntype = \"file\"\nsecret_prefix = \"x/\"\n[[keysets]]\nname = \"a\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("store.secret_prefix"), "{err}");
    }

    #[test]
    fn issuers_are_https_or_loopback_http_without_query_or_fragment() {
        let with_issuer = |issuer: &str| {
            parse(&format!(
                "[[keysets]]\nname = \"a\"\nissuer = \"{issuer}\"\n"
            ))
        };
        for good in [
            "https://id.example.com",
            "https://id.example.com/tenants/a/",
            "https://id.example.com:8443/a%20b",
            "http://127.0.0.1:8080/x",
            "http://localhost",
            "http://[::1]:9000",
        ] {
            let config = with_issuer(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(config.keysets[0].discovery.as_ref().unwrap().issuer, good);
        }
        for (bad, needle) in [
            ("http://10.0.0.1", "uses http"),
            ("http://id.example.com.evil", "uses http"),
            ("ftp://id.example.com", "uses ftp"),
            ("https://id.example.com/a b", "write the path as \"/a%20b\""),
            ("https://id.example.com/x/../a", "write the path as \"/a\""),
            ("https://u:p@id.example.com", "credentials"),
            ("https://id.example.com/?", "has a query"),
            ("id.example.com", "is not a URL"),
        ] {
            let err = with_issuer(bad).expect_err(bad).to_string();
            assert!(
                err.contains(needle) && err.contains("line 3: keysets[a].issuer"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn discovery_routes_and_s3_objects_are_derived_from_the_urls() {
        let config = parse(
            "[[keysets]]\nname = \"a\"\nissuer = \"https://id.example.com/t/\"\n\
             s3_jwks = \"s3://my.bucket-1/a/keys.json\"\n\
             s3_discovery = \"s3://my.bucket-1/t/.well-known/openid-configuration\"\n",
        )
        .unwrap();
        let keyset = &config.keysets[0];
        let discovery = keyset.discovery.as_ref().unwrap();
        assert_eq!(discovery.route, "/t/.well-known/openid-configuration");
        assert_eq!(
            discovery.jwks_uri,
            "https://id.example.com/t/.well-known/jwks.json"
        );
        assert_eq!(
            discovery.jwks_route.as_deref(),
            Some("/t/.well-known/jwks.json")
        );
        assert_eq!(
            keyset
                .s3_jwks
                .as_deref()
                .map(ToString::to_string)
                .as_deref(),
            Some("s3://my.bucket-1/a/keys.json")
        );
        assert_eq!(
            discovery
                .s3
                .as_ref()
                .map(|o| (o.bucket.as_str(), o.key.as_str())),
            Some(("my.bucket-1", "t/.well-known/openid-configuration"))
        );
        for bad in [
            "s3://AB/key",
            "s3://bucket",
            "s3://-bucket/key",
            "s3:/bucket/key",
        ] {
            let err =
                parse(&format!("[[keysets]]\nname = \"a\"\ns3_jwks = \"{bad}\"\n")).expect_err(bad);
            assert!(
                err.to_string().contains("not an s3://bucket/key URL"),
                "{err}"
            );
        }
    }

    #[test]
    fn signer_table_defaults_and_the_kubernetes_keysets_longer_lead() {
        let config = parse(
            "[[keysets]]\nname = \"default\"\nalgorithms = [\"RS256\", \"ES256\"]\ntoken_ttl = \"10m\"\n\n[[keysets]]\nname = \"apps\"\n\n[signer]\nsocket = \"/run/k/sign.sock\"\nkubernetes_socket = \"/run/k/kube.sock\"\n",
        )
        .unwrap();
        let signer = config.signer.clone().unwrap();
        assert_eq!(signer.socket_mode, 0o660);
        let kubernetes = signer.kubernetes.clone().unwrap();
        assert_eq!(
            (kubernetes.keyset.as_str(), kubernetes.alg),
            ("default", Alg::RS256)
        );
        assert_eq!(
            signer.default_alg(config.keyset("default").unwrap()),
            Some(Alg::RS256)
        );
        // kube-apiserver re-serves FetchKeys for jwks_cache_ttl: only that
        // keyset's publish_lead grows.
        let lead = |name: &str| config.keyset(name).unwrap().timings.publish_lead();
        assert_eq!(lead("default"), Duration::from_secs(3600 + 60 + 300));
        assert_eq!(lead("apps"), Duration::from_secs(3600 + 60));
    }

    #[test]
    fn the_kubernetes_lead_is_checked_against_the_schedule() {
        // 1h + 1m is fine alone, 1h + 1m + 5m is not.
        let text = "[[keysets]]\nname = \"default\"\nrotate_every = \"62m\"\n\n[signer]\nkubernetes_socket = \"/run/k/kube.sock\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains("kube-apiserver") && err.contains("line 3"),
            "{err}"
        );
        let ok = text.replace("[signer]\nkubernetes_socket", "[signer]\nsocket");
        parse(&ok).unwrap();
    }

    #[test]
    fn signer_mistakes_name_the_key_and_line() {
        let cases = [
            (
                "[signer]\nkubernetes_socket = \"/k.sock\"\nkubernetes_keyset = \"nope\"\n",
                "signer.kubernetes_keyset",
                8,
            ),
            (
                "[signer]\nkubernetes_socket = \"/k.sock\"\nkubernetes_alg = \"HS256\"\n",
                "signer.kubernetes_alg",
                8,
            ),
            (
                "[signer]\nsocket = \"/s.sock\"\nsocket_mode = \"rw\"\n",
                "signer.socket_mode",
                8,
            ),
            (
                "[signer]\nsocket = \"/s.sock\"\nsockets = 1\n",
                "sockets",
                8,
            ),
            (
                "[signer]\nsocket = \"/s.sock\"\nkubernetes_alg = \"ES256\"\n",
                "signer.kubernetes_alg",
                8,
            ),
            ("[signer]\n", "signer", 6),
        ];
        for (signer, key, line) in cases {
            let text = format!("[[keysets]]\nname = \"default\"\ntoken_ttl = \"10m\"\nalgorithms = [\"ES256\"]\n\n{signer}");
            let err = parse(&text).unwrap_err();
            assert_eq!(err.problems[0].key, key, "{err}");
            assert_eq!(err.problems[0].line, Some(line), "{err}");
        }
        let short = "[[keysets]]\nname = \"default\"\ntoken_ttl = \"5m\"\n[signer]\nkubernetes_socket = \"/k.sock\"\n";
        let err = parse(short).unwrap_err().to_string();
        assert!(err.contains("token_ttl 5m") && err.contains("10m"), "{err}");
    }
}
