//! The embedded broker: rumqttd 0.20 on its own thread, mutual TLS only. Clients
//! must present a certificate signed by the controller's CA (`verify-client-cert`).
//!
//! What it cannot enforce (docs/controller.md): rumqttd has no per-topic ACL, so a
//! device holding a valid certificate could publish on another device's topics or
//! subscribe to them. The controller checks that the device named in a topic is
//! the device named in the message, and refuses other messages; Mosquitto with the
//! generated ACL is the production setup that confines each device at the broker.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::ca::Identity;

/// Largest MQTT payload the broker accepts: a bundle chunk (4 MiB at most) plus
/// its envelope.
pub const MAX_PAYLOAD: usize = (4 << 20) + 64 * 1024;

/// Starts rumqttd on `listen` (port 0 picks a free port) and waits until it
/// accepts connections. Returns the address it listens on.
pub fn start_embedded(
    listen: SocketAddr,
    ca: &Path,
    server: &Identity,
) -> Result<SocketAddr, String> {
    let addr = if listen.port() == 0 {
        let probe = TcpListener::bind(listen).map_err(|e| format!("cannot bind {listen}: {e}"))?;
        probe.local_addr().map_err(|e| e.to_string())?
    } else {
        listen
    };
    let text = |p: &Path| {
        p.to_string_lossy()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    };
    let config = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100000
max_outgoing_packet_count = 200
max_segment_size = 8388608
max_segment_count = 4
[v4.1]
name = "devices"
listen = "{addr}"
next_connection_delay_ms = 1
[v4.1.tls]
capath = "{}"
certpath = "{}"
keypath = "{}"
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {MAX_PAYLOAD}
max_inflight_count = 100
dynamic_filters = true
"#,
        text(ca),
        text(&server.cert),
        text(&server.key),
    );
    let config: rumqttd::Config =
        toml::from_str(&config).map_err(|e| format!("embedded broker configuration: {e}"))?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| format!("cannot start the broker thread: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "the embedded broker did not listen on {addr} within 10 s (port in use?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(addr)
}
