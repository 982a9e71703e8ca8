//! Protocol-level load devices, thousands in one process (issue 23). Each is a
//! real MQTT connection with its own enrolled certificate (mutual TLS through
//! the controller's gate), speaking `shared::protocol`'s messages: a retained
//! state and its will, telemetry with sequence numbers, events, signed
//! commands checked as an agent checks them, and installs that download every
//! chunk of the bundle and check each against the manifest's signed chunk
//! table (listening first on the shared chunk topic, as agents do, so that a
//! wave costs about one copy of the bundle). No model is loaded and nothing is written to disk: a load device
//! costs a connection, its buffers and a chunk bitmap.
//!
//! What a load device does not do (the fleet simulator's real agents do): it
//! checks the bundle header against the command's digest, not against a trust
//! root (the command itself is signed by the controller); it runs no golden
//! cases; its telemetry's inference counts are made up, at `requests_per_s`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_agent::chunks::ChunkTracker;
use edgefleet_shared::bundle::verify_chunk;
use edgefleet_shared::commands::{self, CommandPolicy, CommandRefusal, ReplayWindow};
use edgefleet_shared::manifest::Manifest;
use edgefleet_shared::protocol::{
    self, Action, AgentMetrics, BundleOffer, BundleRef, Chunk, DeviceMetrics, DeviceState,
    DeviceTopic, Event, EventKind, FailureReason, FetchRequest, InstallMode, InstallResult,
    LATENCY_BOUNDS_US, ModelMetrics, Slot, SlotRole, SlotState, Telemetry, TelemetryAck, Topic,
    Topics,
};
use edgefleet_shared::{Arch, DeviceId, Digest, PublicKey, RawHeader, UnixTime};
use rumqttc::{AsyncClient, Event as MqttEvent, LastWill, MqttOptions, Packet, QoS, Transport};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::sim::TlsFiles;

/// Chunks asked for in one fetch request (the controller's cap per request).
const FETCH_WINDOW: u32 = 64;

/// A download with no chunk for this long asks again for what it misses.
const STALL: Duration = Duration::from_secs(2);

/// A new download first listens on the shared chunk topic for this long times
/// 0.5 to 1 (random), as an agent does (`fetch_listen`): the chunks others of
/// its wave asked for may be all it needs.
const LISTEN: Duration = Duration::from_secs(2);

/// ... and keeps listening while chunks keep coming, until this long without one.
const LISTEN_QUIET: Duration = Duration::from_millis(300);

/// How often a download checks whether to ask (listening over, or stalled).
const PUMP: Duration = Duration::from_millis(100);

/// What every load device of a fleet shares.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// The broker (the controller's gate, or an external broker), or the nodes
    /// of a broker cluster: device number `i` dials `brokers[i % n]` first and
    /// the next node after a failed or lost connection.
    pub brokers: Vec<SocketAddr>,
    /// Topic prefix.
    pub topic_prefix: String,
    /// The controller's command key (`controller.pub` of an enrollment).
    pub controller_key: PathBuf,
    /// Telemetry period.
    pub telemetry_interval: Duration,
    /// Inferences a device reports per second of its telemetry period.
    pub requests_per_s: u64,
    /// QoS of the command subscription (the enrollment's `subscribe_qos`:
    /// 1, or 0 on a NATS cluster). Acknowledgements and chunks are QoS 0.
    pub subscribe_qos: QoS,
    /// First connections per second: device `i` dials after `i / n` s (None:
    /// all at once).
    pub connect_per_s: Option<u32>,
}

/// One load device: its id and its enrollment's certificate files.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Device id (its certificate's common name).
    pub id: String,
    /// Certificate, key and CA (mutual TLS).
    pub tls: TlsFiles,
}

/// Counters over the whole load fleet.
#[derive(Debug, Default)]
pub struct LoadStats {
    /// Connections acknowledged by the broker.
    pub connects: AtomicU64,
    /// Telemetry messages handed to the MQTT client.
    pub telemetry_sent: AtomicU64,
    /// Chunk messages received.
    pub chunks_received: AtomicU64,
    /// Chunk bytes received.
    pub chunk_bytes: AtomicU64,
    /// Chunks that did not match the signed table (dropped).
    pub chunks_rejected: AtomicU64,
    /// Commands refused (bad signature, stale, another device's).
    pub commands_refused: AtomicU64,
    /// Copies of a command already carried out, refused as replays: the
    /// controller sends an unanswered command again as the same command.
    pub commands_replayed: AtomicU64,
    /// Installs completed.
    pub installs: AtomicU64,
    /// Messages dropped because a device's outbox was full (or, for
    /// telemetry, because more than [`UNSTORED`] reports waited for the
    /// controller's acknowledgement).
    pub dropped: AtomicU64,
    /// Reports sent again: no acknowledgement from the controller in time.
    pub telemetry_resent: AtomicU64,
}

/// Why a load fleet did not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A device id that is not one.
    #[error(transparent)]
    Id(#[from] edgefleet_shared::ids::InvalidId),
    /// The controller key or a device's certificate files.
    #[error("{0}")]
    Files(String),
}

/// Load devices running in this process.
#[derive(Debug)]
pub struct LoadFleet {
    stats: Arc<LoadStats>,
    serving: Arc<Mutex<HashMap<String, Digest>>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl LoadFleet {
    /// Connects every device (each in its own task; they connect as fast as
    /// the broker accepts them).
    pub async fn start(
        settings: &LoadSettings,
        specs: Vec<LoadSpec>,
    ) -> Result<LoadFleet, LoadError> {
        let pem = std::fs::read_to_string(&settings.controller_key)
            .map_err(|e| LoadError::Files(format!("{}: {e}", settings.controller_key.display())))?;
        let key = PublicKey::from_pem(&pem)
            .map_err(|e| LoadError::Files(format!("{}: {e}", settings.controller_key.display())))?;
        let topics = Topics::new(&settings.topic_prefix)?;
        let stats = Arc::new(LoadStats::default());
        let serving = Arc::new(Mutex::new(HashMap::new()));
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::with_capacity(specs.len());
        if settings.brokers.is_empty() {
            return Err(LoadError::Files("no broker to dial".into()));
        }
        for (i, spec) in specs.into_iter().enumerate() {
            let id = DeviceId::new(&spec.id)?;
            let tls =
                edgefleet_agent::link::tls_config(&spec.tls.ca, &spec.tls.cert, &spec.tls.key)
                    .map_err(|e| LoadError::Files(format!("{}: {e}", spec.id)))?;
            let device = LoadDevice {
                policy: CommandPolicy {
                    key,
                    device: id.clone(),
                    max_age_s: commands::DEFAULT_MAX_AGE_S,
                    max_ahead_s: commands::DEFAULT_MAX_AHEAD_S,
                },
                id,
                topics: topics.clone(),
                replay: ReplayWindow::default(),
                epoch: edgefleet_agent::link::random_u64() >> 1,
                event_seq: 0,
                telemetry_seq: 0,
                interval: settings.telemetry_interval,
                requests_per_s: settings.requests_per_s,
                subscribe_qos: settings.subscribe_qos,
                slots: Slots::default(),
                last_install: None,
                download: None,
                stats: stats.clone(),
                serving: serving.clone(),
                outbox: VecDeque::new(),
                unstored: BTreeMap::new(),
            };
            let n = settings.brokers.len();
            let brokers: Vec<SocketAddr> = (0..n).map(|k| settings.brokers[(i + k) % n]).collect();
            let after = settings.connect_per_s.map_or(Duration::ZERO, |n| {
                Duration::from_secs_f64(i as f64 / f64::from(n))
            });
            tasks.push(tokio::spawn(device.run(
                brokers,
                tls,
                after,
                stop_rx.clone(),
            )));
        }
        Ok(LoadFleet {
            stats,
            serving,
            stop,
            tasks,
        })
    }

    /// The fleet's counters.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// How many devices serve each bundle.
    pub fn serving(&self) -> HashMap<Digest, usize> {
        let mut out = HashMap::new();
        for digest in self
            .serving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            *out.entry(*digest).or_insert(0) += 1;
        }
        out
    }

    /// Stops every device: each waits up to 12 s for the controller to
    /// acknowledge its reports, then disconnects (DISCONNECT: no will). Waits
    /// up to 15 s for them. Returns their final counters.
    pub async fn stop(self) -> Arc<LoadStats> {
        let _ = self.stop.send(true);
        let all = futures_join(self.tasks);
        let _ = tokio::time::timeout(DRAIN + Duration::from_secs(3), all).await;
        self.stats
    }
}

/// What a load device's event loop hands it.
#[derive(Debug)]
enum Incoming {
    /// A subscription was refused, or a publish not acknowledged: subscribe
    /// and announce again.
    Resubscribe,
    /// The broker accepted the connection.
    Connected,
    /// A message on a subscribed topic.
    Message {
        topic: String,
        payload: bytes::Bytes,
    },
}

/// Polls the MQTT event loop, reconnecting with a backoff up to 10 s, until
/// the device stops listening (or sends DISCONNECT).
async fn drive(
    mut eventloop: rumqttc::EventLoop,
    brokers: Vec<MqttOptions>,
    tx: tokio::sync::mpsc::Sender<Incoming>,
    device: DeviceId,
) {
    let mut dialled = 0;
    // The agent's reconnect backoff (doubling, jittered in its upper half), to 10 s.
    let mut backoff =
        edgefleet_agent::link::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    // QoS 1 publishes the broker has not acknowledged yet, by packet id. One
    // left unacknowledged for 10 s (a NATS cluster drops a publish it cannot
    // store while a node's streams move) makes the device announce itself
    // again: its state would otherwise stay unseen.
    let mut unacked: HashMap<u16, Instant> = HashMap::new();
    loop {
        let polled = eventloop.poll().await;
        if unacked
            .values()
            .any(|at| at.elapsed() >= Duration::from_secs(10))
        {
            unacked.clear();
            tracing::debug!(%device, "a publish not acknowledged in 10 s; announcing again");
            if tx.send(Incoming::Resubscribe).await.is_err() {
                return;
            }
        }
        let sent = match polled {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                unacked.clear();
                tx.send(Incoming::Connected).await
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                if pkid != 0 {
                    unacked.insert(pkid, Instant::now());
                }
                Ok(())
            }
            Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                unacked.remove(&ack.pkid);
                Ok(())
            }
            // Refused for now (a NATS cluster electing a JetStream leader):
            // subscribe and announce again, as after a connect, in a second.
            Ok(MqttEvent::Incoming(Packet::SubAck(ack)))
                if edgefleet_agent::link::refused(&ack) =>
            {
                tracing::debug!(%device, "subscription refused; again in 1 s");
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = tx.send(Incoming::Resubscribe).await;
                });
                Ok(())
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                tx.send(Incoming::Message {
                    topic: p.topic,
                    payload: p.payload,
                })
                .await
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!(%device, "load device link: {e}");
                // The next node of a cluster (the will goes with the options).
                dialled = (dialled + 1) % brokers.len();
                eventloop.mqtt_options = brokers[dialled].clone();
                let delay = backoff.next_delay(edgefleet_agent::link::random_u64());
                tokio::time::sleep(delay).await;
                Ok(())
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A share in [0.5, 1), so that a wave's devices do not all ask at once.
fn listen_share() -> f64 {
    0.5 + (edgefleet_agent::link::random_u64() % 1000) as f64 / 2000.0
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// The two slots of a load device.
#[derive(Debug, Default)]
struct Slots {
    active: Option<(Slot, BundleRef)>,
    other: Option<(Slot, BundleRef, SlotRole)>,
}

impl Slots {
    /// The slot a new install goes into.
    fn target(&self) -> Slot {
        self.active.as_ref().map_or(Slot::A, |(s, _)| s.other())
    }

    fn states(&self) -> Vec<SlotState> {
        let mut out = Vec::new();
        if let Some((slot, bundle)) = &self.active {
            out.push(SlotState {
                slot: *slot,
                bundle: bundle.clone(),
                role: SlotRole::Active,
            });
        }
        if let Some((slot, bundle, role)) = &self.other {
            out.push(SlotState {
                slot: *slot,
                bundle: bundle.clone(),
                role: *role,
            });
        }
        out
    }
}

/// A download in progress.
#[derive(Debug)]
struct Download {
    command: u64,
    digest: Digest,
    mode: InstallMode,
    manifest: Manifest,
    tracker: ChunkTracker,
    /// Chunks received since the last fetch request.
    since_request: u32,
    /// Chunks the last fetch request asked for.
    requested: u32,
    last_chunk: tokio::time::Instant,
    /// Until then, and while chunks keep coming, only listen.
    listen_until: Option<tokio::time::Instant>,
    reported_tenth: u32,
}

#[derive(Debug)]
struct LoadDevice {
    id: DeviceId,
    topics: Topics,
    policy: CommandPolicy,
    replay: ReplayWindow,
    epoch: u64,
    event_seq: u64,
    telemetry_seq: u64,
    interval: Duration,
    requests_per_s: u64,
    subscribe_qos: QoS,
    slots: Slots,
    last_install: Option<InstallResult>,
    download: Option<Download>,
    stats: Arc<LoadStats>,
    serving: Arc<Mutex<HashMap<String, Digest>>>,
    /// What the MQTT client's queue could not take yet.
    outbox: VecDeque<Out>,
    /// Reports sent and not yet acknowledged by the controller, with when
    /// they were last sent: sent again when overdue, as the agent does.
    unstored: BTreeMap<u64, (Vec<u8>, Instant)>,
}

/// A message or subscription waiting for the MQTT client.
#[derive(Debug)]
enum Out {
    Publish(String, QoS, bool, Vec<u8>),
    Subscribe(String, QoS),
}

/// Most messages a load device keeps waiting for its MQTT client.
const OUTBOX: usize = 256;

/// Most reports a load device keeps for the controller's acknowledgement.
const UNSTORED: usize = 64;

/// Longest a stopping load device waits for its reports' acknowledgements.
const DRAIN: Duration = Duration::from_secs(12);

impl LoadDevice {
    fn topic(&self, kind: DeviceTopic) -> String {
        self.topics.device(&self.id, kind)
    }

    fn state(&self, online: bool) -> Vec<u8> {
        protocol::encode(&DeviceState {
            device: self.id.clone(),
            at: UnixTime::now(),
            online,
            agent_version: format!("{}-load", env!("CARGO_PKG_VERSION")),
            arch: Arch::current(),
            slots: self.slots.states(),
            last_install: self.last_install.clone(),
        })
    }

    fn options(&self, broker: SocketAddr, tls: &rustls::ClientConfig) -> MqttOptions {
        let mut options =
            MqttOptions::new(self.id.as_str(), broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(60));
        options.set_clean_session(true);
        options.set_max_packet_size(8 << 20, 64 << 10);
        options.set_request_channel_capacity(64);
        options.set_transport(Transport::tls_with_config(tls.clone().into()));
        options.set_last_will(LastWill::new(
            self.topic(DeviceTopic::State),
            self.state(false),
            QoS::AtLeastOnce,
            true,
        ));
        options
    }

    /// Runs the device on `brokers` (dialled in turn) until `stop`.
    async fn run(
        mut self,
        brokers: Vec<SocketAddr>,
        tls: rustls::ClientConfig,
        after: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        tokio::select! {
            () = tokio::time::sleep(after) => {}
            _ = stop.changed() => return,
        }
        let brokers: Vec<MqttOptions> = brokers.iter().map(|b| self.options(*b, &tls)).collect();
        let (client, mut eventloop) = AsyncClient::new(brokers[0].clone(), 64);
        // rumqttc gives up on a connection after 5 s; in a storm of thousands
        // the gate's TLS handshakes queue longer than that, and every device
        // that gave up came back to the end of the queue (7,764 connections
        // for 5,000 devices).
        eventloop.network_options.set_connection_timeout(30);
        // The event loop in its own task: `poll` is not cancel-safe while it
        // connects, so it must not race the timers below in a `select!`.
        let (tx, mut incoming) = tokio::sync::mpsc::channel(64);
        let mut link = tokio::spawn(drive(eventloop, brokers, tx, self.id.clone()));
        let mut telemetry = tokio::time::interval(self.interval);
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pump = tokio::time::interval(PUMP);
        loop {
            tokio::select! {
                got = incoming.recv() => match got {
                    Some(Incoming::Connected) => {
                        self.stats.connects.fetch_add(1, Ordering::Relaxed);
                        self.on_connect(&client);
                    }
                    Some(Incoming::Resubscribe) => self.on_connect(&client),
                    Some(Incoming::Message { topic, payload }) => {
                        self.on_message(&client, &topic, &payload);
                    }
                    None => return,
                },
                _ = telemetry.tick() => self.report(&client),
                _ = pump.tick() => {
                    self.flush(&client);
                    self.pump(&client);
                    self.resend_unstored(&client);
                }
                () = stopped(&mut stop) => {
                    self.drain(&client, &mut incoming, &mut pump).await;
                    let _ = client.try_disconnect();
                    // Lets the event loop send the DISCONNECT.
                    if tokio::time::timeout(Duration::from_millis(500), &mut link).await.is_err() {
                        link.abort();
                    }
                    return;
                }
            }
        }
    }

    fn on_connect(&mut self, client: &AsyncClient) {
        // Subscribed before saying it is online, as the agent does: the
        // broker handles a client's packets in order, so a command sent
        // once the controller sees the device online reaches it (in the
        // other order, one sent at once was lost and resent a minute later).
        let commands = Out::Subscribe(self.topic(DeviceTopic::Commands), self.subscribe_qos);
        self.out(client, commands);
        let acks = Out::Subscribe(self.topic(DeviceTopic::Acks), QoS::AtMostOnce);
        self.out(client, acks);
        let state = Out::Publish(
            self.topic(DeviceTopic::State),
            QoS::AtLeastOnce,
            true,
            self.state(true),
        );
        self.out(client, state);
        if let Some(d) = &self.download {
            let chunks = Out::Subscribe(self.topics.bundle_chunks(&d.digest), QoS::AtMostOnce);
            self.out(client, chunks);
            self.request_chunks(client);
        }
    }

    fn on_message(&mut self, client: &AsyncClient, topic: &str, payload: &[u8]) {
        match self.topics.parse(topic) {
            Some(Topic::BundleChunks { .. }) => self.on_chunk(client, payload),
            Some(Topic::Device {
                kind: DeviceTopic::Acks,
                ..
            }) => {
                if let Ok(ack) = protocol::decode::<TelemetryAck>(payload)
                    && ack.epoch == self.epoch
                {
                    for seq in ack.seqs {
                        self.unstored.remove(&seq);
                    }
                }
            }
            Some(Topic::Device {
                kind: DeviceTopic::Commands,
                ..
            }) => {
                match commands::open_command(payload, &self.policy, UnixTime::now(), &self.replay) {
                    Ok(command) => {
                        self.replay.record(command.id);
                        self.on_command(client, command.id, command.action);
                    }
                    Err(refusal) => {
                        let counter = match refusal {
                            CommandRefusal::Replayed { .. } => &self.stats.commands_replayed,
                            _ => &self.stats.commands_refused,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        // As the agent words it: the code first.
                        let detail = format!("{}: {refusal}", refusal.code());
                        self.emit(client, None, EventKind::CommandRejected { detail });
                    }
                }
            }
            _ => {}
        }
    }

    fn on_command(&mut self, client: &AsyncClient, command: u64, action: Action) {
        match action {
            Action::Install { bundle, mode } => self.start_install(client, command, bundle, mode),
            Action::Activate { digest } => match self.slots.other.take() {
                Some((slot, bundle, SlotRole::Staged | SlotRole::Shadow))
                    if bundle.digest == digest =>
                {
                    self.switch_to(slot, bundle);
                    self.emit(client, Some(command), EventKind::Activated { digest, slot });
                    self.publish_state(client);
                }
                other => {
                    self.slots.other = other;
                    let detail = format!("bundle {} is not staged here", digest.short());
                    self.emit(client, Some(command), EventKind::CommandRejected { detail });
                }
            },
            // A load device serves one channel: reverting it by name is the same.
            Action::Revert | Action::RevertChannel { .. } => match self.slots.other.take() {
                Some((slot, bundle, SlotRole::Previous)) => {
                    let digest = bundle.digest;
                    self.switch_to(slot, bundle);
                    self.emit(client, Some(command), EventKind::Reverted { digest, slot });
                    self.publish_state(client);
                }
                other => {
                    self.slots.other = other;
                    let detail = "no previous bundle to revert to".to_owned();
                    self.emit(client, Some(command), EventKind::CommandRejected { detail });
                }
            },
            Action::Configure(settings) => {
                if let Some(s) = settings.telemetry_interval_s {
                    self.interval = Duration::from_secs(u64::from(s.max(1)));
                }
            }
            Action::Remove { .. } => {
                let detail =
                    "a load device keeps its one channel (remove is not simulated)".to_owned();
                self.emit(client, Some(command), EventKind::CommandRejected { detail });
            }
            Action::RequestSamples { .. } => {
                let detail = "a load device captures no samples".to_owned();
                self.emit(client, Some(command), EventKind::CommandRejected { detail });
            }
            Action::UpdateAgent { .. } => {
                let detail = "a load device has no agent binary to update".to_owned();
                self.emit(client, Some(command), EventKind::CommandRejected { detail });
            }
        }
    }

    /// The active slot becomes `slot` with `bundle`; the one it replaces is
    /// kept as the previous.
    fn switch_to(&mut self, slot: Slot, bundle: BundleRef) {
        self.serving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id.to_string(), bundle.digest);
        if let Some((old_slot, old)) = self.slots.active.replace((slot, bundle)) {
            self.slots.other = Some((old_slot, old, SlotRole::Previous));
        }
    }

    fn start_install(
        &mut self,
        client: &AsyncClient,
        command: u64,
        offer: BundleOffer,
        mode: InstallMode,
    ) {
        let digest = offer.digest;
        if let Some((slot, b)) = &self.slots.active
            && b.digest == digest
        {
            let slot = *slot;
            let kind = EventKind::InstallSucceeded {
                digest,
                slot,
                activated: true,
            };
            return self.emit(client, Some(command), kind);
        }
        if self.download.as_ref().is_some_and(|d| d.digest == digest) {
            return self.request_chunks(client);
        }
        let manifest = RawHeader::parse(&offer.header)
            .map_err(|e| e.to_string())
            .and_then(|raw| {
                if raw.digest() != digest {
                    return Err(format!(
                        "the command names bundle {} but its header is bundle {}",
                        digest.short(),
                        raw.digest().short()
                    ));
                }
                raw.decode_unverified().map_err(|e| e.to_string())
            });
        let manifest = match manifest {
            Ok(m) => m,
            Err(detail) => {
                let reason = FailureReason::Download { detail };
                return self.fail(client, command, digest, reason);
            }
        };
        if let Some(old) = self.download.take() {
            let _ = client.try_unsubscribe(self.topics.bundle_chunks(&old.digest));
        }
        let total = manifest.payload.chunks.len() as u32;
        self.download = Some(Download {
            command,
            digest,
            mode,
            manifest,
            tracker: ChunkTracker::new(total),
            since_request: 0,
            requested: 0,
            last_chunk: tokio::time::Instant::now(),
            listen_until: Some(tokio::time::Instant::now() + LISTEN.mul_f64(listen_share())),
            reported_tenth: 0,
        });
        self.emit(client, Some(command), EventKind::InstallStarted { digest });
        let chunks = Out::Subscribe(self.topics.bundle_chunks(&digest), QoS::AtMostOnce);
        self.out(client, chunks);
    }

    /// Asks for the next window of missing chunks.
    fn request_chunks(&mut self, client: &AsyncClient) {
        let topic = self.topic(DeviceTopic::Fetch);
        let Some(d) = self.download.as_mut() else {
            return;
        };
        let ranges = d.tracker.missing_ranges(FETCH_WINDOW, 16);
        if ranges.is_empty() {
            return;
        }
        d.requested = ranges.iter().map(|r| r.count).sum();
        d.since_request = 0;
        d.last_chunk = tokio::time::Instant::now();
        let request = FetchRequest {
            bundle: d.digest,
            ranges,
        };
        self.out(
            client,
            Out::Publish(topic, QoS::AtLeastOnce, false, protocol::encode(&request)),
        );
    }

    /// Asks once listening is over (its time passed and no chunk came for
    /// [`LISTEN_QUIET`]), and again when the download stalls.
    fn pump(&mut self, client: &AsyncClient) {
        let Some(d) = self.download.as_mut() else {
            return;
        };
        let quiet = d.last_chunk.elapsed();
        let ask = match d.listen_until {
            Some(until) => tokio::time::Instant::now() >= until && quiet >= LISTEN_QUIET,
            None => quiet >= STALL,
        };
        if ask {
            d.listen_until = None;
            self.request_chunks(client);
        }
    }

    fn on_chunk(&mut self, client: &AsyncClient, payload: &[u8]) {
        self.stats.chunks_received.fetch_add(1, Ordering::Relaxed);
        self.stats
            .chunk_bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let Ok(chunk) = protocol::decode::<Chunk>(payload) else {
            self.stats.chunks_rejected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(d) = self.download.as_mut() else {
            return;
        };
        if chunk.bundle != d.digest || d.tracker.has(chunk.index) {
            return;
        }
        if verify_chunk(&d.manifest.payload, chunk.index, &chunk.data).is_err() {
            self.stats.chunks_rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        d.tracker.mark(chunk.index);
        d.since_request += 1;
        d.last_chunk = tokio::time::Instant::now();
        let (done, total) = (d.tracker.done(), d.tracker.total());
        let tenth = done * 10 / total.max(1);
        let progress = (tenth > d.reported_tenth).then(|| {
            d.reported_tenth = tenth;
            (d.command, d.digest)
        });
        let window_done = d.since_request >= d.requested;
        let listening = d.listen_until.is_some();
        if let Some((command, digest)) = progress
            && done < total
        {
            let kind = EventKind::InstallProgress {
                digest,
                chunks_done: done,
                chunks_total: total,
            };
            self.emit(client, Some(command), kind);
        }
        if done == total {
            self.finish(client);
        } else if window_done && !listening {
            self.request_chunks(client);
        }
    }

    fn finish(&mut self, client: &AsyncClient) {
        let Some(d) = self.download.take() else {
            return;
        };
        let _ = client.try_unsubscribe(self.topics.bundle_chunks(&d.digest));
        self.stats.installs.fetch_add(1, Ordering::Relaxed);
        let bundle = BundleRef {
            digest: d.digest,
            channel: d.manifest.channel.clone(),
            version: d.manifest.version.to_string(),
            release: d.manifest.release,
        };
        let slot = self.slots.target();
        let activated = d.mode == InstallMode::Activate;
        if activated {
            self.switch_to(slot, bundle);
        } else {
            let role = if d.mode == InstallMode::Shadow {
                SlotRole::Shadow
            } else {
                SlotRole::Staged
            };
            self.slots.other = Some((slot, bundle, role));
        }
        self.last_install = Some(InstallResult {
            digest: d.digest,
            at: UnixTime::now(),
            failure: None,
        });
        let kind = EventKind::InstallSucceeded {
            digest: d.digest,
            slot,
            activated,
        };
        self.emit(client, Some(d.command), kind);
        self.publish_state(client);
    }

    fn fail(&mut self, client: &AsyncClient, command: u64, digest: Digest, reason: FailureReason) {
        self.last_install = Some(InstallResult {
            digest,
            at: UnixTime::now(),
            failure: Some(reason.clone()),
        });
        self.emit(
            client,
            Some(command),
            EventKind::InstallFailed { digest, reason },
        );
        self.publish_state(client);
    }

    fn publish_state(&mut self, client: &AsyncClient) {
        let state = Out::Publish(
            self.topic(DeviceTopic::State),
            QoS::AtLeastOnce,
            true,
            self.state(true),
        );
        self.out(client, state);
    }

    /// Hands `out` to the MQTT client after what is still waiting; what the
    /// client's queue cannot take yet waits in the device's outbox (retried
    /// every [`PUMP`]), so that no event is lost to a full queue (an agent
    /// spools them; 3,074 of 5,000 install results were lost at 5,000
    /// devices before). Past [`OUTBOX`] messages the oldest is dropped and
    /// counted.
    fn out(&mut self, client: &AsyncClient, out: Out) {
        if self.outbox.len() >= OUTBOX {
            self.outbox.pop_front();
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.outbox.push_back(out);
        self.flush(client);
    }

    fn flush(&mut self, client: &AsyncClient) {
        while let Some(next) = self.outbox.pop_front() {
            let taken = match &next {
                Out::Publish(topic, qos, retain, payload) => client
                    .try_publish(topic.clone(), *qos, *retain, payload.clone())
                    .is_ok(),
                Out::Subscribe(topic, qos) => client.try_subscribe(topic.clone(), *qos).is_ok(),
            };
            if !taken {
                self.outbox.push_front(next);
                return;
            }
        }
    }

    fn emit(&mut self, client: &AsyncClient, command: Option<u64>, kind: EventKind) {
        self.event_seq += 1;
        let event = Event {
            device: self.id.clone(),
            epoch: self.epoch,
            seq: self.event_seq,
            at: UnixTime::now(),
            command,
            kind,
        };
        let event = Out::Publish(
            self.topic(DeviceTopic::Events),
            QoS::AtLeastOnce,
            false,
            protocol::encode(&event),
        );
        self.out(client, event);
    }

    /// Telemetry: counters since the active bundle came, made up at
    /// `requests_per_s` with every latency in the second bucket.
    fn report(&mut self, client: &AsyncClient) {
        self.telemetry_seq += 1;
        let seconds = self.telemetry_seq * self.interval.as_secs().max(1);
        let inferences = seconds * self.requests_per_s;
        let model = self.slots.active.as_ref().map(|(_, b)| {
            let mut counts = vec![0; LATENCY_BOUNDS_US.len() + 1];
            counts[1] = inferences;
            ModelMetrics {
                digest: b.digest,
                inferences,
                errors: 0,
                latency_bounds_us: LATENCY_BOUNDS_US.to_vec(),
                latency_counts: counts,
            }
        });
        let t = Telemetry {
            device: self.id.clone(),
            epoch: self.epoch,
            seq: self.telemetry_seq,
            at: UnixTime::now(),
            device_metrics: DeviceMetrics::default(),
            agent: AgentMetrics {
                rss_bytes: 0,
                version: format!("{}-load", env!("CARGO_PKG_VERSION")),
                spool_dropped: 0,
            },
            model,
            drift: None,
            shadow: None,
            channels: Vec::new(),
        };
        self.stats.telemetry_sent.fetch_add(1, Ordering::Relaxed);
        let payload = protocol::encode(&t);
        if self.unstored.len() >= UNSTORED
            && let Some((oldest, _)) = self.unstored.pop_first()
        {
            tracing::debug!(device = %self.id, oldest, "too many unacknowledged reports");
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.unstored
            .insert(self.telemetry_seq, (payload.clone(), Instant::now()));
        let t = Out::Publish(
            self.topic(DeviceTopic::Telemetry),
            QoS::AtMostOnce,
            false,
            payload,
        );
        self.out(client, t);
    }

    /// On stop: no more reports, but up to [`DRAIN`] for the controller to
    /// acknowledge those it has not (sending overdue ones again), so that a
    /// test can count what was stored against what was sent.
    async fn drain(
        &mut self,
        client: &AsyncClient,
        incoming: &mut tokio::sync::mpsc::Receiver<Incoming>,
        pump: &mut tokio::time::Interval,
    ) {
        let deadline = tokio::time::Instant::now() + DRAIN;
        while !self.unstored.is_empty() {
            tokio::select! {
                got = incoming.recv() => match got {
                    Some(Incoming::Message { topic, payload }) => {
                        self.on_message(client, &topic, &payload);
                    }
                    Some(Incoming::Connected | Incoming::Resubscribe) => self.on_connect(client),
                    None => return,
                },
                _ = pump.tick() => {
                    self.flush(client);
                    self.resend_unstored(client);
                }
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Sends again the reports the controller has not acknowledged within
    /// three telemetry periods (at least 5 s).
    fn resend_unstored(&mut self, client: &AsyncClient) {
        let timeout = (self.interval * 3).max(Duration::from_secs(5));
        let now = Instant::now();
        let overdue: Vec<u64> = self
            .unstored
            .iter()
            .filter(|(_, (_, sent))| now.saturating_duration_since(*sent) >= timeout)
            .map(|(seq, _)| *seq)
            .collect();
        let topic = self.topic(DeviceTopic::Telemetry);
        for seq in overdue {
            let Some((payload, sent)) = self.unstored.get_mut(&seq) else {
                continue;
            };
            *sent = now;
            let t = Out::Publish(topic.clone(), QoS::AtMostOnce, false, payload.clone());
            self.stats.telemetry_resent.fetch_add(1, Ordering::Relaxed);
            self.out(client, t);
        }
    }
}
