//! The agent's controller link against a real broker (Debian's Mosquitto, plain
//! TCP and mutual TLS), with the real `edgefleet-agent` process and real bundles.
//!
//! The test plays the controller's part of the protocol (docs/protocol.md section
//! 5): it sends commands and answers fetch requests with chunks from the bundle
//! file. Until the controller exists (issue 4), this is the only peer; the
//! end-to-end tests of issue 5 replace it with the real controller.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgefleet_shared::protocol::{
    self, Action, BundleOffer, Chunk, Command as Cmd, DeviceState, Event, EventKind, FailureReason,
    FetchRequest, InstallMode, Slot, SlotRole, Telemetry,
};
use edgefleet_shared::{Digest, ModelChannel, RawHeader, UnixTime};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS, Transport};
use tokio::sync::mpsc;

mod common;
use common::pki::Pki;
use common::supervisor::{Supervisor, agent_release_file, broken_agent, stripped, version_of};
use common::{bundle, bundle_padded, http, iris, wait_for_api, write_root};

const DEVICE: &str = "dev-1";
const PREFIX: &str = "edgefleet/v1";
/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

/// The test controller's command key; every device config pins its public half.
fn controller_key() -> edgefleet_shared::SecretKey {
    edgefleet_shared::SecretKey::from_seed([7; 32])
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A Mosquitto process on a loopback port, with persistence in its directory (so
/// a restart keeps the test peer's session and queued messages, as in production).
struct Broker {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
}

impl Broker {
    fn start(dir: &Path, extra: &str) -> Broker {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\npersistence true\npersistence_location {}/\nset_tcp_nodelay true\n{extra}\n",
                s(dir)
            ),
        )
        .expect("conf");
        let mut b = Broker {
            child: None,
            port,
            conf,
        };
        b.run();
        b
    }

    fn run(&mut self) {
        let log = std::fs::File::create(self.conf.with_extension("log")).expect("log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto is installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, so Mosquitto saves its sessions, then waits.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `edgefleet-agent run`.
struct Agent {
    child: Child,
    api: String,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, config: &Path) -> Agent {
        let log = dir.join(format!("agent-{}.log", Instant::now().elapsed().as_nanos()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
            .arg("--config")
            .arg(config)
            .args(["run", "--http", "127.0.0.1:0"])
            .env("EDGEFLEET_LOG", "debug")
            // Not supervised, whatever runs the tests.
            .env_remove("INVOCATION_ID")
            .env_remove("EDGEFLEET_SUPERVISED")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("agent starts");
        let api = wait_for_api(&mut child);
        Agent { child, api, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A device directory: trust root, data dir, config.
struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    fn new() -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        write_root(&dir.path().join("root.cbor"));
        Device { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self, broker_url: &str, tls: Option<(&Path, &Path, &Path)>) -> PathBuf {
        let tls = match tls {
            Some((ca, cert, key)) => format!(
                "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                s(ca),
                s(cert),
                s(key)
            ),
            None => String::new(),
        };
        let path = self.path().join("agent.toml");
        let key = self.path().join("controller.pub");
        std::fs::write(&key, controller_key().public().to_pem()).expect("controller key");
        std::fs::write(
            &path,
            format!(
                "device_id = \"{DEVICE}\"\ndata_dir = \"{}\"\ntrust_root = \"{}\"\n\
                 [broker]\nurl = \"{broker_url}\"\ncontroller_key = \"{}\"\n{tls}\n\
                 [telemetry]\ninterval_s = 1\n[limits]\ndisk_reserve_bytes = 0\n",
                s(&self.path().join("data")),
                s(&self.path().join("root.cbor")),
                s(&key),
            ),
        )
        .expect("config");
        path
    }
}

/// What the test peer does with fetch requests.
#[derive(Debug, Default)]
struct ChunkPolicy {
    /// Stop serving after this many chunks in all (None: serve everything).
    limit: Option<usize>,
    /// Send a corrupted copy of this chunk the first time it is asked for.
    tamper: Option<u32>,
    /// Every chunk index sent, in order.
    sent: Vec<u32>,
    /// Every fetch request received.
    requests: Vec<FetchRequest>,
}

/// A bundle file split as the controller serves it.
struct Served {
    header: Vec<u8>,
    payload: Vec<u8>,
    chunk_size: usize,
    digest: Digest,
}

impl Served {
    fn load(path: &Path) -> Served {
        let bytes = std::fs::read(path).expect("bundle");
        let mut rest = bytes.as_slice();
        let header = RawHeader::read_from(&mut rest).expect("header");
        let manifest = header.decode_unverified().expect("manifest");
        Served {
            header: header.to_bytes(),
            payload: rest.to_vec(),
            chunk_size: manifest.payload.chunk_size as usize,
            digest: header.digest(),
        }
    }

    fn chunk(&self, index: u32) -> Option<Vec<u8>> {
        let start = index as usize * self.chunk_size;
        (start < self.payload.len()).then(|| {
            self.payload[start..(start + self.chunk_size).min(self.payload.len())].to_vec()
        })
    }
}

/// The test's stand-in for the controller: an MQTT client that records what
/// devices publish and answers fetch requests.
struct Peer {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    policy: Arc<Mutex<ChunkPolicy>>,
    bundles: Arc<Mutex<BTreeMap<Digest, Arc<Served>>>>,
    next_command: u64,
}

impl Peer {
    fn connect(port: u16, tls: Option<rustls::ClientConfig>) -> Peer {
        Peer::connect_as("edgefleet-controller-test", port, tls)
    }

    fn connect_as(id: &str, port: u16, tls: Option<rustls::ClientConfig>) -> Peer {
        let mut options = MqttOptions::new(id, "localhost", port);
        options.set_max_packet_size(8 << 20, 8 << 20);
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(5));
        if let Some(t) = tls {
            options.set_transport(Transport::tls_with_config(t.into()));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 4096);
        let (tx, rx) = mpsc::unbounded_channel();
        let policy = Arc::new(Mutex::new(ChunkPolicy::default()));
        let bundles: Arc<Mutex<BTreeMap<Digest, Arc<Served>>>> = Arc::default();
        let (p, b, c) = (policy.clone(), bundles.clone(), client.clone());
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.try_subscribe(format!("{PREFIX}/devices/+/+"), QoS::AtLeastOnce);
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(m))) => {
                        if m.topic.ends_with("/fetch") {
                            let Ok(req) = protocol::decode::<FetchRequest>(&m.payload) else {
                                continue;
                            };
                            let served = b.lock().expect("lock").get(&req.bundle).cloned();
                            let Some(served) = served else { continue };
                            let mut policy = p.lock().expect("lock");
                            policy.requests.push(req.clone());
                            for r in &req.ranges {
                                for index in r.start..r.start + r.count {
                                    if policy.limit.is_some_and(|l| policy.sent.len() >= l) {
                                        continue;
                                    }
                                    let Some(mut data) = served.chunk(index) else {
                                        continue;
                                    };
                                    if policy.tamper == Some(index) {
                                        policy.tamper = None;
                                        data[0] ^= 0xff;
                                    }
                                    policy.sent.push(index);
                                    let chunk = Chunk {
                                        bundle: req.bundle,
                                        index,
                                        data,
                                    };
                                    let topic = format!("{PREFIX}/bundles/{}/chunks", req.bundle);
                                    let _ = c.try_publish(
                                        topic,
                                        QoS::AtLeastOnce,
                                        false,
                                        protocol::encode(&chunk),
                                    );
                                }
                            }
                        } else {
                            let _ = tx.send((m.topic.clone(), m.payload.to_vec()));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if tx.is_closed() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Peer {
            client,
            rx,
            policy,
            bundles,
            // Increasing across peers, as the controller's are: a device
            // refuses an id it has carried out before.
            next_command: UnixTime::now().0.unsigned_abs() * 1000,
        }
    }

    fn offer(&self, path: &Path) -> Arc<Served> {
        let served = Arc::new(Served::load(path));
        self.bundles
            .lock()
            .expect("lock")
            .insert(served.digest, served.clone());
        served
    }

    async fn command(&mut self, action: Action) -> u64 {
        let id = self.next_command;
        self.next_command += 1;
        let cmd = Cmd {
            id,
            issued_at: UnixTime::now(),
            device: edgefleet_shared::DeviceId::new(DEVICE).expect("id"),
            action,
        };
        self.publish_command(edgefleet_shared::commands::sign_command(
            &controller_key(),
            &cmd,
        ))
        .await;
        id
    }

    /// Publishes `payload` as it is on the device's command topic.
    async fn publish_command(&self, payload: Vec<u8>) {
        self.client
            .publish(
                format!("{PREFIX}/devices/{DEVICE}/cmd"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("publish");
    }

    /// Has the agent install `served` with only 40 chunks served, then kills it
    /// mid-download: after the progress event for 36 chunks, and a moment for the
    /// rest of the 40 to arrive (progress is saved every 16). Returns that event.
    async fn kill_after_40_chunks(
        &mut self,
        agent: &mut Agent,
        served: &Served,
        events: &mut Vec<Event>,
    ) -> Event {
        self.policy.lock().expect("lock").limit = Some(40);
        self.install(served, InstallMode::Activate).await;
        let progress = self
            .event(
                events,
                |k| matches!(k, EventKind::InstallProgress { chunks_done, .. } if *chunks_done >= 36),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        agent.kill();
        progress
    }

    async fn install(&mut self, served: &Served, mode: InstallMode) -> u64 {
        self.command(Action::Install {
            bundle: BundleOffer {
                digest: served.digest,
                header: served.header.clone(),
            },
            mode,
        })
        .await
    }

    /// Waits for a message that `pick` accepts; panics (with `context`) after WAIT.
    async fn wait_for<T>(
        &mut self,
        context: &str,
        mut pick: impl FnMut(&str, &[u8]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.rx.recv()).await;
            match next {
                Ok(Some((topic, payload))) => {
                    if let Some(t) = pick(&topic, &payload) {
                        return t;
                    }
                }
                _ => panic!("timed out waiting for {context}"),
            }
        }
    }

    async fn state(&mut self, pred: impl Fn(&DeviceState) -> bool) -> DeviceState {
        self.wait_for("device state", |topic, payload| {
            if !topic.ends_with("/state") {
                return None;
            }
            protocol::decode::<DeviceState>(payload)
                .ok()
                .filter(|s| pred(s))
        })
        .await
    }

    /// Forgets messages received so far (from agents that are gone).
    fn drain(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Sends `install` until the device answers (as the controller re-sends
    /// unanswered commands: one sent before the device subscribed is lost), then
    /// waits for its result.
    async fn install_answered(&mut self, served: &Served, seen: &mut Vec<Event>) -> Event {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(
                Instant::now() < deadline,
                "no answer to install; events {seen:?}"
            );
            let id = self.install(served, InstallMode::Activate).await;
            let answered = self.try_event(seen, Duration::from_secs(3), |_| true).await;
            let Some(first) = answered else { continue };
            let is_result = |k: &EventKind| {
                matches!(
                    k,
                    EventKind::InstallSucceeded { .. } | EventKind::InstallFailed { .. }
                )
            };
            if is_result(&first.kind) && first.command == Some(id) {
                return first;
            }
            return self.event(seen, is_result).await;
        }
    }

    /// Like [`Peer::event`], but gives up after `within` (None).
    async fn try_event(
        &mut self,
        seen: &mut Vec<Event>,
        within: Duration,
        pred: impl Fn(&EventKind) -> bool,
    ) -> Option<Event> {
        tokio::time::timeout(within, self.event(seen, pred))
            .await
            .ok()
    }

    /// Waits for the event that `pred` accepts, collecting every event on the way.
    async fn event(&mut self, seen: &mut Vec<Event>, pred: impl Fn(&EventKind) -> bool) -> Event {
        self.wait_for("event", |topic, payload| {
            if !topic.ends_with("/events") {
                return None;
            }
            let e = protocol::decode::<Event>(payload).expect("events decode");
            seen.push(e.clone());
            pred(&e.kind).then_some(e)
        })
        .await
    }

    /// The install's outcome: its first InstallSucceeded or InstallFailed event.
    async fn install_outcome(&mut self, seen: &mut Vec<Event>) -> Event {
        self.event(seen, |k| {
            matches!(
                k,
                EventKind::InstallSucceeded { .. } | EventKind::InstallFailed { .. }
            )
        })
        .await
    }
}

fn infer_version(api: &str) -> (u16, String) {
    let body = r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#;
    let (status, text) = http(api, "POST", "/v2/models/iris/infer", body);
    let version = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["model_version"].as_str().map(str::to_owned))
        .unwrap_or(text);
    (status, version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_signed_fresh_commands_for_this_device_are_carried_out_and_each_only_once() {
    use edgefleet_shared::commands::{SignedCommand, sign_command};
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    let mut agent = Agent::start(dev.path(), &config);
    peer.state(|s| s.online).await;

    // A signed revert (nothing to revert to: answered with a rejection naming
    // its command id), resent until the device has subscribed and answers.
    let me = edgefleet_shared::DeviceId::new(DEVICE).expect("id");
    let command = |id: u64, device: &edgefleet_shared::DeviceId, issued_at: UnixTime| Cmd {
        id,
        issued_at,
        device: device.clone(),
        action: Action::Revert,
    };
    let mut events = Vec::new();
    let accepted = loop {
        let id = peer.command(Action::Revert).await;
        let answer = peer
            .try_event(&mut events, Duration::from_secs(3), |k| {
                matches!(k, EventKind::CommandRejected { .. })
            })
            .await;
        if let Some(e) = answer {
            assert_eq!(e.command, Some(id), "{e:?}");
            let EventKind::CommandRejected { detail } = &e.kind else {
                unreachable!()
            };
            assert!(
                !detail.contains("signed"),
                "a good command was refused: {detail}"
            );
            break id;
        }
    };
    let good = sign_command(&controller_key(), &command(accepted, &me, UnixTime::now()));

    // Each bad payload gets a rejection whose detail starts with its code, and
    // nothing else happens.
    let next = accepted + 1_000;
    let other_key = edgefleet_shared::SecretKey::from_seed([8; 32]);
    let now = UnixTime::now();
    let mut tampered: SignedCommand = protocol::decode(&good).expect("signed command");
    tampered.command = protocol::encode(&command(next + 9, &me, now));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unsigned", protocol::encode(&command(next, &me, now))),
        (
            "unknown_key",
            sign_command(&other_key, &command(next + 1, &me, now)),
        ),
        ("bad_signature", protocol::encode(&tampered)),
        (
            "wrong_device",
            sign_command(
                &controller_key(),
                &command(
                    next + 2,
                    &edgefleet_shared::DeviceId::new("dev-2").expect("id"),
                    now,
                ),
            ),
        ),
        (
            "stale",
            sign_command(
                &controller_key(),
                &command(next + 3, &me, now.plus_secs(-3601)),
            ),
        ),
        (
            "from_the_future",
            sign_command(
                &controller_key(),
                &command(next + 4, &me, now.plus_secs(3600)),
            ),
        ),
        ("replayed", good.clone()),
        ("malformed", b"not cbor at all".to_vec()),
    ];
    for (code, payload) in cases {
        peer.publish_command(payload).await;
        let e = peer
            .event(&mut events, |k| {
                matches!(k, EventKind::CommandRejected { .. })
            })
            .await;
        let EventKind::CommandRejected { detail } = &e.kind else {
            unreachable!()
        };
        assert!(
            detail.starts_with(&format!("{code}: ")),
            "{code}: {detail}\n{}",
            agent.log()
        );
    }

    // The window is on disk: after a restart the same command is still a replay.
    agent.kill();
    peer.drain();
    let agent = Agent::start(dev.path(), &config);
    peer.state(|s| s.online).await;
    // (Events not acknowledged before the kill come again first; they are
    // skipped: only the answer to this replay counts.)
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "no replay refusal; events {events:?}\n{}",
            agent.log()
        );
        peer.publish_command(good.clone()).await;
        let answer = peer
            .try_event(&mut events, Duration::from_secs(3), |k| {
                matches!(k, EventKind::CommandRejected { detail } if detail.starts_with("replayed: "))
            })
            .await;
        if answer.is_some() {
            break;
        }
    }
    assert!(
        !agent.log().contains("command received"),
        "a replayed command was carried out after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_install_over_mqtt_with_a_bad_chunk_refetched_and_switch_without_a_restart() {
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let v1 = peer.offer(&bundle_padded(
        dev.path(),
        "v1.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        1,
        0,
        100_000,
    ));
    let v2 = peer.offer(&bundle(
        dev.path(),
        "v2.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        2,
        10,
    ));
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    let agent = Agent::start(dev.path(), &config);

    let online = peer.state(|s| s.online).await;
    assert!(online.slots.is_empty(), "{online:?}");
    assert_eq!(http(&agent.api, "GET", "/v2/health/ready", "").0, 503);

    // Install v1 with one chunk corrupted on the wire: dropped, asked again.
    peer.policy.lock().expect("lock").tamper = Some(3);
    let cmd = peer.install(&v1, InstallMode::Activate).await;
    let mut events = Vec::new();
    let done = peer.install_outcome(&mut events).await;
    assert!(
        matches!(
            done.kind,
            EventKind::InstallSucceeded {
                activated: true,
                ..
            }
        ),
        "{done:?}\n{}",
        agent.log()
    );
    assert_eq!(done.command, Some(cmd));
    assert!(
        matches!(events[0].kind, EventKind::InstallStarted { .. }),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::InstallProgress { .. })),
        "{events:?}"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "event seqs"
    );
    let sent3 = peer
        .policy
        .lock()
        .expect("lock")
        .sent
        .iter()
        .filter(|i| **i == 3)
        .count();
    assert_eq!(sent3, 2, "the corrupted chunk was asked for again");
    assert!(agent.log().contains("dropped chunk 3"), "{}", agent.log());
    // The chunks after it waited on disk and were unpacked when it came.
    assert!(read_back_bytes(&agent.log()) > 0, "{}", agent.log());

    // Served at once by the running agent, and announced in the retained state.
    assert_eq!(infer_version(&agent.api), (200, "1.1.0".to_string()));
    let state = peer.state(|s| !s.slots.is_empty()).await;
    assert_eq!(state.slots[0].bundle.digest, v1.digest);

    // v2 (one chunk), then revert: the API follows each switch.
    peer.install(&v2, InstallMode::Activate).await;
    let done = peer.install_outcome(&mut events).await;
    assert!(
        matches!(done.kind, EventKind::InstallSucceeded { .. }),
        "{done:?}"
    );
    assert_eq!(infer_version(&agent.api), (200, "1.2.0".to_string()));
    let cmd = peer.command(Action::Revert).await;
    let reverted = peer
        .event(&mut events, |k| {
            matches!(
                k,
                EventKind::Reverted { .. } | EventKind::CommandRejected { .. }
            )
        })
        .await;
    assert_eq!(reverted.command, Some(cmd));
    assert!(
        matches!(reverted.kind, EventKind::Reverted { digest, .. } if digest == v1.digest),
        "{reverted:?}"
    );
    assert_eq!(infer_version(&agent.api), (200, "1.1.0".to_string()));

    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_from_the_first_missing_chunk_after_the_agent_is_killed() {
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    // 4 KiB chunks: about 60 of them.
    let v1 = peer.offer(&bundle_padded(
        dev.path(),
        "v1.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        1,
        0,
        240_000,
    ));
    let total = v1.payload.len().div_ceil(v1.chunk_size);
    assert!(total > 50, "{total} chunks");
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    let mut agent = Agent::start(dev.path(), &config);
    peer.state(|s| s.online).await;

    // Serve 40 chunks, then nothing; the agent is cut off mid-download.
    let mut events = Vec::new();
    let progress = peer
        .kill_after_40_chunks(&mut agent, &v1, &mut events)
        .await;
    let before = peer.policy.lock().expect("lock").sent.len();
    assert_eq!(before, 40, "{progress:?}");

    // Restart, serve everything: the first request starts at the first chunk
    // not saved before the kill, and the install completes.
    {
        let mut p = peer.policy.lock().expect("lock");
        p.limit = None;
        p.requests.clear();
    }
    let agent = Agent::start(dev.path(), &config);
    let done = peer.install_outcome(&mut events).await;
    assert!(
        matches!(done.kind, EventKind::InstallSucceeded { .. }),
        "{done:?}\n{}",
        agent.log()
    );
    let p = peer.policy.lock().expect("lock");
    let first = p.requests.first().expect("a fetch after restart").ranges[0].start;
    assert!((24..=40).contains(&first), "resumed at chunk {first}");
    let resent = p.sent.len() - total;
    // Progress is saved every 16 chunks: at most that many are fetched twice.
    assert!(resent <= 16, "{resent} chunks sent twice");
    println!("resume: {total} chunks, restarted at {first}, {resent} chunks re-sent");
    assert!(agent.log().contains("resuming download"), "{}", agent.log());
    // The chunks from before the kill were unpacked from the disk.
    let read_back = read_back_bytes(&agent.log());
    assert!(
        read_back >= 24 * v1.chunk_size,
        "{read_back} bytes read back after resuming at chunk {first}"
    );
    assert_eq!(infer_version(&agent.api).0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_changed_on_disk_before_it_is_unpacked_fails_the_install_and_keeps_the_model() {
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let v1_file = iris(dev.path(), "v1.efb", 1);
    let v2 = peer.offer(&bundle_padded(
        dev.path(),
        "v2.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        2,
        10,
        240_000,
    ));
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    sideload(&config, &v1_file);
    let mut agent = Agent::start(dev.path(), &config);
    peer.state(|s| s.online).await;

    // 40 chunks, then the agent is killed; chunk 3 changes on disk meanwhile.
    let mut events = Vec::new();
    peer.kill_after_40_chunks(&mut agent, &v2, &mut events)
        .await;
    let part = dev
        .path()
        .join("data/downloads")
        .join(v2.digest.to_hex())
        .join("bundle.part");
    let mut bytes = std::fs::read(&part).expect("the download on disk");
    let at = bytes.len() - v2.payload.len() + 3 * v2.chunk_size + 100;
    bytes[at] ^= 0x40;
    std::fs::write(&part, &bytes).expect("change chunk 3");

    peer.policy.lock().expect("lock").limit = None;
    let agent = Agent::start(dev.path(), &config);
    let done = peer.install_outcome(&mut events).await;
    let EventKind::InstallFailed {
        reason: FailureReason::Internal { detail },
        ..
    } = &done.kind
    else {
        panic!("{done:?}\n{}", agent.log());
    };
    assert!(
        detail.contains("chunk 3 read back") && detail.contains("changed on disk"),
        "{detail}"
    );
    assert_eq!(infer_version(&agent.api), (200, "1.1.0".to_string()));
    drop(agent);
    assert_eq!(active_release(&config), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_is_spooled_while_the_broker_is_down_and_delivered_without_a_gap() {
    let dev = Device::new();
    let mut broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    // Sideloaded before the agent starts: inference needs no broker.
    let file = iris(dev.path(), "v1.efb", 1);
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("--config")
        .arg(dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None))
        .arg("install")
        .arg(&file)
        .output()
        .expect("install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let config = dev.path().join("agent.toml");
    let agent = Agent::start(dev.path(), &config);

    let mut seqs = Vec::new();
    let mut last = None;
    while seqs.len() < 2 {
        let t: Telemetry = peer
            .wait_for("telemetry", |topic, p| {
                topic
                    .ends_with("/telemetry")
                    .then(|| protocol::decode(p).expect("telemetry"))
            })
            .await;
        seqs.push(t.seq);
        last = Some(t);
    }
    let t = last.expect("telemetry");
    assert!(
        t.device_metrics.mem_total > 0 && t.agent.rss_bytes > 0,
        "{t:?}"
    );
    assert_eq!(t.model.as_ref().map(|m| m.latency_counts.len()), Some(17));

    // Broker down for a while: inference goes on, telemetry is spooled.
    broker.stop();
    for _ in 0..4 {
        assert_eq!(
            infer_version(&agent.api).0,
            200,
            "inference with the broker down"
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    broker.run();
    let target = seqs[seqs.len() - 1] + 6;
    while seqs.iter().max().is_some_and(|m| *m < target) {
        let t: Telemetry = peer
            .wait_for("telemetry after the outage", |topic, p| {
                topic
                    .ends_with("/telemetry")
                    .then(|| protocol::decode(p).expect("telemetry"))
            })
            .await;
        seqs.push(t.seq);
    }
    seqs.sort_unstable();
    seqs.dedup();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "telemetry sequence has a gap\n{}",
        agent.log()
    );
    // The last inference made during the outage is counted.
    let counted = peer
        .wait_for("telemetry with inferences", |topic, p| {
            topic
                .ends_with("/telemetry")
                .then(|| protocol::decode::<Telemetry>(p).expect("telemetry"))
                .and_then(|t| t.model)
                .filter(|m| m.inferences >= 4)
        })
        .await;
    assert!(counted.latency_counts.iter().sum::<u64>() >= 4);
    assert!(
        agent.log().contains("sending spooled records"),
        "{}",
        agent.log()
    );
}

async fn next_report(peer: &mut Peer) -> Telemetry {
    peer.wait_for("telemetry", |topic, p| {
        topic
            .ends_with("/telemetry")
            .then(|| protocol::decode::<Telemetry>(p).expect("telemetry"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_the_controller_did_not_acknowledge_is_sent_again() {
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    let agent = Agent::start(dev.path(), &config);
    let ack = |peer: &Peer, t: &Telemetry| {
        let payload = protocol::encode(&protocol::TelemetryAck {
            epoch: t.epoch,
            seqs: vec![t.seq],
        });
        let topic = format!("{PREFIX}/devices/{DEVICE}/ack");
        peer.client
            .try_publish(topic, QoS::AtMostOnce, false, payload)
            .expect("ack sent");
    };
    // The first acknowledgement tells the agent that this controller sends
    // them; from then on a report stays spooled until acknowledged.
    let first = next_report(&mut peer).await;
    ack(&peer, &first);
    let second = next_report(&mut peer).await;
    ack(&peer, &second);
    // Nothing else acknowledged: with a report every second, an unacknowledged
    // one is sent again after 5 s (three periods, at least 5 s).
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && seen.values().all(|n| *n < 2) {
        let t = next_report(&mut peer).await;
        *seen.entry(t.seq).or_default() += 1;
    }
    let again: Vec<u64> = seen
        .iter()
        .filter(|(_, n)| **n >= 2)
        .map(|(s, _)| *s)
        .collect();
    assert!(
        !again.is_empty(),
        "no unacknowledged report sent again in 20 s: {seen:?}\n{}",
        agent.log()
    );
    assert!(
        again.iter().all(|s| *s > second.seq),
        "an acknowledged report was sent again: {again:?} (acknowledged up to {})",
        second.seq
    );
    assert!(
        !seen.contains_key(&second.seq) && !seen.contains_key(&first.seq),
        "an acknowledged report was sent again: {seen:?}"
    );
    assert!(
        agent
            .log()
            .contains("telemetry not acknowledged by the controller"),
        "{}",
        agent.log()
    );
}

/// A tmpfs of `size` mounted at `at` for the test's life (the tests run as
/// root; .ci/run does): a disk that can really be full.
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { at: at.to_owned() }
    }

    /// Fills the filesystem to its last page with `filler` (appending: called
    /// again, it takes the pages freed since).
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.at.join("filler"))
            .expect("filler");
        let page = [0x5au8; 4096];
        while f.write_all(&page).is_ok() {}
        let _ = f.sync_all();
    }

    fn make_room(&self) {
        std::fs::remove_file(self.at.join("filler")).expect("remove filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_delays_the_link_until_there_is_room_and_every_lost_report_is_counted() {
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    let disk = Tmpfs::mount(&dev.path().join("data"), "4m");
    let file = iris(dev.path(), "v1.efb", 1);
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("--config")
        .arg(&config)
        .arg("install")
        .arg(&file)
        .output()
        .expect("install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // 1. The disk is full when the agent starts: it serves its model, and its
    // controller link waits for room instead of staying off for good.
    disk.fill();
    let agent = Agent::start(dev.path(), &config);
    assert_eq!(infer_version(&agent.api).0, 200, "inference on a full disk");
    let early = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match peer.rx.recv().await {
                Some((topic, _)) if topic.ends_with("/telemetry") => return,
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
        }
    })
    .await;
    assert!(early.is_err(), "telemetry without a spool on a full disk");
    assert!(
        agent.log().contains("cannot open the spool"),
        "{}",
        agent.log()
    );
    disk.make_room();
    let first: Telemetry = peer
        .wait_for("telemetry once the disk has room", |topic, p| {
            topic
                .ends_with("/telemetry")
                .then(|| protocol::decode(p).expect("telemetry"))
        })
        .await;
    assert_eq!(first.agent.spool_dropped, 0, "{first:?}");

    // 2. The disk fills while the agent runs: the reports it cannot spool are
    // lost, and counted; the count arrives with the next report.
    // Kept full for 3.5 s: the agent frees a page each time the broker
    // acknowledges a record, so the filler takes those back as they come.
    for _ in 0..35 {
        disk.fill();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    disk.make_room();
    let mut seqs = vec![first.seq];
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        assert!(
            Instant::now() < deadline,
            "no telemetry counted the lost reports: {seqs:?}\n{}",
            agent.log()
        );
        let t: Telemetry = peer
            .wait_for("telemetry after the disk was full", |topic, p| {
                topic
                    .ends_with("/telemetry")
                    .then(|| protocol::decode(p).expect("telemetry"))
            })
            .await;
        seqs.push(t.seq);
        if t.agent.spool_dropped > 0 {
            break t;
        }
    };
    seqs.sort_unstable();
    seqs.dedup();
    let (lo, hi) = (seqs[0], *seqs.last().expect("seq"));
    let missing = (hi - lo + 1) - seqs.len() as u64;
    assert!(missing >= 2, "seqs {seqs:?}");
    assert_eq!(
        after.agent.spool_dropped,
        missing,
        "every gap in {seqs:?} is counted\n{}",
        agent.log()
    );
}

/// Mosquitto as recommended for production: mutual TLS, the certificate's CN as
/// the user name, and an ACL that confines each device to its own topics.
fn secure_broker(dir: &Path, pki: &Pki) -> Broker {
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        format!(
            "pattern write {PREFIX}/devices/%u/state\npattern write {PREFIX}/devices/%u/events\n\
             pattern write {PREFIX}/devices/%u/telemetry\npattern write {PREFIX}/devices/%u/fetch\n\
             pattern write {PREFIX}/devices/%u/samples\npattern read {PREFIX}/devices/%u/cmd\n\
             pattern read {PREFIX}/bundles/+/chunks\n\nuser edgefleet-controller-test\ntopic readwrite {PREFIX}/#\n"
        ),
    )
    .expect("acl");
    let d = &pki.dir;
    Broker::start(
        dir,
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nacl_file {}\n",
            s(&d.join("ca.pem")),
            s(&d.join("server.pem")),
            s(&d.join("server.key")),
            s(&acl)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_mosquitto_installs_and_the_acl_confines_each_device() {
    let dev = Device::new();
    let pki = Pki::new(dev.path());
    let broker = secure_broker(dev.path(), &pki);
    let mut peer = Peer::connect(broker.port, Some(pki.tls("edgefleet-controller-test")));
    let v1 = peer.offer(&iris(dev.path(), "v1.efb", 1));
    let (ca, cert, key) = pki.client(DEVICE);
    let config = dev.config(
        &format!("mqtts://localhost:{}", broker.port),
        Some((&ca, &cert, &key)),
    );
    let agent = Agent::start(dev.path(), &config);
    peer.state(|s| s.online).await;
    peer.install(&v1, InstallMode::Activate).await;
    let mut events = Vec::new();
    let done = peer.install_outcome(&mut events).await;
    assert!(
        matches!(done.kind, EventKind::InstallSucceeded { .. }),
        "{done:?}\n{}",
        agent.log()
    );
    assert_eq!(infer_version(&agent.api).0, 200);

    // Another enrolled device may not speak for dev-1: the broker drops its
    // message; its own topic works. Mosquitto keeps order per connection, so
    // receiving the second message proves the first was not forwarded.
    let imposter = Peer::connect_as("dev-2", broker.port, Some(pki.tls("dev-2")));
    let fake = Event {
        device: edgefleet_shared::DeviceId::new(DEVICE).expect("id"),
        epoch: 1,
        seq: 999,
        at: UnixTime::now(),
        command: None,
        kind: EventKind::CommandRejected {
            detail: "forged".into(),
        },
    };
    for topic in [
        format!("{PREFIX}/devices/{DEVICE}/events"),
        format!("{PREFIX}/devices/dev-2/events"),
    ] {
        imposter
            .client
            .publish(topic, QoS::AtLeastOnce, false, protocol::encode(&fake))
            .await
            .expect("publish");
    }
    let arrived = peer
        .wait_for("the imposter's own event", |topic, payload| {
            topic
                .ends_with("/events")
                .then(|| {
                    (
                        topic.to_owned(),
                        protocol::decode::<Event>(payload).expect("event"),
                    )
                })
                .filter(|(_, e)| e.seq == 999)
        })
        .await;
    assert_eq!(
        arrived.0,
        format!("{PREFIX}/devices/dev-2/events"),
        "the forged message on dev-1's topic got through"
    );

    // No certificate, no connection.
    assert!(
        !connects_without_a_certificate(broker.port, &ca).await,
        "a client without a certificate connected"
    );
}

/// Whether a TLS client that trusts `ca` but has no certificate of its own gets a
/// CONNACK from the broker.
async fn connects_without_a_certificate(port: u16, ca: &Path) -> bool {
    let mut options = MqttOptions::new("anonymous", "localhost", port);
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("ca") {
            r.add(c.expect("cert")).expect("add");
        }
        r
    };
    let no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    options.set_transport(Transport::tls_with_config(no_cert.into()));
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .expect("bounded")
}

/// Bytes read back from disk to be unpacked, from the first completed download's
/// log line.
fn read_back_bytes(log: &str) -> usize {
    log.split("read_back_bytes=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no completed download in the log:\n{log}"))
}

/// `edgefleet-agent status --json` of a stopped agent: the active release.
fn active_release(config: &Path) -> Option<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("--config")
        .arg(config)
        .args(["status", "--json"])
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["active"]["release"].as_u64()
}

fn sideload(config: &Path, file: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("--config")
        .arg(config)
        .arg("install")
        .arg(file)
        .output()
        .expect("install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_any_moment_of_an_install_comes_back_on_a_whole_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let v1_file = iris(dir.path(), "v1.efb", 1);
    let v2 = peer.offer(&bundle_padded(
        dir.path(),
        "v2.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        2,
        10,
        400_000,
    ));
    let mut outcomes = Vec::new();
    // SIGKILL at spread-out moments after the install began: mid-download, during
    // verification and unpacking, during the health check, after the switch.
    for delay_ms in [0u64, 15, 40, 80, 130, 200, 300, 500] {
        let dev = Device::new();
        let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
        sideload(&config, &v1_file);
        peer.drain();
        let mut agent = Agent::start(dev.path(), &config);
        let mut events = Vec::new();
        // The first install is answered (so the kill lands in the install), then
        // the agent is killed `delay_ms` after that answer.
        let id = loop {
            let id = peer.install(&v2, InstallMode::Activate).await;
            if peer
                .try_event(&mut events, Duration::from_secs(3), |_| true)
                .await
                .is_some()
            {
                break id;
            }
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        agent.kill();
        let release = active_release(&config);
        assert!(
            matches!(release, Some(1 | 2)),
            "killed after {delay_ms} ms: active {release:?}\n{}",
            agent.log()
        );
        outcomes.push((delay_ms, release));
        // It serves that model as soon as it is back, and finishes the job when
        // the controller repeats the command (as it does for unanswered ones).
        peer.drain();
        let agent = Agent::start(dev.path(), &config);
        assert_eq!(infer_version(&agent.api).0, 200, "after {delay_ms} ms");
        let mut events = Vec::new();
        let done = peer.install_answered(&v2, &mut events).await;
        assert!(
            matches!(done.kind, EventKind::InstallSucceeded { .. }),
            "after {delay_ms} ms (command {id}): {done:?}\n{}",
            agent.log()
        );
        assert_eq!(infer_version(&agent.api), (200, "1.2.0".to_string()));
        drop(agent);
        assert_eq!(active_release(&config), Some(2));
        let leftovers = std::fs::read_dir(dev.path().join("data/bundles"))
            .expect("bundles")
            .count();
        assert!(leftovers <= 2, "{leftovers} bundle dirs");
    }
    println!("kill outcomes (delay ms, active release after the kill): {outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_bundles_are_reported_with_the_reason_before_any_chunk_is_fetched() {
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let good = iris(dev.path(), "v1.efb", 1);
    let big = peer.offer(&bundle_padded(
        dev.path(),
        "big.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        2,
        0,
        300_000,
    ));
    // Re-sign the good bundle's header with a key the trust root does not hold.
    let served = Served::load(&good);
    let mut header = RawHeader::parse(&served.header).expect("header");
    header.signatures.clear();
    header.sign(&edgefleet_shared::SecretKey::from_seed([9; 32]));
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    // A device that takes bundles up to 100 kB.
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{text}max_bundle_bytes = 100000\n")).expect("config");
    let agent = Agent::start(dev.path(), &config);
    peer.state(|s| s.online).await;

    let mut events = Vec::new();
    peer.command(Action::Install {
        bundle: BundleOffer {
            digest: header.digest(),
            header: header.to_bytes(),
        },
        mode: InstallMode::Activate,
    })
    .await;
    let refused = peer
        .event(&mut events, |k| {
            matches!(k, EventKind::InstallFailed { .. })
        })
        .await;
    let EventKind::InstallFailed { reason, .. } = &refused.kind else {
        unreachable!()
    };
    let reason = serde_json::to_string(reason).expect("json");
    assert!(
        reason.contains("\"refused\"") && reason.contains("unknown_key"),
        "{reason}"
    );

    peer.install(&big, InstallMode::Activate).await;
    let refused = peer
        .event(&mut events, |k| {
            matches!(k, EventKind::InstallFailed { .. })
        })
        .await;
    let EventKind::InstallFailed { reason, .. } = &refused.kind else {
        unreachable!()
    };
    let reason = serde_json::to_string(reason).expect("json");
    assert!(
        reason.contains("\"preflight\"") && reason.contains("limits.max_bundle_bytes"),
        "{reason}"
    );
    assert!(
        peer.policy.lock().expect("lock").requests.is_empty(),
        "nothing is fetched for a refused bundle"
    );
    // The failure is also in the retained state; nothing is installed.
    let state = peer.state(|s| s.last_install.is_some()).await;
    assert!(state.slots.is_empty(), "{state:?}");
    assert_eq!(http(&agent.api, "GET", "/v2/health/ready", "").0, 503);
}

/// The controller's embedded broker (rumqttd), with mutual TLS: client certificates
/// signed by the CA are required (`verify-client-cert`).
fn embedded_broker(pki: &Pki) -> u16 {
    let port = free_port();
    let d = &pki.dir;
    let config = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 8388608
max_segment_count = 4
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.tls]
capath = "{}"
certpath = "{}"
keypath = "{}"
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 5242880
max_inflight_count = 100
dynamic_filters = true
"#,
        s(&d.join("ca.pem")),
        s(&d.join("server.pem")),
        s(&d.join("server.key")),
    );
    let config: rumqttd::Config = toml::from_str(&config).expect("rumqttd config");
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rumqttd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_with_mutual_tls_carries_an_install() {
    let dev = Device::new();
    let pki = Pki::new(dev.path());
    let port = embedded_broker(&pki);
    let mut peer = Peer::connect(port, Some(pki.tls("edgefleet-controller-test")));
    let v1 = peer.offer(&bundle_padded(
        dev.path(),
        "v1.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        1,
        0,
        60_000,
    ));
    let (ca, cert, key) = pki.client(DEVICE);
    let config = dev.config(
        &format!("mqtts://localhost:{port}"),
        Some((&ca, &cert, &key)),
    );
    let agent = Agent::start(dev.path(), &config);
    peer.state(|s| s.online).await;
    peer.install(&v1, InstallMode::Activate).await;
    let mut events = Vec::new();
    let done = peer.install_outcome(&mut events).await;
    assert!(
        matches!(done.kind, EventKind::InstallSucceeded { .. }),
        "{done:?}\n{}",
        agent.log()
    );
    assert_eq!(infer_version(&agent.api), (200, "1.1.0".to_string()));
    // Chunks came in order: each was unpacked as it arrived, none read back.
    let total = v1.payload.len().div_ceil(v1.chunk_size);
    assert!(
        agent
            .log()
            .contains(&format!("unpacked_chunks={total} read_back_bytes=0")),
        "{}",
        agent.log()
    );
    let telemetry: Telemetry = peer
        .wait_for("telemetry", |topic, p| {
            topic
                .ends_with("/telemetry")
                .then(|| protocol::decode(p).expect("telemetry"))
        })
        .await;
    assert_eq!(telemetry.device.as_str(), DEVICE);
    assert!(
        !connects_without_a_certificate(port, &ca).await,
        "rumqttd let a client without a certificate connect"
    );
}

/// Serves one `flowers` request (the ZipMap model's input name) on the API.
fn flowers_answer(api: &str) -> u16 {
    let body = r#"{"inputs":[{"name":"float_input","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#;
    http(api, "POST", "/v2/models/flowers/infer", body).0
}

/// The digest in `state`'s active slot of `channel`.
fn active_digest(state: &DeviceState, channel: &str) -> Option<Digest> {
    state
        .slots
        .iter()
        .find(|s| s.bundle.channel.as_str() == channel && s.role == SlotRole::Active)
        .map(|s| s.bundle.digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_each_channel_installs_reverts_reports_and_is_removed_on_its_own() {
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let iris1 = bundle(
        dev.path(),
        "iris1.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        1,
        0,
    );
    let flowers1 = common::bundle_on(dev.path(), "flowers1.efb", "flowers", "iris_zipmap.onnx", 1);
    let iris2 = peer.offer(&bundle(
        dev.path(),
        "iris2.efb",
        "iris_logreg.onnx",
        "iris_logreg.onnx",
        2,
        10,
    ));
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    sideload(&config, &iris1);
    sideload(&config, &flowers1);
    let agent = Agent::start(dev.path(), &config);
    let online = peer.state(|s| s.online && s.slots.len() == 2).await;
    let flowers = active_digest(&online, "flowers").expect("flowers active");

    // An install of iris goes to iris's own second slot; flowers is untouched.
    let mut events = Vec::new();
    peer.install(&iris2, InstallMode::Activate).await;
    let done = peer.install_outcome(&mut events).await;
    assert!(
        matches!(
            done.kind,
            EventKind::InstallSucceeded {
                slot: Slot::B,
                activated: true,
                ..
            }
        ),
        "{done:?}\n{}",
        agent.log()
    );
    let state = peer.state(|s| s.slots.len() == 3).await;
    assert_eq!(active_digest(&state, "iris"), Some(iris2.digest));
    assert_eq!(active_digest(&state, "flowers"), Some(flowers));
    assert_eq!(infer_version(&agent.api), (200, "1.2.0".to_string()));
    assert_eq!(flowers_answer(&agent.api), 200);

    // Telemetry reports each channel on its own, with its own counters.
    let telemetry = peer
        .wait_for("telemetry with both channels' requests", |topic, p| {
            topic
                .ends_with("/telemetry")
                .then(|| protocol::decode::<Telemetry>(p).expect("telemetry"))
                .filter(|t| {
                    t.channels.len() == 2
                        && t.channels
                            .iter()
                            .all(|c| c.model.as_ref().is_some_and(|m| m.inferences >= 1))
                })
        })
        .await;
    assert!(telemetry.model.is_none(), "{telemetry:?}");
    let channels: Vec<&str> = telemetry
        .channels
        .iter()
        .map(|c| c.channel.as_str())
        .collect();
    assert_eq!(channels, ["flowers", "iris"]);
    assert_eq!(
        telemetry.channels[1].model.as_ref().map(|m| m.digest),
        Some(iris2.digest)
    );

    // A revert that names no channel is refused (two are installed); one that
    // names iris goes back on iris only.
    let cmd = peer.command(Action::Revert).await;
    let rejected = peer
        .event(&mut events, |k| {
            matches!(k, EventKind::CommandRejected { .. })
        })
        .await;
    assert_eq!(rejected.command, Some(cmd));
    assert!(
        matches!(&rejected.kind, EventKind::CommandRejected { detail } if detail.contains("flowers, iris")),
        "{rejected:?}"
    );
    let iris = ModelChannel::new("iris").expect("channel");
    let cmd = peer.command(Action::RevertChannel { channel: iris }).await;
    let reverted = peer
        .event(&mut events, |k| matches!(k, EventKind::Reverted { .. }))
        .await;
    assert_eq!(reverted.command, Some(cmd));
    assert_eq!(infer_version(&agent.api), (200, "1.1.0".to_string()));
    let state = peer
        .state(|s| active_digest(s, "iris") != Some(iris2.digest))
        .await;
    assert_eq!(active_digest(&state, "flowers"), Some(flowers));

    // Removing flowers: iris keeps serving; flowers is gone from the API and
    // the state.
    let channel = ModelChannel::new("flowers").expect("channel");
    let cmd = peer.command(Action::Remove { channel }).await;
    let removed = peer
        .event(&mut events, |k| matches!(k, EventKind::Removed { .. }))
        .await;
    assert_eq!(removed.command, Some(cmd));
    let state = peer.state(|s| active_digest(s, "flowers").is_none()).await;
    assert_eq!(state.slots.len(), 2, "{state:?}");
    assert_eq!(flowers_answer(&agent.api), 404);
    assert_eq!(infer_version(&agent.api), (200, "1.1.0".to_string()));
    drop(broker);
}

/// How the agent's own last update ended reaches the controller once, over the
/// event spool, after the agent connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outcome_of_an_agent_update_is_reported_once() {
    use edgefleet_agent::selfupdate::{AgentUpdateState, BinarySlot, Phase, Release, start};
    let dev = Device::new();
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    let release = Release {
        digest: Digest::of(b"agent 9.7.0"),
        release: 3,
        version: "9.7.0".into(),
    };
    let done = AgentUpdateState::default()
        .begin_trial(BinarySlot::A, &release, UnixTime::now(), 60)
        .expect("begin")
        .confirm()
        .commit();
    let data = dev.path().join("data");
    start::save(&data, &done).expect("record");

    let mut agent = Agent::start(dev.path(), &config);
    let mut seen = Vec::new();
    let e = peer
        .event(&mut seen, |k| matches!(k, EventKind::AgentUpdated { .. }))
        .await;
    assert_eq!(
        e.kind,
        EventKind::AgentUpdated {
            digest: release.digest,
            version: "9.7.0".into(),
            release: 3
        }
    );
    let record = start::load(&data)
        .expect("record")
        .current
        .expect("current");
    assert!(
        record.reported && record.phase == Phase::Committed,
        "{record:?}"
    );

    // Started again: the outcome is not reported a second time. (The same
    // spooled event may be delivered again, with its sequence number, if the
    // kill came before the broker's acknowledgement: the controller keeps one.)
    agent.kill();
    peer.drain();
    seen.clear();
    let _agent = Agent::start(dev.path(), &config);
    let _ = peer.state(|s| s.online).await;
    let again = peer
        .try_event(&mut seen, Duration::from_secs(3), |k| {
            matches!(k, EventKind::AgentUpdated { .. })
        })
        .await;
    if let Some(again) = again {
        assert_eq!(
            (again.epoch, again.seq),
            (e.epoch, e.seq),
            "reported twice: {seen:?}"
        );
    }
}

/// The key of the agent-release role in [`write_root_with_release_role`].
fn release_key() -> edgefleet_shared::SecretKey {
    edgefleet_shared::SecretKey::from_seed([42; 32])
}

/// A trust root whose model key is `common::key()` and whose agent-release
/// role is [`release_key`].
fn write_root_with_release_role(path: &Path) {
    use edgefleet_shared::trust::RoleKeys;
    let doc = edgefleet_shared::TrustRoot::new(
        1,
        UnixTime::now().plus_days(365),
        1,
        vec![common::key().public()],
    )
    .with_agent_releases(RoleKeys {
        threshold: 1,
        keys: vec![release_key().public()],
    });
    let mut root = doc.to_unsigned();
    root.sign(&common::key());
    std::fs::write(path, root.to_bytes()).expect("root");
}

/// The offer of an agent release (`release`, binaries for `arches`), signed by
/// `signer`: only its header travels in the command.
fn agent_offer(release: u64, arches: &[&str], signer: &edgefleet_shared::SecretKey) -> BundleOffer {
    use edgefleet_shared::Arch;
    use edgefleet_shared::bundle::{
        ArtifactInput, ArtifactSource, ManifestDraft, manifest_bytes, prepare_manifest,
    };
    use edgefleet_shared::manifest::{
        AGENT_CHANNEL, ArtifactKind, Constraints, HealthPolicy, ModelSchema, agent_binary_name,
    };
    let inputs: Vec<ArtifactInput> = arches
        .iter()
        .map(|a| ArtifactInput {
            name: agent_binary_name(&Arch::new(a).expect("arch")).expect("name"),
            kind: ArtifactKind::Agent,
            source: ArtifactSource::Bytes(format!("agent for {a}").into_bytes()),
        })
        .collect();
    let now = UnixTime::now();
    let draft = ManifestDraft {
        channel: ModelChannel::new(AGENT_CHANNEL).expect("channel"),
        version: semver::Version::new(9, 8, release),
        release,
        created_at: now.plus_days(-1),
        expires_at: now.plus_days(30),
        schema: ModelSchema::default(),
        constraints: Constraints {
            architectures: arches.iter().map(|a| Arch::new(a).expect("arch")).collect(),
            min_agent_version: "0.1.0".into(),
            memory_bytes: 1 << 20,
        },
        health: HealthPolicy::default(),
        chunk_size: 4096,
    };
    let manifest = prepare_manifest(&draft, &inputs).expect("in memory");
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(&manifest),
        signatures: vec![],
    };
    header.sign(signer);
    BundleOffer {
        digest: header.digest(),
        header: header.to_bytes(),
    }
}

/// Sends `update_agent` with `offer`; returns the event that answers it.
async fn answer_to_update(peer: &mut Peer, offer: BundleOffer) -> Event {
    let id = peer.command(Action::UpdateAgent { release: offer }).await;
    let mut seen = Vec::new();
    let e = peer
        .event(&mut seen, |k| {
            matches!(
                k,
                EventKind::AgentUpdateFailed { .. } | EventKind::CommandRejected { .. }
            )
        })
        .await;
    assert_eq!(e.command, Some(id));
    e
}

/// An `update_agent` the device refuses before fetching anything: the code of
/// the refusal.
async fn refused_update(peer: &mut Peer, offer: BundleOffer) -> String {
    use edgefleet_shared::protocol::AgentUpdateFailure;
    let digest = offer.digest;
    match answer_to_update(peer, offer).await.kind {
        EventKind::AgentUpdateFailed {
            digest: d,
            reason: AgentUpdateFailure::Refused { refusal },
        } if d == digest => refusal.code(),
        other => panic!("expected a refusal of {}, got {other:?}", digest.short()),
    }
}

/// `update_agent` over a real broker: a model signer's release, one for another
/// architecture, a downgrade below the device's agent floor, a header that is
/// not the named release and a cut header are refused with their reasons
/// before any chunk; a good one is verified (and answered: the download is not
/// built yet, docs/agent-update.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_releases_are_checked_with_their_own_role_floor_and_architecture() {
    use edgefleet_agent::selfupdate::{AgentUpdateState, BinarySlot, Release, start};
    let dev = Device::new();
    write_root_with_release_role(&dev.path().join("root.cbor"));
    let broker = Broker::start(dev.path(), "allow_anonymous true");
    let mut peer = Peer::connect(broker.port, None);
    let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
    // This device's agent is at release 5.
    let five = Release {
        digest: Digest::of(b"agent release 5"),
        release: 5,
        version: "9.8.5".into(),
    };
    let state = AgentUpdateState::default()
        .begin_trial(BinarySlot::A, &five, UnixTime::now(), 60)
        .expect("begin")
        .confirm()
        .commit()
        .mark_reported();
    start::save(&dev.path().join("data"), &state).expect("record");
    let _agent = Agent::start(dev.path(), &config);
    let _ = peer.state(|s| s.online).await;
    let here = std::env::consts::ARCH;
    let other = if here == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };

    let by_model_signer = agent_offer(6, &[here], &common::key());
    assert_eq!(
        refused_update(&mut peer, by_model_signer).await,
        "unknown_key"
    );
    let elsewhere = agent_offer(6, &[other], &release_key());
    assert_eq!(
        refused_update(&mut peer, elsewhere).await,
        "architecture_not_supported"
    );
    let older = agent_offer(4, &[here], &release_key());
    assert_eq!(refused_update(&mut peer, older).await, "rollback");
    let mut mismatched = agent_offer(6, &[here], &release_key());
    mismatched.digest = Digest::of(b"another release");
    assert_eq!(
        refused_update(&mut peer, mismatched).await,
        "invalid_manifest"
    );
    let mut cut = agent_offer(6, &[here], &release_key());
    cut.header.truncate(40);
    assert_eq!(refused_update(&mut peer, cut).await, "truncated");

    // A good release, but nothing would restart this agent (started by the
    // test, not under a supervisor) if the new binary failed.
    let good = agent_offer(6, &[other, here], &release_key());
    let digest = good.digest;
    let answer = answer_to_update(&mut peer, good).await;
    assert_eq!(
        answer.kind.clone(),
        EventKind::AgentUpdateFailed {
            digest,
            reason: edgefleet_shared::protocol::AgentUpdateFailure::Unsupervised
        },
        "{answer:?}"
    );
}

/// A flashed device: the agent as a plain file at the link's path (the
/// supervisor's ExecStart), the slots' directory empty, and `[self_update]`
/// in its config.
fn flashed(dev: &Device, config: &Path, confirm_within_s: u32) -> (PathBuf, PathBuf) {
    let (bin, link) = (
        dev.path().join("lib"),
        dev.path().join("bin/edgefleet-agent"),
    );
    std::fs::create_dir_all(link.parent().expect("dir")).expect("bin dir");
    std::fs::copy(
        stripped(Path::new(env!("CARGO_BIN_EXE_edgefleet-agent"))),
        &link,
    )
    .expect("flash the agent");
    let mut text = std::fs::read_to_string(config).expect("config");
    text.push_str(&format!(
        "[self_update]\nbinary_dir = \"{}\"\nlink = \"{}\"\nconfirm_within_s = {confirm_within_s}\n",
        s(&bin),
        s(&link)
    ));
    std::fs::write(config, text).expect("config");
    (bin, link)
}

/// A device set up for its agent's own updates: a trust root with the
/// agent-release role, Mosquitto and a test peer, the agent [`flashed`] with
/// the iris model sideloaded, running under a [`Supervisor`] whose local API
/// listens on a fixed port (an agent started again after a failed trial
/// listens where the one before did), online.
struct SelfUpdating {
    // Dropped in this order: the agent, the peer, the broker, the directory.
    supervisor: Supervisor,
    peer: Peer,
    broker: Broker,
    api: String,
    log: PathBuf,
    layout: edgefleet_agent::selfupdate::handover::Layout,
    dev: Device,
}

impl SelfUpdating {
    /// `confirm_within_s`: a new binary's deadline to confirm.
    async fn start(confirm_within_s: u32) -> SelfUpdating {
        let dev = Device::new();
        write_root_with_release_role(&dev.path().join("root.cbor"));
        let broker = Broker::start(dev.path(), "allow_anonymous true");
        let mut peer = Peer::connect(broker.port, None);
        let config = dev.config(&format!("mqtt://127.0.0.1:{}", broker.port), None);
        let (binary_dir, link) = flashed(&dev, &config, confirm_within_s);
        sideload(&config, &iris(dev.path(), "iris.efb", 1));
        let log = dev.path().join("supervised.log");
        let http = format!("127.0.0.1:{}", free_port());
        let supervisor = Supervisor::start(
            &link,
            &["--config", s(&config), "run", "--http", &http],
            &log,
        );
        let api = supervisor.api();
        let _ = peer.state(|s| s.online).await;
        SelfUpdating {
            supervisor,
            peer,
            broker,
            api,
            log,
            layout: edgefleet_agent::selfupdate::handover::Layout { binary_dir, link },
            dev,
        }
    }
}

/// Whether the local API answers `/v2/health/ready` with 200 (no panic when
/// it does not answer at all).
fn ready(api: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    if out.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out).chars().take(80).collect())
    }
}

/// Whether the local API answers an iris inference with 200 (no panic when it
/// does not answer, or drops the connection).
fn serves_iris(api: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let body = r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#;
    let mut s = std::net::TcpStream::connect(api).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    if out.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out).chars().take(80).collect())
    }
}

/// v1 -> v2 over MQTT on a flashed device under a supervisor: the agent
/// fetches only its own architecture's chunks (one corrupted on the wire is
/// dropped and fetched again), puts the binary in the other slot, probes it
/// and execs it; the new agent serves on the same socket,
/// confirms once connected, switches the link and reports `agent_updated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flashed_agent_updates_itself_over_mqtt_and_keeps_serving() {
    use edgefleet_agent::selfupdate::{BinarySlot, Phase, start};
    use edgefleet_agent::version::rewrite_version;
    let SelfUpdating {
        supervisor,
        mut peer,
        broker,
        api,
        log,
        layout,
        dev,
    } = SelfUpdating::start(30).await;
    let link = layout.link.clone();
    let (status, _) = infer_version(&api);
    assert_eq!(status, 200);

    // The next release: this build, saying 9.9.1; a decoy "aarch64" binary
    // first in the payload, which this device must not fetch.
    let own = std::fs::read(stripped(Path::new(env!("CARGO_BIN_EXE_edgefleet-agent"))))
        .expect("read the agent");
    let next = rewrite_version(&own, "9.9.1").expect("one version slot");
    let decoy = vec![0u8; 300 * 1024];
    let here = std::env::consts::ARCH;
    let other = if here == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    let file = agent_release_file(
        dev.path(),
        &[(other, decoy), (here, next)],
        "9.9.1",
        1,
        &release_key(),
    );
    let served = peer.offer(&file);
    // This device's binary's chunks, the decoy's before them; one of its own
    // is corrupted on the wire the first time it is sent.
    let manifest = RawHeader::parse(&served.header)
        .expect("header")
        .decode_unverified()
        .expect("manifest");
    let own = manifest
        .agent_binary(&edgefleet_shared::Arch::current())
        .expect("this device's binary");
    let (start_byte, end_byte) = manifest.artifact_range(&own.name).expect("range");
    let wanted = manifest.payload.chunks_covering(start_byte, end_byte);
    let tampered = wanted.start + 1;
    peer.policy.lock().expect("lock").tamper = Some(tampered);

    // The local API is asked all along: how long it does not answer.
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let prober = {
        let (api, probing) = (api.clone(), probing.clone());
        std::thread::spawn(move || {
            let (mut failures, mut longest, mut last_ok) =
                (Vec::new(), Duration::ZERO, Instant::now());
            while probing.load(std::sync::atomic::Ordering::SeqCst) {
                match ready(&api) {
                    Ok(()) => {
                        longest = longest.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Err(e) => failures.push(e),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (failures, longest)
        })
    };
    peer.command(Action::UpdateAgent {
        release: BundleOffer {
            digest: served.digest,
            header: served.header.clone(),
        },
    })
    .await;
    // The new agent's state (online, 9.9.1) comes first on its connection, then
    // the outcome from its record.
    let state = peer.state(|s| s.online && s.agent_version == "9.9.1").await;
    assert_eq!(state.agent_version, "9.9.1");
    let mut seen = Vec::new();
    let done = peer
        .event(&mut seen, |k| {
            matches!(
                k,
                EventKind::AgentUpdated { .. } | EventKind::AgentUpdateFailed { .. }
            )
        })
        .await;
    assert_eq!(
        done.kind,
        EventKind::AgentUpdated {
            digest: served.digest,
            version: "9.9.1".into(),
            release: 1
        },
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        done.command, None,
        "reported by the new agent from its record"
    );
    probing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (failures, longest) = prober.join().expect("prober");
    println!("local API: longest gap between answers {longest:?}, failed requests {failures:?}");
    assert!(
        failures.len() <= 1,
        "at most the request the exec cut: {failures:?}"
    );
    assert_eq!(infer_version(&api).0, 200, "the model is still served");

    // One process all along (exec), now the new binary in slot B, the link on it.
    assert!(supervisor.exits().is_empty(), "{:?}", supervisor.exits());
    assert_eq!(layout.link_target(), Some(BinarySlot::B));
    let record = start::load(&dev.path().join("data"))
        .expect("record")
        .current
        .expect("an update");
    assert_eq!(
        (record.phase, record.from, record.to),
        (Phase::Committed, BinarySlot::A, BinarySlot::B)
    );
    assert!(record.reported);
    assert_eq!(version_of(&link), "edgefleet-agent 9.9.1");

    // Only this device's binary was fetched, not the decoy before it; the
    // corrupted chunk failed its hash, was dropped and asked for again.
    let sent = peer.policy.lock().expect("lock").sent.clone();
    assert_eq!(
        sent.iter().filter(|&&c| c == tampered).count(),
        2,
        "the tampered chunk {tampered} asked again: {sent:?}"
    );
    assert!(wanted.start > 0, "the decoy comes first: {wanted:?}");
    assert!(
        !sent.is_empty() && sent.iter().all(|c| wanted.contains(c)),
        "asked for chunks outside {wanted:?}: {sent:?}"
    );
    drop(supervisor);
    drop(broker);
}

/// Sends `update_agent` for the release in `file` and returns its outcome.
async fn update_to(peer: &mut Peer, file: &Path, seen: &mut Vec<Event>) -> (Digest, Event) {
    let served = peer.offer(file);
    peer.command(Action::UpdateAgent {
        release: BundleOffer {
            digest: served.digest,
            header: served.header.clone(),
        },
    })
    .await;
    let outcome = peer
        .event(seen, |k| {
            matches!(
                k,
                EventKind::AgentUpdated { .. } | EventKind::AgentUpdateFailed { .. }
            )
        })
        .await;
    (served.digest, outcome)
}

/// A new binary that exits at start, and one that starts but never confirms
/// (it hangs): each time the old agent is running again within seconds, with
/// its model, and reports the typed reason; a release that failed its trial
/// is refused when offered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_agent_is_reverted_and_reported() {
    use edgefleet_agent::selfupdate::BinarySlot;
    use edgefleet_shared::protocol::{AgentUpdateFailure, TrialFailure};
    // The shortest deadline the config allows.
    let SelfUpdating {
        supervisor,
        mut peer,
        broker,
        api,
        log,
        layout,
        dev,
    } = SelfUpdating::start(10).await;
    let link = layout.link.clone();
    let here = std::env::consts::ARCH;
    let mut seen = Vec::new();

    let exits = agent_release_file(
        dev.path(),
        &[(here, broken_agent("9.9.2", "exit 3"))],
        "9.9.2",
        2,
        &release_key(),
    );
    let started = Instant::now();
    let (digest, outcome) = update_to(&mut peer, &exits, &mut seen).await;
    assert_eq!(
        outcome.kind,
        EventKind::AgentUpdateFailed {
            digest,
            reason: AgentUpdateFailure::Trial {
                failure: TrialFailure::Crashed
            }
        },
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    println!(
        "exits at start: reverted and reported in {:?}",
        started.elapsed()
    );
    assert_eq!(supervisor.exits().len(), 1, "the new binary exited once");
    assert_eq!(infer_version(&api).0, 200, "the old agent serves the model");
    assert_eq!(layout.link_target(), Some(BinarySlot::A));

    let hangs = agent_release_file(
        dev.path(),
        &[(here, broken_agent("9.9.3", "exec sleep 600"))],
        "9.9.3",
        3,
        &release_key(),
    );
    let started = Instant::now();
    let (digest, outcome) = update_to(&mut peer, &hangs, &mut seen).await;
    assert_eq!(
        outcome.kind,
        EventKind::AgentUpdateFailed {
            digest,
            reason: AgentUpdateFailure::Trial {
                failure: TrialFailure::NoConfirmation
            }
        }
    );
    let took = started.elapsed();
    println!("never confirms: reverted and reported in {took:?}");
    assert!(
        took >= Duration::from_secs(9),
        "the alarm ends it at its deadline: {took:?}"
    );
    assert_eq!(supervisor.exits().len(), 2, "ended by the alarm");
    assert_eq!(infer_version(&api).0, 200, "the old agent serves the model");
    assert_eq!(layout.link_target(), Some(BinarySlot::A));
    assert_eq!(
        version_of(&link),
        format!("edgefleet-agent {}", env!("CARGO_PKG_VERSION"))
    );

    // Offered again, the release that crashed is refused before any chunk.
    let before = peer.policy.lock().expect("lock").sent.len();
    let (digest, outcome) = update_to(&mut peer, &exits, &mut seen).await;
    let EventKind::AgentUpdateFailed {
        digest: d,
        reason: AgentUpdateFailure::Internal { detail },
    } = &outcome.kind
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(*d, digest);
    assert!(detail.contains("already failed its trial"), "{detail}");
    assert_eq!(peer.policy.lock().expect("lock").sent.len(), before);
    drop(supervisor);
    drop(broker);
}

/// Where in a hand-over the agent is killed.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// `ms` after its download directory appeared.
    Downloading(u64),
    /// `ms` after the other slot's file was written again (the binary being
    /// copied in, checked and probed).
    Staging(u64),
    /// `ms` after the trial was recorded (the old agent about to exec, or the
    /// new one loading and connecting).
    Trial(u64),
    /// As soon as the new agent's confirmation is seen (or its commit).
    Confirmed,
}

/// Kills the supervised agent (SIGKILL) once `at` is reached in the update to
/// `digest`, or once `done` (its outcome came first): what the record said at
/// that moment, and when.
fn kill_when(
    at: KillAt,
    pid: Arc<std::sync::atomic::AtomicU32>,
    data: PathBuf,
    other_slot: PathBuf,
    digest: Digest,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(String, Instant)> {
    use edgefleet_agent::selfupdate::{Phase, start};
    use std::sync::atomic::Ordering;
    let commanded = std::time::SystemTime::now();
    std::thread::spawn(move || {
        let phase = || {
            start::load(&data)
                .ok()
                .and_then(|s| s.current)
                .filter(|r| r.digest == digest)
                .map(|r| r.phase)
        };
        let downloading = || data.join("downloads").join(digest.to_hex()).exists();
        let staged = || {
            std::fs::metadata(&other_slot)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= commanded)
        };
        let kill = |seen: String| {
            let pid = pid.load(Ordering::SeqCst).to_string();
            let killed = Command::new("kill").args(["-KILL", &pid]).status();
            assert!(killed.is_ok_and(|s| s.success()), "kill -KILL {pid}");
            (seen, Instant::now())
        };
        let mut reached: Option<Instant> = None;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if done.load(Ordering::SeqCst) {
                // The update was quicker: a kill after its outcome, still.
                return kill("after the outcome".into());
            }
            let (hit, after) = match at {
                KillAt::Downloading(ms) => (downloading(), ms),
                KillAt::Staging(ms) => (staged(), ms),
                KillAt::Trial(ms) => (phase().is_some(), ms),
                KillAt::Confirmed => (
                    matches!(phase(), Some(Phase::Confirmed | Phase::Committed)),
                    0,
                ),
            };
            if hit && reached.is_none() {
                reached = Some(Instant::now());
            }
            if reached.is_some_and(|r| r.elapsed() >= Duration::from_millis(after)) {
                return kill(match phase() {
                    Some(p) => format!("{p:?}").to_lowercase(),
                    None if staged() => "staging".into(),
                    None if downloading() => "downloading".into(),
                    None => "before".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("{at:?} not reached, no outcome either")
    })
}

/// SIGKILL at 30 points of real hand-overs (downloading, staging and probing,
/// the trial before and after the exec, the confirmation): each time the
/// supervisor's restart leaves a working agent, old or new, serving its model,
/// whose version is the one its link names and whose record is settled; the
/// outcome is reported once. One device takes 30 releases in a row, so the
/// slots alternate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_any_step_of_a_hand_over_comes_back_working() {
    use edgefleet_agent::selfupdate::{BinarySlot, Phase, start};
    use edgefleet_agent::version::rewrite_version;
    use std::sync::atomic::{AtomicBool, Ordering};
    let SelfUpdating {
        supervisor,
        mut peer,
        broker,
        api,
        log,
        layout,
        dev,
    } = SelfUpdating::start(30).await;
    let link = layout.link.clone();
    let data = dev.path().join("data");
    let own = std::fs::read(stripped(Path::new(env!("CARGO_BIN_EXE_edgefleet-agent"))))
        .expect("read the agent");
    let here = std::env::consts::ARCH;
    let mut running = env!("CARGO_PKG_VERSION").to_string();
    let mut seen_at: BTreeMap<String, u32> = BTreeMap::new();
    let (mut updated, mut reverted, mut resent) = (0, 0, 0);
    let mut seen = Vec::new();
    for run in 0..30u64 {
        let at = match run % 5 {
            0 => KillAt::Downloading(run * 37 % 900),
            1 => KillAt::Staging(run * 7 % 30),
            2 => KillAt::Trial(0),
            3 => KillAt::Trial(run * 3 % 20),
            _ => KillAt::Confirmed,
        };
        let version = format!("9.9.{}", run + 1);
        let next = rewrite_version(&own, &version).expect("one version slot");
        let file = agent_release_file(
            dev.path(),
            &[(here, next)],
            &version,
            run + 1,
            &release_key(),
        );
        let served = peer.offer(&file);
        let other = match layout.link_target() {
            Some(BinarySlot::B) => BinarySlot::A,
            _ => BinarySlot::B,
        };
        let done = Arc::new(AtomicBool::new(false));
        let killer = kill_when(
            at,
            supervisor.pid(),
            data.clone(),
            layout.slot_path(other),
            served.digest,
            done.clone(),
        );
        let update = Action::UpdateAgent {
            release: BundleOffer {
                digest: served.digest,
                header: served.header.clone(),
            },
        };
        // The outcome, and the last time the agent said it was online. A kill
        // between the command's arrival and its download being written down
        // loses the command: the controller sends it again when nothing comes
        // of it (`resend_after_ms`), and so does this test, after 20 s.
        let mut online: Option<(Instant, DeviceState)> = None;
        let mut outcome = None;
        for attempt in 0..2 {
            if attempt > 0 {
                resent += 1;
            }
            peer.command(update.clone()).await;
            let got = tokio::time::timeout(
                WAIT / 3,
                peer.wait_for("outcome", |topic, payload| {
                    if topic.ends_with("/state") {
                        if let Ok(s) = protocol::decode::<DeviceState>(payload)
                            && s.online
                        {
                            online = Some((Instant::now(), s));
                        }
                        return None;
                    }
                    let e = protocol::decode::<Event>(payload).ok()?;
                    seen.push(e.clone());
                    match &e.kind {
                        EventKind::AgentUpdated { digest, .. }
                        | EventKind::AgentUpdateFailed { digest, .. }
                            if *digest == served.digest =>
                        {
                            Some(e)
                        }
                        _ => None,
                    }
                }),
            )
            .await;
            if let Ok(e) = got {
                outcome = Some(e);
                break;
            }
        }
        done.store(true, Ordering::SeqCst);
        let Some(outcome) = outcome else {
            panic!(
                "run {run} ({at:?}): no outcome, even sent again; killed: {:?}; events {seen:?}; log:\n{}",
                killer.join(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let (killed, killed_at) = killer.join().expect("killer");
        *seen_at.entry(killed.clone()).or_default() += 1;

        // Serving again (the agent may still be starting after a late kill).
        let deadline = Instant::now() + WAIT;
        while serves_iris(&api).is_err() {
            assert!(Instant::now() < deadline, "run {run}: no model served");
            std::thread::sleep(Duration::from_millis(50));
        }
        let record = start::load(&data)
            .expect("record")
            .current
            .expect("an update");
        assert_eq!(record.digest, served.digest, "run {run}");
        match &outcome.kind {
            EventKind::AgentUpdated { version: v, .. } => {
                assert_eq!(*v, version, "run {run}");
                assert_eq!(record.phase, Phase::Committed, "run {run}");
                assert_eq!(layout.link_target(), Some(record.to), "run {run}");
                running = version.clone();
                updated += 1;
            }
            EventKind::AgentUpdateFailed { reason, .. } => {
                assert_eq!(record.phase, Phase::Failed, "run {run}: {reason:?}");
                assert_eq!(layout.link_target(), Some(record.from), "run {run}");
                reverted += 1;
            }
            other => panic!("run {run}: {other:?}"),
        }
        assert_eq!(
            version_of(&link),
            format!("edgefleet-agent {running}"),
            "run {run}: the link names the agent the outcome says"
        );
        // The agent back on the broker is that one (after a kill that came
        // after the outcome, once it has reconnected).
        let state = match online {
            Some((at, s)) if at > killed_at => s,
            _ => peer.state(|s| s.online).await,
        };
        assert_eq!(state.agent_version, running, "run {run}");
        println!("run {run}: killed at {killed} ({at:?}) -> {running}");
    }
    println!(
        "kills by what the record said: {seen_at:?}; updated {updated}, reverted {reverted}; commands sent again {resent}"
    );
    for step in ["downloading", "staging", "trial"] {
        assert!(
            seen_at.get(step).is_some_and(|n| *n >= 3),
            "at least 3 kills while {step}: {seen_at:?}"
        );
    }
    assert!(
        updated >= 5 && reverted >= 5,
        "{updated} updated, {reverted} reverted"
    );
    drop(supervisor);
    drop(broker);
}
