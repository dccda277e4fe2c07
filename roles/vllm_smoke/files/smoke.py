"""The hand recipe's two client checks against one server, with timings (playbooks/smoke.yml).

1. Offline: vllm.LLM(model).generate(prompt) with the recipe's sampling settings.
2. Online: the `openai` client's chat completion against the running server, passing vLLM's
   repetition_penalty through extra_body. The API key is read from VLLM_API_KEY (the service's
   environment file), never from the command line.

Prints one line, RESULT_PREFIX and a JSON object: {"offline": {...}, "openai": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

# The result's line. Other lines share stdout: with vLLM's default multiprocessing the offline
# check's engine processes log there, also after the result, while they shut down.
RESULT_PREFIX = "vllm-smoke-result: "


def offline(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model in this process and generate once, as the recipe's first script did."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=args.model_path,
        max_model_len=args.max_model_len,
        enforce_eager=True,
        dtype=args.dtype,
    )
    loaded = time.perf_counter()
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens,
    )
    outputs = llm.generate([args.prompt], params)
    done = time.perf_counter()
    completion = outputs[0].outputs[0]
    tokens = len(completion.token_ids)
    return {
        "load_seconds": round(loaded - start, 2),
        "generate_seconds": round(done - loaded, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / (done - loaded), 2) if done > loaded else None,
        "text": completion.text,
    }


def online(args: argparse.Namespace) -> dict[str, Any]:
    """Ask the running server through the openai client, as the recipe's second script did."""
    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("VLLM_API_KEY") or "EMPTY")
    start = time.perf_counter()
    response = client.chat.completions.create(
        model=args.served_model_name,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": args.prompt},
        ],
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        extra_body={"repetition_penalty": args.repetition_penalty},
    )
    seconds = time.perf_counter() - start
    tokens = response.usage.completion_tokens if response.usage else 0
    return {
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        "text": response.choices[0].message.content,
    }


def main() -> None:
    """Run the checks the arguments ask for and print the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument(
        "--prompt", default="Give me a short introduction to large language models."
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--repetition-penalty", type=float, default=1.05)
    parser.add_argument("--skip-offline", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {"openai": online(args)}
    if not args.skip_offline:
        result["offline"] = offline(args)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
