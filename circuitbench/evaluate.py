"""The evaluator: every metric of a task for one circuit (or several), on one split, batched.

``evaluate(model, task, circuit)`` builds the task's splits for the model's tokenizer, and for each
batch runs the full model once (the reference), the corrupted input once (cached for the masked
pass), and the masked model with the circuit's edges; the task scores each example and the values
are averaged over the split. With ``references=True`` the full model and the empty circuit
(every edge removed, i.e. the corrupted run) are scored on the same batches, under the keys
``full/<metric>`` and ``empty/<metric>``. ``evaluate_many`` scores several circuits on the same
batches, sharing each batch's reference and corrupted passes.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import UserError


def _resolve(model, task, circuit):
    """(LoadedModel, Task, Circuit) from objects or names, with clear errors."""
    from .circuit import Circuit
    from .models import load_model
    from .tasks import Task, get_task

    if isinstance(model, str):
        model = load_model(model)
    if isinstance(task, str):
        task = get_task(task)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task or a task name, got {type(task).__name__}")
    graph = model.graph
    if isinstance(circuit, str):
        if circuit == "full":
            circuit = Circuit.full(graph)
        elif circuit == "empty":
            circuit = Circuit.empty(graph)
        else:
            circuit = Circuit.load(circuit, graph)
    if not isinstance(circuit, Circuit):
        raise TypeError(f"circuit must be a Circuit, 'full', 'empty' or a file path, got {type(circuit).__name__}")
    if circuit.graph != graph:
        raise UserError(f"the circuit is over a graph of {circuit.graph.n_layers} layers x {circuit.graph.n_heads} "
                        f"heads; the model's has {graph.n_layers} x {graph.n_heads}")
    return model, task, circuit


def evaluate(model, task, circuit, split: str = "test", batch_size: int = 32, limit: int | None = None,
             seed: int = 0, progress: bool = True, references: bool = False,
             examples=None, n_train: int | None = None, n_validation: int | None = None) -> dict[str, float]:
    """Mean of every metric of ``task`` for ``circuit`` over a split.

    ``model``: a `LoadedModel` (or a model spec); ``task``: a `Task` (or a task name); ``circuit``:
    a `Circuit`, ``"full"``, ``"empty"`` or a circuit file. ``split``: train, validation or test,
    built with ``seed`` and the split sizes ``n_train``, ``n_validation`` (None: the task's own; a
    job's test split depends on its sizes: `circuitbench.tasks.base.DataSpec`); ``limit``: only its first ``limit`` examples; ``examples``: score these
    `Examples` instead of building a split. Returns ``{metric: mean}`` plus ``n_examples``, and with
    ``references=True`` also ``full/<metric>`` and ``empty/<metric>``.
    """
    out = evaluate_many(model, task, {"circuit": circuit}, split, batch_size, limit, seed, progress, references,
                        examples, n_train=n_train, n_validation=n_validation)["circuit"]
    out.pop("eval_s")
    return out


@torch.no_grad()
def evaluate_many(model, task, circuits: dict, split: str = "test", batch_size: int = 32, limit: int | None = None,
                  seed: int = 0, progress: bool = True, references: bool = False,
                  examples=None, n_train: int | None = None,
                  n_validation: int | None = None) -> dict[object, dict[str, float]]:
    """`evaluate` for several circuits on the same examples: each batch's full-model reference and
    corrupted cache are computed once and shared by every circuit's masked pass, so k circuits cost
    2 + k passes per batch instead of 3k; each circuit's values are those `evaluate` gives it alone.

    ``circuits``: ``{key: circuit}`` (anything `evaluate` takes). Returns ``{key: {metric: mean,
    "n_examples": n, "eval_s": seconds}}``, ``eval_s`` being the circuit's own masked passes plus an
    equal share of the shared ones.
    """
    from .engine import MaskedModel
    from .tasks.base import DataSpec

    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if not circuits:
        return {}
    resolved = {}
    for key, circuit in circuits.items():
        model, task, resolved[key] = _resolve(model, task, circuit)
    if examples is None:
        if split not in ("train", "validation", "test"):
            raise UserError(f"unknown split {split!r}: choose train, validation or test")
        splits = DataSpec(seed, n_train, n_validation).build(task, model.tokenizer)
        examples = splits.split(split) if limit is None else splits.head(split, limit)
    elif limit is not None:
        examples = examples.select(slice(0, limit))
    if len(examples) == 0:
        raise UserError(f"task {task.name} has no {split} examples for this model's tokenizer")

    engine = MaskedModel(model)
    device = engine.device
    masks = {key: c.edge_mask(device=device) for key, c in resolved.items()}
    empty_mask = torch.zeros(model.graph.n_writers, model.graph.n_readers, device=device) if references else None
    sums: dict[object, dict[str, float]] = {key: {} for key in resolved}
    seconds = {key: 0.0 for key in resolved}
    shared = 0.0
    n_total = len(examples)
    n_batches = math.ceil(n_total / batch_size)
    bar = tqdm(examples.batches(batch_size), total=n_batches, desc=f"evaluate {task.name}/{split}",
               unit="batch", disable=not progress, leave=False)
    for batch in bar:
        t0 = time.perf_counter()
        batch = batch.to(device)
        clean, mask, positions = batch.clean, batch.attention_mask, batch.positions
        full = engine.reference(clean, attention_mask=mask, positions=positions)
        cache = engine.corrupted_cache(batch.corrupted, attention_mask=mask, ablation=task.ablation)
        shared += time.perf_counter() - t0
        for key, circuit in resolved.items():
            t0 = time.perf_counter()
            logits = engine(clean, attention_mask=mask, edge_mask=masks[key], positions=positions,
                            ablation=task.ablation, corrupted=cache)
            _accumulate(sums[key], "", task.score(logits, full, batch))
            if references:
                _accumulate(sums[key], "full/", task.score(full, full, batch))
                if circuit.n_edges == 0:  # the same masked pass as the circuit's: do not run it twice
                    empty = logits
                else:
                    empty = engine(clean, attention_mask=mask, edge_mask=empty_mask, positions=positions,
                                   ablation=task.ablation, corrupted=cache)
                _accumulate(sums[key], "empty/", task.score(empty, full, batch))
            seconds[key] += time.perf_counter() - t0
    out = {}
    for key in resolved:
        values = {name: value / n_total for name, value in sums[key].items()}
        values["n_examples"] = float(n_total)
        values["eval_s"] = seconds[key] + shared / len(resolved)
        out[key] = values
    return out


def _accumulate(sums: dict[str, float], prefix: str, scores: dict[str, Any]) -> None:
    for name, values in scores.items():
        key = prefix + name
        sums[key] = sums.get(key, 0.0) + float(values.detach().double().sum())


def format_table(values: dict[str, float], metrics: tuple[str, ...]) -> str:
    """A plain-text table: one row per metric; columns circuit, full model and empty circuit (when
    the references are present)."""
    columns = [("circuit", "")]
    if any(k.startswith("full/") for k in values):
        columns.append(("full model", "full/"))
    if any(k.startswith("empty/") for k in values):
        columns.append(("empty circuit", "empty/"))
    width = max(len(m) for m in metrics) if metrics else 6
    header = f"{'metric':<{width}}" + "".join(f"  {title:>13}" for title, _ in columns)
    lines = [header, "-" * len(header)]
    for metric in metrics:
        row = f"{metric:<{width}}"
        for _, prefix in columns:
            value = values.get(prefix + metric)
            row += f"  {'' if value is None else f'{value:.4f}':>13}"
        lines.append(row)
    return "\n".join(lines)
