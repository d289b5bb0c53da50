"""The random baseline: a uniformly random edge ranking, the floor every method must clear."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitbench.method import CircuitMethod, CostMeter, MethodResult, register_method, seeded_generator


@dataclass
class RandomConfig:
    per_task: dict = field(default_factory=dict)


@register_method
class RandomBaseline(CircuitMethod):
    name = "random"
    description = "Uniformly random edge ranking (seeded): the floor every method must clear"
    Config = RandomConfig
    presets = {"paper": {}, "quick": {}, "smoke": {}}
    produces = "scores"

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        return "a seeded random ranking (no passes)"

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        g = engine.graph
        meter = CostMeter(engine.device)
        with meter.phase("score"):
            scores = torch.rand(g.n_writers, g.n_readers, generator=seeded_generator(seed))
            scores = scores.masked_fill(~g.valid, 0.0)  # only edges of the graph are ranked
        return MethodResult(scores=scores, cost=meter.finish(), info={"seed": int(seed)})
