"""Run llama.cpp's convert_hf_to_gguf.py on the benchmark's random-weight Qwen2 model.

The converter names the BPE pre-tokenizer by hashing how the tokenizer splits a fixed text; a
tokenizer it has never seen (the benchmark's, trained locally by make_tiny_qwen2.py) is refused
with "BPE pre-tokenizer was not recognized". That tokenizer's pre-tokenizer is Qwen2's own (the
same split regex and byte-level mapping), so when the hash is unknown and the pre-tokenizer is
exactly Qwen2's, this wrapper answers "qwen2", as the converter does for the real Qwen2.5 one.
Everything else is the converter's own code. Runs in the benchmark's vLLM venv (torch, transformers,
numpy, PyYAML, tqdm, as the converter needs).

    python gguf_convert.py LLAMA_CPP_DIR MODEL_DIR --outtype bf16 --outfile OUT.gguf
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen2_pre_tokenizer(model_dir: Path) -> bool:
    """Whether tokenizer.json's pre-tokenizer is Qwen2's: its split regex, then byte-level."""
    pre = json.loads((model_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    steps = pre.get("pretokenizers", [pre]) if pre else []
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    return regexes == [QWEN2_SPLIT] and steps[-1].get("type") == "ByteLevel"


def main() -> None:
    """Patch the pre-tokenizer lookup, then run the converter with the remaining arguments."""
    llama_cpp = Path(sys.argv[1]).resolve()
    model_dir = Path(sys.argv[2]).resolve()
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if qwen2_pre_tokenizer(model_dir):
                print("gguf_convert: unknown tokenizer hash, Qwen2 pre-tokenizer: using 'qwen2'")
                return "qwen2"
            raise

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir), *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
