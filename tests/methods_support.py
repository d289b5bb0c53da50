"""Shared pieces of the method tests: a synthetic task and random example pairs for tiny models."""
from __future__ import annotations

import contextlib

import torch

from circuitbench import metrics
from circuitbench.tasks.base import Examples, Splits, Task


class SyntheticTask(Task):
    """Random token pairs scored at the last position: KL over the whole vocabulary as the loss and
    the logit difference between two fixed-per-example tokens as the objective."""

    name = "synthetic"
    description = "random token pairs (tests)"
    metrics = ("kl", "logit_diff")
    sizes = {"train": 16, "validation": 8, "test": 8}

    def __init__(self, ablation="interchange"):
        self.ablation = ablation

    def build(self, tokenizer, seed=0, n_train=None, sizes=None) -> Splits:
        s = self.resolve_sizes(n_train, sizes)
        return Splits(make_examples(s["train"], seed=seed), make_examples(s["validation"], seed=seed + 1),
                      make_examples(s["test"], seed=seed + 2))

    def loss(self, circuit_logits, full_logits, batch):
        return metrics.kl_divergence(full_logits, circuit_logits)

    def objective(self, logits, batch):
        # the logit difference in the logits' own dtype (float64 models give exact finite differences)
        answer = batch.targets["answer"].to(logits.device)[:, None, None].expand(-1, logits.shape[1], 1)
        wrong = batch.targets["wrong"].to(logits.device)[:, None, None].expand(-1, logits.shape[1], 1)
        return (logits.gather(-1, answer) - logits.gather(-1, wrong)).squeeze(-1).mean(1)

    def score(self, circuit_logits, full_logits, batch):
        return {"kl": self.loss(circuit_logits, full_logits, batch), "logit_diff": self.objective(circuit_logits, batch)}


def make_examples(n, seq=6, vocab=500, seed=0) -> Examples:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, seq), generator=g)
    corrupted = torch.randint(0, vocab, (n, seq), generator=g)
    answer = torch.randint(0, vocab, (n,), generator=g)
    wrong = torch.randint(0, vocab, (n,), generator=g)
    return Examples(clean=clean, corrupted=corrupted, attention_mask=torch.ones_like(clean),
                    positions=torch.full((n, 1), seq - 1), targets={"answer": answer, "wrong": wrong},
                    texts=[{"clean": "", "corrupted": "", "answer": ""} for _ in range(n)])


def small_gpt2(n_layer=4, n_head=8, n_embd=64, vocab=512, seed=0, dtype=torch.float32, edit=None):
    """A seeded random GPT-2 of a chosen shape, loaded like `circuitbench.load_model` loads one;
    ``edit(hf_model)`` may change its weights first."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuitbench.adapters.gpt2 import GPT2Adapter
    from circuitbench.models import LoadedModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                                        n_positions=64, initializer_range=0.1, bos_token_id=0, eos_token_id=0))
    finally:
        torch.random.set_rng_state(state)
    hf.to(dtype)
    hf.eval()
    hf.requires_grad_(False)
    if edit is not None:
        with torch.no_grad():
            edit(hf)
    return LoadedModel(spec=f"test:gpt2-{n_layer}x{n_head}", adapter=GPT2Adapter(hf), hf_model=hf, dtype=dtype)


PLANTED_HEADS = {0: 1, 1: 2}  # layer -> the one head whose output is kept
PLANTED_EDGES = sorted([
    "input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>",
    "input->a1.h2<q>", "input->a1.h2<k>", "input->a1.h2<v>",
    "a0.h1->a1.h2<q>", "a0.h1->a1.h2<k>", "a0.h1->a1.h2<v>",
    "input->logits", "a0.h1->logits", "a1.h2->logits",
])


def planted_gpt2(dtype=torch.float64):
    """A 2-layer, 4-head GPT-2 where only a0.h1 and a1.h2 write anything that differs between
    inputs: every other head's output projection and both MLPs' output weights are zero (their
    outputs are constants, equal on clean and corrupted runs). Exactly `PLANTED_EDGES` can matter."""

    def edit(hf):
        H = hf.config.n_head
        dh = hf.config.n_embd // H
        for layer, blk in enumerate(hf.transformer.h):
            w = blk.attn.c_proj.weight  # Conv1D [in = H * dh, out]: head h owns rows h*dh:(h+1)*dh
            for h in range(H):
                if PLANTED_HEADS.get(layer) != h:
                    w[h * dh:(h + 1) * dh] = 0
            blk.mlp.c_proj.weight.zero_()

    return small_gpt2(2, 4, 64, 512, dtype=dtype, edit=edit)


@contextlib.contextmanager
def temporary_methods(*classes):
    """Register test-only methods, and take them out again: the registry is process-wide, and
    other test modules check that it holds exactly the built-in methods."""
    from circuitbench import method

    for cls in classes:
        method.register_method(cls)
    try:
        yield
    finally:
        for cls in classes:
            method._REGISTRY.pop(cls.name, None)


def assert_same_circuits(a, b):
    """Two discover results have the same sparsities and, at each, the same edges and scores bit for
    bit (NaN where the other is NaN)."""
    assert list(a.circuits) == list(b.circuits)
    for s in a.circuits:
        ca, cb = a.circuits[s], b.circuits[s]
        assert torch.equal(ca.edges, cb.edges)
        assert torch.equal(ca.scores.isnan(), cb.scores.isnan())
        assert torch.equal(ca.scores.nan_to_num(0), cb.scores.nan_to_num(0))
