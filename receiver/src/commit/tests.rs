//! The committer over a real store in a temp dir, with no socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use pilotlight_protocol::frame::{CommitMode, Consistency};
use pilotlight_protocol::{BlockHash, Encoding};
use tokio_util::sync::CancellationToken;

use super::{Committer, EndPoint};
use crate::catalog::BlockRef;
use crate::session::{Session, SessionVolume};
use crate::store::Store;
use crate::ReceiveError;

const BS: u32 = 4096;

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    store: Arc<Store>,
    session: Arc<Session>,
}

/// A store with server `web` enrolled and a session of it over one volume
/// of four blocks.
fn fixture() -> Fixture {
    fixture_spilling(crate::session::SPILL_REFS)
}

/// [`fixture`] whose session spills a point every `spill_refs` references.
fn fixture_spilling(spill_refs: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("receiver");
    crate::admin::init(&dir, None).unwrap();
    crate::admin::enroll(&dir, "web", &tmp.path().join("web.pem")).unwrap();
    let store = Arc::new(Store::open_for_serve(&dir).unwrap());
    let row = store.catalog().unwrap().require_server("web").unwrap();
    let mut session = Session::new(
        1,
        row.id,
        "web".into(),
        CommitMode::Sync,
        1,
        vec![SessionVolume {
            name: "root".into(),
            size: 4 * u64::from(BS),
            block_size: BS,
        }],
        CancellationToken::new(),
        4,
        store.clone(),
        8 << 20,
    );
    session.serial = row.cert_serial.unwrap();
    session.spill_refs = spill_refs;
    Fixture {
        _tmp: tmp,
        dir,
        store,
        session: Arc::new(session),
    }
}

impl Fixture {
    /// Store block `index` of point `tag` as a data stream would.
    fn block(&self, tag: u64, index: u64, fill: u8) -> BlockHash {
        let data = vec![fill; BS as usize];
        let hash = BlockHash::of(&data);
        let mut w = self.store.take_writer();
        let (loc, pack) = w
            .append(&hash, Encoding::Raw, BS, &data, || {
                self.store.alloc_pack_id()
            })
            .unwrap();
        let r = BlockRef {
            volume: 0,
            index,
            raw_len: BS,
            hash: Some(hash),
        };
        self.session
            .record(tag, r, Some((hash, loc, pack.file)))
            .unwrap();
        self.session.retire_writer(w);
        hash
    }

    fn committer(&self, idle: Duration) -> Committer {
        Committer::new(self.store.clone(), idle)
    }

    fn latest(&self) -> Option<i64> {
        self.store
            .catalog()
            .unwrap()
            .latest_point(self.session.server_id)
            .unwrap()
    }
}

fn end(tag: u64, blocks: u64) -> EndPoint {
    EndPoint {
        tag,
        blocks,
        created_ms: 1_700_000_000_000,
        consistency: Consistency::CrashConsistent,
        commit: CommitMode::Sync,
    }
}

#[tokio::test]
async fn a_point_whose_blocks_arrived_becomes_a_catalog_point() {
    let f = fixture();
    let a = f.block(1, 0, 1);
    let b = f.block(1, 2, 2);
    let point = f
        .committer(Duration::from_secs(30))
        .commit(&f.session, end(1, 2))
        .await
        .unwrap();
    assert_eq!(f.latest(), Some(point.key));
    // The server's first point is its point 1.
    assert_eq!(point.seq, 1);
    assert!(f.store.lookup(&a).is_some() && f.store.lookup(&b).is_some());
    let st = f.session.state().unwrap();
    assert_eq!(st.committed_tag, 1);
    assert!(st.committing.is_empty() && st.pending.is_empty());
    drop(st);
    // What the catalog says is committed is on disk in the pack.
    let packs = f.store.catalog().unwrap().packs().unwrap();
    for (id, len) in packs {
        let on_disk = std::fs::metadata(crate::store::pack_file(&f.dir, id))
            .unwrap()
            .len();
        assert!(on_disk >= len, "pack {id}: {on_disk} < {len}");
    }
}

#[tokio::test]
async fn the_commit_waits_for_blocks_still_on_their_way() {
    let f = Arc::new(fixture());
    f.block(1, 0, 1);
    let g = f.clone();
    let commit = tokio::spawn(async move {
        g.committer(Duration::from_secs(30))
            .commit(&g.session, end(1, 2))
            .await
    });
    tokio::task::yield_now().await;
    let late = f.block(1, 1, 3);
    let point = commit.await.unwrap().unwrap();
    assert_eq!(f.latest(), Some(point.key));
    assert!(f.store.lookup(&late).is_some());
}

#[tokio::test]
async fn refusals_commit_nothing() {
    type Check = fn(&ReceiveError) -> bool;
    let cases: [(&str, EndPoint, Check); 2] = [
        (
            "tag out of order",
            end(2, 1),
            |e| matches!(e, ReceiveError::Protocol(m) if m.contains("out of order")),
        ),
        (
            "more blocks than announced",
            end(1, 0),
            |e| matches!(e, ReceiveError::Protocol(m) if m.contains("announced 0 blocks but 1")),
        ),
    ];
    for (what, e, expected) in cases {
        let f = fixture();
        f.block(1, 0, 1);
        let err = f
            .committer(Duration::from_secs(30))
            .commit(&f.session, e)
            .await
            .unwrap_err();
        assert!(expected(&err), "{what}: {err}");
        assert_eq!(f.latest(), None, "{what}");
    }
}

#[tokio::test]
async fn a_revoked_identity_commits_nothing_more() {
    let f = fixture();
    f.block(1, 0, 1);
    crate::admin::revoke(&f.dir, "web").unwrap();
    let err = f
        .committer(Duration::from_secs(30))
        .commit(&f.session, end(1, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ReceiveError::Unauthorized(_)), "{err}");
    assert_eq!(f.latest(), None);
    assert_eq!(f.session.state().unwrap().committed_tag, 0);
}

#[tokio::test]
async fn blocks_that_stop_arriving_time_out() {
    let f = fixture();
    let err = f
        .committer(Duration::from_millis(10))
        .commit(&f.session, end(1, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ReceiveError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn a_cancelled_session_gives_its_reason() {
    let f = fixture();
    f.session.cancel.cancel();
    let err = f
        .committer(Duration::from_secs(30))
        .commit(&f.session, end(1, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ReceiveError::Superseded), "{err}");
}

/// A point bigger than the session's spill bound: its references go to the
/// catalog as the server's in-progress sync (the receiver's own, never a
/// point) as they arrive, zero runs with them, and the commit takes them
/// in, in the order received.
#[tokio::test]
async fn a_point_is_spilled_as_it_arrives_and_commits_whole() {
    let f = fixture_spilling(2);
    let in_memory = |f: &Fixture| {
        let st = f.session.state().unwrap();
        st.pending
            .get(&1)
            .map_or(0, |p| p.refs.len() + p.zero_runs.len())
    };
    let synced = |f: &Fixture| {
        let cat = f.store.catalog().unwrap();
        cat.sync_of(f.session.server_id).unwrap().map(|r| r.blocks)
    };
    f.block(1, 0, 1);
    f.session.spill().unwrap();
    assert_eq!((in_memory(&f), synced(&f)), (1, None), "under the bound");
    f.block(1, 1, 2);
    f.session.spill().unwrap();
    assert_eq!((in_memory(&f), synced(&f)), (0, Some(2)));
    assert!(f.session.state().unwrap().sync.unwrap().spilled);
    // Block 2, then a run that zeroes block 0, then block 3: spilled
    // together, the run in its place.
    let h3 = f.block(1, 2, 3);
    f.session
        .record_zeros(&pilotlight_protocol::ZeroRunFrame {
            tag: 1,
            volume: 0,
            first: 0,
            count: 1,
        })
        .unwrap();
    let h5 = f.block(1, 3, 5);
    f.session.spill().unwrap();
    assert_eq!((in_memory(&f), synced(&f)), (0, Some(4)));
    // Block 1 again, kept in memory: the copy received last wins.
    let h4 = f.block(1, 1, 4);
    assert_eq!(f.latest(), None, "a spilled point is not a point");
    // Garbage collection keeps every block of the spilled part.
    let live = f.store.catalog().unwrap().referenced_hashes().unwrap();
    assert!(live.contains(&h3) && live.contains(&h5));

    let c = f.committer(Duration::from_secs(5));
    let point = c.commit(&f.session, end(1, 6)).await.unwrap();
    let cat = f.store.catalog().unwrap();
    assert!(cat.sync_of(f.session.server_id).unwrap().is_none());
    let vol = cat.volume(f.session.server_id, "root").unwrap().unwrap();
    assert_eq!(
        cat.block_map(vol.id, point.key, 0).unwrap(),
        vec![(0, None), (1, Some(h4)), (2, Some(h3)), (3, Some(h5))]
    );
    let info = cat.points(Some("web")).unwrap();
    assert_eq!(info[0].volumes[0].changed_bytes, 4 * u64::from(BS));
    drop(cat);
    for h in [h3, h4, h5] {
        assert!(f.store.lookup(&h).is_some());
    }
}

/// A session that dies after a spill leaves no point, and a store that
/// opens; the server's next point drops the spilled sync.
#[tokio::test]
async fn a_spilled_point_that_never_commits_leaves_no_point() {
    let f = fixture_spilling(1);
    f.block(1, 0, 1);
    f.session.spill().unwrap();
    let server = f.session.server_id;
    let Fixture {
        _tmp,
        dir,
        store,
        session,
        ..
    } = f;
    drop(session);
    drop(store);
    let store = Store::open_for_serve(&dir).unwrap();
    let cat = store.catalog().unwrap();
    assert_eq!(cat.latest_point(server).unwrap(), None);
    assert_eq!(cat.sync_of(server).unwrap().map(|r| r.blocks), Some(1));
}

/// No spill while an agent's checkpoint of the point is under way: that
/// checkpoint attaches the agent's sync, which the receiver never adds to.
#[tokio::test]
async fn no_spill_while_the_agent_checkpoints_the_point() {
    let f = fixture_spilling(1);
    let held = |f: &Fixture| f.session.state().unwrap().pending[&1].refs.len();
    let part = Arc::new(crate::session::PendingPoint::default());
    f.session.state().unwrap().committing.insert(1, part);
    f.block(1, 0, 1);
    f.session.spill().unwrap();
    assert_eq!(held(&f), 1);
    f.session.state().unwrap().committing.remove(&1);
    f.block(1, 1, 2);
    f.session.spill().unwrap();
    assert_eq!(held(&f), 0);
}
