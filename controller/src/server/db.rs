//! The controller's store: SQLite (the default: one file, one writer thread, WAL)
//! or PostgreSQL (when configured; docs/decisions.md "PostgreSQL"). The queries
//! are written once against [`sql::Tx`] and run on either backend; migrations
//! are numbered and applied at start inside a transaction each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgefleet_shared::protocol::DriftReport;
use edgefleet_shared::{DeviceId, Digest};
use serde::Serialize;
use tokio_rusqlite::rusqlite;

mod pg;
pub mod sql;
mod sqlite;
pub mod testing;

use sql::{Row, Tx, Value, vals};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite said no (its error kept, with its code).
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL said no, or could not be reached.
    #[error("database: {}", postgres_reason(.0))]
    Postgres(#[from] postgres::Error),
    /// The database's thread is gone (the connection was closed).
    #[error("database connection closed")]
    Closed,
    /// A store thread could not be started.
    #[error("database: starting a connection thread: {0}")]
    Thread(std::io::Error),
    /// Stored data did not decode (written by another version?).
    #[error("database holds data this version cannot read: {0}")]
    Corrupt(String),
    /// A step of the lease's holder came after the lease passed to another
    /// replica: nothing of it was stored.
    #[error("lease {0} is no longer held by this replica")]
    LeaseLost(&'static str),
}

type Result<T> = std::result::Result<T, DbError>;

/// PostgreSQL's own message (its code, and detail where it gives one): the
/// client's `Display` alone says only "db error".
fn postgres_reason(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut out = format!("{} ({}): {}", d.severity(), d.code().code(), d.message());
            if let Some(detail) = d.detail() {
                out.push_str(&format!(" ({detail})"));
            }
            out
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Enrolled certificates: SHA-256 of the DER (hex) to the device id.
pub type Fingerprints = BTreeMap<String, String>;

pub use crate::server::tags::Tags;

/// The migrations, in order. Never edit one that has shipped; add the next.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        tags TEXT NOT NULL DEFAULT '{}',
        enrolled_at INTEGER,
        cert_sha256 TEXT,
        online INTEGER NOT NULL DEFAULT 0,
        last_seen INTEGER,
        agent_version TEXT,
        arch TEXT,
        active_digest TEXT,
        active_channel TEXT,
        active_version TEXT,
        state TEXT
    );
    CREATE TABLE bundles (
        digest TEXT PRIMARY KEY,
        channel TEXT NOT NULL,
        version TEXT NOT NULL,
        release INTEGER NOT NULL,
        size INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        uploaded_at INTEGER NOT NULL,
        uploaded_by TEXT NOT NULL,
        summary TEXT NOT NULL
    );
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        bundle TEXT NOT NULL REFERENCES bundles(digest),
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        selector TEXT NOT NULL,
        phase TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE rollout_log (
        id INTEGER PRIMARY KEY,
        rollout TEXT NOT NULL,
        at INTEGER NOT NULL,
        note TEXT NOT NULL
    );
    CREATE INDEX rollout_log_by_rollout ON rollout_log(rollout, id);
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device TEXT NOT NULL,
        rollout TEXT,
        action TEXT NOT NULL,
        issued_at INTEGER NOT NULL
    );
    CREATE TABLE events (
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        command INTEGER,
        kind TEXT NOT NULL,
        digest TEXT,
        body TEXT NOT NULL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    CREATE TABLE telemetry (
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        digest TEXT,
        inferences INTEGER,
        errors INTEGER,
        latency_counts TEXT,
        cpu_percent REAL,
        mem_used INTEGER,
        rss_bytes INTEGER,
        body TEXT NOT NULL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    CREATE INDEX telemetry_by_time ON telemetry(received_at);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        before TEXT,
        after TEXT
    );
    CREATE TABLE tokens (
        sha256 TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );",
    // 2: telemetry as a rowid table. Its rows (about 1 KiB with the JSON body) are
    // too large for a WITHOUT ROWID table, which stores them in the key B-tree:
    // inserts ran at about 3,000 rows/s, batched or not (docs/benchmarks.md).
    "CREATE TABLE telemetry_new (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        digest TEXT,
        inferences INTEGER,
        errors INTEGER,
        latency_counts TEXT,
        cpu_percent REAL,
        mem_used INTEGER,
        rss_bytes INTEGER,
        body TEXT NOT NULL,
        UNIQUE (device, seq)
    );
    INSERT INTO telemetry_new (device, seq, at, received_at, digest, inferences, errors,
        latency_counts, cpu_percent, mem_used, rss_bytes, body)
    SELECT device, seq, at, received_at, digest, inferences, errors, latency_counts,
        cpu_percent, mem_used, rss_bytes, body FROM telemetry ORDER BY received_at;
    DROP TABLE telemetry;
    ALTER TABLE telemetry_new RENAME TO telemetry;
    CREATE INDEX telemetry_by_time ON telemetry(received_at);",
    // 3: the drift summary of each sample (the whole report stays in `body`).
    "ALTER TABLE telemetry ADD COLUMN drift_rows INTEGER;
    ALTER TABLE telemetry ADD COLUMN drift_share REAL;
    ALTER TABLE telemetry ADD COLUMN drifted INTEGER;
    ALTER TABLE telemetry ADD COLUMN drift_features TEXT;",
    // 4: the shadow model's counters of each sample (JSON), for the shadow gate.
    "ALTER TABLE telemetry ADD COLUMN shadow TEXT;",
    // 5: captured samples: upload parts until complete, then one row per sample.
    "CREATE TABLE sample_parts (
        device TEXT NOT NULL,
        command INTEGER NOT NULL,
        digest TEXT NOT NULL,
        part INTEGER NOT NULL,
        parts INTEGER NOT NULL,
        data BLOB NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (device, command, part)
    );
    CREATE TABLE samples (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        command INTEGER NOT NULL,
        digest TEXT NOT NULL,
        at INTEGER NOT NULL,
        reason TEXT NOT NULL,
        body TEXT NOT NULL,
        received_at INTEGER NOT NULL
    );
    CREATE INDEX samples_by_bundle ON samples(digest, device);
    CREATE INDEX samples_by_time ON samples(received_at);",
    // 6: the epoch of each event and sample (the run of the device's counter:
    // docs/protocol.md), part of what makes a report unique, so a reflashed
    // device whose counters start again at 1 is not taken for redeliveries.
    // Rows from before get epoch 0. "Latest" is by receipt (the rowid for
    // telemetry), not by the device's own number.
    "CREATE TABLE telemetry_new (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        digest TEXT,
        inferences INTEGER,
        errors INTEGER,
        latency_counts TEXT,
        cpu_percent REAL,
        mem_used INTEGER,
        rss_bytes INTEGER,
        body TEXT NOT NULL,
        drift_rows INTEGER,
        drift_share REAL,
        drifted INTEGER,
        drift_features TEXT,
        shadow TEXT,
        UNIQUE (device, epoch, seq)
    );
    INSERT INTO telemetry_new (id, device, epoch, seq, at, received_at, digest, inferences,
        errors, latency_counts, cpu_percent, mem_used, rss_bytes, body, drift_rows,
        drift_share, drifted, drift_features, shadow)
    SELECT id, device, 0, seq, at, received_at, digest, inferences, errors, latency_counts,
        cpu_percent, mem_used, rss_bytes, body, drift_rows, drift_share, drifted,
        drift_features, shadow FROM telemetry;
    DROP TABLE telemetry;
    ALTER TABLE telemetry_new RENAME TO telemetry;
    CREATE INDEX telemetry_by_time ON telemetry(received_at);
    CREATE INDEX telemetry_by_device ON telemetry(device, id);
    CREATE TABLE events_new (
        device TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        command INTEGER,
        kind TEXT NOT NULL,
        digest TEXT,
        body TEXT NOT NULL,
        PRIMARY KEY (device, epoch, seq)
    ) WITHOUT ROWID;
    INSERT INTO events_new (device, epoch, seq, at, received_at, command, kind, digest, body)
    SELECT device, 0, seq, at, received_at, command, kind, digest, body FROM events;
    DROP TABLE events;
    ALTER TABLE events_new RENAME TO events;
    CREATE INDEX events_by_receipt ON events(device, received_at);",
    // 7: the bundle of each install command: a device may fetch the chunks of
    // a bundle only after it was told to install it (docs/controller.md).
    "ALTER TABLE commands ADD COLUMN bundle TEXT;
    CREATE INDEX commands_by_bundle ON commands(device, bundle);",
    // 8: reports the device could not keep (a full disk, its spool's bound),
    // as it counts them; a gap in `seq` with this count unchanged is a loss
    // the device does not know of.
    "ALTER TABLE telemetry ADD COLUMN spool_dropped INTEGER;",
    // 9: leases (the replica that runs the rollouts, docs/scale.md "Replicas"):
    // who holds each, where its API answers, until when (ms).
    "CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        address TEXT,
        expires_at INTEGER NOT NULL
    );",
    // 10: whether the rollout lease's holder has applied an event to its
    // rollouts: every replica stores the events it hears, and the holder
    // applies each once even when another replica stored it first.
    "ALTER TABLE events ADD COLUMN applied INTEGER NOT NULL DEFAULT 1;",
    // 11: dashboard sessions (docs/dashboard.md): the SHA-256 of the cookie's
    // random id, the token it was opened with (deleting the token ends it),
    // the form token its actions must carry, and when it ends (ms).
    "CREATE TABLE sessions (
        sha256 TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        csrf TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    );",
    // 12: each device's latest drift report (when received, drifted or not, the
    // drifted features), kept with the device so that fleet views need not
    // search the telemetry for it.
    "ALTER TABLE devices ADD COLUMN drift_at INTEGER;
    ALTER TABLE devices ADD COLUMN drifted INTEGER;
    ALTER TABLE devices ADD COLUMN drift_features TEXT;",
    // 13: several models per device (docs/channels.md). A report of a device
    // serving several channels is stored as one row per channel, each with
    // that channel's figures and body (as a one-channel device would send
    // it); a one-channel report keeps one row with channel ''. Each device
    // lists its channels' active bundles (JSON) beside the first one's columns.
    "CREATE TABLE telemetry_new (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        channel TEXT NOT NULL DEFAULT '',
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        digest TEXT,
        inferences INTEGER,
        errors INTEGER,
        latency_counts TEXT,
        cpu_percent REAL,
        mem_used INTEGER,
        rss_bytes INTEGER,
        body TEXT NOT NULL,
        drift_rows INTEGER,
        drift_share REAL,
        drifted INTEGER,
        drift_features TEXT,
        shadow TEXT,
        spool_dropped INTEGER,
        UNIQUE (device, epoch, seq, channel)
    );
    INSERT INTO telemetry_new (id, device, epoch, seq, at, received_at, digest, inferences,
        errors, latency_counts, cpu_percent, mem_used, rss_bytes, body, drift_rows,
        drift_share, drifted, drift_features, shadow, spool_dropped)
    SELECT id, device, epoch, seq, at, received_at, digest, inferences, errors, latency_counts,
        cpu_percent, mem_used, rss_bytes, body, drift_rows, drift_share, drifted,
        drift_features, shadow, spool_dropped FROM telemetry;
    DROP TABLE telemetry;
    ALTER TABLE telemetry_new RENAME TO telemetry;
    CREATE INDEX telemetry_by_time ON telemetry(received_at);
    CREATE INDEX telemetry_by_device ON telemetry(device, id);
    ALTER TABLE devices ADD COLUMN channels TEXT NOT NULL DEFAULT '[]';",
    // When the latest state (or will) was received: telemetry received after
    // an offline state proves the device connected again (a stale will).
    "ALTER TABLE devices ADD COLUMN state_at INTEGER;",
    // 15: the events another replica stored that the rollout lease's holder
    // has not applied (it never heard them itself), found each tick.
    "CREATE INDEX events_unapplied ON events(received_at) WHERE applied = 0;",
];

/// The store.
#[derive(Debug, Clone)]
pub struct Db {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(pg::Postgres),
}

/// A device as listed by the API.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DeviceRow {
    /// Device id.
    #[schema(value_type = String)]
    pub id: DeviceId,
    /// Tags given at enrollment.
    pub tags: Tags,
    /// Enrolled by this controller (certificate issued) or only seen on the broker.
    pub enrolled: bool,
    /// Connected, per its retained state and will.
    pub online: bool,
    /// Last message of any kind, ms since the epoch.
    pub last_seen: Option<u64>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// CPU architecture.
    pub arch: Option<String>,
    /// Digest of the active bundle.
    #[schema(value_type = Option<String>)]
    pub active_digest: Option<Digest>,
    /// Channel (model name) of the active bundle.
    pub active_channel: Option<String>,
    /// Version of the active bundle.
    pub active_version: Option<String>,
    /// Its latest drift report, if it sent one.
    pub drift: Option<LatestDrift>,
    /// Every channel it serves, by name (the first is also in `active_*`).
    pub channels: Vec<ChannelRow>,
}

/// The columns [`device_row`] reads, in its order (a macro, for `concat!`:
/// the store takes statements as static text).
macro_rules! device_columns {
    () => {
        "id, tags, enrolled_at, online, last_seen, agent_version, arch, active_digest,
         active_channel, active_version, drift_at, drifted, drift_features, channels"
    };
}

/// A device from a row of [`device_columns`].
fn device_row(r: &Row) -> Result<DeviceRow> {
    Ok(DeviceRow {
        id: r.id(0)?,
        tags: r.json(1)?.unwrap_or_default(),
        enrolled: r.get::<Option<i64>>(2)?.is_some(),
        online: r.get(3)?,
        last_seen: r.get::<Option<i64>>(4)?.map(u),
        agent_version: r.get(5)?,
        arch: r.get(6)?,
        active_digest: r.id_or_none(7)?,
        active_channel: r.get(8)?,
        active_version: r.get(9)?,
        drift: match (r.get::<Option<i64>>(10)?, r.get::<Option<bool>>(11)?) {
            (Some(at), Some(drifted)) => Some(LatestDrift {
                received_at: u(at),
                drifted,
                features: r.json(12)?.unwrap_or_default(),
            }),
            _ => None,
        },
        channels: r.json(13)?.unwrap_or_default(),
    })
}

/// One channel a device serves: its active bundle.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ChannelRow {
    /// The channel (model name).
    pub channel: String,
    /// Digest of its active bundle.
    #[schema(value_type = String)]
    pub digest: Digest,
    /// Its version.
    pub version: String,
    /// Its release.
    pub release: u64,
}

/// A device's latest drift report, as kept with the device.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LatestDrift {
    /// When it was received (ms since the epoch).
    pub received_at: u64,
    /// Whether that window drifted.
    pub drifted: bool,
    /// The drifted inputs and outputs.
    pub features: Vec<String>,
}

/// A bundle as listed by the API.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BundleRow {
    /// Manifest digest, hex.
    #[schema(value_type = String)]
    pub digest: Digest,
    /// Model channel.
    pub channel: String,
    /// Semantic version.
    pub version: String,
    /// Release number.
    pub release: u64,
    /// File size in bytes.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u32,
    /// Creation time (s since the epoch).
    pub created_at: u64,
    /// Expiry time (s since the epoch).
    pub expires_at: u64,
    /// Upload time (ms since the epoch).
    pub uploaded_at: u64,
    /// Token name that uploaded it.
    pub uploaded_by: String,
    /// Manifest summary (schema, artifacts, signatures).
    pub summary: serde_json::Value,
}

impl BundleRow {
    /// Whether this is an agent release (on the reserved agent channel).
    pub fn is_agent_release(&self) -> bool {
        self.channel == edgefleet_shared::manifest::AGENT_CHANNEL
    }
}

/// A stored rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    /// Id.
    pub id: String,
    /// Bundle digest.
    pub bundle: Digest,
    /// Created, ms.
    pub created_at: u64,
    /// Token name.
    pub created_by: String,
    /// The selector as given (JSON).
    pub selector: String,
    /// Engine state (JSON of [`crate::server::engine::Rollout`]).
    pub state: String,
}

/// A device event as stored.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EventRow {
    /// Device.
    #[schema(value_type = String)]
    pub device: DeviceId,
    /// Device's sequence number.
    pub seq: u64,
    /// Device time, s since the epoch.
    pub at: u64,
    /// Command it answers.
    pub command: Option<u64>,
    /// Event kind (snake case).
    pub kind: String,
    /// Bundle digest concerned.
    #[schema(value_type = Option<String>)]
    pub digest: Option<Digest>,
    /// The whole event.
    pub body: serde_json::Value,
}

/// A telemetry sample, as stored for gates and the API.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TelemetryRow {
    /// Device.
    #[schema(value_type = String)]
    pub device: DeviceId,
    /// Sequence number.
    pub seq: u64,
    /// Device time, s since the epoch.
    pub at: u64,
    /// Receive time, ms.
    pub received_at: u64,
    /// Active bundle digest.
    #[schema(value_type = Option<String>)]
    pub digest: Option<Digest>,
    /// Inferences since the bundle became active (or the agent started).
    pub inferences: Option<u64>,
    /// Errors, same span.
    pub errors: Option<u64>,
    /// Latency histogram counts, same span.
    pub latency_counts: Option<Vec<u64>>,
    /// CPU use.
    pub cpu_percent: Option<f64>,
    /// Memory used on the device.
    pub mem_used: Option<u64>,
    /// Agent RSS.
    pub rss_bytes: Option<u64>,
    /// Drift of the active bundle's latest judged window, when it has a reference.
    pub drift: Option<DriftSummary>,
    /// The shadow model's counters, when one runs.
    #[schema(value_type = Option<Object>)]
    pub shadow: Option<edgefleet_shared::protocol::ShadowMetrics>,
    /// Reports the device could not keep, ever (its spool's count: a full
    /// disk, or the spool's bound while offline); `None` before migration 8.
    pub spool_dropped: Option<u64>,
}

/// The part of a drift report that gates and views use.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DriftSummary {
    /// Rows in the window.
    pub rows: u64,
    /// Share of drifted input features.
    pub drifted_share: f64,
    /// Whether the window counts as drifted.
    pub drifted: bool,
    /// The drifted inputs and outputs.
    pub features: Vec<String>,
}

impl DriftSummary {
    /// The summary of a device's report.
    pub fn of(r: &edgefleet_shared::protocol::DriftReport) -> DriftSummary {
        DriftSummary {
            rows: r.rows,
            drifted_share: r.drifted_share,
            drifted: r.drifted,
            features: r
                .inputs
                .iter()
                .chain(&r.outputs)
                .filter(|f| f.drifted)
                .map(|f| f.feature.clone())
                .collect(),
        }
    }
}

/// What storing a sample upload part led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleParts {
    /// More parts to come.
    Waiting,
    /// Every part is in: the joined bytes.
    Complete(Vec<u8>),
    /// The parts passed the size cap; the upload was dropped.
    TooLarge,
}

/// A stored sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleRow {
    /// Device.
    pub device: DeviceId,
    /// Bundle digest that answered.
    pub digest: Digest,
    /// Device time, s since the epoch.
    pub at: i64,
    /// Why it was kept (`always`, `drift`, `low_confidence`).
    pub reason: String,
    /// `{"inputs": [tensors], "outputs": [tensors]}`.
    pub body: serde_json::Value,
}

/// An audit record.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditRow {
    /// Sequence.
    pub id: i64,
    /// When (ms).
    pub at: u64,
    /// Token name, or "controller" for automatic steps.
    pub actor: String,
    /// What (e.g. `rollout.pause`).
    pub action: String,
    /// Which object.
    pub target: String,
    /// State before (JSON), when it had one.
    pub before: Option<serde_json::Value>,
    /// State after (JSON).
    pub after: Option<serde_json::Value>,
}

/// The `devices` row values of a retained state that came at `now`.
fn state_values(s: &edgefleet_shared::protocol::DeviceState, now: u64) -> Vec<Value> {
    use edgefleet_shared::protocol::SlotRole;
    let actives = s.slots.iter().filter(|x| x.role == SlotRole::Active);
    let channels: Vec<ChannelRow> = actives
        .map(|a| ChannelRow {
            channel: a.bundle.channel.to_string(),
            digest: a.bundle.digest,
            version: a.bundle.version.clone(),
            release: a.bundle.release,
        })
        .collect();
    let active = s.slots.iter().find(|x| x.role == SlotRole::Active);
    vec![
        s.device.to_string().into(),
        s.online.into(),
        i(now).into(),
        s.agent_version.clone().into(),
        serde_json::to_value(&s.arch)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
            .into(),
        active.map(|a| a.bundle.digest.to_hex()).into(),
        active.map(|a| a.bundle.channel.to_string()).into(),
        active.map(|a| a.bundle.version.clone()).into(),
        serde_json::to_string(s).unwrap_or_default().into(),
        serde_json::to_string(&channels).unwrap_or_default().into(),
    ]
}

/// An event's row in `events`, received at `now` (parameters 1-9).
fn event_values(e: &edgefleet_shared::protocol::Event, now: u64) -> Vec<Value> {
    let body = serde_json::to_value(e).unwrap_or_default();
    let kind = body
        .get("kind")
        .and_then(|k| match k {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.keys().next().cloned(),
            _ => None,
        })
        .unwrap_or_default();
    let digest = event_digest(&e.kind).map(|d| d.to_hex());
    vec![
        e.device.to_string().into(),
        i(e.seq).into(),
        e.at.0.into(),
        i(now).into(),
        e.command.map(i).into(),
        kind.into(),
        digest.into(),
        body.to_string().into(),
        bits(e.epoch).into(),
    ]
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An audit record, written in the same transaction as the change it records
/// (a change without its record, or a record without its change, cannot be left
/// behind by a crash).
#[derive(Debug, Clone)]
pub struct Audit {
    /// Who (the token's name).
    pub actor: String,
    /// What, e.g. `token.create`.
    pub action: String,
    /// The object changed.
    pub target: String,
    /// The object before (JSON), if it matters.
    pub before: Option<serde_json::Value>,
    /// The object after (JSON).
    pub after: Option<serde_json::Value>,
    /// When, ms since the epoch.
    pub at: u64,
}

/// A lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The replica holding it.
    pub holder: String,
    /// Where that replica's API answers, if it said.
    pub address: Option<String>,
    /// Until when (ms since the epoch), unless renewed.
    pub expires_at: u64,
}

/// A rollout step to store in one transaction: its commands, and its new
/// state with the step's notes and audit record when the state changed.
#[derive(Debug, Clone)]
pub struct RolloutStep {
    /// Rollout id.
    pub rollout: String,
    /// The new phase and state (JSON), if they are to be stored.
    pub state: Option<(&'static str, String)>,
    /// Notes for the rollout's log.
    pub notes: Vec<String>,
    /// The step's audit record.
    pub audit: Option<Audit>,
    /// The commands it sends.
    pub commands: Vec<StepCommand>,
    /// Stored only while this replica holds this lease: (lease, holder).
    pub fence: Option<(&'static str, String)>,
}

/// A command a rollout step sends.
#[derive(Debug, Clone)]
pub struct StepCommand {
    /// To whom.
    pub device: DeviceId,
    /// The action's name.
    pub action: &'static str,
    /// The bundle it is about.
    pub bundle: Option<Digest>,
    /// Sent before and unanswered: the same command again (the newest stored
    /// with this rollout, device and action keeps its id), not a new one.
    pub again: bool,
}

fn write_audit(t: &mut dyn Tx, a: &Audit) -> Result<()> {
    t.execute(
        "INSERT INTO audit (at, actor, action, target, before, after) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        vals![
            i(a.at),
            a.actor.as_str(),
            a.action.as_str(),
            a.target.as_str(),
            a.before.as_ref().map(|b| b.to_string()),
            a.after.as_ref().map(|b| b.to_string())
        ],
    )?;
    Ok(())
}

fn write_audit_opt(t: &mut dyn Tx, a: Option<&Audit>) -> Result<()> {
    match a {
        Some(a) => write_audit(t, a),
        None => Ok(()),
    }
}

/// An identifier (an epoch) stored bit for bit: distinct values stay distinct.
fn bits(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn json_or_null(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

/// Where the store is: a SQLite file (the default) or a PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://user@host:port/db`) and how many
    /// connections serve reads.
    Postgres {
        /// The connection URL.
        url: String,
        /// Read connections (one more writes).
        readers: usize,
    },
}

impl std::fmt::Display for StoreLocation {
    /// The location for messages: a URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "{}", p.display()),
            StoreLocation::Postgres { url, .. } => f.write_str(&redact_password(url)),
        }
    }
}

/// `url` with any password replaced by `***`.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl Db {
    /// Opens (creating) the SQLite database at `path` and applies pending
    /// migrations.
    pub async fn open(path: &Path) -> Result<Db> {
        Ok(Db {
            backend: Backend::Sqlite(sqlite::Sqlite::open(path).await?),
        })
    }

    /// Opens the store at `location`, applying pending migrations.
    pub async fn open_at(location: &StoreLocation) -> Result<Db> {
        match location {
            StoreLocation::Sqlite(p) => Db::open(p).await,
            StoreLocation::Postgres { url, readers } => Ok(Db {
                backend: Backend::Postgres(pg::Postgres::connect(url, *readers).await?),
            }),
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The schema version (number of migrations applied).
    pub async fn schema_version(&self) -> Result<i64> {
        match &self.backend {
            Backend::Sqlite(s) => s.schema_version().await,
            Backend::Postgres(p) => p.schema_version().await,
        }
    }

    /// Runs `f` in one write transaction.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite(s) => s.write(f).await,
            Backend::Postgres(p) => p.write(f).await,
        }
    }

    /// Runs a lease's write: on PostgreSQL on a connection of its own, so a
    /// renewal never waits behind the writer's queue (under a 10,000-device
    /// rollout that queue held renewals past the lease, and the lease passed
    /// between live replicas); on SQLite with the other writes.
    async fn write_lease<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite(s) => s.write(f).await,
            Backend::Postgres(p) => p.write_lease(f).await,
        }
    }

    /// Runs reads.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite(s) => s.read(f).await,
            Backend::Postgres(p) => p.read(f).await,
        }
    }

    // ----- devices -------------------------------------------------------

    /// Enrolls devices in one transaction: (id, tags, certificate
    /// fingerprint, audit record) each. Enrolling again replaces a device's
    /// tags and certificate.
    pub async fn enroll(
        &self,
        devices: Vec<(DeviceId, Tags, String, Audit)>,
        now: u64,
    ) -> Result<()> {
        self.write(move |t| {
            for (id, tags, fp, audit) in &devices {
                let tags = serde_json::to_string(tags).unwrap_or_else(|_| "{}".into());
                t.execute(
                    "INSERT INTO devices (id, tags, enrolled_at, cert_sha256) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(id) DO UPDATE SET tags = ?2, enrolled_at = ?3, cert_sha256 = ?4",
                    vals![id.as_str(), tags, i(now), fp],
                )?;
                write_audit(t, audit)?;
            }
            Ok(())
        })
        .await
    }

    /// Forgets a device's certificate (revocation); false if it had none (and
    /// then nothing is audited).
    pub async fn revoke(&self, id: &str, audit: Option<Audit>) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |t| {
            let changed = t.execute(
                "UPDATE devices SET cert_sha256 = NULL WHERE id = ?1 AND cert_sha256 IS NOT NULL",
                vals![id],
            )? == 1;
            if changed {
                write_audit_opt(t, audit.as_ref())?;
            }
            Ok(changed)
        })
        .await
    }

    /// Stores a device's retained state.
    pub async fn device_state(
        &self,
        s: &edgefleet_shared::protocol::DeviceState,
        now: u64,
    ) -> Result<()> {
        self.device_states(&[(s.clone(), now)]).await
    }

    /// Stores devices' retained states in one transaction, in order (a
    /// device's later state wins): each with the time it came.
    pub async fn device_states(
        &self,
        states: &[(edgefleet_shared::protocol::DeviceState, u64)],
    ) -> Result<()> {
        let rows: Vec<Vec<Value>> = states
            .iter()
            .map(|(s, now)| state_values(s, *now))
            .collect();
        self.write(move |t| {
            for row in &rows {
                t.execute(
                    "INSERT INTO devices (id, online, last_seen, agent_version, arch, active_digest, active_channel, active_version, state, channels, state_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?3)
                     ON CONFLICT(id) DO UPDATE SET online = ?2, last_seen = ?3, agent_version = ?4, arch = ?5,
                        active_digest = ?6, active_channel = ?7, active_version = ?8, state = ?9, channels = ?10,
                        state_at = ?3",
                    row,
                )?;
            }
            Ok(())
        })
        .await
    }

    /// All devices, by id.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>> {
        self.read(|t| {
            t.query(
                concat!("SELECT ", device_columns!(), " FROM devices ORDER BY id"),
                &[],
            )?
            .iter()
            .map(device_row)
            .collect()
        })
        .await
    }

    /// One device, if known (its row alone, not the whole list: handlers
    /// that named a device read every device to find it).
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>> {
        let id = id.to_owned();
        self.read(move |t| {
            t.query_opt(
                concat!("SELECT ", device_columns!(), " FROM devices WHERE id = ?1"),
                vals![id],
            )?
            .as_ref()
            .map(device_row)
            .transpose()
        })
        .await
    }

    /// The channels a device serves (from its last retained state); none for
    /// an unknown device.
    pub async fn device_channels(&self, id: &str) -> Result<Vec<ChannelRow>> {
        let id = id.to_owned();
        self.read(move |t| {
            match t.query_opt("SELECT channels FROM devices WHERE id = ?1", vals![id])? {
                Some(r) => Ok(r.json(0)?.unwrap_or_default()),
                None => Ok(Vec::new()),
            }
        })
        .await
    }

    /// The last retained state of a device (JSON), if any.
    pub async fn device_state_json(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let id = id.to_owned();
        self.read(move |t| {
            match t.query_opt("SELECT state FROM devices WHERE id = ?1", vals![id])? {
                Some(r) => Ok(json_or_null(r.get(0)?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Certificate fingerprints of enrolled devices: SHA-256 (hex) to device id.
    pub async fn enrolled_fingerprints(&self) -> Result<Fingerprints> {
        self.read(|t| {
            t.query(
                "SELECT cert_sha256, id FROM devices WHERE cert_sha256 IS NOT NULL",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect()
        })
        .await
    }

    // ----- events and telemetry ------------------------------------------

    /// Stores an event. Without `apply`: true if it was new (false for a
    /// redelivery). With `apply` (the rollout lease's holder): true if it is
    /// to be applied now: new, or stored by another replica and not yet
    /// applied; each event is claimed once.
    pub async fn insert_event(
        &self,
        e: &edgefleet_shared::protocol::Event,
        now: u64,
        apply: bool,
    ) -> Result<bool> {
        let fresh = self.insert_events(&[(e.clone(), now)], apply).await?;
        Ok(fresh.first().copied().unwrap_or(false))
    }

    /// [`Db::insert_event`] for a batch of events (each with when it was
    /// received), in one transaction: one commit for many events when
    /// devices talk at once. The answer for each, in order.
    pub async fn insert_events(
        &self,
        events: &[(edgefleet_shared::protocol::Event, u64)],
        apply: bool,
    ) -> Result<Vec<bool>> {
        let rows: Vec<Vec<Value>> = events
            .iter()
            .map(|(e, now)| event_values(e, *now))
            .collect();
        self.write(move |t| {
            rows.iter()
                .map(|row| {
                    let changed = if apply {
                        t.execute(
                            "INSERT INTO events (device, seq, at, received_at, command, kind, digest, body, epoch, applied)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1)
                             ON CONFLICT (device, epoch, seq) DO UPDATE SET applied = 1 WHERE events.applied = 0",
                            row,
                        )?
                    } else {
                        t.execute(
                            "INSERT INTO events (device, seq, at, received_at, command, kind, digest, body, epoch, applied)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0) ON CONFLICT DO NOTHING",
                            row,
                        )?
                    };
                    Ok(changed == 1)
                })
                .collect()
        })
        .await
    }

    /// Whether some event received at or before `heard_by` is stored and not
    /// applied (a read: the holder asks each tick, and mostly there is none).
    pub async fn has_unapplied_events(&self, heard_by: u64) -> Result<bool> {
        self.read(move |t| {
            t.query_one(
                "SELECT EXISTS (SELECT 1 FROM events WHERE applied = 0 AND received_at <= ?1)",
                vals![i(heard_by)],
            )?
            .get(0)
        })
        .await
    }

    /// Claims for the rollout lease's holder up to `limit` events that other
    /// replicas stored at or before `heard_by` and nobody applied (the holder
    /// never heard them: its broker connection dropped, or they came before
    /// it took the lease), in the order they were received. Each event is
    /// claimed once: by this, or by the holder storing its own copy.
    pub async fn claim_unapplied_events(
        &self,
        heard_by: u64,
        limit: u32,
    ) -> Result<Vec<edgefleet_shared::protocol::Event>> {
        let mut rows = self
            .write(move |t| {
                t.query(
                    "UPDATE events SET applied = 1
                     WHERE applied = 0 AND (device, epoch, seq) IN (
                         SELECT device, epoch, seq FROM events
                         WHERE applied = 0 AND received_at <= ?1
                         ORDER BY received_at LIMIT ?2)
                     RETURNING received_at, seq, body",
                    vals![i(heard_by), limit],
                )?
                .iter()
                .map(|r| Ok((u(r.get(0)?), u(r.get(1)?), r.get::<String>(2)?)))
                .collect::<Result<Vec<_>>>()
            })
            .await?;
        rows.sort_by_key(|(received_at, seq, _)| (*received_at, *seq));
        rows.into_iter()
            .map(|(_, _, body)| {
                serde_json::from_str(&body)
                    .map_err(|e| DbError::Corrupt(format!("a stored event: {e}")))
            })
            .collect()
    }

    /// The latest `limit` events of a device, newest first (by receipt: a device
    /// whose counter started again is not hidden behind its older numbers).
    pub async fn events(&self, device: &str, limit: u32) -> Result<Vec<EventRow>> {
        let device = device.to_owned();
        self.read(move |t| {
            t.query(
                "SELECT device, seq, at, command, kind, digest, body FROM events
                 WHERE device = ?1 ORDER BY received_at DESC, seq DESC LIMIT ?2",
                vals![device, limit],
            )?
            .iter()
            .map(event_row)
            .collect()
        })
        .await
    }

    /// The latest `limit` events of one kind (snake case) across the fleet,
    /// newest first.
    pub async fn events_of_kind(&self, kind: &str, limit: u32) -> Result<Vec<EventRow>> {
        let kind = kind.to_owned();
        self.read(move |t| {
            t.query(
                "SELECT device, seq, at, command, kind, digest, body FROM events
                 WHERE kind = ?1 ORDER BY received_at DESC, seq DESC LIMIT ?2",
                vals![kind, limit],
            )?
            .iter()
            .map(event_row)
            .collect()
        })
        .await
    }

    /// Devices enrolled here whose certificate was revoked, by id.
    pub async fn revoked_devices(&self) -> Result<Vec<String>> {
        self.read(|t| {
            t.query(
                "SELECT id FROM devices WHERE enrolled_at IS NOT NULL AND cert_sha256 IS NULL
                 ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect()
        })
        .await
    }

    /// Stores a batch of telemetry in one transaction; redeliveries are ignored.
    /// Returns how many were new. The rows are written in key order (device,
    /// epoch, sequence number): replicas that each received the same reports
    /// (no shared subscriptions) then lock them in the same order, where
    /// arrival order made PostgreSQL abort one batch as a deadlock (seen with
    /// two replicas on NATS).
    pub async fn insert_telemetry(
        &self,
        mut batch: Vec<(edgefleet_shared::protocol::Telemetry, u64)>,
    ) -> Result<usize> {
        batch.sort_by(|(a, _), (b, _)| {
            (a.device.as_str(), a.epoch, a.seq).cmp(&(b.device.as_str(), b.epoch, b.seq))
        });
        self.write(move |t| {
            let mut n = 0;
            let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
            let mut drift: BTreeMap<&str, (u64, &DriftReport)> = BTreeMap::new();
            for (s, received) in &batch {
                // The device's drift: a drifted channel's report first.
                let reports = s.channel_parts().into_iter().filter_map(|(_, p)| p.drift);
                let report = reports.fold(None, |best: Option<&DriftReport>, d| match best {
                    Some(b) if b.drifted || !d.drifted => Some(b),
                    _ => Some(d),
                });
                if let Some(d) = report
                    && drift.get(s.device.as_str()).is_none_or(|(at, _)| at <= received)
                {
                    drift.insert(s.device.as_str(), (*received, d));
                }
                // A report counts once, however many channel rows it makes.
                for (part, row) in telemetry_rows(s, *received).iter().enumerate() {
                    let inserted = t.execute(
                        "INSERT INTO telemetry (device, seq, at, received_at, digest, inferences, errors,
                            latency_counts, cpu_percent, mem_used, rss_bytes, body,
                            drift_rows, drift_share, drifted, drift_features, shadow, epoch,
                            spool_dropped, channel)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)
                         ON CONFLICT DO NOTHING",
                        row,
                    )?;
                    if part == 0 {
                        n += inserted;
                    }
                }
                let last = latest.entry(s.device.as_str()).or_insert(0);
                *last = (*last).max(*received);
            }
            // One update per device and batch, not per sample. A report
            // received after the device's offline state (its will) means it
            // connected again: the will was stale (a broker cluster can
            // deliver the will of a connection attempt that failed after
            // the device's next connection announced it online).
            for (device, at) in latest {
                t.execute(
                    "UPDATE devices SET last_seen = CASE WHEN COALESCE(last_seen, 0) > ?2
                        THEN last_seen ELSE ?2 END WHERE id = ?1",
                    vals![device, i(at)],
                )?;
                t.execute(
                    "UPDATE devices SET online = ?3
                     WHERE id = ?1 AND online <> ?3 AND COALESCE(state_at, 0) < ?2",
                    vals![device, i(at), true],
                )?;
            }
            for (device, (at, report)) in drift {
                let summary = DriftSummary::of(report);
                let features = serde_json::to_string(&summary.features).unwrap_or_default();
                t.execute(
                    "UPDATE devices SET drift_at = ?2, drifted = ?3, drift_features = ?4
                     WHERE id = ?1 AND COALESCE(drift_at, 0) <= ?2",
                    vals![device, i(at), summary.drifted, features],
                )?;
            }
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
        .await
    }

    /// The latest telemetry sample of every device received at or after `since`.
    pub async fn latest_telemetry(&self, since: u64) -> Result<Vec<TelemetryRow>> {
        self.latest_telemetry_between(since, u64::MAX).await
    }

    /// The latest telemetry sample of every device received in `[from, to]`: the
    /// last one received, whatever number the device gave it; for a device
    /// serving several channels, that report's row of each channel.
    pub async fn latest_telemetry_between(&self, from: u64, to: u64) -> Result<Vec<TelemetryRow>> {
        self.read(move |t| {
            t.query(
                "SELECT t.device, t.seq, t.at, t.received_at, t.digest, t.inferences, t.errors,
                        t.latency_counts, t.cpu_percent, t.mem_used, t.rss_bytes,
                        t.drift_rows, t.drift_share, t.drifted, t.drift_features, t.shadow,
                        t.spool_dropped
                 FROM telemetry t
                 JOIN telemetry l ON l.device = t.device AND l.epoch = t.epoch AND l.seq = t.seq
                 JOIN (SELECT MAX(id) AS id FROM telemetry
                       WHERE received_at BETWEEN ?1 AND ?2 GROUP BY device) m
                   ON m.id = l.id",
                vals![i(from), i(to)],
            )?
            .iter()
            .map(telemetry_row)
            .collect()
        })
        .await
    }

    /// The latest `limit` telemetry samples of one device received in a time
    /// range, oldest first (in the order received).
    pub async fn telemetry(
        &self,
        device: &str,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<TelemetryRow>> {
        let device = device.to_owned();
        self.read(move |t| {
            let mut out = t
                .query(
                    "SELECT device, seq, at, received_at, digest, inferences, errors, latency_counts,
                            cpu_percent, mem_used, rss_bytes,
                            drift_rows, drift_share, drifted, drift_features, shadow, spool_dropped
                     FROM telemetry WHERE device = ?1 AND received_at BETWEEN ?2 AND ?3
                     ORDER BY id DESC LIMIT ?4",
                    vals![device, i(from), i(to), limit],
                )?
                .iter()
                .map(telemetry_row)
                .collect::<Result<Vec<_>>>()?;
            out.reverse();
            Ok(out)
        })
        .await
    }

    /// The drift reports of one device received in `[from, to]`, oldest first, at
    /// most `limit`: (device time, receive time, the whole report).
    pub async fn drift_reports(
        &self,
        device: &str,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<(u64, u64, serde_json::Value)>> {
        let device = device.to_owned();
        self.read(move |t| {
            let mut out = t
                .query(
                    "SELECT at, received_at, body FROM telemetry
                     WHERE device = ?1 AND received_at BETWEEN ?2 AND ?3 AND drift_rows IS NOT NULL
                     ORDER BY id DESC LIMIT ?4",
                    vals![device, i(from), i(to), limit],
                )?
                .iter()
                .map(|r| {
                    let body: Option<serde_json::Value> = r.json(2)?;
                    let drift = body
                        .and_then(|mut b| b.get_mut("drift").map(serde_json::Value::take))
                        .unwrap_or(serde_json::Value::Null);
                    Ok((u(r.get(0)?), u(r.get(1)?), drift))
                })
                .collect::<Result<Vec<_>>>()?;
            out.reverse();
            Ok(out)
        })
        .await
    }

    /// The device metrics (CPU, memory, disk, temperature) of one device's
    /// telemetry received in `[from, to]`, oldest first, at most `limit`:
    /// (receive time, the report's `device_metrics` object).
    pub async fn device_metrics(
        &self,
        device: &str,
        from: u64,
        to: u64,
        limit: u32,
    ) -> Result<Vec<(u64, serde_json::Value)>> {
        let device = device.to_owned();
        self.read(move |t| {
            let mut out = t
                .query(
                    "SELECT received_at, body FROM telemetry
                     WHERE device = ?1 AND received_at BETWEEN ?2 AND ?3
                     ORDER BY id DESC LIMIT ?4",
                    vals![device, i(from), i(to), limit],
                )?
                .iter()
                .map(|r| {
                    let body: Option<serde_json::Value> = r.json(1)?;
                    let metrics = body
                        .and_then(|mut b| b.get_mut("device_metrics").map(serde_json::Value::take))
                        .unwrap_or(serde_json::Value::Null);
                    Ok((u(r.get(0)?), metrics))
                })
                .collect::<Result<Vec<_>>>()?;
            out.reverse();
            Ok(out)
        })
        .await
    }

    /// Stores one part of a sample upload (a redelivery is ignored). When the
    /// upload is complete, returns the joined bytes and deletes the parts; an
    /// upload whose parts pass `max_len` bytes is dropped.
    pub async fn insert_sample_part(
        &self,
        device: &str,
        u: &edgefleet_shared::protocol::SampleUpload,
        max_len: usize,
        now: u64,
    ) -> Result<SampleParts> {
        let (device, u) = (device.to_owned(), u.clone());
        self.write(move |t| {
            t.execute(
                "INSERT INTO sample_parts (device, command, digest, part, parts, data, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
                vals![
                    device.as_str(),
                    i(u.command),
                    u.digest.to_hex(),
                    u.part,
                    u.parts,
                    u.data,
                    i(now)
                ],
            )?;
            let sums = t.query_one(
                "SELECT COUNT(*), COALESCE(SUM(length(data)), 0) FROM sample_parts
                 WHERE device = ?1 AND command = ?2 AND parts = ?3",
                vals![device.as_str(), i(u.command), u.parts],
            )?;
            let (have, bytes): (u64, u64) = (sums.get(0)?, sums.get(1)?);
            if bytes > max_len as u64 {
                t.execute(
                    "DELETE FROM sample_parts WHERE device = ?1 AND command = ?2",
                    vals![device.as_str(), i(u.command)],
                )?;
                return Ok(SampleParts::TooLarge);
            }
            if have != u64::from(u.parts) {
                return Ok(SampleParts::Waiting);
            }
            let mut all = Vec::new();
            for r in t.query(
                "SELECT data FROM sample_parts WHERE device = ?1 AND command = ?2 ORDER BY part",
                vals![device.as_str(), i(u.command)],
            )? {
                all.extend(r.get::<Vec<u8>>(0)?);
            }
            t.execute(
                "DELETE FROM sample_parts WHERE device = ?1 AND command = ?2",
                vals![device.as_str(), i(u.command)],
            )?;
            Ok(SampleParts::Complete(all))
        })
        .await
    }

    /// Stores the samples of a complete upload.
    pub async fn insert_samples(
        &self,
        device: &str,
        command: u64,
        batch: edgefleet_shared::protocol::SampleBatch,
        now: u64,
    ) -> Result<usize> {
        let device = device.to_owned();
        self.write(move |t| {
            for s in &batch.samples {
                let reason = serde_json::to_value(s.reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let body = serde_json::to_string(
                    &serde_json::json!({"inputs": s.inputs, "outputs": s.outputs}),
                )
                .unwrap_or_default();
                t.execute(
                    "INSERT INTO samples (device, command, digest, at, reason, body, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    vals![
                        device.as_str(),
                        i(command),
                        batch.digest.to_hex(),
                        s.at.0,
                        reason,
                        body,
                        i(now)
                    ],
                )?;
            }
            Ok(batch.samples.len())
        })
        .await
    }

    /// Stored samples, oldest first, optionally of one device and/or bundle, at
    /// most `limit`: (device, digest, device time, reason, {inputs, outputs}).
    pub async fn samples(
        &self,
        device: Option<String>,
        digest: Option<String>,
        limit: u32,
    ) -> Result<Vec<SampleRow>> {
        self.read(move |t| {
            t.query(
                "SELECT device, digest, at, reason, body FROM samples
                 WHERE (CAST(?1 AS TEXT) IS NULL OR device = ?1)
                   AND (CAST(?2 AS TEXT) IS NULL OR digest = ?2)
                 ORDER BY id LIMIT ?3",
                vals![device, digest, limit],
            )?
            .iter()
            .map(|r| {
                Ok(SampleRow {
                    device: r.id(0)?,
                    digest: r.id(1)?,
                    at: r.get(2)?,
                    reason: r.get(3)?,
                    body: r.json(4)?.unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
        })
        .await
    }

    /// Deletes samples (and stale upload parts) received before `before`.
    pub async fn prune_samples(&self, before: u64) -> Result<usize> {
        self.write(move |t| {
            let n = t.execute(
                "DELETE FROM samples WHERE received_at < ?1",
                vals![i(before)],
            )?;
            t.execute(
                "DELETE FROM sample_parts WHERE received_at < ?1",
                vals![i(before)],
            )?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
        .await
    }

    /// Deletes telemetry received before `before`; returns how many rows went.
    pub async fn prune_telemetry(&self, before: u64) -> Result<usize> {
        self.write(move |t| {
            let n = t.execute(
                "DELETE FROM telemetry WHERE received_at < ?1",
                vals![i(before)],
            )?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
        .await
    }

    // ----- bundles -------------------------------------------------------

    /// Records an uploaded bundle; false if it was already there.
    pub async fn insert_bundle(&self, b: &BundleRow, audit: Option<Audit>) -> Result<bool> {
        let row: Vec<Value> = vec![
            b.digest.to_hex().into(),
            b.channel.clone().into(),
            b.version.clone().into(),
            i(b.release).into(),
            i(b.size).into(),
            b.chunks.into(),
            i(b.created_at).into(),
            i(b.expires_at).into(),
            i(b.uploaded_at).into(),
            b.uploaded_by.clone().into(),
            b.summary.to_string().into(),
        ];
        self.write(move |t| {
            let new = t.execute(
                "INSERT INTO bundles (digest, channel, version, release, size, chunks, created_at,
                    expires_at, uploaded_at, uploaded_by, summary)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT DO NOTHING",
                &row,
            )? == 1;
            if new {
                write_audit_opt(t, audit.as_ref())?;
            }
            Ok(new)
        })
        .await
    }

    /// All bundles, newest upload first.
    pub async fn bundles(&self) -> Result<Vec<BundleRow>> {
        self.read(|t| {
            t.query(
                "SELECT digest, channel, version, release, size, chunks, created_at, expires_at,
                        uploaded_at, uploaded_by, summary
                 FROM bundles ORDER BY uploaded_at DESC, digest",
                &[],
            )?
            .iter()
            .map(bundle_row)
            .collect()
        })
        .await
    }

    /// One bundle by digest (hex).
    pub async fn bundle(&self, digest: &Digest) -> Result<Option<BundleRow>> {
        let digest = digest.to_hex();
        self.read(move |t| {
            t.query_opt(
                "SELECT digest, channel, version, release, size, chunks, created_at, expires_at,
                        uploaded_at, uploaded_by, summary
                 FROM bundles WHERE digest = ?1",
                vals![digest],
            )?
            .as_ref()
            .map(bundle_row)
            .transpose()
        })
        .await
    }

    // ----- rollouts and commands -------------------------------------------

    /// Creates a rollout.
    pub async fn insert_rollout(
        &self,
        r: &RolloutRow,
        phase: &str,
        audit: Option<Audit>,
    ) -> Result<()> {
        let row: Vec<Value> = vec![
            r.id.clone().into(),
            r.bundle.to_hex().into(),
            i(r.created_at).into(),
            r.created_by.clone().into(),
            r.selector.clone().into(),
            phase.into(),
            r.state.clone().into(),
        ];
        self.write(move |t| {
            t.execute(
                "INSERT INTO rollouts (id, bundle, created_at, created_by, selector, phase, state, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?3)",
                &row,
            )?;
            write_audit_opt(t, audit.as_ref())
        })
        .await
    }

    /// Saves a rollout's engine state and the notes of the step that produced it,
    /// in one transaction.
    pub async fn save_rollout(
        &self,
        id: &str,
        phase: &'static str,
        state: String,
        notes: Vec<String>,
        now: u64,
        audit: Option<Audit>,
    ) -> Result<()> {
        let step = RolloutStep {
            rollout: id.to_owned(),
            state: Some((phase, state)),
            notes,
            audit,
            commands: Vec::new(),
            fence: None,
        };
        self.step_rollout(step, now).await.map(drop)
    }

    /// Every rollout (newest first), or only those not finished.
    pub async fn rollouts(&self, unfinished_only: bool) -> Result<Vec<RolloutRow>> {
        self.read(move |t| {
            let rows = if unfinished_only {
                t.query(
                    "SELECT id, bundle, created_at, created_by, selector, state FROM rollouts
                     WHERE phase NOT IN ('completed', 'halted', 'aborted') ORDER BY created_at DESC, id",
                    &[],
                )?
            } else {
                t.query(
                    "SELECT id, bundle, created_at, created_by, selector, state FROM rollouts
                     ORDER BY created_at DESC, id",
                    &[],
                )?
            };
            rows.iter()
                .map(|r| {
                    Ok(RolloutRow {
                        id: r.get(0)?,
                        bundle: r.id(1)?,
                        created_at: u(r.get(2)?),
                        created_by: r.get(3)?,
                        selector: r.get(4)?,
                        state: r.get(5)?,
                    })
                })
                .collect()
        })
        .await
    }

    /// The log of a rollout, oldest first.
    pub async fn rollout_log(&self, id: &str) -> Result<Vec<(u64, String)>> {
        let id = id.to_owned();
        self.read(move |t| {
            t.query(
                "SELECT at, note FROM rollout_log WHERE rollout = ?1 ORDER BY id",
                vals![id],
            )?
            .iter()
            .map(|r| Ok((u(r.get(0)?), r.get(1)?)))
            .collect()
        })
        .await
    }

    /// Allocates a command id (ids are never reused, across restarts).
    pub async fn new_command(
        &self,
        device: &str,
        rollout: Option<&str>,
        action: &str,
        bundle: Option<&edgefleet_shared::Digest>,
        now: u64,
        audit: Option<Audit>,
    ) -> Result<u64> {
        let row: Vec<Value> = vec![
            device.into(),
            rollout.into(),
            action.into(),
            i(now).into(),
            bundle.map(edgefleet_shared::Digest::to_hex).into(),
        ];
        self.write(move |t| {
            let id: u64 = t
                .query_one(
                    "INSERT INTO commands (device, rollout, action, issued_at, bundle)
                     VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
                    &row,
                )?
                .get(0)?;
            // The record names the command it was written with.
            if let Some(mut a) = audit {
                let mut after = match a.after.take() {
                    Some(serde_json::Value::Object(m)) => m,
                    _ => serde_json::Map::new(),
                };
                after.insert("command".into(), id.into());
                a.after = Some(serde_json::Value::Object(after));
                write_audit(t, &a)?;
            }
            Ok(id)
        })
        .await
    }

    /// Whether `device` was ever sent an install command for `bundle`.
    pub async fn was_offered(
        &self,
        device: &str,
        bundle: &edgefleet_shared::Digest,
    ) -> Result<bool> {
        let (d, b) = (device.to_owned(), bundle.to_hex());
        self.read(move |t| {
            t.query_one(
                "SELECT EXISTS (SELECT 1 FROM commands WHERE device = ?1 AND bundle = ?2)",
                vals![d, b],
            )?
            .get(0)
        })
        .await
    }

    /// The action of command `id` if it was sent to `device`.
    pub async fn command_action(&self, device: &str, id: u64) -> Result<Option<String>> {
        Ok(self.command_of(device, id).await?.map(|(action, _)| action))
    }

    /// The action and rollout of command `id` sent to `device`, if it was.
    pub async fn command_of(
        &self,
        device: &str,
        id: u64,
    ) -> Result<Option<(String, Option<String>)>> {
        let device = device.to_owned();
        self.read(move |t| {
            t.query_opt(
                "SELECT action, rollout FROM commands WHERE id = ?1 AND device = ?2",
                vals![i(id), device],
            )?
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .transpose()
        })
        .await
    }

    /// Commands sent to a device: how many per action (for tests and the API).
    pub async fn command_counts(&self, device: &str) -> Result<BTreeMap<String, u64>> {
        let d = device.to_owned();
        self.read(move |t| {
            t.query(
                "SELECT action, COUNT(*) FROM commands WHERE device = ?1 GROUP BY action",
                vals![d],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect()
        })
        .await
    }

    /// Stores a rollout step (commands, state, notes, audit) in one
    /// transaction, only while `fence`'s lease is held; returns the commands'
    /// ids in order (a command sent again keeps its id).
    pub async fn step_rollout(&self, step: RolloutStep, now: u64) -> Result<Vec<u64>> {
        self.write(move |t| {
            if let Some((lease, holder)) = &step.fence {
                // A no-op update of our own live lease: it fails if the lease
                // passed to another replica, and on PostgreSQL it locks the
                // row, so a takeover waits for this step's commit.
                let held = t.execute(
                    "UPDATE leases SET expires_at = expires_at
                     WHERE name = ?1 AND holder = ?2 AND expires_at >= ?3",
                    vals![*lease, holder.as_str(), i(now)],
                )?;
                if held != 1 {
                    return Err(DbError::LeaseLost(lease));
                }
            }
            let mut ids = Vec::with_capacity(step.commands.len());
            for c in &step.commands {
                let sent = if c.again {
                    t.query_opt(
                        "SELECT id FROM commands WHERE rollout = ?1 AND device = ?2 AND action = ?3
                         ORDER BY id DESC LIMIT 1",
                        vals![step.rollout.as_str(), c.device.as_str(), c.action],
                    )?
                } else {
                    None
                };
                let row = match sent {
                    Some(row) => row,
                    None => t.query_one(
                        "INSERT INTO commands (device, rollout, action, issued_at, bundle)
                         VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
                        vals![
                            c.device.as_str(),
                            step.rollout.as_str(),
                            c.action,
                            i(now),
                            c.bundle.as_ref().map(Digest::to_hex)
                        ],
                    )?,
                };
                ids.push(row.get(0)?);
            }
            if let Some((phase, state)) = step.state {
                t.execute(
                    "UPDATE rollouts SET phase = ?2, state = ?3, updated_at = ?4 WHERE id = ?1",
                    vals![step.rollout.as_str(), phase, state, i(now)],
                )?;
            }
            for n in step.notes {
                t.execute(
                    "INSERT INTO rollout_log (rollout, at, note) VALUES (?1, ?2, ?3)",
                    vals![step.rollout.as_str(), i(now), n],
                )?;
            }
            write_audit_opt(t, step.audit.as_ref())?;
            Ok(ids)
        })
        .await
    }

    // ----- leases ------------------------------------------------------------

    /// Takes or renews lease `name` for `holder` until `now + ttl_ms`: granted
    /// when it is free, expired, or already `holder`'s. Returns the lease as
    /// it stands afterwards (another replica's, when it was not granted).
    pub async fn take_lease(
        &self,
        name: &'static str,
        holder: &str,
        address: Option<String>,
        now: u64,
        ttl_ms: u64,
    ) -> Result<Lease> {
        let holder = holder.to_owned();
        self.write_lease(move |t| {
            t.execute(
                "INSERT INTO leases (name, holder, address, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET holder = ?2, address = ?3, expires_at = ?4
                 WHERE leases.holder = ?2 OR leases.expires_at < ?5",
                vals![
                    name,
                    holder.as_str(),
                    address,
                    i(now.saturating_add(ttl_ms)),
                    i(now)
                ],
            )?;
            lease_row(&t.query_one(
                "SELECT holder, address, expires_at FROM leases WHERE name = ?1",
                vals![name],
            )?)
        })
        .await
    }

    /// Gives lease `name` up if `holder` holds it (a replica shutting down):
    /// another takes it at its next try instead of after the expiry.
    pub async fn release_lease(&self, name: &'static str, holder: &str) -> Result<bool> {
        let holder = holder.to_owned();
        self.write_lease(move |t| {
            Ok(t.execute(
                "UPDATE leases SET expires_at = 0 WHERE name = ?1 AND holder = ?2",
                vals![name, holder],
            )? == 1)
        })
        .await
    }

    /// Lease `name` as it stands, if anyone ever took it.
    pub async fn lease(&self, name: &'static str) -> Result<Option<Lease>> {
        self.read(move |t| {
            t.query_opt(
                "SELECT holder, address, expires_at FROM leases WHERE name = ?1",
                vals![name],
            )?
            .as_ref()
            .map(lease_row)
            .transpose()
        })
        .await
    }

    // ----- audit and tokens ------------------------------------------------

    /// Records a change.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
        now: u64,
    ) -> Result<()> {
        let a = Audit {
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            before,
            after,
            at: now,
        };
        self.write(move |t| write_audit(t, &a)).await
    }

    /// The latest `limit` audit records, newest first.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>> {
        self.read(move |t| {
            t.query(
                "SELECT id, at, actor, action, target, before, after FROM audit ORDER BY id DESC LIMIT ?1",
                vals![limit],
            )?
            .iter()
            .map(|r| {
                Ok(AuditRow {
                    id: r.get(0)?,
                    at: u(r.get(1)?),
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    before: r.json(5)?,
                    after: r.json(6)?,
                })
            })
            .collect()
        })
        .await
    }

    /// Stores a token (by its SHA-256 only).
    pub async fn insert_token(
        &self,
        sha256: &str,
        name: &str,
        role: &str,
        now: u64,
        audit: Option<Audit>,
    ) -> Result<()> {
        let row: Vec<Value> = vec![sha256.into(), name.into(), role.into(), i(now).into()];
        self.write(move |t| {
            t.execute(
                "INSERT INTO tokens (sha256, name, role, created_at) VALUES (?1, ?2, ?3, ?4)",
                &row,
            )?;
            write_audit_opt(t, audit.as_ref())
        })
        .await
    }

    /// The (name, role) of the token with this SHA-256.
    pub async fn token(&self, sha256: &str) -> Result<Option<(String, String)>> {
        let h = sha256.to_owned();
        self.read(move |t| {
            t.query_opt("SELECT name, role FROM tokens WHERE sha256 = ?1", vals![h])?
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .transpose()
        })
        .await
    }

    /// Opens a dashboard session: its id's SHA-256, the SHA-256 of the token
    /// it acts as, its form token, until when (ms). Ended sessions go.
    pub async fn open_session(
        &self,
        sha256: &str,
        token: &str,
        csrf: &str,
        now: u64,
        expires_at: u64,
    ) -> Result<()> {
        let row: Vec<Value> = vec![
            sha256.into(),
            token.into(),
            csrf.into(),
            i(expires_at).into(),
        ];
        self.write(move |t| {
            t.execute("DELETE FROM sessions WHERE expires_at <= ?1", vals![i(now)])?;
            t.execute(
                "INSERT INTO sessions (sha256, token, csrf, expires_at) VALUES (?1, ?2, ?3, ?4)",
                &row,
            )?;
            Ok(())
        })
        .await
    }

    /// The (token name, role, form token) of a live session by its id's SHA-256.
    pub async fn session(
        &self,
        sha256: &str,
        now: u64,
    ) -> Result<Option<(String, String, String)>> {
        let args: Vec<Value> = vec![sha256.into(), i(now).into()];
        self.read(move |t| {
            t.query_opt(
                "SELECT t.name, t.role, s.csrf FROM sessions s JOIN tokens t ON t.sha256 = s.token
                 WHERE s.sha256 = ?1 AND s.expires_at > ?2",
                &args,
            )?
            .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .transpose()
        })
        .await
    }

    /// Ends a session.
    pub async fn close_session(&self, sha256: &str) -> Result<()> {
        let h = sha256.to_owned();
        self.write(move |t| {
            t.execute("DELETE FROM sessions WHERE sha256 = ?1", vals![h])?;
            Ok(())
        })
        .await
    }

    /// How many tokens exist.
    pub async fn token_count(&self) -> Result<u64> {
        self.read(|t| t.query_one("SELECT COUNT(*) FROM tokens", &[])?.get(0))
            .await
    }
}

/// The rows of one report: one per channel (see migration 13), each with
/// that channel's figures and the report as a one-channel device would have
/// sent it as its body.
fn telemetry_rows(t: &edgefleet_shared::protocol::Telemetry, received: u64) -> Vec<Vec<Value>> {
    if t.channels.is_empty() {
        return vec![telemetry_values(t, "", received)];
    }
    t.channels
        .iter()
        .map(|c| {
            let one = edgefleet_shared::protocol::Telemetry {
                model: c.model.clone(),
                drift: c.drift.clone(),
                shadow: c.shadow.clone(),
                channels: Vec::new(),
                ..t.clone()
            };
            telemetry_values(&one, c.channel.as_str(), received)
        })
        .collect()
}

fn telemetry_values(
    t: &edgefleet_shared::protocol::Telemetry,
    channel: &str,
    received: u64,
) -> Vec<Value> {
    let m = t.model.as_ref();
    let d = t.drift.as_ref().map(DriftSummary::of);
    vec![
        t.device.as_str().into(),
        i(t.seq).into(),
        t.at.0.into(),
        i(received).into(),
        m.map(|m| m.digest.to_hex()).into(),
        m.map(|m| i(m.inferences)).into(),
        m.map(|m| i(m.errors)).into(),
        m.map(|m| serde_json::to_string(&m.latency_counts).unwrap_or_default())
            .into(),
        f64::from(t.device_metrics.cpu_percent).into(),
        i(t.device_metrics.mem_used).into(),
        i(t.agent.rss_bytes).into(),
        serde_json::to_string(t).unwrap_or_default().into(),
        d.as_ref().map(|d| i(d.rows)).into(),
        d.as_ref().map(|d| d.drifted_share).into(),
        d.as_ref().map(|d| d.drifted).into(),
        d.as_ref()
            .map(|d| serde_json::to_string(&d.features).unwrap_or_default())
            .into(),
        t.shadow
            .as_ref()
            .map(|s| serde_json::to_string(s).unwrap_or_default())
            .into(),
        bits(t.epoch).into(),
        i(t.agent.spool_dropped).into(),
        channel.into(),
    ]
}

fn lease_row(r: &Row) -> Result<Lease> {
    Ok(Lease {
        holder: r.get(0)?,
        address: r.get(1)?,
        expires_at: r.get(2)?,
    })
}

fn bundle_row(r: &Row) -> Result<BundleRow> {
    Ok(BundleRow {
        digest: r.id(0)?,
        channel: r.get(1)?,
        version: r.get(2)?,
        release: u(r.get(3)?),
        size: u(r.get(4)?),
        chunks: r.get(5)?,
        created_at: u(r.get(6)?),
        expires_at: u(r.get(7)?),
        uploaded_at: u(r.get(8)?),
        uploaded_by: r.get(9)?,
        summary: r.json(10)?.unwrap_or_default(),
    })
}

fn telemetry_row(r: &Row) -> Result<TelemetryRow> {
    Ok(TelemetryRow {
        device: r.id(0)?,
        seq: u(r.get(1)?),
        at: u(r.get(2)?),
        received_at: u(r.get(3)?),
        digest: r.id_or_none(4)?,
        inferences: r.get::<Option<i64>>(5)?.map(u),
        errors: r.get::<Option<i64>>(6)?.map(u),
        latency_counts: r.json(7)?,
        cpu_percent: r.get(8)?,
        mem_used: r.get::<Option<i64>>(9)?.map(u),
        rss_bytes: r.get::<Option<i64>>(10)?.map(u),
        drift: match (
            r.get::<Option<i64>>(11)?,
            r.get::<Option<f64>>(12)?,
            r.get::<Option<bool>>(13)?,
        ) {
            (Some(rows), Some(drifted_share), Some(drifted)) => Some(DriftSummary {
                rows: u(rows),
                drifted_share,
                drifted,
                features: r.json(14)?.unwrap_or_default(),
            }),
            _ => None,
        },
        shadow: r.json(15)?,
        spool_dropped: r.get::<Option<i64>>(16)?.map(u),
    })
}
fn event_row(r: &Row) -> Result<EventRow> {
    Ok(EventRow {
        device: r.id(0)?,
        seq: u(r.get(1)?),
        at: u(r.get(2)?),
        command: r.get::<Option<i64>>(3)?.map(u),
        kind: r.get(4)?,
        digest: r.id_or_none(5)?,
        body: r.json(6)?.unwrap_or_default(),
    })
}

/// The bundle an event is about.
pub fn event_digest(
    kind: &edgefleet_shared::protocol::EventKind,
) -> Option<edgefleet_shared::Digest> {
    use edgefleet_shared::protocol::EventKind as K;
    match kind {
        K::InstallStarted { digest }
        | K::InstallProgress { digest, .. }
        | K::InstallSucceeded { digest, .. }
        | K::InstallFailed { digest, .. }
        | K::Activated { digest, .. }
        | K::Reverted { digest, .. }
        | K::DriftAlert { digest, .. }
        | K::AgentUpdated { digest, .. }
        | K::AgentUpdateFailed { digest, .. } => Some(*digest),
        K::CommandRejected { .. } | K::Removed { .. } => None,
    }
}

#[cfg(test)]
mod tests;
