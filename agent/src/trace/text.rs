//! The text reader: the instance's `trace_pipe`, its lines parsed by
//! [`parse_line`]. The fallback when the raw pages cannot be read (see
//! `raw.rs`), and what `PILOTLIGHT_TRACE_TEXT=1` forces.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::parse::{parse_line, Line};
use super::{trace_err, MarkerSource};
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

impl MarkerSource for TextPipe {
    /// Read the pipe until it is empty (or the marker came).
    fn read_now(&mut self, line: &mut impl FnMut(Line) -> bool) -> Result<bool, AgentError> {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.pipe.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.partial
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    if self.consume(line) {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(trace_err(format!("reading trace_pipe: {e}"))),
            }
        }
    }

    fn wait(&self) {
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&self.pipe),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8));
    }
}
