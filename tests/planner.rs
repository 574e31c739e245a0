//! Example-based tests of the pure planner (SPEC §1): explicit instants, no
//! real time, fake keys.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use keyroll::clock::Timestamp;
use keyroll::config::KeysetPolicy;
use keyroll::document::{AuditEvent, AuditRecord, KeyState, KeysetDoc, StoredKey, Trigger};
use keyroll::key::{Alg, KeyFactory};
use keyroll::planner::{self, Action, Plan, PlanError, Step};
use support::{dur, secs, t0, FakeKeys, PolicyText};

const DAY: i64 = 86_400;

/// A keyset document and the policy it is planned under.
struct World {
    doc: KeysetDoc,
    policy: KeysetPolicy,
    keys: FakeKeys,
}

impl World {
    fn new(policy: KeysetPolicy) -> Self {
        World {
            doc: KeysetDoc::new(&policy.name),
            policy,
            keys: FakeKeys::new(),
        }
    }

    /// Bootstrapped at `t0()`.
    fn bootstrapped(policy: KeysetPolicy) -> Self {
        let mut world = World::new(policy);
        let plan = world.run(t0(), None);
        assert!(!plan.steps.is_empty());
        world
    }

    fn plan(&self, now: Timestamp, action: Option<&Action>) -> Result<Plan, PlanError> {
        planner::plan(now, &self.doc, &self.policy, action)
    }

    /// Plans and applies; returns the plan.
    fn run(&mut self, now: Timestamp, action: Option<&Action>) -> Plan {
        self.run_with_records(now, action).0
    }

    fn run_with_records(
        &mut self,
        now: Timestamp,
        action: Option<&Action>,
    ) -> (Plan, Vec<AuditRecord>) {
        let plan = self.plan(now, action).expect("plan");
        let keys = &self.keys;
        let records = planner::apply(&mut self.doc, &plan, &self.policy, &mut |alg| {
            keys.generate(alg, 2048, "default", now)
        })
        .expect("apply");
        (plan, records)
    }

    fn key(&self, alg: Alg, state: KeyState) -> &StoredKey {
        self.doc
            .key(alg, state)
            .unwrap_or_else(|| panic!("no {state} {alg} key in {:#?}", self.doc.keys))
    }

    fn kid(&self, alg: Alg, state: KeyState) -> String {
        self.key(alg, state).kid.clone()
    }

    fn count(&self, alg: Alg, state: KeyState) -> usize {
        self.doc
            .keys
            .iter()
            .filter(|k| k.alg == alg && k.state == state)
            .count()
    }

    fn find(&self, kid: &str) -> Option<&StoredKey> {
        self.doc.keys.iter().find(|k| k.kid == kid)
    }
}

fn es256_only() -> KeysetPolicy {
    PolicyText {
        algorithms: r#"["ES256"]"#,
        ..PolicyText::default()
    }
    .build()
}

fn lead(policy: &KeysetPolicy) -> chrono::Duration {
    dur(policy.timings.publish_lead())
}

fn grace(policy: &KeysetPolicy) -> chrono::Duration {
    dur(policy.timings.retire_grace())
}

fn activations(plan: &Plan) -> Vec<(&str, Trigger)> {
    plan.steps
        .iter()
        .filter_map(|s| match s {
            Step::Activate { kid, trigger } => Some((kid.as_str(), *trigger)),
            _ => None,
        })
        .collect()
}

fn outlook(plan: &Plan, alg: Alg) -> &planner::SlotOutlook {
    plan.outlook
        .iter()
        .find(|o| o.alg == alg)
        .unwrap_or_else(|| panic!("no outlook for {alg}: {:?}", plan.outlook))
}

/// The scheduled rotation of one slot: activate next, retire active, new next.
fn rotation_steps(active: &str, next: &str, alg: Alg, trigger: Trigger) -> Vec<Step> {
    vec![
        Step::Activate {
            kid: next.to_string(),
            trigger,
        },
        Step::Retire {
            kid: active.to_string(),
            trigger,
        },
        Step::Create {
            alg,
            state: KeyState::Next,
            trigger: Trigger::Replenish,
        },
    ]
}

// ---- bootstrap and the schedule --------------------------------------------

#[test]
fn bootstrap_makes_an_active_and_a_next_key_per_slot_at_once() {
    let mut w = World::new(support::policy());
    let plan = w.plan(t0(), None).unwrap();
    for alg in [Alg::ES256, Alg::RS256] {
        let creates: Vec<_> = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Create { alg: a, .. } if *a == alg))
            .collect();
        assert_eq!(
            creates,
            vec![
                &Step::Create {
                    alg,
                    state: KeyState::Active,
                    trigger: Trigger::Bootstrap
                },
                &Step::Create {
                    alg,
                    state: KeyState::Next,
                    trigger: Trigger::Bootstrap
                },
            ]
        );
    }
    assert_eq!(plan.steps.len(), 4, "{:?}", plan.steps);

    let (plan, records) = w.run_with_records(t0(), None);
    for alg in [Alg::ES256, Alg::RS256] {
        assert_eq!(w.count(alg, KeyState::Active), 1);
        assert_eq!(w.count(alg, KeyState::Next), 1);
        let active = w.key(alg, KeyState::Active);
        assert_eq!(active.activated_at, Some(t0()), "active at once");
        assert_eq!(active.published_at, t0());
        let next = w.key(alg, KeyState::Next);
        assert_eq!(next.published_at, t0());
        assert_eq!(next.activated_at, None);
        assert!(records.iter().any(|r| r.event == AuditEvent::Activated
            && r.kid == active.kid
            && r.trigger == Trigger::Bootstrap));
        // The first rotation is one period away.
        assert_eq!(outlook(&plan, alg).next_rotation, Some(t0() + secs(DAY)));
        assert_eq!(outlook(&plan, alg).waiting_for, None);
    }
    assert_eq!(plan.wake_at, Some(t0() + secs(DAY)));
    // Bootstrapping is done: planning again at the same instant does nothing.
    assert!(w.plan(t0(), None).unwrap().steps.is_empty());
}

#[test]
fn nothing_rotates_before_the_schedule_is_due() {
    let w = World::bootstrapped(support::policy());
    for at in [t0() + secs(1), t0() + secs(3600), t0() + secs(DAY - 1)] {
        let plan = w.plan(at, None).unwrap();
        assert!(plan.steps.is_empty(), "at {at}: {:?}", plan.steps);
        assert_eq!(plan.wake_at, Some(t0() + secs(DAY)));
    }
}

#[test]
fn rotation_happens_exactly_at_the_scheduled_instant() {
    let mut w = World::bootstrapped(support::policy());
    let due = t0() + secs(DAY);
    let before: Vec<_> = [Alg::ES256, Alg::RS256]
        .iter()
        .map(|&alg| {
            (
                alg,
                w.kid(alg, KeyState::Active),
                w.kid(alg, KeyState::Next),
            )
        })
        .collect();
    let plan = w.run(due, None);
    for (alg, active, next) in before {
        let slot_steps: Vec<Step> = plan
            .steps
            .iter()
            .filter(|s| match s {
                Step::Activate { kid, .. } | Step::Retire { kid, .. } => {
                    *kid == active || *kid == next
                }
                Step::Create { alg: a, .. } => *a == alg,
                _ => false,
            })
            .cloned()
            .collect();
        assert_eq!(
            slot_steps,
            rotation_steps(&active, &next, alg, Trigger::Schedule)
        );
        assert_eq!(w.kid(alg, KeyState::Active), next);
        assert_eq!(w.key(alg, KeyState::Active).activated_at, Some(due));
        let retired = w.find(&active).unwrap();
        assert_eq!(retired.state, KeyState::Retired);
        assert_eq!(retired.retired_at, Some(due));
        assert_eq!(retired.remove_at, Some(due + grace(&w.policy)));
        let new_next = w.key(alg, KeyState::Next);
        assert_eq!(new_next.published_at, due);
        assert_eq!(outlook(&plan, alg).next_rotation, Some(due + secs(DAY)));
    }
    // The first thing to happen next is the removal of the retired keys.
    assert_eq!(plan.wake_at, Some(due + grace(&w.policy)));
}

#[test]
fn rotation_waits_for_publish_lead_and_the_outlook_says_why() {
    let mut w = World::bootstrapped(es256_only());
    let due = t0() + secs(DAY);
    // The next key is replaced (revoked) 2 minutes before the rotation is due:
    // the new one was published only then.
    let old_next = w.kid(Alg::ES256, KeyState::Next);
    let published = due - secs(120);
    w.run(
        published,
        Some(&Action::Revoke {
            kid: old_next,
            reason: "test".into(),
        }),
    );
    let next = w.kid(Alg::ES256, KeyState::Next);
    let ready = published + lead(&w.policy);
    assert!(ready > due);

    let plan = w.plan(due, None).unwrap();
    assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    let o = outlook(&plan, Alg::ES256);
    assert_eq!(o.next_rotation, Some(ready));
    let why = o.waiting_for.as_deref().expect("waiting_for");
    assert!(why.contains("publish_lead"), "{why}");
    assert_eq!(plan.wake_at, Some(ready));

    assert!(w.plan(ready - secs(1), None).unwrap().steps.is_empty());
    let plan = w.run(ready, None);
    assert_eq!(activations(&plan), vec![(next.as_str(), Trigger::Schedule)]);
    assert_eq!(
        w.key(Alg::ES256, KeyState::Active).activated_at,
        Some(ready)
    );
}

#[test]
fn a_missed_schedule_rotates_once_and_the_next_is_a_full_period_later() {
    let mut w = World::bootstrapped(support::policy());
    // Down for ten periods and then some.
    let restart = t0() + secs(10 * DAY + 5 * 3600);
    let plan = w.run(restart, None);
    for alg in [Alg::ES256, Alg::RS256] {
        let n = plan
            .steps
            .iter()
            .filter(
                |s| matches!(s, Step::Create { alg: a, state: KeyState::Next, .. } if *a == alg),
            )
            .count();
        assert_eq!(n, 1, "one rotation for {alg}: {:?}", plan.steps);
        assert_eq!(w.count(alg, KeyState::Active), 1);
        assert_eq!(w.count(alg, KeyState::Next), 1);
        assert_eq!(w.count(alg, KeyState::Retired), 1);
        assert_eq!(outlook(&plan, alg).next_rotation, Some(restart + secs(DAY)));
    }
    assert_eq!(activations(&plan).len(), 2);
    // No catching up on the missed ticks.
    assert!(w.plan(restart, None).unwrap().steps.is_empty());
    assert!(activations(&w.plan(restart + secs(DAY - 1), None).unwrap()).is_empty());
    let plan = w.run(restart + secs(DAY), None);
    assert_eq!(activations(&plan).len(), 2);
}

#[test]
fn a_long_outage_also_removes_keys_whose_grace_ended() {
    let mut w = World::bootstrapped(es256_only());
    w.run(t0() + secs(DAY), None);
    let retired = w
        .doc
        .keys
        .iter()
        .find(|k| k.state == KeyState::Retired)
        .unwrap()
        .kid
        .clone();
    let plan = w.run(t0() + secs(20 * DAY), None);
    assert!(plan.steps.contains(&Step::Remove {
        kid: retired.clone()
    }));
    assert!(w.find(&retired).is_none());
    assert_eq!(
        w.count(Alg::ES256, KeyState::Retired),
        1,
        "the key retired just now stays"
    );
}

#[test]
fn a_retired_key_is_removed_at_remove_at_and_not_a_second_before() {
    let mut w = World::bootstrapped(es256_only());
    let old = w.kid(Alg::ES256, KeyState::Active);
    w.run(t0() + secs(DAY), None);
    let remove_at = w.find(&old).unwrap().remove_at.unwrap();
    assert_eq!(remove_at, t0() + secs(DAY) + grace(&w.policy));

    let plan = w.run(remove_at - secs(1), None);
    assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    assert_eq!(plan.wake_at, Some(remove_at));
    assert!(w.find(&old).is_some());

    let (plan, records) = w.run_with_records(remove_at, None);
    assert_eq!(plan.steps, vec![Step::Remove { kid: old.clone() }]);
    assert!(w.find(&old).is_none());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].event, AuditEvent::Removed);
    assert_eq!(records[0].trigger, Trigger::GraceEnded);
    assert_eq!(records[0].kid, old);
    // The audit record outlives the key.
    assert!(w
        .doc
        .audit
        .iter()
        .any(|r| r.kid == old && r.event == AuditEvent::Removed));
}

#[test]
fn publish_lead_and_retire_grace_follow_the_spec_formulas() {
    let policy = PolicyText {
        algorithms: r#"["ES256"]"#,
        schedule: r#"rotate_every = "2d""#.into(),
        token_ttl: "2h",
        jwks_cache_ttl: "10m",
        verifier_cache_ttl: Some("40m"),
        propagation: "3m",
        clock_skew: "30s",
    }
    .build();
    // publish_lead = verifier_cache_ttl + propagation
    assert_eq!(
        policy.timings.publish_lead(),
        Duration::from_secs(2400 + 180)
    );
    // retire_grace = token_ttl + clock_skew + propagation
    assert_eq!(
        policy.timings.retire_grace(),
        Duration::from_secs(7200 + 30 + 180)
    );

    let mut w = World::bootstrapped(policy);
    let first = w.kid(Alg::ES256, KeyState::Active);
    // A rotate request 1 minute after a rotation waits the full 43 minutes.
    let rotated = t0() + secs(2 * DAY);
    w.run(rotated, None);
    let plan = w.run(
        rotated + secs(60),
        Some(&Action::Rotate {
            alg: None,
            force: false,
        }),
    );
    assert_eq!(
        outlook(&plan, Alg::ES256).next_rotation,
        Some(rotated + secs(2580))
    );
    let retired = w.find(&first).unwrap();
    assert_eq!(retired.remove_at, Some(rotated + secs(7200 + 30 + 180)));
}

#[test]
fn propagation_defaults_to_twice_the_reconcile_interval_in_publish_lead() {
    let text = "reconcile_interval = \"20s\"\n[[keysets]]\nname = \"default\"\n";
    let config = keyroll::config::Config::parse(
        text,
        keyroll::config::ConfigSource::File("t.toml".into()),
        &keyroll::config::ParseContext {
            state_directory: None,
            now: t0(),
        },
    )
    .unwrap();
    let t = config.keysets[0].timings;
    // verifier_cache_ttl defaults to 1h (SPEC §1), not jwks_cache_ttl.
    assert_eq!(t.publish_lead(), Duration::from_secs(3600 + 40));
    assert_eq!(t.retire_grace(), Duration::from_secs(3600 + 60 + 40));
}

// ---- config changes ----------------------------------------------------------

#[test]
fn a_removed_algorithm_retires_now_and_is_removed_after_the_grace() {
    let mut w = World::bootstrapped(support::policy());
    let rs_active = w.kid(Alg::RS256, KeyState::Active);
    let rs_next = w.kid(Alg::RS256, KeyState::Next);
    let es_keys: Vec<StoredKey> = w
        .doc
        .keys
        .iter()
        .filter(|k| k.alg == Alg::ES256)
        .cloned()
        .collect();

    w.policy = es256_only();
    let changed = t0() + secs(3 * 3600);
    let plan = w.run(changed, None);
    assert_eq!(
        plan.steps,
        vec![
            Step::Retire {
                kid: rs_active.clone(),
                trigger: Trigger::ConfigRemoved
            },
            Step::Retire {
                kid: rs_next.clone(),
                trigger: Trigger::ConfigRemoved
            },
        ]
    );
    let remove_at = changed + grace(&w.policy);
    for kid in [&rs_active, &rs_next] {
        let key = w.find(kid).unwrap();
        assert_eq!(key.state, KeyState::Retired, "nothing vanishes abruptly");
        assert_eq!(key.retired_at, Some(changed));
        assert_eq!(key.remove_at, Some(remove_at));
    }
    let es_now: Vec<StoredKey> = w
        .doc
        .keys
        .iter()
        .filter(|k| k.alg == Alg::ES256)
        .cloned()
        .collect();
    assert_eq!(es_now, es_keys, "the other slot is untouched");
    assert_eq!(plan.wake_at, Some(remove_at));

    assert!(w.run(remove_at - secs(1), None).steps.is_empty());
    let plan = w.run(remove_at, None);
    assert_eq!(
        plan.steps,
        vec![
            Step::Remove {
                kid: rs_active.clone()
            },
            Step::Remove {
                kid: rs_next.clone()
            }
        ]
    );
    assert!(w.doc.keys.iter().all(|k| k.alg == Alg::ES256));
}

#[test]
fn a_re_added_algorithm_is_pre_published_before_it_signs() {
    // Verifiers already cache this keyset's JWKS, so the new slot's first key
    // is published as `next` and activated only after publish_lead (the
    // nearest safe reading of SPEC §1's bootstrap rule; see the README).
    let mut w = World::bootstrapped(support::policy());
    let full = w.policy.clone();
    w.policy = es256_only();
    w.run(t0() + secs(60), None);
    w.policy = full;
    let back = t0() + secs(120);
    let plan = w.run(back, None);
    assert_eq!(
        plan.steps,
        vec![Step::Create {
            alg: Alg::RS256,
            state: KeyState::Next,
            trigger: Trigger::Bootstrap
        }]
    );
    let lead = chrono::Duration::from_std(w.policy.timings.publish_lead()).unwrap();
    let outlook = plan.outlook.iter().find(|o| o.alg == Alg::RS256).unwrap();
    assert_eq!(outlook.next_rotation, Some(back + lead));
    assert!(outlook
        .waiting_for
        .as_deref()
        .unwrap()
        .contains("publish_lead"));
    assert_eq!(w.count(Alg::RS256, KeyState::Active), 0);
    assert_eq!(w.count(Alg::RS256, KeyState::Retired), 2);
    let first = w.kid(Alg::RS256, KeyState::Next);

    // One second early: still waiting.
    assert!(w.run(back + lead - secs(1), None).steps.is_empty());
    // At publish_lead: the first key signs, and a new next key appears.
    let plan = w.run(back + lead, None);
    assert_eq!(
        plan.steps[0],
        Step::Activate {
            kid: first.clone(),
            trigger: Trigger::Bootstrap
        }
    );
    assert_eq!(w.kid(Alg::RS256, KeyState::Active), first);
    assert_eq!(w.count(Alg::RS256, KeyState::Next), 1);
}

#[test]
fn a_brand_new_keyset_is_active_at_once() {
    let mut w = World::new(support::policy());
    let plan = w.run(t0(), None);
    assert_eq!(plan.steps.len(), 4, "{:?}", plan.steps);
    assert_eq!(w.count(Alg::ES256, KeyState::Active), 1);
    assert_eq!(w.count(Alg::RS256, KeyState::Active), 1);
}

// ---- manual rotate -------------------------------------------------------------

#[test]
fn manual_rotate_when_safe_activates_at_once() {
    let mut w = World::bootstrapped(support::policy());
    let at = t0() + secs(3600);
    let nexts: Vec<String> = [Alg::ES256, Alg::RS256]
        .iter()
        .map(|&a| w.kid(a, KeyState::Next))
        .collect();
    let plan = w.run(
        at,
        Some(&Action::Rotate {
            alg: None,
            force: false,
        }),
    );
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    assert_eq!(
        activations(&plan),
        vec![
            (nexts[0].as_str(), Trigger::Manual),
            (nexts[1].as_str(), Trigger::Manual)
        ]
    );
    for (alg, next) in [Alg::ES256, Alg::RS256].into_iter().zip(&nexts) {
        assert_eq!(&w.kid(alg, KeyState::Active), next);
        assert_eq!(w.key(alg, KeyState::Active).activated_at, Some(at));
        // The schedule restarts from the activation.
        assert_eq!(outlook(&plan, alg).next_rotation, Some(at + secs(DAY)));
    }
    assert!(activations(&w.plan(at + secs(DAY - 1), None).unwrap()).is_empty());
}

#[test]
fn manual_rotate_of_one_algorithm_leaves_the_other_alone() {
    let mut w = World::bootstrapped(support::policy());
    let rs = (
        w.kid(Alg::RS256, KeyState::Active),
        w.kid(Alg::RS256, KeyState::Next),
    );
    let plan = w.run(
        t0() + secs(3600),
        Some(&Action::Rotate {
            alg: Some(Alg::ES256),
            force: false,
        }),
    );
    assert_eq!(activations(&plan).len(), 1);
    assert_eq!(
        (
            w.kid(Alg::RS256, KeyState::Active),
            w.kid(Alg::RS256, KeyState::Next)
        ),
        rs
    );
}

#[test]
fn manual_rotate_before_publish_lead_is_remembered_and_done_when_safe() {
    let mut w = World::bootstrapped(es256_only());
    // A rotation at t0 + 1h makes a fresh next key.
    let rotated = t0() + secs(3600);
    w.run(
        rotated,
        Some(&Action::Rotate {
            alg: None,
            force: false,
        }),
    );
    let next = w.kid(Alg::ES256, KeyState::Next);
    let asked = rotated + secs(120);
    let rotate = Action::Rotate {
        alg: Some(Alg::ES256),
        force: false,
    };
    let plan = w.run(asked, Some(&rotate));
    assert_eq!(plan.steps, vec![Step::RequestRotation { alg: Alg::ES256 }]);
    assert!(activations(&plan).is_empty());
    assert_eq!(w.doc.pending_rotations.get(&Alg::ES256), Some(&asked));
    let ready = rotated + lead(&w.policy);
    let o = outlook(&plan, Alg::ES256);
    assert_eq!(o.next_rotation, Some(ready));
    assert!(
        o.waiting_for
            .as_deref()
            .unwrap_or("")
            .contains("publish_lead"),
        "{o:?}"
    );
    assert_eq!(plan.wake_at, Some(ready));

    // Asking again changes nothing; the first request's time is kept.
    let plan = w.run(asked + secs(30), Some(&rotate));
    assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    assert_eq!(w.doc.pending_rotations.get(&Alg::ES256), Some(&asked));

    assert!(w.run(ready - secs(1), None).steps.is_empty());
    let plan = w.run(ready, None);
    assert_eq!(activations(&plan), vec![(next.as_str(), Trigger::Manual)]);
    assert!(plan.steps.contains(&Step::ClearRequest { alg: Alg::ES256 }));
    assert!(w.doc.pending_rotations.is_empty());
    assert_eq!(
        w.key(Alg::ES256, KeyState::Active).activated_at,
        Some(ready)
    );
    assert!(w.plan(ready, None).unwrap().steps.is_empty());
}

#[test]
fn rotate_now_activates_at_once_with_a_warning() {
    let mut w = World::bootstrapped(es256_only());
    let rotated = t0() + secs(3600);
    w.run(
        rotated,
        Some(&Action::Rotate {
            alg: None,
            force: false,
        }),
    );
    let next = w.kid(Alg::ES256, KeyState::Next);
    let at = rotated + secs(60);
    let plan = w.run(
        at,
        Some(&Action::Rotate {
            alg: Some(Alg::ES256),
            force: true,
        }),
    );
    assert_eq!(activations(&plan), vec![(next.as_str(), Trigger::Forced)]);
    assert_eq!(w.key(Alg::ES256, KeyState::Active).activated_at, Some(at));
    assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
    let warning = &plan.warnings[0];
    assert!(
        warning.contains("verifier_cache_ttl") && warning.contains(&next),
        "{warning}"
    );
}

#[test]
fn rotate_now_on_an_old_enough_key_needs_no_warning() {
    let mut w = World::bootstrapped(es256_only());
    let plan = w.run(
        t0() + secs(3600),
        Some(&Action::Rotate {
            alg: None,
            force: true,
        }),
    );
    assert_eq!(activations(&plan).len(), 1);
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

#[test]
fn rotate_now_clears_a_pending_request() {
    let mut w = World::bootstrapped(es256_only());
    let rotate = |force| Action::Rotate { alg: None, force };
    w.run(t0() + secs(60), Some(&rotate(false)));
    assert!(w.doc.pending_rotations.contains_key(&Alg::ES256));
    let plan = w.run(t0() + secs(120), Some(&rotate(true)));
    assert_eq!(activations(&plan).len(), 1);
    assert!(w.doc.pending_rotations.is_empty());
}

#[test]
fn rotate_of_an_unconfigured_algorithm_is_an_error() {
    let w = World::bootstrapped(es256_only());
    let err = w
        .plan(
            t0() + secs(3600),
            Some(&Action::Rotate {
                alg: Some(Alg::RS256),
                force: false,
            }),
        )
        .unwrap_err();
    assert!(
        matches!(
            &err,
            PlanError::AlgNotConfigured { keyset, alg: Alg::RS256, configured }
                if keyset == "default" && configured.contains("ES256")
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("RS256"), "{err}");
}

// ---- revoke ----------------------------------------------------------------------

#[test]
fn revoking_the_active_key_activates_next_and_makes_a_new_next() {
    let mut w = World::bootstrapped(support::policy());
    let active = w.kid(Alg::ES256, KeyState::Active);
    let next = w.kid(Alg::ES256, KeyState::Next);
    let rs_before: Vec<StoredKey> = w
        .doc
        .keys
        .iter()
        .filter(|k| k.alg == Alg::RS256)
        .cloned()
        .collect();
    let at = t0() + secs(600);
    let (plan, records) = w.run_with_records(
        at,
        Some(&Action::Revoke {
            kid: active.clone(),
            reason: "leaked".into(),
        }),
    );
    assert_eq!(
        plan.steps,
        vec![
            Step::Revoke {
                kid: active.clone(),
                reason: "leaked".into()
            },
            Step::Activate {
                kid: next.clone(),
                trigger: Trigger::Revoke
            },
            Step::Create {
                alg: Alg::ES256,
                state: KeyState::Next,
                trigger: Trigger::Replenish
            },
        ]
    );
    assert!(w.find(&active).is_none(), "gone at once");
    assert_eq!(w.kid(Alg::ES256, KeyState::Active), next);
    assert_eq!(w.key(Alg::ES256, KeyState::Active).activated_at, Some(at));
    assert_eq!(w.count(Alg::ES256, KeyState::Next), 1);
    assert_ne!(w.kid(Alg::ES256, KeyState::Next), next);
    let revoked = records
        .iter()
        .find(|r| r.event == AuditEvent::Revoked)
        .unwrap();
    assert_eq!(
        (revoked.kid.as_str(), revoked.reason.as_str()),
        (active.as_str(), "leaked")
    );
    let rs_after: Vec<StoredKey> = w
        .doc
        .keys
        .iter()
        .filter(|k| k.alg == Alg::RS256)
        .cloned()
        .collect();
    assert_eq!(rs_after, rs_before);
    assert!(w.plan(at, None).unwrap().steps.is_empty());
}

#[test]
fn revoking_the_next_key_replaces_it() {
    let mut w = World::bootstrapped(es256_only());
    let active = w.kid(Alg::ES256, KeyState::Active);
    let next = w.kid(Alg::ES256, KeyState::Next);
    let plan = w.run(
        t0() + secs(600),
        Some(&Action::Revoke {
            kid: next.clone(),
            reason: String::new(),
        }),
    );
    assert_eq!(
        plan.steps,
        vec![
            Step::Revoke {
                kid: next.clone(),
                reason: String::new()
            },
            Step::Create {
                alg: Alg::ES256,
                state: KeyState::Next,
                trigger: Trigger::Replenish
            },
        ]
    );
    assert!(w.find(&next).is_none());
    assert_eq!(w.kid(Alg::ES256, KeyState::Active), active);
    assert_eq!(
        w.key(Alg::ES256, KeyState::Next).published_at,
        t0() + secs(600)
    );
}

#[test]
fn revoking_a_retired_key_removes_it_before_its_grace_ends() {
    let mut w = World::bootstrapped(es256_only());
    let old = w.kid(Alg::ES256, KeyState::Active);
    w.run(t0() + secs(DAY), None);
    let at = t0() + secs(DAY + 60);
    let keep: Vec<String> = w
        .doc
        .keys
        .iter()
        .filter(|k| k.kid != old)
        .map(|k| k.kid.clone())
        .collect();
    let plan = w.run(
        at,
        Some(&Action::Revoke {
            kid: old.clone(),
            reason: "r".into(),
        }),
    );
    assert_eq!(
        plan.steps,
        vec![Step::Revoke {
            kid: old.clone(),
            reason: "r".into()
        }]
    );
    assert!(w.find(&old).is_none());
    let now: Vec<String> = w.doc.keys.iter().map(|k| k.kid.clone()).collect();
    assert_eq!(now, keep);
}

#[test]
fn revoking_an_unknown_kid_is_an_error() {
    let w = World::bootstrapped(support::policy());
    let err = w
        .plan(
            t0() + secs(60),
            Some(&Action::Revoke {
                kid: "nope".into(),
                reason: String::new(),
            }),
        )
        .unwrap_err();
    assert_eq!(
        err,
        PlanError::UnknownKid {
            keyset: "default".into(),
            kid: "nope".into()
        }
    );
}

// ---- cron ----------------------------------------------------------------------

#[test]
fn a_cron_schedule_rotates_at_its_ticks() {
    use chrono::TimeZone;
    let policy = PolicyText {
        algorithms: r#"["ES256"]"#,
        schedule: r#"rotate = "0 0 3 * * Mon""#.into(),
        ..PolicyText::default()
    }
    .build();
    // t0 is Monday 2030-01-07 12:00 UTC.
    let monday = |day| chrono::Utc.with_ymd_and_hms(2030, 1, day, 3, 0, 0).unwrap();
    let mut w = World::new(policy);
    let plan = w.run(t0(), None);
    assert_eq!(outlook(&plan, Alg::ES256).next_rotation, Some(monday(14)));
    assert!(w.run(monday(14) - secs(1), None).steps.is_empty());
    let next = w.kid(Alg::ES256, KeyState::Next);
    let plan = w.run(monday(14), None);
    assert_eq!(activations(&plan), vec![(next.as_str(), Trigger::Schedule)]);
    assert_eq!(outlook(&plan, Alg::ES256).next_rotation, Some(monday(21)));
    // Down over two ticks: one rotation, and the next at the following tick.
    let restart = monday(28) + secs(3600);
    let plan = w.run(restart, None);
    assert_eq!(activations(&plan).len(), 1);
    let feb4 = chrono::Utc.with_ymd_and_hms(2030, 2, 4, 3, 0, 0).unwrap();
    assert_eq!(outlook(&plan, Alg::ES256).next_rotation, Some(feb4));
}

// ---- upcoming --------------------------------------------------------------------

#[test]
fn upcoming_lists_future_events_without_changing_the_document() {
    let w = World::bootstrapped(es256_only());
    let before = w.doc.clone();
    let next = w.kid(Alg::ES256, KeyState::Next);
    let active = w.kid(Alg::ES256, KeyState::Active);
    let events = planner::upcoming(t0() + secs(60), &w.doc, &w.policy, 8);
    assert_eq!(w.doc, before, "upcoming changes nothing");
    assert_eq!(events.len(), 8, "{events:#?}");
    assert!(
        events.windows(2).all(|p| p[0].at <= p[1].at),
        "sorted by time"
    );
    let due = t0() + secs(DAY);
    assert!(
        events.iter().all(|e| e.at >= due),
        "nothing happens before the first rotation"
    );
    assert!(events.iter().any(|e| e.event == AuditEvent::Activated
        && e.kid == next
        && e.at == due
        && e.trigger == Trigger::Schedule));
    assert!(events
        .iter()
        .any(|e| e.event == AuditEvent::Retired && e.kid == active && e.at == due));
    assert!(events.iter().any(|e| e.event == AuditEvent::Removed
        && e.kid == active
        && e.at == due + grace(&w.policy)));
    assert!(events
        .iter()
        .any(|e| e.event == AuditEvent::Activated && e.at == due + secs(DAY)));
}

#[test]
fn upcoming_respects_a_pending_wait_for_publish_lead() {
    let mut w = World::bootstrapped(es256_only());
    w.run(
        t0() + secs(60),
        Some(&Action::Rotate {
            alg: None,
            force: false,
        }),
    );
    let events = planner::upcoming(t0() + secs(60), &w.doc, &w.policy, 1);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].event, AuditEvent::Activated);
    assert_eq!(events[0].at, t0() + lead(&w.policy));
}

// ---- changes and failures (SPEC C2, C3, C4, C6) --------------------------------

fn with_timings(token_ttl: &'static str, verifier_cache_ttl: &'static str) -> KeysetPolicy {
    PolicyText {
        algorithms: r#"["ES256"]"#,
        token_ttl,
        verifier_cache_ttl: Some(verifier_cache_ttl),
        ..PolicyText::default()
    }
    .build()
}

#[test]
fn remove_at_grows_with_the_grace_and_never_shrinks() {
    let mut w = World::bootstrapped(with_timings("1h", "5m"));
    let first = w.kid(Alg::ES256, KeyState::Active);
    w.run(t0() + secs(DAY), None);
    let retired = w.find(&first).unwrap().clone();
    let planned = retired.remove_at.unwrap();
    assert_eq!(planned, retired.retired_at.unwrap() + grace(&w.policy));

    // token_ttl raised to 3h: remove_at follows retired_at + the new grace.
    w.policy = with_timings("3h", "5m");
    let plan = w.run(t0() + secs(DAY) + secs(60), None);
    let grown = retired.retired_at.unwrap() + grace(&w.policy);
    assert!(plan.steps.contains(&Step::ExtendRemoval {
        kid: first.clone(),
        remove_at: grown,
    }));
    assert_eq!(w.find(&first).unwrap().remove_at, Some(grown));

    // Lowered again: nothing shrinks, and the key stays past the old instant.
    w.policy = with_timings("1h", "5m");
    let plan = w.run(planned + secs(1), None);
    assert!(!plan.steps.contains(&Step::Remove { kid: first.clone() }));
    assert_eq!(w.find(&first).unwrap().remove_at, Some(grown));
    w.run(grown, None);
    assert!(w.find(&first).is_none(), "removed at the grown remove_at");
}

#[test]
fn a_next_key_waits_for_the_longest_lead_since_its_publication() {
    let mut w = World::bootstrapped(with_timings("1h", "2h"));
    let next = w.kid(Alg::ES256, KeyState::Next);
    let published = w.key(Alg::ES256, KeyState::Next).published_at;
    let long_lead = published + lead(&w.policy);
    assert_eq!(w.key(Alg::ES256, KeyState::Next).ready_at, Some(long_lead));

    // verifier_cache_ttl lowered to 5m: a rotate an hour in still waits for
    // the 2h lead the key was published under.
    w.policy = with_timings("1h", "5m");
    let plan = w.run(
        published + secs(3600),
        Some(&Action::Rotate {
            alg: None,
            force: false,
        }),
    );
    assert!(activations(&plan).is_empty(), "{:?}", plan.steps);
    assert_eq!(
        outlook(&plan, Alg::ES256).next_rotation,
        Some(long_lead),
        "{:?}",
        plan.outlook
    );
    let plan = w.run(long_lead, None);
    assert_eq!(activations(&plan), vec![(next.as_str(), Trigger::Manual)]);
}

#[test]
fn a_longer_lead_is_recorded_on_the_waiting_key() {
    let mut w = World::bootstrapped(with_timings("1h", "5m"));
    let next = w.kid(Alg::ES256, KeyState::Next);
    let published = w.key(Alg::ES256, KeyState::Next).published_at;
    w.policy = with_timings("1h", "3h");
    let longer = published + lead(&w.policy);
    let plan = w.run(t0() + secs(60), None);
    assert_eq!(
        plan.steps,
        vec![Step::RecordReady {
            kid: next.clone(),
            ready_at: longer
        }]
    );
    // Shortened again: the longer wait stands for a requested rotation.
    w.policy = with_timings("1h", "5m");
    let rotate = Action::Rotate {
        alg: None,
        force: false,
    };
    let plan = w.plan(longer - secs(1), Some(&rotate)).unwrap();
    assert!(activations(&plan).is_empty());
    assert_eq!(outlook(&plan, Alg::ES256).next_rotation, Some(longer));
    let plan = w.plan(longer, Some(&rotate)).unwrap();
    assert_eq!(activations(&plan), vec![(next.as_str(), Trigger::Manual)]);
}

#[test]
fn revoking_the_active_key_with_a_young_next_key_warns() {
    let mut w = World::bootstrapped(es256_only());
    let active = w.kid(Alg::ES256, KeyState::Active);
    let next = w.kid(Alg::ES256, KeyState::Next);
    let plan = w.run(
        t0() + secs(30),
        Some(&Action::Revoke {
            kid: active,
            reason: "compromised".into(),
        }),
    );
    assert_eq!(activations(&plan), vec![(next.as_str(), Trigger::Revoke)]);
    assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
    assert!(
        plan.warnings[0].contains("verifier_cache_ttl") && plan.warnings[0].contains(&next),
        "{}",
        plan.warnings[0]
    );

    // A next key old enough needs no warning.
    let old_enough = t0() + secs(30) + lead(&w.policy);
    let active = w.kid(Alg::ES256, KeyState::Active);
    let plan = w.run(
        old_enough,
        Some(&Action::Revoke {
            kid: active,
            reason: "compromised".into(),
        }),
    );
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

#[test]
fn a_lost_document_keeps_the_published_keys_and_bootstraps_nothing_at_once() {
    let w = World::bootstrapped(support::policy());
    let published: Vec<_> = w
        .doc
        .keys
        .iter()
        .map(|k| w.keys.public_jwk(k.alg, &k.private_key_pem).unwrap())
        // As a verifier saw them: kids are the RFC 7638 thumbprints.
        .map(|jwk| match jwk.alg {
            Alg::ES256 => keyroll::key::PublicJwk::ec(jwk.x.unwrap(), jwk.y.unwrap()),
            Alg::RS256 => keyroll::key::PublicJwk::rsa(jwk.n.unwrap(), jwk.e.unwrap()),
        })
        .collect();
    let lost_at = t0() + secs(3600);
    let empty = KeysetDoc::new("default");
    let known = planner::Published {
        keys: published.clone(),
        longest_grace: Duration::ZERO,
    };
    let plan = planner::plan_with(lost_at, &empty, &w.policy, None, &known).unwrap();
    assert!(
        matches!(&plan.steps[0], Step::AdoptOrphans { orphans } if orphans.len() == published.len()),
        "{:?}",
        plan.steps
    );
    assert!(
        !plan.steps.iter().any(|s| matches!(
            s,
            Step::Create {
                state: KeyState::Active,
                ..
            } | Step::Activate { .. }
        )),
        "a silent bootstrap: {:?}",
        plan.steps
    );
    assert!(!plan.warnings.is_empty());

    // The same key factory, so new kids never repeat the orphans'.
    let mut recovered = w;
    recovered.doc = empty;
    let keys = &recovered.keys;
    planner::apply(&mut recovered.doc, &plan, &recovered.policy, &mut |alg| {
        keys.generate(alg, 2048, "default", lost_at)
    })
    .unwrap();
    assert_eq!(recovered.doc.orphans.len(), published.len());
    assert!(recovered.doc.lost.is_some());
    recovered.doc.check_structure("default").unwrap();
    for orphan in &recovered.doc.orphans {
        assert_eq!(orphan.remove_at, lost_at + grace(&recovered.policy));
        assert_eq!(orphan.public_jwk().unwrap().kid, orphan.kid);
    }
    // The new keys become active only after publish_lead; the orphans go
    // after retire_grace; an operator's rotate clears the loss.
    let plan = recovered.run(lost_at + lead(&recovered.policy) - secs(1), None);
    assert!(activations(&plan).is_empty());
    let plan = recovered.run(lost_at + lead(&recovered.policy), None);
    assert_eq!(activations(&plan).len(), 2, "{:?}", plan.steps);
    recovered.run(lost_at + grace(&recovered.policy), None);
    assert!(recovered.doc.orphans.is_empty());
    recovered.run(
        lost_at + grace(&recovered.policy) + secs(1),
        Some(&Action::Rotate {
            alg: None,
            force: false,
        }),
    );
    assert!(recovered.doc.lost.is_none());
}

#[test]
fn a_clock_behind_the_document_removes_nothing() {
    let mut w = World::bootstrapped(es256_only());
    let first = w.kid(Alg::ES256, KeyState::Active);
    let rotated = t0() + secs(DAY);
    w.run(rotated, None);
    let remove_at = w.find(&first).unwrap().remove_at.unwrap();
    // Another writer, its clock far ahead, stamped the document.
    w.doc
        .pending_rotations
        .insert(Alg::ES256, remove_at + secs(3600));
    let plan = w.plan(remove_at, None).unwrap();
    assert!(!plan.steps.contains(&Step::Remove { kid: first.clone() }));
    let behind = plan.clock_behind.expect("the offset is reported");
    assert_eq!(behind, secs(3600));
    assert!(plan.warnings.iter().any(|w| w.contains("clock")));
    // Once the clocks agree within clock_skew, the key goes.
    let plan = w.plan(remove_at + secs(3600), None).unwrap();
    assert!(plan.steps.contains(&Step::Remove { kid: first }));
}

#[test]
fn a_schema_1_document_is_read_and_rewritten_only_on_a_real_change() {
    let w = World::bootstrapped(es256_only());
    let mut v1: serde_json::Value = serde_json::from_str(&w.doc.to_json()).unwrap();
    v1["schema_version"] = 1.into();
    for key in v1["keys"].as_array_mut().unwrap() {
        key.as_object_mut().unwrap().remove("ready_at");
    }
    let text = serde_json::to_string(&v1).unwrap();
    let doc = KeysetDoc::parse(&text, "default", "v1.json").unwrap();
    assert_eq!(doc.schema_version, keyroll::document::SCHEMA_VERSION);
    // An idle plan changes nothing: no write just for the migration.
    let plan = planner::plan(t0() + secs(60), &doc, &w.policy, None).unwrap();
    assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    // A real change also records the lead of waiting keys.
    let plan = planner::plan(t0() + secs(DAY), &doc, &w.policy, None).unwrap();
    assert!(!activations(&plan).is_empty());
    // A future schema is still refused.
    v1["schema_version"] = 3.into();
    let err = KeysetDoc::parse(&v1.to_string(), "default", "v3.json").unwrap_err();
    assert!(err.to_string().contains("schema version 3"), "{err}");
}

#[test]
fn a_shorter_token_ttl_does_not_shorten_the_grace_of_a_key_that_signed_under_a_longer_one() {
    let mut w = World::bootstrapped(with_timings("3h", "5m"));
    let first = w.kid(Alg::ES256, KeyState::Active);
    let long_grace = grace(&w.policy);
    // token_ttl lowered while the key still signs: its tokens may live 3h.
    w.policy = with_timings("1h", "5m");
    let rotated = t0() + secs(DAY);
    w.run(rotated, None);
    let retired = w.find(&first).unwrap();
    assert_eq!(retired.remove_at, Some(rotated + long_grace));
    // The next active key signs only under the shorter ttl.
    let second = w.kid(Alg::ES256, KeyState::Active);
    w.run(rotated + secs(DAY), None);
    let retired = w.find(&second).unwrap();
    assert_eq!(
        retired.remove_at,
        Some(rotated + secs(DAY) + grace(&w.policy))
    );
}
