"""The Llama adapter with its frozen weights sharded over a process group by PyTorch FSDP2.

`ShardedLlamaAdapter` is `LlamaAdapter` whose computation runs through FSDP units
(``torch.distributed.fsdp.fully_shard``): per decoder layer, one unit for the attention block
(input norm + q/k/v/o projections) and one for the MLP block (norm + MLP), and one each for the
embeddings and the unembedding (final norm + head). Each unit's weights are gathered just before
it runs (forward, backward, and the recomputation under gradient checkpointing) and freed after.
The weights are frozen, so nothing is reduce-scattered: only the mask gradients cross the network.

The units are sharded over a one-dimensional device mesh of the rank's device type spanning the
default process group: CUDA ranks gather with NCCL, CPU ranks with gloo (FSDP2 shards CPU tensors
over a CPU mesh; checked with torch 2.13). `circuitbench.distributed.shard_model` puts it on a
loaded model; ``tests/test_distributed.py`` checks it against the unsharded adapter.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import UserError
from .llama import LlamaAdapter, llama_attention


class _AttentionBlock(torch.nn.Module):
    """A decoder layer's input norm and attention projections: one FSDP unit."""

    def __init__(self, layer):
        super().__init__()
        self.norm = layer.input_layernorm
        self.attn = layer.self_attn

    def forward(self, x, cos, sin, mask, per_head: bool, n_heads: int, n_kv: int, head_dim: int, scale: float):
        at, d = self.attn, x.shape[-1]

        def wb(lin, n):  # the gathered weights, viewed per head as the unsharded adapter does
            b = None if lin.bias is None else lin.bias.view(n, head_dim)
            return lin.weight.view(n, head_dim, d), b

        groups = [wb(at.q_proj, n_heads), wb(at.k_proj, n_kv), wb(at.v_proj, n_kv)]
        W_o = at.o_proj.weight.T.view(n_heads, head_dim, d)
        return llama_attention(self.norm(x), groups, W_o, cos, sin, mask, scale, per_head)


class _MlpBlock(torch.nn.Module):
    """A decoder layer's post-attention norm and MLP: one FSDP unit."""

    def __init__(self, layer):
        super().__init__()
        self.norm = layer.post_attention_layernorm
        self.mlp = layer.mlp

    def forward(self, x):
        return self.mlp(self.norm(x))


class _Unembed(torch.nn.Module):
    def __init__(self, norm, head):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, x):
        return self.head(self.norm(x))


class ShardedLlamaAdapter(LlamaAdapter):
    """`LlamaAdapter` through FSDP units (see the module docstring); the same contract, except head
    subsets. The embedding (`LlamaAdapter.embed` calls the sharded ``embed_tokens`` unit) and the
    absent attention output bias are the parent's."""

    # No head subsets (`attention` computes every head): the engine's passes without autograd then run
    # every head's and MLP's unit instead of skipping the dead ones, so every rank runs the same FSDP
    # units in the same order, whatever its masks and shard of the batch. Each unit's all-gather is
    # a collective that every rank must join; a unit run by some ranks only would hang the group.
    head_subsets = False

    def __init__(self, hf_model, device):  # not the parent's: its per-head views would pin the whole weights
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # an explicit mesh: FSDP's default one is on the accelerator whenever there is one, even
        # when this process group runs on CPU (gloo)
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
        self.hf = hf_model
        self.core = core = hf_model.model
        self.shape_from_config(hf_model.config)
        self.dtype = next(hf_model.parameters()).dtype
        self.rotary = core.rotary_emb.to(device)
        self.scales = [getattr(layer.self_attn, "scaling", self.head_dim ** -0.5) for layer in core.layers]
        if any(layer.self_attn.o_proj.bias is not None for layer in core.layers):
            raise UserError("--fsdp supports Llama models without an attention output bias")
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        self.attn_blocks = [_AttentionBlock(layer) for layer in core.layers]
        self.mlp_blocks = [_MlpBlock(layer) for layer in core.layers]
        self.unembed_unit = _Unembed(core.norm, hf_model.lm_head)
        for unit in [*self.attn_blocks, *self.mlp_blocks, core.embed_tokens, self.unembed_unit]:
            unit.to(device)
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)

    def context(self, seq_len, attention_mask, device):
        pos = torch.arange(seq_len, device=device)[None]
        probe = torch.zeros(1, self.head_dim, device=device, dtype=self.dtype)  # not a (sharded) weight
        cos, sin = self.rotary(probe, pos)
        return cos, sin, self.attention_bias(seq_len, attention_mask, True, device, None)

    def attention(self, layer, x, ctx, per_head=True, heads=None):
        cos, sin, mask = ctx
        with warnings.catch_warnings():
            # the unit's output is a view (per-head outputs reshaped from one matmul); FSDP warns that an
            # in-place op on it would lose its pre-backward all-gather. The engine only reads writer
            # outputs out of place, and copying the output to silence the warning would cost a layer's
            # per-head outputs again.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            return self.attn_blocks[layer](x, cos, sin, mask, per_head, self.n_heads, self.n_kv_heads,
                                           self.head_dim, self.scales[layer])

    def mlp(self, layer, x):
        return self.mlp_blocks[layer](x)

    def unembed(self, x):
        return self.unembed_unit(x)
