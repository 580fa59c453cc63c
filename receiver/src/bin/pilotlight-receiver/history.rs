//! The history: list points, restore one, verify, prune, collect garbage.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use pilotlight_receiver::catalog::PointInfo;
use pilotlight_receiver::restore::RestoreRequest;
use pilotlight_receiver::retention::Policy;
use pilotlight_receiver::{admin, restore, verify, ReceiveError, ReceiverConfig};

use crate::cli::{PruneArgs, RestoreArgs, VerifyArgs};
use crate::report::human;

/// `points`: the recovery points, then the syncs in progress.
pub(crate) fn points(dir: &Path, server: Option<&str>, json: bool) -> anyhow::Result<()> {
    print_points(&admin::points(dir, server)?, json)?;
    if !json {
        print_syncs(&admin::syncs(dir, server)?)?;
    }
    Ok(())
}

/// `restore`: a point to a file or device, on this host.
pub(crate) fn restore(a: RestoreArgs) -> anyhow::Result<()> {
    let req = RestoreRequest {
        server: a.server,
        volume: a.volume,
        point: a.which.sel()?,
        to: a.to,
        force: a.force,
        progress: true,
    };
    let report = restore::restore(&a.dir, &req)?;
    println!(
        "restored point {} of {}/{} ({} bytes) to {}",
        report.point,
        req.server,
        req.volume,
        report.size,
        req.to.display()
    );
    Ok(())
}

/// `verify`: exit code 2 when a damaged block was found.
pub(crate) fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let report = verify::verify(&a.dir, a.server.as_deref(), a.point, !a.json)?;
    print_verify(&report, a.json)?;
    if !report.ok {
        if !a.json {
            eprintln!("pilotlight-receiver: verify found damaged blocks");
        }
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// `prune` with its flags (or receiver.toml's policy).
pub(crate) fn prune(a: PruneArgs) -> anyhow::Result<()> {
    let flags = [
        a.keep_last,
        a.keep_hourly,
        a.keep_daily,
        a.keep_weekly,
        a.keep_monthly,
    ];
    let policy = retention_policy(&a.dir, a.keep_within, flags)?;
    prune_by(
        &a.dir,
        a.server.as_deref(),
        &policy,
        a.dry_run,
        a.json,
        a.no_gc,
    )
}

/// `gc`.
pub(crate) fn gc(dir: &Path, json: bool) -> anyhow::Result<()> {
    let r = admin::gc(dir, gc_options(dir)?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", gc_summary(&r));
    }
    Ok(())
}

fn gc_options(dir: &std::path::Path) -> anyhow::Result<pilotlight_receiver::gc::GcOptions> {
    Ok(pilotlight_receiver::gc::GcOptions {
        min_dead_percent: ReceiverConfig::load(dir)?.gc_min_dead_percent,
    })
}

fn gc_summary(r: &pilotlight_receiver::gc::GcReport) -> String {
    let mut s = format!(
        "freed {} MiB: {} packs removed, {} rewritten ({} MiB copied), {} dead blocks dropped",
        r.bytes_freed >> 20,
        r.packs_removed,
        r.packs_rewritten,
        r.bytes_copied >> 20,
        r.blocks_dropped
    );
    if !r.packs_damaged.is_empty() {
        s.push_str(&format!(
            "; packs {:?} left alone: a live block in them is damaged (run verify)",
            r.packs_damaged
        ));
    }
    s
}

/// The policy of `prune`: the flags when any is given, else receiver.toml's.
/// receiver.toml's `min_keep` holds either way: no flag shortens the
/// minimum history.
fn retention_policy(
    dir: &std::path::Path,
    keep_within: Option<std::time::Duration>,
    flags: [Option<u32>; 5],
) -> anyhow::Result<Policy> {
    let configured = ReceiverConfig::load(dir)?.retention;
    if keep_within.is_none() && flags.iter().all(Option::is_none) {
        return Ok(configured);
    }
    let [keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly] =
        flags.map(|n| n.unwrap_or(0));
    Ok(Policy {
        min_keep: configured.min_keep,
        keep_within,
        keep_last,
        keep_hourly,
        keep_daily,
        keep_weekly,
        keep_monthly,
    })
}

/// `prune`, then `gc` unless told not to or nothing was removed. A point
/// whose removal failed is reported, the others are pruned and collected,
/// and the command then fails.
fn prune_by(
    dir: &std::path::Path,
    server: Option<&str>,
    policy: &Policy,
    dry_run: bool,
    json: bool,
    no_gc: bool,
) -> anyhow::Result<()> {
    let items = admin::prune(dir, server, policy, dry_run)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        for i in &items {
            let verb = match (i.keep, &i.error, dry_run) {
                (true, _, _) => "keep",
                (false, Some(_), _) => "not removed",
                (false, None, true) => "would remove",
                (false, None, false) => "removed",
            };
            let why = match &i.error {
                Some(e) => e.clone(),
                None => i.reasons.join(","),
            };
            println!(
                "{verb:>12} point {:>6} {:<20} {}  {why}",
                i.point, i.server, i.created
            );
        }
    }
    if !dry_run && !no_gc && items.iter().any(admin::PruneItem::removed) {
        let opts = gc_options(dir)?;
        match admin::gc(dir, opts) {
            Ok(r) => eprintln!("{}", gc_summary(&r)),
            Err(ReceiveError::Refused(why)) => eprintln!(
                "space not collected now: {why}; the running receiver collects it at its next pass"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    let failed = items.iter().filter(|i| i.error.is_some()).count();
    if failed > 0 {
        anyhow::bail!("{failed} point(s) could not be removed (see above); the others were pruned");
    }
    Ok(())
}

fn print_points(points: &[PointInfo], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&points)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>6}  {:<20} {:<25} {:<16} {:<6} volumes",
        "point", "server", "created", "consistency", "commit"
    )?;
    for p in points {
        let vols: Vec<String> = p
            .volumes
            .iter()
            .map(|v| format!("{}({} changed)", v.name, human(v.changed_bytes)))
            .collect();
        writeln!(
            out,
            "{:>6}  {:<20} {:<25} {:<16} {:<6} {}",
            p.id,
            p.server,
            p.created,
            p.consistency,
            p.commit,
            vols.join(" ")
        )?;
    }
    Ok(())
}

/// In-progress syncs, after the points: never restorable.
fn print_syncs(syncs: &[(i64, pilotlight_receiver::catalog::SyncRow)]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for (seq, s) in syncs {
        let pct = (s.done_bytes as f64 * 100.0 / s.total_bytes.max(1) as f64).min(100.0);
        writeln!(
            out,
            "{:>6}  {:<20} {:<25} in progress ({pct:.0}% at its last checkpoint, {} of {}; not restorable)",
            seq,
            s.server,
            pilotlight_protocol::clock::rfc3339(s.updated_ms),
            human(s.done_bytes),
            human(s.total_bytes),
        )?;
    }
    Ok(())
}

fn print_verify(report: &verify::VerifyReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for d in &report.damaged {
        println!(
            "DAMAGED point {} server {} volume {} block {}: {}",
            d.point, d.server, d.volume, d.block, d.error
        );
    }
    println!(
        "{}: {} points, {} stored blocks checked, {} damaged block references",
        if report.ok { "ok" } else { "DAMAGED" },
        report.points_checked,
        report.blocks_checked,
        report.damaged.len()
    );
    Ok(())
}
