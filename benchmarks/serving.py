"""Serving benchmark (issue #7): the recipe's vLLM, this project's tuned vLLM and llama.cpp's
server, one after another on this host, on one random-weight model, against the bandwidth limit.

    python benchmarks/serving.py                      # Qwen2.5-1.5B-Instruct's shape, 3 runs
    python benchmarks/serving.py --model-preset tiny --runs 1 --decode-tokens 16 ...   # a smoke run

Everything it needs is made once and cached under .cache/bench/ (model, vLLM venv, llama-server,
GGUF); see benchmarks/README.md. Servers listen on 127.0.0.1 only (ports --base-port, +1, +2) and
are stopped by their process group, also on Ctrl-C, SIGTERM or an error. Each configuration and run
appends one JSON line to benchmarks/results/serving.jsonl; the summary table is printed and written
to benchmarks/results/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import yaml
from servebench import BENCH_CACHE, REPO, RESULTS, artifacts, client, configs, limits, procs
from servebench.artifacts import log

FLAGS_OF_INTEREST = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
GIB = 1024**3
# --precision: the fixture's quantization of the preset for vLLM (make_tiny_qwen2.py --quant) and
# the GGUF type llama.cpp's converter makes from the bf16 model (None: the weights' own precision)
PRECISIONS = {
    "bf16": ("none", None),
    "int8": ("w8a8", "q8_0"),
    "int8-head": ("w8a8-head", "q8_0"),
    "fp8": ("fp8-dynamic", "q8_0"),
    "int4": ("gptq-int4", "q4_k_m"),
    "int4-head": ("gptq-int4-head", "q4_k_m-head4"),
    "awq": ("awq", "q4_k_m"),
    "w4a16": ("w4a16", "q4_k_m"),
}
# what each side serves at that precision (the summary's model line)
PRECISION_TEXT = {
    "int8": "vLLM serves this shape in compressed-tensors W8A8 int8, llama.cpp the bf16 model"
    " converted to GGUF Q8_0",
    "int8-head": "vLLM serves this shape in compressed-tensors W8A8 int8 with lm_head in int8 too"
    " (untied), llama.cpp the bf16 model converted to GGUF Q8_0 (its output projection in Q8_0)",
    "fp8": "vLLM serves this shape in compressed-tensors FP8 (float8 e4m3 weights, one scale per"
    " output channel, per-token activations: llm-compressor's FP8_DYNAMIC), llama.cpp the bf16"
    " model converted to GGUF Q8_0",
    "int4": "vLLM serves this shape in GPTQ 4-bit (group 128, float16 scales), llama.cpp the bf16"
    " model converted to GGUF and quantized to Q4_K_M",
    "int4-head": "vLLM serves this shape in GPTQ 4-bit with lm_head in 4 bits too (untied),"
    " llama.cpp the bf16 model converted to GGUF and quantized to Q4_K_M with its output"
    " projection in Q4_K too (llama-quantize --output-tensor-type q4_k)",
    "awq": "vLLM serves this shape in AWQ 4-bit (AutoAWQ's GEMM format: group 128, zero points,"
    " float16 scales), llama.cpp the bf16 model converted to GGUF and quantized to Q4_K_M",
    "w4a16": "vLLM serves this shape in compressed-tensors W4A16 (4-bit, group 128, bf16 scales and"
    " activations), llama.cpp the bf16 model converted to GGUF and quantized to Q4_K_M",
}
MIB = 1024**2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument(
        "--model-preset",
        choices=sorted(artifacts.MODEL_DIRS),
        default="qwen2.5-1.5b-instruct",
        help="random-weight model made by tests/fixtures/make_tiny_qwen2.py (cached)",
    )
    which.add_argument("--model", type=Path, help="serve this model folder instead")
    ap.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="bf16",
        help="int8: vLLM serves the preset's model in compressed-tensors W8A8 int8, llama.cpp the"
        " same shape as GGUF Q8_0 (summary in serving-int8.md); int8-head: the same with lm_head"
        " quantized too (serving-int8-head.md); fp8: compressed-tensors FP8"
        " (per-channel scales) against Q8_0 (serving-fp8.md); int4: GPTQ 4-bit against GGUF"
        " Q4_K_M (serving-int4.md); int4-head: the same with lm_head quantized too"
        " (serving-int4-head.md); awq: AWQ 4-bit against Q4_K_M (serving-awq.md); w4a16:"
        " compressed-tensors W4A16 against Q4_K_M (serving-w4a16.md)",
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (medians)")
    ap.add_argument(
        "--runs-for",
        action="append",
        default=[],
        metavar="NAME=N",
        help="another number of runs for one configuration, e.g. recipe=1 (repeatable)",
    )
    ap.add_argument(
        "--configs",
        default=",".join(configs.CONFIG_NAMES),
        help="comma-separated subset of " + ",".join(configs.CONFIG_NAMES),
    )
    ap.add_argument("--decode-tokens", type=int, default=64, help="single-stream output tokens")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for TTFT")
    ap.add_argument("--stream-tokens", type=int, default=32, help="output tokens per stream")
    ap.add_argument("--concurrency", default="1,4,16,32", help="concurrent streams to measure")
    ap.add_argument(
        "--short-prompt-tokens", type=int, default=8, help="prompt of the decode/stream requests"
    )
    ap.add_argument(
        "--chat",
        default="8,256,64,32",
        metavar="TURNS,SYSTEM,QUESTION,ANSWER",
        help="the multi-turn chat: turns, and the tokens of the system prompt, of each question"
        " and of each answer; run with and without prefix caching (0: no chat)",
    )
    ap.add_argument(
        "--restart-each-run",
        action="store_true",
        help="start every server anew for each run (default: once per configuration)",
    )
    ap.add_argument(
        "--tuned-set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="override one of roles/vllm_service's defaults for the tuned configuration, as"
        " inventory would (VALUE is YAML), e.g. vllm_service_reserved_cpus=0 (repeatable)",
    )
    ap.add_argument(
        "--vllm-extra",
        action="append",
        default=[],
        metavar="NAME==VERSION",
        help="a pinned package added to the vLLM venv of recipe and tuned, in a venv of its own"
        " (repeatable)",
    )
    ap.add_argument(
        "--no-zendnn",
        action="store_true",
        help="tuned without vLLM's ZenDNN path, as vllm_install_zendnn: false (by default tuned"
        " gets the role's zentorch on an AMD CPU with AVX-512, as the role installs it there)",
    )
    ap.add_argument(
        "--recipe-kvcache-gib",
        type=int,
        default=4,
        help="VLLM_CPU_KVCACHE_SPACE of the recipe (older vLLM's default; 0: unset, see README)",
    )
    ap.add_argument("--base-port", type=int, default=18000, help="ports base, +1, +2 on 127.0.0.1")
    ap.add_argument("--start-timeout", type=float, default=3600, help="seconds to wait for /health")
    ap.add_argument(
        "--run-timeout", type=float, default=3600, help="seconds one run's requests may take"
    )
    ap.add_argument(
        "--build-jobs", type=int, default=0, help="parallel jobs for llama.cpp (0: all cores)"
    )
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument(
        "--prepare-only", action="store_true", help="make the cached artifacts, measure nothing"
    )
    args = ap.parse_args(argv)
    if args.precision != "bf16" and args.model:
        ap.error(f"--precision {args.precision} makes its models from --model-preset, not --model")
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(configs.CONFIG_NAMES)
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    try:
        args.chat_shape = client.ChatShape.parse(args.chat)
    except ValueError as err:
        ap.error(str(err))
    args.runs_of = dict.fromkeys(args.configs, args.runs)
    for item in args.runs_for:
        name, _, n = item.partition("=")
        if name not in args.runs_of or not n.isdigit() or int(n) < 1:
            ap.error(f"--runs-for {item}: expected NAME=N with NAME one of {args.configs}")
        args.runs_of[name] = int(n)
    args.tuned_overrides = {}
    known = artifacts.role_defaults("vllm_service")
    for item in args.tuned_set:
        var, sep, value = item.partition("=")
        if not sep or var not in known:
            ap.error(
                f"--tuned-set {item}: expected VAR=VALUE with VAR in roles/vllm_service/defaults"
            )
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            ap.error(f"--tuned-set {item}: VALUE is not YAML ({err})")
        if parsed is None:
            ap.error(f"--tuned-set {item}: VALUE is empty")
        args.tuned_overrides[var] = parsed
    for item in args.vllm_extra:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", item):
            ap.error(f"--vllm-extra {item}: expected a pinned NAME==VERSION")
    if args.vllm_extra and args.results_dir.resolve() == RESULTS.resolve():
        ap.error(
            "--vllm-extra: write the results elsewhere (--results-dir);"
            " benchmarks/results/ holds the results of the role's pinned closure"
        )
    if args.tuned_overrides and "tuned" not in args.configs:
        ap.error("--tuned-set changes the tuned configuration, which --configs leaves out")
    if args.no_zendnn and args.results_dir.resolve() == RESULTS.resolve():
        ap.error("--no-zendnn: write the results elsewhere (--results-dir), as for --tuned-set")
    if args.tuned_overrides and args.results_dir.resolve() == RESULTS.resolve():
        ap.error(
            "--tuned-set: write the results elsewhere (--results-dir);"
            " benchmarks/results/ holds the results of the role's defaults"
        )
    return args


def git_state() -> dict[str, Any]:
    """Commit and whether the work tree has changes."""

    def git(*a: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def versions(vllm_python: Path, llama_server: Path | None) -> dict[str, str]:
    """vLLM, torch and llama.cpp versions of the servers."""
    probe = """
import importlib.metadata as m, json, torch, vllm
from vllm.platforms import current_platform
dist = next(d for d in ("vllm-cpu", "vllm") if d in {x.metadata["Name"] for x in m.distributions()})
found = {"vllm": vllm.__version__, "vllm_distribution": dist, "torch": torch.__version__}
# the tuned configuration's: ZenCpuPlatform when vLLM takes its ZenDNN path (zentorch, AMD, AVX-512)
found["vllm_platform"] = type(current_platform).__name__
try:
    found["zentorch"] = m.version("zentorch")  # vLLM's ZenDNN path
except m.PackageNotFoundError:
    pass
print(json.dumps(found))
"""
    out = subprocess.run([str(vllm_python), "-c", probe], capture_output=True, text=True)
    found: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout else {}
    found["llama_cpp_python_sdist"] = artifacts.LLAMA_CPP_PYTHON_VERSION
    if llama_server is not None:
        v = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True)
        text = (v.stdout + v.stderr).strip().splitlines()
        found["llama_server"] = next((line for line in text if "version" in line), "")
    found["python"] = platform.python_version()
    return found


def host_record(facts: dict[str, Any]) -> dict[str, Any]:
    """What the results say about the host."""
    tuning = configs.load_tuning_module()
    nodes = tuning.physical_cores(facts["cpus"])
    return {
        "cpu_model": facts["cpu_model"],
        "flags": [f for f in FLAGS_OF_INTEREST if f in facts["flags"]],
        "logical_cpus": len(facts["cpus"]),
        "physical_cores": sum(len(c) for c in nodes.values()),
        "numa_nodes": len(nodes),
        "memtotal_mb": facts["memtotal_mb"],
        "kernel": platform.release(),
        "hostname": platform.node(),
    }


def measure_bandwidth(vllm_python: Path) -> dict[str, Any]:
    """Memory bandwidth and GEMM speed with torch (benchmarks/membw.py in the vLLM venv)."""
    log("measuring memory bandwidth (torch, all cores) ...")
    script = Path(__file__).resolve().parent / "membw.py"
    out = subprocess.run([str(vllm_python), str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"membw.py failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    ceiling = result["ceiling_gb_s"]
    log(
        f"memory bandwidth: ceiling {ceiling['value']} GB/s ({ceiling['kernel']},"
        f" {ceiling['threads']} threads, best of every run), all-core read median"
        f" {result['read_gb_s']['median']} GB/s, triad {result['triad_gb_s']['median']} GB/s"
    )
    return result


def vllm_log_facts(text: str) -> dict[str, Any]:
    """What vLLM's log says it did: dtype, thread binding, KV cache, max model len."""
    found: dict[str, Any] = {}
    if m := re.search(r"dtype=torch\.(\w+)", text):
        found["dtype"] = m.group(1)
    if m := re.search(r"max_seq_len=(\d+)", text):
        found["max_model_len"] = int(m.group(1))
    found["omp_core_ids"] = re.findall(r"local_rank=\d+, core ids=\[([^\]]*)\]", text)
    if m := re.search(r"(Explicitly set|Auto set) \(([\d.]+)/[\d.]+\) GiB for KV cache", text):
        found["kv_cache_gib"] = float(m.group(2))
    if m := re.search(r"GPU KV cache size: ([\d,]+) tokens", text):
        found["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    if m := re.search(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", text):
        found["max_concurrency"] = float(m.group(1))
    return found


def llama_log_facts(text: str) -> dict[str, Any]:
    """What llama-server's log says: slots, context per slot, threads."""
    found: dict[str, Any] = {}
    if m := re.search(r"n_slots = (\d+), n_ctx_slot = (\d+), kv_unified = '(\w+)'", text):
        found.update(n_slots=int(m.group(1)), n_ctx_slot=int(m.group(2)), kv_unified=m.group(3))
    if m := re.search(r"threadpool init, n_threads = (\d+)", text):
        found["threads"] = int(m.group(1))
    return found


def public_env(env: dict[str, str]) -> dict[str, str]:
    """The variables a configuration set or changed (never the caller's own: may be secret)."""
    return {k: v for k, v in sorted(env.items()) if os.environ.get(k) != v}


def estimate_seconds(
    config: configs.ServerConfig,
    model_config: dict[str, Any],
    bandwidth: dict[str, Any],
    args: argparse.Namespace,
    weights_bytes: int,
    cores: int,
) -> tuple[float, float]:
    """A rough (start-up, one run) duration of a configuration, from bandwidth and GEMM speed.

    vLLM's start: ~150 s of imports, torch.compile, g++ JIT and KV cache allocation, loading, and
    its warm-up forward pass of max-num-batched-tokens (2048 by default) tokens; it computes on
    all cores but one (one is left to the front end). llama-server starts in seconds and uses
    every core. Decode at half the bandwidth ceiling; prefill at the GEMM speed membw.py measured
    for the dtype (torch's bf16 on a CPU without AVX-512 is slow: vLLM falls back to it there).
    """
    dtype = config.compute_dtype or limits_dtype_guess(model_config)
    per_token = limits.bytes_per_token(model_config, dtype, dtype, args.prompt_tokens)["total"]
    step = per_token / (bandwidth["read_gb_s"]["median"] * 1e9) * 2
    params = limits.parameter_counts(model_config)["layers"]
    gemm = bandwidth["prompt_gemm_gflop_s"]
    if config.kind == "llamacpp":
        flops = gemm["float32"]
    else:
        flops = gemm.get(dtype, gemm["float32"]) * max(1, cores - 1) / max(1, bandwidth["threads"])
    prefill_token = 2 * params / (flops * 1e9)
    if config.kind == "vllm":
        batched = next(
            (
                int(a)
                for f, a in zip(config.argv, config.argv[1:], strict=False)
                if f == "--max-num-batched-tokens"
            ),
            2048,
        )
        start = 150 + weights_bytes / 200e6 + batched * prefill_token
    else:
        start = 5 + weights_bytes / 500e6
    run = 8 * step + 16 * prefill_token
    run += args.decode_tokens * step + args.short_prompt_tokens * prefill_token
    run += args.prompt_tokens * prefill_token
    for c in args.concurrency:
        run += c * args.short_prompt_tokens * prefill_token
        run += args.stream_tokens * max(step, c * prefill_token)
    if chat := args.chat_shape:
        run += 2 * chat.turns * chat.answer_tokens * step
        # with reuse the turns compute the conversation once (vLLM: a block more per turn at most);
        # without, each turn its whole prompt
        run += chat.prompt_tokens(chat.turns) * prefill_token
        run += sum(chat.prompt_tokens(n) for n in range(1, chat.turns + 1)) * prefill_token
    return start, run + 5


def first_added_token(model: Path, vocab_size: int) -> int:
    """The lowest id of the tokenizer's added (special) tokens: prompts use regular ids below it."""
    try:
        added = json.loads((model / "tokenizer.json").read_text()).get("added_tokens", [])
    except (OSError, ValueError):
        added = []
    return min([int(t["id"]) for t in added if int(t["id"]) > 256] or [vocab_size])


def limits_dtype_guess(model_config: dict[str, Any]) -> str:
    """vLLM's dtype auto on CPU: the model's own dtype."""
    return str(model_config.get("torch_dtype") or "bfloat16")


def ceiling_record(
    config: configs.ServerConfig,
    model_config: dict[str, Any],
    dtype: str,
    read_gb_s: float,
    decode: dict[str, Any],
    weights_bytes: int,
) -> dict[str, Any]:
    """Bytes per token for this server and its single-stream decode as a fraction of the ceiling."""
    kv_dtype = "float16" if config.kind == "llamacpp" else dtype  # llama.cpp: f16 KV cache
    context = decode["prompt_tokens"] + decode["tokens"] / 2
    # vLLM keeps a quantized checkpoint's weights as stored; `dtype` is then its activations'.
    # The quantization as the role's tuning reads it (e.g. compressed-tensors w8a8).
    tuning = configs.load_tuning_module()
    q = tuning.quantization(model_config) if config.kind == "vllm" else None
    # llama.cpp's mixed K-quants (Q4_K_M): the bytes of its GGUF tensors
    stored = weights_bytes if q else config.settings.get("tensor_bytes")
    b = limits.bytes_per_token(model_config, dtype, kv_dtype, context, stored)
    top = limits.ceiling(read_gb_s, b["total"])
    weights = dtype
    if q:
        weights = f"{tuning.quantization_label(q)}, {dtype} activations"
    return {
        "weights": weights,
        "compute_dtype": dtype,
        "kv_dtype": kv_dtype,
        "bytes_per_token": round(b["total"]),
        "weight_bytes_per_token": round(b["weights"]),
        "kv_bytes_per_token": round(b["kv_cache"]),
        "read_gb_s": read_gb_s,
        "ceiling_tokens_per_s": round(top, 3),
        "fraction_of_ceiling": round(decode["tokens_per_s"] / top, 4),
        # a ceiling is an upper bound: above it the bandwidth measurement (or byte count) is off
        "above_ceiling": decode["tokens_per_s"] > top,
    }


def measure_config(
    config: configs.ServerConfig,
    args: argparse.Namespace,
    first_special: int,
    logdir: Path,
    emit: Callable[[int, dict[str, Any]], None],
) -> None:
    """Start the server (once, or once per run with --restart-each-run), measure --runs times,
    hand each run's measurements to emit(run, measured); stop it. A failure ends this
    configuration with an `error` record for the run it happened in."""
    runs = args.runs_of[config.name]
    starts, per_start = (runs, 1) if args.restart_each_run else (1, runs)
    done = 0
    for start in range(1, starts + 1):
        logfile = logdir / f"{config.name}-start{start}.log"
        log(f"{config.name}: starting ({' '.join(config.argv[:3])} ...); log {logfile}")
        try:
            with procs.Server(config, logfile) as server:
                startup = server.wait_healthy(args.start_timeout)
                log(f"{config.name}: /health after {startup:.0f} s")
                first = done + 1
                # one event loop and one client (its connections kept alive) per server start
                done = asyncio.run(
                    measure_server(
                        server, config, args, first_special, first, per_start, startup, emit
                    )
                )
        except (client.CountMismatch, RuntimeError, TimeoutError, openai.APIError) as e:
            log(f"{config.name} run {done + 1} FAILED: {type(e).__name__}: {e}")
            emit(done + 1, {"error": f"{type(e).__name__}: {e}"})
            return


async def measure_server(
    server: procs.Server,
    config: configs.ServerConfig,
    args: argparse.Namespace,
    first_special: int,
    first_run: int,
    runs: int,
    startup: float,
    emit: Callable[[int, dict[str, Any]], None],
) -> int:
    """Measure `runs` runs on a started server; returns the number of the last run done."""
    assert server.sampler is not None
    after_pss, after_rss = server.sampler.sample()
    api = client.Client(server.url, config.kind)
    run = first_run - 1
    try:
        for i in range(runs):
            run = first_run + i
            log(f"{config.name} run {run}: measuring ...")
            measured = await asyncio.wait_for(
                client.measure(
                    api,
                    client.Prompts(first_special, seed=run),  # fresh prompts for every run
                    args.decode_tokens,
                    args.prompt_tokens,
                    args.stream_tokens,
                    args.concurrency,
                    args.short_prompt_tokens,
                    args.chat_shape,
                    uncached_first=run % 2 == 0,
                ),
                timeout=args.run_timeout,
            )
            server.sampler.sample()
            text = server.logfile.read_text(errors="replace")
            measured["server_start"] = run - i
            measured["startup_s"] = round(startup, 2) if i == 0 else None
            measured["memory"] = {
                "after_load_pss_mib": round(after_pss / MIB),
                "after_load_rss_mib": round(after_rss / MIB),
                "peak_pss_mib": round(server.sampler.peak_pss / MIB),
                "peak_rss_mib": round(server.sampler.peak_rss / MIB),
                "processes": len(server.sampler.pids),
            }
            measured["server_log"] = (
                vllm_log_facts(text) if config.kind == "vllm" else llama_log_facts(text)
            )
            emit(run, measured)
    finally:
        await api.close()
    return run


def fmt(values: list[float], digits: int = 2) -> str:
    """median (min-max) of a list, or the one value."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def chat_summary(records: list[dict[str, Any]], session: dict[str, Any]) -> list[str]:
    """The multi-turn chat's table: time to first token as the context grows, with and without
    reuse of the earlier turns (prefix caching), and the whole conversation's time."""
    shape = session["params"].get("chat")
    rows = [r for r in records if "chat" in r]
    if not shape or not rows:
        return []
    last = shape["turns"]
    prompt = client.ChatShape(**shape).prompt_tokens(last)
    lines = [
        "",
        f"Multi-turn chat: {last} turns, a {shape['system_tokens']}-token system prompt,"
        f" {shape['question_tokens']}-token questions and {shape['answer_tokens']}-token answers;"
        " each turn sends the whole conversation (the last one"
        f" {prompt} tokens). With prefix caching: the server may reuse the earlier turns"
        " (vLLM's prefix cache, llama-server's cache_prompt); without: every turn computes its"
        " whole prompt (vLLM: a cache salt per request; llama-server: cache_prompt false). Tokens"
        " from cache: as the server counts them (vLLM's /metrics, in whole KV blocks of 128"
        " tokens on CPU; llama-server's cache_n, to the token).",
        "",
        "| configuration | TTFT last turn, cached (s) | TTFT last turn, uncached (s)"
        " | conversation, cached (s) | conversation, uncached (s) | speed-up"
        " | prompt tokens from cache, cached / uncached |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in session["params"]["configs"]:
        rs = [r["chat"] for r in rows if r["config"] == name]
        if not rs:
            continue
        on = [c["reuse"]["wall_s"] for c in rs]
        off = [c["no_reuse"]["wall_s"] for c in rs]
        cells = [
            name,
            fmt([c["reuse"]["ttft_s"][-1] for c in rs]),
            fmt([c["no_reuse"]["ttft_s"][-1] for c in rs]),
            fmt(on),
            fmt(off),
            f"{statistics.median(off) / statistics.median(on):.2f}x",
            " / ".join(
                fmt([n for c in rs if (n := c[k]["cached_prompt_tokens"]) is not None], 0)
                for k in ("reuse", "no_reuse")
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(records: list[dict[str, Any]], session: dict[str, Any]) -> str:
    """The markdown summary of one session's records."""
    conc = session["params"]["concurrency"]
    host, bw = session["host"], session["bandwidth"]
    lines = [
        "# Serving benchmark",
        "",
        f"{session['date']}, commit {session['git']['commit'][:12]}"
        + (" (work tree with changes)" if session["git"]["dirty"] else "")
        + f", session `{session['session']}`.",
        "",
        f"Host: {host['cpu_model']}, {host['physical_cores']} cores ({host['logical_cpus']}"
        f" logical), {host['numa_nodes']} NUMA node(s), {host['memtotal_mb']} MiB;"
        f" flags: {' '.join(host['flags'])}.",
        f"Model: {session['model']['name']} (random weights, {session['model']['dtype']},"
        f" {session['model']['parameters'] / 1e9:.3f} B parameters"
        + (
            f"; precision {p}: {PRECISION_TEXT[p]})."
            if (p := session["params"].get("precision", "bf16")) != "bf16"
            else ")."
        ),
        f"Memory bandwidth ceiling (torch; read, copy and triad with {bw['threads']}, half and"
        f" one thread, best of {bw['runs']} runs each), measured before each configuration: "
        + ", ".join(
            f"{name} {r[0]['limit']['read_gb_s']} GB/s"
            for name in session["params"]["configs"]
            if (r := [x for x in records if x["config"] == name and "limit" in x])
        )
        + ".",
        f"Versions: {', '.join(f'{k} {v}' for k, v in session['versions'].items())}.",
        "Runs per configuration: "
        + ", ".join(f"{n} {k}" for n, k in session["params"]["runs_of"].items())
        + "; medians (min-max); each server started once"
        + (" per run." if session["params"]["restart_each_run"] else " per configuration."),
        *(
            [
                "Role defaults overridden for tuned (--tuned-set): "
                + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
                + "."
            ]
            if (overrides := session["params"].get("tuned_overrides"))
            else []
        ),
        "",
        "| configuration | dtype | decode tok/s (1 stream) | % of ceiling | ceiling tok/s"
        f" | TTFT {session['params']['prompt_tokens']}-token prompt (s) | "
        + " | ".join(f"{c} stream{'s' if c > 1 else ''} tok/s" for c in conc)
        + " | peak PSS (GiB) | PSS after load (GiB) | start-up (s) |",
        "|---|---|---|---|---|---|" + "---|" * len(conc) + "---|---|---|",
    ]
    for name in session["params"]["configs"]:
        rs = [r for r in records if r["config"] == name and "error" not in r]
        if not rs:
            err = next((r["error"] for r in records if r["config"] == name), "no result")
            lines.append(f"| {name} | failed: {err.split(';')[0][:100]} |" + " |" * (7 + len(conc)))
            continue
        cells = [
            name,
            rs[0]["limit"].get("weights", rs[0]["limit"]["compute_dtype"]),
            fmt([r["decode"]["tokens_per_s"] for r in rs]),
            fmt([100 * r["limit"]["fraction_of_ceiling"] for r in rs], 1)
            + (" (above the ceiling!)" if any(r["limit"]["above_ceiling"] for r in rs) else ""),
            f"{rs[0]['limit']['ceiling_tokens_per_s']:.2f}",
            fmt([r["ttft"]["seconds"] for r in rs]),
        ]
        cells += [fmt([r["throughput"][str(c)]["tokens_per_s"] for r in rs]) for c in conc]
        cells += [
            fmt([r["memory"]["peak_pss_mib"] / 1024 for r in rs]),
            fmt([r["memory"]["after_load_pss_mib"] / 1024 for r in rs]),
            fmt([r["startup_s"] for r in rs if r.get("startup_s") is not None], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += chat_summary(records, session)
    lines += [
        "",
        "Ceiling = the best bandwidth measured / bytes read per decoded token (every weight at the"
        " dtype the server computes in, or as stored when quantized: Q8_0 34 bytes per 32"
        " weights, Q4_K_M its GGUF tensors, W8A8, FP8 and GPTQ their weight files; a tied"
        " embedding matrix as the output projection, an untied one one row per token; plus the KV"
        " cache of the context). Start-up:"
        " from an empty cache folder (the first start of each configuration in a session); with"
        " --restart-each-run later starts reuse the caches.",
        "",
        "Command: `" + session["command"] + "`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prepare, measure every configuration for every run, write the records and the summary."""
    args = parse_args(argv)
    procs.raise_on_signals()
    ports = {name: args.base_port + i for i, name in enumerate(configs.CONFIG_NAMES)}
    if not args.prepare_only:
        for name in args.configs:
            procs.require_free_port(ports[name])
    facts = configs.host_facts()
    jobs = args.build_jobs or (len(facts["cpus"]) or 1)
    # llama.cpp's AMX int8 path dies with SIGILL on these hosts (artifacts.ensure_llama_server)
    without_amx = "amx_int8" in facts["flags"]

    quant, outtype = PRECISIONS[args.precision]
    model = args.model.resolve() if args.model else artifacts.ensure_model(args.model_preset, quant)
    vllm_python = tuned_python = None
    if "tuned" in args.configs:
        # as roles/vllm_install does (vllm_install_zendnn): zentorch where vLLM takes it
        zendnn = () if args.no_zendnn else artifacts.zendnn_requirements(facts)
        tuned_python = artifacts.ensure_vllm_venv(tuple(dict.fromkeys((*args.vllm_extra, *zendnn))))
    if "recipe" in args.configs:
        vllm_python = artifacts.ensure_vllm_venv(tuple(args.vllm_extra))
    # the bandwidth probe and the GGUF converter need torch: any of these venvs will do
    vllm_python = vllm_python or tuned_python
    llama_dir = gguf = gguf_type = None
    gguf_source = model
    if "llamacpp" in args.configs:
        llama_dir = artifacts.ensure_llama_server(jobs, without_amx)
        vllm_python = vllm_python or artifacts.ensure_vllm_venv()  # the converter needs torch
        gguf_source = artifacts.gguf_source(model, args.model_preset, quant)
        gguf, gguf_type = artifacts.ensure_gguf(gguf_source, llama_dir, vllm_python, outtype)
    if args.prepare_only:
        log("prepared: " + ", ".join(str(p) for p in (model, vllm_python, llama_dir, gguf) if p))
        return 0
    assert vllm_python is not None

    model_config = json.loads((model / "config.json").read_text())
    # llama.cpp's GGUF is made from the preset's bf16 model (tied output projection) even where
    # vLLM's checkpoint unties lm_head: its bytes per token follow that model's config
    gguf_config = json.loads((gguf_source / "config.json").read_text())
    weights_bytes = configs.model_weights_bytes(model)
    first_special = first_added_token(model, int(model_config["vocab_size"]))
    llama_server = llama_dir / "bin" / "llama-server" if llama_dir else None
    session_id = dt.datetime.now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    # HOME, caches and temporary files of the servers: new for every session (the first start of
    # each configuration is cold), removed at its end, never shared with another session
    state_root = BENCH_CACHE / "state" / session_id
    logdir = BENCH_CACHE / "logs" / session_id

    def make(name: str) -> configs.ServerConfig:
        state = state_root / name
        if name == "recipe":
            return configs.recipe(vllm_python, model, ports[name], state, args.recipe_kvcache_gib)
        if name == "tuned":
            assert tuned_python is not None
            return configs.tuned(
                tuned_python, model, ports[name], state, facts, args.tuned_overrides
            )
        assert llama_server is not None and gguf is not None and gguf_type is not None
        tensor_bytes = None
        if gguf_type in artifacts.QUANTIZE_TYPES:  # mixed types: the ceiling reads the file's
            assert llama_dir is not None
            tensor_bytes = artifacts.gguf_tensor_bytes(gguf, llama_dir, vllm_python)
        return configs.llamacpp(
            llama_server, gguf, gguf_type, ports[name], state, facts, without_amx, tensor_bytes
        )

    servers = {name: make(name) for name in args.configs}
    for path in servers["tuned"].settings["preload_missing"] if "tuned" in servers else []:
        log(
            f"tuned: {path} is missing, so it is not preloaded as on a host the playbook prepared"
            " (tcmalloc: apt-get install libtcmalloc-minimal4, as the build_toolchain role does)"
        )
    bandwidth = measure_bandwidth(vllm_python)
    session = {
        "session": session_id,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "host": host_record(facts),
        "versions": versions(tuned_python or vllm_python, llama_server),
        "bandwidth": bandwidth,
        "model": {
            "name": model.name,
            "path": str(model),
            "preset": None if args.model else args.model_preset,
            "dtype": artifacts.model_dtype(model),
            "parameters": limits.parameter_counts(model_config)["total"],
            "weights_bytes": weights_bytes,
            "gguf": gguf.name if gguf else None,
        },
        "params": {
            "runs": args.runs,
            "precision": args.precision,
            "runs_of": args.runs_of,
            "configs": args.configs,
            "decode_tokens": args.decode_tokens,
            "prompt_tokens": args.prompt_tokens,
            "stream_tokens": args.stream_tokens,
            "concurrency": args.concurrency,
            "short_prompt_tokens": args.short_prompt_tokens,
            "chat": vars(args.chat_shape) if args.chat_shape else None,
            "restart_each_run": args.restart_each_run,
            "tuned_overrides": args.tuned_overrides,
            "vllm_extra": args.vllm_extra,
            "no_zendnn": args.no_zendnn,
            "sampling": "greedy (temperature 0), ignore_eos, repetition penalty 1.0",
        },
        "command": " ".join(["python", "benchmarks/serving.py", *(argv or sys.argv[1:])]),
    }
    cores = host_record(facts)["physical_cores"]
    # the config.json whose shape each server reads per token
    read_config = {
        n: gguf_config if c.kind == "llamacpp" else model_config for n, c in servers.items()
    }
    estimates = {
        n: estimate_seconds(c, read_config[n], bandwidth, args, weights_bytes, cores)
        for n, c in servers.items()
    }

    def remaining(name: str | None, run: int) -> float:
        """Estimated seconds of what is left after `run` runs of configuration `name`."""
        names = list(servers)
        after = names[names.index(name) + 1 :] if name else names
        left = 0.0
        for n, (s, r) in estimates.items():
            runs = args.runs_of[n]
            if n in after:
                left += s * (runs if args.restart_each_run else 1) + r * runs
            elif n == name:
                left += (s + r) * (runs - run) if args.restart_each_run else r * (runs - run)
        return left

    log(
        f"estimated duration: ~{remaining(None, 0) / 60:.0f} min for {len(servers)}"
        f" configuration(s), runs {args.runs_of} (rough; "
        + ", ".join(
            f"{n}: start ~{s / 60:.1f} + ~{r / 60:.1f} min/run" for n, (s, r) in estimates.items()
        )
        + "); refined as runs finish"
    )

    args.results_dir.mkdir(parents=True, exist_ok=True)
    jsonl = args.results_dir / "serving.jsonl"
    records: list[dict[str, Any]] = []
    begin = time.monotonic()
    done_estimate = 0.0  # estimated seconds of the work finished so far (to scale what is left)
    config_bandwidth: dict[str, dict[str, Any]] = {}
    for name, config in servers.items():
        config_start = time.monotonic()
        # measured right before each configuration, on the quiet host, so that a drift between
        # configurations (another tenant, the host's clock) does not skew their ceilings
        config_bandwidth[name] = measure_bandwidth(vllm_python)

        def emit(run: int, measured: dict[str, Any], name: str = name) -> None:
            nonlocal done_estimate
            config = servers[name]
            record: dict[str, Any] = {
                "benchmark": "serving",
                "config": name,
                "run": run,
                **session,
                "server": {
                    "kind": config.kind,
                    "argv": config.argv,
                    "env": public_env(config.env),
                    "settings": config.settings,
                    "notes": config.notes,
                },
                **measured,
            }
            if "error" not in record:
                # vLLM says in its log what it computes in; llama.cpp computes in the GGUF's type
                dtype = record["server_log"].get("dtype") or config.compute_dtype
                record["limit"] = ceiling_record(
                    config,
                    read_config[name],
                    str(dtype),
                    config_bandwidth[name]["ceiling_gb_s"]["value"],
                    record["decode"],
                    weights_bytes,
                )
                record["bandwidth"] = config_bandwidth[name]
            records.append(record)
            with jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if "error" in record:
                return
            start_s, run_s = estimates[name]
            done_estimate += run_s + (start_s if record["startup_s"] is not None else 0)
            elapsed = time.monotonic() - begin
            left = remaining(name, run)
            log(
                f"{name} run {run}: decode {record['decode']['tokens_per_s']:.2f} tok/s"
                f" ({100 * record['limit']['fraction_of_ceiling']:.0f}% of ceiling), TTFT"
                f" {record['ttft']['seconds']:.2f} s, {args.concurrency[-1]} streams"
                f" {record['throughput'][str(args.concurrency[-1])]['tokens_per_s']:.2f} tok/s;"
                f" ~{left * elapsed / max(done_estimate, 1) / 60:.0f} min left"
            )

        try:
            measure_config(config, args, first_special, logdir, emit)
        finally:
            shutil.rmtree(state_root / name, ignore_errors=True)
        log(f"{name}: done in {(time.monotonic() - config_start) / 60:.1f} min")
    shutil.rmtree(state_root, ignore_errors=True)

    text = summary(records, session)
    md = "serving.md" if args.precision == "bf16" else f"serving-{args.precision}.md"
    (args.results_dir / md).write_text(text)
    print(text)
    log(f"done in {(time.monotonic() - begin) / 60:.1f} min; records appended to {jsonl}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
