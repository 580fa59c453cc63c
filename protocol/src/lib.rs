//! The pilotlight wire protocol, sans I/O.
//!
//! Everything that crosses the wire between `pilotlight-agent` and
//! `pilotlight-receiver` is defined here, together with the pure functions of
//! the hot path that both sides share (block hashing, compression and
//! verification). Nothing in the wire format performs I/O; [`codec`] is the
//! one thin adapter to `tokio_util::codec`. Beside the wire format live the
//! few things both binaries must agree on and have no other shared crate for:
//! TLS names ([`tls`]), clock and time format ([`clock`]), TCP settings
//! ([`net`]) and the durable small-file write ([`atomic_file`]).
//!
//! # Connections
//!
//! Every connection is TLS 1.3 with mutual authentication (see the receiver's
//! PKI). An agent opens one *control* connection and `streams` *data*
//! connections. Each connection starts with a `Hello` ([`Frame::Hello`]) in both
//! directions. Then:
//!
//! ```text
//! control:  agent -> Open{streams, volumes}       receiver -> Welcome{session, store, last point}
//!           agent -> GetHashes{volume}            receiver -> Hashes{..}* HashesEnd{..}
//!           agent -> EndPoint{tag, blocks, ..}    receiver -> Durable{tag, point}
//!           agent -> Resume{sync, gen}         receiver -> SyncState{..}     (FEATURE_CHECKPOINT)
//!           agent -> Checkpoint{tag, blocks..}  receiver -> Checkpointed{tag, sync, gen}
//! data:     agent -> Join{session}                receiver -> Joined
//!           agent -> Block{tag, volume, index..}  receiver -> Received{seq}
//!           agent -> ZeroRun{tag, volume, first, count} (FEATURE_ZEROS)
//! restore:  agent -> Restore{server, volume, point}  receiver -> RestoreInfo{point, size,
//!                                                          block size} Hashes{..}* HashesEnd{..}
//!           agent -> Fetch{indexes}*             receiver -> Fetched{block}* (in order)
//!           agent -> Goodbye
//! any:      either side -> Error{code, message} and the connection closes
//! ```
//!
//! A restore connection (only between peers whose `Hello` both have
//! features bit 1, `FEATURE_RESTORE` = 2) serves one volume of one point: the
//! agent compares the hashes with its target and fetches the blocks that
//! differ, keeping at most [`limits::FETCH_WINDOW`] blocks asked for and not
//! yet received; a receiver refuses a `Fetch` beyond that window.
//!
//! A point is identified during transfer by the agent's `tag` (a sequence
//! number within the session); the receiver assigns the durable point id when
//! it commits and returns both in `Durable`.
//!
//! # Frame layout
//!
//! All integers are little-endian. No `usize` is ever on the wire.
//!
//! ```text
//!  0      4      5       6          8                16          16+len       20+len
//!  +------+------+-------+----------+----------------+-------------+-----------+
//!  | len  | kind | flags | reserved |      seq       |  body[len]  |   crc32   |
//!  | u32  |  u8  |  u8   |  u16 = 0 |      u64       |             |    u32    |
//!  +------+------+-------+----------+----------------+-------------+-----------+
//! ```
//!
//! `len` is the body length and is checked against [`limits::MAX_BODY_LEN`]
//! before any memory is reserved. `crc32` (IEEE, `crc32fast`) covers the header
//! and the body; TLS protects the bytes in transit, the CRC catches our own
//! framing bugs. `seq` numbers the frames of one direction of one connection,
//! starting at 0. `flags` and `reserved` must be zero in version 1.
//!
//! # Bodies (version 1)
//!
//! ```text
//! Hello      (1)  magic[8] = "PLTLIGHT" | version u16 | features u32
//! Error      (2)  code u16 | msg_len u16 | msg[msg_len] (UTF-8)
//! Open       (3)  streams u16 | commit u8 | count u16 | count x VolumeDecl
//!                 VolumeDecl = name_len u8 | name[name_len] | size u64 | block_size u32
//! Welcome    (4)  session u64 | store_id[16] | last_point u64 (0 = none)
//! Join       (5)  session u64
//! Joined     (6)  (empty)
//! Block      (7)  tag u64 | volume u16 | encoding u8 | reserved u8 | index u64
//!                 | raw_len u32 | hash[32] | payload[..]
//! Received   (8)  seq u64   (every frame up to seq on this stream is applied)
//! EndPoint   (9)  tag u64 | blocks u64 | created_ms i64 | consistency u8 | commit u8
//! Durable   (10)  tag u64 | point u64
//! GetHashes (11)  volume u16
//! Hashes    (12)  volume u16 | start u64 | hash[32] x n
//! HashesEnd (13)  volume u16 | point u64 | blocks u64
//! Goodbye   (14)  (empty)
//! Ping      (15)  (empty)   (only to a peer whose Hello has features bit 0, FEATURE_PING)
//! Restore   (16)  server_len u8 | server[server_len] (empty = the peer's own)
//!                 | volume_len u8 | volume[volume_len] | which u8 | value u64
//!                 which: 0 = latest (value 0), 1 = point id, 2 = at time (ms, i64)
//! RestoreInfo (17) point u64 | size u64 | block_size u32
//! Fetch     (18)  count u16 (1..=256) | index u64 x count
//! Fetched   (19)  the Block body: tag = point | volume = 0 | encoding | ... | payload
//! ZeroRun   (24)  tag u64 | volume u16 | first u64 | count u64
//!                 (data streams; only to a receiver whose Hello has bit 3,
//!                 FEATURE_ZEROS)
//! PartialBlock (25) tag u64 | volume u16 | index u64 | raw_len u32 | base_hash[32]
//!                 | count u16 | count x (offset u32 | len u32) | data[Σ len]
//! PartialApplied (26) tag u64 | volume u16 | index u64 | hash[32]
//!                 (data streams; only between peers whose Hello has bit 4,
//!                 FEATURE_PARTIAL = 16; kinds 27-28 are reserved for it)
//! HashesPacked (29) volume u16 | start u64 | count u32 | op*: the hashes of a
//!                 `Hashes` frame with repeats coded short (see [`hashpack`];
//!                 only to a peer whose Hello has bit 5, FEATURE_HASHPACK = 32;
//!                 a receiver sends it instead of `Hashes` on a restore connection)
//! ```
//!
//! `PartialBlock` carries only some byte ranges of block `index` (the
//! sectors written since the last point): the receiver reads the block
//! whose BLAKE3 is `base_hash` from its store (a block this server stored
//! in a committed point, or the all-zero block; anything else ends the
//! session), checks that hash, copies the ranges over it, hashes and stores the result as a
//! normal block, and answers `PartialApplied` with the new hash on the same
//! stream before the `Received` that covers the frame. It counts as one
//! block in `EndPoint.blocks`. Decoding refuses 0 or more than
//! `MAX_PARTIAL_RANGES` (64) ranges, an empty range, ranges that overlap or
//! descend, a range past `raw_len` (itself 1 to `MAX_BLOCK_SIZE`), and data
//! that is not exactly the ranges' bytes. An agent sends a `PartialBlock`
//! only when its body is smaller than the whole block's, over the hash the
//! block has in a point the receiver committed (never one only sent), and
//! records the block's new hash only from `PartialApplied`, at the point's
//! `Durable`; without one (a connection lost, a receiver killed) the block
//! goes whole in a later point. An agent whose session ends while partial
//! blocks are unconfirmed (a base the receiver does not hold ends the
//! session) reconnects and sends whole blocks until a point is durable.
//! The pages an agent sends are whole 4 KiB pages of the block (the
//! written sectors rounded out).
//!
//! `ZeroRun` says blocks `first .. first + count` of `volume` are all zeros in
//! point `tag`, exactly as `count` zero `Block`s (encoding 0) would: it counts
//! as `count` blocks in `EndPoint.blocks` and is acknowledged by `Received`
//! like any frame of the stream. `count` is at least 1 and `first + count`
//! does not overflow (checked when decoding); the receiver checks the run
//! against the volume's block count and the point's block cap before it
//! records anything. A short last block is named by its index like any other.
//!
//! Resumable full syncs (only between peers whose Hello has features bit 2,
//! FEATURE_CHECKPOINT = 4; kinds 16-19 and 24-27 are taken by other features):
//!
//! ```text
//! Checkpoint   (20)  tag u64 | blocks u64 | done u64 | total u64      (done <= total)
//! Checkpointed (21)  tag u64 | sync u64 | generation u64
//! Resume       (22)  sync u64 | generation u64                         (0, 0 = none held)
//! SyncState    (23)  sync u64 | generation u64 | done u64 | total u64 | resumed u8 (0 or 1)
//! ```
//!
//! During a full sync (initial sync or rescan) the agent sends `Checkpoint`
//! on the control connection every so often: `blocks` is the number of
//! `Block` frames of point `tag` sent so far. The receiver waits for them,
//! makes them durable as the server's *in-progress sync* (not a point: it
//! is never restorable) and answers `Checkpointed`; only then does the agent
//! record the checkpoint. When the point's `EndPoint` commits, the
//! in-progress sync becomes part of that point. An agent that restarts sends
//! `Resume` with the checkpoint it recorded before its first point; the
//! receiver answers `SyncState` with the sync it holds and `resumed = 1` when
//! the session's first point continues it (its blocks are not sent again).
//!
//! Block `encoding`: 0 = all-zero block (empty payload), 1 = raw (payload is the
//! block), 2 = zstd (payload decompresses to exactly `raw_len` bytes). `hash` is
//! BLAKE3 of the raw block, the end-to-end identity of the data: the receiver
//! recomputes it after decompressing into a buffer of at most `raw_len` bytes.

pub mod atomic_file;
pub mod block;
pub mod clock;
pub mod codec;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod golden;
pub mod hashpack;
pub mod limits;
pub mod net;
#[cfg(feature = "process")]
pub mod process;
pub mod reader;
pub mod tls;

pub use block::{BlockError, BlockHash, Encoding};
pub use error::DecodeError;
pub use frame::{Frame, Kind, PartialAppliedFrame, PartialBlockFrame, ZeroRunFrame};
