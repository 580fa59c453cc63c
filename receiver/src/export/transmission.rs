//! The transmission phase: requests read one after the other and answered
//! in the order they came, but worked on concurrently: a client with many
//! requests in flight (nbdcopy keeps 64 per connection) gets the disk
//! reads, decompression and BLAKE3 checks of several at once, on every
//! core, bounded by [`IN_FLIGHT`] requests and [`IN_FLIGHT_BYTES`] of reads
//! per connection and by the disk's read slots across connections. READ, FLUSH, DISC and
//! BLOCK_STATUS (`base:allocation`) always; WRITE, TRIM and WRITE_ZEROES on
//! a writable export (EPERM otherwise). A request's length is checked
//! against [`MAX_PAYLOAD`] before its buffer is reserved: a too-long READ
//! gets an error, a too-long WRITE closes the connection (its payload
//! cannot be skipped safely).

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::connection::ConnError;
use super::disk::{Disk, WriteError};
use super::options::Negotiated;
use super::reply::{self, Encoded, ReadReply};
use super::wire::*;
use crate::ReceiveError;

/// Requests one connection has in flight at most (read, not yet answered).
pub(crate) const IN_FLIGHT: usize = 64;
/// Bytes of reads one connection has in flight at most; a larger read
/// waits until it is the only one.
pub(crate) const IN_FLIGHT_BYTES: u32 = 8 << 20;

/// A reply to send, in request order.
enum Reply {
    /// Encoded already.
    Ready(Encoded),
    /// Being worked on by a disk task; the permit holds a read's share of
    /// [`IN_FLIGHT_BYTES`] until it is sent.
    Pending(JoinHandle<Encoded>, Option<OwnedSemaphorePermit>),
}

/// Serve requests until the client disconnects or the export stops.
pub(crate) async fn transmit<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    disk: &Arc<Disk>,
    neg: Negotiated,
    stop: &CancellationToken,
) -> Result<(), ConnError> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    tokio::try_join!(receive(&mut rd, disk, neg, stop, tx), send(&mut wr, rx))?;
    Ok(())
}

/// Read requests and start each; ends at DISC, end of stream or stop.
async fn receive<R: AsyncRead + Unpin>(
    s: &mut R,
    disk: &Arc<Disk>,
    neg: Negotiated,
    stop: &CancellationToken,
    tx: mpsc::Sender<Reply>,
) -> Result<(), ConnError> {
    let budget = Arc::new(Semaphore::new(IN_FLIGHT_BYTES as usize));
    loop {
        let mut head = [0u8; REQUEST_LEN];
        tokio::select! {
            r = s.read_exact(&mut head) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            },
            () = stop.cancelled() => return Ok(()),
        }
        let req = Request::parse(&head).ok_or(ConnError::Malformed("request without its magic"))?;
        let reply = match req.kind {
            CMD_DISC => return Ok(()),
            CMD_READ => {
                let share = req.length.min(IN_FLIGHT_BYTES);
                let permit = budget
                    .clone()
                    .acquire_many_owned(share)
                    .await
                    .map_err(|_| {
                        ConnError::Internal(ReceiveError::Internal("read budget closed".into()))
                    })?;
                let slot = disk.read_slot().await.ok_or_else(|| {
                    ConnError::Internal(ReceiveError::Internal("read slots closed".into()))
                })?;
                let d = disk.clone();
                let task = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    read(&d, neg, req)
                });
                Reply::Pending(task, Some(permit))
            }
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    return Err(ConnError::TooLarge {
                        what: "write",
                        len: u64::from(req.length),
                    });
                }
                let mut data = vec![0u8; req.length as usize];
                s.read_exact(&mut data).await?;
                let d = disk.clone();
                let task = tokio::task::spawn_blocking(move || {
                    let err = write(&d, req, Some(data));
                    status(neg, req.cookie, err).into()
                });
                Reply::Pending(task, None)
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let d = disk.clone();
                let task = tokio::task::spawn_blocking(move || {
                    let err = write(&d, req, None);
                    status(neg, req.cookie, err).into()
                });
                Reply::Pending(task, None)
            }
            CMD_FLUSH => {
                let d = disk.clone();
                let task = tokio::task::spawn_blocking(move || {
                    let err = match d.flush() {
                        Ok(()) => 0,
                        Err(e) => {
                            tracing::warn!(cause = %e, "flush of the overlay failed");
                            EIO
                        }
                    };
                    status(neg, req.cookie, err).into()
                });
                Reply::Pending(task, None)
            }
            CMD_BLOCK_STATUS => Reply::Ready(block_status(disk, neg, req).into()),
            _ => Reply::Ready(status(neg, req.cookie, EINVAL).into()),
        };
        if tx.send(reply).await.is_err() {
            // The sender has stopped on an error, which `transmit` reports.
            return Ok(());
        }
    }
}

/// Send the replies in request order, each as soon as its work is done;
/// the socket is flushed whenever the next reply is not ready yet.
async fn send<W: AsyncWrite + Unpin>(
    s: &mut W,
    mut rx: mpsc::Receiver<Reply>,
) -> Result<(), ConnError> {
    while let Some(reply) = rx.recv().await {
        let (encoded, _permit) = match reply {
            Reply::Ready(encoded) => (encoded, None),
            Reply::Pending(task, permit) => {
                if !task.is_finished() {
                    s.flush().await?;
                }
                let encoded = task
                    .await
                    .map_err(|e| ConnError::Internal(ReceiveError::join("export disk", e)))?;
                (encoded, permit)
            }
        };
        reply::write(s, &encoded).await?;
        if rx.is_empty() {
            s.flush().await?;
        }
    }
    Ok(())
}

/// A reply with no data: success (0) or an NBD error.
fn status(neg: Negotiated, cookie: u64, err: u32) -> BytesMut {
    let mut out = BytesMut::with_capacity(64);
    if err != 0 && neg.structured {
        error_chunk(&mut out, cookie, err, "");
    } else {
        simple_reply(&mut out, err, cookie);
    }
    out
}

/// READ: the whole answer. Blocking: runs in a disk task.
fn read(disk: &Disk, neg: Negotiated, req: Request) -> Encoded {
    if req.length > MAX_PAYLOAD {
        let err = if neg.structured { EOVERFLOW } else { EINVAL };
        return status(neg, req.cookie, err).into();
    }
    if !req.within(disk.size()) {
        return status(neg, req.cookie, EINVAL).into();
    }
    match disk.read(req.offset, req.length as usize) {
        Ok(pieces) => ReadReply {
            cookie: req.cookie,
            offset: req.offset,
            structured: neg.structured,
            holes: req.flags & CMD_FLAG_DF == 0,
        }
        .encode(pieces),
        // The image logged which block is damaged.
        Err(_) => status(neg, req.cookie, EIO).into(),
    }
}

/// WRITE (`data`), or TRIM / WRITE_ZEROES (`None`); the NBD error, 0 for
/// success. Blocking: runs in a disk task.
fn write(disk: &Disk, req: Request, data: Option<Vec<u8>>) -> u32 {
    if !disk.writable() {
        return EPERM;
    }
    if !req.within(disk.size()) {
        return EINVAL;
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match disk.write(req.offset, req.length as usize, data.as_deref(), fua) {
        Ok(()) => 0,
        Err(WriteError::ReadOnly) => EPERM,
        Err(WriteError::Failed(e)) => {
            tracing::warn!(cause = %e, offset = req.offset, "write into the overlay failed");
            match &e {
                ReceiveError::Storage { source, .. }
                    if source.raw_os_error() == Some(libc::ENOSPC) =>
                {
                    ENOSPC
                }
                _ => EIO,
            }
        }
    }
}

fn block_status(disk: &Disk, neg: Negotiated, req: Request) -> BytesMut {
    let Some(id) = neg.allocation.filter(|_| neg.structured) else {
        return status(neg, req.cookie, EINVAL);
    };
    if req.length == 0 || !req.within(disk.size()) {
        return status(neg, req.cookie, EINVAL);
    }
    let runs = disk.extents(req.offset, req.length, req.flags & CMD_FLAG_REQ_ONE != 0);
    let mut out = BytesMut::with_capacity(32 + 8 * runs.len());
    // INVARIANT: at most 2^20 runs of 8 bytes.
    let len = u32::try_from(4 + 8 * runs.len()).unwrap_or(u32::MAX);
    chunk_header(&mut out, CHUNK_DONE, CHUNK_BLOCK_STATUS, req.cookie, len);
    out.put_u32(id);
    for (n, state) in runs {
        out.put_u32(n);
        out.put_u32(state);
    }
    out
}
