"""A/B: /classify images/s at 8 and 32 clients and a lone request's latency, session 11's final code (f18156a) vs
HEAD, alternating, same exported model, same payloads."""
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "/work/main")
from bench.http_client import run_client
from bench.loadgen import closed_loop, jpeg_payloads
from bench.lone_request import lone_requests
from bench.server_process import server_process
from export.onnx import export_onnx_version

TREES = {"session11 f18156a": "/tmp/s12/old", "HEAD": "/work/main"}
CONFIGS = [("openvino", "bf16", "fast", "LATENCY"), ("openvino", "fp32", "exact", "LATENCY")]
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SECONDS = 12
repo = Path(tempfile.mkdtemp())
export_onnx_version(repo, "convnext-tiny", "convnext_tiny")
mixed = jpeg_payloads()
lone_items = jpeg_payloads(sizes=((500, 375),))
results = []
for rnd in range(ROUNDS):
    for config in CONFIGS:
        order = list(TREES.items()) if rnd % 2 == 0 else list(reversed(TREES.items()))
        for name, tree in order:
            engine, precision, mode, hint = config
            args = ["--host", "127.0.0.1", "--grpc-port", "0", "--repository", str(repo), "--model", "convnext-tiny",
                    "--engine", engine, "--precision", precision, "--decode-mode", mode, "--intra-op-threads", "2",
                    "--max-batch-size", "8", "--openvino-performance-hint", hint]
            with server_process("service", args, "/readyz", 180, env={"PYTHONPATH": tree}, cwd=tree) as server:
                row = {"round": rnd, "tree": name, "config": "/".join(config)}
                for c in (8, 32):
                    r = run_client(closed_loop(f"{server.url}/classify", mixed, c, 10**9, SECONDS, steady=True))
                    row[f"c{c}"] = round(r.summary()["images_per_s"], 2)
                lone = lone_requests(f"{server.url}/classify", lone_items, 30)
                row["lone_client_p50_ms"] = round(lone["client_p50_ms"], 2)
                row["lone_overhead_ms"] = round(lone["overhead_p50_ms"], 2)
            print(json.dumps(row), flush=True)
            results.append(row)
