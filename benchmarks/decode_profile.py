"""Where the time of a single-stream decode goes in this project's tuned vLLM service (issue #16).

Starts serving.py's `tuned` configuration (the role's service for this host, same flags and
environment) on the same random-weight model, sends one stream of completions that each decode
--tokens tokens (the benchmark's own `openai` client, servebench/client.py), and samples the
server's worker process (vLLM's `VLLM::Worker`) with py-spy (as root, or where ptrace is allowed),
native frames and threads included, for --seconds. Every sample of a thread that worked (helper
threads that only wait are left out) is put in one bucket, by the innermost frame that names one:
attention, linear layers (GEMM), sampling, scheduling, the rest of the model (norms, rotary,
activation, embedding), waiting (an OpenMP thread at a barrier, a thread blocked for work), other.
`--process engine-core` or `api-server` samples that process of the server instead (scheduling,
inter-process messages, detokenizing, HTTP). Prints the table and the ten innermost Python functions
with the most samples, and appends one JSON line (with the CPU's model and flags) to
results/decode_profile.jsonl. Run it on a quiet machine; py-spy comes from requirements-bench.txt.

`--sched` reads the kernel's scheduler statistics instead (/proc/<pid>/task/<tid>/schedstat, no
sampler attached): for every thread of every process of the server, the share of the window it ran
on a CPU and the share it was ready to run but waited for one (on the run queue), and on which CPUs
the kernel saw it. Threads py-spy cannot see are in it too: the worker's other OpenMP threads, which
on a host with few cores share theirs with the engine-core and API processes. `--uni` serves with
the role's `vllm_service_disable_multiprocessing: true` (no worker process: the model runs in the
engine core).

`--torch` runs torch's profiler in the worker instead (vLLM's own: `--profiler-config`, started
and stopped over HTTP for --seconds; no sampler stops the process, so the decode keeps its pace):
each token's time, from one decode step's start to the next one's, split into the buckets above
by every operator's own time (its children's taken out), the time in the step outside any operator
(Python), and the time between the steps outside any operator (the engine core's scheduling, the
messages between the processes); means per token, and the operators with the most own time. The
trace stays in .cache/bench/logs/.

`--bandwidth N` sends N requests one after the other instead, each between two readings of the
host's memory bandwidth (membw.py --probe: the all-core read, best of 5), taken with the server
idle (IDLE_S after a request: vLLM's message queues busy-poll for a second after each message):
whether a request's decode rate follows the bandwidth the VM has at that moment.

    python benchmarks/decode_profile.py [--seconds 40] [--tokens 256] [--process engine-core]
                                        [--precision PRECISION]  (any of serving.py's)
                                        [--sched | --bandwidth N | --torch] [--uni]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import datetime as dt
import gzip
import itertools
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from servebench import BENCH_CACHE, RESULTS, artifacts, client, configs, procs
from servebench.artifacts import log
from serving import PRECISIONS, first_added_token, git_state, host_record

# bucket: words of a frame (function, file) that put a sample in it; checked from the innermost
# frame outwards, the first bucket that matches wins
BUCKETS = {
    "attention": ("attention", "attn", "paged", "sdpa", "kv_cache"),
    "linear layers (GEMM)": (
        "linear", "gemm", "matmul", "onednn", "dnnl", "brg", "amx", "mkl", "int4pack", "int4mm",
        "aten::mm", "addmm", "scaled_mm",
    ),
    "sampling": ("sample", "sampler", "logits", "topk", "top_k", "argmax"),
    "scheduling": ("scheduler", "schedule ("),
    # torch's profiler names Inductor's fused kernels (norms, rotary, activation) only as the graph
    "rest of the model": (
        "norm", "rotary", "rope", "silu", "act_and_mul", "embed", "qwen2", "compiledfxgraph",
    ),
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


def shares_of(raw: Path) -> tuple[dict[str, float], int, int, list[tuple[str, float]], bool]:
    """Bucket shares over the threads that worked (py-spy --threads puts each sample under its
    thread): threads that only waited (at least 95 % of their samples) are helper threads idle by
    design and left out, unless every thread only waited. Returns the shares, the samples
    counted, the threads counted, the ten innermost Python functions that took the most samples
    (with their shares), and whether every thread only waited."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inner: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if stack:
            where = bucket(frames[1:])
            threads[frames[0]][where] += int(count)
            # native frames may lack symbols; torch's operator dispatch names no caller
            python = [f for f in frames[1:] if ".py:" in f and "torch/_ops.py" not in f]
            if python:  # a function, whatever line of it ran
                inner[frames[0]][re.sub(r":\d+\)$", ")", python[-1])] += int(count)
    working = [t for t, c in threads.items() if c[WAITING] < 0.95 * sum(c.values())]
    only_waited = not working
    if only_waited:  # a process that only waits (the engine core between steps): say how
        working = list(threads)
    total: collections.Counter[str] = collections.Counter()
    frames_total: collections.Counter[str] = collections.Counter()
    for thread in working:
        total.update(threads[thread])
        frames_total.update(inner[thread])
    n = sum(total.values())
    if n == 0:
        sys.exit(f"{raw}: py-spy recorded no sample of the process")
    top = [(frame, round(k / n, 4)) for frame, k in frames_total.most_common(10)]
    shares = {name: round(total[name] / n, 4) for name in [*BUCKETS, "other"]}
    return shares, n, len(working), top, only_waited


# a step of vLLM's worker that only decodes (torch's profiler: its user annotation); a step with
# no request at all is named generation_0(0)
DECODE_STEP = re.compile(r"execute_context_0\(0\)_generation_[1-9]\d*\(\d+\)$")
IN_STEP = "in a step, outside the operators (Python)"
BETWEEN = "between steps, outside the operators (engine core, messages)"


def step_split(events: list[dict]) -> dict:
    """A torch profiler trace of vLLM's worker: for every decode step followed by another decode
    step (one token of the same requests), its time by bucket (each operator's own time, its
    children's taken out, up to the next step: vLLM samples after the step), and the rest of the
    step (IN_STEP) and of the time to the next one (BETWEEN) outside any operator; means per token
    in ms (they add up to the token's time), the median token, and the ten operators with the most
    own time per token."""
    steps = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"),
        key=lambda e: e["ts"],
    )
    decode = [s for s in steps if DECODE_STEP.match(s["name"])]
    if not decode:
        sys.exit("the trace holds no decode step: nothing decoded while it was recorded")
    thread = decode[0]["tid"]
    ops = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"
         and e.get("tid") == thread),
        key=lambda e: (e["ts"], -e["dur"]),
    )  # fmt: skip
    own: list[list] = []  # [start, own time, name]
    enclosing: list[tuple[float, list]] = []  # (end, row) of the operators the next one is in
    for e in ops:
        while enclosing and enclosing[-1][0] <= e["ts"]:
            enclosing.pop()
        row = [e["ts"], e["dur"], e["name"]]
        if enclosing:
            enclosing[-1][1][1] -= e["dur"]  # the parent's own time
        enclosing.append((e["ts"] + e["dur"], row))
        own.append(row)
    starts = [row[0] for row in own]
    parts: collections.Counter[str] = collections.Counter()
    by_op: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    tokens = []
    for step, after in itertools.pairwise(steps):
        if not (DECODE_STEP.match(step["name"]) and DECODE_STEP.match(after["name"])):
            continue
        end = step["ts"] + step["dur"]
        counted = {IN_STEP: 0.0, BETWEEN: 0.0}
        first, last = (bisect.bisect_left(starts, t) for t in (step["ts"], after["ts"]))
        for start, time_own, name in own[first:last]:
            parts[bucket([name])] += time_own
            by_op[name] += time_own
            calls[name] += 1
            counted[IN_STEP if start < end else BETWEEN] += time_own
        parts[IN_STEP] += step["dur"] - counted[IN_STEP]
        parts[BETWEEN] += after["ts"] - end - counted[BETWEEN]
        tokens.append(after["ts"] - step["ts"])
    if not tokens:
        sys.exit("the trace holds no two decode steps in a row")
    n = len(tokens)
    return {
        "tokens": n,
        "token_ms_median": round(statistics.median(tokens) / 1e3, 3),
        "token_ms_mean": round(sum(tokens) / n / 1e3, 3),
        "split_ms": {k: round(v / n / 1e3, 3) for k, v in parts.most_common()},
        "top_ops": [
            [name, round(v / n / 1e3, 3), round(calls[name] / n, 1)]
            for name, v in by_op.most_common(10)
        ],
    }


def post(url: str) -> None:
    """An empty POST (vLLM's /start_profile, /stop_profile); stopping writes the trace first."""
    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=600).read()


def load(
    url: str,
    first_special: int,
    tokens: int,
    stop: threading.Event,
    done: list[float],
    failed: list[BaseException],
) -> None:
    """One stream at a time, with the benchmark's client: completions of exactly `tokens` tokens
    until stopped; `done` gets each one's decode rate (first to last token), `failed` the error
    that ended the stream early, if one did."""

    async def run() -> None:
        api, prompts = client.Client(url, "vllm"), client.Prompts(first_special, seed=0)
        try:
            while not stop.is_set():
                rate = (await api.stream(prompts.make(8), tokens)).decode_rate
                if math.isfinite(rate):
                    done.append(rate)
        finally:
            await api.close()

    try:
        asyncio.run(run())
    except Exception as error:  # re-raised by main() once py-spy has finished
        failed.append(error)
        stop.set()


def thread_times(root: psutil.Process) -> dict[int, dict]:
    """Every thread of `root` and its child processes, by thread id: its process's title (as
    TITLES names it, else "api-server" for the root, else its name), its own name, nanoseconds on a
    CPU and waiting on a run queue so far, and the CPU it last ran on."""
    out = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            cmdline = " ".join(process.cmdline())
            name = next((k for k, v in TITLES.items() if v in cmdline), None)
            name = name or ("api-server" if process.pid == root.pid else process.name())
            for task in Path(f"/proc/{process.pid}/task").iterdir():
                ran, waited, _ = (task / "schedstat").read_text().split()
                comm = (task / "comm").read_text().strip()
                cpu = int((task / "stat").read_text().rpartition(")")[2].split()[36])
                out[int(task.name)] = {
                    "process": name,
                    "pid": process.pid,
                    "thread": comm,
                    "ran_ns": int(ran),
                    "waited_ns": int(waited),
                    "cpu": cpu,
                }
        except (psutil.Error, FileNotFoundError, ProcessLookupError):
            continue  # a process or thread that ended meanwhile
    return out


def sched_window(root: psutil.Process, seconds: int) -> list[dict]:
    """The server's threads over `seconds`: for each that ran at least 1 % of the window, the share
    of the window it ran and the share it waited for a CPU, and the CPUs it was seen on (read
    every 0.1 s); busiest first."""
    before, start = thread_times(root), time.monotonic()
    seen: dict[int, set[int]] = collections.defaultdict(set)
    while time.monotonic() - start < seconds:
        for tid, now in thread_times(root).items():
            seen[tid].add(now["cpu"])
        time.sleep(0.1)
    after, window = thread_times(root), (time.monotonic() - start) * 1e9
    rows = []
    for tid, end in after.items():
        begin = before.get(tid, {"ran_ns": 0, "waited_ns": 0})
        ran = (end["ran_ns"] - begin["ran_ns"]) / window
        if ran >= 0.01:
            waited = (end["waited_ns"] - begin["waited_ns"]) / window
            rows.append(
                {
                    "process": end["process"],
                    "thread": end["thread"],
                    "tid": tid,
                    "ran": round(ran, 4),
                    "waited_for_cpu": round(waited, 4),
                    "cpus_seen": sorted(seen[tid]),
                }
            )
    return sorted(rows, key=lambda row: -row["ran"])


IDLE_S = 1.5  # seconds after a request before the bandwidth is read


def bandwidth_series(url: str, python: Path, first_special: int, tokens: int, n: int) -> list:
    """n requests of one stream, each as [read GB/s before, its decode rate, read GB/s after];
    the reading after one request is the reading before the next."""
    probe = subprocess.Popen(
        [str(python), str(Path(__file__).with_name("membw.py")), "--probe"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdin is not None and probe.stdout is not None

    def read_gb_s() -> float:
        time.sleep(IDLE_S)
        probe.stdin.write("\n")
        probe.stdin.flush()
        return float(probe.stdout.readline())

    async def run() -> list:
        api, prompts = client.Client(url, "vllm"), client.Prompts(first_special, seed=0)
        rows = []
        try:
            await api.stream(prompts.make(8), 16)  # warm-up
            before = read_gb_s()
            for _ in range(n):
                rate = (await api.stream(prompts.make(8), tokens, body=api.no_reuse())).decode_rate
                after = read_gb_s()
                rows.append([before, round(rate, 2), after])
                before = after
        finally:
            await api.close()
        return rows

    try:
        return asyncio.run(run())
    finally:
        probe.stdin.close()
        probe.wait(timeout=60)


# --process: vLLM's process titles (the API server is the process the benchmark started)
TITLES = {"worker": "Worker", "engine-core": "EngineCore"}


def pick(pid: int, which: str) -> psutil.Process:
    """The server's process to sample: the API server, or the busiest (CPU over two seconds) of
    the processes whose title names the worker or the engine core."""
    root = psutil.Process(pid)
    if which == "api-server":
        return root

    def title(process: psutil.Process) -> str:
        try:  # the name is cut at 15 characters; the command line holds the whole title
            return " ".join(process.cmdline())
        except psutil.Error:  # ended meanwhile
            return ""

    tree = root.children(recursive=True)
    found = [p for p in tree if TITLES[which] in title(p)]
    if not found:
        sys.exit(f"no {which} process under pid {pid}: {[title(p) for p in tree]}")
    for process in found:
        process.cpu_percent()
    time.sleep(2)
    return max(found, key=lambda process: process.cpu_percent())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=40, help="how long py-spy samples")
    ap.add_argument(
        "--process",
        choices=("worker", *sorted(set(TITLES) - {"worker"}), "api-server"),
        default="worker",
        help="the server process to sample (worker: the model's forward pass)",
    )
    ap.add_argument("--tokens", type=int, default=256, help="tokens decoded per request")
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--port", type=int, default=18050)
    ap.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="bf16",
        help="the model as serving.py --precision gives vLLM (e.g. int8: W8A8, int4: GPTQ 4-bit,"
        " int4-head: GPTQ 4-bit with lm_head too)",
    )
    ap.add_argument(
        "--sched",
        action="store_true",
        help="the kernel's run and run-queue times of every thread of the server, not py-spy",
    )
    ap.add_argument(
        "--bandwidth",
        type=int,
        default=0,
        metavar="N",
        help="N requests, each between two readings of the memory bandwidth, not py-spy",
    )
    ap.add_argument(
        "--torch",
        action="store_true",
        help="torch's profiler in vLLM's worker (its --profiler-config), not py-spy",
    )
    ap.add_argument(
        "--uni",
        action="store_true",
        help="serve with vllm_service_disable_multiprocessing: true (no worker process)",
    )
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if args.sched + bool(args.bandwidth) + args.torch > 1:
        ap.error("one of --sched, --bandwidth and --torch")
    if py_spy is None and not (args.sched or args.bandwidth or args.torch):
        sys.exit("py-spy is missing: run it with the tool environment (make bench-venv)")
    procs.raise_on_signals()
    model = artifacts.ensure_model("qwen2.5-1.5b-instruct", PRECISIONS[args.precision][0])
    facts = configs.host_facts()
    # the tuned service as the role installs it: with zentorch where vLLM takes its ZenDNN path
    zendnn = artifacts.zendnn_requirements(facts)
    vllm_python = artifacts.ensure_vllm_venv(zendnn)
    vocab_size = int(json.loads((model / "config.json").read_text())["vocab_size"])
    session = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    state = BENCH_CACHE / "state" / f"profile-{session}"
    overrides: dict = {"vllm_service_disable_multiprocessing": True} if args.uni else {}
    raw = BENCH_CACHE / "logs" / f"profile-{session}.txt"
    trace_dir = BENCH_CACHE / "logs" / f"profile-{session}-trace"
    if args.torch:  # the endpoints only; nothing is recorded until /start_profile
        profiler = {"profiler": "torch", "torch_profiler_dir": str(trace_dir),
                    "torch_profiler_with_stack": False, "ignore_frontend": True}  # fmt: skip
        overrides["vllm_service_extra_args"] = ["--profiler-config", json.dumps(profiler)]
    config = configs.tuned(vllm_python, model, args.port, state, facts, overrides)
    try:
        with procs.Server(config, BENCH_CACHE / "logs" / f"profile-{session}.log") as server:
            assert server.proc is not None
            log(f"tuned: started {server.wait_healthy(3600):.0f} s; decoding one stream ...")
            stop, rates, failed = threading.Event(), [], []
            first = first_added_token(model, vocab_size)
            if args.bandwidth:
                series = bandwidth_series(
                    server.url, vllm_python, first, args.tokens, args.bandwidth
                )
                rates = [rate for _, rate, _ in series]
            else:
                loader = threading.Thread(
                    target=load, args=(server.url, first, args.tokens, stop, rates, failed)
                )
                loader.start()
                try:
                    time.sleep(5)  # past the first request's prefill
                    if args.sched:
                        log(f"reading the threads' scheduler times for {args.seconds} s ...")
                        idle = psutil.cpu_times().idle  # of every CPU
                        threads = sched_window(psutil.Process(server.proc.pid), args.seconds)
                        idle = psutil.cpu_times().idle - idle
                    elif args.torch:
                        log(f"torch's profiler in the worker for {args.seconds} s ...")
                        post(f"{server.url}/start_profile")
                        first_rate = len(rates)
                        time.sleep(args.seconds)
                        profiled = rates[first_rate:]  # the requests that ended meanwhile
                        post(f"{server.url}/stop_profile")
                    else:
                        target = pick(server.proc.pid, args.process)
                        log(f"sampling pid {target.pid} ({target.name()}) for {args.seconds} s ...")
                        subprocess.run(
                            [py_spy, "record", "--pid", str(target.pid), "--native", "--threads",
                             "--rate", str(args.rate), "--duration", str(args.seconds),
                             "--format", "raw", "--output", str(raw)],
                            check=True,
                        )  # fmt: skip
                finally:
                    stop.set()
                    loader.join()
            if failed:
                raise RuntimeError(f"the stream failed while it was measured: {failed[0]!r}")
            if not rates:
                sys.exit("no request finished while it was measured: it shows no decode")
    finally:
        shutil.rmtree(state, ignore_errors=True)
    record = {
        "benchmark": "decode_profile",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "host": host_record(facts),
        "settings": config.settings,
        "vllm_extra": list(zendnn),  # zentorch's pins where vLLM takes its ZenDNN path
        "uni": args.uni,
        "precision": args.precision,
        "tokens_per_request": args.tokens,
    }
    if args.bandwidth:
        record |= {
            "mode": "bandwidth",
            "idle_s_before_reading": IDLE_S,
            "requests": [
                {"read_gb_s_before": b, "decode_tok_s": r, "read_gb_s_after": a}
                for b, r, a in series
            ],
        }
    elif args.torch:
        traces = sorted(trace_dir.glob("*.pt.trace.json.gz"))
        if len(traces) != 1:
            sys.exit(f"{trace_dir}: expected one trace of the worker, found {traces}")
        with gzip.open(traces[0]) as trace:
            split = step_split(json.load(trace)["traceEvents"])
        record |= {
            "mode": "torch",
            "seconds": args.seconds,
            "decode_tok_s_before": [round(r, 2) for r in rates[:first_rate]],
            "decode_tok_s_profiled": [round(r, 2) for r in profiled],
            **split,
            "trace": str(traces[0]),
        }
    elif args.sched:
        record |= {
            "mode": "sched",
            "seconds": args.seconds,
            "decode_tok_s": [round(r, 2) for r in rates],
            "cpus_idle_seconds": round(idle, 2),
            "threads_sched": threads,
        }
    else:
        shares, total, nthreads, top, only_waited = shares_of(raw)
        record |= {
            "process": args.process,
            "decode_tok_s_under_py_spy": [round(r, 2) for r in rates],
            "samples": total,
            "threads": nthreads,
            "every_thread_only_waited": only_waited,
            "shares": shares,
            "top_frames": top,
            "raw_stacks": str(raw),
        }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    with (args.results_dir / "decode_profile.jsonl").open("a") as out:
        out.write(json.dumps(record) + "\n")
    if args.bandwidth:
        print("read GB/s before, decode tok/s, read GB/s after (one stream, request by request):")
        for before, rate, after in series:
            print(f"  {before:7.2f}  {rate:7.2f}  {after:7.2f}")
        return
    if args.torch:
        print(f"one stream decoding at {record['decode_tok_s_before']} tok/s, then at")
        print(f"{record['decode_tok_s_profiled']} tok/s under the profiler;")
        print(f"{split['tokens']} tokens, {split['token_ms_mean']:.2f} ms each (mean), of which:")
        for name, ms in split["split_ms"].items():
            print(f"  {name:62s} {ms:7.2f} ms  {100 * ms / split['token_ms_mean']:5.1f} %")
        print("operators with the most own time (ms per token, calls per token):")
        for name, ms, n in split["top_ops"]:
            print(f"  {ms:7.2f}  {n:6.1f}  {name[:90]}")
        return
    if args.sched:
        print(f"one stream decoding at {record['decode_tok_s']} tok/s; over {args.seconds} s the")
        print(f"host's {psutil.cpu_count()} CPUs were idle {idle:.1f} s in all; the server's")
        print("threads:")
        print("  process      thread            ran %  waited for a CPU %  CPUs seen")
        for row in threads:
            print(
                f"  {row['process']:12s} {row['thread']:16s} {100 * row['ran']:6.1f}"
                f"  {100 * row['waited_for_cpu']:18.1f}  {row['cpus_seen']}"
            )
        return
    print(f"{total} samples of {nthreads} thread(s) of vLLM's {args.process}, one stream decoding:")
    for name, share in shares.items():
        print(f"  {name:24s} {100 * share:5.1f} %")
    if only_waited:
        print("(every thread of it waited at least 95 % of its samples: all are counted)")
    print("innermost Python functions:")
    for frame, share in top:
        print(f"  {100 * share:5.1f} %  {frame[:110]}")


if __name__ == "__main__":
    main()
