//! The bookkeeping with a fake event source: no root, no tracefs.

#![allow(clippy::panic)] // test code: a wrong plan fails the test

use super::*;
use crate::trace::{Pages, Writes};

/// Writes handed to the bookkeeping by hand.
#[derive(Default)]
struct FakeSource {
    /// Per volume: the writes since the last take.
    pending: Vec<Writes>,
    /// The next sync reports lost events.
    lose: bool,
    /// The next sync fails.
    fail: bool,
}

impl EventSource for FakeSource {
    fn sync(&mut self) -> Result<bool, AgentError> {
        if std::mem::take(&mut self.fail) {
            return Err(AgentError::Trace("the fake tracer failed".into()));
        }
        Ok(std::mem::take(&mut self.lose))
    }

    fn take(&mut self, volume: usize) -> Writes {
        self.pending
            .get_mut(volume)
            .map(|w| Writes {
                dirty: w.dirty.take(),
                first_ms: w.first_ms.take(),
                bytes: std::mem::take(&mut w.bytes),
            })
            .unwrap_or_default()
    }
}

const BS: u32 = 4096;
/// Every test volume is 1 MiB: 256 blocks.
const SIZE: u64 = 1 << 20;
const BOOT: &str = "boot-a";
const COUNTERS: [u64; 4] = [1, 2, 3, 4];

fn volume(i: u32) -> (TrackedVolume, Device) {
    (
        TrackedVolume {
            name: format!("v{i}"),
            path: PathBuf::from(format!("/dev/fake{i}")),
            size: SIZE,
            block_size: BS,
        },
        Device {
            dev: (7 << 20) | i,
            start: 0,
            own: (7, i),
        },
    )
}

/// `n` volumes as a first start finds them: every one needs a rescan.
fn fresh(n: u32) -> Tracking<FakeSource> {
    let source = FakeSource {
        pending: (0..n)
            .map(|_| Writes {
                dirty: Dirty::new(BS),
                ..Writes::default()
            })
            .collect(),
        ..Default::default()
    };
    Tracking::new(source, (0..n).map(volume).collect())
}

fn unchanged(_: &Device) -> Result<[u64; 4], AgentError> {
    Ok(COUNTERS)
}

/// A saved set for volumes `0..n` with nothing dirty, as a clean stop
/// leaves it.
fn saved_clean(n: u32) -> SavedDirty {
    SavedDirty {
        boot_id: BOOT.into(),
        volumes: (0..n)
            .map(|i| SavedVolume {
                name: format!("v{i}"),
                own: (7, i),
                block_size: BS,
                counters: COUNTERS,
                dirty: RoaringTreemap::new(),
            })
            .collect(),
    }
}

/// `n` volumes resumed from a clean stop: nothing dirty, nothing to rescan.
fn clean(n: u32) -> Tracking<FakeSource> {
    let mut t = fresh(n);
    t.resume(&saved_clean(n), BOOT, unchanged).unwrap();
    t
}

/// Volume `vol` had `blocks` written, the first at `at` (ms).
fn write(t: &mut Tracking<FakeSource>, vol: usize, blocks: &[u64], at: i64) {
    let w = &mut t.source.pending[vol];
    for &b in blocks {
        let at = b * u64::from(BS);
        w.dirty.mark(at, at + u64::from(BS));
        w.bytes += u64::from(BS);
    }
    w.first_ms.get_or_insert(at);
}

fn blocks(plan: &Plan) -> Vec<u64> {
    match plan {
        Plan::Blocks(b, _) => b.clone(),
        Plan::Full(r) => panic!("a full scan ({r}) where blocks were expected"),
    }
}

fn reasons(t: &Tracking<FakeSource>) -> Vec<Option<RescanReason>> {
    (0..t.vols.len()).map(|i| t.needs_rescan(i)).collect()
}

#[test]
fn a_first_start_rescans_every_volume() {
    let mut t = fresh(2);
    assert_eq!(reasons(&t), vec![Some(RescanReason::NoSavedDirtySet); 2]);
    assert!(t.worth_a_point());
    let plans = t.plan();
    assert!(plans
        .iter()
        .all(|p| matches!(p, Plan::Full(RescanReason::NoSavedDirtySet))));
    assert_eq!(t.stats.rescans, 2);
    assert_eq!(
        t.stats.last_rescan_reason.as_deref(),
        Some(RescanReason::NoSavedDirtySet.as_str())
    );
    assert_eq!(reasons(&t), vec![None, None]);
}

#[test]
fn a_saved_set_is_taken_up_only_if_nothing_changed() {
    type Edit = fn(&mut SavedDirty);
    let cases: &[(&str, Edit, Option<RescanReason>)] = &[
        ("unchanged", |_| {}, None),
        (
            "another boot",
            |s| s.boot_id = "boot-b".into(),
            Some(RescanReason::WrittenWhileStopped),
        ),
        (
            "another device",
            |s| s.volumes[0].own = (8, 0),
            Some(RescanReason::WrittenWhileStopped),
        ),
        (
            "written meanwhile",
            |s| s.volumes[0].counters[1] += 8,
            Some(RescanReason::WrittenWhileStopped),
        ),
        (
            "another block size",
            |s| s.volumes[0].block_size = 65536,
            Some(RescanReason::WrittenWhileStopped),
        ),
        (
            "not in the saved set",
            |s| s.volumes[0].name = "other".into(),
            Some(RescanReason::NoSavedDirtySet),
        ),
    ];
    for (what, edit, want) in cases {
        let mut saved = saved_clean(1);
        saved.volumes[0].dirty.insert(9);
        edit(&mut saved);
        let mut t = fresh(1);
        t.resume(&saved, BOOT, unchanged).unwrap();
        assert_eq!(t.needs_rescan(0), *want, "{what}");
        let taken: Vec<u64> = t.vols[0].unsent.blocks.iter().collect();
        let expected = if want.is_none() { vec![9] } else { vec![] };
        assert_eq!(taken, expected, "{what}");
    }
}

#[test]
fn a_counter_read_error_fails_the_resume() {
    let mut t = fresh(1);
    let failing = |_: &Device| Err(AgentError::Trace("no stat".into()));
    assert!(t.resume(&saved_clean(1), BOOT, failing).is_err());
}

#[test]
fn collect_brings_in_each_volumes_writes() {
    let mut t = clean(2);
    write(&mut t, 0, &[1, 2], 1_000);
    write(&mut t, 1, &[5], 1_000);
    t.collect().unwrap();
    assert_eq!(t.unsent_bytes(), 3 * u64::from(BS));
    let plans = t.plan();
    assert_eq!(blocks(&plans[0]), vec![1, 2]);
    assert_eq!(blocks(&plans[1]), vec![5]);
    assert_eq!(t.unsent_bytes(), 0);
}

#[test]
fn collect_records_when_it_started() {
    let mut t = clean(1);
    let before = now_ms();
    t.collect().unwrap();
    assert!(t.collected_ms >= before);
}

#[test]
fn a_failed_sync_fails_collect_and_keeps_the_writes_for_later() {
    let mut t = clean(1);
    write(&mut t, 0, &[3], 1_000);
    t.source.fail = true;
    assert!(t.collect().is_err());
    assert_eq!(t.collected_ms, 0);
    assert_eq!(t.unsent_bytes(), 0);
    t.collect().unwrap();
    assert_eq!(blocks(&t.plan()[0]), vec![3]);
}

#[test]
fn lost_events_rescan_every_volume() {
    let mut t = clean(3);
    t.source.lose = true;
    t.collect().unwrap();
    assert_eq!(reasons(&t), vec![Some(RescanReason::LostEvents); 3]);
}

#[test]
fn lost_events_keep_an_earlier_reason() {
    let mut t = clean(1);
    t.force_rescan(0, RescanReason::InitialSync);
    t.source.lose = true;
    t.collect().unwrap();
    assert_eq!(t.needs_rescan(0), Some(RescanReason::InitialSync));
}

#[test]
fn force_rescan_replaces_the_reason() {
    let mut t = clean(1);
    t.source.lose = true;
    t.collect().unwrap();
    t.force_rescan(0, RescanReason::ChecksumResync);
    assert_eq!(t.needs_rescan(0), Some(RescanReason::ChecksumResync));
    assert!(matches!(
        t.plan()[0],
        Plan::Full(RescanReason::ChecksumResync)
    ));
}

#[test]
fn a_full_scan_drops_the_dirty_blocks_it_covers() {
    let mut t = clean(1);
    write(&mut t, 0, &[4], 1_000);
    t.collect().unwrap();
    t.force_rescan(0, RescanReason::InitialSync);
    assert!(matches!(t.plan()[0], Plan::Full(_)));
    assert_eq!(t.unsent_bytes(), 0);
    // In flight, the whole volume counts, not the dropped block.
    assert_eq!(t.backlog_bytes(), SIZE);
}

#[test]
fn a_durable_point_leaves_nothing_behind() {
    let mut t = clean(1);
    write(&mut t, 0, &[1, 2], 1_000);
    t.collect().unwrap();
    t.plan();
    assert_eq!(t.backlog_bytes(), 2 * u64::from(BS));
    t.durable();
    assert_eq!(t.backlog_bytes(), 0);
    assert_eq!(t.lag_ms(), 0);
    assert!(!t.worth_a_point());
}

#[test]
fn requeue_puts_every_point_in_flight_back() {
    let mut t = clean(1);
    write(&mut t, 0, &[1], 1_000);
    t.collect().unwrap();
    t.plan();
    write(&mut t, 0, &[2], 2_000);
    t.collect().unwrap();
    t.plan();
    write(&mut t, 0, &[3], 3_000);
    t.collect().unwrap();
    t.requeue();
    assert!(t.inflight.is_empty());
    assert_eq!(blocks(&t.plan()[0]), vec![1, 2, 3]);
}

#[test]
fn requeue_keeps_the_oldest_write_time() {
    let mut t = clean(1);
    write(&mut t, 0, &[1], 1_000);
    t.collect().unwrap();
    t.plan();
    write(&mut t, 0, &[2], 5_000);
    t.collect().unwrap();
    t.requeue();
    assert_eq!(t.vols[0].unsent_first, Some(1_000));
}

#[test]
fn a_full_scan_not_made_durable_is_scanned_again() {
    let mut t = clean(2);
    t.force_rescan(1, RescanReason::InitialSync);
    t.plan();
    assert_eq!(t.needs_rescan(1), None);
    t.requeue();
    assert_eq!(
        reasons(&t),
        vec![None, Some(RescanReason::FullScanNotDurable)]
    );
}

#[test]
fn unplan_puts_back_only_the_last_point() {
    let mut t = clean(1);
    write(&mut t, 0, &[1], 1_000);
    t.collect().unwrap();
    t.plan();
    write(&mut t, 0, &[2], 2_000);
    t.collect().unwrap();
    t.plan();
    t.unplan();
    assert_eq!(t.inflight.len(), 1);
    assert_eq!(t.vols[0].unsent.blocks.iter().collect::<Vec<_>>(), vec![2]);
    t.durable();
    assert_eq!(t.backlog_bytes(), u64::from(BS));
}

#[test]
fn plan_more_adds_to_the_last_point() {
    let mut t = clean(1);
    write(&mut t, 0, &[1], 1_000);
    t.collect().unwrap();
    assert_eq!(blocks(&t.plan()[0]), vec![1]);
    write(&mut t, 0, &[2], 2_000);
    t.collect().unwrap();
    assert_eq!(blocks(&t.plan_more()[0]), vec![2]);
    assert_eq!(t.inflight.len(), 1);
    assert_eq!(t.inflight[0].first, Some(1_000));
    t.durable();
    assert_eq!(t.backlog_bytes(), 0);
}

#[test]
fn lag_is_the_age_of_the_oldest_change_not_durable() {
    let now = Instant::now();
    type Setup = fn(&mut Tracking<FakeSource>);
    let cases: &[(&str, Setup, i64)] = &[
        ("nothing", |_| {}, 0),
        (
            "unsent",
            |t| {
                write(t, 0, &[1], 4_000);
                write(t, 1, &[1], 7_000);
                t.collect().unwrap();
            },
            6_000,
        ),
        (
            "in flight",
            |t| {
                write(t, 0, &[1], 2_000);
                t.collect().unwrap();
                t.plan();
                write(t, 1, &[1], 8_000);
                t.collect().unwrap();
            },
            8_000,
        ),
        (
            "rescan",
            |t| {
                t.source.lose = true;
                t.collect().unwrap();
                t.vols[1].rescan_since = Some(3_000);
            },
            7_000,
        ),
        ("written in the future", |t| write_and_collect(t, 20_000), 0),
    ];
    for (what, setup, want) in cases {
        let mut t = clean(2);
        setup(&mut t);
        assert_eq!(t.lag_ms_at(10_000, now), *want, "{what}");
    }
}

fn write_and_collect(t: &mut Tracking<FakeSource>, at: i64) {
    write(t, 0, &[1], at);
    t.collect().unwrap();
}

#[test]
fn a_volume_to_rescan_counts_whole_in_the_backlog() {
    let mut t = clean(2);
    write(&mut t, 0, &[1], 1_000);
    t.collect().unwrap();
    t.force_rescan(1, RescanReason::InitialSync);
    assert_eq!(t.backlog_bytes(), u64::from(BS) + SIZE);
}

#[test]
fn worth_a_point() {
    type Setup = fn(&mut Tracking<FakeSource>);
    let cases: &[(&str, Setup, bool)] = &[
        ("nothing dirty", |_| {}, false),
        ("dirty blocks", |t| write_and_collect(t, 1_000), true),
        (
            "a rescan",
            |t| t.force_rescan(0, RescanReason::InitialSync),
            true,
        ),
        (
            "only in flight",
            |t| {
                write_and_collect(t, 1_000);
                t.plan();
            },
            false,
        ),
    ];
    for (what, setup, want) in cases {
        let mut t = clean(1);
        setup(&mut t);
        assert_eq!(t.worth_a_point(), *want, "{what}");
    }
}

/// A tracking whose last thaw wrote block 7 of volume 0.
fn thawed() -> Tracking<FakeSource> {
    let mut t = clean(1);
    write(&mut t, 0, &[7], 1_000);
    t.note_thaw().unwrap();
    t
}

#[test]
fn the_thaws_own_writes_alone_wait() {
    let t = thawed();
    assert!(!t.worth_a_point());
}

#[test]
fn the_thaws_own_writes_wait_at_most_echo_hold() {
    let t = thawed();
    let at = t.echo_at.unwrap();
    assert!(!t.worth_a_point_at(at + ECHO_HOLD - Duration::from_millis(1)));
    assert!(t.worth_a_point_at(at + ECHO_HOLD));
}

#[test]
fn a_write_besides_the_thaws_calls_for_a_point() {
    let mut t = thawed();
    write(&mut t, 0, &[8], 2_000);
    t.collect().unwrap();
    assert!(t.worth_a_point());
}

#[test]
fn the_thaws_own_writes_are_left_out_of_lag_and_backlog() {
    let t = thawed();
    let at = t.echo_at.unwrap();
    assert_eq!(t.lag_ms_at(10_000, at), 0);
    assert_eq!(t.backlog_bytes_at(at), 0);
    let late = at + ECHO_HOLD;
    assert_eq!(t.lag_ms_at(10_000, late), 9_000);
    assert_eq!(t.backlog_bytes_at(late), u64::from(BS));
}

#[test]
fn a_clean_stop_saves_what_is_not_durable() {
    let mut t = clean(2);
    write(&mut t, 0, &[1], 1_000);
    t.collect().unwrap();
    t.plan();
    write(&mut t, 0, &[2], 2_000);
    t.collect().unwrap();
    t.force_rescan(1, RescanReason::ChecksumResync);
    t.requeue();
    let saved = t.to_saved(BOOT.into(), unchanged).unwrap();
    // The volume to rescan is left out: the next start rescans it.
    assert_eq!(saved.volumes.len(), 1);
    let v = &saved.volumes[0];
    assert_eq!(
        (v.name.as_str(), v.own, v.counters),
        ("v0", (7, 0), COUNTERS)
    );
    assert_eq!(v.dirty.iter().collect::<Vec<_>>(), vec![1, 2]);

    let mut next = fresh(2);
    next.resume(&saved, BOOT, unchanged).unwrap();
    assert_eq!(
        reasons(&next),
        vec![None, Some(RescanReason::NoSavedDirtySet)]
    );
    assert_eq!(
        next.vols[0].unsent.blocks.iter().collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(next.vols[0].unsent_first.is_some());
}

#[test]
fn freezes_keep_the_last_and_the_longest() {
    let mut t = clean(1);
    for ms in [30, 80, 10] {
        t.note_freeze(Duration::from_millis(ms));
    }
    assert_eq!(t.stats.last_freeze_ms, Some(10.0));
    assert_eq!(t.stats.max_freeze_ms, Some(80.0));
}

/// 64 KiB blocks: sub-block tracking keeps pages.
fn ranged() -> Tracking<FakeSource> {
    let mut t = clean(1);
    let bs = 64 << 10;
    t.vols[0].vol.block_size = bs;
    t.vols[0].unsent = Dirty::new(bs);
    t.source.pending[0].dirty = Dirty::new(bs);
    t
}

#[test]
fn plans_carry_the_written_pages_and_a_point_put_back_is_whole() {
    let mut t = ranged();
    let bs = 64u64 << 10;
    let w = &mut t.source.pending[0];
    w.dirty.mark(3 * bs + 8192, 3 * bs + 12288);
    w.dirty.mark(5 * bs, 6 * bs);
    w.bytes += 4096 + bs;
    t.collect().unwrap();
    assert_eq!(t.stats.traced_write_bytes_total, 4096 + bs);
    let plans = t.plan();
    let Plan::Blocks(b, pages) = &plans[0] else {
        panic!("a full scan where blocks were expected");
    };
    assert_eq!(b, &[3, 5]);
    assert_eq!(pages.get(&3), Some(&Pages::one(2, 3)));
    assert!(!pages.contains_key(&5));
    // The session dies: both come back, whole.
    t.requeue();
    assert_eq!(t.vols[0].unsent.blocks.iter().collect::<Vec<_>>(), [3, 5]);
    assert!(t.vols[0].unsent.pages.is_empty());
}

#[test]
fn reads_per_write_and_the_partial_pause() {
    let mut t = ranged();
    t.source.pending[0].bytes = 8192;
    t.collect().unwrap();
    t.note_read(1 << 20, false, 0);
    assert_eq!(
        t.stats.read_per_written,
        Some(0.0),
        "a full scan is not counted"
    );
    t.note_read(12288, true, 2);
    assert_eq!(t.stats.read_per_written, Some(1.5));
    assert_eq!(t.stats.read_bytes_total, (1 << 20) + 12288);
    assert_eq!(t.stats.partial_blocks_total, 2);
    assert!(t.partial_allowed());
    t.pause_partial();
    assert!(!t.partial_allowed());
    t.plan();
    t.durable();
    assert!(t.partial_allowed(), "a durable point ends the pause");
}
