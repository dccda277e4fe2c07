"""This project's vLLM plugin (installed by roles/vllm_install): 4-bit layers through torch's GEMM.

On a CPU with AVX-512 and without AMX, vLLM 0.32 runs GPTQ and AWQ 4-bit layers with its
`cpu_gemm_wna16` kernel ("vec" path). torch's own int4 kernel (`_weight_int4pack_mm_for_cpu`, the
one torchao's CPU int4 layout calls) computes the same layers ~3x faster for one token on an AMD
EPYC (benchmarks/README.md, "4-bit layers through torch's int4 GEMM"). This plugin puts a
mixed-precision kernel first in vLLM's CPU list that repacks such a layer for torch's kernel once,
at load, and hands every layer it does not take to the kernel vLLM would have chosen: layers in a
format torch's kernel cannot take, and compressed-tensors W4A16 on vLLM's ZenDNN path (zentorch's
DA8W4 GEMM is faster there at 16 streams). On AMX CPUs (vLLM's W4A8 path) and below AVX-512
(torch's kernel is slower there) it registers nothing. Off: vllm_install_int4_kernel: false
(removed), or for one server VLLM_DISABLED_KERNELS=TorchInt4PackLinearKernel in its environment.

The servers restart for a new version only when `pip freeze` changes (roles/vllm_service): change
the version in the dist-info's METADATA (and its folder's name) with every change of this file.
"""

from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128, 256)  # what torch's _weight_int4pack_mm_for_cpu takes
ACT_TYPES = (torch.bfloat16, torch.float16, torch.float32)


def wanted() -> bool:
    """Where the kernel is measured faster: ATen's AVX-512 kernels in use, no AMX tiles."""
    return (
        torch.backends.cpu.get_cpu_capability() == "AVX512"
        and not torch.cpu._is_amx_tile_supported()
    )


def register() -> None:
    """vLLM's general-plugin entry point (run in each of its processes; idempotent)."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.platforms import PlatformEnum, current_platform

    if not current_platform.is_cpu() or not wanted():
        return
    kernels = _POSSIBLE_KERNELS.setdefault(PlatformEnum.CPU, [])
    if not any(k.__name__ == KERNEL for k in kernels):
        kernels.insert(0, kernel_class())


KERNEL = "TorchInt4PackLinearKernel"


def kernel_class() -> type:
    """The kernel class (built on first use: vLLM is imported only inside vLLM's processes)."""
    from vllm import envs
    from vllm.logger import init_logger
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearKernel,
        MPLinearLayerConfig,
    )
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        unpack_quantized_values_into_int32,
    )
    from vllm.platforms import PlatformEnum
    from vllm.scalar_type import scalar_types

    logger = init_logger("vllm.fleet_kernels")

    def others(c: MPLinearLayerConfig) -> list[type]:
        """The kernels after this one that can implement `c`, in vLLM's order."""
        return [
            k
            for k in _POSSIBLE_KERNELS.get(PlatformEnum.CPU, [])
            if k.__name__ != KERNEL
            and k.__name__ not in envs.VLLM_DISABLED_KERNELS
            and k.can_implement(c)[0]
        ]

    class TorchInt4PackLinearKernel(MPLinearKernel):
        """4-bit weights (GPTQ's uint4b8, AWQ's uint4 with zero points) through torch's kernel."""

        @classmethod
        def get_min_capability(cls) -> int:
            return -1

        @classmethod
        def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
            # only what another kernel can take too: it runs every layer this one leaves
            return (True, None) if others(c) else (False, "no other CPU kernel can implement it")

        def __init__(
            self,
            c: MPLinearLayerConfig,
            w_q_param_name: str,
            w_s_param_name: str,
            w_zp_param_name: str | None = None,
        ) -> None:
            names = (w_q_param_name, w_s_param_name, w_zp_param_name)
            super().__init__(c, *names)
            self.other = others(c)[0](c, *names)  # it takes the layers this one leaves

        def _takes(self, layer: torch.nn.Module) -> bool:
            c = self.config
            k, n = c.partition_weight_shape
            group = k if c.group_size == -1 else c.group_size
            zen = type(self.other).__name__ == "ZentorchWNA16LinearKernel"
            return (
                c.weight_type in (scalar_types.uint4, scalar_types.uint4b8)
                and c.act_type in ACT_TYPES
                and group in GROUP_SIZES
                and k % group == 0
                and n % 16 == 0
                # compressed-tensors' packing (weights [N, K/8]) on the ZenDNN path: zentorch's
                and not (zen and getattr(layer, self.w_q_name).input_dim == 1)
            )

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            layer.fleet_int4pack = self._takes(layer)
            if not layer.fleet_int4pack:
                logger.info_once("4-bit layers left to %s", type(self.other).__name__)
                self.other.process_weights_after_loading(layer)
                return
            c = self.config
            w_q, w_s, w_zp = self._get_weight_params(layer)
            # GPTQ's layout: weights [K/8, N] packed along K, scales [G, N], zero points [G, N/8]
            # packed along N (compressed-tensors stores each transposed)
            packed = w_q.data.t() if w_q.input_dim == 1 else w_q.data
            scales = (w_s.data.t() if w_s.output_dim == 0 else w_s.data).float()
            q = unpack_quantized_values_into_int32(packed, c.weight_type, 0)  # [K, N], 0..15
            if c.zero_points:
                zp = w_zp.data.t() if w_zp.output_dim == 0 else w_zp.data
                zeros = unpack_quantized_values_into_int32(zp, c.weight_type, 1).float()
            else:
                zeros = torch.full_like(scales, 8.0)  # uint4b8: w = (q - 8) * s
            # torch's kernel computes w = (q - 8) * scale + zero, so zero = (8 - z) * s
            scales_and_zeros = torch.stack([scales, (8.0 - zeros) * scales], dim=2)
            layer.fleet_group = q.shape[0] // scales.shape[0]
            layer.fleet_weight = torch.nn.Parameter(
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 1),
                requires_grad=False,
            )
            layer.fleet_scales_and_zeros = torch.nn.Parameter(
                scales_and_zeros.to(c.act_type).contiguous(), requires_grad=False
            )
            for name in (self.w_q_name, self.w_s_name, self.w_zp_name):
                if name is not None and getattr(layer, name, None) is not None:
                    getattr(layer, name).data = torch.empty(0)  # the checkpoint's copy, freed
            logger.info_once("4-bit layers through torch's int4 GEMM (%s)", KERNEL)

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            if not layer.fleet_int4pack:
                return self.other.apply_weights(layer, x, bias)
            shape = x.shape
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, shape[-1]),
                layer.fleet_weight,
                layer.fleet_group,
                layer.fleet_scales_and_zeros,
            )
            if bias is not None:
                out = out + bias
            return out.reshape(*shape[:-1], out.shape[-1])

    TorchInt4PackLinearKernel.__name__ = TorchInt4PackLinearKernel.__qualname__ = KERNEL
    return TorchInt4PackLinearKernel
