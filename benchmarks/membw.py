"""Measure this host's memory bandwidth and dense compute throughput with torch.

STREAM-like kernels on tensors far larger than the caches: `read` (a sum over one tensor: the access
pattern of decoding, which reads every weight once per token), `copy` (b = a: 2 x N x 4 bytes) and
`triad` (a = b + s * c, STREAM's count of 3 x N x 4 bytes), each with several thread counts (all
cores, half of them, one). The ceiling a decode is compared with is the BEST rate any of them
reached in any run (`ceiling_gb_s`): an upper bound, so that a server decoding above it shows a
measurement problem rather than a fast server. The all-core `read` and `triad` stay on record.
Plus the float32 and bfloat16 throughput of one Qwen2.5-1.5B MLP projection for a 512-token prompt
(compute-bound), used only to estimate the benchmark's duration. Runs in the benchmark's vLLM venv
(torch 2.13.0+cpu). Prints one JSON object.

    python membw.py [--gib 1.0] [--runs 15]

`--probe` measures only the all-core `read`, best of 5, once for each line on its standard input,
printing each rate (GB/s) on a line of its own: decode_profile.py --bandwidth asks it between the
requests of one stream.

    python membw.py --probe [--gib 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], runs: int, warmup: int = 2) -> list[float]:
    """Wall times of fn() after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Run the kernels and print their medians (and min/max) in GB/s and GFLOP/s."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of each tensor in GiB")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--probe", action="store_true", help="read rates on request (stdin lines)")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    n = int(args.gib * 1024**3) // 4
    nbytes = n * 4
    if args.probe:
        tensor = torch.ones(n, dtype=torch.float32)
        for _ in sys.stdin:
            print(round(nbytes / min(timed(lambda: tensor.sum(), 5, 1)) / 1e9, 2), flush=True)
        return

    def gbps(times: list[float], moved: int) -> dict[str, float]:
        rates = [moved / t / 1e9 for t in times]
        return {
            "median": round(statistics.median(rates), 2),
            "min": round(min(rates), 2),
            "max": round(max(rates), 2),
        }

    a, b, c = (torch.ones(n, dtype=torch.float32) for _ in range(3))
    kernels: dict[str, tuple[Callable[[], object], int]] = {
        "read": (lambda: a.sum(), nbytes),
        "copy": (lambda: b.copy_(a), 2 * nbytes),
        "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3 * nbytes),
    }
    sweep: dict[str, dict[str, dict[str, float]]] = {}
    for count in sorted({threads, max(1, threads // 2), 1}, reverse=True):
        torch.set_num_threads(count)
        sweep[str(count)] = {
            name: gbps(timed(fn, args.runs), moved) for name, (fn, moved) in kernels.items()
        }
    torch.set_num_threads(threads)
    best = max(
        ((rates["max"], count, name) for count, ks in sweep.items() for name, rates in ks.items()),
    )
    read, triad = sweep[str(threads)]["read"], sweep[str(threads)]["triad"]

    gemm = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(8960, 1536).to(dtype)
        x = torch.randn(512, 1536).to(dtype)
        t = statistics.median(timed(lambda x=x, w=w: torch.nn.functional.linear(x, w), 5, 1))
        gemm[str(dtype).removeprefix("torch.")] = round(2 * 512 * 1536 * 8960 / t / 1e9, 1)
    print(
        json.dumps(
            {
                "threads": threads,
                "tensor_gib": args.gib,
                "runs": args.runs,
                "read_gb_s": read,
                "triad_gb_s": triad,
                "ceiling_gb_s": {"value": best[0], "threads": int(best[1]), "kernel": best[2]},
                "sweep_gb_s": sweep,
                "prompt_gemm_gflop_s": gemm,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
