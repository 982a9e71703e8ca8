//! The whole fleet beyond one machine's single points, with real processes:
//! two controller replicas (`edgefleet serve`) on one PostgreSQL store, a
//! three-node NATS cluster (MQTT with mutual TLS and per-device users,
//! prepared by `edgefleet broker nats`), and load devices spread over the
//! nodes. Mid-rollout the replica running it and the broker node both
//! replicas and a third of the devices are connected to are killed with
//! SIGKILL: the devices and the other replica move to the remaining nodes,
//! the other replica takes the rollout over and completes it, no device is
//! told to install twice, and no telemetry report is lost. And real agents
//! on a NATS cluster, subscribing at the QoS 0 their enrollment names.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgefleet_devices::sim::FaultPlan;
use edgefleet_tests::nats::NatsCluster;
use edgefleet_tests::replica::{
    Replica, Setup, online, query, rollout, rollout_holder, upload_iris, wait_for_wave,
};
use edgefleet_tests::{BundleSpec, Harness, TestBroker, enroll_many, wait_for};

#[test]
fn a_rollout_survives_killing_a_replica_and_a_broker_node() {
    const N: usize = 30;
    let runtime = edgefleet_tests::runtime();
    let _enter = runtime.enter();
    let mut setup = Setup::new();
    let (dir, data, url) = setup.paths();
    let broker_dir = dir.join("nats");
    let mut nats = NatsCluster::start(&broker_dir, &data, Some(&url), 3, &mut setup.config);
    let config_file = setup.write_config();

    // Both replicas dial node 1 first (the first URL).
    let mut a = Replica::start(&config_file, "a", &data);
    let b = Replica::start(&config_file, "b", &data);

    let ids: Vec<String> = (0..N).map(|i| format!("nats-{i:03}")).collect();
    let files = enroll_many(&b.api, &ids, &dir.join("devices"));
    // The new devices become NATS users.
    nats.reload_users();
    let users = std::fs::read_to_string(broker_dir.join("devices.conf")).expect("devices.conf");
    assert!(users.contains("user: \"CN=nats-029\""), "{users}");
    // Device i starts on node i % 3.
    let fleet = runtime.block_on(edgefleet_tests::start_load_fleet(
        &nats.addrs(),
        &ids,
        files,
        Duration::from_millis(1000),
    ));
    let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("every device online through the NATS cluster", || {
            (online(&b.api) == N as u64).then_some(())
        })
    }));
    assert!(
        seen.is_ok(),
        "online: {}; devices: {:?}\nnode 1 log:\n{}",
        online(&b.api),
        fleet.stats(),
        nats.log(0)
    );
    let connects_before = fleet.stats().connects.load(Ordering::Relaxed);

    let digest = upload_iris(&b.api, &setup.key, &dir);
    // A device whose command the cluster lost while a node's JetStream
    // streams moved (NATS drops a QoS 1 publish it cannot store) is told
    // again after 5 s without news, not the default minute.
    const RESEND_MS: i64 = 5_000;
    let id = b
        .api
        .post(
            "/api/v1/rollouts",
            &serde_json::json!({
                "bundle": digest,
                "selector": {"all": true},
                "waves": ["1", "25%", "100%"],
                "gates": {"soak_ms": 1500},
                "resend_after_ms": RESEND_MS,
            }),
        )
        .expect("rollout starts")["rollout"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let view = |api: &edgefleet::ops::remote::Client| rollout(api, &id);
    wait_for_wave(&b.api, &id, 2, || format!("devices: {:?}", fleet.stats()));
    let before = view(&b.api);
    assert_ne!(before["phase"], "completed", "killed too late: {before}");
    // The replica running the rollout, and the node both replicas and a
    // third of the devices are on.
    a.kill();
    nats.kill(0);
    let killed = Instant::now();

    let done = wait_for("b to take over and complete the rollout", || {
        let r = view(&b.api);
        matches!(r["phase"].as_str(), Some("completed" | "halted")).then_some(r)
    });
    println!(
        "rollout completed {} ms after killing replica a and node n1",
        killed.elapsed().as_millis()
    );
    assert_eq!(done["phase"], "completed", "{done}");
    for d in &ids {
        assert_eq!(done["members"][d]["state"], "succeeded", "{d}: {done}");
    }
    assert_eq!(rollout_holder(&url).as_deref(), Some("b"));

    // The devices of node 1 came back on the others; every device installed
    // once and was told once.
    let stats = fleet.stats();
    let reconnects = stats.connects.load(Ordering::Relaxed) - connects_before;
    assert!(
        reconnects >= (N / 3) as u64,
        "{reconnects} reconnections after node 1 died; {N} devices on 3 nodes: {stats:?}"
    );
    println!("{reconnects} device reconnections after node 1 died");
    let digest: edgefleet_shared::Digest = digest.parse().expect("digest");
    assert_eq!(fleet.serving().get(&digest), Some(&N));
    assert_eq!(stats.installs.load(Ordering::Relaxed), N as u64);
    assert_eq!(stats.chunks_rejected.load(Ordering::Relaxed), 0);
    assert_eq!(stats.commands_refused.load(Ordering::Relaxed), 0);
    // Told once per wave: a device's install commands are the first and
    // the resends, each at least RESEND_MS after the one before (two
    // replicas commanding the same wave would be a pair far closer).
    let told = query(
        &url,
        "SELECT device, issued_at FROM commands WHERE rollout = $1 AND action = 'install'
         ORDER BY device, issued_at",
        &id,
    );
    let mut devices: Vec<&str> = told.iter().map(|(d, _)| d.as_str()).collect();
    devices.dedup();
    assert_eq!(devices.len(), N, "{told:?}");
    let resent = told.len() - N;
    for pair in told.windows(2).filter(|p| p[0].0 == p[1].0) {
        assert!(
            pair[1].1 - pair[0].1 >= RESEND_MS - 500,
            "{} told twice within {} ms: {told:?}",
            pair[0].0,
            pair[1].1 - pair[0].1
        );
    }
    println!(
        "install commands: {} ({resent} resent after {RESEND_MS} ms without news)",
        told.len()
    );
    // After the rollout: every device online again, seen by b.
    let back = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("every device online on the two nodes left", || {
            (online(&b.api) == N as u64).then_some(())
        })
    }));
    if back.is_err() {
        let offline = b
            .api
            .get("/api/v1/devices?state=offline")
            .map(|v| v["devices"].clone())
            .unwrap_or_default();
        panic!(
            "{} of {N} online; offline: {offline}; devices: {:?}",
            online(&b.api),
            fleet.stats()
        );
    }
    // No report lost with the replica or the node, none stored twice.
    let stats = runtime.block_on(fleet.stop());
    edgefleet_tests::assert_every_report_stored_once(&url, &stats);
}

/// Real agents (the agent's own link and daemon, `devices/src/sim.rs`) on a
/// NATS cluster: the controller's enrollment hands them `subscribe_qos = 0`
/// (from the `[mqtt]` section `edgefleet broker nats` wrote), so no
/// subscription of theirs or the controller's is a JetStream consumer, and
/// a rollout reaches them through core NATS: commands, chunks, telemetry and
/// its acknowledgements.
#[test]
fn real_agents_on_a_nats_cluster_subscribe_at_qos_0_and_take_a_rollout() {
    let h = Harness::start_with(TestBroker::Nats, |_| {});
    let specs: Vec<_> = ["nq-1", "nq-2", "nq-3"]
        .iter()
        .map(|id| h.device(id, FaultPlan::default()))
        .collect();
    let enrolled = std::fs::read_to_string(h.dir().join("identities/nq-1/agent.toml"))
        .expect("the enrollment's agent.toml");
    assert!(enrolled.contains("subscribe_qos = 0"), "{enrolled}");
    h.reload_broker_users();
    let fleet = h.fleet(specs);
    let digest = h.roll_out_to_all(
        &BundleSpec::new("iris_logreg.onnx", (1, 0, 0), 1),
        &["1", "100%"],
    );
    for d in fleet.devices() {
        assert_eq!(
            d.serving().map(|b| b.digest.to_string()),
            Some(digest.clone()),
            "{}",
            d.id()
        );
    }
    wait_for("telemetry from every agent stored", || {
        (h.metric("edgefleet_telemetry_stored_total") >= 3).then_some(())
    });
}
