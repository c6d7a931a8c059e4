"""CPU fp32 throughput (images/s) of ConvNeXt-T (GELU, ReLU) and ResNet-50, contiguous vs channels_last, as Markdown."""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench.host import cores_description, cpu_model
from convnext_common import CliParser, add_version_argument, positive_int, usable_cpus
from model import create_model
from model.flops import measure

MODELS = (("convnext_tiny", "gelu"), ("convnext_tiny", "relu"), ("resnet50", "relu"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m bench torch", description=__doc__)
    add_version_argument(parser)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16])
    parser.add_argument("--input-size", type=positive_int, default=224)
    parser.add_argument("--warmup-iters", type=positive_int, default=3)
    parser.add_argument("--timed-iters", type=positive_int, default=10)
    parser.add_argument("--threads", type=positive_int, default=usable_cpus(),
                        help="default: every core this process may use")
    return parser


def images_per_second(model, batch_size: int, input_size: int, channels_last: bool, warmup: int, timed: int) -> float:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch_size, 3, input_size, input_size).to(memory_format=memory_format)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        start = time.perf_counter()
        for _ in range(timed):
            model(x)
        elapsed_s = time.perf_counter() - start
    return batch_size * timed / elapsed_s


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {cores_description()}, "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), fp32, eval, inference_mode, "
          f"{args.warmup_iters} warm-up + {args.timed_iters} timed iterations\n")
    header = ["model", "activation", "params (M)", "GMACs"]
    header += [f"bs{b} {layout} (img/s)" for b in args.batch_sizes for layout in ("contiguous", "channels_last")]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, activation in MODELS:
        cost = measure(name, args.input_size, activation=activation)
        model = create_model(name, activation=activation).eval()
        row = [name, activation, f"{cost.params_m:.1f}", f"{cost.gmacs:.2f}"]
        for batch_size in args.batch_sizes:
            for channels_last in (False, True):
                rate = images_per_second(model, batch_size, args.input_size, channels_last, args.warmup_iters,
                                         args.timed_iters)
                row.append(f"{rate:.1f}")
        print("| " + " | ".join(row) + " |", flush=True)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


if __name__ == "__main__":
    main()
