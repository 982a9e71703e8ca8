//! Two controller replicas (`edgefleet serve` processes) on one PostgreSQL
//! store and one Mosquitto broker, sharing a data directory (the CA, the
//! command key, the bundles): one holds the rollout lease and runs the
//! rollouts, the other answers the API (forwarding rollout operations to the
//! holder) and shares the telemetry (MQTT shared subscriptions). The holder is killed with SIGKILL mid-rollout: the other
//! takes the lease over and finishes the rollout, no device is sent the
//! install twice, and no telemetry report is lost or stored twice.

use std::sync::atomic::Ordering;
use std::time::Duration;

use edgefleet::ops::remote::Client;
use edgefleet_tests::replica::{
    Relay, Replica, Setup, metric, online, query, rollout, rollout_holder, upload_iris,
    wait_for_wave,
};
use edgefleet_tests::{Mosquitto, enroll_many, wait_for};
use serde_json::json;

#[test]
fn a_rollout_survives_killing_the_replica_that_runs_it() {
    const N: usize = 40;
    let runtime = edgefleet_tests::runtime();
    let _enter = runtime.enter();
    // One store, one broker, one configuration for both replicas.
    let mut setup = Setup::new();
    let (dir, data, url) = setup.paths();
    let _mosquitto = Mosquitto::start(&dir.join("broker"), &data, &mut setup.config);
    setup.config.cluster.shared_subscriptions = true;
    let config_file = setup.write_config();
    let config = setup.config.clone();

    let mut a = Replica::start(&config_file, "a", &data);
    let b = Replica::start(&config_file, "b", &data);
    // `a` started first and holds the lease: `b` forwards rollout operations
    // to it (this answer is a's: b alone would say that a runs rollouts).
    let e = b
        .api
        .post("/api/v1/rollouts/ro-x/pause", &json!({}))
        .expect_err("no such rollout")
        .to_string();
    assert!(e.contains("no rollout ro-x"), "{e}");

    let ids: Vec<String> = (0..N).map(|i| format!("rep-{i:03}")).collect();
    let files = enroll_many(&b.api, &ids, &dir.join("devices"));
    let broker_port: u16 = config
        .mqtt
        .url
        .as_deref()
        .and_then(|u| u.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("broker port");
    let fleet = runtime.block_on(edgefleet_tests::start_load_fleet(
        &[([127, 0, 0, 1], broker_port).into()],
        &ids,
        files,
        Duration::from_millis(500),
    ));
    wait_for("every device online, seen by b", || {
        (online(&b.api) == N as u64).then_some(())
    });

    let digest = upload_iris(&b.api, &setup.key, &dir);
    // Started through b, carried out by a.
    let id = edgefleet_tests::start_rollout_to_all(&b.api, &digest, &["1", "25%", "100%"], 1500);
    let view = |api: &Client| rollout(api, &id);
    // Kill the holder once the second wave is under way (seen through b,
    // which reads the rollout from the store).
    wait_for_wave(&b.api, &id, 2, || {
        let lease = query(
            &url,
            "SELECT holder, expires_at FROM leases WHERE name <> $1",
            "",
        );
        format!("devices: {:?}\nlease: {lease:?}", fleet.stats())
    });
    let before = view(&b.api);
    assert_ne!(before["phase"], "completed", "killed too late: {before}");
    // Shared subscriptions: each report reached one replica, not both.
    let sent_so_far = fleet.stats().telemetry_sent.load(Ordering::Relaxed);
    let heard =
        metric(&a.api, "edgefleet_messages_total") + metric(&b.api, "edgefleet_messages_total");
    assert!(
        heard < sent_so_far * 3 / 2,
        "the replicas heard {heard} messages for {sent_so_far} reports: telemetry not shared"
    );
    let _ = a.child.kill();
    let _ = a.child.wait();
    let killed = std::time::Instant::now();
    wait_for("b to hold the rollout lease", || {
        (rollout_holder(&url).as_deref() == Some("b")).then_some(())
    });
    println!(
        "rollout lease taken over {} ms after the kill (lease_ms {})",
        killed.elapsed().as_millis(),
        config.cluster.lease_ms
    );

    // b sends the commands a stored but left unanswered again (the same
    // commands): a device that had one refuses the copy as a replay, which
    // is no fault; any other refusal is.
    let rejected = query(
        &url,
        "SELECT body, COUNT(*) FROM events WHERE kind = 'command_rejected'
         AND body NOT LIKE $1 GROUP BY body",
        "%replayed: %",
    );
    assert!(rejected.is_empty(), "commands refused: {rejected:?}");
    let done = wait_for("b to take over and complete the rollout", || {
        let r = view(&b.api);
        matches!(r["phase"].as_str(), Some("completed" | "halted")).then_some(r)
    });
    assert_eq!(done["phase"], "completed", "{done}");
    for d in &ids {
        assert_eq!(done["members"][d]["state"], "succeeded", "{d}: {done}");
    }
    let log = done["log"].to_string();
    assert!(log.contains("rollout complete"), "{log}");
    // b runs rollouts now: an operation on the finished rollout is answered
    // by b itself (a conflict, not "another replica").
    let e = b
        .api
        .post(&format!("/api/v1/rollouts/{id}/pause"), &json!({}))
        .expect_err("finished")
        .to_string();
    assert!(e.contains("finished"), "{e}");

    // Every device installed once, and was told once.
    let digest: edgefleet_shared::Digest = digest.parse().expect("digest");
    assert_eq!(fleet.serving().get(&digest), Some(&N));
    let stats = fleet.stats();
    assert_eq!(stats.installs.load(Ordering::Relaxed), N as u64);
    assert_eq!(stats.chunks_rejected.load(Ordering::Relaxed), 0);
    assert_eq!(stats.commands_refused.load(Ordering::Relaxed), 0);
    let told = query(
        &url,
        "SELECT device, COUNT(*) FROM commands WHERE rollout = $1 AND action = 'install'
         GROUP BY device",
        &id,
    );
    assert_eq!(told.len(), N, "{told:?}");
    assert!(
        told.iter().all(|(_, n)| *n == 1),
        "a device told twice: {told:?}"
    );
    // No report lost, none counted twice: the reports the killed replica had
    // received but not stored were never acknowledged to their devices, which
    // sent them again (docs/protocol.md, "Telemetry acknowledgements"). The
    // devices stop once the controller has acknowledged every report.
    let stats = runtime.block_on(fleet.stop());
    edgefleet_tests::assert_every_report_stored_once(&url, &stats);
}

/// A holder that stored a wave's commands but never got them to the broker
/// (its link lost everything, then it died): the replica taking the rollout
/// over sends them again at once, as the same commands, and the rollout
/// completes long before any command would be sent again for silence
/// (`resend_after_ms` is 10 minutes here).
#[test]
fn commands_the_dead_holder_never_published_are_sent_again_by_the_next() {
    const N: usize = 10;
    let runtime = edgefleet_tests::runtime();
    let _enter = runtime.enter();
    let mut setup = Setup::new();
    let (dir, data, url) = setup.paths();
    let _mosquitto = Mosquitto::start(&dir.join("broker"), &data, &mut setup.config);
    let config_file = setup.write_config();
    let config = setup.config.clone();
    let broker: std::net::SocketAddr = config
        .mqtt
        .url
        .as_deref()
        .and_then(|u| u.strip_prefix("mqtts://"))
        .and_then(|a| a.parse().ok())
        .expect("broker address");
    // `a` reaches the broker through a relay the test cuts.
    let relay = Relay::start(broker);
    let mut behind_relay = config.clone();
    behind_relay.mqtt.url = Some(format!("mqtts://{}", relay.addr));
    let a_file = dir.join("controller-a.toml");
    std::fs::write(&a_file, toml::to_string(&behind_relay).expect("TOML")).expect("config");
    let mut a = Replica::start(&a_file, "a", &data);
    let holder = || rollout_holder(&url);
    wait_for("a to hold the rollout lease", || {
        (holder().as_deref() == Some("a")).then_some(())
    });
    let b = Replica::start(&config_file, "b", &data);

    let ids: Vec<String> = (0..N).map(|i| format!("cut-{i:02}")).collect();
    let files = enroll_many(&b.api, &ids, &dir.join("devices"));
    let fleet = runtime.block_on(edgefleet_tests::start_load_fleet(
        &[broker],
        &ids,
        files,
        Duration::from_secs(1),
    ));
    wait_for("every device online, seen by b", || {
        (online(&b.api) == N as u64).then_some(())
    });
    let digest = upload_iris(&b.api, &setup.key, &dir);

    relay.cut();
    let id = a
        .api
        .post(
            "/api/v1/rollouts",
            &json!({
                "bundle": digest,
                "selector": {"all": true},
                "waves": ["100%"],
                "gates": {"soak_ms": 0},
                "resend_after_ms": 600_000,
            }),
        )
        .expect("rollout")["rollout"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let told = || {
        query(
            &url,
            "SELECT device, COUNT(*) FROM commands WHERE rollout = $1 AND action = 'install'
             GROUP BY device",
            &id,
        )
    };
    wait_for("a to store the wave's commands", || {
        (told().len() == N).then_some(())
    });
    // Handed to a's client and lost on the cut link; then a dies.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fleet.stats().installs.load(Ordering::Relaxed), 0);
    a.kill();

    let done = wait_for("b to take over and complete the rollout", || {
        let r = rollout(&b.api, &id);
        matches!(r["phase"].as_str(), Some("completed" | "halted")).then_some(r)
    });
    assert_eq!(done["phase"], "completed", "{done}");
    assert_eq!(holder().as_deref(), Some("b"));
    // Each device got its command once: the same one, from b.
    assert!(told().iter().all(|(_, n)| *n == 1), "{:?}", told());
    assert_eq!(
        metric(&b.api, "edgefleet_commands_resent_total"),
        N as u64,
        "b sent every unanswered command again"
    );
    let stats = fleet.stats();
    assert_eq!(stats.installs.load(Ordering::Relaxed), N as u64);
    assert_eq!(stats.commands_refused.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.commands_replayed.load(Ordering::Relaxed),
        0,
        "no device had the first copy"
    );
    runtime.block_on(fleet.stop());
}
