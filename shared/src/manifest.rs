//! The bundle manifest: what a bundle contains and the rules for installing it.
//! Field by field in `docs/bundle.md`, "Manifest".

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cbor::DecodeError;
use crate::ids::{Arch, ArtifactName, Digest, ModelChannel};
use crate::time::UnixTime;
use crate::trust::Role;

/// The value of the `type` field of a model bundle's manifest.
pub const MANIFEST_TYPE: &str = "edgefleet/manifest";
/// The value of the `type` field of an agent release's manifest (docs/agent-update.md).
pub const AGENT_RELEASE_TYPE: &str = "edgefleet/agent-release";
/// The channel of every agent release: a device counts the releases of its agent
/// binary here, as it counts a model's per channel. Reserved: no model uses it.
pub const AGENT_CHANNEL: &str = "edgefleet-agent";
/// An agent binary's artifact is named `edgefleet-agent.<arch>` (`x86_64`,
/// `aarch64`, `arm`: Rust's names, as in `constraints.architectures`).
pub const AGENT_ARTIFACT_PREFIX: &str = "edgefleet-agent.";
/// Most artifacts a bundle may hold.
pub const MAX_ARTIFACTS: usize = 16;
/// Most inputs or outputs a model schema may list.
pub const MAX_TENSORS: usize = 64;
/// Most dimensions of one tensor.
pub const MAX_RANK: usize = 8;
/// Smallest allowed chunk size (4 KiB).
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest allowed chunk size (4 MiB): bounds a receiver's per-chunk memory.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Default chunk size (256 KiB), measured as a good MQTT chunk (STACK.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Bytes of the length prefix before each artifact in the payload.
pub const ARTIFACT_PREFIX_LEN: u64 = 8;

/// What an artifact is for. The agent acts on each kind differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// The ONNX model. Exactly one per bundle.
    Model,
    /// Reference statistics for drift (CBOR, see `docs/drift.md`).
    Reference,
    /// Golden input/output cases for the on-device health check (CBOR).
    Golden,
    /// Optional pre/post-processing metadata (opaque to the contract).
    Metadata,
    /// A static agent binary, for the architecture its name ends with (agent
    /// releases only).
    Agent,
}

/// One artifact as declared in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactEntry {
    /// File name inside the unpacked bundle.
    pub name: ArtifactName,
    /// What it is for.
    pub kind: ArtifactKind,
    /// Exact size in bytes.
    pub size: u64,
    /// SHA-256 of the artifact's bytes.
    pub sha256: Digest,
}

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// Signed 8-bit integer.
    I8,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean.
    Bool,
    /// UTF-8 text (class labels, categories); `BYTES` in the Open Inference Protocol.
    String,
}

impl ElementType {
    /// The name used in the Open Inference Protocol (`FP32`, `INT64`, ...).
    pub fn oip_name(self) -> &'static str {
        match self {
            ElementType::F32 => "FP32",
            ElementType::F64 => "FP64",
            ElementType::I8 => "INT8",
            ElementType::I32 => "INT32",
            ElementType::I64 => "INT64",
            ElementType::U8 => "UINT8",
            ElementType::Bool => "BOOL",
            ElementType::String => "BYTES",
        }
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ElementType::F32 => "f32",
            ElementType::F64 => "f64",
            ElementType::I8 => "i8",
            ElementType::I32 => "i32",
            ElementType::I64 => "i64",
            ElementType::U8 => "u8",
            ElementType::Bool => "bool",
            ElementType::String => "string",
        })
    }
}

/// One dimension of a tensor shape: a fixed size, or a named symbol (`N` for the
/// batch) that the caller chooses. CBOR: an unsigned integer or a text string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// A symbolic size, 1-32 characters of `[A-Za-z0-9_]`.
    Symbol(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

impl Serialize for Dim {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Dim::Fixed(n) => s.serialize_u64(*n),
            Dim::Symbol(sym) => s.serialize_str(sym),
        }
    }
}

impl<'de> Deserialize<'de> for Dim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dim;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a dimension size or a symbol name")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dim, E> {
                Ok(Dim::Fixed(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dim, E> {
                u64::try_from(v)
                    .map(Dim::Fixed)
                    .map_err(|_| E::custom("a dimension cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dim, E> {
                Ok(Dim::Symbol(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Name, element type and shape of one model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// The ONNX graph's name for it (1-128 printable ASCII characters).
    pub name: String,
    /// Element type.
    pub dtype: ElementType,
    /// Shape; may contain symbols.
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// Renders the shape as `[N, 4]`.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// The model's interface as the agent will enforce it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSchema {
    /// Inputs, in the model's order.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in the model's order.
    pub outputs: Vec<TensorSpec>,
}

impl ModelSchema {
    /// No inputs and no outputs: the schema of an agent release.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty()
    }
}

/// What a device must offer to install the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// Architectures the bundle may run on; empty means any.
    pub architectures: Vec<Arch>,
    /// Lowest agent version that may install it (semantic version).
    pub min_agent_version: String,
    /// Memory the model needs when loaded, in bytes.
    pub memory_bytes: u64,
}

/// How the agent proves the model on the device before activating it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthPolicy {
    /// An output element passes when `|got - want| <= abs + rel * |want|`.
    pub abs_tolerance: f64,
    /// See `abs_tolerance`.
    pub rel_tolerance: f64,
    /// Each golden case must run within this many milliseconds on the device.
    pub latency_budget_ms: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            abs_tolerance: 1e-4,
            rel_tolerance: 1e-3,
            latency_budget_ms: 1000,
        }
    }
}

/// How the payload is cut into chunks for transfer, with each chunk's hash, so a
/// receiver can reject a bad chunk as it arrives and resume from the first missing one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadTable {
    /// Payload length in bytes: the sum over artifacts of 8 + size.
    pub size: u64,
    /// Chunk length; the last chunk may be shorter.
    pub chunk_size: u32,
    /// SHA-256 of each chunk, in order.
    pub chunks: Vec<Digest>,
}

impl PayloadTable {
    /// Number of chunks a payload of `size` bytes has at `chunk_size`.
    pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
        size.div_ceil(u64::from(chunk_size.max(1)))
    }

    /// Byte range `[start, end)` of chunk `index` in the payload, if it exists.
    pub fn chunk_range(&self, index: u32) -> Option<(u64, u64)> {
        if index as usize >= self.chunks.len() {
            return None;
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        let end = (start + u64::from(self.chunk_size)).min(self.size);
        Some((start, end))
    }

    /// The chunks holding payload bytes `[start, end)`, clipped to the table
    /// (empty when the range is).
    pub fn chunks_covering(&self, start: u64, end: u64) -> std::ops::Range<u32> {
        let size = u64::from(self.chunk_size.max(1));
        let total = self.chunks.len() as u64;
        if start >= end {
            return 0..0;
        }
        let first = (start / size).min(total);
        let last = end.div_ceil(size).min(total);
        first as u32..last as u32
    }
}

/// The architecture an agent binary's artifact name says (`edgefleet-agent.<arch>`).
pub fn agent_binary_arch(entry: &ArtifactEntry) -> Option<Arch> {
    let arch = entry.name.as_str().strip_prefix(AGENT_ARTIFACT_PREFIX)?;
    Arch::new(arch).ok()
}

/// The artifact name of the agent binary for `arch`.
pub fn agent_binary_name(arch: &Arch) -> Option<ArtifactName> {
    ArtifactName::new(&format!("{AGENT_ARTIFACT_PREFIX}{arch}")).ok()
}

/// The signed description of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_TYPE`]; separates manifests from trust roots signed by the
    /// same keys.
    #[serde(rename = "type")]
    pub kind: String,
    /// The model channel (its name); releases are counted per channel.
    pub channel: ModelChannel,
    /// Semantic version, for people.
    pub version: String,
    /// Release number; only grows within a channel (rollback protection).
    pub release: u64,
    /// When the bundle was built.
    pub created_at: UnixTime,
    /// After this instant devices refuse the bundle.
    pub expires_at: UnixTime,
    /// Artifacts in payload order.
    pub artifacts: Vec<ArtifactEntry>,
    /// The model's inputs and outputs (absent from agent releases).
    #[serde(default, skip_serializing_if = "ModelSchema::is_empty")]
    pub schema: ModelSchema,
    /// What a device must offer.
    pub constraints: Constraints,
    /// How the device proves the model before activation.
    pub health: HealthPolicy,
    /// Chunking of the payload.
    pub payload: PayloadTable,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        what: "manifest",
        field,
        reason: reason.into(),
    }
}

fn check_tensor_specs(field: &'static str, specs: &[TensorSpec]) -> Result<(), DecodeError> {
    if specs.is_empty() || specs.len() > MAX_TENSORS {
        return Err(invalid(
            field,
            format!("must list 1 to {MAX_TENSORS} tensors"),
        ));
    }
    for (i, t) in specs.iter().enumerate() {
        let printable = t.name.chars().all(|c| c.is_ascii_graphic());
        if t.name.is_empty() || t.name.len() > 128 || !printable {
            return Err(invalid(
                field,
                format!(
                    "tensor name {:?} is not 1-128 printable ASCII characters",
                    t.name
                ),
            ));
        }
        if specs[..i].iter().any(|o| o.name == t.name) {
            return Err(invalid(
                field,
                format!("tensor name {:?} is repeated", t.name),
            ));
        }
        if t.shape.len() > MAX_RANK {
            return Err(invalid(
                field,
                format!("tensor {:?} has more than {MAX_RANK} dimensions", t.name),
            ));
        }
        for d in &t.shape {
            if let Dim::Symbol(s) = d {
                let ok = !s.is_empty()
                    && s.len() <= 32
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    return Err(invalid(
                        field,
                        format!("tensor {:?} has an invalid symbol {s:?}", t.name),
                    ));
                }
            }
        }
    }
    Ok(())
}

impl Manifest {
    /// The bundle's version as a semantic version.
    pub fn semver(&self) -> Result<semver::Version, DecodeError> {
        semver::Version::parse(&self.version).map_err(|e| {
            invalid(
                "version",
                format!("{:?} is not a semantic version: {e}", self.version),
            )
        })
    }

    /// Which signing role must sign this manifest, from its `type` (None for an
    /// unknown type, which [`Manifest::validate`] refuses).
    pub fn role(&self) -> Option<Role> {
        match self.kind.as_str() {
            MANIFEST_TYPE => Some(Role::Models),
            AGENT_RELEASE_TYPE => Some(Role::AgentReleases),
            _ => None,
        }
    }

    /// An agent release's binary for `arch`.
    pub fn agent_binary(&self, arch: &Arch) -> Option<&ArtifactEntry> {
        self.artifacts
            .iter()
            .find(|a| a.kind == ArtifactKind::Agent && agent_binary_arch(a).as_ref() == Some(arch))
    }

    /// The model artifact.
    pub fn model(&self) -> Option<&ArtifactEntry> {
        self.artifacts
            .iter()
            .find(|a| a.kind == ArtifactKind::Model)
    }

    /// The first artifact of `kind`.
    pub fn artifact(&self, kind: ArtifactKind) -> Option<&ArtifactEntry> {
        self.artifacts.iter().find(|a| a.kind == kind)
    }

    /// Where the bytes of the artifact `name` lie in the payload, `[start,
    /// end)`: each artifact is its 8-byte length, then its bytes, in manifest
    /// order. A device that needs one artifact fetches only the chunks that
    /// cover this range ([`PayloadTable::chunks_covering`]).
    pub fn artifact_range(&self, name: &ArtifactName) -> Option<(u64, u64)> {
        let mut offset = 0u64;
        for a in &self.artifacts {
            let start = offset.checked_add(8)?;
            let end = start.checked_add(a.size)?;
            if &a.name == name {
                return Some((start, end));
            }
            offset = end;
        }
        None
    }

    /// Structural rules that do not depend on the device or the time. Each error
    /// names the field. `max_artifact_size` is the global per-artifact cap.
    pub fn validate(&self, max_artifact_size: u64) -> Result<(), DecodeError> {
        let Some(role) = self.role() else {
            return Err(invalid(
                "type",
                format!(
                    "is {:?}, expected {MANIFEST_TYPE:?} or {AGENT_RELEASE_TYPE:?}",
                    self.kind
                ),
            ));
        };
        self.semver()?;
        semver::Version::parse(&self.constraints.min_agent_version).map_err(|e| {
            invalid(
                "constraints.min_agent_version",
                format!("is not a semantic version: {e}"),
            )
        })?;
        if self.release == 0 {
            return Err(invalid("release", "must be at least 1"));
        }
        if self.expires_at <= self.created_at {
            return Err(invalid("expires_at", "must be after created_at"));
        }
        if self.artifacts.is_empty() || self.artifacts.len() > MAX_ARTIFACTS {
            return Err(invalid(
                "artifacts",
                format!("must list 1 to {MAX_ARTIFACTS} artifacts"),
            ));
        }
        let payload_size = self.artifacts_payload_size(max_artifact_size)?;
        match role {
            Role::Models => self.validate_model_rules()?,
            Role::AgentReleases => self.validate_agent_release_rules()?,
        }
        let h = &self.health;
        let tol_ok = |t: f64| t.is_finite() && t >= 0.0;
        if !tol_ok(h.abs_tolerance) || !tol_ok(h.rel_tolerance) {
            return Err(invalid(
                "health",
                "tolerances must be finite and not negative",
            ));
        }
        let p = &self.payload;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&p.chunk_size) {
            return Err(invalid(
                "payload.chunk_size",
                format!(
                    "{} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                    p.chunk_size
                ),
            ));
        }
        if p.size != payload_size {
            return Err(invalid(
                "payload.size",
                format!("is {}, but the artifacts add up to {payload_size}", p.size),
            ));
        }
        let expected = PayloadTable::chunk_count(p.size, p.chunk_size);
        if p.chunks.len() as u64 != expected {
            return Err(invalid(
                "payload.chunks",
                format!(
                    "lists {} chunk hashes, the payload has {expected} chunks",
                    p.chunks.len()
                ),
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// The payload size the artifacts add up to; each name once, each size
    /// within `max_artifact_size`.
    fn artifacts_payload_size(&self, max_artifact_size: u64) -> Result<u64, DecodeError> {
        let mut payload_size: u64 = 0;
        for (i, a) in self.artifacts.iter().enumerate() {
            if self.artifacts[..i].iter().any(|o| o.name == a.name) {
                return Err(invalid(
                    "artifacts",
                    format!("artifact name {} is repeated", a.name),
                ));
            }
            if a.size > max_artifact_size {
                return Err(invalid(
                    "artifacts",
                    format!(
                        "artifact {} declares {} bytes, over the limit of {max_artifact_size}",
                        a.name, a.size
                    ),
                ));
            }
            payload_size = payload_size
                .checked_add(ARTIFACT_PREFIX_LEN + a.size)
                .ok_or_else(|| invalid("artifacts", "sizes overflow"))?;
        }
        Ok(payload_size)
    }

    /// A model bundle: exactly one model, at most one golden and one reference
    /// artifact, no agent binary, a schema, and not the agent's channel.
    fn validate_model_rules(&self) -> Result<(), DecodeError> {
        if self.channel.as_str() == AGENT_CHANNEL {
            return Err(invalid(
                "channel",
                format!("{AGENT_CHANNEL:?} is reserved for agent releases"),
            ));
        }
        for kind in [
            ArtifactKind::Model,
            ArtifactKind::Golden,
            ArtifactKind::Reference,
            ArtifactKind::Agent,
        ] {
            let n = self.artifacts.iter().filter(|a| a.kind == kind).count();
            let allowed = match kind {
                ArtifactKind::Model => 1..=1,
                ArtifactKind::Agent => 0..=0,
                _ => 0..=1,
            };
            if !allowed.contains(&n) {
                return Err(invalid(
                    "artifacts",
                    format!("holds {n} artifacts of kind {kind:?}; allowed: {allowed:?}"),
                ));
            }
        }
        check_tensor_specs("schema.inputs", &self.schema.inputs)?;
        check_tensor_specs("schema.outputs", &self.schema.outputs)?;
        Ok(())
    }

    /// An agent release: the agent's channel, one binary per architecture named
    /// `edgefleet-agent.<arch>` (metadata beside them allowed), the architectures
    /// listed in `constraints.architectures` in the same order, and no schema.
    fn validate_agent_release_rules(&self) -> Result<(), DecodeError> {
        if self.channel.as_str() != AGENT_CHANNEL {
            return Err(invalid(
                "channel",
                format!(
                    "is {:?}; an agent release's channel is {AGENT_CHANNEL:?}",
                    self.channel.as_str()
                ),
            ));
        }
        let mut arches = Vec::new();
        for a in &self.artifacts {
            match a.kind {
                ArtifactKind::Agent => match agent_binary_arch(a) {
                    Some(arch) => arches.push(arch),
                    None => {
                        return Err(invalid(
                            "artifacts",
                            format!(
                                "agent binary {} is not named {AGENT_ARTIFACT_PREFIX}<architecture>",
                                a.name
                            ),
                        ));
                    }
                },
                ArtifactKind::Metadata => {}
                other => {
                    return Err(invalid(
                        "artifacts",
                        format!(
                            "an agent release holds no artifact of kind {other:?} ({})",
                            a.name
                        ),
                    ));
                }
            }
        }
        if arches.is_empty() {
            return Err(invalid(
                "artifacts",
                "an agent release holds no agent binary",
            ));
        }
        if self.constraints.architectures != arches {
            return Err(invalid(
                "constraints.architectures",
                format!(
                    "is {:?}, but the release's binaries are for {arches:?}",
                    self.constraints.architectures
                ),
            ));
        }
        if !self.schema.is_empty() {
            return Err(invalid("schema", "an agent release has no model schema"));
        }
        Ok(())
    }
}
