//! `status`: every server's replication, the store and the object store.

use std::path::Path;

use pilotlight_receiver::status::{self, Status};
use pilotlight_receiver::ReceiverConfig;

/// `status`.
pub(crate) fn status(dir: &Path, json: bool) -> anyhow::Result<()> {
    print_status(&status::status(dir)?, json)?;
    let offsite = ReceiverConfig::load(dir)?.store.is_some();
    match pilotlight_receiver::objstore::OffsiteState::load(dir) {
        Some(st) if offsite && !json => {
            println!("{}", st.line(pilotlight_protocol::clock::now_ms()));
        }
        _ => {}
    }
    Ok(())
}

fn print_status(status: &Status, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<17} {:>7} {:>10} {:>10} {:>21} {:>11}  last point time",
        "server", "state", "points", "last point", "stored", "quota used/limit", "lag"
    );
    for r in &status.servers {
        // The points column has never been padded to its header's width
        // (it was printed from a JSON value, which ignores the width).
        println!(
            "{:<20} {:<17} {} {:>10} {:>10} {:>21} {:>11}  {}",
            r.server,
            r.state,
            r.points,
            r.last_point
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            human(r.bytes_stored),
            format!(
                "{}/{}",
                human(r.quota_used),
                r.quota.map_or_else(|| "unlimited".into(), human)
            ),
            r.lag_seconds
                .map(|l| format!("{l:.0} s"))
                .unwrap_or_else(|| "-".into()),
            r.last_point_time.as_deref().unwrap_or("-")
        );
    }
    for r in &status.servers {
        if let Some(s) = &r.sync {
            let pct = (s.done_bytes as f64 * 100.0 / s.total_bytes.max(1) as f64).min(100.0);
            println!(
                "sync in progress: {} {pct:.0}% ({} of {} at the checkpoint of {}), ETA {}",
                r.server,
                human(s.done_bytes),
                human(s.total_bytes),
                s.checkpoint_time,
                s.eta_seconds
                    .map_or_else(|| "unknown".into(), |e| format!("{e:.0} s"))
            );
        }
    }
    for r in status.servers.iter().filter(|r| r.rpo_breached) {
        println!(
            "RPO breached: {} (newest point {:.0} s old, target {:.0} s)",
            r.server,
            r.lag_seconds.unwrap_or_default(),
            r.rpo_target_seconds
        );
    }
    for r in &status.servers {
        for f in &r.staging_failures {
            let what = match &f.volume {
                Some(v) => format!("{}/{v}", r.server),
                None => r.server.clone(),
            };
            println!(
                "staging of {what} failing since {} ({} tries): {}",
                f.since, f.attempts, f.error
            );
        }
    }
    Ok(())
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
