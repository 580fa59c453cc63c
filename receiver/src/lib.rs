//! pilotlight receiver: the TLS server that agents replicate to, the point
//! store (content-addressed packs + SQLite catalog, garbage-collected), staging volumes, and the
//! operator commands (init, enroll, revoke, points, restore, verify, prune, gc).
//!
//! The binary `pilotlight-receiver` is a thin CLI over this library; tests
//! call [`server::run`] and the command functions directly.

pub mod admin;
mod admission;
mod apply;
pub mod catalog;
mod checkpoint;
mod commit;
pub mod config;
mod connection;
pub mod console;
pub mod error;
pub mod export;
mod failback;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod gc;
mod handshake;
mod hashes;
pub mod live;
mod maintenance;
pub mod objstore;
pub mod owners;
pub mod pack;
mod partial;
pub mod pki;
pub mod quota;
mod registry;
pub mod restore;
pub mod retention;
pub mod rpo;
pub mod server;
pub mod session;
pub mod staging;
pub mod status;
pub mod store;
pub mod verify;
mod wire;

pub use config::ReceiverConfig;
pub use error::ReceiveError;
