//! `keyroll run`: reconcile every keyset, publish, sleep until the next
//! scheduled instant (or `reconcile_interval`, whichever is first), repeat.
//! SIGHUP reloads the config; the shutdown future (SIGTERM/SIGINT in
//! production) stops it within seconds. Speaks sd_notify to systemd.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::{rfc3339, Clock, Timestamp};
use crate::config::{Config, ConfigError, KeysetPolicy};
use crate::document::{AuditEvent, AuditRecord, Trigger};
use crate::key::KeyFactory;
use crate::metrics::Metrics;
use crate::planner::SlotOutlook;
use crate::publish::{self, Served, ServedState};
use crate::reconcile::{Outcome, ReconcileError, Reconciler, Snapshot};
use crate::store::{self, StoreError};

/// The longest wait between retries of a failing keyset.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often an idle daemon checks whether another writer changed a document.
const CHANGE_POLL: Duration = Duration::from_millis(500);
/// How long in-flight HTTP requests get once shutdown starts. With the
/// runtime's one-second grace for blocking work (cli.rs), SIGTERM to exit
/// stays well inside SPEC §5's 5 s.
const HTTP_DRAIN: Duration = Duration::from_secs(2);

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
    // signer hook
    #[error(transparent)]
    Signer(#[from] crate::signer::SignerError),
}

/// Everything `run` needs from outside, so tests can hand in their own.
pub struct Setup {
    pub config: Config,
    /// Reads the config again on SIGHUP.
    pub reload: Box<dyn Fn() -> Result<Config, ConfigError> + Send>,
    pub keys: Arc<dyn KeyFactory>,
    pub clock: Arc<dyn Clock>,
}

struct Daemon {
    config: Config,
    reconciler: Reconciler,
    keys: Arc<dyn KeyFactory>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    served: ServedState,
    reload: Box<dyn Fn() -> Result<Config, ConfigError> + Send>,
    /// Consecutive failures per keyset, for the backoff.
    failures: HashMap<String, u32>,
    /// The latest outlook of each keyset's slots, for systemd's STATUS=.
    outlook: HashMap<String, Vec<SlotOutlook>>,
    /// Milliseconds since `epoch` at which the keyset being reconciled was
    /// started; 0 between passes. Read by the watchdog.
    busy_since: Arc<AtomicU64>,
    epoch: StdInstant,
}

/// Runs the daemon until `shutdown` completes.
pub async fn run(setup: Setup, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let store = store::open(&setup.config.store).await?;
    let metrics = Arc::new(Metrics::new());
    let served: ServedState = Arc::new(ArcSwap::from_pointee(Served::default()));
    let mut daemon = Daemon {
        reconciler: Reconciler::new(store, setup.keys.clone(), setup.clock.clone()),
        config: setup.config,
        keys: setup.keys,
        clock: setup.clock,
        metrics,
        served,
        reload: setup.reload,
        failures: HashMap::new(),
        outlook: HashMap::new(),
        busy_since: Arc::new(AtomicU64::new(0)),
        epoch: StdInstant::now(),
    };
    daemon.apply_config_to_served();
    for config_warning in &daemon.config.warnings {
        tracing::warn!("{config_warning}");
    }

    let (stop_http, http_stopped) = watch::channel(false);
    // signer hook: the signer's sockets, stopped with HTTP.
    let signers = crate::signer::start(
        &daemon.config,
        daemon.served.clone(),
        daemon.metrics.clone(),
        daemon.clock.clone(),
        stop_http.subscribe(),
    )
    .await?;
    let http = daemon.start_http(http_stopped).await?;
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DaemonError::Signals)?;
    let watchdog = daemon.start_watchdog();
    tracing::info!(
        config = %daemon.config.source,
        store = %daemon.reconciler.store().location("<keyset>"),
        listen = ?daemon.config.http_listen,
        keysets = daemon.config.keysets.len(),
        "keyroll started"
    );

    tokio::pin!(shutdown);
    let mut ready_sent = false;
    loop {
        // Taken before the pass, so that a write landing during the pass is
        // not missed; our own writes then cost one extra (idle) pass.
        let seen = daemon.fingerprints().await;
        let wake = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            wake = daemon.pass() => wake,
        };
        if !ready_sent && daemon.served.load().ready() {
            notify(&[sd_notify::NotifyState::Ready]);
            ready_sent = true;
        }
        daemon.notify_status();
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = hangups.recv() => daemon.reload().await,
            _ = tokio::time::sleep_until(wake) => {}
            keyset = store_changed(daemon.reconciler.store().clone(), &seen) => {
                tracing::debug!(%keyset, "stored document changed; reconciling now");
            }
        }
    }

    tracing::info!("shutting down");
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_http.send(true);
    if let Some(http) = http {
        if tokio::time::timeout(HTTP_DRAIN, http).await.is_err() {
            tracing::warn!("HTTP connections still open at shutdown were dropped");
        }
    }
    // signer hook: in-flight sign requests get the same drain as HTTP.
    for signer in signers {
        let _ = tokio::time::timeout(HTTP_DRAIN, signer).await;
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
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
    async fn start_http(
        &self,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, DaemonError> {
        let Some(addr) = self.config.http_listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Listen { addr, source })?;
        let (served, metrics) = (self.served.clone(), self.metrics.clone());
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        Ok(Some(tokio::spawn(async move {
            if let Err(e) = publish::http::serve(listener, served, metrics, shutdown).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })))
    }

    /// Pings WATCHDOG=1 at half of `WatchdogSec`, unless one keyset's
    /// reconcile has been running longer than the whole watchdog period:
    /// then systemd should restart us. Per keyset, not per pass: with a
    /// slow store every keyset takes up to its request budget (15 s on AWS),
    /// and a restart would only stop the serving of the last good JWKS.
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
                    tracing::error!("a keyset's reconcile is stuck; withholding the watchdog ping");
                }
            }
        }))
    }

    fn apply_config_to_served(&self) {
        let expected: Vec<String> = self.config.keysets.iter().map(|k| k.name.clone()).collect();
        let default_keyset = self.config.default_keyset().map(|k| k.name.clone());
        self.served.rcu(|current| {
            let keysets = current
                .keysets
                .iter()
                .filter(|(name, _)| expected.contains(name))
                .map(|(name, jwks)| (name.clone(), jwks.clone()))
                .collect();
            // signer hook: a keyset no longer configured signs nothing (404).
            let signing = current
                .signing
                .iter()
                .filter(|(name, _)| expected.contains(name))
                .map(|(name, keyring)| (name.clone(), keyring.clone()))
                .collect();
            Served {
                keysets,
                default_keyset: default_keyset.clone(),
                expected: expected.clone(),
                signing,
            }
        });
        for keyset in &expected {
            self.metrics.register_keyset(keyset);
        }
    }

    async fn reload(&mut self) {
        let config = match (self.reload)() {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; keeping the running config");
                return;
            }
        };
        if config.store != self.config.store {
            match store::open(&config.store).await {
                Ok(store) => {
                    self.reconciler = Reconciler::new(store, self.keys.clone(), self.clock.clone());
                }
                Err(e) => {
                    tracing::error!(error = %e, "config reload failed; keeping the running config");
                    return;
                }
            }
        }
        if config.http_listen != self.config.http_listen {
            tracing::warn!(
                running = ?self.config.http_listen,
                configured = ?config.http_listen,
                "http.listen changed: restart keyroll to apply it"
            );
        }
        // signer hook: sockets are bound once, at start.
        if crate::signer::needs_restart(&self.config, &config) {
            tracing::warn!("[signer] sockets changed: restart keyroll to apply them");
        }
        for config_warning in &config.warnings {
            tracing::warn!("{config_warning}");
        }
        self.config = config;
        self.failures.clear();
        self.outlook
            .retain(|name, _| self.config.keyset(name).is_some());
        self.apply_config_to_served();
        tracing::info!(config = %self.config.source, "config reloaded");
    }

    async fn fingerprints(&self) -> Vec<(String, Option<String>)> {
        let mut seen = Vec::with_capacity(self.config.keysets.len());
        for policy in &self.config.keysets {
            let fingerprint = self.reconciler.store().fingerprint(&policy.name).await;
            seen.push((policy.name.clone(), fingerprint));
        }
        seen
    }

    /// Reconciles and publishes every keyset; returns when to run again.
    async fn pass(&mut self) -> Instant {
        let interval = self.config.reconcile_interval;
        let mut wake = Instant::now() + interval;
        let policies = self.config.keysets.clone();
        for policy in &policies {
            let keyset_started = self.epoch.elapsed().as_millis().max(1) as u64;
            self.busy_since.store(keyset_started, Ordering::Relaxed);
            let retry_in = match self.reconciler.reconcile(policy, None).await {
                Ok(outcome) => {
                    self.failures.remove(&policy.name);
                    self.after_commit(policy, &outcome);
                    self.publish(policy, &outcome.snapshot).await;
                    let now = self.clock.now();
                    self.metrics
                        .observe_keyset(&outcome.snapshot.doc, &outcome.plan.outlook, now);
                    self.outlook
                        .insert(policy.name.clone(), outcome.plan.outlook.clone());
                    outcome.plan.wake_at.map(|at| until(now, at))
                }
                Err(e) => Some(self.failed(policy, &e)),
            };
            if let Some(retry_in) = retry_in {
                wake = wake.min(Instant::now() + retry_in);
            }
        }
        self.busy_since.store(0, Ordering::Relaxed);
        wake
    }

    fn after_commit(&self, policy: &KeysetPolicy, outcome: &Outcome) {
        if outcome.conflicts > 0 {
            self.metrics
                .store_conflicts(&policy.name, outcome.conflicts);
        }
        for record in &outcome.committed {
            log_transition(&policy.name, record);
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
    }

    /// Records a failure and says when to retry: exponential backoff from
    /// one second, capped by the reconcile interval.
    fn failed(&mut self, policy: &KeysetPolicy, error: &ReconcileError) -> Duration {
        let failures = self.failures.entry(policy.name.clone()).or_default();
        *failures += 1;
        let backoff = Duration::from_secs(1u64 << (*failures - 1).min(9))
            .min(self.config.reconcile_interval)
            .min(MAX_BACKOFF);
        self.metrics.reconcile_error(&policy.name);
        let serving = self.served.load().keysets.contains_key(&policy.name);
        match error {
            ReconcileError::Store(StoreError::Unavailable { .. })
            | ReconcileError::Contention { .. } => {
                tracing::warn!(
                    keyset = %policy.name, error = %error, retry_in = ?backoff, serving_last_jwks = serving,
                    "store unreachable: keeping the last published JWKS, removing nothing"
                );
            }
            _ => {
                tracing::error!(
                    keyset = %policy.name, error = %error, retry_in = ?backoff, serving_last_jwks = serving,
                    "keyset not reconciled; fix the cause (nothing is overwritten)"
                );
            }
        }
        backoff
    }

    async fn publish(&self, policy: &KeysetPolicy, snapshot: &Snapshot) {
        let max_age = policy.timings.jwks_cache_ttl.as_secs();
        let jwks = Arc::new(publish::render(
            &snapshot.doc,
            &snapshot.jwks,
            policy.x5c,
            max_age,
        ));
        let changed = self
            .served
            .load()
            .keysets
            .get(&policy.name)
            .is_none_or(|current| current.body != jwks.body || current.max_age_seconds != max_age);
        let (policy_owned, doc, body) = (policy.clone(), snapshot.doc.clone(), jwks.body.clone());
        let results = tokio::task::spawn_blocking(move || {
            let jwks_file = policy_owned
                .jwks_file
                .as_ref()
                .map(|path| publish::write_jwks_file(path, &body).map_err(|e| e.to_string()));
            let signing_dir = policy_owned
                .signing_dir
                .as_ref()
                .map(|dir| publish::write_signing_dir(dir, &doc).map_err(|e| e.to_string()));
            (jwks_file, signing_dir)
        })
        .await;
        let (jwks_file, signing_dir) = results.unwrap_or((None, None));
        for (output, result) in [("jwks_file", jwks_file), ("signing_dir", signing_dir)] {
            match result {
                Some(Err(error)) => {
                    self.metrics.publish_error(&policy.name, output);
                    self.metrics.reconcile_error(&policy.name);
                    tracing::error!(keyset = %policy.name, output, %error, "cannot publish; HTTP keeps serving the current JWKS");
                }
                Some(Ok(true)) => tracing::info!(keyset = %policy.name, output, "updated"),
                _ => {}
            }
        }
        // signer hook: the signer's keys from this same snapshot, parsed only
        // when they changed, swapped in with the JWKS below.
        let previous = self.served.load().signing.get(&policy.name).cloned();
        let keyring = crate::signer::keyring_for(
            &self.config,
            policy,
            previous.as_ref(),
            &snapshot.doc,
            &snapshot.jwks,
            self.clock.now(),
        );
        let changed = changed
            || match (&previous, &keyring) {
                (Some(before), Some(now)) => !Arc::ptr_eq(before, now),
                (before, now) => before.is_some() != now.is_some(),
            };
        // HTTP last: once /readyz answers 200, a sidecar's application finds
        // its signing_dir written.
        if changed {
            self.served.rcu(|current| {
                let mut keysets = current.keysets.clone();
                keysets.insert(policy.name.clone(), jwks.clone());
                // signer hook
                let mut signing = current.signing.clone();
                match &keyring {
                    Some(keyring) => signing.insert(policy.name.clone(), keyring.clone()),
                    None => signing.remove(&policy.name),
                };
                Served {
                    keysets,
                    default_keyset: current.default_keyset.clone(),
                    expected: current.expected.clone(),
                    signing,
                }
            });
            tracing::debug!(keyset = %policy.name, etag = %jwks.etag, "JWKS published");
        }
    }

    /// STATUS= for `systemctl status`: the next rotation of any slot.
    fn notify_status(&self) {
        let next = self
            .outlook
            .iter()
            .flat_map(|(keyset, slots)| {
                slots
                    .iter()
                    .filter_map(move |slot| slot.next_rotation.map(|at| (at, keyset, slot.alg)))
            })
            .min();
        let status = match next {
            Some((at, keyset, alg)) => format!("next rotation: {keyset}/{alg} at {}", rfc3339(at)),
            None => "no rotation scheduled".to_string(),
        };
        notify(&[sd_notify::NotifyState::Status(&status)]);
    }
}

/// Completes (with the keyset's name) once a document's fingerprint differs
/// from `seen`; never, if the store cannot tell.
async fn store_changed(store: Arc<dyn store::Store>, seen: &[(String, Option<String>)]) -> String {
    if seen.iter().all(|(_, fingerprint)| fingerprint.is_none()) {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(CHANGE_POLL);
    loop {
        tick.tick().await;
        for (keyset, before) in seen {
            if before.is_some() && store.fingerprint(keyset).await != *before {
                return keyset.clone();
            }
        }
    }
}

/// How long from `now` until `at` (zero if it has passed).
fn until(now: Timestamp, at: Timestamp) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
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
