"""Helpers of the serving benchmark (benchmarks/serving.py): artifacts, server configurations,
process control with memory sampling, the streaming client, and the report."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_CACHE = REPO / ".cache" / "bench"
RESULTS = REPO / "benchmarks" / "results"
SERVED_MODEL_NAME = "Qwen/Qwen2.5-1.5B-Instruct"
