//! The dirty set of a clean stop, saved as [`DIRTY_FILE`] in the state
//! directory and taken (read and removed) at the next start.
//!
//! All integers are little-endian; `u16`-prefixed strings are UTF-8.
//!
//! ```text
//! file:    magic "PLDIRTY1"      8 bytes
//!          boot_id len           u16
//!          boot_id               len bytes (/proc/sys/kernel/random/boot_id)
//!          volume count          u32
//!          volume                count times, as below
//!          crc32                 u32, of every byte before it
//!
//! volume:  name len              u16
//!          name                  len bytes
//!          major, minor          u32, u32 (the volume's own device)
//!          block_size            u32
//!          counters              4 x u64: write I/Os, write sectors,
//!                                discard I/Os, discard sectors
//!          bitmap len            u64
//!          bitmap                len bytes: the dirty block numbers as a
//!                                serialized roaring treemap
//! ```
//!
//! A file that is not intact (short, bad checksum, bad magic, truncated
//! field, a bitmap that does not read back at its own length, bytes after
//! the last volume) is refused, and every volume is
//! rescanned.

use std::path::Path;

use pilotlight_protocol::atomic_file::Access;
use pilotlight_protocol::reader::Reader;
use pilotlight_protocol::DecodeError;
use roaring::RoaringTreemap;

use super::trace_err;
use crate::AgentError;

/// File in the state directory holding the dirty set of a clean stop.
pub const DIRTY_FILE: &str = "dirty.bin";
/// First bytes of [`DIRTY_FILE`]. Never change it: bump the digit for a new
/// format.
const DIRTY_MAGIC: &[u8; 8] = b"PLDIRTY1";

/// Why a saved dirty set was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DamagedDirty {
    /// Shorter than its checksum.
    #[error("too short")]
    TooShort,
    /// The checksum does not match.
    #[error("bad checksum")]
    BadCrc,
    /// Not our magic.
    #[error("bad magic")]
    BadMagic,
    /// A field runs past the end.
    #[error("truncated in the {0}")]
    Truncated(&'static str),
    /// A string is not UTF-8.
    #[error("the {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A bitmap does not deserialize.
    #[error("a dirty bitmap is damaged")]
    BadBitmap,
    /// Bytes follow the last volume.
    #[error("trailing bytes after the last volume")]
    TrailingData,
}

impl From<DecodeError> for DamagedDirty {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Truncated(what) => Self::Truncated(what),
            // INVARIANT: the reader only ever runs out of bytes.
            _ => Self::TooShort,
        }
    }
}

/// A `u16`-prefixed UTF-8 string named `what`.
fn string(r: &mut Reader<'_>, what: &'static str) -> Result<String, DamagedDirty> {
    r.what(what)
        .str_u16()?
        .map(str::to_owned)
        .ok_or(DamagedDirty::NotUtf8(what))
}

/// One volume's saved dirty blocks, and what must not have changed for
/// them to be trusted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SavedVolume {
    pub(super) name: String,
    /// The volume's own `major:minor`.
    pub(super) own: (u32, u32),
    pub(super) block_size: u32,
    /// [`Device::write_counters`](super::Device::write_counters) at the stop.
    pub(super) counters: [u64; 4],
    pub(super) dirty: RoaringTreemap,
}

/// The dirty set of a clean stop.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SavedDirty {
    /// The boot it was saved in: counters restart at a reboot.
    pub(super) boot_id: String,
    pub(super) volumes: Vec<SavedVolume>,
}

impl SavedDirty {
    /// The file's bytes.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, AgentError> {
        let mut out = Vec::new();
        out.extend_from_slice(DIRTY_MAGIC);
        put_str(&mut out, &self.boot_id);
        out.extend_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        for v in &self.volumes {
            put_str(&mut out, &v.name);
            out.extend_from_slice(&v.own.0.to_le_bytes());
            out.extend_from_slice(&v.own.1.to_le_bytes());
            out.extend_from_slice(&v.block_size.to_le_bytes());
            for c in v.counters {
                out.extend_from_slice(&c.to_le_bytes());
            }
            let mut bm = Vec::with_capacity(v.dirty.serialized_size());
            v.dirty
                .serialize_into(&mut bm)
                .map_err(|e| trace_err(format!("dirty set: {e}")))?;
            out.extend_from_slice(&(bm.len() as u64).to_le_bytes());
            out.extend_from_slice(&bm);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Write it (atomically) into `dir`.
    pub(super) fn save(&self, dir: &Path) -> Result<(), AgentError> {
        crate::state::write_atomic(dir, DIRTY_FILE, &self.encode()?, Access::Private)
    }

    /// Read and remove the saved set; `None` if there is none or it is not
    /// intact (then every volume is rescanned).
    pub(super) fn take(dir: &Path) -> Option<Self> {
        let path = dir.join(DIRTY_FILE);
        let data = std::fs::read(&path).ok()?;
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(cause = %e, "cannot remove the saved dirty set; not using it");
            return None;
        }
        match Self::parse(&data) {
            Ok(saved) => Some(saved),
            Err(e) => {
                tracing::warn!(file = %path.display(), cause = %e, "saved dirty set is damaged; rescanning");
                None
            }
        }
    }

    /// Decode the file's bytes.
    pub(crate) fn parse(data: &[u8]) -> Result<Self, DamagedDirty> {
        let body_len = data.len().checked_sub(4).ok_or(DamagedDirty::TooShort)?;
        let (body, crc) = data.split_at(body_len);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(DamagedDirty::BadCrc);
        }
        let mut r = Reader::new(body, "magic");
        if r.take(8)? != DIRTY_MAGIC {
            return Err(DamagedDirty::BadMagic);
        }
        let boot_id = string(&mut r, "boot id")?;
        let count = r.what("volume count").u32()?;
        let mut volumes = Vec::new();
        for _ in 0..count {
            let name = string(&mut r, "volume name")?;
            let own = (r.what("device").u32()?, r.u32()?);
            let block_size = r.what("block size").u32()?;
            let counters = [r.what("counters").u64()?, r.u64()?, r.u64()?, r.u64()?];
            let len = usize::try_from(r.what("bitmap length").u64()?)
                .map_err(|_| DamagedDirty::Truncated("bitmap"))?;
            let dirty = RoaringTreemap::deserialize_from(r.what("bitmap").take(len)?)
                .map_err(|_| DamagedDirty::BadBitmap)?;
            // A bitmap the treemap reads shorter than it was written (the
            // same key twice: the first one's blocks would be dropped).
            if dirty.serialized_size() != len {
                return Err(DamagedDirty::BadBitmap);
            }
            volumes.push(SavedVolume {
                name,
                own,
                block_size,
                counters,
                dirty,
            });
        }
        if r.remaining() != 0 {
            return Err(DamagedDirty::TrailingData);
        }
        Ok(Self { boot_id, volumes })
    }
}

/// This boot's id (empty if unknown).
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(b.get(..n).unwrap_or_default());
}

#[cfg(test)]
mod tests;
