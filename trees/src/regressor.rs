//! ONNX-ML `TreeEnsembleRegressor`, which tract 0.23.9 cannot parse: gradient
//! boosting and random forest regressors as scikit-learn, XGBoost and LightGBM
//! export them. [`register`] adds a parser to tract's ONNX front end that reads the
//! node's attributes into [`CompactTrees`], validating every index, so the model
//! then loads, optimises and runs like any other.
//!
//! Semantics follow the ONNX-ML specification as onnxruntime implements it:
//! `SUM` adds the leaf weights of every tree, `AVERAGE` divides that sum by the
//! number of trees, `MIN`/`MAX` keep the smallest/largest weight that reached a
//! target (0 when no tree did), and `base_values` are added last. A missing value
//! (NaN) takes the true branch when `nodes_missing_value_tracks_true` says so, and
//! is otherwise compared like any value (so only `BRANCH_NEQ` is true for it).
//! `post_transform` must be `NONE` (what regressors export); double-precision
//! trees (`*_as_tensor` attributes) are refused by name.

use super::{Combine, CompactTrees, EQ, GT, GTE, LEAF, LEQ, LT, NEQ, Node};
use std::collections::HashMap;
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// Most nodes, leaf entries or targets one ensemble may have: far above any model
/// the agent's size limit admits, low enough that indices fit in `u32`.
const MAX_ITEMS: usize = 1 << 26;

/// Adds `TreeEnsembleRegressor` to an ONNX op register.
pub fn register(register: &mut OnnxOpRegister) {
    register.insert("TreeEnsembleRegressor", parse);
}

/// A `TreeEnsembleRegressor` node's attributes, as the specification names them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegressorAttributes {
    pub n_targets: i64,
    pub aggregate_function: String,
    pub base_values: Vec<f32>,
    pub nodes_treeids: Vec<i64>,
    pub nodes_nodeids: Vec<i64>,
    pub nodes_featureids: Vec<i64>,
    pub nodes_modes: Vec<String>,
    pub nodes_values: Vec<f32>,
    pub nodes_truenodeids: Vec<i64>,
    pub nodes_falsenodeids: Vec<i64>,
    /// Empty, or one 0/1 per node.
    pub nodes_missing_value_tracks_true: Vec<i64>,
    pub target_treeids: Vec<i64>,
    pub target_nodeids: Vec<i64>,
    pub target_ids: Vec<i64>,
    pub target_weights: Vec<f32>,
}

fn parse(
    _ctx: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let (trees, base_values) = read_attributes(node)
        .and_then(|attrs| compile(&attrs))
        .with_context(|| format!("TreeEnsembleRegressor {:?}", node.name))?;
    Ok((
        expand(TreeEnsembleRegressor {
            trees,
            base_values: base_values.iter().map(|v| v.to_bits()).collect(),
        }),
        vec![],
    ))
}

fn read_attributes(node: &NodeProto) -> TractResult<RegressorAttributes> {
    for name in [
        "nodes_values_as_tensor",
        "target_weights_as_tensor",
        "base_values_as_tensor",
    ] {
        if node.attribute.iter().any(|a| a.name == name) {
            bail!(
                "attribute {name}: double-precision trees are not supported; export with float thresholds and weights"
            );
        }
    }
    let post_transform: &str = node.get_attr_opt("post_transform")?.unwrap_or("NONE");
    if post_transform != "NONE" {
        bail!(
            "attribute post_transform is {post_transform:?}; only NONE is supported for regressors"
        );
    }
    let ints = |name: &str| -> TractResult<Vec<i64>> {
        Ok(node
            .get_attr_opt_slice::<i64>(name)?
            .map(<[i64]>::to_vec)
            .unwrap_or_default())
    };
    let floats = |name: &str| -> TractResult<Vec<f32>> {
        Ok(node
            .get_attr_opt_slice::<f32>(name)?
            .map(<[f32]>::to_vec)
            .unwrap_or_default())
    };
    Ok(RegressorAttributes {
        n_targets: node.get_attr_opt::<i64>("n_targets")?.unwrap_or(1),
        aggregate_function: node
            .get_attr_opt::<&str>("aggregate_function")?
            .unwrap_or("SUM")
            .to_string(),
        base_values: floats("base_values")?,
        nodes_treeids: ints("nodes_treeids")?,
        nodes_nodeids: ints("nodes_nodeids")?,
        nodes_featureids: ints("nodes_featureids")?,
        nodes_modes: node
            .get_attr_opt_tvec::<&str>("nodes_modes")?
            .map(|v| v.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default(),
        nodes_values: floats("nodes_values")?,
        nodes_truenodeids: ints("nodes_truenodeids")?,
        nodes_falsenodeids: ints("nodes_falsenodeids")?,
        nodes_missing_value_tracks_true: ints("nodes_missing_value_tracks_true")?,
        target_treeids: ints("target_treeids")?,
        target_nodeids: ints("target_nodeids")?,
        target_ids: ints("target_ids")?,
        target_weights: floats("target_weights")?,
    })
}

/// Our comparison codes (see [`Node`]), from the specification's mode names.
fn mode_code(mode: &str) -> Option<u8> {
    Some(match mode {
        "LEAF" => LEAF,
        "BRANCH_EQ" => EQ,
        "BRANCH_NEQ" => NEQ,
        "BRANCH_LT" => LT,
        "BRANCH_GT" => GT,
        "BRANCH_LEQ" => LEQ,
        "BRANCH_GTE" => GTE,
        _ => return None,
    })
}

fn index(attr: &str, i: usize, v: i64) -> TractResult<u32> {
    u32::try_from(v)
        .ok()
        .filter(|v| (*v as usize) < MAX_ITEMS)
        .with_context(|| format!("attribute {attr}[{i}] is {v}, not an index"))
}

/// Each node's position in the evaluator's order, by (tree id, node id).
type Positions = HashMap<(i64, i64), u32>;

/// Checks the attributes and builds the evaluator and the base values (one per
/// target, zeros when absent). Every error names the attribute and position.
pub fn compile(a: &RegressorAttributes) -> TractResult<(CompactTrees, Vec<f32>)> {
    let (n_targets, combine, base_values) = check_targets(a)?;
    check_lengths(a)?;
    let (order, position) = node_order(a)?;
    let (mut nodes, parent, n_features) = branches(a, &order, &position)?;
    let roots = roots(a, &order, &parent)?;
    let leaves = attach_leaves(a, &position, &mut nodes, n_targets)?;
    Ok((
        CompactTrees {
            roots,
            nodes,
            leaves,
            n_classes: n_targets,
            n_features,
            combine,
        },
        base_values,
    ))
}

/// The number of targets, how trees combine, and the base values.
fn check_targets(a: &RegressorAttributes) -> TractResult<(usize, Combine, Vec<f32>)> {
    let n_targets = usize::try_from(a.n_targets)
        .ok()
        .filter(|n| (1..=MAX_ITEMS).contains(n))
        .with_context(|| format!("attribute n_targets is {}, not a count", a.n_targets))?;
    let combine = match a.aggregate_function.as_str() {
        "SUM" => Combine::Sum,
        "AVERAGE" => Combine::MeanOfTrees,
        "MIN" => Combine::MinOfHits,
        "MAX" => Combine::MaxOfHits,
        other => bail!("attribute aggregate_function is {other:?}, not SUM, AVERAGE, MIN or MAX"),
    };
    let base_values = match a.base_values.len() {
        0 => vec![0.0; n_targets],
        n if n == n_targets => a.base_values.clone(),
        n => bail!("attribute base_values has {n} values for {n_targets} targets"),
    };
    Ok((n_targets, combine, base_values))
}

/// Every per-node attribute has one entry per node, every per-target one per
/// target, within [`MAX_ITEMS`].
fn check_lengths(a: &RegressorAttributes) -> TractResult<()> {
    let n = a.nodes_treeids.len();
    if n == 0 || n > MAX_ITEMS {
        bail!("attribute nodes_treeids has {n} nodes");
    }
    for (name, len) in [
        ("nodes_nodeids", a.nodes_nodeids.len()),
        ("nodes_featureids", a.nodes_featureids.len()),
        ("nodes_modes", a.nodes_modes.len()),
        ("nodes_values", a.nodes_values.len()),
        ("nodes_truenodeids", a.nodes_truenodeids.len()),
        ("nodes_falsenodeids", a.nodes_falsenodeids.len()),
    ] {
        if len != n {
            bail!("attribute {name} has {len} entries, nodes_treeids has {n}");
        }
    }
    let tracks = a.nodes_missing_value_tracks_true.len();
    if tracks != 0 && tracks != n {
        bail!("attribute nodes_missing_value_tracks_true has {tracks} entries for {n} nodes");
    }
    if let Some((i, v)) =
        (a.nodes_missing_value_tracks_true.iter().enumerate()).find(|(_, v)| !matches!(v, 0 | 1))
    {
        bail!("attribute nodes_missing_value_tracks_true[{i}] is {v}, not 0 or 1");
    }
    let m = a.target_ids.len();
    if m > MAX_ITEMS {
        bail!("attribute target_ids has {m} entries");
    }
    for (name, len) in [
        ("target_treeids", a.target_treeids.len()),
        ("target_nodeids", a.target_nodeids.len()),
        ("target_weights", a.target_weights.len()),
    ] {
        if len != m {
            bail!("attribute {name} has {len} entries, target_ids has {m}");
        }
    }
    Ok(())
}

/// Nodes in (tree, node id) order, each tree's nodes together, and each
/// node's position in that order.
fn node_order(a: &RegressorAttributes) -> TractResult<(Vec<usize>, Positions)> {
    let n = a.nodes_treeids.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (a.nodes_treeids[i], a.nodes_nodeids[i]));
    let mut position: HashMap<(i64, i64), u32> = HashMap::with_capacity(n);
    for (p, &i) in order.iter().enumerate() {
        let key = (a.nodes_treeids[i], a.nodes_nodeids[i]);
        if position.insert(key, p as u32).is_some() {
            bail!(
                "node {} of tree {} is defined twice (nodes_nodeids[{i}])",
                key.1,
                key.0
            );
        }
    }
    Ok((order, position))
}

/// The nodes in order: branches with their children (each node has at most
/// one parent), leaves still without weights; each node's parent; the
/// features read.
fn branches(
    a: &RegressorAttributes,
    order: &[usize],
    position: &Positions,
) -> TractResult<(Vec<Node>, Vec<Option<u32>>, usize)> {
    let n = order.len();
    let child = |attr: &str, i: usize, id: i64| -> TractResult<u32> {
        position
            .get(&(a.nodes_treeids[i], id))
            .copied()
            .with_context(|| {
                format!(
                    "attribute {attr}[{i}] points to node {id}, which tree {} does not have",
                    a.nodes_treeids[i]
                )
            })
    };
    let mut nodes = Vec::with_capacity(n);
    let mut parent: Vec<Option<u32>> = vec![None; n];
    let mut n_features = 0usize;
    for (p, &i) in order.iter().enumerate() {
        let cmp = mode_code(&a.nodes_modes[i]).with_context(|| {
            format!(
                "attribute nodes_modes[{i}] is {:?}, not a mode",
                a.nodes_modes[i]
            )
        })?;
        if cmp == LEAF {
            // Weights are attached below, once all leaves are known.
            nodes.push(Node {
                cmp: LEAF,
                nan_is_true: false,
                feature: 0,
                value: 0,
                a: 0,
                b: 0,
            });
            continue;
        }
        let feature = index("nodes_featureids", i, a.nodes_featureids[i])?;
        n_features = n_features.max(feature as usize + 1);
        let yes = child("nodes_truenodeids", i, a.nodes_truenodeids[i])?;
        let no = child("nodes_falsenodeids", i, a.nodes_falsenodeids[i])?;
        for c in [yes, no] {
            match parent[c as usize] {
                Some(q) if q != p as u32 => bail!(
                    "node {} of tree {} has two parents",
                    a.nodes_nodeids[order[c as usize]],
                    a.nodes_treeids[i]
                ),
                _ => parent[c as usize] = Some(p as u32),
            }
        }
        let tracks_true = a.nodes_missing_value_tracks_true.get(i) == Some(&1);
        nodes.push(Node {
            cmp,
            // NaN != t holds: BRANCH_NEQ sends a missing value to the true branch
            // whatever the flag says (as onnxruntime compares).
            nan_is_true: tracks_true || cmp == NEQ,
            feature,
            value: a.nodes_values[i].to_bits(),
            a: yes,
            b: no,
        });
    }
    Ok((nodes, parent, n_features))
}

/// One root per tree: the one node no branch points to. With every other node
/// having exactly one parent, nothing reachable from a root can loop.
fn roots(
    a: &RegressorAttributes,
    order: &[usize],
    parent: &[Option<u32>],
) -> TractResult<Vec<u32>> {
    let n = order.len();
    let mut roots = Vec::new();
    let mut start = 0;
    while start < n {
        let tree = a.nodes_treeids[order[start]];
        let end = start
            + order[start..]
                .iter()
                .take_while(|&&i| a.nodes_treeids[i] == tree)
                .count();
        let tops: Vec<usize> = (start..end).filter(|&p| parent[p].is_none()).collect();
        match tops.as_slice() {
            [root] => roots.push(*root as u32),
            [] => bail!("tree {tree} has no root: every node is some branch's child"),
            _ => bail!(
                "tree {tree} has {} nodes no branch points to (nodes {} and {}), not one root",
                tops.len(),
                a.nodes_nodeids[order[tops[0]]],
                a.nodes_nodeids[order[tops[1]]]
            ),
        }
        start = end;
    }
    Ok(roots)
}

/// Leaf weights, grouped by the leaf they belong to: each leaf node's `a..b`
/// indexes its (target, weight) pairs.
fn attach_leaves(
    a: &RegressorAttributes,
    position: &Positions,
    nodes: &mut [Node],
    n_targets: usize,
) -> TractResult<Vec<(u32, u32)>> {
    let m = a.target_ids.len();
    let mut entries: Vec<(u32, u32, u32)> = Vec::with_capacity(m);
    for j in 0..m {
        let leaf = position
            .get(&(a.target_treeids[j], a.target_nodeids[j]))
            .copied()
            .with_context(|| {
                format!(
                    "target {j} names node {} of tree {}, which does not exist",
                    a.target_nodeids[j], a.target_treeids[j]
                )
            })?;
        if nodes[leaf as usize].cmp != LEAF {
            bail!(
                "target {j} gives a weight to node {} of tree {}, which is a branch, not a leaf",
                a.target_nodeids[j],
                a.target_treeids[j]
            );
        }
        let target = index("target_ids", j, a.target_ids[j])?;
        if target as usize >= n_targets {
            bail!("attribute target_ids[{j}] is {target}, the model has {n_targets} targets");
        }
        entries.push((leaf, target, a.target_weights[j].to_bits()));
    }
    entries.sort_by_key(|e| e.0);
    let leaves: Vec<(u32, u32)> = entries.iter().map(|e| (e.1, e.2)).collect();
    let mut next = 0usize;
    for (p, node) in nodes.iter_mut().enumerate() {
        if node.cmp != LEAF {
            continue;
        }
        let first = next;
        while next < entries.len() && entries[next].0 as usize == p {
            next += 1;
        }
        node.a = first as u32;
        node.b = next as u32;
    }
    Ok(leaves)
}

/// The ONNX node before typing: the trees, then `base_values` added as a constant.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct TreeEnsembleRegressor {
    trees: CompactTrees,
    /// One per target, as f32 bits.
    base_values: Vec<u32>,
}

impl Expansion for TreeEnsembleRegressor {
    fn name(&self) -> StaticName {
        "TreeEnsembleRegressor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], self.trees.n_classes.to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?;
        if let Some(width) = (fact.shape.get(1))
            .and_then(|d| d.to_usize().ok())
            .filter(|w| *w < self.trees.n_features)
        {
            bail!(
                "{prefix}: the input has {width} features, the trees use {}",
                self.trees.n_features
            );
        }
        let scores = model.wire_node(format!("{prefix}.trees"), self.trees.clone(), inputs)?;
        if self.base_values.iter().all(|b| f32::from_bits(*b) == 0.0) {
            return Ok(scores);
        }
        let base: Vec<f32> = self
            .base_values
            .iter()
            .map(|b| f32::from_bits(*b))
            .collect();
        let base = tensor1(&base)
            .into_shape(&[1, base.len()])?
            .into_arc_tensor();
        let base = model.add_const(format!("{prefix}.base_values"), base)?;
        model.wire_node(
            format!("{prefix}.add_base_values"),
            tract_onnx::tract_core::ops::math::add(),
            &[scores[0], base],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MODES: [&str; 6] = [
        "BRANCH_EQ",
        "BRANCH_NEQ",
        "BRANCH_LT",
        "BRANCH_GT",
        "BRANCH_LEQ",
        "BRANCH_GTE",
    ];

    /// A tree described recursively; flattened into attributes with shuffled ids.
    #[derive(Debug, Clone)]
    enum Tree {
        Leaf(Vec<(u32, f32)>),
        Branch {
            mode: usize,
            feature: u32,
            value: f32,
            tracks_true: bool,
            yes: Box<Tree>,
            no: Box<Tree>,
        },
    }

    fn tree(n_targets: u32, n_features: u32) -> impl Strategy<Value = Tree> {
        let weight = prop_oneof![Just(0.5f32), Just(-1.25), -3.0f32..3.0];
        let leaf = proptest::collection::vec((0..n_targets, weight), 0..3).prop_map(Tree::Leaf);
        leaf.prop_recursive(5, 40, 2, move |inner| {
            (
                0..6usize,
                0..n_features,
                prop_oneof![Just(0.0f32), Just(1.0), -2.0f32..2.0],
                any::<bool>(),
                inner.clone(),
                inner,
            )
                .prop_map(|(mode, feature, value, tracks_true, yes, no)| {
                    Tree::Branch {
                        mode,
                        feature,
                        value,
                        tracks_true,
                        yes: Box::new(yes),
                        no: Box::new(no),
                    }
                })
        })
    }

    /// Appends `t` as tree `tree_id`; node ids are `salt`-scrambled so they are
    /// neither dense nor in order. Returns the node id given to `t`'s top.
    fn flatten(
        t: &Tree,
        tree_id: i64,
        salt: i64,
        next: &mut i64,
        a: &mut RegressorAttributes,
    ) -> i64 {
        let id = (*next * 7 + salt) % 1009;
        *next += 1;
        let (mode, feature, value, yes, no, tracks) = match t {
            Tree::Leaf(weights) => {
                for (target, w) in weights {
                    a.target_treeids.push(tree_id);
                    a.target_nodeids.push(id);
                    a.target_ids.push(*target as i64);
                    a.target_weights.push(*w);
                }
                ("LEAF".to_string(), 0, 0.0, 0, 0, 0)
            }
            Tree::Branch {
                mode,
                feature,
                value,
                tracks_true,
                yes,
                no,
            } => {
                let y = flatten(yes, tree_id, salt, next, a);
                let n = flatten(no, tree_id, salt, next, a);
                (
                    MODES[*mode].to_string(),
                    *feature as i64,
                    *value,
                    y,
                    n,
                    *tracks_true as i64,
                )
            }
        };
        a.nodes_treeids.push(tree_id);
        a.nodes_nodeids.push(id);
        a.nodes_modes.push(mode);
        a.nodes_featureids.push(feature);
        a.nodes_values.push(value);
        a.nodes_truenodeids.push(yes);
        a.nodes_falsenodeids.push(no);
        a.nodes_missing_value_tracks_true.push(tracks);
        id
    }

    /// The specification read literally: walk each recursive tree, collect the
    /// weights reached per target, aggregate, add the base values.
    fn reference(
        trees: &[Tree],
        n_targets: usize,
        aggregate: &str,
        base: &[f32],
        x: &[f32],
    ) -> Vec<f32> {
        let mut hits: Vec<Vec<f32>> = vec![Vec::new(); n_targets];
        for t in trees {
            let mut node = t;
            loop {
                match node {
                    Tree::Leaf(weights) => {
                        for (target, w) in weights {
                            hits[*target as usize].push(*w);
                        }
                        break;
                    }
                    Tree::Branch {
                        mode,
                        feature,
                        value,
                        tracks_true,
                        yes,
                        no,
                    } => {
                        let v = x[*feature as usize];
                        let go = if v.is_nan() && *tracks_true {
                            true
                        } else {
                            match MODES[*mode] {
                                "BRANCH_EQ" => v == *value,
                                "BRANCH_NEQ" => v != *value,
                                "BRANCH_LT" => v < *value,
                                "BRANCH_GT" => v > *value,
                                "BRANCH_LEQ" => v <= *value,
                                _ => v >= *value,
                            }
                        };
                        node = if go { yes } else { no };
                    }
                }
            }
        }
        hits.iter()
            .zip(base)
            .map(|(h, b)| {
                let agg = match aggregate {
                    "SUM" => h.iter().sum::<f32>(),
                    "AVERAGE" => h.iter().sum::<f32>() / trees.len() as f32,
                    "MIN" => h.iter().copied().reduce(f32::min).unwrap_or(0.0),
                    _ => h.iter().copied().reduce(f32::max).unwrap_or(0.0),
                };
                agg + b
            })
            .collect()
    }

    fn feature_value() -> impl Strategy<Value = f32> {
        prop_oneof![Just(f32::NAN), Just(0.0f32), Just(1.0), -2.5f32..2.5]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn the_compiled_ensemble_computes_what_the_specification_says(
            trees in proptest::collection::vec(tree(3, 4), 1..6),
            aggregate in 0usize..4,
            base in proptest::collection::vec(-1.0f32..1.0, 3),
            rows in proptest::collection::vec(proptest::collection::vec(feature_value(), 4), 1..8),
            salt in 0i64..1000,
        ) {
            let aggregate = ["SUM", "AVERAGE", "MIN", "MAX"][aggregate];
            let mut a = RegressorAttributes {
                n_targets: 3,
                aggregate_function: aggregate.into(),
                base_values: base.clone(),
                ..Default::default()
            };
            // Trees listed in reverse and their ids spaced out: order and density
            // of ids must not matter.
            for (k, t) in trees.iter().enumerate().rev() {
                let mut next = 0;
                flatten(t, 10 * k as i64 + 3, salt, &mut next, &mut a);
            }
            let (compact, base_values) = compile(&a).expect("compiles");
            let flat: Vec<f32> = rows.concat();
            let got = compact.eval_rows(&flat, 4).expect("evaluates");
            for (r, x) in rows.iter().enumerate() {
                let want = reference(&trees, 3, aggregate, &base, x);
                for t in 0..3 {
                    let g = got[r * 3 + t] + base_values[t];
                    let w = want[t];
                    prop_assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "row {r} target {t}: {g} vs {w}");
                }
            }
        }
    }

    /// Valid ensembles with up to three entries changed to arbitrary values or
    /// cut off: near-misses of every kind (ids out of range, shared children,
    /// lost roots, bad modes, lengths off by one) and some still valid.
    fn arbitrary_attributes() -> impl Strategy<Value = RegressorAttributes> {
        (
            proptest::collection::vec(tree(3, 4), 1..4),
            0i64..1000,
            proptest::collection::vec((0usize..14, any::<prop::sample::Index>(), -2i64..40), 0..4),
        )
            .prop_map(|(trees, salt, changes)| {
                let mut a = RegressorAttributes {
                    n_targets: 3,
                    aggregate_function: "SUM".into(),
                    ..Default::default()
                };
                for (k, t) in trees.iter().enumerate() {
                    let mut next = 0;
                    flatten(t, k as i64, salt, &mut next, &mut a);
                }
                for (field, at, v) in changes {
                    let set = |list: &mut Vec<i64>| {
                        if !list.is_empty() {
                            let i = at.index(list.len());
                            list[i] = v;
                        }
                    };
                    match field {
                        0 => set(&mut a.nodes_treeids),
                        1 => set(&mut a.nodes_nodeids),
                        2 => set(&mut a.nodes_featureids),
                        3 => set(&mut a.nodes_truenodeids),
                        4 => set(&mut a.nodes_falsenodeids),
                        5 => set(&mut a.nodes_missing_value_tracks_true),
                        6 => set(&mut a.target_treeids),
                        7 => set(&mut a.target_nodeids),
                        8 => set(&mut a.target_ids),
                        9 => a.n_targets = v,
                        10 => {
                            let i = at.index(a.nodes_modes.len());
                            a.nodes_modes[i] =
                                ["LEAF", "BRANCH_LT", "BRANCH_??"][v.rem_euclid(3) as usize].into();
                        }
                        11 => {
                            a.nodes_values.pop();
                        }
                        12 => {
                            a.target_weights.pop();
                        }
                        _ => {
                            a.aggregate_function =
                                ["MIN", "MAX", "AVERAGE", "MEDIAN"][v.rem_euclid(4) as usize].into()
                        }
                    }
                }
                a
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary attributes are refused or compile into trees that evaluate
        /// any row without panicking or looping, with one output per target.
        #[test]
        fn arbitrary_attributes_never_panic_and_what_compiles_evaluates(
            a in arbitrary_attributes(),
            x in proptest::collection::vec(prop_oneof![Just(f32::NAN), -3.0f32..3.0], 40),
        ) {
            if let Ok((trees, base)) = compile(&a) {
                prop_assert_eq!(base.len(), trees.n_classes);
                let width = trees.n_features.max(1);
                prop_assume!(width <= x.len());
                let out = trees.eval_rows(&x[..width], width).expect("compiled trees evaluate");
                prop_assert_eq!(out.len(), trees.n_classes);
            }
        }
    }

    /// The generator above is not vacuous: some of its attribute sets compile.
    #[test]
    fn some_arbitrary_attributes_compile() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = arbitrary_attributes();
        let compiled = (0..2000)
            .filter(|_| compile(&strategy.new_tree(&mut runner).expect("value").current()).is_ok())
            .count();
        assert!(
            (200..1800).contains(&compiled),
            "{compiled} of 2000 compiled: the generator should give both outcomes"
        );
    }

    fn stump() -> RegressorAttributes {
        RegressorAttributes {
            n_targets: 1,
            aggregate_function: "SUM".into(),
            base_values: vec![0.5],
            nodes_treeids: vec![0, 0, 0],
            nodes_nodeids: vec![0, 1, 2],
            nodes_featureids: vec![1, 0, 0],
            nodes_modes: vec!["BRANCH_LEQ".into(), "LEAF".into(), "LEAF".into()],
            nodes_values: vec![2.0, 0.0, 0.0],
            nodes_truenodeids: vec![1, 0, 0],
            nodes_falsenodeids: vec![2, 0, 0],
            nodes_missing_value_tracks_true: vec![],
            target_treeids: vec![0, 0],
            target_nodeids: vec![1, 2],
            target_ids: vec![0, 0],
            target_weights: vec![-1.0, 1.0],
        }
    }

    #[test]
    fn a_stump_compiles_and_its_base_value_is_returned_apart() {
        let (trees, base) = compile(&stump()).expect("compiles");
        assert_eq!(base, vec![0.5]);
        assert_eq!(trees.n_features, 2);
        assert_eq!(
            trees.eval_rows(&[9.0, 1.0, 9.0, 3.0], 2).expect("runs"),
            vec![-1.0, 1.0]
        );
    }

    type Breakage = fn(&mut RegressorAttributes);

    #[test]
    fn malformed_ensembles_are_refused_with_the_attribute_named() {
        let cases: Vec<(Breakage, &str)> = vec![
            (|a| a.n_targets = 0, "n_targets"),
            (
                |a| a.aggregate_function = "MEDIAN".into(),
                "aggregate_function",
            ),
            (|a| a.base_values = vec![1.0, 2.0], "base_values"),
            (
                |a| a.nodes_values.pop().map(|_| ()).unwrap_or(()),
                "nodes_values",
            ),
            (|a| a.nodes_modes[1] = "BRANCH_XX".into(), "nodes_modes[1]"),
            (|a| a.nodes_truenodeids[0] = 7, "nodes_truenodeids[0]"),
            (|a| a.nodes_falsenodeids[0] = -1, "nodes_falsenodeids[0]"),
            (|a| a.nodes_featureids[0] = -3, "nodes_featureids[0]"),
            (|a| a.nodes_nodeids[2] = 1, "defined twice"),
            (|a| a.nodes_falsenodeids[0] = 1, "nodes no branch points to"),
            (
                |a| a.nodes_missing_value_tracks_true = vec![0, 2, 0],
                "nodes_missing_value_tracks_true",
            ),
            (|a| a.target_ids[1] = 1, "target_ids[1]"),
            (|a| a.target_nodeids[1] = 0, "branch, not a leaf"),
            (|a| a.target_nodeids[1] = 5, "does not exist"),
            (|a| a.target_weights.clear(), "target_weights"),
            (
                |a| {
                    // node 1 becomes a branch back to the root: the root has a parent.
                    a.nodes_modes[1] = "BRANCH_LT".into();
                    a.nodes_truenodeids[1] = 0;
                    a.nodes_falsenodeids[1] = 2;
                },
                "two parents",
            ),
        ];
        for (k, (break_it, needle)) in cases.into_iter().enumerate() {
            let mut a = stump();
            break_it(&mut a);
            let err = match compile(&a) {
                Ok(_) => panic!("case {k} ({needle}) compiled"),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains(needle),
                "case {k}: {err:?} does not name {needle:?}"
            );
        }
    }
}
