//! The bodies of the restore frames (kinds 16 to 19, feature bit
//! [`FEATURE_RESTORE`](crate::limits::FEATURE_RESTORE)): an agent asks for a
//! point of a volume, gets its size and block hashes, then fetches the
//! blocks that differ from its target. Layouts are drawn in the crate docs.

use bytes::{BufMut, BytesMut};

use crate::limits::{valid_block_size, valid_name, MAX_FETCH_PER_FRAME, MAX_VOLUME_SIZE};
use crate::reader::Reader;
use crate::DecodeError;

/// Which point a restore asks for. Values of `which` are on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointSelector {
    /// The server's newest point (`which` = 0, value 0).
    Latest,
    /// The point with this id, as the server numbers its points (`which` = 1).
    Id(u64),
    /// The newest point created at or before this time, ms since the epoch
    /// (`which` = 2).
    At(i64),
}

/// `Restore`: which point of which volume of which server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The server whose volume is restored; empty = the connection's own.
    pub server: String,
    /// The volume's name.
    pub volume: String,
    /// The point.
    pub point: PointSelector,
}

/// `RestoreInfo`: the point the receiver resolved and the volume's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreInfo {
    /// The point's id (as the server numbers its points).
    pub point: u64,
    /// The volume's size in bytes at that point.
    pub size: u64,
    /// Its block size.
    pub block_size: u32,
}

fn put_name(dst: &mut BytesMut, name: &str) {
    let name = &name.as_bytes()[..name.len().min(crate::limits::MAX_NAME_LEN)];
    dst.put_u8(name.len() as u8);
    dst.put_slice(name);
}

fn name<'a>(r: &mut Reader<'a>, what: &'static str) -> Result<&'a str, DecodeError> {
    let len = usize::from(r.u8()?);
    std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Invalid(what))
}

impl RestoreRequest {
    pub(super) fn encode(&self, dst: &mut BytesMut) {
        put_name(dst, &self.server);
        put_name(dst, &self.volume);
        let (which, value) = match self.point {
            PointSelector::Latest => (0u8, 0u64),
            PointSelector::Id(id) => (1, id),
            PointSelector::At(ms) => (2, ms as u64),
        };
        dst.put_u8(which);
        dst.put_u64_le(value);
    }

    pub(super) fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, "Restore");
        let server = name(&mut r, "server name")?;
        if !server.is_empty() && !valid_name(server) {
            return Err(DecodeError::Invalid("server name"));
        }
        let volume = name(&mut r, "volume name")?;
        if !valid_name(volume) {
            return Err(DecodeError::Invalid("volume name"));
        }
        let which = r.u8()?;
        let value = r.u64()?;
        r.finish()?;
        let point = match which {
            0 if value == 0 => PointSelector::Latest,
            1 => PointSelector::Id(value),
            2 => PointSelector::At(value as i64),
            _ => return Err(DecodeError::Invalid("point selector")),
        };
        Ok(Self {
            server: server.to_owned(),
            volume: volume.to_owned(),
            point,
        })
    }
}

impl RestoreInfo {
    pub(super) fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64_le(self.point);
        dst.put_u64_le(self.size);
        dst.put_u32_le(self.block_size);
    }

    pub(super) fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body, "RestoreInfo");
        let point = r.u64()?;
        let size = r.u64()?;
        let block_size = r.u32()?;
        r.finish()?;
        if !valid_block_size(block_size) {
            return Err(DecodeError::Invalid("block size"));
        }
        if size > MAX_VOLUME_SIZE {
            return Err(DecodeError::Invalid("volume size"));
        }
        Ok(Self {
            point,
            size,
            block_size,
        })
    }
}

/// `Fetch`: `count u16 | index u64 x count`, 1 to [`MAX_FETCH_PER_FRAME`].
pub(super) fn encode_fetch(indexes: &[u64], dst: &mut BytesMut) {
    let n = indexes.len().min(MAX_FETCH_PER_FRAME);
    dst.put_u16_le(n as u16);
    for i in indexes.iter().take(n) {
        dst.put_u64_le(*i);
    }
}

pub(super) fn parse_fetch(body: &[u8]) -> Result<Vec<u64>, DecodeError> {
    let mut r = Reader::new(body, "Fetch");
    let n = usize::from(r.u16()?);
    // Checked before anything is reserved for the list.
    if n == 0 || n > MAX_FETCH_PER_FRAME {
        return Err(DecodeError::Invalid("fetch count"));
    }
    if r.remaining() != n * 8 {
        return Err(DecodeError::TrailingData("Fetch"));
    }
    let mut indexes = Vec::with_capacity(n);
    for _ in 0..n {
        indexes.push(r.u64()?);
    }
    r.finish()?;
    Ok(indexes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;

    fn body_of(frame: &Frame) -> Vec<u8> {
        let mut buf = BytesMut::new();
        frame.encode(0, &mut buf);
        buf[crate::frame::HEADER_LEN..buf.len() - crate::frame::CRC_LEN].to_vec()
    }

    #[test]
    fn a_fetch_count_outside_its_bounds_is_refused_before_reserving() {
        let mut empty = BytesMut::new();
        empty.put_u16_le(0);
        assert_eq!(
            parse_fetch(&empty),
            Err(DecodeError::Invalid("fetch count"))
        );
        let mut flood = BytesMut::new();
        flood.put_u16_le(u16::MAX);
        assert_eq!(
            parse_fetch(&flood),
            Err(DecodeError::Invalid("fetch count"))
        );
        let mut short = BytesMut::new();
        short.put_u16_le(2);
        short.put_u64_le(1);
        assert_eq!(parse_fetch(&short), Err(DecodeError::TrailingData("Fetch")));
    }

    #[test]
    fn selectors_and_names_are_checked() {
        let ok = Frame::Restore(RestoreRequest {
            server: String::new(),
            volume: "root".into(),
            point: PointSelector::Id(3),
        });
        let mut body = body_of(&ok);
        assert!(RestoreRequest::parse(&body).is_ok());
        let which = body.len() - 9;
        body[which] = 7;
        assert_eq!(
            RestoreRequest::parse(&body),
            Err(DecodeError::Invalid("point selector"))
        );
        let mut bad = BytesMut::new();
        put_name(&mut bad, "Web");
        put_name(&mut bad, "root");
        bad.put_u8(0);
        bad.put_u64_le(0);
        assert_eq!(
            RestoreRequest::parse(&bad),
            Err(DecodeError::Invalid("server name"))
        );
    }

    #[test]
    fn restore_info_refuses_an_impossible_volume() {
        let mut b = BytesMut::new();
        RestoreInfo {
            point: 1,
            size: 10,
            block_size: 1000,
        }
        .encode(&mut b);
        assert_eq!(
            RestoreInfo::parse(&b),
            Err(DecodeError::Invalid("block size"))
        );
    }
}
