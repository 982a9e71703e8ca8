//! What the controller's process-level tests share: a real `edgefleet serve`
//! process, real agent processes, the CLI, and bundles of the repository's
//! models. Each test file uses part of it.
#![allow(dead_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod flashed;
#[path = "../../../agent/tests/common/supervisor.rs"]
pub mod supervisor;

pub const WAIT: Duration = Duration::from_secs(90);
pub const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");
pub const EDGEFLEET: &str = env!("CARGO_BIN_EXE_edgefleet");

/// The agent binary, built beside ours (built on demand when this package's
/// tests run alone).
pub fn agent_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let path = Path::new(EDGEFLEET).with_file_name("edgefleet-agent");
    BUILT.call_once(|| {
        if !path.exists() {
            // A benchmark's binaries are release builds: the agent beside them too.
            let profile: &[&str] = if cfg!(debug_assertions) {
                &[]
            } else {
                &["--release"]
            };
            let ok = Command::new(env!("CARGO"))
                .args(["build", "-p", "edgefleet-agent", "--bin", "edgefleet-agent"])
                .args(profile)
                .status()
                .expect("cargo runs");
            assert!(ok.success(), "building edgefleet-agent failed");
        }
    });
    path
}

pub fn run_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(EDGEFLEET)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("edgefleet runs");
    assert!(
        out.status.success(),
        "edgefleet {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A controller process.
pub struct Controller {
    pub child: Child,
    pub url: String,
    pub mqtt_port: u16,
    pub token: String,
    pub log: PathBuf,
}

impl Controller {
    pub fn start(data: &Path, mqtt_port: u16) -> Controller {
        Controller::start_with(data, &["--mqtt", &format!("127.0.0.1:{mqtt_port}")])
    }

    pub fn start_with(data: &Path, extra: &[&str]) -> Controller {
        let log = data.with_extension(format!("log-{}", mqtt_port_suffix()));
        let mut child = Command::new(EDGEFLEET)
            .args(["serve", "--data-dir", s(data), "--http", "127.0.0.1:0"])
            .args(extra)
            .env("EDGEFLEET_LOG", "info,rumqttd=off")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("controller starts");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (mut url, mut port) = (None, None);
        while url.is_none() || port.is_none() {
            let line = lines
                .next()
                .expect("controller readiness lines")
                .expect("line");
            if let Some(u) = line.strip_prefix("controller API listening on ") {
                url = Some(u.to_string());
            }
            if let Some(p) = line.strip_prefix("devices connect to mqtts://localhost:") {
                port = Some(p.parse().expect("port"));
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let token = std::fs::read_to_string(data.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string();
        Controller {
            child,
            url: url.expect("url"),
            mqtt_port: port.expect("port"),
            token,
            log,
        }
    }

    pub fn env(&self) -> [(&'static str, &str); 2] {
        [
            ("EDGEFLEET_URL", &self.url),
            ("EDGEFLEET_TOKEN", &self.token),
        ]
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {}", self.token);
        let r = match method {
            "GET" => agent.get(&url).header("Authorization", &auth).call(),
            _ => agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(body.unwrap_or_else(|| json!({}))),
        };
        let mut r = r.expect("request");
        let status = r.status().as_u16();
        (status, r.body_mut().read_json().unwrap_or(Value::Null))
    }

    pub fn get(&self, path: &str) -> Value {
        let (status, v) = self.call("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    pub fn rollout(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/rollouts/{id}"))["rollout"].clone()
    }

    /// Polls a rollout until `done` holds.
    pub fn wait_rollout(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.rollout(id);
            if done(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "rollout never {what}: {r:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The Prometheus text of `/metrics` (no token needed).
    pub fn metrics(&self) -> String {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        agent
            .get(format!("{}/metrics", self.url))
            .call()
            .expect("metrics")
            .body_mut()
            .read_to_string()
            .expect("text")
    }

    pub fn device(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/devices/{id}"))
    }
}

pub fn mqtt_port_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent process enrolled on the controller.
pub struct Agent {
    pub child: Child,
    pub id: String,
    pub api: String,
}

impl Agent {
    pub fn enroll_and_start(c: &Controller, dir: &Path, id: &str, tags: &str) -> Agent {
        let out = dir.join(id);
        run_ok(
            &["devices", "enroll", id, "--tags", tags, "--out", s(&out)],
            &c.env(),
        );
        // The files go to /etc/edgefleet on a device; here they stay in `out`.
        let text = std::fs::read_to_string(out.join("agent.toml")).expect("agent.toml");
        let text = text
            .replace("/etc/edgefleet", s(&out))
            .replace("/var/lib/edgefleet", s(&out.join("data")))
            .replace("interval_s = 60", "interval_s = 1");
        let config = out.join("local.toml");
        std::fs::write(&config, text).expect("config");
        Agent::spawn(
            Command::new(agent_bin()),
            &config,
            id,
            &out.join("agent.log"),
        )
    }

    /// Starts `agent` (a command that runs the agent binary, perhaps through
    /// qemu) with `config`, its local API on a free port, and waits for its
    /// readiness line.
    pub fn spawn(mut agent: Command, config: &Path, id: &str, log: &Path) -> Agent {
        let mut child = agent
            .arg("--config")
            .arg(config)
            .args(["run", "--http", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("agent starts");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let api = loop {
            let Some(line) = lines.next() else {
                panic!(
                    "agent {id} ended before it was ready:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            };
            let line = line.expect("line");
            if let Some(a) = line.strip_prefix("local API listening on ") {
                // "http://127.0.0.1:PORT"
                break a.to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Agent {
            child,
            id: id.into(),
            api,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keys, trust root on the controller, and bundles: v1 and v2 of iris, a v3
/// whose model is broken (its golden outputs are the good model's), and a v4
/// that answers correctly but is a much slower model (the small CNN).
pub struct Bundles {
    pub v1: PathBuf,
    pub v2: PathBuf,
    pub bad: PathBuf,
    pub slow: PathBuf,
}

pub fn make_bundles(dir: &Path, controller_data: &Path) -> Bundles {
    let keys = dir.join("keys");
    run_ok(&["keys", "generate", "--out", s(&keys)], &[]);
    std::fs::create_dir_all(controller_data).expect("data dir");
    run_ok(
        &[
            "trust",
            "init",
            "--key",
            s(&keys.join("signing.key")),
            "--threshold",
            "1",
            "--out",
            s(&controller_data.join("trust-root.cbor")),
        ],
        &[],
    );
    let build = |model: &str, version: &str, release: &str, extra: &[&str]| {
        let golden = if model.starts_with("iris") {
            vec!["--golden".to_string(), format!("{MODELS}/iris_golden.json")]
        } else {
            vec![]
        };
        let out = dir.join(format!("iris-{version}.efb"));
        let mut args = vec![
            "bundle".to_string(),
            "build".into(),
            "--model".into(),
            format!("{MODELS}/{model}"),
            "--channel".into(),
            "iris".into(),
            "--version".into(),
            version.into(),
            "--release".into(),
            release.into(),
            "--key".into(),
            s(&keys.join("signing.key")).into(),
            "--out".into(),
            s(&out).into(),
        ];
        args.extend(golden);
        args.extend(extra.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok(&refs, &[]);
        out
    };
    let good = format!("{MODELS}/iris_logreg.onnx");
    Bundles {
        v1: build("iris_logreg.onnx", "1.0.0", "1", &[]),
        v2: build("iris_logreg.onnx", "2.0.0", "2", &[]),
        bad: build(
            "iris_logreg_v2_broken.onnx",
            "3.0.0",
            "3",
            &["--golden-outputs-from", &good],
        ),
        slow: build("digits_cnn.onnx", "4.0.0", "4", &[]),
    }
}

pub fn push(c: &Controller, bundle: &Path) -> String {
    let out = run_ok(&["bundles", "push", s(bundle), "--json"], &c.env());
    let v: Value = serde_json::from_str(&out).expect("json");
    v["bundle"]["digest"].as_str().expect("digest").to_string()
}

pub fn start_rollout(c: &Controller, digest: &str, extra: &[&str]) -> String {
    let mut args = vec!["rollout", "start", digest, "--tags", "site=lab", "--json"];
    args.extend_from_slice(extra);
    let out = run_ok(&args, &c.env());
    let v: Value = serde_json::from_str(&out).expect("json");
    v["rollout"]["id"].as_str().expect("id").to_string()
}

pub fn versions(c: &Controller, agents: &[Agent]) -> Vec<String> {
    agents
        .iter()
        .map(|a| {
            c.device(&a.id)["device"]["active_version"]
                .as_str()
                .unwrap_or("-")
                .to_string()
        })
        .collect()
}

pub fn wait_versions(c: &Controller, agents: &[Agent], want: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = versions(c, agents);
        if v.iter().all(|x| x == want) {
            return;
        }
        assert!(Instant::now() < deadline, "devices on {v:?}, want {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn installs(c: &Controller, device: &str) -> u64 {
    c.device(device)["commands"]["install"]
        .as_u64()
        .unwrap_or(0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}
