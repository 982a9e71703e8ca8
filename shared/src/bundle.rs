//! The bundle file: layout, verification rules, streaming verify/unpack and writing.
//! The steps below are numbered as in `docs/bundle.md`, "Verification"; a second
//! implementation must follow the same order to report the same refusal.
//!
//! ```text
//! preamble   magic (8) | format version u16 BE | flags u16 BE (0) | manifest length u32 BE
//! manifest   CBOR Manifest, exactly as signed
//! signatures length u32 BE | CBOR array of SignatureEntry
//! payload    for each artifact in manifest order: length u64 BE | bytes
//! ```
//!
//! Memory: the header is capped (1 MiB manifest + 16 KiB signatures); the payload is
//! streamed through a 64 KiB buffer, whatever the bundle's size.

use std::io::{self, Read, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::cbor::{self, DecodeError};
use crate::ids::{Arch, ArtifactName, Digest, KeyId, ModelChannel};
use crate::keys::{SecretKey, SignatureEntry, ThresholdFailure};
use crate::manifest::{
    AGENT_CHANNEL, AGENT_RELEASE_TYPE, ArtifactEntry, ArtifactKind, Constraints, HealthPolicy,
    MANIFEST_TYPE, Manifest, ModelSchema, PayloadTable,
};
use crate::time::UnixTime;
use crate::trust::{MAX_SIGNATURES, Role, TrustRoot};

/// First eight bytes of every bundle. Like PNG's, it catches text-mode mangling.
pub const MAGIC: [u8; 8] = *b"\x89EFB\r\n\x1a\n";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the manifest.
pub const PREAMBLE_LEN: usize = 16;
/// Largest manifest accepted (1 MiB; a 500 MB bundle's chunk table is ~70 KB).
pub const MAX_MANIFEST_LEN: u32 = 1024 * 1024;
/// Largest signature block accepted.
pub const MAX_SIGNATURES_LEN: u32 = 16 * 1024;
/// Largest header (preamble, manifest, signature block).
pub const MAX_HEADER_LEN: usize =
    PREAMBLE_LEN + MAX_MANIFEST_LEN as usize + 4 + MAX_SIGNATURES_LEN as usize;
/// Size of the streaming buffer.
const IO_BUFFER: usize = 64 * 1024;

/// Global size caps, independent of what a manifest declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest single artifact.
    pub max_artifact_size: u64,
    /// Largest payload (all artifacts with their prefixes).
    pub max_payload_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_artifact_size: 2 << 30,
            max_payload_size: 4 << 30,
        }
    }
}

/// Every reason a device (or the controller, or the CLI) refuses a bundle. Stable
/// codes on the wire (`code` field, snake_case); each is tested in `tests/attacks.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Refusal {
    /// The file does not start with the bundle magic.
    #[error("not an edgefleet bundle (wrong magic bytes)")]
    BadMagic,
    /// Format version (or flags) this build does not read.
    #[error("unsupported bundle format version {found} (this build reads {FORMAT_VERSION})")]
    UnsupportedFormat {
        /// Version found in the preamble.
        found: u16,
    },
    /// The file ends early.
    #[error("bundle is truncated: it ends inside the {section}")]
    Truncated {
        /// Section where the end came.
        section: String,
    },
    /// Bytes after the last artifact.
    #[error("bundle has trailing bytes after the last artifact")]
    TrailingBytes,
    /// A header section declares a length over its cap.
    #[error("bundle {section} declares {size} bytes, over the limit of {limit}")]
    SectionTooLarge {
        /// `manifest` or `signatures`.
        section: String,
        /// Declared size.
        size: u64,
        /// Cap.
        limit: u64,
    },
    /// The signature block is not a valid list of signatures.
    #[error("bundle signature block is malformed: {detail}")]
    MalformedSignatures {
        /// Decoder message.
        detail: String,
    },
    /// The manifest is signed, but malformed or breaks a structural rule.
    #[error("bundle manifest is invalid: {detail}")]
    InvalidManifest {
        /// Which field and why.
        detail: String,
    },
    /// A trusted key's signature does not verify: the manifest was changed after
    /// signing (or the signature is corrupt).
    #[error("signature by key {} does not verify: the manifest was modified after signing", key.short())]
    InvalidSignature {
        /// The key whose signature failed.
        key: KeyId,
    },
    /// Signed only by keys the trust root does not list.
    #[error("bundle is signed only by unknown key {}", key.short())]
    UnknownKey {
        /// One of the unknown keys.
        key: KeyId,
    },
    /// Fewer distinct trusted keys signed than the trust root requires.
    #[error(
        "bundle has {valid} valid signature(s) from distinct trusted keys, {threshold} required"
    )]
    TooFewSignatures {
        /// Distinct valid signatures.
        valid: u32,
        /// Threshold of the trust root.
        threshold: u32,
    },
    /// The device's trust root has expired.
    #[error("trust root version {version} expired at {expired_at}")]
    TrustRootExpired {
        /// Its version.
        version: u32,
        /// Its expiry.
        expired_at: UnixTime,
    },
    /// The manifest has expired.
    #[error("bundle expired at {expired_at}")]
    ManifestExpired {
        /// Its expiry.
        expired_at: UnixTime,
    },
    /// Release number lower than the one installed for the channel.
    #[error(
        "rollback refused: {channel} release {release} is older than installed release {installed}"
    )]
    Rollback {
        /// The channel.
        channel: ModelChannel,
        /// Offered release.
        release: u64,
        /// Highest release installed.
        installed: u64,
    },
    /// Same release number as installed, but different content.
    #[error("{channel} release {release} is already installed with different content")]
    ReleaseReused {
        /// The channel.
        channel: ModelChannel,
        /// The release.
        release: u64,
    },
    /// An artifact declares more bytes than the global cap.
    #[error("artifact {name} declares {size} bytes, over the limit of {limit}")]
    ArtifactTooLarge {
        /// The artifact.
        name: ArtifactName,
        /// Declared size.
        size: u64,
        /// Cap.
        limit: u64,
    },
    /// The payload as a whole is over the global cap.
    #[error("bundle payload is {size} bytes, over the limit of {limit}")]
    PayloadTooLarge {
        /// Declared payload size.
        size: u64,
        /// Cap.
        limit: u64,
    },
    /// The length prefix in the file differs from the size in the manifest.
    #[error("artifact {name} is {found} bytes in the file, the manifest declares {declared}")]
    ArtifactSizeMismatch {
        /// The artifact.
        name: ArtifactName,
        /// Size in the manifest.
        declared: u64,
        /// Size in the file.
        found: u64,
    },
    /// The artifact's SHA-256 differs from the manifest.
    #[error("artifact {name} does not match its SHA-256 in the manifest")]
    ArtifactDigestMismatch {
        /// The artifact.
        name: ArtifactName,
    },
    /// A payload chunk's SHA-256 differs from the chunk table.
    #[error("payload chunk {index} does not match its SHA-256 in the chunk table")]
    ChunkDigestMismatch {
        /// Zero-based chunk index.
        index: u32,
    },
    /// The device's architecture is not in the bundle's list.
    #[error("bundle supports architectures {supported:?}, this device is {device}")]
    ArchitectureNotSupported {
        /// The device's architecture.
        device: Arch,
        /// The bundle's list.
        supported: Vec<Arch>,
    },
    /// The agent is older than the bundle's minimum.
    #[error("bundle needs agent {required} or newer, this agent is {agent}")]
    AgentTooOld {
        /// Minimum version.
        required: String,
        /// This agent's version.
        agent: String,
    },
    /// Not enough memory for the model.
    #[error("bundle needs {required} bytes of memory, the device has {available} available")]
    InsufficientMemory {
        /// Memory the bundle declares.
        required: u64,
        /// Memory the device offers.
        available: u64,
    },
    /// The trust root names no keys that may sign this kind of bundle: a root made
    /// before agent releases has no agent-release role.
    #[error(
        "trust root version {version} has no keys that may sign {role}: rotate to a root with an agent-release role (docs/bundle.md)"
    )]
    NoSigningRole {
        /// The root's version.
        version: u32,
        /// The role it lacks.
        role: Role,
    },
    /// An agent release where a model bundle was expected, or the reverse.
    #[error("bundle is {found}, expected {expected}")]
    WrongKind {
        /// What the receiver expected.
        expected: Role,
        /// What the manifest says it is.
        found: Role,
    },
}

impl Refusal {
    /// The stable wire code (`bad_magic`, `rollback`, ...).
    pub fn code(&self) -> String {
        ciborium::Value::serialized(self)
            .ok()
            .and_then(|v| {
                v.into_map()
                    .ok()?
                    .into_iter()
                    .find_map(|(k, v)| (k.as_text() == Some("code")).then(|| v.into_text().ok())?)
            })
            .unwrap_or_default()
    }

    fn truncated(section: &str) -> Refusal {
        Refusal::Truncated {
            section: section.into(),
        }
    }
}

/// A refusal, or an I/O failure of the reader or sink (not the bundle's fault).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle is refused.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Reading the bundle or writing artifacts failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl BundleError {
    /// The refusal, if this is one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            BundleError::Refused(r) => Some(r),
            BundleError::Io(_) => None,
        }
    }
}

/// What the device remembers about a channel for rollback protection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledRelease {
    /// Highest release installed (or staged) for the channel.
    pub release: u64,
    /// Manifest digest of that release.
    pub manifest_digest: Digest,
}

/// What the device offers, for the constraints check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    /// CPU architecture.
    pub arch: Arch,
    /// The agent's version.
    pub agent_version: semver::Version,
    /// Memory available for a model, in bytes.
    pub memory_available: u64,
}

/// Everything verification depends on besides the bundle: passed in, never read
/// from the environment.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The trust root to verify signatures against.
    pub trust: &'a TrustRoot,
    /// What the bundle must be (a model bundle or an agent release): decides which
    /// of the root's keys count.
    pub role: Role,
    /// The current time.
    pub now: UnixTime,
    /// Global caps.
    pub limits: Limits,
    /// What is installed for the bundle's channel (None: nothing yet, or the
    /// controller/CLI which do not do rollback checks).
    pub installed: Option<&'a InstalledRelease>,
    /// The device's facts (None: skip the constraints check, e.g. on the controller).
    pub device: Option<&'a DeviceFacts>,
}

/// A bundle header as read: exact manifest bytes and the signatures, unverified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHeader {
    /// The manifest, exactly as in the file.
    pub manifest_bytes: Vec<u8>,
    /// The signatures from the signature block.
    pub signatures: Vec<SignatureEntry>,
}

/// A header whose signatures and rules passed.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedHeader {
    /// The decoded manifest.
    pub manifest: Manifest,
    /// SHA-256 of the exact manifest bytes: the bundle's identity.
    pub digest: Digest,
    /// Trusted keys with a valid signature.
    pub signed_by: Vec<KeyId>,
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], section: &str) -> Result<(), BundleError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            BundleError::Refused(Refusal::truncated(section))
        } else {
            BundleError::Io(e)
        }
    })
}

fn read_u32<R: Read>(r: &mut R, section: &str) -> Result<u32, BundleError> {
    let mut b = [0u8; 4];
    read_exact_or(r, &mut b, section)?;
    Ok(u32::from_be_bytes(b))
}

fn decode_signatures(bytes: &[u8]) -> Result<Vec<SignatureEntry>, Refusal> {
    let sigs: Vec<SignatureEntry> =
        cbor::from_slice("signature block", bytes, MAX_SIGNATURES_LEN as usize).map_err(|e| {
            Refusal::MalformedSignatures {
                detail: e.to_string(),
            }
        })?;
    if sigs.len() > MAX_SIGNATURES {
        return Err(Refusal::MalformedSignatures {
            detail: format!(
                "{} signatures, at most {MAX_SIGNATURES} allowed",
                sigs.len()
            ),
        });
    }
    Ok(sigs)
}

impl RawHeader {
    /// Step 1-3: reads the preamble, the manifest bytes and the signature block,
    /// checking magic, version and every length against its cap before reading.
    pub fn read_from<R: Read>(r: &mut R) -> Result<RawHeader, BundleError> {
        // Step 1: preamble.
        let mut pre = [0u8; PREAMBLE_LEN];
        // A short file that does not start like a bundle is not a bundle at all:
        // report the wrong magic rather than a truncation.
        let mut got = 0;
        while got < MAGIC.len() {
            match r.read(&mut pre[got..MAGIC.len()]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if pre[..got] != MAGIC[..got] {
            return Err(Refusal::BadMagic.into());
        }
        if got < MAGIC.len() {
            return Err(Refusal::truncated("preamble").into());
        }
        read_exact_or(r, &mut pre[8..], "preamble")?;
        let version = u16::from_be_bytes([pre[8], pre[9]]);
        let flags = u16::from_be_bytes([pre[10], pre[11]]);
        if version != FORMAT_VERSION || flags != 0 {
            return Err(Refusal::UnsupportedFormat { found: version }.into());
        }
        // Step 2: manifest bytes, capped before reading.
        let manifest_len = u32::from_be_bytes([pre[12], pre[13], pre[14], pre[15]]);
        if manifest_len == 0 || manifest_len > MAX_MANIFEST_LEN {
            return Err(Refusal::SectionTooLarge {
                section: "manifest".into(),
                size: manifest_len.into(),
                limit: MAX_MANIFEST_LEN.into(),
            }
            .into());
        }
        let mut manifest_bytes = vec![0u8; manifest_len as usize];
        read_exact_or(r, &mut manifest_bytes, "manifest")?;
        // Step 3: signature block, capped before reading.
        let sig_len = read_u32(r, "signature block")?;
        if sig_len > MAX_SIGNATURES_LEN {
            return Err(Refusal::SectionTooLarge {
                section: "signatures".into(),
                size: sig_len.into(),
                limit: MAX_SIGNATURES_LEN.into(),
            }
            .into());
        }
        let mut sig_bytes = vec![0u8; sig_len as usize];
        read_exact_or(r, &mut sig_bytes, "signature block")?;
        let signatures = decode_signatures(&sig_bytes)?;
        Ok(RawHeader {
            manifest_bytes,
            signatures,
        })
    }

    /// Parses a header that arrives on its own (the `install` command): the bytes
    /// must be exactly one header, nothing after it.
    pub fn parse(bytes: &[u8]) -> Result<RawHeader, Refusal> {
        let mut rest = bytes;
        let header = RawHeader::read_from(&mut rest).map_err(|e| match e {
            BundleError::Refused(r) => r,
            // Reading from a slice only fails with end of input, mapped above.
            BundleError::Io(_) => Refusal::truncated("header"),
        })?;
        if !rest.is_empty() {
            return Err(Refusal::TrailingBytes);
        }
        Ok(header)
    }

    /// Parses the header a command carries for bundle `digest`: [`RawHeader::parse`],
    /// and the header must be that bundle's.
    pub fn parse_offer(bytes: &[u8], digest: Digest) -> Result<RawHeader, Refusal> {
        let raw = RawHeader::parse(bytes)?;
        if raw.digest() != digest {
            return Err(Refusal::InvalidManifest {
                detail: format!(
                    "the command names bundle {} but its header is bundle {}",
                    digest.short(),
                    raw.digest().short()
                ),
            });
        }
        Ok(raw)
    }

    /// The header's bytes as they appear in a bundle file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let sigs = cbor::to_vec(&self.signatures);
        let mut out = Vec::with_capacity(PREAMBLE_LEN + self.manifest_bytes.len() + 4 + sigs.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        let mlen = u32::try_from(self.manifest_bytes.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&mlen.to_be_bytes());
        out.extend_from_slice(&self.manifest_bytes);
        let slen = u32::try_from(sigs.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&slen.to_be_bytes());
        out.extend_from_slice(&sigs);
        out
    }

    /// SHA-256 of the exact manifest bytes: the bundle's identity.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.manifest_bytes)
    }

    /// Adds (or replaces) `key`'s signature over the exact manifest bytes.
    pub fn sign(&mut self, key: &SecretKey) {
        let entry = key.sign(&self.manifest_bytes);
        self.signatures.retain(|s| s.key != entry.key);
        self.signatures.push(entry);
    }

    /// Decodes the manifest WITHOUT checking signatures: for `bundle inspect` and
    /// for signing. Never use the result to decide whether to install.
    pub fn decode_unverified(&self) -> Result<Manifest, DecodeError> {
        cbor::from_slice("manifest", &self.manifest_bytes, MAX_MANIFEST_LEN as usize)
    }

    /// When the signatures do not verify for `expected`: is this the other kind
    /// of bundle? Only then is the unverified manifest read, to say so rather
    /// than name a key; the bundle is refused either way.
    fn wrong_kind(&self, expected: Role) -> Option<Refusal> {
        let found = self.decode_unverified().ok()?.role()?;
        (found != expected).then_some(Refusal::WrongKind { expected, found })
    }

    /// Step 5 without the kind: the signatures of the keys of `policy.role`.
    fn check_role_signatures(
        &self,
        policy: &Policy<'_>,
    ) -> Result<crate::keys::SignatureCheck, Refusal> {
        let (keys, threshold) = policy
            .trust
            .role(policy.role)
            .ok_or(Refusal::NoSigningRole {
                version: policy.trust.version,
                role: policy.role,
            })?;
        let check = crate::keys::check_signatures(&self.manifest_bytes, &self.signatures, keys);
        check.require(usize::from(threshold)).map_err(|f| match f {
            ThresholdFailure::InvalidSignature(key) => Refusal::InvalidSignature { key },
            ThresholdFailure::UnknownKey(key) => Refusal::UnknownKey { key },
            ThresholdFailure::TooFew { valid, threshold } => Refusal::TooFewSignatures {
                valid: u32::try_from(valid).unwrap_or(u32::MAX),
                threshold: u32::try_from(threshold).unwrap_or(u32::MAX),
            },
        })?;
        Ok(check)
    }

    /// Steps 4-10: checks the header against `policy`. Pure: no I/O, no clock.
    pub fn verify(&self, policy: &Policy<'_>) -> Result<VerifiedHeader, Refusal> {
        // Step 4: the trust root must be current.
        if policy.now >= policy.trust.expires_at {
            return Err(Refusal::TrustRootExpired {
                version: policy.trust.version,
                expired_at: policy.trust.expires_at,
            });
        }
        // Step 5: a threshold of the role's keys signed the exact manifest bytes.
        let check = self
            .check_role_signatures(policy)
            .map_err(|refusal| self.wrong_kind(policy.role).unwrap_or(refusal))?;
        // Step 6: decode the verified bytes; structural rules; the kind the
        // receiver expects.
        let manifest = self
            .decode_unverified()
            .map_err(|e| Refusal::InvalidManifest {
                detail: e.to_string(),
            })?;
        if let Some(found) = manifest.role().filter(|r| *r != policy.role) {
            return Err(Refusal::WrongKind {
                expected: policy.role,
                found,
            });
        }
        // Step 7: global caps, before anything is downloaded or read.
        for a in &manifest.artifacts {
            if a.size > policy.limits.max_artifact_size {
                return Err(Refusal::ArtifactTooLarge {
                    name: a.name.clone(),
                    size: a.size,
                    limit: policy.limits.max_artifact_size,
                });
            }
        }
        manifest
            .validate(policy.limits.max_artifact_size)
            .map_err(|e| Refusal::InvalidManifest {
                detail: e.to_string(),
            })?;
        if manifest.payload.size > policy.limits.max_payload_size {
            return Err(Refusal::PayloadTooLarge {
                size: manifest.payload.size,
                limit: policy.limits.max_payload_size,
            });
        }
        // Step 8: expiry.
        if policy.now >= manifest.expires_at {
            return Err(Refusal::ManifestExpired {
                expired_at: manifest.expires_at,
            });
        }
        // Step 9: rollback protection for the channel.
        let digest = self.digest();
        if let Some(installed) = policy.installed {
            check_floor(&manifest.channel, manifest.release, digest, installed)?;
        }
        // Step 10: device constraints.
        if let Some(device) = policy.device {
            check_constraints(&manifest.constraints, device)?;
        }
        Ok(VerifiedHeader {
            manifest,
            digest,
            signed_by: check.valid.into_iter().collect(),
        })
    }
}

/// Step 9 on its own: may release `release` (bundle `digest`) of `channel` go
/// where `installed` is the highest release so far? Not a lower one, and the
/// same number only with the same content.
pub fn check_floor(
    channel: &ModelChannel,
    release: u64,
    digest: Digest,
    installed: &InstalledRelease,
) -> Result<(), Refusal> {
    if release < installed.release {
        return Err(Refusal::Rollback {
            channel: channel.clone(),
            release,
            installed: installed.release,
        });
    }
    if release == installed.release && digest != installed.manifest_digest {
        return Err(Refusal::ReleaseReused {
            channel: channel.clone(),
            release,
        });
    }
    Ok(())
}

/// Step 10 on its own: does `device` meet `constraints`?
pub fn check_constraints(constraints: &Constraints, device: &DeviceFacts) -> Result<(), Refusal> {
    if !constraints.architectures.is_empty() && !constraints.architectures.contains(&device.arch) {
        return Err(Refusal::ArchitectureNotSupported {
            device: device.arch.clone(),
            supported: constraints.architectures.clone(),
        });
    }
    // Validated by Manifest::validate; an unparsable value cannot get here.
    let required = semver::Version::parse(&constraints.min_agent_version).map_err(|e| {
        Refusal::InvalidManifest {
            detail: format!("constraints.min_agent_version: {e}"),
        }
    })?;
    if device.agent_version < required {
        return Err(Refusal::AgentTooOld {
            required: required.to_string(),
            agent: device.agent_version.to_string(),
        });
    }
    if constraints.memory_bytes > device.memory_available {
        return Err(Refusal::InsufficientMemory {
            required: constraints.memory_bytes,
            available: device.memory_available,
        });
    }
    Ok(())
}

/// Receives the artifacts' bytes during verification (e.g. writes them to a
/// staging directory). Bytes are delivered before the artifact's digest is
/// checked: a sink must treat everything as provisional until `finish` succeeds.
pub trait ArtifactSink {
    /// An artifact starts.
    fn begin(&mut self, entry: &ArtifactEntry) -> io::Result<()>;
    /// Next bytes of the current artifact.
    fn data(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// The current artifact ended and its digest matched.
    fn end(&mut self, entry: &ArtifactEntry) -> io::Result<()>;
}

/// A sink that discards everything (verification only).
#[derive(Debug, Default, Clone, Copy)]
pub struct DiscardSink;

impl ArtifactSink for DiscardSink {
    fn begin(&mut self, _: &ArtifactEntry) -> io::Result<()> {
        Ok(())
    }
    fn data(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn end(&mut self, _: &ArtifactEntry) -> io::Result<()> {
        Ok(())
    }
}

/// A chunk whose bytes matched its entry in a signed chunk table
/// ([`verify_chunk`]): [`PayloadVerifier::feed_chunk`] takes it without hashing it
/// again.
#[derive(Debug, Clone, Copy)]
pub struct CheckedChunk<'a> {
    index: u32,
    digest: Digest,
    data: &'a [u8],
}

impl<'a> CheckedChunk<'a> {
    /// The chunk's index in the table.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The chunk's bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
}

/// Checks one chunk against the signed chunk table, as it arrives over the wire.
pub fn verify_chunk<'a>(
    table: &PayloadTable,
    index: u32,
    data: &'a [u8],
) -> Result<CheckedChunk<'a>, Refusal> {
    let bad = Refusal::ChunkDigestMismatch { index };
    let Some((start, end)) = table.chunk_range(index) else {
        return Err(bad);
    };
    let digest = table.chunks[index as usize];
    if data.len() as u64 != end - start || Digest::of(data) != digest {
        return Err(bad);
    }
    Ok(CheckedChunk {
        index,
        digest,
        data,
    })
}

#[derive(Debug)]
enum ArtifactState {
    Prefix { buf: [u8; 8], filled: usize },
    Body { remaining: u64, hasher: Sha256 },
}

/// Step 11, the pure core: verifies a payload fed in pieces of any size, checking
/// each chunk's hash at the chunk's end and each artifact's length prefix and hash,
/// and hands artifact bytes to a sink. A download feeds it whole chunks already
/// checked on arrival ([`PayloadVerifier::feed_chunk`]), so only the artifact
/// hashes are computed here.
#[derive(Debug)]
pub struct PayloadVerifier {
    manifest: Arc<Manifest>,
    offset: u64,
    chunk_index: u32,
    chunk_filled: u64,
    chunk_hasher: Sha256,
    artifact: usize,
    state: ArtifactState,
}

impl PayloadVerifier {
    /// Starts at payload offset 0.
    pub fn new(manifest: Arc<Manifest>) -> Self {
        PayloadVerifier {
            manifest,
            offset: 0,
            chunk_index: 0,
            chunk_filled: 0,
            chunk_hasher: Sha256::new(),
            artifact: 0,
            state: ArtifactState::Prefix {
                buf: [0; 8],
                filled: 0,
            },
        }
    }

    /// Bytes of payload still expected.
    pub fn remaining(&self) -> u64 {
        self.manifest.payload.size - self.offset
    }

    /// The manifest whose payload this checks.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The chunk [`PayloadVerifier::feed_chunk`] takes next (the chunk count once
    /// the payload is complete).
    pub fn next_chunk(&self) -> u32 {
        self.chunk_index
    }

    /// Feeds the next bytes of the payload.
    pub fn feed(&mut self, data: &[u8], sink: &mut dyn ArtifactSink) -> Result<(), BundleError> {
        self.feed_pieces(data, sink, true)
    }

    /// Feeds the next whole chunk, already checked against this manifest's chunk
    /// table: its artifacts are checked, its chunk hash is not computed again.
    /// A chunk out of payload order, or checked against another table, is an error.
    pub fn feed_chunk(
        &mut self,
        chunk: CheckedChunk<'_>,
        sink: &mut dyn ArtifactSink,
    ) -> Result<(), BundleError> {
        let expected = self.manifest.payload.chunks.get(chunk.index as usize);
        if chunk.index != self.chunk_index
            || self.chunk_filled != 0
            || expected != Some(&chunk.digest)
        {
            return Err(io::Error::other(format!(
                "chunk {} fed out of order: the payload is at chunk {}",
                chunk.index, self.chunk_index
            ))
            .into());
        }
        self.feed_pieces(chunk.data, sink, false)
    }

    fn feed_pieces(
        &mut self,
        data: &[u8],
        sink: &mut dyn ArtifactSink,
        hash_chunks: bool,
    ) -> Result<(), BundleError> {
        if data.len() as u64 > self.remaining() {
            return Err(Refusal::TrailingBytes.into());
        }
        // Pieces never cross a chunk or artifact boundary, so checks run in payload
        // order (artifact checks before the chunk check at the same offset) and the
        // verdict does not depend on how the input was split.
        let mut data = data;
        while !data.is_empty() {
            let n = data.len().min(self.to_next_boundary());
            let (piece, rest) = data.split_at(n);
            self.feed_artifacts(piece, sink)?;
            self.feed_chunks(piece, hash_chunks)?;
            self.offset += n as u64;
            data = rest;
        }
        Ok(())
    }

    fn to_next_boundary(&self) -> usize {
        let table = &self.manifest.payload;
        let to_chunk = table
            .chunk_range(self.chunk_index)
            .map_or(u64::MAX, |(start, end)| end - start - self.chunk_filled);
        let to_artifact = match &self.state {
            ArtifactState::Prefix { filled, .. } => (8 - filled) as u64,
            ArtifactState::Body { remaining, .. } => *remaining,
        };
        usize::try_from(to_chunk.min(to_artifact).max(1)).unwrap_or(usize::MAX)
    }

    fn feed_chunks(&mut self, mut data: &[u8], hash: bool) -> Result<(), Refusal> {
        let table = &self.manifest.payload;
        while !data.is_empty() {
            let Some((start, end)) = table.chunk_range(self.chunk_index) else {
                return Err(Refusal::TrailingBytes);
            };
            let want = (end - start - self.chunk_filled) as usize;
            let take = want.min(data.len());
            if hash {
                self.chunk_hasher.update(&data[..take]);
            }
            self.chunk_filled += take as u64;
            data = &data[take..];
            if take == want {
                let hasher = std::mem::take(&mut self.chunk_hasher);
                if hash
                    && Digest(hasher.finalize().into()) != table.chunks[self.chunk_index as usize]
                {
                    return Err(Refusal::ChunkDigestMismatch {
                        index: self.chunk_index,
                    });
                }
                self.chunk_index += 1;
                self.chunk_filled = 0;
            }
        }
        Ok(())
    }

    fn feed_artifacts(
        &mut self,
        mut data: &[u8],
        sink: &mut dyn ArtifactSink,
    ) -> Result<(), BundleError> {
        while !data.is_empty() {
            let Some(entry) = self.manifest.artifacts.get(self.artifact) else {
                return Err(Refusal::TrailingBytes.into());
            };
            match &mut self.state {
                ArtifactState::Prefix { buf, filled } => {
                    let take = (8 - *filled).min(data.len());
                    buf[*filled..*filled + take].copy_from_slice(&data[..take]);
                    *filled += take;
                    data = &data[take..];
                    if *filled == 8 {
                        let found = u64::from_be_bytes(*buf);
                        if found != entry.size {
                            return Err(Refusal::ArtifactSizeMismatch {
                                name: entry.name.clone(),
                                declared: entry.size,
                                found,
                            }
                            .into());
                        }
                        sink.begin(entry)?;
                        self.state = ArtifactState::Body {
                            remaining: entry.size,
                            hasher: Sha256::new(),
                        };
                        self.finish_artifact_if_done(sink)?;
                    }
                }
                ArtifactState::Body { remaining, hasher } => {
                    let take = (*remaining).min(data.len() as u64) as usize;
                    hasher.update(&data[..take]);
                    sink.data(&data[..take])?;
                    *remaining -= take as u64;
                    data = &data[take..];
                    self.finish_artifact_if_done(sink)?;
                }
            }
        }
        Ok(())
    }

    fn finish_artifact_if_done(&mut self, sink: &mut dyn ArtifactSink) -> Result<(), BundleError> {
        let ArtifactState::Body {
            remaining: 0,
            hasher,
        } = &mut self.state
        else {
            return Ok(());
        };
        let entry = &self.manifest.artifacts[self.artifact];
        let got = Digest(std::mem::take(hasher).finalize().into());
        if got != entry.sha256 {
            return Err(Refusal::ArtifactDigestMismatch {
                name: entry.name.clone(),
            }
            .into());
        }
        sink.end(entry)?;
        self.artifact += 1;
        self.state = ArtifactState::Prefix {
            buf: [0; 8],
            filled: 0,
        };
        Ok(())
    }

    /// Call at the end of input: errors when the payload is incomplete.
    pub fn finish(&self) -> Result<(), Refusal> {
        if self.remaining() > 0 {
            let section = match self.manifest.artifacts.get(self.artifact) {
                Some(a) => format!("artifact {}", a.name),
                None => "payload".into(),
            };
            return Err(Refusal::Truncated { section });
        }
        Ok(())
    }
}

/// Steps 1-12 over a reader: verifies a whole bundle in bounded memory, handing
/// artifact bytes to `sink`. Returns the verified header when every check passed.
pub fn verify_stream<R: Read>(
    mut reader: R,
    policy: &Policy<'_>,
    sink: &mut dyn ArtifactSink,
) -> Result<VerifiedHeader, BundleError> {
    let header = RawHeader::read_from(&mut reader)?.verify(policy)?;
    let mut verifier = PayloadVerifier::new(Arc::new(header.manifest.clone()));
    let mut buf = vec![0u8; IO_BUFFER];
    // Step 11: the payload.
    while verifier.remaining() > 0 {
        let want = (verifier.remaining()).min(IO_BUFFER as u64) as usize;
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        verifier.feed(&buf[..n], sink)?;
    }
    verifier.finish()?;
    // Step 12: nothing after the last artifact.
    let mut probe = [0u8; 1];
    loop {
        match reader.read(&mut probe) {
            Ok(0) => break,
            Ok(_) => return Err(Refusal::TrailingBytes.into()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(header)
}

/// Where an artifact's bytes come from when building a bundle.
#[derive(Debug, Clone)]
pub enum ArtifactSource {
    /// A file, read twice (once to hash, once to copy), never held in memory.
    File(std::path::PathBuf),
    /// Bytes in memory (small artifacts, tests).
    Bytes(Vec<u8>),
}

impl ArtifactSource {
    fn open(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(match self {
            ArtifactSource::File(p) => Box::new(io::BufReader::with_capacity(
                IO_BUFFER,
                std::fs::File::open(p)?,
            )),
            ArtifactSource::Bytes(b) => Box::new(b.as_slice()),
        })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(match self {
            ArtifactSource::File(p) => std::fs::metadata(p)?.len(),
            ArtifactSource::Bytes(b) => b.len() as u64,
        })
    }
}

/// One artifact to put into a bundle.
#[derive(Debug, Clone)]
pub struct ArtifactInput {
    /// Its name in the bundle.
    pub name: ArtifactName,
    /// What it is for.
    pub kind: ArtifactKind,
    /// Where its bytes are.
    pub source: ArtifactSource,
}

/// Everything in a manifest that is not computed from the artifacts.
#[derive(Debug, Clone)]
pub struct ManifestDraft {
    /// Model channel.
    pub channel: ModelChannel,
    /// Semantic version.
    pub version: semver::Version,
    /// Release number (>= 1).
    pub release: u64,
    /// Build time.
    pub created_at: UnixTime,
    /// Expiry.
    pub expires_at: UnixTime,
    /// Model interface.
    pub schema: ModelSchema,
    /// Device constraints.
    pub constraints: Constraints,
    /// Health check policy.
    pub health: HealthPolicy,
    /// Chunk size for transfer.
    pub chunk_size: u32,
}

/// Streams the payload (prefix + bytes per artifact) to `f`.
fn for_each_payload_piece(
    inputs: &[ArtifactInput],
    mut f: impl FnMut(Option<usize>, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; IO_BUFFER];
    for (i, input) in inputs.iter().enumerate() {
        let len = input.source.len()?;
        f(None, &len.to_be_bytes())?;
        let mut r = input.source.open()?;
        let mut seen = 0u64;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            seen += n as u64;
            f(Some(i), &buf[..n])?;
        }
        if seen != len {
            return Err(io::Error::other(format!(
                "artifact {} changed size while being read",
                input.name
            )));
        }
    }
    Ok(())
}

/// Computes the manifest for `inputs` in one streaming pass (sizes, SHA-256 per
/// artifact, chunk table). A draft on the agent's channel makes an agent release. Memory stays at one buffer whatever the sizes.
pub fn prepare_manifest(draft: &ManifestDraft, inputs: &[ArtifactInput]) -> io::Result<Manifest> {
    let mut hashers: Vec<Sha256> = inputs.iter().map(|_| Sha256::new()).collect();
    let chunk_size = u64::from(draft.chunk_size.max(1));
    let mut chunks = Vec::new();
    let mut chunk = Sha256::new();
    let mut in_chunk = 0u64;
    let mut total = 0u64;
    for_each_payload_piece(inputs, |artifact, mut data| {
        if let Some(i) = artifact {
            hashers[i].update(data);
        }
        total += data.len() as u64;
        while !data.is_empty() {
            let take = ((chunk_size - in_chunk) as usize).min(data.len());
            chunk.update(&data[..take]);
            in_chunk += take as u64;
            data = &data[take..];
            if in_chunk == chunk_size {
                chunks.push(Digest(std::mem::take(&mut chunk).finalize().into()));
                in_chunk = 0;
            }
        }
        Ok(())
    })?;
    if in_chunk > 0 {
        chunks.push(Digest(chunk.finalize().into()));
    }
    let artifacts = inputs
        .iter()
        .zip(hashers)
        .map(|(input, h)| {
            Ok(ArtifactEntry {
                name: input.name.clone(),
                kind: input.kind,
                size: input.source.len()?,
                sha256: Digest(h.finalize().into()),
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    // The agent's channel is reserved for agent releases (Manifest::validate).
    let kind = if draft.channel.as_str() == AGENT_CHANNEL {
        AGENT_RELEASE_TYPE
    } else {
        MANIFEST_TYPE
    };
    Ok(Manifest {
        kind: kind.into(),
        channel: draft.channel.clone(),
        version: draft.version.to_string(),
        release: draft.release,
        created_at: draft.created_at,
        expires_at: draft.expires_at,
        artifacts,
        schema: draft.schema.clone(),
        constraints: draft.constraints.clone(),
        health: draft.health.clone(),
        payload: PayloadTable {
            size: total,
            chunk_size: draft.chunk_size,
            chunks,
        },
    })
}

/// Writes a whole bundle: header then payload, streaming the artifacts.
pub fn write_bundle<W: Write + ?Sized>(
    out: &mut W,
    header: &RawHeader,
    inputs: &[ArtifactInput],
) -> io::Result<()> {
    out.write_all(&header.to_bytes())?;
    for_each_payload_piece(inputs, |_, data| out.write_all(data))
}

/// Encodes a manifest into the exact bytes that will be signed.
pub fn manifest_bytes(manifest: &Manifest) -> Vec<u8> {
    cbor::to_vec(manifest)
}
