//! The restore connection: TLS to the receiver with the agent's identity,
//! `Hello` with [`FEATURE_RESTORE`] both ways (and [`FEATURE_HASHPACK`]
//! from the agent), `Restore`, then the point's `RestoreInfo` and block
//! hashes. Every byte read or written on the socket
//! (TLS included) is counted: the report's bytes on the wire.

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pilotlight_protocol::codec::FrameCodec;
use pilotlight_protocol::frame::{RestoreInfo, RestoreRequest};
use pilotlight_protocol::limits::{
    block_count, FEATURE_HASHPACK, FEATURE_PING, FEATURE_RESTORE, PING_INTERVAL, VERSION,
};
use pilotlight_protocol::{BlockHash, DecodeError, Frame};
use tokio::io::AsyncWrite;
use tokio_util::codec::FramedWrite;

use crate::AgentError;

/// Time allowed to connect and finish the handshakes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The read half of a restore connection.
pub(crate) type Reader = crate::link::Reader;
/// The write half of a restore connection.
pub(crate) type Writer = crate::link::Writer;

/// An answered restore request: the point, and the hash of every block.
pub(crate) struct Opened {
    pub(crate) rd: Reader,
    pub(crate) wr: Writer,
    pub(crate) info: RestoreInfo,
    pub(crate) hashes: Vec<BlockHash>,
}

pub(crate) use crate::link::codec_err;

/// The next frame; the receiver's `Error` and its closing are errors.
pub(crate) async fn next(rd: &mut Reader) -> Result<Frame, AgentError> {
    match rd.next().await {
        None => Err(AgentError::Net(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "receiver closed the connection",
        ))),
        Some(Err(e)) => Err(codec_err(e)),
        Some(Ok((_, Frame::Error { code, message }))) => Err(AgentError::Remote { code, message }),
        Some(Ok((_, f))) => Ok(f),
    }
}

fn unexpected(frame: &Frame, wanted: &str) -> AgentError {
    AgentError::Protocol(format!("expected {wanted}, got {:?}", frame.kind()))
}

/// Connect to `receiver`, ask for `req` and read the answer.
pub(crate) async fn open(
    receiver: &str,
    tls: Arc<rustls::ClientConfig>,
    req: RestoreRequest,
    wire: Arc<AtomicU64>,
) -> Result<Opened, AgentError> {
    let (mut rd, mut wr) = tokio::time::timeout(CONNECT_TIMEOUT, connect(receiver, tls, wire))
        .await
        .map_err(|_| {
            AgentError::Net(io::Error::new(
                io::ErrorKind::TimedOut,
                "connecting to the receiver timed out",
            ))
        })??;
    wr.send(&Frame::Restore(req)).await.map_err(codec_err)?;
    let info = match next(&mut rd).await? {
        Frame::RestoreInfo(info) => info,
        other => return Err(unexpected(&other, "RestoreInfo")),
    };
    let hashes = read_hashes(&mut rd, &info).await?;
    Ok(Opened {
        rd,
        wr,
        info,
        hashes,
    })
}

/// TCP, TLS and `Hello` both ways; a receiver that does not serve restores
/// is told nothing more.
async fn connect(
    receiver: &str,
    tls: Arc<rustls::ClientConfig>,
    wire: Arc<AtomicU64>,
) -> Result<(Reader, Writer), AgentError> {
    let (mut rd, mut wr) =
        crate::link::connect_tls(receiver, tls, wire.clone(), Some(wire)).await?;
    let hello = Frame::Hello {
        version: VERSION,
        features: FEATURE_PING | FEATURE_RESTORE | FEATURE_HASHPACK,
    };
    wr.send(&hello).await.map_err(codec_err)?;
    match next(&mut rd).await? {
        Frame::Hello { version, features } if version == VERSION => {
            if features & FEATURE_RESTORE == 0 {
                return Err(AgentError::Config(format!(
                    "the receiver at {receiver} does not serve restores over the network; \
                     upgrade pilotlight-receiver"
                )));
            }
            Ok((rd, wr))
        }
        Frame::Hello { version, .. } => Err(DecodeError::BadVersion {
            got: version,
            supported: VERSION,
        }
        .into()),
        other => Err(unexpected(&other, "Hello")),
    }
}

/// Wait for `work` while saying `Ping` every [`PING_INTERVAL`]: the
/// receiver closes a restore connection that is silent for its idle time
/// while nothing is asked for, and hashing a large target takes longer.
pub(crate) async fn pinging<T, W: AsyncWrite + Unpin>(
    wr: &mut FramedWrite<W, FrameCodec>,
    work: impl std::future::Future<Output = Result<T, AgentError>>,
) -> Result<T, AgentError> {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval(PING_INTERVAL);
    ticks.tick().await;
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = ticks.tick() => wr.send(&Frame::Ping).await.map_err(codec_err)?,
        }
    }
}

/// The `Hashes` (or `HashesPacked`: the agent's `Hello` takes them) frames
/// of volume 0, in order, up to `HashesEnd`: one hash per block of the
/// volume `info` describes.
async fn read_hashes(rd: &mut Reader, info: &RestoreInfo) -> Result<Vec<BlockHash>, AgentError> {
    let total = block_count(info.size, info.block_size);
    let mut hashes: Vec<BlockHash> = Vec::new();
    loop {
        match next(rd).await? {
            Frame::Hashes {
                volume: 0,
                start,
                hashes: more,
            }
            | Frame::HashesPacked {
                volume: 0,
                start,
                hashes: more,
            } if start == hashes.len() as u64 && start + more.len() as u64 <= total => {
                hashes.extend(more)
            }
            Frame::HashesEnd {
                volume: 0,
                point,
                blocks,
            } if point == info.point && blocks == total && hashes.len() as u64 == total => {
                return Ok(hashes)
            }
            other => {
                return Err(unexpected(
                    &other,
                    "the point's Hashes in order, then HashesEnd",
                ))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;
    use tokio_util::codec::FramedRead;

    #[tokio::test(start_paused = true)]
    async fn a_long_compare_is_kept_alive_with_pings() {
        let (near, far) = tokio::io::duplex(1 << 16);
        let mut wr = FramedWrite::new(near, FrameCodec::default());
        let work = async {
            tokio::time::sleep(PING_INTERVAL * 3 + PING_INTERVAL / 2).await;
            Ok::<_, AgentError>(7)
        };
        assert_eq!(pinging(&mut wr, work).await.unwrap(), 7);
        drop(wr);
        let mut rd = FramedRead::new(far, FrameCodec::default());
        let mut pings = 0;
        while let Some(f) = rd.next().await {
            assert_eq!(f.unwrap().1, Frame::Ping);
            pings += 1;
        }
        assert_eq!(pings, 3, "one Ping per interval, none at the start");
    }
}
