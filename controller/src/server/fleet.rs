//! The controller's side of the wire and the shell around the rollout engine:
//! ingest of device state, events and telemetry; chunk distribution; commands;
//! the rollout ticker. The decisions are in [`crate::server::engine`] and
//! [`wave_health`]; this module does the I/O.
//!
//! Chunks: devices downloading the same bundle all subscribe to its chunk topic, so
//! one publish serves every device that asked. Requests wait `chunk_coalesce_ms` in
//! a queue; requests for a chunk already queued are merged. A request is never
//! merged with a chunk already sent (the asker may have subscribed after it went),
//! but a chunk is sent again no sooner than [`REPEAT_HOLD_MS`] after its last send,
//! doubled for each repeat in a row up to 8 s: the devices of a large wave, told
//! over a second or two, ask at different times, and each request for a chunk still
//! on its way to them cost one more copy to the whole wave (20 copies to 900
//! devices, 67-82 to 9,000; docs/scale.md).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use edgefleet_agent::link::Brokers;
use edgefleet_shared::manifest::Manifest;
use edgefleet_shared::protocol::{
    self, Action, AgentUpdateFailure, BundleOffer, Chunk, Command, DeviceState, DeviceTopic, Event,
    EventKind, FailureReason, FetchRequest, InstallMode, Telemetry, TelemetryAck, Topics,
};
use edgefleet_shared::protocol::{LATENCY_BOUNDS_US, quantile_interpolated_us, quantile_us};
use edgefleet_shared::{DeviceId, Digest, RawHeader, UnixTime};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS, Transport};
use serde::Serialize;
use tokio::sync::{Mutex, mpsc};

use crate::server::db::{Db, DbError, Lease, RolloutStep, StepCommand, TelemetryRow};
use crate::server::engine::{Effect, Input, NotNow, Phase, Plan, PlanError, Rollout, WaveHealth};
mod ingest;
pub use ingest::IngestError;

use crate::server::fetch_limits::{ByteBudget, FetchRefusal, MAX_CHUNKS_PER_REQUEST};

/// Now, in ms since the epoch (the agent's clock reading).
pub use edgefleet_shared::time::now_ms;

/// Counters for `/metrics` and the benchmarks.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Messages received from devices.
    pub messages_in: AtomicU64,
    /// Messages refused (bad payload, or a topic naming another device).
    pub messages_refused: AtomicU64,
    /// Telemetry samples stored.
    pub telemetry_stored: AtomicU64,
    /// Chunks published.
    pub chunks_sent: AtomicU64,
    /// Chunk payload bytes published.
    pub chunk_bytes_sent: AtomicU64,
    /// Chunk requests merged into one already queued.
    pub chunk_requests_merged: AtomicU64,
    /// Fetch requests for a bundle the device was never told to install.
    pub fetch_refused_not_offered: AtomicU64,
    /// Fetch requests naming more than `MAX_CHUNKS_PER_REQUEST` chunks (the
    /// first ones are served).
    pub fetch_refused_too_many: AtomicU64,
    /// Fetch requests cut short by the device's byte budget.
    pub fetch_refused_rate: AtomicU64,
    /// Commands published.
    pub commands_sent: AtomicU64,
    /// Of those, unanswered commands published again (the same command, its
    /// id unchanged).
    pub commands_resent: AtomicU64,
    /// Events another replica stored that the rollout lease's holder applied
    /// from the store (it had not heard them itself).
    pub events_claimed: AtomicU64,
    /// Install failures reported by devices.
    pub install_failures: AtomicU64,
    /// Fleet-level drift alerts raised.
    pub drift_alerts: AtomicU64,
}

/// How long after another replica stored an event the holder applies it from
/// the store, if its own copy has not come: its own copy normally comes within
/// milliseconds of the other's.
const EVENT_GRACE_MS: u64 = 2_000;

/// Events waiting to be stored (the ingest task waits when it is full).
const EVENT_QUEUE: usize = 65_536;

/// Events stored in one transaction at most.
const EVENT_BATCH: usize = 512;

/// Retained states waiting to be stored (the ingest task waits when it is
/// full), and how many are stored in one transaction at most.
const STATE_QUEUE: usize = 65_536;
const STATE_BATCH: usize = 512;

/// `first` and what else is queued in `rx` right now, `max` at most: a batch
/// of one when messages come one at a time, many when they come at once.
fn take_batch<T>(first: T, rx: &mut mpsc::Receiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(x) => batch.push(x),
            Err(_) => break,
        }
    }
    batch
}

/// A command an engine step sends.
struct Outgoing {
    device: DeviceId,
    action: Action,
    /// The same command again (`Effect::Resend`).
    again: bool,
}

/// A stored bundle, as the chunk server reads it.
#[derive(Debug)]
struct StoredBundle {
    file: fs::File,
    header_len: u64,
    header: Vec<u8>,
    manifest: Manifest,
}

impl StoredBundle {
    /// Whether this is an agent release (rolled out with `update_agent`).
    fn is_agent_release(&self) -> bool {
        self.manifest.kind == edgefleet_shared::manifest::AGENT_RELEASE_TYPE
    }

    /// The stored file's header; None (logged) when it cannot be read, as for
    /// a bundle this controller does not hold.
    fn open(path: &Path) -> Option<StoredBundle> {
        let read = || -> Result<_, Box<dyn std::error::Error>> {
            let mut file = fs::File::open(path)?;
            let raw = RawHeader::read_from(&mut file)?;
            let manifest = raw.decode_unverified()?;
            Ok((file, raw, manifest))
        };
        let (file, raw, manifest) = match read() {
            Ok(opened) => opened,
            Err(e) => {
                if path.exists() {
                    tracing::error!(path = %path.display(), error = %e, "a stored bundle is unreadable");
                }
                return None;
            }
        };
        let header = raw.to_bytes();
        Some(StoredBundle {
            file,
            header_len: header.len() as u64,
            header,
            manifest,
        })
    }

    fn chunk(&self, index: u32) -> Option<Vec<u8>> {
        let (start, end) = self.manifest.payload.chunk_range(index)?;
        let mut buf = vec![0u8; usize::try_from(end - start).ok()?];
        self.file
            .read_exact_at(&mut buf, self.header_len + start)
            .ok()?;
        Some(buf)
    }
}

/// A running rollout.
#[derive(Debug)]
struct Active {
    engine: Rollout,
    digest: Digest,
    saved: String,
    /// Phase and wave as last stored, to audit the engine's own changes.
    audited: (&'static str, usize),
}

/// What the API asks of the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    /// Id.
    pub id: String,
    /// Bundle digest.
    pub bundle: Digest,
    /// Engine state.
    pub state: Rollout,
}

/// Why a fleet operation was refused or failed; the API maps each to its
/// status once (`From<FleetError> for ApiError`).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The store failed (the server's fault).
    #[error(transparent)]
    Db(#[from] DbError),
    /// A device id that is not one.
    #[error(transparent)]
    InvalidDevice(#[from] edgefleet_shared::ids::InvalidId),
    /// A bundle this controller does not hold.
    #[error("bundle {} is not stored on this controller (upload it first)", .0.to_hex())]
    UnknownBundle(Digest),
    /// A device already taken by a running rollout.
    #[error(
        "device {device} is already in rollout {rollout}, which is {phase}; pause or abort it first"
    )]
    DeviceInRollout {
        /// The device.
        device: DeviceId,
        /// The rollout it is in.
        rollout: String,
        /// That rollout's phase.
        phase: &'static str,
    },
    /// No rollout has this id.
    #[error("no rollout {0}")]
    UnknownRollout(String),
    /// The rollout is finished: no command applies.
    #[error("rollout {0} is finished")]
    RolloutFinished(String),
    /// The rollout's plan is not acceptable.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The command does not apply in the rollout's phase.
    #[error(transparent)]
    NotNow(#[from] NotNow),
    /// The system gave no randomness for a rollout id (the server's fault).
    #[error("no randomness for a rollout id: {0}")]
    Random(getrandom::Error),
    /// Rollouts run on another replica (it holds the rollout lease).
    #[error("rollouts run on replica {holder}{}; send this request there", .address.as_deref().map(|a| format!(" ({a})")).unwrap_or_default())]
    OtherReplica {
        /// The replica holding the lease ("nobody yet" before any took it).
        holder: String,
        /// Where its API answers, if it said.
        address: Option<String>,
    },
}

/// The lease whose holder runs every rollout's engine and serves chunks.
pub const ROLLOUT_LEASE: &str = "rollouts";

/// This controller as one of the replicas sharing a store (docs/scale.md,
/// "Replicas"). A lone controller is a replica too: its lease is renewed on
/// every tick and taken back at once after a restart (same name).
#[derive(Debug, Clone)]
pub struct Replica {
    /// Its name; replicas of one fleet each need their own.
    pub name: String,
    /// Where its API answers (shown to operators who ask another replica).
    pub address: Option<String>,
    /// How long the rollout lease lasts unless renewed, ms.
    pub lease_ms: u64,
    /// Telemetry, states and samples through the broker's shared
    /// subscriptions (`$share/edgefleet/...`): each message to one replica.
    pub shared_ingest: bool,
}

impl Default for Replica {
    fn default() -> Self {
        Replica {
            name: "controller".into(),
            address: None,
            lease_ms: 5_000,
            shared_ingest: false,
        }
    }
}

impl Replica {
    /// Its MQTT client id: the controller's identity, with the replica's
    /// name after it unless it is the default (two clients with one id
    /// would take the connection from each other).
    pub fn client_id(&self) -> String {
        let id = crate::server::ca::CONTROLLER_IDENTITY;
        if self.name == Replica::default().name {
            id.to_owned()
        } else {
            format!("{id}.{}", self.name)
        }
    }
}

/// How the fleet's tasks run.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Where bundle files are kept.
    pub bundles_dir: PathBuf,
    /// Rollout engine period.
    pub tick: Duration,
    /// Wait that merges requests for the same chunk.
    pub coalesce: Duration,
    /// Telemetry batches: at most this many samples, or this long.
    pub telemetry: (usize, Duration),
    /// This replica.
    pub replica: Replica,
}

/// The shared fleet handle.
#[derive(Debug)]
pub struct Fleet {
    db: Db,
    topics: Topics,
    client: AsyncClient,
    /// QoS of the device-topic subscriptions.
    subscribe_qos: QoS,
    /// Signed commands on their way to the broker client (see [`Fleet::publish_command`]).
    outbox: mpsc::UnboundedSender<(String, Vec<u8>)>,
    /// Signs every command (docs/protocol.md, "Commands are signed").
    command_key: edgefleet_shared::SecretKey,
    bundles_dir: PathBuf,
    bundles: Mutex<BTreeMap<Digest, Arc<StoredBundle>>>,
    rollouts: Mutex<BTreeMap<String, Active>>,
    queue: std::sync::Mutex<ChunkQueue>,
    /// Each device's chunk byte budget.
    fetch_budget: std::sync::Mutex<ByteBudget>,
    queue_wake: tokio::sync::Notify,
    coalesce: Duration,
    /// Counters.
    pub stats: FleetStats,
    /// Fleet-level drift alert: settings and the bundles alerting now.
    drift_alert: std::sync::Mutex<DriftAlertState>,
    /// This replica.
    replica: Replica,
    /// Whether this replica holds the rollout lease (runs the engines).
    holding: AtomicBool,
    /// Whether the store granted this replica the rollout lease at its last
    /// renewal (`lease_keeper`); the ticker follows it into `holding`.
    granted: AtomicBool,
    /// The rollout lease as last seen.
    lease: std::sync::Mutex<Option<Lease>>,
}

/// The fleet-level drift alert's settings and state.
#[derive(Debug, Clone)]
struct DriftAlertState {
    config: crate::server::config::DriftAlertConfig,
    alerting: BTreeSet<Digest>,
}

#[derive(Debug, Default)]
struct ChunkQueue {
    /// (due ms, sequence) -> chunk; the sender takes the first.
    order: BTreeMap<(u64, u64), (Digest, u32)>,
    queued: BTreeSet<(Digest, u32)>,
    /// When each chunk was last sent, and its repeats in a row (pruned to
    /// the longest hold's streak).
    sent: std::collections::HashMap<(Digest, u32), Sent>,
    seq: u64,
}

/// A chunk is sent again no sooner than this after its last send (ms)...
pub const REPEAT_HOLD_MS: u64 = 1000;

/// ... doubled for each repeat in a row, up to this many times (1, 2, 4, 8 s).
/// A repeat is in a row when it follows the last send within twice that
/// send's hold. Each copy of a chunk goes to every device downloading the
/// bundle, so when a wave's requests outlast the broker's delivery (the
/// devices ask again for chunks still on their way), fixed holds fed a
/// collapse: 67-82 copies to 9,000 devices through the embedded broker,
/// 15.7 GB delivered for a bundle of 86 KB (docs/scale.md).
const REPEAT_DOUBLINGS: u32 = 3;

/// When a chunk was last sent, and how many of its sends before that were
/// repeats in a row.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: u64,
    repeats: u32,
}

impl Sent {
    /// The earliest time the chunk may go again.
    fn held_until(self) -> u64 {
        self.at + (REPEAT_HOLD_MS << self.repeats.min(REPEAT_DOUBLINGS))
    }

    /// Whether a send at `now` is a repeat in a row.
    fn streak_at(self, now: u64) -> bool {
        now < self.at + 2 * (self.held_until() - self.at)
    }
}

impl ChunkQueue {
    /// Queues a chunk unless it is queued already (then false: merged).
    fn push(&mut self, chunk: (Digest, u32), now: u64, coalesce_ms: u64) -> bool {
        if !self.queued.insert(chunk) {
            return false;
        }
        let held = self.sent.get(&chunk).map_or(0, |s| s.held_until());
        self.seq += 1;
        self.order
            .insert(((now + coalesce_ms).max(held), self.seq), chunk);
        true
    }

    /// The first chunk due and when it is due.
    fn next(&self) -> Option<(u64, (Digest, u32))> {
        self.order.first_key_value().map(|(k, c)| (k.0, *c))
    }

    /// Takes the first chunk out to send it now.
    fn take(&mut self, now: u64) -> Option<(Digest, u32)> {
        let (_, chunk) = self.order.pop_first()?;
        self.queued.remove(&chunk);
        if self.sent.len() >= 4096 {
            self.sent.retain(|_, s| s.streak_at(now));
        }
        let repeats = match self.sent.get(&chunk) {
            Some(s) if s.streak_at(now) => (s.repeats + 1).min(REPEAT_DOUBLINGS),
            _ => 0,
        };
        self.sent.insert(chunk, Sent { at: now, repeats });
        Some(chunk)
    }
}

/// Removes the temporary files of uploads a killed controller left in
/// `bundles_dir` (`.upload-*`; an upload in progress belongs to a running
/// process, and this runs before this one serves any).
fn remove_upload_leftovers(bundles_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(bundles_dir) else {
        return;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".upload-")
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed unfinished uploads left by an earlier run");
    }
}

/// The acknowledgements of a batch of reports: one per device and epoch (more
/// past [`TelemetryAck::MAX_SEQS`] reports).
fn telemetry_acks(batch: &[(Telemetry, u64)]) -> Vec<(DeviceId, TelemetryAck)> {
    let mut by_device: BTreeMap<(&DeviceId, u64), Vec<u64>> = BTreeMap::new();
    for (t, _) in batch {
        by_device
            .entry((&t.device, t.epoch))
            .or_default()
            .push(t.seq);
    }
    let mut acks = Vec::with_capacity(by_device.len());
    for ((device, epoch), seqs) in by_device {
        for part in seqs.chunks(TelemetryAck::MAX_SEQS) {
            let ack = TelemetryAck {
                epoch,
                seqs: part.to_vec(),
            };
            acks.push((device.clone(), ack));
        }
    }
    acks
}

/// How the controller connects to the broker, and the key its commands carry.
#[derive(Debug)]
pub struct BrokerLink {
    /// The broker, or the nodes of a broker cluster (dialled in turn).
    pub endpoints: Vec<edgefleet_agent::link::Endpoint>,
    /// TLS settings, if any.
    pub tls: Option<rustls::ClientConfig>,
    /// Signs every command sent over the link (docs/protocol.md 4a).
    pub command_key: edgefleet_shared::SecretKey,
    /// QoS of the controller's subscriptions (`[mqtt] subscribe_qos`).
    pub subscribe_qos: QoS,
}

/// The controller's MQTT connection to each broker of the link: its replica's
/// client id, the protocol's packet limit, TLS when the link has it.
/// With the client on the first.
fn mqtt_options(
    link: &BrokerLink,
    replica: &Replica,
) -> (Brokers, (AsyncClient, rumqttc::EventLoop)) {
    let brokers = Brokers::new(&link.endpoints, |e| endpoint_options(e, link, replica))
        .subscribing_at(link.subscribe_qos);
    let client = AsyncClient::new(brokers.first().clone(), 1024);
    (brokers, client)
}

fn endpoint_options(
    endpoint: &edgefleet_agent::link::Endpoint,
    link: &BrokerLink,
    replica: &Replica,
) -> MqttOptions {
    let mut mqtt = MqttOptions::new(replica.client_id(), endpoint.host.clone(), endpoint.port);
    mqtt.set_max_packet_size(
        crate::server::broker::MAX_PAYLOAD,
        crate::server::broker::MAX_PAYLOAD,
    );
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_clean_session(true);
    if let Some(tls) = &link.tls {
        mqtt.set_transport(Transport::tls_with_config(tls.clone().into()));
    }
    mqtt
}

impl Fleet {
    /// Connects to the broker and starts the fleet's tasks. Unfinished rollouts
    /// are loaded from the store and continue.
    pub async fn start(
        db: Db,
        topics: Topics,
        link: BrokerLink,
        options: FleetOptions,
    ) -> Result<Arc<Fleet>, FleetError> {
        let FleetOptions {
            bundles_dir,
            tick,
            coalesce,
            telemetry,
            replica,
        } = options;
        let (brokers, (client, eventloop)) = mqtt_options(&link, &replica);
        remove_upload_leftovers(&bundles_dir);
        let (outbox, outbox_rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let fleet = Arc::new(Fleet {
            db,
            topics,
            client,
            subscribe_qos: brokers.subscribe_qos(),
            outbox,
            command_key: link.command_key,
            bundles_dir,
            bundles: Mutex::default(),
            rollouts: Mutex::default(),
            queue: std::sync::Mutex::default(),
            fetch_budget: std::sync::Mutex::new(ByteBudget::standard()),
            queue_wake: tokio::sync::Notify::new(),
            coalesce,
            stats: FleetStats::default(),
            drift_alert: std::sync::Mutex::new(DriftAlertState {
                config: crate::server::config::DriftAlertConfig::default(),
                alerting: BTreeSet::new(),
            }),
            replica,
            holding: AtomicBool::new(false),
            granted: AtomicBool::new(false),
            lease: std::sync::Mutex::new(None),
        });
        // Take the rollout lease (and with it the unfinished rollouts) now
        // if it is free or ours; otherwise the ticker keeps trying.
        fleet.hold_lease(now_ms()).await?;

        let (in_tx, mut in_rx) = mpsc::channel::<(String, Vec<u8>)>(4096);
        let (tel_tx, tel_rx) = mpsc::channel::<(Telemetry, u64)>(65_536);
        let (events_tx, events_rx) = mpsc::channel::<(Event, u64)>(EVENT_QUEUE);
        let (states_tx, states_rx) = mpsc::channel::<(DeviceState, u64)>(STATE_QUEUE);
        let queues = ingest::Queues {
            telemetry: tel_tx,
            events: events_tx,
            states: states_tx,
        };
        // The MQTT event loop: only moves messages to the ingest task.
        tokio::spawn(fleet.clone().broker_loop(eventloop, brokers, in_tx));
        // Ingest.
        let f = fleet.clone();
        tokio::spawn(async move {
            while let Some((topic, payload)) = in_rx.recv().await {
                f.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                if let Err(why) = f.ingest(&topic, &payload, &queues).await {
                    f.stats.messages_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%topic, "refused a device message: {why}");
                }
            }
        });
        tokio::spawn(fleet.clone().command_publisher(outbox_rx));
        // Telemetry batches.
        let f = fleet.clone();
        tokio::spawn(f.telemetry_writer(tel_rx, telemetry.0, telemetry.1));
        tokio::spawn(fleet.clone().event_writer(events_rx));
        tokio::spawn(fleet.clone().state_writer(states_rx));
        // Chunks.
        let f = fleet.clone();
        tokio::spawn(async move { f.chunk_sender().await });
        tokio::spawn(fleet.clone().lease_keeper());
        tokio::spawn(fleet.clone().rollout_ticker(tick));
        Ok(fleet)
    }

    /// Hands signed commands to the broker client, in the order they were signed.
    async fn command_publisher(
        self: Arc<Fleet>,
        mut outbox: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    ) {
        while let Some((topic, signed)) = outbox.recv().await {
            let sent = self
                .client
                .publish(topic, QoS::AtLeastOnce, false, signed)
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "command not handed to the broker client");
            }
            self.stats.commands_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The controller's MQTT event loop: subscribes to every device topic on
    /// each connect and hands each message to the ingest task; reconnects
    /// with a backoff up to 10 s, to the next broker of a cluster.
    async fn broker_loop(
        self: Arc<Fleet>,
        mut eventloop: rumqttc::EventLoop,
        mut brokers: Brokers,
        in_tx: mpsc::Sender<(String, Vec<u8>)>,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!("connected to the broker");
                    self.subscribe_all();
                }
                // A broker may refuse a subscription for a while (a NATS
                // cluster whose JetStream is electing a leader after a node
                // died): without it this replica would be deaf to those
                // topics until the next connect. Asked again in a second.
                Ok(MqttEvent::Incoming(Packet::SubAck(ack)))
                    if edgefleet_agent::link::refused(&ack) =>
                {
                    tracing::warn!("the broker refused a subscription; asking again in 1 s");
                    let fleet = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        fleet.subscribe_all();
                    });
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let topic = p.topic.clone();
                    if in_tx.send((topic, p.payload.to_vec())).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let (host, port) = brokers.dial_next(&mut eventloop);
                    tracing::warn!(error = %e, "broker connection lost; dialling {host}:{port}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Subscribes to every device topic (again: subscribing twice to a filter
    /// is harmless). Events and chunk requests reach every replica (the
    /// rollout lease's holder acts on them); the rest, with shared ingest,
    /// one replica each.
    fn subscribe_all(&self) {
        for (kind, shared) in [
            (DeviceTopic::State, true),
            (DeviceTopic::Events, false),
            (DeviceTopic::Telemetry, true),
            (DeviceTopic::Fetch, false),
            (DeviceTopic::Samples, true),
        ] {
            let filter = self.topics.all_devices_filter(kind);
            let filter = if shared && self.replica.shared_ingest {
                format!("$share/edgefleet/{filter}")
            } else {
                filter
            };
            let _ = self.client.try_subscribe(filter, self.subscribe_qos);
        }
    }

    /// Renews (or tries to take) the rollout lease five times per lease,
    /// apart from the rollouts' work: a tick that took longer than the lease
    /// (a 10,000-device wave) let it pass between live replicas.
    async fn lease_keeper(self: Arc<Fleet>) {
        let every = Duration::from_millis((self.replica.lease_ms / 5).clamp(50, 2_000));
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            let now = now_ms();
            if let Err(e) = self.renew_lease(now).await {
                tracing::error!(error = %e, "rollout lease not renewed");
                // Held no longer than the store last said.
                let expired = self
                    .lease
                    .lock()
                    .ok()
                    .and_then(|l| l.as_ref().map(|l| l.expires_at <= now))
                    .unwrap_or(true);
                if expired {
                    self.granted.store(false, Ordering::SeqCst);
                }
            }
        }
    }

    /// Each `tick`: follows the lease (loads the rollouts when it became this
    /// replica's, drops them when it passed on), and while this replica holds
    /// it, steps every running rollout.
    async fn rollout_ticker(self: Arc<Fleet>, tick: Duration) {
        let mut t = tokio::time::interval(tick);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            let now = now_ms();
            let mine = self.granted.load(Ordering::SeqCst);
            if let Err(e) = self.follow_lease(mine, now).await {
                tracing::error!(error = %e, "taking the rollouts over failed");
                continue;
            }
            if !mine {
                continue;
            }
            if let Err(e) = self.tick_rollouts(now).await {
                tracing::error!(error = %e, "rollout tick failed");
            }
        }
    }

    /// Takes or renews the rollout lease and follows it; returns whether this
    /// replica holds it.
    async fn hold_lease(&self, now: u64) -> Result<bool, FleetError> {
        let mine = self.renew_lease(now).await?;
        self.follow_lease(mine, now).await?;
        Ok(mine)
    }

    /// Takes or renews the rollout lease in the store; whether it is ours.
    async fn renew_lease(&self, now: u64) -> Result<bool, FleetError> {
        let r = &self.replica;
        let lease = self
            .db
            .take_lease(ROLLOUT_LEASE, &r.name, r.address.clone(), now, r.lease_ms)
            .await?;
        let mine = lease.holder == r.name;
        if let Ok(mut last) = self.lease.lock() {
            *last = Some(lease);
        }
        self.granted.store(mine, Ordering::SeqCst);
        Ok(mine)
    }

    /// On the lease becoming this replica's, loads the unfinished rollouts
    /// from the store (as their last holder left them); on losing it, drops
    /// them from memory.
    async fn follow_lease(&self, mine: bool, now: u64) -> Result<(), FleetError> {
        let r = &self.replica;
        let mut map = self.rollouts.lock().await;
        let was = self.holding.swap(mine, Ordering::SeqCst);
        if mine && !was {
            map.clear();
            if let Err(e) = Self::load_rollouts(&self.db, &mut map).await {
                // Tried again at the next tick.
                self.holding.store(false, Ordering::SeqCst);
                return Err(e);
            }
            tracing::info!(replica = %r.name, rollouts = map.len(), "this replica runs the rollouts");
            // What the devices said meanwhile, heard by other replicas; then
            // what the last holder stored it may not have published.
            self.apply_events_heard_elsewhere(&mut map, now).await?;
            for (id, a) in map.iter_mut() {
                let fx = a.engine.take_over(now);
                if !fx.is_empty() {
                    tracing::info!(rollout = %id, commands = fx.len(), "sending the unanswered commands again");
                }
                self.carry_out(id, a, fx, now, None, false).await?;
            }
        } else if !mine && was {
            map.clear();
            let holder = self.rollout_holder().map(|(h, _)| h).unwrap_or_default();
            tracing::warn!(replica = %r.name, %holder, "the rollout lease passed to another replica");
        }
        Ok(())
    }

    /// Refuses a rollout operation unless this replica runs the rollouts.
    fn must_hold_lease(&self) -> Result<(), FleetError> {
        if self.holding.load(Ordering::SeqCst) {
            return Ok(());
        }
        let lease = self.lease.lock().ok().and_then(|l| l.clone());
        Err(FleetError::OtherReplica {
            holder: lease
                .as_ref()
                .map_or_else(|| "nobody yet".to_owned(), |l| l.holder.clone()),
            address: lease.and_then(|l| l.address),
        })
    }

    /// The fence of this replica's rollout steps.
    fn fence(&self) -> Option<(&'static str, String)> {
        Some((ROLLOUT_LEASE, self.replica.name.clone()))
    }

    /// Whether this replica runs the rollouts (holds the lease).
    pub fn runs_rollouts(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    /// This replica's name.
    pub fn replica_name(&self) -> &str {
        &self.replica.name
    }

    /// The replica holding the rollout lease as last seen, and its API address.
    pub fn rollout_holder(&self) -> Option<(String, Option<String>)> {
        let lease = self.lease.lock().ok()?.clone()?;
        Some((lease.holder, lease.address))
    }

    /// Gives the rollout lease up (shutting down), so another replica takes
    /// it at its next tick instead of after the expiry.
    pub async fn release_lease(&self) {
        if self.holding.swap(false, Ordering::SeqCst) {
            self.rollouts.lock().await.clear();
            if let Err(e) = self
                .db
                .release_lease(ROLLOUT_LEASE, &self.replica.name)
                .await
            {
                tracing::warn!(error = %e, "rollout lease not released");
            }
        }
    }

    /// The store.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Where bundle files are kept.
    pub fn bundle_path(&self, digest: &Digest) -> PathBuf {
        self.bundles_dir.join(format!("{}.efb", digest.to_hex()))
    }

    async fn bundle(&self, digest: &Digest) -> Option<Arc<StoredBundle>> {
        let mut map = self.bundles.lock().await;
        if let Some(b) = map.get(digest) {
            return Some(b.clone());
        }
        let b = Arc::new(StoredBundle::open(&self.bundle_path(digest))?);
        map.insert(*digest, b.clone());
        Some(b)
    }

    /// What a rollout of `digest` installs: an agent release or a model
    /// bundle (also when the file is gone: nothing is sent for it then).
    async fn subject_of(&self, digest: Digest) -> Subject {
        match self.bundle(&digest).await {
            Some(b) if b.is_agent_release() => Subject::Agent,
            _ => Subject::Model(digest),
        }
    }

    async fn load_rollouts(db: &Db, map: &mut BTreeMap<String, Active>) -> Result<(), FleetError> {
        let rows = db.rollouts(true).await?;
        for row in rows {
            let engine: Rollout = serde_json::from_str(&row.state)
                .map_err(|e| DbError::Corrupt(format!("rollout {}: {e}", row.id)))?;
            let digest = row.bundle;
            tracing::info!(rollout = %row.id, phase = engine.phase.name(), wave = engine.wave + 1, "continuing rollout");
            map.insert(
                row.id.clone(),
                Active {
                    audited: (engine.phase.name(), engine.wave),
                    engine,
                    digest,
                    saved: row.state,
                },
            );
        }
        Ok(())
    }

    /// Applies the events other replicas stored at or before `heard_by` that
    /// this holder never heard itself (its broker connection dropped, and
    /// with a clean session what the broker held for it was lost; or they
    /// came before it took the lease): otherwise their devices would wait for
    /// `resend_after_ms` as if silent.
    async fn apply_events_heard_elsewhere(
        &self,
        map: &mut BTreeMap<String, Active>,
        heard_by: u64,
    ) -> Result<(), FleetError> {
        // A few rounds per tick at most: the tick holds the rollouts.
        for _ in 0..3 {
            if !self.db.has_unapplied_events(heard_by).await? {
                break;
            }
            let events = self.db.claim_unapplied_events(heard_by, 2_000).await?;
            if events.is_empty() {
                break;
            }
            self.stats
                .events_claimed
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            tracing::info!(
                events = events.len(),
                "applying events only another replica heard"
            );
            let now = now_ms();
            for e in &events {
                self.apply_event(map, e, now).await?;
            }
        }
        Ok(())
    }

    /// Feeds a device's event to the rollouts it is in (`map`, locked).
    async fn apply_event(
        &self,
        map: &mut BTreeMap<String, Active>,
        e: &Event,
        now: u64,
    ) -> Result<(), FleetError> {
        if let EventKind::CommandRejected { detail } = &e.kind {
            return self.on_command_rejected(map, e, detail, now).await;
        }
        let Some((digest, input)) = self.engine_input(e) else {
            return Ok(());
        };
        for (id, a) in map.iter_mut() {
            if digest.is_some_and(|d| d != a.digest)
                || !a.engine.members.contains_key(e.device.as_str())
            {
                continue;
            }
            let fx = a.engine.apply(now, input.clone()).unwrap_or_default();
            self.carry_out(id, a, fx, now, None, true).await?;
        }
        Ok(())
    }

    /// What a device's event means to the rollouts it is in: the bundle it is
    /// about (`None`: whichever) and the engine's input; `None` for events
    /// rollouts do not take.
    fn engine_input(&self, e: &Event) -> Option<(Option<Digest>, Input)> {
        let device = e.device.clone();
        Some(match &e.kind {
            EventKind::InstallProgress {
                digest,
                chunks_done,
                chunks_total,
            } => (
                Some(*digest),
                Input::Progress {
                    device,
                    done: *chunks_done,
                    total: *chunks_total,
                },
            ),
            EventKind::InstallStarted { digest } => (
                Some(*digest),
                Input::Progress {
                    device,
                    done: 0,
                    total: 0,
                },
            ),
            // Activated, or installed in shadow (rollouts send no other mode).
            EventKind::InstallSucceeded { digest, .. } => {
                (Some(*digest), Input::Succeeded { device })
            }
            EventKind::InstallFailed { digest, reason } => {
                self.stats.install_failures.fetch_add(1, Ordering::Relaxed);
                (
                    Some(*digest),
                    Input::Failed {
                        device,
                        reason: failure_text(reason),
                    },
                )
            }
            EventKind::Reverted { .. } => (None, Input::Reverted { device }),
            // An agent release counts only once the new agent has confirmed on
            // the device and reported from its record (never when the download
            // finished): `agent_updated` is that report.
            EventKind::AgentUpdated { digest, .. } => (Some(*digest), Input::Succeeded { device }),
            EventKind::AgentUpdateFailed { digest, reason } => {
                self.stats.install_failures.fetch_add(1, Ordering::Relaxed);
                (
                    Some(*digest),
                    Input::Failed {
                        device,
                        reason: agent_failure_text(reason),
                    },
                )
            }
            _ => return None,
        })
    }

    /// A device that refused a rollout's install command (signed for it, but
    /// stale by its clock, say) fails that rollout's member with the reason,
    /// instead of leaving it to the install timeout.
    async fn on_command_rejected(
        &self,
        map: &mut BTreeMap<String, Active>,
        e: &Event,
        detail: &str,
        now: u64,
    ) -> Result<(), FleetError> {
        let device = e.device.clone();
        let Some(command) = e.command else {
            return Ok(());
        };
        let Some((action, Some(rollout))) = self.db.command_of(&device, command).await? else {
            return Ok(());
        };
        if action != "install" && action != "update_agent" {
            return Ok(());
        }
        let input = Input::Failed {
            device,
            reason: format!("command_rejected: {detail}"),
        };
        if let Some(a) = map.get_mut(&rollout)
            && a.engine.members.contains_key(e.device.as_str())
        {
            let fx = a.engine.apply(now, input).unwrap_or_default();
            self.carry_out(&rollout, a, fx, now, None, true).await?;
        }
        Ok(())
    }

    /// Stores devices' events in batches (what queued while the last batch
    /// was written: one transaction for many when devices talk at once, a
    /// batch of one when they do not) and, on the rollout lease's holder,
    /// feeds those it is to apply to the rollouts, in the order they came.
    async fn event_writer(self: Arc<Self>, mut rx: mpsc::Receiver<(Event, u64)>) {
        while let Some(first) = rx.recv().await {
            let batch = take_batch(first, &mut rx, EVENT_BATCH);
            let holder = self.runs_rollouts();
            let fresh = match self.db.insert_events(&batch, holder).await {
                Ok(fresh) => fresh,
                Err(e) => {
                    self.stats
                        .messages_refused
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::warn!(events = batch.len(), "events not stored: {e}");
                    continue;
                }
            };
            if !holder {
                continue;
            }
            let mut map = self.rollouts.lock().await;
            for ((e, now), _) in batch.iter().zip(fresh).filter(|(_, fresh)| *fresh) {
                if let Err(why) = self.apply_event(&mut map, e, *now).await {
                    tracing::warn!(device = %e.device, "event not applied: {why}");
                }
            }
        }
    }

    /// Stores devices' retained states in batches, as `event_writer` does
    /// events: one transaction each held the ingest task, and with it the
    /// broker connection, behind the database under a 10,000-device rollout.
    async fn state_writer(self: Arc<Self>, mut rx: mpsc::Receiver<(DeviceState, u64)>) {
        while let Some(first) = rx.recv().await {
            let batch = take_batch(first, &mut rx, STATE_BATCH);
            if let Err(e) = self.db.device_states(&batch).await {
                self.stats
                    .messages_refused
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::warn!(states = batch.len(), "device states not stored: {e}");
            }
        }
    }

    async fn telemetry_writer(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<(Telemetry, u64)>,
        batch_max: usize,
        batch_wait: Duration,
    ) {
        let mut last_prune = 0u64;
        let mut last_alert_check = 0u64;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + batch_wait;
            while batch.len() < batch_max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(t)) => batch.push(t),
                    _ => break,
                }
            }
            let acks = telemetry_acks(&batch);
            match self.db.insert_telemetry(batch).await {
                Ok(n) => {
                    self.stats
                        .telemetry_stored
                        .fetch_add(n as u64, Ordering::Relaxed);
                    // Stored (now, or before by another replica): the devices
                    // may forget these reports. At most once: a lost
                    // acknowledgement only makes a device send a report again.
                    for (device, ack) in acks {
                        let topic = self.topics.device(&device, DeviceTopic::Acks);
                        let payload = protocol::encode(&ack);
                        let _ = self
                            .client
                            .try_publish(topic, QoS::AtMostOnce, false, payload);
                    }
                }
                // Not acknowledged: the devices send these reports again.
                Err(e) => tracing::error!(error = %e, "telemetry batch not stored"),
            }
            let now = now_ms();
            if now.saturating_sub(last_alert_check) >= 5_000 {
                last_alert_check = now;
                if let Err(e) = self.check_drift_alerts(now).await {
                    tracing::error!(error = %e, "drift alert check failed");
                }
            }
            if now.saturating_sub(last_prune) > 3_600_000 {
                last_prune = now;
                let _ = self
                    .db
                    .prune_telemetry(now.saturating_sub(self.retention_ms()))
                    .await;
                let _ = self
                    .db
                    .prune_samples(now.saturating_sub(self.retention_ms()))
                    .await;
            }
        }
    }

    /// Sets the fleet-level drift alert (from the `[drift]` config).
    pub fn set_drift_alert(&self, config: crate::server::config::DriftAlertConfig) {
        self.drift_alert
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config = config;
    }

    /// Bundles whose fleet-level drift alert is raised now.
    pub fn drift_alerting(&self) -> BTreeSet<Digest> {
        self.drift_alert
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alerting
            .clone()
    }

    /// Raises or clears each bundle's drift alert from the latest reports of the
    /// last hour; every change is audited (actor `controller`).
    async fn check_drift_alerts(&self, now: u64) -> Result<(), FleetError> {
        let latest = self
            .db
            .latest_telemetry(now.saturating_sub(3_600_000))
            .await?;
        let mut groups: BTreeMap<Digest, (usize, usize)> = BTreeMap::new();
        for t in &latest {
            if let (Some(digest), Some(d)) = (t.digest, &t.drift) {
                let g = groups.entry(digest).or_default();
                g.0 += 1;
                g.1 += usize::from(d.drifted);
            }
        }
        let changes = {
            let mut st = self.drift_alert.lock().unwrap_or_else(|p| p.into_inner());
            let (next, changes) = drift_alerts(&groups, &st.alerting, &st.config);
            st.alerting = next;
            changes
        };
        for c in changes {
            let share = c.drifted as f64 / c.devices.max(1) as f64;
            if c.raised {
                self.stats.drift_alerts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(bundle = %c.digest, drifted = c.drifted, devices = c.devices, "drift alert raised");
            } else {
                tracing::info!(bundle = %c.digest, "drift alert cleared");
            }
            self.db
                .audit(
                    "controller",
                    if c.raised { "drift.alert" } else { "drift.cleared" },
                    &c.digest.to_hex(),
                    None,
                    Some(serde_json::json!({"devices": c.devices, "drifted": c.drifted, "share": share})),
                    now,
                )
                .await?;
        }
        Ok(())
    }

    fn retention_ms(&self) -> u64 {
        RETENTION_MS.load(Ordering::Relaxed)
    }

    // ----- chunks ---------------------------------------------------------

    /// Queues the chunks `device` asked for, within the bounds of
    /// [`crate::server::fetch_limits`]: only a bundle it was told to install, at most
    /// [`MAX_CHUNKS_PER_REQUEST`] chunks, within its byte budget.
    async fn enqueue_chunks(&self, device: &DeviceId, r: &FetchRequest) -> Result<(), IngestError> {
        if !self.runs_rollouts() {
            // The lease's holder serves chunks: every replica hears the
            // request, one answers it.
            return Ok(());
        }
        let Some(bundle) = self.bundle(&r.bundle).await else {
            return Err(IngestError::UnknownBundle(r.bundle));
        };
        if !self.db.was_offered(device.as_str(), &r.bundle).await? {
            self.refuse_fetch(FetchRefusal::NotOffered);
            return Err(IngestError::NotOffered {
                device: device.clone(),
                bundle: r.bundle,
            });
        }
        let total = bundle.manifest.payload.chunks.len() as u32;
        let chunk_bytes = u64::from(bundle.manifest.payload.chunk_size);
        let now = now_ms();
        let mut wanted: Vec<u32> = Vec::new();
        let mut too_many = false;
        'ranges: for range in &r.ranges {
            let end = range.start.saturating_add(range.count).min(total);
            for index in range.start..end {
                if wanted.len() as u32 >= MAX_CHUNKS_PER_REQUEST {
                    too_many = true;
                    break 'ranges;
                }
                wanted.push(index);
            }
        }
        if too_many {
            self.refuse_fetch(FetchRefusal::TooMany);
        }
        let mut budget = self.fetch_budget.lock().unwrap_or_else(|p| p.into_inner());
        let mut granted = Vec::with_capacity(wanted.len());
        for index in wanted {
            if !budget.take(device.as_str(), chunk_bytes, now) {
                self.refuse_fetch(FetchRefusal::Rate);
                break;
            }
            granted.push(index);
        }
        drop(budget);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let coalesce_ms = self.coalesce.as_millis() as u64;
        for index in granted {
            if !q.push((r.bundle, index), now, coalesce_ms) {
                self.stats
                    .chunk_requests_merged
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(q);
        self.queue_wake.notify_one();
        Ok(())
    }

    fn refuse_fetch(&self, why: FetchRefusal) {
        let counter = match why {
            FetchRefusal::NotOffered => &self.stats.fetch_refused_not_offered,
            FetchRefusal::TooMany => &self.stats.fetch_refused_too_many,
            FetchRefusal::Rate => &self.stats.fetch_refused_rate,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    async fn chunk_sender(self: Arc<Self>) {
        loop {
            let next = {
                let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.next()
            };
            let Some((due, _)) = next else {
                self.queue_wake.notified().await;
                continue;
            };
            let now = now_ms();
            if now < due {
                // A request queued meanwhile may be due sooner (this one may
                // be held after its last send).
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(due - now)) => {}
                    () = self.queue_wake.notified() => {}
                }
                continue;
            }
            let taken = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.take(now_ms())
            };
            let Some((digest, index)) = taken else {
                continue;
            };
            let Some(bundle) = self.bundle(&digest).await else {
                continue;
            };
            let Some(data) = bundle.chunk(index) else {
                continue;
            };
            let len = data.len() as u64;
            let chunk = Chunk {
                bundle: digest,
                index,
                data,
            };
            let sent = self
                .client
                .publish(
                    self.topics.bundle_chunks(&digest),
                    QoS::AtLeastOnce,
                    false,
                    protocol::encode(&chunk),
                )
                .await;
            if sent.is_ok() {
                self.stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .chunk_bytes_sent
                    .fetch_add(len, Ordering::Relaxed);
            }
        }
    }

    // ----- commands and rollouts ----------------------------------------------

    /// Stores the command (with `audit`, in one transaction), signs and
    /// publishes it.
    async fn send(
        &self,
        device: &DeviceId,
        rollout: Option<&str>,
        action: Action,
        audit: Option<crate::server::db::Audit>,
    ) -> Result<u64, FleetError> {
        let now = now_ms();
        let id = self
            .db
            .new_command(
                device,
                rollout,
                action_name(&action),
                action_bundle(&action).as_ref(),
                now,
                audit,
            )
            .await?;
        self.publish_command(id, now, device.clone(), action);
        Ok(id)
    }

    /// Signs a command and queues it for the broker client. Never waits for
    /// the broker: callers hold the rollouts' lock, and the MQTT event loop may
    /// itself be waiting for ingest, which may be waiting for that lock (a
    /// wave of 4,500 commands deadlocked the controller that way, docs/scale.md).
    fn publish_command(&self, id: u64, now: u64, device: DeviceId, action: Action) {
        let topic = self.topics.device(&device, DeviceTopic::Commands);
        let cmd = Command {
            id,
            issued_at: UnixTime((now / 1000) as i64),
            device,
            action,
        };
        let signed = edgefleet_shared::commands::sign_command(&self.command_key, &cmd);
        if self.outbox.send((topic, signed)).is_err() {
            tracing::warn!(device = %cmd.device, "command not queued: the publisher stopped");
        }
    }

    /// The command that reverts `device` on the channel of bundle `digest`:
    /// `revert` for a device serving one channel (what every agent reads),
    /// `revert_channel` for one serving several (docs/channels.md).
    async fn revert_action(&self, device: &DeviceId, digest: &Digest) -> Action {
        let several = match self.db.device_channels(device.as_str()).await {
            Ok(channels) => channels.len() > 1,
            Err(e) => {
                tracing::warn!(%device, "reading its channels: {e}");
                false
            }
        };
        match self.bundle(digest).await {
            Some(b) if several => Action::RevertChannel {
                channel: b.manifest.channel.clone(),
            },
            _ => Action::Revert,
        }
    }

    /// The command that installs bundle `digest` (in shadow when `shadow`), or
    /// `update_agent` for an agent release; `None` when the file is gone.
    async fn install_action(&self, digest: Digest, shadow: bool) -> Option<Action> {
        let bundle = self.bundle(&digest).await?;
        let offer = BundleOffer {
            digest,
            header: bundle.header.clone(),
        };
        Some(if bundle.is_agent_release() {
            // Rollouts of agent releases have no shadow stage.
            Action::UpdateAgent { release: offer }
        } else {
            Action::Install {
                bundle: offer,
                mode: if shadow {
                    InstallMode::Shadow
                } else {
                    InstallMode::Activate
                },
            }
        })
    }

    /// The commands and log notes of an engine step's effects on rollout
    /// `id` of bundle `digest`.
    async fn commands_and_notes(
        &self,
        id: &str,
        digest: Digest,
        fx: Vec<Effect>,
    ) -> (Vec<Outgoing>, Vec<String>) {
        let mut notes = Vec::new();
        let mut commands = Vec::new();
        for e in fx {
            let (e, again) = match e {
                Effect::Resend(e) => (*e, true),
                e => (e, false),
            };
            let mut send = |device, action| {
                commands.push(Outgoing {
                    device,
                    action,
                    again,
                })
            };
            let shadow = matches!(e, Effect::InstallShadow(_));
            match e {
                Effect::Install(device) | Effect::InstallShadow(device) => {
                    match self.install_action(digest, shadow).await {
                        Some(action) => send(device, action),
                        None => notes.push(format!(
                            "bundle {} is missing from the store",
                            digest.short()
                        )),
                    }
                }
                Effect::StopShadow(device) => {
                    // The shadow stops at once; the next shadow install samples
                    // at the device's default again.
                    let action = Action::Configure(edgefleet_shared::protocol::Settings {
                        shadow_sample_permille: Some(0),
                        ..Default::default()
                    });
                    send(device, action);
                }
                Effect::Revert(device) => {
                    if self.subject_of(digest).await == Subject::Agent {
                        // A device whose new agent confirmed keeps it: agents
                        // never go below their release (docs/agent-update.md).
                        notes.push(format!(
                            "{device} keeps the new agent: an agent release is not reverted remotely; publish a newer release to replace it"
                        ));
                        continue;
                    }
                    let action = self.revert_action(&device, &digest).await;
                    send(device, action);
                }
                Effect::Note(n) => {
                    tracing::info!(rollout = id, "{n}");
                    notes.push(n);
                }
                // Unwrapped above; a resend of a resend is the same resend.
                Effect::Resend(_) => {}
            }
        }
        (commands, notes)
    }

    /// Carries out an engine step's effects and stores the rollout's new state
    /// with its notes and its audit record in one transaction: the operator's
    /// action when `by` names one (actor, action), otherwise the engine's own
    /// step (actor `controller`) when the phase or wave moved. With
    /// `progress_only` (a device's event), a step that sent nothing, noted
    /// nothing and moved neither phase nor wave is stored by the next tick.
    async fn carry_out(
        &self,
        id: &str,
        a: &mut Active,
        fx: Vec<Effect>,
        now: u64,
        by: Option<(&str, &str)>,
        progress_only: bool,
    ) -> Result<(), FleetError> {
        let (commands, notes) = self.commands_and_notes(id, a.digest, fx).await;
        let commanded = !commands.is_empty();
        let moved = (a.engine.phase.name(), a.engine.wave) != a.audited;
        if progress_only && !commanded && !moved && notes.is_empty() {
            // A member's progress and nothing else: stored at the next tick,
            // not per event. Serialising and storing a 5,000-member rollout on
            // each device event held ingest to ~300 messages/s (docs/scale.md).
            return Ok(());
        }
        let state = serde_json::to_string(&a.engine).unwrap_or_default();
        let changed = state != a.saved || !notes.is_empty();
        if !commanded && !changed {
            return Ok(());
        }
        // The commands and the state that says who was told, in one
        // transaction, fenced by the lease: a replica taking over finds
        // either both or neither, so no device is told twice for a wave.
        // Published only once stored.
        let now_at = (a.engine.phase.name(), a.engine.wave);
        let step = RolloutStep {
            rollout: id.to_owned(),
            state: changed.then(|| (a.engine.phase.name(), state.clone())),
            audit: if changed {
                step_audit(id, a.audited, now_at, notes.last().cloned(), by, now)
            } else {
                None
            },
            notes,
            commands: commands
                .iter()
                .map(|c| StepCommand {
                    device: c.device.clone(),
                    action: action_name(&c.action),
                    bundle: action_bundle(&c.action),
                    again: c.again,
                })
                .collect(),
            fence: self.fence(),
        };
        let ids = self.db.step_rollout(step, now).await?;
        for (cid, c) in ids.into_iter().zip(commands) {
            if c.again {
                self.stats.commands_resent.fetch_add(1, Ordering::Relaxed);
            }
            self.publish_command(cid, now, c.device, c.action);
        }
        if changed {
            a.saved = state;
            a.audited = now_at;
        }
        Ok(())
    }

    /// One engine step for every running rollout.
    pub async fn tick_rollouts(&self, now: u64) -> Result<(), FleetError> {
        let mut map = self.rollouts.lock().await;
        self.apply_events_heard_elsewhere(&mut map, now.saturating_sub(EVENT_GRACE_MS))
            .await?;
        let mut finished = Vec::new();
        for (id, a) in map.iter_mut() {
            let health = match a.engine.phase {
                Phase::Soaking { since, .. } => Some(self.health_of(a, since).await?),
                _ => None,
            };
            let fx = a.engine.tick(now, health);
            self.carry_out(id, a, fx, now, None, false).await?;
            let reverting = a
                .engine
                .members
                .values()
                .any(|m| matches!(m, crate::server::engine::Member::Reverting { .. }));
            if a.engine.phase.finished() && !reverting {
                finished.push(id.clone());
            }
        }
        for id in finished {
            map.remove(&id);
        }
        Ok(())
    }

    async fn health_of(&self, a: &Active, since: u64) -> Result<WaveHealth, FleetError> {
        let latest = self.db.latest_telemetry(since).await?;
        let subject = self.subject_of(a.digest).await;
        Ok(current_wave_health(&a.engine, subject, &latest))
    }

    /// Starts a rollout of `bundle` to `devices` (already resolved by the API).
    pub async fn start_rollout(
        &self,
        bundle: Digest,
        devices: Vec<DeviceId>,
        plan: Plan,
        selector: String,
        actor: &str,
    ) -> Result<RolloutView, FleetError> {
        if self.bundle(&bundle).await.is_none() {
            return Err(FleetError::UnknownBundle(bundle));
        }
        let now = now_ms();
        let mut map = self.rollouts.lock().await;
        self.must_hold_lease()?;
        for (other, a) in map.iter() {
            if !a.engine.phase.finished()
                && let Some(d) = devices.iter().find(|d| a.engine.members.contains_key(*d))
            {
                return Err(FleetError::DeviceInRollout {
                    device: d.clone(),
                    rollout: other.clone(),
                    phase: a.engine.phase.name(),
                });
            }
        }
        let mut rnd = [0u8; 4];
        getrandom::fill(&mut rnd).map_err(FleetError::Random)?;
        let id = format!("ro-{}-{}", now / 1000, hex::encode(rnd));
        let engine = Rollout::new(&id, &devices, plan, now)?;
        let state = serde_json::to_string(&engine).unwrap_or_default();
        let row = crate::server::db::RolloutRow {
            id: id.clone(),
            bundle,
            created_at: now,
            created_by: actor.to_owned(),
            selector,
            state: state.clone(),
        };
        let audit = crate::server::db::Audit {
            actor: actor.to_owned(),
            action: "rollout.start".into(),
            target: id.clone(),
            before: None,
            after: Some(serde_json::json!({
                "bundle": bundle.to_hex(),
                "devices": engine.members.len(),
                "plan": engine.plan,
            })),
            at: now,
        };
        self.db
            .insert_rollout(&row, engine.phase.name(), Some(audit))
            .await?;
        let mut a = Active {
            audited: (engine.phase.name(), engine.wave),
            engine,
            digest: bundle,
            saved: state,
        };
        let mut fx = vec![Effect::Note(format!(
            "started by {actor}: {} devices in {} waves",
            a.engine.members.len(),
            a.engine.waves.len()
        ))];
        fx.extend(a.engine.tick(now, None));
        self.carry_out(&id, &mut a, fx, now, None, false).await?;
        let view = RolloutView {
            id: id.clone(),
            bundle,
            state: a.engine.clone(),
        };
        map.insert(id, a);
        Ok(view)
    }

    /// Applies an operator command; returns the state before and after.
    /// Applies an operator's `input` (`action` names it in the audit: pause,
    /// resume, promote, abort); the new state and its audit record are stored
    /// in one transaction.
    pub async fn operate(
        &self,
        id: &str,
        input: Input,
        actor: &str,
        action: &str,
    ) -> Result<(Rollout, Rollout), FleetError> {
        let now = now_ms();
        let mut map = self.rollouts.lock().await;
        self.must_hold_lease()?;
        let Some(a) = map.get_mut(id) else {
            let exists = self.db.rollouts(false).await?.iter().any(|r| r.id == id);
            return Err(if exists {
                FleetError::RolloutFinished(id.to_owned())
            } else {
                FleetError::UnknownRollout(id.to_owned())
            });
        };
        let before = a.engine.clone();
        let mut fx = a.engine.apply(now, input)?;
        fx.insert(0, Effect::Note(format!("operator {actor}")));
        self.carry_out(id, a, fx, now, Some((actor, action)), false)
            .await?;
        Ok((before, a.engine.clone()))
    }

    /// Every rollout with its state (running ones from memory, the rest from the store).
    pub async fn rollouts(&self) -> Result<Vec<RolloutView>, FleetError> {
        let rows = self.db.rollouts(false).await?;
        let map = self.rollouts.lock().await;
        let mut out = Vec::new();
        for r in rows {
            let state = match map.get(&r.id) {
                Some(a) => a.engine.clone(),
                None => serde_json::from_str(&r.state)
                    .map_err(|e| DbError::Corrupt(format!("rollout {}: {e}", r.id)))?,
            };
            out.push(RolloutView {
                id: r.id,
                bundle: r.bundle,
                state,
            });
        }
        Ok(out)
    }

    /// Sends a command outside any rollout (operator action on one device).
    pub async fn command(
        &self,
        device: &DeviceId,
        action: Action,
        audit: Option<crate::server::db::Audit>,
    ) -> Result<u64, FleetError> {
        self.send(device, None, action, audit).await
    }
}

/// The audit record of a rollout's step from phase and wave `before` to
/// `after`: the operator's action when `by` names one (actor, action);
/// otherwise the engine's own step (next wave, halt, completion), with the
/// controller as the actor, when the phase or wave moved.
fn step_audit(
    id: &str,
    before: (&'static str, usize),
    after: (&'static str, usize),
    reason: Option<String>,
    by: Option<(&str, &str)>,
    now: u64,
) -> Option<crate::server::db::Audit> {
    let at = |(phase, wave): (&str, usize)| serde_json::json!({"phase": phase, "wave": wave + 1});
    let (actor, action, after_json) = match by {
        Some((actor, action)) => (actor.to_owned(), format!("rollout.{action}"), at(after)),
        None if after != before => {
            let mut moved = at(after);
            moved["note"] = serde_json::json!(reason);
            ("controller".to_owned(), "rollout.step".to_owned(), moved)
        }
        None => return None,
    };
    Some(crate::server::db::Audit {
        actor,
        action,
        target: id.to_owned(),
        before: Some(at(before)),
        after: Some(after_json),
        at: now,
    })
}

/// How long telemetry is kept, ms (set from the configuration at start).
pub static RETENTION_MS: AtomicU64 = AtomicU64::new(30 * 86_400_000);

/// An agent update's failure as one line (stage, then what the device said).
pub fn agent_failure_text(r: &AgentUpdateFailure) -> String {
    match r {
        AgentUpdateFailure::Refused { refusal } => {
            format!("refused ({}): {refusal}", refusal.code())
        }
        AgentUpdateFailure::Download { detail } => format!("download: {detail}"),
        AgentUpdateFailure::Probe { detail } => format!("probe: {detail}"),
        AgentUpdateFailure::Trial { failure } => format!("trial: {failure}"),
        AgentUpdateFailure::Unsupervised => {
            "unsupervised: nothing restarts this agent if the new one fails (docs/agent-update.md)"
                .into()
        }
        AgentUpdateFailure::Internal { detail } => format!("internal: {detail}"),
    }
}

/// An install failure's stage and reason (a refusal with its stable code).
pub fn failure_text(r: &FailureReason) -> String {
    match r {
        FailureReason::Refused { refusal } => format!("refused ({}): {refusal}", refusal.code()),
        FailureReason::Preflight { detail } => format!("preflight: {detail}"),
        FailureReason::Download { detail } => format!("download: {detail}"),
        FailureReason::ModelLoad { detail } => format!("model_load: {detail}"),
        FailureReason::HealthCheck { detail } => format!("health_check: {detail}"),
        FailureReason::Internal { detail } => format!("internal: {detail}"),
    }
}

/// A change of a bundle's fleet-level drift alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertChange {
    /// The bundle.
    pub digest: Digest,
    /// Raised (true) or cleared.
    pub raised: bool,
    /// Devices reporting drift for it.
    pub devices: usize,
    /// Of those, drifted.
    pub drifted: usize,
}

/// Which bundles alert, from `(devices reporting, drifted)` per bundle: at least
/// `alert_min_devices` reporting and `alert_percent` of them drifted. Returns
/// the new set and what changed against `alerting`; a bundle no longer
/// reported clears.
pub fn drift_alerts(
    groups: &BTreeMap<Digest, (usize, usize)>,
    alerting: &BTreeSet<Digest>,
    config: &crate::server::config::DriftAlertConfig,
) -> (BTreeSet<Digest>, Vec<AlertChange>) {
    let mut next = BTreeSet::new();
    for (digest, (devices, drifted)) in groups {
        if *devices >= config.alert_min_devices as usize
            && drifted * 100 >= config.alert_percent as usize * devices
        {
            next.insert(*digest);
        }
    }
    let mut changes = Vec::new();
    for d in next.difference(alerting) {
        let (devices, drifted) = groups.get(d).copied().unwrap_or_default();
        changes.push(AlertChange {
            digest: *d,
            raised: true,
            devices,
            drifted,
        });
    }
    for d in alerting.difference(&next) {
        let (devices, drifted) = groups.get(d).copied().unwrap_or_default();
        changes.push(AlertChange {
            digest: *d,
            raised: false,
            devices,
            drifted,
        });
    }
    (next, changes)
}

/// p95 of histogram `a` over p95 of `b` (buckets of [`LATENCY_BOUNDS_US`]),
/// each interpolated inside its bucket so that a small move across a bound is
/// not judged a 2x step.
fn p95_ratio(a: &[u64], b: &[u64]) -> Option<f64> {
    match (
        quantile_interpolated_us(&LATENCY_BOUNDS_US, a, 0.95),
        quantile_interpolated_us(&LATENCY_BOUNDS_US, b, 0.95),
    ) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// What a rollout installs, as its wave's health is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A model bundle: the wave's devices serving it against the others
    /// serving another bundle.
    Model(Digest),
    /// An agent release: the model serving of the wave's devices (on the new
    /// agent once the wave installed; telemetry counters start again with
    /// each agent process) against the others' (still on the old agent).
    Agent,
}

impl Subject {
    /// Whether a wave device's telemetry row reports on what was rolled out.
    fn is_new(self, t: &TelemetryRow) -> bool {
        match self {
            Subject::Model(d) => t.digest == Some(d),
            Subject::Agent => t.digest.is_some(),
        }
    }

    /// Whether another device's row is a baseline to compare with.
    fn is_baseline(self, t: &TelemetryRow) -> bool {
        match self {
            Subject::Model(d) => t.digest.is_some() && t.digest != Some(d),
            Subject::Agent => t.digest.is_some(),
        }
    }
}

/// [`wave_health`] of a rollout's current wave against its other devices:
/// what the engine's gates judge (and the dashboard shows).
pub fn current_wave_health(r: &Rollout, subject: Subject, latest: &[TelemetryRow]) -> WaveHealth {
    let wave: BTreeSet<&str> = r
        .waves
        .get(r.wave)
        .map(|w| w.iter().map(DeviceId::as_str).collect())
        .unwrap_or_default();
    let others: BTreeSet<&str> = r
        .members
        .keys()
        .map(DeviceId::as_str)
        .filter(|d| !wave.contains(d))
        .collect();
    wave_health(subject, &wave, &others, latest)
}

/// Fewest inferences (wave or baseline) before a rate or a latency counts.
pub const MIN_INFERENCES: u64 = 20;

/// The health of a wave from the latest telemetry of each device (counters are
/// cumulative since the device activated its bundle or its agent started): the
/// error rate of the wave's devices on the new `subject`, and their p95
/// latency over the p95 of `others` (rollout devices not in the wave) still on
/// the old one. Unknown (None) without `MIN_INFERENCES` on either side.
pub fn wave_health(
    subject: Subject,
    wave: &BTreeSet<&str>,
    others: &BTreeSet<&str>,
    latest: &[TelemetryRow],
) -> WaveHealth {
    let n = LATENCY_BOUNDS_US.len() + 1;
    let sum = |pick: &dyn Fn(&TelemetryRow) -> bool| {
        let mut inf = 0u64;
        let mut err = 0u64;
        let mut hist = vec![0u64; n];
        for t in latest.iter().filter(|t| pick(t)) {
            inf += t.inferences.unwrap_or(0);
            err += t.errors.unwrap_or(0);
            if let Some(c) = &t.latency_counts {
                add_counts(&mut hist, c);
            }
        }
        (inf, err, hist)
    };
    let in_wave = |t: &TelemetryRow| wave.contains(t.device.as_str()) && subject.is_new(t);
    let baseline = |t: &TelemetryRow| others.contains(t.device.as_str()) && subject.is_baseline(t);
    let (inf, err, hist) = sum(&in_wave);
    let (b_inf, _, b_hist) = sum(&baseline);
    let error_rate = (inf + err >= MIN_INFERENCES).then(|| err as f64 / (inf + err) as f64);
    let p95_latency_ratio = (inf >= MIN_INFERENCES && b_inf >= MIN_INFERENCES)
        .then(|| p95_ratio(&hist, &b_hist))
        .flatten();
    // Drift: share of devices whose judged window is drifted, the wave on the new
    // bundle against the others on another one (0 when none of them reports).
    let drifted_share = |pick: &dyn Fn(&TelemetryRow) -> bool| {
        let reports: Vec<bool> = latest
            .iter()
            .filter(|t| pick(t))
            .filter_map(|t| t.drift.as_ref().map(|d| d.drifted))
            .collect();
        (!reports.is_empty())
            .then(|| reports.iter().filter(|d| **d).count() as f64 / reports.len() as f64)
    };
    let wave_drift = drifted_share(&in_wave);
    let base_drift = drifted_share(&baseline);
    let (shadow_agreement, shadow_p95_latency_ratio) = match subject {
        Subject::Model(digest) => shadow_health(digest, wave, latest),
        Subject::Agent => (None, None),
    };
    WaveHealth {
        error_rate,
        p95_latency_ratio,
        drift_increase: wave_drift.map(|w| w - base_drift.unwrap_or(0.0)),
        shadow_agreement,
        shadow_p95_latency_ratio,
    }
}

/// Adds a latency histogram to `hist` (one of another length is left out).
fn add_counts(hist: &mut [u64], counts: &[u64]) {
    if counts.len() == hist.len() {
        for (h, v) in hist.iter_mut().zip(counts) {
            *h += v;
        }
    }
}

/// The shadow gates' figures for the wave's devices running `digest` in
/// shadow: agreement with the active model, and the shadow's p95 latency over
/// the active model's. Unknown without [`MIN_INFERENCES`] shadow runs.
fn shadow_health(
    digest: Digest,
    wave: &BTreeSet<&str>,
    latest: &[TelemetryRow],
) -> (Option<f64>, Option<f64>) {
    let n = LATENCY_BOUNDS_US.len() + 1;
    let mut runs = 0u64;
    let mut agreed = 0u64;
    let mut shadow_hist = vec![0u64; n];
    let mut active_hist = vec![0u64; n];
    for t in latest.iter().filter(|t| wave.contains(t.device.as_str())) {
        let Some(sh) = t.shadow.as_ref().filter(|s| s.digest == digest) else {
            continue;
        };
        runs += sh.runs;
        agreed += sh.agreed;
        add_counts(&mut shadow_hist, &sh.latency_counts);
        add_counts(&mut active_hist, &sh.active_latency_counts);
    }
    let agreement = (runs >= MIN_INFERENCES).then(|| agreed as f64 / runs as f64);
    let latency = (runs >= MIN_INFERENCES)
        .then(|| p95_ratio(&shadow_hist, &active_hist))
        .flatten();
    (agreement, latency)
}

/// Telemetry of a group of devices, from the latest sample of each (counters are
/// cumulative since the device activated its bundle).
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TelemetrySummary {
    /// Devices with a sample.
    pub devices: usize,
    /// Inferences.
    pub inferences: u64,
    /// Errors.
    pub errors: u64,
    /// errors / (inferences + errors), when there was traffic.
    pub error_rate: Option<f64>,
    /// Latency quantiles from the summed histograms (bucket upper bounds, us).
    pub p50_us: Option<u64>,
    /// p95.
    pub p95_us: Option<u64>,
    /// p99.
    pub p99_us: Option<u64>,
    /// Mean CPU use of the devices, %.
    pub cpu_percent_mean: Option<f64>,
    /// Mean agent RSS, bytes.
    pub rss_bytes_mean: Option<f64>,
    /// Devices reporting drift (their bundle has a reference, the window has
    /// enough rows).
    pub drift_devices: usize,
    /// Of those, devices whose window is drifted.
    pub drifted_devices: usize,
    /// Drifted feature -> devices flagging it.
    pub drifted_features: BTreeMap<String, usize>,
    /// Requests run by shadow models on these devices.
    pub shadow_runs: u64,
    /// Of those, answers that agreed with the active model's.
    pub shadow_agreed: u64,
}

/// Sums the latest samples of a group of devices.
pub fn summarise<'a>(rows: impl IntoIterator<Item = &'a TelemetryRow>) -> TelemetrySummary {
    let n = LATENCY_BOUNDS_US.len() + 1;
    let mut s = TelemetrySummary::default();
    let mut hist = vec![0u64; n];
    let (mut cpu, mut cpu_n, mut rss, mut rss_n) = (0.0, 0usize, 0.0, 0usize);
    for t in rows {
        s.devices += 1;
        s.inferences += t.inferences.unwrap_or(0);
        s.errors += t.errors.unwrap_or(0);
        if let Some(c) = &t.latency_counts
            && c.len() == n
        {
            for (h, v) in hist.iter_mut().zip(c) {
                *h += v;
            }
        }
        if let Some(c) = t.cpu_percent {
            cpu += c;
            cpu_n += 1;
        }
        if let Some(r) = t.rss_bytes {
            rss += r as f64;
            rss_n += 1;
        }
        if let Some(sh) = &t.shadow {
            s.shadow_runs += sh.runs;
            s.shadow_agreed += sh.agreed;
        }
        if let Some(d) = &t.drift {
            s.drift_devices += 1;
            s.drifted_devices += usize::from(d.drifted);
            for f in &d.features {
                *s.drifted_features.entry(f.clone()).or_default() += 1;
            }
        }
    }
    let total = s.inferences + s.errors;
    s.error_rate = (total > 0).then(|| s.errors as f64 / total as f64);
    s.p50_us = quantile_us(&LATENCY_BOUNDS_US, &hist, 0.5);
    s.p95_us = quantile_us(&LATENCY_BOUNDS_US, &hist, 0.95);
    s.p99_us = quantile_us(&LATENCY_BOUNDS_US, &hist, 0.99);
    s.cpu_percent_mean = (cpu_n > 0).then(|| cpu / cpu_n as f64);
    s.rss_bytes_mean = (rss_n > 0).then(|| rss / rss_n as f64);
    s
}

/// The name a command's action is stored under.
fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Install { .. } => "install",
        Action::Activate { .. } => "activate",
        Action::Revert => "revert",
        Action::RevertChannel { .. } => "revert_channel",
        Action::Remove { .. } => "remove",
        Action::Configure(_) => "configure",
        Action::RequestSamples { .. } => "request_samples",
        Action::UpdateAgent { .. } => "update_agent",
    }
}

/// The bundle a command is about, if any.
fn action_bundle(action: &Action) -> Option<Digest> {
    match action {
        Action::Install { bundle, .. } => Some(bundle.digest),
        Action::UpdateAgent { release } => Some(release.digest),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        device: &str,
        digest: &str,
        inferences: u64,
        errors: u64,
        bucket: usize,
    ) -> TelemetryRow {
        let mut counts = vec![0u64; LATENCY_BOUNDS_US.len() + 1];
        counts[bucket] = inferences;
        TelemetryRow {
            device: DeviceId::new(device).expect("a valid device id"),
            seq: 1,
            at: 0,
            received_at: 0,
            digest: Some(dg(digest)),
            inferences: Some(inferences),
            errors: Some(errors),
            latency_counts: Some(counts),
            cpu_percent: None,
            mem_used: None,
            rss_bytes: None,
            drift: None,
            shadow: None,
            spool_dropped: None,
        }
    }

    /// A digest named by a word, for reading the cases.
    fn dg(name: &str) -> Digest {
        Digest::of(name.as_bytes())
    }

    fn drifting(mut r: TelemetryRow, drifted: bool) -> TelemetryRow {
        r.drift = Some(crate::server::db::DriftSummary {
            rows: 500,
            drifted_share: if drifted { 1.0 } else { 0.0 },
            drifted,
            features: if drifted { vec!["x".into()] } else { vec![] },
        });
        r
    }

    #[test]
    fn a_version_alerts_when_enough_of_its_devices_drift_and_clears_after() {
        let config = crate::server::config::DriftAlertConfig {
            alert_percent: 30,
            alert_min_devices: 3,
        };
        let groups = |v: &[(&str, usize, usize)]| -> BTreeMap<Digest, (usize, usize)> {
            v.iter().map(|(d, n, k)| (dg(d), (*n, *k))).collect()
        };
        // 3 of 10 is 30%: raised; 2 of 2 has too few devices; 2 of 10 is under.
        let (on, changes) = drift_alerts(
            &groups(&[("a", 10, 3), ("b", 2, 2), ("c", 10, 2)]),
            &BTreeSet::new(),
            &config,
        );
        assert_eq!(on, BTreeSet::from([dg("a")]));
        assert_eq!(
            changes,
            [AlertChange {
                digest: dg("a"),
                raised: true,
                devices: 10,
                drifted: 3
            }]
        );
        // Unchanged: no news. Then it drops under, and clears once.
        let (same, changes) = drift_alerts(&groups(&[("a", 10, 4)]), &on, &config);
        assert!(changes.is_empty() && same == on);
        let (off, changes) = drift_alerts(&groups(&[("a", 10, 1)]), &on, &config);
        assert!(off.is_empty());
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].raised);
    }

    #[test]
    fn an_agent_wave_is_judged_on_its_model_serving_against_devices_on_the_old_agent() {
        let wave = BTreeSet::from(["a", "b"]);
        let others = BTreeSet::from(["c", "d"]);
        // Every device serves the same model; the new agent's serving is slower
        // and fails more often.
        let rows = vec![
            row("a", "m", 90, 10, 5),
            row("b", "m", 100, 0, 5),
            row("c", "m", 100, 0, 2),
            row("d", "m", 100, 0, 2),
        ];
        let h = wave_health(Subject::Agent, &wave, &others, &rows);
        assert_eq!(h.error_rate, Some(10.0 / 200.0));
        let expect = p95_ratio(
            rows[0].latency_counts.as_deref().expect("counts"),
            rows[2].latency_counts.as_deref().expect("counts"),
        );
        assert!(expect.is_some_and(|r| r > 1.0));
        assert_eq!(h.p95_latency_ratio, expect);
        assert_eq!(
            (h.shadow_agreement, h.shadow_p95_latency_ratio),
            (None, None)
        );
        // The same rows judged as a model rollout of "m" have no baseline.
        let as_model = wave_health(Subject::Model(dg("m")), &wave, &others, &rows);
        assert_eq!(as_model.p95_latency_ratio, None);
        // A device serving nothing is neither side.
        let mut idle = rows.clone();
        idle[1].digest = None;
        assert_eq!(
            wave_health(Subject::Agent, &wave, &others, &idle).error_rate,
            Some(10.0 / 100.0)
        );
    }

    #[test]
    fn drift_of_the_wave_is_measured_against_the_devices_still_on_the_old_bundle() {
        let wave = BTreeSet::from(["a", "b"]);
        let others = BTreeSet::from(["c", "d", "e", "f"]);
        let rows = vec![
            drifting(row("a", "new", 100, 0, 3), true),
            drifting(row("b", "new", 100, 0, 3), true),
            drifting(row("c", "old", 100, 0, 3), true),
            drifting(row("d", "old", 100, 0, 3), false),
            drifting(row("e", "old", 100, 0, 3), false),
            drifting(row("f", "old", 100, 0, 3), false),
        ];
        let h = wave_health(Subject::Model(dg("new")), &wave, &others, &rows);
        assert_eq!(h.drift_increase, Some(1.0 - 0.25));
        // The whole fleet sees the same shift: no increase, the new model is not to blame.
        let all: Vec<TelemetryRow> = rows.iter().map(|r| drifting(r.clone(), true)).collect();
        assert_eq!(
            wave_health(Subject::Model(dg("new")), &wave, &others, &all).drift_increase,
            Some(0.0)
        );
        // No baseline reports (the old bundle had no reference): against zero.
        let mut alone = rows.clone();
        for r in &mut alone[2..] {
            r.drift = None;
        }
        assert_eq!(
            wave_health(Subject::Model(dg("new")), &wave, &others, &alone).drift_increase,
            Some(1.0)
        );
        // No wave reports: unknown, passes.
        let mut none = rows;
        none[0].drift = None;
        none[1].drift = None;
        assert_eq!(
            wave_health(Subject::Model(dg("new")), &wave, &others, &none).drift_increase,
            None
        );
    }

    #[test]
    fn summaries_add_counters_and_histograms_of_the_group() {
        let rows = [row("a", "x", 100, 10, 3), row("b", "x", 300, 0, 2)];
        let s = summarise(&rows);
        assert_eq!((s.devices, s.inferences, s.errors), (2, 400, 10));
        assert_eq!(s.error_rate, Some(10.0 / 410.0));
        // 300 of 400 in the 200 us bucket, 100 in the 500 us bucket.
        assert_eq!(
            s.p50_us,
            quantile_us(
                &LATENCY_BOUNDS_US,
                &{
                    let mut h = vec![0; 17];
                    h[2] = 300;
                    h[3] = 100;
                    h
                },
                0.5
            )
        );
        assert!(s.p95_us >= s.p50_us);
        let empty = summarise(&[]);
        assert_eq!(empty, TelemetrySummary::default());
    }

    #[test]
    fn wave_health_compares_the_new_version_with_the_old() {
        let wave = BTreeSet::from(["a", "b"]);
        let others = BTreeSet::from(["c", "d"]);
        // Wave: 100 + 100 inferences, 10 errors, all in the 500 us bucket (index 3);
        // baseline: 200 inferences in the 200 us bucket (index 2).
        let rows = vec![
            row("a", "new", 100, 4, 3),
            row("b", "new", 100, 6, 3),
            row("c", "old", 150, 0, 2),
            row("d", "old", 50, 0, 2),
            row("x", "old", 10_000, 10_000, 15), // not in the rollout
        ];
        let h = wave_health(Subject::Model(dg("new")), &wave, &others, &rows);
        assert_eq!(h.error_rate, Some(10.0 / 210.0));
        // p95 interpolated in each bucket: 200 + 300 * 0.95 over 100 + 100 * 0.95.
        let expect = 485.0 / 195.0;
        let got = h.p95_latency_ratio.unwrap_or(f64::NAN);
        assert!((got - expect).abs() < 1e-9, "{got}");
        // A wave device still on the old bundle counts for neither side.
        let rows2 = vec![row("a", "old", 1000, 1000, 3), row("c", "old", 100, 0, 2)];
        assert_eq!(
            wave_health(Subject::Model(dg("new")), &wave, &others, &rows2),
            WaveHealth::default()
        );
        // Too little traffic: unknown.
        let rows3 = vec![row("a", "new", 10, 9, 3), row("c", "old", 100, 0, 2)];
        let h = wave_health(Subject::Model(dg("new")), &wave, &others, &rows3);
        assert_eq!(h.p95_latency_ratio, None);
        assert_eq!(h.error_rate, Some(9.0 / 19.0).filter(|_| false));
    }

    #[test]
    fn a_chunk_is_queued_once_and_sent_again_no_sooner_than_the_hold() {
        let (a, b) = (dg("a"), dg("b"));
        let mut q = ChunkQueue::default();
        assert!(q.push((a, 0), 100, 25));
        assert!(!q.push((a, 0), 110, 25), "queued already: merged");
        assert!(q.push((b, 3), 105, 25));
        assert_eq!(q.next(), Some((125, (a, 0))));
        assert_eq!(q.take(125), Some((a, 0)));
        assert_eq!(q.next(), Some((130, (b, 3))));
        // Asked again right after it went: queued (never dropped), but held.
        assert!(q.push((a, 0), 200, 25));
        assert_eq!(q.take(130), Some((b, 3)));
        assert_eq!(q.next(), Some((125 + REPEAT_HOLD_MS, (a, 0))));
        // A fresh chunk asked later is not stuck behind the held one.
        assert!(q.push((b, 4), 300, 25));
        assert_eq!(q.next(), Some((325, (b, 4))));
        assert_eq!(q.take(325), Some((b, 4)));
        assert_eq!(q.take(1125), Some((a, 0)));
        assert_eq!(q.next(), None);
        // Long after its last send, a chunk goes after the coalescing wait only.
        assert!(q.push((a, 0), 5000, 25));
        assert_eq!(q.next(), Some((5025, (a, 0))));
    }

    #[test]
    fn a_chunk_repeated_in_a_row_is_held_twice_as_long_each_time_up_to_8_s() {
        let a = dg("a");
        let mut q = ChunkQueue::default();
        // Asked for again as soon as it goes: sent at 0, 1, 3, 7, 15, 23 s.
        let mut sends = Vec::new();
        let mut now = 0;
        for _ in 0..6 {
            assert!(q.push((a, 0), now, 0));
            let (due, chunk) = q.next().expect("queued");
            assert_eq!(chunk, (a, 0));
            now = due;
            assert_eq!(q.take(now), Some((a, 0)));
            sends.push(now);
        }
        assert_eq!(sends, [0, 1000, 3000, 7000, 15_000, 23_000]);
        // A request after the streak (twice the 8 s hold) starts over: held
        // 1 s after its send, then 2 s.
        now += 16_000;
        assert!(q.push((a, 0), now, 25));
        assert_eq!(q.next(), Some((now + 25, (a, 0))));
        assert_eq!(q.take(now + 25), Some((a, 0)));
        assert!(q.push((a, 0), now + 30, 25));
        assert_eq!(q.next(), Some((now + 1025, (a, 0))));
        assert_eq!(q.take(now + 1025), Some((a, 0)));
        assert!(q.push((a, 0), now + 1030, 25));
        assert_eq!(q.next(), Some((now + 3025, (a, 0))));
    }
}
