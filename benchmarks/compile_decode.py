"""Decode and prefill speed of one vLLM server, measured with the `openai` client (issue #17).

Runs on the host that serves (benchmarks/compile.py copies it there and runs it with the server's
own Python, which has `openai` as a vLLM dependency). Prints one JSON object:
- decode_tok_s: (tokens - 1) / (time of the last token - time of the first), one stream, greedy,
  `ignore_eos` so every run decodes exactly --tokens tokens; the median of --runs;
- ttft_s: time to the first token of a prompt of --prompt-tokens tokens (a prefill); the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from openai import OpenAI


def stream_once(
    client: OpenAI, model: str, prompt: list[int], tokens: int
) -> tuple[float, float, int]:
    """One streamed completion: (seconds to the first token, decode tok/s, tokens received)."""
    start = time.perf_counter()
    stamps: list[float] = []
    usage = 0
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    # Every chunk that carries a choice, text or not: a random model's token can be part of a
    # character, which the server holds back as empty text until it is complete.
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices:
            stamps.append(time.perf_counter())
    if usage != tokens or len(stamps) < min(tokens, 2):
        got = f"the server reported {usage} ({len(stamps)} chunks)"
        raise SystemExit(f"asked for {tokens} tokens, {got}")
    rate = (usage - 1) / (stamps[-1] - stamps[0]) if usage > 1 else 0.0
    return stamps[0] - start, rate, usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused", timeout=600)
    # Token ids 1000..: the same prompt for every server, no tokenizer round trip to depend on.
    short = list(range(1000, 1016))
    long = [1000 + i % 5000 for i in range(args.prompt_tokens)]
    stream_once(client, args.model, short, 8)  # warm-up
    decode = [stream_once(client, args.model, short, args.tokens)[1] for _ in range(args.runs)]
    # A different first token each run, so no run reuses another's prefix cache.
    ttft = [stream_once(client, args.model, [2000 + run, *long], 1)[0] for run in range(args.runs)]
    print(
        json.dumps(
            {
                "decode_tok_s": round(statistics.median(decode), 3),
                "decode_tok_s_runs": [round(v, 3) for v in decode],
                "ttft_s": round(statistics.median(ttft), 3),
                "ttft_s_runs": [round(v, 3) for v in ttft],
                "tokens": args.tokens,
                "prompt_tokens": args.prompt_tokens + 1,
                "runs": args.runs,
            }
        )
    )


if __name__ == "__main__":
    main()
