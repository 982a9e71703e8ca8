//! The controller's API server as a client on the network meets it: a real
//! `edgefleet serve` process, raw TCP connections.

mod common;
use common::{Controller, s};

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Whether the server closed `conn` (EOF or reset) within `within`.
fn closed_by_server(conn: &mut std::net::TcpStream, within: Duration) -> bool {
    conn.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 256];
    match conn.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn clients_slow_to_send_their_headers_are_closed_and_connections_are_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("ctl");
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        "[http]\nmax_connections = 16\nheader_timeout_ms = 500\n",
    )
    .expect("config");
    let mut c = Controller::start_with(&data, &["--config", s(&config), "--mqtt", "127.0.0.1:0"]);
    let addr = c.url.trim_start_matches("http://").to_string();
    // 64 clients (four times the cap) each send half a request line and stop:
    // each is closed 500 ms after it is accepted; those past the cap wait in
    // the backlog until a slot frees.
    let started = Instant::now();
    let mut slow: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
            conn.write_all(b"GET /api/v1/dev").expect("send");
            conn
        })
        .collect();
    for (i, conn) in slow.iter_mut().enumerate() {
        let left = Duration::from_secs(15).saturating_sub(started.elapsed());
        assert!(
            closed_by_server(conn, left.max(Duration::from_millis(1))),
            "slow client {i} still open after {:?}",
            started.elapsed()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // An idle connection is closed the same way, and the API still answers.
    let mut idle = std::net::TcpStream::connect(&addr).expect("connect");
    assert!(closed_by_server(&mut idle, Duration::from_secs(5)));
    let (code, body) = c.call("GET", "/api/v1/devices", None);
    assert_eq!(code, 200, "{body}");
    c.kill();
}
