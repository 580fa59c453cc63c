//! The framed halves of an agent's TLS connection, and the few helpers that
//! read and write frames on them. Every write has a deadline (a peer that
//! stops reading cannot hold a task), and the writes of a session give way
//! to its cancellation (superseded, revoked, failed).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pilotlight_protocol::codec::{CodecError, FrameCodec};
use pilotlight_protocol::Frame;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::session::Session;
use crate::ReceiveError;

/// The read half of an agent's connection: TLS over TCP when serving, an
/// in-memory pipe under the session fuzzer (`crate::fuzzing`).
pub(crate) type Reader = FramedRead<Box<dyn AsyncRead + Send + Unpin>, FrameCodec>;
/// The write half of an agent's connection, with its write deadline.
pub(crate) type Writer = Deadlined<Box<dyn AsyncWrite + Send + Unpin>>;

/// A framed writer whose every frame must be written within a deadline.
pub(crate) struct Deadlined<W> {
    framed: FramedWrite<W, FrameCodec>,
    deadline: Duration,
}

impl<W: AsyncWrite + Unpin> Deadlined<W> {
    /// Frames written to `w`, each within `deadline`.
    pub(crate) fn new(w: W, deadline: Duration) -> Self {
        Self {
            framed: FramedWrite::new(w, FrameCodec::default()),
            deadline,
        }
    }

    /// The underlying writer (for the TLS shutdown).
    pub(crate) fn get_mut(&mut self) -> &mut W {
        self.framed.get_mut()
    }
}

/// Write one frame within the writer's deadline.
pub(crate) async fn send<W: AsyncWrite + Unpin>(
    wr: &mut Deadlined<W>,
    frame: &Frame,
) -> Result<(), ReceiveError> {
    match tokio::time::timeout(wr.deadline, wr.framed.send(frame)).await {
        Ok(r) => r.map_err(codec_err),
        Err(_) => Err(ReceiveError::Timeout(
            "peer not reading: write deadline passed",
        )),
    }
}

/// Write one frame of `session`'s, unless the session ends first.
pub(crate) async fn send_in<W: AsyncWrite + Unpin>(
    wr: &mut Deadlined<W>,
    frame: &Frame,
    session: &Session,
) -> Result<(), ReceiveError> {
    tokio::select! {
        biased;
        () = session.cancel.cancelled() => Err(session.cancel_reason()),
        r = send(wr, frame) => r,
    }
}

/// Read the next frame; the peer closing the connection is an error.
pub(crate) async fn next<R: AsyncRead + Unpin>(
    rd: &mut FramedRead<R, FrameCodec>,
) -> Result<Frame, ReceiveError> {
    next_or_eof(rd).await?.ok_or_else(|| {
        ReceiveError::Net(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed the connection",
        ))
    })
}

/// Read the next frame, or `None` when the peer closed the connection. An
/// `Error` frame from the peer is returned as an error.
pub(crate) async fn next_or_eof<R: AsyncRead + Unpin>(
    rd: &mut FramedRead<R, FrameCodec>,
) -> Result<Option<Frame>, ReceiveError> {
    match rd.next().await {
        None => Ok(None),
        Some(Ok((_, frame))) => match frame {
            Frame::Error { code, message } => Err(ReceiveError::Protocol(format!(
                "peer reported {code:?}: {message}"
            ))),
            f => Ok(Some(f)),
        },
        Some(Err(e)) => Err(codec_err(e)),
    }
}

fn codec_err(e: CodecError) -> ReceiveError {
    match e {
        CodecError::Io(e) => ReceiveError::Net(e),
        CodecError::Decode(d) => ReceiveError::Decode(d),
    }
}

/// The error for a frame that is valid but not one of those `wanted` now.
pub(crate) fn unexpected(frame: &Frame, wanted: &str) -> ReceiveError {
    ReceiveError::Protocol(format!(
        "unexpected {:?} frame; expected {wanted}",
        frame.kind()
    ))
}

#[cfg(test)]
#[allow(clippy::panic)] // test code
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_stops_reading_meets_the_write_deadline() {
        // The other end never reads: the pipe fills, the write waits.
        let (near, _far) = tokio::io::duplex(64);
        let mut wr = Deadlined::new(near, Duration::from_millis(200));
        let frame = Frame::Hashes {
            volume: 0,
            start: 0,
            hashes: vec![pilotlight_protocol::BlockHash::of(b"x"); 64],
        };
        match send(&mut wr, &frame).await {
            Err(ReceiveError::Timeout(why)) => assert!(why.contains("write deadline"), "{why}"),
            other => panic!("expected the write deadline, got {other:?}"),
        }
    }
}
