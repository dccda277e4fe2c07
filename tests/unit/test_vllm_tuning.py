"""The serving settings the vllm_service role computes from a host's facts (filter vllm_tuning)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[2] / "plugins/filter/vllm_tuning.py"
_SPEC = importlib.util.spec_from_file_location("vllm_tuning", _PATH)
assert _SPEC and _SPEC.loader
tuning = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tuning)

GIB = 1024**3
# Qwen2.5-1.5B-Instruct's config.json (the fields the sizing reads).
QWEN_1_5B = {
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "hidden_size": 1536,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}
QWEN_WEIGHTS = 3_087_467_008  # model.safetensors of the real model, bytes
AUTO = {
    "dtype": "auto",
    "kvcache_space_gib": "auto",
    "max_model_len": "auto",
    "max_num_seqs": "16",
    "omp_threads_bind": "auto",
    "reserved_cpus": "auto",
    "tensor_parallel_size": "auto",
    "memory_max": "auto",
    "overhead_gib": "2",
    "system_reserve_gib": "1",
}


def _cpus(nodes: int, cores_per_node: int, threads: int = 1) -> list[dict[str, Any]]:
    """lscpu --json --extended rows (hyper-thread siblings numbered after all cores)."""
    total = nodes * cores_per_node
    return [
        {
            "cpu": t * total + c,
            "core": c,
            "socket": c // cores_per_node,
            "node": c // cores_per_node,
        }
        for t in range(threads)
        for c in range(total)
    ]


def test_recipe_vm_16_cores_32_gb_avx512_bf16() -> None:
    out = tuning.vllm_tuning(
        AUTO, ["avx2", "avx512f", "avx512_bf16"], _cpus(1, 16), 32768, QWEN_1_5B, QWEN_WEIGHTS
    )
    assert out["dtype"] == "bfloat16"
    assert out["kv_bytes_per_token"] == 2 * 28 * 2 * 128 * 2  # 28 KiB per token
    assert out["max_model_len"] == 8192
    # 16 sequences x 8192 tokens x 28 KiB = 3.5 GiB -> 4 GiB
    assert out["kvcache_space_gib"] == 4
    assert out["omp_threads_bind"] == "1-15"  # core 0 left to the API front end
    assert out["tensor_parallel_size"] == 1
    assert out["memory_max"] == 31 * GIB
    assert out["problems"] == []


def test_avx2_only_cpu_serves_float32_and_sizes_kv_for_it() -> None:
    out = tuning.vllm_tuning(AUTO, ["avx2", "fma"], _cpus(1, 8), 32768, QWEN_1_5B, QWEN_WEIGHTS)
    assert out["dtype"] == "float32"
    assert out["kv_bytes_per_token"] == 2 * 28 * 2 * 128 * 4
    assert out["weights_gib"] == pytest.approx(2 * QWEN_WEIGHTS / GIB, abs=0.01)


def test_hyper_threads_are_left_out_and_numa_nodes_become_ranks() -> None:
    out = tuning.vllm_tuning(
        AUTO, ["avx512f"], _cpus(2, 8, threads=2), 65536, QWEN_1_5B, QWEN_WEIGHTS
    )
    assert out["tensor_parallel_size"] == 2
    assert out["omp_threads_bind"] == "1-7|9-15"


def test_two_core_host_keeps_both_cores_for_compute_unless_told() -> None:
    out = tuning.vllm_tuning(AUTO, ["avx512f"], _cpus(1, 2), 24000, QWEN_1_5B, QWEN_WEIGHTS)
    assert out["omp_threads_bind"] == "0-1"  # auto reserves nothing below 8 cores per rank
    told = dict(AUTO, reserved_cpus="1")
    out = tuning.vllm_tuning(told, ["avx512f"], _cpus(1, 2), 24000, QWEN_1_5B, QWEN_WEIGHTS)
    assert out["omp_threads_bind"] == "1"


@pytest.mark.parametrize(("cores", "bind"), [(4, "0-3"), (7, "0-6"), (8, "1-7"), (16, "1-15")])
def test_auto_reserves_a_core_from_eight_cores_per_rank(cores: int, bind: str) -> None:
    out = tuning.vllm_tuning(AUTO, ["avx512f"], _cpus(1, cores), 65536, QWEN_1_5B, QWEN_WEIGHTS)
    assert out["omp_threads_bind"] == bind


def test_single_core_host_reserves_nothing() -> None:
    out = tuning.vllm_tuning(AUTO, ["avx512f"], _cpus(1, 1), 24000, QWEN_1_5B, QWEN_WEIGHTS)
    assert out["omp_threads_bind"] == "0"


def test_small_host_gets_a_shorter_context_instead_of_a_crash() -> None:
    out = tuning.vllm_tuning(AUTO, ["avx512f"], _cpus(1, 4), 7 * 1024, QWEN_1_5B, QWEN_WEIGHTS)
    assert out["problems"] == []
    assert out["kvcache_space_gib"] >= 1
    assert out["max_model_len"] <= out["kv_tokens"]


def test_oversized_kv_cache_is_a_problem_with_the_numbers() -> None:
    settings = dict(AUTO, kvcache_space_gib="40")
    out = tuning.vllm_tuning(settings, ["avx512f"], _cpus(1, 16), 32768, QWEN_1_5B, QWEN_WEIGHTS)
    assert len(out["problems"]) == 1
    assert "KV cache 40 GiB" in out["problems"][0]
    assert "does not fit in 31.00 GiB" in out["problems"][0]


def test_context_longer_than_the_kv_cache_is_a_problem() -> None:
    settings = dict(AUTO, kvcache_space_gib="1", max_model_len="65536")
    out = tuning.vllm_tuning(settings, ["avx512f"], _cpus(1, 16), 32768, QWEN_1_5B, QWEN_WEIGHTS)
    assert any("max_model_len 65536" in p for p in out["problems"])


def test_explicit_values_win() -> None:
    settings = dict(AUTO, dtype="float32", omp_threads_bind="0-3", memory_max="12G")
    out = tuning.vllm_tuning(
        settings, ["avx512_bf16"], _cpus(1, 16), 32768, QWEN_1_5B, QWEN_WEIGHTS
    )
    assert (out["dtype"], out["omp_threads_bind"], out["memory_max"]) == ("float32", "0-3", "12G")


@pytest.mark.parametrize(
    ("cpus", "text"), [([0, 1, 2, 5, 7, 8], "0-2,5,7-8"), ([3], "3"), ([], "")]
)
def test_cpu_ranges(cpus: list[int], text: str) -> None:
    assert tuning.cpu_ranges(cpus) == text


def test_lscpu_dashes_for_unknown_numa_nodes_are_node_zero() -> None:
    rows = [{"cpu": 0, "core": 0, "socket": 0, "node": "-"}, {"cpu": 1, "core": 1, "socket": 0}]
    assert tuning.physical_cores(rows) == {0: [0, 1]}


# Quantized checkpoints as Qwen publishes them (the quantization_config of their config.json).
AWQ = {
    **QWEN_1_5B,
    "torch_dtype": "float16",
    "quantization_config": {"quant_method": "awq", "bits": 4},
}
GPTQ_INT8 = {**QWEN_1_5B, "quantization_config": {"quant_method": "gptq", "bits": 8}}
W8A8 = {
    **QWEN_1_5B,
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {"weights": {"num_bits": 8}, "input_activations": {"num_bits": 8}}
        },
    },
}
AVX2 = ["avx2", "fma"]
AVX512 = ["avx2", "avx512f", "avx512bw"]


def test_int4_needs_avx512_and_says_why() -> None:
    out = tuning.vllm_tuning(AUTO, AVX2, _cpus(1, 16), 32768, AWQ, 1_100_000_000)
    assert out["quantization"] == "awq w4"
    assert any("need AVX-512" in p and "cpu_gemm_wna16" in p for p in out["problems"])


def test_int4_on_avx512_is_served_in_bf16_at_its_packed_size() -> None:
    out = tuning.vllm_tuning(AUTO, AVX512, _cpus(1, 16), 32768, AWQ, 1_100_000_000)
    assert out["problems"] == []
    assert out["dtype"] == "bfloat16"
    assert out["weights_gib"] == round(1_100_000_000 / GIB, 2)


def test_int4_with_float32_activations_is_refused() -> None:
    out = tuning.vllm_tuning({**AUTO, "dtype": "float32"}, AVX512, _cpus(1, 4), 32768, AWQ, 10**9)
    assert any("bfloat16 or float16 activations, not float32" in p for p in out["problems"])


def test_gptq_8_bit_has_no_cpu_kernel() -> None:
    out = tuning.vllm_tuning(AUTO, AVX512, _cpus(1, 4), 32768, GPTQ_INT8, 2 * 10**9)
    assert any("GPTQ 8-bit weights have no CPU kernel" in p for p in out["problems"])


def test_w8a8_int8_runs_on_avx2_without_the_fp32_weight_doubling() -> None:
    out = tuning.vllm_tuning(AUTO, AVX2, _cpus(1, 16), 32768, W8A8, 1_800_000_000)
    assert out["quantization"] == "compressed-tensors w8a8"
    assert out["problems"] == []
    assert out["dtype"] == "float32"
    assert out["weights_gib"] == round(1_800_000_000 / GIB, 2)


@pytest.mark.parametrize(
    ("flags", "slow"),
    [
        (AVX2, True),
        (AVX512, False),  # AVX-512 without VNNI (Skylake-SP): not measured, no warning
        ([*AVX512, "avx512_vnni"], False),
        ([*AVX2, "avx_vnni"], False),
        ([*AVX512, "amx_int8"], False),
    ],
)
def test_w8a8_without_an_int8_dot_product_is_served_with_a_warning(
    flags: list[str], slow: bool
) -> None:
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, W8A8, 1_800_000_000)
    assert out["problems"] == []
    assert bool(out["warnings"]) is slow
    if slow:
        assert "reference int8 gemm" in out["warnings"][0]
        assert "unquantized" in out["warnings"][0]


AMD, INTEL = "AuthenticAMD", "GenuineIntel"
AMX = [*AVX512, "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]


@pytest.mark.parametrize(
    ("flags", "vendor", "slow"),
    [
        (AVX2, INTEL, False),  # refused there (no 4-bit kernel), not warned
        (AVX512, INTEL, True),
        (AVX512, "", True),  # a caller that does not say
        ([*AVX512, "avx512_bf16", "avx512_vnni"], AMD, True),  # the AMD EPYC it was measured on
        (AMX, INTEL, False),
    ],
)
def test_awq_and_gptq_4bit_without_amx_are_served_with_a_warning(
    flags: list[str], vendor: str, slow: bool
) -> None:
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, AWQ, 1_100_000_000, vendor, True)
    warned = [w for w in out["warnings"] if w.startswith("AWQ 4-bit weights are slow on this CPU")]
    assert bool(warned) is slow
    assert len(out["warnings"]) == len(warned)
    if slow:
        assert out["problems"] == []
        assert "a W8A8 int8 checkpoint" in warned[0]
        # on AMD, the 4-bit format zentorch's GEMMs take
        assert ("compressed-tensors W4A16" in warned[0]) is (vendor == AMD)


@pytest.mark.parametrize("config", [AWQ, QWEN_1_5B])
def test_only_w8a8_gets_the_int8_warning(config: dict) -> None:
    out = tuning.vllm_tuning(AUTO, AVX2, _cpus(1, 16), 32768, config, 1_800_000_000)
    assert out["warnings"] == []


# FP8 checkpoints in the three layouts they are published in (tests/fixtures/make_tiny_qwen2.py
# writes the first two): llm-compressor's FP8_DYNAMIC (RedHatAI's "-FP8-dynamic"), vLLM's own fp8
# method with 128x128 blocks (Qwen3's "-FP8"), and compressed-tensors with one scale per tensor.
def _fp8_compressed(strategy: str) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy}
    activations = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
    group = {"weights": weights, "input_activations": activations}
    config = {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}
    return {**QWEN_1_5B, "quantization_config": config}


FP8_DYNAMIC = _fp8_compressed("channel")
FP8_PER_TENSOR = _fp8_compressed("tensor")
FP8_BLOCK = {
    **QWEN_1_5B,
    "quantization_config": {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}
AMX = [*AVX512, "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]


@pytest.mark.parametrize("flags", [AVX2, AVX512, [*AVX512, "avx512_bf16", "avx512_vnni"], AMX])
def test_fp8_per_channel_is_served_on_every_cpu_and_not_as_int8(flags: list[str]) -> None:
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, FP8_DYNAMIC, 1_800_000_000)
    assert out["quantization"] == "compressed-tensors w8a8 fp8"
    assert out["problems"] == []
    # the int8 warning is about oneDNN's int8 gemm, not FP8; FP8's own was measured slow on AVX2
    # and on AVX-512 with BF16, not on AMX hosts
    assert not any("int8" in w for w in out["warnings"])
    assert bool(out["warnings"]) is (flags != AMX)
    if flags != AMX:
        assert "FP8 is very slow on this CPU" in out["warnings"][0]
    assert out["weights_gib"] == round(1_800_000_000 / GIB, 2)


def test_fp8_blocks_need_amx_and_bf16_activations() -> None:
    out = tuning.vllm_tuning(AUTO, AVX2, _cpus(1, 16), 32768, FP8_BLOCK, 1_800_000_000)
    assert out["quantization"] == "fp8 w8a8 block"
    assert any("need AMX" in p and "amx_tile" in p for p in out["problems"])
    assert any("bfloat16 or float16 activations, not float32" in p for p in out["problems"])
    assert tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, FP8_BLOCK, 10**9)["problems"] == []
    fp32 = tuning.vllm_tuning({**AUTO, "dtype": "float32"}, AMX, _cpus(1, 16), 32768, FP8_BLOCK, 1)
    assert [p for p in fp32["problems"] if "activations" in p]


@pytest.mark.parametrize("flags", [AVX2, AMX])
def test_fp8_with_one_scale_per_tensor_is_refused_everywhere(flags: list[str]) -> None:
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, FP8_PER_TENSOR, 1_800_000_000)
    assert any(
        "one scale per tensor" in p and "static_scaled_fp8_quant" in p for p in out["problems"]
    )
    per_tensor_fp8_method = {**FP8_BLOCK, "quantization_config": {"quant_method": "fp8"}}
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, per_tensor_fp8_method, 10**9)
    assert any("one scale per tensor" in p for p in out["problems"])


def test_float_weights_other_than_fp8_are_refused() -> None:
    nvfp4 = _fp8_compressed("tensor_group")
    nvfp4["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    out = tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, nvfp4, 10**9)
    assert any("(4-bit float weights) is not one this role serves" in p for p in out["problems"])


def _groups(*groups: dict | None) -> dict:
    config_groups = {f"group_{i}": group for i, group in enumerate(groups)}
    config = {"quant_method": "compressed-tensors", "config_groups": config_groups}
    return {**QWEN_1_5B, "quantization_config": config}


def _group(config: dict) -> dict:
    return config["quantization_config"]["config_groups"]["group_0"]


def test_weight_only_fp8_has_no_cpu_kernel() -> None:
    weights = {"num_bits": 8, "type": "float", "strategy": "channel"}
    out = tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, _groups({"weights": weights}), 10**9)
    assert out["quantization"] == "compressed-tensors w8 fp8"
    assert any("weight-only FP8" in p and "no CPU kernel" in p for p in out["problems"])


def test_every_config_group_is_checked_not_only_the_last() -> None:
    w4a16 = {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}
    mixed = _groups(w4a16, _group(W8A8))
    out = tuning.vllm_tuning(AUTO, AVX2, _cpus(1, 16), 32768, mixed, 10**9)
    assert out["quantization"] == "compressed-tensors w4 + w8a8"
    assert any("4-bit weights need AVX-512" in p for p in out["problems"])
    assert any("W8A8 int8 is slow" in w for w in out["warnings"])
    # a per-tensor FP8 group is refused whichever group comes last
    groups = (_group(FP8_PER_TENSOR), _group(FP8_DYNAMIC))
    for order in (groups, groups[::-1]):
        out = tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, _groups(*order), 10**9)
        assert any("one scale per tensor" in p for p in out["problems"])
    # identical groups are one scheme; a null group is no scheme
    same = _groups(_group(W8A8), None, _group(W8A8))
    assert tuning.vllm_tuning(AUTO, AVX512, _cpus(1, 16), 32768, same, 10**9)["quantization"] == (
        "compressed-tensors w8a8"
    )


def test_compressed_tensors_defaults_are_its_own() -> None:
    # no strategy and no group_size: compressed-tensors means one scale per tensor
    fp8 = _fp8_compressed("channel")
    del _group(fp8)["weights"]["strategy"]
    out = tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, fp8, 10**9)
    assert any("one scale per tensor" in p for p in out["problems"])
    _group(fp8)["weights"]["group_size"] = -1  # -1: per output channel
    assert tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, fp8, 10**9)["problems"] == []
    # no num_bits: 8, so float weights without it are FP8
    del _group(fp8)["weights"]["num_bits"]
    out = tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, fp8, 10**9)
    assert (out["quantization"], out["problems"]) == ("compressed-tensors w8a8 fp8", [])


def test_8_bit_integer_weights_without_int8_activations_have_no_cpu_kernel() -> None:
    w8a16 = _groups({"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}})
    out = tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, w8a16, 10**9)
    assert any("W8A16 8-bit weights have no CPU kernel" in p for p in out["problems"])


@pytest.mark.parametrize(
    ("block", "fits"),
    [([128, 128], True), ([32, 128], True), ([64, 64], False), ([100, 128], False), ([], False)],
)
def test_fp8_blocks_must_fit_the_cpu_kernel(block: list[int], fits: bool) -> None:
    amx_tile_only = [*AVX512, "amx_tile"]  # the block kernel asks for AMX tiles, nothing more
    fp8_method = {**FP8_BLOCK, "quantization_config": {"quant_method": "fp8"}}
    fp8_method["quantization_config"]["weight_block_size"] = block
    ct_block = _fp8_compressed("block")
    _group(ct_block)["weights"]["block_structure"] = block
    for config in (fp8_method, ct_block) if block else (ct_block,):
        out = tuning.vllm_tuning(AUTO, amx_tile_only, _cpus(1, 16), 32768, config, 10**9)
        assert bool(out["problems"]) is not fits, out["problems"]
        if not fits:
            assert any("do not fit vLLM 0.32's CPU kernel" in p for p in out["problems"])
    out = tuning.vllm_tuning(AUTO, AVX512, _cpus(1, 16), 32768, ct_block, 10**9)
    assert out["quantization"] == "compressed-tensors w8a8 fp8 block"
    assert any("need AMX" in p for p in out["problems"])


def test_compressed_tensors_without_config_groups_is_refused() -> None:
    out = tuning.vllm_tuning(AUTO, AMX, _cpus(1, 16), 32768, _groups(), 10**9)
    assert any("without config_groups" in p for p in out["problems"])


def test_unquantized_models_are_unchanged() -> None:
    out = tuning.vllm_tuning(AUTO, AVX2, _cpus(1, 16), 32768, QWEN_1_5B, QWEN_WEIGHTS)
    assert out["quantization"] == "none"
    assert out["weights_gib"] == round(QWEN_WEIGHTS * 2 / GIB, 2)


# llm-compressor's W4A16 (int4 weights in groups of 128, activations unquantized)
W4A16 = {
    **QWEN_1_5B,
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {
                "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}
            }
        },
    },
}


@pytest.mark.parametrize(
    ("flags", "vendor", "slow"),
    [
        # zentorch's 4-bit GEMMs take this packing on AMD with AVX-512, measured fast there
        ([*AVX512, "avx512_bf16", "avx512_vnni"], AMD, False),
        # elsewhere without AMX it runs vLLM's cpu_gemm_wna16, as GPTQ does
        (AVX512, INTEL, True),
        (AVX512, "", True),
        (AMX, INTEL, False),
    ],
)
def test_compressed_tensors_w4a16_is_warned_off_amd_without_amx(
    flags: list[str], vendor: str, slow: bool
) -> None:
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, W4A16, 1_100_000_000, vendor, True)
    assert out["problems"] == []
    assert [w.split(":")[0] for w in out["warnings"]] == (
        ["compressed-tensors W4A16 is slow on this CPU"] if slow else []
    )


def test_4bit_on_an_amd_cpu_without_zentorch_is_warned_and_not_pointed_at_w4a16() -> None:
    # vllm_install_zendnn: false, or a lock without zentorch: vLLM keeps cpu_gemm_wna16 there
    flags = [*AVX512, "avx512_bf16", "avx512_vnni"]
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, W4A16, 1_100_000_000, AMD, False)
    assert [w.split(":")[0] for w in out["warnings"]] == [
        "compressed-tensors W4A16 is slow on this CPU"
    ]
    assert "vllm_install_zendnn: true" in out["warnings"][0]
    # off AMD zentorch would not help
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, W4A16, 1_100_000_000, INTEL, False)
    assert len(out["warnings"]) == 1
    assert "vllm_install_zendnn" not in out["warnings"][0]
    out = tuning.vllm_tuning(AUTO, flags, _cpus(1, 16), 32768, AWQ, 1_100_000_000, AMD, False)
    assert len(out["warnings"]) == 1
    assert "compressed-tensors W4A16" not in out["warnings"][0]


@pytest.mark.parametrize(
    ("vendor", "flags", "zen"),
    [
        (AMD, AVX512, True),
        (AMD, AVX2, False),  # Zen 2/3: no AVX-512, vLLM keeps its own kernels
        (INTEL, AVX512, False),
        ("HygonGenuine", AVX512, False),
        ("", AVX512, False),
    ],
)
def test_zen_cpu_is_an_amd_cpu_with_avx512(vendor: str, flags: list[str], zen: bool) -> None:
    # the rule vllm_install's preflight (zentorch) and the benchmark's venv both take
    assert tuning.zen_cpu(vendor, flags) is zen
