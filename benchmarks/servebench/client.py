"""The measurements, through the OpenAI-compatible /v1/completions with stream=true (`openai`).

Prompts are lists of token ids (the completions API takes them), so a "512-token prompt" is exactly
512 tokens for every server, whatever each tokenizer does with text; every request gets a prompt of
its own, so no server answers from a prefix cache. Sampling is greedy (temperature 0, no repetition
penalty) and `ignore_eos` makes every request generate exactly max_tokens: the counts the servers
report (usage, stream_options.include_usage) are checked against max_tokens.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
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

    async def close(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def stream(
        self, prompt: list[int], max_tokens: int, headers: dict[str, str] | None = None
    ) -> Stream:
        """One streamed completion (with more request `headers`); checks the token counts."""
        sent = time.perf_counter()
        response = await self.openai.completions.create(
            model=SERVED_MODEL_NAME,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options=self.stream_options,  # type: ignore[arg-type]
            extra_body=self.extra,
            extra_headers=headers,
        )
        marks: list[tuple[float, int]] = []  # (arrival, tokens generated so far) per chunk
        usage = None
        async for chunk in response:
            now = time.perf_counter()
            if chunk.choices:
                # A chunk can carry several tokens (a slow client, text held back until it is
                # whole UTF-8): count by what the server reports, else one token per chunk.
                count = chunk.usage.completion_tokens if chunk.usage is not None else None
                timings = (chunk.model_extra or {}).get("timings") or {}
                count = count or timings.get("predicted_n")
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
        )


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


async def measure(
    client: Client,
    prompts: Prompts,
    decode_tokens: int,
    prompt_tokens: int,
    stream_tokens: int,
    concurrency: list[int],
    short_prompt: int,
) -> dict[str, Any]:
    """One run: single-stream decode, TTFT of a long prompt, throughput vs concurrent streams."""
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
    return result
