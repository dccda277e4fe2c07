"""The serving benchmark's client (benchmarks/servebench/client.py) and bandwidth limit (limits.py).

The multi-turn chat runs against a stand-in server on loopback that speaks the two streaming
completion dialects the benchmark measures: vLLM's (usage per chunk with `continuous_usage_stats`,
a usage chunk without choices, `cache_salt`, the prefix-cache counter on /metrics, counted in whole
128-token blocks) and llama-server's (`timings` with `predicted_n` and `cache_n` per chunk with
`timings_per_token` and on the last one, a closing chunk without text carrying usage and timings,
`cache_prompt`; as its server-task.cpp writes them). Neither ignores end-of-sequence unless asked
(`ignore_eos`): the stand-in then ends the answer early. Its prefix cache keeps what those
servers document: vLLM matches a prompt only against earlier prompts of the same salt, llama-server
reuses its slot's last prompt unless the request says `cache_prompt: false`. So "without reuse,
nothing is reused" is checked as the server would see it, not by reading the benchmark's request
fields back.
"""

from __future__ import annotations

import asyncio
import http.server
import importlib.util
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from servebench import client, limits

BLOCK = 128  # vLLM's KV block on CPU: its prefix cache counts whole blocks


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class StandIn(http.server.ThreadingHTTPServer):
    """A completions server with a prefix cache, in vLLM's or llama-server's dialect."""

    def __init__(self, kind: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.kind = kind
        self.bodies: list[dict[str, Any]] = []
        self.seen: list[tuple[str | None, list[int]]] = []  # (salt, prompt) of earlier requests
        self.hits = 0
        self.count_hits = True  # False: no counter on /metrics, no cache_n in the timings
        self.short_by = 0  # tokens fewer than asked for

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reuse(self, body: dict[str, Any]) -> int:
        prompt = body["prompt"]
        if self.kind == "vllm":
            salt = body.get("cache_salt")
            same = [p for s, p in self.seen if s == salt]
            # the last token is always computed, so at most len - 1 tokens, in whole blocks
            best = max((_common_prefix(p, prompt) for p in same), default=0)
            cached = min(best, len(prompt) - 1) // BLOCK * BLOCK
            self.seen.append((salt, prompt))
        else:
            last = self.seen[-1][1] if self.seen else []
            cached = _common_prefix(last, prompt) if body.get("cache_prompt", True) else 0
            self.seen = [(None, prompt)]
        self.hits += cached
        return cached


class _Handler(http.server.BaseHTTPRequestHandler):
    server: StandIn
    protocol_version = "HTTP/1.0"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/metrics" or self.server.kind != "vllm":
            self.send_error(404)
            return
        text = "# TYPE vllm:prefix_cache_hits_total counter\n"
        if self.server.count_hits:
            text += (
                f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {self.server.hits}.0\n'
            )
            # prometheus_client's companion sample of every counter
            text += 'vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9\n'
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(text.encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        cached = self.server.reuse(body)
        prompt_n, asked = len(body["prompt"]), body["max_tokens"]
        # a model ends its answer early (end of sequence) unless told to ignore it
        made = (asked if body.get("ignore_eos") else asked // 2) - self.server.short_by
        options = body.get("stream_options") or {}
        vllm = self.server.kind == "vllm"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"]}

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": prompt_n, "completion_tokens": n, "total_tokens": prompt_n + n}

        def send(chunk: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
            }

        timings = {"cache_n": cached} if self.server.count_hits else {}
        for n in range(1, made + 1):
            last = n == made
            chunk = base | choice("x", "length" if last and vllm else None)
            if vllm and options.get("include_usage") and options.get("continuous_usage_stats"):
                chunk["usage"] = usage(n)
            # llama-server: timings per chunk when asked, and always on the last one
            if not vllm and (body.get("timings_per_token") or last):
                chunk["timings"] = {"predicted_n": n} | timings
            send(chunk)
        if vllm and options.get("include_usage"):  # vLLM: a chunk of its own, without choices
            send(base | {"choices": [], "usage": usage(made)})
        if not vllm:  # llama-server: a closing chunk without text, with usage and timings
            send(
                base
                | choice("", "length")
                | {"usage": usage(made), "timings": {"predicted_n": made} | timings}
            )
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(params=["vllm", "llamacpp"])
def server(request: pytest.FixtureRequest, serve: Callable[[StandIn], StandIn]) -> StandIn:
    return serve(StandIn(request.param))


SHAPE = client.ChatShape(turns=4, system_tokens=130, question_tokens=12, answer_tokens=5)


def _chat(server: StandIn, reuse: bool, shape: client.ChatShape = SHAPE) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        c = client.Client(server.url, server.kind)
        try:
            return await client.chat(c, client.Prompts(first_special=151643, seed=1), shape, reuse)
        finally:
            await c.close()

    return asyncio.run(run())


def test_each_turn_sends_the_whole_conversation_so_far(server: StandIn) -> None:
    result = _chat(server, reuse=True)
    prompts = [b["prompt"] for b in server.bodies]
    assert [len(p) for p in prompts] == [SHAPE.prompt_tokens(n) for n in range(1, 5)]
    assert result["prompt_tokens"] == [len(p) for p in prompts]
    for earlier, later in itertools.pairwise(prompts):
        assert later[: len(earlier)] == earlier  # the last prompt, then the answer and a question
    assert len(result["ttft_s"]) == SHAPE.turns


def test_with_reuse_the_server_reports_the_conversation_as_cached(server: StandIn) -> None:
    result = _chat(server, reuse=True)
    assert result["cached_prompt_tokens"] == server.hits
    # every turn after the first finds at least its previous prompt (in whole blocks for vLLM)
    least = sum((SHAPE.prompt_tokens(n) // BLOCK) * BLOCK for n in range(1, SHAPE.turns))
    assert result["cached_prompt_tokens"] >= least > 0


def test_without_reuse_the_server_reuses_nothing(server: StandIn) -> None:
    _chat(server, reuse=True)  # the same conversation (same seed) first: every prompt is cached
    warm = server.hits
    result = _chat(server, reuse=False)
    assert result["cached_prompt_tokens"] == 0
    assert server.hits == warm


def test_a_server_that_does_not_count_gives_none_not_zero(server: StandIn) -> None:
    server.count_hits = False
    assert _chat(server, reuse=True)["cached_prompt_tokens"] is None


def test_a_short_answer_is_an_error(server: StandIn) -> None:
    server.short_by = 1
    with pytest.raises(client.CountMismatch, match="asked for 5 tokens, got 4"):
        _chat(server, reuse=True)


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("0", None),
        ("8,256,64,32", client.ChatShape(8, 256, 64, 32)),
        ("1,1,1,2", client.ChatShape(1, 1, 1, 2)),
    ],
)
def test_the_chat_option(text: str, shape: client.ChatShape | None) -> None:
    assert client.ChatShape.parse(text) == shape


@pytest.mark.parametrize(
    "text", ["", "8,256,64", "8,256,64,1", "8,0,64,32", "a,b,c,d", "8,256,64,32,1", "-1"]
)
def test_a_malformed_chat_option_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected 0, or four positive numbers"):
        client.ChatShape.parse(text)


def test_the_default_chat_ends_on_a_992_token_prompt() -> None:
    assert client.ChatShape.parse("8,256,64,32").prompt_tokens(8) == 992


# The benchmark's model: the fixture's shape of Qwen2.5-1.5B-Instruct (tied embeddings, as the
# fixture writes its config.json). The real model's card says 1.54B parameters, 1.31B without the
# embedding, and its model.safetensors is 3,087,467,008 bytes: the bf16 values and a 38,400-byte
# header.
_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures/make_tiny_qwen2.py"
_SPEC = importlib.util.spec_from_file_location("make_tiny_qwen2", _FIXTURE)
assert _SPEC and _SPEC.loader
_fixture = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_fixture)
QWEN_1_5B = _fixture.PRESETS["qwen2.5-1.5b-instruct"] | {"tie_word_embeddings": True}


def test_the_parameter_count_is_the_real_models() -> None:
    p = limits.parameter_counts(QWEN_1_5B)
    assert p["total"] * 2 + 38_400 == 3_087_467_008
    assert round(p["layers"] / 1e9, 2) == 1.31


def test_a_decoded_token_reads_every_weight_once_and_the_kv_cache() -> None:
    bf16 = limits.bytes_per_token(QWEN_1_5B, "bfloat16", "bfloat16", context=1000)
    p = limits.parameter_counts(QWEN_1_5B)
    # the tied embedding is read once, as the output projection (the lookup reads one row)
    assert bf16["weights"] == 2 * (p["total"] + p["hidden"])
    # tokens x layers x (k, v) x KV heads x head dim x bytes
    assert bf16["kv_cache"] == 1000 * 28 * 2 * 2 * 128 * 2
    fp32 = limits.bytes_per_token(QWEN_1_5B, "float32", "bfloat16", context=0)
    assert fp32["weights"] == 2 * bf16["weights"]
    assert limits.ceiling(30.0, bf16["total"]) == pytest.approx(30e9 / bf16["total"])
