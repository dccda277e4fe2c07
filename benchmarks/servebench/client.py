"""The measurements, through the OpenAI-compatible /v1/completions with stream=true (`openai`).

Prompts are lists of token ids (the completions API takes them), so a "512-token prompt" is exactly
512 tokens for every server, whatever each tokenizer does with text; every request gets a prompt of
its own, so no server answers from a prefix cache, except in the multi-turn chat (`chat`), which
measures exactly that. Sampling is greedy (temperature 0, no repetition
penalty) and `ignore_eos` makes every request generate exactly max_tokens: the counts the servers
report (usage, stream_options.include_usage) are checked against max_tokens.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx2
from openai import AsyncOpenAI

from servebench import SERVED_MODEL_NAME


class CountMismatch(RuntimeError):
    """A server generated or read another number of tokens than asked."""


@dataclass
class Stream:
    """Timings (perf_counter seconds) and counts of one streamed completion."""

    sent: float
    first: float
    last: float
    done: float
    completion_tokens: int
    prompt_tokens: int | None
    chunks: int
    usage_reported: bool
    first_tokens: int  # tokens the first chunk carried
    last_tokens: int  # tokens generated when the last chunk arrived
    cached_tokens: int | None = None  # prompt tokens reused from llama-server's cache (cache_n)

    @property
    def ttft(self) -> float:
        """Time to first token."""
        return self.first - self.sent

    @property
    def decode_rate(self) -> float:
        """Tokens generated after the first chunk per second, until the last chunk."""
        span = self.last - self.first
        return (self.last_tokens - self.first_tokens) / span if span > 0 else float("nan")


class Prompts:
    """Unique prompts of random regular tokens (ids below the first special token)."""

    def __init__(self, first_special: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.low, self.high = 256, first_special - 1  # past the 256 byte tokens

    def make(self, n: int) -> list[int]:
        """A fresh prompt of n token ids."""
        return [self.rng.randint(self.low, self.high) for _ in range(n)]


class Client:
    """Streams completions from one server."""

    def __init__(self, base_url: str, kind: str) -> None:
        # trust_env=False: a proxy from the environment must never see loopback traffic.
        # No keep-alive: llama-server (cpp-httplib) closes idle connections after 5 s, and
        # reusing one it is closing fails with "Server disconnected without sending a response";
        # a new loopback connection per request costs well under a millisecond, for every server.
        self.http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(3600.0, connect=10.0),
            limits=httpx2.Limits(max_connections=64, max_keepalive_connections=0),
            trust_env=False,
        )
        self.openai = AsyncOpenAI(
            base_url=base_url + "/v1", api_key="bench", max_retries=0, http_client=self.http
        )
        # Token counts per chunk: vLLM reports usage in every chunk with continuous_usage_stats,
        # llama-server its timings (predicted_n) with timings_per_token.
        self.stream_options: dict[str, Any] = {"include_usage": True}
        self.extra: dict[str, Any] = {"ignore_eos": True}
        if kind == "vllm":
            self.stream_options["continuous_usage_stats"] = True
            # vLLM applies the model's generation_config.json (repetition_penalty 1.05) unless told
            self.extra["repetition_penalty"] = 1.0
        else:
            self.extra["timings_per_token"] = True
        self.kind = kind
        self.base_url = base_url

    def no_reuse(self) -> dict[str, Any]:
        """Request fields that keep the server from reusing any earlier request's computation.

        vLLM: a cache salt of its own (the prefix cache only matches blocks of the same salt), so
        the request computes as with --no-enable-prefix-caching, on the same server. llama-server:
        cache_prompt false (it would keep the slot's KV cache of the common prefix otherwise).
        """
        if self.kind == "vllm":
            return {"cache_salt": uuid.uuid4().hex}
        return {"cache_prompt": False}

    async def prefix_cache_hits(self) -> int | None:
        """vLLM's count of prompt tokens found in its prefix cache so far (its /metrics); None for
        llama-server, whose responses say it per request (Stream.cached_tokens)."""
        if self.kind != "vllm":
            return None
        try:
            response = await self.http.get(self.base_url + "/metrics")
            response.raise_for_status()
        except httpx2.HTTPError as err:
            raise RuntimeError(f"reading {self.base_url}/metrics failed: {err!r}") from err
        counts = [
            float(line.rsplit(" ", 1)[1])
            for line in response.text.splitlines()
            if line.startswith("vllm:prefix_cache_hits_total")
        ]
        return round(sum(counts)) if counts else None  # None: vLLM does not count (no stats)

    async def close(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def stream(
        self,
        prompt: list[int],
        max_tokens: int,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Stream:
        """One streamed completion (with more request `headers` and `body` fields); checks the
        token counts."""
        sent = time.perf_counter()
        response = await self.openai.completions.create(
            model=SERVED_MODEL_NAME,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options=self.stream_options,  # type: ignore[arg-type]
            extra_body=self.extra | (body or {}),
            extra_headers=headers,
        )
        marks: list[tuple[float, int]] = []  # (arrival, tokens generated so far) per chunk
        usage = None
        cached = None
        async for chunk in response:
            now = time.perf_counter()
            if chunk.choices:
                # A chunk can carry several tokens (a slow client, text held back until it is
                # whole UTF-8): count by what the server reports, else one token per chunk.
                count = chunk.usage.completion_tokens if chunk.usage is not None else None
                timings = (chunk.model_extra or {}).get("timings") or {}
                count = count or timings.get("predicted_n")
                cached = timings.get("cache_n", cached)
                marks.append((now, int(count or (marks[-1][1] + 1 if marks else 1))))
            if chunk.usage is not None:
                usage = chunk.usage
        done = time.perf_counter()
        chunks = len(marks)
        completion = usage.completion_tokens if usage else chunks
        prompt_tokens = usage.prompt_tokens if usage else None
        if completion != max_tokens or not marks:
            raise CountMismatch(
                f"asked for {max_tokens} tokens, got {completion} ({chunks} chunks,"
                f" usage {'reported' if usage else 'missing'}): is ignore_eos honoured?"
            )
        if prompt_tokens is not None and prompt_tokens != len(prompt):
            raise CountMismatch(
                f"sent {len(prompt)} prompt tokens, the server read {prompt_tokens}"
            )
        (first, first_tokens), (last, last_tokens) = marks[0], marks[-1]
        return Stream(
            sent,
            first,
            last,
            done,
            completion,
            prompt_tokens,
            chunks,
            bool(usage),
            first_tokens,
            min(last_tokens, completion),
            cached,
        )


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


@dataclass(frozen=True)
class ChatShape:
    """The multi-turn chat: a system prompt, then `turns` questions, each answered."""

    turns: int
    system_tokens: int
    question_tokens: int
    answer_tokens: int

    @classmethod
    def parse(cls, text: str) -> ChatShape | None:
        """`--chat TURNS,SYSTEM,QUESTION,ANSWER`; "0": no chat (None). ValueError if malformed."""
        try:
            numbers = [int(n) for n in text.split(",")]
        except ValueError:
            numbers = []
        if numbers == [0]:
            return None
        if len(numbers) != 4 or min(numbers) < 1 or numbers[3] < 2:
            raise ValueError(
                f"--chat {text}: expected 0, or four positive numbers (the answer at least 2"
                " tokens, for a decode rate), e.g. 8,256,64,32"
            )
        return cls(*numbers)

    def prompt_tokens(self, turn: int) -> int:
        """The prompt of turn `turn` (1-based): everything said before it, and its question."""
        return self.system_tokens + turn * self.question_tokens + (turn - 1) * self.answer_tokens


async def chat(client: Client, prompts: Prompts, shape: ChatShape, reuse: bool) -> dict[str, Any]:
    """One conversation whose context grows every turn, as a chat page sends it: each request
    carries the whole conversation so far and a new question, and waits for its answer.

    reuse False: no request may reuse an earlier one's computation (`Client.no_reuse`): every turn
    computes its whole prompt, as with prefix caching off. The next turn sends the answer back as
    fresh tokens of the answer's length (the benchmark asks for token counts, not text), so a
    server reuses the conversation up to the last question, not the answer it generated: a
    little less than a real chat lets it reuse, for both servers alike.
    """
    context = prompts.make(shape.system_tokens)
    turns: list[Stream] = []
    hits_before = await client.prefix_cache_hits()
    for _ in range(shape.turns):
        context += prompts.make(shape.question_tokens)
        turns.append(
            await client.stream(
                context, shape.answer_tokens, body=None if reuse else client.no_reuse()
            )
        )
        context += prompts.make(shape.answer_tokens)
    hits_after = await client.prefix_cache_hits()
    cached: int | None = None  # None: the server did not say
    if hits_before is not None and hits_after is not None:
        cached = hits_after - hits_before
    elif all(t.cached_tokens is not None for t in turns):
        cached = sum(t.cached_tokens or 0 for t in turns)
    return {
        # prompt tokens the server took from its cache over the conversation, as it reports them
        "cached_prompt_tokens": cached,
        "ttft_s": [round(t.ttft, 3) for t in turns],
        "prompt_tokens": [shape.prompt_tokens(n) for n in range(1, shape.turns + 1)],
        "decode_tokens_per_s": round(statistics.median(t.decode_rate for t in turns), 3),
        "wall_s": round(turns[-1].done - turns[0].sent, 3),
    }


async def measure(
    client: Client,
    prompts: Prompts,
    decode_tokens: int,
    prompt_tokens: int,
    stream_tokens: int,
    concurrency: list[int],
    short_prompt: int,
    chat_shape: ChatShape | None = None,
    uncached_first: bool = False,
) -> dict[str, Any]:
    """One run: single-stream decode, TTFT of a long prompt, throughput vs concurrent streams, and
    the multi-turn chat with and without reuse of earlier requests (prefix caching)."""
    result: dict[str, Any] = {}
    warm = await client.stream(prompts.make(short_prompt), 8)
    result["warmup_s"] = round(warm.done - warm.sent, 3)

    s = await client.stream(prompts.make(short_prompt), decode_tokens)
    result["decode"] = {
        "tokens_per_s": round(s.decode_rate, 3),
        "tokens": s.completion_tokens,
        "chunks": s.chunks,
        "first_chunk_tokens": s.first_tokens,
        "usage_reported": s.usage_reported,
        "first_to_last_s": round(s.last - s.first, 3),
        "ttft_s": round(s.ttft, 3),
        "prompt_tokens": short_prompt,
    }

    t = await client.stream(prompts.make(prompt_tokens), 1)
    result["ttft"] = {
        "seconds": round(t.ttft, 3),
        "prompt_tokens": prompt_tokens,
        "server_prompt_tokens": t.prompt_tokens,
    }

    result["throughput"] = {}
    for c in concurrency:
        batch = [prompts.make(short_prompt) for _ in range(c)]
        streams = await asyncio.gather(*(client.stream(p, stream_tokens) for p in batch))
        wall = max(x.done for x in streams) - min(x.sent for x in streams)
        tokens = sum(x.completion_tokens for x in streams)
        result["throughput"][str(c)] = {
            "tokens_per_s": round(tokens / wall, 3),
            "tokens": tokens,
            "wall_s": round(wall, 3),
            "ttft_s": {k: round(v, 3) for k, v in _summary([x.ttft for x in streams]).items()},
        }

    if chat_shape and chat_shape.turns:
        # the two conversations in turn order, reversed every other run (`uncached_first`), so that
        # a drift within a run does not fall on one side only
        result["chat"] = {"shape": vars(chat_shape), "uncached_first": uncached_first}
        for reuse in (False, True) if uncached_first else (True, False):
            key = "reuse" if reuse else "no_reuse"
            result["chat"][key] = await chat(client, prompts, chat_shape, reuse=reuse)
    return result
