//! A model test of the whole lifecycle (SPEC §1, invariants I1–I5): random
//! sequences of time steps, daemon reconciles, manual rotations, revokes,
//! config changes, crashes and races between two replicas, run through the
//! real `Reconciler` on a `MemoryStore` with fake keys and a fake clock. After
//! every step the stored document is loaded and checked against the
//! invariants and against the previous state.
//!
//! `PROPTEST_CASES=2000 cargo test --test model` runs more cases; a failure
//! prints the minimal sequence of operations that breaks an invariant.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use proptest::prelude::*;

use keyroll::clock::{Clock, Timestamp};
use keyroll::config::KeysetPolicy;
use keyroll::document::{AuditEvent, AuditRecord, KeyState, KeysetDoc, Trigger};
use keyroll::key::Alg;
use keyroll::planner::{self, Action, PlanError};
use keyroll::reconcile::{Outcome, ReconcileError, Reconciler, Snapshot};
use keyroll::store::{MemoryStore, Store, StoreError, Stored, Version};
use support::{dur, secs, t0, FakeClock, FakeKeys, PolicyText, FAKE_PEM_PREFIX};

// ---- coverage counters (printed with KEYROLL_MODEL_STATS=1) ----------------------

static STATS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn stat(name: impl Into<String>) {
    *STATS.lock().unwrap().entry(name.into()).or_default() += 1;
}

fn print_stats() {
    if std::env::var_os("KEYROLL_MODEL_STATS").is_some() {
        eprintln!("model coverage: {:#?}", STATS.lock().unwrap());
    }
}

// ---- what is generated ----------------------------------------------------------

#[derive(Clone, Debug)]
enum Sched {
    /// `rotate_every` = this many times publish_lead.
    Every(u32),
    Week,
    /// `rotate = "0 */30 * * * *"`.
    Cron30m,
}

#[derive(Clone, Debug)]
struct Params {
    jwks_cache_ttl: &'static str,
    propagation: &'static str,
    token_ttl: &'static str,
    clock_skew: &'static str,
    sched: Sched,
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Active,
    Next,
    Retired,
    Any,
}

/// What a replica asks of the reconciler.
#[derive(Clone, Debug)]
enum Ask {
    Daemon,
    Rotate { alg: Option<Alg>, force: bool },
    Revoke(Target, usize),
    RevokeUnknown,
}

#[derive(Clone, Copy, Debug)]
enum Crash {
    /// The save never reaches the store.
    SaveFails,
    /// The save lands, but the writer hears `Unavailable` (trait: "may or
    /// may not have landed").
    SaveLandsButFails,
    /// The reconcile future is dropped at the moment it would save.
    Dropped,
}

#[derive(Clone, Debug)]
enum Op {
    /// Forward by this many thousandths of 2 × publish_lead.
    Small(u32),
    /// Forward by this many thousandths of a rotation period (up to 3 periods).
    Large(u32),
    /// Forward to the next instant planning may do something, ± 1 s.
    ToWake(i64),
    /// The daemon was down this many periods, then reconciles.
    Outage(u32),
    Run(Ask),
    /// Drop the algorithm from the config, or add it back.
    Toggle(Alg),
    Crash {
        crash: Crash,
        ask: Ask,
        /// Reconcile again right after, at the same instant.
        recover: bool,
    },
    /// Another replica's full daemon reconcile lands between this one's
    /// load and save.
    Race(Ask),
}

fn params() -> impl Strategy<Value = Params> {
    (
        prop::sample::select(vec!["0s", "5m", "20m"]),
        prop::sample::select(vec!["30s", "1m"]),
        prop::sample::select(vec!["5m", "1h"]),
        prop::sample::select(vec!["0s", "1m"]),
        prop_oneof![
            4 => prop::sample::select(vec![1u32, 2, 5, 30, 300]).prop_map(Sched::Every),
            1 => Just(Sched::Week),
            1 => Just(Sched::Cron30m),
        ],
    )
        .prop_map(
            |(jwks_cache_ttl, propagation, token_ttl, clock_skew, sched)| Params {
                jwks_cache_ttl,
                propagation,
                token_ttl,
                clock_skew,
                sched,
            },
        )
}

fn alg() -> impl Strategy<Value = Alg> {
    prop::sample::select(Alg::ALL.to_vec())
}

fn target() -> impl Strategy<Value = Target> {
    prop::sample::select(vec![
        Target::Active,
        Target::Next,
        Target::Retired,
        Target::Any,
    ])
}

fn ask() -> impl Strategy<Value = Ask> {
    prop_oneof![
        4 => Just(Ask::Daemon),
        2 => (prop::option::of(alg()), any::<bool>())
            .prop_map(|(alg, force)| Ask::Rotate { alg, force }),
        2 => (target(), 0usize..8).prop_map(|(t, i)| Ask::Revoke(t, i)),
        1 => Just(Ask::RevokeUnknown),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u32..=1000).prop_map(Op::Small),
        4 => (0u32..=3000).prop_map(Op::Large),
        3 => (-1i64..=1).prop_map(Op::ToWake),
        1 => (2u32..=12).prop_map(Op::Outage),
        8 => Just(Op::Run(Ask::Daemon)),
        3 => (prop::option::of(alg()), any::<bool>())
            .prop_map(|(alg, force)| Op::Run(Ask::Rotate { alg, force })),
        3 => (target(), 0usize..8).prop_map(|(t, i)| Op::Run(Ask::Revoke(t, i))),
        1 => Just(Op::Run(Ask::RevokeUnknown)),
        1 => alg().prop_map(Op::Toggle),
        2 => (
            prop::sample::select(vec![Crash::SaveFails, Crash::SaveLandsButFails, Crash::Dropped]),
            ask(),
            any::<bool>()
        )
            .prop_map(|(crash, ask, recover)| Op::Crash { crash, ask, recover }),
        2 => ask().prop_map(Op::Race),
    ]
}

// ---- a store that misbehaves on request -----------------------------------------

enum Fault {
    None,
    SaveFails,
    SaveLandsButFails,
    /// Signal, then never finish (the caller drops the future).
    Hang(tokio::sync::oneshot::Sender<()>),
    /// Run the other replica's reconcile, then save.
    Race(Arc<Reconciler>, Box<KeysetPolicy>),
}

struct FaultyStore {
    inner: Arc<MemoryStore>,
    fault: Mutex<Fault>,
    /// What the other replica's reconcile returned, when a race ran.
    raced: Mutex<Option<Result<Outcome, ReconcileError>>>,
}

impl FaultyStore {
    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }
}

fn unavailable() -> StoreError {
    StoreError::Unavailable {
        location: "memory:default".into(),
        message: "injected failure".into(),
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn location(&self, keyset: &str) -> String {
        self.inner.location(keyset)
    }

    async fn load(&self, keyset: &str) -> Result<Option<Stored>, StoreError> {
        self.inner.load(keyset).await
    }

    async fn save(
        &self,
        keyset: &str,
        text: &str,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let fault = std::mem::replace(&mut *self.fault.lock().unwrap(), Fault::None);
        match fault {
            Fault::None => self.inner.save(keyset, text, expected).await,
            Fault::SaveFails => Err(unavailable()),
            Fault::SaveLandsButFails => {
                self.inner.save(keyset, text, expected).await?;
                Err(unavailable())
            }
            Fault::Hang(signal) => {
                let _ = signal.send(());
                std::future::pending().await
            }
            Fault::Race(other, policy) => {
                let outcome = other.reconcile(&policy, None).await;
                *self.raced.lock().unwrap() = Some(outcome);
                self.inner.save(keyset, text, expected).await
            }
        }
    }
}

// ---- the model ----------------------------------------------------------------------

/// One reconcile that ran during a step.
struct Ran {
    who: &'static str,
    action: Option<Action>,
    result: Result<Outcome, ReconcileError>,
}

struct World {
    clock: Arc<FakeClock>,
    inner: Arc<MemoryStore>,
    faulty: Arc<FaultyStore>,
    /// Replica A (the CLI or a daemon), through the faulty store.
    a: Reconciler,
    /// Replica B, straight on the store; the one that wins races.
    b: Arc<Reconciler>,
    /// Reads the store for the checks.
    reader: Reconciler,
    full: KeysetPolicy,
    policy: KeysetPolicy,
    period_hint: chrono::Duration,
    lead: chrono::Duration,
    /// Algorithms of the policy of the last reconcile that landed.
    reconciled_algs: Option<Vec<Alg>>,
    prev: Snapshot,
    /// The document loaded after the current step, while it is checked.
    after: Option<KeysetDoc>,
    /// Every kid ever revoked.
    revoked: BTreeSet<String>,
    step: usize,
}

fn policy_of(p: &Params) -> (KeysetPolicy, chrono::Duration) {
    let mut text = PolicyText {
        token_ttl: p.token_ttl,
        jwks_cache_ttl: p.jwks_cache_ttl,
        propagation: p.propagation,
        clock_skew: p.clock_skew,
        ..PolicyText::default()
    };
    let lead = text.build().timings.publish_lead();
    let period = match p.sched {
        Sched::Every(n) => {
            let period = lead * n;
            text.schedule = format!("rotate_every = \"{}s\"", period.as_secs());
            period
        }
        Sched::Week => {
            text.schedule = "rotate_every = \"7d\"".into();
            std::time::Duration::from_secs(7 * 86_400)
        }
        Sched::Cron30m => {
            text.schedule = "rotate = \"0 */30 * * * *\"".into();
            std::time::Duration::from_secs(1800)
        }
    };
    (text.build(), dur(period))
}

impl World {
    fn new(p: &Params) -> Self {
        let (full, period_hint) = policy_of(p);
        let clock = Arc::new(FakeClock::new(t0()));
        let keys = Arc::new(FakeKeys::new());
        let inner = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore {
            inner: inner.clone(),
            fault: Mutex::new(Fault::None),
            raced: Mutex::new(None),
        });
        World {
            a: Reconciler::new(faulty.clone(), keys.clone(), clock.clone()),
            b: Arc::new(Reconciler::new(inner.clone(), keys.clone(), clock.clone())),
            reader: Reconciler::new(inner.clone(), keys, clock.clone()),
            lead: dur(full.timings.publish_lead()),
            policy: full.clone(),
            full,
            period_hint,
            clock,
            inner,
            faulty,
            reconciled_algs: None,
            prev: Snapshot {
                doc: KeysetDoc::new("default"),
                version: None,
                jwks: Vec::new(),
            },
            after: None,
            revoked: BTreeSet::new(),
            step: 0,
        }
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// A slot added to an already published keyset: its first key is a
    /// `next` key waiting publish_lead before it may sign.
    fn first_key_waiting(&self, doc: &KeysetDoc, alg: Alg, now: Timestamp) -> bool {
        doc.key(alg, KeyState::Active).is_none()
            && doc
                .key(alg, KeyState::Next)
                .is_some_and(|next| now < next.published_at + self.lead)
    }

    fn fail(&self, what: &str) -> ! {
        let show = |doc: &KeysetDoc| {
            let keys: Vec<String> = doc
                .keys
                .iter()
                .map(|k| {
                    format!(
                        "{} {} {} pub {} act {:?} ret {:?} rm {:?}",
                        k.kid,
                        k.alg,
                        k.state,
                        k.published_at,
                        k.activated_at,
                        k.retired_at,
                        k.remove_at
                    )
                })
                .collect();
            format!("{keys:#?}\npending: {:?}", doc.pending_rotations)
        };
        panic!(
            "step {} at {}: {what}\npolicy algorithms {:?}\nstored keys before the step: {}\nafter: {}",
            self.step,
            keyroll::clock::rfc3339(self.now()),
            self.policy.algorithms,
            show(&self.prev.doc),
            self.after.as_ref().map_or("(not loaded yet)".to_string(), show),
        )
    }

    /// Turns a generated request into an action on the current document.
    fn action(&self, ask: &Ask) -> Option<Action> {
        match ask {
            Ask::Daemon => None,
            Ask::Rotate { alg, force } => Some(Action::Rotate {
                alg: *alg,
                force: *force,
            }),
            Ask::RevokeUnknown => Some(Action::Revoke {
                kid: "no-such-kid".into(),
                reason: "model".into(),
            }),
            Ask::Revoke(target, index) => {
                let keys = &self.prev.doc.keys;
                let wanted = |state| keys.iter().filter(|k| k.state == state).collect::<Vec<_>>();
                let mut candidates = match target {
                    Target::Active => wanted(KeyState::Active),
                    Target::Next => wanted(KeyState::Next),
                    Target::Retired => wanted(KeyState::Retired),
                    Target::Any => Vec::new(),
                };
                if candidates.is_empty() {
                    candidates = keys.iter().collect();
                }
                let kid = match candidates.get(index % candidates.len().max(1)) {
                    Some(key) => key.kid.clone(),
                    None => "no-such-kid".into(),
                };
                Some(Action::Revoke {
                    kid,
                    reason: "model".into(),
                })
            }
        }
    }

    async fn run(&mut self, op: &Op) {
        let mut ran = Vec::new();
        let mut crashed = false;
        match op {
            Op::Small(f) => self.clock.advance(self.lead * 2 * *f as i32 / 1000),
            Op::Large(f) => self.clock.advance(self.period_hint * *f as i32 / 1000),
            Op::ToWake(offset) => {
                let plan = planner::plan(self.now(), &self.prev.doc, &self.policy, None).unwrap();
                if let Some(wake) = plan.wake_at {
                    let target = wake + secs(*offset);
                    if target > self.now() {
                        self.clock.set(target);
                    }
                }
            }
            Op::Outage(n) => {
                self.clock.advance(self.period_hint * *n as i32);
                ran.push(self.reconcile_a(None).await);
            }
            Op::Run(ask) => {
                let action = self.action(ask);
                ran.push(self.reconcile_a(action).await);
            }
            Op::Toggle(alg) => {
                if self.policy.algorithms.contains(alg) {
                    if self.policy.algorithms.len() > 1 {
                        self.policy.algorithms.retain(|a| a != alg);
                    }
                } else {
                    self.policy.algorithms = self
                        .full
                        .algorithms
                        .iter()
                        .copied()
                        .filter(|a| a == alg || self.policy.algorithms.contains(a))
                        .collect();
                }
            }
            Op::Crash {
                crash,
                ask,
                recover,
            } => {
                crashed = true;
                let action = self.action(ask);
                match crash {
                    Crash::SaveFails => {
                        self.faulty.set(Fault::SaveFails);
                        ran.push(self.reconcile_a(action).await);
                    }
                    Crash::SaveLandsButFails => {
                        self.faulty.set(Fault::SaveLandsButFails);
                        ran.push(self.reconcile_a(action).await);
                    }
                    Crash::Dropped => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        self.faulty.set(Fault::Hang(tx));
                        let policy = self.policy.clone();
                        let future = self.a.reconcile(&policy, action.as_ref());
                        tokio::select! {
                            biased;
                            result = future => {
                                ran.push(Ran { who: "A (not dropped)", action, result });
                            }
                            _ = rx => {}
                        }
                    }
                }
                self.faulty.set(Fault::None);
                if *recover {
                    ran.push(self.reconcile_a(None).await);
                }
            }
            Op::Race(ask) => {
                let action = self.action(ask);
                self.faulty
                    .set(Fault::Race(self.b.clone(), Box::new(self.policy.clone())));
                let mine = self.reconcile_a(action).await;
                self.faulty.set(Fault::None);
                if let Some(result) = self.faulty.raced.lock().unwrap().take() {
                    ran.push(Ran {
                        who: "B (raced)",
                        action: None,
                        result,
                    });
                }
                if let (
                    Some(Ran {
                        result: Ok(theirs), ..
                    }),
                    Ok(outcome),
                ) = (ran.last(), &mine.result)
                {
                    if !theirs.committed.is_empty() && outcome.conflicts == 0 {
                        self.fail("A saved over B's write without a conflict");
                    }
                }
                ran.push(mine);
            }
        }
        let unchanged_expected = matches!(
            op,
            Op::Crash {
                crash: Crash::SaveFails | Crash::Dropped,
                recover: false,
                ..
            }
        );
        if unchanged_expected {
            let version = self.inner.load("default").await.unwrap().map(|s| s.version);
            if version != self.prev.version {
                self.fail("a reconcile that crashed before its save changed the store");
            }
        }
        self.check(op, ran, crashed).await;
    }

    async fn reconcile_a(&self, action: Option<Action>) -> Ran {
        let result = self.a.reconcile(&self.policy, action.as_ref()).await;
        Ran {
            who: "A",
            action,
            result,
        }
    }

    // ---- the checks --------------------------------------------------------------

    async fn check(&mut self, op: &Op, ran: Vec<Ran>, crashed: bool) {
        let now = self.now();
        let lead = self.lead;
        let raced = matches!(op, Op::Race(_));
        let snapshot = match self.reader.load("default").await {
            Ok(s) => s,
            Err(e) => self.fail(&format!("the stored document does not load: {e}")),
        };
        self.after = Some(snapshot.doc.clone());
        let changed = snapshot.version != self.prev.version;
        let doc = &snapshot.doc;

        // What each reconcile returned.
        let last_ok = ran.iter().rposition(|r| r.result.is_ok());
        for (i, r) in ran.iter().enumerate() {
            let shown = format!("{:?}", r.result);
            if shown.contains(FAKE_PEM_PREFIX) {
                self.fail(&format!(
                    "I4: {} reconcile result shows key material",
                    r.who
                ));
            }
            match &r.result {
                Ok(outcome) => {
                    self.check_outcome(r, outcome, now);
                    if Some(i) == last_ok
                        && (outcome.snapshot.version != snapshot.version
                            || outcome.snapshot.doc != *doc)
                    {
                        self.fail(&format!(
                            "{}: the outcome's document is not the one the store holds",
                            r.who
                        ));
                    }
                    if Some(i) == last_ok && outcome.snapshot.jwks != snapshot.jwks {
                        self.fail(&format!(
                            "{}: the outcome's JWKs differ from the stored keys'",
                            r.who
                        ));
                    }
                }
                Err(e) => self.check_error(r, e, crashed, raced, doc),
            }
        }

        // Audit records added in this step.
        let new_records = self.new_records(&self.prev.doc.audit, &doc.audit);
        let landed = ran
            .iter()
            .filter(|r| r.result.as_ref().is_ok_and(|o| !o.plan.steps.is_empty()))
            .count();
        if changed && landed == 0 && !crashed && !raced {
            let results: Vec<_> = ran
                .iter()
                .map(|r| {
                    (
                        r.who,
                        r.result
                            .as_ref()
                            .map(|o| o.plan.steps.len())
                            .map_err(|e| e.to_string()),
                    )
                })
                .collect();
            self.fail(&format!(
                "the document changed ({:?} -> {:?}) without a reconcile that saved something: {results:?}",
                self.prev.version, snapshot.version
            ));
        }
        if changed {
            self.reconciled_algs = Some(self.policy.algorithms.clone());
        }
        let actions: Vec<&Action> = ran.iter().filter_map(|r| r.action.as_ref()).collect();
        for r in &new_records {
            stat(format!("record {:?} {:?}", r.event, r.trigger));
        }
        for r in &ran {
            match &r.result {
                Ok(o) if o.conflicts > 0 => {
                    stat(format!("{} ok after {} conflict(s)", r.who, o.conflicts))
                }
                Ok(_) => stat(format!("{} ok", r.who)),
                Err(e) => stat(format!(
                    "{} error {}",
                    r.who,
                    e.to_string()
                        .split(':')
                        .next_back()
                        .unwrap_or("")
                        .trim()
                        .chars()
                        .take(40)
                        .collect::<String>()
                )),
            }
        }
        if crashed && changed {
            stat("crash step that changed the store");
        }
        self.check_records(&new_records, &actions, now);

        // I1: every configured slot has exactly one active and one next key;
        // a slot no longer configured has neither once reconciled.
        if let Some(algs) = &self.reconciled_algs {
            for alg in Alg::ALL {
                let count = |state| {
                    doc.keys
                        .iter()
                        .filter(|k| k.alg == alg && k.state == state)
                        .count()
                };
                let want = usize::from(algs.contains(&alg));
                // A slot added to an already published keyset pre-publishes
                // its first key: no active key until a reconcile after
                // publish_lead (checked after every reconcile below).
                let first_key_waiting =
                    want == 1 && count(KeyState::Active) == 0 && count(KeyState::Next) == 1;
                if first_key_waiting {
                    continue;
                }
                if count(KeyState::Active) != want || count(KeyState::Next) != want {
                    self.fail(&format!(
                        "I1: {alg} has {} active and {} next keys (configured at the last reconcile: {})",
                        count(KeyState::Active),
                        count(KeyState::Next),
                        want == 1
                    ));
                }
            }
        }

        // I2 and I4: the JWKS as published.
        let jwks = keyroll::publish::render(doc, &snapshot.jwks, true, 300);
        let body = std::str::from_utf8(&jwks.body).unwrap();
        if body.contains(FAKE_PEM_PREFIX) {
            self.fail("I4: the JWKS contains private key material");
        }
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
        let mut published = BTreeSet::new();
        for key in parsed["keys"].as_array().unwrap() {
            for member in ["d", "p", "q", "dp", "dq", "qi", "k", "oth"] {
                if key.get(member).is_some() {
                    self.fail(&format!(
                        "I4: a published JWK has the private member {member:?}"
                    ));
                }
            }
            published.insert(key["kid"].as_str().unwrap().to_string());
        }
        // Revoked keys are gone for good.
        self.revoked.extend(
            new_records
                .iter()
                .filter(|r| r.event == AuditEvent::Revoked)
                .map(|r| r.kid.clone()),
        );
        if let Some(kid) = published.iter().find(|kid| self.revoked.contains(*kid)) {
            self.fail(&format!("I2: revoked key {kid} is published"));
        }
        let in_doc: BTreeSet<String> = doc.keys.iter().map(|k| k.kid.clone()).collect();
        if published != in_doc {
            self.fail(&format!(
                "the JWKS {published:?} is not the stored keys {in_doc:?}"
            ));
        }
        for key in &doc.keys {
            let must = match key.state {
                KeyState::Active | KeyState::Next => true,
                KeyState::Retired => key.remove_at.is_some_and(|at| at > now),
            };
            if must && !published.contains(&key.kid) {
                self.fail(&format!(
                    "I2: {} key {} is not in the JWKS",
                    key.state, key.kid
                ));
            }
        }

        // I5: nothing disappears before remove_at except by revoke, and
        // keys only move forward through their states.
        let revoked_now: BTreeSet<&str> = new_records
            .iter()
            .filter(|r| r.event == AuditEvent::Revoked)
            .map(|r| r.kid.as_str())
            .collect();
        for before in &self.prev.doc.keys {
            match doc.keys.iter().find(|k| k.kid == before.kid) {
                None => {
                    let removable = before.state == KeyState::Retired
                        && before.remove_at.is_some_and(|at| at <= now);
                    if !removable && !revoked_now.contains(before.kid.as_str()) {
                        self.fail(&format!(
                            "I5: {} key {} (remove_at {:?}) vanished without being revoked",
                            before.state, before.kid, before.remove_at
                        ));
                    }
                    if revoked_now.contains(before.kid.as_str())
                        && !actions
                            .iter()
                            .any(|a| matches!(a, Action::Revoke { kid, .. } if *kid == before.kid))
                    {
                        self.fail(&format!(
                            "key {} was revoked though nobody asked",
                            before.kid
                        ));
                    }
                }
                Some(after) => {
                    let forward = matches!(
                        (before.state, after.state),
                        (a, b) if a == b
                    ) || matches!(
                        (before.state, after.state),
                        (KeyState::Next, KeyState::Active)
                            | (KeyState::Active, KeyState::Retired)
                            | (KeyState::Next, KeyState::Retired)
                    );
                    if !forward {
                        self.fail(&format!(
                            "key {} went from {} to {}",
                            before.kid, before.state, after.state
                        ));
                    }
                    let fixed = |a: Option<Timestamp>, b: Option<Timestamp>| a.is_none() || a == b;
                    if before.created_at != after.created_at
                        || before.published_at != after.published_at
                        || !fixed(before.activated_at, after.activated_at)
                        || !fixed(before.retired_at, after.retired_at)
                        || !fixed(before.remove_at, after.remove_at)
                    {
                        self.fail(&format!("key {} had a timestamp rewritten", before.kid));
                    }
                }
            }
        }

        // I3 over the whole audit trail the document keeps.
        for r in &doc.audit {
            // A first key activated later than it was made was pre-published
            // (a slot added to a published keyset): it waited publish_lead too.
            let prepublished_first_key =
                r.trigger == Trigger::Bootstrap && r.key.published_at != Some(r.at);
            if r.event == AuditEvent::Activated
                && (matches!(r.trigger, Trigger::Schedule | Trigger::Manual)
                    || prepublished_first_key)
            {
                let published = r
                    .key
                    .published_at
                    .unwrap_or_else(|| self.fail("audit without published_at"));
                if r.at < published + lead || r.key.activated_at != Some(r.at) {
                    self.fail(&format!(
                        "I3: {} activated at {} ({:?}) but published at {published}, publish_lead {lead}",
                        r.kid, r.at, r.trigger
                    ));
                }
            }
        }

        self.after = None;
        self.prev = snapshot;
    }

    fn new_records(&self, before: &[AuditRecord], after: &[AuditRecord]) -> Vec<AuditRecord> {
        let Some(last) = before.last() else {
            return after.to_vec();
        };
        match after.iter().rposition(|r| r == last) {
            Some(i) => after[i + 1..].to_vec(),
            None => self.fail(
                "the audit trail lost records it had before (or more than its limit were added)",
            ),
        }
    }

    fn check_outcome(&self, r: &Ran, outcome: &Outcome, now: Timestamp) {
        // At most one rotation per slot per reconcile, however long the gap.
        for alg in Alg::ALL {
            let activations = outcome
                .committed
                .iter()
                .filter(|c| c.alg == alg && c.event == AuditEvent::Activated)
                .count();
            if activations > 1 {
                self.fail(&format!(
                    "{}: {activations} activations of {alg} in one reconcile",
                    r.who
                ));
            }
        }
        for c in &outcome.committed {
            if c.at != now {
                self.fail(&format!(
                    "{}: a transition recorded at {} instead of now",
                    r.who, c.at
                ));
            }
        }
        // The reconcile finished its work: planning again now does nothing,
        // and (checked independently of the planner) no due, safe rotation
        // and no expired key is left over.
        let doc = &outcome.snapshot.doc;
        let again = planner::plan(now, doc, &self.policy, None).unwrap();
        if !again.steps.is_empty() {
            self.fail(&format!(
                "{}: reconcile left work undone: {:?}",
                r.who, again.steps
            ));
        }
        for alg in &self.policy.algorithms {
            let (Some(active), Some(next)) = (
                doc.key(*alg, KeyState::Active),
                doc.key(*alg, KeyState::Next),
            ) else {
                if self.first_key_waiting(doc, *alg, now) {
                    continue;
                }
                self.fail(&format!(
                    "{}: {alg} not bootstrapped after a reconcile",
                    r.who
                ));
            };
            let ready = next.published_at + self.lead <= now;
            let scheduled = self
                .policy
                .schedule
                .next_after(active.activated_at.unwrap())
                .is_some_and(|due| due <= now);
            let requested = doc.pending_rotations.get(alg).is_some_and(|at| *at <= now);
            if ready && (scheduled || requested) {
                self.fail(&format!(
                    "{}: {alg} is due (scheduled {scheduled}, requested {requested}) and safe but did not rotate",
                    r.who
                ));
            }
        }
        // `status` and the daemon's wake-up: each slot rotates at
        // max(due, published_at + publish_lead), where due is the first
        // tick after the activation or a waiting request; planning wakes at
        // the first such instant or removal.
        let mut first_event: Option<Timestamp> = None;
        let mut consider = |t: Timestamp| first_event = Some(first_event.map_or(t, |f| f.min(t)));
        for alg in &self.policy.algorithms {
            if self.first_key_waiting(doc, *alg, now) {
                let next = doc.key(*alg, KeyState::Next).unwrap();
                let ready = next.published_at + self.lead;
                let outlook = again.outlook.iter().find(|o| o.alg == *alg);
                if outlook.map(|o| (o.next_rotation, o.waiting_for.is_some()))
                    != Some((Some(ready), true))
                {
                    self.fail(&format!(
                        "{}: outlook for the waiting first {alg} key is {outlook:?}, expected {ready}",
                        r.who
                    ));
                }
                consider(ready);
                continue;
            }
            let active = doc.key(*alg, KeyState::Active).unwrap();
            let next = doc.key(*alg, KeyState::Next).unwrap();
            let scheduled = self
                .policy
                .schedule
                .next_after(active.activated_at.unwrap());
            let due = match (scheduled, doc.pending_rotations.get(alg).copied()) {
                (Some(s), Some(r)) => Some(s.min(r)),
                (s, r) => s.or(r),
            };
            let ready = next.published_at + self.lead;
            let expected = due.map(|due| due.max(ready));
            let outlook = again
                .outlook
                .iter()
                .find(|o| o.alg == *alg)
                .unwrap_or_else(|| self.fail(&format!("no outlook for {alg}")));
            if outlook.next_rotation != expected {
                self.fail(&format!(
                    "{}: outlook says {alg} rotates at {:?}, expected {expected:?}",
                    r.who, outlook.next_rotation
                ));
            }
            if due.is_none_or(|due| ready > due) != outlook.waiting_for.is_some() {
                self.fail(&format!(
                    "{}: outlook for {alg} is wrong about waiting: {outlook:?}",
                    r.who
                ));
            }
            if let Some(t) = expected {
                consider(t);
            }
        }
        for key in &doc.keys {
            if let Some(at) = key.remove_at {
                consider(at);
            }
        }
        // The daemon sleeps until the executed plan's wake_at and shows its
        // outlook: they must be as good as planning afresh.
        let sorted = |o: &[planner::SlotOutlook]| {
            let mut o = o.to_vec();
            o.sort_by_key(|s| s.alg);
            o
        };
        if sorted(&outcome.plan.outlook) != sorted(&again.outlook) {
            self.fail(&format!(
                "{}: the executed plan's outlook {:?} differs from a fresh plan's {:?}",
                r.who, outcome.plan.outlook, again.outlook
            ));
        }
        match (outcome.plan.wake_at, first_event) {
            (_, None) => {}
            (Some(wake), Some(first)) if wake <= first => {}
            (wake, first) => self.fail(&format!(
                "{}: the daemon would sleep until {wake:?}, past the next event at {first:?}",
                r.who
            )),
        }
        if again.wake_at != first_event {
            self.fail(&format!(
                "{}: wake_at {:?}, but the first thing to happen is at {first_event:?}",
                r.who, again.wake_at
            ));
        }
        for key in &doc.keys {
            if key.state == KeyState::Retired && key.remove_at.is_none_or(|at| at <= now) {
                self.fail(&format!(
                    "{}: retired key {} outlived its remove_at",
                    r.who, key.kid
                ));
            }
            if !self.policy.algorithms.contains(&key.alg) && key.state != KeyState::Retired {
                self.fail(&format!(
                    "{}: key {} of an unconfigured alg is {}",
                    r.who, key.kid, key.state
                ));
            }
        }
    }

    fn check_error(
        &self,
        r: &Ran,
        e: &ReconcileError,
        crashed: bool,
        raced: bool,
        doc: &KeysetDoc,
    ) {
        if format!("{e} {e:?}").contains(FAKE_PEM_PREFIX) {
            self.fail("I4: an error shows key material");
        }
        match (e, &r.action) {
            (
                ReconcileError::Plan(PlanError::AlgNotConfigured { alg, .. }),
                Some(Action::Rotate { alg: Some(a), .. }),
            ) if alg == a && !self.policy.algorithms.contains(a) => {}
            (
                ReconcileError::Plan(PlanError::UnknownKid { kid, .. }),
                Some(Action::Revoke { kid: k, .. }),
            ) if kid == k
                && !doc.keys.iter().any(|key| key.kid == *kid)
                && (raced || !self.prev.doc.keys.iter().any(|key| key.kid == *kid)) => {}
            (ReconcileError::Store(StoreError::Unavailable { .. }), _) if crashed => {}
            _ => self.fail(&format!(
                "{}: unexpected error for {:?}: {e}",
                r.who, r.action
            )),
        }
    }

    /// The transitions of this step, checked against what was asked.
    fn check_records(&self, records: &[AuditRecord], actions: &[&Action], now: Timestamp) {
        let forced = |alg: Alg| {
            actions
                .iter()
                .any(|a| matches!(a, Action::Rotate { force: true, alg: x } if x.is_none_or(|x| x == alg)))
        };
        let rotate_asked = |alg: Alg| {
            actions
                .iter()
                .any(|a| matches!(a, Action::Rotate { alg: x, .. } if x.is_none_or(|x| x == alg)))
        };
        let revoke_asked = || actions.iter().any(|a| matches!(a, Action::Revoke { .. }));
        for r in records {
            let ok = match (r.event, r.trigger) {
                (AuditEvent::Created, Trigger::Bootstrap | Trigger::Replenish) => true,
                (AuditEvent::Created, Trigger::Revoke) => revoke_asked(),
                // At once in a new keyset; after publish_lead (checked as
                // I3) for a slot added to a published one.
                (AuditEvent::Activated, Trigger::Bootstrap) => true,
                (AuditEvent::Activated, Trigger::Schedule) => {
                    // Never before the schedule: the key it replaced had been
                    // active since `activated_at`, and the due instant is the
                    // first tick after that.
                    let replaced = records.iter().find(|x| {
                        x.event == AuditEvent::Retired
                            && x.alg == r.alg
                            && x.at == r.at
                            && x.trigger == Trigger::Schedule
                    });
                    match replaced.and_then(|x| x.key.activated_at) {
                        Some(since) => self
                            .policy
                            .schedule
                            .next_after(since)
                            .is_some_and(|due| due <= r.at),
                        None => false,
                    }
                }
                (AuditEvent::Activated, Trigger::Manual) => {
                    rotate_asked(r.alg) || self.prev.doc.pending_rotations.contains_key(&r.alg)
                }
                (AuditEvent::Activated, Trigger::Forced) => forced(r.alg),
                (AuditEvent::Activated, Trigger::Revoke) => revoke_asked(),
                (AuditEvent::Retired, Trigger::Schedule | Trigger::Manual | Trigger::Forced) => {
                    true
                }
                (AuditEvent::Retired, Trigger::ConfigRemoved) => {
                    !self.policy.algorithms.contains(&r.alg)
                }
                (AuditEvent::Removed, Trigger::GraceEnded) => {
                    r.key.remove_at.is_some_and(|at| at <= r.at)
                }
                (AuditEvent::Revoked, Trigger::Revoke) => actions
                    .iter()
                    .any(|a| matches!(a, Action::Revoke { kid, .. } if *kid == r.kid)),
                _ => false,
            };
            if !ok {
                self.fail(&format!(
                    "an unexplained transition: {r:?} (actions {actions:?})"
                ));
            }
            if r.at > now {
                self.fail(&format!("a transition in the future: {r:?}"));
            }
        }
    }
}

/// Runs one generated case on its own runtime.
fn run_case(p: &Params, ops: &[Op]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut world = World::new(p);
        for (i, op) in ops.iter().enumerate() {
            world.step = i;
            world.run(op).await;
        }
        // However the sequence ended, one more daemon reconcile settles it.
        world.step = ops.len();
        world.run(&Op::Run(Ask::Daemon)).await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_across_random_histories(
        p in params(),
        ops in prop::collection::vec(op(), 30..=60),
    ) {
        run_case(&p, &ops);
        stat("cases");
        print_stats();
    }
}

/// A fixed history that exercises every kind of step once, so a broken
/// harness cannot make the property test pass vacuously.
#[test]
fn a_scripted_history_touches_every_kind_of_step() {
    let p = Params {
        jwks_cache_ttl: "5m",
        propagation: "1m",
        token_ttl: "1h",
        clock_skew: "1m",
        sched: Sched::Every(30),
    };
    let ops = vec![
        Op::Run(Ask::Daemon),
        Op::Small(100),
        Op::Run(Ask::Rotate {
            alg: None,
            force: false,
        }),
        Op::Run(Ask::Rotate {
            alg: Some(Alg::ES256),
            force: true,
        }),
        Op::ToWake(0),
        Op::Run(Ask::Daemon),
        Op::Large(1000),
        Op::Race(Ask::Daemon),
        Op::Large(1000),
        Op::Race(Ask::Rotate {
            alg: None,
            force: true,
        }),
        Op::Run(Ask::Revoke(Target::Active, 0)),
        Op::Run(Ask::Revoke(Target::Next, 1)),
        Op::Run(Ask::Revoke(Target::Retired, 0)),
        Op::Run(Ask::RevokeUnknown),
        Op::Toggle(Alg::RS256),
        Op::Run(Ask::Daemon),
        Op::Toggle(Alg::RS256),
        Op::Large(1500),
        Op::Crash {
            crash: Crash::SaveFails,
            ask: Ask::Daemon,
            recover: true,
        },
        Op::Large(1500),
        Op::Crash {
            crash: Crash::Dropped,
            ask: Ask::Daemon,
            recover: false,
        },
        Op::Large(1500),
        Op::Crash {
            crash: Crash::SaveLandsButFails,
            ask: Ask::Daemon,
            recover: true,
        },
        Op::Outage(10),
        Op::ToWake(-1),
        Op::ToWake(1),
        Op::Run(Ask::Daemon),
    ];
    run_case(&p, &ops);
}

/// After a long outage each slot rotates once, and the race and crash
/// machinery really conflict and really fail.
#[test]
fn the_fault_injection_really_bites() {
    let p = Params {
        jwks_cache_ttl: "5m",
        propagation: "1m",
        token_ttl: "1h",
        clock_skew: "1m",
        sched: Sched::Every(10),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut w = World::new(&p);
        w.run(&Op::Run(Ask::Daemon)).await;
        let v0 = w.prev.version.clone();

        // A crash before the save: nothing lands.
        w.clock.advance(w.period_hint);
        w.faulty.set(Fault::SaveFails);
        let err = w.a.reconcile(&w.policy, None).await.unwrap_err();
        assert!(
            matches!(err, ReconcileError::Store(StoreError::Unavailable { .. })),
            "{err}"
        );
        assert_eq!(
            w.inner.load("default").await.unwrap().unwrap().version,
            v0.clone().unwrap()
        );

        // A race: B lands first, A conflicts, re-plans and finds nothing to do.
        w.faulty
            .set(Fault::Race(w.b.clone(), Box::new(w.policy.clone())));
        let outcome = w.a.reconcile(&w.policy, None).await.unwrap();
        let raced = w.faulty.raced.lock().unwrap().take().unwrap().unwrap();
        assert_eq!(
            raced
                .committed
                .iter()
                .filter(|r| r.event == AuditEvent::Activated)
                .count(),
            2
        );
        assert_eq!(outcome.conflicts, 1);
        assert!(outcome.committed.is_empty());
        assert_eq!(outcome.snapshot.version, raced.snapshot.version);
        w.faulty.set(Fault::None);
        let ran = vec![
            Ran {
                who: "B",
                action: None,
                result: Ok(raced),
            },
            Ran {
                who: "A",
                action: None,
                result: Ok(outcome),
            },
        ];
        w.check(&Op::Race(Ask::Daemon), ran, false).await;

        // A dropped reconcile leaves the store as it was.
        w.clock.advance(w.period_hint);
        let before = w.inner.load("default").await.unwrap().unwrap().version;
        let (tx, rx) = tokio::sync::oneshot::channel();
        w.faulty.set(Fault::Hang(tx));
        let policy = w.policy.clone();
        tokio::select! {
            biased;
            _ = w.a.reconcile(&policy, None) => panic!("the hanging save returned"),
            _ = rx => {}
        }
        assert_eq!(
            w.inner.load("default").await.unwrap().unwrap().version,
            before
        );
        w.faulty.set(Fault::None);

        // Ten periods later: one rotation per slot.
        w.clock.advance(w.period_hint * 10);
        let outcome = w.a.reconcile(&w.policy, None).await.unwrap();
        for alg in Alg::ALL {
            let n = outcome
                .committed
                .iter()
                .filter(|r| r.alg == alg && r.event == AuditEvent::Activated)
                .count();
            assert_eq!(n, 1, "{alg}");
        }
    });
}
