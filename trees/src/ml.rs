//! ONNX-ML operators that scikit-learn exports (skl2onnx defaults) and tract
//! 0.23.9 cannot parse, as expansions into tract's own operators so that the
//! model then optimises and runs like any other. Semantics follow onnxruntime
//! (checked against its outputs in `agent/tests/sklearn.rs`):
//!
//! - `Scaler`: `(x - offset) * scale`, per feature or one value for all (as many
//!   offsets as scales, as onnxruntime requires); f32 out.
//! - `ZipMap`: onnxruntime answers a list of {label: probability} maps; here the
//!   probabilities stay the float tensor `[N, classes]` they were, and the class
//!   labels are read by [`class_labels`] for the model's metadata.
//! - `ArrayFeatureExtractor`: `x[..., indices]` with the indices flattened; a
//!   1-D `x` is one row (`[1, k]` out), as onnxruntime does.
//! - `Binarizer`: 1 where `x > threshold`, else 0, in `x`'s type.
//! - `Imputer`: each feature's `replaced_value_float` (NaN: missing values) becomes
//!   its `imputed_value_floats` (one value for all features, or one each).
//!
//! - `OneHotEncoder` (integer or string categories): `[..., k]` in,
//!   `[..., k, categories]` floats out, 1 where the value is the category (the
//!   last of repeated categories, as onnxruntime). A value of no category gives zeros whatever
//!   `zeros` says (onnxruntime refuses the request when `zeros` is 0).
//! - `FeatureVectorizer`: its inputs (all of one numeric type) side by side as
//!   f32 `[N, Σ inputdimensions]`, each input's row (`[N, ...]` flattened; a 1-D
//!   input is one row) cut or zero-padded to its `inputdimensions` width.
//!
//! Every attribute is checked when the model loads; an error names the
//! operator, the node and the attribute.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::{logic, math};
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::logic::wire_with_rank_broadcast;

use crate::encoder::{Column, wire_one_hot};

/// Most values one attribute list may hold (features or classes).
pub(crate) const MAX_VALUES: usize = 1 << 20;

/// Adds the operators of this module to an ONNX op register.
pub fn register(register: &mut OnnxOpRegister) {
    register.insert("Scaler", scaler);
    register.insert("ZipMap", zip_map);
    register.insert("ArrayFeatureExtractor", array_feature_extractor);
    register.insert("Binarizer", binarizer);
    register.insert("Imputer", imputer);
    register.insert("OneHotEncoder", one_hot_encoder);
    register.insert("FeatureVectorizer", feature_vectorizer);
}

/// The node's name for error messages.
pub(crate) fn at(node: &NodeProto) -> String {
    format!("{} {:?}", node.op_type, node.name)
}

/// A float list attribute: present or empty, bounded, every value finite
/// (`allow_nan`: NaN too, for a value that marks missing data).
pub(crate) fn floats(node: &NodeProto, name: &str, allow_nan: bool) -> TractResult<Vec<f32>> {
    let v = node.get_attr_opt_vec::<f32>(name)?.unwrap_or_default();
    ensure!(
        v.len() <= MAX_VALUES,
        "{}: {name} has {} values, over {MAX_VALUES}",
        at(node),
        v.len()
    );
    if let Some(bad) = v
        .iter()
        .find(|x| x.is_infinite() || (x.is_nan() && !allow_nan))
    {
        bail!(
            "{}: {name} holds {bad}, which is not a finite number",
            at(node)
        );
    }
    Ok(v)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn unbits(v: &[u32]) -> Vec<f32> {
    v.iter().map(|x| f32::from_bits(*x)).collect()
}

/// `x` as f32 (a cast when it is not).
fn as_f32(model: &mut TypedModel, prefix: &str, x: OutletId) -> TractResult<OutletId> {
    if model.outlet_fact(x)?.datum_type == f32::datum_type() {
        return Ok(x);
    }
    Ok(model.wire_node(format!("{prefix}.to_f32"), cast(f32::datum_type()), &[x])?[0])
}

/// Checks that a per-feature list fits the input's last dimension (when known).
fn check_width(model: &TypedModel, x: OutletId, what: &str, len: usize) -> TractResult<()> {
    let fact = model.outlet_fact(x)?;
    let width = fact.shape.last().and_then(|d| d.to_usize().ok());
    if len > 1
        && let Some(w) = width
        && w != len
    {
        bail!("{what} has {len} values but the input has {w} features");
    }
    Ok(())
}

/// The typing rules of a one-input, one-output operator whose output has its
/// input's shape, and type `dt` (the input's type when `None`).
fn unary_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    dt: Option<DatumType>,
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, 1)?;
    match dt {
        Some(dt) => s.equals(&outputs[0].datum_type, dt)?,
        None => s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?,
    }
    s.equals(&inputs[0].shape, &outputs[0].shape)?;
    Ok(())
}

/// A per-feature constant: `[C]` (broadcast over the rows).
fn feature_const(model: &mut TypedModel, name: String, v: &[f32]) -> TractResult<OutletId> {
    model.add_const(name, tensor1(v).into_arc_tensor())
}

// ----- Scaler ---------------------------------------------------------------

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Scaler {
    offset: Vec<u32>,
    scale: Vec<u32>,
}

fn scaler(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let mut offset = floats(node, "offset", false)?;
    let mut scale = floats(node, "scale", false)?;
    if offset.is_empty() {
        offset = vec![0.0];
    }
    if scale.is_empty() {
        scale = vec![1.0];
    }
    ensure!(
        offset.len() == scale.len(),
        "{}: offset has {} values and scale {}: both must have one value, or one per feature",
        at(node),
        offset.len(),
        scale.len()
    );
    Ok((
        expand(Scaler {
            offset: bits(&offset),
            scale: bits(&scale),
        }),
        vec![],
    ))
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        unary_rules(s, inputs, outputs, Some(f32::datum_type()))
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        check_width(
            model,
            inputs[0],
            &format!("{prefix}: Scaler offset"),
            self.offset.len(),
        )?;
        check_width(
            model,
            inputs[0],
            &format!("{prefix}: Scaler scale"),
            self.scale.len(),
        )?;
        let x = as_f32(model, prefix, inputs[0])?;
        let offset = feature_const(model, format!("{prefix}.offset"), &unbits(&self.offset))?;
        let scale = feature_const(model, format!("{prefix}.scale"), &unbits(&self.scale))?;
        let centred =
            wire_with_rank_broadcast(format!("{prefix}.sub"), model, math::sub(), &[x, offset])?;
        wire_with_rank_broadcast(
            format!("{prefix}.mul"),
            model,
            math::mul(),
            &[centred[0], scale],
        )
    }
}

// ----- ZipMap -----------------------------------------------------------------

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ZipMap {
    classes: usize,
}

/// The class labels of a `ZipMap` node: integers or strings, as text.
pub fn class_labels(node: &NodeProto) -> TractResult<Vec<String>> {
    let ints = node.get_attr_opt_vec::<i64>("classlabels_int64s")?;
    let strings = node.get_attr_opt_vec::<String>("classlabels_strings")?;
    let labels: Vec<String> = match (ints, strings) {
        (Some(i), None) if !i.is_empty() => i.iter().map(|v| v.to_string()).collect(),
        (None, Some(s)) if !s.is_empty() => s,
        _ => bail!(
            "{}: exactly one of classlabels_int64s and classlabels_strings must list the classes",
            at(node)
        ),
    };
    ensure!(labels.len() <= MAX_VALUES, "{}: too many classes", at(node));
    Ok(labels)
}

/// The classes of every `ZipMap` in a model, by the name of its output.
pub fn zipmap_labels(
    proto: &tract_onnx::pb::ModelProto,
) -> TractResult<std::collections::BTreeMap<String, Vec<String>>> {
    let mut out = std::collections::BTreeMap::new();
    let nodes = proto.graph.iter().flat_map(|g| g.node.iter());
    for node in nodes.filter(|n| n.op_type == "ZipMap") {
        if let Some(output) = node.output.first() {
            out.insert(output.clone(), class_labels(node)?);
        }
    }
    Ok(out)
}

fn zip_map(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let classes = class_labels(node)?.len();
    Ok((expand(ZipMap { classes }), vec![]))
}

impl Expansion for ZipMap {
    fn name(&self) -> StaticName {
        "ZipMap".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        unary_rules(s, inputs, outputs, Some(f32::datum_type()))?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, 2)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?;
        if let Some(w) = fact.shape.last().and_then(|d| d.to_usize().ok()) {
            ensure!(
                w == self.classes,
                "{prefix}: ZipMap names {} classes but its input has {w} columns",
                self.classes
            );
        }
        model.wire_node(
            prefix,
            tract_onnx::tract_core::ops::identity::Identity,
            inputs,
        )
    }
}

// ----- ArrayFeatureExtractor -----------------------------------------------------

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ArrayFeatureExtractor;

fn array_feature_extractor(
    _ctx: &ParsingContext<'_>,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(ArrayFeatureExtractor), vec![]))
}

impl Expansion for ArrayFeatureExtractor {
    fn name(&self) -> StaticName {
        "ArrayFeatureExtractor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&inputs[1].datum_type, i64::datum_type())?;
        s.given(&inputs[0].rank, move |s, rank| {
            s.equals(&outputs[0].rank, rank.max(2))
        })?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let (mut x, mut indices) = (inputs[0], inputs[1]);
        if model.outlet_fact(x)?.rank() == 1 {
            x = model.wire_node(format!("{prefix}.as_row"), AxisOp::Add(0), &[x])?[0];
        }
        let ishape: TVec<TDim> = model.outlet_fact(indices)?.shape.to_tvec();
        if ishape.len() != 1 {
            let count: TDim = ishape.iter().product();
            indices = model.wire_node(
                format!("{prefix}.flat_indices"),
                AxisOp::Reshape(0, ishape, tvec![count]),
                &[indices],
            )?[0];
        }
        let axis = model.outlet_fact(x)?.rank() - 1;
        model.wire_node(prefix, Gather::new(axis), &[x, indices])
    }
}

// ----- Binarizer ------------------------------------------------------------------

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Binarizer {
    threshold: u32,
}

fn binarizer(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let threshold: f32 = node.get_attr_opt("threshold")?.unwrap_or(0.0);
    ensure!(
        threshold.is_finite(),
        "{}: threshold {threshold} is not a finite number",
        at(node)
    );
    Ok((
        expand(Binarizer {
            threshold: threshold.to_bits(),
        }),
        vec![],
    ))
}

impl Expansion for Binarizer {
    fn name(&self) -> StaticName {
        "Binarizer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        unary_rules(s, inputs, outputs, None)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let dt = model.outlet_fact(inputs[0])?.datum_type;
        let x = as_f32(model, prefix, inputs[0])?;
        let t = model.add_const(
            format!("{prefix}.threshold"),
            rctensor0(f32::from_bits(self.threshold)),
        )?;
        let above = wire_with_rank_broadcast(
            format!("{prefix}.gt"),
            model,
            TypedBinOp(logic::comp_gt(), None),
            &[x, t],
        )?;
        model.wire_node(format!("{prefix}.cast"), cast(dt), &above)
    }
}

// ----- Imputer ----------------------------------------------------------------------

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Imputer {
    imputed: Vec<u32>,
    replaced: u32,
}

fn imputer(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let imputed = floats(node, "imputed_value_floats", false)?;
    ensure!(
        !imputed.is_empty(),
        "{}: imputed_value_floats is empty (integer imputers, imputed_value_int64s, are not supported)",
        at(node)
    );
    let replaced: f32 = node.get_attr_opt("replaced_value_float")?.unwrap_or(0.0);
    ensure!(
        !replaced.is_infinite(),
        "{}: replaced_value_float is infinite",
        at(node)
    );
    Ok((
        expand(Imputer {
            imputed: bits(&imputed),
            replaced: replaced.to_bits(),
        }),
        vec![],
    ))
}

impl Expansion for Imputer {
    fn name(&self) -> StaticName {
        "Imputer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        unary_rules(s, inputs, outputs, Some(f32::datum_type()))
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        check_width(
            model,
            inputs[0],
            &format!("{prefix}: Imputer imputed_value_floats"),
            self.imputed.len(),
        )?;
        let x = as_f32(model, prefix, inputs[0])?;
        let replaced = f32::from_bits(self.replaced);
        let missing = if replaced.is_nan() {
            model.wire_node(format!("{prefix}.is_nan"), math::is_nan(), &[x])?
        } else {
            let r = model.add_const(format!("{prefix}.replaced"), rctensor0(replaced))?;
            wire_with_rank_broadcast(
                format!("{prefix}.eq"),
                model,
                TypedBinOp(logic::comp_eq(), None),
                &[x, r],
            )?
        };
        let imputed = feature_const(model, format!("{prefix}.imputed"), &unbits(&self.imputed))?;
        wire_with_rank_broadcast(
            format!("{prefix}.select"),
            model,
            logic::Iff,
            &[missing[0], imputed, x],
        )
    }
}

// ----- Cast to int64 ---------------------------------------------------------------

/// tract types ONNX `Cast(to=INT64)` as its symbolic-dimension type (for shape
/// arithmetic); skl2onnx ends every classifier's label output with one. Each
/// model output of that type is cast back to i64 under its own name, so the
/// label comes out as the int64 tensor the model declares.
pub fn i64_outputs(model: &mut TypedModel) -> TractResult<()> {
    let outputs = model.output_outlets()?.to_vec();
    let mut fixed = Vec::with_capacity(outputs.len());
    for o in outputs {
        if model.outlet_fact(o)?.datum_type != TDim::datum_type() {
            fixed.push(o);
            continue;
        }
        let label = model
            .outlet_label(o)
            .map(str::to_owned)
            .unwrap_or_else(|| model.node(o.node).name.clone());
        let node_name = format!("{label}.as_i64");
        let cast_out = model.wire_node(node_name, cast(i64::datum_type()), &[o])?[0];
        model.set_outlet_label(o, format!("{label}.tdim"))?;
        model.set_outlet_label(cast_out, label)?;
        fixed.push(cast_out);
    }
    model.select_output_outlets(&fixed)
}

// ----- OneHotEncoder --------------------------------------------------------------

#[derive(Debug, Clone)]
struct OneHotEncoder {
    /// `cats_int64s` or `cats_strings`.
    categories: Column,
}

fn one_hot_encoder(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(OneHotEncoder::parse(node)?), vec![]))
}

impl OneHotEncoder {
    fn parse(node: &NodeProto) -> TractResult<OneHotEncoder> {
        let ints = node.get_attr_opt_vec::<i64>("cats_int64s")?;
        let strings = node.get_attr_opt_vec::<String>("cats_strings")?;
        let categories = match (ints, strings) {
            (Some(v), None) if !v.is_empty() => Column::Ints(v),
            (None, Some(v)) if !v.is_empty() => Column::Strings(v),
            _ => bail!(
                "{}: exactly one of cats_int64s and cats_strings must list the categories",
                at(node)
            ),
        };
        ensure!(
            categories.len() <= MAX_VALUES,
            "{}: {} categories, over {MAX_VALUES}",
            at(node),
            categories.len()
        );
        Ok(OneHotEncoder { categories })
    }
}

impl Expansion for OneHotEncoder {
    fn name(&self) -> StaticName {
        "OneHotEncoder".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, inputs[0].rank.bex() + 1)?;
        s.given(&inputs[0].rank, move |s, rank| {
            for axis in 0..rank as usize {
                s.equals(&outputs[0].shape[axis], &inputs[0].shape[axis])?;
            }
            s.equals(
                &outputs[0].shape[rank as usize],
                self.categories.len().to_dim(),
            )
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        let dt = model.outlet_fact(x)?.datum_type;
        if let Column::Ints(_) = self.categories
            && dt != i64::datum_type()
        {
            // tract computes some integer tensors (shapes, indices) as TDim.
            ensure!(
                dt.is_number() || dt == TDim::datum_type(),
                "{prefix}: OneHotEncoder has integer categories but its input is {dt:?}"
            );
            x = model.wire_node(format!("{prefix}.to_i64"), cast(i64::datum_type()), &[x])?[0];
        }
        let hot = wire_one_hot(model, format!("{prefix}.one_hot"), x, &self.categories)?;
        Ok(tvec!(hot))
    }
}

// ----- FeatureVectorizer ------------------------------------------------------------

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct FeatureVectorizer {
    /// Each input's width in the output.
    widths: Vec<usize>,
}

fn feature_vectorizer(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(FeatureVectorizer::parse(node)?), vec![]))
}

impl FeatureVectorizer {
    fn parse(node: &NodeProto) -> TractResult<FeatureVectorizer> {
        let dims = node
            .get_attr_opt_vec::<i64>("inputdimensions")?
            .unwrap_or_default();
        ensure!(
            dims.len() == node.input.len(),
            "{}: inputdimensions has {} values for {} inputs",
            at(node),
            dims.len(),
            node.input.len()
        );
        let widths = dims
            .iter()
            .map(|d| {
                usize::try_from(*d)
                    .ok()
                    .filter(|w| (1..=MAX_VALUES).contains(w))
            })
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| {
                format_err!(
                    "{}: inputdimensions {dims:?} must each be between 1 and {MAX_VALUES}",
                    at(node)
                )
            })?;
        ensure!(
            widths.iter().sum::<usize>() <= MAX_VALUES,
            "{}: inputdimensions add up to over {MAX_VALUES}",
            at(node)
        );
        Ok(FeatureVectorizer { widths })
    }
}

impl Expansion for FeatureVectorizer {
    fn name(&self) -> StaticName {
        "FeatureVectorizer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.widths.len())?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(
            &outputs[0].shape[1],
            self.widths.iter().sum::<usize>().to_dim(),
        )?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        // tract types an integer `Cast` as TDim (a shape value): int64 here.
        let type_of = |model: &TypedModel, x: OutletId| -> TractResult<DatumType> {
            let dt = model.outlet_fact(x)?.datum_type;
            Ok(if dt == TDim::datum_type() {
                i64::datum_type()
            } else {
                dt
            })
        };
        let dt = type_of(model, inputs[0])?;
        let mut parts = tvec![];
        for (i, (&input, &width)) in inputs.iter().zip(&self.widths).enumerate() {
            let name = format!("{prefix}.{i}");
            let fact = model.outlet_fact(input)?.clone();
            let this = type_of(model, input)?;
            ensure!(
                this == dt && dt.is_number(),
                "{prefix}: FeatureVectorizer's inputs must share one numeric type: input 0 is {dt:?}, input {i} is {this:?}"
            );
            let x = as_f32(model, &name, input)?;
            let x = rows(model, &name, x, &fact.shape)?;
            parts.push(fit_width(model, &name, x, width)?);
        }
        if parts.len() == 1 {
            return Ok(parts);
        }
        model.wire_node(
            prefix,
            tract_onnx::tract_core::ops::array::TypedConcat::new(1),
            &parts,
        )
    }
}

/// `x` (of `shape`) as a matrix with one row per batch element: a 1-D input is
/// one row, more dimensions are flattened after the first.
fn rows(
    model: &mut TypedModel,
    name: &str,
    x: OutletId,
    shape: &ShapeFact,
) -> TractResult<OutletId> {
    match shape.rank() {
        0 => bail!("{name}: FeatureVectorizer's input is a scalar"),
        1 => Ok(model.wire_node(format!("{name}.row"), AxisOp::Add(0), &[x])?[0]),
        2 => Ok(x),
        _ => {
            let from: TVec<TDim> = shape.iter().skip(1).cloned().collect();
            let to = tvec![from.iter().product::<TDim>()];
            Ok(model.wire_node(
                format!("{name}.flatten"),
                AxisOp::Reshape(1, from, to),
                &[x],
            )?[0])
        }
    }
}

/// The matrix `x` cut or zero-padded on the right to `width` columns.
fn fit_width(
    model: &mut TypedModel,
    name: &str,
    x: OutletId,
    width: usize,
) -> TractResult<OutletId> {
    let have = model.outlet_fact(x)?.shape[1].to_usize().map_err(|_| {
        format_err!("{name}: FeatureVectorizer needs each input's width to be known")
    })?;
    use tract_onnx::tract_core::ops::array::{Pad, PadMode, Slice};
    Ok(match have.cmp(&width) {
        std::cmp::Ordering::Equal => x,
        std::cmp::Ordering::Greater => {
            model.wire_node(format!("{name}.cut"), Slice::new(1, 0, width), &[x])?[0]
        }
        std::cmp::Ordering::Less => {
            let pad = Pad {
                pads: vec![(0, 0), (0, width - have)],
                mode: PadMode::Constant(Arc::new(0f32.into())),
            };
            model.wire_node(format!("{name}.pad"), pad, &[x])?[0]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ints, node, strings};
    use proptest::prelude::*;

    /// Wires `expansion` over sources of `facts`, optimises and runs it on `inputs`.
    fn run_expansion(
        expansion: &dyn Expansion,
        facts: Vec<TypedFact>,
        inputs: TVec<TValue>,
    ) -> TractResult<Tensor> {
        let mut model = TypedModel::default();
        let sources = facts
            .into_iter()
            .enumerate()
            .map(|(i, f)| model.add_source(format!("x{i}"), f))
            .collect::<TractResult<TVec<_>>>()?;
        let out = expansion.wire("op", &mut model, &sources)?;
        model.select_output_outlets(&out)?;
        let plan = model.into_optimized()?.into_runnable()?;
        Ok(plan.run(inputs)?.remove(0).into_tensor())
    }

    /// onnxruntime's FeatureVectorizer (feature_vectorizer.cc), written out:
    /// each input's row cut to, or zero-padded up to, its width.
    fn reference_vectorize(
        widths: &[usize],
        inputs: &[(usize, Vec<f32>)],
        rows: usize,
    ) -> Vec<f32> {
        let total: usize = widths.iter().sum();
        let mut out = vec![0.0; rows * total];
        let mut offset = 0;
        for (&width, (cols, data)) in widths.iter().zip(inputs) {
            for r in 0..rows {
                for c in 0..width.min(*cols) {
                    out[r * total + offset + c] = data[r * cols + c];
                }
            }
            offset += width;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any input widths and `inputdimensions`: what onnxruntime computes.
        #[test]
        fn feature_vectorizer_cuts_and_pads_as_onnxruntime(
            shapes in proptest::collection::vec((1usize..5, 1usize..6), 1..4),
            rows in 1usize..4,
            seed in any::<u32>(),
        ) {
            let widths: Vec<usize> = shapes.iter().map(|(_, w)| *w).collect();
            let inputs: Vec<(usize, Vec<f32>)> = shapes
                .iter()
                .enumerate()
                .map(|(i, (cols, _))| {
                    let data = (0..rows * cols)
                        .map(|j| ((seed as usize + 7 * i + j) % 23) as f32 - 11.0)
                        .collect();
                    (*cols, data)
                })
                .collect();
            let facts = inputs.iter().map(|(cols, _)| f32::fact([rows, *cols])).collect();
            let values = inputs
                .iter()
                .map(|(cols, data)| Tensor::from_shape(&[rows, *cols], data).map(|t| t.into_tvalue()))
                .collect::<TractResult<TVec<_>>>()
                .expect("tensors");
            let got = run_expansion(&FeatureVectorizer { widths: widths.clone() }, facts, values)
                .expect("runs");
            prop_assert_eq!(got.shape(), &[rows, widths.iter().sum::<usize>()]);
            prop_assert_eq!(
                got.try_as_plain_ram().expect("plain").as_slice::<f32>().expect("f32"),
                &reference_vectorize(&widths, &inputs, rows)[..]
            );
        }

        /// Any string categories (repeats included) and values: the column of
        /// the value's last matching category is 1, every other 0.
        #[test]
        fn string_one_hot_marks_the_last_matching_category(
            categories in proptest::collection::vec("[ab]{0,2}", 1..6),
            values in proptest::collection::vec("[abc]{0,2}", 1..8),
        ) {
            let cats: Vec<&str> = categories.iter().map(String::as_str).collect();
            let encoder =
                OneHotEncoder::parse(&node("OneHotEncoder", "n", vec![strings("cats_strings", &cats)]))
                    .expect("parses");
            let input = tensor1(&values);
            let got = run_expansion(
                &encoder,
                vec![String::fact([values.len()])],
                tvec![input.into_tvalue()],
            )
            .expect("runs");
            let k = categories.len();
            prop_assert_eq!(got.shape(), &[values.len(), k]);
            let got = got.try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            for (i, v) in values.iter().enumerate() {
                let hot = categories.iter().rposition(|c| c == v);
                for j in 0..k {
                    prop_assert_eq!(got[i * k + j], if hot == Some(j) { 1.0 } else { 0.0 });
                }
            }
        }
    }

    #[test]
    fn inputdimensions_must_fit_the_inputs() {
        let with = |dims: Vec<i64>, inputs: usize| {
            let mut n = node(
                "FeatureVectorizer",
                "fv",
                vec![ints("inputdimensions", dims)],
            );
            n.input = (0..inputs).map(|i| format!("x{i}")).collect();
            FeatureVectorizer::parse(&n).map(|f| f.widths)
        };
        assert_eq!(with(vec![3, 1], 2).expect("fits"), vec![3, 1]);
        for (dims, inputs, says) in [
            (vec![3], 2, "inputdimensions has 1 values for 2 inputs"),
            (vec![0, 2], 2, "must each be between 1 and"),
            (vec![-4], 1, "must each be between 1 and"),
            (vec![1 << 20, 1], 2, "add up to over"),
        ] {
            let err = with(dims, inputs).expect_err(says);
            assert!(err.to_string().contains(says), "{err}");
            assert!(
                err.to_string().contains("FeatureVectorizer \"fv\""),
                "{err}"
            );
        }
    }
}
