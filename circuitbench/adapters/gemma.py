"""Gemma 2 and Gemma 3 adapter (model types ``gemma2``, ``gemma3_text``, and the text part of the
multimodal ``gemma3``), over the model's own modules.

What differs from Llama, all taken from the loaded model (transformers' modeling_gemma2.py and
modeling_gemma3.py):

* the ``input`` writer is the scaled embedding, ``embed_tokens(ids)``: transformers' module
  multiplies by sqrt(d_model) rounded to the weights' dtype;
* RMSNorms scale by ``1 + weight``; every layer has four: ``input_layernorm`` before attention,
  ``post_attention_layernorm`` on the attention output, ``pre_feedforward_layernorm`` and
  ``post_feedforward_layernorm`` around the GeGLU MLP (``mlp`` returns the post-normed MLP output);
* attention scale ``query_pre_attn_scalar ** -0.5``; Gemma 3 RMS-normalises each query and key head
  (``q_norm``, ``k_norm``) before the rotary embedding, and takes its rotary tables per layer type
  (a local base for sliding layers) from the model's own ``rotary_emb``;
* sliding-window layers (``layer_types``) get a windowed causal mask;
* Gemma 2 soft-caps the attention logits (``cap * tanh(scores / cap)``), so its attention is
  computed explicitly instead of with SDPA; transformers' Gemma 3 attention never applies
  ``attn_logit_softcapping`` and neither does this adapter; ``final_logit_softcapping`` caps the
  logits in `unembed` (as Gemma2ForCausalLM and Gemma3ForCausalLM do; the multimodal
  Gemma3ForConditionalGeneration does not, and neither does its adapter).

**The post-attention norm and what a head's writer output means.** ``post_attention_layernorm``
acts on the *sum* of the layer's head outputs, so a head's contribution to the residual is not a
function of that head alone. The adapter decomposes it exactly: it computes every head's output
after W_O (each head from its own q reader and its group's k and v readers), sums them, takes the
RMS of the sum, and returns head h's output times ``(1 + w) / rms(sum)``. These per-head outputs
add up to exactly the layer's post-normed attention output, so all masks 1 reproduce the model;
head h's writer output is *its share of the normed sum, with the norm scale taken from that
forward's own sum* (the clean run's scale in the clean run, the corrupted run's in the corrupted
run, the masked pass's in the masked pass). Consequences:

- the adapter cannot compute a subset of a layer's heads (``head_subsets = False``): a head's
  share depends on every other head's output through the scale. The engine then computes every
  head in every pass (no pruned pass, no ACDC head subsets or batched trials);
- a head's inputs reach the residual also through the other heads' shares (via the scale), so an
  edge into a head none of whose outputs is kept can still change the logits, and a head with no
  kept input still differs from its corrupted share when the scale does. The graph's *effective
  edges* (`Graph.effective_edges`) treat heads as independent and are approximate for Gemma; the
  engine's masked pass itself is exact.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Adapter, heads_out, project, sdpa
from .llama import _rotate_half, sliding_windows

FAMILIES = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def softcapped_attention(q, k, v, ctx_mask, scale: float, cap: float) -> torch.Tensor:
    """Causal attention over ``[H, B, S, dh]`` tensors (k/v may have fewer, grouped heads) with
    Gemma 2's logit soft-capping ``cap * tanh(scale * q.k / cap)``, computed explicitly (SDPA has no
    soft-capping); softmax in float32 as transformers' eager attention. ``ctx_mask``: boolean
    ``[B or 1, 1, S, S]`` or None (plain causal)."""
    if k.shape[0] != q.shape[0]:
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    S = q.shape[-2]
    if ctx_mask is None:
        keep = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    else:
        keep = ctx_mask.transpose(0, 1)  # [1, B, S, S] broadcasts over heads
    scores = scores.masked_fill(~keep, float("-inf"))
    # in float32 as transformers computes it (at least: float64 stays float64)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(weights, v)


def post_norm_shares(norm, out: torch.Tensor) -> torch.Tensor:
    """Each head's share of ``norm`` (a Gemma RMSNorm) applied to the sum of ``out`` ``[H, ..., d]``:
    ``out[h] * (1 + w) / rms(sum)``, computed in at least float32 as the norm computes. The shares
    add up to ``norm(out.sum(0))`` (up to rounding)."""
    dt = torch.promote_types(out.dtype, torch.float32)
    total = out.sum(0).to(dt)
    scale = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight.to(dt))
    return (out.to(dt) * scale).to(out.dtype)


class GemmaAdapter(Adapter):
    head_subsets = False  # the post-attention norm couples the heads of a layer (module docstring)

    def __init__(self, hf_model):
        core = hf_model.model
        cfg = hf_model.config
        self.multimodal = hasattr(core, "language_model")  # Gemma3ForConditionalGeneration: its text part
        if self.multimodal:
            core, cfg = core.language_model, cfg.get_text_config()
        if cfg.model_type not in FAMILIES:
            raise UserError(f"the Gemma adapter does not support model type {cfg.model_type!r}")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UserError("Gemma with use_bidirectional_attention (an embedding model) is not causal; "
                            "circuitbench supports causal language models only")
        self.family = FAMILIES[cfg.model_type]
        self.hf, self.core, self.cfg = hf_model, core, cfg
        self.shape_from_config(cfg)
        H, G, dh, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        self.windows = sliding_windows(cfg, self.n_layers)
        self.layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * self.n_layers)
        # transformers passes the logit soft-cap to the attention of Gemma 2 only
        self.softcap = getattr(cfg, "attn_logit_softcapping", None) if self.family == "gemma2" else None
        self.final_softcap = None if self.multimodal else getattr(cfg, "final_logit_softcapping", None)
        self.qk_norm = self.family == "gemma3"
        self.groups, self.W_o, self.scales = [], [], []
        for l, layer in enumerate(core.layers):
            at = layer.self_attn
            if at.o_proj.bias is not None:
                raise UserError("Gemma with an o_proj bias (attention_bias=True) is not supported: the bias "
                                "sits under the post-attention norm, so it is no constant of the residual")

            def wb(lin, n):
                b = None if lin.bias is None else lin.bias.detach().view(n, dh)
                return lin.weight.detach().view(n, dh, d), b

            self.groups.append([wb(at.q_proj, H), wb(at.k_proj, G), wb(at.v_proj, G)])
            self.W_o.append(at.o_proj.weight.detach().T.view(H, dh, d))  # [H, dh, d] (in, out)
            self.scales.append(at.scaling)

    def embed(self, ids):
        return self.core.embed_tokens(ids)

    def context(self, seq_len, attention_mask, device):
        pos = torch.arange(seq_len, device=device)[None]
        probe = self.core.embed_tokens.weight[:1]
        if self.family == "gemma3":  # rotary tables per layer type (sliding layers: the local base)
            tables = {t: self.core.rotary_emb(probe, pos, t) for t in set(self.layer_types)}
            rope = [tables[t] for t in self.layer_types]
        else:
            rope = [self.core.rotary_emb(probe, pos)] * self.n_layers
        mask = self.attention_bias(seq_len, attention_mask, True, device, None)
        if any(w is not None and w < seq_len for w in self.windows):  # then one mask per layer
            by_window = {w: self.window_bias(seq_len, attention_mask, w, device) for w in set(self.windows)}
            mask = [mask if w is None else by_window[w] for w in self.windows]
        return rope, mask

    def attention(self, layer, x, ctx, per_head=True, heads=None):
        if heads is not None:
            raise ValueError("the Gemma adapter computes every head of a layer (head_subsets is False)")
        rope, mask = ctx
        cos, sin = rope[layer]
        if isinstance(mask, list):
            mask = mask[layer]
        lay = self.core.layers[layer]
        at = lay.self_attn
        q, k, v = project(lay.input_layernorm(x), self.groups[layer])
        if self.qk_norm:
            q, k = at.q_norm(q), at.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.softcap:
            o = softcapped_attention(q, k, v, mask, self.scales[layer], self.softcap)
        else:
            o = sdpa(q, k, v, mask, True, self.scales[layer])
        if not per_head:  # the plain forward: the norm of the summed heads, as the model computes it
            return lay.post_attention_layernorm(heads_out(o, self.W_o[layer], False))
        return post_norm_shares(lay.post_attention_layernorm, heads_out(o, self.W_o[layer], True))

    def mlp(self, layer, x):
        lay = self.core.layers[layer]
        return lay.post_feedforward_layernorm(lay.mlp(lay.pre_feedforward_layernorm(x)))

    def unembed(self, x):
        logits = self.hf.lm_head(self.core.norm(x))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
