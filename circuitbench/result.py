"""What running one unit of a sweep hands back to be recorded, typed.

A worker (this process, a local worker process, a Dask or Ray worker, a torchrun rank) runs a unit
without touching the results store and returns one of these; the process that owns the store
writes it with `ResultsStore.record`:

- `JobResult`: one job (`JobSpec`), where it ran (``environment``), what it cost, its runs (one per
  circuit) with their metrics and circuit files, and a score method's scores; or, with ``error``,
  that it failed; with ``extends``, runs added to a job the store holds complete (new sparsities cut
  from its stored scores);
- `ReferenceResult`: the full model's and the empty circuit's metrics on one test split.

Derived steps (after a sweep, on what the store holds) return them too: the case study's
intersection is a `JobResult` of a `DerivedSpec` (its circuit built from stored runs, named in
``derived_from``), a circuit evaluated in another setting is a `RunMetricsResult`, and an
edge-faithfulness study (`circuitbench.faithfulness`) is an `EdgeFaithfulnessResult`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sweep import DerivedSpec, JobSpec, Reference


@dataclass(frozen=True)
class JobResult:
    spec: JobSpec | DerivedSpec
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
               "target_sparsity": s.target_sparsity, "derived_from": list(s.derived_from) or None,
               **self.environment, **self.cost}
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


@dataclass(frozen=True)
class RunMetricsResult:
    """A stored run's metrics on another split (the case study's ``test@<other task>``)."""

    run_id: str
    split: str
    values: dict  # {metric: value}

    kind = "metrics"


@dataclass(frozen=True)
class EdgeFaithfulnessResult:
    """One edge-faithfulness study of a circuit (`circuitbench.faithfulness`): for each edge, the
    task's loss of the full model without it and of the circuit without it."""

    circuit_name: str  # the run id, or the circuit file's name
    run_id: str | None  # the stored run the circuit came from (None: an outside file)
    circuit_file: str | None
    task: str
    model: str
    split: str
    data_seed: int
    device: str
    loss: str  # "kl" or "mse"
    n_examples: int
    circuit_loss: float
    edges: tuple  # edge names
    model_without: tuple
    circuit_without: tuple
    created_at: str

    kind = "edge_faithfulness"

    @property
    def study_id(self) -> str:
        """16 hex digits of sha256 of (circuit edges, model, task, split, data seed, examples)."""
        import hashlib
        import json

        key = json.dumps({"edges": sorted(self.edges), "model": self.model, "task": self.task, "split": self.split,
                          "data_seed": self.data_seed, "n_examples": self.n_examples}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def rows(self) -> list[dict]:
        """The store's ``edge_faithfulness`` rows, one per edge."""
        common = {"study_id": self.study_id, "circuit_name": self.circuit_name, "run_id": self.run_id,
                  "circuit_file": self.circuit_file, "task": self.task, "model": self.model, "split": self.split,
                  "data_seed": self.data_seed, "n_examples": self.n_examples, "circuit_edges": len(self.edges),
                  "device": self.device, "loss": self.loss, "circuit_loss": self.circuit_loss,
                  "created_at": self.created_at}
        return [{**common, "edge": e, "model_without": mw, "circuit_without": cw}
                for e, mw, cw in zip(self.edges, self.model_without, self.circuit_without)]
