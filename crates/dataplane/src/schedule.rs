//! When to sync: the sync loop's decisions as a pure state machine. The caller passes the
//! time (`now`) into every call, so each rule is unit-tested without sleeping.
//!
//! Rules (upstream's BoundedFrequencyRunner plus ours):
//! - the first sync, after the initial lists, is at once and full;
//! - changes sync at once, but no sooner than `min_sync_period` after the last sync ends
//!   (changes meanwhile coalesce into that one sync);
//! - every `sync_period` the dataplane is asked whether its rules were removed (the drift
//!   check); if so the next sync is full, and it counts as a drift repair only when the
//!   proxy was settled (not right after a failure or before its first sync);
//! - every `full_sync_period` (upstream: 1 h) and after a Node change, a full sync;
//! - a failed sync is retried as a full sync after a backoff: 500 ms doubling, capped at
//!   `sync_period` (at least 1 s); a success resets it.

use std::time::{Duration, Instant};

/// The periods the schedule follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleConfig {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// Full resync period even without a detected flush (upstream: 1 hour).
    pub full_sync_period: Duration,
}

/// What the sync loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask the dataplane whether its rules are still there, then report with
    /// [`SyncSchedule::drift_checked`].
    CheckDrift,
    /// Sync now (`full`: rewrite everything), then report with [`SyncSchedule::synced`].
    Sync { full: bool },
    /// Nothing to do until `until`. `wake_on_change`: a new change may end the wait early
    /// (false while coalescing changes within `min_sync_period`).
    Wait {
        until: Instant,
        wake_on_change: bool,
    },
}

/// The sync loop's state.
#[derive(Debug, Clone)]
pub struct SyncSchedule {
    cfg: ScheduleConfig,
    first: bool,
    force_full: bool,
    last_end: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
    next_check: Instant,
    next_full: Instant,
}

impl SyncSchedule {
    /// A schedule whose clock starts at `start` (when the initial lists completed).
    pub fn new(cfg: ScheduleConfig, start: Instant) -> Self {
        SyncSchedule {
            cfg,
            first: true,
            force_full: true,
            last_end: None,
            retry_at: None,
            failures: 0,
            next_check: start + cfg.sync_period,
            next_full: start + cfg.full_sync_period,
        }
    }

    /// The next action at `now`; `changes_pending`: the tracker holds undrained changes.
    pub fn next(&mut self, now: Instant, changes_pending: bool) -> Action {
        if now >= self.next_check {
            // The next check is scheduled when this one ends (a check can outlast
            // sync_period, e.g. waiting for the xtables lock; syncs go between checks).
            return Action::CheckDrift;
        }
        if now >= self.next_full {
            self.next_full = now + self.cfg.full_sync_period;
            self.force_full = true;
        }
        let deadline = self.next_check.min(self.next_full);
        let pending = self.first || self.force_full || changes_pending || self.retry_at.is_some();
        if !pending {
            return Action::Wait {
                until: deadline,
                wake_on_change: true,
            };
        }
        let mut earliest = self
            .last_end
            .map(|end| end + self.cfg.min_sync_period)
            .unwrap_or(now);
        if let Some(retry) = self.retry_at {
            earliest = earliest.max(retry);
        }
        if now >= earliest {
            Action::Sync {
                full: self.force_full || self.first,
            }
        } else {
            Action::Wait {
                until: deadline.min(earliest),
                wake_on_change: false,
            }
        }
    }

    /// Records the drift check's answer, the check having ended at `end`. Returns
    /// whether it counts as a drift repair (rules gone while the proxy was settled).
    pub fn drift_checked(&mut self, rules_gone: bool, end: Instant) -> bool {
        self.next_check = end + self.cfg.sync_period;
        let settled = !self.first && !self.force_full && self.retry_at.is_none();
        if rules_gone {
            self.force_full = true;
        }
        rules_gone && settled
    }

    /// The Node changed in a way every rule may depend on (zone, addresses).
    pub fn node_changed(&mut self) {
        self.force_full = true;
    }

    /// Records a sync that ended at `end`. On failure returns the delay before the retry.
    pub fn synced(&mut self, ok: bool, end: Instant) -> Option<Duration> {
        self.last_end = Some(end);
        self.first = false;
        if ok {
            self.failures = 0;
            self.retry_at = None;
            self.force_full = false;
            None
        } else {
            self.failures += 1;
            let delay = self.backoff();
            self.retry_at = Some(end + delay);
            self.force_full = true;
            Some(delay)
        }
    }

    /// Consecutive failed syncs.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn backoff(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(10);
        let base = Duration::from_millis(500) * 2u32.pow(doublings);
        base.min(self.cfg.sync_period.max(Duration::from_secs(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg() -> ScheduleConfig {
        ScheduleConfig {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
        }
    }

    /// A schedule past its first (successful) sync at `t0`.
    fn settled(t0: Instant) -> SyncSchedule {
        let mut s = SyncSchedule::new(cfg(), t0);
        assert_eq!(s.next(t0, false), Action::Sync { full: true });
        assert_eq!(s.synced(true, t0), None);
        s
    }

    #[test]
    fn first_sync_is_at_once_and_full_even_without_changes() {
        let t0 = Instant::now();
        let mut s = SyncSchedule::new(cfg(), t0);
        assert_eq!(s.next(t0, false), Action::Sync { full: true });
    }

    #[test]
    fn idle_waits_for_a_change_or_the_next_check() {
        let t0 = Instant::now();
        let mut s = settled(t0);
        assert_eq!(
            s.next(t0 + 5 * MS, false),
            Action::Wait {
                until: t0 + cfg().sync_period,
                wake_on_change: true
            }
        );
    }

    #[test]
    fn changes_coalesce_until_min_sync_period_after_the_last_sync() {
        let t0 = Instant::now();
        let mut s = settled(t0);
        // A change 100 ms later waits, without waking on further changes.
        assert_eq!(
            s.next(t0 + 100 * MS, true),
            Action::Wait {
                until: t0 + Duration::from_secs(1),
                wake_on_change: false
            }
        );
        // At min_sync_period: one partial sync for all of them.
        assert_eq!(
            s.next(t0 + Duration::from_secs(1), true),
            Action::Sync { full: false }
        );
        assert_eq!(s.synced(true, t0 + Duration::from_secs(1)), None);
        // A change long after the last sync goes at once.
        assert_eq!(
            s.next(t0 + Duration::from_secs(5), true),
            Action::Sync { full: false }
        );
    }

    #[test]
    fn drift_check_every_sync_period_forces_a_full_sync_and_counts_when_settled() {
        let t0 = Instant::now();
        let mut s = settled(t0);
        let t = t0 + cfg().sync_period;
        assert_eq!(s.next(t, false), Action::CheckDrift);
        // Rules intact: nothing to do until the next check.
        assert!(!s.drift_checked(false, t));
        assert_eq!(
            s.next(t, false),
            Action::Wait {
                until: t + cfg().sync_period,
                wake_on_change: true
            }
        );
        let t = t + cfg().sync_period;
        assert_eq!(s.next(t, false), Action::CheckDrift);
        assert!(s.drift_checked(true, t), "a repair while settled");
        assert_eq!(s.next(t, false), Action::Sync { full: true });
    }

    #[test]
    fn a_check_slower_than_sync_period_does_not_starve_syncs() {
        let t0 = Instant::now();
        let mut s = settled(t0);
        // Each check waits 5 s for a lock; sync_period is 30 s in cfg(), so use 1 s here.
        s.cfg.sync_period = Duration::from_secs(1);
        s.next_check = t0 + Duration::from_secs(1);
        let mut t = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(s.next(t, true), Action::CheckDrift);
            t += Duration::from_secs(5);
            assert!(!s.drift_checked(false, t));
            // The change waiting behind the check goes next, not another check.
            assert_eq!(s.next(t, true), Action::Sync { full: false });
            assert_eq!(s.synced(true, t), None);
            // The next check is a sync_period after the last one ended.
            assert!(
                matches!(s.next(t, false), Action::Wait { until, .. } if until == t + Duration::from_secs(1))
            );
            t += Duration::from_secs(1);
        }
    }

    #[test]
    fn drift_found_right_after_a_failure_is_not_a_repair() {
        let t0 = Instant::now();
        let mut s = SyncSchedule::new(cfg(), t0);
        assert_eq!(s.next(t0, false), Action::Sync { full: true });
        assert!(s.synced(false, t0).is_some());
        assert!(!s.drift_checked(true, t0), "the retry is pending anyway");
    }

    /// `next`, answering drift checks with "rules intact".
    fn next_past_checks(s: &mut SyncSchedule, now: Instant, pending: bool) -> Action {
        loop {
            match s.next(now, pending) {
                Action::CheckDrift => assert!(!s.drift_checked(false, now)),
                other => return other,
            }
        }
    }

    #[test]
    fn failures_back_off_doubling_up_to_sync_period_and_retry_full() {
        let t0 = Instant::now();
        let mut s = SyncSchedule::new(
            ScheduleConfig {
                min_sync_period: Duration::ZERO,
                sync_period: Duration::from_secs(5),
                full_sync_period: Duration::from_secs(3600),
            },
            t0,
        );
        let mut t = t0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            assert_eq!(
                next_past_checks(&mut s, t, false),
                Action::Sync { full: true }
            );
            let d = s.synced(false, t).expect("retry delay");
            delays.push(d.as_millis());
            // Not before the backoff, even with changes.
            assert!(matches!(
                next_past_checks(&mut s, t + d - MS, true),
                Action::Wait { until, wake_on_change: false } if until <= t + d
            ));
            t += d;
        }
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(s.failures(), 6);
        assert_eq!(
            next_past_checks(&mut s, t, false),
            Action::Sync { full: true }
        );
        assert_eq!(s.synced(true, t), None);
        assert_eq!(s.failures(), 0);
        assert_eq!(
            next_past_checks(&mut s, t, true),
            Action::Sync { full: false }
        );
    }

    #[test]
    fn backoff_is_at_least_a_second_with_short_sync_periods() {
        let t0 = Instant::now();
        let mut s = SyncSchedule::new(
            ScheduleConfig {
                min_sync_period: Duration::ZERO,
                sync_period: Duration::from_millis(200),
                full_sync_period: Duration::from_secs(3600),
            },
            t0,
        );
        s.synced(false, t0);
        s.synced(false, t0);
        assert_eq!(s.synced(false, t0), Some(Duration::from_secs(1)));
    }

    #[test]
    fn full_sync_period_and_node_changes_force_full_syncs() {
        let t0 = Instant::now();
        let c = ScheduleConfig {
            min_sync_period: Duration::ZERO,
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(10),
        };
        let mut s = SyncSchedule::new(c, t0);
        s.next(t0, false);
        s.synced(true, t0);
        let t = t0 + Duration::from_secs(10);
        assert_eq!(s.next(t, false), Action::Sync { full: true });
        s.synced(true, t);
        assert_eq!(s.next(t + MS, true), Action::Sync { full: false });
        s.node_changed();
        assert_eq!(s.next(t + MS, false), Action::Sync { full: true });
    }
}
