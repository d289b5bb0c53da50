"""Edge Attribution Patching (Syed et al. 2023) and its integrated-gradients variants (Hanna et al. 2024).

Every method here scores an edge w -> r by ``(y~_w - y_w) . G_r`` summed over the training examples
(every token and feature): the corrupted-minus-clean output of the writer times a gradient of the
task metric (its differentiable objective) with respect to the reader's input. They differ in G_r:

- ``eap``: G_r on the clean run. In the masked engine the reader's input is ``corrupted_resid +
  sum_w z[w, r] (y_w - y~_w)``, so the score is exactly ``-d metric / d z[w, r]`` at z = 1: one
  forward and one backward per batch give every edge's score.
- ``eap-ig`` (EAP-IG-inputs, the EAP-IG of Hanna et al. 2024 and of the MIB benchmark): G_r
  averaged over ``steps`` = m runs of the model on the input embeddings (token plus position
  embeddings, the input to block 0: the ``input`` writer) interpolated from the corrupted to the
  clean prompt, ``e(a) = e~ + a (e - e~)`` at ``a = k / m`` for k = 0, ..., m - 1 (the points of the
  reference implementation, hannamw/EAP-IG ``get_scores_eap_ig``: the corrupted end is included,
  the clean end is not). Every node is recomputed from the interpolated input; y and y~ stay the
  clean and corrupted runs' outputs. Interchange ablation only (the corrupted end is a run of the
  model on the corrupted prompt; the reference library refuses other interventions too).
- ``eap-ig-act`` (EAP-IG-activations as hannamw/EAP-IG's ``get_scores_ig_activations`` computes
  it): for each node n of input, each layer's attention (all its heads at once) and each layer's
  MLP, and each k = 1, ..., m, one run of the clean prompt in which n's output is replaced by the
  constant ``y~_n + (k / m)(y_n - y~_n)`` (its corrupted and clean outputs interpolated; later
  nodes recomputed from it, earlier ones clean). Being a constant, n passes no gradient: its own
  readers get none in that run, and the readers before it only through the paths around n.
  G_r is the mean over all (1 + 2 layers) x m runs, and every run contributes to every edge (not
  only to the edges out of the node it interpolates, which is how the paper writes the estimator:
  the library's version is the one implemented). Zero ablation works (y~ = 0; the attention
  output bias, never ablated, stays in).
- ``eap-mask-ig`` (this harness's earlier ``eap-ig``): mask-space integrated gradients, the EAP
  product with the engine's gradient ``-d metric / dz`` averaged over ``steps`` points where every
  edge mask is ``a`` (midpoints ``(k + 1/2) / m`` of [0, 1]). There every reader reads
  ``corrupted_resid + a sum_w (y_w(a) - y~_w)``, so the product uses ``y_w(a) - y~_w`` rather than
  the clean-minus-corrupted output, and the scores add up to ``metric(corrupted) - metric(clean)``
  as the number of points grows. Not Hanna et al.'s EAP-IG.

How ``eap-ig`` and ``eap-ig-act`` run on the engine (its public API only). An interpolated run is a
masked pass with the corrupted cache (y~, residual r~) in which the edges out of the interpolated
writers (the node's rows) have coefficient ``a`` and every other edge 1: each reader then reads
``r~[s] + sum_{w < s} m_w D_w`` with ``D_w = y_w(a) - y~_w`` and ``m_w = a`` on the node, which is the
run's own input. A no-grad pass from the first read slot after the node (the writers before it are
clean, their stack rows ``y - y~`` given) yields D for the writers after it. The gradient pass then
takes a `CorruptedCache` built for it: writers ``y'_w = y~_w + D_w - (y_w - y~_w)`` (y~ on the node and
before it), so that its own stack is ``y_w - y~_w`` for every writer, and residuals
``r'[s] = r~[s] + sum_{w < s} (m_w D_w - c_w (y_w - y~_w))`` (c_w = the gradient pass's coefficient:
1, or 0 on a cut node; the output-bias constants ride along in r~), so that every reader still
reads the run's input. Its mask gradient is ``(y_w - y~_w) . G_r``, the score with its sign
flipped. For ``eap-ig`` every coefficient is 1 in the gradient pass (the interpolation lives in r';
the engine's uniform-mask reads apply); for ``eap-ig-act`` the node's rows are 0, which is what cuts
its gradient, while their mask gradient is still ``(y_n - y~_n) . G_r``. At ``a = 1`` (and at ``a = 0``
of ``eap-ig``: the corrupted run, whose writers are the cache's) D is known and the no-grad pass is
skipped, and after the last MLP there is nothing to run; ``eap-ig`` at the single point ``a = 1`` is
``eap`` exactly. Per batch: a corrupted and a clean plain pass, then per run one masked forward and
backward plus (mostly) one no-grad masked forward, a partial one for ``eap-ig-act``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitbench.engine import CorruptedCache
from circuitbench.errors import UserError
from circuitbench.method import CircuitMethod, CostMeter, MethodResult, register_method

from circuitbench.batches import BatchPlan, progress_bar, valid_float


@dataclass
class EAPConfig:
    batch_size: int = 32
    per_task: dict = field(default_factory=dict)


@dataclass
class EAPIGConfig:
    steps: int = 5  # points on the path from corrupted to clean (MIB's EAP-IG setting: 5)
    batch_size: int = 32
    per_task: dict = field(default_factory=dict)


IG_PRESETS = {"paper": {"steps": 5}, "quick": {"steps": 5}, "smoke": {"steps": 2, "batch_size": 8}}


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


# ---- interpolated runs (EAP-IG-inputs, EAP-IG-activations) ------------------------------------------
@dataclass(frozen=True)
class Interpolation:
    """One interpolated run: the writers ``rows`` (one node: the input, a layer's heads or an MLP)
    output ``y~ + alpha (y - y~)``; ``cut``: that output is a constant that passes no gradient
    (EAP-IG-activations) rather than the nodes' own computation on an interpolated input (the input
    embeddings of EAP-IG-inputs, which have nothing before them)."""

    rows: slice
    alpha: float
    cut: bool


def node_rows(graph) -> list[slice]:
    """The writer rows of each node EAP-IG-activations interpolates, in forward order: the input,
    then per layer its attention (every head together) and its MLP."""
    rows = [slice(0, 1)]
    for l in range(graph.n_layers):
        mw = graph.mlp_writer(l)
        rows += [graph.head_writers(l), slice(mw, mw + 1)]
    return rows


def interpolated_scores(engine, task, train, batch_size: int, runs: list[Interpolation], meter: CostMeter,
                        seed: int = 0, progress: bool = True, desc: str = "eap-ig") -> torch.Tensor:
    """``(1/len(runs)) sum_runs (y~_w - y_w) . d(sum of task.objective)/d input_r`` in each run,
    summed over ``train``; [W, R] with zeros outside ``graph.valid`` (see the module docstring)."""
    g = engine.graph
    plan = BatchPlan(engine, task, train, batch_size, meter, cache_mib=0.0, seed=seed, reference=False)
    valid = valid_float(g, engine.device, engine.dtype)
    counts = [slot.reads for slot in g.slots]  # writers each read slot reads (a prefix)
    total = torch.zeros(g.n_writers, g.n_readers, device=engine.device, dtype=torch.float64)
    bar = progress_bar(len(plan) * len(runs), desc, progress)
    with meter.phase("attribute"):
        for i in range(len(plan)):
            prepared = plan.get(i)
            b = prepared.batch
            B, S = b.clean.shape
            cache = prepared.corrupted
            with torch.no_grad():
                # y - y~, every writer: the clean run's outputs from the engine's own plain pass
                delta = engine.corrupted_cache(b.clean, b.attention_mask).writers
                meter.forward()
                if cache.writers is None:  # zero ablation: y~ = 0 and a residual of bias constants
                    ytil = None
                    rtil = cache.resid[:, None, :].expand(-1, B * S, -1).reshape(len(counts), -1)
                else:
                    ytil, rtil = cache.writers, cache.resid
                    delta.sub_(ytil)
            for run in runs:
                total -= _interpolated_grad(engine, task, b, cache, ytil, rtil, delta, valid, counts, run,
                                            meter).double()
                bar.update(1)
    bar.close()
    return ((total / len(runs)) * valid.double()).float()


def _interpolated_grad(engine, task, b, cache, ytil, rtil, delta, valid, counts, run, meter) -> torch.Tensor:
    """``d(sum of task.objective)/dz`` in the gradient pass of one interpolated run: (y - y~) . G_r."""
    rows, alpha = run.rows, float(run.alpha)
    after = next(s for s, c in enumerate(counts) if c >= rows.stop)  # first read slot after the node
    with torch.no_grad():
        # F_w = D_w(run) - (y_w - y~_w): how far the run's stack is from the clean one (0 up to the node)
        if alpha == 1.0 or after == len(counts) - 1:  # the clean run, or nothing after the node
            diff = torch.zeros_like(delta)
        elif alpha == 0.0 and rows.start == 0:  # the input at the corrupted end: the corrupted run
            diff = -delta
        else:
            diff = delta.clone()
            pre = valid.clone()
            pre[rows] *= alpha
            state = engine.begin(b.clean, attention_mask=b.attention_mask, positions=b.positions, corrupted=cache,
                                 stack=diff)  # rows before the slot: the clean run's, as the run's
            engine.retry(state, pre, slot=after)  # fills rows from the slot on with D(run)
            meter.forward()
            diff.sub_(delta)
        # the run's reader input at slot s: rtil[s] + sum_{w < s} m_w D_w(run), m = alpha on the node;
        # the gradient pass adds sum_{w < s} mask_w (y_w - y~_w), so its residual holds the rest
        diff[rows] = delta[rows] * (alpha if run.cut else alpha - 1.0)
        resid = torch.empty_like(rtil)
        acc = torch.zeros(rtil.shape[1], device=rtil.device, dtype=torch.promote_types(rtil.dtype, torch.float32))
        done = 0
        for s, c in enumerate(counts):
            if c > done:
                acc += diff[done:c].sum(0, dtype=acc.dtype)
                done = c
            resid[s] = rtil[s] + acc
        diff[rows] = 0.0
        writers = diff if ytil is None else diff.add_(ytil)  # y' = y~ + F: the gradient pass's stack is y - y~
    mask = valid.clone()
    if run.cut:
        mask[rows] = 0.0
    mask.requires_grad_(True)
    logits = engine(b.clean, attention_mask=b.attention_mask, edge_mask=mask, positions=b.positions,
                    corrupted=CorruptedCache("interchange", tuple(b.clean.shape), writers, resid))
    (grad,) = torch.autograd.grad(task.objective(logits, b).sum(), mask)
    meter.forward()
    meter.backward()
    return grad


def input_alphas(steps: int) -> list[float]:
    """EAP-IG-inputs' points: k / m for k = 0, ..., m - 1 (hannamw/EAP-IG's ``get_scores_eap_ig``)."""
    return [k / steps for k in range(steps)]


def activation_alphas(steps: int) -> list[float]:
    """EAP-IG-activations' points: k / m for k = 1, ..., m (hannamw/EAP-IG's
    ``get_scores_ig_activations``)."""
    return [k / steps for k in range(1, steps + 1)]


def _check_steps(name, config) -> None:
    if not isinstance(config.steps, int) or config.steps < 1:
        raise UserError(f"{name} needs steps >= 1 (an integer), got {config.steps!r}")


# ---- the methods ---------------------------------------------------------------------------------------
class _Integrated(CircuitMethod):
    """What the integrated-gradient methods share: their config, presets and check."""

    Config = EAPIGConfig
    presets = IG_PRESETS
    produces = "scores"

    @classmethod
    def check_config(cls, config) -> None:
        _check_steps(cls.name, config)


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
class EAPMaskIG(_Integrated):
    name = "eap-mask-ig"
    description = ("EAP with mask-space integrated gradients: edge-mask gradients averaged over every mask at "
                   "(k + 1/2) / steps (not Hanna et al.'s EAP-IG)")

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        return (f"{config['steps']} points x one forward and backward per batch of {config['batch_size']}; "
                f"{n_train} training examples")

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        cfg = self.config_for(task)
        meter = CostMeter(engine.device)
        alphas = [(k + 0.5) / cfg.steps for k in range(cfg.steps)]
        scores = attribution_scores(engine, task, train, cfg.batch_size, alphas, meter, seed, progress, self.name)
        return MethodResult(scores=scores.cpu(), cost=meter.finish(),
                            info={"metric": "objective", "examples": len(train), "alphas": alphas,
                                  "interpolated": "every edge mask"})


@register_method
class EAPIG(_Integrated):
    name = "eap-ig"
    description = ("EAP-IG (Hanna et al. 2024, EAP-IG-inputs): reader-input gradients averaged over runs on "
                   "input embeddings interpolated from the corrupted to the clean prompt")

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        return (f"{config['steps']} points x (a forward and backward + a forward) per batch of "
                f"{config['batch_size']}; {n_train} training examples")

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        cfg = self.config_for(task)
        ablation = getattr(task, "ablation", "interchange")
        if ablation != "interchange":
            raise UserError(f"eap-ig interpolates the input embeddings between the corrupted and the clean prompt, "
                            f"so it needs interchange ablation; task {task.name!r} uses {ablation} ablation "
                            f"(eap-ig-act and eap-mask-ig work with it)")
        meter = CostMeter(engine.device)
        alphas = input_alphas(cfg.steps)
        runs = [Interpolation(slice(0, 1), a, cut=False) for a in alphas]
        scores = interpolated_scores(engine, task, train, cfg.batch_size, runs, meter, seed, progress, self.name)
        return MethodResult(scores=scores.cpu(), cost=meter.finish(),
                            info={"metric": "objective", "examples": len(train), "alphas": alphas,
                                  "interpolated": "input embeddings"})


@register_method
class EAPIGActivations(_Integrated):
    name = "eap-ig-act"
    description = ("EAP-IG-activations (Hanna et al. 2024): reader-input gradients averaged over runs that "
                   "each interpolate one node's output (input, a layer's attention, an MLP)")

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        return (f"(1 + 2 x layers) nodes x {config['steps']} points x (a forward and backward + a partial forward) "
                f"per batch of {config['batch_size']}; {n_train} training examples")

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        cfg = self.config_for(task)
        meter = CostMeter(engine.device)
        alphas = activation_alphas(cfg.steps)
        runs = [Interpolation(rows, a, cut=True) for rows in node_rows(engine.graph) for a in alphas]
        scores = interpolated_scores(engine, task, train, cfg.batch_size, runs, meter, seed, progress, self.name)
        return MethodResult(scores=scores.cpu(), cost=meter.finish(),
                            info={"metric": "objective", "examples": len(train), "alphas": alphas,
                                  "interpolated": "each node's output in turn"})
