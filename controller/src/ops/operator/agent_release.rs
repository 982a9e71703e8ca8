//! `edgefleet agent-release build`: one signed file holding the agent's static
//! binary for each target (docs/agent-update.md). The file is a bundle (same
//! format, chunk table and signatures) whose manifest says `edgefleet/agent-release`;
//! the trust root's agent-release role signs it.

use edgefleet_shared::manifest::{AGENT_CHANNEL, ModelSchema, agent_binary_name};

use super::*;
use crate::ops::flash::Elf;
use edgefleet_shared::Digest;

/// Largest agent binary read (the device build is about 12 MB).
pub const MAX_AGENT_BINARY: u64 = 256 << 20;
/// Default transfer chunk of an agent release: small, so that a device that
/// fetches only its own architecture's binary fetches at most two chunks of its
/// neighbours' bytes.
pub const AGENT_RELEASE_CHUNK: u32 = 64 * 1024;
/// Default memory a device must have free for the new agent during the
/// hand-over, while the old one still runs (docs/agent-update.md).
pub const AGENT_RELEASE_MEMORY: u64 = 32 << 20;

/// What `agent-release build` needs.
#[derive(Debug)]
pub struct AgentReleaseOptions {
    /// Each binary with the target triple it was built for.
    pub binaries: Vec<(PathBuf, String)>,
    /// The agent's version (its `--version` must answer it on the device).
    pub version: semver::Version,
    /// Release number: only grows (the device refuses a downgrade).
    pub release: u64,
    /// Lowest running agent that may install it.
    pub min_agent_version: semver::Version,
    /// Memory the device needs free for the hand-over.
    pub memory_bytes: u64,
    /// Transfer chunk size.
    pub chunk_size: u32,
    /// Build time.
    pub now: UnixTime,
    /// Days until it expires.
    pub expires_in_days: u32,
    /// Accept binaries that need a dynamic loader (for devices known to have it).
    pub allow_dynamic: bool,
    /// Sign right away with these keys.
    pub signers: Vec<SecretKey>,
}

/// One binary as it went into the release.
#[derive(Debug, Clone)]
pub struct AgentBinary {
    /// The file.
    pub path: PathBuf,
    /// The target triple given for it.
    pub target: String,
    /// Its architecture, from the ELF header.
    pub arch: Arch,
    /// Needs a program interpreter (dynamically linked).
    pub dynamic: bool,
    /// Its size in bytes.
    pub size: u64,
}

/// What was written.
#[derive(Debug)]
pub struct AgentReleaseReport {
    /// The release's identity.
    pub digest: Digest,
    /// Its manifest.
    pub manifest: Manifest,
    /// The binaries, in payload order.
    pub binaries: Vec<AgentBinary>,
    /// Signatures added.
    pub signatures: usize,
}

/// The Rust architecture name of a target triple's first component
/// (`armv7-unknown-linux-musleabihf` is `arm`, as `std::env::consts::ARCH` says).
pub fn triple_arch(triple: &str) -> Option<&'static str> {
    let first = triple.split('-').next()?;
    Some(match first {
        "x86_64" => "x86_64",
        "aarch64" => "aarch64",
        "i586" | "i686" => "x86",
        "riscv64gc" | "riscv64" => "riscv64",
        a if a.starts_with("arm") || a.starts_with("thumb") => "arm",
        _ => return None,
    })
}

/// The static (musl) target `cross/build.sh` builds for a Rust architecture.
fn musl_target(arch: &str) -> String {
    match arch {
        "arm" => "armv7-unknown-linux-musleabihf".into(),
        other => format!("{other}-unknown-linux-musl"),
    }
}

/// Checks one `--binary`/`--target` pair: an ELF executable of the target's
/// architecture, static unless `allow_dynamic`.
fn check_binary(
    path: &Path,
    target: &str,
    allow_dynamic: bool,
) -> Result<AgentBinary, OperatorError> {
    let what = || path.display().to_string();
    let expected = triple_arch(target).ok_or_else(|| {
        input_err(
            "--target",
            format!("{target:?} is not a target triple edgefleet ships (x86_64-, aarch64-, arm*-, i686-, riscv64gc-...)"),
        )
    })?;
    let data = read_capped(path, MAX_AGENT_BINARY)?;
    let elf = Elf::parse(&data).map_err(|e| input_err(what(), e.to_string()))?;
    if elf.arch != expected {
        return Err(input_err(
            what(),
            format!(
                "is an {} binary, but --target {target} is {expected}",
                elf.arch
            ),
        ));
    }
    if elf.interpreter && !allow_dynamic {
        return Err(input_err(
            what(),
            format!(
                "is not static: it needs a dynamic loader, which a device may not have; build a static one with `cross/build.sh {}`, or pass --allow-dynamic",
                musl_target(expected)
            ),
        ));
    }
    Ok(AgentBinary {
        path: path.to_owned(),
        target: target.to_owned(),
        arch: Arch::new(elf.arch).map_err(|e| input_err(what(), e.to_string()))?,
        dynamic: elf.interpreter,
        size: data.len() as u64,
    })
}

/// Builds (and optionally signs) an agent release at `out`.
pub fn build_agent_release(
    opts: &AgentReleaseOptions,
    out: &Path,
) -> Result<AgentReleaseReport, OperatorError> {
    if opts.binaries.is_empty() {
        return Err(input_err("--binary", "give at least one agent binary"));
    }
    let mut binaries: Vec<AgentBinary> = Vec::new();
    for (path, target) in &opts.binaries {
        let binary = check_binary(path, target, opts.allow_dynamic)?;
        if let Some(first) = binaries.iter().find(|b| b.arch == binary.arch) {
            return Err(input_err(
                path.display().to_string(),
                format!(
                    "is a second {} binary (after {}): one binary per architecture",
                    binary.arch,
                    first.path.display()
                ),
            ));
        }
        binaries.push(binary);
    }
    let inputs = binaries
        .iter()
        .map(|b| {
            let name = agent_binary_name(&b.arch).ok_or_else(|| {
                input_err(
                    b.path.display().to_string(),
                    "no artifact name for its architecture",
                )
            })?;
            Ok(ArtifactInput {
                name,
                kind: ArtifactKind::Agent,
                source: ArtifactSource::File(b.path.clone()),
            })
        })
        .collect::<Result<Vec<_>, OperatorError>>()?;
    let draft = ManifestDraft {
        channel: ModelChannel::new(AGENT_CHANNEL)
            .map_err(|e| input_err("channel", e.to_string()))?,
        version: opts.version.clone(),
        release: opts.release,
        created_at: opts.now,
        expires_at: opts.now.plus_days(i64::from(opts.expires_in_days)),
        schema: ModelSchema::default(),
        constraints: Constraints {
            architectures: binaries.iter().map(|b| b.arch.clone()).collect(),
            min_agent_version: opts.min_agent_version.to_string(),
            memory_bytes: opts.memory_bytes,
        },
        health: HealthPolicy::default(),
        chunk_size: opts.chunk_size,
    };
    let manifest = prepare_manifest(&draft, &inputs).map_err(io_err(out))?;
    let header = write_signed(out, "agent release", &manifest, &inputs, &opts.signers)?;
    Ok(AgentReleaseReport {
        digest: header.digest(),
        manifest,
        binaries,
        signatures: header.signatures.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_triples_map_to_rust_architecture_names() {
        for (triple, arch) in [
            ("x86_64-unknown-linux-musl", Some("x86_64")),
            ("aarch64-unknown-linux-musl", Some("aarch64")),
            ("armv7-unknown-linux-musleabihf", Some("arm")),
            ("arm-unknown-linux-musleabi", Some("arm")),
            ("thumbv7neon-unknown-linux-gnueabihf", Some("arm")),
            ("i686-unknown-linux-musl", Some("x86")),
            ("riscv64gc-unknown-linux-musl", Some("riscv64")),
            ("mips-unknown-linux-musl", None),
            ("", None),
        ] {
            assert_eq!(triple_arch(triple), arch, "{triple}");
        }
    }
}
