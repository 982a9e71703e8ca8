//! The embedded broker: rumqttd 0.20 on its own thread. Devices never reach it
//! directly: it listens on a loopback port without TLS, behind the gate
//! ([`crate::server::gate`]), which terminates mutual TLS with the controller's CA and
//! confines each device to its own topics (rumqttd has no per-topic ACL). The
//! loopback listener is reachable by processes on the controller's host: that host
//! is trusted (docs/controller.md).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::server::ca::Identity;

/// Largest MQTT payload the broker accepts: a bundle chunk (4 MiB at most) plus
/// its envelope.
pub const MAX_PAYLOAD: usize = (4 << 20) + 64 * 1024;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The address cannot be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// rumqttd refused the configuration built here (a bug, or a path it cannot read).
    #[error("embedded broker configuration: {0}")]
    Config(#[from] toml::de::Error),
    /// No thread for it.
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    /// It did not accept connections in time.
    #[error("the embedded broker did not listen on {0} within 10 s (port in use?)")]
    NotListening(SocketAddr),
}

/// Starts rumqttd on `listen` (port 0 picks a free port) and waits until it
/// accepts connections. Returns the address it listens on.
pub fn start_embedded(
    listen: SocketAddr,
    tls: Option<(&Path, &Identity)>,
) -> Result<SocketAddr, BrokerError> {
    let bind = |source| BrokerError::Bind {
        addr: listen,
        source,
    };
    let addr = if listen.port() == 0 {
        let probe = TcpListener::bind(listen).map_err(bind)?;
        probe.local_addr().map_err(bind)?
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
{tls}
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {MAX_PAYLOAD}
max_inflight_count = 100
dynamic_filters = true
"#,
        tls = tls.map_or(String::new(), |(ca, server)| format!(
            "[v4.1.tls]\ncapath = \"{}\"\ncertpath = \"{}\"\nkeypath = \"{}\"",
            text(ca),
            text(&server.cert),
            text(&server.key)
        )),
    );
    let config: rumqttd::Config = toml::from_str(&config)?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(BrokerError::NotListening(addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(addr)
}

/// Mosquitto's ACL for a fleet under `prefix`: each device (user name = the
/// certificate's CN = the device id) may publish only on its own state, events,
/// telemetry, fetch and samples topics and read only its own commands and the
/// shared bundle chunks; the controller may do everything under the prefix.
pub fn mosquitto_acl(prefix: &str) -> String {
    use edgefleet_shared::protocol::DeviceTopic;
    let mut s = String::from(
        "# edgefleet: written by `edgefleet broker mosquitto`.\n\
         # Patterns apply to every client; %u is the user name, which\n\
         # use_identity_as_username makes the certificate's CN (the device id).\n",
    );
    for kind in DeviceTopic::ALL {
        let mode = if kind.device_publishes() {
            "write"
        } else {
            "read"
        };
        s.push_str(&format!(
            "pattern {mode} {prefix}/devices/%u/{}\n",
            kind.segment()
        ));
    }
    s.push_str(&format!("pattern read {prefix}/bundles/+/chunks\n\n"));
    s.push_str(&format!(
        "# The controller.\nuser {}\ntopic readwrite {prefix}/#\n",
        crate::server::ca::CONTROLLER_IDENTITY
    ));
    s
}

/// Mosquitto's per-client queue caps (`max_queued_messages`, `max_queued_bytes`).
const QUEUED_MESSAGES: usize = 100_000;
const QUEUED_BYTES: usize = 16 << 20;

/// A Mosquitto 2 configuration for mutual TLS with the controller's CA and the ACL.
pub fn mosquitto_conf(listen: SocketAddr, dir: &Path) -> String {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    format!(
        "# edgefleet: written by `edgefleet broker mosquitto`.\n\
         per_listener_settings false\n\
         listener {} {}\n\
         cafile {}\ncertfile {}\nkeyfile {}\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         acl_file {}\n\
         # Without it each TLS handshake took ~40 ms longer (../shared/STACK.md).\n\
         set_tcp_nodelay true\n\
         # A bundle chunk (up to 4 MiB) in its envelope.\n\
         message_size_limit {MAX_PAYLOAD}\n\
         # Queues per client. The controller subscribes to every device's\n\
         # upstream topics: in a connect storm thousands of retained states\n\
         # reach it at once, and the default cap (1,000 queued messages a\n\
         # client) dropped them, so that 5,000 devices never all showed online\n\
         # (docs/scale.md). 100,000 messages and 16 MiB, whichever comes first:\n\
         # room for the controller; a slow device loses chunks past 16 MiB and\n\
         # asks for them again.\n\
         max_queued_messages {QUEUED_MESSAGES}\n\
         max_queued_bytes {QUEUED_BYTES}\n",
        listen.port(),
        listen.ip(),
        p("ca.pem"),
        p("server.pem"),
        p("server.key"),
        p("acl"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acl_confines_devices_to_their_own_topics() {
        let acl = mosquitto_acl("edgefleet/v1");
        for line in [
            "pattern write edgefleet/v1/devices/%u/state",
            "pattern write edgefleet/v1/devices/%u/telemetry",
            "pattern write edgefleet/v1/devices/%u/fetch",
            "pattern read edgefleet/v1/devices/%u/cmd",
            "pattern read edgefleet/v1/bundles/+/chunks",
            "user edgefleet-controller\ntopic readwrite edgefleet/v1/#",
        ] {
            assert!(acl.contains(line), "{line} missing:\n{acl}");
        }
        assert!(!acl.contains("pattern write edgefleet/v1/devices/%u/cmd"));
        assert!(!acl.contains("pattern readwrite"));
        let conf = mosquitto_conf(
            "127.0.0.1:8883".parse().expect("addr"),
            Path::new("/etc/mq"),
        );
        assert!(conf.contains("listener 8883 127.0.0.1\n"));
        assert!(conf.contains("require_certificate true\nuse_identity_as_username true\n"));
        assert!(conf.contains("acl_file /etc/mq/acl\n"));
        // Mosquitto's default cap of 1,000 dropped the controller's messages at scale.
        assert!(conf.contains("max_queued_messages 100000\nmax_queued_bytes 16777216\n"));
    }
}
