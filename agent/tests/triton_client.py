"""Talks to the agent's local API with Triton's own Python client (tritonclient.http),
as a user's application would; prints what it saw as one JSON object.

Usage: python triton_client.py HOST:PORT MODEL [SECOND_MODEL]
Run by agent/tests/triton.rs; needs `pip install "tritonclient[http]" numpy`.
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, model = sys.argv[1], sys.argv[2]
second = sys.argv[3] if len(sys.argv) > 3 else None
client = httpclient.InferenceServerClient(url=url)
seen = {
    "index": client.get_model_repository_index(),
    "second_ready": second is not None and client.is_model_ready(second),
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "other_model_ready": client.is_model_ready("no-such-model"),
    "server": client.get_server_metadata(),
    "metadata": client.get_model_metadata(model),
}
rows = np.array([[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]], dtype=np.float32)
for binary in (False, True):
    features = httpclient.InferInput("features", list(rows.shape), "FP32")
    features.set_data_from_numpy(rows, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer(model, [features], outputs=outputs, request_id="req-1")
    seen["binary" if binary else "json"] = {
        "label": result.as_numpy("label").tolist(),
        "probabilities": result.as_numpy("probabilities").astype(float).tolist(),
        "id": result.get_response().get("id"),
        "outputs": [o["name"] for o in result.get_response()["outputs"]],
    }
narrow = httpclient.InferInput("features", [1, 3], "FP32")
narrow.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32), binary_data=True)
try:
    client.infer(model, [narrow])
    seen["narrow"] = "accepted"
except InferenceServerException as e:
    seen["narrow"] = {"status": e.status(), "message": e.message()}
print(json.dumps(seen))
