//! The pure heart of keyroll: `(now, stored keyset, policy, manual action)`
//! → the transitions to make and when to look again. No clock, disk,
//! network or randomness: new keys are handed to [`apply`] by the caller.
//!
//! Timing follows RFC 7583 pre-publication (SPEC §1): a `next` key is
//! activated at `max(due, ready_at)`, where `ready_at` is `published_at`
//! plus the longest `publish_lead` in effect since publication; a retired
//! key stays published until `remove_at`, which only ever grows.
//!
//! The plan is made of rules, each written once (the way BIND's keymgr
//! checks each RFC 7583 transition): [`Planner::slot`] decides one slot,
//! [`Planner::promote`] is the only rotation, [`Planner::upkeep`] keeps the
//! timings of C3, [`Planner::expire`] removes what has served its grace.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::config::KeysetPolicy;
use crate::document::{
    AuditEvent, AuditRecord, KeyState, KeyTimes, KeysetDoc, LossRecord, OrphanKey, StoredKey,
    Trigger,
};
use crate::key::{Alg, NewKey, PublicJwk};

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
    /// C3: the grace grew since the key retired; `remove_at` never shrinks.
    ExtendRemoval {
        kid: String,
        remove_at: Timestamp,
    },
    /// C3: the earliest activation of a `next` key, recorded so a later,
    /// shorter `publish_lead` cannot bring it forward.
    RecordReady {
        kid: String,
        ready_at: Timestamp,
    },
    /// C3: a longer `retire_grace` came into effect while this key signs;
    /// its tokens may live that long, whatever the grace is at retirement.
    RecordGrace {
        kid: String,
        seconds: u64,
    },
    /// C2: the document is gone but these public keys were published; they
    /// stay in the JWKS until their `remove_at`.
    AdoptOrphans {
        orphans: Vec<OrphanKey>,
    },
    RemoveOrphan {
        kid: String,
    },
    /// An operator acted on a keyset recovered after a loss (C2).
    ClearLoss,
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
    /// C6: how far the document's newest timestamp is ahead of `now`, when
    /// that is more than `clock_skew`. Removals are then held back.
    pub clock_behind: Option<chrono::Duration>,
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

/// What a keyset is known to have published, should its document be lost
/// (SPEC C2): the public keys, and the longest `retire_grace` their tokens
/// may need (a key keeps the longest grace in effect while it signed; the
/// lost document took that record with it).
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub keys: Vec<PublicJwk>,
    pub longest_grace: Duration,
}

/// Builds the plan. Never fails for the daemon (`action == None`).
pub fn plan(
    now: Timestamp,
    doc: &KeysetDoc,
    policy: &KeysetPolicy,
    action: Option<&Action>,
) -> Result<Plan, PlanError> {
    plan_with(now, doc, policy, action, &Published::default())
}

/// Builds the plan; `published_before` are public keys this keyset is known
/// to have published (by this process, or in its `jwks_file`). They matter
/// only when the document is missing (SPEC C2): then they stay published
/// as orphans and no key is activated before `publish_lead`.
pub fn plan_with(
    now: Timestamp,
    doc: &KeysetDoc,
    policy: &KeysetPolicy,
    action: Option<&Action>,
    published_before: &Published,
) -> Result<Plan, PlanError> {
    let mut planner = Planner {
        now,
        doc,
        policy,
        steps: Vec::new(),
        wake: Vec::new(),
        outlook: Vec::new(),
        warnings: Vec::new(),
        forced: BTreeSet::new(),
        urgent: BTreeSet::new(),
        requested_now: BTreeSet::new(),
        gone: BTreeSet::new(),
        adopted: false,
        clock_behind: None,
    };
    planner.check_clock();
    planner.adopt_lost(published_before);
    match action {
        Some(Action::Revoke { kid, reason }) => planner.revoke(kid, reason)?,
        Some(Action::Rotate { alg, force }) => planner.manual_rotate(*alg, *force)?,
        None => {}
    }
    if action.is_some() && doc.lost.is_some() {
        planner.steps.push(Step::ClearLoss);
    }
    for &alg in &policy.algorithms {
        planner.slot(alg);
    }
    planner.unconfigured();
    planner.expire();
    planner.upkeep();
    let wake_at = planner.wake.iter().copied().filter(|t| *t > now).min();
    Ok(Plan {
        now,
        steps: planner.steps,
        wake_at,
        outlook: planner.outlook,
        warnings: planner.warnings,
        clock_behind: planner.clock_behind,
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
    /// Slots `rotate --now` activates whatever the lead says.
    forced: BTreeSet<Alg>,
    /// Slots whose active key this plan revokes: the next key signs at once.
    urgent: BTreeSet<Alg>,
    /// Slots whose `rotate` request this plan records.
    requested_now: BTreeSet<Alg>,
    /// Kids this plan revokes.
    gone: BTreeSet<String>,
    /// This plan adopts the keys of a lost document (C2).
    adopted: bool,
    clock_behind: Option<chrono::Duration>,
}

impl Planner<'_> {
    fn publish_lead(&self) -> Duration {
        self.policy.timings.publish_lead()
    }

    fn retire_grace(&self) -> Duration {
        self.policy.timings.retire_grace()
    }

    fn configured(&self, alg: Alg) -> bool {
        self.policy.algorithms.contains(&alg)
    }

    /// The key of `alg` in `state`, unless this plan revokes it.
    fn key(&self, alg: Alg, state: KeyState) -> Option<&StoredKey> {
        self.doc
            .key(alg, state)
            .filter(|key| !self.gone.contains(&key.kid))
    }

    /// When a `next` key may be activated: the longest lead in effect since
    /// its publication, never the current one alone (C3).
    fn ready_at(&self, next: &StoredKey) -> Timestamp {
        let now_lead = after(next.published_at, self.publish_lead());
        next.ready_at
            .map_or(now_lead, |stored| stored.max(now_lead))
    }

    /// The grace a key gets: the current one, or the longest in effect
    /// while it was active (C3).
    fn grace_of(&self, key: &StoredKey) -> Duration {
        let longest = Duration::from_secs(key.longest_grace_seconds.unwrap_or(0));
        self.retire_grace().max(longest)
    }

    /// When a retired key may go: `remove_at` only grows (C3).
    fn remove_at(&self, key: &StoredKey) -> Timestamp {
        let now_grace = key
            .retired_at
            .map(|retired| after(retired, self.grace_of(key)));
        // A retired key always has remove_at (checked when parsed).
        let stored = key.remove_at.unwrap_or(self.now);
        now_grace.map_or(stored, |grown| stored.max(grown))
    }

    /// When a key kept from a lost document may go: grows with the grace
    /// like a retired key's (C3).
    fn orphan_remove_at(&self, orphan: &OrphanKey) -> Timestamp {
        orphan
            .remove_at
            .max(after(orphan.retired_at, self.retire_grace()))
    }

    /// C6: a stored timestamp further ahead than `clock_skew` means this
    /// clock (or a writer's) is wrong; this replica then removes nothing.
    fn check_clock(&mut self) {
        let Some(newest) = self.doc.newest_timestamp() else {
            return;
        };
        let ahead = newest - self.now;
        let skew = chrono::Duration::from_std(self.policy.timings.clock_skew)
            .unwrap_or_else(|_| chrono::Duration::zero());
        if ahead > skew {
            self.clock_behind = Some(ahead);
            self.warnings.push(format!(
                "the stored document has a timestamp ({}) {} ahead of this clock, more than clock_skew ({}): \
                 this clock or another writer's is wrong; no key is removed from here until they agree",
                crate::clock::rfc3339(newest),
                humantime::format_duration(ahead.to_std().unwrap_or_default()),
                humantime::format_duration(self.policy.timings.clock_skew),
            ));
        }
    }

    /// C2: the document is missing, but verifiers were shown keys of this
    /// keyset. Those stay published for `retire_grace`; the keyset counts
    /// as published, so its new keys wait for `publish_lead`.
    fn adopt_lost(&mut self, published_before: &Published) {
        if published_before.keys.is_empty() || self.doc.ever_published() {
            return;
        }
        let grace = self.retire_grace().max(published_before.longest_grace);
        let remove_at = after(self.now, grace);
        let mut orphans: Vec<OrphanKey> = published_before
            .keys
            .iter()
            .map(|jwk| OrphanKey::from_public(jwk, self.now, remove_at))
            .collect();
        orphans.sort_by(|a, b| a.kid.cmp(&b.kid));
        orphans.dedup_by(|a, b| a.kid == b.kid);
        self.steps.push(Step::AdoptOrphans { orphans });
        self.wake.push(remove_at);
        self.adopted = true;
        self.warnings.push(format!(
            "the stored document of keyset {:?} is missing although its keys were published: \
             keeping the {} published key(s) in the JWKS until {}, publishing new keys as next \
             (active after publish_lead, {}); restore the document or accept with `keyroll rotate`",
            self.doc.keyset,
            published_before.keys.len(),
            crate::clock::rfc3339(remove_at),
            humantime::format_duration(self.publish_lead()),
        ));
    }

    fn revoke(&mut self, kid: &str, reason: &str) -> Result<(), PlanError> {
        let key_alg_state = self
            .doc
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .map(|k| (k.alg, Some(k.state)))
            .or_else(|| {
                self.doc
                    .orphans
                    .iter()
                    .find(|o| o.kid == kid)
                    .map(|o| (o.alg, None))
            });
        let Some((alg, state)) = key_alg_state else {
            return Err(PlanError::UnknownKid {
                keyset: self.doc.keyset.clone(),
                kid: kid.to_string(),
            });
        };
        self.steps.push(Step::Revoke {
            kid: kid.to_string(),
            reason: reason.to_string(),
        });
        self.gone.insert(kid.to_string());
        // The next key is already published, so verifiers know it: it
        // signs at once (SPEC §1 revoke, C4). The slot rule does the rest.
        if state == Some(KeyState::Active) && self.configured(alg) {
            self.urgent.insert(alg);
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
            if force {
                self.forced.insert(alg);
                continue;
            }
            let (Some(_), Some(next)) = (
                self.key(alg, KeyState::Active),
                self.key(alg, KeyState::Next),
            ) else {
                // Not bootstrapped yet: bootstrapping is the rotation.
                continue;
            };
            if self.now < self.ready_at(next) && !self.doc.pending_rotations.contains_key(&alg) {
                self.steps.push(Step::RequestRotation { alg });
            }
            self.requested_now.insert(alg);
        }
        Ok(())
    }

    /// When the schedule (or a waiting `rotate` request) wants this slot to
    /// rotate. Anchored on the active key's activation, so a daemon that was
    /// down for many ticks rotates once, not once per missed tick.
    fn scheduled_due(&self, alg: Alg, active: &StoredKey) -> (Option<Timestamp>, Trigger) {
        let anchor = active.activated_at.unwrap_or(active.published_at);
        let scheduled = self.policy.schedule.next_after(anchor);
        // A request already waiting keeps its instant: the plan saved with
        // it must read the same as this one.
        let requested = self
            .doc
            .pending_rotations
            .get(&alg)
            .copied()
            .or_else(|| self.requested_now.contains(&alg).then_some(self.now));
        match (scheduled, requested) {
            (Some(s), Some(r)) if r < s && s > self.now => (Some(r), Trigger::Manual),
            (Some(s), _) => (Some(s), Trigger::Schedule),
            (None, Some(r)) => (Some(r), Trigger::Manual),
            (None, None) => (None, Trigger::Schedule),
        }
    }

    /// The one decision for one configured slot.
    fn slot(&mut self, alg: Alg) {
        let active = self.key(alg, KeyState::Active).cloned();
        let next = self.key(alg, KeyState::Next).cloned();
        let forced = self.forced.contains(&alg);
        if self.urgent.contains(&alg) {
            self.replace_revoked(alg, next.as_ref());
            return;
        }
        match (active, next) {
            (None, None) if !self.adopted && !self.doc.ever_published() => {
                // Nobody can have cached anything for this keyset: the first
                // key is active at once (SPEC §1, bootstrap).
                for state in [KeyState::Active, KeyState::Next] {
                    self.steps.push(Step::Create {
                        alg,
                        state,
                        trigger: Trigger::Bootstrap,
                    });
                }
                self.outlook_after_promotion(alg);
            }
            (None, None) => {
                // A new slot in a keyset verifiers already cache (or one
                // whose document was lost): pre-published like any key.
                self.steps.push(Step::Create {
                    alg,
                    state: KeyState::Next,
                    trigger: Trigger::Bootstrap,
                });
                let ready = after(self.now, self.publish_lead());
                self.push_first_key_outlook(alg, ready);
            }
            (None, Some(next)) if forced || self.now >= self.ready_at(&next) => {
                let trigger = if forced {
                    Trigger::Forced
                } else {
                    Trigger::Bootstrap
                };
                self.promote(alg, None, &next, trigger);
            }
            (None, Some(next)) => {
                let ready = self.ready_at(&next);
                self.push_first_key_outlook(alg, ready);
            }
            (Some(active), None) => {
                self.steps.push(Step::Create {
                    alg,
                    state: KeyState::Next,
                    trigger: Trigger::Replenish,
                });
                let (due, _) = self.scheduled_due(alg, &active);
                self.push_outlook(alg, due, after(self.now, self.publish_lead()), self.now);
            }
            (Some(active), Some(next)) => {
                let (due, trigger) = self.scheduled_due(alg, &active);
                let ready = self.ready_at(&next);
                if forced {
                    self.promote(alg, Some(&active), &next, Trigger::Forced);
                } else if due.is_some_and(|due| self.now >= due.max(ready)) {
                    self.promote(alg, Some(&active), &next, trigger);
                } else {
                    self.push_outlook(alg, due, ready, next.published_at);
                }
            }
        }
    }

    /// The active key of `alg` is revoked: the `next` key, already
    /// published, signs at once; without one a new key must (SPEC §1, C4).
    fn replace_revoked(&mut self, alg: Alg, next: Option<&StoredKey>) {
        if let Some(next) = next {
            self.promote(alg, None, next, Trigger::Revoke);
            return;
        }
        self.warnings.push(format!(
            "{alg}: the revoked active key had no next key; a new key is active at once and \
             verifiers holding a cached JWKS may reject its tokens for up to verifier_cache_ttl ({})",
            humantime::format_duration(self.policy.timings.verifier_cache_ttl),
        ));
        self.steps.push(Step::Create {
            alg,
            state: KeyState::Active,
            trigger: Trigger::Revoke,
        });
        self.replenish(alg);
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
        self.outlook_after_promotion(alg);
    }

    /// The only rotation: `next` becomes active, the active key (if any)
    /// retires, and a new `next` key is made.
    fn promote(
        &mut self,
        alg: Alg,
        active: Option<&StoredKey>,
        next: &StoredKey,
        trigger: Trigger,
    ) {
        let ready = self.ready_at(next);
        if self.now < ready && matches!(trigger, Trigger::Forced | Trigger::Revoke) {
            let what = if trigger == Trigger::Forced {
                "rotate --now"
            } else {
                "revoking the active key"
            };
            self.warnings.push(format!(
                "{alg}: {what} activates key {} published only at {} (publish_lead {} passes at {}): \
                 verifiers holding a cached JWKS may reject its tokens for up to verifier_cache_ttl ({})",
                next.kid,
                crate::clock::rfc3339(next.published_at),
                humantime::format_duration(self.publish_lead()),
                crate::clock::rfc3339(ready),
                humantime::format_duration(self.policy.timings.verifier_cache_ttl),
            ));
        }
        self.steps.push(Step::Activate {
            kid: next.kid.clone(),
            trigger,
        });
        if let Some(active) = active {
            self.steps.push(Step::Retire {
                kid: active.kid.clone(),
                trigger,
            });
            self.wake.push(after(self.now, self.retire_grace()));
        }
        self.replenish(alg);
    }

    /// After a rotation the new `next` key is published now; it can be
    /// activated at the next scheduled instant, but not before `publish_lead`.
    fn outlook_after_promotion(&mut self, alg: Alg) {
        let due = self.policy.schedule.next_after(self.now);
        self.push_outlook(alg, due, after(self.now, self.publish_lead()), self.now);
    }

    /// Records when `alg` rotates next: at the scheduled `due`, but never
    /// before the `next` key is `ready`.
    fn push_outlook(
        &mut self,
        alg: Alg,
        due: Option<Timestamp>,
        ready: Timestamp,
        next_published: Timestamp,
    ) {
        let (next_rotation, waiting_for) = match due {
            None => (None, Some("the schedule never fires again".to_string())),
            Some(due) if ready > due => (
                Some(ready),
                Some(format!(
                    "due {}, but the next key was published at {} and is activated only at {} (publish_lead {})",
                    crate::clock::rfc3339(due),
                    crate::clock::rfc3339(next_published),
                    crate::clock::rfc3339(ready),
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

    /// A slot whose first key waits for `publish_lead` before it signs.
    fn push_first_key_outlook(&mut self, alg: Alg, ready: Timestamp) {
        self.wake.push(ready);
        let why = if self.adopted || self.doc.lost.is_some() {
            "the stored document was lost (SPEC C2)"
        } else {
            "new algorithm in an already published keyset"
        };
        self.outlook.push(SlotOutlook {
            alg,
            next_rotation: Some(ready),
            waiting_for: Some(format!(
                "{why}: its first key becomes active at {} after publish_lead ({}) so that cached JWKS learn it first",
                crate::clock::rfc3339(ready),
                humantime::format_duration(self.publish_lead())
            )),
        });
    }

    /// Keys of algorithms no longer configured (or of a keyset removed from
    /// the config) retire now, and go after their grace like any retired
    /// key (SPEC §1, C1).
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
                self.wake.push(after(self.now, self.retire_grace()));
            }
        }
        for alg in self.doc.pending_rotations.keys() {
            if !self.configured(*alg) {
                self.steps.push(Step::ClearRequest { alg: *alg });
            }
        }
    }

    /// Removes retired keys and orphans whose `remove_at` has passed, never
    /// from a replica whose clock is behind the document's (C6).
    fn expire(&mut self) {
        let mut due = Vec::new();
        for key in &self.doc.keys {
            if key.state == KeyState::Retired && !self.gone.contains(&key.kid) {
                due.push((
                    self.remove_at(key),
                    Step::Remove {
                        kid: key.kid.clone(),
                    },
                ));
            }
        }
        for orphan in &self.doc.orphans {
            if !self.gone.contains(&orphan.kid) {
                due.push((
                    self.orphan_remove_at(orphan),
                    Step::RemoveOrphan {
                        kid: orphan.kid.clone(),
                    },
                ));
            }
        }
        for (remove_at, step) in due {
            if self.now < remove_at {
                self.wake.push(remove_at);
            } else if self.clock_behind.is_none() {
                self.steps.push(step);
            }
        }
    }

    /// C3: `remove_at` grows with the grace, and `ready_at` with the lead.
    /// Keys from a schema 1 document get their `ready_at` written along
    /// with the next real change, never by a write of their own.
    fn upkeep(&mut self) {
        let mut upkeep = Vec::new();
        let mut legacy = Vec::new();
        let changing: BTreeSet<&str> = self
            .steps
            .iter()
            .filter_map(|step| match step {
                Step::Activate { kid, .. }
                | Step::Retire { kid, .. }
                | Step::Remove { kid }
                | Step::RemoveOrphan { kid }
                | Step::Revoke { kid, .. } => Some(kid.as_str()),
                _ => None,
            })
            .collect();
        for key in &self.doc.keys {
            if changing.contains(key.kid.as_str()) {
                continue;
            }
            match key.state {
                KeyState::Retired => {
                    let grown = self.remove_at(key);
                    if Some(grown) != key.remove_at {
                        upkeep.push(Step::ExtendRemoval {
                            kid: key.kid.clone(),
                            remove_at: grown,
                        });
                    }
                }
                KeyState::Next => {
                    let ready = self.ready_at(key);
                    match key.ready_at {
                        Some(stored) if stored >= ready => {}
                        Some(_) => upkeep.push(Step::RecordReady {
                            kid: key.kid.clone(),
                            ready_at: ready,
                        }),
                        None => legacy.push(Step::RecordReady {
                            kid: key.kid.clone(),
                            ready_at: ready,
                        }),
                    }
                }
                KeyState::Active => {
                    let grace = self.retire_grace().as_secs();
                    let step = Step::RecordGrace {
                        kid: key.kid.clone(),
                        seconds: grace,
                    };
                    match key.longest_grace_seconds {
                        Some(stored) if stored >= grace => {}
                        Some(_) => upkeep.push(step),
                        None => legacy.push(step),
                    }
                }
            }
        }
        for orphan in &self.doc.orphans {
            let grown = self.orphan_remove_at(orphan);
            if grown != orphan.remove_at && !changing.contains(orphan.kid.as_str()) {
                upkeep.push(Step::ExtendRemoval {
                    kid: orphan.kid.clone(),
                    remove_at: grown,
                });
            }
        }
        let real_change = !self.steps.is_empty() || !upkeep.is_empty();
        self.steps.extend(upkeep);
        if real_change {
            self.steps.extend(legacy);
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
    let lead = policy.timings.publish_lead();
    let mut records = Vec::new();
    let mut note = |doc: &mut KeysetDoc,
                    (kid, alg, times): (&str, Alg, KeyTimes),
                    event,
                    trigger,
                    reason: &str| {
        let entry = AuditRecord {
            at: now,
            event,
            kid: kid.to_string(),
            alg,
            trigger,
            reason: reason.to_string(),
            key: times,
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
                    ready_at: (*state == KeyState::Next).then(|| after(now, lead)),
                    longest_grace_seconds: (*state == KeyState::Active).then_some(grace.as_secs()),
                    certificate: fresh.certificate,
                    private_key_pem: fresh.private_key_pem,
                };
                note(doc, key.identity(), AuditEvent::Created, *trigger, "");
                if *state == KeyState::Active {
                    note(doc, key.identity(), AuditEvent::Activated, *trigger, "");
                }
                doc.keys.push(key);
            }
            Step::Activate { kid, trigger } => {
                if let Some(key) = doc.keys.iter_mut().find(|k| &k.kid == kid) {
                    key.state = KeyState::Active;
                    key.activated_at = Some(now);
                    key.longest_grace_seconds = Some(grace.as_secs());
                    let key = key.clone();
                    note(doc, key.identity(), AuditEvent::Activated, *trigger, "");
                }
            }
            Step::Retire { kid, trigger } => {
                if let Some(key) = doc.keys.iter_mut().find(|k| &k.kid == kid) {
                    key.state = KeyState::Retired;
                    key.retired_at = Some(now);
                    let longest = Duration::from_secs(key.longest_grace_seconds.unwrap_or(0));
                    key.remove_at = Some(after(now, grace.max(longest)));
                    let key = key.clone();
                    note(doc, key.identity(), AuditEvent::Retired, *trigger, "");
                }
            }
            Step::Remove { kid } => {
                if let Some(index) = doc.keys.iter().position(|k| &k.kid == kid) {
                    let key = doc.keys.remove(index);
                    note(
                        doc,
                        key.identity(),
                        AuditEvent::Removed,
                        Trigger::GraceEnded,
                        "",
                    );
                }
            }
            Step::Revoke { kid, reason } => {
                if let Some(index) = doc.keys.iter().position(|k| &k.kid == kid) {
                    let key = doc.keys.remove(index);
                    note(
                        doc,
                        key.identity(),
                        AuditEvent::Revoked,
                        Trigger::Revoke,
                        reason,
                    );
                } else if let Some(index) = doc.orphans.iter().position(|o| &o.kid == kid) {
                    let orphan = doc.orphans.remove(index);
                    note(
                        doc,
                        orphan.identity(),
                        AuditEvent::Revoked,
                        Trigger::Revoke,
                        reason,
                    );
                }
            }
            Step::RequestRotation { alg } => {
                doc.pending_rotations.entry(*alg).or_insert(now);
            }
            Step::ClearRequest { alg } => {
                doc.pending_rotations.remove(alg);
            }
            Step::ExtendRemoval { kid, remove_at } => {
                if let Some(key) = doc.keys.iter_mut().find(|k| &k.kid == kid) {
                    key.remove_at = key.remove_at.max(Some(*remove_at));
                } else if let Some(orphan) = doc.orphans.iter_mut().find(|o| &o.kid == kid) {
                    orphan.remove_at = orphan.remove_at.max(*remove_at);
                }
            }
            Step::RecordGrace { kid, seconds } => {
                if let Some(key) = doc.keys.iter_mut().find(|k| &k.kid == kid) {
                    key.longest_grace_seconds = key.longest_grace_seconds.max(Some(*seconds));
                }
            }
            Step::RecordReady { kid, ready_at } => {
                if let Some(key) = doc.keys.iter_mut().find(|k| &k.kid == kid) {
                    key.ready_at = key.ready_at.max(Some(*ready_at));
                }
            }
            Step::AdoptOrphans { orphans } => {
                for orphan in orphans {
                    note(
                        doc,
                        orphan.identity(),
                        AuditEvent::Retired,
                        Trigger::DocumentLost,
                        "published before the stored document went missing",
                    );
                }
                doc.orphans.extend(orphans.iter().cloned());
                doc.lost = Some(LossRecord {
                    detected_at: now,
                    orphaned_keys: orphans.len(),
                });
            }
            Step::RemoveOrphan { kid } => {
                if let Some(index) = doc.orphans.iter().position(|o| &o.kid == kid) {
                    let orphan = doc.orphans.remove(index);
                    note(
                        doc,
                        orphan.identity(),
                        AuditEvent::Removed,
                        Trigger::GraceEnded,
                        "",
                    );
                }
            }
            Step::ClearLoss => doc.lost = None,
        }
    }
    Ok(records)
}

/// SPEC C5: what a replica cut off from the store publishes at `now`,
/// having last loaded `doc` at `since`. It follows the plan it has, exactly
/// as the others do: each transition happens at its own instant (a key
/// retired at a scheduled rotation is removed `retire_grace` after that
/// rotation, not after `now`). It never creates keys (only a saved document
/// may hold new ones), so a slot keeps no `next` key once it has been
/// promoted here.
pub fn project(
    now: Timestamp,
    since: Timestamp,
    doc: &KeysetDoc,
    policy: &KeysetPolicy,
) -> KeysetDoc {
    let mut projected = doc.clone();
    let mut late = BTreeSet::new();
    let mut at = since.min(now);
    // Each round moves to a later wake-up or stops; the bound only guards
    // against a bug.
    for _ in 0..64 {
        let Ok(mut plan) = plan(at, &projected, policy, None) else {
            break;
        };
        // Before `now`, only what the schedule and the stored timestamps
        // decide; a config change (an algorithm or keyset removed, a longer
        // grace) takes effect now, not at the last load.
        let final_round = at >= now;
        plan.steps.retain(|step| match step {
            Step::Activate { trigger, .. } | Step::Retire { trigger, .. } => {
                final_round
                    || matches!(
                        trigger,
                        Trigger::Schedule | Trigger::Manual | Trigger::Bootstrap
                    )
            }
            Step::Remove { .. } | Step::RemoveOrphan { .. } => true,
            Step::ExtendRemoval { .. } | Step::RecordGrace { .. } => final_round,
            _ => false,
        });
        let mut no_new_keys = |alg: Alg| -> Result<NewKey, Alg> { Err(alg) };
        // No `Create` step is left, so no key is asked for.
        let _ = apply(&mut projected, &plan, policy, &mut no_new_keys);
        // The others retired these keys at their own pass, a little after
        // the scheduled instant: their remove_at is a little later. Err on
        // the safe side by `propagation`, the bound on that lag.
        for key in &mut projected.keys {
            let retired_here = key.state == KeyState::Retired
                && doc
                    .keys
                    .iter()
                    .any(|old| old.kid == key.kid && old.state != KeyState::Retired)
                && !late.contains(&key.kid);
            if retired_here {
                key.remove_at = key
                    .remove_at
                    .map(|at| after(at, policy.timings.propagation));
                late.insert(key.kid.clone());
            }
        }
        match plan.wake_at {
            Some(next) if next <= now => at = next,
            _ if at < now => at = now,
            _ => break,
        }
    }
    projected
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
