//! The text reader: the instance's `trace_pipe`, its lines parsed by
//! [`parse_line`]. The fallback when the raw pages cannot be read (see
//! `raw.rs`), and what `PILOTLIGHT_TRACE_TEXT=1` forces.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use super::parse::{parse_line, Line};
use super::{trace_err, SYNC_DEADLINE};
use crate::AgentError;

/// The open `trace_pipe` of an instance.
pub(super) struct TextPipe {
    pipe: File,
    /// The end of the pipe's text not yet parsed (a line cut by a read).
    partial: Vec<u8>,
}

impl TextPipe {
    pub(super) fn open(dir: &Path) -> Result<Self, AgentError> {
        let pipe = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(dir.join("trace_pipe"))
            .map_err(|e| trace_err(format!("cannot open trace_pipe: {e}")))?;
        Ok(Self {
            pipe,
            partial: Vec::new(),
        })
    }

    /// Read the pipe, giving each line to `line` (which says whether it was
    /// the awaited marker), until the marker comes back. While the pipe is
    /// empty, `lost_now` says whether events were lost (the marker may be
    /// among them): then it stops and returns `true`.
    pub(super) fn read_to_marker(
        &mut self,
        line: &mut impl FnMut(Line) -> bool,
        mut lost_now: impl FnMut() -> Result<bool, AgentError>,
    ) -> Result<bool, AgentError> {
        let deadline = Instant::now() + SYNC_DEADLINE;
        let mut buf = vec![0u8; 64 << 10];
        let mut seen = false;
        while !seen {
            match self.pipe.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    self.partial
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    seen = self.consume(line);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The marker itself may be among the events a full
                    // buffer dropped: then stop waiting, everything is
                    // rescanned anyway.
                    if lost_now()? {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(trace_err(format!("reading trace_pipe: {e}"))),
            }
            if Instant::now() > deadline {
                return Err(trace_err(
                    "the trace marker did not come back within 10 s; tracing stopped working",
                ));
            }
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&self.pipe),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8));
        }
        Ok(false)
    }

    /// Parse the complete lines in `partial`. Returns whether the marker
    /// was among them.
    fn consume(&mut self, line: &mut impl FnMut(Line) -> bool) -> bool {
        let mut seen = false;
        let mut start = 0;
        while let Some(nl) = self
            .partial
            .get(start..)
            .and_then(|p| p.iter().position(|&b| b == b'\n'))
        {
            let text =
                String::from_utf8_lossy(self.partial.get(start..start + nl).unwrap_or_default());
            start += nl + 1;
            seen |= line(parse_line(&text));
        }
        self.partial.drain(..start);
        seen
    }
}
