"""The physical limit of decoding: bytes read per generated token, and the bandwidth ceiling.

A single decoded token multiplies its activation by every weight matrix once, so memory bandwidth
bounds single-stream decode at bandwidth / bytes-per-token. The bytes count every weight of every
layer, the final norm and the output projection; with tied embeddings that projection reads the
whole embedding matrix (the input lookup reads one row of it). All at the precision the server
computes in (a bf16 model served in float32 holds fp32 weights: twice the bytes), plus the KV cache
read by attention over the context.
"""

from __future__ import annotations

from typing import Any

# q8_0: llama.cpp's blocks of 32 int8 weights and one float16 scale (34 bytes per 32 weights)
# q4_k_m (and q4_k_m-head4, its output projection in Q4_K too): nominally Q4_K's 144 bytes per 256
# weights (its Q6_K tensors make it more: the ceiling takes the bytes of the file's tensors instead)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "q8_0": 34 / 32, "q4_k_m": 144 / 256}
DTYPE_BYTES["q4_k_m-head4"] = DTYPE_BYTES["q4_k_m"]


def parameter_counts(config: dict[str, Any]) -> dict[str, int]:
    """Parameters of a Qwen2-style decoder from its config.json."""
    c = config.get("text_config", config)
    h, inter, layers = (
        int(c["hidden_size"]),
        int(c["intermediate_size"]),
        int(c["num_hidden_layers"]),
    )
    heads = int(c["num_attention_heads"])
    kv_heads = int(c.get("num_key_value_heads", heads))
    head_dim = int(c.get("head_dim") or h // heads)
    vocab = int(c["vocab_size"])
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = h * q + q + 2 * (h * kv + kv) + q * h  # q, k, v with biases; o without
    mlp = 3 * h * inter
    per_layer = attention + mlp + 2 * h  # two RMS norms
    embedding = vocab * h
    tied = bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return {
        "layers": layers * per_layer,
        "embedding": embedding,
        "lm_head": 0 if tied else vocab * h,
        "final_norm": h,
        "total": layers * per_layer + embedding + (0 if tied else vocab * h) + h,
        "kv_values_per_token": 2 * layers * kv_heads * head_dim,
        "hidden": h,
    }


def bytes_per_token(
    config: dict[str, Any],
    weight_dtype: str,
    kv_dtype: str,
    context: float,
    stored_weights: float | None = None,
) -> dict[str, float]:
    """Bytes one decoded token reads: weights (lm_head = the embedding when tied) + KV cache.

    A checkpoint whose weights the server keeps as stored (a quantized one: int8 values, their
    scales, the unquantized embedding) reads `stored_weights`, the size of its weight files: a
    tied embedding is stored once and read once, as the output projection; an untied one (left
    unquantized, at `weight_dtype`) is read one row per token, so the rest of it is taken off."""
    p = parameter_counts(config)
    read = p["layers"] + p["final_norm"] + (p["lm_head"] or p["embedding"]) + p["hidden"]
    weights = read * DTYPE_BYTES[weight_dtype]
    if stored_weights:
        unread = (p["embedding"] - p["hidden"]) * DTYPE_BYTES[weight_dtype] if p["lm_head"] else 0
        weights = stored_weights - unread
    kv = context * p["kv_values_per_token"] * DTYPE_BYTES[kv_dtype]
    return {"weights": weights, "kv_cache": kv, "total": weights + kv, "context_tokens": context}


def ceiling(read_gb_s: float, total_bytes: float) -> float:
    """Tokens/s one stream could decode if it only waited for memory."""
    return read_gb_s * 1e9 / total_bytes
