//! `keyroll run`: reconcile every keyset, publish, sleep until the next
//! scheduled instant (or `reconcile_interval`, whichever is first), repeat.
//!
//! The loop is split into [`Daemon::start`], [`Daemon::pass`],
//! [`Daemon::sleep`] and [`Daemon::stop`], so a test can drive one or many
//! daemons in-process under tokio's paused clock; [`run`] strings them
//! together with signals and sd_notify for the binary.
//!
//! What a pass guarantees beyond "load, plan, save, publish" (SPEC C1–C6):
//! a keyset removed from the config keeps its JWKS until its last key's
//! `remove_at` but offers no signing key; a replica that cannot load the
//! store follows the plan of the last document it loaded, switching its
//! outputs on time without waiting for a hung store call, and fails closed
//! after `max_stale`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::{rfc3339, Clock, Timestamp};
use crate::config::{Config, ConfigError, KeysetPolicy};
use crate::document::{AuditEvent, AuditRecord, KeyState, KeysetDoc, Trigger};
use crate::key::{KeyFactory, PublicJwk};
use crate::metrics::Metrics;
use crate::planner::SlotOutlook;
use crate::publish::{self, Served, ServedState};
use crate::reconcile::{Outcome, ReconcileError, Reconciler, Snapshot};
use crate::store::watch::{Change, StoreWatch};
use crate::store::{self, Store, StoreError};

/// The longest wait between retries of a failing keyset.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The longest one keyset's store calls may take in a pass when no
/// scheduled switch comes sooner; the store's own budget (15 s on AWS) is
/// normally shorter. Bounds a store that hangs without ever failing.
const HUNG_STORE: Duration = Duration::from_secs(60);
/// How long in-flight HTTP requests get once shutdown starts. With the
/// runtime's one-second grace for blocking work (cli.rs), SIGTERM to exit
/// stays well inside SPEC §5's 5 s.
const HTTP_DRAIN: Duration = Duration::from_secs(2);
/// While the store is watched, a timer pass reads only the keysets that are
/// due (a scheduled instant, a retry, a store change) and takes the watch's
/// word that the others did not change. Each document is still read at
/// least this often, and every half `max_stale` if that is sooner: a store
/// that stops answering without a watch event (a failing disk) is noticed,
/// and a healthy one never goes `max_stale` without a load (C5).
const WATCHED_REREAD: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] store::OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Signer(#[from] crate::signer::SignerError),
}

/// Everything the daemon needs from outside, so tests can hand in their own.
pub struct Setup {
    pub config: Config,
    /// Reads the config again on SIGHUP.
    pub reload: Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>,
    pub keys: Arc<dyn KeyFactory>,
    pub clock: Arc<dyn Clock>,
    /// The store to use instead of the one the config names (tests).
    pub store: Option<Arc<dyn Store>>,
    /// Public keys known to have been published, per keyset, besides what
    /// `jwks_file` holds (SPEC C2); tests stand it in for a `jwks_file`.
    pub published: HashMap<String, Vec<PublicJwk>>,
}

/// Why [`Daemon::sleep`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// The next scheduled instant, a retry, or `reconcile_interval`.
    Timer,
    StoreChanged,
}

/// What this process knows of one keyset between passes.
struct KeysetRun {
    policy: KeysetPolicy,
    /// SPEC C1: no longer in the config; served until its last `remove_at`.
    removed: bool,
    /// The last document the store gave or accepted.
    last_good: Option<Snapshot>,
    /// When the store last answered a load of this keyset.
    last_load: Option<Timestamp>,
    /// The public keys this process served (or found in `jwks_file` at
    /// start): kept published should the document go missing (C2).
    published: crate::planner::Published,
    failures: u32,
    /// An output file (`signing_dir`, `jwks_file`, `discovery_file`) could
    /// not be written at the last publish: tried again at every pass.
    output_failed: bool,
    outlook: Vec<SlotOutlook>,
    /// When to look again: the next transition, or a retry.
    wake_at: Option<Timestamp>,
    /// The next instant this keyset's outputs change by its plan: a store
    /// call never runs past it (C5).
    next_switch: Option<Timestamp>,
    failed_closed: bool,
}

impl KeysetRun {
    fn new(policy: KeysetPolicy) -> Self {
        let published = publish::published_in_jwks_file(&policy);
        KeysetRun {
            policy,
            removed: false,
            last_good: None,
            last_load: None,
            published,
            failures: 0,
            output_failed: false,
            outlook: Vec::new(),
            wake_at: None,
            next_switch: None,
            failed_closed: false,
        }
    }

    fn name(&self) -> &str {
        &self.policy.name
    }

    /// When this replica fails closed without a successful load (C5).
    fn stale_at(&self) -> Option<Timestamp> {
        self.last_load.map(|at| after(at, self.policy.max_stale))
    }

    /// Whether a pass that is not a full one must read this keyset: its
    /// plan or a retry wants it, an output write failed, it was never
    /// loaded, or it has gone unread for too long (see [`WATCHED_REREAD`]).
    /// An output changed by hand is put right when the keyset is next
    /// read.
    fn due(&self, now: Timestamp) -> bool {
        let reread = WATCHED_REREAD.min(self.policy.max_stale / 2);
        [self.wake_at, self.next_switch]
            .into_iter()
            .flatten()
            .any(|at| at <= now)
            || self.output_failed
            || self.last_good.is_none()
            || self.last_load.is_none_or(|at| after(at, reread) <= now)
    }
}

/// Whether signers get keys, and if not, why.
enum Offer {
    Keys,
    Withheld(String),
}

pub struct Daemon {
    config: Config,
    reconciler: Reconciler,
    keys: Arc<dyn KeyFactory>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    served: ServedState,
    reload: Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>,
    /// Published keys handed in at start (see [`Setup::published`]).
    published_before: HashMap<String, Vec<PublicJwk>>,
    /// Every keyset this process serves, configured or being retired.
    keysets: BTreeMap<String, KeysetRun>,
    /// How other writers' changes are noticed (see [`Daemon::sleep`]).
    watch: StoreWatch,
    /// The keysets a store change named: the next pass reconciles them and
    /// the keysets that are due ([`KeysetRun::due`]), no others. `None`:
    /// every keyset.
    changed: Option<BTreeSet<String>>,
    /// The earliest wake-up the last pass asked for.
    wake: Instant,
    ready_sent: bool,
    /// Whether the store was searched for retiring keysets (once a start).
    adopted_unconfigured: bool,
    /// Milliseconds since `epoch` at which the running pass started; 0
    /// between passes. Read by the watchdog.
    busy_since: Arc<AtomicU64>,
    epoch: StdInstant,
    stop_http: watch::Sender<bool>,
    http: Option<tokio::task::JoinHandle<()>>,
    /// The signer's socket servers (`[signer]`), stopped with HTTP.
    signers: Vec<tokio::task::JoinHandle<()>>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    /// OpenID discovery (routes, `discovery_file`) and S3 copies.
    extra: publish::ExtraOutputs,
}

/// Runs the daemon until `shutdown` completes. SIGHUP reloads the config
/// even in the middle of a pass: a store call that hangs must not delay a
/// config change (a keyset removed stops signing within `propagation`, C1).
/// The interrupted pass is dropped like a crash, which every step survives.
pub async fn run(setup: Setup, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let mut daemon = Daemon::start(setup).await?;
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DaemonError::Signals)?;
    tokio::pin!(shutdown);
    let mut started = false;
    loop {
        let reload = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = hangups.recv() => true,
            _ = daemon.pass() => false,
        };
        if reload {
            daemon.reload().await;
            continue;
        }
        daemon.notify_progress();
        if !started {
            started = true;
            let dropped = crate::footprint::release_startup_pages();
            tracing::debug!(bytes = dropped, "start-up code unmapped");
        }
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = hangups.recv() => daemon.reload().await,
            _ = daemon.sleep() => {}
        }
    }
    daemon.stop().await;
    Ok(())
}

fn notify(states: &[sd_notify::NotifyState]) {
    // Without NOTIFY_SOCKET this does nothing; a failure to reach systemd is
    // not a reason to stop serving keys.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

impl Daemon {
    /// Opens the store, binds HTTP, starts the watchdog. Nothing is
    /// reconciled yet: that is the first [`Daemon::pass`].
    pub async fn start(setup: Setup) -> Result<Daemon, DaemonError> {
        let store = match setup.store {
            Some(store) => store,
            None => store::open(&setup.config.store).await?,
        };
        let (stop_http, http_stopped) = watch::channel(false);
        let mut daemon = Daemon {
            watch: StoreWatch::new(store.clone()),
            changed: None,
            reconciler: Reconciler::new(store, setup.keys.clone(), setup.clock.clone()),
            keysets: BTreeMap::new(),
            config: setup.config,
            keys: setup.keys,
            clock: setup.clock,
            metrics: Arc::new(Metrics::new()),
            served: Arc::new(ArcSwap::from_pointee(Served::default())),
            reload: setup.reload,
            published_before: setup.published,
            wake: Instant::now(),
            ready_sent: false,
            adopted_unconfigured: false,
            busy_since: Arc::new(AtomicU64::new(0)),
            epoch: StdInstant::now(),
            stop_http,
            http: None,
            signers: Vec::new(),
            watchdog: None,
            extra: publish::ExtraOutputs::default(),
        };
        daemon.apply_config();
        for config_warning in &daemon.config.warnings {
            tracing::warn!("{config_warning}");
        }
        daemon.signers = crate::signer::start(
            &daemon.config,
            daemon.served.clone(),
            daemon.metrics.clone(),
            daemon.clock.clone(),
            daemon.stop_http.subscribe(),
        )
        .await?;
        daemon.http = daemon.start_http(http_stopped).await?;
        daemon.watchdog = daemon.start_watchdog();
        tracing::info!(
            config = %daemon.config.source,
            store = %daemon.reconciler.store().location("<keyset>"),
            listen = ?daemon.config.http_listen,
            keysets = daemon.config.keysets.len(),
            "keyroll started"
        );
        Ok(daemon)
    }

    /// What HTTP serves; tests read it directly.
    pub fn served(&self) -> ServedState {
        self.served.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Sleeps until the next scheduled instant, a retry, `reconcile_interval`
    /// or a change of a stored document. Callers race it (and the pass)
    /// with shutdown and config reloads.
    pub async fn sleep(&mut self) -> Wakeup {
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(self.wake) => {
                // A watched store reports every change: the timer brings
                // only what is due. Otherwise it is the store's poll.
                self.changed = self.watch.is_watching().then(BTreeSet::new);
                Wakeup::Timer
            }
            change = self.watch.changed() => {
                tracing::debug!(?change, "stored document changed; reconciling now");
                self.changed = match change {
                    Change::Keysets(keysets) => Some(keysets),
                    Change::Unknown => None,
                };
                Wakeup::StoreChanged
            }
        }
    }

    /// Stops HTTP (draining in-flight requests briefly) and the watchdog.
    pub async fn stop(self) {
        tracing::info!("shutting down");
        notify(&[sd_notify::NotifyState::Stopping]);
        let _ = self.stop_http.send(true);
        if let Some(http) = self.http {
            if tokio::time::timeout(HTTP_DRAIN, http).await.is_err() {
                tracing::warn!("HTTP connections still open at shutdown were dropped");
            }
        }
        // In-flight sign requests get the same drain as HTTP.
        for signer in self.signers {
            let _ = tokio::time::timeout(HTTP_DRAIN, signer).await;
        }
        if let Some(watchdog) = self.watchdog {
            watchdog.abort();
        }
    }

    async fn start_http(
        &self,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, DaemonError> {
        let Some(addr) = self.config.http_listen else {
            return Ok(None);
        };
        let metrics_listen = self.config.http_metrics_listen;
        let public = publish::http::Endpoints::Public {
            metrics: metrics_listen.is_none(),
        };
        let mut listeners = vec![(addr, public)];
        listeners.extend(metrics_listen.map(|addr| (addr, publish::http::Endpoints::Metrics)));
        let site = publish::http::Site {
            served: self.served.clone(),
            metrics: self.metrics.clone(),
            per_client: self.config.http_max_connections_per_client,
        };
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let drained = publish::http::start(listeners, site, shutdown)
            .await
            .map_err(|e| DaemonError::Listen {
                addr: e.addr,
                source: e.source,
            })?;
        Ok(Some(tokio::spawn(drained)))
    }

    /// Pings WATCHDOG=1 at half of `WatchdogSec`, unless the running pass
    /// has taken longer than the whole watchdog period: then systemd should
    /// restart us. Every keyset's store calls in a pass run side by side and
    /// end at their deadline, so a slow store alone does not trip it.
    fn start_watchdog(&self) -> Option<tokio::task::JoinHandle<()>> {
        let mut usec = 0;
        if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
            return None;
        }
        let period = Duration::from_micros(usec);
        let (busy_since, epoch) = (self.busy_since.clone(), self.epoch);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tick.tick().await;
                let started = busy_since.load(Ordering::Relaxed);
                let now = epoch.elapsed().as_millis() as u64;
                if started == 0 || now.saturating_sub(started) < period.as_millis() as u64 {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!("a reconcile pass is stuck; withholding the watchdog ping");
                }
            }
        }))
    }

    /// Brings the keyset table in line with the config: new keysets join,
    /// changed ones take their new policy, removed ones start retiring (C1).
    fn apply_config(&mut self) {
        for policy in &self.config.keysets {
            self.metrics.register_keyset(&policy.name);
            match self.keysets.get_mut(&policy.name) {
                Some(run) => {
                    if run.removed {
                        tracing::info!(keyset = %policy.name, "keyset back in the config: resuming it with new keys, pre-published");
                    }
                    run.policy = policy.clone();
                    run.removed = false;
                }
                None => {
                    let mut run = KeysetRun::new(policy.clone());
                    if run.published.keys.is_empty() {
                        run.published.keys = self
                            .published_before
                            .get(&policy.name)
                            .cloned()
                            .unwrap_or_default();
                    }
                    self.keysets.insert(policy.name.clone(), run);
                }
            }
        }
        for run in self.keysets.values_mut() {
            if !run.removed && self.config.keyset(run.name()).is_none() {
                tracing::warn!(
                    keyset = %run.name(),
                    "keyset removed from the config: its keys retire now and its JWKS stays published until the last remove_at; signers get no key"
                );
                run.policy = run.policy.retiring();
                run.removed = true;
            }
        }
        let expected: Vec<String> = self.config.keysets.iter().map(|k| k.name.clone()).collect();
        let default_keyset = self.config.default_keyset().map(|k| k.name.clone());
        self.served.rcu(|current| {
            let mut next = Served::clone(current);
            next.default_keyset = default_keyset.clone();
            next.expected = expected.clone();
            // A keyset no longer configured signs nothing (404).
            next.signing.retain(|name, _| expected.contains(name));
            next
        });
    }

    /// Reloads the config (SIGHUP). An invalid config is logged and the
    /// running one kept.
    pub async fn reload(&mut self) {
        let config = match (self.reload)() {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; keeping the running config");
                return;
            }
        };
        self.reconfigure(config).await;
    }

    /// Takes a new config: tests call this directly.
    pub async fn reconfigure(&mut self, config: Config) {
        if config.store != self.config.store {
            match store::open(&config.store).await {
                Ok(store) => self.replace_store(store),
                Err(e) => {
                    tracing::error!(error = %e, "config reload failed; keeping the running config");
                    return;
                }
            }
        }
        if crate::signer::needs_restart(&self.config, &config) {
            tracing::warn!("[signer] sockets changed: restart keyroll to apply them");
        }
        let http = |c: &Config| {
            let per_client = c.http_max_connections_per_client;
            (c.http_listen, c.http_metrics_listen, per_client)
        };
        if http(&config) != http(&self.config) {
            tracing::warn!(
                running = ?self.config.http_listen,
                configured = ?config.http_listen,
                "[http] changed: restart keyroll to apply it"
            );
        }
        for config_warning in &config.warnings {
            tracing::warn!("{config_warning}");
        }
        self.config = config;
        for run in self.keysets.values_mut() {
            run.failures = 0;
        }
        self.apply_config();
        self.wake = Instant::now();
        self.changed = None;
        tracing::info!(config = %self.config.source, "config reloaded");
    }

    /// Swaps in another store (tests: "the store swapped").
    pub fn replace_store(&mut self, store: Arc<dyn Store>) {
        self.watch = StoreWatch::new(store.clone());
        self.changed = None;
        self.reconciler = Reconciler::new(store, self.keys.clone(), self.clock.clone());
    }

    /// Reconciles and publishes every keyset, or (the store watched, or
    /// after a store change) the keysets named and those due, and sets when
    /// to run again.
    pub async fn pass(&mut self) {
        let mut changed = self.changed.take();
        let now = self.clock.now();
        // Before the loads, so that a write landing during the pass is not
        // missed; our own writes then cost one extra (idle) pass.
        let in_pass = self.in_pass(changed.as_ref(), now);
        if self.watch.before_pass(&in_pass, changed.is_none()).await {
            changed = None; // the watch lost track of the store
        }
        let started = self.epoch.elapsed().as_millis().max(1) as u64;
        self.busy_since.store(started, Ordering::Relaxed);
        if !self.adopted_unconfigured {
            self.adopted_unconfigured = self.adopt_unconfigured().await;
        }
        // Keysets adopted just now are reconciled in this pass too.
        let now = self.clock.now();
        let names = self.in_pass(changed.as_ref(), now);
        // A scheduled switch never waits for the store: outputs follow the
        // last loaded plan first, then the store is asked (C5). A keyset
        // left out of the pass has no switch due.
        for name in &names {
            self.follow_plan(name, now).await;
        }
        let results = self.reconcile_all(&names, now).await;
        for (name, result) in names.iter().zip(results) {
            self.settle(name, result).await;
        }
        if changed.is_some() && self.watch.is_watching() {
            self.vouch_unread(&names, now);
            self.rewrite_unread_outputs(&names, now).await;
        }
        self.keysets.retain(|_, run| {
            let done = run.removed
                && run
                    .last_good
                    .as_ref()
                    .is_some_and(|s| s.doc.keys.is_empty() && s.doc.orphans.is_empty());
            !done
        });
        self.forget_retired_routes();
        self.busy_since.store(0, Ordering::Relaxed);
        self.wake = self.next_wake();
    }

    /// Output files are checked at every pass, read or not, as a full pass
    /// does: a `signing_dir` or `jwks_file` deleted or broken under the
    /// daemon is written again (or its failure reported) within
    /// `reconcile_interval`. From the last loaded document: a keyset not
    /// read has no switch due.
    async fn rewrite_unread_outputs(&mut self, read: &[String], now: Timestamp) {
        let with_files: Vec<(KeysetPolicy, Snapshot, Offer)> = self
            .keysets
            .iter()
            .filter(|(name, run)| {
                let policy = &run.policy;
                let files = policy.signing_dir.is_some()
                    || policy.jwks_file.is_some()
                    || policy.discovery.as_ref().is_some_and(|d| d.file.is_some());
                files && !read.contains(name)
            })
            .filter_map(|(_, run)| {
                let snapshot = run.last_good.clone()?;
                Some((run.policy.clone(), snapshot, self.offer(run, now)))
            })
            .collect();
        for (policy, snapshot, offer) in with_files {
            self.publish(&policy, &snapshot, offer).await;
        }
    }

    /// The keysets a pass reconciles: every one (`changed` is `None`), or
    /// those a store change named and those due.
    fn in_pass(&self, changed: Option<&BTreeSet<String>>, now: Timestamp) -> Vec<String> {
        self.keysets
            .iter()
            .filter(|(name, run)| changed.is_none_or(|only| only.contains(*name) || run.due(now)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The store is watched and reported no change of the documents of the
    /// keysets this pass did not read: the plan each was last reconciled
    /// with still holds (none is due), so each counts as reconciled now in
    /// `keyroll_last_reconcile_success_timestamp_seconds`, which an alert
    /// watches, and in the signer's FetchKeys `data_timestamp`. `max_stale`
    /// still counts from the last load (C5). A keyset whose last reconcile
    /// failed is due, and never vouched for.
    fn vouch_unread(&self, read: &[String], now: Timestamp) {
        let read: BTreeSet<&str> = read.iter().map(String::as_str).collect();
        let vouched = self.keysets.iter().filter(|(name, run)| {
            !read.contains(name.as_str()) && run.failures == 0 && run.last_good.is_some()
        });
        let served = self.served.load();
        for (name, _) in vouched {
            self.metrics.reconciled(name, now);
            if let Some(keyring) = served.signing.get(name) {
                keyring.confirmed(now);
            }
        }
    }

    /// SPEC C1 across restarts: a keyset in the store that the config does
    /// not name was removed from the config, whether by a SIGHUP an earlier
    /// process saw or by an edit and a restart. It retires like any removed
    /// keyset and keeps its JWKS until its last `remove_at`. A store (a
    /// folder, a secret prefix) therefore belongs to one deployment.
    /// Returns whether the store could be searched.
    async fn adopt_unconfigured(&mut self) -> bool {
        let Some(template) = self.config.keysets.first().cloned() else {
            return true;
        };
        let names = match self.reconciler.store().keysets().await {
            Ok(names) => names,
            Err(e @ StoreError::Rejected { .. }) => {
                tracing::warn!(error = %e, "cannot list the store: keysets removed from the config before this start are not served");
                return true;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the store yet; will try again");
                return false;
            }
        };
        for name in names {
            if self.keysets.contains_key(&name) {
                continue;
            }
            let Ok(snapshot) = self.reconciler.load(&name).await else {
                continue;
            };
            let doc = &snapshot.doc;
            if doc.keys.is_empty() && doc.orphans.is_empty() {
                continue;
            }
            tracing::warn!(
                keyset = %name,
                document = %self.reconciler.store().location(&name),
                "keyset in the store but not in the config: retiring its keys, serving its JWKS until the last remove_at; signers get no key"
            );
            // Its outputs other than the HTTP route are unknown now.
            let policy = KeysetPolicy {
                name: name.clone(),
                jwks_file: None,
                signing_dir: None,
                discovery: None,
                s3_jwks: None,
                ..template.retiring()
            };
            let mut run = KeysetRun::new(policy);
            run.removed = true;
            self.keysets.insert(name, run);
        }
        true
    }

    /// Every keyset's reconcile, side by side, each ending at its deadline:
    /// the next instant its outputs must change without the store.
    async fn reconcile_all(
        &self,
        names: &[String],
        now: Timestamp,
    ) -> Vec<Result<Outcome, ReconcileError>> {
        let runs = names.iter().filter_map(|name| self.keysets.get(name));
        let calls = runs.map(|run| {
            let deadline = [run.next_switch, run.stale_at()]
                .into_iter()
                .flatten()
                .filter(|at| *at > now)
                .map(|at| until(now, at))
                .fold(HUNG_STORE, Duration::min);
            let location = self.reconciler.store().location(run.name());
            async move {
                match tokio::time::timeout(
                    deadline,
                    self.reconciler
                        .reconcile_with(&run.policy, None, &run.published),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(ReconcileError::Store(StoreError::Unavailable {
                        location,
                        message: format!(
                            "no answer within {}; following the last loaded plan",
                            humantime::format_duration(deadline)
                        ),
                    })),
                }
            }
        });
        futures_util::future::join_all(calls).await
    }

    /// Publishes what the last loaded document's plan says for `now`, if
    /// that differs from what is published (a scheduled switch, a removal).
    async fn follow_plan(&mut self, name: &str, now: Timestamp) {
        let Some(run) = self.keysets.get(name) else {
            return;
        };
        let Some(last_good) = &run.last_good else {
            return;
        };
        let loaded_at = run.last_load.unwrap_or(now);
        let projected = Reconciler::project(last_good, &run.policy, loaded_at, now);
        if same_states(&projected.doc, &last_good.doc) {
            return;
        }
        let offer = self.offer(run, now);
        let policy = run.policy.clone();
        self.publish(&policy, &projected, offer).await;
    }

    /// Takes one keyset's reconcile result: publishes the saved document,
    /// or (the store failing) the last loaded plan, failing closed after
    /// `max_stale`.
    async fn settle(&mut self, name: &str, result: Result<Outcome, ReconcileError>) {
        let now = self.clock.now();
        let Some(run) = self.keysets.get_mut(name) else {
            return;
        };
        let policy = run.policy.clone();
        let pending = self.reconciler.store().destruction_pending(name);
        self.metrics.set_destruction_pending(name, pending.len());
        let snapshot = match result {
            Ok(outcome) => {
                run.failures = 0;
                run.last_load = Some(now);
                run.failed_closed = false;
                self.metrics.set_failed_closed(name, false);
                run.outlook = outcome.plan.outlook.clone();
                run.wake_at = outcome.plan.wake_at;
                run.next_switch = outcome.plan.wake_at;
                run.last_good = Some(outcome.snapshot.clone());
                self.after_commit(&policy, &outcome);
                self.metrics
                    .observe_keyset(&outcome.snapshot.doc, &outcome.plan.outlook, now);
                // SPEC C2 and C6: what an operator must act on, as metrics.
                self.metrics
                    .set_document_missing(name, outcome.snapshot.doc.lost.is_some());
                let offset = outcome
                    .plan
                    .clock_behind
                    .map_or(0.0, |ahead| ahead.num_milliseconds() as f64 / 1000.0);
                self.metrics.set_clock_offset(name, offset);
                outcome.snapshot
            }
            Err(error) => {
                let retry_in = self.failed(name, &error);
                let Some(run) = self.keysets.get_mut(name) else {
                    return;
                };
                let Some(last_good) = &run.last_good else {
                    run.wake_at = Some(after(now, retry_in));
                    return;
                };
                let loaded_at = run.last_load.unwrap_or(now);
                let projected = Reconciler::project(last_good, &policy, loaded_at, now);
                let plan_wake = crate::planner::plan(now, &projected.doc, &policy, None)
                    .ok()
                    .and_then(|plan| plan.wake_at);
                let stale_at = run.stale_at();
                run.next_switch = plan_wake;
                run.failed_closed = stale_at.is_some_and(|at| now >= at);
                self.metrics.set_failed_closed(name, run.failed_closed);
                run.wake_at = [plan_wake, stale_at.filter(|at| *at > now)]
                    .into_iter()
                    .flatten()
                    .chain(std::iter::once(after(now, retry_in)))
                    .min();
                if run.failed_closed {
                    tracing::error!(
                        keyset = %name,
                        last_load = ?run.last_load.map(rfc3339),
                        max_stale = %humantime::format_duration(policy.max_stale),
                        "no successful store load within max_stale: failing closed (no signing key offered, /readyz 503, last JWKS still served)"
                    );
                }
                projected
            }
        };
        let Some(run) = self.keysets.get(name) else {
            return;
        };
        let offer = self.offer(run, now);
        self.publish(&policy, &snapshot, offer).await;
    }

    /// Whether signers may have this keyset's active keys now.
    fn offer(&self, run: &KeysetRun, now: Timestamp) -> Offer {
        if run.removed {
            return Offer::Withheld(
                "keyset removed from the config (its keys are retiring)".into(),
            );
        }
        if run.stale_at().is_some_and(|at| now >= at) {
            return Offer::Withheld(format!(
                "no successful store load since {} (max_stale {})",
                run.last_load.map(rfc3339).unwrap_or_default(),
                humantime::format_duration(run.policy.max_stale)
            ));
        }
        Offer::Keys
    }

    fn after_commit(&self, policy: &KeysetPolicy, outcome: &Outcome) {
        if outcome.conflicts > 0 {
            self.metrics
                .store_conflicts(&policy.name, outcome.conflicts);
        }
        let location = self.reconciler.store().location(&policy.name);
        for record in &outcome.committed {
            log_transition(&policy.name, record);
            if record.trigger == Trigger::DocumentLost && record.event == AuditEvent::Retired {
                tracing::error!(
                    keyset = %policy.name,
                    document = %location,
                    kid = %record.kid,
                    "stored document missing although this keyset was published: its published key stays in the JWKS until remove_at; new keys wait for publish_lead"
                );
            }
            let counts_as_rotation = record.event == AuditEvent::Activated
                && matches!(
                    record.trigger,
                    Trigger::Schedule | Trigger::Manual | Trigger::Forced | Trigger::Revoke
                );
            if counts_as_rotation {
                self.metrics
                    .rotation(&policy.name, record.alg, record.trigger);
            }
        }
        for warning in &outcome.plan.warnings {
            tracing::warn!(keyset = %policy.name, "{warning}");
        }
        if let Some(ahead) = outcome.plan.clock_behind {
            tracing::warn!(
                keyset = %policy.name,
                offset_seconds = ahead.num_milliseconds() as f64 / 1000.0,
                "clock behind the stored document: removals held back"
            );
        }
    }

    /// Records a failure and says when to retry: exponential backoff from
    /// one second, capped by the reconcile interval.
    fn failed(&mut self, name: &str, error: &ReconcileError) -> Duration {
        let interval = self.config.reconcile_interval;
        let serving = self.served.load().keysets.contains_key(name);
        let Some(run) = self.keysets.get_mut(name) else {
            return interval;
        };
        run.failures += 1;
        let backoff = Duration::from_secs(1u64 << (run.failures - 1).min(9))
            .min(interval)
            .min(MAX_BACKOFF);
        self.metrics.reconcile_error(name);
        match error {
            ReconcileError::Store(StoreError::Unavailable { .. })
            | ReconcileError::Contention { .. } => {
                tracing::warn!(
                    keyset = %name, error = %error, retry_in = ?backoff, serving_last_jwks = serving,
                    "store unreachable: following the last loaded plan, creating no key"
                );
            }
            _ => {
                tracing::error!(
                    keyset = %name, error = %error, retry_in = ?backoff, serving_last_jwks = serving,
                    "keyset not reconciled; fix the cause (nothing is overwritten)"
                );
            }
        }
        backoff
    }

    /// Writes the outputs of one keyset: `signing_dir` first (or emptied,
    /// when keys are withheld), then `jwks_file`, then HTTP.
    async fn publish(&mut self, policy: &KeysetPolicy, snapshot: &Snapshot, offer: Offer) {
        let max_age = policy.timings.jwks_cache_ttl.as_secs();
        let jwks = Arc::new(publish::render(
            &snapshot.doc,
            &snapshot.jwks,
            policy.x5c,
            max_age,
        ));
        let offered_doc = match &offer {
            Offer::Keys => snapshot.doc.clone(),
            Offer::Withheld(_) => without_active_keys(&snapshot.doc),
        };
        let offered: Vec<(crate::key::Alg, String)> = offered_doc
            .keys
            .iter()
            .filter(|key| key.state == KeyState::Active)
            .map(|key| (key.alg, key.kid.clone()))
            .collect();
        let (policy_owned, body) = (policy.clone(), jwks.body.clone());
        let write_files = move || {
            let signing_dir = policy_owned
                .signing_dir
                .as_ref()
                .map(|dir| publish::write_signing_dir(dir, &offered_doc));
            let jwks_file = policy_owned
                .jwks_file
                .as_ref()
                .map(|path| publish::write_jwks_file(path, &body));
            (signing_dir, jwks_file)
        };
        // File writes block; without file outputs nothing needs a thread.
        let (signing_dir, jwks_file) = if policy.signing_dir.is_none() && policy.jwks_file.is_none()
        {
            (None, None)
        } else {
            tokio::task::spawn_blocking(write_files)
                .await
                .unwrap_or((None, None))
        };
        let mut output_failed = false;
        for (output, result) in [("signing_dir", signing_dir), ("jwks_file", jwks_file)] {
            match result {
                Some(Err(error)) => {
                    output_failed = true;
                    self.metrics.publish_error(&policy.name, output);
                    self.metrics.reconcile_error(&policy.name);
                    tracing::error!(keyset = %policy.name, output, %error, "cannot publish; HTTP keeps serving the current JWKS");
                }
                Some(Ok(true)) => tracing::info!(keyset = %policy.name, output, "updated"),
                _ => {}
            }
        }
        let removed = self.keysets.get(&policy.name).is_some_and(|r| r.removed);
        let keyring = self.keyring(policy, snapshot, &offer, removed);
        if !removed {
            // Discovery routes and discovery_file before /readyz turns 200;
            // S3 uploads are handed to a background task.
            let written = self
                .extra
                .publish(&self.config, policy, &jwks, &self.served, &self.metrics)
                .await;
            output_failed |= !written;
        }
        if let Some(run) = self.keysets.get_mut(&policy.name) {
            run.published = crate::planner::Published {
                keys: published_keys(snapshot, policy.x5c),
                longest_grace: longest_grace(snapshot),
            };
            run.output_failed = output_failed;
        }
        // HTTP last: once /readyz answers 200, a sidecar's application finds
        // its signing_dir written.
        let failed_closed = match &offer {
            Offer::Withheld(why) if !removed => Some(why.clone()),
            _ => None,
        };
        let name = policy.name.clone();
        // Requests read the snapshot; swap it only when this keyset's part
        // of it changed (a steady pass changes nothing).
        let current = self.served.load();
        let unchanged = current
            .keysets
            .get(&name)
            .is_some_and(|c| c.body == jwks.body && c.max_age_seconds == max_age)
            && current.failed_closed.get(&name) == failed_closed.as_ref()
            && current.offered.get(&name) == Some(&offered)
            && match (current.signing.get(&name), &keyring) {
                (Some(before), Some(now)) => Arc::ptr_eq(before, now),
                (before, now) => before.is_none() && now.is_none(),
            };
        drop(current);
        if unchanged {
            return;
        }
        self.served.rcu(|current| {
            let mut keysets = current.keysets.clone();
            let changed = keysets
                .get(&name)
                .is_none_or(|c| c.body != jwks.body || c.max_age_seconds != max_age);
            if changed {
                keysets.insert(name.clone(), jwks.clone());
            }
            let mut closed = current.failed_closed.clone();
            match &failed_closed {
                Some(why) => closed.insert(name.clone(), why.clone()),
                None => closed.remove(&name),
            };
            let mut offers = current.offered.clone();
            offers.insert(name.clone(), offered.clone());
            let mut signing = current.signing.clone();
            match &keyring {
                Some(keyring) => signing.insert(name.clone(), keyring.clone()),
                None => signing.remove(&name),
            };
            Served {
                keysets,
                failed_closed: closed,
                offered: offers,
                signing,
                ..Served::clone(current)
            }
        });
        tracing::debug!(keyset = %policy.name, etag = %jwks.etag, "published");
    }

    /// The signer's keys for this publish, from the same snapshot as the
    /// JWKS and parsed only when they changed. A keyset being retired (C1)
    /// has none (404); a replica that failed closed (C5) says why (503).
    fn keyring(
        &self,
        policy: &KeysetPolicy,
        snapshot: &Snapshot,
        offer: &Offer,
        removed: bool,
    ) -> Option<Arc<crate::signer::Keyring>> {
        let previous = self.served.load().signing.get(&policy.name).cloned();
        match offer {
            _ if removed || self.config.signer.is_none() => None,
            Offer::Keys => crate::signer::keyring_for(
                &self.config,
                policy,
                previous.as_ref(),
                &snapshot.doc,
                &snapshot.jwks,
                self.clock.now(),
            ),
            Offer::Withheld(why) => match previous {
                Some(same) if same.withheld_reason() == Some(why.as_str()) => Some(same),
                _ => Some(Arc::new(crate::signer::Keyring::withheld(why.clone()))),
            },
        }
    }

    /// Drops the routes of keysets that are neither configured nor being
    /// retired any more (C1: 404 after the last `remove_at`).
    fn forget_retired_routes(&self) {
        let gone = |name: &String| !self.keysets.contains_key(name);
        let current = self.served.load();
        if !current.keysets.keys().any(gone) {
            return;
        }
        self.served.rcu(|current| {
            let mut next = Served::clone(current);
            next.keysets.retain(|name, _| !gone(name));
            next.offered.retain(|name, _| !gone(name));
            next.signing.retain(|name, _| !gone(name));
            next
        });
    }

    /// The earliest of every keyset's wake-up and `reconcile_interval`.
    fn next_wake(&self) -> Instant {
        let now = self.clock.now();
        let interval = self.config.reconcile_interval;
        let soonest = self
            .keysets
            .values()
            .filter_map(|run| run.wake_at)
            .map(|at| until(now, at))
            .min()
            .unwrap_or(interval)
            .min(interval);
        Instant::now() + soonest
    }

    /// READY=1 after the first pass that published everything, and STATUS=
    /// with the next rotation of any slot.
    pub fn notify_progress(&mut self) {
        if !self.ready_sent && self.served.load().ready() {
            notify(&[sd_notify::NotifyState::Ready]);
            self.ready_sent = true;
        }
        let next = self
            .keysets
            .values()
            .flat_map(|run| {
                run.outlook
                    .iter()
                    .filter_map(move |slot| slot.next_rotation.map(|at| (at, run.name(), slot.alg)))
            })
            .min();
        let status = match next {
            Some((at, keyset, alg)) => format!("next rotation: {keyset}/{alg} at {}", rfc3339(at)),
            None => "no rotation scheduled".to_string(),
        };
        notify(&[sd_notify::NotifyState::Status(&status)]);
    }
}

/// The public keys a JWKS rendered from `snapshot` holds, as verifiers got
/// them (with their certificate): what stays published should the
/// document go missing (C2).
fn published_keys(snapshot: &Snapshot, x5c: bool) -> Vec<PublicJwk> {
    let keys = snapshot
        .doc
        .keys
        .iter()
        .zip(&snapshot.jwks)
        .map(|(key, jwk)| {
            if x5c {
                jwk.clone().with_certificate(&key.certificate)
            } else {
                jwk.clone()
            }
        });
    let orphans = snapshot.doc.orphans.iter().filter_map(|orphan| {
        let jwk = orphan.public_jwk().ok()?;
        Some(match (&orphan.certificate, x5c) {
            (Some(certificate), true) => jwk.with_certificate(certificate),
            _ => jwk,
        })
    });
    keys.chain(orphans).collect()
}

/// The longest grace any key of `snapshot` was given (SPEC C3): what its
/// tokens may need, should the document be lost.
fn longest_grace(snapshot: &Snapshot) -> Duration {
    let keys = snapshot.doc.keys.iter().filter_map(|key| {
        let retired = key
            .retired_at
            .zip(key.remove_at)
            .and_then(|(from, to)| (to - from).to_std().ok());
        let signed = key.longest_grace_seconds.map(Duration::from_secs);
        retired.max(signed)
    });
    let orphans = snapshot
        .doc
        .orphans
        .iter()
        .filter_map(|orphan| (orphan.remove_at - orphan.retired_at).to_std().ok());
    keys.chain(orphans).max().unwrap_or(Duration::ZERO)
}

/// Whether two documents hold the same keys in the same states.
fn same_states(a: &KeysetDoc, b: &KeysetDoc) -> bool {
    let states = |doc: &KeysetDoc| -> Vec<(String, KeyState)> {
        let mut states: Vec<(String, KeyState)> = doc
            .keys
            .iter()
            .map(|key| (key.kid.clone(), key.state))
            .chain(
                doc.orphans
                    .iter()
                    .map(|orphan| (orphan.kid.clone(), KeyState::Retired)),
            )
            .collect();
        states.sort();
        states
    };
    states(a) == states(b)
}

/// The document as signers see it when keys are withheld: no active key.
fn without_active_keys(doc: &KeysetDoc) -> KeysetDoc {
    let mut withheld = doc.clone();
    withheld.keys.retain(|key| key.state != KeyState::Active);
    withheld
}

/// How long from `now` until `at` (zero if it has passed).
fn until(now: Timestamp, at: Timestamp) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// One structured event per key transition (SPEC §5).
pub fn log_transition(keyset: &str, record: &AuditRecord) {
    tracing::info!(
        event = record.event.log_name(),
        keyset,
        alg = %record.alg,
        kid = %record.kid,
        reason = record.trigger.as_str(),
        note = (!record.reason.is_empty()).then_some(record.reason.as_str()),
        remove_at = record.key.remove_at.map(rfc3339),
        "{}",
        record.event.log_name()
    );
}
