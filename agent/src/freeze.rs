//! A frozen filesystem (FIFREEZE) that cannot outlive its limit.
//!
//! A point with `--consistency freeze:MOUNT` freezes the filesystem only to
//! *read* the final delta into memory (`capture`); it is thawed before
//! anything is hashed, compressed or sent, so neither the network, the
//! receiver nor the rate cap can keep production writes blocked. Two things
//! thaw a freeze that overstays, whatever the agent's async runtime does:
//!
//! - `watchdog`: a plain thread armed before FIFREEZE that thaws at the
//!   limit (`--freeze-limit`, 2 s by default). A point whose freeze it ended
//!   is labelled `fuzzy` (its reads may straddle the thaw).
//! - `guard`: a small process (`pilotlight-agent freeze-guard`, hidden)
//!   holding a pipe from the agent. It thaws when the pipe closes while a
//!   freeze is on (the agent died, e.g. kill -9) or when the limit plus
//!   [`GUARD_MARGIN`] passes.
//!
//! Memory budget policy: the final delta is read into memory only if it
//! fits [`FreezeOptions::memory`] (checked before anything is allocated).
//! Pre-copy rounds first shrink the delta as they always did (until it is
//! at most 16 MiB or the pre-copy patience is out); a delta still larger
//! than the budget at the freeze (or one the kernel finds no memory for)
//! is read live after the thaw, and the point is labelled `fuzzy`.
//!
//! This module and `consistency` are the ones with `unsafe`: the FIFREEZE
//! and FITHAW ioctls, each a single call on a directory fd we own.
#![allow(unsafe_code)]

pub(crate) mod capture;
mod guard;
mod watchdog;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use guard::run_guard;
use guard::Guard;
use watchdog::Watchdog;

use crate::AgentError;

mod ioctl {
    #![allow(missing_docs, unreachable_pub)]
    nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
}

/// How long the guard process waits past the watchdog's limit before it
/// thaws a freeze itself (the watchdog thread normally does it first).
pub const GUARD_MARGIN: Duration = Duration::from_millis(500);

/// The hidden subcommand of `pilotlight-agent` that runs the guard.
pub const GUARD_SUBCOMMAND: &str = "freeze-guard";

/// Limits of a freeze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeOptions {
    /// The watchdog thaws after this long, whatever happens (default 2 s).
    pub limit: Duration,
    /// Most bytes of the final delta read into memory while frozen
    /// (default 256 MiB). A larger delta makes a `fuzzy` point, read live.
    pub memory: u64,
    /// The program run as the guard process (`pilotlight-agent`; the binary
    /// sets its own path). `None`: no guard, and a kill -9 of the agent
    /// while frozen leaves the filesystem frozen.
    pub guard_program: Option<PathBuf>,
}

impl Default for FreezeOptions {
    fn default() -> Self {
        Self {
            limit: Duration::from_secs(2),
            memory: 256 << 20,
            guard_program: None,
        }
    }
}

/// FIFREEZE on `dir`.
fn freeze_fd(dir: &File) -> nix::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE on a directory fd we opened; arg is a valid int.
    unsafe { ioctl::fifreeze(dir.as_raw_fd(), &mut arg) }.map(drop)
}

/// FITHAW on `dir`; errors are logged (EINVAL: it was not frozen).
pub(crate) fn thaw_fd(dir: &File) {
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW on a directory fd we opened; arg is a valid int.
    if let Err(e) = unsafe { ioctl::fithaw(dir.as_raw_fd(), &mut arg) } {
        tracing::error!(cause = %e, "FITHAW failed; the filesystem may still be frozen");
    }
}

/// What freezes filesystems for the agent: the options and the guard
/// process (started at the first freeze, kept across sessions).
pub(crate) struct Freezer {
    opts: FreezeOptions,
    guard: Mutex<Option<Guard>>,
}

impl Freezer {
    pub(crate) fn new(opts: FreezeOptions) -> Self {
        Self {
            opts,
            guard: Mutex::new(None),
        }
    }

    pub(crate) fn options(&self) -> &FreezeOptions {
        &self.opts
    }

    /// Freeze the filesystem mounted at `mount` (blocking: FIFREEZE flushes
    /// it). The guard is told and the watchdog armed before the call.
    pub(crate) fn freeze(self: &Arc<Self>, mount: &Path) -> Result<Frozen, AgentError> {
        let dir = File::open(mount).map_err(|e| {
            AgentError::Consistency(format!("cannot open mount {}: {e}", mount.display()))
        })?;
        let dir = Arc::new(dir);
        self.tell_guard(mount, true);
        let thaw_dir = Arc::clone(&dir);
        let watchdog = Watchdog::start(
            self.opts.limit,
            Box::new(move || {
                metrics::counter!("pilotlight_agent_freeze_watchdog_total").increment(1);
                tracing::warn!("freeze limit reached: the watchdog thaws the filesystem");
                thaw_fd(&thaw_dir);
            }),
        )
        .map_err(|e| AgentError::Consistency(format!("cannot start the freeze watchdog: {e}")));
        let watchdog = match watchdog {
            Ok(w) => w,
            Err(e) => {
                self.tell_guard(mount, false);
                return Err(e);
            }
        };
        let at = Instant::now();
        if let Err(e) = freeze_fd(&dir) {
            watchdog.finish();
            self.tell_guard(mount, false);
            return Err(AgentError::Consistency(format!(
                "cannot freeze {}: {e}",
                mount.display()
            )));
        }
        watchdog.frozen();
        Ok(Frozen {
            watchdog: Some(watchdog),
            mount: mount.to_owned(),
            freezer: Arc::clone(self),
            at,
        })
    }

    /// Tell the guard a freeze starts (`frozen`) or ended; (re)start it
    /// first if it is not running. A guard that cannot be reached is
    /// logged: the watchdog thread still bounds the freeze.
    fn tell_guard(&self, mount: &Path, frozen: bool) {
        let Some(program) = &self.opts.guard_program else {
            return;
        };
        let Ok(mut slot) = self.guard.lock() else {
            return;
        };
        if frozen && slot.as_ref().is_none_or(|g| !g.serves(mount)) {
            *slot = match Guard::spawn(program, mount, self.opts.limit + GUARD_MARGIN) {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::warn!(cause = %e, "cannot start the freeze guard process; a kill -9 while frozen would leave the filesystem frozen");
                    None
                }
            };
        }
        let sent = slot.as_mut().map(|g| g.tell(frozen));
        if let Some(Err(e)) = sent {
            tracing::warn!(cause = %e, "the freeze guard process is gone; starting another at the next freeze");
            *slot = None;
        }
    }
}

/// A frozen filesystem. Thawed by [`Frozen::thaw`], on drop, by the
/// watchdog at the limit, or by the guard if the agent dies.
pub(crate) struct Frozen {
    watchdog: Option<Watchdog>,
    mount: PathBuf,
    freezer: Arc<Freezer>,
    at: Instant,
}

/// How a freeze ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Thawed {
    /// The watchdog thawed it at the limit: what was read may straddle the
    /// thaw, and the point is `fuzzy`.
    pub(crate) by_watchdog: bool,
    /// From the FIFREEZE call to the thaw.
    pub(crate) held: Duration,
}

impl Frozen {
    /// Thaw now (unless the watchdog already did) and say how it ended.
    pub(crate) fn thaw(mut self) -> Thawed {
        self.end()
    }

    fn end(&mut self) -> Thawed {
        let by_watchdog = self.watchdog.take().is_some_and(Watchdog::finish);
        let held = self.at.elapsed();
        self.freezer.tell_guard(&self.mount, false);
        Thawed { by_watchdog, held }
    }

    /// Test knob (debug builds only): with `PILOTLIGHT_TEST_HOLD_FREEZE`
    /// set, hold the freeze until the watchdog ends it, as a stalled agent
    /// would.
    pub(crate) fn hold_for_tests(&self) {
        #[cfg(debug_assertions)]
        if std::env::var_os("PILOTLIGHT_TEST_HOLD_FREEZE").is_some() {
            tracing::warn!(mount = %self.mount.display(), "holding the freeze until the watchdog thaws it (PILOTLIGHT_TEST_HOLD_FREEZE)");
            if let Some(w) = &self.watchdog {
                w.wait_fired();
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.watchdog.is_some() {
            self.end();
        }
    }
}

/// Whether a frozen delta of `bytes` is read into memory under a budget of
/// `memory` bytes (else the point is read live and labelled `fuzzy`).
pub(crate) fn fits_in_memory(bytes: u64, memory: u64) -> bool {
    bytes <= memory
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_over_the_budget_are_not_captured() {
        for (bytes, memory, fits) in [
            (0, 0, true),
            (16 << 20, 256 << 20, true),
            (256 << 20, 256 << 20, true),
            ((256 << 20) + 1, 256 << 20, false),
        ] {
            assert_eq!(fits_in_memory(bytes, memory), fits, "{bytes} in {memory}");
        }
    }

    #[test]
    fn defaults() {
        let o = FreezeOptions::default();
        assert_eq!(o.limit, Duration::from_secs(2));
        assert_eq!(o.memory, 256 << 20);
    }
}
