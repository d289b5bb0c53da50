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
        labels = handles[1] + more[1]
        legend = fig.legend(handles[0] + more[0], labels, loc="lower center", ncol=style.legend_columns(fig, labels, 4),
                            frameon=False, bbox_to_anchor=(0.5, 0.0), borderaxespad=0.2)
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
                "task": job.task, "model": job.model, "method": job.method, "preset": run["method_preset"],
                "schedule": (job.info or {}).get("schedule", "independent"),
                "warm start": (job.info or {}).get("warm_start") or "", "n_train": job.n_train,
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
    table = table.sort_values(["task", "model", "method", "schedule", "warm start", "n_train", "seed", "target"],
                              key=lambda c: c.map(method_sort_key) if c.name == "method" else c)
    art.table = table.reset_index(drop=True)
    return art


def _window_mean(rows: list[dict], upto: int, window_steps: int) -> float:
    """Mean training KL of the logged rows in the ``window_steps`` steps ending at row ``upto``."""
    end = rows[upto]["step"]
    vals = [r["kl"] for r in rows[:upto + 1] if r["step"] > end - window_steps]
    return sum(vals) / len(vals)


def warm_start_table(data: ReportData, window_steps: int = 25) -> Artifact:
    """Warm against cold starts of the same training run (task, model, n_train, seed, target, same
    schedule): the steps the warm-started run needs before its training KL (mean over the last
    ``window_steps`` steps, at the target sparsity) falls to the cold run's final one."""
    import pandas as pd

    art = Artifact(kind="table", name="warm_start", title="Warm start against cold start", section="training",
                   caption=f"Per Edge Pruning run that has a cold and a warm-started twin (same task, model, training "
                           f"examples, seed, target and schedule): the cold run's steps and final training KL (mean "
                           f"over its last {window_steps} steps), the first step at which the warm run's training "
                           f"KL, averaged over the {window_steps} steps before it and with its expected sparsity "
                           f"within 10% of the target density, is at most that value (— when it never is), the warm "
                           f"run's steps, and both circuits' effective edges and test KL.")
    logs = data.store.job_logs(method="ep")
    rows = []
    if not logs.empty:
        logs = logs.assign(warm=[(i or {}).get("warm_start") for i in logs["info"]],
                           schedule=[(i or {}).get("schedule", "independent") for i in logs["info"]])
        for job in logs[logs["warm"].notna()].itertuples(index=False):
            cold = logs[(logs["warm"].isna()) & (logs["task"] == job.task) & (logs["model"] == job.model)
                        & (logs["n_train"] == job.n_train) & (logs["seed"] == job.seed)
                        & (logs["schedule"] == job.schedule)]
            for target, info in ((job.info or {}).get("targets") or {}).items():
                t = float(target)
                twin = next((c for c in cold.itertuples(index=False)
                             if any(abs(float(k) - t) < 1e-9 for k in ((c.info or {}).get("targets") or {}))), None)
                if twin is None:
                    continue
                c_rows = [r for r in _rows(twin.log) if abs(float(r.get("target_sparsity", t)) - t) < 1e-9]
                w_rows = [r for r in _rows(job.log) if abs(float(r.get("target_sparsity", t)) - t) < 1e-9]
                if not c_rows or not w_rows:
                    continue
                cold_kl = _window_mean(c_rows, len(c_rows) - 1, window_steps)
                want = 1.0 - t
                reached = next((r["step"] for i, r in enumerate(w_rows)
                                if abs((1 - r["edge_sparsity"]) - want) <= 0.1 * want
                                and _window_mean(w_rows, i, window_steps) <= cold_kl), None)
                c_info = next(v for k, v in twin.info["targets"].items() if abs(float(k) - t) < 1e-9)
                run = lambda job_id: data.runs[(data.runs["job_id"] == job_id)  # noqa: E731
                                               & ((data.runs["target_sparsity"] - t).abs() < 1e-9)]
                c_run, w_run = run(twin.job_id), run(job.job_id)
                rows.append({"task": job.task, "model": job.model, "n_train": job.n_train, "seed": job.seed,
                             "target": t, "schedule": job.schedule, "warm start": job.warm,
                             "cold steps": c_info.get("steps"), "cold stop": c_info.get("stop"),
                             "cold final train kl": cold_kl,
                             "warm steps to that kl": reached, "warm steps": info.get("steps"),
                             "warm stop": info.get("stop"),
                             "cold effective edges": int(c_run["n_effective"].iloc[0]) if len(c_run) else None,
                             "warm effective edges": int(w_run["n_effective"].iloc[0]) if len(w_run) else None,
                             "cold test kl": float(c_run["test/kl"].iloc[0]) if len(c_run) else None,
                             "warm test kl": float(w_run["test/kl"].iloc[0]) if len(w_run) else None})
                art.run_ids += list(c_run["run_id"]) + list(w_run["run_id"])
    if not rows:
        art.reason = "no warm-started Edge Pruning run with a cold twin in the store"
        return art
    art.table = pd.DataFrame(rows)
    return art
