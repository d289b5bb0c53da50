"""The report's figures: metric against sparsity per task (paper figures 2, 3, 5, 6) and the AUC.

Each function takes the `ReportData` and returns an `Artifact` holding a matplotlib Figure, or
the reason there is nothing to draw. In every metric panel a method's line is the mean over
seeds at each target sparsity (x = mean realised sparsity) with a ±1 standard deviation band
when there are several seeds; series lines carry ``gid="series"`` and reference lines
``gid="reference"`` (tests count them).
"""
from __future__ import annotations

import math

import numpy as np

from . import style
from .artifact import Artifact
from .curves import Curve, normalised_panel, panel_curves
from .data import (ReportData, accuracy_metric, auc_metric, exact_metric, faithfulness_metric, metric_label,
                   performance_metric)

# The empty circuit's value is drawn as a line when it lies within this many data ranges of the
# curves; further out it would squash every curve into a sliver, so it is written at the edge.
OFF_SCALE_SPANS = 1.5


def _grid(n_panels: int, width: float = 4.3, height: float = 3.4):
    import matplotlib.pyplot as plt

    ncols = min(n_panels, 4)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.6), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def _panel_title(task: str, model: str) -> str:
    return f"{task}\n{model}"


def _draw_series(ax, curves: list[Curve], colours) -> list[float]:
    """Draw each series (line, markers, ±std band); returns every y value drawn (for scaling)."""
    ys = []
    variant = {}
    for c in curves:
        i = variant.setdefault(c.method, 0)
        variant[c.method] = i + 1
        p = c.points
        x = p["sparsity"].to_numpy(float)
        y = p["mean"].to_numpy(float)
        sd = p["std"].to_numpy(float)
        colour = colours[c.method]
        (line,) = ax.plot(x, y, marker=style.MARKERS[i % len(style.MARKERS)], markersize=4.5, linewidth=1.6,
                          color=colour, label=c.label)
        line.set_gid("series")
        ys += list(y)
        if (p["n_seeds"] > 1).any():
            ax.fill_between(x, y - sd, y + sd, color=colour, alpha=0.18, linewidth=0)
            ys += list(y - sd) + list(y + sd)
    return ys


def _draw_references(ax, ys: list[float], full: float | None, empty: float | None) -> None:
    """Full model dashed, empty circuit dotted; an empty-circuit value far off the data's range is
    written at the panel's edge instead (with its value), so the curves stay readable."""
    values = [v for v in ys if math.isfinite(v)]
    if full is not None:
        values.append(full)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    span = max(hi - lo, 1e-9)
    if full is not None:
        ax.axhline(full, label="full model", **style.FULL_STYLE).set_gid("reference")
    if empty is None:
        return
    if lo - OFF_SCALE_SPANS * span <= empty <= hi + OFF_SCALE_SPANS * span:
        ax.axhline(empty, label="empty circuit", **style.EMPTY_STYLE).set_gid("reference")
        return
    pad = 0.08 * span
    ax.set_ylim(lo - pad, hi + pad)
    above = empty > hi
    ax.annotate(f"empty circuit: {empty:.3g} {'↑' if above else '↓'}", xy=(0.98, 0.97 if above else 0.03),
                xycoords="axes fraction", ha="right", va="top" if above else "bottom", fontsize=8.5,
                color=style.EMPTY_STYLE["color"],
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.9})


def _legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    # references last, methods in their drawing order
    order = [l for l in labels if l not in ("full model", "empty circuit")] + \
            [l for l in ("full model", "empty circuit") if l in handles]
    if order:
        fig.legend([handles[l] for l in order], order, loc="lower center", ncol=min(len(order), 6),
                   frameon=False, bbox_to_anchor=(0.5, 0.0))


def metric_figure(data: ReportData, name: str, title: str, pick, caption: str, what: str,
                  full_reference: bool = True, empty_reference: bool = True) -> Artifact:
    """One panel per (task, model) with the metric ``pick(task's stored metric names)``, one line per
    series, the full model (dashed) and empty circuit (dotted) marked from the stored references."""
    from matplotlib.ticker import PercentFormatter

    art = Artifact(name=name, title=title, section=name, caption=caption)
    panels = []
    for task, model in data.panels:
        metric = pick(data.test_metrics(task))
        if metric is None:
            art.notes.append(f"{task} ({model}) stores no {what}; not drawn")
            continue
        curves = panel_curves(data, task, model, metric)
        if curves:
            panels.append((task, model, metric, curves))
    if not panels:
        art.reason = f"no runs with {what} in the store" if not data.runs.empty else "the store holds no runs"
        return art
    style.apply_theme()
    colours = style.method_colours(data.runs["method"].unique())
    fig, axes = _grid(len(panels))
    for ax, (task, model, metric, curves) in zip(axes, panels):
        ys = _draw_series(ax, curves, colours)
        full = data.reference(task, model, "full", metric) if full_reference else None
        empty = data.reference(task, model, "empty", metric) if empty_reference else None
        _draw_references(ax, ys, full, empty)
        if data.reference_id(task, model) is None:
            art.notes.append(f"{task} ({model}): no reference metrics stored; full model and empty circuit "
                             f"not marked")
        ax.set_title(_panel_title(task, model))
        ax.set_xlabel("sparsity")
        ax.set_ylabel(metric_label(metric))
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        for c in curves:
            art.run_ids += c.run_ids
    fig.suptitle(title, y=0.995)
    _legend(fig, axes)
    fig.tight_layout(rect=(0, 0.07 if len(axes) <= 4 else 0.04, 1, 0.97))
    art.figure = fig
    return art


def faithfulness(data: ReportData) -> Artifact:
    """Paper figure 2: KL(full ‖ circuit) against sparsity (MSE to the full model for numeric Tracr)."""
    return metric_figure(
        data, "faithfulness", "Faithfulness: KL divergence against sparsity", faithfulness_metric,
        "KL(full model ‖ circuit) on the test split against the realised sparsity (lower is more "
        "faithful; MSE to the full model for tracr-xproportion). Mean over seeds, band ±1 s.d. when there "
        "are several; full model (KL 0) dashed, empty circuit dotted.", "faithfulness metric (kl / mse_full)")


def performance(data: ReportData) -> Artifact:
    """Paper figure 3: logit difference (IOI, GP, boolexpr) or probability difference (GT)."""
    return metric_figure(
        data, "performance", "Performance: task metric against sparsity", performance_metric,
        "Logit difference (ioi-t1, ioi, gp, boolexpr) or probability difference (gt) of the circuit on "
        "the test split; the full model dashed, the empty circuit dotted.", "logit or probability difference")


def exact_match(data: ReportData) -> Artifact:
    """Paper figure 5: exact match (Kendall's τ for GT)."""
    return metric_figure(
        data, "exact_match", "Exact match against sparsity (Kendall's τ for gt)", exact_metric,
        "Fraction of examples whose circuit's top prediction equals the full model's (gt: Kendall's τ "
        "between the circuit's and the full model's year-probability rankings).", "exact match or Kendall's τ")


def accuracy(data: ReportData) -> Artifact:
    """Paper figure 6: accuracy (probability difference 10 for GT)."""
    return metric_figure(
        data, "accuracy", "Accuracy against sparsity (probability difference 10 for gt)", accuracy_metric,
        "Fraction of examples whose circuit's top prediction is the correct answer (gt: probability "
        "difference restricted to the 10 years around the start year).", "accuracy or probability difference 10")


def auc_curves(data: ReportData) -> Artifact:
    """The normalised faithfulness curves the AUC integrates, on a log axis of edges kept."""
    art = Artifact(name="auc_curves", title="Normalised faithfulness against fraction of edges kept",
                   section="auc",
                   caption="(circuit − empty)/(full − empty) of each task's main metric (logit difference, "
                           "probability difference; accuracy for tracr-reverse, MSE for tracr-xproportion) "
                           "against the fraction of edges kept, log axis; anchored at the empty circuit (0) and "
                           "the full model (1 at all edges). The shaded range is what the log-axis AUC covers.")
    panels = []
    for task, model in data.panels:
        metric = auc_metric(data.test_metrics(task))
        if metric is None:
            continue
        full, empty = data.reference(task, model, "full", metric), data.reference(task, model, "empty", metric)
        normed = normalised_panel(panel_curves(data, task, model, metric), full, empty)
        if normed:
            panels.append((task, model, metric, normed))
        else:
            art.notes.append(f"{task} ({model}): no full-model/empty-circuit references for {metric} "
                             f"(or they are equal); cannot normalise")
    if not panels:
        art.reason = ("no task has both runs and full-model/empty-circuit references to normalise against"
                      if not data.runs.empty else "the store holds no runs")
        return art
    style.apply_theme()
    colours = style.method_colours(data.runs["method"].unique())
    fig, axes = _grid(len(panels))
    for ax, (task, model, metric, normed) in zip(axes, panels):
        variant = {}
        for n in normed:
            i = variant.setdefault(n.curve.method, 0)
            variant[n.curve.method] = i + 1
            keep = n.kept > 0
            (line,) = ax.plot(n.kept[keep], n.faithfulness[keep], marker=style.MARKERS[i % len(style.MARKERS)],
                              markersize=4, linewidth=1.5, color=colours[n.curve.method], label=n.curve.label)
            line.set_gid("series")
            art.run_ids += n.curve.run_ids
        ax.set_xscale("log")
        lo = normed[0].log_from
        if math.isfinite(lo):
            ax.axvspan(lo, 1.0, color="0.5", alpha=0.07, linewidth=0)
        ax.axhline(1.0, label="full model", **style.FULL_STYLE).set_gid("reference")
        ax.axhline(0.0, label="empty circuit", **style.EMPTY_STYLE).set_gid("reference")
        ax.set_title(_panel_title(task, model))
        ax.set_xlabel("fraction of edges kept")
        ax.set_ylabel(f"normalised {metric_label(metric)}")
    fig.suptitle(art.title, y=0.995)
    _legend(fig, axes)
    fig.tight_layout(rect=(0, 0.07 if len(axes) <= 4 else 0.04, 1, 0.97))
    art.figure = fig
    return art


def auc_bars(auc_table) -> Artifact:
    """Bars of the AUC table: per task (x) one bar per series, linear and log axis side by side."""
    art = Artifact(name="auc", title="Area under the normalised faithfulness curve", section="auc",
                   caption="One number per method and task (higher is better; 1 = as faithful as the full "
                           "model at every size), integrated on a linear and a log axis of edges kept.")
    if auc_table is None or auc_table.empty:
        art.reason = "no AUC could be computed (needs runs and full-model/empty-circuit references)"
        return art
    import matplotlib.pyplot as plt

    style.apply_theme()
    colours = style.method_colours(auc_table["method"].unique())
    panels = list(dict.fromkeys(zip(auc_table["task"], auc_table["model"])))
    series = list(dict.fromkeys(zip(auc_table["method"], auc_table["series"])))
    width = 0.8 / max(len(series), 1)
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.2 * len(panels) * max(len(series), 2) * 0.6 + 3) * 1.0, 3.8),
                             squeeze=False)
    for ax, col, label in zip(axes[0], ("auc_linear", "auc_log"), ("linear axis", "log axis")):
        for i, (method, name) in enumerate(series):
            rows = auc_table[auc_table["series"] == name].set_index(["task", "model"])
            heights = [float(rows.loc[p, col]) if p in rows.index else np.nan for p in panels]
            bars = ax.bar(np.arange(len(panels)) + (i - (len(series) - 1) / 2) * width, heights, width,
                          color=colours[method], label=name)
            for bar in bars:
                bar.set_gid("series")
        ax.set_xticks(np.arange(len(panels)))
        ax.set_xticklabels([t if len({m for _, m in panels}) == 1 else f"{t}\n{m}" for t, m in panels],
                           rotation=20 if len(panels) > 4 else 0)
        ax.set_title(f"AUC, {label}")
        ax.set_ylabel("normalised faithfulness AUC")
        ax.axhline(1.0, **style.FULL_STYLE)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.suptitle(art.title, y=0.995)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    art.figure = fig
    art.run_ids = []
    return art
