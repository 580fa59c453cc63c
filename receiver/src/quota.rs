//! Bounds on what one server may put in the store: its quota (the stored
//! bytes of the blocks it has stored, plus what its open session has
//! written and not committed yet), the uncommitted pack bytes of one
//! session, and the scope of deduplication.
//!
//! Sizes in `receiver.toml` are bytes, as an integer or a string with a
//! unit: `"500 MiB"`, `"2GiB"`, `"1.5 TiB"`, `"10G"` (K, M, G, T are
//! binary, like KiB; KB, MB, GB, TB are decimal); `"unlimited"` is no
//! limit.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::session::SessionVolume;

/// A size in bytes; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Size(pub Option<u64>);

impl Size {
    /// No limit.
    pub const UNLIMITED: Self = Self(None);

    /// Parse `"10 GiB"`, `"4096"`, `"unlimited"`, ...
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
            return Ok(Self(None));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "{s:?}: unknown size unit {unit:?} (use B, KiB, MiB, GiB, TiB)"
                ))
            }
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (e.g. \"10 GiB\" or \"unlimited\")"))?;
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(Self(Some(bytes.round() as u64)))
    }

    /// The size, or `None` for unlimited.
    pub fn bytes(self) -> Option<u64> {
        self.0
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(n) => s.serialize_u64(n),
            None => s.serialize_str("unlimited"),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Self(Some(n))),
            Raw::Text(t) => Self::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Which stored blocks a server's block may be deduplicated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupScope {
    /// Only blocks the same server stored: a block another server stored
    /// is written again, with the same timing as a new block, so that no
    /// server learns anything about another's data.
    #[default]
    Server,
    /// Any stored block, whichever server stored it: less disk, but commit
    /// timing then tells a server whether any server stores a block it can
    /// guess (an oracle across servers).
    Global,
}

/// What bounds one session, resolved from the configuration when the
/// session opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The dedup scope.
    pub dedup: DedupScope,
    /// The server's quota in bytes (`None`: unlimited).
    pub quota: Option<u64>,
    /// Most pack bytes the session's uncommitted points may have written.
    pub max_uncommitted: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            dedup: DedupScope::Server,
            quota: None,
            max_uncommitted: u64::MAX,
        }
    }
}

/// The quota of `server`: its entry in `[quotas]`, else the default.
pub fn quota_of(default: Size, per_server: &BTreeMap<String, Size>, server: &str) -> Option<u64> {
    per_server.get(server).copied().unwrap_or(default).bytes()
}

/// The default cap on a session's uncommitted pack bytes: what one point
/// of its declared volumes may legitimately send (every block, `factor`
/// times over for the pre-copy rounds), stored uncompressed, plus the
/// in-flight window; never less than 64 MiB.
pub fn default_uncommitted_cap(volumes: &[SessionVolume], factor: u64, inflight: u64) -> u64 {
    let declared = volumes
        .iter()
        .map(|v| v.size)
        .fold(0u64, u64::saturating_add);
    declared
        .saturating_mul(factor.max(1))
        .saturating_add(inflight)
        .max(64 << 20)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        for (s, want) in [
            ("4096", Some(4096)),
            ("10 GiB", Some(10 << 30)),
            ("2g", Some(2 << 30)),
            ("1.5MiB", Some(3 << 19)),
            ("3 KB", Some(3000)),
            ("1TB", Some(1_000_000_000_000)),
            ("unlimited", None),
        ] {
            assert_eq!(Size::parse(s).unwrap(), Size(want), "{s}");
        }
        for bad in ["", "ten", "5 parsecs", "-1 GiB"] {
            assert!(Size::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_server_entry_overrides_the_default_quota() {
        let mut per = BTreeMap::new();
        per.insert("db2".to_string(), Size(Some(5)));
        per.insert("big".to_string(), Size::UNLIMITED);
        assert_eq!(quota_of(Size(Some(9)), &per, "web1"), Some(9));
        assert_eq!(quota_of(Size(Some(9)), &per, "db2"), Some(5));
        assert_eq!(quota_of(Size(Some(9)), &per, "big"), None);
        assert_eq!(quota_of(Size::UNLIMITED, &per, "web1"), None);
    }

    #[test]
    fn the_uncommitted_cap_covers_one_full_point_and_the_window() {
        let v = |size| SessionVolume {
            name: "v".into(),
            size,
            block_size: 4096,
        };
        assert_eq!(
            default_uncommitted_cap(&[v(1 << 30)], 4, 1 << 26),
            (4 << 30) + (1 << 26)
        );
        assert_eq!(default_uncommitted_cap(&[v(4096)], 4, 0), 64 << 20);
        assert_eq!(default_uncommitted_cap(&[v(u64::MAX)], 4, 1), u64::MAX);
    }
}
