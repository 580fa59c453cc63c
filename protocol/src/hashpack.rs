//! The body of `HashesPacked` (kind 29): a run of block hashes, as `Hashes`
//! carries them, with repeats coded short. A volume's hash list repeats a
//! lot (every all-zero block has the same hash, and so does every copy of a
//! block), and a restore sends the whole list: packed, the list of a
//! volume a quarter zeros and a quarter repeated text is half its size.
//!
//! ```text
//! body:  volume u16 | start u64 | count u32 (1..=MAX_HASHES_PER_FRAME) | op*
//! op:    0 | n u8 (1..=255) | hash[32] x n     n new hashes, in order
//!        1 | slot u8 | run u16 (1..=65535)     run times the hash in slot
//! ```
//!
//! Both sides keep a table of 256 slots, empty at the start of each frame:
//! the k-th new hash of the frame (counting from 0) goes into slot
//! k mod 256. A slot not yet filled is an error, and so are ops that give
//! more or fewer than `count` hashes, or bytes after the last op. The
//! encoder's choices are fixed (a hash in the table is always a run; a run
//! continues while it names the same slot), so a list has one packing and
//! golden files pin it.

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};

use crate::block::BlockHash;
use crate::limits::MAX_HASHES_PER_FRAME;
use crate::reader::Reader;
use crate::DecodeError;

/// Op: new hashes.
const OP_NEW: u8 = 0;
/// Op: a run of a hash in the table.
const OP_RUN: u8 = 1;
/// Slots in the table.
const SLOTS: usize = 256;

/// One op, while encoding.
enum Op {
    New(Vec<BlockHash>),
    Run { slot: u8, run: u16 },
}

/// Append the packed `hashes` (1 to [`MAX_HASHES_PER_FRAME`]: the caller's
/// frames hold no more, and send none empty) after `volume` and `start`.
pub fn encode(volume: u16, start: u64, hashes: &[BlockHash], dst: &mut BytesMut) {
    dst.put_u16_le(volume);
    dst.put_u64_le(start);
    dst.put_u32_le(u32::try_from(hashes.len()).unwrap_or(u32::MAX));
    let mut table: [Option<BlockHash>; SLOTS] = [None; SLOTS];
    let mut index: HashMap<BlockHash, u8> = HashMap::new();
    let mut added = 0usize;
    let mut ops: Vec<Op> = Vec::new();
    for h in hashes {
        if let Some(&slot) = index.get(h) {
            match ops.last_mut() {
                Some(Op::Run { slot: s, run }) if *s == slot && *run < u16::MAX => *run += 1,
                _ => ops.push(Op::Run { slot, run: 1 }),
            }
            continue;
        }
        let slot = (added % SLOTS) as u8;
        added += 1;
        // INVARIANT: a u8 slot is in the table of 256.
        if let Some(old) = table[usize::from(slot)].replace(*h) {
            index.remove(&old);
        }
        index.insert(*h, slot);
        match ops.last_mut() {
            Some(Op::New(list)) if list.len() < usize::from(u8::MAX) => list.push(*h),
            _ => ops.push(Op::New(vec![*h])),
        }
    }
    for op in ops {
        match op {
            Op::New(list) => {
                dst.put_u8(OP_NEW);
                dst.put_u8(list.len() as u8);
                for h in list {
                    dst.put_slice(h.as_bytes());
                }
            }
            Op::Run { slot, run } => {
                dst.put_u8(OP_RUN);
                dst.put_u8(slot);
                dst.put_u16_le(run);
            }
        }
    }
}

/// The volume, start and hashes of a packed body; checked as the module
/// says.
pub fn decode(body: &[u8]) -> Result<(u16, u64, Vec<BlockHash>), DecodeError> {
    const WHAT: &str = "HashesPacked";
    let mut r = Reader::new(body, WHAT);
    let volume = r.u16()?;
    let start = r.u64()?;
    let count = r.u32()? as usize;
    if count == 0 || count > MAX_HASHES_PER_FRAME {
        return Err(DecodeError::Invalid("packed hash count"));
    }
    let mut table: [Option<BlockHash>; SLOTS] = [None; SLOTS];
    let mut added = 0usize;
    let mut hashes: Vec<BlockHash> = Vec::with_capacity(count);
    while hashes.len() < count {
        match r.u8()? {
            OP_NEW => {
                let n = usize::from(r.u8()?);
                if n == 0 || hashes.len() + n > count {
                    return Err(DecodeError::Invalid("packed hash count"));
                }
                for _ in 0..n {
                    let h = BlockHash(r.array()?);
                    // INVARIANT: a slot number mod SLOTS is in the table.
                    table[added % SLOTS] = Some(h);
                    added += 1;
                    hashes.push(h);
                }
            }
            OP_RUN => {
                let slot = usize::from(r.u8()?);
                let run = usize::from(r.u16()?);
                // INVARIANT: a u8 slot is in the table of 256.
                let h = table[slot].ok_or(DecodeError::Invalid("packed hash slot"))?;
                if run == 0 || hashes.len() + run > count {
                    return Err(DecodeError::Invalid("packed hash count"));
                }
                hashes.extend(std::iter::repeat_n(h, run));
            }
            _ => return Err(DecodeError::Invalid("packed hash op")),
        }
    }
    r.finish()?;
    Ok((volume, start, hashes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    fn h(n: u32) -> BlockHash {
        BlockHash::of(&n.to_le_bytes())
    }

    fn roundtrip(hashes: &[BlockHash]) -> usize {
        let mut buf = BytesMut::new();
        encode(3, 70, hashes, &mut buf);
        assert_eq!(decode(&buf).unwrap(), (3, 70, hashes.to_vec()));
        buf.len()
    }

    #[test]
    fn repeats_are_short_and_every_list_comes_back() {
        let zero = h(0);
        // A quarter zeros, a quarter 16 repeated blocks, half unique.
        let list: Vec<BlockHash> = (0..16 * 1024u32)
            .map(|i| match i % 64 / 16 {
                0 => zero,
                1 => h(1 + i % 16),
                _ => h(1000 + i),
            })
            .collect();
        let len = roundtrip(&list);
        // Half the list is unique (50%); the repeats cost 4 bytes a run,
        // and 32 again each time new hashes have pushed them out of the
        // table's 256 slots (here every eighth time round): 56%.
        assert!(len < list.len() * 32 * 57 / 100, "{len}");
        // Unique hashes cost little more than plain; more than the table
        // holds, long runs, and the ends.
        let unique: Vec<BlockHash> = (0..1000).map(h).collect();
        assert_eq!(roundtrip(&unique), 14 + 4 * 2 + 1000 * 32);
        assert_eq!(roundtrip(&vec![zero; 16 * 1024]), 14 + 2 + 32 + 4);
        roundtrip(&[zero]);
        let again: Vec<BlockHash> = (0..600).chain(0..600).map(h).collect();
        roundtrip(&again);
    }

    #[test]
    fn bad_bodies_are_refused() {
        let mut ok = BytesMut::new();
        encode(0, 0, &[h(1), h(1), h(2)], &mut ok);
        let refused = |b: &[u8]| assert!(decode(b).is_err(), "{b:?}");
        refused(&ok[..ok.len() - 1]);
        let mut more = ok.to_vec();
        more.push(0);
        refused(&more);
        let mut zero_count = ok.to_vec();
        zero_count[10..14].copy_from_slice(&0u32.to_le_bytes());
        refused(&zero_count);
        let mut big = ok.to_vec();
        big[10..14].copy_from_slice(&(MAX_HASHES_PER_FRAME as u32 + 1).to_le_bytes());
        refused(&big);
        // A run of an empty slot; a run past the count; an unknown op.
        let head = |count: u32| {
            let mut b = vec![0u8; 10];
            b.extend_from_slice(&count.to_le_bytes());
            b
        };
        let mut empty_slot = head(1);
        empty_slot.extend_from_slice(&[OP_RUN, 0, 1, 0]);
        refused(&empty_slot);
        let mut past = head(2);
        past.extend_from_slice(&[OP_NEW, 1]);
        past.extend_from_slice(h(1).as_bytes());
        past.extend_from_slice(&[OP_RUN, 0, 2, 0]);
        refused(&past);
        let mut op = head(1);
        op.push(7);
        refused(&op);
    }
}
