//! The embedded broker's gate hands each device's connection to rumqttd in
//! process (vendor/rumqttd/EDGEFLEET.md): a device costs the controller one
//! file descriptor, its TLS connection, where a loopback relay to rumqttd cost
//! three. Under this container's hard limit of 20,000 descriptors that is the
//! difference between ~6,600 devices and 10,000 (docs/scale.md).
//!
//! Alone in its test binary: it counts its own process's descriptors, which
//! tests running beside it would change.

use edgefleet_tests::{Harness, wait_for};

const N: usize = 100;

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn a_device_costs_the_controller_one_file_descriptor() {
    let h = Harness::start(|_| {});
    let ids: Vec<String> = (0..N).map(|i| format!("fd-{i:03}")).collect();
    let dir = h.dir().join("load");
    h.enroll_many(&ids, &dir);
    // The controller, idle and enrolled: its listeners, store, broker link.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = open_descriptors();
    let mut devices = edgefleet_tests::spawn_load_process(&dir, 1, None, None);
    wait_for("every load device online", || {
        (h.online() == N).then_some(())
    });
    wait_for("two reports per device stored", || {
        (h.metric("edgefleet_telemetry_stored_total") >= 2 * N as u64).then_some(())
    });
    let online = open_descriptors();
    let _ = devices.kill();
    let _ = devices.wait();
    wait_for("every load device offline", || {
        (h.online() == 0).then_some(())
    });
    let after = open_descriptors();
    let per_device = (online - before) as f64 / N as f64;
    println!(
        "{N} devices online: {before} -> {online} descriptors ({per_device:.2} per device); {after} after they left"
    );
    assert!(
        online >= before + N && online <= before + N + N / 5,
        "{N} devices took {} descriptors, not about one each",
        online - before
    );
    assert!(
        after <= before + N / 10,
        "{after} descriptors after the devices left ({before} before)"
    );
}
