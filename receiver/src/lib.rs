//! pilotlight receiver: the TLS server that agents replicate to, the point
//! store (content-addressed packs + SQLite catalog, garbage-collected), staging volumes, and the
//! operator commands (init, enroll, revoke, points, restore, verify, prune, gc).
//!
//! The binary `pilotlight-receiver` is a thin CLI over this library; tests
//! call [`server::run`] and the command functions directly.

pub mod admin;
pub mod catalog;
pub mod config;
pub mod error;
pub mod gc;
pub mod live;
pub mod pack;
pub mod pki;
pub mod restore;
pub mod retention;
pub mod server;
pub mod session;
pub mod status;
pub mod store;
pub mod verify;

pub use config::ReceiverConfig;
pub use error::ReceiveError;
