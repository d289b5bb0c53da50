"""Training curves: how each gradient-trained job (Edge Pruning) got to its circuits.

One figure per task and model, one panel per job (a seed at one target, or a seed's whole sparsity
path): the training KL (log scale, left axis, the raw per-step value and a running mean) and the
expected edge sparsity, the realised sparsity of the circuit the masks would give at that step and
the target (right axis) against the step. A path's stages are separated by dotted lines, and each
stage is labelled with how it ended (``converged``: the stopping rule fired; ``max_steps``: its cap).
Built from the jobs' stored logs only.
"""
from __future__ import annotations

import math
import re

import numpy as np

from . import style
from .artifact import Artifact
from .data import ReportData, task_sort_key

# A log row needs these to be drawn (Edge Pruning's rows have them; other methods' logs do not).
NEEDED = ("step", "kl", "edge_sparsity", "target")


def _rows(log: list[dict]) -> list[dict]:
    """One row per logged step (a path or a fixed training target repeats a row per requested sparsity)."""
    seen, out = set(), []
    for row in log:
        if not all(k in row for k in NEEDED) or row["step"] in seen:
            continue
        seen.add(row["step"])
        out.append(row)
    return sorted(out, key=lambda r: r["step"])


def _running_mean(values: np.ndarray, n: int) -> np.ndarray:
    if len(values) < 2:
        return values
    n = max(1, min(n, len(values)))
    kernel = np.ones(n) / n
    padded = np.concatenate([np.full(n - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _title(job) -> str:
    info = job["info"] or {}
    targets = sorted(float(t) for t in (info.get("targets") or {}))
    what = (f"path {targets[0]:g} → {targets[-1]:g}" if info.get("schedule") == "path" and len(targets) > 1
            else f"target {targets[0]:g}" if targets else "")
    return f"seed {job['seed']}, n={job['n_train']}, {what}".rstrip(", ")


def _stages(job) -> list[tuple[int, float, str, int]]:
    """(stage, target, stop reason, last step) per stage of the job, from its info."""
    out = {}
    for t, info in ((job["info"] or {}).get("targets") or {}).items():
        if isinstance(info, dict) and "run_steps" in info:
            out[info.get("stage", 0)] = (info.get("stage", 0), float(info.get("train_target", t)),
                                         str(info.get("stop", "")), int(info["run_steps"]) - 1)
    return [out[k] for k in sorted(out)]


def _panel(ax, job, colours) -> None:
    rows = _rows(job["log"])
    step = np.array([r["step"] for r in rows], float)
    kl = np.array([max(r["kl"], 1e-8) for r in rows], float)
    ax.plot(step, kl, color=colours["kl"], alpha=0.3, linewidth=0.8)
    ax.plot(step, _running_mean(kl, 5), color=colours["kl"], linewidth=1.5, label="training KL")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("KL (training batch)", color=colours["kl"])
    right = ax.twinx()
    right.grid(False)
    right.plot(step, [r["edge_sparsity"] for r in rows], color=colours["sparsity"], linewidth=1.4,
               label="expected sparsity")
    if all("realised_sparsity" in r for r in rows):
        right.plot(step, [r["realised_sparsity"] for r in rows], color=colours["realised"], linewidth=1.0,
                   linestyle="-.", label="realised sparsity")
    right.plot(step, [r["target"] for r in rows], color="0.3", linewidth=1.0, linestyle="--", label="target")
    right.set_ylabel("edge sparsity", color=colours["sparsity"])
    lo = min(min(r["edge_sparsity"] for r in rows), min(r["target"] for r in rows))
    right.set_ylim(max(0.0, lo - 0.02) if lo > 0.5 else 0.0, 1.0)
    stages = _stages(job)
    for i, (stage, target, stop, last) in enumerate(stages):
        if i < len(stages) - 1:
            ax.axvline(last + 0.5, color="0.5", linestyle=":", linewidth=1.0)
        ax.annotate(f"{target:g}: {stop}", xy=(last, 0.02), xycoords=("data", "axes fraction"), ha="right",
                    va="bottom", fontsize=7, rotation=90, color="0.25")
    ax.set_title(_title(job), fontsize=10)
    return right


def training_curves(data: ReportData):
    """One `Artifact` per (task, model) that has jobs with training logs; none when no job has one."""
    logs = data.store.job_logs()
    if logs.empty:
        yield Artifact(name="training", title="Training curves", section="training",
                       reason="no complete jobs in the store")
        return
    logs = logs[[bool(_rows(log)) for log in logs["log"]]]
    if logs.empty:
        yield Artifact(name="training", title="Training curves", section="training",
                       reason="no job in the store logged a training curve (only gradient-trained methods "
                              "such as Edge Pruning do)")
        return
    import matplotlib.pyplot as plt

    style.apply_theme()
    palette = style.method_colours([])
    colours = {"kl": palette["ep"], "sparsity": palette["acdc"], "realised": palette["eap"]}
    groups = sorted(logs.groupby(["task", "model"]), key=lambda kv: (task_sort_key(kv[0][0]), kv[0][1]))
    for (task, model), jobs in groups:
        jobs = jobs.sort_values(["method", "method_preset", "n_train", "seed", "target_sparsity"],
                                na_position="first")
        n = len(jobs)
        ncols = min(n, 3)
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows + 0.6), squeeze=False)
        flat = list(axes.flat)
        for ax in flat[n:]:
            ax.set_visible(False)
        right = None
        for ax, (_, job) in zip(flat, jobs.iterrows()):
            right = _panel(ax, job, colours)
        handles = flat[0].get_legend_handles_labels()
        more = right.get_legend_handles_labels() if right is not None else ([], [])
        legend = fig.legend(handles[0] + more[0], handles[1] + more[1], loc="lower center", ncol=4, frameon=False,
                            bbox_to_anchor=(0.5, 0.0), borderaxespad=0.2)
        methods = ", ".join(sorted(set(jobs["method"])))
        fig.suptitle(f"Training curves: {methods} on {task}, {model}", y=0.995)
        style.fit_panels(fig, legend)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{task}_{model}")
        art = Artifact(name=f"training_{slug}", title=f"Training curves: {task}, {model}", section="training",
                       figure=fig,
                       caption=("Each panel is one job: the training KL of each step's batch and sampled masks "
                                "(faint; bold: a running mean over 5 logged steps, log scale) and, on the right "
                                "axis, the expected edge sparsity under the masks' distribution, the sparsity of "
                                "the circuit the masks would give at that step (realised) and the target. Dotted "
                                "lines separate the stages of a sparsity path; each stage is labelled with its "
                                "target and how it ended (converged: the stopping rule fired; max_steps: the "
                                "step cap)."))
        art.run_ids = list(jobs["job_id"])
        yield art


def training_table(data: ReportData) -> Artifact:
    """One row per circuit of a gradient-trained job: its schedule, the steps its run (or stage) took
    and how it ended, the training seconds, and the circuit's size and test metrics, so schedules and
    budgets can be compared at equal effective edges."""
    import pandas as pd

    from .data import method_sort_key, performance_metric

    art = Artifact(kind="table", name="training", title="Training runs: steps, stops and results", section="training",
                   caption="Per circuit of a gradient-trained job (Edge Pruning): the schedule (independent: one run "
                           "per target; path: one run through the targets in increasing order), the steps of its "
                           "run or stage and how it ended (converged: the stopping rule; max_steps: the cap), the "
                           "steps of the whole run up to the end of that stage, the training seconds of the stage, "
                           "the circuit's edges and effective edges, and its test KL and task metric.")
    logs = data.store.job_logs()
    rows = []
    for job in logs.itertuples(index=False):
        targets = (job.info or {}).get("targets") or {}
        if not targets or not _rows(job.log):
            continue
        runs = data.runs[data.runs["job_id"] == job.job_id]
        for run in runs.to_dict(orient="records"):
            info = next((v for k, v in targets.items() if abs(float(k) - float(run["target_sparsity"])) < 1e-9),
                        None)
            if not isinstance(info, dict):
                continue
            perf = performance_metric(data.test_metrics(job.task))
            rows.append({
                "task": job.task, "model": job.model, "method": job.method,
                "schedule": (job.info or {}).get("schedule", "independent"), "n_train": job.n_train,
                "seed": job.seed, "target": float(run["target_sparsity"]), "steps": info.get("steps"),
                "stop": info.get("stop"), "run steps": info.get("run_steps"),
                "train s": info.get("train_s"), "edges": int(run["n_edges"]),
                "effective edges": int(run["n_effective"]), "test kl": run.get("test/kl"),
                **({f"test {perf}": run.get(f"test/{perf}")} if perf else {}),
            })
            art.run_ids.append(run["run_id"])
    if not rows:
        art.reason = "no job in the store logged a training run (only gradient-trained methods such as Edge Pruning do)"
        return art
    table = pd.DataFrame(rows)
    table = table.sort_values(["task", "model", "method", "schedule", "n_train", "seed", "target"],
                              key=lambda c: c.map(method_sort_key) if c.name == "method" else c)
    art.table = table.reset_index(drop=True)
    return art
