"""Engine benchmarks: the masked pass against the plain model on the same batch.

Reported as ratios measured in one run, so they compare across machines:

- ``masked_over_plain``: masked forward+backward (gradients to the edge and node masks only,
  weights frozen, corrupted activations cached, KL at the last position) over the plain model's
  forward+backward (a language-modelling step: logits at every position, gradients to the weights);
- ``masked_over_plain_frozen``: the same masked step over a plain forward+backward with frozen
  weights (gradient to the input embeddings only), the strictest baseline;
- ``masked_with_corrupted_over_plain``: the masked step including the corrupted pass;
- ``*_peak_mib`` and ``memory_masked_over_plain``: peak memory of each step above the loaded model
  and batch, each measured in a fresh process (CPU: resident memory; CUDA: allocated device memory);
- forward passes without autograd (evaluation, ACDC's trials): ``eval_masked_over_plain`` = the
  masked pass with every edge kept (every node live) over the plain model's forward, and
  ``eval_sparse_over_full`` = the masked pass of a sparse circuit (2% of the edges, among a quarter
  of the nodes) over the masked pass with every edge kept: the engine skips the nodes no kept edge
  path leads from to the logits.

Every ratio comes with the absolute median seconds per step (``*_s``) it was computed from.
``device`` (``--device cuda``) runs everything on a GPU: timed regions are bracketed by
``torch.cuda.synchronize`` (kernels run asynchronously, so a timer must wait for them), and
``dtype``/``checkpoint`` load the model in another dtype and run the masked pass with gradient
checkpointing.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .errors import UserError

# ---- the registry of benchmarks (``circuitbench bench NAME``) -----------------------------------------
@dataclass(frozen=True)
class Benchmark:
    """A benchmark ``circuitbench bench`` runs: ``target`` is "module:function", called as
    ``function(model, batch, seq, threads, repeats, memory=, progress=, device=, dtype=, checkpoint=)``
    (plus ``task=, n_train=, tau=, save=`` when ``search``: it searches a real task's training split)."""

    name: str
    target: str
    default_model: str = "random:gpt2-small"
    search: bool = False


_BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(bench: Benchmark) -> Benchmark:
    """Make ``bench`` available to ``circuitbench bench``. The engine's own is registered here; a method
    package registers its micro-benchmarks when it is imported (the built-in ones: `methods.benchmarks`)."""
    other = _BENCHMARKS.get(bench.name)
    if other is not None and other != bench:
        raise ValueError(f"benchmark {bench.name!r} registered twice ({other.target}, {bench.target})")
    _BENCHMARKS[bench.name] = bench
    return bench


def list_benchmarks() -> dict[str, Benchmark]:
    """Every registered benchmark by name, the registered methods' packages loaded first."""
    from .method import list_methods

    list_methods()
    return dict(sorted(_BENCHMARKS.items()))


def get_benchmark(name: str) -> Benchmark:
    known = list_benchmarks()
    if name not in known:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(known)}")
    return known[name]


MODES = ("plain", "plain_frozen", "masked", "masked_with_corrupted", "eval_plain", "eval_masked", "eval_sparse")


def sparse_circuit(graph, seed=0, node_share=0.25, edge_share=0.02) -> torch.Tensor:
    """A seeded random circuit: ``edge_share`` of the graph's edges, all among ``node_share`` of the
    writers (the logits reader always reads), as a float [W, R] mask."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(graph.n_writers, generator=gen) < node_share
    chosen[0] = True
    allowed = graph.valid & chosen[:, None]
    p = min(1.0, edge_share * graph.n_edges / max(int(allowed.sum()), 1))
    return ((torch.rand(graph.n_writers, graph.n_readers, generator=gen) < p) & allowed).float()


def setup(spec, batch, seq, seed=0, device="cpu", dtype=None, checkpoint=False):
    """(model, engine, clean ids, corrupted ids): the ids are seeded random tokens on the device."""
    from .engine import MaskedModel
    from .models import load_model

    model = load_model(spec, device=device, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.hf_model.config.vocab_size
    clean = torch.randint(0, vocab, (batch, seq), generator=gen).to(model.device)
    corrupted = torch.randint(0, vocab, (batch, seq), generator=gen).to(model.device)
    return model, MaskedModel(model, checkpoint=checkpoint), clean, corrupted


def step_fn(mode, model, mm, clean, corrupted):
    """A zero-argument callable doing one step of ``mode``."""
    g = model.graph
    hf = model.hf_model
    if mode == "plain":
        hf.requires_grad_(True)

        def step():
            hf.zero_grad(set_to_none=True)
            logits = hf(clean).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), clean[:, 1:].flatten())
            loss.backward()
        return step
    if mode == "plain_frozen":
        hf.requires_grad_(False)
        emb = hf.get_input_embeddings()

        def step():
            x = emb(clean).detach().requires_grad_(True)
            logits = hf(inputs_embeds=x).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), clean[:, 1:].flatten())
            loss.backward()
        return step
    hf.requires_grad_(False)
    dev = clean.device
    positions = torch.full((clean.shape[0],), clean.shape[1] - 1, device=dev)
    if mode.startswith("eval_"):
        if mode == "eval_plain":
            return torch.no_grad()(lambda: hf(clean).logits[:, -1])
        cache = mm.corrupted_cache(corrupted)
        mask = sparse_circuit(g).to(dev) if mode == "eval_sparse" else None
        return torch.no_grad()(lambda: mm(clean, edge_mask=mask, positions=positions, corrupted=cache))
    edge = torch.full((g.n_writers, g.n_readers), 0.9, device=dev, requires_grad=True)
    node = torch.full((g.n_writers,), 0.95, device=dev, requires_grad=True)
    ref = mm.reference(clean, positions=positions).log_softmax(-1)
    cache = mm.corrupted_cache(corrupted) if mode == "masked" else None

    def step():
        edge.grad = node.grad = None
        c = cache if cache is not None else mm.corrupted_cache(corrupted)
        out = mm(clean, edge_mask=edge, node_mask=node, positions=positions, corrupted=c)
        loss = torch.nn.functional.kl_div(out.log_softmax(-1), ref, log_target=True, reduction="batchmean")
        loss.backward()
    return step


def synchronize(device=None) -> None:
    """Wait until ``device`` has finished its queued work (CUDA runs kernels asynchronously); a
    no-op on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device=None) -> float:
    """Wall seconds of one ``step()``, including the device work it queued."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - t0


def median_seconds(step, repeats: int, device=None) -> float:
    """Median wall time of ``step()`` over ``repeats`` calls, after one warm-up call; on a GPU each
    call is bracketed by synchronisations (`timed`)."""
    step()
    return statistics.median(timed(step, device) for _ in range(repeats))


def time_modes(spec="random:gpt2-small", batch=32, seq=20, threads=2, repeats=5, modes=MODES,
               progress=True, device="cpu", dtype=None, checkpoint=False) -> dict:
    """Median seconds per step of each mode, all measured in this process on the same batch."""
    torch.set_num_threads(threads)
    model, mm, clean, corrupted = setup(spec, batch, seq, device=device, dtype=dtype, checkpoint=checkpoint)
    times = {}
    for mode in modes:
        times[mode] = median_seconds(step_fn(mode, model, mm, clean, corrupted), repeats, model.device)
        if progress:
            print(f"  {mode:<24} {times[mode] * 1e3:9.1f} ms/step (median of {repeats})", file=sys.stderr)
    return times


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_mib(step, device=None) -> float:
    """Peak memory growth of ``step()`` above the memory held before it (MiB).

    CPU: resident memory; resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux) so
    earlier peaks of model loading do not hide the step's own. CUDA: memory allocated on the device
    (the allocator's peak counter, reset first).
    """
    import gc

    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def peak_mib_in_fresh_process(threads: int, make_step: str, device=None) -> float:
    """Peak memory of one step (MiB), measured in a fresh process so allocator caches of other
    measurements do not interfere. ``make_step`` is Python source that defines the step ``s``."""
    code = (
        "import json,torch;"
        "from circuitbench.bench import measure_peak_mib;"
        f"torch.set_num_threads({threads});"
        f"{make_step};"
        f"print(json.dumps(measure_peak_mib(s, {None if device is None else str(device)!r})))"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def setup_source(spec, batch, seq, device="cpu", dtype=None, checkpoint=False) -> str:
    """Python source that runs `setup` with these arguments into ``m, mm, c, x``."""
    return (f"from circuitbench.bench import setup;m,mm,c,x=setup({spec!r},{batch},{seq},device={str(device)!r},"
            f"dtype={None if dtype is None else str(dtype)!r},checkpoint={bool(checkpoint)!r})")


def peak_rss_mib(spec, batch, seq, threads, mode, device="cpu", dtype=None, checkpoint=False) -> float:
    """Peak memory of one step of ``mode`` (MiB)."""
    return peak_mib_in_fresh_process(threads, setup_source(spec, batch, seq, device, dtype, checkpoint) +
                                     f";from circuitbench.bench import step_fn;s=step_fn({mode!r},m,mm,c,x)",
                                     device)


def hardware(device, dtype, checkpoint) -> dict:
    """The fields every benchmark result records about where it ran."""
    from .models import resolve_device, resolve_dtype
    from .workbench import device_name

    dev = str(resolve_device(device))
    return {"device": dev, "device_name": device_name(dev),
            "dtype": str(resolve_dtype(dtype)).replace("torch.", ""), "checkpoint": bool(checkpoint),
            "torch": torch.__version__}


def engine_benchmark(spec="random:gpt2-small", batch=32, seq=20, threads=2, repeats=5, memory=True,
                     progress=True, device="cpu", dtype=None, checkpoint=False) -> dict:
    info = hardware(device, dtype, checkpoint)
    t = time_modes(spec, batch, seq, threads, repeats, progress=progress, device=info["device"], dtype=dtype,
                   checkpoint=checkpoint)
    result = {
        "model": spec, "batch": batch, "seq": seq, "threads": threads, "repeats": repeats, **info,
        "plain_s": t["plain"], "plain_frozen_s": t["plain_frozen"], "masked_s": t["masked"],
        "masked_with_corrupted_s": t["masked_with_corrupted"],
        "masked_over_plain": t["masked"] / t["plain"],
        "masked_over_plain_frozen": t["masked"] / t["plain_frozen"],
        "masked_with_corrupted_over_plain": t["masked_with_corrupted"] / t["plain"],
        "eval_plain_s": t["eval_plain"], "eval_masked_s": t["eval_masked"], "eval_sparse_s": t["eval_sparse"],
        "eval_masked_over_plain": t["eval_masked"] / t["eval_plain"],
        "eval_sparse_over_full": t["eval_sparse"] / t["eval_masked"],
    }
    if memory:
        for mode in ("plain", "masked"):
            result[f"{mode}_peak_mib"] = peak_rss_mib(spec, batch, seq, threads, mode, info["device"], dtype,
                                                       checkpoint)
            if progress:
                print(f"  {mode:<24} {result[f'{mode}_peak_mib']:9.1f} MiB peak above the loaded model",
                      file=sys.stderr)
        result["memory_masked_over_plain"] = result["masked_peak_mib"] / max(result["plain_peak_mib"], 1e-9)
    return result


if __name__ == "__main__":
    print(json.dumps(engine_benchmark()))


register_benchmark(Benchmark("engine", "circuitbench.bench:engine_benchmark"))
