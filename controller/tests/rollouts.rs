//! Staged rollouts end to end: a real controller process (`edgefleet serve`, with
//! its embedded broker and mutual TLS), real agent processes enrolled through the
//! CLI, real bundles of the repository's models. Every wait polls the API against
//! a deadline; nothing sleeps a fixed time to let things happen.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

#[test]
fn a_fleet_rolls_out_in_waves_a_bad_bundle_stops_at_the_canary_and_a_restart_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let mut c = Controller::start(&data, 0);
    let agents: Vec<Agent> = (1..=5)
        .map(|i| Agent::enroll_and_start(&c, dir.path(), &format!("dev-{i:02}"), "site=lab"))
        .collect();
    // Everyone enrolled and online.
    let deadline = Instant::now() + WAIT;
    loop {
        let v = c.get("/api/v1/devices?tag=site=lab&state=online");
        if v["devices"].as_array().map_or(0, Vec::len) == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "devices not online: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 1. A good rollout through all waves: 1 | 40% of 5 = 2 -> 1 more | 100% -> 3.
    let v1 = push(&c, &bundles.v1);
    let id = start_rollout(&c, &v1, &["--waves", "1,40%,100%", "--soak-s", "1"]);
    let r = c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    let sizes: Vec<u64> = r["waves"]
        .as_array()
        .expect("waves")
        .iter()
        .map(|w| w["devices"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(sizes, vec![1, 1, 3]);
    assert_eq!(r["counts"]["succeeded"], 5);
    wait_versions(&c, &agents, "1.0.0");
    for a in &agents {
        assert_eq!(installs(&c, &a.id), 1, "{} asked once", a.id);
    }
    // The log tells the story, wave by wave.
    let log: Vec<String> = r["log"]
        .as_array()
        .expect("log")
        .iter()
        .map(|l| l["note"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        log.iter().any(|l| l.contains("wave 2 of 3 started")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("rollout complete: 5 devices switched")),
        "{log:?}"
    );

    // 2. A bundle that fails its golden cases on device: the canary catches it,
    // the rollout halts, nobody else is asked, everyone stays on 1.0.0.
    let bad = push(&c, &bundles.bad);
    let id = start_rollout(&c, &bad, &["--waves", "1,100%", "--soak-s", "1"]);
    let r = c.wait_rollout(&id, "halted", |r| r["phase"] == "halted");
    let reason = r["phase_detail"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("wave 1: 1 of 1 devices failed"), "{reason}");
    assert_eq!(r["counts"]["pending"], 4, "{r:#}");
    let canary = r["members"]
        .as_object()
        .expect("members")
        .iter()
        .find(|(_, m)| m["state"] == "failed")
        .map(|(d, m)| (d.clone(), m["reason"].as_str().unwrap_or("").to_string()))
        .expect("a failed canary");
    assert!(canary.1.starts_with("health_check:"), "{canary:?}");
    // The reason is visible on the device too.
    let events = c.device(&canary.0)["events"].clone();
    assert!(
        events
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["kind"] == "install_failed"),
        "{events:#}"
    );
    assert_eq!(versions(&c, &agents), vec!["1.0.0"; 5]);
    for a in agents.iter().filter(|a| a.id != canary.0) {
        assert_eq!(
            installs(&c, &a.id),
            1,
            "{} was never asked for the bad bundle",
            a.id
        );
    }

    // 3. Kill the controller mid-rollout (wave 1 soaking for 4 s, the rest not
    // asked yet), start it again: the rollout continues from its stored state.
    let v2 = push(&c, &bundles.v2);
    let id = start_rollout(&c, &v2, &["--waves", "1,100%", "--soak-s", "4"]);
    c.wait_rollout(&id, "soaking", |r| r["phase"] == "soaking");
    let port = c.mqtt_port;
    c.kill();
    let c = Controller::start(&data, port);
    assert!(c.log().contains("continuing rollout"), "{}", c.log());
    let r = c.wait_rollout(&id, "completed after the restart", |r| {
        r["phase"] == "completed"
    });
    assert_eq!(r["counts"]["succeeded"], 5);
    wait_versions(&c, &agents, "2.0.0");
    for a in &agents {
        // v1, v2: one install each (the canary also had the bad one).
        let want = if a.id == canary.0 { 3 } else { 2 };
        assert_eq!(
            installs(&c, &a.id),
            want,
            "{}: nobody asked twice for v2",
            a.id
        );
    }

    // 4. The audit log recorded who did what.
    let audit = c.get("/api/v1/audit");
    let actions: Vec<&str> = audit["audit"]
        .as_array()
        .expect("audit")
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    for want in [
        "device.enroll",
        "bundle.upload",
        "rollout.start",
        "rollout.step",
    ] {
        assert!(actions.contains(&want), "{want} missing: {actions:?}");
    }
    // Metrics expose the fleet.
    let metrics = c.metrics();
    assert!(metrics.contains("edgefleet_devices 5"), "{metrics}");
    assert!(
        metrics.contains("edgefleet_devices_by_version{channel=\"iris\",version=\"2.0.0\"} 5"),
        "{metrics}"
    );
    drop(agents);
}

/// Sends inferences to every agent until `stop`: the input that fits the model
/// each one serves (asked from its metadata), so that none is an error.
fn traffic(apis: Vec<String>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for api in &apis {
            let Ok(mut meta) = agent.get(format!("{api}/v2/models/iris")).call() else {
                continue;
            };
            let meta: Value = meta.body_mut().read_json().unwrap_or(Value::Null);
            let body = if meta["inputs"][0]["name"] == "image" {
                json!({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": vec![0.5f32; 784]}]})
            } else {
                json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]})
            };
            // One request per metadata read: a switch in between makes at most
            // one request of the old shape.
            let _ = agent
                .post(format!("{api}/v2/models/iris/infer"))
                .send_json(&body);
        }
    }
}

#[test]
fn a_wave_much_slower_than_the_previous_version_trips_the_latency_gate_and_reverts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let c = Controller::start(&data, 0);
    let agents: Vec<Agent> = (1..=4)
        .map(|i| Agent::enroll_and_start(&c, dir.path(), &format!("lat-{i:02}"), "site=lab"))
        .collect();
    let v1 = push(&c, &bundles.v1);
    let id = start_rollout(&c, &v1, &["--waves", "100%", "--soak-s", "0"]);
    c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    wait_versions(&c, &agents, "1.0.0");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let apis = agents.iter().map(|a| a.api.clone()).collect();
        let stop = stop.clone();
        std::thread::spawn(move || traffic(apis, stop))
    };
    // Half the fleet gets the slow model; the other half is the baseline. The
    // soak is long: only the gate can end it within the test's deadline.
    let slow = push(&c, &bundles.slow);
    // The error-rate gate is loosened: a request shaped for the old model can
    // race the switch, and this test is about latency (the error-rate gate has
    // its own engine tests).
    let (status, v) = c.call(
        "POST",
        "/api/v1/rollouts",
        Some(json!({
            "bundle": slow,
            "selector": {"tags": {"site": "lab"}},
            "waves": ["2", "100%"],
            "gates": {"soak_ms": 600_000, "max_error_rate": 0.5},
        })),
    );
    assert_eq!(status, 201, "{v}");
    let id = v["rollout"]["id"].as_str().expect("id").to_string();
    let r = c.wait_rollout(&id, "halted", |r| r["phase"] == "halted");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.join();
    // The API shows the same story: per version and per wave.
    let by_version = c.get(&format!(
        "/api/v1/telemetry/summary?group=version&rollout={id}"
    ));
    let p95 = |digest: &str| {
        by_version["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .find(|g| g["bundle"] == digest)
            .and_then(|g| g["summary"]["p95_us"].as_u64())
    };
    let (new_p95, old_p95) = (p95(&slow), p95(&v1));
    assert!(
        new_p95.zip(old_p95).is_some_and(|(n, o)| n > o),
        "{by_version:#}"
    );
    let by_wave = c.get(&format!(
        "/api/v1/telemetry/summary?group=wave&rollout={id}"
    ));
    assert_eq!(by_wave["groups"][0]["devices"], 2, "{by_wave:#}");
    assert!(by_wave["groups"][0]["summary"]["inferences"].as_u64() > Some(0));
    let reason = r["phase_detail"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("p95 latency") && reason.contains("above max_p95_latency_ratio 1.50x"),
        "{reason}"
    );
    assert_eq!(r["counts"]["pending"], 2, "the second wave was never asked");
    // The two that switched are told to revert and go back to 1.0.0.
    wait_versions(&c, &agents, "1.0.0");
    let r = c.wait_rollout(&id, "reverted", |r| r["counts"]["reverted"] == 2);
    let reverted: Vec<&str> = r["members"]
        .as_object()
        .expect("members")
        .iter()
        .filter(|(_, m)| m["state"] == "reverted")
        .map(|(d, _)| d.as_str())
        .collect();
    for d in reverted {
        let commands = &c.device(d)["commands"];
        assert_eq!(commands["revert"], 1, "{d}: {commands}");
    }
}

/// Mosquitto started on a configuration file (killed on drop).
struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_controller_runs_a_fleet_through_mosquitto_whose_acl_confines_each_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let mq = dir.path().join("mosquitto");
    let port = free_port();
    run_ok(
        &[
            "broker",
            "mosquitto",
            "--data-dir",
            s(&data),
            "--out",
            s(&mq),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    // As root here, Mosquitto would switch to its own user, which cannot read
    // the temporary directory.
    let conf = std::fs::read_to_string(mq.join("mosquitto.conf")).expect("conf");
    std::fs::write(mq.join("mosquitto.conf"), format!("user root\n{conf}")).expect("conf");
    let log = std::fs::File::create(mq.join("mosquitto.log")).expect("log");
    let _broker = Mosquitto(
        Command::new("mosquitto")
            .arg("-c")
            .arg(mq.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto is installed (.ci/run installs it)"),
    );
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = dir.path().join("controller.toml");
    let snippet = std::fs::read_to_string(mq.join("controller-mqtt.toml")).expect("snippet");
    std::fs::write(&config, snippet).expect("config");
    let c = Controller::start_with(&data, &["--config", s(&config)]);
    assert_eq!(c.mqtt_port, port, "devices are sent to Mosquitto");
    let agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::enroll_and_start(&c, dir.path(), &format!("mq-{i:02}"), "site=lab"))
        .collect();
    let v1 = push(&c, &bundles.v1);
    let id = start_rollout(&c, &v1, &["--waves", "1,100%", "--soak-s", "0"]);
    c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    wait_versions(&c, &agents, "1.0.0");
    let v2 = push(&c, &bundles.v2);
    let id = start_rollout(&c, &v2, &["--waves", "100%", "--soak-s", "0"]);
    c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    wait_versions(&c, &agents, "2.0.0");

    // Mosquitto applies the ACL to wills: an enrolled device with no agent
    // cannot leave one in mq-02's name. (Mosquitto 2.0 accepts the CONNECT and
    // drops the will when it would publish it; forge_wills checks the effect.)
    let attacker = dir.path().join("mq-03");
    run_ok(
        &["devices", "enroll", "mq-03", "--out", s(&attacker)],
        &c.env(),
    );
    forge_wills(&c, port, &attacker, "mq-03", "mq-02");

    // mq-01 forges telemetry on mq-02's topic, then publishes a marker on its own.
    // The ACL drops the forgery at the broker: the marker (sent after it on the
    // same connection) arrives, the forgery never does.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (client, mut eventloop) =
            device_client(&dir.path().join("mq-01"), "mq-01-forger", port);
        publish_telemetry(&client, "mq-02", 1, 900_000).await;
        publish_telemetry(&client, "mq-01", 1, 900_001).await;
        // Both acknowledged on this connection: a lost connection fails here
        // (rumqttc would reconnect without the two publishes and keep-alive
        // answers would keep the loop waiting for ever).
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut acked = 0;
        while acked < 2 {
            match tokio::time::timeout_at(deadline, eventloop.poll())
                .await
                .expect("the broker acknowledges both publishes in time")
            {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("the broker closed the forger's connection: {e}"),
            }
        }
    });
    let seqs = |device: &str| telemetry_seqs(&c, device);
    let deadline = Instant::now() + WAIT;
    while !seqs("mq-01").contains(&900_001) {
        assert!(Instant::now() < deadline, "the marker never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !seqs("mq-02").contains(&900_000),
        "the forged telemetry reached the controller"
    );
}

#[test]
fn the_embedded_broker_gate_closes_a_device_that_publishes_on_another_devices_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let c = Controller::start(&data, 0);
    let agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::enroll_and_start(&c, dir.path(), &format!("gt-{i:02}"), "site=lab"))
        .collect();
    // Devices work through the gate.
    let v1 = push(&c, &bundles.v1);
    let id = start_rollout(&c, &v1, &["--waves", "100%", "--soak-s", "0"]);
    c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    wait_versions(&c, &agents, "1.0.0");

    // An enrolled device with no agent running (a second connection with a running
    // device's id would take over its session, as MQTT says): its own client id,
    // telemetry on gt-02's topic.
    let d = dir.path().join("gt-03");
    run_ok(&["devices", "enroll", "gt-03", "--out", s(&d)], &c.env());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let closed = rt.block_on(async {
        let (client, mut eventloop) = device_client(&d, "gt-03", c.mqtt_port);
        publish_telemetry(&client, "gt-02", 1, 900_000).await;
        // Connected first (the gate let CONNECT through), then closed on the publish.
        let mut connected = false;
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll())
                .await
                .expect("the gate answers")
            {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => connected = true,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return false,
                Ok(_) => {}
                Err(_) => return connected,
            }
        }
    });
    assert!(
        closed,
        "the gate must accept the connection and close it on the forged publish"
    );
    // The gate judges before it forwards: the forgery never reached the broker.
    let forged = telemetry_seqs(&c, "gt-02");
    assert!(!forged.contains(&900_000), "{forged:?}");
    let metrics = c.metrics();
    assert!(
        metrics.contains("edgefleet_gate_refused_total 1"),
        "{metrics}"
    );
    // gt-01 and gt-02 are unaffected.
    let devices = c.get("/api/v1/devices?state=online");
    assert_eq!(
        devices["devices"].as_array().map_or(0, Vec::len),
        2,
        "{devices}"
    );
}

#[test]
fn a_device_cannot_leave_a_last_will_in_another_devices_name_through_the_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let c = Controller::start(&data, 0);
    let agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::enroll_and_start(&c, dir.path(), &format!("wl-{i:02}"), "site=lab"))
        .collect();
    // Both on 2.0.0 with 1.0.0 in the other slot, so a forged revert would show.
    for bundle in [&bundles.v1, &bundles.v2] {
        let digest = push(&c, bundle);
        let id = start_rollout(&c, &digest, &["--waves", "100%", "--soak-s", "0"]);
        c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    }
    wait_versions(&c, &agents, "2.0.0");

    // wl-03 is enrolled (a real certificate) but runs no agent.
    let attacker = dir.path().join("wl-03");
    run_ok(
        &["devices", "enroll", "wl-03", "--out", s(&attacker)],
        &c.env(),
    );
    let [on_command, on_state] = forge_wills(&c, c.mqtt_port, &attacker, "wl-03", "wl-02");
    // The gate closed both connections at CONNECT and counted them.
    assert!(
        !on_command,
        "CONNECT with a will on wl-02's command topic was accepted"
    );
    assert!(
        !on_state,
        "CONNECT with a will on wl-02's state topic was accepted"
    );
    assert!(
        c.log().contains("wl-03's last will is refused"),
        "{}",
        c.log()
    );
    let metrics = c.metrics();
    let closed: Vec<String> = c
        .log()
        .lines()
        .filter(|l| l.contains("gate closed a connection"))
        .map(String::from)
        .collect();
    assert!(
        metrics.contains("edgefleet_gate_refused_total 2"),
        "{closed:#?}\n{metrics}"
    );
}

#[test]
fn a_devices_page_shows_its_latest_reports_also_after_its_counter_starts_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let c = Controller::start(&data, 0);
    let d = dir.path().join("ct-01");
    run_ok(&["devices", "enroll", "ct-01", "--out", s(&d)], &c.env());
    // One report numbered 10^9, then the device starts again (a reflash: a new
    // epoch, numbers from 1) and sends 130 more.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (client, eventloop) = device_client(&d, "ct-01", c.mqtt_port);
        let acks = count_acks(eventloop, 131);
        publish_telemetry(&client, "ct-01", 1, 1_000_000_000).await;
        for seq in 1..=130 {
            publish_telemetry(&client, "ct-01", 2, seq).await;
        }
        acks.await.expect("every report acknowledged");
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let seqs = telemetry_seqs(&c, "ct-01");
        // The page holds the latest 120 reports, oldest first: 11..=130, and
        // not the one numbered 10^9 (received first) nor the oldest of the hour.
        if seqs == (11..=130).collect::<Vec<u64>>() {
            break;
        }
        assert!(Instant::now() < deadline, "telemetry on the page: {seqs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_device_gets_chunks_only_of_a_bundle_it_was_told_to_install() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let c = Controller::start(&data, 0);
    let agent = Agent::enroll_and_start(&c, dir.path(), "fx-01", "site=lab");
    let v1 = push(&c, &bundles.v1);
    let v2 = push(&c, &bundles.v2);
    let id = start_rollout(&c, &v1, &["--waves", "100%", "--soak-s", "0"]);
    c.wait_rollout(&id, "completed", |r| r["phase"] == "completed");
    wait_versions(&c, std::slice::from_ref(&agent), "1.0.0");
    let metric = |c: &Controller, name: &str| -> f64 {
        let text = c.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let sent_before = metric(&c, "edgefleet_chunk_bytes_sent_total");

    // An enrolled device with no agent asks, ten times, for every chunk of v1
    // (never offered to it) and of v2 (offered to nobody).
    let d = dir.path().join("fx-02");
    run_ok(&["devices", "enroll", "fx-02", "--out", s(&d)], &c.env());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (client, eventloop) = device_client(&d, "fx-02", c.mqtt_port);
        let acks = count_acks(eventloop, 20);
        let topic = edgefleet_shared::protocol::Topics::default().device(
            &edgefleet_shared::DeviceId::new("fx-02").expect("id"),
            edgefleet_shared::protocol::DeviceTopic::Fetch,
        );
        for digest in [&v1, &v2] {
            let request = edgefleet_shared::protocol::FetchRequest {
                bundle: digest.parse::<edgefleet_shared::Digest>().expect("digest"),
                ranges: vec![edgefleet_shared::protocol::ChunkRange {
                    start: 0,
                    count: 1024,
                }],
            };
            for _ in 0..10 {
                client
                    .publish(
                        topic.clone(),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        edgefleet_shared::protocol::encode(&request),
                    )
                    .await
                    .expect("queued");
            }
        }
        acks.await.expect("every request acknowledged");
    });
    // Each request is refused in the same step that would have queued its
    // chunks: once all 20 are counted, none was queued.
    let deadline = Instant::now() + WAIT;
    while metric(
        &c,
        "edgefleet_chunk_requests_refused_total{reason=\"not_offered\"}",
    ) < 20.0
    {
        assert!(Instant::now() < deadline, "the refusals were not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        metric(&c, "edgefleet_chunk_bytes_sent_total"),
        sent_before,
        "chunks were published for a device that was never offered the bundle"
    );
}

#[test]
fn unfinished_uploads_left_by_a_killed_controller_are_removed_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let mut c = Controller::start(&data, 0);
    let kept = push(&c, &bundles.v1);
    // What tempfile leaves in bundles/ when the process dies mid-upload.
    let leftover = data.join("bundles").join(".upload-Xy12ab");
    std::fs::write(&leftover, vec![7u8; 1 << 20]).expect("leftover");
    c.kill();
    let c = Controller::start(&data, 0);
    assert!(!leftover.exists(), "the unfinished upload is still there");
    // Stored bundles are kept.
    let v = c.get(&format!("/api/v1/bundles/{kept}"));
    assert_eq!(v["digest"], kept.as_str(), "{v}");
    assert!(data.join("bundles").join(format!("{kept}.efb")).exists());
}

/// `attacker` (the enrollment files of a device that runs no agent) connects
/// with a will in `victim`'s name, then drops its TCP connection, which makes a
/// broker publish the will: a revert on the victim's command topic, then a
/// retained offline state at version 6.6.6-forged on its state topic. Asserts
/// that neither reached the victim or the controller, and returns whether each
/// CONNECT was accepted. The victim must run 2.0.0 with 1.0.0 in its other slot.
fn forge_wills(
    c: &Controller,
    port: u16,
    attacker: &Path,
    attacker_id: &str,
    victim: &str,
) -> [bool; 2] {
    use edgefleet_shared::protocol::{self, DeviceTopic};
    let topics = protocol::Topics::default();
    let id = |d: &str| edgefleet_shared::DeviceId::new(d).expect("id");
    // Signed with the device's own key (a key it holds): the agent refuses it
    // too, but this test is about what the broker lets through.
    let revert = edgefleet_shared::commands::sign_command(
        &edgefleet_shared::SecretKey::from_seed([6; 32]),
        &protocol::Command {
            id: 900_000,
            issued_at: edgefleet_shared::UnixTime::now(),
            device: id(victim),
            action: protocol::Action::Revert,
        },
    );
    let offline_state = |device: &str, version: &str| {
        protocol::encode(&protocol::DeviceState {
            device: id(device),
            at: edgefleet_shared::UnixTime::now(),
            online: false,
            agent_version: version.into(),
            arch: edgefleet_shared::Arch::current(),
            slots: vec![],
            last_install: None,
        })
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let connect_and_drop = |topic: String, payload: Vec<u8>| {
        rt.block_on(async {
            let (client, mut eventloop) = device_client(attacker, attacker_id, port);
            eventloop.mqtt_options.set_last_will(rumqttc::LastWill::new(
                topic,
                payload,
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
            let accepted = loop {
                match tokio::time::timeout(WAIT, eventloop.poll())
                    .await
                    .expect("the broker answers")
                {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                        break a.code == rumqttc::ConnectReturnCode::Success;
                    }
                    Ok(_) => {}
                    Err(_) => break false,
                }
            };
            // Dropped without DISCONNECT: a broker that holds the will sends it.
            drop((client, eventloop));
            accepted
        })
    };
    let on_command = connect_and_drop(topics.device(&id(victim), DeviceTopic::Commands), revert);
    let on_state = connect_and_drop(
        topics.device(&id(victim), DeviceTopic::State),
        offline_state(victim, "6.6.6-forged"),
    );
    // The attacker's own will still works: once it has arrived, the broker has
    // published any will it held from the earlier connections.
    let marker = connect_and_drop(
        topics.device(&id(attacker_id), DeviceTopic::State),
        offline_state(attacker_id, "0.0.1-marker"),
    );
    assert!(marker, "a device's own offline state was refused as a will");
    let deadline = Instant::now() + WAIT;
    while c.device(attacker_id)["device"]["agent_version"] != "0.0.1-marker" {
        assert!(Instant::now() < deadline, "the marker will never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two more telemetry samples from the victim after the marker: time for a
    // forged revert to have been carried out and reported.
    let seq = || telemetry_seqs(c, victim).into_iter().max().unwrap_or(0);
    let before = seq();
    let deadline = Instant::now() + WAIT;
    while seq() < before + 2 {
        assert!(Instant::now() < deadline, "{victim} stopped reporting");
        std::thread::sleep(Duration::from_millis(50));
    }
    let d = c.device(victim)["device"].clone();
    assert_eq!(d["online"], true, "forged offline state: {d}");
    assert_ne!(d["agent_version"], "6.6.6-forged", "{d}");
    assert_eq!(d["active_version"], "2.0.0", "a forged revert ran: {d}");
    [on_command, on_state]
}

/// An MQTT client with the certificate of the device whose enrollment files are in
/// `dir` (to forge messages from a real identity).
fn device_client(
    dir: &Path,
    client_id: &str,
    port: u16,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = edgefleet_agent::link::tls_config(
        &dir.join("ca.pem"),
        &dir.join("device.pem"),
        &dir.join("device.key"),
    )
    .expect("tls");
    let mut o = rumqttc::MqttOptions::new(client_id, "localhost", port);
    o.set_transport(rumqttc::Transport::tls_with_config(tls.into()));
    o.set_max_packet_size(1 << 20, 1 << 20);
    rumqttc::AsyncClient::new(o, 10)
}

/// Polls `eventloop` in a task until it has seen `n` PUBACKs (the broker took
/// every message), failing if the gate goes quiet or closes the connection.
fn count_acks(mut eventloop: rumqttc::EventLoop, n: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                tokio::time::timeout(WAIT, eventloop.poll())
                    .await
                    .expect("the gate answers")
                    .expect("connected")
            {
                acked += 1;
            }
        }
    })
}

/// Publishes an empty telemetry sample of `device` with `epoch` and `seq` on
/// `device`'s topic.
async fn publish_telemetry(client: &rumqttc::AsyncClient, device: &str, epoch: u64, seq: u64) {
    let t = edgefleet_shared::protocol::Telemetry {
        device: edgefleet_shared::DeviceId::new(device).expect("id"),
        epoch,
        seq,
        at: edgefleet_shared::UnixTime::now(),
        device_metrics: Default::default(),
        agent: Default::default(),
        model: None,
        drift: None,
        shadow: None,
        channels: Vec::new(),
    };
    let topic = edgefleet_shared::protocol::Topics::default().device(
        &t.device,
        edgefleet_shared::protocol::DeviceTopic::Telemetry,
    );
    client
        .publish(
            topic,
            rumqttc::QoS::AtLeastOnce,
            false,
            edgefleet_shared::protocol::encode(&t),
        )
        .await
        .expect("queued");
}

/// Sequence numbers of the telemetry the controller stored for `device`.
fn telemetry_seqs(c: &Controller, device: &str) -> Vec<u64> {
    c.device(device)["telemetry"]
        .as_array()
        .expect("telemetry")
        .iter()
        .filter_map(|t| t["seq"].as_u64())
        .collect()
}

/// A NATS cluster can be prepared before the controller's first start: no
/// store yet means no device users yet, and the command makes no store.
#[test]
fn a_nats_cluster_is_prepared_before_the_controller_ever_ran() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let out = dir.path().join("nats");
    let said = run_ok(
        &["broker", "nats", "--data-dir", s(&data), "--out", s(&out)],
        &[],
    );
    assert!(
        said.contains("the controller and 0 enrolled devices"),
        "{said}"
    );
    let users = std::fs::read_to_string(out.join("devices.conf")).expect("devices.conf");
    assert!(!users.contains("CN=dev"), "{users}");
    for node in [
        "n1.conf",
        "n2.conf",
        "n3.conf",
        "controller-mqtt.toml",
        "ca.pem",
    ] {
        assert!(out.join(node).is_file(), "{node} written");
    }
    assert!(
        !data.join("controller.db").exists(),
        "preparing the broker made no store"
    );
}
