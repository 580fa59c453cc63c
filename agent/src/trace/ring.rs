//! The binary pages of `per_cpu/cpuN/trace_pipe_raw`: the kernel's ring
//! buffer sub-buffers, as one `read` returns them (one page per read).
//!
//! ```text
//! page (the offsets come from events/header_page; these are x86-64's):
//!  0        8                    16
//!  | ts:u64 | commit:u64         | data[size] ... (zeroes up to the page end)
//!            bits 0..29 size: bytes of data
//!            bit 30 MISSED_STORED: a u64 count of lost events follows the data
//!            bit 31 MISSED_EVENTS: events were lost before this page
//!            bits 32..63: 0, or all ones with bit 31 (the kernel adds the
//!            flags as C ints to a long: `1 << 31` is sign-extended)
//!
//! event (u32 header, little-endian, then its body):
//!  | type_len:5 | time_delta:27 |
//!  type_len 0      | len:u32 | record[len - 4]      (len a multiple of 4, >= 4)
//!  type_len 1..=28 | record[4 * type_len]
//!  type_len 29     padding: time_delta 0 ends the page (less than 8 bytes left);
//!                  else | len:u32 | skipped[len - 4]  (a discarded event)
//!  type_len 30     time extend: | delta_hi:u32 |       (8 bytes in all)
//!  type_len 31     absolute time stamp: | ts_hi:u32 | (8 bytes in all)
//! ```
//!
//! Each record starts with the event's common fields (`common_type:u16`
//! first); [`format`](super::format) decodes them. Timestamps are not
//! needed: the tracer orders nothing across CPUs (see `raw.rs`).
//!
//! Everything here is untrusted input: a length that runs past the page or
//! a type that cannot be is a [`PageError`], never a panic or a read out of
//! bounds.

/// `type_len` of the biggest event with its length in the header.
const MAX_DATA_TYPE_LEN: u32 = 28;
const TYPE_PADDING: u32 = 29;
const TYPE_TIME_EXTEND: u32 = 30;
const TYPE_TIME_STAMP: u32 = 31;
/// Bit of the commit word: events were lost before this page.
const MISSED_EVENTS: u64 = 1 << 31;
/// Bit of the commit word: the count of lost events follows the data.
const MISSED_STORED: u64 = 1 << 30;
/// Bits of the commit word holding the data size (below the flags).
const SIZE_MASK: u64 = MISSED_STORED - 1;
/// The largest page accepted (sub-buffers go up to the kernel's maximum
/// order; far above that is a wrong layout, not a page).
pub(super) const MAX_PAGE: usize = 1 << 20;

/// Where the page header's fields are (from `events/header_page`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PageLayout {
    /// Offset of the commit word.
    pub commit_offset: usize,
    /// Its size: 8 (a `long` on 64-bit) or 4.
    pub commit_size: usize,
    /// Offset of the first event.
    pub data_offset: usize,
    /// Bytes of one page, header included: what one read returns.
    pub page_size: usize,
}

impl PageLayout {
    /// The layout of x86-64 with 4 KiB pages, for tests.
    #[cfg(test)]
    pub(super) const X86_64: Self = Self {
        commit_offset: 8,
        commit_size: 8,
        data_offset: 16,
        page_size: 4096,
    };
}

/// A page that cannot be what the kernel writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PageError {
    /// Shorter than its header.
    #[error("a raw trace page of {0} bytes is shorter than its header")]
    Short(usize),
    /// The commit word has bits that are neither size nor flags.
    #[error("a raw trace page's commit word {0:#x} has unknown bits")]
    BadCommit(u64),
    /// The data size runs past the bytes read.
    #[error("a raw trace page claims {size} bytes of data with room for {room}")]
    TooLong {
        /// Claimed.
        size: usize,
        /// There.
        room: usize,
    },
    /// An event's length is impossible (not a multiple of 4, too small, or
    /// past the data).
    #[error("a raw trace event at byte {at} has a bad length {len}")]
    BadLength {
        /// Offset of the event in the page's data.
        at: usize,
        /// The length found.
        len: u64,
    },
    /// Padding that ends the page with room left for more events.
    #[error("a raw trace page ends with padding at byte {at} of {size}")]
    EarlyEnd {
        /// Offset of the padding.
        at: usize,
        /// Data size.
        size: usize,
    },
    /// A record too short for the fields of its event.
    #[error("a raw trace record of event {id} is {len} bytes, too short for its fields")]
    ShortRecord {
        /// The event's type id.
        id: u16,
        /// Its length.
        len: usize,
    },
}

/// What the page header said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PageInfo {
    /// The kernel lost events before this page (`MISSED_EVENTS`).
    pub missed: bool,
    /// Data records walked.
    pub records: usize,
}

/// Walk the data records of one `page` (the bytes one read returned),
/// calling `record` with each record's bytes. A record `Err` stops the
/// walk and is returned.
pub(super) fn walk_page(
    page: &[u8],
    layout: &PageLayout,
    mut record: impl FnMut(&[u8]) -> Result<(), PageError>,
) -> Result<PageInfo, PageError> {
    let commit = page
        .get(layout.commit_offset..layout.commit_offset + layout.commit_size)
        .and_then(uint_le)
        .ok_or(PageError::Short(page.len()))?;
    let data = page
        .get(layout.data_offset..)
        .ok_or(PageError::Short(page.len()))?;
    // The kernel adds the flags to a `long` as C `int`s: `1 << 31` is
    // negative, so with it the upper half of a 64-bit word is all ones.
    let upper = commit >> 32;
    let sign_extended = upper == u64::from(u32::MAX) && commit & MISSED_EVENTS != 0;
    if upper != 0 && !sign_extended {
        return Err(PageError::BadCommit(commit));
    }
    let commit = commit & u64::from(u32::MAX);
    let size = usize::try_from(commit & SIZE_MASK).unwrap_or(usize::MAX);
    let data = data.get(..size).ok_or(PageError::TooLong {
        size,
        room: data.len(),
    })?;
    let mut info = PageInfo {
        missed: commit & MISSED_EVENTS != 0,
        records: 0,
    };
    let mut at = 0;
    while at < data.len() {
        match next_event(data, at)? {
            Event::Record { body, next } => {
                record(body)?;
                info.records += 1;
                at = next;
            }
            Event::Skip { next } => at = next,
            Event::End => break,
        }
    }
    Ok(info)
}

/// One step of the walk.
enum Event<'a> {
    /// A data record, and where the next event starts.
    Record { body: &'a [u8], next: usize },
    /// Padding or a time event.
    Skip { next: usize },
    /// The rest of the page is padding.
    End,
}

/// The event at `at` of `data` (`at < data.len()`).
fn next_event(data: &[u8], at: usize) -> Result<Event<'_>, PageError> {
    let word = |off: usize| {
        data.get(at + off..at + off + 4)
            .and_then(uint_le)
            .ok_or(PageError::BadLength {
                at,
                len: (data.len() - at) as u64,
            })
    };
    let head = word(0)?;
    let (type_len, delta) = (head & 31, head >> 5);
    let span = |len: u64, body_from: usize| -> Result<(usize, usize), PageError> {
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| at.checked_add(4)?.checked_add(l))
            .filter(|&e| e <= data.len() && len >= 4 && len.is_multiple_of(4))
            .ok_or(PageError::BadLength { at, len })?;
        Ok((at + body_from, end))
    };
    match type_len as u32 {
        0 => {
            // `len` counts itself: the record is the `len - 4` bytes after.
            let (from, end) = span(word(4)?, 8)?;
            let body = data.get(from..end).unwrap_or_default();
            Ok(Event::Record { body, next: end })
        }
        t @ 1..=MAX_DATA_TYPE_LEN => {
            let (from, end) = span(u64::from(t) * 4, 4)?;
            let body = data.get(from..end).unwrap_or_default();
            Ok(Event::Record { body, next: end })
        }
        TYPE_PADDING if delta == 0 => {
            // The kernel writes it only where fewer than 8 bytes are left.
            if data.len() - at >= 8 {
                return Err(PageError::EarlyEnd {
                    at,
                    size: data.len(),
                });
            }
            Ok(Event::End)
        }
        TYPE_PADDING => {
            let (_, end) = span(word(4)?, 4)?;
            Ok(Event::Skip { next: end })
        }
        TYPE_TIME_EXTEND | TYPE_TIME_STAMP => {
            word(4)?;
            Ok(Event::Skip { next: at + 8 })
        }
        // INVARIANT: type_len has 5 bits, all of them matched above; kept
        // as an error rather than a panic all the same.
        _ => Err(PageError::BadLength { at, len: type_len }),
    }
}

/// A little-endian unsigned integer of 1, 2, 4 or 8 bytes.
pub(super) fn uint_le(b: &[u8]) -> Option<u64> {
    Some(match b.len() {
        1 => u64::from(*b.first()?),
        2 => u64::from(u16::from_le_bytes(b.try_into().ok()?)),
        4 => u64::from(u32::from_le_bytes(b.try_into().ok()?)),
        8 => u64::from_le_bytes(b.try_into().ok()?),
        _ => return None,
    })
}

#[cfg(test)]
#[path = "ring_tests.rs"]
pub(super) mod tests;
