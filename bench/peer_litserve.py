"""Peer baseline: LitServe 0.2.19 serving the SAME ONNX file with the SAME preprocessing, for a fair comparison.

Fairness settings (each equal to ours, passed on the command line by `python -m bench`):
- model: the repository version's ONNX file of the same precision, run by ONNX Runtime with our engine's session
  options (intra_op_threads, inter-op 1, ORT_ENABLE_ALL, spinning) on the same provider (CPU, or CUDA on a GPU host);
- preprocessing: `runtime.preprocess.preprocess` with the manifest's Preprocess spec and our max_pixels (torch-free);
- dynamic batching: LitAPI(max_batch_size = our max_batch_size, batch_timeout = our max_queue_delay_ms / 1000);
- workers: one inference worker process (workers_per_device=1), like our one engine + batcher; one API server.
LitServe parses the body as JSON or a form, so this peer takes the JPEG as the multipart field `content`
(the load generator's `form_field`); its response is {"class_id", "score"} (same shape not required).
Run: python -m bench.peer_litserve --repository DIR --port 8100 [--max-batch-size 8 --batch-timeout-ms 5 --threads N]
"""
from __future__ import annotations

import argparse

import litserve as ls
import numpy as np

from convnext_common import usable_cpus
from runtime.engines.onnxruntime import OnnxRuntimeEngine
from runtime.preprocess import preprocess
from runtime.repository import ModelRepository, Preprocess


class OnnxClassifierAPI(ls.LitAPI):
    """LitServe's setup / decode / batch / predict / unbatch / encode around one ONNX Runtime session."""

    def __init__(self, onnx_path: str, spec_json: str, threads: int, max_pixels: int, max_batch_size: int,
                 batch_timeout_s: float, provider: str = "cpu"):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path="/predict")
        self.onnx_path, self.spec_json, self.threads, self.max_pixels = onnx_path, spec_json, threads, max_pixels
        self.provider = provider

    def setup(self, device):
        # Our engine's exact session set-up (threads, optimisation level, thread-pool config) on the same provider.
        engine = OnnxRuntimeEngine(self.onnx_path, (3, 1, 1), provider=self.provider, intra_op_threads=self.threads)
        engine.load()
        self.session, self.input_name, self.input_dtype = engine.session, engine.input_name, engine.input_dtype
        self.spec = Preprocess.model_validate_json(self.spec_json)

    def decode_request(self, request):
        return preprocess(request["content"].file.read(), self.spec, self.max_pixels)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        logits = self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0]
        return [(int(row.argmax()), float(row.max())) for row in logits]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"class_id": output[0], "score": output[1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LitServe peer serving a repository's ONNX model")
    parser.add_argument("--repository", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--max-pixels", type=int, default=40_000_000)
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    args = parser.parse_args(argv)
    repository = ModelRepository(args.repository)
    version = repository.load(args.model or repository.models()[0])
    artifact = version.manifest.find("onnx", args.precision)
    api = OnnxClassifierAPI(str(version.artifact_path(artifact)), version.manifest.preprocess.model_dump_json(),
                            args.threads, args.max_pixels, args.max_batch_size, args.batch_timeout_ms / 1000,
                            args.provider)
    server = ls.LitServer(api, accelerator="cpu" if args.provider == "cpu" else "cuda", devices=1, workers_per_device=1,
                          timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False)


if __name__ == "__main__":
    main()
