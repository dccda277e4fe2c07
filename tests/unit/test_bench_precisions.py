"""Every precision of the serving benchmark has a llama.cpp side whose bytes per token it can count.

serving.py estimates each configuration's duration and its bandwidth ceiling from the dtype the
server computes in; for llama.cpp that is the GGUF type `serving.PRECISIONS` pairs with vLLM's
checkpoint (or the bf16 model's own). A type missing from the limits' table made the benchmark
fail before any server started; this builds each llama.cpp configuration as serving.py does and
counts its bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

import make_tiny_qwen2
import serving
from servebench import artifacts, configs, limits

# the 1.5B preset's shape, as the fixture writes its config.json (tied output projection)
QWEN_1_5B = make_tiny_qwen2.PRESETS["qwen2.5-1.5b-instruct"] | {"tie_word_embeddings": True}


@pytest.mark.parametrize("precision", sorted(serving.PRECISIONS))
def test_llama_cpp_side_of_every_precision_is_counted(precision: str, tmp_path: Path) -> None:
    _, outtype = serving.PRECISIONS[precision]
    gguf_type = outtype or artifacts.GGUF_TYPES["bfloat16"]
    tensor_bytes = 10**9 if gguf_type in artifacts.QUANTIZE_TYPES else None
    config = configs.llamacpp(
        Path("llama-server"),
        Path("m.gguf"),
        gguf_type,
        8000,
        tmp_path,
        {"cpus": []},
        False,
        tensor_bytes,
    )
    counted = limits.bytes_per_token(
        QWEN_1_5B, config.compute_dtype, "float16", 40, config.settings["tensor_bytes"]
    )
    assert counted["weights"] > 0.5e9
