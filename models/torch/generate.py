#!/usr/bin/env python3
"""Exports PyTorch models of the common edge architectures exactly as
`torch.onnx.export` writes them with its defaults, and records what onnxruntime
answers for fixed inputs.

Run once after changing it (the files are committed: CI needs no torch):

    python3 -m venv /var/tmp/torchgen
    /var/tmp/torchgen/bin/pip install torch==2.15.0 torchvision==0.29.2 onnx==1.23.2 \
        onnxscript onnxruntime==1.32.0
    /var/tmp/torchgen/bin/python models/torch/generate.py

The exporter's defaults in torch 2.15: the dynamo exporter, its default opset (20),
and the weights in a separate `NAME.onnx.data` file beside `NAME.onnx` (external
data). The files are kept as exported: `edgefleet bundle build` copies the
weights in (docs/agent.md).

Models (random weights from a fixed seed; they are for the runtime, not for
accuracy), each with `NAME.golden.json` in `edgefleet bundle build --golden`'s
format: two inputs and onnxruntime's outputs for them, plus how far torch's own
outputs are from onnxruntime's:
- resnet18: torchvision's ResNet-18 (BasicBlock x [2, 2, 2, 2], batch norm,
  global average pool), 10 classes, at a quarter of its width (16..128 channels
  instead of 64..512: the same operators and depth in 2.8 MB instead of 45 MB),
  input `image` f32 [1, 3, 64, 64].
- mobilenet_v2: torchvision's MobileNetV2 at width 0.5, 10 classes, [1, 3, 64, 64].
- mobilenet_v3_small: torchvision's MobileNetV3-Small (hard-swish, squeeze and
  excitation), 10 classes, [1, 3, 64, 64].
- lstm, gru: two-layer recurrent sequence models (8 features, 32 hidden) with a
  linear head on the last step, input `sequence` f32 [1, 20, 8].
- transformer: a two-layer nn.TransformerEncoder (d_model 64, 4 heads,
  feed-forward 128, batch first) with mean pooling and a linear head, input
  `tokens` f32 [1, 16, 64].

`--only NAME` exports one model; `--out DIR` writes elsewhere (for the
full-width ResNet-18 with `--full-resnet`, 45 MB, not committed).
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def resnet18(width):
    """torchvision's ResNet-18 with `width` channels in its first stage."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class Narrow(ResNet):
        def __init__(self):
            super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=10)
            # Rebuild the stages at the chosen width.
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = self._make_layer(BasicBlock, width, 2)
            self.layer2 = self._make_layer(BasicBlock, width * 2, 2, stride=2)
            self.layer3 = self._make_layer(BasicBlock, width * 4, 2, stride=2)
            self.layer4 = self._make_layer(BasicBlock, width * 8, 2, stride=2)
            self.fc = nn.Linear(width * 8, 10)

    return Narrow()


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(input_size=8, hidden_size=32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, sequence):
        out, _ = self.rnn(sequence)
        return self.head(out[:, -1, :])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(64, 5)

    def forward(self, tokens):
        return self.head(self.encoder(tokens).mean(dim=1))


def image_models(full_resnet):
    return {
        "resnet18": lambda: torchvision.models.resnet18(num_classes=10)
        if full_resnet
        else resnet18(16),
        "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5),
        "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    }


def models(full_resnet):
    out = {}
    for name, make in image_models(full_resnet).items():
        out[name] = (make, "image", (1, 3, 64, 64), "logits")
    out["lstm"] = (lambda: Recurrent(nn.LSTM), "sequence", (1, 20, 8), "output")
    out["gru"] = (lambda: Recurrent(nn.GRU), "sequence", (1, 20, 8), "output")
    out["transformer"] = (Encoder, "tokens", (1, 16, 64), "output")
    return out


def randomise_batch_norm(model, gen):
    """Fresh batch-norm layers hold mean 0 and variance 1; give them statistics so
    the folded scales and shifts are not all identities."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def export(name, make, input_name, shape, output_name, out_dir, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make().eval()
    with torch.no_grad():
        randomise_batch_norm(model, gen)
    path = os.path.join(out_dir, f"{name}.onnx")
    for stale in (path, path + ".data"):
        if os.path.exists(stale):
            os.remove(stale)
    example = torch.randn(*shape, generator=gen)
    # The exporter's defaults: nothing but names.
    torch.onnx.export(
        model, (example,), path, input_names=[input_name], output_names=[output_name]
    )
    proto = onnx.load(path, load_external_data=False)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    ops = sorted({n.op_type for n in proto.graph.node})
    external = sorted(
        {
            e.value
            for t in proto.graph.initializer
            for e in t.external_data
            if e.key == "location"
        }
    )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    cases = []
    worst = 0.0
    for i in range(2):
        x = torch.randn(*shape, generator=gen)
        (ours,) = session.run(None, {input_name: x.numpy()})
        with torch.no_grad():
            theirs = model(x).numpy()
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
        cases.append(
            {
                "inputs": {input_name: x.numpy().tolist()},
                "outputs": {output_name: ours.tolist()},
            }
        )
    doc = {
        "model": f"{name}.onnx",
        "exporter": f"torch {torch.__version__} torch.onnx.export defaults",
        "opset": opset,
        "external_data": external,
        "operators": ops,
        "outputs_from": f"onnxruntime {ort.__version__}",
        "torch_vs_onnxruntime_max_abs": worst,
        "cases": cases,
    }
    with open(os.path.join(out_dir, f"{name}.golden.json"), "w") as f:
        json.dump(doc, f)
    size = os.path.getsize(path) + sum(
        os.path.getsize(os.path.join(out_dir, e)) for e in external
    )
    print(f"{name}: opset {opset}, {len(ops)} operators, external {external}, {size} bytes, "
          f"torch vs onnxruntime {worst:.2e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only")
    parser.add_argument("--out", default=HERE)
    parser.add_argument("--full-resnet", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    for seed, (name, spec) in enumerate(models(args.full_resnet).items()):
        if args.only and name != args.only:
            continue
        export(name, *spec, args.out, 20261206 + seed)


if __name__ == "__main__":
    main()
