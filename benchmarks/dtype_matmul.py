"""Which dtype is fastest for a Qwen2.5-1.5B linear layer on this CPU, per instruction set.

Times torch.nn.functional.linear for one decoded token (M=1, memory-bound) and a 512-token prompt
(M=512, compute-bound) with the MLP's up projection (1536 -> 8960), in float32 and bfloat16. Run it
once per ISA cap to see what an older CPU would do, e.g.:

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/dtype_matmul.py
    python benchmarks/dtype_matmul.py

FP8 (float8_e4m3fn weights) is timed as vLLM 0.32 runs a per-channel FP8 layer on a CPU without
AMX-FP8 (ChannelWiseTorchFP8ScaledMMLinearKernel): torch._scaled_mm of the FP8 token and weights
into float32, for M=1 only (the prompt size takes minutes there).

Prints one JSON line per (dtype, M): median time over 20 runs and the weight bandwidth it implies,
with the CPU's model and instruction sets.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from servebench import configs


def median_seconds(fn: Callable[[], object], runs: int = 20) -> float:
    """Median wall time of fn() after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """vLLM 0.32's ChannelWiseTorchFP8ScaledMMLinearKernel, without its scales' multiply."""
    one = torch.ones(1, dtype=torch.float32)
    return torch._scaled_mm(x, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)


def main() -> None:
    """Time the layer in each dtype and print the results."""
    torch.manual_seed(0)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    host = configs.cpu_record(configs.host_facts())
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        weight = (torch.randn(8960, 1536) * 0.05).to(dtype)
        for m in (1,) if dtype == torch.float8_e4m3fn else (1, 512):
            x = torch.randn(m, 1536).to(dtype)
            if dtype == torch.float8_e4m3fn:
                fn = lambda x=x, w=weight: fp8_linear(x, w)  # noqa: E731
            else:
                fn = lambda x=x, w=weight: torch.nn.functional.linear(x, w)  # noqa: E731
            seconds = median_seconds(fn)
            weight_bytes = weight.numel() * weight.element_size()
            print(
                json.dumps(
                    {
                        "isa": isa,
                        "threads": torch.get_num_threads(),
                        "dtype": str(dtype).removeprefix("torch."),
                        "m": m,
                        "median_ms": round(seconds * 1000, 3),
                        "weight_gb_per_s": round(weight_bytes / seconds / 1e9, 1),
                        **host,
                    }
                )
            )


if __name__ == "__main__":
    main()
