//! MQTT topics and the CBOR messages that travel on them (see `docs/protocol.md`).
//!
//! Every payload is an envelope `{ "v": 1, "m": <message> }`. Each message type has
//! its own size cap, checked before decoding; decoders never panic.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::bundle::{MAX_HEADER_LEN, Refusal};
use crate::cbor::{self, DecodeError};
use crate::ids::{Arch, DeviceId, Digest, InvalidId, ModelChannel};
use crate::manifest::MAX_CHUNK_SIZE;
use crate::time::UnixTime;

/// Protocol version carried in every envelope.
pub const PROTOCOL_VERSION: u16 = 1;
/// Most model channels one device serves (each with its own A/B slots).
pub const MAX_DEVICE_CHANNELS: usize = 16;
/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "edgefleet/v1";

/// A message type of the protocol: its name, its cap, and its own validity rules.
pub trait Message: Serialize + DeserializeOwned {
    /// Name used in errors.
    const NAME: &'static str;
    /// Largest encoded envelope accepted.
    const MAX_LEN: usize;
    /// Rules beyond the types (counts, ranges). Default: none.
    fn validate(&self) -> Result<(), DecodeError> {
        Ok(())
    }
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u16,
    m: &'a T,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<T> {
    v: u16,
    m: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u16,
}

/// Encodes `msg` in its versioned envelope.
pub fn encode<T: Message>(msg: &T) -> Vec<u8> {
    cbor::to_vec(&EnvelopeRef {
        v: PROTOCOL_VERSION,
        m: msg,
    })
}

/// Decodes a versioned envelope holding a `T`, enforcing `T::MAX_LEN` first.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, DecodeError> {
    match cbor::from_slice::<Envelope<T>>(T::NAME, bytes, T::MAX_LEN) {
        Ok(env) if env.v == PROTOCOL_VERSION => {
            env.m.validate()?;
            Ok(env.m)
        }
        Ok(env) => Err(unsupported::<T>(env.v)),
        Err(e @ DecodeError::Malformed { .. }) => {
            // A message of another version may not fit this version's types:
            // report the version when it can be read, the decode error otherwise.
            match cbor::from_slice::<VersionOnly>(T::NAME, bytes, T::MAX_LEN) {
                Ok(VersionOnly { v }) if v != PROTOCOL_VERSION => Err(unsupported::<T>(v)),
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

fn unsupported<T: Message>(found: u16) -> DecodeError {
    DecodeError::UnsupportedVersion {
        what: T::NAME,
        found,
        supported: PROTOCOL_VERSION,
    }
}

fn invalid(what: &'static str, field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        what,
        field,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------

/// What a device topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceTopic {
    /// Controller → device: [`Command`]s.
    Commands,
    /// Device → controller, retained: [`DeviceState`].
    State,
    /// Device → controller: [`Event`]s.
    Events,
    /// Device → controller: [`Telemetry`].
    Telemetry,
    /// Device → controller: [`FetchRequest`]s for bundle chunks.
    Fetch,
    /// Device → controller: [`SampleUpload`]s.
    Samples,
    /// Controller → device: [`TelemetryAck`]s, the reports it has stored.
    Acks,
}

impl DeviceTopic {
    /// All device topics.
    pub const ALL: [DeviceTopic; 7] = [
        DeviceTopic::Commands,
        DeviceTopic::State,
        DeviceTopic::Events,
        DeviceTopic::Telemetry,
        DeviceTopic::Fetch,
        DeviceTopic::Samples,
        DeviceTopic::Acks,
    ];

    /// The last topic segment.
    pub fn segment(self) -> &'static str {
        match self {
            DeviceTopic::Commands => "cmd",
            DeviceTopic::State => "state",
            DeviceTopic::Events => "events",
            DeviceTopic::Telemetry => "telemetry",
            DeviceTopic::Fetch => "fetch",
            DeviceTopic::Samples => "samples",
            DeviceTopic::Acks => "ack",
        }
    }

    /// True when the device publishes on it (the others it only subscribes to).
    pub fn device_publishes(self) -> bool {
        !matches!(self, DeviceTopic::Commands | DeviceTopic::Acks)
    }
}

/// A parsed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `{prefix}/devices/{device}/{kind}`.
    Device {
        /// The device named in the topic.
        device: DeviceId,
        /// Which stream.
        kind: DeviceTopic,
    },
    /// `{prefix}/bundles/{digest}/chunks`: chunks of one bundle, shared by every
    /// device downloading it.
    BundleChunks {
        /// Manifest digest of the bundle.
        bundle: Digest,
    },
}

/// The topic scheme under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            prefix: DEFAULT_PREFIX.into(),
        }
    }
}

impl Topics {
    /// A scheme rooted at `prefix`: 1-64 characters of `[A-Za-z0-9_-]` in segments
    /// separated by single `/`, no wildcards, no leading or trailing `/`.
    pub fn new(prefix: &str) -> Result<Topics, InvalidId> {
        let bad = |reason| InvalidId {
            kind: "topic prefix",
            value: prefix.chars().take(80).collect(),
            reason,
        };
        if prefix.is_empty() || prefix.len() > 64 {
            return Err(bad("must be 1 to 64 characters"));
        }
        for seg in prefix.split('/') {
            let ok = !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(bad(
                    "segments must be non-empty and use only letters, digits, '-' and '_'",
                ));
            }
        }
        Ok(Topics {
            prefix: prefix.into(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A device's topic.
    pub fn device(&self, device: &DeviceId, kind: DeviceTopic) -> String {
        format!("{}/devices/{device}/{}", self.prefix, kind.segment())
    }

    /// The chunk topic of a bundle.
    pub fn bundle_chunks(&self, bundle: &Digest) -> String {
        format!("{}/bundles/{bundle}/chunks", self.prefix)
    }

    /// Subscription filter for everything devices publish (controller side).
    pub fn all_devices_filter(&self, kind: DeviceTopic) -> String {
        format!("{}/devices/+/{}", self.prefix, kind.segment())
    }

    /// Parses a concrete topic under this prefix. `None` for anything else.
    pub fn parse(&self, topic: &str) -> Option<Topic> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let (a, b, c) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        match a {
            "devices" => {
                let device = DeviceId::new(b).ok()?;
                let kind = DeviceTopic::ALL.into_iter().find(|k| k.segment() == c)?;
                Some(Topic::Device { device, kind })
            }
            "bundles" if c == "chunks" => Some(Topic::BundleChunks {
                bundle: b.parse().ok()?,
            }),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Commands (controller → device)
// ---------------------------------------------------------------------------

/// How an installed bundle is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallMode {
    /// Verify, health-check, then activate.
    Activate,
    /// Verify and health-check into the inactive slot; activate on a later command.
    Stage,
    /// Like `stage`, and run beside the active model on sampled live requests.
    Shadow,
}

/// Everything a device needs to fetch and check a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleOffer {
    /// Manifest digest (the bundle's identity; also the chunk topic).
    pub digest: Digest,
    /// The bundle's header bytes exactly as in the file (preamble, manifest,
    /// signatures); the device verifies it before fetching any chunk.
    #[serde(with = "serde_bytes")]
    pub header: Vec<u8>,
}

/// A command's action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Download, verify, install into the inactive slot.
    Install {
        /// The bundle.
        bundle: BundleOffer,
        /// What to do once it is healthy.
        mode: InstallMode,
    },
    /// Activate the staged bundle with this digest.
    Activate {
        /// Manifest digest of the staged bundle.
        digest: Digest,
    },
    /// Switch back to the previous slot of the device's only channel (as
    /// protocol 1 had it; refused by a device serving several channels).
    Revert,
    /// Switch one channel back to its previous slot.
    RevertChannel {
        /// The channel.
        channel: ModelChannel,
    },
    /// Uninstall one channel (its bundles are removed; its release floor stays).
    Remove {
        /// The channel.
        channel: ModelChannel,
    },
    /// Change settings at run time.
    Configure(Settings),
    /// Upload captured input samples for a channel.
    RequestSamples {
        /// Which model.
        channel: ModelChannel,
        /// At most this many samples.
        max_samples: u32,
    },
    /// Replace the agent's own binary with an agent release (docs/agent-update.md):
    /// verify the header with the trust root's agent-release role, fetch the
    /// chunks of this device's architecture, probe, hand over, confirm.
    UpdateAgent {
        /// The agent release.
        release: BundleOffer,
    },
}

/// Settings a controller may change; absent fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Telemetry period in seconds (1..=86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_interval_s: Option<u32>,
    /// Share of live requests also run by a shadow model, in per mille (0..=1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_sample_permille: Option<u16>,
    /// Whether to capture input samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_capture: Option<bool>,
}

/// A command to one device. It travels signed, inside a
/// [`crate::commands::SignedCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Controller-assigned id, increasing in the order commands are issued;
    /// events that answer it carry it.
    pub id: u64,
    /// When the controller issued it.
    pub issued_at: UnixTime,
    /// The device it is for (inside the signed bytes: a command signed for one
    /// device cannot be replayed to another).
    pub device: DeviceId,
    /// What to do.
    pub action: Action,
}

impl Message for Command {
    const NAME: &'static str = "command";
    const MAX_LEN: usize = MAX_HEADER_LEN + 4096;
    fn validate(&self) -> Result<(), DecodeError> {
        match &self.action {
            Action::Install { bundle, .. } if bundle.header.len() > MAX_HEADER_LEN => Err(invalid(
                Self::NAME,
                "action.install.bundle.header",
                format!("is over {MAX_HEADER_LEN} bytes"),
            )),
            Action::Configure(s) => {
                if s.telemetry_interval_s
                    .is_some_and(|t| !(1..=86_400).contains(&t))
                {
                    return Err(invalid(
                        Self::NAME,
                        "action.configure.telemetry_interval_s",
                        "must be 1..=86400",
                    ));
                }
                if s.shadow_sample_permille.is_some_and(|p| p > 1000) {
                    return Err(invalid(
                        Self::NAME,
                        "action.configure.shadow_sample_permille",
                        "must be 0..=1000",
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------
// Device state (device → controller, retained)
// ---------------------------------------------------------------------------

/// One of the two model slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// Identity of an installed bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRef {
    /// Manifest digest.
    pub digest: Digest,
    /// Model channel.
    pub channel: ModelChannel,
    /// Semantic version.
    pub version: String,
    /// Release number.
    pub release: u64,
}

/// What a slot holds and how it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotRole {
    /// Answers inference requests.
    Active,
    /// Installed and healthy, waiting for `activate`.
    Staged,
    /// Runs beside the active model on sampled requests.
    Shadow,
    /// The previously active bundle, kept for `revert`.
    Previous,
}

/// One slot's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotState {
    /// Which slot.
    pub slot: Slot,
    /// Its bundle.
    pub bundle: BundleRef,
    /// Its role.
    pub role: SlotRole,
}

/// Why an install did not complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum FailureReason {
    /// The bundle was refused by the contract's rules.
    Refused {
        /// The refusal.
        refusal: Refusal,
    },
    /// Not enough disk or memory, found before downloading.
    Preflight {
        /// What was short.
        detail: String,
    },
    /// The download could not complete.
    Download {
        /// What went wrong.
        detail: String,
    },
    /// The model did not load.
    ModelLoad {
        /// Loader message.
        detail: String,
    },
    /// A golden case failed or ran over the latency budget.
    HealthCheck {
        /// Which case and why.
        detail: String,
    },
    /// A local error (disk, permissions).
    Internal {
        /// What went wrong.
        detail: String,
    },
}

/// How the trial of a new agent binary was lost (docs/agent-update.md); the old
/// agent runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum TrialFailure {
    /// The new agent had not confirmed by its deadline: it hung or was too slow
    /// (the alarm armed before the hand-over ended it).
    #[error("the new agent did not confirm within its deadline")]
    NoConfirmation,
    /// The new agent ended before its deadline without confirming.
    #[error("the new agent ended before confirming (it crashed or exited)")]
    Crashed,
    /// The device restarted after the new agent confirmed and before the switch
    /// was committed.
    #[error("the device restarted during the hand-over, before the switch was committed")]
    Interrupted,
}

/// Why an agent update did not take. The agent that was running before the
/// update is the one running after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum AgentUpdateFailure {
    /// The release was refused by the contract's rules (signatures of the
    /// agent-release role, floor, architecture, expiry).
    Refused {
        /// The refusal.
        refusal: Refusal,
    },
    /// The download could not complete.
    Download {
        /// What went wrong.
        detail: String,
    },
    /// The new binary failed its probe (`--version`, `config check`).
    Probe {
        /// What it answered.
        detail: String,
    },
    /// The new agent started and lost its trial.
    Trial {
        /// How.
        failure: TrialFailure,
    },
    /// No supervisor would bring the old agent back if the new one failed.
    Unsupervised,
    /// A local error (disk, permissions).
    Internal {
        /// What went wrong.
        detail: String,
    },
}

/// Result of the last install attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallResult {
    /// The bundle.
    pub digest: Digest,
    /// When it finished.
    pub at: UnixTime,
    /// `None` on success.
    pub failure: Option<FailureReason>,
}

/// A device's state, published retained so the controller always has the latest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// The device.
    pub device: DeviceId,
    /// When it was published.
    pub at: UnixTime,
    /// `false` in the broker's last-will message.
    pub online: bool,
    /// Agent version.
    pub agent_version: String,
    /// CPU architecture.
    pub arch: Arch,
    /// Slots in use, of every channel (each names its bundle's channel).
    pub slots: Vec<SlotState>,
    /// The last install attempt.
    pub last_install: Option<InstallResult>,
}

impl Message for DeviceState {
    const NAME: &'static str = "device state";
    const MAX_LEN: usize = 64 * 1024;
    fn validate(&self) -> Result<(), DecodeError> {
        if self.slots.len() > 2 * MAX_DEVICE_CHANNELS {
            return Err(invalid(
                Self::NAME,
                "slots",
                format!("two slots per channel, at most {MAX_DEVICE_CHANNELS} channels"),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Events (device → controller)
// ---------------------------------------------------------------------------

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The device accepted an install command and verified the header.
    InstallStarted {
        /// The bundle.
        digest: Digest,
    },
    /// Download progress.
    InstallProgress {
        /// The bundle.
        digest: Digest,
        /// Chunks verified and stored.
        chunks_done: u32,
        /// Chunks in total.
        chunks_total: u32,
    },
    /// Installed and healthy.
    InstallSucceeded {
        /// The bundle.
        digest: Digest,
        /// The slot it went into.
        slot: Slot,
        /// Whether it is now active.
        activated: bool,
    },
    /// The install failed; the active slot is untouched.
    InstallFailed {
        /// The bundle.
        digest: Digest,
        /// Why.
        reason: FailureReason,
    },
    /// A bundle became active.
    Activated {
        /// The bundle.
        digest: Digest,
        /// Its slot.
        slot: Slot,
    },
    /// The device went back to the previous slot.
    Reverted {
        /// The bundle now active.
        digest: Digest,
        /// Its slot.
        slot: Slot,
    },
    /// A channel was uninstalled.
    Removed {
        /// The channel.
        channel: ModelChannel,
    },
    /// The new agent confirmed and the switch is committed: sent by the new
    /// agent, the only moment a device counts as updated.
    AgentUpdated {
        /// The agent release.
        digest: Digest,
        /// The version now running.
        version: String,
        /// Its release number.
        release: u64,
    },
    /// An agent update did not take; the previous agent runs.
    AgentUpdateFailed {
        /// The agent release.
        digest: Digest,
        /// Why.
        reason: AgentUpdateFailure,
    },
    /// A command could not be carried out.
    CommandRejected {
        /// Why.
        detail: String,
    },
    /// The set of drifted features of the active bundle's window changed (a
    /// feature crossed its threshold, either way). An empty `features` list
    /// means the drift cleared.
    DriftAlert {
        /// The bundle.
        digest: Digest,
        /// Rows in the window.
        rows: u64,
        /// Drifted inputs and outputs, by name (at most 64 listed).
        features: Vec<String>,
        /// Share of drifted input features.
        drifted_share: f64,
        /// Whether the window counts as drifted (see [`DriftReport::drifted`]).
        drifted: bool,
    },
}

/// An event, numbered per device so gaps are visible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The device.
    pub device: DeviceId,
    /// Which run of the device's event counter `seq` belongs to: a random
    /// number drawn when the counter starts at 1 (first start, reflash, a lost
    /// spool), so a restarted counter is not taken for redeliveries. 0: a
    /// sender from before epochs.
    #[serde(default)]
    pub epoch: u64,
    /// Per-device sequence number.
    pub seq: u64,
    /// When it happened.
    pub at: UnixTime,
    /// The command it answers, if any.
    pub command: Option<u64>,
    /// What happened.
    pub kind: EventKind,
}

impl Message for Event {
    const NAME: &'static str = "event";
    const MAX_LEN: usize = 64 * 1024;
    fn validate(&self) -> Result<(), DecodeError> {
        if let EventKind::DriftAlert {
            features,
            drifted_share,
            ..
        } = &self.kind
        {
            if features.len() > 64 || features.iter().any(|f| f.is_empty() || f.len() > 128) {
                return Err(invalid(
                    Self::NAME,
                    "kind.features",
                    "at most 64 names of 1 to 128 bytes",
                ));
            }
            if !(0.0..=1.0).contains(drifted_share) {
                return Err(invalid(
                    Self::NAME,
                    "kind.drifted_share",
                    "must be in [0, 1]",
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Telemetry (device → controller)
// ---------------------------------------------------------------------------

/// Device health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMetrics {
    /// CPU use over the period, percent of all cores.
    pub cpu_percent: f32,
    /// Memory used, bytes.
    pub mem_used: u64,
    /// Memory total, bytes.
    pub mem_total: u64,
    /// Free disk in the data directory's filesystem, bytes.
    pub disk_free: u64,
    /// Size of that filesystem, bytes.
    pub disk_total: u64,
    /// Temperature, when the device has a sensor.
    pub temperature_c: Option<f32>,
    /// Seconds since boot.
    pub uptime_s: u64,
}

/// Agent health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentMetrics {
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Agent version.
    pub version: String,
    /// Telemetry records dropped, ever, because the offline spool was full.
    pub spool_dropped: u64,
}

/// Inference counters of the active model over the period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMetrics {
    /// The active bundle.
    pub digest: Digest,
    /// Requests answered.
    pub inferences: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Upper bounds of the latency buckets, microseconds.
    pub latency_bounds_us: Vec<u64>,
    /// Count per bucket (one more than bounds: the overflow bucket).
    pub latency_counts: Vec<u64>,
}

/// The shadow model's record over the requests it was run on (counters since it
/// was loaded): how often it agreed with the active model, and both latencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowMetrics {
    /// The shadow bundle.
    pub digest: Digest,
    /// Requests it was run on.
    pub runs: u64,
    /// Of those, answers that agreed with the active model's (same class for
    /// integer outputs, else every float output within the shadow bundle's
    /// health-check tolerance).
    pub agreed: u64,
    /// Runs that failed.
    pub errors: u64,
    /// Sampled requests not run because a shadow run was still busy.
    pub skipped: u64,
    /// Shadow latency per bucket of [`ModelMetrics::latency_bounds_us`] (+1 overflow).
    pub latency_counts: Vec<u64>,
    /// The active model's latency on the same requests, same buckets.
    pub active_latency_counts: Vec<u64>,
}

/// The two-sample test behind a drift score's p-value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftTest {
    /// Kolmogorov-Smirnov (numeric features).
    KolmogorovSmirnov,
    /// Pearson's chi-square (categorical features, predicted classes).
    ChiSquare,
}

/// Drift of one input feature or output against the bundle's reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftScore {
    /// Feature name (a reference column, or an output such as `probabilities[1]`).
    pub feature: String,
    /// Values in the window.
    pub count: u64,
    /// Population stability index.
    pub psi: f64,
    /// The two-sample test.
    pub test: DriftTest,
    /// Its statistic (KS D, or chi-square).
    pub statistic: f64,
    /// Its p-value.
    pub p_value: f64,
    /// Wasserstein-1 over the reference's standard deviation (numeric only).
    pub wasserstein: Option<f64>,
    /// Jensen-Shannon distance (outputs only).
    pub jensen_shannon: Option<f64>,
    /// Whether PSI or the test crossed the bundle's threshold.
    pub drifted: bool,
}

/// Drift of one window of served requests on the active bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftReport {
    /// The bundle whose reference the window is compared with.
    pub digest: Digest,
    /// Window number since the bundle became active (0 first).
    pub window: u64,
    /// Device time of the window's first row.
    pub started: UnixTime,
    /// Rows (one per input row of each request) in the window.
    pub rows: u64,
    /// Whether the window is complete (else it is still filling).
    pub closed: bool,
    /// Per input feature.
    pub inputs: Vec<DriftScore>,
    /// Per output.
    pub outputs: Vec<DriftScore>,
    /// Share of drifted input features.
    pub drifted_share: f64,
    /// The window counts as drifted: the share of drifted inputs, or of drifted
    /// outputs, reached the bundle's `drifted_share` threshold.
    pub drifted: bool,
}

impl DriftReport {
    /// Most scores in one report.
    pub const MAX_SCORES: usize = 1024;

    fn validate(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.inputs.len() + self.outputs.len() > Self::MAX_SCORES {
            return Err(invalid(what, "drift", "at most 1024 scores"));
        }
        if !(0.0..=1.0).contains(&self.drifted_share) {
            return Err(invalid(what, "drift.drifted_share", "must be in [0, 1]"));
        }
        for s in self.inputs.iter().chain(&self.outputs) {
            if s.feature.is_empty() || s.feature.len() > 128 {
                return Err(invalid(what, "drift.feature", "1 to 128 bytes"));
            }
            if !(s.psi.is_finite()
                && s.statistic.is_finite()
                && (0.0..=1.0).contains(&s.p_value)
                && s.wasserstein.is_none_or(f64::is_finite)
                && s.jensen_shannon.is_none_or(f64::is_finite))
            {
                return Err(invalid(
                    what,
                    "drift.psi",
                    format!(
                        "`{}`: psi, statistic and distances finite, p-value in [0, 1]",
                        s.feature
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A periodic report, numbered per device so gaps are visible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// The device.
    pub device: DeviceId,
    /// Which run of the device's telemetry counter `seq` belongs to (as
    /// [`Event::epoch`]).
    #[serde(default)]
    pub epoch: u64,
    /// Per-device sequence number.
    pub seq: u64,
    /// When it was measured.
    pub at: UnixTime,
    /// Device health.
    pub device_metrics: DeviceMetrics,
    /// Agent health.
    pub agent: AgentMetrics,
    /// Active model counters.
    pub model: Option<ModelMetrics>,
    /// Drift of the active bundle's latest window with enough rows to judge.
    pub drift: Option<DriftReport>,
    /// The shadow model, when one runs beside the active one.
    #[serde(default)]
    pub shadow: Option<ShadowMetrics>,
    /// Every channel's model, drift and shadow, when the device serves more
    /// than one channel; `model`, `drift` and `shadow` above are then empty.
    /// A device with one channel leaves this empty and fills those (as
    /// protocol 1 had it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<ChannelTelemetry>,
}

/// One channel's part of [`Telemetry`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelTelemetry {
    /// The channel.
    pub channel: ModelChannel,
    /// Its active model's counters.
    pub model: Option<ModelMetrics>,
    /// Drift of its active bundle's latest judged window.
    pub drift: Option<DriftReport>,
    /// Its shadow model.
    pub shadow: Option<ShadowMetrics>,
}

impl ChannelParts<'_> {
    fn validate(&self) -> Result<(), DecodeError> {
        const NAME: &str = Telemetry::NAME;
        if let Some(m) = self.model
            && (m.latency_bounds_us.len() > 64
                || m.latency_counts.len() != m.latency_bounds_us.len() + 1)
        {
            return Err(invalid(
                NAME,
                "model.latency_counts",
                "needs one count per bound plus one, at most 64 bounds",
            ));
        }
        if let Some(d) = self.drift {
            d.validate(NAME)?;
        }
        if let Some(sh) = self.shadow
            && (sh.latency_counts.len() > 65
                || sh.active_latency_counts.len() > 65
                || sh.agreed > sh.runs)
        {
            return Err(invalid(
                NAME,
                "shadow",
                "at most 65 latency buckets, agreed at most runs",
            ));
        }
        Ok(())
    }
}

impl Telemetry {
    /// Every channel's part: `channels`, or the one-channel fields as one
    /// part (channel unknown: `None`) when `channels` is empty.
    pub fn channel_parts(&self) -> Vec<(Option<&ModelChannel>, ChannelParts<'_>)> {
        if self.channels.is_empty() {
            return vec![(
                None,
                ChannelParts {
                    model: self.model.as_ref(),
                    drift: self.drift.as_ref(),
                    shadow: self.shadow.as_ref(),
                },
            )];
        }
        self.channels
            .iter()
            .map(|c| {
                (
                    Some(&c.channel),
                    ChannelParts {
                        model: c.model.as_ref(),
                        drift: c.drift.as_ref(),
                        shadow: c.shadow.as_ref(),
                    },
                )
            })
            .collect()
    }
}

/// One channel's figures in a [`Telemetry`], borrowed.
#[derive(Debug, Clone, Copy)]
pub struct ChannelParts<'a> {
    /// The active model's counters.
    pub model: Option<&'a ModelMetrics>,
    /// Drift.
    pub drift: Option<&'a DriftReport>,
    /// The shadow model.
    pub shadow: Option<&'a ShadowMetrics>,
}

impl Message for Telemetry {
    const NAME: &'static str = "telemetry";
    const MAX_LEN: usize = 256 * 1024;
    fn validate(&self) -> Result<(), DecodeError> {
        if self.channels.len() > MAX_DEVICE_CHANNELS {
            return Err(invalid(
                Self::NAME,
                "channels",
                format!("at most {MAX_DEVICE_CHANNELS}"),
            ));
        }
        if !self.channels.is_empty()
            && (self.model.is_some() || self.drift.is_some() || self.shadow.is_some())
        {
            return Err(invalid(
                Self::NAME,
                "channels",
                "with channels, model, drift and shadow must be empty",
            ));
        }
        for (_, parts) in self.channel_parts() {
            parts.validate()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Bundle transfer
// ---------------------------------------------------------------------------

/// One chunk of a bundle's payload, on the bundle's chunk topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// Manifest digest of the bundle.
    pub bundle: Digest,
    /// Zero-based chunk index.
    pub index: u32,
    /// The chunk's bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Message for Chunk {
    const NAME: &'static str = "chunk";
    const MAX_LEN: usize = MAX_CHUNK_SIZE as usize + 1024;
}

/// A run of chunks: `start` and the `count` after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRange {
    /// First chunk index.
    pub start: u32,
    /// Number of chunks (1..).
    pub count: u32,
}

/// The controller has stored these telemetry reports of a device (its
/// `epoch` and their sequence numbers). A device that has seen one keeps each
/// report until it is acknowledged this way, not only until the broker took
/// it, and sends again what stays unacknowledged: a controller replica killed
/// between receiving reports and storing them loses none (docs/protocol.md).
/// Not signed: a forged acknowledgement can only make a device forget
/// telemetry, and only the controller may publish on the topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryAck {
    /// The reports' spool epoch ([`Telemetry::epoch`]).
    pub epoch: u64,
    /// Their sequence numbers, 1 to [`TelemetryAck::MAX_SEQS`].
    pub seqs: Vec<u64>,
}

impl TelemetryAck {
    /// Most sequence numbers in one acknowledgement.
    pub const MAX_SEQS: usize = 1024;
}

impl Message for TelemetryAck {
    const NAME: &'static str = "telemetry ack";
    const MAX_LEN: usize = 16 * 1024;
    fn validate(&self) -> Result<(), DecodeError> {
        if self.seqs.is_empty() || self.seqs.len() > Self::MAX_SEQS {
            return Err(invalid(
                Self::NAME,
                "seqs",
                format!("must hold 1 to {} sequence numbers", Self::MAX_SEQS),
            ));
        }
        Ok(())
    }
}

/// A device asks for chunks it does not have (first request, or resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// Manifest digest of the bundle.
    pub bundle: Digest,
    /// Missing chunks, at most 64 ranges.
    pub ranges: Vec<ChunkRange>,
}

impl Message for FetchRequest {
    const NAME: &'static str = "fetch request";
    const MAX_LEN: usize = 4096;
    fn validate(&self) -> Result<(), DecodeError> {
        if self.ranges.is_empty() || self.ranges.len() > 64 {
            return Err(invalid(Self::NAME, "ranges", "must hold 1 to 64 ranges"));
        }
        if self
            .ranges
            .iter()
            .any(|r| r.count == 0 || r.start.checked_add(r.count).is_none())
        {
            return Err(invalid(
                Self::NAME,
                "ranges",
                "each range needs a count of at least 1 and must not overflow",
            ));
        }
        Ok(())
    }
}

/// Why a request was kept in the sample reservoir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureReason {
    /// Capture of every request (a share kept by reservoir sampling).
    Always,
    /// The drift window was drifted when the request came.
    Drift,
    /// The model's top class probability was below the configured confidence.
    LowConfidence,
}

/// One captured request: its inputs and the model's outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturedSample {
    /// Device time of the request.
    pub at: UnixTime,
    /// Why it was kept.
    pub reason: CaptureReason,
    /// The request's input tensors.
    pub inputs: Vec<crate::golden::Tensor>,
    /// The active model's answer.
    pub outputs: Vec<crate::golden::Tensor>,
}

/// The samples of one upload: the CBOR that a [`SampleUpload`]'s parts carry,
/// cut into byte ranges and joined again in `part` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleBatch {
    /// The bundle that answered.
    pub digest: Digest,
    /// The samples, oldest first.
    pub samples: Vec<CapturedSample>,
}

impl SampleBatch {
    /// Largest encoded batch accepted (all parts together).
    pub const MAX_LEN: usize = 16 * 1024 * 1024;
    /// Most samples in one batch.
    pub const MAX_SAMPLES: usize = 100_000;

    /// Encodes the batch.
    pub fn to_bytes(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// Decodes a joined batch, capped, and checks every tensor's shape matches
    /// its data.
    pub fn from_bytes(bytes: &[u8]) -> Result<SampleBatch, DecodeError> {
        let b: SampleBatch = cbor::from_slice("sample batch", bytes, Self::MAX_LEN)?;
        if b.samples.len() > Self::MAX_SAMPLES {
            return Err(invalid("sample batch", "samples", "at most 100000"));
        }
        for s in &b.samples {
            for t in s.inputs.iter().chain(&s.outputs) {
                let n = t
                    .shape
                    .iter()
                    .try_fold(1u64, |a, d| a.checked_mul(*d))
                    .unwrap_or(u64::MAX);
                if n != t.data.len() as u64 {
                    return Err(invalid(
                        "sample batch",
                        "samples.tensor",
                        format!("`{}`: shape {:?} does not match its data", t.name, t.shape),
                    ));
                }
            }
        }
        Ok(b)
    }
}

/// One part of a sample upload (see `docs/protocol.md`, "Samples").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleUpload {
    /// The command that requested it.
    pub command: u64,
    /// The bundle whose inputs were captured.
    pub digest: Digest,
    /// Part index (0-based).
    pub part: u32,
    /// Number of parts.
    pub parts: u32,
    /// CBOR-encoded samples of this part.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Message for SampleUpload {
    const NAME: &'static str = "sample upload";
    const MAX_LEN: usize = 1024 * 1024 + 1024;
    fn validate(&self) -> Result<(), DecodeError> {
        if self.parts == 0 || self.part >= self.parts {
            return Err(invalid(
                Self::NAME,
                "part",
                "must be below parts (and parts above 0)",
            ));
        }
        Ok(())
    }
}

// ----- latency histograms (the buckets of `ModelMetrics`) ------------------

/// Upper bounds (microseconds) of the latency buckets; one more bucket counts
/// everything above the last bound.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000,
];

/// The `q` quantile (0..=1) of a histogram, as the upper bound of the bucket that
/// holds it (the usual conservative estimate); None for an empty histogram. The
/// overflow bucket reports `u64::MAX`.
pub fn quantile_us(bounds: &[u64], counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bounds.get(i).copied().unwrap_or(u64::MAX));
        }
    }
    None
}

/// The `q` quantile (0..=1) of a histogram, interpolated linearly inside the
/// bucket that holds it (as Prometheus' `histogram_quantile` does; the first
/// bucket starts at 0); None for an empty histogram. In the overflow bucket it is
/// the last bound. What a ratio of two histograms is judged on: the upper-bound
/// estimate of [`quantile_us`] turns a small move across a bound (101 us
/// against 99 us) into a 2x step.
pub fn quantile_interpolated_us(bounds: &[u64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (seen + c) as f64 >= rank {
            let Some(&hi) = bounds.get(i) else {
                return Some(bounds.last().copied().unwrap_or(0) as f64);
            };
            let lo = if i == 0 { 0 } else { bounds[i - 1] };
            let within = ((rank - seen as f64) / c as f64).clamp(0.0, 1.0);
            return Some(lo as f64 + (hi - lo) as f64 * within);
        }
        seen += c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolated_quantiles_move_smoothly_across_a_bucket_bound() {
        let bounds = [100, 200, 500];
        // 100 in (0, 100], 100 in (100, 200].
        let counts = [100, 100, 0, 0];
        let q = |c: &[u64], q| quantile_interpolated_us(&bounds, c, q);
        assert_eq!(q(&counts, 0.25), Some(50.0));
        assert_eq!(q(&counts, 0.5), Some(100.0));
        assert_eq!(q(&counts, 0.75), Some(150.0));
        assert_eq!(q(&counts, 1.0), Some(200.0));
        assert_eq!(q(&counts, 0.0), Some(0.0));
        // Empty buckets are skipped, the overflow one reports the last bound.
        assert_eq!(q(&[0, 0, 10, 0], 0.5), Some(350.0));
        assert_eq!(q(&[0, 0, 0, 10], 0.95), Some(500.0));
        assert_eq!(q(&[0, 0, 0, 0], 0.5), None);
        // Just over a bound is just over it, where the upper-bound estimate
        // doubles: 95 of 100 at most 100 us, 5 just above.
        let near = [95, 5, 0, 0];
        assert_eq!(quantile_us(&bounds, &near, 0.96), Some(200));
        let p96 = q(&near, 0.96).unwrap_or(f64::NAN);
        assert!((120.0 - p96).abs() < 1e-9, "{p96}");
    }

    #[test]
    fn topics_name_the_device_and_parse_back() {
        let t = Topics::default();
        let dev = DeviceId::new("pi-01").ok();
        let Some(dev) = dev else { panic!("valid id") };
        for kind in DeviceTopic::ALL {
            let topic = t.device(&dev, kind);
            assert_eq!(
                t.parse(&topic),
                Some(Topic::Device {
                    device: dev.clone(),
                    kind
                })
            );
        }
        let d = Digest::of(b"x");
        assert_eq!(
            t.parse(&t.bundle_chunks(&d)),
            Some(Topic::BundleChunks { bundle: d })
        );
        assert_eq!(t.parse("edgefleet/v1/devices/+/state"), None);
        assert_eq!(t.parse("edgefleet/v1/devices/a/state/extra"), None);
        assert_eq!(t.parse("other/devices/a/state"), None);
        assert!(Topics::new("a/#").is_err());
        assert!(Topics::new("a//b").is_err());
        assert!(Topics::new("/a").is_err());
    }

    #[test]
    fn a_message_of_a_future_version_is_reported_as_such() {
        #[derive(Serialize)]
        struct Future {
            v: u16,
            m: String,
        }
        let bytes = cbor::to_vec(&Future {
            v: 7,
            m: "something new".into(),
        });
        assert_eq!(
            decode::<Event>(&bytes).err(),
            Some(DecodeError::UnsupportedVersion {
                what: "event",
                found: 7,
                supported: 1
            })
        );
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let bytes = vec![0u8; FetchRequest::MAX_LEN + 1];
        assert!(matches!(
            decode::<FetchRequest>(&bytes),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
