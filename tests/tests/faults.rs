//! Faults during rollouts, end to end: a real controller with its embedded
//! broker (mutual TLS through the gate), simulated devices that are real agents
//! with their own identities, connections and data directories, real bundles.
//! Each fault comes with what must still be true.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgefleet_devices::sim::FaultPlan;
use edgefleet_shared::RawHeader;
use edgefleet_tests::{BundleSpec, Harness, wait_for};
use serde_json::{Value, json};

fn member<'a>(r: &'a Value, device: &str) -> &'a Value {
    &r["members"][device]
}

/// The reason a member failed, as the API shows it.
fn failure(r: &Value, device: &str) -> String {
    let m = member(r, device);
    assert_eq!(m["state"], "failed", "{device}: {m}");
    m["reason"].as_str().unwrap_or("").to_owned()
}

/// Chunks in a bundle file's payload table.
fn chunks_of(file: &std::path::Path) -> u64 {
    let mut f = std::fs::File::open(file).expect("bundle");
    let raw = RawHeader::read_from(&mut f).expect("header");
    raw.decode_unverified()
        .expect("manifest")
        .payload
        .chunks
        .len() as u64
}

#[test]
fn disconnects_crashes_slow_links_and_failing_health_checks_each_end_as_they_must() {
    let h = Harness::start(|_| {});
    let fleet = h.fleet(vec![
        h.device(
            "cut",
            FaultPlan {
                disconnect_after_chunks: Some(8),
                ..FaultPlan::default()
            },
        ),
        h.device(
            "crash",
            FaultPlan {
                crash_at: Some("after-unpack".into()),
                ..FaultPlan::default()
            },
        ),
        h.device(
            "slow",
            FaultPlan {
                slow_link: Some(Duration::from_millis(20)),
                ..FaultPlan::default()
            },
        ),
        h.device(
            "sick",
            FaultPlan {
                fail_health: true,
                ..FaultPlan::default()
            },
        ),
        h.device("plain", FaultPlan::default()),
    ]);
    // The random forest (157 kB) in 4 KiB chunks: about 40 chunks, enough to
    // cut a download in the middle.
    let file = h.build(&BundleSpec::new("forest_cancer.onnx", (1, 0, 0), 1));
    let total_chunks = chunks_of(&file);
    assert!(total_chunks >= 30, "{total_chunks} chunks");
    let digest = h.upload(&file);
    let id = h.rollout(&json!({
        "bundle": digest,
        "selector": {"all": true},
        "waves": ["100%"],
        "gates": {"min_success_ratio": 0.5, "max_failure_ratio": 0.5, "soak_ms": 500},
    }));
    let r = h.wait_phase(&id, &["completed", "halted", "paused", "aborted"]);
    assert_eq!(r["phase"], "completed", "{r}");

    // Cut mid-download: reconnected, resumed from the first missing chunk, installed.
    let cut = fleet.device("cut").expect("cut");
    assert_eq!(member(&r, "cut")["state"], "succeeded", "{r}");
    assert_eq!(cut.stats().dropped.load(Ordering::Relaxed), 1);
    assert!(cut.stats().connects.load(Ordering::Relaxed) >= 2);
    let received = cut.stats().chunk_messages.load(Ordering::Relaxed);
    let resent = received.saturating_sub(total_chunks);
    // At most one fetch window (16 chunks) was in flight when the link dropped.
    assert!(
        resent <= 16,
        "{received} chunk messages for {total_chunks} chunks: {resent} re-sent"
    );
    assert_eq!(
        cut.serving().map(|b| b.version.to_string()),
        Some("1.0.0".into())
    );

    // Crash after unpacking: back up on a whole model, and the install finished.
    let crash = fleet.device("crash").expect("crash");
    assert_eq!(crash.stats().crashes.load(Ordering::Relaxed), 1);
    assert_eq!(member(&r, "crash")["state"], "succeeded", "{r}");
    assert_eq!(
        crash
            .state()
            .active_bundles()
            .map(|b| b.release)
            .collect::<Vec<_>>(),
        vec![1]
    );

    // A slow link only takes longer.
    assert_eq!(member(&r, "slow")["state"], "succeeded", "{r}");

    // A failing health check: refused with the reason, nothing activated.
    let reason = failure(&r, "sick");
    assert!(reason.contains("health_check"), "{reason}");
    let sick = fleet.device("sick").expect("sick");
    assert!(sick.serving().is_none());
    assert_eq!(sick.state().active_bundles().count(), 0);
    let detail = h.api.get("/api/v1/devices/sick").expect("device");
    assert!(
        detail["state"]["last_install"]
            .to_string()
            .contains("health_check"),
        "{detail}"
    );

    assert_eq!(member(&r, "plain")["state"], "succeeded", "{r}");
    h.runtime.block_on(fleet.stop());
}

#[test]
fn bundles_a_device_must_refuse_are_refused_with_the_reason_visible_in_the_api() {
    let h = Harness::start(|_| {});
    // A device still pinning an older trust root (only alice's key).
    let old_root = h.dir().join("old-root.cbor");
    let root = edgefleet::ops::operator::new_trust_root(
        &[edgefleet::ops::operator::KeyFile::Public(
            h.keys[0].public(),
        )],
        1,
        1,
        edgefleet_shared::UnixTime::now().plus_days(365),
        &h.keys[..1],
    )
    .expect("old root");
    edgefleet::ops::operator::save_trust_root(&old_root, &root).expect("save");
    let mut unrotated = h.device("unrotated", FaultPlan::default());
    unrotated.trust_root = Some(old_root);
    // A device whose clock is 100 days ahead: every command looks 100 days old
    // to it, so it refuses the install as stale before it gets to the bundle's
    // expiry (90 days; expiry itself: shared/tests/attacks.rs).
    let late = h.device(
        "late",
        FaultPlan {
            clock_skew_s: 100 * 86_400,
            ..FaultPlan::default()
        },
    );
    // "ahead" already runs release 5 (sideloaded before it starts).
    let v5 = h.build(&BundleSpec::new("iris_logreg.onnx", (5, 0, 0), 5));
    let ahead = h.device("ahead", FaultPlan::default());
    let store = edgefleet_agent::store::Store::open(h.dir().join("devices/ahead")).expect("store");
    let now = edgefleet_shared::UnixTime::now();
    let trust = edgefleet::ops::operator::load_trust_root(&h.trust_root, now).expect("trust");
    edgefleet_agent::store::install_file(
        &store,
        &trust,
        &ahead.profile.facts(),
        &v5,
        edgefleet_shared::protocol::InstallMode::Activate,
        now,
    )
    .expect("sideload v5");
    let fleet = h.fleet(vec![
        unrotated,
        late,
        ahead,
        h.device("tampered", FaultPlan::default()),
    ]);
    let ahead = fleet.device("ahead").expect("ahead");
    assert_eq!(ahead.serving().map(|b| b.release), Some(5));

    // Release 2, signed by bob: the controller trusts bob, "unrotated" does not.
    let v2 = h.build(&BundleSpec {
        signer: 1,
        ..BundleSpec::new("iris_logreg.onnx", (2, 0, 0), 2)
    });
    let digest = h.upload(&v2);
    let id = h.rollout(&json!({
        "bundle": digest,
        "selector": {"devices": ["unrotated", "late", "ahead"]},
        "waves": ["100%"],
        "gates": {"min_success_ratio": 0.0, "max_failure_ratio": 1.0, "soak_ms": 0},
    }));
    let r = h.wait_phase(&id, &["completed", "halted", "paused"]);
    let reason = failure(&r, "unrotated");
    assert!(reason.contains("unknown_key"), "{reason}");
    let reason = failure(&r, "late");
    assert!(reason.starts_with("command_rejected: stale: "), "{reason}");
    let reason = failure(&r, "ahead");
    assert!(reason.contains("rollback"), "{reason}");
    assert_eq!(ahead.serving().map(|b| b.release), Some(5), "still on 5");

    // A bundle altered on the controller's disk after upload: every copy of the
    // chunk fails its digest on the device, which gives up with the reason.
    let v3 = h.build(&BundleSpec::new("digits_cnn.onnx", (3, 0, 0), 3));
    let digest = h.upload(&v3);
    let stored = h.stored_bundle(&digest);
    let header_len = {
        let mut f = std::fs::File::open(&stored).expect("stored");
        RawHeader::read_from(&mut f)
            .expect("header")
            .to_bytes()
            .len() as u64
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&stored)
        .expect("open stored bundle");
    f.write_all_at(b"tampered", header_len + 5_000)
        .expect("tamper");
    let id = h.rollout(&json!({
        "bundle": digest,
        "selector": {"devices": ["tampered"]},
        "waves": ["100%"],
    }));
    let r = h.wait_phase(&id, &["halted", "paused", "completed"]);
    let reason = failure(&r, "tampered");
    assert!(reason.contains("chunk_digest_mismatch"), "{reason}");
    let tampered = fleet.device("tampered").expect("tampered");
    assert!(tampered.serving().is_none());
    // The device's own record says the same.
    wait_for("the failure in the device's state", || {
        let d = h.api.get("/api/v1/devices/tampered").ok()?;
        d["state"]["last_install"]
            .to_string()
            .contains("chunk_digest_mismatch")
            .then_some(())
    });
    h.runtime.block_on(fleet.stop());
}

#[test]
fn with_the_network_down_devices_keep_serving_and_deliver_their_telemetry_without_a_gap() {
    let h = Harness::start(|_| {});
    let ids = ["n1", "n2", "n3"];
    let fleet = h.fleet(
        ids.iter()
            .map(|id| h.device(id, FaultPlan::default()))
            .collect(),
    );
    let digest = h.upload(&h.build(&BundleSpec::new("iris_logreg.onnx", (1, 0, 0), 1)));
    let id = h.rollout(&json!({
        "bundle": digest,
        "selector": {"all": true},
        "waves": ["100%"],
        "gates": {"soak_ms": 0},
    }));
    assert_eq!(
        h.wait_phase(&id, &["completed", "halted"])["phase"],
        "completed"
    );
    let seqs = |device: &str| -> Vec<u64> {
        h.api
            .get(&format!("/api/v1/devices/{device}"))
            .expect("device")["telemetry"]
            .as_array()
            .expect("telemetry")
            .iter()
            .filter_map(|t| t["seq"].as_u64())
            .collect()
    };
    let before: Vec<u64> = ids
        .iter()
        .map(|d| seqs(d).into_iter().max().unwrap_or(0))
        .collect();

    fleet.set_network(false);
    for d in ids {
        wait_for(&format!("{d} offline"), || {
            let v = h.api.get(&format!("/api/v1/devices/{d}")).ok()?;
            (v["device"]["online"] == Value::Bool(false)).then_some(())
        });
    }
    // Offline for at least 3 telemetry periods, answering inference meanwhile.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let request = json!({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]});
    let offline_since = std::time::Instant::now();
    let mut answered = 0;
    while offline_since.elapsed() < Duration::from_secs(3) {
        for d in fleet.devices() {
            let r = agent
                .post(format!("{}/v2/models/model/infer", d.api_url()))
                .send_json(&request)
                .expect("local API answers");
            assert_eq!(r.status().as_u16(), 200, "{} offline", d.id());
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answered >= 30, "{answered} answers");

    fleet.set_network(true);
    for (d, before) in ids.iter().zip(before) {
        wait_for(&format!("{d}'s spooled telemetry"), || {
            let got = seqs(d);
            let newest = got.iter().copied().max()?;
            let whole = (before + 1..=newest).all(|s| got.contains(&s));
            (newest >= before + 3 && whole).then_some(())
        });
    }
    h.runtime.block_on(fleet.stop());
}

#[test]
fn a_revoked_device_loses_its_open_connection_at_once_and_cannot_come_back() {
    let h = Harness::start(|_| {});
    let fleet = h.fleet(vec![
        h.device("keep", FaultPlan::default()),
        h.device("stolen", FaultPlan::default()),
    ]);
    let online = |d: &str| {
        h.api.get(&format!("/api/v1/devices/{d}")).expect("device")["device"]["online"]
            == Value::Bool(true)
    };
    assert!(online("stolen"));
    h.api
        .post("/api/v1/devices/stolen/revoke", &json!({}))
        .expect("revoke");
    // Its broker connection is closed by the gate (the broker then publishes its
    // will), and its reconnections are refused.
    wait_for("the revoked device offline", || {
        (!online("stolen")).then_some(())
    });
    assert_eq!(h.metric("edgefleet_gate_revoked_total"), 1);
    let stolen = fleet.device("stolen").expect("device");
    let connects = stolen.stats().connects.load(Ordering::Relaxed);
    wait_for("a refused reconnection", || {
        (h.metric("edgefleet_gate_refused_total") >= 2).then_some(())
    });
    assert_eq!(
        stolen.stats().connects.load(Ordering::Relaxed),
        connects,
        "the revoked certificate got a connection again"
    );
    assert!(!online("stolen"));
    // The other device is untouched.
    assert!(online("keep"));
    assert_eq!(h.metric("edgefleet_gate_revoked_total"), 1);
    h.runtime.block_on(fleet.stop());
}

/// A device that hangs up while the broker is still answering its CONNECT (a
/// device giving up in a connect storm) can connect again, and so can every
/// other device. rumqttd 0.20 panicked on that device's next connection and
/// then on every connection after it (vendor/rumqttd/EDGEFLEET.md, change 3).
#[test]
fn a_device_that_hangs_up_before_its_connack_can_connect_again() {
    let h = Harness::start(|_| {});
    let ids = ["hang-1".to_owned(), "hang-2".to_owned()];
    let files = h.enroll_many(&ids, &h.dir().join("hang"));
    for _ in 0..3 {
        h.runtime
            .block_on(raw_connect(&files[0], "hang-1", h.broker, false));
    }
    for (f, id) in files.iter().zip(&ids) {
        let connack = h.runtime.block_on(raw_connect(f, id, h.broker, true));
        assert_eq!(
            connack,
            Some([0x20, 0x02, 0x00, 0x00]),
            "{id}: no CONNACK accepting the connection"
        );
    }
}

/// Connects as `id` with mutual TLS to the gate at `addr` and sends an MQTT
/// 3.1.1 CONNECT (clean session, no will). With `wait`, returns the broker's
/// first four bytes (a CONNACK); otherwise hangs up at once.
async fn raw_connect(
    files: &edgefleet_devices::sim::TlsFiles,
    id: &str,
    addr: std::net::SocketAddr,
    wait: bool,
) -> Option<[u8; 4]> {
    use rumqttc::tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = edgefleet_agent::link::tls_config(&files.ca, &files.cert, &files.key).expect("tls");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let mut s = TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS");
    let mut connect = vec![0x10, (12 + id.len()) as u8, 0, 4];
    connect.extend_from_slice(b"MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60, 0, id.len() as u8]);
    connect.extend_from_slice(id.as_bytes());
    s.write_all(&connect).await.expect("CONNECT");
    if !wait {
        let _ = s.shutdown().await;
        return None;
    }
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut connack))
        .await
        .ok()?
        .ok()?;
    Some(connack)
}
