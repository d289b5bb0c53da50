"""Edge faithfulness (paper appendix D, figure 7): the figure and tables of what the store holds.

For every edge e of a circuit C the store's ``edge_faithfulness`` table holds the task's loss of
the full model without e (``model_without``) and of the circuit without e (``circuit_without``);
`circuitbench.faithfulness` computes them (`circuitbench report --edge-faithfulness` runs it before
building the report). This module only draws the stored rows (`ResultsStore.edge_faithfulness`).
"""
from __future__ import annotations

import math

import pandas as pd

from .artifact import Artifact

CLIP_RATIO = 1e-4  # the figure's log axes span at most this ratio below the largest value


# ---- report artifacts ----------------------------------------------------------------------------
def _edge_kind(edge: str) -> str:
    reader = edge.split("->", 1)[1]
    if reader == "logits":
        return "logits"
    if reader.endswith(">"):
        return reader[-2]
    return "mlp"


def figure(rows: pd.DataFrame) -> Artifact:
    """Scatter of loss(model ‖ C − e) against loss(model ‖ model − e), one panel per study."""
    art = Artifact(name="edge_faithfulness", title="Edge faithfulness", section="edge_faithfulness",
                   caption="Each point is an edge e of the circuit: x = loss of the full model without e, y = loss of "
                           "the circuit without e (both against the full model; KL, or MSE for numeric Tracr "
                           "output), log axes. Points above the diagonal: the edge matters more inside the circuit "
                           "than in the whole model. The dotted line is the circuit's own loss. Values under 1e-4 of "
                           "the largest are drawn hollow on the axes' floor.")
    if rows.empty:
        art.reason = ("no edge-faithfulness study stored; compute one with `circuitbench report "
                      "--edge-faithfulness CIRCUIT.json|RUN_ID`")
        return art
    import matplotlib.pyplot as plt
    import numpy as np

    from . import style
    from .diagrams import EDGE_STYLE

    style.apply_theme()
    studies = list(dict.fromkeys(rows["study_id"]))
    ncols = min(len(studies), 3)
    nrows = math.ceil(len(studies) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.3 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(studies):]:
        ax.set_visible(False)
    for ax, sid in zip(flat, studies):
        s = rows[rows["study_id"] == sid]
        x, y = s["model_without"].to_numpy(float), s["circuit_without"].to_numpy(float)
        # log axes: values below 1e-4 of the largest (an edge that changes nothing) sit on the floor,
        # drawn hollow, so one zero does not stretch the axes over ten decades
        top = max(float(np.nanmax(np.concatenate([x, y]))), 1e-12)
        floor = top * CLIP_RATIO
        xs, ys = np.maximum(x, floor), np.maximum(y, floor)
        clipped = (x < floor) | (y < floor)
        kinds = np.array([_edge_kind(e) for e in s["edge"]])
        for kind in ("q", "k", "v", "mlp", "logits"):
            sel = kinds == kind
            if not sel.any():
                continue
            colour = EDGE_STYLE[kind]["color"]
            pts = ax.scatter(xs[sel & ~clipped], ys[sel & ~clipped], s=16, alpha=0.8, color=colour,
                             label=f"→ {'MLP' if kind == 'mlp' else kind}", linewidths=0)
            pts.set_gid("series")
            if (sel & clipped).any():
                ax.scatter(xs[sel & clipped], ys[sel & clipped], s=22, facecolors="none", edgecolors=colour,
                           linewidths=1.0)
        if clipped.any():
            ax.scatter([], [], s=22, facecolors="none", edgecolors="0.3", label=f"< {floor:.1g} (on the floor)")
        lo, hi = floor, top
        ax.plot([lo, hi], [lo, hi], color="0.4", linewidth=1, linestyle="--", label="y = x")
        circuit_loss = float(s["circuit_loss"].iloc[0])
        if circuit_loss > floor:
            ax.axhline(circuit_loss, color="0.2", linestyle=":", linewidth=1.2, label="circuit's own loss")
        ax.set_xscale("log")
        ax.set_yscale("log")
        loss = "KL" if s["loss"].iloc[0] == "kl" else "MSE"
        ax.set_xlabel(f"{loss}(model ‖ model − e)")
        ax.set_ylabel(f"{loss}(model ‖ circuit − e)")
        above = float((y > x).mean())
        ax.set_title(f"{s['circuit_name'].iloc[0]}\n{s['task'].iloc[0]} · {s['model'].iloc[0]} · {len(s)} edges\n"
                     f"{above:.0%} above y = x · circuit's own {loss} {circuit_loss:.2g}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        if pd.notna(s["run_id"].iloc[0]):
            art.run_ids.append(s["run_id"].iloc[0])
    fig.suptitle(art.title, y=0.995)
    style.fit_panels(fig)  # no blank band between the suptitle and the panels
    art.figure = fig
    return art


def tables(rows: pd.DataFrame) -> list[Artifact]:
    """A summary per study and the per-edge values."""
    summary = Artifact(kind="table", name="edge_faithfulness", title="Edge faithfulness per circuit", section="edge_faithfulness",
                       caption="Per studied circuit: examples, edges, the circuit's own loss, the median over its "
                               "edges of the loss without the edge in the model and in the circuit, and the "
                               "fraction of edges that matter more in the circuit (circuit − e worse than model − e).")
    edges = Artifact(kind="table", name="edge_faithfulness_edges", title="Edge faithfulness per edge", section="edge_faithfulness",
                     caption="Every edge of every studied circuit, largest loss in the circuit first.")
    if rows.empty:
        summary.reason = edges.reason = "no edge-faithfulness study stored"
        return [summary, edges]
    out = []
    for sid, s in rows.groupby("study_id", sort=False):
        out.append({"circuit": s["circuit_name"].iloc[0], "task": s["task"].iloc[0], "model": s["model"].iloc[0],
                    "split": s["split"].iloc[0], "examples": int(s["n_examples"].iloc[0]), "edges": len(s),
                    "loss": s["loss"].iloc[0], "circuit loss": float(s["circuit_loss"].iloc[0]),
                    "median model − e": float(s["model_without"].median()),
                    "median circuit − e": float(s["circuit_without"].median()),
                    "matter more in circuit": float((s["circuit_without"] > s["model_without"]).mean()),
                    "study": sid})
    summary.table = pd.DataFrame(out)
    per_edge = rows[["circuit_name", "task", "model", "edge", "model_without", "circuit_without"]]
    edges.table = per_edge.sort_values(["circuit_name", "circuit_without"], ascending=[True, False]).rename(
        columns={"circuit_name": "circuit", "model_without": "model − e", "circuit_without": "circuit − e"}
    ).reset_index(drop=True)
    ids = [r for r in rows["run_id"].dropna().unique()]
    summary.run_ids = edges.run_ids = list(ids)
    return [summary, edges]
