//! A compact evaluator for the ONNX-ML tree ensembles that tract runs slowly.
//!
//! tract 0.23.9 evaluates `TreeEnsembleClassifier` by walking each tree through a
//! generic node decoder that builds an error value per leaf visit, and by skipping
//! through the leaves array from its start for every leaf reached (measured here:
//! 340-600x onnxruntime's time on a 100-tree random forest; ../shared/models/README.md).
//! After typing, [`accelerate`] replaces each such node with [`CompactTrees`]: the
//! same trees, nodes and leaves, decoded once into flat arrays and walked directly.
//! Results are identical to tract's (same aggregation); the graph around the node
//! (base values, softmax, labels) is untouched.
//!
//! tract cannot parse `TreeEnsembleRegressor` at all; [`regressor`] adds a parser
//! that builds the same evaluator from the ONNX node's attributes.

/// Equality for an operator that holds its parsed attributes in an `Arc`: the
/// same allocation, or equal attributes. Attributes hold no NaN where they are
/// compared as numbers (refused when parsed), so this is reflexive in practice;
/// where one could (a `LabelEncoder` value), a copy compares unequal, which
/// costs at most a missed merge of identical nodes.
macro_rules! eq_by_shared_attributes {
    ($($op:ty),+) => {$(
        impl PartialEq for $op {
            fn eq(&self, other: &Self) -> bool {
                std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
            }
        }
        impl Eq for $op {}
    )+};
}

/// Clears the upper halves of the AVX registers (`vzeroupper`) where the CPU has
/// them. tract-linalg's x86-64 kernels (MatMul, element-wise ops) return with
/// those halves dirty; until something clears them, every SSE instruction that
/// follows pays a state-merge penalty. Measured here: an RBF SVM with 442
/// support vectors ran in 3.6 µs alone and in 67 µs after a tract MatMul in the
/// same thread (docs/benchmarks.md). Our operators call this on entry, the
/// agent after each inference.
#[allow(unsafe_code)]
pub fn clear_upper_simd_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above). `vzeroupper` zeroes bits
        // 128 and up of the vector registers; no value of ours lives there
        // between statements (the compiler saves nothing across this call in them).
        unsafe { std::arch::x86_64::_mm256_zeroupper() }
    }
}

pub mod barrier;
pub mod encoder;
pub mod logsumexp;
pub mod ml;
pub mod regressor;
pub mod svm;
#[cfg(test)]
mod testing;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx_opl::ml::tree::{Aggregate, Cmp, TreeEnsemble};
use tract_onnx_opl::ml::tree_ensemble_classifier::TreeEnsembleClassifier;

/// How leaf weights combine per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Combine {
    Sum,
    /// tract's classifier average: the sum over the weights that reached a class.
    Avg,
    /// tract's classifier max/min: starting from 0.
    Max,
    Min,
    /// The regressors' `AVERAGE` (ONNX-ML, onnxruntime): the sum over the number
    /// of trees.
    MeanOfTrees,
    /// The regressors' `MAX`/`MIN`: over the weights that reached a target, 0 when
    /// none did.
    MaxOfHits,
    MinOfHits,
}

/// One decoded node: a comparison (`cmp`, one of the codes below)
/// or a leaf (`cmp` == `LEAF`) whose weights are `leaves[a..b]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Node {
    cmp: u8,
    nan_is_true: bool,
    feature: u32,
    /// Threshold, as f32 bits (so the op can be hashed and compared).
    value: u32,
    /// Branch: next node when the comparison holds. Leaf: first weight.
    a: u32,
    /// Branch: next node otherwise. Leaf: end of the weights.
    b: u32,
}

/// The replacement operator: a tree ensemble in flat arrays.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompactTrees {
    roots: Vec<u32>,
    nodes: Vec<Node>,
    /// (class, weight as f32 bits).
    leaves: Vec<(u32, u32)>,
    n_classes: usize,
    n_features: usize,
    combine: Combine,
}

/// Comparison codes of [`Node::cmp`]: tract's own (`Cmp as u8`), so nodes decoded
/// from tract's ensembles and those our regressor parser builds agree; 0 is a leaf.
const LEAF: u8 = 0;
const EQ: u8 = Cmp::Equal as u8;
const NEQ: u8 = Cmp::NotEqual as u8;
const LT: u8 = Cmp::Less as u8;
const GT: u8 = Cmp::Greater as u8;
const LEQ: u8 = Cmp::LessEqual as u8;
const GTE: u8 = Cmp::GreaterEqual as u8;

impl CompactTrees {
    /// Decodes tract's ensemble, checking every index so evaluation cannot go out
    /// of bounds (a model is signed, but its content is still input).
    pub fn from_ensemble(e: &TreeEnsemble) -> TractResult<CompactTrees> {
        let roots = e.data.trees.try_as_plain_ram()?.as_slice::<u32>()?.to_vec();
        let raw = e.data.nodes.try_as_plain_ram()?.as_slice::<u32>()?;
        let raw_leaves = e.data.leaves.try_as_plain_ram()?.as_slice::<u32>()?;
        let leaves: Vec<(u32, u32)> = raw_leaves.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        let mut nodes = Vec::with_capacity(raw.len() / 5);
        for row in raw.chunks_exact(5) {
            let cmp = (row[4] & 0xff) as u8;
            nodes.push(if (EQ..=GTE).contains(&cmp) {
                Node {
                    cmp,
                    nan_is_true: row[4] & 0x100 != 0,
                    feature: row[0],
                    value: row[3],
                    a: row[1],
                    b: row[2],
                }
            } else {
                Node {
                    cmp: LEAF,
                    nan_is_true: false,
                    feature: 0,
                    value: 0,
                    a: row[0],
                    b: row[1],
                }
            });
        }
        let n_features = e.max_used_feature + 1;
        for (i, n) in nodes.iter().enumerate() {
            let ok = if n.cmp == LEAF {
                n.a <= n.b && (n.b as usize) <= leaves.len()
            } else {
                (n.a as usize) < nodes.len()
                    && (n.b as usize) < nodes.len()
                    && (n.feature as usize) < n_features
            };
            if !ok {
                bail!("tree ensemble node {i} points outside the ensemble");
            }
        }
        if roots.iter().any(|r| *r as usize >= nodes.len()) {
            bail!("tree ensemble has a root outside its nodes");
        }
        if leaves.iter().any(|(c, _)| *c as usize >= e.n_classes) {
            bail!("tree ensemble has a leaf for a class it does not have");
        }
        Ok(CompactTrees {
            roots,
            nodes,
            leaves,
            n_classes: e.n_classes,
            n_features,
            combine: match e.aggregate_fn {
                Aggregate::Sum => Combine::Sum,
                Aggregate::Avg => Combine::Avg,
                Aggregate::Max => Combine::Max,
                Aggregate::Min => Combine::Min,
            },
        })
    }

    /// The leaf a row reaches in the tree rooted at `root`. A walk longer than the
    /// number of nodes means a cycle: an error, not a hang.
    fn leaf(&self, root: u32, x: &[f32]) -> TractResult<Node> {
        let mut id = root as usize;
        for _ in 0..=self.nodes.len() {
            let n = self.nodes[id];
            if n.cmp == LEAF {
                return Ok(n);
            }
            let v = x[n.feature as usize];
            let t = f32::from_bits(n.value);
            let go_true = if v.is_nan() {
                n.nan_is_true
            } else if n.cmp == LEQ {
                // By far the most common mode (scikit-learn exports only this one).
                v <= t
            } else {
                match n.cmp {
                    EQ => v == t,
                    NEQ => v != t,
                    LT => v < t,
                    GT => v > t,
                    _ => v >= t,
                }
            };
            id = if go_true { n.a } else { n.b } as usize;
        }
        bail!("tree ensemble has a cycle")
    }

    /// Scores `[rows, n_classes]` for `rows` rows of `width` features.
    pub fn eval_rows(&self, input: &[f32], width: usize) -> TractResult<Vec<f32>> {
        if width < self.n_features {
            bail!(
                "tree ensemble input has {width} features, the trees use {}",
                self.n_features
            );
        }
        let rows = input.len() / width.max(1);
        let mut out = vec![0f32; rows * self.n_classes];
        let mut counts = vec![0u32; self.n_classes];
        for (x, scores) in input
            .chunks_exact(width)
            .zip(out.chunks_exact_mut(self.n_classes))
        {
            counts.iter_mut().for_each(|c| *c = 0);
            for root in &self.roots {
                let leaf = self.leaf(*root, x)?;
                for (class, w) in &self.leaves[leaf.a as usize..leaf.b as usize] {
                    let (c, w) = (*class as usize, f32::from_bits(*w));
                    match self.combine {
                        Combine::Sum | Combine::MeanOfTrees => scores[c] += w,
                        Combine::Avg => {
                            scores[c] += w;
                            counts[c] += 1;
                        }
                        Combine::Max => scores[c] = scores[c].max(w),
                        Combine::Min => scores[c] = scores[c].min(w),
                        Combine::MaxOfHits | Combine::MinOfHits => {
                            let max = self.combine == Combine::MaxOfHits;
                            scores[c] = match counts[c] {
                                0 => w,
                                _ if max => scores[c].max(w),
                                _ => scores[c].min(w),
                            };
                            counts[c] += 1;
                        }
                    }
                }
            }
            match self.combine {
                Combine::Avg => {
                    for (s, c) in scores.iter_mut().zip(&counts) {
                        if *c > 1 {
                            *s /= *c as f32;
                        }
                    }
                }
                Combine::MeanOfTrees => {
                    let trees = self.roots.len() as f32;
                    scores.iter_mut().for_each(|s| *s /= trees);
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

impl Op for CompactTrees {
    fn name(&self) -> StaticName {
        "EdgefleetCompactTrees".into()
    }

    op_as_typed_op!();
}

impl EvalOp for CompactTrees {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        clear_upper_simd_state();
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let shape = input.shape().to_vec();
        let (rows, width) = match shape.as_slice() {
            [rows, width] => (*rows, *width),
            other => bail!("tree ensemble input must be [rows, features], got {other:?}"),
        };
        let data = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let out = self.eval_rows(data, width)?;
        Ok(tvec!(
            Tensor::from_shape(&[rows, self.n_classes], &out)?.into_tvalue()
        ))
    }
}

impl TypedOp for CompactTrees {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = &inputs[0].shape[0];
        Ok(tvec!(f32::fact(&[n.clone(), self.n_classes.into()])))
    }

    as_op!();
}

/// Replaces every tract tree-ensemble node of a typed model with [`CompactTrees`],
/// and corrects the labels of binary classifiers (see [`fix_binary_labels`]);
/// returns how many ensembles were replaced.
pub fn accelerate(model: &mut TypedModel) -> TractResult<usize> {
    fix_binary_labels(model)?;
    let targets: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_as::<TreeEnsembleClassifier>().is_some())
        .map(|n| n.id)
        .collect();
    for id in &targets {
        let node = model.node(*id);
        let Some(op) = node.op_as::<TreeEnsembleClassifier>() else {
            continue;
        };
        let compact = CompactTrees::from_ensemble(&op.ensemble)?;
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, compact)?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tract_onnx_opl::ml::tree::TreeEnsembleData;

    /// Two trees over 3 features and 2 classes, the comparison modes tract decodes
    /// (1-5: tract 0.23.9 reads mode 6, BRANCH_GTE, as a leaf), NaN going either way.
    fn ensemble(aggregate: Aggregate) -> TreeEnsemble {
        let branch = |cmp: u32, feat: u32, v: f32, t: u32, f: u32, nan: bool| {
            [feat, t, f, v.to_bits(), cmp | if nan { 0x100 } else { 0 }]
        };
        let leaf = |start: u32, end: u32| [start, end, 0, 0, 0];
        let rows: Vec<[u32; 5]> = vec![
            // tree 0: nodes 0..5
            branch(5, 0, 0.5, 1, 2, true),   // x0 <= 0.5
            branch(3, 1, -1.0, 3, 4, false), // x1 < -1
            leaf(0, 1),
            leaf(1, 2),
            leaf(2, 4),
            // tree 1: nodes 5..10
            branch(2, 2, 0.0, 6, 7, false), // x2 != 0
            leaf(4, 5),
            branch(4, 0, 2.0, 8, 9, true), // x0 > 2
            leaf(5, 6),
            branch(1, 1, 3.0, 10, 11, false), // x1 == 3
            leaf(6, 7),
            leaf(7, 8),
        ];
        let leaves: Vec<u32> = [
            (0u32, 0.3f32),
            (1, 0.7),
            (0, -0.2),
            (0, 1.5),
            (1, 0.25),
            (1, 2.0),
            (0, 0.125),
            (1, -0.5),
        ]
        .iter()
        .flat_map(|(c, w)| [*c, w.to_bits()])
        .collect();
        let nodes: Vec<u32> = rows.concat();
        let data = TreeEnsembleData {
            trees: rctensor1(&[0u32, 5]),
            nodes: tensor1(&nodes)
                .into_shape(&[nodes.len() / 5, 5])
                .expect("shape")
                .into_arc_tensor(),
            leaves: tensor1(&leaves)
                .into_shape(&[leaves.len() / 2, 2])
                .expect("shape")
                .into_arc_tensor(),
        };
        TreeEnsemble::build(data, 2, 2, aggregate).expect("ensemble")
    }

    fn values() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(f32::NAN),
            Just(0.5f32),
            Just(-1.0),
            Just(0.0),
            Just(2.0),
            Just(3.0),
            -4.0f32..4.0
        ]
    }

    proptest! {
        #[test]
        fn the_compact_evaluator_agrees_with_tract_on_every_mode_and_nan(
            rows in proptest::collection::vec(proptest::collection::vec(values(), 3), 1..20),
            agg in 0usize..4,
        ) {
            let aggregate = [Aggregate::Sum, Aggregate::Avg, Aggregate::Max, Aggregate::Min][agg];
            let e = ensemble(aggregate);
            let compact = CompactTrees::from_ensemble(&e).expect("decodes");
            let flat: Vec<f32> = rows.concat();
            let input = tract_ndarray::Array2::from_shape_vec((rows.len(), 3), flat.clone())
                .expect("array");
            let expected = e.eval(input.view().into_dyn()).expect("tract evaluates");
            let got = compact.eval_rows(&flat, 3).expect("evaluates");
            let expected: Vec<f32> = expected.iter().copied().collect();
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn a_cycle_or_an_index_outside_the_ensemble_is_an_error_not_a_hang() {
        let e = ensemble(Aggregate::Sum);
        let mut compact = CompactTrees::from_ensemble(&e).expect("decodes");
        // Point node 2 (a leaf) back at the root as a branch: a cycle.
        compact.nodes[2] = Node {
            cmp: LEQ,
            nan_is_true: true,
            feature: 0,
            value: 1f32.to_bits(),
            a: 0,
            b: 0,
        };
        assert!(compact.eval_rows(&[0.9, 0.0, 0.0], 3).is_err());
        let mut bad = ensemble(Aggregate::Sum);
        let mut nodes = bad
            .data
            .nodes
            .try_as_plain_ram()
            .expect("ram")
            .as_slice::<u32>()
            .expect("u32")
            .to_vec();
        nodes[1] = 99;
        bad.data.nodes = tensor1(&nodes)
            .into_shape(&[nodes.len() / 5, 5])
            .expect("shape")
            .into_arc_tensor();
        assert!(CompactTrees::from_ensemble(&bad).is_err());
        assert!(
            compact.eval_rows(&[0.0, 0.0], 2).is_err(),
            "too few features"
        );
    }
}

#[cfg(test)]
mod forest_tests {
    use super::*;

    #[test]
    fn on_a_real_forest_the_compact_evaluator_gives_tracts_scores() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/forest_cancer.onnx");
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .expect("parses")
            .with_input_fact(0, f32::fact([8, 30]).into())
            .expect("fact")
            .into_typed()
            .expect("types");
        let node = model
            .nodes()
            .iter()
            .find(|n| n.op_as::<TreeEnsembleClassifier>().is_some())
            .expect("a tree node");
        let op = node.op_as::<TreeEnsembleClassifier>().expect("op");
        let compact = CompactTrees::from_ensemble(&op.ensemble).expect("decodes");
        let expected: serde_json::Value = serde_json::from_slice(
            &std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../models/forest_cancer.expected.json"
            ))
            .expect("json"),
        )
        .expect("json");
        let rows: Vec<Vec<f32>> =
            serde_json::from_value(expected["features"].clone()).expect("rows");
        let flat: Vec<f32> = rows.concat();
        let input =
            tract_ndarray::Array2::from_shape_vec((rows.len(), 30), flat.clone()).expect("array");
        let tract: Vec<f32> = op
            .ensemble
            .eval(input.view().into_dyn())
            .expect("tract")
            .iter()
            .copied()
            .collect();
        let ours = compact.eval_rows(&flat, 30).expect("ours");
        assert_eq!(ours, tract);
    }
}

/// tract 0.23.9 bug: for a binary classifier whose leaves score one class only
/// (scikit-learn's random forests, via skl2onnx), tract builds the probabilities
/// as `[1 - s, s]` but takes the label from the arg-max of `[s, 0]`, so every row
/// gets the first label. This rewires the arg-max (`<prefix>.argmax`) to read the
/// probabilities (`<prefix>.binary_result`), as onnxruntime does. Node names are
/// tract's own, pinned with the tract version; the forest test checks the labels
/// against onnxruntime's.
pub fn fix_binary_labels(model: &mut TypedModel) -> TractResult<usize> {
    let mut fixed = 0;
    let pairs: Vec<(usize, usize)> = model
        .nodes()
        .iter()
        .filter_map(|n| {
            let prefix = n.name.strip_suffix(".argmax")?;
            let binary = model
                .nodes()
                .iter()
                .find(|m| m.name == format!("{prefix}.binary_result"))?;
            Some((n.id, binary.id))
        })
        .collect();
    for (argmax, binary) in pairs {
        let node = model.node(argmax);
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(model, OutletId::new(binary, 0))?;
        let new = patch.wire_node(&node.name, node.op.clone(), &[input])?;
        patch.shunt_outside(model, OutletId::new(argmax, 0), new[0])?;
        patch.apply(model)?;
        fixed += 1;
    }
    Ok(fixed)
}
