//! The layouts the raw reader needs, read from the instance's own format
//! files: `events/header_page` (the page header) and each event's
//! `events/SYSTEM/NAME/format` (its type id and field offsets and sizes).
//! [`Decoder`] turns one raw record into a [`Line`], as the text parser
//! does for one line of `trace_pipe`.

use std::path::Path;

use super::parse::Line;
use super::ring::{uint_le, PageError, PageLayout, MAX_PAGE};

/// Largest format file read (they are a few hundred bytes).
const MAX_FORMAT_FILE: usize = 64 << 10;

/// A field of an event record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Field {
    pub offset: usize,
    pub size: usize,
}

impl Field {
    fn bytes<'a>(&self, rec: &'a [u8]) -> Option<&'a [u8]> {
        rec.get(self.offset..self.offset.checked_add(self.size)?)
    }

    fn uint(&self, rec: &[u8]) -> Option<u64> {
        self.bytes(rec).and_then(uint_le)
    }
}

/// One event's `format` file: its type id and fields by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Format {
    pub id: u16,
    fields: Vec<(String, Field)>,
}

impl Format {
    /// Parse the text of a `format` file.
    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut id = None;
        let mut fields = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("ID:") {
                id = v.trim().parse().ok();
            } else if line.starts_with("field:") {
                fields.push(parse_field(line)?);
            }
        }
        Some(Self { id: id?, fields })
    }

    /// The field called `name`.
    pub(super) fn field(&self, name: &str) -> Option<Field> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, f)| *f)
    }
}

/// `field:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;`
fn parse_field(line: &str) -> Option<(String, Field)> {
    let mut parts = line.split(';').map(str::trim);
    let decl = parts.next()?.strip_prefix("field:")?;
    // The name is the declaration's last word, without an array suffix.
    let name = decl.split_whitespace().last()?;
    let name = name.split('[').next()?;
    let (mut offset, mut size) = (None, None);
    for p in parts {
        if let Some(v) = p.strip_prefix("offset:") {
            offset = v.trim().parse().ok();
        } else if let Some(v) = p.strip_prefix("size:") {
            size = v.trim().parse().ok();
        }
    }
    Some((
        name.to_owned(),
        Field {
            offset: offset?,
            size: size?,
        },
    ))
}

/// The page header's layout from the text of `events/header_page`.
pub(super) fn page_layout(text: &str) -> Option<PageLayout> {
    let mut fields = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("field:") {
            fields.push(parse_field(line)?);
        }
    }
    let get = |n: &str| fields.iter().find(|(name, _)| name == n).map(|(_, f)| *f);
    let (commit, data) = (get("commit")?, get("data")?);
    let page_size = data.offset.checked_add(data.size)?;
    let fits = matches!(commit.size, 4 | 8)
        && commit.offset + commit.size <= data.offset
        && page_size <= MAX_PAGE;
    fits.then_some(PageLayout {
        commit_offset: commit.offset,
        commit_size: commit.size,
        data_offset: data.offset,
        page_size,
    })
}

/// A block completion event's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Completion {
    id: u16,
    dev: Field,
    sector: Field,
    nr_sector: Field,
    rwbs: Field,
    /// Bytes a record needs to hold all of them.
    min_len: usize,
}

/// Turns raw records of the recorded events into [`Line`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Decoder {
    common_type: Field,
    completions: Vec<Completion>,
    /// `ftrace/print`: the type id and where its text starts.
    print: (u16, usize),
}

impl Decoder {
    /// From the `format` texts of the block completion events and of
    /// `ftrace/print` (what `trace_marker` records). `None` if one lacks a
    /// field the decoder needs.
    pub(super) fn new(completions: &[&str], print: &str) -> Option<Self> {
        let print = Format::parse(print)?;
        let common_type = print.field("common_type").filter(|f| f.size == 2)?;
        let buf = print.field("buf")?;
        let mut out = Vec::new();
        for text in completions {
            let f = Format::parse(text)?;
            let c = Completion {
                id: f.id,
                dev: f.field("dev").filter(|f| f.size == 4)?,
                sector: f.field("sector").filter(|f| f.size == 8)?,
                nr_sector: f.field("nr_sector").filter(|f| matches!(f.size, 4 | 8))?,
                rwbs: f.field("rwbs").filter(|f| f.size >= 1)?,
                min_len: 0,
            };
            let min_len = [c.dev, c.sector, c.nr_sector, c.rwbs]
                .iter()
                .map(|f| f.offset + f.size)
                .max()
                .unwrap_or(0);
            if f.field("common_type") != Some(common_type) {
                return None;
            }
            out.push(Completion { min_len, ..c });
        }
        Some(Self {
            common_type,
            completions: out,
            print: (print.id, buf.offset),
        })
    }

    /// What a record says.
    pub(super) fn decode(&self, rec: &[u8]) -> Result<Line, PageError> {
        let Some(id) = self.common_type.uint(rec).map(|t| t as u16) else {
            return Err(PageError::ShortRecord {
                id: 0,
                len: rec.len(),
            });
        };
        let short = PageError::ShortRecord { id, len: rec.len() };
        if id == self.print.0 {
            let text = rec.get(self.print.1..).ok_or(short)?;
            let text = text.split(|&b| b == 0).next().unwrap_or_default();
            let text = std::str::from_utf8(text).unwrap_or_default().trim();
            return Ok(text
                .strip_prefix("pilotlight-sync-")
                .and_then(|n| n.parse().ok())
                .map_or(Line::Other, Line::Marker));
        }
        let Some(c) = self.completions.iter().find(|c| c.id == id) else {
            return Ok(Line::Other);
        };
        if rec.len() < c.min_len {
            return Err(short);
        }
        // Reads change nothing; anything else (writes, discards,
        // write-zeroes) may have.
        if c.rwbs.bytes(rec).and_then(|b| b.first()) == Some(&b'R') {
            return Ok(Line::Other);
        }
        match (c.dev.uint(rec), c.sector.uint(rec), c.nr_sector.uint(rec)) {
            (Some(dev), Some(sector), Some(nr)) => Ok(Line::Write {
                dev: dev as u32,
                sector,
                nr,
            }),
            _ => Err(short),
        }
    }
}

/// Read a format file, refusing one too big to be one. One big read:
/// `header_page` answers only the first read (a second one, at an offset,
/// returns nothing), so no small probe first.
pub(super) fn read_format(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; MAX_FORMAT_FILE];
    let mut len = 0;
    loop {
        let n = f.read(buf.get_mut(len..)?).ok()?;
        if n == 0 {
            break;
        }
        len += n;
        if len == buf.len() {
            return None;
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

#[cfg(test)]
#[path = "format_tests.rs"]
pub(super) mod tests;
