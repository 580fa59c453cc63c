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
    o.reconcile(&HashMap::from([(1, 400)])).unwrap();
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
