//! The freeze guard: a small process that thaws a filesystem the agent
//! left frozen (the agent was killed, e.g. kill -9, or hangs past the
//! limit and its watchdog thread with it).
//!
//! The agent runs `pilotlight-agent freeze-guard --mount MOUNT --limit-ms N`
//! with a pipe as its stdin, once, and keeps it across freezes. It writes
//! one byte per event: `F` a freeze starts, `T` it ended. The guard thaws
//! when its stdin closes (the agent is gone: the kernel closes the pipe
//! whatever killed it) while a freeze is on, or when a freeze has lasted
//! N ms. A thaw of a filesystem that is not frozen fails harmlessly.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::AgentError;

/// Byte written when a freeze starts.
const FROZEN: u8 = b'F';
/// Byte written when it ended.
const THAWED: u8 = b'T';

/// The agent's end of a running guard.
pub(super) struct Guard {
    child: Child,
    stdin: Option<ChildStdin>,
    mount: PathBuf,
}

impl Guard {
    /// Start `program freeze-guard` for `mount`, thawing after `limit`.
    pub(super) fn spawn(program: &Path, mount: &Path, limit: Duration) -> std::io::Result<Self> {
        let mut child = Command::new(program)
            .arg(super::GUARD_SUBCOMMAND)
            .arg("--mount")
            .arg(mount)
            .arg("--limit-ms")
            .arg(limit.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            mount: mount.to_owned(),
        })
    }

    /// Whether it guards `mount`.
    pub(super) fn serves(&self, mount: &Path) -> bool {
        self.mount == mount
    }

    /// Say a freeze starts (`true`) or ended.
    pub(super) fn tell(&mut self, frozen: bool) -> std::io::Result<()> {
        let byte = if frozen { FROZEN } else { THAWED };
        match self.stdin.as_mut() {
            Some(s) => s.write_all(&[byte]),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Its stdin closes with no freeze on: it exits at once.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// The guard process's body (the hidden `freeze-guard` subcommand): open
/// `mount`, then follow stdin until it closes.
pub fn run_guard(mount: &Path, limit: Duration) -> Result<(), AgentError> {
    let dir = File::open(mount).map_err(|e| {
        AgentError::Consistency(format!("cannot open mount {}: {e}", mount.display()))
    })?;
    let mut stdin = std::io::stdin().lock();
    guard_loop(&mut stdin, limit, || {
        tracing::warn!(mount = %mount.display(), "the freeze guard thaws the filesystem");
        super::thaw_fd(&dir);
    })
    .map_err(|e| AgentError::Consistency(format!("freeze guard: {e}")))
}

/// Follow the events on `input`; `thaw` when it closes during a freeze or
/// a freeze outlasts `limit`.
fn guard_loop<R: Read + AsFd>(
    input: &mut R,
    limit: Duration,
    mut thaw: impl FnMut(),
) -> std::io::Result<()> {
    let mut deadline: Option<Instant> = None;
    let mut buf = [0u8; 64];
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    thaw();
                    deadline = None;
                    continue;
                }
                // Rounded up: waking early would only loop once more.
                let ms = left.as_millis().saturating_add(1);
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if deadline.is_some() {
                thaw();
            }
            return Ok(());
        }
        for &b in buf.get(..n).unwrap_or_default() {
            match b {
                FROZEN => deadline = Some(Instant::now() + limit),
                THAWED => deadline = None,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::pipe;
    use std::sync::mpsc;

    /// Run the loop over `events`; with `close`, close the pipe at once,
    /// else after the first thaw. Returns the number of thaws.
    fn run(events: &[u8], close: bool, limit: Duration) -> usize {
        let (mut r, mut w) = pipe().unwrap();
        w.write_all(events).unwrap();
        let (tx, rx) = mpsc::sync_channel(8);
        let t = std::thread::spawn(move || {
            guard_loop(&mut r, limit, || tx.send(()).unwrap()).unwrap();
        });
        if !close {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("no thaw at the deadline");
        }
        drop(w);
        t.join().unwrap();
        1 - usize::from(close) + rx.try_iter().count()
    }

    #[test]
    fn the_agent_dying_while_frozen_thaws() {
        assert_eq!(run(b"F", true, Duration::from_secs(60)), 1);
        assert_eq!(run(b"FTF", true, Duration::from_secs(60)), 1);
    }

    #[test]
    fn the_agent_stopping_while_thawed_does_not() {
        assert_eq!(run(b"", true, Duration::from_secs(60)), 0);
        assert_eq!(run(b"FT", true, Duration::from_secs(60)), 0);
        assert_eq!(run(b"FTFT", true, Duration::from_secs(60)), 0);
    }

    #[test]
    fn a_freeze_past_the_limit_is_thawed_once() {
        assert_eq!(run(b"F", false, Duration::from_millis(20)), 1);
    }
}
