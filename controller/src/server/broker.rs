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
    /// The configuration built here has no server for in-process connections.
    #[error("the embedded broker has no \"devices\" server to hand connections to (a bug)")]
    NoStreamAcceptor,
}

/// Starts rumqttd on `listen` (port 0 picks a free port) and waits until it
/// accepts connections. Returns the address it listens on, and the way to
/// hand it connections in process (the gate's devices: no socket, so a device
/// costs the controller one file descriptor, its own, instead of three).
pub fn start_embedded(
    listen: SocketAddr,
    tls: Option<(&Path, &Identity)>,
) -> Result<(SocketAddr, rumqttd::StreamAcceptor), BrokerError> {
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
    let mut broker = rumqttd::Broker::new(config);
    let acceptor = broker
        .v4_stream_acceptor("devices")
        .ok_or(BrokerError::NoStreamAcceptor)?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
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
    Ok((addr, acceptor))
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

/// One node of a NATS cluster (nats-server 2.9 or later: MQTT 3.1.1 through
/// JetStream) as `edgefleet broker nats` prepares it.
#[derive(Debug, Clone)]
pub struct NatsNode {
    /// Its server name (`n1`, `n2`, ...).
    pub name: String,
    /// Where devices and the controller reach it over MQTT with mutual TLS.
    pub mqtt: SocketAddr,
    /// Its cluster (route) address.
    pub cluster: SocketAddr,
}

/// The configuration of one NATS node: MQTT with mutual TLS from the
/// controller's CA, each certificate mapped to the user of its subject
/// (`verify_and_map`: the users and their permissions are in `devices.conf`,
/// see [`nats_users`]), JetStream (MQTT keeps its sessions, retained
/// states and unacknowledged QoS 1 messages there) in `dir/<name>-js`, and
/// routes to every node of `cluster`.
pub fn nats_conf(node: &NatsNode, cluster: &[NatsNode], dir: &Path) -> String {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let routes: Vec<String> = cluster
        .iter()
        .map(|n| format!("\"nats-route://{}\"", n.cluster))
        .collect();
    format!(
        "# edgefleet: written by `edgefleet broker nats` (node {name} of {count}).\n\
         server_name: \"{name}\"\n\
         # NATS clients are not used: a random loopback port.\n\
         host: 127.0.0.1\nport: -1\n\
         # A bundle chunk (up to 4 MiB) in its envelope.\n\
         max_payload: {MAX_PAYLOAD}\n\
         jetstream {{ store_dir: \"{store}\" }}\n\
         cluster {{\n  name: \"edgefleet\"\n  listen: \"{route}\"\n  routes: [{routes}]\n}}\n\
         mqtt {{\n  listen: \"{mqtt}\"\n\
         \x20 # Mutual TLS; the certificate's subject (CN=<device id>) is the user.\n\
         \x20 tls {{ cert_file: \"{cert}\", key_file: \"{key}\", ca_file: \"{ca}\", verify_and_map: true, timeout: 5 }}\n\
         }}\n\
         # One user per enrolled device, and the controller: `edgefleet broker nats\n\
         # --users-only` rewrites it, `nats-server --signal reload` applies it.\n\
         include \"devices.conf\"\n",
        name = node.name,
        count = cluster.len(),
        store = p(&format!("{}-js", node.name)),
        route = node.cluster,
        routes = routes.join(", "),
        mqtt = node.mqtt,
        cert = p("server.pem"),
        key = p("server.key"),
        ca = p("ca.pem"),
    )
}

/// NATS's users for a fleet under `prefix`: the controller may use every
/// subject under the prefix; each device (its certificate's subject
/// `CN=<id>`) may publish only on its own state, events, telemetry, fetch
/// and samples topics and read only its own commands and the shared bundle
/// chunks, as with Mosquitto ([`mosquitto_acl`]). NATS names an MQTT topic by
/// its subject (`/` becomes `.`); QoS 1 subscriptions are delivered on
/// `$MQTT.sub.*`, which every MQTT client must be allowed to read. All are
/// MQTT-only users. A device not listed (not enrolled, or revoked) cannot
/// connect.
pub fn nats_users<'a>(prefix: &str, devices: impl IntoIterator<Item = &'a str>) -> String {
    use edgefleet_shared::protocol::DeviceTopic;
    let subject = prefix.replace('/', ".");
    let quoted = |list: &[String]| {
        list.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let user = |name: &str, publish: &[String], subscribe: &[String]| {
        format!(
            "    {{ user: \"CN={name}\", allowed_connection_types: [\"MQTT\"], permissions: {{ publish: [{}], subscribe: [{}] }} }}\n",
            quoted(publish),
            quoted(subscribe),
        )
    };
    let mut s = String::from(
        "# edgefleet: written by `edgefleet broker nats` from the controller's store.\n\
         authorization {\n  users = [\n",
    );
    let all = vec![format!("{subject}.>")];
    s.push_str(&user(
        crate::server::ca::CONTROLLER_IDENTITY,
        &all,
        &[all[0].clone(), "$MQTT.sub.>".into()],
    ));
    for id in devices {
        let own = |kind: DeviceTopic| format!("{subject}.devices.{id}.{}", kind.segment());
        let publish: Vec<String> = DeviceTopic::ALL
            .into_iter()
            .filter(|k| k.device_publishes())
            .map(own)
            .collect();
        let mut subscribe: Vec<String> = DeviceTopic::ALL
            .into_iter()
            .filter(|k| !k.device_publishes())
            .map(own)
            .collect();
        subscribe.push(format!("{subject}.bundles.*.chunks"));
        subscribe.push("$MQTT.sub.>".into());
        s.push_str(&user(id, &publish, &subscribe));
    }
    s.push_str("  ]\n}\n");
    s
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
            "pattern read edgefleet/v1/devices/%u/ack",
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

    #[test]
    fn nats_users_confine_devices_to_their_own_subjects() {
        let users = nats_users("edgefleet/v1", ["pi-1", "pi-2"]);
        let line = |id: &str| {
            users
                .lines()
                .find(|l| l.contains(&format!("user: \"CN={id}\"")))
                .unwrap_or_else(|| panic!("{id} missing:\n{users}"))
                .to_owned()
        };
        let pi1 = line("pi-1");
        for own in ["state", "events", "telemetry", "fetch", "samples"] {
            assert!(
                pi1.contains(&format!("\"edgefleet.v1.devices.pi-1.{own}\"")),
                "{pi1}"
            );
        }
        assert!(pi1.contains("subscribe: [\"edgefleet.v1.devices.pi-1.cmd\", \"edgefleet.v1.devices.pi-1.ack\", \"edgefleet.v1.bundles.*.chunks\", \"$MQTT.sub.>\"]"), "{pi1}");
        assert!(!pi1.contains("pi-2"), "{pi1}");
        let publish = pi1
            .split("publish: [")
            .nth(1)
            .and_then(|p| p.split(']').next())
            .expect("a publish list");
        assert!(
            !publish.contains(".cmd") && !publish.contains(".ack"),
            "a device may not publish on what the controller sends it: {publish}"
        );
        assert!(pi1.contains("allowed_connection_types: [\"MQTT\"]"));
        let controller = line("edgefleet-controller");
        assert!(
            controller.contains("publish: [\"edgefleet.v1.>\"]"),
            "{controller}"
        );

        let node = |i: u16| NatsNode {
            name: format!("n{i}"),
            mqtt: ([127, 0, 0, 1], 8882 + i).into(),
            cluster: ([127, 0, 0, 1], 6221 + i).into(),
        };
        let cluster = [node(1), node(2), node(3)];
        let conf = nats_conf(&cluster[1], &cluster, Path::new("/etc/nats"));
        for part in [
            "server_name: \"n2\"\n",
            "listen: \"127.0.0.1:8884\"",
            "listen: \"127.0.0.1:6223\"",
            "routes: [\"nats-route://127.0.0.1:6222\", \"nats-route://127.0.0.1:6223\", \"nats-route://127.0.0.1:6224\"]",
            "verify_and_map: true",
            "store_dir: \"/etc/nats/n2-js\"",
            "include \"devices.conf\"\n",
        ] {
            assert!(conf.contains(part), "{part} missing:\n{conf}");
        }
    }
}
