//! TCP settings both sides apply to their connections.
//!
//! One of the two places this crate touches the operating system (with
//! [`crate::atomic_file`]): both binaries share them, and there is no other
//! crate they both depend on.

use std::time::Duration;

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(30);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection is dropped (about 90 s in all).
pub const KEEPALIVE_RETRIES: u32 = 6;

/// Turn on TCP keepalive on `socket` so that a vanished peer is noticed
/// between points, and Nagle off (frames are written whole).
pub fn tune(socket: socket2::SockRef<'_>) -> std::io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket.set_tcp_keepalive(&ka)
}
