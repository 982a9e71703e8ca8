//! `edgefleet flash`: puts the agent onto a device in one command. It enrolls
//! the device (or uses an existing enrollment), then installs the agent binary
//! for the profile's target, `agent.toml`, the device certificate and key
//! (0600), the pinned trust root, a hardened systemd unit with its system user
//! (sysusers.d) and file ownership (tmpfiles.d), enabled for boot; into a
//! mounted root filesystem (`--root`), an install archive (`--out`), or a host
//! over SSH (`--ssh`).
//!
//! Everything is checked before the controller is asked for a certificate:
//! the profile, the binary (it must be an ELF for the profile's architecture),
//! the destination (writable), and the device id (not taken). Files are staged
//! beside their destinations and moved into place only when all are written,
//! `agent.toml` last: a flash that fails leaves the old files as they were.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use clap::{ArgGroup, Args};
use edgefleet_devices::Profile;
use serde_json::{Value, json};

use crate::ops::client::{ApiArgs, Client, ClientError};
use crate::ops::operator::{OperatorError, read_capped};

/// The shipped systemd unit; paths are rewritten for the profile.
const UNIT: &str = include_str!("../../../agent/edgefleet-agent.service");

/// Largest agent binary flashed (the static builds are about 10 MB).
const MAX_BINARY: u64 = 128 << 20;

/// Largest profile file read.
const MAX_PROFILE: u64 = 64 << 10;

/// Suffix of staged files, beside their destination (same filesystem).
const STAGED: &str = ".edgefleet-new";

/// Why a flash stopped. Nothing is installed unless every file was written
/// (see [`install_into`]); the messages name the flag or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    /// An argument or a file it names cannot be used (`what` names it).
    #[error("{what}: {reason}")]
    Argument {
        /// The flag and its value.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The profile is not acceptable.
    #[error(transparent)]
    Profile(#[from] edgefleet_devices::ProfileError),
    /// No agent binary where one was expected.
    #[error(
        "no agent binary for {target} at {}: build it with `cross/build.sh {target}` (or pass --binary FILE)",
        path.display()
    )]
    NoBinary {
        /// The profile's target.
        target: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The binary is not an agent for this profile's device.
    #[error("{}: {reason}", path.display())]
    Binary {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The binary is an agent for another architecture than the profile's.
    #[error("{} is an agent for {arch}, but profile {profile} is {profile_arch} ({target})", path.display())]
    WrongArch {
        /// The binary.
        path: PathBuf,
        /// Its architecture.
        arch: &'static str,
        /// The profile.
        profile: String,
        /// The profile's architecture.
        profile_arch: String,
        /// The profile's target triple.
        target: String,
    },
    /// The destination cannot take the install (`what` names it).
    #[error("{what}: {reason}")]
    Destination {
        /// The flag and its value.
        what: String,
        /// Why.
        reason: String,
    },
    /// The device id is enrolled already.
    #[error(
        "device id {id} is taken ({how}; last seen {last_seen}): choose another id, pass --enrollment DIR with its files, or --replace to issue a new certificate (the old one stops working)"
    )]
    Taken {
        /// The device id.
        id: String,
        /// `enrolled` or `seen on the broker`.
        how: &'static str,
        /// When the controller last heard of it.
        last_seen: String,
    },
    /// The controller's enrollment answer lacks a field a device needs.
    #[error("the controller's enrollment has no {0}")]
    EnrollmentField(&'static str),
    /// The controller's enrollment answer cannot be used.
    #[error("{0}")]
    Enrollment(&'static str),
    /// The files for the device cannot be made from the profile.
    #[error("the device's files: {0}")]
    DeviceFiles(String),
    /// Writing the install failed (nothing was installed when `staged` says so).
    #[error("{}{}: {source}", if *staged { "nothing installed: " } else { "" }, path.display())]
    Install {
        /// True when it failed before anything was moved into place.
        staged: bool,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `ssh` failed, or the install on the host did.
    #[error("--ssh {host}: {reason}")]
    Ssh {
        /// The host.
        host: String,
        /// What failed (ssh's or the script's message).
        reason: String,
    },
    /// The controller refused or failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A file could not be read or written.
    #[error(transparent)]
    Operator(#[from] OperatorError),
}

fn argument(what: impl Into<String>, reason: impl std::fmt::Display) -> FlashError {
    FlashError::Argument {
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn destination(what: impl Into<String>, reason: impl std::fmt::Display) -> FlashError {
    FlashError::Destination {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// `edgefleet flash`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("destination").required(true).args(["root", "out", "ssh"])))]
pub struct FlashArgs {
    /// Device profile: a file (`devices/raspberry-pi-4.toml`) or the name of a
    /// shipped one (`raspberry-pi-4`).
    #[arg(long)]
    pub profile: String,
    /// The device's id (its certificate's common name).
    #[arg(long)]
    pub device_id: String,
    /// Tags of a new enrollment, `k=v,k2=v2`.
    #[arg(long, default_value = "")]
    pub tags: String,
    /// The agent binary (default: `cross/out/<target>/edgefleet-agent`, where
    /// `cross/build.sh` puts it).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Use this enrollment (the files of `edgefleet devices enroll --out DIR`)
    /// instead of enrolling the device now.
    #[arg(long, conflicts_with = "replace")]
    pub enrollment: Option<PathBuf>,
    /// Enroll again a device id that is taken: a new certificate is issued and
    /// the old one stops working.
    #[arg(long)]
    pub replace: bool,
    /// Install into this mounted root filesystem (an SD card's root partition,
    /// or any directory), laid out as on the device.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Write an install archive (`.tar.gz` with an `install.sh`) instead.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Install over SSH (`user@host`, or `ssh://user@host:port`); needs `ssh`
    /// here and `sh`, `tar` and `gzip` on the device.
    #[arg(long)]
    pub ssh: Option<String>,
    /// With `--ssh`: the root filesystem on that host (default `/`: the host
    /// itself, whose service is then enabled and started).
    #[arg(long, requires = "ssh")]
    pub remote_root: Option<PathBuf>,
    /// With `--ssh`: an `ssh -o` option (repeatable), e.g. `IdentityFile=...`.
    #[arg(long = "ssh-option", requires = "ssh")]
    pub ssh_options: Vec<String>,
    /// Overwrite an agent already installed at the destination.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// One file of the device's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFile {
    /// Absolute path on the device.
    pub path: PathBuf,
    /// Permission bits.
    pub mode: u32,
    /// What it holds (a symbolic link's target for [`FileKind::Link`]).
    pub contents: Vec<u8>,
    /// A file or a symbolic link.
    pub kind: FileKind,
}

/// What a [`DeviceFile`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A symbolic link (to the path in `contents`).
    Link,
}

/// The files of an enrollment, as `edgefleet devices enroll` writes them.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// Broker URL for the device.
    pub broker_url: String,
    /// Topic prefix.
    pub topic_prefix: String,
    /// QoS of the device's subscriptions (1, or 0 on a NATS cluster).
    pub subscribe_qos: u8,
    /// CA certificate (PEM).
    pub ca_pem: String,
    /// The controller's command key, public half (PEM): the device carries out
    /// only commands it signed.
    pub controller_key_pem: String,
    /// Device certificate (PEM).
    pub cert_pem: String,
    /// Device key (PEM).
    pub key_pem: String,
    /// The fleet's trust root (CBOR).
    pub trust_root: Vec<u8>,
}

/// Where a flash goes.
#[derive(Debug)]
enum Destination {
    Root(PathBuf),
    Archive(PathBuf),
    Ssh {
        host: String,
        root: PathBuf,
        options: Vec<String>,
    },
}

/// `edgefleet flash`.
pub fn flash(args: FlashArgs) -> Result<i32, FlashError> {
    let profile = load_profile(&args.profile)?;
    let id = edgefleet_shared::DeviceId::new(&args.device_id)
        .map_err(|e| argument("--device-id", e))?
        .to_string();
    let binary_path = args.binary.clone().unwrap_or_else(|| {
        Path::new("cross/out")
            .join(&profile.target)
            .join("edgefleet-agent")
    });
    let binary = read_binary(&binary_path, &profile)?;
    let destination = match (&args.root, &args.out, &args.ssh) {
        (Some(r), _, _) => Destination::Root(r.clone()),
        (_, Some(o), _) => Destination::Archive(o.clone()),
        (_, _, Some(h)) => Destination::Ssh {
            host: h.clone(),
            root: args.remote_root.clone().unwrap_or_else(|| "/".into()),
            options: args.ssh_options.clone(),
        },
        _ => {
            return Err(argument(
                "flash",
                "name a destination: --root, --out or --ssh",
            ));
        }
    };
    preflight(&destination, &profile, args.force)?;
    let client = Client::new(&args.api);
    let (enrollment, how) = match &args.enrollment {
        Some(dir) => (read_enrollment(dir, &id)?, "existing enrollment"),
        None => (enroll(&client, &id, &args.tags, args.replace)?, "enrolled"),
    };
    let files = device_files(&profile, &id, &binary.bytes, &enrollment)?;
    match &destination {
        Destination::Root(root) => install_into(root, &files, &profile)?,
        Destination::Archive(out) => {
            let archive = archive(&files, &profile, &id)?;
            crate::ops::operator::write_atomic(out, 0o644, |w| w.write_all(&archive))?;
        }
        Destination::Ssh {
            host,
            root,
            options,
        } => {
            let archive = archive(&files, &profile, &id)?;
            ssh_install(host, options, root, &archive, args.force)?;
        }
    }
    let flashed = Flashed {
        id: &id,
        profile: &profile,
        binary_path: &binary_path,
        is_static: binary.is_static,
        how,
        files: &files,
        broker_url: &enrollment.broker_url,
    };
    flashed.report(&destination, args.api.json);
    Ok(0)
}

/// What a flash did, for its report.
struct Flashed<'a> {
    id: &'a str,
    profile: &'a Profile,
    binary_path: &'a Path,
    is_static: bool,
    how: &'static str,
    files: &'a [DeviceFile],
    broker_url: &'a str,
}

impl Flashed<'_> {
    /// Prints what was installed where (JSON with `--json`).
    fn report(&self, destination: &Destination, json: bool) {
        let where_to = match destination {
            Destination::Root(r) => format!("into {}", r.display()),
            Destination::Archive(o) => format!(
                "as {} (on the device: tar -xzf it, then sudo sh edgefleet-flash/install.sh)",
                o.display()
            ),
            Destination::Ssh { host, root, .. } => format!("on {host}:{}", root.display()),
        };
        if json {
            println!(
                "{}",
                json!({
                    "device": self.id,
                    "profile": self.profile.name,
                    "target": self.profile.target,
                    "binary": self.binary_path,
                    "static": self.is_static,
                    "enrollment": self.how,
                    "files": self.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
                })
            );
        } else {
            println!(
                "flashed {} ({}, {}; {}) {where_to}",
                self.id, self.profile.name, self.profile.target, self.how
            );
            for f in self.files {
                match f.kind {
                    FileKind::File => println!("  {:o} {}", f.mode, f.path.display()),
                    FileKind::Link => println!(
                        "  link {} -> {}",
                        f.path.display(),
                        String::from_utf8_lossy(&f.contents)
                    ),
                }
            }
            if !self.is_static {
                println!(
                    "note: {} is dynamically linked: the device needs the same C library (cross/build.sh builds static ones)",
                    self.binary_path.display()
                );
            }
            println!(
                "the agent starts at boot (systemd unit {}) and connects to {}",
                self.profile.install.unit.display(),
                self.broker_url
            );
        }
    }
}

/// A profile from a file (a path, or a name ending in `.toml`) or a shipped one.
pub fn load_profile(arg: &str) -> Result<Profile, FlashError> {
    let path = Path::new(arg);
    if !(arg.ends_with(".toml") || arg.contains('/')) {
        return Ok(Profile::builtin(arg)?);
    }
    let text = read_capped(path, MAX_PROFILE).map_err(|e| argument("--profile", e))?;
    let text =
        String::from_utf8(text).map_err(|_| argument(format!("--profile {arg}"), "not UTF-8"))?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("profile");
    let profile = Profile::parse(stem, &text)?;
    if profile.name != stem {
        return Err(argument(
            format!("--profile {arg}"),
            format!("its name is `{}`, not the file's `{stem}`", profile.name),
        ));
    }
    Ok(profile)
}

/// An agent binary checked against the profile.
#[derive(Debug)]
struct Binary {
    bytes: Vec<u8>,
    is_static: bool,
}

fn read_binary(path: &Path, profile: &Profile) -> Result<Binary, FlashError> {
    if !path.exists() {
        return Err(FlashError::NoBinary {
            target: profile.target.clone(),
            path: path.to_owned(),
        });
    }
    let bad = |reason: String| FlashError::Binary {
        path: path.to_owned(),
        reason,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if size > MAX_BINARY {
        return Err(bad(format!(
            "{size} bytes is no device build of the agent (over {} MiB; a debug build? cross/build.sh makes stripped ones of about 10 MB)",
            MAX_BINARY >> 20
        )));
    }
    let bytes = read_capped(path, MAX_BINARY)?;
    let elf = Elf::parse(&bytes).map_err(|e| bad(e.to_string()))?;
    if elf.arch != profile.arch {
        return Err(FlashError::WrongArch {
            path: path.to_owned(),
            arch: elf.arch,
            profile: profile.name.clone(),
            profile_arch: profile.arch.clone(),
            target: profile.target.clone(),
        });
    }
    Ok(Binary {
        bytes,
        is_static: !elf.interpreter,
    })
}

/// What `edgefleet flash` reads of an ELF header.
#[derive(Debug, PartialEq, Eq)]
pub struct Elf {
    /// Architecture as the agent names it (`std::env::consts::ARCH`).
    pub arch: &'static str,
    /// Has a program interpreter (dynamically linked).
    pub interpreter: bool,
}

/// Why bytes are not an executable `edgefleet flash` knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// No ELF magic.
    #[error("not an ELF executable")]
    NotElf,
    /// Neither 32 nor 64 bits.
    #[error("ELF class {0} is unknown")]
    Class(u8),
    /// Big-endian.
    #[error("a big-endian ELF: no device profile is big-endian")]
    BigEndian,
    /// A machine no device profile has.
    #[error("ELF machine {0} is not a device architecture")]
    Machine(u16),
    /// The file ends inside a header.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Program headers past any address.
    #[error("program headers out of range")]
    ProgramHeaders,
}

impl Elf {
    /// Reads the identification, machine and program headers; the error says
    /// what is not an executable we know.
    pub fn parse(b: &[u8]) -> Result<Elf, ElfError> {
        if b.len() < 64 || &b[..4] != b"\x7fELF" {
            return Err(ElfError::NotElf);
        }
        let wide = match b[4] {
            1 => false,
            2 => true,
            c => return Err(ElfError::Class(c)),
        };
        if b[5] != 1 {
            return Err(ElfError::BigEndian);
        }
        let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
        let u32_at = |o: usize| {
            b.get(o..o + 4)
                .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        };
        let u64_at = |o: usize| {
            b.get(o..o + 8).map(|s| {
                let mut a = [0; 8];
                a.copy_from_slice(s);
                u64::from_le_bytes(a)
            })
        };
        let machine = u16_at(18).ok_or(ElfError::Truncated("ELF header"))?;
        let arch = match (machine, wide) {
            (62, true) => "x86_64",
            (183, true) => "aarch64",
            (40, false) => "arm",
            (3, false) => "x86",
            (243, true) => "riscv64",
            (m, _) => return Err(ElfError::Machine(m)),
        };
        let (phoff, phentsize, phnum) = if wide {
            (
                u64_at(32).ok_or(ElfError::Truncated("ELF header"))?,
                u16_at(54).ok_or(ElfError::Truncated("ELF header"))?,
                u16_at(56).ok_or(ElfError::Truncated("ELF header"))?,
            )
        } else {
            (
                u64::from(u32_at(28).ok_or(ElfError::Truncated("ELF header"))?),
                u16_at(42).ok_or(ElfError::Truncated("ELF header"))?,
                u16_at(44).ok_or(ElfError::Truncated("ELF header"))?,
            )
        };
        let mut interpreter = false;
        for i in 0..u64::from(phnum) {
            let at = phoff
                .checked_add(i * u64::from(phentsize))
                .and_then(|o| usize::try_from(o).ok())
                .ok_or(ElfError::ProgramHeaders)?;
            // PT_INTERP = 3: a dynamic loader is named.
            if u32_at(at).ok_or(ElfError::Truncated("program headers"))? == 3 {
                interpreter = true;
            }
        }
        Ok(Elf { arch, interpreter })
    }
}

/// Checks the destination before anything is asked of the controller.
fn preflight(d: &Destination, profile: &Profile, force: bool) -> Result<(), FlashError> {
    match d {
        Destination::Root(root) => {
            let what = format!("--root {}", root.display());
            let meta = std::fs::metadata(root).map_err(|e| destination(&what, e))?;
            if !meta.is_dir() {
                return Err(destination(what, "not a directory"));
            }
            writable(root).map_err(|e| destination(&what, format!("not writable ({e})")))?;
            let config = on_root(root, &profile.install.config);
            if !force && config.exists() {
                let who = std::fs::read_to_string(&config)
                    .ok()
                    .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
                    .and_then(|t| t.get("device_id")?.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "unknown".into());
                return Err(destination(
                    what,
                    format!(
                        "an agent is installed already (device {who}, {}); pass --force to overwrite it",
                        profile.install.config.display()
                    ),
                ));
            }
            Ok(())
        }
        Destination::Archive(out) => {
            let dir = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            let what = format!("--out {}", out.display());
            if !dir.is_dir() {
                return Err(destination(
                    what,
                    format!("{} is not a directory", dir.display()),
                ));
            }
            writable(&dir).map_err(|e| destination(what, format!("not writable ({e})")))
        }
        Destination::Ssh {
            host,
            root,
            options,
        } => {
            let root = shell_path(root)?;
            let script = format!(
                "test -d {root} || {{ echo \"{root} is not a directory\" >&2; exit 3; }}; \
                 test -w {root} || {{ echo \"{root} is not writable\" >&2; exit 3; }}; \
                 command -v tar >/dev/null && command -v gzip >/dev/null || {{ echo 'needs tar and gzip' >&2; exit 3; }}; \
                 if [ -e {root}/{config} ] && [ {force} != 1 ]; then echo 'an agent is installed already; pass --force to overwrite it' >&2; exit 3; fi",
                config = device_rel(&profile.install.config)?,
                force = u8::from(force),
            );
            let out = ssh(host, options)
                .arg(script)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| FlashError::Ssh {
                    host: host.clone(),
                    reason: format!("cannot run ssh ({e}); install openssh-client"),
                })?;
            if !out.status.success() {
                return Err(FlashError::Ssh {
                    host: host.clone(),
                    reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            Ok(())
        }
    }
}

/// Whether a file can be made in `dir` (by making and removing one).
fn writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".edgefleet-flash-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn ssh(host: &str, options: &[String]) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-o", "BatchMode=yes"]);
    for o in options {
        c.arg("-o").arg(o);
    }
    c.arg("--").arg(host);
    c
}

/// An absolute device path made relative to the root and quoted for `sh`.
fn device_rel(path: &Path) -> Result<String, FlashError> {
    shell_path(
        path.strip_prefix("/")
            .map_err(|_| argument(path.display().to_string(), "not absolute"))?,
    )
}

/// A path quoted for `sh` (paths with a quote are refused, not escaped).
fn shell_path(p: &Path) -> Result<String, FlashError> {
    let s = p
        .to_str()
        .ok_or_else(|| argument(p.display().to_string(), "not UTF-8"))?;
    if s.contains(|c: char| c == '\'' || c == '"' || c == '\\' || c.is_whitespace()) {
        return Err(argument(s, "paths with quotes or spaces are refused"));
    }
    Ok(format!("'{s}'"))
}

/// Enrolls `id` unless it is taken (then only with `replace`).
fn enroll(client: &Client, id: &str, tags: &str, replace: bool) -> Result<Enrollment, FlashError> {
    match client.get_optional(&format!("/api/v1/devices/{id}"))? {
        Some(v) if !replace => {
            let d = &v["device"];
            return Err(FlashError::Taken {
                id: id.to_owned(),
                how: if d["enrolled"].as_bool().unwrap_or(false) {
                    "enrolled"
                } else {
                    "seen on the broker"
                },
                last_seen: d["last_seen"].as_u64().map_or_else(
                    || "never".to_owned(),
                    |ms| format!("{ms} ms after the epoch"),
                ),
            });
        }
        _ => {}
    }
    let tags = crate::server::tags::parse(tags).map_err(|e| argument("--tags", e))?;
    let v = client.post(
        &format!("/api/v1/devices/{id}/enroll"),
        &json!({ "tags": tags }),
    )?;
    enrollment_of(&v)
}

/// The enrollment in an answer of `POST /api/v1/devices/{id}/enroll`.
pub fn enrollment_of(v: &Value) -> Result<Enrollment, FlashError> {
    let s = |k: &'static str| {
        v[k].as_str()
            .map(str::to_owned)
            .ok_or(FlashError::EnrollmentField(k))
    };
    let trust_root = match v["trust_root_hex"].as_str() {
        Some(t) => {
            hex::decode(t).map_err(|_| FlashError::Enrollment("trust_root_hex is not hex"))?
        }
        None => {
            return Err(FlashError::Enrollment(
                "the controller has no trust root: a device could verify no bundle (start it with trust_root set)",
            ));
        }
    };
    Ok(Enrollment {
        broker_url: s("broker_url")?,
        topic_prefix: s("topic_prefix")?,
        subscribe_qos: crate::ops::remote::enrolled_subscribe_qos(v)
            .ok_or(FlashError::Enrollment("subscribe_qos is not 0 or 1"))?,
        ca_pem: s("ca_pem")?,
        controller_key_pem: s("controller_key_pem")?,
        cert_pem: s("cert_pem")?,
        key_pem: s("key_pem")?,
        trust_root,
    })
}

/// The files `edgefleet devices enroll --out DIR` wrote, for device `id`.
fn read_enrollment(dir: &Path, id: &str) -> Result<Enrollment, FlashError> {
    let what = |name: &str| format!("--enrollment {}: {name}", dir.display());
    let read =
        |name: &str| read_capped(&dir.join(name), 1 << 20).map_err(|e| argument(what(name), e));
    let text =
        |name: &str| String::from_utf8(read(name)?).map_err(|_| argument(what(name), "not UTF-8"));
    let config: edgefleet_agent::config::AgentConfig =
        toml::from_str(&text("agent.toml")?).map_err(|e| argument(what("agent.toml"), e))?;
    if config.device_id != id {
        return Err(argument(
            format!("--enrollment {}", dir.display()),
            format!("device {}'s, not {id}'s", config.device_id),
        ));
    }
    Ok(Enrollment {
        broker_url: config.broker.url,
        topic_prefix: config.broker.topic_prefix,
        subscribe_qos: config.broker.subscribe_qos,
        ca_pem: text("ca.pem")?,
        controller_key_pem: text("controller.pub")?,
        cert_pem: text("device.pem")?,
        key_pem: text("device.key")?,
        trust_root: read("trust-root.cbor")?,
    })
}

/// Where `path` (absolute on the device) is under `root`.
fn on_root(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in path.components() {
        if let Component::Normal(n) = c {
            out.push(n);
        }
    }
    out
}

/// The systemd unit for `profile`: the shipped one with its paths.
pub fn unit_for(profile: &Profile) -> Result<String, FlashError> {
    fn utf8(p: &Path) -> Result<&str, FlashError> {
        p.to_str()
            .ok_or_else(|| argument(p.display().to_string(), "not UTF-8"))
    }
    let binary = utf8(&profile.install.binary)?;
    let config = utf8(&profile.install.config)?;
    let mut unit = UNIT.replace(
        "ExecStart=/usr/local/bin/edgefleet-agent --config /etc/edgefleet/agent.toml run",
        &format!("ExecStart={binary} --config {config} run"),
    );
    if !unit.contains(&format!("ExecStart={binary} ")) {
        return Err(FlashError::DeviceFiles(
            "the shipped unit has no ExecStart line to adapt".into(),
        ));
    }
    let binaries = profile.agent_config("-").self_update.binary_dir;
    unit = unit.replace(
        "ReadWritePaths=-/usr/lib/edgefleet",
        &format!("ReadWritePaths=-{}", utf8(&binaries)?),
    );
    // StateDirectory= is relative to /var/lib; elsewhere the unit names the path.
    let data = &profile.install.data_dir;
    if let Ok(rel) = data.strip_prefix("/var/lib") {
        unit = unit.replace(
            "StateDirectory=edgefleet",
            &format!("StateDirectory={}", rel.display()),
        );
    } else {
        unit = unit.replace(
            "StateDirectory=edgefleet",
            &format!("ReadWritePaths={}", data.display()),
        );
    }
    Ok(unit)
}

/// Every file a flashed device gets, `agent.toml` last (its presence marks a
/// complete install).
pub fn device_files(
    profile: &Profile,
    id: &str,
    binary: &[u8],
    e: &Enrollment,
) -> Result<Vec<DeviceFile>, FlashError> {
    let unfit = |why: &str| FlashError::DeviceFiles(why.to_owned());
    let config = agent_config(profile, id, e)?;
    let etc = profile
        .install
        .config
        .parent()
        .ok_or_else(|| unfit("install.config has no directory"))?
        .to_path_buf();
    let [unit, wants] = unit_files(profile)?;
    let key = config
        .broker
        .key
        .clone()
        .ok_or_else(|| unfit("the profile's agent config names no key"))?;
    let file = |path: PathBuf, mode: u32, contents: Vec<u8>| DeviceFile {
        path,
        mode,
        contents,
        kind: FileKind::File,
    };
    let [slot_a, current, exec] = slot_layout(profile, &config.self_update, binary)?;
    let toml_text =
        toml::to_string_pretty(&config).map_err(|e| unfit(&format!("agent.toml: {e}")))?;
    let files = vec![
        slot_a,
        current,
        exec,
        file(
            config
                .broker
                .ca
                .clone()
                .unwrap_or_else(|| etc.join("ca.pem")),
            0o644,
            e.ca_pem.clone().into_bytes(),
        ),
        file(
            config
                .broker
                .cert
                .clone()
                .unwrap_or_else(|| etc.join("device.pem")),
            0o644,
            e.cert_pem.clone().into_bytes(),
        ),
        file(key.clone(), 0o600, e.key_pem.clone().into_bytes()),
        file(
            config.broker.controller_key.clone(),
            0o644,
            e.controller_key_pem.clone().into_bytes(),
        ),
        file(config.trust_root.clone(), 0o644, e.trust_root.clone()),
        unit,
        wants,
        file(
            "/usr/lib/sysusers.d/edgefleet.conf".into(),
            0o644,
            sysusers(&profile.install.data_dir),
        ),
        file(
            "/usr/lib/tmpfiles.d/edgefleet.conf".into(),
            0o644,
            tmpfiles(
                &profile.install.data_dir,
                &key,
                &config.self_update.binary_dir,
            ),
        ),
        file(
            profile.install.config.clone(),
            0o644,
            format!(
                "# {id}: written by `edgefleet flash --profile {}`\n{toml_text}",
                profile.name
            )
            .into_bytes(),
        ),
    ];
    distinct_paths(files)
}

/// The slot layout the agent updates itself in (docs/agent-update.md): the
/// binary in slot A, `current` naming it, and the unit's ExecStart
/// (`install.binary`) a fixed link to `current`, relative so that it holds
/// under `--root` too.
fn slot_layout(
    profile: &Profile,
    slots: &edgefleet_agent::config::SelfUpdateConfig,
    binary: &[u8],
) -> Result<[DeviceFile; 3], FlashError> {
    let link = |path: PathBuf, to: PathBuf| DeviceFile {
        path,
        mode: 0o777,
        contents: to.to_string_lossy().as_bytes().to_vec(),
        kind: FileKind::Link,
    };
    let exec_dir = profile
        .install
        .binary
        .parent()
        .ok_or_else(|| FlashError::DeviceFiles("install.binary has no directory".into()))?;
    Ok([
        DeviceFile {
            path: slots
                .layout()
                .slot_path(edgefleet_agent::selfupdate::BinarySlot::A),
            mode: 0o755,
            contents: binary.to_vec(),
            kind: FileKind::File,
        },
        link(slots.link.clone(), "agent.a".into()),
        link(
            profile.install.binary.clone(),
            relative_path(exec_dir, &slots.link),
        ),
    ])
}

/// The device's agent config: the profile's, with the enrollment's broker.
fn agent_config(
    profile: &Profile,
    id: &str,
    e: &Enrollment,
) -> Result<edgefleet_agent::config::AgentConfig, FlashError> {
    let mut config = profile.agent_config(id);
    config.broker.url = e.broker_url.clone();
    config.broker.topic_prefix = e.topic_prefix.clone();
    config.broker.subscribe_qos = e.subscribe_qos;
    config
        .validate(&profile.install.config)
        .map_err(|e| FlashError::DeviceFiles(format!("the agent config for this device: {e}")))?;
    Ok(config)
}

/// `files`, when their paths are absolute and distinct (the data directory
/// comes empty).
fn distinct_paths(files: Vec<DeviceFile>) -> Result<Vec<DeviceFile>, FlashError> {
    let mut seen = BTreeSet::new();
    match files
        .iter()
        .find(|f| !f.path.is_absolute() || !seen.insert(f.path.clone()))
    {
        Some(f) => Err(FlashError::DeviceFiles(format!(
            "{}: a device path must be absolute and used once",
            f.path.display()
        ))),
        None => Ok(files),
    }
}

/// The systemd unit, and its link in `multi-user.target.wants` (enabled for boot).
fn unit_files(profile: &Profile) -> Result<[DeviceFile; 2], FlashError> {
    let unfit = |why: &str| FlashError::DeviceFiles(why.to_owned());
    let unit = &profile.install.unit;
    let unit_name = unit
        .file_name()
        .ok_or_else(|| unfit("install.unit has no file name"))?;
    let wants = unit
        .parent()
        .ok_or_else(|| unfit("install.unit has no directory"))?
        .join("multi-user.target.wants")
        .join(unit_name);
    Ok([
        DeviceFile {
            path: unit.clone(),
            mode: 0o644,
            contents: unit_for(profile)?.into_bytes(),
            kind: FileKind::File,
        },
        DeviceFile {
            path: wants,
            mode: 0o777,
            contents: unit.to_string_lossy().as_bytes().to_vec(),
            kind: FileKind::Link,
        },
    ])
}

/// sysusers.d: the agent's system user, at home in its data directory.
fn sysusers(data: &Path) -> Vec<u8> {
    format!(
        "# The edgefleet agent's system user (edgefleet flash).\n\
         u edgefleet - \"edgefleet device agent\" {}\n",
        data.display()
    )
    .into_bytes()
}

/// tmpfiles.d: the agent's state and its key belong to its user.
fn tmpfiles(data: &Path, key: &Path, binaries: &Path) -> Vec<u8> {
    format!(
        "# The agent's state and its key belong to its user (edgefleet flash).\n\
         d {} 0700 edgefleet edgefleet -\n\
         z {} 0600 edgefleet edgefleet -\n\
         # Its binary slots: it writes a new release beside the running one and\n\
         # switches `current` (docs/agent-update.md).\n\
         d {} 0755 edgefleet edgefleet -\n",
        data.display(),
        key.display(),
        binaries.display()
    )
    .into_bytes()
}

/// The path of `to` from the directory `from` (both absolute), for a relative
/// symbolic link: `/usr/local/bin` to `/usr/lib/edgefleet/current` is
/// `../../lib/edgefleet/current`.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    pathdiff::diff_paths(to, from).unwrap_or_else(|| to.to_path_buf())
}

/// Writes `files` under `root`: each is staged beside its destination, then
/// all are moved into place (`agent.toml` last); on an error before the moves,
/// the staged files and the directories made for them are removed.
pub fn install_into(
    root: &Path,
    files: &[DeviceFile],
    profile: &Profile,
) -> Result<(), FlashError> {
    let mut made_dirs = Vec::new();
    let mut staged = Vec::new();
    let result = stage(root, files, profile, &mut made_dirs, &mut staged);
    if let Err((path, source)) = result {
        for s in &staged {
            let _ = std::fs::remove_file(s);
        }
        for d in made_dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        return Err(FlashError::Install {
            staged: true,
            path,
            source,
        });
    }
    // Every file is written: move them into place, the config last.
    let moved = |path: &Path| {
        let path = path.to_owned();
        move |source| FlashError::Install {
            staged: false,
            path,
            source,
        }
    };
    for f in files {
        let target = on_root(root, &f.path);
        std::fs::rename(staged_path(&target), &target).map_err(moved(&target))?;
        if let Some(dir) = target.parent() {
            edgefleet_shared::durable::sync_dir(dir).map_err(moved(dir))?;
        }
    }
    Ok(())
}

/// Writes each file beside its destination under `root` (and the data
/// directory, 0700), recording the directories it made and the files it
/// staged so that a failure can remove them.
fn stage(
    root: &Path,
    files: &[DeviceFile],
    profile: &Profile,
    made_dirs: &mut Vec<PathBuf>,
    staged: &mut Vec<PathBuf>,
) -> Result<(), (PathBuf, std::io::Error)> {
    use std::os::unix::fs::PermissionsExt;
    let at = |path: &Path| {
        let path = path.to_owned();
        move |source| (path, source)
    };
    for f in files {
        let target = on_root(root, &f.path);
        // on_root joins a device path's components to `root`: never the bare root.
        let dir = target.parent().unwrap_or(root).to_path_buf();
        let mut missing = Vec::new();
        let mut d = dir.clone();
        while !d.exists() {
            missing.push(d.clone());
            if !d.pop() {
                break;
            }
        }
        std::fs::create_dir_all(&dir).map_err(at(&dir))?;
        made_dirs.extend(missing.into_iter().rev());
        let tmp = staged_path(&target);
        let _ = std::fs::remove_file(&tmp);
        match f.kind {
            FileKind::File => {
                let mut w = std::fs::File::create(&tmp).map_err(at(&tmp))?;
                staged.push(tmp.clone());
                w.write_all(&f.contents)
                    .and_then(|()| w.set_permissions(std::fs::Permissions::from_mode(f.mode)))
                    .and_then(|()| w.sync_all())
                    .map_err(at(&tmp))?;
            }
            FileKind::Link => {
                let to = String::from_utf8_lossy(&f.contents).into_owned();
                std::os::unix::fs::symlink(&to, &tmp).map_err(at(&tmp))?;
                staged.push(tmp.clone());
            }
        }
    }
    let data = on_root(root, &profile.install.data_dir);
    if !data.exists() {
        std::fs::create_dir_all(&data).map_err(at(&data))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .map_err(at(&data))?;
    }
    Ok(())
}

fn staged_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(STAGED);
    target.with_file_name(name)
}

/// The install script in an archive: the same staging, then (on a live
/// system) the user, ownership and the service.
pub fn install_script(
    files: &[DeviceFile],
    profile: &Profile,
    id: &str,
) -> Result<String, FlashError> {
    let (mut puts, mut moves) = (String::new(), String::new());
    for f in files {
        let rel = device_rel(&f.path)?;
        moves.push_str(&format!("commit {rel}\n"));
        match f.kind {
            FileKind::File => puts.push_str(&format!("put {:o} {rel}\n", f.mode)),
            FileKind::Link => puts.push_str(&format!(
                "link {} {rel}\n",
                shell_path(Path::new(&*String::from_utf8_lossy(&f.contents)))?
            )),
        }
    }
    let config = device_rel(&profile.install.config)?;
    let data = device_rel(&profile.install.data_dir)?;
    let unit = profile
        .install
        .unit
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| FlashError::DeviceFiles("install.unit has no file name".into()))?;
    Ok(format!(
        r#"#!/bin/sh
# Installs the edgefleet agent of device {id} ({profile}, {target}).
# Written by `edgefleet flash`. Usage, as root on the device:
#   sh install.sh            install into this system, enable and start the agent
#   sh install.sh DIR        install into a mounted root filesystem at DIR
# Every file is staged beside its destination first and moved into place only
# when all are written, the agent's config last: a failed install changes
# nothing. An installed agent is kept unless EDGEFLEET_FORCE=1.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=${{1:-/}}
[ -d "$root" ] || {{ echo "install.sh: $root is not a directory" >&2; exit 1; }}
root=$(cd "$root" && pwd)
[ "$root" = / ] && root=
if [ -e "$root/"{config} ] && [ "${{EDGEFLEET_FORCE:-0}}" != 1 ]; then
    echo "install.sh: an agent is installed already ($root/"{config}"); EDGEFLEET_FORCE=1 to overwrite" >&2
    exit 1
fi
staged=
cleanup() {{ for f in $staged; do rm -f "$f"; done; }}
trap cleanup EXIT
put() {{
    mkdir -p "$(dirname "$root/$2")"
    cp "$here/root/$2" "$root/$2{STAGED}"
    staged="$staged $root/$2{STAGED}"
    chmod "$1" "$root/$2{STAGED}"
}}
link() {{
    mkdir -p "$(dirname "$root/$2")"
    rm -f "$root/$2{STAGED}"
    ln -s "$1" "$root/$2{STAGED}"
    staged="$staged $root/$2{STAGED}"
}}
{puts}sync
commit() {{ mv -f "$root/$1{STAGED}" "$root/$1"; }}
{moves}staged=
mkdir -p "$root/"{data}
chmod 700 "$root/"{data}
sync
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemd-sysusers /usr/lib/sysusers.d/edgefleet.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/edgefleet.conf
    systemctl daemon-reload
    systemctl enable --now {unit}
    echo "edgefleet agent {id} installed and started"
else
    echo "edgefleet agent {id} installed into ${{root:-/}}; it starts at boot"
fi
"#,
        profile = profile.name,
        target = profile.target,
    ))
}

/// An install archive: `edgefleet-flash/install.sh` and the files under
/// `edgefleet-flash/root/`, gzip-compressed.
pub fn archive(files: &[DeviceFile], profile: &Profile, id: &str) -> Result<Vec<u8>, FlashError> {
    let script = install_script(files, profile, id)?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let io = |source| FlashError::Install {
        staged: true,
        path: "archive".into(),
        source,
    };
    let mut add = |path: &Path, mode: u32, data: &[u8]| -> Result<(), FlashError> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, path, data).map_err(io)
    };
    add(
        Path::new("edgefleet-flash/install.sh"),
        0o755,
        script.as_bytes(),
    )?;
    for f in files.iter().filter(|f| f.kind == FileKind::File) {
        let rel = f
            .path
            .strip_prefix("/")
            .map_err(|_| argument(f.path.display().to_string(), "not absolute"))?;
        add(
            &Path::new("edgefleet-flash/root").join(rel),
            f.mode,
            &f.contents,
        )?;
    }
    tar.into_inner().map_err(io)?.finish().map_err(io)
}

/// Sends the archive over SSH and runs its `install.sh` there.
fn ssh_install(
    host: &str,
    options: &[String],
    root: &Path,
    archive: &[u8],
    force: bool,
) -> Result<(), FlashError> {
    let ssh_err = |reason: String| FlashError::Ssh {
        host: host.to_owned(),
        reason,
    };
    let root = shell_path(root)?;
    let script = format!(
        "set -e; d=$(mktemp -d); trap 'rm -rf \"$d\"' EXIT; tar -xzf - -C \"$d\"; \
         EDGEFLEET_FORCE={} sh \"$d/edgefleet-flash/install.sh\" {root}",
        u8::from(force)
    );
    let mut child = ssh(host, options)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ssh_err(format!("cannot run ssh ({e})")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| ssh_err("no stdin".into()))?;
    let data = archive.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child
        .wait_with_output()
        .map_err(|e| ssh_err(e.to_string()))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(ssh_err(format!(
            "the install failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrollment() -> Enrollment {
        Enrollment {
            broker_url: "mqtts://fleet.example:8883".into(),
            topic_prefix: "edgefleet".into(),
            subscribe_qos: 1,
            ca_pem: "CA".into(),
            controller_key_pem: "CONTROLLER KEY".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
            trust_root: vec![1, 2, 3],
        }
    }

    #[test]
    fn elf_headers_name_the_architecture_and_linking() {
        let own = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        let elf = Elf::parse(&own).expect("our own binary");
        assert_eq!(elf.arch, std::env::consts::ARCH);
        assert!(Elf::parse(b"#!/bin/sh\n").is_err());
        let mut arm = own.clone();
        arm[4] = 1; // 32-bit
        arm[18..20].copy_from_slice(&40u16.to_le_bytes());
        // A 32-bit header read from a 64-bit file: still named, or refused, never a panic.
        let _ = Elf::parse(&arm);
        let mut odd = own[..64].to_vec();
        odd[18..20].copy_from_slice(&999u16.to_le_bytes());
        let e = Elf::parse(&odd).expect_err("unknown machine");
        assert_eq!(e, ElfError::Machine(999));
        assert!(e.to_string().contains("999"), "{e}");
        // Truncated or garbage program headers: an error, never a panic.
        for n in [0, 4, 17, 20, 63, 64, 100] {
            let _ = Elf::parse(&own[..n.min(own.len())]);
        }
    }

    #[test]
    fn the_unit_follows_the_profile_paths() {
        let mut p = Profile::builtin("raspberry-pi-4").expect("profile");
        let unit = unit_for(&p).expect("unit");
        assert!(unit.contains(
            "ExecStart=/usr/local/bin/edgefleet-agent --config /etc/edgefleet/agent.toml run"
        ));
        assert!(unit.contains("StateDirectory=edgefleet\n"));
        assert!(
            !unit.contains("DynamicUser=yes"),
            "the key is owned by a static user"
        );
        p.install.binary = "/opt/edgefleet/bin/agent".into();
        p.install.config = "/opt/edgefleet/etc/agent.toml".into();
        p.install.data_dir = "/data/edgefleet".into();
        let unit = unit_for(&p).expect("unit");
        assert!(unit.contains(
            "ExecStart=/opt/edgefleet/bin/agent --config /opt/edgefleet/etc/agent.toml run"
        ));
        assert!(unit.contains("ReadWritePaths=/data/edgefleet"));
        assert!(
            unit.contains("ReadWritePaths=-/usr/lib/edgefleet\n"),
            "the agent writes its own binary slots"
        );
    }

    #[test]
    fn relative_links_climb_to_the_common_directory() {
        for (from, to, want) in [
            (
                "/usr/local/bin",
                "/usr/lib/edgefleet/current",
                "../../lib/edgefleet/current",
            ),
            (
                "/usr/lib/edgefleet",
                "/usr/lib/edgefleet/agent.a",
                "agent.a",
            ),
            ("/opt/a", "/srv/b", "../../srv/b"),
        ] {
            assert_eq!(
                relative_path(Path::new(from), Path::new(to)),
                Path::new(want)
            );
        }
    }

    #[test]
    fn device_files_hold_the_enrollment_and_end_with_the_config() {
        let p = Profile::builtin("raspberry-pi-3").expect("profile");
        let files = device_files(&p, "pi-3", b"\x7fELF", &enrollment()).expect("files");
        let last = files.last().expect("files");
        assert_eq!(last.path, p.install.config);
        let text = String::from_utf8(last.contents.clone()).expect("utf-8");
        let config: edgefleet_agent::config::AgentConfig =
            toml::from_str(&text).expect("agent.toml parses");
        assert_eq!(config.device_id, "pi-3");
        assert_eq!(config.broker.url, "mqtts://fleet.example:8883");
        assert_eq!(
            config.limits.max_bundle_bytes,
            64 << 20,
            "the profile's limits"
        );
        let key = files
            .iter()
            .find(|f| f.path == Path::new("/etc/edgefleet/device.key"))
            .expect("key");
        assert_eq!((key.mode, key.contents.as_slice()), (0o600, &b"KEY"[..]));
        let e = device_files(
            &p,
            "pi-3",
            b"",
            &Enrollment {
                broker_url: "ftp://nope".into(),
                ..enrollment()
            },
        )
        .expect_err("bad broker URL")
        .to_string();
        assert!(e.contains("broker"), "{e}");
    }

    #[test]
    fn install_into_a_root_then_refuse_a_second_time() {
        let p = Profile::builtin("x86-64-gateway").expect("profile");
        let root = tempfile::tempdir().expect("dir");
        let files = device_files(&p, "gw-1", b"binary", &enrollment()).expect("files");
        install_into(root.path(), &files, &p).expect("install");
        for f in &files {
            let on = on_root(root.path(), &f.path);
            match f.kind {
                FileKind::File => {
                    assert_eq!(std::fs::read(&on).expect("file"), f.contents);
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(&on).expect("meta").permissions().mode();
                    assert_eq!(mode & 0o777, f.mode, "{}", on.display());
                }
                FileKind::Link => {
                    assert_eq!(
                        std::fs::read_link(&on)
                            .expect("link")
                            .as_os_str()
                            .as_encoded_bytes(),
                        f.contents,
                    );
                }
            }
        }
        assert!(on_root(root.path(), &p.install.data_dir).is_dir());
        let staged: Vec<_> = walk(root.path())
            .into_iter()
            .filter(|f| f.to_string_lossy().ends_with(STAGED))
            .collect();
        assert!(staged.is_empty(), "{staged:?}");
        let e = preflight(&Destination::Root(root.path().into()), &p, false)
            .expect_err("installed already")
            .to_string();
        assert!(e.contains("gw-1") && e.contains("--force"), "{e}");
        preflight(&Destination::Root(root.path().into()), &p, true).expect("forced");
    }

    #[test]
    fn a_failed_install_leaves_the_old_files_and_no_staged_ones() {
        let p = Profile::builtin("x86-64-gateway").expect("profile");
        let root = tempfile::tempdir().expect("dir");
        let old = device_files(&p, "gw-1", b"old", &enrollment()).expect("files");
        install_into(root.path(), &old, &p).expect("install");
        let before = snapshot(root.path());
        // The unit's directory is a file now: staging the unit fails midway.
        let mut new = device_files(&p, "gw-2", b"new", &enrollment()).expect("files");
        new.insert(
            5,
            DeviceFile {
                path: "/etc/edgefleet/agent.toml/x".into(),
                mode: 0o644,
                contents: vec![],
                kind: FileKind::File,
            },
        );
        let e = install_into(root.path(), &new, &p)
            .expect_err("cannot stage")
            .to_string();
        assert!(e.starts_with("nothing installed"), "{e}");
        assert_eq!(snapshot(root.path()), before, "old files untouched");
    }

    #[test]
    fn the_archive_script_installs_the_same_tree() {
        let p = Profile::builtin("raspberry-pi-4").expect("profile");
        let files = device_files(&p, "pi-4", b"binary", &enrollment()).expect("files");
        let bytes = archive(&files, &p, "pi-4").expect("archive");
        let unpacked = tempfile::tempdir().expect("dir");
        tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()))
            .unpack(unpacked.path())
            .expect("unpacks");
        let by_script = tempfile::tempdir().expect("dir");
        let out = Command::new("sh")
            .arg(unpacked.path().join("edgefleet-flash/install.sh"))
            .arg(by_script.path())
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let direct = tempfile::tempdir().expect("dir");
        install_into(direct.path(), &files, &p).expect("install");
        assert_eq!(snapshot(by_script.path()), snapshot(direct.path()));
        // Again: refused, nothing changed.
        let before = snapshot(by_script.path());
        let out = Command::new("sh")
            .arg(unpacked.path().join("edgefleet-flash/install.sh"))
            .arg(by_script.path())
            .output()
            .expect("sh");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("EDGEFLEET_FORCE=1"));
        assert_eq!(snapshot(by_script.path()), before);
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("dir").flatten() {
            let p = e.path();
            if e.file_type().expect("type").is_dir() {
                out.push(p.clone());
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out.sort();
        out
    }

    /// Path, mode, kind and contents (or link target) of every entry.
    fn snapshot(root: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
        use std::os::unix::fs::PermissionsExt;
        walk(root)
            .into_iter()
            .map(|p| {
                let meta = std::fs::symlink_metadata(&p).expect("meta");
                let contents = if meta.file_type().is_symlink() {
                    std::fs::read_link(&p)
                        .expect("link")
                        .to_string_lossy()
                        .as_bytes()
                        .to_vec()
                } else if meta.is_file() {
                    std::fs::read(&p).expect("read")
                } else {
                    Vec::new()
                };
                let mode = if meta.file_type().is_symlink() {
                    0
                } else {
                    meta.permissions().mode() & 0o7777
                };
                (
                    p.strip_prefix(root).expect("under root").to_path_buf(),
                    mode,
                    contents,
                )
            })
            .collect()
    }
}
