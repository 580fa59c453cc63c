//! `pilotlight-agent`: the source-server side of pilotlight.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pilotlight_agent::status::Status;
use pilotlight_agent::{AgentConfig, CommitMode, ConsistencyMode, Track, VolumeSpec};
use tokio_util::sync::CancellationToken;

/// Replicate a server's disks, block by block, to a pilotlight receiver.
#[derive(Parser)]
#[command(name = "pilotlight-agent", version, about)]
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum TrackArg {
    Scan,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CommitArg {
    Sync,
    Async,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replicate volumes to a receiver.
    Run {
        /// Receiver address (host:port).
        #[arg(long)]
        receiver: String,
        /// Identity file from `pilotlight-receiver enroll`.
        #[arg(long)]
        identity: PathBuf,
        /// Directory for the agent's durable state.
        #[arg(long)]
        state: PathBuf,
        /// A volume to replicate, NAME=PATH (image file or block device).
        #[arg(long = "volume", required = true)]
        volumes: Vec<VolumeSpec>,
        /// How changed blocks are found.
        #[arg(long, value_enum, default_value = "scan")]
        track: TrackArg,
        /// Wait for each point to be durable (sync) or pipeline points (async).
        #[arg(long, value_enum, default_value = "sync")]
        commit: CommitArg,
        /// Time between points, e.g. 30s, 5m.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Make one durable point, print its id and exit.
        #[arg(long)]
        once: bool,
        /// auto, reflink, freeze:MOUNT or none.
        #[arg(long, default_value = "auto")]
        consistency: ConsistencyMode,
        /// Parallel TLS data streams.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
        streams: u16,
        /// Block size in bytes for volumes new to the receiver (power of two, 4 KiB to 4 MiB).
        #[arg(long, default_value_t = 65536)]
        block_size: u32,
    },
    /// Show what the agent last did.
    Status {
        /// The agent's state directory.
        #[arg(long)]
        state: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pilotlight-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run {
            receiver,
            identity,
            state,
            volumes,
            track,
            commit,
            interval,
            once,
            consistency,
            streams,
            block_size,
        } => {
            if !pilotlight_protocol_valid_block_size(block_size) {
                anyhow::bail!(
                    "--block-size {block_size} is not a power of two from 4096 to 4194304"
                );
            }
            let mut cfg = AgentConfig::new(receiver, identity, state, volumes);
            cfg.track = match track {
                TrackArg::Scan => Track::Scan,
            };
            cfg.commit = match commit {
                CommitArg::Sync => CommitMode::Sync,
                CommitArg::Async => CommitMode::Async,
            };
            cfg.interval = interval;
            cfg.once = once;
            cfg.consistency = consistency;
            cfg.streams = streams;
            cfg.block_size = block_size;
            let rt = tokio::runtime::Runtime::new()?;
            let reports = rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let s = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("stopping: finishing the point in flight");
                    s.cancel();
                });
                pilotlight_agent::run(cfg, shutdown).await
            })?;
            if once {
                match reports.last() {
                    Some(r) => println!("{}", r.point),
                    None => anyhow::bail!("stopped before a point was durable"),
                }
            }
        }
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
                if let Some(e) = &st.last_error {
                    println!("last error:   {e}");
                }
                for v in &st.volumes {
                    println!("volume:       {} = {} ({} bytes)", v.name, v.path, v.size);
                }
            }
        }
    }
    Ok(())
}

fn pilotlight_protocol_valid_block_size(size: u32) -> bool {
    size.is_power_of_two() && (4096..=4 << 20).contains(&size)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
