"""One stream's decode rate of two servers, paired and interleaved: the tuned service at two
precisions, or the tuned service and llama.cpp at the matched precision.

serving.py measures one configuration after the other; on a shared VM whose memory bandwidth moves
by 1.5x within minutes, two precisions a few minutes apart are not comparable for one stream. Here
both servers run at once (the role's service, as serving.py's `tuned`, each with a small KV cache so
that both fit; llama.cpp as serving.py's `llamacpp`, on the GGUF type serving.py matches to A's
precision, or to --llamacpp-as's), and each pair of measurements asks A and B back to back, in
turns (AB, BA, ...), so a drift falls on both. The result is each pair's B/A ratio and its median,
with the CPU's model and instruction sets:

    .cache/bench/tools-venv/bin/python benchmarks/ab_decode.py --a int8 --b int8-head --pairs 15
    .cache/bench/tools-venv/bin/python benchmarks/ab_decode.py --a int8-head --b llamacpp
    .cache/bench/tools-venv/bin/python benchmarks/ab_decode.py --a int8-head --b llamacpp \
        --llamacpp-as int4
    .cache/bench/tools-venv/bin/python benchmarks/ab_decode.py --a int8 --b int8 \
        --b-set vllm_service_disable_multiprocessing=true

Appends one JSON line to results/ab_decode.jsonl (--results FILE to write elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import inspect
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import serving
import yaml
from servebench import artifacts, configs, procs
from servebench.client import Client, Prompts

HERE = Path(__file__).resolve().parent
# each server's KV cache: one stream of a short prompt needs little, and two servers must fit
KVCACHE_GIB = 2
LLAMACPP_CTX = 4096  # llama.cpp's context, for the same reason: 256 tokens in each of its 16 slots
PROMPT_TOKENS = 8  # of each measured stream, as serving.py's single-stream decode
# the roles/vllm_service defaults configs.tuned() reads (any other would change nothing)
TUNED_READS = frozenset(
    re.findall(r'd\["(vllm_service_\w+)"\]', inspect.getsource(configs.tuned))
) - {
    "vllm_service_kvcache_space_gib",  # both sides: KVCACHE_GIB
    "vllm_service_served_model_name",  # the client asks for the role's name
}


async def _pairs(
    clients: dict[str, Client], prompts: Prompts, pairs: int, tokens: int, pause: float
) -> list[dict[str, float]]:
    """`pairs` pairs of one-stream decode rates, A and B back to back, the order alternating."""
    for client in clients.values():  # warm-up: compiled graphs, caches
        for _ in range(2):
            await client.stream(prompts.make(8), 16, body=client.no_reuse())
    out = []
    for i in range(pairs):
        rates: dict[str, float] = {}
        for side in ("a", "b") if i % 2 == 0 else ("b", "a"):
            time.sleep(pause)  # the other server's OpenMP threads stop spinning
            body = clients[side].no_reuse()
            s = await clients[side].stream(prompts.make(PROMPT_TOKENS), tokens, body=body)
            if not s.decode_rate > 0:  # NaN: every token in one chunk
                raise RuntimeError(f"{side}: no decode rate from {s}")
            rates[side] = round(s.decode_rate, 3)
        out.append(rates)
        ratio = rates["b"] / rates["a"]
        artifacts.log(
            f"pair {i + 1}: a {rates['a']:.2f}, b {rates['b']:.2f} tok/s, b/a {ratio:.3f}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Start both servers, measure the pairs, write the record."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", choices=sorted(serving.PRECISIONS), default="int8")
    ap.add_argument(
        "--b",
        choices=[*sorted(serving.PRECISIONS), "llamacpp"],
        default="int8-head",
        help="a precision of the tuned service, or llamacpp (the GGUF type matched to --a's)",
    )
    ap.add_argument(
        "--b-set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="override a roles/vllm_service default for B only (VALUE is YAML; repeatable)",
    )
    ap.add_argument(
        "--llamacpp-as",
        choices=sorted(serving.PRECISIONS),
        help="with --b llamacpp: the GGUF type matched to this precision, not --a's (e.g. --a"
        " int8-head --llamacpp-as int4: vLLM at 8 bits against llama.cpp's Q4_K_M)",
    )
    ap.add_argument("--model-preset", default="qwen2.5-1.5b-instruct")
    ap.add_argument("--pairs", type=int, default=16, help="even: each side goes first as often")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds before each measurement")
    ap.add_argument("--base-port", type=int, default=8350)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "ab_decode.jsonl")
    args = ap.parse_args(argv)
    b_set: dict[str, Any] = {}
    defaults = artifacts.role_defaults("vllm_service")
    for item in args.b_set:
        var, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--b-set {item}: expected VAR=VALUE")
        if var not in TUNED_READS:
            ap.error(f"--b-set {item}: VAR must be one of the defaults serving.py's tuned reads")
        b_set[var] = yaml.safe_load(value)
        if b_set[var] is None or b_set[var] == defaults[var]:
            ap.error(f"--b-set {item}: VALUE is empty or the role's default")
    if args.a == args.b and not b_set:
        ap.error("--a and --b are the same precision and --b-set changes nothing")
    if args.llamacpp_as and (args.b != "llamacpp" or args.llamacpp_as == args.a):
        ap.error("--llamacpp-as: only with --b llamacpp, and another precision than --a")
    if b_set and args.b == "llamacpp":
        ap.error("--b-set applies to the tuned service, not to llama.cpp")
    if args.b == "llamacpp" and PROMPT_TOKENS + args.decode_tokens > LLAMACPP_CTX // 16:
        ap.error(f"--decode-tokens: llama.cpp's slots hold {LLAMACPP_CTX // 16} tokens here")

    facts = configs.host_facts()
    python = artifacts.ensure_vllm_venv(artifacts.zendnn_requirements(facts))
    sides = {"a": args.a} | ({} if args.b == "llamacpp" else {"b": args.b})
    models = {
        side: artifacts.ensure_model(args.model_preset, serving.PRECISIONS[p][0])
        for side, p in sides.items()
    }
    session = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    logs = artifacts.BENCH_CACHE / "logs" / f"ab-{session}"
    state = artifacts.BENCH_CACHE / "state" / f"ab-{session}"
    overrides = {"vllm_service_kvcache_space_gib": KVCACHE_GIB}
    sets = {"a": overrides, "b": overrides | b_set}
    made = {
        side: configs.tuned(python, model, args.base_port + i, state / side, facts, sets[side])
        for i, (side, model) in enumerate(models.items())
    }
    what = {side: f"tuned, {p} ({models[side].name})" for side, p in sides.items()}
    if b_set:
        what["b"] += ", " + ", ".join(f"{k}={v!r}" for k, v in b_set.items())
    if args.b == "llamacpp":  # as serving.py: llama.cpp's own format, made from the bf16 model
        without_amx = "amx_int8" in facts["flags"]
        llama_dir = artifacts.ensure_llama_server(len(facts["cpus"]) or 1, without_amx)
        matched = args.llamacpp_as or args.a
        quant, outtype = serving.PRECISIONS[matched]
        # made from A's model, or from the preset's bf16 one for another precision's type
        source = models["a"] if matched == args.a else artifacts.ensure_model(args.model_preset)
        gguf, gguf_type = artifacts.matched_gguf(
            source, args.model_preset, quant, llama_dir, python, outtype
        )
        made["b"] = configs.llamacpp(
            llama_dir / "bin" / "llama-server",
            gguf,
            gguf_type,
            args.base_port + 1,
            state / "b",
            facts,
            without_amx,
        )
        # its context from the model (32,768 tokens) in 16 slots takes 16 GiB here: with the tuned
        # server beside it the host thrashed; one short stream needs a small one
        made["b"].argv += ["--ctx-size", str(LLAMACPP_CTX)]
        made["b"].notes.append(f"--ctx-size {LLAMACPP_CTX} (serving.py: the model's)")
        what["b"] = f"llamacpp, {gguf_type} ({gguf.name})"
    servers = {side: procs.Server(made[side], logs / f"{side}.log") for side in ("a", "b")}
    procs.raise_on_signals()
    try:
        for side, server in servers.items():  # one after the other: start-up is CPU-bound
            server.__enter__()
            up = server.wait_healthy(900)
            artifacts.log(f"{side} ({what[side]}): /health after {up:.0f} s")
        config = json.loads((models["a"] / "config.json").read_text())
        prompts = Prompts(serving.first_added_token(models["a"], int(config["vocab_size"])), seed=0)
        clients = {side: Client(s.url, s.config.kind) for side, s in servers.items()}

        async def run() -> list[dict[str, float]]:
            try:
                return await _pairs(clients, prompts, args.pairs, args.decode_tokens, args.pause)
            finally:
                for client in clients.values():
                    await client.close()

        pairs = asyncio.run(run())
    finally:
        for server in reversed(servers.values()):
            server.stop()  # (nothing when it never started)

    ratios = [p["b"] / p["a"] for p in pairs]
    llama_server = made["b"].argv[0] if args.b == "llamacpp" else None
    record: dict[str, Any] = {
        "time": session,
        **serving.git_state(),
        "versions": serving.versions(python, Path(llama_server) if llama_server else None),
        "command": "python benchmarks/ab_decode.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": {**configs.cpu_record(facts), "cpus": len(facts["cpus"])},
        "a": what["a"],
        "b": what["b"],
        "notes": {side: made[side].notes for side in ("a", "b")},
        "kvcache_gib_of_tuned": KVCACHE_GIB,
        "decode_tokens": args.decode_tokens,
        "prompt_tokens": PROMPT_TOKENS,
        "pause_s": args.pause,
        "pairs": pairs,
        "median_tok_s": {s: statistics.median(p[s] for p in pairs) for s in ("a", "b")},
        "ratio_b_over_a": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
            "b_faster_in": sum(r > 1 for r in ratios),
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(record) + "\n")
    artifacts.log(
        f"{args.b} / {args.a}: median ratio {record['ratio_b_over_a']['median']}"
        f" ({record['ratio_b_over_a']['b_faster_in']} of {len(pairs)} pairs faster);"
        f" medians {record['median_tok_s']} tok/s; written to {args.results}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
