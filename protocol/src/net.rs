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

/// A listening TCP socket on `addr` with a listen queue of `backlog`
/// connections (the kernel caps it at `net.core.somaxconn`), non-blocking,
/// for an async runtime to take over. The standard library's listeners
/// queue 128: hundreds of agents connecting at once overflow it.
pub fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn a_listener_takes_connections() {
        let l = listen("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        l.set_nonblocking(false).unwrap();
        assert!(l.accept().is_ok());
    }
}
