"""Edge faithfulness (paper appendix D, figure 7): does each edge matter in the circuit as it does
in the model?

For every edge e of a circuit C, on a task's split:

* ``model_without``   = loss(model ‖ model without e): the full model with only e removed;
* ``circuit_without`` = loss(model ‖ C without e): the circuit with e removed as well;

where loss is the task's faithfulness loss (`Task.loss`: KL(full ‖ ·) at the scored positions, MSE
for numeric Tracr output), averaged over the examples, with the task's ablation. This is the one
part of the report that needs the model; `circuitbench report --edge-faithfulness` computes it
and stores it in the results database, and the report draws what is stored.

Stored in the table ``edge_faithfulness`` of ``results.db`` (created here with CREATE TABLE IF NOT
EXISTS; the runner's schema does not know it)::

    study_id TEXT          16 hex digits of sha256 of (circuit edges, model, task, split, data seed,
                           examples): one study = one circuit measured once; a rerun replaces it
    circuit_name TEXT      the run id, or the circuit file's name
    run_id TEXT            the stored run the circuit came from (NULL for an outside file)
    circuit_file TEXT      the path given
    task, model, split TEXT; data_seed, n_examples, circuit_edges INTEGER; device, loss TEXT
    circuit_loss REAL      loss(model ‖ C) itself
    edge TEXT              the edge's name (a3.h2->a5.h1<q>)
    model_without, circuit_without REAL
    created_at TEXT
    PRIMARY KEY (study_id, edge)
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from pathlib import Path

import pandas as pd

from ..errors import UserError
from .artifact import Artifact

TABLE = "edge_faithfulness"
CLIP_RATIO = 1e-4  # the figure's log axes span at most this ratio below the largest value
DEFAULT_LIMIT = 256
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    study_id TEXT NOT NULL,
    circuit_name TEXT,
    run_id TEXT,
    circuit_file TEXT,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    split TEXT NOT NULL,
    data_seed INTEGER,
    n_examples INTEGER,
    circuit_edges INTEGER,
    device TEXT,
    loss TEXT,
    circuit_loss REAL,
    edge TEXT NOT NULL,
    model_without REAL,
    circuit_without REAL,
    created_at TEXT,
    PRIMARY KEY (study_id, edge)
)"""
COLUMNS = ("study_id", "circuit_name", "run_id", "circuit_file", "task", "model", "split", "data_seed",
           "n_examples", "circuit_edges", "device", "loss", "circuit_loss", "edge", "model_without",
           "circuit_without", "created_at")


def compute(model, task, circuit, split: str = "test", limit: int | None = DEFAULT_LIMIT, batch_size: int = 32,
            seed: int = 0, progress: bool = True, n_train: int | None = None,
            n_validation: int | None = None) -> dict:
    """Both losses for every edge of ``circuit`` (a `Circuit` over ``model``'s graph), on ``split`` of
    the data built with ``seed`` and the split sizes ``n_train``, ``n_validation`` (a stored run's:
    its job's; None: the task's own).

    Returns ``{"edges": [names], "model_without": [..], "circuit_without": [..], "circuit_loss": float,
    "n_examples": int, "loss": "kl"|"mse"}``. Cost: 2 masked passes per edge and batch, plus one.
    """
    import torch
    from tqdm.auto import tqdm

    from ..engine import MaskedModel
    from ..tasks.base import DataSpec

    if circuit.graph != model.graph:
        raise UserError("the circuit is over a different graph than the model's")
    if circuit.n_edges == 0:
        raise UserError("the circuit has no edges; nothing to measure")
    splits = DataSpec(seed, n_train, n_validation).build(task, model.tokenizer)
    examples = splits.split(split) if limit is None else splits.head(split, limit)
    if len(examples) == 0:
        raise UserError(f"task {task.name} has no {split} examples for this model")
    engine = MaskedModel(model)
    device = engine.device
    full_mask = model.graph.full_mask().to(device)
    circuit_mask = circuit.edge_mask(device=device)
    edges = circuit.edges.nonzero().tolist()
    names = [model.graph.edge_name(i, j) for i, j in edges]
    batches = []
    with torch.no_grad():
        for batch in examples.batches(batch_size):
            batch = batch.to(device)
            full = engine.reference(batch.clean, attention_mask=batch.attention_mask, positions=batch.positions)
            cache = engine.corrupted_cache(batch.corrupted, attention_mask=batch.attention_mask,
                                           ablation=task.ablation)
            batches.append((batch, full, cache))
        model_without = torch.zeros(len(edges), dtype=torch.float64)
        circuit_without = torch.zeros(len(edges), dtype=torch.float64)
        circuit_loss = 0.0
        bar = tqdm(total=len(edges) * len(batches), desc=f"edge faithfulness ({len(edges)} edges)", unit="edge",
                   disable=not progress)

        def loss_of(batch, full, cache, mask) -> float:
            logits = engine(batch.clean, attention_mask=batch.attention_mask, edge_mask=mask,
                            positions=batch.positions, ablation=task.ablation, corrupted=cache)
            return float(task.loss(logits, full, batch).double().sum())

        for batch, full, cache in batches:
            circuit_loss += loss_of(batch, full, cache, circuit_mask)
            for k, (i, j) in enumerate(edges):
                full_mask[i, j] = 0.0
                circuit_mask[i, j] = 0.0
                model_without[k] += loss_of(batch, full, cache, full_mask)
                circuit_without[k] += loss_of(batch, full, cache, circuit_mask)
                full_mask[i, j] = 1.0
                circuit_mask[i, j] = 1.0
                bar.update(1)
        bar.close()
    n = len(examples)
    return {"edges": names, "model_without": (model_without / n).tolist(),
            "circuit_without": (circuit_without / n).tolist(), "circuit_loss": circuit_loss / n,
            "n_examples": n, "loss": "mse" if "mse_full" in task.metrics else "kl"}


def study_id(circuit_edges: list[str], model: str, task: str, split: str, data_seed: int, n_examples: int) -> str:
    key = json.dumps({"edges": sorted(circuit_edges), "model": model, "task": task, "split": split,
                      "data_seed": data_seed, "n_examples": n_examples}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _connect(db_path: Path) -> sqlite3.Connection:
    from ..store import BUSY_TIMEOUT_S

    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return conn


def record(results_dir, result: dict, *, circuit_name: str, run_id: str | None, circuit_file: str | None,
           task: str, model: str, split: str, data_seed: int, device: str) -> str:
    """Store one study (replacing an earlier one of the same circuit and setting); returns its id."""
    from ..store import ResultsStore, now_iso

    store = ResultsStore(results_dir)  # makes sure the database and its own tables exist
    db_path = store.db_path
    store.close()
    sid = study_id(result["edges"], model, task, split, data_seed, result["n_examples"])
    created = now_iso()
    rows = [(sid, circuit_name, run_id, circuit_file, task, model, split, data_seed, result["n_examples"],
             len(result["edges"]), device, result["loss"], result["circuit_loss"], edge, mw, cw, created)
            for edge, mw, cw in zip(result["edges"], result["model_without"], result["circuit_without"])]
    conn = _connect(db_path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_SCHEMA)
            conn.execute(f"DELETE FROM {TABLE} WHERE study_id = ?", (sid,))
            conn.executemany(f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                             rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()
    return sid


def load(db_path) -> pd.DataFrame:
    """Every stored edge-faithfulness row (an empty frame when none was ever computed)."""
    conn = _connect(Path(db_path))
    try:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone()
        if not exists:
            return pd.DataFrame(columns=list(COLUMNS))
        return pd.read_sql_query(f"SELECT * FROM {TABLE} ORDER BY created_at, study_id, edge", conn)
    finally:
        conn.close()


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
