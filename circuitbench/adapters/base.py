"""The adapter contract: how the engine re-runs one model family's own weights per reader.

An adapter never forks a model class. It exposes the model's computation as a handful of pure
functions over tensors, so the engine can feed every reader its own input:

* ``embed(ids)`` -> ``[B, S, d]``: the ``input`` writer (token + position embeddings).
* ``context(seq_len, attention_mask)`` -> whatever ``attention`` needs that is shared by all layers
  of one forward (rotary tables, the attention mask). Built once per forward.
* ``attention(layer, x, ctx, per_head=True)``: ``x`` is ``[R, B, S, d]`` with the rows ordered like the layer's
  readers (``n_heads`` query rows, then ``kv_heads`` key rows, then ``kv_heads`` value rows), or
  ``[1, B, S, d]`` when every reader sees the same residual (plain forward). Applies the layer's
  own norm, projections, rotary embedding and attention, and returns each head's output after
  W_O **without** the output bias: ``[n_heads, B, S, d]`` (``per_head=False``: their sum ``[B, S, d]``,
  the fast path of a plain forward).
  ``heads`` (optional, a sorted LongTensor of head indices): compute those heads only; ``x`` then
  holds the query rows of ``heads``, then the key rows and the value rows of their key/value
  groups (`Adapter.kv_groups`), and the result is ``[len(heads), B, S, d]``. The engine uses it to
  skip heads whose output no kept edge reads (``head_subsets = True`` declares support).
* ``attn_out_bias(layer)`` -> ``[d]`` or None: the output bias, a constant that rides along in the
  residual stream (never ablated).
* ``mlp(layer, x)``: ``[B, S, d]`` -> ``[B, S, d]``, norm included. An adapter with ``parallel = True``
  (GPT-NeoX's parallel residual) declares that the MLP of a layer reads the residual before the
  layer, as its attention does; the engine then feeds it that (`Graph.parallel`).
* ``unembed(x)``: ``[..., d]`` -> ``[..., vocab]``, final norm included.

Models without an MLP in some layer still have the writer/reader (its output is zero); the graph
shape is uniform.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..graph import Graph


class Adapter(ABC):
    family: str = "base"
    causal: bool = True
    head_subsets: bool = False  # attention(..., heads=...) computes a subset of the heads

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    has_mlp: bool = True
    parallel: bool = False  # attention and MLP of a layer read the same residual (`Graph.parallel`)

    @property
    def graph(self) -> Graph:
        return Graph(self.n_layers, self.n_heads, self.n_kv_heads, self.has_mlp, self.parallel)

    # ---- the computation, per family ---------------------------------------------------------
    @abstractmethod
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ...

    def context(self, seq_len: int, attention_mask: torch.Tensor | None, device) -> Any:
        return None

    @abstractmethod
    def attention(self, layer: int, x: torch.Tensor, ctx: Any, per_head: bool = True,
                  heads: torch.Tensor | None = None) -> torch.Tensor:
        ...

    def attn_out_bias(self, layer: int) -> torch.Tensor | None:
        return None

    @abstractmethod
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        ...

    # ---- shared helpers ------------------------------------------------------------------------
    def shape_from_config(self, cfg) -> None:
        """Layers, heads, key/value heads, d_model and head_dim from a Llama-style Hugging Face
        config (``num_key_value_heads`` and ``head_dim`` optional)."""
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_model = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads

    def kv_groups(self, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sorted key/value groups that ``heads`` use, each head's position in that list)."""
        group = heads // (self.n_heads // self.n_kv_heads)
        groups, position = torch.unique(group, sorted=True, return_inverse=True)
        return groups, position

    @staticmethod
    def attention_bias(seq_len: int, attention_mask: torch.Tensor | None, causal: bool, device, dtype):
        """Boolean mask [B or 1, 1, S, S] for SDPA, or None when plain causal attention suffices.

        Right padding needs no mask under causal attention: pad keys sit after every real query.
        """
        if attention_mask is None:
            return None
        am = attention_mask.to(device=device, dtype=torch.bool)
        if causal:
            lengths = am.sum(-1)
            right_padded = bool((am == (torch.arange(am.shape[-1], device=device) < lengths[:, None])).all())
            if right_padded:
                return None
        keys = am[:, None, None, :]
        if causal:
            keys = keys & torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        # a query row with no visible key (left padding) would give NaN; let it see itself
        keys = keys | torch.eye(seq_len, dtype=torch.bool, device=device)
        return keys

    @staticmethod
    def window_bias(seq_len: int, attention_mask: torch.Tensor | None, window: int | None, device):
        """`attention_bias` of a causal sliding-window layer: query i sees keys j with
        i - window < j <= i (transformers' convention), padding keys excluded. A window that
        covers the whole sequence (or None) is plain causal attention."""
        if window is None or window >= seq_len:
            return Adapter.attention_bias(seq_len, attention_mask, True, device, None)
        ones = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
        keys = (ones.tril() & ~ones.tril(-window))[None, None]
        if attention_mask is not None:
            keys = keys & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        return keys | torch.eye(seq_len, dtype=torch.bool, device=device)


def project(x: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    """Per-reader projections.

    ``x``: ``[R, B, S, d]`` (one row per reader, rows in the order of ``groups``) or ``[1, B, S, d]``
    (shared). Each group is ``(W [n, dh, d], b [n, dh] or None)`` in (out, in) layout. Returns one
    ``[n, B, S, dh]`` per group.
    """
    _, B, S, d = x.shape
    shared = x.shape[0] == 1
    # split (not slicing) keeps the backward a single concatenation instead of zero-filled copies
    if shared or len(groups) == 1:
        parts = [x] * len(groups)
    else:
        parts = x.split([W.shape[0] for W, _ in groups])
    out = []
    for xs, (W, b) in zip(parts, groups):
        n, dh, _ = W.shape
        if shared:  # one GEMM for all heads of the group
            y = (xs[0].reshape(B * S, d) @ W.reshape(n * dh, d).T).view(B, S, n, dh).permute(2, 0, 1, 3)
        else:
            y = torch.bmm(xs.reshape(n, B * S, d), W.transpose(1, 2)).view(n, B, S, dh)
        if b is not None:
            y = y + b[:, None, None, :]
        out.append(y)
    return out


def heads_out(o: torch.Tensor, W_o: torch.Tensor, per_head: bool) -> torch.Tensor:
    """``o`` [H, B, S, dh] attention outputs, ``W_o`` [H, dh, d] (in, out) -> [H, B, S, d] or summed [B, S, d]."""
    H, B, S, dh = o.shape
    if per_head:
        return torch.bmm(o.reshape(H, B * S, dh), W_o).view(H, B, S, -1)
    return (o.permute(1, 2, 0, 3).reshape(B * S, H * dh) @ W_o.reshape(H * dh, -1)).view(B, S, -1)


def sdpa(q, k, v, ctx_mask, causal: bool, scale: float, kv_of_head: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over ``[H, B, S, dh]`` tensors (heads lead, so no transposes); k/v may have fewer
    (grouped) heads: consecutive heads share a group, or ``kv_of_head`` gives each query head's
    k/v row. ``ctx_mask``: boolean ``[B, 1, S, S]`` or None."""
    if kv_of_head is not None:
        k, v = k[kv_of_head], v[kv_of_head]
    elif k.shape[0] != q.shape[0]:
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
    mask = None if ctx_mask is None else ctx_mask.transpose(0, 1)  # [1, B, S, S] broadcasts over heads
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale
    )
