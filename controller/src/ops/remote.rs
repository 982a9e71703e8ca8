//! The controller's commands: `serve`, `config`, and the API clients `devices`,
//! `bundles` and `rollout`. API commands take `--controller URL` and `--token
//! TOKEN` (defaults: `EDGEFLEET_URL`, `EDGEFLEET_TOKEN`) and `--json`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

pub use crate::ops::client::{ApiArgs, Client, ClientError};
use crate::ops::operator::{OperatorError, io_err};
use crate::server::config::{ConfigError, ControllerConfig};

/// Why a controller command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The API call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `--tags` is not `key=value,...`.
    #[error("--tags: {0}")]
    Tags(#[from] crate::server::tags::TagError),
    /// The configuration is not acceptable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The controller's certificate authority failed.
    #[error(transparent)]
    Ca(#[from] crate::server::ca::CaError),
    /// The controller did not start.
    #[error(transparent)]
    Serve(#[from] crate::server::serve::ServeError),
    /// A file could not be read or written.
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// An argument is wrong (`what` names it).
    #[error("{what}: {reason}")]
    Argument {
        /// The flag.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No runtime for the server.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// The controller's answer lacks what the command needs.
    #[error("the controller's answer: {0}")]
    Answer(String),
}

/// `edgefleet serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (defaults apply without one).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Overrides `http.listen`.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Overrides `mqtt.listen` (embedded broker).
    #[arg(long)]
    pub mqtt: Option<SocketAddr>,
    /// Overrides `database`: a SQLite file or `postgres://user@host:port/db`.
    #[arg(long)]
    pub database: Option<String>,
    /// Overrides `cluster.replica`: this controller's name among replicas.
    #[arg(long)]
    pub replica: Option<String>,
    /// Log JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

/// `edgefleet config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print a commented default controller configuration.
    PrintDefault,
    /// Check a configuration file.
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// `edgefleet broker ...`.
#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Prepare Mosquitto for the fleet: certificates from the controller's CA, the
    /// ACL that confines each device to its own topics, a mosquitto.conf, and the
    /// controller's `[mqtt]` section to use it.
    Mosquitto {
        /// The controller's data directory (its CA signs the certificates).
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write ca.pem, server.pem/.key, controller.pem/.key, acl,
        /// mosquitto.conf and controller-mqtt.toml.
        #[arg(long)]
        out: PathBuf,
        /// The address Mosquitto listens on.
        #[arg(long, default_value = "127.0.0.1:8883")]
        listen: SocketAddr,
        /// Host names and addresses devices dial (in the server certificate); the
        /// first is used in the URL.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        /// Topic prefix.
        #[arg(long, default_value = edgefleet_shared::protocol::DEFAULT_PREFIX)]
        topic_prefix: String,
    },
    /// Prepare a NATS cluster (nats-server 2.9 or later, MQTT through
    /// JetStream) for the fleet: certificates from the controller's CA, one
    /// configuration per node (routes between them, MQTT with mutual TLS), the
    /// users file that confines each enrolled device to its own topics, and
    /// the controller's `[mqtt]` section naming every node.
    Nats {
        /// The controller's data directory (its CA signs the certificates).
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the files.
        #[arg(long)]
        out: PathBuf,
        /// Nodes (3 or more: JetStream needs a majority to go on when one stops).
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// Node 1's MQTT address; node i listens on the port i-1 above it.
        #[arg(long, default_value = "127.0.0.1:8883")]
        listen: SocketAddr,
        /// Node 1's cluster (route) port; node i uses the port i-1 above it.
        #[arg(long, default_value_t = 6222)]
        cluster_port: u16,
        /// Host names and addresses devices dial (in the server certificate); the
        /// first is used in the URLs.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        /// Topic prefix.
        #[arg(long, default_value = edgefleet_shared::protocol::DEFAULT_PREFIX)]
        topic_prefix: String,
        /// The controller's store, to list the enrolled devices (default: the
        /// SQLite file in --data-dir; a postgres:// URL for replicas).
        #[arg(long)]
        database: Option<String>,
        /// Only rewrite devices.conf (after enrolling or revoking devices);
        /// then `nats-server --signal reload` on every node.
        #[arg(long)]
        users_only: bool,
    },
}

/// `broker mosquitto` or `broker nats`.
pub fn broker(cmd: BrokerCommand) -> Result<i32, CommandError> {
    let (data_dir, out, listen, hosts, topic_prefix) = match cmd {
        BrokerCommand::Mosquitto {
            data_dir,
            out,
            listen,
            hosts,
            topic_prefix,
        } => (data_dir, out, listen, hosts, topic_prefix),
        BrokerCommand::Nats {
            data_dir,
            out,
            nodes,
            listen,
            cluster_port,
            hosts,
            topic_prefix,
            database,
            users_only,
        } => {
            let nodes = NatsLayout {
                nodes,
                listen,
                cluster_port,
            };
            return broker_nats(
                &data_dir,
                &out,
                &nodes,
                &hosts,
                &topic_prefix,
                database,
                users_only,
            );
        }
    };
    edgefleet_shared::protocol::Topics::new(&topic_prefix).map_err(|e| CommandError::Argument {
        what: "--topic-prefix",
        reason: e.to_string(),
    })?;
    let host = hosts.first().cloned().ok_or(CommandError::Argument {
        what: "--hosts",
        reason: "name at least one host".into(),
    })?;
    let ca = crate::server::ca::Ca::open_or_create(&data_dir.join("ca"))?;
    let put = |name: &str, text: &str| {
        crate::ops::operator::write_atomic(&out.join(name), 0o644, |w| w.write_all(text.as_bytes()))
    };
    std::fs::create_dir_all(&out).map_err(io_err(&out))?;
    put("ca.pem", ca.cert_pem())?;
    ca.issue("edgefleet broker", Some(&hosts), &out, "server")?;
    ca.issue(
        crate::server::ca::CONTROLLER_IDENTITY,
        None,
        &out,
        "controller",
    )?;
    put("acl", &crate::server::broker::mosquitto_acl(&topic_prefix))?;
    put(
        "mosquitto.conf",
        &crate::server::broker::mosquitto_conf(listen, &out),
    )?;
    let abs = std::fs::canonicalize(&out).map_err(io_err(&out))?;
    let snippet = format!(
        "# edgefleet serve --config: use the Mosquitto prepared in {dir}\n\
         [mqtt]\nmode = \"external\"\nurl = \"mqtts://{host}:{port}\"\n\
         ca = \"{dir}/ca.pem\"\ncert = \"{dir}/controller.pem\"\nkey = \"{dir}/controller.key\"\n\
         topic_prefix = \"{topic_prefix}\"\n",
        dir = abs.display(),
        port = listen.port(),
    );
    put("controller-mqtt.toml", &snippet)?;
    println!("Mosquitto files in {}:", out.display());
    println!("  mosquitto.conf  listener {listen}, mutual TLS with the controller's CA, the ACL");
    println!("  acl             each device may publish only on its own topics");
    println!("  controller-mqtt.toml  the [mqtt] section for the controller's config");
    println!("run: mosquitto -c {}/mosquitto.conf", abs.display());
    Ok(0)
}

/// Where the nodes of a NATS cluster listen (`broker nats`).
struct NatsLayout {
    nodes: u16,
    listen: SocketAddr,
    cluster_port: u16,
}

impl NatsLayout {
    fn nodes(&self) -> Result<Vec<crate::server::broker::NatsNode>, CommandError> {
        if self.nodes < 3 {
            return Err(CommandError::Argument {
                what: "--nodes",
                reason: "a NATS cluster needs 3 or more nodes (JetStream goes on with a majority)"
                    .into(),
            });
        }
        (0..self.nodes)
            .map(|i| {
                let port = |base: u16, what| {
                    base.checked_add(i).ok_or(CommandError::Argument {
                        what,
                        reason: "the ports of the last nodes pass 65535".into(),
                    })
                };
                Ok(crate::server::broker::NatsNode {
                    name: format!("n{}", i + 1),
                    mqtt: SocketAddr::new(self.listen.ip(), port(self.listen.port(), "--listen")?),
                    cluster: SocketAddr::new(
                        self.listen.ip(),
                        port(self.cluster_port, "--cluster-port")?,
                    ),
                })
            })
            .collect()
    }
}

/// The ids of the enrolled, unrevoked devices in the store at `database`
/// (default: the SQLite file in `data_dir`).
fn enrolled_devices(
    data_dir: &Path,
    database: Option<String>,
) -> Result<Vec<String>, CommandError> {
    let config = ControllerConfig {
        data_dir: data_dir.to_path_buf(),
        database: database.map(crate::server::config::DatabaseSetting::Location),
        ..ControllerConfig::default()
    };
    let location = config.store_location();
    // A broker prepared before the controller's first start: no store, no
    // devices yet (and no store made here as a side effect).
    if let crate::server::db::StoreLocation::Sqlite(path) = &location
        && !path.exists()
    {
        return Ok(Vec::new());
    }
    let store_err = |e: crate::server::db::DbError| CommandError::Argument {
        what: "--database",
        reason: format!("{location}: {e}"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CommandError::Runtime)?;
    runtime.block_on(async {
        let db = crate::server::db::Db::open_at(&location)
            .await
            .map_err(store_err)?;
        let revoked = db.revoked_devices().await.map_err(store_err)?;
        Ok(db
            .devices()
            .await
            .map_err(store_err)?
            .into_iter()
            .filter(|d| d.enrolled && !revoked.iter().any(|r| r == d.id.as_str()))
            .map(|d| d.id.as_str().to_owned())
            .collect())
    })
}

/// `broker nats`: certificates, one configuration per node, devices.conf, and
/// the controller's `[mqtt]` section (or devices.conf alone).
fn broker_nats(
    data_dir: &Path,
    out: &Path,
    layout: &NatsLayout,
    hosts: &[String],
    topic_prefix: &str,
    database: Option<String>,
    users_only: bool,
) -> Result<i32, CommandError> {
    edgefleet_shared::protocol::Topics::new(topic_prefix).map_err(|e| CommandError::Argument {
        what: "--topic-prefix",
        reason: e.to_string(),
    })?;
    let nodes = layout.nodes()?;
    let devices = enrolled_devices(data_dir, database)?;
    let put = |name: &str, text: &str| {
        crate::ops::operator::write_atomic(&out.join(name), 0o644, |w| w.write_all(text.as_bytes()))
    };
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    put(
        "devices.conf",
        &crate::server::broker::nats_users(topic_prefix, devices.iter().map(String::as_str)),
    )?;
    println!(
        "devices.conf: the controller and {} enrolled devices",
        devices.len()
    );
    if users_only {
        println!("apply it: nats-server --signal reload on every node");
        return Ok(0);
    }
    let host = hosts.first().cloned().ok_or(CommandError::Argument {
        what: "--hosts",
        reason: "name at least one host".into(),
    })?;
    let ca = crate::server::ca::Ca::open_or_create(&data_dir.join("ca"))?;
    put("ca.pem", ca.cert_pem())?;
    ca.issue("edgefleet broker", Some(hosts), out, "server")?;
    ca.issue(
        crate::server::ca::CONTROLLER_IDENTITY,
        None,
        out,
        "controller",
    )?;
    let abs = std::fs::canonicalize(out).map_err(io_err(out))?;
    for node in &nodes {
        put(
            &format!("{}.conf", node.name),
            &crate::server::broker::nats_conf(node, &nodes, &abs),
        )?;
    }
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("mqtts://{host}:{}", n.mqtt.port()))
        .collect();
    let snippet = format!(
        "# edgefleet serve --config: use the NATS cluster prepared in {dir}\n\
         # (NATS has no MQTT shared subscriptions: keep [cluster] shared_subscriptions off)\n\
         [mqtt]\nmode = \"external\"\nurl = \"{urls}\"\n\
         ca = \"{dir}/ca.pem\"\ncert = \"{dir}/controller.pem\"\nkey = \"{dir}/controller.key\"\n\
         topic_prefix = \"{topic_prefix}\"\n\
         # QoS 0 subscriptions, for the controller and (through enrollment) its devices:\n\
         # NATS makes each QoS 1 subscription a replicated JetStream consumer\n\
         subscribe_qos = 0\n",
        dir = abs.display(),
        urls = urls.join(","),
    );
    put("controller-mqtt.toml", &snippet)?;
    println!("NATS files in {}:", out.display());
    for n in &nodes {
        println!("  {}.conf  MQTT {}, cluster {}", n.name, n.mqtt, n.cluster);
    }
    println!("  controller-mqtt.toml  the [mqtt] section for the controller's config");
    println!(
        "run each node: nats-server -c {}/<node>.conf",
        abs.display()
    );
    Ok(0)
}

/// `edgefleet devices ...`.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Issue a device certificate and write what the device needs.
    ///
    /// Many at once: `--count N` enrolls `<prefix>00001` ... (`--prefix`,
    /// default `device-`), `--csv FILE` the devices its rows name (`id,tags`,
    /// tags as `"k=v,k2=v2"`); each device's files go to `<out>/<id>/`, 500
    /// devices per API call.
    Enroll {
        /// Device id (becomes the certificate's common name).
        #[arg(required_unless_present_any = ["count", "csv"], conflicts_with_all = ["count", "csv"])]
        id: Option<String>,
        /// Tags, `k=v,k2=v2` (with `--count`: every device's).
        #[arg(long, default_value = "")]
        tags: String,
        /// Enroll this many devices, numbered after `--prefix`.
        #[arg(long, conflicts_with = "csv")]
        count: Option<usize>,
        /// The ids' prefix with `--count`.
        #[arg(long, default_value = "device-", requires = "count")]
        prefix: String,
        /// Enroll the devices of this CSV file (`id,tags`; a header row `id,...` is skipped).
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Directory for ca.pem, controller.pub, device.pem, device.key, trust-root.cbor,
        /// agent.toml (one sub-directory per device with `--count` or `--csv`).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Run protocol-level load devices from enrollments (`devices enroll --count
    /// N --out DIR` writes them): real MQTT connections with each device's
    /// certificate and the real messages, but no model and no disk (not real
    /// agents; docs/scale.md). Prints the fleet's counters every 10 s; stops on
    /// Ctrl-C, SIGTERM, or after `--seconds`.
    Load(crate::ops::load::LoadArgs),
    /// Revoke a device's certificate: the gate no longer admits it (at its next
    /// connection); enroll again to give it a new one.
    Revoke {
        /// Device id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Switch a device back to its previous bundle (of one channel).
    Revert {
        /// Device id.
        id: String,
        /// The channel; needed when the device serves several.
        #[arg(long)]
        channel: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Uninstall one channel (model) from a device; its other channels keep
    /// serving.
    Remove {
        /// Device id.
        id: String,
        /// The channel.
        channel: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List devices.
    List {
        /// Only devices with these tags, `k=v,...`.
        #[arg(long)]
        tag: Option<String>,
        /// `online` or `offline`.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One device: slots, recent events, telemetry.
    Show {
        /// Device id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `edgefleet bundles ...`.
#[derive(Debug, Subcommand)]
pub enum BundlesCommand {
    /// Upload a signed bundle (the controller verifies it first).
    Push {
        /// The bundle file.
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List bundles.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One bundle.
    Show {
        /// Digest.
        digest: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `edgefleet rollout ...`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout.
    Start {
        /// Bundle digest.
        bundle: String,
        /// Devices with these tags, `k=v,...`.
        #[arg(long)]
        tags: Option<String>,
        /// Devices by id, comma-separated.
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        /// Every device.
        #[arg(long)]
        all: bool,
        /// Only devices whose agent reported a version below this one (X.Y.Z),
        /// e.g. for an agent release.
        #[arg(long, value_name = "VERSION")]
        agent_version_below: Option<String>,
        /// Cumulative waves, e.g. `1,10%,50%,100%`.
        #[arg(long, value_delimiter = ',')]
        waves: Vec<String>,
        /// Soak per wave, seconds.
        #[arg(long)]
        soak_s: Option<u64>,
        /// Soak gate: the wave's p95 latency over the previous version's at
        /// most this (default 1.5).
        #[arg(long, value_name = "RATIO")]
        max_p95_latency_ratio: Option<f64>,
        /// `pause` or `halt_and_revert`.
        #[arg(long)]
        policy: Option<String>,
        /// Install commands per minute.
        #[arg(long)]
        rate_per_minute: Option<u32>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a rollout (or all).
    Status {
        /// Rollout id.
        id: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Follow a rollout until it ends.
    Watch {
        /// Rollout id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop commanding.
    Pause {
        /// Rollout id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Continue (after a gate pause: accept the wave).
    Resume {
        /// Rollout id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Skip the rest of the current soak.
    Promote {
        /// Rollout id.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop for good.
    Abort {
        /// Rollout id.
        id: String,
        /// Tell devices that switched to revert.
        #[arg(long)]
        revert: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Runs `serve` until SIGINT/SIGTERM.
pub fn serve(args: ServeArgs) -> Result<i32, CommandError> {
    let mut config = match &args.config {
        Some(p) => ControllerConfig::load(p)?,
        None => ControllerConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(h) = args.http {
        config.http.listen = h;
    }
    if let Some(m) = args.mqtt {
        config.mqtt.listen = m;
    }
    if let Some(d) = args.database {
        config.database = Some(crate::server::config::DatabaseSetting::Location(d));
    }
    if let Some(r) = args.replica {
        config.cluster.replica = r;
    }
    config.validate(Path::new("flags"))?;
    // rumqttd logs an ERROR for every abrupt client disconnect: off by default.
    edgefleet_agent::cli::init_logs(args.log_json, "info,rumqttd=off");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CommandError::Runtime)?;
    rt.block_on(async move {
        let (started, server) =
            crate::server::serve::start(config, crate::server::serve::shutdown_signal()).await?;
        println!("controller API listening on http://{}", started.http);
        println!("devices connect to {}", started.broker_url);
        println!("data directory {}", started.data_dir.display());
        if let Some(p) = &started.new_admin_token {
            println!("admin token written to {} (mode 0600)", p.display());
        }
        let _ = std::io::stdout().flush();
        server.await;
        println!("controller stopped");
        Ok(0)
    })
}

/// `config ...`.
pub fn config(cmd: ConfigCommand) -> Result<i32, CommandError> {
    match cmd {
        ConfigCommand::PrintDefault => {
            print!("{}", ControllerConfig::default_toml());
            Ok(0)
        }
        ConfigCommand::Check { file } => {
            ControllerConfig::load(&file)?;
            println!("{}: ok", file.display());
            Ok(0)
        }
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `devices ...`.
pub fn devices(cmd: DevicesCommand) -> Result<i32, CommandError> {
    match cmd {
        DevicesCommand::Enroll {
            id: Some(id),
            tags,
            out,
            api,
            ..
        } => {
            let c = Client::new(&api);
            let v = c.post(
                &format!("/api/v1/devices/{id}/enroll"),
                &json!({"tags": crate::server::tags::parse(&tags)?}),
            )?;
            write_enrollment(&v, &out)?;
            if api.json {
                print_json(&json!({"device": v["device"], "out": out}));
            } else {
                println!(
                    "enrolled {}; files for the device in {}",
                    v["device"].as_str().unwrap_or(""),
                    out.display()
                );
                println!(
                    "  ca.pem controller.pub device.pem device.key (0600) agent.toml{}",
                    if v["trust_root_hex"].is_string() {
                        " trust-root.cbor"
                    } else {
                        " (no trust root on the controller: add trust-root.cbor yourself)"
                    }
                );
            }
            Ok(0)
        }
        DevicesCommand::Enroll {
            tags,
            count,
            prefix,
            csv,
            out,
            api,
            ..
        } => enroll_batch(&tags, count, &prefix, csv.as_deref(), &out, &api),
        DevicesCommand::Load(args) => crate::ops::load::run(args),
        DevicesCommand::List { tag, state, api } => {
            let c = Client::new(&api);
            let mut q = Vec::new();
            if let Some(t) = tag {
                q.push(format!("tag={t}"));
            }
            if let Some(s) = state {
                q.push(format!("state={s}"));
            }
            let v = c.get(&format!("/api/v1/devices?{}", q.join("&")))?;
            if api.json {
                print_json(&v);
            } else {
                println!(
                    "{:<20} {:<8} {:<16} {:<10} {:<10} tags",
                    "device", "online", "model", "version", "agent"
                );
                for d in v["devices"].as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<8} {:<16} {:<10} {:<10} {}",
                        d["id"].as_str().unwrap_or(""),
                        d["online"].as_bool().unwrap_or(false),
                        d["active_channel"].as_str().unwrap_or("-"),
                        d["active_version"].as_str().unwrap_or("-"),
                        d["agent_version"].as_str().unwrap_or("-"),
                        d["tags"]
                    );
                    // Its other channels, one line each.
                    for c in d["channels"].as_array().into_iter().flatten().skip(1) {
                        println!(
                            "{:<20} {:<8} {:<16} {:<10}",
                            "",
                            "",
                            c["channel"].as_str().unwrap_or("-"),
                            c["version"].as_str().unwrap_or("-")
                        );
                    }
                }
            }
            Ok(0)
        }
        DevicesCommand::Revoke { id, api } => {
            let v = Client::new(&api).post(&format!("/api/v1/devices/{id}/revoke"), &json!({}))?;
            if api.json {
                print_json(&v);
            } else {
                println!("revoked the certificate of {id}");
            }
            Ok(0)
        }
        DevicesCommand::Revert { id, channel, api } => {
            device_command(&api, &id, "revert", channel.as_deref())
        }
        DevicesCommand::Remove { id, channel, api } => {
            device_command(&api, &id, "remove", Some(&channel))
        }
        DevicesCommand::Show { id, api } => {
            let v = Client::new(&api).get(&format!("/api/v1/devices/{id}"))?;
            print_json(&v);
            Ok(0)
        }
    }
}

/// `devices revert|remove`: `POST /api/v1/devices/{id}/{action}` with the channel.
fn device_command(
    api: &ApiArgs,
    id: &str,
    action: &str,
    channel: Option<&str>,
) -> Result<i32, CommandError> {
    let body = json!({ "channel": channel });
    let v = Client::new(api).post(&format!("/api/v1/devices/{id}/{action}"), &body)?;
    if api.json {
        print_json(&v);
    } else {
        let what = channel.map_or(String::new(), |c| format!(" `{c}`"));
        println!("told {id} to {action}{what} (command {})", v["command"]);
    }
    Ok(0)
}

/// `devices enroll --count N | --csv FILE`: 500 devices per
/// `POST /api/v1/enrollments`, each one's files in `out/<id>/`.
fn enroll_batch(
    tags: &str,
    count: Option<usize>,
    prefix: &str,
    csv: Option<&Path>,
    out: &Path,
    api: &ApiArgs,
) -> Result<i32, CommandError> {
    let devices = match (count, csv) {
        (Some(n), _) => {
            let tags = crate::server::tags::parse(tags)?;
            let width = n.to_string().len().max(5);
            (1..=n)
                .map(|i| (format!("{prefix}{i:0width$}"), tags.clone()))
                .collect()
        }
        (None, Some(file)) => read_enroll_csv(file)?,
        (None, None) => Vec::new(),
    };
    let started = std::time::Instant::now();
    let c = Client::new(api);
    for batch in devices.chunks(500) {
        let body: Vec<Value> = batch
            .iter()
            .map(|(id, tags)| json!({"id": id, "tags": tags}))
            .collect();
        let v = c.post("/api/v1/enrollments", &json!({ "devices": body }))?;
        for d in v["devices"].as_array().into_iter().flatten() {
            let mut one = v.clone();
            one["devices"] = Value::Null;
            for k in ["device", "cert_pem", "key_pem"] {
                one[k] = d[k].clone();
            }
            let id = d["device"].as_str().unwrap_or("");
            if id.is_empty() || id.contains(['/', '.']) {
                return Err(CommandError::Answer(format!("a device id {id:?}")));
            }
            write_enrollment(&one, &out.join(id))?;
        }
    }
    if api.json {
        print_json(&json!({"enrolled": devices.len(), "out": out}));
    } else {
        println!(
            "enrolled {} devices in {:.1} s; each one's files in {}/<id>/",
            devices.len(),
            started.elapsed().as_secs_f64(),
            out.display()
        );
    }
    Ok(0)
}

/// The (id, tags) rows of an enrollment CSV: `id,tags`, tags as `k=v,k2=v2`
/// (quoted), a header row starting with `id` skipped.
fn read_enroll_csv(file: &Path) -> Result<Vec<(String, crate::server::tags::Tags)>, CommandError> {
    let bad = |reason: String| CommandError::Argument {
        what: "--csv",
        reason,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(file)
        .map_err(|e| bad(format!("{}: {e}", file.display())))?;
    let mut out = Vec::new();
    for (n, row) in reader.records().enumerate() {
        let row = row.map_err(|e| bad(format!("{} row {}: {e}", file.display(), n + 1)))?;
        let id = row.get(0).unwrap_or("").trim();
        if n == 0 && id == "id" {
            continue;
        }
        let tags = crate::server::tags::parse(row.get(1).unwrap_or(""))
            .map_err(|e| bad(format!("{} row {}: tags: {e}", file.display(), n + 1)))?;
        out.push((id.to_owned(), tags));
    }
    Ok(out)
}

/// Writes the files a device needs from an enrollment answer.
pub fn write_enrollment(v: &Value, out: &Path) -> Result<(), CommandError> {
    let put = |name: &str, text: &[u8], mode: u32| {
        crate::ops::operator::write_atomic(&out.join(name), mode, |w| w.write_all(text))
    };
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    put("ca.pem", s("ca_pem").as_bytes(), 0o644)?;
    put("controller.pub", s("controller_key_pem").as_bytes(), 0o644)?;
    put("device.pem", s("cert_pem").as_bytes(), 0o644)?;
    put("device.key", s("key_pem").as_bytes(), 0o600)?;
    if let Some(t) = v["trust_root_hex"].as_str() {
        put(
            "trust-root.cbor",
            &hex::decode(t).map_err(|e| CommandError::Answer(format!("trust_root_hex: {e}")))?,
            0o644,
        )?;
    }
    let mut agent = edgefleet_agent::config::AgentConfig {
        device_id: s("device"),
        ..Default::default()
    };
    agent.broker.url = s("broker_url");
    agent.broker.topic_prefix = s("topic_prefix");
    agent.broker.subscribe_qos = enrolled_subscribe_qos(v).unwrap_or(1);
    let text = toml::to_string_pretty(&agent)
        .map_err(|e| CommandError::Answer(format!("agent.toml: {e}")))?;
    Ok(put(
        "agent.toml",
        format!("# written by `edgefleet devices enroll`; files go to /etc/edgefleet on the device\n{text}").as_bytes(),
        0o644,
    )?)
}

/// The `subscribe_qos` of an enrollment answer: 1 when absent (controllers
/// before 2026-12-07 subscribed at QoS 1), None when it is not 0 or 1.
pub fn enrolled_subscribe_qos(v: &Value) -> Option<u8> {
    match v.get("subscribe_qos") {
        None => Some(1),
        Some(q) => q
            .as_u64()
            .filter(|q| *q <= 1)
            .and_then(|q| u8::try_from(q).ok()),
    }
}

/// `bundles ...`.
pub fn bundles(cmd: BundlesCommand) -> Result<i32, CommandError> {
    match cmd {
        BundlesCommand::Push { file, api } => {
            let v = Client::new(&api).upload("/api/v1/bundles", &file)?;
            if api.json {
                print_json(&v);
            } else {
                let b = &v["bundle"];
                println!(
                    "{} {} {} (release {}) {}",
                    if v["new"].as_bool().unwrap_or(false) {
                        "uploaded"
                    } else {
                        "already stored:"
                    },
                    b["channel"].as_str().unwrap_or(""),
                    b["version"].as_str().unwrap_or(""),
                    b["release"],
                    b["digest"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }
        BundlesCommand::List { api } => {
            let v = Client::new(&api).get("/api/v1/bundles")?;
            if api.json {
                print_json(&v);
            } else {
                for b in v["bundles"].as_array().into_iter().flatten() {
                    println!(
                        "{} {} {} release {} ({} bytes)",
                        b["digest"].as_str().unwrap_or(""),
                        b["channel"].as_str().unwrap_or(""),
                        b["version"].as_str().unwrap_or(""),
                        b["release"],
                        b["size"]
                    );
                }
            }
            Ok(0)
        }
        BundlesCommand::Show { digest, api } => {
            print_json(&Client::new(&api).get(&format!("/api/v1/bundles/{digest}"))?);
            Ok(0)
        }
    }
}

/// One line per wave: a bar and the counts.
pub fn rollout_text(r: &Value) -> String {
    let mut s = format!(
        "rollout {}  {}  wave {} of {}\n",
        r["id"].as_str().unwrap_or(""),
        r["phase"].as_str().unwrap_or(""),
        r["wave"],
        r["waves"].as_array().map_or(0, Vec::len)
    );
    for (i, w) in r["waves"].as_array().into_iter().flatten().enumerate() {
        let n = w["devices"].as_u64().unwrap_or(0).max(1);
        let c = &w["counts"];
        let get = |k: &str| c[k].as_u64().unwrap_or(0);
        let done = get("succeeded") + get("failed") + get("reverted");
        let width = 20u64;
        let filled = (done * width / n) as usize;
        s.push_str(&format!(
            "  wave {:<2} [{}{}] {:>3}/{:<3} pending {} installing {} installed {} failed {} reverted {}\n",
            i + 1,
            "#".repeat(filled),
            ".".repeat(width as usize - filled),
            done,
            n,
            get("pending"),
            get("in_progress"),
            get("succeeded"),
            get("failed"),
            get("reverted"),
        ));
    }
    if let Some(reason) = r["phase_detail"]["reason"].as_str() {
        s.push_str(&format!("  reason: {reason}\n"));
    }
    s
}

/// `rollout ...`.
pub fn rollout(cmd: RolloutCommand) -> Result<i32, CommandError> {
    match cmd {
        RolloutCommand::Start {
            bundle,
            tags,
            devices,
            all,
            agent_version_below,
            waves,
            soak_s,
            max_p95_latency_ratio,
            policy,
            rate_per_minute,
            api,
        } => {
            let mut body = json!({
                "bundle": bundle,
                "selector": {"tags": crate::server::tags::parse(tags.as_deref().unwrap_or(""))?, "devices": devices, "all": all},
            });
            if let Some(v) = agent_version_below {
                body["selector"]["agent_version_below"] = json!(v);
            }
            if !waves.is_empty() {
                body["waves"] = json!(waves);
            }
            if let Some(s) = soak_s {
                body["gates"]["soak_ms"] = json!(s * 1000);
            }
            if let Some(r) = max_p95_latency_ratio {
                body["gates"]["max_p95_latency_ratio"] = json!(r);
            }
            if let Some(p) = policy {
                body["policy"] = json!(p);
            }
            if let Some(r) = rate_per_minute {
                body["rate_per_minute"] = json!(r);
            }
            let v = Client::new(&api).post("/api/v1/rollouts", &body)?;
            if api.json {
                print_json(&v);
            } else {
                print!("{}", rollout_text(&v["rollout"]));
            }
            Ok(0)
        }
        RolloutCommand::Status { id, api } => rollout_status(id.as_deref(), &api),
        RolloutCommand::Watch { id, api } => rollout_watch(&id, &api),
        RolloutCommand::Pause { id, api } => operate(&id, "pause", None, &api),
        RolloutCommand::Resume { id, api } => operate(&id, "resume", None, &api),
        RolloutCommand::Promote { id, api } => operate(&id, "promote", None, &api),
        RolloutCommand::Abort { id, revert, api } => {
            operate(&id, "abort", Some(json!({"revert": revert})), &api)
        }
    }
}

/// `rollout status`: one rollout with its log, or all.
fn rollout_status(id: Option<&str>, api: &ApiArgs) -> Result<i32, CommandError> {
    let c = Client::new(api);
    match id {
        Some(id) => {
            let v = c.get(&format!("/api/v1/rollouts/{id}"))?;
            if api.json {
                print_json(&v);
            } else {
                print!("{}", rollout_text(&v["rollout"]));
                for l in v["rollout"]["log"].as_array().into_iter().flatten() {
                    println!("  - {}", l["note"].as_str().unwrap_or(""));
                }
            }
        }
        None => {
            let v = c.get("/api/v1/rollouts")?;
            if api.json {
                print_json(&v);
            } else {
                for r in v["rollouts"].as_array().into_iter().flatten() {
                    print!("{}", rollout_text(r));
                }
            }
        }
    }
    Ok(0)
}

/// `rollout watch`: prints each change until the rollout ends; 0 when it
/// completed.
fn rollout_watch(id: &str, api: &ApiArgs) -> Result<i32, CommandError> {
    let c = Client::new(api);
    let mut last = String::new();
    loop {
        let v = c.get(&format!("/api/v1/rollouts/{id}"))?;
        let r = &v["rollout"];
        let text = rollout_text(r);
        if text != last {
            if api.json {
                println!("{}", serde_json::to_string(r).unwrap_or_default());
            } else {
                print!("{text}");
            }
            last = text;
        }
        let phase = r["phase"].as_str().unwrap_or("");
        if matches!(phase, "completed" | "halted" | "aborted") {
            return Ok(if phase == "completed" { 0 } else { 1 });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn operate(
    id: &str,
    action: &str,
    body: Option<Value>,
    api: &ApiArgs,
) -> Result<i32, CommandError> {
    let v = Client::new(api).post(
        &format!("/api/v1/rollouts/{id}/{action}"),
        &body.unwrap_or_else(|| json!({})),
    )?;
    if api.json {
        print_json(&v);
    } else {
        println!(
            "rollout {id}: {} (wave {})",
            v["phase"].as_str().unwrap_or(""),
            v["wave"]
        );
    }
    Ok(0)
}
