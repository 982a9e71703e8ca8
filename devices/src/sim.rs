//! The fleet simulator: many devices in one process, each a real agent
//! (`edgefleet_agent`'s daemon, link, store and local API) with its own
//! identity, MQTT connection and data directory. Models are shared by content
//! between devices ([`LoadedModel::load`](edgefleet_agent::model::LoadedModel::load)).
//!
//! Each device reaches the broker through its own TCP relay (a "network
//! switch"), so a test or the demo can cut one device's network, or all, and
//! restore it: the agent sees a real connection loss, keeps serving inference
//! locally, spools telemetry and reconnects by itself.
//!
//! Faults per device ([`FaultPlan`]): a slow link (every message from the broker
//! delayed), a disconnect after some chunks of a download, a crash at a step of
//! the install (the device restarts from its directory, as after a power cut),
//! a failing health check.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgefleet_agent::api::Served;
use edgefleet_agent::config::AgentConfig;
use edgefleet_agent::link::LinkEvent;
use edgefleet_agent::slots::SlotsState;
use edgefleet_agent::store::{self, Faults, Store};
use edgefleet_shared::protocol::{BundleRef, Topic, Topics};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Profile;

/// A device's TLS identity, as `edgefleet devices enroll` writes it.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// The device's certificate.
    pub cert: PathBuf,
    /// The device's key.
    pub key: PathBuf,
}

/// Faults injected into one device.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Every message from the broker reaches the agent this much later.
    pub slow_link: Option<Duration>,
    /// After this many chunk messages, the device's connection drops (once); the
    /// agent reconnects and resumes from the first missing chunk.
    pub disconnect_after_chunks: Option<u64>,
    /// The device crashes once at this install step (`after-unpack`,
    /// `after-health-check`, `before-state-rename`, `after-state-save`).
    pub crash_at: Option<String>,
    /// Every health check on the device fails.
    pub fail_health: bool,
    /// The device's clock is this many seconds ahead (negative: behind).
    pub clock_skew_s: i64,
}

/// One simulated device to start.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Device id (the certificate's name).
    pub id: String,
    /// What kind of device it is.
    pub profile: Profile,
    /// Its identity; `None` for plain `mqtt://` brokers.
    pub tls: Option<TlsFiles>,
    /// Its faults.
    pub faults: FaultPlan,
    /// A trust root of its own (default: the fleet's), e.g. one not yet rotated.
    pub trust_root: Option<PathBuf>,
}

/// What every device shares.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Where the broker listens (the devices connect through their relays).
    pub broker: SocketAddr,
    /// `true` for mutual TLS (`mqtts://`), `false` for plain MQTT.
    pub tls: bool,
    /// Topic prefix.
    pub topic_prefix: String,
    /// The pinned trust root file.
    pub trust_root: PathBuf,
    /// The controller's command key (its public half, PEM) that every device
    /// pins: `controller.pub` of an enrollment.
    pub controller_key: PathBuf,
    /// Root of the devices' data directories (`<dir>/<id>/`).
    pub dir: PathBuf,
    /// Time between telemetry reports.
    pub telemetry_interval: Duration,
    /// The agents' `[broker] subscribe_qos`: 1, or 0 on a NATS cluster (from
    /// the enrollment).
    pub subscribe_qos: u8,
}

/// Counters of one device, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Chunk messages that reached the agent.
    pub chunk_messages: AtomicU64,
    /// Their payload bytes (the encoded messages).
    pub chunk_bytes: AtomicU64,
    /// Times the agent's link connected.
    pub connects: AtomicU64,
    /// Simulated crashes.
    pub crashes: AtomicU64,
    /// Connections dropped by the disconnect fault.
    pub dropped: AtomicU64,
    /// Inference requests the traffic generator sent, and those that failed.
    pub requests: AtomicU64,
    /// Failed inference requests.
    pub request_errors: AtomicU64,
}

/// Why the fleet could not start.
#[derive(Debug, thiserror::Error)]
#[error("simulated device {device}: {detail}")]
pub struct SimError {
    /// The device.
    pub device: String,
    /// What failed.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    up: bool,
    /// Bumped to drop the open connections.
    epoch: u64,
}

/// A running simulated device.
#[derive(Debug)]
pub struct SimDevice {
    id: String,
    profile: Profile,
    dir: PathBuf,
    api: SocketAddr,
    served: Served,
    stats: Arc<DeviceStats>,
    network: watch::Sender<Network>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SimDevice {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its local inference API (`http://127.0.0.1:port`).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// The bundle it serves now (the first channel's, in name order).
    pub fn serving(&self) -> Option<BundleRef> {
        self.served.bundles().into_iter().next()
    }

    /// The bundle of every channel it serves now, in channel order.
    pub fn serving_all(&self) -> Vec<BundleRef> {
        self.served.bundles()
    }

    /// Its slots as stored on its disk.
    pub fn state(&self) -> SlotsState {
        Store::open(&self.dir)
            .and_then(|s| s.load())
            .unwrap_or_default()
    }

    /// Its counters.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// Cuts (`false`) or restores (`true`) the device's network: open
    /// connections to the broker are dropped and new ones refused while down.
    pub fn set_network(&self, up: bool) {
        self.network.send_modify(|n| {
            n.up = up;
            if !up {
                n.epoch += 1;
            }
        });
    }
}

/// A running simulated fleet.
#[derive(Debug)]
pub struct SimFleet {
    devices: Vec<SimDevice>,
    traffic: Option<JoinHandle<()>>,
}

/// Inference traffic sent to every device's local API.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// The model name (the bundle's channel).
    pub model: String,
    /// The OIP v2 JSON request bodies, used in turn.
    pub bodies: Vec<String>,
    /// Time between two rounds (one request per device per round).
    pub every: Duration,
}

impl SimFleet {
    /// Starts every device; returns once each has its local API listening. The
    /// agents connect to the broker in the background.
    pub async fn start(
        settings: &FleetSettings,
        specs: Vec<DeviceSpec>,
    ) -> Result<SimFleet, SimError> {
        let mut devices = Vec::with_capacity(specs.len());
        for spec in specs {
            devices.push(start_device(settings, spec).await?);
        }
        Ok(SimFleet {
            devices,
            traffic: None,
        })
    }

    /// The devices, in the order they were given.
    pub fn devices(&self) -> &[SimDevice] {
        &self.devices
    }

    /// A device by id.
    pub fn device(&self, id: &str) -> Option<&SimDevice> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// Cuts or restores every device's network.
    pub fn set_network(&self, up: bool) {
        for d in &self.devices {
            d.set_network(up);
        }
    }

    /// How many devices serve each bundle (by version).
    pub fn versions(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for d in &self.devices {
            let v = d
                .serving()
                .map_or_else(|| "none".to_owned(), |b| b.version.to_string());
            *out.entry(v).or_insert(0) += 1;
        }
        out
    }

    /// How many devices serve each version on `channel` (`none`: not that channel).
    pub fn versions_on(&self, channel: &str) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for d in &self.devices {
            let v = d
                .serving_all()
                .into_iter()
                .find(|b| b.channel.as_str() == channel)
                .map_or_else(|| "none".to_owned(), |b| b.version.to_string());
            *out.entry(v).or_insert(0) += 1;
        }
        out
    }

    /// Starts (or replaces) inference traffic to every device that serves a
    /// model; requests run on the blocking pool through real HTTP.
    pub fn set_traffic(&mut self, traffic: Option<Traffic>) {
        if let Some(t) = self.traffic.take() {
            t.abort();
        }
        let Some(traffic) = traffic else { return };
        let targets: Vec<(String, Arc<DeviceStats>)> = self
            .devices
            .iter()
            .map(|d| {
                (
                    format!("{}/v2/models/{}/infer", d.api_url(), traffic.model),
                    d.stats.clone(),
                )
            })
            .collect();
        self.traffic = Some(tokio::spawn(async move {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            let mut tick = tokio::time::interval(traffic.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut round = 0usize;
            loop {
                tick.tick().await;
                let body = traffic.bodies[round % traffic.bodies.len().max(1)].clone();
                round += 1;
                let (agent, targets) = (agent.clone(), targets.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    for (url, stats) in &targets {
                        stats.requests.fetch_add(1, Ordering::Relaxed);
                        let ok = agent
                            .post(url)
                            .header("content-type", "application/json")
                            .send(body.as_bytes())
                            .is_ok_and(|r| r.status().is_success());
                        if !ok {
                            stats.request_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .await;
            }
        }));
    }

    /// Stops every device (each says goodbye to the broker) and waits for them.
    pub async fn stop(mut self) {
        self.set_traffic(None);
        for d in &self.devices {
            let _ = d.stop.send(true);
        }
        for d in self.devices.drain(..) {
            for t in d.tasks {
                let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
            }
        }
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        if let Some(t) = self.traffic.take() {
            t.abort();
        }
        for d in &self.devices {
            for t in &d.tasks {
                t.abort();
            }
        }
    }
}

fn sim_error(device: &str) -> impl Fn(String) -> SimError + '_ {
    move |detail| SimError {
        device: device.to_owned(),
        detail,
    }
}

/// The store faults of a device's fault plan: a crash at one install point,
/// failed health checks.
fn store_faults(plan: &FaultPlan) -> Arc<Faults> {
    let faults = Arc::new(Faults::default());
    if let Some(point) = &plan.crash_at {
        faults.crash_once_at(point);
    }
    faults.set_fail_health(plan.fail_health);
    faults
}

/// The board's agent settings (limits, telemetry) for a device in `dir`
/// whose broker is the relay on `relay_port`.
fn device_config(
    settings: &FleetSettings,
    spec: &DeviceSpec,
    dir: &Path,
    relay_port: u16,
) -> Result<AgentConfig, SimError> {
    let mut config = AgentConfig {
        data_dir: dir.to_owned(),
        trust_root: spec
            .trust_root
            .clone()
            .unwrap_or_else(|| settings.trust_root.clone()),
        ..spec.profile.agent_config(&spec.id)
    };
    config.broker.topic_prefix = settings.topic_prefix.clone();
    config.broker.controller_key = settings.controller_key.clone();
    config.broker.subscribe_qos = settings.subscribe_qos;
    match (&spec.tls, settings.tls) {
        (Some(tls), true) => {
            config.broker.url = format!("mqtts://localhost:{relay_port}");
            config.broker.ca = Some(tls.ca.clone());
            config.broker.cert = Some(tls.cert.clone());
            config.broker.key = Some(tls.key.clone());
        }
        (_, false) => config.broker.url = format!("mqtt://127.0.0.1:{relay_port}"),
        (None, true) => {
            return Err(sim_error(&spec.id)(
                "a TLS broker needs the device's certificate".into(),
            ));
        }
    }
    Ok(config)
}

async fn start_device(settings: &FleetSettings, spec: DeviceSpec) -> Result<SimDevice, SimError> {
    let fail = sim_error(&spec.id);
    let dir = settings.dir.join(&spec.id);
    let store = Store::open(&dir)
        .map_err(|e| fail(e.to_string()))?
        .with_faults(store_faults(&spec.faults));

    // The network switch: a relay between the agent and the broker.
    let relay = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| fail(format!("relay: {e}")))?;
    let relay_port = relay.local_addr().map_err(|e| fail(e.to_string()))?.port();
    let (network, network_rx) = watch::channel(Network { up: true, epoch: 0 });

    let config = device_config(settings, &spec, &dir, relay_port)?;
    let stats = Arc::new(DeviceStats::default());
    // Set up now so that a bad identity fails the start, not a background task.
    let link = device_link(settings, &spec, &config, &stats, &network)?;
    let active = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store::load_served(&store))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?
    };
    let served = edgefleet_agent::service::served(active, &config);
    let api = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| fail(format!("local API: {e}")))?;
    let api_addr = api.local_addr().map_err(|e| fail(e.to_string()))?;
    let (stop, stop_rx) = watch::channel(false);

    // The agent itself, as `edgefleet-agent run` starts it.
    let agent = {
        let (store, served, mut stop) = (store.clone(), served.clone(), stop_rx.clone());
        let listeners = edgefleet_agent::service::Listeners {
            tcp: api,
            unix: None,
        };
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            edgefleet_agent::service::run(&config, store, served, Some(link), listeners, shutdown)
                .await;
        })
    };
    let tasks = vec![
        agent,
        tokio::spawn(switch(relay, settings.broker, network_rx, stop_rx)),
    ];
    Ok(SimDevice {
        id: spec.id.clone(),
        profile: spec.profile,
        dir,
        api: api_addr,
        served,
        stats,
        network,
        stop,
        tasks,
    })
}

/// A simulated device's controller link: the agent's own setup from its
/// config, the fleet's timings and the device's profile and faults.
fn device_link(
    settings: &FleetSettings,
    spec: &DeviceSpec,
    config: &AgentConfig,
    stats: &Arc<DeviceStats>,
    network: &watch::Sender<Network>,
) -> Result<edgefleet_agent::service::Link, SimError> {
    let fail = sim_error(&spec.id);
    let (options, mut link_settings) = edgefleet_agent::cli::link_setup(config, &config.trust_root)
        .map_err(|e| fail(e.to_string()))?;
    link_settings.telemetry_interval = settings.telemetry_interval;
    link_settings.facts = spec.profile.facts();
    link_settings.stall_timeout = Duration::from_secs(2);
    link_settings.clock_skew_s = spec.faults.clock_skew_s;
    // Its devices share this process: no madvise of the process's code per install.
    link_settings.trim_memory = false;
    let tap = Tap {
        device: spec.id.clone(),
        topics: Topics::new(&settings.topic_prefix).map_err(|e| fail(e.reason.to_string()))?,
        slow_link: spec.faults.slow_link,
        drop_after: Arc::new(std::sync::Mutex::new(spec.faults.disconnect_after_chunks)),
        stats: stats.clone(),
        network: network.clone(),
    };
    let (stats, device) = (stats.clone(), spec.id.clone());
    Ok(edgefleet_agent::service::Link {
        options,
        settings: link_settings,
        tap: Some(Box::new(move || tap.start())),
        on_crash: Some(Box::new(move || {
            stats.crashes.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%device, "simulated crash: restarting the agent");
        })),
    })
}

/// The relay: forwards each connection to the broker while the network is up.
async fn switch(
    listener: TcpListener,
    broker: SocketAddr,
    network: watch::Receiver<Network>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let inbound = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            () = stopped(&mut stop) => return,
        };
        let at = *network.borrow();
        if !at.up {
            drop(inbound);
            continue;
        }
        let mut network = network.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(broker).await else {
                return;
            };
            let mut inbound = inbound;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = network.wait_for(|n| n.epoch != at.epoch) => {}
            }
        });
    }
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What a simulated device puts between its link and its daemon: counts what
/// the link brings (connects, chunk messages), plays the disconnect after
/// `drop_after` chunks (once, across restarts; counted from each start) and
/// holds every event back on a slow link.
struct Tap {
    device: String,
    topics: Topics,
    slow_link: Option<Duration>,
    /// Chunks until the simulated mid-download disconnect (taken once it fired).
    drop_after: Arc<std::sync::Mutex<Option<u64>>>,
    stats: Arc<DeviceStats>,
    network: watch::Sender<Network>,
}

impl Tap {
    /// The tap for one start of the link.
    fn start(&self) -> edgefleet_agent::service::LinkTap {
        let (stats, topics, network, drop_after) = (
            self.stats.clone(),
            self.topics.clone(),
            self.network.clone(),
            self.drop_after.clone(),
        );
        let (device, slow_link) = (self.device.clone(), self.slow_link);
        let mut chunks_here = 0u64;
        Box::new(move |event: &LinkEvent| {
            match event {
                LinkEvent::Connected => {
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                }
                LinkEvent::Message { topic, payload }
                    if matches!(topics.parse(topic), Some(Topic::BundleChunks { .. })) =>
                {
                    stats.chunk_messages.fetch_add(1, Ordering::Relaxed);
                    stats
                        .chunk_bytes
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    chunks_here += 1;
                    let mut drop_after = drop_after.lock().unwrap_or_else(|p| p.into_inner());
                    if drop_after.is_some_and(|n| chunks_here >= n) {
                        *drop_after = None;
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%device, "simulated disconnect mid-download");
                        network.send_modify(|n| n.epoch += 1);
                    }
                }
                _ => {}
            }
            slow_link
        })
    }
}
