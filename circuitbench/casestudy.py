"""The case study (paper section 5, table 2): instruction-prompted vs few-shot circuits.

`run_casestudy` finds a circuit for Boolean Expressions with Edge Pruning twice, once with the
instruction prompt (task ``boolexpr-ip``) and once few-shot (``boolexpr-fs``), through the runner,
so both are ordinary jobs of the results store (each evaluated on its own test split, plus the
full-model / empty-circuit references). Then it

* evaluates each circuit in the other setting and stores that under split ``test@<other task>``;
* builds their intersection, evaluates it in both settings and stores it as a *derived* job
  (method ``intersection``; the store's ``jobs.derived_from`` names the two runs), as the report's
  table 2 expects (`circuitbench.report.tables`);
* compares the overlap with the overlap two random edge sets of those sizes would have,
  |IP|·|FS|/N (N = the model's edges).

The pipeline is the runner's: the sweep's jobs run through `circuitbench.runner.run_sweep`; the
derived step (`derive`) reads nothing from the store and returns typed results
(`circuitbench.result`: a `RunMetricsResult` per cross evaluation, a `JobResult` of a
`DerivedSpec` for the intersection), which `_finish` records with `ResultsStore.record`.

Everything is resumable: a rerun skips discovered jobs, stored cross evaluations and a stored
intersection. ``circuitbench report`` then rebuilds the table from the store alone.

Presets (Edge Pruning's settings for CodeLlama-13B-Instruct in the paper, appendix B): ``paper``:
6,000 steps, batch 1, edge target 1.2 and node target 0.7 (each with its own Lagrangian), learning
rate 0.8 for the masks and 0.4 for the lambdas, the targets ramped over the first 5/6 of the
steps, the task's whole training and test splits. ``quick`` and ``smoke`` shrink the steps and
the data only. The hardware settings follow the device unless given: on CUDA bfloat16 weights
and activations with gradient checkpointing, on CPU float32 without. The paper trained with
FSDP over 32 GPUs; train both circuits that way with ``torchrun -m circuitbench.distributed
--casestudy boolexpr ...`` and then run this to evaluate (see `circuitbench.distributed`).

The edge target 1.2 > 1 pushes the masks below any sparsity a schedule could name; the circuit
kept is what the trained masks keep (Edge Pruning's ``density`` discretisation). The jobs' target
sparsity is therefore a label, `LABEL_SPARSITY` (about the paper's 0.03-0.04% of edges kept).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from .errors import UserError

STUDIES = ("boolexpr",)
IP_TASK, FS_TASK = "boolexpr-ip", "boolexpr-fs"
LABEL_SPARSITY = 0.9996
PAPER_EP = {"batch_size": 1, "edge_target": 1.2, "node_target": 0.7, "lr": 0.8, "lambda_lr": 0.4}


@dataclass(frozen=True)
class CaseStudyPreset:
    steps: int
    n_train: int | None  # None: the task's whole training split
    eval_limit: int | None  # None: the whole test split


PRESETS = {
    "paper": CaseStudyPreset(steps=6000, n_train=None, eval_limit=None),
    "quick": CaseStudyPreset(steps=300, n_train=200, eval_limit=200),
    "smoke": CaseStudyPreset(steps=8, n_train=8, eval_limit=8),
}


def ep_settings(preset: str, steps: int | None = None, checkpoint: bool = False) -> dict:
    """Edge Pruning's hyperparameters for the case study (the paper's, with the preset's steps)."""
    if preset not in PRESETS:
        raise UserError(f"unknown case-study preset {preset!r}; choose one of {', '.join(PRESETS)}")
    steps = PRESETS[preset].steps if steps is None else steps
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    return {**PAPER_EP, "steps": steps, "ramp_steps": max(1, steps * 5 // 6), "gradient_checkpointing": checkpoint}


def default_hardware(device: str | None, dtype: str | None, checkpoint: bool | None):
    """(device, dtype, checkpoint) with the defaults of the module docstring filled in."""
    from .models import resolve_device

    dev = str(resolve_device(device or "cpu"))
    gpu = dev.startswith("cuda")
    return dev, dtype or ("bfloat16" if gpu else "float32"), gpu if checkpoint is None else checkpoint


def case_study_sweep(model: str, preset: str = "quick", steps: int | None = None, n_train: int | None = None,
                     limit: int | None = None, results: str | None = None, dtype: str | None = None,
                     checkpoint: bool = False, seed: int = 0, data_seed: int = 0, eval_batch_size: int = 32):
    """The `Sweep` of the case study's two discovery jobs (Edge Pruning on boolexpr-ip and -fs).

    The case study's preset is a layer of the sweep named ``case-study preset NAME`` (Edge
    Pruning's settings, training and test sizes), in the place of a sweep preset: the values given
    here (``steps``, ``n_train``, ``limit``) are the command line's, above it, and the runner
    prints what each changes (`Sweep.override_lines`)."""
    from .sweep import Sweep, source_from_mapping

    ep_settings(preset, steps, checkpoint)  # checks the preset and the steps
    p = PRESETS[preset]
    preset_values = {"method_preset": preset, "method_config": {"ep": ep_settings(preset, None, checkpoint)},
                     "description": f"case study boolexpr IP vs FS ({preset})"}
    if p.n_train is not None:
        preset_values["n_train"] = [p.n_train]
    if p.eval_limit is not None:
        preset_values["eval_limit"] = p.eval_limit
    flags = {"methods": ["ep"], "tasks": [IP_TASK, FS_TASK], "models": [model], "sparsities": [LABEL_SPARSITY],
             "n_train": None if n_train is None else [n_train], "seeds": [seed], "data_seed": data_seed,
             "eval_limit": limit, "eval_batch_size": eval_batch_size, "results": results, "dtype": dtype}
    if steps is not None:
        flags["method_config"] = {"ep": {"steps": steps, "ramp_steps": max(1, steps * 5 // 6)}}
    return Sweep.build(flags=flags, layers=(source_from_mapping(preset_values, f"case-study preset {preset}"),))


def chance_overlap(n_a: int, n_b: int, n_total: int) -> float:
    """Expected size of the intersection of two random edge sets of sizes n_a and n_b out of n_total."""
    return n_a * n_b / n_total if n_total else float("nan")


def run_casestudy(model: str, preset: str = "quick", results: str = "results", steps: int | None = None,
                  n_train: int | None = None, limit: int | None = None, device: str | None = None,
                  dtype: str | None = None, checkpoint: bool | None = None, seed: int = 0, data_seed: int = 0,
                  eval_batch_size: int = 32, dry_run: bool = False, progress: bool = True, out=None) -> dict:
    """Run (or resume) the case study into ``results``; returns a summary dict with the run ids,
    edge counts, overlap, chance overlap and every stored metric. See the module docstring."""
    from .runner import run_sweep

    out = out or sys.stdout
    device, dtype, checkpoint = default_hardware(device, dtype, checkpoint)
    sweep = case_study_sweep(model, preset, steps, n_train, limit, results, dtype, checkpoint, seed, data_seed,
                             eval_batch_size)
    if dry_run:
        run_sweep(sweep, results=results, device=device, dtype=dtype, dry_run=True, progress=False, out=out)
        print(f"then: each circuit evaluated in the other setting, and their intersection in both "
              f"(3 x {sweep.get('eval_limit') or 'all'} test examples per setting)", file=out)
        _print_memory(model, dtype, checkpoint, out)
        return {"dry_run": True}
    summary = run_sweep(sweep, results=results, device=device, dtype=dtype, progress=progress, out=out)
    if summary.failed_jobs:
        raise UserError(f"case study: discovery failed for job(s) {', '.join(summary.failed_jobs)}; "
                        f"see `circuitbench results --failed` and rerun to retry")
    return _finish(sweep, results, device, dtype, eval_batch_size, progress, out)


def _print_memory(model, dtype, checkpoint, out):
    from .costs import memory_lines

    # the plan above already printed the estimate for one device at this dtype without checkpointing
    for n in ((1, 32) if checkpoint else (32,)):
        for line in memory_lines([model], "bfloat16" if n > 1 else dtype, checkpoint=True, n_devices=n):
            print(line, file=out)


def _finish(sweep, results, device, dtype, eval_batch_size, progress, out) -> dict:
    """The derived step after the sweep: read the two circuits from the store, run `derive` and
    record what it returns (`ResultsStore.record`), then summarise from the store."""
    from .store import ResultsStore, run_id_for
    from .workbench import model_and_engine

    jobs, _ = sweep.plan(device=device.split(":")[0], dtype=dtype)
    by_task = {j.task: j for j in jobs}
    ip_run = run_id_for(by_task[IP_TASK].job_id, LABEL_SPARSITY)
    fs_run = run_id_for(by_task[FS_TASK].job_id, LABEL_SPARSITY)
    store = ResultsStore(results)
    try:
        circuits = {IP_TASK: store.circuit(ip_run), FS_TASK: store.circuit(fs_run)}
        inter = intersection_spec(by_task, device, dtype)
        have = store.metrics(split=[f"test@{FS_TASK}", f"test@{IP_TASK}"])
        done = set(zip(have["run_id"], have["split"]))
        stored = store.job_status([inter.job_id]).get(inter.job_id) == "complete"
        model, _ = model_and_engine(inter.model, device, dtype)
        for result in derive(model, by_task, circuits, inter, done, stored, device, eval_batch_size, progress):
            store.record(result)
            print(_recorded(result), file=out, flush=True)
        inter_run = run_id_for(inter.job_id, LABEL_SPARSITY)
        metrics = store.metrics(split=None)
        metrics = metrics[metrics["run_id"].isin([ip_run, fs_run, inter_run])]
        values = {(r, s, m): v for r, s, m, v in zip(metrics["run_id"], metrics["split"], metrics["metric"],
                                                     metrics["value"])}
    finally:
        store.close()
    a, b = circuits[IP_TASK], circuits[FS_TASK]
    n_total = a.graph.n_edges
    return {"ip_run": ip_run, "fs_run": fs_run, "intersection_run": inter_run, "ip_edges": a.n_edges,
            "fs_edges": b.n_edges, "overlap": (a & b).n_edges, "total_edges": n_total,
            "chance_overlap": chance_overlap(a.n_edges, b.n_edges, n_total), "metrics": values}


def intersection_spec(by_task: dict, device: str, dtype: str):
    """The `DerivedSpec` of the IP ∩ FS circuit of the case study's two jobs (``{task: JobSpec}``)."""
    from .store import run_id_for
    from .sweep import DerivedSpec

    ip_job, fs_job = by_task[IP_TASK], by_task[FS_TASK]
    return DerivedSpec("intersection", (run_id_for(ip_job.job_id, LABEL_SPARSITY),
                                        run_id_for(fs_job.job_id, LABEL_SPARSITY)),
                       task=IP_TASK, model=ip_job.model, dtype=dtype, device=device.split(":")[0],
                       eval_limit=ip_job.eval_limit, data_seed=ip_job.data_seed,
                       method_preset=ip_job.method_preset, n_train=ip_job.n_train, n_validation=ip_job.n_validation,
                       seed=ip_job.seed, target_sparsity=LABEL_SPARSITY)


def derive(model, by_task: dict, circuits: dict, inter, done: set, intersection_stored: bool, device: str,
           eval_batch_size: int, progress: bool):
    """The case study's derived results, without touching the store: each circuit evaluated in the
    other setting (a `RunMetricsResult` on split ``test@<other task>``), then the intersection
    evaluated in both settings (a `JobResult` of the `DerivedSpec` ``inter``). What the store holds
    is skipped: ``done``, its ``(run_id, split)`` pairs; ``intersection_stored``, the intersection."""
    import torch

    from .evaluate import evaluate
    from .result import JobResult, RunMetricsResult
    from .store import now_iso, run_id_for
    from .tasks import get_task
    from .workbench import device_name, library_versions

    tests: dict = {}

    def evaluate_in(task_name, circuit):
        task = get_task(task_name)
        if task_name not in tests:  # the test split the runner evaluates on (built as the job's data), once
            splits = by_task[task_name].data.build(task, model.tokenizer)
            limit = by_task[task_name].eval_limit
            tests[task_name] = splits.split("test") if limit is None else splits.head("test", limit)
        values = evaluate(model, task, circuit, batch_size=eval_batch_size, examples=tests[task_name],
                          progress=progress)
        n = int(values.pop("n_examples"))
        return {k: float(v) for k, v in values.items()}, n

    ip_run, fs_run = inter.derived_from
    for own, other, run_id in ((IP_TASK, FS_TASK, ip_run), (FS_TASK, IP_TASK, fs_run)):
        if (run_id, f"test@{other}") not in done:
            yield RunMetricsResult(run_id, f"test@{other}", evaluate_in(other, circuits[own])[0])
    if intersection_stored:
        return
    a, b = circuits[IP_TASK], circuits[FS_TASK]
    circuit, graph = a & b, model.graph
    environment = {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads(),
                   "host": __import__("socket").gethostname(), "versions": library_versions(),
                   "started_at": now_iso()}
    t0 = time.perf_counter()
    ip_values, n_ip = evaluate_in(IP_TASK, circuit)
    fs_values, _ = evaluate_in(FS_TASK, circuit)
    eval_s = time.perf_counter() - t0
    chance = chance_overlap(a.n_edges, b.n_edges, graph.n_edges)
    info = {"overlap": circuit.n_edges, "chance_overlap": chance, "ip_edges": a.n_edges, "fs_edges": b.n_edges,
            "total_edges": graph.n_edges, "overlap_over_chance": circuit.n_edges / chance if chance else None}
    run_id = run_id_for(inter.job_id, LABEL_SPARSITY)
    data = circuit.to_dict()
    data["meta"] = {**data.get("meta", {}), "job_id": inter.job_id, "run_id": run_id, "method": inter.method,
                    "intersection_of": list(inter.derived_from), "model": inter.model}
    run = {"run_id": run_id, "job_id": inter.job_id, "target_sparsity": LABEL_SPARSITY,
           "sparsity": float(circuit.sparsity), "n_edges": circuit.n_edges, "n_effective": circuit.n_effective,
           "total_edges": graph.n_edges, "n_nodes": len(circuit.nodes), "n_examples": n_ip, "eval_s": eval_s,
           "finished_at": now_iso()}
    cost = {"wall_s": {"evaluate": eval_s}, "wall_total_s": eval_s, "forward_passes": 0, "backward_passes": 0,
            "peak_memory_mib": None}
    yield JobResult(inter, {**environment, "finished_at": now_iso()}, cost, graph.to_dict(), [], info, (run,),
                    {run_id: {"test": ip_values, f"test@{FS_TASK}": fs_values}}, {run_id: data})


def _recorded(result) -> str:
    if result.kind == "metrics":
        own = IP_TASK if result.split.endswith(FS_TASK) else FS_TASK
        return f"evaluated the {own} circuit on {result.split.split('@', 1)[1]}"
    return "evaluated the intersection in both settings"


def case_study_table_text(results: str) -> str:
    """Table 2 as the report builds it from the store (Markdown)."""
    from .report.artifact import to_markdown
    from .report.data import load_report_data
    from .report.tables import case_study_table

    art = case_study_table(load_report_data(results))
    if art.table is None:
        return f"(no case-study table: {art.reason})"
    text = to_markdown(art.table)
    if art.notes:
        text += "\n" + "\n".join(f"note: {n}" for n in art.notes)
    return text


def summary_json(summary: dict) -> str:
    """The summary with tuple keys flattened (for --json output)."""
    flat = dict(summary)
    if "metrics" in flat:
        flat["metrics"] = {f"{r} {s} {m}": v for (r, s, m), v in flat["metrics"].items()}
    return json.dumps(flat, indent=2)
