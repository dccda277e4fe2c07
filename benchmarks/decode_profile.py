"""Where the time of a single-stream decode goes in this project's tuned vLLM service (issue #16).

Starts serving.py's `tuned` configuration (the role's service for this host, same flags and
environment) on the same random-weight model, sends one stream of completions that each decode
--tokens tokens (the benchmark's own `openai` client, servebench/client.py), and samples the
busiest process of the server (vLLM's worker) with py-spy (as root, or where ptrace is allowed),
native frames and threads included, for --seconds. Every sample of a thread that worked (helper
threads that only wait are left out) is put in one bucket, by the innermost frame that names one:
attention, linear layers (GEMM), sampling, scheduling, the rest of the model (norms, rotary,
activation, embedding), waiting (an OpenMP thread at a barrier, a thread blocked for work), other.
Prints the table and appends one JSON line (with the CPU's model and flags) to
results/decode_profile.jsonl. Run it on a quiet machine; py-spy comes from requirements-bench.txt.

    python benchmarks/decode_profile.py [--seconds 40] [--tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from servebench import BENCH_CACHE, RESULTS, artifacts, client, configs, procs
from servebench.artifacts import log
from serving import first_added_token, git_state, host_record

# bucket: words of a frame (function, file) that put a sample in it; checked from the innermost
# frame outwards, the first bucket that matches wins
BUCKETS = {
    "attention": ("attention", "attn", "paged", "sdpa"),
    "linear layers (GEMM)": ("linear", "gemm", "matmul", "onednn", "dnnl", "brg", "amx", "mkl"),
    "sampling": ("sample", "sampler", "logits", "topk", "top_k"),
    "scheduling": ("scheduler", "schedule ("),
    "rest of the model": ("norm", "rotary", "rope", "silu", "act_and_mul", "embed", "qwen2"),
    # an OpenMP thread spinning at a barrier for the other, or a thread blocked for work
    "waiting (barriers, queues)": (
        "barrier", "sched_yield", "wait", "poll", "select", "recv", "sleep", "futex",
        "acquire_lock",
    ),
}  # fmt: skip
WAITING = "waiting (barriers, queues)"


def bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        low = frame.lower()
        for name, words in BUCKETS.items():
            if any(word in low for word in words):
                return name
    return "other"


def shares_of(raw: Path) -> tuple[dict[str, float], int, int]:
    """Bucket shares over the threads that worked (py-spy --threads puts each sample under its
    thread): threads that only waited (at least 95 % of their samples) are helper threads idle by
    design and left out. Returns the shares, the samples counted and the threads counted."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if stack:
            threads[frames[0]][bucket(frames[1:])] += int(count)
    working = [c for c in threads.values() if c[WAITING] < 0.95 * sum(c.values())]
    total = collections.Counter()
    for counter in working:
        total.update(counter)
    n = sum(total.values())
    if n == 0:
        sys.exit(f"{raw}: no thread of the process worked while py-spy sampled")
    return {name: round(total[name] / n, 4) for name in [*BUCKETS, "other"]}, n, len(working)


def load(
    url: str, first_special: int, tokens: int, stop: threading.Event, done: list[float]
) -> None:
    """One stream at a time, with the benchmark's client: completions of exactly `tokens` tokens
    until stopped; `done` gets each one's decode rate (first to last token)."""

    async def run() -> None:
        api, prompts = client.Client(url, "vllm"), client.Prompts(first_special, seed=0)
        try:
            while not stop.is_set():
                done.append((await api.stream(prompts.make(8), tokens)).decode_rate)
        finally:
            await api.close()

    asyncio.run(run())


def busiest(pid: int) -> psutil.Process:
    """The process of the server's tree that used the most CPU over two seconds."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for process in tree:
        process.cpu_percent()
    time.sleep(2)
    return max(tree, key=lambda process: process.cpu_percent())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=40, help="how long py-spy samples")
    ap.add_argument("--tokens", type=int, default=256, help="tokens decoded per request")
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--port", type=int, default=18050)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        sys.exit("py-spy is missing: run it with the tool environment (make bench-venv)")
    procs.raise_on_signals()
    model = artifacts.ensure_model("qwen2.5-1.5b-instruct")
    vllm_python = artifacts.ensure_vllm_venv()
    facts = configs.host_facts()
    vocab_size = int(json.loads((model / "config.json").read_text())["vocab_size"])
    session = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    state = BENCH_CACHE / "state" / f"profile-{session}"
    config = configs.tuned(vllm_python, model, args.port, state, facts)
    raw = BENCH_CACHE / "logs" / f"profile-{session}.txt"
    try:
        with procs.Server(config, BENCH_CACHE / "logs" / f"profile-{session}.log") as server:
            assert server.proc is not None
            log(f"tuned: started {server.wait_healthy(3600):.0f} s; decoding one stream ...")
            stop, rates = threading.Event(), []
            client = threading.Thread(
                target=load,
                args=(server.url, first_added_token(model, vocab_size), args.tokens, stop, rates),
            )
            client.start()
            try:
                time.sleep(5)  # past the first request's prefill
                engine = busiest(server.proc.pid)
                log(f"sampling pid {engine.pid} ({engine.name()}) for {args.seconds} s ...")
                subprocess.run(
                    [py_spy, "record", "--pid", str(engine.pid), "--native", "--threads",
                     "--rate", str(args.rate), "--duration", str(args.seconds),
                     "--format", "raw", "--output", str(raw)],
                    check=True,
                )  # fmt: skip
            finally:
                stop.set()
                client.join()
            if not rates:
                sys.exit("no request finished while py-spy sampled: the profile shows no decode")
    finally:
        shutil.rmtree(state, ignore_errors=True)
    shares, total, nthreads = shares_of(raw)
    record = {
        "benchmark": "decode_profile",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "host": host_record(facts),
        "settings": config.settings,
        "tokens_per_request": args.tokens,
        "decode_tok_s_under_py_spy": [round(r, 2) for r in rates],
        "samples": total,
        "threads": nthreads,
        "shares": shares,
        "raw_stacks": str(raw),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    with (args.results_dir / "decode_profile.jsonl").open("a") as out:
        out.write(json.dumps(record) + "\n")
    print(f"{total} samples of {nthreads} working threads of vLLM's worker, one stream decoding:")
    for name, share in shares.items():
        print(f"  {name:24s} {100 * share:5.1f} %")


if __name__ == "__main__":
    main()
