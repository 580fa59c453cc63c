//! What both binaries set up the same way around their library's `run`:
//! logging to stderr, the Prometheus endpoint and the stop signals. Only with
//! the `process` feature, which the agent and receiver crates turn on for
//! their binaries; libraries never install a subscriber or a signal handler
//! themselves.

use std::net::SocketAddr;

pub use metrics_exporter_prometheus::BuildError as MetricsError;

/// Log to stderr, filtered by `RUST_LOG` (default `info`), as text or as
/// one JSON object per line.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The object store client logs each retry at info: the receiver
        // reports what it means (one sentence, or `status`) instead.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,object_store=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Serve Prometheus metrics on `addr` (histograms with `buckets`, in
/// seconds) from a task on the current runtime.
pub fn serve_metrics(addr: SocketAddr, buckets: &[f64]) -> Result<(), MetricsError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(buckets)?
        .install()?;
    tracing::info!(%addr, "serving Prometheus metrics");
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM; never where the handlers cannot
/// be installed.
pub async fn stop_signal() {
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
