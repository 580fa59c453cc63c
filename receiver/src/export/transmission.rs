//! The transmission phase: requests one after the other, each answered
//! before the next is read. READ, FLUSH, DISC and BLOCK_STATUS
//! (`base:allocation`) always; WRITE, TRIM and WRITE_ZEROES on a writable
//! export (EPERM otherwise). A request's length is checked against
//! [`MAX_PAYLOAD`] before its buffer is reserved: a too-long READ gets an
//! error, a too-long WRITE closes the connection (its payload cannot be
//! skipped safely).

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::connection::ConnError;
use super::disk::{Disk, WriteError};
use super::options::Negotiated;
use super::wire::*;
use crate::ReceiveError;

/// Serve requests until the client disconnects or the export stops.
pub(crate) async fn transmit<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    disk: &Arc<Disk>,
    neg: Negotiated,
    stop: &CancellationToken,
) -> Result<(), ConnError> {
    let mut out = BytesMut::with_capacity(64 << 10);
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
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_READ => read(&mut out, disk, neg, req).await?,
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    return Err(ConnError::TooLarge {
                        what: "write",
                        len: u64::from(req.length),
                    });
                }
                let mut data = vec![0u8; req.length as usize];
                s.read_exact(&mut data).await?;
                let err = write(disk, req, Some(data)).await?;
                status(&mut out, neg, req.cookie, err);
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let err = write(disk, req, None).await?;
                status(&mut out, neg, req.cookie, err);
            }
            CMD_FLUSH => {
                let d = disk.clone();
                let err = match blocking(move || d.flush()).await? {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::warn!(cause = %e, "flush of the overlay failed");
                        EIO
                    }
                };
                status(&mut out, neg, req.cookie, err);
            }
            CMD_BLOCK_STATUS => block_status(&mut out, disk, neg, req),
            _ => status(&mut out, neg, req.cookie, EINVAL),
        }
        s.write_all(&out).await?;
        s.flush().await?;
        out.clear();
    }
}

/// A reply with no data: success (0) or an NBD error.
fn status(out: &mut BytesMut, neg: Negotiated, cookie: u64, err: u32) {
    if err != 0 && neg.structured {
        error_chunk(out, cookie, err, "");
    } else {
        simple_reply(out, err, cookie);
    }
}

async fn read(
    out: &mut BytesMut,
    disk: &Arc<Disk>,
    neg: Negotiated,
    req: Request,
) -> Result<(), ConnError> {
    if req.length > MAX_PAYLOAD {
        let err = if neg.structured { EOVERFLOW } else { EINVAL };
        status(out, neg, req.cookie, err);
        return Ok(());
    }
    if !req.within(disk.size()) {
        status(out, neg, req.cookie, EINVAL);
        return Ok(());
    }
    let d = disk.clone();
    let data = match blocking(move || d.read(req.offset, req.length as usize)).await? {
        Ok(data) => data,
        // The image logged which block is damaged.
        Err(_) => {
            status(out, neg, req.cookie, EIO);
            return Ok(());
        }
    };
    if !neg.structured {
        simple_reply(out, 0, req.cookie);
    } else if data.is_empty() {
        chunk_header(out, CHUNK_DONE, CHUNK_NONE, req.cookie, 0);
    } else {
        chunk_header(
            out,
            CHUNK_DONE,
            CHUNK_OFFSET_DATA,
            req.cookie,
            req.length + 8,
        );
        out.put_u64(req.offset);
    }
    out.extend_from_slice(&data);
    Ok(())
}

/// WRITE (`data`), or TRIM / WRITE_ZEROES (`None`); the NBD error, 0 for success.
async fn write(disk: &Arc<Disk>, req: Request, data: Option<Vec<u8>>) -> Result<u32, ConnError> {
    if !disk.writable() {
        return Ok(EPERM);
    }
    if !req.within(disk.size()) {
        return Ok(EINVAL);
    }
    let d = disk.clone();
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let r = blocking(move || Ok(d.write(req.offset, req.length as usize, data.as_deref(), fua)))
        .await?
        .map_err(ConnError::Internal)?;
    Ok(match r {
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
    })
}

fn block_status(out: &mut BytesMut, disk: &Disk, neg: Negotiated, req: Request) {
    let Some(id) = neg.allocation.filter(|_| neg.structured) else {
        return status(out, neg, req.cookie, EINVAL);
    };
    if req.length == 0 || !req.within(disk.size()) {
        return status(out, neg, req.cookie, EINVAL);
    }
    let runs = disk.extents(req.offset, req.length, req.flags & CMD_FLAG_REQ_ONE != 0);
    // INVARIANT: at most 2^20 runs of 8 bytes.
    let len = u32::try_from(4 + 8 * runs.len()).unwrap_or(u32::MAX);
    chunk_header(out, CHUNK_DONE, CHUNK_BLOCK_STATUS, req.cookie, len);
    out.put_u32(id);
    for (n, state) in runs {
        out.put_u32(n);
        out.put_u32(state);
    }
}

/// Run disk work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReceiveError> + Send + 'static,
) -> Result<Result<T, ReceiveError>, ConnError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ConnError::Internal(ReceiveError::join("export disk", e)))
}
