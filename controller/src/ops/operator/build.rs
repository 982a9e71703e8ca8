//! `edgefleet bundle build`: a model proven to load and run with tract, its
//! golden cases, its reference statistics, in one signed bundle file.

use super::*;
use edgefleet_agent::model::external_data;

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
    /// Whether the model's weights came from external data files (PyTorch's
    /// default export) and were copied into the bundled model.
    pub inlined_external_data: bool,
}

/// Converts a nested JSON array into a flat tensor for `spec`.
fn json_tensor(
    what: &str,
    spec: &TensorSpec,
    value: &serde_json::Value,
) -> Result<Tensor, OperatorError> {
    let (shape, leaves) =
        rectangular(value).ok_or_else(|| input_err(what, "is not a rectangular nested array"))?;
    let num = |v: &serde_json::Value| {
        v.as_f64()
            .ok_or_else(|| input_err(what, format!("holds {v}, which is not a number")))
    };
    let floats = || {
        leaves
            .iter()
            .map(|v| num(v))
            .collect::<Result<Vec<f64>, _>>()
    };
    let data = match spec.dtype {
        ElementType::F32 => TensorData::F32(floats()?.into_iter().map(|x| x as f32).collect()),
        ElementType::F64 => TensorData::F64(floats()?),
        ElementType::I64 => TensorData::I64(integers(what, &leaves, "i64")?),
        ElementType::I32 => TensorData::I32(integers(what, &leaves, "i32")?),
        ElementType::I8 => TensorData::I8(integers(what, &leaves, "i8")?),
        ElementType::U8 => TensorData::U8(integers(what, &leaves, "u8")?),
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
        ElementType::String => TensorData::String(
            leaves
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| input_err(what, format!("holds {v}, which is not a string")))
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

/// A nested JSON array's shape (from its first elements) and its leaves in
/// order; None unless every level has the same length throughout.
fn rectangular(value: &serde_json::Value) -> Option<(Vec<u64>, Vec<&serde_json::Value>)> {
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
    let mut v = value;
    while let serde_json::Value::Array(a) = v {
        shape.push(a.len() as u64);
        match a.first() {
            Some(first) => v = first,
            None => break,
        }
    }
    let mut leaves = Vec::new();
    flatten(value, 0, &shape, &mut leaves).then_some((shape, leaves))
}

/// Integer leaves as `T` (named `type_name` in the error).
fn integers<T: TryFrom<i64>>(
    what: &str,
    leaves: &[&serde_json::Value],
    type_name: &str,
) -> Result<Vec<T>, OperatorError> {
    leaves
        .iter()
        .map(|v| {
            let x = v
                .as_i64()
                .ok_or_else(|| input_err(what, format!("holds {v}, which is not an integer")))?;
            T::try_from(x).map_err(|_| input_err(what, format!("value out of {type_name} range")))
        })
        .collect()
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
        ElementType::String => TensorData::String(values.iter().map(|v| v.to_string()).collect()),
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
    let (model_bytes, inlined) = model_file(&opts.model)?;
    let model_size = model_bytes.len() as u64;
    let model = load_model_bytes(&opts.model, &model_bytes)?;
    // The bundle carries the file itself, or its bytes with the weights inlined.
    let model_source = match inlined {
        true => ArtifactSource::Bytes(model_bytes),
        false => {
            drop(model_bytes);
            ArtifactSource::File(opts.model.clone())
        }
    };
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
    let (golden, from_file) = golden_set(opts, &model, first_row.as_deref())?;
    let golden_cases = golden.cases.len();
    let inputs = artifacts(opts, model_source, &golden, reference.as_ref())?;
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
    let header = write_signed(out, "bundle", &manifest, &inputs, &opts.signers)?;
    Ok(BuildReport {
        digest: header.digest(),
        manifest,
        golden_cases,
        golden_from_file: from_file,
        reference_rows: reference.map(|r| r.rows),
        signatures: header.signatures.len(),
        inlined_external_data: inlined,
    })
}

/// A model file's bytes as devices will receive them: with the weights of
/// PyTorch's external data files (beside the model) copied in; true when it had
/// some.
fn model_file(path: &Path) -> Result<(Vec<u8>, bool), OperatorError> {
    let limit = edgefleet_agent::model::MAX_MODEL_LEN;
    let bytes = read_capped(path, limit as u64)?;
    // A bare file name's parent is "": the current directory.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let inlined = external_data::inline_external_data(&bytes, limit, |at, cap| {
        external_data::read_from_model_dir(dir, at, cap)
    })
    // Not ONNX at all: tract's own message says so more usefully.
    .or_else(|e| match e {
        external_data::ExternalDataError::NotOnnx(_) => Ok(None),
        other => Err(other),
    })
    .map_err(|e| input_err(path.display().to_string(), e.to_string()))?;
    Ok(match inlined {
        Some(inlined) => (inlined, true),
        None => (bytes, false),
    })
}

/// A model loaded with tract, as devices will load it.
fn load_model_bytes(path: &Path, bytes: &[u8]) -> Result<LoadedModel, OperatorError> {
    LoadedModel::load(bytes).map_err(|source| OperatorError::Model {
        path: path.to_owned(),
        source,
    })
}

/// A model file loaded with tract, as devices will load it.
fn load_model(path: &Path) -> Result<LoadedModel, OperatorError> {
    load_model_bytes(path, &model_file(path)?.0)
}

/// The golden cases: the operator's (`--golden`, checked against the model),
/// or one generated from the first reference row; outputs recorded from the
/// model (or from `--golden-outputs-from`). True when they came from a file.
fn golden_set(
    opts: &BuildOptions,
    model: &LoadedModel,
    first_row: Option<&[f64]>,
) -> Result<(GoldenSet, bool), OperatorError> {
    let (raw_cases, from_file) = match &opts.golden {
        Some(path) => (read_golden(path, model)?, true),
        None => {
            let inputs = model
                .schema()
                .inputs
                .iter()
                .map(|s| generated_input(s, first_row))
                .collect();
            (vec![(inputs, vec![])], false)
        }
    };
    let recorder = match &opts.golden_outputs_from {
        Some(path) => Some((load_model(path)?, path)),
        None => None,
    };
    let mut cases = Vec::new();
    for (i, (inputs, expected)) in raw_cases.into_iter().enumerate() {
        let run = |m: &LoadedModel, path: &Path| {
            m.run(&inputs).map_err(|e| OperatorError::Model {
                path: path.to_owned(),
                source: ModelError::Invalid(format!("golden case {i} does not run: {e}")),
            })
        };
        // The bundle's own model must run every case, whoever records the outputs.
        let mut got = run(model, &opts.model)?;
        if let Some((recorder, path)) = &recorder {
            got = run(recorder, path)?;
        }
        check_outputs(i, &got, &expected, &opts.health)
            .map_err(|failure| golden_failure(failure, &opts.health))?;
        cases.push(GoldenCase {
            inputs,
            outputs: got,
        });
    }
    Ok((GoldenSet { cases }, from_file))
}

/// A golden case's expected outputs that the model does not give.
fn golden_failure(failure: HealthFailure, health: &HealthPolicy) -> OperatorError {
    match failure {
        HealthFailure::OutOfTolerance {
            case,
            output,
            index,
            got,
            want,
        } => input_err(
            format!("golden case {case} output `{output}`"),
            format!(
                "element {index}: the model gives {got}, the file says {want} (tolerance abs {} rel {})",
                health.abs_tolerance, health.rel_tolerance
            ),
        ),
        HealthFailure::Shape {
            case,
            output,
            detail,
        } => input_err(
            format!("golden case {case} output `{output}`"),
            format!("the model's output {detail}"),
        ),
        other => input_err("golden cases", other.to_string()),
    }
}

/// The bundle's artifacts: the model (`model`), the golden cases, the reference
/// statistics, and each `--metadata` file under its own (lower-case) name.
fn artifacts(
    opts: &BuildOptions,
    model: ArtifactSource,
    golden: &GoldenSet,
    reference: Option<&ReferenceStats>,
) -> Result<Vec<ArtifactInput>, OperatorError> {
    let mut inputs = vec![
        artifact("model.onnx", ArtifactKind::Model, model),
        artifact(
            "golden.cbor",
            ArtifactKind::Golden,
            ArtifactSource::Bytes(golden.to_bytes()),
        ),
    ];
    if let Some(stats) = reference {
        inputs.push(artifact(
            "reference.cbor",
            ArtifactKind::Reference,
            ArtifactSource::Bytes(stats.to_bytes()),
        ));
    }
    for path in &opts.metadata {
        let what = || format!("--metadata {}", path.display());
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let name = ArtifactName::new(&file_name).map_err(|e| {
            input_err(
                what(),
                format!("its file name becomes the artifact name: {e}"),
            )
        })?;
        if inputs.iter().any(|i| i.name == name) {
            return Err(input_err(
                what(),
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
    Ok(inputs)
}
