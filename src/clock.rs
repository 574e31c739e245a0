//! Time comes in from outside: the planner takes `now` as an argument, and
//! everything that needs the wall clock asks a [`Clock`], so tests can fake it.

use chrono::{DateTime, SubsecRound, Utc};

/// An instant, UTC. Stored and shown as RFC 3339.
pub type Timestamp = DateTime<Utc>;

pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The wall clock, to the millisecond. Whole seconds would let a key be
/// activated up to a second before `publish_lead` has passed in wall time
/// (and removed up to a second early); a millisecond is far below any
/// timing keyroll is configured with, and keeps stored timestamps short.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Utc::now().trunc_subsecs(3)
    }
}

/// A clock that follows tokio's, from a chosen instant on: under
/// `tokio::time::pause()` a test advances the daemon's wall clock and its
/// timers together, so one time source drives everything. `offset` skews it
/// (a replica whose clock is wrong).
#[derive(Clone, Debug)]
pub struct TokioClock {
    base: Timestamp,
    started: tokio::time::Instant,
    offset: chrono::Duration,
}

impl TokioClock {
    pub fn starting_at(base: Timestamp) -> Self {
        TokioClock {
            base,
            started: tokio::time::Instant::now(),
            offset: chrono::Duration::zero(),
        }
    }

    /// The same clock, `offset` ahead (negative: behind).
    pub fn skewed(&self, offset: chrono::Duration) -> Self {
        TokioClock {
            offset,
            ..self.clone()
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let elapsed = chrono::Duration::from_std(self.started.elapsed())
            .unwrap_or_else(|_| chrono::Duration::zero());
        (self.base + elapsed + self.offset).trunc_subsecs(3)
    }
}

/// Formats an instant the way keyroll shows it everywhere: RFC 3339, `Z`.
pub fn rfc3339(t: Timestamp) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}
