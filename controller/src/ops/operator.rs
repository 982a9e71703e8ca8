//! Operator commands that create and check keys, trust roots and bundles. They run
//! on the operator's machine: signing keys never reach the controller.
//!
//! Every file is written to a temporary file in the target directory, fsynced and
//! renamed, so a failed command leaves nothing half-written.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use edgefleet_agent::model::{HealthFailure, LoadedModel, ModelError, check_outputs};
use edgefleet_shared::bundle::{
    ArtifactInput, ArtifactSource, BundleError, DiscardSink, ManifestDraft, manifest_bytes,
    prepare_manifest, verify_stream, write_bundle,
};
use edgefleet_shared::golden::{GoldenCase, GoldenSet, Tensor, TensorData};
use edgefleet_shared::keys::KeyError;
use edgefleet_shared::manifest::{
    ArtifactKind, Constraints, Dim, ElementType, HealthPolicy, Manifest, TensorSpec,
};
use edgefleet_shared::reference::ReferenceStats;
use edgefleet_shared::trust::TrustError;
use edgefleet_shared::{
    Arch, ArtifactName, Limits, ModelChannel, Policy, PublicKey, RawHeader, SecretKey,
    SignedTrustRoot, TrustRoot, UnixTime, VerifiedHeader,
};

/// Largest key file read.
const MAX_KEY_FILE: u64 = 16 * 1024;
/// Largest golden-cases JSON read.
const MAX_GOLDEN_JSON: u64 = 64 * 1024 * 1024;
/// Largest reference CSV read.
const MAX_REFERENCE_CSV: u64 = 512 * 1024 * 1024;
/// Most reference rows used.
const MAX_REFERENCE_ROWS: usize = 1_000_000;

/// Why an operator command failed. Each variant names the file or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file is larger than the command accepts.
    #[error("{path} is {size} bytes, over the limit of {limit} for this kind of file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        limit: u64,
    },
    /// A key file is not a key of the needed kind.
    #[error("{path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: KeyError,
    },
    /// A trust root is not acceptable.
    #[error("{path}: {source}")]
    Trust {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: TrustError,
    },
    /// A bundle is refused or unreadable.
    #[error("{path}: {source}")]
    Bundle {
        /// The file.
        path: PathBuf,
        /// The refusal.
        source: BundleError,
    },
    /// The model cannot be used on devices.
    #[error("{path}: {source}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: ModelError,
    },
    /// An input (argument, golden file, reference data) is wrong.
    #[error("{what}: {detail}")]
    Input {
        /// Which input.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OperatorError + '_ {
    move |source| OperatorError::Io {
        path: path.to_owned(),
        source,
    }
}

fn input_err(what: impl Into<String>, detail: impl Into<String>) -> OperatorError {
    OperatorError::Input {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Reads a whole file, refusing files over `limit` bytes before reading them.
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, OperatorError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    if size > limit {
        return Err(OperatorError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    let mut out = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(io_err(path))?;
    if out.len() as u64 > limit {
        return Err(OperatorError::TooLarge {
            path: path.to_owned(),
            size: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// Writes `path` durably with permissions `mode` (`edgefleet_shared::durable`:
/// temporary file in the same directory, fsync, rename, fsync of the directory).
pub fn write_atomic(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), OperatorError> {
    edgefleet_shared::durable::write_with(path, mode, write).map_err(io_err(path))
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A key file: secret keys can sign, public keys only be listed.
#[derive(Debug)]
pub enum KeyFile {
    /// A PKCS#8 secret key.
    Secret(SecretKey),
    /// An SPKI public key.
    Public(PublicKey),
}

impl KeyFile {
    /// The public half.
    pub fn public(&self) -> PublicKey {
        match self {
            KeyFile::Secret(k) => k.public(),
            KeyFile::Public(k) => *k,
        }
    }
}

/// Reads a key file (secret or public PEM).
pub fn load_key(path: &Path) -> Result<KeyFile, OperatorError> {
    let bytes = read_capped(path, MAX_KEY_FILE)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| input_err(path.display().to_string(), "is not a PEM text file"))?;
    let key_err = |source| OperatorError::Key {
        path: path.to_owned(),
        source,
    };
    if text.contains("PRIVATE KEY") {
        SecretKey::from_pem(&text)
            .map(KeyFile::Secret)
            .map_err(key_err)
    } else {
        PublicKey::from_pem(&text)
            .map(KeyFile::Public)
            .map_err(key_err)
    }
}

/// Reads a secret key file, with a clear error when given a public key.
pub fn load_secret_key(path: &Path) -> Result<SecretKey, OperatorError> {
    match load_key(path)? {
        KeyFile::Secret(k) => Ok(k),
        KeyFile::Public(_) => Err(input_err(
            path.display().to_string(),
            "is a public key; signing needs the secret key (the .key file)",
        )),
    }
}

/// Generates a key pair into `dir` as `<name>.key` (mode 0600) and `<name>.pub`.
/// Refuses to overwrite an existing key.
pub fn generate_key(
    dir: &Path,
    name: &str,
) -> Result<(PathBuf, PathBuf, SecretKey), OperatorError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(input_err(
            "--name",
            format!("{name:?} must be 1-64 letters, digits, '-' or '_'"),
        ));
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let secret_path = dir.join(format!("{name}.key"));
    let public_path = dir.join(format!("{name}.pub"));
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(input_err(
                p.display().to_string(),
                "already exists; refusing to overwrite a key",
            ));
        }
    }
    let key = SecretKey::generate().map_err(|source| OperatorError::Key {
        path: secret_path.clone(),
        source,
    })?;
    let pem = key.to_pem();
    write_atomic(&secret_path, 0o600, |w| w.write_all(pem.as_bytes()))?;
    let public = key.public().to_pem();
    write_atomic(&public_path, 0o644, |w| w.write_all(public.as_bytes()))?;
    Ok((secret_path, public_path, key))
}

// ---------------------------------------------------------------------------
// Trust roots
// ---------------------------------------------------------------------------

/// Reads a trust root file (signatures not yet checked).
pub fn load_trust_file(path: &Path) -> Result<SignedTrustRoot, OperatorError> {
    let bytes = read_capped(path, edgefleet_shared::trust::MAX_TRUST_ROOT_LEN as u64)?;
    SignedTrustRoot::from_bytes(&bytes).map_err(|source| OperatorError::Trust {
        path: path.to_owned(),
        source,
    })
}

/// Reads and fully verifies a trust root at `now`.
pub fn load_trust_root(path: &Path, now: UnixTime) -> Result<TrustRoot, OperatorError> {
    load_trust_file(path)?
        .verify_self(now)
        .map_err(|source| OperatorError::Trust {
            path: path.to_owned(),
            source,
        })
}

/// Creates a trust root document listing `keys`, signed by the secret ones.
pub fn new_trust_root(
    keys: &[KeyFile],
    threshold: u16,
    version: u32,
    expires_at: UnixTime,
    extra_signers: &[SecretKey],
) -> Result<SignedTrustRoot, OperatorError> {
    let mut publics: Vec<PublicKey> = Vec::new();
    for k in keys {
        if !publics.contains(&k.public()) {
            publics.push(k.public());
        }
    }
    let doc = TrustRoot::new(version, expires_at, threshold, publics);
    doc.validate()
        .map_err(|e| input_err("trust root", e.to_string()))?;
    let mut signed = doc.to_unsigned();
    for k in keys {
        if let KeyFile::Secret(s) = k {
            signed.sign(s);
        }
    }
    for s in extra_signers {
        signed.sign(s);
    }
    Ok(signed)
}

/// Writes a trust root file.
pub fn save_trust_root(path: &Path, root: &SignedTrustRoot) -> Result<(), OperatorError> {
    let bytes = root.to_bytes();
    write_atomic(path, 0o644, |w| w.write_all(&bytes))
}

// ---------------------------------------------------------------------------
// Bundles
// ---------------------------------------------------------------------------

/// What `edgefleet bundle build` needs.
#[derive(Debug)]
pub struct BuildOptions {
    /// The ONNX model file.
    pub model: PathBuf,
    /// Model channel.
    pub channel: ModelChannel,
    /// Semantic version.
    pub version: semver::Version,
    /// Release number.
    pub release: u64,
    /// Reference data (CSV with a header row).
    pub reference: Option<PathBuf>,
    /// Drift thresholds carried with the reference statistics.
    pub drift_thresholds: edgefleet_shared::reference::Thresholds,
    /// Reference columns that hold category codes (compared category by
    /// category) rather than numbers (quantile bins).
    pub categorical: Vec<String>,
    /// Golden cases (JSON).
    pub golden: Option<PathBuf>,
    /// Extra metadata files (pre/post-processing notes, label maps), opaque to the
    /// contract; each becomes a `metadata` artifact named after the file.
    pub metadata: Vec<PathBuf>,
    /// Build time.
    pub now: UnixTime,
    /// Validity in days.
    pub expires_in_days: u32,
    /// Allowed architectures (empty: any).
    pub architectures: Vec<Arch>,
    /// Minimum agent version.
    pub min_agent_version: semver::Version,
    /// Memory the model needs; estimated when `None`.
    pub memory_bytes: Option<u64>,
    /// Transfer chunk size.
    pub chunk_size: u32,
    /// Health check policy.
    pub health: HealthPolicy,
    /// Keys to sign with right away (may be empty: sign later).
    pub signers: Vec<SecretKey>,
    /// Record the golden outputs of this other model instead of the bundled
    /// one's: a bundle that fails its health check on every device, to prove a
    /// fleet's canary catches it (`--golden-outputs-from`). None in normal use.
    pub golden_outputs_from: Option<PathBuf>,
}

impl BuildOptions {
    /// A build of `model` with the defaults of `edgefleet bundle build`: no
    /// reference data or golden file (golden cases are generated), valid 90 days,
    /// any architecture, agents from 0.1.0, 4 KiB chunks, the default health
    /// policy, unsigned.
    pub fn new(
        model: PathBuf,
        channel: ModelChannel,
        version: semver::Version,
        release: u64,
        now: UnixTime,
    ) -> BuildOptions {
        BuildOptions {
            model,
            channel,
            version,
            release,
            reference: None,
            drift_thresholds: Default::default(),
            categorical: vec![],
            golden: None,
            metadata: vec![],
            now,
            expires_in_days: 90,
            architectures: vec![],
            min_agent_version: semver::Version::new(0, 1, 0),
            memory_bytes: None,
            chunk_size: 4096,
            health: HealthPolicy::default(),
            signers: vec![],
            golden_outputs_from: None,
        }
    }
}

/// What a build produced.
#[derive(Debug)]
pub struct BuildReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// The bundle's identity.
    pub digest: edgefleet_shared::Digest,
    /// Golden cases recorded.
    pub golden_cases: usize,
    /// Whether the golden cases came from the operator's file (or were generated).
    pub golden_from_file: bool,
    /// Rows of reference data summarised.
    pub reference_rows: Option<u64>,
    /// Signatures on the written bundle.
    pub signatures: usize,
}

/// Converts a nested JSON array into a flat tensor for `spec`.
fn json_tensor(
    what: &str,
    spec: &TensorSpec,
    value: &serde_json::Value,
) -> Result<Tensor, OperatorError> {
    fn shape_of(v: &serde_json::Value, shape: &mut Vec<u64>) {
        if let serde_json::Value::Array(a) = v {
            shape.push(a.len() as u64);
            if let Some(first) = a.first() {
                shape_of(first, shape);
            }
        }
    }
    fn flatten<'a>(
        v: &'a serde_json::Value,
        depth: usize,
        shape: &[u64],
        out: &mut Vec<&'a serde_json::Value>,
    ) -> bool {
        match v {
            serde_json::Value::Array(a) => {
                depth < shape.len()
                    && a.len() as u64 == shape[depth]
                    && a.iter().all(|x| flatten(x, depth + 1, shape, out))
            }
            leaf => {
                out.push(leaf);
                depth == shape.len()
            }
        }
    }
    let mut shape = Vec::new();
    shape_of(value, &mut shape);
    let mut leaves = Vec::new();
    if !flatten(value, 0, &shape, &mut leaves) {
        return Err(input_err(what, "is not a rectangular nested array"));
    }
    let num = |v: &serde_json::Value| {
        v.as_f64()
            .ok_or_else(|| input_err(what, format!("holds {v}, which is not a number")))
    };
    let int = |v: &serde_json::Value| {
        v.as_i64()
            .ok_or_else(|| input_err(what, format!("holds {v}, which is not an integer")))
    };
    let data = match spec.dtype {
        ElementType::F32 => TensorData::F32(
            leaves
                .iter()
                .map(|v| num(v).map(|x| x as f32))
                .collect::<Result<_, _>>()?,
        ),
        ElementType::F64 => {
            TensorData::F64(leaves.iter().map(|v| num(v)).collect::<Result<_, _>>()?)
        }
        ElementType::I64 => {
            TensorData::I64(leaves.iter().map(|v| int(v)).collect::<Result<_, _>>()?)
        }
        ElementType::I32 => TensorData::I32(
            leaves
                .iter()
                .map(|v| {
                    int(v).and_then(|x| {
                        i32::try_from(x).map_err(|_| input_err(what, "value out of i32 range"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        ElementType::I8 => TensorData::I8(
            leaves
                .iter()
                .map(|v| {
                    int(v).and_then(|x| {
                        i8::try_from(x).map_err(|_| input_err(what, "value out of i8 range"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        ElementType::U8 => TensorData::U8(
            leaves
                .iter()
                .map(|v| {
                    int(v).and_then(|x| {
                        u8::try_from(x).map_err(|_| input_err(what, "value out of u8 range"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        ElementType::Bool => TensorData::Bool(
            leaves
                .iter()
                .map(|v| {
                    v.as_bool().ok_or_else(|| {
                        input_err(what, format!("holds {v}, which is not a boolean"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let t = Tensor {
        name: spec.name.clone(),
        shape,
        data,
    };
    t.check_against(spec)
        .map_err(|e| input_err(what, e.to_string()))?;
    Ok(t)
}

/// Inputs of one golden case, and the outputs the operator expects (may be empty).
type RawCase = (Vec<Tensor>, Vec<Tensor>);

/// Reads the operator's golden file: `{"cases": [{"inputs": {name: nested array},
/// "outputs": {name: nested array}?}]}`.
fn read_golden(path: &Path, model: &LoadedModel) -> Result<Vec<RawCase>, OperatorError> {
    let bytes = read_capped(path, MAX_GOLDEN_JSON)?;
    let what = path.display().to_string();
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| input_err(&what, format!("is not JSON: {e}")))?;
    let cases = doc
        .get("cases")
        .and_then(|c| c.as_array())
        .ok_or_else(|| input_err(&what, "needs a top-level \"cases\" array"))?;
    if cases.is_empty() || cases.len() > edgefleet_shared::golden::MAX_GOLDEN_CASES {
        return Err(input_err(
            &what,
            format!(
                "must hold 1 to {} cases",
                edgefleet_shared::golden::MAX_GOLDEN_CASES
            ),
        ));
    }
    let schema = model.schema();
    let mut out = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let inputs_obj = case
            .get("inputs")
            .and_then(|v| v.as_object())
            .ok_or_else(|| input_err(format!("{what}: case {i}"), "needs an \"inputs\" object"))?;
        for name in inputs_obj.keys() {
            if !schema.inputs.iter().any(|s| &s.name == name) {
                return Err(input_err(
                    format!("{what}: case {i}"),
                    format!("the model has no input `{name}`"),
                ));
            }
        }
        let mut inputs = Vec::new();
        for spec in &schema.inputs {
            let v = inputs_obj.get(&spec.name).ok_or_else(|| {
                input_err(
                    format!("{what}: case {i}"),
                    format!("input `{}` is missing", spec.name),
                )
            })?;
            inputs.push(json_tensor(
                &format!("{what}: case {i} input `{}`", spec.name),
                spec,
                v,
            )?);
        }
        let mut outputs = Vec::new();
        if let Some(obj) = case.get("outputs").and_then(|v| v.as_object()) {
            for (name, v) in obj {
                let spec = schema
                    .outputs
                    .iter()
                    .find(|s| &s.name == name)
                    .ok_or_else(|| {
                        input_err(
                            format!("{what}: case {i}"),
                            format!("the model has no output `{name}`"),
                        )
                    })?;
                outputs.push(json_tensor(
                    &format!("{what}: case {i} output `{name}`"),
                    spec,
                    v,
                )?);
            }
        }
        out.push((inputs, outputs));
    }
    Ok(out)
}

/// A deterministic input for a model without operator golden cases: symbolic
/// dimensions become 1; values come from the first reference row when it fits,
/// otherwise a fixed ramp.
fn generated_input(spec: &TensorSpec, first_row: Option<&[f64]>) -> Tensor {
    let shape: Vec<u64> = spec
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbol(_) => 1,
        })
        .collect();
    let n = shape.iter().product::<u64>() as usize;
    let values: Vec<f64> = match first_row {
        Some(row) if row.len() == n => row.to_vec(),
        _ => (0..n).map(|i| (i % 10) as f64 / 10.0).collect(),
    };
    let data = match spec.dtype {
        ElementType::F32 => TensorData::F32(values.iter().map(|v| *v as f32).collect()),
        ElementType::F64 => TensorData::F64(values),
        ElementType::I64 => TensorData::I64(values.iter().map(|v| *v as i64).collect()),
        ElementType::I32 => TensorData::I32(values.iter().map(|v| *v as i32).collect()),
        ElementType::I8 => TensorData::I8(values.iter().map(|v| *v as i8).collect()),
        ElementType::U8 => TensorData::U8(values.iter().map(|v| *v as u8).collect()),
        ElementType::Bool => TensorData::Bool(values.iter().map(|v| *v > 0.5).collect()),
    };
    Tensor {
        name: spec.name.clone(),
        shape,
        data,
    }
}

/// Reads a numeric CSV with a header row.
/// Reads reference data: a `.npy` array (columns named `x0`, `x1`...) or a CSV
/// file with a header row.
fn read_reference(path: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>), OperatorError> {
    let size = fs::metadata(path).map_err(io_err(path))?.len();
    if size > MAX_REFERENCE_CSV {
        return Err(OperatorError::TooLarge {
            path: path.to_owned(),
            size,
            limit: MAX_REFERENCE_CSV,
        });
    }
    let what = path.display().to_string();
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
    {
        let bytes = fs::read(path).map_err(io_err(path))?;
        let rows = crate::server::npy::read_matrix(&bytes, MAX_REFERENCE_ROWS * 1024)
            .map_err(|e| input_err(&what, e.to_string()))?;
        if rows.is_empty() {
            return Err(input_err(&what, "has no rows"));
        }
        if rows.len() > MAX_REFERENCE_ROWS {
            return Err(input_err(
                &what,
                format!("has more than {MAX_REFERENCE_ROWS} rows; sample it first"),
            ));
        }
        let headers = (0..rows[0].len()).map(|j| format!("x{j}")).collect();
        return Ok((headers, rows));
    }
    read_reference_csv(path, &what)
}

fn read_reference_csv(
    path: &Path,
    what: &str,
) -> Result<(Vec<String>, Vec<Vec<f64>>), OperatorError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .map_err(|e| input_err(what, e.to_string()))?;
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| input_err(what, e.to_string()))?
        .iter()
        .map(str::to_owned)
        .collect();
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| input_err(what, e.to_string()))?;
        if rows.len() >= MAX_REFERENCE_ROWS {
            return Err(input_err(
                what,
                format!("has more than {MAX_REFERENCE_ROWS} rows; sample it first"),
            ));
        }
        let row = record
            .iter()
            .enumerate()
            .map(|(j, field)| {
                field.trim().parse::<f64>().map_err(|_| {
                    input_err(
                        what,
                        format!(
                            "line {}: column `{}` holds {field:?}, which is not a number",
                            i + 2,
                            headers.get(j).map_or("?", |s| s.as_str())
                        ),
                    )
                })
            })
            .collect::<Result<Vec<f64>, _>>()?;
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(input_err(what, "has a header but no rows"));
    }
    Ok((headers, rows))
}

/// Computes reference statistics for the inputs, and for the outputs by running
/// the model over the rows (`edgefleet_agent::reference_stats::summarise`).
fn reference_stats(
    path: &Path,
    model: &LoadedModel,
    categorical: &[String],
) -> Result<(ReferenceStats, Vec<f64>), OperatorError> {
    let (headers, rows) = read_reference(path)?;
    let what = path.display().to_string();
    let stats = edgefleet_agent::reference_stats::summarise(model, &headers, &rows, categorical)
        .map_err(|e| input_err(&what, e.to_string()))?;
    Ok((stats, rows[0].clone()))
}

fn artifact(name: &str, kind: ArtifactKind, source: ArtifactSource) -> ArtifactInput {
    ArtifactInput {
        name: ArtifactName::new(name).unwrap_or_else(|e| unreachable!("fixed artifact name: {e}")),
        kind,
        source,
    }
}

/// Builds a bundle: proves the model loads and runs with tract, records golden
/// outputs, summarises reference data, writes the bundle atomically to `out`.
pub fn build_bundle(opts: &BuildOptions, out: &Path) -> Result<BuildReport, OperatorError> {
    let model_size = fs::metadata(&opts.model)
        .map_err(io_err(&opts.model))?
        .len();
    let model_bytes = read_capped(&opts.model, edgefleet_agent::model::MAX_MODEL_LEN as u64)?;
    let model = LoadedModel::load(&model_bytes).map_err(|source| OperatorError::Model {
        path: opts.model.clone(),
        source,
    })?;
    drop(model_bytes);

    let (reference, first_row) = match &opts.reference {
        Some(path) => {
            opts.drift_thresholds.validate().map_err(|e| {
                input_err(path.display().to_string(), format!("drift thresholds: {e}"))
            })?;
            let (mut stats, row) = reference_stats(path, &model, &opts.categorical)?;
            stats.thresholds = Some(opts.drift_thresholds);
            (Some(stats), Some(row))
        }
        None => (None, None),
    };

    // Golden cases: the operator's, checked against the model; or one generated.
    let (raw_cases, from_file) = match &opts.golden {
        Some(path) => (read_golden(path, &model)?, true),
        None => {
            let inputs = model
                .schema()
                .inputs
                .iter()
                .map(|s| generated_input(s, first_row.as_deref()))
                .collect();
            (vec![(inputs, vec![])], false)
        }
    };
    let recorder = match &opts.golden_outputs_from {
        Some(path) => Some(
            LoadedModel::load(&read_capped(
                path,
                edgefleet_agent::model::MAX_MODEL_LEN as u64,
            )?)
            .map_err(|source| OperatorError::Model {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let mut cases = Vec::new();
    for (i, (inputs, expected)) in raw_cases.into_iter().enumerate() {
        let mut got = model.run(&inputs).map_err(|e| OperatorError::Model {
            path: opts.model.clone(),
            source: ModelError::Invalid(format!("golden case {i} does not run: {e}")),
        })?;
        if let (Some(r), Some(path)) = (&recorder, &opts.golden_outputs_from) {
            got = r.run(&inputs).map_err(|e| OperatorError::Model {
                path: path.clone(),
                source: ModelError::Invalid(format!("golden case {i} does not run: {e}")),
            })?;
        }
        check_outputs(i, &got, &expected, &opts.health).map_err(|failure| match failure {
            HealthFailure::OutOfTolerance { case, output, index, got, want } => input_err(
                format!("golden case {case} output `{output}`"),
                format!(
                    "element {index}: the model gives {got}, the file says {want} (tolerance abs {} rel {})",
                    opts.health.abs_tolerance, opts.health.rel_tolerance
                ),
            ),
            HealthFailure::Shape { case, output, detail } => {
                input_err(format!("golden case {case} output `{output}`"), format!("the model's output {detail}"))
            }
            other => input_err("golden cases", other.to_string()),
        })?;
        cases.push(GoldenCase {
            inputs,
            outputs: got,
        });
    }
    let golden = GoldenSet { cases };
    let golden_cases = golden.cases.len();

    let mut inputs = vec![
        artifact(
            "model.onnx",
            ArtifactKind::Model,
            ArtifactSource::File(opts.model.clone()),
        ),
        artifact(
            "golden.cbor",
            ArtifactKind::Golden,
            ArtifactSource::Bytes(golden.to_bytes()),
        ),
    ];
    if let Some(stats) = &reference {
        inputs.push(artifact(
            "reference.cbor",
            ArtifactKind::Reference,
            ArtifactSource::Bytes(stats.to_bytes()),
        ));
    }
    for path in &opts.metadata {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let name = ArtifactName::new(&file_name).map_err(|e| {
            input_err(
                format!("--metadata {}", path.display()),
                format!("its file name becomes the artifact name: {e}"),
            )
        })?;
        if inputs.iter().any(|i| i.name == name) {
            return Err(input_err(
                format!("--metadata {}", path.display()),
                format!("an artifact named {name} already exists"),
            ));
        }
        fs::metadata(path).map_err(io_err(path))?;
        inputs.push(ArtifactInput {
            name,
            kind: ArtifactKind::Metadata,
            source: ArtifactSource::File(path.clone()),
        });
    }
    let draft = ManifestDraft {
        channel: opts.channel.clone(),
        version: opts.version.clone(),
        release: opts.release,
        created_at: opts.now,
        expires_at: opts.now.plus_days(i64::from(opts.expires_in_days)),
        schema: model.schema().clone(),
        constraints: Constraints {
            architectures: opts.architectures.clone(),
            min_agent_version: opts.min_agent_version.to_string(),
            // Estimate: tract holds the weights about twice (graph + optimised
            // plan) plus working buffers; see docs/bundle.md.
            memory_bytes: opts
                .memory_bytes
                .unwrap_or(model_size.saturating_mul(3) + (16 << 20)),
        },
        health: opts.health.clone(),
        chunk_size: opts.chunk_size,
    };
    let manifest = prepare_manifest(&draft, &inputs).map_err(io_err(&opts.model))?;
    manifest
        .validate(Limits::default().max_artifact_size)
        .map_err(|e| input_err("bundle", e.to_string()))?;
    let mut header = RawHeader {
        manifest_bytes: manifest_bytes(&manifest),
        signatures: vec![],
    };
    for key in &opts.signers {
        header.sign(key);
    }
    write_atomic(out, 0o644, |w| write_bundle(w, &header, &inputs))?;
    Ok(BuildReport {
        digest: header.digest(),
        manifest,
        golden_cases,
        golden_from_file: from_file,
        reference_rows: reference.map(|r| r.rows),
        signatures: header.signatures.len(),
    })
}

/// Reads a bundle's header without verifying it (for signing and inspecting).
pub fn read_header(path: &Path) -> Result<RawHeader, OperatorError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    RawHeader::read_from(&mut io::BufReader::new(file)).map_err(|source| OperatorError::Bundle {
        path: path.to_owned(),
        source,
    })
}

/// Adds signatures to a bundle file in place (atomically): the manifest and the
/// payload are copied byte for byte; only the signature block changes.
pub fn sign_bundle(path: &Path, keys: &[SecretKey]) -> Result<RawHeader, OperatorError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let mut reader = io::BufReader::with_capacity(256 * 1024, file);
    let mut header = RawHeader::read_from(&mut reader).map_err(|source| OperatorError::Bundle {
        path: path.to_owned(),
        source,
    })?;
    header.decode_unverified().map_err(|e| {
        input_err(
            path.display().to_string(),
            format!("its manifest cannot be read: {e}"),
        )
    })?;
    for k in keys {
        header.sign(k);
    }
    let bytes = header.to_bytes();
    write_atomic(path, 0o644, |w| {
        w.write_all(&bytes)?;
        io::copy(&mut reader, w).map(|_| ())
    })?;
    Ok(header)
}

/// Verifies a bundle file completely (signatures, rules, every chunk and
/// artifact) against `trust` at `now`, in bounded memory.
pub fn verify_bundle(
    path: &Path,
    trust: &TrustRoot,
    now: UnixTime,
) -> Result<VerifiedHeader, OperatorError> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let policy = Policy {
        trust,
        now,
        limits: Limits::default(),
        installed: None,
        device: None,
    };
    verify_stream(
        io::BufReader::with_capacity(256 * 1024, file),
        &policy,
        &mut DiscardSink,
    )
    .map_err(|source| OperatorError::Bundle {
        path: path.to_owned(),
        source,
    })
}
