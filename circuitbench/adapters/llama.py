"""Llama family adapter (RMSNorm, rotary embeddings, grouped-query attention, SiLU-gated MLP).

Covers Llama, CodeLlama, Mistral-style and SmolLM2 checkpoints, and (`qwen2`) Qwen2/Qwen2.5.
Projection weights and biases (Qwen2's q/k/v biases, Llama's optional ``attention_bias``) are
used as views of the model's own parameters (no copies), so a 13B model is not held twice.
Sliding-window layers (Mistral's ``sliding_window`` on every layer; ``layer_types`` entries
"sliding_attention" elsewhere, e.g. Qwen2 with ``use_sliding_window``) get a windowed causal mask.
"""
from __future__ import annotations

import torch

from .base import Adapter, heads_out, project, sdpa


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _pick(wb, index):
    W, b = wb
    return W[index], None if b is None else b[index]


def llama_attention(x, groups, W_o, cos, sin, mask, scale, per_head, kv_of_head=None):
    """Attention of one Llama layer on normed reader inputs ``x`` [R, B, S, d] (or [1, B, S, d]):
    ``groups`` = [(W_q, b_q), (W_k, b_k), (W_v, b_v)] per head in (out, in) layout, ``W_o``
    [H, dh, d]; rotary embedding, (grouped) attention, per-head output projection."""
    q, k, v = project(x, groups)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    o = sdpa(q, k, v, mask, True, scale, kv_of_head)
    return heads_out(o, W_o, per_head)


def sliding_windows(cfg, n_layers: int) -> list[int | None]:
    """Each layer's sliding attention window (None: full causal attention), as transformers
    builds the masks: Mistral windows every layer when ``sliding_window`` is set; other families
    window the layers that ``layer_types`` marks "sliding_attention"."""
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return [None] * n_layers
    types = getattr(cfg, "layer_types", None)
    if cfg.model_type == "mistral" or types is None:
        return [window] * n_layers
    return [window if t == "sliding_attention" else None for t in types]


class LlamaAdapter(Adapter):
    family = "llama"
    head_subsets = True

    def __init__(self, hf_model):
        cfg = hf_model.config
        self.hf = hf_model
        self.core = hf_model.model
        self.shape_from_config(cfg)
        H, G, dh, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        self.windows = sliding_windows(cfg, self.n_layers)
        self.groups, self.W_o, self.scales = [], [], []
        for layer in self.core.layers:
            at = layer.self_attn

            def wb(lin, n):
                b = None if lin.bias is None else lin.bias.detach().view(n, dh)
                return lin.weight.detach().view(n, dh, d), b

            self.groups.append([wb(at.q_proj, H), wb(at.k_proj, G), wb(at.v_proj, G)])
            # o_proj: y = o @ W.T with W [d, H*dh]; W.T viewed per head is [H, dh, d] (in, out)
            self.W_o.append(at.o_proj.weight.detach().T.view(H, dh, d))
            self.scales.append(getattr(at, "scaling", dh ** -0.5))

    def embed(self, ids):
        return self.core.embed_tokens(ids)

    def context(self, seq_len, attention_mask, device):
        pos = torch.arange(seq_len, device=device)[None]
        probe = self.core.embed_tokens.weight[:1]
        cos, sin = self.core.rotary_emb(probe, pos)  # [1, S, dh] each
        mask = self.attention_bias(seq_len, attention_mask, True, device, None)
        if any(w is not None and w < seq_len for w in self.windows):  # then one mask per layer
            by_window = {w: self.window_bias(seq_len, attention_mask, w, device) for w in set(self.windows)}
            mask = [mask if w is None else by_window[w] for w in self.windows]
        return cos, sin, mask

    def attention(self, layer, x, ctx, per_head=True, heads=None):
        cos, sin, mask = ctx
        if isinstance(mask, list):
            mask = mask[layer]
        groups, W_o, kv_of_head = self.groups[layer], self.W_o[layer], None
        if heads is not None:
            kv, kv_of_head = self.kv_groups(heads)
            groups = [_pick(groups[0], heads), _pick(groups[1], kv), _pick(groups[2], kv)]
            W_o = W_o[heads]
        x = self.core.layers[layer].input_layernorm(x)
        return llama_attention(x, groups, W_o, cos, sin, mask, self.scales[layer], per_head, kv_of_head)

    def attn_out_bias(self, layer):
        b = self.core.layers[layer].self_attn.o_proj.bias
        return None if b is None else b.detach()

    def mlp(self, layer, x):
        lay = self.core.layers[layer]
        return lay.mlp(lay.post_attention_layernorm(x))

    def unembed(self, x):
        return self.hf.lm_head(self.core.norm(x))
