//! Wall-clock time as both sides write it: milliseconds since the Unix epoch
//! on the wire and in files, RFC 3339 for people.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, now (saturating far outside `i64`).
pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// `ms` since the Unix epoch as RFC 3339 in UTC with millisecond precision
/// (`2026-11-30T10:34:12.345Z`); a time outside the calendar's range (a peer's
/// nonsense) prints as the epoch, so the output always parses.
pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Parse an RFC 3339 time into milliseconds since the Unix epoch.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_rfc3339() {
        let ms = 1_796_033_652_345;
        let text = rfc3339(ms);
        assert_eq!(text, "2026-11-30T10:14:12.345Z");
        assert_eq!(parse_rfc3339(&text), Some(ms));
    }

    #[test]
    fn out_of_range_prints_the_epoch() {
        assert_eq!(rfc3339(i64::MAX), "1970-01-01T00:00:00Z");
    }
}
