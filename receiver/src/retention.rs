//! Retention: which recovery points to keep, counted as restic and Proxmox
//! Backup Server count them. Pure: the policy applies to `(id, created)` pairs,
//! where `created` is the receiver's clock at the commit (never the agent's).
//!
//! - `min_keep`: every point younger than this (by the receiver's clock now)
//!   stays, whatever the rules below say: the history no agent can shorten by
//!   making points (on by default, 7 days);
//! - `keep_within`: every point created within this long of the newest point;
//! - `keep_last N`: the newest N points;
//! - `keep_hourly/daily/weekly/monthly N`: the newest point of each of the N
//!   most recent hours/days/ISO weeks/months (UTC) that have points.
//!
//! The newest point is always kept, and so is the last one committed (the
//! greatest id) when it is not the newest by time.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A retention policy. `Default` is min-keep 7d, keep-within 1h, keep-hourly
/// 24, keep-daily 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Keep every point younger than this, by the receiver's clock, whatever
    /// the `keep_*` rules say (humantime, e.g. "7d"; "0s" turns it off).
    #[serde(with = "humantime_serde_opt")]
    pub min_keep: Option<Duration>,
    /// Keep every point within this long of the newest (humantime, e.g. "1h").
    #[serde(with = "humantime_serde_opt")]
    pub keep_within: Option<Duration>,
    /// Keep the newest N points.
    pub keep_last: u32,
    /// Keep the newest point of each of the last N hours with points.
    pub keep_hourly: u32,
    /// ... days.
    pub keep_daily: u32,
    /// ... ISO weeks.
    pub keep_weekly: u32,
    /// ... months.
    pub keep_monthly: u32,
}

/// The minimum history of the default policy: 7 days.
pub const DEFAULT_MIN_KEEP: Duration = Duration::from_secs(7 * 86_400);

impl Policy {
    /// A policy that keeps nothing but the newest point, with no minimum
    /// history; add `keep_*` or `min_keep` to it.
    pub fn none() -> Self {
        Self {
            min_keep: None,
            keep_within: None,
            keep_last: 0,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_keep: Some(DEFAULT_MIN_KEEP),
            keep_within: Some(Duration::from_secs(3600)),
            keep_last: 0,
            keep_hourly: 24,
            keep_daily: 7,
            keep_weekly: 0,
            keep_monthly: 0,
        }
    }
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            // Written out, since a missing key means the default.
            None => s.serialize_str("0s"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        let d = s
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()?;
        // "0s" turns the rule off.
        Ok(d.filter(|d| !d.is_zero()))
    }
}

/// The verdict on one point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Point id.
    pub id: i64,
    /// Whether it stays.
    pub keep: bool,
    /// Why it stays (empty when it goes).
    pub reasons: Vec<&'static str>,
}

fn bucket(ms: i64, kind: &str) -> i64 {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    match kind {
        "hourly" => ms.div_euclid(3_600_000),
        "daily" => ms.div_euclid(86_400_000),
        "weekly" => {
            let (y, w, _) = t.to_iso_week_date();
            i64::from(y) * 100 + i64::from(w)
        }
        _ => i64::from(t.year()) * 100 + i64::from(u8::from(t.month())),
    }
}

/// Apply `policy` to points `(id, created_ms)` of one server at `now_ms`
/// (the receiver's clock).
pub fn select(points: &[(i64, i64)], policy: &Policy, now_ms: i64) -> Vec<Verdict> {
    let mut order: Vec<(i64, i64)> = points.to_vec();
    // Newest first: by time, then by id.
    order.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); order.len()];
    keep_newest(&order, &mut reasons);
    if let Some(min) = policy.min_keep {
        keep_since(&order, &mut reasons, now_ms, min, "min-keep");
    }
    if let (Some(w), Some(newest)) = (policy.keep_within, order.first()) {
        keep_since(&order, &mut reasons, newest.1, w, "within");
    }
    for r in reasons.iter_mut().take(policy.keep_last as usize) {
        r.push("last");
    }
    for (kind, n) in [
        ("hourly", policy.keep_hourly),
        ("daily", policy.keep_daily),
        ("weekly", policy.keep_weekly),
        ("monthly", policy.keep_monthly),
    ] {
        let mut seen = BTreeSet::new();
        for (i, p) in order.iter().enumerate() {
            if seen.len() >= n as usize {
                break;
            }
            if seen.insert(bucket(p.1, kind)) {
                if let Some(r) = reasons.get_mut(i) {
                    r.push(kind);
                }
            }
        }
    }
    let mut out: Vec<Verdict> = order
        .iter()
        .zip(reasons)
        .map(|(p, r)| Verdict {
            id: p.0,
            keep: !r.is_empty(),
            reasons: r,
        })
        .collect();
    out.sort_by_key(|v| v.id);
    out
}

/// The newest point by time, and the last committed (greatest id): the
/// catalog folds a removed point into the next one, so the last has none to
/// fold into.
fn keep_newest(order: &[(i64, i64)], reasons: &mut [Vec<&'static str>]) {
    if let Some(r) = reasons.first_mut() {
        r.push("newest");
    }
    let last = order.iter().enumerate().max_by_key(|(_, p)| p.0);
    if let Some((i, _)) = last.filter(|(i, _)| *i != 0) {
        if let Some(r) = reasons.get_mut(i) {
            r.push("newest");
        }
    }
}

/// Mark every point created at or after `from - span` with `label`.
fn keep_since(
    order: &[(i64, i64)],
    reasons: &mut [Vec<&'static str>],
    from: i64,
    span: Duration,
    label: &'static str,
) {
    let since = from.saturating_sub(i64::try_from(span.as_millis()).unwrap_or(i64::MAX));
    for (p, r) in order.iter().zip(reasons.iter_mut()) {
        if p.1 >= since {
            r.push(label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    /// Long after every point of [`thirty`]: no point is young.
    const LATER: i64 = 30_000 * 86_400_000;

    fn kept(points: &[(i64, i64)], p: &Policy) -> Vec<i64> {
        kept_at(points, p, LATER)
    }

    fn kept_at(points: &[(i64, i64)], p: &Policy, now_ms: i64) -> Vec<i64> {
        select(points, p, now_ms)
            .into_iter()
            .filter(|v| v.keep)
            .map(|v| v.id)
            .collect()
    }

    /// 30 points, one every 20 minutes, starting at a day boundary.
    fn thirty() -> Vec<(i64, i64)> {
        let day = 20_000 * 86_400_000;
        (1..=30).map(|i| (i, day + (i - 1) * H / 3)).collect()
    }

    #[test]
    fn newest_is_always_kept() {
        assert_eq!(kept(&thirty(), &Policy::none()), vec![30]);
        assert_eq!(kept(&[], &Policy::none()), Vec::<i64>::new());
    }

    /// What receiver.toml says is what prune uses: "no keep-within" survives
    /// a round trip instead of turning back into the 1h default.
    #[test]
    fn config_round_trip() {
        for p in [
            Policy::none(),
            Policy::default(),
            Policy {
                keep_last: 2,
                ..Policy::none()
            },
        ] {
            let cfg = crate::ReceiverConfig {
                retention: p.clone(),
                ..crate::ReceiverConfig::default()
            };
            let text = toml::to_string(&cfg).unwrap();
            let back: crate::ReceiverConfig = toml::from_str(&text).unwrap();
            assert_eq!(back.retention, p, "{text}");
        }
        let off: crate::ReceiverConfig =
            toml::from_str("[retention]\nkeep_within = \"0s\"").unwrap();
        assert_eq!(off.retention.keep_within, None);
        let missing: crate::ReceiverConfig = toml::from_str("").unwrap();
        assert_eq!(missing.retention, Policy::default());
        assert_eq!(missing.retention.min_keep, Some(DEFAULT_MIN_KEEP));
        let off: crate::ReceiverConfig = toml::from_str("[retention]\nmin_keep = \"0s\"").unwrap();
        assert_eq!(off.retention.min_keep, None);
        let two: crate::ReceiverConfig = toml::from_str("[retention]\nmin_keep = \"2d\"").unwrap();
        assert_eq!(
            two.retention.min_keep,
            Some(Duration::from_secs(2 * 86_400))
        );
    }

    /// (now, min_keep, points kept): thirty points 20 minutes apart, the
    /// newest at 9h40 of the day; the policy alone keeps only the newest.
    #[test]
    fn min_keep_keeps_every_young_point_whatever_the_policy() {
        let day = 20_000 * 86_400_000;
        let newest = day + 29 * H / 3;
        let cases: [(i64, Option<u64>, Vec<i64>); 5] = [
            // Off: the policy decides.
            (newest, None, vec![30]),
            // An hour at the newest point: the last hour (exactly 60 min too).
            (newest, Some(3600), vec![27, 28, 29, 30]),
            // A day later, one day: the newest alone is younger.
            (newest + 24 * H, Some(86_400), vec![30]),
            // A week later, the default 7 days: all of them.
            (newest + 24 * 6 * H, Some(7 * 86_400), (1..=30).collect()),
            // Points stamped in the future of the receiver's clock are young.
            (day - 48 * H, Some(3600), (1..=30).collect()),
        ];
        for (now, secs, want) in cases {
            let p = Policy {
                min_keep: secs.map(Duration::from_secs),
                ..Policy::none()
            };
            assert_eq!(
                kept_at(&thirty(), &p, now),
                want,
                "now {now} min_keep {secs:?}"
            );
        }
        let v = select(&thirty(), &Policy::default(), newest);
        assert!(v.iter().all(|v| v.keep), "{v:?}");
        assert_eq!(v[0].reasons, vec!["min-keep"]);
    }

    /// The point committed last cannot be folded into a next one, so it stays
    /// even when an older clock stamped it before the others.
    #[test]
    fn the_last_committed_point_is_kept_when_it_is_not_the_newest() {
        let mut pts = thirty();
        pts.push((31, 86_400_000)); // 1970-01-02
        assert_eq!(kept(&pts, &Policy::none()), vec![30, 31]);
        let v = select(&pts, &Policy::none(), LATER);
        assert_eq!(v.last().unwrap().reasons, vec!["newest"]);
    }

    #[test]
    fn keep_last() {
        assert_eq!(
            kept(
                &thirty(),
                &Policy {
                    keep_last: 3,
                    ..Policy::none()
                }
            ),
            vec![28, 29, 30]
        );
    }

    #[test]
    fn keep_within_counts_from_the_newest() {
        let p = Policy {
            keep_within: Some(Duration::from_secs(3600)),
            ..Policy::none()
        };
        // Newest at 29*20 min; within 1 h: 27*20, 28*20, 29*20 min and 26*20 = exactly 1 h before.
        assert_eq!(kept(&thirty(), &p), vec![27, 28, 29, 30]);
    }

    #[test]
    fn keep_hourly_takes_the_newest_of_each_hour() {
        // Hours 0..9 hold points 1-3, 4-6, ..., 28-30.
        let p = Policy {
            keep_hourly: 4,
            ..Policy::none()
        };
        assert_eq!(kept(&thirty(), &p), vec![21, 24, 27, 30]);
    }

    #[test]
    fn policies_combine() {
        let p = Policy {
            keep_last: 2,
            keep_hourly: 3,
            keep_daily: 1,
            ..Policy::none()
        };
        assert_eq!(kept(&thirty(), &p), vec![24, 27, 29, 30]);
        let v = select(&thirty(), &p, LATER);
        assert_eq!(
            v.iter().find(|v| v.id == 30).unwrap().reasons,
            vec!["newest", "last", "hourly", "daily"]
        );
    }

    #[test]
    fn daily_weekly_monthly() {
        let day = 86_400_000;
        let base = 20_000 * day; // 2024-10-04
        let pts: Vec<(i64, i64)> = (0..60).map(|i| (i + 1, base + i * day)).collect();
        assert_eq!(
            kept(
                &pts,
                &Policy {
                    keep_daily: 3,
                    ..Policy::none()
                }
            ),
            vec![58, 59, 60]
        );
        assert_eq!(
            kept(
                &pts,
                &Policy {
                    keep_monthly: 12,
                    ..Policy::none()
                }
            )
            .len(),
            3
        );
        assert_eq!(
            kept(
                &pts,
                &Policy {
                    keep_weekly: 2,
                    ..Policy::none()
                }
            )
            .len(),
            2
        );
    }
}
