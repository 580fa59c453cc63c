//! Garbage collection: free the pack space that no point needs any more.
//!
//! Pruning removes points from the catalog only; the blocks they alone
//! referenced stay in their packs. A collection finds those blocks and, pack
//! by pack, drops a pack with nothing live in it, or copies the live records
//! of a mostly-dead pack into a new pack and drops the old one.
//!
//! Safe against a kill at any moment, because every step is ordered so that
//! the catalog never names a location that is not durable:
//!
//! 1. live records are copied to a new pack, which is fsynced (a crash here
//!    leaves a pack no commit reached: removed at the next start);
//! 2. one catalog transaction moves the live rows, deletes the dead ones and
//!    the old pack's row, and commits the new pack's length;
//! 3. the old pack file is removed (a crash before this leaves a pack the
//!    catalog no longer knows: removed at the next start).
//!
//! A collection also drops the `server_blocks` rows of blocks a server's
//! points no longer reference (its quota usage goes down with them).
//!
//! Concurrent replication (inside `serve`) is coordinated through the
//! store's gate: a data stream holds it for reading from looking a hash up
//! until the reference is recorded in its session. The collection works out
//! by SQL which blocks no point or sync refers to (`catalog::gc`: temporary
//! tables on a connection of its own, so memory holds one pack's rows at a
//! time), then takes the gate for writing once, collects the sessions' pins
//! (hashes their pending points refer to, packs they write to) and moves
//! the rows of the unreferenced, unpinned blocks out of the block index
//! into `gc_doomed`; from then on nobody can start referring to them (a
//! stream writes a fresh copy instead, and the catalog keeps the newest
//! location of a hash). Doomed blocks that a point committed meanwhile
//! refers to go back, and so do those of packs left as they are; only the
//! rest are deleted. A kill leaves `gc_doomed` rows, put back into the
//! index when the store next opens to serve.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::Arc;

use pilotlight_protocol::block::Decoder;
use pilotlight_protocol::BlockHash;

use crate::catalog::{Catalog, PackBlocks};
use crate::pack::{
    pack_path, BlockLoc, PackReader, PackWriter, PACK_HEADER_LEN, RECORD_HEADER_LEN,
};
use crate::store::{sync_dir, Store, CATALOG_FILE};
use crate::ReceiveError;

/// What uncommitted points of live sessions hold on to.
#[derive(Debug, Default)]
pub struct Pins {
    /// Hashes pending points refer to.
    pub hashes: HashSet<BlockHash>,
    /// Packs pending points have written to.
    pub packs: HashSet<u64>,
}

/// How eagerly to rewrite packs.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Rewrite a pack once at least this percentage of its bytes is dead
    /// (a pack with nothing live is always removed).
    pub min_dead_percent: u8,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            min_dead_percent: 20,
        }
    }
}

/// What a collection did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    /// Packs examined.
    pub packs_examined: u64,
    /// Packs removed because nothing in them was live.
    pub packs_removed: u64,
    /// Packs whose live records were copied to a new pack.
    pub packs_rewritten: u64,
    /// Dead blocks dropped.
    pub blocks_dropped: u64,
    /// Live bytes copied.
    pub bytes_copied: u64,
    /// Pack bytes freed.
    pub bytes_freed: u64,
    /// Packs left alone because a live block in them failed its check
    /// (`verify` names the points that need it).
    pub packs_damaged: Vec<u64>,
}

/// Collect garbage in `store`. `pins` is asked, with the index held for
/// writing, for what live sessions hold on to (nothing, outside `serve`).
///
/// What is live and what is dead is worked out by SQL over the catalog, on
/// a connection of the collection's own (its temporary tables on disk):
/// memory holds one pack's rows at a time and the sessions' pins, not sets
/// of the store's blocks.
pub fn collect(
    store: &Store,
    pins: &dyn Fn() -> Result<Pins, ReceiveError>,
    opts: GcOptions,
) -> Result<GcReport, ReceiveError> {
    store.close_pooled_writers();
    let mut gc = Catalog::open(&store.dir().join(CATALOG_FILE))?;
    let result = collect_with(store, &mut gc, pins, opts);
    // Whatever happened, blocks still doomed go back into the index.
    let undoomed = gc.undoom_all();
    let report = result?;
    undoomed?;
    crate::objstore::after_gc(store.dir())?;
    Ok(report)
}

fn collect_with(
    store: &Store,
    gc: &mut Catalog,
    pins: &dyn Fn() -> Result<Pins, ReceiveError>,
    opts: GcOptions,
) -> Result<GcReport, ReceiveError> {
    // The packs committed before the collection: later ones may still be
    // written to.
    let mut sorted = store.catalog()?.packs()?;
    sorted.sort_unstable();
    // With an object store, it must answer before anything is doomed (one
    // clear error, not every pack found missing).
    crate::objstore::cache::reachable_for(store.dir(), sorted.iter().map(|(p, _)| *p))?;
    let mark = gc.gc_mark()?;
    let busy = doom_garbage(store, gc, pins)?;
    let dropped = gc.gc_settle(mark)?;
    store.index().forget_owners()?;
    store.owners().reload(gc)?;
    if dropped > 0 {
        tracing::info!(
            rows = dropped,
            "servers no longer charged for blocks they dropped"
        );
    }
    let mut collector = Collector::new(store)?;
    for (pack, committed_len) in sorted {
        if busy.contains(&pack) {
            continue;
        }
        let blocks = gc.gc_pack_blocks(pack)?;
        collector.pack(pack, committed_len, blocks, opts)?;
    }
    Ok(collector.finish())
}

/// Take the unreferenced, unpinned blocks out of the index (into
/// `gc_doomed`), with the gate held for writing while `pins` answers.
/// Returns the packs that are busy (open for writing, or written by
/// pending points).
fn doom_garbage(
    store: &Store,
    gc: &mut Catalog,
    pins: &dyn Fn() -> Result<Pins, ReceiveError>,
) -> Result<HashSet<u64>, ReceiveError> {
    let _gate = store.index_write()?;
    let pins = pins()?;
    let mut busy = store.open_packs();
    busy.extend(pins.packs.iter().copied());
    let pinned: Vec<BlockHash> = pins.hashes.into_iter().collect();
    let busy_list: Vec<u64> = busy.iter().copied().collect();
    let doomed = gc.gc_doom(&pinned, &busy_list)?;
    store.index().forget_all()?;
    tracing::debug!(doomed, "blocks taken out of the index");
    Ok(busy)
}

/// One collection's pass over the packs, one pack at a time.
struct Collector<'a> {
    store: &'a Store,
    reader: PackReader,
    decoder: Decoder,
    writer: PackWriter,
    /// The new packs written: file and length.
    written: HashMap<u64, (Arc<File>, u64)>,
    payload: Vec<u8>,
    scratch: Vec<u8>,
    report: GcReport,
}

impl<'a> Collector<'a> {
    fn new(store: &'a Store) -> Result<Self, ReceiveError> {
        let reader = PackReader::new(store.dir());
        let decoder = Decoder::new().map_err(|e| ReceiveError::storage(store.dir(), e))?;
        Ok(Self {
            store,
            reader,
            decoder,
            writer: store.new_writer(),
            written: HashMap::new(),
            payload: Vec::new(),
            scratch: Vec::new(),
            report: GcReport::default(),
        })
    }

    /// Drop or rewrite `pack` (its catalog rows: live, and dead ones taken
    /// out of the index), or leave it as it is when it is mostly live or a
    /// live block in it is damaged (its dead blocks then go back into the
    /// index when the collection ends, and so stay findable).
    fn pack(
        &mut self,
        pack: u64,
        committed_len: u64,
        blocks: PackBlocks,
        opts: GcOptions,
    ) -> Result<(), ReceiveError> {
        self.report.packs_examined += 1;
        let PackBlocks { live, dead } = blocks;
        // Dead: the blocks found dead, and records no row names any more
        // (a newer copy won, or a copy that never committed).
        let total = committed_len.saturating_sub(PACK_HEADER_LEN);
        let live_bytes: u64 = live.iter().map(|(_, l)| record_len(l)).sum();
        let dead_bytes = total.saturating_sub(live_bytes);
        let keep = dead_bytes == 0 || dead_bytes * 100 < u64::from(opts.min_dead_percent) * total;
        if !live.is_empty() && keep {
            return Ok(());
        }
        let Some(moved) = self.copy_live(pack, &live)? else {
            self.report.packs_damaged.push(pack);
            return Ok(());
        };
        self.commit(pack, committed_len, &moved, &dead)
    }

    /// Copy the `live` records of `pack` into new packs, each checked
    /// first; `None` when one fails its check.
    fn copy_live(
        &mut self,
        pack: u64,
        live: &[(BlockHash, BlockLoc)],
    ) -> Result<Option<Vec<(BlockHash, BlockLoc)>>, ReceiveError> {
        let mut moved = Vec::with_capacity(live.len());
        for (h, loc) in live {
            let (payload, scratch, decoder) =
                (&mut self.payload, &mut self.scratch, &mut self.decoder);
            let checked = self.reader.read(loc, h, payload).and_then(|()| {
                decoder
                    .verify(loc.encoding, payload, loc.raw_len, h, scratch)
                    .map_err(|e| ReceiveError::Corrupt(format!("block {}: {e}", h.to_hex())))
            });
            if let Err(e) = checked {
                tracing::error!(pack, cause = %e, "live block fails its check; pack left as it is");
                return Ok(None);
            }
            let store = self.store;
            let (new, file) =
                self.writer
                    .append(h, loc.encoding, loc.raw_len, &self.payload, || {
                        store.alloc_pack_id()
                    })?;
            let e = self.written.entry(new.pack).or_insert((file.file, 0));
            e.1 = e.1.max(new.end());
            moved.push((*h, new));
        }
        Ok(Some(moved))
    }

    /// Make the copies durable, move the rows in one catalog transaction,
    /// then remove `pack` if nothing is left in it.
    fn commit(
        &mut self,
        pack: u64,
        committed_len: u64,
        moved: &[(BlockHash, BlockLoc)],
        dead: &[(BlockHash, BlockLoc)],
    ) -> Result<(), ReceiveError> {
        let store = self.store;
        for (id, (file, _)) in &self.written {
            file.sync_data()
                .map_err(|e| ReceiveError::storage(pack_path(store.dir(), *id), e))?;
        }
        let new_packs: Vec<(u64, u64)> = self
            .written
            .iter()
            .map(|(id, (_, len))| (*id, *len))
            .collect();
        let uploads: Vec<(u64, u64, u64)> = new_packs
            .iter()
            .map(|(id, end)| (*id, store.committed_len(*id), *end))
            .collect();
        crate::objstore::seal_packs(store.dir(), &uploads)?;
        let dead_hashes: Vec<BlockHash> = dead.iter().map(|(h, _)| *h).collect();
        let emptied = {
            let mut cat = store.catalog()?;
            let emptied = cat.collect_pack(pack, moved, &dead_hashes, &new_packs)?;
            // With the catalog still held, as commits do: the index's
            // cache follows it.
            store.index().moved(pack, moved)?;
            emptied
        };
        store.note_committed(&new_packs)?;
        let report = &mut self.report;
        report.blocks_dropped += dead.len() as u64;
        report.bytes_copied += moved.iter().map(|(_, l)| record_len(l)).sum::<u64>();
        if emptied {
            let path = pack_path(store.dir(), pack);
            let len = std::fs::metadata(&path).map_or(committed_len, |m| m.len());
            match std::fs::remove_file(&path) {
                // Evicted from the cache of an object store: only there.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r.map_err(|e| ReceiveError::storage(&path, e))?,
            }
            sync_dir(&store.dir().join("packs"))?;
            crate::objstore::pack_removed(store.dir(), pack)?;
            store.forget_pack(pack);
            report.bytes_freed += len;
            if moved.is_empty() {
                report.packs_removed += 1;
            } else {
                report.packs_rewritten += 1;
            }
            tracing::info!(
                pack,
                moved = moved.len(),
                dropped = dead.len(),
                "collected pack"
            );
        }
        Ok(())
    }

    /// The report: what the new packs take is not freed.
    fn finish(self) -> GcReport {
        let mut report = self.report;
        // What the new packs take: the live records and their own headers.
        let new_pack_bytes = report.bytes_copied + PACK_HEADER_LEN * self.written.len() as u64;
        report.bytes_freed = report.bytes_freed.saturating_sub(new_pack_bytes);
        report
    }
}

fn record_len(loc: &BlockLoc) -> u64 {
    RECORD_HEADER_LEN as u64 + u64::from(loc.stored_len)
}
