"""Run with a server's Python: the kernel vLLM picks for a 4-bit layer, and what it computes.

Loads vLLM's general plugins as its processes do (the installed entry points), asks vLLM's kernel
selection for a GPTQ layer (uint4b8) and an AWQ-style one (uint4 with zero points), and, where
vLLM's own 4-bit kernel is built (ATen's AVX-512 kernels in use), computes random layers with the
chosen kernel and with vLLM's CPUWNA16LinearKernel, each against the weights dequantized by hand.
Prints one JSON object.
"""

import json
from importlib.metadata import entry_points

import torch
from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    pack_quantized_values_into_int32,
)
from vllm.plugins import load_general_plugins
from vllm.scalar_type import ScalarType, scalar_types

K, N, GROUP = 256, 96, 64
DIMS = {"input_dim": 0, "output_dim": 1}  # GPTQ's layout, as vLLM marks its parameters
PARAMS = ("w_q_param_name", "w_s_param_name", "w_zp_param_name")  # as vLLM passes the names


def layer(weight_type: ScalarType, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A GPTQ-layout layer (weights [K/8, N] packed along K) and its weights dequantized [K, N]:
    uint4b8 (GPTQ's), or uint4 with zero points (AWQ's, as vLLM converts it)."""
    zero_points = weight_type == scalar_types.uint4
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), dtype=torch.int32, generator=gen)
    scales = (torch.rand(K // GROUP, N, generator=gen) * 0.02 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (K // GROUP, N), dtype=torch.int32, generator=gen)
    m = torch.nn.Module()

    def param(name: str, data: torch.Tensor, **attrs: int) -> None:
        m.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
        for key, value in attrs.items():
            setattr(getattr(m, name), key, value)

    param("qweight", pack_quantized_values_into_int32(q, weight_type, 0), **DIMS, packed_dim=0)
    param("scales", scales, **DIMS)
    if zero_points:
        packed = pack_quantized_values_into_int32(zeros, weight_type, 1)
        param("qzeros", packed, **DIMS, packed_dim=1)
    m.bias = None
    z = zeros.float().repeat_interleave(GROUP, 0) if zero_points else 8.0
    return m, (q.float() - z) * scales.float().repeat_interleave(GROUP, 0)


def main() -> None:
    load_general_plugins()
    out = {
        "plugins": sorted(e.name for e in entry_points(group="vllm.general_plugins")),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "layers": {},
    }
    for zero_points in (False, True):
        weight_type = scalar_types.uint4 if zero_points else scalar_types.uint4b8
        shape = (K, N)
        config = MPLinearLayerConfig(shape, shape, weight_type, torch.bfloat16, GROUP, zero_points)
        names = ("qweight", "scales", "qzeros" if zero_points else None)
        try:
            chosen = choose_mp_linear_kernel(config)
        except ValueError as e:  # no 4-bit kernel on this CPU
            out["layers"][str(weight_type)] = {"chosen": None, "why": str(e)[-300:]}
            continue
        seen = {"chosen": chosen.__name__}
        out["layers"][str(weight_type)] = seen
        if out["capability"] != "AVX512":  # vLLM 0.32's 4-bit kernel is built for AVX-512 only
            continue
        x = torch.randn(5, K, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        for name, kernel in (("chosen", chosen), ("vllm", CPUWNA16LinearKernel)):
            m, weights = layer(weight_type, seed=1)
            k = kernel(config, **dict(zip(PARAMS, names, strict=True)))  # as vLLM calls it
            k.process_weights_after_loading(m)
            y = k.apply_weights(m, x).float()
            want = x.float() @ weights
            seen[f"{name}_error"] = (y - want).abs().max().item() / want.abs().max().item()
            seen[f"{name}_torch_int4pack"] = bool(getattr(m, "fleet_int4pack", False))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
