//! Keeps tract's `ConcatThenEinsum` declutter rule away from the linear model
//! after scikit-learn's `PolynomialFeatures`.
//!
//! skl2onnx exports `PolynomialFeatures` as one product per output column
//! (`ArrayFeatureExtractor` + `ReduceProd`) joined by a `Concat`, which feeds
//! the linear model's `MatMul`. tract 0.23.9's declutter splits an `EinSum`
//! fed by a `Concat` into one `EinSum` per concatenated piece ("concat-einsum-k")
//! and builds pieces whose input ranks do not match: the model does not load
//! (tract's to fix; reproduction: `models/sklearn/family_polynomial_ridge.onnx`,
//! docs/agent.md). [`shield_concat_einsum`] puts a [`Barrier`] between such a
//! `Concat` and its `EinSum`: the rule no longer sees the pair, and the model
//! runs as one `EinSum` over the concatenated columns. The barrier hands its
//! input on as it is (no copy).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// An operator that passes its input on unchanged, and that no declutter rule
/// looks through.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Barrier;

impl Op for Barrier {
    fn name(&self) -> StaticName {
        "EdgefleetBarrier".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Barrier {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(inputs)
    }
}

impl TypedOp for Barrier {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// Puts a [`Barrier`] on every edge from a `Concat` to an `EinSum` of a typed
/// model (before it is decluttered); returns how many.
pub fn shield_concat_einsum(model: &mut TypedModel) -> TractResult<usize> {
    let mut edges = Vec::new();
    for node in model.nodes() {
        if node.op_as::<EinSum>().is_none() {
            continue;
        }
        for (slot, input) in node.inputs.iter().enumerate() {
            if model.node(input.node).op_as::<TypedConcat>().is_some() {
                edges.push((*input, InletId::new(node.id, slot)));
            }
        }
    }
    for (outlet, inlet) in &edges {
        let name = format!(
            "{}.edgefleet-barrier-{}",
            model.node(inlet.node).name,
            inlet.slot
        );
        let shielded = model.wire_node(name, Barrier, &[*outlet])?[0];
        model.add_edge(shielded, *inlet)?;
    }
    Ok(edges.len())
}
