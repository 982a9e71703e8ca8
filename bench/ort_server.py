#!/usr/bin/env python3
"""The baseline a user would otherwise deploy: a minimal Python HTTP server around
onnxruntime (one thread), answering the same OIP v2 JSON requests as the agent's local
API, so that one client measures both in the same run. Used by
`cargo bench -p edgefleet-agent --bench agent` (issue 25).

usage: ort_server.py MODEL   (prints "listening on 127.0.0.1:PORT", serves until killed)
Needs: pip install onnxruntime numpy (see docs/benchmarks.md).
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import onnxruntime as ort

TYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
NAMES = {np.dtype(v): k for k, v in TYPES.items()}


def session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def handler(sess):
    outputs = [o.name for o in sess.get_outputs()]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the agent's clients hold
        disable_nagle_algorithm = True  # TCP_NODELAY, as the agent's API sets

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                request = json.loads(body)
                feed = {
                    i["name"]: np.asarray(i["data"], dtype=TYPES[i["datatype"]]).reshape(i["shape"])
                    for i in request["inputs"]
                }
                results = sess.run(outputs, feed)
                answer = {
                    "outputs": [
                        {
                            "name": name,
                            "shape": list(value.shape),
                            "datatype": NAMES.get(value.dtype, "BYTES"),
                            "data": value.ravel().tolist(),
                        }
                        for name, value in zip(outputs, results)
                        if isinstance(value, np.ndarray)
                    ]
                }
                self.reply(200, json.dumps(answer).encode())
            except Exception as e:  # the error goes back to the client, as a server would
                self.reply(400, json.dumps({"error": str(e)}).encode())

        def reply(self, status, data):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


def main():
    server = HTTPServer(("127.0.0.1", 0), handler(session(sys.argv[1])))
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
