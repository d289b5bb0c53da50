"""ACDC's checkpoints: a search interrupted after some trials and run again resumes from its saved
state and ends exactly as the uninterrupted search (circuit, increases, ranking, trials, passes),
one by one and batched, within a tau and across taus, directly and through the runner into a
store; a checkpoint of another configuration or job is not used; the file is gone once the job is
recorded."""
from __future__ import annotations

import pytest
import torch

import methods.acdc as acdc
from circuitbench import MaskedModel, load_model
from circuitbench.checkpoint import Checkpoint
from circuitbench.runner import run_sweep
from circuitbench.store import ResultsStore
from circuitbench.sweep import Sweep
from methods.acdc import ACDC
from methods_support import SyntheticTask, assert_same_circuits, make_examples

EVERY_PASS = 1e-9  # checkpoint_every_s: a save before every pass


class Interrupted(RuntimeError):
    pass


@pytest.fixture
def interrupt(monkeypatch):
    """``interrupt(n)``: the search raises `Interrupted` at its pass after ``n`` trial passes
    (single or batched) have run; ``interrupt(None)`` lets it run. Returns the pass counter."""
    calls = {"n": 0, "limit": None}
    loss, losses = acdc.Trials.loss, acdc.Trials.losses

    def check():
        if calls["limit"] is not None and calls["n"] >= calls["limit"]:
            raise Interrupted(f"interrupted after {calls['n']} passes")
        calls["n"] += 1

    def counted_loss(self, *a, **k):
        check()
        return loss(self, *a, **k)

    def counted_losses(self, *a, **k):
        check()
        return losses(self, *a, **k)

    monkeypatch.setattr(acdc.Trials, "loss", counted_loss)
    monkeypatch.setattr(acdc.Trials, "losses", counted_losses)

    def arm(limit):
        calls.update(n=0, limit=limit)
        return calls

    return arm


@pytest.fixture(scope="module", params=["random:gpt2-tiny", "random:llama-tiny"])
def tiny(request):
    model = load_model(request.param)
    return model, MaskedModel(model)


def _assert_same(a, b):
    """Two discover results: the same circuits, increases (bit for bit), ranking and trial counts."""
    assert_same_circuits(a, b)
    for s in a.circuits:
        assert a.circuits[s].meta["kl"] == b.circuits[s].meta["kl"]
    assert torch.equal(a.scores, b.scores)
    keys = ("tau", "sparsity", "n_edges", "kl", "trials", "passes", "copies")
    assert [{k: r[k] for k in keys} for r in a.info["taus"]] == [{k: r[k] for k in keys} for r in b.info["taus"]]


@pytest.mark.parametrize("trial_batch", [1, 8])
@pytest.mark.parametrize("taus", [(3e-3,), (1e-3, 3e-2)])
def test_interrupted_search_resumes_exactly(tiny, interrupt, tmp_path, trial_batch, taus, capsys):
    _, eng = tiny
    _interrupt_twice_and_resume(eng, dict(taus=taus, batch_size=4, trial_batch=trial_batch,
                                          checkpoint_every_s=EVERY_PASS), interrupt, tmp_path, capsys)


@pytest.mark.parametrize("trial_batch", [1, 8])
def test_interrupted_pahq_search_resumes_exactly(interrupt, tmp_path, trial_batch, capsys):
    """PAHQ: the current circuit's loss measured in the slot's precision layout is part of the state."""
    eng = MaskedModel(load_model("random:gpt2-tiny"))
    _interrupt_twice_and_resume(eng, dict(taus=(3e-3,), batch_size=4, trial_batch=trial_batch, precision="pahq",
                                          checkpoint_every_s=EVERY_PASS), interrupt, tmp_path, capsys)


def _interrupt_twice_and_resume(eng, kwargs, interrupt, tmp_path, capsys):
    task, train = SyntheticTask(), make_examples(8)
    full = ACDC(**kwargs).discover(eng, task, train, None, [], progress=False)  # no checkpoint: none saved
    passes = sum(r["passes"] for r in full.info["taus"])
    assert "resumed" not in full.info and passes > 10
    ck = Checkpoint(tmp_path / "job.pt", "job")
    for _ in range(2):  # interrupted twice, each run a third of the passes in (with two taus: into the second)
        interrupt(passes // 3)
        method = ACDC(**kwargs)
        method.checkpoint = ck
        with pytest.raises(Interrupted):
            method.discover(eng, task, train, None, [], progress=False)
        assert ck.exists()
    counter = interrupt(None)
    method = ACDC(**kwargs)
    method.checkpoint = ck
    resumed = method.discover(eng, task, train, None, [], progress=False)
    _assert_same(full, resumed)
    assert counter["n"] < passes  # the resumed run ran only the passes after the last save
    assert len(resumed.info["resumed"]) == 2 and "resuming ACDC" in capsys.readouterr().err
    assert resumed.cost.forward_passes > full.cost.forward_passes  # the earlier runs' passes counted too


def test_checkpoint_of_another_configuration_is_not_used(tiny, interrupt, tmp_path, capsys):
    model, eng = tiny
    task, train = SyntheticTask(), make_examples(8)
    ck = Checkpoint(tmp_path / "job.pt", "job")
    interrupt(5)
    method = ACDC(taus=(1e-3,), batch_size=4, checkpoint_every_s=EVERY_PASS)
    method.checkpoint = ck
    with pytest.raises(Interrupted):
        method.discover(eng, task, train, None, [], progress=False)
    assert ck.exists()
    interrupt(None)
    other = ACDC(taus=(3e-2,), batch_size=4, checkpoint_every_s=EVERY_PASS)
    other.checkpoint = ck
    got = other.discover(eng, task, train, None, [], progress=False)
    assert "another ACDC configuration" in capsys.readouterr().err
    assert "resumed" not in got.info
    _assert_same(ACDC(taus=(3e-2,), batch_size=4).discover(eng, task, train, None, [], progress=False), got)
    # another job's file is not even read as a state
    assert Checkpoint(ck.path, "another-job").load() is None
    assert "written for job job" in capsys.readouterr().err
    # a damaged file is ignored
    ck.path.write_bytes(b"not a checkpoint")
    assert ck.load() is None and "unreadable" in capsys.readouterr().err
    # checkpoint_every_s = 0: no checkpoint is read or written
    ck.clear()
    quiet = ACDC(taus=(3e-2,), batch_size=4, checkpoint_every_s=0)
    quiet.checkpoint = ck
    _assert_same(got, quiet.discover(eng, task, train, None, [], progress=False))
    assert not ck.exists()


def test_checkpoint_every_s_is_checked_and_not_part_of_the_job_id():
    from circuitbench.errors import UserError
    from circuitbench.sweep import resolved_method_config

    with pytest.raises(UserError, match="checkpoint_every_s"):
        ACDC.resolve_config("smoke", {"checkpoint_every_s": -1})
    a = resolved_method_config(ACDC, "smoke", {}, "ioi")
    b = resolved_method_config(ACDC, "smoke", {"checkpoint_every_s": 5}, "ioi")
    assert a == b and "checkpoint_every_s" not in a


def _sweep(trial_batch):
    return Sweep.build(flags={"methods": "acdc", "tasks": "ioi-t1", "models": "random:gpt2-tiny", "n_train": "8",
                              "eval_limit": 8, "method_preset": "smoke", "sparsities": "0.5,0.9",
                              "method_config": {"acdc": {"trial_batch": trial_batch,
                                                         "checkpoint_every_s": EVERY_PASS}}})


def _recorded(store_path):
    store = ResultsStore(store_path)
    df = store.runs(with_metrics=True).sort_values("target_sparsity")
    (job_id,) = set(df["job_id"])
    circuits = [store.circuit(r).edges for r in df["run_id"]]
    return job_id, circuits, store.scores(job_id), df


@pytest.mark.parametrize("trial_batch", [1, 8])
def test_runner_resumes_an_interrupted_job(interrupt, tmp_path, trial_batch):
    """A job interrupted mid-search (recorded as failed) runs again with the same sweep into the same
    store: it resumes from its checkpoint, records the uninterrupted run's circuits and scores, and
    the checkpoint file is gone."""
    counter = interrupt(None)
    run_sweep(_sweep(trial_batch), results=str(tmp_path / "full"), progress=False)
    full_passes = counter["n"]
    job_id, full_circuits, full_scores, full_df = _recorded(tmp_path / "full")
    assert not (tmp_path / "full" / "checkpoints" / f"{job_id}.pt").exists()

    interrupt(full_passes // 2)
    summary = run_sweep(_sweep(trial_batch), results=str(tmp_path / "cut"), progress=False)
    assert len(summary.failed_jobs) == 1  # the interruption, recorded as a failure
    ck = tmp_path / "cut" / "checkpoints" / f"{job_id}.pt"
    assert ck.exists()
    counter = interrupt(None)
    summary = run_sweep(_sweep(trial_batch), results=str(tmp_path / "cut"), progress=False)
    assert summary.recorded_jobs == 1 and not summary.failed_jobs
    assert 0 < counter["n"] < full_passes  # resumed: fewer trial passes than the whole search
    assert not ck.exists()
    got_id, circuits, scores, df = _recorded(tmp_path / "cut")
    assert got_id == job_id
    assert all(torch.equal(a, b) for a, b in zip(full_circuits, circuits, strict=True))
    assert (full_scores == scores)[~torch.isnan(torch.from_numpy(full_scores)).numpy()].all()
    assert list(df["n_edges"]) == list(full_df["n_edges"])
    assert list(df["test/kl"]) == list(full_df["test/kl"])
