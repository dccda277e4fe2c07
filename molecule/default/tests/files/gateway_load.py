"""Bounded load through the gateway, for the rollout test (test_rollout.py); standard library only.

WORKERS threads send chat completions to https://HOST/v1/chat/completions, streamed and not in turn,
each asking for exactly TOKENS tokens and waiting PAUSE seconds after each answer, until the stop
file appears or MAX_SECONDS pass; then it writes a JSON summary: requests, failures (HTTP errors,
broken connections), truncated answers (a stream without its final `data: [DONE]`, or fewer tokens
than asked). The key: VLLM_API_KEY.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import threading
import time
from pathlib import Path


def _one(args: argparse.Namespace, ctx: ssl.SSLContext, stream: bool) -> str:
    """One request; '' when it was answered completely, else what went wrong."""
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": "Tell me something about large language models."}],
        "max_tokens": args.tokens,
        "min_tokens": args.tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    conn = http.client.HTTPSConnection(args.host, context=ctx, timeout=300)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {
                "Authorization": f"Bearer {os.environ['VLLM_API_KEY']}",
                "Content-Type": "application/json",
            },
        )
        resp = conn.getresponse()
        text = resp.read().decode()
    except Exception as error:  # whatever breaks a request counts as a failure, never as silence
        return f"failed: {type(error).__name__}: {error}"
    finally:
        conn.close()
    if resp.status != 200:
        return f"failed: HTTP {resp.status}: {text[:300]}"
    if stream:
        events = [
            line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")
        ]
        if not events or events[-1] != "[DONE]":
            return "truncated: stream without [DONE]"
        usage = [json.loads(e).get("usage") for e in events[:-1]]
        tokens = max((u or {}).get("completion_tokens", 0) for u in usage)
    else:
        tokens = json.loads(text)["usage"]["completion_tokens"]
    return "" if tokens == args.tokens else f"truncated: {tokens} of {args.tokens} tokens"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--model", default="Qwen/Qwen2.5-1.5B-Instruct")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--max-seconds", type=float, default=1200)
    parser.add_argument("--stop", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ctx = ssl.create_default_context(cafile=args.ca)
    deadline = time.monotonic() + args.max_seconds
    lock = threading.Lock()
    summary: dict = {"requests": 0, "streamed": 0, "failed": 0, "truncated": 0, "problems": []}

    def work(index: int) -> None:
        stream = bool(index % 2)
        while not args.stop.exists() and time.monotonic() < deadline:
            try:
                problem = _one(args, ctx, stream)
            except Exception as error:  # an unreadable answer: a failure, never a lost thread
                problem = f"failed: {type(error).__name__}: {error}"
            with lock:
                summary["requests"] += 1
                summary["streamed"] += stream
                if problem:
                    summary["failed" if problem.startswith("failed") else "truncated"] += 1
                    summary["problems"] = (summary["problems"] + [problem])[:20]
            stream = not stream
            time.sleep(args.pause)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(args.workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary["stopped_by"] = "stop file" if args.stop.exists() else "time limit"
    args.out.write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
