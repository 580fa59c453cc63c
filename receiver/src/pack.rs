//! Pack files: append-only files of compressed blocks.
//!
//! ```text
//! pack file:  magic "PLPACK01" (8) | reserved u64 = 0 | record*
//! record:     magic "PLBK" (4) | encoding u8 | reserved [3] | raw_len u32
//!             | stored_len u32 | hash [32] | payload [stored_len]
//! ```
//!
//! A record is self-describing (its hash is in its header), so a pack can be
//! checked or re-indexed without the catalog. The catalog records, per pack,
//! the length up to which every record is committed; anything past it is an
//! unfinished tail and is cut off when the receiver starts.

use std::collections::HashMap;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pilotlight_protocol::{BlockHash, Encoding};

use crate::ReceiveError;

/// Magic at the start of every pack file.
pub const PACK_MAGIC: [u8; 8] = *b"PLPACK01";
/// Length of the pack file header.
pub const PACK_HEADER_LEN: u64 = 16;
/// Magic at the start of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"PLBK";
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 48;
/// A pack is closed and a new one started past this size.
pub const PACK_TARGET_LEN: u64 = 1 << 30;

/// Where a stored block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLoc {
    /// Pack id.
    pub pack: u64,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Payload length.
    pub stored_len: u32,
    /// Raw block length.
    pub raw_len: u32,
    /// Payload encoding.
    pub encoding: Encoding,
}

impl BlockLoc {
    /// Offset just past this record.
    pub fn end(&self) -> u64 {
        self.offset + RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Path of pack `id` under the store directory.
pub fn pack_path(dir: &Path, id: u64) -> PathBuf {
    dir.join("packs").join(format!("{id:010}.pack"))
}

/// The id of a pack file name, if it is one.
pub fn parse_pack_name(name: &str) -> Option<u64> {
    name.strip_suffix(".pack")?.parse().ok()
}

fn encode_record_header(
    hash: &BlockHash,
    encoding: Encoding,
    raw_len: u32,
    stored_len: u32,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&RECORD_MAGIC);
    out.push(encoding as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&stored_len.to_le_bytes());
    out.extend_from_slice(hash.as_bytes());
}

/// Ids of the packs some [`PackWriter`] may still append to. Garbage
/// collection leaves these alone.
pub type OpenPacks = Arc<Mutex<HashSet<u64>>>;

/// Appends records to one pack file at a time, starting a new one past
/// [`PACK_TARGET_LEN`]. One writer per data stream; no locking.
pub struct PackWriter {
    dir: PathBuf,
    current: Option<OpenPack>,
    buf: Vec<u8>,
    open: OpenPacks,
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        self.set_current(None);
    }
}

/// A pack being written.
#[derive(Clone)]
pub struct OpenPack {
    /// Pack id.
    pub id: u64,
    /// The file, shared with the committer that fsyncs it.
    pub file: Arc<File>,
    len: u64,
}

impl PackWriter {
    /// A writer that creates packs under `dir/packs`, listing the pack it
    /// appends to in `open` for as long as it may append to it.
    pub fn new(dir: &Path, open: OpenPacks) -> Self {
        Self {
            dir: dir.to_owned(),
            current: None,
            buf: Vec::with_capacity(RECORD_HEADER_LEN + (4 << 20)),
            open,
        }
    }

    fn set_current(&mut self, pack: Option<OpenPack>) {
        if let Ok(mut open) = self.open.lock() {
            if let Some(old) = &self.current {
                open.remove(&old.id);
            }
            if let Some(new) = &pack {
                open.insert(new.id);
            }
        }
        self.current = pack;
    }

    /// Append one record; `next_id` allocates a pack id when a new pack is
    /// needed. Returns where it went and the pack it is in.
    pub fn append(
        &mut self,
        hash: &BlockHash,
        encoding: Encoding,
        raw_len: u32,
        payload: &[u8],
        next_id: impl FnOnce() -> u64,
    ) -> Result<(BlockLoc, OpenPack), ReceiveError> {
        if self
            .current
            .as_ref()
            .is_none_or(|p| p.len >= PACK_TARGET_LEN)
        {
            let id = next_id();
            // Listed as open before the file exists, so that no collection
            // that starts now can take it for garbage.
            if let Ok(mut open) = self.open.lock() {
                open.insert(id);
            }
            let path = pack_path(&self.dir, id);
            let file = File::options()
                .read(true)
                .write(true)
                .mode(crate::store::PRIVATE_FILE_MODE)
                .create_new(true)
                .open(&path)
                .map_err(|e| ReceiveError::storage(&path, e))?;
            let mut head = Vec::with_capacity(PACK_HEADER_LEN as usize);
            head.extend_from_slice(&PACK_MAGIC);
            head.extend_from_slice(&0u64.to_le_bytes());
            file.write_all_at(&head, 0)
                .and_then(|()| file.sync_all())
                .map_err(|e| ReceiveError::storage(&path, e))?;
            // The new name must survive a power loss before any commit can
            // reference it.
            let packs = self.dir.join("packs");
            File::open(&packs)
                .and_then(|d| d.sync_all())
                .map_err(|e| ReceiveError::storage(&packs, e))?;
            self.set_current(Some(OpenPack {
                id,
                file: Arc::new(file),
                len: PACK_HEADER_LEN,
            }));
        }
        let stored_len = u32::try_from(payload.len())
            .map_err(|_| ReceiveError::Protocol("payload too large".into()))?;
        self.buf.clear();
        encode_record_header(hash, encoding, raw_len, stored_len, &mut self.buf);
        self.buf.extend_from_slice(payload);
        let Some(pack) = self.current.as_mut() else {
            return Err(ReceiveError::Corrupt("pack writer lost its file".into()));
        };
        let offset = pack.len;
        pack.file
            .write_all_at(&self.buf, offset)
            .map_err(|e| ReceiveError::storage(pack_path(&self.dir, pack.id), e))?;
        pack.len += self.buf.len() as u64;
        let loc = BlockLoc {
            pack: pack.id,
            offset,
            stored_len,
            raw_len,
            encoding,
        };
        Ok((loc, pack.clone()))
    }
}

impl PackWriter {
    /// The pack this writer appends to, if it has one.
    pub fn current_pack(&self) -> Option<u64> {
        self.current.as_ref().map(|p| p.id)
    }

    /// Cut the current pack back to `committed` bytes: everything past it
    /// belongs to points that will never commit. Returns false if the file
    /// could not be cut (then the writer must not be reused).
    pub fn rollback(&mut self, committed: u64) -> bool {
        if committed == 0 {
            // Nothing in this pack was ever committed: remove it altogether.
            if let Some(p) = self.current.clone() {
                self.set_current(None);
                let path = pack_path(&self.dir, p.id);
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(pack = p.id, cause = %e, "cannot remove an abandoned pack");
                }
            }
            return true;
        }
        let Some(p) = self.current.as_mut() else {
            return true;
        };
        let keep = committed.max(PACK_HEADER_LEN);
        if p.len <= keep {
            return true;
        }
        match p.file.set_len(keep) {
            Ok(()) => {
                p.len = keep;
                true
            }
            Err(e) => {
                tracing::warn!(pack = p.id, cause = %e, "cannot cut an abandoned pack tail");
                false
            }
        }
    }
}

/// Reads records, keeping pack files open. One per thread.
pub struct PackReader {
    dir: PathBuf,
    files: HashMap<u64, File>,
    header: [u8; RECORD_HEADER_LEN],
}

impl PackReader {
    /// A reader of the packs under `dir/packs`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: HashMap::new(),
            header: [0; RECORD_HEADER_LEN],
        }
    }

    /// Read the payload of the record at `loc` into `out`, checking that its
    /// header matches what the catalog says (hash, lengths, encoding).
    pub fn read(
        &mut self,
        loc: &BlockLoc,
        hash: &BlockHash,
        out: &mut Vec<u8>,
    ) -> Result<(), ReceiveError> {
        let path = pack_path(&self.dir, loc.pack);
        if !self.files.contains_key(&loc.pack) {
            if self.files.len() > 64 {
                self.files.clear();
            }
            let f = match File::open(&path) {
                // Not in the local cache: from the object store, if any.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !crate::objstore::cache::fetch_missing(&self.dir, loc.pack)? {
                        return Err(ReceiveError::storage(&path, e));
                    }
                    File::open(&path)
                }
                r => r,
            }
            .map_err(|e| ReceiveError::storage(&path, e))?;
            self.files.insert(loc.pack, f);
        }
        let Some(file) = self.files.get(&loc.pack) else {
            return Err(ReceiveError::Corrupt(format!("pack {} vanished", loc.pack)));
        };
        file.read_exact_at(&mut self.header, loc.offset)
            .map_err(|e| ReceiveError::storage(&path, e))?;
        let h = &self.header;
        let ok = h[0..4] == RECORD_MAGIC
            && h[4] == loc.encoding as u8
            && h[8..12] == loc.raw_len.to_le_bytes()
            && h[12..16] == loc.stored_len.to_le_bytes()
            && h[16..48] == hash.0;
        if !ok {
            return Err(ReceiveError::Corrupt(format!(
                "record header at offset {} of pack {} does not match the catalog",
                loc.offset, loc.pack
            )));
        }
        out.clear();
        out.resize(loc.stored_len as usize, 0);
        file.read_exact_at(out, loc.offset + RECORD_HEADER_LEN as u64)
            .map_err(|e| ReceiveError::storage(&path, e))?;
        Ok(())
    }
}
