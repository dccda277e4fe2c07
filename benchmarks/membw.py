"""Measure this host's memory bandwidth and dense compute throughput with torch, all cores.

STREAM-like kernels on tensors far larger than the caches: `read` (a sum over one tensor: the access
pattern of decoding, which reads every weight once per token) and `triad` (a = b + s * c, STREAM's
count of 3 x N x 4 bytes). Plus the float32 and bfloat16 throughput of one Qwen2.5-1.5B MLP
projection for a 512-token prompt (compute-bound), used only to estimate the benchmark's duration.
Runs in the benchmark's vLLM venv (torch 2.13.0+cpu). Prints one JSON object.

    python membw.py [--gib 1.0] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    n = int(args.gib * 1024**3) // 4
    nbytes = n * 4

    def gbps(times: list[float], moved: int) -> dict[str, float]:
        rates = [moved / t / 1e9 for t in times]
        return {
            "median": round(statistics.median(rates), 2),
            "min": round(min(rates), 2),
            "max": round(max(rates), 2),
        }

    def stream() -> tuple[list[float], list[float]]:
        a, b, c = (torch.ones(n, dtype=torch.float32) for _ in range(3))
        read = timed(lambda: a.sum(), args.runs)
        triad = timed(lambda: torch.add(b, c, alpha=3.0, out=a), args.runs)
        return read, triad

    read_times, triad_times = stream()
    read, triad = gbps(read_times, nbytes), gbps(triad_times, 3 * nbytes)

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
                "prompt_gemm_gflop_s": gemm,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
