//! Fuzzes the config parser (`Config::parse`) with arbitrary text. Beyond
//! "never panics", it checks what an operator relies on: a refused config
//! names at least one problem, every line it names exists, and an accepted
//! one obeys the rules `validate` promises (a slot per algorithm, allowed
//! RSA sizes, unique keyset names, no rotation faster than publish_lead).
#![no_main]

use std::sync::OnceLock;

use chrono::TimeZone;
use keyroll::clock::Timestamp;
use keyroll::config::{Config, ConfigSource, ParseContext};
use keyroll::key::RSA_BITS_ALLOWED;
use keyroll::schedule::Schedule;
use libfuzzer_sys::fuzz_target;

fn context() -> &'static ParseContext {
    static CONTEXT: OnceLock<ParseContext> = OnceLock::new();
    CONTEXT.get_or_init(|| ParseContext {
        state_directory: None,
        // Fixed, so that a crash reproduces: cron checks start here.
        now: chrono::Utc.with_ymd_and_hms(2030, 1, 7, 12, 0, 0).unwrap(),
    })
}

fuzz_target!(|data: &[u8]| {
    // The file is read with read_to_string: text that is not UTF-8 never
    // reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let source = ConfigSource::File("fuzz.toml".into());
    match Config::parse(text, source, context()) {
        Err(error) => {
            assert!(!error.problems.is_empty(), "a refusal names no problem");
            let lines = text.lines().count().max(1);
            for problem in &error.problems {
                if let Some(line) = problem.line {
                    assert!(
                        (1..=lines + 1).contains(&line),
                        "problem {problem:?} names line {line} of a {lines}-line file"
                    );
                }
            }
            let shown = error.to_string();
            assert!(shown.contains("fuzz.toml"), "{shown}");
        }
        Ok(config) => check_accepted(&config, context().now),
    }
});

fn check_accepted(config: &Config, now: Timestamp) {
    assert!(!config.keysets.is_empty());
    assert!(!config.reconcile_interval.is_zero());
    let mut names = std::collections::BTreeSet::new();
    for keyset in &config.keysets {
        assert!(names.insert(keyset.name.clone()), "{} twice", keyset.name);
        assert!(!keyset.algorithms.is_empty());
        assert!(keyset.algorithms.windows(2).all(|w| w[0] < w[1]));
        assert!(RSA_BITS_ALLOWED.contains(&keyset.rsa_bits));
        let lead = keyset.timings.publish_lead();
        let gap = keyset.schedule.shortest_gap(now);
        assert!(
            gap.is_some_and(|gap| gap >= lead),
            "keyset {}: accepted a schedule {} with gap {gap:?} under publish_lead {lead:?}",
            keyset.name,
            keyset.schedule.describe()
        );
        if let Schedule::Every(period) = keyset.schedule {
            assert!(!period.is_zero());
        }
        // Every derived instant stays representable (the document stores them).
        for d in [lead, keyset.timings.retire_grace()] {
            let d = chrono::Duration::from_std(d).expect("a duration chrono holds");
            assert!(now.checked_add_signed(d).is_some());
        }
    }
}
