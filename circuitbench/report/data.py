"""What the report reads: the results store's runs, references and circuits, loaded once.

`load_report_data(results_dir)` returns a `ReportData`. Everything the figures and tables show is
derived from it; nothing here runs a model or a method.

Conventions the report relies on (see the store's schema in `circuitbench.store`):

* A run's own evaluation is the metrics of split ``test``; a column ``test/<metric>``.
* A cross-setting evaluation (the same circuit scored on another task's test split, used by the
  case study) is stored under split ``test@<task>``, e.g. ``test@boolexpr-fs``; columns
  ``test@boolexpr-fs/<metric>``. The figures use split ``test`` only.
* A *derived* job is one whose circuit was not discovered but built from other runs: the store's
  ``derived_from`` names them (the case study's IP ∩ FS circuit: ``(ip_run_id, fs_run_id)``).
  Derived runs appear in the case-study table and the runs list, never as a method in the figures.

The store is opened read-only (`ResultsStore(..., readonly=True)`): building the report never
writes to it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from ..errors import UserError

# The paper's task order; tasks not listed come after these, alphabetically.
TASK_ORDER = ("ioi-t1", "ioi", "gt", "gp", "boolexpr-ip", "boolexpr-fs", "tracr-xproportion", "tracr-reverse")
# Methods in a fixed order so colours and rows line up across figures and tables.
METHOD_ORDER = ("ep", "acdc", "eap", "eap-ig", "eap-ig-act", "eap-mask-ig", "ensemble", "random")

METRIC_LABELS = {
    "kl": "KL divergence",
    "mse_full": "MSE to the full model",
    "mse": "MSE to the true output",
    "logit_diff": "logit difference",
    "prob_diff": "probability difference",
    "prob_diff_10": "probability difference 10",
    "kendall_tau": "Kendall's τ",
    "exact_match": "exact match",
    "accuracy": "accuracy",
}

# Key of a series (one line in a panel): the same method under a different preset or training-set
# size is a different line.
SERIES_KEYS = ("method", "method_preset", "n_train")


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def first_present(names, candidates) -> str | None:
    """The first of ``candidates`` among ``names`` (the metric names a task stored)."""
    for c in candidates:
        if c in names:
            return c
    return None


# Which stored metric each figure shows for a task, by the names tasks store (`Task.metrics`):
# faithfulness is the task's loss (KL; MSE to the full model for numeric Tracr output).
def faithfulness_metric(names) -> str | None:
    return first_present(names, ("kl", "mse_full"))


def performance_metric(names) -> str | None:
    """Figure 3: logit difference (IOI, GP, boolexpr) or probability difference (GT)."""
    return first_present(names, ("logit_diff", "prob_diff"))


def exact_metric(names) -> str | None:
    """Figure 5: Kendall's τ for GT, exact match otherwise."""
    return first_present(names, ("kendall_tau", "exact_match"))


def accuracy_metric(names) -> str | None:
    """Figure 6: probability difference 10 for GT, accuracy otherwise."""
    return first_present(names, ("prob_diff_10", "accuracy"))


def auc_metric(names) -> str | None:
    """The task's main metric for normalised faithfulness (MIB): logit/probability difference;
    accuracy or MSE for the Tracr programs, which have neither."""
    return first_present(names, ("logit_diff", "prob_diff", "accuracy", "mse"))


def task_sort_key(task: str):
    return (TASK_ORDER.index(task), task) if task in TASK_ORDER else (len(TASK_ORDER), task)


def method_sort_key(method: str):
    return (METHOD_ORDER.index(method), method) if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _config(text) -> dict:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _variant(method_config: dict) -> str:
    """How a job ran its method when it is not the method's plain way: "path" (Edge Pruning's
    sparsity path), "warm <method>" (a warm start), "no node loss" (Edge Pruning without its node
    term), "<member>+<member> <combine> <normalise>" (an ensemble's members and rules); "" otherwise."""
    parts = []
    members = method_config.get("members")
    if isinstance(members, list) and members:
        parts.append(f"{'+'.join(map(str, members))} {method_config.get('combine')} {method_config.get('normalise')}")
    if method_config.get("schedule") == "path":
        parts.append("path")
    if method_config.get("warm_start"):
        parts.append(f"warm {method_config['warm_start']}")
    if method_config.get("node_loss") is False:
        parts.append("no node loss")
    return ", ".join(parts)


@dataclass
class ReportData:
    """The store's contents as the report needs them.

    ``runs``: every run of a complete discovery job (derived jobs excluded), one row each, with
    columns as `ResultsStore.runs` plus ``<split>/<metric>`` for every stored split, ``eval_limit``
    (from the job's config), ``effective_sparsity`` (1 - effective edges / all edges; a run stored
    without an effective count counts all its edges) and ``x_sparsity`` (the figures' x: the
    effective sparsity). ``derived``: the runs of
    derived jobs (case-study intersections) with ``derived_from``. ``failed``: failed jobs.
    ``references``: `ResultsStore.reference_metrics`. ``edge_faithfulness``: the stored
    edge-faithfulness rows (`ResultsStore.edge_faithfulness`).
    """

    root: Path
    store: object
    runs: pd.DataFrame
    derived: pd.DataFrame
    failed: pd.DataFrame
    references: pd.DataFrame
    edge_faithfulness: pd.DataFrame = field(default_factory=pd.DataFrame)
    _circuits: dict = field(default_factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        return self.runs.empty and self.derived.empty

    @cached_property
    def panels(self) -> list[tuple[str, str]]:
        """(task, model) pairs with runs, in the paper's task order."""
        if self.runs.empty:
            return []
        pairs = self.runs[["task", "model"]].drop_duplicates().itertuples(index=False, name=None)
        return sorted(pairs, key=lambda p: (task_sort_key(p[0]), p[1]))

    def test_metrics(self, task: str) -> list[str]:
        """The metric names stored on split ``test`` for ``task``'s runs."""
        rows = self.runs[self.runs["task"] == task]
        cols = [c[5:] for c in rows.columns if c.startswith("test/") and rows[c].notna().any()]
        return cols

    def panel_runs(self, task: str, model: str) -> pd.DataFrame:
        return self.runs[(self.runs["task"] == task) & (self.runs["model"] == model)]

    # ---- references ---------------------------------------------------------------------------
    @cached_property
    def _reference_ids(self) -> dict[tuple[str, str], str]:
        """For each (task, model) the reference set matching its runs best: the same data seed,
        evaluation limit and dtype as most of its runs, preferring the same device."""
        out = {}
        refs = self.references
        if refs.empty:
            return out
        sets = refs.drop_duplicates("ref_id")
        for (task, model), group in sets.groupby(["task", "model"]):
            runs = self.panel_runs(task, model)
            if runs.empty:
                out[(task, model)] = group["ref_id"].iloc[0]
                continue

            def agreement(ref) -> tuple:
                same = ((runs["data_seed"] == ref.data_seed)
                        & _same_limit(runs["eval_limit"], ref.eval_limit)
                        & (runs["dtype"].fillna("") == (ref.dtype or "")))
                return int(same.sum()), int((same & (runs["device"] == ref.device)).sum())

            best = max(group.itertuples(index=False), key=agreement)
            out[(task, model)] = best.ref_id
        return out

    def reference(self, task: str, model: str, circuit: str, metric: str, split: str = "test") -> float | None:
        """The full model's (``circuit="full"``) or empty circuit's value of ``metric``, or None."""
        ref_id = self._reference_ids.get((task, model))
        if ref_id is None:
            return None
        refs = self.references
        hit = refs[(refs["ref_id"] == ref_id) & (refs["split"] == split) & (refs["circuit"] == circuit)
                   & (refs["metric"] == metric)]
        if hit.empty or pd.isna(hit["value"].iloc[0]):
            return None
        return float(hit["value"].iloc[0])

    def reference_id(self, task: str, model: str) -> str | None:
        return self._reference_ids.get((task, model))

    # ---- circuits -----------------------------------------------------------------------------
    def circuit(self, run_id: str):
        """The stored `Circuit` of a run (cached)."""
        if run_id not in self._circuits:
            self._circuits[run_id] = self.store.circuit(run_id)
        return self._circuits[run_id]

    @cached_property
    def devices(self) -> list[str]:
        if self.runs.empty:
            return []
        return sorted({str(d) for d in self.runs["device_name"].dropna()})


def _same_limit(limits: pd.Series, value) -> pd.Series:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return limits.isna()
    return limits == value


def load_report_data(results_dir) -> ReportData:
    """Open the store at ``results_dir`` (UserError when there is none) and load what the report shows."""
    from ..store import DB_NAME, ResultsStore

    root = Path(results_dir)
    if not root.exists():
        raise UserError(f"no results folder {root}; run `circuitbench run` first (or pass --results DIR)")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; --results takes the results folder")
    if not (root / DB_NAME).exists():
        raise UserError(f"no results store in {root} (no {DB_NAME}); run `circuitbench run` first")
    store = ResultsStore(root, readonly=True)
    runs = store.runs(with_metrics=True)
    failed = store.runs(status="failed")
    if "status" in failed.columns:
        failed = failed[failed["status"] == "failed"].reset_index(drop=True)
    references = store.reference_metrics()
    configs = [_config(c) for c in runs["config"]] if len(runs) else []
    runs["eval_limit"] = [c.get("eval_limit") for c in configs] if len(runs) else pd.Series(dtype=float)
    runs["eval_limit"] = pd.to_numeric(runs["eval_limit"], errors="coerce")
    is_derived = runs["derived_from"].notna().astype(bool)
    # Comparisons count the edges that act: a run stored before effective edges were recorded counts
    # all its edges.
    runs["n_effective"] = runs["n_effective"].fillna(runs["n_edges"]) if len(runs) else runs["n_effective"]
    runs["effective_sparsity"] = 1.0 - runs["n_effective"] / runs["total_edges"] if len(runs) \
        else pd.Series(dtype=float)
    runs["x_sparsity"] = runs["effective_sparsity"]
    derived = runs[is_derived].reset_index(drop=True)
    runs = runs[~is_derived].reset_index(drop=True)
    runs["method_preset"] = runs["method_preset"].fillna("")
    if len(runs):
        # a method run another way (Edge Pruning's path, a warm start) is a series of its own: the
        # variant rides on the preset, so lines, markers and table rows tell them apart
        variants = [_variant(_config(c)) for c in runs["method_config"]]
        runs["method_preset"] = [p + (f", {v}" if p and v else v) for p, v in zip(runs["method_preset"], variants)]
    return ReportData(root=root, store=store, runs=runs, derived=derived, failed=failed, references=references,
                      edge_faithfulness=store.edge_faithfulness())
