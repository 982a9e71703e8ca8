#!/usr/bin/env python3
"""Median onnxruntime inference time (microseconds), one thread, for comparison with
tract in the same run. Used by `cargo bench -p edgefleet-agent --bench agent`.

usage: ort_time.py MODEL INPUT_NAME SHAPE(a,b,..) RUNS  < whitespace-separated f32 data
       ort_time.py MODEL --json RUNS  < {"name": {"shape", "type": f32|i64|string, "data"}, ...}
Needs: pip install onnxruntime numpy (see docs/benchmarks.md).
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    model = sys.argv[1]
    if sys.argv[2] == "--json":
        runs = int(sys.argv[3])
        types = {"f32": np.float32, "i64": np.int64, "string": object}
        feed = {
            name: np.array([np.nan if x is None else x for x in t["data"]], dtype=types[t["type"]]).reshape(t["shape"])
            for name, t in json.load(sys.stdin).items()
        }
    else:
        name, shape, runs = sys.argv[2], sys.argv[3], int(sys.argv[4])
        data = np.array(sys.stdin.read().split(), dtype=np.float32).reshape([int(d) for d in shape.split(",")])
        feed = {name: data}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(max(1, runs // 10)):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    print(f"{times[len(times) // 2]:.2f}")


if __name__ == "__main__":
    main()
