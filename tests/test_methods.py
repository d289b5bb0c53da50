"""The CircuitMethod contract: the registry (entry points), configs and presets, determinism and
cost reporting of every method, the harness's cut, and the `circuitbench methods` command."""
import dataclasses
import json
from importlib.metadata import entry_points

import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.circuit import Circuit, edges_for_sparsity
from circuitbench.cli import main
from circuitbench.errors import UserError
from circuitbench.method import (ENTRY_POINT_GROUP, CircuitMethod, Cost, MethodResult, circuits_at, get_method,
                                 list_methods, register_method)
from methods_support import SyntheticTask, make_examples

NAMES = ["acdc", "eap", "eap-ig", "eap-ig-act", "eap-mask-ig", "ensemble", "ep", "random"]


@pytest.fixture(scope="module", params=["random:gpt2-tiny", "random:llama-tiny"])
def tiny(request):
    model = load_model(request.param)
    return model, MaskedModel(model)


def test_registry_lists_every_builtin():
    methods = list_methods()
    assert sorted(methods) == NAMES
    assert {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} >= set(NAMES)
    for name, cls in methods.items():
        assert cls.name == name and issubclass(cls, CircuitMethod)
        assert {"paper", "quick", "smoke"} <= set(cls.presets)
        assert cls.produces in ("scores", "circuits") and cls.description
        assert dataclasses.is_dataclass(cls.Config)
    assert methods["ep"].produces == "circuits"


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="known methods: acdc, eap, eap-ig, eap-ig-act, eap-mask-ig, ensemble, ep, random"):
        get_method("nope")
    with pytest.raises(UserError, match="no preset"):
        get_method("ep")(preset="huge")
    with pytest.raises(UserError, match="unknown ep hyperparameter"):
        get_method("ep")(stepz=3)


def test_presets_and_overrides_resolve_in_order():
    cls = get_method("ep")
    m = cls(preset="quick", steps=7)
    assert m.config.steps == 7 and m.config.batch_size == cls.presets["quick"]["batch_size"]
    base = cls.Config(lr=0.5)
    assert cls(config=base).config.lr == 0.5
    with pytest.raises(TypeError):
        cls(config=object())


def test_register_method_checks_the_contract():
    @dataclasses.dataclass
    class Cfg:
        pass

    class NoPresets(CircuitMethod):
        name, description, Config, produces = "x-test", "d", Cfg, "scores"

        def discover(self, *a, **k):
            return MethodResult()

    with pytest.raises(TypeError, match="preset"):
        register_method(NoPresets)
    NoPresets.presets = {"paper": {}, "quick": {}, "smoke": {}}
    NoPresets.produces = "edges"
    with pytest.raises(TypeError, match="produces"):
        register_method(NoPresets)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_is_deterministic_and_reports_cost(tiny, name):
    model, eng = tiny
    task, train = SyntheticTask(), make_examples(8)
    cls = get_method(name)
    runs = [cls(preset="smoke").discover(eng, task, train, None, [0.5, 0.9], seed=1, progress=False)
            for _ in range(2)]
    cut = [circuits_at(r, model.graph, [0.5, 0.9]) for r in runs]
    for s in (0.5, 0.9):
        assert torch.equal(cut[0][s].edges, cut[1][s].edges)
    if runs[0].scores is not None:
        assert torch.equal(runs[0].scores, runs[1].scores)
        assert runs[0].scores.shape == model.graph.valid.shape
    cost = runs[0].cost
    assert isinstance(cost, Cost) and cost.wall_s and all(v >= 0 for v in cost.wall_s.values())
    if name != "random":
        assert cost.forward_passes > 0
    if name in ("ep", "eap", "eap-ig", "eap-ig-act", "eap-mask-ig"):
        assert cost.backward_passes > 0
    assert cost.peak_memory_mib is None or cost.peak_memory_mib >= 0


def test_random_scores_depend_on_the_seed(tiny):
    model, eng = tiny
    cls = get_method("random")
    a = cls().discover(eng, SyntheticTask(), make_examples(2), None, [], seed=0, progress=False)
    b = cls().discover(eng, SyntheticTask(), make_examples(2), None, [], seed=1, progress=False)
    assert not torch.equal(a.scores, b.scores)
    assert (a.scores[~model.graph.valid] == 0).all()


def test_circuits_at_prefers_own_circuits_and_cuts_scores(tiny):
    model, _ = tiny
    g = model.graph
    scores = torch.arange(g.n_writers * g.n_readers, dtype=torch.float32).view(g.n_writers, g.n_readers)
    own = Circuit.empty(g)
    res = MethodResult(scores=scores, circuits={0.25: own})
    out = circuits_at(res, g, [0.25, 0.5])
    assert out[0.25] is own
    # by default a ranking is cut where that many edges are effective; cut="edges" takes the top edges
    assert out[0.5].n_effective == out[0.5].n_edges >= edges_for_sparsity(g, 0.5)
    assert circuits_at(res, g, [0.5], cut="edges")[0.5].n_edges == edges_for_sparsity(g, 0.5)
    with pytest.raises(UserError):
        circuits_at(MethodResult(circuits={0.25: own}), g, [0.5])


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert f"\n{name} " in out
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == NAMES and all("paper" in r["presets"] for r in rows)
    assert main(["methods", "ep", "--json"]) == 0
    ep = json.loads(capsys.readouterr().out)
    assert ep["presets"]["paper"]["steps"] == 3000
    assert ep["presets"]["paper"]["per_task"]["ioi"]["node_target"] == 0.72
    assert main(["methods", "ep"]) == 0
    assert "preset smoke" in capsys.readouterr().out
    assert main(["methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_benchmarks_are_found_through_the_registry(capsys):
    # circuitbench names no method benchmark: the methods package registers its own when loaded
    from circuitbench.bench import list_benchmarks

    known = list_benchmarks()
    assert set(known) >= {"engine", "methods", "ep-step", "acdc-search"}
    assert known["methods"].target == "methods.benchmarks:methods_benchmark" and not known["methods"].search
    assert known["acdc-search"].search and known["acdc-search"].default_model == "smollm2-135m"
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown benchmark 'nope'") and "acdc-search" in err and err.count("\n") == 1


def test_methods_benchmark_reports_every_ratio():
    from methods.benchmarks import methods_benchmark

    result = methods_benchmark("random:gpt2-tiny", batch=2, seq=5, threads=1, repeats=1, memory=False,
                               progress=False)
    for key in ("ep_step_over_plain", "ep_step_with_corrupted_over_plain", "acdc_trial_over_plain_forward",
                "eap_over_plain"):
        assert result[key] > 0
    assert result["batch"] == 2 and result["seq"] == 5
