"""The report: every table and figure rebuilt from the results store alone.

``build_report(results_dir, out_dir=None) -> dict`` reads the store (never reruns a method) and
writes, under ``out_dir`` (default ``<results_dir>/report``)::

    index.html            everything on one page, with the runs each item came from
    figures/NAME.png|pdf  faithfulness, performance, exact_match, accuracy (paper figures 2, 3, 5, 6),
                          auc_curves and auc, training_<task>_<model> (training curves),
                          tracr_<task> (figure 4), edge_faithfulness (figure 7),
                          circuit_<task>_<model>_<method>_s<sparsity> (appendix F diagrams)
    tables/NAME.md|csv|tex  scaling (table 1), runtime, training, warm_start, tracr_recovery, case_study
                          (table 2), auc,
                          edge_faithfulness, edge_faithfulness_edges

A figure or table without data is not written; the page says why in its place. A store without
runs gets a page saying so. The report only reads: it opens the store read-only and imports no
engine or model code (measurements it draws, such as edge faithfulness, are computed and recorded
beforehand: `circuitbench.faithfulness`). Modules: `data` (loading), `curves` (series, AUC), `figures`,
`tables`, `training`, `diagrams`, `edge_faithfulness`, `html`.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..errors import UserError
from .artifact import Artifact
from .data import ReportData, load_report_data

__all__ = ["Artifact", "ReportData", "build_report", "iter_artifacts", "load_report_data"]

# Written into the output folder so a rebuild may clear the figures/tables it made before (and
# never a folder of someone else's files that happens to be passed as --out).
MARKER = ".circuitbench-report"


def _guarded(name: str, title: str, section: str, build, kind: str = "figure"):
    """Run one builder (returning an Artifact or an iterable of them) and yield its artifacts; a
    `UserError` (a missing circuit file, say) becomes an item whose reason says so."""
    try:
        result = build()
        if isinstance(result, Artifact):
            yield result
        else:
            yield from result
    except UserError as err:
        yield Artifact(name=name, title=title, section=section, kind=kind, reason=f"could not be built: {err}")


def iter_artifacts(data: ReportData):
    """Every figure and table of the report (not yet written to disk), one builder at a time, so a
    caller can write and close each figure before the next is drawn."""
    from . import diagrams, edge_faithfulness, figures, tables, training

    for fn, name, title, section in (
            (figures.faithfulness, "faithfulness", "Faithfulness", "faithfulness"),
            (figures.performance, "performance", "Performance", "performance"),
            (figures.exact_match, "exact_match", "Exact match", "exact_match"),
            (figures.accuracy, "accuracy", "Accuracy", "accuracy"),
            (figures.auc_curves, "auc_curves", "Normalised faithfulness", "auc")):
        yield from _guarded(name, title, section, lambda fn=fn: fn(data))
    auc = list(_guarded("auc", "AUC", "auc", lambda: tables.auc_table(data), "table"))
    yield from _guarded("auc", "AUC", "auc", lambda: figures.auc_bars(auc[0].table))
    yield from auc
    for fn, name, title, section, kind in (
            (tables.scaling_table, "scaling", "Scaling", "scaling", "table"),
            (tables.runtime_table, "runtime", "Runtime", "runtime", "table"),
            (training.training_curves, "training", "Training curves", "training", "figure"),
            (training.training_table, "training", "Training runs", "training", "table"),
            (training.warm_start_table, "warm_start", "Warm start", "training", "table"),
            (diagrams.tracr_figures, "tracr", "Tracr recovery", "tracr", "figure"),
            (tables.tracr_recovery_table, "tracr_recovery", "Tracr recovery", "tracr", "table"),
            (tables.case_study_table, "case_study", "Case study", "case_study", "table")):
        yield from _guarded(name, title, section, lambda fn=fn: fn(data), kind)
    rows = data.edge_faithfulness
    yield from _guarded("edge_faithfulness", "Edge faithfulness", "edge_faithfulness",
                        lambda: edge_faithfulness.figure(rows))
    yield from edge_faithfulness.tables(rows)
    yield from _guarded("diagrams", "Circuit diagrams", "diagrams", lambda: diagrams.circuit_diagrams(data))


def _prepare(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MARKER).exists():
        for sub in ("figures", "tables"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    else:
        clash = [sub for sub in ("figures", "tables", "index.html") if (out_dir / sub).exists()]
        if clash:
            raise UserError(f"{out_dir} already holds {', '.join(clash)} not written by circuitbench report; "
                            f"choose another --out")
    (out_dir / MARKER).write_text("written by circuitbench report; figures/ and tables/ are rebuilt each time\n")


def build_report(results_dir, out_dir=None) -> dict:
    """Rebuild the report of the store at ``results_dir``; returns a summary of what was written:
    ``{"index": Path, "out_dir": Path, "empty": bool, "runs": int, "figures": {name: [paths]},
    "tables": {name: [paths]}, "missing": {"figures/NAME" or "tables/NAME": reason}, "seconds": float}``.
    Raises `UserError` when there is no store at ``results_dir``."""
    from .html import write_empty_index, write_index

    t0 = time.perf_counter()
    data = load_report_data(results_dir)
    try:
        out = Path(out_dir) if out_dir is not None else data.root / "report"
        try:
            _prepare(out)
        except OSError as err:
            raise UserError(f"cannot write the report to {out}: {err.strerror or err}") from None
        counts = data.store.counts()
        summary = {"out_dir": out, "empty": False, "runs": len(data.runs) + len(data.derived),
                   "figures": {}, "tables": {}, "missing": {}}
        if data.empty and data.edge_faithfulness.empty:
            summary.update(empty=True, index=write_empty_index(out, data.root, counts))
            summary["seconds"] = time.perf_counter() - t0
            return summary
        artifacts = []
        for art in iter_artifacts(data):
            artifacts.append(art)
            if art.has_data:
                files = art.save(out)
                summary["figures" if art.kind == "figure" else "tables"][art.name] = files
                art.close()
            else:
                summary["missing"][f"{art.kind}s/{art.name}"] = art.reason
        summary["index"] = write_index(out, data, artifacts, counts)
        summary["seconds"] = time.perf_counter() - t0
        return summary
    finally:
        data.store.close()
