//! Named limits shared by both sides. Every one is checked before memory is
//! reserved for what it bounds.

/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;

/// `Hello.features` bit: this peer sends `Ping` on an idle control
/// connection (at least every [`PING_INTERVAL`]), so the other side may close
/// a control connection silent for longer than its idle limit.
pub const FEATURE_PING: u32 = 1;

/// `Hello.features` bit: this peer speaks the restore frames (`Restore`,
/// `RestoreInfo`, `Fetch`, `Fetched`). A receiver that advertises it serves
/// restores; an agent sends `Restore` only to a receiver that did, and
/// advertises it in the `Hello` of a restore connection.
pub const FEATURE_RESTORE: u32 = 2;

/// Most block indexes in one `Fetch` frame.
pub const MAX_FETCH_PER_FRAME: usize = 256;

/// Most blocks an agent may have asked for with `Fetch` and not yet received
/// on one restore connection. The receiver refuses a `Fetch` beyond it
/// before it queues the request.
pub const FETCH_WINDOW: usize = 1024;
/// `Hello.features` bit: this peer takes part in resumable full syncs
/// (`Checkpoint`, `Checkpointed`, `Resume`, `SyncState`). An agent sends
/// those frames only to a receiver that advertised it; a receiver answers
/// them only when asked.
pub const FEATURE_CHECKPOINT: u32 = 4;
/// `Hello.features` bit: this peer takes `ZeroRun` frames (kind 24) on its
/// data streams: one frame for a run of all-zero blocks. An agent sends them
/// only to a receiver that advertised this bit; to others it sends one
/// zero `Block` per block.
pub const FEATURE_ZEROS: u32 = 8;
/// `Hello.features` bit: this peer takes `HashesPacked` frames (kind 29)
/// wherever it takes `Hashes`: the same hashes with repeats coded short. A
/// receiver sends them on a restore connection only to an agent that
/// advertised this bit; to others it sends `Hashes`.
pub const FEATURE_HASHPACK: u32 = 32;

/// `Hello.features` bit: this peer takes `PartialBlock` frames (kind 25)
/// on its data streams and answers each with `PartialApplied` (kind 26).
/// An agent sends them only to a receiver that advertised this bit; to
/// others it sends whole blocks.
pub const FEATURE_PARTIAL: u32 = 16;
/// Most byte ranges in one `PartialBlock`; an agent that tracked more for
/// a block sends the whole block.
pub const MAX_PARTIAL_RANGES: usize = 64;

/// Fixed part of a `PartialBlock` body, before the ranges.
pub const PARTIAL_HEADER_LEN: usize = 8 + 2 + 8 + 4 + 32 + 2;
/// Length of one range of a `PartialBlock` on the wire.
pub const PARTIAL_RANGE_LEN: usize = 4 + 4;
/// Length of a `PartialApplied` body.
pub const PARTIAL_APPLIED_LEN: usize = 8 + 2 + 8 + 32;

/// Fixed length of a `ZeroRun` body.
pub const ZERO_RUN_LEN: usize = 8 + 2 + 8 + 8;

/// How often an agent that advertised [`FEATURE_PING`] sends `Ping` on its
/// control connection. A receiver's idle limit for such a connection must be
/// well above it (at least 3x).
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);

/// The connection magic. Never change it: it identifies pilotlight on the wire.
pub const MAGIC: [u8; 8] = *b"PLTLIGHT";

/// Smallest block size a volume may use.
pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
/// Largest block size a volume may use.
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;
/// Default block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

/// Fixed part of a `Block` body before the payload.
pub const BLOCK_HEADER_LEN: usize = 8 + 2 + 1 + 1 + 8 + 4 + 32;
/// Largest frame body: a raw block of the largest size with its header.
pub const MAX_BODY_LEN: usize = MAX_BLOCK_SIZE as usize + BLOCK_HEADER_LEN;
/// Most hashes in one `Hashes` frame.
pub const MAX_HASHES_PER_FRAME: usize = 16 * 1024;
/// Most volumes an agent may declare in one session.
pub const MAX_VOLUMES: usize = 64;
/// Most data streams of one session.
pub const MAX_STREAMS: u16 = 16;
/// Longest error message carried on the wire.
pub const MAX_ERROR_LEN: usize = 1024;
/// Longest volume or server name.
pub const MAX_NAME_LEN: usize = 64;
/// Largest volume size accepted (64 TiB).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// Is `name` a valid server or volume name (`[a-z0-9._-]{1,64}`)?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        })
}

/// Is `size` an allowed block size (a power of two from 4 KiB to 4 MiB)?
pub fn valid_block_size(size: u32) -> bool {
    size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size)
}

/// Number of blocks of a volume of `size` bytes with blocks of `block_size`.
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(u64::from(block_size.max(1)))
}

/// Length of block `index` of a volume (the last block may be short).
pub fn block_len(size: u64, block_size: u32, index: u64) -> u32 {
    let start = index.saturating_mul(u64::from(block_size));
    let len = size.saturating_sub(start).min(u64::from(block_size));
    // INVARIANT: len <= block_size, which is a u32.
    u32::try_from(len).unwrap_or(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "db-01", "vol.0_x", &"a".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "A", "a/b", "..", ".", "a b", &"a".repeat(65), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn block_sizes() {
        assert!(valid_block_size(4096));
        assert!(valid_block_size(4 << 20));
        assert!(!valid_block_size(2048));
        assert!(!valid_block_size(8 << 20));
        assert!(!valid_block_size(65535));
    }

    #[test]
    fn short_last_block() {
        assert_eq!(block_count(10, 4096), 1);
        assert_eq!(block_len(10, 4096, 0), 10);
        assert_eq!(block_count(8192, 4096), 2);
        assert_eq!(block_len(8192 + 1, 4096, 2), 1);
        assert_eq!(block_len(8192, 4096, 2), 0);
    }
}
