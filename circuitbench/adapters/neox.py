"""GPT-NeoX family adapter (Pythia; LayerNorm, fused per-head QKV, partial rotary embeddings,
GELU MLP, parallel or sequential residual, an untied unembedding).

What a GPT-NeoX layer computes (transformers' ``GPTNeoXLayer``), and what this adapter re-runs from
the model's own modules per reader:

* attention: ``input_layernorm``, then ``attention.query_key_value``, one linear map whose output,
  viewed as ``[..., heads, 3 * head_dim]``, holds each head's query, key and value one after the
  other; rotary embeddings on the first ``rotary_ndims`` dimensions of each query and key
  (``partial_rotary_factor``, Pythia's ``rotary_pct`` 0.25; the cos/sin tables come from the model's
  own ``rotary_emb``, the other dimensions pass unchanged), causal attention scaled by
  ``head_dim ** -0.5``, then ``attention.dense`` split per head; its bias is the output bias that
  rides along (``attn_out_bias``); without ``attention_bias`` there are no biases;
* MLP: ``post_attention_layernorm`` then ``mlp`` (``dense_h_to_4h``, activation, ``dense_4h_to_h``);
* with ``use_parallel_residual`` (Pythia's default) the layer computes
  ``x + attn(ln1(x)) + mlp(ln2(x))``: the MLP reads the residual before the layer, not the
  layer's heads (``parallel = True``, `Graph.parallel`); without it the layer is sequential, GPT-2's
  ``h = x + attn(ln1(x)); h + mlp(ln2(h))``;
* the unembedding: ``final_layer_norm`` then the output embedding (``lm_head``; ``embed_out`` in
  older transformers releases).

The q/k/v weights are views of ``query_key_value``'s weight (no copies), so a large model is not
held twice; dropout is inactive (the model is in eval mode).
"""
from __future__ import annotations

import torch

from .base import Adapter, heads_out, project, sdpa


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _partial_rotary(t, cos, sin):
    """Rotary embedding of the first ``cos.shape[-1]`` dimensions of ``t`` [..., S, head_dim]."""
    n = cos.shape[-1]
    if n == t.shape[-1]:
        return t * cos + _rotate_half(t) * sin
    rot, rest = t[..., :n], t[..., n:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class NeoXAdapter(Adapter):
    family = "neox"
    head_subsets = True

    def __init__(self, hf_model):
        cfg = hf_model.config
        self.hf = hf_model
        self.core = hf_model.gpt_neox
        self.head = hf_model.get_output_embeddings()
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = self.n_heads
        self.d_model = cfg.hidden_size
        self.parallel = bool(cfg.use_parallel_residual)
        H, d = self.n_heads, self.d_model
        dh = self.head_dim = d // H
        self.W_qkv, self.b_qkv, self.W_o, self.scales = [], [], [], []
        for layer in self.core.layers:
            at = layer.attention
            # y = x @ W.T + b with W [3d, d]; its rows are head 0's q, k, v, then head 1's, ...
            self.W_qkv.append(at.query_key_value.weight.detach().view(H, 3, dh, d))
            b = at.query_key_value.bias
            self.b_qkv.append(None if b is None else b.detach().view(H, 3, dh))
            # dense: y = o @ W.T with W [d, H*dh]; W.T viewed per head is [H, dh, d] (in, out)
            self.W_o.append(at.dense.weight.detach().T.view(H, dh, d))
            self.scales.append(getattr(at, "scaling", dh ** -0.5))

    def embed(self, ids):
        return self.core.embed_in(ids)

    def context(self, seq_len, attention_mask, device):
        pos = torch.arange(seq_len, device=device)[None]
        probe = self.core.embed_in.weight[:1]
        cos, sin = self.core.rotary_emb(probe, pos)  # [1, S, rotary_ndims] each
        return cos, sin, self.attention_bias(seq_len, attention_mask, True, device, None)

    def _qkv(self, x, W, b):
        """q, k, v ``[n, B, S, dh]`` of the ``n`` heads of ``W`` [n, 3, dh, d] (``b`` [n, 3, dh] or None)
        from normed reader inputs ``x``: ``[3n, B, S, d]`` (query rows, key rows, value rows) or
        ``[1, B, S, d]`` (shared: one product for every head)."""
        n, _, dh, d = W.shape
        if x.shape[0] == 1:
            _, B, S, _ = x.shape
            y = x[0].reshape(B * S, d) @ W.reshape(n * 3 * dh, d).T
            if b is not None:
                y = y + b.reshape(-1)
            return y.view(B, S, n, 3, dh).permute(3, 2, 0, 1, 4).unbind(0)
        groups = [(W[:, i], None if b is None else b[:, i]) for i in range(3)]
        return project(x, groups)

    def attention(self, layer, x, ctx, per_head=True, heads=None):
        cos, sin, mask = ctx
        W, b, W_o = self.W_qkv[layer], self.b_qkv[layer], self.W_o[layer]
        if heads is not None:  # no grouping: each head has its own key and value rows
            W, W_o = W[heads], W_o[heads]
            b = None if b is None else b[heads]
        x = self.core.layers[layer].input_layernorm(x)
        q, k, v = self._qkv(x, W, b)
        q, k = _partial_rotary(q, cos, sin), _partial_rotary(k, cos, sin)
        o = sdpa(q, k, v, mask, True, self.scales[layer])
        return heads_out(o, W_o, per_head)

    def attn_out_bias(self, layer):
        b = self.core.layers[layer].attention.dense.bias
        return None if b is None else b.detach()

    def mlp(self, layer, x):
        lay = self.core.layers[layer]
        return lay.mlp(lay.post_attention_layernorm(x))

    def unembed(self, x):
        return self.head(self.core.final_layer_norm(x))
