//! The `edgefleet` command line: argument definitions and the thin handlers that
//! call [`crate::ops::operator`] and print results. Output for people goes to stdout;
//! errors go to stderr with a non-zero exit code (1: refused or failed).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use edgefleet_shared::manifest::{DEFAULT_CHUNK_SIZE, HealthPolicy, Manifest};
use edgefleet_shared::{Arch, ModelChannel, UnixTime};

use crate::ops::operator::{self, BuildOptions, KeyFile, OperatorError};

/// edgefleet: deploy signed ML model bundles to fleets of edge devices.
#[derive(Debug, Parser)]
#[command(name = "edgefleet", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole story on this machine (today: the signed-bundle workflow).
    Demo(DemoArgs),
    /// Signing keys (stay with the operator, never on the controller).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Trust roots: which keys devices accept, k of n, and key rotation.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Model bundles: build, sign, verify, inspect.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Agent releases: the agent's own binaries, signed by the trust root's
    /// agent-release role (sign and verify them with `edgefleet bundle`).
    #[command(subcommand)]
    AgentRelease(AgentReleaseCommand),
    /// Run the controller: HTTP API, embedded MQTT broker, SQLite store, rollouts.
    Serve(crate::ops::remote::ServeArgs),
    /// The controller's configuration file.
    #[command(subcommand)]
    Config(crate::ops::remote::ConfigCommand),
    /// Brokers: prepare Mosquitto (certificates, ACL, configuration) for the fleet.
    #[command(subcommand)]
    Broker(crate::ops::remote::BrokerCommand),
    /// Devices on a controller: enroll, list, show.
    #[command(subcommand)]
    Devices(crate::ops::remote::DevicesCommand),
    /// Bundles on a controller: push, list, show.
    #[command(subcommand)]
    Bundles(crate::ops::remote::BundlesCommand),
    /// Staged rollouts on a controller.
    #[command(subcommand)]
    Rollout(crate::ops::remote::RolloutCommand),
    /// Put the agent onto a device: enroll it, then install the binary for its
    /// profile, its config, certificate, key, trust root and systemd unit.
    Flash(Box<crate::ops::flash::FlashArgs>),
}

/// `edgefleet demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's files in this directory (default: a temporary directory
    /// that is removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Simulated devices in the fleet.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Keep the controller and the fleet running at the end (Ctrl-C stops them).
    #[arg(long)]
    pub keep_running: bool,
}

/// `edgefleet keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an Ed25519 key pair: <out>/<name>.key (secret, mode 0600) and .pub.
    Generate {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// File name stem.
        #[arg(long, default_value = "signing")]
        name: String,
    },
}

/// `edgefleet trust ...`.
#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Create a trust root (version 1) listing keys; secret keys given also sign it.
    Init {
        /// Key files (.pub to list, .key to list and sign); repeat for k of n.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// How many distinct keys must sign a bundle (k).
        #[arg(long)]
        threshold: u16,
        /// Days until the root expires.
        #[arg(long, default_value_t = 365)]
        expires_in_days: u32,
        /// The keys that sign agent releases.
        #[command(flatten)]
        agent_releases: AgentReleaseRoleArgs,
        /// Where to write the root.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create the next trust root from the current one (key rotation). It must be
    /// signed by k keys of the current root and k of its own to be accepted.
    Rotate {
        /// The current trust root.
        #[arg(long)]
        current: PathBuf,
        /// Key files of the new root (.key files also sign).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Threshold of the new root.
        #[arg(long)]
        threshold: u16,
        /// Secret keys of the current root that sign the new one.
        #[arg(long = "sign-with")]
        sign_with: Vec<PathBuf>,
        /// Days until the new root expires.
        #[arg(long, default_value_t = 365)]
        expires_in_days: u32,
        /// The new root's keys that sign agent releases (default: the current
        /// root's, kept).
        #[command(flatten)]
        agent_releases: AgentReleaseRoleArgs,
        /// Where to write the new root.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add signatures to a trust root file (for keys held by other people).
    Sign {
        /// The trust root file.
        file: PathBuf,
        /// Secret keys to sign with.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Check a trust root: on its own, or as the successor of --current.
    Verify {
        /// The trust root file.
        file: PathBuf,
        /// The root it should succeed (rotation check).
        #[arg(long)]
        current: Option<PathBuf>,
    },
}

/// `--agent-release-key`/`--agent-release-threshold` of `trust init` and `rotate`.
#[derive(Debug, Args)]
pub struct AgentReleaseRoleArgs {
    /// Keys that sign agent releases (.pub or .key files; repeat for k of n).
    /// They have their own threshold and cannot sign models or the root.
    #[arg(long = "agent-release-key")]
    agent_release_keys: Vec<PathBuf>,
    /// How many distinct agent-release keys must sign an agent release.
    #[arg(long, default_value_t = 1, requires = "agent_release_keys")]
    agent_release_threshold: u16,
}

impl AgentReleaseRoleArgs {
    /// The role the flags give (None without any key).
    fn role(&self) -> Result<Option<edgefleet_shared::trust::RoleKeys>, OperatorError> {
        if self.agent_release_keys.is_empty() {
            return Ok(None);
        }
        let keys = operator::distinct_publics(&load_keys(&self.agent_release_keys)?);
        Ok(Some(edgefleet_shared::trust::RoleKeys {
            threshold: self.agent_release_threshold,
            keys,
        }))
    }
}

/// `edgefleet bundle ...`.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Build a bundle from an ONNX model: proves the model loads and runs on the
    /// device runtime, records golden outputs, summarises reference data.
    Build(Box<BuildArgs>),
    /// Add signatures to a bundle (repeat --key for k of n).
    Sign {
        /// The bundle file.
        file: PathBuf,
        /// Secret key files.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Verify a bundle completely against a trust root, as a device would.
    Verify {
        /// The bundle file.
        file: PathBuf,
        /// The trust root file.
        #[arg(long)]
        trust: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a bundle's manifest (signatures are listed, not verified).
    Inspect {
        /// The bundle file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `edgefleet agent-release ...`.
#[derive(Debug, Subcommand)]
pub enum AgentReleaseCommand {
    /// Build one release file from the static agent binaries of each target
    /// (`cross/build.sh`), their architectures checked from their ELF headers.
    Build(Box<AgentReleaseArgs>),
}

/// `edgefleet agent-release build` arguments.
#[derive(Debug, Args)]
pub struct AgentReleaseArgs {
    /// An agent binary, e.g. cross/out/aarch64-unknown-linux-musl/edgefleet-agent
    /// (repeat, one per target, each followed by its --target).
    #[arg(long = "binary", required = true)]
    pub binaries: Vec<PathBuf>,
    /// The target triple of the --binary at the same position.
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    /// The agent's version (the binary's `--version` must say it).
    #[arg(long)]
    pub version: semver::Version,
    /// Release number: must grow with every agent release (devices refuse a
    /// downgrade).
    #[arg(long)]
    pub release: u64,
    /// Where to write the release, e.g. agent-1.3.0.efb.
    #[arg(long)]
    pub out: PathBuf,
    /// Sign right away with these secret keys (the agent-release role's).
    #[arg(long = "key")]
    pub keys: Vec<PathBuf>,
    /// Days until the release expires.
    #[arg(long, default_value_t = 90)]
    pub expires_in_days: u32,
    /// Lowest running agent version that may install it.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub min_agent_version: semver::Version,
    /// Memory a device needs free for the new agent during the hand-over, in MiB.
    #[arg(long, default_value_t = operator::agent_release::AGENT_RELEASE_MEMORY >> 20)]
    pub memory_mib: u64,
    /// Transfer chunk size in KiB (4 to 4096).
    #[arg(long, default_value_t = operator::agent_release::AGENT_RELEASE_CHUNK / 1024)]
    pub chunk_kib: u32,
    /// Accept binaries that need a dynamic loader (devices must have it).
    #[arg(long)]
    pub allow_dynamic: bool,
}

/// `edgefleet bundle build` arguments.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The ONNX model.
    #[arg(long)]
    pub model: PathBuf,
    /// Model channel (the model's name).
    #[arg(long)]
    pub channel: ModelChannel,
    /// Semantic version, e.g. 1.4.0.
    #[arg(long)]
    pub version: semver::Version,
    /// Release number; must grow with every bundle of the channel.
    #[arg(long)]
    pub release: u64,
    /// Reference data for drift statistics: CSV with a header row, or a .npy array.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Reference columns holding category codes (integers), compared category by
    /// category instead of in quantile bins (repeatable, or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub categorical: Vec<String>,
    /// Drift: PSI at or above this flags a feature (with --reference).
    #[arg(long, default_value_t = edgefleet_shared::reference::Thresholds::default().psi)]
    pub drift_psi: f64,
    /// Drift: a KS or chi-square p-value below this flags a feature.
    #[arg(long, default_value_t = edgefleet_shared::reference::Thresholds::default().p_value)]
    pub drift_p_value: f64,
    /// Drift: share of drifted input features that flags the whole window.
    #[arg(long, default_value_t = edgefleet_shared::reference::Thresholds::default().drifted_share)]
    pub drift_share: f64,
    /// Golden cases (JSON): inputs, and optionally expected outputs.
    #[arg(long)]
    pub golden: Option<PathBuf>,
    /// Extra metadata file to carry (repeatable; e.g. labels.json, preprocessing.json).
    #[arg(long)]
    pub metadata: Vec<PathBuf>,
    /// Where to write the bundle.
    #[arg(long)]
    pub out: PathBuf,
    /// Sign right away with these secret keys.
    #[arg(long = "key")]
    pub keys: Vec<PathBuf>,
    /// Days until the bundle expires.
    #[arg(long, default_value_t = 90)]
    pub expires_in_days: u32,
    /// Architectures allowed (comma-separated, e.g. x86_64,aarch64,arm); any if absent.
    #[arg(long, value_delimiter = ',')]
    pub arch: Vec<Arch>,
    /// Lowest agent version allowed.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub min_agent_version: semver::Version,
    /// Memory the model needs, in MiB (estimated from the model size if absent).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Transfer chunk size in KiB (4 to 4096).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE / 1024)]
    pub chunk_kib: u32,
    /// Health check: absolute tolerance per output element.
    #[arg(long, default_value_t = HealthPolicy::default().abs_tolerance)]
    pub abs_tolerance: f64,
    /// Health check: relative tolerance per output element.
    #[arg(long, default_value_t = HealthPolicy::default().rel_tolerance)]
    pub rel_tolerance: f64,
    /// Testing a fleet's canary: record the golden outputs of this other model, so
    /// that the bundle fails its health check on every device.
    #[arg(long)]
    pub golden_outputs_from: Option<PathBuf>,
    /// Health check: latency budget per golden case, milliseconds.
    #[arg(long, default_value_t = HealthPolicy::default().latency_budget_ms)]
    pub latency_budget_ms: u32,
}

/// Why the command failed, and its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An operator command failed.
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// A controller command failed.
    #[error(transparent)]
    Command(#[from] crate::ops::remote::CommandError),
    /// `edgefleet flash` failed.
    #[error(transparent)]
    Flash(#[from] crate::ops::flash::FlashError),
    /// The demo failed.
    #[error(transparent)]
    Demo(#[from] crate::ops::demo::DemoError),
    /// Printing JSON failed.
    #[error("cannot print JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn load_keys(paths: &[PathBuf]) -> Result<Vec<KeyFile>, OperatorError> {
    paths.iter().map(|p| operator::load_key(p)).collect()
}

fn load_secrets(paths: &[PathBuf]) -> Result<Vec<edgefleet_shared::SecretKey>, OperatorError> {
    paths.iter().map(|p| operator::load_secret_key(p)).collect()
}

fn bytes_text(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Human description of a manifest (shared by `inspect`, `verify` and the demo).
/// "iris 1.2.0 (release 3)", or "agent release 1.3.0 (release 2)".
fn bundle_title(m: &Manifest) -> String {
    let what = match m.role() {
        Some(edgefleet_shared::trust::Role::AgentReleases) => "agent release".to_string(),
        _ => m.channel.to_string(),
    };
    format!("{what} {} (release {})", m.version, m.release)
}

pub fn describe_manifest(m: &Manifest, digest: &edgefleet_shared::Digest) -> String {
    let mut s = String::new();
    let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("  {k:<12} {v}\n"));
    line(&mut s, "bundle", bundle_title(m));
    line(&mut s, "digest", digest.to_hex());
    line(&mut s, "created", m.created_at.to_string());
    line(&mut s, "expires", m.expires_at.to_string());
    for a in &m.artifacts {
        line(
            &mut s,
            "artifact",
            format!(
                "{} ({}, {}, sha256 {})",
                a.name,
                format!("{:?}", a.kind).to_lowercase(),
                bytes_text(a.size),
                a.sha256.short()
            ),
        );
    }
    for t in &m.schema.inputs {
        line(
            &mut s,
            "input",
            format!("{} {} {}", t.name, t.dtype, t.shape_text()),
        );
    }
    for t in &m.schema.outputs {
        line(
            &mut s,
            "output",
            format!("{} {} {}", t.name, t.dtype, t.shape_text()),
        );
    }
    let archs = if m.constraints.architectures.is_empty() {
        "any".to_string()
    } else {
        m.constraints
            .architectures
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    line(
        &mut s,
        "requires",
        format!(
            "architecture {archs}; agent >= {}; memory {}",
            m.constraints.min_agent_version,
            bytes_text(m.constraints.memory_bytes)
        ),
    );
    // An agent release has no model to check (its health field is unused).
    if m.role() != Some(edgefleet_shared::trust::Role::AgentReleases) {
        line(
            &mut s,
            "health",
            format!(
                "outputs within abs {} + rel {}; {} ms per case",
                m.health.abs_tolerance, m.health.rel_tolerance, m.health.latency_budget_ms
            ),
        );
    }
    line(
        &mut s,
        "payload",
        format!(
            "{} in {} chunk(s) of {}",
            bytes_text(m.payload.size),
            m.payload.chunks.len(),
            bytes_text(m.payload.chunk_size.into())
        ),
    );
    s
}

/// Runs one command; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32, CliError> {
    let now = UnixTime::now();
    match cli.command {
        Command::Demo(args) => crate::ops::demo::run(&crate::ops::demo::DemoOptions {
            dir: args.dir,
            devices: args.devices,
            keep_running: args.keep_running,
        })
        .map_err(CliError::from),
        Command::Serve(args) => crate::ops::remote::serve(args).map_err(CliError::from),
        Command::Config(c) => crate::ops::remote::config(c).map_err(CliError::from),
        Command::Broker(c) => crate::ops::remote::broker(c).map_err(CliError::from),
        Command::Devices(c) => crate::ops::remote::devices(c).map_err(CliError::from),
        Command::Bundles(c) => crate::ops::remote::bundles(c).map_err(CliError::from),
        Command::Rollout(c) => crate::ops::remote::rollout(c).map_err(CliError::from),
        Command::Flash(a) => crate::ops::flash::flash(*a).map_err(CliError::from),
        Command::Keys(KeysCommand::Generate { out, name }) => {
            let (secret, public, key) = operator::generate_key(&out, &name)?;
            println!("generated key {}", key.public().id());
            println!(
                "  secret  {} (mode 0600; keep it off the controller)",
                secret.display()
            );
            println!("  public  {}", public.display());
            Ok(0)
        }
        Command::Trust(cmd) => trust(cmd, now),
        Command::Bundle(cmd) => bundle(cmd, now),
        Command::AgentRelease(AgentReleaseCommand::Build(args)) => agent_release_build(*args, now),
    }
}

/// The last line of a build: its signatures, or how to add them (`whose`: what
/// key to use, after "KEY").
fn print_signatures(out: &Path, signatures: usize, whose: &str) {
    if signatures == 0 {
        println!(
            "  unsigned: sign it with `edgefleet bundle sign {} --key KEY`{whose}",
            out.display()
        );
    } else {
        println!("  signatures   {signatures}");
    }
}

/// `agent-release build`.
fn agent_release_build(args: AgentReleaseArgs, now: UnixTime) -> Result<i32, CliError> {
    if args.binaries.len() != args.targets.len() {
        return Err(OperatorError::Input {
            what: "--binary/--target".into(),
            detail: format!(
                "{} binaries and {} targets: give each --binary its --target",
                args.binaries.len(),
                args.targets.len()
            ),
        }
        .into());
    }
    let opts = operator::AgentReleaseOptions {
        binaries: args.binaries.into_iter().zip(args.targets).collect(),
        version: args.version,
        release: args.release,
        min_agent_version: args.min_agent_version,
        memory_bytes: args.memory_mib.saturating_mul(1 << 20),
        chunk_size: args.chunk_kib.saturating_mul(1024),
        now,
        expires_in_days: args.expires_in_days,
        allow_dynamic: args.allow_dynamic,
        signers: load_secrets(&args.keys)?,
    };
    let report = operator::build_agent_release(&opts, &args.out)?;
    println!("built {}", args.out.display());
    print!("{}", describe_manifest(&report.manifest, &report.digest));
    for b in &report.binaries {
        println!(
            "  binary       {} for {} ({}, {})",
            b.path.display(),
            b.target,
            bytes_text(b.size),
            if b.dynamic {
                "needs a dynamic loader"
            } else {
                "static"
            }
        );
    }
    print_signatures(&args.out, report.signatures, " (an agent-release key)");
    Ok(0)
}

fn trust(cmd: TrustCommand, now: UnixTime) -> Result<i32, CliError> {
    match cmd {
        TrustCommand::Init {
            keys,
            threshold,
            expires_in_days,
            agent_releases,
            out,
        } => {
            let keys = load_keys(&keys)?;
            let expires = now.plus_days(i64::from(expires_in_days));
            let role = agent_releases.role()?;
            let root =
                operator::new_trust_root_with_roles(&keys, threshold, 1, expires, role, &[])?;
            operator::save_trust_root(&out, &root)?;
            report_root(&out, &root, now);
            Ok(0)
        }
        TrustCommand::Rotate {
            current,
            keys,
            threshold,
            sign_with,
            expires_in_days,
            agent_releases,
            out,
        } => {
            let current_file = operator::load_trust_file(&current)?;
            let current_root = current_file
                .decode()
                .map_err(|source| OperatorError::Trust {
                    path: current.clone(),
                    source,
                })?;
            let keys = load_keys(&keys)?;
            let old_signers = load_secrets(&sign_with)?;
            let expires = now.plus_days(i64::from(expires_in_days));
            let role = agent_releases
                .role()?
                .or(current_root.agent_releases.clone());
            let next = operator::new_trust_root_with_roles(
                &keys,
                threshold,
                current_root.version + 1,
                expires,
                role,
                &old_signers,
            )?;
            operator::save_trust_root(&out, &next)?;
            println!(
                "wrote trust root version {} to {}",
                current_root.version + 1,
                out.display()
            );
            println!("  {}", agent_release_role_text(next.decode().ok().as_ref()));
            match current_root.accept_rotation(&next, now) {
                Ok(_) => println!(
                    "  devices on version {} will accept it",
                    current_root.version
                ),
                Err(e) => println!(
                    "  not yet acceptable: {e}\n  add signatures with `edgefleet trust sign {} --key ...`",
                    out.display()
                ),
            }
            Ok(0)
        }
        TrustCommand::Sign { file, keys } => {
            let mut root = operator::load_trust_file(&file)?;
            for k in load_secrets(&keys)? {
                root.sign(&k);
            }
            operator::save_trust_root(&file, &root)?;
            report_root(&file, &root, now);
            Ok(0)
        }
        TrustCommand::Verify { file, current } => trust_verify(&file, current.as_deref(), now),
    }
}

/// `trust verify`: a root on its own, or as the rotation of `current`.
fn trust_verify(file: &Path, current: Option<&Path>, now: UnixTime) -> Result<i32, CliError> {
    let root = operator::load_trust_file(file)?;
    let result = match current {
        Some(cur) => operator::load_trust_root(cur, now)
            .map(|_| ())
            .and_then(|_| {
                let cur_root = operator::load_trust_file(cur)?.decode().map_err(|source| {
                    OperatorError::Trust {
                        path: cur.to_owned(),
                        source,
                    }
                })?;
                cur_root
                    .accept_rotation(&root, now)
                    .map(|_| ())
                    .map_err(|source| OperatorError::Trust {
                        path: file.to_owned(),
                        source,
                    })
            }),
        None => root
            .verify_self(now)
            .map(|_| ())
            .map_err(|source| OperatorError::Trust {
                path: file.to_owned(),
                source,
            }),
    };
    match result {
        Ok(()) => {
            println!("OK: {} is a valid trust root", file.display());
            Ok(0)
        }
        Err(e) => {
            println!("REFUSED: {e}");
            Ok(1)
        }
    }
}

/// One line on a root's agent-release role.
fn agent_release_role_text(root: Option<&edgefleet_shared::TrustRoot>) -> String {
    match root.and_then(|r| r.agent_releases.as_ref()) {
        Some(role) => format!(
            "agent releases: {} key(s), threshold {}",
            role.keys.len(),
            role.threshold
        ),
        None => "agent releases: no role (devices refuse every agent release)".into(),
    }
}

fn report_root(path: &Path, root: &edgefleet_shared::SignedTrustRoot, now: UnixTime) {
    match root.decode() {
        Ok(doc) => {
            println!(
                "trust root version {} at {}: {} key(s), threshold {}, expires {}",
                doc.version,
                path.display(),
                doc.keys.len(),
                doc.threshold,
                doc.expires_at
            );
            for k in &doc.keys {
                let signed = root.signatures.iter().any(|s| s.key == k.id());
                println!(
                    "  key {} {}",
                    k.id(),
                    if signed { "signed" } else { "not signed yet" }
                );
            }
            println!("  {}", agent_release_role_text(Some(&doc)));
            for k in doc.agent_releases.iter().flat_map(|r| &r.keys) {
                println!("  agent-release key {}", k.id());
            }
            match root.verify_self(now) {
                Ok(_) => println!("  complete: devices can pin it"),
                Err(e) => println!(
                    "  incomplete: {e}\n  add signatures with `edgefleet trust sign {} --key ...`",
                    path.display()
                ),
            }
        }
        Err(e) => println!("{}: {e}", path.display()),
    }
}

fn bundle(cmd: BundleCommand, now: UnixTime) -> Result<i32, CliError> {
    match cmd {
        BundleCommand::Build(args) => bundle_build(*args, now),
        BundleCommand::Sign { file, keys } => {
            let header = operator::sign_bundle(&file, &load_secrets(&keys)?)?;
            println!(
                "signed {} ({} signature(s))",
                file.display(),
                header.signatures.len()
            );
            for s in &header.signatures {
                println!("  key {}", s.key);
            }
            Ok(0)
        }
        BundleCommand::Verify { file, trust, json } => bundle_verify(&file, &trust, json, now),
        BundleCommand::Inspect { file, json } => {
            let header = operator::read_header(&file)?;
            let digest = header.digest();
            let manifest = header
                .decode_unverified()
                .map_err(|e| OperatorError::Input {
                    what: file.display().to_string(),
                    detail: format!("manifest cannot be read: {e}"),
                })?;
            if json {
                let out = serde_json::json!({
                    "digest": digest,
                    "manifest": manifest,
                    "signatures": header.signatures.iter().map(|s| s.key).collect::<Vec<_>>(),
                    "verified": false,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", describe_manifest(&manifest, &digest));
                for s in &header.signatures {
                    println!("  signature    key {}", s.key);
                }
                println!(
                    "  (signatures listed, not verified: use `edgefleet bundle verify --trust ROOT`)"
                );
            }
            Ok(0)
        }
    }
}

/// `bundle build`.
fn bundle_build(args: BuildArgs, now: UnixTime) -> Result<i32, CliError> {
    let opts = BuildOptions {
        model: args.model,
        channel: args.channel,
        version: args.version,
        release: args.release,
        reference: args.reference,
        categorical: args.categorical,
        drift_thresholds: edgefleet_shared::reference::Thresholds {
            psi: args.drift_psi,
            p_value: args.drift_p_value,
            drifted_share: args.drift_share,
        },
        golden: args.golden,
        metadata: args.metadata,
        now,
        expires_in_days: args.expires_in_days,
        architectures: args.arch,
        min_agent_version: args.min_agent_version,
        memory_bytes: args.memory_mib.map(|m| m << 20),
        chunk_size: args.chunk_kib.saturating_mul(1024),
        health: HealthPolicy {
            abs_tolerance: args.abs_tolerance,
            rel_tolerance: args.rel_tolerance,
            latency_budget_ms: args.latency_budget_ms,
        },
        signers: load_secrets(&args.keys)?,
        golden_outputs_from: args.golden_outputs_from.clone(),
    };
    let report = operator::build_bundle(&opts, &args.out)?;
    println!("built {}", args.out.display());
    print!("{}", describe_manifest(&report.manifest, &report.digest));
    println!(
        "  golden       {} case(s), {}",
        report.golden_cases,
        if report.golden_from_file {
            "outputs checked against the file"
        } else {
            "generated input, outputs recorded from the model"
        }
    );
    if report.inlined_external_data {
        println!("  weights      copied in from the model's external data file(s)");
    }
    match report.reference_rows {
        Some(rows) => println!("  reference    {rows} rows summarised"),
        None => {
            println!("  reference    none (no drift statistics; pass --reference data.csv)")
        }
    }
    print_signatures(&args.out, report.signatures, "");
    Ok(0)
}

/// `bundle verify`: 0 when the bundle verifies, 1 when it is refused.
fn bundle_verify(file: &Path, trust: &Path, json: bool, now: UnixTime) -> Result<i32, CliError> {
    let root = operator::load_trust_root(trust, now)?;
    match operator::verify_bundle(file, &root, now, None) {
        Ok(v) => {
            if json {
                let out = serde_json::json!({
                    "ok": true,
                    "digest": v.digest,
                    "channel": v.manifest.channel,
                    "version": v.manifest.version,
                    "release": v.manifest.release,
                    "signed_by": v.signed_by,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("OK: {} verified", file.display());
                print!("{}", describe_manifest(&v.manifest, &v.digest));
                for k in &v.signed_by {
                    println!("  signed by    {k}");
                }
            }
            Ok(0)
        }
        Err(OperatorError::Bundle {
            source: edgefleet_shared::BundleError::Refused(r),
            ..
        }) => {
            if json {
                let out = serde_json::json!({ "ok": false, "code": r.code(), "reason": r, "message": r.to_string() });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("REFUSED ({}): {r}", r.code());
            }
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}
