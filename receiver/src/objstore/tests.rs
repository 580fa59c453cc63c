//! The object store's bookkeeping against an in-memory store: segments
//! chain, a failed commit's upload is replaced, a missing pack comes back,
//! eviction keeps what is not in the bucket, `reconcile` drops what no
//! commit reached.
#![allow(clippy::unwrap_used)] // test code

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use object_store::memory::InMemory;

use super::client::segment_name;
use super::{Offsite, StoreKey, StoreUrl};
use crate::pack::pack_path;

fn offsite(dir: &std::path::Path, budget: u64) -> Offsite {
    std::fs::create_dir_all(dir.join("packs")).unwrap();
    Offsite::with_client(
        dir,
        StoreUrl::parse("s3://bucket/site").unwrap(),
        Arc::new(InMemory::new()),
        StoreKey::from_bytes(&[5; 32]),
        budget,
    )
    .unwrap()
}

fn write_pack(dir: &std::path::Path, id: u64, bytes: &[u8]) {
    std::fs::write(pack_path(dir, id), bytes).unwrap();
}

fn names(o: &Offsite) -> Vec<String> {
    use futures_util::StreamExt;
    let mut v: Vec<String> = o.block_on(async {
        o.client
            .list(None)
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await
    });
    v.sort();
    v
}

#[test]
fn segments_chain_and_an_upload_no_commit_reached_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = offsite(dir, u64::MAX);
    let first: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    write_pack(dir, 1, &first);
    o.upload_packs(&[(1, 0, 1000)]).unwrap();
    // A point uploads 1000..1500, then its commit is refused: the pack is
    // cut back to 1000 and other bytes are written there.
    let mut refused = first.clone();
    refused.extend(std::iter::repeat_n(0xAA, 500));
    write_pack(dir, 1, &refused);
    o.upload_packs(&[(1, 1000, 1500)]).unwrap();
    let mut now = first.clone();
    now.extend(std::iter::repeat_n(0xBB, 800));
    write_pack(dir, 1, &now);
    o.upload_packs(&[(1, 1000, 1800)]).unwrap();
    assert_eq!(
        names(&o),
        vec![
            format!("site/{}", segment_name(1, 0, 1000)),
            format!("site/{}", segment_name(1, 1000, 1800)),
        ]
    );
    // Nothing to do when the bucket has it all.
    o.upload_packs(&[(1, 1800, 1800)]).unwrap();
    std::fs::remove_file(pack_path(dir, 1)).unwrap();
    o.fetch_pack(1).unwrap();
    assert_eq!(std::fs::read(pack_path(dir, 1)).unwrap(), now);
}

#[test]
fn eviction_keeps_open_packs_and_what_the_bucket_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = offsite(dir, 1500);
    for id in 1..=4 {
        write_pack(dir, id, &[id as u8; 1000]);
    }
    o.upload_packs(&[(1, 0, 1000), (3, 0, 1000), (4, 0, 1000)])
        .unwrap();
    // Pack 2 is not in the bucket; pack 4 is open.
    o.evict(&HashSet::from([4])).unwrap();
    assert!(!pack_path(dir, 1).exists());
    assert!(pack_path(dir, 2).exists());
    assert!(!pack_path(dir, 3).exists());
    assert!(pack_path(dir, 4).exists());
}

#[test]
fn reconcile_drops_uploads_past_the_committed_length_and_of_unknown_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = offsite(dir, u64::MAX);
    write_pack(dir, 1, &[1; 900]);
    write_pack(dir, 2, &[2; 100]);
    o.upload_packs(&[(1, 0, 400), (2, 0, 100)]).unwrap();
    o.upload_packs(&[(1, 400, 900)]).unwrap();
    o.reconcile(&HashMap::from([(1, 400)]), &Default::default())
        .unwrap();
    assert_eq!(names(&o), vec![format!("site/{}", segment_name(1, 0, 400))]);
}

#[test]
fn a_damaged_segment_is_named_when_its_pack_is_fetched() {
    use object_store::ObjectStoreExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = offsite(dir, u64::MAX);
    write_pack(dir, 7, &[7; 5000]);
    o.upload_packs(&[(7, 0, 5000)]).unwrap();
    let name = segment_name(7, 0, 5000);
    let path = o.url.path(&name);
    let mut bytes = o
        .block_on(async { o.client.get(&path).await.unwrap().bytes().await })
        .unwrap()
        .to_vec();
    bytes[100] ^= 1;
    o.block_on(o.client.put(&path, bytes.into())).unwrap();
    std::fs::remove_file(pack_path(dir, 7)).unwrap();
    let err = o.fetch_pack(7).unwrap_err().to_string();
    assert!(err.contains(&name), "{err}");
    assert!(!pack_path(dir, 7).exists());
}

/// Every row of every table but the journal, in a stable order.
fn dump(db: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut out = Vec::new();
    for t in super::journal::shapes(&conn).unwrap() {
        let sql = format!(
            "SELECT quote(\"{}\") FROM \"{}\"",
            t.cols.join("\"), quote(\""),
            t.name
        );
        let sql = sql.replace("quote(\"rowid\")", "quote(rowid)");
        let mut stmt = conn.prepare(&sql).unwrap();
        let n = stmt.column_count();
        let mut rows: Vec<String> = stmt
            .query_map([], |r| {
                let v: Vec<String> = (0..n).map(|i| r.get::<_, String>(i).unwrap()).collect();
                Ok(format!("{}: {}", t.name, v.join(", ")))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        rows.sort();
        out.extend(rows);
    }
    let mut seq = conn
        .prepare("SELECT name, seq FROM sqlite_sequence WHERE name <> 'journal' ORDER BY name")
        .unwrap();
    out.extend(
        seq.query_map([], |r| {
            Ok(format!(
                "seq {}: {}",
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?
            ))
        })
        .unwrap()
        .map(Result::unwrap),
    );
    out
}

#[test]
fn the_journal_after_a_snapshot_rebuilds_the_catalog_exactly_and_twice_is_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join(crate::store::CATALOG_FILE);
    drop(crate::catalog::Catalog::open(&db).unwrap());
    let o = offsite(dir, u64::MAX);
    o.ship().unwrap(); // installs the triggers
    assert_eq!(
        super::journal::install(&rusqlite::Connection::open(&db).unwrap()).unwrap(),
        0,
        "installing twice changes nothing"
    );
    let sql = |s: &str| {
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(s)
            .unwrap()
    };
    sql("INSERT INTO servers(id, name) VALUES(1, 'web1');
         INSERT INTO volumes(id, server_id, name, block_size, size) VALUES(1, 1, 'root', 4096, 65536);
         INSERT INTO points(server_id, created_ms, consistency, commit_mode, seq) VALUES(1, 10, 'c', 'm', 1);
         INSERT INTO point_blocks VALUES(1, 0, 1, x'01'), (1, 1, 1, NULL);
         INSERT INTO blocks VALUES(x'01', 1, 16, 100, 4096, 1);
         INSERT INTO packs VALUES(1, 116);
         INSERT INTO meta VALUES('k', 'v');");
    o.ship().unwrap();
    let (snap, covered) = super::snapshot::vacuum_into(dir).unwrap();
    assert!(covered > 0);
    // After the snapshot: a point, a prune that frees its number for a
    // row of another id (a unique index crossed), a GC move, an update.
    sql("INSERT INTO points(server_id, created_ms, consistency, commit_mode, seq) VALUES(1, 20, 'c', 'm', 2);
         INSERT INTO point_blocks VALUES(1, 0, 2, x'02');
         INSERT INTO blocks VALUES(x'02', 1, 116, 50, 4096, 1);
         UPDATE packs SET committed_len = 166 WHERE id = 1;");
    o.ship().unwrap();
    sql("DELETE FROM point_blocks WHERE point_id = 1;
         DELETE FROM points WHERE id = 1;
         UPDATE points SET seq = 1 WHERE id = 2;
         DELETE FROM blocks WHERE hash = x'01';
         UPDATE blocks SET pack_id = 2, offset = 16 WHERE hash = x'02';
         INSERT INTO packs VALUES(2, 66);
         DELETE FROM packs WHERE id = 1;
         UPDATE meta SET value = 'w' WHERE key = 'k';");
    o.ship().unwrap();
    let want = dump(&db);
    let rebuilt = dir.join("rebuilt.db");
    std::fs::write(&rebuilt, &snap).unwrap();
    assert_ne!(
        dump(&rebuilt),
        want,
        "the snapshot alone misses the changes"
    );
    let r = o.replay(&rebuilt).unwrap();
    assert_eq!(r.records, 2);
    assert_eq!(dump(&rebuilt), want);
    // Again: nothing left to apply, nothing changes.
    let r = o.replay(&rebuilt).unwrap();
    assert_eq!(r.records, 0);
    assert_eq!(dump(&rebuilt), want);
    // From an older copy too (records applied over a later state).
    std::fs::write(&rebuilt, &snap).unwrap();
    let conn = rusqlite::Connection::open(&rebuilt).unwrap();
    conn.execute(
        "UPDATE sqlite_sequence SET seq = 0 WHERE name = 'journal'",
        [],
    )
    .unwrap();
    drop(conn);
    o.replay(&rebuilt).unwrap();
    assert_eq!(dump(&rebuilt), want);
    // A snapshot trims the records it covers.
    let before = names(&o).iter().filter(|n| n.contains("journal/")).count();
    o.block_on(o.trim_journal(covered)).unwrap();
    let after = names(&o).iter().filter(|n| n.contains("journal/")).count();
    assert_eq!((before, after), (3, 2));
}

#[test]
fn a_record_cut_short_is_passed_over_and_a_missing_one_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join(crate::store::CATALOG_FILE);
    drop(crate::catalog::Catalog::open(&db).unwrap());
    let o = offsite(dir, u64::MAX);
    o.ship().unwrap();
    let (snap, _) = super::snapshot::vacuum_into(dir).unwrap();
    let sql = |s: &str| {
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(s)
            .unwrap()
    };
    sql("INSERT INTO servers(id, name) VALUES(1, 'web1');");
    o.ship().unwrap();
    sql("INSERT INTO servers(id, name) VALUES(2, 'web2');");
    o.ship().unwrap();
    let records: Vec<String> = names(&o)
        .into_iter()
        .filter(|n| n.contains("journal/"))
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    use object_store::ObjectStoreExt;
    let rebuilt = dir.join("rebuilt.db");
    // The last record without its last part: as if its ship was cut.
    let last = object_store::path::Path::from(records[1].as_str());
    let bytes = o.block_on(async { o.client.get(&last).await.unwrap().bytes().await.unwrap() });
    o.block_on(o.client.delete(&last)).unwrap();
    let cut = records[1].strip_suffix(".last").unwrap();
    o.block_on(
        o.client
            .put(&object_store::path::Path::from(cut), bytes.clone().into()),
    )
    .unwrap();
    std::fs::write(&rebuilt, &snap).unwrap();
    assert_eq!(o.replay(&rebuilt).unwrap().records, 1);
    // The first one gone: refused, not a silent older catalog.
    o.block_on(o.client.put(&last, bytes.into())).unwrap();
    let first = object_store::path::Path::from(records[0].as_str());
    o.block_on(o.client.delete(&first)).unwrap();
    std::fs::write(&rebuilt, &snap).unwrap();
    let err = o.replay(&rebuilt).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn streamed_segments_stay_only_while_the_file_holds_their_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = offsite(dir, u64::MAX);
    o.upload_packs(&[]).unwrap(); // lists the bucket, as serve's start does
    let mib = 1 << 20;
    // Only whole segments stream: 16 MiB of the 17.
    let a: Vec<u8> = (0..17 * mib).map(|i| (i % 253) as u8).collect();
    write_pack(dir, 1, &a);
    write_pack(dir, 2, &a);
    o.stream_once().unwrap();
    assert_eq!(o.uploaded_to(1), 16 * mib as u64);
    assert_eq!(o.uploaded_to(2), 16 * mib as u64);
    // Pack 1: the point grows on and commits; only the rest goes up.
    let mut a1 = a.clone();
    a1.extend(std::iter::repeat_n(1u8, mib));
    write_pack(dir, 1, &a1);
    o.upload_packs(&[(1, 0, 18 * mib as u64)]).unwrap();
    // Pack 2: its streamed bytes were cut and written anew before the commit.
    let mut a2 = a.clone();
    a2[5 * mib] ^= 0xFF;
    write_pack(dir, 2, &a2);
    o.upload_packs(&[(2, 0, 17 * mib as u64)]).unwrap();
    let segs: Vec<String> = names(&o)
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    let seg = |pack, s: usize, e: usize| {
        format!(
            "site/{}",
            segment_name(pack, (s * mib) as u64, (e * mib) as u64)
        )
    };
    assert_eq!(
        segs,
        vec![seg(1, 0, 16), seg(1, 16, 18), seg(2, 0, 16), seg(2, 16, 17)]
    );
    for (id, want) in [(1, &a1), (2, &a2)] {
        std::fs::remove_file(pack_path(dir, id)).unwrap();
        o.fetch_pack(id).unwrap();
        assert!(
            std::fs::read(pack_path(dir, id)).unwrap() == *want,
            "pack {id}"
        );
    }
}

#[test]
fn uploads_are_cut_into_segments_of_at_most_segment_max() {
    use super::upload::{pieces, SEGMENT_MAX};
    let m = SEGMENT_MAX;
    let got: Vec<(u64, u64)> = pieces(7, 7 + 2 * m + 5).collect();
    assert_eq!(
        got,
        vec![(7, 7 + m), (7 + m, 7 + 2 * m), (7 + 2 * m, 7 + 2 * m + 5)]
    );
    assert_eq!(pieces(9, 9).count(), 0);
}
