"""A deployment pipeline's side: fetch the champion pruned model from the MLflow registry (ONNX)
and run a batch through ONNX Runtime. It needs neither autoprune nor torch.

    python examples/deploy_from_registry.py --tracking-uri http://127.0.0.1:5000 --model digits
"""

from __future__ import annotations

import argparse
import json

import mlflow
import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    mlflow.set_tracking_uri(args.tracking_uri)
    uri = f"models:/{args.model}@{args.alias}"
    proto = mlflow.onnx.load_model(uri)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [args.batch, *[d if isinstance(d, int) else 1 for d in inp.shape[1:]]]
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    logits = session.run(None, {inp.name: batch})[0]
    print(json.dumps({"model": uri, "input_shape": shape, "output_shape": list(logits.shape),
                      "predictions": logits.argmax(1).tolist()}))


if __name__ == "__main__":
    main()
