//! Sealing what leaves the host: every object in the bucket is encrypted
//! and authenticated with the receiver's store key (AES-256-GCM, RustCrypto
//! `aes-gcm`), in chunks so that neither side holds a whole pack in memory.
//!
//! ```text
//! object:   magic "PLSEAL01" (8) | chunk_len u32 | nonce_prefix [8] | chunk*
//! chunk i:  AES-256-GCM(key, nonce = nonce_prefix | i u32,
//!                       aad = magic | name | i u32 | last u8)
//!           of chunk_len plaintext bytes (fewer in the last chunk), + tag [16]
//! ```
//!
//! All integers are little-endian. `nonce_prefix` is random per object, so
//! no nonce repeats under one key; the object's name in the associated data
//! keeps an object from being passed off as another, and the `last` flag
//! makes a cut at a chunk boundary fail. An object of no bytes is one empty
//! last chunk. The key file is 32 random bytes (`DIR/store.key`, mode 0600).

use std::path::Path;

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;

use super::OffsiteError;

/// Magic at the start of every sealed object (version 1 of the format).
pub const SEAL_MAGIC: [u8; 8] = *b"PLSEAL01";
/// Length of a sealed object's header.
pub const SEAL_HEADER_LEN: usize = 20;
/// Plaintext bytes per chunk.
pub const CHUNK_LEN: usize = 1 << 20;
/// Length of the AES-GCM tag after each chunk.
pub const TAG_LEN: usize = 16;
/// Length of the store key.
pub const KEY_LEN: usize = 32;
/// The key file's name in the receiver directory.
pub const KEY_FILE: &str = "store.key";

/// The key that seals every object of one receiver.
#[derive(Clone)]
pub struct StoreKey(Aes256Gcm);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

impl StoreKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        Self(Aes256Gcm::new(bytes.into()))
    }

    /// Read a key file; a missing or malformed one is one clear sentence.
    pub fn load(path: &Path) -> Result<Self, OffsiteError> {
        let bytes = std::fs::read(path).map_err(|e| OffsiteError::Key {
            path: path.to_owned(),
            why: if e.kind() == std::io::ErrorKind::NotFound {
                "does not exist".into()
            } else {
                e.to_string()
            },
        })?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|b: Vec<u8>| OffsiteError::Key {
            path: path.to_owned(),
            why: format!("holds {} bytes, not a {KEY_LEN}-byte store key", b.len()),
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Write a new random key to `path` (created, mode 0600).
    pub fn create(path: &Path) -> Result<Self, OffsiteError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let bytes: [u8; KEY_LEN] = rand::random();
        let io = |e: std::io::Error| OffsiteError::Key {
            path: path.to_owned(),
            why: e.to_string(),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(Self::from_bytes(&bytes))
    }
}

fn nonce(prefix: &[u8; 8], index: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(prefix);
    n[8..].copy_from_slice(&index.to_le_bytes());
    n
}

fn aad(name: &str, index: u32, last: bool) -> Vec<u8> {
    let mut a = Vec::with_capacity(SEAL_MAGIC.len() + name.len() + 5);
    a.extend_from_slice(&SEAL_MAGIC);
    a.extend_from_slice(name.as_bytes());
    a.extend_from_slice(&index.to_le_bytes());
    a.push(u8::from(last));
    a
}

/// Seals one object chunk by chunk.
pub struct Sealer<'a> {
    key: &'a StoreKey,
    name: &'a str,
    prefix: [u8; 8],
    next: u32,
}

impl<'a> Sealer<'a> {
    /// A sealer of the object `name` (its name relative to the prefix);
    /// returns it and the object's header.
    pub fn new(key: &'a StoreKey, name: &'a str) -> (Self, Vec<u8>) {
        let prefix: [u8; 8] = rand::random();
        let mut header = Vec::with_capacity(SEAL_HEADER_LEN);
        header.extend_from_slice(&SEAL_MAGIC);
        header.extend_from_slice(&(CHUNK_LEN as u32).to_le_bytes());
        header.extend_from_slice(&prefix);
        let s = Self {
            key,
            name,
            prefix,
            next: 0,
        };
        (s, header)
    }

    /// Seal the next chunk (at most [`CHUNK_LEN`] bytes; only the last may
    /// be shorter) and append it to `out`.
    pub fn seal(
        &mut self,
        plain: &[u8],
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), OffsiteError> {
        let index = self.next;
        self.next = self.next.checked_add(1).ok_or(OffsiteError::TooLarge)?;
        let sealed = self
            .key
            .0
            .encrypt(
                GenericArray::from_slice(&nonce(&self.prefix, index)),
                Payload {
                    msg: plain,
                    aad: &aad(self.name, index, last),
                },
            )
            .map_err(|_| OffsiteError::TooLarge)?;
        out.extend_from_slice(&sealed);
        Ok(())
    }
}

/// Seal a whole object held in memory.
pub fn seal_all(key: &StoreKey, name: &str, plain: &[u8]) -> Result<Vec<u8>, OffsiteError> {
    let (mut s, mut out) = Sealer::new(key, name);
    out.reserve(plain.len() + (plain.len() / CHUNK_LEN + 1) * TAG_LEN);
    let mut chunks = plain.chunks(CHUNK_LEN).peekable();
    if chunks.peek().is_none() {
        s.seal(&[], true, &mut out)?;
    }
    while let Some(c) = chunks.next() {
        s.seal(c, chunks.peek().is_none(), &mut out)?;
    }
    Ok(out)
}

/// Opens one sealed object as its bytes arrive.
pub struct Opener<'a> {
    key: &'a StoreKey,
    name: &'a str,
    header: Option<([u8; 8], usize)>,
    next: u32,
    buf: Vec<u8>,
}

impl<'a> Opener<'a> {
    /// An opener of the object `name`.
    pub fn new(key: &'a StoreKey, name: &'a str) -> Self {
        Self {
            key,
            name,
            header: None,
            next: 0,
            buf: Vec::new(),
        }
    }

    fn damaged(&self, why: &'static str) -> OffsiteError {
        OffsiteError::Damaged {
            object: self.name.to_owned(),
            why,
        }
    }

    /// Feed the next bytes of the object; the plaintext of every whole
    /// chunk they complete (except a possible last one) is appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), OffsiteError> {
        self.buf.extend_from_slice(bytes);
        if self.header.is_none() {
            if self.buf.len() < SEAL_HEADER_LEN {
                return Ok(());
            }
            if self.buf[..8] != SEAL_MAGIC {
                return Err(self.damaged("it is not a sealed object (bad magic)"));
            }
            let mut len = [0u8; 4];
            len.copy_from_slice(&self.buf[8..12]);
            let chunk_len = u32::from_le_bytes(len) as usize;
            if chunk_len == 0 || chunk_len > 64 << 20 {
                return Err(self.damaged("its chunk length is out of range"));
            }
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&self.buf[12..20]);
            self.header = Some((prefix, chunk_len));
            self.buf.drain(..SEAL_HEADER_LEN);
        }
        let Some((_, chunk_len)) = self.header else {
            return Ok(());
        };
        let whole = chunk_len + TAG_LEN;
        // Keep the last chunk back until `finish`: a full-length chunk may
        // be the last one.
        let mut done = 0;
        while self.buf.len() - done > whole {
            let sealed = self.buf[done..done + whole].to_vec();
            self.open_chunk(&sealed, false, out)?;
            done += whole;
        }
        self.buf.drain(..done);
        Ok(())
    }

    fn open_chunk(
        &mut self,
        sealed: &[u8],
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), OffsiteError> {
        let Some((prefix, chunk_len)) = self.header else {
            return Err(self.damaged("it is shorter than its header"));
        };
        let index = self.next;
        self.next = self.next.checked_add(1).ok_or(OffsiteError::TooLarge)?;
        let header = SealHeader { chunk_len, prefix };
        header.open_chunk(self.key, self.name, index, last, sealed, out)
    }

    /// The end of the object: open its last chunk.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), OffsiteError> {
        if self.header.is_none() {
            return Err(self.damaged("it is shorter than its header"));
        }
        if self.buf.len() < TAG_LEN {
            return Err(self.damaged("it was cut short"));
        }
        let sealed = std::mem::take(&mut self.buf);
        self.open_chunk(&sealed, true, out)
    }
}

/// What a sealed object's header says: enough to open any one chunk of
/// it (ranged reads open chunks out of order).
#[derive(Debug, Clone, Copy)]
pub struct SealHeader {
    /// Plaintext bytes per chunk.
    pub chunk_len: usize,
    prefix: [u8; 8],
}

impl SealHeader {
    /// Read the first [`SEAL_HEADER_LEN`] bytes of the object `name`.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self, OffsiteError> {
        let damaged = |why| OffsiteError::Damaged {
            object: name.to_owned(),
            why,
        };
        let head = bytes
            .get(..SEAL_HEADER_LEN)
            .ok_or_else(|| damaged("it is shorter than its header"))?;
        if head[..8] != SEAL_MAGIC {
            return Err(damaged("it is not a sealed object (bad magic)"));
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[8..12]);
        let chunk_len = u32::from_le_bytes(len) as usize;
        if chunk_len == 0 || chunk_len > 64 << 20 {
            return Err(damaged("its chunk length is out of range"));
        }
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&head[12..20]);
        Ok(Self { chunk_len, prefix })
    }

    /// Open chunk `index` of the object `name` (`last`: it is the final
    /// one) and append its plaintext to `out`.
    pub fn open_chunk(
        &self,
        key: &StoreKey,
        name: &str,
        index: u32,
        last: bool,
        sealed: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), OffsiteError> {
        let plain = key
            .0
            .decrypt(
                GenericArray::from_slice(&nonce(&self.prefix, index)),
                Payload {
                    msg: sealed,
                    aad: &aad(name, index, last),
                },
            )
            .map_err(|_| OffsiteError::Unsealed {
                object: name.to_owned(),
            })?;
        out.extend_from_slice(&plain);
        Ok(())
    }
}

/// Open a whole sealed object held in memory.
pub fn open_all(key: &StoreKey, name: &str, sealed: &[u8]) -> Result<Vec<u8>, OffsiteError> {
    let mut o = Opener::new(key, name);
    let mut out = Vec::with_capacity(sealed.len());
    o.push(sealed, &mut out)?;
    o.finish(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    fn key(b: u8) -> StoreKey {
        StoreKey::from_bytes(&[b; KEY_LEN])
    }

    #[test]
    fn round_trips_at_every_length_around_a_chunk_in_any_split() {
        let k = key(1);
        for len in [0, 1, CHUNK_LEN - 1, CHUNK_LEN, CHUNK_LEN + 1, 2 * CHUNK_LEN] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = seal_all(&k, "packs/x", &plain).unwrap();
            assert_eq!(
                open_all(&k, "packs/x", &sealed).unwrap(),
                plain,
                "len {len}"
            );
            let mut o = Opener::new(&k, "packs/x");
            let mut out = Vec::new();
            for piece in sealed.chunks(7919) {
                o.push(piece, &mut out).unwrap();
            }
            o.finish(&mut out).unwrap();
            assert_eq!(out, plain, "len {len} in pieces");
        }
    }

    #[test]
    fn holds_no_plaintext_and_differs_per_object() {
        let k = key(2);
        let plain = b"MARKER-MARKER-MARKER".repeat(100);
        let a = seal_all(&k, "n", &plain).unwrap();
        let b = seal_all(&k, "n", &plain).unwrap();
        assert_ne!(a, b, "random nonce per object");
        assert!(!a.windows(20).any(|w| w == b"MARKER-MARKER-MARKER"));
    }

    #[test]
    fn a_wrong_key_a_renamed_object_a_flipped_bit_or_a_cut_fail() {
        let k = key(3);
        let plain = vec![9u8; CHUNK_LEN + 10];
        let sealed = seal_all(&k, "packs/a", &plain).unwrap();
        assert!(matches!(
            open_all(&key(4), "packs/a", &sealed),
            Err(OffsiteError::Unsealed { .. })
        ));
        assert!(open_all(&k, "packs/b", &sealed).is_err());
        let mut flipped = sealed.clone();
        flipped[SEAL_HEADER_LEN + 5] ^= 1;
        assert!(open_all(&k, "packs/a", &flipped).is_err());
        let cut = &sealed[..SEAL_HEADER_LEN + CHUNK_LEN + TAG_LEN];
        assert!(open_all(&k, "packs/a", cut).is_err());
        assert!(open_all(&k, "packs/a", b"PLPACK01").is_err());
    }
}
