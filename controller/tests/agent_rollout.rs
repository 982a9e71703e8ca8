//! Agent releases rolled out by a real controller (`edgefleet serve`, embedded
//! broker, mutual TLS) to real agents started from flashed directories under a
//! supervisor that restarts like systemd (docs/agent-update.md): a good release
//! reaches every device, which counts as updated only once its new agent has
//! confirmed; a broken one is reverted on the canary, the rollout halts and
//! nobody else is asked.

mod common;
#[path = "../../agent/tests/common/supervisor.rs"]
mod supervisor;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use supervisor::{Supervisor, agent_release_file, broken_agent, stripped};

/// A device flashed with this build's agent at `bin/edgefleet-agent` (the
/// supervisor's ExecStart), enrolled with `site=lab`, running under a
/// [`Supervisor`].
struct Flashed {
    id: String,
    supervisor: Supervisor,
    api: String,
    link: PathBuf,
}

impl Flashed {
    fn start(c: &Controller, dir: &Path, id: &str) -> Flashed {
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
        let config = out.join("local.toml");
        std::fs::write(&config, text).expect("config");
        let http = format!("127.0.0.1:{}", free_port());
        let supervisor = Supervisor::start(
            &link,
            &["--config", s(&config), "run", "--http", &http],
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
    fn infer(&self) -> u16 {
        infer(&self.api)
    }
}

/// The iris model's answer status on the local API at `api` (0: no answer).
fn infer(api: &str) -> u16 {
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
fn watch_inference(
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
fn agent_version(c: &Controller, id: &str) -> String {
    c.device(id)["device"]["agent_version"]
        .as_str()
        .unwrap_or("-")
        .to_string()
}

/// `update_agent` commands sent to `id`.
fn updates(c: &Controller, id: &str) -> u64 {
    c.device(id)["commands"]["update_agent"]
        .as_u64()
        .unwrap_or(0)
}

fn wait_online(c: &Controller, n: usize) {
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

#[test]
fn an_agent_release_rolls_out_in_waves_and_a_broken_one_halts_at_the_canary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    // The fleet's root, again, with a role for agent releases of its own key.
    let keys = dir.path().join("keys");
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
    let rel_key = edgefleet_shared::SecretKey::from_pem(
        &std::fs::read_to_string(keys.join("rel.key")).expect("release key"),
    )
    .expect("release key");
    let c = Controller::start(&data, 0);
    let devices: Vec<Flashed> = (1..=3)
        .map(|i| Flashed::start(&c, dir.path(), &format!("dev-{i:02}")))
        .collect();
    wait_online(&c, 3);
    let v1 = push(&c, &bundles.v1);
    let id = start_rollout(&c, &v1, &["--waves", "100%"]);
    c.wait_rollout(&id, "model rollout", |r| r["phase"] == "completed");
    let running = env!("CARGO_PKG_VERSION");
    for d in &devices {
        assert_eq!(agent_version(&c, &d.id), running);
        assert_eq!(d.infer(), 200);
    }

    // 1. A good release, 9.9.1 (this build, saying so), to devices below it.
    let own = std::fs::read(stripped(&agent_bin())).expect("agent");
    let next = edgefleet_agent::version::rewrite_version(&own, "9.9.1").expect("version slot");
    let here = std::env::consts::ARCH;
    let good = agent_release_file(dir.path(), &[(here, next)], "9.9.1", 1, &rel_key);
    let good = push(&c, &good);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_inference(
        devices.iter().map(|d| d.api.clone()).collect(),
        stop.clone(),
    );
    let started = Instant::now();
    let id = start_rollout(
        &c,
        &good,
        &[
            "--waves",
            "1,100%",
            "--soak-s",
            "1",
            "--agent-version-below",
            "9.9.1",
        ],
    );
    let r = c.wait_rollout(&id, "agent rollout", |r| {
        r["phase"]
            .as_str()
            .is_some_and(|p| p != "installing" && p != "soaking")
    });
    assert_eq!(r["phase"], "completed", "{r}");
    println!("3 devices on the new agent in {:?}", started.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (failed, longest) = watcher.join().expect("watcher");
    println!("model answers during the rollout: {failed} failed, longest gap {longest:?}");
    assert_eq!(failed, 0, "every inference answered during the handovers");
    assert_eq!(r["counts"]["succeeded"], 3, "{r}");
    for d in &devices {
        assert_eq!(agent_version(&c, &d.id), "9.9.1");
        assert_eq!(updates(&c, &d.id), 1, "{} asked once", d.id);
        assert_eq!(d.infer(), 200, "{} still serves its model", d.id);
        assert!(
            d.supervisor.exits().is_empty(),
            "{}: {:?}",
            d.id,
            d.supervisor.exits()
        );
        let out = std::process::Command::new(&d.link)
            .arg("--version")
            .output()
            .expect("version");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "edgefleet-agent 9.9.1"
        );
    }
    let listed = run_ok(&["devices", "list"], &c.env());
    assert!(
        listed.contains("agent") && listed.contains("9.9.1"),
        "{listed}"
    );
    // Nobody is below 9.9.1 now: a rollout of it has no target.
    let (status, body) = c.call(
        "POST",
        "/api/v1/rollouts",
        Some(serde_json::json!({"bundle": good, "selector": {"all": true, "agent_version_below": "9.9.1"}})),
    );
    assert!(
        status >= 400 || body["rollout"]["counts"]["pending"] == 0,
        "{status} {body}"
    );

    // 2. A broken release: it exits at start. The canary reverts by itself and
    // reports why; the rollout halts; nobody else is asked.
    let broken = agent_release_file(
        dir.path(),
        &[(here, broken_agent("9.9.2", "exit 3"))],
        "9.9.2",
        2,
        &rel_key,
    );
    let broken = push(&c, &broken);
    let id = start_rollout(
        &c,
        &broken,
        &[
            "--waves",
            "1,100%",
            "--soak-s",
            "1",
            "--policy",
            "halt_and_revert",
        ],
    );
    let r = c.wait_rollout(&id, "halted", |r| r["phase"] == "halted");
    let failed: Vec<(&String, &Value)> = r["members"]
        .as_object()
        .expect("members")
        .iter()
        .filter(|(_, m)| m["state"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{r}");
    let reason = failed[0].1["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("trial") && reason.contains("crashed"),
        "{reason}"
    );
    let canary = failed[0].0;
    for d in &devices {
        assert_eq!(agent_version(&c, &d.id), "9.9.1", "{} kept 9.9.1", d.id);
        assert_eq!(d.infer(), 200, "{} serves", d.id);
        let asked = updates(&c, &d.id);
        if &d.id == canary {
            assert_eq!(asked, 2);
            assert_eq!(
                d.supervisor.exits().len(),
                1,
                "the broken agent exited once"
            );
        } else {
            assert_eq!(
                asked, 1,
                "{} was not asked to take the broken release",
                d.id
            );
        }
    }
}
