#!/usr/bin/env python3
"""Generates the small ONNX models the repository ships, and their expected outputs.

Run once after changing it (outputs are committed, so a fresh clone needs nothing):

    python3 -m venv /tmp/genvenv
    /tmp/genvenv/bin/pip install onnx==1.23.2 numpy scikit-learn skl2onnx onnxruntime
    /tmp/genvenv/bin/python models/generate.py

Models:
- iris_logreg.onnx: a multinomial logistic regression over the four iris features
  (standardise, MatMul, Add, Softmax, ArgMax), input `features` f32 [N, 4], outputs
  `label` i64 [N] and `probabilities` f32 [N, 3]. Weights are fitted here by plain
  gradient descent on a fixed synthetic iris-like sample (no download).
- iris_logreg_v2_broken.onnx: the same graph with the class weights rotated, so it
  answers wrongly: used to show a health check (golden cases) catching a bad model.
- iris_zipmap.onnx: scikit-learn's default export shape (ONNX-ML Scaler and ZipMap),
  which tract alone cannot run and the agent runs (trees/src/ml.rs). Real skl2onnx
  exports, with onnxruntime's answers, are in models/sklearn/.
- digits_cnn.onnx: a small image CNN (Conv 3x3 x16, Relu, MaxPool, Conv 3x3 x32, Relu,
  MaxPool, Gemm, Softmax, ArgMax) over `image` f32 [N, 1, 28, 28], outputs `label` i64
  [N] and `probabilities` f32 [N, 10]; fixed random weights (it is for the runtime's
  tests and benchmarks, not for accuracy). digits_cnn.expected.json holds two inputs and
  the outputs of a numpy reference implementation.
- forest_cancer.onnx: a scikit-learn RandomForestClassifier (100 trees) on the breast
  cancer data set that ships with scikit-learn, exported by skl2onnx without ZipMap:
  input `features` f32 [N, 30], outputs `label` i64 [N], `probabilities` f32 [N, 2]
  (ONNX-ML TreeEnsembleClassifier). forest_cancer.expected.json: 8 rows and
  onnxruntime's outputs for them.
- gbr_diabetes.onnx: a scikit-learn GradientBoostingRegressor (100 trees of depth 3) on
  the diabetes data set that ships with scikit-learn: input `features` f32 [N, 10],
  output `variable` f32 [N, 1] (ONNX-ML TreeEnsembleRegressor, SUM plus a base value).
- forest_diabetes.onnx: a RandomForestRegressor (30 trees, depth <= 6) on the same data
  with two targets (the disease progression and its logarithm): output `variable` f32
  [N, 2]. Each model's *.expected.json holds 8 rows and onnxruntime's outputs.

`python3 models/generate.py regressors` writes only the two regressors.
"""
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261129)

# Iris-like classes: means and spreads of the real data set (cm).
MEANS = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]], np.float32)
STDS = np.array([[0.35, 0.38, 0.17, 0.10], [0.52, 0.31, 0.47, 0.20], [0.64, 0.32, 0.55, 0.27]], np.float32)


def sample(n_per_class):
    xs, ys = [], []
    for c in range(3):
        xs.append(rng.normal(MEANS[c], STDS[c], size=(n_per_class, 4)))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def fit(x, y, steps=3000, lr=0.5):
    mu, sigma = x.mean(0), x.std(0)
    z = (x - mu) / sigma
    w = np.zeros((4, 3), np.float64)
    b = np.zeros(3, np.float64)
    onehot = np.eye(3)[y]
    for _ in range(steps):
        logits = z @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x)
        w -= lr * (z.T @ g + 1e-3 * w)
        b -= lr * g.sum(0)
    return mu.astype(np.float32), sigma.astype(np.float32), w.astype(np.float32), b.astype(np.float32)


def logreg_graph(name, mu, sigma, w, b):
    n = "N"
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, [n, 4])]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, [n]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [n, 3]),
    ]
    inits = [
        numpy_helper.from_array(mu, "mean"),
        numpy_helper.from_array(sigma, "scale"),
        numpy_helper.from_array(w, "weights"),
        numpy_helper.from_array(b, "bias"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["standard"]),
        helper.make_node("MatMul", ["standard", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-generate")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference(x, mu, sigma, w, b):
    logits = ((x - mu) / sigma) @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return logits.argmax(1).astype(np.int64), p.astype(np.float32)


def zipmap_graph():
    inputs = [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, 4])]
    seq_map = helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    outputs = [
        helper.make_tensor_value_info("output_label", TensorProto.INT64, [None]),
        helper.make_value_info("output_probability", seq_map),
    ]
    nodes = [
        helper.make_node("Scaler", ["float_input"], ["scaled"], domain="ai.onnx.ml", offset=[5.8, 3.0, 3.7, 1.2], scale=[1.2, 2.3, 0.56, 1.3]),
        helper.make_node(
            "LinearClassifier", ["scaled"], ["output_label", "probs"], domain="ai.onnx.ml",
            classlabels_ints=[0, 1, 2], coefficients=[float(v) for v in rng.normal(size=12)],
            intercepts=[0.1, 0.2, 0.3], multi_class=1, post_transform="SOFTMAX",
        ),
        helper.make_node("ZipMap", ["probs"], ["output_probability"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    graph = helper.make_graph(nodes, "iris_zipmap", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def cnn_params():
    c1 = (rng.normal(0, 0.3, (16, 1, 3, 3))).astype(np.float32)
    b1 = (rng.normal(0, 0.1, 16)).astype(np.float32)
    c2 = (rng.normal(0, 0.1, (32, 16, 3, 3))).astype(np.float32)
    b2 = (rng.normal(0, 0.1, 32)).astype(np.float32)
    w = (rng.normal(0, 0.05, (32 * 7 * 7, 10))).astype(np.float32)
    b = (rng.normal(0, 0.1, 10)).astype(np.float32)
    return c1, b1, c2, b2, w, b


def cnn_graph(c1, b1, c2, b2, w, b):
    inits = [numpy_helper.from_array(a, n) for a, n in [(c1, "c1"), (b1, "b1"), (c2, "c2"), (b2, "b2"), (w, "w"), (b, "b"), (np.array([0, -1], np.int64), "flat")]]
    nodes = [
        helper.make_node("Conv", ["image", "c1", "b1"], ["x1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["x1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2", "b2"], ["x2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["x2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p2", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet-generate")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_ref(x, k, bias):
    n, c, h, w_ = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, k.shape[0], h, w_), np.float64)
    for i in range(3):
        for j in range(3):
            patch = padded[:, :, i:i + h, j:j + w_]
            out += np.einsum("nchw,oc->nohw", patch, k[:, :, i, j])
    return out + bias[None, :, None, None]


def pool_ref(x):
    n, c, h, w_ = x.shape
    return x.reshape(n, c, h // 2, 2, w_ // 2, 2).max(axis=(3, 5))


def cnn_reference(x, c1, b1, c2, b2, w, b):
    x = x.astype(np.float64)
    p1 = pool_ref(np.maximum(conv_ref(x, c1, b1), 0))
    p2 = pool_ref(np.maximum(conv_ref(p1, c2, b2), 0))
    logits = p2.reshape(len(x), -1) @ w + b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits.argmax(axis=1), e / e.sum(axis=1, keepdims=True)


def main():
    x, y = sample(50)
    mu, sigma, w, b = fit(x, y)
    good = logreg_graph("iris_logreg", mu, sigma, w, b)
    onnx.save(good, os.path.join(HERE, "iris_logreg.onnx"))
    broken = logreg_graph("iris_logreg_v2_broken", mu, sigma, np.roll(w, 1, axis=1), np.roll(b, 1))
    onnx.save(broken, os.path.join(HERE, "iris_logreg_v2_broken.onnx"))
    onnx.save(zipmap_graph(), os.path.join(HERE, "iris_zipmap.onnx"))

    # Test inputs and expected outputs (numpy reference), for the agent's tests.
    tx, ty = sample(4)
    label, probs = reference(tx, mu, sigma, w, b)
    accuracy = float((reference(x, mu, sigma, w, b)[0] == y).mean())
    with open(os.path.join(HERE, "iris_logreg.expected.json"), "w") as f:
        json.dump({
            "features": tx.round(4).tolist(),
            "label": label.tolist(),
            "probabilities": probs.tolist(),
            "train_accuracy": accuracy,
        }, f, indent=1)
    # A reference data set (CSV) as an operator would pass to --reference.
    rx, _ = sample(100)
    with open(os.path.join(HERE, "iris_reference.csv"), "w") as f:
        f.write("sepal_length,sepal_width,petal_length,petal_width\n")
        for row in rx:
            f.write(",".join(f"{v:.2f}" for v in row) + "\n")
    # Golden inputs as an operator writes them for --golden (outputs filled in at build).
    with open(os.path.join(HERE, "iris_golden.json"), "w") as f:
        json.dump({"cases": [{"inputs": {"features": tx[:2].round(2).tolist()}}, {"inputs": {"features": tx[2:].round(2).tolist()}}]}, f, indent=1)
    # The small CNN and its expected outputs.
    params = cnn_params()
    onnx.save(cnn_graph(*params), os.path.join(HERE, "digits_cnn.onnx"))
    images = rng.random((2, 1, 28, 28)).astype(np.float32).round(3)
    clabel, cprobs = cnn_reference(images, *params)
    with open(os.path.join(HERE, "digits_cnn.expected.json"), "w") as f:
        json.dump({"image": images.reshape(2, -1).tolist(), "label": clabel.tolist(), "probabilities": cprobs.tolist()}, f)
    forest()
    print(f"train accuracy {accuracy:.3f}; wrote models to {HERE}")


def forest():
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    import onnxruntime as ort

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    clf = RandomForestClassifier(n_estimators=100, random_state=0).fit(x, y)
    model = convert_sklearn(
        clf, "forest_cancer",
        initial_types=[("features", FloatTensorType([None, 30]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path = os.path.join(HERE, "forest_cancer.onnx")
    onnx.save(model, path)
    rows = x[::71][:8]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    label, probs = session.run(None, {"features": rows})
    with open(os.path.join(HERE, "forest_cancer.expected.json"), "w") as f:
        json.dump({"outputs": names, "features": rows.tolist(), "label": label.tolist(), "probabilities": probs.tolist()}, f)


def regressors():
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    import onnxruntime as ort

    x, y = load_diabetes(return_X_y=True)
    x = x.astype(np.float32)
    two = np.stack([y, np.log(y)], axis=1)
    models = [
        ("gbr_diabetes", GradientBoostingRegressor(n_estimators=100, max_depth=3, random_state=0).fit(x, y)),
        ("forest_diabetes", RandomForestRegressor(n_estimators=30, max_depth=6, random_state=0).fit(x, two)),
    ]
    rows = x[::55][:8]
    for name, reg in models:
        model = convert_sklearn(
            reg, name,
            initial_types=[("features", FloatTensorType([None, 10]))],
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
        # skl2onnx declares [N, 1] whatever the number of targets: onnxruntime
        # then warns on every run. Declare the real width.
        targets = reg.predict(rows[:1]).reshape(1, -1).shape[1]
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = targets
        path = os.path.join(HERE, name + ".onnx")
        onnx.save(model, path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        (out,) = session.run(None, {"features": rows})
        with open(os.path.join(HERE, name + ".expected.json"), "w") as f:
            json.dump({"outputs": names, "features": rows.tolist(), "variable": out.tolist()}, f)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["regressors"]:
        regressors()
    else:
        main()
        regressors()
