//! Time comes in from outside: the planner takes `now` as an argument, and
//! everything that needs the wall clock asks a [`Clock`], so tests can fake it.

use chrono::{DateTime, SubsecRound, Utc};

/// An instant, UTC. Stored and shown as RFC 3339.
pub type Timestamp = DateTime<Utc>;

pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The wall clock, to whole seconds: stored timestamps stay readable and
/// every replica rounds the same way.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Utc::now().trunc_subsecs(0)
    }
}

/// Formats an instant the way keyroll shows it everywhere: RFC 3339, `Z`.
pub fn rfc3339(t: Timestamp) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}
