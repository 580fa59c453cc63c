//! Pacing decisions of the replication loop, over plain numbers: when to
//! send another pre-copy round or freeze, when a point starts early, what
//! state the status shows, how long to wait before reconnecting, when to
//! save the durable state. No I/O here; the callers measure and act.

use std::time::Duration;

use pilotlight_protocol::frame::CommitMode;

use crate::status::State;

/// Dirty bytes from which a frozen point first sends them unfrozen.
pub(crate) const PRECOPY_MIN_BYTES: u64 = 1 << 20;
/// Unfrozen rounds sent back to back before the freeze.
pub(crate) const PRECOPY_ROUNDS: usize = 5;
/// Most dirty bytes read while frozen after the back-to-back rounds: with
/// more, writers outpace the agent, and it sends one more round per
/// interval (sparing the foreground a long freeze and a busy agent) until
/// the delta fits or [`precopy_patience`] has passed.
pub(crate) const FREEZE_DELTA_MAX: u64 = 16 << 20;
/// Most dirty bytes read while frozen when rounds stopped shrinking the
/// delta: about a thousand pages, read in tens of milliseconds.
pub(crate) const STALLED_DELTA_MAX: u64 = 4 << 20;
/// Pre-copy rounds of one point send at most this many times the blocks
/// of its volumes; then the freeze is taken whatever the delta. With the
/// frozen delta (at most the volumes once more) a point carries at most 3x
/// its volumes' blocks, under the receiver's per-point cap
/// (`point_resend_factor`, at least 3): a point that keeps chasing a
/// rewrite of the whole disk ends frozen, never refused.
pub(crate) const PRECOPY_BLOCK_BUDGET: u64 = 2;

/// Whether pre-copy rounds that sent `sent` blocks of volumes holding
/// `volume_blocks` must stop and freeze.
pub(crate) fn precopy_budget_spent(sent: u64, volume_blocks: u64) -> bool {
    sent >= volume_blocks.saturating_mul(PRECOPY_BLOCK_BUDGET)
}

/// Least time between two saves of the durable hash tables (`state.bin`)
/// in continuous mode: a whole table per point would be megabytes written
/// and fsynced every second, and on a traced volume each save would make
/// the next point. A session saves its last durable point when it ends,
/// and a state older than the receiver's last point only means that the
/// next start fetches the receiver's hashes.
pub(crate) const STATE_SAVE_EVERY: Duration = Duration::from_secs(60);
/// First reconnect delay in continuous mode.
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// What a frozen point does after a pre-copy round's syncfs and collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Precopy {
    /// Take the freeze: what is dirty is small enough (or patience is out).
    Freeze,
    /// Send the dirty blocks unfrozen, right away.
    Round,
    /// Writers outpace the rounds: wait an interval, then send a round.
    PaceThenRound,
}

/// The next step of pre-copy round `round` (0 first) with `unsent` dirty
/// bytes to read (pages where kept), `previous` of them at the round
/// before, `elapsed` since the point's pre-copy started.
pub(crate) fn precopy(
    round: usize,
    unsent: u64,
    previous: Option<u64>,
    elapsed: Duration,
    interval: Duration,
) -> Precopy {
    let min = if round == 0 {
        PRECOPY_MIN_BYTES
    } else {
        PRECOPY_MIN_BYTES / 4
    };
    if unsent < min {
        return Precopy::Freeze;
    }
    // Rounds that no longer shrink the delta (writers dirty as much during
    // a round as it reads) only add to the lag: freeze once it is small.
    let stalled = previous.is_some_and(|p| unsent.saturating_mul(4) >= p.saturating_mul(3));
    if stalled && unsent <= STALLED_DELTA_MAX {
        return Precopy::Freeze;
    }
    if round < PRECOPY_ROUNDS {
        return Precopy::Round;
    }
    if unsent <= FREEZE_DELTA_MAX || elapsed >= precopy_patience(interval) {
        Precopy::Freeze
    } else {
        Precopy::PaceThenRound
    }
}

/// How long pre-copy rounds may chase writers before the freeze is taken
/// whatever the delta: bounds the time between points.
pub(crate) fn precopy_patience(interval: Duration) -> Duration {
    (interval * 10).max(Duration::from_secs(30))
}

/// Whether a point that is due waits one more interval: the disk is
/// saturated by its workload (see [`crate::saturation`]) and the lag, an
/// interval later, stays within half of `max_lag` (the other half is for
/// the point itself). Writes meanwhile coalesce into fewer reads.
pub(crate) fn defer_point(
    saturated: bool,
    lag: Duration,
    interval: Duration,
    max_lag: Duration,
) -> bool {
    saturated && lag + interval < max_lag / 2
}

/// Whether pre-copy rounds must stop and freeze because the lag has used
/// three quarters of `max_lag` (the last quarter reads and sends the
/// frozen delta).
pub(crate) fn lag_budget_spent(lag: Duration, max_lag: Duration) -> bool {
    lag >= max_lag / 4 * 3
}

/// Whether live tracking starts the next point before the interval is up:
/// much is dirty, or some volume's changes are unknown.
pub(crate) fn early_point(unsent: u64, early_bytes: u64, any_rescan: bool) -> bool {
    unsent >= early_bytes || any_rescan
}

/// How many points may stay pending (sent, not yet durable) before the
/// next cycle starts.
pub(crate) fn pending_keep(once: bool, commit: CommitMode, max_async_pending: usize) -> usize {
    if once || commit == CommitMode::Sync {
        0
    } else {
        max_async_pending.max(1) - 1
    }
}

/// Whether the durable state is written at this `DURABLE` (else it waits
/// for a later one or the end of the session).
pub(crate) fn state_save_due(once: bool, since_last_save: Option<Duration>) -> bool {
    once || since_last_save.is_none_or(|d| d >= STATE_SAVE_EVERY)
}

/// The state while tracking live: `stalled` when points have waited
/// (`ack_wait`) longer than `stall_after` for their ack, `backlog` when the
/// oldest write not yet durable (`lag`) is far older than the interval,
/// else `continuous`.
pub(crate) fn live_state(
    ack_wait: Option<Duration>,
    stall_after: Duration,
    lag: Duration,
    interval: Duration,
) -> State {
    let patience = (interval * 10).max(Duration::from_secs(10));
    if ack_wait.is_some_and(|w| w > stall_after) {
        State::Stalled
    } else if lag > patience {
        State::Backlog
    } else {
        State::Continuous
    }
}

/// The state shown while a point is read: an initial sync or a rescan
/// says so, otherwise the live state.
pub(crate) fn cycle_state(initial_sync: bool, rescan: bool, live: State) -> State {
    match (initial_sync, rescan) {
        (true, _) => State::InitialSync,
        (false, true) => State::Rescan,
        (false, false) => live,
    }
}

/// Reconnect delays: doubling from [`BACKOFF_START`] to [`BACKOFF_MAX`],
/// back to the start once a session made a point durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// Failed attempts since the last progress.
    pub(crate) attempt: u32,
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            attempt: 0,
            delay: BACKOFF_START,
        }
    }
}

impl Backoff {
    /// A session failed (`progressed`: after making a point durable).
    /// Returns the number of failed attempts in a row.
    pub(crate) fn failed(&mut self, progressed: bool) -> u32 {
        if progressed {
            *self = Self::default();
        }
        self.attempt += 1;
        self.attempt
    }

    /// The wait before the next attempt, `random` drawing its jitter (up to
    /// half the delay); the delay after it doubles.
    pub(crate) fn next_wait(&mut self, random: u64) -> Duration {
        let ms = u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX);
        let wait = self.delay + Duration::from_millis(random % (ms / 2 + 1));
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn precopy_block_budget() {
        // (sent, volume blocks) -> spent
        let table = [
            (0, 0, true),
            (0, 16, false),
            (31, 16, false),
            (32, 16, true),
            (u64::MAX, u64::MAX, true),
        ];
        for (sent, blocks, want) in table {
            assert_eq!(
                precopy_budget_spent(sent, blocks),
                want,
                "{sent} of {blocks}"
            );
        }
    }

    #[test]
    fn precopy_steps() {
        use Precopy::{Freeze, PaceThenRound, Round};
        // (round, unsent, previous round's, elapsed, interval) -> step
        let table = [
            // First round: at least 1 MiB dirty, else freeze at once.
            (0, MIB - 1, None, S(0), S(1), Freeze),
            (0, MIB, None, S(0), S(1), Round),
            // Later rounds: at least a quarter of that.
            (1, MIB / 4 - 1, Some(MIB), S(0), S(1), Freeze),
            (1, MIB / 4, Some(MIB), S(0), S(1), Round),
            // A round that shrank the delta by less than a quarter: freeze
            // once it fits in 4 MiB...
            (1, 3 * MIB, Some(4 * MIB), S(0), S(1), Freeze),
            (1, 3 * MIB - 1, Some(4 * MIB), S(0), S(1), Round),
            (2, 4 * MIB, Some(4 * MIB), S(0), S(1), Freeze),
            // ...else keep going as below.
            (2, 4 * MIB + 1, Some(4 * MIB), S(0), S(1), Round),
            // Back to back up to five rounds, however much is dirty.
            (4, 1 << 30, Some(1 << 31), S(100), S(1), Round),
            // Then freeze once the delta fits in 16 MiB...
            (5, 16 * MIB, Some(1 << 30), S(0), S(1), Freeze),
            // ...else pace one round per interval...
            (5, 16 * MIB + 1, Some(1 << 30), S(29), S(1), PaceThenRound),
            (9, 1 << 30, Some(1 << 31), S(29), S(1), PaceThenRound),
            // ...until patience (10 intervals, at least 30 s) runs out.
            (9, 1 << 30, Some(1 << 31), S(30), S(1), Freeze),
            (9, 1 << 30, Some(1 << 31), S(49), S(5), PaceThenRound),
            (9, 1 << 30, Some(1 << 31), S(50), S(5), Freeze),
        ];
        for (round, unsent, previous, elapsed, interval, want) in table {
            assert_eq!(
                precopy(round, unsent, previous, elapsed, interval),
                want,
                "round {round}, unsent {unsent}, previous {previous:?}, elapsed {elapsed:?}, interval {interval:?}"
            );
        }
    }

    #[test]
    fn patience_is_ten_intervals_and_at_least_30_s() {
        assert_eq!(precopy_patience(S(1)), S(30));
        assert_eq!(precopy_patience(S(3)), S(30));
        assert_eq!(precopy_patience(S(60)), S(600));
    }

    #[test]
    fn points_wait_on_a_saturated_disk_within_half_the_lag_budget() {
        // (saturated, lag, interval, max lag) -> defer
        let table = [
            (false, S(0), S(1), S(30), false),
            (true, S(0), S(1), S(30), true),
            (true, S(13), S(1), S(30), true),
            (true, S(14), S(1), S(30), false),
            (true, S(20), S(1), S(30), false),
            (true, S(0), S(1), S(0), false),
            (true, S(0), S(15), S(30), false),
        ];
        for (saturated, lag, interval, max, want) in table {
            assert_eq!(
                defer_point(saturated, lag, interval, max),
                want,
                "{saturated} {lag:?} {interval:?} {max:?}"
            );
        }
        assert!(!lag_budget_spent(Duration::from_millis(22_499), S(30)));
        assert!(lag_budget_spent(Duration::from_millis(22_500), S(30)));
        assert!(lag_budget_spent(S(0), S(0)));
    }

    #[test]
    fn early_points() {
        let table = [
            (0, 64, false, false),
            (63, 64, false, false),
            (64, 64, false, true),
            (0, 64, true, true),
        ];
        for (unsent, early, rescan, want) in table {
            assert_eq!(
                early_point(unsent, early, rescan),
                want,
                "{unsent} {early} {rescan}"
            );
        }
    }

    #[test]
    fn pending_points_kept() {
        let table = [
            (true, CommitMode::Async, 4, 0),
            (false, CommitMode::Sync, 4, 0),
            (false, CommitMode::Async, 4, 3),
            (false, CommitMode::Async, 1, 0),
            (false, CommitMode::Async, 0, 0),
        ];
        for (once, commit, max, want) in table {
            assert_eq!(
                pending_keep(once, commit, max),
                want,
                "{once} {commit:?} {max}"
            );
        }
    }

    #[test]
    fn state_saves() {
        let table = [
            (false, None, true),
            (false, Some(S(59)), false),
            (false, Some(S(60)), true),
            (true, Some(S(0)), true),
        ];
        for (once, since, want) in table {
            assert_eq!(state_save_due(once, since), want, "{once} {since:?}");
        }
    }

    #[test]
    fn live_states() {
        use State::{Backlog, Continuous, Stalled};
        // (ack wait, stall after, lag, interval) -> state
        let table = [
            (None, S(60), S(0), S(1), Continuous),
            (Some(S(60)), S(60), S(0), S(1), Continuous),
            (Some(S(61)), S(60), S(0), S(1), Stalled),
            (Some(S(61)), S(60), S(1000), S(1), Stalled),
            (None, S(60), S(10), S(1), Continuous),
            (None, S(60), S(11), S(1), Backlog),
            (None, S(60), S(50), S(5), Continuous),
            (None, S(60), S(51), S(5), Backlog),
        ];
        for (wait, stall, lag, interval, want) in table {
            assert_eq!(
                live_state(wait, stall, lag, interval),
                want,
                "{wait:?} {stall:?} {lag:?} {interval:?}"
            );
        }
    }

    #[test]
    fn cycle_states() {
        use State::{Backlog, InitialSync, Rescan};
        assert_eq!(cycle_state(true, true, Backlog), InitialSync);
        assert_eq!(cycle_state(true, false, Backlog), InitialSync);
        assert_eq!(cycle_state(false, true, Backlog), Rescan);
        assert_eq!(cycle_state(false, false, Backlog), Backlog);
    }

    #[test]
    fn backoff_doubles_to_a_minute_with_jitter_and_resets_on_progress() {
        let mut b = Backoff::default();
        assert_eq!(b.failed(false), 1);
        assert_eq!(b.next_wait(0), Duration::from_millis(500));
        assert_eq!(b.failed(false), 2);
        // Jitter up to half the delay.
        assert_eq!(b.next_wait(500), Duration::from_millis(1000 + 500));
        assert_eq!(b.next_wait(501), Duration::from_millis(2000 + 501));
        for _ in 0..10 {
            b.next_wait(0);
        }
        assert_eq!(b.next_wait(0), BACKOFF_MAX);
        assert_eq!(b.failed(true), 1);
        assert_eq!(b.next_wait(0), BACKOFF_START);
    }
}
