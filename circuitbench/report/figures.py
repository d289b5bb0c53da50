"""The report's figures: metric against edges kept per task (paper figures 2, 3, 5, 6) and the AUC.

Each function takes the `ReportData` and returns an `Artifact` holding a matplotlib Figure, or
the reason there is nothing to draw. In every metric panel a method's line is the mean over
seeds at each target sparsity (x = mean fraction of edges kept that are effective, i.e. on an
input -> logits path, on a log axis, so 90% to 99.9% sparsity gets the room it needs) with
a ±1 standard deviation band when there are several seeds; series lines carry ``gid="series"`` and reference lines
``gid="reference"`` (tests count them).
"""
from __future__ import annotations

import math


from . import style
from .artifact import Artifact
from .curves import Curve, is_main, main_variants, normalised_panels, panel_curves
from .data import (ReportData, accuracy_metric, exact_metric, faithfulness_metric, metric_label,
                   performance_metric)

# The empty circuit's value is drawn as a line when it lies within this many data ranges of the
# curves; further out it would squash every curve into a sliver, so it is written at the edge.
OFF_SCALE_SPANS = 1.5


def _grid(n_panels: int, width: float = 4.3, height: float = 3.4):
    import matplotlib.pyplot as plt

    ncols = min(n_panels, 4)
    nrows = math.ceil(n_panels / ncols)
    # at least wide enough for the title and a legend row, however few panels there are
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(width * ncols, 7.0), height * nrows + 0.9), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def _panel_title(task: str, model: str) -> str:
    return f"{task}\n{model}"


class Variants:
    """Marker per variant of a method (preset, training-set size). In each panel each method's
    variant with the most points (its main series: the protocol's run of that method) is drawn with
    circles; the method's other variants (e.g. the scaling runs at n=400 and n=100,000) get a marker
    of their own, the same for every method and panel, and the legend names them. Colour says the
    method, marker the variant."""

    MAIN = "o"

    def __init__(self, panels: list[list[Curve]]):
        self.main: dict[tuple, tuple] = {}
        others: dict[tuple, int] = {}
        for curves in panels:
            mains = main_variants(curves)
            for method, main in mains.items():
                self.main[(curves[0].task, curves[0].model, method)] = main
            for c in curves:
                if not is_main(c, mains):
                    others[self.key(c)] = others.get(self.key(c), 0) + len(c.points)
        order = sorted(others, key=lambda k: (str(k[0]), _number(k[1])))
        markers = [m for m in style.MARKERS if m != self.MAIN]
        self.marker = {k: markers[i % len(markers)] for i, k in enumerate(order)}
        self.vary_preset = len({k[0] for k in others}) > 1
        self.vary_n = len({k[1] for k in others}) > 1 or bool(others)

    @staticmethod
    def key(curve: Curve) -> tuple:
        return (curve.method_preset, curve.n_train)

    def of(self, curve: Curve) -> str:
        if self.main.get((curve.task, curve.model, curve.method)) == self.key(curve):
            return self.MAIN
        return self.marker[self.key(curve)]

    def label(self, key) -> str:
        parts = []
        if self.vary_preset and key[0]:
            parts.append(f"preset {key[0]}")
        if self.vary_n and key[1] is not None and not (isinstance(key[1], float) and math.isnan(key[1])):
            parts.append(f"n={int(key[1]):,}")
        return ", ".join(parts)

    def legend_entries(self) -> list[tuple[str, str]]:
        """(marker, label) pairs, the main series first; empty when no method has a second variant."""
        if not self.marker:
            return []
        return [(self.MAIN, "each method's main series")] + [(m, self.label(k)) for k, m in self.marker.items()]


def _number(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.inf
    return math.inf if math.isnan(v) else v


def _draw_series(ax, curves: list[Curve], colours, variants: Variants) -> list[float]:
    """Draw each series (line, markers, ±std band) against the fraction of edges kept (effective);
    returns every y value drawn (for scaling)."""
    ys = []
    for c in curves:
        p = c.points
        x = p["kept"].to_numpy(float)
        y = p["mean"].to_numpy(float)
        sd = p["std"].to_numpy(float)
        colour = colours[c.method]
        (line,) = ax.plot(x, y, marker=variants.of(c), markersize=5, linewidth=1.6, color=colour, label=c.label)
        line.set_gid("series")
        ys += list(y)
        if (p["n_seeds"] > 1).any():
            ax.fill_between(x, y - sd, y + sd, color=colour, alpha=0.18, linewidth=0)
            ys += list(y - sd) + list(y + sd)
    return ys


def _kept_axis(ax) -> None:
    """A log axis of the fraction of edges kept, a labelled tick per decade: the range where
    the methods differ (90% to 99.9% sparsity) gets as much room as the rest."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


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
    # the note goes in the top (bottom) corner on the side away from the curves' extreme values
    extreme_x = [x for line in ax.get_lines() if line.get_gid() == "series"
                 for x, y in zip(line.get_xdata(), line.get_ydata()) if y == (max if above else min)(ys)]
    x0, x1 = ax.get_xlim()
    right = not extreme_x or extreme_x[0] < (x0 + x1) / 2
    ax.annotate(f"empty circuit: {empty:.3g} {'↑' if above else '↓'}",
                xy=(0.98 if right else 0.02, 0.97 if above else 0.03), xycoords="axes fraction",
                ha="right" if right else "left", va="top" if above else "bottom", fontsize=8.5,
                color=style.EMPTY_STYLE["color"],
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.9})


def _legend(fig, axes, methods: list[str], colours, variants: Variants | None, rect_top: float = 1.0) -> None:
    """One legend below the panels: a colour per method, a marker per variant (when the figure has
    several), then the reference lines that appear; then lay the panels out above it (see
    `style.fit_panels`; ``rect_top`` is for room above the panels other than the suptitle's)."""
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for m in methods:
        handles.append(Line2D([], [], color=colours[m], linewidth=2, marker="o" if variants is None else None))
        labels.append(m)
    for marker, label in variants.legend_entries() if variants is not None else []:
        handles.append(Line2D([], [], color="0.35", linestyle="none", marker=marker, markersize=6))
        labels.append(label)
    present = {l.get_label() for ax in axes for l in ax.get_lines() if l.get_gid() == "reference"}
    for name, st in (("full model", style.FULL_STYLE), ("empty circuit", style.EMPTY_STYLE)):
        if name in present:
            handles.append(Line2D([], [], **st))
            labels.append(name)
    # as many entries per row as fit the figure's width (an entry: handle, gap and its text)
    fig_w = fig.get_size_inches()[0]
    entry_w = max(0.75 + 0.085 * len(label) for label in labels)
    ncol = max(1, min(len(labels), int((fig_w - 0.3) // entry_w)))
    legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 0.0),
                        borderaxespad=0.2)
    style.fit_panels(fig, legend, rect_top)


def metric_figure(data: ReportData, name: str, title: str, pick, caption: str, what: str,
                  full_reference: bool = True, empty_reference: bool = True) -> Artifact:
    """One panel per (task, model) with the metric ``pick(task's stored metric names)``, one line per
    series, the full model (dashed) and empty circuit (dotted) marked from the stored references."""
    art = Artifact(name=name, title=title, section=name,
                   caption=caption + " x: fraction of edges kept (effective), (edges on an input → logits path "
                                     "of kept edges) / (all edges), log axis; dangling edges act on nothing and "
                                     "are not counted. Effective sparsity is 1 − x.")
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
    all_curves = [c for *_, curves in panels for c in curves]
    variants = Variants([curves for *_, curves in panels])
    methods = list(dict.fromkeys(c.method for c in all_curves))
    fig, axes = _grid(len(panels))
    for ax, (task, model, metric, curves) in zip(axes, panels):
        ys = _draw_series(ax, curves, colours, variants)
        _kept_axis(ax)
        full = data.reference(task, model, "full", metric) if full_reference else None
        empty = data.reference(task, model, "empty", metric) if empty_reference else None
        _draw_references(ax, ys, full, empty)
        if data.reference_id(task, model) is None:
            art.notes.append(f"{task} ({model}): no reference metrics stored; full model and empty circuit "
                             f"not marked")
        ax.set_title(_panel_title(task, model))
        ax.set_xlabel("fraction of edges kept (effective)")
        ax.set_ylabel(metric_label(metric))
        for c in curves:
            art.run_ids += c.run_ids
    fig.suptitle(title, y=0.995)
    _legend(fig, axes, methods, colours, variants)
    art.figure = fig
    return art


def faithfulness(data: ReportData) -> Artifact:
    """Paper figure 2: KL(full ‖ circuit) against edges kept (MSE to the full model for numeric Tracr)."""
    return metric_figure(
        data, "faithfulness", "Faithfulness: KL divergence against edges kept", faithfulness_metric,
        "KL(full model ‖ circuit) on the test split against the edges kept (lower is more "
        "faithful; MSE to the full model for tracr-xproportion). Mean over seeds, band ±1 s.d. when there "
        "are several; full model (KL 0) dashed, empty circuit dotted.", "faithfulness metric (kl / mse_full)")


def performance(data: ReportData) -> Artifact:
    """Paper figure 3: logit difference (IOI, GP, boolexpr) or probability difference (GT)."""
    return metric_figure(
        data, "performance", "Performance: task metric against edges kept", performance_metric,
        "Logit difference (ioi-t1, ioi, gp, boolexpr) or probability difference (gt) of the circuit on "
        "the test split; the full model dashed, the empty circuit dotted.", "logit or probability difference")


def exact_match(data: ReportData) -> Artifact:
    """Paper figure 5: exact match (Kendall's τ for GT)."""
    return metric_figure(
        data, "exact_match", "Exact match against edges kept (Kendall's τ for gt)", exact_metric,
        "Fraction of examples whose circuit's top prediction equals the full model's (gt: Kendall's τ "
        "between the circuit's and the full model's year-probability rankings).", "exact match or Kendall's τ")


def accuracy(data: ReportData) -> Artifact:
    """Paper figure 6: accuracy (probability difference 10 for GT)."""
    return metric_figure(
        data, "accuracy", "Accuracy against edges kept (probability difference 10 for gt)", accuracy_metric,
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
    for task, model, metric, normed in normalised_panels(data):
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
    all_curves = [n.curve for *_, normed in panels for n in normed]
    variants = Variants([[n.curve for n in normed] for *_, normed in panels])
    methods = list(dict.fromkeys(c.method for c in all_curves))
    fig, axes = _grid(len(panels))
    for ax, (task, model, metric, normed) in zip(axes, panels):
        for n in normed:
            colour = colours[n.curve.method]
            measured = n.curve.points.sort_values("kept")
            k = measured["kept"].to_numpy(float)
            f = (measured["mean"].to_numpy(float) - n.empty) / (n.full - n.empty)
            (line,) = ax.plot(k, f, marker=variants.of(n.curve), markersize=4, linewidth=1.5, color=colour,
                              label=n.curve.label)
            line.set_gid("series")
            # the stretch up to the full model at k = 1 is the anchor, not a measurement
            if len(k) and k[-1] < 1:
                ax.plot([k[-1], 1.0], [f[-1], 1.0], color=colour, linewidth=0.9, linestyle=":", alpha=0.8)
            art.run_ids += n.curve.run_ids
        _kept_axis(ax)
        lo = normed[0].log_from
        if math.isfinite(lo):
            ax.axvspan(lo, 1.0, color="0.5", alpha=0.07, linewidth=0)
        ax.axhline(1.0, label="full model", **style.FULL_STYLE).set_gid("reference")
        ax.axhline(0.0, label="empty circuit", **style.EMPTY_STYLE).set_gid("reference")
        ax.set_title(_panel_title(task, model))
        ax.set_xlabel("fraction of edges kept (effective)")
        ax.set_ylabel(f"normalised {metric_label(metric)}")
    fig.suptitle(art.title, y=0.995)
    _legend(fig, axes, methods, colours, variants)
    art.figure = fig
    return art


def auc_bars(auc_table) -> Artifact:
    """Bars of the AUC table: per task a group of bars (one per series: colour = method, hatch =
    a variant other than the method's main series), linear axis above, log axis below, values on top."""
    art = Artifact(name="auc", title="Area under the normalised faithfulness curve", section="auc",
                   caption="One number per method and task (higher is better; 1 = as faithful as the full "
                           "model at every size), integrated on a linear and a log axis of edges kept. Hatched "
                           "bars: a method's runs outside its main series (another training-set size or preset). Below them, "
                           "when some series has them, MIB's CPR (higher is better) and CMD (lower is better) "
                           "(see the AUC table for which points each integrates; 'n/a' where the sizes do not "
                           "reach 0.1% of the edges).")
    if auc_table is None or auc_table.empty:
        art.reason = "no AUC could be computed (needs runs and full-model/empty-circuit references)"
        return art
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    style.apply_theme()
    colours = style.method_colours(auc_table["method"].unique())
    groups = list(dict.fromkeys(zip(auc_table["task"], auc_table["model"])))
    one_model = len({m for _, m in groups}) == 1
    positions, centres, x = [], [], 0.0
    hatches: dict[str, str] = {}
    for task, model in groups:
        rows = auc_table[(auc_table["task"] == task) & (auc_table["model"] == model)]
        # each method's main series: its (preset, n_train) with the most points; others are hatched
        main = {}
        for method, per in rows.groupby("method", sort=False):
            size = per.groupby(["preset", "n_train"], dropna=False)["sparsities"].sum()
            main[method] = max(size.index, key=lambda k: (size[k], -_number(k[1])))
        width = max(len(rows), 2.4)  # a narrow group would crowd its two-line label
        start = x + (width - len(rows)) / 2
        for i, (_, r) in enumerate(rows.iterrows()):
            variant = None
            if (r["preset"], r["n_train"]) != main[r["method"]]:
                variant = r["series"][len(r["method"]):].strip(" ()")
                hatches.setdefault(variant, ("//", "xx", "..", "\\\\", "++")[len(hatches) % 5])
            positions.append((start + i, r, variant))
        centres.append(start + (len(rows) - 1) / 2)
        x += width + 0.8  # gap between tasks
    panels = [("auc_linear", "AUC, linear axis", "normalised faithfulness AUC"),
              ("auc_log", "AUC, log axis", "normalised faithfulness AUC")]
    for col, title in (("cpr", "MIB's CPR (higher is better)"), ("cmd", "MIB's CMD (lower is better)")):
        if col in auc_table and auc_table[col].map(lambda v: math.isfinite(_number(v))).any():
            panels.append((col, title, col.upper()))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 0.42 * x + 2.0), 3.3 * len(panels)), squeeze=False)
    for ax, (col, title, ylabel) in zip(axes[:, 0], panels):
        top = 1.0
        for xpos, r, variant in positions:
            value = float(r[col])
            bar = ax.bar(xpos, value if math.isfinite(value) else 0.0, 0.85, color=colours[r["method"]],
                         hatch=hatches.get(variant), edgecolor="white", linewidth=0.5)
            bar.patches[0].set_gid("series")
            ax.text(xpos, (value if math.isfinite(value) else 0.0) + 0.02, f"{value:.2f}" if math.isfinite(value)
                    else "n/a", ha="center", va="bottom", fontsize=7, rotation=90 if len(positions) > 24 else 0)
            if math.isfinite(value):
                top = max(top, value)
        ax.set_xticks(centres)
        ax.set_xticklabels([t if one_model else f"{t}\n{m}" for t, m in groups], fontsize=9)
        ax.set_ylim(min(0.0, *(float(v) for v in auc_table[col] if math.isfinite(_number(v)))), top + 0.18)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.axhline(0.0 if col == "cmd" else 1.0, **style.FULL_STYLE)  # the full model's value
    methods = list(dict.fromkeys(auc_table["method"]))
    handles = [Patch(facecolor=colours[m]) for m in methods] + \
              [Patch(facecolor="0.75", hatch=h, edgecolor="white") for h in hatches.values()]
    labels = methods + list(hatches)
    legend = fig.legend(handles, labels, loc="lower center", ncol=style.legend_columns(fig, labels), frameon=False,
                        borderaxespad=0.2)
    fig.suptitle(art.title, y=0.995)
    style.fit_panels(fig, legend)
    art.figure = fig
    return art
