//! Golden-file helpers shared by the format tests of every crate (wire
//! frames, `state.bin`, the saved dirty set, packs). Fixtures are annotated
//! hex: whitespace is ignored and `#` starts a comment, so a fixture can
//! name each field on its own line. Not part of the API.

use std::path::Path;

/// Lower-case hex of `bytes`, no separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of an annotated hex text; `None` on an odd number of digits or
/// a character that is not a hex digit.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .flat_map(|l| l.bytes().filter(|c| !c.is_ascii_whitespace()))
        .collect();
    let pairs = digits.chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    pairs
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// An annotated fixture: one field a line, its hex, then `# name`.
pub fn annotate(fields: &[(String, Vec<u8>)]) -> String {
    fields
        .iter()
        .map(|(name, bytes)| format!("{} # {name}\n", hex(bytes)))
        .collect()
}

/// With `PILOTLIGHT_BLESS=1` in the environment, (re)write the fixture at
/// `path` from `fields`; a format change needs a new version, not a bless.
pub fn bless(path: &Path, fields: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    if std::env::var_os("PILOTLIGHT_BLESS").is_some() {
        std::fs::write(path, annotate(fields))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotated_hex_round_trips() {
        let fields = vec![
            ("magic".to_owned(), b"PL".to_vec()),
            ("n".to_owned(), vec![0, 255]),
        ];
        let text = annotate(&fields);
        assert_eq!(text, "504c # magic\n00ff # n\n");
        assert_eq!(unhex(&text), Some(vec![0x50, 0x4c, 0, 255]));
        assert_eq!(unhex("0 f f"), None);
        assert_eq!(unhex("zz"), None);
    }
}
