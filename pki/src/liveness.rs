//! Liveness bounds of a TCP connection: keepalive probes and `TCP_USER_TIMEOUT`, so that a peer that vanishes
//! (the link drops, its host dies without a word) ends the connection within [`LIVENESS_BOUND`] plus the
//! keepalive idle time, instead of after TCP's quarter hour of retransmissions, or never when the connection
//! is idle. Every read then fails, as on a closed connection, with the kernel's reason (`ETIMEDOUT`).

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// How long data we sent may stay unacknowledged, or keepalive probes unanswered, before the kernel gives up
/// on the connection (`TCP_USER_TIMEOUT`).
pub const LIVENESS_BOUND: Duration = Duration::from_secs(30);
/// Idle time after which the first keepalive probe is sent.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Sets no-delay, keepalive and the user timeout on a connected stream.
pub fn bound(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(3),
    )?;
    sock.set_tcp_user_timeout(Some(LIVENESS_BOUND))
}
