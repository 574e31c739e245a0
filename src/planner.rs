//! The pure heart of keyroll: `(now, stored keyset, policy, manual action)`
//! → the transitions to make and when to look again. No clock, disk,
//! network or randomness: new keys are handed to [`apply`] by the caller.
//!
//! Timing follows RFC 7583 pre-publication (SPEC §1): a `next` key is
//! activated at `max(due, published_at + publish_lead)`; a retired key stays
//! published until `retired_at + retire_grace`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::config::KeysetPolicy;
use crate::document::{AuditEvent, AuditRecord, KeyState, KeysetDoc, StoredKey, Trigger};
use crate::key::{Alg, NewKey};

/// A manual action from the CLI, planned like everything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `rotate [--alg ALG] [--now]`: `force` skips the `publish_lead` wait.
    Rotate { alg: Option<Alg>, force: bool },
    /// `revoke KID`: gone from the JWKS and the store at once.
    Revoke { kid: String, reason: String },
}

/// One transition. Steps name existing keys by kid; new keys are `Create`d.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Create {
        alg: Alg,
        state: KeyState,
        trigger: Trigger,
    },
    Activate {
        kid: String,
        trigger: Trigger,
    },
    Retire {
        kid: String,
        trigger: Trigger,
    },
    Remove {
        kid: String,
    },
    Revoke {
        kid: String,
        reason: String,
    },
    /// Remember a `rotate` that must wait for `publish_lead`.
    RequestRotation {
        alg: Alg,
    },
    ClearRequest {
        alg: Alg,
    },
}

/// What a slot is waiting for; shown by `status` and the systemd STATUS=.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotOutlook {
    pub alg: Alg,
    /// When the `next` key will be activated (`None`: the schedule never fires).
    pub next_rotation: Option<Timestamp>,
    /// Why it is later than the schedule says, if it is.
    pub waiting_for: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub now: Timestamp,
    pub steps: Vec<Step>,
    /// The earliest instant at which planning again may do something.
    pub wake_at: Option<Timestamp>,
    pub outlook: Vec<SlotOutlook>,
    /// Said to the operator (e.g. `rotate --now` before `publish_lead`).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("keyset {keyset:?} has no key with kid {kid:?}")]
    UnknownKid { keyset: String, kid: String },
    #[error("keyset {keyset:?} has no {alg} slot (its algorithms are {configured})")]
    AlgNotConfigured {
        keyset: String,
        alg: Alg,
        configured: String,
    },
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    // Durations come from a validated config and are far below chrono's
    // range; saturate rather than panic on absurd inputs.
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// Builds the plan. Never fails for the daemon (`action == None`).
pub fn plan(
    now: Timestamp,
    doc: &KeysetDoc,
    policy: &KeysetPolicy,
    action: Option<&Action>,
) -> Result<Plan, PlanError> {
    let mut planner = Planner {
        now,
        doc,
        policy,
        steps: Vec::new(),
        wake: Vec::new(),
        outlook: Vec::new(),
        warnings: Vec::new(),
        settled: BTreeSet::new(),
        requested_now: BTreeSet::new(),
        gone: BTreeSet::new(),
    };
    match action {
        Some(Action::Revoke { kid, reason }) => planner.revoke(kid, reason)?,
        Some(Action::Rotate { alg, force }) => planner.manual_rotate(*alg, *force)?,
        None => {}
    }
    for &alg in &policy.algorithms {
        if !planner.settled.contains(&alg) {
            planner.slot(alg);
        }
    }
    planner.unconfigured();
    planner.expire_retired();
    let wake_at = planner.wake.iter().copied().filter(|t| *t > now).min();
    Ok(Plan {
        now,
        steps: planner.steps,
        wake_at,
        outlook: planner.outlook,
        warnings: planner.warnings,
    })
}

struct Planner<'a> {
    now: Timestamp,
    doc: &'a KeysetDoc,
    policy: &'a KeysetPolicy,
    steps: Vec<Step>,
    wake: Vec<Timestamp>,
    outlook: Vec<SlotOutlook>,
    warnings: Vec<String>,
    /// Slots a manual action already rotated in this plan.
    settled: BTreeSet<Alg>,
    /// Slots whose `rotate` request this plan records.
    requested_now: BTreeSet<Alg>,
    /// Kids this plan revokes.
    gone: BTreeSet<String>,
}

impl Planner<'_> {
    fn publish_lead(&self) -> Duration {
        self.policy.timings.publish_lead()
    }

    fn ready_at(&self, next: &StoredKey) -> Timestamp {
        after(next.published_at, self.publish_lead())
    }

    fn configured(&self, alg: Alg) -> bool {
        self.policy.algorithms.contains(&alg)
    }

    /// The `next` key becomes active, the active one retires, a new `next`
    /// is made: one rotation.
    fn rotate(&mut self, active: &StoredKey, next: &StoredKey, trigger: Trigger) {
        let alg = next.alg;
        self.steps.push(Step::Activate {
            kid: next.kid.clone(),
            trigger,
        });
        self.steps.push(Step::Retire {
            kid: active.kid.clone(),
            trigger,
        });
        self.replenish(alg);
        self.wake
            .push(after(self.now, self.policy.timings.retire_grace()));
        self.outlook_after_rotation(alg);
    }

    /// A new `next` key after the old one was activated; any waiting
    /// `rotate` request is thereby done.
    fn replenish(&mut self, alg: Alg) {
        self.steps.push(Step::Create {
            alg,
            state: KeyState::Next,
            trigger: Trigger::Replenish,
        });
        if self.doc.pending_rotations.contains_key(&alg) {
            self.steps.push(Step::ClearRequest { alg });
        }
    }

    /// After a rotation the new `next` key is published now; it can be
    /// activated at the next scheduled instant, but not before `publish_lead`.
    fn outlook_after_rotation(&mut self, alg: Alg) {
        let due = self.policy.schedule.next_after(self.now);
        self.push_outlook(alg, due, self.now);
    }

    /// Records when `alg` rotates next: at the scheduled `due`, but never
    /// before the `next` key published at `next_published` is `publish_lead` old.
    fn push_outlook(&mut self, alg: Alg, due: Option<Timestamp>, next_published: Timestamp) {
        let ready = after(next_published, self.publish_lead());
        let (next_rotation, waiting_for) = match due {
            None => (None, Some("the schedule never fires again".to_string())),
            Some(due) if ready > due => (
                Some(ready),
                Some(format!(
                    "due {}, but the next key was published at {} and is activated only after publish_lead ({})",
                    crate::clock::rfc3339(due),
                    crate::clock::rfc3339(next_published),
                    humantime::format_duration(self.publish_lead())
                )),
            ),
            Some(due) => (Some(due), None),
        };
        if let Some(at) = next_rotation {
            self.wake.push(at);
        }
        self.outlook.push(SlotOutlook {
            alg,
            next_rotation,
            waiting_for,
        });
    }

    fn revoke(&mut self, kid: &str, reason: &str) -> Result<(), PlanError> {
        let key =
            self.doc
                .keys
                .iter()
                .find(|k| k.kid == kid)
                .ok_or_else(|| PlanError::UnknownKid {
                    keyset: self.doc.keyset.clone(),
                    kid: kid.to_string(),
                })?;
        self.steps.push(Step::Revoke {
            kid: kid.to_string(),
            reason: reason.to_string(),
        });
        self.gone.insert(kid.to_string());
        let alg = key.alg;
        if !self.configured(alg) {
            return Ok(());
        }
        match key.state {
            KeyState::Active => {
                // The next key is already published, so verifiers know it:
                // it can sign at once (SPEC §1, revoke).
                match self.doc.key(alg, KeyState::Next) {
                    Some(next) => self.steps.push(Step::Activate {
                        kid: next.kid.clone(),
                        trigger: Trigger::Revoke,
                    }),
                    None => self.steps.push(Step::Create {
                        alg,
                        state: KeyState::Active,
                        trigger: Trigger::Revoke,
                    }),
                }
                self.replenish(alg);
                self.settled.insert(alg);
                self.outlook_after_rotation(alg);
            }
            KeyState::Next => {
                self.steps.push(Step::Create {
                    alg,
                    state: KeyState::Next,
                    trigger: Trigger::Replenish,
                });
                self.settled.insert(alg);
                match self.doc.key(alg, KeyState::Active) {
                    Some(active) => {
                        let due = self.scheduled_due(alg, active);
                        self.push_outlook(alg, due, self.now);
                    }
                    // The revoked key was a new slot's waiting first key.
                    None => self.push_first_key_outlook(alg, self.now),
                }
            }
            KeyState::Retired => {}
        }
        Ok(())
    }

    fn manual_rotate(&mut self, alg: Option<Alg>, force: bool) -> Result<(), PlanError> {
        let targets = match alg {
            Some(alg) if !self.configured(alg) => {
                let configured: Vec<&str> =
                    self.policy.algorithms.iter().map(|a| a.as_str()).collect();
                return Err(PlanError::AlgNotConfigured {
                    keyset: self.doc.keyset.clone(),
                    alg,
                    configured: configured.join(", "),
                });
            }
            Some(alg) => vec![alg],
            None => self.policy.algorithms.clone(),
        };
        for alg in targets {
            let (active, next) = (
                self.doc.key(alg, KeyState::Active),
                self.doc.key(alg, KeyState::Next),
            );
            let (Some(active), Some(next)) = (active, next) else {
                if let (None, Some(next), true) = (active, next, force) {
                    // A first key still waiting for publish_lead, forced.
                    self.steps.push(Step::Activate {
                        kid: next.kid.clone(),
                        trigger: Trigger::Forced,
                    });
                    self.replenish(alg);
                    self.settled.insert(alg);
                    self.outlook_after_rotation(alg);
                }
                // Otherwise not bootstrapped yet: bootstrapping (below) is
                // the rotation.
                continue;
            };
            let ready = self.ready_at(next);
            if force && self.now < ready {
                self.warnings.push(format!(
                    "{alg}: key {} was published only at {} (publish_lead {} not yet passed): \
                     verifiers holding a cached JWKS may reject its tokens for up to jwks_cache_ttl ({})",
                    next.kid,
                    crate::clock::rfc3339(next.published_at),
                    humantime::format_duration(self.publish_lead()),
                    humantime::format_duration(self.policy.timings.jwks_cache_ttl),
                ));
            }
            if force || self.now >= ready {
                let trigger = if force {
                    Trigger::Forced
                } else {
                    Trigger::Manual
                };
                self.rotate(active, next, trigger);
                self.settled.insert(alg);
            } else if !self.doc.pending_rotations.contains_key(&alg) {
                self.steps.push(Step::RequestRotation { alg });
                self.requested_now.insert(alg);
            }
        }
        Ok(())
    }

    /// When the schedule (or a waiting `rotate` request) wants this slot to
    /// rotate. Anchored on the active key's activation, so a daemon that was
    /// down for many ticks rotates once, not once per missed tick.
    fn scheduled_due(&self, alg: Alg, active: &StoredKey) -> Option<Timestamp> {
        let anchor = active.activated_at.unwrap_or(active.published_at);
        let scheduled = self.policy.schedule.next_after(anchor);
        let requested = if self.requested_now.contains(&alg) {
            Some(self.now)
        } else {
            self.doc.pending_rotations.get(&alg).copied()
        };
        match (scheduled, requested) {
            (Some(s), Some(r)) => Some(s.min(r)),
            (s, r) => s.or(r),
        }
    }

    /// The daemon's view of one configured slot.
    fn slot(&mut self, alg: Alg) {
        let active = self.doc.key(alg, KeyState::Active);
        let next = self.doc.key(alg, KeyState::Next);
        match (active, next) {
            (None, None) if self.keyset_unpublished() => {
                // Nobody can have cached anything for this keyset: the first
                // key is active at once (SPEC §1, bootstrap).
                for state in [KeyState::Active, KeyState::Next] {
                    self.steps.push(Step::Create {
                        alg,
                        state,
                        trigger: Trigger::Bootstrap,
                    });
                }
                self.outlook_after_rotation(alg);
            }
            (None, None) => {
                // A new algorithm in a keyset whose JWKS verifiers already
                // cache: a key active at once would sign tokens they reject
                // for up to jwks_cache_ttl. Its first key is pre-published
                // like any other and activated after publish_lead.
                self.steps.push(Step::Create {
                    alg,
                    state: KeyState::Next,
                    trigger: Trigger::Bootstrap,
                });
                self.push_first_key_outlook(alg, self.now);
            }
            (None, Some(next)) if self.now >= self.ready_at(next) => {
                self.steps.push(Step::Activate {
                    kid: next.kid.clone(),
                    trigger: Trigger::Bootstrap,
                });
                self.replenish(alg);
                self.outlook_after_rotation(alg);
            }
            (None, Some(next)) => self.push_first_key_outlook(alg, next.published_at),
            (Some(active), None) => {
                self.steps.push(Step::Create {
                    alg,
                    state: KeyState::Next,
                    trigger: Trigger::Replenish,
                });
                let due = self.scheduled_due(alg, active);
                self.push_outlook(alg, due, self.now);
            }
            (Some(active), Some(next)) => {
                let due = self.scheduled_due(alg, active);
                let ready = self.ready_at(next);
                match due {
                    Some(due) if self.now >= due.max(ready) => {
                        let requested = self.requested_now.contains(&alg)
                            || self.doc.pending_rotations.contains_key(&alg);
                        let scheduled = self
                            .policy
                            .schedule
                            .next_after(active.activated_at.unwrap_or(active.published_at));
                        let trigger = match scheduled {
                            Some(s) if requested && s > self.now => Trigger::Manual,
                            _ => Trigger::Schedule,
                        };
                        self.rotate(active, next, trigger);
                    }
                    _ => self.push_outlook(alg, due, next.published_at),
                }
            }
        }
    }

    /// Whether no verifier can have seen this keyset yet: it holds no key
    /// (other than ones this plan revokes).
    fn keyset_unpublished(&self) -> bool {
        self.doc.keys.iter().all(|key| self.gone.contains(&key.kid))
    }

    /// A slot whose first key waits for `publish_lead` before it signs.
    fn push_first_key_outlook(&mut self, alg: Alg, published: Timestamp) {
        let ready = after(published, self.publish_lead());
        self.wake.push(ready);
        self.outlook.push(SlotOutlook {
            alg,
            next_rotation: Some(ready),
            waiting_for: Some(format!(
                "new algorithm in an already published keyset: its first key, published at {}, becomes active after publish_lead ({}) so that cached JWKS learn it first",
                crate::clock::rfc3339(published),
                humantime::format_duration(self.publish_lead())
            )),
        });
    }

    /// Keys of algorithms no longer configured retire now, and go after
    /// their grace period like any retired key (SPEC §1).
    fn unconfigured(&mut self) {
        for key in &self.doc.keys {
            if !self.configured(key.alg)
                && key.state != KeyState::Retired
                && !self.gone.contains(&key.kid)
            {
                self.steps.push(Step::Retire {
                    kid: key.kid.clone(),
                    trigger: Trigger::ConfigRemoved,
                });
                self.wake
                    .push(after(self.now, self.policy.timings.retire_grace()));
            }
        }
        for alg in self.doc.pending_rotations.keys() {
            if !self.configured(*alg) {
                self.steps.push(Step::ClearRequest { alg: *alg });
            }
        }
    }

    fn expire_retired(&mut self) {
        for key in &self.doc.keys {
            if key.state != KeyState::Retired || self.gone.contains(&key.kid) {
                continue;
            }
            // A retired key always has remove_at (checked when parsed).
            let remove_at = key.remove_at.unwrap_or(self.now);
            if self.now >= remove_at {
                self.steps.push(Step::Remove {
                    kid: key.kid.clone(),
                });
            } else {
                self.wake.push(remove_at);
            }
        }
    }
}

/// Carries out a plan on a document. `new_key` supplies one freshly made key
/// per `Create` step, in order. Returns the audit records it added.
pub fn apply<E>(
    doc: &mut KeysetDoc,
    plan: &Plan,
    policy: &KeysetPolicy,
    new_key: &mut dyn FnMut(Alg) -> Result<NewKey, E>,
) -> Result<Vec<AuditRecord>, E> {
    let now = plan.now;
    let grace = policy.timings.retire_grace();
    let mut records = Vec::new();
    let mut record = |doc: &mut KeysetDoc, key: &StoredKey, event, trigger, reason: &str| {
        let entry = AuditRecord {
            at: now,
            event,
            kid: key.kid.clone(),
            alg: key.alg,
            trigger,
            reason: reason.to_string(),
            key: key.times(),
        };
        doc.push_audit(entry.clone());
        records.push(entry);
    };
    for step in &plan.steps {
        match step {
            Step::Create {
                alg,
                state,
                trigger,
            } => {
                let fresh = new_key(*alg)?;
                let key = StoredKey {
                    kid: fresh.kid,
                    alg: *alg,
                    state: *state,
                    created_at: now,
                    published_at: now,
                    activated_at: (*state == KeyState::Active).then_some(now),
                    retired_at: None,
                    remove_at: None,
                    certificate: fresh.certificate,
                    private_key_pem: fresh.private_key_pem,
                };
                record(doc, &key, AuditEvent::Created, *trigger, "");
                if *state == KeyState::Active {
                    record(doc, &key, AuditEvent::Activated, *trigger, "");
                }
                doc.keys.push(key);
            }
            Step::Activate { kid, trigger } => {
                if let Some(key) = doc.keys.iter_mut().find(|k| &k.kid == kid) {
                    key.state = KeyState::Active;
                    key.activated_at = Some(now);
                    let key = key.clone();
                    record(doc, &key, AuditEvent::Activated, *trigger, "");
                }
            }
            Step::Retire { kid, trigger } => {
                if let Some(key) = doc.keys.iter_mut().find(|k| &k.kid == kid) {
                    key.state = KeyState::Retired;
                    key.retired_at = Some(now);
                    key.remove_at = Some(after(now, grace));
                    let key = key.clone();
                    record(doc, &key, AuditEvent::Retired, *trigger, "");
                }
            }
            Step::Remove { kid } => {
                if let Some(index) = doc.keys.iter().position(|k| &k.kid == kid) {
                    let key = doc.keys.remove(index);
                    record(doc, &key, AuditEvent::Removed, Trigger::GraceEnded, "");
                }
            }
            Step::Revoke { kid, reason } => {
                if let Some(index) = doc.keys.iter().position(|k| &k.kid == kid) {
                    let key = doc.keys.remove(index);
                    record(doc, &key, AuditEvent::Revoked, Trigger::Revoke, reason);
                }
            }
            Step::RequestRotation { alg } => {
                doc.pending_rotations.entry(*alg).or_insert(now);
            }
            Step::ClearRequest { alg } => {
                doc.pending_rotations.remove(alg);
            }
        }
    }
    Ok(records)
}

/// `keyroll plan`: the next lifecycle events, found by planning and applying
/// forward in time on a copy, with placeholder keys. Changes nothing.
pub fn upcoming(
    now: Timestamp,
    doc: &KeysetDoc,
    policy: &KeysetPolicy,
    per_slot: usize,
) -> Vec<AuditRecord> {
    let mut doc = doc.clone();
    let mut at = now;
    let mut events: Vec<AuditRecord> = Vec::new();
    let mut made = 0usize;
    let slots = policy.algorithms.len().max(1);
    // Every iteration makes at least one event or moves time forward to a
    // wake-up that makes one; the bound only guards against a bug.
    for _ in 0..(per_slot * slots * 8 + 16) {
        let Ok(plan) = plan(at, &doc, policy, None) else {
            break;
        };
        let mut placeholder = |alg: Alg| -> Result<NewKey, ()> {
            made += 1;
            Ok(NewKey {
                kid: format!("(new {alg} key {made})"),
                alg,
                private_key_pem: crate::key::SecretPem::new(Default::default()),
                certificate: String::new(),
            })
        };
        let Ok(records) = apply(&mut doc, &plan, policy, &mut placeholder) else {
            break;
        };
        events.extend(records);
        let enough = policy
            .algorithms
            .iter()
            .all(|alg| events.iter().filter(|e| e.alg == *alg).count() >= per_slot);
        match plan.wake_at {
            Some(next) if !enough => at = next,
            _ => break,
        }
    }
    let mut kept: Vec<AuditRecord> = Vec::new();
    for alg in Alg::ALL {
        kept.extend(
            events
                .iter()
                .filter(|e| e.alg == alg)
                .take(per_slot)
                .cloned(),
        );
    }
    kept.sort_by_key(|event| (event.at, event.alg));
    kept
}
