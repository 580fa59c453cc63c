//! The raw reader on fake instance directories (regular files stand in for
//! the per-CPU buffers), and its reason to fall back.

use super::*;
use crate::trace::format::tests::{completion, print, BIO, HEADER_PAGE, PRINT, RQ};
use crate::trace::ring::tests::PageBuilder;

/// An instance directory as tracefs lays it out, with `page` as CPU 0's
/// raw buffer (a regular file: read once, then end of file).
fn fake_instance(page: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ev = dir.path().join("events");
    for (sub, text) in [
        ("block/block_rq_complete", RQ),
        ("block/block_bio_complete", BIO),
        ("ftrace/print", PRINT),
    ] {
        std::fs::create_dir_all(ev.join(sub)).unwrap();
        std::fs::write(ev.join(sub).join("format"), text).unwrap();
    }
    std::fs::write(ev.join("header_page"), HEADER_PAGE).unwrap();
    std::fs::create_dir_all(dir.path().join("per_cpu/cpu0")).unwrap();
    std::fs::write(dir.path().join("per_cpu/cpu0/trace_pipe_raw"), page).unwrap();
    dir
}

const EVENTS: [&str; 2] = ["block/block_rq_complete", "block/block_bio_complete"];

#[test]
fn drains_a_cpu_buffer_into_lines() {
    let mut b = PageBuilder::default();
    b.record(&completion(true, 9, 40, 8, "WS"))
        .record(&print("pilotlight-sync-1"));
    b.flags = i64::from(i32::MIN) as u64;
    let dir = fake_instance(&b.page());
    let mut r = RawReader::open(dir.path(), &EVENTS).unwrap();
    let mut lines = Vec::new();
    let lost = crate::trace::read_to_marker(
        &mut r,
        &mut |l| {
            let m = l == Line::Marker(1);
            lines.push(l);
            m
        },
        || Ok(false),
    )
    .unwrap();
    assert!(!lost);
    assert_eq!(
        lines,
        vec![
            Line::Write {
                dev: 9,
                sector: 40,
                nr: 8
            },
            Line::Marker(1),
            Line::Lost
        ]
    );
    let s = r.stats;
    assert_eq!((s.pages, s.missed_pages, s.malformed_pages), (1, 1, 0));
}

#[test]
fn a_malformed_page_is_reported_as_lost() {
    let mut page = PageBuilder::default().page();
    page[8..16].copy_from_slice(&9000u64.to_le_bytes());
    let dir = fake_instance(&page);
    let mut r = RawReader::open(dir.path(), &EVENTS).unwrap();
    let mut lines = Vec::new();
    r.drain(|l| lines.push(l)).unwrap();
    assert_eq!(lines, vec![Line::Lost]);
    assert_eq!(r.stats.malformed_pages, 1);
}

#[test]
fn says_why_the_raw_files_cannot_be_used() {
    type Spoil = fn(&Path);
    let cases: [(&str, Spoil); 5] = [
        ("header_page", |d| {
            std::fs::remove_file(d.join("events/header_page")).unwrap()
        }),
        ("header_page", |d| {
            std::fs::write(d.join("events/header_page"), "garbage").unwrap()
        }),
        ("print", |d| {
            std::fs::remove_file(d.join("events/ftrace/print/format")).unwrap()
        }),
        ("lacks a field", |d| {
            let f = d.join("events/block/block_rq_complete/format");
            std::fs::write(&f, RQ.replace("sector;", "sectors;")).unwrap()
        }),
        ("trace_pipe_raw", |d| {
            std::fs::remove_dir_all(d.join("per_cpu/cpu0")).unwrap()
        }),
    ];
    for (want, spoil) in cases {
        let dir = fake_instance(&[]);
        spoil(dir.path());
        let err = RawReader::open(dir.path(), &EVENTS).err().unwrap();
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn reads_cpu_lists() {
    assert!(cpu_listed("0-3,5\n", 2));
    assert!(cpu_listed("0-3,5\n", 5));
    assert!(!cpu_listed("0-3,5\n", 4));
    assert!(cpu_listed("0\n", 0));
    assert!(!cpu_listed("", 0));
}
