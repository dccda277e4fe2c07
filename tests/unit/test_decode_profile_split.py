"""benchmarks/decode_profile.py --torch: how a decode step's time is split from torch's trace.

A made-up trace of vLLM's worker in the shape torch's profiler writes it (user annotations for the
engine's steps, `cpu_op` events nested in time): a prefill, three decode steps and a step without a
request. Every number below follows from the events by hand, so a split that counted a child twice,
took a prefill, a step without a request or the last decode step (no next one to end its token) as
a token, or lost the operators or the time between the steps fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from decode_profile import BETWEEN, IN_STEP, step_split


def step(name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur, "tid": 7}


def op(name: str, ts: float, dur: float, tid: int = 7) -> dict:
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}


DECODE = "execute_context_0(0)_generation_1(1)"


def decode_step(ts: float) -> list[dict]:
    """One step of 10,000 us: a compiled graph of 6,000 us holding two 2,500 us int4 GEMMs (its
    own time 1,000 us: Inductor's kernels), a 1,000 us attention update, an argmax of 500 us
    holding a 100 us copy; 2,500 us of Python between the operators."""
    return [
        step(DECODE, ts, 10_000),
        op("## Call CompiledFxGraph None ##", ts + 100, 6_000),
        op("aten::_weight_int4pack_mm_for_cpu", ts + 200, 2_500),
        op("aten::_weight_int4pack_mm_for_cpu", ts + 3_000, 2_500),
        op("vllm::unified_kv_cache_update", ts + 7_000, 1_000),
        op("aten::argmax", ts + 9_000, 500),
        op("aten::copy_", ts + 9_100, 100),
    ]


def test_a_decode_token_is_split_by_own_time_and_adds_up() -> None:
    events = [
        step("execute_context_1(8)_generation_0(0)", 0, 40_000),  # the prompt: not a token
        op("aten::_weight_int4pack_mm_for_cpu", 1_000, 30_000),
        *decode_step(41_000),  # 2,000 us after the step: the engine core's turn
        op("aten::argmax", 51_500, 300),  # vLLM samples after the step
        *decode_step(53_000),
        *decode_step(65_000),  # the last: no next decode step ends its token
        step("execute_context_0(0)_generation_0(0)", 76_000, 200),  # a step without a request
        op("aten::_weight_int4pack_mm_for_cpu", 66_000, 9_999, tid=8),  # another thread
    ]
    split = step_split(events)
    assert split["tokens"] == 2
    assert split["token_ms_median"] == split["token_ms_mean"] == 12.0
    assert split["split_ms"] == {
        "linear layers (GEMM)": 5.0,
        IN_STEP: 2.5,
        BETWEEN: 1.85,
        "rest of the model": 1.0,
        "attention": 1.0,
        "sampling": 0.55,
        "other": 0.1,
    }
    assert sum(split["split_ms"].values()) == pytest.approx(split["token_ms_mean"])
    assert split["top_ops"][0] == ["aten::_weight_int4pack_mm_for_cpu", 5.0, 2.0]


def test_a_trace_without_two_decode_steps_in_a_row_is_refused() -> None:
    with pytest.raises(SystemExit, match="no two decode steps"):
        step_split([*decode_step(0), step("execute_context_1(8)_generation_0(0)", 20_000, 5)])
    with pytest.raises(SystemExit, match="no decode step"):
        step_split([step("execute_context_1(8)_generation_0(0)", 0, 5)])
