//! One part of a catalog journal record ([`super::journal`]): the rows a
//! ship found changed, as plain bytes before they are compressed (zstd) and
//! sealed.
//!
//! ```text
//! part:   magic "PLJRNL01" (8) | from u64 | to u64 | part u32 | entry*
//! entry:  1 table | name str | nkeys u16 | key str * nkeys | ncols u16 | col str * ncols
//!         2 gone  | value * nkeys     no row has this key (a tombstone)
//!         3 row   | value * ncols     the row as it is
//!         4 seq   | name str | seq i64   a row of sqlite_sequence
//! str:    len u16 | UTF-8
//! value:  0 null | 1 integer i64 | 2 real (f64 bits) u64
//!         | 3 text: len u32 | UTF-8 | 4 blob: len u32 | bytes
//! ```
//!
//! All integers are little-endian. `gone` and `row` belong to the last
//! `table` entry before them in the same part; every part names its tables
//! again, so each part reads on its own.

use pilotlight_protocol::reader::Reader;
use rusqlite::types::Value;

/// Magic at the start of every part (version 1 of the format).
pub(crate) const RECORD_MAGIC: [u8; 8] = *b"PLJRNL01";
/// A part is cut once its plain bytes pass this.
pub(crate) const PART_TARGET: usize = 8 << 20;
/// Most plain bytes a part may open to (a bound against a hostile object).
const PART_MAX: usize = 64 << 20;

/// A catalog table as the journal sees it: its key columns and all columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableShape {
    /// The table.
    pub(crate) name: String,
    /// Its primary key's columns in key order (`rowid` for a table without one).
    pub(crate) keys: Vec<String>,
    /// Every column, in table order.
    pub(crate) cols: Vec<String>,
}

/// One entry of a part, its table given as an index into [`Part::tables`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    /// No row of table `.0` has the key `.1`.
    Gone(usize, Vec<Value>),
    /// The row `.1` of table `.0`, as it is.
    Row(usize, Vec<Value>),
    /// `sqlite_sequence`: table `.0` has handed out ids up to `.1`.
    Seq(String, i64),
}

/// A part, read back.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Part {
    /// First journal id the record covers.
    pub(crate) from: u64,
    /// Last journal id it covers.
    pub(crate) to: u64,
    /// This part's number in the record.
    pub(crate) part: u32,
    /// The tables its entries name.
    pub(crate) tables: Vec<TableShape>,
    /// The entries, in order.
    pub(crate) entries: Vec<Entry>,
}

/// Writes the parts of one record.
pub(crate) struct PartWriter {
    from: u64,
    to: u64,
    part: u32,
    buf: Vec<u8>,
    table: Option<String>,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn put_len(buf: &mut Vec<u8>, n: usize) {
    buf.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => buf.push(0),
        Value::Integer(i) => {
            buf.push(1);
            buf.extend_from_slice(&i.to_le_bytes());
        }
        Value::Real(f) => {
            buf.push(2);
            buf.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Text(t) => {
            buf.push(3);
            put_len(buf, t.len());
            buf.extend_from_slice(t.as_bytes());
        }
        Value::Blob(b) => {
            buf.push(4);
            put_len(buf, b.len());
            buf.extend_from_slice(b);
        }
    }
}

impl PartWriter {
    /// The writer of the record covering journal ids `from..=to`.
    pub(crate) fn new(from: u64, to: u64) -> Self {
        let mut w = Self {
            from,
            to,
            part: 0,
            buf: Vec::new(),
            table: None,
        };
        w.start();
        w
    }

    fn start(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(&RECORD_MAGIC);
        self.buf.extend_from_slice(&self.from.to_le_bytes());
        self.buf.extend_from_slice(&self.to.to_le_bytes());
        self.buf.extend_from_slice(&self.part.to_le_bytes());
        self.table = None;
    }

    fn table(&mut self, t: &TableShape) {
        if self.table.as_deref() == Some(t.name.as_str()) {
            return;
        }
        self.buf.push(1);
        put_str(&mut self.buf, &t.name);
        for list in [&t.keys, &t.cols] {
            let n = u16::try_from(list.len()).unwrap_or(u16::MAX);
            self.buf.extend_from_slice(&n.to_le_bytes());
            for c in list.iter().take(usize::from(n)) {
                put_str(&mut self.buf, c);
            }
        }
        self.table = Some(t.name.clone());
    }

    /// No row of `t` has the key `key`.
    pub(crate) fn gone(&mut self, t: &TableShape, key: &[Value]) {
        self.table(t);
        self.buf.push(2);
        key.iter().for_each(|v| put_value(&mut self.buf, v));
    }

    /// The row `row` of `t` (every column, in table order).
    pub(crate) fn row(&mut self, t: &TableShape, row: &[Value]) {
        self.table(t);
        self.buf.push(3);
        row.iter().for_each(|v| put_value(&mut self.buf, v));
    }

    /// A row of `sqlite_sequence`.
    pub(crate) fn seq(&mut self, name: &str, seq: i64) {
        self.buf.push(4);
        put_str(&mut self.buf, name);
        self.buf.extend_from_slice(&seq.to_le_bytes());
    }

    /// The plain bytes of the part under way (the golden test).
    #[cfg(test)]
    fn plain(&self) -> &[u8] {
        &self.buf
    }

    /// Whether the part under way should be cut.
    pub(crate) fn full(&self) -> bool {
        self.buf.len() >= PART_TARGET
    }

    /// The part under way, compressed, and its number; the next one starts.
    pub(crate) fn take(&mut self) -> Result<(u32, Vec<u8>), std::io::Error> {
        let packed = zstd::bulk::compress(&self.buf, 1)?;
        let n = self.part;
        self.part += 1;
        self.start();
        Ok((n, packed))
    }
}

/// Read a part (compressed, as [`PartWriter::take`] made it). `Err` says
/// what is wrong with it.
pub(crate) fn read_part(packed: &[u8]) -> Result<Part, &'static str> {
    let plain = zstd::bulk::decompress(packed, PART_MAX).map_err(|_| "it does not decompress")?;
    let bad = |_| "it is cut short";
    let mut r = Reader::new(&plain, "journal part");
    if r.array::<8>().map_err(bad)? != RECORD_MAGIC {
        return Err("it is not a journal record (bad magic)");
    }
    let mut p = Part {
        from: r.u64().map_err(bad)?,
        to: r.u64().map_err(bad)?,
        part: r.u32().map_err(bad)?,
        ..Part::default()
    };
    let text = |r: &mut Reader<'_>| -> Result<String, &'static str> {
        r.str_u16()
            .map_err(bad)?
            .map(str::to_owned)
            .ok_or("a name is not UTF-8")
    };
    while r.remaining() > 0 {
        match r.u8().map_err(bad)? {
            1 => {
                let name = text(&mut r)?;
                let mut lists = [Vec::new(), Vec::new()];
                for list in &mut lists {
                    for _ in 0..r.u16().map_err(bad)? {
                        list.push(text(&mut r)?);
                    }
                }
                let [keys, cols] = lists;
                p.tables.push(TableShape { name, keys, cols });
            }
            kind @ (2 | 3) => {
                let t = p
                    .tables
                    .len()
                    .checked_sub(1)
                    .ok_or("a row before its table")?;
                let shape = &p.tables[t];
                let n = if kind == 2 {
                    shape.keys.len()
                } else {
                    shape.cols.len()
                };
                let values = (0..n)
                    .map(|_| value(&mut r))
                    .collect::<Result<Vec<_>, _>>()?;
                p.entries.push(if kind == 2 {
                    Entry::Gone(t, values)
                } else {
                    Entry::Row(t, values)
                });
            }
            4 => {
                let name = text(&mut r)?;
                p.entries.push(Entry::Seq(name, r.i64().map_err(bad)?));
            }
            _ => return Err("an entry of an unknown kind"),
        }
    }
    Ok(p)
}

fn value(r: &mut Reader<'_>) -> Result<Value, &'static str> {
    let bad = |_| "it is cut short";
    Ok(match r.u8().map_err(bad)? {
        0 => Value::Null,
        1 => Value::Integer(r.i64().map_err(bad)?),
        2 => Value::Real(f64::from_bits(r.u64().map_err(bad)?)),
        3 => {
            let n = r.u32().map_err(bad)? as usize;
            let t =
                std::str::from_utf8(r.take(n).map_err(bad)?).map_err(|_| "text is not UTF-8")?;
            Value::Text(t.to_owned())
        }
        4 => {
            let n = r.u32().map_err(bad)? as usize;
            Value::Blob(r.take(n).map_err(bad)?.to_vec())
        }
        _ => return Err("a value of an unknown type"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    fn shape(name: &str) -> TableShape {
        TableShape {
            name: name.into(),
            keys: vec!["a".into(), "b".into()],
            cols: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    #[test]
    fn a_part_round_trips_every_kind_of_value_and_entry() {
        let (t, u) = (shape("t"), shape("u"));
        let mut w = PartWriter::new(5, 9);
        let row = vec![
            Value::Integer(-3),
            Value::Blob(vec![0, 1, 2]),
            Value::Text("x".into()),
        ];
        w.row(&t, &row);
        w.gone(&t, &[Value::Integer(1), Value::Null]);
        w.gone(&u, &[Value::Real(1.5), Value::Text(String::new())]);
        w.seq("points", 42);
        let (n, packed) = w.take().unwrap();
        assert_eq!(n, 0);
        let p = read_part(&packed).unwrap();
        assert_eq!((p.from, p.to, p.part), (5, 9, 0));
        assert_eq!(p.tables, vec![t.clone(), u]);
        assert_eq!(
            p.entries,
            vec![
                Entry::Row(0, row),
                Entry::Gone(0, vec![Value::Integer(1), Value::Null]),
                Entry::Gone(1, vec![Value::Real(1.5), Value::Text(String::new())]),
                Entry::Seq("points".into(), 42),
            ]
        );
        // The next part names its table again.
        w.gone(&t, &[Value::Integer(2), Value::Integer(3)]);
        let (n, packed) = w.take().unwrap();
        let p = read_part(&packed).unwrap();
        assert_eq!((n, p.part, p.tables.len()), (1, 1, 1));
    }

    #[test]
    fn the_part_format_is_pinned() {
        let t = TableShape {
            name: "t".into(),
            keys: vec!["a".into()],
            cols: vec!["a".into(), "b".into()],
        };
        let mut w = PartWriter::new(1, 2);
        w.row(&t, &[Value::Integer(7), Value::Blob(vec![0xAB])]);
        w.gone(&t, &[Value::Text("k".into())]);
        w.seq("t", 9);
        let hex: String = w.plain().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "504c4a524e4c3031", // magic PLJRNL01
                "0100000000000000", // from 1
                "0200000000000000", // to 2
                "00000000",         // part 0
                "01",
                "010074",
                "0100",
                "010061", // table t, key a
                "0200",
                "010061",
                "010062", // columns a, b
                "03",
                "010700000000000000",
                "0401000000ab", // row (7, x'ab')
                "02",
                "03010000006b", // gone: key 'k'
                "04",
                "010074",
                "0900000000000000", // seq t = 9
            )
        );
    }

    #[test]
    fn damaged_parts_are_refused_not_misread() {
        let mut w = PartWriter::new(1, 1);
        w.row(
            &shape("t"),
            &[Value::Integer(1), Value::Integer(2), Value::Integer(3)],
        );
        let (_, packed) = w.take().unwrap();
        let plain = zstd::bulk::decompress(&packed, PART_MAX).unwrap();
        for cut in [4, 20, plain.len() - 1] {
            let short = zstd::bulk::compress(&plain[..cut], 1).unwrap();
            assert!(read_part(&short).is_err(), "cut at {cut}");
        }
        let mut orphan = plain[..28].to_vec();
        orphan.extend_from_slice(&[2, 0]);
        assert!(read_part(&zstd::bulk::compress(&orphan, 1).unwrap()).is_err());
        assert!(read_part(b"not zstd").is_err());
    }
}
