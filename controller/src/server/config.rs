//! The controller's configuration (`controller.toml`): a typed struct with a
//! `Default`, one validating function whose errors name the field, and flags that
//! override the common fields (`--data-dir`, `--http`, `--mqtt`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::server::db::StoreLocation;
use edgefleet_shared::protocol::Topics;
use serde::{Deserialize, Serialize};

/// Which broker the controller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerMode {
    /// rumqttd inside the controller, mutual TLS with the controller's CA.
    Embedded,
    /// Another broker (Mosquitto with its ACL is the recommended production setup).
    External,
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `embedded` or `external`.
    pub mode: BrokerMode,
    /// Embedded: the address devices connect to (TLS).
    pub listen: SocketAddr,
    /// Embedded: names and addresses in the broker's server certificate.
    pub hosts: Vec<String>,
    /// External: `mqtts://host:port` (or `mqtt://` for development); several
    /// separated by commas are the nodes of a broker cluster, dialled in turn
    /// (the controller and its devices alike).
    pub url: Option<String>,
    /// External: CA, client certificate and key of the controller.
    pub ca: Option<PathBuf>,
    /// External: client certificate.
    pub cert: Option<PathBuf>,
    /// External: client key.
    pub key: Option<PathBuf>,
    /// Topic prefix shared with the agents.
    pub topic_prefix: String,
    /// QoS of the controller's subscriptions, handed to devices at enrollment
    /// for theirs: 1, or 0 on a NATS cluster, which makes every QoS 1
    /// subscription a replicated JetStream consumer (docs/scale.md, "NATS at
    /// scale"). Publishes are QoS 1 either way.
    pub subscribe_qos: u8,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            mode: BrokerMode::Embedded,
            listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            url: None,
            ca: None,
            cert: None,
            key: None,
            topic_prefix: edgefleet_shared::protocol::DEFAULT_PREFIX.into(),
            subscribe_qos: 1,
        }
    }
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// API address.
    pub listen: SocketAddr,
    /// Largest bundle upload accepted, bytes.
    pub max_bundle_bytes: u64,
    /// Connections served at once (further ones wait unaccepted).
    pub max_connections: u32,
    /// Longest wait for a request's headers, also the longest a kept-alive
    /// connection stays idle, ms.
    pub header_timeout_ms: u64,
}

impl HttpConfig {
    /// The API server's connection bounds.
    pub fn connection_limits(&self) -> edgefleet_agent::http::ConnectionLimits {
        edgefleet_agent::http::ConnectionLimits {
            max_connections: self.max_connections as usize,
            header_timeout: std::time::Duration::from_millis(self.header_timeout_ms),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_bundle_bytes: 1 << 30,
            max_connections: 1024,
            header_timeout_ms: 10_000,
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryStoreConfig {
    /// Telemetry older than this is deleted (hourly).
    pub retention_days: u32,
    /// Most samples written in one transaction.
    pub batch_max: u32,
    /// Longest a sample waits for its batch, ms.
    pub batch_ms: u64,
}

impl Default for TelemetryStoreConfig {
    fn default() -> Self {
        TelemetryStoreConfig {
            retention_days: 30,
            batch_max: 1000,
            batch_ms: 200,
        }
    }
}

/// `[drift]`: the fleet-level drift alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftAlertConfig {
    /// A model version is alerting when at least this percentage of the devices
    /// reporting drift for it are drifted (1-100).
    pub alert_percent: u32,
    /// ... and at least this many devices report (1 or more).
    pub alert_min_devices: u32,
}

impl Default for DriftAlertConfig {
    fn default() -> Self {
        DriftAlertConfig {
            alert_percent: 30,
            alert_min_devices: 3,
        }
    }
}

/// `[rollouts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// How often rollouts are advanced, ms.
    pub tick_ms: u64,
    /// A chunk request waits this long for others asking for the same chunk, ms.
    pub chunk_coalesce_ms: u64,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            tick_ms: 1000,
            chunk_coalesce_ms: 25,
        }
    }
}

/// Where the store is: `database = "/var/lib/x.db"` or `"postgres://..."`, or a
/// table `[database]` with `url` (or `path`) and `readers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DatabaseSetting {
    /// A SQLite file's path, or a `postgres://` URL.
    Location(String),
    /// The `[database]` table.
    Table(DatabaseTable),
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseTable {
    /// `postgres://user:password@host:port/database`.
    #[serde(default)]
    pub url: Option<String>,
    /// A SQLite file (instead of `url`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// PostgreSQL connections for reads (one more writes); default 4.
    #[serde(default = "default_readers")]
    pub readers: usize,
}

fn default_readers() -> usize {
    4
}

fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `[cluster]`: this controller as one of several replicas sharing one store
/// (docs/scale.md, "Replicas"). A lone controller needs none of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This replica's name; each replica of a fleet needs its own.
    pub replica: String,
    /// How long the rollout lease lasts unless renewed (ms): the longest a
    /// dead replica's rollouts wait for another to take them over.
    pub lease_ms: u64,
    /// The API URL shown to operators who ask another replica for a rollout
    /// operation (default `http://<http.listen>` as bound).
    pub address: Option<String>,
    /// Telemetry, states and samples through the broker's shared
    /// subscriptions (`$share/edgefleet/...`), each message to one replica;
    /// an external broker that has them (Mosquitto 2, EMQX, VerneMQ, HiveMQ).
    pub shared_subscriptions: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            replica: "controller".into(),
            lease_ms: 5_000,
            address: None,
            shared_subscriptions: false,
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Database, CA, bundles, admin token.
    pub data_dir: PathBuf,
    /// The store: a SQLite file (default `<data_dir>/controller.db`) or a
    /// PostgreSQL URL; `database = "..."` or a `[database]` table.
    pub database: Option<DatabaseSetting>,
    /// The fleet's trust root, to check uploads (default `<data_dir>/trust-root.cbor`).
    pub trust_root: Option<PathBuf>,
    /// HTTP API.
    pub http: HttpConfig,
    /// Broker.
    pub mqtt: MqttConfig,
    /// Telemetry storage.
    pub telemetry: TelemetryStoreConfig,
    /// Rollout engine.
    pub rollouts: RolloutConfig,
    /// Fleet-level drift alerts.
    pub drift: DriftAlertConfig,
    /// Replicas.
    pub cluster: ClusterConfig,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            data_dir: "/var/lib/edgefleet-controller".into(),
            database: None,
            trust_root: None,
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            telemetry: TelemetryStoreConfig::default(),
            drift: DriftAlertConfig::default(),
            rollouts: RolloutConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// A configuration problem, naming the file and the field (the agent's type: one
/// format of configuration errors for both programs).
pub use edgefleet_agent::config::ConfigError;

impl ControllerConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let config: ControllerConfig = edgefleet_agent::config::read_toml(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every field; `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        self.validate_database(path)?;
        Topics::new(&self.mqtt.topic_prefix).map_err(|e| invalid("mqtt.topic_prefix", e.reason))?;
        edgefleet_agent::link::subscribe_qos(self.mqtt.subscribe_qos)
            .map_err(|reason| invalid("mqtt.subscribe_qos", reason))?;
        match self.mqtt.mode {
            BrokerMode::Embedded => {
                if self.mqtt.hosts.is_empty() {
                    return Err(invalid(
                        "mqtt.hosts",
                        "must name at least one host devices dial (it goes in the broker's certificate)",
                    ));
                }
            }
            BrokerMode::External => {
                let url = self.mqtt.url.as_deref().unwrap_or("");
                if !(url.starts_with("mqtts://") || url.starts_with("mqtt://")) {
                    return Err(invalid(
                        "mqtt.url",
                        "an external broker needs mqtts://host:port (or mqtt:// for development)",
                    ));
                }
                if url.starts_with("mqtts://")
                    && (self.mqtt.ca.is_none()
                        || self.mqtt.cert.is_none()
                        || self.mqtt.key.is_none())
                {
                    return Err(invalid(
                        "mqtt.cert",
                        "mqtts:// needs mqtt.ca, mqtt.cert and mqtt.key (the controller's client certificate)",
                    ));
                }
            }
        }
        if self.http.max_bundle_bytes == 0 {
            return Err(invalid("http.max_bundle_bytes", "must be above 0"));
        }
        if !(1..=65_536).contains(&self.http.max_connections) {
            return Err(invalid("http.max_connections", "must be 1 to 65536"));
        }
        if !(100..=600_000).contains(&self.http.header_timeout_ms) {
            return Err(invalid("http.header_timeout_ms", "must be 100 to 600000"));
        }
        if !(1..=100_000).contains(&self.telemetry.batch_max) {
            return Err(invalid("telemetry.batch_max", "must be 1 to 100000"));
        }
        if self.telemetry.retention_days == 0 {
            return Err(invalid("telemetry.retention_days", "must be at least 1"));
        }
        if !(1..=100).contains(&self.drift.alert_percent) {
            return Err(invalid("drift.alert_percent", "must be 1 to 100"));
        }
        if self.drift.alert_min_devices == 0 {
            return Err(invalid("drift.alert_min_devices", "must be at least 1"));
        }
        if !(10..=60_000).contains(&self.rollouts.tick_ms) {
            return Err(invalid("rollouts.tick_ms", "must be 10 to 60000"));
        }
        self.validate_cluster(path)?;
        if self.rollouts.chunk_coalesce_ms > 5_000 {
            return Err(invalid(
                "rollouts.chunk_coalesce_ms",
                "must be at most 5000",
            ));
        }
        Ok(())
    }

    /// Where the store is.
    pub fn store_location(&self) -> StoreLocation {
        let sqlite = |p: PathBuf| StoreLocation::Sqlite(p);
        match &self.database {
            None => sqlite(self.data_dir.join("controller.db")),
            Some(DatabaseSetting::Location(s)) if is_postgres_url(s) => StoreLocation::Postgres {
                url: s.clone(),
                readers: default_readers(),
            },
            Some(DatabaseSetting::Location(s)) => sqlite(s.into()),
            Some(DatabaseSetting::Table(t)) => match (&t.url, &t.path) {
                (Some(url), _) => StoreLocation::Postgres {
                    url: url.clone(),
                    readers: t.readers,
                },
                (None, Some(p)) => sqlite(p.clone()),
                (None, None) => sqlite(self.data_dir.join("controller.db")),
            },
        }
    }

    fn validate_cluster(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        let name = &self.cluster.replica;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(invalid(
                "cluster.replica",
                "must be 1 to 64 letters, digits, '.', '_' or '-'",
            ));
        }
        if self.cluster.lease_ms < 3 * self.rollouts.tick_ms || self.cluster.lease_ms > 600_000 {
            return Err(invalid(
                "cluster.lease_ms",
                "must be at least 3 rollouts.tick_ms (it is renewed every tick) and at most 600000",
            ));
        }
        if self.cluster.shared_subscriptions && self.mqtt.mode == BrokerMode::Embedded {
            return Err(invalid(
                "cluster.shared_subscriptions",
                "needs an external broker (mqtt.mode = \"external\"): replicas share one broker",
            ));
        }
        Ok(())
    }

    fn validate_database(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason: reason.to_owned(),
        };
        match &self.database {
            None => Ok(()),
            Some(DatabaseSetting::Location(s)) if s.is_empty() => Err(invalid(
                "database",
                "must be a SQLite file's path or a postgres:// URL",
            )),
            Some(DatabaseSetting::Location(_)) => Ok(()),
            Some(DatabaseSetting::Table(t)) => {
                match (&t.url, &t.path) {
                    (Some(_), Some(_)) => {
                        return Err(invalid("database.url", "give url or path, not both"));
                    }
                    (None, None) => {
                        return Err(invalid(
                            "database.url",
                            "give url (postgres://...) or path (a SQLite file)",
                        ));
                    }
                    (Some(url), None) if !is_postgres_url(url) => {
                        return Err(invalid(
                            "database.url",
                            "must start with postgres:// or postgresql://",
                        ));
                    }
                    _ => {}
                }
                if !(1..=64).contains(&t.readers) {
                    return Err(invalid("database.readers", "must be 1 to 64"));
                }
                Ok(())
            }
        }
    }

    /// The trust root used to check uploads.
    pub fn trust_root_path(&self) -> PathBuf {
        self.trust_root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("trust-root.cbor"))
    }

    /// A commented default configuration that loads as [`ControllerConfig::default`].
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&ControllerConfig::default()).unwrap_or_default();
        format!(
            "# edgefleet controller configuration (edgefleet serve --config FILE).\n\
             # data_dir: database, CA (ca/), uploaded bundles (bundles/), admin-token.\n\
             # database: SQLite file, default <data_dir>/controller.db; or PostgreSQL:\n\
             #   database = \"postgres://user:password@host:5432/edgefleet\", or a table\n\
             #   [database] with url and readers (read connections, default 4).\n\
             # trust_root: the fleet's trust root; uploads are verified against it\n\
             #   (default <data_dir>/trust-root.cbor).\n\
             # [http] listen: API address; max_bundle_bytes: largest upload; max_connections:\n\
             #   connections at once; header_timeout_ms: longest wait for a request's headers.\n\
             # [mqtt] mode = \"embedded\" runs rumqttd on `listen` with mutual TLS (certificates\n\
             #   from the controller's CA, server certificate for `hosts`); mode = \"external\"\n\
             #   connects to `url` with ca/cert/key (Mosquitto: see `edgefleet broker acl`).\n\
             # [telemetry] retention_days, batch_max, batch_ms: how samples are stored.\n\
             # [rollouts] tick_ms: engine period; chunk_coalesce_ms: wait that merges\n\
             #   requests for the same chunk from several devices.\n\
             # [drift] alert_percent, alert_min_devices: a model version alerts (audit\n\
             #   drift.alert, metric edgefleet_drift_alerts_total) when that share of the\n\
             #   devices reporting drift for it are drifted.\n\
             # [cluster] replica: this controller's name among replicas sharing one\n\
             #   PostgreSQL store (each needs its own); lease_ms: how long the rollout\n\
             #   lease lasts unless renewed; address: its API URL shown by the others;\n\
             #   shared_subscriptions: telemetry to one replica each (external broker).\n\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<ControllerConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("controller.toml");
        std::fs::write(&path, text).expect("write");
        ControllerConfig::load(&path)
    }

    #[test]
    fn the_printed_default_loads_as_the_default() {
        assert_eq!(
            check(&ControllerConfig::default_toml()).expect("valid"),
            ControllerConfig::default()
        );
    }

    #[test]
    fn the_store_is_a_sqlite_file_or_a_postgres_url() {
        let at = |text: &str| check(text).expect(text).store_location();
        assert_eq!(
            at("data_dir = \"/d\""),
            StoreLocation::Sqlite("/d/controller.db".into())
        );
        assert_eq!(
            at("database = \"/x/c.db\""),
            StoreLocation::Sqlite("/x/c.db".into())
        );
        assert_eq!(
            at("database = \"postgres://u@h:5432/fleet\""),
            StoreLocation::Postgres {
                url: "postgres://u@h:5432/fleet".into(),
                readers: 4
            }
        );
        assert_eq!(
            at("[database]\nurl = \"postgresql://u:secret@h/fleet\"\nreaders = 8"),
            StoreLocation::Postgres {
                url: "postgresql://u:secret@h/fleet".into(),
                readers: 8
            }
        );
        assert_eq!(
            at("[database]\npath = \"/y.db\""),
            StoreLocation::Sqlite("/y.db".into())
        );
        // Messages name the database without its password.
        let shown = at("[database]\nurl = \"postgresql://u:secret@h/fleet\"").to_string();
        assert_eq!(shown, "postgresql://u:***@h/fleet");
    }

    #[test]
    fn each_bad_field_is_named() {
        for (text, field) in [
            ("data_dir = \"\"", "data_dir"),
            ("[mqtt]\ntopic_prefix = \"a/+\"", "mqtt.topic_prefix"),
            ("[mqtt]\nsubscribe_qos = 2", "mqtt.subscribe_qos"),
            ("[mqtt]\nhosts = []", "mqtt.hosts"),
            ("[mqtt]\nmode = \"external\"", "mqtt.url"),
            (
                "[mqtt]\nmode = \"external\"\nurl = \"mqtts://b:8883\"",
                "mqtt.cert",
            ),
            ("[telemetry]\nbatch_max = 0", "telemetry.batch_max"),
            (
                "[telemetry]\nretention_days = 0",
                "telemetry.retention_days",
            ),
            ("[rollouts]\ntick_ms = 1", "rollouts.tick_ms"),
            ("[drift]\nalert_percent = 0", "drift.alert_percent"),
            ("[http]\nmax_bundle_bytes = 0", "http.max_bundle_bytes"),
            ("[http]\nmax_connections = 0", "http.max_connections"),
            ("[http]\nheader_timeout_ms = 5", "http.header_timeout_ms"),
            ("database = \"\"", "database"),
            ("[cluster]\nreplica = \"a b\"", "cluster.replica"),
            ("[cluster]\nlease_ms = 1000", "cluster.lease_ms"),
            ("[database]\nreaders = 2", "database.url"),
            ("[database]\nurl = \"mysql://x\"", "database.url"),
            (
                "[database]\nurl = \"postgres://h/d\"\npath = \"/x.db\"",
                "database.url",
            ),
            (
                "[database]\nurl = \"postgres://h/d\"\nreaders = 0",
                "database.readers",
            ),
        ] {
            let err = check(text).expect_err(text).to_string();
            assert!(err.contains(&format!("`{field}`")), "{text}: {err}");
        }
        assert!(
            check("colour = 1")
                .expect_err("unknown")
                .to_string()
                .contains("colour")
        );
        assert!(check("[mqtt]\nmode = \"cloud\"").is_err());
    }
}
