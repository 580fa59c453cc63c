//! The console's two pictures, as inline SVG: a server's lag over the last
//! 24 hours against its recovery point objective, and its points on a
//! timeline. Pure functions of the points' times.

use std::fmt::Write as _;

/// Width and height of a chart, in SVG units.
const W: f64 = 720.0;
const H: f64 = 160.0;
/// The lag chart's window.
pub(super) const DAY_MS: i64 = 24 * 3_600_000;

/// The lag (seconds from the newest point until then) over the 24 hours up
/// to `now_ms`, for points created at `created_ms` (oldest first), with the
/// RPO target as a dashed line. Lag rises by one second per second and falls
/// to zero at each point.
pub(super) fn lag(created_ms: &[i64], now_ms: i64, target_s: f64) -> String {
    let start = now_ms - DAY_MS;
    // (time, lag in seconds) along the sawtooth.
    let mut path: Vec<(i64, f64)> = Vec::new();
    let mut last = created_ms.iter().copied().filter(|&c| c <= start).max();
    if let Some(l) = last {
        path.push((start, (start - l) as f64 / 1000.0));
    }
    for &c in created_ms.iter().filter(|&&c| c > start && c <= now_ms) {
        if let Some(l) = last {
            path.push((c, (c - l) as f64 / 1000.0));
        }
        path.push((c, 0.0));
        last = Some(c);
    }
    if let Some(l) = last {
        path.push((now_ms, (now_ms - l) as f64 / 1000.0));
    }
    let top = path.iter().map(|p| p.1).fold(target_s, f64::max) * 1.1;
    let x = |t: i64| (t - start) as f64 / DAY_MS as f64 * W;
    let y = |s: f64| H - s / top * H;
    let mut svg = format!(
        r#"<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="lag over the last 24 hours"><rect width="{W}" height="{H}" class="bg"/>"#
    );
    let _ = write!(
        svg,
        r#"<line class="target" x1="0" x2="{W}" y1="{ty:.1}" y2="{ty:.1}"/><text x="4" y="{ly:.1}">RPO {target}</text>"#,
        ty = y(target_s),
        ly = (y(target_s) - 4.0).max(10.0),
        target = seconds(target_s),
    );
    if !path.is_empty() {
        svg.push_str(r#"<polyline class="lag" points=""#);
        for (t, s) in &path {
            let _ = write!(svg, "{:.1},{:.1} ", x(*t), y(*s));
        }
        svg.push_str(r#""/>"#);
    }
    let _ = write!(
        svg,
        r#"<text x="4" y="{b}">24 h ago</text><text x="{r}" y="{b}" text-anchor="end">now</text><text x="{r}" y="12" text-anchor="end">{top}</text></svg>"#,
        b = H - 4.0,
        r = W - 4.0,
        top = seconds(top),
    );
    svg
}

/// Points (creation time, whether crash-consistent) on a line from the
/// oldest to `now_ms`: filled for crash-consistent, hollow for fuzzy.
pub(super) fn timeline(points: &[(i64, bool)], now_ms: i64) -> String {
    let h = 40.0;
    let start = points.iter().map(|p| p.0).min().unwrap_or(now_ms);
    let span = (now_ms - start).max(1) as f64;
    let mut svg = format!(
        r#"<svg class="timeline" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" aria-label="recovery points"><line x1="6" x2="{x2}" y1="20" y2="20" class="axis"/>"#,
        x2 = W - 6.0
    );
    for &(t, consistent) in points {
        let cx = 6.0 + (t - start) as f64 / span * (W - 12.0);
        let class = if consistent { "cc" } else { "fuzzy" };
        let _ = write!(
            svg,
            r#"<circle class="{class}" cx="{cx:.1}" cy="20" r="5"/>"#
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A duration in seconds as an operator reads it: 45 s, 12 min, 3.5 h, 2.0 d.
pub(super) fn seconds(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7_200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3_600.0),
        s => format!("{:.1} d", s / 86_400.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_rises_between_points_and_falls_at_each() {
        let now = 10 * DAY_MS;
        let svg = lag(&[now - 7_200_000, now - 3_600_000], now, 300.0);
        // Two points in the window: up to 3600 s, down to 0, up to 3600 s.
        let poly = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let ys: Vec<f64> = poly
            .split_whitespace()
            .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(ys.len(), 4, "{poly}");
        assert_eq!(ys[0], H, "zero lag at the first point");
        assert!(ys[1] < H && (ys[1] - ys[3]).abs() < 0.2, "{ys:?}");
        assert_eq!(ys[2], H);
    }

    #[test]
    fn no_points_draws_no_line() {
        assert!(!lag(&[], DAY_MS * 3, 300.0).contains("polyline"));
    }

    #[test]
    fn durations_read_as_an_operator_reads_them() {
        assert_eq!(seconds(45.0), "45 s");
        assert_eq!(seconds(720.0), "12 min");
        assert_eq!(seconds(12_600.0), "3.5 h");
        assert_eq!(seconds(172_800.0), "2.0 d");
    }
}
