"""What running one unit of a sweep hands back to be recorded, typed.

A worker (this process, a local worker process, a Dask or Ray worker, a torchrun rank) runs a unit
without touching the results store and returns one of these; the process that owns the store
writes it with `ResultsStore.record`:

- `JobResult`: one job (`JobSpec`), where it ran (``environment``), what it cost, its runs (one per
  circuit) with their metrics and circuit files, and a score method's scores; or, with ``error``,
  that it failed; with ``extends``, runs added to a job the store holds complete (new sparsities cut
  from its stored scores);
- `ReferenceResult`: the full model's and the empty circuit's metrics on one test split.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sweep import JobSpec, Reference


@dataclass(frozen=True)
class JobResult:
    spec: JobSpec
    environment: dict  # device, threads, host, started_at, device_name, versions, finished_at
    cost: dict = field(default_factory=dict)  # wall_s, wall_total_s, forward/backward passes, peak_memory_mib
    graph: dict | None = None  # `Graph.to_dict` of the model's graph
    log: list = field(default_factory=list)  # the method's training / search log
    info: dict = field(default_factory=dict)  # the method's facts, the harness's timings and data sizes
    runs: tuple = ()  # one dict per circuit: the store's runs columns but circuit_file
    metrics: dict = field(default_factory=dict)  # {run_id: {split: {metric: value}}}
    circuits: dict = field(default_factory=dict)  # {run_id: circuit JSON (`Circuit.to_dict`)}
    scores: np.ndarray | None = None  # [W, R], NaN outside the graph: a score method's ranking
    error: str | None = None  # the job failed: its error, where it was raised
    extends: bool = False  # runs added to a complete job of the store

    @property
    def kind(self) -> str:
        return "failed" if self.error is not None else "extend" if self.extends else "job"

    def row(self) -> dict:
        """The job's row of the store's jobs table (JSON-able values)."""
        s = self.spec
        row = {"job_id": s.job_id, "config": s.config, "method": s.method, "method_preset": s.method_preset,
               "method_config": s.method_config, "task": s.task, "model": s.model, "dtype": s.dtype,
               "n_train": s.n_train, "n_validation": s.n_validation, "data_seed": s.data_seed, "seed": s.seed,
               "target_sparsity": s.target_sparsity, **self.environment, **self.cost}
        if self.graph is not None:
            row.update(graph=self.graph, log=list(self.log), info=dict(self.info))
        return row


@dataclass(frozen=True)
class ReferenceResult:
    reference: Reference
    values: dict  # {split: {"full" | "empty": {metric: value}}}

    kind = "reference"

    def row(self) -> dict:
        r = self.reference
        return {"ref_id": r.ref_id, "task": r.task, "model": r.model, "dtype": r.dtype, "device": r.device,
                "data_seed": r.data_seed, "eval_limit": r.eval_limit, "n_validation": r.n_validation}
