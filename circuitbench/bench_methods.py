"""Method benchmarks: each method's unit of work against the plain model on the same batch.

Reported as ratios measured in one run (``circuitbench bench methods``), timing the methods' own code:

- ``ep_step_over_plain``: one Edge Pruning training step (mask sampling, masked forward, KL and
  Lagrangian, backward, both Adam updates; the mean over the steps of a short run of the method)
  with the corrupted activations cached, over one plain
  forward+backward (a language-modelling step with gradients to the weights; `circuitbench.bench`'s
  ``plain`` mode); ``ep_step_with_corrupted_over_plain``: the same step recomputing the corrupted
  pass (the full model's logits stay cached);
- ``acdc_trial_over_plain_forward``: one ACDC trial (remove one edge, restart the pass at its
  reader, KL on the batch) over one plain forward of the same examples; the per-slot times are
  weighted by how many edges enter the readers of each slot, i.e. averaged over the trials of a run
  in which every reader stays connected;
- ``eap_over_plain``: EAP on the batch (corrupted pass, masked forward, backward to the masks) over
  one plain forward+backward.

``*_frozen`` variants divide by a plain forward+backward with frozen weights (gradient to the input
embeddings only), the strictest baseline. ``memory`` adds the peak resident memory of an EP step
and of a plain step, each measured in a fresh process.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from . import metrics
from .bench import _setup, _step_fn, measure_peak_mib
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


def _median(step, repeats) -> float:
    step()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _ep_step_seconds(mm, task, examples, keep_corrupted, steps) -> float:
    """Seconds per Edge Pruning training step, from the method's own run (its ``train`` phase over
    ``steps`` steps, after a one-step warm-up run). The full model's logits are kept either way;
    ``keep_corrupted=False`` leaves too little cache memory for the corrupted activations, so every
    step redoes the corrupted pass."""
    from methods._common import BatchPlan
    from methods.edge_pruning import EdgePruning

    from .method import CostMeter

    probe = BatchPlan(mm, task, examples, len(examples), CostMeter(mm.device), cache_mib=0.0)
    cache_mib = float("inf") if keep_corrupted else probe.reference_mib() * 1.01 + 1e-6
    res = None
    for n in (1, steps):
        method = EdgePruning(steps=n, ramp_steps=0, batch_size=len(examples), log_every=10**9, cache_mib=cache_mib)
        res = method.discover(mm, task, examples, None, [0.5], progress=False)
    return res.cost.wall_s["train"] / steps


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


def _acdc_trial_times(mm, task, examples, repeats, progress):
    """Median seconds of one ACDC trial restarting at each read slot, and the slots' edge counts."""
    from methods._common import BatchPlan
    from methods.acdc import _mean_loss, _reader_order

    from .method import CostMeter

    g = mm.graph
    meter = CostMeter(mm.device)
    plan = BatchPlan(mm, task, examples, len(examples), meter, cache_mib=float("inf"), stack=True)
    full = g.full_mask(mm.dtype).to(mm.device)
    _mean_loss(mm, task, plan, full, 0, meter)  # fills the full model's writer stack
    visible = g.valid.sum(0)
    times, weights = {}, {}
    with torch.no_grad():
        for reader, slot in _reader_order(g):
            weights[slot] = weights.get(slot, 0) + int(visible[reader])
            if slot in times:
                continue
            mask = full.clone()
            mask[0, reader] = 0.0  # remove one edge into a reader of this slot
            times[slot] = _median(lambda: _mean_loss(mm, task, plan, mask, slot, meter), repeats)
            if progress:
                print(f"  acdc trial at slot {slot:<3}     {times[slot] * 1e3:9.1f} ms", file=sys.stderr)
    return times, weights


def _ep_peak_mib(spec, batch, seq, threads) -> float:
    code = (
        "import json,torch;"
        "from circuitbench.bench import _setup,measure_peak_mib;"
        "from circuitbench.bench_methods import _BenchTask,_examples,_ep_step_fn;"
        f"torch.set_num_threads({threads});"
        f"m,mm,c,x=_setup({spec!r},{batch},{seq});"
        "s=_ep_step_fn(mm,_BenchTask(),_examples(c,x,m.hf_model.config.vocab_size),True);"
        "s();"
        "print(json.dumps(measure_peak_mib(s)))"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def methods_benchmark(spec="random:gpt2-small", batch=32, seq=20, threads=2, repeats=5, memory=True,
                      progress=True) -> dict:
    torch.set_num_threads(threads)
    model, mm, clean, corrupted = _setup(spec, batch, seq)
    task = _BenchTask()
    examples = _examples(clean, corrupted, model.hf_model.config.vocab_size)
    hf = model.hf_model

    def say(name, seconds):
        if progress:
            print(f"  {name:<26} {seconds * 1e3:9.1f} ms (median of {repeats})", file=sys.stderr)

    t = {}
    for mode in ("plain", "plain_frozen"):
        t[mode] = _median(_step_fn(mode, model, mm, clean, corrupted), repeats)
        say(mode, t[mode])
    hf.requires_grad_(False)
    with torch.no_grad():
        t["plain_forward"] = _median(lambda: hf(clean), repeats)
    say("plain_forward", t["plain_forward"])
    t["ep_step"] = _ep_step_seconds(mm, task, examples, True, repeats)
    say("ep_step", t["ep_step"])
    t["ep_step_with_corrupted"] = _ep_step_seconds(mm, task, examples, False, repeats)
    say("ep_step_with_corrupted", t["ep_step_with_corrupted"])
    t["eap"] = _median(_eap_fn(mm, task, examples), repeats)
    say("eap", t["eap"])
    slot_times, weights = _acdc_trial_times(mm, task, examples, max(1, repeats // 2), progress)
    t["acdc_trial"] = sum(slot_times[s] * w for s, w in weights.items()) / sum(weights.values())
    say("acdc_trial (weighted)", t["acdc_trial"])

    result = {
        "model": spec, "batch": batch, "seq": seq, "threads": threads, "repeats": repeats,
        "device": "cpu", "torch": torch.__version__,
        **{f"{k}_s": v for k, v in t.items()},
        "ep_step_over_plain": t["ep_step"] / t["plain"],
        "ep_step_with_corrupted_over_plain": t["ep_step_with_corrupted"] / t["plain"],
        "acdc_trial_over_plain_forward": t["acdc_trial"] / t["plain_forward"],
        "eap_over_plain": t["eap"] / t["plain"],
        "ep_step_over_plain_frozen": t["ep_step"] / t["plain_frozen"],
        "ep_step_with_corrupted_over_plain_frozen": t["ep_step_with_corrupted"] / t["plain_frozen"],
        "eap_over_plain_frozen": t["eap"] / t["plain_frozen"],
        "acdc_trial_slowest_slot_over_plain_forward": max(slot_times.values()) / t["plain_forward"],
    }
    if memory:
        from .bench import _peak_rss_mib

        result["plain_peak_mib"] = _peak_rss_mib(spec, batch, seq, threads, "plain")
        result["ep_step_peak_mib"] = _ep_peak_mib(spec, batch, seq, threads)
        result["memory_ep_over_plain"] = result["ep_step_peak_mib"] / max(result["plain_peak_mib"], 1e-9)
    return result


if __name__ == "__main__":
    print(json.dumps(methods_benchmark()))
