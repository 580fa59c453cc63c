//! The format files of a 6.x kernel, and records built from them.

use super::*;

pub(in crate::trace) const RQ: &str = "name: block_rq_complete
ID: 2107
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u\", REC->dev
";

pub(in crate::trace) const BIO: &str = "name: block_bio_complete
ID: 2100
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[10];\toffset:32;\tsize:10;\tsigned:0;
";

pub(in crate::trace) const PRINT: &str = "name: print
ID: 5
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long ip;\toffset:8;\tsize:8;\tsigned:0;
\tfield:char buf[];\toffset:16;\tsize:0;\tsigned:0;
";

pub(in crate::trace) const HEADER_PAGE: &str =
    "\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;
\tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;
\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;
\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;
";

fn decoder() -> Decoder {
    Decoder::new(&[RQ, BIO], PRINT).unwrap()
}

/// A completion record laid out as `block_rq_complete` (`bio` false) or
/// `block_bio_complete`.
pub(in crate::trace) fn completion(
    bio: bool,
    dev: u32,
    sector: u64,
    nr: u32,
    rwbs: &str,
) -> Vec<u8> {
    let mut r = vec![0u8; 48];
    let (id, rwbs_at) = if bio { (2100u16, 32) } else { (2107u16, 34) };
    r[..2].copy_from_slice(&id.to_le_bytes());
    r[8..12].copy_from_slice(&dev.to_le_bytes());
    r[16..24].copy_from_slice(&sector.to_le_bytes());
    r[24..28].copy_from_slice(&nr.to_le_bytes());
    r[rwbs_at..rwbs_at + rwbs.len()].copy_from_slice(rwbs.as_bytes());
    r
}

/// A `print` record as `trace_marker` writes it.
pub(in crate::trace) fn print(text: &str) -> Vec<u8> {
    let mut r = vec![0u8; 16];
    r[..2].copy_from_slice(&5u16.to_le_bytes());
    r.extend_from_slice(text.as_bytes());
    r.extend_from_slice(b"\n\0");
    while !r.len().is_multiple_of(4) {
        r.push(0);
    }
    r
}

#[test]
fn reads_the_page_header_layout() {
    assert_eq!(
        page_layout(HEADER_PAGE),
        Some(PageLayout {
            commit_offset: 8,
            commit_size: 8,
            data_offset: 16,
            page_size: 4096,
        })
    );
    assert_eq!(
        page_layout("field: u64 timestamp;\toffset:0;\tsize:8;"),
        None
    );
    let huge = HEADER_PAGE.replace("size:4080", "size:99999999");
    assert_eq!(page_layout(&huge), None);
}

#[test]
fn reads_fields_by_name() {
    let f = Format::parse(RQ).unwrap();
    assert_eq!(f.id, 2107);
    assert_eq!(
        f.field("rwbs"),
        Some(Field {
            offset: 34,
            size: 10
        })
    );
    assert_eq!(
        f.field("cmd"),
        Some(Field {
            offset: 44,
            size: 4
        })
    );
    assert_eq!(
        f.field("nr_sector"),
        Some(Field {
            offset: 24,
            size: 4
        })
    );
    assert_eq!(Format::parse("field:int x;\toffset:zz;\tsize:4;"), None);
    assert_eq!(Format::parse("no id here"), None);
}

#[test]
fn decodes_records_as_the_text_parser_reads_lines() {
    let d = decoder();
    let dev = (253 << 20) | 1;
    let cases: &[(Vec<u8>, Line)] = &[
        (
            completion(false, 7 << 20, 800, 8, "WS"),
            Line::Write {
                dev: 7 << 20,
                sector: 800,
                nr: 8,
            },
        ),
        (
            completion(true, dev, 16, 32, "W"),
            Line::Write {
                dev,
                sector: 16,
                nr: 32,
            },
        ),
        (completion(false, 7 << 20, 0, 8, "R"), Line::Other),
        (
            completion(false, 7 << 20, 64, 64, "DS"),
            Line::Write {
                dev: 7 << 20,
                sector: 64,
                nr: 64,
            },
        ),
        (print("pilotlight-sync-42"), Line::Marker(42)),
        (print("pilotlight-sync-x"), Line::Other),
        (print("someone else's marker"), Line::Other),
        (vec![9, 9, 0, 0], Line::Other),
    ];
    for (rec, want) in cases {
        assert_eq!(&d.decode(rec).unwrap(), want, "{rec:?}");
    }
}

#[test]
fn short_records_are_errors() {
    let d = decoder();
    assert!(d.decode(&[5]).is_err());
    let rec = completion(false, 1, 2, 3, "W");
    assert_eq!(
        d.decode(&rec[..30]),
        Err(PageError::ShortRecord { id: 2107, len: 30 })
    );
    assert_eq!(
        d.decode(&print("x")[..10]),
        Err(PageError::ShortRecord { id: 5, len: 10 })
    );
}

#[test]
fn a_format_without_a_needed_field_is_refused() {
    let no_rwbs = RQ.replace("rwbs[10]", "flags[10]");
    assert_eq!(Decoder::new(&[&no_rwbs], PRINT), None);
    let odd_dev = RQ.replace("dev;\toffset:8;\tsize:4", "dev;\toffset:8;\tsize:3");
    assert_eq!(Decoder::new(&[&odd_dev], PRINT), None);
    assert!(Decoder::new(&[], PRINT).is_some());
}

#[test]
fn a_page_of_records_reads_as_lines_and_its_flag_as_lost() {
    use crate::trace::raw::read_page;
    use crate::trace::ring::tests::PageBuilder;
    let d = decoder();
    let mut b = PageBuilder::default();
    b.record(&completion(false, 7 << 20, 8, 8, "W"))
        .record(&print("pilotlight-sync-3"))
        .record(&completion(true, 7 << 20, 0, 8, "R"));
    let read = |b: &PageBuilder| {
        let mut lines = Vec::new();
        let missed = read_page(&b.page(), &PageLayout::X86_64, &d, &mut |l| lines.push(l));
        (missed, lines)
    };
    let (missed, lines) = read(&b);
    assert_eq!(missed, Ok(false));
    assert_eq!(
        lines,
        vec![
            Line::Write {
                dev: 7 << 20,
                sector: 8,
                nr: 8
            },
            Line::Marker(3),
            Line::Other
        ]
    );
    b.flags = i64::from(i32::MIN) as u64;
    assert_eq!(read(&b).0, Ok(true));
    // A record cut short: the lines before it are given, then the error.
    b.flags = 0;
    b.record(&completion(false, 1, 1, 1, "W")[..20]);
    let (missed, lines) = read(&b);
    assert_eq!(missed, Err(PageError::ShortRecord { id: 2107, len: 20 }));
    assert_eq!(lines.len(), 3);
}

proptest::proptest! {
    /// Arbitrary bytes as a page, its records decoded with a real kernel's
    /// formats, never panic; records made of arbitrary bytes behind a valid
    /// type id never panic either.
    #[test]
    fn arbitrary_pages_and_records_never_panic(
        bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..600),
        size in 0u64..600,
        pick in 0usize..3,
    ) {
        use crate::trace::raw::read_page;
        let d = decoder();
        let _ = read_page(&bytes, &PageLayout::X86_64, &d, &mut |_| {});
        let mut page = vec![0u8; 16];
        page[8..16].copy_from_slice(&size.to_le_bytes());
        page.extend_from_slice(&bytes);
        let _ = read_page(&page, &PageLayout::X86_64, &d, &mut |_| {});
        let mut rec = bytes;
        let id: u16 = [2107, 2100, 5][pick];
        if rec.len() >= 2 {
            rec[..2].copy_from_slice(&id.to_le_bytes());
        }
        let _ = d.decode(&rec);
    }
}
