//! The `edgefleet-agent` command line: the local commands (`install`, `status`,
//! `revert`, `activate`, `infer`, `config`) call [`crate::store`] and print;
//! `run` checks its arguments, binds the listeners and calls
//! [`crate::service::run`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use edgefleet_shared::bundle::DeviceFacts;
use edgefleet_shared::protocol::{InstallMode, Slot};
use edgefleet_shared::{Arch, Digest, ModelChannel, SignedTrustRoot, UnixTime};

use crate::drift::tracker::DriftStatus;
use crate::oip::{Decoded, MAX_REQUEST_LEN, decode_request, encode_response};
use crate::selfupdate::start::Started;
use crate::slots::{SlotError, SlotEvent};
use crate::store::{self, Store};

/// edgefleet-agent: installs signed model bundles and serves them on this device.
#[derive(Debug, Parser)]
#[command(name = "edgefleet-agent", version = crate::version::version(), about)]
pub struct Cli {
    /// Config file (default /etc/edgefleet/agent.toml when it exists).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Data directory (slots, state); overrides the config's `data_dir`.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// The pinned trust root; overrides the config's `trust_root`.
    #[arg(long, global = true)]
    pub trust: Option<PathBuf>,
    /// Log JSON lines instead of text (stderr; level from EDGEFLEET_LOG).
    #[arg(long, global = true)]
    pub log_json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Local commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify, health-check and activate a bundle file (sideloading, no
    /// network). It adds the bundle's channel, or replaces the model on it;
    /// other channels are untouched.
    Install {
        /// The bundle file.
        file: PathBuf,
        /// Install into the inactive slot without activating it.
        #[arg(long)]
        stage: bool,
    },
    /// Check or print the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show every channel's slots and active bundle, and the last install result.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Switch a channel back to its previous bundle instantly.
    Revert {
        /// The channel (may be left out when one is installed).
        #[arg(long)]
        channel: Option<ModelChannel>,
    },
    /// Activate the staged bundle with this digest.
    Activate {
        /// Bundle digest (64 hex digits).
        digest: Digest,
        /// The channel, checked against the bundle's (may be left out).
        #[arg(long)]
        channel: Option<ModelChannel>,
    },
    /// Uninstall a channel: its model stops being served and its bundles are
    /// deleted. Its release floor is kept (an older release stays refused).
    Remove {
        /// The channel.
        channel: ModelChannel,
    },
    /// Run the agent until stopped (SIGINT/SIGTERM): serve the active model on the
    /// local OIP v2 API, and follow the controller over MQTT (broker.url) when the
    /// broker is reachable, retrying in the background when it is not.
    Run {
        /// Loopback address of the local inference API (port 0: any free port);
        /// overrides the config's `api_listen`.
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// Also serve the local API on a Unix socket at this path (mode 0660);
        /// overrides the config's `api_socket`.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Run a channel's active model once on an OIP v2 JSON request file ("-"
    /// for stdin).
    Infer {
        /// The channel (may be left out when one is installed).
        #[arg(long)]
        channel: Option<ModelChannel>,
        /// Request file: {"inputs": [{"name", "shape", "datatype", "data"}]}.
        #[arg(long)]
        input: PathBuf,
        /// Also time this device: run the model this many more times on the same
        /// request and print the model's load time and the median and p95
        /// inference time to stderr (1 to 100000).
        #[arg(long, value_name = "RUNS", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        time: Option<u32>,
    },
}

/// `edgefleet-agent config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config file; exit 1 naming the field if it is wrong.
    Check,
    /// Print the default config, commented.
    PrintDefault,
}

/// Command failures, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The data directory.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// An install or slot change.
    #[error(transparent)]
    Install(#[from] store::InstallError),
    /// The trust root.
    #[error("trust root {path}: {detail}")]
    Trust {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The inference request.
    #[error("{0}")]
    Request(String),
    /// The config file.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

fn memory_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib * 1024)
}

/// This device's facts for the constraints check.
pub fn device_facts() -> DeviceFacts {
    DeviceFacts {
        arch: Arch::current(),
        agent_version: semver::Version::parse(crate::version::version())
            .unwrap_or(semver::Version::new(0, 0, 0)),
        memory_available: memory_available(),
    }
}

fn print_state(state: &crate::slots::SlotsState) {
    if state.channels.is_empty() {
        println!("active    none (no model installed)");
    }
    for (channel, pair) in &state.channels {
        match (pair.active_entry(), pair.active) {
            (Some(e), Some(slot)) => println!(
                "active    {} {} (release {}) in slot {:?}, digest {}",
                channel,
                e.bundle.version,
                e.bundle.release,
                slot,
                e.bundle.digest.short()
            ),
            _ => println!("active    {channel}: none (staged only)"),
        }
        for slot in [Slot::A, Slot::B] {
            if let Some(e) = pair.get(slot) {
                println!(
                    "slot {:?}    {} {} (release {}), {:?}",
                    slot, e.bundle.channel, e.bundle.version, e.bundle.release, e.role
                );
            }
        }
    }
    if let Some(r) = &state.last_install {
        match &r.failure {
            None => println!(
                "last      install of {} succeeded at {}",
                r.digest.short(),
                r.at
            ),
            Some(f) => println!(
                "last      install of {} FAILED at {}: {}",
                r.digest.short(),
                r.at,
                serde_json::to_string(f).unwrap_or_default()
            ),
        }
    }
}

/// The drift status of each channel the running agent last wrote, where it is
/// about the channel's active bundle (a stale one of a previous bundle is not
/// shown).
fn drift_status(
    store: &Store,
    state: &crate::slots::SlotsState,
) -> BTreeMap<ModelChannel, DriftStatus> {
    let path = store.dir().join(crate::drift::tracker::STATUS_FILE);
    let read = || -> Option<BTreeMap<ModelChannel, DriftStatus>> {
        if std::fs::metadata(&path).ok()?.len() > 4 << 20 {
            return None;
        }
        serde_json::from_slice(&std::fs::read(&path).ok()?).ok()
    };
    let mut statuses = read().unwrap_or_default();
    statuses.retain(|channel, status| {
        state.active_entry(channel).map(|e| e.bundle.digest) == Some(status.digest)
    });
    statuses
}

fn print_drift(state: &crate::slots::SlotsState, statuses: &BTreeMap<ModelChannel, DriftStatus>) {
    for channel in state.channels.keys() {
        match statuses.get(channel) {
            Some(s) => print_channel_drift(channel, s),
            None => println!(
                "drift     {channel}: not tracked (no reference statistics in the bundle, or the agent has not run yet)"
            ),
        }
    }
}

fn print_channel_drift(channel: &ModelChannel, s: &DriftStatus) {
    let show = |label: &str, r: &edgefleet_shared::protocol::DriftReport| {
        println!(
            "drift     {channel} {label} window {}: {} rows, {:.0}% of inputs drifted{}",
            r.window,
            r.rows,
            r.drifted_share * 100.0,
            if r.drifted { " -> DRIFTED" } else { "" }
        );
        for f in r.inputs.iter().chain(&r.outputs) {
            println!(
                "          {:<24} psi {:>7.3}  p {:>8.2e}{}",
                f.feature,
                f.psi,
                f.p_value,
                if f.drifted { "  over threshold" } else { "" }
            );
        }
    };
    show("current", &s.current);
    if let Some(last) = &s.last_closed {
        show("last", last);
    }
}

/// Runs one command; returns the exit code.
pub fn run(cli: Cli) -> Result<i32, CliError> {
    use crate::config::{AgentConfig, DEFAULT_PATH};
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    match &cli.command {
        Command::Config(ConfigCommand::PrintDefault) => {
            print!("{}", AgentConfig::default_toml());
            return Ok(0);
        }
        Command::Config(ConfigCommand::Check) => {
            let config = AgentConfig::load(&config_path)?;
            println!(
                "OK: {} is valid (device {}, broker {})",
                config_path.display(),
                config.device_id,
                config.broker.url
            );
            return Ok(0);
        }
        _ => {}
    }
    // An explicit --config must load; the default path is used when it exists.
    let config = if cli.config.is_some() || config_path.exists() {
        AgentConfig::load(&config_path)?
    } else {
        AgentConfig::default()
    };
    let data_dir = cli.data_dir.clone().unwrap_or(config.data_dir.clone());
    let trust = cli.trust.clone().unwrap_or(config.trust_root.clone());
    let budget = config.limits.models_memory_bytes;
    let store = Store::open(&data_dir)?.with_models_budget((budget > 0).then_some(budget));
    let now = UnixTime::now();
    match cli.command {
        Command::Install { file, stage } => install(&store, &trust, &file, stage, now),
        Command::Status { json } => status(&store, json),
        Command::Revert { channel } => {
            let channel = store
                .load()?
                .resolve_channel(channel.as_ref())
                .map_err(store::InstallError::Slot)?;
            let state = store::change_slots(&store, SlotEvent::Revert { channel })?;
            print_state(&state);
            Ok(0)
        }
        Command::Activate { digest, channel } => activate(&store, digest, channel.as_ref()),
        Command::Remove { channel } => {
            let state = store::change_slots(&store, SlotEvent::Remove { channel })?;
            store.gc(&state)?;
            print_state(&state);
            Ok(0)
        }
        Command::Run { http, socket } => {
            init_logs(cli.log_json, "info");
            let http = http.unwrap_or(config.api_listen);
            let socket = socket.or_else(|| config.api_socket.clone());
            let config_file = (cli.config.is_some() || config_path.exists()).then_some(config_path);
            serve(&store, &config, config_file, &trust, http, socket)
        }
        Command::Config(_) => Ok(0),
        Command::Infer {
            input,
            time,
            channel,
        } => infer(&store, channel.as_ref(), &input, time),
    }
}

/// `activate DIGEST [--channel C]`: the staged bundle becomes active; a named
/// channel must hold it.
fn activate(
    store: &Store,
    digest: Digest,
    channel: Option<&ModelChannel>,
) -> Result<i32, CliError> {
    if let Some(c) = channel {
        let state = store.load()?;
        state
            .resolve_channel(Some(c))
            .map_err(store::InstallError::Slot)?;
        let staged = state
            .channel(c)
            .and_then(|p| p.target_entry())
            .is_some_and(|e| e.bundle.digest == digest);
        if !staged {
            return Err(store::InstallError::Slot(SlotError::NotStaged(digest)).into());
        }
    }
    let state = store::change_slots(store, SlotEvent::Activate { digest })?;
    print_state(&state);
    Ok(0)
}

/// `install`: 0 when the bundle is installed, 1 when it is refused.
fn install(
    store: &Store,
    trust: &Path,
    file: &Path,
    stage: bool,
    now: UnixTime,
) -> Result<i32, CliError> {
    let root = load_trust(trust, now)?;
    let mode = if stage {
        InstallMode::Stage
    } else {
        InstallMode::Activate
    };
    match store::install_file(store, &root, &device_facts(), file, mode, now) {
        Ok(done) => {
            println!(
                "installed {} {} (release {}): {} golden case(s) passed, slowest {:.2} ms{}",
                done.bundle.channel,
                done.bundle.version,
                done.bundle.release,
                done.health.cases,
                done.health.max_latency_ms,
                if stage {
                    "; staged, not active"
                } else {
                    "; now active"
                }
            );
            Ok(0)
        }
        Err(e) => {
            println!("install FAILED, active model unchanged: {e}");
            Ok(1)
        }
    }
}

/// `status`: the slots, the releases, the last install and drift.
fn status(store: &Store, json: bool) -> Result<i32, CliError> {
    let state = store.load()?;
    let drift = drift_status(store, &state);
    let only = match state.channels.len() {
        1 => state.channels.keys().next(),
        _ => None,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "agent_version": crate::version::version(),
                "arch": std::env::consts::ARCH,
                "data_dir": store.dir(),
                // The only channel's, as before channels; null with several.
                "active": only.and_then(|c| state.active_entry(c)).map(|e| &e.bundle),
                "drift": only.and_then(|c| drift.get(c)),
                "channels": channels_json(&state, &drift),
                "slots": state.slot_states(),
                "releases": state.releases,
                "last_install": state.last_install,
            }))
            .unwrap_or_default()
        );
    } else {
        print_state(&state);
        print_drift(&state, &drift);
    }
    Ok(0)
}

/// Every channel for `status --json`: its active bundle, slots and drift.
fn channels_json(
    state: &crate::slots::SlotsState,
    drift: &BTreeMap<ModelChannel, DriftStatus>,
) -> serde_json::Value {
    let channels: serde_json::Map<String, serde_json::Value> = state
        .channels
        .iter()
        .map(|(channel, pair)| {
            let slots: Vec<_> = [Slot::A, Slot::B]
                .into_iter()
                .filter_map(|slot| {
                    pair.get(slot).map(
                        |e| serde_json::json!({"slot": slot, "bundle": e.bundle, "role": e.role}),
                    )
                })
                .collect();
            let value = serde_json::json!({
                "active": pair.active_entry().map(|e| &e.bundle),
                "active_slot": pair.active,
                "slots": slots,
                "release_floor": state.installed_release(channel).map(|r| r.release),
                "drift": drift.get(channel),
            });
            (channel.to_string(), value)
        })
        .collect();
    serde_json::Value::Object(channels)
}

/// `infer`: one request (a file, or `-` for stdin) run on the active model.
fn infer(
    store: &Store,
    channel: Option<&ModelChannel>,
    input: &Path,
    time: Option<u32>,
) -> Result<i32, CliError> {
    let body = if input.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::io::stdin(), MAX_REQUEST_LEN as u64 + 1),
            &mut v,
        )
        .map_err(|e| CliError::Request(format!("stdin: {e}")))?;
        v
    } else {
        std::fs::read(input).map_err(|e| CliError::Request(format!("{}: {e}", input.display())))?
    };
    if body.len() > MAX_REQUEST_LEN {
        return Err(CliError::Request(format!(
            "request is over {MAX_REQUEST_LEN} bytes"
        )));
    }
    let Decoded { request, inputs } =
        decode_request(&body, None).map_err(|e| CliError::Request(e.to_string()))?;
    if request.wants_binary() {
        return Err(CliError::Request(
            "binary outputs (`binary_data`, `binary_data_output`) are for the local HTTP API; `infer` prints JSON".into(),
        ));
    }
    let loading = std::time::Instant::now();
    let state = store.load()?;
    let channel = match state.resolve_channel(channel) {
        Ok(c) => c,
        Err(SlotError::NothingInstalled) => {
            return Err(CliError::Request(
                "no model is installed; run `edgefleet-agent install BUNDLE` first".into(),
            ));
        }
        Err(e) => return Err(CliError::Request(format!("--channel: {e}"))),
    };
    let Some(store::ActiveModel { bundle, model, .. }) = store::load_active(store, &channel)?
    else {
        return Err(CliError::Request(format!(
            "channel `{channel}` has no active model (a staged bundle waits for `activate`)"
        )));
    };
    let loaded = loading.elapsed();
    let outputs = model
        .run(&inputs)
        .map_err(|e| CliError::Request(e.to_string()))?;
    if let Some(runs) = time {
        let mut took = Vec::with_capacity(runs as usize);
        for _ in 0..runs {
            let t = std::time::Instant::now();
            model
                .run(&inputs)
                .map_err(|e| CliError::Request(e.to_string()))?;
            took.push(t.elapsed());
        }
        took.sort();
        let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
        eprintln!(
            "load {:.2} ms (verify the active slot, parse, optimise, plan); inference over {runs} runs: median {:.1} us, p95 {:.1} us",
            loaded.as_secs_f64() * 1e3,
            at(0.5),
            at(0.95)
        );
    }
    let response = encode_response(bundle.channel.as_str(), &bundle.version, &request, &outputs)
        .map_err(|e| CliError::Request(e.to_string()))?;
    println!("{}", String::from_utf8_lossy(&response.body));
    Ok(0)
}

/// Logs to stderr: text by default, JSON lines with `--log-json`; the level
/// comes from `EDGEFLEET_LOG` (e.g. `debug`, `edgefleet_agent=debug,rumqttc=warn`:
/// a default level and `target=level` directives), else `default_filter`; a
/// value that does not parse is said once and the default used. Shared with the
/// controller. (`Targets`, not `EnvFilter`: the same directives without span
/// filters, and without the regex engine, 0.3 MB of the device binary.)
pub fn init_logs(json: bool, default_filter: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let fallback = || default_filter.parse::<Targets>().unwrap_or_default();
    let (filter, refused) = match std::env::var("EDGEFLEET_LOG") {
        Ok(value) => match value.parse::<Targets>() {
            Ok(filter) => (filter, None),
            Err(e) => (fallback(), Some((value, e))),
        },
        Err(_) => (fallback(), None),
    };
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry.with(layer.json()).try_init()
    } else {
        registry.with(layer.with_ansi(false)).try_init()
    };
    if let Some((value, e)) = refused {
        tracing::warn!(
            "EDGEFLEET_LOG={value:?} is not a log filter ({e}); using {default_filter:?}"
        );
    }
}

/// Reads and checks the pinned trust root.
fn load_trust(
    path: &std::path::Path,
    now: UnixTime,
) -> Result<edgefleet_shared::TrustRoot, CliError> {
    let bytes = std::fs::read(path).map_err(|e| CliError::Trust {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    SignedTrustRoot::from_bytes(&bytes)
        .and_then(|r| r.verify_self(now))
        .map_err(|e| CliError::Trust {
            path: path.to_owned(),
            detail: e.to_string(),
        })
}

/// Why the controller link cannot be set up: the config field at fault and
/// what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct SetupError {
    /// The config field (`broker.url`, `trust_root`, ...).
    pub field: &'static str,
    /// What is wrong.
    pub detail: String,
}

impl SetupError {
    fn new(field: &'static str, detail: impl std::fmt::Display) -> SetupError {
        SetupError {
            field,
            detail: detail.to_string(),
        }
    }
}

/// The MQTT options and daemon settings a config describes (the controller
/// The local API's listeners: TCP on `http` (its address, for port 0) and
/// the Unix socket at `socket`.
async fn bind(
    http: std::net::SocketAddr,
    socket: Option<&Path>,
) -> Result<(std::net::SocketAddr, crate::service::Listeners), CliError> {
    use crate::selfupdate::handover::{LISTEN_FD_ENV, inherited_listener};
    let passed = std::env::var(LISTEN_FD_ENV).ok();
    let tcp = match inherited_listener(passed.as_deref()) {
        // The agent before this one (an exec of the hand-over) kept the socket.
        Some(listener) => listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
            .map_err(|e| CliError::Request(format!("the passed listening socket: {e}")))?,
        None => tokio::net::TcpListener::bind(http)
            .await
            .map_err(|e| CliError::Request(format!("cannot listen on {http}: {e}")))?,
    };
    let addr = tcp
        .local_addr()
        .map_err(|e| CliError::Request(e.to_string()))?;
    let unix = match socket {
        Some(path) => {
            let std = crate::api::bind_unix(path).map_err(|e| CliError::Request(e.to_string()))?;
            let listener = tokio::net::UnixListener::from_std(std)
                .map_err(|e| CliError::Request(format!("{}: {e}", path.display())))?;
            Some(listener)
        }
        None => None,
    };
    Ok((addr, crate::service::Listeners { tcp, unix }))
}

/// The controller link: without it (bad TLS files, no trust root) the agent
/// still serves its model locally, and says why the link is down.
fn link_or_why(
    config: &crate::config::AgentConfig,
    trust: &Path,
) -> Option<(crate::link::Brokers, crate::daemon::DaemonSettings)> {
    match link_setup(config, trust) {
        Ok(link) => {
            println!(
                "controller link: {} as {}",
                config.broker.url, config.device_id
            );
            Some(link)
        }
        Err(e) => {
            // Expected on a device that is only sideloaded; an error on one that
            // should be managed: either way the local API serves.
            println!(
                "controller link disabled: {e} (set [broker] in the config, see `config print-default`; the local API works without it)"
            );
            tracing::warn!("controller link disabled: {e}");
            None
        }
    }
}

/// link), or the field at fault.
pub fn link_setup(
    config: &crate::config::AgentConfig,
    trust: &std::path::Path,
) -> Result<(crate::link::Brokers, crate::daemon::DaemonSettings), SetupError> {
    use crate::link::{Brokers, Endpoint, options, tls_config};
    let device = edgefleet_shared::DeviceId::new(&config.device_id)
        .map_err(|e| SetupError::new("device_id", e.reason))?;
    let topics = edgefleet_shared::protocol::Topics::new(&config.broker.topic_prefix)
        .map_err(|e| SetupError::new("broker.topic_prefix", e.reason))?;
    let endpoints =
        Endpoint::parse_list(&config.broker.url).map_err(|e| SetupError::new("broker.url", e))?;
    let tls = if endpoints[0].tls {
        let (Some(ca), Some(cert), Some(key)) =
            (&config.broker.ca, &config.broker.cert, &config.broker.key)
        else {
            return Err(SetupError::new(
                "broker.ca, broker.cert and broker.key",
                "are required with mqtts",
            ));
        };
        Some(tls_config(ca, cert, key).map_err(|e| SetupError::new("broker.ca/cert/key", e))?)
    } else {
        tracing::warn!(
            "broker.url is plain mqtt://: no encryption, no device authentication (development only)"
        );
        None
    };
    let root = load_trust(trust, UnixTime::now()).map_err(|e| SetupError::new("trust_root", e))?;
    let key_path = &config.broker.controller_key;
    let controller_key = std::fs::read_to_string(key_path)
        .map_err(|e| e.to_string())
        .and_then(|pem| edgefleet_shared::PublicKey::from_pem(&pem).map_err(|e| e.to_string()))
        .map_err(|e| {
            SetupError::new(
                "broker.controller_key",
                format!("{}: {e}", key_path.display()),
            )
        })?;
    let settings = crate::daemon::DaemonSettings {
        commands: edgefleet_shared::commands::CommandPolicy {
            key: controller_key,
            device: device.clone(),
            max_age_s: i64::from(config.broker.command_max_age_s),
            max_ahead_s: edgefleet_shared::commands::DEFAULT_MAX_AHEAD_S,
        },
        device: device.clone(),
        topics,
        trust: root,
        telemetry_interval: std::time::Duration::from_secs(u64::from(config.telemetry.interval_s)),
        spool_max_bytes: config.telemetry.spool_max_bytes,
        max_bundle_bytes: config.limits.max_bundle_bytes,
        disk_reserve_bytes: config.limits.disk_reserve_bytes,
        fetch_window: 16,
        stall_timeout: std::time::Duration::from_secs(5),
        fetch_listen: std::time::Duration::from_secs(2),
        facts: device_facts(),
        clock_skew_s: 0,
        trim_memory: true,
        self_update: None,
        trial: None,
    };
    let qos = crate::link::subscribe_qos(config.broker.subscribe_qos)
        .map_err(|e| SetupError::new("broker.subscribe_qos", e))?;
    let brokers =
        Brokers::new(&endpoints, |e| options(device.as_str(), e, tls.clone())).subscribing_at(qos);
    Ok((brokers, settings))
}

/// Completes on SIGINT or SIGTERM.
async fn terminated() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut t) => {
                t.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// What this start does about the agent's own update (docs/agent-update.md).
/// Never stops the agent: a record it cannot act on is logged and left. A new
/// binary whose trial was lost gives the device back to the old one here.
fn update_at_start(data_dir: &Path, config: &crate::config::AgentConfig) -> Started {
    let layout = config.self_update.layout();
    let exe = std::env::current_exe().unwrap_or_default();
    match crate::selfupdate::start::at_start(data_dir, &layout, &exe, UnixTime::now()) {
        Ok(Started::Reverted {
            failure,
            hand_back: true,
        }) => {
            use std::os::unix::process::CommandExt as _;
            tracing::error!(
                "agent update lost its trial ({failure}); handing back to {}",
                layout.link.display()
            );
            let err = std::process::Command::new(&layout.link)
                .args(std::env::args_os().skip(1))
                .exec();
            tracing::error!("cannot hand back to {}: {err}", layout.link.display());
            Started::Normal
        }
        Ok(Started::Reverted { failure, .. }) => {
            println!("agent update reverted: {failure}");
            Started::Normal
        }
        Ok(Started::Committed(r)) => {
            println!(
                "agent update to {} (release {}) committed",
                r.version, r.release
            );
            Started::Normal
        }
        Ok(started) => started,
        Err(e) => {
            tracing::error!("agent update record: {e}");
            Started::Normal
        }
    }
}

/// The local API's addresses as `serve` takes them: TCP on loopback only (it
/// has no authentication), the Unix socket at a path it can bind.
fn check_listen(
    http: std::net::SocketAddr,
    socket: Option<&std::path::Path>,
) -> Result<(), CliError> {
    if !http.ip().is_loopback() {
        return Err(CliError::Request(format!(
            "--http {http}: the local API has no authentication and binds loopback only (127.0.0.1 or ::1)"
        )));
    }
    if let Some(path) = socket {
        crate::config::check_socket_path(path)
            .map_err(|reason| CliError::Request(format!("--socket: {reason}")))?;
    }
    Ok(())
}

/// The controller link's settings with what the agent's own updates need: how
/// to hand over to a new binary (the listening socket `listen_fd` passed on),
/// and the trial to confirm once connected when this start is one.
fn with_self_update(
    mut settings: crate::daemon::DaemonSettings,
    store: &Store,
    config: &crate::config::AgentConfig,
    config_file: Option<PathBuf>,
    listen_fd: i32,
    update: &Started,
) -> crate::daemon::DaemonSettings {
    settings.self_update = Some(crate::selfupdate::handover::HandOver {
        layout: config.self_update.layout(),
        confirm_within_s: config.self_update.confirm_within_s,
        config: config_file,
        listen_fd: Some(listen_fd),
        supervised: config.self_update.unsupervised
            || crate::selfupdate::handover::supervised(|name| std::env::var_os(name)),
        args: std::env::args_os().skip(1).collect(),
    });
    if let Started::Trial(record) = update {
        // Confirmed once connected to the broker (docs/agent-update.md).
        settings.trial = Some(crate::selfupdate::start::PendingTrial::new(
            store.dir(),
            config.self_update.layout(),
            record.clone(),
        ));
    }
    settings
}

/// A trial start with no broker to connect to: config read, state loaded and
/// every model served is all there is to confirm, so this agent keeps the
/// device (docs/agent-update.md).
fn confirm_without_broker(
    store: &Store,
    config: &crate::config::AgentConfig,
    record: &crate::selfupdate::UpdateRecord,
) {
    match crate::selfupdate::start::confirm(store.dir(), &config.self_update.layout()) {
        Ok(r) => println!(
            "agent update to {} (release {}) confirmed",
            r.version, r.release
        ),
        Err(e) => tracing::error!(
            "agent update to {} not confirmed: {e}; the next start decides",
            record.version
        ),
    }
}

fn serve(
    store: &Store,
    config: &crate::config::AgentConfig,
    config_file: Option<PathBuf>,
    trust: &std::path::Path,
    http: std::net::SocketAddr,
    socket: Option<PathBuf>,
) -> Result<i32, CliError> {
    check_listen(http, socket.as_deref())?;
    // What a process killed mid-install left (staging directories, bundles the
    // state does not name) goes now, not at the next install. Only with a
    // readable state: without one, nothing is known to be garbage.
    if let Ok(state) = store.load()
        && let Err(e) = store.gc(&state)
    {
        tracing::warn!("cannot remove leftovers in {}: {e}", store.dir().display());
    }
    let update = update_at_start(store.dir(), config);
    let loaded = store::load_served(store)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Request(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let (addr, listeners) = bind(http, socket.as_deref()).await?;
        let active: Vec<_> = loaded.values().filter_map(|(a, _)| a.as_ref()).collect();
        if active.is_empty() {
            println!("no model installed: /v2/health/ready answers 503 until one is");
        }
        for a in active {
            println!(
                "serving {} {} (release {})",
                a.bundle.channel, a.bundle.version, a.bundle.release
            );
        }
        let served = crate::service::served(loaded, config);
        // The models are loaded: what loading them took goes back (memory.rs).
        crate::memory::trim_after_load();
        let link = link_or_why(config, trust).map(|(options, settings)| {
            use std::os::fd::AsRawFd as _;
            let settings = with_self_update(
                settings,
                store,
                config,
                config_file.clone(),
                listeners.tcp.as_raw_fd(),
                &update,
            );
            crate::service::Link::new(options, settings)
        });
        if let Some(path) = &socket {
            println!("local API listening on unix:{}", path.display());
        }
        if let (Started::Trial(record), None) = (&update, &link) {
            confirm_without_broker(store, config, record);
        }
        // Readiness line (the last): scripts and tests wait for it.
        println!("local API listening on http://{addr}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        crate::service::run(config, store.clone(), served, link, listeners, terminated()).await;
        if let Some(path) = &socket {
            // The socket file goes with the agent (a stale one is replaced at
            // the next start anyway).
            let _ = std::fs::remove_file(path);
        }
        // stdout may be gone by now (a supervisor closed the pipe): not an error.
        let _ = writeln!(std::io::stdout(), "stopped");
        Ok(0)
    })
}
