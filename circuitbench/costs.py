"""Cost estimates, before a job runs: time (the dry run's plan estimate) and memory per device.

Time. `estimate_plan` gives each unit of a runner plan its expected seconds: a configuration the
store already ran takes that run's measured time; otherwise its planned passes (`planned_passes`,
a method's own count when it declares one) x the seconds of one pass, measured from the store's
jobs of the same method, model and device, measured now on the model (`probe_pass_s`), or
assumed from the model's size (`assumed_forward_s`).

Memory. `estimate_memory(config, n_devices, batch, seq, dtype, checkpoint)` estimates the peak
bytes per device of Edge Pruning's training step from a transformers config alone (weights /
shards, the writer stack and its gradient, the corrupted cache, per-layer activations with or
without checkpointing, the masks and their Adam state), given a config without loading weights
(`circuitbench.models.ModelSpec.config`; `codellama_13b_config`: CodeLlama-13B's, without the hub).
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from .errors import UserError
from .store import ResultsStore
from .sweep import JobSpec
from .workbench import model_and_engine


# ---- time estimate ----------------------------------------------------------------------------------------
# The dry run's cost model. A masked forward pass over one example costs, per token, twice the
# model's non-embedding parameters (its matrix multiplies) plus twice edges x d_model (each reader
# sums its writers' outputs), plus a fixed per-layer overhead per pass; a backward pass costs two
# forwards. Throughputs are assumptions, not measurements of this machine: they are replaced by
# measurements as soon as the store holds finished jobs of the same method, model and device.
ASSUMED_FLOPS = {"cpu": 20e9, "cuda": 50e12}  # sustained float32 FLOP/s: a 2-core CPU; one modern GPU
ASSUMED_LAYER_OVERHEAD_S = {"cpu": 2e-3, "cuda": 2e-4}  # per layer and pass: kernel launches, Python
ASSUMED_TOKENS = 20  # tokens per example (the paper's tasks are 15-25 tokens; Tracr inputs ~5)
# name -> (layers, heads, kv heads, d_model, non-embedding parameters) for models known offline
KNOWN_SHAPES = {"gpt2": (12, 12, 12, 768, 85_000_000), "smollm2-135m": (30, 9, 3, 576, 106_000_000),
                "gemma3-270m": (18, 4, 1, 640, 100_000_000),
                "tracr:xproportion": (2, 1, 1, 16, 2_000), "tracr:reverse": (4, 1, 1, 32, 10_000)}


def model_shape(model: str) -> tuple[int, int, int, int, int] | None:
    """(layers, heads, kv heads, d_model, non-embedding parameters) without loading weights."""
    from . import models

    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    spec = models.ModelSpec.parse(model)
    if spec.known_random:
        family, kw = models.RANDOM_SHAPES[spec.name]
        if family == "gpt2":
            L, H, d = kw["n_layer"], kw["n_head"], kw["n_embd"]
            return L, H, H, d, L * 12 * d * d
        L, H, d = kw["num_hidden_layers"], kw["num_attention_heads"], kw["hidden_size"]
        kv = kw.get("num_key_value_heads", H)
        return L, H, kv, d, L * (d * d * (2 + 2 * kv / H) + 3 * d * kw["intermediate_size"])
    return None


def assumed_forward_s(model: str, device: str, batch: int) -> float | None:
    """Seconds for one masked forward pass over ``batch`` examples under the cost model above."""
    from .graph import Graph

    shape = model_shape(model)
    if shape is None:
        return None
    L, H, kv, d, params = shape
    edges = Graph(L, H, kv).n_edges
    from .models import ModelSpec

    tokens = 6 if ModelSpec.parse(model).kind == "tracr" else ASSUMED_TOKENS
    flops = batch * tokens * 2 * (params + edges * d)
    return ASSUMED_LAYER_OVERHEAD_S[device] * L + flops / ASSUMED_FLOPS[device]


# A dry run times the real model when it has no measurement in the store and the model is small enough
# to load here in seconds: one masked forward (evaluation) and one masked forward + backward to the
# masks (a training step) on a batch of the task's own examples.
PROBE_MAX_PARAMS = 2e9
_PROBED: dict = {}


def _loads_without_download(model: str) -> bool:
    """Whether ``model`` (and its tokenizer) load from this machine alone: a dry run never downloads."""
    from . import models
    from .models import smollm2

    spec = models.ModelSpec.parse(model)
    if spec.kind == "tracr":
        return True
    if spec.kind == "random":
        return spec.known_random and spec.name not in models.RANDOM_ON_DEVICE and (
            models.random_tokenizer(spec.name) == "synthetic" or smollm2.is_converted())
    if spec.kind == "embedded":
        return models.embedded_module(model).is_converted()
    return False


PROBE_BATCH = 16


def probe_pass_s(model: str, task_name: str, device: str, dtype: str, batch: int) -> tuple[float, float] | None:
    """(seconds of one masked forward without autograd, seconds of one masked forward + backward to the
    edge masks) on ``batch`` training examples of ``task_name``: measured now at that batch size (after a
    warm-up) up to `PROBE_BATCH` examples, larger batches scaled from `PROBE_BATCH` (a small batch is
    not a proportional share of a large one: fixed per-pass costs dominate it); None for a model too
    large to probe or one that cannot be loaded without a download."""
    probed = min(batch, PROBE_BATCH)
    key = (model, task_name, device, dtype, probed)
    if key not in _PROBED:
        _PROBED[key] = _probe(model, task_name, device, dtype, probed)
    if _PROBED[key] is None:
        return None
    per_forward, per_step = _PROBED[key]
    return per_forward * batch, per_step * batch


def _probe(model: str, task_name: str, device: str, dtype: str, batch: int) -> tuple[float, float] | None:
    """Seconds per example of a masked forward and of a masked forward + backward (`probe_pass_s`)."""
    import torch

    from .tasks import get_task
    from .tasks.base import DataSpec

    shape = model_shape(model)
    if shape is None or shape[4] > PROBE_MAX_PARAMS or not _loads_without_download(model):
        return None
    try:
        loaded, engine = model_and_engine(model, device, dtype)
        task = get_task(task_name)
        examples = DataSpec(0, batch).build(task, loaded.tokenizer).train
        b = examples.select(torch.arange(min(batch, len(examples)))).to(loaded.device)
    except UserError:
        return None
    ablation = getattr(task, "ablation", "interchange")
    g = loaded.graph

    def timed(fn):
        sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) / len(b)

    with torch.no_grad():
        cache = engine.corrupted_cache(b.corrupted, b.attention_mask, ablation=ablation)
        reference = engine.reference(b.clean, b.attention_mask, positions=b.positions)
    mask = torch.ones(g.n_writers, g.n_readers, device=loaded.device, dtype=engine.dtype)

    def forward():
        with torch.no_grad():
            engine(b.clean, attention_mask=b.attention_mask, edge_mask=mask, positions=b.positions,
                   ablation=ablation, corrupted=cache)

    def step():
        m = mask.clone().requires_grad_(True)
        logits = engine(b.clean, attention_mask=b.attention_mask, edge_mask=m, positions=b.positions,
                        ablation=ablation, corrupted=cache)
        task.loss(logits, reference, b).float().mean().backward()

    return timed(forward), timed(step)


def planned_passes(job: JobSpec, n_edges: int | None) -> tuple[float, float, int, str]:
    """(forward, backward, batch size, how) a job is expected to spend, in passes over a batch.

    A method may declare ``planned_passes(config: dict, n_train: int, n_edges: int | None,
    n_sparsities: int) -> (forward, backward)``; otherwise the count comes from its
    hyperparameters: a circuit-training method's ``steps`` (one forward and one backward each);
    ``taus`` (greedy search such as ACDC: one trial per edge and training batch per threshold,
    each trial half a forward pass on average as it restarts at the reader's layer: an upper
    bound, readers cut off from the output are skipped); else one forward and backward per
    training batch, times ``steps`` points on the path for integrated gradients.
    """
    n_sp = 1 if job.target_sparsity is not None else len(job.sparsities)
    return planned_passes_for(job.method, job.method_config, job.n_train, n_edges, n_sp)


def planned_passes_for(method: str, cfg: dict, n_train: int, n_edges: int | None,
                       n_sp: int) -> tuple[float, float, int, str]:
    """`planned_passes` of one method under the resolved hyperparameters ``cfg`` on ``n_train``
    training examples and ``n_sp`` sparsities of one job."""
    from .method import get_method

    cls = get_method(method)
    batch = max(1, min(int(cfg.get("batch_size") or 32), n_train))
    hook = getattr(cls, "planned_passes", None)
    if callable(hook):
        fwd, bwd = hook(cfg, n_train, n_edges, n_sp)
        return float(fwd), float(bwd), batch, "method's own count"
    batches = math.ceil(n_train / batch)
    if cls.produces == "circuits" and cfg.get("steps"):  # gradient training, one run per target
        return float(cfg["steps"]), float(cfg["steps"]), batch, f"{cfg['steps']} steps"
    if cfg.get("taus") or cfg.get("tau") is not None:
        n_taus = len(cfg["taus"]) if cfg.get("taus") else 1
        edges = n_edges or 1000
        return (0.5 * n_taus * edges * batches, 0.0, batch,
                f"<= {n_taus} tau x {edges} edges x {batches} batch{'es' if batches > 1 else ''} trials")
    reps = int(cfg.get("steps") or 1)  # integrated gradients: one pass per point on the path
    what = f"{batches} batch{'es' if batches > 1 else ''}" + (f" x {reps} IG steps" if reps > 1 else "")
    return float(batches * reps), float(batches * reps), batch, what


def _measured_rates(store: ResultsStore | None) -> tuple[dict, dict]:
    """From complete jobs: wall times by exact configuration, and seconds per example of one
    *planned* pass by (method, model, device type), and by (method, model, device type, task):
    training wall time (the job's wall less its
    circuits' evaluation) / ((forward + 2 backward) x batch size), forward and backward as
    `planned_passes_for` counts them for that job. Dividing by the planned count, not the passes
    the job recorded, calibrates a count that is only an upper bound: ACDC's one trial per edge
    (its searches try far fewer; readers cut off from the output are skipped, and a batched pass
    holds several trials), Edge Pruning's steps when the stopping rule ends stages early. A job
    whose method is no longer registered falls back to its recorded passes. The per-task rates let a
    task's own jobs calibrate its estimate: how far below the upper bound a search stays depends on
    the task (ACDC kept 60-93 edges alive at the end on gt and gp, tens of thousands for most of the
    search on ioi)."""
    by_config, per_example = {}, {}
    if store is None:
        return by_config, per_example
    df = store.runs()
    if not len(df):
        return by_config, per_example
    eval_by_job = df.groupby("job_id")["eval_s"].sum(min_count=1).to_dict()
    rows_by_job = df.groupby("job_id").size().to_dict()
    for row in df.drop_duplicates("job_id").to_dict(orient="records"):
        cfg = json.loads(row["config"])
        method_cfg = cfg.get("method_config") or {}
        dev = str(row["device"]).split(":")[0]
        key = (row["method"], json.dumps(method_cfg, sort_keys=True), row["task"], row["model"],
               row["n_train"], dev)
        wall = float(row["wall_total_s"] or 0.0)
        by_config.setdefault(key, []).append(wall)
        # a job trained for one target (independent runs) or for each of its circuits (a path, a search)
        n_sp = 1 if cfg.get("target_sparsity") is not None else int(rows_by_job.get(row["job_id"], 1))
        n_edges = int(row["total_edges"]) if row.get("total_edges") else None
        try:
            fwd, bwd, batch, _ = planned_passes_for(row["method"], method_cfg, int(row["n_train"]), n_edges, n_sp)
        except UserError:
            fwd, bwd = float(row["forward_passes"] or 0), float(row["backward_passes"] or 0)
            batch = max(1, min(int(method_cfg.get("batch_size") or 32), int(row["n_train"])))
        fe = fwd + 2 * bwd
        evaluated = eval_by_job.get(row["job_id"])  # NaN when no run of the job recorded eval_s
        train_wall = wall - (0.0 if evaluated is None or math.isnan(evaluated) else float(evaluated))
        if fe > 0 and train_wall > 0:
            for key in ((row["method"], row["model"], dev), (row["method"], row["model"], dev, row["task"])):
                per_example.setdefault(key, []).append(train_wall / (fe * batch))
        if row.get("eval_s") and row.get("n_examples"):
            # an evaluation batch is three passes: reference, corrupted and masked
            for key in (("evaluate", row["model"], dev), ("evaluate", row["model"], dev, row["task"])):
                per_example.setdefault(key, []).append(float(row["eval_s"]) / (3 * float(row["n_examples"])))
    return by_config, per_example


def estimate_plan(plan, store: ResultsStore | None, probe: bool = False) -> tuple[float, list[tuple[object, float, str]]]:
    """Estimated seconds per unit of a runner `Plan` and in total: (total, [(unit, seconds, basis)]).

    A job whose exact configuration (method settings, task, model, n_train, device) the store
    already ran takes that run's mean wall time ("measured"). Otherwise its planned passes
    (`planned_passes`) x seconds per pass: measured from the store's jobs of the same method,
    model and device when there are some (those on the job's task when it has some, else on every
    task); else, with ``probe``, measured now on the model and a
    batch of the task (`probe_pass_s`, models up to `PROBE_MAX_PARAMS`); else assumed
    (`assumed_forward_s`). Every circuit's
    evaluation adds three passes (reference, corrupted, masked) per test batch; a reference unit
    four.
    """
    from .tasks import get_task

    by_config, per_example = _measured_rates(store)
    dev = plan.device.split(":")[0]
    out, total = [], 0.0
    for unit in plan.units:
        item = unit.job if unit.job is not None else unit.reference
        task = get_task(item.task)
        n_test = int(task.sizes.get("test", 0))
        if item.eval_limit is not None:
            n_test = min(n_test, item.eval_limit)
        eval_batch = min(item.eval_batch_size, max(n_test, 1))
        eval_batches = math.ceil(n_test / eval_batch)

        def seconds(kind: str, batch: int, backward: bool = False):
            """Seconds of one pass (a training step is a forward and a backward: 1 + 2 passes;
            ``backward``: the pass is part of such a step)."""
            rates = per_example.get((kind, item.model, dev, item.task))
            if rates:
                return float(np.median(rates)) * batch, "measured (stored jobs on this task, per planned pass)"
            rates = per_example.get((kind, item.model, dev))
            if rates:
                return float(np.median(rates)) * batch, "measured (stored jobs on other tasks, per planned pass)"
            probed = probe_pass_s(item.model, item.task, plan.device, plan.dtype, batch) if probe else None
            if probed is not None:
                forward, step = probed
                return (step / 3 if backward else forward), "measured now"
            s = assumed_forward_s(item.model, dev, batch)
            return (s, "assumed") if s is not None else (None, "unknown model shape")

        eval_pass, eval_basis = seconds("evaluate", eval_batch)
        if unit.kind == "reference":
            secs = 4 * eval_batches * eval_pass if eval_pass is not None else float("nan")
            how = f"full + empty on {n_test} test examples ({eval_basis} pass time)"
        else:
            job = unit.job
            n_circuits = len(unit.sparsities) if unit.kind == "extend" else len(job.sparsities)
            secs = 3 * eval_batches * n_circuits * eval_pass if eval_pass is not None else float("nan")
            key = (job.method, json.dumps(job.method_config, sort_keys=True), job.task, job.model, job.n_train, dev)
            if unit.kind == "extend":
                how = f"{n_circuits} evaluation{'s' if n_circuits > 1 else ''} ({eval_basis} pass time)"
            elif key in by_config:
                secs += float(np.mean(by_config[key]))
                how = f"measured: {len(by_config[key])} stored run(s) of this configuration"
            else:
                shape = model_shape(job.model)
                n_edges = None
                if shape is not None:
                    from .graph import Graph
                    n_edges = Graph(*shape[:3]).n_edges
                fwd, bwd, batch, what = planned_passes(job, n_edges)
                pass_s, basis = seconds(job.method, batch, backward=bwd > 0)
                secs = secs + (fwd + 2 * bwd) * pass_s if pass_s is not None else float("nan")
                how = f"{what} x {basis} pass time"
        out.append((unit, secs, how))
        total += secs
    return total, out


def format_seconds(s: float) -> str:
    if math.isnan(s):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ---- memory estimate -----------------------------------------------------------------------------------
def codellama_13b_config():
    """CodeLlama-13B(-Instruct)'s transformers config, from its published shape (no hub access; the
    shape of ``random:codellama-13b``)."""
    from .models import random_config

    return random_config("codellama-13b")


def _shape(config) -> dict:
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
    L = get("num_hidden_layers", "n_layer")
    H = get("num_attention_heads", "n_head")
    d = get("hidden_size", "n_embd")
    G = get("num_key_value_heads") or H
    ffn = get("intermediate_size", "n_inner") or 4 * d
    V = get("vocab_size")
    dh = get("head_dim") or d // H
    tied = bool(getattr(config, "tie_word_embeddings", True))
    if None in (L, H, d, V):
        raise UserError("the config lacks layers / heads / hidden size / vocabulary size")
    return dict(L=L, H=H, G=G, d=d, ffn=ffn, V=V, dh=dh, tied=tied,
                llama=getattr(config, "model_type", "") in ("llama", "mistral", "codellama"))


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def estimate_memory(config, n_devices: int = 1, batch: int = 1, seq: int = 128, dtype: str = "bfloat16",
                    checkpoint: bool = True) -> dict:
    """Peak memory per device (bytes) of Edge Pruning's training step, from a transformers config.

    ``n_devices``: ranks the frozen weights are sharded over (FSDP; 1 = unsharded). ``batch``:
    examples each device runs per step (its shard of the global batch); ``seq``: tokens per example.
    Returns a dict of components and ``total`` (bytes), plus ``edges`` and ``mask_entries``:

    * ``weights``: all parameters / n_devices, plus the two largest FSDP units gathered at once
      (the one running and the one prefetched) when sharded;
    * ``writer_stack``: the stack D [W, B*S*d] (model dtype) and ``writer_stack_grad`` its gradient;
    * ``corrupted_cache``: the corrupted writers and residuals of the batch [W + 2L + 1, B*S*d];
    * ``activations``: what autograd keeps of the masked pass: every layer's (per-reader inputs,
      their norms, q/k/v, attention outputs, MLP intermediates), or with ``checkpoint`` each layer's
      input plus one layer's worth being recomputed;
    * ``masks``: log alphas of every [W, R] entry and per writer (float32), their gradients, Adam's two
      moments, the sampled masks, and the all-reduce buffer;
    * ``logits``: the scored position's logits (float32, full model and circuit).
    """
    from .graph import Graph

    if n_devices < 1 or batch < 1 or seq < 1:
        raise UserError("n_devices, batch and seq must be at least 1")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    s = _shape(config)
    L, H, G, d, ffn, V, dh = s["L"], s["H"], s["G"], s["d"], s["ffn"], s["V"], s["dh"]
    e = DTYPE_BYTES[dtype]
    graph = Graph(L, H, G)
    W, R = graph.n_writers, graph.n_readers
    attn_params = d * H * dh * 2 + 2 * d * G * dh + d
    mlp_params = (3 if s["llama"] else 2) * d * ffn + d
    embed_params = V * d
    head_params = (0 if s["tied"] else V * d) + d
    n_params = L * (attn_params + mlp_params) + embed_params + head_params
    weights = n_params * e / n_devices
    if n_devices > 1:  # the running unit and the prefetched one are whole while in use
        weights += 2 * max(attn_params, mlp_params, embed_params, head_params) * e
    tokens = batch * seq
    N = tokens * d  # one writer's row of the stack
    stack = W * N * e
    corrupted = (W + 2 * L + 1) * N * e
    n_attn = H + 2 * G
    # per layer, kept for backward: per-reader inputs, their float32 norm intermediates and normed
    # copies, q/k/v before and after rotary, the attention output (+ its logsumexp), and the MLP's
    # input, norm, gate, up and activation
    per_layer = (n_attn * N * (e + 4 + e) + 2 * n_attn * tokens * dh * e + H * tokens * (dh * e + 4)
                 + N * (e + 4 + e) + 3 * tokens * ffn * e)
    activations = (L * N * e + per_layer) if checkpoint else L * per_layer
    entries = W * R + W
    masks = entries * 4 * 7  # log alpha, grad, 2 Adam moments, sample, effective mask, all-reduce buffer
    logits = 2 * batch * V * 4
    out = {"weights": weights, "writer_stack": stack, "writer_stack_grad": stack, "corrupted_cache": corrupted,
           "activations": activations, "masks": masks, "logits": logits}
    out["total"] = sum(out.values())
    out.update(edges=graph.n_edges, mask_entries=entries, parameters=n_params)
    return out


def acdc_seconds(config, n_examples: int, seq: int, flops_per_s: float) -> dict:
    """How long ACDC's greedy search takes: one trial (a masked forward pass over the training
    examples, restarted at the reader's layer: half the layers on average) per edge."""
    from .graph import Graph

    s = _shape(config)
    graph = Graph(s["L"], s["H"], s["G"])
    n_params = s["L"] * (2 * s["d"] * s["H"] * s["dh"] + 2 * s["d"] * s["G"] * s["dh"] + 3 * s["d"] * s["ffn"])
    trial_s = 0.5 * 2 * n_params * n_examples * seq / flops_per_s
    return {"trials": graph.n_edges, "seconds_per_trial": trial_s, "total_s": graph.n_edges * trial_s}


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_estimate(spec: str, config, n_devices: int, batch: int, seq: int, dtype: str, checkpoint: bool,
                    acdc_examples: int = 100, flops_per_s: float = 1e14) -> str:
    """The dry-run lines: memory per device for Edge Pruning and ACDC's expected run time."""
    est = estimate_memory(config, n_devices, batch, seq, dtype, checkpoint)
    parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(est[k])}" for k in
                      ("weights", "writer_stack", "writer_stack_grad", "corrupted_cache", "activations", "masks"))
    other = estimate_memory(config, n_devices, batch, seq, dtype, not checkpoint)["total"]
    acdc = acdc_seconds(config, acdc_examples, seq, flops_per_s)
    return (f"memory per device, {spec}: ~{format_bytes(est['total'])} for Edge Pruning "
            f"({est['parameters'] / 1e9:.2f}B parameters, {est['edges']:,} edges; {n_devices} device(s), "
            f"batch {batch} x {seq} tokens per device, {dtype}, gradient checkpointing "
            f"{'on' if checkpoint else 'off'}; {format_bytes(other)} with it {'off' if checkpoint else 'on'}): "
            f"{parts}\n"
            f"ACDC on {spec}: ~{acdc['trials']:,} trials (one per edge) x {acdc['seconds_per_trial']:.3g} s per "
            f"trial ({acdc_examples} examples x {seq} tokens at {flops_per_s / 1e12:g} TFLOP/s) = "
            f"{acdc['total_s'] / 86400:.3g} days per threshold")


def memory_lines(models, dtype: str, checkpoint: bool = False, n_devices: int = 1, batch: int = 1,
                 seq: int = 128) -> list[str]:
    """`format_estimate` lines for the Llama-family models among ``models`` whose config is known
    offline (what ``circuitbench run --dry-run`` prints)."""
    from .models import ModelSpec

    lines = []
    for spec in models:
        config = ModelSpec.parse(spec).config()
        if config is not None and getattr(config, "model_type", "") in ("llama", "mistral"):
            lines.append(format_estimate(spec, config, n_devices, batch, seq, dtype, checkpoint))
    return lines
