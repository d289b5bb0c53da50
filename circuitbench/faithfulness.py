"""Edge faithfulness (paper appendix D, figure 7): does each edge matter in the circuit as it does
in the model? An evaluation step, run after discovery; the report draws what it recorded.

For every edge e of a circuit C, on a task's split:

* ``model_without``   = loss(model ‖ model without e): the full model with only e removed;
* ``circuit_without`` = loss(model ‖ C without e): the circuit with e removed as well;

where loss is the task's faithfulness loss (`Task.loss`: KL(full ‖ ·) at the scored positions, MSE
for numeric Tracr output), averaged over the examples, with the task's ablation. `edge_faithfulness`
computes one study and returns an `EdgeFaithfulnessResult`; `ResultsStore.record` writes it to the
store's ``edge_faithfulness`` table (a study of the same circuit and setting is replaced).
`circuitbench report --edge-faithfulness CIRCUIT` runs this step, then rebuilds the report
(`circuitbench.report.edge_faithfulness` draws the stored rows).
"""
from __future__ import annotations

from .errors import UserError
from .result import EdgeFaithfulnessResult

DEFAULT_LIMIT = 256


def edge_faithfulness(model, task, circuit, *, model_name: str, circuit_name: str, run_id: str | None = None,
                      circuit_file: str | None = None, split: str = "test", limit: int | None = DEFAULT_LIMIT,
                      batch_size: int = 32, seed: int = 0, progress: bool = True, n_train: int | None = None,
                      n_validation: int | None = None) -> EdgeFaithfulnessResult:
    """Both losses for every edge of ``circuit`` (a `Circuit` over ``model``'s graph), on ``split`` of
    the data built with ``seed`` and the split sizes ``n_train``, ``n_validation`` (a stored run's:
    its job's; None: the task's own), the first ``limit`` examples (None: all). ``model_name`` (the
    model spec), ``circuit_name``, ``run_id`` and ``circuit_file`` label the study.
    Cost: 2 masked passes per edge and batch, plus one."""
    import torch
    from tqdm.auto import tqdm

    from .engine import MaskedModel
    from .store import now_iso
    from .tasks.base import DataSpec

    if circuit.graph != model.graph:
        raise UserError("the circuit is over a different graph than the model's")
    if circuit.n_edges == 0:
        raise UserError("the circuit has no edges; nothing to measure")
    splits = DataSpec(seed, n_train, n_validation).build(task, model.tokenizer)
    examples = splits.split(split) if limit is None else splits.head(split, limit)
    if len(examples) == 0:
        raise UserError(f"task {task.name} has no {split} examples for this model")
    engine = MaskedModel(model)
    device = engine.device
    full_mask = model.graph.full_mask().to(device)
    circuit_mask = circuit.edge_mask(device=device)
    edges = circuit.edges.nonzero().tolist()
    names = [model.graph.edge_name(i, j) for i, j in edges]
    batches = []
    with torch.no_grad():
        for batch in examples.batches(batch_size):
            batch = batch.to(device)
            full = engine.reference(batch.clean, attention_mask=batch.attention_mask, positions=batch.positions)
            cache = engine.corrupted_cache(batch.corrupted, attention_mask=batch.attention_mask,
                                           ablation=task.ablation)
            batches.append((batch, full, cache))
        model_without = torch.zeros(len(edges), dtype=torch.float64)
        circuit_without = torch.zeros(len(edges), dtype=torch.float64)
        circuit_loss = 0.0
        bar = tqdm(total=len(edges) * len(batches), desc=f"edge faithfulness ({len(edges)} edges)", unit="edge",
                   disable=not progress)

        def loss_of(batch, full, cache, mask) -> float:
            logits = engine(batch.clean, attention_mask=batch.attention_mask, edge_mask=mask,
                            positions=batch.positions, ablation=task.ablation, corrupted=cache)
            return float(task.loss(logits, full, batch).double().sum())

        for batch, full, cache in batches:
            circuit_loss += loss_of(batch, full, cache, circuit_mask)
            for k, (i, j) in enumerate(edges):
                full_mask[i, j] = 0.0
                circuit_mask[i, j] = 0.0
                model_without[k] += loss_of(batch, full, cache, full_mask)
                circuit_without[k] += loss_of(batch, full, cache, circuit_mask)
                full_mask[i, j] = 1.0
                circuit_mask[i, j] = 1.0
                bar.update(1)
        bar.close()
    n = len(examples)
    return EdgeFaithfulnessResult(
        circuit_name=circuit_name, run_id=run_id, circuit_file=circuit_file, task=task.name, model=model_name,
        split=split, data_seed=seed, device=str(model.device), loss="mse" if "mse_full" in task.metrics else "kl",
        n_examples=n, circuit_loss=circuit_loss / n, edges=tuple(names),
        model_without=tuple((model_without / n).tolist()), circuit_without=tuple((circuit_without / n).tolist()),
        created_at=now_iso())
