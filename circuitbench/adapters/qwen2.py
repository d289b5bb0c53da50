"""Qwen2 / Qwen2.5 family adapter.

A Qwen2 decoder layer is a Llama layer (RMSNorm, rotary embeddings, grouped-query attention,
SiLU-gated MLP, the same module names) whose q, k and v projections carry biases and whose o_proj
has none; optional sliding-window layers (``use_sliding_window``: the layers from
``max_window_layers`` on) are windowed in the attention mask. `LlamaAdapter` already computes
exactly that from the model's own modules (the biases ride with each head's projection rows, so
every q/k/v reader gets its own head's bias), so this adapter only names the family.
"""
from __future__ import annotations

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
