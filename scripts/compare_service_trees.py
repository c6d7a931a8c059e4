"""Before/after of a change to the service: the same client, load and model against `python -m service` run from two
source trees (e.g. a worktree of the old commit and this checkout), in interleaved rounds (before, after, before,
after, ...) so both see the same machine.

    git worktree add --detach /tmp/before <old commit>
    python scripts/compare_service_trees.py --before /tmp/before --after . --repository R --model M \\
        [--rounds 2] [--seconds 6] [--concurrency 1 8 32] [--lone-requests 30] \\
        [--service-args "--engine openvino --precision bf16 --decode-mode fast"]

Per tree and round: POST /classify closed loops at each concurrency (real JPEGs of mixed sizes, bench.loadgen) and
lone requests of one 500x375 JPEG (bench.lone_request); the table gives the median over rounds. The trees take turns
first in each round (before, after; after, before; ...). Both run with the same interpreter, installed packages and
--service-args; each server imports its own tree's code (cwd and PYTHONPATH).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
from pathlib import Path
from statistics import median

from bench.host import cores_description, cpu_model
from bench.loadgen import closed_loop, jpeg_payloads
from bench.lone_request import lone_requests
from bench.server_process import server_process
from convnext_common import positive_int, positive_number, usable_cpus
from convnext_files import write_text_atomic


def measure(tree: Path, args, payloads: list[bytes], lone: list[bytes]) -> dict:
    tree = tree.resolve()
    server_args = ["--host", "127.0.0.1", "--repository", str(args.repository.resolve()), "--model", args.model,
                   "--intra-op-threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
                   *shlex.split(args.service_args)]
    env = {"PYTHONPATH": str(tree), "CONVNEXT_GRPC_PORT": "0"}  # older trees have no gRPC port; the variable is unused
    out = {}
    with server_process("service", server_args, "/readyz", env=env, cwd=tree) as server:
        for concurrency in args.concurrency:
            result = asyncio.run(closed_loop(f"{server.url}/classify", payloads, concurrency, 10**9, args.seconds))
            summary = result.summary()
            out[f"c{concurrency}"] = {k: summary[k] for k in ("images_per_s", "p50_ms", "p99_ms", "ok", "errors")}
        out["lone"] = lone_requests(f"{server.url}/classify", lone, args.lone_requests)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--seconds", type=positive_number, default=6.0)
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--lone-requests", type=positive_int, default=30)
    parser.add_argument("--threads", type=positive_int, default=usable_cpus())
    parser.add_argument("--max-batch-size", type=positive_int, default=8)
    parser.add_argument("--service-args", default="", help="more `python -m service` flags, for both trees")
    parser.add_argument("--output", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    payloads, lone = jpeg_payloads(), jpeg_payloads(sizes=((500, 375),))
    print(f"{cpu_model()}, {cores_description()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for round_index in range(args.rounds):
        trees = (("before", args.before), ("after", args.after))
        for label, tree in trees if round_index % 2 == 0 else reversed(trees):
            runs[label].append(measure(tree, args, payloads, lone))
            print(json.dumps({"round": round_index, "tree": label, **runs[label][-1]}), flush=True)
            if args.output:  # as it goes: a tree that fails in a later round loses none of the minutes before it
                write_text_atomic(args.output, json.dumps(runs, indent=2))
    print(f"\nload average after {os.getloadavg()[0]:.2f}\n\n| measure | before | after | after / before | "
          "failed requests, all rounds, before / after |\n|---|---|---|---|---|")
    for concurrency in args.concurrency:
        errors = errors_cell(runs, f"c{concurrency}")
        for key, unit in (("images_per_s", "images/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")):
            print(table_row(f"/classify c={concurrency} {unit}", runs, f"c{concurrency}", key, 1, errors))
    # A lone request that fails ends the run (bench.lone_request): those rows have no failures to count.
    print(table_row("lone request (500x375 JPEG) client p50 ms", runs, "lone", "client_p50_ms", 1, "-"))
    print(table_row("lone request overhead ms (client - its preprocess - its inference)", runs, "lone",
                    "overhead_p50_ms", 2, "-"))
    return 0


def errors_cell(runs: dict[str, list[dict]], section: str) -> str:
    """Failed requests (any status but 200, timeouts, broken connections) of a closed loop over every round, per tree:
    the images/s beside them counts successes only."""
    return " / ".join(str(sum(sum(run[section]["errors"].values()) for run in runs[label]))
                      for label in ("before", "after"))


def median_over_rounds(runs: list[dict], section: str, key: str) -> float | None:
    """The median of run[section][key] over a tree's rounds; None when a round has none (no request succeeded, or a
    tree whose service does not report what it needs: preprocess_ms, for the overhead)."""
    values = [run[section][key] for run in runs]
    return None if any(v is None for v in values) else median(values)


def table_row(measure: str, runs: dict[str, list[dict]], section: str, key: str, decimals: int, errors: str) -> str:
    before, after = (median_over_rounds(runs[label], section, key) for label in ("before", "after"))
    cells = ["-" if v is None else f"{v:.{decimals}f}" for v in (before, after)]
    ratio = "-" if before is None or after is None or before == 0 else f"{after / before:.2f}"
    return f"| {measure} | {cells[0]} | {cells[1]} | {ratio} | {errors} |"


if __name__ == "__main__":
    raise SystemExit(main())
