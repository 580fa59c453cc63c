//! The command line: every subcommand and its flags.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pilotlight_receiver::restore::PointSel;

/// Receive block-level replication from pilotlight agents, keep recovery
/// points, and restore them.
#[derive(Parser)]
#[command(name = "pilotlight-receiver", version, about)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
        /// With --store: immutable history. The bucket must have S3 Object
        /// Lock with a default retention of at least DAYS (checked now and
        /// whenever serve starts); garbage collection deletes no object
        /// before its retention ends.
        #[arg(long, value_name = "DAYS", requires = "store")]
        object_lock_days: Option<u32>,
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
    Grant(GrantArgs),
    /// Serve agents until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Remove recovery points by a retention policy (flags, or receiver.toml's
    /// [retention]). The newest point of a server is always kept, and so is
    /// every point younger than [retention] min_keep (7 days by default), by
    /// the receiver's clock.
    Prune(PruneArgs),
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
    Restore(RestoreArgs),
    /// Serve a recovery point of a volume as a block device over NBD
    /// (read straight from the store, every block checked), until SIGINT or
    /// SIGTERM. Prints the export's URI once ready. Replication goes on; the
    /// point is kept from prune while exported.
    Export(ExportArgs),
    /// Export every volume of a point writable (copy-on-write overlays, on
    /// unix sockets), print how to attach them, and discard the overlays on
    /// SIGINT or SIGTERM: a drill never changes a stored point.
    Drill(DrillArgs),
    /// Re-read and re-hash every block the points need.
    Verify(VerifyArgs),
}

// The arguments of `grant` (no doc comment: the variant's is its help).
#[derive(Args)]
pub(crate) struct GrantArgs {
    /// Receiver directory.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// The server that restores.
    #[arg(long, required_unless_present = "list", requires = "restore_from")]
    pub(crate) server: Option<String>,
    /// The server whose volumes it may restore.
    #[arg(long, requires = "server")]
    pub(crate) restore_from: Option<String>,
    /// Withdraw the grant instead.
    #[arg(long, conflicts_with = "list")]
    pub(crate) revoke: bool,
    /// List the grants.
    #[arg(long, conflicts_with = "server")]
    pub(crate) list: bool,
    /// Print JSON (with --list).
    #[arg(long, requires = "list")]
    pub(crate) json: bool,
}

// The arguments of `serve` (no doc comment: the variant's is its help).
#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Receiver directory.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Address to listen on (overrides receiver.toml).
    #[arg(long)]
    pub(crate) listen: Option<String>,
    /// Serve Prometheus metrics on this address (overrides receiver.toml).
    #[arg(long)]
    pub(crate) metrics: Option<String>,
    /// Print the bound address to stdout once listening (and, with
    /// --console, the console's URL on the next line).
    #[arg(long)]
    pub(crate) print_addr: bool,
    /// Serve the read-only web console on this address (e.g.
    /// 127.0.0.1:8080). On loopback it is plain HTTP for loopback
    /// clients; on any other address only HTTPS with an operator identity
    /// (`enroll --operator NAME`).
    #[arg(long)]
    pub(crate) console: Option<String>,
    /// Serve the console over HTTPS with operator identities even on
    /// loopback.
    #[arg(long, requires = "console")]
    pub(crate) console_tls: bool,
}

// The arguments of `prune` (no doc comment: the variant's is its help).
#[derive(Args)]
pub(crate) struct PruneArgs {
    /// Receiver directory.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Only this server's points.
    #[arg(long)]
    pub(crate) server: Option<String>,
    /// Only say what would be removed, and why the rest stays.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Keep every point within this long of the newest (e.g. 1h, 2d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) keep_within: Option<std::time::Duration>,
    /// Keep the newest N points.
    #[arg(long)]
    pub(crate) keep_last: Option<u32>,
    /// Keep the newest point of each of the last N hours.
    #[arg(long)]
    pub(crate) keep_hourly: Option<u32>,
    /// Keep the newest point of each of the last N days.
    #[arg(long)]
    pub(crate) keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N weeks.
    #[arg(long)]
    pub(crate) keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months.
    #[arg(long)]
    pub(crate) keep_monthly: Option<u32>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Only remove the points; leave their space to the next `gc` (or to
    /// the running `serve`, which collects by itself).
    #[arg(long)]
    pub(crate) no_gc: bool,
}

// The arguments of `restore` (no doc comment: the variant's is its help).
#[derive(Args)]
pub(crate) struct RestoreArgs {
    /// Receiver directory.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Server name.
    #[arg(long)]
    pub(crate) server: String,
    /// Volume name.
    #[arg(long)]
    pub(crate) volume: String,
    #[command(flatten)]
    pub(crate) which: PointArgs,
    /// Target file or block device.
    #[arg(long)]
    pub(crate) to: PathBuf,
    /// Overwrite an existing target.
    #[arg(long)]
    pub(crate) force: bool,
}

// The arguments of `export` (no doc comment: the variant's is its help).
#[derive(Args)]
pub(crate) struct ExportArgs {
    /// Receiver directory.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Server name.
    #[arg(long)]
    pub(crate) server: String,
    /// Volume name.
    #[arg(long)]
    pub(crate) volume: String,
    #[command(flatten)]
    pub(crate) which: PointArgs,
    /// Listen on this loopback address (default 127.0.0.1:10809).
    #[arg(long, conflicts_with = "socket")]
    pub(crate) listen: Option<String>,
    /// Listen on a unix socket at this path.
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
    /// Accept writes, into a copy-on-write overlay (the stored point
    /// never changes); the overlay is discarded when the export stops.
    #[arg(long)]
    pub(crate) writable: bool,
    /// Keep the overlay at this path (and PATH.blocks.json) when the
    /// export stops.
    #[arg(long, requires = "writable")]
    pub(crate) keep_overlay: Option<PathBuf>,
    /// NBD over TLS: clients must STARTTLS and present an operator
    /// identity (`enroll --operator`). Needed for a --listen address
    /// that is not loopback.
    #[arg(long, conflicts_with = "socket")]
    pub(crate) tls: bool,
}

// The arguments of `drill` (no doc comment: the variant's is its help).
#[derive(Args)]
pub(crate) struct DrillArgs {
    /// Receiver directory.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Server name.
    #[arg(long)]
    pub(crate) server: String,
    #[command(flatten)]
    pub(crate) which: PointArgs,
    /// Folder for the sockets (VOLUME.sock); default DIR/exports/drill-PID.
    #[arg(long)]
    pub(crate) socket_dir: Option<PathBuf>,
}

// The arguments of `verify` (no doc comment: the variant's is its help).
#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// Receiver directory.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// Only this server's points.
    #[arg(long)]
    pub(crate) server: Option<String>,
    /// Only this point (point ids are numbered per server: needs --server).
    #[arg(long, requires = "server")]
    pub(crate) point: Option<i64>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

// Which point (restore, export, drill); no doc comment, as for the
// subcommands' Args structs.
#[derive(Args)]
pub(crate) struct PointArgs {
    /// Point id.
    #[arg(long, group = "which")]
    pub(crate) point: Option<i64>,
    /// The latest point at or before this time (RFC 3339).
    #[arg(long, group = "which")]
    pub(crate) at: Option<String>,
    /// The newest point.
    #[arg(long, group = "which")]
    pub(crate) latest: bool,
}

impl PointArgs {
    /// The point asked for: exactly one of `--point`, `--at`, `--latest`.
    pub(crate) fn sel(self) -> anyhow::Result<PointSel> {
        Ok(match (self.point, self.at, self.latest) {
            (Some(id), None, false) => PointSel::Id(id),
            (None, Some(t), false) => PointSel::At(
                pilotlight_protocol::clock::parse_rfc3339(&t).with_context(|| {
                    format!("--at {t:?} is not an RFC 3339 time such as 2026-11-22T03:00:00Z")
                })?,
            ),
            (None, None, true) => PointSel::Latest,
            _ => anyhow::bail!(
                "say which point to restore: one of --point ID, --at RFC3339 or --latest"
            ),
        })
    }
}
