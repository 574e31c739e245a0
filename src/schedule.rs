//! When scheduled rotations fall due: a fixed period or a cron expression.

use std::str::FromStr;
use std::time::Duration;

use crate::clock::Timestamp;

/// How many upcoming cron ticks are sampled to find the shortest gap.
const CRON_GAP_SAMPLES: usize = 1000;

#[derive(Clone, Debug)]
pub enum Schedule {
    Every(Duration),
    Cron {
        expression: String,
        schedule: Box<cron::Schedule>,
    },
}

impl Schedule {
    pub fn cron(expression: &str) -> Result<Self, cron::error::Error> {
        let schedule = cron::Schedule::from_str(expression)?;
        Ok(Schedule::Cron {
            expression: expression.to_string(),
            schedule: Box::new(schedule),
        })
    }

    /// The first rotation instant strictly after `t` (`None`: a cron
    /// expression that never fires again).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Every(period) => chrono::Duration::from_std(*period)
                .ok()
                .and_then(|period| t.checked_add_signed(period)),
            Schedule::Cron { schedule, .. } => schedule.after(&t).next(),
        }
    }

    /// The shortest time between two consecutive rotations from `from` on
    /// (for cron: over the next thousand ticks).
    pub fn shortest_gap(&self, from: Timestamp) -> Option<Duration> {
        self.gaps(from).min()
    }

    /// The longest time between two consecutive rotations from `from` on
    /// (for cron: over the next thousand ticks): the default `max_stale`.
    pub fn longest_gap(&self, from: Timestamp) -> Option<Duration> {
        self.gaps(from).max()
    }

    fn gaps(&self, from: Timestamp) -> Box<dyn Iterator<Item = Duration> + '_> {
        match self {
            Schedule::Every(period) => Box::new(std::iter::once(*period)),
            Schedule::Cron { schedule, .. } => {
                let ticks: Vec<Timestamp> = schedule.after(&from).take(CRON_GAP_SAMPLES).collect();
                let gaps: Vec<Duration> = ticks
                    .windows(2)
                    .filter_map(|pair| (pair[1] - pair[0]).to_std().ok())
                    .collect();
                Box::new(gaps.into_iter())
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Schedule::Every(period) => format!("every {}", humantime::format_duration(*period)),
            Schedule::Cron { expression, .. } => format!("cron \"{expression}\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn cron_ticks_strictly_after_the_given_instant() {
        let s = Schedule::cron("0 0 3 * * Mon").unwrap();
        let monday_3am = chrono::Utc.with_ymd_and_hms(2026, 11, 23, 3, 0, 0).unwrap();
        let next = s.next_after(monday_3am).unwrap();
        assert_eq!(next, monday_3am + chrono::Duration::days(7));
        assert_eq!(
            s.shortest_gap(monday_3am),
            Some(Duration::from_secs(7 * 86400))
        );
    }

    #[test]
    fn cron_gap_finds_the_shortest_interval() {
        // 03:00 and 03:05 every day: the gap that matters is 5 minutes.
        let s = Schedule::cron("0 0,5 3 * * *").unwrap();
        let t = chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(s.shortest_gap(t), Some(Duration::from_secs(300)));
    }
}
