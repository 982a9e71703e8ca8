//! Dashboard page times with a large fleet in the store
//! (`cargo bench -p edgefleet --bench dashboard [-- DEVICES]`, default 10,000):
//! a controller on a SQLite store holding DEVICES enrolled devices with their
//! retained state and six telemetry samples each (a drifting tenth among them),
//! then each page fetched over loopback with a session cookie, beside the API's
//! device list page and device view in the same run (the baseline). Prints the
//! median and p95 of 20 fetches per page; the target is 100 ms.

use std::time::{Duration, Instant};

use edgefleet::server::config::ControllerConfig;
use edgefleet::server::db::{Audit, Db};
use edgefleet_shared::protocol::{
    AgentMetrics, BundleRef, DeviceMetrics, DeviceState, DriftReport, ModelMetrics, Slot, SlotRole,
    SlotState, Telemetry,
};
use edgefleet_shared::{Arch, DeviceId, Digest, UnixTime};

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn id(n: usize) -> DeviceId {
    DeviceId::new(&format!("dev-{n:05}")).expect("id")
}

fn state(n: usize, digest: Digest) -> DeviceState {
    DeviceState {
        device: id(n),
        at: UnixTime::now(),
        online: !n.is_multiple_of(10),
        agent_version: "0.1.0".into(),
        arch: Arch::current(),
        slots: vec![SlotState {
            slot: Slot::A,
            bundle: BundleRef {
                digest,
                channel: edgefleet_shared::ModelChannel::new("iris").expect("channel"),
                version: if n.is_multiple_of(3) {
                    "1.1.0"
                } else {
                    "1.0.0"
                }
                .into(),
                release: 1,
            },
            role: SlotRole::Active,
        }],
        last_install: None,
    }
}

fn telemetry(n: usize, seq: u64, digest: Digest) -> Telemetry {
    Telemetry {
        device: id(n),
        epoch: 1,
        seq,
        at: UnixTime::now(),
        device_metrics: DeviceMetrics {
            cpu_percent: 10.0 + (n % 50) as f32,
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
            digest,
            inferences: seq * 100,
            errors: seq,
            latency_bounds_us: edgefleet_shared::protocol::LATENCY_BOUNDS_US.to_vec(),
            latency_counts: vec![seq * 6; 17],
        }),
        drift: n.is_multiple_of(10).then(|| DriftReport {
            digest,
            window: seq,
            started: UnixTime::now(),
            rows: 500,
            closed: true,
            inputs: Vec::new(),
            outputs: Vec::new(),
            drifted_share: 0.5,
            drifted: true,
        }),
        shadow: None,
        channels: Vec::new(),
    }
}

async fn fill(db: &Db, devices: usize) {
    let now = edgefleet_shared::time::now_ms();
    let digest = Digest::of(b"bench model");
    let audit = |n: usize| Audit {
        actor: "bench".into(),
        action: "device.enroll".into(),
        target: id(n).to_string(),
        before: None,
        after: None,
        at: now,
    };
    for chunk in (0..devices).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|&n| {
                let tags = [("site".to_owned(), format!("s{}", n % 20))]
                    .into_iter()
                    .collect();
                (id(n), tags, format!("{n:064x}"), audit(n))
            })
            .collect();
        db.enroll(batch, now).await.expect("enroll");
    }
    for n in 0..devices {
        db.device_state(&state(n, digest), now)
            .await
            .expect("state");
    }
    for seq in 1..=6u64 {
        let received = now - (6 - seq) * 60_000;
        for chunk in (0..devices).collect::<Vec<_>>().chunks(1000) {
            let batch = chunk
                .iter()
                .map(|&n| (telemetry(n, seq, digest), received))
                .collect();
            db.insert_telemetry(batch).await.expect("telemetry");
        }
    }
}

/// What the pages' store calls take alone (median of 5).
async fn breakdown(db: &Db) {
    let now = edgefleet_shared::time::now_ms();
    let mut times: Vec<(&str, Vec<f64>)> = Vec::new();
    for _ in 0..5 {
        let mut lap =
            |name: &'static str, t: Instant| match times.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(t.elapsed().as_secs_f64() * 1000.0),
                None => times.push((name, vec![t.elapsed().as_secs_f64() * 1000.0])),
            };
        let t = Instant::now();
        db.devices().await.expect("devices");
        lap(
            "devices() (the pages' only scan; drift kept with the device)",
            t,
        );
        let t = Instant::now();
        db.latest_telemetry_between(now - 3_600_000, now)
            .await
            .expect("latest");
        lap("latest_telemetry_between(1 h), no longer used", t);
        let t = Instant::now();
        db.events_of_kind("install_failed", 10)
            .await
            .expect("events");
        lap("events_of_kind", t);
        let t = Instant::now();
        db.revoked_devices().await.expect("revoked");
        lap("revoked_devices()", t);
    }
    for (name, mut v) in times {
        println!(
            "store call {name:<34} p50 {:>7.1} ms",
            percentile(&mut v, 0.5)
        );
    }
}

fn fetch(agent: &ureq::Agent, url: &str, header: (&str, &str), times: usize) -> (f64, f64) {
    let mut ms = Vec::with_capacity(times);
    for _ in 0..times {
        let t = Instant::now();
        let mut r = agent
            .get(url)
            .header(header.0, header.1)
            .call()
            .expect("get");
        assert_eq!(r.status(), 200, "{url}");
        let body = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .expect("body");
        assert!(!body.is_empty());
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (percentile(&mut ms, 0.5), percentile(&mut ms, 0.95))
}

fn main() {
    let devices: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("controller");
    std::fs::create_dir_all(&data).expect("data dir");
    let t = Instant::now();
    rt.block_on(async {
        let db = Db::open(&data.join("controller.db")).await.expect("store");
        fill(&db, devices).await;
        breakdown(&db).await;
    });
    println!(
        "store: {devices} devices, {} telemetry samples, filled in {:.1} s",
        devices * 6,
        t.elapsed().as_secs_f64()
    );
    let mut config = ControllerConfig {
        data_dir: data.clone(),
        ..ControllerConfig::default()
    };
    config.http.listen = ([127, 0, 0, 1], 0).into();
    config.mqtt.listen = ([127, 0, 0, 1], 0).into();
    let (started, server) = rt
        .block_on(edgefleet::server::serve::start(
            config,
            std::future::pending(),
        ))
        .expect("controller starts");
    rt.spawn(server);
    let url = format!("http://{}", started.http);
    let token = std::fs::read_to_string(data.join("admin-token")).expect("admin token");
    let token = token.trim();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let r = agent
        .post(format!("{url}/login"))
        .send_form([("token", token)])
        .expect("login");
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .expect("session cookie")
        .to_owned();
    let bearer = format!("Bearer {token}");
    let mid = format!("dev-{:05}", devices / 2);
    println!("{:<44} {:>10} {:>10}", "page", "p50 ms", "p95 ms");
    let pages = [
        ("/".to_owned(), true),
        ("/devices".to_owned(), true),
        ("/devices?state=online&drifted=yes&page=5".to_owned(), true),
        (format!("/devices/{mid}"), true),
        ("/rollouts".to_owned(), true),
        ("/bundles".to_owned(), true),
        ("/audit".to_owned(), true),
        ("/api/v1/devices".to_owned(), false),
        ("/api/v1/devices?limit=50".to_owned(), false),
        (format!("/api/v1/devices/{mid}"), false),
    ];
    for (path, page) in pages {
        let header = if page {
            ("cookie", cookie.as_str())
        } else {
            ("authorization", bearer.as_str())
        };
        fetch(&agent, &format!("{url}{path}"), header, 3);
        let (p50, p95) = fetch(&agent, &format!("{url}{path}"), header, 20);
        let what = if page {
            path.clone()
        } else {
            format!("{path} (API baseline)")
        };
        println!("{what:<44} {p50:>10.1} {p95:>10.1}");
    }
}
