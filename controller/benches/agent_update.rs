//! What an agent update costs a device (`cargo bench -p edgefleet --bench
//! agent_update`), with a real controller (`edgefleet serve`, embedded broker,
//! mutual TLS) and a device flashed with this build's agent running under a
//! supervisor that restarts like systemd:
//! 1. local API unavailability during a self-update: the longest time between
//!    two answered inferences (a client asking in a loop) while the device takes
//!    a release, median of `EF_BENCH_UPDATES` (default 10) updates, against the
//!    same figure over an equally long stretch without an update;
//! 2. bytes the controller sends the device for a release holding two
//!    architectures' binaries, against the release file's size and the
//!    device's own binary.
//!
//! Release builds (the agent is built with `--release` beside the bench).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::flashed::*;
use common::supervisor::{agent_release_file, stripped};
use common::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The controller's count of chunk bytes published so far.
fn chunk_bytes_sent(c: &Controller) -> u64 {
    c.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("edgefleet_chunk_bytes_sent_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The longest gap between answered inferences on `api` and the failed
/// requests while `during` runs.
fn probed<T>(api: &str, during: impl FnOnce() -> T) -> (T, Duration, u32) {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_inference(vec![api.to_string()], stop.clone());
    let out = during();
    stop.store(true, Ordering::Relaxed);
    let (failed, longest) = watcher.join().expect("watcher");
    (out, longest, failed)
}

fn main() {
    let updates: u64 = std::env::var("EF_BENCH_UPDATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("controller");
    let bundles = make_bundles(dir.path(), &data);
    let rel_key = release_root(dir.path(), &data);
    let c = Controller::start(&data, 0);
    let device = Flashed::start(&c, dir.path(), "dev-01");
    wait_online(&c, 1);
    let v1 = push(&c, &bundles.v1);
    let id = start_rollout(&c, &v1, &["--waves", "100%"]);
    c.wait_rollout(&id, "model rollout", |r| r["phase"] == "completed");

    let own = std::fs::read(stripped(&agent_bin())).expect("agent");
    let here = std::env::consts::ARCH;
    let other = if here == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    println!(
        "agent update: {updates} releases to one device (its binary {:.1} MB, stripped release build; the release also holds a {:.1} MB {other} binary)",
        own.len() as f64 / 1e6,
        own.len() as f64 / 1e6
    );
    let (mut gaps, mut idle_gaps, mut sent, mut took) = (vec![], vec![], vec![], vec![]);
    let mut file_size = 0;
    for i in 1..=updates {
        let version = format!("9.9.{i}");
        let next = edgefleet_agent::version::rewrite_version(&own, &version).expect("slot");
        let decoy = vec![0x5au8; own.len()];
        let file = agent_release_file(
            dir.path(),
            &[(other, decoy), (here, next)],
            &version,
            i,
            &rel_key,
        );
        file_size = std::fs::metadata(&file).expect("release").len();
        let digest = push(&c, &file);
        let before = chunk_bytes_sent(&c);
        let started = Instant::now();
        let (_, gap, failed) = probed(&device.api, || {
            let id = start_rollout(&c, &digest, &["--waves", "100%", "--soak-s", "1"]);
            let r = c.wait_rollout(&id, "finished", |r| {
                r["phase"] == "completed" || r["phase"] == "halted"
            });
            assert_eq!(r["phase"], "completed", "{r}");
        });
        let elapsed = started.elapsed();
        assert_eq!(agent_version(&c, &device.id), version);
        let bytes = chunk_bytes_sent(&c) - before;
        // The same stretch without an update: what the loop itself shows.
        let (_, idle, idle_failed) = probed(&device.api, || std::thread::sleep(elapsed));
        println!(
            "  update {i}: {:>7.1} ms longest gap ({failed} failed), idle {:>5.1} ms ({idle_failed} failed); {:.1} MB sent; rollout done in {:.1} s",
            gap.as_secs_f64() * 1e3,
            idle.as_secs_f64() * 1e3,
            bytes as f64 / 1e6,
            elapsed.as_secs_f64()
        );
        gaps.push(gap.as_secs_f64() * 1e3);
        idle_gaps.push(idle.as_secs_f64() * 1e3);
        sent.push(bytes as f64);
        took.push(elapsed.as_secs_f64());
    }
    let (gap, idle) = (median(gaps), median(idle_gaps));
    println!(
        "local API unavailable during a self-update: median {gap:.1} ms longest gap between answers vs {idle:.1} ms over as long without an update ({:.1} ms more)",
        gap - idle
    );
    let bytes = median(sent);
    println!(
        "bytes sent per device: median {:.1} MB vs the release file {:.1} MB ({:.2}x) and the device's binary {:.1} MB ({:.3}x)",
        bytes / 1e6,
        file_size as f64 / 1e6,
        bytes / file_size as f64,
        own.len() as f64 / 1e6,
        bytes / own.len() as f64
    );
    println!(
        "time from rollout start to the device counted as updated: median {:.1} s",
        median(took)
    );
    drop(device);
    drop(c);
}
