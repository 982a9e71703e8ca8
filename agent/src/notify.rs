//! systemd readiness and watchdog notifications (`sd_notify`), written out: one
//! datagram to `$NOTIFY_SOCKET`. Without systemd (no variable) these do nothing.

use std::time::Duration;

fn send(message: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (the usual case under systemd).
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
    } else {
        socket.send_to(message.as_bytes(), &path)
    };
    sent.is_ok()
}

/// Tells systemd the agent is up (Type=notify).
pub fn ready() -> bool {
    send("READY=1")
}

/// Tells systemd the agent is stopping.
pub fn stopping() -> bool {
    send("STOPPING=1")
}

/// Pets the watchdog.
pub fn watchdog() -> bool {
    send("WATCHDOG=1")
}

/// How often to pet the watchdog: half of `$WATCHDOG_USEC`, if systemd set one
/// for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
