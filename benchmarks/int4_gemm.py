"""vLLM's 4-bit GEMM against torch's, for one Qwen2.5-1.5B decoder layer and its lm_head.

Times, on random weights in each kernel's packed layout (groups of 128 inputs, bf16 activations):
- vLLM 0.32's `cpu_gemm_wna16` with its "vec" ISA hint: what vLLM runs GPTQ and AWQ 4-bit layers
  with on a CPU with AVX-512 and no AMX (its kernel is built for AVX-512 only);
- torch's `_weight_int4pack_mm_for_cpu`: what roles/vllm_install's plugin runs them with there;
- bf16 `torch.nn.functional.linear`, for scale;
for M = 1, 16, 64 and 512 tokens at once: the layer's four projections (fused q/k/v, o, fused
gate/up, down) summed, and the 151,936 x 1,536 lm_head of a checkpoint that quantizes it (M = 1).
Run with the vLLM environment's Python, e.g.

    .cache/bench/vllm-venv-*/bin/python benchmarks/int4_gemm.py

Prints one JSON line per (kernel, M): median milliseconds over 20 runs (3 warm-up) and the
bytes per second of its weights (4 bits, or 16 for bf16; scales not counted) that implies, with the
CPU's model and instruction sets.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import vllm._custom_ops as ops
from dtype_matmul import median_seconds
from servebench import configs

GROUP = 128
LAYER = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]  # (N outputs, K inputs)
HEAD = [(151936, 1536)]


def kernels(n: int, k: int, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each kernel's call for an N x K layer on activations x, its weights packed for it."""
    vllm_w = torch.randint(-(2**31), 2**31 - 1, (n // 16, k * 16 // 8), dtype=torch.int32)
    vllm_s = torch.rand(k // GROUP, n, dtype=torch.bfloat16) * 0.01
    torch_w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32), 1
    )
    torch_sz = torch.rand(k // GROUP, n, 2, dtype=torch.bfloat16) * 0.01
    bf16_w = torch.randn(n, k, dtype=torch.bfloat16)
    return {
        "vllm_cpu_gemm_wna16": lambda: ops.cpu_gemm_wna16(x, vllm_w, vllm_s, None, None, 8, "vec"),
        "torch_int4pack_mm": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, torch_w, GROUP, torch_sz
        ),
        "bf16_linear": lambda: torch.nn.functional.linear(x, bf16_w),
    }


def main() -> None:
    """Time each kernel on the layer and the head, and print the results."""
    torch.manual_seed(0)
    host = {
        **configs.cpu_record(configs.host_facts()),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    for shapes, what, ms in ((LAYER, "decoder layer", (1, 16, 64, 512)), (HEAD, "lm_head", (1,))):
        for m in ms:
            total: dict[str, float] = {}
            for n, k in shapes:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                for name, fn in kernels(n, k, x).items():
                    total[name] = total.get(name, 0.0) + median_seconds(fn) * 1000
            weights = sum(n * k for n, k in shapes)
            for name, t in total.items():
                size = weights * 2 if name == "bf16_linear" else weights / 2  # bytes of its weights
                line = {"what": what, "kernel": name, "m": m, "median_ms": round(t, 3)}
                line["weight_gb_per_s"] = round(size / t / 1e6, 1)
                print(json.dumps({**line, **host}), flush=True)


if __name__ == "__main__":
    main()
