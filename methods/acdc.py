"""ACDC: Automatic Circuit DisCovery (Conmy et al. 2023), on the masked engine.

Start from the full model. Visit the readers in reverse topological order: the logits, then each
layer from the last to the first, its MLP reader before its attention readers. A reader whose node
(the writer it feeds) has no kept edge to a reader still connected to the output is dropped with
all its incoming edges, without trials. Otherwise each of its incoming edges (latest writer first)
is tentatively removed (patched to the corrupted, or zero, activation) and the task's faithfulness
loss (KL to the full model at the scored positions, averaged over the training split) is measured;
the edge stays removed when the loss rises by less than tau.

A trial changes only one reader's inputs, so the forward pass restarts at that reader's read slot
(`Graph.read_slot`) from the writer stack of the full model (every reader before it is still
intact: readers are visited from the last to the first, `Graph.reader_order`), which is kept per
batch: `BatchPlan` prepares each batch with `MaskedModel.begin`, and a trial is a
`MaskedModel.retry` at the slot. At an attention slot only the heads whose inputs changed are
recomputed (``heads``), and later reads reuse their part from writers before the slot
(``share_reads``; `Trials`).

Batched trials (``trial_batch`` > 1, `run_acdc`): one pass tries a reader's next K candidate edges
as K copies (`MaskedModel.retry`'s ``column``), copy k with the first k + 1 of them removed, as if
every earlier one were accepted; the copies are decided in order exactly as one-by-one trials
would be, up to and including the first rejection, and the next pass starts after it. The circuit
and the recorded increases are the sequential search's. K adapts to runs of rejections (`_Width`)
and is capped by memory (`trial_width`).

A sweep over ``taus`` gives one circuit per tau (keyed by its realised sparsity in
``MethodResult.circuits``; each circuit's ``scores`` hold the loss increase measured for each
tried edge, NaN for edges never tried). ``MethodResult.scores`` ranks the edges for cutting at any
sparsity: the edges tried in the run at the smallest tau, ordered by the loss increase measured when
each was tried (rank / number tried, in (0, 1]), then 0 for edges never tried.

PAHQ (``precision = "pahq"``; Wang et al. 2025, "PAHQ: Accelerating Automated Circuit Discovery
through Mixed-Precision Inference Optimization"): a trial's pass computes the component whose input
the trial changes in the model's dtype (float32) and every other head and MLP it recomputes in
``low_dtype`` (bfloat16 by default; `circuitbench.precision`). The full-precision component: at an
attention slot, the heads the pass recomputes in the trial's layer (the reader's own head, or every
head of a key/value reader's group, and heads a rejected trial left stale; on an adapter without
head subsets, every head of the layer); at an MLP slot, that MLP; at the logits, nothing (only the
unembedding runs). The embedding and the unembedding are full precision in every pass (the
unembedding is the metric's readout), and so are the writer stack and the residual reads: rows of
writers a trial does not recompute keep their exact values. The full model's pass, the corrupted
pass and the reference logits are exact. A trial's loss is compared with the current circuit's
loss measured in the same precision layout: when the search moves to a new slot, the current
circuit's loss is measured again with that slot's layout (one pass per slot; every trial at a slot
has the same layout, since the slot's layer is full precision and everything after it low). The
reported KL of each circuit (``kl``) is then measured in full precision (one more pass), and the
search's last mixed-precision loss is kept as ``search_kl``. float8 (the paper's GPU format) is
not implemented: ``low_dtype`` float8 is a UserError.

Checkpoints (``checkpoint_every_s``, default 300 s; 0: never): when the runner hands the method the
job's `circuitbench.checkpoint.Checkpoint` (``self.checkpoint``), the search saves its state there
between two passes whenever that many seconds have passed since the last save (`_Saver`), and a
run of the same job that finds the state resumes the search from it (the taus already searched,
then the current search at its reader and candidate: `run_acdc`'s ``resume``). The circuits,
increases, ranking, trial and pass counts are the uninterrupted search's, bit for bit (why:
`run_acdc`). A state saved under another configuration, state version, graph, task, training set
or seed is ignored with a printed line. ``checkpoint_every_s`` is a run setting
(`CircuitMethod.run_settings`): not part of the job id.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from circuitbench.checkpoint import StateSaver, fingerprint
from circuitbench.circuit import Circuit
from circuitbench.errors import UserError
from circuitbench.engine import MaskedModel
from circuitbench.method import CircuitMethod, CostMeter, MethodResult, register_method
from circuitbench.precision import MixedPrecisionAdapter, mixed_precision, resolve_low_dtype

from circuitbench.batches import BatchPlan, progress_bar, valid_float

PRECISIONS = ("float32", "pahq")  # "float32": every pass in the model's own dtype


@dataclass
class ACDCConfig:
    taus: tuple = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # thresholds on the KL increase
    batch_size: int = 32
    cache_mib: float = 4096.0  # corrupted caches and full-model writer stacks kept when they fit
    trial_batch: int = 8  # most candidate edges of one reader tried in one batched pass (1: one by one)
    adapt: bool = True  # halve the batch after a rejection, double it after a pass of accepts (`_Width`)
    precision: str = "float32"  # "pahq": trials in low_dtype except the trial's own component (module docstring)
    low_dtype: str = "bfloat16"  # PAHQ's low precision: bfloat16 or float16 (float32: a check of the harness)
    checkpoint_every_s: float = 300.0  # save the search state this often (the job's checkpoint; 0: never)
    per_task: dict = field(default_factory=dict)


@register_method
class ACDC(CircuitMethod):
    name = "acdc"
    description = ("ACDC: greedy edge removal in reverse topological order while the KL rises by less than tau "
                   "(precision=pahq: PAHQ's mixed-precision trials)")
    Config = ACDCConfig
    presets = {
        "paper": {"taus": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)},
        "quick": {"taus": (1e-2,), "batch_size": 32},
        "smoke": {"taus": (1e-3,), "batch_size": 8},
    }
    produces = "scores"
    run_settings = ("checkpoint_every_s",)  # not part of the job id: it never changes the result

    @classmethod
    def check_config(cls, config) -> None:
        every = config.checkpoint_every_s
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
            raise UserError(f"acdc's checkpoint_every_s must be a number of seconds >= 0 (0: no checkpoints), "
                            f"got {every!r}")
        if isinstance(config.trial_batch, bool) or not isinstance(config.trial_batch, int) or config.trial_batch < 1:
            raise UserError(f"acdc needs trial_batch >= 1 (an integer), got {config.trial_batch!r}")
        if config.precision not in PRECISIONS:
            raise UserError(f"acdc's precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
        resolve_low_dtype(config.low_dtype)
        if config.precision != "pahq" and config.low_dtype != ACDCConfig.low_dtype:
            raise UserError(f"acdc's low_dtype ({config.low_dtype!r}) applies to precision='pahq' only")

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        taus = ", ".join(f"{float(t):g}" for t in config["taus"])
        width = int(config.get("trial_batch", 1))
        batched = f"; up to {width} trials of one reader share a pass" if width > 1 else ""
        pahq = ""
        if config.get("precision") == "pahq":
            pahq = (f"; PAHQ: trials compute every head and MLP but the trial's own in "
                    f"{config.get('low_dtype', ACDCConfig.low_dtype)}")
        return (f"one greedy search per tau ({taus}); each trial a pass over {n_train} training examples "
                f"(batches of {config['batch_size']}){batched}{pahq}")

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        cfg = self.config_for(task)
        taus = sorted(float(t) for t in cfg.taus)
        if not taus or any(math.isnan(t) or t < 0 for t in taus):
            raise UserError(f"acdc needs one or more thresholds tau >= 0, got {cfg.taus}")
        g = engine.graph
        meter = CostMeter(engine.device)
        with meter.phase("setup"):
            if cfg.precision == "pahq":  # the same weights, with a low-precision copy for the trials
                engine = MaskedModel(mixed_precision(engine.model, cfg.low_dtype))
            plan = BatchPlan(engine, task, train, cfg.batch_size, meter, cfg.cache_mib, seed=seed, stack=True)
        # without the prepared batches kept, every trial redoes the corrupted and full passes
        result = MethodResult(circuits={}, info={"taus": [], "batches_kept": plan.keep_corrupted,
                                                 "cache_estimate_mib": plan.estimate_mib(),
                                                 "precision": cfg.precision})
        if cfg.precision == "pahq":
            result.info["low_dtype"] = cfg.low_dtype
        width = trial_width(engine, plan, cfg.trial_batch)
        result.info.update(width)
        saver = _Saver.open(getattr(self, "checkpoint", None), cfg, g, task, train, seed, meter)
        done = saver.done if saver is not None else []
        if saver is not None and saver.resumed is not None:
            result.info["resumed"] = saver.resumed
        for i, tau in enumerate(taus):
            stats = {}
            if i < len(done):  # searched before the interruption: as saved
                edges, increase, kl, trials, saved_stats = (done[i][k] for k in ("edges", "increase", "kl",
                                                                                 "trials", "stats"))
                edges, increase, stats = edges.to(engine.device), increase.to(engine.device), dict(saved_stats)
            else:
                resume = saver.search if saver is not None and saver.search is not None and saver.tau == i else None
                if saver is not None:
                    saver.begin(i)
                with meter.phase("search"):
                    edges, increase, kl, trials = run_acdc(engine, task, plan, tau, meter, progress,
                                                           f"acdc {i + 1}/{len(taus)} tau={tau:g}",
                                                           trial_batch=width["trial_batch"], adapt=cfg.adapt,
                                                           stats=stats, checkpoint=saver, resume=resume)
                if saver is not None:
                    saver.finished(edges, increase, kl, trials, stats)
            scores = increase.cpu()
            circuit = Circuit(g, edges.cpu(), scores, meta={"method": "acdc", "tau": tau, "kl": kl})
            result.circuits.setdefault(circuit.sparsity, circuit)
            result.info["taus"].append({"tau": tau, "sparsity": circuit.sparsity, "n_edges": circuit.n_edges,
                                        "kl": kl, "trials": trials, **stats})
            result.log.append({"tau": tau, "sparsity": circuit.sparsity, "kl": kl, "trials": trials})
            if i == 0:
                result.scores = ranking(increase.cpu())
        result.cost = meter.finish()
        if saver is not None:
            saver.add_saved_cost(result.cost)
            result.info["checkpoint_saves"] = saver.saves
        return result


STATE_VERSION = 1  # of the search state ACDC saves in a job's checkpoint (`_Saver`)


class _Saver(StateSaver):
    """ACDC's use of the job's `circuitbench.checkpoint.Checkpoint` (a `circuitbench.checkpoint.StateSaver`):
    the search state saved every ``checkpoint_every_s`` seconds, between two passes of the search
    (`run_acdc` asks `due`), and the state found at the start.

    The state: a fingerprint (`circuitbench.checkpoint.fingerprint` of `STATE_VERSION`, the resolved
    configuration without run settings, the graph's shape, the task, the training examples (their
    number and a digest) and the seed: a checkpoint with another one is ignored with a printed line),
    the finished taus' results (circuit, increases, loss, trials, pass counts), the current tau's
    search (`run_acdc`'s ``resume``: mask, increases, readers kept, position in the reader order and
    among the reader's candidates, current loss, trial and pass counts, the width and `Trials`' stale
    heads, and the writer stack rows of the current slot's heads, which trials at that slot take as
    given), and the cost spent so far (wall time per phase, passes; the peak memory is the last
    process's). A resumed job's cost adds what the earlier processes spent up to their last save and
    what this one spends (its setup and the full model's pass again); work after the last save is
    lost and not counted. ``info["resumed"]`` says where each resume started."""

    def __init__(self, checkpoint, every_s: float, fingerprint: str, meter):
        super().__init__(checkpoint, every_s, fingerprint, meter)
        self.done: list[dict] = []
        self.search, self.tau = None, None
        self.current = None

    @classmethod
    def open(cls, checkpoint, cfg, graph, task, train, seed, meter):
        """None when there is no checkpoint or ``checkpoint_every_s`` is 0; otherwise the saver, with
        the state of a matching checkpoint loaded (a mismatching one is ignored, said on stderr)."""
        if checkpoint is None or not cfg.checkpoint_every_s > 0:
            return None
        saver = cls(checkpoint, cfg.checkpoint_every_s,
                    fingerprint(STATE_VERSION, cfg, ACDC.run_settings, graph, task, train, seed), meter)
        state = saver.load("saved by another ACDC configuration or state version (not this search's); "
                           "starting afresh")
        if state is None:
            return saver
        saver.done = list(state["done"])
        saver.search, saver.tau = state["search"], state["tau"]
        search = saver.search or {}
        saver.resume({"tau_index": saver.tau, "taus_done": len(saver.done), "trials": search.get("trials", 0),
                      "edges_done": search.get("done_edges", 0)},
                     f"resuming ACDC: {len(saver.done)} tau(s) done, the current one at "
                     f"{search.get('done_edges', 0)} edges decided ({search.get('trials', 0)} trials)")
        return saver

    def begin(self, tau_index: int):
        self.current = tau_index
        self.running["search"] = time.perf_counter()  # the search phase in progress, counted in a save

    def save(self, search: dict | None):
        return super().save({"done": self.done, "tau": self.current, "search": search})

    def finished(self, edges, increase, kl, trials, stats):
        self.done.append({"edges": edges.cpu(), "increase": increase.cpu(), "kl": float(kl), "trials": int(trials),
                          "stats": dict(stats)})
        self.running.pop("search", None)


def ranking(increase: torch.Tensor) -> torch.Tensor:
    """Scores from the measured loss increases: tried edges get (rank of increase + 1) / n_tried
    (ascending, so the largest increase scores 1), never-tried edges (NaN) get 0."""
    flat = increase.flatten()
    tried = ~torch.isnan(flat)
    out = torch.zeros_like(flat)
    idx = tried.nonzero().flatten()
    if len(idx):
        order = idx[torch.argsort(flat[idx], stable=True)]
        out[order] = torch.arange(1, len(idx) + 1, dtype=out.dtype) / len(idx)
    return out.view_as(increase)


def _mean_loss(engine, task, plan, mask, slot, meter, heads=None, share_reads=False, focus=None) -> float:
    """The mean loss of ``mask`` over the plan's batches, each pass a `MaskedModel.retry` at
    ``slot``. ``focus``: a context manager factory that sets a mixed-precision engine's focus
    around each pass (never around the batch's preparation, which is exact)."""
    total = 0.0
    for prepared in plan.epoch():
        b = prepared.batch
        with (focus() if focus is not None else contextlib.nullcontext()):
            logits = engine.retry(prepared.state, mask, slot=slot, heads=heads, share_reads=share_reads)
        total += float(task.loss(logits, prepared.reference, b).double().sum())
        meter.forward()
    return total / plan.n_examples


class Trials:
    """The loss of each trial of one search, restarting the pass at the trial reader's slot.

    Two things are shared by the trials at one slot (they need the batches' writer stacks kept
    between trials, ``plan.keep_corrupted``, and an adapter that computes head subsets):

    - at an attention slot, only the heads whose rows may differ from what the current circuit
      makes them are recomputed: the heads the trial reader feeds, and the heads a rejected trial
      just before it (at the same slot) left with that trial's rows. The other heads of the layer
      keep their rows: their readers' edges did not change since their rows were last written;
    - every later read's part from the writers before the slot (`MaskedModel.retry`'s
      ``share_reads``): the edges of later readers do not change while the search is at this slot. The
      first trial at a slot computes it (a full read), the others read only the rows from the slot
      on. Kept when it fits in the plan's cache budget next to the stacks (a reader row per batch
      per later reader).

    On a mixed-precision engine (`circuitbench.precision.mixed_precision`: PAHQ) each trial's pass
    runs with the focus on its slot's component: the heads the pass recomputes in the slot's
    layer (attention slot), the MLP (MLP slot), nothing (the logits); full passes run without a
    focus (exact). `baseline` measures the current circuit in a slot's precision layout.
    """

    def __init__(self, engine, task, plan, meter, head_subsets=True):
        self.engine, self.task, self.plan, self.meter = engine, task, plan, meter
        g = engine.graph
        self.subsets = head_subsets and plan.keep_corrupted and getattr(engine.adapter, "head_subsets", False)
        budget = plan.cache_mib - plan.reference_mib() - plan.estimate_mib()
        self.share_reads = self.subsets and plan.rows_mib(g.n_readers) <= budget
        self.mixed = engine.adapter if isinstance(engine.adapter, MixedPrecisionAdapter) else None
        self._slot, self._stale, self._trial = None, set(), set()

    def _enter(self, slot):
        if slot != self._slot:  # a new slot: rows of its layer were last written by a pass over every head
            self._slot, self._stale = slot, set()

    def _attention_slot(self, slot) -> bool:
        return self.engine.graph.slots[slot].kind == "attn"

    def _focus(self, slot, fresh):
        """The mixed-precision focus of a pass restarted at ``slot`` that recomputes the heads
        ``fresh`` of an attention slot's layer (None: every head), as a context manager factory;
        None on an exact engine."""
        if self.mixed is None:
            return None
        g = self.engine.graph
        at = g.slots[slot]
        if at.kind == "logits":
            return lambda: self.mixed.focused(logits=True)
        if at.kind == "mlp":
            return lambda: self.mixed.focused(at.layer, mlp=True)
        heads = range(g.n_heads) if fresh is None else fresh
        return lambda: self.mixed.focused(at.layer, heads=heads)

    def _fresh(self, reader, slot):
        if not (self.subsets and self._attention_slot(slot)):
            return None
        first = self.engine.graph.slots[slot].writers.start
        self._trial = {w - first for w in self.engine.graph.reader_nodes(reader)}
        return sorted(self._trial | self._stale)

    def full(self, mask) -> float:
        """The loss of ``mask`` from a pass over every slot (it rewrites every live row); exact
        (no mixed-precision focus)."""
        self._slot, self._stale, self._trial = None, set(), set()
        return _mean_loss(self.engine, self.task, self.plan, mask, 0, self.meter)

    def baseline(self, mask, slot) -> float:
        """The loss of the current circuit ``mask`` from a pass restarted at ``slot`` in that slot's
        precision layout (a mixed-precision engine's trials at ``slot`` compare with it). It
        recomputes no head of an attention slot's layer when head subsets are on (their rows hold
        the current circuit's exact values, except heads a rejected trial left stale) and rewrites
        the rows after it."""
        self._enter(slot)
        fresh = sorted(self._stale) if self.subsets and self._attention_slot(slot) else None
        self._stale = set()
        return _mean_loss(self.engine, self.task, self.plan, mask, slot, self.meter, fresh, self.share_reads,
                          self._focus(slot, fresh))

    def loss(self, mask, reader, slot) -> float:
        """The loss of ``mask``, which differs from the current circuit in ``reader``'s edges only."""
        self._enter(slot)
        fresh = self._fresh(reader, slot)
        return _mean_loss(self.engine, self.task, self.plan, mask, slot, self.meter, fresh, self.share_reads,
                          self._focus(slot, fresh))

    def settle(self, accepted: bool):
        """After a trial: ``accepted`` when its mask becomes the current circuit."""
        self._stale = set() if accepted else self._trial

    def losses(self, mask, reader, slot, values) -> list[float]:
        """The losses of K trials in one batched pass (`MaskedModel.retry`'s ``column``): trial
        k's mask is ``mask`` with ``reader``'s column replaced by ``values[k]``. The pass leaves the
        writer stacks as they were; call `settle_copies` after it."""
        self._enter(slot)
        fresh = self._fresh(reader, slot)
        focus = self._focus(slot, fresh)
        K = values.shape[0]
        totals = [0.0] * K
        for prepared in self.plan.epoch():
            b = prepared.batch
            with (focus() if focus is not None else contextlib.nullcontext()):
                logits = self.engine.retry(prepared.state, mask, slot=slot, heads=fresh, column=(reader, values),
                                           share_reads=self.share_reads)
            B = len(b)
            for k in range(K):  # summed as `_mean_loss` sums a single trial's
                totals[k] += float(self.task.loss(logits[k * B:(k + 1) * B], prepared.reference, b).double().sum())
            self.meter.forward(K)
        return [t / self.plan.n_examples for t in totals]

    def settle_copies(self, changed: bool):
        """After a batched pass: ``changed`` when some of its trials were accepted. The pass wrote
        no stack rows, so the heads the reader feeds keep rows made with its old column."""
        if changed:
            self._stale = self._stale | self._trial


def trial_width(engine, plan, requested: int) -> dict:
    """The batched trials' width limit K for this engine and plan, and why it is less than asked.

    K copies of a pass hold K writer stacks of one batch (the rows from the trial's slot on) and K
    times its activations: about 2 x K x writers x tokens x d_model of the largest batch. They share
    ``cache_mib`` with what the plan keeps (the full model's logits, corrupted caches and writer
    stacks, `Trials`' shared reads), and K shrinks to fit, never below 1. An adapter without head
    subsets (`Adapter.head_subsets`) cannot run batched passes: K is 1 (every trial its own pass)."""
    requested = int(requested)
    if requested < 1:
        raise UserError(f"acdc's trial_batch must be >= 1, got {requested}")
    out = {"trial_batch_requested": requested, "trial_batch": requested}
    if requested == 1:
        return out
    if not getattr(engine.adapter, "head_subsets", False):
        out.update(trial_batch=1, trial_batch_reason="the adapter computes no head subsets, which batched "
                                                     "trials need: one pass per trial")
        return out
    g = engine.graph
    free = plan.cache_mib - plan.reference_mib()
    if plan.keep_corrupted:
        free -= plan.estimate_mib()
        if plan.rows_mib(g.n_readers) <= free:  # `Trials`' shared reads
            free -= plan.rows_mib(g.n_readers)
    per_copy = 2 * plan.batch_rows_mib(g.n_writers)
    cap = max(1, int(free // per_copy)) if per_copy > 0 else requested
    if cap < requested:
        out.update(trial_batch=cap, trial_batch_reason=f"{requested} copies of a pass need about "
                                                       f"{requested * per_copy:.0f} MiB; {max(free, 0):.0f} MiB "
                                                       "of cache_mib are left")
    return out


class _Width:
    """How many candidate edges the next batched pass tries (K), between 1 and ``limit``.

    ``adapt``: start at ``limit``; after a rejection halve K (the copies after a rejected one are
    wasted, and rejections come in runs), after a pass whose trials were all accepted double it."""

    def __init__(self, limit: int, adapt: bool = True):
        self.limit, self.adapt = max(1, int(limit)), adapt
        self.now = self.limit

    def update(self, decided: int, all_accepted: bool):
        if not self.adapt:
            return
        if all_accepted:
            self.now = min(self.limit, self.now * 2)
        else:
            self.now = max(1, self.now // 2)


@torch.no_grad()
def run_acdc(engine, task, plan, tau, meter, progress=True, desc="acdc", head_subsets=True, trial_batch=1,
             adapt=True, stats=None, checkpoint=None, resume=None):
    """One ACDC search at threshold ``tau``. Returns (edges bool [W, R], loss increase per tried
    edge [W, R] with NaN elsewhere, final mean loss, number of trials). ``head_subsets=False``
    recomputes every live head of a trial's layer (the same search, slower; see `Trials`).

    ``trial_batch`` > 1: a reader's next K <= ``trial_batch`` candidate edges are tried in one
    batched pass, copy k with the first k + 1 of them removed (speculating that the earlier ones
    are accepted); the copies are then decided in order exactly as one-by-one trials would be, up
    to and including the first rejection (that copy's mask is the accepted edges plus the rejected
    one removed: the sequential trial's mask), and the next pass starts after it. The circuit and
    every recorded increase are the sequential search's (up to float rounding of the losses).
    K adapts (`_Width`). ``stats`` (a dict) receives the passes and copies evaluated.

    On a mixed-precision engine (PAHQ, see the module docstring) the current circuit's loss is
    measured again in each new slot's precision layout before the slot's first trial (``stats``:
    ``baselines``), and the final mean loss returned is measured exactly (a full pass); ``stats``
    gets the search's last mixed-precision loss as ``search_kl``.

    ``checkpoint`` (a `_Saver`): between two passes, when it is `_Saver.due`, the search state is
    saved (`_search_state`); ``resume``: such a state, the search continues from it and ends exactly
    as the uninterrupted search (the same circuit, increases, trials and pass counts). Why that is
    exact: the search starts with the full model's pass in both (every row of every batch's writer
    stack rewritten, as before the interruption); rows of writers before the current slot are only
    ever written by that pass; a trial recomputes every live row after its slot before reading it;
    the rows it takes as given at an attention slot, the layer's heads it does not recompute, are
    saved and put back; the later reads shared at a slot are made again from the same rows."""
    g = engine.graph
    dev = engine.device
    valid = g.valid.to(dev)
    mask = valid_float(g, dev, engine.dtype)
    increase = torch.full(mask.shape, float("nan"), device=dev)
    reader_on = torch.zeros(g.n_readers, dtype=torch.bool, device=dev)
    reader_on[g.logits_reader] = True
    visible = valid.sum(0).tolist()
    trial = Trials(engine, task, plan, meter, head_subsets)
    width = _Width(trial_batch, adapt)
    counts = stats if stats is not None else {}
    counts.update(passes=0, copies=0)
    if trial.mixed is not None:
        counts["baselines"] = 0
    # the full model's pass refreshes every batch's writer stack and gives the starting loss
    current = trial.full(mask)
    measured_at = None  # the slot whose precision layout ``current`` was measured in (mixed precision)
    trials = 0
    start, start_i = 0, None  # where a resumed search continues: reader position, candidate index
    if resume is not None:
        mask = resume["mask"].to(device=dev, dtype=mask.dtype)
        increase = resume["increase"].to(dev)
        reader_on = resume["reader_on"].to(dev)
        current, measured_at, trials = float(resume["current"]), resume["measured_at"], int(resume["trials"])
        counts.update(resume["counts"])
        width.now = int(resume["width"])
        _restore_rows(g, plan, resume)
        trial._slot, trial._stale, trial._trial = resume["slot"], set(resume["stale"]), set(resume["trial"])
        start, start_i = int(resume["pos"]), int(resume["i"])
    done_edges = int(resume["done_edges"]) if resume is not None else 0  # decided: the bar's count
    if resume is not None:
        desc += f" (resumed at {done_edges}/{g.n_edges})"
    bar = progress_bar(g.n_edges, desc, progress, initial=done_edges)
    for pos, (reader, slot) in enumerate(g.reader_order()):
        if pos < start:
            continue
        candidates = list(reversed(range(visible[reader])))  # latest writer first
        if pos == start and start_i is not None:  # resumed inside this reader: its checks were made
            i = start_i
        else:
            nodes = g.reader_nodes(reader)
            connected = not nodes or any(bool(((mask[w] > 0) & reader_on).any()) for w in nodes)
            if not connected:
                mask[:, reader] = 0.0
                bar.update(visible[reader])
                done_edges += visible[reader]
                continue
            reader_on[reader] = True
            if trial.mixed is not None and candidates and slot != measured_at:
                current = trial.baseline(mask, slot)  # the trials at this slot compare in its layout
                measured_at = slot
                counts["baselines"] += 1
            i = 0
        while i < len(candidates):
            if checkpoint is not None and checkpoint.due():
                checkpoint.save(_search_state(g, plan, trial, width, slot, pos=pos, i=i, mask=mask, increase=increase,
                                              reader_on=reader_on, current=current, measured_at=measured_at,
                                              trials=trials, counts=counts, done_edges=done_edges))
            k = min(width.now, len(candidates) - i)
            if k == 1:  # one trial, one pass (it rewrites the stack's rows from the slot on)
                w = candidates[i]
                mask[w, reader] = 0.0
                loss = trial.loss(mask, reader, slot)
                trials += 1
                increase[w, reader] = loss - current
                accepted = loss - current < tau
                if accepted:
                    current = loss
                else:
                    mask[w, reader] = 1.0
                trial.settle(accepted)
                width.update(1, accepted)
                counts["passes"] += 1
                counts["copies"] += 1
                i += 1
                bar.update(1)
                done_edges += 1
                continue
            values = mask[:, reader].repeat(k, 1)
            for j in range(k):  # copy j: candidates i..i+j removed
                values[j:, candidates[i + j]] = 0.0
            losses = trial.losses(mask, reader, slot, values)
            counts["passes"] += 1
            counts["copies"] += k
            accepted_any = rejected = False
            for j, loss in enumerate(losses):  # the sequential decisions, up to the first rejection
                w = candidates[i + j]
                trials += 1
                increase[w, reader] = loss - current
                if loss - current >= tau:
                    rejected = True
                    break
                mask[w, reader] = 0.0
                current = loss
                accepted_any = True
            decided = j + 1
            trial.settle_copies(accepted_any)
            width.update(decided, not rejected)
            i += decided
            bar.update(decided)
            done_edges += decided
        bar.set_postfix(kl=f"{current:.3g}", kept=int(mask.sum()), refresh=False)
    bar.close()
    if trial.mixed is not None:  # the circuit's loss in full precision
        counts["search_kl"] = current
        current = trial.full(mask)
    return (mask > 0) & valid, increase, current, trials


def _search_state(g, plan, trial, width, slot, **values) -> dict:
    """`run_acdc`'s state between two passes (what ``resume`` takes), on the CPU: ``values`` (position,
    tensors, loss, counts), the width, `Trials`' slot and stale heads and, at an attention slot with
    the batches' stacks kept, each batch's stack rows of the slot's heads (trials there take the
    heads they do not recompute as given; every other row is remade exactly by the resumed search)."""
    state = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
    state["counts"] = dict(values["counts"])
    state.update(width=width.now, slot=trial._slot, stale=sorted(trial._stale), trial=sorted(trial._trial))
    rows = None
    at = g.slots[slot]
    if plan.keep_corrupted and at.kind == "attn":
        rows = [p.state.stack[at.writers].cpu().clone() for p in plan.epoch()]
    state.update(rows=rows, rows_slot=slot)
    return state


def _restore_rows(g, plan, state):
    """Put a saved state's stack rows back (after the full model's pass refilled the stacks)."""
    if state["rows"] is None:
        return
    if not plan.keep_corrupted:
        raise RuntimeError("the checkpoint holds stack rows but this search keeps no stacks")
    at = g.slots[state["rows_slot"]]
    for p, rows in zip(plan.epoch(), state["rows"], strict=True):
        p.state.stack[at.writers] = rows.to(device=p.state.stack.device, dtype=p.state.stack.dtype)
