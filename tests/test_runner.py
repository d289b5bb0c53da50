"""The runner and the `run` / `results` commands: recording, resume (also after kill -9), failures,
clean errors, dry runs, worker processes, determinism and the smoke regression check."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from circuitbench.circuit import Circuit
from circuitbench.cli import main
from circuitbench.errors import UserError
from circuitbench.method import CircuitMethod, CostMeter, MethodResult, seeded_generator
from circuitbench.runner import run_sweep
from circuitbench.store import ResultsStore
from circuitbench.sweep import Sweep

sys.path.insert(0, str(Path(__file__).parent / "reference"))
sys.path.insert(0, str(Path(__file__).parent))
import compare_smoke  # noqa: E402
from methods_support import temporary_methods  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DISCOVERIES: list[tuple[str, int]] = []  # (method, seed) of every discover() call in this process
TINY = {"tasks": "ioi-t1", "models": "random:gpt2-tiny", "n_train": "8", "eval_limit": 8, "method_preset": "smoke"}


@dataclass
class FakeConfig:
    scale: float = 1.0
    per_task: dict = field(default_factory=dict)


class _Fake(CircuitMethod):
    description = "test method: seeded random scores"
    Config = FakeConfig
    presets = {"paper": {}, "quick": {}, "smoke": {}}

    def _scores(self, engine, seed):
        g = engine.graph
        return torch.rand(g.n_writers, g.n_readers, generator=seeded_generator(seed)) * self.config.scale


class FakeScores(_Fake):
    name = "fake-scores"
    produces = "scores"

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True):
        DISCOVERIES.append((self.name, seed))
        meter = CostMeter(engine.device)
        with meter.phase("score"):
            scores = self._scores(engine, seed)
            meter.forward(len(train))
        return MethodResult(scores=scores, cost=meter.finish(), log=[{"step": 0}])


class FakeCircuits(_Fake):
    name = "fake-circuits"
    produces = "circuits"

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True):
        DISCOVERIES.append((self.name, seed))
        meter = CostMeter(engine.device)
        with meter.phase("train"):
            scores = self._scores(engine, seed)
            circuits = {s: Circuit.from_sparsity(engine.graph, scores, s) for s in sparsities}
            meter.forward(3)
            meter.backward(3)
        return MethodResult(circuits=circuits, cost=meter.finish())


class FakeFailing(_Fake):
    name = "fake-fail"
    produces = "scores"

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True):
        raise RuntimeError("this method always fails")


@pytest.fixture(autouse=True, scope="module")
def _fake_methods():
    with temporary_methods(FakeScores, FakeCircuits, FakeFailing):
        yield


def sweep(**flags):
    return Sweep.build(flags={**TINY, **flags})


def test_records_resumes_and_extends(tmp_path):
    DISCOVERIES.clear()
    s = run_sweep(sweep(methods="fake-scores,fake-circuits", sparsities="0.5,0.9"), results=str(tmp_path),
                  progress=False)
    assert (s.planned_jobs, s.recorded_jobs, s.references, s.failed_jobs) == (3, 3, 1, [])
    assert sorted(DISCOVERIES) == [("fake-circuits", 0), ("fake-circuits", 0), ("fake-scores", 0)]
    store = ResultsStore(tmp_path)
    df = store.runs(with_metrics=True)
    assert len(df) == 4 and df["status"].eq("complete").all()
    assert {"test/kl", "test/logit_diff", "test/accuracy", "test/exact_match"} <= set(df.columns)
    assert df["n_examples"].eq(8).all() and df["n_train"].eq(8).all()
    scores_rows = df[df["method"] == "fake-scores"]
    assert scores_rows["runs_in_job"].eq(2).all() and scores_rows["job_id"].nunique() == 1
    # 110 edges at sparsities 0.9 and 0.5: the circuit method keeps 11 and 55 edges; the score method's
    # ranking is cut where 11 and 55 edges are effective (a few more when one edge completes several paths)
    circuit_rows = df[df["method"] == "fake-circuits"].sort_values("target_sparsity")
    assert list(circuit_rows["n_edges"]) == [55, 11]
    scores_rows = scores_rows.sort_values("target_sparsity")
    assert (scores_rows["n_edges"] == scores_rows["n_effective"]).all()
    assert scores_rows["n_effective"].iloc[0] >= 55 and scores_rows["n_effective"].iloc[1] >= 11
    assert (df["n_effective"] <= df["n_edges"]).all()
    assert df["forward_passes"].gt(0).all() and df["device"].eq("cpu").all()
    assert df["torch_version"].eq(torch.__version__).all()
    c = store.circuit(scores_rows["run_id"].iloc[0])
    assert c.n_edges == scores_rows["n_edges"].iloc[0]
    ref = store.reference_metrics()
    assert set(ref["circuit"]) == {"full", "empty"}
    assert ref[(ref.circuit == "full") & (ref.metric == "kl")]["value"].iloc[0] == pytest.approx(0, abs=1e-6)

    # the same sweep again: everything is complete, nothing runs
    s = run_sweep(sweep(methods="fake-scores,fake-circuits", sparsities="0.5,0.9"), results=str(tmp_path),
                  progress=False)
    assert (s.skipped_jobs, s.executed) == (3, 0) and len(DISCOVERIES) == 3
    # a larger grid: the score-based job is cut again from its stored scores (no rediscovery);
    # the circuit method trains one new job
    s = run_sweep(sweep(methods="fake-scores,fake-circuits", sparsities="0.5,0.7,0.9"), results=str(tmp_path),
                  progress=False)
    assert s.skipped_jobs == 2 and s.executed == 2
    assert sorted(DISCOVERIES) == [("fake-circuits", 0)] * 3 + [("fake-scores", 0)]
    df = store.runs()
    assert len(df) == 6 and df[df.method == "fake-scores"]["runs_in_job"].eq(3).all()


def test_failed_job_is_recorded_and_retried(tmp_path, capsys):
    args = ["run", "--methods", "fake-fail,fake-scores", "--task", "ioi-t1", "--model", "random:gpt2-tiny",
            "--n-train", "8", "--eval-limit", "8", "--sparsities", "0.5", "--results", str(tmp_path), "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "failed: RuntimeError: this method always fails" in err
    store = ResultsStore(tmp_path)
    assert store.counts()["complete"] == 1 and store.counts()["failed"] == 1
    failed = store.runs(status="failed")
    assert failed["error"].str.contains("always fails").all()
    assert main(args) == 1  # retried (and failing again), the complete job skipped
    assert "1 already complete" in capsys.readouterr().out
    assert store.counts()["failed"] == 1


ERROR_CASES = {
    "unknown method": (["--methods", "nope", "--task", "ioi-t1"], "unknown method 'nope'"),
    "unknown task": (["--methods", "eap", "--task", "nope"], "unknown task 'nope'"),
    "unknown model": (["--methods", "eap", "--task", "ioi-t1", "--model", "random:nope"], "unknown model"),
    "unknown preset": (["--preset", "nope"], "unknown preset 'nope'"),
    "sparsity 1": (["--methods", "eap", "--task", "ioi-t1", "--sparsities", "0.9,1.0"], "outside [0, 1)"),
    "sparsity range": (["--methods", "eap", "--task", "ioi-t1", "--sparsities", "0.9:1.1:0.1"], "outside [0, 1)"),
    "negative sparsity": (["--methods", "eap", "--task", "ioi-t1", "--sparsities=-0.5"], "outside [0, 1)"),
    "n_train too large": (["--methods", "eap", "--task", "ioi", "--n-train", "200,1000000"], "training pool"),
    "unknown hyperparameter": (["--methods", "eap", "--task", "ioi-t1", "--set", "eap.nope=1"], "unknown eap hyperparameter"),
    "unknown ep hyperparameter": (["--methods", "ep,eap", "--task", "gt", "--set", "ep.nosuch=1"],
                                  "unknown ep hyperparameter(s) nosuch"),
    "hyperparameter of the wrong type": (["--methods", "ep,eap", "--task", "gt", "--set", "ep.steps=abc"],
                                         "ep.steps: expected int, got 'abc'"),
    "ensemble member hyperparameter of the wrong type": (
        ["--methods", "ensemble", "--task", "gt", "--set", "ensemble.member_config={eap = {batch_size = 0.5}}"],
        "ensemble member eap: eap.batch_size: expected int, got 0.5"),
    "unknown backend": (["--methods", "eap", "--task", "ioi-t1", "--backend", "spark"], "invalid choice"),
    "no method": (["--task", "ioi-t1"], "no method given"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_exit_2_with_one_line_before_any_work(case, tmp_path, capsys):
    args, msg = ERROR_CASES[case]
    results = tmp_path / "results"
    assert main(["run", *args, "--results", str(results), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert not results.exists()  # nothing was started


def test_config_file_errors_and_unwritable_folder(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('methods = ["eap"]\ntasks = ["ioi-t1"]\nmodel = ["gpt2"]\n')
    assert main(["run", "--config", str(bad), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'model'" in err and err.count("\n") == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "--preset", "smoke", "--results", str(blocker / "results"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and err.count("\n") == 1


@pytest.mark.parametrize("backend,module", [("dask", "dask.distributed"), ("ray", "ray")])
def test_missing_cluster_extra(backend, module, tmp_path, capsys, monkeypatch):
    # a None entry in sys.modules makes `import module` fail as if the extra were not installed
    for name in (module, module.split(".")[0]):
        monkeypatch.setitem(sys.modules, name, None)
    args = ["run", "--methods", "fake-scores", *_tiny_flags(), "--backend", backend, "--results", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"pip install 'circuitbench[{backend}]'" in err and err.count("\n") == 1
    assert ResultsStore(tmp_path).counts()["complete"] == 0


def _tiny_flags():
    return ["--task", "ioi-t1", "--model", "random:gpt2-tiny", "--n-train", "8", "--eval-limit", "8",
            "--method-preset", "smoke", "--no-progress"]


def test_dry_run_runs_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", "--preset", "smoke", "--dry-run", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing is run" in out and "estimated time:" in out
    assert "ep " in out and "acdc " in out and "eap " in out
    assert "budgets:\n  ep on ioi-t1: <= 20 steps of batch 4 per target" in out  # what each method may spend
    assert "acdc on ioi-t1: one greedy search per tau (0.001)" in out
    assert not results.exists()
    # with a store present: the plan counts what is complete and the store is left untouched
    run_sweep(sweep(methods="fake-scores", sparsities="0.5"), results=str(results), progress=False)
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    rows_before = sqlite3.connect(results / "results.db").execute("SELECT COUNT(*) FROM runs").fetchone()
    assert main(["run", "--methods", "fake-scores,fake-circuits", *_tiny_flags(), "--sparsities", "0.5,0.9",
                 "--dry-run", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "3 jobs planned; 0 already complete; 3 units to run" in out  # two new jobs, one to extend
    assert re.search(r"^extend +fake-scores", out, re.M) and re.search(r"^job +fake-circuits", out, re.M)
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before
    assert sqlite3.connect(results / "results.db").execute("SELECT COUNT(*) FROM runs").fetchone() == rows_before


def _run_cli(args, **kw):
    env = {**os.environ, "CIRCUITBENCH_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "circuitbench", "run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _complete_jobs(db: Path) -> dict[str, str]:
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(db, timeout=5)
        return dict(con.execute("SELECT job_id, finished_at FROM jobs WHERE status = 'complete'"))
    except sqlite3.OperationalError:
        return {}


def test_killed_sweep_resumes_with_every_job_once(tmp_path, capsys):
    # `random` is a registered method (an entry point), so a fresh process finds it
    args = ["--methods", "random", "--task", "ioi-t1", "--model", "random:gpt2-tiny", "--n-train", "8",
            "--eval-limit", "16", "--sparsities", "0.5,0.8,0.9", "--seeds", "0,1,2,3,4,5",
            "--results", str(tmp_path), "--no-progress"]
    db = tmp_path / "results.db"
    proc = _run_cli(args)
    deadline = time.time() + 120
    while not _complete_jobs(db) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed: " + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _complete_jobs(db)
    assert 1 <= len(before) < 6
    assert ResultsStore(tmp_path).integrity_check() == "ok"
    assert main(["run", *args]) == 0  # the same command again, here in this process
    assert f"{len(before)} already complete" in capsys.readouterr().out
    store = ResultsStore(tmp_path)
    after = _complete_jobs(db)
    assert len(after) == 6 and all(after[j] == t for j, t in before.items())  # not redone
    df = store.runs()
    assert len(df) == 18 and not df.duplicated(["job_id", "target_sparsity"]).any()
    assert store.counts() == {"complete": 6, "failed": 0, "runs": 18, "references": 1}
    assert len(list((tmp_path / "circuits").glob("*.json"))) == 18


@pytest.mark.slow  # two worker processes each import torch and transformers: ~40 s on a busy 2-core machine
def test_worker_processes_and_results_command(tmp_path, capsys):
    args = ["--methods", "random,eap", "--task", "ioi-t1", "--model", "random:gpt2-tiny", "--n-train", "8",
            "--eval-limit", "8", "--sparsities", "0.5,0.9", "--seeds", "0,1", "--method-preset", "smoke",
            "--jobs", "2", "--results", str(tmp_path), "--no-progress"]
    assert main(["run", *args]) == 0
    assert "2 workers" in capsys.readouterr().out
    store = ResultsStore(tmp_path)
    df = store.runs()
    assert store.counts() == {"complete": 4, "failed": 0, "runs": 8, "references": 1}
    assert df["threads"].eq(1).all()  # two workers on two cores: one thread each

    assert main(["results", "--results", str(tmp_path), "--method", "eap"]) == 0
    runs, areas = capsys.readouterr().out.split("\n\n")  # the runs, then each series' CPR and CMD
    lines = runs.splitlines()
    assert "logit_diff" in lines[0] and len(lines) == 5 and all(" eap " in line for line in lines[1:])
    assert "MIB's CPR" in areas and len(areas.strip().splitlines()) == 3 and "n/a: sizes from 10%" in areas
    assert main(["results", "--results", str(tmp_path), "--json", "--csv", str(tmp_path / "runs.csv")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and all("test/kl" in r and "n_edges" in r and "wall_total_s" in r for r in rows)
    assert isinstance(rows[0]["config"], dict)
    assert (tmp_path / "runs.csv").read_text().count("\n") == 9
    assert main(["results", "--results", str(tmp_path / "none")]) == 2


def _metrics_of(results) -> dict:
    df = ResultsStore(results).runs(with_metrics=True)
    cols = ["job_id", "target_sparsity", "n_edges"] + sorted(c for c in df.columns if c.startswith("test/"))
    return {tuple(r[:2]): r[2:] for r in df[cols].itertuples(index=False, name=None)}


def test_runs_are_deterministic(tmp_path):
    # a short Edge Pruning run and EAP, twice into two stores: identical circuits and metrics
    flags = {"methods": "ep,eap", "sparsities": "0.5", "method_config": {"ep": {"steps": 4, "ramp_steps": 3}}}
    for name in ("a", "b"):
        run_sweep(sweep(**flags), results=str(tmp_path / name), progress=False)
    a, b = _metrics_of(tmp_path / "a"), _metrics_of(tmp_path / "b")
    assert len(a) == 2 and a == b


def test_dry_run_calibrates_each_task_by_its_own_stored_jobs(tmp_path):
    """How far a search stays below its upper bound depends on the task (ACDC on ioi keeps tens of
    thousands of edges alive where gt keeps a hundred), so a task's stored jobs set its estimate;
    a task with none takes the rate of the model's jobs on other tasks, and says so."""
    from circuitbench import costs, runner
    from test_store import make_job

    store = ResultsStore(tmp_path)
    for job_id, task, wall in (("aaaa000000000001", "ioi-t1", 2.0), ("aaaa000000000002", "gt", 200.0)):
        job, runs, metrics, circuits, scores = make_job(job_id, method="acdc", task=task)
        job["wall_total_s"] = wall
        store.record_job(job, runs, metrics, circuits, scores)
    _, per_example = costs._measured_rates(store)
    model = ("acdc", "random:gpt2-tiny", "cpu")
    fast, slow = per_example[(*model, "ioi-t1")], per_example[(*model, "gt")]
    assert len(fast) == len(slow) == 1 and slow[0] > 50 * fast[0]
    assert sorted(per_example[model]) == sorted(fast + slow)

    def estimate(task, store=store):
        other = sweep(methods="acdc", sparsities="0.9", n_train="4", tasks=task,
                      method_config={"acdc": {"taus": [0.5]}})
        jobs, refs, _ = runner.validate(other, "cpu", "float32")
        plan = runner.make_plan(jobs, refs, store, "cpu", "float32", False, None)
        _, per_unit = costs.estimate_plan(plan, store, probe=False)
        _, secs, how = next(u for u in per_unit if u[0].kind == "job")
        return secs, how

    secs_ioi, how_ioi = estimate("ioi-t1")
    secs_gt, how_gt = estimate("gt")
    assert "on this task" in how_ioi and "on this task" in how_gt
    assert secs_gt > 20 * secs_ioi  # each from its own task's job, not the model-wide median
    (tmp_path / "other").mkdir()
    only_gt = ResultsStore(tmp_path / "other")
    job, runs, metrics, circuits, scores = make_job("aaaa000000000003", method="acdc", task="gt")
    only_gt.record_job(job, runs, metrics, circuits, scores)
    assert "on other tasks" in estimate("ioi-t1", only_gt)[1]


def test_smoke_preset_matches_reference(tmp_path):
    """`--preset smoke` end to end against tests/reference/smoke.json (the CI regression check)."""
    assert main(["run", "--preset", "smoke", "--results", str(tmp_path), "--no-progress"]) == 0
    problems = compare_smoke.compare(compare_smoke.snapshot(tmp_path),
                                     json.loads(compare_smoke.REFERENCE.read_text()))
    assert not problems, "\n".join(problems)


def test_results_command(tmp_path, capsys):
    from test_store import make_job

    store = ResultsStore(tmp_path)
    store.record_job(*make_job("aaaa000000000001", method="eap"))
    store.record_job(*make_job("aaaa000000000002", method="acdc", task="gt"))
    store.record_failure(make_job("aaaa000000000003", method="ep")[0], "RuntimeError: out of memory")
    assert main(["results", "--results", str(tmp_path), "--method", "eap"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "kl" in lines[0] and "accuracy" in lines[0] and len(lines) == 3
    assert all(" eap " in line and "acdc" not in line for line in lines[1:])
    assert main(["results", "--results", str(tmp_path), "--all", "--task", "ioi-t1"]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "out of memory" in out
    assert main(["results", "--results", str(tmp_path), "--json", "--csv", str(tmp_path / "runs.csv")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all({"test/kl", "test/accuracy", "n_edges", "sparsity", "wall_total_s"} <= set(r)
                                  for r in rows)
    assert isinstance(rows[0]["config"], dict) and rows[0]["wall_s.train"] == 1.5
    assert (tmp_path / "runs.csv").read_text().count("\n") == 5
    assert main(["results", "--results", str(tmp_path / "none")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_dask_backend(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    # an in-process cluster (threads): the test's fake methods are registered in its workers too
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        s = run_sweep(sweep(methods="fake-scores,fake-circuits", sparsities="0.5,0.9", seeds="0,1"),
                      results=str(tmp_path), backend="dask", cluster=cluster.scheduler_address, progress=False)
    assert (s.recorded_jobs, s.references, s.failed_jobs) == (6, 1, [])
    assert ResultsStore(tmp_path).counts() == {"complete": 6, "failed": 0, "runs": 8, "references": 1}


def test_execution_plan():
    from circuitbench.runner import execution_plan

    assert execution_plan("cpu", "local", 1, cpus=2) == (1, None, None)
    assert execution_plan("cpu", "local", 2, cpus=2) == (2, 1, None)
    assert execution_plan("cpu", "local", -1, cpus=4) == (4, 1, None)
    workers, threads, note = execution_plan("cuda:0", "local", 4, cpus=16)
    assert (workers, threads) == (1, None) and "one at a time" in note  # timed GPU jobs never share
    assert execution_plan("cpu", "dask", 1, cpus=2) == (1, None, None)


def test_dry_run_measures_pass_times_on_the_model(monkeypatch, capsys):
    """Without stored runs, the dry run times the model itself (one masked forward, one forward +
    backward) instead of assuming a throughput, and a training job's estimate is its steps x that step."""
    from circuitbench import costs, runner

    monkeypatch.setenv("CIRCUITBENCH_RANDOM_TOKENIZER", "synthetic")  # no download in a dry run
    costs._PROBED.clear()
    forward, step = costs.probe_pass_s("random:gpt2-tiny", "ioi-t1", "cpu", "float32", 16)
    assert 0 < forward < step
    # batches up to PROBE_BATCH are timed at their own size, larger ones scaled from it
    assert costs.probe_pass_s("random:gpt2-tiny", "ioi-t1", "cpu", "float32", 32) == (2 * forward, 2 * step)
    assert ("random:gpt2-tiny", "ioi-t1", "cpu", "float32", 4) not in costs._PROBED
    costs.probe_pass_s("random:gpt2-tiny", "ioi-t1", "cpu", "float32", 4)
    assert ("random:gpt2-tiny", "ioi-t1", "cpu", "float32", 4) in costs._PROBED
    assert costs.probe_pass_s("random:codellama-13b", "ioi-t1", "cpu", "float32", 8) is None  # too large
    s = sweep(methods="ep", sparsities="0.9")
    jobs, refs, _ = runner.validate(s, "cpu", "float32")
    plan = runner.make_plan(jobs, refs, None, "cpu", "float32", False, None)
    _, per_unit = costs.estimate_plan(plan, None, probe=True)
    unit, secs, how = next(u for u in per_unit if u[0].kind == "job")
    assert "measured now" in how
    steps, batch = unit.job.method_config["steps"], min(unit.job.method_config["batch_size"], unit.job.n_train)
    eval_s = secs - steps * costs.probe_pass_s("random:gpt2-tiny", "ioi-t1", "cpu", "float32", batch)[1]
    assert 0 < eval_s < secs  # the rest is the circuit's evaluation
    _, assumed = costs.estimate_plan(plan, None, probe=False)
    assert "assumed" in next(how for u, _, how in assumed if u.kind == "job")


def test_evaluate_on_a_stored_circuit_gives_the_stored_metrics(tmp_path, capsys):
    """A run with its own split sizes, then `circuitbench evaluate` on its stored circuit with those
    sizes: the job's test split (`DataSpec`), so exactly the stored metrics."""
    results = tmp_path / "r"
    sizes = ["--n-train", "8", "--n-validation", "8"]
    assert main(["run", "--methods", "eap", "--task", "ioi-t1", "--model", "random:gpt2-tiny", "--sparsities", "0.9",
                 "--eval-limit", "8", *sizes, "--results", str(results), "--no-progress"]) == 0
    row = ResultsStore(results).runs(with_metrics=True).iloc[0]
    assert row["n_validation"] == 8 and row["n_train"] == 8
    stored = {k[len("test/"):]: row[k] for k in row.index if k.startswith("test/") and not math.isnan(row[k])}
    capsys.readouterr()
    evaluate = ["evaluate", "--task", "ioi-t1", "--model", "random:gpt2-tiny", "--circuit",
                str(results / "circuits" / f"{row['run_id']}.json"), "--json", "--no-references", "--no-progress"]
    assert main([*evaluate, "--limit", "8", *sizes]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values.pop("n_examples") == row["n_examples"] == 8
    assert stored and values == stored
    # the sizes reach the data: the validation split is the job's 8 examples, not the task's default
    assert main([*evaluate, "--split", "validation", *sizes]) == 0
    assert json.loads(capsys.readouterr().out)["n_examples"] == 8
    assert main([*evaluate, "--split", "validation", "--limit", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["n_examples"] > 8


def test_model_spec_is_read_in_one_place():
    from circuitbench.models import EMBEDDED, ModelSpec

    assert ModelSpec.parse(" random:gpt2-tiny ") == ModelSpec("random:gpt2-tiny", "random", "gpt2-tiny")
    assert ModelSpec.parse("tracr:reverse").kind == "tracr" and ModelSpec.parse(EMBEDDED[0]).kind == "embedded"
    assert ModelSpec.parse("gpt2") == ModelSpec("gpt2", "hub", "gpt2")
    assert ModelSpec.parse("random:gpt2-tiny").known_random and not ModelSpec.parse("random:nope").known_random
    for bad in ("", "  ", None):
        with pytest.raises(UserError, match="non-empty"):
            ModelSpec.parse(bad)
    with pytest.raises(UserError, match="random models: random:gpt2-small"):
        ModelSpec.parse("random:nope").check()
    with pytest.raises(UserError, match="Tracr programs"):
        ModelSpec.parse("tracr:nope").check()
    assert ModelSpec.parse("random:gpt2-tiny").config().n_layer == 2


def test_dry_run_calibrates_an_upper_bound_count_from_stored_jobs(tmp_path):
    """ACDC's planned count (one trial per edge) is an upper bound; a stored search tries far fewer.
    The estimate for another ACDC job on the same model takes the stored job's training time per
    *planned* pass, so a job of the same size is estimated at the stored job's training time (plus
    its circuits' evaluation), not at the upper bound times the time of one trial."""
    from circuitbench import costs, runner

    flags = dict(methods="acdc", sparsities="0.9", n_train="4")
    s = run_sweep(sweep(**flags), results=str(tmp_path), progress=False)
    assert s.recorded_jobs == 1 and not s.failed_jobs
    store = ResultsStore(tmp_path)
    row = store.runs().iloc[0]
    trained = float(row["wall_total_s"]) - float(row["eval_s"])
    other = sweep(**flags, method_config={"acdc": {"taus": [0.5]}})  # another configuration, same count
    jobs, refs, _ = runner.validate(other, "cpu", "float32")
    plan = runner.make_plan(jobs, refs, store, "cpu", "float32", False, None)
    _, per_unit = costs.estimate_plan(plan, store, probe=False)
    unit, secs, how = next(u for u in per_unit if u[0].kind == "job")
    assert "per planned pass" in how
    _, per_example = costs._measured_rates(store)
    eval_s = secs - trained
    assert 0 < eval_s < 3 * float(row["eval_s"]) + 1  # the rest is the evaluation's estimate
    fwd, bwd, batch, _ = costs.planned_passes(unit.job, int(row["total_edges"]))
    assert fwd * batch * per_example[("acdc", "random:gpt2-tiny", "cpu")][0] == pytest.approx(trained)
