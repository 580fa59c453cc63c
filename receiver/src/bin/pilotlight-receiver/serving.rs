//! Serving: agents (`serve`), and points as network block devices
//! (`export`, `drill`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use pilotlight_protocol::process;
use pilotlight_receiver::{export, server, ReceiverConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::{DrillArgs, ExportArgs, ServeArgs};

/// `serve`.
pub(crate) fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let console = a.console.map(|c| (c, a.console_tls));
    serve_on(a.dir, a.listen, a.metrics, a.print_addr, console)
}

/// `export`: one volume of a point.
pub(crate) fn export(a: ExportArgs) -> anyhow::Result<()> {
    let listen = match a.socket {
        Some(path) => export::Listen::Unix(path),
        None => export::Listen::Tcp(a.listen.unwrap_or_else(|| "127.0.0.1:10809".into())),
    };
    let req = export::ExportRequest {
        server: a.server,
        volume: a.volume,
        point: a.which.sel()?,
        listen,
        writable: a.writable,
        keep_overlay: a.keep_overlay,
        tls: a.tls,
    };
    run_export(a.dir, req)
}

/// `drill`: every volume of a point.
pub(crate) fn drill(a: DrillArgs) -> anyhow::Result<()> {
    let socket_dir = a.socket_dir.unwrap_or_else(|| {
        a.dir
            .join("exports")
            .join(format!("drill-{}", std::process::id()))
    });
    let req = export::DrillRequest {
        server: a.server,
        point: a.which.sel()?,
        socket_dir,
    };
    run_drill(a.dir, req)
}

fn serve_on(
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
