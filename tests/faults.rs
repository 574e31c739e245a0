//! Store fault injection (SPEC §3 and I5): a store wrapper makes one chosen
//! operation misbehave while the real `Reconciler` carries out one lifecycle
//! step, on the memory store and on the file store:
//!
//! | fault                          | what the store does                          |
//! |--------------------------------|----------------------------------------------|
//! | load fails                     | `Unavailable`, nothing read                  |
//! | load delayed                   | reads, then waits while another replica      |
//! |                                | carries out the same work: its answer is     |
//! |                                | stale when it arrives                        |
//! | save fails before the write    | `Unavailable`, nothing written               |
//! | save fails after the write     | writes, then `Unavailable` (a lost ack)      |
//! | save delayed                   | waits before writing while another replica   |
//! |                                | writes                                       |
//!
//! For each fault and each step (bootstrap, scheduled rotation, removal after
//! the grace, `rotate --now`, revoke) it checks that the stored document stays
//! valid right after the fault (one active and one next key per slot, nothing
//! removed before its `remove_at` except the revoked key), that the failing
//! call reports the store as unavailable, and that the next reconcile (the
//! daemon's, or the operator running the command again) completes the step
//! exactly once: the audit trail gains exactly the step's transitions, and a
//! reconcile after that has nothing left to do.
//!
//! `tests/model.rs` explores random sequences with crashes and races at save;
//! this file walks the whole fault × step table, load faults included.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::oneshot;

use keyroll::clock::Timestamp;
use keyroll::config::KeysetPolicy;
use keyroll::document::{AuditEvent, KeyState, KeysetDoc, Trigger};
use keyroll::key::Alg;
use keyroll::planner::Action;
use keyroll::reconcile::{Outcome, ReconcileError, Reconciler};
use keyroll::store::{FileStore, MemoryStore, Store, StoreError, Stored, Version};
use support::{dur, secs, t0, FakeClock, FakeKeys, PolicyText};

const KEYSET: &str = "default";

// ---- the faults ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    LoadFails,
    LoadDelayed,
    SaveFailsBeforeWrite,
    SaveFailsAfterWrite,
    SaveDelayed,
}

impl Fault {
    fn on_load(self) -> bool {
        matches!(self, Fault::LoadFails | Fault::LoadDelayed)
    }

    fn delayed(self) -> bool {
        matches!(self, Fault::LoadDelayed | Fault::SaveDelayed)
    }
}

/// The two ends of a delay: the store says it has reached the fault, then
/// waits to be released. The test runs the other replica in between.
struct Gate {
    reached: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

impl Gate {
    async fn hold(self) {
        let _ = self.reached.send(());
        let _ = self.release.await;
    }
}

/// The test's ends of a [`Gate`].
struct Hold {
    reached: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

/// Wraps a store; the next operation of the armed kind misbehaves, once.
struct FaultyStore {
    inner: Arc<dyn Store>,
    armed: Mutex<Option<(Fault, Option<Gate>)>>,
}

impl FaultyStore {
    /// Arms `fault`; for a delay, returns the test's ends of its gate.
    fn arm(&self, fault: Fault) -> Option<Hold> {
        let (gate, hold) = if fault.delayed() {
            let (reached_tx, reached_rx) = oneshot::channel();
            let (release_tx, release_rx) = oneshot::channel();
            let gate = Gate {
                reached: reached_tx,
                release: release_rx,
            };
            let hold = Hold {
                reached: reached_rx,
                release: release_tx,
            };
            (Some(gate), Some(hold))
        } else {
            (None, None)
        };
        *self.armed.lock().unwrap() = Some((fault, gate));
        hold
    }

    /// The armed fault, if it is for this kind of operation (disarming it).
    fn take(&self, load: bool) -> Option<(Fault, Option<Gate>)> {
        let mut armed = self.armed.lock().unwrap();
        match armed.as_ref() {
            Some((fault, _)) if fault.on_load() == load => armed.take(),
            _ => None,
        }
    }

    fn injected(&self, keyset: &str) -> StoreError {
        StoreError::Unavailable {
            location: self.inner.location(keyset),
            message: "injected fault".into(),
        }
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn location(&self, keyset: &str) -> String {
        self.inner.location(keyset)
    }

    async fn load(&self, keyset: &str) -> Result<Option<Stored>, StoreError> {
        match self.take(true) {
            Some((Fault::LoadFails, _)) => Err(self.injected(keyset)),
            Some((_, Some(gate))) => {
                let stored = self.inner.load(keyset).await;
                gate.hold().await;
                stored
            }
            _ => self.inner.load(keyset).await,
        }
    }

    async fn save(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        match self.take(false) {
            Some((Fault::SaveFailsBeforeWrite, _)) => Err(self.injected(keyset)),
            Some((Fault::SaveFailsAfterWrite, _)) => {
                self.inner.save(keyset, text, expected).await?;
                Err(self.injected(keyset))
            }
            Some((_, Some(gate))) => {
                gate.hold().await;
                self.inner.save(keyset, text, expected).await
            }
            _ => self.inner.save(keyset, text, expected).await,
        }
    }
}

// ---- the steps ------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    File,
}

#[derive(Clone, Copy, Debug)]
enum Step {
    /// An empty keyset gets an active and a next key per slot.
    Bootstrap,
    /// The schedule falls due: next → active → retired, a new next.
    ScheduledRotation,
    /// The retired keys' remove_at has passed.
    GraceRemoval,
    /// `rotate --now` while the next key is younger than publish_lead.
    ForcedRotation,
    /// `revoke` of the active ES256 key.
    RevokeActive,
}

const STEPS: [Step; 5] = [
    Step::Bootstrap,
    Step::ScheduledRotation,
    Step::GraceRemoval,
    Step::ForcedRotation,
    Step::RevokeActive,
];

/// retire_grace (5m + 1m + 1m = 7m) is shorter than publish_lead (20m + 1m =
/// 21m), so a retired key can expire while the next key is still too young
/// to activate without `--now`.
fn policy() -> KeysetPolicy {
    PolicyText {
        token_ttl: "5m",
        jwks_cache_ttl: "20m",
        propagation: "1m",
        clock_skew: "1m",
        ..PolicyText::default()
    }
    .build()
}

/// (alg, event, trigger) → how many audit records.
type Transitions = BTreeMap<(Alg, &'static str, &'static str), usize>;

fn transitions(records: &[(Alg, AuditEvent, Trigger)]) -> Transitions {
    let mut counts = Transitions::new();
    for (alg, event, trigger) in records {
        *counts
            .entry((*alg, event.log_name(), trigger.as_str()))
            .or_default() += 1;
    }
    counts
}

impl Step {
    /// What the step does, per SPEC §1, recorded in the audit trail.
    fn expected(self) -> Transitions {
        use AuditEvent::*;
        let mut records = Vec::new();
        for alg in Alg::ALL {
            let per_slot: &[(AuditEvent, Trigger)] = match (self, alg) {
                (Step::Bootstrap, _) => &[
                    (Created, Trigger::Bootstrap),
                    (Activated, Trigger::Bootstrap),
                    (Created, Trigger::Bootstrap),
                ],
                (Step::ScheduledRotation, _) => &[
                    (Activated, Trigger::Schedule),
                    (Retired, Trigger::Schedule),
                    (Created, Trigger::Replenish),
                ],
                (Step::GraceRemoval, _) => &[(Removed, Trigger::GraceEnded)],
                // The expired retired keys go in the same reconcile.
                (Step::ForcedRotation, _) => &[
                    (Activated, Trigger::Forced),
                    (Retired, Trigger::Forced),
                    (Created, Trigger::Replenish),
                    (Removed, Trigger::GraceEnded),
                ],
                (Step::RevokeActive, Alg::ES256) => &[
                    (Revoked, Trigger::Revoke),
                    (Activated, Trigger::Revoke),
                    (Created, Trigger::Replenish),
                    (Removed, Trigger::GraceEnded),
                ],
                (Step::RevokeActive, Alg::RS256) => &[(Removed, Trigger::GraceEnded)],
            };
            records.extend(
                per_slot
                    .iter()
                    .map(|(event, trigger)| (alg, *event, *trigger)),
            );
        }
        transitions(&records)
    }
}

// ---- one scenario ------------------------------------------------------------------

struct World {
    clock: Arc<FakeClock>,
    faulty: Arc<FaultyStore>,
    /// The replica under test, through the faulty store.
    a: Arc<Reconciler>,
    /// Another replica (or the daemon beside a CLI), straight on the store.
    b: Reconciler,
    /// Reads the store for the checks.
    reader: Reconciler,
    policy: KeysetPolicy,
    _dir: Option<tempfile::TempDir>,
}

impl World {
    fn new(backend: Backend) -> World {
        let (inner, dir): (Arc<dyn Store>, _) = match backend {
            Backend::Memory => (Arc::new(MemoryStore::new()), None),
            Backend::File => {
                let dir = tempfile::tempdir().expect("a temporary folder");
                (
                    Arc::new(FileStore::new(dir.path().join("store"))),
                    Some(dir),
                )
            }
        };
        let clock = Arc::new(FakeClock::new(t0()));
        let keys = Arc::new(FakeKeys::new());
        let faulty = Arc::new(FaultyStore {
            inner: inner.clone(),
            armed: Mutex::new(None),
        });
        World {
            a: Arc::new(Reconciler::new(faulty.clone(), keys.clone(), clock.clone())),
            b: Reconciler::new(inner.clone(), keys.clone(), clock.clone()),
            reader: Reconciler::new(inner, keys, clock.clone()),
            faulty,
            clock,
            policy: policy(),
            _dir: dir,
        }
    }

    fn now(&self) -> Timestamp {
        use keyroll::clock::Clock;
        self.clock.now()
    }

    async fn daemon_pass(&self) -> Outcome {
        self.b
            .reconcile(&self.policy, None)
            .await
            .expect("a fault-free reconcile succeeds")
    }

    async fn stored(&self) -> (KeysetDoc, Option<Version>) {
        let snapshot = self
            .reader
            .load(KEYSET)
            .await
            .unwrap_or_else(|e| panic!("the stored document does not load: {e}"));
        (snapshot.doc, snapshot.version)
    }

    /// Brings the store to the instant just before `step`; returns what the
    /// replica under test is asked to do.
    async fn prepare(&self, step: Step) -> Option<Action> {
        let grace = dur(self.policy.timings.retire_grace());
        if matches!(step, Step::Bootstrap) {
            return None;
        }
        self.daemon_pass().await; // bootstrap at t0
        self.clock.advance(chrono::Duration::days(1) + secs(1));
        if matches!(step, Step::ScheduledRotation) {
            return None;
        }
        self.daemon_pass().await; // the scheduled rotation

        // The retired keys have expired; the new next key is younger than
        // publish_lead. A daemon reconcile now would remove the expired keys:
        // the other replica's work in the delayed cases.
        self.clock.advance(grace + secs(1));
        let (doc, _) = self.stored().await;
        match step {
            Step::GraceRemoval => None,
            Step::ForcedRotation => Some(Action::Rotate {
                alg: None,
                force: true,
            }),
            Step::RevokeActive => Some(Action::Revoke {
                kid: doc
                    .key(Alg::ES256, KeyState::Active)
                    .expect("an active ES256 key")
                    .kid
                    .clone(),
                reason: "fault test".into(),
            }),
            Step::Bootstrap | Step::ScheduledRotation => unreachable!(),
        }
    }
}

/// Everything one scenario checks; a failure names the scenario.
struct Check<'a> {
    name: String,
    world: &'a World,
    before: KeysetDoc,
    action: Option<Action>,
}

impl Check<'_> {
    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("{}: {what}", self.name)
    }

    /// The invariants that hold at every instant: the document loads, every
    /// slot has one active and one next key, and no key is gone before its
    /// remove_at unless this scenario revoked it.
    async fn invariants(&self, when: &str) -> KeysetDoc {
        let (doc, _) = self.world.stored().await;
        if doc.keys.is_empty() {
            return doc; // not bootstrapped yet
        }
        for alg in Alg::ALL {
            for state in [KeyState::Active, KeyState::Next] {
                let count = doc
                    .keys
                    .iter()
                    .filter(|k| k.alg == alg && k.state == state)
                    .count();
                if count != 1 {
                    self.fail(format!("{when}: slot {alg} has {count} {state} keys"));
                }
            }
        }
        let now = self.world.now();
        let revoked = match &self.action {
            Some(Action::Revoke { kid, .. }) => Some(kid.as_str()),
            _ => None,
        };
        for key in &self.before.keys {
            let kept = doc.keys.iter().any(|k| k.kid == key.kid);
            let due = key.remove_at.is_some_and(|at| at <= now);
            if !kept && !due && revoked != Some(key.kid.as_str()) {
                self.fail(format!(
                    "{when}: {} key {} was removed before its remove_at {:?}",
                    key.state, key.kid, key.remove_at
                ));
            }
        }
        doc
    }

    /// The transitions the store gained since the scenario began.
    fn gained(&self, doc: &KeysetDoc) -> Transitions {
        let new = &doc.audit[self.before.audit.len()..];
        let records: Vec<_> = new.iter().map(|r| (r.alg, r.event, r.trigger)).collect();
        transitions(&records)
    }

    fn unavailable(&self, result: &Result<Outcome, ReconcileError>) {
        match result {
            Err(ReconcileError::Store(StoreError::Unavailable { location, .. }))
                if *location == self.world.faulty.location(KEYSET) => {}
            other => self.fail(format!(
                "expected the store to be reported unavailable, got {other:?}"
            )),
        }
    }
}

async fn scenario(backend: Backend, step: Step, fault: Fault) {
    let world = World::new(backend);
    let action = world.prepare(step).await;
    let (before, before_version) = world.stored().await;
    let check = Check {
        name: format!("{backend:?} store, {step:?}, {fault:?}"),
        world: &world,
        before,
        action: action.clone(),
    };
    let expected = step.expected();

    // The faulted call; for a delay, the other replica works meanwhile.
    let hold = world.faulty.arm(fault);
    let replica = world.a.clone();
    let (policy, request) = (world.policy.clone(), action.clone());
    let call = tokio::spawn(async move { replica.reconcile(&policy, request.as_ref()).await });
    if let Some(hold) = hold {
        if hold.reached.await.is_err() {
            check.fail("the delayed operation was never reached");
        }
        let theirs = world.daemon_pass().await;
        if theirs.committed.is_empty() {
            check.fail("the other replica had nothing to do: no race");
        }
        let _ = hold.release.send(());
    }
    let result = call.await.expect("the reconcile task");
    let doc = check.invariants("right after the fault").await;
    let (_, version) = world.stored().await;

    match fault {
        Fault::LoadFails | Fault::SaveFailsBeforeWrite => {
            check.unavailable(&result);
            if version != before_version {
                check.fail("the store changed though nothing was written");
            }
        }
        Fault::SaveFailsAfterWrite => {
            check.unavailable(&result);
            if check.gained(&doc) != expected {
                check.fail(format!(
                    "the lost-ack write did not land whole: {:?}",
                    check.gained(&doc)
                ));
            }
        }
        Fault::LoadDelayed | Fault::SaveDelayed => match &result {
            Ok(outcome) if outcome.conflicts == 0 => {
                check.fail("a stale load or save went through without a conflict")
            }
            Ok(outcome) if outcome.snapshot.version != version => {
                check.fail("the outcome is not the stored document")
            }
            Ok(_) => {}
            Err(e) => check.fail(format!("the delayed reconcile failed: {e}")),
        },
    }

    // The next reconcile: the operator runs the command again after an
    // error it saw before anything was written; after a lost ack (the step
    // landed) and after a delay, it is the daemon's next pass.
    let retry = match fault {
        Fault::LoadFails | Fault::SaveFailsBeforeWrite => action.clone(),
        _ => None,
    };
    if let Err(e) = world.a.reconcile(&world.policy, retry.as_ref()).await {
        check.fail(format!("the next reconcile failed: {e}"));
    }
    let doc = check.invariants("after the next reconcile").await;
    let gained = check.gained(&doc);
    if gained != expected {
        check.fail(format!(
            "the step did not happen exactly once:\n  expected {expected:?}\n  got      {gained:?}"
        ));
    }
    let after = world.daemon_pass().await;
    if !after.plan.steps.is_empty() {
        check.fail(format!("work was left over: {:?}", after.plan.steps));
    }
}

async fn every_step(fault: Fault) {
    for backend in [Backend::Memory, Backend::File] {
        for step in STEPS {
            scenario(backend, step, fault).await;
        }
    }
}

#[tokio::test]
async fn load_fails() {
    every_step(Fault::LoadFails).await;
}

#[tokio::test]
async fn load_is_delayed_while_another_replica_writes() {
    every_step(Fault::LoadDelayed).await;
}

#[tokio::test]
async fn save_fails_before_the_write_lands() {
    every_step(Fault::SaveFailsBeforeWrite).await;
}

#[tokio::test]
async fn save_fails_after_the_write_lands() {
    every_step(Fault::SaveFailsAfterWrite).await;
}

#[tokio::test]
async fn save_is_delayed_while_another_replica_writes() {
    every_step(Fault::SaveDelayed).await;
}

/// A real file-system fault rather than an injected one: the lock file is a
/// folder, so the file store cannot take its lock and writes nothing. Once
/// the operator removes it, the next reconcile bootstraps the keyset.
#[tokio::test]
async fn file_store_that_cannot_lock_writes_nothing_and_recovers() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(store_dir.join(format!(".{KEYSET}.lock"))).unwrap();
    let clock = Arc::new(FakeClock::new(t0()));
    let reconciler = Reconciler::new(
        Arc::new(FileStore::new(&store_dir)),
        Arc::new(FakeKeys::new()),
        clock,
    );
    let policy = policy();
    match reconciler.reconcile(&policy, None).await {
        Err(ReconcileError::Store(StoreError::Unavailable { location, message })) => {
            assert!(location.ends_with("default.json"), "{location}");
            assert!(message.contains("lock"), "{message}");
        }
        other => panic!("expected the store to be unavailable, got {other:?}"),
    }
    assert!(!store_dir.join("default.json").exists());
    std::fs::remove_dir(store_dir.join(format!(".{KEYSET}.lock"))).unwrap();
    let outcome = reconciler.reconcile(&policy, None).await.unwrap();
    assert_eq!(
        transitions(
            &outcome
                .committed
                .iter()
                .map(|r| (r.alg, r.event, r.trigger))
                .collect::<Vec<_>>()
        ),
        Step::Bootstrap.expected()
    );
}
