"""Batch preparation for methods (public API): a training split as batches prepared for the engine.

A `BatchPlan` splits a split into a fixed, seeded partition of batches and prepares each one for the
engine: the corrupted cache (one corrupted pass), the full model's logits at the scored positions
(one plain pass) and, for ACDC, the full model's writer stack (`MaskedModel.begin`). Methods that loop over the data many
times keep what fits in ``cache_mib``: the full model's logits first (small: the scored positions
only), then the corrupted caches and writer stacks (large: every token of every writer); what does
not fit is recomputed on every use. Also the small helpers every method shares: `valid_float`,
`check_sparsities`, `progress_bar`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from circuitbench.engine import CorruptedCache, MaskedModel, PassState
from circuitbench.errors import UserError
from circuitbench.method import CostMeter
from circuitbench.tasks.base import Examples


@dataclass
class PreparedBatch:
    """One batch ready for the engine."""

    batch: Examples  # on the engine's device
    corrupted: CorruptedCache
    reference: torch.Tensor | None  # the full model's logits [B, P, vocab] at batch.positions
    state: PassState | None  # `MaskedModel.begin` of the full model: its writer stack (ACDC), else None

    @property
    def size(self) -> int:
        return len(self.batch)


class BatchPlan:
    """A seeded partition of ``examples`` into batches, prepared for ``engine`` on demand.

    ``reference``: keep the full model's logits (objectives comparing with the full model);
    ``stack``: prepare each batch for `MaskedModel.retry` (`PreparedBatch.state`: the full
    model's writer stack).
    """

    def __init__(self, engine: MaskedModel, task, examples: Examples, batch_size: int, meter: CostMeter,
                 cache_mib: float, seed: int = 0, reference: bool = True, stack: bool = False):
        if len(examples) == 0:
            raise UserError("the training split is empty: a method needs at least one example")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.engine, self.task, self.meter = engine, task, meter
        self.ablation = getattr(task, "ablation", "interchange")
        self.want_reference, self.want_stack = reference, stack
        self.examples = examples
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(int(seed)))
        self.parts = [order[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        self.n_examples = len(examples)
        self.cache_mib = float(cache_mib)
        self.keep_reference = self.reference_mib() <= cache_mib
        self.keep_corrupted = self.keep_reference and self.reference_mib() + self.estimate_mib() <= cache_mib
        self._references: dict[int, torch.Tensor] = {}
        self._cache: dict[int, PreparedBatch] = {}

    def __len__(self) -> int:
        return len(self.parts)

    def reference_mib(self) -> float:
        """Memory the full model's logits of the whole split would hold (MiB)."""
        if not self.want_reference:
            return 0.0
        vocab = self.engine.adapter.unembed(torch.zeros(1, self.engine.adapter.d_model, device=self.engine.device,
                                                        dtype=self.engine.dtype)).shape[-1]
        elem = torch.finfo(self.engine.dtype).bits // 8
        return self.n_examples * self.examples.positions.shape[1] * vocab * elem / 2**20

    def estimate_mib(self) -> float:
        """Memory the corrupted caches (and writer stacks) of the whole split would hold (MiB)."""
        g, L = self.engine.graph, self.engine.graph.n_layers
        rows = (2 * L + 1) if self.ablation == "interchange" else 0
        if self.ablation == "interchange":
            rows += g.n_writers
        if self.want_stack:
            rows += g.n_writers
        return self.rows_mib(rows)

    def rows_mib(self, rows: int) -> float:
        """Memory of ``rows`` rows of [tokens * d_model] for every batch of the split (MiB)."""
        return sum(self._part_rows_mib(rows))

    def batch_rows_mib(self, rows: int) -> float:
        """Memory of ``rows`` rows of [tokens * d_model] for the largest batch of the split (MiB)."""
        return max(self._part_rows_mib(rows))

    def _part_rows_mib(self, rows: int) -> list[float]:
        d = self.engine.adapter.d_model
        elem = torch.finfo(self.engine.dtype).bits // 8
        widths = self.examples.attention_mask.sum(1)
        widths = torch.maximum(widths, self.examples.positions.max(1).values + 1)
        return [len(part) * int(widths[part].max()) * d * rows * elem / 2**20 for part in self.parts]

    def get(self, index: int) -> PreparedBatch:
        """Batch ``index`` of the partition, prepared (from the cache when the plan keeps it)."""
        if index in self._cache:
            return self._cache[index]
        prepared = self._prepare(self.examples.select(self.parts[index]).to(self.engine.device), index)
        if self.keep_corrupted:
            self._cache[index] = prepared
        return prepared

    def epoch(self, generator: torch.Generator | None = None):
        """Every batch once, in a shuffled order when a generator is given."""
        order = range(len(self)) if generator is None else torch.randperm(len(self), generator=generator).tolist()
        for i in order:
            yield self.get(i)

    @torch.no_grad()
    def _prepare(self, batch: Examples, index: int) -> PreparedBatch:
        eng = self.engine
        corrupted = eng.corrupted_cache(batch.corrupted, batch.attention_mask, ablation=self.ablation)
        if self.ablation == "interchange":
            self.meter.forward()
        reference = state = None
        if self.want_reference:
            reference = self._references.get(index)
            if reference is None:
                reference = eng.reference(batch.clean, batch.attention_mask, positions=batch.positions)
                self.meter.forward()
                if self.keep_reference:
                    self._references[index] = reference
        if self.want_stack:
            state = eng.begin(batch.clean, attention_mask=batch.attention_mask, positions=batch.positions,
                              ablation=self.ablation, corrupted=corrupted)  # fills the stack
            self.meter.forward()
        return PreparedBatch(batch, corrupted, reference, state)


def valid_float(graph, device, dtype=torch.float32) -> torch.Tensor:
    """``graph.valid`` as a float [W, R] tensor on ``device``."""
    return graph.valid.to(device=device, dtype=dtype)


def check_sparsities(sparsities) -> list[float]:
    out = []
    for s in sparsities:
        s = float(s)
        if not (0.0 <= s <= 1.0) or math.isnan(s):
            raise UserError(f"sparsity must lie in [0, 1], got {s}")
        out.append(s)
    return out


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar with time left (disabled when ``enabled`` is false), starting at ``initial`` (a
    resumed search)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, initial=initial,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
