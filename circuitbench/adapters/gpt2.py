"""GPT-2 family adapter (LayerNorm, learned positions, fused QKV Conv1D, GELU MLP, tied unembedding)."""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from .base import Adapter, heads_out, project, sdpa


class GPT2Adapter(Adapter):
    family = "gpt2"
    head_subsets = True

    def __init__(self, hf_model):
        cfg = hf_model.config
        if getattr(cfg, "add_cross_attention", False):
            raise UserError("GPT-2 models with cross-attention are not supported")
        self.hf = hf_model
        self.tr = hf_model.transformer
        self.n_layers, self.n_heads, self.d_model = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.n_kv_heads = self.n_heads
        self.head_dim = self.d_model // self.n_heads
        self.scales = []
        self.W_qkv, self.b_qkv, self.W_o = [], [], []
        H, dh, d = self.n_heads, self.head_dim, self.d_model
        for l, blk in enumerate(self.tr.h):
            # Conv1D computes x @ W + b with W [in, out]; rows of W.T are q heads, k heads, v heads,
            # exactly the order of this layer's readers.
            self.W_qkv.append(blk.attn.c_attn.weight.detach().T.contiguous().view(3 * H, dh, d))
            self.b_qkv.append(blk.attn.c_attn.bias.detach().view(3 * H, dh))
            self.W_o.append(blk.attn.c_proj.weight.detach().view(H, dh, d))
            scale = 1.0 / math.sqrt(dh) if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= l + 1
            self.scales.append(scale)

    def embed(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.tr.wte(ids) + self.tr.wpe(pos)[None]

    def context(self, seq_len, attention_mask, device):
        return self.attention_bias(seq_len, attention_mask, True, device, None)

    def attention(self, layer, x, ctx, per_head=True, heads=None):
        blk = self.tr.h[layer]
        W, b, W_o = self.W_qkv[layer], self.b_qkv[layer], self.W_o[layer]
        if heads is not None:  # no grouping: each head has its own key and value rows
            rows = torch.cat([heads, heads + self.n_heads, heads + 2 * self.n_heads])
            W, b, W_o = W[rows], b[rows], W_o[heads]
        (qkv,) = project(blk.ln_1(x), [(W, b)])
        q, k, v = qkv.split(qkv.shape[0] // 3)
        o = sdpa(q, k, v, ctx, True, self.scales[layer])
        return heads_out(o, W_o, per_head)

    def attn_out_bias(self, layer):
        return self.tr.h[layer].attn.c_proj.bias.detach()

    def mlp(self, layer, x):
        blk = self.tr.h[layer]
        return blk.mlp(blk.ln_2(x))

    def unembed(self, x):
        return self.hf.lm_head(self.tr.ln_f(x))
