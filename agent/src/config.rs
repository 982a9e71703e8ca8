//! The agent's configuration (`/etc/edgefleet/agent.toml`): a typed struct with a
//! `Default`, and one validating function whose errors name the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgefleet_shared::DeviceId;
use edgefleet_shared::protocol::Topics;
use serde::{Deserialize, Serialize};

/// Default location of the config file.
pub const DEFAULT_PATH: &str = "/etc/edgefleet/agent.toml";
/// Largest config file read.
const MAX_CONFIG_LEN: u64 = 64 * 1024;

/// Connection to the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `mqtts://host:port` (mutual TLS) or `mqtt://host:port` (development only);
    /// several separated by commas are the nodes of a broker cluster, tried in turn.
    pub url: String,
    /// CA certificate that signed the broker's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// This device's certificate (PEM).
    pub cert: Option<PathBuf>,
    /// This device's private key (PEM, mode 0600).
    pub key: Option<PathBuf>,
    /// Topic prefix.
    pub topic_prefix: String,
    /// The controller's command key (SPKI PEM, from enrollment): only commands
    /// it signed are carried out (docs/protocol.md, "Commands are signed").
    pub controller_key: PathBuf,
    /// A command issued longer ago than this, by this device's clock, is
    /// refused as stale (60..=604800).
    pub command_max_age_s: u32,
    /// QoS of the agent's subscriptions: 1, or 0 on a NATS cluster (which
    /// makes every QoS 1 subscription a replicated JetStream consumer; the
    /// protocol's own acknowledgements and resends carry delivery, see
    /// docs/scale.md). Publishes are QoS 1 either way. Written out only when
    /// 0, so that the files of other fleets still suit agents that predate it.
    #[serde(skip_serializing_if = "is_qos_1")]
    pub subscribe_qos: u8,
}

fn is_qos_1(level: &u8) -> bool {
    *level == 1
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: "mqtts://localhost:8883".into(),
            ca: Some("/etc/edgefleet/ca.pem".into()),
            cert: Some("/etc/edgefleet/device.pem".into()),
            key: Some("/etc/edgefleet/device.key".into()),
            topic_prefix: edgefleet_shared::protocol::DEFAULT_PREFIX.into(),
            controller_key: "/etc/edgefleet/controller.pub".into(),
            command_max_age_s: 3600,
            subscribe_qos: 1,
        }
    }
}

impl BrokerConfig {
    /// The field at fault and why, if any.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let tls = crate::link::Endpoint::parse_list(&self.url).map_err(|e| {
            (
                "broker.url",
                format!("{e} (mqtts://host:port, or several separated by commas)"),
            )
        })?[0]
            .tls;
        if tls {
            for (field, value) in [
                ("broker.ca", &self.ca),
                ("broker.cert", &self.cert),
                ("broker.key", &self.key),
            ] {
                if value.is_none() {
                    return Err((field, "is required with mqtts (mutual TLS)".into()));
                }
            }
        }
        Topics::new(&self.topic_prefix).map_err(|e| ("broker.topic_prefix", e.reason.into()))?;
        if self.controller_key.as_os_str().is_empty() {
            return Err((
                "broker.controller_key",
                "is required: commands are carried out only when the controller's key signed them"
                    .into(),
            ));
        }
        if !(60..=604_800).contains(&self.command_max_age_s) {
            return Err((
                "broker.command_max_age_s",
                "must be between 60 and 604800".into(),
            ));
        }
        crate::link::subscribe_qos(self.subscribe_qos)
            .map_err(|reason| ("broker.subscribe_qos", reason.into()))?;
        Ok(())
    }
}

/// Telemetry settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Seconds between reports (1..=86400).
    pub interval_s: u32,
    /// Bytes of telemetry kept on disk while offline.
    pub spool_max_bytes: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval_s: 60,
            spool_max_bytes: 8 << 20,
        }
    }
}

/// Size limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest bundle accepted, bytes.
    pub max_bundle_bytes: u64,
    /// Free disk that an install must leave, bytes.
    pub disk_reserve_bytes: u64,
    /// Memory every channel's loaded models may declare together
    /// (`constraints.memory_bytes` of each active and shadow bundle), bytes; a
    /// bundle that would pass it is refused before download. 0: no budget but
    /// the memory available (each bundle must fit MemAvailable, as always).
    pub models_memory_bytes: u64,
    /// Local API: memory its requests in flight may hold, bytes. A request is
    /// charged its body's size times what decoding, running and answering it
    /// take (`api::JSON_COST`, `api::BINARY_COST`); one that would pass the
    /// budget waits up to a second, then gets 503.
    pub api_memory_bytes: u64,
    /// Local API: inference requests handled at once (same rule).
    pub api_requests_in_flight: u32,
    /// Local API: connections served at once (further ones wait unaccepted).
    pub api_connections: u32,
    /// Local API: longest wait for a request's headers, also the longest a
    /// kept-alive connection stays idle, ms.
    pub api_header_timeout_ms: u64,
    /// Local API: longest wait for a request's whole body once its headers
    /// are in, ms (answered 408 past it, the body's budget given back).
    pub api_body_timeout_ms: u64,
}

impl LimitsConfig {
    /// The local API's connection bounds.
    pub fn api_connection_limits(&self) -> crate::http::ConnectionLimits {
        crate::http::ConnectionLimits {
            max_connections: self.api_connections as usize,
            header_timeout: std::time::Duration::from_millis(self.api_header_timeout_ms),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bundle_bytes: 2 << 30,
            disk_reserve_bytes: 256 << 20,
            models_memory_bytes: 0,
            api_memory_bytes: 64 << 20,
            api_requests_in_flight: 16,
            api_connections: 128,
            api_header_timeout_ms: 10_000,
            api_body_timeout_ms: 30_000,
        }
    }
}

/// Drift tracking over served requests (see `docs/drift.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftConfig {
    /// Track drift when the active bundle carries reference statistics.
    pub enabled: bool,
    /// A window closes after this many rows (100..=1_000_000).
    pub window_rows: u64,
    /// ... or after this many seconds, if it has `min_rows` (60..=604800).
    pub window_max_s: u64,
    /// Fewest rows before a window is judged (PSI over 30 bins is biased
    /// upward by about 29 / rows; 200 keeps that under 0.15).
    pub min_rows: u64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            window_rows: 1000,
            window_max_s: 3600,
            min_rows: 200,
        }
    }
}

/// Sample capture (see `docs/drift.md`, "Sample capture"). Off by default:
/// captured requests are user data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplesConfig {
    /// `off`, `drift` (while the drift window is drifted), `low_confidence`
    /// (top class probability under `min_confidence`) or `always`.
    pub capture: crate::samples::Capture,
    /// For `low_confidence`.
    pub min_confidence: f64,
    /// Requests kept (a uniform sample of those captured), 1..=10000.
    pub capacity: usize,
    /// Largest request kept, bytes of tensor data (64..=1048576); larger ones
    /// are counted and dropped. Memory is at most capacity x this.
    pub max_sample_bytes: usize,
}

impl Default for SamplesConfig {
    fn default() -> Self {
        SamplesConfig {
            capture: crate::samples::Capture::Off,
            min_confidence: 0.6,
            capacity: 200,
            max_sample_bytes: 4096,
        }
    }
}

/// The agent's own binary and its updates (docs/agent-update.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelfUpdateConfig {
    /// The directory of the two binary slots, `agent.a` and `agent.b`.
    pub binary_dir: PathBuf,
    /// The path the supervisor starts (a link to one slot once the agent has
    /// updated itself once).
    pub link: PathBuf,
    /// Seconds a new agent has to confirm (10..=600) before the old one comes back.
    pub confirm_within_s: u32,
    /// Update even when nothing is known to restart the agent (not under
    /// systemd, `EDGEFLEET_SUPERVISED` unset): a new binary that crashes then
    /// leaves no agent running until someone starts one.
    pub unsupervised: bool,
}

impl Default for SelfUpdateConfig {
    fn default() -> Self {
        SelfUpdateConfig {
            binary_dir: "/usr/lib/edgefleet".into(),
            link: "/usr/local/bin/edgefleet-agent".into(),
            confirm_within_s: 60,
            unsupervised: false,
        }
    }
}

impl SelfUpdateConfig {
    /// Its rules: the field at fault and the rule it breaks.
    fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if !(10..=600).contains(&self.confirm_within_s) {
            return Err(("self_update.confirm_within_s", "must be between 10 and 600"));
        }
        for (field, p) in [
            ("self_update.binary_dir", &self.binary_dir),
            ("self_update.link", &self.link),
        ] {
            if !p.is_absolute() {
                return Err((field, "must be an absolute path"));
            }
        }
        Ok(())
    }

    /// The slots and the link.
    pub fn layout(&self) -> crate::selfupdate::handover::Layout {
        crate::selfupdate::handover::Layout {
            binary_dir: self.binary_dir.clone(),
            link: self.link.clone(),
        }
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This device's id (the CN of its certificate).
    pub device_id: String,
    /// Slots and state.
    pub data_dir: PathBuf,
    /// The pinned trust root.
    pub trust_root: PathBuf,
    /// Local inference API address (loopback only).
    pub api_listen: SocketAddr,
    /// The same API also on a Unix socket at this path (none by default).
    pub api_socket: Option<PathBuf>,
    /// Broker connection.
    pub broker: BrokerConfig,
    /// Telemetry.
    pub telemetry: TelemetryConfig,
    /// Limits.
    pub limits: LimitsConfig,
    /// Drift tracking.
    pub drift: DriftConfig,
    /// Sample capture.
    pub samples: SamplesConfig,
    /// The agent's own binary and its updates.
    pub self_update: SelfUpdateConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            device_id: "device-01".into(),
            data_dir: "/var/lib/edgefleet".into(),
            trust_root: "/etc/edgefleet/trust-root.cbor".into(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            api_socket: None,
            broker: BrokerConfig::default(),
            telemetry: TelemetryConfig::default(),
            limits: LimitsConfig::default(),
            drift: DriftConfig::default(),
            samples: SamplesConfig::default(),
            self_update: SelfUpdateConfig::default(),
        }
    }
}

/// A config problem, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {detail}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The TOML is malformed or has an unknown field.
    #[error("{path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        detail: String,
    },
    /// A field breaks a rule.
    #[error("{path}: `{field}` {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// The rule.
        reason: String,
    },
}

/// Reads a TOML configuration file of at most 64 KiB into `T` (shared with the
/// controller's configuration); errors name the file.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let read_err = |detail: String| ConfigError::Read {
        path: path.to_owned(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| read_err(e.to_string()))?;
    if meta.len() > MAX_CONFIG_LEN {
        return Err(read_err(format!(
            "{} bytes, over the limit of {MAX_CONFIG_LEN}",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| read_err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// The longest Unix socket path Linux takes (`sun_path` is 108 bytes with
/// its terminating zero).
pub const MAX_SOCKET_PATH: usize = 107;

/// Why a path cannot be the local API's Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketPathError {
    /// A relative path (the socket's place would depend on the directory the
    /// agent starts in).
    #[error("{0} must be an absolute path")]
    Relative(PathBuf),
    /// Longer than `sun_path` holds.
    #[error("{path} is {len} bytes, over the {MAX_SOCKET_PATH} a Unix socket path can have")]
    TooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

/// Why `path` cannot be the local API's Unix socket, if it cannot.
pub fn check_socket_path(path: &Path) -> Result<(), SocketPathError> {
    use std::os::unix::ffi::OsStrExt;
    let len = path.as_os_str().as_bytes().len();
    if !path.is_absolute() {
        return Err(SocketPathError::Relative(path.to_owned()));
    }
    if len > MAX_SOCKET_PATH {
        return Err(SocketPathError::TooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = read_toml(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// The one validating function.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        DeviceId::new(&self.device_id).map_err(|e| invalid("device_id", e.reason.into()))?;
        if !self.api_listen.ip().is_loopback() {
            return Err(invalid(
                "api_listen",
                "must be a loopback address (the local API has no authentication)".into(),
            ));
        }
        if let Some(socket) = &self.api_socket {
            check_socket_path(socket).map_err(|e| invalid("api_socket", e.to_string()))?;
        }
        self.broker
            .check()
            .map_err(|(field, reason)| invalid(field, reason))?;
        if !(1..=86_400).contains(&self.telemetry.interval_s) {
            return Err(invalid(
                "telemetry.interval_s",
                "must be between 1 and 86400".into(),
            ));
        }
        if !(100..=1_000_000).contains(&self.drift.window_rows) {
            return Err(invalid(
                "drift.window_rows",
                "must be between 100 and 1000000".into(),
            ));
        }
        if !(60..=604_800).contains(&self.drift.window_max_s) {
            return Err(invalid(
                "drift.window_max_s",
                "must be between 60 and 604800".into(),
            ));
        }
        if self.drift.min_rows == 0 || self.drift.min_rows > self.drift.window_rows {
            return Err(invalid(
                "drift.min_rows",
                "must be at least 1 and at most drift.window_rows".into(),
            ));
        }
        if let Err((field, reason)) = self.self_update.check() {
            return Err(invalid(field, reason.into()));
        }
        if !(1..=10_000).contains(&self.samples.capacity) {
            return Err(invalid(
                "samples.capacity",
                "must be between 1 and 10000".into(),
            ));
        }
        if !(64..=1 << 20).contains(&self.samples.max_sample_bytes) {
            return Err(invalid(
                "samples.max_sample_bytes",
                "must be between 64 and 1048576".into(),
            ));
        }
        if !(self.samples.min_confidence > 0.0 && self.samples.min_confidence <= 1.0) {
            return Err(invalid(
                "samples.min_confidence",
                "must be above 0 and at most 1".into(),
            ));
        }
        if !((1 << 20)..=(1 << 32)).contains(&self.limits.api_memory_bytes) {
            return Err(invalid(
                "limits.api_memory_bytes",
                "must be between 1048576 (1 MiB) and 4294967296 (4 GiB)".into(),
            ));
        }
        if !(1..=4096).contains(&self.limits.api_requests_in_flight) {
            return Err(invalid(
                "limits.api_requests_in_flight",
                "must be between 1 and 4096".into(),
            ));
        }
        if !(1..=65_536).contains(&self.limits.api_connections) {
            return Err(invalid(
                "limits.api_connections",
                "must be between 1 and 65536".into(),
            ));
        }
        if !(100..=600_000).contains(&self.limits.api_header_timeout_ms) {
            return Err(invalid(
                "limits.api_header_timeout_ms",
                "must be between 100 and 600000".into(),
            ));
        }
        if !(100..=600_000).contains(&self.limits.api_body_timeout_ms) {
            return Err(invalid(
                "limits.api_body_timeout_ms",
                "must be between 100 and 600000".into(),
            ));
        }
        if self.limits.max_bundle_bytes < 4096 {
            return Err(invalid(
                "limits.max_bundle_bytes",
                "must be at least 4096".into(),
            ));
        }
        Ok(())
    }

    /// The default config as commented TOML, for `config print-default`.
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&AgentConfig::default()).unwrap_or_default();
        format!(
            "# edgefleet-agent configuration ({DEFAULT_PATH}).\n\
             # device_id: this device's id, the CN of its certificate ([A-Za-z0-9_-], 1-64).\n\
             # data_dir: slots and state; trust_root: the pinned trust root (from flashing).\n\
             # api_listen: local OIP v2 inference API, loopback only.\n\
             # api_socket = \"/run/edgefleet/api.sock\": the same API also on a Unix socket\n\
             #   (mode 0660: its owner and group may call the model); none by default.\n\
             # broker.url: mqtts://host:port with broker.ca/cert/key (mutual TLS), or\n\
             #   mqtt://host:port for development; several URLs separated by commas are\n\
             #   the nodes of a broker cluster, tried in turn. broker.controller_key: the controller's\n\
             #   command key from enrollment: only commands it signed are carried out, if\n\
             #   issued less than broker.command_max_age_s ago. broker.subscribe_qos: 1, or 0\n\
             #   on a NATS cluster (docs/scale.md). telemetry.interval_s: 1..86400.\n\
             # limits: largest bundle accepted, free disk an install must leave (bytes);\n\
             #   models_memory_bytes: what every channel's models may declare together\n\
             #   (0: no budget beyond the memory available);\n\
             #   the memory the local API's requests may hold at once (bytes; each is\n\
             #   charged a multiple of its body) and requests at once (past either a\n\
             #   request waits up to 1 s, then gets 503), connections\n\
             #   at once, and the longest wait for a request's headers, then its body (ms).\n\
             # drift: windows of served rows compared with the bundle's reference; a window\n\
             #   closes at window_rows rows, or after window_max_s with at least min_rows.\n\
             # samples: capture = off | drift | low_confidence | always (off by default:\n\
             #   requests are user data); a uniform sample of `capacity` requests is kept\n\
             #   in memory and uploaded when the controller asks.\n\
             # self_update: the agent's binary slots (binary_dir/agent.a, agent.b), the link\n\
             #   the supervisor starts (the unit's ExecStart), and the seconds a new agent\n\
             #   has to confirm before the previous one comes back; unsupervised = true\n\
             #   updates even with nothing to restart a new agent that fails\n\
             #   (docs/agent-update.md).\n\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml_text: &str) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, toml_text).expect("write");
        AgentConfig::load(&path)
    }

    #[test]
    fn the_printed_default_loads_and_validates() {
        let config = check(&AgentConfig::default_toml()).expect("default is valid");
        assert_eq!(config, AgentConfig::default());
    }

    #[test]
    fn a_socket_path_is_absolute_and_fits_sun_path() {
        assert!(check_socket_path(Path::new("/run/edgefleet/api.sock")).is_ok());
        let longest = format!("/{}", "a".repeat(MAX_SOCKET_PATH - 1));
        assert!(check_socket_path(Path::new(&longest)).is_ok());
        let over = format!("/{}", "a".repeat(MAX_SOCKET_PATH));
        assert!(
            check_socket_path(Path::new(&over))
                .expect_err("refused")
                .to_string()
                .contains("108 bytes")
        );
        assert!(
            check_socket_path(Path::new("api.sock"))
                .expect_err("refused")
                .to_string()
                .contains("absolute")
        );
        let config = check("api_socket = \"/run/edgefleet/api.sock\"").expect("valid");
        assert_eq!(
            config.api_socket.as_deref(),
            Some(Path::new("/run/edgefleet/api.sock"))
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        for (text, field) in [
            ("device_id = \"../x\"", "device_id"),
            ("api_listen = \"0.0.0.0:8008\"", "api_listen"),
            ("api_socket = \"run/api.sock\"", "api_socket"),
            (
                "api_socket = \"/run/edgefleet/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.sock\"",
                "api_socket",
            ),
            ("[broker]\nurl = \"http://x:1\"", "broker.url"),
            ("[broker]\nurl = \"mqtts://x\"", "broker.url"),
            ("[telemetry]\ninterval_s = 0", "telemetry.interval_s"),
            ("[broker]\ncontroller_key = \"\"", "broker.controller_key"),
            (
                "[broker]\ncommand_max_age_s = 5",
                "broker.command_max_age_s",
            ),
            ("[broker]\ntopic_prefix = \"a/#\"", "broker.topic_prefix"),
            ("[broker]\nsubscribe_qos = 2", "broker.subscribe_qos"),
            ("[drift]\nwindow_rows = 5", "drift.window_rows"),
            ("[drift]\nmin_rows = 5000", "drift.min_rows"),
            ("[samples]\ncapacity = 0", "samples.capacity"),
            ("[samples]\nmin_confidence = 2.0", "samples.min_confidence"),
            (
                "[self_update]\nconfirm_within_s = 5",
                "self_update.confirm_within_s",
            ),
            ("[self_update]\nlink = \"agent\"", "self_update.link"),
            (
                "[self_update]\nbinary_dir = \"lib\"",
                "self_update.binary_dir",
            ),
        ] {
            let err = check(text).expect_err(text).to_string();
            assert!(err.contains(&format!("`{field}`")), "{text}: {err}");
        }
        let err = check("colour = \"blue\"")
            .expect_err("unknown field")
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let partial =
            check("[broker]\nurl = \"mqtts://x:8883\"\ncert = \"/c.pem\"").expect("others default");
        assert_eq!(partial.broker.cert, Some("/c.pem".into()));
        assert!(partial.broker.key.is_some());
    }
}
