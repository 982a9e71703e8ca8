//! Agent releases rolled out by a real controller (`edgefleet serve`, embedded
//! broker, mutual TLS) to real agents started from flashed directories under a
//! supervisor that restarts like systemd (docs/agent-update.md): a good release
//! reaches every device, which counts as updated only once its new agent has
//! confirmed; a broken one is reverted on the canary, the rollout halts and
//! nobody else is asked.

mod common;

use std::time::Instant;

use common::flashed::*;
use common::supervisor::{broken_agent, version_of};
use common::*;
use serde_json::Value;

#[test]
fn an_agent_release_rolls_out_in_waves_and_a_broken_one_halts_at_the_canary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let rel_key = release_root(dir.path(), &data);
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
    let good = push_own_release(&c, dir.path(), "9.9.1", 1, &rel_key);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_inference(
        devices.iter().map(|d| d.api.clone()).collect(),
        stop.clone(),
    );
    let started = Instant::now();
    let r = roll_out_agent(&c, &good, "9.9.1", "1,100%");
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
        assert_eq!(version_of(&d.link), "edgefleet-agent 9.9.1");
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
    let broken = push_release(
        &c,
        dir.path(),
        broken_agent("9.9.2", "exit 3"),
        "9.9.2",
        2,
        &rel_key,
    );
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

/// A device that is off when its wave of an agent release starts takes the
/// release once it is back: the controller sends the command again every
/// `resend_after_ms` until `install_timeout_ms`, and the rollout waits for it.
#[test]
fn a_device_off_when_its_wave_starts_takes_the_agent_release_when_it_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    make_bundles(dir.path(), &data);
    let rel_key = release_root(dir.path(), &data);
    let c = Controller::start(&data, 0);
    let mut devices: Vec<Flashed> = (1..=2)
        .map(|i| Flashed::start(&c, dir.path(), &format!("off-{i:02}")))
        .collect();
    wait_online(&c, 2);
    // Off: its agent killed, as by a power cut.
    drop(devices.pop());
    let deadline = Instant::now() + WAIT;
    while c.get("/api/v1/devices?tag=site=lab&state=offline")["devices"]
        .as_array()
        .map_or(0, Vec::len)
        != 1
    {
        assert!(Instant::now() < deadline, "off-02 never went offline");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let release = push_own_release(&c, dir.path(), "9.9.1", 1, &rel_key);
    let (status, body) = c.call(
        "POST",
        "/api/v1/rollouts",
        Some(
            serde_json::json!({"bundle": release, "selector": {"tags": {"site": "lab"}},
            "waves": ["100%"], "gates": {"soak_ms": 1000}, "resend_after_ms": 2000}),
        ),
    );
    assert_eq!(status, 201, "{body}");
    let id = body["rollout"]["id"].as_str().expect("id").to_string();
    // The device that is on takes it; the rollout waits for the other, whose
    // command goes again every 2 s.
    let deadline = Instant::now() + WAIT;
    while agent_version(&c, "off-01") != "9.9.1" {
        assert!(Instant::now() < deadline, "off-01 never updated");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(c.rollout(&id)["phase"], "installing");
    let sent_while_off = updates(&c, "off-02");
    assert!(
        sent_while_off >= 2,
        "sent again while off: {sent_while_off}"
    );

    // Back on: it takes the release, and the rollout completes.
    let back = Flashed::resume(dir.path(), "off-02");
    let r = c.wait_rollout(&id, "agent rollout", |r| {
        r["phase"]
            .as_str()
            .is_some_and(|p| p != "installing" && p != "soaking")
    });
    assert_eq!(r["phase"], "completed", "{r}");
    assert_eq!(agent_version(&c, "off-02"), "9.9.1");
    assert_eq!(version_of(&back.link), "edgefleet-agent 9.9.1");
    assert!(
        back.supervisor.exits().is_empty(),
        "{:?}",
        back.supervisor.exits()
    );
}
