//! Fleet benchmarks (`cargo bench -p edgefleet-tests --bench fleet`):
//!
//! 1. Bundle bytes the controller publishes per wave of a rollout, against the
//!    bundle's size times the wave's devices (what one copy per device would
//!    cost), with the controller's chunk coalescing (default 25 ms wait) and,
//!    as the baseline in the same run, without the wait (0 ms).
//! 2. `edgefleet demo` wall time (median of 3), against the time its gates make
//!    it wait by design (4 soaks of 3 s and 3 s offline).
//!
//! Arguments: `--devices N` (default 40), `--rollouts N` per mode (default 3),
//! `--demo-runs N` (default 3, 0 skips).

use std::time::{Duration, Instant};

use edgefleet_devices::sim::FaultPlan;
use edgefleet_tests::{BundleSpec, Harness};
use serde_json::json;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Wave {
    devices: u64,
    bytes: u64,
}

/// Rolls bundles (releases 1..=runs) out to `devices` in waves 1, 10%, 50%,
/// 100%, one after the other; for each, the chunk bytes the controller published
/// during each wave.
fn rollout_bytes(devices: usize, coalesce_ms: u64, runs: u64) -> (u64, Vec<Vec<Wave>>, Duration) {
    let h = Harness::start(|c| c.rollouts.chunk_coalesce_ms = coalesce_ms);
    let fleet = h.fleet(
        (0..devices)
            .map(|i| h.device(&format!("b{i:03}"), FaultPlan::default()))
            .collect(),
    );
    let mut payload = 0;
    let mut all = Vec::new();
    let mut took = Duration::ZERO;
    for release in 1..=runs {
        let file = h.build(&BundleSpec::new(
            "digits_cnn.onnx",
            (release, 0, 0),
            release,
        ));
        payload = edgefleet_tests::payload_size(&file);
        let digest = h.upload(&file);
        let started = Instant::now();
        let id = h.rollout(&json!({
            "bundle": digest,
            "selector": {"all": true},
            "waves": ["1", "10%", "50%", "100%"],
            "gates": {"soak_ms": 300},
            "rate_per_minute": 100_000,
        }));
        let mut bytes: Vec<u64> = vec![0; 4];
        let mut last = h.metric("edgefleet_chunk_bytes_sent_total");
        let mut sizes = vec![0u64; 4];
        loop {
            let r = h.rollout_view(&id);
            let now = h.metric("edgefleet_chunk_bytes_sent_total");
            let wave = r["wave"].as_u64().unwrap_or(1).clamp(1, 4) as usize - 1;
            bytes[wave] += now - last;
            last = now;
            for (i, w) in r["waves"].as_array().into_iter().flatten().enumerate() {
                sizes[i] = w["devices"].as_u64().unwrap_or(0);
            }
            match r["phase"].as_str().unwrap_or("") {
                "completed" => break,
                "halted" | "paused" | "aborted" => panic!("rollout stopped: {r}"),
                _ => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "rollout too slow"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        took += started.elapsed();
        all.push(
            sizes
                .into_iter()
                .zip(bytes)
                .map(|(devices, bytes)| Wave { devices, bytes })
                .collect(),
        );
    }
    h.runtime.block_on(fleet.stop());
    (payload, all, took / runs as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; anything else is ours.
    let devices = arg("--devices", 40);
    let demo_runs = arg("--demo-runs", 3);
    let rollouts = arg("--rollouts", 3).max(1);
    let mut report = Vec::new();
    for (label, coalesce) in [("coalesced (25 ms)", 25), ("baseline (0 ms)", 0)] {
        let (payload, runs, took) = rollout_bytes(devices, coalesce, rollouts as u64);
        report.push(format!(
            "\nchunk bytes per wave, {devices} devices, bundle payload {payload} bytes, {label}, median of {rollouts} rollouts ({:.1} s each)",
            took.as_secs_f64()
        ));
        report.push(format!(
            "  {:<5} {:>7} {:>12} {:>16} {:>8}  {}",
            "wave", "devices", "bytes sent", "payload x devs", "copies", "copies in each run"
        ));
        let mut total = (0.0, 0);
        for w in 0..4 {
            let copies: Vec<f64> = runs
                .iter()
                .map(|r| r[w].bytes as f64 / payload as f64)
                .collect();
            let bytes = median(runs.iter().map(|r| r[w].bytes as f64).collect());
            let n = runs[0][w].devices;
            total.0 += bytes;
            total.1 += n * payload;
            report.push(format!(
                "  {:<5} {:>7} {:>12} {:>16} {:>8.2}  {}",
                w + 1,
                n,
                bytes,
                n * payload,
                bytes / payload as f64,
                copies
                    .iter()
                    .map(|c| format!("{c:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        report.push(format!(
            "  total {:>7} {:>12} {:>16} {:>8.2}",
            devices,
            total.0,
            total.1,
            total.0 / payload as f64
        ));
    }
    if demo_runs > 0 {
        let mut times = Vec::new();
        for _ in 0..demo_runs {
            let started = Instant::now();
            let code = edgefleet::ops::demo::run(&edgefleet::ops::demo::DemoOptions {
                dir: None,
                devices: 20,
                keep_running: false,
            })
            .expect("demo runs");
            assert_eq!(code, 0, "the demo failed");
            times.push(started.elapsed().as_secs_f64());
        }
        report.push(format!(
            "\nedgefleet demo (20 devices) wall time: median {:.1} s of {demo_runs} ({}); waits by design (4 soaks of 3 s + 3 s offline): 15.0 s",
            median(times.clone()),
            times
                .iter()
                .map(|t| format!("{t:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    println!("{}", report.join("\n"));
}
