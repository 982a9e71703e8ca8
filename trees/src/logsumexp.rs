//! `ReduceLogSumExp`, stable. tract 0.23.9 computes it as `ln(Σ exp(x))`, which
//! overflows to `inf` (or underflows to `-inf`) as soon as the values are far from
//! zero: scikit-learn's naive Bayes exports (joint log-likelihoods in the
//! thousands) then answer `inf` probabilities where onnxruntime answers the right
//! ones. Before parsing, [`stabilise`] rewrites each such node into the usual
//! stable form, `m + ln(Σ exp(x - m))` with `m` the maximum over the same axes,
//! from operators tract parses (`ReduceMax`, `Sub`, `Exp`, `ReduceSum`, `Log`,
//! `Add`), so shapes and axes keep tract's own handling. A row whose maximum is
//! infinite gives NaN (onnxruntime: the infinity).

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto, TensorProto};
use tract_onnx::tract_hir::internal::*;

/// Rewrites every `ReduceLogSumExp` of the main graph (default domain).
pub fn stabilise(proto: &mut ModelProto) -> TractResult<()> {
    let opset = proto
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .unwrap_or(1);
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(());
    };
    let mut nodes = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        if node.op_type == "ReduceLogSumExp" && node.domain.is_empty() {
            nodes.extend(stable_nodes(&node, opset)?);
        } else {
            nodes.push(node);
        }
    }
    graph.node = nodes;
    Ok(())
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

/// The nodes that compute `node` stably. Axes come as an input from opset 18
/// (`ReduceMax` too), as an attribute before; `ReduceSum` took them as an input
/// from opset 13 already, so between 13 and 17 they become a constant for it.
fn stable_nodes(node: &NodeProto, opset: i64) -> TractResult<Vec<NodeProto>> {
    let (Some(x), Some(y)) = (node.input.first(), node.output.first()) else {
        bail!("ReduceLogSumExp {:?} has no input or output", node.name);
    };
    let keep = node.get_attr_opt::<i64>("keepdims")?.unwrap_or(1);
    let axes_attr = node.get_attr_opt_vec::<i64>("axes")?;
    let axes_input = node.input.get(1).filter(|a| !a.is_empty()).cloned();
    let noop = node
        .attribute
        .iter()
        .find(|a| a.name == "noop_with_empty_axes")
        .cloned();
    let n = |suffix: &str| format!("{y}.edgefleet_lse_{suffix}");
    let mut out = vec![];
    // A reduction of `input` over the node's axes, keeping dimensions or not.
    let reduce =
        |op: &str, input: &str, output: String, keepdims: i64, out: &mut Vec<NodeProto>| {
            let mut inputs = vec![input.to_owned()];
            let mut attribute = vec![int_attr("keepdims", keepdims)];
            let axes_as_input = opset >= 18 || (op == "ReduceSum" && opset >= 13);
            if axes_as_input {
                if let Some(a) = &axes_input {
                    inputs.push(a.clone());
                } else if let Some(axes) = &axes_attr {
                    // Opset 13-17: the node's attribute, as a constant for ReduceSum.
                    let name = n("axes");
                    if !out
                        .iter()
                        .any(|o: &NodeProto| o.output.first() == Some(&name))
                    {
                        out.push(NodeProto {
                            name: name.clone(),
                            op_type: "Constant".into(),
                            output: vec![name.clone()],
                            attribute: vec![AttributeProto {
                                name: "value".into(),
                                r#type: AttributeType::Tensor as i32,
                                t: Some(TensorProto {
                                    dims: vec![axes.len() as i64],
                                    data_type: tract_onnx::pb::tensor_proto::DataType::Int64 as i32,
                                    int64_data: axes.clone(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        });
                    }
                    inputs.push(name);
                }
                if let Some(noop) = &noop {
                    attribute.push(noop.clone());
                }
            } else if let Some(axes) = &axes_attr {
                attribute.push(AttributeProto {
                    name: "axes".into(),
                    r#type: AttributeType::Ints as i32,
                    ints: axes.clone(),
                    ..Default::default()
                });
            }
            out.push(NodeProto {
                name: output.clone(),
                op_type: op.into(),
                input: inputs,
                output: vec![output],
                attribute,
                ..Default::default()
            });
        };
    let binary = |op: &str, a: &str, b: &str, output: String| NodeProto {
        name: output.clone(),
        op_type: op.into(),
        input: vec![a.to_owned(), b.to_owned()],
        output: vec![output],
        ..Default::default()
    };
    let unary = |op: &str, a: &str, output: String| NodeProto {
        name: output.clone(),
        op_type: op.into(),
        input: vec![a.to_owned()],
        output: vec![output],
        ..Default::default()
    };
    reduce("ReduceMax", x, n("max"), 1, &mut out);
    out.push(binary("Sub", x, &n("max"), n("shifted")));
    out.push(unary("Exp", &n("shifted"), n("exp")));
    reduce("ReduceSum", &n("exp"), n("sum"), keep, &mut out);
    out.push(unary("Log", &n("sum"), n("log")));
    reduce("ReduceMax", x, n("max_out"), keep, &mut out);
    out.push(binary("Add", &n("log"), &n("max_out"), y.clone()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{GraphProto, OperatorSetIdProto, ValueInfoProto};

    /// A model of one `ReduceLogSumExp` over axis 1 of an f32 [2, 3] input, in
    /// the form of `opset`, optimised and run on `x`.
    fn run(opset: i64, keepdims: i64, x: [f32; 6]) -> Vec<f32> {
        use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
        use tract_onnx::pb::type_proto::{Tensor as TypeTensor, Value};
        use tract_onnx::pb::{TensorShapeProto, TypeProto, tensor_shape_proto::Dimension};
        let dims = |d: &[i64]| TensorShapeProto {
            dim: d
                .iter()
                .map(|v| Dimension {
                    value: Some(DimValue::DimValue(*v)),
                    ..Default::default()
                })
                .collect(),
        };
        let info = |name: &str, d: &[i64]| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(Value::TensorType(TypeTensor {
                    elem_type: tract_onnx::pb::tensor_proto::DataType::Float as i32,
                    shape: Some(dims(d)),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut node = NodeProto {
            name: "lse".into(),
            op_type: "ReduceLogSumExp".into(),
            input: vec!["x".into()],
            output: vec!["y".into()],
            attribute: vec![int_attr("keepdims", keepdims)],
            ..Default::default()
        };
        let mut initializer = vec![];
        if opset >= 18 {
            node.input.push("axes".into());
            initializer.push(TensorProto {
                name: "axes".into(),
                dims: vec![1],
                data_type: tract_onnx::pb::tensor_proto::DataType::Int64 as i32,
                int64_data: vec![1],
                ..Default::default()
            });
        } else {
            node.attribute.push(AttributeProto {
                name: "axes".into(),
                r#type: AttributeType::Ints as i32,
                ints: vec![1],
                ..Default::default()
            });
        }
        let mut proto = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            graph: Some(GraphProto {
                node: vec![node],
                initializer,
                input: vec![info("x", &[2, 3])],
                output: vec![ValueInfoProto {
                    name: "y".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        stabilise(&mut proto).expect("rewrites");
        let onnx = tract_onnx::onnx();
        let plan = onnx
            .model_for_proto_model(&proto)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .expect("runs");
        let input = Tensor::from_shape(&[2, 3], &x).expect("tensor");
        let out = plan.run(tvec![input.into_tvalue()]).expect("runs");
        let want_shape: &[usize] = if keepdims == 1 { &[2, 1] } else { &[2] };
        assert_eq!(out[0].shape(), want_shape);
        out[0]
            .try_as_plain_ram()
            .expect("plain")
            .as_slice::<f32>()
            .expect("f32")
            .to_vec()
    }

    #[test]
    fn large_values_give_finite_answers_in_every_opset_form() {
        // ln(e^-1000 + e^-1001 + e^-1002) and ln(e^900 + e^0 + e^899): tract's
        // own form gives -inf and inf here.
        let x = [-1000.0, -1001.0, -1002.0, 900.0, 0.0, 899.0];
        let lse = |a: f64, b: f64, c: f64| {
            let m = a.max(b).max(c);
            (m + ((a - m).exp() + (b - m).exp() + (c - m).exp()).ln()) as f32
        };
        let want = [lse(-1000.0, -1001.0, -1002.0), lse(900.0, 0.0, 899.0)];
        for opset in [11, 13, 17, 18, 21] {
            for keep in [0, 1] {
                let got = run(opset, keep, x);
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (g - w).abs() < 1e-3,
                        "opset {opset} keepdims {keep}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }
}
