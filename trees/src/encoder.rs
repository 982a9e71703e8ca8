//! `LabelEncoder` (ONNX-ML opset 2 and 3 attributes), which tract 0.23.9 cannot
//! parse: each element of the input is looked up among `keys_*` and replaced by
//! the value at the same position in `values_*`; an element of no key becomes
//! `default_*` (−1, −0.0 or `"_Unused"` unless given). Keys and values are
//! integers, floats or strings, in any pairing. As in onnxruntime: the first of
//! duplicate keys wins, a float NaN matches no key, and 0.0 matches −0.0.
//! Opset 1's `classes_strings` and opset 4's `keys_tensor` are refused by name.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::ml::{MAX_VALUES, at, floats};

/// Adds the operator of this module to an ONNX op register.
pub fn register(register: &mut OnnxOpRegister) {
    register.insert("LabelEncoder", label_encoder);
}

/// Values of one of the three element kinds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Column {
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Strings(Vec<String>),
}

impl Column {
    pub(crate) fn len(&self) -> usize {
        match self {
            Column::Ints(v) => v.len(),
            Column::Floats(v) => v.len(),
            Column::Strings(v) => v.len(),
        }
    }

    fn datum_type(&self) -> DatumType {
        match self {
            Column::Ints(_) => i64::datum_type(),
            Column::Floats(_) => f32::datum_type(),
            Column::Strings(_) => String::datum_type(),
        }
    }

    /// Reads `{stem}_int64s`, `{stem}_floats` or `{stem}_strings`: exactly one.
    fn read(node: &NodeProto, stem: &str) -> TractResult<Column> {
        let ints = node.get_attr_opt_vec::<i64>(&format!("{stem}_int64s"))?;
        let strings = node.get_attr_opt_vec::<String>(&format!("{stem}_strings"))?;
        let has_floats = node
            .attribute
            .iter()
            .any(|a| a.name == format!("{stem}_floats"));
        let column = match (ints, has_floats, strings) {
            (Some(v), false, None) => Column::Ints(v),
            (None, true, None) => Column::Floats(floats(node, &format!("{stem}_floats"), true)?),
            (None, false, Some(v)) => Column::Strings(v),
            _ => bail!(
                "{}: exactly one of {stem}_int64s, {stem}_floats and {stem}_strings must be given",
                at(node)
            ),
        };
        ensure!(
            column.len() <= MAX_VALUES,
            "{}: {stem} has {} values, over {MAX_VALUES}",
            at(node),
            column.len()
        );
        Ok(column)
    }

    /// The default of this kind: `default_*`, or the specification's.
    fn default_of(&self, node: &NodeProto) -> TractResult<Column> {
        Ok(match self {
            Column::Ints(_) => Column::Ints(vec![
                node.get_attr_opt::<i64>("default_int64")?.unwrap_or(-1),
            ]),
            Column::Floats(_) => Column::Floats(vec![
                node.get_attr_opt::<f32>("default_float")?.unwrap_or(-0.0),
            ]),
            Column::Strings(_) => Column::Strings(vec![
                node.get_attr_opt::<String>("default_string")?
                    .unwrap_or_else(|| "_Unused".into()),
            ]),
        })
    }

    /// The element at `i` as a tensor of `shape` filled by `pick`.
    fn gather(
        &self,
        shape: &[usize],
        pick: impl Iterator<Item = Option<usize>>,
        default: &Column,
    ) -> TractResult<Tensor> {
        fn build<T: Datum + Clone>(
            shape: &[usize],
            v: &[T],
            d: &T,
            pick: impl Iterator<Item = Option<usize>>,
        ) -> TractResult<Tensor> {
            let out: Vec<T> = pick.map(|i| i.map_or(d, |i| &v[i]).clone()).collect();
            Ok(tract_ndarray::ArrayD::from_shape_vec(shape, out)?.into_tensor())
        }
        match (self, default) {
            (Column::Ints(v), Column::Ints(d)) => build(shape, v, &d[0], pick),
            (Column::Floats(v), Column::Floats(d)) => build(shape, v, &d[0], pick),
            (Column::Strings(v), Column::Strings(d)) => build(shape, v, &d[0], pick),
            _ => bail!("LabelEncoder: the default is not of the values' type"),
        }
    }
}

/// Keys, hashed: floats by their bits (0.0 and −0.0 as one; NaN never).
#[derive(Debug, Clone, PartialEq)]
enum Keys {
    Ints(HashMap<i64, usize>),
    Floats(HashMap<u32, usize>),
    Strings(HashMap<String, usize>),
}

fn float_key(x: f32) -> Option<u32> {
    if x.is_nan() {
        None
    } else if x == 0.0 {
        Some(0)
    } else {
        Some(x.to_bits())
    }
}

impl Keys {
    /// Each element's position among the keys, if it is one (the input has
    /// the keys' element type).
    fn positions(&self, input: &Tensor) -> TractResult<Vec<Option<usize>>> {
        let data = input.try_as_plain_ram()?;
        Ok(match self {
            Keys::Ints(map) => data
                .as_slice::<i64>()?
                .iter()
                .map(|k| map.get(k).copied())
                .collect(),
            Keys::Floats(map) => data
                .as_slice::<f32>()?
                .iter()
                .map(|k| float_key(*k).and_then(|k| map.get(&k).copied()))
                .collect(),
            Keys::Strings(map) => data
                .as_slice::<String>()?
                .iter()
                .map(|k| map.get(k).copied())
                .collect(),
        })
    }

    /// The keys' positions, the first of repeated keys winning (`LabelEncoder`)
    /// or the last (`OneHotEncoder`), as onnxruntime has them.
    fn index(column: &Column, last_wins: bool) -> Keys {
        fn positions<K: std::hash::Hash + Eq>(
            it: impl Iterator<Item = K>,
            last_wins: bool,
        ) -> HashMap<K, usize> {
            let mut map = HashMap::new();
            for (i, k) in it.enumerate() {
                if last_wins {
                    map.insert(k, i);
                } else {
                    map.entry(k).or_insert(i);
                }
            }
            map
        }
        match column {
            Column::Ints(v) => Keys::Ints(positions(v.iter().copied(), last_wins)),
            Column::Floats(v) => Keys::Floats(positions(
                v.iter().map(|x| float_key(*x).unwrap_or(u32::MAX)),
                last_wins,
            )),
            Column::Strings(v) => Keys::Strings(positions(v.iter().cloned(), last_wins)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct LabelEncoder {
    key_type: DatumType,
    keys: Keys,
    values: Column,
    default: Column,
}

impl LabelEncoder {
    fn parse(node: &NodeProto) -> TractResult<LabelEncoder> {
        for old in [
            "classes_strings",
            "keys_tensor",
            "values_tensor",
            "default_tensor",
        ] {
            ensure!(
                !node.attribute.iter().any(|a| a.name == old),
                "{}: attribute {old} (LabelEncoder opset 1 or 4) is not supported; \
                 keys_*/values_* (opset 2 and 3) are",
                at(node)
            );
        }
        let keys = Column::read(node, "keys")?;
        let values = Column::read(node, "values")?;
        ensure!(
            keys.len() == values.len(),
            "{}: keys has {} values and values {}: they must pair up",
            at(node),
            keys.len(),
            values.len()
        );
        Ok(LabelEncoder {
            key_type: keys.datum_type(),
            keys: Keys::index(&keys, false),
            default: values.default_of(node)?,
            values,
        })
    }

    fn eval(&self, input: &Tensor) -> TractResult<Tensor> {
        ensure!(
            input.datum_type() == self.key_type,
            "LabelEncoder: the input is {:?}, the keys are {:?}",
            input.datum_type(),
            self.key_type
        );
        let positions = self.keys.positions(input)?;
        self.values
            .gather(input.shape(), positions.into_iter(), &self.default)
    }
}

/// Wires the one-hot encoding of `input` over `keys`: `[..., k]` in,
/// `[..., k, keys]` f32 out, 1 in the column of the element's key (the last of
/// repeated keys, as onnxruntime's `OneHotEncoder`), zeros for an element of no
/// key. `input` must have the keys' element type.
pub(crate) fn wire_one_hot(
    model: &mut TypedModel,
    name: String,
    input: OutletId,
    keys: &Column,
) -> TractResult<OutletId> {
    let dt = model.outlet_fact(input)?.datum_type;
    ensure!(
        dt == keys.datum_type(),
        "{name}: the input is {dt:?}, the categories are {:?}",
        keys.datum_type()
    );
    let op = OneHotOp(Arc::new(OneHot {
        keys: Keys::index(keys, true),
        width: keys.len(),
    }));
    Ok(model.wire_node(name, op, &[input])?[0])
}

#[derive(Debug, Clone, PartialEq)]
struct OneHot {
    keys: Keys,
    width: usize,
}

#[derive(Debug, Clone)]
struct OneHotOp(Arc<OneHot>);

eq_by_shared_attributes!(OneHotOp);

impl Op for OneHotOp {
    fn name(&self) -> StaticName {
        "EdgefleetOneHot".into()
    }

    op_as_typed_op!();
}

impl EvalOp for OneHotOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        crate::clear_upper_simd_state();
        let input = args_1!(inputs);
        let width = self.0.width;
        let positions = self.0.keys.positions(&input)?;
        let mut out = vec![0f32; positions.len() * width];
        for (i, p) in positions.into_iter().enumerate() {
            if let Some(j) = p {
                out[i * width + j] = 1.0;
            }
        }
        let mut shape: TVec<usize> = input.shape().into();
        shape.push(width);
        Ok(tvec!(
            tract_ndarray::ArrayD::from_shape_vec(&*shape, out)?
                .into_tensor()
                .into_tvalue()
        ))
    }
}

impl TypedOp for OneHotOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        shape.push(self.0.width.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[derive(Debug, Clone)]
struct LabelEncoderOp(Arc<LabelEncoder>);

eq_by_shared_attributes!(LabelEncoderOp);

impl Op for LabelEncoderOp {
    fn name(&self) -> StaticName {
        "EdgefleetLabelEncoder".into()
    }

    op_as_typed_op!();
}

impl EvalOp for LabelEncoderOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        crate::clear_upper_simd_state();
        let input = args_1!(inputs);
        Ok(tvec!(self.0.eval(&input)?.into_tvalue()))
    }
}

impl TypedOp for LabelEncoderOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(
            self.0.values.datum_type().fact(inputs[0].shape.clone())
        ))
    }

    as_op!();
}

#[derive(Debug, Clone)]
struct LabelEncoderNode(Arc<LabelEncoder>);

fn label_encoder(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let encoder = LabelEncoder::parse(node)?;
    Ok((expand(LabelEncoderNode(Arc::new(encoder))), vec![]))
}

impl Expansion for LabelEncoderNode {
    fn name(&self) -> StaticName {
        "LabelEncoder".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, self.0.values.datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut input = inputs[0];
        let dt = model.outlet_fact(input)?.datum_type;
        if dt == TDim::datum_type() && self.0.key_type == i64::datum_type() {
            // tract computes some integer tensors (shapes, indices) as TDim.
            let cast = tract_onnx::tract_core::ops::cast::cast(i64::datum_type());
            input = model.wire_node(format!("{prefix}.to_i64"), cast, &[input])?[0];
        } else {
            ensure!(
                dt == self.0.key_type,
                "{prefix}: LabelEncoder's input is {dt:?}, its keys are {:?}",
                self.0.key_type
            );
        }
        model.wire_node(prefix, LabelEncoderOp(self.0.clone()), &[input])
    }
}

/// tract types the labels of `LinearClassifier` and `TreeEnsembleClassifier`
/// through a default value that strings lack, so a classifier with string
/// labels does not load. This rewrites each one, before parsing, into the same
/// classifier labelled 0..n followed by a `LabelEncoder` from those indices to
/// the strings, under the original output's name: the model's outputs are
/// unchanged.
pub fn index_string_labels(proto: &mut tract_onnx::pb::ModelProto) -> TractResult<()> {
    use tract_onnx::pb::AttributeProto;
    use tract_onnx::pb::attribute_proto::AttributeType;
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(());
    };
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        let ints_name = match node.op_type.as_str() {
            "LinearClassifier" => "classlabels_ints",
            "TreeEnsembleClassifier" => "classlabels_int64s",
            _ => {
                nodes.push(node);
                continue;
            }
        };
        let Some(at_labels) = node
            .attribute
            .iter()
            .position(|a| a.name == "classlabels_strings" && !a.strings.is_empty())
        else {
            nodes.push(node);
            continue;
        };
        let labels = std::mem::take(&mut node.attribute[at_labels].strings);
        ensure!(
            labels.len() <= MAX_VALUES,
            "{}: too many classes",
            at(&node)
        );
        let indices: Vec<i64> = (0..labels.len() as i64).collect();
        node.attribute[at_labels] = AttributeProto {
            name: ints_name.into(),
            r#type: AttributeType::Ints as i32,
            ints: indices.clone(),
            ..Default::default()
        };
        let encoder = match node.output.first_mut() {
            Some(label) if !label.is_empty() => {
                let original = std::mem::replace(label, format!("{label}.edgefleet_class_index"));
                tract_onnx::pb::NodeProto {
                    name: format!("{}.edgefleet_string_labels", node.name),
                    op_type: "LabelEncoder".into(),
                    domain: "ai.onnx.ml".into(),
                    input: vec![label.clone()],
                    output: vec![original],
                    attribute: vec![
                        AttributeProto {
                            name: "keys_int64s".into(),
                            r#type: AttributeType::Ints as i32,
                            ints: indices,
                            ..Default::default()
                        },
                        AttributeProto {
                            name: "values_strings".into(),
                            r#type: AttributeType::Strings as i32,
                            strings: labels,
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }
            }
            _ => {
                nodes.push(node);
                continue;
            }
        };
        nodes.push(node);
        nodes.push(encoder);
    }
    graph.node = nodes;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ints, node, strings};

    #[test]
    fn integers_map_to_strings_with_the_first_duplicate_and_the_default() {
        let enc = LabelEncoder::parse(&node(
            "LabelEncoder",
            "enc",
            vec![
                ints("keys_int64s", vec![1, 2, 1]),
                strings("values_strings", &["one", "two", "uno"]),
            ],
        ))
        .expect("parses");
        let out = enc.eval(&tensor1(&[1i64, 2, 7])).expect("runs");
        let out = out.try_as_plain_ram().expect("tensor");
        assert_eq!(
            out.as_slice::<String>().expect("tensor"),
            &["one", "two", "_Unused"]
        );
        let err = enc.eval(&tensor1(&[1.0f32])).expect_err("wrong key type");
        assert!(err.to_string().contains("the keys are I64"), "{err}");
    }

    #[test]
    fn bad_attributes_are_refused_by_name() {
        for (attrs, words) in [
            (
                vec![
                    ints("keys_int64s", vec![1, 2]),
                    strings("values_strings", &["a"]),
                ],
                "keys has 2 values and values 1",
            ),
            (
                vec![strings("values_strings", &["a"])],
                "exactly one of keys_int64s",
            ),
            (
                vec![strings("classes_strings", &["a"])],
                "attribute classes_strings (LabelEncoder opset 1 or 4) is not supported",
            ),
        ] {
            let err = LabelEncoder::parse(&node("LabelEncoder", "enc", attrs)).expect_err(words);
            let err = err.to_string();
            assert!(
                err.contains("LabelEncoder \"enc\"") && err.contains(words),
                "{err}"
            );
        }
    }
}
