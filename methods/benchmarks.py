"""Method benchmarks: each method's unit of work against the plain model on the same batch.

Reported as ratios measured in one run (``circuitbench bench methods``), timing the methods' own code.
Each measurement is paired with baseline steps timed right before it and the ratios are medians of
the paired ratios, so load from other processes largely cancels:

- ``ep_step_over_plain``: one Edge Pruning training step (mask sampling, masked forward, KL and
  Lagrangian, backward, both Adam updates; per step from the difference of a 1-step and a 3-step run)
  with the corrupted activations cached, over one plain
  forward+backward (a language-modelling step with gradients to the weights; `circuitbench.bench`'s
  ``plain`` mode); ``ep_step_with_corrupted_over_plain``: the same step recomputing the corrupted
  pass (the full model's logits stay cached);
- ``acdc_trial_over_plain_forward``: one ACDC trial (remove one edge, restart the pass at its
  reader, KL on the batch) over one plain forward of the same examples; the per-slot times are
  weighted by how many edges enter the readers of each slot, i.e. averaged over the trials of a run
  in which every reader stays connected; what a slot's trials share (computed by its first trial)
  is charged to them in equal parts;
- ``acdc_batched_trial_over_plain_forward``: the same average for batched trials (``acdc_trial_batch``
  copies per pass, ACDC's default width; `methods.acdc.Trials.losses`): a pass tries a reader's
  latest edges removed cumulatively and its time is split over its copies, so it is a trial's
  cost in a run of accepted trials; ``acdc_batched_speedup`` = the one-by-one ratio over this one.
  Every reader connected (the full model) is the dense case, where a copy costs nearly a whole
  trial; in a search most trials run on a sparse circuit, where the shared parts of a pass (weights
  read, per-layer overhead) dominate: `acdc_search_benchmark` measures that;
- ``eap_over_plain``: EAP on the batch (corrupted pass, masked forward, backward to the masks) over
  one plain forward+backward.

`acdc_search_benchmark` (``circuitbench bench acdc-search``, by default smollm2-135m's ioi with 4
training examples at tau 0.01) runs ACDC's whole search one trial per pass and batched in one
process and reports trials per second of each, their ratio and whether the circuits are identical.

``*_frozen`` variants divide by a plain forward+backward with frozen weights (gradient to the input
embeddings only), the strictest baseline. ``memory`` adds the peak memory of an EP step and of a
plain step, each measured in a fresh process. Every ratio comes with the absolute medians
(``*_s``; ``acdc_trial_s``: the trial ratio times the plain forward's median). On a GPU
(``device``) every timed region is bracketed by ``torch.cuda.synchronize`` (`circuitbench.bench.timed`).

`ep_step_benchmark` (``circuitbench bench ep-step``) measures one Edge Pruning step of any model in
absolute terms: seconds per step, peak memory (CUDA: allocated device memory, weights included) and
`circuitbench.costs.estimate_memory`'s estimate for the same batch, length, dtype and
gradient checkpointing, e.g. ``random:codellama-13b`` at the case study's batch 1 in bfloat16.
"""
from __future__ import annotations

import json
import statistics
import sys

import torch

from circuitbench import metrics
from circuitbench.bench import setup, step_fn, hardware, measure_peak_mib, setup_source, timed
from circuitbench.precision import MixedPrecisionAdapter
from circuitbench.tasks.base import Examples, Task


class _BenchTask(Task):
    """Random token pairs scored at the last position (KL over the vocabulary; logit difference)."""

    name = "bench"
    description = "benchmark batch"
    metrics = ("kl", "logit_diff")
    sizes = {"train": 0, "validation": 0, "test": 0}

    def build(self, tokenizer, seed=0, n_train=None, sizes=None):
        raise ValueError("the benchmark task has no data of its own: it scores one fixed batch")

    def loss(self, circuit_logits, full_logits, batch):
        return metrics.kl_divergence(full_logits, circuit_logits)

    def objective(self, logits, batch):
        return metrics.logit_difference(logits, batch.targets["answer"], batch.targets["wrong"])

    def score(self, circuit_logits, full_logits, batch):
        return {"kl": self.loss(circuit_logits, full_logits, batch), "logit_diff": self.objective(circuit_logits, batch)}


def _examples(clean, corrupted, vocab, seed=0) -> Examples:
    B, S = clean.shape
    gen = torch.Generator().manual_seed(seed + 1)
    return Examples(clean=clean, corrupted=corrupted, attention_mask=torch.ones_like(clean),
                    positions=torch.full((B, 1), S - 1),
                    targets={"answer": torch.randint(0, vocab, (B,), generator=gen),
                             "wrong": torch.randint(0, vocab, (B,), generator=gen)},
                    texts=[{} for _ in range(B)])


def _once(step, device=None) -> float:
    return timed(step, device)


def _ep_runs(mm, task, examples, keep_corrupted, steps, warmup=False):
    """(seconds per Edge Pruning training step, the Costs of the two runs it came from), from runs of
    the method itself (their ``train`` phases). The full model's logits are kept either way;
    ``keep_corrupted=False`` leaves too little cache memory for the corrupted activations, so every
    step redoes the corrupted pass. ``warmup``: one untimed 1-step run first (lazy initialisation,
    e.g. CUDA's libraries, would otherwise fall into the first timed run)."""
    from circuitbench.batches import BatchPlan
    from .edge_pruning import EdgePruning

    from circuitbench.method import CostMeter

    probe = BatchPlan(mm, task, examples, len(examples), CostMeter(mm.device), cache_mib=0.0)
    cache_mib = float("inf") if keep_corrupted else probe.reference_mib() * 1.01 + 1e-6
    del probe
    costs = []
    # The first step of a run also prepares the batch (the corrupted pass and the full model's logits)
    # that later steps reuse when it is kept: the difference of two runs leaves only later steps.
    for n in ((1,) if warmup else ()) + (1, 1 + steps):
        method = EdgePruning(steps=n, ramp_steps=0, batch_size=len(examples), log_every=10**9, cache_mib=cache_mib)
        costs.append(method.discover(mm, task, examples, None, [0.5], progress=False).cost)
    costs = costs[-2:]
    per_step = (costs[1].wall_s["train"] - costs[0].wall_s["train"]) / steps
    if per_step <= 0:  # timing noise larger than the steps (tiny models, a loaded machine): the longer
        per_step = costs[1].wall_s["train"] / (1 + steps)  # run's mean, an upper bound with the preparation
    return per_step, costs


def _ep_step_seconds(mm, task, examples, keep_corrupted, steps) -> float:
    """Seconds per Edge Pruning training step (`_ep_runs`)."""
    return _ep_runs(mm, task, examples, keep_corrupted, steps)[0]


def _ep_step_fn(mm, task, examples, keep_corrupted):
    """A zero-argument callable doing a short Edge Pruning run (for peak-memory measurement)."""

    def step():
        _ep_step_seconds(mm, task, examples, keep_corrupted, 1)
    return step


def _eap_fn(mm, task, examples):
    from .eap import attribution_scores

    from circuitbench.method import CostMeter

    def run():
        attribution_scores(mm, task, examples, len(examples), [1.0], CostMeter(mm.device), progress=False)
    return run


def _acdc_trial_ratios(mm, task, examples, plain_forward, repeats, progress, device=None, copies=1, slots=None):
    """Per read slot: the ratio of one ACDC trial restarting there to a plain forward timed right
    before it, and the number of edges entering the readers of each slot. The first trial at a
    slot also computes what the slot's trials share (`methods.acdc.Trials`): its extra time is
    spread over the slot's trials, one per edge. Later trials are timed as rejected ones (the
    search's stack is the full model's again after each), median of ``repeats``.

    ``copies`` > 1: batched trials (`Trials.losses`): one pass tries the reader's latest
    ``min(copies, edges into it)`` edges, removed cumulatively, and a trial's time is the pass's
    divided by its copies (every copy decided: a run of accepted trials). ``slots``: measure only
    these read slots (default: every one). On a mixed-precision engine (`circuitbench.precision`)
    the trials run in PAHQ's precision layout (`Trials` sets the focus)."""
    from circuitbench.batches import BatchPlan
    from .acdc import Trials

    from circuitbench.method import CostMeter

    g = mm.graph
    meter = CostMeter(mm.device)
    plan = BatchPlan(mm, task, examples, len(examples), meter, cache_mib=float("inf"), stack=True)
    full = g.full_mask(mm.dtype).to(mm.device)
    trials = Trials(mm, task, plan, meter)
    visible = g.valid.sum(0)
    first, steady, weights = {}, {}, {}
    with torch.no_grad():
        trials.full(full)  # fills the full model's writer stack
        for reader, slot in g.reader_order():
            weights[slot] = weights.get(slot, 0) + int(visible[reader])
            if slot in steady or (slots is not None and slot not in slots):
                continue
            mask = full.clone()
            mask[0, reader] = 0.0  # remove one edge into a reader of this slot
            k = min(copies, int(visible[reader]))
            values = full[:, reader].repeat(k, 1)
            for j in range(k):  # copy j: the reader's latest j + 1 edges removed
                values[j:, int(visible[reader]) - 1 - j] = 0.0

            def trial():  # a rejected trial: the search goes on from the full model
                if k == 1:
                    trials.loss(mask, reader, slot)
                    trials.settle(False)
                else:
                    trials.losses(full, reader, slot, values)
                    trials.settle_copies(False)
            base = _once(plain_forward, device)
            first[slot] = _once(trial, device) / base / k
            steady[slot] = statistics.median(_once(trial, device) / k / _once(plain_forward, device)
                                             for _ in range(repeats))
    ratios = {s: steady[s] + max(first[s] - steady[s], 0.0) / weights[s] for s in steady}
    weights = {s: w for s, w in weights.items() if s in steady}
    if progress:
        what = "acdc trial" if copies == 1 else f"batched ({copies})"
        if isinstance(mm.adapter, MixedPrecisionAdapter):
            what = f"pahq {what}"
        for s, r in ratios.items():
            print(f"  {what} at slot {s:<3}   {r:6.3f} x plain forward (first at the slot {first[s]:.3f})",
                  file=sys.stderr)
    return ratios, weights


def _acdc_default_width() -> int:
    """ACDC's default batched-trial width, from the method registry (the harness imports no method)."""
    from circuitbench.method import get_method

    return int(get_method("acdc").Config.trial_batch)


def _acdc_low_dtype() -> str:
    """ACDC's default PAHQ low precision, from the method registry."""
    from circuitbench.method import get_method

    return str(get_method("acdc").Config.low_dtype)


def _pahq_engine(model):
    """An engine on ``model`` with PAHQ's mixed precision at ACDC's default low precision."""
    from circuitbench.engine import MaskedModel
    from circuitbench.precision import mixed_precision

    return MaskedModel(mixed_precision(model, _acdc_low_dtype()))


def _acdc_peak_slot(graph) -> int:
    """The read slot whose batched trials hold the widest copies: the first attention slot whose
    readers read more than the input (layer 1's; layer 0's read one edge each: one copy)."""
    return 2 if graph.n_layers > 1 else 0


def _acdc_trial_peak_fn(model, mm, task, examples, precision, width, clean):
    """A zero-argument callable for peak-memory measurement: ACDC's batched trials at
    `_acdc_peak_slot` on a fresh plan, on ``mm`` (``precision="float32"``) or on a PAHQ engine
    built inside the call (``"pahq"``: its low-precision copy of the weights counts)."""
    hf = model.hf_model

    def forward():
        with torch.no_grad():
            hf(clean)

    def step():
        engine = mm if precision == "float32" else _pahq_engine(model)
        _acdc_trial_ratios(engine, task, examples, forward, 1, False, copies=width,
                           slots=(_acdc_peak_slot(mm.graph),))
    return step


def _acdc_peak_mib(spec, batch, seq, threads, precision, width, device="cpu", dtype=None) -> float:
    """Peak memory of ACDC's batched trials at one slot (MiB), in a fresh process (`_acdc_trial_peak_fn`)."""
    from circuitbench.bench import peak_mib_in_fresh_process

    return peak_mib_in_fresh_process(threads, (
        setup_source(spec, batch, seq, device, dtype, False) + ";"
        "from methods.benchmarks import _BenchTask,_examples,_acdc_trial_peak_fn;"
        f"s=_acdc_trial_peak_fn(m,mm,_BenchTask(),_examples(c.cpu(),x.cpu(),m.hf_model.config.vocab_size),"
        f"{precision!r},{int(width)},c)"), device)


def _ep_peak_mib(spec, batch, seq, threads, device="cpu", dtype=None, checkpoint=False) -> float:
    """Peak memory of one Edge Pruning step (MiB), after a first step has built its state."""
    from circuitbench.bench import peak_mib_in_fresh_process

    return peak_mib_in_fresh_process(threads, (
        setup_source(spec, batch, seq, device, dtype, checkpoint) + ";"
        "from methods.benchmarks import _BenchTask,_examples,_ep_step_fn;"
        "s=_ep_step_fn(mm,_BenchTask(),_examples(c.cpu(),x.cpu(),m.hf_model.config.vocab_size),True);"
        "s()"), device)


def _bench_setup(spec, batch, seq, threads, device, dtype, checkpoint):
    """(hardware info, model, masked model, clean, corrupted, task, examples) for a benchmark."""
    info = hardware(device, dtype, checkpoint)
    torch.set_num_threads(threads)
    model, mm, clean, corrupted = setup(spec, batch, seq, device=info["device"], dtype=dtype, checkpoint=checkpoint)
    examples = _examples(clean.cpu(), corrupted.cpu(), model.hf_model.config.vocab_size)
    return info, model, mm, clean, corrupted, _BenchTask(), examples


def methods_benchmark(spec="random:gpt2-small", batch=32, seq=20, threads=2, repeats=5, memory=True,
                      progress=True, device="cpu", dtype=None, checkpoint=False) -> dict:
    info, model, mm, clean, corrupted, task, examples = _bench_setup(spec, batch, seq, threads, device, dtype,
                                                                     checkpoint)
    dev = info["device"]
    hf = model.hf_model

    def say(name, seconds):
        if progress:
            print(f"  {name:<26} {seconds * 1e3:9.1f} ms (median of {repeats})", file=sys.stderr)

    # Each method's time is paired with baseline steps timed right before it, and ratios are the
    # medians of the paired ratios: load from other processes drifts, and pairs cancel most of it.
    plain_step = step_fn("plain", model, mm, clean, corrupted)
    frozen_step = step_fn("plain_frozen", model, mm, clean, corrupted)

    def plain():  # the two baselines differ in whether the weights take gradients
        hf.requires_grad_(True)
        plain_step()

    def frozen():  # leaves the weights frozen, as every method expects
        hf.requires_grad_(False)
        frozen_step()

    def forward():
        with torch.no_grad():
            hf(clean)

    eap = _eap_fn(mm, task, examples)
    methods = {
        "ep_step": lambda: _ep_step_seconds(mm, task, examples, True, 2),
        "ep_step_with_corrupted": lambda: _ep_step_seconds(mm, task, examples, False, 2),
        "eap": lambda: _once(eap, dev),
    }
    for step in (plain, frozen, forward, eap):  # warm-up
        step()
    hf.requires_grad_(False)
    samples = {name: [] for name in ("plain", "plain_frozen", "plain_forward", *methods)}
    ratios = {f"{name}_over_{base}": [] for name in methods for base in ("plain", "plain_frozen")}
    for _ in range(repeats):
        for name, run in methods.items():
            p, f = _once(plain, dev), _once(frozen, dev)
            seconds = run()
            samples["plain"].append(p)
            samples["plain_frozen"].append(f)
            samples[name].append(seconds)
            ratios[f"{name}_over_plain"].append(seconds / p)
            ratios[f"{name}_over_plain_frozen"].append(seconds / f)
        samples["plain_forward"].append(_once(forward, dev))
    t = {name: statistics.median(v) for name, v in samples.items()}
    for name in ("plain", "plain_frozen", "plain_forward", *methods):
        say(name, t[name])
    slot_ratios, weights = _acdc_trial_ratios(mm, task, examples, forward, max(1, repeats // 2), progress, dev)
    acdc = sum(slot_ratios[s] * w for s, w in weights.items()) / sum(weights.values())
    width = _acdc_default_width()
    batched_ratios, _ = _acdc_trial_ratios(mm, task, examples, forward, max(1, repeats // 2), progress, dev,
                                           copies=width)
    batched = sum(batched_ratios[s] * w for s, w in weights.items()) / sum(weights.values())
    pahq_ratios, _ = _acdc_trial_ratios(_pahq_engine(model), task, examples, forward, max(1, repeats // 2),
                                        progress, dev, copies=width)
    pahq = sum(pahq_ratios[s] * w for s, w in weights.items()) / sum(weights.values())

    result = {
        "model": spec, "batch": batch, "seq": seq, "threads": threads, "repeats": repeats, **info,
        **{f"{k}_s": v for k, v in t.items()},
        **{k: statistics.median(v) for k, v in ratios.items()},
        "acdc_trial_over_plain_forward": acdc,
        "acdc_trial_slowest_slot_over_plain_forward": max(slot_ratios.values()),
        "acdc_trial_s": acdc * t["plain_forward"],
        "acdc_trial_batch": width,
        "acdc_batched_trial_over_plain_forward": batched,
        "acdc_batched_trial_s": batched * t["plain_forward"],
        "acdc_batched_speedup": acdc / batched,
        "acdc_pahq_low_dtype": _acdc_low_dtype(),
        "acdc_pahq_batched_trial_over_plain_forward": pahq,
        "acdc_pahq_batched_trial_s": pahq * t["plain_forward"],
        "acdc_pahq_over_float32": pahq / batched,
    }
    if memory:
        from circuitbench.bench import peak_rss_mib

        result["plain_peak_mib"] = peak_rss_mib(spec, batch, seq, threads, "plain", dev, dtype, checkpoint)
        result["ep_step_peak_mib"] = _ep_peak_mib(spec, batch, seq, threads, dev, dtype, checkpoint)
        result["memory_ep_over_plain"] = result["ep_step_peak_mib"] / max(result["plain_peak_mib"], 1e-9)
        for name, precision in (("acdc_batched_trial_peak_mib", "float32"),
                                ("acdc_pahq_batched_trial_peak_mib", "pahq")):
            result[name] = _acdc_peak_mib(spec, batch, seq, threads, precision, width, dev, dtype)
        result["memory_acdc_pahq_over_float32"] = (result["acdc_pahq_batched_trial_peak_mib"]
                                                   / max(result["acdc_batched_trial_peak_mib"], 1e-9))
    return result


def acdc_search_benchmark(spec="smollm2-135m", batch=32, seq=20, threads=1, repeats=1, memory=False,
                          progress=True, device="cpu", dtype=None, checkpoint=False, task="ioi", n_train=4,
                          tau=0.01, save=None) -> dict:
    """ACDC's trials per second one by one and batched, in one process on the same data.

    Runs ACDC's whole greedy search at ``tau`` (the ``quick`` preset otherwise) on ``n_train``
    training examples of ``task`` twice through the method registry: ``trial_batch=1`` (every
    trial its own pass), then the method's default width. Trials per second = the search's trials
    over its wall seconds (the ``search`` phase). Reports both, their ratio
    (``batched_trials_per_s_ratio``), the batched run's passes and copies, whether
    the two circuits are identical (``same_circuit``) and the largest difference of the loss
    increases, and the load average before and after each run (other processes on the machine
    slow a run down: compare runs under similar load). ``batch``, ``seq``, ``repeats``, ``memory``
    and ``checkpoint`` are accepted for the common signature and unused: the task fixes the data.
    ``save`` (a folder): write both circuits there (``sequential.json``, ``batched.json``, with the
    increase measured for every tried edge as its score).
    """
    import os
    import time

    from circuitbench.engine import MaskedModel
    from circuitbench.method import get_method
    from circuitbench.models import load_model
    from circuitbench.tasks import get_task

    info = hardware(device, dtype, False)
    torch.set_num_threads(threads)
    model = load_model(spec, device=info["device"], dtype=dtype)
    engine = MaskedModel(model)
    the_task = get_task(task)
    train = the_task.build(model.tokenizer, seed=0, n_train=n_train).train
    acdc = get_method("acdc")
    width = int(acdc.Config.trial_batch)
    result = {"model": spec, "task": task, "n_train": len(train), "tau": tau, "threads": threads, **info,
              "trial_batch": width}
    runs = {}
    for name, k in (("sequential", 1), ("batched", width)):
        load = os.getloadavg()
        start = time.perf_counter()
        res = acdc(preset="quick", taus=(tau,), trial_batch=k).discover(engine, the_task, train, None, [],
                                                                        progress=progress)
        wall = time.perf_counter() - start
        row = res.info["taus"][0]
        seconds = res.cost.wall_s["search"]
        runs[name] = next(iter(res.circuits.values()))
        result.update({f"{name}_trials": row["trials"], f"{name}_search_s": seconds, f"{name}_wall_s": wall,
                       f"{name}_trials_per_s": row["trials"] / seconds, f"{name}_passes": row.get("passes"),
                       f"{name}_copies": row.get("copies"), f"{name}_load_before": load[0],
                       f"{name}_load_after": os.getloadavg()[0]})
        if progress:
            print(f"  acdc {name} (trial_batch {k}): {row['trials']} trials in {seconds:.1f} s = "
                  f"{row['trials'] / seconds:.2f} trials/s (load {load[0]:.2f} -> {os.getloadavg()[0]:.2f})",
                  file=sys.stderr)
    a, b = runs["sequential"], runs["batched"]
    if save:
        from pathlib import Path

        Path(save).mkdir(parents=True, exist_ok=True)
        for name, circuit in runs.items():
            circuit.save(Path(save) / f"{name}.json")
    result["same_circuit"] = bool(torch.equal(a.edges, b.edges))
    both = ~torch.isnan(a.scores) & ~torch.isnan(b.scores)
    result["same_edges_tried"] = bool(torch.equal(torch.isnan(a.scores), torch.isnan(b.scores)))
    result["max_increase_difference"] = float((a.scores[both] - b.scores[both]).abs().max()) if both.any() else 0.0
    result["batched_trials_per_s_ratio"] = (result["batched_trials_per_s"]
                                            / result["sequential_trials_per_s"])
    return result


def ep_step_benchmark(spec="random:gpt2-small", batch=32, seq=20, threads=2, repeats=5, memory=True,
                      progress=True, device="cpu", dtype=None, checkpoint=False) -> dict:
    """One Edge Pruning training step on ``spec`` in absolute terms, beside the memory estimate.

    ``ep_step_s``: seconds per step (corrupted activations cached), from a 1-step and a
    (1 + ``repeats``)-step run of the method after an untimed warm-up run; ``setup_s``: the first run's preparation (corrupted
    pass and the full model's logits). ``peak_step_mib``: the longer run's peak above the memory
    held before it (the loaded model); ``peak_total_mib``: with the weights (CUDA: the allocator's
    peak; CPU: weights + step peak). ``estimate_*``: `circuitbench.costs.estimate_memory` for
    one device at this batch, length, dtype and checkpointing. ``memory`` is accepted for the
    common signature; memory is always measured here (in this process).
    """
    from circuitbench.costs import estimate_memory
    from circuitbench.models import ModelSpec

    info, model, mm, clean, corrupted, task, examples = _bench_setup(spec, batch, seq, threads, device, dtype,
                                                                     checkpoint)
    dev = info["device"]
    del clean, corrupted
    weights = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    step_s, costs = _ep_runs(mm, task, examples, True, max(1, repeats), warmup=True)
    cuda = torch.device(dev).type == "cuda"
    peak_step = costs[1].peak_memory_mib
    peak_total = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else (
        None if peak_step is None else weights / 2**20 + peak_step)
    result = {"model": spec, "batch": batch, "seq": seq, "threads": threads, "repeats": max(1, repeats), **info,
              "parameters": sum(p.numel() for p in model.hf_model.parameters()), "weights_mib": weights / 2**20,
              "ep_step_s": step_s, "setup_s": costs[0].wall_s.get("setup", float("nan")),
              "peak_step_mib": peak_step, "peak_total_mib": peak_total}
    config = ModelSpec.parse(spec).config() or model.hf_model.config
    try:
        est = estimate_memory(config, 1, batch, seq, info["dtype"], checkpoint)
    except Exception as err:  # a config the estimate cannot read: report the measurement alone
        result["estimate_error"] = str(err)
    else:
        result.update({f"estimate_{k}_mib": v / 2**20 for k, v in est.items()
                       if k not in ("edges", "mask_entries", "parameters")})
        if peak_total:
            result["estimate_over_measured"] = est["total"] / 2**20 / peak_total
    if progress:
        print(f"  ep step on {spec} ({dev}, {info['dtype']}, checkpointing {'on' if checkpoint else 'off'}, "
              f"batch {batch} x {seq}): {step_s * 1e3:.1f} ms/step, peak {peak_total or float('nan'):.0f} MiB "
              f"(estimate {result.get('estimate_total_mib', float('nan')):.0f} MiB)", file=sys.stderr)
    return result


if __name__ == "__main__":
    print(json.dumps(methods_benchmark()))
