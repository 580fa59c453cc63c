//! The text lines of `trace_pipe`: completed writes, our own sync markers,
//! and the kernel's notice of lost events.

/// One parsed line of `trace_pipe`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Line {
    /// A request that may have changed data completed: `nr` sectors at
    /// `sector` of device `dev` (`major << 20 | minor`).
    Write { dev: u32, sector: u64, nr: u64 },
    /// A sync marker (`pilotlight-sync-N`, written by the tracer) came back.
    Marker(u64),
    /// The kernel dropped events (`[LOST n EVENTS]`).
    Lost,
    /// Anything else (reads, other events, noise).
    Other,
}

/// Parse one line (without its newline).
pub(super) fn parse_line(line: &str) -> Line {
    if line.contains("[LOST ") {
        return Line::Lost;
    }
    if let Some(rest) = line.split("tracing_mark_write: pilotlight-sync-").nth(1) {
        return rest.trim().parse().map_or(Line::Other, Line::Marker);
    }
    let Some(rest) = line
        .split_once("block_rq_complete: ")
        .or_else(|| line.split_once("block_bio_complete: "))
        .map(|(_, r)| r)
    else {
        return Line::Other;
    };
    let t: Vec<&str> = rest.split_whitespace().collect();
    let (Some(dev), Some(rwbs)) = (t.first(), t.get(1)) else {
        return Line::Other;
    };
    // Reads change nothing; anything else (writes, discards, write-zeroes)
    // may have.
    if rwbs.starts_with('R') {
        return Line::Other;
    }
    let Some(plus) = t.iter().position(|x| *x == "+") else {
        return Line::Other;
    };
    let parsed = (|| {
        let (ma, mi) = dev.split_once(',')?;
        let (ma, mi): (u32, u32) = (ma.parse().ok()?, mi.parse().ok()?);
        let sector: u64 = t.get(plus.checked_sub(1)?)?.parse().ok()?;
        let nr: u64 = t.get(plus + 1)?.parse().ok()?;
        Some(Line::Write {
            dev: (ma << 20) | mi,
            sector,
            nr,
        })
    })();
    parsed.unwrap_or(Line::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_lines() {
        let cases: &[(&str, Line)] = &[
            (
                "  kworker/u8:2-123  [001] d..1. 11015.1: block_rq_complete: 7,0 WS () 800 + 8 be,0,4 [0]",
                Line::Write {
                    dev: 7 << 20,
                    sector: 800,
                    nr: 8,
                },
            ),
            (
                "  dd-1 [000] ..... 1.0: block_bio_complete: 253,1 W 16 + 32 [0]",
                Line::Write {
                    dev: (253 << 20) | 1,
                    sector: 16,
                    nr: 32,
                },
            ),
            (
                "  dd-1 [000] ..... 1.0: block_rq_complete: 7,0 R () 0 + 8 be,0,4 [0]",
                Line::Other,
            ),
            (
                "  x-1 [000] ..... 1.0: block_rq_complete: 7,0 DS () 64 + 64 none,0,0 [0]",
                Line::Write {
                    dev: 7 << 20,
                    sector: 64,
                    nr: 64,
                },
            ),
            (
                "  a-9 [001] ..... 2.0: tracing_mark_write: pilotlight-sync-42",
                Line::Marker(42),
            ),
            (
                "  a-9 [001] ..... 2.0: tracing_mark_write: pilotlight-sync-x",
                Line::Other,
            ),
            ("CPU:1 [LOST 120 EVENTS]", Line::Lost),
            ("garbage + line", Line::Other),
            (
                "  dd-1 [000] ..... 1.0: block_bio_complete: 253;1 W 16 + 32 [0]",
                Line::Other,
            ),
            (
                "  dd-1 [000] ..... 1.0: block_bio_complete: 253,1 W 16 +",
                Line::Other,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(&parse_line(line), want, "{line}");
        }
    }
}
