//! The page walker on pages built here, byte by byte.

use super::*;
use proptest::prelude::*;

/// Builds a page as the kernel lays it out (x86-64).
#[derive(Default)]
pub(in crate::trace) struct PageBuilder {
    data: Vec<u8>,
    pub flags: u64,
}

impl PageBuilder {
    pub(in crate::trace) fn head(&mut self, type_len: u32, delta: u32) -> &mut Self {
        self.data
            .extend_from_slice(&(type_len | (delta << 5)).to_le_bytes());
        self
    }

    pub(in crate::trace) fn word(&mut self, w: u32) -> &mut Self {
        self.data.extend_from_slice(&w.to_le_bytes());
        self
    }

    /// A data record, in the short form when it fits (length a multiple of
    /// 4).
    pub(in crate::trace) fn record(&mut self, body: &[u8]) -> &mut Self {
        assert_eq!(body.len() % 4, 0);
        let words = (body.len() / 4) as u32;
        if (1..=28).contains(&words) {
            self.head(words, 1);
        } else {
            self.head(0, 1).word(body.len() as u32 + 4);
        }
        self.data.extend_from_slice(body);
        self
    }

    pub(in crate::trace) fn page(&self) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        p[..8].copy_from_slice(&123u64.to_le_bytes());
        let commit = (self.data.len() as u64).wrapping_add(self.flags);
        p[8..16].copy_from_slice(&commit.to_le_bytes());
        p[16..16 + self.data.len()].copy_from_slice(&self.data);
        p
    }
}

fn walk(page: &[u8]) -> Result<(PageInfo, Vec<Vec<u8>>), PageError> {
    let mut recs = Vec::new();
    let info = walk_page(page, &PageLayout::X86_64, |r| {
        recs.push(r.to_vec());
        Ok(())
    })?;
    Ok((info, recs))
}

#[test]
fn walks_records_padding_and_time_events() {
    let small = [1u8; 8];
    let big = [2u8; 200];
    let mut b = PageBuilder::default();
    b.record(&small)
        .head(30, 5)
        .word(77) // time extend
        .record(&big)
        .head(29, 1)
        .word(12) // a discarded event of 16 bytes (the length counts itself)
        .word(0)
        .word(0)
        .head(31, 0)
        .word(9) // absolute time stamp
        .record(&small);
    let (info, recs) = walk(&b.page()).unwrap();
    assert!(!info.missed);
    assert_eq!(recs, vec![small.to_vec(), big.to_vec(), small.to_vec()]);
    assert_eq!(info.records, 3);
}

#[test]
fn an_empty_page_and_a_null_padding_at_the_end() {
    let (info, recs) = walk(&PageBuilder::default().page()).unwrap();
    assert_eq!((info.records, recs.len()), (0, 0));
    let mut b = PageBuilder::default();
    b.record(&[3; 4]).head(29, 0);
    let (_, recs) = walk(&b.page()).unwrap();
    assert_eq!(recs, vec![vec![3; 4]]);
}

#[test]
fn the_missed_events_flags_say_events_were_lost() {
    // As the kernel adds them to the 64-bit commit word: sign-extended ints.
    let events = (i64::from(i32::MIN)) as u64;
    let stored = 1u64 << 30;
    for (flags, missed) in [
        (0, false),
        (events, true),
        (events.wrapping_add(stored), true),
    ] {
        let mut b = PageBuilder::default();
        b.record(&[0; 8]);
        b.flags = flags;
        let (info, _) = walk(&b.page()).unwrap();
        assert_eq!(info.missed, missed, "{flags:#x}");
    }
}

#[test]
fn malformed_pages_are_errors() {
    // Shorter than the header.
    assert_eq!(walk(&[0; 10]).unwrap_err(), PageError::Short(10));
    // Unknown bits in the commit word (the upper half set without bit 31,
    // or partly).
    for bad in [1u64 << 40, 0xffff_ffff_0000_0000, 0x0000_ffff_8000_0000] {
        let mut p = PageBuilder::default().page();
        p[8..16].copy_from_slice(&bad.to_le_bytes());
        assert!(matches!(walk(&p), Err(PageError::BadCommit(_))), "{bad:#x}");
    }
    // A size past the page.
    let mut p = PageBuilder::default().page();
    p[8..16].copy_from_slice(&5000u64.to_le_bytes());
    assert!(matches!(
        walk(&p),
        Err(PageError::TooLong { size: 5000, .. })
    ));
    // An event running past the data.
    let mut b = PageBuilder::default();
    b.head(0, 1).word(4000).word(0);
    assert!(matches!(
        walk(&b.page()),
        Err(PageError::BadLength { at: 0, .. })
    ));
    // A length that is not a multiple of 4, or too small.
    for len in [7, 0, 2] {
        let mut b = PageBuilder::default();
        b.head(0, 1).word(len).word(0).word(0);
        assert!(
            matches!(walk(&b.page()), Err(PageError::BadLength { .. })),
            "{len}"
        );
    }
    // A short event cut by the data's end.
    let mut b = PageBuilder::default();
    b.record(&[0; 4]).head(5, 1);
    assert!(matches!(
        walk(&b.page()),
        Err(PageError::BadLength { at: 8, .. })
    ));
    // Null padding with room left for events after it.
    let mut b = PageBuilder::default();
    b.head(29, 0).word(0).record(&[0; 8]);
    assert!(matches!(
        walk(&b.page()),
        Err(PageError::EarlyEnd { at: 0, .. })
    ));
}

#[test]
fn a_record_error_stops_the_walk() {
    let mut b = PageBuilder::default();
    b.record(&[1; 4]).record(&[2; 4]);
    let mut n = 0;
    let r = walk_page(&b.page(), &PageLayout::X86_64, |_| {
        n += 1;
        Err(PageError::ShortRecord { id: 1, len: 4 })
    });
    assert_eq!(r, Err(PageError::ShortRecord { id: 1, len: 4 }));
    assert_eq!(n, 1);
}

proptest! {
    /// Arbitrary bytes, whole or with a plausible header, never panic, and
    /// every record handed out lies inside the page.
    #[test]
    fn arbitrary_pages_never_panic(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..600),
        size in 0u64..700,
        flags in 0u64..4,
    ) {
        let _ = walk(&bytes);
        if bytes.len() >= 16 {
            bytes[8..16].copy_from_slice(&(size | flags << 30).to_le_bytes());
            let page_range = bytes.as_ptr_range();
            let mut inside = true;
            let _ = walk_page(&bytes, &PageLayout::X86_64, |r| {
                let rr = r.as_ptr_range();
                inside &= rr.start >= page_range.start && rr.end <= page_range.end;
                Ok(())
            });
            prop_assert!(inside);
        }
    }
}
