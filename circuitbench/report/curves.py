"""Metric-against-sparsity curves: runs grouped into series and averaged over seeds; MIB-style AUC.

A *series* is one line of a panel: a method under one preset and training-set size
(`data.SERIES_KEYS`), its runs averaged over seeds at each target sparsity. The x value of a
point is the mean *effective* sparsity (1 - effective edges / all edges: edges on an input ->
logits path of kept edges) of its runs, so methods are compared by the size of the circuit that acts.

Areas under the normalised faithfulness curve (`normalised_panel`): the linear- and log-axis AUCs
integrate over that effective size; MIB's CPR and CMD (`mib_areas`) integrate over the *requested*
size, 1 - target sparsity, as MIB integrates over the percentages of edges it asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .data import ReportData, method_sort_key


@dataclass
class Curve:
    """One series of a (task, model) panel for one metric.

    ``points``: one row per target sparsity with ``target_sparsity``, ``sparsity`` (mean effective
    sparsity), ``kept`` (mean fraction of edges effective), ``n_edges`` (mean effective edges),
    ``n_edges_kept`` (mean edges, dangling ones included), ``mean``, ``std`` (over seeds; 0 for
    one seed), ``n_seeds``; ``run_ids``: the runs behind it.
    """

    task: str
    model: str
    metric: str
    method: str
    method_preset: str
    n_train: int
    label: str
    points: pd.DataFrame
    run_ids: list[str] = field(default_factory=list)

    @property
    def n_seeds(self) -> int:
        return int(self.points["n_seeds"].max()) if len(self.points) else 0


def series_label(method: str, preset: str, n_train, vary_preset: bool, vary_n: bool) -> str:
    parts = [method]
    if vary_preset and preset:
        parts.append(preset)
    if vary_n and n_train is not None and not pd.isna(n_train):
        parts.append(f"n={int(n_train):,}")
    return parts[0] if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


def panel_curves(data: ReportData, task: str, model: str, metric: str, split: str = "test") -> list[Curve]:
    """Every series of the (task, model) panel for ``metric`` on ``split``, in method order."""
    col = f"{split}/{metric}"
    runs = data.panel_runs(task, model)
    if col not in runs.columns:
        return []
    runs = runs[runs[col].notna()]
    if runs.empty:
        return []
    vary_preset = runs["method_preset"].nunique() > 1
    n_per_method = runs.groupby("method")["n_train"].nunique()
    curves = []
    groups = runs.groupby(["method", "method_preset", "n_train"], dropna=False, sort=False)
    keys = sorted(groups.groups, key=lambda k: (method_sort_key(k[0]), str(k[1]), _num(k[2])))
    for key in keys:
        method, preset, n_train = key
        g = groups.get_group(key)
        pts = (g.assign(kept=g["n_effective"] / g["total_edges"])
               .groupby("target_sparsity")
               .agg(sparsity=("effective_sparsity", "mean"), kept=("kept", "mean"), n_edges=("n_effective", "mean"),
                    n_edges_kept=("n_edges", "mean"),
                    mean=(col, "mean"), std=(col, "std"), n_seeds=(col, "size"))
               .reset_index().sort_values("sparsity"))
        pts["std"] = pts["std"].fillna(0.0)
        label = series_label(method, preset, n_train, vary_preset, n_per_method.get(method, 1) > 1)
        curves.append(Curve(task, model, metric, method, preset, n_train, label, pts.reset_index(drop=True),
                            list(g["run_id"])))
    return curves


def _num(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.inf
    return math.inf if math.isnan(v) else v


# ---- area under the normalised faithfulness curve ------------------------------------------------
@dataclass
class NormalisedCurve:
    """A series' normalised faithfulness f = (circuit − empty)/(full − empty) against the fraction
    of edges kept k, anchored at (0, 0) (the empty circuit) and (1, 1) (the full model)."""

    curve: Curve
    kept: np.ndarray
    faithfulness: np.ndarray
    auc_linear: float
    auc_log: float
    log_from: float
    full: float
    empty: float
    cpr: float = math.nan  # MIB's CPR and CMD (`mib_areas`), NaN when the sizes do not cover MIB's range
    cmd: float = math.nan
    mib_grid: str = ""  # which points CPR and CMD integrate (`mib_areas`)


def normalise(curve: Curve, full: float, empty: float) -> tuple[np.ndarray, np.ndarray]:
    """(k, f) sorted by k, with the empty-circuit and full-model anchors added where not measured."""
    k = curve.points["kept"].to_numpy(float)
    f = (curve.points["mean"].to_numpy(float) - empty) / (full - empty)
    order = np.argsort(k)
    k, f = k[order], f[order]
    if not len(k) or k[0] > 0:
        k, f = np.concatenate([[0.0], k]), np.concatenate([[0.0], f])
    if k[-1] < 1:
        k, f = np.concatenate([k, [1.0]]), np.concatenate([f, [1.0]])
    return k, f


def area_linear(k: np.ndarray, f: np.ndarray) -> float:
    """Trapezoid area of f over k in [0, 1]."""
    return float(np.trapezoid(f, k))


def area_log(k: np.ndarray, f: np.ndarray, k_from: float) -> float:
    """Trapezoid area of f over log10 k from ``k_from`` to 1, divided by the width of that range (so
    a curve at f = 1 throughout scores 1, as on the linear axis). f at ``k_from`` is interpolated
    linearly in log k between the measured points."""
    if not 0 < k_from < 1:
        return math.nan
    keep = k > 0
    x, y = np.log10(k[keep]), f[keep]
    lo = math.log10(k_from)
    if x[0] > lo + 1e-12:
        return math.nan  # the curve does not reach down to k_from: no honest value
    y_lo = float(np.interp(lo, x, y))
    inside = x > lo
    xs = np.concatenate([[lo], x[inside]])
    ys = np.concatenate([[y_lo], y[inside]])
    return float(np.trapezoid(ys, xs) / (0.0 - lo))


def mib_areas(curve: Curve, full: float, empty: float) -> tuple[float, float, str]:
    """(CPR, CMD, which points) of a series, MIB's definitions (`circuitbench.metrics`).

    x is the requested fraction of edges kept, 1 - target sparsity (MIB's percentages: a method's
    circuit for a budget sits at that budget, whatever size it reached; the linear and log AUCs use
    the effective size instead); f is the seed-mean normalised faithfulness of the task's main
    metric. The point k = 1 is the full model, f = 1 by definition, added when no run of sparsity 0
    was stored (MIB evaluates the full graph there, which is the model). The third value says which
    points were integrated: "MIB grid" (MIB's ten sizes all measured: exactly MIB's number),
    "measured: N sizes ..." (the measured sizes span 0.001 to 1 but are not MIB's: the trapezoid
    over them, not MIB's number), or "n/a: ..." (they do not reach k = 0.001: no value)."""
    from ..metrics import MIB_EDGE_FRACTIONS, circuit_model_distance, circuit_performance_ratio, mib_curve_points

    pts = curve.points
    k = 1.0 - pts["target_sparsity"].to_numpy(float)
    f = (pts["mean"].to_numpy(float) - empty) / (full - empty)
    if not np.isclose(k, 1.0, rtol=0, atol=1e-9).any():
        k, f = np.append(k, 1.0), np.append(f, 1.0)
    _, _, how = mib_curve_points(k, f)
    if how == "short":
        return math.nan, math.nan, (f"n/a: sizes from {100 * float(k.min()):.3g}% of the edges, MIB's from "
                                    f"{100 * min(MIB_EDGE_FRACTIONS):g}% (--sparsities mib)")
    cpr, cmd = float(circuit_performance_ratio(k, f)), float(circuit_model_distance(k, f))
    if how == "grid":
        return cpr, cmd, "MIB grid"
    inside = int((k >= min(MIB_EDGE_FRACTIONS) - 1e-9).sum())
    return cpr, cmd, f"measured: {inside} sizes from 0.001 to 1, not MIB's grid"


def main_variants(curves: list[Curve]) -> dict[str, tuple]:
    """Per method of a panel, the (preset, n_train) of its main series: its variant with the most
    points (the protocol's run of that method; ties go to the smaller training set). A method's other
    variants (scaling runs at n=400 and n=100,000, another preset) are side series."""
    counts: dict[str, dict[tuple, int]] = {}
    for c in curves:
        per = counts.setdefault(c.method, {})
        key = (c.method_preset, c.n_train)
        per[key] = per.get(key, 0) + len(c.points)
    return {m: max(per, key=lambda k: (per[k], -_num(k[1]))) for m, per in counts.items()}


def is_main(curve: Curve, mains: dict[str, tuple]) -> bool:
    return mains.get(curve.method) == (curve.method_preset, curve.n_train)


def normalised_panel(curves: list[Curve], full: float, empty: float) -> list[NormalisedCurve]:
    """Normalised curves and both areas for the series of one panel. The log axis covers the
    fractions kept that every method's main series (`main_variants`) measured: from the largest of
    their smallest measured k up to 1, so those methods are integrated over the same range; a series
    that does not reach down that far (a scaling run at one sparsity, say) has no log-axis area (NaN)."""
    if not curves or full is None or empty is None or not math.isfinite(full - empty) or full == empty:
        return []
    mains = main_variants(curves)
    measured_min = [float(c.points["kept"].min()) for c in curves if len(c.points) and is_main(c, mains)]
    positive = [m for m in measured_min if m > 0]
    log_from = max(positive) if positive else math.nan
    out = []
    for c in curves:
        k, f = normalise(c, full, empty)
        out.append(NormalisedCurve(c, k, f, area_linear(k, f),
                                   area_log(k, f, log_from) if math.isfinite(log_from) else math.nan,
                                   log_from, full, empty, *mib_areas(c, full, empty)))
    return out


def normalised_panels(data: ReportData):
    """For every (task, model) panel with an AUC metric: (task, model, metric, its curves
    normalised against the full model and the empty circuit; empty when they cannot be)."""
    from .data import auc_metric

    for task, model in data.panels:
        metric = auc_metric(data.test_metrics(task))
        if metric is None:
            continue
        full, empty = data.reference(task, model, "full", metric), data.reference(task, model, "empty", metric)
        yield task, model, metric, normalised_panel(panel_curves(data, task, model, metric), full, empty)

