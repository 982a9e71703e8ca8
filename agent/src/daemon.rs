//! `edgefleet-agent run`: the long-running agent. One task owns the state and
//! handles, in order, what the MQTT link reports (commands, bundle chunks,
//! connects and deliveries) and its own timers (telemetry, stalled downloads).
//! Everything it tells the controller goes through a spool first, so nothing is
//! lost while offline; the local API keeps serving whatever happens here.
//!
//! ```text
//! <data>/downloads/<digest>/offer.cbor   the install command (header, mode, id)
//! <data>/downloads/<digest>/bundle.part  header + payload, chunks written at their offset
//! <data>/downloads/<digest>/chunks.bits  which chunks are on disk (after fsync)
//! <data>/downloads/<digest>/unpacking/   the artifacts so far, unpacked in payload order
//! <data>/spool/events/, spool/telemetry/ see [`crate::spool`]
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgefleet_shared::protocol::{
    self, Action, AgentMetrics, Chunk, Command, DeviceState, DeviceTopic, Event, EventKind,
    FailureReason, FetchRequest, InstallMode, ModelMetrics, Telemetry, Topic, Topics,
};
use edgefleet_shared::{
    DeviceId, Digest, ModelChannel, RawHeader, Refusal, TrustRoot, UnixTime, VerifiedHeader, bundle,
};
use tokio::sync::mpsc;

use crate::api::Served;
use crate::link::{Link, LinkEvent, Tag};
use crate::metrics::LATENCY_BOUNDS_US;
use crate::slots::SlotEvent;

mod agent_update;
mod download;
use crate::spool::Spool;
use crate::store::{self, InstallError, Store, write_atomic};
use crate::sysinfo_probe::Probe;
pub use download::DiskError;
use download::{Download, Offer};
use edgefleet_shared::commands::{self, CommandRefusal, ReplayWindow};

/// What the daemon needs besides its data directory.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// This device.
    pub device: DeviceId,
    /// Which commands are carried out: signed by the pinned controller key,
    /// for this device, fresh, not replayed.
    pub commands: edgefleet_shared::commands::CommandPolicy,
    /// Topic names.
    pub topics: Topics,
    /// The pinned trust root.
    pub trust: TrustRoot,
    /// Time between telemetry reports.
    pub telemetry_interval: Duration,
    /// Bound of the telemetry spool, bytes.
    pub spool_max_bytes: u64,
    /// Largest bundle accepted, bytes.
    pub max_bundle_bytes: u64,
    /// Free disk an install must leave, bytes.
    pub disk_reserve_bytes: u64,
    /// Chunks requested at a time.
    pub fetch_window: u32,
    /// With no chunk for this long, the missing chunks are requested again.
    pub stall_timeout: Duration,
    /// A new download first listens on the bundle's shared chunk topic for a
    /// random time between half this and this before asking for chunks itself:
    /// devices of a wave start within about half of it, and the chunks the first
    /// one asks for reach them all, so a wave costs the controller about one copy
    /// of the bundle rather than one per device.
    pub fetch_listen: Duration,
    /// What this device is, for the bundles' constraints.
    pub facts: edgefleet_shared::bundle::DeviceFacts,
    /// Seconds added to the system clock: 0 on a real device; the fleet
    /// simulator sets it to play a device whose clock is wrong.
    pub clock_skew_s: i64,
    /// After an install, give back what loading the model took
    /// ([`crate::memory::trim_after_load`]): a real agent process; not the
    /// fleet simulator, whose devices share one process.
    pub trim_memory: bool,
    /// How this agent hands the device over to a new binary of itself; none in
    /// the fleet simulator (its devices share one process): `update_agent` is
    /// then refused.
    pub self_update: Option<crate::selfupdate::handover::HandOver>,
    /// This agent is a new binary on trial: it confirms once connected to the
    /// broker (docs/agent-update.md).
    pub trial: Option<crate::selfupdate::start::PendingTrial>,
}

/// A listening download asks for chunks only once no chunk came for this long.
const LISTEN_QUIET: Duration = Duration::from_millis(300);

/// A chunk that fails its digest this many times in a row fails the install.
const MAX_CHUNK_FAILURES: u32 = 3;

/// Bytes of sample data per upload message (under the broker's packet limits).
const SAMPLE_PART_LEN: usize = 60 * 1024;

/// Bytes of chunks read back from disk into the unpacking per chunk that arrives
/// (chunks that came out of order, or before a restart); the rest is read back
/// after the last chunk.
const CATCH_UP_BYTES: u64 = 1 << 20;

/// The long-running agent.
#[derive(Debug)]
pub struct Daemon {
    settings: DaemonSettings,
    store: Store,
    served: Served,
    link: Link,
    events: Spool,
    telemetry: Spool,
    download: Option<Download>,
    probe: Probe,
    /// Spooled records handed to the link and not yet acknowledged.
    in_flight: HashSet<Tag>,
    /// Telemetry the broker took and the controller has not yet said it
    /// stored, with when the broker took it (see [`Daemon::on_telemetry_ack`]).
    unstored: HashMap<u64, Instant>,
    /// Whether the controller acknowledges stored telemetry (it has done so
    /// once); until then a report is forgotten when the broker takes it.
    controller_acks: bool,
    /// When the state was last handed to the link, while the broker has not
    /// acknowledged it.
    state_sent: std::sync::Mutex<Option<Instant>>,
    pending_interval: Option<Duration>,
    heartbeat: Arc<AtomicU64>,
    /// Ids of the commands carried out lately (`<data>/commands.json`).
    replay: ReplayWindow,
}

/// Largest replay-window file read (1,024 ids in JSON are about 21 KB).
const MAX_REPLAY_FILE: u64 = 64 * 1024;

pub use edgefleet_shared::time::now_ms;

/// Why a bundle is not downloaded (before any chunk is asked for).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreflightRefusal {
    /// Over `limits.max_bundle_bytes`.
    #[error(
        "bundle is {size} bytes, over this device's limit of {limit} (limits.max_bundle_bytes)"
    )]
    TooLarge {
        /// The bundle, bytes.
        size: u64,
        /// The limit, bytes.
        limit: u64,
    },
    /// The download and the unpacked copy would not fit beside the reserve.
    #[error(
        "not enough disk: {free} bytes free, the download and unpacked bundle need {needed} plus the reserve of {reserve} (limits.disk_reserve_bytes)"
    )]
    Disk {
        /// Free bytes on the data directory's filesystem.
        free: u64,
        /// Twice the bundle.
        needed: u64,
        /// `limits.disk_reserve_bytes`.
        reserve: u64,
    },
}

/// The preflight decision: a bundle of `size` bytes against the size limit and
/// the free disk (`None`: not known, not checked), which must hold the
/// download and its unpacked copy plus `reserve`.
pub fn preflight(
    size: u64,
    limit: u64,
    free: Option<u64>,
    reserve: u64,
) -> Result<(), PreflightRefusal> {
    if size > limit {
        return Err(PreflightRefusal::TooLarge { size, limit });
    }
    let needed = size.saturating_mul(2);
    // A sum past u64::MAX fits no disk.
    let total = size.checked_mul(2).and_then(|n| n.checked_add(reserve));
    match free {
        Some(free) if total.is_none_or(|total| free < total) => Err(PreflightRefusal::Disk {
            free,
            needed,
            reserve,
        }),
        _ => Ok(()),
    }
}

/// The slot where `digest` is active, in whichever channel.
fn active_slot_of(state: &crate::slots::SlotsState, digest: Digest) -> Option<protocol::Slot> {
    state.channels.values().find_map(|p| {
        p.active_entry()
            .filter(|e| e.bundle.digest == digest)
            .and(p.active)
    })
}

/// What an install command comes to before any download, from the slots and
/// the download in progress (its command and bundle). Pure: the daemon
/// carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallStep {
    /// In the target slot already, in the role asked for: report success.
    AlreadyThere {
        /// The slot.
        slot: protocol::Slot,
    },
    /// Active already: report success again rather than install twice.
    AlreadyActive {
        /// The active slot.
        slot: protocol::Slot,
    },
    /// Installed and health-checked (staged, or run in shadow): only the
    /// switch is left, no second download.
    SwitchOnly,
    /// The same bundle is downloading (a controller retry): carry on.
    Continue,
    /// Download it; `supersedes` is the download given up for it (its command
    /// and bundle), which fails.
    Download {
        /// The other download in progress.
        supersedes: Option<(u64, Digest)>,
    },
}

/// Decides what installing `digest` in `mode` takes, from the slots of its
/// channel (`None`: not known, the header does not decode; its download will
/// refuse it); see [`InstallStep`].
pub fn install_step(
    state: &crate::slots::SlotsState,
    channel: Option<&ModelChannel>,
    downloading: Option<(u64, Digest)>,
    digest: Digest,
    mode: InstallMode,
) -> InstallStep {
    use protocol::SlotRole;
    let state = channel
        .and_then(|c| state.channel(c))
        .cloned()
        .unwrap_or_default();
    let target = state.target_slot();
    let in_target = state.get(target).filter(|e| e.bundle.digest == digest);
    match (mode, in_target.map(|e| e.role)) {
        (InstallMode::Stage, Some(SlotRole::Staged))
        | (InstallMode::Shadow, Some(SlotRole::Shadow)) => {
            return InstallStep::AlreadyThere { slot: target };
        }
        _ => {}
    }
    if state
        .active_entry()
        .is_some_and(|e| e.bundle.digest == digest)
    {
        let slot = state.active.unwrap_or(protocol::Slot::A);
        return InstallStep::AlreadyActive { slot };
    }
    if mode == InstallMode::Activate
        && matches!(
            in_target.map(|e| e.role),
            Some(SlotRole::Staged | SlotRole::Shadow)
        )
    {
        return InstallStep::SwitchOnly;
    }
    match downloading {
        Some((_, d)) if d == digest => InstallStep::Continue,
        supersedes => InstallStep::Download { supersedes },
    }
}

/// The daemon's two spools in the data directory: events (never dropped)
/// and telemetry (bounded by `telemetry.spool_max_bytes`).
#[derive(Debug)]
pub struct Spools {
    events: Spool,
    telemetry: Spool,
}

/// How often opening the spools is tried again while it fails.
pub const SPOOL_RETRY: Duration = Duration::from_secs(5);

impl Spools {
    /// Opens (creating) both spools under `store`.
    pub fn open(store: &Store, telemetry_max_bytes: u64) -> io::Result<Spools> {
        Ok(Spools {
            events: Spool::open(store.dir().join("spool/events"), None)?,
            telemetry: Spool::open(
                store.dir().join("spool/telemetry"),
                Some(telemetry_max_bytes),
            )?,
        })
    }

    /// Opens both spools, trying again every `every` while that fails (a full
    /// or read-only disk at start), until `stop` completes (then `None`). The
    /// heartbeat moves on each try: the agent is alive and retrying, and a
    /// supervisor restart would do no more than this loop does.
    pub async fn open_retrying(
        store: &Store,
        telemetry_max_bytes: u64,
        heartbeat: &AtomicU64,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> Option<Spools> {
        tokio::pin!(stop);
        for attempt in 0u64.. {
            let opened = {
                let store = store.clone();
                tokio::task::spawn_blocking(move || Spools::open(&store, telemetry_max_bytes))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
            };
            heartbeat.store(now_ms(), Ordering::Relaxed);
            match opened {
                Ok(spools) => {
                    if attempt > 0 {
                        tracing::info!(
                            "spool opened after {attempt} failed tries: controller link starting"
                        );
                    }
                    return Some(spools);
                }
                // Said at once, then once a minute.
                Err(e) if attempt % (60 / every.as_secs().clamp(1, 60)) == 0 => tracing::error!(
                    "controller link waiting: cannot open the spool in {}: {e} (trying again every {} s)",
                    store.dir().join("spool").display(),
                    every.as_secs()
                ),
                Err(_) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = &mut stop => return None,
            }
        }
        None
    }
}

impl Daemon {
    /// A daemon on `spools`, with `heartbeat` (see [`Daemon::heartbeat`]);
    /// resumes an interrupted download, if any.
    pub fn new(
        settings: DaemonSettings,
        store: Store,
        served: Served,
        link: Link,
        spools: Spools,
        heartbeat: Arc<AtomicU64>,
    ) -> Daemon {
        let Spools { events, telemetry } = spools;
        heartbeat.store(now_ms(), Ordering::Relaxed);
        let mut daemon = Daemon {
            settings,
            store,
            served,
            link,
            events,
            telemetry,
            download: None,
            probe: Probe::new(),
            in_flight: HashSet::new(),
            unstored: HashMap::new(),
            controller_acks: false,
            state_sent: std::sync::Mutex::new(None),
            pending_interval: None,
            heartbeat,
            replay: ReplayWindow::default(),
        };
        daemon.replay = daemon.load_replay_window();
        daemon.resume_download();
        daemon.update_will();
        daemon.link.connect();
        daemon
    }

    /// When the main loop last ran (ms since the epoch): the systemd watchdog is
    /// only petted while this moves, so a stuck agent gets restarted.
    pub fn heartbeat(&self) -> Arc<AtomicU64> {
        self.heartbeat.clone()
    }

    fn downloads_dir(&self) -> PathBuf {
        self.store.dir().join("downloads")
    }

    /// Runs until `shutdown` resolves or the link ends.
    pub async fn run(
        mut self,
        mut link_events: mpsc::Receiver<LinkEvent>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut telemetry_tick = tokio::time::interval(self.settings.telemetry_interval);
        telemetry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stall_tick = tokio::time::interval(Duration::from_secs(1));
        tokio::pin!(shutdown);
        // A download completed before a restart is installed now.
        self.finish_if_complete().await;
        loop {
            tokio::select! {
                event = link_events.recv() => match event {
                    Some(e) => self.on_link(e).await,
                    None => break,
                },
                _ = telemetry_tick.tick() => self.report_telemetry(),
                _ = stall_tick.tick() => {
                    self.check_stall();
                    self.flush_spools();
                    self.republish_unacknowledged_state();
                }
                () = sleep_until(self.download.as_ref().and_then(|d| d.listen_until)) => {
                    self.request_chunks(true);
                }
                () = &mut shutdown => break,
            }
            self.heartbeat.store(now_ms(), Ordering::Relaxed);
            if let Some(interval) = self.take_new_interval() {
                telemetry_tick = tokio::time::interval(interval);
                telemetry_tick.reset();
            }
        }
        // A clean goodbye: the broker does not send the will on a clean
        // disconnect, so the retained offline state is published here.
        if self.link.is_connected() {
            let state = self.device_state(false);
            let _ = self.link.publish(
                &self.topic(DeviceTopic::State),
                protocol::encode(&state),
                true,
                Tag::None,
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.link.disconnect().await;
        }
    }

    /// The device's idea of the time.
    fn now(&self) -> UnixTime {
        UnixTime::now().plus_secs(self.settings.clock_skew_s)
    }

    fn take_new_interval(&mut self) -> Option<Duration> {
        self.pending_interval.take()
    }

    fn topic(&self, kind: DeviceTopic) -> String {
        self.settings.topics.device(&self.settings.device, kind)
    }

    async fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected => {
                tracing::info!("connected to the broker");
                self.confirm_trial();
                self.in_flight.clear();
                let _ = self.link.subscribe(&self.topic(DeviceTopic::Commands));
                let _ = self.link.subscribe(&self.topic(DeviceTopic::Acks));
                self.publish_state();
                if let Some(d) = &self.download {
                    let _ = self
                        .link
                        .subscribe(&self.settings.topics.bundle_chunks(&d.digest));
                    self.request_chunks(true);
                }
                self.report_agent_update();
                self.flush_spools();
            }
            LinkEvent::Disconnected(detail) => {
                tracing::warn!("broker connection lost or refused: {detail}");
            }
            LinkEvent::Delivered(Tag::Event(seq)) => {
                self.in_flight.remove(&Tag::Event(seq));
                if let Err(e) = self.events.ack(seq) {
                    tracing::error!("event spool: {e}");
                }
            }
            LinkEvent::Delivered(Tag::Telemetry(seq)) => self.on_telemetry_delivered(seq),
            LinkEvent::Delivered(Tag::State) => *lock_state(&self.state_sent) = None,
            LinkEvent::Delivered(Tag::None) => {}
            LinkEvent::Message { topic, payload } => match self.settings.topics.parse(&topic) {
                Some(Topic::Device { device, kind })
                    if kind == DeviceTopic::Commands && device == self.settings.device =>
                {
                    match self.open_command(&payload) {
                        Ok(command) => self.on_command(command).await,
                        Err(refusal) => {
                            tracing::warn!(code = refusal.code(), "refused a command: {refusal}");
                            // A signed command for this device that came too late
                            // (or too early) is answered, so its rollout learns of it;
                            // others are not the controller's.
                            let command = match &refusal {
                                CommandRefusal::Stale { id, .. }
                                | CommandRefusal::FromTheFuture { id, .. } => Some(*id),
                                _ => None,
                            };
                            self.emit(
                                command,
                                EventKind::CommandRejected {
                                    detail: format!("{}: {refusal}", refusal.code()),
                                },
                            );
                        }
                    }
                }
                Some(Topic::Device { device, kind })
                    if kind == DeviceTopic::Acks && device == self.settings.device =>
                {
                    self.on_telemetry_ack(&payload);
                }
                Some(Topic::BundleChunks { bundle }) => {
                    if self.download.as_ref().is_some_and(|d| d.digest == bundle) {
                        match protocol::decode::<Chunk>(&payload) {
                            Ok(chunk) => self.on_chunk(chunk).await,
                            Err(e) => tracing::warn!("dropped a chunk message: {e}"),
                        }
                    }
                }
                _ => tracing::debug!("ignored a message on {topic}"),
            },
        }
    }

    // -- commands ------------------------------------------------------------

    fn replay_path(&self) -> PathBuf {
        self.store.dir().join("commands.json")
    }

    /// The replay window from disk. A missing file is an empty window; an
    /// unreadable one too, with an error logged (commands older than
    /// `command_max_age_s` stay refused as stale).
    fn load_replay_window(&self) -> ReplayWindow {
        let path = self.replay_path();
        let read = || -> io::Result<ReplayWindow> {
            let f = std::fs::File::open(&path)?;
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut io::Read::take(f, MAX_REPLAY_FILE + 1), &mut bytes)?;
            if bytes.len() as u64 > MAX_REPLAY_FILE {
                return Err(io::Error::other(format!("over {MAX_REPLAY_FILE} bytes")));
            }
            serde_json::from_slice(&bytes).map_err(io::Error::other)
        };
        match read() {
            Ok(window) => window,
            Err(_) if !path.exists() => ReplayWindow::default(),
            Err(e) => {
                tracing::error!("replay window {}: {e}; starting empty", path.display());
                ReplayWindow::default()
            }
        }
    }

    /// Checks a payload from the command topic (`shared::commands`) and, if it
    /// is to be carried out, records its id on disk first, so that neither a
    /// replay nor a restart runs it twice.
    fn open_command(&mut self, payload: &[u8]) -> Result<Command, CommandRefusal> {
        let command =
            commands::open_command(payload, &self.settings.commands, self.now(), &self.replay)?;
        self.replay.record(command.id);
        let saved = serde_json::to_vec(&self.replay)
            .map_err(io::Error::other)
            .and_then(|bytes| crate::store::write_atomic(&self.replay_path(), &bytes));
        if let Err(e) = saved {
            // Carried out anyway: a replay window that cannot be saved (full
            // disk) must not stop a revert that may be what frees the disk.
            tracing::error!("replay window {}: {e}", self.replay_path().display());
        }
        Ok(command)
    }

    async fn on_command(&mut self, command: Command) {
        tracing::info!(id = command.id, "command received");
        match command.action {
            Action::Install { bundle, mode } => {
                self.start_install(command.id, bundle.digest, bundle.header, mode)
                    .await;
            }
            Action::Activate { digest } => {
                self.slot_change(command.id, SlotEvent::Activate { digest })
                    .await;
            }
            Action::Revert => self.revert(command.id, None).await,
            Action::RevertChannel { channel } => self.revert(command.id, Some(channel)).await,
            Action::Remove { channel } => {
                self.slot_change(command.id, SlotEvent::Remove { channel })
                    .await;
            }
            Action::Configure(protocol::Settings {
                telemetry_interval_s,
                shadow_sample_permille,
                sample_capture,
            }) => {
                if let Some(on) = sample_capture {
                    self.served.set_capture(on);
                    tracing::info!("sample capture: {:?}", self.served.capture_mode());
                }
                if let Some(p) = shadow_sample_permille {
                    self.served.set_shadow_permille(p);
                    tracing::info!("shadow sampling set to {p} per mille");
                }
                if let Some(s) = telemetry_interval_s {
                    self.pending_interval = Some(Duration::from_secs(u64::from(s)));
                    tracing::info!("telemetry interval set to {s} s");
                }
            }
            Action::RequestSamples {
                channel,
                max_samples,
            } => self.upload_samples(command.id, &channel, max_samples),
            Action::UpdateAgent { release } => self.update_agent(command.id, release).await,
        }
    }

    /// Sends up to `max` kept samples of the served bundle on the samples topic,
    /// in parts of at most [`SAMPLE_PART_LEN`] bytes (docs/protocol.md, "Samples").
    fn upload_samples(&mut self, command: u64, channel: &ModelChannel, max: u32) {
        let reject = |detail: String| EventKind::CommandRejected { detail };
        let Some(served) = self.served.channel(channel.as_str()) else {
            let serving: Vec<String> = self
                .served
                .channels()
                .iter()
                .map(|(c, _)| format!("`{c}`"))
                .collect();
            let detail = match serving.is_empty() {
                true => "no model is served".to_owned(),
                false => format!(
                    "no samples of `{channel}`: this device serves {}",
                    serving.join(", ")
                ),
            };
            return self.emit(Some(command), reject(detail));
        };
        if !self.link.is_connected() {
            return self.emit(Some(command), reject("not connected".into()));
        }
        let Some((digest, samples)) = served.take_samples(max as usize) else {
            let detail = if served.capture_mode() == crate::samples::Capture::Off {
                "sample capture is off on this device (agent config [samples] capture, or configure sample_capture)"
            } else {
                "no sample captured yet"
            };
            return self.emit(Some(command), reject(detail.into()));
        };
        let bytes = protocol::SampleBatch { digest, samples }.to_bytes();
        let parts: Vec<&[u8]> = bytes.chunks(SAMPLE_PART_LEN).collect();
        let total = parts.len().max(1) as u32;
        let topic = self.topic(DeviceTopic::Samples);
        for (i, data) in parts.iter().enumerate() {
            let upload = protocol::SampleUpload {
                command,
                digest,
                part: i as u32,
                parts: total,
                data: data.to_vec(),
            };
            if self
                .link
                .publish(&topic, protocol::encode(&upload), false, Tag::None)
                .is_err()
            {
                return self.emit(Some(command), reject("the upload was cut off".into()));
            }
        }
        tracing::info!(bytes = bytes.len(), parts = total, "samples uploaded");
    }

    /// Activates a bundle already in the inactive slot, answering an install
    /// command as if it had been installed now.
    async fn activate_installed(&mut self, command: u64, digest: Digest) {
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<_, InstallError> {
            let state = store::change_slots(&store, SlotEvent::Activate { digest })?;
            Ok((state, store::load_served(&store)?))
        })
        .await;
        match result {
            Ok(Ok((state, model))) => {
                self.served.replace_all(model);
                tracing::info!(digest = %digest.short(), "activated the installed bundle");
                self.emit(
                    Some(command),
                    EventKind::InstallSucceeded {
                        digest,
                        slot: active_slot_of(&state, digest).unwrap_or(protocol::Slot::A),
                        activated: true,
                    },
                );
                self.publish_state();
            }
            Ok(Err(e)) => self.fail_install(
                command,
                digest,
                FailureReason::Internal {
                    detail: e.to_string(),
                },
            ),
            Err(e) => self.fail_install(
                command,
                digest,
                FailureReason::Internal {
                    detail: format!("internal: {e}"),
                },
            ),
        }
    }

    /// `revert` of `channel`, or of the only channel when the command names none.
    async fn revert(&mut self, command: u64, channel: Option<ModelChannel>) {
        let resolved = self.store.load().map_err(|e| e.to_string()).and_then(|s| {
            s.resolve_channel(channel.as_ref())
                .map_err(|e| e.to_string())
        });
        match resolved {
            Ok(channel) => {
                self.slot_change(command, SlotEvent::Revert { channel })
                    .await;
            }
            Err(detail) => self.emit(Some(command), EventKind::CommandRejected { detail }),
        }
    }

    async fn slot_change(&mut self, command: u64, event: SlotEvent) {
        let store = self.store.clone();
        let change = event.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<_, InstallError> {
            let state = store::change_slots(&store, change)?;
            let model = store::load_served(&store)?;
            Ok((state, model))
        })
        .await;
        match result {
            Ok(Ok((state, model))) => {
                self.served.replace_all(model);
                let kind = match event {
                    SlotEvent::Revert { channel } => state
                        .channel(&channel)
                        .and_then(|p| Some((p.active_entry()?.bundle.digest, p.active?)))
                        .map(|(digest, slot)| EventKind::Reverted { digest, slot }),
                    SlotEvent::Activate { digest } => active_slot_of(&state, digest)
                        .map(|slot| EventKind::Activated { digest, slot }),
                    SlotEvent::Remove { channel } => Some(EventKind::Removed { channel }),
                    SlotEvent::Installed { .. } | SlotEvent::InstallFailed { .. } => None,
                };
                if let Some(kind) = kind {
                    self.emit(Some(command), kind);
                }
                self.publish_state();
            }
            Ok(Err(e)) => self.emit(
                Some(command),
                EventKind::CommandRejected {
                    detail: e.to_string(),
                },
            ),
            Err(e) => self.emit(
                Some(command),
                EventKind::CommandRejected {
                    detail: format!("internal: {e}"),
                },
            ),
        }
    }

    fn fail_install(&mut self, command: u64, digest: Digest, reason: FailureReason) {
        tracing::warn!(digest = %digest.short(), "install failed: {reason:?}");
        let recorded = store::change_slots(
            &self.store,
            SlotEvent::InstallFailed {
                digest,
                reason: reason.clone(),
                at: self.now(),
            },
        );
        if let Err(e) = recorded {
            tracing::error!("cannot record the failed install: {e}");
        }
        self.emit(Some(command), EventKind::InstallFailed { digest, reason });
        self.publish_state();
    }

    /// Step 1 of the transfer: check the header and the disk before downloading.
    async fn start_install(
        &mut self,
        command: u64,
        digest: Digest,
        header: Vec<u8>,
        mode: InstallMode,
    ) {
        let state = match self.store.load() {
            Ok(s) => s,
            Err(e) => {
                return self.fail_install(
                    command,
                    digest,
                    FailureReason::Internal {
                        detail: e.to_string(),
                    },
                );
            }
        };
        if let Some(d) = self.download.as_ref().filter(|d| d.is_agent()) {
            let (old_command, old) = (d.offer.command, d.digest);
            self.cancel_download();
            let detail = format!("superseded by command {command}");
            self.fail_fetch(old_command, old, true, FailureReason::Download { detail });
        }
        let downloading = self.download.as_ref().map(|d| (d.offer.command, d.digest));
        // Read unverified, only to find the channel's slots; the download
        // verifies these bytes before anything else.
        let channel = RawHeader::parse(&header)
            .ok()
            .and_then(|h| h.decode_unverified().ok())
            .map(|m| m.channel);
        match install_step(&state, channel.as_ref(), downloading, digest, mode) {
            InstallStep::AlreadyThere { slot } => {
                let activated = false;
                let kind = EventKind::InstallSucceeded {
                    digest,
                    slot,
                    activated,
                };
                return self.emit(Some(command), kind);
            }
            InstallStep::AlreadyActive { slot } => {
                let activated = true;
                let kind = EventKind::InstallSucceeded {
                    digest,
                    slot,
                    activated,
                };
                self.emit(Some(command), kind);
                return self.publish_state();
            }
            InstallStep::SwitchOnly => return self.activate_installed(command, digest).await,
            InstallStep::Continue => {
                self.request_chunks(true);
                return self.finish_if_complete().await;
            }
            InstallStep::Download { supersedes } => {
                if let Some((old_command, old)) = supersedes {
                    self.cancel_download();
                    let detail = format!("superseded by command {command}");
                    self.fail_install(old_command, old, FailureReason::Download { detail });
                }
            }
        }
        self.begin_download(command, digest, header, mode, &state)
            .await;
    }

    /// Checks the header against the command and the trust root, and the size
    /// against the limits and the disk, then starts fetching.
    async fn begin_download(
        &mut self,
        command: u64,
        digest: Digest,
        header: Vec<u8>,
        mode: InstallMode,
        state: &crate::slots::SlotsState,
    ) {
        let verified =
            RawHeader::parse_offer(&header, digest).and_then(|raw| self.verify_header(state, &raw));
        let verified = match verified {
            Ok(v) => v,
            Err(refusal) => {
                return self.fail_install(command, digest, FailureReason::Refused { refusal });
            }
        };
        // Memory beside the other channels' models, before any chunk.
        if let Err(e) = self.store.check_memory(state, &verified.manifest, mode) {
            let detail = match e {
                InstallError::OverBudget(over) => over.to_string(),
                other => other.to_string(),
            };
            return self.fail_install(command, digest, FailureReason::Preflight { detail });
        }
        let total = header.len() as u64 + verified.manifest.payload.size;
        if let Err(refusal) = self.preflight(total) {
            let detail = refusal.to_string();
            return self.fail_install(command, digest, FailureReason::Preflight { detail });
        }
        let offer = Offer {
            command,
            mode,
            header,
            agent_binary: None,
        };
        match self.create_download(offer, verified) {
            Ok(d) => {
                tracing::info!(
                    digest = %digest.short(),
                    chunks = d.tracker.total(),
                    bytes = total,
                    "download started"
                );
                self.emit(Some(command), EventKind::InstallStarted { digest });
                self.start_fetching(d);
                self.finish_if_complete().await;
            }
            Err(e) => {
                let detail = e.to_string();
                self.fail_install(command, digest, FailureReason::Internal { detail });
            }
        }
    }

    /// Makes `d` the download in progress: it listens on the bundle's chunk
    /// topic for a while (see [`DaemonSettings::fetch_listen`]), then asks.
    fn start_fetching(&mut self, d: Download) {
        let listen = self
            .settings
            .fetch_listen
            .mul_f64(0.5 + (crate::link::random_u64() % 1000) as f64 / 2000.0);
        let digest = d.digest;
        self.download = Some(Download {
            listen_until: Some(Instant::now() + listen),
            ..d
        });
        let _ = self
            .link
            .subscribe(&self.settings.topics.bundle_chunks(&digest));
        self.request_chunks(true);
    }

    /// A download that ends before its install: reported as its command's
    /// failure (`install_failed`, or `agent_update_failed` for an agent release).
    fn fail_fetch(&mut self, command: u64, digest: Digest, agent: bool, reason: FailureReason) {
        if agent {
            let reason = agent_update::failure_of(reason);
            tracing::warn!(digest = %digest.short(), "agent update failed: {reason:?}");
            self.emit(
                Some(command),
                EventKind::AgentUpdateFailed { digest, reason },
            );
        } else {
            self.fail_install(command, digest, reason);
        }
    }

    /// Refuses a download that would break the size limit or the disk reserve. The
    /// download and the unpacked bundle each take about the bundle's size.
    fn preflight(&self, bundle_bytes: u64) -> Result<(), PreflightRefusal> {
        let free = crate::sysinfo_probe::disk_space(self.store.dir()).map(|(free, _)| free);
        preflight(
            bundle_bytes,
            self.settings.max_bundle_bytes,
            free,
            self.settings.disk_reserve_bytes,
        )
    }

    fn create_download(
        &self,
        offer: Offer,
        verified: VerifiedHeader,
    ) -> Result<Download, DiskError> {
        let dir = self.downloads_dir().join(verified.digest.to_hex());
        Download::create(dir, offer, verified)
    }

    /// After a restart: pick up the download that was in progress, from the chunks
    /// already on disk. The header is checked again (the trust root or the time
    /// may have changed).
    fn resume_download(&mut self) {
        let root = self.downloads_dir();
        let Ok(entries) = fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            match self.load_download(&dir) {
                Some(d) if self.download.is_none() => {
                    tracing::info!(
                        digest = %d.digest.short(),
                        done = d.tracker.done(),
                        total = d.tracker.total(),
                        "resuming download"
                    );
                    self.download = Some(d);
                }
                _ => {
                    let _ = fs::remove_dir_all(&dir);
                }
            }
        }
    }

    fn load_download(&self, dir: &Path) -> Option<Download> {
        let offer = Offer::read(dir)?;
        if offer.agent_binary.is_some() {
            return self.load_agent_download(dir, offer);
        }
        let raw = RawHeader::parse(&offer.header).ok()?;
        let state = self.store.load().ok()?;
        if state.referenced().contains(&raw.digest()) {
            // Installed before the crash; only the cleanup was missed.
            return None;
        }
        let verified = self.verify_header(&state, &raw).ok()?;
        Download::reopen(dir, offer, verified)
    }

    fn verify_header(
        &self,
        state: &crate::slots::SlotsState,
        raw: &RawHeader,
    ) -> Result<edgefleet_shared::VerifiedHeader, Refusal> {
        store::verify_header(
            state,
            &self.settings.trust,
            &self.settings.facts,
            raw,
            self.now(),
        )
    }

    fn cancel_download(&mut self) {
        if let Some(d) = self.download.take() {
            let _ = self
                .link
                .unsubscribe(&self.settings.topics.bundle_chunks(&d.digest));
            let _ = fs::remove_dir_all(&d.dir);
        }
    }

    /// Asks for the next window of chunks. `again`: from the first missing chunk
    /// (after a connect or a stall), else continuing after those already asked for.
    fn request_chunks(&mut self, again: bool) {
        let window = self.settings.fetch_window.max(1);
        let Some(d) = self.download.as_mut() else {
            return;
        };
        if d.listen_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        d.listen_until = None;
        if again {
            d.requested_until = 0;
            d.last_chunk = Instant::now();
        }
        let wanted = d.tracker.wanted();
        let in_flight = (wanted.start..d.requested_until.min(wanted.end))
            .filter(|i| !d.tracker.has(*i))
            .count() as u32;
        if in_flight > window / 2 {
            return;
        }
        let ranges = d
            .tracker
            .missing_ranges_from(d.requested_until, window - in_flight, 64);
        let Some(until) = ranges.last().map(|r| r.start + r.count) else {
            return;
        };
        let request = FetchRequest {
            bundle: d.digest,
            ranges,
        };
        let topic = self
            .settings
            .topics
            .device(&self.settings.device, DeviceTopic::Fetch);
        if self
            .link
            .publish(&topic, protocol::encode(&request), false, Tag::None)
            .is_ok()
            && let Some(d) = self.download.as_mut()
        {
            d.requested_until = until;
        }
    }

    fn check_stall(&mut self) {
        let stalled = self
            .download
            .as_ref()
            .is_some_and(|d| d.last_chunk.elapsed() >= self.settings.stall_timeout);
        if stalled && self.link.is_connected() {
            tracing::info!(
                "no chunk for {:?}: asking again",
                self.settings.stall_timeout
            );
            self.request_chunks(true);
        }
    }

    async fn on_chunk(&mut self, chunk: Chunk) {
        let Some(d) = self.download.as_mut() else {
            return;
        };
        if !d.tracker.wanted().contains(&chunk.index) {
            // Another device's part of an agent release.
            return;
        }
        d.last_chunk = Instant::now();
        if d.tracker.has(chunk.index) {
            d.duplicate_bytes += chunk.data.len() as u64;
            return;
        }
        let checked = match bundle::verify_chunk(&d.manifest.payload, chunk.index, &chunk.data) {
            Ok(checked) => checked,
            Err(refusal) => {
                // Never written; asked for again when the window comes round. The
                // same chunk failing again and again is not a transfer error but a
                // bad copy at the source: the install fails with the reason.
                d.rejected += 1;
                let times = match d.failing {
                    Some((index, n)) if index == chunk.index => n + 1,
                    _ => 1,
                };
                d.failing = Some((chunk.index, times));
                tracing::warn!("dropped chunk {} ({times} time(s)): {refusal}", chunk.index);
                if times >= MAX_CHUNK_FAILURES {
                    let (command, digest, agent) = (d.offer.command, d.digest, d.is_agent());
                    self.cancel_download();
                    let reason = FailureReason::Refused { refusal };
                    return self.fail_fetch(command, digest, agent, reason);
                }
                return;
            }
        };
        let Some((start, _)) = d.manifest.payload.chunk_range(chunk.index) else {
            return;
        };
        if let Err(e) = d.file.write_all_at(&chunk.data, d.header_len + start) {
            let (command, digest, agent) = (d.offer.command, d.digest, d.is_agent());
            self.cancel_download();
            let detail = format!("cannot write the download: {e}");
            return self.fail_fetch(command, digest, agent, FailureReason::Download { detail });
        }
        d.tracker.mark(chunk.index);
        d.unsaved += 1;
        if let Err(e) = d.unpack_more(Some(checked), CATCH_UP_BYTES) {
            let (command, digest) = (d.offer.command, d.digest);
            let reason = store::bundle_error(&d.dir, e).reason();
            self.cancel_download();
            return self.fail_install(command, digest, reason);
        }
        // Still listening and another device's chunks flow: keep listening
        // until they stop, then ask only for what did not come.
        if let Some(until) = d.listen_until {
            d.listen_until = Some(until.max(Instant::now() + LISTEN_QUIET));
        }
        if (d.unsaved >= 16 || d.tracker.complete())
            && let Err(e) = save_progress(d)
        {
            tracing::error!("cannot save download progress: {e}");
        }
        let tenth = d.tracker.done() * 10 / d.tracker.total().max(1);
        if tenth > d.reported_tenth && !d.tracker.complete() && !d.is_agent() {
            d.reported_tenth = tenth;
            let kind = EventKind::InstallProgress {
                digest: d.digest,
                chunks_done: d.tracker.done(),
                chunks_total: d.tracker.total(),
            };
            let command = d.offer.command;
            self.emit(Some(command), kind);
        }
        self.request_chunks(false);
        self.finish_if_complete().await;
    }

    /// Step 5 of the transfer: the rest of the unpacking (normally nothing), the
    /// header's signature and rules checked again, health check, switch.
    async fn finish_if_complete(&mut self) {
        if !self.download.as_ref().is_some_and(|d| d.tracker.complete()) {
            return;
        }
        let Some(d) = self.download.take() else {
            return;
        };
        let _ = self
            .link
            .unsubscribe(&self.settings.topics.bundle_chunks(&d.digest));
        if d.is_agent() {
            return self.finish_agent_update(d).await;
        }
        tracing::info!(
            digest = %d.digest.short(),
            duplicate_bytes = d.duplicate_bytes,
            rejected_chunks = d.rejected,
            unpacked_chunks = d.unpack.as_ref().map_or(0, |u| u.next_chunk()),
            read_back_bytes = d.read_back_bytes,
            "download complete, installing"
        );
        let now = self.now();
        let (store, trust, facts) = (
            self.store.clone(),
            self.settings.trust.clone(),
            self.settings.facts.clone(),
        );
        let (dir, mode, command, digest) = (d.dir.clone(), d.offer.mode, d.offer.command, d.digest);
        let header = match RawHeader::parse(&d.offer.header) {
            Ok(h) => h,
            Err(refusal) => {
                let _ = fs::remove_dir_all(&dir);
                return self.fail_install(command, digest, FailureReason::Refused { refusal });
            }
        };
        let result = tokio::task::spawn_blocking(move || {
            let mut d = d;
            let unpacked = move || {
                d.unpack_more(None, u64::MAX)
                    .map_err(|e| store::bundle_error(&d.dir, e))?;
                let missing = || io::Error::other("a model download without its unpacking");
                d.unpack
                    .ok_or_else(|| store::bundle_error(&d.dir, bundle::BundleError::Io(missing())))
            };
            let done =
                store::install_download(&store, &trust, &facts, &header, unpacked, mode, now)?;
            let model = store::load_served(&store)?;
            Ok::<_, InstallError>((done, model))
        })
        .await;
        // A simulated crash (the fleet simulator's fault) stops this device here,
        // with its download still on disk, as a power cut would.
        let result = match result {
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            other => other,
        };
        let _ = fs::remove_dir_all(&dir);
        match result {
            Ok(Ok((done, model))) => self.installed(command, digest, mode, done, model),
            // install_file has recorded the failure in the state already.
            Ok(Err(e)) => {
                tracing::warn!(digest = %digest.short(), "install failed: {e}");
                let reason = e.reason();
                self.emit(Some(command), EventKind::InstallFailed { digest, reason });
                self.publish_state();
            }
            Err(e) => self.fail_install(
                command,
                digest,
                FailureReason::Internal {
                    detail: format!("install task failed: {e}"),
                },
            ),
        }
    }

    /// A downloaded bundle is installed: serve it (or its shadow) and report.
    fn installed(
        &mut self,
        command: u64,
        digest: Digest,
        mode: InstallMode,
        done: store::Installed,
        model: store::LoadedChannels,
    ) {
        let activated = mode == InstallMode::Activate;
        let pair = done.state.channel(&done.bundle.channel);
        let slot = if activated {
            pair.and_then(|p| p.active)
        } else {
            pair.map(|p| p.target_slot())
        }
        .unwrap_or(protocol::Slot::A);
        self.served.replace_all(model);
        if self.settings.trim_memory {
            tokio::task::spawn_blocking(crate::memory::trim_after_load);
        }
        tracing::info!(
            digest = %digest.short(),
            version = %done.bundle.version,
            activated,
            "installed"
        );
        self.emit(
            Some(command),
            EventKind::InstallSucceeded {
                digest,
                slot,
                activated,
            },
        );
        self.publish_state();
    }

    // -- reporting -----------------------------------------------------------

    /// The state as retained on the broker (and, offline, as the will).
    fn device_state(&self, online: bool) -> DeviceState {
        let state = self.store.load().unwrap_or_default();
        DeviceState {
            device: self.settings.device.clone(),
            at: self.now(),
            online,
            agent_version: crate::version::version().into(),
            arch: edgefleet_shared::Arch::current(),
            slots: state.slot_states(),
            last_install: state.last_install.clone(),
        }
    }

    fn update_will(&self) {
        let offline = self.device_state(false);
        self.link
            .set_will(&self.topic(DeviceTopic::State), protocol::encode(&offline));
    }

    fn publish_state(&self) {
        let state = self.device_state(true);
        let handed = self.link.publish(
            &self.topic(DeviceTopic::State),
            protocol::encode(&state),
            true,
            Tag::State,
        );
        *lock_state(&self.state_sent) = handed.is_ok().then(Instant::now);
        self.update_will();
    }

    /// Publishes the state again when the broker has not acknowledged it
    /// within [`STATE_ACK_WAIT`]: a NATS cluster drops a QoS 1 publish it
    /// cannot store in JetStream (while a node's streams move), and the
    /// controller would show the device offline until its state changed.
    fn republish_unacknowledged_state(&self) {
        let overdue = lock_state(&self.state_sent).is_some_and(|at| at.elapsed() >= STATE_ACK_WAIT);
        if overdue && self.link.is_connected() {
            tracing::info!("the broker did not acknowledge the device state: publishing it again");
            self.publish_state();
        }
    }

    /// Spools how the agent's own latest update ended, once (docs/agent-update.md),
    /// then marks the record: the new agent sends `agent_updated`, the old one
    /// `agent_update_failed`.
    fn report_agent_update(&mut self) {
        let dir = self.store.dir().to_owned();
        let state = match crate::selfupdate::start::load(&dir) {
            Ok(s) => s,
            Err(e) => return tracing::error!("agent update record: {e}"),
        };
        let Some(kind) = state.unreported_event() else {
            return;
        };
        self.emit(None, kind);
        if let Err(e) = crate::selfupdate::start::save(&dir, &state.mark_reported()) {
            tracing::error!("agent update record: {e}");
        }
    }

    /// Spools an event and sends it if connected. Events are never dropped.
    fn emit(&mut self, command: Option<u64>, kind: EventKind) {
        let device = self.settings.device.clone();
        let at = self.now();
        let epoch = self.events.epoch();
        let pushed = self.events.push(|seq| {
            protocol::encode(&Event {
                device,
                epoch,
                seq,
                at,
                command,
                kind,
            })
        });
        match pushed {
            Ok(seq) => self.send_record(Tag::Event(seq)),
            Err(e) => tracing::error!("cannot spool an event: {e}"),
        }
    }

    fn report_telemetry(&mut self) {
        let now = self.now();
        let mut statuses = BTreeMap::new();
        let mut parts = Vec::new();
        for (channel, served) in self.served.channels() {
            let drift = match served.drift_checkpoint(now) {
                Some(c) => {
                    if let Some(alert) = c.alert {
                        self.emit(None, alert);
                    }
                    statuses.insert(channel.clone(), c.status);
                    c.report
                }
                None => None,
            };
            let snapshot = served.stats().snapshot();
            let model = served.bundle().map(|b| ModelMetrics {
                digest: b.digest,
                inferences: snapshot.inferences,
                errors: snapshot.errors,
                latency_bounds_us: LATENCY_BOUNDS_US.to_vec(),
                latency_counts: snapshot.latency_counts.clone(),
            });
            let shadow = served
                .shadow()
                .map(|sh| sh.stats.snapshot(sh.bundle.digest));
            parts.push(protocol::ChannelTelemetry {
                channel,
                model,
                drift,
                shadow,
            });
        }
        if !statuses.is_empty() {
            let dir = self.store.dir().to_owned();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::api::save_drift_status(&dir, &statuses) {
                    tracing::warn!("cannot write the drift status: {e}");
                }
            });
        }
        // One channel: the fields protocol 1 has; several: one part each.
        let (model, drift, shadow, channels) = match <[_; 1]>::try_from(parts) {
            Ok([one]) => (one.model, one.drift, one.shadow, Vec::new()),
            Err(parts) if parts.is_empty() => (None, None, None, Vec::new()),
            Err(parts) => (None, None, None, parts),
        };
        let device_metrics = self.probe.device_metrics(self.store.dir());
        let agent = AgentMetrics {
            rss_bytes: self.probe.own_rss(),
            version: crate::version::version().into(),
            // Both spools: an event lost to a full disk is a gap too.
            spool_dropped: self.telemetry.index().dropped() + self.events.index().dropped(),
        };
        let device = self.settings.device.clone();
        let at = self.now();
        let epoch = self.telemetry.epoch();
        let pushed = self.telemetry.push(|seq| {
            protocol::encode(&Telemetry {
                device,
                epoch,
                seq,
                at,
                device_metrics,
                agent,
                model,
                drift,
                shadow,
                channels,
            })
        });
        match pushed {
            Ok(seq) => self.send_record(Tag::Telemetry(seq)),
            Err(e) => tracing::error!("cannot spool telemetry: {e}"),
        }
    }

    fn send_record(&mut self, tag: Tag) {
        if self.in_flight.contains(&tag) {
            return;
        }
        let (spool, kind) = match tag {
            Tag::Event(seq) => ((&self.events, seq), DeviceTopic::Events),
            Tag::Telemetry(seq) => ((&self.telemetry, seq), DeviceTopic::Telemetry),
            Tag::None | Tag::State => return,
        };
        let (spool, seq) = spool;
        match spool.read(seq) {
            Ok(bytes) => {
                if self
                    .link
                    .publish(&self.topic(kind), bytes, false, tag)
                    .is_ok()
                {
                    self.in_flight.insert(tag);
                }
            }
            Err(e) => tracing::error!("cannot read spooled record {seq}: {e}"),
        }
    }

    /// The controller stored these reports: they leave the spool. From the
    /// first acknowledgement on, a report the broker took stays spooled until
    /// the controller acknowledges it, and is sent again when no
    /// acknowledgement came within [`Daemon::ack_timeout`] (a controller
    /// replica killed before storing it: docs/protocol.md).
    fn on_telemetry_ack(&mut self, payload: &[u8]) {
        let ack = match protocol::decode::<protocol::TelemetryAck>(payload) {
            Ok(ack) => ack,
            Err(e) => return tracing::warn!("ignored a telemetry acknowledgement: {e}"),
        };
        self.controller_acks = true;
        if ack.epoch != self.telemetry.epoch() {
            return;
        }
        for seq in &ack.seqs {
            self.unstored.remove(seq);
            if let Err(e) = self.telemetry.ack(*seq) {
                tracing::error!("telemetry spool: {e}");
            }
        }
    }

    /// The broker took report `seq`: it leaves the spool now, or once the
    /// controller says it stored it (when the controller acknowledges).
    fn on_telemetry_delivered(&mut self, seq: u64) {
        self.in_flight.remove(&Tag::Telemetry(seq));
        if self.controller_acks {
            self.unstored.insert(seq, Instant::now());
        } else if let Err(e) = self.telemetry.ack(seq) {
            tracing::error!("telemetry spool: {e}");
        }
    }

    /// How long a report the broker took waits for the controller's
    /// acknowledgement before it is sent again: three telemetry periods, at
    /// least 5 s.
    fn ack_timeout(&self) -> Duration {
        (self.settings.telemetry_interval * 3).max(Duration::from_secs(5))
    }

    /// Reports whose acknowledgement is overdue are sent again by the next
    /// flush.
    fn expire_unstored(&mut self, now: Instant) {
        let timeout = self.ack_timeout();
        let before = self.unstored.len();
        self.unstored
            .retain(|_, taken| now.saturating_duration_since(*taken) < timeout);
        let overdue = before - self.unstored.len();
        if overdue > 0 {
            tracing::info!(
                overdue,
                "telemetry not acknowledged by the controller: sending it again"
            );
        }
    }

    /// Sends what waits and is not in flight, oldest first, events before
    /// telemetry, at most 128 records per call (the rest on the next tick).
    fn flush_spools(&mut self) {
        if !self.link.is_connected() {
            return;
        }
        self.expire_unstored(Instant::now());
        let events: Vec<u64> = self
            .events
            .index()
            .waiting()
            .filter(|s| !self.in_flight.contains(&Tag::Event(*s)))
            .take(128)
            .collect();
        let telemetry: Vec<u64> = self
            .telemetry
            .index()
            .waiting()
            .filter(|s| {
                !self.in_flight.contains(&Tag::Telemetry(*s)) && !self.unstored.contains_key(s)
            })
            .take(128 - events.len())
            .collect();
        if events.len() + telemetry.len() > 1 {
            tracing::info!(
                events = events.len(),
                telemetry = telemetry.len(),
                "sending spooled records"
            );
        }
        for seq in events {
            self.send_record(Tag::Event(seq));
        }
        for seq in telemetry {
            self.send_record(Tag::Telemetry(seq));
        }
    }
}

/// How long the broker may take to acknowledge the device state before it
/// is published again.
const STATE_ACK_WAIT: Duration = Duration::from_secs(10);

fn lock_state(m: &std::sync::Mutex<Option<Instant>>) -> std::sync::MutexGuard<'_, Option<Instant>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps until `at`, or for ever without it.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn save_progress(d: &mut Download) -> io::Result<()> {
    d.file.sync_data()?;
    write_atomic(&d.dir.join("chunks.bits"), d.tracker.to_bytes())?;
    d.unsaved = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_refuses_a_bundle_over_the_limit_or_the_disk() {
        assert_eq!(preflight(100, 100, Some(1_000), 0), Ok(()));
        assert_eq!(
            preflight(101, 100, Some(1_000), 0),
            Err(PreflightRefusal::TooLarge {
                size: 101,
                limit: 100
            })
        );
        // Twice the bundle plus the reserve must be free: 2 x 100 + 50.
        assert_eq!(preflight(100, 1_000, Some(250), 50), Ok(()));
        let refused = preflight(100, 1_000, Some(249), 50).expect_err("no room");
        assert_eq!(
            refused,
            PreflightRefusal::Disk {
                free: 249,
                needed: 200,
                reserve: 50
            }
        );
        assert!(refused.to_string().contains("limits.disk_reserve_bytes"));
        // Free space unknown: not checked; sizes near u64::MAX do not overflow.
        assert_eq!(preflight(u64::MAX, u64::MAX, None, u64::MAX), Ok(()));
        assert!(preflight(u64::MAX, u64::MAX, Some(u64::MAX), 1).is_err());
    }

    #[test]
    fn an_install_is_decided_from_the_slots_and_the_download_in_progress() {
        use crate::slots::{ChannelSlots, SlotEntry, SlotsState};
        use protocol::{BundleRef, Slot, SlotRole};
        let bundle = |n: u8| BundleRef {
            digest: Digest([n; 32]),
            channel: ModelChannel::new("m").expect("channel"),
            version: format!("1.0.{n}"),
            release: u64::from(n),
        };
        let (one, two, three) = (Digest([1; 32]), Digest([2; 32]), Digest([3; 32]));
        // Slot A active with bundle 1; slot B (the target) holds bundle 2 staged.
        let pair = ChannelSlots {
            active: Some(Slot::A),
            a: Some(SlotEntry {
                bundle: bundle(1),
                role: SlotRole::Active,
            }),
            b: Some(SlotEntry {
                bundle: bundle(2),
                role: SlotRole::Staged,
            }),
        };
        let m = bundle(1).channel;
        let mut state = SlotsState {
            channels: BTreeMap::from([(m.clone(), pair)]),
            ..SlotsState::default()
        };
        assert_eq!(state.channel(&m).map(|p| p.target_slot()), Some(Slot::B));
        let step = |s: &SlotsState, downloading, digest, mode| {
            install_step(s, Some(&m), downloading, digest, mode)
        };
        assert_eq!(
            step(&state, None, two, InstallMode::Stage),
            InstallStep::AlreadyThere { slot: Slot::B }
        );
        assert_eq!(
            step(&state, None, two, InstallMode::Activate),
            InstallStep::SwitchOnly
        );
        // Staged is not shadow: asked to shadow it, it is downloaded again.
        assert_eq!(
            step(&state, None, two, InstallMode::Shadow),
            InstallStep::Download { supersedes: None }
        );
        for mode in [
            InstallMode::Activate,
            InstallMode::Stage,
            InstallMode::Shadow,
        ] {
            assert_eq!(
                step(&state, Some((7, three)), one, mode),
                InstallStep::AlreadyActive { slot: Slot::A },
                "{mode:?}"
            );
        }
        assert_eq!(
            step(&state, Some((7, three)), three, InstallMode::Activate),
            InstallStep::Continue
        );
        assert_eq!(
            step(
                &state,
                Some((7, three)),
                Digest([4; 32]),
                InstallMode::Activate
            ),
            InstallStep::Download {
                supersedes: Some((7, three))
            }
        );
        // Another channel's slots say nothing about this one: a download.
        let other = ModelChannel::new("other").expect("channel");
        assert_eq!(
            install_step(&state, Some(&other), None, one, InstallMode::Activate),
            InstallStep::Download { supersedes: None }
        );
        // Run in shadow: activating it is only the switch.
        if let Some(p) = state.channels.get_mut(&m) {
            p.b.as_mut().expect("b").role = SlotRole::Shadow;
        }
        assert_eq!(
            step(&state, None, two, InstallMode::Activate),
            InstallStep::SwitchOnly
        );
        assert_eq!(
            step(&state, None, two, InstallMode::Shadow),
            InstallStep::AlreadyThere { slot: Slot::B }
        );
    }
}
