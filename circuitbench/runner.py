"""The runner: one run loop, plan -> execute -> record, for a sweep's jobs.

`run_sweep` plans the jobs (`circuitbench.sweep`), validates everything a user can get wrong
before any work starts, skips what the store already holds, and executes the rest:

- **Units of work.** A *job* unit discovers a circuit (or scores) with one method, cuts it at
  the job's sparsities and evaluates every circuit on the task's test split with all its metrics
  (`circuitbench.evaluate`). A method that builds on other methods' scores (an ensemble,
  `CircuitMethod.score_inputs`) is handed the ones the store holds when the sweep is planned
  (`stored_inputs`); scores of jobs run in the same sweep are not passed on (the method runs
  those members itself), so run the members first to reuse them. A *reference* unit evaluates the
  full model and the empty circuit once per task/model/test split. An *extend* unit adds
  sparsities to a complete score-based job by cutting its stored scores (no rediscovery).
- **Recording.** A unit runs without touching the store (`execute`) and returns a typed result
  (`circuitbench.result.JobResult` or `ReferenceResult`) to this process, which writes it with
  `ResultsStore.record` (circuit files, then one transaction per job): a crash or ``kill -9`` loses at most the units in flight, and a
  rerun of the same command skips every complete job (jobs are identified by a hash of their
  configuration). A job that raises is recorded as failed with its error and retried on rerun.
  A long method saves its state while it runs (``method.checkpoint``, a `circuitbench.checkpoint.
  Checkpoint` at ``<store>/checkpoints/<job_id>.pt``: ACDC's search, Edge Pruning's training) and
  the rerun of an interrupted or failed job resumes from it; the store removes the file when it
  records the job.
  Derived steps after a sweep (the case study's cross evaluations and intersection,
  `circuitbench.casestudy.derive`; edge faithfulness, `circuitbench.faithfulness`) return typed
  results too, recorded the same way.
- **Execution** goes through joblib: in this process by default (joblib's sequential backend),
  ``jobs=N`` local worker processes (loky), or ``backend="dask"``/``"ray"`` to an existing
  cluster through joblib's backends (optional extras). Jobs timed on a GPU run one at a time so
  their runtimes are comparable: with a CUDA device, local execution uses one worker.
- **Progress**: a bar over units with time left; in this process the methods show their own bar
  (steps, trials, batches) within the job.

`circuitbench.costs.estimate_plan` gives the time estimate printed by ``--dry-run``.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError, UnsupportedModel
from .costs import ASSUMED_FLOPS, PROBE_MAX_PARAMS, estimate_plan, format_seconds, memory_lines
from .store import ResultsStore, check_writable, now_iso, run_id_for
from .sweep import JobSpec, Reference, Sweep
from .result import JobResult, ReferenceResult
from .workbench import device_name, library_versions, model_and_engine

BACKENDS = ("local", "dask", "ray")


# ---- units of work ----------------------------------------------------------------------------------
@dataclass
class Unit:
    """One piece of work for a worker: ``kind`` is "job", "extend" or "reference"."""

    kind: str
    job: JobSpec | None = None
    reference: Reference | None = None
    sparsities: tuple[float, ...] = ()  # "extend": the sparsities still missing
    scores: np.ndarray | None = None  # "extend": the stored scores to cut
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch threads in a worker process (None: leave as is)
    progress: bool = True
    stored: dict = field(default_factory=dict)  # "job": {key: StoredScores} for the method (`stored_inputs`)
    data_parallel: object | None = None  # "job": this process's rank of a group (`distributed.DataParallel`)
    checkpoint: str | None = None  # "job": where its method saves its state (`ResultsStore.checkpoint_path`)

    @property
    def label(self) -> str:
        if self.kind == "reference":
            r = self.reference
            return f"references {r.task} {r.model}"
        extra = f" (+{len(self.sparsities)} sparsities from stored scores)" if self.kind == "extend" else ""
        return self.job.label + extra


@dataclass
class RunSummary:
    """What a `run_sweep` call planned and did."""

    planned_jobs: int = 0
    skipped_jobs: int = 0
    executed: int = 0
    recorded_jobs: int = 0
    failed_jobs: list[str] = field(default_factory=list)
    references: int = 0
    wall_s: float = 0.0
    estimate_s: float = 0.0
    dry_run: bool = False


def _test_split(model, task, item):
    """The test split of ``item``'s data (a job's or a reference's), never overlapping the
    examples a method trained on."""
    return item.data.build(task, model.tokenizer).test


def _evaluate(model, task, circuit, item, test, progress, references=False):
    """Every metric of ``task`` for ``circuit`` on the ``test`` examples (the first
    ``item.eval_limit`` of them); returns (metrics, n_examples)."""
    from .evaluate import evaluate

    values = evaluate(model, task, circuit, split="test", batch_size=item.eval_batch_size,
                      limit=item.eval_limit, seed=item.data_seed, progress=progress,
                      references=references, examples=test)
    n = int(values.pop("n_examples"))
    return {k: float(v) for k, v in values.items()}, n


def _run_records(job: JobSpec, circuits: dict, model, task, test, progress: bool):
    """Evaluate the circuits on ``test`` (sharing each batch's reference and corrupted passes);
    returns (runs, metrics, circuit dicts)."""
    from .evaluate import evaluate_many

    runs, metrics, files = [], {}, {}
    graph = model.graph
    for s in circuits:
        if circuits[s].graph != graph:
            raise RuntimeError(f"the method returned a circuit over a different graph at sparsity {s}")
    scored = evaluate_many(model, task, circuits, split="test", batch_size=job.eval_batch_size,
                           limit=job.eval_limit, seed=job.data_seed, progress=progress, examples=test)
    for s in sorted(circuits):
        circuit = circuits[s]
        run_id = run_id_for(job.job_id, s)
        values = dict(scored[s])
        n_examples, eval_s = int(values.pop("n_examples")), values.pop("eval_s")
        metrics[run_id] = {"test": {k: float(v) for k, v in values.items()}}
        data = circuit.to_dict()
        data.pop("scores", None)  # scores are stored once per job, not per circuit
        data["meta"] = {**data.get("meta", {}), "job_id": job.job_id, "run_id": run_id, "method": job.method,
                        "task": job.task, "model": job.model, "target_sparsity": s}
        files[run_id] = data
        runs.append({"run_id": run_id, "job_id": job.job_id, "target_sparsity": float(s),
                     "sparsity": float(circuit.sparsity), "n_edges": int(circuit.n_edges),
                     "n_effective": int(circuit.n_effective),
                     "total_edges": int(graph.n_edges), "n_nodes": len(circuit.nodes),
                     "n_examples": n_examples, "eval_s": eval_s, "finished_at": now_iso()})
    return runs, metrics, files


def execute(unit: Unit):
    """Run one unit (in whichever process joblib chose) without touching the store; returns its
    `JobResult` or `ReferenceResult` for the parent to record."""
    import torch

    if unit.threads:
        torch.set_num_threads(unit.threads)
    if unit.kind == "reference":
        return _execute_reference(unit)
    environment = {"device": unit.device, "threads": torch.get_num_threads(), "host": socket.gethostname(),
                   "started_at": now_iso()}
    try:
        environment["device_name"] = device_name(unit.device)
        environment["versions"] = library_versions()
        if unit.kind == "extend":
            return _execute_extend(unit, environment)
        return _execute_job(unit, environment)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # one failing job must not take the sweep down; the error is recorded
        tb = traceback.extract_tb(err.__traceback__)
        where = f" (at {tb[-1].filename.rsplit(os.sep, 1)[-1]}:{tb[-1].lineno})" if tb else ""
        environment["finished_at"] = now_iso()
        return JobResult(unit.job, environment, error=f"{type(err).__name__}: {err}{where}")


def _execute_job(unit: Unit, environment: dict) -> JobResult:
    import torch

    from .method import circuits_at, get_method
    from .tasks import get_task

    job = unit.job
    harness = {}
    t0 = time.perf_counter()
    model, engine = model_and_engine(job.model, unit.device, unit.dtype)
    harness["load_model"] = time.perf_counter() - t0
    task = get_task(job.task)
    t0 = time.perf_counter()
    splits = job.data.build(task, model.tokenizer)
    train = splits.train.to(model.device)
    validation = splits.validation.to(model.device)
    harness["build_data"] = time.perf_counter() - t0
    method = get_method(job.method)(preset=job.method_preset, **job.method_overrides)
    method.stored = dict(unit.stored)
    if unit.data_parallel is not None:  # this instance trains as one rank of a process group
        method.data_parallel = unit.data_parallel
    if unit.checkpoint is not None:  # a job the store will record: its method may save and resume
        from .checkpoint import Checkpoint

        method.checkpoint = Checkpoint(unit.checkpoint, job.job_id)
    torch.manual_seed(job.seed)  # anything left on the global RNG is seeded too
    result = method.discover(engine, task, train, validation, list(job.sparsities), seed=job.seed,
                             progress=unit.progress)
    circuits = circuits_at(result, model.graph, job.sparsities, cut=job.cut)
    runs, metrics, files = _run_records(job, circuits, model, task, splits.test, unit.progress)
    cost = result.cost
    scores = None
    if result.scores is not None:
        scores = result.scores.detach().float().cpu().masked_fill(~model.graph.valid, float("nan")).numpy()
    info = {**dict(result.info), "harness_s": harness, "n_train_built": len(train),
            "n_validation_built": len(validation), "data_variant": splits.variant}
    cost = {"wall_s": dict(cost.wall_s), "wall_total_s": float(sum(cost.wall_s.values())),
            "forward_passes": int(cost.forward_passes), "backward_passes": int(cost.backward_passes),
            "peak_memory_mib": cost.peak_memory_mib}
    return JobResult(job, {**environment, "finished_at": now_iso()}, cost, model.graph.to_dict(), list(result.log),
                     info, tuple(runs), metrics, files, scores)


def _execute_extend(unit: Unit, environment: dict) -> JobResult:
    import torch

    from .circuit import Circuit
    from .tasks import get_task

    job = unit.job
    model, _ = model_and_engine(job.model, unit.device, unit.dtype)
    task = get_task(job.task)
    scores = torch.from_numpy(np.nan_to_num(unit.scores, nan=0.0))
    circuits = {s: Circuit.from_sparsity(model.graph, scores, s, meta={"cut_from": "stored scores"}, cut=job.cut)
                for s in unit.sparsities}
    runs, metrics, files = _run_records(job, circuits, model, task, _test_split(model, task, job), unit.progress)
    return JobResult(job, environment, runs=tuple(runs), metrics=metrics, circuits=files, extends=True)


def _execute_reference(unit: Unit) -> ReferenceResult:
    from .circuit import Circuit
    from .tasks import get_task

    ref = unit.reference
    model, _ = model_and_engine(ref.model, unit.device, unit.dtype)
    task = get_task(ref.task)
    # The empty circuit with references: its own values and the full model's, on the same batches.
    values, _ = _evaluate(model, task, Circuit.empty(model.graph), ref, _test_split(model, task, ref),
                          unit.progress, references=True)
    split = {"full": {k[5:]: v for k, v in values.items() if k.startswith("full/")},
             "empty": {k[6:]: v for k, v in values.items() if k.startswith("empty/")}}
    return ReferenceResult(ref, {"test": split})


@contextmanager
def _cluster_backend(backend: str, cluster: str | None):
    """joblib's backend for an existing Dask or Ray cluster, connected for the sweep's duration;
    a clear `UserError` when the optional extra is not installed or the cluster cannot be reached."""
    from joblib import parallel_config

    if backend == "dask":
        try:
            from dask.distributed import Client
        except ImportError:
            raise UserError("--backend dask needs Dask: pip install 'circuitbench[dask]'") from None
        try:
            client = Client(cluster) if cluster else Client()
        except (OSError, TimeoutError) as err:
            raise UserError(f"--backend dask: cannot connect to the Dask scheduler at {cluster} ({err})") from None
        print(f"dask: {'connected to ' + cluster if cluster else 'started a local cluster'} "
              f"({client.dashboard_link})", file=sys.stderr)
        try:
            with parallel_config(backend="dask"):
                yield
        finally:
            client.close()
        return
    if backend == "ray":
        try:
            import ray
            from ray.util.joblib import register_ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install 'circuitbench[ray]'") from None
        try:
            ray.init(address=cluster or "auto", ignore_reinit_error=True)
        except Exception as err:  # ray raises ConnectionError / RuntimeError when no cluster runs
            raise UserError(f"--backend ray: cannot connect to a Ray cluster at {cluster or 'auto'} ({err})") from None
        register_ray()
        try:
            with parallel_config(backend="ray"):
                yield
        finally:
            ray.shutdown()
        return
    raise AssertionError(backend)


# ---- planning -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    jobs: list[JobSpec]
    references: list[Reference]
    units: list[Unit]
    skipped: list[JobSpec]
    device: str
    dtype: str
    warnings: list[str] = field(default_factory=list)


def validate(sweep: Sweep, device: str, dtype: str, strict: bool = True):
    """Expand the sweep and check every name and model; returns (jobs, references, warnings).
    ``strict``: a model that cannot be loaded is an error (a dry run only warns, so the plan of
    a sweep meant for another machine can still be shown)."""
    from .models import ModelSpec

    jobs, refs = sweep.plan(device=device.split(":")[0], dtype=dtype)
    warnings = []
    for model in sorted({j.model for j in jobs} | {r.model for r in refs}):
        try:
            ModelSpec.parse(model).check()
        except UserError as err:
            if strict or isinstance(err, UnsupportedModel):
                raise
            warnings.append(f"warning: {err}")
    return jobs, refs, warnings


def make_plan(jobs: list[JobSpec], refs: list[Reference], store: ResultsStore | None, device: str, dtype: str,
              progress: bool, threads: int | None, warnings=()) -> Plan:
    """The units still to run: what the store (None: an empty one) does not hold yet."""
    status = store.job_status([j.job_id for j in jobs]) if store else {}
    units, skipped = [], []
    for ref in refs:
        if store is None or not store.has_references(ref.ref_id):
            units.append(Unit("reference", reference=ref, device=device, dtype=dtype, threads=threads,
                              progress=progress))
    for job in jobs:
        if status.get(job.job_id) != "complete":
            units.append(Unit("job", job=job, device=device, dtype=dtype, threads=threads, progress=progress,
                              stored=stored_inputs(store, job) if store is not None else {},
                              checkpoint=str(store.checkpoint_path(job.job_id)) if store is not None else None))
            continue
        have = store.run_sparsities(job.job_id)
        missing = tuple(s for s in job.sparsities if not any(math.isclose(s, h, abs_tol=1e-9) for h in have))
        if not missing:
            skipped.append(job)
            continue
        scores = store.scores(job.job_id)
        if scores is None:
            raise UserError(f"job {job.job_id} ({job.label}) is complete but lacks sparsities "
                            f"{', '.join(f'{s:g}' for s in missing)} and has no stored scores to cut")
        units.append(Unit("extend", job=job, sparsities=missing, scores=scores, device=device, dtype=dtype,
                          threads=threads, progress=progress))
    return Plan(jobs, refs, units, skipped, device, dtype, list(warnings))


# Keys of a job's config that do not change the scores its method computes: a score job made under
# them is the same discovery.
NOT_SCORE_IDENTITY = ("method_preset", "eval_limit", "target_sparsity", "targets", "cut")


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def stored_inputs(store: ResultsStore, job: JobSpec) -> dict:
    """``{key: StoredScores}`` for the method of ``job``: for each (method, hyperparameters) its
    `CircuitMethod.score_inputs` names, the scores of the store's earliest complete job of that
    method and those resolved hyperparameters on the same data as ``job`` (its config equal to
    ``job``'s outside `NOT_SCORE_IDENTITY`, method and method config aside)."""
    from .method import Cost, StoredScores, get_method

    wanted = get_method(job.method).score_inputs(job.method_config)
    if not wanted:
        return {}
    identity = {k: v for k, v in job.config.items() if k not in NOT_SCORE_IDENTITY}
    out = {}
    for key, (method, method_config) in wanted.items():
        target = _canonical({**identity, "method": method, "method_config": method_config})
        for rec in store.scored_jobs(method, job.task, job.model):
            other = {k: v for k, v in rec["config"].items() if k not in NOT_SCORE_IDENTITY}
            if _canonical(other) != target:
                continue
            scores = store.scores(rec["job_id"])
            if scores is None:
                continue
            cost = Cost(wall_s={k: float(v) for k, v in rec["wall_s"].items()},
                        forward_passes=int(rec["forward_passes"]), backward_passes=int(rec["backward_passes"]),
                        peak_memory_mib=rec["peak_memory_mib"])
            out[key] = StoredScores(method, rec["job_id"], scores, cost)
            break
    return out


# ---- the main entry point ---------------------------------------------------------------------------------
def run_sweep(sweep: Sweep, results: str | None = None, device: str | None = None, dtype: str | None = None,
              jobs: int | None = None, backend: str | None = None, cluster: str | None = None,
              dry_run: bool = False, progress: bool = True, out=None) -> RunSummary:
    """Plan, validate and run ``sweep`` into the results folder; see the module docstring.

    Arguments left None come from the sweep's settings (preset / file / defaults). ``out`` is a
    file for the plan and messages (default stdout). Raises `UserError` before any work for bad
    input; returns a `RunSummary`.
    """
    from .models import resolve_device, resolve_dtype

    out = out or sys.stdout
    t_start = time.perf_counter()
    results = results or sweep.get("results")
    device = device or sweep.get("device") or "auto"
    dtype_name = dtype or sweep.get("dtype") or "float32"
    n_jobs = int(jobs if jobs is not None else sweep.get("jobs"))
    backend = backend or sweep.get("backend")
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if n_jobs < 1 and n_jobs != -1:
        raise UserError(f"--jobs must be a positive number of workers (or -1 for one per core), got {n_jobs}")
    dev = str(resolve_device(device))
    dtype_name = str(resolve_dtype(dtype_name)).replace("torch.", "")
    jobs_planned, refs_planned, warnings = validate(sweep, dev, dtype_name, strict=not dry_run)
    if not dry_run:
        check_writable(results)
    if not dry_run:
        store = ResultsStore(results)
    else:  # a dry run only reads (an older store is not migrated)
        store = ResultsStore(results, readonly=True) if os.path.exists(os.path.join(results, "results.db")) else None

    workers, threads, note = execution_plan(dev, backend, n_jobs)
    if note:
        print(note, file=sys.stderr)
    in_process = backend == "local" and workers == 1
    plan = make_plan(jobs_planned, refs_planned, store, dev, dtype_name, progress and in_process, threads, warnings)
    summary = RunSummary(planned_jobs=len(plan.jobs), skipped_jobs=len(plan.skipped), dry_run=dry_run)

    if dry_run:
        try:
            total, per_unit = estimate_plan(plan, store, probe=True)
        finally:
            if store is not None:
                store.close()
        summary.estimate_s = total
        _print_plan(sweep, plan, per_unit, total, results, dev, workers, backend, out)
        return summary

    print(f"{len(plan.jobs)} jobs planned, {len(plan.skipped)} already complete in {results}; "
          f"{len(plan.units)} units to run on {dev} ({_execution(in_process, workers, backend)})",
          file=out, flush=True)
    _print_budgets(plan, out)
    _print_overrides(sweep, plan, out)
    if not plan.units:
        store.close()
        return summary
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    ctx = _cluster_backend(backend, cluster) if backend != "local" else nullcontext()
    try:
        with ctx:
            parallel = Parallel(n_jobs=1 if in_process else (workers if backend == "local" else -1),
                                backend=None if backend != "local" else ("sequential" if in_process else "loky"),
                                return_as="generator_unordered", pre_dispatch=1 if in_process else "n_jobs")
            with tqdm(total=len(plan.units), desc="jobs", unit="job", disable=not progress, position=0,
                      dynamic_ncols=True) as bar:
                for result in parallel(delayed(execute)(u) for u in plan.units):
                    _record(store, result, summary, bar)
                    bar.update(1)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {summary.recorded_jobs} recorded jobs; the store is intact: rerun the "
              f"same command to resume", file=sys.stderr)
        raise
    finally:
        store.close()
    summary.wall_s = time.perf_counter() - t_start
    done = f"{summary.recorded_jobs} jobs recorded, {summary.references} reference sets"
    if summary.failed_jobs:
        done += f", {len(summary.failed_jobs)} failed (rerun to retry)"
    print(f"{done}; {format_seconds(summary.wall_s)}", file=out, flush=True)
    return summary


def _record(store: ResultsStore, result, summary: RunSummary, bar) -> None:
    from tqdm.auto import tqdm

    summary.executed += 1
    recorded = store.record(result)
    if result.kind == "reference":
        summary.references += int(recorded)
        return
    job = result.spec
    if result.kind == "failed":
        summary.failed_jobs.append(job.job_id)
        tqdm.write(f"job {job.job_id} ({_short_label(job)}) failed: {result.error}", file=sys.stderr)
        return
    if result.kind == "extend" or recorded:  # added runs count as a job recorded
        summary.recorded_jobs += 1
    if result.kind == "job":
        bar.set_postfix_str(f"last: {_short_label(job)}", refresh=False)


def _short_label(job: JobSpec) -> str:
    return f"{job.method} {job.task} {job.model} seed={job.seed}"


def execution_plan(device: str, backend: str, n_jobs: int, cpus: int | None = None):
    """(workers, torch threads per worker or None, note or None) for local execution.

    On a GPU, local jobs run one at a time: two jobs sharing a GPU would time each other. Local
    worker processes split the CPU cores between them (one thread each on two cores and two jobs).
    """
    cpus = cpus or os.cpu_count() or 1
    workers = n_jobs if n_jobs > 0 else cpus
    note = None
    if device.startswith("cuda") and backend == "local" and workers > 1:
        note = f"note: jobs on {device} run one at a time so their runtimes are comparable (--jobs {n_jobs} ignored)"
        workers = 1
    threads = max(1, cpus // workers) if backend == "local" and workers > 1 else None
    return workers, threads, note


def _execution(in_process: bool, workers: int, backend: str) -> str:
    if in_process:
        return "in this process"
    if backend == "local":
        return f"{workers} workers"
    return f"the {backend} cluster's workers"


def _print_budgets(plan: Plan, out) -> None:
    """What each method may spend, one line per method, task and training-set size of the plan."""
    from .method import get_method

    seen = {}
    for job in plan.jobs:
        key = (job.method, job.task, job.n_train)
        if key not in seen:
            seen[key] = get_method(job.method).budget(job.method_config, job.n_train)
    if seen:
        print("budgets:", file=out)
    for (method, task, _), text in seen.items():
        print(f"  {method} on {task}: {text}", file=out, flush=True)


def _print_overrides(sweep: Sweep, plan: Plan, out) -> None:
    """Every hyperparameter a sweep source changes from a method's own preset (never silent)."""
    lines = sweep.override_lines(plan.jobs)
    if lines:
        print("overrides of the method presets:", file=out)
    for line in lines:
        print(f"  {line}", file=out, flush=True)


def _print_plan(sweep, plan: Plan, per_unit, total, results, device, workers, backend, out) -> None:
    print(f"sweep: {sweep.describe()}", file=out)
    for line in plan.warnings:
        print(line, file=out)
    print(f"results: {results}   device: {device}   dtype: {plan.dtype}   execution: "
          f"{_execution(workers == 1 and backend == 'local', workers, backend)}", file=out)
    print(f"{len(plan.jobs)} jobs planned; {len(plan.skipped)} already complete; "
          f"{len(plan.units)} units to run (dry run: nothing is run)", file=out)
    _print_budgets(plan, out)
    _print_overrides(sweep, plan, out)
    rows = []
    for unit, secs, how in per_unit:
        if unit.kind == "reference":
            r = unit.reference
            rows.append(("reference", "-", r.task, r.model, "-", "-", "full, empty", "-", secs, how))
        else:
            j = unit.job
            sp = ",".join(f"{s:g}" for s in (unit.sparsities if unit.kind == "extend" else j.sparsities))
            rows.append((unit.kind, j.method, j.task, j.model, str(j.n_train), str(j.seed), sp,
                         j.job_id, secs, how))
    headers = ("unit", "method", "task", "model", "n_train", "seed", "sparsities", "job id", "est.", "estimate basis")
    text_rows = [tuple(str(c) for c in r[:8]) + (format_seconds(r[8]), r[9]) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h) for i, h in enumerate(headers)]
    widths[6] = min(widths[6], 40)
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    print(line, file=out)
    for r in text_rows:
        cells = list(r)
        if len(cells[6]) > 40:
            cells[6] = cells[6][:37] + "..."
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip(), file=out)
    par = workers if backend == "local" else 1
    print(f"estimated time: {format_seconds(total / max(par, 1))}"
          + (f" ({format_seconds(total)} of work over {par} workers)" if par > 1 else ""), file=out)
    print("how: per job, its planned passes (gradient steps; ACDC: one trial per edge and batch, an upper "
          "bound; one pass per batch for attribution) x the time of one pass, plus three passes per test "
          "batch for each circuit's evaluation. Pass times are measured from this store's finished jobs of "
          "the same method, model and device when it has some, on the job's own task if any (their training "
          "time / their planned passes, which calibrates an upper-bound count); otherwise measured now on the model (one masked "
          "forward, and one forward + backward to the masks, on a batch of the task; models up to "
          f"{PROBE_MAX_PARAMS / 1e9:.0f}B parameters); otherwise assumed from the model's size "
          f"({ASSUMED_FLOPS['cpu'] / 1e9:.0f} GFLOP/s on a CPU, {ASSUMED_FLOPS['cuda'] / 1e12:.0f} TFLOP/s "
          "on a GPU). A configuration already run here takes its measured time.", file=out)
    for line in memory_lines(sorted({u.job.model for u, _, _ in per_unit if u.job is not None}), plan.dtype):
        print(line, file=out)
