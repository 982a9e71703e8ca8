//! Load devices (`devices/src/load.rs`): protocol-level devices, each with its
//! own enrolled certificate through the controller's gate, come online, report
//! telemetry, and take a staged rollout, downloading every chunk and checking it
//! against the signed table; the controller sends each wave's chunks about once,
//! not once per device.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgefleet_shared::Digest;
use edgefleet_tests::{BundleSpec, Harness, wait_for};

const DEVICES: usize = 200;

#[test]
fn two_hundred_load_devices_come_online_report_and_take_a_staged_rollout() {
    let h = Harness::start(|_| {});
    let started = Instant::now();
    let (fleet, _ids) = h.load_fleet(DEVICES, Duration::from_secs(1));
    wait_for("every load device online", || {
        (h.online() == DEVICES).then_some(())
    });
    let online_after = started.elapsed();
    // Telemetry from every device reaches the store.
    wait_for("two reports per device stored", || {
        (h.metric("edgefleet_telemetry_stored_total") >= 2 * DEVICES as u64).then_some(())
    });

    let digest_hex = h.roll_out_to_all(
        &BundleSpec::new("digits_cnn.onnx", (1, 0, 0), 1),
        &["1", "1%", "10%", "100%"],
    );
    let digest: Digest = digest_hex.parse().expect("digest");
    let payload = std::fs::metadata(h.stored_bundle(&digest_hex))
        .expect("bundle file")
        .len();
    let serving = fleet.serving();
    assert_eq!(serving.get(&digest), Some(&DEVICES), "{serving:?}");
    let stats = fleet.stats();
    assert_eq!(stats.installs.load(Ordering::Relaxed), DEVICES as u64);
    assert_eq!(stats.chunks_rejected.load(Ordering::Relaxed), 0);
    assert_eq!(stats.commands_refused.load(Ordering::Relaxed), 0);
    // Devices of one wave share the chunk topic and listen before they ask, as
    // agents do: a few copies of the bundle for the 4 waves, not one per device
    // (measured 4.9-8.9 copies for 200 devices; docs/scale.md).
    let sent = h.metric("edgefleet_chunk_bytes_sent_total");
    assert!(
        sent <= 16 * payload,
        "{sent} chunk bytes for {DEVICES} devices of a {payload}-byte bundle"
    );
    println!(
        "{DEVICES} load devices online in {:.1} s; rollout of {payload} bytes in 4 waves: {sent} chunk bytes sent ({:.1} copies)",
        online_after.as_secs_f64(),
        sent as f64 / payload as f64
    );
    h.runtime.block_on(fleet.stop());
}

/// What an operator types: `edgefleet devices enroll --count N` writes one
/// enrollment per device, `edgefleet devices load --dir` runs them in their
/// own process; they come online, take a rollout, and stop on SIGTERM.
#[test]
fn the_cli_enrolls_a_batch_and_runs_it_as_load_devices_in_its_own_process() {
    const N: usize = 30;
    let h = Harness::start(|_| {});
    let token = std::fs::read_to_string(h.data.join("admin-token")).expect("admin token");
    let dir = h.dir().join("cli-load");
    let out = std::process::Command::new(edgefleet_tests::edgefleet_bin())
        .args([
            "devices",
            "enroll",
            "--count",
            &N.to_string(),
            "--prefix",
            "cli-",
        ])
        .arg("--out")
        .arg(&dir)
        .args(["--controller", &h.url, "--token", token.trim()])
        .output()
        .expect("edgefleet runs");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&format!("enrolled {N} devices")), "{said}");
    assert!(dir.join("cli-00007/device.key").is_file());
    // A second batch with a clash in it changes nothing: the whole call is refused.
    let csv = h.dir().join("more.csv");
    std::fs::write(&csv, "id,tags\nextra-1,\"site=north,floor=2\"\nextra-1,\n").expect("csv");
    let out = std::process::Command::new(edgefleet_tests::edgefleet_bin())
        .args(["devices", "enroll", "--csv"])
        .arg(&csv)
        .arg("--out")
        .arg(h.dir().join("more"))
        .args(["--controller", &h.url, "--token", token.trim()])
        .output()
        .expect("edgefleet runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("appears twice"),
        "{err}"
    );

    let mut child = std::process::Command::new(edgefleet_tests::edgefleet_bin())
        .args([
            "devices",
            "load",
            "--telemetry-s",
            "1",
            "--seconds",
            "300",
            "--dir",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("devices load starts");
    wait_for("every CLI load device online", || {
        (h.online() == N).then_some(())
    });
    h.roll_out_to_all(
        &BundleSpec::new("digits_cnn.onnx", (1, 0, 0), 1),
        &["10%", "100%"],
    );
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut said)
        .expect("output");
    let status = child.wait().expect("exits");
    assert!(status.success(), "{status}: {said}");
    assert!(
        said.contains(&format!("{N} load devices connecting")),
        "{said}"
    );
    assert!(said.contains("not real agents"), "{said}");
    assert!(
        said.contains(&format!("stopping: connects {N},"))
            && said.contains(&format!("installs {N},")),
        "{said}"
    );
}

/// The same fleet through Debian's Mosquitto (its own process, mutual TLS with
/// the controller's CA, the per-device ACL of `edgefleet broker mosquitto`):
/// the controller holds one connection to it, the devices one each. This is
/// the setup docs/scale.md measures past the embedded broker's limits.
#[test]
fn load_devices_take_a_rollout_through_mosquitto() {
    const N: usize = 100;
    let h = Harness::start_with(edgefleet_tests::TestBroker::Mosquitto, |_| {});
    assert!(
        !h.broker_pids().is_empty(),
        "Mosquitto runs in its own process"
    );
    rollout_to_every_load_device(&h, N, &["1", "100%"]);
}

/// Starts `n` load devices, waits until each is online and has reported
/// twice, rolls the CNN out to all in `waves`, and checks each installed it
/// once with nothing refused.
fn rollout_to_every_load_device(h: &Harness, n: usize, waves: &[&str]) {
    let (fleet, _ids) = h.load_fleet(n, Duration::from_secs(1));
    wait_for("every load device online", || {
        (h.online() == n).then_some(())
    });
    wait_for("two reports per device stored", || {
        (h.metric("edgefleet_telemetry_stored_total") >= 2 * n as u64).then_some(())
    });
    let digest: Digest = h
        .roll_out_to_all(&BundleSpec::new("digits_cnn.onnx", (1, 0, 0), 1), waves)
        .parse()
        .expect("digest");
    assert_eq!(fleet.serving().get(&digest), Some(&n));
    let stats = fleet.stats();
    assert_eq!(stats.installs.load(Ordering::Relaxed), n as u64);
    assert_eq!(stats.chunks_rejected.load(Ordering::Relaxed), 0);
    assert_eq!(stats.commands_refused.load(Ordering::Relaxed), 0);
    h.runtime.block_on(fleet.stop());
}

#[test]
fn load_devices_take_a_rollout_with_the_store_on_postgres() {
    const N: usize = 100;
    let url = edgefleet::server::db::testing::shared()
        .create_database()
        .expect("test database");
    let h = Harness::start(|c| {
        c.database = Some(edgefleet::server::config::DatabaseSetting::Location(url));
    });
    rollout_to_every_load_device(&h, N, &["1", "10%", "100%"]);
}
