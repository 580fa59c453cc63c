//! `pilotlight-agent`: the source-server side of pilotlight.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use pilotlight_agent::status::Status;
use pilotlight_agent::{AgentConfig, CommitMode, ConsistencyMode, Track, VolumeSpec};
use pilotlight_protocol::process;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Replicate a server's disks, block by block, to a pilotlight receiver.
#[derive(Parser)]
#[command(name = "pilotlight-agent", version, about)]
struct Cli {
    /// Log format on stderr (logs are filtered by RUST_LOG).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum TrackArg {
    Scan,
    Trace,
}

#[derive(Clone, Copy, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CommitArg {
    Sync,
    Async,
}

/// `run` flags. Every flag has a key of the same name (with `_` for `-`) in
/// the `--config` file; flags override the file. Defaults are in
/// [`AgentConfig::new`].
#[derive(clap::Args, Default)]
struct RunArgs {
    /// agent.toml with any of the keys below; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Receiver address (host:port).
    #[arg(long)]
    receiver: Option<String>,
    /// Identity file from `pilotlight-receiver enroll`.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Directory for the agent's durable state.
    #[arg(long)]
    state: Option<PathBuf>,
    /// A volume to replicate, NAME=PATH (image file or block device). Repeatable.
    #[arg(long = "volume")]
    volumes: Vec<VolumeSpec>,
    /// How changed blocks are found: scan reads every block each cycle; trace
    /// reads only blocks the kernel's block tracepoints saw written (block
    /// devices, root) [default: scan].
    #[arg(long, value_enum)]
    track: Option<TrackArg>,
    /// Trace buffer per CPU in KiB for --track trace [default: 8192].
    #[arg(long)]
    trace_buffer_kb: Option<u32>,
    /// With --track trace: send a block written only in a few 4 KiB pages
    /// as those pages, which the receiver merges with the block [default: on].
    #[arg(long, value_enum)]
    partial_blocks: Option<OnOff>,
    /// sync: wait for each point to be durable; async: pipeline points [default: sync].
    #[arg(long, value_enum)]
    commit: Option<CommitArg>,
    /// Time between the starts of points (a longer point starts the next
    /// at once), e.g. 30s, 5m [default: 60s; 1s with --track trace].
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// Live tracking: status says `stalled` once points have waited this
    /// long for their ack, e.g. 2m [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    stall_after: Option<Duration>,
    /// Make one durable point, print its id and exit.
    #[arg(long)]
    once: bool,
    /// With --once: give up after this many failed attempts (a busy
    /// receiver counts too) [default: 3].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    once_attempts: Option<u32>,
    /// auto, reflink, freeze:MOUNT or none [default: auto].
    #[arg(long)]
    consistency: Option<ConsistencyMode>,
    /// Parallel TLS data streams, 1 to 16 [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=16))]
    streams: Option<u16>,
    /// Block size for volumes new to the receiver: a power of two, 4 KiB to 4 MiB [default: 65536].
    #[arg(long)]
    block_size: Option<u32>,
    /// Cap the send rate at N megabits per second.
    #[arg(long)]
    limit_mbps: Option<u32>,
    /// With freeze:MOUNT: thaw after this long whatever happens (that
    /// point is labelled fuzzy), e.g. 500ms [default: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    freeze_limit: Option<Duration>,
    /// Live tracking: while the disk is saturated by its own workload,
    /// defer points so that writes coalesce, letting the lag grow to half
    /// of this; pre-copy rounds also stop at three quarters of it, e.g.
    /// 1m [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    max_lag: Option<Duration>,
    /// A full sync checkpoints after this many MiB sent [default: 1024].
    #[arg(long)]
    checkpoint_mib: Option<u64>,
    /// ...or after this many seconds, whichever comes first [default: 30].
    #[arg(long)]
    checkpoint_secs: Option<u64>,
    /// Serve Prometheus metrics on this address (host:port).
    #[arg(long)]
    metrics: Option<String>,
}

/// `restore` flags. `--receiver`, `--identity` and `--state` may come from
/// the `--config` file, as for `run`; its volumes are the ones refused as a
/// target while the agent runs.
#[derive(clap::Args)]
struct RestoreArgs {
    /// agent.toml: receiver, identity, state and volumes; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Receiver address (host:port).
    #[arg(long)]
    receiver: Option<String>,
    /// Identity file from `pilotlight-receiver enroll`.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// The agent's state directory (whether it runs, from its status).
    #[arg(long)]
    state: Option<PathBuf>,
    /// The volume to restore (its name).
    #[arg(long)]
    volume: String,
    /// Restore another server's volume (needs a grant on the receiver:
    /// `pilotlight-receiver grant --server THIS --restore-from NAME`).
    #[arg(long)]
    server: Option<String>,
    /// Point id.
    #[arg(long, group = "which")]
    point: Option<u64>,
    /// The latest point at or before this time (RFC 3339).
    #[arg(long, group = "which")]
    at: Option<String>,
    /// The newest point.
    #[arg(long, group = "which")]
    latest: bool,
    /// Target file or block device, written in place.
    #[arg(long)]
    to: PathBuf,
    /// Write a mounted device, or a volume the agent replicates while it runs.
    #[arg(long)]
    force: bool,
    /// Cap the receive rate at N megabits per second.
    #[arg(long)]
    limit_mbps: Option<u32>,
    /// After the sync, read back every block written and check it again.
    #[arg(long)]
    read_back: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The config file: the same keys as the flags.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    receiver: Option<String>,
    identity: Option<PathBuf>,
    state: Option<PathBuf>,
    #[serde(default)]
    volumes: BTreeMap<String, PathBuf>,
    track: Option<TrackArg>,
    trace_buffer_kb: Option<u32>,
    partial_blocks: Option<OnOff>,
    commit: Option<CommitArg>,
    interval: Option<String>,
    stall_after: Option<String>,
    once: Option<bool>,
    once_attempts: Option<u32>,
    consistency: Option<String>,
    streams: Option<u16>,
    block_size: Option<u32>,
    limit_mbps: Option<u32>,
    freeze_limit: Option<String>,
    max_lag: Option<String>,
    checkpoint_mib: Option<u64>,
    checkpoint_secs: Option<u64>,
    metrics: Option<String>,
    log_format: Option<LogFormat>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replicate volumes to a receiver.
    Run(Box<RunArgs>),
    /// Restore a volume's point from the receiver onto a file or block
    /// device, fetching only the blocks that differ (fail back by delta).
    Restore(Box<RestoreArgs>),
    /// Show what the agent last did.
    Status {
        /// The agent's state directory.
        #[arg(long)]
        state: PathBuf,
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
    /// Thaw MOUNT if the agent that started this dies while it is frozen
    /// (started by the agent itself; see pilotlight_agent::freeze).
    #[command(hide = true, name = "freeze-guard")]
    FreezeGuard {
        #[arg(long)]
        mount: PathBuf,
        #[arg(long)]
        limit_ms: u64,
    },
}

/// Histogram buckets of the agent's metrics, in seconds (a point may take
/// minutes on a slow link).
const METRIC_BUCKETS: [f64; 11] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0,
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = match &cli.cmd {
        Cmd::Run(a) => match load_file(a.config.as_ref()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("pilotlight-agent: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        Cmd::Restore(a) => match load_file(a.config.as_ref()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("pilotlight-agent: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => FileConfig::default(),
    };
    let format = cli
        .log_format
        .or(file.log_format)
        .unwrap_or(LogFormat::Text);
    process::init_logging(format == LogFormat::Json);
    match run(cli.cmd, file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pilotlight-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_file(path: Option<&PathBuf>) -> anyhow::Result<FileConfig> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {} is not valid", path.display()))
}

fn config(a: RunArgs, f: FileConfig) -> anyhow::Result<(AgentConfig, Option<String>)> {
    let need =
        |what: &str| anyhow::anyhow!("--{what} is required (or `{what}` in the config file)");
    let receiver = a.receiver.or(f.receiver).ok_or_else(|| need("receiver"))?;
    let identity = a.identity.or(f.identity).ok_or_else(|| need("identity"))?;
    let state = a.state.or(f.state).ok_or_else(|| need("state"))?;
    let mut volumes = a.volumes;
    if volumes.is_empty() {
        for (name, path) in f.volumes {
            volumes.push(
                format!("{name}={}", path.display())
                    .parse()
                    .map_err(anyhow::Error::msg)?,
            );
        }
    }
    if volumes.is_empty() {
        return Err(need("volume"));
    }
    let mut cfg = AgentConfig::new(receiver, identity, state, volumes);
    cfg.track = match a.track.or(f.track) {
        Some(TrackArg::Trace) => {
            cfg.interval = Duration::from_secs(1);
            Track::Trace
        }
        Some(TrackArg::Scan) | None => Track::Scan,
    };
    if let Some(kb) = a.trace_buffer_kb.or(f.trace_buffer_kb) {
        anyhow::ensure!(kb > 0, "--trace-buffer-kb must be at least 1");
        cfg.trace_buffer_kb = kb;
    }
    if let Some(p) = a.partial_blocks.or(f.partial_blocks) {
        cfg.partial_blocks = matches!(p, OnOff::On);
    }
    if let Some(c) = a.commit.or(f.commit) {
        cfg.commit = match c {
            CommitArg::Sync => CommitMode::Sync,
            CommitArg::Async => CommitMode::Async,
        };
    }
    if let Some(i) = a.interval {
        cfg.interval = i;
    } else if let Some(i) = f.interval {
        cfg.interval = humantime::parse_duration(&i).with_context(|| format!("interval {i:?}"))?;
    }
    if let Some(s) = a.stall_after {
        cfg.stall_after = s;
    } else if let Some(s) = f.stall_after {
        cfg.stall_after =
            humantime::parse_duration(&s).with_context(|| format!("stall_after {s:?}"))?;
    }
    anyhow::ensure!(
        !cfg.stall_after.is_zero(),
        "--stall-after must be longer than 0s"
    );
    cfg.once = a.once || f.once.unwrap_or(false);
    if let Some(n) = a.once_attempts.or(f.once_attempts) {
        anyhow::ensure!(n > 0, "once_attempts must be at least 1");
        cfg.once_attempts = n;
    }
    if let Some(c) = a.consistency {
        cfg.consistency = c;
    } else if let Some(c) = f.consistency {
        cfg.consistency = c.parse().map_err(anyhow::Error::msg)?;
    }
    if let Some(s) = a.streams.or(f.streams) {
        anyhow::ensure!((1..=16).contains(&s), "streams must be 1 to 16");
        cfg.streams = s;
    }
    if let Some(b) = a.block_size.or(f.block_size) {
        anyhow::ensure!(
            pilotlight_protocol::limits::valid_block_size(b),
            "--block-size {b} is not a power of two from 4096 to 4194304"
        );
        cfg.block_size = b;
    }
    cfg.limit_mbps = a.limit_mbps.or(f.limit_mbps).filter(|&m| m > 0);
    if let Some(l) = a.freeze_limit {
        cfg.freeze.limit = l;
    } else if let Some(l) = f.freeze_limit {
        cfg.freeze.limit =
            humantime::parse_duration(&l).with_context(|| format!("freeze_limit {l:?}"))?;
    }
    anyhow::ensure!(
        !cfg.freeze.limit.is_zero(),
        "--freeze-limit must be longer than 0s"
    );
    if let Some(l) = a.max_lag {
        cfg.max_lag = l;
    } else if let Some(l) = f.max_lag {
        cfg.max_lag = humantime::parse_duration(&l).with_context(|| format!("max_lag {l:?}"))?;
    }
    cfg.freeze.guard_program = std::env::current_exe().ok();
    if let Some(m) = a.checkpoint_mib.or(f.checkpoint_mib) {
        anyhow::ensure!(m > 0, "checkpoint-mib must be at least 1");
        cfg.checkpoints.bytes = m << 20;
    }
    if let Some(s) = a.checkpoint_secs.or(f.checkpoint_secs) {
        anyhow::ensure!(s > 0, "checkpoint-secs must be at least 1");
        cfg.checkpoints.every = std::time::Duration::from_secs(s);
    }
    Ok((cfg, a.metrics.or(f.metrics)))
}

fn run(cmd: Cmd, file: FileConfig) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run(args) => {
            let (mut cfg, metrics) = config(*args, file)?;
            let once = cfg.once;
            let bar = initial_sync_bar(&mut cfg);
            let rt = tokio::runtime::Runtime::new()?;
            let reports = rt.block_on(async move {
                if let Some(addr) = metrics {
                    let sock: std::net::SocketAddr = addr
                        .parse()
                        .with_context(|| format!("--metrics {addr:?} is not host:port"))?;
                    process::serve_metrics(sock, &METRIC_BUCKETS)
                        .with_context(|| format!("cannot serve metrics on {addr}"))?;
                }
                let shutdown = CancellationToken::new();
                let s = shutdown.clone();
                tokio::spawn(async move {
                    process::stop_signal().await;
                    tracing::info!("stopping: finishing the points in flight");
                    s.cancel();
                });
                if let Some((bar, counter)) = bar {
                    // Redraw until the first full scan is done, then get out of the way.
                    tokio::spawn(async move {
                        let total = bar.length().unwrap_or(0);
                        loop {
                            let done = counter
                                .load(std::sync::atomic::Ordering::Relaxed)
                                .min(total);
                            bar.set_position(done);
                            if done >= total {
                                bar.finish_and_clear();
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    });
                }
                Ok::<_, anyhow::Error>(pilotlight_agent::run(cfg, shutdown).await?)
            })?;
            if once {
                match reports.last() {
                    Some(r) => println!("{}", r.point),
                    None => anyhow::bail!("stopped before a point was durable"),
                }
            }
        }
        Cmd::Restore(args) => restore(*args, file)?,
        Cmd::Status { state, json } => {
            let st = Status::load(&state)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("state:        {}", st.state);
                println!("receiver:     {}", st.receiver);
                println!(
                    "last point:   {}",
                    st.last_point
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into())
                );
                println!(
                    "taken at:     {}",
                    st.last_point_time.as_deref().unwrap_or("-")
                );
                println!("pending:      {}", st.pending_points);
                if let Some(s) = &st.sync {
                    let pct = s.done_bytes as f64 * 100.0 / s.total_bytes.max(1) as f64;
                    let eta = s
                        .eta_seconds
                        .map_or_else(|| "unknown".into(), |e| format!("{e:.0} s"));
                    println!(
                        "sync:         {pct:.0}% ({} of {} bytes read), ETA {eta}",
                        s.done_bytes, s.total_bytes
                    );
                }
                if let Some(lag) = st.lag_seconds {
                    println!("lag:          {lag:.1} s (oldest write not yet durable)");
                }
                if let Some(b) = st.backlog_bytes {
                    println!("backlog:      {b} bytes");
                }
                if let Some(t) = &st.tracking {
                    println!(
                        "rescans:      {}{}",
                        t.rescans,
                        t.last_rescan_reason
                            .as_deref()
                            .map(|r| format!(" (last: {r})"))
                            .unwrap_or_default()
                    );
                    if let (Some(last), Some(max)) = (t.last_freeze_ms, t.max_freeze_ms) {
                        println!("freeze:       last {last:.1} ms, longest {max:.1} ms");
                    }
                    if let Some(r) = t.read_per_written {
                        println!(
                            "read/written: {r:.2} ({} bytes read for {} written; {} partial blocks)",
                            t.tracked_read_bytes_total,
                            t.traced_write_bytes_total,
                            t.partial_blocks_total
                        );
                    }
                }
                if let Some(e) = &st.last_error {
                    println!("last error:   {e}");
                }
                for v in &st.volumes {
                    println!("volume:       {} = {} ({} bytes)", v.name, v.path, v.size);
                }
            }
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "pilotlight-agent",
                &mut std::io::stdout(),
            );
        }
        Cmd::Man => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?,
        Cmd::FreezeGuard { mount, limit_ms } => {
            pilotlight_agent::freeze::run_guard(&mount, Duration::from_millis(limit_ms))?;
        }
    }
    Ok(())
}

/// `restore`: the configuration from flags and file, the restore, its report.
fn restore(a: RestoreArgs, f: FileConfig) -> anyhow::Result<()> {
    use pilotlight_agent::restore::{restore, RestoreConfig};
    use pilotlight_protocol::frame::PointSelector;
    let need =
        |what: &str| anyhow::anyhow!("--{what} is required (or `{what}` in the config file)");
    let receiver = a.receiver.or(f.receiver).ok_or_else(|| need("receiver"))?;
    let identity = a.identity.or(f.identity).ok_or_else(|| need("identity"))?;
    let point = match (a.point, a.at, a.latest) {
        (Some(id), None, false) => PointSelector::Id(id),
        (None, Some(t), false) => PointSelector::At(
            pilotlight_protocol::clock::parse_rfc3339(&t).with_context(|| {
                format!("--at {t:?} is not an RFC 3339 time such as 2026-11-22T03:00:00Z")
            })?,
        ),
        (None, None, true) => PointSelector::Latest,
        _ => anyhow::bail!("say which point: --point ID, --at TIME or --latest"),
    };
    let mut cfg = RestoreConfig::new(receiver, identity, a.volume, point, a.to);
    cfg.server = a.server;
    cfg.force = a.force;
    cfg.state_dir = a.state.or(f.state);
    cfg.replicated = f
        .volumes
        .into_iter()
        .map(|(name, path)| pilotlight_agent::VolumeSpec { name, path })
        .collect();
    cfg.limit_mbps = a.limit_mbps.filter(|&m| m > 0);
    cfg.read_back = a.read_back;
    let bar = restore_bar(&mut cfg);
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let drawing = bar.map(|(bar, progress)| tokio::spawn(draw_restore(bar, progress)));
        let r = restore(&cfg).await;
        if let Some(d) = drawing {
            d.abort();
        }
        r
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "restored point {} of volume {} ({} bytes) to {}: {} of {} blocks differed and were fetched ({} bytes on the wire) in {:.1} s",
            report.point,
            report.volume,
            report.size,
            cfg.to.display(),
            report.blocks_fetched,
            report.blocks_compared + report.blocks_unread,
            report.wire_bytes,
            report.seconds
        );
        if report.blocks_unread > 0 {
            println!(
                "{} of them were fetched without reading the target: it differed entirely there",
                report.blocks_unread
            );
        }
    }
    Ok(())
}

type RestoreBar = (
    indicatif::ProgressBar,
    std::sync::Arc<pilotlight_agent::restore::Progress>,
);

/// A progress bar of a restore, only when stderr is a terminal.
fn restore_bar(cfg: &mut pilotlight_agent::restore::RestoreConfig) -> Option<RestoreBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let progress = std::sync::Arc::new(pilotlight_agent::restore::Progress::default());
    cfg.progress = Some(progress.clone());
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:9} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style);
    }
    Some((bar, progress))
}

/// Redraw the restore's bar until aborted.
async fn draw_restore(
    bar: indicatif::ProgressBar,
    p: std::sync::Arc<pilotlight_agent::restore::Progress>,
) {
    use pilotlight_agent::restore::Phase;
    use std::sync::atomic::Ordering;
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    loop {
        ticks.tick().await;
        let msg = match p.phase() {
            Phase::Connect => "connect",
            Phase::Compare => "compare",
            Phase::Fetch => "fetch",
            Phase::Check => "check",
        };
        bar.set_message(msg);
        bar.set_length(p.total.load(Ordering::Relaxed));
        bar.set_position(p.done.load(Ordering::Relaxed));
    }
}

/// A progress bar of the first scan, only when stderr is a terminal.
fn initial_sync_bar(
    cfg: &mut AgentConfig,
) -> Option<(
    indicatif::ProgressBar,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
)> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let total: u64 = cfg
        .volumes
        .iter()
        .filter_map(|v| {
            pilotlight_agent::volume::probe(&v.name, &v.path)
                .ok()
                .map(|(s, _)| s)
        })
        .sum();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    cfg.progress = Some(counter.clone());
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "scanning {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style);
    }
    Some((bar, counter))
}
