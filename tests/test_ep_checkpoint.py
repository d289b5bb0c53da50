"""Edge Pruning's checkpoints: a training interrupted after some steps and run again resumes from its
saved state and ends exactly as the uninterrupted training (every circuit's edges and scores, each
target's info but its wall time, the training log), over several independent runs, along the
sparsity path (mid-stage and at a stage boundary), with the stopping rule's window in progress,
from a warm start, data-parallel, and through the runner into a store (the file gone once the job
is recorded); a checkpoint of another configuration or seed is not used."""
from __future__ import annotations

import os

import pytest
import torch

import methods.edge_pruning as ep
from circuitbench import MaskedModel, load_model
from circuitbench.checkpoint import Checkpoint
from circuitbench.errors import UserError
from circuitbench.runner import run_sweep
from circuitbench.store import ResultsStore
from circuitbench.sweep import Sweep, resolved_method_config
from methods.edge_pruning import EdgePruning, _Cycle
from methods_support import SyntheticTask, assert_same_circuits, make_examples

EVERY_STEP = 1e-9  # checkpoint_every_s: a save before every step
# a few steps on the random tiny GPT-2 (110 edges), masks starting half open so every sample matters,
# a log row every step
BASE = dict(steps=12, ramp_steps=6, batch_size=4, lr=0.1, lambda_lr=0.1, init_log_alpha=1.0, log_every=1)
TIMING = ("train_s",)  # a target's info that is wall time


class Interrupted(RuntimeError):
    pass


@pytest.fixture
def interrupt(monkeypatch):
    """``interrupt(n)``: training raises `Interrupted` when it asks for the batch of its step after ``n``
    steps have run in this process (after the save before that step); ``interrupt(None)`` lets it
    run. Returns the step counter."""
    calls = {"n": 0, "limit": None}
    original = ep._Cycle.__next__

    def counted(self):
        if calls["limit"] is not None and calls["n"] >= calls["limit"]:
            raise Interrupted(f"interrupted after {calls['n']} steps")
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(ep._Cycle, "__next__", counted)

    def arm(limit):
        calls.update(n=0, limit=limit)
        return calls

    return arm


@pytest.fixture(scope="module")
def eng():
    return MaskedModel(load_model("random:gpt2-tiny"))


def _target_info(res):
    return {s: {k: v for k, v in info.items() if k not in TIMING} for s, info in res.info["targets"].items()}


def _assert_same(a, b):
    """Two discover results: the same circuits (edges, scores bit for bit, meta), target infos but wall
    times, and training log."""
    assert_same_circuits(a, b)
    for s in a.circuits:
        assert a.circuits[s].meta == b.circuits[s].meta
    # circuits shared between requested sparsities stay shared
    assert [[a.circuits[s] is a.circuits[t] for t in a.circuits] for s in a.circuits] == \
        [[b.circuits[s] is b.circuits[t] for t in b.circuits] for s in b.circuits]
    assert _target_info(a) == _target_info(b)
    assert a.log == b.log
    rest = ("targets", "resumed", "checkpoint_saves")
    assert {k: v for k, v in a.info.items() if k not in rest} == {k: v for k, v in b.info.items() if k not in rest}


def _run(eng, kwargs, sparsities, ck=None, seed=0, dp=None, n_train=8, progress=False):
    method = EdgePruning(**kwargs)
    method.checkpoint = ck
    if dp is not None:
        method.data_parallel = dp
    return method.discover(eng, SyntheticTask(), make_examples(n_train), None, sparsities, seed=seed,
                           progress=progress)


def _interrupt_and_resume(eng, kwargs, sparsities, limits, interrupt, tmp_path, capsys, dp=None, full=None,
                          progress=False):
    """Interrupt a training after each of ``limits`` steps (each run resuming the one before), then let it
    finish: the same result as the uninterrupted training ``full`` (trained here without a checkpoint).
    Returns (full, resumed, what the resumed run wrote on stderr)."""
    kwargs = dict(kwargs, checkpoint_every_s=EVERY_STEP)
    if full is None:
        counter = interrupt(None)
        full = _run(eng, kwargs, sparsities, dp=dp)  # no checkpoint: none saved
        steps = counter["n"]
    else:
        steps = full.cost.backward_passes
    assert "resumed" not in full.info and "checkpoint_saves" not in full.info
    ck = Checkpoint(tmp_path / "job.pt", "job")
    for limit in limits:
        interrupt(limit)
        with pytest.raises(Interrupted):
            _run(eng, kwargs, sparsities, ck, dp=dp)
        assert ck.exists()
    counter = interrupt(None)
    resumed = _run(eng, kwargs, sparsities, ck, dp=dp, progress=progress)
    _assert_same(full, resumed)
    assert counter["n"] == steps - sum(limits)  # the resumed run took only the steps after the last save
    assert len(resumed.info["resumed"]) == len(limits)
    assert resumed.info["checkpoint_saves"] == counter["n"]  # a save before every step
    err = capsys.readouterr().err
    assert err.count("resuming Edge Pruning") == len(limits)
    # every step counted once: the interruptions came just after a save; batches were prepared again
    assert resumed.cost.backward_passes == full.cost.backward_passes
    assert resumed.cost.forward_passes > full.cost.forward_passes
    return full, resumed, err


def test_independent_runs_interrupted_in_the_second_run(eng, interrupt, tmp_path, capsys):
    """Two targets, one run each: interrupted in the first run, then in the second (with a learning-rate
    warm-up and decay, so the schedules' state matters)."""
    kwargs = dict(BASE, warmup_steps=3, lr_decay=True)
    full, resumed, err = _interrupt_and_resume(eng, kwargs, [0.5, 0.8], [5, 12], interrupt, tmp_path, capsys,
                                               progress=True)
    assert "ep 2/2 t=0.8 (resumed at step 5)" in err  # the progress bar says so
    assert "ep 1/2" not in err  # the first run is not trained again
    assert full.info["targets"][0.5]["run_steps"] == full.info["targets"][0.8]["run_steps"] == BASE["steps"]
    first, second = resumed.info["resumed"]
    assert (first["run"], first["stage_step"]) == (0, 5)
    assert (second["run"], second["stage_step"], second["targets_done"]) == (1, 5, 1)
    assert second["saved_cost_s"] > 0


@pytest.mark.parametrize("limits", [[14], [11], [12], [5, 8]],
                         ids=["mid-stage", "before-the-last-step", "at-the-boundary", "twice"])
def test_path_interrupted_mid_stage_and_at_a_stage_boundary(eng, interrupt, tmp_path, capsys, limits):
    """The path through two targets, 12 steps a stage: step 14 is in the second stage, step 11 the first
    stage's last (its circuit not yet emitted), step 12 the second stage's first (the first's circuit
    saved with the state)."""
    kwargs = dict(BASE, schedule="path", stage_ramp_steps=3, warmup_steps=13)
    full, resumed, _ = _interrupt_and_resume(eng, kwargs, [0.5, 0.8], limits, interrupt, tmp_path, capsys)
    assert [full.info["targets"][t]["stage"] for t in (0.5, 0.8)] == [0, 1]
    assert resumed.info["resumed"][-1]["stage"] == int(sum(limits) >= 12)


def test_converged_with_the_rule_window_in_progress(eng, interrupt, tmp_path, capsys):
    """The stopping rule ends the run early; the interruption comes with its windows part-filled, so
    a rule that forgot its KLs would stop later."""
    kwargs = dict(BASE, steps=40, ramp_steps=4, stop="converged", stop_window=3, stop_tol=0.5,
                  stop_sparsity_tol=100.0)
    counter = interrupt(None)
    full = _run(eng, dict(kwargs, checkpoint_every_s=EVERY_STEP), [0.5])
    info = full.info["targets"][0.5]
    assert info["stop"] == "converged" and info["steps"] < kwargs["steps"] and counter["n"] == info["steps"]
    limit = kwargs["ramp_steps"] + kwargs["stop_window"] + 1  # after the ramp, the second window begun
    assert limit < info["steps"]
    _interrupt_and_resume(eng, kwargs, [0.5], [limit], interrupt, tmp_path, capsys, full=full)


def test_warm_start_from_eap(eng, interrupt, tmp_path, capsys):
    """The second run starts from the warm start's scores the first process computed (saved with the
    state): the resumed process does not run EAP again (its backward passes would count twice)."""
    full, resumed, _ = _interrupt_and_resume(eng, dict(BASE, warm_start="eap"), [0.5, 0.8], [15], interrupt,
                                             tmp_path, capsys)
    assert full.info["warm_start"] == "eap" and full.cost.backward_passes > 2 * BASE["steps"]
    assert "warm_start" in resumed.cost.wall_s  # the first process's, from the saved cost


def test_fixed_training_target_serves_every_sparsity_after_a_resume(eng, interrupt, tmp_path, capsys):
    """One circuit object serving two requested sparsities (a fixed edge target) is one again after a
    resume (`_assert_same` checks the sharing)."""
    kwargs = dict(BASE, edge_target=0.7)
    _interrupt_and_resume(eng, kwargs, [0.5, 0.6, 0.9], [4], interrupt, tmp_path, capsys)
    kwargs = dict(BASE, edge_target=0.7, schedule="path", node_target=0.3)
    _interrupt_and_resume(eng, kwargs, [0.5, 0.6], [7], interrupt, tmp_path, capsys)


def test_checkpoint_of_another_configuration_or_seed_is_not_used(eng, interrupt, tmp_path, capsys):
    ck = Checkpoint(tmp_path / "job.pt", "job")
    kwargs = dict(BASE, checkpoint_every_s=EVERY_STEP)
    for other_kwargs, other_seed in ((dict(kwargs, lr=0.2), 0), (kwargs, 1), (kwargs, 0)):
        interrupt(7)
        with pytest.raises(Interrupted):
            _run(eng, kwargs, [0.5], ck)
        assert ck.exists()
        capsys.readouterr()
        interrupt(None)
        sparsities = [0.5] if other_seed or other_kwargs is not kwargs else [0.6]  # last: other targets
        got = _run(eng, other_kwargs, sparsities, ck, seed=other_seed)
        assert "another Edge Pruning configuration" in capsys.readouterr().err
        assert "resumed" not in got.info
        _assert_same(_run(eng, other_kwargs, sparsities, seed=other_seed), got)
    # checkpoint_every_s = 0: no checkpoint is read or written
    interrupt(7)
    with pytest.raises(Interrupted):
        _run(eng, kwargs, [0.5], ck)
    interrupt(None)
    quiet = _run(eng, dict(kwargs, checkpoint_every_s=0), [0.5], ck)
    assert "resumed" not in quiet.info and "checkpoint_saves" not in quiet.info
    _assert_same(_run(eng, kwargs, [0.5]), quiet)
    ck.clear()
    _run(eng, dict(kwargs, checkpoint_every_s=0), [0.5], ck)
    assert not ck.exists()


def test_checkpoint_every_s_is_checked_and_not_part_of_the_job_id():
    from methods.edge_pruning import EdgePruningConfig

    msg = "ep's checkpoint_every_s must be a number of seconds >= 0"
    for bad in (-1, -0.5, float("nan")):
        with pytest.raises(UserError, match=msg):
            EdgePruning.resolve_config("smoke", {"checkpoint_every_s": bad})
    for bad in ("5", True, None):  # an override of another type is refused by its type already
        with pytest.raises(UserError, match="checkpoint_every_s"):
            EdgePruning.resolve_config("smoke", {"checkpoint_every_s": bad})
        with pytest.raises(UserError, match=msg):  # a Config made directly
            EdgePruning.check_config(EdgePruningConfig(checkpoint_every_s=bad))
    EdgePruning.resolve_config("smoke", {"checkpoint_every_s": 0})  # 0: never
    a = resolved_method_config(EdgePruning, "smoke", {}, "ioi")
    b = resolved_method_config(EdgePruning, "smoke", {"checkpoint_every_s": 5}, "ioi")
    assert a == b and "checkpoint_every_s" not in a
    assert "checkpoint_every_s" in EdgePruning.run_settings


def test_data_parallel_rank_zero_saves_and_every_rank_resumes(eng, interrupt, tmp_path, capsys, gloo_group):
    """Data parallel (a group of one here): rank 0 reads the checkpoint and broadcasts it; the resumed
    training is the uninterrupted one. A checkpoint of a single-process training is not used by a
    data-parallel one."""
    from circuitbench.distributed import DataParallel

    dp = DataParallel(0, 1)
    kwargs = dict(BASE, schedule="path")
    _interrupt_and_resume(eng, kwargs, [0.5, 0.8], [9, 7], interrupt, tmp_path, capsys, dp=dp)
    ck = Checkpoint(tmp_path / "single.pt", "job")
    interrupt(5)
    with pytest.raises(Interrupted):
        _run(eng, dict(kwargs, checkpoint_every_s=EVERY_STEP), [0.5], ck)
    interrupt(None)
    got = _run(eng, dict(kwargs, checkpoint_every_s=EVERY_STEP), [0.5], ck, dp=dp)
    assert "resumed" not in got.info and "another Edge Pruning configuration" in capsys.readouterr().err


def _dp_worker(rank, world_size, folder, kwargs, limit):
    """One rank of a gloo group training with checkpoints: rank 0's checkpoint in ``folder``/job.pt, the
    others' elsewhere (a file they must neither read nor write); raises `Interrupted` after ``limit``
    steps (None: never). Writes what it learnt, or that it was interrupted, to ``folder``/rank<r>.pt."""
    import torch.distributed as dist

    from circuitbench.distributed import DataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank,
                            world_size=world_size)
    try:
        original, calls = _Cycle.__next__, {"n": 0}

        def counted(self):
            if limit is not None and calls["n"] >= limit:
                raise Interrupted(f"interrupted after {calls['n']} steps")
            calls["n"] += 1
            return original(self)

        _Cycle.__next__ = counted
        engine = MaskedModel(load_model("random:gpt2-tiny"))
        name = "job.pt" if rank == 0 else f"elsewhere{rank}.pt"
        ck = Checkpoint(os.path.join(folder, name), "job")
        try:
            res = _run(engine, kwargs, [0.5, 0.8], ck, dp=DataParallel(rank, world_size), n_train=10)
            out = {"circuits": {s: (c.edges, c.scores) for s, c in res.circuits.items()}, "log": res.log,
                   "targets": _target_info(res), "resumed": res.info.get("resumed"), "steps": calls["n"]}
        except Interrupted:
            out = {"interrupted": calls["n"]}
        finally:
            _Cycle.__next__ = original
        out["elsewhere"] = os.path.exists(os.path.join(folder, f"elsewhere{rank}.pt"))
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # three launches of two spawned processes: ~1 min on 2 busy cores
def test_two_gloo_processes_resume_from_rank_zeros_checkpoint(tmp_path):
    """Two ranks: rank 0 saves; after an interruption rank 0 reads the checkpoint and every rank resumes
    from it, rank 1 without ever seeing the file; both end with the uninterrupted group's masks."""
    import torch.multiprocessing as mp

    kwargs = dict(BASE, schedule="path", batch_size=5, checkpoint_every_s=EVERY_STEP)

    def launch(folder, limit):
        folder.mkdir(exist_ok=True)
        for stale in ["rendezvous"] + [f"rank{r}.pt" for r in range(2)]:
            (folder / stale).unlink(missing_ok=True)
        mp.spawn(_dp_worker, args=(2, str(folder), kwargs, limit), nprocs=2, join=True)
        return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]

    full = launch(tmp_path / "full", None)
    cut = tmp_path / "cut"
    assert [r["interrupted"] for r in launch(cut, 15)] == [15, 15]
    assert (cut / "job.pt").exists()
    ranks = launch(cut, None)
    for f, r in zip(full, ranks, strict=True):
        assert r["steps"] == f["steps"] - 15 and len(r["resumed"]) == 1 and not r["elsewhere"] and not f["elsewhere"]
        assert list(f["circuits"]) == list(r["circuits"])
        for s in f["circuits"]:
            assert torch.equal(f["circuits"][s][0], r["circuits"][s][0])
            assert torch.equal(f["circuits"][s][1].nan_to_num(-1), r["circuits"][s][1].nan_to_num(-1))
        assert f["log"] == r["log"] and f["targets"] == r["targets"]
    assert ranks[0]["log"] == ranks[1]["log"]


def _sweep():
    return Sweep.build(flags={"methods": "ep", "tasks": "ioi-t1", "models": "random:gpt2-tiny", "n_train": "8",
                              "eval_limit": 8, "method_preset": "smoke", "sparsities": "0.5,0.9",
                              "method_config": {"ep": {"schedule": "path", "steps": 8, "ramp_steps": 5,
                                                       "checkpoint_every_s": EVERY_STEP}}})


def _recorded(store_path):
    store = ResultsStore(store_path)
    try:
        df = store.runs(with_metrics=True).sort_values("target_sparsity")
        (job_id,) = set(df["job_id"])
        circuits = [store.circuit(r) for r in df["run_id"]]
        (log,), (info,) = store.job_logs()["log"], store.job_logs()["info"]
        return job_id, circuits, df, log, info
    finally:
        store.close()


def test_runner_resumes_an_interrupted_job(interrupt, tmp_path):
    """A job interrupted mid-training (recorded as failed) runs again with the same sweep into the same
    store: it resumes from its checkpoint, records the uninterrupted run's circuits, log and target
    infos, and the checkpoint file is gone."""
    counter = interrupt(None)
    run_sweep(_sweep(), results=str(tmp_path / "full"), progress=False)
    full_steps = counter["n"]
    assert full_steps == 16  # two stages of 8 steps
    job_id, full_circuits, full_df, full_log, full_info = _recorded(tmp_path / "full")
    assert not (tmp_path / "full" / "checkpoints" / f"{job_id}.pt").exists()

    interrupt(11)
    summary = run_sweep(_sweep(), results=str(tmp_path / "cut"), progress=False)
    assert len(summary.failed_jobs) == 1  # the interruption, recorded as a failure
    ck = tmp_path / "cut" / "checkpoints" / f"{job_id}.pt"
    assert ck.exists()
    counter = interrupt(None)
    summary = run_sweep(_sweep(), results=str(tmp_path / "cut"), progress=False)
    assert summary.recorded_jobs == 1 and not summary.failed_jobs
    assert counter["n"] == full_steps - 11  # resumed: only the steps after the last save
    assert not ck.exists()
    got_id, circuits, df, log, info = _recorded(tmp_path / "cut")
    assert got_id == job_id
    assert len(circuits) == 2
    for a, b in zip(full_circuits, circuits, strict=True):
        assert torch.equal(a.edges, b.edges) and a.meta == b.meta
    assert list(df["n_edges"]) == list(full_df["n_edges"])
    assert list(df["test/kl"]) == list(full_df["test/kl"])
    assert log == full_log
    assert len(info["resumed"]) == 1 and info["resumed"][0]["stage"] == 1
    assert ({s: {k: v for k, v in t.items() if k not in TIMING} for s, t in info["targets"].items()}
            == {s: {k: v for k, v in t.items() if k not in TIMING} for s, t in full_info["targets"].items()})
