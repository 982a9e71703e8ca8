//! End-to-end harness: a real controller (`edgefleet serve`'s code, with its
//! embedded broker behind the mutual-TLS gate and its SQLite file) in this
//! process, operator keys and signed bundles of the repository's models, and
//! simulated fleets of real agents (`edgefleet-devices`). Tests and the fleet
//! benchmark drive it through the controller's HTTP API, as operators do.
//!
//! Every wait polls against a deadline; nothing sleeps a fixed time to let
//! things happen.

pub mod nats;
pub mod replica;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgefleet::ops::operator::{self, BuildOptions, KeyFile};
use edgefleet::ops::remote::{ApiArgs, Client, write_enrollment};
use edgefleet::server::config::ControllerConfig;
use edgefleet_devices::Profile;
use edgefleet_devices::load::{LoadFleet, LoadSettings, LoadSpec};
use edgefleet_devices::sim::{DeviceSpec, FaultPlan, FleetSettings, SimFleet, TlsFiles};
use edgefleet_shared::{ModelChannel, SecretKey, UnixTime};
use serde_json::Value;

/// The repository's models.
pub const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");

/// Longest any one wait may take.
pub const WAIT: Duration = Duration::from_secs(120);

/// A controller and what it takes to drive it.
#[derive(Debug)]
pub struct Harness {
    /// Runs the controller and the fleets.
    pub runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    /// The API, as the admin.
    pub api: Client,
    /// Its base URL.
    pub url: String,
    /// Where devices reach the broker (the gate).
    pub broker: SocketAddr,
    /// The fleet's trust root file.
    pub trust_root: PathBuf,
    /// Signing keys: the trust root holds the first two (threshold 1).
    pub keys: Vec<SecretKey>,
    /// The controller's data directory.
    pub data: PathBuf,
    /// The external broker's process, when the controller uses Mosquitto
    /// (dropped after `runtime`: the controller stops first).
    mosquitto: Option<Mosquitto>,
    /// The external broker's nodes, when the controller uses NATS.
    nats: Option<nats::NatsCluster>,
}

/// Which broker a [`Harness`]'s controller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBroker {
    /// rumqttd inside the controller, behind its gate (the default).
    Embedded,
    /// Debian's Mosquitto in its own process, prepared by `edgefleet broker
    /// mosquitto` (mutual TLS with the controller's CA, the per-device ACL).
    Mosquitto,
    /// A cluster of three `nats-server` nodes, prepared by `edgefleet broker
    /// nats` (MQTT with mutual TLS, a user per enrolled device: call
    /// [`Harness::reload_broker_users`] after enrolling).
    Nats,
}

/// A Mosquitto process on a configuration written by `edgefleet broker
/// mosquitto` (killed on drop).
#[derive(Debug)]
pub struct Mosquitto(std::process::Child);

impl Mosquitto {
    /// Writes Mosquitto's files for the controller whose data directory is
    /// `data` into `dir`, starts it on a free loopback port, and points
    /// `config` at it as its external broker.
    pub fn start(dir: &Path, data: &Path, config: &mut ControllerConfig) -> Mosquitto {
        use edgefleet::ops::remote::{BrokerCommand, broker};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        broker(BrokerCommand::Mosquitto {
            data_dir: data.to_path_buf(),
            out: dir.to_path_buf(),
            listen: ([127, 0, 0, 1], port).into(),
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            topic_prefix: config.mqtt.topic_prefix.clone(),
        })
        .expect("edgefleet broker mosquitto");
        // Started as root, Mosquitto would switch to its own user, which cannot
        // read the temporary directory (`user` is ignored when not root).
        let conf = dir.join("mosquitto.conf");
        let text = std::fs::read_to_string(&conf).expect("mosquitto.conf");
        std::fs::write(&conf, format!("user root\n{text}")).expect("mosquitto.conf");
        let log = std::fs::File::create(dir.join("mosquitto.log")).expect("mosquitto.log");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .or_else(|_| {
                // Debian installs it in /usr/sbin, not always on PATH.
                std::process::Command::new("/usr/sbin/mosquitto")
                    .arg("-c")
                    .arg(&conf)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(dir.join("mosquitto.log"))?)
                    .spawn()
            })
            .expect("mosquitto is installed (.ci/run installs it)");
        let mosquitto = Mosquitto(child);
        wait_for("mosquitto listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        config.mqtt.mode = edgefleet::server::config::BrokerMode::External;
        config.mqtt.url = Some(format!("mqtts://127.0.0.1:{port}"));
        config.mqtt.ca = Some(dir.join("ca.pem"));
        config.mqtt.cert = Some(dir.join("controller.pem"));
        config.mqtt.key = Some(dir.join("controller.key"));
        mosquitto
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds bundle `b` into `dir`, signed by `keys[b.signer]`; returns its file.
pub fn build_bundle(dir: &Path, b: &BundleSpec, keys: &[SecretKey]) -> PathBuf {
    let out = dir.join(format!("{}-{}-{}.efb", b.channel, b.model, b.version));
    let options = BuildOptions {
        chunk_size: b.chunk_size,
        golden_outputs_from: b.golden_outputs_from.map(|m| Path::new(MODELS).join(m)),
        reference: b.reference.clone(),
        ..BuildOptions::new(
            Path::new(MODELS).join(b.model),
            ModelChannel::new(b.channel).expect("channel"),
            b.version.clone(),
            b.release,
            UnixTime::now(),
        )
    };
    operator::build_bundle(&options, &out).expect("bundle builds");
    operator::sign_bundle(&out, std::slice::from_ref(&keys[b.signer])).expect("signs");
    out
}

/// One bundle to build.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    /// A model file in `models/`.
    pub model: &'static str,
    /// The channel (model name on devices); `model` unless set.
    pub channel: &'static str,
    /// Version.
    pub version: semver::Version,
    /// Release number.
    pub release: u64,
    /// Payload chunk size.
    pub chunk_size: u32,
    /// Index into [`Harness::keys`] of the signing key.
    pub signer: usize,
    /// Record golden outputs from this other model (a bundle that fails its
    /// health check on device).
    pub golden_outputs_from: Option<&'static str>,
    /// Reference data for drift statistics (CSV).
    pub reference: Option<PathBuf>,
}

impl BundleSpec {
    /// A bundle of `model` at `version`/`release`, 4 KiB chunks, signed by key 0.
    pub fn new(model: &'static str, version: (u64, u64, u64), release: u64) -> BundleSpec {
        BundleSpec {
            model,
            channel: "model",
            version: semver::Version::new(version.0, version.1, version.2),
            release,
            chunk_size: 4096,
            signer: 0,
            golden_outputs_from: None,
            reference: None,
        }
    }
}

/// The payload size of a bundle file, from its header.
pub fn payload_size(file: &Path) -> u64 {
    let mut f = std::fs::File::open(file).expect("bundle");
    edgefleet_shared::RawHeader::read_from(&mut f)
        .expect("header")
        .decode_unverified()
        .expect("manifest")
        .payload
        .size
}

/// Enrolls `ids` through `api` (`POST /api/v1/enrollments`, 500 a call) and
/// writes each device's files into `dir/<id>`; returns them in order.
pub fn enroll_many(api: &Client, ids: &[String], dir: &Path) -> Vec<TlsFiles> {
    let mut out = Vec::with_capacity(ids.len());
    for batch in ids.chunks(500) {
        let body: Vec<Value> = batch
            .iter()
            .map(|id| serde_json::json!({"id": id}))
            .collect();
        let v = api
            .post("/api/v1/enrollments", &serde_json::json!({"devices": body}))
            .expect("batch enrollment");
        let answers = v["devices"].as_array().expect("devices");
        assert_eq!(answers.len(), batch.len(), "one answer per device");
        for (id, d) in batch.iter().zip(answers) {
            assert_eq!(d["device"].as_str(), Some(id.as_str()));
            let mut one = v.clone();
            for k in ["device", "cert_pem", "key_pem"] {
                one[k] = d[k].clone();
            }
            let files = dir.join(id);
            write_enrollment(&one, &files).expect("enrollment files");
            out.push(TlsFiles {
                ca: files.join("ca.pem"),
                cert: files.join("device.pem"),
                key: files.join("device.key"),
            });
        }
    }
    out
}

/// Runs the load devices enrolled into `dir` (by [`enroll_many`]) in their own
/// process, as an operator would: `edgefleet devices load --dir ...`, with
/// `--broker` naming a cluster's `nodes` if given. The child's stdout (its
/// counters) is passed through with a `devices:` prefix.
pub fn spawn_load_process(
    dir: &Path,
    telemetry_s: u64,
    connect_per_s: Option<u32>,
    nodes: Option<&[std::net::SocketAddr]>,
) -> std::process::Child {
    let mut child = std::process::Command::new(edgefleet_bin())
        .args(["devices", "load", "--dir"])
        .arg(dir)
        .args(["--telemetry-s", &telemetry_s.to_string()])
        .args(
            connect_per_s
                .iter()
                .flat_map(|n| ["--connect-per-s".to_owned(), n.to_string()]),
        )
        .args(nodes.iter().flat_map(|nodes| {
            let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
            ["--broker".to_owned(), nodes.join(",")]
        }))
        // Warnings, or what the caller's EDGEFLEET_LOG asks for.
        .env(
            "EDGEFLEET_LOG",
            std::env::var("EDGEFLEET_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("edgefleet devices load starts");
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            println!("    devices: {line}");
        }
    });
    child
}

/// The `subscribe_qos` the controller handed a device at enrollment (its
/// `agent.toml`, beside `files`).
fn enrolled_level(files: &TlsFiles) -> u8 {
    let path = files.ca.with_file_name("agent.toml");
    let text = std::fs::read_to_string(&path).expect("the enrollment's agent.toml");
    let config: edgefleet_agent::config::AgentConfig = toml::from_str(&text).expect("agent.toml");
    config.broker.subscribe_qos
}

/// [`enrolled_level`] as a QoS.
fn enrolled_qos(files: &TlsFiles) -> rumqttc::QoS {
    edgefleet_agent::link::subscribe_qos(enrolled_level(files)).expect("subscribe_qos")
}

/// Starts load devices `ids` (their enrollment files `files`, in order) in
/// this process against the broker at `broker`, telemetry every
/// `telemetry_interval`, subscribing at the QoS of their enrollment.
pub async fn start_load_fleet(
    brokers: &[SocketAddr],
    ids: &[String],
    files: Vec<TlsFiles>,
    telemetry_interval: Duration,
) -> LoadFleet {
    let subscribe_qos = files
        .first()
        .map_or(rumqttc::QoS::AtLeastOnce, enrolled_qos);
    let specs: Vec<LoadSpec> = ids
        .iter()
        .zip(files)
        .map(|(id, tls)| LoadSpec {
            id: id.clone(),
            tls,
        })
        .collect();
    let settings = LoadSettings {
        brokers: brokers.to_vec(),
        topic_prefix: ControllerConfig::default().mqtt.topic_prefix,
        controller_key: specs
            .first()
            .map(|s| s.tls.ca.with_file_name("controller.pub"))
            .unwrap_or_default(),
        telemetry_interval,
        requests_per_s: 5,
        subscribe_qos,
        connect_per_s: None,
    };
    LoadFleet::start(&settings, specs)
        .await
        .expect("load fleet starts")
}

/// A signing key `alice` (in `dir/keys`) and a trust root of it alone
/// (threshold 1, 30 days) saved at `trust_root`.
pub fn alice_and_trust_root(dir: &Path, trust_root: &Path) -> SecretKey {
    let (_, _, key) = operator::generate_key(&dir.join("keys"), "alice").expect("key");
    let root = operator::new_trust_root(
        &[KeyFile::Public(key.public())],
        1,
        1,
        UnixTime::now().plus_days(30),
        std::slice::from_ref(&key),
    )
    .expect("trust root");
    operator::save_trust_root(trust_root, &root).expect("save");
    key
}

/// The iris model as bundle 1.0.0 (release 1) with its golden cases, signed
/// with `key`, at `out`.
pub fn signed_iris_bundle(key: &SecretKey, out: &Path) {
    let options = BuildOptions {
        golden: Some(Path::new(MODELS).join("iris_golden.json")),
        expires_in_days: 30,
        ..BuildOptions::new(
            Path::new(MODELS).join("iris_logreg.onnx"),
            ModelChannel::new("iris").expect("channel"),
            semver::Version::new(1, 0, 0),
            1,
            UnixTime::now(),
        )
    };
    operator::build_bundle(&options, out).expect("build");
    operator::sign_bundle(out, std::slice::from_ref(key)).expect("sign");
}

/// Starts a rollout of `digest` to every device through `api` in `waves`,
/// soaking each wave `soak_ms`; returns its id.
pub fn start_rollout_to_all(api: &Client, digest: &str, waves: &[&str], soak_ms: u64) -> String {
    api.post(
        "/api/v1/rollouts",
        &serde_json::json!({
            "bundle": digest,
            "selector": {"all": true},
            "waves": waves,
            "gates": {"soak_ms": soak_ms},
        }),
    )
    .expect("rollout starts")["rollout"]["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

/// The tests' tokio runtime: two worker threads, as the machine has two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Every telemetry report the stopped load devices sent (each counted once,
/// however often it was sent again) is in the store at `url` exactly once:
/// polls for up to 10 s for the controller's last batch.
pub fn assert_every_report_stored_once(url: &str, stats: &edgefleet_devices::load::LoadStats) {
    use std::sync::atomic::Ordering;
    let sent = i64::try_from(stats.telemetry_sent.load(Ordering::Relaxed)).expect("count");
    let resent = stats.telemetry_resent.load(Ordering::Relaxed);
    let stored = || {
        replica::query(
            url,
            "SELECT 'all', COUNT(*) FROM telemetry WHERE device <> $1",
            "",
        )[0]
        .1
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored() < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let stored = stored();
    println!(
        "telemetry: {stored} stored of {sent} sent ({resent} sent again without an acknowledgement)"
    );
    assert_eq!(
        stored,
        sent,
        "reports stored vs sent ({resent} sent again; {} dropped by devices)",
        stats.dropped.load(Ordering::Relaxed)
    );
}

/// The `edgefleet` binary of this build's profile (target/debug or
/// target/release, beside the test or bench executable), built when missing.
pub fn edgefleet_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("edgefleet");
    if !bin.exists() {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(["build", "-p", "edgefleet", "--bin", "edgefleet"]);
        if dir.ends_with("release") {
            cargo.arg("--release");
        }
        assert!(
            cargo.status().expect("cargo runs").success(),
            "building edgefleet failed"
        );
    }
    bin
}

/// Polls `check` until it returns Some, or panics naming `what` after [`WAIT`].
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Harness {
    /// Keys, a trust root and a controller on free ports in a temporary
    /// directory; `tweak` adjusts the controller's config.
    pub fn start(tweak: impl FnOnce(&mut ControllerConfig)) -> Harness {
        Harness::start_with(TestBroker::Embedded, tweak)
    }

    /// [`Harness::start`] with the controller on `broker`.
    pub fn start_with(broker: TestBroker, tweak: impl FnOnce(&mut ControllerConfig)) -> Harness {
        let runtime = runtime();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut keys = Vec::new();
        for name in ["alice", "bob", "mallory"] {
            let (_, _, key) = operator::generate_key(&dir.path().join("keys"), name).expect("key");
            keys.push(key);
        }
        let trust_root = dir.path().join("trust-root.cbor");
        let root = operator::new_trust_root(
            &[
                KeyFile::Public(keys[0].public()),
                KeyFile::Public(keys[1].public()),
            ],
            1,
            1,
            UnixTime::now().plus_days(365),
            &keys[..1],
        )
        .expect("trust root");
        operator::save_trust_root(&trust_root, &root).expect("save trust root");
        let data = dir.path().join("controller");
        let mut config = ControllerConfig {
            data_dir: data.clone(),
            trust_root: Some(trust_root.clone()),
            ..ControllerConfig::default()
        };
        config.http.listen = ([127, 0, 0, 1], 0).into();
        config.mqtt.listen = ([127, 0, 0, 1], 0).into();
        config.rollouts.tick_ms = 100;
        tweak(&mut config);
        let mosquitto = (broker == TestBroker::Mosquitto)
            .then(|| Mosquitto::start(&dir.path().join("mosquitto"), &data, &mut config));
        let nats = (broker == TestBroker::Nats).then(|| {
            let database = match &config.database {
                Some(edgefleet::server::config::DatabaseSetting::Location(url)) => {
                    Some(url.clone())
                }
                _ => None,
            };
            nats::NatsCluster::start(
                &dir.path().join("nats"),
                &data,
                database.as_deref(),
                3,
                &mut config,
            )
        });
        let (started, server) = runtime
            .block_on(edgefleet::server::serve::start(
                config,
                std::future::pending(),
            ))
            .expect("controller starts");
        runtime.spawn(server);
        let url = format!("http://{}", started.http);
        let token = std::fs::read_to_string(data.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_owned();
        let port = started.broker_port().expect("broker port");
        Harness {
            runtime,
            api: Client::new(&ApiArgs {
                controller: url.clone(),
                token: Some(token),
                json: false,
            }),
            url,
            broker: ([127, 0, 0, 1], port).into(),
            trust_root,
            keys,
            data,
            dir,
            mosquitto,
            nats,
        }
    }

    /// The external broker's processes, named, when there are any.
    pub fn broker_pids(&self) -> Vec<(String, u32)> {
        let mosquitto = self
            .mosquitto
            .iter()
            .map(|m| ("Mosquitto".into(), m.0.id()));
        let nats = self.nats.iter().flat_map(|c| {
            c.pids()
                .into_iter()
                .enumerate()
                .map(|(i, pid)| (format!("NATS n{}", i + 1), pid))
        });
        mosquitto.chain(nats).collect()
    }

    /// Makes the devices enrolled since the broker started its users (NATS;
    /// Mosquitto and the embedded broker read the certificate's name).
    pub fn reload_broker_users(&self) {
        if let Some(c) = &self.nats {
            c.reload_users();
        }
    }

    /// The harness's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Enrolls `id` through the API and returns its identity files.
    pub fn enroll(&self, id: &str) -> TlsFiles {
        let out = self.dir().join("identities").join(id);
        let v = self
            .api
            .post(
                &format!("/api/v1/devices/{id}/enroll"),
                &serde_json::json!({"tags": {}}),
            )
            .expect("enroll");
        write_enrollment(&v, &out).expect("enrollment files");
        TlsFiles {
            ca: out.join("ca.pem"),
            cert: out.join("device.pem"),
            key: out.join("device.key"),
        }
    }

    /// An enrolled device of the x86-64 gateway profile with these faults.
    pub fn device(&self, id: &str, faults: FaultPlan) -> DeviceSpec {
        DeviceSpec {
            id: id.to_owned(),
            profile: Profile::builtin("x86-64-gateway").expect("profile"),
            tls: Some(self.enroll(id)),
            faults,
            trust_root: None,
        }
    }

    /// Starts a fleet and waits until the controller sees every device online.
    pub fn fleet(&self, specs: Vec<DeviceSpec>) -> SimFleet {
        let _enter = self.runtime.enter();
        let ids: Vec<String> = specs.iter().map(|s| s.id.clone()).collect();
        let settings = FleetSettings {
            broker: self.broker,
            tls: true,
            topic_prefix: ControllerConfig::default().mqtt.topic_prefix,
            trust_root: self.trust_root.clone(),
            // Every enrollment carries the same controller key, beside ca.pem.
            controller_key: specs
                .first()
                .and_then(|s| s.tls.as_ref())
                .map(|t| t.ca.with_file_name("controller.pub"))
                .unwrap_or_default(),
            dir: self.dir().join("devices"),
            telemetry_interval: Duration::from_secs(1),
            subscribe_qos: specs
                .first()
                .and_then(|s| s.tls.as_ref())
                .map_or(1, enrolled_level),
        };
        let fleet = self
            .runtime
            .block_on(SimFleet::start(&settings, specs))
            .expect("fleet starts");
        for id in &ids {
            wait_for(&format!("{id} online"), || {
                let v = self.api.get(&format!("/api/v1/devices/{id}")).ok()?;
                (v["device"]["online"] == Value::Bool(true)).then_some(())
            });
        }
        fleet
    }

    /// Builds and signs a bundle of a model in `models/`; returns its file.
    pub fn build(&self, b: &BundleSpec) -> PathBuf {
        build_bundle(self.dir(), b, &self.keys)
    }

    /// Enrolls `ids` through the batch API (`POST /api/v1/enrollments`, 500
    /// a call) into `<dir>/<id>/`, as `edgefleet devices enroll --count` does.
    pub fn enroll_many(&self, ids: &[String], dir: &Path) -> Vec<TlsFiles> {
        enroll_many(&self.api, ids, dir)
    }

    /// The ids of `n` load devices: `load-00000`...
    pub fn load_ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("load-{i:05}")).collect()
    }

    /// Enrolls `n` load devices (`devices/src/load.rs`) and starts them in
    /// this process, telemetry every `telemetry_interval`.
    pub fn load_fleet(&self, n: usize, telemetry_interval: Duration) -> (LoadFleet, Vec<String>) {
        let _enter = self.runtime.enter();
        let ids = Harness::load_ids(n);
        let files = self.enroll_many(&ids, &self.dir().join("load"));
        let fleet = self.runtime.block_on(start_load_fleet(
            &[self.broker],
            &ids,
            files,
            telemetry_interval,
        ));
        (fleet, ids)
    }

    /// Enrolls `n` load devices and runs them in their own process, as an
    /// operator would: `edgefleet devices load --dir ...`. The child's stdout
    /// (its counters) is passed through with a `devices:` prefix.
    pub fn load_process(&self, n: usize, telemetry_s: u64) -> (std::process::Child, Vec<String>) {
        let ids = Harness::load_ids(n);
        self.enroll_many(&ids, &self.dir().join("load"));
        self.load_process_enrolled(&ids, telemetry_s, None)
    }

    /// [`Harness::load_process`] for devices already enrolled with
    /// [`Harness::enroll_many`] into `<dir>/load`.
    pub fn load_process_enrolled(
        &self,
        ids: &[String],
        telemetry_s: u64,
        connect_per_s: Option<u32>,
    ) -> (std::process::Child, Vec<String>) {
        // A cluster's nodes: device i starts on node i % n.
        let nodes = self.nats.as_ref().map(|c| c.addrs());
        let child = spawn_load_process(
            &self.dir().join("load"),
            telemetry_s,
            connect_per_s,
            nodes.as_deref(),
        );
        (child, ids.to_vec())
    }

    /// Devices the controller shows online.
    pub fn online(&self) -> usize {
        // One device in the answer, the count in `total` (a whole list of
        // thousands polled every 250 ms would load the controller measured).
        self.api
            .get("/api/v1/devices?state=online&limit=1")
            .ok()
            .and_then(|v| v["total"].as_u64())
            .map_or(0, |n| n as usize)
    }

    /// Uploads a bundle file; returns its digest.
    pub fn upload(&self, file: &Path) -> String {
        let v = self.api.upload("/api/v1/bundles", file).expect("upload");
        v["bundle"]["digest"].as_str().expect("digest").to_owned()
    }

    /// Builds, uploads and rolls `b` out to `devices` in one wave with no soak;
    /// returns its digest once every device runs it.
    pub fn roll_out_everywhere(&self, b: &BundleSpec, devices: &[String]) -> String {
        self.roll_out(b, serde_json::json!({"devices": devices}), &["100%"])
    }

    /// Builds, uploads and rolls `b` out to the whole fleet in `waves` with no
    /// soak; returns its digest once the rollout completed (panics, with the
    /// rollout, if it halts or aborts).
    pub fn roll_out_to_all(&self, b: &BundleSpec, waves: &[&str]) -> String {
        self.roll_out(b, serde_json::json!({"all": true}), waves)
    }

    fn roll_out(&self, b: &BundleSpec, selector: Value, waves: &[&str]) -> String {
        let digest = self.upload(&self.build(b));
        let id = self.rollout(&serde_json::json!({
            "bundle": digest,
            "selector": selector,
            "waves": waves,
            "gates": {"soak_ms": 0},
        }));
        let done = self.wait_phase(&id, &["completed", "halted", "aborted"]);
        assert_eq!(done["phase"], "completed", "{done}");
        digest
    }

    /// Where the controller keeps an uploaded bundle.
    pub fn stored_bundle(&self, digest: &str) -> PathBuf {
        let dir = self.data.join("bundles");
        std::fs::read_dir(&dir)
            .expect("bundles dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains(digest))
            .expect("stored bundle")
    }

    /// Starts a rollout; returns its id.
    pub fn rollout(&self, body: &Value) -> String {
        let v = self.api.post("/api/v1/rollouts", body).expect("rollout");
        v["rollout"]["id"].as_str().expect("id").to_owned()
    }

    /// The rollout as the API shows it.
    pub fn rollout_view(&self, id: &str) -> Value {
        self.api
            .get(&format!("/api/v1/rollouts/{id}"))
            .expect("rollout")["rollout"]
            .clone()
    }

    /// Waits until the rollout's phase is one of `phases`; returns the view.
    pub fn wait_phase(&self, id: &str, phases: &[&str]) -> Value {
        wait_for(&format!("rollout {id} to reach {phases:?}"), || {
            let r = self.rollout_view(id);
            phases
                .contains(&r["phase"].as_str().unwrap_or(""))
                .then_some(r)
        })
    }

    /// A counter from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.api.get_text("/metrics").expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }
}
