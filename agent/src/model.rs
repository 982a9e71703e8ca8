//! Loading and running ONNX models with tract: the one runtime used on the device
//! and, at `edgefleet bundle build` time, to prove a model before it is signed.
//!
//! Facts this module is built on (../shared/models/README.md): models must be
//! optimised once at load (`into_optimized`; decluttered-only models ran 2-13x
//! slower); exporters leave batch dimensions unnamed, so every unknown dimension
//! gets a symbol before typing; tract's ONNX-ML support is partial, so an
//! unsupported operator is reported by name with the usual fix.

pub mod external_data;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use edgefleet_shared::golden::{Tensor, TensorData, TensorMismatch};
use edgefleet_shared::manifest::{Dim, ElementType, ModelSchema, TensorSpec};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid, InferenceFact};

/// Largest model file accepted for loading (1 GiB).
pub const MAX_MODEL_LEN: usize = 1 << 30;

/// Why a model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model uses an operator tract does not implement.
    #[error(
        "the model uses the ONNX operator `{op}`, which the on-device runtime (tract) does not support{hint}"
    )]
    UnsupportedOperator {
        /// Operator name.
        op: String,
        /// How to export the model without it (starts with "; ").
        hint: String,
    },
    /// An input or output has an element type the contract does not carry.
    #[error(
        "model {role} `{name}` has element type {dtype}, which edgefleet does not support (use f32, f64, i8, i32, i64, u8 or bool)"
    )]
    UnsupportedType {
        /// `input` or `output`.
        role: &'static str,
        /// Tensor name.
        name: String,
        /// tract's name of the type.
        dtype: String,
    },
    /// The file is not a model tract can load, or it fails analysis.
    #[error("the model cannot be loaded: {0}")]
    Invalid(String),
}

/// Why one inference call failed.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// An input is missing.
    #[error("input `{0}` is missing")]
    MissingInput(String),
    /// An input is given that the model does not have.
    #[error("the model has no input `{0}`")]
    UnknownInput(String),
    /// An input does not match the schema.
    #[error("input {0}")]
    Mismatch(#[from] TensorMismatch),
    /// The runtime failed (for example, a dimension the model cannot take).
    #[error("the model failed to run: {0}")]
    Runtime(String),
}

/// A model ready to run, with the schema it enforces.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    plan: Arc<TypedRunnableModel>,
    schema: ModelSchema,
    /// Class labels by output name (a `ZipMap`'s classes, in column order).
    labels: ClassLabels,
    /// The last successful run, shared by clones.
    last_run: Arc<LastRun>,
}

/// Class labels by output name.
type ClassLabels = Arc<std::collections::BTreeMap<String, Vec<String>>>;

/// How long the last successful run took (µs, 0: not run yet) and how many
/// input elements it had.
#[derive(Debug, Default)]
struct LastRun {
    micros: AtomicU64,
    elements: AtomicU64,
}

fn element_count(inputs: &[Tensor]) -> u64 {
    inputs
        .iter()
        .map(|t| t.data.len() as u64)
        .sum::<u64>()
        .max(1)
}

fn error_text(e: &TractError) -> String {
    format!("{e:#}")
}

/// Maps tract's load errors to a [`ModelError`], naming unsupported operators.
fn classify(e: &TractError) -> ModelError {
    let text = format!("{e:?}");
    if let Some(start) = text.find("Unimplemented(") {
        let rest = &text[start + "Unimplemented(".len()..];
        let op: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let hint = match op.as_str() {
            "DictVectorizer" | "CastMap" => {
                "; feed the model a tensor: vectorize dictionaries outside it"
            }
            _ => "",
        };
        return ModelError::UnsupportedOperator {
            op,
            hint: hint.into(),
        };
    }
    if text.contains("external data was detected") {
        return ModelError::Invalid(
            "the model keeps its weights in separate external data files (PyTorch's default export); \
             `edgefleet bundle build` copies them in when they sit beside the model"
                .into(),
        );
    }
    ModelError::Invalid(error_text(e))
}

fn element_type(role: &'static str, name: &str, dt: DatumType) -> Result<ElementType, ModelError> {
    Ok(match dt {
        DatumType::F32 => ElementType::F32,
        DatumType::F64 => ElementType::F64,
        DatumType::I8 => ElementType::I8,
        DatumType::I32 => ElementType::I32,
        DatumType::I64 => ElementType::I64,
        DatumType::U8 => ElementType::U8,
        DatumType::Bool => ElementType::Bool,
        DatumType::String => ElementType::String,
        other => {
            return Err(ModelError::UnsupportedType {
                role,
                name: name.into(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

fn dim_of(d: &TDim) -> Dim {
    match d {
        TDim::Val(n) => Dim::Fixed(u64::try_from(*n).unwrap_or(0)),
        TDim::Sym(s) => Dim::Symbol(sanitize_symbol(&s.to_string())),
        other => Dim::Symbol(sanitize_symbol(&other.to_string())),
    }
}

fn sanitize_symbol(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if cleaned.is_empty() {
        "N".into()
    } else {
        cleaned
    }
}

/// Checks that every input declares its element type and rank, and names
/// the dimensions a model leaves unnamed (skl2onnx's batch) as symbols: the
/// first input's first is `N`, the others `d<input>_<axis>`.
fn name_free_dims(model: &mut InferenceModel) -> Result<(), ModelError> {
    // Unnamed dimensions become symbols. An unnamed first dimension is the batch,
    // `N`, shared by every input: a model exported from a DataFrame (skl2onnx)
    // has one input per column and joins them row by row.
    let inputs = model.input_outlets().map_err(|e| classify(&e))?.len();
    for ix in 0..inputs {
        let fact: InferenceFact = model.input_fact(ix).map_err(|e| classify(&e))?.clone();
        if fact.datum_type.concretize().is_none() {
            return Err(ModelError::Invalid(format!(
                "input {ix} has no declared element type"
            )));
        }
        let Some(dims) = fact.shape.concretize().map(|_| ()).map_or_else(
            || Some(fact.shape.dims().cloned().collect::<Vec<_>>()),
            |_| None,
        ) else {
            continue;
        };
        if fact.shape.is_open() {
            return Err(ModelError::Invalid(format!(
                "input {ix} has no declared rank"
            )));
        }
        let named: TVec<_> = dims
            .iter()
            .enumerate()
            .map(|(j, d)| match d {
                GenericFactoid::Only(d) => GenericFactoid::Only(d.clone()),
                GenericFactoid::Any => {
                    let name = if j == 0 {
                        "N".to_string()
                    } else {
                        format!("d{ix}_{j}")
                    };
                    GenericFactoid::Only(TDim::Sym(model.symbols.sym(&name)))
                }
            })
            .collect();
        let fact = fact.with_shape(tract_onnx::tract_hir::infer::ShapeFactoid::closed(named));
        model.set_input_fact(ix, fact).map_err(|e| classify(&e))?;
    }
    Ok(())
}

/// The inputs and outputs of a typed model, named as requests name them.
fn schema_of(typed: &TypedModel) -> Result<ModelSchema, ModelError> {
    let mut schema = ModelSchema::default();
    for (ix, outlet) in typed
        .input_outlets()
        .map_err(|e| classify(&e))?
        .iter()
        .enumerate()
    {
        let name = typed.node(outlet.node).name.clone();
        let fact = typed.input_fact(ix).map_err(|e| classify(&e))?;
        schema.inputs.push(spec_of("input", &name, fact)?);
    }
    for (ix, outlet) in typed
        .output_outlets()
        .map_err(|e| classify(&e))?
        .iter()
        .enumerate()
    {
        let name = typed
            .outlet_label(*outlet)
            .map(str::to_owned)
            .unwrap_or_else(|| typed.node(outlet.node).name.clone());
        let fact = typed.output_fact(ix).map_err(|e| classify(&e))?;
        schema.outputs.push(spec_of("output", &name, fact)?);
    }
    Ok(schema)
}

fn spec_of(role: &'static str, name: &str, fact: &TypedFact) -> Result<TensorSpec, ModelError> {
    Ok(TensorSpec {
        name: name.into(),
        dtype: element_type(role, name, fact.datum_type)?,
        shape: fact.shape.iter().map(dim_of).collect(),
    })
}

impl LoadedModel {
    /// Loads, types and optimises an ONNX model from its bytes. CPU-heavy: call it
    /// off the async runtime.
    ///
    /// Models are shared by content within a process: loading bytes whose
    /// SHA-256 matches a model still in use returns that model (the fleet
    /// simulator runs many devices in one process, each loading the same model).
    pub fn load(bytes: &[u8]) -> Result<LoadedModel, ModelError> {
        type Cache = std::sync::Mutex<
            std::collections::HashMap<
                edgefleet_shared::Digest,
                (Weak<TypedRunnableModel>, ModelSchema, ClassLabels),
            >,
        >;
        static SHARED: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
        let key = edgefleet_shared::Digest::of(bytes);
        let cache = SHARED.get_or_init(Cache::default);
        let lock = || cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((plan, schema, labels)) = lock().get(&key)
            && let Some(plan) = plan.upgrade()
        {
            return Ok(LoadedModel {
                plan,
                schema: schema.clone(),
                labels: labels.clone(),
                last_run: Arc::default(),
            });
        }
        // Loaded outside the lock: two threads may both load a new model once.
        let model = LoadedModel::load_with(bytes, true)?;
        let mut cache = lock();
        cache.retain(|_, (plan, _, _)| plan.strong_count() > 0);
        cache.insert(
            key,
            (
                Arc::downgrade(&model.plan),
                model.schema.clone(),
                model.labels.clone(),
            ),
        );
        Ok(model)
    }

    /// [`LoadedModel::load`] with tract's own tree-ensemble evaluator instead of
    /// ours (`compact_trees: false`): the baseline for benchmarks and tests. The
    /// binary-label correction applies either way.
    pub fn load_with(bytes: &[u8], compact_trees: bool) -> Result<LoadedModel, ModelError> {
        if bytes.len() > MAX_MODEL_LEN {
            return Err(ModelError::Invalid(format!(
                "the model file is {} bytes, over the limit of {MAX_MODEL_LEN}",
                bytes.len()
            )));
        }
        let mut reader = bytes;
        let mut onnx = tract_onnx::onnx();
        crate::trees::regressor::register(&mut onnx.op_register);
        crate::trees::ml::register(&mut onnx.op_register);
        crate::trees::svm::register(&mut onnx.op_register);
        crate::trees::encoder::register(&mut onnx.op_register);
        let mut proto = onnx
            .proto_model_for_read(&mut reader)
            .map_err(|e| classify(&e))?;
        crate::trees::encoder::index_string_labels(&mut proto).map_err(|e| classify(&e))?;
        crate::trees::logsumexp::stabilise(&mut proto).map_err(|e| classify(&e))?;
        let labels = crate::trees::ml::zipmap_labels(&proto).map_err(|e| classify(&e))?;
        let mut model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| classify(&e))?;
        name_free_dims(&mut model)?;
        let mut typed = model.into_typed().map_err(|e| classify(&e))?;
        crate::trees::ml::i64_outputs(&mut typed).map_err(|e| classify(&e))?;
        crate::trees::barrier::shield_concat_einsum(&mut typed).map_err(|e| classify(&e))?;
        // Tree ensembles run on our compact evaluator (agent/src/trees.rs).
        if compact_trees {
            crate::trees::accelerate(&mut typed).map_err(|e| classify(&e))?;
        } else {
            crate::trees::fix_binary_labels(&mut typed).map_err(|e| classify(&e))?;
        }
        let schema = schema_of(&typed)?;
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| classify(&e))?;
        Ok(LoadedModel {
            plan,
            schema,
            labels: Arc::new(labels),
            last_run: Arc::default(),
        })
    }

    /// The class labels of outputs that have them, by output name: a
    /// `ZipMap`'s classes, one per column of its probabilities.
    pub fn class_labels(&self) -> &std::collections::BTreeMap<String, Vec<String>> {
        &self.labels
    }

    /// How long this model's last successful [`LoadedModel::run`] took, if it
    /// ran.
    pub fn last_run(&self) -> Option<Duration> {
        match self.last_run.micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// How long a run on `inputs` should take: the last run's time scaled by
    /// the number of input elements (so a request of 10,000 rows after one of
    /// one row is expected to take 10,000 times as long). `None` before the
    /// first run. Decides where the local API runs a request.
    pub fn estimate(&self, inputs: &[Tensor]) -> Option<Duration> {
        let micros = self.last_run.micros.load(Ordering::Relaxed);
        if micros == 0 {
            return None;
        }
        let before = self.last_run.elements.load(Ordering::Relaxed).max(1);
        let scaled = u128::from(micros) * u128::from(element_count(inputs)) / u128::from(before);
        Some(Duration::from_micros(
            u64::try_from(scaled).unwrap_or(u64::MAX),
        ))
    }

    /// The model's interface.
    pub fn schema(&self) -> &ModelSchema {
        &self.schema
    }

    /// Runs the model. Inputs are matched to the schema by name and checked
    /// (element type, rank, fixed dimensions, element count) before running.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
        let started = Instant::now();
        for t in inputs {
            if !self.schema.inputs.iter().any(|s| s.name == t.name) {
                return Err(InferenceError::UnknownInput(t.name.clone()));
            }
        }
        let mut values: TVec<TValue> = TVec::new();
        for spec in &self.schema.inputs {
            let t = inputs
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| InferenceError::MissingInput(spec.name.clone()))?;
            t.check_against(spec)?;
            values.push(
                to_tract(t)
                    .map_err(|e| InferenceError::Runtime(error_text(&e)))?
                    .into(),
            );
        }
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| InferenceError::Runtime(error_text(&e)))?;
        // What follows (decoding, JSON) is SSE code: not slowed by tract's
        // dirty AVX state (trees::clear_upper_simd_state).
        crate::trees::clear_upper_simd_state();
        let outputs = outputs
            .iter()
            .zip(&self.schema.outputs)
            .map(|(v, spec)| {
                from_tract(&spec.name, v).map_err(|e| InferenceError::Runtime(error_text(&e)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_run.micros.store(us.max(1), Ordering::Relaxed);
        self.last_run
            .elements
            .store(element_count(inputs), Ordering::Relaxed);
        Ok(outputs)
    }
}

fn to_tract(t: &Tensor) -> TractResult<tract_onnx::prelude::Tensor> {
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|d| usize::try_from(*d).unwrap_or(usize::MAX))
        .collect();
    fn arr<T: Clone + Datum>(shape: &[usize], v: &[T]) -> TractResult<tract_onnx::prelude::Tensor> {
        Ok(tract_ndarray::ArrayD::from_shape_vec(shape, v.to_vec())?.into_tensor())
    }
    match &t.data {
        TensorData::F32(v) => arr(&shape, v),
        TensorData::F64(v) => arr(&shape, v),
        TensorData::I8(v) => arr(&shape, v),
        TensorData::I32(v) => arr(&shape, v),
        TensorData::I64(v) => arr(&shape, v),
        TensorData::U8(v) => arr(&shape, v),
        TensorData::Bool(v) => arr(&shape, v),
        TensorData::String(v) => arr(&shape, v),
    }
}

fn from_tract(name: &str, v: &TValue) -> TractResult<Tensor> {
    let shape = v.shape().iter().map(|d| *d as u64).collect();
    let data = match v.datum_type() {
        DatumType::F32 => {
            TensorData::F32(v.to_plain_array_view::<f32>()?.iter().cloned().collect())
        }
        DatumType::F64 => {
            TensorData::F64(v.to_plain_array_view::<f64>()?.iter().cloned().collect())
        }
        DatumType::I8 => TensorData::I8(v.to_plain_array_view::<i8>()?.iter().cloned().collect()),
        DatumType::I32 => {
            TensorData::I32(v.to_plain_array_view::<i32>()?.iter().cloned().collect())
        }
        DatumType::I64 => {
            TensorData::I64(v.to_plain_array_view::<i64>()?.iter().cloned().collect())
        }
        DatumType::U8 => TensorData::U8(v.to_plain_array_view::<u8>()?.iter().cloned().collect()),
        DatumType::Bool => {
            TensorData::Bool(v.to_plain_array_view::<bool>()?.iter().cloned().collect())
        }
        DatumType::String => {
            TensorData::String(v.to_plain_array_view::<String>()?.iter().cloned().collect())
        }
        other => {
            return Err(tract_onnx::prelude::TractError::msg(format!(
                "output `{name}` has unsupported element type {other:?}"
            )));
        }
    };
    Ok(Tensor {
        name: name.into(),
        shape,
        data,
    })
}

/// Why a model failed its golden cases.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HealthFailure {
    /// A case did not run.
    #[error("golden case {case} does not run: {detail}")]
    Run {
        /// Case index.
        case: usize,
        /// The error.
        detail: String,
    },
    /// An expected output is missing or has another shape.
    #[error("golden case {case}: output `{output}` {detail}")]
    Shape {
        /// Case index.
        case: usize,
        /// Output name.
        output: String,
        /// What differs.
        detail: String,
    },
    /// An output element is out of tolerance.
    #[error("golden case {case}: output `{output}` element {index} is {got}, expected {want}")]
    OutOfTolerance {
        /// Case index.
        case: usize,
        /// Output name.
        output: String,
        /// Flat element index.
        index: usize,
        /// Value produced.
        got: String,
        /// Value expected.
        want: String,
    },
    /// A case ran over the latency budget.
    #[error("golden case {case} took {took_ms:.1} ms, over the budget of {budget_ms} ms")]
    TooSlow {
        /// Case index.
        case: usize,
        /// Time taken.
        took_ms: f64,
        /// Budget.
        budget_ms: u32,
    },
}

/// Checks that every expected output of golden case `case` is produced with the
/// same shape and within the policy's tolerance. Used on the device (health check)
/// and at build time (outputs given by the operator).
pub fn check_outputs(
    case: usize,
    got: &[edgefleet_shared::golden::Tensor],
    expected: &[edgefleet_shared::golden::Tensor],
    policy: &edgefleet_shared::manifest::HealthPolicy,
) -> Result<(), HealthFailure> {
    for want in expected {
        let Some(have) = got.iter().find(|g| g.name == want.name) else {
            return Err(HealthFailure::Shape {
                case,
                output: want.name.clone(),
                detail: "is not produced by the model".into(),
            });
        };
        if have.shape != want.shape {
            return Err(HealthFailure::Shape {
                case,
                output: want.name.clone(),
                detail: format!("has shape {:?}, expected {:?}", have.shape, want.shape),
            });
        }
        edgefleet_shared::golden::within_tolerance(&have.data, &want.data, policy).map_err(
            |e| HealthFailure::OutOfTolerance {
                case,
                output: want.name.clone(),
                index: e.index,
                got: e.got,
                want: e.want,
            },
        )?;
    }
    Ok(())
}

/// What a passing health check measured.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// Cases run.
    pub cases: usize,
    /// Slowest case, milliseconds.
    pub max_latency_ms: f64,
}

/// Runs every golden case and checks outputs within the policy's tolerance and
/// each case within its latency budget (after one warm-up run of the first case,
/// so one-time allocation is not counted).
pub fn health_check(
    model: &LoadedModel,
    golden: &edgefleet_shared::golden::GoldenSet,
    policy: &edgefleet_shared::manifest::HealthPolicy,
) -> Result<HealthReport, HealthFailure> {
    if let Some(first) = golden.cases.first() {
        let _ = model.run(&first.inputs);
    }
    let mut max_latency_ms: f64 = 0.0;
    for (case, c) in golden.cases.iter().enumerate() {
        let started = std::time::Instant::now();
        let got = model.run(&c.inputs).map_err(|e| HealthFailure::Run {
            case,
            detail: e.to_string(),
        })?;
        let took_ms = started.elapsed().as_secs_f64() * 1000.0;
        max_latency_ms = max_latency_ms.max(took_ms);
        check_outputs(case, &got, &c.outputs, policy)?;
        if took_ms > f64::from(policy.latency_budget_ms) {
            return Err(HealthFailure::TooSlow {
                case,
                took_ms,
                budget_ms: policy.latency_budget_ms,
            });
        }
    }
    Ok(HealthReport {
        cases: golden.cases.len(),
        max_latency_ms,
    })
}
