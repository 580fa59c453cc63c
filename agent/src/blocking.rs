//! Blocking work (file writes, fsync, a tracefs pipe round trip) done from
//! async code without holding up the runtime's workers, which also drive
//! the TLS streams.

/// Run blocking `f` without stalling the other tasks of a multi-thread
/// runtime; inline elsewhere (no runtime, or a current-thread one, where
/// `block_in_place` is not allowed).
pub(crate) fn off_async<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
