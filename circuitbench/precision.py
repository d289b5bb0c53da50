"""Mixed-precision passes for PAHQ (Wang et al. 2025, "PAHQ: Accelerating Automated Circuit
Discovery through Mixed-Precision Inference Optimization"): one attention head (or MLP) in full
precision, every other head and MLP in a low precision.

`mixed_precision(model, low_dtype)` returns a copy of a loaded model whose adapter is a
`MixedPrecisionAdapter`: it holds the model's own adapter (the model's dtype, the "high"
precision: float32 for the models circuitbench searches on) and a shadow adapter of the same class
on a copy of the same weights in ``low_dtype`` (bfloat16 or float16; float32 gives a shadow equal
to the model, a check of the harness itself). ``MaskedModel(mixed_precision(model))`` is an engine
like any other. What each adapter function computes:

* no focus set (`clear_focus`, the initial state): every function is the model's adapter's, so a
  pass is exactly the model's own (ACDC's full-model pass, the corrupted pass, the reference
  logits, evaluation);
* with a focus (`set_focus(layer, heads, mlp, logits)`: the component whose input an ACDC trial
  changes): ``attention`` computes the focus heads of the focus layer with the model's adapter,
  and every other head (of every layer) with the shadow, on its input rows cast down to
  ``low_dtype``, its output cast back up; ``mlp`` likewise (the focus MLP in full precision, the
  others in ``low_dtype``);
* ``embed``, ``attn_out_bias`` and ``unembed`` are always the model's adapter's: the embedding is
  the ``input`` writer, and the unembedding (final norm included) is the metric's readout, full
  precision in every pass, focused or not.

Only the heads' and MLPs' own computation (norm, projections, attention, MLP) is in low
precision: the engine's writer stack, residual reads and corrupted caches stay in the model's
dtype, so the rows of writers a pass does not recompute keep their exact values. The shadow
costs a copy of the weights in ``low_dtype`` (half the model's size for bfloat16 from float32);
the model's own weights are kept for the focus and the unfocused passes.

float8 (e4m3, the paper's low precision on GPUs) is not implemented: asking for it is a
`UserError`. The adapters compute on weights in their own dtype, and float8 would need weights
stored in float8 and upcast per matmul inside every adapter.

An adapter without head subsets (``head_subsets = False``, e.g. Gemma, whose post-attention norm
couples a layer's heads) computes every head of the layer at once: when the focus holds some but
not all heads of a layer, that layer is computed twice (full and low precision) and each head's
row taken from the right one, so the focus is still honoured, at the cost of one more layer.
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager

import torch

from .adapters.base import Adapter
from .errors import UserError

LOW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FLOAT8 = ("float8", "fp8", "e4m3", "float8_e4m3", "float8_e4m3fn", "float8_e5m2", "e5m2")


def resolve_low_dtype(name) -> torch.dtype:
    """The torch dtype of a PAHQ low precision name (``bfloat16``, ``float16``, ``float32``);
    UserError for anything else, float8 included (not implemented)."""
    key = str(name).lower().replace("torch.", "")
    if key in _FLOAT8:
        raise UserError(f"low precision {name!r}: float8 is not implemented (PAHQ here runs "
                        f"{', '.join(LOW_DTYPES)}); use bfloat16")
    if key not in LOW_DTYPES:
        raise UserError(f"unknown low precision {name!r}; choose one of {', '.join(LOW_DTYPES)}")
    return LOW_DTYPES[key]


def _low_copy(hf, dtype):
    """A copy of the transformers model ``hf`` in ``dtype``, built without a full-precision copy:
    each parameter is converted as it is copied (tied weights stay tied), then the buffers."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in hf.parameters()}
    low = copy.deepcopy(hf, memo)
    low.to(dtype)
    low.eval()
    low.requires_grad_(False)
    return low


def _shadow_adapter(model, dtype) -> Adapter:
    """The model's adapter class on a copy of its weights in ``dtype``."""
    adapter = model.adapter
    hf = getattr(model, "hf_model", None)
    if hf is not None:
        return type(adapter)(_low_copy(hf, dtype))
    from .tracr.adapter import TracrAdapter

    if isinstance(adapter, TracrAdapter):  # exported arrays, no transformers model
        return TracrAdapter(adapter.name, device=adapter.device, dtype=dtype)
    raise UserError(f"mixed precision needs a transformers model or a Tracr program to copy; "
                    f"{type(adapter).__name__} has neither")


class MixedPrecisionAdapter(Adapter):
    """The adapter contract over a model's adapter (``exact``) and a low-precision ``shadow`` of the
    same weights; see the module docstring. The focus says which head(s) or MLP computes in the
    model's dtype; without one, everything does."""

    def __init__(self, exact: Adapter, shadow: Adapter, high_dtype: torch.dtype, low_dtype: torch.dtype):
        self.exact, self.shadow = exact, shadow
        self.high_dtype, self.low_dtype = high_dtype, low_dtype
        self.family = exact.family
        self.causal, self.parallel, self.has_mlp = exact.causal, exact.parallel, exact.has_mlp
        self.head_subsets = bool(getattr(exact, "head_subsets", False))
        self.n_layers, self.n_heads, self.n_kv_heads = exact.n_layers, exact.n_heads, exact.n_kv_heads
        self.d_model = exact.d_model
        self._focus = None  # None: everything exact; else (layer or None, frozenset of heads, mlp)

    def __getattr__(self, name):
        # attributes outside the contract (a Tracr program's ``output``, ``residual_labels``, ...)
        if name.startswith("_") or name in ("exact", "shadow"):
            raise AttributeError(name)
        return getattr(self.exact, name)

    # ---- the focus -------------------------------------------------------------------------------
    def set_focus(self, layer: int | None = None, heads=(), mlp: bool = False, logits: bool = False) -> None:
        """Trial mode: the heads ``heads`` of ``layer`` and (``mlp``) the MLP of ``layer`` compute in
        the model's dtype, every other head and MLP in the low precision. ``logits``: the trial's
        reader is the logits (computed in the model's dtype in every pass): no head or MLP is kept."""
        if logits:
            if layer is not None or len(tuple(heads)) or mlp:
                raise ValueError("a logits focus keeps no head or MLP (layer, heads and mlp must be unset)")
            self._focus = (None, frozenset(), False)
            return
        if layer is None or not 0 <= int(layer) < self.n_layers:
            raise ValueError(f"focus layer must lie in [0, {self.n_layers}), got {layer!r}")
        heads = frozenset(int(h) for h in heads)
        if any(not 0 <= h < self.n_heads for h in heads):
            raise ValueError(f"focus heads must lie in [0, {self.n_heads}), got {sorted(heads)}")
        if mlp and not self.has_mlp:
            raise ValueError("the model has no MLPs to focus on")
        self._focus = (int(layer), heads, bool(mlp))

    def clear_focus(self) -> None:
        """Everything in the model's dtype (the initial state)."""
        self._focus = None

    @property
    def focus(self):
        """(layer or None, frozenset of heads, mlp), or None when no focus is set."""
        return self._focus

    @contextmanager
    def focused(self, layer: int | None = None, heads=(), mlp: bool = False, logits: bool = False):
        """`set_focus` for the duration of a ``with`` block; the previous focus is restored after."""
        before = self._focus
        self.set_focus(layer, heads, mlp, logits)
        try:
            yield self
        finally:
            self._focus = before

    def _exact_heads(self, layer):
        """The heads of ``layer`` computed in the model's dtype: None means all of them."""
        if self._focus is None:
            return None
        f_layer, heads, _ = self._focus
        return heads if f_layer == layer else frozenset()

    # ---- the contract ----------------------------------------------------------------------------
    def embed(self, ids):
        return self.exact.embed(ids)

    def context(self, seq_len, attention_mask, device):
        return (self.exact.context(seq_len, attention_mask, device),
                self.shadow.context(seq_len, attention_mask, device))

    def _low_attention(self, layer, x, ctx, per_head, heads):
        return self.shadow.attention(layer, x.to(self.low_dtype), ctx, per_head, heads).to(self.high_dtype)

    def _rows(self, present: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """Rows of a reader input ordered for ``present`` heads (their query rows, then the key and
        the value rows of their key/value groups) that ``part`` (a sorted subset) reads, in that
        order."""
        groups, _ = self.kv_groups(present)
        n, m = len(present), len(groups)
        q = torch.searchsorted(present, part)
        g = torch.searchsorted(groups, self.kv_groups(part)[0])
        return torch.cat([q, n + g, n + m + g])

    def attention(self, layer, x, ctx, per_head=True, heads=None):
        ctx_exact, ctx_low = ctx
        keep = self._exact_heads(layer)
        if keep is None:
            return self.exact.attention(layer, x, ctx_exact, per_head, heads)
        present = torch.arange(self.n_heads, device=x.device) if heads is None else heads
        exact_mask = torch.tensor([int(h) in keep for h in present.tolist()], device=x.device)
        if bool(exact_mask.all()):
            return self.exact.attention(layer, x, ctx_exact, per_head, heads)
        if not bool(exact_mask.any()):
            return self._low_attention(layer, x, ctx_low, per_head, heads)
        if not self.head_subsets:  # every head at once: compute the layer both ways, take each head's row
            hi = self.exact.attention(layer, x, ctx_exact, True, heads)
            lo = self._low_attention(layer, x, ctx_low, True, heads)
            out = torch.where(exact_mask[:, None, None, None], hi, lo)
            return out if per_head else out.sum(0)
        hi_heads, lo_heads = present[exact_mask], present[~exact_mask]
        shared = x.shape[0] == 1  # every reader sees the same residual
        x_hi = x if shared else x[self._rows(present, hi_heads)]
        x_lo = x if shared else x[self._rows(present, lo_heads)]
        hi = self.exact.attention(layer, x_hi, ctx_exact, True, hi_heads)
        lo = self._low_attention(layer, x_lo, ctx_low, True, lo_heads)
        out = hi.new_empty((len(present),) + tuple(hi.shape[1:]))
        out[exact_mask] = hi
        out[~exact_mask] = lo
        return out if per_head else out.sum(0)

    def attn_out_bias(self, layer):
        return self.exact.attn_out_bias(layer)

    def mlp(self, layer, x):
        if self._focus is None or (self._focus[0] == layer and self._focus[2]):
            return self.exact.mlp(layer, x)
        return self.shadow.mlp(layer, x.to(self.low_dtype)).to(self.high_dtype)

    def unembed(self, x):
        return self.exact.unembed(x)

    def __repr__(self) -> str:
        return (f"MixedPrecisionAdapter({type(self.exact).__name__}, "
                f"{str(self.high_dtype).replace('torch.', '')}/{str(self.low_dtype).replace('torch.', '')})")


def mixed_precision(model, low_dtype="bfloat16"):
    """``model`` (a `LoadedModel`) with a `MixedPrecisionAdapter` over its adapter and a shadow copy
    of its weights in ``low_dtype`` (a name or torch dtype: bfloat16, float16 or float32). The
    result is what ``MaskedModel`` takes; its graph, device, dtype and tokenizer are the model's.
    Set the focus on ``result.adapter``. UserError for an unknown or unsupported ``low_dtype``, or
    one wider than the model's dtype."""
    low = resolve_low_dtype(str(low_dtype).replace("torch.", ""))
    high = model.dtype
    if torch.finfo(low).bits > torch.finfo(high).bits:
        raise UserError(f"low precision {str(low).replace('torch.', '')} is wider than the model's "
                        f"{str(high).replace('torch.', '')}")
    adapter = model.adapter
    if isinstance(adapter, MixedPrecisionAdapter):
        raise UserError("the model already computes in mixed precision")
    mixed = MixedPrecisionAdapter(adapter, _shadow_adapter(model, low), high, low)
    return dataclasses.replace(model, adapter=mixed)


__all__ = ["LOW_DTYPES", "MixedPrecisionAdapter", "mixed_precision", "resolve_low_dtype"]
