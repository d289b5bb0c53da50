"""The results store: records, queries, atomicity under kill -9, and concurrent writers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from circuitbench.circuit import Circuit
from circuitbench.errors import UserError
from circuitbench.graph import Graph
from circuitbench.store import ResultsStore, run_id_for

GRAPH = Graph(2, 4)
GRAPH_DICT = {"layers": 2, "heads": 4, "kv_heads": 4, "n_kv_heads": None, "has_mlp": True, "edges": GRAPH.n_edges}


def make_job(job_id: str, method="eap", task="ioi-t1", sparsities=(0.5, 0.9), seed=0):
    """A complete job record with one run per sparsity, cut from deterministic scores."""
    gen = torch.Generator().manual_seed(hash(job_id) % 2**31)
    scores = torch.randn(GRAPH.n_writers, GRAPH.n_readers, generator=gen)
    job = {"job_id": job_id, "config": {"job": job_id}, "method": method, "method_preset": "smoke",
           "method_config": {"batch_size": 8}, "task": task, "model": "random:gpt2-tiny", "dtype": "float32",
           "n_train": 50, "n_validation": None, "data_seed": 0, "seed": seed, "target_sparsity": None,
           "wall_s": {"setup": 0.5, "train": 1.5}, "wall_total_s": 2.0, "forward_passes": 10,
           "backward_passes": 5, "peak_memory_mib": 12.5, "device": "cpu", "device_name": "test cpu",
           "threads": 1, "host": "h", "versions": {"circuitbench": "0.1.0", "torch": "2.13.0"},
           "graph": GRAPH_DICT, "log": [{"step": 1, "loss": 0.1}], "info": {}, "started_at": "t0",
           "finished_at": "t1"}
    runs, metrics, circuits = [], {}, {}
    for s in sparsities:
        c = Circuit.from_sparsity(GRAPH, scores, s)
        rid = run_id_for(job_id, s)
        runs.append({"run_id": rid, "job_id": job_id, "target_sparsity": s, "sparsity": c.sparsity,
                     "n_edges": c.n_edges, "total_edges": GRAPH.n_edges, "n_nodes": len(c.nodes),
                     "eval_s": 0.1, "finished_at": "t1"})
        metrics[rid] = {"test": {"kl": float(s), "accuracy": 1.0 - s}}
        circuits[rid] = c.to_dict()
    return job, runs, metrics, circuits, scores.numpy()


def test_record_and_query(tmp_path):
    store = ResultsStore(tmp_path / "res")
    job, runs, metrics, circuits, scores = make_job("aaaa000000000001")
    assert store.record_job(job, runs, metrics, circuits, scores)
    assert not store.record_job(job, runs, metrics, circuits, scores)  # recorded once only
    df = store.runs()
    assert len(df) == 2 and set(df["run_id"]) == {r["run_id"] for r in runs}
    for col in ("method", "task", "model", "n_train", "seed", "target_sparsity", "sparsity", "n_edges",
                "wall_total_s", "wall_s.setup", "wall_s.train", "forward_passes", "backward_passes",
                "peak_memory_mib", "device", "circuitbench_version", "torch_version", "runs_in_job"):
        assert col in df.columns, col
    assert df["runs_in_job"].tolist() == [2, 2]
    assert df["wall_s.train"].tolist() == [1.5, 1.5]
    wide = store.runs(with_metrics=True)
    assert wide.set_index("target_sparsity")["test/kl"].to_dict() == {0.5: 0.5, 0.9: 0.9}
    m = store.metrics()
    assert len(m) == 4 and set(m["metric"]) == {"kl", "accuracy"} and set(m["split"]) == {"test"}
    c = store.circuit(job["job_id"], sparsity=0.9)
    assert c.n_edges == runs[1]["n_edges"] and c.graph == GRAPH
    assert store.circuit(runs[0]["run_id"]).n_edges == runs[0]["n_edges"]
    with pytest.raises(UserError, match="name a sparsity"):
        store.circuit(job["job_id"])
    np.testing.assert_array_equal(store.scores(job["job_id"]), scores)
    assert store.run_sparsities(job["job_id"]) == {0.5, 0.9}
    # filters
    assert len(store.runs(method="acdc")) == 0 and len(store.runs(method=["eap", "acdc"])) == 2


def test_runs_need_metrics_and_failures_are_replaced(tmp_path):
    store = ResultsStore(tmp_path)
    job, runs, metrics, circuits, _ = make_job("bbbb000000000001")
    with pytest.raises(ValueError, match="without metrics"):
        store.record_job(job, runs, {runs[0]["run_id"]: metrics[runs[0]["run_id"]]}, circuits)
    assert store.counts()["complete"] == 0 and store.counts()["runs"] == 0
    assert store.record_failure(job, "RuntimeError: boom")
    assert store.job_status() == {job["job_id"]: "failed"}
    failed = store.runs(status="failed")
    assert len(failed) == 1 and failed["error"].iloc[0] == "RuntimeError: boom"
    assert len(store.runs()) == 0  # failed jobs are not runs
    assert store.record_job(job, runs, metrics, circuits)
    assert store.job_status() == {job["job_id"]: "complete"}
    assert not store.record_failure(job, "late failure")  # never overwrites a complete job
    assert store.counts() == {"complete": 1, "failed": 0, "runs": 2, "references": 0}


def test_add_runs_and_references(tmp_path):
    store = ResultsStore(tmp_path)
    job, runs, metrics, circuits, scores = make_job("cccc000000000001", sparsities=(0.5,))
    store.record_job(job, runs, metrics, circuits, scores)
    _, runs2, metrics2, circuits2, _ = make_job("cccc000000000001", sparsities=(0.5, 0.8))
    assert store.add_runs(job["job_id"], runs2, metrics2, circuits2) == 1  # 0.5 is there already
    assert store.run_sparsities(job["job_id"]) == {0.5, 0.8}
    ref = {"ref_id": "r1", "task": "ioi-t1", "model": "random:gpt2-tiny", "dtype": "float32", "device": "cpu",
           "data_seed": 0, "eval_limit": None}
    vals = {"test": {"full": {"kl": 0.0, "accuracy": 0.9}, "empty": {"kl": 2.0, "accuracy": 0.1}}}
    assert store.record_references(ref, vals) and not store.record_references(ref, vals)
    assert store.has_references("r1")
    rm = store.reference_metrics(task="ioi-t1")
    assert len(rm) == 4
    assert rm.set_index(["circuit", "metric"])["value"].to_dict()[("empty", "kl")] == 2.0


def test_missing_store_and_bad_file(tmp_path):
    with pytest.raises(UserError, match="no results store"):
        ResultsStore(tmp_path / "nothing", create=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.db").write_text("this is not sqlite " * 100)
    with pytest.raises(UserError, match="not a circuitbench results database"):
        ResultsStore(tmp_path / "bad")


WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from test_store import make_job
    from circuitbench.store import ResultsStore
    store = ResultsStore({root!r})
    while {barrier!r} and not os.path.exists({barrier!r}):  # start writing together
        time.sleep(0.01)
    if {barrier!r}:  # and only once both writers are past the barrier (a loaded machine may start one late)
        open({barrier!r} + ".%d" % os.getpid(), "w").close()
        import glob
        while len(glob.glob({barrier!r} + ".*")) < 2:
            time.sleep(0.01)
    print("start", time.time(), flush=True)
    for i in {ids!r}:
        job = make_job("%016x" % i)
        store.record_job(*job)
        print(i, flush=True)
    print("end", time.time(), flush=True)
""")


def _writer(root, ids, barrier=""):
    code = WRITER.format(tests=os.path.dirname(__file__), root=str(root), ids=list(ids), barrier=str(barrier))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_lose_nothing(tmp_path):
    # 30 jobs each, 10 of them in both processes: 50 distinct jobs, each recorded exactly once.
    barrier = tmp_path / "go"
    a = _writer(tmp_path, range(0, 30), barrier)
    b = _writer(tmp_path, range(20, 50), barrier)
    time.sleep(0.5)
    barrier.touch()
    spans = []
    for p in (a, b):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        marks = dict(line.split() for line in out.splitlines() if line.startswith(("start", "end")))
        spans.append((float(marks["start"]), float(marks["end"])))
    assert max(s for s, _ in spans) < min(e for _, e in spans), "the writers did not overlap"
    store = ResultsStore(tmp_path)
    assert store.integrity_check() == "ok"
    assert store.counts() == {"complete": 50, "failed": 0, "runs": 100, "references": 0}
    m = store.metrics()
    assert len(m) == 200 and not m.duplicated(["run_id", "split", "metric"]).any()
    assert sorted(store.job_status()) == ["%016x" % i for i in range(50)]


def test_kill_during_writes_never_corrupts(tmp_path):
    p = _writer(tmp_path, range(1000))
    # wait for a few jobs, then kill -9 at an arbitrary moment of the write loop
    for _ in range(5):
        p.stdout.readline()
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    store = ResultsStore(tmp_path)
    assert store.integrity_check() == "ok"
    counts = store.counts()
    assert 5 <= counts["complete"] < 1000
    # every recorded job is whole: both runs, all metrics, circuit files on disk
    assert counts["runs"] == 2 * counts["complete"]
    df = store.runs(with_metrics=True)
    assert df["test/kl"].notna().all() and df["test/accuracy"].notna().all()
    for f in df["circuit_file"]:
        data = json.loads((tmp_path / f).read_text())
        assert data["format"] == "circuitbench"


def test_record_writes_each_kind_of_result(tmp_path):
    """`ResultsStore.record`: what a unit returns (`circuitbench.result`), one call whatever its kind."""
    from circuitbench.result import JobResult, ReferenceResult
    from circuitbench.sweep import Sweep

    jobs, refs = Sweep.build(flags={"methods": "eap", "tasks": "ioi-t1", "models": "random:gpt2-tiny",
                                    "sparsities": "0.5,0.9"}).plan()
    spec = jobs[0]
    record, runs, metrics, circuits, scores = make_job(spec.job_id, sparsities=spec.sparsities)
    environment = {k: record[k] for k in ("device", "device_name", "threads", "host", "versions", "started_at",
                                          "finished_at")}
    cost = {k: record[k] for k in ("wall_s", "wall_total_s", "forward_passes", "backward_passes", "peak_memory_mib")}
    store = ResultsStore(tmp_path)
    assert store.record(JobResult(spec, environment, error="RuntimeError: boom (at x.py:1)"))
    assert store.job_status([spec.job_id]) == {spec.job_id: "failed"}
    first = tuple(r for r in runs if r["target_sparsity"] == 0.5)
    done = JobResult(spec, environment, cost, GRAPH_DICT, [{"step": 1}], {"n": 1}, first,
                     {r["run_id"]: metrics[r["run_id"]] for r in first}, circuits, scores)
    assert done.kind == "job" and done.row()["method_config"] == spec.method_config
    assert store.record(done) and not store.record(done)  # complete once; the failure is replaced
    assert store.job_status([spec.job_id]) == {spec.job_id: "complete"}
    assert not store.record(JobResult(spec, environment, error="late"))  # never over a complete job
    rest = tuple(r for r in runs if r["target_sparsity"] == 0.9)
    extend = JobResult(spec, environment, runs=rest, metrics=metrics, circuits=circuits, extends=True)
    assert extend.kind == "extend" and store.record(extend) and not store.record(extend)
    assert store.run_sparsities(spec.job_id) == {0.5, 0.9}
    ref = ReferenceResult(refs[0], {"test": {"full": {"kl": 0.0}, "empty": {"kl": 1.5}}})
    assert store.record(ref) and not store.record(ref) and store.has_references(refs[0].ref_id)
    row = store.runs().iloc[0]
    assert json.loads(row["config"]) == spec.config and row["device_name"] == "test cpu"


def _downgrade_to_schema_1(db):
    """What a store written before schema 2 looks like: no jobs.derived_from, no edge_faithfulness."""
    import sqlite3

    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("ALTER TABLE jobs DROP COLUMN derived_from")
    conn.execute("DROP TABLE edge_faithfulness")
    conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_schema_1_store_migrates_and_its_intersection_becomes_a_derived_job(tmp_path):
    """A schema-1 store marked the case study's intersection only in its config; the migration
    names its runs in ``derived_from``. Read-only, the store is migrated in memory and its file is
    left as it was; a writable open migrates the file."""
    import sqlite3

    from circuitbench.store import SCHEMA_VERSION

    store = ResultsStore(tmp_path)
    job, runs, metrics, circuits, _ = make_job("a" * 16, sparsities=(0.5,))
    store.record_job(job, runs, metrics, circuits)
    inter, iruns, imetrics, icircuits, _ = make_job("b" * 16, method="intersection", sparsities=(0.5,))
    inter["config"] = {"method": "intersection", "intersection_of": [runs[0]["run_id"], "x-s0.5"]}
    store.record_job(inter, iruns, imetrics, icircuits)
    store.close()
    _downgrade_to_schema_1(tmp_path / "results.db")
    before = (tmp_path / "results.db").read_bytes()

    ro = ResultsStore(tmp_path, readonly=True)
    try:
        df = ro.runs()
        assert dict(zip(df["job_id"], df["derived_from"])) == {"a" * 16: None,
                                                               "b" * 16: (runs[0]["run_id"], "x-s0.5")}
        assert ro.edge_faithfulness().empty
        with pytest.raises(UserError, match="read-only"):
            ro.add_metrics(runs[0]["run_id"], "test@x", {"kl": 1.0})
    finally:
        ro.close()
    assert (tmp_path / "results.db").read_bytes() == before

    rw = ResultsStore(tmp_path)
    try:
        df = rw.runs()
        assert df.set_index("job_id")["derived_from"]["b" * 16] == (runs[0]["run_id"], "x-s0.5")
    finally:
        rw.close()
    conn = sqlite3.connect(tmp_path / "results.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_newer_schema_is_a_clear_error(tmp_path):
    import sqlite3

    ResultsStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "results.db", isolation_level=None)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    for readonly in (False, True):
        with pytest.raises(UserError, match="upgrade circuitbench"):
            ResultsStore(tmp_path, readonly=readonly)


def test_derived_and_edge_faithfulness_results_are_recorded(tmp_path):
    """`ResultsStore.record` of the derived step's results: a `JobResult` of a `DerivedSpec` (its
    runs named in ``derived_from``), a `RunMetricsResult`, an `EdgeFaithfulnessResult` (replaced
    by a rerun of the same study)."""
    from circuitbench.result import EdgeFaithfulnessResult, JobResult, RunMetricsResult
    from circuitbench.sweep import DerivedSpec

    store = ResultsStore(tmp_path)
    job, runs, metrics, circuits, _ = make_job("a" * 16, sparsities=(0.5,))
    store.record_job(job, runs, metrics, circuits)
    spec = DerivedSpec("intersection", (runs[0]["run_id"], "other-s0.5"), task="ioi-t1", model="random:gpt2-tiny",
                       dtype="float32", device="cpu", eval_limit=8, data_seed=0, target_sparsity=0.5)
    assert spec.config["intersection_of"] == list(spec.derived_from)  # the id schema 1 stores hashed
    _, druns, dmetrics, dcircuits, _ = make_job(spec.job_id, sparsities=(0.5,))
    environment = {k: job[k] for k in ("device", "device_name", "threads", "host", "versions", "started_at",
                                       "finished_at")}
    result = JobResult(spec, environment, {"wall_s": {"evaluate": 1.0}}, GRAPH_DICT, [], {}, tuple(druns),
                       dmetrics, dcircuits)
    assert store.record(result) and not store.record(result)
    df = store.runs().set_index("job_id")
    assert df["derived_from"][spec.job_id] == spec.derived_from and df["derived_from"]["a" * 16] is None
    assert store.record(RunMetricsResult(runs[0]["run_id"], "test@gt", {"kl": 0.25}))
    assert not store.record(RunMetricsResult(runs[0]["run_id"], "test@gt", {"kl": 0.5}))
    m = store.metrics(split="test@gt")
    assert list(m["value"]) == [0.25]
    study = EdgeFaithfulnessResult("c", None, "c.json", "ioi-t1", "random:gpt2-tiny", "test", 0, "cpu", "kl", 8, 0.1,
                                   ("input->logits", "m0->logits"), (0.2, 0.3), (0.4, 0.5), "t0")
    assert store.record(study) and store.record(study)
    rows = store.edge_faithfulness()
    assert list(rows["edge"]) == ["input->logits", "m0->logits"] and set(rows["study_id"]) == {study.study_id}
    store.close()
