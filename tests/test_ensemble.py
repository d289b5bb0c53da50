"""The `ensemble` method: its normalisation and combination rules by hand, an ensemble of one member
ranking like that member, configuration errors at plan time (exit 2 through the CLI), an end-to-end
run through the runner, and the runner handing it a member's stored scores."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.circuit import Circuit
from circuitbench.cli import main
from circuitbench.errors import UserError
from circuitbench.method import CircuitMethod, CostMeter, MethodResult, circuits_at, get_method
from circuitbench.runner import run_sweep
from circuitbench.store import ResultsStore
from circuitbench.sweep import Sweep
from methods_support import SyntheticTask, make_examples, small_gpt2, temporary_methods

VALID = torch.tensor([[True, True, False], [True, True, True]])


@dataclass
class StubConfig:
    scale: float = 1.0
    per_task: dict = field(default_factory=dict)


class Stub(CircuitMethod):
    """Fixed scores with ties and negative values (the same for every seed), two forward passes."""

    name = "stub-scores"
    description = "test method: fixed scores with ties"
    Config = StubConfig
    presets = {"paper": {}, "quick": {}, "smoke": {}}
    produces = "scores"

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True):
        g = engine.graph
        meter = CostMeter(engine.device)
        with meter.phase("score"):
            base = torch.arange(g.n_writers * g.n_readers, dtype=torch.float32).view(g.n_writers, g.n_readers)
            scores = ((base % 7) - 3) * self.config.scale  # values -3..3: many ties, |.| ties across signs
            meter.forward(2)
        return MethodResult(scores=scores.masked_fill(~g.valid, 0.0), cost=meter.finish(), info={"stub": True})


class StubTwo(Stub):
    name = "stub-two"

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True):
        res = super().discover(engine, task, train, validation, sparsities, seed, progress)
        g = engine.graph
        res.scores = torch.rand(g.n_writers, g.n_readers, generator=torch.Generator().manual_seed(5)) - 0.5
        res.cost.forward_passes, res.cost.backward_passes = 3, 1
        return res


@pytest.fixture(autouse=True, scope="module")
def _stubs():
    with temporary_methods(Stub, StubTwo):
        yield


@pytest.fixture(scope="module")
def tiny():
    model = small_gpt2(2, 4, 32, 512)
    return model, MaskedModel(model)


def ensemble(**overrides):
    return get_method("ensemble")(preset="smoke", **overrides)


# ---- the rules by hand -------------------------------------------------------------------------------
def test_rank_normalisation_averages_ties_by_hand():
    from methods.ensemble import normalise_scores

    scores = torch.tensor([[3.0, -1.0, 99.0], [1.0, 0.0, 2.0]])  # 99 lies outside the graph
    out = normalise_scores(scores, VALID, "rank")
    # |scores| on the edges: 3, 1, 1, 0, 2 -> ranks 4, 1.5, 1.5, 0, 3 (ties share 1 and 2) / (5 - 1)
    expected = torch.tensor([[1.0, 0.375, 0.0], [0.375, 0.0, 0.75]], dtype=torch.float64)
    assert torch.equal(out, expected)
    # one edge: 0.5; all tied: 0.5 each
    one = torch.tensor([[True, False, False], [False, False, False]])
    assert normalise_scores(scores, one, "rank")[0, 0] == 0.5
    assert torch.equal(normalise_scores(torch.full((2, 3), 2.0), VALID, "rank")[VALID],
                       torch.full((5,), 0.5, dtype=torch.float64))


def test_z_normalisation_by_hand():
    from methods.ensemble import normalise_scores

    scores = torch.tensor([[3.0, -1.0, 99.0], [1.0, float("nan"), 2.0]])  # NaN counts as 0
    out = normalise_scores(scores, VALID, "z")
    x = [3.0, 1.0, 1.0, 0.0, 2.0]
    mean = sum(x) / 5  # 1.4
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / 5)  # population: sqrt(1.04)
    expected = torch.tensor([[(3 - mean) / std, (1 - mean) / std, 0.0],
                             [(1 - mean) / std, (0 - mean) / std, (2 - mean) / std]], dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.equal(normalise_scores(torch.ones(2, 3), VALID, "z"), torch.zeros(2, 3, dtype=torch.float64))


def test_combination_rules_by_hand():
    from methods.ensemble import combine_scores

    a = torch.tensor([[1.0, 0.0, 7.0], [0.5, -1.0, 0.25]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.5, 7.0], [0.5, 1.0, -0.75]], dtype=torch.float64)
    stack = torch.stack([a, b])
    assert torch.equal(combine_scores(stack, VALID, "mean"),
                       torch.tensor([[0.5, 0.25, 0.0], [0.5, 0.0, -0.25]], dtype=torch.float64))
    assert torch.equal(combine_scores(stack, VALID, "min"),
                       torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, -0.75]], dtype=torch.float64))
    assert torch.equal(combine_scores(stack, VALID, "max"),
                       torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.25]], dtype=torch.float64))
    # shifted (the z rule): minus the smallest value over the edges, so all >= 0
    assert torch.equal(combine_scores(stack, VALID, "min", shift=True),
                       torch.tensor([[1.0, 1.0, 0.0], [1.5, 0.0, 0.25]], dtype=torch.float64))
    with pytest.raises(UserError, match="mean, min, max"):
        combine_scores(stack, VALID, "median")


# ---- the method ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalise", ["rank", "z"])
def test_an_ensemble_of_one_ranks_like_its_member(tiny, normalise):
    model, eng = tiny
    g = model.graph
    task, train = SyntheticTask(), make_examples(8)
    for member in ("stub-scores", "eap"):
        alone = get_method(member)(preset="smoke").discover(eng, task, train, None, [], seed=0, progress=False)
        ens = ensemble(members=[member], normalise=normalise).discover(eng, task, train, None, [], seed=0,
                                                                      progress=False)
        assert (ens.scores >= 0).all() and (ens.scores[~g.valid] == 0).all()
        # the same ranking, ties and their order included, at every size (plain top edges) ...
        for n in range(0, g.n_edges + 1, 7):
            assert torch.equal(Circuit.from_scores(g, ens.scores, n).edges,
                               Circuit.from_scores(g, alone.scores, n).edges)
        # ... and the same circuits under the harness's default (effective) cut
        for cut in ("edges", "effective"):
            a = circuits_at(alone, g, [0.5, 0.9, 0.99], cut=cut)
            e = circuits_at(ens, g, [0.5, 0.9, 0.99], cut=cut)
            assert all(torch.equal(a[s].edges, e[s].edges) for s in a)


def test_two_members_combine_as_computed_by_hand_and_costs_add_up(tiny):
    from methods.ensemble import combine_scores, normalise_scores

    model, eng = tiny
    g = model.graph
    task, train = SyntheticTask(), make_examples(4)
    m = ensemble(members=["stub-scores", "stub-two"], combine="min", normalise="z",
                 member_config={"stub-scores": {"scale": 2.0}})
    res = m.discover(eng, task, train, None, [0.9], seed=3, progress=False)
    one = get_method("stub-scores")(scale=2.0).discover(eng, task, train, None, [], progress=False)
    two = get_method("stub-two")().discover(eng, task, train, None, [], progress=False)
    stack = torch.stack([normalise_scores(one.scores, g.valid, "z"), normalise_scores(two.scores, g.valid, "z")])
    assert torch.allclose(res.scores, combine_scores(stack, g.valid, "min", shift=True).float())
    info = res.info
    assert (info["combine"], info["normalise"]) == ("min", "z")
    assert [(e["name"], e["source"], e["preset"]) for e in info["members"]] == [
        ("stub-scores", "ran", "smoke"), ("stub-two", "ran", "smoke")]
    assert info["members"][0]["config"] == {"scale": 2.0} and info["members"][1]["config"] == {"scale": 1.0}
    assert info["members"][0]["info"] == {"stub": True}
    assert (res.cost.forward_passes, res.cost.backward_passes) == (2 + 3, 0 + 1)
    assert set(res.cost.wall_s) == {"stub-scores/score", "stub-two/score", "combine"}
    json.dumps(info)  # what the store records


def test_members_resolve_into_the_hashed_config():
    from circuitbench.tasks import get_task

    m = ensemble(members="eap, stub-scores", member_config={"eap": {"batch_size": 4}})
    cfg = m.config_for(get_task("ioi-t1"))
    assert cfg.members == ["eap", "stub-scores"]
    assert cfg.member_config == {"eap": {"batch_size": 4}, "stub-scores": {"scale": 1.0}}
    assert m.config_for(get_task("ioi-t1")) == cfg  # resolving is idempotent
    # another member setting is another job
    jobs = {}
    for batch in (4, 8):
        flags = {"methods": "ensemble", "tasks": "ioi-t1", "models": "random:gpt2-tiny", "method_preset": "smoke",
                 "method_config": {"ensemble": {"members": ["eap"], "member_config": {"eap": {"batch_size": batch}}}}}
        (job,), _ = Sweep.build(flags=flags).plan()
        jobs[batch] = job
    assert jobs[4].job_id != jobs[8].job_id
    assert jobs[8].method_config["member_config"] == {"eap": {"batch_size": 8}}


BAD = {
    "unknown member": (["--set", "ensemble.members=nope"], "'nope' (no such method)"),
    "circuit member": (["--set", "ensemble.members=eap,ep"], "'ep' (makes circuits, not scores)"),
    "itself": (["--set", "ensemble.members=ensemble"], "cannot hold an ensemble"),
    "twice": (["--set", "ensemble.members=eap,eap"], "lists a method twice"),
    "no members": (["--set", "ensemble.members=[]"], "ensemble.members is empty"),
    "combine": (["--set", "ensemble.combine=median"], "ensemble.combine must be one of mean, min, max"),
    "normalise": (["--set", "ensemble.normalise=minmax"], "ensemble.normalise must be one of rank, z"),
    "member config of a non-member": (["--set", "ensemble.members=eap", "--set",
                                       "ensemble.member_config={random={}}"], "not among the members"),
    "member hyperparameter": (["--set", "ensemble.members=eap", "--set", "ensemble.member_config={eap={stepz=3}}"],
                              "ensemble member eap: unknown eap hyperparameter"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_exit_2_at_plan_time(case, tmp_path, capsys):
    args, message = BAD[case]
    code = main(["run", "--methods", "ensemble", "--task", "ioi-t1", "--model", "random:gpt2-tiny",
                 "--results", str(tmp_path / "store"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    if case in ("unknown member", "circuit member", "itself"):
        assert "members can be the score methods" in err and "eap, eap-ig" in err
    assert not (tmp_path / "store").exists()  # nothing ran, nothing was created
    with pytest.raises(UserError):
        Sweep.build(flags={"methods": "ensemble", "tasks": "ioi-t1", "models": "random:gpt2-tiny"}
                    | {"method_config": _set(args)}).plan()


def _set(args):
    from circuitbench.sweep import parse_set

    return parse_set([a for a in args if a != "--set"])


# ---- through the runner -------------------------------------------------------------------------------
TINY = {"tasks": "ioi-t1", "models": "random:gpt2-tiny", "n_train": "8", "eval_limit": 8, "method_preset": "smoke",
        "sparsities": "0.5,0.9"}


def _jobs(store) -> dict:
    df = store.runs().drop_duplicates("job_id")
    return {(r["method"], json.loads(r["method_config"]).get("combine")): r for r in df.to_dict(orient="records")}


def _info(store, job_id) -> dict:
    logs = store.job_logs()
    return logs[logs["job_id"] == job_id]["info"].iloc[0]


def test_smoke_run_through_the_runner_and_stored_member_scores(tmp_path, monkeypatch):
    import numpy as np

    from methods.ensemble import combine_scores, normalise_scores

    cfg = {"ensemble": {"members": ["eap", "random"]}}
    s = run_sweep(Sweep.build(flags={**TINY, "methods": "eap,ensemble", "method_config": cfg}), results=str(tmp_path),
                  progress=False)
    assert (s.recorded_jobs, s.failed_jobs) == (2, [])
    store = ResultsStore(tmp_path)
    try:
        jobs = _jobs(store)
        eap, ens = jobs[("eap", None)], jobs[("ensemble", "mean")]
        info = _info(store, ens["job_id"])
        # the members ran inside the ensemble's job (the eap job of the same sweep was not stored yet)
        assert [(m["name"], m["source"]) for m in info["members"]] == [("eap", "ran"), ("random", "ran")]
        assert ens["forward_passes"] == eap["forward_passes"] and ens["backward_passes"] == eap["backward_passes"]
        df = store.runs(with_metrics=True)
        assert len(df[df["method"] == "ensemble"]) == 2 and df["test/kl"].notna().all()
        eap_scores, ens_scores = store.scores(eap["job_id"]), store.scores(ens["job_id"])
        model = load_model("random:gpt2-tiny")
        random_scores = get_method("random")().discover(MaskedModel(model), None, None, None, [], seed=0,
                                                        progress=False).scores
        valid = torch.from_numpy(~np.isnan(eap_scores))
        expected = combine_scores(torch.stack([normalise_scores(torch.from_numpy(eap_scores), valid, "rank"),
                                               normalise_scores(random_scores, valid, "rank")]), valid, "mean")
        assert torch.allclose(torch.from_numpy(np.nan_to_num(ens_scores)), expected.float(), atol=1e-6)

        # another ensemble of the same members: the runner hands it the stored eap scores, so eap does
        # not run again (it would fail here); its cost still counts eap's
        def no_rerun(*args, **kwargs):
            raise AssertionError("eap ran again")

        monkeypatch.setattr(get_method("eap"), "discover", no_rerun)
        cfg = {"ensemble": {"members": ["eap", "random"], "combine": "max"}}
        s = run_sweep(Sweep.build(flags={**TINY, "methods": "ensemble", "method_config": cfg}),
                      results=str(tmp_path), progress=False)
        assert (s.recorded_jobs, s.failed_jobs) == (1, [])
        again = _jobs(store)[("ensemble", "max")]
        info = _info(store, again["job_id"])
        assert [(m["name"], m["source"], m.get("job_id")) for m in info["members"]] == [
            ("eap", "stored", eap["job_id"]), ("random", "ran", None)]
        assert again["forward_passes"] == eap["forward_passes"]
        # the report tells ensembles of other members or rules apart (a series each)
        from circuitbench.report.data import load_report_data

        data = load_report_data(tmp_path)
        try:
            presets = set(data.runs[data.runs["method"] == "ensemble"]["method_preset"])
        finally:
            data.store.close()
        assert presets == {"smoke, eap+random mean rank", "smoke, eap+random max rank"}
        wall = json.loads(store._connect().execute("SELECT wall_s FROM jobs WHERE job_id = ?",
                                                   (again["job_id"],)).fetchone()[0])
        assert set(wall) == {"eap/attribute", "random/score", "combine"}

        # other data (another seed) is not the same discovery: nothing stored to reuse, eap would run
        cfg = {"ensemble": {"members": ["eap"], "combine": "max"}}
        s = run_sweep(Sweep.build(flags={**TINY, "methods": "ensemble", "seeds": "1", "method_config": cfg}),
                      results=str(tmp_path), progress=False)
        assert len(s.failed_jobs) == 1
        assert "eap ran again" in store.runs(status="failed")["error"].dropna().iloc[0]
    finally:
        store.close()
