"""Edge Pruning (Bhaskar et al. 2024): learn a hard-concrete mask on every edge and writer node.

An edge w -> r is present with z_edge[w, r] * z_node[w]; both follow the hard-concrete
distribution (`methods.hard_concrete`) with learnable log alpha. The loss is the task's
faithfulness loss (KL(full || circuit) at the scored positions) plus a Lagrangian
lambda1 (t - s) + lambda2 (t - s)^2 on the expected edge sparsity s (of the effective edges,
z_edge * z_node, from P(z > 0)) and, with a node target, the same on the expected node sparsity.
The lambdas are trained by gradient ascent, the log alphas by descent, both with Adam (no weight
decay) at a learning rate that warms up linearly over ``warmup_steps`` and, with ``lr_decay``, then
falls linearly to 0 at the last step (the paper's optimiser schedule). The target t ramps linearly
from 0 to the target over the first ``ramp_steps`` steps.

Schedules: ``"independent"`` trains one run per requested sparsity; ``"path"`` trains one run through
the requested sparsities in increasing order, one *stage* per target: the target moves on from the
previous one over ``stage_ramp_steps`` (the first stage ramps from 0 over ``ramp_steps``), the stage
runs until the stopping rule fires or ``steps`` have passed, its circuit is discretised and emitted,
and the next stage continues from the same masks, multipliers and optimiser state. With ``stop =
"converged"`` the `StoppingRule` may end a run (or stage) early: the target reached (expected edge
density within ``stop_sparsity_tol`` of it) and the mean training KL of the last ``stop_window`` steps
within ``stop_tol`` of the window before. Each circuit's info records how its run or stage ended
(``converged`` / ``max_steps``) and its steps; the log holds the curve (KL, expected and realised
sparsity, targets, multipliers) every ``log_every`` steps.

At the end of a run (or stage) each effective edge has a deterministic mask
hc.deterministic(la_edge) * hc.deterministic(la_node) in [0, 1] and a soft mask
sigmoid(la_edge) * sigmoid(la_node) (`discretise_masks`). ``discretise="deterministic"`` gives the
binarised circuit the density of the mean deterministic mask (round(sum of the masks) edges) and
keeps the edges above the threshold on the deterministic masks that a binary search for that many
edges finds, made exact (saturated ties by soft mask). ``"density"`` keeps as many edges as P(z > 0)
adds up to (the measure training brought to the target) and ``"exact"`` the requested number, both
the ones of largest soft mask. With masks that training has decided (0 or 1) the three agree; with
masks left half-open the deterministic mass is the test-time circuit's. The realised sparsity, the
expected one and the deterministic one are reported in ``MethodResult.info`` (realised also in each
circuit's meta).

Data parallelism: with ``data_parallel`` set (a `circuitbench.distributed.DataParallel`, as
``torchrun -m circuitbench.distributed`` does), every process walks the same seeded sequence of
global batches, draws the same mask samples, and runs the masked pass on its own shard of each
batch; the gradients of the log alphas and lambdas are summed across processes before the optimiser
step, with each shard's KL weighted by its share of the global batch, so every process takes the
step one process would take on the whole batch and the masks stay identical everywhere.
``gradient_checkpointing`` recomputes each layer in the backward pass (`MaskedModel(checkpoint=True)`).

Checkpoints (``checkpoint_every_s``, default 300 s; 0: never; nothing to do with
``gradient_checkpointing``): when the runner hands the method the job's
`circuitbench.checkpoint.Checkpoint` (``self.checkpoint``), training saves its state there before a
step whenever that many seconds have passed since the last save (`_Saver`), and a run of the same
job that finds the state resumes from it: the runs (independent schedule) or stages (path) already
finished as saved, then the run in progress at that step, with its masks, multipliers, both Adam
optimisers and learning-rate schedules, the mask samples' generator, the batch order (`_Cycle`) and
the stopping rule's window as they were (`EdgePruning._train`'s ``resume``), and a warm start's
scores as the first process computed them. Every circuit (edges and scores), each target's info but
its wall time, and the training log are the uninterrupted job's, bit for bit (same device, dtype and
thread count). A state saved under another configuration, state version, graph, task, training set,
seed, target list, warm start, device, dtype or data-parallel world size is ignored with a printed
line. ``info["resumed"]`` says where each resume began, ``info["checkpoint_saves"]`` how many saves
this process made; the progress bar of the resumed stage says ``(resumed at step N)``. Data parallel:
rank 0 saves, and at the start rank 0 reads the checkpoint and sends the state to every rank, which
all resume from it. ``checkpoint_every_s`` is a run setting (`CircuitMethod.run_settings`): not part of
the job id.

Presets: ``paper`` is appendix B of the paper for GPT-2 (batch 32, 3,000 steps, ramp over 2,500,
learning rate 0.8 for masks and lambdas, node targets per task) and, for the Tracr tasks, the
settings of the paper's Tracr scripts (fixed edge and node targets whatever sparsity is requested,
warm-up then linear decay; reverse on batches of 16 without a node term, as its script disables the
node loss), discretised by the deterministic masks; ``quick`` and ``smoke`` shrink steps and batch
only. The decay matters where the target cannot be met (reverse: 1.02): once the ramp passes the
circuit's own sparsity the multipliers grow without bound, and at a constant learning rate a mask
that sat saturated (no KL gradient) for thousands of steps is pushed by Adam at full step size
through the range where the KL could hold it; decaying to 0 ends training while the KL still decides.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from circuitbench.checkpoint import StateSaver, fingerprint, tensor_digest
from circuitbench.circuit import Circuit, edges_for_sparsity
from circuitbench.errors import UserError
from circuitbench.method import (CircuitMethod, CostMeter, MethodResult, get_method, register_method,
                                 seeded_generator)

from circuitbench.batches import BatchPlan, check_sparsities, progress_bar, valid_float
from .hard_concrete import HardConcrete

DISCRETISE = ("density", "deterministic", "exact")
SCHEDULES = ("independent", "path")
STOPS = ("none", "converged")


class StoppingRule:
    """When a run (or a stage of the path) has converged: its target is reached (the expected edge
    density within ``stop_sparsity_tol`` of the target density 1 - t) and the mean training KL of the
    last ``stop_window`` steps differs from the mean of the window before it by less than ``stop_tol``
    of the latter. Never before the target's ramp has ended and two windows have passed since."""

    def __init__(self, cfg, ramp_steps: int):
        self.window, self.tol, self.sparsity_tol = cfg.stop_window, cfg.stop_tol, cfg.stop_sparsity_tol
        self.ramp = ramp_steps
        self.kls: list[float] = []
        self.steps = 0

    def update(self, kl: float, expected_sparsity: float, target: float) -> bool:
        """Record one step; True when the run may stop after it."""
        self.steps += 1
        if self.steps <= self.ramp:
            return False
        self.kls.append(kl)
        n = self.window
        if len(self.kls) < 2 * n:
            return False
        density, want = 1.0 - expected_sparsity, max(1.0 - min(target, 1.0), 0.0)
        if abs(density - want) > self.sparsity_tol * max(want, 1.0 / 1e6):
            return False
        last = sum(self.kls[-n:]) / n
        before = sum(self.kls[-2 * n:-n]) / n
        return abs(last - before) <= self.tol * max(abs(before), 1e-12)

    def window_mean(self) -> float | None:
        n = min(self.window, len(self.kls))
        return sum(self.kls[-n:]) / n if n else None



@dataclass
class EdgePruningConfig:
    steps: int = 3000
    batch_size: int = 32
    ramp_steps: int = 2500  # the target ramps linearly from 0 over these steps
    lr: float = 0.8  # log alphas
    lambda_lr: float = 0.8  # Lagrange multipliers (gradient ascent)
    lambda_beta2: float = 0.999  # the multipliers' Adam second-moment decay (the paper's 0.999 remembers the ramp's large gaps for ~1,000 steps)
    warmup_steps: int = 0  # linear learning-rate warm-up of both optimisers
    lr_decay: bool = False  # after the warm-up, decay both learning rates linearly to 0 at the last step
    edge_target: float | None = None  # train toward this edge sparsity whatever is requested (Tracr)
    node_target: float | None = None  # node sparsity target (never above the edge target); None: no node term
    node_loss: bool = True  # False: no node term whatever node_target says (the paper scripts' --disable_node_loss)
    fix_lambda1: bool = False  # keep the linear multipliers at 0 (the paper's xproportion run)
    init_log_alpha: float = 10.0  # every mask starts on
    init_std: float = 0.01
    log_alpha_bound: float | None = 10.0  # log alphas are clamped to [-bound, bound] after each step
    beta: float = 2.0 / 3.0
    left: float = -0.1
    right: float = 1.1
    eps: float = 1e-6
    discretise: str = "density"  # circuit size: "density" (P(z > 0)), "deterministic" (mean mask) or "exact"
    warm_start: object = None  # None, a [W, R] score tensor, or a registered method's name (e.g. "eap-ig")
    warm_start_scale: float = 3.0  # |log alpha| of the best and worst ranked edges after a warm start
    cache_mib: float = 2048.0  # keep prepared batches (corrupted caches) when they fit in this
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (large models)
    log_every: int = 10
    checkpoint_every_s: float = 300.0  # save the training state this often (the job's checkpoint; 0: never)
    schedule: str = "independent"  # "independent": one run per target; "path": one run through every target
    stage_ramp_steps: int = 50  # the path: steps over which the target moves on from the previous one
    stop: str = "none"  # "none": every run (path: stage) takes `steps`; "converged": the stopping rule may end it
    stop_window: int = 50  # the stopping rule compares the mean training KL of the last two windows of this many steps
    stop_tol: float = 0.05  # ... and stops when they differ by less than this fraction
    stop_sparsity_tol: float = 0.1  # ... and the expected density is within this fraction of the target's
    per_task: dict = field(default_factory=dict)


_PAPER_TASKS = {
    "ioi": {"node_target": 0.72},
    "ioi-t1": {"node_target": 0.72, "lr": 1.0, "lambda_lr": 1.0},
    "gt": {"node_target": 0.68},
    "gp": {"node_target": 0.69},
    # The paper's Tracr scripts: its optimiser schedule warms up linearly and then decays linearly to 0
    # at the last step; reverse trains on batches of 16 with the node loss disabled (--disable_node_loss,
    # so its node target of 0.1 has no effect). The targets are fixed, not a requested size, so the
    # circuit is what the deterministic masks keep.
    "tracr-xproportion": {"edge_target": 0.92, "node_target": 0.4, "lr": 1.0, "lambda_lr": 1e-4, "fix_lambda1": True,
                          "steps": 720, "batch_size": 16, "ramp_steps": 640, "warmup_steps": 96, "lr_decay": True,
                          "discretise": "deterministic"},
    "tracr-reverse": {"edge_target": 1.02, "node_target": None, "lr": 0.03, "lambda_lr": 1e-3,
                      "steps": 6000, "batch_size": 16, "ramp_steps": 5900, "warmup_steps": 1500, "lr_decay": True,
                      "discretise": "deterministic"},
}


def _smoke_tasks() -> dict:
    """The paper's per-task settings with the Tracr runs' step counts shrunk to seconds."""
    out = copy.deepcopy(_PAPER_TASKS)
    for entry in out.values():
        if "steps" in entry:
            entry.update(steps=20, ramp_steps=15, batch_size=4)
            if "warmup_steps" in entry:
                entry["warmup_steps"] = 5
    return out


@register_method
class EdgePruning(CircuitMethod):
    name = "ep"
    description = "Edge Pruning: hard-concrete edge and node masks trained on KL with a Lagrangian sparsity target"
    Config = EdgePruningConfig
    presets = {
        "paper": {"steps": 3000, "batch_size": 32, "ramp_steps": 2500, "per_task": _PAPER_TASKS},
        "quick": {"steps": 400, "batch_size": 16, "ramp_steps": 330,
                  "per_task": _PAPER_TASKS},  # the Tracr runs are already short
        "smoke": {"steps": 20, "batch_size": 4, "ramp_steps": 15,
                  "per_task": _smoke_tasks()},
    }
    produces = "circuits"
    supports_data_parallel = True
    run_settings = ("checkpoint_every_s",)  # not part of the job id: it never changes the result
    # set by circuitbench.distributed: a DataParallel (rank, world size, gradient all-reduce), or None
    data_parallel = None

    @classmethod
    def check_config(cls, config) -> None:
        _check(config)

    @classmethod
    def target_groups(cls, config: dict, sparsities) -> list[tuple[float, ...]]:
        if config.get("schedule") == "path":
            return [tuple(sorted(float(s) for s in sparsities))]  # one run walks the whole grid
        return super().target_groups(config, sparsities)

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        per = "per target" if config.get("schedule") != "path" else "per stage of one path through the targets"
        stop = (f", ended early when converged (KL within {config['stop_tol']:g} over {config['stop_window']} steps)"
                if config.get("stop") == "converged" else "")
        warm = f", warm-started from {config['warm_start']}" if config.get("warm_start") else ""
        return (f"<= {config['steps']} steps of batch {config['batch_size']} {per}{stop}{warm}; "
                f"{n_train} training examples")

    @classmethod
    def planned_passes(cls, config: dict, n_train: int, n_edges, n_sparsities: int) -> tuple[float, float]:
        """Steps (one forward and one backward each): ``steps`` per target, an upper bound when the
        stopping rule may end a run or a stage early."""
        steps = float(config["steps"]) * max(1, n_sparsities)
        return steps, steps

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        cfg = self.config_for(task)
        sparsities = check_sparsities(sparsities)
        if not sparsities:
            raise UserError("edge pruning needs at least one target sparsity")
        meter = CostMeter(engine.device)
        dp = self.data_parallel
        if dp is not None and cfg.batch_size < dp.world_size:
            raise UserError(f"a global batch of {cfg.batch_size} cannot be split over {dp.world_size} processes; "
                            f"use batch_size >= {dp.world_size}")
        result = MethodResult(circuits={}, info={"targets": {}, "warm_start": _warm_name(cfg.warm_start),
                                                 "schedule": cfg.schedule})
        # Tracr presets fix the training target: one run serves every requested sparsity.
        stages: dict[float, list[float]] = {}  # training target -> the requested sparsities it serves
        for s in sparsities:
            stages.setdefault(cfg.edge_target if cfg.edge_target is not None else s, []).append(s)
        if cfg.schedule == "path":
            runs = [sorted(stages.items())]  # one run, targets in increasing order
        else:
            runs = [[item] for item in stages.items()]
        with meter.phase("setup"):
            plan = BatchPlan(engine, task, train, cfg.batch_size, meter, cfg.cache_mib, seed=seed)
            # every process keeps the same global partition and prepares only its shard of each batch;
            # kl_scales[i]: the factor turning the shard's KL sum into its part of batch i's mean
            kl_scales = [1.0 / len(part) for part in plan.parts]
            if dp is not None:
                kl_scales = [dp.weight(part) / len(part) for part in plan.parts]
                plan.parts = [dp.shard(part) for part in plan.parts]
            # the job's saved training state (`_Saver`): the warm start's scores, the finished runs' and
            # stages' circuits, the log so far and the run in progress, which `_train` continues from
            saver = _Saver.open(getattr(self, "checkpoint", None), cfg, self.preset, engine, task, train, seed, meter,
                                runs, dp, result.log)
            state = saver.state if saver is not None else None
            warm = None
            if cfg.warm_start is not None:
                if state is not None:  # the scores the interrupted training started from
                    warm = state["warm"]
                else:
                    warm = self._warm_scores(cfg, engine, task, train, validation, sparsities, seed, meter)
                if saver is not None:
                    saver.warm = warm.detach().cpu().clone()
        first_run = 0
        if state is not None:
            result.log.extend(state["log"])
            for requested, circuit, info in saver.emitted_results(engine.graph):
                result.circuits[requested] = circuit
                result.info["targets"][requested] = info
            first_run = state["run"]
            result.info["resumed"] = saver.resumed
        # engine.checkpoint is gradient checkpointing (`MaskedModel`), unrelated to the job's checkpoint
        checkpoint_before = engine.checkpoint
        engine.checkpoint = cfg.gradient_checkpointing or checkpoint_before
        try:
            for i, run in enumerate(runs):
                if i < first_run:  # trained before the interruption: its circuits are the saved ones
                    continue
                desc = f"ep {i + 1}/{len(runs)}" if len(runs) > 1 else "ep"
                resume = state["training"] if state is not None and i == first_run else None
                for requested, circuit, info in self._train(cfg, engine, task, plan, kl_scales, run, warm, seed,
                                                            meter, progress, desc, result.log, saver=saver,
                                                            run_index=i, resume=resume):
                    result.circuits[requested] = circuit
                    result.info["targets"][requested] = info
        finally:
            engine.checkpoint = checkpoint_before
        result.cost = meter.finish()
        if saver is not None:
            saver.add_saved_cost(result.cost)
            result.info["checkpoint_saves"] = saver.saves
        return result

    # ---- one training run: one stage per target (several on the sparsity path) ------------------------
    def _train(self, cfg, engine, task, plan, kl_scales, stages, warm, seed, meter, progress, desc, log, saver=None,
               run_index=0, resume=None):
        """Train one set of masks through ``stages`` ([(training target, [requested sparsities])], in
        order), emitting (requested sparsity, circuit, info) at the end of each stage. Appends the
        training curve to ``log``.

        ``saver`` (a `_Saver`): before a step, when it is due, the run's state is saved (run ``run_index``,
        `_training_state`); ``resume``: such a state, the run continues from it (the stages before its
        stage were emitted before the interruption and are not emitted again) and ends exactly as the
        uninterrupted run: the masks, multipliers, both optimisers and learning-rate schedules, the mask
        samples' and the batch order's generators, the position in the epoch and the stopping rule's
        KLs are as they were before that step."""
        g = engine.graph
        dev = engine.device
        hc = HardConcrete(cfg.beta, cfg.left, cfg.right, cfg.eps)
        gen = seeded_generator(seed, dev)
        batch_gen = seeded_generator(seed + 1)
        valid = valid_float(g, dev)
        n_edges = g.n_edges
        first = stages[0][0]

        with meter.phase("setup"):
            la_edge = cfg.init_log_alpha + cfg.init_std * torch.randn(
                g.n_writers, g.n_readers, generator=gen, device=dev)
            if warm is not None:
                la_edge = warm_log_alpha(warm.to(dev), g, min(max(first, 0.0), 1.0), cfg.warm_start_scale)
            la_node = cfg.init_log_alpha + cfg.init_std * torch.randn(g.n_writers, generator=gen, device=dev)
            la_edge = torch.nn.Parameter(la_edge.float())
            la_node = torch.nn.Parameter(la_node.float())
            lambdas = torch.nn.Parameter(torch.zeros(4, device=dev))  # edge l1, l2, node l1, l2
            opt = torch.optim.Adam([la_edge, la_node], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            opt_l = torch.optim.Adam([lambdas], lr=cfg.lambda_lr, betas=(0.9, cfg.lambda_beta2), eps=1e-8, weight_decay=0.0,
                                     maximize=True)
            scheds = [torch.optim.lr_scheduler.LambdaLR(o, _lr_factor(cfg)) for o in (opt, opt_l)]
            with torch.no_grad():
                start = 0.0 if warm is None else float(1 - _expected_density(hc, la_edge, la_node, valid, n_edges))

        dp = self.data_parallel
        if dp is not None:
            progress = progress and dp.rank == 0
        batches = _Cycle(plan, batch_gen)
        step = 0  # over the whole run
        first_stage = 0
        if resume is not None:  # the state before the step the save was made at
            with torch.no_grad():
                for param, key in ((la_edge, "la_edge"), (la_node, "la_node"), (lambdas, "lambdas")):
                    param.copy_(resume[key].to(device=dev, dtype=param.dtype))
            opt.load_state_dict(resume["opt"])
            opt_l.load_state_dict(resume["opt_lambda"])
            for sch, saved in zip(scheds, resume["scheds"], strict=True):
                sch.load_state_dict(saved)
            gen.set_state(resume["gen"])
            batches.load_state(resume["batches"])
            start, step, first_stage = float(resume["start"]), int(resume["step"]), int(resume["stage"])
        for k, (target, requested) in enumerate(stages):
            if k < first_stage:  # emitted before the interruption
                continue
            resumed_here = resume is not None and k == first_stage
            first_step = int(resume["stage_step"]) if resumed_here else 0
            node_target = None if cfg.node_target is None or not cfg.node_loss else min(cfg.node_target, target)
            node_start = 0.0 if k == 0 else min(cfg.node_target or 0.0, stages[k - 1][0])
            ramp = cfg.ramp_steps if k == 0 else cfg.stage_ramp_steps
            rule = StoppingRule(cfg, ramp) if cfg.stop == "converged" else None
            if resumed_here and rule is not None:
                rule.kls, rule.steps = [float(v) for v in resume["rule"]["kls"]], int(resume["rule"]["steps"])
            label = f"{desc} t={target:g}" + (f" ({k + 1}/{len(stages)})" if len(stages) > 1 else "")
            if resumed_here:
                label += f" (resumed at step {first_step})"
            bar = progress_bar(cfg.steps, label, progress, initial=first_step)
            t0 = meter.cost.wall_s.get("train", 0.0)
            before = float(resume["stage_train_s"]) if resumed_here else 0.0  # this stage's training before
            stopped = "max_steps"
            with meter.phase("train"):
                t_phase = time.perf_counter()
                if saver is not None:
                    saver.running["train"] = t_phase  # counted in a save's cost
                for stage_step in range(first_step, cfg.steps):
                    if saver is not None and saver.due():
                        saver.save_run(run_index, _training_state(
                            stage=k, stage_step=stage_step, step=step, start=start,
                            stage_train_s=before + time.perf_counter() - t_phase, la_edge=la_edge, la_node=la_node,
                            lambdas=lambdas, opt=opt.state_dict(), opt_lambda=opt_l.state_dict(),
                            scheds=[sch.state_dict() for sch in scheds], gen=gen.get_state(),
                            batches=batches.state(),
                            rule=None if rule is None else {"kls": list(rule.kls), "steps": rule.steps}))
                    frac = min(1.0, stage_step / ramp) if ramp > 0 else 1.0
                    t_edge = start + (target - start) * frac
                    index, prepared = next(batches)
                    b = prepared.batch
                    z_edge = hc.sample(la_edge, gen)
                    z_node = hc.sample(la_node, gen)
                    logits = engine(b.clean, attention_mask=b.attention_mask, edge_mask=z_edge.to(engine.dtype),
                                    node_mask=z_node.to(engine.dtype), positions=b.positions, ablation=plan.ablation,
                                    corrupted=prepared.corrupted)
                    per_example = task.loss(logits, prepared.reference, b).float()
                    if dp is None:
                        kl = per_example.mean()
                    else:  # this shard's part of the global batch mean (a stand-in shard counts zero)
                        kl = per_example.sum() * kl_scales[index]
                    density = _expected_density(hc, la_edge, la_node, valid, n_edges)
                    gap = t_edge - (1 - density)
                    reg = lambdas[0] * gap + lambdas[1] * gap ** 2
                    node_s = 1 - hc.prob_nonzero(la_node).mean()
                    t_node = None
                    if node_target is not None:
                        t_node = node_start + (node_target - node_start) * frac
                        gap_n = t_node - node_s
                        reg = reg + lambdas[2] * gap_n + lambdas[3] * gap_n ** 2
                    if dp is not None:
                        reg = reg / dp.world_size  # the all-reduce below sums world_size copies of it
                    loss = kl + reg
                    opt.zero_grad(set_to_none=True)
                    opt_l.zero_grad(set_to_none=True)
                    loss.backward()
                    if dp is not None:
                        kl, loss = _all_reduce_step(dp, (la_edge, la_node, lambdas), kl.detach(), loss.detach())
                    meter.forward()
                    meter.backward()
                    if cfg.fix_lambda1:
                        lambdas.grad[0::2] = 0.0
                    opt.step()
                    opt_l.step()
                    if cfg.log_alpha_bound is not None:
                        with torch.no_grad():
                            la_edge.clamp_(-cfg.log_alpha_bound, cfg.log_alpha_bound)
                            la_node.clamp_(-cfg.log_alpha_bound, cfg.log_alpha_bound)
                    for sch in scheds:
                        sch.step()
                    # reading the KL back synchronises a GPU: only when the rule or the log needs it
                    logged = stage_step % cfg.log_every == 0 or stage_step == cfg.steps - 1
                    if rule is not None or logged:
                        kl_value, expected = float(kl.detach()), float(1 - density.detach())
                    done = rule is not None and rule.update(kl_value, expected, target)
                    if logged or done:
                        with torch.no_grad():
                            n_keep = edges_for_sparsity(g, requested[0]) if cfg.discretise == "exact" else None
                            kept, _, _ = discretise_masks(hc, la_edge, la_node, valid, cfg.discretise, n_keep)
                        row = {"step": step, "stage": k, "stage_step": stage_step, "loss": float(loss.detach()),
                               "kl": kl_value, "edge_sparsity": expected,
                               "realised_sparsity": 1.0 - float(kept.sum()) / n_edges,
                               "node_sparsity": float(node_s.detach()), "target": float(t_edge),
                               "lambda1": float(lambdas[0].detach()), "lambda2": float(lambdas[1].detach())}
                        if t_node is not None:
                            row.update(node_target=float(t_node), lambda3=float(lambdas[2].detach()),
                                       lambda4=float(lambdas[3].detach()))
                        log.extend({"target_sparsity": s, **row} for s in requested)
                        bar.set_postfix(kl=f"{kl_value:.3g}", s=f"{expected:.3f}", refresh=False)
                    bar.update(1)
                    step += 1
                    if done:
                        stopped = "converged"
                        break
                if saver is not None:
                    saver.running.pop("train", None)
            bar.close()
            stage_s = before + meter.cost.wall_s.get("train", 0.0) - t0
            start = target  # the next stage ramps on from here

            with meter.phase("discretise"), torch.no_grad():
                # one circuit serves every requested sparsity of this target, unless each asks for its
                # exact edge count
                made = {}
                for s in requested:
                    n_keep = edges_for_sparsity(g, s) if cfg.discretise == "exact" else None
                    if n_keep not in made:
                        edges, det, soft = discretise_masks(hc, la_edge, la_node, valid, cfg.discretise, n_keep)
                        circuit = Circuit(g, edges.cpu(), soft.exp().cpu().masked_fill(~g.valid, float("nan")),
                                          meta={"method": "ep", "target_sparsity": float(target),
                                                "requested_sparsity": float(s), "discretise": cfg.discretise,
                                                "schedule": cfg.schedule, "stage": k})
                        circuit.meta["realised_sparsity"] = circuit.sparsity
                        info = {"train_target": float(target), "realised_sparsity": circuit.sparsity,
                                "n_edges": circuit.n_edges,
                                "expected_sparsity": float(1 - _expected_density(hc, la_edge, la_node, valid,
                                                                                 n_edges)),
                                "deterministic_sparsity": float(1 - det.sum() / n_edges),
                                "final_kl": kl_value, "stop": stopped, "steps": stage_step + 1, "run_steps": step,
                                "train_s": stage_s, "stage": k}
                        if rule is not None:
                            info["window_kl"] = rule.window_mean()
                        made[n_keep] = circuit, info
                    if saver is not None:
                        saver.emit(run_index, k, s, *made[n_keep])
                    yield (s, *made[n_keep])

    # ---- warm start ------------------------------------------------------------------------------------
    def _warm_scores(self, cfg, engine, task, train, validation, sparsities, seed, meter):
        ws = cfg.warm_start
        g = engine.graph
        if isinstance(ws, str):
            other = get_method(ws)
            if other.produces != "scores":
                raise UserError(f"edge pruning can warm-start only from a scoring method, not {ws!r}")
            with meter.phase("warm_start"):
                res = other(preset=self.preset).discover(engine, task, train, validation, sparsities, seed,
                                                         progress=False)
            meter.forward(res.cost.forward_passes)
            meter.backward(res.cost.backward_passes)
            return res.scores.float()
        scores = torch.as_tensor(ws).float()
        if tuple(scores.shape) != (g.n_writers, g.n_readers):
            raise UserError(f"warm-start scores must have shape {(g.n_writers, g.n_readers)}, got {tuple(scores.shape)}")
        return scores


def warm_log_alpha(scores: torch.Tensor, graph, target: float, scale: float) -> torch.Tensor:
    """Log alphas from a ranking: an edge's percentile q of |score| among the graph's edges maps to
    ``scale * (q - c) / max(c, 1 - c)`` with c the target sparsity rounded to whole edges, so the
    edges a circuit at the target keeps start on and the rest off, more firmly the farther they rank
    from the cut."""
    valid = graph.valid.to(scores.device)
    flat = scores.abs().masked_fill(~valid, -math.inf).flatten()
    flat = torch.nan_to_num(flat, nan=-math.inf)
    order = torch.argsort(flat, stable=True)  # invalid entries first, then ascending |score|
    n_invalid = int((~valid).sum())
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(flat.numel(), device=flat.device, dtype=flat.dtype)
    q = ((ranks - n_invalid + 0.5) / graph.n_edges).clamp(0.0, 1.0).view_as(scores)
    cut = 1.0 - edges_for_sparsity(graph, target) / graph.n_edges  # exactly the edges of the target start on
    la = scale * (q - cut) / max(cut, 1.0 - cut, 1e-6)
    return la.masked_fill(~valid, -scale)


def _lr_factor(cfg):
    """The learning-rate multiplier at each step: linear warm-up over ``warmup_steps``, then 1, or with
    ``lr_decay`` a linear decay reaching 0 at step ``steps``."""
    warm, total = cfg.warmup_steps, cfg.steps

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_decay:
            return max(0.0, (total - step) / max(1, total - warm))
        return 1.0

    return factor


def _expected_density(hc, la_edge, la_node, valid, n_edges):
    return (hc.prob_nonzero(la_edge) * hc.prob_nonzero(la_node)[:, None] * valid).sum() / n_edges


def discretise_masks(hc, la_edge, la_node, valid, rule="deterministic", n_keep=None):
    """Binarise trained masks: (bool [W, R] circuit, [W, R] deterministic and log soft masks of the
    effective edges).

    An effective edge's deterministic mask is ``hc.deterministic(la_edge) * hc.deterministic(la_node)``
    of its writer, its soft mask sigmoid(la_edge) * sigmoid(la_node). ``rule``:

    * ``"deterministic"``: the circuit has the density of the mean deterministic mask, rounded to whole
      edges (round(sum of the masks) edges), and keeps the edges above the threshold on the
      deterministic masks that a binary search for that many edges finds, made exact: masks
      saturated at the same value are ordered by the soft mask, then by edge order.
    * ``"density"``: as many edges as P(z > 0) of the effective edges adds up to (the expected-sparsity
      penalty's measure), the ones of largest soft mask (ties: deterministic mask).
    * ``"exact"``: ``n_keep`` edges, ordered as for ``"density"``."""
    det = hc.deterministic(la_edge) * hc.deterministic(la_node)[:, None] * valid
    soft = torch.nn.functional.logsigmoid(la_edge) + torch.nn.functional.logsigmoid(la_node)[:, None]
    if rule == "deterministic":
        return _top_edges(det, soft, valid, int(round(float(det.sum())))), det, soft
    if rule == "density":
        n_edges = int(valid.sum())
        n_keep = int(round(float(_expected_density(hc, la_edge, la_node, valid, n_edges)) * n_edges))
    elif rule != "exact" or n_keep is None:
        raise ValueError(f"unknown discretisation {rule!r} (or 'exact' without n_keep)")
    return _top_edges(soft, det, valid, n_keep), det, soft


def _top_edges(value, tie, valid, k):
    """The ``k`` valid edges of largest ``value`` (ties: larger ``tie``, then edge order), as bool [W, R]."""
    flat = value.masked_fill(valid == 0, -math.inf).flatten()
    order = torch.argsort(-tie.flatten(), stable=True)
    order = order[torch.argsort(-flat[order], stable=True)][:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order] = True
    return keep.view_as(value) & (valid > 0)


class _Cycle:
    """(index, prepared batch) forever, each epoch in a seeded shuffled order (`next`). Resumable: its
    `state` (the current epoch's order, the position in it and the generator's state) put back with
    `load_state` continues the same sequence."""

    def __init__(self, plan, generator):
        self.plan, self.generator = plan, generator
        self.order: list[int] = []
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= len(self.order):  # the next epoch's order, drawn when its first batch is needed
            self.order, self.pos = torch.randperm(len(self.plan), generator=self.generator).tolist(), 0
        i = self.order[self.pos]
        self.pos += 1
        return i, self.plan.get(i)

    def state(self) -> dict:
        return {"order": list(self.order), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        self.order, self.pos = [int(i) for i in state["order"]], int(state["pos"])
        self.generator.set_state(state["generator"])


STATE_VERSION = 1  # of the training state Edge Pruning saves in a job's checkpoint (`_Saver`)


def _training_state(**values) -> dict:
    """`EdgePruning._train`'s state before a step (what its ``resume`` takes), every tensor on the CPU."""
    return _to_cpu(values)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class _Saver(StateSaver):
    """Edge Pruning's use of the job's `circuitbench.checkpoint.Checkpoint` (a
    `circuitbench.checkpoint.StateSaver`): the training state saved every ``checkpoint_every_s`` seconds,
    before a step (`EdgePruning._train` asks `due`), and the state found at the start.

    The state: a fingerprint (`circuitbench.checkpoint.fingerprint` of `STATE_VERSION`, the resolved
    configuration without run settings, where a warm start's scores come from (a method's name and
    the preset, or the given scores' digest), the graph's shape, the task, the training examples, the
    seed, the runs and stages with their requested sparsities, the device type and dtype, and the
    data-parallel world size: a checkpoint with another one is ignored with a printed line); the warm
    start's scores (``warm``: a resumed job starts its later runs from them, not from a warm start
    computed again); the circuits and infos the finished runs and stages emitted (``circuits``: edges,
    scores, meta, each once; ``emitted``: run, stage, requested sparsity, circuit index, info); the
    training log so far; the run in progress (``run``) and its state before the next step
    (``training``, `EdgePruning._train`'s ``resume``: stage, step counters, ``start``, the stage's
    training time, log alphas, multipliers, both Adam optimisers' and learning-rate schedules' state
    dicts, the mask samples' generator, the batch order (`_Cycle.state`) and the stopping rule's
    KLs); and the cost spent so far. A resumed job's cost adds what the earlier processes spent up to
    their last save and what this one spends (its setup and batch preparation again);
    work after the last save is lost and not counted. ``info["resumed"]`` says where each resume
    began.

    Data parallel: rank 0 reads the checkpoint and sends the state to every rank (they all resume from
    it, `circuitbench.distributed.DataParallel.broadcast_object`); only rank 0 writes."""

    def __init__(self, checkpoint, every_s, fingerprint, meter, write, log):
        super().__init__(checkpoint, every_s, fingerprint, meter, write=write)
        self.log = log  # the job's training log (appended to as it trains)
        self.circuits: list[dict] = []
        self.emitted: list[dict] = []
        self._index: dict[int, tuple[int, Circuit]] = {}  # id(circuit) -> its place in ``circuits``
        self.state = None
        self.warm = None  # the warm start's scores (CPU), saved so that a resumed job starts from the same

    @classmethod
    def open(cls, checkpoint, cfg, preset, engine, task, train, seed, meter, runs, dp, log):
        """None when there is no checkpoint or ``checkpoint_every_s`` is 0; otherwise the saver, with
        the state of a matching checkpoint loaded (a mismatching one is ignored, said on stderr)."""
        if checkpoint is None or not cfg.checkpoint_every_s > 0:
            return None
        identity = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        identity["warm_start"] = _warm_name(cfg.warm_start)  # scores: by their digest below
        warm = None  # what the warm start's scores come from
        if isinstance(cfg.warm_start, str):
            warm = {"method": cfg.warm_start, "preset": preset}
        elif cfg.warm_start is not None:
            warm = {"scores": tensor_digest(torch.as_tensor(cfg.warm_start).float())}
        fp = fingerprint(STATE_VERSION, identity, EdgePruning.run_settings, engine.graph, task, train, seed,
                         runs=[[[float(t), [float(s) for s in requested]] for t, requested in run] for run in runs],
                         warm=warm, device=engine.device.type,
                         dtype=str(engine.dtype), data_parallel=None if dp is None else dp.world_size)
        saver = cls(checkpoint, cfg.checkpoint_every_s, fp, meter, dp is None or dp.rank == 0, log)
        mismatch = ("saved by another Edge Pruning configuration or state version (not this job's); "
                    "starting afresh")
        if dp is None:
            state = saver.load(mismatch)
        else:  # rank 0 reads the file; every rank resumes from what it read (the others may not see it)
            sent = dp.broadcast_object((fp, checkpoint.load()) if dp.rank == 0 else None)
            if sent[0] != fp:
                raise RuntimeError(f"rank {dp.rank}'s Edge Pruning training differs from rank 0's "
                                   "(their checkpoint fingerprints differ)")
            state = saver.accept(sent[1], mismatch)
        if state is None:
            return saver
        saver.state = state
        saver.circuits, saver.emitted = list(state["circuits"]), list(state["emitted"])
        t = state["training"]
        saver.resume({"run": int(state["run"]), "stage": int(t["stage"]), "step": int(t["step"]),
                      "stage_step": int(t["stage_step"]), "targets_done": len(saver.emitted)},
                     f"resuming Edge Pruning: run {int(state['run']) + 1}/{len(runs)}, stage {int(t['stage']) + 1} "
                     f"at step {int(t['stage_step'])} ({int(t['step'])} steps of the run done, "
                     f"{len(saver.emitted)} target(s) emitted before)")
        return saver

    def emitted_results(self, graph) -> list[tuple[float, Circuit, dict]]:
        """The saved (requested sparsity, circuit, info) in the order they were emitted (a circuit that
        served several requested sparsities is one object again)."""
        built = []
        for payload in self.circuits:
            circuit = Circuit(graph, payload["edges"], payload["scores"], meta=dict(payload["meta"]))
            self._index[id(circuit)] = (len(built), circuit)
            built.append(circuit)
        return [(e["requested"], built[e["circuit"]], dict(e["info"])) for e in self.emitted]

    def emit(self, run: int, stage: int, requested: float, circuit: Circuit, info: dict):
        """Record a circuit a finished stage emitted (saved with every later state)."""
        if id(circuit) not in self._index:
            self._index[id(circuit)] = (len(self.circuits), circuit)
            self.circuits.append({"edges": circuit.edges.clone(),
                                  "scores": None if circuit.scores is None else circuit.scores.clone(),
                                  "meta": dict(circuit.meta)})
        self.emitted.append({"run": run, "stage": stage, "requested": requested,
                             "circuit": self._index[id(circuit)][0], "info": dict(info)})

    def save_run(self, run: int, training: dict):
        """Save the state before a step of run ``run`` (``training``: `_training_state`)."""
        return self.save({"run": run, "training": training, "warm": self.warm, "circuits": self.circuits,
                          "emitted": self.emitted, "log": self.log})


def _all_reduce_step(dp, params, kl, loss):
    """Sum the parameters' gradients, this step's KL and loss over the processes, in one all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [kl.reshape(1).float(), loss.reshape(1).float()])
    dp.all_reduce_sum(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()
    return flat[-2], flat[-1]


def _warm_name(ws):
    if ws is None or isinstance(ws, str):
        return ws
    return "scores"


def _check(cfg):
    every = cfg.checkpoint_every_s
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
        raise UserError(f"ep's checkpoint_every_s must be a number of seconds >= 0 (0: no checkpoints), "
                        f"got {every!r}")
    if cfg.discretise not in DISCRETISE:
        raise UserError(f"discretise must be one of {', '.join(DISCRETISE)}, got {cfg.discretise!r}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"ep.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.stop not in STOPS:
        raise UserError(f"ep.stop must be one of {', '.join(STOPS)}, got {cfg.stop!r}")
    if not cfg.stop_tol > 0 or not cfg.stop_sparsity_tol > 0:
        raise UserError(f"ep.stop_tol and ep.stop_sparsity_tol must be > 0, got {cfg.stop_tol} and "
                        f"{cfg.stop_sparsity_tol}")
    if cfg.stop_window < 1 or cfg.stage_ramp_steps < 0:
        raise UserError("edge pruning needs stop_window >= 1 and stage_ramp_steps >= 0")
    if not 0 <= cfg.lambda_beta2 < 1:
        raise UserError(f"ep.lambda_beta2 must lie in [0, 1), got {cfg.lambda_beta2}")
    if cfg.schedule == "path" and cfg.lr_decay:
        raise UserError("ep.lr_decay decays the learning rate to 0 at the last step of one run; the path has "
                        "no fixed last step: use it with schedule = 'independent'")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.ramp_steps < 0 or cfg.warmup_steps < 0:
        raise UserError("edge pruning needs steps >= 1, batch_size >= 1, ramp_steps >= 0 and warmup_steps >= 0")
    if cfg.node_target is not None and not 0 <= cfg.node_target <= 1.5:
        raise UserError(f"node_target must lie in [0, 1.5], got {cfg.node_target}")
    if cfg.edge_target is not None and not 0 <= cfg.edge_target <= 1.5:
        raise UserError(f"edge_target must lie in [0, 1.5], got {cfg.edge_target}")
    if isinstance(cfg.warm_start, str):  # a method's name: known and scoring, checked before any job runs
        try:
            other = get_method(cfg.warm_start)
        except UserError as err:
            raise UserError(f"ep.warm_start: {err}") from None
        if other.produces != "scores":
            raise UserError(f"edge pruning can warm-start only from a scoring method, not {cfg.warm_start!r}")
