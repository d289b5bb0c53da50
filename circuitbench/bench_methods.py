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
- ``eap_over_plain``: EAP on the batch (corrupted pass, masked forward, backward to the masks) over
  one plain forward+backward.

``*_frozen`` variants divide by a plain forward+backward with frozen weights (gradient to the input
embeddings only), the strictest baseline. ``memory`` adds the peak memory of an EP step and of a
plain step, each measured in a fresh process. Every ratio comes with the absolute medians
(``*_s``; ``acdc_trial_s``: the trial ratio times the plain forward's median). On a GPU
(``device``) every timed region is bracketed by ``torch.cuda.synchronize`` (`circuitbench.bench.timed`).

`ep_step_benchmark` (``circuitbench bench ep-step``) measures one Edge Pruning step of any model in
absolute terms: seconds per step, peak memory (CUDA: allocated device memory, weights included) and
`circuitbench.distributed.estimate_memory`'s estimate for the same batch, length, dtype and
gradient checkpointing, e.g. ``random:codellama-13b`` at the case study's batch 1 in bfloat16.
"""
from __future__ import annotations

import json
import statistics
import sys

import torch

from . import metrics
from .bench import _setup, _step_fn, hardware, measure_peak_mib, setup_source, timed
from .tasks.base import Examples, Task


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
    from methods._common import BatchPlan
    from methods.edge_pruning import EdgePruning

    from .method import CostMeter

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
    from methods.eap import attribution_scores

    from .method import CostMeter

    def run():
        attribution_scores(mm, task, examples, len(examples), [1.0], CostMeter(mm.device), progress=False)
    return run


def _acdc_trial_ratios(mm, task, examples, plain_forward, repeats, progress, device=None):
    """Per read slot: the ratio of one ACDC trial restarting there to a plain forward timed right
    before it, and the number of edges entering the readers of each slot. The first trial at a
    slot also computes what the slot's trials share (`methods.acdc.Trials`): its extra time is
    spread over the slot's trials, one per edge. Later trials are timed as rejected ones (the
    search's stack is the full model's again after each), median of ``repeats``."""
    from methods._common import BatchPlan
    from methods.acdc import Trials, _reader_order

    from .method import CostMeter

    g = mm.graph
    meter = CostMeter(mm.device)
    plan = BatchPlan(mm, task, examples, len(examples), meter, cache_mib=float("inf"), stack=True)
    full = g.full_mask(mm.dtype).to(mm.device)
    trials = Trials(mm, task, plan, meter)
    visible = g.valid.sum(0)
    first, steady, weights = {}, {}, {}
    with torch.no_grad():
        trials.full(full)  # fills the full model's writer stack
        for reader, slot in _reader_order(g):
            weights[slot] = weights.get(slot, 0) + int(visible[reader])
            if slot in steady:
                continue
            mask = full.clone()
            mask[0, reader] = 0.0  # remove one edge into a reader of this slot

            def trial():  # a rejected trial: the search goes on from the full model
                trials.loss(mask, reader, slot)
                trials.settle(False)
            base = _once(plain_forward, device)
            first[slot] = _once(trial, device) / base
            steady[slot] = statistics.median(_once(trial, device) / _once(plain_forward, device)
                                             for _ in range(repeats))
    ratios = {s: steady[s] + max(first[s] - steady[s], 0.0) / weights[s] for s in steady}
    if progress:
        for s, r in ratios.items():
            print(f"  acdc trial at slot {s:<3}     {r:6.3f} x plain forward (first at the slot {first[s]:.3f})",
                  file=sys.stderr)
    return ratios, weights


def _ep_peak_mib(spec, batch, seq, threads, device="cpu", dtype=None, checkpoint=False) -> float:
    """Peak memory of one Edge Pruning step (MiB), after a first step has built its state."""
    from .bench import peak_mib_in_fresh_process

    return peak_mib_in_fresh_process(threads, (
        setup_source(spec, batch, seq, device, dtype, checkpoint) + ";"
        "from circuitbench.bench_methods import _BenchTask,_examples,_ep_step_fn;"
        "s=_ep_step_fn(mm,_BenchTask(),_examples(c.cpu(),x.cpu(),m.hf_model.config.vocab_size),True);"
        "s()"), device)


def _bench_setup(spec, batch, seq, threads, device, dtype, checkpoint):
    """(hardware info, model, masked model, clean, corrupted, task, examples) for a benchmark."""
    info = hardware(device, dtype, checkpoint)
    torch.set_num_threads(threads)
    model, mm, clean, corrupted = _setup(spec, batch, seq, device=info["device"], dtype=dtype, checkpoint=checkpoint)
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
    plain_step = _step_fn("plain", model, mm, clean, corrupted)
    frozen_step = _step_fn("plain_frozen", model, mm, clean, corrupted)

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

    result = {
        "model": spec, "batch": batch, "seq": seq, "threads": threads, "repeats": repeats, **info,
        **{f"{k}_s": v for k, v in t.items()},
        **{k: statistics.median(v) for k, v in ratios.items()},
        "acdc_trial_over_plain_forward": acdc,
        "acdc_trial_slowest_slot_over_plain_forward": max(slot_ratios.values()),
        "acdc_trial_s": acdc * t["plain_forward"],
    }
    if memory:
        from .bench import _peak_rss_mib

        result["plain_peak_mib"] = _peak_rss_mib(spec, batch, seq, threads, "plain", dev, dtype, checkpoint)
        result["ep_step_peak_mib"] = _ep_peak_mib(spec, batch, seq, threads, dev, dtype, checkpoint)
        result["memory_ep_over_plain"] = result["ep_step_peak_mib"] / max(result["plain_peak_mib"], 1e-9)
    return result


def ep_step_benchmark(spec="random:gpt2-small", batch=32, seq=20, threads=2, repeats=5, memory=True,
                      progress=True, device="cpu", dtype=None, checkpoint=False) -> dict:
    """One Edge Pruning training step on ``spec`` in absolute terms, beside the memory estimate.

    ``ep_step_s``: seconds per step (corrupted activations cached), from a 1-step and a
    (1 + ``repeats``)-step run of the method after an untimed warm-up run; ``setup_s``: the first run's preparation (corrupted
    pass and the full model's logits). ``peak_step_mib``: the longer run's peak above the memory
    held before it (the loaded model); ``peak_total_mib``: with the weights (CUDA: the allocator's
    peak; CPU: weights + step peak). ``estimate_*``: `circuitbench.distributed.estimate_memory` for
    one device at this batch, length, dtype and checkpointing. ``memory`` is accepted for the
    common signature; memory is always measured here (in this process).
    """
    from .distributed import config_for_spec, estimate_memory

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
    config = config_for_spec(spec) or model.hf_model.config
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
