//! `pilotlight-receiver`: the staging-host side of pilotlight.

use pilotlight_protocol::process;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pilotlight_receiver::catalog::PointInfo;
use pilotlight_receiver::restore::{PointSel, RestoreRequest};
use pilotlight_receiver::retention::Policy;
use pilotlight_receiver::status::{self, Status};
use pilotlight_receiver::{admin, export, restore, server, verify, ReceiveError, ReceiverConfig};
use tokio_util::sync::CancellationToken;

/// Receive block-level replication from pilotlight agents, keep recovery
/// points, and restore them.
#[derive(Parser)]
#[command(name = "pilotlight-receiver", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a receiver directory: CA, server certificate, receiver.toml.
    Init {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Address agents connect to (host:port).
        #[arg(long)]
        listen: Option<String>,
        /// Keep history off-host in S3-compatible object storage,
        /// `s3://BUCKET/PREFIX` (endpoint and credentials from the AWS
        /// environment); writes the key that seals it to DIR/store.key.
        #[arg(long)]
        store: Option<String>,
    },
    /// Recreate a receiver directory on a new host from its object store:
    /// the newest catalog snapshot, the PKI and receiver.toml; packs come
    /// back on first read, staging images when `serve` starts.
    Rebuild {
        /// The new receiver directory (absent or empty).
        #[arg(long)]
        dir: PathBuf,
        /// The store, `s3://BUCKET/PREFIX`.
        #[arg(long)]
        store: String,
        /// The store key (the copy of DIR/store.key kept offline).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Issue an agent identity (one PEM file) for a server.
    Enroll {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Server name ([a-z0-9._-]{1,64}).
        #[arg(
            long,
            required_unless_present = "operator",
            conflicts_with = "operator"
        )]
        server: Option<String>,
        /// An operator identity instead (remote export over TLS): never
        /// accepted as a source server. Beside FILE, FILE.nbd/ holds the
        /// ca-cert.pem, client-cert.pem and client-key.pem that libnbd
        /// (`tls-certificates=`) and QEMU (`tls-creds-x509`) read.
        #[arg(long)]
        operator: Option<String>,
        /// Where to write the identity (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Refuse a server's current identity from now on.
    Revoke {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Server name.
        #[arg(long)]
        server: String,
    },
    /// Let a server restore another server's volumes over the network (fail
    /// back: `--server web1 --restore-from web1-recovery`); `--revoke`
    /// withdraws it, `--list` shows every grant. A server always restores
    /// its own volumes.
    Grant {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// The server that restores.
        #[arg(long, required_unless_present = "list", requires = "restore_from")]
        server: Option<String>,
        /// The server whose volumes it may restore.
        #[arg(long, requires = "server")]
        restore_from: Option<String>,
        /// Withdraw the grant instead.
        #[arg(long, conflicts_with = "list")]
        revoke: bool,
        /// List the grants.
        #[arg(long, conflicts_with = "server")]
        list: bool,
        /// Print JSON (with --list).
        #[arg(long, requires = "list")]
        json: bool,
    },
    /// Serve agents until SIGINT or SIGTERM.
    Serve {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on (overrides receiver.toml).
        #[arg(long)]
        listen: Option<String>,
        /// Serve Prometheus metrics on this address (overrides receiver.toml).
        #[arg(long)]
        metrics: Option<String>,
        /// Print the bound address to stdout once listening (and, with
        /// --console, the console's URL on the next line).
        #[arg(long)]
        print_addr: bool,
        /// Serve the read-only web console on this address (e.g.
        /// 127.0.0.1:8080). On loopback it is plain HTTP for loopback
        /// clients; on any other address only HTTPS with an operator identity
        /// (`enroll --operator NAME`).
        #[arg(long)]
        console: Option<String>,
        /// Serve the console over HTTPS with operator identities even on
        /// loopback.
        #[arg(long, requires = "console")]
        console_tls: bool,
    },
    /// Remove recovery points by a retention policy (flags, or receiver.toml's
    /// [retention]). The newest point of a server is always kept, and so is
    /// every point younger than [retention] min_keep (7 days by default), by
    /// the receiver's clock.
    Prune {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Only this server's points.
        #[arg(long)]
        server: Option<String>,
        /// Only say what would be removed, and why the rest stays.
        #[arg(long)]
        dry_run: bool,
        /// Keep every point within this long of the newest (e.g. 1h, 2d).
        #[arg(long, value_parser = humantime::parse_duration)]
        keep_within: Option<std::time::Duration>,
        /// Keep the newest N points.
        #[arg(long)]
        keep_last: Option<u32>,
        /// Keep the newest point of each of the last N hours.
        #[arg(long)]
        keep_hourly: Option<u32>,
        /// Keep the newest point of each of the last N days.
        #[arg(long)]
        keep_daily: Option<u32>,
        /// Keep the newest point of each of the last N weeks.
        #[arg(long)]
        keep_weekly: Option<u32>,
        /// Keep the newest point of each of the last N months.
        #[arg(long)]
        keep_monthly: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only remove the points; leave their space to the next `gc` (or to
        /// the running `serve`, which collects by itself).
        #[arg(long)]
        no_gc: bool,
    },
    /// Free the pack space that no recovery point needs (after `prune`).
    /// Refused while `serve` runs on the directory: it collects by itself
    /// every `prune_interval_secs`.
    Gc {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
    /// Show each server's replication state.
    Status {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List recovery points.
    Points {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Only this server's points.
        #[arg(long)]
        server: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a volume of a recovery point to a file or block device.
    Restore {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Server name.
        #[arg(long)]
        server: String,
        /// Volume name.
        #[arg(long)]
        volume: String,
        /// Point id.
        #[arg(long, group = "which")]
        point: Option<i64>,
        /// The latest point at or before this time (RFC 3339).
        #[arg(long, group = "which")]
        at: Option<String>,
        /// The newest point.
        #[arg(long, group = "which")]
        latest: bool,
        /// Target file or block device.
        #[arg(long)]
        to: PathBuf,
        /// Overwrite an existing target.
        #[arg(long)]
        force: bool,
    },
    /// Serve a recovery point of a volume as a block device over NBD
    /// (read straight from the store, every block checked), until SIGINT or
    /// SIGTERM. Prints the export's URI once ready. Replication goes on; the
    /// point is kept from prune while exported.
    Export {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Server name.
        #[arg(long)]
        server: String,
        /// Volume name.
        #[arg(long)]
        volume: String,
        /// Point id.
        #[arg(long, group = "which")]
        point: Option<i64>,
        /// The latest point at or before this time (RFC 3339).
        #[arg(long, group = "which")]
        at: Option<String>,
        /// The newest point.
        #[arg(long, group = "which")]
        latest: bool,
        /// Listen on this loopback address (default 127.0.0.1:10809).
        #[arg(long, conflicts_with = "socket")]
        listen: Option<String>,
        /// Listen on a unix socket at this path.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Accept writes, into a copy-on-write overlay (the stored point
        /// never changes); the overlay is discarded when the export stops.
        #[arg(long)]
        writable: bool,
        /// Keep the overlay at this path (and PATH.blocks.json) when the
        /// export stops.
        #[arg(long, requires = "writable")]
        keep_overlay: Option<PathBuf>,
        /// NBD over TLS: clients must STARTTLS and present an operator
        /// identity (`enroll --operator`). Needed for a --listen address
        /// that is not loopback.
        #[arg(long, conflicts_with = "socket")]
        tls: bool,
    },
    /// Export every volume of a point writable (copy-on-write overlays, on
    /// unix sockets), print how to attach them, and discard the overlays on
    /// SIGINT or SIGTERM: a drill never changes a stored point.
    Drill {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Server name.
        #[arg(long)]
        server: String,
        /// Point id.
        #[arg(long, group = "which")]
        point: Option<i64>,
        /// The latest point at or before this time (RFC 3339).
        #[arg(long, group = "which")]
        at: Option<String>,
        /// The newest point.
        #[arg(long, group = "which")]
        latest: bool,
        /// Folder for the sockets (VOLUME.sock); default DIR/exports/drill-PID.
        #[arg(long)]
        socket_dir: Option<PathBuf>,
    },
    /// Re-read and re-hash every block the points need.
    Verify {
        /// Receiver directory.
        #[arg(long)]
        dir: PathBuf,
        /// Only this server's points.
        #[arg(long)]
        server: Option<String>,
        /// Only this point (point ids are numbered per server: needs --server).
        #[arg(long, requires = "server")]
        point: Option<i64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    process::init_logging(matches!(cli.log_format, LogFormat::Json));
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pilotlight-receiver: {e:#}");
            ExitCode::FAILURE
        }
    }
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

fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Init { dir, listen, store } => {
            // The bucket is checked before anything is written.
            let url = store
                .as_deref()
                .map(pilotlight_receiver::objstore::setup::check)
                .transpose()?;
            admin::init(&dir, listen.as_deref())?;
            println!("initialized receiver directory {}", dir.display());
            if let Some(url) = url {
                let key = pilotlight_receiver::objstore::setup::record(&dir, &url)?;
                println!(
                    "history goes to {url}, sealed with the key {}: keep a copy of that file offline, away from this host, since without it the bucket cannot be read to rebuild this receiver",
                    key.display()
                );
            }
        }
        Cmd::Rebuild { dir, store, key } => {
            let r = pilotlight_receiver::objstore::rebuild::rebuild(&dir, &store, key.as_deref())?;
            println!(
                "rebuilt {} from {store}: {} points of {} servers (catalog snapshot of {} and {} journal records after it); packs come back on first read, staging images when serve starts",
                dir.display(),
                r.points,
                r.servers,
                pilotlight_protocol::clock::rfc3339(r.snapshot_ms),
                r.journal_records
            );
        }
        Cmd::Enroll {
            dir,
            server,
            operator,
            out,
        } => match (server, operator) {
            (Some(server), _) => {
                admin::enroll(&dir, &server, &out)?;
                println!("wrote identity of server {server} to {}", out.display());
            }
            (None, Some(name)) => {
                let certs = admin::enroll_operator(&dir, &name, &out)?;
                println!(
                    "wrote operator identity {name} to {} and {}/ (for nbds:// clients: tls-certificates={})",
                    out.display(),
                    certs.display(),
                    certs.display()
                );
            }
            (None, None) => anyhow::bail!("enroll needs --server NAME or --operator NAME"),
        },
        Cmd::Revoke { dir, server } => {
            admin::revoke(&dir, &server)?;
            println!("revoked the identity of server {server}");
        }
        Cmd::Grant {
            dir,
            server,
            restore_from,
            revoke,
            list,
            json,
        } => match (server, restore_from) {
            (Some(server), Some(from)) => grant(&dir, &server, &from, revoke)?,
            _ if list => print_grants(&admin::restore_grants(&dir)?, json)?,
            _ => anyhow::bail!("--server and --restore-from, or --list"),
        },
        Cmd::Serve {
            dir,
            listen,
            metrics,
            print_addr,
            console,
            console_tls,
        } => serve(
            dir,
            listen,
            metrics,
            print_addr,
            console.map(|c| (c, console_tls)),
        )?,
        Cmd::Prune {
            dir,
            server,
            dry_run,
            keep_within,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            json,
            no_gc,
        } => {
            let flags = [
                keep_last,
                keep_hourly,
                keep_daily,
                keep_weekly,
                keep_monthly,
            ];
            let policy = retention_policy(&dir, keep_within, flags)?;
            prune(&dir, server.as_deref(), &policy, dry_run, json, no_gc)?;
        }
        Cmd::Gc { dir, json } => {
            let r = admin::gc(&dir, gc_options(&dir)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{}", gc_summary(&r));
            }
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "pilotlight-receiver",
                &mut std::io::stdout(),
            );
        }
        Cmd::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
        }
        Cmd::Status { dir, json } => {
            print_status(&status::status(&dir)?, json)?;
            let offsite = ReceiverConfig::load(&dir)?.store.is_some();
            match pilotlight_receiver::objstore::OffsiteState::load(&dir) {
                Some(st) if offsite && !json => {
                    println!("{}", st.line(pilotlight_protocol::clock::now_ms()));
                }
                _ => {}
            }
        }
        Cmd::Points { dir, server, json } => {
            print_points(&admin::points(&dir, server.as_deref())?, json)?;
            if !json {
                print_syncs(&admin::syncs(&dir, server.as_deref())?)?;
            }
        }
        Cmd::Restore {
            dir,
            server,
            volume,
            point,
            at,
            latest,
            to,
            force,
        } => {
            let req = RestoreRequest {
                server,
                volume,
                point: point_sel(point, at, latest)?,
                to,
                force,
                progress: true,
            };
            let report = restore::restore(&dir, &req)?;
            println!(
                "restored point {} of {}/{} ({} bytes) to {}",
                report.point,
                req.server,
                req.volume,
                report.size,
                req.to.display()
            );
        }
        Cmd::Export {
            dir,
            server,
            volume,
            point,
            at,
            latest,
            listen,
            socket,
            writable,
            keep_overlay,
            tls,
        } => {
            let listen = match socket {
                Some(path) => export::Listen::Unix(path),
                None => export::Listen::Tcp(listen.unwrap_or_else(|| "127.0.0.1:10809".into())),
            };
            let req = export::ExportRequest {
                server,
                volume,
                point: point_sel(point, at, latest)?,
                listen,
                writable,
                keep_overlay,
                tls,
            };
            run_export(dir, req)?;
        }
        Cmd::Drill {
            dir,
            server,
            point,
            at,
            latest,
            socket_dir,
        } => {
            let socket_dir = socket_dir.unwrap_or_else(|| {
                dir.join("exports")
                    .join(format!("drill-{}", std::process::id()))
            });
            let req = export::DrillRequest {
                server,
                point: point_sel(point, at, latest)?,
                socket_dir,
            };
            run_drill(dir, req)?;
        }
        Cmd::Verify {
            dir,
            server,
            point,
            json,
        } => {
            let report = verify::verify(&dir, server.as_deref(), point, !json)?;
            print_verify(&report, json)?;
            if !report.ok {
                if !json {
                    eprintln!("pilotlight-receiver: verify found damaged blocks");
                }
                return Ok(ExitCode::from(2));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
fn prune(
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

/// The point `restore` was asked for: exactly one of `--point`, `--at`,
/// `--latest`.
fn point_sel(point: Option<i64>, at: Option<String>, latest: bool) -> anyhow::Result<PointSel> {
    Ok(match (point, at, latest) {
        (Some(id), None, false) => PointSel::Id(id),
        (None, Some(t), false) => PointSel::At(
            pilotlight_protocol::clock::parse_rfc3339(&t).with_context(|| {
                format!("--at {t:?} is not an RFC 3339 time such as 2026-11-22T03:00:00Z")
            })?,
        ),
        (None, None, true) => PointSel::Latest,
        _ => {
            anyhow::bail!("say which point to restore: one of --point ID, --at RFC3339 or --latest")
        }
    })
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

fn serve(
    dir: PathBuf,
    listen: Option<String>,
    metrics: Option<String>,
    print_addr: bool,
    console: Option<(String, bool)>,
) -> anyhow::Result<()> {
    let cfg = ReceiverConfig::load(&dir)?;
    let addr = listen.unwrap_or_else(|| cfg.listen.clone());
    let metrics = metrics.or_else(|| cfg.metrics.clone());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        if let Some(m) = metrics {
            let m: std::net::SocketAddr = m
                .parse()
                .with_context(|| format!("--metrics {m:?} is not host:port"))?;
            process::serve_metrics(
                m,
                &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0],
            )
            .with_context(|| format!("cannot serve metrics on {m}"))?;
        }
        let listener = bind_listener(&addr, cfg.listen_backlog)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let console = match console {
            Some((addr, tls)) => {
                Some(pilotlight_receiver::console::Console::bind(&addr, dir.clone(), tls).await?)
            }
            None => None,
        };
        if print_addr {
            println!("{}", listener.local_addr()?);
            if let Some(c) = &console {
                println!("console {}", c.url()?);
            }
            std::io::stdout().flush()?;
        }
        let shutdown = CancellationToken::new();
        if let Some(c) = console {
            tracing::info!(url = %c.url()?, "console");
            tokio::spawn(c.run(shutdown.clone()));
        }
        let s = shutdown.clone();
        tokio::spawn(async move {
            process::stop_signal().await;
            s.cancel();
        });
        server::run(listener, dir, cfg, shutdown).await?;
        Ok(())
    })
}

/// Listen on the first address `addr` resolves to, with a listen queue of
/// `backlog` (`listen_backlog`).
async fn bind_listener(addr: &str, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let Some(sa) = tokio::net::lookup_host(addr).await?.next() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "resolves to no address",
        ));
    };
    tokio::net::TcpListener::from_std(pilotlight_protocol::net::listen(sa, backlog)?)
}

/// `export`: open, print the URI, serve until SIGINT or SIGTERM.
fn run_export(dir: PathBuf, req: export::ExportRequest) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let exp = export::Export::open(&dir, &req).await?;
        tracing::info!(point = exp.point(), uri = exp.uri(), "exporting");
        println!("{}", exp.uri());
        std::io::stdout().flush()?;
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            process::stop_signal().await;
            s.cancel();
        });
        exp.serve(stop).await?;
        Ok(())
    })
}

/// `drill`: export every volume, print the URIs and how to attach them,
/// serve until SIGINT or SIGTERM.
fn run_drill(dir: PathBuf, req: export::DrillRequest) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let drill = export::Drill::open(&dir, &req).await?;
        for (volume, uri) in drill.uris() {
            println!("{volume} {uri}");
        }
        std::io::stdout().flush()?;
        eprintln!(
            "drill of point {} of {}: writes go to overlays discarded on stop (SIGINT, SIGTERM)",
            drill.point(),
            req.server
        );
        for line in drill.attach_lines() {
            eprintln!("{line}");
        }
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            process::stop_signal().await;
            s.cancel();
        });
        drill.serve(stop).await?;
        let _ = std::fs::remove_dir(&req.socket_dir);
        Ok(())
    })
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

fn human(bytes: u64) -> String {
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

/// `grant`: make or withdraw one restore grant, saying what changed.
fn grant(dir: &std::path::Path, server: &str, from: &str, revoke: bool) -> anyhow::Result<()> {
    let line = if !revoke {
        if admin::grant_restore(dir, server, from)? {
            "may now restore"
        } else {
            "could already restore"
        }
    } else if admin::revoke_restore(dir, server, from)? {
        "may no longer restore"
    } else {
        "had no grant to restore"
    };
    println!("server {server} {line} the volumes of server {from}");
    Ok(())
}

/// `grant --list`.
fn print_grants(
    grants: &[pilotlight_receiver::catalog::RestoreGrant],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(grants)?);
        return Ok(());
    }
    if grants.is_empty() {
        println!("no restore grants (each server restores only its own volumes)");
    }
    for g in grants {
        println!(
            "{} may restore the volumes of {} (granted {})",
            g.server,
            g.restore_from,
            pilotlight_protocol::clock::rfc3339(g.granted_ms)
        );
    }
    Ok(())
}
