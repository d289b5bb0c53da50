"""The report's tables: scaling (paper table 1), runtime, Tracr recovery, case study (table 2), AUC.

Each function takes the `ReportData` and returns an `Artifact` holding a DataFrame (written as
Markdown, CSV and LaTeX), or the reason there is nothing to tabulate. Numbers are the stored
values (means over seeds where rows are grouped), never recomputed with a model.

Case study (table 2): what the store must hold
----------------------------------------------
The instruction-prompted (IP) and few-shot (FS) circuits are runs of tasks ``boolexpr-ip`` and
``boolexpr-fs``. A run's metrics in its own setting are split ``test``; the same circuit scored in
the other setting is split ``test@<other task>`` (``test@boolexpr-fs`` for an IP run,
``test@boolexpr-ip`` for an FS run), with the same metric names (``accuracy``, ``exact_match``,
...). The intersection is a *derived* job: the store's ``derived_from`` is ``(ip_run_id,
fs_run_id)`` (method name ``"intersection"``), task ``boolexpr-ip``, one run whose
circuit file is IP ∩ FS, with split ``test`` (IP setting) and ``test@boolexpr-fs`` (FS setting).
IP and FS runs are paired when they share method, preset, model, seed and target sparsity (or
when an intersection job names them). Without a stored intersection the table still gives its
edge count and the overlap against chance (from the circuit files); its metrics show as missing.
"""
from __future__ import annotations

import math

import pandas as pd

from .artifact import Artifact
from .curves import normalised_panels
from .data import ReportData, faithfulness_metric, method_sort_key, task_sort_key

CASE_STUDY_SETTINGS = (("boolexpr-ip", "IP"), ("boolexpr-fs", "FS"))
CASE_STUDY_METRICS = (("accuracy", "accuracy"), ("exact_match", "exact match"))
PAPER_TRAIN_SIZES = (200, 400, 100_000)


def _jobs(data: ReportData) -> pd.DataFrame:
    """One row per complete discovery job (runs share their job's cost columns)."""
    return data.runs.drop_duplicates("job_id").reset_index(drop=True)


def _join(values) -> str:
    return ", ".join(sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))}))


# ---- AUC -------------------------------------------------------------------------------------------
def auc_table(data: ReportData) -> Artifact:
    """MIB-style area under the normalised faithfulness curve, per method (series) and task: on a linear
    and a log axis of the effective size, and MIB's CPR and CMD (`curves.mib_areas`)."""
    art = Artifact(kind="table", name="auc", title="Area under the normalised faithfulness curve", section="auc",
                   caption="f = (circuit − empty)/(full − empty) of the task's main metric, mean over seeds, "
                           "integrated over the fraction of edges kept k: linear axis over k in [0, 1] (the "
                           "curve anchored at the empty circuit, f(0) = 0, and the full model, f(1) = 1); log "
                           "axis over log10 k from 'log from' (the largest smallest-k any method of the task's main "
                           "sweep measured, so those methods cover the same range) to 1, divided by that range's "
                           "width; a series that does not reach down to it (e.g. a scaling run at one sparsity) has "
                           "no log-axis value. Higher is better; 1 = as faithful as the full model. "
                           "cpr and cmd are MIB's circuit performance ratio and circuit-model distance (Mueller et "
                           "al. 2025): the trapezoid area under f and under |1 − f| over the requested fraction of "
                           "edges k = 1 − target sparsity from 0.001 to 1, linear axis, not divided by the width "
                           "(f = 1 everywhere gives cpr 0.999, cmd 0); cpr higher is better, cmd lower. The "
                           "'cpr/cmd points' column says what was integrated: 'MIB grid' (MIB's ten sizes 0.1%, "
                           "0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100% all measured, other sizes left out: MIB's "
                           "number), 'measured' (the sweep's own sizes spanning 0.001 to 1: the same integral on "
                           "other points, not MIB's number) or 'n/a' (the sizes do not reach 0.001; run "
                           "--sparsities mib). The full model stands for k = 1 (f = 1) unless a run at sparsity 0 "
                           "was stored.")
    rows = []
    for task, model, metric, normed in normalised_panels(data):
        if not normed:
            art.notes.append(f"{task} ({model}): no usable full-model/empty-circuit references for {metric}")
        for n in normed:
            c = n.curve
            rows.append({"task": task, "model": model, "method": c.method, "preset": c.method_preset,
                         "n_train": c.n_train, "series": c.label, "metric": metric,
                         "full": n.full, "empty": n.empty, "sparsities": len(c.points), "seeds": c.n_seeds,
                         "auc_linear": n.auc_linear, "auc_log": n.auc_log, "log from (k)": n.log_from,
                         "cpr": n.cpr, "cmd": n.cmd, "cpr/cmd points": n.mib_grid})
            art.run_ids += c.run_ids
    if not rows:
        art.reason = ("no task has both runs and full-model/empty-circuit references to normalise against"
                      if not data.runs.empty else "the store holds no runs")
        return art
    art.table = pd.DataFrame(rows)
    return art


# ---- scaling (table 1) -------------------------------------------------------------------------------
def matched_sparsity(runs: pd.DataFrame) -> float | None:
    """The largest target sparsity that every (method, preset, n_train) of ``runs`` was run at
    (the sparsest common point, where methods differ most), or None when there is none."""
    common = None
    for _, g in runs.groupby(["method", "method_preset", "n_train"], dropna=False):
        have = set(g["target_sparsity"].round(10))
        common = have if common is None else common & have
    return max(common) if common else None


def scaling_table(data: ReportData) -> Artifact:
    """Per method: the faithfulness loss and discovery wall time at each training-set size, for the
    tasks run at two or more sizes."""
    art = Artifact(kind="table", name="scaling", title="Scaling with the training-set size", section="scaling",
                   caption="For each task run at two or more training-set sizes n, and each method: the faithfulness "
                           "loss (KL; MSE to the full model for tracr-xproportion) on the test split and the wall "
                           "time of the discovery that produced the circuit (a score-based method's single discovery "
                           "serves all its sparsities), at one matched sparsity: the largest target sparsity that "
                           "every method and size of the task was run at. Means over seeds. The paper's sizes are "
                           f"n = {', '.join(f'{n:,}' for n in PAPER_TRAIN_SIZES)}; an empty cell is a size the method "
                           "was not run at (or failed at; see the notes).")
    if data.runs.empty:
        art.reason = "the store holds no runs"
        return art
    rows = []
    for task, model in data.panels:
        runs = data.panel_runs(task, model)
        if runs["n_train"].nunique() < 2:
            continue
        metric = faithfulness_metric(data.test_metrics(task))
        if metric is None:
            continue
        col = f"test/{metric}"
        runs = runs[runs[col].notna()]
        s = matched_sparsity(runs)
        if s is None:
            art.notes.append(f"{task} ({model}): no target sparsity common to every method and size; left out")
            continue
        at = runs[runs["target_sparsity"].round(10) == s]
        sizes = sorted(int(n) for n in at["n_train"].dropna().unique())
        for (method, preset), g in sorted(at.groupby(["method", "method_preset"], dropna=False),
                                          key=lambda kv: method_sort_key(kv[0][0])):
            row = {"task": task, "model": model, "method": method, "preset": preset,
                   "target sparsity": s, "sparsity": float(g["sparsity"].mean()), "metric": metric}
            for n in sizes:
                gn = g[g["n_train"] == n]
                row[f"{metric} (n={n})"] = float(gn[col].mean()) if len(gn) else math.nan
                row[f"wall s (n={n})"] = float(gn["wall_total_s"].mean()) if len(gn) else math.nan
                if gn.empty:
                    art.notes += _failures(data, task, model, method, n)
            row["seeds"] = int(g["seed"].nunique())
            row["device"] = _join(g["device_name"])
            rows.append(row)
            art.run_ids += list(g["run_id"])
    if not rows:
        art.reason = art.reason or ("no task was run at two or more training-set sizes (`circuitbench run "
                                    "--n-train 200,400,100000 ...`)" if not art.notes else
                                    "no task has a sparsity common to all its methods and training-set sizes")
        return art
    table = pd.DataFrame(rows)
    # the n-columns of every task, in size order (loss, then wall time), after the fixed columns
    fixed = ["task", "model", "method", "preset", "target sparsity", "sparsity", "metric"]
    sized = [c for c in table.columns if "(n=" in c]
    sized.sort(key=lambda c: (int(c.split("(n=")[1].rstrip(")")), c.startswith("wall")))
    art.table = table[fixed + sized + ["seeds", "device"]]
    return art


def _failures(data: ReportData, task: str, model: str, method: str, n_train: int) -> list[str]:
    """Notes for the failed jobs of a (task, model, method, n_train) cell the table leaves empty."""
    f = data.failed
    if f is None or f.empty:
        return []
    hit = f[(f["task"] == task) & (f["model"] == model) & (f["method"] == method) & (f["n_train"] == n_train)]
    return [f"{task}: {method} at n={n_train:,} failed: {str(e)[:200]}" for e in hit["error"].dropna().unique()]


# ---- runtime -----------------------------------------------------------------------------------------
def runtime_table(data: ReportData) -> Artifact:
    """Wall time per method and task, split into the method's phases, with passes and peak memory."""
    art = Artifact(kind="table", name="runtime", title="Runtime per method and task", section="runtime",
                   caption="Per method, task, model and training-set size: discovery jobs, circuits evaluated, the "
                           "mean wall time of a discovery per phase (as the method reports them) and in total, "
                           "mean forward and backward passes (over a batch) per discovery, the largest peak "
                           "memory (GPU: max allocated; CPU: peak RSS growth), the mean evaluation time per "
                           "circuit, and the device. An empty phase cell: the method has no such phase.")
    if data.runs.empty:
        art.reason = "the store holds no runs"
        return art
    jobs = _jobs(data)
    eval_s = data.runs.groupby("job_id")["eval_s"].mean()
    jobs = jobs.assign(eval_s_mean=jobs["job_id"].map(eval_s))
    phases = [c for c in jobs.columns if c.startswith("wall_s.")]
    rows = []
    keys = ["task", "model", "method", "method_preset", "n_train"]
    groups = jobs.groupby(keys, dropna=False)
    for key in sorted(groups.groups, key=lambda k: (task_sort_key(k[0]), k[1], method_sort_key(k[2]), str(k[3]),
                                                    float(k[4]) if pd.notna(k[4]) else math.inf)):
        g = groups.get_group(key)
        task, model, method, preset, n_train = key
        row = {"task": task, "model": model, "method": method, "preset": preset,
               "n_train": int(n_train) if pd.notna(n_train) else None, "jobs": len(g),
               "circuits": int(data.runs["job_id"].isin(g["job_id"]).sum())}
        for p in phases:
            row[f"{p[7:]} s"] = float(g[p].mean()) if g[p].notna().any() else math.nan
        row["total s"] = float(g["wall_total_s"].mean())
        row["forward passes"] = float(g["forward_passes"].mean())
        row["backward passes"] = float(g["backward_passes"].mean())
        row["peak MiB"] = float(g["peak_memory_mib"].max()) if g["peak_memory_mib"].notna().any() else math.nan
        row["eval s/circuit"] = float(g["eval_s_mean"].mean())
        row["device"] = _join(g["device_name"])
        rows.append(row)
        art.run_ids += list(data.runs.loc[data.runs["job_id"].isin(g["job_id"]), "run_id"])
    table = pd.DataFrame(rows)
    # drop phase columns no row of this table has (a store of one method has only its phases)
    table = table[[c for c in table.columns if not (c.endswith(" s") and c not in ("total s",)
                                                      and table[c].isna().all())]]
    art.table = table
    return art


# ---- Tracr recovery ---------------------------------------------------------------------------------
def ground_truth_edges(task_name: str) -> list[str] | None:
    """The ground-truth edge names of a task that has one (the Tracr tasks), else None."""
    from ..errors import UserError
    from ..tasks import get_task

    try:
        task = get_task(task_name)
    except (UserError, ValueError, KeyError, OSError):
        return None
    gt = getattr(task, "ground_truth", None)
    return list(gt()) if callable(gt) else None


def recovery(found, truth) -> dict:
    """Precision, recall and exact match of a circuit's edges against the ground truth's."""
    tp = int((found.edges & truth.edges).sum())
    n_found, n_true = found.n_edges, truth.n_edges
    return {"edges": n_found, "true edges": n_true, "true positives": tp,
            "precision": tp / n_found if n_found else math.nan,
            "recall": tp / n_true if n_true else math.nan,
            "exact match": bool((found.edges == truth.edges).all())}


def tracr_runs(data: ReportData) -> list[tuple[str, str, list[str]]]:
    """(task, model, ground-truth edges) for every panel whose task has a ground truth."""
    out = []
    for task, model in data.panels:
        gt = ground_truth_edges(task)
        if gt is not None:
            out.append((task, model, gt))
    return out


def tracr_recovery_rows(data: ReportData) -> tuple[pd.DataFrame, list[str]]:
    """One row per run of a task with a ground truth: precision/recall/exact match of its edges."""
    from ..circuit import Circuit

    rows, notes = [], []
    for task, model, gt in tracr_runs(data):
        for r in data.panel_runs(task, model).itertuples(index=False):
            found = data.circuit(r.run_id)
            try:
                truth = Circuit.from_names(found.graph, gt)
            except ValueError as err:
                notes.append(f"{task}: the ground truth does not fit the stored graph ({err})")
                break
            rows.append({"task": task, "model": model, "method": r.method, "preset": r.method_preset,
                         "n_train": r.n_train, "seed": r.seed, "target sparsity": r.target_sparsity,
                         **recovery(found, truth), "run_id": r.run_id})
    table = pd.DataFrame(rows)
    if len(table):
        f1 = 2 * table["precision"] * table["recall"] / (table["precision"] + table["recall"])
        table.insert(table.columns.get_loc("exact match"), "F1", f1.fillna(0.0))
    return table, notes


def tracr_recovery_table(data: ReportData) -> Artifact:
    art = Artifact(kind="table", name="tracr_recovery", title="Tracr: recovery of the ground-truth circuit", section="tracr",
                   caption="For every run of a Tracr task: its edges against the compiled program's ground-truth "
                           "edges (circuitbench.tracr.ground_truth): precision = true positives / edges found, "
                           "recall = true positives / true edges, exact match = the same edge set.")
    table, notes = tracr_recovery_rows(data)
    art.notes += notes
    if table.empty:
        art.reason = "no runs of a task with a ground truth (tracr-xproportion, tracr-reverse) in the store"
        return art
    art.table = table
    art.run_ids = list(table["run_id"])
    return art


# ---- case study (table 2) ----------------------------------------------------------------------------
def _setting_value(row: dict, setting_task: str, metric: str) -> float:
    """``metric`` of a run evaluated in ``setting_task``'s setting: its own ``test`` split when it is
    a run of that task, else its cross-setting split ``test@<setting_task>``."""
    split = "test" if row["task"] == setting_task else f"test@{setting_task}"
    value = row.get(f"{split}/{metric}")
    return math.nan if value is None or pd.isna(value) else float(value)


def case_study_pairs(data: ReportData) -> list[tuple[dict, dict, dict | None]]:
    """(IP run, FS run, intersection run or None) triples found in the store."""
    (ip_task, _), (fs_task, _) = CASE_STUDY_SETTINGS
    runs = data.runs
    ip = runs[runs["task"] == ip_task]
    fs = runs[runs["task"] == fs_task]
    if ip.empty or fs.empty:
        return []
    by_id = {r["run_id"]: r for r in runs.to_dict("records")}
    derived = data.derived.to_dict("records") if not data.derived.empty else []
    named = {}
    for d in derived:
        a, b = d["derived_from"]
        if a in by_id and b in by_id:
            pair = tuple(sorted((a, b), key=lambda rid: by_id[rid]["task"] != ip_task))
            named[pair] = d
    triples, used = [], set()
    for (a, b), d in named.items():
        if by_id[a]["task"] == ip_task and by_id[b]["task"] == fs_task:
            triples.append((by_id[a], by_id[b], d))
            used |= {a, b}
    key = ["method", "method_preset", "model", "seed", "target_sparsity"]
    merged = ip.merge(fs, on=key, suffixes=("", "#fs"))
    for _, m in merged.iterrows():
        a, b = m["run_id"], m["run_id#fs"]
        if a in used or b in used:
            continue
        triples.append((by_id[a], by_id[b], None))
    triples.sort(key=lambda t: (method_sort_key(t[0]["method"]), t[0]["model"], t[0]["target_sparsity"],
                                t[0]["seed"]))
    return triples


def case_study_table(data: ReportData) -> Artifact:
    settings = ", ".join(f"{name} = {task}" for task, name in CASE_STUDY_SETTINGS)
    art = Artifact(kind="table", name="case_study", title="Case study: instruction-prompted vs few-shot circuits",
                   section="case_study",
                   caption=f"Boolean expressions ({settings}). Each block: the IP circuit, the FS circuit and their "
                           "intersection, with edge counts and accuracy / exact match evaluated in both settings "
                           "(a run's own test split and its cross-setting split test@<task>). For the "
                           "intersection: the overlap a random pair of edge sets of the same sizes would have "
                           "(|IP|·|FS|/N, N = edges of the model) and the observed overlap divided by it.")
    triples = case_study_pairs(data)
    if not triples:
        art.reason = ("needs runs of both boolexpr-ip and boolexpr-fs with the same method, model, seed and "
                      "sparsity (`circuitbench casestudy`)")
        return art
    rows = []
    for i, (ip, fs, inter) in enumerate(triples, 1):
        a, b = data.circuit(ip["run_id"]), data.circuit(fs["run_id"])
        n_total = int(ip["total_edges"])
        overlap = int((a.edges & b.edges).sum())
        chance = a.n_edges * b.n_edges / n_total
        if inter is not None and int(inter["n_edges"]) != overlap:
            art.notes.append(f"pair {i}: the stored intersection has {int(inter['n_edges'])} edges, the circuit "
                             f"files intersect in {overlap}")
        if inter is None:
            art.notes.append(f"pair {i} ({ip['method']}, sparsity {ip['target_sparsity']:g}): no evaluated "
                             f"intersection stored; its metrics are missing")
        for name, run, edges in (("IP", ip, a.n_edges), ("FS", fs, b.n_edges), ("IP ∩ FS", inter, overlap)):
            row = {"pair": i, "circuit": name, "method": ip["method"], "model": ip["model"], "seed": ip["seed"],
                   "target sparsity": ip["target_sparsity"], "edges": edges}
            for task, setting in CASE_STUDY_SETTINGS:
                for metric, label in CASE_STUDY_METRICS:
                    row[f"{setting} {label}"] = _setting_value(run, task, metric) if run is not None else math.nan
            row["overlap by chance"] = chance if name == "IP ∩ FS" else math.nan
            row["overlap / chance"] = overlap / chance if name == "IP ∩ FS" and chance else math.nan
            rows.append(row)
            if run is not None:
                art.run_ids.append(run["run_id"])
    art.table = pd.DataFrame(rows)
    missing = [c for c in art.table.columns if c.startswith(("IP ", "FS ")) and art.table[c].isna().all()]
    if missing:
        art.notes.append(f"no stored values for {', '.join(missing)} (cross-setting splits test@<task> missing?)")
    return art

