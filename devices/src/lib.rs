//! Device profiles (`devices/*.toml`) and the fleet simulator ([`sim`]): many
//! real agent instances in one process, for the demo, the end-to-end tests and
//! the scale benchmarks.

pub mod load;
pub mod sim;

use std::path::PathBuf;

use edgefleet_shared::Arch;
use edgefleet_shared::bundle::DeviceFacts;
use serde::Deserialize;

/// Where the agent's files go on a board.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallPaths {
    /// Install prefix (the binary goes under `<prefix>/bin`).
    pub prefix: PathBuf,
    /// The agent binary.
    pub binary: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Its data directory (slots, downloads, spool).
    pub data_dir: PathBuf,
    /// The systemd unit.
    pub unit: PathBuf,
}

/// What a board has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Storage, MiB.
    pub disk_mb: u64,
    /// Storage an install must leave free, MiB.
    pub disk_reserve_mb: u64,
}

/// Agent settings this board gets by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDefaults {
    /// Seconds between telemetry reports.
    pub telemetry_interval_s: u32,
    /// Largest bundle accepted, MiB.
    pub max_bundle_mb: u64,
}

/// A kind of device: a board and the OS image it usually runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name (the file's stem).
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// CPU architecture as the agent reports it (`std::env::consts::ARCH`).
    pub arch: String,
    /// Rust target triple of the agent built for it.
    pub target: String,
    /// How the agent runs as a service (`systemd`, the only one supported).
    pub service_manager: String,
    /// Install paths.
    pub install: InstallPaths,
    /// Resources.
    pub resources: Resources,
    /// Agent settings.
    pub agent: AgentDefaults,
}

/// The profiles shipped in `devices/`, by file.
const BUILTIN: &[(&str, &str)] = &[
    ("raspberry-pi-4", include_str!("../raspberry-pi-4.toml")),
    ("raspberry-pi-5", include_str!("../raspberry-pi-5.toml")),
    ("raspberry-pi-3", include_str!("../raspberry-pi-3.toml")),
    (
        "raspberry-pi-zero-2w",
        include_str!("../raspberry-pi-zero-2w.toml"),
    ),
    ("beaglebone-black", include_str!("../beaglebone-black.toml")),
    ("jetson-orin-nano", include_str!("../jetson-orin-nano.toml")),
    ("x86-64-gateway", include_str!("../x86-64-gateway.toml")),
];

/// Why a profile is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// No profile of that name.
    #[error("no device profile `{name}` (known: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
    /// The TOML does not describe a profile.
    #[error("device profile {name}: {detail}")]
    Invalid {
        /// The profile.
        name: String,
        /// What is wrong, naming the field.
        detail: String,
    },
}

impl Profile {
    /// Parses and checks a profile.
    pub fn parse(name: &str, text: &str) -> Result<Profile, ProfileError> {
        let invalid = |detail: String| ProfileError::Invalid {
            name: name.to_owned(),
            detail,
        };
        let p: Profile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        Arch::new(&p.arch).map_err(|e| invalid(format!("arch: {}", e.reason)))?;
        if p.target.split('-').count() < 3 {
            return Err(invalid(format!(
                "target: `{}` is not a target triple",
                p.target
            )));
        }
        if p.resources.cpus == 0 || p.resources.memory_mb == 0 || p.resources.disk_mb == 0 {
            return Err(invalid(
                "resources: cpus, memory_mb and disk_mb must be positive".into(),
            ));
        }
        if p.resources.disk_reserve_mb >= p.resources.disk_mb {
            return Err(invalid(format!(
                "resources.disk_reserve_mb: {} leaves nothing of disk_mb {}",
                p.resources.disk_reserve_mb, p.resources.disk_mb
            )));
        }
        if p.service_manager != "systemd" {
            return Err(invalid(format!(
                "service_manager: `{}` is not supported (systemd)",
                p.service_manager
            )));
        }
        for (field, path) in [
            ("install.prefix", &p.install.prefix),
            ("install.binary", &p.install.binary),
            ("install.config", &p.install.config),
            ("install.data_dir", &p.install.data_dir),
            ("install.unit", &p.install.unit),
        ] {
            if !path.is_absolute() {
                return Err(invalid(format!(
                    "{field}: {} is not absolute",
                    path.display()
                )));
            }
        }
        // The defaults must make a valid agent config.
        p.agent_config("device-01")
            .validate(std::path::Path::new(name))
            .map_err(|e| invalid(e.to_string()))?;
        Ok(p)
    }

    /// A shipped profile by name.
    pub fn builtin(name: &str) -> Result<Profile, ProfileError> {
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => Profile::parse(n, text),
            None => Err(ProfileError::Unknown {
                name: name.to_owned(),
                known: BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Every shipped profile.
    pub fn all() -> Vec<Profile> {
        BUILTIN
            .iter()
            .filter_map(|(n, text)| Profile::parse(n, text).ok())
            .collect()
    }

    /// What a device of this kind tells the bundle checks. Memory available to
    /// a model: half the board's memory (the OS and the application keep the
    /// rest).
    pub fn facts(&self) -> DeviceFacts {
        DeviceFacts {
            arch: Arch::new(&self.arch).unwrap_or_else(|_| Arch::current()),
            agent_version: edgefleet_agent_version(),
            memory_available: self.resources.memory_mb * 1024 * 1024 / 2,
        }
    }
}

impl Profile {
    /// The agent config a device of this kind gets: its paths, the identity
    /// files beside the config, and this board's limits.
    pub fn agent_config(&self, device_id: &str) -> edgefleet_agent::config::AgentConfig {
        let etc = self
            .install
            .config
            .parent()
            .map_or_else(|| PathBuf::from("/etc/edgefleet"), PathBuf::from);
        let mut c = edgefleet_agent::config::AgentConfig {
            device_id: device_id.to_owned(),
            data_dir: self.install.data_dir.clone(),
            trust_root: etc.join("trust-root.cbor"),
            ..Default::default()
        };
        c.broker.ca = Some(etc.join("ca.pem"));
        c.broker.cert = Some(etc.join("device.pem"));
        c.broker.key = Some(etc.join("device.key"));
        c.telemetry.interval_s = self.agent.telemetry_interval_s;
        c.limits.max_bundle_bytes = self.agent.max_bundle_mb << 20;
        c.limits.disk_reserve_bytes = self.resources.disk_reserve_mb << 20;
        // Flashed into the slot layout (docs/agent-update.md): the binary in
        // slot A of `binary_dir`, `current` naming it; the unit starts
        // `install.binary`, a fixed link to `current`.
        c.self_update.link = c.self_update.binary_dir.join("current");
        c
    }
}

fn edgefleet_agent_version() -> semver::Version {
    edgefleet_agent::cli::device_facts().agent_version
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_profile_parses_and_is_named_after_its_file() {
        assert_eq!(Profile::all().len(), BUILTIN.len());
        for (name, _) in BUILTIN {
            let p = Profile::builtin(name).expect("parses");
            assert_eq!(&p.name, name);
        }
    }

    #[test]
    fn a_bad_profile_names_the_field() {
        let text = include_str!("../raspberry-pi-4.toml").replace("cpus = 4", "cpus = 0");
        let e = Profile::parse("x", &text).expect_err("zero cpus");
        assert!(e.to_string().contains("cpus"), "{e}");
        let text = include_str!("../raspberry-pi-4.toml").replace("arch =", "arhc =");
        let e = Profile::parse("x", &text).expect_err("unknown field");
        assert!(e.to_string().contains("arhc"), "{e}");
        let e = Profile::builtin("pdp-11").expect_err("unknown");
        assert!(e.to_string().contains("raspberry-pi-4"), "{e}");
        let text = include_str!("../raspberry-pi-4.toml").replace("\"systemd\"", "\"openrc\"");
        let e = Profile::parse("x", &text).expect_err("openrc");
        assert!(e.to_string().contains("service_manager"), "{e}");
        let text = include_str!("../raspberry-pi-4.toml")
            .replace("telemetry_interval_s = 60", "telemetry_interval_s = 0");
        let e = Profile::parse("x", &text).expect_err("interval");
        assert!(e.to_string().contains("telemetry.interval_s"), "{e}");
        let text = include_str!("../raspberry-pi-4.toml").replace(
            "data_dir = \"/var/lib/edgefleet\"",
            "data_dir = \"var/lib\"",
        );
        let e = Profile::parse("x", &text).expect_err("relative");
        assert!(e.to_string().contains("install.data_dir"), "{e}");
    }

    #[test]
    fn the_profiles_cover_the_boards_named_by_the_issues() {
        let all = Profile::all();
        let arch_of = |n: &str| all.iter().find(|p| p.name == n).map(|p| p.arch.clone());
        assert_eq!(arch_of("raspberry-pi-4").as_deref(), Some("aarch64"));
        assert_eq!(arch_of("raspberry-pi-5").as_deref(), Some("aarch64"));
        assert_eq!(arch_of("raspberry-pi-3").as_deref(), Some("arm"));
        assert_eq!(arch_of("raspberry-pi-zero-2w").as_deref(), Some("arm"));
        assert_eq!(arch_of("jetson-orin-nano").as_deref(), Some("aarch64"));
        assert_eq!(arch_of("x86-64-gateway").as_deref(), Some("x86_64"));
        let zero = Profile::builtin("raspberry-pi-zero-2w").expect("profile");
        let c = zero.agent_config("pi-7");
        assert_eq!(c.limits.max_bundle_bytes, 64 << 20);
        assert_eq!(
            c.broker.key.as_deref(),
            Some(std::path::Path::new("/etc/edgefleet/device.key"))
        );
    }
}
