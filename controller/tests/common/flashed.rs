//! Devices flashed with this build's agent, running under a supervisor that
//! restarts like systemd, and what the tests and benchmarks of agent releases
//! ask of them (controller/tests/agent_rollout.rs, benches/agent_update.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::supervisor::{Supervisor, stripped};
use super::*;

/// The fleet's trust root in `data` made again with a role for agent releases
/// of its own key (made in `dir`): that key, to sign releases with.
pub fn release_root(dir: &Path, data: &Path) -> edgefleet_shared::SecretKey {
    let keys = dir.join("keys");
    run_ok(
        &["keys", "generate", "--out", s(&keys), "--name", "rel"],
        &[],
    );
    run_ok(
        &[
            "trust",
            "init",
            "--key",
            s(&keys.join("signing.key")),
            "--threshold",
            "1",
            "--agent-release-key",
            s(&keys.join("rel.pub")),
            "--out",
            s(&data.join("trust-root.cbor")),
        ],
        &[],
    );
    edgefleet_shared::SecretKey::from_pem(
        &std::fs::read_to_string(keys.join("rel.key")).expect("release key"),
    )
    .expect("release key")
}

/// A device flashed with this build's agent at `bin/edgefleet-agent` (the
/// supervisor's ExecStart), enrolled with `site=lab`, running under a
/// [`Supervisor`].
pub struct Flashed {
    pub id: String,
    pub supervisor: Supervisor,
    pub api: String,
    pub link: PathBuf,
}

impl Flashed {
    pub fn start(c: &Controller, dir: &Path, id: &str) -> Flashed {
        let out = dir.join(id);
        run_ok(
            &[
                "devices",
                "enroll",
                id,
                "--tags",
                "site=lab",
                "--out",
                s(&out),
            ],
            &c.env(),
        );
        let link = out.join("bin/edgefleet-agent");
        std::fs::create_dir_all(link.parent().expect("dir")).expect("bin dir");
        std::fs::copy(stripped(&agent_bin()), &link).expect("flash the agent");
        let text = std::fs::read_to_string(out.join("agent.toml")).expect("agent.toml");
        let text = text
            .replace("/etc/edgefleet", s(&out))
            .replace("/var/lib/edgefleet", s(&out.join("data")))
            .replace("interval_s = 60", "interval_s = 1");
        let mut config: toml::Table = toml::from_str(&text).expect("enrolled agent.toml");
        let update = config
            .entry("self_update")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("[self_update] is a table");
        update.insert("binary_dir".into(), s(&out.join("lib")).into());
        update.insert("link".into(), s(&link).into());
        update.insert("confirm_within_s".into(), 30.into());
        let text = toml::to_string(&config).expect("config text");
        std::fs::write(out.join("local.toml"), text).expect("config");
        Flashed::resume(dir, id)
    }

    /// The device [`Flashed::start`] made in `dir`, started again (after it
    /// was dropped: its agent killed, as by a power cut).
    pub fn resume(dir: &Path, id: &str) -> Flashed {
        let out = dir.join(id);
        let link = out.join("bin/edgefleet-agent");
        let http = format!("127.0.0.1:{}", free_port());
        let supervisor = Supervisor::start(
            &link,
            &[
                "--config",
                s(&out.join("local.toml")),
                "run",
                "--http",
                &http,
            ],
            &out.join("agent.log"),
        );
        let api = supervisor.api();
        Flashed {
            id: id.into(),
            supervisor,
            api,
            link,
        }
    }

    /// The model's answer status on the local API (0: no answer).
    pub fn infer(&self) -> u16 {
        infer(&self.api)
    }
}

/// The iris model's answer status on the local API at `api` (0: no answer).
pub fn infer(api: &str) -> u16 {
    use std::io::{Read, Write};
    let body = r#"{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.0,3.4,1.5,0.2]}]}"#;
    let Ok(mut stream) = std::net::TcpStream::connect(api) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!(
        "POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    if stream.write_all(request.as_bytes()).is_err() || stream.read_to_string(&mut answer).is_err()
    {
        return 0;
    }
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Asks every device's model in turn until `stop`: the requests that got no
/// 200, and the longest time one device went without a 200.
pub fn watch_inference(
    apis: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u32, Duration)> {
    std::thread::spawn(move || {
        let mut last_ok: Vec<Instant> = apis.iter().map(|_| Instant::now()).collect();
        let (mut failed, mut longest) = (0, Duration::ZERO);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (api, last) in apis.iter().zip(&mut last_ok) {
                if infer(api) == 200 {
                    longest = longest.max(last.elapsed());
                    *last = Instant::now();
                } else {
                    failed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (failed, longest)
    })
}

/// The device's agent version as the controller lists it.
pub fn agent_version(c: &Controller, id: &str) -> String {
    c.device(id)["device"]["agent_version"]
        .as_str()
        .unwrap_or("-")
        .to_string()
}

/// `update_agent` commands sent to `id`.
pub fn updates(c: &Controller, id: &str) -> u64 {
    c.device(id)["commands"]["update_agent"]
        .as_u64()
        .unwrap_or(0)
}

pub fn wait_online(c: &Controller, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = c.get("/api/v1/devices?tag=site=lab&state=online");
        if v["devices"].as_array().map_or(0, Vec::len) == n {
            return;
        }
        assert!(Instant::now() < deadline, "devices not online: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// This build's agent (stripped) saying `version`, as a release for this
/// machine's architecture numbered `release`, signed with `key` and pushed
/// to the controller: its digest.
pub fn push_own_release(
    c: &Controller,
    dir: &Path,
    version: &str,
    release: u64,
    key: &edgefleet_shared::SecretKey,
) -> String {
    let own = std::fs::read(stripped(&agent_bin())).expect("agent");
    let next = edgefleet_agent::version::rewrite_version(&own, version).expect("version slot");
    push_release(c, dir, next, version, release, key)
}

/// `binary` as a release for this machine's architecture, `version` numbered
/// `release`, signed with `key` and pushed to the controller: its digest.
pub fn push_release(
    c: &Controller,
    dir: &Path,
    binary: Vec<u8>,
    version: &str,
    release: u64,
    key: &edgefleet_shared::SecretKey,
) -> String {
    let here = std::env::consts::ARCH;
    let file = super::supervisor::agent_release_file(dir, &[(here, binary)], version, release, key);
    push(c, &file)
}

/// Rolls the agent release `digest` out to the `site=lab` devices whose agent
/// is below `version`, in `waves`, with a 1 s soak, and waits until the
/// rollout has finished its waves (completed, halted or paused): the rollout.
pub fn roll_out_agent(c: &Controller, digest: &str, version: &str, waves: &str) -> Value {
    let id = start_rollout(
        c,
        digest,
        &[
            "--waves",
            waves,
            "--soak-s",
            "1",
            // The same binary under another version: what halts a release in
            // these tests is a crash, not latency, and a 1 s soak's p95 while
            // a watcher loads every device is noise (1.63x once in CI).
            "--max-p95-latency-ratio",
            "4",
            "--agent-version-below",
            version,
        ],
    );
    c.wait_rollout(&id, "agent rollout", |r| {
        r["phase"]
            .as_str()
            .is_some_and(|p| p != "installing" && p != "soaking")
    })
}
