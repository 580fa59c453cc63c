//! The agent's durable state: for every volume, the BLAKE3 of each block as of
//! the last point the receiver acknowledged `DURABLE`.
//!
//! Version 2 keeps the hashes out of `state.bin`, one file per volume
//! ([`hashfile`](crate::hashfile)); `state.bin` says which point they hold:
//!
//! ```text
//! state.bin v2: magic "PLAGST01" | version u32 = 2 | store_id [16] | last_point u64
//!               | volumes u32 | volume* | blake3 of everything before [32]
//! volume:       name_len u8 | name | size u64 | block_size u32 | blocks u64
//! ```
//!
//! `last_point` 0 says the hash files hold no point the agent can trust: it
//! is written before records change in place, and the point only after they
//! are synced, so a crash between leaves a state the next start does not
//! trust (it then asks the receiver for its hashes).
//!
//! Version 1 (still read; migrated to version 2 on first load) held the
//! hashes inline:
//!
//! ```text
//! state.bin v1: magic "PLAGST01" | version u32 = 1 | store_id [16] | last_point u64
//!               | volumes u32 | volume* | blake3 of everything before [32]
//! volume:       name_len u8 | name | size u64 | block_size u32 | blocks u64 | hash [32] x blocks
//! ```
//!
//! Written atomically: a new file is written and fsynced, renamed over the old
//! one, and the directory fsynced. A file that fails its checksum is ignored
//! (the agent then asks the receiver for its hashes).

use std::path::Path;

use pilotlight_protocol::atomic_file::{self, Access};
use pilotlight_protocol::limits::block_count;
use pilotlight_protocol::reader::Reader;
use pilotlight_protocol::BlockHash;

use crate::error::Exposure;
use crate::hashfile::HashFile;
use crate::AgentError;

const MAGIC: [u8; 8] = *b"PLAGST01";
/// The version written.
const VERSION: u32 = 2;
/// The version with the hashes inline.
const VERSION_INLINE: u32 = 1;
/// File name of the state in the state directory.
pub const STATE_FILE: &str = "state.bin";

/// A volume as the state describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Volume name.
    pub name: String,
    /// Volume size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
}

/// `state.bin`: which point the volumes' hash files hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateHeader {
    /// Receiver store the state refers to.
    pub store_id: [u8; 16],
    /// Last durable point (0 = none, or the hash files are being changed).
    pub last_point: u64,
    /// The volumes, each with its hash file.
    pub volumes: Vec<VolumeMeta>,
}

/// Hashes of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHashes {
    /// Volume name.
    pub name: String,
    /// Volume size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Hash of every block.
    pub hashes: Vec<BlockHash>,
}

/// The agent's durable state, whole in memory: for tests and tools (the
/// agent itself reads the hash files a chunk at a time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    /// Receiver store the state refers to.
    pub store_id: [u8; 16],
    /// Last durable point (0 = none).
    pub last_point: u64,
    /// Per-volume hashes.
    pub volumes: Vec<VolumeHashes>,
}

pub(crate) fn state_err(path: &Path, e: std::io::Error) -> AgentError {
    AgentError::State {
        path: path.to_owned(),
        source: e,
    }
}

/// A parsed `state.bin` of either version.
pub(crate) enum Parsed {
    /// Version 2: the header; the hashes are in the hash files.
    Header(StateHeader),
    /// Version 1: the hashes inline.
    Inline(AgentState),
}

/// Decode `state.bin`'s bytes; `None` if they are not an intact state of
/// either version (bytes after the last volume included).
pub(crate) fn parse(data: &[u8]) -> Option<Parsed> {
    let (body, sum) = data.split_at(data.len().checked_sub(32)?);
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let mut r = Reader::new(body, "agent state");
    if r.take(8).ok()? != MAGIC {
        return None;
    }
    let inline = match r.u32().ok()? {
        VERSION => false,
        VERSION_INLINE => true,
        _ => return None,
    };
    let store_id: [u8; 16] = r.array().ok()?;
    let last_point = r.u64().ok()?;
    let count = r.u32().ok()?;
    let mut metas = Vec::new();
    let mut tables = Vec::new();
    for _ in 0..count {
        let name_len = usize::from(r.u8().ok()?);
        let name = String::from_utf8(r.take(name_len).ok()?.to_vec()).ok()?;
        let size = r.u64().ok()?;
        let block_size = r.u32().ok()?;
        let blocks = r.u64().ok()?;
        if inline {
            let bytes = r
                .take(usize::try_from(blocks).ok()?.checked_mul(32)?)
                .ok()?;
            tables.push(
                bytes
                    .chunks_exact(32)
                    .filter_map(|c| c.try_into().ok().map(BlockHash))
                    .collect::<Vec<_>>(),
            );
        } else if block_size == 0 || blocks != block_count(size, block_size) {
            return None;
        }
        metas.push(VolumeMeta {
            name,
            size,
            block_size,
        });
    }
    // Bytes after the last volume: not a file either version wrote.
    r.finish().ok()?;
    if inline {
        let volumes = metas
            .into_iter()
            .zip(tables)
            .map(|(m, hashes)| VolumeHashes {
                name: m.name,
                size: m.size,
                block_size: m.block_size,
                hashes,
            })
            .collect();
        return Some(Parsed::Inline(AgentState {
            store_id,
            last_point,
            volumes,
        }));
    }
    Some(Parsed::Header(StateHeader {
        store_id,
        last_point,
        volumes: metas,
    }))
}

impl StateHeader {
    /// Load the state from `dir`; `None` if there is none or it is damaged.
    /// A version 1 state is migrated: its hashes are written to hash files
    /// and `state.bin` rewritten as version 2 (blocking I/O).
    pub fn load(dir: &Path) -> Result<Option<Self>, AgentError> {
        let path = dir.join(STATE_FILE);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(state_err(&path, e)),
        };
        match parse(&data) {
            Some(Parsed::Header(h)) => Ok(Some(h)),
            Some(Parsed::Inline(s)) => {
                drop(data);
                tracing::info!(path = %path.display(), "migrating the agent state to hash files");
                s.save(dir)?;
                Ok(Some(s.header()))
            }
            None => {
                tracing::warn!(path = %path.display(), "agent state is damaged; will resynchronise from the receiver");
                Ok(None)
            }
        }
    }

    /// The volume `name` as the state has it.
    pub fn volume(&self, name: &str) -> Option<&VolumeMeta> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// The file's bytes (version 2).
    pub(crate) fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.volumes.len() * 300);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.store_id);
        out.extend_from_slice(&self.last_point.to_le_bytes());
        out.extend_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        for v in &self.volumes {
            out.push(v.name.len() as u8);
            out.extend_from_slice(v.name.as_bytes());
            out.extend_from_slice(&v.size.to_le_bytes());
            out.extend_from_slice(&v.block_size.to_le_bytes());
            out.extend_from_slice(&block_count(v.size, v.block_size).to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Write `state.bin` to `dir` atomically (write, fsync, rename, fsync
    /// dir). Blocking: call it off the async workers. The hash files must
    /// be synced first.
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        write_atomic(dir, STATE_FILE, &self.serialize(), Access::Private)
    }
}

impl AgentState {
    /// Load the state and every hash file from `dir` whole; `None` if there
    /// is none, it is damaged, or a hash file is missing.
    pub fn load(dir: &Path) -> Result<Option<Self>, AgentError> {
        let Some(h) = StateHeader::load(dir)? else {
            return Ok(None);
        };
        let mut volumes = Vec::new();
        for v in h.volumes {
            let Some(f) = HashFile::open(dir, &v.name, v.size, v.block_size)? else {
                return Ok(None);
            };
            let mut hashes = Vec::new();
            f.read(0, f.blocks(), &mut hashes)?;
            volumes.push(VolumeHashes {
                name: v.name,
                size: v.size,
                block_size: v.block_size,
                hashes,
            });
        }
        Ok(Some(Self {
            store_id: h.store_id,
            last_point: h.last_point,
            volumes,
        }))
    }

    /// The header of this state.
    pub fn header(&self) -> StateHeader {
        StateHeader {
            store_id: self.store_id,
            last_point: self.last_point,
            volumes: self
                .volumes
                .iter()
                .map(|v| VolumeMeta {
                    name: v.name.clone(),
                    size: v.size,
                    block_size: v.block_size,
                })
                .collect(),
        }
    }

    /// Write the hash files and then `state.bin` to `dir` (blocking). A
    /// volume whose table does not match its size is written as untrusted
    /// (last point 0).
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        std::fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
        let mut header = self.header();
        // Untrusted while the files change.
        StateHeader {
            last_point: 0,
            ..header.clone()
        }
        .save(dir)?;
        for v in &self.volumes {
            let f = HashFile::create_zero(dir, &v.name, v.size, v.block_size)?;
            if v.hashes.len() as u64 != f.blocks() {
                header.last_point = 0;
                continue;
            }
            f.fill(0, &v.hashes)?;
            f.sync()?;
        }
        header.save(dir)
    }
}

/// Create the state directory if needed (0700) and refuse it if another
/// user could change it ([`check_private`]).
pub fn prepare_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| state_err(dir, e))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| state_err(dir, e))?;
    check_private(dir, &meta, "state directory")
}

/// Refuse `path` (`what`: "state directory", "identity file") if another
/// user could change it: writable by its group or everyone, or owned by
/// another user than the agent's effective one.
pub fn check_private(
    path: &Path,
    meta: &std::fs::Metadata,
    what: &'static str,
) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt;
    let agent = nix::unistd::geteuid().as_raw();
    let problem = if meta.uid() != agent {
        Exposure::Owner {
            owner: meta.uid(),
            agent,
        }
    } else if meta.mode() & 0o022 != 0 {
        Exposure::Writable {
            mode: meta.mode() & 0o7777,
        }
    } else {
        return Ok(());
    };
    Err(AgentError::Unprotected {
        what,
        path: path.to_owned(),
        problem,
    })
}

/// Write `name` in `dir` atomically and durably (creating `dir`), through
/// the one atomic write both binaries use.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], access: Access) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
    atomic_file::write(dir, name, data, access).map_err(|(path, e)| state_err(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_state_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        prepare_dir(&state).unwrap();
        for mode in [0o777, 0o770, 0o1777] {
            chmod(&state, mode);
            let err = prepare_dir(&state).unwrap_err();
            assert!(
                matches!(
                    err,
                    AgentError::Unprotected {
                        what: "state directory",
                        problem: Exposure::Writable { .. },
                        ..
                    }
                ),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&state.display().to_string()) && text.contains("chmod go-w"),
                "{text}"
            );
        }
        chmod(&state, 0o755);
        prepare_dir(&state).unwrap();
    }

    #[test]
    fn a_new_state_directory_is_the_agents_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        prepare_dir(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }

    #[test]
    fn round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let s = AgentState {
            store_id: [7; 16],
            last_point: 42,
            volumes: vec![VolumeHashes {
                name: "root".into(),
                size: 3 * 4096 + 5,
                block_size: 4096,
                hashes: vec![
                    BlockHash([1; 32]),
                    BlockHash([2; 32]),
                    BlockHash([3; 32]),
                    BlockHash([4; 32]),
                ],
            }],
        };
        s.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), Some(s));
        let p = dir.path().join(STATE_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), None);
    }
}
