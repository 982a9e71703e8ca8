//! Controller benchmarks (`cargo bench -p edgefleet --bench controller`), each
//! printed with its baseline from the same run:
//! 1. telemetry into SQLite: batched (the controller's writer) vs one sample per
//!    transaction;
//! 2. telemetry end to end: enrolled MQTT publishers -> the embedded broker's gate
//!    (mutual TLS, topic checks) -> rumqttd -> ingest -> batched SQLite writes;
//! 3. API latency (p50/p99 of `GET /api/v1/devices/{id}`) idle vs while (2) runs.
//!
//! Medians of several runs; this machine has 2 cores and is noisy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use edgefleet::server::db::Db;
use edgefleet_shared::protocol::{
    self, AgentMetrics, DeviceMetrics, DeviceTopic, ModelMetrics, Telemetry, Topics,
};
use edgefleet_shared::{DeviceId, Digest, UnixTime};
use rumqttc::{AsyncClient, MqttOptions, QoS, Transport};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sample(device: usize, seq: u64) -> Telemetry {
    sample_of(&format!("dev-{device:05}"), seq)
}

fn sample_of(device: &str, seq: u64) -> Telemetry {
    Telemetry {
        device: DeviceId::new(device).expect("id"),
        epoch: 1,
        seq,
        at: UnixTime(1_800_000_000 + seq as i64),
        device_metrics: DeviceMetrics {
            cpu_percent: 12.5,
            mem_used: 300 << 20,
            mem_total: 1 << 30,
            disk_free: 10 << 30,
            disk_total: 32 << 30,
            temperature_c: Some(48.0),
            uptime_s: 86_400,
        },
        agent: AgentMetrics {
            rss_bytes: 9 << 20,
            version: "0.1.0".into(),
            spool_dropped: 0,
        },
        model: Some(ModelMetrics {
            digest: Digest::of(b"model"),
            inferences: seq * 10,
            errors: 0,
            latency_bounds_us: edgefleet_shared::protocol::LATENCY_BOUNDS_US.to_vec(),
            latency_counts: vec![seq; 17],
        }),
        drift: None,
        shadow: None,
        channels: Vec::new(),
    }
}

async fn sqlite_rates() -> (f64, f64) {
    let mut batched = Vec::new();
    let mut single = Vec::new();
    for run in 0..3 {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("c.db")).await.expect("db");
        // One sample per transaction: 2,000 samples.
        let t = Instant::now();
        for i in 0..2_000u64 {
            db.insert_telemetry(vec![(sample((i % 1000) as usize, 1_000 + i + run), 1)])
                .await
                .expect("insert");
        }
        single.push(2_000.0 / t.elapsed().as_secs_f64());
        // Batches of 1,000 (the writer's default): 50,000 samples.
        let t = Instant::now();
        for b in 0..50u64 {
            let batch = (0..1000u64)
                .map(|i| (sample(i as usize, 10_000 + b), 1))
                .collect();
            db.insert_telemetry(batch).await.expect("batch");
        }
        batched.push(50_000.0 / t.elapsed().as_secs_f64());
    }
    (median(batched), median(single))
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// Latencies (ms) of `GET /api/v1/devices/bench-0` until `stop` (at least `min` calls).
fn api_latencies(url: String, token: String, stop: Arc<AtomicBool>, min: usize) -> Vec<f64> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut out = Vec::new();
    while out.len() < min || !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = agent
            .get(format!("{url}/api/v1/devices/bench-0"))
            .header("Authorization", format!("Bearer {token}"))
            .call();
        if let Ok(mut r) = r {
            let _ = r.body_mut().read_to_vec();
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        if out.len() > 100_000 {
            break;
        }
    }
    out
}

fn stored(url: &str) -> u64 {
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let text = agent
        .get(format!("{url}/metrics"))
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("edgefleet_telemetry_stored_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

async fn end_to_end(messages: u64, publishers: usize) -> (f64, Vec<f64>, Vec<f64>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = edgefleet::server::config::ControllerConfig {
        data_dir: dir.path().join("ctl"),
        ..Default::default()
    };
    config.http.listen = "127.0.0.1:0".parse().expect("addr");
    config.mqtt.listen = "127.0.0.1:0".parse().expect("addr");
    let (started, server) = edgefleet::server::serve::start(config, std::future::pending())
        .await
        .expect("controller");
    tokio::spawn(server);
    let url = format!("http://{}", started.http);
    let token = std::fs::read_to_string(started.data_dir.join("admin-token"))
        .expect("token")
        .trim()
        .to_string();
    let port: u16 = started
        .broker_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");

    // Idle API baseline.
    let idle = {
        let (u, t) = (url.clone(), token.clone());
        tokio::task::spawn_blocking(move || {
            api_latencies(u, t, Arc::new(AtomicBool::new(true)), 300)
        })
        .await
        .expect("idle")
    };

    let topics = Topics::default();
    let mut clients = Vec::new();
    for p in 0..publishers {
        // Enrolled like any device: the gate admits only enrolled certificates, and
        // each publisher sends its own telemetry, as devices do.
        let name = format!("bench-{p}");
        let answer: serde_json::Value = ureq::Agent::config_builder()
            .build()
            .new_agent()
            .post(format!("{url}/api/v1/devices/{name}/enroll"))
            .header("Authorization", format!("Bearer {token}"))
            .send_json(serde_json::json!({}))
            .expect("enroll")
            .body_mut()
            .read_json()
            .expect("json");
        let out = dir.path().join(&name);
        edgefleet::ops::remote::write_enrollment(&answer, &out).expect("files");
        let tls = edgefleet_agent::link::tls_config(
            &out.join("ca.pem"),
            &out.join("device.pem"),
            &out.join("device.key"),
        )
        .expect("tls");
        let mut o = MqttOptions::new(format!("bench-{p}"), "localhost", port);
        o.set_transport(Transport::tls_with_config(tls.into()));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_inflight(200);
        let (client, mut eventloop) = AsyncClient::new(o, 1000);
        tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        clients.push(client);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (u, t, s) = (url.clone(), token.clone(), stop.clone());
        tokio::task::spawn_blocking(move || api_latencies(u, t, s, 50))
    };
    let start = Instant::now();
    let per = messages / publishers as u64;
    let mut tasks = Vec::new();
    for (p, client) in clients.into_iter().enumerate() {
        let topics = topics.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let t = sample_of(&format!("bench-{p}"), i + 1);
                let topic = topics.device(&t.device, DeviceTopic::Telemetry);
                client
                    .publish(topic, QoS::AtLeastOnce, false, protocol::encode(&t))
                    .await
                    .expect("publish");
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let want = per * publishers as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    let u2 = url.clone();
    while tokio::task::spawn_blocking({
        let u = u2.clone();
        move || stored(&u)
    })
    .await
    .unwrap_or(0)
        < want
    {
        assert!(Instant::now() < deadline, "ingest did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = want as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let busy = busy.await.expect("busy");
    (rate, idle, busy)
}

fn main() {
    // SAFETY: before any thread starts.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (batched, single) = sqlite_rates().await;
        println!(
            "telemetry into SQLite: batched {batched:.0} msg/s vs one per transaction {single:.0} msg/s ({:.0}x)",
            batched / single
        );
        let mut rates = Vec::new();
        let (mut idle_all, mut busy_all) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (rate, idle, busy) = end_to_end(40_000, 4).await;
            rates.push(rate);
            idle_all.extend(idle);
            busy_all.extend(busy);
        }
        println!(
            "telemetry end to end (4 enrolled TLS publishers -> gate -> embedded broker -> SQLite): median {:.0} msg/s (runs {:?}); target 20000",
            median(rates.clone()),
            rates.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
        println!(
            "API GET /api/v1/devices/{{id}}: idle p50 {:.2} ms p99 {:.2} ms ({} calls); while ingesting p50 {:.2} ms p99 {:.2} ms ({} calls)",
            percentile(&mut idle_all, 0.5),
            percentile(&mut idle_all, 0.99),
            idle_all.len(),
            percentile(&mut busy_all, 0.5),
            percentile(&mut busy_all, 0.99),
            busy_all.len()
        );
    });
}
