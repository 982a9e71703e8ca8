//! `edgefleet demo`: the whole story on one machine with no setup. A controller
//! (embedded broker with mutual TLS, SQLite) and a simulated fleet of real agent
//! instances run in this process, in a temporary directory; the operator's steps
//! go through the controller's HTTP API as `edgefleet` CLI calls would.
//!
//! 1. keys and a 2-of-3 trust root; 2. a good and a bad bundle of the iris model
//!    and one of a digits CNN, shipped in `models/`; 3. the controller; 4.
//!    enrolled devices; 5. a staged rollout of the good bundle, and of the CNN on
//!    a second channel; 6. the bad one, caught at the canary, the CNN untouched;
//!    7. local inference with the network cut; 8. telemetry per version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgefleet_devices::Profile;
use edgefleet_devices::sim::{DeviceSpec, FaultPlan, FleetSettings, SimFleet, TlsFiles, Traffic};
use edgefleet_shared::{ModelChannel, UnixTime};
use serde_json::{Value, json};

use crate::ops::client::{ApiArgs, Client, ClientError};
use crate::ops::operator::{self, BuildOptions, KeyFile, OperatorError};
use crate::ops::remote::{CommandError, rollout_text, write_enrollment};
use crate::server::config::ControllerConfig;

const IRIS_MODEL: &[u8] = include_bytes!("../../../models/iris_logreg.onnx");
const IRIS_BROKEN: &[u8] = include_bytes!("../../../models/iris_logreg_v2_broken.onnx");
const IRIS_REFERENCE: &str = include_str!("../../../models/iris_reference.csv");
const IRIS_GOLDEN: &[u8] = include_bytes!("../../../models/iris_golden.json");
/// The second model every device serves, on its own channel: the digits CNN.
const VISION_MODEL: &[u8] = include_bytes!("../../../models/digits_cnn.onnx");

/// How long any one wait of the demo may take before it gives up.
const WAIT: Duration = Duration::from_secs(120);
const STEPS: u32 = 9;

/// What `edgefleet demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep the files here (default: a temporary directory, removed at the end).
    pub dir: Option<PathBuf>,
    /// Simulated devices.
    pub devices: usize,
    /// Keep the controller and the fleet running at the end, until Ctrl-C.
    pub keep_running: bool,
}

fn step(n: u32, text: &str) {
    println!("\n[{n}/{STEPS}] {text}");
}

/// Why the demo could not go on (a step that did the unexpected but could go
/// on is reported in its output, and the exit code is 1).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `--devices` out of range.
    #[error("--devices {0}: must be 1 to 500 (one process runs them all)")]
    Devices(usize),
    /// A file or directory of the demo.
    #[error("{what}: {source}")]
    Io {
        /// Which.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An operator step (keys, trust root, bundle) failed.
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// The controller did not start.
    #[error(transparent)]
    Serve(#[from] crate::server::serve::ServeError),
    /// An API call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Writing a device's enrollment failed.
    #[error(transparent)]
    Enrollment(#[from] CommandError),
    /// The simulated fleet did not start.
    #[error(transparent)]
    Fleet(#[from] edgefleet_devices::sim::SimError),
    /// Something the demo waits for did not happen in time.
    #[error("timed out after {WAIT:?} waiting for {0}")]
    Timeout(String),
    /// The controller's answer lacks what the demo reads.
    #[error("the controller's answer: {0}")]
    Answer(&'static str),
    /// A device's local API failed.
    #[error("local API: {0}")]
    LocalApi(String),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.to_string();
    move |source| DemoError::Io { what, source }
}

/// Runs the demo. Returns the exit code (0: every step did what it should).
pub fn run(opts: &DemoOptions) -> Result<i32, DemoError> {
    if !(1..=500).contains(&opts.devices) {
        return Err(DemoError::Devices(opts.devices));
    }
    let temp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io(d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir().map_err(io("temporary directory"))?;
            temp.path().to_owned()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("the async runtime"))?;
    let started = Instant::now();
    let result = story(&runtime, &dir, opts);
    let code = match result {
        Ok(Story { ok, fleet }) => {
            let code = if ok { 0 } else { 1 };
            runtime.block_on(fleet.stop());
            println!(
                "\ndemo {} in {:.1} s",
                if ok {
                    "finished"
                } else {
                    "FINISHED WITH FAILURES"
                },
                started.elapsed().as_secs_f64()
            );
            code
        }
        Err(e) => {
            println!("\ndemo FAILED: {e}");
            1
        }
    };
    // Everything ran in this process: shutting the runtime down stops the
    // controller, the broker's gate and every simulated device.
    runtime.shutdown_timeout(Duration::from_secs(5));
    if opts.dir.is_none() {
        println!(
            "(the demo's files were in a temporary directory, now removed; `--dir DIR` keeps them)"
        );
    }
    Ok(code)
}

struct Story {
    ok: bool,
    fleet: SimFleet,
}

/// A bundle built for the demo.
struct Built {
    path: PathBuf,
    channel: &'static str,
    version: String,
}

/// The demo's signed bundles: iris 1.0.0, iris 2.0.0 (regressed) and the
/// vision model, a second channel.
struct Bundles {
    good: Built,
    bad: Built,
    vision: Built,
}

fn keys_and_bundles(dir: &Path, now: UnixTime) -> Result<(PathBuf, Bundles), DemoError> {
    let (root_path, secrets) = keys_and_trust_root(dir, now)?;

    step(
        2,
        "build and sign two bundles of the iris classifier and one of a digits CNN (models/, no download)",
    );
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, OperatorError> {
        let p = dir.join(name);
        operator::write_atomic(&p, 0o644, |w| w.write_all(bytes))?;
        Ok(p)
    };
    let good_model = write("iris_logreg.onnx", IRIS_MODEL)?;
    let bad_model = write("iris_logreg_v2_broken.onnx", IRIS_BROKEN)?;
    let reference = write("iris_reference.csv", IRIS_REFERENCE.as_bytes())?;
    let golden = write("iris_golden.json", IRIS_GOLDEN)?;
    let channel =
        ModelChannel::new("iris").unwrap_or_else(|e| unreachable!("a fixed channel name: {e}"));
    let options = |model: &Path, version: semver::Version, release: u64| BuildOptions {
        reference: Some(reference.clone()),
        golden: Some(golden.clone()),
        ..BuildOptions::new(model.to_owned(), channel.clone(), version, release, now)
    };
    let good = Built {
        path: dir.join("iris-1.0.0.efb"),
        channel: "iris",
        version: "1.0.0".into(),
    };
    let report = operator::build_bundle(
        &options(&good_model, semver::Version::new(1, 0, 0), 1),
        &good.path,
    )?;
    operator::sign_bundle(&good.path, &secrets[..2])?;
    println!(
        "  iris 1.0.0  release 1  {} bytes in {} chunks, {} golden cases, signed by alice and bob",
        report.manifest.payload.size,
        report.manifest.payload.chunks.len(),
        report.golden_cases
    );
    // The broken model with golden outputs recorded from the good one: what a
    // regression that slipped past the build looks like. Devices catch it.
    let bad = Built {
        path: dir.join("iris-2.0.0.efb"),
        channel: "iris",
        version: "2.0.0".into(),
    };
    let mut bad_options = options(&bad_model, semver::Version::new(2, 0, 0), 2);
    bad_options.golden_outputs_from = Some(good_model.clone());
    operator::build_bundle(&bad_options, &bad.path)?;
    operator::sign_bundle(&bad.path, &secrets[..2])?;
    println!(
        "  iris 2.0.0  release 2  a regressed model: its answers differ from its golden cases"
    );
    let vision = vision_bundle(dir, now, &secrets[..2])?;
    Ok((root_path, Bundles { good, bad, vision }))
}

/// Step 1: three operator keys and a trust root that needs any two of them.
fn keys_and_trust_root(
    dir: &Path,
    now: UnixTime,
) -> Result<(PathBuf, Vec<edgefleet_shared::SecretKey>), DemoError> {
    step(
        1,
        "operator: three signing keys, and a trust root that needs any 2 of them",
    );
    let keys_dir = dir.join("keys");
    let mut secrets = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let (secret, _, key) = operator::generate_key(&keys_dir, name)?;
        println!(
            "  {name:<6} key {}  {}",
            key.public().id().short(),
            secret.display()
        );
        secrets.push(key);
    }
    let publics: Vec<KeyFile> = secrets
        .iter()
        .map(|k| KeyFile::Public(k.public()))
        .collect();
    let root = operator::new_trust_root(&publics, 2, 1, now.plus_days(365), &secrets[..2])?;
    let root_path = dir.join("trust-root.cbor");
    operator::save_trust_root(&root_path, &root)?;
    println!(
        "  {} (devices pin it; the controller checks uploads against it)",
        root_path.display()
    );
    Ok((root_path, secrets))
}

/// The second model for the same devices, on its own channel: the digits CNN.
fn vision_bundle(
    dir: &Path,
    now: UnixTime,
    signers: &[edgefleet_shared::SecretKey],
) -> Result<Built, DemoError> {
    let model = dir.join("digits_cnn.onnx");
    operator::write_atomic(&model, 0o644, |w| w.write_all(VISION_MODEL))?;
    let vision = Built {
        path: dir.join("vision-1.0.0.efb"),
        channel: "vision",
        version: "1.0.0".into(),
    };
    let channel =
        ModelChannel::new("vision").unwrap_or_else(|e| unreachable!("a fixed channel name: {e}"));
    let options = BuildOptions::new(model, channel, semver::Version::new(1, 0, 0), 1, now);
    let report = operator::build_bundle(&options, &vision.path)?;
    operator::sign_bundle(&vision.path, signers)?;
    println!(
        "  vision 1.0.0  release 1  a digits CNN, {} bytes: a second model for the same devices",
        report.manifest.payload.size
    );
    Ok(vision)
}

/// Polls `check` until it returns Some, or fails after [`WAIT`].
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T, DemoError> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(DemoError::Timeout(what.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The running controller, as the demo's steps use it.
struct Controller {
    api: Client,
    url: String,
    data: PathBuf,
    broker_port: u16,
}

fn story(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    opts: &DemoOptions,
) -> Result<Story, DemoError> {
    // The fleet spawns its tasks from this thread.
    let _runtime = runtime.enter();
    let now = UnixTime::now();
    println!(
        "edgefleet demo: a controller, {} simulated devices, a staged rollout, a bad bundle caught",
        opts.devices
    );
    println!("working in {}", dir.display());
    let (root_path, bundles) = keys_and_bundles(dir, now)?;
    let controller = start_controller(runtime, dir, &root_path)?;
    let mut fleet = start_fleet(runtime, dir, opts, &controller, &root_path)?;
    let api = &controller.api;
    let (rolled_out, digests) = rollouts(api, &fleet, opts, &bundles)?;
    let offline_ok = offline(api, &fleet)?;
    let drift_ok = drift(api, &fleet, opts, &digests.good)?;
    versions_summary(api, &digests)?;
    finish(runtime, &controller, &mut fleet, opts);
    Ok(Story {
        ok: rolled_out && offline_ok && drift_ok,
        fleet,
    })
}

/// Step 3: the controller, in this process.
fn start_controller(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    root_path: &Path,
) -> Result<Controller, DemoError> {
    step(
        3,
        "start the controller: HTTP API, embedded MQTT broker (mutual TLS), SQLite",
    );
    let data = dir.join("controller");
    let mut config = ControllerConfig {
        data_dir: data.clone(),
        trust_root: Some(root_path.to_owned()),
        ..ControllerConfig::default()
    };
    config.http.listen = ([127, 0, 0, 1], 0).into();
    config.mqtt.listen = ([127, 0, 0, 1], 0).into();
    config.rollouts.tick_ms = 200;
    let (started, server) =
        runtime.block_on(crate::server::serve::start(config, std::future::pending()))?;
    runtime.spawn(server);
    let url = format!("http://{}", started.http);
    let token = std::fs::read_to_string(data.join("admin-token"))
        .map_err(io("admin token"))?
        .trim()
        .to_owned();
    let api = Client::new(&ApiArgs {
        controller: url.clone(),
        token: Some(token),
        json: false,
    });
    println!("  API     {url}/api/v1  (OpenAPI at /api/v1/openapi.json, metrics at /metrics)");
    println!("  broker  {}", started.broker_url);
    println!("  data    {}", data.display());
    let broker_port = started
        .broker_port()
        .ok_or(DemoError::Answer("the broker URL has no port"))?;

    Ok(Controller {
        api,
        url,
        data,
        broker_port,
    })
}

/// Step 4: enrolled devices, started, with their application's traffic.
fn start_fleet(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    opts: &DemoOptions,
    controller: &Controller,
    root_path: &Path,
) -> Result<SimFleet, DemoError> {
    let api = &controller.api;
    step(
        4,
        &format!(
            "enroll {} devices (a certificate each) and start them: real agents, one process",
            opts.devices
        ),
    );
    let (specs, kinds) = enroll(api, dir, opts.devices)?;
    let settings = FleetSettings {
        broker: ([127, 0, 0, 1], controller.broker_port).into(),
        tls: true,
        topic_prefix: crate::server::config::ControllerConfig::default()
            .mqtt
            .topic_prefix,
        trust_root: root_path.to_owned(),
        // Every enrollment carries the same controller key.
        controller_key: dir
            .join("devices")
            .join("dev-001")
            .join("identity")
            .join("controller.pub"),
        dir: dir.join("devices"),
        telemetry_interval: Duration::from_secs(1),
        subscribe_qos: 1,
    };
    let mut fleet = runtime.block_on(SimFleet::start(&settings, specs))?;
    for (kind, n) in &kinds {
        println!("  {n:>3} x {kind}");
    }
    let online = wait_for("every device to connect", || {
        let v = api.get("/api/v1/devices").ok()?;
        let n = v["devices"]
            .as_array()?
            .iter()
            .filter(|d| d["online"] == json!(true))
            .count();
        (n == opts.devices).then_some(n)
    })?;
    println!("  {online} devices online, none has a model yet");
    fleet.set_traffic(Some(application_traffic()));
    println!("  each device gets 5 local inference requests a second from its \"application\"");

    Ok(fleet)
}

/// Enrolls `n` devices (a certificate each, tagged by site and board) and
/// writes their files; returns their specs and the count per board.
fn enroll(
    api: &Client,
    dir: &Path,
    n: usize,
) -> Result<(Vec<DeviceSpec>, BTreeMap<String, usize>), DemoError> {
    let profiles = Profile::all();
    let mut specs = Vec::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        let id = format!("dev-{:03}", i + 1);
        let profile = profiles[i % profiles.len()].clone();
        let identity = dir.join("devices").join(&id).join("identity");
        let v = api.post(
            &format!("/api/v1/devices/{id}/enroll"),
            &json!({"tags": {"site": if i % 2 == 0 { "north" } else { "south" }, "board": profile.name}}),
        )?;
        write_enrollment(&v, &identity)?;
        *kinds.entry(profile.name.clone()).or_insert(0) += 1;
        specs.push(DeviceSpec {
            id,
            profile,
            tls: Some(TlsFiles {
                ca: identity.join("ca.pem"),
                cert: identity.join("device.pem"),
                key: identity.join("device.key"),
            }),
            faults: FaultPlan::default(),
            trust_root: None,
        });
    }
    Ok((specs, kinds))
}

/// The application's requests: the reference rows (sorted by class in the
/// file), taken 7 apart so that any run of them mixes the classes as the
/// reference does: the demo's normal traffic shows no drift.
fn application_traffic() -> Traffic {
    let reference_rows = reference_rows();
    let n = reference_rows.len();
    let bodies: Vec<String> = (0..n)
        .map(|i| {
            let row = &reference_rows[(i * 7) % n];
            json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": row}]})
                .to_string()
        })
        .collect();
    Traffic {
        model: "iris".into(),
        bodies,
        every: Duration::from_millis(200),
    }
}

/// Steps 5 and 6: the good bundle rolled out, the bad one stopped at its
/// canary. Returns whether both went as they should, and the two digests.
fn rollouts(
    api: &Client,
    fleet: &SimFleet,
    opts: &DemoOptions,
    bundles: &Bundles,
) -> Result<(bool, Digests), DemoError> {
    let Bundles { good, bad, vision } = bundles;
    step(
        5,
        "upload iris 1.0.0 and roll it out in waves: 1 device, 10%, 50%, 100%",
    );
    let mut ok = true;
    let good_digest = upload(api, good)?;
    let rollout = start_rollout(api, &good_digest)?;
    let phase = watch(api, fleet, &rollout)?;
    let versions = fleet.versions_on("iris");
    println!("  fleet now: {}", versions_text(&versions));
    if phase != "completed" || versions.get("1.0.0") != Some(&opts.devices) {
        println!("  UNEXPECTED: the good rollout did not complete on every device");
        ok = false;
    }
    // A second model beside it: its own channel, slots and route.
    let vision_digest = upload(api, vision)?;
    let phase = roll_out_quietly(api, &vision_digest)?;
    let on_vision = fleet.versions_on("vision");
    println!(
        "  a second model, vision 1.0.0, rolled out in 2 waves (1 device, then the rest): every device now serves two (iris: {}; vision: {})",
        versions_text(&fleet.versions_on("iris")),
        versions_text(&on_vision)
    );
    if phase != "completed" || on_vision.get("1.0.0") != Some(&opts.devices) {
        println!("  UNEXPECTED: the vision rollout did not complete on every device");
        ok = false;
    }
    if let Some(d) = fleet.devices().first() {
        let index = repository_index(&d.api_url()).unwrap_or_else(|e| format!("({e})"));
        println!("  POST {}/v2/repository/index -> {index}", d.api_url());
    }

    step(
        6,
        "upload iris 2.0.0 (regressed) and roll it out the same way: the canary must stop it",
    );
    let bad_digest = upload(api, bad)?;
    let rollout = start_rollout(api, &bad_digest)?;
    let phase = watch(api, fleet, &rollout)?;
    let versions = fleet.versions_on("iris");
    println!("  fleet now: {}", versions_text(&versions));
    if phase != "halted" || versions.get("1.0.0") != Some(&opts.devices) {
        println!("  UNEXPECTED: the bad bundle was not stopped at the canary");
        ok = false;
    } else {
        println!("  the canary refused to switch; no other device was asked; nobody runs 2.0.0");
    }
    let on_vision = fleet.versions_on("vision");
    if on_vision.get("1.0.0") == Some(&opts.devices) {
        println!(
            "  vision untouched by the iris rollout: {}",
            versions_text(&on_vision)
        );
    } else {
        println!(
            "  UNEXPECTED: the iris rollout changed the vision channel: {}",
            versions_text(&on_vision)
        );
        ok = false;
    }

    let digests = Digests {
        good: good_digest,
        bad: bad_digest,
        vision: vision_digest,
    };
    Ok((ok, digests))
}

/// The digests of the demo's uploaded bundles.
struct Digests {
    good: String,
    bad: String,
    vision: String,
}

/// Rolls `digest` out to every device in two waves (a canary, then the rest)
/// and waits for the end; returns the final phase.
fn roll_out_quietly(api: &Client, digest: &str) -> Result<String, DemoError> {
    let v = api.post(
        "/api/v1/rollouts",
        &json!({
            "bundle": digest,
            "selector": {"all": true},
            "waves": ["1", "100%"],
            "gates": {"soak_ms": 3000, "install_timeout_ms": 60000},
            "policy": "halt_and_revert",
        }),
    )?;
    let id = v["rollout"]["id"]
        .as_str()
        .ok_or(DemoError::Answer("the rollout answer has no id"))?
        .to_owned();
    wait_for("the rollout to finish", || {
        let v = api.get(&format!("/api/v1/rollouts/{id}")).ok()?;
        let phase = v["rollout"]["phase"].as_str()?.to_owned();
        matches!(phase.as_str(), "completed" | "halted" | "aborted").then_some(phase)
    })
}

/// A device's model repository index, as `name version, ...`.
fn repository_index(base: &str) -> Result<String, DemoError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let v: Value = agent
        .post(format!("{base}/v2/repository/index"))
        .send_empty()
        .map_err(|e| DemoError::LocalApi(e.to_string()))?
        .body_mut()
        .read_json()
        .map_err(|e| DemoError::LocalApi(e.to_string()))?;
    let entries: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "{} {} {}",
                m["name"].as_str().unwrap_or("?"),
                m["version"].as_str().unwrap_or("?"),
                m["state"].as_str().unwrap_or("?")
            )
        })
        .collect();
    Ok(entries.join(", "))
}

/// Step 7: one device offline keeps serving, and its spooled reports arrive
/// when it is back. Returns whether local inference answered.
fn offline(api: &Client, fleet: &SimFleet) -> Result<bool, DemoError> {
    let mut ok = true;
    step(
        7,
        "cut one device's network: its application keeps getting answers locally",
    );
    let device = &fleet.devices()[0];
    let seqs = |api: &Client| -> Vec<u64> {
        api.get(&format!("/api/v1/devices/{}", device.id()))
            .ok()
            .and_then(|v| {
                v["telemetry"]
                    .as_array()
                    .map(|t| t.iter().filter_map(|t| t["seq"].as_u64()).collect())
            })
            .unwrap_or_default()
    };
    let before = seqs(api).into_iter().max().unwrap_or(0);
    device.set_network(false);
    wait_online(api, device.id(), false)?;
    println!(
        "  {} is offline for the controller (its broker connection dropped; last telemetry seq {before})",
        device.id()
    );
    let request = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]});
    let answer = local_infer(&device.api_url(), &request);
    match &answer {
        Ok(v) => println!(
            "  POST {}/v2/models/iris/infer {} -> {}",
            device.api_url(),
            request["inputs"][0]["data"],
            outputs_text(v)
        ),
        Err(e) => {
            println!("  UNEXPECTED: local inference failed offline: {e}");
            ok = false;
        }
    }
    // Offline for a few telemetry periods: the agent spools its reports.
    std::thread::sleep(Duration::from_secs(3));
    device.set_network(true);
    wait_online(api, device.id(), true)?;
    let delivered = wait_for("the spooled telemetry to arrive", || {
        let got = seqs(api);
        let newest = got.iter().copied().max()?;
        let whole = (before + 1..=newest).all(|s| got.contains(&s));
        (newest >= before + 3 && whole).then_some(newest)
    })?;
    println!(
        "  network back: reports {}..{delivered} (those made offline included) reached the controller with no gap in sequence numbers",
        before + 1
    );

    Ok(ok)
}

/// Step 8: shifted inputs on some devices, flagged as drift on exactly those.
fn drift(
    api: &Client,
    fleet: &SimFleet,
    opts: &DemoOptions,
    good_digest: &str,
) -> Result<bool, DemoError> {
    let mut ok = true;
    step(
        8,
        "the input distribution shifts on some devices: drift against the bundle's reference",
    );
    let (shifted, sent) = shift_inputs(fleet);
    ok &= sent;
    let drift = wait_for("drift reports from every device", || {
        let v = api.get("/api/v1/drift").ok()?;
        let b = v["bundles"]
            .as_array()?
            .iter()
            .find(|b| b["bundle"] == json!(good_digest))?
            .clone();
        (b["devices"] == json!(opts.devices)).then_some(b)
    })?;
    let flagged: Vec<String> = drift["drifted_devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    println!(
        "  GET /api/v1/drift: {} devices report, drifted: {}",
        drift["devices"],
        if flagged.is_empty() {
            "none".to_owned()
        } else {
            flagged.join(", ")
        }
    );
    if let Some(first) = shifted.first() {
        print_device_drift(api, first);
    }
    let alerted = wait_for("a drift_alert event from each shifted device", || {
        shifted
            .iter()
            .all(|d| {
                api.get(&format!("/api/v1/devices/{d}"))
                    .ok()
                    .and_then(|v| v["events"].as_array().cloned())
                    .is_some_and(|e| e.iter().any(|e| e["kind"] == "drift_alert"))
            })
            .then_some(())
    });
    if flagged != shifted {
        println!("  UNEXPECTED: the drifted devices are not exactly the shifted ones");
        ok = false;
    } else if alerted.is_err() {
        println!("  UNEXPECTED: a shifted device sent no drift_alert event");
        ok = false;
    } else {
        println!("  exactly the shifted devices are flagged, and each sent a drift_alert event");
    }

    Ok(ok)
}

/// Every device's application sends the reference rows once; on three
/// devices they are shifted by +1.5 cm. Returns those devices (sorted), and
/// whether every request was answered.
fn shift_inputs(fleet: &SimFleet) -> (Vec<String>, bool) {
    let mut sent = true;
    let rows = reference_rows();
    let batch = |shift: f64| {
        let data: Vec<f64> = rows.iter().flatten().map(|v| v + shift).collect();
        json!({"inputs": [{"name": "features", "shape": [rows.len(), 4], "datatype": "FP32", "data": data}]})
    };
    let mut shifted: Vec<String> = fleet
        .devices()
        .iter()
        .skip(1)
        .step_by(4)
        .take(3)
        .map(|d| d.id().to_owned())
        .collect();
    shifted.sort();
    for d in fleet.devices() {
        let moved = shifted.iter().any(|s| s == d.id());
        if let Err(e) = local_infer(&d.api_url(), &batch(if moved { 1.5 } else { 0.0 })) {
            println!("  UNEXPECTED: a batch request to {} failed: {e}", d.id());
            sent = false;
        }
    }
    println!(
        "  every device's application sends {} rows; on {} they are shifted by +1.5 cm",
        rows.len(),
        shifted.join(", ")
    );
    (shifted, sent)
}

/// The iris reference rows (4 features each).
fn reference_rows() -> Vec<Vec<f64>> {
    IRIS_REFERENCE
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect::<Vec<f64>>()
        })
        .filter(|r| r.len() == 4)
        .collect()
}

/// The latest drift report of `first`, feature by feature.
fn print_device_drift(api: &Client, first: &str) {
    if let Ok(v) = api.get(&format!("/api/v1/devices/{first}/drift"))
        && let Some(last) = v["reports"].as_array().and_then(|r| r.last())
    {
        for f in last["report"]["inputs"].as_array().into_iter().flatten() {
            println!(
                "    {first} {:<13} psi {:>6.2}  KS p {:>8.1e}{}",
                f["feature"].as_str().unwrap_or(""),
                f["psi"].as_f64().unwrap_or(0.0),
                f["p_value"].as_f64().unwrap_or(1.0),
                if f["drifted"] == json!(true) {
                    "  drifted"
                } else {
                    ""
                }
            );
        }
    }
}

/// Step 9: telemetry per model version.
fn versions_summary(api: &Client, digests: &Digests) -> Result<(), DemoError> {
    step(9, "telemetry per model version, as the soak gates read it");
    let summary = api.get("/api/v1/telemetry/summary?group=version")?;
    for g in summary["groups"].as_array().into_iter().flatten() {
        let digest = g["bundle"].as_str().unwrap_or("");
        let model = if digest == digests.good {
            "iris 1.0.0"
        } else if digest == digests.bad {
            "iris 2.0.0"
        } else if digest == digests.vision {
            "vision 1.0.0"
        } else {
            "none"
        };
        let s = &g["summary"];
        println!(
            "  {model:<12} {:>3} devices  {:>6} inferences  error rate {}  p95 {}  drifted {}/{}",
            s["devices"],
            s["inferences"],
            s["error_rate"]
                .as_f64()
                .map_or("-".into(), |r| format!("{r:.3}")),
            s["p95_us"]
                .as_u64()
                .map_or("-".into(), |p| format!("{p} us")),
            s["drifted_devices"],
            s["drift_devices"]
        );
    }

    Ok(())
}

/// The summary, and with `--keep-running` the fleet kept until Ctrl-C.
fn finish(
    runtime: &tokio::runtime::Runtime,
    controller: &Controller,
    fleet: &mut SimFleet,
    opts: &DemoOptions,
) {
    let (api, url, data) = (&controller.api, &controller.url, &controller.data);
    println!("\nsummary");
    println!(
        "  iris 1.0.0 rolled out to {} devices in 4 waves, vision 1.0.0 beside it on every device; iris 2.0.0 stopped at its canary with vision untouched; local inference kept working offline; shifted inputs flagged as drift on exactly the devices that got them",
        opts.devices
    );
    let metrics = api
        .get_text("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("edgefleet_chunk_bytes_sent_total ")
                || l.starts_with("edgefleet_devices_online ")
        })
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    if !metrics.is_empty() {
        println!("{metrics}");
    }
    println!(
        "  look next: docs/controller.md (API), docs/rollouts.md (gates), docs/agent.md (device), docs/dashboard.md (web pages; run with --keep-running to open them)"
    );
    if opts.keep_running {
        println!("\nkept running (Ctrl-C to stop):");
        println!("  export EDGEFLEET_URL={url}");
        println!(
            "  export EDGEFLEET_TOKEN=$(cat {})",
            data.join("admin-token").display()
        );
        println!("  edgefleet devices list; edgefleet rollout status");
        println!("  dashboard: open {url}/ and log in with that token (docs/dashboard.md)");
        for d in fleet.devices().iter().take(3) {
            println!(
                "  curl {0}/v2/models/iris; curl {0}/v2/models/vision",
                d.api_url()
            );
        }
        runtime.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
}

/// Waits until the controller shows `device` online (or offline).
fn wait_online(api: &Client, device: &str, online: bool) -> Result<(), DemoError> {
    let what = format!("{device} {}", if online { "online" } else { "offline" });
    wait_for(&what, || {
        let v = api.get(&format!("/api/v1/devices/{device}")).ok()?;
        (v["device"]["online"] == json!(online)).then_some(())
    })
}

fn upload(api: &Client, b: &Built) -> Result<String, DemoError> {
    let v = api.upload("/api/v1/bundles", &b.path)?;
    let digest = v["bundle"]["digest"]
        .as_str()
        .ok_or(DemoError::Answer("the upload answer has no digest"))?
        .to_owned();
    println!(
        "  uploaded {} {}: verified against the trust root, digest {}",
        b.channel,
        b.version,
        &digest[..12]
    );
    Ok(digest)
}

fn start_rollout(api: &Client, digest: &str) -> Result<String, DemoError> {
    let v = api.post(
        "/api/v1/rollouts",
        &json!({
            "bundle": digest,
            "selector": {"all": true},
            "waves": ["1", "10%", "50%", "100%"],
            "gates": {"soak_ms": 3000, "install_timeout_ms": 60000},
            "policy": "halt_and_revert",
        }),
    )?;
    let id = v["rollout"]["id"]
        .as_str()
        .ok_or(DemoError::Answer("the rollout answer has no id"))?
        .to_owned();
    let sizes: Vec<String> = v["rollout"]["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w["devices"].to_string())
        .collect();
    println!(
        "  rollout {id}: waves of {} devices; gates: install success >= 90%, failures <= 10%, soak 3 s with error rate <= 5% and p95 <= 1.5x the previous version",
        sizes.join(", ")
    );
    Ok(id)
}

/// Follows a rollout until it ends, printing the engine's decisions and each
/// device's change; returns the final phase.
fn watch(api: &Client, fleet: &SimFleet, id: &str) -> Result<String, DemoError> {
    let mut seen_notes = 0usize;
    let mut members: BTreeMap<String, String> = BTreeMap::new();
    wait_for("the rollout to end", || {
        let v = api.get(&format!("/api/v1/rollouts/{id}")).ok()?;
        let r = &v["rollout"];
        // The engine's decisions first, then what each device did since.
        let log = r["log"].as_array().cloned().unwrap_or_default();
        for l in log.iter().skip(seen_notes) {
            println!("  * {}", l["note"].as_str().unwrap_or(""));
        }
        seen_notes = log.len();
        for (device, m) in r["members"].as_object().into_iter().flatten() {
            let state = m["state"].as_str().unwrap_or("").to_owned();
            if members.get(device) == Some(&state) || state == "pending" {
                continue;
            }
            members.insert(device.clone(), state.clone());
            let board = fleet
                .device(device)
                .map_or(String::new(), |d| d.profile().name.clone());
            let detail = match state.as_str() {
                "commanded" => "told to install".to_owned(),
                "succeeded" => format!(
                    "installed, verified, health-checked, switched: serves {}",
                    fleet
                        .device(device)
                        .and_then(|d| d.serving())
                        .map_or("?".into(), |b| b.version.to_string())
                ),
                "failed" => format!("FAILED: {}", m["reason"].as_str().unwrap_or("")),
                "reverting" => "told to revert".into(),
                "reverted" => "back on its previous bundle".into(),
                other => other.to_owned(),
            };
            println!("    {device} ({board}): {detail}");
        }
        let phase = r["phase"].as_str().unwrap_or("").to_owned();
        if matches!(phase.as_str(), "completed" | "halted" | "aborted") {
            print!("{}", indent(&rollout_text(r)));
            return Some(phase);
        }
        None
    })
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn versions_text(v: &std::collections::HashMap<String, usize>) -> String {
    let mut parts: Vec<String> = v.iter().map(|(k, n)| format!("{n} on {k}")).collect();
    parts.sort();
    parts.join(", ")
}

fn local_infer(base: &str, request: &Value) -> Result<Value, DemoError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut r = agent
        .post(format!("{base}/v2/models/iris/infer"))
        .send_json(request)
        .map_err(|e| DemoError::LocalApi(e.to_string()))?;
    let status = r.status();
    let v: Value = r
        .body_mut()
        .read_json()
        .map_err(|e| DemoError::LocalApi(e.to_string()))?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(DemoError::LocalApi(format!("{status}: {v}")))
    }
}

fn outputs_text(v: &Value) -> String {
    v["outputs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| format!("{} {}", o["name"].as_str().unwrap_or(""), o["data"]))
        .collect::<Vec<_>>()
        .join(", ")
}
