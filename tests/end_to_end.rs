//! SPEC I6 end to end, in-process: replicas of the real daemon (its
//! `start` / `pass` / `sleep` under tokio's paused clock, one time source),
//! a shared store that can lose documents or be swapped, partitions that
//! fail or hang, crashes at any store call, clock offsets, config edits and
//! operator actions; signers that read the outputs up to `propagation` late
//! and sign with `exp = iat + token_ttl`; verifiers that cache as real ones
//! do. After every step: every token issued verifies at every verifier
//! until it expires, except those `rotate --now` and revoke may break.
//!
//! Two checks of I6 run side by side:
//! - three simulated verifiers: one honours `max-age` and refetches only on
//!   expiry (the Kubernetes authenticator), one keeps its copy for
//!   `verifier_cache_ttl` and never refetches on an unknown kid (Envoy), one
//!   refetches on an unknown kid after a cooldown (node jose);
//! - the strongest verifier possible: any copy any ready replica served, kept
//!   for `verifier_cache_ttl`, must hold every token's kid while it is valid.
//!
//! Half the cases give the replicas a store that reports every change as
//! it happens, as the file store's inotify watch does: the daemon then reads
//! only the keysets that are due or changed, and must stay as safe.
//!
//! `PROPTEST_CASES=256 cargo test --release --test end_to_end` runs more.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use keyroll::clock::{Clock, Timestamp, TokioClock};
use keyroll::config::{Config, ConfigError, ConfigSource, ParseContext};
use keyroll::daemon::{Daemon, Setup};
use keyroll::key::{Alg, KeyFactory};
use keyroll::planner::Action;
use keyroll::publish::{Served, ServedState};
use keyroll::reconcile::Reconciler;
use keyroll::store::watch::{Change, ChangeFeed, WatchError};
use keyroll::store::{Store, StoreError, Stored, Version};
use support::{t0, FakeKeys};

const REPLICAS: usize = 3;
/// The driver looks at every replica this often (virtual time).
const SAMPLE: Duration = Duration::from_secs(5);
/// Signers issue tokens this often.
const SIGN_EVERY: u32 = 12;
const PROPAGATION: i64 = 60;
const CLOCK_SKEW: i64 = 60;
const PERIOD: i64 = 3600;
const KEYSETS: [&str; 2] = ["default", "second"];

// ---- the shared store ------------------------------------------------------------

/// What every replica's store link reaches: documents, and the kids whose
/// tokens SPEC allows to break (activated by `rotate --now` or revoke, or
/// revoked).
#[derive(Default)]
struct World {
    docs: HashMap<String, (Zeroizing<String>, u64)>,
    counter: u64,
    exceptions: BTreeSet<String>,
    /// Whether links offer a change feed (`Store::watch`), and the feeds
    /// of the replicas that took one: every change of `docs` is sent to
    /// each (`None`: the whole store changed).
    watched: bool,
    feeds: Vec<mpsc::UnboundedSender<Option<String>>>,
}

impl World {
    /// Reports a change of `keyset`'s document (`None`: of every one) to
    /// every live feed, as inotify reports a save or a deletion at once,
    /// whoever made it.
    fn changed(&mut self, keyset: Option<&str>) {
        self.feeds
            .retain(|feed| feed.send(keyset.map(str::to_string)).is_ok());
    }

    fn note_exceptions(&mut self, text: &str) {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(text) else {
            return;
        };
        for record in doc["audit"].as_array().into_iter().flatten() {
            let trigger = record["trigger"].as_str().unwrap_or("");
            let event = record["event"].as_str().unwrap_or("");
            let forced = event == "activated" && matches!(trigger, "forced" | "revoke");
            if forced || event == "revoked" {
                if let Some(kid) = record["kid"].as_str() {
                    self.exceptions.insert(kid.to_string());
                }
            }
        }
    }
}

const UP: u8 = 0;
const FAILING: u8 = 1;
const HANGING: u8 = 2;

/// One replica's way to the store: it can be cut off (failing or hanging,
/// as a partition does) or crash the replica at its n-th call.
struct Link {
    world: Arc<Mutex<World>>,
    mode: Arc<AtomicU8>,
    /// Calls left before a crash; negative: no crash planned.
    crash_in: Arc<AtomicI64>,
    /// Crash after the call took effect (a lost acknowledgement).
    crash_after: bool,
    crashed: Arc<AtomicU8>,
}

impl Link {
    /// Yields (a point where other tasks run) and applies faults. `None`:
    /// the call proceeds; `Some(e)`: it fails.
    async fn gate(&self, keyset: &str) -> Option<StoreError> {
        tokio::task::yield_now().await;
        if self.crashed.load(Ordering::SeqCst) == 1 {
            std::future::pending::<()>().await;
        }
        if self.crash_in.fetch_sub(1, Ordering::SeqCst) == 1 && !self.crash_after {
            self.crashed.store(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        match self.mode.load(Ordering::SeqCst) {
            FAILING => Some(StoreError::Unavailable {
                location: format!("sim:{keyset}"),
                message: "partitioned".into(),
            }),
            HANGING => std::future::pending().await,
            _ => None,
        }
    }

    async fn after(&self) {
        if self.crash_after && self.crash_in.load(Ordering::SeqCst) == 0 {
            self.crashed.store(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        tokio::task::yield_now().await;
    }
}

#[async_trait]
impl Store for Link {
    fn location(&self, keyset: &str) -> String {
        format!("sim:{keyset}")
    }

    async fn load(&self, keyset: &str) -> Result<Option<Stored>, StoreError> {
        if let Some(e) = self.gate(keyset).await {
            return Err(e);
        }
        let loaded = {
            let world = self.world.lock().unwrap();
            world.docs.get(keyset).map(|(text, version)| Stored {
                text: text.clone(),
                version: Version(version.to_string()),
            })
        };
        self.after().await;
        Ok(loaded)
    }

    async fn save(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        if let Some(e) = self.gate(keyset).await {
            return Err(e);
        }
        let saved = {
            let mut world = self.world.lock().unwrap();
            let current = world.docs.get(keyset).map(|(_, v)| Version(v.to_string()));
            if current.as_ref() != expected {
                Err(StoreError::Conflict {
                    location: self.location(keyset),
                })
            } else {
                world.counter += 1;
                let version = world.counter;
                world.docs.insert(
                    keyset.to_string(),
                    (Zeroizing::new(text.to_string()), version),
                );
                world.note_exceptions(text);
                world.changed(Some(keyset));
                Ok(Version(version.to_string()))
            }
        };
        self.after().await;
        saved
    }

    async fn keysets(&self) -> Result<Vec<String>, StoreError> {
        if let Some(e) = self.gate("*").await {
            return Err(e);
        }
        Ok(self.world.lock().unwrap().docs.keys().cloned().collect())
    }

    /// A local watch keeps reporting while loads fail: a partition cuts
    /// the store calls, not the feed (as a failing disk leaves inotify up).
    fn watch(&self) -> Option<Result<Box<dyn ChangeFeed>, WatchError>> {
        let mut world = self.world.lock().unwrap();
        if !world.watched {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        world.feeds.push(tx);
        Some(Ok(Box::new(Feed(rx))))
    }
}

/// One replica's change feed from the world.
struct Feed(mpsc::UnboundedReceiver<Option<String>>);

#[async_trait]
impl ChangeFeed for Feed {
    async fn next(&mut self) -> Result<Change, WatchError> {
        let closed = || WatchError::Read(std::io::ErrorKind::UnexpectedEof.into());
        let mut changed = BTreeSet::new();
        let mut every = false;
        let mut report = |keyset: Option<String>| match keyset {
            Some(keyset) => {
                changed.insert(keyset);
            }
            None => every = true,
        };
        report(self.0.recv().await.ok_or_else(closed)?);
        while let Ok(keyset) = self.0.try_recv() {
            report(keyset);
        }
        Ok(if every {
            Change::Unknown
        } else {
            Change::Keysets(changed)
        })
    }
}

// ---- the config ------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Settings {
    token_ttl: i64,
    jwks_cache_ttl: i64,
    verifier_cache_ttl: i64,
    rs256: bool,
    second: bool,
    rsa_bits: u32,
}

impl Settings {
    fn text(&self) -> String {
        let mut text = String::from(
            "reconcile_interval = \"30s\"\n[store]\ntype = \"file\"\ndir = \"/nonexistent-keyroll-e2e\"\n",
        );
        for name in KEYSETS {
            if name == "second" && !self.second {
                continue;
            }
            let algorithms = if self.rs256 && name == "default" {
                r#"["ES256", "RS256"]"#
            } else {
                r#"["ES256"]"#
            };
            text.push_str(&format!(
                "\n[[keysets]]\nname = \"{name}\"\nalgorithms = {algorithms}\nrsa_bits = {}\n\
                 rotate_every = \"{PERIOD}s\"\ntoken_ttl = \"{}s\"\njwks_cache_ttl = \"{}s\"\n\
                 verifier_cache_ttl = \"{}s\"\npropagation = \"{PROPAGATION}s\"\nclock_skew = \"{CLOCK_SKEW}s\"\n",
                self.rsa_bits, self.token_ttl, self.jwks_cache_ttl, self.verifier_cache_ttl
            ));
        }
        text
    }

    fn config(&self, now: Timestamp) -> Config {
        let context = ParseContext {
            state_directory: None,
            now,
        };
        Config::parse(
            &self.text(),
            ConfigSource::File("e2e.toml".into()),
            &context,
        )
        .unwrap_or_else(|e| panic!("the model's config must be valid: {e}\n{}", self.text()))
    }
}

// ---- replicas ----------------------------------------------------------------------

/// One served state, from `from` until the next one (or the replica's end).
struct Sample {
    from: Timestamp,
    ready: bool,
    /// Keyset → the kids its JWKS route serves (`None`: 404).
    jwks: BTreeMap<String, Option<BTreeSet<String>>>,
    /// Keyset → the kids signers are offered.
    offered: BTreeMap<String, Vec<(Alg, String)>>,
}

struct Replica {
    task: Option<tokio::task::JoinHandle<()>>,
    served: Option<ServedState>,
    last: Option<Arc<Served>>,
    control: Option<mpsc::UnboundedSender<Config>>,
    mode: Arc<AtomicU8>,
    crash_in: Arc<AtomicI64>,
    crashed: Arc<AtomicU8>,
    offset: chrono::Duration,
    /// Every state this replica served, and when it stopped (crash).
    history: Vec<Sample>,
    ended: Vec<Timestamp>,
    /// What its `jwks_file` would hold: the last JWKS it served, per keyset.
    jwks_files: HashMap<String, Vec<keyroll::key::PublicJwk>>,
}

fn kids(body: &[u8]) -> BTreeSet<String> {
    let value: serde_json::Value = serde_json::from_slice(body).expect("the JWKS is JSON");
    value["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_string())
        .collect()
}

impl Replica {
    fn new() -> Self {
        Replica {
            task: None,
            served: None,
            last: None,
            control: None,
            mode: Arc::new(AtomicU8::new(UP)),
            crash_in: Arc::new(AtomicI64::new(-1)),
            crashed: Arc::new(AtomicU8::new(0)),
            offset: chrono::Duration::zero(),
            history: Vec::new(),
            ended: Vec::new(),
            jwks_files: HashMap::new(),
        }
    }

    fn alive(&self) -> bool {
        self.task.is_some()
    }

    async fn start(
        &mut self,
        config: Config,
        world: &Arc<Mutex<World>>,
        keys: &Arc<FakeKeys>,
        root: &TokioClock,
        crash_after: bool,
    ) {
        self.crashed.store(0, Ordering::SeqCst);
        let link = Link {
            world: world.clone(),
            mode: self.mode.clone(),
            crash_in: self.crash_in.clone(),
            crash_after,
            crashed: self.crashed.clone(),
        };
        let setup = Setup {
            config,
            reload: Box::new(|| {
                Err(ConfigError {
                    source_name: "e2e".into(),
                    problems: Vec::new(),
                })
            }),
            keys: keys.clone() as Arc<dyn KeyFactory>,
            clock: Arc::new(root.skewed(self.offset)),
            store: Some(Arc::new(link)),
            published: self.jwks_files.clone(),
        };
        let mut daemon = Daemon::start(setup).await.expect("the daemon starts");
        self.served = Some(daemon.served());
        self.last = None;
        let (control, mut configs) = mpsc::unbounded_channel::<Config>();
        self.control = Some(control);
        self.task = Some(tokio::spawn(async move {
            // As `daemon::run` does with SIGHUP: a config change interrupts
            // a pass (a hung store call must not delay it) or a sleep.
            loop {
                let config = tokio::select! {
                    config = configs.recv() => Some(config),
                    _ = daemon.pass() => None,
                };
                let config = match config {
                    Some(config) => Some(config),
                    None => tokio::select! {
                        config = configs.recv() => Some(config),
                        _ = daemon.sleep() => None,
                    },
                };
                match config {
                    Some(Some(config)) => daemon.reconfigure(config).await,
                    Some(None) => return,
                    None => {}
                }
            }
        }));
    }

    fn crash(&mut self, now: Timestamp) {
        if let Some(served) = &self.served {
            for (keyset, jwks) in &served.load().keysets {
                let keys = keyroll::publish::parse_public_keys(&jwks.body);
                self.jwks_files.insert(keyset.clone(), keys);
            }
        }
        if let Some(task) = self.task.take() {
            task.abort();
            self.ended.push(now);
            self.history.push(Sample {
                from: now,
                ready: false,
                jwks: BTreeMap::new(),
                offered: BTreeMap::new(),
            });
        }
        self.served = None;
        self.control = None;
        self.crash_in.store(-1, Ordering::SeqCst);
    }

    /// Records what the replica serves now, if it changed.
    fn sample(&mut self, now: Timestamp) {
        let Some(served) = &self.served else { return };
        let current = served.load_full();
        if self
            .last
            .as_ref()
            .is_some_and(|last| Arc::ptr_eq(last, &current))
        {
            return;
        }
        let jwks = KEYSETS
            .iter()
            .map(|name| {
                let route = current.keysets.get(*name).map(|doc| kids(&doc.body));
                (name.to_string(), route)
            })
            .collect();
        let offered = current
            .offered
            .iter()
            .map(|(name, keys)| (name.clone(), keys.clone()))
            .collect();
        self.history.push(Sample {
            from: now,
            ready: current.ready(),
            jwks,
            offered,
        });
        self.last = Some(current);
    }

    /// What signers reading this replica's outputs at `at` were offered.
    fn offered_at(&self, at: Timestamp) -> Option<&BTreeMap<String, Vec<(Alg, String)>>> {
        self.history
            .iter()
            .rev()
            .find(|state| state.from <= at)
            .map(|state| &state.offered)
    }

    /// What a verifier fetching this keyset's JWKS from this replica gets
    /// now; `None` when the replica is not in the load balancer (not ready).
    fn fetch(&self, keyset: &str) -> Option<Option<BTreeSet<String>>> {
        let state = self.history.last()?;
        if !state.ready || !self.alive() {
            return None;
        }
        Some(state.jwks.get(keyset).cloned().flatten())
    }
}

// ---- signers and verifiers ---------------------------------------------------------

#[derive(Clone, Debug)]
struct Token {
    keyset: String,
    kid: String,
    iat: Timestamp,
    exp: Timestamp,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Honours max-age, refetches only when it expires.
    MaxAge,
    /// Keeps its copy `verifier_cache_ttl`, never refetches on an unknown kid.
    FixedTtl,
    /// Refetches on an unknown kid, at most once per cooldown.
    RefetchOnUnknown,
}

struct Verifier {
    kind: Kind,
    /// Keyset → (fetched at, kids).
    cache: HashMap<String, (Timestamp, BTreeSet<String>)>,
    last_fetch: HashMap<String, Timestamp>,
    next_replica: usize,
}

impl Verifier {
    /// Fetches from the next ready replica. A 404 leaves the verifier
    /// without keys; with no replica ready it keeps what it has.
    fn fetch(&mut self, keyset: &str, now: Timestamp, replicas: &[Replica]) -> bool {
        for _ in 0..replicas.len() {
            let replica = &replicas[self.next_replica % replicas.len()];
            self.next_replica += 1;
            let Some(answer) = replica.fetch(keyset) else {
                continue;
            };
            self.last_fetch.insert(keyset.to_string(), now);
            match answer {
                Some(kids) => {
                    self.cache.insert(keyset.to_string(), (now, kids));
                }
                None => {
                    self.cache.remove(keyset);
                }
            }
            return true;
        }
        false
    }

    fn accepts(
        &mut self,
        token: &Token,
        now: Timestamp,
        (settings, min_vct): (&Settings, i64),
        replicas: &[Replica],
    ) -> bool {
        let ttl = match self.kind {
            Kind::MaxAge => settings.jwks_cache_ttl,
            Kind::FixedTtl | Kind::RefetchOnUnknown => min_vct,
        };
        let stale = self
            .cache
            .get(&token.keyset)
            .is_none_or(|(at, _)| now >= *at + chrono::Duration::seconds(ttl));
        if stale {
            self.fetch(&token.keyset, now, replicas);
        }
        let known = |cache: &HashMap<String, (Timestamp, BTreeSet<String>)>| {
            cache
                .get(&token.keyset)
                .is_some_and(|(_, kids)| kids.contains(&token.kid))
        };
        if known(&self.cache) {
            return true;
        }
        if let Kind::RefetchOnUnknown = self.kind {
            let cooldown = chrono::Duration::seconds(30);
            let may = self
                .last_fetch
                .get(&token.keyset)
                .is_none_or(|at| now >= *at + cooldown);
            if may && self.fetch(&token.keyset, now, replicas) {
                return known(&self.cache);
            }
        }
        false
    }
}

// ---- what is generated ---------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// Let this many minutes pass.
    Wait(u32),
    Rotate {
        rs256: bool,
        now: bool,
    },
    Revoke {
        state: &'static str,
        index: usize,
    },
    ToggleRs256,
    ToggleSecond,
    RsaBits(u32),
    TokenTtl(i64),
    JwksCacheTtl(i64),
    VerifierCacheTtl(i64),
    DeleteDocument(usize),
    SwapStore,
    Partition {
        replica: usize,
        hang: bool,
    },
    Heal(usize),
    Crash {
        replica: usize,
        at_call: i64,
        after: bool,
    },
    ClockOffset {
        replica: usize,
        seconds: i64,
    },
    DownForWeeks(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let replica = 0..REPLICAS;
    prop_oneof![
        8 => (1u32..=30).prop_map(Op::Wait),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(rs256, now)| Op::Rotate { rs256, now }),
        1 => (prop::sample::select(vec!["active", "next", "retired"]), 0usize..4)
            .prop_map(|(state, index)| Op::Revoke { state, index }),
        1 => Just(Op::ToggleRs256),
        1 => Just(Op::ToggleSecond),
        1 => prop::sample::select(vec![2048u32, 3072]).prop_map(Op::RsaBits),
        1 => prop::sample::select(vec![120i64, 300, 900]).prop_map(Op::TokenTtl),
        1 => prop::sample::select(vec![30i64, 60, 120]).prop_map(Op::JwksCacheTtl),
        1 => prop::sample::select(vec![120i64, 600, 1800]).prop_map(Op::VerifierCacheTtl),
        1 => (0usize..2).prop_map(Op::DeleteDocument),
        1 => Just(Op::SwapStore),
        2 => (replica.clone(), any::<bool>()).prop_map(|(replica, hang)| Op::Partition { replica, hang }),
        2 => replica.clone().prop_map(Op::Heal),
        2 => (replica.clone(), 1i64..6, any::<bool>())
            .prop_map(|(replica, at_call, after)| Op::Crash { replica, at_call, after }),
        1 => (replica, -7i64..=7).prop_map(|(replica, seconds)| Op::ClockOffset { replica, seconds }),
        1 => (1u32..=3).prop_map(Op::DownForWeeks),
    ]
}

// ---- the driver ------------------------------------------------------------------------

struct Sim {
    world: Arc<Mutex<World>>,
    keys: Arc<FakeKeys>,
    root: TokioClock,
    settings: Settings,
    replicas: Vec<Replica>,
    tokens: Vec<Token>,
    verifiers: Vec<Verifier>,
    samples: u32,
    failures: Vec<String>,
    /// The shortest `verifier_cache_ttl` configured during the run: what
    /// the operator told keyroll about its verifiers holds for all of it.
    min_vct: i64,
    /// When an operator action last made a key that signs before the next
    /// scheduled rotation (see [`Sim::unscheduled_activation`]).
    last_unscheduled: Option<Timestamp>,
    /// The `token_ttl` of keyset "second" when it was removed.
    removed_ttl: Option<i64>,
}

impl Sim {
    fn now(&self) -> Timestamp {
        self.root.now()
    }

    async fn start_all(&mut self) {
        let config = self.settings.config(self.now());
        for replica in &mut self.replicas {
            replica
                .start(config.clone(), &self.world, &self.keys, &self.root, false)
                .await;
        }
    }

    async fn reconfigure(&mut self) {
        let config = self.settings.config(self.now());
        for replica in &self.replicas {
            if let Some(control) = &replica.control {
                let _ = control.send(config.clone());
            }
        }
    }

    /// Lets `total` pass in samples: replicas run, signers sign, verifiers
    /// check every live token.
    async fn wait(&mut self, total: Duration) {
        let mut waited = Duration::ZERO;
        while waited < total {
            tokio::time::sleep(SAMPLE).await;
            waited += SAMPLE;
            self.samples += 1;
            let now = self.now();
            self.restart_crashed().await;
            for replica in &mut self.replicas {
                replica.sample(now);
            }
            if self.samples.is_multiple_of(SIGN_EVERY) {
                self.sign(now);
            }
            self.verify(now);
        }
    }

    /// A replica whose link crashed it is killed and started afresh.
    async fn restart_crashed(&mut self) {
        let now = self.now();
        let config = self.settings.config(now);
        for replica in &mut self.replicas {
            if replica.crashed.load(Ordering::SeqCst) == 1 {
                replica.crash(now);
                replica
                    .start(config.clone(), &self.world, &self.keys, &self.root, false)
                    .await;
            }
        }
    }

    /// Signers on every replica, one reading its outputs now and one
    /// `propagation` late, each sign with every key offered.
    fn sign(&mut self, now: Timestamp) {
        let late = now - chrono::Duration::seconds(PROPAGATION);
        for replica in &self.replicas {
            if !replica.alive() {
                continue;
            }
            for at in [now, late] {
                let Some(offered) = replica.offered_at(at) else {
                    continue;
                };
                for (keyset, keys) in offered {
                    let exp = now + chrono::Duration::seconds(self.token_ttl_of(keyset));
                    for (_, kid) in keys {
                        self.tokens.push(Token {
                            keyset: keyset.clone(),
                            kid: kid.clone(),
                            iat: now,
                            exp,
                        });
                    }
                }
            }
        }
    }

    /// The `token_ttl` a signer of `keyset` uses: a keyset removed from the
    /// config keeps the one it had (later edits are not its).
    fn token_ttl_of(&self, keyset: &str) -> i64 {
        match self.removed_ttl {
            Some(ttl) if keyset == "second" && !self.settings.second => ttl,
            _ => self.settings.token_ttl,
        }
    }

    fn verify(&mut self, now: Timestamp) {
        let exceptions = self.world.lock().unwrap().exceptions.clone();
        for token in &self.tokens {
            if token.iat > now || token.exp < now || exceptions.contains(&token.kid) {
                continue;
            }
            for verifier in &mut self.verifiers {
                if !verifier.accepts(token, now, (&self.settings, self.min_vct), &self.replicas) {
                    self.failures.push(format!(
                        "{:?} verifier rejected {token:?} at {now}",
                        verifier.kind
                    ));
                }
            }
        }
        self.tokens.retain(|token| token.exp >= now);
    }

    /// The strongest verifier: any copy a ready replica served, kept for
    /// `verifier_cache_ttl`, must know every token's kid while it is valid.
    fn verify_every_copy(&mut self, tokens: &[Token], end: Timestamp, vct: i64) {
        let exceptions = self.world.lock().unwrap().exceptions.clone();
        let keep = chrono::Duration::seconds(vct);
        for replica in &self.replicas {
            for (i, state) in replica.history.iter().enumerate() {
                if !state.ready {
                    continue;
                }
                let until = replica.history.get(i + 1).map_or(end, |next| next.from);
                for token in tokens {
                    if exceptions.contains(&token.kid)
                        || state.from > token.exp
                        || until + keep <= token.iat
                    {
                        continue;
                    }
                    // A 404 leaves a verifier that fetches it without keys
                    // (it matters while the token is valid); a copy is
                    // kept `verifier_cache_ttl`.
                    let known = match state.jwks.get(&token.keyset) {
                        Some(Some(kids)) => kids.contains(&token.kid),
                        _ => until <= token.iat,
                    };
                    if !known {
                        self.failures.push(format!(
                            "a copy served from {} to {until} lacks {token:?}",
                            state.from
                        ));
                    }
                }
            }
        }
    }

    /// An operator's command, through the same reconcile the CLI runs.
    async fn operator(&mut self, keyset: &str, action: Action) {
        let config = self.settings.config(self.now());
        let Some(policy) = config.keyset(keyset).cloned() else {
            return;
        };
        let link = Link {
            world: self.world.clone(),
            mode: Arc::new(AtomicU8::new(UP)),
            crash_in: Arc::new(AtomicI64::new(-1)),
            crash_after: false,
            crashed: Arc::new(AtomicU8::new(0)),
        };
        let reconciler = Reconciler::new(
            Arc::new(link),
            self.keys.clone() as Arc<dyn KeyFactory>,
            Arc::new(self.root.clone()),
        );
        // The CLI reads the keyset's jwks_file: what a replica serves.
        let published = self
            .replicas
            .iter()
            .filter_map(|r| r.served.as_ref())
            .find_map(|served| {
                let served = served.load();
                let body = served.keysets.get(keyset)?.body.clone();
                Some(keyroll::publish::parse_public_keys(&body))
            })
            .unwrap_or_default();
        let published = keyroll::planner::Published {
            keys: published,
            longest_grace: Duration::ZERO,
        };
        let _ = reconciler
            .reconcile_with(&policy, Some(&action), &published)
            .await;
    }

    fn kid_in_state(&self, state: &str, index: usize) -> Option<String> {
        let world = self.world.lock().unwrap();
        let (text, _) = world.docs.get("default")?;
        let doc: serde_json::Value = serde_json::from_str(text).ok()?;
        let kids: Vec<String> = doc["keys"]
            .as_array()?
            .iter()
            .filter(|k| k["state"] == state)
            .filter_map(|k| k["kid"].as_str().map(str::to_string))
            .collect();
        kids.get(index % kids.len().max(1)).cloned()
    }

    /// Whether every live replica has published `keyset`: SPEC C2 keeps
    /// published keys only for "a keyset this process has published".
    fn all_published(&self, keyset: &str) -> bool {
        self.replicas.iter().filter(|r| r.alive()).all(|r| {
            r.served
                .as_ref()
                .is_some_and(|s| s.load().keysets.contains_key(keyset))
        })
    }

    /// Whether a replica is cut off from the store.
    fn partitioned(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.mode.load(Ordering::SeqCst) != UP)
    }

    /// SPEC C5 keeps a cut-off replica ready, serving its last JWKS, until
    /// `max_stale`; it follows the schedule, but cannot learn a key made
    /// (or a `next` key replaced) since it was cut off. So I6 holds through
    /// a partition only for the plan the replica has (README, "What a
    /// partition cannot protect"): an operator action that changes the keys
    /// is not generated during one.
    fn unscheduled_activation(&self, op: &Op) -> bool {
        let adds = |on: bool| !on;
        match op {
            Op::Rotate { .. } | Op::Revoke { .. } | Op::DeleteDocument(_) | Op::SwapStore => true,
            Op::ToggleRs256 => adds(self.settings.rs256),
            Op::ToggleSecond => adds(self.settings.second),
            _ => false,
        }
    }

    async fn run(&mut self, op: &Op) {
        if self.unscheduled_activation(op) {
            if self.partitioned() {
                return;
            }
            self.last_unscheduled = Some(self.now());
        }
        // Nor may a partition start before every replica could learn the
        // key such an action made.
        let settle = chrono::Duration::seconds(self.settings.verifier_cache_ttl + 3 * PROPAGATION);
        let recent = self
            .last_unscheduled
            .is_some_and(|at| self.now() < at + settle);
        if matches!(op, Op::Partition { .. }) && recent {
            return;
        }
        match op {
            Op::Wait(minutes) => self.wait(Duration::from_secs(60 * *minutes as u64)).await,
            Op::Rotate { rs256, now } => {
                let alg = Some(if *rs256 { Alg::RS256 } else { Alg::ES256 });
                self.operator("default", Action::Rotate { alg, force: *now })
                    .await
            }
            Op::Revoke { state, index } => {
                if let Some(kid) = self.kid_in_state(state, *index) {
                    let reason = "model".to_string();
                    self.operator("default", Action::Revoke { kid, reason })
                        .await;
                }
            }
            Op::ToggleRs256 => {
                self.settings.rs256 = !self.settings.rs256;
                self.reconfigure().await;
            }
            Op::ToggleSecond => {
                self.settings.second = !self.settings.second;
                self.removed_ttl = (!self.settings.second).then_some(self.settings.token_ttl);
                self.reconfigure().await;
            }
            Op::RsaBits(bits) => {
                self.settings.rsa_bits = *bits;
                self.reconfigure().await;
            }
            Op::TokenTtl(ttl) => {
                self.settings.token_ttl = *ttl;
                self.reconfigure().await;
            }
            Op::JwksCacheTtl(ttl) => {
                self.settings.jwks_cache_ttl = *ttl;
                self.settings.verifier_cache_ttl = self.settings.verifier_cache_ttl.max(*ttl);
                self.reconfigure().await;
            }
            Op::VerifierCacheTtl(ttl) => {
                self.settings.verifier_cache_ttl = (*ttl).max(self.settings.jwks_cache_ttl);
                self.min_vct = self.min_vct.min(self.settings.verifier_cache_ttl);
                self.reconfigure().await;
            }
            Op::DeleteDocument(which) => {
                let keyset = KEYSETS[*which];
                if self.all_published(keyset) {
                    let mut world = self.world.lock().unwrap();
                    world.docs.remove(keyset);
                    world.changed(Some(keyset));
                }
            }
            Op::SwapStore => {
                if KEYSETS.iter().all(|k| self.all_published(k)) {
                    let mut world = self.world.lock().unwrap();
                    world.docs.clear();
                    world.changed(None);
                }
            }
            Op::Partition { replica, hang } => {
                let mode = if *hang { HANGING } else { FAILING };
                self.replicas[*replica].mode.store(mode, Ordering::SeqCst);
            }
            Op::Heal(replica) => self.replicas[*replica].mode.store(UP, Ordering::SeqCst),
            Op::Crash {
                replica,
                at_call,
                after,
            } => {
                let now = self.now();
                let config = self.settings.config(now);
                let r = &mut self.replicas[*replica];
                r.crash(now);
                r.crash_in.store(*at_call, Ordering::SeqCst);
                r.start(config, &self.world, &self.keys, &self.root, *after)
                    .await;
            }
            Op::ClockOffset { replica, seconds } => {
                let now = self.now();
                let config = self.settings.config(now);
                let r = &mut self.replicas[*replica];
                r.offset = chrono::Duration::seconds(*seconds);
                r.crash(now);
                r.start(config, &self.world, &self.keys, &self.root, false)
                    .await;
            }
            Op::DownForWeeks(weeks) => {
                let now = self.now();
                for replica in &mut self.replicas {
                    replica.crash(now);
                }
                tokio::time::sleep(Duration::from_secs(7 * 86400 * *weeks as u64)).await;
                self.tokens.retain(|token| token.exp >= self.root.now());
                self.start_all().await;
            }
        }
    }
}

fn run_case(ops: &[Op], settings: Settings, watched: bool) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let root = TokioClock::starting_at(t0());
        let mut sim = Sim {
            world: Arc::new(Mutex::new(World {
                watched,
                ..World::default()
            })),
            keys: Arc::new(FakeKeys::new()),
            root,
            settings,
            replicas: (0..REPLICAS).map(|_| Replica::new()).collect(),
            tokens: Vec::new(),
            verifiers: [Kind::MaxAge, Kind::FixedTtl, Kind::RefetchOnUnknown]
                .into_iter()
                .map(|kind| Verifier {
                    kind,
                    cache: HashMap::new(),
                    last_fetch: HashMap::new(),
                    next_replica: 0,
                })
                .collect(),
            samples: 0,
            failures: Vec::new(),
            min_vct: 0,
            last_unscheduled: None,
            removed_ttl: None,
        };
        sim.min_vct = sim.settings.verifier_cache_ttl;
        sim.start_all().await;
        let mut issued: Vec<Token> = Vec::new();
        for op in ops {
            sim.run(op).await;
            // Heal and settle a little after each step, so partitions and
            // crashes interleave with normal running.
            sim.wait(SAMPLE * 2).await;
            issued.extend(sim.tokens.iter().cloned());
        }
        for replica in &mut sim.replicas {
            replica.mode.store(UP, Ordering::SeqCst);
        }
        // Long enough for every token issued to expire.
        sim.wait(Duration::from_secs(1800)).await;
        issued.extend(sim.tokens.iter().cloned());
        issued.sort_by(|a, b| (&a.kid, a.iat).cmp(&(&b.kid, b.iat)));
        issued.dedup_by(|a, b| a.kid == b.kid && a.iat == b.iat);
        let end = sim.now();
        let vct = sim.min_vct;
        sim.verify_every_copy(&issued, end, vct);
        if !sim.failures.is_empty() && std::env::var_os("KEYROLL_E2E_TRACE").is_some() {
            for (i, replica) in sim.replicas.iter().enumerate() {
                for state in &replica.history {
                    eprintln!(
                        "replica {i} from {} ready {} jwks {:?} offered {:?}",
                        state.from, state.ready, state.jwks, state.offered
                    );
                }
            }
        }
        for replica in &mut sim.replicas {
            replica.crash(end);
        }
        sim.failures
    })
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        prop::sample::select(vec![120i64, 300, 900]),
        prop::sample::select(vec![30i64, 60, 120]),
        prop::sample::select(vec![120i64, 600, 1800]),
        any::<bool>(),
    )
        .prop_map(|(token_ttl, jwks_cache_ttl, vct, rs256)| Settings {
            token_ttl,
            jwks_cache_ttl,
            verifier_cache_ttl: vct.max(jwks_cache_ttl),
            rs256,
            second: true,
            rsa_bits: 2048,
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_token_verifies_at_every_verifier_until_it_expires(
        settings in settings(),
        ops in prop::collection::vec(op(), 8..=24),
        watched in any::<bool>(),
    ) {
        let failures = run_case(&ops, settings, watched);
        prop_assert!(
            failures.is_empty(),
            "{} I6 violations, first: {:#?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
}
