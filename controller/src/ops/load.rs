//! `edgefleet devices load`: protocol-level load devices
//! (`edgefleet_devices::load`) run from the enrollments that `devices enroll
//! --count N --out DIR` wrote, one sub-directory per device. They are not
//! real agents: a real MQTT connection with the device's own certificate and
//! the real messages (state, telemetry, events, verified chunk downloads), but
//! no model and nothing on disk (docs/scale.md).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use edgefleet_devices::load::{LoadFleet, LoadSettings, LoadSpec, LoadStats};
use edgefleet_devices::sim::TlsFiles;

use crate::ops::remote::CommandError;

/// `edgefleet devices load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Directory of enrollments: one sub-directory per device, as `devices
    /// enroll --count N --out DIR` writes them.
    #[arg(long)]
    pub dir: PathBuf,
    /// Telemetry period of every device, seconds.
    #[arg(long, default_value_t = 10)]
    pub telemetry_s: u64,
    /// Inferences each device reports per second (made up; no model runs).
    #[arg(long, default_value_t = 5)]
    pub requests_per_s: u64,
    /// Stop after this many seconds (default: until Ctrl-C or SIGTERM).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Connect here instead of the enrollments' broker URL (`host:port`).
    #[arg(long)]
    pub broker: Option<String>,
    /// First connections per second (device i waits i / N s before it
    /// dials); default: all at once.
    #[arg(long, value_name = "N")]
    pub connect_per_s: Option<u32>,
}

fn bad(what: &'static str, reason: impl Into<String>) -> CommandError {
    CommandError::Argument {
        what,
        reason: reason.into(),
    }
}

/// What the enrolled devices of one controller share (their `agent.toml`s
/// must agree on it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shared {
    url: String,
    topic_prefix: String,
    subscribe_qos: u8,
}

/// The devices of `dir` (sorted by id) and what they share: broker URL, topic
/// prefix and subscription QoS from their `agent.toml`s, which must agree.
fn read_enrollments(dir: &Path) -> Result<(Vec<LoadSpec>, Shared), CommandError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| bad("--dir", format!("{}: {e}", dir.display())))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("agent.toml").is_file())
        .collect();
    paths.sort();
    let mut shared: Option<Shared> = None;
    let mut specs = Vec::with_capacity(paths.len());
    for p in paths {
        let file = p.join("agent.toml");
        let text = std::fs::read_to_string(&file)
            .map_err(|e| bad("--dir", format!("{}: {e}", file.display())))?;
        let config: edgefleet_agent::config::AgentConfig =
            toml::from_str(&text).map_err(|e| bad("--dir", format!("{}: {e}", file.display())))?;
        let this = Shared {
            url: config.broker.url.clone(),
            topic_prefix: config.broker.topic_prefix.clone(),
            subscribe_qos: config.broker.subscribe_qos,
        };
        match &shared {
            None => shared = Some(this),
            Some(s) if *s != this => {
                return Err(bad(
                    "--dir",
                    format!(
                        "{} names broker {} (prefix {}, subscribe_qos {}), the others {} ({}, {}): one controller's devices only",
                        file.display(),
                        this.url,
                        this.topic_prefix,
                        this.subscribe_qos,
                        s.url,
                        s.topic_prefix,
                        s.subscribe_qos
                    ),
                ));
            }
            Some(_) => {}
        }
        specs.push(LoadSpec {
            id: config.device_id,
            tls: TlsFiles {
                ca: p.join("ca.pem"),
                cert: p.join("device.pem"),
                key: p.join("device.key"),
            },
        });
    }
    let Some(shared) = shared else {
        return Err(bad(
            "--dir",
            format!(
                "{} holds no enrollment (sub-directories with agent.toml): run `edgefleet devices enroll --count N --out {}` first",
                dir.display(),
                dir.display()
            ),
        ));
    };
    Ok((specs, shared))
}

/// The address of each broker in `urls`: one, or a cluster's nodes separated
/// by commas, each `mqtts://host:port` or a bare `host:port`.
fn broker_addrs(urls: &str) -> Result<Vec<SocketAddr>, CommandError> {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let rest = url.strip_prefix("mqtts://").unwrap_or(url);
            rest.to_socket_addrs()
                .map_err(|e| bad("broker", format!("{url}: {e}")))?
                .next()
                .ok_or_else(|| bad("broker", format!("{url}: no address")))
        })
        .collect()
}

fn counters(s: &LoadStats) -> String {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "connects {}, telemetry sent {} ({} again: not acknowledged in time), installs {}, chunks {} ({:.1} MB, {} rejected), commands refused {} (and {} copies of one carried out), messages dropped {}",
        get(&s.connects),
        get(&s.telemetry_sent),
        get(&s.telemetry_resent),
        get(&s.installs),
        get(&s.chunks_received),
        get(&s.chunk_bytes) as f64 / 1e6,
        get(&s.chunks_rejected),
        get(&s.commands_refused),
        get(&s.commands_replayed),
        get(&s.dropped)
    )
}

/// Runs the load devices until stopped; prints their counters every 10 s.
pub fn run(args: LoadArgs) -> Result<i32, CommandError> {
    // Warnings by default; EDGEFLEET_LOG (e.g. `edgefleet_devices=debug`: why
    // a device's link dropped) as for `serve`.
    edgefleet_agent::cli::init_logs(false, "warn");
    let (specs, shared) = read_enrollments(&args.dir)?;
    let brokers = broker_addrs(args.broker.as_deref().unwrap_or(&shared.url))?;
    let subscribe_qos = edgefleet_agent::link::subscribe_qos(shared.subscribe_qos)
        .map_err(|reason| bad("--dir", format!("subscribe_qos: {reason}")))?;
    let n = specs.len();
    let settings = LoadSettings {
        brokers,
        topic_prefix: shared.topic_prefix,
        subscribe_qos,
        controller_key: args.dir.join(&specs[0].id).join("controller.pub"),
        telemetry_interval: Duration::from_secs(args.telemetry_s.max(1)),
        requests_per_s: args.requests_per_s,
        connect_per_s: args.connect_per_s.filter(|n| *n > 0),
    };
    let runtime = tokio::runtime::Runtime::new().map_err(CommandError::Runtime)?;
    runtime.block_on(async move {
        let fleet = LoadFleet::start(&settings, specs)
            .await
            .map_err(|e| bad("--dir", e.to_string()))?;
        let broker = settings
            .brokers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{n} load devices connecting to {broker} (protocol level: MQTT with mutual TLS and the real messages; no model, no disk: not real agents, see docs/scale.md)"
        );
        let started = Instant::now();
        let until = args.seconds.map(|s| started + Duration::from_secs(s));
        let mut every = tokio::time::interval(Duration::from_secs(10));
        every.tick().await;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(CommandError::Runtime)?;
        loop {
            let left = until.map_or(Duration::from_secs(3600), |u| {
                u.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                _ = every.tick() => println!(
                    "{:>5.0} s: {}",
                    started.elapsed().as_secs_f64(),
                    counters(fleet.stats())
                ),
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                () = tokio::time::sleep(left), if until.is_some() => break,
            }
        }
        println!("stopping: {}", counters(fleet.stats()));
        fleet.stop().await;
        Ok(0)
    })
}
