//! Fleet scale with load devices (`cargo bench -p edgefleet-tests --bench scale --
//! --devices 1000`; issue 23, docs/scale.md). One process holds the controller
//! (embedded broker behind its gate, SQLite) and N load devices
//! (`devices/src/load.rs`), each with its own certificate. Prints, for each N:
//! enrollment time, connect storm (start until the API shows every device
//! online), telemetry stored per second with every device reporting each 10 s,
//! API p50/p99 of the device list and of a device's page during that ingest,
//! the process RSS (controller, broker and devices together), and a rollout to
//! every device (waves 1, 1%, 10%, 100%, no soak): time until every device was
//! told to install, time to completion, and chunk bytes the controller
//! published per wave against one copy of the bundle.
//!
//! Arguments: `--devices N[,N...]` (default 1000), `--ingest-s S` (default 30).

use std::time::{Duration, Instant};

use edgefleet_tests::{BundleSpec, Harness, wait_for};
use serde_json::json;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn quantile_ms(mut v: Vec<Duration>, q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn run(n: usize, ingest_s: u64) {
    let h = Harness::start(|c| c.rollouts.tick_ms = 200);
    println!("\n{n} load devices (controller, broker and devices in this process)");
    let started = Instant::now();
    let (fleet, ids) = h.load_fleet(n, Duration::from_secs(10));
    // load_fleet enrolls then starts: the enrollment is most of its time.
    let enrolled = started.elapsed();
    let storm = Instant::now();
    wait_for("every load device online", || {
        (h.online() == n).then_some(())
    });
    println!(
        "  enroll {n} devices (API, one certificate each): {:.1} s; connect storm until all online: {:.1} s",
        enrolled.as_secs_f64(),
        storm.elapsed().as_secs_f64()
    );

    // Telemetry: every device reports each 10 s; API latency meanwhile.
    let before = h.metric("edgefleet_telemetry_stored_total");
    let t0 = Instant::now();
    let (mut list, mut page) = (Vec::new(), Vec::new());
    while t0.elapsed() < Duration::from_secs(ingest_s) {
        let t = Instant::now();
        h.api.get("/api/v1/devices").expect("device list");
        list.push(t.elapsed());
        let t = Instant::now();
        h.api
            .get(&format!("/api/v1/devices/{}", ids[list.len() % n]))
            .expect("device page");
        page.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let stored = h.metric("edgefleet_telemetry_stored_total") - before;
    println!(
        "  telemetry stored: {:.0}/s over {ingest_s} s (devices send {:.0}/s); API p50/p99: device list {:.1}/{:.1} ms, a device's page {:.1}/{:.1} ms ({} calls each)",
        stored as f64 / t0.elapsed().as_secs_f64(),
        n as f64 / 10.0,
        quantile_ms(list.clone(), 0.5),
        quantile_ms(list.clone(), 0.99),
        quantile_ms(page.clone(), 0.5),
        quantile_ms(page.clone(), 0.99),
        list.len()
    );
    println!("  process RSS: {:.0} MB", rss_mb());

    // A rollout to every device.
    let file = h.build(&BundleSpec::new("digits_cnn.onnx", (1, 0, 0), 1));
    let payload = edgefleet_tests::payload_size(&file);
    let digest = h.upload(&file);
    let t = Instant::now();
    let id = h.rollout(&json!({
        "bundle": digest,
        "selector": {"all": true},
        "waves": ["1", "1%", "10%", "100%"],
        "gates": {"soak_ms": 0},
        "rate_per_minute": 100_000,
    }));
    let (mut bytes, mut sizes) = (vec![0u64; 4], vec![0u64; 4]);
    let mut last = h.metric("edgefleet_chunk_bytes_sent_total");
    let mut notified = None;
    loop {
        let r = h.rollout_view(&id);
        let now = h.metric("edgefleet_chunk_bytes_sent_total");
        let wave = r["wave"].as_u64().unwrap_or(1).clamp(1, 4) as usize - 1;
        bytes[wave] += now - last;
        last = now;
        for (i, w) in r["waves"].as_array().into_iter().flatten().enumerate() {
            sizes[i] = w["devices"].as_u64().unwrap_or(0);
        }
        let pending = r["members"].as_object().map_or(0, |m| {
            m.values().filter(|v| v["state"] == "pending").count()
        });
        if notified.is_none() && wave == 3 && pending == 0 {
            notified = Some(t.elapsed());
        }
        match r["phase"].as_str().unwrap_or("") {
            "completed" => break,
            "halted" | "paused" | "aborted" => panic!("rollout stopped: {}", r["phase"]),
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(600), "rollout too slow");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t.elapsed();
    println!(
        "  rollout of a {payload}-byte bundle to {n}: every device told to install after {:.1} s, completed in {:.1} s; process RSS {:.0} MB",
        notified.unwrap_or(took).as_secs_f64(),
        took.as_secs_f64(),
        rss_mb()
    );
    for w in 0..4 {
        println!(
            "    wave {} ({:>5} devices): {:>9} chunk bytes = {:.2} copies",
            w + 1,
            sizes[w],
            bytes[w],
            bytes[w] as f64 / payload as f64
        );
    }
    h.runtime.block_on(fleet.stop());
}

fn main() {
    let sizes: Vec<usize> = arg("--devices")
        .unwrap_or_else(|| "1000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let ingest_s = arg("--ingest-s").and_then(|v| v.parse().ok()).unwrap_or(30);
    for n in sizes {
        run(n, ingest_s);
    }
}
