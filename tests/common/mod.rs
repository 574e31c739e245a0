//! The harness behind `tests/binary.rs`: a sandbox per test (temporary
//! folder, free port, config), the `keyroll` binary run as a CLI command or
//! as a daemon killed on drop, polling with deadlines instead of sleeps, a
//! small HTTP client, and independent checks of JWKs (RFC 7638 thumbprints,
//! x5c certificates) and of tokens signed with the keys from `signing_dir`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

// ---- processes ----------------------------------------------------------------

pub const BIN: &str = env!("CARGO_BIN_EXE_keyroll");
/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(100);
/// Deadline for anything that should happen within a few seconds on an idle
/// machine; generous because the machine is shared.
pub const LONG: Duration = Duration::from_secs(60);
/// Deadline for one CLI command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Valid accelerated timings: publish_lead = 2s + 2s = 4s,
/// retire_grace = 5s + 1s + 2s = 8s, a rotation every 10s.
pub const FAST: &str = r#"rotate_every = "10s"
token_ttl = "5s"
jwks_cache_ttl = "2s"
verifier_cache_ttl = "2s"
propagation = "2s"
clock_skew = "1s"
"#;
pub const PUBLISH_LEAD: i64 = 4;
pub const RETIRE_GRACE: i64 = 8;
pub const ROTATE_EVERY: i64 = 10;

/// The same publish_lead and retire_grace, but no scheduled rotation during
/// a test: the keys change only when the test says so.
pub const STEADY: &str = r#"rotate_every = "1h"
token_ttl = "5s"
jwks_cache_ttl = "2s"
verifier_cache_ttl = "2s"
propagation = "2s"
clock_skew = "1s"
"#;

pub const ALGS: [&str; 2] = ["ES256", "RS256"];
pub const PRIVATE_MEMBERS: [&str; 6] = ["d", "p", "q", "dp", "dq", "qi"];

pub static COMMANDS_RUN: AtomicUsize = AtomicUsize::new(0);

pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// Polls `probe` every [`POLL`] until it succeeds or `timeout` passes; the
/// error names what was awaited and the last reason it was not there yet.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; last: {last}"
                ))
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

pub fn wait_until<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Result<T, String>) -> T {
    poll(what, timeout, probe).unwrap_or_else(|e| panic!("{e}"))
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("a bound address").port()
}

/// The last lines of a log, for failure messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The environment a test controls: nothing leaks in from the developer's
/// shell or from systemd.
pub fn scrubbed(mut cmd: Command, dir: &Path) -> Command {
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .env_remove("KEYROLL_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("AWS_ENDPOINT_URL");
    cmd
}

/// The finished run of one CLI command.
#[derive(Clone)]
pub struct Out {
    pub label: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.label, self.code, self.stdout, self.stderr
        )
    }
}

impl Out {
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "expected success: {self}");
        self
    }

    pub fn exits(self, code: i32) -> Self {
        assert_eq!(self.code, Some(code), "expected exit code {code}: {self}");
        self
    }

    pub fn stderr_has(&self, needles: &[&str]) {
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "{needle:?} missing in stderr: {self}"
            );
        }
    }

    pub fn stdout_has(&self, needles: &[&str]) {
        for needle in needles {
            assert!(
                self.stdout.contains(needle),
                "{needle:?} missing in stdout: {self}"
            );
        }
    }
}

/// Runs `cmd` to completion (killing it after [`CMD_TIMEOUT`]); output goes
/// through files in `dir` so a chatty command can never block on a pipe.
pub fn run_to_end(mut cmd: Command, dir: &Path, label: String) -> Out {
    let n = COMMANDS_RUN.fetch_add(1, Ordering::Relaxed);
    let out_path = dir.join(format!("cmd-{n}.stdout"));
    let err_path = dir.join(format!("cmd-{n}.stderr"));
    cmd.stdout(fs::File::create(&out_path).expect("create a stdout file"))
        .stderr(fs::File::create(&err_path).expect("create a stderr file"));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{label}`: {e}"));
    let status = poll(
        &format!("`{label}` to finish"),
        CMD_TIMEOUT,
        || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err("still running".into()),
            Err(e) => Err(e.to_string()),
        },
    );
    let status = status.unwrap_or_else(|e| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{e}");
    });
    let read = |path: &Path| {
        String::from_utf8(fs::read(path).expect("read command output")).expect("UTF-8 output")
    };
    Out {
        label,
        code: status.code(),
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// One test's world: a temporary folder (config, store, outputs) and a port.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("a temporary folder"),
            port: free_port(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root().join(relative)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("keyroll.toml")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.path("store")
    }

    pub fn store_file(&self, keyset: &str) -> PathBuf {
        self.store_dir().join(format!("{keyset}.json"))
    }

    /// The top of every config: file store and HTTP in this sandbox,
    /// reconciling every second.
    pub fn head(&self) -> String {
        format!(
            "reconcile_interval = \"1s\"\nstate_dir = '{state}'\n\n[store]\ntype = \"file\"\ndir = '{store}'\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
            state = self.path("state").display(),
            store = self.store_dir().display(),
            port = self.port
        )
    }

    /// Writes the config: the common head, then `keysets`.
    pub fn write_config(&self, keysets: &str) -> String {
        let text = format!("{}{keysets}", self.head());
        fs::write(self.config_path(), &text).expect("write the config");
        text
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn command(&self) -> Command {
        scrubbed(Command::new(BIN), self.root())
    }

    /// `keyroll --config <sandbox config> ARGS…`
    pub fn cli(&self, args: &[&str]) -> Out {
        let mut cmd = self.command();
        cmd.arg("--config").arg(self.config_path()).args(args);
        run_to_end(cmd, self.root(), format!("keyroll {}", args.join(" ")))
    }

    /// Runs a command under a given umask (as `sh -c 'umask …; exec keyroll …'`).
    pub fn cli_with_umask(&self, umask: &str, args: &[&str]) -> Out {
        let mut cmd = scrubbed(Command::new("sh"), self.root());
        cmd.arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
            .arg(BIN)
            .arg("--config")
            .arg(self.config_path())
            .args(args);
        run_to_end(
            cmd,
            self.root(),
            format!("(umask {umask}) keyroll {}", args.join(" ")),
        )
    }

    pub fn status_json(&self) -> Value {
        let out = self.cli(&["status", "--json"]).ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
    }

    /// Starts `keyroll [GLOBAL…] --config … run`.
    pub fn spawn(&self, global: &[&str]) -> Daemon {
        let mut cmd = self.command();
        cmd.args(global)
            .arg("--config")
            .arg(self.config_path())
            .arg("run");
        Daemon::start(cmd, self.root())
    }

    /// Starts the daemon under a given umask; `exec` keeps the pid.
    pub fn spawn_with_umask(&self, umask: &str) -> Daemon {
        let mut cmd = scrubbed(Command::new("sh"), self.root());
        cmd.arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
            .arg(BIN)
            .arg("--config")
            .arg(self.config_path())
            .arg("run");
        Daemon::start(cmd, self.root())
    }
}

/// A running `keyroll run`, killed when dropped.
pub struct Daemon {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    pub fn start(mut cmd: Command, dir: &Path) -> Daemon {
        let n = COMMANDS_RUN.fetch_add(1, Ordering::Relaxed);
        let stdout = dir.join(format!("daemon-{n}.stdout"));
        let stderr = dir.join(format!("daemon-{n}.stderr"));
        cmd.stdout(fs::File::create(&stdout).expect("create the daemon's stdout file"))
            .stderr(fs::File::create(&stderr).expect("create the daemon's stderr file"));
        let child = cmd.spawn().expect("start keyroll run");
        Daemon {
            child,
            stdout,
            stderr,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    pub fn log_path(&self) -> PathBuf {
        self.stderr.clone()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Panics (with the daemon's log) if it has exited.
    pub fn assert_alive(&mut self) {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("query the daemon");
        }
        if let Some(status) = self.exited {
            panic!(
                "keyroll run exited unexpectedly with {status}\n--- stderr ---\n{}",
                tail(&self.stderr())
            );
        }
    }

    /// Polls `probe` while checking the daemon stays up; a timeout shows its log.
    pub fn until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<T, String>,
    ) -> T {
        let result = poll(what, timeout, || {
            self.assert_alive();
            probe()
        });
        result.unwrap_or_else(|e| panic!("{e}\n--- daemon stderr ---\n{}", tail(&self.stderr())))
    }

    /// Sends `signal` and waits for the exit; returns the status and how long it took.
    pub fn stop(&mut self, signal: &str) -> (ExitStatus, Duration) {
        self.assert_alive();
        let sent = Instant::now();
        self.signal(signal);
        let status = wait_until(
            &format!("keyroll run to exit after SIG{signal}"),
            LONG,
            || {
                self.child
                    .try_wait()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "still running".to_string())
            },
        );
        self.exited = Some(status);
        (status, sent.elapsed())
    }
    /// Stops with `signal` and checks the exit is clean and within SPEC
    /// §5's 5 s.
    pub fn stop_cleanly(&mut self, signal: &str) {
        let (status, took) = self.stop(signal);
        assert_eq!(
            status.code(),
            Some(0),
            "SIG{signal} exits 0:\n{}",
            tail(&self.stderr())
        );
        assert!(took < Duration::from_secs(5), "SIG{signal} took {took:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- HTTP --------------------------------------------------------------------

pub struct Reply {
    pub status: u16,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HTTP {} {:?} {:?}",
            self.status,
            self.headers,
            self.text()
        )
    }
}

pub fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let mut req = agent.request(method, url);
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let response = match req.call() {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => return Err(format!("{method} {url}: {e}")),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .filter_map(|name| {
            let value = response.header(&name)?.to_string();
            Some((name.to_ascii_lowercase(), value))
        })
        .collect();
    let mut body = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut body)
        .map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub fn get(url: &str) -> Result<Reply, String> {
    request("GET", url, &[])
}

/// GET that must answer 200.
pub fn get_ok(url: &str) -> Result<Reply, String> {
    let reply = get(url)?;
    if reply.status == 200 {
        Ok(reply)
    } else {
        Err(format!("GET {url}: {reply:?}"))
    }
}

pub fn jwks_url(sb: &Sandbox, keyset: &str) -> String {
    sb.url(&format!("/keysets/{keyset}/jwks.json"))
}

pub fn metrics_text(sb: &Sandbox) -> String {
    get_ok(&sb.url("/metrics")).expect("GET /metrics").text()
}

/// The value of the sample `name{labels…}` (labels matched exactly, in any order).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let have: BTreeSet<(String, String)> = label_text
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            let want: BTreeSet<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (have == want).then(|| value.trim().parse().ok()).flatten()
        })
}

// ---- JWKS, JWK and status helpers ---------------------------------------------

pub fn parse_json(bytes: &[u8], what: &str) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "{what} is not JSON ({e}): {}",
            String::from_utf8_lossy(bytes)
        )
    })
}

pub fn jwks_keys(body: &[u8]) -> Vec<Value> {
    let jwks = parse_json(body, "the JWKS");
    let object = jwks.as_object().expect("the JWKS is an object");
    assert_eq!(
        object.len(),
        1,
        "the JWKS has exactly one member, keys: {jwks}"
    );
    jwks["keys"]
        .as_array()
        .expect("the JWKS has a keys array")
        .clone()
}

pub fn jwks_kids(body: &[u8]) -> Vec<String> {
    jwks_keys(body)
        .iter()
        .map(|k| k["kid"].as_str().expect("every JWK has a kid").to_string())
        .collect()
}

pub fn find_jwk(body: &[u8], kid: &str) -> Option<Value> {
    jwks_keys(body).into_iter().find(|k| k["kid"] == kid)
}

pub fn str_member<'a>(jwk: &'a Value, name: &str) -> &'a str {
    jwk[name]
        .as_str()
        .unwrap_or_else(|| panic!("JWK member {name} missing or not a string: {jwk}"))
}

pub fn b64url_decode(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text)
        .unwrap_or_else(|e| panic!("{text:?} is not base64url without padding: {e}"))
}

/// RFC 7638 §3: SHA-256 over the required members, lexicographic order,
/// no white space; base64url without padding. Written out by hand here so it
/// is independent of keyroll's implementation.
pub fn rfc7638_thumbprint(jwk: &Value) -> String {
    let canonical = match str_member(jwk, "kty") {
        "EC" => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            str_member(jwk, "crv"),
            str_member(jwk, "x"),
            str_member(jwk, "y")
        ),
        "RSA" => format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            str_member(jwk, "e"),
            str_member(jwk, "n")
        ),
        other => panic!("unexpected kty {other}: {jwk}"),
    };
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// The notBefore and notAfter of a DER certificate, as Unix seconds: the
/// first two UTCTime/GeneralizedTime values (the validity comes before any
/// other time in a TBSCertificate).
pub fn certificate_validity(der: &[u8]) -> (i64, i64) {
    let mut times = Vec::new();
    let mut i = 0;
    while i + 2 < der.len() && times.len() < 2 {
        let (tag, len) = (der[i], der[i + 1] as usize);
        let value = der.get(i + 2..i + 2 + len);
        let parsed = match (tag, len, value) {
            (0x17, 13, Some(v)) | (0x18, 15, Some(v))
                if v.ends_with(b"Z") && v[..len - 1].iter().all(u8::is_ascii_digit) =>
            {
                let digits = std::str::from_utf8(&v[..len - 1]).expect("ASCII digits");
                let full = if tag == 0x17 {
                    let century = if digits[..2].parse::<u32>().expect("digits") >= 50 {
                        "19"
                    } else {
                        "20"
                    };
                    format!("{century}{digits}")
                } else {
                    digits.to_string()
                };
                chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%S").ok()
            }
            _ => None,
        };
        match parsed {
            Some(t) => {
                times.push(t.and_utc().timestamp());
                i += 2 + len;
            }
            None => i += 1,
        }
    }
    assert_eq!(times.len(), 2, "no validity found in the certificate");
    (times[0], times[1])
}

/// What every published JWK must be (SPEC §2), checked independently:
/// kid = RFC 7638 thumbprint, public members only, `use`/`alg`, and a
/// self-signed certificate for this very key with x5t#S256 = its digest.
/// Returns the certificate's validity.
pub fn check_jwk(jwk: &Value, keyset: &str) -> (i64, i64) {
    let public_key = check_key_members(jwk, 2048);
    check_certificate(jwk, keyset, &public_key)
}

/// The members of a public JWK; returns the public key as it appears in a
/// certificate (the EC point, the RSA modulus).
pub fn check_key_members(jwk: &Value, rsa_bits: usize) -> Vec<u8> {
    let kid = str_member(jwk, "kid");
    assert_eq!(
        rfc7638_thumbprint(jwk),
        kid,
        "kid is not the RFC 7638 thumbprint: {jwk}"
    );
    for member in PRIVATE_MEMBERS {
        assert!(
            jwk.get(member).is_none(),
            "the published JWK has private member {member}: {jwk}"
        );
    }
    assert_eq!(str_member(jwk, "use"), "sig", "{jwk}");
    let public_key_bytes = match str_member(jwk, "kty") {
        "EC" => {
            assert_eq!(str_member(jwk, "alg"), "ES256", "{jwk}");
            assert_eq!(str_member(jwk, "crv"), "P-256", "{jwk}");
            let (x, y) = (
                b64url_decode(str_member(jwk, "x")),
                b64url_decode(str_member(jwk, "y")),
            );
            assert_eq!(
                (x.len(), y.len()),
                (32, 32),
                "P-256 coordinates are 32 bytes: {jwk}"
            );
            [&[0x04][..], &x, &y].concat()
        }
        "RSA" => {
            assert_eq!(str_member(jwk, "alg"), "RS256", "{jwk}");
            assert_eq!(str_member(jwk, "e"), "AQAB", "e = 65537: {jwk}");
            let n = b64url_decode(str_member(jwk, "n"));
            assert_eq!(n.len() * 8, rsa_bits, "a {rsa_bits}-bit modulus: {jwk}");
            assert!(
                n[0] >= 0x80,
                "the modulus has no leading zero and {rsa_bits} bits: {jwk}"
            );
            n
        }
        other => panic!("unexpected kty {other}"),
    };
    public_key_bytes
}

/// `x5c` holds a self-signed certificate for `public_key` naming the
/// keyset, and `x5t#S256` is its digest. Returns its validity.
pub fn check_certificate(jwk: &Value, keyset: &str, public_key_bytes: &[u8]) -> (i64, i64) {
    let chain = jwk["x5c"]
        .as_array()
        .unwrap_or_else(|| panic!("x5c missing: {jwk}"));
    assert_eq!(
        chain.len(),
        1,
        "x5c holds one self-signed certificate: {jwk}"
    );
    let der = STANDARD
        .decode(chain[0].as_str().expect("x5c entries are strings"))
        .expect("x5c is standard base64 (with padding)");
    assert_eq!(
        str_member(jwk, "x5t#S256"),
        URL_SAFE_NO_PAD.encode(Sha256::digest(&der)),
        "x5t#S256 is not the SHA-256 of the x5c certificate: {jwk}"
    );
    let contains = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(public_key_bytes),
        "the certificate is not for this JWK's key: {jwk}"
    );
    assert!(
        contains(keyset.as_bytes()),
        "the certificate subject does not name keyset {keyset}: {jwk}"
    );
    certificate_validity(&der)
}

pub fn timestamp(value: &Value) -> Option<i64> {
    let text = value.as_str()?;
    // Milliseconds at most: whole seconds let a key be activated up to a
    // second before publish_lead passed (issue 9).
    let fraction = text
        .split_once('.')
        .map_or(0, |(_, f)| f.trim_end_matches('Z').len());
    assert!(
        text.ends_with('Z') && fraction <= 3,
        "timestamps are RFC 3339 UTC, to the millisecond at most: {text}"
    );
    Some(
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
            .timestamp(),
    )
}

/// One key as `status --json` shows it.
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub kid: String,
    pub alg: String,
    pub state: String,
    pub created_at: i64,
    pub published_at: i64,
    pub activated_at: Option<i64>,
    pub retired_at: Option<i64>,
    pub remove_at: Option<i64>,
}

pub fn keyset_status<'a>(status: &'a Value, keyset: &str) -> &'a Value {
    status["keysets"]
        .as_array()
        .expect("status --json has a keysets array")
        .iter()
        .find(|k| k["name"] == keyset)
        .unwrap_or_else(|| panic!("keyset {keyset} missing from status: {status}"))
}

pub fn key_rows(status: &Value, keyset: &str) -> Vec<KeyRow> {
    keyset_status(status, keyset)["keys"]
        .as_array()
        .expect("a keys array")
        .iter()
        .map(|k| KeyRow {
            kid: k["kid"].as_str().expect("kid").to_string(),
            alg: k["alg"].as_str().expect("alg").to_string(),
            state: k["state"].as_str().expect("state").to_string(),
            created_at: timestamp(&k["created_at"]).expect("created_at"),
            published_at: timestamp(&k["published_at"]).expect("published_at"),
            activated_at: timestamp(&k["activated_at"]),
            retired_at: timestamp(&k["retired_at"]),
            remove_at: timestamp(&k["remove_at"]),
        })
        .collect()
}

pub fn row<'a>(rows: &'a [KeyRow], alg: &str, state: &str) -> &'a KeyRow {
    let found: Vec<&KeyRow> = rows
        .iter()
        .filter(|r| r.alg == alg && r.state == state)
        .collect();
    assert_eq!(found.len(), 1, "expected one {state} {alg} key: {rows:?}");
    found[0]
}

/// The stored document, parsed.
pub fn store_doc(sb: &Sandbox, keyset: &str) -> Value {
    parse_json(
        &fs::read(sb.store_file(keyset)).expect("read the store file"),
        "the store document",
    )
}

// ---- signing with the keys from signing_dir -----------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct SignerKey {
    pub alg: &'static str,
    pub kid: String,
    pub pem: Vec<u8>,
}

/// Reads `<ALG>.kid` and `<ALG>.pem` as a careful signer does. Each file is
/// replaced atomically but the pair is not: a read that straddles an
/// activation can pair the new kid with the old key. So the pair is checked
/// (the kid is the RFC 7638 thumbprint of the key) and read again until it
/// agrees; `signing.json` is the one-file alternative the README gives.
pub fn read_signer(dir: &Path, alg: &'static str) -> Result<SignerKey, String> {
    let deadline = Instant::now() + LONG;
    loop {
        let kid = fs::read_to_string(dir.join(format!("{alg}.kid")))
            .map_err(|e| format!("{alg}.kid: {e}"))?;
        let pem =
            fs::read(dir.join(format!("{alg}.pem"))).map_err(|e| format!("{alg}.pem: {e}"))?;
        let of_pem = pem_kid(alg, &pem)?;
        if of_pem == kid {
            return Ok(SignerKey { alg, kid, pem });
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{alg}.kid says {kid} but {alg}.pem holds {of_pem}, for {LONG:?}"
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The kid of a PEM's key: only to pair `<ALG>.kid` with `<ALG>.pem`.
fn pem_kid(alg: &str, pem: &[u8]) -> Result<String, String> {
    use keyroll::key::KeyFactory;
    let alg: keyroll::key::Alg = alg.parse().map_err(|_| format!("unknown alg {alg}"))?;
    let text = String::from_utf8(pem.to_vec()).map_err(|_| format!("{alg}.pem is not UTF-8"))?;
    let pem = keyroll::key::SecretPem::new(zeroize::Zeroizing::new(text));
    keyroll::key::CryptoKeys
        .public_jwk(alg, &pem)
        .map(|jwk| jwk.kid)
        .map_err(|e| format!("{alg}.pem: {e}"))
}

pub fn algorithm(alg: &str) -> Algorithm {
    match alg {
        "ES256" => Algorithm::ES256,
        "RS256" => Algorithm::RS256,
        other => panic!("unexpected alg {other}"),
    }
}

/// A token as a co-located signer would make it: the PEM from signing_dir,
/// the kid from `<ALG>.kid` in the header.
pub fn sign(key: &SignerKey) -> String {
    let encoding = match key.alg {
        "ES256" => EncodingKey::from_ec_pem(&key.pem),
        _ => EncodingKey::from_rsa_pem(&key.pem),
    }
    .unwrap_or_else(|e| panic!("{}.pem is not a usable PKCS#8 key: {e}", key.alg));
    let mut header = Header::new(algorithm(key.alg));
    header.kid = Some(key.kid.clone());
    let now = now_unix() as u64;
    let claims = json!({"sub": "keyroll-e2e", "iat": now, "exp": now + 300});
    jsonwebtoken::encode(&header, &claims, &encoding).expect("sign a token")
}

/// Verifies a token the way a relying party does: pick the JWK by the
/// header's kid from the published JWKS, verify signature and claims.
pub fn verify(token: &str, jwks_body: &[u8]) -> Result<(), String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("the token has no kid")?;
    let jwk = find_jwk(jwks_body, &kid).ok_or_else(|| format!("kid {kid} is not in the JWKS"))?;
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk)
        .map_err(|e| format!("JWK {kid} does not parse as a JWK: {e}"))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("JWK {kid}: {e}"))?;
    jsonwebtoken::decode::<Value>(token, &key, &Validation::new(header.alg))
        .map(drop)
        .map_err(|e| format!("token with kid {kid} does not verify: {e}"))
}

/// Waits for the daemon's first publish: /readyz and the signing files.
pub fn wait_ready(daemon: &mut Daemon, sb: &Sandbox) {
    daemon.until("/readyz to answer 200", LONG, || {
        get_ok(&sb.url("/readyz")).map(drop)
    });
}

pub fn keyset_block(name: &str, algs: &[&str], timings: &str, extra: &str) -> String {
    let algs: Vec<String> = algs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "\n[[keysets]]\nname = \"{name}\"\nalgorithms = [{}]\n{timings}{extra}",
        algs.join(", ")
    )
}

pub fn outputs(jwks_file: Option<&Path>, signing_dir: Option<&Path>) -> String {
    let mut text = String::new();
    if let Some(file) = jwks_file {
        text.push_str(&format!("jwks_file = '{}'\n", file.display()));
    }
    if let Some(dir) = signing_dir {
        text.push_str(&format!("signing_dir = '{}'\n", dir.display()));
    }
    text
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}
