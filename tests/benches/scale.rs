//! Fleet scale with load devices (`cargo build --release -p edgefleet && cargo
//! bench -p edgefleet-tests --bench scale -- --devices 1000`; issue 23,
//! docs/scale.md). This process holds the controller (embedded broker behind
//! its gate, SQLite); N load devices (`devices/src/load.rs`), each with its own
//! certificate, run in a second process, `edgefleet devices load`, so that
//! each side's memory and CPU are its own. Prints, for each N: enrollment time
//! (batch API), connect storm (start until the API shows every device online),
//! telemetry stored per second with every device reporting each 10 s, API
//! p50/p99 of the device list and of a device's page during that ingest, RSS
//! and CPU of the controller (with its broker) and of the devices' process,
//! and a rollout to every device (waves 1, 1%, 10%, 100%, no soak): time until
//! every device was told to install, time to completion, and chunk bytes the
//! controller published per wave against one copy of the bundle.
//!
//! Arguments: `--devices N[,N...]` (default 1000), `--ingest-s S` (default 30),
//! `--broker embedded|mosquitto|nats` (default embedded): with `mosquitto` the
//! devices connect to Debian's Mosquitto in its own process (prepared by
//! `edgefleet broker mosquitto`: mutual TLS, the per-device ACL) and the
//! controller holds one connection to it; the broker's RSS and CPU are then
//! reported on their own. `nats`: a cluster of three `nats-server` nodes
//! (prepared by `edgefleet broker nats`: MQTT with mutual TLS, JetStream, a
//! user per enrolled device), device i on node i % 3, each node's RSS and CPU
//! reported. `--store sqlite|postgres` (default sqlite): with
//! `postgres` the controller's store is a PostgreSQL server the bench starts
//! (`edgefleet::server::db::testing`), reported on its own (its processes'
//! private memory plus the shared buffers once; their CPU). `--connect-per-s N`
//! paces the devices' first connections (`devices load --connect-per-s`);
//! the connect storm's time then includes the pacing.
//!
//! `--replicas R` (R >= 2) measures controller replicas instead: R `edgefleet
//! serve --replica` processes on one PostgreSQL database and one Mosquitto
//! (the setup docs/scale.md describes: shared subscriptions on, a 5 s lease),
//! the devices enrolled and the API measured through a replica that does not
//! hold the rollout lease, the rollout started there (forwarded to the
//! holder). Each replica's RSS and CPU is reported, and the messages they
//! heard per report sent. With `--kill-holder` the holder is killed with
//! SIGKILL when the last wave starts: the bench prints when another replica
//! took the lease over, and checks in the store that no device was told to
//! install twice.

use std::time::{Duration, Instant};

use edgefleet_tests::{BundleSpec, Harness, TestBroker};
use serde_json::json;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// A process's resident memory (MB) and CPU time so far (s, user + system),
/// from /proc (`pid` "self" for this one).
fn usage(pid: &str) -> (f64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0);
    // Fields 14 and 15 of /proc/PID/stat, after the ")" closing the name.
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .map_or(0.0, |ticks| ticks / 100.0);
    (rss, cpu)
}

/// PostgreSQL's memory (MB: every server process's private memory, plus the
/// shared buffers once) and CPU time so far (s, with that of exited children),
/// from the postmaster `pid` and its children.
fn postgres_usage(pid: u32) -> (f64, f64) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let pids =
        std::iter::once(pid.to_string()).chain(children.split_whitespace().map(str::to_owned));
    let (mut private, mut shared, mut cpu) = (0.0, 0.0f64, 0.0);
    for (k, p) in pids.enumerate() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        private += field("RssAnon:");
        shared = shared.max(field("RssShmem:"));
        let fields = if k == 0 { 11..15 } else { 11..13 };
        cpu += std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_owned();
                let f: Vec<f64> = rest
                    .split_whitespace()
                    .map(|v| v.parse().unwrap_or(0.0))
                    .collect();
                Some(f.get(fields)?.iter().sum::<f64>())
            })
            .map_or(0.0, |ticks| ticks / 100.0);
    }
    (private + shared, cpu)
}

/// One side of [`Usage`]: a process, or PostgreSQL's processes.
enum Side {
    Process(String),
    Postgres(u32),
}

impl Side {
    fn usage(&self) -> (f64, f64) {
        match self {
            Side::Process(pid) => usage(pid),
            Side::Postgres(pid) => postgres_usage(*pid),
        }
    }
}

/// Usage of the controller (this process), of an external broker's process,
/// of PostgreSQL's and of the devices' process.
struct Usage {
    /// (label, what) of each side reported.
    sides: Vec<(String, Side)>,
    since: Instant,
    cpu: Vec<f64>,
}

impl Usage {
    fn new(devices: u32, brokers: Vec<(String, u32)>, postgres: Option<u32>) -> Usage {
        let mut sides = vec![(
            if brokers.is_empty() {
                "controller+broker"
            } else {
                "controller"
            }
            .to_owned(),
            Side::Process("self".to_owned()),
        )];
        for (name, pid) in brokers {
            sides.push((name, Side::Process(pid.to_string())));
        }
        if let Some(pid) = postgres {
            sides.push(("PostgreSQL".to_owned(), Side::Postgres(pid)));
        }
        sides.push((
            "devices' process".to_owned(),
            Side::Process(devices.to_string()),
        ));
        Usage::of(sides)
    }

    /// Usage of `sides` (label, what), from now on.
    fn of(sides: Vec<(String, Side)>) -> Usage {
        let cpu = sides.iter().map(|(_, side)| side.usage().1).collect();
        Usage {
            sides,
            since: Instant::now(),
            cpu,
        }
    }

    /// RSS now and CPU share (of one core) since the last call, each side.
    fn line(&mut self) -> String {
        let wall = self.since.elapsed().as_secs_f64();
        let mut parts = Vec::new();
        for ((label, side), last) in self.sides.iter().zip(self.cpu.iter_mut()) {
            if let Side::Process(pid) = side
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                parts.push(format!("{label} gone"));
                continue;
            }
            let (rss, cpu) = side.usage();
            parts.push(format!(
                "{label} RSS {rss:.0} MB, CPU {:.0}%",
                (cpu - *last) / wall * 100.0
            ));
            *last = cpu;
        }
        self.since = Instant::now();
        format!(
            "{} (100% = one core, over the last {wall:.0} s)",
            parts.join("; ")
        )
    }
}

fn quantile_ms(mut v: Vec<Duration>, q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn run(n: usize, ingest_s: u64, broker: TestBroker, postgres: bool) {
    let database = postgres.then(|| {
        edgefleet::server::db::testing::shared()
            .create_database()
            .expect("a PostgreSQL database")
    });
    let h = Harness::start_with(broker, |c| {
        c.rollouts.tick_ms = 200;
        c.database = database.map(edgefleet::server::config::DatabaseSetting::Location);
    });
    println!(
        "\n{n} load devices (`edgefleet devices load`, a second process), broker: {}, store: {}",
        match broker {
            TestBroker::Embedded => "embedded (rumqttd behind the gate, in the controller)",
            TestBroker::Mosquitto => "Mosquitto (its own process, mutual TLS, the ACL)",
            TestBroker::Nats => "NATS, three nodes (their own processes, mutual TLS, JetStream)",
        },
        if postgres {
            "PostgreSQL (its own processes, on this machine)"
        } else {
            "SQLite"
        }
    );
    let started = Instant::now();
    let ids = Harness::load_ids(n);
    h.enroll_many(&ids, &h.dir().join("load"));
    let enrolled = started.elapsed();
    // NATS: the new devices become users of every node.
    h.reload_broker_users();
    let storm = Instant::now();
    let connect_per_s = arg("--connect-per-s").and_then(|v| v.parse().ok());
    let (mut devices, _) = h.load_process_enrolled(&ids, 10, connect_per_s);
    let mut use_ = Usage::new(
        devices.id(),
        h.broker_pids(),
        postgres.then(|| edgefleet::server::db::testing::shared().server_pid()),
    );
    // Longer than the harness's usual wait: a storm of 10,000 TLS handshakes
    // on 2 cores. Bounded all the same.
    let deadline = Instant::now() + Duration::from_secs(600);
    while h.online() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} devices online after 600 s",
            h.online()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "  enroll {n} devices (batch API, one certificate each): {:.1} s; connect storm until all online: {:.1} s",
        enrolled.as_secs_f64(),
        storm.elapsed().as_secs_f64()
    );
    println!("  {}", use_.line());

    // Telemetry: every device reports each 10 s; API latency meanwhile.
    let before = h.metric("edgefleet_telemetry_stored_total");
    let t0 = Instant::now();
    let times = ApiTimes::measure(&h.api, &ids, ingest_s);
    let stored = h.metric("edgefleet_telemetry_stored_total") - before;
    println!(
        "  telemetry stored: {:.0}/s over {ingest_s} s (devices send {:.0}/s); {}",
        stored as f64 / t0.elapsed().as_secs_f64(),
        n as f64 / 10.0,
        times.line()
    );
    println!("  during ingest: {}", use_.line());

    // A rollout to every device.
    let file = h.build(&BundleSpec::new("digits_cnn.onnx", (1, 0, 0), 1));
    let payload = edgefleet_tests::payload_size(&file);
    let digest = h.upload(&file);
    let mut progress = Progress::new();
    let id = h.rollout(&json!({
        "bundle": digest,
        "selector": {"all": true},
        "waves": ["1", "1%", "10%", "100%"],
        "gates": {"soak_ms": 0},
        "rate_per_minute": 100_000,
    }));
    let (mut bytes, mut sizes) = (vec![0u64; 4], vec![0u64; 4]);
    let mut last = h.metric("edgefleet_chunk_bytes_sent_total");
    loop {
        let r = h.rollout_view(&id);
        let now = h.metric("edgefleet_chunk_bytes_sent_total");
        let wave = r["wave"].as_u64().unwrap_or(1).clamp(1, 4) as usize - 1;
        bytes[wave] += now - last;
        last = now;
        for (i, w) in r["waves"].as_array().into_iter().flatten().enumerate() {
            sizes[i] = w["devices"].as_u64().unwrap_or(0);
        }
        if progress.completed(&r, 4) {
            break;
        }
        // Each view is every member's state (0.5 MB at 5,000 devices).
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "  rollout of a {payload}-byte bundle to {n}: {}",
        progress.line()
    );
    println!("  during the rollout: {}", use_.line());
    for w in 0..4 {
        println!(
            "    wave {} ({:>5} devices): {:>9} chunk bytes = {:.2} copies",
            w + 1,
            sizes[w],
            bytes[w],
            bytes[w] as f64 / payload as f64
        );
    }
    std::thread::sleep(Duration::from_secs(10));
    println!("  10 s after the rollout: {}", use_.line());
    // SIGTERM: the devices disconnect cleanly.
    let _ = std::process::Command::new("kill")
        .arg(devices.id().to_string())
        .status();
    let _ = devices.wait();
}

/// A rollout followed view by view: when every device of its last wave had
/// been told to install, and when it completed.
struct Progress {
    started: Instant,
    notified: Option<Duration>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            started: Instant::now(),
            notified: None,
        }
    }

    /// Takes the rollout's view `r` (waves numbered from 1, `last` the
    /// last); true once it completed. Panics if it stopped or ran 600 s.
    fn completed(&mut self, r: &serde_json::Value, last: u64) -> bool {
        let pending = r["members"].as_object().map_or(0, |m| {
            m.values().filter(|v| v["state"] == "pending").count()
        });
        if self.notified.is_none() && r["wave"].as_u64() == Some(last) && pending == 0 {
            self.notified = Some(self.started.elapsed());
        }
        match r["phase"].as_str().unwrap_or("") {
            "completed" => return true,
            "halted" | "paused" | "aborted" => panic!("rollout stopped: {}", r["phase"]),
            _ => {}
        }
        assert!(
            self.started.elapsed() < Duration::from_secs(600),
            "rollout too slow"
        );
        false
    }

    /// "every device told ... after T s, completed in T s".
    fn line(&self) -> String {
        let took = self.started.elapsed();
        format!(
            "every device told to install after {:.1} s, completed in {:.1} s",
            self.notified.unwrap_or(took).as_secs_f64(),
            took.as_secs_f64()
        )
    }
}

/// API latencies during ingest, through `api`: the whole device list, a page
/// of 100, a device's page, every 200 ms for `seconds`.
struct ApiTimes {
    list: Vec<Duration>,
    paged: Vec<Duration>,
    page: Vec<Duration>,
}

impl ApiTimes {
    fn measure(api: &edgefleet::ops::remote::Client, ids: &[String], seconds: u64) -> ApiTimes {
        let n = ids.len();
        let (mut list, mut paged, mut page) = (Vec::new(), Vec::new(), Vec::new());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(seconds) {
            let t = Instant::now();
            api.get("/api/v1/devices").expect("device list");
            list.push(t.elapsed());
            let t = Instant::now();
            api.get(&format!(
                "/api/v1/devices?limit=100&after={}",
                ids[(list.len() * 97) % n]
            ))
            .expect("a page of the device list");
            paged.push(t.elapsed());
            let t = Instant::now();
            api.get(&format!("/api/v1/devices/{}", ids[list.len() % n]))
                .expect("device page");
            page.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(200));
        }
        ApiTimes { list, paged, page }
    }

    fn line(&self) -> String {
        format!(
            "API p50/p99: whole device list {:.1}/{:.1} ms, a page of 100 {:.1}/{:.1} ms, a device's page {:.1}/{:.1} ms ({} calls each)",
            quantile_ms(self.list.clone(), 0.5),
            quantile_ms(self.list.clone(), 0.99),
            quantile_ms(self.paged.clone(), 0.5),
            quantile_ms(self.paged.clone(), 0.99),
            quantile_ms(self.page.clone(), 0.5),
            quantile_ms(self.page.clone(), 0.99),
            self.list.len()
        )
    }
}

/// The statements the PostgreSQL server ran (`pg_stat_statements`, loaded
/// by the test server), counted from [`Statements::reset`].
struct Statements(String);

impl Statements {
    fn reset(url: &str) -> Statements {
        let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
        c.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()",
        )
        .expect("pg_stat_statements");
        Statements(url.to_owned())
    }

    /// The `top` statements by total time: calls, time, rows, the text.
    fn print(&self, top: i64) {
        let mut c = postgres::Client::connect(&self.0, postgres::NoTls).expect("connect");
        let rows = c
            .query(
                "SELECT calls, total_exec_time, rows, query FROM pg_stat_statements
                 ORDER BY total_exec_time DESC LIMIT $1",
                &[&top],
            )
            .expect("pg_stat_statements");
        println!("  PostgreSQL's statements by time spent during the rollout:");
        for r in rows {
            let (calls, ms, rows, text): (i64, f64, i64, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let text: String = text.chars().take(100).collect();
            println!("    {ms:>9.0} ms {calls:>8} calls {rows:>8} rows  {text}");
        }
    }
}

/// `--replicas R`: R controller replicas on PostgreSQL and Mosquitto.
fn run_replicas(n: usize, ingest_s: u64, replicas: usize, kill_holder: bool) {
    use edgefleet_tests::replica::{
        Replica, Setup, metric, online, query, rollout, rollout_holder,
    };
    let mut setup = Setup::new();
    let (dir, data, url) = setup.paths();
    let mosquitto =
        edgefleet_tests::Mosquitto::start(&dir.join("broker"), &data, &mut setup.config);
    setup.config.cluster.shared_subscriptions = true;
    let config_file = setup.write_config_leased(5_000);
    println!(
        "\n{n} load devices (`edgefleet devices load`, a second process), {replicas} controller replicas (`edgefleet serve --replica`), Mosquitto (mutual TLS, the ACL), PostgreSQL, shared subscriptions, lease 5 s"
    );
    // The first replica started holds the lease; the last one is measured.
    let mut all: Vec<Replica> = (0..replicas)
        .map(|i| {
            let r = Replica::start(&config_file, &format!("r{i}"), &data);
            if i == 0 {
                edgefleet_tests::wait_for("r0 to hold the rollout lease", || {
                    (rollout_holder(&url).as_deref() == Some("r0")).then_some(())
                });
            }
            r
        })
        .collect();
    let mut holder = all.remove(0);
    let others = all;
    let api = &others.last().expect("a second replica").api;
    let started = Instant::now();
    let ids = Harness::load_ids(n);
    let load = dir.join("load");
    edgefleet_tests::enroll_many(api, &ids, &load);
    let enrolled = started.elapsed();
    let storm = Instant::now();
    let connect_per_s = arg("--connect-per-s").and_then(|v| v.parse().ok());
    let mut devices = edgefleet_tests::spawn_load_process(&load, 10, connect_per_s, None);
    let process = |label: String, pid: u32| (label, Side::Process(pid.to_string()));
    let mut sides: Vec<(String, Side)> = std::iter::once(&holder)
        .chain(&others)
        .enumerate()
        .map(|(i, r)| process(format!("replica r{i}"), r.child.id()))
        .collect();
    sides.push(process("Mosquitto".to_owned(), mosquitto.pid()));
    sides.push((
        "PostgreSQL".to_owned(),
        Side::Postgres(edgefleet::server::db::testing::shared().server_pid()),
    ));
    sides.push(process("devices' process".to_owned(), devices.id()));
    let mut use_ = Usage::of(sides);
    let deadline = Instant::now() + Duration::from_secs(600);
    while online(api) < n as u64 {
        assert!(
            Instant::now() < deadline,
            "{} of {n} devices online after 600 s",
            online(api)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "  enroll {n} devices (batch API, through r{}): {:.1} s; connect storm until all online: {:.1} s",
        replicas - 1,
        enrolled.as_secs_f64(),
        storm.elapsed().as_secs_f64()
    );
    println!("  {}", use_.line());

    let all: Vec<&Replica> = std::iter::once(&holder).chain(&others).collect();
    let sum = |name: &str| -> u64 { all.iter().map(|r| metric(&r.api, name)).sum() };
    let (stored0, heard0) = (
        sum("edgefleet_telemetry_stored_total"),
        sum("edgefleet_messages_total"),
    );
    let t0 = Instant::now();
    let times = ApiTimes::measure(api, &ids, ingest_s);
    let secs = t0.elapsed().as_secs_f64();
    let stored = sum("edgefleet_telemetry_stored_total") - stored0;
    let heard = sum("edgefleet_messages_total") - heard0;
    let per_replica: Vec<String> = all
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "r{i} {}",
                metric(&r.api, "edgefleet_telemetry_stored_total")
            )
        })
        .collect();
    println!(
        "  telemetry stored: {:.0}/s over {ingest_s} s (devices send {:.0}/s; stored so far by replica: {}); messages the replicas heard: {:.2} per report stored",
        stored as f64 / secs,
        n as f64 / 10.0,
        per_replica.join(", "),
        heard as f64 / stored.max(1) as f64
    );
    println!("  through r{}: {}", replicas - 1, times.line());
    println!("  during ingest: {}", use_.line());

    // A rollout to every device, started through the measured replica;
    // what the database spends its time on during it.
    let statements = Statements::reset(&url);
    let spec = BundleSpec::new("digits_cnn.onnx", (1, 0, 0), 1);
    let file = edgefleet_tests::build_bundle(&dir, &spec, std::slice::from_ref(&setup.key));
    let payload = edgefleet_tests::payload_size(&file);
    let digest = api.upload("/api/v1/bundles", &file).expect("upload")["bundle"]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let mut progress = Progress::new();
    let id = api
        .post(
            "/api/v1/rollouts",
            &json!({
                "bundle": digest,
                "selector": {"all": true},
                "waves": ["1", "1%", "10%", "100%"],
                "gates": {"soak_ms": 0},
                "rate_per_minute": 100_000,
            }),
        )
        .expect("rollout (forwarded to the holder)")["rollout"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (mut killed, mut taken_over) = (None::<Instant>, None);
    loop {
        let r = rollout(api, &id);
        if kill_holder && killed.is_none() && r["wave"].as_u64() == Some(4) {
            holder.kill();
            killed = Some(Instant::now());
            println!(
                "  r0 (the lease's holder) killed with SIGKILL as wave 4 started, {:.1} s into the rollout",
                progress.started.elapsed().as_secs_f64()
            );
        }
        if let (Some(k), true) = (killed, taken_over.is_none())
            && let Some(holder) = rollout_holder(&url).filter(|h| h != "r0")
        {
            taken_over = Some((k.elapsed(), holder));
        }
        if progress.completed(&r, 4) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "  rollout of a {payload}-byte bundle to {n}, started through r{}: {}",
        replicas - 1,
        progress.line()
    );
    if let Some((after, holder)) = taken_over {
        println!(
            "  {holder} took the rollout lease {:.1} s after the kill",
            after.as_secs_f64()
        );
    }
    let told = query(
        &url,
        "SELECT device, COUNT(*) FROM commands WHERE rollout = $1 AND action = 'install' GROUP BY device",
        &id,
    );
    let twice = told.iter().filter(|(_, c)| *c > 1).count();
    println!(
        "  install commands in the store: {} devices told, {twice} of them more than once",
        told.len()
    );
    assert_eq!(told.len(), n, "every device told to install");
    // An unanswered install goes again as the same command (its id), so
    // none is a second one; how many copies went is the replicas' count.
    let alive: Vec<&Replica> = std::iter::once(&holder)
        .filter(|_| !kill_holder)
        .chain(&others)
        .collect();
    let resent: u64 = alive
        .iter()
        .map(|r| metric(&r.api, "edgefleet_commands_resent_total"))
        .sum();
    println!(
        "  unanswered commands sent again as the same command: {resent} (by the replicas still running)"
    );
    if twice > 0 {
        println!("  NOT MET: {twice} devices were sent a second install command");
    }
    println!("  during the rollout: {}", use_.line());
    statements.print(6);
    let _ = std::process::Command::new("kill")
        .arg(devices.id().to_string())
        .status();
    let _ = devices.wait();
}

fn main() {
    // The controller's warnings (the gate says why it closes a connection) on
    // stderr; EDGEFLEET_LOG sets the filter for both processes.
    // (rumqttd logs an ERROR for every abrupt disconnect: off, as in `serve`.)
    edgefleet_agent::cli::init_logs(false, "warn,rumqttd=off");
    let sizes: Vec<usize> = arg("--devices")
        .unwrap_or_else(|| "1000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let ingest_s = arg("--ingest-s").and_then(|v| v.parse().ok()).unwrap_or(30);
    let broker = match arg("--broker").as_deref() {
        None | Some("embedded") => TestBroker::Embedded,
        Some("mosquitto") => TestBroker::Mosquitto,
        Some("nats") => TestBroker::Nats,
        Some(other) => panic!("--broker {other}: embedded, mosquitto or nats"),
    };
    let postgres = match arg("--store").as_deref() {
        None | Some("sqlite") => false,
        Some("postgres") => true,
        Some(other) => panic!("--store {other}: sqlite or postgres"),
    };
    let replicas: usize = arg("--replicas").and_then(|v| v.parse().ok()).unwrap_or(1);
    if replicas > 1 {
        assert!(
            arg("--broker").is_none() && arg("--store").is_none(),
            "--replicas runs on Mosquitto and PostgreSQL: leave --broker and --store out"
        );
        let kill = std::env::args().any(|a| a == "--kill-holder");
        for n in sizes {
            run_replicas(n, ingest_s, replicas, kill);
        }
        return;
    }
    for n in sizes {
        run(n, ingest_s, broker, postgres);
    }
}
