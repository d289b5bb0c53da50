"""The Tracr adapter: compiled RASP programs run through circuitbench's engine.

A Tracr model has no layer norm, non-causal softmax attention (scores scaled by 1/sqrt(key_size),
as in Tracr), ReLU MLPs, and one-hot token and position embeddings. Every layer has an attention
block and an MLP block in the weights; a block the compiler did not use is all zeros, so its
heads and MLP output exactly zero and the graph keeps its uniform shape. Heads per layer are the
most heads of any layer (Tracr pads the others with zeros).

The adapter's "logits" are the compiled model's unembedding: for a numerical program
(xproportion) the one output dimension ``[..., 1]``; for a categorical program (reverse) one score
per output value (Tracr takes their argmax).
"""
from __future__ import annotations

import torch

from ..adapters.base import Adapter, heads_out, project, sdpa
from ..errors import UserError
from .exported import load_arrays, load_metadata


class TracrTokenizer:
    """The token vocabulary of one compiled program.

    ``vocab``: the token strings by id (program tokens, ``BOS`` and ``compiler_pad``), e.g.
    ``['BOS', 'a', 'b', 'c', 'compiler_pad', 'x']``. ``encode(tokens, add_bos=False)`` maps tokens
    (in their RASP type or as strings: ``1`` and ``"1"`` are the same token) one-to-one to ids;
    with ``add_bos`` it prepends ``BOS``. The compiled model expects ``BOS`` first.
    ``decode(ids)`` gives the token strings. ``bos_id``/``pad_id`` are the ids of BOS and PAD
    (right padding is masked by the attention mask). ``output_values`` are the categorical output
    values (``['1', '2', '3']`` for reverse), None for a numerical program;
    ``decode_output(index)`` names an output index.
    """

    def __init__(self, meta: dict):
        self.name = meta["name"]
        self.vocab: list[str] = list(meta["tokens_by_id"])
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.bos_token, self.pad_token = meta["bos"], meta["pad"]
        self.bos_id, self.pad_id = meta["bos_id"], meta["pad_id"]
        self.program_vocab: list[str] = list(meta["vocab"])
        self.output_values: list[str] | None = meta["output_values"]
        self.max_length = meta["max_seq_len"] + 1  # BOS included

    # HF-style aliases, so code that pads with a tokenizer's pad id works unchanged
    @property
    def bos_token_id(self) -> int:
        return self.bos_id

    @property
    def pad_token_id(self) -> int:
        return self.pad_id

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, tokens, add_bos: bool = False) -> list[int]:
        tokens = [str(t) for t in tokens]
        if add_bos:
            tokens = [self.bos_token] + tokens
        unknown = sorted({t for t in tokens if t not in self.ids})
        if unknown:
            raise UserError(f"tokens {unknown} are not in the vocabulary of tracr:{self.name} "
                            f"({', '.join(self.vocab)})")
        if len(tokens) > self.max_length:
            raise UserError(f"tracr:{self.name} takes at most {self.max_length} tokens (BOS included), "
                            f"got {len(tokens)}")
        return [self.ids[t] for t in tokens]

    def decode(self, ids) -> list[str]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.vocab)]
        if bad:
            raise UserError(f"token ids {bad} are outside the vocabulary of tracr:{self.name}")
        return [self.vocab[i] for i in ids]

    def decode_output(self, index: int) -> str:
        if self.output_values is None:
            raise UserError(f"tracr:{self.name} has a numerical output, not categorical values")
        return self.output_values[int(index)]

    def __repr__(self) -> str:
        return f"TracrTokenizer({self.name}, vocab={self.vocab})"


class TracrAdapter(Adapter):
    """The `Adapter` contract on the exported weights of a compiled Tracr program."""

    family = "tracr"
    causal = False
    head_subsets = True

    def __init__(self, name: str, device=None, dtype=None):
        self.meta = load_metadata(name)
        self.name = name
        if self.meta["causal"] or self.meta["layer_norm"]:
            raise UserError(f"tracr:{name} was compiled causal or with layer norm; the adapter runs "
                            "Tracr's default non-causal, norm-free models only")
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
        w = {k: torch.as_tensor(v, device=device, dtype=dtype) for k, v in load_arrays(name).items()}
        self.n_layers, self.n_heads = self.meta["n_layers"], self.meta["n_heads"]
        self.n_kv_heads = self.n_heads
        self.d_model = self.meta["d_model"]
        self.scale = float(self.meta["attn_scale"])
        self.max_length = self.meta["max_seq_len"] + 1
        self.output = self.meta["output"]
        self.token_embed, self.pos_embed = w["token_embed"], w["pos_embed"]
        # project() takes (out, in) layout [heads, key_size, d]
        self.W_Q = w["W_Q"].transpose(-1, -2).contiguous()
        self.W_K = w["W_K"].transpose(-1, -2).contiguous()
        self.W_V = w["W_V"].transpose(-1, -2).contiguous()
        self.W_O = w["W_O"]  # [L, H, K, d] (in, out), as heads_out() takes it
        self.W_in, self.b_in, self.W_out, self.b_out = w["W_in"], w["b_in"], w["W_out"], w["b_out"]
        self.W_U = w["unembed"]
        self.device, self.dtype = device, dtype

    @property
    def residual_labels(self) -> list[str]:
        """Tracr's basis label of each residual dimension (``tokens:a``, ``indices:0``, ``is_x``...)."""
        return list(self.meta["residual_labels"])

    def embed(self, ids):
        S = ids.shape[-1]
        if S > self.max_length:
            raise UserError(f"tracr:{self.name} takes at most {self.max_length} tokens (BOS included), got {S}")
        return self.token_embed[ids] + self.pos_embed[:S]

    def context(self, seq_len, attention_mask, device):
        # right padding is masked out of the keys; without a mask every position sees every other
        return self.attention_bias(seq_len, attention_mask, False, device, None)

    def attention(self, layer, x, ctx, per_head=True, heads=None):
        W_Q, W_K, W_V, W_O = self.W_Q[layer], self.W_K[layer], self.W_V[layer], self.W_O[layer]
        if heads is not None:  # no grouping: each head has its own key and value rows
            W_Q, W_K, W_V, W_O = W_Q[heads], W_K[heads], W_V[heads], W_O[heads]
        q, k, v = project(x, [(W_Q, None), (W_K, None), (W_V, None)])
        o = sdpa(q, k, v, ctx, False, self.scale)
        return heads_out(o, W_O, per_head)

    def mlp(self, layer, x):
        hidden = torch.relu(x @ self.W_in[layer] + self.b_in[layer])
        return hidden @ self.W_out[layer] + self.b_out[layer]

    def unembed(self, x):
        return x @ self.W_U

    def __repr__(self) -> str:
        return (f"TracrAdapter({self.name}: layers={self.n_layers} heads={self.n_heads} d={self.d_model} "
                f"output={self.output})")


def load_tracr(name: str, device=None, dtype=None) -> tuple[TracrAdapter, TracrTokenizer]:
    """The adapter and tokenizer of the compiled Tracr program ``name`` (xproportion or reverse)."""
    adapter = TracrAdapter(name, device=device, dtype=dtype)
    return adapter, TracrTokenizer(adapter.meta)
