"""Sweeps: value parsing, layering (defaults < preset < file < flags), TOML errors, expansion, job ids."""
from __future__ import annotations

import re

import pytest

from dataclasses import dataclass, field

from circuitbench.errors import UserError
from circuitbench.method import CircuitMethod
from circuitbench.sweep import PRESETS, Sweep, parse_set, parse_sparsities
from methods_support import temporary_methods


@dataclass
class FixedConfig:
    batch_size: int = 8
    per_task: dict = field(default_factory=dict)


class FixedConfigMethod(CircuitMethod):
    """A method whose configuration never changes, to pin the job-id scheme."""

    name = "fixed-config"
    description = "test method with a frozen configuration"
    Config = FixedConfig
    presets = {"paper": {}, "quick": {}, "smoke": {}}
    produces = "scores"

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True):
        raise AssertionError("planning only")


@pytest.fixture(autouse=True, scope="module")
def _fixed_config_method():
    with temporary_methods(FixedConfigMethod):
        yield


def test_parse_sparsities():
    assert parse_sparsities("0.9:0.99:0.01") == [0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
    assert parse_sparsities("0.95,0.9,0.9") == [0.9, 0.95]
    assert parse_sparsities([0, 0.5]) == [0.0, 0.5]
    assert parse_sparsities(0.5) == [0.5]
    for bad, msg in [("1.0", "outside"), ("-0.1", "outside"), ([0.5, 1.2], "outside"), ("0.9:0.8:0.01", "stop"),
                     ("0.9:0.99", "range"), ("a,b", "not a comma"), ([True], "not a number"), ("", "no sparsity")]:
        with pytest.raises(UserError, match=msg):
            parse_sparsities(bad)


def test_parse_set():
    assert parse_set(["ep.steps=100", "ep.lr=0.5", "acdc.taus=[0.1, 0.2]", "x.name=abc"]) == {
        "ep": {"steps": 100, "lr": 0.5}, "acdc": {"taus": [0.1, 0.2]}, "x": {"name": "abc"}}
    with pytest.raises(UserError, match="METHOD.FIELD=VALUE"):
        parse_set(["steps=100"])


def test_job_ids_are_those_of_existing_stores():
    # ids computed before `JobSpec` (a dict built in `Sweep.plan`): stores written then still resume
    smoke = {j.job_id: j for j in Sweep.build(preset="smoke").plan("cpu")[0]}
    assert sorted(smoke) == ["59776503a39bbc2c", "735675d0c10628b3", "d35466cbdbc1f8ed", "f2dae2b6817e7cb8"]
    assert smoke["735675d0c10628b3"].target_sparsity == 0.5 and smoke["735675d0c10628b3"].produces == "circuits"
    path = Sweep.build(flags={"methods": "ep", "tasks": "gt", "n_validation": 8,
                              "method_config": {"ep": {"schedule": "path"}}}).plan("cpu")[0]
    assert [j.job_id for j in path] == ["3517cdee4d06207b"] and path[0].target_sparsity is None


def test_overrides_are_checked_against_the_config_field_types():
    from circuitbench.method import get_method

    ep = get_method("ep")
    cfg = ep.resolve_config("paper", {"steps": 7, "lr": 1, "edge_target": 0.5, "warm_start": "eap-ig"}, "gt")
    assert (cfg.steps, cfg.lr, cfg.edge_target, cfg.warm_start) == (7, 1, 0.5, "eap-ig")
    assert cfg.node_target == ep.presets["paper"]["per_task"]["gt"]["node_target"]  # the preset's per-task entry
    assert get_method("acdc").resolve_config(None, {"taus": [0.1, 0.2]}).taus == [0.1, 0.2]  # a TOML array
    for bad, msg in [({"steps": "abc"}, "ep.steps: expected int, got 'abc'"),
                     ({"steps": 3.5}, "ep.steps: expected int"), ({"steps": True}, "ep.steps: expected int"),
                     ({"lr": "fast"}, "ep.lr: expected float"), ({"node_loss": 1}, "ep.node_loss: expected bool"),
                     ({"edge_target": "x"}, "ep.edge_target: expected float | None"),
                     ({"schedule": 1}, "ep.schedule: expected str"), ({"nosuch": 1}, "unknown ep hyperparameter")]:
        with pytest.raises(UserError, match=re.escape(msg)):
            ep.resolve_config("paper", bad, "gt")
        with pytest.raises(UserError, match=re.escape(msg)):
            ep(preset="paper", **bad)


def test_resolving_a_config_needs_no_instance():
    # the classmethod and an instance's config_for agree, for a plain method and an ensemble
    from circuitbench.method import get_method
    from circuitbench.tasks import get_task

    for name, overrides in [("ep", {"steps": 9}), ("ensemble", {"member_config": {"eap-ig": {"steps": 3}}})]:
        cls = get_method(name)
        assert cls.resolve_config("quick", overrides, "ioi") == cls(preset="quick", **overrides).config_for(
            get_task("ioi"))


def write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_unknown_and_bad_keys_are_errors(tmp_path):
    with pytest.raises(UserError, match="unknown key 'sparsity'"):
        Sweep.build(config=write(tmp_path, 'methods = ["eap"]\nsparsity = [0.9]\n'))
    with pytest.raises(UserError, match=r"unknown key 'device' in \[task.gt\]"):
        Sweep.build(config=write(tmp_path, '[task.gt]\ndevice = "cpu"\n'))
    with pytest.raises(UserError, match="not a whole number"):
        Sweep.build(config=write(tmp_path, 'seeds = [0.5]\n'))
    with pytest.raises(UserError, match="not valid TOML"):
        Sweep.build(config=write(tmp_path, 'methods = [\n'))
    with pytest.raises(UserError, match="does not exist"):
        Sweep.build(config=str(tmp_path / "missing.toml"))
    with pytest.raises(UserError, match="unknown preset 'fast'"):
        Sweep.build(preset="fast")


def test_layering_and_per_task_values(tmp_path):
    cfg = write(tmp_path, """
methods = ["eap"]
tasks = ["ioi-t1", "gt"]
sparsities = [0.5]
seeds = [1]
[method_config.eap]
batch_size = 8
[task.gt]
sparsities = [0.7, 0.8]
n_train = [20]
""")
    sweep = Sweep.build(preset="smoke", config=cfg, flags={"seeds": "3,4", "method_config": {"eap": {"batch_size": 4}}})
    assert sweep.get("models") == ["random:gpt2-tiny"]  # from the preset
    assert sweep.get("sparsities", "ioi-t1") == [0.5]  # file beats preset
    assert sweep.get("sparsities", "gt") == [0.7, 0.8]  # per-task beats the file's top level
    assert sweep.get("seeds", "gt") == [3, 4]  # flags beat everything
    assert sweep.method_overrides("eap", "gt") == {"batch_size": 4}
    jobs, refs = sweep.plan()
    by_task = {}
    for j in jobs:
        by_task.setdefault(j.task, []).append(j)
    assert {j.sparsities for j in by_task["gt"]} == {(0.7, 0.8)} and {j.n_train for j in by_task["gt"]} == {20}
    assert {j.sparsities for j in by_task["ioi-t1"]} == {(0.5,)} and {j.n_train for j in by_task["ioi-t1"]} == {8}
    assert sorted(j.seed for j in by_task["gt"]) == [3, 4]
    assert all(j.method_config["batch_size"] == 4 for j in jobs)
    assert sorted(r.task for r in refs) == ["gt", "ioi-t1"]


def test_expansion_and_stable_ids():
    flags = {"methods": "ep,eap", "tasks": "ioi-t1", "models": "random:gpt2-tiny", "sparsities": "0.5,0.9",
             "seeds": "0,1", "n_train": "16,32", "method_preset": "smoke"}
    jobs, refs = Sweep.build(flags=flags).plan()
    ep = [j for j in jobs if j.method == "ep"]
    eap = [j for j in jobs if j.method == "eap"]
    assert len(ep) == 2 * 2 * 2 and all(len(j.sparsities) == 1 and j.target_sparsity == j.sparsities[0] for j in ep)
    assert len(eap) == 2 * 2 and all(j.sparsities == (0.5, 0.9) and j.target_sparsity is None for j in eap)
    assert len(refs) == 1 and len({j.job_id for j in jobs}) == len(jobs)
    again, _ = Sweep.build(flags=flags).plan()
    assert [j.job_id for j in again] == [j.job_id for j in jobs]  # stable across plans
    # a score-based job keeps its id when the grid grows (its stored scores are cut again);
    # anything that changes its result changes the id
    grown, _ = Sweep.build(flags={**flags, "sparsities": "0.5,0.9,0.95"}).plan()
    assert {j.job_id for j in eap} <= {j.job_id for j in grown}
    other_data, _ = Sweep.build(flags={**flags, "data_seed": 1}).plan()
    assert not {j.job_id for j in jobs} & {j.job_id for j in other_data}
    on_gpu, _ = Sweep.build(flags=flags).plan(device="cuda")
    assert not {j.job_id for j in jobs} & {j.job_id for j in on_gpu}
    # the id of a job, fixed: a change here silently orphans every stored result (it changed once on
    # purpose: score methods' circuits are cut by effective edges, and their jobs say so with "cut")
    one, _ = Sweep.build(flags={**flags, "methods": "fixed-config", "seeds": "0", "n_train": "16"}).plan()
    assert [j.job_id for j in one] == ["5847ba31297e3e09"]
    assert one[0].config == {"v": 1, "method": "fixed-config", "method_preset": "smoke",
                             "method_config": {"batch_size": 8}, "task": "ioi-t1", "model": "random:gpt2-tiny",
                             "n_train": 16, "n_validation": None, "data_seed": 0, "seed": 0, "dtype": "float32",
                             "device": "cpu", "eval_limit": None, "target_sparsity": None, "cut": "effective"}
    edges, _ = Sweep.build(flags={**flags, "methods": "fixed-config", "seeds": "0", "n_train": "16",
                                  "cut": "edges"}).plan()
    assert edges[0].config["cut"] == "edges" and edges[0].cut == "edges" and edges[0].job_id != one[0].job_id


def test_plan_errors():
    base = {"methods": "eap", "tasks": "ioi-t1", "models": "random:gpt2-tiny"}
    for flags, msg in [({**base, "methods": "nope"}, "unknown method 'nope'"),
                       ({**base, "tasks": "nope"}, "unknown task 'nope'"),
                       ({**base, "tasks": "ioi", "n_train": "200000"}, "training pool holds"),
                       ({**base, "n_train": "0"}, "at least 1"),
                       ({**base, "method_config": {"eap": {"nope": 1}}}, "unknown eap hyperparameter"),
                       ({**base, "method_preset": "huge"}, "no preset 'huge'")]:
        with pytest.raises(UserError, match=msg):
            Sweep.build(flags=flags).plan()
    with pytest.raises(UserError, match="no task given"):
        Sweep.build(flags={"methods": "eap"}).plan()


def test_task_bound_model():
    # Tracr tasks name their compiled model; a file's general model list does not apply to them
    jobs, refs = Sweep.build(preset="smoke", flags={"tasks": "tracr-xproportion"}).plan()
    assert {j.model for j in jobs} == {"tracr:xproportion"}
    jobs, _ = Sweep.build(flags={"methods": "eap", "tasks": "tracr-xproportion,ioi-t1"}).plan()
    assert {(j.task, j.model) for j in jobs} == {("tracr-xproportion", "tracr:xproportion"), ("ioi-t1", "smollm2-135m")}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_plan(preset):
    jobs, refs = Sweep.build(preset=preset).plan()
    assert jobs and refs
    assert all(j.method_preset == preset for j in jobs)
    assert {j.method for j in jobs} >= {"ep", "acdc", "eap"}


def test_tracr_tasks_default_to_their_ground_truth_sparsity():
    """With no sparsity asked for, a task with a known circuit is cut at its true size."""
    jobs, _ = Sweep.build(flags={"methods": "ep", "tasks": "tracr-xproportion"}).plan()
    assert [j.target_sparsity for j in jobs] == [pytest.approx(1 - 5 / 23)]
    asked, _ = Sweep.build(flags={"methods": "ep", "tasks": "tracr-xproportion", "sparsities": "0.5"}).plan()
    assert [j.target_sparsity for j in asked] == [0.5]


def test_the_synthetic_tokenizer_gets_jobs_of_their_own(monkeypatch):
    flags = {"methods": "eap", "tasks": "ioi-t1", "models": "random:gpt2-tiny", "method_preset": "smoke"}
    usual, usual_refs = Sweep.build(flags=flags).plan()
    monkeypatch.setenv("CIRCUITBENCH_RANDOM_TOKENIZER", "synthetic")
    synthetic, synthetic_refs = Sweep.build(flags=flags).plan()
    assert "tokenizer" not in usual[0].config and synthetic[0].config["tokenizer"] == "synthetic"
    assert usual[0].job_id != synthetic[0].job_id and usual_refs[0].ref_id != synthetic_refs[0].ref_id


def test_per_method_seeds_and_training_sizes(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('methods = ["ep", "eap", "acdc"]\ntasks = ["ioi-t1"]\nmodels = ["random:gpt2-tiny"]\n'
                    'sparsities = [0.9]\nseeds = [0, 1, 2]\nn_train = [20]\nmethod_preset = "smoke"\n'
                    '[per_method.eap]\nseeds = [0]\n[per_method.acdc]\nseeds = [0]\nn_train = [8]\n')
    jobs, _ = Sweep.build(config=str(path)).plan()
    got = sorted((j.method, j.seed, j.n_train) for j in jobs)
    assert got == [("acdc", 0, 8), ("eap", 0, 20), ("ep", 0, 20), ("ep", 1, 20), ("ep", 2, 20)]
    path.write_text('methods = ["eap"]\ntasks = ["ioi-t1"]\n[per_method.eap]\nsteps = [3]\n')
    with pytest.raises(UserError, match="unknown key.*steps; allowed: seeds, n_train"):
        Sweep.build(config=str(path))


def test_preset_precedence_and_overrides_are_printed(tmp_path, capsys):
    """One precedence for presets: a method's own preset < the sweep preset's [method_config]
    (configs/quick.toml sets Edge Pruning's steps to 40 over its own quick preset's 400) < a
    --config file < --set; and every override is named, with the source that made it, in the
    plan the runner prints."""
    from circuitbench.cli import main
    from circuitbench.method import get_method

    own = get_method("ep").resolve_config("quick", {}, "gt")
    assert own.steps == 400 and own.schedule != "path"  # Edge Pruning's own quick preset
    quick = Sweep.build(preset="quick")
    (ep,) = [j for j in quick.plan()[0] if j.method == "ep"]
    assert ep.method_preset == "quick" and ep.method_config["steps"] == 40 and ep.method_config["schedule"] == "path"
    lines = quick.override_lines(quick.plan()[0])
    assert lines == [l for l in lines if l.startswith("ep ")]  # acdc, eap, eap-ig: their presets as they are
    assert "steps 400 -> 40" in lines[0] and lines[0].endswith("[preset quick (configs/quick.toml)] on gt")
    assert "preset quick (configs/quick.toml)" in quick.describe()

    cfg = tmp_path / "more.toml"
    cfg.write_text("[method_config.ep]\nsteps = 30\n")
    layered = Sweep.build(preset="quick", config=str(cfg), flags={"method_config": {"ep": {"steps": 7}}})
    (ep,) = [j for j in layered.plan()[0] if j.method == "ep"]
    assert ep.method_config["steps"] == 7
    steps = [l for l in layered.override_lines(layered.plan()[0]) if "steps 40 -> 30" in l or "steps 30 -> 7" in l]
    assert len(steps) == 2 and steps[0].endswith(f"[{cfg}] on gt") and steps[1].endswith("[command line] on gt")

    plain = Sweep.build(flags={"methods": "ep", "tasks": "ioi-t1", "models": "random:gpt2-tiny",
                               "method_preset": "smoke"})
    assert plain.override_lines(plain.plan()[0]) == []  # nothing overridden, nothing said

    assert main(["run", "--preset", "smoke", "--set", "ep.steps=3", "--dry-run", "--results",
                 str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "overrides of the method presets:\n  ep (its preset 'smoke'): steps 20 -> 3 [command line] on ioi-t1" in out
