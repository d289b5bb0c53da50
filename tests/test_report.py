"""The report: figures, tables and index.html rebuilt from a store with known values.

`make_store` writes a small store through the store's own API (`ResultsStore.record_job`,
`record_references`) with metric values from a closed formula (`kl_value` ...), so every number a
table shows can be checked against what was stored.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from circuitbench.circuit import Circuit
from circuitbench.errors import UserError
from circuitbench.graph import Graph
from circuitbench.store import ResultsStore, run_id_for

TINY = Graph(2, 4)
TINY_MODEL = "random:gpt2-tiny"
TRACR = Graph(4, 1)  # tracr:reverse
SPARSITIES = (0.5, 0.8, 0.9)
METHOD_OFFSET = {"ep": 0.0, "eap": 0.3, "acdc": 0.15}
TASK_METRICS = {
    "ioi-t1": ("kl", "logit_diff", "accuracy", "exact_match"),
    "gt": ("kl", "prob_diff", "prob_diff_10", "kendall_tau", "exact_match"),
    "boolexpr-ip": ("kl", "logit_diff", "accuracy", "exact_match"),
    "boolexpr-fs": ("kl", "logit_diff", "accuracy", "exact_match"),
    "tracr-reverse": ("kl", "accuracy", "exact_match"),
}
FULL = {"kl": 0.0, "logit_diff": 3.0, "prob_diff": 0.8, "prob_diff_10": 0.6, "kendall_tau": 1.0,
        "exact_match": 1.0, "accuracy": 0.9}
EMPTY = {"kl": 2.0, "logit_diff": -1.0, "prob_diff": 0.0, "prob_diff_10": 0.0, "kendall_tau": 0.0,
         "exact_match": 0.1, "accuracy": 0.2}


def metric_value(metric: str, method: str, sparsity: float, seed: int, n_train: int, task: str,
                 split: str = "test") -> float:
    """The stored value: full-model value at sparsity 0 moving towards the empty circuit's."""
    t = sparsity * (0.5 + METHOD_OFFSET.get(method, 0.2)) + 0.01 * seed - 0.0001 * (n_train // 100)
    t += 0.02 * (split != "test") + 0.003 * len(task)
    return FULL[metric] + (EMPTY[metric] - FULL[metric]) * t


def _job(job_id, method, task, model, graph, n_train, seed, target, wall, device="cpu",
         device_name="Test CPU (2 cores)", extra_config=None, preset="quick"):
    config = {"job": job_id, "method": method, "task": task, "eval_limit": 32, **(extra_config or {})}
    return {"job_id": job_id, "config": config, "method": method, "method_preset": preset,
            "method_config": {}, "task": task, "model": model, "dtype": "float32", "n_train": n_train,
            "n_validation": None, "data_seed": 0, "seed": seed, "target_sparsity": target,
            "wall_s": wall, "wall_total_s": sum(wall.values()), "forward_passes": 100 + seed,
            "backward_passes": 50 if method != "acdc" else 0, "peak_memory_mib": 10.0 + seed,
            "device": device, "device_name": device_name, "threads": 1, "host": "test",
            "versions": {"circuitbench": "0.1.0", "torch": torch.__version__},
            "graph": {"layers": graph.n_layers, "heads": graph.n_heads, "kv_heads": graph.kv_heads,
                      "n_kv_heads": graph.n_kv_heads, "has_mlp": graph.has_mlp, "edges": graph.n_edges},
            "log": [], "info": {}, "started_at": "t0", "finished_at": "t1"}


def _scores(graph, key: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, key)))
    return torch.randn(graph.n_writers, graph.n_readers, generator=gen)


def _record(store, job, circuits: dict[float, Circuit], metrics_of, scores=None):
    runs, metrics, files = [], {}, {}
    for s, c in circuits.items():
        rid = run_id_for(job["job_id"], s)
        runs.append({"run_id": rid, "job_id": job["job_id"], "target_sparsity": s, "sparsity": c.sparsity,
                     "n_edges": c.n_edges, "total_edges": c.graph.n_edges, "n_nodes": len(c.nodes),
                     "n_examples": 32, "eval_s": 0.25, "finished_at": "t1"})
        metrics[rid] = metrics_of(s)
        data = c.to_dict()
        data["meta"] = {"run_id": rid, "task": job["task"], "model": job["model"], "method": job["method"]}
        files[rid] = data
    assert store.record_job(job, runs, metrics, files, scores)
    return [r["run_id"] for r in runs]


def _lm_metrics(method, task, seed, n_train, cross: str | None = None):
    def of(s):
        out = {"test": {m: metric_value(m, method, s, seed, n_train, task) for m in TASK_METRICS[task]}}
        if cross:
            out[f"test@{cross}"] = {m: metric_value(m, method, s, seed, n_train, task, split=cross)
                                    for m in TASK_METRICS[cross]}
        return out
    return of


def make_store(root, tracr: bool = True, case_study: bool = True, failed: bool = True,
               lm_tasks=(("ioi-t1", (200, 400)), ("gt", (200,)))) -> ResultsStore:
    """ioi-t1 (ep 2 seeds and eap, at n_train 200 and 400), gt (ep, eap at 200), tracr-reverse (ep
    exact, acdc with an extra edge), boolexpr-ip/fs (ep, with cross-setting splits and an evaluated
    intersection), references for each, and one failed job."""
    store = ResultsStore(root)
    n = 0

    def next_id():
        nonlocal n
        n += 1
        return f"{n:016x}"

    for task, sizes in lm_tasks:
        for n_train in sizes:
            for seed in (0, 1):
                for s in SPARSITIES:  # ep: one job per target sparsity
                    job = _job(next_id(), "ep", task, TINY_MODEL, TINY, n_train, seed, s,
                               {"setup": 0.5, "train": 10.0 + s + n_train / 100})
                    c = Circuit.from_sparsity(TINY, _scores(TINY, f"ep{task}{seed}{s}"), s)
                    _record(store, job, {s: c}, _lm_metrics("ep", task, seed, n_train))
            job = _job(next_id(), "eap", task, TINY_MODEL, TINY, n_train, 0, None,
                       {"setup": 0.25, "attribute": 1.0 + n_train / 1000})
            sc = _scores(TINY, f"eap{task}{n_train}")
            _record(store, job, {s: Circuit.from_sparsity(TINY, sc, s) for s in SPARSITIES},
                    _lm_metrics("eap", task, 0, n_train), scores=sc.numpy())
        ref = {"ref_id": f"ref-{task}", "task": task, "model": TINY_MODEL, "dtype": "float32", "device": "cpu",
               "data_seed": 0, "eval_limit": 32}
        store.record_references(ref, {"test": {"full": {m: FULL[m] for m in TASK_METRICS[task]},
                                               "empty": {m: EMPTY[m] for m in TASK_METRICS[task]}}})
    if tracr:
        from circuitbench.tracr import ground_truth

        gt = ground_truth("reverse")
        truth = Circuit.from_names(TRACR, gt)
        extra = truth.edges.clone()
        extra[0, TRACR.reader_index["logits"]] = True  # one edge beyond the ground truth
        missing = truth.edges.clone()
        i, j = TRACR.parse_edge(gt[0])
        missing[i, j] = False
        for method, edges in (("ep", truth.edges), ("acdc", extra), ("eap", missing)):
            c = Circuit(TRACR, edges)
            s = c.sparsity
            job = _job(next_id(), method, "tracr-reverse", "tracr:reverse", TRACR, 363, 0, s, {"train": 1.0})
            _record(store, job, {s: c}, lambda s, method=method: {"test": {
                m: metric_value(m, method, s, 0, 363, "tracr-reverse") for m in TASK_METRICS["tracr-reverse"]}})
    if case_study:
        ids = {}
        for task, other in (("boolexpr-ip", "boolexpr-fs"), ("boolexpr-fs", "boolexpr-ip")):
            job = _job(next_id(), "ep", task, TINY_MODEL, TINY, 3840, 0, 0.9, {"train": 30.0})
            c = Circuit.from_sparsity(TINY, _scores(TINY, task), 0.9)
            ids[task] = _record(store, job, {0.9: c}, _lm_metrics("ep", task, 0, 3840, cross=other))[0]
        a, b = store.circuit(ids["boolexpr-ip"]), store.circuit(ids["boolexpr-fs"])
        inter = a & b
        job = _job(next_id(), "intersection", "boolexpr-ip", TINY_MODEL, TINY, 3840, 0, 0.9, {"intersect": 0.0},
                   preset=None)
        job["derived_from"] = [ids["boolexpr-ip"], ids["boolexpr-fs"]]  # what marks a derived job
        _record(store, job, {0.9: inter}, _lm_metrics("intersection", "boolexpr-ip", 0, 3840, cross="boolexpr-fs"))
    if failed:
        store.record_failure(_job(next_id(), "acdc", "ioi-t1", TINY_MODEL, TINY, 200, 0, None, {}),
                             "RuntimeError: out of memory")
    return store


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    make_store(root).close()
    return root


@pytest.fixture(scope="module")
def data(store_dir):
    from circuitbench.report.data import load_report_data

    d = load_report_data(store_dir)
    yield d
    d.store.close()


def _series(fig):
    return {ax.get_title(): sum(1 for l in ax.get_lines() if l.get_gid() == "series")
            for ax in fig.axes if ax.get_visible() and ax.get_title()}


def _references(fig):
    return {ax.get_title(): sorted(l.get_label() for l in ax.get_lines() if l.get_gid() == "reference")
            for ax in fig.axes if ax.get_visible() and ax.get_title()}


# ---- figures -----------------------------------------------------------------------------------------
def test_faithfulness_series_and_references(data):
    from circuitbench.report import figures

    art = figures.faithfulness(data)
    series = _series(art.figure)
    # ioi-t1: ep and eap at two training sizes; gt: ep, eap; tracr-reverse: ep, acdc, eap (one point
    # each); boolexpr-ip, boolexpr-fs: ep (the intersection is not a method line)
    assert series == {f"ioi-t1\n{TINY_MODEL}": 4, f"gt\n{TINY_MODEL}": 2, "tracr-reverse\ntracr:reverse": 3,
                      f"boolexpr-ip\n{TINY_MODEL}": 1, f"boolexpr-fs\n{TINY_MODEL}": 1}
    refs = _references(art.figure)
    assert refs[f"ioi-t1\n{TINY_MODEL}"] == ["empty circuit", "full model"]
    assert refs["tracr-reverse\ntracr:reverse"] == []  # no references stored for it
    assert any("tracr-reverse" in n and "no reference" in n for n in art.notes)
    # the ep line of ioi-t1 at n=200 is the mean over its two seeds, with a band
    ax = next(a for a in art.figure.axes if a.get_title() == f"ioi-t1\n{TINY_MODEL}")
    line = next(l for l in ax.get_lines() if l.get_label() == "ep (n=200)")
    expected = [(metric_value("kl", "ep", s, 0, 200, "ioi-t1") + metric_value("kl", "ep", s, 1, 200, "ioi-t1")) / 2
                for s in SPARSITIES]
    assert line.get_ydata() == pytest.approx(expected)
    assert len(ax.collections) >= 2  # the ep bands (two seeds); eap has one seed, no band
    assert set(art.run_ids) >= set(data.panel_runs("ioi-t1", TINY_MODEL)["run_id"])


def test_performance_and_secondary_metrics_pick_the_tasks_metrics(data):
    from circuitbench.report import figures

    perf = figures.performance(data)
    axes = {ax.get_title(): ax for ax in perf.figure.axes if ax.get_title()}
    assert axes[f"gt\n{TINY_MODEL}"].get_ylabel() == "probability difference"
    assert axes[f"ioi-t1\n{TINY_MODEL}"].get_ylabel() == "logit difference"
    assert "tracr-reverse\ntracr:reverse" not in axes  # no logit/probability difference stored
    full = [l for l in axes[f"gt\n{TINY_MODEL}"].get_lines() if l.get_label() == "full model"][0]
    assert full.get_linestyle() == "--" and full.get_ydata()[0] == FULL["prob_diff"]
    em = figures.exact_match(data)
    labels = {ax.get_title(): ax.get_ylabel() for ax in em.figure.axes if ax.get_title()}
    assert labels[f"gt\n{TINY_MODEL}"] == "Kendall's τ" and labels[f"ioi-t1\n{TINY_MODEL}"] == "exact match"
    acc = figures.accuracy(data)
    labels = {ax.get_title(): ax.get_ylabel() for ax in acc.figure.axes if ax.get_title()}
    assert labels[f"gt\n{TINY_MODEL}"] == "probability difference 10"
    assert _series(acc.figure)[f"gt\n{TINY_MODEL}"] == 2


# ---- tables ------------------------------------------------------------------------------------------
def test_scaling_table_values(data):
    from circuitbench.report import tables

    art = tables.scaling_table(data)
    t = art.table
    row = t[(t["task"] == "ioi-t1") & (t["method"] == "ep")].iloc[0]
    assert row["target sparsity"] == 0.9  # the largest sparsity every method and size has
    for n in (200, 400):
        kl = [metric_value("kl", "ep", 0.9, seed, n, "ioi-t1") for seed in (0, 1)]
        assert row[f"kl (n={n})"] == pytest.approx(sum(kl) / 2)
        assert row[f"wall s (n={n})"] == pytest.approx(0.5 + 10.0 + 0.9 + n / 100)
    eap = t[(t["task"] == "ioi-t1") & (t["method"] == "eap")].iloc[0]
    assert eap["wall s (n=400)"] == pytest.approx(0.25 + 1.0 + 0.4)
    assert row["device"] == "Test CPU (2 cores)"
    assert set(t["task"]) == {"ioi-t1"}  # gt was run at one training-set size only
    assert list(t.columns[7:11]) == ["kl (n=200)", "wall s (n=200)", "kl (n=400)", "wall s (n=400)"]


def test_runtime_table_values(data):
    from circuitbench.report import tables

    t = tables.runtime_table(data).table
    ep = t[(t["task"] == "ioi-t1") & (t["method"] == "ep") & (t["n_train"] == 200)].iloc[0]
    assert ep["jobs"] == 6 and ep["circuits"] == 6
    assert ep["setup s"] == pytest.approx(0.5)
    assert ep["train s"] == pytest.approx(10.0 + sum(SPARSITIES) / 3 + 2.0)
    assert ep["forward passes"] == pytest.approx(100.5) and ep["peak MiB"] == 11.0
    eap = t[(t["task"] == "gt") & (t["method"] == "eap")].iloc[0]
    assert eap["jobs"] == 1 and eap["circuits"] == 3 and eap["attribute s"] == pytest.approx(1.2)
    assert math.isnan(eap["train s"])


def test_tracr_recovery_table(data):
    from circuitbench.report import tables
    from circuitbench.tracr import ground_truth

    t = tables.tracr_recovery_table(data).table.set_index("method")
    n_true = len(ground_truth("reverse"))
    assert t.loc["ep", "precision"] == 1 and t.loc["ep", "recall"] == 1 and bool(t.loc["ep", "exact match"])
    assert t.loc["acdc", "precision"] == pytest.approx(n_true / (n_true + 1)) and t.loc["acdc", "recall"] == 1
    assert t.loc["eap", "recall"] == pytest.approx((n_true - 1) / n_true) and not t.loc["eap", "exact match"]


def test_case_study_table(data):
    from circuitbench.report import tables

    t = tables.case_study_table(data).table
    assert list(t["circuit"]) == ["IP", "FS", "IP ∩ FS"]
    ip_run = data.runs[data.runs["task"] == "boolexpr-ip"].iloc[0]
    fs_run = data.runs[data.runs["task"] == "boolexpr-fs"].iloc[0]
    a, b = data.circuit(ip_run["run_id"]), data.circuit(fs_run["run_id"])
    overlap = int((a.edges & b.edges).sum())
    assert list(t["edges"]) == [a.n_edges, b.n_edges, overlap]
    ip, fs, inter = (t.iloc[i] for i in range(3))
    assert ip["IP accuracy"] == pytest.approx(metric_value("accuracy", "ep", 0.9, 0, 3840, "boolexpr-ip"))
    assert ip["FS accuracy"] == pytest.approx(
        metric_value("accuracy", "ep", 0.9, 0, 3840, "boolexpr-ip", split="boolexpr-fs"))
    assert fs["FS exact match"] == pytest.approx(metric_value("exact_match", "ep", 0.9, 0, 3840, "boolexpr-fs"))
    assert inter["FS accuracy"] == pytest.approx(
        metric_value("accuracy", "intersection", 0.9, 0, 3840, "boolexpr-ip", split="boolexpr-fs"))
    chance = a.n_edges * b.n_edges / TINY.n_edges
    assert inter["overlap by chance"] == pytest.approx(chance)
    assert inter["overlap / chance"] == pytest.approx(overlap / chance)


def test_auc_values(data):
    import numpy as np

    from circuitbench.report import tables

    t = tables.auc_table(data).table
    row = t[(t["task"] == "gt") & (t["method"] == "eap")].iloc[0]
    runs = data.panel_runs("gt", TINY_MODEL)
    eap = runs[runs["method"] == "eap"].sort_values("sparsity")
    k = (eap["n_edges"] / eap["total_edges"]).to_numpy()
    f = (eap["test/prob_diff"].to_numpy() - EMPTY["prob_diff"]) / (FULL["prob_diff"] - EMPTY["prob_diff"])
    order = np.argsort(k)
    kk = np.concatenate([[0], k[order], [1]])
    ff = np.concatenate([[0], f[order], [1]])
    assert row["auc_linear"] == pytest.approx(float(np.trapezoid(ff, kk)))
    # the log axis starts at the largest smallest-k of the task's methods
    ep = runs[runs["method"] == "ep"]
    k_from = max((ep["n_edges"] / ep["total_edges"]).min(), k.min())
    assert row["log from (k)"] == pytest.approx(k_from)
    assert 0 < row["auc_log"] < 1
    assert set(t["task"]) == {"ioi-t1", "gt"}  # the only tasks with references stored


def test_area_helpers_on_known_curves():
    import numpy as np

    from circuitbench.report.curves import area_linear, area_log

    k = np.array([0.0, 0.01, 0.1, 1.0])
    assert area_linear(k, np.ones(4)) == pytest.approx(1.0)
    assert area_log(k, np.ones(4), 0.01) == pytest.approx(1.0)
    # f = log10(k)/2 + 1 on [0.01, 1] is linear in log k: average 0.5
    f = np.array([0.0, 0.0, 0.5, 1.0])
    assert area_log(k, f, 0.01) == pytest.approx(0.5)
    assert math.isnan(area_log(k[2:], f[2:], 0.01))  # the curve does not reach k = 0.01


# ---- diagrams ----------------------------------------------------------------------------------------
def test_diagram_draws_only_touched_nodes_and_distinguishes_qkv():
    from circuitbench.report.diagrams import EDGE_STYLE, draw_circuit

    g = Graph(3, 4)
    c = Circuit.from_names(g, ["input->a0.h1<q>", "input->a0.h1<k>", "a0.h1->a2.h3<v>", "a2.h3->logits",
                               "a0.h1->m1", "m1->logits"])
    fig = draw_circuit(c, "test")
    ax = fig.axes[0]
    labels = {t.get_text() for t in ax.texts}
    assert {"input", "a0.h1", "a2.h3", "m1", "logits"} <= labels
    assert not {"a0.h0", "a1.h0", "m0", "m2"} & labels
    colours = {tuple(round(v, 3) for v in p.get_edgecolor()[:3]) for p in ax.patches if hasattr(p, "get_connectionstyle")}
    import matplotlib.colors as mc

    for kind in ("q", "k", "v", "mlp", "logits"):
        assert tuple(round(v, 3) for v in mc.to_rgb(EDGE_STYLE[kind]["color"])) in colours
    assert sum(1 for p in ax.patches if hasattr(p, "get_connectionstyle")) == c.n_edges


def test_diagram_grouped_query_attention_and_sparse_big_graph():
    from circuitbench.report.diagrams import draw_circuit

    g = Graph(30, 9, 3)  # SmolLM2-135M shape
    scores = _scores(g, "gqa")
    c = Circuit.from_sparsity(g, scores, 0.995)
    fig = draw_circuit(c)
    labels = {t.get_text() for t in fig.axes[0].texts}
    kv_edges = [n for n in c.edge_names if ".g" in n.split("->")[1]]
    if kv_edges:
        assert any(l.startswith("g") and l[1:].isdigit() for l in labels)
    width, height = fig.get_size_inches()
    assert width < 30 and height < 30


# ---- the whole report and the command ----------------------------------------------------------------
@pytest.fixture(scope="module")
def report(store_dir, tmp_path_factory):
    from circuitbench.report import build_report

    out = tmp_path_factory.mktemp("report")
    return out, build_report(store_dir, out)


def test_build_report_writes_every_file(store_dir, report):
    out, summary = report
    for name in ("faithfulness", "performance", "exact_match", "accuracy", "auc_curves", "auc",
                 "tracr_tracr-reverse"):
        for ext in ("png", "pdf"):
            path = out / "figures" / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    for name in ("scaling", "runtime", "tracr_recovery", "case_study", "auc"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").exists()
    diagrams = [p for p in summary["figures"] if p.startswith("circuit_")]
    assert len(diagrams) == 9  # one per task and method: ioi-t1 2, gt 2, tracr-reverse 3, boolexpr-ip/fs 1 each
    assert all((out / "figures" / f"{d}.pdf").exists() for d in diagrams)
    # this store's jobs logged no training curves (see test_training_curves_from_stored_logs)
    assert set(summary["missing"]) == {"figures/edge_faithfulness", "tables/edge_faithfulness",
                                       "tables/edge_faithfulness_edges", "figures/training", "tables/training",
                                       "tables/warm_start"}


def test_index_page_shows_everything_and_the_runs(store_dir, report):
    out, _ = report
    page = (out / "index.html").read_text()
    assert 'src="figures/faithfulness.png"' in page and 'href="figures/faithfulness.pdf"' in page
    assert 'href="tables/scaling.tex"' in page
    # the figure without data says so in its place
    section = page[page.index('id="edge_faithfulness"'):page.index('id="diagrams"')]
    assert section.count("No data.") == 3 and "--edge-faithfulness" in section
    # every run is listed (an anchor the figures link to), the failed job too
    assert page.count('id="run-') == len(ResultsStore(store_dir).runs())
    assert "RuntimeError: out of memory" in page
    assert page.count('<a href="#run-') > 30


def test_table_files_hold_the_stored_numbers(report):
    out, _ = report
    csv = pd.read_csv(out / "tables" / "scaling.csv")
    row = csv[(csv["task"] == "ioi-t1") & (csv["method"] == "eap")].iloc[0]
    assert row["kl (n=400)"] == pytest.approx(metric_value("kl", "eap", 0.9, 0, 400, "ioi-t1"))
    case = pd.read_csv(out / "tables" / "case_study.csv")
    assert case["IP accuracy"].iloc[0] == pytest.approx(metric_value("accuracy", "ep", 0.9, 0, 3840, "boolexpr-ip"))
    md = (out / "tables" / "runtime.md").read_text()
    assert md.count("\n| ") >= 7 and "| ioi-t1 |" in md
    tex = (out / "tables" / "case_study.tex").read_text()
    assert "\\begin{tabular}" in tex and "IP $\\cap$ FS" in tex


def test_rebuild_replaces_its_own_files_and_refuses_foreign_folders(tmp_path):
    from circuitbench.report import build_report

    make_store(tmp_path / "store", tracr=False, case_study=False, failed=False, lm_tasks=(("gt", (200,)),)).close()
    out = tmp_path / "rep"
    build_report(tmp_path / "store", out)
    stale = out / "figures" / "stale.png"
    stale.write_bytes(b"old")
    summary = build_report(tmp_path / "store", out)
    assert not stale.exists() and (out / "figures" / "faithfulness.png").exists()
    assert "tables/case_study" in summary["missing"] and "tables/scaling" in summary["missing"]
    (tmp_path / "other" / "figures").mkdir(parents=True)
    with pytest.raises(UserError, match="not written by circuitbench report"):
        build_report(tmp_path / "store", tmp_path / "other")


def _files(root) -> dict:
    """Every file of a store folder with its bytes, but SQLite's transient -wal/-shm files and the
    report's own output."""
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm")) and "report" not in p.relative_to(root).parts}


def test_building_the_report_leaves_the_store_as_it_was(store_dir, tmp_path):
    from circuitbench.report import build_report

    before = _files(store_dir)
    assert "results.db" in before and any(k.startswith("circuits/") for k in before)
    summary = build_report(store_dir, tmp_path / "out")
    assert summary["figures"] and _files(store_dir) == before


COMMITTED = sorted(p.parent for p in (Path(__file__).resolve().parent.parent / "docs" / "results").glob("*/store/results.db"))


def _copy_store(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*-wal", "*-shm", "report"))
    return dst


@pytest.mark.parametrize("committed", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_stores_open_read_only_and_migrate_on_a_copy(committed, tmp_path):
    """The stores committed under docs/results (schema 1, or 2 once a run wrote to them) open for the
    report unchanged, and a writable open migrates them to the current schema (on a copy: never
    docs/results)."""
    import sqlite3

    from circuitbench.report.data import load_report_data
    from circuitbench.store import SCHEMA_VERSION

    store = _copy_store(committed, tmp_path / "store")
    before = _files(store)
    version_before = sqlite3.connect(store / "results.db").execute("PRAGMA user_version").fetchone()[0]
    assert 1 <= version_before <= SCHEMA_VERSION
    data = load_report_data(store)
    try:
        assert not data.runs.empty and data.edge_faithfulness.empty
        assert data.store.counts()["complete"] > 0
        n_runs = len(data.store.runs())
    finally:
        data.store.close()
    assert _files(store) == before
    version = sqlite3.connect(store / "results.db").execute("PRAGMA user_version").fetchone()[0]
    assert version == version_before  # read-only: an older store is migrated in memory, not in the file
    writable = ResultsStore(store)
    try:
        columns = {r[1] for r in writable._connect().execute("PRAGMA table_info(jobs)")}
        assert "derived_from" in columns
        assert len(writable.runs()) == n_runs
    finally:
        writable.close()
    conn = sqlite3.connect(store / "results.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM edge_faithfulness").fetchone()[0] == 0
    conn.close()


@pytest.mark.slow  # the whole report of each committed store: ~1 min each on 2 busy cores
@pytest.mark.parametrize("committed", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_stores_still_report(committed, tmp_path):
    from circuitbench.report import build_report

    store = _copy_store(committed, tmp_path / "store")
    before = _files(store)
    summary = build_report(store, tmp_path / "out")
    assert not summary["empty"] and summary["figures"] and _files(store) == before


def test_empty_and_missing_store(tmp_path, capsys):
    from circuitbench.cli import main

    assert main(["report", "--results", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no results folder") and "Traceback" not in err and err.count("\n") == 1
    (tmp_path / "plain").mkdir()
    assert main(["report", "--results", str(tmp_path / "plain")]) == 2
    assert "no results store" in capsys.readouterr().err
    ResultsStore(tmp_path / "empty").close()
    assert main(["report", "--results", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no runs in") and out.count("\n") == 1
    page = (tmp_path / "empty" / "report" / "index.html").read_text()
    assert "holds no evaluated circuits yet" in page


def test_report_command_in_a_fresh_process(tmp_path):
    ResultsStore(tmp_path / "empty").close()
    proc = subprocess.run([sys.executable, "-m", "circuitbench", "report", "--results", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("no runs in"), proc.stderr


# ---- edge faithfulness -------------------------------------------------------------------------------
def test_edge_faithfulness_compute_store_and_draw(tmp_path):
    """On tracr:reverse's ground-truth circuit: the circuit itself is faithful, every edge of it
    matters, and each stored value equals an independent evaluation of the circuit without it."""
    from circuitbench import load_model
    from circuitbench.cli import main
    from circuitbench.evaluate import evaluate
    from circuitbench.report import edge_faithfulness as ef
    from circuitbench.tracr import ground_truth

    def stored():
        store = ResultsStore(results, readonly=True)
        try:
            return store.edge_faithfulness()
        finally:
            store.close()

    results = tmp_path / "res"
    circuit_file = tmp_path / "gt.json"
    gt = ground_truth("reverse")
    Circuit.from_names(TRACR, gt, meta={"task": "tracr-reverse", "model": "tracr:reverse"}).save(circuit_file)
    assert main(["report", "--results", str(results), "--edge-faithfulness", str(circuit_file), "--limit", "40",
                 "--no-progress"]) == 0
    rows = stored()
    assert len(rows) == len(gt) and rows["n_examples"].iloc[0] == 40
    assert rows["circuit_loss"].iloc[0] == pytest.approx(0.0, abs=1e-4)  # the ground truth is faithful
    assert (rows["circuit_without"] > 1e-3).all()  # no inert edge in the ground truth
    model = load_model("tracr:reverse")
    for k in (0, len(rows) - 1):
        edge = rows["edge"].iloc[k]
        without = Circuit.from_names(model.graph, [e for e in gt if e != edge])
        kl = evaluate(model, "tracr-reverse", without, limit=40, progress=False)["kl"]
        assert rows["circuit_without"].iloc[k] == pytest.approx(kl, rel=1e-5, abs=1e-7)
        full_without = Circuit.full(model.graph)
        full_without.edges[model.graph.parse_edge(edge)] = False
        kl = evaluate(model, "tracr-reverse", full_without, limit=40, progress=False)["kl"]
        assert rows["model_without"].iloc[k] == pytest.approx(kl, rel=1e-5, abs=1e-7)
    assert (out := results / "report" / "figures" / "edge_faithfulness.png").exists(), out
    art = ef.figure(rows)
    assert sum(1 for c in art.figure.axes[0].collections if c.get_gid() == "series") >= 3  # q/k/v/mlp/logits kinds
    csv = pd.read_csv(results / "report" / "tables" / "edge_faithfulness_edges.csv")
    assert len(csv) == len(rows)
    # a second run of the same study replaces it
    assert main(["report", "--results", str(results), "--edge-faithfulness", str(circuit_file), "--limit", "40",
                 "--no-progress"]) == 0
    assert len(stored()) == len(rows)


def test_edge_faithfulness_errors(tmp_path):
    from circuitbench.cli import main

    assert main(["report", "--results", str(tmp_path), "--edge-faithfulness", "no-such-run"]) == 2
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"format": "circuitbench", "edges": []}))
    assert main(["report", "--results", str(tmp_path), "--edge-faithfulness", str(bad)]) == 2
    assert main(["report", "--results", str(tmp_path), "--model", "tracr:reverse"]) == 2


# ---- layout ------------------------------------------------------------------------------------------
def _layout_gaps(fig) -> tuple[float, float]:
    """Inches between the suptitle and the highest panel title, and between the lowest panel's
    labels and the legend below (negative: they overlap)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible()]
    top = fig._suptitle.get_window_extent(renderer).y0 - max(b.y1 for b in boxes)
    bottom = min(b.y0 for b in boxes) - fig.legends[0].get_window_extent(renderer).y1
    return top / fig.dpi, bottom / fig.dpi


def test_figures_leave_no_blank_band_under_the_title(data, tmp_path):
    """Issue 19: the panels start just below the figure's title and end just above the legend
    (the title's room was reserved twice: a blank band of ~0.7 inch), for one panel and for a grid."""
    import matplotlib.pyplot as plt

    from circuitbench.report import figures, tables
    from circuitbench.report.data import load_report_data

    make_store(tmp_path, tracr=False, case_study=False, failed=False, lm_tasks=(("ioi-t1", (200,)),)).close()
    one = load_report_data(tmp_path)
    try:
        arts = [figures.faithfulness(one), figures.auc_curves(one), figures.faithfulness(data),
                figures.performance(data), figures.auc_curves(data), figures.auc_bars(tables.auc_table(data).table)]
        for art in arts:
            top, bottom = _layout_gaps(art.figure)
            assert 0.0 < top <= 0.2, (art.name, top)
            assert 0.0 < bottom <= 0.2, (art.name, bottom)
            plt.close(art.figure)
    finally:
        one.store.close()


# ---- training curves and effective edges ------------------------------------------------------------------
def _path_log(targets, steps_per_stage):
    log, info, step = [], {"schedule": "path", "targets": {}}, 0
    for k, t in enumerate(targets):
        for i in range(steps_per_stage):
            row = {"step": step, "stage": k, "stage_step": i, "kl": 1.0 / (1 + step), "edge_sparsity": t * i / steps_per_stage,
                   "realised_sparsity": t * i / steps_per_stage, "target": t, "lambda1": 0.1, "lambda2": 0.0}
            log.append({"target_sparsity": t, **row})
            step += 1
        info["targets"][str(t)] = {"stage": k, "train_target": t, "stop": "converged" if k else "max_steps",
                                   "steps": steps_per_stage, "run_steps": step}
    return log, info


def test_training_curves_from_stored_logs(tmp_path):
    from test_store import make_job

    from circuitbench.report.data import load_report_data
    from circuitbench.report.training import training_curves

    store = ResultsStore(tmp_path)
    for i, seed in enumerate((0, 1)):
        job, runs, metrics, circuits, scores = make_job(f"bbbb00000000000{i}", method="ep", seed=seed)
        job["log"], job["info"] = _path_log([0.5, 0.9], 20)
        store.record_job(job, runs, metrics, circuits, None)
    store.record_job(*make_job("bbbb000000000009", method="eap"))  # a log without a curve: not drawn
    store.close()
    data = load_report_data(tmp_path)
    arts = list(training_curves(data))
    assert [a.name for a in arts] == ["training_ioi-t1_random-gpt2-tiny"]
    fig = arts[0].figure
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["seed 0, n=50, path 0.5 → 0.9", "seed 1, n=50, path 0.5 → 0.9"]
    kl_line = panels[0].get_lines()[0]
    assert list(kl_line.get_xdata()) == list(range(40))  # one point per logged step, rows not repeated
    notes = [t.get_text() for t in panels[0].texts]
    assert notes == ["0.5: max_steps", "0.9: converged"]
    assert sorted(arts[0].run_ids) == ["bbbb000000000000", "bbbb000000000001"]
    # the table: one row per circuit of a trained job, with its stage's steps and stop
    from circuitbench.report.training import training_table

    table = training_table(data).table
    assert len(table) == 4 and set(table["schedule"]) == {"path"}
    row = table[(table["seed"] == 1) & (table["target"] == 0.9)].iloc[0]
    assert (row["steps"], row["stop"], row["run steps"]) == (20, "converged", 40)
    assert row["test kl"] == pytest.approx(0.9)  # make_job's metric: kl = the target sparsity
    data.store.close()


def test_figures_place_runs_by_effective_edges(tmp_path):
    from test_store import make_job

    from circuitbench.report import figures
    from circuitbench.report.data import load_report_data

    store = ResultsStore(tmp_path)
    job, runs, metrics, circuits, scores = make_job("cccc000000000001", method="eap", sparsities=(0.9,))
    runs[0]["n_effective"] = runs[0]["n_edges"] // 2  # half of its edges dangle
    store.record_job(job, runs, metrics, circuits, scores)
    store.close()
    data = load_report_data(tmp_path)
    art = figures.faithfulness(data)
    ax = next(a for a in art.figure.axes if a.get_title())
    x = ax.get_lines()[0].get_xdata()[0]
    assert x == pytest.approx((runs[0]["n_edges"] // 2) / runs[0]["total_edges"])  # effective, not kept
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "fraction of edges kept (effective)" and "effective" in art.caption
    data.store.close()


def test_path_and_warm_start_runs_are_series_of_their_own(tmp_path):
    from test_store import make_job

    from circuitbench.report import figures
    from circuitbench.report.data import load_report_data

    store = ResultsStore(tmp_path)
    for i, cfg in enumerate(({"schedule": "independent"}, {"schedule": "path"},
                             {"schedule": "independent", "warm_start": "eap-ig"})):
        job, runs, metrics, circuits, scores = make_job(f"dddd00000000000{i}", method="ep")
        job["method_config"] = cfg
        store.record_job(job, runs, metrics, circuits, None)
    store.close()
    data = load_report_data(tmp_path)
    assert sorted(set(data.runs["method_preset"])) == ["smoke", "smoke, path", "smoke, warm eap-ig"]
    labels = sorted(l.get_label() for ax in figures.faithfulness(data).figure.axes for l in ax.get_lines()
                    if l.get_gid() == "series")
    assert labels == ["ep (smoke)", "ep (smoke, path)", "ep (smoke, warm eap-ig)"]
    data.store.close()


def test_warm_start_table_counts_steps_to_the_cold_runs_kl(tmp_path):
    from test_store import make_job

    from circuitbench.report.data import load_report_data
    from circuitbench.report.training import warm_start_table

    def log(kl_at):
        return [{"target_sparsity": 0.9, "step": s, "kl": kl_at(s), "edge_sparsity": 0.9, "target": 0.9}
                for s in range(0, 80, 2)]

    store = ResultsStore(tmp_path)
    for i, (warm, kl_at) in enumerate(((None, lambda s: 1.0), ("eap-ig", lambda s: 2.0 if s < 20 else 0.5))):
        job, runs, metrics, circuits, scores = make_job(f"eeee00000000000{i}", method="ep", sparsities=(0.9,))
        job["log"] = log(kl_at)
        job["info"] = {"schedule": "independent", "warm_start": warm,
                       "targets": {"0.9": {"steps": 80, "stop": "max_steps", "run_steps": 80}}}
        runs[0]["n_effective"] = runs[0]["n_edges"]
        store.record_job(job, runs, metrics, circuits, None)
    store.close()
    data = load_report_data(tmp_path)
    row = warm_start_table(data).table.iloc[0]
    # the cold run ends at training KL 1.0; the warm run's 25-step mean first gets there at step 36
    # (rows 12-18 at 2.0, 20-36 at 0.5: 12.5 / 13)
    assert row["cold final train kl"] == pytest.approx(1.0)
    assert row["warm steps to that kl"] == 36 and row["warm start"] == "eap-ig"
    assert row["cold test kl"] == row["warm test kl"] == pytest.approx(0.9)
    data.store.close()


def test_auc_bars_add_mib_cpr_and_cmd_panels_when_measured():
    """Issue 15: the AUC figure shows MIB's CPR and CMD below the linear and log AUCs when some
    series has them, and leaves them out when none does (sizes that do not reach 0.1%)."""
    import math

    import matplotlib.pyplot as plt
    import pandas as pd

    from circuitbench.report import figures

    def table(cpr):
        return pd.DataFrame([
            {"task": "ioi", "model": "m", "method": m, "preset": "paper", "n_train": 200, "series": m,
             "sparsities": 10, "auc_linear": 0.8, "auc_log": 0.6, "cpr": c, "cmd": 1 - c if math.isfinite(c) else c}
            for m, c in (("eap", cpr), ("random", 0.2))])

    art = figures.auc_bars(table(0.79))
    titles = [ax.get_title() for ax in art.figure.axes]
    assert titles == ["AUC, linear axis", "AUC, log axis", "MIB's CPR (higher is better)",
                      "MIB's CMD (lower is better)"]
    cmd_ax = art.figure.axes[3]
    assert sorted(round(p.get_height(), 6) for p in cmd_ax.patches) == [0.21, 0.8]
    plt.close(art.figure)
    none = table(float("nan"))
    none["cpr"], none["cmd"] = float("nan"), float("nan")
    art = figures.auc_bars(none)
    assert [ax.get_title() for ax in art.figure.axes] == ["AUC, linear axis", "AUC, log axis"]
    plt.close(art.figure)


def test_each_method_main_series_is_drawn_with_circles(tmp_path):
    """A method whose only series has its own preset (Edge Pruning's path) is its main series, drawn
    with circles like the other methods' main series; a method's second training-set size is a side
    series with a marker of its own, named in the legend."""
    from test_store import make_job

    from circuitbench.report import figures
    from circuitbench.report.data import load_report_data

    store = ResultsStore(tmp_path)
    jobs = [make_job("dddd000000000001", method="eap", sparsities=(0.5, 0.8, 0.9)),
            make_job("dddd000000000002", method="eap", sparsities=(0.9,)),
            make_job("dddd000000000003", method="ep", sparsities=(0.8, 0.9))]
    jobs[1][0]["n_train"] = 400
    jobs[2][0]["method_preset"] = "paper, path"
    for job, runs, metrics, circuits, scores in jobs:
        store.record_job(job, runs, metrics, circuits, scores)
    store.close()
    data = load_report_data(tmp_path)
    art = figures.faithfulness(data)
    ax = next(a for a in art.figure.axes if a.get_title())
    markers = {(line.get_label(), len(line.get_xdata())): line.get_marker()
               for line in ax.get_lines() if line.get_gid() == "series"}
    side = next(m for (label, n), m in markers.items() if n == 1)
    assert side != "o"
    assert all(m == "o" for (label, n), m in markers.items() if n > 1)
    variants = figures.Variants([panel_curves_of(data)])
    assert variants.legend_entries()[0] == ("o", "each method's main series")
    assert any(label == "n=400" for _, label in variants.legend_entries()[1:])
    data.store.close()


def panel_curves_of(data):
    from circuitbench.report.curves import panel_curves

    task, model = data.panels[0]
    return panel_curves(data, task, model, "kl")
