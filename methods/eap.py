"""Edge Attribution Patching (Syed et al. 2023) and EAP with integrated gradients (Hanna et al. 2024).

EAP scores an edge w -> r by the first-order estimate of how the task metric changes when the edge
is corrupted: ``(y~_w - y_w) . d metric / d input_r`` on the clean run. In the masked engine the
reader's input is ``corrupted_resid + sum_w z[w, r] (y_w - y~_w)``, so that estimate is exactly
``-d metric / d z[w, r]`` at z = 1: one forward and one backward per batch give every edge's
score. Scores are summed over the training examples and ranked by absolute value.

EAP-IG averages the same gradient over ``steps`` points on the straight line from the corrupted
run (every mask 0) to the clean run (every mask 1): integrated gradients in mask space, whose
scores add up to ``metric(corrupted) - metric(clean)`` (summed over examples) as the number of
steps grows. The points are the midpoints of ``steps`` equal intervals.

The metric is the task's differentiable objective (logit or probability difference): KL to the
full model has zero gradient at the full model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitbench.errors import UserError
from circuitbench.method import CircuitMethod, CostMeter, MethodResult, register_method

from ._common import BatchPlan, progress_bar, valid_float


@dataclass
class EAPConfig:
    batch_size: int = 32
    per_task: dict = field(default_factory=dict)


@dataclass
class EAPIGConfig:
    steps: int = 5  # points on the line from corrupted to clean
    batch_size: int = 32
    per_task: dict = field(default_factory=dict)


def attribution_scores(engine, task, train, batch_size: int, alphas: list[float], meter: CostMeter,
                       seed: int = 0, progress: bool = True, desc: str = "eap") -> torch.Tensor:
    """``-(1/len(alphas)) sum_alpha d(sum of task.objective)/dz`` at the masks ``alpha * 1``,
    summed over ``train``; [W, R] with zeros outside ``graph.valid``."""
    g = engine.graph
    plan = BatchPlan(engine, task, train, batch_size, meter, cache_mib=0.0, seed=seed, reference=False)
    valid = valid_float(g, engine.device, engine.dtype)
    total = torch.zeros(g.n_writers, g.n_readers, device=engine.device, dtype=torch.float64)
    bar = progress_bar(len(plan) * len(alphas), desc, progress)
    with meter.phase("attribute"):
        for i in range(len(plan)):
            prepared = plan.get(i)
            b = prepared.batch
            for alpha in alphas:
                mask = (valid * alpha).requires_grad_(True)
                logits = engine(b.clean, attention_mask=b.attention_mask, edge_mask=mask,
                                positions=b.positions, ablation=plan.ablation, corrupted=prepared.corrupted)
                objective = task.objective(logits, b).sum()
                (grad,) = torch.autograd.grad(objective, mask)
                total -= grad.double()
                meter.forward()
                meter.backward()
                bar.update(1)
    bar.close()
    return ((total / len(alphas)) * valid.double()).float()


@register_method
class EAP(CircuitMethod):
    name = "eap"
    description = "Edge Attribution Patching: gradient of the task metric w.r.t. every edge mask (one fwd+bwd per batch)"
    Config = EAPConfig
    presets = {"paper": {}, "quick": {}, "smoke": {"batch_size": 8}}
    produces = "scores"

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        cfg = self.config_for(task)
        meter = CostMeter(engine.device)
        scores = attribution_scores(engine, task, train, cfg.batch_size, [1.0], meter, seed, progress, "eap")
        return MethodResult(scores=scores.cpu(), cost=meter.finish(),
                            info={"metric": "objective", "examples": len(train)})


@register_method
class EAPIG(CircuitMethod):
    name = "eap-ig"
    description = "EAP with integrated gradients: edge-mask gradients averaged from the corrupted to the clean run"
    Config = EAPIGConfig
    presets = {"paper": {"steps": 5}, "quick": {"steps": 5}, "smoke": {"steps": 2, "batch_size": 8}}
    produces = "scores"

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        return (f"{config['steps']} points x one forward and backward per batch of {config['batch_size']}; "
                f"{n_train} training examples")

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        cfg = self.config_for(task)
        if cfg.steps < 1:
            raise UserError(f"eap-ig needs steps >= 1, got {cfg.steps}")
        meter = CostMeter(engine.device)
        alphas = [(k + 0.5) / cfg.steps for k in range(cfg.steps)]
        scores = attribution_scores(engine, task, train, cfg.batch_size, alphas, meter, seed, progress, "eap-ig")
        return MethodResult(scores=scores.cpu(), cost=meter.finish(),
                            info={"metric": "objective", "examples": len(train), "alphas": alphas})
