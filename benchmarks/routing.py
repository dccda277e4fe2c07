"""Routing benchmark (issue #15): multi-turn conversations through nginx in front of two vLLM
servers, the gateway's `least_conn` against its session affinity (X-Session-ID, consistent hashing)
and against vllm-router (the vLLM project's router, PyPI) between nginx and the servers with its
consistent-hash and cache-aware policies, with vLLM's prefix caching on (its default).

    python benchmarks/routing.py    # all 4 modes; Qwen2.5-1.5B's shape, 8 conversations, 4 at once
    python benchmarks/routing.py --model-preset tiny --conversations 2 --turns 2   # a smoke run

Two servers as the role runs them (servebench.configs.tuned), each bound to its own half of the
host's cores, behind Debian's nginx with the gateway's balancing directives (least_conn; the map on
the session header and `hash ... consistent`, as roles/vllm_gateway/templates/vllm-gateway.conf.j2
writes them; no TLS and no key check, which cost the same in every mode). Every conversation has a
shared system prompt, then 4 turns; each turn resends the whole conversation with a new question
and every request names its conversation in X-Session-ID, as the chat page does: only what sits
between the client and the servers differs between the modes. Each mode starts with a fresh system
prompt, so no cache carries over. The conversation's earlier answers are sent as fixed tokens
rather than the ones the server generated, so the cache can reuse the prompt part of each earlier
turn only: the gain measured is a lower bound. vllm-router runs from its own venv
(.cache/bench/router-venv, pinned by benchmarks/requirements-router.txt). Everything listens on
127.0.0.1 and is stopped by its process group.
Appends to benchmarks/results/routing.jsonl, writes benchmarks/results/routing.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from servebench import BENCH_CACHE, RESULTS, artifacts, client, configs, procs
from servebench.artifacts import log
from serving import first_added_token, git_state, host_record

SESSION_HEADER = "X-Session-ID"
NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/nginx-error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {state}/body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    map $http_x_session_id $pool {{
        ""      fleet;
        default {session_pool};
    }}
    upstream fleet {{
        zone fleet 64k;
        least_conn;
{servers}
        keepalive 16;
    }}
    upstream sessions {{
        zone sessions 64k;
        hash $http_x_session_id consistent;
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://$pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""
# mode: (nginx upstream for requests with a session id, vllm-router's options between nginx and the
# servers, or None). In the router modes nginx has the router as its only upstream server.
# cache_aware's defaults balance load only when the busiest server has 64 requests more than the
# idlest: below that, with empty prefix trees, it sends every request to one server (seen with two
# stub servers), so it runs here with the tightest balance thresholds it takes (1 request, 1.0x).
MODES: dict[str, tuple[str, list[str] | None]] = {
    "least_conn": ("fleet", None),
    "session": ("sessions", None),
    "router-consistent-hash": ("fleet", ["--policy", "consistent_hash"]),
    "router-cache-aware": (
        "fleet",
        [
            "--policy",
            "cache_aware",
            "--balance-abs-threshold",
            "1",
            "--balance-rel-threshold",
            "1.0",
        ],
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-preset", default="qwen2.5-1.5b-instruct")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    # More conversations at a time than servers: with as many as servers, least_conn keeps each on
    # "its" idle server by itself, which many users at once do not.
    ap.add_argument("--concurrency", type=int, default=4, help="conversations at a time")
    # A user reads the answer before the next question: between 0 and this many seconds, uniformly
    # (seeded). Without it every conversation is always in flight and least_conn sends each turn
    # back to the server that just finished the previous one.
    ap.add_argument("--think-seconds", type=float, default=4.0)
    ap.add_argument("--system-tokens", type=int, default=384, help="shared system prompt")
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--kvcache-gib", type=int, default=3, help="per server")
    ap.add_argument("--modes", default=",".join(MODES), help="in this order")
    ap.add_argument(
        "--base-port", type=int, default=18400, help="servers +1, +2; vllm-router +3, metrics +4"
    )
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument(
        "--load", default="single", help="what else ran on the host (recorded): single, contended"
    )
    args = ap.parse_args(argv)
    args.modes = args.modes.split(",")
    if args.turns < 2 or args.conversations < 1:
        ap.error("a conversation needs at least 2 turns, and there must be at least 1")
    if unknown := set(args.modes) - set(MODES):
        ap.error(f"unknown modes {sorted(unknown)}; known: {sorted(MODES)}")
    if not Path(args.nginx).is_file():
        ap.error(f"no nginx at {args.nginx}: apt-get install nginx-light (the gateway's nginx)")
    return args


def counters(urls: list[str]) -> dict[str, float]:
    """Prompt tokens looked up in and found in the servers' prefix caches, and the requests each
    server finished (`requests-<index>`): vLLM's own counters."""
    totals = {"queries": 0.0, "hits": 0.0}
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    for index, url in enumerate(urls):
        totals[f"requests-{index}"] = 0.0
        with direct.open(url + "/metrics", timeout=10) as answer:
            for line in answer.read().decode().splitlines():
                for name in ("queries", "hits"):
                    if line.startswith(f"vllm:prefix_cache_{name}_total"):
                        totals[name] += float(line.rsplit(" ", 1)[1])
                if line.startswith("vllm:request_success_total"):
                    totals[f"requests-{index}"] += float(line.rsplit(" ", 1)[1])
    return totals


async def conversations(
    args: argparse.Namespace, url: str, mode: str, prompts: client.Prompts
) -> tuple[list[dict[str, Any]], float]:
    """Run every conversation of one mode; per-turn records and the wall time."""
    api = client.Client(url, "vllm")
    system = prompts.make(args.system_tokens)  # fresh per mode: nothing cached carries over
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(args.conversations):
        queue.put_nowait(number)
    records: list[dict[str, Any]] = []
    think = random.Random(1)

    async def worker() -> None:
        while not queue.empty():
            number = queue.get_nowait()
            headers = {SESSION_HEADER: f"{mode}-{number}"}
            context = list(system)
            for turn in range(1, args.turns + 1):
                context += prompts.make(args.question_tokens)
                s = await api.stream(context, args.answer_tokens, headers=headers)
                records.append(
                    {
                        "conversation": number,
                        "turn": turn,
                        "prompt_tokens": len(context),
                        "ttft_s": round(s.ttft, 3),
                        "seconds": round(s.done - s.sent, 3),
                        "completion_tokens": s.completion_tokens,
                    }
                )
                context += prompts.make(args.answer_tokens)  # the answer, resent next turn
                if turn < args.turns:
                    await asyncio.sleep(think.uniform(0, args.think_seconds))

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        await api.close()
    return records, time.perf_counter() - start


def summarize(mode: str, records: list[dict[str, Any]], wall: float, cache: dict) -> dict:
    """One mode's figures."""
    later = [r["ttft_s"] for r in records if r["turn"] >= 2]
    first = [r["ttft_s"] for r in records if r["turn"] == 1]
    return {
        "mode": mode,
        "ttft_turn1_median_s": round(statistics.median(first), 3),
        "ttft_later_median_s": round(statistics.median(later), 3),
        "ttft_later_max_s": round(max(later), 3),
        "wall_s": round(wall, 1),
        "tokens_per_s": round(sum(r["completion_tokens"] for r in records) / wall, 3),
        "prefix_cache_hit_rate": round(cache["hits"] / cache["queries"], 3)
        if cache["queries"]
        else None,
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
    }


def markdown(session: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The report."""
    host = session["host"]
    lines = [
        "",
        f"## Run {session['started']}",
        "",
        f"On {host['cpu_model']} ({host['physical_cores']} cores,"
        f" flags {', '.join(host['flags'])}), commit {session['git']['commit'][:10]}"
        f"{' (dirty)' if session['git']['dirty'] else ''}; load: {session['load']}.",
        f"Model: random weights, preset `{session['model_preset']}`, bf16 where the CPU has"
        f" AVX-512 (the role's tuning). Two vLLM servers, {session['cores_per_server']} core(s)"
        f" each, KV cache {session['kvcache_gib']} GiB each, prefix caching on; nginx"
        f" {session['nginx_version']} in front.",
        f"Workload: {session['conversations']} conversations of {session['turns']} turns,"
        f" {session['concurrency']} at a time, 0-{session['think_seconds']} s between turns;"
        f" system prompt {session['system_tokens']} tokens, each question"
        f" {session['question_tokens']}, each answer {session['answer_tokens']}.",
        "",
        "| gateway | TTFT turn 1 (median) | TTFT turns >= 2 (median / max) | output tok/s |"
        " prefix-cache hit rate | wall | requests per server |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r["prefix_cache_hit_rate"]
        lines.append(
            f"| {r['mode']} | {r['ttft_turn1_median_s']} s | {r['ttft_later_median_s']} s /"
            f" {r['ttft_later_max_s']} s | {r['tokens_per_s']} |"
            f" {'-' if rate is None else f'{rate:.0%}'} | {r['wall_s']} s |"
            f" {' / '.join(map(str, r.get('requests_per_server', []))) or 'not recorded'} |"
        )
    lines += [
        f"\n{r['mode']}: nginx -> {r['router']} -> the servers." for r in results if r.get("router")
    ]
    lines += [
        "",
        f"Reproduce: `{session.get('command', 'python benchmarks/routing.py')}`"
        " (`make bench-routing ROUTING_ARGS=...`).",
        "",
    ]
    return "\n".join(lines)


def write_report() -> None:
    """results/routing.md from every run in results/routing.jsonl, the newest first."""
    runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for line in (RESULTS / "routing.jsonl").read_text().splitlines():
        record = json.loads(line)
        runs.setdefault(record["started"], (record, []))[1].append(record)
    text = "# Routing: least_conn, session affinity and vllm-router (issue #15)\n"
    for started in sorted(runs, reverse=True):
        text += markdown(*runs[started])
    (RESULTS / "routing.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Start the servers and nginx, run each mode, write the results."""
    if (argv if argv is not None else sys.argv[1:]) == ["--report"]:
        write_report()  # only render results/routing.md again
        return 0
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    procs.raise_on_signals()
    model = artifacts.ensure_model(args.model_preset)
    facts = configs.host_facts()
    # serving.py's tuned venv: zentorch where vLLM takes its ZenDNN path, as roles/vllm_install does
    python = artifacts.ensure_vllm_venv(artifacts.zendnn_requirements(facts))
    cpus = sorted(int(c["cpu"]) for c in facts["cpus"])
    half = max(1, len(cpus) // 2)
    binds = [cpus[:half], cpus[half:] or cpus[:half]]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    state = BENCH_CACHE / "state" / f"routing-{stamp}"
    ports = [args.base_port + 1, args.base_port + 2]
    servers = []
    for index, (port, bind) in enumerate(zip(ports, binds, strict=True)):
        overrides = {
            "vllm_service_omp_threads_bind": ",".join(map(str, bind)),
            "vllm_service_kvcache_space_gib": args.kvcache_gib,
        }
        config = configs.tuned(python, model, port, state / f"vllm-{index}", facts, overrides)
        config.name = f"vllm-{index}"
        servers.append(procs.Server(config, state / f"vllm-{index}.log"))
    results: list[dict[str, Any]] = []
    session: dict[str, Any] = {
        "started": stamp,
        "host": host_record(facts),
        "git": git_state(),
        "load": args.load,
        "command": " ".join(["python benchmarks/routing.py", *given]),
        "model_preset": args.model_preset,
        "cores_per_server": half,
        "kvcache_gib": args.kvcache_gib,
        **{k: getattr(args, k) for k in ("conversations", "turns", "concurrency", "think_seconds")},
        **{k: getattr(args, k) for k in ("system_tokens", "question_tokens", "answer_tokens")},
    }
    version = subprocess.run([args.nginx, "-v"], capture_output=True, text=True, check=False)
    session["nginx_version"] = version.stderr.strip().rsplit("/", 1)[-1]
    vocab_size = int(json.loads((model / "config.json").read_text())["vocab_size"])
    prompts = client.Prompts(first_added_token(model, vocab_size), seed=0)
    try:
        for server in servers:
            server.__enter__()
        for server in servers:
            log(f"{server.config.name} up after {server.wait_healthy(args.start_timeout):.0f} s")
        urls = [server.url for server in servers]
        for mode in args.modes:
            run = state / f"nginx-{mode}"
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (run / sub).mkdir(parents=True, exist_ok=True)
            pool, router_options = MODES[mode]
            upstream_ports = ports
            with contextlib.ExitStack() as stack:
                if router_options:
                    config = router_config(args, run, urls, router_options)
                    router = stack.enter_context(procs.Server(config, run / "router.log"))
                    router.wait_healthy(120)
                    upstream_ports = [router.config.port]
                upstreams = "\n".join(f"        server 127.0.0.1:{p};" for p in upstream_ports)
                conf = run / "nginx.conf"
                conf.write_text(
                    NGINX_CONF.format(
                        state=run, servers=upstreams, port=args.base_port, session_pool=pool
                    )
                )
                argv = [args.nginx, "-p", str(run), "-e", str(run / "nginx-error.log")]
                nginx_config = configs.ServerConfig(
                    "nginx",
                    [*argv, "-c", str(conf)],
                    {"PATH": "/usr/sbin:/usr/bin"},
                    run,
                    args.base_port,
                    "nginx",
                    None,
                )
                nginx = stack.enter_context(procs.Server(nginx_config, run / "nginx.log"))
                nginx.wait_healthy(60)
                # a short warm-up request on each server outside the measured conversations
                asyncio.run(warm_up(urls, prompts))
                before = counters(urls)
                log(f"{mode}: {args.conversations} conversations of {args.turns} turns ...")
                records, wall = asyncio.run(
                    conversations(args, f"http://127.0.0.1:{args.base_port}", mode, prompts)
                )
                after = counters(urls)
            cache = {k: after[k] - before[k] for k in after}
            result = summarize(mode, records, wall, cache)
            result["requests_per_server"] = [int(cache[f"requests-{i}"]) for i in range(len(urls))]
            result["router"] = (
                f"vllm-router {artifacts.router_version()} {' '.join(router_options)}"
                if router_options
                else None
            )
            log(json.dumps(result))
            results.append(result)
            with (RESULTS / "routing.jsonl").open("a") as out:
                out.write(json.dumps({**session, **result, "turns_detail": records}) + "\n")
    finally:
        for server in servers:
            server.stop()
    print(markdown(session, results))
    write_report()
    return 0


def router_config(
    args: argparse.Namespace, run: Path, urls: list[str], options: list[str]
) -> configs.ServerConfig:
    """vllm-router with these options in front of the servers, everything on loopback."""
    launcher = artifacts.ensure_router_venv()
    port = args.base_port + 3
    argv = [str(launcher), "--host", "127.0.0.1", "--port", str(port), *options]
    argv += ["--worker-urls", *urls, "--prometheus-host", "127.0.0.1"]
    argv += ["--prometheus-port", str(args.base_port + 4), "--log-level", "warning"]
    return configs.ServerConfig(
        "vllm-router", argv, {"PATH": "/usr/bin:/bin"}, run / "router", port, "router", None
    )


async def warm_up(urls: list[str], prompts: client.Prompts) -> None:
    """One short completion per server (first requests pay one-time costs)."""
    for url in urls:
        api = client.Client(url, "vllm")
        try:
            await api.stream(prompts.make(16), 4)
        finally:
            await api.close()


if __name__ == "__main__":
    sys.exit(main())
